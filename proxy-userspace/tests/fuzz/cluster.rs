//! The fuzzed node: the program loaded as the daemon loads it (`Datapath::load`, pins in a
//! private bpffs), its frontends written by the daemon's own planner and map writer from
//! Services in every state, and the two side programs (`epx_trace`, `epx_ct_reap`) loaded
//! against the same pins, as the CLI and the garbage collector load them.
//!
//! Addresses: the node is 198.18.0.1; pods of this node 198.18.1.0/24 (routed through a
//! veth, so no SNAT); pods of other nodes 198.18.2.0/24 and outside clients 198.18.0.0/24
//! and 198.18.3.0/24 (routed through `lo`, the device test runs arrive on: outside traffic
//! to them is SNATed, answers are routed by the program); VIPs 198.19.0.0/24. Three
//! ClusterIP Services are dual-stack: IPv6 VIPs in 2001:db8:19::/64, pods of this node
//! 2001:db8:118::/64, of another node 2001:db8:218::/64, clients 2001:db8:18::/64.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use ipnet::IpNet;
use proxy_common::{CtKey, CtTimeouts, CtValue, FragmentKey, FragmentValue, Ipv6, map_names};
use proxy_lab::{Endpoint, NODE_NAME, PrivateBpffs, Rng, Service};
use proxy_userspace::conntrack::ConntrackSizes;
use proxy_userspace::conntrack::gc::Reaper;
use proxy_userspace::datapath::{Datapath, MapSizes, SnatPortRange};
use proxy_userspace::inspect::trace::Tracer;
use proxy_userspace::model::Model;
use proxy_userspace::plan::{self, DesiredState, EmptyFrontend, NodeFacts};
use proxy_userspace::socket_lb::SocketLbMode;
use proxy_userspace::writer::MapWriter;

use crate::datapath::POD_VETH;
use crate::datapath::ipv6::ip6;
use crate::datapath::wire::End;
use crate::ipv6::End6;

pub const NODE: [u8; 4] = [198, 18, 0, 1];
/// Where a load balancer and `spec.externalIPs` send traffic to the node.
pub const LOAD_BALANCER_IP: [u8; 4] = [198, 18, 8, 1];
pub const EXTERNAL_IP: [u8; 4] = [198, 18, 9, 1];
/// The `lb` Service's loadBalancerSourceRanges: the first client network only.
pub const SOURCE_RANGE: &str = "198.18.0.0/24";
/// Small, so SNAT ports run out and clash remaps find their range busy.
pub const SNAT_PORTS: SnatPortRange = SnatPortRange {
    min: 61_000,
    max: 61_007,
};
/// Small maps: the LRU evicts during a run.
const CONNTRACK: ConntrackSizes = ConntrackSizes {
    assured: 8_192,
    pending: 4_096,
};
/// Seconds, short: flows expire during a run, so expired entries meet new packets and the
/// reaper finds flows to remove.
const TIMEOUTS: CtTimeouts = CtTimeouts {
    tcp_syn_sent: 2,
    tcp_syn_recv: 2,
    tcp_established: 6,
    tcp_close_wait: 3,
    tcp_time_wait: 2,
    tcp_close: 1,
    udp: 2,
    udp_stream: 4,
};

/// The network the fuzzed node sees (`ip` commands in its namespace) and its sysctls: the
/// node address, pods of this node behind a veth, everything else of 198.18.0.0/15
/// through `lo`; forwarding on (the program's FIB lookups ask for it); ICMP errors not
/// rate limited, so every refusal the program owes is sent and checked.
pub const NETWORK: [&[&str]; 7] = [
    &["link", "set", "lo", "up"],
    &["addr", "add", "198.18.0.1/32", "dev", "lo"],
    POD_VETH[0],
    POD_VETH[1],
    POD_VETH[2],
    &[
        "route",
        "add",
        "198.18.1.0/24",
        "dev",
        "pods",
        "src",
        "198.18.0.1",
    ],
    &[
        "route",
        "add",
        "198.18.0.0/15",
        "dev",
        "lo",
        "src",
        "198.18.0.1",
    ],
];
pub const SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv4/icmp_ratemask", "0"),
];

