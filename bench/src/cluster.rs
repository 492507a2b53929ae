//! The synthetic cluster every measurement programs: `services` ClusterIP Services
//! `bench/svc-<i>`, one TCP port named `http` each, rendered as Kubernetes objects (the
//! planner's input), as the daemon's manifests, and (in [`crate::kube_rules`]) as
//! kube-proxy's rules, so every variant of a measurement gets the very same Services.
//!
//! Addresses stay in 198.18.0.0/15: VIPs are 198.19.x.y (port 80, then 81, … past 65 536
//! Services), distinct endpoints 198.18.2.0 – 198.18.197.79 (target port 8080, then
//! 8081, … every 50 000 endpoints), spare addresses for endpoint changes 198.18.198.0/23.
//! The IPv6 rows render the same Services as single-stack IPv6 ones
//! ([`Cluster::ipv6_model`]): each address's [`ipv6_twin`] in 2001:db8:be::/48.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use proxy_userspace::model::{Model, SERVICE_NAME_LABEL};
use proxy_userspace::plan::NodeFacts;

pub const NAMESPACE: &str = "bench";
pub const PORT_NAME: &str = "http";
/// The SCTP port of [`Cluster::model_with_sctp`].
pub const SCTP_PORT_NAME: &str = "sig";
/// Addresses handed out to distinct endpoints before the target port moves on.
const DISTINCT_ADDRESSES: u32 = 50_000;
const FIRST_ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 0);
const FIRST_SPARE: Ipv4Addr = Ipv4Addr::new(198, 18, 198, 0);
const SPARE_ADDRESSES: u32 = 512;
const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const SERVICE_PORT: u16 = 80;
const FIRST_TARGET_PORT: u16 = 8080;

/// Who serves the Services.
#[derive(Clone, Debug)]
pub enum Endpoints {
    /// Every Service has `per_service` endpoints of its own, all distinct: the most map
    /// entries and rules, for measurements that send no traffic to them.
    Distinct { per_service: usize },
    /// Every Service is served by the same pods (the lab's), so connections reach real
    /// servers. kube-proxy still writes one endpoint chain per Service and pod.
    Shared { pods: Vec<Ipv4Addr>, port: u16 },
}

#[derive(Clone, Debug)]
pub struct Cluster {
    pub services: usize,
    pub endpoints: Endpoints,
}

/// One Service as every renderer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchService {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl BenchService {
    /// kube-proxy's `ServicePortName.String()`: `namespace/name:port`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }
}

impl Cluster {
    pub fn new(services: usize, endpoints: Endpoints) -> Result<Self> {
        if let Endpoints::Distinct { per_service } = endpoints {
            // A Service's endpoints share one target port, so its block of addresses must
            // not straddle a port change.
            ensure!(
                per_service > 0 && (DISTINCT_ADDRESSES as usize).is_multiple_of(per_service),
                "endpoints per Service must divide {DISTINCT_ADDRESSES}"
            );
        }
        ensure!(
            services <= 65_536 * 16,
            "at most {} Services fit the VIP range",
            65_536 * 16
        );
        Ok(Self {
            services,
            endpoints,
        })
    }

