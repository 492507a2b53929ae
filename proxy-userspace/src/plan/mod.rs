//! Plan: pure functions from the model and the node's facts to the desired datapath
//! contents, expressed in Kubernetes terms (frontends and their backends). The map writer
//! turns this into map entries; nothing here touches the kernel.
//!
//! The rules are kube-proxy's, so a cluster behaves the same with either proxy, one file a
//! concept as in kube-proxy: which frontends a Service port gets ([`service_port`]:
//! `newBaseServiceInfo`, session affinity, source ranges, the health check), how a Service
//! port's endpoints merge across slices and which are usable ([`endpoints`]:
//! `EndpointSliceCache`, `CategorizeEndpoints`, topology hints, what an empty frontend does,
//! which endpoints count as serving for the UDP conntrack cleanup), who owns a frontend two
//! Services claim ([`claims`]: the first by `namespace/name`), and how a change reaches the
//! maps ([`incremental`]: only the Services the model marked dirty are re-planned, and the
//! frontends whose plan changed come out as a delta).
//!
//! Which Services are proxied at all, and what a Service or a slice says, is decided once
//! when it enters the model (`crate::model`).
//!
//! Topology follows the current kube-proxy: it reads only the hints in the EndpointSlices.
//! The `service.kubernetes.io/topology-mode` annotation and `spec.trafficDistribution`
//! (PreferClose, PreferSameZone, PreferSameNode) are read by the EndpointSlice controller,
//! which writes `hints.forZones` / `hints.forNodes` accordingly.

mod claims;
mod endpoints;
mod incremental;
pub mod maglev;
mod service_port;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use crate::model::selection::{Algorithm, Selection, SelectionDefaults};
pub use crate::model::{
    DEFAULT_AFFINITY_TIMEOUT, Family, HEADLESS_LABEL, Problem, Protocol, SERVICE_PROXY_NAME_LABEL,
};
use crate::model::{Model, ObjectKey};
pub use incremental::{FrontendChange, PlanDelta, Planner};

/// What the planner needs to know about the node it runs on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub node_name: String,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for topology hints. Used
    /// while the model knows no Node labels (the manifests source: `--node-zone`); once it
    /// does (the Kubernetes source), the Node's own label decides, as in kube-proxy.
    pub zone: Option<String>,
    /// Every address of the node of both families, loopback included, IPv6 link-local
    /// ones left out (read with rtnetlink).
    pub addresses: Vec<IpAddr>,
    /// The CIDRs of `--nodeport-addresses` of both families (kube-proxy's flag of the same
    /// name, its `primary` keyword resolved). Each family is filtered by its own CIDRs
    /// only: a family without any opens NodePorts on every node address of that family.
    pub nodeport_cidrs: Vec<IpNet>,
    /// How external frontends choose backends unless their Service's annotations say
    /// otherwise (`--lb-algorithm`, `--maglev-table-size`).
    pub selection: SelectionDefaults,
    /// Whether NodePorts open on the node's loopback addresses too (`localhost:NodePort`,
    /// as kube-proxy's iptables mode opens them): only the socket programs serve those,
    /// since no packet to a loopback address ever passes a tc program — so only with
    /// `--socket-lb`.
    pub loopback_node_ports: bool,
}

impl NodeFacts {
    /// The addresses NodePorts open on in the datapath, both families: the node's
    /// addresses, or, in a family that has `nodeport_cidrs`, those inside them; IPv4
    /// loopback ones only with `loopback_node_ports`, IPv6 loopback never (kube-proxy's
    /// `localhost:NodePort` is IPv4 only: `route_localnet` has no IPv6 counterpart).
    /// Sorted (IPv4 first), without duplicates.
    pub fn node_port_addresses(&self) -> Vec<IpAddr> {
        self.addresses_in_nodeport_cidrs()
            .into_iter()
            .filter(|addr| match addr {
                IpAddr::V4(addr) => self.loopback_node_ports || !addr.is_loopback(),
                IpAddr::V6(addr) => !addr.is_loopback(),
            })
            .collect()
    }

