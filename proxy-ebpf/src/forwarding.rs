//! The kernel's forwarding checks, done before a packet is translated: whether its TTL
//! runs out here and whether it fits the device it leaves by.
//!
//! The kernel answers such a packet with "time exceeded" or "fragmentation needed" to its
//! source, quoting it. With kube-proxy that works: netfilter translates a reply's source
//! only after forwarding, and translates the errors of the forwarding step about a DNATed
//! packet back. Here the program translates before the kernel forwards, so the kernel's
//! error would go to the translated source (a Service address: nowhere) or quote addresses
//! the sender never used (its socket ignores it): Path-MTU discovery would black-hole TCP.
//! So the program asks the FIB first, with the translated addresses, and answers such a
//! packet itself as the kernel would, about the packet as its sender sent it (`answer`).
//!
//! The lookup costs a helper call, so it is made only where an error may be due: a TTL of
//! 1 or less, a packet with "don't fragment" longer than
//! [`MIN_CHECKED_MTU`](proxy_common::MIN_CHECKED_MTU) (a GSO packet by its segments), and
//! every packet the program routes itself, which needs the lookup anyway. A packet without
//! "don't fragment" that the kernel forwards is fragmented by it, after translation, as
//! usual. One the program routes itself cannot be (a tc program has no way to fragment,
//! and the kernel drops it as a martian): it is answered with "fragmentation needed" too,
//! which senders honour (Linux lowers the path MTU whatever the quoted DF bit says) and
//! fragment their next datagrams for.

use proxy_common::{MIN_CHECKED_MTU, Tuple, stat, to_tc, trace_answer};

use crate::{
    answer::{Answer, NotAnswered},
    context::Context,
    family::Family,
    mode::Mode,
    parse::{L3_OFFSET, Packet, ip_flags},
    route::{self, Hop, Route},
    verdict::Verdict,
};

/// A packet about to be translated: to the tuple `to`; `routes_itself`: the program
/// routes it (its source becomes a node address); `hop`: where it goes, which [`check`]
/// sets. Passed by reference, so that [`check`] stays within the five registers of a BPF
/// call and returns no more than one register holds (the verifier refuses a subprogram
/// that hands back a pointer into its caller's stack, as a larger return value compiles to).
#[derive(Clone, Copy)]
pub struct Translated<A = u32> {
    pub to: Tuple<A>,
    pub routes_itself: bool,
    pub hop: Hop,
}

/// The outcome of the checks.
pub enum Checked {
    /// Translate it and send it to [`Translated::hop`]; [`Hop::KERNEL`]: the kernel
    /// forwards (or delivers) it — also one the program would route but the FIB has no
    /// route for, as before routing existed here (counted as `fib_miss`).
    Go,
    /// Not translated: an error went back instead (or none could), or the XDP program
    /// leaves the packet to tc. The packet's verdict.
    Answered(Verdict),
}

