//! What `trace` reports: the JSON schema of [`TraceReport`] and its parts, and the names
//! and words it gives the program's verdicts, paths, flags and ICMP errors.

use std::net::IpAddr;

use proxy_common::{proto, stat, tcp_flags};
use serde::Serialize;

use super::{Fragment, IcmpKind, TracePacket};
use crate::inspect::trace_hooks::{Arrival, XdpView};
use crate::inspect::{Endpoint, family_name, protocol_name};

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
    pub(super) fn on(mut self, arrival: Option<&Arrival>) -> Self {
        self.device = arrival.map(|arrival| arrival.name.clone());
        self
    }

    /// The report of a packet that went through XDP (`view`) on `arrival`: XDP's run if it
    /// decided, else tc's after it.
    pub(super) fn via_xdp(mut self, view: XdpView, arrival: Option<&Arrival>) -> Self {
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
    pub ip_id: u32,
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
            sctp_chunk: (packet.protocol == proto::SCTP).then(|| {
                super::packet::sctp_chunk_name(super::packet::sctp_chunk(packet.tcp_flags))
            }),
            length: packet.total_len(),
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
pub(super) fn icmp_kind_name(kind: IcmpKind) -> (&'static str, Option<u16>) {
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
    pub(super) fn parse(frame: &[u8]) -> Option<Self> {
        let ip = frame.get(14..)?;
        let header = super::packet::IpHeader::parse(ip)?;
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
    /// The FRAGMENTS (IPv6: FRAGMENTS6) key: source and destination address, protocol,
    /// identification.
    pub source: IpAddr,
    pub destination: IpAddr,
    pub ip_id: u32,
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
pub(super) fn flag_names(flags: u8) -> String {
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

pub(super) fn explanation(path: u32) -> &'static str {
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

pub(super) fn verdict(return_code: u32) -> String {
    match return_code {
        0 => "accept".into(),
        2 => "drop".into(),
        7 => "redirect".into(),
        other => format!("tc-action-{other}"),
    }
}
