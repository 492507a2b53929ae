//! `ebpf-proxy trace SRC DST:PORT/PROTO`: where does this packet go, and why?
//!
//! The packet is built here and run through `epx_trace` with BPF_PROG_TEST_RUN. That
//! program is the datapath's own packet path in dry-run mode (proxy-ebpf's `mode`), loaded
//! from the embedded object against the daemon's pinned maps: it reads the live SERVICES,
//! BACKEND_SLOTS and CONNTRACK entries, rewrites the packet exactly as `epx_ingress` would, but
//! writes no conntrack entry and no counter. It leaves its decisions in its own TRACE map,
//! which this module turns into the report. On a node whose external devices run the XDP
//! program, the packet meets its dry run `epx_xdp_trace` first, as arriving on such a
//! device, and `epx_trace` only if XDP leaves it to tc (see [`super::trace_hooks`]).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use clap::Args;
use proxy_common::{
    Address, BackendSet, FlowState, FrontendKey, Ipv6, Origin, ServiceName, TRACE_PROGRAM_NAME,
    TraceRecord, XDP_TRACE_PROGRAM_NAME, ct_flags, ct_state, fragment_verdict, maglev, map_names,
    proto, stat, tcp_flags, trace_answer, trace_ct, trace_fragment, trace_origin, trace_table,
};
use serde::Serialize;

mod packet;

pub use packet::{Fragment, IcmpError, IcmpKind, TracePacket};

use super::conntrack::EndpointPattern;
use super::trace_hooks::{self, Arrival, Hook, XdpView};
use super::{
    Endpoint, Output, PinArgs, family_name, frontend_label, kind_name, load_beside_pins, print,
    protocol_name,
};
use crate::conntrack::CtTable;

/// The source port when SRC has none: any fixed port works; give the port of a live flow
/// to see that flow's conntrack entry decide.
const DEFAULT_SOURCE_PORT: u16 = 40000;

#[derive(Args)]
pub struct TraceArgs {
    /// The packet's source, `address[:port]` (`[address]:port` for IPv6; port 40000 if
    /// omitted).
    #[arg(required_unless_present = "connect")]
    source: Option<EndpointPattern>,
    /// Its destination, `address:port[/tcp|/udp|/sctp]` (`[address]:port/…` for IPv6; tcp
    /// if omitted), of the source's family.
    #[arg(required_unless_present = "connect")]
    destination: Option<Destination>,
    /// Instead of a packet, a `connect()` of a process of this node to
    /// `address:port[/tcp|/udp]`: what the socket programs (--socket-lb) decide for it.
    /// Runs `connect4`'s dry run from a cgroup made for the trace; the traced connect()
    /// itself is refused, nothing is sent.
    #[arg(long, value_name = "ADDRESS:PORT[/PROTO]", conflicts_with_all = ["source", "destination"])]
    connect: Option<Destination>,
    /// With --connect: the cgroup v2 directory under which the trace's cgroup is made (the
    /// daemon's --cgroup-root) [default: the unified hierarchy's root].
    #[arg(long, requires = "connect")]
    cgroup_root: Option<std::path::PathBuf>,
    /// TCP flags of the packet, comma-separated: `syn`, `ack`, `fin`, `rst` (default: a
    /// SYN, a new connection's first packet; `syn,ack` traces a backend's first answer).
    /// For SCTP they choose the packet's chunk: `syn` INIT, `syn,ack` INIT ACK, `fin`
    /// SHUTDOWN, `rst` ABORT, `ack` DATA.
    #[arg(long, value_delimiter = ',', default_value = "syn", value_parser = parse_tcp_flag)]
    tcp_flags: Vec<u8>,
    /// Which programs the packet goes through: `auto` (XDP first where the arrival device
    /// runs it, then tc if XDP leaves the packet to it), `xdp` or `tc`.
    #[arg(long, value_enum, default_value_t = Hook::Auto)]
    hook: Hook,
    /// The device the packet arrives on (routes and SNAT start from it) [default: the
    /// first external device running the XDP program, else none]. Run trace in the node's
    /// network namespace.
    #[arg(long)]
    device: Option<String>,
    /// The packet's IP length in bytes (IPv6: its 40-byte header and payload), its payload
    /// zero-filled (default: the headers alone). A long one shows the egress MTU check:
    /// "fragmentation needed" ("packet too big").
    #[arg(long)]
    length: Option<u16>,
    /// The packet's TTL (IPv6: hop limit); 1 shows the TTL check: "time exceeded".
    #[arg(long, default_value_t = 64)]
    ttl: u8,
    /// Trace one fragment of the datagram: `first` (it carries the ports and decides for
    /// the datagram) or `later` (no ports: it follows its first fragment's FRAGMENTS
    /// record, which only the live program writes). Default: a whole datagram with "don't
    /// fragment", as Linux sends TCP. IPv4 only.
    #[arg(long, value_enum, default_value_t = Fragment::Whole)]
    fragment: Fragment,
    /// The IPv4 identification, which with the addresses and protocol names a fragment's
    /// datagram.
    #[arg(long, default_value_t = 1)]
    ip_id: u16,
    /// Trace the ICMP error the packet drew instead of the packet itself:
    /// `port-unreachable`, `host-unreachable`, `net-unreachable`, `frag-needed[=MTU]`
    /// (1400 if omitted) or `time-exceeded`, sent to the packet's source and quoting it
    /// (ICMPv6's counterparts for an IPv6 packet: no route, address unreachable, port
    /// unreachable, packet too big, hop limit exceeded).
    #[arg(long)]
    icmp_error: Option<IcmpKind>,
    /// The ICMP error's sender (default: the packet's destination; a router's address for
    /// "fragmentation needed" or "time exceeded" on the way).
    #[arg(long, requires = "icmp_error")]
    icmp_from: Option<IpAddr>,
    #[command(flatten)]
    pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl TraceArgs {
    pub fn run(self) -> Result<()> {
        if let Some(destination) = self.connect {
            let report = super::trace_connect::trace(
                &self.pins.bpffs_root,
                destination,
                self.cgroup_root.as_deref(),
            )?;
            return print(&match self.output {
                Output::Table => super::trace_connect::render(&report),
                Output::Json => serde_json::to_string_pretty(&report)?,
            });
        }
        let (Some(source), Some(destination)) = (self.source, self.destination) else {
            bail!("trace takes SOURCE and DESTINATION, or --connect DESTINATION");
        };
        let opening = TracePacket::opening(
            destination.protocol,
            Endpoint {
                address: source.address,
                port: source.port.unwrap_or(DEFAULT_SOURCE_PORT),
            },
            destination.endpoint,
        );
        let packet = TracePacket {
            tcp_flags: self.tcp_flags.iter().fold(0, |flags, flag| flags | flag),
            length: self.length.unwrap_or(opening.length),
            ttl: self.ttl,
            fragment: self.fragment,
            ip_id: self.ip_id,
            icmp_error: self.icmp_error.map(|kind| IcmpError {
                kind,
                from: self.icmp_from,
            }),
            ..opening
        };
        packet.check().map_err(anyhow::Error::msg)?;
        let arrival = trace_hooks::arrival(&self.pins.bpffs_root, self.device.as_deref())?;
        let report =
            Tracer::load(&self.pins.bpffs_root)?.run_hooks(&packet, self.hook, arrival.as_ref())?;
        print(&match self.output {
            Output::Table => render(&report),
            Output::Json => serde_json::to_string_pretty(&report)?,
        })
    }
}

/// `address:port[/proto]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Destination {
    pub endpoint: Endpoint,
    pub protocol: u8,
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (endpoint, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
        let protocol = match protocol {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "sctp" => proto::SCTP,
            other => return Err(format!("{other:?}: the protocol is tcp, udp or sctp")),
        };
        let pattern: EndpointPattern = endpoint.parse()?;
        let port = pattern
            .port
            .ok_or_else(|| format!("{text:?}: the destination needs a port"))?;
        Ok(Self {
            endpoint: Endpoint {
                address: pattern.address,
                port,
            },
            protocol,
        })
    }
}

