//! Part 1 of the XDP measurement, per packet: `epx_xdp` and `epx_ingress` on the same
//! frames by BPF_PROG_TEST_RUN (see the module above). IPv6's rows run the same packets
//! between the IPv6 twins of the same addresses ([`cluster::ipv6_twin`]) to single-stack
//! IPv6 twins of the two Services, through the programs' tail calls (`epx_xdp6`,
//! `epx_ingress6`), interleaved with IPv4's run by run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Context, Result, ensure};
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    CtTimeouts, PROGRAM_NAME, PROGRAM6_NAME, SNAT_PORT_MAX_GLOBAL, SNAT_PORT_MIN_GLOBAL,
    XDP_PROGRAM_NAME, XDP6_PROGRAM_NAME, map_names, stat, tail_call,
};
use proxy_lab::PrivateBpffs;
use proxy_userspace::model::Model;
use proxy_userspace::plan::{self, NodeFacts};
use proxy_userspace::writer::{MapWriter, WriterMaps};

use super::{XdpPacketCost, XdpSettings};
use crate::cluster::{self, BenchService, ipv6_twin};
use crate::packet::{Flags, endpoints_of, tcp_frame_between};
use crate::stats::{Summary, median};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The node's address, on the wire.
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0x0a, 1];
/// The NodePorts of the Service served here and of the one served elsewhere.
const LOCAL_PORT: u16 = 30_080;
const REMOTE_PORT: u16 = 30_081;
/// Pods of this node, behind `pod0`; pods of other nodes, reached through the wire.
const LOCAL_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const REMOTE_PODS: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 10);
const PODS_PER_SERVICE: u32 = 10;
const POD_PORT: u16 = 8080;
/// The client of the established flows (its MAC known to the node).
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 99), 40_000);
/// New flows come from 198.18.0.100 on, 60 000 ports each.
const FIRST_NEW_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORTS_PER_CLIENT: usize = 60_000;
/// A destination that is no frontend.
const NOT_A_SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 250), 9);

fn nth(base: Ipv4Addr, offset: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + offset)
}

/// The MAC the node's neighbour table gives `address` (an IPv6 twin: its IPv4 address's,
/// one host of both families).
fn mac_of(address: IpAddr) -> [u8; 6] {
    let [c, d] = match address {
        IpAddr::V4(address) => [address.octets()[2], address.octets()[3]],
        IpAddr::V6(address) => [address.octets()[14], address.octets()[15]],
    };
    [2, 0, 0, 0xbe, c, d]
}

/// The family of a row: IPv4's addresses, or their IPv6 twins.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// `address` in this family.
    fn at(self, address: Ipv4Addr) -> IpAddr {
        match self {
            Family::Ipv4 => address.into(),
            Family::Ipv6 => ipv6_twin(address).into(),
        }
    }

    fn endpoint(self, endpoint: SocketAddrV4) -> SocketAddr {
        SocketAddr::new(self.at(*endpoint.ip()), endpoint.port())
    }

    /// The table's label of `kind`'s row.
    fn label(self, kind: Kind) -> String {
        match self {
            Family::Ipv4 => kind.label().to_owned(),
            Family::Ipv6 => format!("IPv6: {}", kind.label()),
        }
    }
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// The wire (`wire0`, the node's side of a veth), a device for this node's pods, routes,
/// and the neighbours XDP needs; returns the wire's ifindex.
fn wire_up() -> Result<u32> {
    let mut commands: Vec<Vec<String>> = [
        "link set lo up",
        &format!(
            "link add wire0 address {} type veth peer name wire1",
            mac_text(NODE_MAC)
        ),
        "link set wire0 up",
        "link set wire1 up",
        "link add pod0 type veth peer name pod1",
        "link set pod0 up",
        "link set pod1 up",
        &format!("addr add {NODE}/24 dev wire0"),
        "route add 198.18.0.0/16 dev wire0 src 198.18.0.1",
        "route add 198.18.1.0/24 dev pod0",
        // The twins of the same: 198.18.0.0/16's in a /112, 198.18.1.0/24's in a /120.
        &format!("-6 addr add {}/112 dev wire0 nodad", ipv6_twin(NODE)),
        &format!(
            "-6 route add {}/120 dev pod0",
            ipv6_twin(Ipv4Addr::new(198, 18, 1, 0))
        ),
    ]
    .iter()
    .map(|line| line.split_whitespace().map(str::to_owned).collect())
    .collect();
    let neighbours = (0..PODS_PER_SERVICE)
        .map(|pod| nth(REMOTE_PODS, pod))
        .chain([*CLIENT.ip()])
        .flat_map(|neighbour| Family::ALL.map(|family| family.at(neighbour)));
    for neighbour in neighbours {
        commands.push(
            format!(
                "neigh add {neighbour} lladdr {} dev wire0 nud permanent",
                mac_text(mac_of(neighbour))
            )
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        );
    }
    for args in commands {
        let status = std::process::Command::new("ip").args(&args).status()?;
        ensure!(status.success(), "ip {}", args.join(" "));
    }
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
    let name = c"wire0";
    // SAFETY: a valid C string; the lookup happens in this thread's namespace.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "wire0 has no index");
    Ok(ifindex)
}

