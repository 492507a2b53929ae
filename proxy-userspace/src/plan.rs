//! Plan: a pure function from the model and the node's facts to the desired datapath
//! contents, expressed in Kubernetes terms (frontends and their backends). The map writer
//! turns this into map entries; nothing here touches the kernel.
//!
//! The rules are kube-proxy's, so a cluster behaves the same with either proxy:
//! which Services are proxied (`ServiceChangeTracker`, `ShouldSkipService`, the informers'
//! label selector), which frontends a Service port gets (`newBaseServiceInfo`), how
//! EndpointSlices of a Service merge and resolve target ports (`EndpointSliceCache`), and
//! which endpoints are usable (`CategorizeEndpoints`: ready ones, else serving-and-terminating
//! ones; traffic policy `Local` keeps only this node's; topology hints narrow the Cluster
//! set), what an empty frontend does (REJECT when the Service has no usable endpoint
//! anywhere, DROP when only its `Local` policy leaves none here), session affinity, and which
//! endpoints count as serving for the UDP conntrack cleanup (`conntrack/cleanup.go`).
//!
//! Topology follows the current kube-proxy: it reads only the hints in the EndpointSlices.
//! The `service.kubernetes.io/topology-mode` annotation and `spec.trafficDistribution`
//! (PreferClose, PreferSameZone, PreferSameNode) are read by the EndpointSlice controller,
//! which writes `hints.forZones` / `hints.forNodes` accordingly.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tracing::debug;

use crate::model::{Model, ObjectKey};

/// What the planner needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub node_name: String,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for topology hints. Used
    /// while the model knows no Node labels (the manifests source: `--node-zone`); once it
    /// does (the Kubernetes source), the Node's own label decides, as in kube-proxy.
    pub zone: Option<String>,
    /// Every IPv4 address of the node, loopback included (read with rtnetlink).
    pub addresses: Vec<Ipv4Addr>,
    /// The IPv4 CIDRs of `--nodeport-addresses` (kube-proxy's flag of the same name, its
    /// `primary` keyword resolved): when non-empty, NodePorts open only on node addresses
    /// inside one of them.
    pub nodeport_cidrs: Vec<Ipv4Net>,
}

impl NodeFacts {
    /// The addresses NodePorts open on in the datapath: the node's addresses, or those
    /// inside `nodeport_cidrs` when it is set, never loopback ones (the program sees no
    /// loopback traffic). Sorted, without duplicates.
    pub fn node_port_addresses(&self) -> Vec<Ipv4Addr> {
        self.addresses_in_nodeport_cidrs()
            .into_iter()
            .filter(|addr| !addr.is_loopback())
            .collect()
    }

    /// Where healthCheckNodePorts listen, as kube-proxy's service health server: every
    /// address (`0.0.0.0`) unless `nodeport_cidrs` narrows them (and does not contain
    /// `0.0.0.0/0`), then the node's addresses inside them, loopback included. Empty when
    /// no node address is inside them.
    pub fn health_check_addresses(&self) -> Vec<Ipv4Addr> {
        let match_all = self.nodeport_cidrs.is_empty()
            || self
                .nodeport_cidrs
                .iter()
                .any(|cidr| cidr.prefix_len() == 0);
        if match_all {
            vec![Ipv4Addr::UNSPECIFIED]
        } else {
            self.addresses_in_nodeport_cidrs()
        }
    }

    fn addresses_in_nodeport_cidrs(&self) -> Vec<Ipv4Addr> {
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
    /// Sorted and deduplicated. Empty means no endpoint is usable for this frontend.
    pub backends: Vec<BackendAddr>,
    /// What a new connection gets while `backends` is empty.
    pub when_empty: EmptyFrontend,
    /// `sessionAffinity: ClientIP`: how long a client keeps its backend after its last new
    /// connection. `None`: every new connection is balanced anew.
    pub session_affinity: Option<Duration>,
    /// Addresses of the Service port's serving endpoints, whatever the traffic policy and
    /// topology (sorted, deduplicated): UDP flows to any other address are stale and are
    /// cleared, as kube-proxy's conntrack cleanup does.
    pub serving_addrs: Vec<Ipv4Addr>,
    /// `loadBalancerSourceRanges` (IPv4 ones, sorted): on a load-balancer frontend, new
    /// connections from other clients are dropped. Empty: no restriction.
    pub source_ranges: Vec<Ipv4Net>,
}

/// What a frontend without backends does with new connections (kube-proxy's filter rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EmptyFrontend {
    /// The Service has no usable endpoint anywhere: refuse at once (ICMP port unreachable),
    /// like kube-proxy's `REJECT` ("has no endpoints").
    Reject,
    /// Endpoints exist, but the frontend's traffic policy is `Local` and none is on this
    /// node: drop, like kube-proxy's `DROP` ("has no local endpoints").
    Drop,
}

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// The API's upper bound for `timeoutSeconds`: one day.
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// The Node label that names the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
}

