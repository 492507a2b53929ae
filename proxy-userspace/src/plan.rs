//! Plan: a pure function from the model and the node's facts to the desired datapath
//! contents, expressed in Kubernetes terms (frontends and their backends). The map writer
//! turns this into map entries; nothing here touches the kernel.
//!
//! The rules are kube-proxy's, so a cluster behaves the same with either proxy:
//! which Services are proxied (`ServiceChangeTracker`, `ShouldSkipService`, the informers'
//! label selector), which frontends a Service port gets (`newBaseServiceInfo`), how
//! EndpointSlices of a Service merge and resolve target ports (`EndpointSliceCache`), and
//! which endpoints are usable (`CategorizeEndpoints`: ready ones, else serving-and-terminating
//! ones; traffic policy `Local` keeps only this node's). Topology hints and
//! trafficDistribution are not implemented yet: every usable endpoint is used.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::debug;

use crate::model::{Model, ObjectKey};

/// What the planner needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub node_name: String,
    /// Every non-loopback IPv4 address of the node (read with rtnetlink).
    pub addresses: Vec<Ipv4Addr>,
    /// `--nodeport-addresses`: when non-empty, NodePorts open only on node addresses inside
    /// one of these CIDRs (kube-proxy's flag of the same name).
    pub nodeport_cidrs: Vec<Ipv4Net>,
}

impl NodeFacts {
    /// The addresses NodePorts open on: all node addresses, or those inside
    /// `nodeport_cidrs` when it is set. Sorted, without duplicates.
    pub fn node_port_addresses(&self) -> Vec<Ipv4Addr> {
        let mut addresses: Vec<Ipv4Addr> = self
            .addresses
            .iter()
            .copied()
            .filter(|addr| {
                self.nodeport_cidrs.is_empty()
                    || self.nodeport_cidrs.iter().any(|cidr| cidr.contains(addr))
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number, as stored in the maps.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::proto::TCP,
            Protocol::Udp => proxy_common::proto::UDP,
        }
    }

    /// Lowercase name, as kube-proxy uses it in chain hashes.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// An address the datapath answers for: `addr:port/proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol.as_str())
    }
}

/// How a frontend is reached (kube-proxy's KUBE-SERVICES vs KUBE-NODEPORTS, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// `namespace/name:portname`: the identity kube-proxy hashes into chain names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The Service port's name; empty for an unnamed single port.
    pub port_name: String,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// A backend: an endpoint address and the resolved target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted and deduplicated. Empty means the Service has no usable endpoints.
    pub backends: Vec<BackendAddr>,
}

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
}

/// The planner's output: what the datapath should do, and what it can't be asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub desired: DesiredState,
    /// One sentence each, ordered by Service, e.g.
    /// `default/foo port sctp-port: SCTP is not supported, skipped`.
    pub problems: Vec<String>,
}

/// Services (and their EndpointSlices) with this label belong to another proxy; kube-proxy's
/// informers filter them out.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Set on headless Services' EndpointSlices; kube-proxy's informers filter it out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Plans every frontend of every proxied Service. Services are visited in `namespace/name`
/// order, so when two claim the same frontend the first keeps it, the same on every run.
pub fn plan(model: &Model, node: &NodeFacts) -> Planned {
    let mut planner = Planner {
        node_name: &node.node_name,
        node_port_addresses: node.node_port_addresses(),
        planned: Planned::default(),
    };
    for (key, service) in model.services() {
        planner.add_service(key, service, model.endpoint_slices_of(key));
    }
    planner.planned
}

struct Planner<'a> {
    node_name: &'a str,
    node_port_addresses: Vec<Ipv4Addr>,
    planned: Planned,
}

/// Why a Service gets no frontends: an expected case, or one worth telling the operator.
enum NotProxied {
    Ignored(String),
    Problem(String),
}

/// What a Service's ports share.
struct ServiceFacts {
    cluster_ip: Ipv4Addr,
    exposes_node_ports: bool,
    external_ips: Vec<Ipv4Addr>,
    load_balancer_ips: Vec<Ipv4Addr>,
    internal_policy_local: bool,
    external_policy_local: bool,
    publish_not_ready_addresses: bool,
}

