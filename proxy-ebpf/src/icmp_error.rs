//! ICMP and ICMPv6 errors about a tracked flow's packets, translated as the flow is
//! (netfilter's `nf_nat_icmp_reply_translation`, and `nf_nat_icmpv6_reply_translation`).
//!
//! An error (destination unreachable — "port unreachable", "fragmentation needed", … —,
//! time exceeded, parameter problem; ICMPv6 also "packet too big") quotes the IP header
//! and at least the first 8 bytes of the packet it is about, as that packet was when the
//! error's sender saw it: after translation. Its recipient, whose socket is connected to the untranslated addresses,
//! ignores it unless it is translated back. So:
//!
//! - the quoted packet `Q` is one of the flow's packets; its reverse is the key of the
//!   flow's entry for the error's direction (an error about the client's packets travels
//!   with the backend's answers, and the reverse). That entry rewrites to `T`, and the
//!   quote becomes the reverse of `T`: the packet as its sender sent it;
//! - the outer addresses are translated as the flow's packets in that direction are: the
//!   source where the flow's translation changes it, the destination likewise (a backend's
//!   "port unreachable" comes from the Service address; a router's error about a reply
//!   reaches the backend);
//! - the checksums: the outer IPv4 header's, the quoted IPv4 header's (IPv6 headers have
//!   none), the quoted TCP/UDP checksum (kept incrementally as netfilter does: when it
//!   lies within the quote, and a UDP checksum of zero stays zero) and the ICMP checksum
//!   over all of it (ICMPv6's also over the outer addresses, its pseudo-header). Each is an
//!   incremental update, so a CHECKSUM_COMPLETE skb's sum stays right.
//!
//! Written once over the family ([`Quoting`]); what differs is how the outer and the
//! quoted IP headers are read. An ICMPv6 error whose quoted packet has extension headers
//! before its TCP/UDP/SCTP header is not followed (passed untouched): the common extension
//! headers are not what a TCP or UDP socket of a pod sends; a fragment header is (a
//! fragmented datagram's first fragment): an error about one passes untranslated.
//!
//! As netfilter checks, an error is only taken as related when its outer destination is the
//! quoted packet's source. It refreshes no conntrack entry. Where the flow's packets in
//! that direction are routed by the program (their source became a node address), so is
//! the error.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use proxy_common::{CtKey, Ipv6, Tuple, ct_flags, icmp, icmp6, proto, sctp, stat, trace_ct};

use crate::{
    conntrack::{self, now_ns},
    context::Context,
    csum,
    family::Family,
    mode::Mode,
    nat::{TCP_CSUM_OFFSET, UDP_CSUM_OFFSET, port_bytes},
    parse::{self, L3_OFFSET},
    route::{self, Hop, Route},
    verdict::Verdict,
};

const ICMP_HEADER_LEN: usize = 8;
const IPV4_MIN_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// What an error quotes of the packet's TCP/UDP header (RFC 792): its first 8 bytes.
const QUOTED_L4_LEN: usize = 8;
/// The most an error's headers span: Ethernet, IPv6 with 128 bytes of extension headers
/// (IPv4 with options is shorter: 60), the ICMP header, the quoted IPv6 header (IPv4 with
/// options: 60), and the quoted TCP header up to its checksum.
const MAX_ERROR_HEADERS: u32 = (L3_OFFSET + IPV6_LEN + 128 + ICMP_HEADER_LEN + 60 + 18) as u32;
/// The quoted IPv4 header's fragment offset field (bytes 6 and 7), without the flags.
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Its "more fragments" flag.
const QUOTED_MORE_FRAGMENTS: u16 = 0x2000;
/// Offset of the checksum within the ICMP (ICMPv6) header.
const ICMP_CSUM_OFFSET: usize = 2;

/// An ICMP error quoting a TCP, UDP or SCTP packet.
#[derive(Clone, Copy)]
pub struct IcmpError<A> {
    icmp_type: u8,
    code: u8,
    outer_src: A,
    outer_dst: A,
    /// End of the outer IP datagram (trailing Ethernet padding excluded).
    end: usize,
    /// Offsets of the quoted IP header and of its TCP/UDP header.
    quote_ip: usize,
    quote_l4: usize,
    /// The quoted packet's addresses and ports.
    quote: Tuple<A>,
    quote_proto: u8,
    /// Whether the error quotes all of its packet (which is no fragment).
    quote_whole: bool,
    /// SCTP: the quoted packet's length when the error quotes all of it (its CRC32c can
    /// then be kept valid), else 0.
    whole_sctp_len: u16,
}

