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
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::SchedClassifier;
use clap::Args;
use proxy_common::{
    BackendSet, FlowState, FrontendKey, Origin, ServiceName, TRACE_PROGRAM_NAME, TraceRecord,
    XDP_TRACE_PROGRAM_NAME, ct_flags, ct_state, maglev, map_names, proto, stat, tcp_flags,
    trace_ct, trace_origin, trace_table,
};
use serde::Serialize;

use super::conntrack::EndpointPattern;
use super::trace_hooks::{self, Arrival, Hook, XdpView};
use super::{
    Endpoint, Output, PinArgs, frontend_label, kind_name, load_beside_pins, print, protocol_name,
};

/// The source port when SRC has none: any fixed port works; give the port of a live flow
/// to see that flow's conntrack entry decide.
const DEFAULT_SOURCE_PORT: u16 = 40000;

#[derive(Args)]
pub struct TraceArgs {
    /// The packet's source, `address[:port]` (port 40000 if omitted).
    #[arg(required_unless_present = "connect")]
    source: Option<EndpointPattern>,
    /// Its destination, `address:port[/tcp|/udp]` (tcp if omitted).
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
        let packet = TracePacket {
            protocol: destination.protocol,
            source: Endpoint {
                address: source.address,
                port: source.port.unwrap_or(DEFAULT_SOURCE_PORT),
            },
            destination: destination.endpoint,
            tcp_flags: self.tcp_flags.iter().fold(0, |flags, flag| flags | flag),
        };
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
            other => return Err(format!("{other:?}: the protocol is tcp or udp")),
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

/// The packet to trace: a TCP segment or a UDP datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracePacket {
    pub protocol: u8,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// TCP only: the flag bits (`proxy_common::tcp_flags`).
    pub tcp_flags: u8,
}

impl TracePacket {
    /// A new connection's first packet: a TCP SYN, or a UDP datagram.
    pub fn opening(protocol: u8, source: Endpoint, destination: Endpoint) -> Self {
        Self {
            protocol,
            source,
            destination,
            tcp_flags: tcp_flags::SYN,
        }
    }
}

const ETHERNET_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;

