//! `ebpf-proxy explain`: the datapath's Services written as the iptables rules kube-proxy
//! (iptables mode) installs for the same Services, so admins can read them like on any
//! kube-proxy node and diff the two.
//!
//! Chain names are hashed exactly as kube-proxy's `pkg/proxy/iptables/proxier.go` does
//! (`portProtoHash`, `servicePortEndpointChainName`), probabilities are formatted like its
//! `computeProbability`, rules carry its comments, endpoints are in its order (sorted as
//! strings). The rules say what the datapath does, so where ebpf-proxy behaves differently
//! the text differs too, and a diff shows exactly that: no masquerade rules (ebpf-proxy
//! does no SNAT). Frontends without endpoints REJECT and those whose Local policy leaves
//! none on this node DROP, as in kube-proxy (the datapath does both). Session affinity is
//! kube-proxy's `recent` lists: an `--rcheck` rule per endpoint before the random choice,
//! a `--set` in each endpoint chain. NodePorts are
//! open only on the node addresses the maps hold, which kube-proxy writes as one
//! `-d <address> -j KUBE-NODEPORTS` rule each (its `--nodeport-addresses` form). A Service
//! port whose external frontends choose by Maglev gets a comment saying so: iptables has no
//! such rule, so its random rules list the endpoints but not the choice.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use clap::{Args, ValueEnum};
use data_encoding::BASE32;
use proxy_common::{
    Address, BackendSet, Ipv6, Origin, device_kind, maglev, map_names, service_flags,
};
use sha2::{Digest, Sha256};

use super::{
    PinArgs, frontend_label, print, protocol_name, read_image, service_port_name, socket_addr,
};
use crate::writer::MapImage;

#[derive(Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// `kube-proxy`: the text kube-proxy feeds to iptables-restore. `iptables-save`: the
    /// same rules as `iptables-save` prints them on a kube-proxy node, to diff against.
    #[arg(long, value_enum, default_value_t = Form::KubeProxy)]
    form: Form,
    /// Which family's rules: kube-proxy writes one ruleset per family, `ipv4` for
    /// iptables, `ipv6` for ip6tables (from the IPv6 maps).
    #[arg(long, value_enum, default_value_t = Family::Ipv4)]
    family: Family,
}

/// An address family, as `--family` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    fn of<A: Address>() -> Self {
        if A::BITS == 128 {
            Family::Ipv6
        } else {
            Family::Ipv4
        }
    }

    fn command(self) -> &'static str {
        match self {
            Family::Ipv4 => "iptables",
            Family::Ipv6 => "ip6tables",
        }
    }

    /// A single address as `iptables-save` prints it.
    fn host_prefix(self) -> u8 {
        match self {
            Family::Ipv4 => 32,
            Family::Ipv6 => 128,
        }
    }

    /// REJECT's default `--reject-with`.
    fn port_unreachable(self) -> &'static str {
        match self {
            Family::Ipv4 => "icmp-port-unreachable",
            Family::Ipv6 => "icmp6-port-unreachable",
        }
    }

    /// libxt_recent's default `--mask`: the whole address.
    fn full_mask(self) -> &'static str {
        match self {
            Family::Ipv4 => "255.255.255.255",
            Family::Ipv6 => "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        }
    }
}

impl ExplainArgs {
    pub fn run(self) -> Result<()> {
        let root = &self.pins.bpffs_root;
        let pods = pod_interfaces(root)?;
        let text = match self.family {
            Family::Ipv4 => render(&read_image::<u32>(root)?, &pods, self.form),
            Family::Ipv6 => render(&read_image::<Ipv6>(root)?, &pods, self.form),
        };
        print(text.trim_end())
    }
}

/// The pod devices the datapath is attached to (DEVICES), as kube-proxy's local-traffic
/// detector in `InterfaceNamePrefix` mode names them: `lxc12` → `lxc+`. Sorted, each once.
fn pod_interfaces(root: &std::path::Path) -> Result<Vec<String>> {
    let devices: aya::maps::HashMap<aya::maps::MapData, u32, u8> =
        super::open_typed(root, map_names::DEVICES)?;
    let mut prefixes: Vec<String> = devices
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, kind)| *kind == device_kind::POD)
        .filter_map(|(index, _)| interface_name(index))
        .map(|name| format!("{}+", name.trim_end_matches(|c: char| c.is_ascii_digit())))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    Ok(prefixes)
}

/// The name of interface `index` in this network namespace, if it exists.
fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has room for IF_NAMESIZE bytes, as the call requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// How rules are spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Form {
    /// Argument order and values as kube-proxy writes them (`-d 10.0.0.1`,
    /// `--probability 0.3333333333`).
    KubeProxy,
    /// As the kernel hands them back to `iptables-save` (`-d 10.0.0.1/32`, matches in
    /// canonical order, `--probability 0.33333333349`, REJECT's default option).
    IptablesSave,
}

const KUBE_SERVICES: &str = "KUBE-SERVICES";
const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";

/// `KUBE-SVC-`/`KUBE-SVL-`/`KUBE-EXT-` + kube-proxy's `portProtoHash`: base32 of
/// sha256(`namespace/name:port` + lowercase protocol), first 16 characters.
pub fn service_chain(prefix: &str, service_port: &str, protocol: &str) -> String {
    format!("{prefix}{}", hash16(&format!("{service_port}{protocol}")))
}