/// What [`read`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// An error about a packet with ports, read into the [`Scratch`].
    Error,
    /// Not an error, or about a packet this program does not translate.
    Other,
    /// The headers reach beyond the skb's linear part.
    NotLinear,
}

/// What [`translate`] works on: the error, the conntrack key of its flow, and the outer
/// and quoted tuples it is rewritten to. In a per-CPU entry ([`SCRATCH`], [`SCRATCH6`]):
/// IPv6's would not fit the stack beside the IPv6 path's frames.
#[derive(Clone, Copy)]
pub struct Scratch<A> {
    error: IcmpError<A>,
    key: CtKey<A>,
    outer: Tuple<A>,
    quote: Tuple<A>,
}

/// This CPU's [`Scratch`] of an ICMP error; not pinned.
#[map]
static SCRATCH: PerCpuArray<Scratch<u32>> = PerCpuArray::with_max_entries(1, 0);

/// [`SCRATCH`] of an ICMPv6 error.
#[map]
static SCRATCH6: PerCpuArray<Scratch<Ipv6>> = PerCpuArray::with_max_entries(1, 0);

/// What ICMP errors differ in per address family.
pub trait Quoting: Family {
    /// ICMP's protocol number (ICMPv6's next-header value): the FIB lookup of an error
    /// the program routes.
    const ICMP_PROTOCOL: u8;
    /// Offset of the IP header's checksum; `None`: IPv6's header has none.
    const HEADER_CSUM_OFFSET: Option<usize>;
    /// Whether the ICMP checksum covers the outer addresses (ICMPv6's pseudo-header).
    const ICMP_PSEUDO_HEADER: bool;

    /// This CPU's [`Scratch`] for the family.
    fn scratch() -> &'static PerCpuArray<Scratch<Self>>;

    /// Reads the outer IP header, the type and code of the ICMP message at `l4_offset`
    /// and the IP header it quotes into `error`: all of it but its ports and
    /// `whole_sctp_len`, which [`read`] completes.
    fn read_headers<C: Context>(ctx: &C, l4_offset: usize, error: &mut IcmpError<Self>) -> Read;
}

impl Quoting for u32 {
    const ICMP_PROTOCOL: u8 = icmp::PROTOCOL;
    const HEADER_CSUM_OFFSET: Option<usize> = Some(10);
    const ICMP_PSEUDO_HEADER: bool = false;

    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<Scratch<Self>> {
        &SCRATCH
    }

    #[inline(always)]
    fn read_headers<C: Context>(ctx: &C, l4_offset: usize, error: &mut IcmpError<Self>) -> Read {
        let Some(outer_ip) = parse::at(ctx, L3_OFFSET, IPV4_MIN_LEN) else {
            return Read::NotLinear;
        };
        let Some(header) = parse::at(ctx, l4_offset, ICMP_HEADER_LEN + IPV4_MIN_LEN) else {
            return Read::NotLinear;
        };
        // SAFETY (all reads below): each lies within a range `at` checked against data_end.
        let (total_len, outer_src, outer_dst) = unsafe {
            (
                u16::from_be_bytes(*((outer_ip + 2) as *const [u8; 2])),
                u32::from_ne_bytes(*((outer_ip + 12) as *const [u8; 4])),
                u32::from_ne_bytes(*((outer_ip + 16) as *const [u8; 4])),
            )
        };
        let [icmp_type, code] = unsafe { *(header as *const [u8; 2]) };
        if !icmp::is_error(icmp_type) {
            return Read::Other;
        }
        let quote_ip = l4_offset + ICMP_HEADER_LEN;
        let quoted = header + ICMP_HEADER_LEN;
        let version_ihl = unsafe { *(quoted as *const u8) };
        let quote_total_len = u16::from_be_bytes(unsafe { *((quoted + 2) as *const [u8; 2]) });
        let fragment = u16::from_be_bytes(unsafe { *((quoted + 6) as *const [u8; 2]) });
        let quote_proto = unsafe { *((quoted + 9) as *const u8) };
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        // Only a packet with ports can be matched to a flow: not a later fragment.
        if version_ihl >> 4 != 4
            || header_len < IPV4_MIN_LEN
            || fragment & FRAGMENT_OFFSET_MASK != 0
            || !proto::is_balanced(quote_proto)
        {
            return Read::Other;
        }
        let (quote_src, quote_dst) = unsafe {
            (
                u32::from_ne_bytes(*((quoted + 12) as *const [u8; 4])),
                u32::from_ne_bytes(*((quoted + 16) as *const [u8; 4])),
            )
        };
        let end = L3_OFFSET + usize::from(total_len);
        *error = IcmpError {
            icmp_type,
            code,
            outer_src,
            outer_dst,
            end,
            quote_ip,
            quote_l4: quote_ip + header_len,
            quote: Tuple {
                src_addr: quote_src,
                dst_addr: quote_dst,
                src_port: 0,
                dst_port: 0,
            },
            quote_proto,
            quote_whole: fragment & QUOTED_MORE_FRAGMENTS == 0
                && quote_ip + usize::from(quote_total_len) == end,
            whole_sctp_len: 0,
        };
        Read::Error
    }
}

