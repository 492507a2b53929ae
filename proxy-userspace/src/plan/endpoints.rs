//! A Service port's endpoints: merged across the Service's slices with their target ports
//! resolved (kube-proxy's `EndpointSliceCache`), then sorted into the backends of each
//! traffic policy (`CategorizeEndpoints`: ready ones, else serving-and-terminating ones;
//! `Local` keeps this node's; topology hints narrow the Cluster set).

use foldhash::{HashMap, HashMapExt};
use std::collections::hash_map::Entry;
use std::net::IpAddr;

use super::BackendAddr;
use crate::model::{EndpointRecord, Protocol, SliceRecord};

/// What endpoint selection needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NodeIdentity {
    pub node_name: String,
    /// Empty when the node has no zone label: then no zone hint matches, as in kube-proxy.
    pub zone: String,
}

/// One endpoint of a Service port, as its slice describes it.
pub(super) struct PortEndpoint<'a> {
    pub backend: BackendAddr,
    pub record: &'a EndpointRecord,
}

impl PortEndpoint<'_> {
    fn ready(&self) -> bool {
        self.record.ready
    }

    /// Still serving while shutting down: kube-proxy's fallback when nothing is ready.
    fn serving_terminating(&self) -> bool {
        self.record.serving && self.record.terminating
    }

    /// Whether the endpoint runs on this node (never, while the node's name is unknown).
    pub fn is_on(&self, node_name: &str) -> bool {
        !node_name.is_empty() && self.record.node_name.as_deref() == Some(node_name)
    }

    fn hinted_for_zone(&self, zone: &str) -> bool {
        self.record.zone_hints().iter().any(|hint| **hint == *zone)
    }

    fn hinted_for_node(&self, node_name: &str) -> bool {
        self.record
            .node_hints()
            .iter()
            .any(|hint| **hint == *node_name)
    }
}

/// The endpoints of the slice port `port_name`/`protocol` across all the Service's slices
/// (`None`: a protocol we don't proxy), one per address:port. Each slice resolves the
/// target port itself: its port with the same name and protocol. An unset slice port name
/// counts as "" (what the EndpointSlice controller writes for an unnamed Service port), so
/// hand-written slices for single-port Services need no name.
///
/// An address:port listed twice (an endpoint moving between slices, or a pod's address
/// reused while the old pod is still terminating) is kept once, as kube-proxy keeps it: a
/// later copy replaces an earlier one unless it is terminating, so a running pod wins over
/// a terminating one. (kube-proxy visits slices in no fixed order; here they come by name.)
/// `publishNotReadyAddresses` is not read: the EndpointSlice controller already writes such
/// Services' endpoints as ready, and kube-proxy does not read it either.
pub(super) fn endpoints_of_port<'a>(
    slices: &[&'a SliceRecord],
    port_name: &str,
    protocol: Option<Protocol>,
) -> Vec<PortEndpoint<'a>> {
    let mut endpoints: Vec<PortEndpoint<'a>> = Vec::new();
    let mut index: HashMap<BackendAddr, usize> = HashMap::new();
    for slice in slices {
        let target_ports = slice
            .ports
            .iter()
            .filter(|port| *port.name == *port_name && port.protocol == protocol)
            .filter_map(|port| port.port);
        for target_port in target_ports {
            for record in &slice.endpoints {
                let backend = BackendAddr {
                    addr: record.addr,
                    port: target_port,
                };
                match index.entry(backend) {
                    Entry::Vacant(entry) => {
                        entry.insert(endpoints.len());
                        endpoints.push(PortEndpoint { backend, record });
                    }
                    Entry::Occupied(entry) if !record.terminating => {
                        endpoints[*entry.get()].record = record;
                    }
                    Entry::Occupied(_) => {}
                }
            }
        }
    }
    endpoints
}

