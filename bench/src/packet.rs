//! Measurement 1, per-packet cost in the kernel: the real `epx_ingress` program run by
//! BPF_PROG_TEST_RUN on crafted frames, its maps filled by the real planner and map writer.
//!
//! `repeat` reruns the program on the same skb, and a rewritten packet stays rewritten, so
//! each path is measured in the way that keeps every iteration on that path:
//! - pass-through (a packet to no Service and no backend): rerunning changes nothing →
//!   `repeat`. Three kinds: a TCP SYN (conntrack miss, frontend miss, backend-index miss:
//!   the clash check), a TCP SYN-ACK and a UDP datagram (which may also be a pending flow's
//!   first answer: one more lookup, in CONNTRACK_PENDING).
//! - established (an assured flow's conntrack hit, then DNAT): the flow completes its
//!   handshake first, then the bench adds a mirror conntrack entry for the translated tuple
//!   that DNATs back to the VIP, so every iteration is again a conntrack hit with a full
//!   rewrite → `repeat`.
//! - direct (an assured flow straight to a backend, tracked for clashes): one conntrack
//!   hit, nothing rewritten → `repeat`.
//! - new flow (conntrack miss → lookup → select → create → DNAT): every run is a packet
//!   of a fresh 5-tuple, one run per call; to a random Service (cold map entries, as new
//!   connections across many Services meet them), and always to the same Service (hot
//!   Service entries: what is left is the algorithm and the conntrack side). A single
//!   run's duration includes the kernel's clock reads around it; that floor (single-run
//!   pass-through minus repeated pass-through) is subtracted. The same method applied to the
//!   established packet checks it against the `repeat` figure.
//! - new flow without the conntrack create: the same fresh packets through `epx_trace`,
//!   the dry run of the same packet path, which writes no conntrack entry and no counter
//!   (it records its decisions in a per-CPU map instead); the difference to a new flow is
//!   about what creating the flow's two conntrack entries (and claiming its reply tuple)
//!   costs.
//!
//! - IPv6 beside IPv4: the same Services as single-stack IPv6 ones (each address's
//!   [`ipv6_twin`]) in a program of their own, measured the same ways: new flows to random
//!   Services, the established flow, pass-through. `epx_ingress` tail-calls `epx_ingress6`
//!   for them, as on a node, so the IPv6 figures include the tail call.
//!
//! Every figure is checked against the program's own counters: a run that did not take
//! the path it measures fails the benchmark instead of reporting a wrong number.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_common::{
    Address, CtKey, CtTimeouts, CtValue, Ipv6, PROGRAM_NAME, PROGRAM6_NAME, TRACE_PROGRAM_NAME,
    TraceRecord, Tuple, default_max_entries, map_names, proto, stat, tail_call,
};
use proxy_userspace::writer::{MapWriter, WriterMaps};
use proxy_userspace::{datapath, plan};

use crate::cluster::{BenchService, Cluster, Endpoints, ipv6_twin, lab_node};
use crate::stats::{Rng, Summary, median};
use proxy_lab::PrivateBpffs;

const TC_ACT_OK: u32 = 0;
const ENDPOINTS_PER_SERVICE: usize = 10;
/// The established flow's client, and the pass-through packet's source.
pub(crate) const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 250, 1), 40_000);
/// A destination that is no Service (no endpoint uses port 9 either).
const NOT_A_SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 255, 254), 9);
/// The client of the direct flow to a backend.
const DIRECT_CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 250, 2), 40_000);
/// CONNTRACK_PENDING holds every new flow of a run (two entries each) without evicting, so
/// new flows are measured on a map with room, as in the earlier figures.
const PENDING_ENTRIES: u32 = 1 << 18;
/// New flows come from 198.18.240.0 onward, 50 000 source ports per address.
const FIRST_NEW_FLOW_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 240, 0);
const PORTS_PER_CLIENT: usize = 50_000;
/// The IPv6 rows' established client and pass-through source, and a destination that is
/// no Service, in 2001:db8::/32 like every IPv6 bench address.
const CLIENT6: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0xfa, 0, 0, 0, 1),
    40_000,
    0,
    0,
);
const NOT_A_SERVICE6: SocketAddrV6 = SocketAddrV6::new(
    Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0xff, 0, 0, 0, 0xfffe),
    9,
    0,
    0,
);
/// New IPv6 flows come from 2001:db8:be:f0::/64, 50 000 source ports per address.
const FIRST_NEW_FLOW_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbe, 0xf0, 0, 0, 0, 0);