fn local_pod(i: u8) -> [u8; 4] {
    [198, 18, 1, i]
}

fn remote_pod(i: u8) -> [u8; 4] {
    [198, 18, 2, i]
}

/// The IPv6 cluster IPs of the dual-stack Services.
const VIP6_SPREAD: [u8; 16] = ip6(0x19, 10);
const VIP6_EMPTY: [u8; 16] = ip6(0x19, 11);
const VIP6_STICKY: [u8; 16] = ip6(0x19, 13);

fn local_pod6(i: u8) -> IpAddr {
    Ipv6Addr::from(ip6(0x118, i)).into()
}

fn remote_pod6(i: u8) -> IpAddr {
    Ipv6Addr::from(ip6(0x218, i)).into()
}

fn v4(octets: [u8; 4]) -> IpAddr {
    Ipv4Addr::from(octets).into()
}

/// A Service of the fuzzed cluster, and the endpoints it may have.
struct FuzzService {
    service: Service,
    /// Its IPv6 cluster IP, if dual-stack.
    vip6: Option<[u8; 16]>,
    /// Candidate endpoints (of both families when dual-stack): address and whether the pod
    /// runs on this node.
    pool: Vec<(IpAddr, bool)>,
    /// How many of the pool an epoch gives it.
    sizes: std::ops::RangeInclusive<usize>,
    /// Whether an endpoint may be terminating (serving, not ready).
    terminating: bool,
}

/// The Services, one per state a frontend can be in (SCTP ports beside TCP and UDP on a
/// ClusterIP with backends, one without, and a NodePort): backends to spread over, none at all
/// (refused), only terminating ones, session affinity, NodePorts with backends on this
/// and other nodes (SNAT), externalTrafficPolicy Local with or without a local endpoint
/// (dropped), both of these choosing by Maglev (a small table and the default one), a
/// load balancer with source ranges and an external IP; a pod that is also a
/// client is a backend of several (hairpin, through a ClusterIP and a NodePort). Each has
/// target ports of its own, so a backend reached through the wrong frontend shows.
fn services() -> Vec<FuzzService> {
    let ip = |octets: [u8; 4]| Ipv4Addr::from(octets);
    let vip = |last| Ipv4Addr::new(198, 19, 0, last);
    vec![
        FuzzService {
            service: Service::cluster_ip("spread", vip(10))
                .dual_stack(Ipv6Addr::from(VIP6_SPREAD))
                .tcp(80, 8080)
                .udp(53, 5353)
                .sctp(3868, 3870),
            vip6: Some(VIP6_SPREAD),
            pool: vec![
                (v4(local_pod(10)), true),
                (v4(local_pod(11)), true),
                (v4(local_pod(12)), true),
                (v4(remote_pod(10)), false),
                (local_pod6(10), true),
                (local_pod6(11), true),
                (remote_pod6(10), false),
            ],
            sizes: 0..=7,
            terminating: false,
        },
        FuzzService {
            service: Service::cluster_ip("empty", vip(11))
                .dual_stack(Ipv6Addr::from(VIP6_EMPTY))
                .tcp(80, 8081)
                .udp(53, 5351)
                .sctp(3868, 3871),
            vip6: Some(VIP6_EMPTY),
            pool: Vec::new(),
            sizes: 0..=0,
            terminating: false,
        },
        FuzzService {
            service: Service::cluster_ip("terminating", vip(12))
                .tcp(80, 8082)
                .udp(53, 5352),
            vip6: None,
            pool: vec![(v4(local_pod(13)), true), (v4(local_pod(14)), true)],
            sizes: 1..=2,
            terminating: true,
        },
        FuzzService {
            service: Service::cluster_ip("sticky", vip(13))
                .dual_stack(Ipv6Addr::from(VIP6_STICKY))
                .tcp(80, 8083)
                .udp(53, 5353)
                .client_ip_affinity(2),
            vip6: Some(VIP6_STICKY),
            pool: vec![
                (v4(local_pod(10)), true),
                (v4(local_pod(11)), true),
                (v4(remote_pod(10)), false),
                (local_pod6(10), true),
                (local_pod6(11), true),
                (remote_pod6(10), false),
            ],
            sizes: 1..=6,
            terminating: false,
        },
        FuzzService {
            service: Service::node_port("nodeport", vip(14))
                .tcp_node_port(80, 8084, 30_080)
                .udp_node_port(53, 5354, 30_053)
                .sctp_node_port(3868, 3874, 30_868)
                .annotation("ebpf-proxy.io/lb-algorithm", "maglev")
                .annotation("ebpf-proxy.io/maglev-table-size", "251"),
            vip6: None,
            pool: vec![
                (v4(remote_pod(11)), false),
                (v4(remote_pod(12)), false),
                (v4(local_pod(12)), true),
                (v4(local_pod(10)), true),
            ],
            sizes: 0..=4,
            terminating: false,
        },
        FuzzService {
            service: Service::node_port("local", vip(15))
                .tcp_node_port(80, 8085, 30_081)
                .udp_node_port(53, 5355, 30_054)
                .external_traffic_policy_local()
                .annotation("ebpf-proxy.io/lb-algorithm", "maglev"),
            vip6: None,
            pool: vec![(v4(remote_pod(13)), false), (v4(local_pod(15)), true)],
            sizes: 1..=2,
            terminating: false,
        },
        FuzzService {
            service: Service::load_balancer("lb", vip(16), ip(LOAD_BALANCER_IP))
                .tcp_node_port(80, 8086, 30_082)
                .udp_node_port(53, 5356, 30_055)
                .external_ip(ip(EXTERNAL_IP))
                .load_balancer_source_ranges(&[SOURCE_RANGE]),
            vip6: None,
            pool: vec![(v4(local_pod(15)), true), (v4(remote_pod(14)), false)],
            sizes: 0..=2,
            terminating: false,
        },
    ]
}