    /// Service `index` (0-based).
    pub fn service(&self, index: usize) -> BenchService {
        let vip = offset(FIRST_VIP, (index % 65_536) as u32);
        let port = SERVICE_PORT + (index / 65_536) as u16;
        let (target_port, endpoints) = match &self.endpoints {
            Endpoints::Distinct { per_service } => {
                let first = (index * per_service) as u32;
                let target_port = FIRST_TARGET_PORT + (first / DISTINCT_ADDRESSES) as u16;
                let endpoints = (first..first + *per_service as u32)
                    .map(|endpoint| offset(FIRST_ENDPOINT, endpoint % DISTINCT_ADDRESSES))
                    .collect();
                (target_port, endpoints)
            }
            Endpoints::Shared { pods, port } => (*port, pods.clone()),
        };
        BenchService {
            name: format!("svc-{index}"),
            vip,
            port,
            target_port,
            endpoints,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = BenchService> + '_ {
        (0..self.services).map(|index| self.service(index))
    }

    /// The Services and their EndpointSlices as the API server would hand them over.
    pub fn model(&self) -> Result<Model> {
        let mut model = Model::default();
        for service in self.iter() {
            model.insert_service(kubernetes_service(&service))?;
            model.insert_endpoint_slice(endpoint_slice(&service, &service.endpoints))?;
        }
        Ok(model)
    }

    /// [`Self::model`], each Service also serving its port over SCTP (port name
    /// [`SCTP_PORT_NAME`], the same numbers): for the SCTP rows of the per-packet figures.
    pub fn model_with_sctp(&self) -> Result<Model> {
        let mut model = Model::default();
        for service in self.iter() {
            let mut kube = kubernetes_service(&service);
            let ports = (kube.spec.as_mut()).and_then(|spec| spec.ports.as_mut());
            let ports = ports.expect("a Service port");
            ports.push(ServicePort {
                name: Some(SCTP_PORT_NAME.to_owned()),
                protocol: Some("SCTP".to_owned()),
                ..ports[0].clone()
            });
            let mut slice = endpoint_slice(&service, &service.endpoints);
            let ports = slice.ports.as_mut().expect("an endpoint port");
            ports.push(EndpointPort {
                name: Some(SCTP_PORT_NAME.to_owned()),
                protocol: Some("SCTP".to_owned()),
                ..ports[0].clone()
            });
            model.insert_service(kube)?;
            model.insert_endpoint_slice(slice)?;
        }
        Ok(model)
    }

    /// The Services as single-stack IPv6 ones (`ipFamilies: [IPv6]`, the ClusterIP's
    /// [`ipv6_twin`]), each with an IPv6 EndpointSlice whose endpoints are `endpoint` of
    /// the IPv4 ones (their twins, or the lab pods' IPv6 addresses).
    pub fn ipv6_objects(
        &self,
        endpoint: impl Fn(Ipv4Addr) -> Ipv6Addr,
    ) -> Vec<(Service, EndpointSlice)> {
        self.iter()
            .map(|service| ipv6_objects_of(&service, None, &endpoint))
            .collect()
    }

    /// [`Self::ipv6_objects`] with twin endpoints, as the planner takes them.
    pub fn ipv6_model(&self) -> Result<Model> {
        let mut model = Model::default();
        for (service, slice) in self.ipv6_objects(ipv6_twin) {
            model.insert_service(service)?;
            model.insert_endpoint_slice(slice)?;
        }
        Ok(model)
    }

    /// [`Self::ipv6_objects`] as one multi-document file for the daemon's manifests
    /// directory (JSON documents, which YAML reads).
    pub fn ipv6_manifest(&self, endpoint: impl Fn(Ipv4Addr) -> Ipv6Addr) -> String {
        let mut yaml = String::new();
        for (service, slice) in self.ipv6_objects(endpoint) {
            for document in [
                serde_json::to_string(&service),
                serde_json::to_string(&slice),
            ] {
                yaml.push_str("---\n");
                yaml.push_str(&document.expect("k8s-openapi objects serialize"));
                yaml.push('\n');
            }
        }
        yaml
    }

    /// Every Service and EndpointSlice as the API server stores them (JSON, with kind and
    /// apiVersion), for the test API server.
    pub fn api_objects(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.iter().flat_map(|service| {
            let objects = [
                serde_json::to_value(kubernetes_service(&service)),
                serde_json::to_value(endpoint_slice(&service, &service.endpoints)),
            ];
            objects.map(|object| object.expect("k8s-openapi objects serialize"))
        })
    }

    /// Every Service and EndpointSlice as one multi-document YAML file for the daemon's
    /// manifests directory.
    pub fn manifest_yaml(&self) -> String {
        let mut yaml = String::new();
        for service in self.iter() {
            write_service_yaml(&mut yaml, &service);
            write_endpoint_slice_yaml(&mut yaml, &service, &service.endpoints);
        }
        yaml
    }
}

/// The lab's node, as the planner needs it for ClusterIP Services.
pub fn lab_node() -> NodeFacts {
    NodeFacts {
        node_name: proxy_lab::NODE_NAME.to_owned(),
        ..NodeFacts::default()
    }
}

/// The `index`-th spare address: an endpoint address no Service uses at first, for
/// endpoint changes.
pub fn spare_address(index: usize) -> Ipv4Addr {
    offset(FIRST_SPARE, index as u32 % SPARE_ADDRESSES)
}

/// The IPv6 address the IPv6 rows give a bench address: 2001:db8:be::, then its four
/// octets as two groups (198.19.0.10 → 2001:db8:be::c613:a). Never an IPv4-mapped address,
/// which Kubernetes reads as IPv4.
pub fn ipv6_twin(address: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = address.octets();
    Ipv6Addr::new(
        0x2001,
        0xdb8,
        0xbe,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by)
}

fn metadata(name: String, labels: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(NAMESPACE.to_owned()),
        labels,
        ..ObjectMeta::default()
    }
}