#[derive(Clone, Debug)]
pub struct PacketSettings {
    /// Numbers of Services (× 10 endpoints) to measure at.
    pub sizes: Vec<usize>,
    pub runs: usize,
    /// Iterations of one `repeat` run.
    pub repeat: u32,
    /// Single runs (one call each) per run, for new flows and the timer floor.
    pub single_runs: usize,
}

/// Nanoseconds per packet at one number of Services, over the runs.
#[derive(Clone, Debug)]
pub struct PacketCosts {
    pub services: usize,
    /// New flows to random Services.
    pub new_flow: Summary,
    /// New flows, always to the same Service.
    pub new_flow_one_service: Summary,
    /// New flows to random Services through the dry run, which creates no conntrack
    /// entries.
    pub new_flow_without_create: Summary,
    pub established: Summary,
    /// A TCP SYN to no Service and no backend.
    pub pass_through: Summary,
    /// A TCP SYN-ACK to no Service: also looked up in CONNTRACK_PENDING.
    pub pass_through_answer: Summary,
    /// A UDP datagram to no Service: also looked up in CONNTRACK_PENDING.
    pub pass_through_udp: Summary,
    /// An assured direct flow to a backend: one conntrack hit, nothing rewritten.
    pub direct: Summary,
    /// The established packet measured like new flows; close to `established` when the
    /// floor correction is sound.
    pub established_single: Summary,
    pub timer_floor: Summary,
    /// The same Services as single-stack IPv6 ones.
    pub ipv6: Ipv6Costs,
}

/// Nanoseconds per IPv6 packet (through `epx_ingress`'s tail call to `epx_ingress6`).
#[derive(Clone, Debug)]
pub struct Ipv6Costs {
    /// New flows to random Services.
    pub new_flow: Summary,
    pub established: Summary,
    /// A TCP SYN to no Service and no backend.
    pub pass_through: Summary,
    pub timer_floor: Summary,
}

pub fn measure(settings: &PacketSettings) -> Result<Vec<PacketCosts>> {
    settings
        .sizes
        .iter()
        .map(|&services| {
            measure_at(services, settings)
                .with_context(|| format!("per-packet cost at {services} Services"))
        })
        .collect()
}

