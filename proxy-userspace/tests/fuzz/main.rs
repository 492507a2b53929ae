//! Hostile packets (issue 14, item 2): every program of the object that BPF_PROG_TEST_RUN
//! can run — `epx_ingress` (the datapath), `epx_xdp` (the same path in XDP, in front of it
//! on external devices: every other packet goes through it first, and on to `epx_ingress`
//! when it leaves the packet to tc), `epx_trace` and `epx_xdp_trace` (their dry runs,
//! behind `ebpf-proxy trace`) and `epx_ct_reap` (the garbage collector's kernel side) —
//! against a seeded
//! stream of generated frames ([`generate`]), each checked against the properties in
//! [`check`] and [`reap`]. The node is loaded the daemon's way and its frontends written by
//! the daemon's planner and map writer ([`cluster`]); every few thousand packets the
//! Services' endpoints change (scaled to none and back, terminating, other nodes). A
//! share of the frames are IPv6 (to the dual-stack Services' IPv6 frontends and
//! elsewhere), run through the same programs (`epx_ingress6`, `epx_xdp6` behind them)
//! and checked by [`check6`].
//!
//! `EBPF_PROXY_FUZZ_PACKETS` (default 30 000, what `cargo xtask test` runs) and
//! `EBPF_PROXY_FUZZ_SEED` (default 14) set the run; `cargo xtask fuzz [--packets N]
//! [--seed S]` runs a million (release build, a random seed unless given) and prints the
//! rate. A failure names the seed, the packet's index and kind, the program, the verdict,
//! both frames in hex and the command that replays the run up to it. The kernel's random
//! choices (backends, SNAT ports) are not replayed, so a replay may take other paths
//! before the failing packet; its hex is the reproducer.

#[path = "../datapath/mod.rs"]
mod datapath;

mod check;
mod check6;
mod cluster;
mod generate;
mod ipv6;
mod reap;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use proxy_common::{CtKey, stat};

use check::{Outcome, Program, Run, flow_key};
use cluster::{Cluster, Flows, FuzzedNode};
use datapath::wire::{self, Shape, hex, tuple};
use datapath::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_available, in_a_namespace};
use generate::{Generated, Generator};
use proxy_userspace::datapath::run_frame;
use proxy_userspace::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX};

/// Packets per run of `cargo xtask test`.
const PACKETS: u64 = 30_000;
const SEED: u64 = 14;
/// The endpoints change this often.
const EPOCH: u64 = 5_000;
/// Keys of recent flows offered to the reaper.
const RECENT_KEYS: usize = 256;

/// Counters a run does not reach, by design: no writer runs concurrently (a slot naming a
/// missing backend), the conntrack maps are never busy under one writer, refusals are not
/// rate limited here, the socket programs (cgroup hooks, which BPF_PROG_TEST_RUN cannot
/// run) count their own, and XDP sends nothing itself: the node's one device is the test
/// run's loopback, which has no neighbours, so XDP leaves what it would send back out to tc
/// (`no-neighbour`; `tests/xdp.rs` checks XDP_TX byte for byte on a veth), and there is no
/// second device to redirect to. A run of at least [`COVERAGE_AFTER`] packets reaches
/// every other counter, or the generator misses a corner.
const UNREACHED: [u32; 10] = [
    stat::BACKEND_MISSING,
    stat::CT_CREATE_FAILED,
    stat::REJECT_RATE_LIMITED,
    stat::SOCK_CONNECT,
    stat::SOCK_SENDMSG,
    stat::SOCK_REVERSE,
    stat::SOCK_REFUSED,
    stat::SOCK_UNREACHABLE,
    stat::XDP_TX,
    stat::XDP_REDIRECT,
];
/// The XDP program's verdict counters: one per packet through `epx_xdp`, beside the
/// counter that ends its path when it decided (none when it left the packet to tc).
const XDP_VERDICTS: [u32; 5] = [
    stat::XDP_PASS,
    stat::XDP_TX,
    stat::XDP_REDIRECT,
    stat::XDP_DROP,
    stat::XDP_TO_TC,
];
const COVERAGE_AFTER: u64 = 20_000;
/// Counters of steps on a packet's way; every other counter ends it, one per packet.
const STEPS: [u32; 5] = [
    stat::CT_MISS,
    stat::FIB_MISS,
    stat::AFFINITY,
    stat::REMAPPED,
    stat::BACKEND_LEFT,
];
/// The counters that end a path with TC_ACT_SHOT.
const DROPS: [u32; 9] = [
    stat::NOT_FORWARDABLE,
    stat::FRAGMENT_DROPPED,
    stat::CT_CREATE_FAILED,
    stat::NO_BACKEND,
    stat::BACKEND_MISSING,
    stat::REWRITE_FAILED,
    stat::SOURCE_RANGE_DENIED,
    stat::SNAT_FAILED,
    stat::REJECT_RATE_LIMITED,
];