impl Quoting for Ipv6 {
    const ICMP_PROTOCOL: u8 = icmp6::PROTOCOL;
    const HEADER_CSUM_OFFSET: Option<usize> = None;
    const ICMP_PSEUDO_HEADER: bool = true;

    #[inline(always)]
    fn scratch() -> &'static PerCpuArray<Scratch<Self>> {
        &SCRATCH6
    }

    /// The outer header's extension headers were skipped by the parser (`l4_offset`);
    /// the quoted packet's TCP/UDP/SCTP header must follow its fixed header directly.
    /// Fields are written one by one: a whole IPv6 error built on the stack would not fit.
    #[inline(always)]
    fn read_headers<C: Context>(ctx: &C, l4_offset: usize, error: &mut IcmpError<Self>) -> Read {
        let Some(outer_ip) = parse::at(ctx, L3_OFFSET, IPV6_LEN) else {
            return Read::NotLinear;
        };
        // SAFETY (all reads below): each lies within a range `at` checked against data_end.
        let payload_len = u16::from_be_bytes(unsafe { *((outer_ip + 4) as *const [u8; 2]) });
        let Some(header) = parse::at(ctx, l4_offset, ICMP_HEADER_LEN + IPV6_LEN) else {
            return Read::NotLinear;
        };
        let [icmp_type, code] = unsafe { *(header as *const [u8; 2]) };
        if !icmp6::is_error(icmp_type) {
            return Read::Other;
        }
        let quoted = header + ICMP_HEADER_LEN;
        let version = unsafe { *(quoted as *const u8) } >> 4;
        let quote_payload_len = u16::from_be_bytes(unsafe { *((quoted + 4) as *const [u8; 2]) });
        let quote_proto = unsafe { *((quoted + 6) as *const u8) };
        if version != 6 || !proto::is_balanced(quote_proto) {
            return Read::Other;
        }
        let quote_ip = l4_offset + ICMP_HEADER_LEN;
        let end = L3_OFFSET + IPV6_LEN + usize::from(payload_len);
        error.icmp_type = icmp_type;
        error.code = code;
        // SAFETY: within the ranges checked above.
        unsafe {
            error.outer_src = parse::read_ipv6(outer_ip + 8);
            error.outer_dst = parse::read_ipv6(outer_ip + 24);
            error.quote.src_addr = parse::read_ipv6(quoted + 8);
            error.quote.dst_addr = parse::read_ipv6(quoted + 24);
        }
        error.quote.src_port = 0;
        error.quote.dst_port = 0;
        error.end = end;
        error.quote_ip = quote_ip;
        error.quote_l4 = quote_ip + IPV6_LEN;
        error.quote_proto = quote_proto;
        error.quote_whole = quote_ip + IPV6_LEN + usize::from(quote_payload_len) == end;
        error.whole_sctp_len = 0;
        Read::Error
    }
}