impl Planner<'_> {
    fn add_service<'s>(
        &mut self,
        key: &ObjectKey,
        service: &Service,
        slices: impl Iterator<Item = &'s EndpointSlice>,
    ) {
        let facts = match service_facts(service) {
            Ok(facts) => facts,
            Err(NotProxied::Ignored(reason)) => {
                debug!(service = %key, %reason, "service not proxied");
                return;
            }
            Err(NotProxied::Problem(reason)) => {
                self.planned.problems.push(format!("{key}: {reason}"));
                return;
            }
        };
        let slices: Vec<&EndpointSlice> = slices.filter(|slice| is_proxied_slice(slice)).collect();
        let ports = service.spec.as_ref().and_then(|spec| spec.ports.as_ref());
        for port in ports.into_iter().flatten() {
            self.add_service_port(key, &facts, port, &slices);
        }
    }

    fn add_service_port(
        &mut self,
        key: &ObjectKey,
        facts: &ServiceFacts,
        port: &ServicePort,
        slices: &[&EndpointSlice],
    ) {
        let port_name = port.name.clone().unwrap_or_default();
        let port_label = if port_name.is_empty() {
            port.port.to_string()
        } else {
            port_name.clone()
        };
        let context = format!("{key} port {port_label}");
        let protocol = match service_protocol(port.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(reason) => {
                self.planned
                    .problems
                    .push(format!("{context}: {reason}, skipped"));
                return;
            }
        };
        let Some(service_port) = port_number(port.port) else {
            self.planned.problems.push(format!(
                "{context}: port {} is out of range, skipped",
                port.port
            ));
            return;
        };

        let endpoints = endpoints_of_port(slices, &port_name, protocol);
        let local_node = |local: bool| local.then_some(self.node_name);
        let cluster_backends = usable_backends(
            &endpoints,
            local_node(facts.internal_policy_local),
            facts.publish_not_ready_addresses,
        );
        let external_backends = usable_backends(
            &endpoints,
            local_node(facts.external_policy_local),
            facts.publish_not_ready_addresses,
        );
        let service = ServicePortName {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            port_name,
        };
        let frontend = |addr| Frontend {
            addr,
            port: service_port,
            protocol,
        };

        self.planned.claim(
            frontend(facts.cluster_ip),
            &service,
            FrontendKind::ClusterIp,
            &cluster_backends,
        );
        let node_port = port
            .node_port
            .filter(|&node_port| node_port != 0 && facts.exposes_node_ports);
        if let Some(node_port) = node_port {
            match port_number(node_port) {
                Some(node_port) => {
                    for &addr in &self.node_port_addresses {
                        let frontend = Frontend {
                            addr,
                            port: node_port,
                            protocol,
                        };
                        self.planned.claim(
                            frontend,
                            &service,
                            FrontendKind::NodePort,
                            &external_backends,
                        );
                    }
                }
                None => self.planned.problems.push(format!(
                    "{context}: nodePort {node_port} is out of range, NodePort skipped"
                )),
            }
        }
        for &addr in &facts.external_ips {
            self.planned.claim(
                frontend(addr),
                &service,
                FrontendKind::ExternalIp,
                &external_backends,
            );
        }
        for &addr in &facts.load_balancer_ips {
            self.planned.claim(
                frontend(addr),
                &service,
                FrontendKind::LoadBalancer,
                &external_backends,
            );
        }
    }
}

impl Planned {
    /// Gives `frontend` to `service` unless another Service port has it already.
    fn claim(
        &mut self,
        frontend: Frontend,
        service: &ServicePortName,
        kind: FrontendKind,
        backends: &[BackendAddr],
    ) {
        match self.desired.frontends.entry(frontend) {
            Entry::Vacant(entry) => {
                entry.insert(FrontendPlan {
                    service: service.clone(),
                    kind,
                    backends: backends.to_vec(),
                });
            }
            // The same Service port naming an address twice (an externalIP that is also its
            // load balancer's) is redundant, not a conflict.
            Entry::Occupied(entry) if entry.get().service == *service => {}
            Entry::Occupied(entry) => {
                let owner = entry.get();
                self.problems.push(format!(
                    "{service}: {frontend} ({kind:?}) is already taken by {} ({:?}), skipped",
                    owner.service, owner.kind
                ));
            }
        }
    }
}