struct Settings {
    packets: u64,
    seed: u64,
}

impl Settings {
    fn from_env() -> Result<Self> {
        let read = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(value) => value.parse().with_context(|| format!("{name}={value}")),
                Err(_) => Ok(default),
            }
        };
        Ok(Self {
            packets: read("EBPF_PROXY_FUZZ_PACKETS", PACKETS)?,
            seed: read("EBPF_PROXY_FUZZ_SEED", SEED)?,
        })
    }
}

#[test]
fn every_program_keeps_its_properties_under_generated_packets() -> Result<()> {
    if !bpf_available() {
        return Ok(());
    }
    let settings = Settings::from_env()?;
    let summary = in_a_namespace(&cluster::NETWORK, &cluster::SYSCTLS, || fuzz(&settings))?;
    println!("{summary}");
    Ok(())
}

/// What a run did.
#[derive(Default)]
struct Summary {
    packets: u64,
    elapsed: Duration,
    /// What `epx_ingress` did, per kind of generated packet.
    outcomes: BTreeMap<(&'static str, Outcome), u64>,
    reap_requests: u64,
    reaped: u64,
    /// Packets through `epx_xdp`, and how many of them it left to `epx_ingress`.
    xdp: u64,
    xdp_to_tc: u64,
    counters: BTreeMap<&'static str, u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "{} packets through epx_trace and epx_ingress or epx_xdp ({} through epx_xdp and \
             epx_xdp_trace, {} of them left to epx_ingress) and {} requests through \
             epx_ct_reap ({} entries reaped) in {seconds:.1} s: {:.0} packets/s",
            self.packets,
            self.xdp,
            self.xdp_to_tc,
            self.reap_requests,
            self.reaped,
            self.packets as f64 / seconds
        )?;
        let mut kinds: BTreeMap<&str, String> = BTreeMap::new();
        for ((kind, outcome), count) in &self.outcomes {
            let _ = write!(kinds.entry(kind).or_default(), " {outcome:?} {count}");
        }
        for (kind, outcomes) in kinds {
            writeln!(f, "  {kind:<38}{outcomes}")?;
        }
        write!(f, "  datapath counters:")?;
        for (name, count) in &self.counters {
            write!(f, " {name} {count}")?;
        }
        Ok(())
    }
}

fn fuzz(settings: &Settings) -> Result<Summary> {
    let mut fuzzer = Fuzzer {
        node: FuzzedNode::load()?,
        generator: Generator::new(settings.seed, cluster::pools()),
        recent: VecDeque::with_capacity(RECENT_KEYS),
        summary: Summary::default(),
        runs: 0,
        drops: 0,
        xdp_drops: 0,
    };
    let mut cluster = Cluster::new(settings.seed);
    fuzzer.node.program(&cluster.next_epoch()?)?;
    let started = Instant::now();
    for index in 0..settings.packets {
        if index > 0 && index % EPOCH == 0 {
            fuzzer.node.program(&cluster.next_epoch()?)?;
        }
        let packet = fuzzer.generator.next_frame();
        let report = |failure: Failure| failure.report(settings, index, &packet);
        match std::panic::catch_unwind(AssertUnwindSafe(|| fuzzer.packet(&packet))) {
            Ok(outcome) => outcome.map_err(report)?,
            Err(panic) => {
                let message = (panic.downcast_ref::<String>().cloned())
                    .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                    .unwrap_or_default();
                let problem = format!("the harness panicked: {message}");
                return Err(report(Failure::of("harness", &packet.frame, problem)));
            }
        }
    }
    let Fuzzer {
        node,
        mut summary,
        runs,
        drops,
        xdp_drops,
        ..
    } = fuzzer;
    summary.packets = settings.packets;
    summary.elapsed = started.elapsed();
    summary.counters = counters(&node)?;
    accounted(&summary, runs, drops, xdp_drops)?;
    Ok(summary)
}

