//! ICMP errors about a tracked flow's packets, translated as the flow is (netfilter's
//! `nf_nat_icmp_reply_translation`).
//!
//! An error (destination unreachable — "port unreachable", "fragmentation needed", … —,
//! time exceeded, parameter problem) quotes the IPv4 header and at least the first 8 bytes
//! of the packet it is about, as that packet was when the error's sender saw it: after
//! translation. Its recipient, whose socket is connected to the untranslated addresses,
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
//! - the checksums: the outer IPv4 header's, the quoted IPv4 header's, the quoted TCP/UDP
//!   checksum (kept incrementally as netfilter does: when it lies within the quote, and a
//!   UDP checksum of zero stays zero) and the ICMP checksum over all of it. Each is an
//!   incremental update, so a CHECKSUM_COMPLETE skb's sum stays right.
//!
//! As netfilter checks, an error is only taken as related when its outer destination is the
//! quoted packet's source. It refreshes no conntrack entry. Where the flow's packets in
//! that direction are routed by the program (their source became a node address), so is
//! the error.

use proxy_common::{CtKey, Tuple, ct_flags, icmp, proto, sctp, stat, trace_ct};

use crate::{
    conntrack::{self, now_ns},
    context::Context,
    csum,
    mode::Mode,
    nat::{self, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET},
    parse::{self, L3_OFFSET},
    route::{self, Hop, Route},
    verdict::Verdict,
};

const ICMP_HEADER_LEN: usize = 8;
const IPV4_MIN_LEN: usize = 20;
/// What an error quotes of the packet's TCP/UDP header (RFC 792): its first 8 bytes.
const QUOTED_L4_LEN: usize = 8;
/// The most an error's headers span: Ethernet, IPv4 with options, the ICMP header, the
/// quoted IPv4 header with options, and the quoted TCP header up to its checksum.
const MAX_ERROR_HEADERS: u32 = (L3_OFFSET + 60 + ICMP_HEADER_LEN + 60 + 18) as u32;
/// The quoted IPv4 header's fragment offset field (bytes 6 and 7), without the flags.
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Its "more fragments" flag.
const QUOTED_MORE_FRAGMENTS: u16 = 0x2000;
/// Offset of the checksum within the ICMP and IPv4 headers.
const ICMP_CSUM_OFFSET: usize = 2;
const IPV4_CSUM_OFFSET: usize = 10;

/// An ICMP error quoting a TCP, UDP or SCTP packet.
struct IcmpError {
    icmp_type: u8,
    code: u8,
    outer_src: u32,
    outer_dst: u32,
    /// End of the outer IPv4 datagram (trailing Ethernet padding excluded).
    end: usize,
    /// Offsets of the quoted IPv4 header and of its TCP/UDP header.
    quote_ip: usize,
    quote_l4: usize,
    /// The quoted packet's addresses and ports.
    quote: Tuple,
    quote_proto: u8,
    /// SCTP: the quoted packet's length when the error quotes all of it (its CRC32c can
    /// then be kept valid), else 0.
    whole_sctp_len: u16,
}

enum Read {
    Error(IcmpError),
    /// Not an error, or about a packet this program does not translate.
    Other,
    /// The headers reach beyond the skb's linear part.
    NotLinear,
}

/// An ICMP message whose header is at `l4_offset`: translated if it is an error about a
/// tracked flow, else passed untouched. A BPF subprogram (a stack frame of its own).
#[inline(never)]
pub fn translate<C: Context, M: Mode>(ctx: &C, mode: &M, l4_offset: usize) -> Verdict {
    let error = match read(ctx, l4_offset) {
        Read::Error(error) => error,
        Read::Other => {
            mode.count(stat::NOT_HANDLED);
            return Verdict::Accept;
        }
        Read::NotLinear => {
            if ctx.pull(ctx.len().min(MAX_ERROR_HEADERS)).is_err() {
                mode.count(stat::NOT_HANDLED);
                return Verdict::Accept;
            }
            match read(ctx, l4_offset) {
                Read::Error(error) => error,
                _ => {
                    mode.count(stat::NOT_HANDLED);
                    return Verdict::Accept;
                }
            }
        }
    };
    mode.icmp_error(error.icmp_type, error.code);
    // The entry for the error's direction is keyed by the reverse of the quoted packet.
    let key = CtKey::new(error.quote.reversed(), error.quote_proto);
    let found = conntrack::related(&key, now_ns());
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
    let to = flow.to;
    if to == key.tuple {
        // A direct flow: nothing is translated.
        mode.count(stat::DIRECT);
        return Verdict::Accept;
    }
    let outer = Tuple {
        src_addr: if to.src_addr != key.tuple.src_addr {
            to.src_addr
        } else {
            error.outer_src
        },
        dst_addr: if to.dst_addr != key.tuple.dst_addr {
            to.dst_addr
        } else {
            error.outer_dst
        },
        src_port: 0,
        dst_port: 0,
    };
    if rewrite(ctx, &error, l4_offset, &outer, &to.reversed()).is_none() {
        mode.count(stat::REWRITE_FAILED);
        return Verdict::Drop;
    }
    if flow.flags & ct_flags::ROUTES_ITSELF == 0 {
        mode.count(stat::ICMP_ERROR);
        return Verdict::Accept;
    }
    let hop = match route::lookup(ctx, icmp::PROTOCOL, &outer, 0) {
        Route::Via(hop) => hop,
        _ => {
            mode.count(stat::FIB_MISS);
            Hop::KERNEL
        }
    };
    let Some(verdict) = route::send::<C, M, u32>(ctx, mode, &hop) else {
        // Its TTL ran out here: no error is sent about an error.
        mode.count(stat::NOT_FORWARDABLE);
        return Verdict::Drop;
    };
    mode.count(stat::ICMP_ERROR);
    verdict
}

