//! What the API server would refuse and the planner relies on, checked for both sources:
//! a hand-written manifest gets the checks an API server would have made before a watcher
//! ever saw the object, and an object from the API server (or from something posing as
//! one) is checked again rather than trusted — a hostile or broken object is refused with
//! its reasons and never reaches the planner. Names, ports, protocols, addresses and the
//! sizes the API server allows (an EndpointSlice holds at most 1000 endpoints).

use std::collections::HashSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::model::address::parse_ip_sloppy;
use crate::model::{Family, SERVICE_NAME_LABEL};

/// The API server's limits on an EndpointSlice (`maxEndpoints`, `maxPorts`,
/// `maxAddresses`).
const MAX_SLICE_ENDPOINTS: usize = 1000;
const MAX_SLICE_PORTS: usize = 100;
const MAX_ENDPOINT_ADDRESSES: usize = 100;

/// At most this many reasons are spelled out; a slice of 10 000 bad addresses is one line.
const MAX_REASONS: usize = 10;

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
            format!("{field} {} is not an IP address", shortened(addr))
        });
    }

    /// The API server's dual-stack rules (`validateIPFamilies`,
    /// `validateServiceClusterIPsRelatedFields`): at most two families, each once, named
    /// `IPv4` or `IPv6`; at most two clusterIPs, of different families, the first equal to
    /// `clusterIP`, each of the family at its index in `ipFamilies`; `SingleStack` with one
    /// family. The planner relies on them to find a Service's clusterIP of each family.
    fn ip_families(&mut self, spec: &ServiceSpec) {
        let families = spec.ip_families.as_deref().unwrap_or_default();
        self.check(families.len() <= 2, || {
            format!(
                "spec.ipFamilies lists {} families, at most 2",
                families.len()
            )
        });
        for (index, family) in families.iter().enumerate() {
            self.one_of(
                &format!("spec.ipFamilies[{index}]"),
                Some(family),
                &["IPv4", "IPv6"],
            );
            self.check(!families[..index].contains(family), || {
                format!(
                    "spec.ipFamilies[{index}] {} is listed twice",
                    shortened(family)
                )
            });
        }
        let policy = spec.ip_family_policy.as_deref();
        self.one_of(
            "spec.ipFamilyPolicy",
            policy,
            &["SingleStack", "PreferDualStack", "RequireDualStack"],
        );
        self.check(policy != Some("SingleStack") || families.len() <= 1, || {
            "spec.ipFamilyPolicy SingleStack allows one entry in spec.ipFamilies".to_owned()
        });
        let cluster_ips = spec.cluster_ips.as_deref().unwrap_or_default();
        let is_address = |ip: &str| !matches!(ip, "" | "None");
        if cluster_ips.iter().any(|ip| is_address(ip)) {
            self.check(cluster_ips.len() <= 2, || {
                format!(
                    "spec.clusterIPs lists {} addresses, at most 2",
                    cluster_ips.len()
                )
            });
            if let Some(cluster_ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty()) {
                self.check(cluster_ips[0] == cluster_ip, || {
                    "spec.clusterIPs[0] must equal spec.clusterIP".to_owned()
                });
            }
            let parsed: Vec<Option<Family>> = (cluster_ips.iter())
                .map(|ip| parse_ip_sloppy(ip).map(Family::of))
                .collect();
            if let [Some(first), Some(second)] = parsed[..] {
                self.check(first != second, || {
                    "spec.clusterIPs holds two addresses of one family (one per family)".to_owned()
                });
            }
            for (index, (family, name)) in parsed.iter().zip(families).enumerate() {
                if let (Some(family), Some(named)) = (family, Family::from_api(name)) {
                    self.check(*family == named, || {
                        format!("spec.clusterIPs[{index}] is not of family {name} (spec.ipFamilies[{index}])")
                    });
                }
            }
        }
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
                    "{field} {} is invalid; expected one of {}",
                    shortened(value),
                    allowed.join(", ")
                )
            });
        }
    }

    /// A name as the API server requires it (`rule` says which kind of name).
    fn name(&mut self, field: &str, value: &str, rule: NameRule) {
        self.check(rule.admits(value), || {
            format!(
                "{field} {} is not a valid {}",
                shortened(value),
                rule.describe()
            )
        });
    }

    fn metadata(&mut self, metadata: &ObjectMeta, name_rule: NameRule) {
        if let Some(name) = metadata.name.as_deref() {
            self.name("metadata.name", name, name_rule);
        }
        if let Some(namespace) = metadata.namespace.as_deref().filter(|ns| !ns.is_empty()) {
            self.name("metadata.namespace", namespace, NameRule::Label);
        }
    }

    fn into_result(self) -> Result<(), String> {
        match self.0.len() {
            0 => Ok(()),
            count if count > MAX_REASONS => Err(format!(
                "{}; and {} more",
                self.0[..MAX_REASONS].join("; "),
                count - MAX_REASONS
            )),
            _ => Err(self.0.join("; ")),
        }
    }
}

