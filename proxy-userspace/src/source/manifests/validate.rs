//! What the API server would refuse and the planner relies on: a hand-written manifest
//! gets the checks an API server would have made before a watcher ever saw the object.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::SERVICE_NAME_LABEL;

/// Reasons collected while validating one object; Err joins them.
#[derive(Default)]
struct Reasons(Vec<String>);

impl Reasons {
    fn add(&mut self, reason: String) {
        self.0.push(reason);
    }

    fn check(&mut self, ok: bool, reason: impl FnOnce() -> String) {
        if !ok {
            self.add(reason());
        }
    }

    fn ip(&mut self, field: &str, addr: &str) {
        self.check(addr.parse::<IpAddr>().is_ok(), || {
            format!("{field} {addr:?} is not an IP address")
        });
    }

    fn port(&mut self, field: &str, port: i32) {
        self.check((1..=65535).contains(&port), || {
            format!("{field} {port} is out of range (1-65535)")
        });
    }

    fn protocol(&mut self, field: &str, protocol: Option<&str>) {
        self.one_of(field, protocol, &["TCP", "UDP", "SCTP"]);
    }

    fn one_of(&mut self, field: &str, value: Option<&str>, allowed: &[&str]) {
        if let Some(value) = value {
            self.check(allowed.contains(&value), || {
                format!(
                    "{field} {value:?} is invalid; expected one of {}",
                    allowed.join(", ")
                )
            });
        }
    }

    fn into_result(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("; "))
        }
    }
}

/// What the API server would refuse and the planner relies on.
pub(super) fn validate_service(service: &Service) -> Result<(), String> {
    let mut reasons = Reasons::default();
    if let Some(spec) = &service.spec {
        reasons.one_of(
            "spec.type",
            spec.type_.as_deref(),
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        );
        let policies = ["Cluster", "Local"];
        reasons.one_of(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
            &policies,
        );
        reasons.one_of(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
            &policies,
        );
        reasons.one_of(
            "spec.sessionAffinity",
            spec.session_affinity.as_deref(),
            &["None", "ClientIP"],
        );
        let affinity_timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds);
        if let Some(seconds) = affinity_timeout {
            reasons.check((1..=86_400).contains(&seconds), || {
                format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of \
                     range (1-86400)"
                )
            });
        }
        if let Some(cluster_ip) = spec.cluster_ip.as_deref()
            && !matches!(cluster_ip, "" | "None")
        {
            reasons.ip("spec.clusterIP", cluster_ip);
        }
        for (index, cluster_ip) in spec.cluster_ips.iter().flatten().enumerate() {
            if cluster_ip != "None" {
                reasons.ip(&format!("spec.clusterIPs[{index}]"), cluster_ip);
            }
        }
        for (index, external_ip) in spec.external_ips.iter().flatten().enumerate() {
            reasons.ip(&format!("spec.externalIPs[{index}]"), external_ip);
        }
        let mut port_names = Vec::new();
        for (index, port) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{index}]");
            // k8s-openapi reads a missing port as 0.
            if port.port == 0 {
                reasons.add(format!("{field}.port is missing"));
            } else {
                reasons.port(&format!("{field}.port"), port.port);
            }
            reasons.protocol(&format!("{field}.protocol"), port.protocol.as_deref());
            if let Some(node_port) = port.node_port.filter(|&node_port| node_port != 0) {
                reasons.port(&format!("{field}.nodePort"), node_port);
            }
            let name = port.name.as_deref().unwrap_or_default();
            reasons.check(!port_names.contains(&name), || {
                format!("{field}.name {name:?} is used by another port")
            });
            port_names.push(name);
        }
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    for (index, ingress) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &ingress.ip {
            reasons.ip(&format!("status.loadBalancer.ingress[{index}].ip"), ip);
        }
    }
    reasons.into_result()
}

/// What the API server would refuse and the model and planner rely on.
pub(super) fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    let mut reasons = Reasons::default();
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|name| !name.is_empty());
    reasons.check(service_name.is_some(), || {
        format!("label {SERVICE_NAME_LABEL} is missing (it names the slice's Service)")
    });
    let address_type = slice.address_type.as_str();
    reasons.one_of("addressType", Some(address_type), &["IPv4", "IPv6", "FQDN"]);
    for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        let field = format!("endpoints[{index}].addresses");
        reasons.check(!endpoint.addresses.is_empty(), || {
            format!("{field} is empty")
        });
        for addr in &endpoint.addresses {
            let valid = match address_type {
                "IPv4" => addr.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => addr.parse::<Ipv6Addr>().is_ok(),
                _ => true,
            };
            reasons.check(valid, || {
                format!("{field}: {addr:?} is not an {address_type} address")
            });
        }
    }
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{index}]");
        if let Some(port) = port.port {
            reasons.port(&format!("{field}.port"), port);
        }
        reasons.protocol(&format!("{field}.protocol"), port.protocol.as_deref());
    }
    reasons.into_result()
}