/// The Service's shared facts, or why it gets no frontends (kube-proxy's
/// `ShouldSkipService`, its informers' label selector, and `GetClusterIPByFamily`).
fn service_facts(service: &Service) -> Result<ServiceFacts, NotProxied> {
    for label in [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL] {
        if has_label(service.metadata.labels.as_ref(), label) {
            return Err(NotProxied::Ignored(format!("labelled {label}")));
        }
    }
    let spec: Cow<ServiceSpec> = service.spec.as_ref().map(Cow::Borrowed).unwrap_or_default();
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if service_type == "ExternalName" {
        return Err(NotProxied::Ignored("type ExternalName".to_owned()));
    }
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or_default();
    if cluster_ip == "None" {
        return Err(NotProxied::Ignored("headless".to_owned()));
    }
    if cluster_ip.is_empty() {
        return Err(NotProxied::Problem(
            "no clusterIP set, skipped (kube-proxy skips such Services too)".to_owned(),
        ));
    }
    // clusterIPs lists one address per family; clusterIP alone is the old form.
    let cluster_ips: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(cluster_ips) if !cluster_ips.is_empty() => {
            cluster_ips.iter().map(String::as_str).collect()
        }
        _ => vec![cluster_ip],
    };
    let cluster_ip = cluster_ips
        .into_iter()
        .find_map(parse_ipv4)
        .ok_or_else(|| NotProxied::Ignored("no IPv4 clusterIP".to_owned()))?;

    let load_balancer_ips = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref())
        .into_iter()
        .flatten()
        // Ingress in "Proxy" mode is reached through the load balancer, not by its IP.
        .filter(|ingress| ingress.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
        .filter_map(|ingress| ingress.ip.as_deref());
    Ok(ServiceFacts {
        cluster_ip,
        exposes_node_ports: matches!(service_type, "NodePort" | "LoadBalancer"),
        external_ips: ipv4_addresses(spec.external_ips.iter().flatten().map(String::as_str)),
        load_balancer_ips: ipv4_addresses(load_balancer_ips),
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_policy_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        publish_not_ready_addresses: spec.publish_not_ready_addresses == Some(true),
    })
}

/// The IPv4 addresses among `addresses`, sorted and deduplicated. IPv6 ones belong to the
/// other family (not proxied yet); unparsable ones never get past the sources' validation.
fn ipv4_addresses<'a>(addresses: impl Iterator<Item = &'a str>) -> Vec<Ipv4Addr> {
    let mut ipv4: Vec<Ipv4Addr> = addresses.filter_map(parse_ipv4).collect();
    ipv4.sort();
    ipv4.dedup();
    ipv4
}

fn parse_ipv4(addr: &str) -> Option<Ipv4Addr> {
    addr.parse().ok()
}

fn has_label(labels: Option<&BTreeMap<String, String>>, label: &str) -> bool {
    labels.is_some_and(|labels| labels.contains_key(label))
}

/// IPv4 slices not excluded by kube-proxy's label selector.
fn is_proxied_slice(slice: &EndpointSlice) -> bool {
    let labels = slice.metadata.labels.as_ref();
    slice.address_type == "IPv4"
        && !has_label(labels, SERVICE_PROXY_NAME_LABEL)
        && !has_label(labels, HEADLESS_LABEL)
}

/// A Service port's protocol (TCP when unset, as the API defaults it).
fn service_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("SCTP is not supported".to_owned()),
        other => Err(format!("protocol {other:?} is invalid")),
    }
}

fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}

/// One endpoint of a Service port, as its slice describes it.
struct PortEndpoint<'a> {
    backend: BackendAddr,
    node_name: Option<&'a str>,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// The endpoints of the Service port `port_name`/`protocol` across all its slices. Each
/// slice resolves the target port itself: its port with the same name and protocol. An
/// unset slice port name counts as "" (what the EndpointSlice controller writes for an
/// unnamed Service port), so hand-written slices for single-port Services need no name.
fn endpoints_of_port<'a>(
    slices: &[&'a EndpointSlice],
    port_name: &str,
    protocol: Protocol,
) -> Vec<PortEndpoint<'a>> {
    let mut endpoints = Vec::new();
    for slice in slices {
        let target_ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|port| port.name.as_deref().unwrap_or_default() == port_name)
            .filter(|port| service_protocol(port.protocol.as_deref()) == Ok(protocol))
            .filter_map(|port| port.port.and_then(port_number));
        for target_port in target_ports {
            for endpoint in slice.endpoints.iter().flatten() {
                // kube-proxy uses an endpoint's first address; the others are its aliases.
                let Some(addr) = endpoint.addresses.first().and_then(|addr| parse_ipv4(addr))
                else {
                    continue;
                };
                let conditions = endpoint.conditions.clone().unwrap_or_default();
                endpoints.push(PortEndpoint {
                    backend: BackendAddr {
                        addr,
                        port: target_port,
                    },
                    node_name: endpoint.node_name.as_deref(),
                    // Unset ready and serving mean true, unset terminating false (API docs).
                    ready: conditions.ready != Some(false),
                    serving: conditions.serving != Some(false),
                    terminating: conditions.terminating == Some(true),
                });
            }
        }
    }
    endpoints
}