fn measure_at(services: usize, settings: &PacketSettings) -> Result<PacketCosts> {
    let cluster = Cluster::new(
        services,
        Endpoints::Distinct {
            per_service: ENDPOINTS_PER_SERVICE,
        },
    )?;
    let started = std::time::Instant::now();
    let planned = plan::plan(&cluster.model()?, &lab_node());
    let mut datapath = LoadedProgram::load(services)?;
    let report = datapath.writer.apply(&planned.desired);
    ensure!(report.complete(), "filling the maps failed: {report:?}");
    eprintln!(
        "  {services} Services: {} frontends, {} backends written in {:.1} s",
        planned.desired.frontends.len(),
        datapath.writer.image().backends.len(),
        started.elapsed().as_secs_f64()
    );

    let established = datapath.open_established_flow(&cluster.service(services / 2))?;
    let direct = datapath.open_direct_flow(&cluster.service(services / 3))?;
    let pass = tcp_frame(CLIENT, NOT_A_SERVICE, Flags::Syn)?;
    let pass_answer = tcp_frame(CLIENT, NOT_A_SERVICE, Flags::SynAck)?;
    let pass_udp = udp_frame(CLIENT, NOT_A_SERVICE)?;
    let one_service = cluster.service(0);
    let mut rng = Rng::new(services as u64);
    let mut next_flow = 0usize;
    let mut figures = Figures::default();
    for _ in 0..settings.runs {
        let pass_repeated = datapath.repeated(&pass, settings.repeat, stat::PASS)?;
        let pass_answer_repeated = datapath.repeated(&pass_answer, settings.repeat, stat::PASS)?;
        let pass_udp_repeated = datapath.repeated(&pass_udp, settings.repeat, stat::PASS)?;
        let direct_repeated = datapath.repeated(&direct, settings.repeat, stat::DIRECT)?;
        let established_repeated =
            datapath.repeated(&established, settings.repeat, stat::CT_HIT)?;
        let pass_single =
            datapath.single_runs(settings.single_runs, stat::PASS, || Ok(pass.clone()))?;
        let established_single =
            datapath.single_runs(settings.single_runs, stat::CT_HIT, || {
                Ok(established.clone())
            })?;
        let mut new_flow_frame = |service: &BenchService| {
            let client = new_flow_client(next_flow);
            next_flow += 1;
            tcp_frame(
                client,
                SocketAddrV4::new(service.vip, service.port),
                Flags::Syn,
            )
        };
        let mut to_random_service = || new_flow_frame(&cluster.service(rng.below(services)));
        let new_flow =
            datapath.single_runs(settings.single_runs, stat::NEW_FLOW, &mut to_random_service)?;
        let dry_run = datapath.dry_runs(settings.single_runs, &mut to_random_service)?;
        let new_flow_one_service =
            datapath.single_runs(settings.single_runs, stat::NEW_FLOW, || {
                new_flow_frame(&one_service)
            })?;
        let floor = pass_single - pass_repeated;
        figures.pass_through.push(pass_repeated);
        figures.pass_through_answer.push(pass_answer_repeated);
        figures.pass_through_udp.push(pass_udp_repeated);
        figures.direct.push(direct_repeated);
        figures.established.push(established_repeated);
        figures.established_single.push(established_single - floor);
        figures.new_flow.push(new_flow - floor);
        figures
            .new_flow_one_service
            .push(new_flow_one_service - floor);
        figures.new_flow_without_create.push(dry_run - floor);
        figures.timer_floor.push(floor);
    }
    drop(datapath);
    let ipv6 = measure_ipv6(&cluster, settings)?;
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(PacketCosts {
        ipv6,
        services,
        new_flow: summary(&figures.new_flow)?,
        new_flow_one_service: summary(&figures.new_flow_one_service)?,
        new_flow_without_create: summary(&figures.new_flow_without_create)?,
        established: summary(&figures.established)?,
        pass_through: summary(&figures.pass_through)?,
        pass_through_answer: summary(&figures.pass_through_answer)?,
        pass_through_udp: summary(&figures.pass_through_udp)?,
        direct: summary(&figures.direct)?,
        established_single: summary(&figures.established_single)?,
        timer_floor: summary(&figures.timer_floor)?,
    })
}