/// The API server's rules for names.
#[derive(Clone, Copy)]
enum NameRule {
    /// DNS-1123 label: namespaces.
    Label,
    /// DNS-1035 label (a DNS label starting with a letter): Service names.
    ServiceName,
    /// DNS-1123 subdomain: EndpointSlice names.
    Subdomain,
    /// A label value: at most 63 characters, alphanumerics with `-`, `_`, `.` inside.
    LabelValue,
}

impl NameRule {
    fn admits(self, value: &str) -> bool {
        let label = |part: &str| {
            let bytes = part.as_bytes();
            (1..=63).contains(&bytes.len())
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        };
        match self {
            NameRule::Label => label(value),
            NameRule::ServiceName => label(value) && value.as_bytes()[0].is_ascii_lowercase(),
            NameRule::Subdomain => value.len() <= 253 && value.split('.').all(label),
            NameRule::LabelValue => {
                let bytes = value.as_bytes();
                bytes.len() <= 63
                    && (bytes.is_empty()
                        || (bytes[0].is_ascii_alphanumeric()
                            && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                            && (bytes.iter())
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))))
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            NameRule::Label => "DNS label (at most 63 lowercase alphanumerics or '-')",
            NameRule::ServiceName => {
                "Service name (a DNS label of at most 63 characters starting with a letter)"
            }
            NameRule::Subdomain => "DNS subdomain (at most 253 characters)",
            NameRule::LabelValue => "label value (at most 63 characters)",
        }
    }
}

/// A value for a message: a hostile one can be megabytes long.
fn shortened(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
        None => format!("{value:?}"),
    }
}