/// One TCP flag by name.
fn parse_tcp_flag(name: &str) -> Result<u8, String> {
    match name {
        "syn" => Ok(tcp_flags::SYN),
        "ack" => Ok(tcp_flags::ACK),
        "fin" => Ok(tcp_flags::FIN),
        "rst" => Ok(tcp_flags::RST),
        other => Err(format!(
            "{other:?}: the TCP flags are syn, ack, fin and rst"
        )),
    }
}

/// `epx_trace` and `epx_xdp_trace`, loaded against the pinned maps of a bpffs root.
pub struct Tracer {
    ebpf: Ebpf,
}

impl Tracer {
    /// Loads the dry runs from the embedded object, reusing the maps pinned under `root`
    /// (it never creates pins: missing ones are an error). Needs root (or CAP_BPF).
    pub fn load(root: &Path) -> Result<Self> {
        // Each family's maps the daemon writes, and the datapath's.
        let pins: Vec<&str> = u32::MAPS
            .all()
            .into_iter()
            .chain(Ipv6::MAPS.all())
            .chain([
                map_names::CONNTRACK,
                map_names::CONNTRACK_PENDING,
                map_names::CONNTRACK6,
                map_names::CONNTRACK_PENDING6,
                map_names::AFFINITY,
                map_names::AFFINITY6,
                map_names::FRAGMENTS,
                map_names::CT_TIMEOUTS,
                map_names::STATS,
                map_names::MEMBERSHIP_EPOCH,
                map_names::DEVICES,
            ])
            .collect();
        let mut ebpf =
            load_beside_pins(root, &pins, &[TRACE_PROGRAM_NAME, XDP_TRACE_PROGRAM_NAME])?;
        for program in [
            proxy_common::TRACE6_PROGRAM_NAME,
            proxy_common::XDP_TRACE6_PROGRAM_NAME,
        ] {
            crate::datapath::load_ipv6_path(
                &mut ebpf,
                program,
                proxy_common::tail_call::IPV6_TRACE,
            )?;
        }
        Ok(Self { ebpf })
    }

    /// Runs `packet` through tc's dry run (arriving on the test run's loopback) and
    /// explains the outcome.
    pub fn run(&mut self, packet: &TracePacket) -> Result<TraceReport> {
        self.run_hooks(packet, Hook::Tc, None)
    }

    /// Runs `packet` through the dry runs `hook` asks for, as arriving on `arrival`, and
    /// explains the outcome of the one that decided.
    pub fn run_hooks(
        &mut self,
        packet: &TracePacket,
        hook: Hook,
        arrival: Option<&Arrival>,
    ) -> Result<TraceReport> {
        let ifindex = arrival.map_or(0, |arrival| arrival.ifindex);
        let through_xdp = match hook {
            Hook::Auto => arrival.is_some_and(|arrival| arrival.xdp.is_some()),
            Hook::Xdp => true,
            Hook::Tc => false,
        };
        let frame = packet.frame();
        let mut xdp = None;
        if through_xdp {
            self.clear_record()?;
            let run = crate::xdp::run_frame(self.xdp_program()?, &frame, ifindex)
                .context("running epx_xdp_trace")?;
            let record = self.record()?;
            let view = XdpView::of(&run, &record, ifindex);
            if !view.left_to_tc() || hook == Hook::Xdp {
                let verdict = view.verdict();
                let mut report = self.explain(packet, run.action, &run.frame, &record)?;
                report.verdict = verdict.to_owned();
                return Ok(report.via_xdp(view, arrival));
            }
            xdp = Some(view);
        }
        let (return_code, output) = self.run_frame_on(&frame, ifindex)?;
        let record = self.record()?;
        let report = self.explain(packet, return_code, &output, &record)?;
        Ok(match xdp {
            Some(view) => report.via_xdp(view, arrival),
            None => report.on(arrival),
        })
    }

