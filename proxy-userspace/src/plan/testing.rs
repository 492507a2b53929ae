//! Builders for the planner's table tests: Services and EndpointSlices written the way
//! their YAML reads, run through [`super::plan`] and compared as text.

use k8s_openapi::api::core::v1::{
    ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, SessionAffinityConfig,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;
use crate::model::{Model, SERVICE_NAME_LABEL};

pub fn metadata(key: &str) -> ObjectMeta {
    let (namespace, name) = key.split_once('/').expect("namespace/name");
    ObjectMeta {
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..ObjectMeta::default()
    }
}

pub fn add_label(metadata: &mut ObjectMeta, label: &str, value: &str) {
    metadata
        .labels
        .get_or_insert_default()
        .insert(label.to_owned(), value.to_owned());
}

/// `svc("web/front", "198.19.0.10").port("http", 80, "TCP")`, as the YAML would say.
#[derive(Clone)]
pub struct Svc(pub Service);

pub fn svc(key: &str, cluster_ip: &str) -> Svc {
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
    pub fn spec(&mut self) -> &mut ServiceSpec {
        self.0.spec.get_or_insert_default()
    }

    pub fn port(mut self, name: &str, port: i32, protocol: &str) -> Self {
        self.spec().ports.get_or_insert_default().push(ServicePort {
            name: Some(name.to_owned()).filter(|name| !name.is_empty()),
            port,
            protocol: Some(protocol.to_owned()),
            ..ServicePort::default()
        });
        self
    }

    /// A TCP port with a nodePort.
    pub fn node_port(mut self, name: &str, port: i32, node_port: i32) -> Self {
        self = self.port(name, port, "TCP");
        let ports = self.spec().ports.as_mut().expect("just added");
        ports.last_mut().expect("just added").node_port = Some(node_port);
        self
    }

    pub fn service_type(mut self, service_type: &str) -> Self {
        self.spec().type_ = Some(service_type.to_owned());
        self
    }

    pub fn cluster_ips(mut self, cluster_ips: &[&str]) -> Self {
        self.spec().cluster_ips = Some(cluster_ips.iter().map(|ip| ip.to_string()).collect());
        self
    }

    pub fn ip_families(mut self, families: &[&str]) -> Self {
        self.spec().ip_families = Some(families.iter().map(|family| family.to_string()).collect());
        self
    }

    pub fn external_ips(mut self, external_ips: &[&str]) -> Self {
        self.spec().external_ips = Some(external_ips.iter().map(|ip| ip.to_string()).collect());
        self
    }

    pub fn ingress(mut self, ip: Option<&str>, ip_mode: Option<&str>) -> Self {
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

    pub fn label(mut self, label: &str, value: &str) -> Self {
        add_label(&mut self.0.metadata, label, value);
        self
    }

    pub fn internal_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().internal_traffic_policy = Some(policy.to_owned());
        self
    }

    pub fn external_traffic_policy(mut self, policy: &str) -> Self {
        self.spec().external_traffic_policy = Some(policy.to_owned());
        self
    }

    pub fn publish_not_ready_addresses(mut self) -> Self {
        self.spec().publish_not_ready_addresses = Some(true);
        self
    }

    pub fn load_balancer_source_ranges(mut self, ranges: &[&str]) -> Self {
        self.spec().load_balancer_source_ranges =
            Some(ranges.iter().map(ToString::to_string).collect());
        self
    }

    pub fn health_check_node_port(mut self, port: i32) -> Self {
        self.spec().health_check_node_port = Some(port);
        self
    }

    pub fn allocate_load_balancer_node_ports(mut self, allocate: bool) -> Self {
        self.spec().allocate_load_balancer_node_ports = Some(allocate);
        self
    }

    /// `sessionAffinity: ClientIP`, with `timeoutSeconds` when given.
    pub fn client_ip_affinity(mut self, timeout_seconds: Option<i32>) -> Self {
        self.spec().session_affinity = Some("ClientIP".to_owned());
        self.spec().session_affinity_config =
            timeout_seconds.map(|seconds| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(seconds),
                }),
            });
        self
    }

    pub fn session_affinity(mut self, affinity: &str) -> Self {
        self.spec().session_affinity = Some(affinity.to_owned());
        self
    }

    pub fn annotation(mut self, annotation: &str, value: &str) -> Self {
        self.0
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(annotation.to_owned(), value.to_owned());
        self
    }

    pub fn traffic_distribution(mut self, distribution: &str) -> Self {
        self.spec().traffic_distribution = Some(distribution.to_owned());
        self
    }
}

