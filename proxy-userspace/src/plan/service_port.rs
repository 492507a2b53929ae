//! One Service's frontends: for each Service port, its ClusterIP, a NodePort on each node
//! address, its external and load-balancer IPs (kube-proxy's `newBaseServiceInfo`), each
//! with the backends of its traffic policy, what it does while empty, session affinity and
//! source ranges; and the Service's health check. A Service is planned on its own: which
//! Service keeps a frontend that two claim is decided in [`super::claims`].

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use tracing::debug;

use super::claims::conflict;
use super::endpoints::{NodeIdentity, categorize, endpoints_of_port, local_ready_addresses};
use super::{
    BackendAddr, EmptyFrontend, Frontend, FrontendKind, FrontendPlan, Selection, SelectionDefaults,
    ServiceHealthCheck, ServicePortName,
};
use crate::model::service::port_number;
use crate::model::{
    Family, ObjectKey, PortRecord, Problem, ProblemKind, Protocol, ProxiedService, ServiceRecord,
    SliceRecord,
};

/// What planning needs to know about the node, beyond a Service's own objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct NodeContext {
    pub identity: NodeIdentity,
    /// Where NodePorts open, both families (see [`super::NodeFacts::node_port_addresses`]).
    pub node_port_addresses: Vec<IpAddr>,
    /// The node's address of each family as kube-proxy's source-range rule sees it (its
    /// `nodeIP`): the Node's primary address of the family when known, else each of the
    /// node's addresses of the family.
    pub source_range_node_ips: Vec<IpAddr>,
    /// The node's `--lb-algorithm` and `--maglev-table-size`.
    pub selection: SelectionDefaults,
}

/// One Service's plan, before other Services' claims are considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServicePlan {
    /// Its frontends in claim order, each once: when two of its ports name the same
    /// frontend, the first keeps it.
    pub frontends: Vec<(Frontend, FrontendPlan)>,
    pub health_check: Option<ServiceHealthCheck>,
    pub problems: Vec<Problem>,
}

/// Plans one Service from its record and its slices (a Service without a record plans
/// nothing: its slices wait for it). Each family the Service has a clusterIP of gets its
/// own frontends, with the endpoints of that family's slices only, its NodePorts on the
/// node addresses of that family, its externalIPs and load-balancer IPs of that family, and
/// that family's source ranges — kube-proxy's one proxier per family.
pub(super) fn plan_service<'a>(
    key: &ObjectKey,
    record: Option<&ServiceRecord>,
    slices: impl Iterator<Item = &'a SliceRecord>,
    node: &NodeContext,
) -> ServicePlan {
    let mut plan = ServicePlan::default();
    let service = match record {
        None => return plan,
        Some(ServiceRecord::Proxied(service)) => service,
        Some(ServiceRecord::Ignored(reason)) => {
            debug!(service = %key, %reason, "service not proxied");
            return plan;
        }
        Some(ServiceRecord::Problem(problem)) => {
            plan.problems.push(problem.clone());
            return plan;
        }
    };
    plan.problems.extend(service.skipped_fields.iter().cloned());
    let slices: Vec<&SliceRecord> = slices.collect();
    let families: Vec<FamilyPart> = (service.cluster_ips.iter())
        .map(|&cluster_ip| {
            let family = Family::of(cluster_ip);
            FamilyPart {
                cluster_ip,
                slices: (slices.iter().copied())
                    .filter(|slice| slice.family == Some(family))
                    .collect(),
                source_ranges: admitted_sources(service, family, &node.source_range_node_ips),
            }
        })
        .collect();
    for port in &service.ports {
        let Some(numbers) = plan.port_numbers(key, service, port) else {
            continue;
        };
        for part in &families {
            plan.add_service_port(key, service, port, numbers, part, node);
        }
    }
    if let Some(node_port) = service.health_check_node_port {
        let local_endpoints = (families.iter())
            .map(|part| local_ready_addresses(&part.slices, &node.identity.node_name))
            .max()
            .unwrap_or_default();
        plan.health_check = Some(ServiceHealthCheck {
            node_port,
            local_endpoints,
        });
    }
    plan
}

/// What a Service's frontends of one family are planned from.
struct FamilyPart<'a> {
    cluster_ip: IpAddr,
    /// The Service's slices of this family.
    slices: Vec<&'a SliceRecord>,
    /// The sources its load-balancer IPs of this family admit.
    source_ranges: Vec<IpNet>,
}

/// A Service port's numbers, checked once for every family.
#[derive(Clone, Copy)]
struct PortNumbers {
    protocol: Protocol,
    port: u16,
    /// The NodePort, when the Service exposes one and it is in range.
    node_port: Option<u16>,
}