    /// The report of a run that left `output` and `record`.
    fn explain(
        &mut self,
        packet: &TracePacket,
        return_code: u32,
        output: &[u8],
        record: &TraceRecord,
    ) -> Result<TraceReport> {
        if packet.is_ipv6() {
            self.explain_as::<Ipv6>(packet, return_code, output, record)
        } else {
            self.explain_as::<u32>(packet, return_code, output, record)
        }
    }

    /// [`Tracer::explain`] for a packet of the family of `A`: its names from its family's
    /// SVC_NAMES.
    fn explain_as<A: Address>(
        &self,
        packet: &TracePacket,
        return_code: u32,
        output: &[u8],
        record: &TraceRecord,
    ) -> Result<TraceReport> {
        let traced = A::traced(record);
        let name_of = |rev_nat_id: u32| service_name::<A>(&self.ebpf, rev_nat_id);
        let frontend_name = if traced.frontend == FrontendKey::default() {
            None
        } else {
            name_of(record.service.rev_nat_id)?
        };
        let flow_name = if record.conntrack == trace_ct::NONE {
            None
        } else {
            name_of(traced.flow.rev_nat_id)?
        };
        Ok(report_of::<A>(
            packet,
            return_code,
            output,
            record,
            frontend_name,
            flow_name,
        ))
    }

    /// Runs a raw frame through `epx_trace`: its return value and the frame it leaves.
    pub fn run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        self.run_frame_on(frame, 0)
    }

    /// Runs a raw frame through `epx_xdp_trace` (arriving on the test run's loopback).
    pub fn run_xdp_frame(&mut self, frame: &[u8]) -> Result<crate::xdp::XdpRun> {
        self.clear_record()?;
        crate::xdp::run_frame(self.xdp_program()?, frame, 0).context("running epx_xdp_trace")
    }

    /// [`Tracer::run_frame`] as arriving on `ifindex` (0: loopback).
    fn run_frame_on(&mut self, frame: &[u8], ifindex: u32) -> Result<(u32, Vec<u8>)> {
        self.clear_record()?;
        let program: &SchedClassifier = self
            .ebpf
            .program(TRACE_PROGRAM_NAME)
            .context("epx_trace not loaded")?
            .try_into()?;
        crate::datapath::run_frame_on(program, frame, ifindex).context("running epx_trace")
    }

    fn xdp_program(&self) -> Result<&aya::programs::Xdp> {
        Ok(self
            .ebpf
            .program(XDP_TRACE_PROGRAM_NAME)
            .context("epx_xdp_trace not loaded")?
            .try_into()?)
    }

    fn clear_record(&mut self) -> Result<()> {
        clear_record(&mut self.ebpf)
    }

    fn record(&mut self) -> Result<TraceRecord> {
        record(&mut self.ebpf, TRACE_PROGRAM_NAME)
    }
}

fn trace_map(ebpf: &mut Ebpf) -> Result<PerCpuArray<&mut MapData, TraceRecord>> {
    let map = ebpf
        .map_mut(map_names::TRACE)
        .context("TRACE missing from the object")?;
    Ok(map.try_into()?)
}

/// Zeroes every CPU's TRACE record, so the run's CPU is the only one marked `recorded`.
pub(super) fn clear_record(ebpf: &mut Ebpf) -> Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| error)?;
    let zeroes = PerCpuValues::try_from(vec![TraceRecord::default(); cpus])?;
    trace_map(ebpf)?.set(0, zeroes, 0)?;
    Ok(())
}

/// The TRACE record the dry run `program` left.
pub(super) fn record(ebpf: &mut Ebpf, program: &str) -> Result<TraceRecord> {
    let records = trace_map(ebpf)?.get(&0, 0)?;
    let recorded: Vec<&TraceRecord> = records.iter().filter(|r| r.recorded == 1).collect();
    match recorded.as_slice() {
        [record] => Ok(**record),
        [] => bail!("{program} left no record (did the program run?)"),
        _ => bail!("{program} left more than one record"),
    }
}

/// The Service port named for `rev_nat_id` in the SVC_NAMES of family `A` (SVC_NAMES6 for
/// IPv6) of a loaded object.
pub(super) fn service_name<A: Address>(ebpf: &Ebpf, rev_nat_id: u32) -> Result<Option<String>> {
    let map = A::MAPS.svc_names;
    let names: BpfHashMap<&MapData, u32, ServiceName> = ebpf
        .map(map)
        .with_context(|| format!("{map} missing from the object"))?
        .try_into()?;
    Ok(names
        .get(&rev_nat_id, 0)
        .ok()
        .as_ref()
        .map(super::service_port_name))
}

/// What `trace` found. JSON schema: every field always present; objects that did not take
/// part in the decision are null.
#[derive(Debug, Serialize)]
pub struct TraceReport {
    pub packet: PacketView,
    /// `accept` (TC_ACT_OK), `drop` (TC_ACT_SHOT) or `redirect` (TC_ACT_REDIRECT); other
    /// tc actions as `tc-action-<n>`.
    pub verdict: String,
    /// The program's return value.
    pub return_code: u32,
    /// The path taken, named like its STATS counter (`new_flow`, `ct_hit`, `reply`,
    /// `pass`, `fragment`, `icmp_error`, `frag_needed`, …; see `stats`).
    pub path: &'static str,
    /// The same, in words.
    pub explanation: &'static str,
    pub conntrack: Option<FlowMatch>,
    pub frontend: Option<FrontendMatch>,
    /// Where the new connection came from, when that chose the backends (an
    /// externalTrafficPolicy Local frontend): `pod` (a pod device) or `outside`; null when
    /// it did not matter.
    pub origin: Option<&'static str>,
    /// The slot chosen for a new flow: at random (a new connection would pick again) or by
    /// the frontend's Maglev table.
    pub selection: Option<Selection>,
    pub backend: Option<BackendMatch>,
    /// A fragment: its datagram and the FRAGMENTS record that decides for it.
    pub fragment: Option<FragmentMatch>,
    /// The packet as it leaves the program.
    pub output: Option<PacketView>,
    /// The ICMP error the program sent back in the packet's place (a refusal, or the
    /// forwarding checks' "fragmentation needed" or "time exceeded").
    pub answer: Option<AnswerView>,
    /// A packet the live program would route itself (FIB lookup and redirect: its source
    /// became a node address).
    pub routes_reply: bool,
    /// The map entries that decided, in the order the program read them.
    pub decided_by: Vec<String>,
    /// The program that decided: `xdp` or `tc`.
    pub hook: &'static str,
    /// The device the packet was traced as arriving on; null: the test run's loopback.
    pub device: Option<String>,
    /// What the XDP program did, when the packet went through it (null otherwise).
    pub xdp: Option<XdpView>,
}

