//! Ethernet → IPv4 → TCP/UDP parsing into the few fields the balancer needs.
//!
//! Headers are copied out with `bpf_skb_load_bytes` (`TcContext::load`) rather than read
//! through direct packet pointers: the helper bounds-checks every read against the skb,
//! also reaches headers outside the linear area (GRO'd packets on external devices)
//! without a `bpf_skb_pull_data`, and the copies stay valid after the NAT helpers
//! invalidate packet pointers.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::proto;

/// The IPv4 header follows an untagged Ethernet header (tc sees VLAN tags already
/// stripped into skb metadata).
pub const L3_OFFSET: usize = EthHdr::LEN;

/// IPv4 "more fragments" flag within the 3-bit flags field.
const IP_MORE_FRAGMENTS: u8 = 0b001;

/// An IPv4 TCP or UDP packet's tuple and offsets. Addresses and ports are in wire byte
/// order, as in the map keys.
pub struct Packet {
    /// Offset of the TCP/UDP header (after IPv4 options, if any).
    pub l4_offset: usize,
    pub proto: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP SYN without ACK: a client opening a connection.
    pub opens_connection: bool,
    /// TCP FIN or RST: the connection is ending.
    pub closes_connection: bool,
}

/// Parses the packet, or returns `None` for anything the balancer does not translate:
/// non-IPv4, protocols other than TCP/UDP, IP fragments (only the first one carries
/// ports) and truncated headers.
#[inline(always)]
pub fn packet(ctx: &TcContext) -> Option<Packet> {
    let eth: EthHdr = ctx.load(0).ok()?;
    if eth.ether_type != EtherType::Ipv4 as u16 {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(L3_OFFSET).ok()?;
    let header_len = usize::from(ip.ihl());
    if ip.version() != 4 || header_len < Ipv4Hdr::LEN {
        return None;
    }
    if ip.frag_flags() & IP_MORE_FRAGMENTS != 0 || ip.frag_offset() != 0 {
        return None;
    }
    let l4_offset = L3_OFFSET + header_len;
    let (src_port, dst_port, opens_connection, closes_connection) = match ip.proto {
        proto::TCP => {
            let tcp: TcpHdr = ctx.load(l4_offset).ok()?;
            (
                tcp.source,
                tcp.dest,
                tcp.syn() != 0 && tcp.ack() == 0,
                tcp.fin() != 0 || tcp.rst() != 0,
            )
        }
        proto::UDP => {
            let udp: UdpHdr = ctx.load(l4_offset).ok()?;
            (udp.src, udp.dst, false, false)
        }
        _ => return None,
    };
    Some(Packet {
        l4_offset,
        proto: ip.proto,
        src_addr: u32::from_ne_bytes(ip.src_addr),
        dst_addr: u32::from_ne_bytes(ip.dst_addr),
        src_port: u16::from_ne_bytes(src_port),
        dst_port: u16::from_ne_bytes(dst_port),
        opens_connection,
        closes_connection,
    })
}