/// Where traffic may go, for the generator: the frontends' addresses, the backends'
/// addresses and ports, the clients.
pub struct Pools {
    /// (address, port, protocol) of every frontend any epoch has.
    pub frontends: Vec<(End, u8)>,
    /// Every candidate endpoint with each Service's target ports, per protocol.
    pub backends: Vec<(End, u8)>,
    /// Addresses of outside clients (inside and outside the source range) and of a pod
    /// that is also a backend (hairpin).
    pub clients: Vec<[u8; 4]>,
    pub node: [u8; 4],
    pub snat_ports: (u16, u16),
    /// The same for IPv6 (the dual-stack Services'; a pod of this node among the clients).
    pub frontends6: Vec<(End6, u8)>,
    pub backends6: Vec<(End6, u8)>,
    pub clients6: Vec<[u8; 16]>,
}

pub fn pools() -> Pools {
    let mut frontends = Vec::new();
    let mut backends = Vec::new();
    let (mut frontends6, mut backends6) = (Vec::new(), Vec::new());
    for spec in services() {
        for (protocol, port, target, node_port) in spec.service.ports() {
            let protocol = protocol.number();
            let IpAddr::V4(vip) = spec.service.address() else {
                unreachable!("the fuzzer's Services are IPv4")
            };
            let vip = vip.octets();
            frontends.push((End::new(vip, port), protocol));
            if let Some(node_port) = node_port {
                frontends.push((End::new(NODE, node_port), protocol));
            }
            if spec.service.name() == "lb" {
                frontends.push((End::new(LOAD_BALANCER_IP, port), protocol));
                frontends.push((End::new(EXTERNAL_IP, port), protocol));
            }
            if let Some(vip6) = spec.vip6 {
                frontends6.push((End6::new(vip6, port), protocol));
            }
            for (addr, _) in &spec.pool {
                match addr {
                    IpAddr::V4(addr) => backends.push((End::new(addr.octets(), target), protocol)),
                    IpAddr::V6(addr) => {
                        backends6.push((End6::new(addr.octets(), target), protocol));
                    }
                }
            }
        }
    }
    Pools {
        frontends,
        backends,
        clients: vec![
            [198, 18, 0, 10],
            [198, 18, 0, 11],
            [198, 18, 3, 10],
            [198, 18, 3, 11],
            local_pod(10),
        ],
        node: NODE,
        snat_ports: (SNAT_PORTS.min, SNAT_PORTS.max),
        frontends6,
        backends6,
        clients6: vec![ip6(0x18, 10), ip6(0x18, 11), ip6(0x118, 10)],
    }
}

