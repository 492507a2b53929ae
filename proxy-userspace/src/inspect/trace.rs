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
//!
//! Here: the command's arguments. Building the packet: `packet`; running the dry runs and
//! reading their record: `tracer`; the lookups that decided, read from the record:
//! `lookups`; the report's schema: `report`; its table: `render`.

use std::net::IpAddr;
use std::str::FromStr;

use anyhow::{Result, bail};
use clap::Args;
use proxy_common::{proto, tcp_flags};

mod lookups;
mod packet;
mod render;
mod report;
mod tracer;

pub(super) use lookups::{Decision, decision};
pub use packet::{Fragment, IcmpError, IcmpKind, TracePacket};
pub use render::render;
pub(super) use render::write_decision;
pub use report::{
    AnswerView, BackendMatch, FlowMatch, FragmentMatch, FragmentRecord, FrontendMatch,
    IcmpErrorView, PacketView, Selection, TraceReport, TupleView,
};
pub use tracer::Tracer;
pub(super) use tracer::{clear_record, record, service_name};

use super::conntrack::EndpointPattern;
use super::trace_hooks::{self, Hook};
use super::{Endpoint, Output, PinArgs, print};

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
    /// `address:port[/tcp|/udp]` (`[address]:port/…` for IPv6, IPv4-mapped too): what the
    /// socket programs (--socket-lb) decide for it. Runs `connect4`'s (`connect6`'s) dry run
    /// from a cgroup made for the trace; the traced connect() itself is refused, nothing is
    /// sent.
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
    /// fragment", as Linux sends TCP. IPv6: behind a fragment header (the later one at
    /// offset 1448, where the second fragment over a 1500-byte MTU starts).
    #[arg(long, value_enum, default_value_t = Fragment::Whole)]
    fragment: Fragment,
    /// The identification, which with the addresses and protocol names a fragment's
    /// datagram: IPv4's 16 bits, or the 32 of IPv6's fragment header.
    #[arg(long, default_value_t = 1)]
    ip_id: u32,
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

#[cfg(test)]
pub(super) mod tests;
