//! Ethernet → IPv4 or IPv6 → TCP/UDP/SCTP parsing into the few fields the balancer needs;
//! later IPv4 fragments and ICMP messages are told apart for their own paths.
//!
//! IPv6: the common extension headers — hop-by-hop options, routing (with no segments
//! left), destination options, fragment — are skipped, up to [`MAX_EXTENSION_HEADERS`] of
//! them. A fragment header names the datagram (its 32-bit identification): at offset 0
//! with more fragments to come, the packet is a first fragment, whose L4 header follows;
//! at any other offset, a later fragment (no ports), as IPv4's. An ICMPv6 message (not
//! fragmented) is told apart (for `icmp_error`); a routing header with segments left, any
//! other extension header and anything past that depth are not parsed: the packet passes
//! untouched.
//!
//! Headers are read in place (direct packet access), which costs a few instructions where
//! a `bpf_skb_load_bytes` call per header costs a helper call each. When the headers are
//! not all in the skb's linear part (a GRO'd packet on an external device), they are
//! pulled in first (`Context::pull`), so nothing the old helper-based reads handled is
//! lost.

use network_types::eth::EthHdr;
use proxy_common::{CtKey, FragmentKey, Ipv6, Tuple, icmp, icmp6, proto, sctp, tcp_flags};

use crate::{context::Context, family::Family};

/// The IP header follows an untagged Ethernet header (tc sees VLAN tags already
/// stripped into skb metadata).
pub const L3_OFFSET: usize = EthHdr::LEN;

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// Bytes of the TCP header the path reads: up to and including its flags.
const TCP_READ_LEN: usize = 14;
/// The UDP header.
const UDP_READ_LEN: usize = 8;
/// IPv6 extension headers skipped before the packet is left alone.
pub const MAX_EXTENSION_HEADERS: usize = 4;
/// IPv6 extension headers' bytes made linear for a packet whose headers are not (an
/// extension chain longer than this, in such a packet, is not parsed).
const MAX_EXTENSIONS_LEN: usize = 128;
/// The most the headers can span: Ethernet, IPv6 with [`MAX_EXTENSIONS_LEN`] of extension
/// headers (IPv4 with its at most 40 bytes of options is shorter), TCP flags.
const MAX_HEADERS_LEN: u32 = (L3_OFFSET + IPV6_LEN + MAX_EXTENSIONS_LEN + TCP_READ_LEN) as u32;
/// IPv6 next-header values of the extension headers that are skipped.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DEST_OPTIONS: u8 = 60;
const IPV6_FRAGMENT: u8 = 44;
/// The fragment header's length, and the "more fragments" bit of its offset's low byte
/// (the offset is the 13 bits above the three low ones).
const IPV6_FRAGMENT_LEN: usize = 8;
const IPV6_MORE_FRAGMENTS: u8 = 0x01;
const IPV6_FRAGMENT_OFFSET_LOW: u8 = 0xf8;
/// IPv4 "don't fragment" and "more fragments" flags and fragment offset, in bytes 6 and 7
/// of the header.
const IP_DONT_FRAGMENT: u8 = 0x40;
const IP_MORE_FRAGMENTS: u8 = 0x20;
const IP_FRAGMENT_OFFSET_HIGH: u8 = 0x1f;

/// A TCP, UDP or SCTP packet's tuple and offsets, of either family (`A`). Addresses and
/// ports are in wire byte order, as in the map keys.
pub struct Packet<A = u32> {
    /// Offset of the TCP/UDP/SCTP header (after IPv4 options or IPv6 extension headers).
    pub l4_offset: usize,
    pub proto: u8,
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP: the header's flag byte (`proxy_common::tcp_flags`); SCTP: its first chunk read
    /// as one (`sctp::tcp_flags_of`); UDP: 0.
    pub tcp_flags: u8,
    /// What forwarding and fragment tracking need from the IP header.
    pub ip: IpFields,
}