/// The sources a load-balancer IP of the Service of `family` admits: its
/// `loadBalancerSourceRanges` of that family (`MapCIDRsByIPFamily`: another family's ranges
/// restrict nothing here) and, when one of them holds the node's address, each of its
/// load-balancer IPs of the family too —
/// kube-proxy's KUBE-FW rule for VIP-style load balancers whose IP is configured on the
/// nodes, where a node's request to the IP loops back with the IP as its source
/// (`allowFromNode`). A load-balancer IP a range already holds is not added again (one
/// entry fewer in the datapath's trie, the same answers). Empty: no restriction.
fn admitted_sources(service: &ProxiedService, family: Family, node_ips: &[IpAddr]) -> Vec<IpNet> {
    let ranges: Vec<IpNet> = (service.source_ranges.iter().copied())
        .filter(|range| Family::of_net(range) == family)
        .collect();
    let allow_from_node = ranges
        .iter()
        .any(|range| node_ips.iter().any(|ip| range.contains(ip)));
    if !allow_from_node {
        return ranges;
    }
    let uncovered = (service.load_balancer_ips.iter())
        .filter(|ip| Family::of(**ip) == family)
        .filter(|ip| !ranges.iter().any(|range| range.contains(*ip)))
        .map(|&ip| IpNet::from(ip));
    let mut admitted: Vec<IpNet> = ranges.iter().copied().chain(uncovered).collect();
    admitted.sort();
    admitted
}

impl ServicePlan {
    /// The protocol, port and NodePort of a Service port; `None` (reported) when it can't
    /// be programmed at all.
    fn port_numbers(
        &mut self,
        key: &ObjectKey,
        service: &ProxiedService,
        port: &PortRecord,
    ) -> Option<PortNumbers> {
        // Written only for a problem: every Service port of a full sync passes here.
        let context = || {
            if port.name.is_empty() {
                format!("{key} port {}", port.port)
            } else {
                format!("{key} port {}", port.name)
            }
        };
        let protocol = match &port.protocol {
            Ok(protocol) => *protocol,
            Err(reason) => {
                self.problem(
                    "unsupported_protocol",
                    format!("{}: {reason}, skipped", context()),
                );
                return None;
            }
        };
        let Some(service_port) = port_number(port.port) else {
            self.problem(
                "out_of_range",
                format!("{}: port {} is out of range, skipped", context(), port.port),
            );
            return None;
        };
        let node_port = port
            .node_port
            .filter(|&node_port| node_port != 0 && service.exposes_node_ports);
        let node_port = node_port.and_then(|node_port| {
            let number = port_number(node_port);
            if number.is_none() {
                self.problem(
                    "out_of_range",
                    format!(
                        "{}: nodePort {node_port} is out of range, NodePort skipped",
                        context()
                    ),
                );
            }
            number
        });
        Some(PortNumbers {
            protocol,
            port: service_port,
            node_port,
        })
    }

    /// Plans the frontends of one Service port in one family.
    fn add_service_port(
        &mut self,
        key: &ObjectKey,
        service: &ProxiedService,
        port: &PortRecord,
        numbers: PortNumbers,
        part: &FamilyPart<'_>,
        node: &NodeContext,
    ) {
        let family = Family::of(part.cluster_ip);
        let protocol = numbers.protocol;
        let endpoints = endpoints_of_port(&part.slices, &port.name, Some(protocol));
        let categorized = categorize(&endpoints, &node.identity);
        // Without endpoints anywhere every frontend refuses, load-balancer IPs included:
        // kube-proxy's REJECT comes before its source-range firewall, which it only sets
        // up for a Service with endpoints.
        let source_ranges = if categorized.has_usable_endpoints {
            part.source_ranges.clone()
        } else {
            Vec::new()
        };
        let for_policy =
            |local: bool, cluster_for_pods: bool, selection: Selection| FrontendTemplate {
                service: ServicePortName {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    port_name: port.name.clone(),
                },
                backends: if local {
                    categorized.local.clone()
                } else {
                    categorized.cluster.clone()
                },
                cluster_backends: cluster_for_pods.then(|| categorized.cluster.clone()),
                when_empty: if categorized.has_usable_endpoints {
                    EmptyFrontend::Drop
                } else {
                    EmptyFrontend::Reject
                },
                session_affinity: service.session_affinity,
                serving_addrs: categorized.serving_addrs.clone(),
                source_ranges: source_ranges.clone(),
                selection,
            };
        let internal = for_policy(service.internal_policy_local, false, Selection::Random);
        // Pods reach an externalTrafficPolicy Local frontend's Cluster endpoints.
        let external = for_policy(
            service.external_policy_local,
            service.external_policy_local,
            service.selection.resolve(node.selection),
        );
        let frontend = |addr| Frontend {
            addr,
            port: numbers.port,
            protocol,
        };
        let of_family = |addr: &&IpAddr| Family::of(**addr) == family;

        self.claim(
            frontend(part.cluster_ip),
            &internal,
            FrontendKind::ClusterIp,
        );
        if let Some(node_port) = numbers.node_port {
            for &addr in node.node_port_addresses.iter().filter(of_family) {
                let frontend = Frontend {
                    addr,
                    port: node_port,
                    protocol,
                };
                self.claim(frontend, &external, FrontendKind::NodePort);
            }
        }
        for &addr in service.external_ips.iter().filter(of_family) {
            self.claim(frontend(addr), &external, FrontendKind::ExternalIp);
        }
        for &addr in service.load_balancer_ips.iter().filter(of_family) {
            self.claim(frontend(addr), &external, FrontendKind::LoadBalancer);
        }
    }