/// The fuzzed node and what the run has seen so far.
struct Fuzzer {
    node: FuzzedNode,
    generator: Generator,
    /// Keys of recent flows, offered to the reaper.
    recent: VecDeque<CtKey>,
    summary: Summary,
    /// Packets decided by `epx_ingress` or `epx_xdp`, and how many they dropped (counted
    /// with a reason); how many of those drops were `epx_xdp`'s.
    runs: u64,
    drops: u64,
    xdp_drops: u64,
}

/// A violated property: which program, on what, with what result.
struct Failure {
    program: &'static str,
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    problem: String,
}

impl Failure {
    /// A failure before or without a result.
    fn of(program: &'static str, input: &[u8], problem: String) -> Self {
        Self {
            program,
            input: input.to_vec(),
            verdict: 0,
            output: Vec::new(),
            problem,
        }
    }

    /// The report, with what reproduces it.
    fn report(self, settings: &Settings, index: u64, packet: &Generated) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: {}\n\
             seed {seed}, packet #{index} ({kind}), verdict {}\n\
             input ({} bytes):\n{}\n\
             output ({} bytes):\n{}\n\
             replay: cargo xtask fuzz --seed {seed} --packets {}",
            self.program,
            self.problem,
            self.verdict,
            self.input.len(),
            hex(&self.input),
            self.output.len(),
            hex(&self.output),
            index + 1,
            seed = settings.seed,
            kind = packet.kind,
        )
    }
}