/// What the API server would refuse and the planner relies on.
pub fn validate_service(service: &Service) -> Result<(), String> {
    let mut reasons = Reasons::default();
    reasons.metadata(&service.metadata, NameRule::ServiceName);
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
        reasons.ip_families(spec);
        for (index, external_ip) in spec.external_ips.iter().flatten().enumerate() {
            reasons.ip(&format!("spec.externalIPs[{index}]"), external_ip);
        }
        let mut port_names = Vec::new();
        let mut port_numbers = HashSet::new();
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
                format!("{field}.name {} is used by another port", shortened(name))
            });
            port_names.push(name);
            let protocol = port.protocol.as_deref().unwrap_or("TCP");
            reasons.check(port_numbers.insert((port.port, protocol)), || {
                format!("{field}: port {} {protocol} is given twice", port.port)
            });
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
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    let mut reasons = Reasons::default();
    reasons.metadata(&slice.metadata, NameRule::Subdomain);
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|name| !name.is_empty());
    match service_name {
        Some(name) => reasons.name(
            &format!("label {SERVICE_NAME_LABEL}"),
            name,
            NameRule::LabelValue,
        ),
        None => reasons.add(format!(
            "label {SERVICE_NAME_LABEL} is missing (it names the slice's Service)"
        )),
    }
    let address_type = slice.address_type.as_str();
    reasons.one_of("addressType", Some(address_type), &["IPv4", "IPv6", "FQDN"]);
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    reasons.check(endpoints.len() <= MAX_SLICE_ENDPOINTS, || {
        format!(
            "endpoints: {} of them, more than the {MAX_SLICE_ENDPOINTS} an EndpointSlice may hold",
            endpoints.len()
        )
    });
    let ports = slice.ports.as_deref().unwrap_or_default();
    reasons.check(ports.len() <= MAX_SLICE_PORTS, || {
        format!(
            "ports: {} of them, more than the {MAX_SLICE_PORTS} an EndpointSlice may hold",
            ports.len()
        )
    });
    for (index, endpoint) in endpoints.iter().enumerate() {
        // Named only when reported: a large file checks millions of addresses.
        let field = || format!("endpoints[{index}].addresses");
        reasons.check(!endpoint.addresses.is_empty(), || {
            format!("{} is empty", field())
        });
        reasons.check(endpoint.addresses.len() <= MAX_ENDPOINT_ADDRESSES, || {
            format!("{}: more than {MAX_ENDPOINT_ADDRESSES} addresses", field())
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
                format!(
                    "{}: {} is not an {address_type} address",
                    field(),
                    shortened(addr)
                )
            });
        }
    }
    for (index, port) in ports.iter().enumerate() {
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

    /// The API server's dual-stack rules: families named once, at most two; clusterIPs one
    /// per family, the first equal to clusterIP, each of the family its index names.
    #[test]
    fn dual_stack_fields_follow_the_api_servers_rules() {
        let service = |spec: serde_json::Value| -> Service {
            let mut spec_value = json!({"ports": [{"port": 80}]});
            spec_value
                .as_object_mut()
                .unwrap()
                .extend(spec.as_object().unwrap().clone());
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": spec_value,
            }))
            .unwrap()
        };
        // (spec fields, the error's first reason or None when valid)
        let cases = [
            (
                json!({"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "2001:db8::10"],
                       "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
                None,
            ),
            (
                json!({"clusterIP": "2001:db8::10", "clusterIPs": ["2001:db8::10", "198.19.0.10"],
                       "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"}),
                None,
            ),
            (
                json!({"clusterIP": "2001:db8::10", "clusterIPs": ["2001:db8::10"],
                       "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack"}),
                None,
            ),
            (
                json!({"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "198.19.0.11"]}),
                Some("spec.clusterIPs holds two addresses of one family"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "2001:db8::10"],
                       "ipFamilies": ["IPv6", "IPv4"]}),
                Some("spec.clusterIPs[0] is not of family IPv6"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "clusterIPs": ["2001:db8::10", "198.19.0.10"]}),
                Some("spec.clusterIPs[0] must equal spec.clusterIP"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "ipFamilies": ["IPv4", "IPv4"]}),
                Some("spec.ipFamilies[1] \"IPv4\" is listed twice"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "ipFamilies": ["IPv5"]}),
                Some("spec.ipFamilies[0] \"IPv5\" is invalid"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "ipFamilies": ["IPv4", "IPv6"],
                       "ipFamilyPolicy": "SingleStack"}),
                Some("spec.ipFamilyPolicy SingleStack allows one entry"),
            ),
            (
                json!({"clusterIP": "198.19.0.10", "ipFamilyPolicy": "DualStack"}),
                Some("spec.ipFamilyPolicy \"DualStack\" is invalid"),
            ),
        ];
        for (spec, expected) in cases {
            let name = spec.to_string();
            match (validate_service(&service(spec)), expected) {
                (Ok(()), None) => {}
                (Err(error), Some(reason)) => {
                    assert!(error.starts_with(reason), "{name}: {error}")
                }
                (result, expected) => panic!("{name}: {result:?}, expected {expected:?}"),
            }
        }
    }
}