/// `slice("web/front-1", "front").port(Some("http"), Some(8080), "TCP").endpoint(ep(..))`.
#[derive(Clone)]
pub struct Slice(pub EndpointSlice);

pub fn slice(key: &str, service_name: &str) -> Slice {
    let mut metadata = metadata(key);
    add_label(&mut metadata, SERVICE_NAME_LABEL, service_name);
    Slice(EndpointSlice {
        metadata,
        address_type: "IPv4".to_owned(),
        ..EndpointSlice::default()
    })
}

impl Slice {
    pub fn address_type(mut self, address_type: &str) -> Self {
        self.0.address_type = address_type.to_owned();
        self
    }

    pub fn port(mut self, name: Option<&str>, port: Option<i32>, protocol: &str) -> Self {
        self.0.ports.get_or_insert_default().push(EndpointPort {
            name: name.map(str::to_owned),
            port,
            protocol: Some(protocol.to_owned()),
            ..EndpointPort::default()
        });
        self
    }

    pub fn endpoint(mut self, endpoint: Ep) -> Self {
        self.0.endpoints.get_or_insert_default().push(endpoint.0);
        self
    }

    pub fn label(mut self, label: &str, value: &str) -> Self {
        add_label(&mut self.0.metadata, label, value);
        self
    }
}

/// An endpoint with unset conditions (which means ready).
pub struct Ep(pub Endpoint);

pub fn ep(addr: &str) -> Ep {
    Ep(Endpoint {
        addresses: vec![addr.to_owned()],
        ..Endpoint::default()
    })
}

impl Ep {
    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.0.conditions = Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        });
        self
    }

    pub fn not_ready(self) -> Self {
        self.conditions(false, false, false)
    }

    /// Shutting down but still answering: kube-proxy's fallback.
    pub fn serving_terminating(self) -> Self {
        self.conditions(false, true, true)
    }

    pub fn on_node(mut self, node_name: &str) -> Self {
        self.0.node_name = Some(node_name.to_owned());
        self
    }

    /// `hints.forZones`, as the EndpointSlice controller writes for PreferClose.
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
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
    pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
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

pub const NODE: &str = "node-a";

pub fn node() -> NodeFacts {
    NodeFacts {
        node_name: NODE.to_owned(),
        zone: Some(ZONE.to_owned()),
        addresses: vec!["198.18.0.1".parse().unwrap()],
        nodeport_cidrs: Vec::new(),
        selection: Default::default(),
        loopback_node_ports: false,
    }
}

pub const ZONE: &str = "zone-a";

/// How a frontend without backends shows in a case's expected backends.
pub const REJECTS: &str = "(reject)";
pub const DROPS: &str = "(drop)";

/// One row of a table: the model's objects and what the planner must make of them.
pub struct Case {
    pub name: &'static str,
    pub services: Vec<Svc>,
    pub slices: Vec<Slice>,
    pub node: NodeFacts,
    /// (`addr:port/proto`, kind, backends `addr:port`), in frontend order. A frontend
    /// without backends shows [`REJECTS`] or [`DROPS`] instead.
    pub frontends: Vec<(&'static str, FrontendKind, Vec<&'static str>)>,
    pub problems: Vec<&'static str>,
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

pub fn run(cases: Vec<Case>) {
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
pub fn rendered(plan: &FrontendPlan) -> Vec<String> {
    match plan.when_empty {
        _ if !plan.backends.is_empty() => plan.backends.iter().map(ToString::to_string).collect(),
        EmptyFrontend::Reject => vec![REJECTS.to_owned()],
        EmptyFrontend::Drop => vec![DROPS.to_owned()],
    }
}

/// A one-port web Service's slice: `http` → 8080 on two ready pods.
pub fn web_slice() -> Slice {
    slice("default/web-1", "web")
        .port(Some("http"), Some(8080), "TCP")
        .endpoint(ep("198.18.1.2"))
        .endpoint(ep("198.18.1.1"))
}

pub const WEB_BACKENDS: [&str; 2] = ["198.18.1.1:8080", "198.18.1.2:8080"];