/// An ICMP (ICMPv6) message whose header is at `l4_offset`: translated if it is an error
/// about a tracked flow, else passed untouched. A BPF subprogram (a stack frame of its
/// own).
#[inline(never)]
pub fn translate<C: Context, M: Mode, A: Quoting>(ctx: &C, mode: &M, l4_offset: usize) -> Verdict {
    let Some(scratch) = A::scratch().get_ptr_mut(0) else {
        // Never: the array has its one entry.
        return Verdict::Accept;
    };
    // SAFETY: this CPU's entry, used only within this run (no preemption while the program
    // runs); `read` writes the error before anything reads it, the rest is written below
    // before it is read.
    let scratch = unsafe { &mut *scratch };
    let mut found = read::<C, A>(ctx, l4_offset, &mut scratch.error);
    if found == Read::NotLinear {
        found = if ctx.pull(ctx.len().min(MAX_ERROR_HEADERS)).is_ok() {
            read::<C, A>(ctx, l4_offset, &mut scratch.error)
        } else {
            Read::Other
        };
    }
    if found != Read::Error {
        mode.count(stat::NOT_HANDLED);
        return Verdict::Accept;
    }
    let error = &scratch.error;
    mode.icmp_error(error.icmp_type, error.code);
    // The entry for the error's direction is keyed by the reverse of the quoted packet.
    scratch.key = CtKey::new(error.quote.reversed(), error.quote_proto);
    let key = &scratch.key;
    let found = conntrack::related(key, now_ns());
    let Some(entry) = found.filter(|_| error.outer_dst == key.tuple.dst_addr) else {
        mode.count(stat::PASS);
        return Verdict::Accept;
    };
    let flow = entry.value();
    let kind = if flow.is_reply() {
        trace_ct::REPLY
    } else {
        trace_ct::FORWARD
    };
    mode.flow_found(kind, entry.table, flow);
    let to = &flow.to;
    if *to == key.tuple {
        // A direct flow: nothing is translated.
        mode.count(stat::DIRECT);
        return Verdict::Accept;
    }
    scratch.outer.src_addr = if to.src_addr != key.tuple.src_addr {
        to.src_addr
    } else {
        error.outer_src
    };
    scratch.outer.dst_addr = if to.dst_addr != key.tuple.dst_addr {
        to.dst_addr
    } else {
        error.outer_dst
    };
    scratch.outer.src_port = 0;
    scratch.outer.dst_port = 0;
    scratch.quote = to.reversed();
    let (error, outer) = (&scratch.error, &scratch.outer);
    if rewrite(ctx, error, l4_offset, outer, &scratch.quote).is_none() {
        mode.count(stat::REWRITE_FAILED);
        return Verdict::Drop;
    }
    if flow.flags & ct_flags::ROUTES_ITSELF == 0 {
        mode.count(stat::ICMP_ERROR);
        return Verdict::Accept;
    }
    let hop = match route::lookup(ctx, A::ICMP_PROTOCOL, outer, 0) {
        Route::Via(hop) => hop,
        _ => {
            mode.count(stat::FIB_MISS);
            Hop::KERNEL
        }
    };
    let Some(verdict) = route::send::<C, M, A>(ctx, mode, &hop) else {
        // Its TTL ran out here: no error is sent about an error.
        mode.count(stat::NOT_FORWARDABLE);
        return Verdict::Drop;
    };
    mode.count(stat::ICMP_ERROR);
    verdict
}

/// Reads the error at `l4_offset` and the packet it quotes into `error`.
#[inline(always)]
fn read<C: Context, A: Quoting>(ctx: &C, l4_offset: usize, error: &mut IcmpError<A>) -> Read {
    let headers = A::read_headers(ctx, l4_offset, error);
    if headers != Read::Error {
        return headers;
    }
    let quote_l4 = error.quote_l4;
    // The 8 bytes RFC 792 requires: the rewrite writes the UDP checksum there. A shorter
    // quote names no flow for certain; it passes untouched, as netfilter leaves it.
    let Some(ports) = parse::at(ctx, quote_l4, QUOTED_L4_LEN) else {
        return if (ctx.len() as usize) < quote_l4 + QUOTED_L4_LEN {
            Read::Other
        } else {
            Read::NotLinear
        };
    };
    // SAFETY: within the range `at` checked against data_end just above.
    let ports = unsafe { *(ports as *const [u8; 4]) };
    error.quote.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    error.quote.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    let end = error.end;
    if error.quote_proto == proto::SCTP
        && error.quote_whole
        && quote_l4 + sctp::COMMON_HEADER_LEN <= end
    {
        error.whole_sctp_len = (end - quote_l4) as u16;
    }
    Read::Error
}

