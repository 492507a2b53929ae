//! Ethernet → IPv4 → TCP/UDP/SCTP parsing into the few fields the balancer needs; later
//! fragments and ICMP messages are told apart for their own paths.
//!
//! Headers are read in place (direct packet access), which costs a few instructions where
//! a `bpf_skb_load_bytes` call per header costs a helper call each. When the headers are
//! not all in the skb's linear part (a GRO'd packet on an external device), they are
//! pulled in first (`Context::pull`), so nothing the old helper-based reads handled is
//! lost.

use network_types::eth::EthHdr;
use proxy_common::{CtKey, FragmentKey, Tuple, icmp, proto, sctp, tcp_flags};

use crate::context::Context;

/// The IPv4 header follows an untagged Ethernet header (tc sees VLAN tags already
/// stripped into skb metadata).
pub const L3_OFFSET: usize = EthHdr::LEN;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const IPV4_MIN_LEN: usize = 20;
/// Bytes of the TCP header the path reads: up to and including its flags.
const TCP_READ_LEN: usize = 14;
/// The UDP header.
const UDP_READ_LEN: usize = 8;
/// The most the headers can span: Ethernet, IPv4 with 40 bytes of options, TCP flags.
const MAX_HEADERS_LEN: u32 = (L3_OFFSET + 60 + TCP_READ_LEN) as u32;
/// IPv4 "don't fragment" and "more fragments" flags and fragment offset, in bytes 6 and 7
/// of the header.
const IP_DONT_FRAGMENT: u8 = 0x40;
const IP_MORE_FRAGMENTS: u8 = 0x20;
const IP_FRAGMENT_OFFSET_HIGH: u8 = 0x1f;

/// An IPv4 TCP, UDP or SCTP packet's tuple and offsets. Addresses and ports are in wire byte
/// order, as in the map keys.
pub struct Packet {
    /// Offset of the TCP/UDP/SCTP header (after IPv4 options, if any).
    pub l4_offset: usize,
    pub proto: u8,
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP: the header's flag byte (`proxy_common::tcp_flags`); SCTP: its first chunk read
    /// as one (`sctp::tcp_flags_of`); UDP: 0.
    pub tcp_flags: u8,
    /// What forwarding and fragment tracking need from the IPv4 header.
    pub ip: IpFields,
}

/// IPv4 header fields beyond the addresses.
#[derive(Clone, Copy)]
pub struct IpFields {
    /// The identification, wire order (names the datagram of a fragment).
    pub id: u16,
    /// The total length, host order.
    pub total_len: u16,
    pub ttl: u8,
    /// Bits of [`ip_flags`].
    pub flags: u8,
    /// Length of the L4 header (TCP: its data offset), for the size of a GSO segment.
    pub l4_header_len: u8,
}

/// Bits of [`IpFields::flags`].
pub mod ip_flags {
    /// "Don't fragment": too big for a hop, the packet is answered with "fragmentation
    /// needed" instead.
    pub const DONT_FRAGMENT: u8 = 1 << 0;
    /// The first fragment of a datagram (offset 0, more fragments follow).
    pub const FIRST_FRAGMENT: u8 = 1 << 1;
}

/// A fragment after the first: IPv4 header only, no ports.
pub struct LaterFragment {
    /// The datagram it belongs to.
    pub datagram: FragmentKey,
    /// The IPv4 total length, host order.
    pub total_len: u16,
}