/// The IPv6 rows at `cluster`'s size: its Services as single-stack IPv6 ones, in a program
/// of their own.
fn measure_ipv6(cluster: &Cluster, settings: &PacketSettings) -> Result<Ipv6Costs> {
    let services = cluster.services;
    let planned = plan::plan(&cluster.ipv6_model()?, &lab_node());
    let mut datapath = LoadedProgram::load(services)?;
    let report = datapath.writer.apply(&planned.desired);
    ensure!(
        report.complete(),
        "filling the IPv6 maps failed: {report:?}"
    );
    let established = datapath.open_established_flow6(&cluster.service(services / 2))?;
    let pass = tcp_frame(CLIENT6, NOT_A_SERVICE6, Flags::Syn)?;
    let mut rng = Rng::new(services as u64 ^ 6);
    let mut next_flow = 0usize;
    let (mut new_flows, mut established_runs, mut passes, mut floors) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..settings.runs {
        let pass_repeated = datapath.repeated(&pass, settings.repeat, stat::PASS)?;
        let established_repeated =
            datapath.repeated(&established, settings.repeat, stat::CT_HIT)?;
        let pass_single =
            datapath.single_runs(settings.single_runs, stat::PASS, || Ok(pass.clone()))?;
        let new_flow = datapath.single_runs(settings.single_runs, stat::NEW_FLOW, || {
            let service = cluster.service(rng.below(services));
            let client = new_flow_client6(next_flow);
            next_flow += 1;
            let vip = SocketAddrV6::new(ipv6_twin(service.vip), service.port, 0, 0);
            tcp_frame(client, vip, Flags::Syn)
        })?;
        let floor = pass_single - pass_repeated;
        new_flows.push(new_flow - floor);
        established_runs.push(established_repeated);
        passes.push(pass_repeated);
        floors.push(floor);
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(Ipv6Costs {
        new_flow: summary(&new_flows)?,
        established: summary(&established_runs)?,
        pass_through: summary(&passes)?,
        timer_floor: summary(&floors)?,
    })
}

/// Per-run figures, in nanoseconds.
#[derive(Default)]
struct Figures {
    new_flow: Vec<f64>,
    new_flow_one_service: Vec<f64>,
    new_flow_without_create: Vec<f64>,
    established: Vec<f64>,
    pass_through: Vec<f64>,
    pass_through_answer: Vec<f64>,
    pass_through_udp: Vec<f64>,
    direct: Vec<f64>,
    established_single: Vec<f64>,
    timer_floor: Vec<f64>,
}

/// The source of the `index`-th new flow: a tuple no earlier run used.
fn new_flow_client(index: usize) -> SocketAddrV4 {
    let address = u32::from(FIRST_NEW_FLOW_CLIENT) + (index / PORTS_PER_CLIENT) as u32;
    let port = 10_000 + (index % PORTS_PER_CLIENT) as u16;
    SocketAddrV4::new(Ipv4Addr::from(address), port)
}

/// The source of the `index`-th new IPv6 flow: a tuple no earlier run used.
fn new_flow_client6(index: usize) -> SocketAddrV6 {
    let address = u128::from(FIRST_NEW_FLOW_CLIENT6) + (index / PORTS_PER_CLIENT) as u128;
    let port = 10_000 + (index % PORTS_PER_CLIENT) as u16;
    SocketAddrV6::new(Ipv6Addr::from(address), port, 0, 0)
}

/// The object loaded with maps sized for `services`, pinned in a private bpffs.
pub(crate) struct LoadedProgram {
    // Dropped in declaration order: maps and program before the bpffs that pins them.
    pub(crate) writer: MapWriter,
    pub(crate) conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    conntrack6: BpfHashMap<MapData, CtKey<Ipv6>, CtValue<Ipv6>>,
    stats: PerCpuArray<MapData, u64>,
    trace: PerCpuArray<MapData, TraceRecord>,
    pub(crate) ebpf: Ebpf,
    _bpffs: PrivateBpffs,
}

impl LoadedProgram {
    pub(crate) fn load(services: usize) -> Result<Self> {
        let bpffs = PrivateBpffs::mount("bench")?;
        let frontends = u32::try_from(services)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(bpffs.path());
        // Each family's maps sized alike, as the daemon's sizing flags do.
        for maps in [u32::MAPS, Ipv6::MAPS] {
            loader
                .map_max_entries(
                    maps.services,
                    default_max_entries::SERVICES.max(frontends + 1024),
                )
                .map_max_entries(
                    maps.backend_slots,
                    default_max_entries::BACKEND_SLOTS.max(frontends * 12 + 1024),
                )
                .map_max_entries(
                    maps.svc_names,
                    default_max_entries::SVC_NAMES.max(frontends + 1024),
                )
                .map_max_entries(
                    maps.membership,
                    default_max_entries::SERVICES.max(frontends * 12 + 1024),
                )
                .map_max_entries(
                    maps.backend_ids,
                    default_max_entries::BACKENDS.max(frontends * 10 + 1024),
                );
        }
        let mut ebpf = loader
            .map_max_entries(map_names::CONNTRACK_PENDING, PENDING_ENTRIES)
            .map_max_entries(map_names::CONNTRACK_PENDING6, PENDING_ENTRIES)
            .load(proxy_userspace::EBPF_OBJECT)
            .context("loading the eBPF object")?;
        proxy_userspace::datapath::set_timeouts(&mut ebpf, CtTimeouts::DEFAULT)?;
        for name in [PROGRAM_NAME, TRACE_PROGRAM_NAME] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("the object has no program {name}"))?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        datapath::load_ipv6_path(&mut ebpf, PROGRAM6_NAME, tail_call::IPV6)?;
        let writer_maps = WriterMaps::take(&mut ebpf)?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("the object has no map {name}"))
        };
        let conntrack = take(map_names::CONNTRACK)?.try_into()?;
        let conntrack6 = take(map_names::CONNTRACK6)?.try_into()?;
        let stats = take(map_names::STATS)?.try_into()?;
        let trace = take(map_names::TRACE)?.try_into()?;
        Ok(Self {
            writer: MapWriter::new(writer_maps)?,
            conntrack,
            conntrack6,
            stats,
            trace,
            ebpf,
            _bpffs: bpffs,
        })
    }

    fn program(&self) -> Result<&SchedClassifier> {
        self.program_named(PROGRAM_NAME)
    }

    fn program_named(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("the object has no program {name}"))?
            .try_into()?)
    }

    /// A datapath counter, summed over the CPUs.
    fn counter(&self, index: u32) -> Result<u64> {
        Ok(self.stats.get(&index, 0)?.iter().sum())
    }

    /// Runs `frame` `repeat` times in one call; nanoseconds per run (the kernel's own
    /// average). Fails unless every run counted `counter`.
    pub(crate) fn repeated(&self, frame: &[u8], repeat: u32, counter: u32) -> Result<f64> {
        let before = self.counter(counter)?;
        let result = self.program()?.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })?;
        ensure!(
            result.return_value == TC_ACT_OK,
            "verdict {}",
            result.return_value
        );
        self.expect_counted(counter, before, u64::from(repeat))?;
        Ok(result.duration.as_nanos() as f64)
    }

    /// Runs `count` frames from `next_frame`, one call each; the median nanoseconds of a
    /// call as the kernel timed it. Fails unless every run counted `counter`.
    fn single_runs(
        &self,
        count: usize,
        counter: u32,
        next_frame: impl FnMut() -> Result<Vec<u8>>,
    ) -> Result<f64> {
        let before = self.counter(counter)?;
        let nanoseconds = self.median_single_run(self.program()?, count, next_frame)?;
        self.expect_counted(counter, before, count as u64)?;
        Ok(nanoseconds)
    }

    /// Like [`Self::single_runs`] of new flows, through the dry run; checks that the
    /// last run on each CPU took the new-flow path.
    fn dry_runs(&self, count: usize, next_frame: impl FnMut() -> Result<Vec<u8>>) -> Result<f64> {
        let nanoseconds =
            self.median_single_run(self.program_named(TRACE_PROGRAM_NAME)?, count, next_frame)?;
        for record in self.trace.get(&0, 0)?.iter() {
            if record.recorded == 1 && u32::from(record.outcome) != stat::NEW_FLOW {
                bail!(
                    "the dry run ended in {} instead of new_flow",
                    stat::NAMES.get(usize::from(record.outcome)).unwrap_or(&"?")
                );
            }
        }
        Ok(nanoseconds)
    }

    /// Runs `count` frames through `program`, one call each: the median nanoseconds of a
    /// call as the kernel timed it.
    fn median_single_run(
        &self,
        program: &SchedClassifier,
        count: usize,
        mut next_frame: impl FnMut() -> Result<Vec<u8>>,
    ) -> Result<f64> {
        let mut durations = Vec::with_capacity(count);
        for _ in 0..count {
            let frame = next_frame()?;
            let result = program.test_run(TestRunOptions {
                data_in: Some(&frame),
                ..TestRunOptions::default()
            })?;
            ensure!(
                result.return_value == TC_ACT_OK,
                "verdict {}",
                result.return_value
            );
            durations.push(result.duration.as_nanos() as f64);
        }
        median(&durations).context("no single runs")
    }

    fn expect_counted(&self, counter: u32, before: u64, runs: u64) -> Result<()> {
        let counted = self.counter(counter)? - before;
        if counted != runs {
            bail!(
                "{runs} runs but {counted} counted as {}: the packet took another path",
                stat::NAMES[counter as usize]
            );
        }
        Ok(())
    }

    /// Runs one frame through the program; its verdict must be TC_ACT_OK and `counter`
    /// must count it. Returns the frame it leaves.
    pub(crate) fn once(&self, frame: &[u8], counter: u32) -> Result<Vec<u8>> {
        let before = self.counter(counter)?;
        let (verdict, out) = datapath::run_frame(self.program()?, frame)?;
        ensure!(verdict == TC_ACT_OK, "verdict {verdict}");
        self.expect_counted(counter, before, 1)?;
        Ok(out)
    }

    /// Opens a flow from [`CLIENT`] to `service` through its handshake (SYN, the backend's
    /// SYN-ACK, the client's ACK: now assured, in CONNTRACK) and makes its next packets
    /// conntrack hits at every iteration of a `repeat` run: the program DNATs the packet
    /// to the backend it chose, and a mirror entry for that translated tuple DNATs it back
    /// to the VIP. Returns the flow's ACK frame.
    pub(crate) fn open_established_flow(&mut self, service: &BenchService) -> Result<Vec<u8>> {
        let vip = SocketAddrV4::new(service.vip, service.port);
        let out = self.once(&tcp_frame(CLIENT, vip, Flags::Syn)?, stat::NEW_FLOW)?;
        let backend = destination(&out)?;
        ensure!(
            service.endpoints.contains(backend.ip()),
            "the SYN to {vip} went to {backend}, which is none of its endpoints"
        );
        self.once(&tcp_frame(backend, CLIENT, Flags::SynAck)?, stat::REPLY)?;
        let ack = tcp_frame(CLIENT, vip, Flags::Ack)?;
        self.once(&ack, stat::CT_HIT)?;
        let forward = self
            .conntrack
            .get(&ct_key(CLIENT, vip), 0)
            .context("the flow is not assured after its handshake")?;
        let back_to_vip = CtValue {
            to: tuple(CLIENT, vip),
            ..forward
        };
        self.conntrack
            .insert(ct_key(CLIENT, backend), back_to_vip, 0)?;
        Ok(ack)
    }

    /// [`Self::open_established_flow`] from [`CLIENT6`] to the IPv6 twin of `service`
    /// (the IPv6 rows' maps), mirrored in CONNTRACK6.
    fn open_established_flow6(&mut self, service: &BenchService) -> Result<Vec<u8>> {
        let vip = SocketAddrV6::new(ipv6_twin(service.vip), service.port, 0, 0);
        let out = self.once(&tcp_frame(CLIENT6, vip, Flags::Syn)?, stat::NEW_FLOW)?;
        let SocketAddr::V6(backend) = endpoints_of(&out)?.1 else {
            bail!("the SYN to {vip} left as IPv4");
        };
        ensure!(
            (service.endpoints.iter()).any(|endpoint| ipv6_twin(*endpoint) == *backend.ip()),
            "the SYN to {vip} went to {backend}, which is none of its endpoints"
        );
        self.once(&tcp_frame(backend, CLIENT6, Flags::SynAck)?, stat::REPLY)?;
        let ack = tcp_frame(CLIENT6, vip, Flags::Ack)?;
        self.once(&ack, stat::CT_HIT)?;
        let key = |src: SocketAddrV6, dst: SocketAddrV6| CtKey::new(tuple_of(src, dst), proto::TCP);
        let forward = self
            .conntrack6
            .get(&key(CLIENT6, vip), 0)
            .context("the IPv6 flow is not assured after its handshake")?;
        let back_to_vip = CtValue {
            to: tuple_of(CLIENT6, vip),
            ..forward
        };
        self.conntrack6
            .insert(key(CLIENT6, backend), back_to_vip, 0)?;
        Ok(ack)
    }

    /// Opens a flow from [`DIRECT_CLIENT`] straight to a backend of `service` through its
    /// handshake (assured, in CONNTRACK). Returns its ACK frame, which the program passes
    /// untouched.
    fn open_direct_flow(&mut self, service: &BenchService) -> Result<Vec<u8>> {
        let backend = SocketAddrV4::new(service.endpoints[0], service.target_port);
        self.once(
            &tcp_frame(DIRECT_CLIENT, backend, Flags::Syn)?,
            stat::DIRECT,
        )?;
        self.once(
            &tcp_frame(backend, DIRECT_CLIENT, Flags::SynAck)?,
            stat::DIRECT,
        )?;
        let ack = tcp_frame(DIRECT_CLIENT, backend, Flags::Ack)?;
        self.once(&ack, stat::DIRECT)?;
        self.conntrack
            .get(&ct_key(DIRECT_CLIENT, backend), 0)
            .context("the direct flow is not assured after its handshake")?;
        Ok(ack)
    }
}

