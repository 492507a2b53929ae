//! Ordinary Kubernetes YAML for the daemon's manifests directory: a v1 Service and the
//! discovery.k8s.io/v1 EndpointSlice (labelled `kubernetes.io/service-name`) that the
//! EndpointSlice controller would have written for it. Options the lab's default Services
//! do not use (affinity, traffic policies, external and load-balancer IPs, endpoints on
//! other nodes or terminating, IPv6) add their YAML only when set.
//!
//! A Service has the family of its cluster IP, or both ([`Service::dual_stack`]); it gets
//! one EndpointSlice per family (`addressType: IPv4` named `<name>-lab`, `addressType:
//! IPv6` named `<name>-lab-v6`), each with its pods' addresses of that family.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::lab::{NODE_NAME, Pod};

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }

    fn kubernetes_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    fn lowercase(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Debug)]
struct ServicePort {
    protocol: Protocol,
    port: u16,
    target_port: u16,
    node_port: Option<u16>,
}

impl ServicePort {
    /// Ports are matched to EndpointSlice ports by name, as kube-proxy does.
    fn name(&self) -> String {
        format!("{}-{}", self.protocol.lowercase(), self.port)
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// A Service in namespace `default`, built up port by port.
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    /// `spec.clusterIPs`: one, or one per family (the first is `spec.clusterIP`).
    cluster_ips: Vec<IpAddr>,
    service_type: ServiceType,
    ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP` with this `timeoutSeconds`.
    affinity_timeout_seconds: Option<u32>,
    internal_traffic_policy_local: bool,
    external_traffic_policy_local: bool,
    /// `healthCheckNodePort` (with externalTrafficPolicy Local).
    health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges`, as written.
    source_ranges: Vec<String>,
    external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    load_balancer_ips: Vec<IpAddr>,
    /// `metadata.annotations`, as written.
    annotations: Vec<(String, String)>,
}

/// One endpoint of a Service's EndpointSlice: a pod, the node it runs on and its
/// conditions. [`Endpoint::of`] is what the controller writes for a ready pod on the lab's
/// node.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pod_name: String,
    ip: IpAddr,
    node_name: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones`, as the EndpointSlice controller writes them for PreferClose.
    zone_hint: Option<String>,
}

impl Endpoint {
    /// `pod` ready, on the lab's node ([`NODE_NAME`]), by its IPv4 address.
    pub fn of(pod: &Pod) -> Self {
        Self::at(&pod.name, pod.ip)
    }

    /// `pod` ready, on the lab's node, by its IPv6 address (an `addressType: IPv6` slice's
    /// endpoint).
    pub fn of_v6(pod: &Pod) -> Self {
        Self::at(&pod.name, pod.ipv6)
    }

    /// A ready pod named `pod_name` at `ip` on the lab's node, which need not exist (the
    /// TestRun fuzzer's Services point at addresses only).
    pub fn at(pod_name: &str, ip: impl Into<IpAddr>) -> Self {
        Self {
            pod_name: pod_name.to_owned(),
            ip: ip.into(),
            node_name: NODE_NAME.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
            zone_hint: None,
        }
    }

    /// Hinted for `zone` (`hints.forZones`): nodes of that zone prefer it.
    pub fn for_zone(mut self, zone: &str) -> Self {
        self.zone_hint = Some(zone.to_owned());
        self
    }

    /// On another node of the cluster: traffic policy `Local` leaves it out. (The pod
    /// still lives in the lab, so the other policies reach it.)
    pub fn on_node(mut self, node_name: &str) -> Self {
        self.node_name = node_name.to_owned();
        self
    }

    /// Shutting down but still serving (ready false, serving true, terminating true), as
    /// during a pod's grace period.
    pub fn terminating(mut self) -> Self {
        self.ready = false;
        self.serving = true;
        self.terminating = true;
        self
    }
}

/// One file for the daemon's manifests directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub file_name: String,
    pub yaml: String,
}

impl Manifest {
    /// Its objects as the API server serves them (JSON), for the test API server.
    pub fn objects(&self) -> Vec<serde_json::Value> {
        serde_norway::Deserializer::from_str(&self.yaml)
            .map(|document| {
                serde::Deserialize::deserialize(document)
                    .unwrap_or_else(|error| panic!("{}: {error}", self.file_name))
            })
            .collect()
    }
}

impl Service {
    /// A `type: ClusterIP` Service of `cluster_ip`'s family.
    pub fn cluster_ip(name: &str, cluster_ip: impl Into<IpAddr>) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ips: vec![cluster_ip.into()],
            service_type: ServiceType::ClusterIp,
            ports: Vec::new(),
            affinity_timeout_seconds: None,
            internal_traffic_policy_local: false,
            external_traffic_policy_local: false,
            health_check_node_port: None,
            source_ranges: Vec::new(),
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// A `type: NodePort` Service; give its ports with [`Service::tcp_node_port`] and
    /// [`Service::udp_node_port`].
    pub fn node_port(name: &str, cluster_ip: impl Into<IpAddr>) -> Self {
        Self {
            service_type: ServiceType::NodePort,
            ..Self::cluster_ip(name, cluster_ip)
        }
    }

    /// A `type: LoadBalancer` Service whose load balancer has given it `ingress_ip`
    /// (`status.loadBalancer.ingress`). Its ports get node ports only where given.
    pub fn load_balancer(
        name: &str,
        cluster_ip: impl Into<IpAddr>,
        ingress_ip: impl Into<IpAddr>,
    ) -> Self {
        Self {
            service_type: ServiceType::LoadBalancer,
            load_balancer_ips: vec![ingress_ip.into()],
            ..Self::cluster_ip(name, cluster_ip)
        }
    }

    /// Adds another `status.loadBalancer.ingress` IP (a LoadBalancer Service's first one
    /// is given to [`Service::load_balancer`]).
    pub fn ingress_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.load_balancer_ips.push(ip.into());
        self
    }

    /// Adds `spec.externalIPs` entry `ip`.
    pub fn external_ip(mut self, ip: impl Into<IpAddr>) -> Self {
        self.external_ips.push(ip.into());
        self
    }

    /// Makes the Service dual-stack (`ipFamilyPolicy: RequireDualStack`): `cluster_ip`, of
    /// the other family, is its second cluster IP, and its endpoints get a slice per
    /// family.
    pub fn dual_stack(mut self, cluster_ip: impl Into<IpAddr>) -> Self {
        let cluster_ip = cluster_ip.into();
        assert_ne!(
            cluster_ip.is_ipv6(),
            self.cluster_ips[0].is_ipv6(),
            "a dual-stack Service's second cluster IP is of the other family"
        );
        self.cluster_ips.truncate(1);
        self.cluster_ips.push(cluster_ip);
        self
    }

    /// The Service's families, primary first: whether each is IPv6.
    fn families(&self) -> impl Iterator<Item = bool> + '_ {
        self.cluster_ips.iter().map(IpAddr::is_ipv6)
    }

    /// The annotation `key: value` (quoted in the YAML).
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.push((key.to_owned(), value.to_owned()));
        self
    }

    /// `sessionAffinity: ClientIP` with `timeoutSeconds`.
    pub fn client_ip_affinity(mut self, timeout_seconds: u32) -> Self {
        self.affinity_timeout_seconds = Some(timeout_seconds);
        self
    }

    /// `internalTrafficPolicy: Local`: ClusterIP traffic only to this node's endpoints.
    pub fn internal_traffic_policy_local(mut self) -> Self {
        self.internal_traffic_policy_local = true;
        self
    }

    /// `externalTrafficPolicy: Local`: NodePort, external and load-balancer IP traffic only
    /// to this node's endpoints.
    pub fn external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy_local = true;
        self
    }

    /// `loadBalancerSourceRanges`: only clients in these CIDRs reach the load-balancer IPs.
    pub fn load_balancer_source_ranges(mut self, cidrs: &[&str]) -> Self {
        self.source_ranges = cidrs.iter().map(ToString::to_string).collect();
        self
    }

    /// `healthCheckNodePort: port`, what the API allocates for a LoadBalancer Service with
    /// externalTrafficPolicy Local.
    pub fn health_check_node_port(mut self, port: u16) -> Self {
        self.health_check_node_port = Some(port);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `spec.clusterIP` (the primary family's).
    pub fn address(&self) -> IpAddr {
        self.cluster_ips[0]
    }

    /// Each port: protocol, port, the pods' target port and the node port, if any.
    pub fn ports(&self) -> impl Iterator<Item = (Protocol, u16, u16, Option<u16>)> + '_ {
        (self.ports.iter()).map(|port| (port.protocol, port.port, port.target_port, port.node_port))
    }

    /// Adds a TCP port `port` → pods' `target_port`.
    pub fn tcp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Tcp, port, target_port, None)
    }

    /// Adds a UDP port `port` → pods' `target_port`.
    pub fn udp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Udp, port, target_port, None)
    }

    /// Adds an SCTP port `port` → pods' `target_port`.
    pub fn sctp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Sctp, port, target_port, None)
    }

    /// Adds an SCTP port that is also open on every node address at `node_port`.
    pub fn sctp_node_port(self, port: u16, target_port: u16, node_port: u16) -> Self {
        self.port(Protocol::Sctp, port, target_port, Some(node_port))
    }

    /// Adds a TCP port that is also open on every node address at `node_port`.
    pub fn tcp_node_port(self, port: u16, target_port: u16, node_port: u16) -> Self {
        self.port(Protocol::Tcp, port, target_port, Some(node_port))
    }

    /// Adds a UDP port that is also open on every node address at `node_port`.
    pub fn udp_node_port(self, port: u16, target_port: u16, node_port: u16) -> Self {
        self.port(Protocol::Udp, port, target_port, Some(node_port))
    }

    fn port(mut self, protocol: Protocol, port: u16, target: u16, node: Option<u16>) -> Self {
        self.ports.push(ServicePort {
            protocol,
            port,
            target_port: target,
            node_port: node,
        });
        self
    }

    /// The Service and its EndpointSlice (one per family) with `backends` as ready
    /// endpoints (none: an EndpointSlice without endpoints, as for a Service whose selector
    /// matches no pod), in one multi-document file `<name>.yaml`.
    pub fn manifest<'a>(&self, backends: impl IntoIterator<Item = &'a Pod>) -> Manifest {
        let backends: Vec<&Pod> = backends.into_iter().collect();
        let endpoints: Vec<Endpoint> = self
            .families()
            .flat_map(|ipv6| {
                (backends.iter()).map(move |pod| {
                    if ipv6 {
                        Endpoint::of_v6(pod)
                    } else {
                        Endpoint::of(pod)
                    }
                })
            })
            .collect();
        self.manifest_with(&endpoints)
    }

    /// [`Service::manifest`] with each endpoint's node and conditions spelled out: a slice
    /// for each of the Service's families and each family among `endpoints`.
    pub fn manifest_with(&self, endpoints: &[Endpoint]) -> Manifest {
        let mut yaml = self.service_yaml();
        for ipv6 in [false, true] {
            let of_family: Vec<Endpoint> = (endpoints.iter())
                .filter(|endpoint| endpoint.ip.is_ipv6() == ipv6)
                .cloned()
                .collect();
            if of_family.is_empty() && !self.families().any(|family| family == ipv6) {
                continue;
            }
            yaml.push_str("---\n");
            yaml.push_str(&self.endpoint_slice_yaml(ipv6, &of_family));
        }
        Manifest {
            file_name: format!("{}.yaml", self.name),
            yaml,
        }
    }

    fn service_yaml(&self) -> String {
        let kind = match self.service_type {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        };
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n",
            name = self.name,
        );
        if !self.annotations.is_empty() {
            yaml.push_str("  annotations:\n");
            for (key, value) in &self.annotations {
                let _ = writeln!(yaml, "    {key}: {value:?}");
            }
        }
        let _ = write!(
            yaml,
            "spec:\n  type: {kind}\n  clusterIP: {ip}\n  clusterIPs:\n",
            ip = yaml_ip(self.cluster_ips[0]),
        );
        for ip in &self.cluster_ips {
            let _ = writeln!(yaml, "    - {}", yaml_ip(*ip));
        }
        // An IPv4 single-stack Service leaves the families to their defaults, as the
        // examples in deploy/examples/ do.
        if self.cluster_ips.len() > 1 || self.cluster_ips[0].is_ipv6() {
            yaml.push_str("  ipFamilies:\n");
            for ipv6 in self.families() {
                let _ = writeln!(yaml, "    - {}", family_name(ipv6));
            }
            let policy = if self.cluster_ips.len() > 1 {
                "RequireDualStack"
            } else {
                "SingleStack"
            };
            let _ = writeln!(yaml, "  ipFamilyPolicy: {policy}");
        }
        let _ = write!(yaml, "  selector:\n    app: {name}\n", name = self.name);
        if let Some(seconds) = self.affinity_timeout_seconds {
            let _ = write!(
                yaml,
                "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n\
                 \x20     timeoutSeconds: {seconds}\n"
            );
        }
        if self.internal_traffic_policy_local {
            yaml.push_str("  internalTrafficPolicy: Local\n");
        }
        if self.external_traffic_policy_local {
            yaml.push_str("  externalTrafficPolicy: Local\n");
        }
        if let Some(port) = self.health_check_node_port {
            let _ = writeln!(yaml, "  healthCheckNodePort: {port}");
        }
        if !self.source_ranges.is_empty() {
            yaml.push_str("  loadBalancerSourceRanges:\n");
            for cidr in &self.source_ranges {
                let _ = writeln!(yaml, "    - {cidr}");
            }
        }
        if !self.external_ips.is_empty() {
            yaml.push_str("  externalIPs:\n");
            for ip in &self.external_ips {
                let _ = writeln!(yaml, "    - {}", yaml_ip(*ip));
            }
        }
        yaml.push_str("  ports:\n");
        for port in &self.ports {
            let _ = write!(
                yaml,
                "    - name: {}\n      protocol: {}\n      port: {}\n      targetPort: {}\n",
                port.name(),
                port.protocol.kubernetes_name(),
                port.port,
                port.target_port
            );
            if let Some(node_port) = port.node_port {
                let _ = writeln!(yaml, "      nodePort: {node_port}");
            }
        }
        if !self.load_balancer_ips.is_empty() {
            yaml.push_str("status:\n  loadBalancer:\n    ingress:\n");
            for ip in &self.load_balancer_ips {
                let _ = writeln!(yaml, "      - ip: {}", yaml_ip(*ip));
            }
        }
        yaml
    }

    /// The EndpointSlice of one family (`ipv6`) with `endpoints`, all of that family.
    fn endpoint_slice_yaml(&self, ipv6: bool, endpoints: &[Endpoint]) -> String {
        let mut yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
             \x20 name: {name}-lab{suffix}\n  namespace: default\n  labels:\n\
             \x20   kubernetes.io/service-name: {name}\n\
             \x20   endpointslice.kubernetes.io/managed-by: proxy-lab\n\
             addressType: {family}\nports:\n",
            name = self.name,
            suffix = if ipv6 { "-v6" } else { "" },
            family = family_name(ipv6),
        );
        for port in &self.ports {
            let _ = write!(
                yaml,
                "  - name: {}\n    protocol: {}\n    port: {}\n",
                port.name(),
                port.protocol.kubernetes_name(),
                port.target_port
            );
        }
        if endpoints.is_empty() {
            yaml.push_str("endpoints: []\n");
            return yaml;
        }
        yaml.push_str("endpoints:\n");
        for endpoint in endpoints {
            let _ = write!(
                yaml,
                "  - addresses:\n      - {ip}\n    conditions:\n      ready: {ready}\n\
                 \x20     serving: {serving}\n      terminating: {terminating}\n\
                 \x20   nodeName: {node}\n    targetRef:\n      kind: Pod\n\
                 \x20     namespace: default\n      name: {pod}\n",
                ip = yaml_ip(endpoint.ip),
                ready = endpoint.ready,
                serving = endpoint.serving,
                terminating = endpoint.terminating,
                node = endpoint.node_name,
                pod = endpoint.pod_name,
            );
            if let Some(zone) = &endpoint.zone_hint {
                let _ = writeln!(yaml, "    hints:\n      forZones:\n        - name: {zone}");
            }
        }
        yaml
    }
}

/// `IPv4` or `IPv6`, as `ipFamilies` and `addressType` spell them.
fn family_name(ipv6: bool) -> &'static str {
    if ipv6 { "IPv6" } else { "IPv4" }
}

/// `ip` as a YAML scalar: IPv6 addresses quoted (colons), IPv4 ones plain.
fn yaml_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("\"{ip}\""),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::addr;

    /// The lab's three example backends, as in deploy/examples/.
    fn lab_backends() -> Vec<(String, Ipv4Addr)> {
        (1..=3)
            .map(|i| (format!("pod-{i}"), addr::pod_ip(i)))
            .collect()
    }

    fn render(service: &Service, backends: &[(String, Ipv4Addr)]) -> String {
        let endpoints: Vec<Endpoint> = backends
            .iter()
            .map(|(name, ip)| Endpoint {
                pod_name: name.clone(),
                ip: IpAddr::V4(*ip),
                node_name: NODE_NAME.to_owned(),
                ready: true,
                serving: true,
                terminating: false,
                zone_hint: None,
            })
            .collect();
        service.manifest_with(&endpoints).yaml
    }

    /// An example file without its comment lines.
    fn example(file_name: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/");
        let text = std::fs::read_to_string(format!("{path}{file_name}")).expect("example file");
        text.lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    #[test]
    fn cluster_ip_example_matches_the_lab() {
        let echo = Service::cluster_ip("echo", addr::CLUSTER_IP)
            .tcp(80, addr::ECHO_TCP_PORT)
            .udp(53, addr::ECHO_UDP_PORT);
        assert_eq!(
            example("echo-clusterip.yaml"),
            render(&echo, &lab_backends())
        );
    }

    #[test]
    fn node_port_example_matches_the_lab() {
        let echo = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
            .tcp_node_port(80, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
            .udp_node_port(53, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
        assert_eq!(
            example("echo-nodeport.yaml"),
            render(&echo, &lab_backends())
        );
    }

    #[test]
    fn service_without_backends_gets_an_empty_slice() {
        let empty = Service::cluster_ip("empty", addr::CLUSTER_IP).tcp(80, 8080);
        let yaml = render(&empty, &[]);
        assert!(yaml.ends_with("endpoints: []\n"), "{yaml}");
        assert!(
            yaml.contains("kubernetes.io/service-name: empty\n"),
            "{yaml}"
        );
    }

    #[test]
    fn options_render_as_the_api_spells_them() {
        let service = Service::load_balancer("lb", addr::CLUSTER_IP, addr::LOAD_BALANCER_IP)
            .tcp(80, addr::ECHO_TCP_PORT)
            .external_ip(addr::EXTERNAL_IP)
            .client_ip_affinity(2)
            .internal_traffic_policy_local()
            .external_traffic_policy_local();
        let yaml = render(&service, &[]);
        for expected in [
            "  type: LoadBalancer\n",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
             timeoutSeconds: 2\n",
            "  internalTrafficPolicy: Local\n  externalTrafficPolicy: Local\n",
            "  externalIPs:\n    - 198.18.9.1\n",
            "status:\n  loadBalancer:\n    ingress:\n      - ip: 198.18.8.1\n---\n",
        ] {
            assert!(yaml.contains(expected), "{expected:?} missing from\n{yaml}");
        }
    }

    #[test]
    fn manifests_read_back_as_api_objects() {
        let echo = Service::cluster_ip("echo", addr::CLUSTER_IP).tcp(80, addr::ECHO_TCP_PORT);
        let objects = Manifest {
            file_name: "echo.yaml".to_owned(),
            yaml: render(&echo, &lab_backends()),
        }
        .objects();
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["Service", "EndpointSlice"]);
        assert_eq!(objects[0]["spec"]["ports"][0]["port"], 80);
        assert_eq!(objects[1]["endpoints"][2]["addresses"][0], "198.18.1.13");
    }

    #[test]
    fn dual_stack_and_ipv6_services_get_a_slice_per_family() {
        let endpoints = [
            Endpoint::at("pod-1", addr::pod_ip(1)),
            Endpoint::at("pod-1", addr::pod_ipv6(1)),
        ];
        let dual = Service::cluster_ip("dual", addr::CLUSTER_IP)
            .dual_stack(addr::CLUSTER_IPV6)
            .tcp(80, addr::ECHO_TCP_PORT)
            .manifest_with(&endpoints);
        let objects = dual.objects();
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(kinds, ["Service", "EndpointSlice", "EndpointSlice"]);
        let spec = &objects[0]["spec"];
        assert_eq!(spec["clusterIPs"][1], "2001:db8:ff::10");
        assert_eq!(spec["ipFamilies"], serde_json::json!(["IPv4", "IPv6"]));
        assert_eq!(spec["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(objects[1]["addressType"], "IPv4");
        assert_eq!(objects[1]["endpoints"][0]["addresses"][0], "198.18.1.11");
        assert_eq!(objects[2]["addressType"], "IPv6");
        assert_eq!(objects[2]["metadata"]["name"], "dual-lab-v6");
        assert_eq!(objects[2]["endpoints"][0]["addresses"][0], "2001:db8:1::11");

        let ipv6 = Service::cluster_ip("six", addr::CLUSTER_IPV6)
            .udp(53, addr::ECHO_UDP_PORT)
            .manifest_with(&[]);
        let objects = ipv6.objects();
        assert_eq!(objects.len(), 2, "{}", ipv6.yaml);
        assert_eq!(
            objects[0]["spec"]["ipFamilies"],
            serde_json::json!(["IPv6"])
        );
        assert_eq!(objects[0]["spec"]["ipFamilyPolicy"], "SingleStack");
        assert_eq!(objects[1]["addressType"], "IPv6");
        assert!(ipv6.yaml.ends_with("endpoints: []\n"), "{}", ipv6.yaml);
    }

    #[test]
    fn endpoints_carry_their_node_and_conditions() {
        let endpoint = Endpoint {
            pod_name: "pod-1".to_owned(),
            ip: addr::pod_ip(1).into(),
            node_name: NODE_NAME.to_owned(),
            ready: true,
            serving: true,
            terminating: false,
            zone_hint: None,
        };
        let service = Service::cluster_ip("echo", addr::CLUSTER_IP).tcp(80, 8080);
        let yaml = service
            .manifest_with(&[endpoint
                .on_node("other-node")
                .terminating()
                .for_zone("zone-b")])
            .yaml;
        assert!(
            yaml.contains(
                "    conditions:\n      ready: false\n      serving: true\n      \
                 terminating: true\n    nodeName: other-node\n"
            ),
            "{yaml}"
        );
        assert!(
            yaml.ends_with("    hints:\n      forZones:\n        - name: zone-b\n"),
            "{yaml}"
        );
    }
}