impl Fuzzer {
    /// Runs one generated packet through the dry run and the datapath, and a request
    /// through the reaper, checking each.
    fn packet(&mut self, packet: &Generated) -> Result<(), Failure> {
        let frame = &packet.frame[..];
        let node = &mut self.node;
        let failed = |program, verdict, output: &[u8], problem| Failure {
            program,
            input: frame.to_vec(),
            verdict,
            output: output.to_vec(),
            problem,
        };
        if !test_runnable(frame) {
            // The kernel runs no program on these; make sure it still refuses them.
            if node.datapath.test_run(frame).is_ok() {
                let problem = "BPF_PROG_TEST_RUN ran a frame it used to refuse".to_owned();
                return Err(Failure::of("epx_ingress", frame, problem));
            }
            self.tally(packet.kind, Outcome::NotRun);
            return Ok(());
        }
        if ipv6::is_ipv6(frame) {
            return self.packet6(packet);
        }
        let key = flow_key(frame, packet.datagram);
        let flows = |node: &FuzzedNode| key.map(|key| node.flows(&key)).unwrap_or_default();
        let before = flows(node);
        let datagram = check::datagram_of(frame);
        let record = |node: &FuzzedNode| datagram.and_then(|key| node.fragment_record(&key));
        let record_before = record(node);
        let ran = |program| {
            move |error: anyhow::Error| {
                Failure::of(
                    program,
                    frame,
                    format!("BPF_PROG_TEST_RUN failed: {error:#}"),
                )
            }
        };

        let (verdict, output) = node.tracer.run_frame(frame).map_err(ran("epx_trace"))?;
        let mut run = Run {
            program: Program::DryRun,
            input: frame,
            verdict,
            output: &output,
            before,
            after: before,
            reply: Flows::default(),
            datagram: packet.datagram,
            record_before,
            record_after: record_before,
        };
        check::check(&run, &node.frontends)
            .map_err(|problem| failed("epx_trace", verdict, &output, problem))?;
        let unchanged = flows(node);
        if unchanged != before {
            let problem = format!("the dry run changed conntrack: {before:?} → {unchanged:?}");
            return Err(failed("epx_trace", verdict, &output, problem));
        }
        let unchanged = record(node);
        if unchanged != record_before {
            let problem =
                format!("the dry run changed FRAGMENTS: {record_before:?} → {unchanged:?}");
            return Err(failed("epx_trace", verdict, &output, problem));
        }

        // Every other packet arrives on a device running XDP: epx_xdp first, epx_ingress
        // only for what XDP leaves to it; its dry run too.
        let through_xdp = self.runs % 2 == 1;
        if through_xdp {
            let xdp = (node.tracer.run_xdp_frame(frame)).map_err(ran("epx_xdp_trace"))?;
            let decided = xdp_as_tc(frame, xdp.action, xdp.decided, xdp.frame)
                .map_err(|problem| failed("epx_xdp_trace", xdp.action, &[], problem))?;
            if let Some((verdict, output)) = decided {
                let dry = Run {
                    verdict,
                    output: &output,
                    ..run
                };
                check::check(&dry, &node.frontends)
                    .map_err(|problem| failed("epx_xdp_trace", verdict, &output, problem))?;
            }
            let unchanged = (flows(node), record(node));
            if unchanged != (before, record_before) {
                let problem = format!(
                    "the dry run changed conntrack or FRAGMENTS: {before:?}, {record_before:?} \
                     → {unchanged:?}"
                );
                return Err(failed("epx_xdp_trace", xdp.action, frame, problem));
            }
        }
        // IP fragments and ICMP take tc's paths of their own: XDP leaves them all to tc.
        let only_tc = matches!(wire::shape(frame), Shape::Fragment(_) | Shape::Icmp(_));
        let (program, verdict, output) = self.run_live(frame, through_xdp, only_tc, |node| {
            let after = (translations(&flows(node)), record(node));
            (after != (translations(&before), record_before)).then(|| {
                format!("conntrack or FRAGMENTS: {before:?}, {record_before:?} → {after:?}")
            })
        })?;
        let node = &mut self.node;
        run.program = Program::Live;
        run.verdict = verdict;
        run.output = &output;
        run.after = flows(node);
        run.record_after = record(node);
        if let Shape::Transport(out) = wire::shape(&output) {
            run.reply = node.flows(&CtKey::new(tuple(out.dst, out.src), out.proto()));
        }
        let outcome = check::check(&run, &node.frontends)
            .map_err(|problem| failed(program, verdict, &output, problem))?;
        self.runs += 1;
        self.drops += u64::from(verdict == TC_ACT_SHOT);
        self.tally(packet.kind, outcome);
        self.remember(packet, &output);
        self.reap()
    }