/// A NodePort Service `name` (externalTrafficPolicy Cluster) over PODS_PER_SERVICE pods
/// from `first_pod`, and its node port.
fn node_port_service(
    name: &str,
    index: u32,
    node_port: u16,
    first_pod: Ipv4Addr,
) -> (BenchService, u16) {
    let service = BenchService {
        name: name.to_owned(),
        vip: nth(Ipv4Addr::new(198, 19, 0, 100), index),
        port: 80,
        target_port: POD_PORT,
        endpoints: (0..PODS_PER_SERVICE)
            .map(|pod| nth(first_pod, pod))
            .collect(),
    };
    (service, node_port)
}

/// The packet kinds measured, in the table's order.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    NewLocal,
    EstablishedLocal,
    NewRemote,
    EstablishedRemote,
    ReplyRemote,
    PassThrough,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::NewLocal,
        Kind::EstablishedLocal,
        Kind::NewRemote,
        Kind::EstablishedRemote,
        Kind::ReplyRemote,
        Kind::PassThrough,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::NewLocal => "new flow, backend on this node (DNAT)",
            Kind::EstablishedLocal => "established, backend on this node",
            Kind::NewRemote => "new flow, backend on another node (DNAT + SNAT, routed)",
            Kind::EstablishedRemote => "established, backend on another node (routed)",
            Kind::ReplyRemote => "reply from another node (reverse NAT, routed)",
            Kind::PassThrough => "pass-through (no Service)",
        }
    }

    /// The counter each run must raise.
    fn counter(self) -> u32 {
        match self {
            Kind::NewLocal | Kind::NewRemote => stat::NEW_FLOW,
            Kind::EstablishedLocal | Kind::EstablishedRemote => stat::CT_HIT,
            Kind::ReplyRemote => stat::REPLY,
            Kind::PassThrough => stat::PASS,
        }
    }

    /// The return codes of tc and of XDP.
    fn verdicts(self) -> (u32, u32) {
        match self {
            Kind::NewRemote | Kind::EstablishedRemote | Kind::ReplyRemote => {
                (TC_ACT_REDIRECT, XDP_TX)
            }
            _ => (TC_ACT_OK, XDP_PASS),
        }
    }
}

/// The two programs with maps filled for the two Services, pinned in a private bpffs.
struct Loaded2 {
    stats: PerCpuArray<MapData, u64>,
    _writer: MapWriter,
    ebpf: Ebpf,
    _bpffs: PrivateBpffs,
    ifindex: u32,
}