/// Distinct addresses of this node's ready endpoints over every port of `slices` (the
/// Service's slices of one family; kube-proxy's `LocalReadyEndpoints`, which counts whatever its endpoints map
/// holds for the Service, ports the Service does not list included): what a
/// healthCheckNodePort reports. Terminating endpoints do not count, so a node whose pods
/// are shutting down fails the probe first.
pub(super) fn local_ready_addresses(slices: &[&SliceRecord], node_name: &str) -> usize {
    let mut ports: Vec<(&str, Option<Protocol>)> = slices
        .iter()
        .flat_map(|slice| &slice.ports)
        .filter(|port| port.port.is_some())
        .map(|port| (&*port.name, port.protocol))
        .collect();
    ports.sort();
    ports.dedup();
    let mut addresses: Vec<IpAddr> = ports
        .into_iter()
        .flat_map(|(name, protocol)| endpoints_of_port(slices, name, protocol))
        .filter(|endpoint| endpoint.ready() && endpoint.is_on(node_name))
        .map(|endpoint| endpoint.backend.addr)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses.len()
}

/// A Service port's endpoints sorted for its frontends: kube-proxy's `CategorizeEndpoints`.
pub(super) struct Categorized {
    /// For traffic policy Cluster: the ready endpoints (narrowed by topology hints when they
    /// apply), else the serving-and-terminating ones.
    pub cluster: Vec<BackendAddr>,
    /// For traffic policy Local: this node's ready endpoints, else its serving-and-terminating
    /// ones. Topology hints do not apply.
    pub local: Vec<BackendAddr>,
    /// Whether any endpoint anywhere is ready or serving-and-terminating: an empty frontend
    /// then drops (its policy left nothing here) rather than rejects.
    pub has_usable_endpoints: bool,
    /// See [`super::FrontendPlan::serving_addrs`].
    pub serving_addrs: Vec<IpAddr>,
}