impl TraceReport {
    /// The report of the tc run of a packet arriving on `arrival`.
    fn on(mut self, arrival: Option<&Arrival>) -> Self {
        self.device = arrival.map(|arrival| arrival.name.clone());
        self
    }

    /// The report of a packet that went through XDP (`view`) on `arrival`: XDP's run if it
    /// decided, else tc's after it.
    fn via_xdp(mut self, view: XdpView, arrival: Option<&Arrival>) -> Self {
        if !view.left_to_tc() {
            self.hook = "xdp";
        }
        self.xdp = Some(view);
        self.on(arrival)
    }
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct PacketView {
    /// `IPv4` or `IPv6`.
    pub family: &'static str,
    pub protocol: &'static str,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// TCP: the flags by name (`SYN`, `SYN-ACK`, `ACK`, `FIN-ACK`, …); null otherwise.
    pub tcp_flags: Option<String>,
    /// SCTP: its chunk (`INIT`, `INIT ACK`, `DATA`, `SHUTDOWN`, `ABORT`); null otherwise.
    pub sctp_chunk: Option<&'static str>,
    /// The IP length in bytes (IPv6: header and payload).
    pub length: u16,
    /// The TTL (IPv6: hop limit).
    pub ttl: u8,
    /// `first` or `later` for a fragment (a later one carries no ports: they are its
    /// datagram's); null for a whole datagram.
    pub fragment: Option<&'static str>,
    pub ip_id: u16,
    /// An ICMP error about the packet described by the fields above (which it quotes).
    pub icmp_error: Option<IcmpErrorView>,
}

/// An ICMP error about a packet.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct IcmpErrorView {
    /// `port-unreachable`, `frag-needed`, `time-exceeded`, …
    pub kind: &'static str,
    /// "Fragmentation needed": the MTU it names.
    pub mtu: Option<u16>,
    /// The error's sender: it goes to the quoted packet's source.
    pub from: IpAddr,
}

impl From<&TracePacket> for PacketView {
    fn from(packet: &TracePacket) -> Self {
        Self {
            family: family_name(packet.source.address),
            protocol: protocol_name(packet.protocol),
            source: packet.source,
            destination: packet.destination,
            tcp_flags: (packet.protocol == proto::TCP).then(|| flag_names(packet.tcp_flags)),
            sctp_chunk: (packet.protocol == proto::SCTP)
                .then(|| packet::sctp_chunk_name(packet::sctp_chunk(packet.tcp_flags))),
            length: packet.length,
            ttl: packet.ttl,
            fragment: match packet.fragment {
                Fragment::Whole => None,
                Fragment::First => Some("first"),
                Fragment::Later => Some("later"),
            },
            ip_id: packet.ip_id,
            icmp_error: packet.icmp_error.map(|error| {
                let (kind, mtu) = icmp_kind_name(error.kind);
                IcmpErrorView {
                    kind,
                    mtu,
                    from: error.from.unwrap_or(packet.destination.address),
                }
            }),
        }
    }
}

/// A kind of ICMP error by name, and the MTU of "fragmentation needed".
fn icmp_kind_name(kind: IcmpKind) -> (&'static str, Option<u16>) {
    match kind {
        IcmpKind::NetUnreachable => ("net-unreachable", None),
        IcmpKind::HostUnreachable => ("host-unreachable", None),
        IcmpKind::PortUnreachable => ("port-unreachable", None),
        IcmpKind::FragNeeded { mtu } => ("frag-needed", Some(mtu)),
        IcmpKind::TimeExceeded => ("time-exceeded", None),
    }
}

/// The ICMP (ICMPv6) error the program answered the packet with, read from the frame it
/// left.
#[derive(Debug, Serialize)]
pub struct AnswerView {
    /// `port-unreachable` (a refusal), `frag-needed` (ICMPv6: packet too big) or
    /// `time-exceeded`; `type-T-code-C` for anything else.
    pub kind: String,
    /// "Fragmentation needed": the next hop's MTU, which the sender lowers its path MTU to.
    pub mtu: Option<u16>,
    pub from: IpAddr,
    pub to: IpAddr,
}

impl AnswerView {
    /// Reads an ICMP error (Ethernet, IPv4 without options and ICMP, or IPv6 and ICMPv6)
    /// from `frame`.
    fn parse(frame: &[u8]) -> Option<Self> {
        let ip = frame.get(14..)?;
        let header = packet::IpHeader::parse(ip)?;
        if !header.is_icmp() || (!header.is_ipv6() && header.len != 20) {
            return None;
        }
        let message = ip.get(header.len..header.len + 8)?;
        let rest = [message[4], message[5], message[6], message[7]];
        let (kind, mtu) = match IcmpKind::of(header.is_ipv6(), message[0], message[1], rest) {
            Some(kind) => {
                let (name, mtu) = icmp_kind_name(kind);
                (name.to_owned(), mtu)
            }
            None => (format!("type-{}-code-{}", message[0], message[1]), None),
        };
        Some(Self {
            kind,
            mtu,
            from: header.source,
            to: header.destination,
        })
    }
}