/// The cluster's state in one epoch: each Service's endpoints, drawn from its pool.
pub struct Cluster {
    rng: Rng,
    node: NodeFacts,
}

impl Cluster {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed ^ 0xc1a5_7e55),
            node: NodeFacts {
                node_name: NODE_NAME.to_owned(),
                addresses: vec![Ipv4Addr::from(NODE).into()],
                ..NodeFacts::default()
            },
        }
    }

    /// The next epoch's desired state, planned by the daemon's planner.
    pub fn next_epoch(&mut self) -> Result<DesiredState> {
        let mut model = Model::default();
        for spec in services() {
            let size =
                spec.sizes.start() + self.rng.below(spec.sizes.end() - spec.sizes.start() + 1);
            let mut pool = spec.pool.clone();
            let mut endpoints = Vec::new();
            while endpoints.len() < size {
                let (addr, local) = pool.swap_remove(self.rng.below(pool.len()));
                let name = match addr {
                    IpAddr::V4(addr) => format!("pod-{}-{}", addr.octets()[2], addr.octets()[3]),
                    IpAddr::V6(addr) => format!("pod6-{:x}", addr.segments()[7]),
                };
                let mut endpoint = Endpoint::at(&name, addr);
                if !local {
                    endpoint = endpoint.on_node("other-node");
                }
                if spec.terminating && self.rng.below(2) == 0 {
                    endpoint = endpoint.terminating();
                }
                endpoints.push(endpoint);
            }
            for object in spec.service.manifest_with(&endpoints).objects() {
                if object["kind"] == "Service" {
                    model.insert_service(serde_json::from_value(object)?)?;
                } else {
                    model.insert_endpoint_slice(serde_json::from_value(object)?)?;
                }
            }
        }
        let planned = plan::plan(&model, &self.node);
        ensure!(
            planned.problems.is_empty(),
            "the fuzzed cluster has problems: {:?}",
            planned.problems
        );
        Ok(planned.desired)
    }
}

/// What a frontend does in the current epoch, as the checks need it (`E`: [`End`] or
/// [`End6`]).
#[derive(Clone, Debug)]
pub struct FrontendState<E = End> {
    /// Its backends (address and port): a new flow goes to one of these.
    pub backends: HashSet<E>,
    pub when_empty: EmptyFrontend,
    pub source_ranges: Vec<IpNet>,
}

impl<E> FrontendState<E> {
    /// Whether a new connection from `client` gets past the source ranges.
    pub fn admits(&self, client: impl Into<IpAddr>) -> bool {
        let client = client.into();
        self.source_ranges.is_empty()
            || (self.source_ranges.iter()).any(|range| range.contains(&client))
    }
}

/// The current epoch's frontends and backends, per family.
#[derive(Clone, Debug, Default)]
pub struct Frontends {
    pub frontends: BTreeMap<(End, u8), FrontendState>,
    pub backends: HashSet<(End, u8)>,
    pub frontends6: BTreeMap<(End6, u8), FrontendState<End6>>,
    pub backends6: HashSet<(End6, u8)>,
}