/// Reads the error at `l4_offset` and the packet it quotes.
#[inline(always)]
fn read<C: Context>(ctx: &C, l4_offset: usize) -> Read {
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
    let quote_l4 = quote_ip + header_len;
    // The 8 bytes RFC 792 requires: the rewrite writes the UDP checksum there. A shorter
    // quote names no flow for certain; it passes untouched, as netfilter leaves it.
    let Some(ports) = parse::at(ctx, quote_l4, QUOTED_L4_LEN) else {
        return if (ctx.len() as usize) < quote_l4 + QUOTED_L4_LEN {
            Read::Other
        } else {
            Read::NotLinear
        };
    };
    let ports = unsafe { *(ports as *const [u8; 4]) };
    let end = L3_OFFSET + usize::from(total_len);
    let whole = fragment & QUOTED_MORE_FRAGMENTS == 0
        && quote_ip + usize::from(quote_total_len) == end
        && quote_l4 + sctp::COMMON_HEADER_LEN <= end;
    let whole_sctp_len = if quote_proto == proto::SCTP && whole {
        (end - quote_l4) as u16
    } else {
        0
    };
    Read::Error(IcmpError {
        icmp_type,
        code,
        outer_src,
        outer_dst,
        end,
        quote_ip,
        quote_l4,
        quote: Tuple {
            src_addr: quote_src,
            dst_addr: quote_dst,
            src_port: u16::from_ne_bytes([ports[0], ports[1]]),
            dst_port: u16::from_ne_bytes([ports[2], ports[3]]),
        },
        quote_proto,
        whole_sctp_len,
    })
}

/// Writes the new outer addresses (`outer`) and the new quoted packet (`quote`) and
/// updates the four checksums; `None` if the headers were not where the read found them.
#[inline(always)]
fn rewrite<C: Context>(
    ctx: &C,
    error: &IcmpError,
    l4_offset: usize,
    outer: &Tuple,
    quote: &Tuple,
) -> Option<()> {
    let outer_ip = parse::at(ctx, L3_OFFSET, IPV4_MIN_LEN)?;
    let icmp_header = parse::at(ctx, l4_offset, ICMP_HEADER_LEN)?;
    let quote_ip = parse::at(ctx, error.quote_ip, IPV4_MIN_LEN)?;
    let quote_l4 = parse::at(ctx, error.quote_l4, QUOTED_L4_LEN)?;
    let from = &error.quote;
    let addresses = nat::address_diff(from.src_addr, from.dst_addr, quote.src_addr, quote.dst_addr);
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
        nat::set_addresses(
            outer_ip,
            outer.src_addr,
            outer.dst_addr,
            nat::address_diff(
                error.outer_src,
                error.outer_dst,
                outer.src_addr,
                outer.dst_addr,
            ),
        );
        let quote_check = (quote_ip + IPV4_CSUM_OFFSET) as *const [u8; 2];
        let quote_check_before = u16::from_ne_bytes(*quote_check);
        nat::set_addresses(quote_ip, quote.src_addr, quote.dst_addr, addresses);
        // What the ICMP checksum covers changed by: the quoted addresses, the quoted
        // header's checksum, the ports and the quoted L4 checksum.
        let mut quote_diff = csum::add(
            addresses,
            csum::diff16(quote_check_before, u16::from_ne_bytes(*quote_check)),
        );
        *(quote_l4 as *mut [u8; 4]) = nat::port_bytes(quote);
        quote_diff = csum::add(quote_diff, ports);
        if let Some(sctp_check) = sctp_check {
            let field = sctp_check as *mut [u8; 4];
            let before = *field;
            // Zero: left to the sender's device, as in `nat`.
            if before != [0; 4] {
                let after = sctp::checksum_after_port_change(
                    before,
                    nat::port_bytes(from),
                    nat::port_bytes(quote),
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