pub(crate) fn tuple(src: SocketAddrV4, dst: SocketAddrV4) -> Tuple {
    tuple_of(src, dst)
}

/// The tuple of a packet from `src` to `dst`, in the maps of family `A`.
fn tuple_of<A: Address>(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>) -> Tuple<A> {
    let (src, dst) = (src.into(), dst.into());
    let address = |ip: IpAddr| A::from_ip(ip).expect("addresses of the map's family");
    Tuple {
        src_addr: address(src.ip()),
        dst_addr: address(dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
    }
}

/// The conntrack key of a TCP packet from `src` to `dst`.
fn ct_key(src: SocketAddrV4, dst: SocketAddrV4) -> CtKey {
    CtKey::new(tuple(src, dst), proto::TCP)
}

#[derive(Clone, Copy)]
pub(crate) enum Flags {
    Syn,
    SynAck,
    Ack,
}

/// An Ethernet/IPv4/TCP (or IPv6/TCP) frame without payload, checksums complete.
fn tcp_frame(
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    flags: Flags,
) -> Result<Vec<u8>> {
    tcp_frame_between(([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]), src, dst, flags)
}

/// [`tcp_frame`] between the Ethernet addresses `macs` (source, destination).
pub(crate) fn tcp_frame_between(
    macs: ([u8; 6], [u8; 6]),
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    flags: Flags,
) -> Result<Vec<u8>> {
    let (src, dst) = (src.into(), dst.into());
    let ethernet = PacketBuilder::ethernet2(macs.0, macs.1);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ethernet.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => ethernet.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("{src} → {dst}: addresses of two families"),
    };
    let builder = ip.tcp(src.port(), dst.port(), 1, 64_240);
    let builder = match flags {
        Flags::Syn => builder.syn(),
        Flags::SynAck => builder.syn().ack(1),
        Flags::Ack => builder.ack(1),
    };
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[])?;
    Ok(frame)
}