/// Writes the new outer addresses (`outer`) and the new quoted packet (`quote`) and
/// updates the checksums; `None` if the headers were not where the read found them.
#[inline(always)]
fn rewrite<C: Context, A: Quoting>(
    ctx: &C,
    error: &IcmpError<A>,
    l4_offset: usize,
    outer: &Tuple<A>,
    quote: &Tuple<A>,
) -> Option<()> {
    let outer_ip = parse::at(ctx, L3_OFFSET, A::HEADER_LEN)?;
    let icmp_header = parse::at(ctx, l4_offset, ICMP_HEADER_LEN)?;
    let quote_ip = parse::at(ctx, error.quote_ip, A::HEADER_LEN)?;
    let quote_l4 = parse::at(ctx, error.quote_l4, QUOTED_L4_LEN)?;
    let from = &error.quote;
    let addresses = A::address_diff(&from.src_addr, &from.dst_addr, quote);
    let outer_addresses = A::address_diff(&error.outer_src, &error.outer_dst, outer);
    let mut ports = 0;
    if from.src_port != quote.src_port {
        ports = csum::diff16(from.src_port, quote.src_port);
    }
    if from.dst_port != quote.dst_port {
        ports = csum::add(ports, csum::diff16(from.dst_port, quote.dst_port));
    }
    // The L4 checksum's position: UDP's lies within the quoted 8 bytes; TCP's only when the
    // error quotes more (netfilter leaves it alone otherwise). SCTP's CRC32c covers the
    // whole quoted packet: kept valid when the error quotes all of it, as netfilter's
    // `sctp_manip_pkt` recomputes it; a shorter quote's is no CRC of anything.
    let udp = error.quote_proto == proto::UDP;
    let l4_check_offset = match error.quote_proto {
        proto::UDP => Some(UDP_CSUM_OFFSET),
        proto::TCP => Some(TCP_CSUM_OFFSET),
        _ => None,
    };
    let l4_check = match l4_check_offset {
        Some(offset) if error.quote_l4 + offset + 2 <= error.end => {
            parse::at(ctx, error.quote_l4 + offset, 2)
        }
        _ => None,
    };
    let ports_changed = from.src_port != quote.src_port || from.dst_port != quote.dst_port;
    let sctp_check = if error.whole_sctp_len != 0 && ports_changed {
        parse::at(ctx, error.quote_l4 + sctp::CHECKSUM_OFFSET, 4)
    } else {
        None
    };
    // SAFETY (all accesses): within ranges `at` checked against data_end just above; tc
    // programs may write packet data.
    unsafe {
        A::set_addresses(outer_ip, outer, outer_addresses);
        // What the ICMP checksum covers changed by: the quoted addresses (and the quoted
        // IPv4 header's checksum), the ports, the quoted L4 checksum, and ICMPv6's
        // pseudo-header the outer addresses.
        let mut quote_diff = addresses;
        match A::HEADER_CSUM_OFFSET {
            Some(offset) => {
                let quote_check = (quote_ip + offset) as *const [u8; 2];
                let before = u16::from_ne_bytes(*quote_check);
                A::set_addresses(quote_ip, quote, addresses);
                quote_diff = csum::add(
                    quote_diff,
                    csum::diff16(before, u16::from_ne_bytes(*quote_check)),
                );
            }
            None => A::set_addresses(quote_ip, quote, addresses),
        }
        if A::ICMP_PSEUDO_HEADER {
            quote_diff = csum::add(quote_diff, outer_addresses);
        }
        *(quote_l4 as *mut [u8; 4]) = port_bytes(quote);
        quote_diff = csum::add(quote_diff, ports);
        if let Some(sctp_check) = sctp_check {
            let field = sctp_check as *mut [u8; 4];
            let before = *field;
            // Zero: left to the sender's device, as in `nat`.
            if before != [0; 4] {
                let after = sctp::checksum_after_port_change(
                    before,
                    port_bytes(from),
                    port_bytes(quote),
                    error.whole_sctp_len,
                );
                *field = after;
                quote_diff = csum::add(
                    quote_diff,
                    csum::diff32(u32::from_ne_bytes(before), u32::from_ne_bytes(after)),
                );
            }
        }
        if let Some(l4_check) = l4_check {
            let field = l4_check as *mut [u8; 2];
            let before = u16::from_ne_bytes(*field);
            // A UDP checksum of zero means none.
            if !(udp && before == 0) {
                let mut after = csum::updated(before, csum::add(addresses, ports));
                if udp && after == 0 {
                    after = 0xffff;
                }
                *field = after.to_ne_bytes();
                quote_diff = csum::add(quote_diff, csum::diff16(before, after));
            }
        }
        let icmp_check = (icmp_header + ICMP_CSUM_OFFSET) as *mut [u8; 2];
        *icmp_check = csum::updated(u16::from_ne_bytes(*icmp_check), quote_diff).to_ne_bytes();
    }
    Some(())
}