impl Frontends {
    fn of(desired: &DesiredState) -> Self {
        let mut frontends = Self::default();
        for (frontend, plan) in &desired.frontends {
            let protocol = frontend.protocol.number();
            let (when_empty, source_ranges) = (plan.when_empty, &plan.source_ranges);
            let backends = plan
                .backends
                .iter()
                .map(|backend| (backend.addr, backend.port));
            match frontend.addr {
                IpAddr::V4(addr) => {
                    let backends: HashSet<End> = (backends)
                        .map(|(addr, port)| End::new(octets4(addr), port))
                        .collect();
                    (frontends.backends).extend(backends.iter().map(|end| (*end, protocol)));
                    let key = (End::new(addr.octets(), frontend.port), protocol);
                    let state = FrontendState {
                        backends,
                        when_empty,
                        source_ranges: source_ranges.clone(),
                    };
                    frontends.frontends.insert(key, state);
                }
                IpAddr::V6(addr) => {
                    let backends: HashSet<End6> = (backends)
                        .map(|(addr, port)| End6::new(octets6(addr), port))
                        .collect();
                    (frontends.backends6).extend(backends.iter().map(|end| (*end, protocol)));
                    let key = (End6::new(addr.octets(), frontend.port), protocol);
                    let state = FrontendState {
                        backends,
                        when_empty,
                        source_ranges: source_ranges.clone(),
                    };
                    frontends.frontends6.insert(key, state);
                }
            }
        }
        frontends
    }

    pub fn get(&self, destination: End, protocol: u8) -> Option<&FrontendState> {
        self.frontends.get(&(destination, protocol))
    }

    pub fn is_backend(&self, destination: End, protocol: u8) -> bool {
        self.backends.contains(&(destination, protocol))
    }
}

/// A frontend's backend of its own family: the planner never mixes them.
fn octets4(addr: IpAddr) -> [u8; 4] {
    match addr {
        IpAddr::V4(addr) => addr.octets(),
        IpAddr::V6(addr) => panic!("an IPv4 frontend planned the IPv6 backend {addr}"),
    }
}

fn octets6(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V6(addr) => addr.octets(),
        IpAddr::V4(addr) => panic!("an IPv6 frontend planned the IPv4 backend {addr}"),
    }
}

/// The loaded node. Fields drop in order: programs and maps before the bpffs they pin in.
pub struct FuzzedNode {
    pub datapath: Datapath,
    writer: MapWriter,
    pub tracer: Tracer,
    pub reaper: Reaper,
    assured: BpfHashMap<MapData, CtKey, CtValue>,
    pending: BpfHashMap<MapData, CtKey, CtValue>,
    fragments: BpfHashMap<MapData, FragmentKey, FragmentValue>,
    assured6: BpfHashMap<MapData, CtKey<Ipv6>, CtValue<Ipv6>>,
    pending6: BpfHashMap<MapData, CtKey<Ipv6>, CtValue<Ipv6>>,
    fragments6: BpfHashMap<MapData, FragmentKey<Ipv6>, FragmentValue<Ipv6>>,
    pub stats: PerCpuArray<MapData, u64>,
    pub frontends: Frontends,
    _bpffs: PrivateBpffs,
}

impl FuzzedNode {
    /// Loads everything in the calling thread's network namespace.
    pub fn load() -> Result<Self> {
        let bpffs = PrivateBpffs::mount("fuzz")?;
        let root = bpffs.path().join("ebpf-proxy");
        let sizes = MapSizes {
            conntrack: CONNTRACK,
            snat_ports: SNAT_PORTS,
            ..MapSizes::default()
        };
        // The socket programs are cgroup hooks, which BPF_PROG_TEST_RUN cannot run.
        let mut datapath = Datapath::load(&root, sizes, TIMEOUTS, SocketLbMode::Off)?;
        datapath.load_xdp()?;
        let maps = datapath.take_maps()?;
        let writer = MapWriter::new(maps.writer).context("opening the map writer")?;
        let lru = |name: &str| -> Result<Map> {
            Ok(Map::LruHashMap(MapData::from_pin(root.join(name))?))
        };
        let conntrack = |name: &str| Ok::<_, anyhow::Error>(BpfHashMap::try_from(lru(name)?)?);
        Ok(Self {
            fragments: BpfHashMap::try_from(lru(map_names::FRAGMENTS)?)?,
            assured6: BpfHashMap::try_from(lru(map_names::CONNTRACK6)?)?,
            pending6: BpfHashMap::try_from(lru(map_names::CONNTRACK_PENDING6)?)?,
            fragments6: BpfHashMap::try_from(lru(map_names::FRAGMENTS6)?)?,
            tracer: Tracer::load(&root)?,
            reaper: Reaper::load(&root)?,
            assured: conntrack(map_names::CONNTRACK)?,
            pending: conntrack(map_names::CONNTRACK_PENDING)?,
            stats: maps.stats,
            datapath,
            writer,
            frontends: Frontends::default(),
            _bpffs: bpffs,
        })
    }

