//! A Service as the planner reads it: kube-proxy's `ServicePort` info, interpreted once
//! when the object arrives (`newBaseServiceInfo`, `ShouldSkipService`, the informers' label
//! selector, `GetClusterIPByFamily`), so the model keeps a few hundred bytes per Service
//! instead of the whole API object, and a change that leaves the record equal (a new
//! resourceVersion, an annotation other than ours) plans nothing.
//!
//! `publishNotReadyAddresses` is not read, as kube-proxy does not read it: the EndpointSlice
//! controller already writes such a Service's endpoints as ready, so an endpoint a slice
//! calls not ready gets no traffic.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::address::{parse_cidr_sloppy, parse_ip_sloppy};
use super::selection::SelectionRequest;
use super::{Family, Problem, ProblemKind, Protocol};

/// Services (and their EndpointSlices) with this label belong to another proxy; kube-proxy's
/// informers filter them out.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Set on headless Services' EndpointSlices; kube-proxy's informers filter it out.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`: 3 hours.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// The API's upper bound for `timeoutSeconds`: one day.
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// What the planner needs of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceRecord {
    Proxied(Box<ProxiedService>),
    /// Not proxied, as expected (headless, ExternalName, another proxy's).
    Ignored(String),
    /// Not proxied, and worth telling the operator.
    Problem(Problem),
}

/// What a proxied Service's ports share, and the ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxiedService {
    /// One clusterIP per family the Service has (`GetClusterIPByFamily`), IPv4 first. The
    /// planner gives each family its own frontends, with that family's endpoints only, as
    /// kube-proxy runs one proxier per family.
    pub cluster_ips: Vec<IpAddr>,
    pub exposes_node_ports: bool,
    /// externalIPs of both families, sorted (IPv4 first) and deduplicated.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs in VIP mode, of both families, sorted and deduplicated.
    pub load_balancer_ips: Vec<IpAddr>,
    pub internal_policy_local: bool,
    /// `externalTrafficPolicy: Local` on a Service reachable from outside (NodePort,
    /// LoadBalancer, or with externalIPs); false for others, as in kube-proxy.
    pub external_policy_local: bool,
    /// `healthCheckNodePort`, when set and in range, on a LoadBalancer Service with
    /// `externalTrafficPolicy: Local` (kube-proxy's `NeedsHealthCheck`).
    pub health_check_node_port: Option<u16>,
    /// `loadBalancerSourceRanges`, the valid ones of both families, truncated, sorted
    /// (IPv4 first), deduplicated. Each family's ranges restrict only that family's
    /// load-balancer IPs (`MapCIDRsByIPFamily`).
    pub source_ranges: Vec<IpNet>,
    pub session_affinity: Option<Duration>,
    /// How its external frontends choose backends, as far as its annotations say.
    pub selection: SelectionRequest,
    pub ports: Vec<PortRecord>,
    /// Fields that were set but are not programmed, one sentence each (logged and counted).
    pub skipped_fields: Vec<Problem>,
}

/// One entry of `spec.ports`, as written: the planner reports what it can't program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRecord {
    /// Empty for an unnamed single port.
    pub name: Arc<str>,
    pub port: i32,
    /// The reason when the protocol can't be proxied (not a protocol at all).
    pub protocol: Result<Protocol, Box<str>>,
    pub node_port: Option<i32>,
}

impl ServiceRecord {
    /// Interprets a Service; `key` names it in problems.
    pub fn from_service(key: &super::ObjectKey, service: &Service) -> Self {
        match proxied_service(key, service) {
            Ok(proxied) => ServiceRecord::Proxied(Box::new(proxied)),
            Err(NotProxied::Ignored(reason)) => ServiceRecord::Ignored(reason),
            Err(NotProxied::Problem(problem)) => ServiceRecord::Problem(problem),
        }
    }
}

enum NotProxied {
    Ignored(String),
    Problem(Problem),
}