/// IP header fields beyond the addresses.
#[derive(Clone, Copy)]
pub struct IpFields {
    /// The identification, wire order (names the datagram of a fragment): IPv4's 16 bits,
    /// read in native order; IPv6's 32 of its fragment header (0 when it has none).
    pub id: u32,
    /// The length of the packet from its IP header on, host order (IPv6: the payload
    /// length plus the fixed header).
    pub total_len: u16,
    /// The TTL, or IPv6's hop limit.
    pub ttl: u8,
    /// Bits of [`ip_flags`].
    pub flags: u8,
    /// Length of the L4 header (TCP: its data offset), for the size of a GSO segment.
    pub l4_header_len: u8,
}

/// Bits of [`IpFields::flags`].
pub mod ip_flags {
    /// "Don't fragment": too big for a hop, the packet is answered with "fragmentation
    /// needed" instead. Every IPv6 packet has it (routers never fragment IPv6; they answer
    /// "packet too big").
    pub const DONT_FRAGMENT: u8 = 1 << 0;
    /// The first fragment of a datagram (offset 0, more fragments follow).
    pub const FIRST_FRAGMENT: u8 = 1 << 1;
}

/// An IPv4 fragment after the first: IPv4 header only, no ports. (An IPv6 one is left in
/// the IPv6 path's `Packet`: [`Parsed6::LaterFragment`].)
pub struct LaterFragment {
    /// The datagram it belongs to.
    pub datagram: FragmentKey,
    /// The IPv4 total length, host order.
    pub total_len: u16,
}