    /// Writes `desired` as the daemon does (the writer's ordered, batched diff).
    pub fn program(&mut self, desired: &DesiredState) -> Result<()> {
        let report = self.writer.apply(desired);
        ensure!(report.complete(), "writing the maps: {report:?}");
        self.frontends = Frontends::of(desired);
        Ok(())
    }

    /// The entries at `key` in CONNTRACK and CONNTRACK_PENDING.
    pub fn flows(&self, key: &CtKey) -> Flows {
        Flows {
            assured: self.assured.get(key, 0).ok(),
            pending: self.pending.get(key, 0).ok(),
        }
    }

    /// The entries at `key` in CONNTRACK6 and CONNTRACK_PENDING6.
    pub fn flows6(&self, key: &CtKey<Ipv6>) -> Flows<Ipv6> {
        Flows {
            assured: self.assured6.get(key, 0).ok(),
            pending: self.pending6.get(key, 0).ok(),
        }
    }

    /// The FRAGMENTS6 record of an IPv6 datagram.
    pub fn fragment_record6(&self, datagram: &FragmentKey<Ipv6>) -> Option<FragmentValue<Ipv6>> {
        self.fragments6.get(datagram, 0).ok()
    }

    /// The FRAGMENTS record of a datagram: what its first fragment's fate was.
    pub fn fragment_record(&self, datagram: &FragmentKey) -> Option<FragmentValue> {
        self.fragments.get(datagram, 0).ok()
    }

    /// Makes the entry at `key` (and its partner too, if `flow`) idle past its expiry, as
    /// time would: the run is far shorter than the timeouts.
    pub fn age(&mut self, assured: bool, key: &CtKey, flow: bool) -> Result<()> {
        let table = if assured {
            &mut self.assured
        } else {
            &mut self.pending
        };
        let Ok(mut entry) = table.get(key, 0) else {
            return Ok(());
        };
        let partner = CtKey::partner(&entry, key.proto);
        entry.expires_ns = 1;
        table.insert(key, entry, 0)?;
        if flow && let Ok(mut entry) = table.get(&partner, 0) {
            entry.expires_ns = 1;
            table.insert(partner, entry, 0)?;
        }
        Ok(())
    }

    /// The entry at `key` in one table (`assured`: CONNTRACK).
    pub fn flow_in(&self, assured: bool, key: &CtKey) -> Option<CtValue> {
        let table = if assured {
            &self.assured
        } else {
            &self.pending
        };
        table.get(key, 0).ok()
    }
}

/// The conntrack entries at one key (CONNTRACK's, or with `A` [`Ipv6`], CONNTRACK6's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flows<A: proxy_common::Address = u32> {
    pub assured: Option<CtValue<A>>,
    pub pending: Option<CtValue<A>>,
}

impl<A: proxy_common::Address> Default for Flows<A> {
    fn default() -> Self {
        Self {
            assured: None,
            pending: None,
        }
    }
}

impl<A: proxy_common::Address> Flows<A> {
    pub fn is_empty(&self) -> bool {
        self.assured.is_none() && self.pending.is_none()
    }

    pub fn values(&self) -> impl Iterator<Item = &CtValue<A>> {
        self.assured.iter().chain(self.pending.iter())
    }
}