    fn problem(&mut self, reason: &'static str, message: String) {
        self.problems
            .push(Problem::new(ProblemKind::Service, reason, message));
    }

    /// Takes `frontend` for the template's Service port unless another port of this
    /// Service has it already.
    fn claim(&mut self, frontend: Frontend, template: &FrontendTemplate, kind: FrontendKind) {
        let service = &template.service;
        match self.frontends.iter().find(|(taken, _)| *taken == frontend) {
            None => self.frontends.push((
                frontend,
                FrontendPlan {
                    service: service.clone(),
                    kind,
                    backends: template.backends.clone(),
                    cluster_backends: template.cluster_backends.clone(),
                    when_empty: template.when_empty,
                    session_affinity: template.session_affinity,
                    serving_addrs: template.serving_addrs.clone(),
                    // Only load-balancer IPs are restricted, as in kube-proxy.
                    source_ranges: if kind == FrontendKind::LoadBalancer {
                        template.source_ranges.clone()
                    } else {
                        Vec::new()
                    },
                    selection: template.selection,
                },
            )),
            // The same Service port naming an address twice (an externalIP that is also its
            // load balancer's) is redundant, not a conflict.
            Some((_, owner)) if owner.service == *service => {}
            Some((_, owner)) => {
                let problem = conflict(service, frontend, kind, &owner.service, owner.kind);
                self.problems.push(problem);
            }
        }
    }
}

/// A [`FrontendPlan`] without its kind: what every frontend of one traffic policy
/// (internal: the ClusterIP; external: NodePorts, external and load-balancer IPs) shares.
struct FrontendTemplate {
    service: ServicePortName,
    backends: Vec<BackendAddr>,
    cluster_backends: Option<Vec<BackendAddr>>,
    when_empty: EmptyFrontend,
    session_affinity: Option<Duration>,
    serving_addrs: Vec<IpAddr>,
    source_ranges: Vec<IpNet>,
    selection: Selection,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ServicePort;