    /// [`Fuzzer::packet`] for an IPv6 frame (runnable): the dry run, `epx_xdp` (every
    /// other packet) or `epx_ingress`, checked by [`check6`] against CONNTRACK6 and
    /// FRAGMENTS6.
    fn packet6(&mut self, packet: &Generated) -> Result<(), Failure> {
        let frame = &packet.frame[..];
        let node = &mut self.node;
        let failed = |program, verdict, output: &[u8], problem| Failure {
            program,
            input: frame.to_vec(),
            verdict,
            output: output.to_vec(),
            problem,
        };
        let ran = |program| {
            move |error: anyhow::Error| {
                Failure::of(
                    program,
                    frame,
                    format!("BPF_PROG_TEST_RUN failed: {error:#}"),
                )
            }
        };
        let key = check6::flow_key6(frame);
        let datagram = check6::datagram6(frame);
        let state = |node: &FuzzedNode| {
            (
                key.map(|key| node.flows6(&key)).unwrap_or_default(),
                datagram.and_then(|key| node.fragment_record6(&key)),
            )
        };
        let (before, record_before) = state(node);
        let (verdict, output) = node.tracer.run_frame(frame).map_err(ran("epx_trace"))?;
        let mut run = check6::Run6 {
            program: Program::DryRun,
            input: frame,
            verdict,
            output: &output,
            before,
            after: before,
            reply: Flows::default(),
            record_before,
            record_after: record_before,
        };
        check6::check6(&run, &node.frontends)
            .map_err(|problem| failed("epx_trace", verdict, &output, problem))?;
        if state(node) != (before, record_before) {
            let problem = "the dry run changed CONNTRACK6 or FRAGMENTS6".to_owned();
            return Err(failed("epx_trace", verdict, &output, problem));
        }
        let through_xdp = self.runs % 2 == 1;
        if through_xdp {
            let xdp = (node.tracer.run_xdp_frame(frame)).map_err(ran("epx_xdp_trace"))?;
            let decided = xdp_as_tc(frame, xdp.action, xdp.decided, xdp.frame)
                .map_err(|problem| failed("epx_xdp_trace", xdp.action, &[], problem))?;
            if let Some((verdict, output)) = decided {
                let dry = check6::Run6 {
                    verdict,
                    output: &output,
                    ..run
                };
                check6::check6(&dry, &node.frontends)
                    .map_err(|problem| failed("epx_xdp_trace", verdict, &output, problem))?;
            }
            if state(node) != (before, record_before) {
                let problem = "the dry run changed CONNTRACK6 or FRAGMENTS6".to_owned();
                return Err(failed("epx_xdp_trace", xdp.action, frame, problem));
            }
        }
        let only_tc = check6::only_tc6(frame);
        let (program, verdict, output) = self.run_live(frame, through_xdp, only_tc, |node| {
            let (flows, record) = state(node);
            ((translations(&flows), record) != (translations(&before), record_before))
                .then(|| "CONNTRACK6 or FRAGMENTS6".to_owned())
        })?;
        let node = &mut self.node;
        run.program = Program::Live;
        run.verdict = verdict;
        run.output = &output;
        (run.after, run.record_after) = state(node);
        if let ipv6::Shape6::Transport(out) = ipv6::shape6(&output) {
            let reply = CtKey::new(ipv6::tuple6(out.dst, out.src), out.proto);
            run.reply = node.flows6(&reply);
        }
        let outcome = check6::check6(&run, &node.frontends)
            .map_err(|problem| failed(program, verdict, &output, problem))?;
        self.runs += 1;
        self.drops += u64::from(verdict == TC_ACT_SHOT);
        self.tally(packet.kind, outcome);
        self.reap()
    }

    /// The live programs on `frame`, as a device runs them: through XDP (`through_xdp`:
    /// every other packet arrives on a device running it) `epx_xdp` first, and
    /// `epx_ingress` only for what it leaves to tc, which must have changed no tracked
    /// state (`changed_state` names what did); else `epx_ingress` alone. `only_tc`: a
    /// packet XDP must leave to tc (fragments, ICMP). The program that decided, its
    /// verdict and its frame.
    fn run_live(
        &mut self,
        frame: &[u8],
        through_xdp: bool,
        only_tc: bool,
        changed_state: impl Fn(&FuzzedNode) -> Option<String>,
    ) -> Result<(&'static str, u32, Vec<u8>), Failure> {
        let ran = |program| {
            move |error: anyhow::Error| {
                Failure::of(
                    program,
                    frame,
                    format!("BPF_PROG_TEST_RUN failed: {error:#}"),
                )
            }
        };
        let ingress = |node: &FuzzedNode| {
            let (verdict, output) = node.datapath.test_run(frame).map_err(ran("epx_ingress"))?;
            Ok(("epx_ingress", verdict, output))
        };
        if !through_xdp {
            return ingress(&self.node);
        }
        self.summary.xdp += 1;
        let xdp = (self.node.datapath.test_run_xdp(frame)).map_err(ran("epx_xdp"))?;
        let failed = |verdict, output: &[u8], problem| Failure {
            program: "epx_xdp",
            input: frame.to_vec(),
            verdict,
            output: output.to_vec(),
            problem,
        };
        match xdp_as_tc(frame, xdp.action, xdp.decided, xdp.frame)
            .map_err(|problem| failed(xdp.action, &[], problem))?
        {
            Some(_) if only_tc => {
                let problem = "decided a fragment or an ICMP message".to_owned();
                Err(failed(xdp.action, frame, problem))
            }
            Some((verdict, output)) => {
                self.xdp_drops += u64::from(verdict == TC_ACT_SHOT);
                Ok(("epx_xdp", verdict, output))
            }
            // A tracked flow's packet XDP may have accounted before it found it must leave
            // the packet to tc (see `translations`); nothing else may have changed.
            None => match changed_state(&self.node) {
                Some(change) => {
                    let problem = format!("left a packet to tc but changed {change}");
                    Err(failed(XDP_PASS, frame, problem))
                }
                None => {
                    self.summary.xdp_to_tc += 1;
                    ingress(&self.node)
                }
            },
        }
    }