impl Loaded2 {
    fn load(ifindex: u32) -> Result<Self> {
        let bpffs = PrivateBpffs::mount("bench-xdp")?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs.path())
            // Every new flow of the runs stays (two entries each); SNAT ports enough for
            // all the new flows to the other node's ten pods.
            .map_max_entries(map_names::CONNTRACK_PENDING, 1 << 19)
            .map_max_entries(map_names::CONNTRACK_PENDING6, 1 << 19)
            .override_global(SNAT_PORT_MIN_GLOBAL, &1024u16, true)
            .override_global(SNAT_PORT_MAX_GLOBAL, &65_535u16, true)
            .load(proxy_userspace::EBPF_OBJECT)
            .context("loading the eBPF object")?;
        proxy_userspace::datapath::set_timeouts(&mut ebpf, CtTimeouts::DEFAULT)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME)
            .context("no tc program")?
            .try_into()?;
        tc.load().context("loading epx_ingress")?;
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .context("no XDP program")?
            .try_into()?;
        xdp.load().context("loading epx_xdp")?;
        for program in [PROGRAM6_NAME, XDP6_PROGRAM_NAME] {
            proxy_userspace::datapath::load_ipv6_path(&mut ebpf, program, tail_call::IPV6)?;
        }

        let services = [
            node_port_service("local", 0, LOCAL_PORT, LOCAL_PODS),
            node_port_service("remote", 1, REMOTE_PORT, REMOTE_PODS),
        ];
        let mut model = Model::default();
        for (service, node_port) in &services {
            model.insert_service(cluster::kubernetes_service_with(service, Some(*node_port)))?;
            model.insert_endpoint_slice(cluster::endpoint_slice(service, &service.endpoints))?;
            // Its single-stack IPv6 twin, on the same node port of the node's IPv6 address.
            let twin = BenchService {
                name: format!("{}6", service.name),
                ..service.clone()
            };
            let (service6, slice6) = cluster::ipv6_objects_of(&twin, Some(*node_port), ipv6_twin);
            model.insert_service(service6)?;
            model.insert_endpoint_slice(slice6)?;
        }
        let node = NodeFacts {
            addresses: vec![NODE.into(), ipv6_twin(NODE).into()],
            ..cluster::lab_node()
        };
        let planned = plan::plan(&model, &node);
        let mut writer = MapWriter::new(WriterMaps::take(&mut ebpf)?)?;
        let report = writer.apply(&planned.desired);
        ensure!(
            report.map_full.is_empty() && report.failures.is_empty(),
            "filling the maps failed: {report:?}"
        );
        let stats = ebpf
            .take_map(map_names::STATS)
            .context("the object has no map STATS")?
            .try_into()?;
        Ok(Self {
            stats,
            _writer: writer,
            ebpf,
            _bpffs: bpffs,
            ifindex,
        })
    }

    fn counter(&self, index: u32) -> Result<u64> {
        Ok(self.stats.get(&index, 0)?.iter().sum())
    }

    /// One call of the tc (`xdp` false) or XDP program on `frame`: its return code, the
    /// frame it left, and the kernel's time for it. `repeat` > 1 only for the floor.
    fn run(&self, xdp: bool, frame: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
        let mut output = vec![0; frame.len() + 64];
        let context: Vec<u32> = if xdp {
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
            // egress_ifindex.
            vec![0, frame.len() as u32, 0, self.ifindex, 0, 0]
        } else {
            // struct __sk_buff up to ifindex: ingress_ifindex and ifindex are its last two.
            let mut words = vec![0; 11];
            words[9] = self.ifindex;
            words[10] = self.ifindex;
            words
        };
        let context: Vec<u8> = context.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: Some(&context),
            repeat,
            ..TestRunOptions::default()
        };
        let result = if xdp {
            let program: &Xdp = self
                .ebpf
                .program(XDP_PROGRAM_NAME)
                .context("XDP")?
                .try_into()?;
            program.test_run(options)?
        } else {
            let program: &SchedClassifier =
                self.ebpf.program(PROGRAM_NAME).context("tc")?.try_into()?;
            program.test_run(options)?
        };
        let (code, nanoseconds) = (result.return_value, result.duration.as_nanos() as f64);
        output.truncate(result.data_size_out as usize);
        // XDP's output starts with its 4 bytes of metadata.
        if xdp && output.len() >= frame.len() + 4 {
            output.drain(..output.len() - frame.len());
        }
        Ok((code, output, nanoseconds))
    }

    /// Runs `count` frames from `next_frame` through one hook, one call each; the median
    /// nanoseconds. Fails unless each took `kind`'s path.
    fn single_runs(
        &self,
        xdp: bool,
        kind: Kind,
        count: usize,
        mut next_frame: impl FnMut() -> Result<Vec<u8>>,
    ) -> Result<f64> {
        let counter = kind.counter();
        let before = self.counter(counter)?;
        let (tc_verdict, xdp_verdict) = kind.verdicts();
        let expected = if xdp { xdp_verdict } else { tc_verdict };
        let mut durations = Vec::with_capacity(count);
        for _ in 0..count {
            let (code, _, nanoseconds) = self.run(xdp, &next_frame()?, 1)?;
            ensure!(
                code == expected,
                "{} through {}: return code {code}, expected {expected}",
                kind.label(),
                if xdp { "XDP" } else { "tc" }
            );
            durations.push(nanoseconds);
        }
        let counted = self.counter(counter)? - before;
        ensure!(
            counted == count as u64,
            "{}: {count} runs but {counted} counted as {}",
            kind.label(),
            stat::NAMES[counter as usize]
        );
        median(&durations).context("no runs")
    }
}

/// An Ethernet/IPv4 (IPv6)/TCP frame on the wire to the node, checksums complete.
fn frame(src: SocketAddr, dst: SocketAddr, flags: Flags) -> Result<Vec<u8>> {
    tcp_frame_between((mac_of(src.ip()), NODE_MAC), src, dst, flags)
}