/// A fragment's datagram and what decides for it.
#[derive(Debug, Serialize)]
pub struct FragmentMatch {
    /// `first` or `later`.
    pub part: &'static str,
    /// The FRAGMENTS key: source and destination address, protocol, IP identification.
    pub source: IpAddr,
    pub destination: IpAddr,
    pub ip_id: u16,
    /// `first`: what the live program would record for the later fragments; `later`:
    /// the record found (null when none: the fragment passes untouched).
    pub record: Option<FragmentRecord>,
}

#[derive(Debug, Serialize)]
pub struct FragmentRecord {
    /// `forward` (rewritten to the addresses below, or left as they are) or `drop`.
    pub verdict: &'static str,
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The live program routes the fragments itself (their source is a node address).
    pub routes_itself: bool,
}

/// `SYN-ACK`, `FIN-ACK`, `RST`, …; `none` without flags.
fn flag_names(flags: u8) -> String {
    let names: Vec<&str> = [
        (tcp_flags::SYN, "SYN"),
        (tcp_flags::FIN, "FIN"),
        (tcp_flags::RST, "RST"),
        (tcp_flags::ACK, "ACK"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join("-")
    }
}

/// The conntrack entry that decided.
#[derive(Debug, Serialize)]
pub struct FlowMatch {
    /// `forward` (the client's flow), `reply` (a backend answering), `closing-reused` (a
    /// SYN on a closing flow: selected anew) or `backend-left` (its backend no longer
    /// serves the frontend and the packet may move: selected anew).
    pub direction: &'static str,
    /// `assured` (CONNTRACK, CONNTRACK6) or `pending` (CONNTRACK_PENDING,
    /// CONNTRACK_PENDING6).
    pub table: &'static str,
    /// `service`, or `direct` (a flow straight to a backend).
    pub kind: &'static str,
    /// The flow's state (see `conntrack`'s `flow_state`).
    pub flow_state: &'static str,
    pub rev_nat_id: u32,
    pub service: Option<String>,
    pub backend_id: u32,
    /// Where the entry rewrites to: the backend (forward) or the frontend (reply).
    pub nat: Endpoint,
    /// The whole tuple the entry rewrites the packet to.
    pub rewrites_to: TupleView,
    pub closing: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// Addresses and ports.
#[derive(Debug, Serialize)]
pub struct TupleView {
    pub protocol: &'static str,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// Always null: a rewrite keeps the packet's flags (the field stays, so the schema
    /// only ever grows).
    pub tcp_flags: Option<String>,
}

/// The SERVICES header that matched.
#[derive(Debug, Serialize)]
pub struct FrontendMatch {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    pub kind: &'static str,
    pub service: Option<String>,
    pub rev_nat_id: u32,
    pub backend_count: u16,
    /// An externalTrafficPolicy Local frontend: the size of the Cluster set its pods use
    /// (null for other frontends).
    pub pod_backend_count: Option<u16>,
}

#[derive(Debug, Serialize)]
pub struct Selection {
    /// 1-based within the set.
    pub slot: u16,
    pub of: u16,
    /// Where the slot sits in BACKEND_SLOTS.
    pub index: u32,
    /// `frontend` (its own backends) or `cluster` (the Cluster set of an
    /// externalTrafficPolicy Local frontend, for pods).
    pub set: &'static str,
    /// `random`, or `maglev`: the frontend's Maglev table gave the slot for the client's
    /// address, port and protocol (every node and every run gives the same).
    pub chosen_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct BackendMatch {
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
}

fn explanation(path: u32) -> &'static str {
    match path {
        stat::NEW_FLOW => "a new flow: a backend was selected, the destination rewritten",
        stat::CT_HIT => "a tracked flow: the destination is rewritten to its backend",
        stat::REPLY => "a tracked flow's reply: the source is rewritten back to the frontend",
        stat::CT_MISS | stat::AFFINITY => "a new flow: a backend was selected",
        stat::CT_CREATE_FAILED => "the new flow could not be recorded: dropped",
        stat::PASS => "no tracked flow and no frontend: passes untouched",
        stat::NO_BACKEND => {
            "no endpoint of the frontend is on this node (traffic policy Local): dropped"
        }
        stat::REJECTED => {
            "the frontend has no endpoints: refused, answered with an ICMP (ICMPv6) port \
             unreachable sent back out of the device (kube-proxy's REJECT)"
        }
        stat::REJECT_RATE_LIMITED => {
            "an ICMP error was due, but the node's ICMP rate limits had no room: dropped"
        }
        stat::BACKEND_MISSING => {
            "the selected slot names no backend (the daemon is mid-update): dropped"
        }
        stat::NOT_HANDLED => {
            "not a TCP, UDP or SCTP packet the parser takes (nor a fragment or an ICMP error \
             it translates): passes untouched"
        }
        stat::FIB_MISS => {
            "translated, but the FIB has no route for the packet the program would route \
             itself: left to the kernel"
        }
        stat::DIRECT => {
            "a flow straight to a backend, through no Service: passes untouched (tracked so \
             that no Service flow takes its reply tuple; its port is remapped if one already did)"
        }
        stat::SOURCE_RANGE_DENIED => {
            "the client is outside the frontend's loadBalancerSourceRanges: dropped"
        }
        stat::SNAT_FAILED => "no SNAT port was free for the new flow: dropped",
        stat::REMAPPED => {
            "a new flow whose reply tuple another live flow holds: its source port is remapped"
        }
        stat::BACKEND_LEFT => {
            "the flow's backend no longer serves the frontend: a backend is selected anew"
        }
        stat::FRAGMENT => {
            "a later fragment (no ports of its own): it goes the way its datagram's first \
             fragment went, by the FRAGMENTS record"
        }
        stat::FRAGMENT_UNMATCHED => {
            "a later fragment whose first fragment this node has not seen (not yet, not \
             here, or its record expired): passes untouched"
        }
        stat::ICMP_ERROR => {
            "an ICMP error about a tracked flow's packet: translated as the flow is (outer \
             addresses, the quoted packet, all checksums)"
        }
        stat::FRAG_NEEDED => {
            "too big for the device it would leave by: answered with ICMP \
             \"fragmentation needed\" to its sender, about the packet as sent (the kernel's \
             forwarding check), and dropped"
        }
        stat::TTL_EXCEEDED => {
            "its TTL runs out here: answered with ICMP \"time exceeded\" to its sender, \
             and dropped"
        }
        stat::NOT_FORWARDABLE => {
            "the program routes it itself, but it cannot go (too big for the device, or its \
             TTL runs out) and no ICMP error may be sent about it (a later fragment, an ICMP \
             error): dropped, as the kernel drops it"
        }
        stat::FRAGMENT_DROPPED => {
            "a later fragment of a datagram whose first fragment was dropped or answered in \
             its place: dropped too"
        }
        _ => "rewriting the packet failed: dropped",
    }
}

fn verdict(return_code: u32) -> String {
    match return_code {
        0 => "accept".into(),
        2 => "drop".into(),
        7 => "redirect".into(),
        other => format!("tc-action-{other}"),
    }
}

/// What a new connection's lookups decided: the frontend, the slot or the client's
/// remembered backend, and the backend.
pub(super) struct Decision {
    pub frontend: Option<FrontendMatch>,
    pub selection: Option<Selection>,
    pub backend: Option<BackendMatch>,
}

/// The frontend, selection and backend of a dry run's `record` (`affinity_key` names the
/// affinity entry that kept a backend), with the map entries they came from appended to
/// `decided_by`.
pub(super) fn decision<A: Address>(
    record: &TraceRecord,
    frontend_name: Option<String>,
    affinity_key: &str,
    decided_by: &mut Vec<String>,
) -> Decision {
    let header = &record.service;
    let traced = A::traced(record);
    let slots = A::MAPS.backend_slots;
    let frontend = (traced.frontend != FrontendKey::default()).then(|| {
        let key = &traced.frontend;
        let endpoint = Endpoint::from_wire(key.addr, key.port);
        let own = header.backends_for(Origin::Outside);
        let pods = header.backends_for(Origin::Pod);
        let mut line = format!(
            "{}[{}] = {} {}, rev_nat_id {}, {}",
            A::MAPS.services,
            frontend_label(key),
            kind_name(header.flags),
            frontend_name.as_deref().unwrap_or("(unnamed)"),
            header.rev_nat_id,
            slice_text(slots, &own),
        );
        if pods.cluster {
            write!(line, ", pods and the node: {}", slice_text(slots, &pods)).unwrap();
        }
        decided_by.push(line);
        FrontendMatch {
            address: endpoint.address,
            port: endpoint.port,
            protocol: protocol_name(key.proto),
            kind: kind_name(header.flags),
            service: frontend_name,
            rev_nat_id: header.rev_nat_id,
            backend_count: header.count,
            pod_backend_count: pods.cluster.then_some(pods.count),
        }
    });
    match record.origin {
        trace_origin::POD => decided_by.push(
            "DEVICES[arrival device] = a pod's: its new connections use the Service port's \
             Cluster endpoints (kube-proxy's \"pod traffic for external destinations\")"
                .to_owned(),
        ),
        trace_origin::OUTSIDE => decided_by.push(
            "DEVICES[arrival device] = not a pod's: the frontend's own (Local) endpoints"
                .to_owned(),
        ),
        _ => {}
    }
    let set = header.backends_for(if record.cluster_set != 0 {
        Origin::Pod
    } else {
        Origin::Outside
    });
    let selection = (record.slot != 0).then(|| {
        let index = set.first + u32::from(record.slot) - 1;
        let endpoint = Endpoint::from_wire(traced.backend.addr, traced.backend.port);
        let chosen = match maglev::table_size(header.maglev).filter(|_| record.maglev != 0) {
            Some(size) => format!(
                "given by the frontend's Maglev table of {size} positions for the client's \
                 address, port and protocol"
            ),
            None => "chosen at random".to_owned(),
        };
        decided_by.push(format!(
            "{slots}[{index}] = backend {}, {endpoint} (slot {} of {}, {chosen})",
            record.backend_id, record.slot, set.count
        ));
        Selection {
            slot: record.slot,
            of: set.count,
            index,
            set: if set.cluster { "cluster" } else { "frontend" },
            chosen_by: if record.maglev != 0 {
                "maglev"
            } else {
                "random"
            },
        }
    });
    let backend = (selection.is_some() || record.affinity != 0).then(|| {
        let endpoint = Endpoint::from_wire(traced.backend.addr, traced.backend.port);
        if record.affinity != 0 {
            let set_name = if set.cluster {
                "Cluster set's"
            } else {
                "frontend's"
            };
            decided_by.push(format!(
                "{affinity_key} = backend {}, {endpoint} (session affinity: the client's \
                 backend on this Service port, still one of the {set_name})",
                record.backend_id
            ));
        }
        BackendMatch {
            id: record.backend_id,
            address: endpoint.address,
            port: endpoint.port,
        }
    });
    Decision {
        frontend,
        selection,
        backend,
    }
}

/// `3 backends at BACKEND_SLOTS[12..15]`, `no backends` (`slots`: the family's
/// BACKEND_SLOTS).
fn slice_text(slots: &str, set: &BackendSet) -> String {
    let end = set.first + u32::from(set.count);
    match set.count {
        0 => "no backends".to_owned(),
        1 => format!("1 backend at {slots}[{}..{end}]", set.first),
        n => format!("{n} backends at {slots}[{}..{end}]", set.first),
    }
}

/// The report for one run of a packet of the family of `A`: pure, from the packet, the
/// program's verdict and output, and its record (read in the family's place).
fn report_of<A: Address>(
    packet: &TracePacket,
    return_code: u32,
    output: &[u8],
    record: &TraceRecord,
    frontend_name: Option<String>,
    flow_name: Option<String>,
) -> TraceReport {
    let traced = A::traced(record);
    let mut decided_by = Vec::new();
    if let Some(error) = &packet.icmp_error {
        let (kind, _) = icmp_kind_name(error.kind);
        decided_by.push(format!(
            "ICMP {kind} about {} {} → {}: the quoted packet's flow decides (its entry for \
             the error's direction is keyed by the quote reversed)",
            protocol_name(packet.protocol),
            packet.source,
            packet.destination
        ));
    }
    let conntrack = (record.conntrack != trace_ct::NONE).then(|| {
        let flow = &traced.flow;
        let direction = match record.conntrack {
            trace_ct::REPLY => "reply",
            trace_ct::FORWARD => "forward",
            trace_ct::BACKEND_LEFT => "backend-left",
            _ => "closing-reused",
        };
        let entry = if flow.is_reply() { "reply" } else { "forward" };
        let nat = if flow.is_reply() {
            Endpoint::from_wire(flow.to.src_addr, flow.to.src_port)
        } else {
            Endpoint::from_wire(flow.to.dst_addr, flow.to.dst_port)
        };
        let direct = flow.flags & ct_flags::DIRECT != 0;
        let outcome = match record.conntrack {
            _ if direct => "a direct flow to a backend: nothing to translate".to_owned(),
            trace_ct::REPLY => format!("source becomes the frontend {nat}"),
            trace_ct::FORWARD => format!("backend {} ({nat})", flow.backend_id),
            trace_ct::BACKEND_LEFT => format!(
                "backend {} ({nat}) no longer serves the frontend: selected anew",
                flow.backend_id
            ),
            _ => format!(
                "backend {} ({nat}), closing, and the packet is a SYN: selected anew",
                flow.backend_id
            ),
        };
        let (table, map) = if record.table == trace_table::ASSURED {
            ("assured", CtTable::Assured.map_name_of::<A>())
        } else {
            ("pending", CtTable::Pending.map_name_of::<A>())
        };
        let flow_state = FlowState::of(packet.protocol, flow.state).name();
        // The packet's own tuple is the key, in either direction; an ICMP error's, the
        // quoted packet's reversed.
        let (from, to) = if packet.icmp_error.is_some() {
            (packet.destination, packet.source)
        } else {
            (packet.source, packet.destination)
        };
        decided_by.push(format!(
            "{map}[{} {from} → {to} {entry}, {flow_state}] = {outcome}",
            protocol_name(packet.protocol),
        ));
        FlowMatch {
            direction,
            table,
            kind: if direct { "direct" } else { "service" },
            flow_state,
            rev_nat_id: flow.rev_nat_id,
            service: flow_name,
            backend_id: flow.backend_id,
            nat,
            rewrites_to: TupleView {
                protocol: protocol_name(packet.protocol),
                source: Endpoint::from_wire(flow.to.src_addr, flow.to.src_port),
                destination: Endpoint::from_wire(flow.to.dst_addr, flow.to.dst_port),
                tcp_flags: None,
            },
            closing: flow.state & ct_state::CLOSING != 0,
            packets: flow.packets,
            bytes: flow.bytes,
        }
    });
    let affinity = if A::BITS == 32 {
        map_names::AFFINITY
    } else {
        map_names::AFFINITY6
    };
    let affinity_key = format!(
        "{affinity}[{} service port {}]",
        packet.source.address, record.service.service_port_id
    );
    let origin = match record.origin {
        trace_origin::POD => Some("pod"),
        trace_origin::OUTSIDE => Some("outside"),
        _ => None,
    };
    let Decision {
        frontend,
        selection,
        backend,
    } = decision::<A>(record, frontend_name, &affinity_key, &mut decided_by);
    let backend = if backend.is_some() {
        backend
    } else if record.conntrack == trace_ct::FORWARD && traced.flow.flags & ct_flags::DIRECT == 0 {
        let endpoint = Endpoint::from_wire(traced.flow.to.dst_addr, traced.flow.to.dst_port);
        Some(BackendMatch {
            id: record.backend_id,
            address: endpoint.address,
            port: endpoint.port,
        })
    } else {
        None
    };
    let fragment = fragment_match(packet, record, &mut decided_by);
    let answer = if packet.icmp_error.is_none() {
        AnswerView::parse(output)
    } else {
        None
    };
    if let Some(answer) = &answer {
        match record.answered {
            trace_answer::FRAG_NEEDED => decided_by.push(format!(
                "FIB: the route for the translated packet leaves by a device of MTU {} < \
                 {} bytes, and the packet may not be fragmented here: answered from {}",
                record.mtu,
                packet.frame().len() - 14,
                answer.from
            )),
            trace_answer::TIME_EXCEEDED => decided_by.push(format!(
                "TTL {}: it would run out at this hop: answered from {}",
                packet.ttl, answer.from
            )),
            _ => {}
        }
    }
    if decided_by.is_empty() {
        decided_by.push(match u32::from(record.outcome) {
            stat::NOT_HANDLED => "no map: the parser let the packet through".to_owned(),
            _ => format!(
                "no {} entry for the tuple, no {} entry for {}/{}",
                CtTable::Assured.map_name_of::<A>(),
                A::MAPS.services,
                packet.destination,
                protocol_name(packet.protocol)
            ),
        });
    }
    let path = u32::from(record.outcome);
    TraceReport {
        packet: packet.into(),
        verdict: verdict(return_code),
        return_code,
        path: stat::NAMES
            .get(usize::from(record.outcome))
            .copied()
            .unwrap_or("?"),
        explanation: explanation(path),
        conntrack,
        frontend,
        origin,
        selection,
        backend,
        fragment,
        output: match answer {
            Some(_) => None,
            None => TracePacket::parse_as(output, packet)
                .as_ref()
                .map(PacketView::from),
        },
        answer,
        routes_reply: record.routes_reply != 0,
        decided_by,
        hook: "tc",
        device: None,
        xdp: None,
    }
}

/// A fragment's datagram and its FRAGMENTS record, with the line that explains it.
fn fragment_match(
    packet: &TracePacket,
    record: &TraceRecord,
    decided_by: &mut Vec<String>,
) -> Option<FragmentMatch> {
    let part = match record.fragment {
        trace_fragment::FIRST => "first",
        trace_fragment::LATER => "later",
        _ => return None,
    };
    let key = format!(
        "FRAGMENTS[{} {} → {} id {}]",
        protocol_name(packet.protocol),
        packet.source.address,
        packet.destination.address,
        packet.ip_id
    );
    let found = record.fragment == trace_fragment::FIRST || record.fragment_found != 0;
    let fragment_record = found.then(|| {
        let value = &record.fragment_record;
        FragmentRecord {
            verdict: if value.verdict == fragment_verdict::DROP {
                "drop"
            } else {
                "forward"
            },
            source: Endpoint::from_wire(value.to.src_addr, 0).address,
            destination: Endpoint::from_wire(value.to.dst_addr, 0).address,
            routes_itself: value.routes_itself != 0,
        }
    });
    let said = match &fragment_record {
        None => "none: its first fragment has not passed here (or came later, or its \
                 record expired or was evicted)"
            .to_owned(),
        Some(value) if value.verdict == "drop" => {
            "drop (its first fragment was dropped or answered with an ICMP error)".to_owned()
        }
        Some(value) => format!(
            "forward as {} → {}{}",
            value.source,
            value.destination,
            if value.routes_itself {
                ", routed by the program"
            } else {
                ""
            }
        ),
    };
    decided_by.push(match part {
        "first" => format!(
            "{key} ← {said} (what the live program records for the later fragments; the \
             dry run writes nothing)"
        ),
        _ => format!("{key} = {said}"),
    });
    Some(FragmentMatch {
        part,
        source: packet.source.address,
        destination: packet.destination.address,
        ip_id: packet.ip_id,
        record: fragment_record,
    })
}

pub fn render(report: &TraceReport) -> String {
    let mut out = String::new();
    writeln!(out, "packet      {}", describe(&report.packet)).unwrap();
    writeln!(out, "verdict     {}", report.verdict).unwrap();
    let device = report.device.as_deref().unwrap_or("lo");
    match &report.xdp {
        Some(xdp) => writeln!(out, "hook        {}", xdp.describe(device)).unwrap(),
        None => writeln!(out, "hook        tc (arriving on {device})").unwrap(),
    }
    writeln!(out, "path        {} ({})", report.path, report.explanation).unwrap();
    write_decision(&mut out, &report.decided_by, report.backend.as_ref());
    if let Some(output) = &report.output {
        let label = if *output == report.packet {
            "unchanged"
        } else {
            "rewritten"
        };
        writeln!(out, "{label:<11} {}", describe(output)).unwrap();
    }
    if let Some(answer) = &report.answer {
        let mtu = answer
            .mtu
            .map(|mtu| format!(" (MTU {mtu})"))
            .unwrap_or_default();
        writeln!(
            out,
            "answered    {} {}{mtu} {} → {}, quoting the packet as it came",
            icmp_name(report.packet.family),
            answer.kind,
            answer.from,
            answer.to
        )
        .unwrap();
    }
    if report.routes_reply {
        writeln!(
            out,
            "then        routed by the program itself (FIB lookup and redirect: its source \
             became a node address)"
        )
        .unwrap();
    }
    out.push_str("dry run     nothing was written: no conntrack entry, no counter");
    if report
        .selection
        .as_ref()
        .is_some_and(|selection| selection.of > 1 && selection.chosen_by == "random")
    {
        out.push_str("\n            (the slot is random: another run may pick another backend)");
    }
    out
}

/// One line for a packet: `udp 198.18.0.10:40000 → 198.19.0.10:53 (first fragment, id 7,
/// 1500 bytes)`, or for an ICMP error `icmp port-unreachable from 198.18.1.10 about udp …`.
fn describe(view: &PacketView) -> String {
    let mut notes = Vec::new();
    if let Some(flags) = &view.tcp_flags {
        notes.push(flags.clone());
    }
    if let Some(chunk) = view.sctp_chunk {
        notes.push(chunk.to_owned());
    }
    if let Some(part) = view.fragment {
        notes.push(format!("{part} fragment, id {}", view.ip_id));
    }
    notes.push(format!("{} bytes, TTL {}", view.length, view.ttl));
    // A later fragment carries no ports: only its addresses are its own.
    let packet = if view.fragment == Some("later") {
        format!(
            "{} {} → {} ({})",
            view.protocol,
            view.source.address,
            view.destination.address,
            notes.join(", ")
        )
    } else {
        format!(
            "{} {} → {} ({})",
            view.protocol,
            view.source,
            view.destination,
            notes.join(", ")
        )
    };
    match &view.icmp_error {
        None => packet,
        Some(error) => {
            let mtu = error
                .mtu
                .map(|mtu| format!(" (MTU {mtu})"))
                .unwrap_or_default();
            format!(
                "{} {}{mtu} from {} about {packet}",
                icmp_name(view.family),
                error.kind,
                error.from
            )
        }
    }
}

/// `icmp`, or `icmpv6` for the errors of an IPv6 packet.
fn icmp_name(family: &str) -> &'static str {
    if family == Ipv6::NAME {
        "icmpv6"
    } else {
        "icmp"
    }
}

/// The `decided by` lines (the map entries read) and the chosen backend, as `trace` and
/// `trace --connect` print them.
pub(super) fn write_decision(
    out: &mut String,
    decided_by: &[String],
    backend: Option<&BackendMatch>,
) {
    for (index, entry) in decided_by.iter().enumerate() {
        let label = if index == 0 { "decided by" } else { "" };
        writeln!(out, "{label:<11} {entry}").unwrap();
    }
    if let Some(backend) = backend {
        let endpoint = Endpoint {
            address: backend.address,
            port: backend.port,
        };
        writeln!(out, "backend     {endpoint} (id {})", backend.id).unwrap();
    }
}

#[cfg(test)]
mod tests;