/// kube-proxy's `CategorizeEndpoints` without topology: the ready endpoints, or when there
/// are none the serving-and-terminating ones; with a `local_node`, only endpoints on it
/// (an empty result makes the datapath drop, as kube-proxy does). `publishNotReadyAddresses`
/// makes every endpoint usable. Sorted and deduplicated.
fn usable_backends(
    endpoints: &[PortEndpoint<'_>],
    local_node: Option<&str>,
    publish_not_ready_addresses: bool,
) -> Vec<BackendAddr> {
    let eligible: Vec<&PortEndpoint<'_>> = endpoints
        .iter()
        .filter(|endpoint| {
            local_node.is_none_or(|node| !node.is_empty() && endpoint.node_name == Some(node))
        })
        .collect();
    let select = |usable: fn(&PortEndpoint<'_>) -> bool| -> Vec<BackendAddr> {
        eligible
            .iter()
            .filter(|endpoint| usable(endpoint))
            .map(|endpoint| endpoint.backend)
            .collect()
    };
    let mut backends = if publish_not_ready_addresses {
        select(|_| true)
    } else {
        let ready = select(|endpoint| endpoint.ready);
        if ready.is_empty() {
            select(|endpoint| endpoint.serving && endpoint.terminating)
        } else {
            ready
        }
    };
    backends.sort();
    backends.dedup();
    backends
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};
    use super::*;
    use crate::model::SERVICE_NAME_LABEL;

    fn metadata(key: &str) -> ObjectMeta {
        let (namespace, name) = key.split_once('/').expect("namespace/name");
        ObjectMeta {
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn add_label(metadata: &mut ObjectMeta, label: &str, value: &str) {
        metadata
            .labels
            .get_or_insert_default()
            .insert(label.to_owned(), value.to_owned());
    }

    /// `svc("web/front", "198.19.0.10").port("http", 80, "TCP")`, as the YAML would say.
    struct Svc(Service);

    fn svc(key: &str, cluster_ip: &str) -> Svc {
        Svc(Service {
            metadata: metadata(key),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.to_owned()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        })
    }

    impl Svc {
        fn spec(&mut self) -> &mut ServiceSpec {
            self.0.spec.get_or_insert_default()
        }

        fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
            self.spec().ports.get_or_insert_default().push(ServicePort {
                name: Some(name.to_owned()).filter(|name| !name.is_empty()),
                port,
                protocol: Some(protocol.to_owned()),
                ..ServicePort::default()
            });
            self
        }

        /// A TCP port with a nodePort.
        fn node_port(mut self, name: &str, port: i32, node_port: i32) -> Self {
            self = self.port(name, port, "TCP");
            let ports = self.spec().ports.as_mut().expect("just added");
            ports.last_mut().expect("just added").node_port = Some(node_port);
            self
        }

        fn service_type(mut self, service_type: &str) -> Self {
            self.spec().type_ = Some(service_type.to_owned());
            self
        }

        fn cluster_ips(mut self, cluster_ips: &[&str]) -> Self {
            self.spec().cluster_ips = Some(cluster_ips.iter().map(|ip| ip.to_string()).collect());
            self
        }

        fn external_ips(mut self, external_ips: &[&str]) -> Self {
            self.spec().external_ips = Some(external_ips.iter().map(|ip| ip.to_string()).collect());
            self
        }

        fn ingress(mut self, ip: Option<&str>, ip_mode: Option<&str>) -> Self {
            let status = self.0.status.get_or_insert_default();
            let load_balancer = status
                .load_balancer
                .get_or_insert_with(LoadBalancerStatus::default);
            load_balancer
                .ingress
                .get_or_insert_default()
                .push(LoadBalancerIngress {
                    ip: ip.map(str::to_owned),
                    hostname: Some("lb.example".to_owned()),
                    ip_mode: ip_mode.map(str::to_owned),
                    ..LoadBalancerIngress::default()
                });
            self
        }

        fn label(mut self, label: &str, value: &str) -> Self {
            add_label(&mut self.0.metadata, label, value);
            self
        }

        fn internal_traffic_policy(mut self, policy: &str) -> Self {
            self.spec().internal_traffic_policy = Some(policy.to_owned());
            self
        }

        fn external_traffic_policy(mut self, policy: &str) -> Self {
            self.spec().external_traffic_policy = Some(policy.to_owned());
            self
        }

        fn publish_not_ready_addresses(mut self) -> Self {
            self.spec().publish_not_ready_addresses = Some(true);
            self
        }

        fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
            self.spec().allocate_load_balancer_node_ports = Some(allocate);
            self
        }
    }

    /// `slice("web/front-1", "front").port(Some("http"), Some(8080), "TCP").endpoint(ep(..))`.
    struct Slice(EndpointSlice);

    fn slice(key: &str, service_name: &str) -> Slice {
        let mut metadata = metadata(key);
        add_label(&mut metadata, SERVICE_NAME_LABEL, service_name);
        Slice(EndpointSlice {
            metadata,
            address_type: "IPv4".to_owned(),
            ..EndpointSlice::default()
        })
    }

    impl Slice {
        fn address_type(mut self, address_type: &str) -> Self {
            self.0.address_type = address_type.to_owned();
            self
        }

        fn port(mut self, name: Option<&str>, port: Option<i32>, protocol: &str) -> Self {
            self.0.ports.get_or_insert_default().push(EndpointPort {
                name: name.map(str::to_owned),
                port,
                protocol: Some(protocol.to_owned()),
                ..EndpointPort::default()
            });
            self
        }

        fn endpoint(mut self, endpoint: Ep) -> Self {
            self.0.endpoints.get_or_insert_default().push(endpoint.0);
            self
        }

        fn label(mut self, label: &str, value: &str) -> Self {
            add_label(&mut self.0.metadata, label, value);
            self
        }
    }

    /// An endpoint with unset conditions (which means ready).
    struct Ep(Endpoint);

    fn ep(addr: &str) -> Ep {
        Ep(Endpoint {
            addresses: vec![addr.to_owned()],
            ..Endpoint::default()
        })
    }

    impl Ep {
        fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
            self.0.conditions = Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving),
                terminating: Some(terminating),
            });
            self
        }

        fn not_ready(self) -> Self {
            self.conditions(false, false, false)
        }

        /// Shutting down but still answering: kube-proxy's fallback.
        fn serving_terminating(self) -> Self {
            self.conditions(false, true, true)
        }

        fn on_node(mut self, node_name: &str) -> Self {
            self.0.node_name = Some(node_name.to_owned());
            self
        }
    }

    const NODE: &str = "node-a";

    fn node() -> NodeFacts {
        NodeFacts {
            node_name: NODE.to_owned(),
            addresses: vec!["198.18.0.1".parse().unwrap()],
            nodeport_cidrs: Vec::new(),
        }
    }

    /// One row of a table: the model's objects and what the planner must make of them.
    struct Case {
        name: &'static str,
        services: Vec<Svc>,
        slices: Vec<Slice>,
        node: NodeFacts,
        /// (`addr:port/proto`, kind, backends `addr:port`), in frontend order.
        frontends: Vec<(&'static str, FrontendKind, Vec<&'static str>)>,
        problems: Vec<&'static str>,
    }

    impl Default for Case {
        fn default() -> Self {
            Case {
                name: "",
                services: Vec::new(),
                slices: Vec::new(),
                node: node(),
                frontends: Vec::new(),
                problems: Vec::new(),
            }
        }
    }

    fn run(cases: Vec<Case>) {
        for case in cases {
            let mut model = Model::default();
            for service in case.services {
                model.insert_service(service.0).unwrap();
            }
            for slice in case.slices {
                model.insert_endpoint_slice(slice.0).unwrap();
            }
            let planned = plan(&model, &case.node);
            let frontends: Vec<(String, FrontendKind, Vec<String>)> = planned
                .desired
                .frontends
                .iter()
                .map(|(frontend, plan)| {
                    let backends = plan.backends.iter().map(ToString::to_string).collect();
                    (frontend.to_string(), plan.kind, backends)
                })
                .collect();
            let expected: Vec<(String, FrontendKind, Vec<String>)> = case
                .frontends
                .iter()
                .map(|(frontend, kind, backends)| {
                    let backends = backends.iter().map(ToString::to_string).collect();
                    (frontend.to_string(), *kind, backends)
                })
                .collect();
            assert_eq!(frontends, expected, "case {:?}: frontends", case.name);
            assert_eq!(
                planned.problems, case.problems,
                "case {:?}: problems",
                case.name
            );
        }
    }

    /// A one-port web Service's slice: `http` → 8080 on two ready pods.
    fn web_slice() -> Slice {
        slice("default/web-1", "web")
            .port(Some("http"), Some(8080), "TCP")
            .endpoint(ep("198.18.1.2"))
            .endpoint(ep("198.18.1.1"))
    }

    const WEB_BACKENDS: [&str; 2] = ["198.18.1.1:8080", "198.18.1.2:8080"];

    #[test]
    fn cluster_ip_frontends() {
        run(vec![
            Case {
                name: "one port",
                services: vec![svc("default/web", "198.19.0.10").port("http", 80, "TCP")],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
            Case {
                name: "two ports, one frontend each",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .port("https", 443, "TCP"),
                ],
                slices: vec![web_slice().port(Some("https"), Some(8443), "TCP")],
                frontends: vec![
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                    (
                        "198.19.0.10:443/tcp",
                        ClusterIp,
                        vec!["198.18.1.1:8443", "198.18.1.2:8443"],
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "dual stack: the IPv4 entry of clusterIPs",
                services: vec![
                    svc("default/web", "fd00::10")
                        .cluster_ips(&["fd00::10", "198.19.0.10"])
                        .port("http", 80, "TCP"),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
            Case {
                name: "IPv6 only: not proxied, not a problem",
                services: vec![
                    svc("default/web", "fd00::10")
                        .node_port("http", 80, 30080)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice()],
                ..Case::default()
            },
            Case {
                name: "no endpoints: frontend with no backends",
                services: vec![svc("default/web", "198.19.0.10").port("http", 80, "TCP")],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![])],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn node_port_frontends() {
        let two_addresses = NodeFacts {
            addresses: vec![
                "198.18.0.2".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
            ],
            ..node()
        };
        run(vec![
            Case {
                name: "NodePort on every node address",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .node_port("http", 80, 30080)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice()],
                node: two_addresses.clone(),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, WEB_BACKENDS.to_vec()),
                    ("198.18.0.2:30080/tcp", NodePort, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                ],
                ..Case::default()
            },
            Case {
                name: "nodeport_cidrs restricts the addresses",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .node_port("http", 80, 30080)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice()],
                node: NodeFacts {
                    nodeport_cidrs: vec!["198.18.0.2/32".parse().unwrap()],
                    ..two_addresses
                },
                frontends: vec![
                    ("198.18.0.2:30080/tcp", NodePort, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                ],
                ..Case::default()
            },
            Case {
                name: "LoadBalancer opens its nodePort too",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .node_port("http", 80, 30080)
                        .service_type("LoadBalancer"),
                ],
                slices: vec![web_slice()],
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                ],
                ..Case::default()
            },
            Case {
                name: "LoadBalancer with allocateLoadBalancerNodePorts=false has none",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .service_type("LoadBalancer")
                        .allocate_load_balancer_node_ports(false),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
            Case {
                name: "type ClusterIP ignores a nodePort",
                services: vec![svc("default/web", "198.19.0.10").node_port("http", 80, 30080)],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
            Case {
                name: "nodePort out of range",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .node_port("http", 80, 70000)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                problems: vec![
                    "default/web port http: nodePort 70000 is out of range, NodePort skipped",
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn external_ip_frontends() {
        run(vec![Case {
            name: "IPv4 externalIPs, IPv6 ones skipped",
            services: vec![
                svc("default/web", "198.19.0.10")
                    .port("http", 80, "TCP")
                    .external_ips(&["198.18.9.2", "fd00::9", "198.18.9.1"]),
            ],
            slices: vec![web_slice()],
            frontends: vec![
                ("198.18.9.1:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                ("198.18.9.2:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
            ],
            ..Case::default()
        }]);
    }

    #[test]
    fn load_balancer_frontends() {
        let load_balancer = || {
            svc("default/web", "198.19.0.10")
                .port("http", 80, "TCP")
                .service_type("LoadBalancer")
                .allocate_load_balancer_node_ports(false)
        };
        run(vec![
            Case {
                name: "ingress IPs in VIP mode (unset means VIP)",
                services: vec![
                    load_balancer()
                        .ingress(Some("198.18.8.1"), None)
                        .ingress(Some("198.18.8.2"), Some("VIP")),
                ],
                slices: vec![web_slice()],
                frontends: vec![
                    ("198.18.8.1:80/tcp", LoadBalancer, WEB_BACKENDS.to_vec()),
                    ("198.18.8.2:80/tcp", LoadBalancer, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                ],
                ..Case::default()
            },
            Case {
                name: "hostname-only, Proxy-mode and IPv6 ingress are skipped",
                services: vec![
                    load_balancer()
                        .ingress(None, None)
                        .ingress(Some("198.18.8.1"), Some("Proxy"))
                        .ingress(Some("fd00::8"), None),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
            Case {
                name: "an externalIP equal to the ingress IP is one frontend, no conflict",
                services: vec![
                    load_balancer()
                        .ingress(Some("198.18.8.1"), None)
                        .external_ips(&["198.18.8.1"]),
                ],
                slices: vec![web_slice()],
                frontends: vec![
                    ("198.18.8.1:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn protocols() {
        run(vec![
            Case {
                name: "UDP, and TCP when unset",
                services: vec![{
                    let mut dns = svc("kube-system/dns", "198.19.0.53").port("dns", 53, "UDP");
                    dns.spec().ports.get_or_insert_default().push(ServicePort {
                        name: Some("dns-tcp".to_owned()),
                        port: 53,
                        ..ServicePort::default()
                    });
                    dns
                }],
                slices: vec![
                    slice("kube-system/dns-1", "dns")
                        .port(Some("dns"), Some(5353), "UDP")
                        .port(Some("dns-tcp"), Some(5353), "TCP")
                        .endpoint(ep("198.18.2.1")),
                ],
                frontends: vec![
                    ("198.19.0.53:53/tcp", ClusterIp, vec!["198.18.2.1:5353"]),
                    ("198.19.0.53:53/udp", ClusterIp, vec!["198.18.2.1:5353"]),
                ],
                ..Case::default()
            },
            Case {
                name: "SCTP port skipped and reported, the others kept",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .port("sctp-port", 9999, "SCTP"),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                problems: vec!["default/web port sctp-port: SCTP is not supported, skipped"],
                ..Case::default()
            },
            Case {
                name: "unknown protocol reported",
                services: vec![svc("default/web", "198.19.0.10").port("", 80, "HTTP")],
                problems: vec!["default/web port 80: protocol \"HTTP\" is invalid, skipped"],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn ignored_services() {
        let ignored = |name: &'static str, service: Svc| Case {
            name,
            services: vec![service],
            slices: vec![web_slice()],
            ..Case::default()
        };
        let web = || svc("default/web", "198.19.0.10").port("http", 80, "TCP");
        run(vec![
            ignored(
                "headless",
                svc("default/web", "None").port("http", 80, "TCP"),
            ),
            ignored("ExternalName", web().service_type("ExternalName")),
            ignored(
                "another proxy's",
                web().label(SERVICE_PROXY_NAME_LABEL, "other-proxy"),
            ),
            ignored("headless label", web().label(HEADLESS_LABEL, "")),
            Case {
                name: "no clusterIP: skipped and reported",
                services: vec![svc("default/web", "").port("http", 80, "TCP")],
                problems: vec![
                    "default/web: no clusterIP set, skipped (kube-proxy skips such Services too)",
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn target_port_resolution() {
        let web = || svc("default/web", "198.19.0.10").port("http", 80, "TCP");
        run(vec![
            Case {
                name: "by name, each slice its own target port",
                services: vec![web()],
                slices: vec![
                    web_slice(),
                    slice("default/web-2", "web")
                        .port(Some("metrics"), Some(9090), "TCP")
                        .port(Some("http"), Some(8081), "TCP")
                        .endpoint(ep("198.18.1.3")),
                ],
                frontends: vec![(
                    "198.19.0.10:80/tcp",
                    ClusterIp,
                    vec!["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8081"],
                )],
                ..Case::default()
            },
            Case {
                name: "same name, other protocol: no match",
                services: vec![web()],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(Some("http"), Some(8080), "UDP")
                        .endpoint(ep("198.18.1.1")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![])],
                ..Case::default()
            },
            Case {
                name: "slice port without a number: no backends",
                services: vec![web()],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(Some("http"), None, "TCP")
                        .endpoint(ep("198.18.1.1")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![])],
                ..Case::default()
            },
            Case {
                name: "unnamed Service port matches an unnamed or empty-named slice port",
                services: vec![svc("default/web", "198.19.0.10").port("", 80, "TCP")],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(None, Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1")),
                    slice("default/web-2", "web")
                        .port(Some(""), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.2")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn endpoint_slices_merge() {
        let web = || svc("default/web", "198.19.0.10").port("http", 80, "TCP");
        run(vec![
            Case {
                name: "merged across slices, deduplicated and sorted",
                services: vec![web()],
                slices: vec![
                    web_slice(),
                    slice("default/web-2", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1"))
                        .endpoint(ep("198.18.1.0")),
                ],
                frontends: vec![(
                    "198.19.0.10:80/tcp",
                    ClusterIp,
                    vec!["198.18.1.0:8080", "198.18.1.1:8080", "198.18.1.2:8080"],
                )],
                ..Case::default()
            },
            Case {
                name: "IPv6 and FQDN slices, other Services' and ignored slices don't count",
                services: vec![web()],
                slices: vec![
                    web_slice().address_type("IPv6"),
                    slice("default/web-fqdn", "web")
                        .address_type("FQDN")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("web.example")),
                    slice("default/other-1", "other")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.7")),
                    slice("default/web-proxied-elsewhere", "web")
                        .label(SERVICE_PROXY_NAME_LABEL, "other-proxy")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.8")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![])],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn endpoint_conditions() {
        let web = || svc("default/web", "198.19.0.10").port("http", 80, "TCP");
        let web_slice_of = |endpoints: Vec<Ep>| {
            endpoints.into_iter().fold(
                slice("default/web-1", "web").port(Some("http"), Some(8080), "TCP"),
                Slice::endpoint,
            )
        };
        let case = |name, service: Svc, endpoints: Vec<Ep>, backends: Vec<&'static str>| Case {
            name,
            services: vec![service],
            slices: vec![web_slice_of(endpoints)],
            frontends: vec![("198.19.0.10:80/tcp", ClusterIp, backends)],
            ..Case::default()
        };
        run(vec![
            case(
                "ready and unset are usable, not ready is not",
                web(),
                vec![
                    ep("198.18.1.1"),
                    ep("198.18.1.2").conditions(true, true, false),
                    ep("198.18.1.3").not_ready(),
                ],
                WEB_BACKENDS.to_vec(),
            ),
            case(
                "ready ones win over serving-terminating ones",
                web(),
                vec![ep("198.18.1.1"), ep("198.18.1.2").serving_terminating()],
                vec!["198.18.1.1:8080"],
            ),
            case(
                "none ready: fall back to serving-terminating",
                web(),
                vec![
                    ep("198.18.1.1").serving_terminating(),
                    ep("198.18.1.2").conditions(false, false, true),
                    ep("198.18.1.3").not_ready(),
                ],
                vec!["198.18.1.1:8080"],
            ),
            case(
                "publishNotReadyAddresses: all usable",
                web().publish_not_ready_addresses(),
                vec![
                    ep("198.18.1.1").not_ready(),
                    ep("198.18.1.2").conditions(false, false, true),
                ],
                WEB_BACKENDS.to_vec(),
            ),
        ]);
    }

    #[test]
    fn traffic_policies() {
        let web = || {
            svc("default/web", "198.19.0.10")
                .node_port("http", 80, 30080)
                .service_type("NodePort")
                .external_ips(&["198.18.9.1"])
        };
        let slices = || {
            vec![
                slice("default/web-1", "web")
                    .port(Some("http"), Some(8080), "TCP")
                    .endpoint(ep("198.18.1.1").on_node(NODE))
                    .endpoint(ep("198.18.1.2").on_node("node-b"))
                    .endpoint(ep("198.18.1.3")),
            ]
        };
        let local = vec!["198.18.1.1:8080"];
        let all = vec!["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"];
        run(vec![
            Case {
                name: "internalTrafficPolicy=Local: ClusterIP to this node's endpoints only",
                services: vec![web().internal_traffic_policy("Local")],
                slices: slices(),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, all.clone()),
                    ("198.18.9.1:80/tcp", ExternalIp, all.clone()),
                    ("198.19.0.10:80/tcp", ClusterIp, local.clone()),
                ],
                ..Case::default()
            },
            Case {
                name: "externalTrafficPolicy=Local: NodePort and external IPs local only",
                services: vec![web().external_traffic_policy("Local")],
                slices: slices(),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, local.clone()),
                    ("198.18.9.1:80/tcp", ExternalIp, local.clone()),
                    ("198.19.0.10:80/tcp", ClusterIp, all.clone()),
                ],
                ..Case::default()
            },
            Case {
                name: "Local with no local endpoint: empty, the datapath drops",
                services: vec![web().external_traffic_policy("Local")],
                slices: slices(),
                node: NodeFacts {
                    node_name: "node-c".to_owned(),
                    ..node()
                },
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![]),
                    ("198.18.9.1:80/tcp", ExternalIp, vec![]),
                    ("198.19.0.10:80/tcp", ClusterIp, all.clone()),
                ],
                ..Case::default()
            },
            Case {
                name: "Local falls back to local serving-terminating endpoints",
                services: vec![web().internal_traffic_policy("Local")],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").on_node(NODE).serving_terminating())
                        .endpoint(ep("198.18.1.2").on_node("node-b")),
                ],
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec!["198.18.1.2:8080"]),
                    ("198.18.9.1:80/tcp", ExternalIp, vec!["198.18.1.2:8080"]),
                    ("198.19.0.10:80/tcp", ClusterIp, local.clone()),
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn conflicting_frontends() {
        run(vec![
            Case {
                name: "two Services, one ClusterIP:port: the first by namespace/name keeps it",
                services: vec![
                    svc("default/web", "198.19.0.10").port("http", 80, "TCP"),
                    svc("default/api", "198.19.0.10").port("http", 80, "TCP"),
                ],
                slices: vec![
                    web_slice(),
                    slice("default/api-1", "api")
                        .port(Some("http"), Some(9000), "TCP")
                        .endpoint(ep("198.18.3.1")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.3.1:9000"])],
                problems: vec![
                    "default/web:http: 198.19.0.10:80/tcp (ClusterIp) is already taken by default/api:http (ClusterIp), skipped",
                ],
                ..Case::default()
            },
            Case {
                name: "an externalIP on another Service's ClusterIP",
                services: vec![
                    svc("default/a", "198.19.0.10").port("http", 80, "TCP"),
                    svc("default/b", "198.19.0.11")
                        .port("http", 80, "TCP")
                        .external_ips(&["198.19.0.10"]),
                ],
                frontends: vec![
                    ("198.19.0.10:80/tcp", ClusterIp, vec![]),
                    ("198.19.0.11:80/tcp", ClusterIp, vec![]),
                ],
                problems: vec![
                    "default/b:http: 198.19.0.10:80/tcp (ExternalIp) is already taken by default/a:http (ClusterIp), skipped",
                ],
                ..Case::default()
            },
        ]);
    }
}
