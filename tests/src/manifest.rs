//! Ordinary Kubernetes YAML for the daemon's manifests directory: a v1 Service and the
//! discovery.k8s.io/v1 EndpointSlice (labelled `kubernetes.io/service-name`) that the
//! EndpointSlice controller would have written for it.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::lab::{NODE_NAME, Pod};

/// Transport protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn kubernetes_name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }

    fn lowercase(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
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

/// A Service in namespace `default`, built up port by port.
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    cluster_ip: Ipv4Addr,
    node_port_type: bool,
    ports: Vec<ServicePort>,
}

/// One file for the daemon's manifests directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub file_name: String,
    pub yaml: String,
}

impl Service {
    /// A `type: ClusterIP` Service.
    pub fn cluster_ip(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ip,
            node_port_type: false,
            ports: Vec::new(),
        }
    }

    /// A `type: NodePort` Service; give its ports with [`Service::tcp_node_port`] and
    /// [`Service::udp_node_port`].
    pub fn node_port(name: &str, cluster_ip: Ipv4Addr) -> Self {
        Self {
            node_port_type: true,
            ..Self::cluster_ip(name, cluster_ip)
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a TCP port `port` → pods' `target_port`.
    pub fn tcp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Tcp, port, target_port, None)
    }

    /// Adds a UDP port `port` → pods' `target_port`.
    pub fn udp(self, port: u16, target_port: u16) -> Self {
        self.port(Protocol::Udp, port, target_port, None)
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
        let endpoints: Vec<(&str, Ipv4Addr)> = backends
            .into_iter()
            .map(|pod| (pod.name.as_str(), pod.ip))
            .collect();
        self.manifest_for(&endpoints)
    }

    /// [`Service::manifest`] for endpoints given as (pod name, address).
    fn manifest_for(&self, endpoints: &[(&str, Ipv4Addr)]) -> Manifest {
        let mut yaml = self.service_yaml();
        yaml.push_str("---\n");
        yaml.push_str(&self.endpoint_slice_yaml(endpoints));
        Manifest {
            file_name: format!("{}.yaml", self.name),
            yaml,
        }
    }

    fn service_yaml(&self) -> String {
        let kind = if self.node_port_type {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let mut yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
             spec:\n  type: {kind}\n  clusterIP: {ip}\n  clusterIPs:\n    - {ip}\n\
             \x20 selector:\n    app: {name}\n  ports:\n",
            name = self.name,
            ip = self.cluster_ip,
        );
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
        yaml
    }

    fn endpoint_slice_yaml(&self, endpoints: &[(&str, Ipv4Addr)]) -> String {
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
        for (pod, ip) in endpoints {
            let _ = write!(
                yaml,
                "  - addresses:\n      - {ip}\n    conditions:\n      ready: true\n\
                 \x20     serving: true\n      terminating: false\n    nodeName: {NODE_NAME}\n\
                 \x20   targetRef:\n      kind: Pod\n      namespace: default\n      name: {pod}\n",
            );
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
        let endpoints: Vec<(&str, Ipv4Addr)> = backends
            .iter()
            .map(|(name, ip)| (name.as_str(), *ip))
            .collect();
        service.manifest_for(&endpoints).yaml
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
}
