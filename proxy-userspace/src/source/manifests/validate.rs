//! What the API server would refuse and the planner relies on: a hand-written manifest
//! gets the checks an API server would have made before a watcher ever saw the object.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::model::SERVICE_NAME_LABEL;
use crate::model::address::parse_ip_sloppy;

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

    /// An address as the API server reads it (leading zeros allowed, see
    /// [`parse_ip_sloppy`]).
    fn ip(&mut self, field: &str, addr: &str) {
        self.check(parse_ip_sloppy(addr).is_some(), || {
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
            // The API server's rule: the address read sloppily is of the slice's family
            // (an IPv4-mapped IPv6 address counts as IPv4).
            let valid = match address_type {
                "IPv4" => matches!(parse_ip_sloppy(addr), Some(IpAddr::V4(_))),
                "IPv6" => matches!(parse_ip_sloppy(addr), Some(IpAddr::V6(_))),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Addresses are read as the API server reads them (`ParseIPSloppy`): leading zeros
    /// are decimal, so such objects pass (they were valid until Kubernetes 1.33 and still
    /// exist); what is no address at all, or of the slice's other family, does not.
    #[test]
    fn addresses_with_leading_zeros_pass_as_the_api_server_lets_them() {
        let service = |cluster_ip: &str, external_ip: &str, ingress_ip: &str| -> Service {
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                    "externalIPs": [external_ip],
                    "ports": [{"port": 80}],
                },
                "status": {"loadBalancer": {"ingress": [{"ip": ingress_ip}]}},
            }))
            .unwrap()
        };
        let services = [
            (
                service("172.30.0.041", "198.018.9.001", "198.18.008.1"),
                Ok(()),
            ),
            (
                service("172.30.0.41", "::ffff:198.18.9.1", "fd00::8"),
                Ok(()),
            ),
            (
                service("172.30.0.256", "198.18.9.1", "198.18.8.1"),
                Err("spec.clusterIP \"172.30.0.256\" is not an IP address; \
                     spec.clusterIPs[0] \"172.30.0.256\" is not an IP address"),
            ),
            (
                service("172.30.0.41", "198.18.9", "lb.example"),
                Err("spec.externalIPs[0] \"198.18.9\" is not an IP address; \
                     status.loadBalancer.ingress[0].ip \"lb.example\" is not an IP address"),
            ),
        ];
        for (service, expected) in services {
            let spec = service.spec.as_ref().unwrap();
            let name = format!("{:?}", spec.cluster_ip);
            let expected = expected.map_err(str::to_owned);
            assert_eq!(validate_service(&service), expected, "{name}");
        }

        let slice = |address_type: &str, address: &str| -> EndpointSlice {
            serde_json::from_value(json!({
                "metadata": {"name": "web-1", "namespace": "default",
                             "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": address_type,
                "endpoints": [{"addresses": [address]}],
            }))
            .unwrap()
        };
        let slices = [
            (slice("IPv4", "10.180.00.001"), true),
            (slice("IPv4", "::ffff:10.180.0.1"), true),
            (slice("IPv4", "10.180.0.1000"), false),
            (slice("IPv6", "fd00::1"), true),
            (slice("IPv6", "::ffff:10.180.0.1"), false),
            (slice("IPv6", "10.180.0.1"), false),
        ];
        for (slice, valid) in slices {
            let endpoint = &slice.endpoints.as_ref().unwrap()[0];
            let name = format!("{} {:?}", slice.address_type, endpoint.addresses[0]);
            assert_eq!(validate_endpoint_slice(&slice).is_ok(), valid, "{name}");
        }
    }
}