fn proxied_service(
    key: &super::ObjectKey,
    service: &Service,
) -> Result<ProxiedService, NotProxied> {
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
        return Err(NotProxied::Problem(Problem::new(
            ProblemKind::Service,
            "no_cluster_ip",
            format!("{key}: no clusterIP set, skipped (kube-proxy skips such Services too)"),
        )));
    }
    let cluster_ips = cluster_ips(&spec, cluster_ip);
    if cluster_ips.is_empty() {
        return Err(NotProxied::Problem(Problem::new(
            ProblemKind::Service,
            "no_cluster_ip",
            format!(
                "{key}: no clusterIP of a family in spec.ipFamilies, skipped (kube-proxy \
                 finds none either)"
            ),
        )));
    }
    let mut skipped_fields = Vec::new();
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
    let ranges = spec.load_balancer_source_ranges.iter().flatten();
    let source_ranges = networks(ranges.clone());
    let invalid_ranges: Vec<&str> = ranges
        .map(|range| range.trim())
        .filter(|range| !range.is_empty() && parse_cidr_sloppy(range).is_none())
        .collect();
    if !invalid_ranges.is_empty() {
        skipped_fields.push(Problem::new(
            ProblemKind::Service,
            "skipped_field",
            format!(
                "{key}: spec.loadBalancerSourceRanges: {invalid_ranges:?} are not CIDRs, skipped"
            ),
        ));
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|port| PortRecord {
            name: Arc::from(port.name.as_deref().unwrap_or_default()),
            port: port.port,
            protocol: service_protocol(port.protocol.as_deref()).map_err(String::into_boxed_str),
            node_port: port.node_port,
        })
        .collect();
    let exposes_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    // kube-proxy's `ExternalPolicyLocal`: the policy only counts for a Service that is
    // reachable from outside at all; and only a LoadBalancer gets a health check
    // (`NeedsHealthCheck`), whatever a hand-written manifest sets.
    let external_policy_local = (exposes_node_ports
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty()))
        && spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = spec
        .health_check_node_port
        .and_then(port_number)
        .filter(|_| service_type == "LoadBalancer" && external_policy_local);
    let external_ips = addresses(spec.external_ips.iter().flatten().map(String::as_str));
    let load_balancer_ips = addresses(load_balancer_ips);
    let has_family = |addr: &IpAddr| {
        (cluster_ips.iter()).any(|cluster_ip| Family::of(*cluster_ip) == Family::of(*addr))
    };
    for (field, addresses) in [
        ("spec.externalIPs", &external_ips),
        ("status.loadBalancer.ingress", &load_balancer_ips),
    ] {
        let other: Vec<String> = (addresses.iter())
            .filter(|addr| !has_family(addr))
            .map(ToString::to_string)
            .collect();
        if !other.is_empty() {
            skipped_fields.push(Problem::new(
                ProblemKind::Service,
                "skipped_field",
                format!(
                    "{key}: {field}: {} skipped: the Service has no clusterIP of their family \
                     (kube-proxy's proxier of that family does not see the Service)",
                    other.join(", ")
                ),
            ));
        }
    }
    let annotations = service.metadata.annotations.as_ref();
    let selection = SelectionRequest::from_annotations(
        key,
        |name| annotations?.get(name).cloned(),
        &mut skipped_fields,
    );
    Ok(ProxiedService {
        cluster_ips,
        exposes_node_ports,
        external_ips,
        load_balancer_ips,
        internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_policy_local,
        health_check_node_port,
        source_ranges,
        session_affinity: session_affinity(&spec),
        selection,
        ports,
        skipped_fields,
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

/// The Service's clusterIP of each family, IPv4 first, as kube-proxy's
/// `GetClusterIPByFamily` finds them: `clusterIPs[i]` is the address of family
/// `ipFamilies[i]`; without `ipFamilies` (a Service written before dual-stack, or a
/// manifest the API server never defaulted) the families of `clusterIPs` — `clusterIP`
/// alone when that is unset — in their order. The sources' validation already refused a
/// Service whose lists disagree or name a family twice, as the API server does; an entry
/// that still does not fit is left out, never guessed.
fn cluster_ips(spec: &ServiceSpec, cluster_ip: &str) -> Vec<IpAddr> {
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(cluster_ips) if !cluster_ips.is_empty() => {
            cluster_ips.iter().map(String::as_str).collect()
        }
        _ => vec![cluster_ip],
    };
    let families: Vec<Option<Family>> = match spec.ip_families.as_deref() {
        Some(families) if !families.is_empty() => families
            .iter()
            .map(|family| Family::from_api(family))
            .collect(),
        _ => vec![None; listed.len()],
    };
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (text, family) in listed.iter().zip(families) {
        let Some(addr) = parse_ip_sloppy(text) else {
            continue;
        };
        let fits = family.is_none_or(|family| family == Family::of(addr));
        if fits
            && !addresses
                .iter()
                .any(|taken| Family::of(*taken) == Family::of(addr))
        {
            addresses.push(addr);
        }
    }
    addresses.sort();
    addresses
}

/// The addresses among `addresses`, both families, sorted (IPv4 first) and deduplicated;
/// unparsable ones never get past the sources' validation.
fn addresses<'a>(addresses: impl Iterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut parsed: Vec<IpAddr> = addresses.filter_map(parse_ip_sloppy).collect();
    parsed.sort();
    parsed.dedup();
    parsed
}

pub(crate) fn has_label(labels: Option<&BTreeMap<String, String>>, label: &str) -> bool {
    labels.is_some_and(|labels| labels.contains_key(label))
}

/// A Service port's protocol (TCP when unset, as the API defaults it).
pub(crate) fn service_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("protocol {other:?} is invalid")),
    }
}

/// The valid CIDRs among `ranges` (trimmed, read sloppily, truncated to their network),
/// both families, sorted (IPv4 first) and deduplicated. Unparsable entries are left out
/// (and reported), as kube-proxy leaves them out.
fn networks<'a>(ranges: impl Iterator<Item = &'a String>) -> Vec<IpNet> {
    let mut networks: Vec<IpNet> = ranges
        .filter_map(|range| parse_cidr_sloppy(range.trim()))
        .collect();
    networks.sort();
    networks.dedup();
    networks
}

pub(crate) fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&port| port != 0)
}