/// Checks `packet`, about to be translated as `translated` says, as the kernel's
/// forwarding step would. Done before
/// anything is recorded for the packet (a new flow, a tracked flow's accounting), so the
/// XDP program can still leave it untouched to tc: what XDP cannot send itself (no
/// neighbour entry yet, another device without native XDP, no route) and the ICMP errors,
/// which tc builds. A BPF subprogram: its FIB lookups and the answer get a stack frame of
/// their own.
#[inline(never)]
pub fn check<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    translated: &mut Translated<A>,
) -> Checked {
    let (to, routes_itself) = (translated.to, translated.routes_itself);
    translated.hop = Hop::KERNEL;
    let length = segment_len(ctx, packet);
    let dont_fragment = packet.ip.flags & ip_flags::DONT_FRAGMENT != 0;
    let check_mtu = length > MIN_CHECKED_MTU && (dont_fragment || routes_itself);
    let ttl_exhausted = packet.ip.ttl <= 1;
    if !routes_itself && !check_mtu && !ttl_exhausted {
        return Checked::Go;
    }
    let route = route::lookup(ctx, packet.proto, &to, if check_mtu { length } else { 0 });
    let (hop, too_big) = match route {
        // Delivered here: neither TTL nor MTU applies; the program has nothing to route.
        Route::Local | Route::None if routes_itself => {
            if C::IS_XDP {
                return Checked::Answered(Verdict::ToTc(to_tc::NO_ROUTE));
            }
            mode.count(stat::FIB_MISS);
            return Checked::Go;
        }
        Route::Local | Route::None => return Checked::Go,
        Route::Via(hop) => (hop, None),
        Route::TooBig { mtu } => (Hop::KERNEL, Some(mtu)),
    };
    // The kernel checks the TTL first.
    if ttl_exhausted {
        return answer(ctx, mode, packet, stat::TTL_EXCEEDED, |source| {
            Answer::TimeExceeded { source }
        });
    }
    if let Some(mtu) = too_big {
        return answer(ctx, mode, packet, stat::FRAG_NEEDED, |source| {
            Answer::FragNeeded { mtu, source }
        });
    }
    if !routes_itself {
        return Checked::Go;
    }
    match ctx.can_send(&hop) {
        Ok(()) => {
            translated.hop = hop;
            Checked::Go
        }
        Err(reason) => Checked::Answered(Verdict::ToTc(reason)),
    }
}

/// `gso_size` of a GSO packet segmented along its fragments (SCTP's).
const GSO_BY_FRAGS: u32 = 0xffff;

/// The IP length of the largest packet `packet` leaves as: itself, or for a GSO packet
/// (a TCP or UDP super-packet the kernel segments on the way out) one segment. SCTP's GSO
/// packets are segmented by their fragments (`GSO_BY_FRAGS`), each built by SCTP to the
/// path MTU: 0, nothing to check.
#[inline(always)]
fn segment_len<C: Context, A: Family>(ctx: &C, packet: &Packet<A>) -> u16 {
    let segment = ctx.gso_size();
    if segment == 0 {
        return packet.ip.total_len;
    }
    if segment == GSO_BY_FRAGS {
        return 0;
    }
    let headers = (packet.l4_offset - L3_OFFSET) as u32 + u32::from(packet.ip.l4_header_len);
    (headers + segment).min(u32::from(u16::MAX)) as u16
}

/// Sends the error `make(source)` back to the packet's sender, from the node address the
/// kernel would use toward it; counts `counter` if it went out.
#[inline(always)]
fn answer<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    counter: u32,
    make: impl FnOnce(A) -> Answer<A>,
) -> Checked {
    if C::IS_XDP {
        return Checked::Answered(Verdict::ToTc(to_tc::ANSWER));
    }
    // The kernel's error leaves from the address it would use toward the sender; without
    // a route back, the frontend's (any address reaches a socket: Linux matches the quote).
    let source = route::source_toward(ctx, packet.proto, packet.src_addr, packet.src_port)
        .map_or(packet.dst_addr, |(source, _)| source);
    let kind = make(source);
    let (traced, mtu) = match kind {
        Answer::FragNeeded { mtu, .. } => (trace_answer::FRAG_NEEDED, mtu),
        _ => (trace_answer::TIME_EXCEEDED, 0),
    };
    mode.answered(traced, mtu);
    match ctx.answer(packet, kind, !M::DRY_RUN) {
        Ok(verdict) => {
            mode.count(counter);
            Checked::Answered(verdict)
        }
        Err(NotAnswered::RateLimited) => {
            mode.count(stat::REJECT_RATE_LIMITED);
            Checked::Answered(Verdict::Drop)
        }
        // The fixed-size answer cannot quote IPv4 options (rare enough): the kernel gets
        // such a packet, translated, and answers it itself with the quote's addresses
        // spoilt, or drops it as a martian if its source became a node address.
        Err(NotAnswered::IpOptions) => Checked::Go,
        Err(NotAnswered::HelperFailed) => {
            mode.count(stat::REWRITE_FAILED);
            Checked::Answered(Verdict::Drop)
        }
    }
}
