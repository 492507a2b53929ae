//! Ordinary Kubernetes YAML for the daemon's manifests directory: a v1 Service and the
//! discovery.k8s.io/v1 EndpointSlice (labelled `kubernetes.io/service-name`) that the
//! EndpointSlice controller would have written for it. Options the lab's default Services
//! do not use (affinity, traffic policies, external and load-balancer IPs, endpoints on
//! other nodes or terminating) add their YAML only when set.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

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
    cluster_ip: Ipv4Addr,
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
    external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`.
    load_balancer_ips: Vec<Ipv4Addr>,
    /// `metadata.annotations`, as written.
    annotations: Vec<(String, String)>,
}

/// One endpoint of a Service's EndpointSlice: a pod, the node it runs on and its
/// conditions. [`Endpoint::of`] is what the controller writes for a ready pod on the lab's
/// node.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pod_name: String,
    ip: Ipv4Addr,
    node_name: String,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones`, as the EndpointSlice controller writes them for PreferClose.
    zone_hint: Option<String>,
}

impl Endpoint {
    /// `pod` ready, on the lab's node ([`NODE_NAME`]).
    pub fn of(pod: &Pod) -> Self {
        Self::at(&pod.name, pod.ip)
    }

    /// A ready pod named `pod_name` at `ip` on the lab's node, which need not exist (the
    /// TestRun fuzzer's Services point at addresses only).
    pub fn at(pod_name: &str, ip: Ipv4Addr) -> Self {
        Self {
            pod_name: pod_name.to_owned(),
            ip,
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
    /// A `type: ClusterIP` Service.
    pub fn cluster_ip(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ip,
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
    pub fn node_port(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            service_type: ServiceType::NodePort,
            ..Self::cluster_ip(name, cluster_ip)
        }
    }

    /// A `type: LoadBalancer` Service whose load balancer has given it `ingress_ip`
    /// (`status.loadBalancer.ingress`). Its ports get node ports only where given.
    pub fn load_balancer(name: &str, cluster_ip: Ipv4Addr, ingress_ip: Ipv4Addr) -> Self {
        Self {
            service_type: ServiceType::LoadBalancer,
            load_balancer_ips: vec![ingress_ip],
            ..Self::cluster_ip(name, cluster_ip)
        }
    }

    /// Adds another `status.loadBalancer.ingress` IP (a LoadBalancer Service's first one
    /// is given to [`Service::load_balancer`]).
    pub fn ingress_ip(mut self, ip: Ipv4Addr) -> Self {
        self.load_balancer_ips.push(ip);
        self
    }

    /// Adds `spec.externalIPs` entry `ip`.
    pub fn external_ip(mut self, ip: Ipv4Addr) -> Self {
        self.external_ips.push(ip);
        self
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

    /// `spec.clusterIP`.
    pub fn address(&self) -> Ipv4Addr {
        self.cluster_ip
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

    /// The Service and its EndpointSlice with `backends` as ready endpoints (none: an
    /// EndpointSlice without endpoints, as for a Service whose selector matches no pod),
    /// in one multi-document file `<name>.yaml`.
    pub fn manifest<'a>(&self, backends: impl IntoIterator<Item = &'a Pod>) -> Manifest {
        let endpoints: Vec<Endpoint> = backends.into_iter().map(Endpoint::of).collect();
        self.manifest_with(&endpoints)
    }

    /// [`Service::manifest`] with each endpoint's node and conditions spelled out.
    pub fn manifest_with(&self, endpoints: &[Endpoint]) -> Manifest {
        let mut yaml = self.service_yaml();
        yaml.push_str("---\n");
        yaml.push_str(&self.endpoint_slice_yaml(endpoints));
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
            "spec:\n  type: {kind}\n  clusterIP: {ip}\n  clusterIPs:\n    - {ip}\n\
             \x20 selector:\n    app: {name}\n",
            name = self.name,
            ip = self.cluster_ip,
        );
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
                let _ = writeln!(yaml, "    - {ip}");
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
                let _ = writeln!(yaml, "      - ip: {ip}");
            }
        }
        yaml
    }

    fn endpoint_slice_yaml(&self, endpoints: &[Endpoint]) -> String {
        let mut yaml = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
             \x20 name: {name}-lab\n  namespace: default\n  labels:\n\
             \x20   kubernetes.io/service-name: {name}\n\
             \x20   endpointslice.kubernetes.io/managed-by: proxy-lab\n\
             addressType: IPv4\nports:\n",
            name = self.name
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
                ip = endpoint.ip,
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

#[cfg(test)]
mod tests {
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
                ip: *ip,
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
    fn endpoints_carry_their_node_and_conditions() {
        let endpoint = Endpoint {
            pod_name: "pod-1".to_owned(),
            ip: addr::pod_ip(1),
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