/// `KUBE-SEP-` + kube-proxy's `servicePortEndpointChainName` hash, which appends the
/// endpoint (`ip:port`, `[ip]:port` for IPv6: Go's `net.JoinHostPort`) to the service
/// port and protocol.
pub fn endpoint_chain(service_port: &str, protocol: &str, endpoint: &SocketAddr) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{service_port}{protocol}{endpoint}"))
    )
}

fn hash16(input: &str) -> String {
    let mut encoded = BASE32.encode(&Sha256::digest(input.as_bytes()));
    encoded.truncate(16);
    encoded
}

/// kube-proxy's `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// What the kernel keeps of that probability (xt_statistic stores it as a fraction of
/// 2^31) as `iptables-save` prints it: `%.11f`.
fn saved_probability(kube_proxy: &str) -> String {
    const SCALE: f64 = 2_147_483_648.0;
    let stored = (kube_proxy.parse::<f64>().unwrap_or(0.0) * SCALE).round();
    format!("{:.11}", stored / SCALE)
}

/// One Service port, gathered from its frontends.
#[derive(Default)]
struct ServicePort {
    cluster_ip: Option<(SocketAddr, Vec<SocketAddr>)>,
    /// `externalTrafficPolicy: Local`: the Cluster endpoints its external frontends send
    /// pods' traffic to (`service_flags::CLUSTER_SET`), which is what kube-proxy's
    /// KUBE-SVC chain holds.
    pod_cluster_endpoints: Option<Vec<SocketAddr>>,
    /// ExternalIP and LoadBalancer frontends, with their backends and rule comments.
    external: Vec<(SocketAddr, Vec<SocketAddr>, &'static str)>,
    /// NodePort frontends: the node address and its backends, by port.
    node_ports: BTreeMap<u16, Vec<SocketAddr>>,
    /// A frontend is empty only because its Local policy leaves no endpoint here: the
    /// Service has endpoints elsewhere (`service_flags::NO_LOCAL_ENDPOINTS`).
    has_remote_endpoints: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds (kube-proxy's
    /// `StickyMaxAgeSeconds`); 0 without affinity. Every frontend of a Service port carries
    /// the same.
    affinity_timeout_s: u32,
}

impl ServicePort {
    /// The endpoints of kube-proxy's cluster policy chain: the Cluster set pods reach an
    /// externalTrafficPolicy Local frontend with, else those of the ClusterIP, else those
    /// of the external frontends.
    fn cluster_endpoints(&self) -> &[SocketAddr] {
        self.pod_cluster_endpoints
            .as_deref()
            .or_else(|| {
                self.cluster_ip
                    .as_ref()
                    .map(|(_, endpoints)| endpoints.as_slice())
            })
            .or_else(|| self.external_endpoints())
            .unwrap_or(&[])
    }

    /// The endpoints of external traffic, if the port has external frontends (they all
    /// share one plan, so the first speaks for all).
    fn external_endpoints(&self) -> Option<&[SocketAddr]> {
        self.external
            .first()
            .map(|(_, endpoints, _)| endpoints.as_slice())
            .or_else(|| self.node_ports.values().next().map(Vec::as_slice))
    }
}

/// kube-proxy's session affinity in iptables: one `recent` list per endpoint chain, named
/// after it, keyed by the client's address.
enum Recent {
    /// `--rcheck --seconds N --reap`: the client was sent to this endpoint less than N
    /// seconds ago (and entries older than that are dropped).
    Check { list: String, seconds: u32 },
    /// `--set`: remember the client for this endpoint.
    Set { list: String },
}

impl Recent {
    fn render(&self, form: Form, family: Family) -> String {
        let mask = family.full_mask();
        match (self, form) {
            (Recent::Check { list, seconds }, Form::KubeProxy) => {
                format!(" -m recent --name {list} --rcheck --seconds {seconds} --reap")
            }
            (Recent::Set { list }, Form::KubeProxy) => format!(" -m recent --name {list} --set"),
            // libxt_recent prints the command first and adds its defaults (a full mask, the
            // source address).
            (Recent::Check { list, seconds }, Form::IptablesSave) => format!(
                " -m recent --rcheck --seconds {seconds} --reap --name {list} \
                 --mask {mask} --rsource"
            ),
            (Recent::Set { list }, Form::IptablesSave) => {
                format!(" -m recent --set --name {list} --mask {mask} --rsource")
            }
        }
    }
}

/// One rule, in parts, so both spellings come from one description.
#[derive(Default)]
struct Rule {
    chain: String,
    comment: Option<String>,
    /// `-i <interface>`: kube-proxy's local-traffic detector (`InterfaceNamePrefix`).
    in_interface: Option<String>,
    /// `-m addrtype --src-type LOCAL`: traffic of the node itself.
    src_type_local: bool,
    dst_type_local: bool,
    recent: Option<Recent>,
    protocol: Option<&'static str>,
    destination: Option<IpAddr>,
    dport: Option<u16>,
    probability: Option<String>,
    target: String,
    to_destination: Option<SocketAddr>,
}

impl Rule {
    fn new(chain: &str, target: &str) -> Self {
        Self {
            chain: chain.to_owned(),
            target: target.to_owned(),
            ..Self::default()
        }
    }

    fn render(&self, form: Form, family: Family) -> String {
        let mut line = format!("-A {}", self.chain);
        match form {
            // kube-proxy: comment first, then matches in the order its proxier appends them.
            Form::KubeProxy => {
                if let Some(comment) = &self.comment {
                    // kube-proxy quotes the comments it formats with spaces, not the bare
                    // service port names.
                    if comment.contains(' ') {
                        write!(line, " -m comment --comment \"{comment}\"").unwrap();
                    } else {
                        write!(line, " -m comment --comment {comment}").unwrap();
                    }
                }
                if let Some(interface) = &self.in_interface {
                    write!(line, " -i {interface}").unwrap();
                }
                if self.src_type_local {
                    line.push_str(" -m addrtype --src-type LOCAL");
                }
                if self.dst_type_local {
                    line.push_str(" -m addrtype --dst-type LOCAL");
                }
                if let Some(recent) = &self.recent {
                    line.push_str(&recent.render(form, family));
                }
                if let Some(protocol) = self.protocol {
                    write!(line, " -m {protocol} -p {protocol}").unwrap();
                }
                if let Some(destination) = self.destination {
                    write!(line, " -d {destination}").unwrap();
                }
                if let Some(dport) = self.dport {
                    write!(line, " --dport {dport}").unwrap();
                }
                if let Some(probability) = &self.probability {
                    write!(
                        line,
                        " -m statistic --mode random --probability {probability}"
                    )
                    .unwrap();
                }
                write!(line, " -j {}", self.target).unwrap();
            }
            // iptables-save: addresses and protocol first, then matches in insertion
            // order, each with its own options.
            Form::IptablesSave => {
                if let Some(destination) = self.destination {
                    write!(line, " -d {destination}/{}", family.host_prefix()).unwrap();
                }
                if let Some(interface) = &self.in_interface {
                    write!(line, " -i {interface}").unwrap();
                }
                if let Some(protocol) = self.protocol {
                    write!(line, " -p {protocol}").unwrap();
                }
                if let Some(comment) = &self.comment {
                    write!(line, " -m comment --comment \"{comment}\"").unwrap();
                }
                if self.src_type_local {
                    line.push_str(" -m addrtype --src-type LOCAL");
                }
                if self.dst_type_local {
                    line.push_str(" -m addrtype --dst-type LOCAL");
                }
                if let Some(recent) = &self.recent {
                    line.push_str(&recent.render(form, family));
                }
                if let Some(protocol) = self.protocol {
                    write!(line, " -m {protocol}").unwrap();
                    if let Some(dport) = self.dport {
                        write!(line, " --dport {dport}").unwrap();
                    }
                }
                if let Some(probability) = &self.probability {
                    let saved = saved_probability(probability);
                    write!(line, " -m statistic --mode random --probability {saved}").unwrap();
                }
                write!(line, " -j {}", self.target).unwrap();
                if self.target == "REJECT" {
                    write!(line, " --reject-with {}", family.port_unreachable()).unwrap();
                }
            }
        }
        if let Some(endpoint) = self.to_destination {
            write!(line, " --to-destination {endpoint}").unwrap();
        }
        line
    }
}

/// A table being written: chain declarations and rules, in kube-proxy's order.
#[derive(Default)]
struct Table {
    chains: Vec<String>,
    rules: Vec<Rule>,
}

impl Table {
    fn declare(&mut self, chain: String) {
        if !self.chains.contains(&chain) {
            self.chains.push(chain);
        }
    }

    fn render(&self, name: &str, form: Form, family: Family, out: &mut String) {
        writeln!(out, "*{name}").unwrap();
        for chain in &self.chains {
            writeln!(out, ":{chain} - [0:0]").unwrap();
        }
        let mut rules: Vec<&Rule> = self.rules.iter().collect();
        if form == Form::IptablesSave {
            // iptables-save lists the rules chain by chain.
            let position = |rule: &Rule| self.chains.iter().position(|c| *c == rule.chain);
            rules.sort_by_key(|rule| position(rule));
        }
        for rule in rules {
            writeln!(out, "{}", rule.render(form, family)).unwrap();
        }
        writeln!(out, "COMMIT").unwrap();
    }
}

/// The iptables-restore text for everything in `image` (ip6tables-restore's for IPv6's
/// maps: kube-proxy writes one ruleset per family); `pod_interfaces` are the pod devices
/// as kube-proxy's local-traffic detector names them (`lxc+`). Pure, so golden tests need
/// no kernel.
pub fn render<A: Address>(image: &MapImage<A>, pod_interfaces: &[String], form: Form) -> String {
    let family = Family::of::<A>();
    let mut out = format!(
        "# ebpf-proxy explain: the {} Services in the datapath's maps as the {} rules\n\
         # kube-proxy (iptables mode) would install for them. Left out because ebpf-proxy\n\
         # does not do it: masquerading (KUBE-MARK-MASQ, KUBE-POSTROUTING).\n",
        A::NAME,
        family.command(),
    );
    let mut ports: BTreeMap<(String, &'static str), ServicePort> = BTreeMap::new();
    let mut node_addresses = BTreeSet::new();
    let mut maglev_ports = BTreeMap::new();
    for (key, header) in &image.services {
        let Some(name) = image.names.get(&header.rev_nat_id) else {
            writeln!(
                out,
                "# {}: no Service name in SVC_NAMES, left out",
                frontend_label(key)
            )
            .unwrap();
            continue;
        };
        if let Some(size) = maglev::table_size(header.maglev) {
            maglev_ports.insert((service_port_name(name), protocol_name(key.proto)), size);
        }
        let port = ports
            .entry((service_port_name(name), protocol_name(key.proto)))
            .or_default();
        let frontend = socket_addr(key.addr, key.port);
        let endpoints = endpoints(image, &header.backends_for(Origin::Outside));
        let pods = header.backends_for(Origin::Pod);
        if pods.cluster {
            port.pod_cluster_endpoints = Some(self::endpoints(image, &pods));
        }
        port.has_remote_endpoints |= header.flags & service_flags::NO_LOCAL_ENDPOINTS != 0;
        port.affinity_timeout_s = port.affinity_timeout_s.max(header.affinity_timeout_s);
        if header.flags & service_flags::NODE_PORT != 0 {
            node_addresses.insert(frontend.ip());
            port.node_ports.insert(frontend.port(), endpoints);
        } else if header.flags & service_flags::LOAD_BALANCER != 0 {
            port.external.push((frontend, endpoints, "loadbalancer IP"));
        } else if header.flags & service_flags::EXTERNAL_IP != 0 {
            port.external.push((frontend, endpoints, "external IP"));
        } else {
            port.cluster_ip = Some((frontend, endpoints));
        }
    }

    for ((name, protocol), size) in &maglev_ports {
        writeln!(
            out,
            "# {name}/{protocol}: external frontends choose by Maglev (a table of {size} \
             positions, by the client's address, port and protocol, the same on every node); \
             iptables has no such rule (IPVS's mh scheduler is the nearest): their random \
             rules below list the endpoints, not the choice"
        )
        .unwrap();
    }
    let mut filter = Table::default();
    filter.declare(KUBE_SERVICES.into());
    filter.declare(KUBE_EXTERNAL_SERVICES.into());
    let mut nat = Table::default();
    nat.declare(KUBE_SERVICES.into());
    nat.declare(KUBE_NODEPORTS.into());
    for ((name, protocol), port) in &ports {
        write_service_port(name, protocol, port, pod_interfaces, &mut filter, &mut nat);
    }
    for address in node_addresses {
        nat.rules.push(Rule {
            comment: Some(
                "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
                    .into(),
            ),
            destination: Some(address),
            ..Rule::new(KUBE_SERVICES, KUBE_NODEPORTS)
        });
    }
    filter.render("filter", form, family, &mut out);
    nat.render("nat", form, family, &mut out);
    out
}

/// A set of a frontend's backends, sorted like kube-proxy sorts endpoints (as `ip:port`
/// text).
fn endpoints<A: Address>(image: &MapImage<A>, set: &BackendSet) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = (set.first..set.first + u32::from(set.count))
        .filter_map(|index| image.slots.get(&index))
        .map(|slot| socket_addr(slot.backend.addr, slot.backend.port))
        .collect();
    endpoints.sort_by_key(ToString::to_string);
    endpoints
}

/// kube-proxy's per-service-port part of `syncProxyRules`, for the frontends we have.
fn write_service_port(
    name: &str,
    protocol: &'static str,
    port: &ServicePort,
    pod_interfaces: &[String],
    filter: &mut Table,
    nat: &mut Table,
) {
    let cluster_chain = service_chain("KUBE-SVC-", name, protocol);
    let local_chain = service_chain("KUBE-SVL-", name, protocol);
    let external_chain = service_chain("KUBE-EXT-", name, protocol);
    let cluster_endpoints = port.cluster_endpoints();
    let external_endpoints = port.external_endpoints();
    let has_endpoints = !cluster_endpoints.is_empty()
        || external_endpoints.is_some_and(|e| !e.is_empty())
        || port.has_remote_endpoints;
    let (no_endpoints, empty_target) = if has_endpoints {
        (format!("{name} has no local endpoints"), "DROP")
    } else {
        (format!("{name} has no endpoints"), "REJECT")
    };
    // externalTrafficPolicy Local (known by its Cluster set for pods, or by endpoints
    // that differ from the Cluster ones): external traffic goes to the local chain.
    let external_local = port.pod_cluster_endpoints.is_some()
        || external_endpoints.is_some_and(|endpoints| endpoints != cluster_endpoints);
    let external_policy_chain = match external_endpoints {
        Some(endpoints) if !endpoints.is_empty() && external_local => Some(&local_chain),
        Some(endpoints) if !endpoints.is_empty() => Some(&cluster_chain),
        _ => None,
    };

    if let Some((frontend, endpoints)) = &port.cluster_ip {
        let (table, chain, target, comment) = if endpoints.is_empty() {
            (
                &mut *filter,
                KUBE_SERVICES,
                empty_target,
                no_endpoints.clone(),
            )
        } else {
            (
                &mut *nat,
                KUBE_SERVICES,
                cluster_chain.as_str(),
                format!("{name} cluster IP"),
            )
        };
        table.rules.push(Rule {
            comment: Some(comment),
            protocol: Some(protocol),
            destination: Some(frontend.ip()),
            dport: Some(frontend.port()),
            ..Rule::new(chain, target)
        });
    }
    for (frontend, _, kind) in &port.external {
        let rule = |chain: &str, target: &str, comment: String| Rule {
            comment: Some(comment),
            protocol: Some(protocol),
            destination: Some(frontend.ip()),
            dport: Some(frontend.port()),
            ..Rule::new(chain, target)
        };
        if has_endpoints {
            nat.rules.push(rule(
                KUBE_SERVICES,
                &external_chain,
                format!("{name} {kind}"),
            ));
        }
        if external_policy_chain.is_none() {
            filter.rules.push(rule(
                KUBE_EXTERNAL_SERVICES,
                empty_target,
                no_endpoints.clone(),
            ));
        }
    }
    for node_port in port.node_ports.keys() {
        if has_endpoints {
            nat.rules.push(Rule {
                comment: Some(name.to_owned()),
                protocol: Some(protocol),
                dport: Some(*node_port),
                ..Rule::new(KUBE_NODEPORTS, &external_chain)
            });
        }
        if external_policy_chain.is_none() {
            filter.rules.push(Rule {
                comment: Some(no_endpoints.clone()),
                dst_type_local: true,
                protocol: Some(protocol),
                dport: Some(*node_port),
                ..Rule::new(KUBE_EXTERNAL_SERVICES, empty_target)
            });
        }
    }

    if has_endpoints && external_endpoints.is_some() {
        nat.declare(external_chain.clone());
        // Pods and the node itself reach a Local-policy frontend's Cluster endpoints,
        // short-circuiting the policy (and its DROP) as kube-proxy's local-traffic detector
        // and its "route LOCAL traffic" rule do (the node's, at the socket: --socket-lb).
        // Its masquerade of the node's traffic is left out, like every masquerade rule.
        if port.pod_cluster_endpoints.is_some() && !cluster_endpoints.is_empty() {
            for interface in pod_interfaces {
                nat.rules.push(Rule {
                    comment: Some(format!("pod traffic for {name} external destinations")),
                    in_interface: Some(interface.clone()),
                    ..Rule::new(&external_chain, &cluster_chain)
                });
            }
            nat.rules.push(Rule {
                comment: Some(format!(
                    "route LOCAL traffic for {name} external destinations"
                )),
                src_type_local: true,
                ..Rule::new(&external_chain, &cluster_chain)
            });
        }
        if let Some(policy_chain) = external_policy_chain {
            nat.rules.push(Rule::new(&external_chain, policy_chain));
        }
    }
    let affinity = port.affinity_timeout_s;
    if !cluster_endpoints.is_empty() {
        write_policy_chain(
            name,
            protocol,
            &cluster_chain,
            cluster_endpoints,
            affinity,
            nat,
        );
    }
    if external_policy_chain == Some(&local_chain) {
        let endpoints = external_endpoints.unwrap_or_default();
        write_policy_chain(name, protocol, &local_chain, endpoints, affinity, nat);
    }
    // One chain per endpoint reachable by either policy, in endpoint order.
    let reachable: BTreeMap<String, &SocketAddr> = cluster_endpoints
        .iter()
        .chain(external_endpoints.unwrap_or_default())
        .map(|endpoint| (endpoint.to_string(), endpoint))
        .collect();
    for endpoint in reachable.into_values() {
        let chain = endpoint_chain(name, protocol, endpoint);
        nat.declare(chain.clone());
        nat.rules.push(Rule {
            comment: Some(name.to_owned()),
            // Remember the client for this endpoint (kube-proxy's "update client-affinity
            // lists").
            recent: (affinity > 0).then(|| Recent::Set {
                list: chain.clone(),
            }),
            protocol: Some(protocol),
            to_destination: Some(*endpoint),
            ..Rule::new(&chain, "DNAT")
        });
    }
}

/// kube-proxy's `writeServiceToEndpointRules`: with session affinity (a non-zero
/// `affinity_timeout_s`), first one rule per endpoint that sends a client back to the
/// endpoint whose `recent` list saw it within the timeout; then endpoint i of n is taken with probability
/// 1/(n-i), the last one always: every endpoint gets 1/n, like the datapath's random slot.
fn write_policy_chain(
    name: &str,
    protocol: &'static str,
    chain: &str,
    endpoints: &[SocketAddr],
    affinity_timeout_s: u32,
    nat: &mut Table,
) {
    nat.declare(chain.to_owned());
    if affinity_timeout_s > 0 {
        for endpoint in endpoints {
            let endpoint_chain = endpoint_chain(name, protocol, endpoint);
            nat.rules.push(Rule {
                comment: Some(format!("{name} -> {endpoint}")),
                recent: Some(Recent::Check {
                    list: endpoint_chain.clone(),
                    seconds: affinity_timeout_s,
                }),
                ..Rule::new(chain, &endpoint_chain)
            });
        }
    }
    let count = endpoints.len();
    for (index, endpoint) in endpoints.iter().enumerate() {
        nat.rules.push(Rule {
            comment: Some(format!("{name} -> {endpoint}")),
            probability: (index + 1 < count).then(|| probability(count - index)),
            ..Rule::new(chain, &endpoint_chain(name, protocol, endpoint))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::test_support::{Port, dual_stack, image, image_with_cluster_sets, written};
    use crate::plan::{FrontendKind, Protocol};

    fn endpoint(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn chain_names_hash_like_kube_proxy() {
        // The vectors, and a Service from a real node's iptables-save.
        let svc = |name, protocol| service_chain("KUBE-SVC-", name, protocol);
        assert_eq!(
            svc("default/kubernetes:https", "tcp"),
            "KUBE-SVC-NPX46M4PTMTKRN6Y"
        );
        assert_eq!(
            svc("kube-system/kube-dns:dns", "udp"),
            "KUBE-SVC-TCOU7JCQXEZGVUNU"
        );
        assert_eq!(
            svc("default/nginx:80-80", "tcp"),
            "KUBE-SVC-OVTWZ4GROBJZO4C5"
        );
        assert_eq!(
            service_chain("KUBE-EXT-", "default/nginx:80-80", "tcp"),
            "KUBE-EXT-OVTWZ4GROBJZO4C5"
        );
        let sep = |text| endpoint_chain("default/nginx:80-80", "tcp", &endpoint(text));
        assert_eq!(sep("10.42.0.199:80"), "KUBE-SEP-ZGUCVTBPJNCW75NN");
        assert_eq!(sep("10.42.0.200:80"), "KUBE-SEP-UIOQG3KKGTPDCR56");
    }

    #[test]
    fn probabilities_are_formatted_like_kube_proxy_and_read_back_like_the_kernel() {
        let cases = [
            (2, "0.5000000000", "0.50000000000"),
            (3, "0.3333333333", "0.33333333349"),
            (4, "0.2500000000", "0.25000000000"),
            (5, "0.2000000000", "0.20000000019"),
            (7, "0.1428571429", "0.14285714272"),
        ];
        for (n, written, saved) in cases {
            assert_eq!(probability(n), written, "1/{n}");
            assert_eq!(saved_probability(written), saved, "1/{n} saved");
        }
    }

    /// The golden tests' Services: two single-port ClusterIPs (the hash vectors),
    /// a NodePort Service with three endpoints, and one without endpoints.
    fn golden_image() -> MapImage {
        image(&[
            Port {
                service: ("default", "kubernetes", "https"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 1], 443, Protocol::Tcp),
                backends: &[([198, 18, 0, 1], 6443)],
            },
            Port {
                service: ("kube-system", "kube-dns", "dns"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 10], 53, Protocol::Udp),
                // As text, .10 sorts before .9: kube-proxy's endpoint order.
                backends: &[([198, 18, 1, 9], 53), ([198, 18, 1, 10], 53)],
            },
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 20], 80, Protocol::Tcp),
                backends: &[
                    ([198, 18, 1, 11], 8080),
                    ([198, 18, 1, 12], 8080),
                    ([198, 18, 1, 13], 8080),
                ],
            },
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30080, Protocol::Tcp),
                backends: &[
                    ([198, 18, 1, 11], 8080),
                    ([198, 18, 1, 12], 8080),
                    ([198, 18, 1, 13], 8080),
                ],
            },
            Port {
                service: ("default", "empty", ""),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 30], 80, Protocol::Tcp),
                backends: &[],
            },
            Port {
                service: ("default", "empty", ""),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30090, Protocol::Tcp),
                backends: &[],
            },
        ])
    }

    #[test]
    fn an_empty_local_policy_frontend_drops_where_one_without_endpoints_rejects() {
        let mut image = image(&[Port {
            service: ("default", "local", ""),
            kind: FrontendKind::NodePort,
            frontend: ([198, 18, 0, 1], 30091, Protocol::Tcp),
            backends: &[],
        }]);
        for header in image.services.values_mut() {
            header.flags |= service_flags::NO_LOCAL_ENDPOINTS;
        }
        let text = render(&image, &[], Form::KubeProxy);
        assert!(
            text.contains(
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"default/local has no local \
                 endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30091 -j DROP\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_sctp_service_port_gets_sctp_matches_and_its_own_chain_names() {
        let image = image(&[Port {
            service: ("default", "diameter", "sig"),
            kind: FrontendKind::ClusterIp,
            frontend: ([198, 19, 0, 40], 3868, Protocol::Sctp),
            backends: &[([198, 18, 1, 11], 3869)],
        }]);
        let text = render(&image, &[], Form::KubeProxy);
        let svc = service_chain("KUBE-SVC-", "default/diameter:sig", "sctp");
        assert_ne!(
            svc,
            service_chain("KUBE-SVC-", "default/diameter:sig", "tcp")
        );
        for rule in [
            format!(
                "-A KUBE-SERVICES -m comment --comment \"default/diameter:sig cluster IP\" \
                 -m sctp -p sctp -d 198.19.0.40 --dport 3868 -j {svc}\n"
            ),
            "-m sctp -p sctp -j DNAT --to-destination 198.18.1.11:3869\n".to_owned(),
        ] {
            assert!(text.contains(&rule), "{rule} missing from:\n{text}");
        }
    }

    #[test]
    fn renders_the_golden_text_in_both_forms() {
        let image = golden_image();
        let cases = [
            (
                Form::KubeProxy,
                include_str!("testdata/explain-kube-proxy.txt"),
            ),
            (
                Form::IptablesSave,
                include_str!("testdata/explain-iptables-save.txt"),
            ),
        ];
        for (form, golden) in cases {
            let text = render(&image, &[], form);
            assert!(
                text == golden,
                "{form:?} differs from its golden file; got:\n{text}"
            );
        }
    }

    /// The IPv6 maps read as ip6tables rules: addresses of 128 bits, endpoints as Go's
    /// `net.JoinHostPort` writes them (`[ip]:port`, in the endpoint chain's hash too),
    /// REJECT with ICMPv6's port unreachable, `recent` lists masked over 128 bits.
    #[test]
    fn the_ipv6_maps_read_as_ip6tables_rules() {
        let mut desired = dual_stack();
        let (vip6, mut plan) = desired.frontends.pop_last().unwrap();
        plan.session_affinity = Some(std::time::Duration::from_secs(60));
        desired.frontends.insert(vip6, plan.clone());
        plan.backends.clear();
        plan.service.name = "empty".into();
        let empty = crate::plan::Frontend {
            addr: "2001:db8:ff::20".parse().unwrap(),
            ..vip6
        };
        desired.frontends.insert(empty, plan);
        let image = written::<Ipv6>(&desired);
        let saved = render(&image, &[], Form::IptablesSave);
        let endpoint = endpoint("[2001:db8:1::11]:8080");
        let sep = endpoint_chain("default/dual:http", "tcp", &endpoint);
        assert!(
            saved.starts_with("# ebpf-proxy explain: the IPv6 Services"),
            "{saved}"
        );
        assert!(saved.contains("as the ip6tables rules"), "{saved}");
        for line in [
            "-A KUBE-SERVICES -d 2001:db8:ff::10/128 -p tcp -m comment --comment \
             \"default/dual:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-",
            "-A KUBE-SERVICES -d 2001:db8:ff::20/128 -p tcp -m comment --comment \
             \"default/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT \
             --reject-with icmp6-port-unreachable",
            &format!(
                "-A {sep} -p tcp -m comment --comment \"default/dual:http\" -m recent --set \
                 --name {sep} --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp \
                 -j DNAT --to-destination [2001:db8:1::11]:8080"
            ),
        ] {
            assert!(saved.contains(line), "{line}\nnot in:\n{saved}");
        }
        // kube-proxy's spelling, and the IPv4 maps of the same state stay IPv4's.
        let kube_proxy = render(&image, &[], Form::KubeProxy);
        let vip = " -d 2001:db8:ff::10 --dport 80 -j KUBE-SVC-";
        assert!(kube_proxy.contains(vip), "{kube_proxy}");
        let ipv4 = render(&written::<u32>(&desired), &[], Form::KubeProxy);
        assert!(
            ipv4.contains("-d 198.19.0.10 --dport 80") && !ipv4.contains("2001:db8"),
            "{ipv4}"
        );
    }

    #[test]
    fn external_traffic_with_other_endpoints_gets_a_local_policy_chain() {
        // externalTrafficPolicy: Local: the NodePort has only this node's endpoint.
        let image = image(&[
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 20], 80, Protocol::Tcp),
                backends: &[([198, 18, 1, 11], 8080), ([198, 18, 1, 12], 8080)],
            },
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30080, Protocol::Tcp),
                backends: &[([198, 18, 1, 12], 8080)],
            },
        ]);
        let text = render(&image, &[], Form::KubeProxy);
        let local = service_chain("KUBE-SVL-", "default/web:http", "tcp");
        let external = service_chain("KUBE-EXT-", "default/web:http", "tcp");
        assert!(
            text.contains(&format!("-A {external} -j {local}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "-A {local} -m comment --comment \"default/web:http -> 198.18.1.12:8080\" -j KUBE-SEP-"
            )),
            "{text}"
        );
        assert_eq!(
            text.matches("-j DNAT").count(),
            2,
            "one chain per endpoint: {text}"
        );
    }

    /// kube-proxy's session affinity: one `recent` check per endpoint before the random
    /// choice, in the cluster and the local policy chain alike, and a `--set` in each
    /// endpoint chain (`writeServiceToEndpointRules` and the endpoint chains of
    /// `syncProxyRules`); `iptables-save` spells them as libxt_recent saves them.
    #[test]
    fn session_affinity_adds_kube_proxys_recent_rules() {
        let mut image = image(&[
            Port {
                service: ("default", "sticky", "http"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 40], 80, Protocol::Tcp),
                backends: &[([198, 18, 1, 11], 8080), ([198, 18, 1, 12], 8080)],
            },
            // externalTrafficPolicy: Local, one local endpoint: a KUBE-SVL chain.
            Port {
                service: ("default", "sticky", "http"),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30040, Protocol::Tcp),
                backends: &[([198, 18, 1, 12], 8080)],
            },
        ]);
        for header in image.services.values_mut() {
            header.affinity_timeout_s = 600;
        }
        let svc = service_chain("KUBE-SVC-", "default/sticky:http", "tcp");
        let svl = service_chain("KUBE-SVL-", "default/sticky:http", "tcp");
        let sep = |address| endpoint_chain("default/sticky:http", "tcp", &endpoint(address));
        let (sep_11, sep_12) = (sep("198.18.1.11:8080"), sep("198.18.1.12:8080"));
        let comment = |address| format!("\"default/sticky:http -> {address}\"");
        let (to_11, to_12) = (comment("198.18.1.11:8080"), comment("198.18.1.12:8080"));

        let text = render(&image, &[], Form::KubeProxy);
        let expected = [
            format!(
                "-A {svc} -m comment --comment {to_11} -m recent --name {sep_11} --rcheck \
                 --seconds 600 --reap -j {sep_11}\n\
                 -A {svc} -m comment --comment {to_12} -m recent --name {sep_12} --rcheck \
                 --seconds 600 --reap -j {sep_12}\n\
                 -A {svc} -m comment --comment {to_11} -m statistic --mode random \
                 --probability 0.5000000000 -j {sep_11}\n\
                 -A {svc} -m comment --comment {to_12} -j {sep_12}\n"
            ),
            format!(
                "-A {svl} -m comment --comment {to_12} -m recent --name {sep_12} --rcheck \
                 --seconds 600 --reap -j {sep_12}\n\
                 -A {svl} -m comment --comment {to_12} -j {sep_12}\n"
            ),
            format!(
                "-A {sep_11} -m comment --comment default/sticky:http -m recent --name {sep_11} \
                 --set -m tcp -p tcp -j DNAT --to-destination 198.18.1.11:8080\n"
            ),
        ];
        for rules in expected {
            assert!(text.contains(&rules), "lacks\n{rules}in\n{text}");
        }

        let saved = render(&image, &[], Form::IptablesSave);
        let expected = [
            format!(
                "-A {svc} -m comment --comment {to_11} -m recent --rcheck --seconds 600 --reap \
                 --name {sep_11} --mask 255.255.255.255 --rsource -j {sep_11}\n"
            ),
            format!(
                "-A {sep_12} -p tcp -m comment --comment \"default/sticky:http\" -m recent --set \
                 --name {sep_12} --mask 255.255.255.255 --rsource -m tcp -j DNAT \
                 --to-destination 198.18.1.12:8080\n"
            ),
        ];
        for rules in expected {
            assert!(saved.contains(&rules), "lacks\n{rules}in\n{saved}");
        }
    }

    /// kube-proxy's KUBE-EXT chain of an externalTrafficPolicy Local Service
    /// (`TestExternalTrafficPolicyLocal`, `TestInternalExternalMasquerade`): pod traffic
    /// (its local-traffic detector) jumps to KUBE-SVC, the rest to KUBE-SVL; with no local
    /// endpoint the filter DROP catches what the EXT chain did not short-circuit.
    #[test]
    fn pods_reach_a_local_policy_frontends_cluster_endpoints() {
        let cluster: &[([u8; 4], u16)] = &[([198, 18, 1, 11], 8080), ([198, 18, 1, 12], 8080)];
        let node_port = ([198, 18, 0, 1], 30080, Protocol::Tcp);
        let ports = |local: &'static [([u8; 4], u16)]| {
            vec![
                Port {
                    service: ("default", "web", "http"),
                    kind: FrontendKind::ClusterIp,
                    frontend: ([198, 19, 0, 20], 80, Protocol::Tcp),
                    backends: cluster,
                },
                Port {
                    service: ("default", "web", "http"),
                    kind: FrontendKind::NodePort,
                    frontend: node_port,
                    backends: local,
                },
            ]
        };
        let svc = service_chain("KUBE-SVC-", "default/web:http", "tcp");
        let svl = service_chain("KUBE-SVL-", "default/web:http", "tcp");
        let ext = service_chain("KUBE-EXT-", "default/web:http", "tcp");
        let pods = ["lxc+".to_owned()];

        let with_local =
            image_with_cluster_sets(&ports(&[([198, 18, 1, 12], 8080)]), &[(node_port, cluster)]);
        let text = render(&with_local, &pods, Form::KubeProxy);
        let rules = format!(
            "-A {ext} -m comment --comment \"pod traffic for default/web:http external \
             destinations\" -i lxc+ -j {svc}\n-A {ext} -m comment --comment \"route LOCAL \
             traffic for default/web:http external destinations\" -m addrtype --src-type \
             LOCAL -j {svc}\n-A {ext} -j {svl}\n"
        );
        assert!(text.contains(&rules), "lacks\n{rules}in\n{text}");
        let saved = render(&with_local, &pods, Form::IptablesSave);
        let rule = format!(
            "-A {ext} -i lxc+ -m comment --comment \"pod traffic for default/web:http \
             external destinations\" -j {svc}\n"
        );
        assert!(saved.contains(&rule), "lacks\n{rule}in\n{saved}");

        let mut without_local = image_with_cluster_sets(&ports(&[]), &[(node_port, cluster)]);
        for header in without_local.services.values_mut() {
            if header.flags & service_flags::NODE_PORT != 0 {
                header.flags |= service_flags::NO_LOCAL_ENDPOINTS;
            }
        }
        let text = render(&without_local, &pods, Form::KubeProxy);
        assert!(
            text.contains(&format!("-i lxc+ -j {svc}\n")),
            "pods still short-circuit: {text}"
        );
        assert!(!text.contains(&format!("-A {ext} -j")), "{text}");
        assert!(
            text.contains(
                "--comment \"default/web:http has no local endpoints\" -m addrtype \
                           --dst-type LOCAL -m tcp -p tcp --dport 30080 -j DROP"
            ),
            "{text}"
        );
    }

    #[test]
    fn frontends_without_a_name_are_listed_as_left_out() {
        let mut image = golden_image();
        image.names.clear();
        let text = render(&image, &[], Form::KubeProxy);
        assert!(text.contains("# 198.19.0.1:443/tcp: no Service name in SVC_NAMES, left out"));
        assert!(!text.contains("KUBE-SVC-"), "{text}");
    }

    #[test]
    fn maglev_service_ports_say_iptables_has_no_such_choice() {
        let mut image = golden_image();
        let node_port = proxy_common::FrontendKey::new([198, 18, 0, 1], 30080, 6);
        image.services.get_mut(&node_port).unwrap().maglev =
            maglev::header_value(maglev::DEFAULT_TABLE_SIZE).unwrap();
        let text = render(&image, &[], Form::KubeProxy);
        assert!(
            text.contains(
                "# default/web:http/tcp: external frontends choose by Maglev (a table of 16381 \
                 positions"
            ),
            "{text}"
        );
        // The rules themselves are unchanged.
        let without = render(&golden_image(), &[], Form::KubeProxy);
        let rules = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(rules(&text), rules(&without));
    }
}