fn kubernetes_service(service: &BenchService) -> Service {
    kubernetes_service_with(service, None)
}

/// The Service object; with `node_port`, of type NodePort and open on that port.
pub fn kubernetes_service_with(service: &BenchService, node_port: Option<u16>) -> Service {
    Service {
        metadata: metadata(service.name.clone(), None),
        spec: Some(ServiceSpec {
            type_: Some(
                if node_port.is_some() {
                    "NodePort"
                } else {
                    "ClusterIP"
                }
                .to_owned(),
            ),
            cluster_ip: Some(service.vip.to_string()),
            cluster_ips: Some(vec![service.vip.to_string()]),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.to_owned()),
                protocol: Some("TCP".to_owned()),
                port: i32::from(service.port),
                target_port: Some(IntOrString::Int(i32::from(service.target_port))),
                node_port: node_port.map(i32::from),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// `service` as a single-stack IPv6 one (`ipFamilies: [IPv6]`, the ClusterIP's
/// [`ipv6_twin`]; with `node_port`, of type NodePort), with an IPv6 EndpointSlice whose
/// endpoints are `endpoint` of the IPv4 ones.
pub fn ipv6_objects_of(
    service: &BenchService,
    node_port: Option<u16>,
    endpoint: impl Fn(Ipv4Addr) -> Ipv6Addr,
) -> (Service, EndpointSlice) {
    let vip = ipv6_twin(service.vip).to_string();
    let mut kube = kubernetes_service_with(service, node_port);
    let spec = kube.spec.as_mut().expect("a spec");
    spec.cluster_ip = Some(vip.clone());
    spec.cluster_ips = Some(vec![vip]);
    spec.ip_families = Some(vec!["IPv6".to_owned()]);
    let mut slice = endpoint_slice(service, &service.endpoints);
    slice.address_type = "IPv6".to_owned();
    for each in slice.endpoints.iter_mut().flatten() {
        each.addresses = (each.addresses.iter())
            .map(|address| endpoint(address.parse().expect("an IPv4 endpoint")).to_string())
            .collect();
    }
    (kube, slice)
}

/// The Service's EndpointSlice with `endpoints` ready.
pub fn endpoint_slice(service: &BenchService, endpoints: &[Ipv4Addr]) -> EndpointSlice {
    let labels = BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), service.name.clone())]);
    EndpointSlice {
        metadata: metadata(format!("{}-bench", service.name), Some(labels)),
        address_type: "IPv4".to_owned(),
        ports: Some(vec![EndpointPort {
            name: Some(PORT_NAME.to_owned()),
            protocol: Some("TCP".to_owned()),
            port: Some(i32::from(service.target_port)),
            ..EndpointPort::default()
        }]),
        endpoints: Some(
            endpoints
                .iter()
                .map(|addr| Endpoint {
                    addresses: vec![addr.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(proxy_lab::NODE_NAME.to_owned()),
                    ..Endpoint::default()
                })
                .collect(),
        ),
    }
}

fn write_service_yaml(yaml: &mut String, service: &BenchService) {
    let _ = write!(
        yaml,
        "---\napiVersion: v1\nkind: Service\n\
         metadata:\n  name: {name}\n  namespace: {NAMESPACE}\n\
         spec:\n  type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n\
         \x20 ports:\n    - name: {PORT_NAME}\n      protocol: TCP\n\
         \x20     port: {port}\n      targetPort: {target}\n",
        name = service.name,
        vip = service.vip,
        port = service.port,
        target = service.target_port,
    );
}