impl<A: Family> Packet<A> {
    pub fn tuple(&self) -> Tuple<A> {
        Tuple {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }

    /// Whether the packet's own tuple is `tuple` (field by field: no copy of an IPv6
    /// tuple on the stack).
    pub fn has_tuple(&self, tuple: &Tuple<A>) -> bool {
        self.src_addr == tuple.src_addr
            && self.dst_addr == tuple.dst_addr
            && self.src_port == tuple.src_port
            && self.dst_port == tuple.dst_port
    }

    /// The conntrack key of the packet's own tuple.
    pub fn key(&self) -> CtKey<A> {
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

    /// A packet that can be the first answer to a flow: any UDP datagram, a TCP SYN-ACK
    /// or reset (SCTP: an INIT ACK, ABORT or SHUTDOWN COMPLETE).
    pub fn may_answer(&self) -> bool {
        let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
        self.proto == proto::UDP
            || self.tcp_flags & syn_ack == syn_ack
            || self.tcp_flags & tcp_flags::RST != 0
    }
}

impl<A: Family> Packet<A> {
    /// The datagram this packet belongs to, as its fragments name it.
    #[inline(always)]
    pub fn datagram(&self) -> FragmentKey<A> {
        FragmentKey {
            src_addr: self.src_addr,
            dst_addr: self.dst_addr,
            id: A::fragment_id(self.ip.id),
            proto: self.proto,
            _pad: Default::default(),
        }
    }
}

/// What the packet path does with a packet.
pub enum Parsed {
    /// An IPv4 TCP/UDP/SCTP packet (a whole datagram, or the first fragment of one).
    Packet(Packet),
    /// An IPv6 packet: [`packet6`] parses it.
    Ipv6,
    /// A later fragment of a TCP/UDP/SCTP datagram.
    LaterFragment(LaterFragment),
    /// An ICMP message (not fragmented), its header at `l4_offset`.
    Icmp { l4_offset: usize },
    /// Neither IPv4 nor IPv6, another protocol, a fragment of one (IPv6: any fragment),
    /// or truncated.
    NotHandled,
}

enum Read {
    Done(Parsed),
    /// The headers reach beyond the skb's linear part.
    NotLinear,
}

/// What [`packet6`] found. No data of its own (its offsets are in the `Packet` it
/// wrote): [`parse6`], a subprogram, returns it in one register.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed6 {
    /// A TCP/UDP/SCTP packet (never a fragment), all of its `Packet` written.
    Packet,
    /// An ICMPv6 message, its header at the `Packet`'s `l4_offset` (its only field
    /// written).
    Icmp,
    /// A later fragment of a TCP/UDP/SCTP datagram: the `Packet`'s addresses, `proto`
    /// and `ip` written (its identification and length), no ports.
    LaterFragment,
    /// Another protocol, a fragment of one, a routing header with segments left, too many
    /// extension headers, or truncated.
    NotHandled,
}

/// Parses an IPv6 packet into `packet` (see [`Parsed6`]). Apart from [`packet`], into
/// memory the caller provides (a per-CPU entry: the IPv6 path's frames have no room for
/// it).
#[inline(always)]
pub fn packet6<C: Context>(ctx: &C, packet: &mut Packet<Ipv6>) -> Parsed6 {
    match parse6(ctx, packet) {
        Read6::Done(parsed) => parsed,
        Read6::NotLinear => {
            if ctx.pull(ctx.len().min(MAX_HEADERS_LEN)).is_err() {
                return Parsed6::NotHandled;
            }
            match parse6(ctx, packet) {
                Read6::Done(parsed) => parsed,
                Read6::NotLinear => Parsed6::NotHandled,
            }
        }
    }
}

/// [`Read`] for [`parse6`], which writes the packet it parses into its caller's memory.
enum Read6 {
    Done(Parsed6),
    NotLinear,
}

impl From<Read> for Read6 {
    /// What [`missing`] and [`missing_l4`] found.
    fn from(read: Read) -> Self {
        match read {
            Read::Done(_) => Read6::Done(Parsed6::NotHandled),
            Read::NotLinear => Read6::NotLinear,
        }
    }
}

/// Parses the packet (again after pulling the headers into the linear data if they were
/// not); anything the balancer does not handle is [`Parsed::NotHandled`], an IPv6 packet
/// [`Parsed::Ipv6`] (see [`packet6`]).
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

/// The highest offset [`at`] reads at.
const MAX_OFFSET: usize = 0x7fff;

/// A pointer to `len` bytes at `offset`, if they lie within the linear data.
#[inline(always)]
pub fn at<C: Context>(ctx: &C, offset: usize, len: usize) -> Option<usize> {
    // Bounds the verifier knows, also for an offset read back from a map (the IPv6
    // packet's `l4_offset`), low enough that it still tracks the range checked below
    // (offset and length within the largest packet, 64 KiB). Headers lie far lower.
    if offset > MAX_OFFSET {
        return None;
    }
    let start = ctx.data();
    if start + offset + len > ctx.data_end() {
        return None;
    }
    Some(start + offset)
}

#[inline(always)]
fn parse<C: Context>(ctx: &C) -> Read {
    let Some(eth) = at(ctx, 0, L3_OFFSET + IPV4_MIN_LEN) else {
        return missing(ctx, L3_OFFSET + IPV4_MIN_LEN);
    };
    // SAFETY (all reads below): each lies within a range `at` checked against data_end.
    let ether_type = unsafe { *((eth + 12) as *const [u8; 2]) };
    if ether_type == ETHERTYPE_IPV6 {
        return Read::Done(Parsed::Ipv6);
    }
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
    let Some(l4) = l4_fields(ctx, l4_offset, proto) else {
        return missing_l4(ctx, l4_offset, proto);
    };
    // The protocol read again from the packet: after the match in `l4_fields` the verifier
    // would know it as a constant per arm and walk the rest of the path once per protocol.
    // SAFETY: within the IPv4 header checked above.
    let proto = unsafe { core::ptr::read_volatile((ip + 9) as *const u8) };
    Read::Done(Parsed::Packet(Packet {
        l4_offset,
        proto,
        src_addr,
        dst_addr,
        src_port: l4.src_port,
        dst_port: l4.dst_port,
        tcp_flags: l4.tcp_flags,
        ip: IpFields {
            id: u32::from(id),
            total_len,
            ttl,
            flags,
            l4_header_len: l4.header_len,
        },
    }))
}

/// An IPv6 packet: the fixed header, the extension headers skipped, then as for IPv4. A
/// BPF subprogram: its reads take a frame of their own.
#[inline(never)]
fn parse6<C: Context>(ctx: &C, packet: &mut Packet<Ipv6>) -> Read6 {
    let Some(ip) = at(ctx, L3_OFFSET, IPV6_LEN) else {
        return missing(ctx, L3_OFFSET + IPV6_LEN).into();
    };
    // SAFETY (all reads below): each lies within a range `at` checked against data_end.
    let version = unsafe { *(ip as *const u8) } >> 4;
    if version != 6 {
        return Read6::Done(Parsed6::NotHandled);
    }
    let payload_len = u16::from_be_bytes(unsafe { *((ip + 4) as *const [u8; 2]) });
    let [mut next, hop_limit] = unsafe { *((ip + 6) as *const [u8; 2]) };
    // Written at once: held across the extension headers, the addresses would take much of
    // the frame.
    unsafe {
        packet.src_addr = read_ipv6(ip + 8);
        packet.dst_addr = read_ipv6(ip + 24);
    }
    packet.ip = IpFields {
        id: 0,
        total_len: payload_len.saturating_add(IPV6_LEN as u16),
        ttl: hop_limit,
        flags: ip_flags::DONT_FRAGMENT,
        l4_header_len: 0,
    };
    // Where the current next-header byte sits, read again below (see `parse`).
    let mut next_at = L3_OFFSET + 6;
    let mut l4_offset = L3_OFFSET + IPV6_LEN;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next == IPV6_FRAGMENT {
            // Next header, reserved, offset and flags, identification.
            let Some(fragment) = at(ctx, l4_offset, IPV6_FRAGMENT_LEN) else {
                return missing(ctx, l4_offset + IPV6_FRAGMENT_LEN).into();
            };
            let [following, _, offset_high, offset_low] = unsafe { *(fragment as *const [u8; 4]) };
            packet.ip.id = u32::from_ne_bytes(unsafe { *((fragment + 4) as *const [u8; 4]) });
            if offset_high != 0 || offset_low & IPV6_FRAGMENT_OFFSET_LOW != 0 {
                // No header of its own: only balanced datagrams have first fragments on
                // record.
                if !proto::is_balanced(following) {
                    return Read6::Done(Parsed6::NotHandled);
                }
                packet.proto = following;
                return Read6::Done(Parsed6::LaterFragment);
            }
            if offset_low & IPV6_MORE_FRAGMENTS != 0 {
                packet.ip.flags |= ip_flags::FIRST_FRAGMENT;
            }
            next_at = l4_offset;
            next = following;
            l4_offset += IPV6_FRAGMENT_LEN;
            continue;
        }
        if next != IPV6_HOP_BY_HOP && next != IPV6_ROUTING && next != IPV6_DEST_OPTIONS {
            break;
        }
        // Next header, length in 8-byte units past the first 8; routing: type, segments
        // left.
        let Some(extension) = at(ctx, l4_offset, 4) else {
            return missing(ctx, l4_offset + 4).into();
        };
        let [following, units, _, segments_left] = unsafe { *(extension as *const [u8; 4]) };
        if next == IPV6_ROUTING && segments_left != 0 {
            // Addressed onward through the route: not a packet for a frontend here.
            return Read6::Done(Parsed6::NotHandled);
        }
        next_at = l4_offset;
        next = following;
        l4_offset += (usize::from(units) + 1) * 8;
    }
    if next == icmp6::PROTOCOL && packet.ip.flags & ip_flags::FIRST_FRAGMENT == 0 {
        packet.l4_offset = l4_offset;
        return Read6::Done(Parsed6::Icmp);
    }
    if !proto::is_balanced(next) {
        // Another extension header, more extension headers than are skipped, or a
        // fragment of an ICMPv6 message.
        return Read6::Done(Parsed6::NotHandled);
    }
    let Some(l4) = l4_fields(ctx, l4_offset, next) else {
        return missing_l4(ctx, l4_offset, next).into();
    };
    // As in `parse`, from the byte that named it (checked with the byte after it, always
    // there: the verifier learns no range from a one-byte check).
    let Some(next) = at(ctx, next_at, 2) else {
        return Read6::Done(Parsed6::NotHandled);
    };
    // SAFETY: checked against data_end just above.
    packet.proto = unsafe { core::ptr::read_volatile(next as *const u8) };
    packet.l4_offset = l4_offset;
    packet.src_port = l4.src_port;
    packet.dst_port = l4.dst_port;
    packet.tcp_flags = l4.tcp_flags;
    packet.ip.l4_header_len = l4.header_len;
    Read6::Done(Parsed6::Packet)
}