impl TracePacket {
    /// Ethernet + IPv4 + TCP/UDP with valid checksums (test-run skbs are not
    /// CHECKSUM_PARTIAL, so the checksum helpers update real sums).
    pub fn frame(&self) -> Vec<u8> {
        let l4_len = if self.protocol == proto::TCP {
            TCP_LEN
        } else {
            UDP_LEN
        };
        let mut frame = Vec::with_capacity(ETHERNET_LEN + IPV4_LEN + l4_len);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
        let total_len = (IPV4_LEN + l4_len) as u16;
        let mut ip = [0u8; IPV4_LEN];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total_len.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = self.protocol;
        ip[12..16].copy_from_slice(&self.source.address.octets());
        ip[16..20].copy_from_slice(&self.destination.address.octets());
        let ip_checksum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        frame.extend_from_slice(&ip);

        let mut l4 = vec![0u8; l4_len];
        l4[0..2].copy_from_slice(&self.source.port.to_be_bytes());
        l4[2..4].copy_from_slice(&self.destination.port.to_be_bytes());
        let checksum_offset = if self.protocol == proto::TCP {
            l4[4..8].copy_from_slice(&1u32.to_be_bytes()); // sequence number
            l4[12] = (TCP_LEN as u8 / 4) << 4;
            l4[13] = self.tcp_flags;
            l4[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
            16
        } else {
            l4[4..6].copy_from_slice(&(UDP_LEN as u16).to_be_bytes());
            6
        };
        let pseudo_header = [
            &ip[12..20],
            &[0, self.protocol],
            &(l4_len as u16).to_be_bytes(),
        ]
        .concat();
        let l4_checksum = checksum(&[&pseudo_header, &l4]);
        l4[checksum_offset..checksum_offset + 2].copy_from_slice(&l4_checksum.to_be_bytes());
        frame.extend_from_slice(&l4);
        frame
    }

    /// Reads the addresses and ports back from a frame the program returned.
    fn parse(frame: &[u8], protocol: u8) -> Option<Self> {
        let ip = frame.get(ETHERNET_LEN..)?;
        let l4 = ip.get(usize::from(ip.first()? & 0x0f) * 4..)?;
        let address = |at: usize| -> Option<Ipv4Addr> {
            Some(Ipv4Addr::from(
                <[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?,
            ))
        };
        let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
        let tcp_flags = if protocol == proto::TCP {
            *l4.get(13)?
        } else {
            0
        };
        Some(Self {
            protocol,
            tcp_flags,
            source: Endpoint {
                address: address(12)?,
                port: port(0)?,
            },
            destination: Endpoint {
                address: address(16)?,
                port: port(2)?,
            },
        })
    }
}

/// The Internet checksum over the concatenated parts (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `epx_trace` and `epx_xdp_trace`, loaded against the pinned maps of a bpffs root.
pub struct Tracer {
    ebpf: Ebpf,
}

impl Tracer {
    /// Loads the dry runs from the embedded object, reusing the maps pinned under `root`
    /// (it never creates pins: missing ones are an error). Needs root (or CAP_BPF).
    pub fn load(root: &Path) -> Result<Self> {
        let pins = [
            map_names::SERVICES,
            map_names::BACKEND_SLOTS,
            map_names::BACKEND_IDS,
            map_names::CONNTRACK,
            map_names::CONNTRACK_PENDING,
            map_names::CT_TIMEOUTS,
            map_names::STATS,
            map_names::AFFINITY,
            map_names::MEMBERSHIP,
            map_names::MEMBERSHIP_EPOCH,
            map_names::SVC_NAMES,
            map_names::SOURCE_RANGES,
            map_names::DEVICES,
            map_names::MAGLEV,
        ];
        let ebpf = load_beside_pins(root, &pins, &[TRACE_PROGRAM_NAME, XDP_TRACE_PROGRAM_NAME])?;
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
        let record = *record;
        let name_of = |rev_nat_id: u32| service_name(&self.ebpf, rev_nat_id);
        let frontend_name = if record.frontend == FrontendKey::default() {
            None
        } else {
            name_of(record.service.rev_nat_id)?
        };
        let flow_name = if record.conntrack == trace_ct::NONE {
            None
        } else {
            name_of(record.flow.rev_nat_id)?
        };
        Ok(report(
            packet,
            return_code,
            TracePacket::parse(output, packet.protocol),
            &record,
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

/// The Service port named for `rev_nat_id` in SVC_NAMES of a loaded object.
pub(super) fn service_name(ebpf: &Ebpf, rev_nat_id: u32) -> Result<Option<String>> {
    let names: BpfHashMap<&MapData, u32, ServiceName> = ebpf
        .map(map_names::SVC_NAMES)
        .context("SVC_NAMES missing from the object")?
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
    /// `accept` (TC_ACT_OK) or `drop` (TC_ACT_SHOT); other tc actions as `tc-action-<n>`.
    pub verdict: String,
    /// The program's return value.
    pub return_code: u32,
    /// The path taken, named like its STATS counter: `new_flow`, `ct_hit`, `reply`,
    /// `pass`, `no_backend`, `backend_missing`, `not_handled` or `rewrite_failed`.
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
    /// The packet as it leaves the program.
    pub output: Option<PacketView>,
    /// A NodePort reply the live program would route itself (FIB lookup and redirect).
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
    pub protocol: &'static str,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// TCP: the flags by name (`SYN`, `SYN-ACK`, `ACK`, `FIN-ACK`, …); null otherwise.
    pub tcp_flags: Option<String>,
}

impl From<&TracePacket> for PacketView {
    fn from(packet: &TracePacket) -> Self {
        Self {
            protocol: protocol_name(packet.protocol),
            source: packet.source,
            destination: packet.destination,
            tcp_flags: (packet.protocol == proto::TCP).then(|| flag_names(packet.tcp_flags)),
        }
    }
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
    /// `assured` (CONNTRACK) or `pending` (CONNTRACK_PENDING).
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
    pub rewrites_to: PacketView,
    pub closing: bool,
    pub packets: u64,
    pub bytes: u64,
}

/// The SERVICES header that matched.
#[derive(Debug, Serialize)]
pub struct FrontendMatch {
    pub address: Ipv4Addr,
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
    pub address: Ipv4Addr,
    pub port: u16,
}

fn explanation(path: u32) -> &'static str {
    match path {
        stat::NEW_FLOW => "a new flow: a backend was selected, the destination rewritten",
        stat::CT_HIT => "a tracked flow: the destination is rewritten to its backend",
        stat::REPLY => "a tracked flow's reply: the source is rewritten back to the frontend",
        stat::PASS => "no tracked flow and no frontend: passes untouched",
        stat::NO_BACKEND => {
            "no endpoint of the frontend is on this node (traffic policy Local): dropped"
        }
        stat::REJECTED => {
            "the frontend has no endpoints: refused, answered with an ICMP port unreachable \
             sent back out of the device (kube-proxy's REJECT)"
        }
        stat::BACKEND_MISSING => {
            "the selected slot names no backend (the daemon is mid-update): dropped"
        }
        stat::NOT_HANDLED => "not IPv4 TCP/UDP, or a fragment: passes untouched",
        stat::DIRECT => {
            "a flow straight to a backend, through no Service: passes untouched (tracked so \
             that no Service flow takes its reply tuple; its port is remapped if one already did)"
        }
        stat::SOURCE_RANGE_DENIED => {
            "the client is outside the frontend's loadBalancerSourceRanges: dropped"
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
pub(super) fn decision(
    record: &TraceRecord,
    frontend_name: Option<String>,
    affinity_key: &str,
    decided_by: &mut Vec<String>,
) -> Decision {
    let header = &record.service;
    let frontend = (record.frontend != FrontendKey::default()).then(|| {
        let key = &record.frontend;
        let endpoint = Endpoint::from_wire(key.addr, key.port);
        let own = header.backends_for(Origin::Outside);
        let pods = header.backends_for(Origin::Pod);
        let mut line = format!(
            "SERVICES[{}] = {} {}, rev_nat_id {}, {}",
            frontend_label(key),
            kind_name(header.flags),
            frontend_name.as_deref().unwrap_or("(unnamed)"),
            header.rev_nat_id,
            slice_text(&own),
        );
        if pods.cluster {
            write!(line, ", pods and the node: {}", slice_text(&pods)).unwrap();
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
        let endpoint = Endpoint::from_wire(record.backend.addr, record.backend.port);
        let chosen = match maglev::table_size(header.maglev).filter(|_| record.maglev != 0) {
            Some(size) => format!(
                "given by the frontend's Maglev table of {size} positions for the client's \
                 address, port and protocol"
            ),
            None => "chosen at random".to_owned(),
        };
        decided_by.push(format!(
            "BACKEND_SLOTS[{index}] = backend {}, {endpoint} (slot {} of {}, {chosen})",
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
        let endpoint = Endpoint::from_wire(record.backend.addr, record.backend.port);
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

/// `3 backends at BACKEND_SLOTS[12..15]`, `no backends`.
fn slice_text(set: &BackendSet) -> String {
    let end = set.first + u32::from(set.count);
    match set.count {
        0 => "no backends".to_owned(),
        1 => format!("1 backend at BACKEND_SLOTS[{}..{end}]", set.first),
        n => format!("{n} backends at BACKEND_SLOTS[{}..{end}]", set.first),
    }
}

/// The report for one run: pure, from the packet, the program's verdict and output, and
/// its record.
fn report(
    packet: &TracePacket,
    return_code: u32,
    output: Option<TracePacket>,
    record: &TraceRecord,
    frontend_name: Option<String>,
    flow_name: Option<String>,
) -> TraceReport {
    let mut decided_by = Vec::new();
    let conntrack = (record.conntrack != trace_ct::NONE).then(|| {
        let flow = &record.flow;
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
            ("assured", map_names::CONNTRACK)
        } else {
            ("pending", map_names::CONNTRACK_PENDING)
        };
        let flow_state = FlowState::of(packet.protocol, flow.state).name();
        // The packet's own tuple is the key, in either direction.
        decided_by.push(format!(
            "{map}[{} {} → {} {entry}, {flow_state}] = {outcome}",
            protocol_name(packet.protocol),
            packet.source,
            packet.destination,
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
            rewrites_to: PacketView {
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
    let affinity_key = format!(
        "AFFINITY[{} service port {}]",
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
    } = decision(record, frontend_name, &affinity_key, &mut decided_by);
    let backend = if backend.is_some() {
        backend
    } else if record.conntrack == trace_ct::FORWARD && record.flow.flags & ct_flags::DIRECT == 0 {
        let endpoint = Endpoint::from_wire(record.flow.to.dst_addr, record.flow.to.dst_port);
        Some(BackendMatch {
            id: record.backend_id,
            address: endpoint.address,
            port: endpoint.port,
        })
    } else {
        None
    };
    if decided_by.is_empty() {
        decided_by.push(match u32::from(record.outcome) {
            stat::NOT_HANDLED => "no map: the parser let the packet through".to_owned(),
            _ => format!(
                "no CONNTRACK entry for the tuple, no SERVICES entry for {}/{}",
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
        output: output.as_ref().map(PacketView::from),
        routes_reply: record.routes_reply != 0,
        decided_by,
        hook: "tc",
        device: None,
        xdp: None,
    }
}

pub fn render(report: &TraceReport) -> String {
    let packet =
        |view: &PacketView| format!("{} {} → {}", view.protocol, view.source, view.destination);
    let syn = match &report.packet.tcp_flags {
        Some(flags) => format!(" ({flags})"),
        None => String::new(),
    };
    let mut out = String::new();
    writeln!(out, "packet      {}{syn}", packet(&report.packet)).unwrap();
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
        writeln!(out, "{label:<11} {}", packet(output)).unwrap();
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
mod tests {
    use proxy_common::{Backend, FrontendValue, service_flags};

    use super::*;

    fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::from(address),
            port,
        }
    }

    #[test]
    fn frames_carry_valid_checksums_and_parse_back() {
        for protocol in [proto::TCP, proto::UDP] {
            let packet = TracePacket {
                protocol,
                source: endpoint([198, 18, 1, 14], 40000),
                destination: endpoint([198, 19, 0, 10], 80),
                tcp_flags: if protocol == proto::TCP {
                    tcp_flags::SYN | tcp_flags::ACK
                } else {
                    0
                },
            };
            let frame = packet.frame();
            let ip = &frame[ETHERNET_LEN..ETHERNET_LEN + IPV4_LEN];
            assert_eq!(checksum(&[ip]), 0, "IPv4 header checksum");
            let l4 = &frame[ETHERNET_LEN + IPV4_LEN..];
            let pseudo = [
                &ip[12..20],
                &[0, protocol],
                &(l4.len() as u16).to_be_bytes(),
            ]
            .concat();
            assert_eq!(checksum(&[&pseudo, l4]), 0, "L4 checksum");
            assert_eq!(TracePacket::parse(&frame, protocol), Some(packet));
        }
    }

    #[test]
    fn destinations_parse_with_a_default_protocol() {
        let udp: Destination = "198.19.0.10:53/udp".parse().unwrap();
        assert_eq!(
            (udp.endpoint, udp.protocol),
            (endpoint([198, 19, 0, 10], 53), proto::UDP)
        );
        let tcp: Destination = "198.19.0.10:80".parse().unwrap();
        assert_eq!(tcp.protocol, proto::TCP);
        assert!("198.19.0.10/tcp".parse::<Destination>().is_err());
        assert!("198.19.0.10:80/sctp".parse::<Destination>().is_err());
    }

    /// The record of a new flow to `frontend` (header `service`) given `(slot, backend id,
    /// backend)`.
    fn new_flow_record(
        (slot, backend_id, backend): (u16, u32, Backend),
        frontend: FrontendKey,
        service: FrontendValue,
    ) -> TraceRecord {
        TraceRecord {
            recorded: 1,
            outcome: stat::NEW_FLOW as u8,
            slot,
            backend_id,
            backend,
            frontend,
            service,
            ..TraceRecord::default()
        }
    }

    #[test]
    fn a_new_flow_report_names_every_entry_that_decided() {
        let packet = TracePacket::opening(
            proto::TCP,
            endpoint([198, 18, 1, 14], 40000),
            endpoint([198, 19, 0, 10], 80),
        );
        let record = new_flow_record(
            (2, 5, Backend::new([198, 18, 1, 12], 8080, proto::TCP)),
            FrontendKey::new([198, 19, 0, 10], 80, proto::TCP),
            FrontendValue {
                rev_nat_id: 1,
                base: 12,
                count: 3,
                flags: service_flags::CLUSTER_IP,
                ..FrontendValue::default()
            },
        );
        let output = TracePacket {
            destination: endpoint([198, 18, 1, 12], 8080),
            ..packet
        };
        let report = report(
            &packet,
            0,
            Some(output),
            &record,
            Some("default/echo:tcp-80".into()),
            None,
        );
        assert_eq!(
            (report.verdict.as_str(), report.path),
            ("accept", "new_flow")
        );
        assert_eq!(
            report.decided_by,
            [
                "SERVICES[198.19.0.10:80/tcp] = ClusterIP default/echo:tcp-80, rev_nat_id 1, \
                 3 backends at BACKEND_SLOTS[12..15]",
                "BACKEND_SLOTS[13] = backend 5, 198.18.1.12:8080 (slot 2 of 3, chosen at random)",
            ]
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["backend"]["address"], "198.18.1.12");
        assert_eq!(json["selection"]["of"], 3);
        assert_eq!(json["selection"]["index"], 13);
        assert_eq!(json["selection"]["set"], "frontend");
        assert_eq!(json["selection"]["chosen_by"], "random");
        assert_eq!(json["origin"], serde_json::Value::Null);
        assert_eq!(json["conntrack"], serde_json::Value::Null);
        assert_eq!(json["output"]["destination"]["port"], 8080);
        let text = render(&report);
        assert!(
            text.contains("rewritten   tcp 198.18.1.14:40000 → 198.18.1.12:8080"),
            "{text}"
        );
    }

    #[test]
    fn a_maglev_choice_names_the_table_and_is_not_called_random() {
        let packet = TracePacket::opening(
            proto::TCP,
            endpoint([203, 0, 113, 7], 40000),
            endpoint([198, 18, 0, 1], 30080),
        );
        let record = TraceRecord {
            maglev: 1,
            ..new_flow_record(
                (3, 7, Backend::new([198, 18, 2, 12], 8080, proto::TCP)),
                FrontendKey::new([198, 18, 0, 1], 30080, proto::TCP),
                FrontendValue {
                    rev_nat_id: 2,
                    base: 20,
                    count: 4,
                    flags: service_flags::NODE_PORT,
                    maglev: maglev::header_value(maglev::DEFAULT_TABLE_SIZE).unwrap(),
                    ..FrontendValue::default()
                },
            )
        };
        let report = report(&packet, 0, Some(packet), &record, None, None);
        assert_eq!(
            report.decided_by[1],
            "BACKEND_SLOTS[22] = backend 7, 198.18.2.12:8080 (slot 3 of 4, given by the \
             frontend's Maglev table of 16381 positions for the client's address, port and \
             protocol)"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["selection"]["chosen_by"], "maglev");
        assert!(!render(&report).contains("random"), "{}", render(&report));
    }

    #[test]
    fn a_passing_packet_says_what_was_missing() {
        let packet = TracePacket {
            tcp_flags: 0,
            ..TracePacket::opening(
                proto::UDP,
                endpoint([198, 18, 1, 14], 40000),
                endpoint([198, 18, 5, 5], 53),
            )
        };
        let record = TraceRecord {
            recorded: 1,
            outcome: stat::PASS as u8,
            ..TraceRecord::default()
        };
        let report = report(&packet, 0, Some(packet), &record, None, None);
        assert_eq!(report.path, "pass");
        assert!(report.frontend.is_none() && report.backend.is_none());
        assert_eq!(
            report.decided_by,
            ["no CONNTRACK entry for the tuple, no SERVICES entry for 198.18.5.5:53/udp"]
        );
    }
}