fn write_endpoint_slice_yaml(yaml: &mut String, service: &BenchService, endpoints: &[Ipv4Addr]) {
    let _ = write!(
        yaml,
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-bench\n  namespace: {NAMESPACE}\n\
         \x20 labels:\n    {SERVICE_NAME_LABEL}: {name}\n\
         addressType: IPv4\n\
         ports:\n  - name: {PORT_NAME}\n    protocol: TCP\n    port: {target}\n\
         endpoints:\n",
        name = service.name,
        target = service.target_port,
    );
    for addr in endpoints {
        let _ = write!(
            yaml,
            "  - addresses: [{addr}]\n\
             \x20   conditions: {{ready: true, serving: true, terminating: false}}\n\
             \x20   nodeName: {}\n",
            proxy_lab::NODE_NAME
        );
    }
}

#[cfg(test)]
mod tests {
    use proxy_userspace::plan::plan;
    use proxy_userspace::source::manifests::{ManifestSource, ParseLimits};

    use super::*;

    fn distinct(services: usize) -> Cluster {
        Cluster::new(services, Endpoints::Distinct { per_service: 10 }).unwrap()
    }

    #[test]
    fn addresses_stay_in_the_benchmarking_range_and_never_repeat() {
        let cluster = distinct(100_000);
        let benchmarking: ipnet::Ipv4Net = "198.18.0.0/15".parse().unwrap();
        let mut frontends = std::collections::HashSet::new();
        let mut backends = std::collections::HashSet::new();
        for service in cluster.iter() {
            assert!(benchmarking.contains(&service.vip));
            assert!(frontends.insert((service.vip, service.port)));
            for endpoint in &service.endpoints {
                assert!(benchmarking.contains(endpoint));
                assert!(
                    endpoint < &FIRST_SPARE,
                    "{endpoint} overlaps the spare addresses"
                );
                assert!(backends.insert((*endpoint, service.target_port)));
            }
        }
        assert_eq!(backends.len(), 1_000_000);
        assert!(benchmarking.contains(&spare_address(SPARE_ADDRESSES as usize - 1)));
    }

    #[test]
    fn the_planner_sees_the_same_services_in_objects_and_in_yaml() {
        let cluster = distinct(30);
        let node = lab_node();
        let from_objects = plan(&cluster.model().unwrap(), &node);
        assert!(
            from_objects.problems.is_empty(),
            "{:?}",
            from_objects.problems
        );
        assert_eq!(from_objects.desired.frontends.len(), 30);
        let first = &from_objects.desired.frontends.values().next().unwrap();
        assert_eq!(first.backends.len(), 10);

        let dir = std::env::temp_dir().join(format!("epx-bench-yaml-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bench.yaml"), cluster.manifest_yaml()).unwrap();
        let mut model = Model::default();
        let loaded = ManifestSource::new(&dir, ParseLimits::default()).load(&mut model);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded.unwrap();
        let rejected = model.take_changes().rejected;
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(plan(&model, &node), from_objects);
    }

    #[test]
    fn the_ipv6_twins_plan_as_ipv6_frontends_from_objects_and_from_the_manifest() {
        let cluster = distinct(20);
        let node = lab_node();
        let planned = plan(&cluster.ipv6_model().unwrap(), &node);
        assert!(planned.problems.is_empty(), "{:?}", planned.problems);
        assert_eq!(planned.desired.frontends.len(), 20);
        let service = cluster.service(3);
        let vip = std::net::IpAddr::V6(ipv6_twin(service.vip));
        let (_, frontend) = (planned.desired.frontends.iter())
            .find(|(key, _)| key.addr == vip)
            .expect("the twin VIP is a frontend");
        assert_eq!(frontend.backends.len(), 10);
        assert_eq!(
            ipv6_twin(Ipv4Addr::new(198, 19, 0, 10)).to_string(),
            "2001:db8:be::c613:a"
        );

        let dir = std::env::temp_dir().join(format!("epx-bench-ipv6-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bench.yaml"), cluster.ipv6_manifest(ipv6_twin)).unwrap();
        let mut model = Model::default();
        let loaded = ManifestSource::new(&dir, ParseLimits::default()).load(&mut model);
        std::fs::remove_dir_all(&dir).unwrap();
        loaded.unwrap();
        assert!(model.take_changes().rejected.is_empty());
        assert_eq!(plan(&model, &node), planned);
    }

    #[test]
    fn endpoints_per_service_must_fit_the_address_blocks() {
        assert!(Cluster::new(1, Endpoints::Distinct { per_service: 7 }).is_err());
        assert!(Cluster::new(1, Endpoints::Distinct { per_service: 0 }).is_err());
    }
}