    /// Where healthCheckNodePorts listen, as kube-proxy's service health server of each
    /// family: the family's every address (`0.0.0.0`; `::` once the node has an IPv6
    /// address other than loopback: a dual-stack node) unless its `nodeport_cidrs` narrow them (and do not contain a `/0`), then
    /// the node's addresses inside them, loopback included. Empty when no node address is
    /// inside the CIDRs.
    pub fn health_check_addresses(&self) -> Vec<IpAddr> {
        let mut addresses = Vec::new();
        let unspecified = [
            (Family::Ipv4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            (Family::Ipv6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        ];
        for (family, any) in unspecified {
            let mut cidrs = self.family_cidrs(family).peekable();
            let match_all = cidrs.peek().is_none() || cidrs.any(|cidr| cidr.prefix_len() == 0);
            let served = family == Family::Ipv4
                || (self.addresses.iter())
                    .any(|addr| Family::of(*addr) == family && !addr.is_loopback());
            if match_all && served {
                addresses.push(any);
            } else if !match_all {
                addresses.extend(
                    (self.addresses_in_nodeport_cidrs().into_iter())
                        .filter(|addr| Family::of(*addr) == family),
                );
            }
        }
        addresses
    }

    fn family_cidrs(&self, family: Family) -> impl Iterator<Item = &IpNet> {
        (self.nodeport_cidrs.iter()).filter(move |cidr| Family::of_net(cidr) == family)
    }

    fn addresses_in_nodeport_cidrs(&self) -> Vec<IpAddr> {
        let mut addresses: Vec<IpAddr> = self
            .addresses
            .iter()
            .copied()
            .filter(|addr| {
                let mut cidrs = self.family_cidrs(Family::of(*addr)).peekable();
                cidrs.peek().is_none() || cidrs.any(|cidr| cidr.contains(addr))
            })
            .collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }
}

/// An address the datapath answers for: `addr:port/proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

/// `198.19.0.10:80/tcp`, `[2001:db8::10]:80/tcp`.
impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let socket = SocketAddr::new(self.addr, self.port);
        write!(f, "{socket}/{}", self.protocol.as_str())
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

/// `namespace/name:portname`: the identity kube-proxy hashes into chain names. Shares its
/// strings with the model's records.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The Service port's name; empty for an unnamed single port.
    pub port_name: Arc<str>,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// A backend: an endpoint address and the resolved target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
}

/// `198.18.1.1:8080`, `[2001:db8::1]:8080`.
impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.addr, self.port).fmt(f)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub service: ServicePortName,
    pub kind: FrontendKind,
    /// Sorted and deduplicated, of the frontend's family. Empty means no endpoint is
    /// usable for this frontend.
    pub backends: Vec<BackendAddr>,
    /// An external frontend (NodePort, externalIP, load-balancer IP) of a Service with
    /// `externalTrafficPolicy: Local`: the Service port's Cluster endpoints (sorted), which
    /// new connections from pods of this node use instead of `backends`, as kube-proxy's
    /// KUBE-EXT chain sends pod traffic to KUBE-SVC ("pod traffic for … external
    /// destinations"), unmasqueraded. `None` for every other frontend: one set for all.
    pub cluster_backends: Option<Vec<BackendAddr>>,
    /// What a new connection gets while `backends` is empty.
    pub when_empty: EmptyFrontend,
    /// `sessionAffinity: ClientIP`: how long a client keeps its backend after its last new
    /// connection. `None`: every new connection is balanced anew.
    pub session_affinity: Option<Duration>,
    /// Addresses of the Service port's serving endpoints, whatever the traffic policy and
    /// topology (sorted, deduplicated): the writer marks them in MEMBERSHIP, and the
    /// datapath moves UDP flows and unanswered TCP connections to any other address onto a
    /// serving endpoint (kube-proxy's conntrack cleanup clears such flows).
    pub serving_addrs: Vec<IpAddr>,
    /// The sources a load-balancer frontend admits (sorted): its Service's
    /// `loadBalancerSourceRanges` of the frontend's family, plus each of its load-balancer IPs when a range holds
    /// the node's address (kube-proxy's `allowFromNode`); new connections from other
    /// clients are dropped. Empty: no restriction (other kinds, no ranges, or a Service
    /// without endpoints, which refuses everyone).
    pub source_ranges: Vec<IpNet>,
    /// How a new connection's backend is chosen (after session affinity). External
    /// frontends follow their Service's annotations or the node's flags; a ClusterIP's
    /// traffic starts on the node that balances it, so it always chooses at random, as
    /// kube-proxy does.
    pub selection: Selection,
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

/// The Node label that names the node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The whole desired datapath state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// Both families; IPv4 frontends sort first.
    pub frontends: BTreeMap<Frontend, FrontendPlan>,
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

/// The planner's output from scratch: what the datapath should do, and what it can't be
/// asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub desired: DesiredState,
    /// The health-check servers to run: one per Service with `externalTrafficPolicy: Local`
    /// and a `healthCheckNodePort` (kube-proxy's `ServiceHealthServer`).
    pub health_checks: BTreeMap<ObjectKey, ServiceHealthCheck>,
    /// Ordered by Service, e.g. `default/foo port sctp-port: SCTP is not supported, skipped`.
    pub problems: Vec<Problem>,
}

/// Plans every frontend of every proxied Service from scratch: what a full sync programs.
/// When two Services claim the same frontend the first by `namespace/name` keeps it, the
/// same on every run and after any sequence of changes.
pub fn plan(model: &Model, node: &NodeFacts) -> Planned {
    let mut planner = Planner::new(node, model);
    planner.update_all(model);
    Planned {
        desired: planner.desired().clone(),
        health_checks: planner.health_checks().clone(),
        problems: planner.problems(),
    }
}