    use super::super::FrontendKind::{ClusterIp, ExternalIp, LoadBalancer, NodePort};
    use super::super::testing::*;
    use super::super::*;
    use crate::model::{Model, NodeState};

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
                name: "no endpoints: frontend with no backends",
                services: vec![svc("default/web", "198.19.0.10").port("http", 80, "TCP")],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS])],
                ..Case::default()
            },
        ]);
    }

    /// An IPv6 slice of the web Service: `http` → 8080 on two ready pods.
    fn web6_slice() -> Slice {
        slice("default/web-6", "web")
            .address_type("IPv6")
            .port(Some("http"), Some(8080), "TCP")
            .endpoint(ep("2001:db8:1::2"))
            .endpoint(ep("2001:db8:1::1"))
    }

    const WEB6_BACKENDS: [&str; 2] = ["[2001:db8:1::1]:8080", "[2001:db8:1::2]:8080"];

    fn dual_stack_node() -> NodeFacts {
        NodeFacts {
            addresses: vec![
                "198.18.0.1".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "::1".parse().unwrap(),
            ],
            ..node()
        }
    }

    /// The web Service with a ClusterIP of each family, in the order given, over both
    /// slices: each family's ClusterIP gets its family's backends.
    fn dual_stack_web(name: &'static str, cluster_ips: [&str; 2], families: [&str; 2]) -> Case {
        Case {
            name,
            services: vec![
                svc("default/web", cluster_ips[0])
                    .cluster_ips(&cluster_ips)
                    .ip_families(&families)
                    .port("http", 80, "TCP"),
            ],
            slices: vec![web_slice(), web6_slice()],
            frontends: vec![
                ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                (
                    "[2001:db8:ff::10]:80/tcp",
                    ClusterIp,
                    WEB6_BACKENDS.to_vec(),
                ),
            ],
            ..Case::default()
        }
    }

    /// kube-proxy runs one proxier per family: each family the Service has a clusterIP of
    /// gets its own frontends, with that family's endpoints only, NodePorts on the node's
    /// addresses of that family, and that family's externalIPs and load-balancer IPs.
    #[test]
    fn each_family_gets_its_own_frontends_and_endpoints() {
        run(vec![
            dual_stack_web(
                "dual stack: one ClusterIP per family, each with its family's endpoints",
                ["198.19.0.10", "2001:db8:ff::10"],
                ["IPv4", "IPv6"],
            ),
            dual_stack_web(
                "IPv6 first in clusterIPs: the same frontends",
                ["2001:db8:ff::10", "198.19.0.10"],
                ["IPv6", "IPv4"],
            ),
            Case {
                name: "dual stack without IPv6 endpoints: the IPv6 frontend rejects",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .cluster_ips(&["198.19.0.10", "2001:db8:ff::10"])
                        .port("http", 80, "TCP"),
                ],
                slices: vec![web_slice()],
                frontends: vec![
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                    ("[2001:db8:ff::10]:80/tcp", ClusterIp, vec![REJECTS]),
                ],
                ..Case::default()
            },
            Case {
                name: "IPv6 only: IPv4 endpoints are not its own, NodePorts on IPv6 addresses",
                services: vec![
                    svc("default/web", "2001:db8:ff::10")
                        .node_port("http", 80, 30080)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice(), web6_slice()],
                node: dual_stack_node(),
                frontends: vec![
                    ("[2001:db8::1]:30080/tcp", NodePort, WEB6_BACKENDS.to_vec()),
                    (
                        "[2001:db8:ff::10]:80/tcp",
                        ClusterIp,
                        WEB6_BACKENDS.to_vec(),
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "dual stack NodePort, externalIPs and load-balancer IPs per family",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .cluster_ips(&["198.19.0.10", "2001:db8:ff::10"])
                        .node_port("http", 80, 30080)
                        .service_type("LoadBalancer")
                        .external_ips(&["2001:db8:e::1", "198.18.9.1"])
                        .ingress(Some("2001:db8:1b::1"), None)
                        .ingress(Some("198.18.8.1"), None),
                ],
                slices: vec![web_slice(), web6_slice()],
                node: dual_stack_node(),
                frontends: vec![
                    ("198.18.0.1:30080/tcp", NodePort, WEB_BACKENDS.to_vec()),
                    ("198.18.8.1:80/tcp", LoadBalancer, WEB_BACKENDS.to_vec()),
                    ("198.18.9.1:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                    ("[2001:db8::1]:30080/tcp", NodePort, WEB6_BACKENDS.to_vec()),
                    ("[2001:db8:e::1]:80/tcp", ExternalIp, WEB6_BACKENDS.to_vec()),
                    (
                        "[2001:db8:1b::1]:80/tcp",
                        LoadBalancer,
                        WEB6_BACKENDS.to_vec(),
                    ),
                    (
                        "[2001:db8:ff::10]:80/tcp",
                        ClusterIp,
                        WEB6_BACKENDS.to_vec(),
                    ),
                ],
                ..Case::default()
            },
            Case {
                name: "IPv4 only: IPv6 externalIPs and ingress are skipped and reported",
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .service_type("LoadBalancer")
                        .external_ips(&["2001:db8:e::1"])
                        .ingress(Some("2001:db8:1b::1"), None),
                ],
                slices: vec![web_slice(), web6_slice()],
                node: dual_stack_node(),
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                problems: vec![
                    "default/web: spec.externalIPs: 2001:db8:e::1 skipped: the Service has no \
                     clusterIP of their family (kube-proxy's proxier of that family does not \
                     see the Service)",
                    "default/web: status.loadBalancer.ingress: 2001:db8:1b::1 skipped: the \
                     Service has no clusterIP of their family (kube-proxy's proxier of that \
                     family does not see the Service)",
                ],
            },
            Case {
                name: "ipFamilies picks the clusterIPs entry of each family",
                services: vec![
                    svc("default/web", "2001:db8:ff::10")
                        .cluster_ips(&["2001:db8:ff::10"])
                        .ip_families(&["IPv6"])
                        .port("http", 80, "TCP"),
                ],
                slices: vec![web_slice(), web6_slice()],
                frontends: vec![(
                    "[2001:db8:ff::10]:80/tcp",
                    ClusterIp,
                    WEB6_BACKENDS.to_vec(),
                )],
                ..Case::default()
            },
        ]);
    }

    /// Source ranges are per family (`MapCIDRsByIPFamily`): an IPv6 load-balancer IP is
    /// restricted by the IPv6 ranges only, and a family without ranges is open.
    #[test]
    fn source_ranges_are_per_family() {
        let node = dual_stack_node();
        let mut model = Model::default();
        let web = svc("default/web", "198.19.0.10")
            .cluster_ips(&["198.19.0.10", "2001:db8:ff::10"])
            .port("http", 80, "TCP")
            .service_type("LoadBalancer")
            .ingress(Some("198.18.8.1"), None)
            .ingress(Some("2001:db8:1b::1"), None)
            .load_balancer_source_ranges(&["2001:db8:c::/48", "2001:db8::1/128"]);
        model.insert_service(web.0).unwrap();
        model.insert_endpoint_slice(web_slice().0).unwrap();
        model.insert_endpoint_slice(web6_slice().0).unwrap();
        let planned = plan(&model, &node);
        let ranges = |addr: &str| -> Vec<String> {
            let frontend = Frontend {
                addr: addr.parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
            };
            let plan = &planned.desired.frontends[&frontend];
            plan.source_ranges.iter().map(ToString::to_string).collect()
        };
        assert_eq!(
            ranges("198.18.8.1"),
            Vec::<String>::new(),
            "IPv4 stays open"
        );
        // The node's IPv6 address is in a range: the load-balancer IP is admitted too.
        assert_eq!(
            ranges("2001:db8:1b::1"),
            ["2001:db8::1/128", "2001:db8:c::/48", "2001:db8:1b::1/128"]
        );
    }

    /// Addresses and CIDRs written with leading zeros are read as kube-proxy reads them
    /// (`ParseIPSloppy`: decimal), everywhere a Service or slice holds one.
    #[test]
    fn addresses_with_leading_zeros_are_decimal() {
        let web = svc("default/web", "198.019.000.010")
            .cluster_ips(&["198.019.000.010"])
            .port("http", 80, "TCP")
            .service_type("LoadBalancer")
            .external_ips(&["198.018.009.001"])
            .ingress(Some("198.18.008.001"), None)
            .load_balancer_source_ranges(&["203.0.113.000/025"]);
        let slices = vec![
            slice("default/web-1", "web")
                .port(Some("http"), Some(8080), "TCP")
                .endpoint(ep("198.018.001.001"))
                .endpoint(ep("::ffff:198.18.1.2")),
        ];
        run(vec![Case {
            name: "leading zeros",
            services: vec![web.clone()],
            slices: slices.clone(),
            frontends: vec![
                ("198.18.8.1:80/tcp", LoadBalancer, WEB_BACKENDS.to_vec()),
                ("198.18.9.1:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
            ],
            ..Case::default()
        }]);
        let mut model = Model::default();
        model.insert_service(web.0).unwrap();
        for slice in slices {
            model.insert_endpoint_slice(slice.0).unwrap();
        }
        let planned = plan(&model, &node());
        let load_balancer = planned.desired.frontends.values().next().unwrap();
        assert_eq!(load_balancer.kind, FrontendKind::LoadBalancer);
        assert_eq!(
            load_balancer.source_ranges,
            ["203.0.113.0/25".parse::<IpNet>().unwrap()]
        );
    }

    /// kube-proxy's service health server of each family listens on `0.0.0.0` (`::`)
    /// unless `--nodeport-addresses` narrows that family, then on the node addresses of the
    /// family inside its CIDRs, loopback included (`newServiceHealthServer`, `GetNodeIPs`);
    /// NodePorts likewise, each family filtered by its own CIDRs only.
    #[test]
    fn health_checks_listen_where_kube_proxy_does() {
        let ips = |texts: &[&str]| -> Vec<IpAddr> {
            texts.iter().map(|text| text.parse().unwrap()).collect()
        };
        let node = |addresses: &[&str], cidrs: &[&str]| NodeFacts {
            addresses: ips(addresses),
            nodeport_cidrs: cidrs.iter().map(|cidr| cidr.parse().unwrap()).collect(),
            ..NodeFacts::default()
        };
        let ipv4 = ["198.18.0.1", "127.0.0.1", "198.18.5.1"];
        let dual = [
            "198.18.0.1",
            "127.0.0.1",
            "198.18.5.1",
            "2001:db8::1",
            "2001:db8:5::1",
            "::1",
        ];
        // (node addresses, CIDRs, health-check addresses, NodePort addresses)
        type Row<'a> = (&'a [&'a str], &'a [&'a str], &'a [&'a str], &'a [&'a str]);
        let cases: [Row; 10] = [
            (&ipv4, &[], &["0.0.0.0"], &["198.18.0.1", "198.18.5.1"]),
            (&ipv4, &["127.0.0.0/8"], &["127.0.0.1"], &[]),
            (
                &ipv4,
                &["198.18.0.0/24", "127.0.0.0/8"],
                &["127.0.0.1", "198.18.0.1"],
                &["198.18.0.1"],
            ),
            (
                &ipv4,
                &["0.0.0.0/0"],
                &["0.0.0.0"],
                &["198.18.0.1", "198.18.5.1"],
            ),
            (&ipv4, &["203.0.113.0/24"], &[], &[]),
            (
                &dual,
                &[],
                &["0.0.0.0", "::"],
                &["198.18.0.1", "198.18.5.1", "2001:db8::1", "2001:db8:5::1"],
            ),
            // An IPv6-only list narrows IPv6 and leaves IPv4 open, and the other way round.
            (
                &dual,
                &["2001:db8::/64"],
                &["0.0.0.0", "2001:db8::1"],
                &["198.18.0.1", "198.18.5.1", "2001:db8::1"],
            ),
            (
                &dual,
                &["198.18.5.0/24"],
                &["198.18.5.1", "::"],
                &["198.18.5.1", "2001:db8::1", "2001:db8:5::1"],
            ),
            (
                &dual,
                &["::/0", "127.0.0.0/8"],
                &["127.0.0.1", "::"],
                &["2001:db8::1", "2001:db8:5::1"],
            ),
            (
                &dual,
                &["::1/128", "198.18.0.1/32"],
                &["198.18.0.1", "::1"],
                &["198.18.0.1"],
            ),
        ];
        for (addresses, cidrs, health_checks, node_ports) in cases {
            let node = node(addresses, cidrs);
            let name = format!("{addresses:?} {cidrs:?}");
            assert_eq!(node.health_check_addresses(), ips(health_checks), "{name}");
            assert_eq!(node.node_port_addresses(), ips(node_ports), "{name}");
        }
        // `localhost:NodePort` (with the socket programs) is IPv4's only, as in kube-proxy.
        let socket_lb = NodeFacts {
            loopback_node_ports: true,
            ..node(&dual, &[])
        };
        assert_eq!(
            socket_lb.node_port_addresses(),
            ips(&[
                "127.0.0.1",
                "198.18.0.1",
                "198.18.5.1",
                "2001:db8::1",
                "2001:db8:5::1"
            ])
        );
    }

    #[test]
    fn node_port_frontends() {
        // Loopback addresses become NodePort frontends only for the socket programs
        // (`localhost:NodePort`): the tc program sees no loopback traffic.
        let two_addresses = NodeFacts {
            addresses: vec![
                "198.18.0.2".parse().unwrap(),
                "127.0.0.1".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
            ],
            ..node()
        };
        // A NodePort Service on `node`: its `node_ports`, and its ClusterIP.
        let web_on = |name: &'static str, node: NodeFacts, node_ports: &[&'static str]| {
            let mut frontends: Vec<_> = node_ports
                .iter()
                .map(|frontend| (*frontend, NodePort, WEB_BACKENDS.to_vec()))
                .collect();
            frontends.push(("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()));
            Case {
                name,
                services: vec![
                    svc("default/web", "198.19.0.10")
                        .node_port("http", 80, 30080)
                        .service_type("NodePort"),
                ],
                slices: vec![web_slice()],
                node,
                frontends,
                ..Case::default()
            }
        };
        let with_socket_lb = NodeFacts {
            loopback_node_ports: true,
            ..two_addresses.clone()
        };
        run(vec![
            web_on(
                "NodePort on every node address",
                two_addresses.clone(),
                &["198.18.0.1:30080/tcp", "198.18.0.2:30080/tcp"],
            ),
            web_on(
                "nodeport_cidrs restricts the addresses",
                NodeFacts {
                    nodeport_cidrs: vec!["198.18.0.2/32".parse().unwrap()],
                    ..two_addresses
                },
                &["198.18.0.2:30080/tcp"],
            ),
            web_on(
                "with socket LB, localhost:NodePort too",
                with_socket_lb.clone(),
                &[
                    "127.0.0.1:30080/tcp",
                    "198.18.0.1:30080/tcp",
                    "198.18.0.2:30080/tcp",
                ],
            ),
            web_on(
                "with socket LB, localhost:NodePort only inside nodeport_cidrs",
                NodeFacts {
                    nodeport_cidrs: vec!["198.18.0.0/24".parse().unwrap()],
                    ..with_socket_lb
                },
                &["198.18.0.1:30080/tcp", "198.18.0.2:30080/tcp"],
            ),
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
            name: "IPv4 externalIPs; IPv6 ones skipped on an IPv4 Service, and said",
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
            problems: vec![
                "default/web: spec.externalIPs: fd00::9 skipped: the Service has no clusterIP \
                 of their family (kube-proxy's proxier of that family does not see the \
                 Service)",
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
                name: "hostname-only, Proxy-mode and IPv6 ingress are skipped (IPv4 Service)",
                services: vec![
                    load_balancer()
                        .ingress(None, None)
                        .ingress(Some("198.18.8.1"), Some("Proxy"))
                        .ingress(Some("fd00::8"), None),
                ],
                slices: vec![web_slice()],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec())],
                problems: vec![
                    "default/web: status.loadBalancer.ingress: fd00::8 skipped: the Service has \
                     no clusterIP of their family (kube-proxy's proxier of that family does not \
                     see the Service)",
                ],
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
                name: "SCTP served as TCP and UDP are, on every kind of frontend",
                services: vec![{
                    let mut web = svc("default/web", "198.19.0.10")
                        .port("http", 80, "TCP")
                        .port("sig", 3868, "SCTP")
                        .service_type("LoadBalancer")
                        .external_ips(&["198.18.9.1"])
                        .ingress(Some("198.18.8.1"), None);
                    let ports = web.spec().ports.as_mut().expect("ports");
                    ports.last_mut().expect("sig").node_port = Some(30868);
                    web
                }],
                slices: vec![
                    web_slice()
                        .port(Some("sig"), Some(3869), "SCTP")
                        // Same name, other protocol: not the SCTP port's endpoint.
                        .port(Some("sig"), Some(9999), "TCP"),
                ],
                frontends: vec![
                    (
                        "198.18.0.1:30868/sctp",
                        NodePort,
                        vec!["198.18.1.1:3869", "198.18.1.2:3869"],
                    ),
                    ("198.18.8.1:80/tcp", LoadBalancer, WEB_BACKENDS.to_vec()),
                    (
                        "198.18.8.1:3868/sctp",
                        LoadBalancer,
                        vec!["198.18.1.1:3869", "198.18.1.2:3869"],
                    ),
                    ("198.18.9.1:80/tcp", ExternalIp, WEB_BACKENDS.to_vec()),
                    (
                        "198.18.9.1:3868/sctp",
                        ExternalIp,
                        vec!["198.18.1.1:3869", "198.18.1.2:3869"],
                    ),
                    ("198.19.0.10:80/tcp", ClusterIp, WEB_BACKENDS.to_vec()),
                    (
                        "198.19.0.10:3868/sctp",
                        ClusterIp,
                        vec!["198.18.1.1:3869", "198.18.1.2:3869"],
                    ),
                ],
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
    fn external_frontends_choose_as_annotated_or_as_the_node_says_and_cluster_ips_at_random() {
        use crate::model::selection::{ALGORITHM_ANNOTATION, TABLE_SIZE_ANNOTATION};
        let web = || {
            svc("default/web", "198.19.0.10")
                .node_port("http", 80, 30080)
                .service_type("NodePort")
                .external_ips(&["198.18.9.1"])
        };
        let maglev_node = NodeFacts {
            selection: SelectionDefaults {
                algorithm: crate::plan::Algorithm::Maglev,
                table_size: 4093,
            },
            ..node()
        };
        let selections = |service: Svc, node: &NodeFacts| -> Vec<(FrontendKind, Selection)> {
            let mut model = Model::default();
            model.insert_service(service.0).unwrap();
            model.insert_endpoint_slice(web_slice().0).unwrap();
            let planned = plan(&model, node);
            planned
                .desired
                .frontends
                .values()
                .map(|plan| (plan.kind, plan.selection))
                .collect()
        };
        let maglev = |table_size| Selection::Maglev { table_size };
        let expect = |external: Selection| {
            vec![
                (FrontendKind::NodePort, external),
                (FrontendKind::ExternalIp, external),
                (FrontendKind::ClusterIp, Selection::Random),
            ]
        };
        let cases = [
            (
                "kube-proxy's default",
                web(),
                node(),
                expect(Selection::Random),
            ),
            (
                "the node's flag",
                web(),
                maglev_node.clone(),
                expect(maglev(4093)),
            ),
            (
                "the annotation",
                web().annotation(ALGORITHM_ANNOTATION, "maglev"),
                node(),
                expect(maglev(proxy_common::maglev::DEFAULT_TABLE_SIZE)),
            ),
            (
                "the annotation with a size",
                web()
                    .annotation(ALGORITHM_ANNOTATION, "maglev")
                    .annotation(TABLE_SIZE_ANNOTATION, "1021"),
                node(),
                expect(maglev(1021)),
            ),
            (
                "the annotation against the flag",
                web().annotation(ALGORITHM_ANNOTATION, "random"),
                maglev_node.clone(),
                expect(Selection::Random),
            ),
            (
                "an invalid annotation: the flag",
                web().annotation(ALGORITHM_ANNOTATION, "weighted"),
                maglev_node,
                expect(maglev(4093)),
            ),
        ];
        // In frontend order: the node address, the externalIP, the ClusterIP.
        for (name, service, node, expected) in cases {
            assert_eq!(selections(service, &node), expected, "{name}");
        }
    }

    /// kube-proxy's KUBE-FW chain: a load-balancer IP admits the ranges (trimmed, read
    /// sloppily, truncated, IPv6 and junk left out), and, when a range holds the node's
    /// address (its primary one when the Node names it), every load-balancer IP of the
    /// Service as a source too; NodePorts and externalIPs stay open; a Service without
    /// endpoints refuses everyone.
    #[test]
    fn source_ranges_admit_the_ranges_and_the_load_balancer_ips_for_the_node() {
        let web = |ranges: &[&str]| {
            svc("default/web", "198.19.0.10")
                .node_port("http", 80, 30080)
                .service_type("LoadBalancer")
                .external_ips(&["198.18.9.1"])
                .ingress(Some("198.18.8.1"), None)
                .ingress(Some("198.18.8.2"), None)
                .load_balancer_source_ranges(ranges)
        };
        let two_addresses = NodeFacts {
            addresses: vec![
                "198.18.0.1".parse().unwrap(),
                "203.0.113.1".parse().unwrap(),
            ],
            ..node()
        };
        let primary = |addr: &str| NodeState {
            primary_ipv4: Some(addr.parse().unwrap()),
            ..NodeState::default()
        };
        // (case, Service, node, the Node's state, endpoints, admitted sources of each
        // load-balancer IP)
        type Row = (
            &'static str,
            Svc,
            NodeFacts,
            NodeState,
            bool,
            Vec<&'static str>,
        );
        let cases: Vec<Row> = vec![
            (
                "a range without the node's address: the ranges alone",
                web(&[
                    " 10.1.2.3/8 ",
                    "203.0.113.000/025",
                    "fd00::/8",
                    "not-a-cidr",
                    "",
                ]),
                node(),
                NodeState::default(),
                true,
                vec!["10.0.0.0/8", "203.0.113.0/25"],
            ),
            (
                "a range with the node's address: the load-balancer IPs too",
                web(&["198.18.0.0/24", "203.0.113.0/25"]),
                node(),
                NodeState::default(),
                true,
                vec![
                    "198.18.0.0/24",
                    "198.18.8.1/32",
                    "198.18.8.2/32",
                    "203.0.113.0/25",
                ],
            ),
            (
                "without a Node object any node address counts",
                web(&["203.0.113.0/25"]),
                two_addresses.clone(),
                NodeState::default(),
                true,
                vec!["198.18.8.1/32", "198.18.8.2/32", "203.0.113.0/25"],
            ),
            (
                "the Node's primary address is the node's address once known",
                web(&["203.0.113.0/25"]),
                two_addresses.clone(),
                primary("198.18.0.1"),
                true,
                vec!["203.0.113.0/25"],
            ),
            (
                "a load-balancer IP inside a range is not listed twice",
                web(&["198.18.0.0/16"]),
                node(),
                NodeState::default(),
                true,
                vec!["198.18.0.0/16"],
            ),
            (
                "only IPv6 ranges: no restriction",
                web(&["fd00::/8"]),
                node(),
                NodeState::default(),
                true,
                vec![],
            ),
            (
                "no endpoints: no restriction, everyone is refused",
                web(&["203.0.113.0/25"]),
                node(),
                NodeState::default(),
                false,
                vec![],
            ),
        ];
        for (name, service, node, state, endpoints, expected) in cases {
            let mut model = Model::default();
            model.insert_service(service.0).unwrap();
            if endpoints {
                model.insert_endpoint_slice(web_slice().0).unwrap();
            }
            model.set_node_state(state);
            let planned = plan(&model, &node);
            let load_balancers = (planned.desired.frontends.values())
                .filter(|plan| plan.kind == FrontendKind::LoadBalancer)
                .count();
            assert_eq!(load_balancers, 2, "{name}");
            for (frontend, plan) in &planned.desired.frontends {
                let admitted: Vec<String> =
                    plan.source_ranges.iter().map(ToString::to_string).collect();
                let expected: &[&str] = if plan.kind == FrontendKind::LoadBalancer {
                    &expected
                } else {
                    &[]
                };
                assert_eq!(admitted, expected, "{name}: {frontend}");
            }
        }
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
        let local = || {
            lb().external_traffic_policy("Local")
                .health_check_node_port(32000)
        };
        let base = || {
            slice("default/lb-1", "lb")
                .port(Some("http"), Some(8080), "TCP")
                .port(Some("https"), Some(8443), "TCP")
                .endpoint(ep("198.18.1.1").on_node(NODE))
                .endpoint(ep("198.18.1.2").on_node(NODE).serving_terminating())
                .endpoint(ep("198.18.1.3").on_node(NODE).not_ready())
                .endpoint(ep("198.18.1.4").on_node("node-b"))
        };
        // (case, Service, slices, (node port, local endpoints))
        type Row = (&'static str, Svc, Vec<Slice>, Option<(u16, usize)>);
        let cases: Vec<Row> = vec![
            (
                "Local with a port: ready local addresses, terminating and not-ready ones left out",
                local(),
                vec![base()],
                Some((32000, 1)),
            ),
            (
                "Cluster policy: no health check",
                lb().health_check_node_port(32000),
                vec![base()],
                None,
            ),
            (
                "Local without a port: none",
                lb().external_traffic_policy("Local"),
                vec![base()],
                None,
            ),
            (
                "port out of range: none",
                lb().external_traffic_policy("Local")
                    .health_check_node_port(70000),
                vec![base()],
                None,
            ),
            (
                "a NodePort Service has none, whatever it sets (only LoadBalancers do)",
                local().service_type("NodePort"),
                vec![base()],
                None,
            ),
            (
                "no local endpoint: served, with 0",
                local(),
                vec![
                    slice("default/lb-1", "lb")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.4").on_node("node-b")),
                ],
                Some((32000, 0)),
            ),
            (
                "publishNotReadyAddresses is not read: not-ready endpoints stay out",
                local().publish_not_ready_addresses(),
                vec![base()],
                Some((32000, 1)),
            ),
            (
                "slice ports the Service does not list count too (kube-proxy's endpoints map)",
                local(),
                vec![
                    base(),
                    slice("default/lb-2", "lb")
                        .port(Some("metrics"), Some(9090), "TCP")
                        .endpoint(ep("198.18.1.5").on_node(NODE)),
                ],
                Some((32000, 2)),
            ),
            (
                "an address in two slices: the running copy wins over the terminating one",
                local(),
                vec![
                    base().endpoint(ep("198.18.1.6").on_node(NODE)),
                    slice("default/lb-2", "lb")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("198.18.1.6").on_node(NODE).serving_terminating()),
                ],
                Some((32000, 2)),
            ),
            (
                "dual stack: each family counts its own addresses, the larger count is told \
                 (one pod is one endpoint, as each of kube-proxy's per-family servers says)",
                local().cluster_ips(&["198.19.0.20", "2001:db8:ff::20"]),
                vec![
                    base(),
                    slice("default/lb-6", "lb")
                        .address_type("IPv6")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("2001:db8:1::1").on_node(NODE))
                        .endpoint(ep("2001:db8:1::7").on_node(NODE)),
                ],
                Some((32000, 2)),
            ),
            (
                "an IPv4 Service does not count IPv6 endpoints",
                local(),
                vec![
                    base(),
                    slice("default/lb-6", "lb")
                        .address_type("IPv6")
                        .port(Some("http"), Some(8080), "TCP")
                        .endpoint(ep("2001:db8:1::1").on_node(NODE))
                        .endpoint(ep("2001:db8:1::7").on_node(NODE)),
                ],
                Some((32000, 1)),
            ),
        ];
        for (name, service, slices, expected) in cases {
            let mut model = Model::default();
            model.insert_service(service.0).unwrap();
            for slice in slices {
                model.insert_endpoint_slice(slice.0).unwrap();
            }
            let planned = plan(&model, &node());
            let check = planned
                .health_checks
                .get(&ObjectKey::new("default", "lb"))
                .map(|check| (check.node_port, check.local_endpoints));
            assert_eq!(check, expected, "{name}");
        }
    }
}