/// The IPv6 address at `at`, a word at a time.
///
/// # Safety
/// `at` points to 16 bytes of packet data checked against data_end.
#[inline(always)]
pub unsafe fn read_ipv6(at: usize) -> Ipv6 {
    let word = |index: usize| {
        // SAFETY: within the 16 bytes the caller vouches for.
        u32::from_ne_bytes(unsafe { *((at + index * 4) as *const [u8; 4]) })
    };
    Ipv6([word(0), word(1), word(2), word(3)])
}

/// What the packet path reads of a TCP, UDP or SCTP header.
struct L4Fields {
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    header_len: u8,
}

/// The L4 fields of a `proto` header at `l4_offset`; `None` when they are not within the
/// linear data (or `proto` is none of the three).
#[inline(always)]
fn l4_fields<C: Context>(ctx: &C, l4_offset: usize, proto: u8) -> Option<L4Fields> {
    // Constant lengths per protocol: the verifier proves accesses against a constant
    // distance from a checked pointer.
    // SAFETY (all reads): within the ranges `at` checked against data_end.
    let (ports, tcp_flags, header_len) = match proto {
        proto::TCP => {
            let tcp = at(ctx, l4_offset, TCP_READ_LEN)?;
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
            let udp = at(ctx, l4_offset, UDP_READ_LEN)?;
            unsafe { (*(udp as *const [u8; 4]), 0, UDP_READ_LEN as u8) }
        }
        proto::SCTP => {
            let sctp = at(ctx, l4_offset, sctp::READ_LEN)?;
            unsafe {
                (
                    *(sctp as *const [u8; 4]),
                    sctp::TCP_FLAGS_OF_CHUNK
                        [usize::from(*((sctp + sctp::COMMON_HEADER_LEN) as *const u8))],
                    sctp::COMMON_HEADER_LEN as u8,
                )
            }
        }
        _ => return None,
    };
    Some(L4Fields {
        src_port: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        tcp_flags,
        header_len,
    })
}

/// Why [`l4_fields`] found nothing: a protocol not balanced, or a header not (all) in the
/// linear data.
#[inline(always)]
fn missing_l4<C: Context>(ctx: &C, l4_offset: usize, proto: u8) -> Read {
    let needed = match proto {
        proto::TCP => TCP_READ_LEN,
        proto::UDP => UDP_READ_LEN,
        proto::SCTP => sctp::READ_LEN,
        _ => return Read::Done(Parsed::NotHandled),
    };
    missing(ctx, l4_offset + needed)
}

/// Headers that end at `needed`, beyond the linear data: a truncated packet is not
/// handled; else they are to be pulled in.
#[inline(always)]
fn missing<C: Context>(ctx: &C, needed: usize) -> Read {
    if (ctx.len() as usize) < needed {
        Read::Done(Parsed::NotHandled)
    } else {
        Read::NotLinear
    }
}