/// An Ethernet/IPv4/UDP frame with 8 bytes of payload, checksums complete.
fn udp_frame(src: SocketAddrV4, dst: SocketAddrV4) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port());
    let mut frame = Vec::with_capacity(builder.size(8));
    builder.write(&mut frame, &[0; 8])?;
    Ok(frame)
}

/// Where a frame is addressed to.
pub(crate) fn destination(frame: &[u8]) -> Result<SocketAddrV4> {
    Ok(endpoints(frame)?.1)
}

/// An IPv4 TCP frame's source and destination.
fn endpoints(frame: &[u8]) -> Result<(SocketAddrV4, SocketAddrV4)> {
    match endpoints_of(frame)? {
        (SocketAddr::V4(src), SocketAddr::V4(dst)) => Ok((src, dst)),
        _ => bail!("the program's output is not IPv4/TCP"),
    }
}

/// A TCP frame's source and destination, of either family.
pub(crate) fn endpoints_of(frame: &[u8]) -> Result<(SocketAddr, SocketAddr)> {
    let packet = SlicedPacket::from_ethernet(frame)?;
    let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
        bail!("the program's output is not TCP");
    };
    let (src, dst): (IpAddr, IpAddr) = match packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        _ => bail!("the program's output is not IP"),
    };
    Ok((
        SocketAddr::new(src, tcp.source_port()),
        SocketAddr::new(dst, tcp.destination_port()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_flows_never_share_a_tuple() {
        let clients: std::collections::HashSet<SocketAddrV4> =
            (0..200_000).map(new_flow_client).collect();
        assert_eq!(clients.len(), 200_000);
        assert!(
            clients
                .iter()
                .all(|client| client.ip().octets()[..2] == [198, 18])
        );
    }

    #[test]
    fn frames_carry_their_addresses() {
        let dst = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 80);
        let frame = tcp_frame(CLIENT, dst, Flags::Syn).unwrap();
        assert_eq!(destination(&frame).unwrap(), dst);
        let dst6 = SocketAddrV6::new(ipv6_twin(*dst.ip()), 80, 0, 0);
        let frame = tcp_frame(CLIENT6, dst6, Flags::Syn).unwrap();
        assert_eq!(endpoints_of(&frame).unwrap(), (CLIENT6.into(), dst6.into()));
        assert!(tcp_frame(CLIENT, dst6, Flags::Syn).is_err());
    }

    #[test]
    fn new_ipv6_flows_never_share_a_tuple_and_stay_in_the_documentation_prefix() {
        let clients: std::collections::HashSet<SocketAddrV6> =
            (0..200_000).map(new_flow_client6).collect();
        assert_eq!(clients.len(), 200_000);
        assert!(
            clients
                .iter()
                .all(|client| client.ip().segments()[..2] == [0x2001, 0xdb8])
        );
    }
}