pub(super) fn categorize(endpoints: &[PortEndpoint<'_>], node: &NodeIdentity) -> Categorized {
    let topology = Topology::from_hints(endpoints, node);
    let mut cluster = backends_where(endpoints, |endpoint| {
        endpoint.ready() && topology.admits(endpoint, node)
    });
    // Topology is only used when it leaves a ready endpoint, so an empty set here means
    // nothing is ready anywhere.
    if cluster.is_empty() {
        cluster = backends_where(endpoints, |endpoint| endpoint.serving_terminating());
    }
    let is_local = |endpoint: &PortEndpoint<'_>| endpoint.is_on(&node.node_name);
    let mut local = backends_where(endpoints, |endpoint| is_local(endpoint) && endpoint.ready());
    if local.is_empty() {
        local = backends_where(endpoints, |endpoint| {
            is_local(endpoint) && endpoint.serving_terminating()
        });
    }
    // Ready endpoints count as serving even when a hand-written slice says otherwise: the
    // cleanup must never cut flows to a backend that is still in use.
    let mut serving_addrs: Vec<IpAddr> = endpoints
        .iter()
        .filter(|endpoint| endpoint.record.serving || endpoint.ready())
        .map(|endpoint| endpoint.backend.addr)
        .collect();
    serving_addrs.sort();
    serving_addrs.dedup();
    Categorized {
        cluster,
        local,
        has_usable_endpoints: endpoints
            .iter()
            .any(|endpoint| endpoint.ready() || endpoint.serving_terminating()),
        serving_addrs,
    }
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
    fn from_hints(endpoints: &[PortEndpoint<'_>], node: &NodeIdentity) -> Self {
        let ready: Vec<&PortEndpoint<'_>> = endpoints
            .iter()
            .filter(|endpoint| endpoint.ready())
            .collect();
        let all_ready = |has: fn(&EndpointRecord) -> bool| {
            !ready.is_empty() && ready.iter().all(|endpoint| has(endpoint.record))
        };
        if all_ready(|record| !record.node_hints().is_empty())
            && ready
                .iter()
                .any(|endpoint| endpoint.hinted_for_node(&node.node_name))
        {
            Topology::SameNode
        } else if all_ready(|record| !record.zone_hints().is_empty())
            && ready
                .iter()
                .any(|endpoint| endpoint.hinted_for_zone(&node.zone))
        {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    fn admits(self, endpoint: &PortEndpoint<'_>, node: &NodeIdentity) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameZone => endpoint.hinted_for_zone(&node.zone),
            Topology::SameNode => endpoint.hinted_for_node(&node.node_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};
    use super::super::testing::*;
    use super::super::*;
    use crate::model::Model;

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
            // kube-proxy keeps one endpoint per address:port; a later copy replaces an
            // earlier one unless it is terminating (slices come here in name order;
            // kube-proxy's order is a Go map's, so with two running copies it is open).
            Case {
                name: "an address in two slices: the running copy wins over the terminating one",
                services: vec![web()],
                slices: vec![
                    slice("default/web-a", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").serving_terminating()),
                    slice("default/web-b", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").not_ready()),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
                ..Case::default()
            },
            Case {
                name: "an address in two slices: a terminating copy never replaces a running one",
                services: vec![web()],
                slices: vec![
                    slice("default/web-a", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1"))
                        .endpoint(ep("198.18.1.2").serving_terminating()),
                    slice("default/web-b", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").serving_terminating()),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.1.1:8080"])],
                ..Case::default()
            },
            Case {
                name: "an address in two slices, both running: the later slice's copy",
                services: vec![web()],
                slices: vec![
                    slice("default/web-a", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1"))
                        .endpoint(ep("198.18.1.2").not_ready()),
                    slice("default/web-b", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").not_ready())
                        .endpoint(ep("198.18.1.2")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.1.2:8080"])],
                ..Case::default()
            },
            Case {
                name: "the same address on another target port is another endpoint",
                services: vec![web()],
                slices: vec![
                    web_slice(),
                    slice("default/web-b", "web")
                        .port(Some("http"), Some(8081), "TCP")
                        .endpoint(ep("198.18.1.1").not_ready()),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
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
                "publishNotReadyAddresses is not read (the controller marks such endpoints \
                 ready): a not-ready endpoint stays unusable",
                web().publish_not_ready_addresses(),
                vec![
                    ep("198.18.1.1").not_ready(),
                    ep("198.18.1.2").conditions(false, false, true),
                ],
                vec![REJECTS],
            ),
            case(
                "publishNotReadyAddresses with the controller's ready endpoints",
                web().publish_not_ready_addresses(),
                vec![
                    ep("198.18.1.1").conditions(true, true, false),
                    ep("198.18.1.2"),
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
                name: "externalIPs of a ClusterIP Service follow externalTrafficPolicy=Local",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .external_ips(&["198.18.9.1"])
                        .external_traffic_policy("Local"),
                ],
                slices: slices(),
                frontends: vec![
                    ("198.18.9.1:80/tcp", ExternalIp, local.clone()),
                    ("198.19.0.10:80/tcp", ClusterIp, all.clone()),
                ],
                ..Case::default()
            },
            Case {
                // kube-proxy's ExternalPolicyLocal: only NodePort and LoadBalancer Services
                // and those with externalIPs have an external policy; a leftover ingress
                // status on a ClusterIP Service gets the Cluster endpoints.
                name: "a ClusterIP Service's load-balancer status ignores externalTrafficPolicy",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .ingress(Some("198.18.8.1"), None)
                        .external_traffic_policy("Local"),
                ],
                slices: slices(),
                frontends: vec![
                    ("198.18.8.1:80/tcp", LoadBalancer, all.clone()),
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
                name: "internalTrafficPolicy=Local ignores hints: this node's endpoints",
                services: vec![web().internal_traffic_policy("Local")],
                slices: vec![
                    slice("default/web-1", "web")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.1").for_zones(&["zone-b"]).on_node(NODE))
                        .endpoint(ep("198.18.1.2").for_zones(&[ZONE]).on_node("node-b")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.1.1:8080"])],
                ..Case::default()
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
}