    fn tally(&mut self, kind: &'static str, outcome: Outcome) {
        *self.summary.outcomes.entry((kind, outcome)).or_default() += 1;
    }

    /// The reaper is offered the keys of recent packets and of the flows they made.
    fn remember(&mut self, packet: &Generated, output: &[u8]) {
        let mut push = |key: CtKey| {
            if self.recent.len() == RECENT_KEYS {
                self.recent.pop_front();
            }
            self.recent.push_back(key);
        };
        if let Some(key) = flow_key(&packet.frame, packet.datagram) {
            push(key);
        }
        if let Shape::Transport(out) = wire::shape(output) {
            push(CtKey::new(tuple(out.dst, out.src), out.proto()));
        }
    }

    /// A generated request through `epx_ct_reap`, checked.
    fn reap(&mut self) -> Result<(), Failure> {
        let request = self.generator.reap_request(self.recent.make_contiguous());
        let parsed = reap::Request::parse(&request);
        if let (Some(flow), Some(key)) = (self.generator.aging(), parsed.keys.first()) {
            (self.node.age(parsed.assured, key, flow))
                .map_err(|error| Failure::of("harness", &request, format!("{error:#}")))?;
        }
        let entries = reap::before(&self.node, &parsed);
        let program = (self.node.reaper.program())
            .map_err(|error| Failure::of("epx_ct_reap", &request, format!("{error:#}")))?;
        let (reaped, output) = run_frame(program, &request).map_err(|error| {
            Failure::of(
                "epx_ct_reap",
                &request,
                format!("BPF_PROG_TEST_RUN failed: {error:#}"),
            )
        })?;
        reap::check(&self.node, &parsed, &entries, &request, (reaped, &output)).map_err(
            |problem| Failure {
                program: "epx_ct_reap",
                input: request.clone(),
                verdict: reaped,
                output: output.clone(),
                problem,
            },
        )?;
        self.summary.reap_requests += 1;
        self.summary.reaped += u64::from(reaped);
        Ok(())
    }
}

/// What a key's conntrack entries translate to, without their accounting (packets, bytes,
/// state, expiry, membership epoch, and which map holds them): what XDP must leave as it was when it leaves
/// a packet to tc. A packet of a tracked flow is accounted when its entry is followed,
/// before the forwarding checks find where it goes; one XDP then leaves to tc (its next
/// hop's MAC unknown, another device, an ICMP error due) tc accounts again.
fn translations<A: proxy_common::Address>(
    flows: &Flows<A>,
) -> Vec<(proxy_common::Tuple<A>, u32, u32, u8)> {
    flows
        .values()
        .map(|value| (value.to, value.rev_nat_id, value.backend_id, value.flags))
        .collect()
}