impl Packet {
    pub fn tuple(&self) -> Tuple {
        Tuple {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }

    /// The conntrack key of the packet's own tuple.
    pub fn key(&self) -> CtKey {
        CtKey::new(self.tuple(), self.proto)
    }

    /// A TCP SYN without ACK: a client opening a connection.
    pub fn opens_connection(&self) -> bool {
        self.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
    }

    /// The first fragment of a datagram: its fate is recorded for the later fragments.
    pub fn is_first_fragment(&self) -> bool {
        self.ip.flags & ip_flags::FIRST_FRAGMENT != 0
    }

    /// The datagram this packet belongs to, as its fragments name it.
    pub fn datagram(&self) -> FragmentKey {
        FragmentKey {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            id: self.ip.id,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// A packet that can be the first answer to a flow: any UDP datagram, a TCP SYN-ACK
    /// or reset (SCTP: an INIT ACK, ABORT or SHUTDOWN COMPLETE).
    pub fn may_answer(&self) -> bool {
        let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
        self.proto == proto::UDP
            || self.tcp_flags & syn_ack == syn_ack
            || self.tcp_flags & tcp_flags::RST != 0
    }
}

/// What the packet path does with a packet.
pub enum Parsed {
    /// A TCP/UDP/SCTP packet (a whole datagram, or the first fragment of one).
    Packet(Packet),
    /// A later fragment of a TCP/UDP/SCTP datagram.
    LaterFragment(LaterFragment),
    /// An ICMP message (not fragmented), its header at `l4_offset`.
    Icmp { l4_offset: usize },
    /// Not IPv4, another protocol, a fragment of one, or truncated.
    NotHandled,
}

enum Read {
    Done(Parsed),
    /// The headers reach beyond the skb's linear part.
    NotLinear,
}

/// Parses the packet; anything the balancer does not handle is [`Parsed::NotHandled`].
#[inline(always)]
pub fn packet<C: Context>(ctx: &C) -> Parsed {
    match parse(ctx) {
        Read::Done(parsed) => parsed,
        Read::NotLinear => {
            if ctx.pull(ctx.len().min(MAX_HEADERS_LEN)).is_err() {
                return Parsed::NotHandled;
            }
            match parse(ctx) {
                Read::Done(parsed) => parsed,
                Read::NotLinear => Parsed::NotHandled,
            }
        }
    }
}

/// A pointer to `len` bytes at `offset`, if they lie within the linear data.
#[inline(always)]
pub fn at<C: Context>(ctx: &C, offset: usize, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some(start + offset)
}

#[inline(always)]
fn parse<C: Context>(ctx: &C) -> Read {
    let missing = |needed: usize| {
        if (ctx.len() as usize) < needed {
            Read::Done(Parsed::NotHandled)
        } else {
            Read::NotLinear
        }
    };
    let Some(eth) = at(ctx, 0, L3_OFFSET + IPV4_MIN_LEN) else {
        return missing(L3_OFFSET + IPV4_MIN_LEN);
    };
    // SAFETY (all reads below): each lies within a range `at` checked against data_end.
    let ether_type = unsafe { *((eth + 12) as *const [u8; 2]) };
    if ether_type != ETHERTYPE_IPV4 {
        return Read::Done(Parsed::NotHandled);
    }
    let ip = eth + L3_OFFSET;
    let version_ihl = unsafe { *(ip as *const u8) };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_LEN {
        return Read::Done(Parsed::NotHandled);
    }
    let total_len = u16::from_be_bytes(unsafe { *((ip + 2) as *const [u8; 2]) });
    let id = u16::from_ne_bytes(unsafe { *((ip + 4) as *const [u8; 2]) });
    let [fragment_high, fragment_low] = unsafe { *((ip + 6) as *const [u8; 2]) };
    let [ttl, proto] = unsafe { *((ip + 8) as *const [u8; 2]) };
    let src_addr = u32::from_ne_bytes(unsafe { *((ip + 12) as *const [u8; 4]) });
    let dst_addr = u32::from_ne_bytes(unsafe { *((ip + 16) as *const [u8; 4]) });
    let l4_offset = L3_OFFSET + header_len;
    let offset_nonzero = fragment_high & IP_FRAGMENT_OFFSET_HIGH != 0 || fragment_low != 0;
    if offset_nonzero {
        // No header of its own: only balanced datagrams have first fragments on record.
        if !proto::is_balanced(proto) {
            return Read::Done(Parsed::NotHandled);
        }
        return Read::Done(Parsed::LaterFragment(LaterFragment {
            datagram: FragmentKey {
                src_addr,
                dst_addr,
                id,
                proto,
                _pad: 0,
            },
            total_len,
        }));
    }
    let more_fragments = fragment_high & IP_MORE_FRAGMENTS != 0;
    if proto == icmp::PROTOCOL && !more_fragments {
        return Read::Done(Parsed::Icmp { l4_offset });
    }
    let mut flags = 0;
    if fragment_high & IP_DONT_FRAGMENT != 0 {
        flags |= ip_flags::DONT_FRAGMENT;
    }
    if more_fragments {
        flags |= ip_flags::FIRST_FRAGMENT;
    }
    // Constant lengths per protocol: the verifier proves accesses against a constant
    // distance from a checked pointer.
    let (ports, tcp_flags, l4_header_len) = match proto {
        proto::TCP => {
            let Some(tcp) = at(ctx, l4_offset, TCP_READ_LEN) else {
                return missing(l4_offset + TCP_READ_LEN);
            };
            let data_offset = unsafe { *((tcp + 12) as *const u8) } >> 4;
            unsafe {
                (
                    *(tcp as *const [u8; 4]),
                    *((tcp + 13) as *const u8),
                    data_offset * 4,
                )
            }
        }
        proto::UDP => {
            let Some(udp) = at(ctx, l4_offset, UDP_READ_LEN) else {
                return missing(l4_offset + UDP_READ_LEN);
            };
            unsafe { (*(udp as *const [u8; 4]), 0, UDP_READ_LEN as u8) }
        }
        proto::SCTP => {
            let Some(sctp) = at(ctx, l4_offset, sctp::READ_LEN) else {
                return missing(l4_offset + sctp::READ_LEN);
            };
            unsafe {
                (
                    *(sctp as *const [u8; 4]),
                    sctp::TCP_FLAGS_OF_CHUNK
                        [usize::from(*((sctp + sctp::COMMON_HEADER_LEN) as *const u8))],
                    sctp::COMMON_HEADER_LEN as u8,
                )
            }
        }
        _ => return Read::Done(Parsed::NotHandled),
    };
    // The protocol read again from the packet: after the match the verifier would know it
    // as a constant per arm and walk the rest of the path once per protocol.
    // SAFETY: within the IPv4 header checked above.
    let proto = unsafe { core::ptr::read_volatile((ip + 9) as *const u8) };
    Read::Done(Parsed::Packet(Packet {
        l4_offset,
        proto,
        src_addr,
        dst_addr,
        src_port: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        tcp_flags,
        ip: IpFields {
            id,
            total_len,
            ttl,
            flags,
            l4_header_len,
        },
    }))
}