/// One family's frames: its established flows (through their handshakes, assured) and
/// pass-through, and the NodePorts new flows go to.
struct Frames {
    family: Family,
    local: SocketAddr,
    remote: SocketAddr,
    established_local: Vec<u8>,
    established_remote: Vec<u8>,
    reply_remote: Vec<u8>,
    pass: Vec<u8>,
}

impl Frames {
    fn open(loaded: &Loaded2, family: Family) -> Result<Self> {
        let node = family.at(NODE);
        let local = SocketAddr::new(node, LOCAL_PORT);
        let remote = SocketAddr::new(node, REMOTE_PORT);
        let client = family.endpoint(CLIENT);
        let open = |port: u16, target: SocketAddr| -> Result<(Vec<u8>, Vec<u8>)> {
            let client = SocketAddr::new(client.ip(), port);
            let (_, out, _) = loaded.run(true, &frame(client, target, Flags::Syn)?, 1)?;
            let (peer, backend) = endpoints_of(&out)?;
            loaded.run(true, &frame(backend, peer, Flags::SynAck)?, 1)?;
            let ack = frame(client, target, Flags::Ack)?;
            loaded.run(true, &ack, 1)?;
            Ok((ack, frame(backend, peer, Flags::Ack)?))
        };
        let (established_local, _) = open(client.port(), local)?;
        let (established_remote, reply_remote) = open(client.port() + 1, remote)?;
        ensure!(
            endpoints_of(&reply_remote)?.1.ip() == node,
            "the flow to the other node's pods was not SNATed to the node ({node})"
        );
        Ok(Self {
            family,
            local,
            remote,
            established_local,
            established_remote,
            reply_remote,
            pass: frame(client, family.endpoint(NOT_A_SERVICE), Flags::Syn)?,
        })
    }

    /// The frame of a run of `kind` other than a new flow.
    fn of(&self, kind: Kind) -> &[u8] {
        match kind {
            Kind::EstablishedLocal => &self.established_local,
            Kind::EstablishedRemote => &self.established_remote,
            Kind::ReplyRemote => &self.reply_remote,
            _ => &self.pass,
        }
    }
}

pub(super) fn measure(settings: &XdpSettings) -> Result<Vec<XdpPacketCost>> {
    let ifindex = wire_up()?;
    let loaded = Loaded2::load(ifindex)?;
    let families = Family::ALL
        .iter()
        .map(|&family| Frames::open(&loaded, family))
        .collect::<Result<Vec<_>>>()?;
    let pass = &families[0].pass;
    let mut next_client = 0usize;
    let mut fresh = |family: Family, target: SocketAddr| {
        let client = SocketAddr::new(
            family.at(nth(
                FIRST_NEW_CLIENT,
                (next_client / PORTS_PER_CLIENT) as u32,
            )),
            1024 + (next_client % PORTS_PER_CLIENT) as u16,
        );
        next_client += 1;
        frame(client, target, Flags::Syn)
    };
    // Each family's rows, in the table's order: IPv4's, then IPv6's.
    let rows: Vec<(&Frames, Kind)> = (families.iter())
        .flat_map(|frames| Kind::ALL.map(|kind| (frames, kind)))
        .collect();
    let mut figures: Vec<(Vec<f64>, Vec<f64>)> = rows.iter().map(|_| Default::default()).collect();
    for _ in 0..settings.runs {
        let (_, _, repeated) = loaded.run(false, pass, settings.repeat)?;
        let single = loaded.single_runs(false, Kind::PassThrough, settings.single_runs, || {
            Ok(pass.clone())
        })?;
        let floor = single - repeated;
        for (&(frames, kind), (tc, xdp)) in rows.iter().zip(&mut figures) {
            for through_xdp in [false, true] {
                let count = settings.single_runs;
                let nanoseconds = match kind {
                    Kind::NewLocal => loaded.single_runs(through_xdp, kind, count, || {
                        fresh(frames.family, frames.local)
                    })?,
                    Kind::NewRemote => loaded.single_runs(through_xdp, kind, count, || {
                        fresh(frames.family, frames.remote)
                    })?,
                    _ => loaded
                        .single_runs(through_xdp, kind, count, || Ok(frames.of(kind).to_vec()))?,
                };
                let cost = nanoseconds - floor;
                if through_xdp {
                    xdp.push(cost)
                } else {
                    tc.push(cost)
                }
            }
        }
    }
    rows.iter()
        .zip(figures)
        .map(|(&(frames, kind), (tc, xdp))| {
            Ok(XdpPacketCost {
                packet: frames.family.label(kind),
                tc: Summary::of(&tc).context("no runs")?,
                xdp: Summary::of(&xdp).context("no runs")?,
            })
        })
        .collect()
}