/// The planner's output: what the datapath should do, and what it can't be asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub desired: DesiredState,
    /// The health-check servers to run: one per Service with `externalTrafficPolicy: Local`
    /// and a `healthCheckNodePort` (kube-proxy's `ServiceHealthServer`).
    pub health_checks: BTreeMap<ObjectKey, ServiceHealthCheck>,
    /// One sentence each, ordered by Service, e.g.
    /// `default/foo port sctp-port: SCTP is not supported, skipped`.
    pub problems: Vec<String>,
}

/// What a Service's `healthCheckNodePort` tells a load balancer about this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceHealthCheck {
    pub node_port: u16,
    /// Distinct addresses of this node's ready endpoints over all the Service's ports
    /// (kube-proxy's `LocalReadyEndpoints`): terminating ones do not count, so a node whose
    /// pods are shutting down drains before they go.
    pub local_endpoints: usize,
}

/// Services (and their EndpointSlices) with this label belong to another proxy; kube-proxy's
/// informers filter them out.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Set on headless Services' EndpointSlices; kube-proxy's informers filter it out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Plans every frontend of every proxied Service. Services are visited in `namespace/name`
/// order, so when two claim the same frontend the first keeps it, the same on every run.
pub fn plan(model: &Model, node: &NodeFacts) -> Planned {
    let node_labels = model.node_labels();
    let zone = if node_labels.is_empty() {
        node.zone.as_ref()
    } else {
        node_labels.get(ZONE_LABEL)
    };
    let mut planner = Planner {
        node_name: &node.node_name,
        zone: zone.map_or("", String::as_str),
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
    /// Empty when the node has no zone label: then no zone hint matches, as in kube-proxy.
    zone: &'a str,
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
    /// `healthCheckNodePort`, when set and in range.
    health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges`, the valid IPv4 ones.
    source_ranges: Vec<Ipv4Net>,
    publish_not_ready_addresses: bool,
    session_affinity: Option<Duration>,
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
        let mut local_ready = BTreeSet::new();
        for port in ports.into_iter().flatten() {
            local_ready.extend(self.add_service_port(key, &facts, port, &slices));
        }
        if facts.external_policy_local
            && let Some(node_port) = facts.health_check_node_port
        {
            let check = ServiceHealthCheck {
                node_port,
                local_endpoints: local_ready.len(),
            };
            self.planned.health_checks.insert(key.clone(), check);
        }
    }

    /// Plans the frontends of one Service port; returns the addresses of its ready
    /// endpoints on this node (for the health check).
    fn add_service_port(
        &mut self,
        key: &ObjectKey,
        facts: &ServiceFacts,
        port: &ServicePort,
        slices: &[&EndpointSlice],
    ) -> Vec<Ipv4Addr> {
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
                return Vec::new();
            }
        };
        let Some(service_port) = port_number(port.port) else {
            self.planned.problems.push(format!(
                "{context}: port {} is out of range, skipped",
                port.port
            ));
            return Vec::new();
        };

        let endpoints = endpoints_of_port(
            slices,
            &port_name,
            protocol,
            facts.publish_not_ready_addresses,
        );
        let categorized = categorize(&endpoints, self.node_name, self.zone);
        let local_ready = endpoints
            .iter()
            .filter(|endpoint| endpoint.ready && is_on_node(endpoint, self.node_name))
            .map(|endpoint| endpoint.backend.addr)
            .collect();
        let for_policy = |local: bool| FrontendTemplate {
            service: ServicePortName {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                port_name: port_name.clone(),
            },
            backends: if local {
                categorized.local.clone()
            } else {
                categorized.cluster.clone()
            },
            when_empty: if categorized.has_usable_endpoints {
                EmptyFrontend::Drop
            } else {
                EmptyFrontend::Reject
            },
            session_affinity: facts.session_affinity,
            serving_addrs: categorized.serving_addrs.clone(),
            source_ranges: facts.source_ranges.clone(),
        };
        let internal = for_policy(facts.internal_policy_local);
        let external = for_policy(facts.external_policy_local);
        let frontend = |addr| Frontend {
            addr,
            port: service_port,
            protocol,
        };

        self.planned.claim(
            frontend(facts.cluster_ip),
            &internal,
            FrontendKind::ClusterIp,
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
                        self.planned
                            .claim(frontend, &external, FrontendKind::NodePort);
                    }
                }
                None => self.planned.problems.push(format!(
                    "{context}: nodePort {node_port} is out of range, NodePort skipped"
                )),
            }
        }
        for &addr in &facts.external_ips {
            self.planned
                .claim(frontend(addr), &external, FrontendKind::ExternalIp);
        }
        for &addr in &facts.load_balancer_ips {
            self.planned
                .claim(frontend(addr), &external, FrontendKind::LoadBalancer);
        }
        local_ready
    }
}

/// A [`FrontendPlan`] without its kind: what every frontend of one traffic policy
/// (internal: the ClusterIP; external: NodePorts, external and load-balancer IPs) shares.
struct FrontendTemplate {
    service: ServicePortName,
    backends: Vec<BackendAddr>,
    when_empty: EmptyFrontend,
    session_affinity: Option<Duration>,
    serving_addrs: Vec<Ipv4Addr>,
    source_ranges: Vec<Ipv4Net>,
}

impl Planned {
    /// Gives `frontend` to the template's Service port unless another one has it already.
    fn claim(&mut self, frontend: Frontend, template: &FrontendTemplate, kind: FrontendKind) {
        let service = &template.service;
        match self.desired.frontends.entry(frontend) {
            Entry::Vacant(entry) => {
                entry.insert(FrontendPlan {
                    service: service.clone(),
                    kind,
                    backends: template.backends.clone(),
                    when_empty: template.when_empty,
                    session_affinity: template.session_affinity,
                    serving_addrs: template.serving_addrs.clone(),
                    // Only load-balancer IPs are restricted, as in kube-proxy.
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        template.source_ranges.clone()
                    } else {
                        Vec::new()
                    },
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
        health_check_node_port: spec.health_check_node_port.and_then(port_number),
        source_ranges: ipv4_networks(spec.load_balancer_source_ranges.iter().flatten()),
        publish_not_ready_addresses: spec.publish_not_ready_addresses == Some(true),
        session_affinity: session_affinity(&spec),
    })
}

/// The affinity timeout of `sessionAffinity: ClientIP` (the API's default when unset);
/// `None` for `None`. A timeout outside the API's 1..=86400 s (only possible in hand-written
/// manifests, which the manifests source refuses) also falls back to the default.
fn session_affinity(spec: &ServiceSpec) -> Option<Duration> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let seconds = spec
        .session_affinity_config
        .as_ref()
        .and_then(|config| config.client_ip.as_ref())
        .and_then(|client_ip| client_ip.timeout_seconds)
        .filter(|seconds| (1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(seconds))
        .and_then(|seconds| u64::try_from(seconds).ok());
    Some(seconds.map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs))
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

/// The valid IPv4 CIDRs among `ranges`, sorted and deduplicated. Like kube-proxy, other
/// families and unparsable entries are left out, so a list without any IPv4 range
/// restricts nothing.
fn ipv4_networks<'a>(ranges: impl Iterator<Item = &'a String>) -> Vec<Ipv4Net> {
    let mut networks: Vec<Ipv4Net> = ranges
        .filter_map(|range| range.trim().parse::<Ipv4Net>().ok())
        .map(|network| network.trunc())
        .collect();
    networks.sort();
    networks.dedup();
    networks
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
    /// `hints.forZones`: the zones whose nodes should use this endpoint.
    zone_hints: Vec<&'a str>,
    /// `hints.forNodes`: the nodes that should use this endpoint.
    node_hints: Vec<&'a str>,
}

impl PortEndpoint<'_> {
    /// Still serving while shutting down: kube-proxy's fallback when nothing is ready.
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The endpoints of the Service port `port_name`/`protocol` across all its slices. Each
/// slice resolves the target port itself: its port with the same name and protocol. An
/// unset slice port name counts as "" (what the EndpointSlice controller writes for an
/// unnamed Service port), so hand-written slices for single-port Services need no name.
/// `publishNotReadyAddresses` counts every endpoint as ready, which is what the
/// EndpointSlice controller writes for such Services.
fn endpoints_of_port<'a>(
    slices: &[&'a EndpointSlice],
    port_name: &str,
    protocol: Protocol,
    publish_not_ready_addresses: bool,
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
                let hints = endpoint.hints.as_ref();
                endpoints.push(PortEndpoint {
                    backend: BackendAddr {
                        addr,
                        port: target_port,
                    },
                    node_name: endpoint.node_name.as_deref(),
                    // Unset ready and serving mean true, unset terminating false (API docs).
                    ready: conditions.ready != Some(false) || publish_not_ready_addresses,
                    serving: conditions.serving != Some(false),
                    terminating: conditions.terminating == Some(true),
                    zone_hints: hints
                        .and_then(|hints| hints.for_zones.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|zone| zone.name.as_str())
                        .collect(),
                    node_hints: hints
                        .and_then(|hints| hints.for_nodes.as_ref())
                        .into_iter()
                        .flatten()
                        .map(|node| node.name.as_str())
                        .collect(),
                });
            }
        }
    }
    endpoints
}

/// A Service port's endpoints sorted for its frontends: kube-proxy's `CategorizeEndpoints`.
struct Categorized {
    /// For traffic policy Cluster: the ready endpoints (narrowed by topology hints when they
    /// apply), else the serving-and-terminating ones.
    cluster: Vec<BackendAddr>,
    /// For traffic policy Local: this node's ready endpoints, else its serving-and-terminating
    /// ones. Topology hints do not apply.
    local: Vec<BackendAddr>,
    /// Whether any endpoint anywhere is ready or serving-and-terminating: an empty frontend
    /// then drops (its policy left nothing here) rather than rejects.
    has_usable_endpoints: bool,
    /// See [`FrontendPlan::serving_addrs`].
    serving_addrs: Vec<Ipv4Addr>,
}

fn categorize(endpoints: &[PortEndpoint<'_>], node_name: &str, zone: &str) -> Categorized {
    let topology = Topology::from_hints(endpoints, node_name, zone);
    let mut cluster = backends_where(endpoints, |endpoint| {
        endpoint.ready && topology.admits(endpoint, node_name, zone)
    });
    // Topology is only used when it leaves a ready endpoint, so an empty set here means
    // nothing is ready anywhere.
    if cluster.is_empty() {
        cluster = backends_where(endpoints, |endpoint| endpoint.serving_terminating());
    }
    let is_local = |endpoint: &PortEndpoint<'_>| is_on_node(endpoint, node_name);
    let mut local = backends_where(endpoints, |endpoint| is_local(endpoint) && endpoint.ready);
    if local.is_empty() {
        local = backends_where(endpoints, |endpoint| {
            is_local(endpoint) && endpoint.serving_terminating()
        });
    }
    // Ready endpoints count as serving even when a hand-written slice says otherwise: the
    // cleanup must never cut flows to a backend that is still in use.
    let mut serving_addrs: Vec<Ipv4Addr> = endpoints
        .iter()
        .filter(|endpoint| endpoint.serving || endpoint.ready)
        .map(|endpoint| endpoint.backend.addr)
        .collect();
    serving_addrs.sort();
    serving_addrs.dedup();
    Categorized {
        cluster,
        local,
        has_usable_endpoints: endpoints
            .iter()
            .any(|endpoint| endpoint.ready || endpoint.serving_terminating()),
        serving_addrs,
    }
}

/// Whether the endpoint runs on this node (never, while the node's name is unknown).
fn is_on_node(endpoint: &PortEndpoint<'_>, node_name: &str) -> bool {
    !node_name.is_empty() && endpoint.node_name == Some(node_name)
}

/// The backends of the endpoints that pass `usable`, sorted and deduplicated.
fn backends_where(
    endpoints: &[PortEndpoint<'_>],
    usable: impl Fn(&PortEndpoint<'_>) -> bool,
) -> Vec<BackendAddr> {
    let mut backends: Vec<BackendAddr> = endpoints
        .iter()
        .filter(|endpoint| usable(endpoint))
        .map(|endpoint| endpoint.backend)
        .collect();
    backends.sort();
    backends.dedup();
    backends
}

/// kube-proxy's topology modes: which ready endpoints a node's Cluster-policy traffic uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// No hints apply: every ready endpoint.
    Any,
    /// `PreferSameZone` (and `PreferClose`): the endpoints hinted for this node's zone.
    SameZone,
    /// `PreferSameNode`: the endpoints hinted for this node.
    SameNode,
}

impl Topology {
    /// kube-proxy's `topologyModeFromHints`: node hints win when every ready endpoint has
    /// one and one names this node; else zone hints, when every ready endpoint has one and
    /// one names this node's zone; else none. Requiring a hint on every endpoint and a
    /// match for this node keeps a half-updated or foreign hint set from starving the node.
    fn from_hints(endpoints: &[PortEndpoint<'_>], node_name: &str, zone: &str) -> Self {
        let ready: Vec<&PortEndpoint<'_>> =
            endpoints.iter().filter(|endpoint| endpoint.ready).collect();
        let all_ready = |has: fn(&PortEndpoint<'_>) -> bool| {
            !ready.is_empty() && ready.iter().all(|endpoint| has(endpoint))
        };
        if all_ready(|endpoint| !endpoint.node_hints.is_empty())
            && ready
                .iter()
                .any(|endpoint| endpoint.node_hints.contains(&node_name))
        {
            Topology::SameNode
        } else if all_ready(|endpoint| !endpoint.zone_hints.is_empty())
            && ready
                .iter()
                .any(|endpoint| endpoint.zone_hints.contains(&zone))
        {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    fn admits(self, endpoint: &PortEndpoint<'_>, node_name: &str, zone: &str) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameZone => endpoint.zone_hints.contains(&zone),
            Topology::SameNode => endpoint.node_hints.contains(&node_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, SessionAffinityConfig,
    };
    use k8s_openapi::api::discovery::v1::{
        Endpoint, EndpointConditions, EndpointHints, EndpointPort, ForNode, ForZone,
    };
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

        fn load_balancer_source_ranges(mut self, ranges: &[&str]) -> Self {
            self.spec().load_balancer_source_ranges =
                Some(ranges.iter().map(ToString::to_string).collect());
            self
        }

        fn health_check_node_port(mut self, port: i32) -> Self {
            self.spec().health_check_node_port = Some(port);
            self
        }

        fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
            self.spec().allocate_load_balancer_node_ports = Some(allocate);
            self
        }

        /// `sessionAffinity: ClientIP`, with `timeoutSeconds` when given.
        fn client_ip_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
            self.spec().session_affinity = Some("ClientIP".to_owned());
            self.spec().session_affinity_config =
                timeout_seconds.map(|seconds| SessionAffinityConfig {
                    client_ip: Some(ClientIPConfig {
                        timeout_seconds: Some(seconds),
                    }),
                });
            self
        }

        fn session_affinity(mut self, affinity: &str) -> Self {
            self.spec().session_affinity = Some(affinity.to_owned());
            self
        }

        fn annotation(mut self, annotation: &str, value: &str) -> Self {
            self.0
                .metadata
                .annotations
                .get_or_insert_default()
                .insert(annotation.to_owned(), value.to_owned());
            self
        }

        fn traffic_distribution(mut self, distribution: &str) -> Self {
            self.spec().traffic_distribution = Some(distribution.to_owned());
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

        /// `hints.forZones`, as the EndpointSlice controller writes for PreferClose.
        fn for_zones(mut self, zones: &[&str]) -> Self {
            let hints = self.0.hints.get_or_insert_with(EndpointHints::default);
            hints.for_zones = Some(
                zones
                    .iter()
                    .map(|zone| ForZone {
                        name: zone.to_string(),
                    })
                    .collect(),
            );
            self
        }

        /// `hints.forNodes`, as the EndpointSlice controller writes for PreferSameNode.
        fn for_nodes(mut self, nodes: &[&str]) -> Self {
            let hints = self.0.hints.get_or_insert_with(EndpointHints::default);
            hints.for_nodes = Some(
                nodes
                    .iter()
                    .map(|node| ForNode {
                        name: node.to_string(),
                    })
                    .collect(),
            );
            self
        }
    }

    const NODE: &str = "node-a";

    fn node() -> NodeFacts {
        NodeFacts {
            node_name: NODE.to_owned(),
            zone: Some(ZONE.to_owned()),
            addresses: vec!["198.18.0.1".parse().unwrap()],
            nodeport_cidrs: Vec::new(),
        }
    }

    const ZONE: &str = "zone-a";

    /// How a frontend without backends shows in a case's expected backends.
    const REJECTS: &str = "(reject)";
    const DROPS: &str = "(drop)";

    /// One row of a table: the model's objects and what the planner must make of them.
    struct Case {
        name: &'static str,
        services: Vec<Svc>,
        slices: Vec<Slice>,
        node: NodeFacts,
        /// (`addr:port/proto`, kind, backends `addr:port`), in frontend order. A frontend
        /// without backends shows [`REJECTS`] or [`DROPS`] instead.
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
                .map(|(frontend, plan)| (frontend.to_string(), plan.kind, rendered(plan)))
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

    /// A plan's backends as a case writes them.
    fn rendered(plan: &FrontendPlan) -> Vec<String> {
        match plan.when_empty {
            _ if !plan.backends.is_empty() => {
                plan.backends.iter().map(ToString::to_string).collect()
            }
            EmptyFrontend::Reject => vec![REJECTS.to_owned()],
            EmptyFrontend::Drop => vec![DROPS.to_owned()],
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
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
                ..Case::default()
            },
        ]);
    }

    /// kube-proxy's service health server listens on `0.0.0.0` unless
    /// `--nodeport-addresses` narrows it, then on the node addresses inside the CIDRs,
    /// loopback included (`newServiceHealthServer`, `GetNodeIPs`).
    #[test]
    fn health_checks_listen_where_kube_proxy_does() {
        let ip = |text: &str| -> Ipv4Addr { text.parse().unwrap() };
        let node = |cidrs: &[&str]| NodeFacts {
            addresses: vec![ip("198.18.0.1"), ip("127.0.0.1"), ip("198.18.5.1")],
            nodeport_cidrs: cidrs.iter().map(|cidr| cidr.parse().unwrap()).collect(),
            ..NodeFacts::default()
        };
        // (CIDRs, health-check addresses, NodePort addresses)
        let cases: [(&[&str], Vec<Ipv4Addr>, Vec<Ipv4Addr>); 5] = [
            (
                &[],
                vec![Ipv4Addr::UNSPECIFIED],
                vec![ip("198.18.0.1"), ip("198.18.5.1")],
            ),
            (&["127.0.0.0/8"], vec![ip("127.0.0.1")], vec![]),
            (
                &["198.18.0.0/24", "127.0.0.0/8"],
                vec![ip("127.0.0.1"), ip("198.18.0.1")],
                vec![ip("198.18.0.1")],
            ),
            (
                &["0.0.0.0/0"],
                vec![Ipv4Addr::UNSPECIFIED],
                vec![ip("198.18.0.1"), ip("198.18.5.1")],
            ),
            (&["203.0.113.0/24"], vec![], vec![]),
        ];
        for (cidrs, health_checks, node_ports) in cases {
            let node = node(cidrs);
            assert_eq!(node.health_check_addresses(), health_checks, "{cidrs:?}");
            assert_eq!(node.node_port_addresses(), node_ports, "{cidrs:?}");
        }
    }

    #[test]
    fn node_port_frontends() {
        // Loopback addresses never become NodePort frontends: the program sees no
        // loopback traffic.
        let two_addresses = NodeFacts {
            addresses: vec![
                "198.18.0.2".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
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
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
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
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
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
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
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
                    ("198.18.0.1:30080/tcp", NodePort, vec![DROPS]),
                    ("198.18.9.1:80/tcp", ExternalIp, vec![DROPS]),
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
                    ("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS]),
                    ("198.19.0.11:80/tcp", ClusterIp, vec![REJECTS]),
                ],
                problems: vec![
                    "default/b:http: 198.19.0.10:80/tcp (ExternalIp) is already taken by default/a:http (ClusterIp), skipped",
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn empty_frontends_reject_or_drop() {
        let web = || {
            svc("default/web", "198.19.0.10")
                .node_port("http", 80, 30080)
                .service_type("NodePort")
        };
        let web_slice_of = |endpoints: Vec<Ep>| {
            vec![endpoints.into_iter().fold(
                slice("default/web-1", "web").port(Some("http"), Some(8080), "TCP"),
                Slice::endpoint,
            )]
        };
        let remote = "198.18.1.2:8080";
        run(vec![
            Case {
                name: "no endpoints at all: every frontend rejects",
                services: vec![web()],
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![REJECTS]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS]),
                ],
                ..Case::default()
            },
            Case {
                name: "only not-ready endpoints: nothing usable anywhere, reject",
                services: vec![web().external_traffic_policy("Local")],
                slices: web_slice_of(vec![
                    ep("198.18.1.1").on_node(NODE).not_ready(),
                    ep("198.18.1.2").conditions(false, false, true),
                ]),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![REJECTS]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS]),
                ],
                ..Case::default()
            },
            Case {
                name: "internalTrafficPolicy=Local, endpoints elsewhere only: ClusterIP drops",
                services: vec![web().internal_traffic_policy("Local")],
                slices: web_slice_of(vec![ep("198.18.1.2").on_node("node-b")]),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![remote]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec![DROPS]),
                ],
                ..Case::default()
            },
            Case {
                name: "externalTrafficPolicy=Local, a remote terminating endpoint: NodePort drops",
                services: vec![web().external_traffic_policy("Local")],
                slices: web_slice_of(vec![
                    ep("198.18.1.2").on_node("node-b").serving_terminating(),
                ]),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![DROPS]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec![remote]),
                ],
                ..Case::default()
            },
            Case {
                name: "both policies Local, no endpoint on this node: all drop",
                services: vec![
                    web()
                        .internal_traffic_policy("Local")
                        .external_traffic_policy("Local"),
                ],
                slices: web_slice_of(vec![ep("198.18.1.2").on_node("node-b")]),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, vec![DROPS]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec![DROPS]),
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn topology_hints() {
        let web = || svc("default/web", "198.19.0.10").port("http", 80, "TCP");
        let web_slice_of = |endpoints: Vec<Ep>| {
            vec![endpoints.into_iter().fold(
                slice("default/web-1", "web").port(Some("http"), Some(8080), "TCP"),
                Slice::endpoint,
            )]
        };
        let zoned = || {
            web_slice_of(vec![
                ep("198.18.1.1").for_zones(&[ZONE]),
                ep("198.18.1.2").for_zones(&["zone-b"]),
                ep("198.18.1.3").for_zones(&["zone-b", ZONE]),
            ])
        };
        let all = vec!["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"];
        let case = |name, slices, backends| Case {
            name,
            services: vec![web()],
            slices,
            frontends: vec![("198.19.0.10:80/tcp", ClusterIp, backends)],
            ..Case::default()
        };
        run(vec![
            case(
                "zone hints: the endpoints hinted for this node's zone",
                zoned(),
                vec!["198.18.1.1:8080", "198.18.1.3:8080"],
            ),
            case(
                "no endpoint hinted for this zone: hints ignored",
                web_slice_of(vec![
                    ep("198.18.1.1").for_zones(&["zone-b"]),
                    ep("198.18.1.2").for_zones(&["zone-c"]),
                ]),
                vec!["198.18.1.1:8080", "198.18.1.2:8080"],
            ),
            case(
                "a ready endpoint without a hint: hints ignored",
                web_slice_of(vec![ep("198.18.1.1").for_zones(&[ZONE]), ep("198.18.1.2")]),
                vec!["198.18.1.1:8080", "198.18.1.2:8080"],
            ),
            case(
                "a not-ready endpoint without a hint does not count",
                web_slice_of(vec![
                    ep("198.18.1.1").for_zones(&[ZONE]),
                    ep("198.18.1.2").for_zones(&["zone-b"]),
                    ep("198.18.1.3").not_ready(),
                ]),
                vec!["198.18.1.1:8080"],
            ),
            case(
                "node hints (PreferSameNode): the endpoint hinted for this node",
                web_slice_of(vec![
                    ep("198.18.1.1").for_nodes(&[NODE]).for_zones(&[ZONE]),
                    ep("198.18.1.2").for_nodes(&["node-b"]).for_zones(&[ZONE]),
                ]),
                vec!["198.18.1.1:8080"],
            ),
            case(
                "node hints for other nodes only: the zone hints decide",
                web_slice_of(vec![
                    ep("198.18.1.1").for_nodes(&["node-b"]).for_zones(&[ZONE]),
                    ep("198.18.1.2")
                        .for_nodes(&["node-c"])
                        .for_zones(&["zone-b"]),
                ]),
                vec!["198.18.1.1:8080"],
            ),
            case(
                "nothing ready: the serving-terminating fallback ignores hints",
                web_slice_of(vec![
                    ep("198.18.1.1").for_zones(&[ZONE]).serving_terminating(),
                    ep("198.18.1.2")
                        .for_zones(&["zone-b"])
                        .serving_terminating(),
                ]),
                vec!["198.18.1.1:8080", "198.18.1.2:8080"],
            ),
            Case {
                name: "a node without a zone label uses every endpoint",
                node: NodeFacts {
                    zone: None,
                    ..node()
                },
                ..case("", zoned(), all.clone())
            },
            Case {
                name: "the annotation and trafficDistribution without hints change nothing",
                services: vec![
                    web()
                        .annotation("service.kubernetes.io/topology-mode", "Auto")
                        .traffic_distribution("PreferClose"),
                ],
                ..case(
                    "",
                    web_slice_of(vec![ep("198.18.1.1"), ep("198.18.1.2")]),
                    vec!["198.18.1.1:8080", "198.18.1.2:8080"],
                )
            },
            Case {
                name: "hints are followed whatever the annotation says (the controller's input)",
                services: vec![web().annotation("service.kubernetes.io/topology-mode", "Disabled")],
                ..case("", zoned(), vec!["198.18.1.1:8080", "198.18.1.3:8080"])
            },
            Case {
                name: "Local policy ignores hints; Cluster-policy frontends use them",
                services: vec![
                    web()
                        .node_port("http-np", 81, 30081)
                        .service_type("NodePort")
                        .external_traffic_policy("Local"),
                ],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .port(Some("http-np"), Some(8081), "TCP")
                        .endpoint(ep("198.18.1.1").for_zones(&["zone-b"]).on_node(NODE))
                        .endpoint(ep("198.18.1.2").for_zones(&[ZONE])),
                ],
                frontends: vec![
                    ("198.18.0.1:30081/tcp", NodePort, vec!["198.18.1.1:8081"]),
                    ("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.1.2:8080"]),
                    ("198.19.0.10:81/tcp", ClusterIp, vec!["198.18.1.2:8081"]),
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn the_node_objects_zone_label_wins_over_the_configured_zone() {
        let mut model = Model::default();
        model
            .insert_service(svc("default/web", "198.19.0.10").port("http", 80, "TCP").0)
            .unwrap();
        model
            .insert_endpoint_slice(
                slice("default/web-1", "web")
                    .port(Some("http"), Some(8080), "TCP")
                    .endpoint(ep("198.18.1.1").for_zones(&[ZONE]))
                    .endpoint(ep("198.18.1.2").for_zones(&["zone-b"]))
                    .0,
            )
            .unwrap();
        let backends_with = |model: &Model| -> Vec<String> {
            plan(model, &node())
                .desired
                .frontends
                .values()
                .next()
                .unwrap()
                .backends
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(backends_with(&model), ["198.18.1.1:8080"]);
        model.set_node_labels([(ZONE_LABEL.to_owned(), "zone-b".to_owned())].into());
        assert_eq!(backends_with(&model), ["198.18.1.2:8080"]);
        // A Node without the label: no zone, so zone hints are ignored.
        model.set_node_labels([("kubernetes.io/hostname".to_owned(), NODE.to_owned())].into());
        assert_eq!(
            backends_with(&model),
            ["198.18.1.1:8080", "198.18.1.2:8080"]
        );
    }

    #[test]
    fn session_affinity_applies_to_every_frontend_of_the_service() {
        let web = || {
            svc("default/web", "198.19.0.10")
                .node_port("http", 80, 30080)
                .service_type("NodePort")
        };
        let affinity_of = |service: Svc| -> Vec<Option<Duration>> {
            let mut model = Model::default();
            model.insert_service(service.0).unwrap();
            model.insert_endpoint_slice(web_slice().0).unwrap();
            let planned = plan(&model, &node());
            planned
                .desired
                .frontends
                .values()
                .map(|plan| plan.session_affinity)
                .collect()
        };
        let three_hours = Some(DEFAULT_AFFINITY_TIMEOUT);
        let cases = [
            ("no affinity", web(), [None, None]),
            ("None", web().session_affinity("None"), [None, None]),
            (
                "ClientIP without a timeout: 10800 s",
                web().client_ip_affinity(None),
                [three_hours; 2],
            ),
            (
                "ClientIP with a timeout",
                web().client_ip_affinity(Some(2)),
                [Some(Duration::from_secs(2)); 2],
            ),
            (
                "a timeout the API would refuse: the default",
                web().client_ip_affinity(Some(86_401)),
                [three_hours; 2],
            ),
        ];
        for (name, service, expected) in cases {
            assert_eq!(affinity_of(service), expected, "{name}");
        }
    }

    #[test]
    fn serving_addresses_ignore_policy_and_topology() {
        let mut model = Model::default();
        model
            .insert_service(
                svc("default/dns", "198.19.0.53")
                    .port("dns", 53, "UDP")
                    .internal_traffic_policy("Local")
                    .0,
            )
            .unwrap();
        model
            .insert_endpoint_slice(
                slice("default/dns-1", "dns")
                    .port(Some("dns"), Some(5353), "UDP")
                    .endpoint(ep("198.18.1.1").on_node(NODE).for_zones(&[ZONE]))
                    .endpoint(ep("198.18.1.2").on_node("node-b").for_zones(&["zone-b"]))
                    .endpoint(ep("198.18.1.3").serving_terminating())
                    .endpoint(ep("198.18.1.4").not_ready())
                    .0,
            )
            .unwrap();
        let planned = plan(&model, &node());
        let dns = &planned.desired.frontends.values().next().unwrap();
        assert_eq!(rendered(dns), ["198.18.1.1:5353"]);
        let serving: Vec<String> = dns.serving_addrs.iter().map(ToString::to_string).collect();
        assert_eq!(serving, ["198.18.1.1", "198.18.1.2", "198.18.1.3"]);
    }

    #[test]
    fn health_checks_count_distinct_local_ready_addresses() {
        // Two ports, so 198.18.1.1 appears twice and counts once, as in kube-proxy.
        let lb = || {
            svc("default/lb", "198.19.0.20")
                .node_port("http", 80, 30080)
                .node_port("https", 443, 30443)
                .service_type("LoadBalancer")
        };
        let slices = vec![
            slice("default/lb-1", "lb")
                .port(Some("http"), Some(8080), "TCP")
                .port(Some("https"), Some(8443), "TCP")
                .endpoint(ep("198.18.1.1").on_node(NODE))
                .endpoint(ep("198.18.1.2").on_node(NODE).serving_terminating())
                .endpoint(ep("198.18.1.3").on_node(NODE).not_ready())
                .endpoint(ep("198.18.1.4").on_node("node-b")),
        ];
        // (node port, local endpoints)
        type Expected = Option<(u16, usize)>;
        let cases: [(&str, Svc, Expected); 5] = [
            (
                "Local with a port: ready local addresses, terminating and not-ready ones left out",
                lb().external_traffic_policy("Local")
                    .health_check_node_port(32000),
                Some((32000, 1)),
            ),
            (
                "Cluster policy: no health check",
                lb().health_check_node_port(32000),
                None,
            ),
            (
                "Local without a port: none",
                lb().external_traffic_policy("Local"),
                None,
            ),
            (
                "port out of range: none",
                lb().external_traffic_policy("Local")
                    .health_check_node_port(70000),
                None,
            ),
            (
                "publishNotReadyAddresses makes every local endpoint ready",
                lb().external_traffic_policy("Local")
                    .health_check_node_port(32000)
                    .publish_not_ready_addresses(),
                Some((32000, 3)),
            ),
        ];
        for (name, service, expected) in cases {
            let mut model = Model::default();
            model.insert_service(service.0).unwrap();
            for slice in &slices {
                model.insert_endpoint_slice(slice.0.clone()).unwrap();
            }
            let planned = plan(&model, &node());
            let check = planned
                .health_checks
                .get(&ObjectKey::new("default", "lb"))
                .map(|check| (check.node_port, check.local_endpoints));
            assert_eq!(check, expected, "{name}");
        }
    }

    #[test]
    fn source_ranges_restrict_load_balancer_ips_only() {
        let mut model = Model::default();
        model
            .insert_service(
                svc("default/web", "198.19.0.10")
                    .node_port("http", 80, 30080)
                    .service_type("LoadBalancer")
                    .ingress(Some("198.18.8.1"), None)
                    .load_balancer_source_ranges(&[
                        "198.18.0.0/24",
                        " 10.1.2.3/8 ",
                        "fd00::/8",
                        "not-a-cidr",
                        "198.18.0.0/24",
                    ])
                    .0,
            )
            .unwrap();
        model.insert_endpoint_slice(web_slice().0).unwrap();
        let planned = plan(&model, &node());
        for (frontend, plan) in &planned.desired.frontends {
            let ranges: Vec<String> = plan.source_ranges.iter().map(ToString::to_string).collect();
            let expected: &[&str] = if plan.kind == FrontendKind::LoadBalancer {
                // Trimmed, truncated to the network, sorted, deduplicated; IPv6 and junk
                // left out as kube-proxy does.
                &["10.0.0.0/8", "198.18.0.0/24"]
            } else {
                &[]
            };
            assert_eq!(ranges, expected, "{frontend}");
        }
        assert_eq!(planned.desired.frontends.len(), 3);
    }
}