/// An `epx_xdp` run as the tc verdict and frame the checks take (`None`: left to tc, which
/// it must leave untouched and unmarked): XDP_PASS of a decided packet is tc's
/// TC_ACT_OK, XDP_DROP its TC_ACT_SHOT, and XDP_TX or XDP_REDIRECT its TC_ACT_REDIRECT — the
/// packet routed by the program, whose MAC addresses XDP writes itself (from the FIB), so
/// they are put back before the checks, which allow a routed packet its TTL only.
fn xdp_as_tc(
    input: &[u8],
    action: u32,
    decided: bool,
    mut output: Vec<u8>,
) -> Result<Option<(u32, Vec<u8>)>, String> {
    Ok(Some(match action {
        XDP_PASS if !decided => {
            if output != input {
                return Err("left a packet to tc, but changed".into());
            }
            return Ok(None);
        }
        XDP_PASS => (TC_ACT_OK, output),
        XDP_DROP => (TC_ACT_SHOT, output),
        XDP_TX | XDP_REDIRECT => {
            if output.len() < wire::ETH_LEN || input.len() < wire::ETH_LEN {
                return Err("sent a frame shorter than its Ethernet header".into());
            }
            output[..12].copy_from_slice(&input[..12]);
            (TC_ACT_REDIRECT, output)
        }
        other => return Err(format!("unexpected XDP action {other}")),
    }))
}

/// Whether BPF_PROG_TEST_RUN runs a tc program on `frame`: it refuses frames shorter than
/// an Ethernet header, and IPv4 and IPv6 frames without room for their fixed header.
/// (The program sees such runts on a real device, and passes them: parse.rs checks every
/// length.)
fn test_runnable(frame: &[u8]) -> bool {
    let needed = match frame.get(12..14) {
        Some([0x08, 0x00]) => wire::ETH_LEN + 20,
        Some([0x86, 0xdd]) => wire::ETH_LEN + 40,
        _ => wire::ETH_LEN,
    };
    frame.len() >= needed
}

/// Every counter of the datapath, summed over the CPUs.
fn counters(node: &FuzzedNode) -> Result<BTreeMap<&'static str, u64>> {
    (0..stat::COUNT)
        .map(|index| {
            let total = node.stats.get(&index, 0)?.iter().sum();
            Ok((stat::NAMES[index as usize], total))
        })
        .collect()
}

/// Every packet decided by `epx_ingress` or `epx_xdp` counted once, every drop with its
/// reason, every packet through `epx_xdp` with its verdict, nothing counted by the dry run;
/// a long enough run reached every path.
fn accounted(summary: &Summary, runs: u64, drops: u64, xdp_drops: u64) -> Result<()> {
    let counted = |index: u32| summary.counters[stat::NAMES[index as usize]];
    let ends: u64 = (0..stat::COUNT)
        .filter(|index| !STEPS.contains(index) && !XDP_VERDICTS.contains(index))
        .map(counted)
        .sum();
    let xdp_verdicts: u64 = XDP_VERDICTS.iter().copied().map(counted).sum();
    ensure!(
        xdp_verdicts == summary.xdp
            && counted(stat::XDP_TO_TC) == summary.xdp_to_tc
            && counted(stat::XDP_DROP) == xdp_drops,
        "{} packets ran through epx_xdp ({} left to tc, {xdp_drops} dropped), its verdicts \
         counted: {:?}",
        summary.xdp,
        summary.xdp_to_tc,
        summary.counters
    );
    ensure!(
        ends == runs,
        "{runs} packets ran through epx_ingress (and as many through epx_trace), {ends} were \
         counted: {:?}",
        summary.counters
    );
    let dropped: u64 = DROPS.iter().copied().map(counted).sum();
    ensure!(
        dropped == drops,
        "{drops} packets were dropped, {dropped} drops counted: {:?}",
        summary.counters
    );
    if summary.packets >= COVERAGE_AFTER {
        let missed: Vec<&str> = (0..stat::COUNT)
            .filter(|index| !UNREACHED.contains(index) && counted(*index) == 0)
            .map(|index| stat::NAMES[index as usize])
            .collect();
        ensure!(
            missed.is_empty(),
            "the generated packets never reached {missed:?}"
        );
    }
    Ok(())
}
