//! ICMP errors the program sends itself, in place of the packet it holds, back out of the
//! device the packet arrived on:
//!
//! - a refusal: "port unreachable" for a new connection to a frontend without endpoints,
//!   from the frontend the client addressed — kube-proxy's `REJECT` (Cilium drops instead,
//!   and the client waits for its timeout);
//! - "fragmentation needed" and "time exceeded" for a packet the program translates that
//!   is too big for the device it would leave by, or whose TTL runs out here: what the
//!   kernel's forwarding path sends, from the node's address toward the sender, about the
//!   packet as the sender sent it. Netfilter NATs after forwarding (and translates the
//!   errors of the forwarding step back), so with kube-proxy the sender learns of it; once
//!   this program has rewritten the packet, the kernel's own error would go to the
//!   translated source (a Service address) and quote addresses the sender never used.
//!
//! The packet is rewritten in place into the answer and redirected (`bpf_redirect`):
//! Ethernet addresses swapped, a new IPv4 header, the ICMP header, then the original IPv4
//! header and the first 8 bytes of its payload (RFC 792), by which the sender's kernel
//! finds the socket the error is for. IPv6 the same way with ICMPv6 (RFC 4443: destination
//! unreachable / port unreachable, packet too big, time exceeded — kube-proxy's
//! `--reject-with icmp6-port-unreachable`), its checksum over the IPv6 pseudo-header; the
//! quote is the IPv6 header and 8 bytes, so a packet with extension headers is not
//! answered (as IPv4 options are not).
//!
//! Errors are rate limited as the kernel limits its own, kube-proxy's REJECT among them, so
//! that the node cannot be used to reflect a flood of spoofed packets at a victim: per
//! destination, a bucket of 6 errors refilled one per `icmp_ratelimit`
//! (`inet_peer_xrlim_allow`); node-wide, `icmp_msgs_per_sec` with bursts of
//! `icmp_msgs_burst`, refilled at most every 20 ms and charged a random 0-2 per error
//! (`icmp_global_allow`, `icmp_global_consume`) — all with the node's settings, which the
//! daemon reads when it loads the program ([`RefusalLimits`]), for the types its
//! `icmp_ratemask` names. "Fragmentation needed" and "packet too big" are never limited,
//! as in the kernel ("don't limit PMTU discovery"). ICMPv6 errors share the node-wide
//! budget (as the kernel's do) and go by the same IPv4 settings for the rest (the kernel's
//! `net.ipv6.icmp.ratelimit` has the same 1 s default). An error without room is a drop,
//! counted by the caller.
//!
//! Not yet handled: a packet whose L4 checksum a device was still to complete
//! (CHECKSUM_PARTIAL: a sender on this host through a veth, or a GRO'd segment) keeps that
//! state. A veth peer takes the answer as verified, which is the pod case; a device that
//! would complete the checksum on the way out would write into the quoted bytes.

use core::{
    intrinsics::{AtomicOrdering, atomic_xadd},
    ptr,
};

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    cty::{c_long, c_void},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use proxy_common::{Ipv6, RefusalLimits, icmp, icmp6};

use crate::{
    csum,
    family::Family,
    parse::{L3_OFFSET, Packet},
};

/// The error to answer a packet with.
#[derive(Clone, Copy)]
pub enum Answer<A = u32> {
    /// A refusal, from the frontend the packet was addressed to.
    PortUnreachable,
    /// Too big for the next hop, whose MTU it names; from `source`, a node address.
    FragNeeded { mtu: u16, source: A },
    /// Its TTL (hop limit) ran out here; from `source`, a node address.
    TimeExceeded { source: A },
}

impl<A: Family> Answer<A> {
    /// The answer's source address.
    #[inline(always)]
    fn source(self, packet: &Packet<A>) -> A {
        match self {
            Answer::PortUnreachable => packet.dst_addr,
            Answer::FragNeeded { source, .. } | Answer::TimeExceeded { source } => source,
        }
    }
}

impl Answer {
    /// ICMP type, code, the rest of the header (RFC 1191: the next-hop MTU), and whether
    /// the node's `icmp_ratemask` subjects the type to the rate limits.
    #[inline(always)]
    fn header(self, limits: &RefusalLimits) -> ([u8; ICMP_HEADER_LEN], bool) {
        let (icmp_type, code, mtu, limited) = match self {
            Answer::PortUnreachable => (
                icmp::DEST_UNREACH,
                icmp::PORT_UNREACH,
                0u16,
                limits.limited != 0,
            ),
            Answer::FragNeeded { mtu, .. } => (icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu, false),
            Answer::TimeExceeded { .. } => (
                icmp::TIME_EXCEEDED,
                icmp::TTL_EXCEEDED,
                0,
                limits.time_exceeded_limited != 0,
            ),
        };
        let [mtu_high, mtu_low] = mtu.to_be_bytes();
        ([icmp_type, code, 0, 0, 0, 0, mtu_high, mtu_low], limited)
    }
}

impl Answer<Ipv6> {
    /// ICMPv6 type, code, the rest of the header (RFC 4443: packet too big's MTU), and
    /// whether the rate limits apply.
    #[inline(always)]
    fn header6(self, limits: &RefusalLimits) -> ([u8; ICMP_HEADER_LEN], bool) {
        let (icmp_type, code, mtu, limited) = match self {
            Answer::PortUnreachable => (
                icmp6::DEST_UNREACH,
                icmp6::PORT_UNREACH,
                0u32,
                limits.limited != 0,
            ),
            Answer::FragNeeded { mtu, .. } => (icmp6::PACKET_TOO_BIG, 0, u32::from(mtu), false),
            Answer::TimeExceeded { .. } => (
                icmp6::TIME_EXCEEDED,
                icmp6::HOP_LIMIT_EXCEEDED,
                0,
                limits.time_exceeded_limited != 0,
            ),
        };
        let [mtu_0, mtu_1, mtu_2, mtu_3] = mtu.to_be_bytes();
        ([icmp_type, code, 0, 0, mtu_0, mtu_1, mtu_2, mtu_3], limited)
    }
}

/// IPv4 version 4, header length 5 words.
const IPV4_VERSION_IHL: u8 = 0x45;
/// The precedence the kernel gives its own ICMP errors (IPTOS_PREC_INTERNETCONTROL).
const TOS_INTERNETCONTROL: u8 = 0xc0;
const TTL: u8 = 64;
/// Bytes of the packet quoted after its header: its ports (RFC 792).
const QUOTED_PAYLOAD_LEN: usize = 8;
const ICMP_HEADER_LEN: usize = 8;

/// The answer, byte for byte: Ethernet, IPv4, ICMP, and the quote of the packet. Built in
/// a per-CPU scratch entry ([`ANSWER`]): on the stack it would crowd the packet path's.
#[repr(C)]
struct IcmpAnswer {
    eth: [u8; EthHdr::LEN],
    ip: [u8; Ipv4Hdr::LEN],
    icmp: [u8; ICMP_HEADER_LEN],
    quote: [u8; Ipv4Hdr::LEN + QUOTED_PAYLOAD_LEN],
}

/// This CPU's answer under construction; not pinned.
#[map]
static ANSWER: PerCpuArray<IcmpAnswer> = PerCpuArray::with_max_entries(1, 0);

const IPV6_LEN: usize = 40;

/// The ICMPv6 answer, byte for byte: Ethernet, IPv6, ICMPv6, and the quote of the packet
/// (its IPv6 header and 8 bytes, its ports).
#[repr(C)]
struct Icmp6Answer {
    eth: [u8; EthHdr::LEN],
    ip: [u8; IPV6_LEN],
    icmp: [u8; ICMP_HEADER_LEN],
    quote: [u8; IPV6_LEN + QUOTED_PAYLOAD_LEN],
}

/// This CPU's ICMPv6 answer under construction; not pinned.
#[map]
static ANSWER6: PerCpuArray<Icmp6Answer> = PerCpuArray::with_max_entries(1, 0);

/// The node's ICMP rate limits, set at load time (the daemon reads the sysctls).
#[unsafe(no_mangle)]
static REFUSAL_LIMITS: RefusalLimits = RefusalLimits::KERNEL_DEFAULTS;

/// The node-wide budget (`icmp_global_credit`, `icmp_global_stamp`): one entry that every
/// CPU shares. Not pinned: a restarted daemon starts with a full budget, like a booted
/// kernel.
#[map]
static REFUSAL_BUDGET: Array<NodeBudget> = Array::with_max_entries(1, 0);

/// Each client's bucket (the kernel's inet_peer `rate_tokens`, `rate_last`). LRU: past
/// this many clients refused within their refill time (6 s by default), the least recent
/// are forgotten and start with a full bucket again; the node-wide limit still holds.
#[map]
static REFUSED_CLIENTS: LruHashMap<u32, ClientBucket> = LruHashMap::with_max_entries(16_384, 0);

/// The same for IPv6 clients.
#[map]
static REFUSED_CLIENTS6: LruHashMap<Ipv6, ClientBucket> = LruHashMap::with_max_entries(16_384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct NodeBudget {
    /// Refusals that may go out now; goes negative under a race, as the kernel's does.
    credit: i64,
    /// When the credit was last refilled (`bpf_ktime_get_ns`).
    refilled_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ClientBucket {
    /// Refusal time accumulated, in nanoseconds: one refusal costs the interval.
    tokens_ns: u64,
    last_ns: u64,
}

const NANOS_PER_SECOND: u64 = 1_000_000_000;
/// The kernel refills its node-wide budget at most every HZ/50.
const REFILL_MIN_NS: u64 = NANOS_PER_SECOND / 50;

/// Why no answer was sent; the caller drops the packet.
pub enum NotAnswered {
    /// The ICMP rate limits have no room for it now (`stat::REJECT_RATE_LIMITED`).
    RateLimited,
    /// IPv4 options: the quote would not fit the fixed answer (such packets are rare
    /// enough that dropping them costs nothing).
    IpOptions,
    /// A helper failed (the packet may be half rewritten).
    HelperFailed,
}

impl From<c_long> for NotAnswered {
    fn from(_: c_long) -> Self {
        NotAnswered::HelperFailed
    }
}

/// Turns `packet` (as it is now: not yet translated) into the ICMP error `kind` to its
/// sender and redirects it back out of its ingress device; returns the verdict
/// (TC_ACT_REDIRECT). `charge` subjects it to the rate limits (false for a dry run, which
/// must leave them as they are). A BPF subprogram: the answer is built in a stack frame of
/// its own.
#[inline(never)]
pub fn send(
    ctx: &TcContext,
    packet: &Packet,
    kind: &Answer,
    charge: bool,
) -> Result<i32, NotAnswered> {
    let kind = *kind;
    if packet.l4_offset != L3_OFFSET + Ipv4Hdr::LEN {
        return Err(NotAnswered::IpOptions);
    }
    let limits = refusal_limits();
    let (icmp_header, limited) = kind.header(&limits);
    if charge && limited && !error_allowed(&REFUSED_CLIENTS, &packet.src_addr, &limits) {
        return Err(NotAnswered::RateLimited);
    }
    let answer = ANSWER.get_ptr_mut(0).ok_or(NotAnswered::HelperFailed)?;
    // SAFETY: `answer` is this CPU's scratch entry, used only within this call (no
    // preemption while the program runs); the loads write exactly the fields' sizes.
    let answer = unsafe { &mut *answer };
    start(ctx, &mut answer.eth, &mut answer.quote)?;
    answer.icmp = icmp_header;

    let total_len = (size_of::<IcmpAnswer>() - EthHdr::LEN) as u16;
    let [len_high, len_low] = total_len.to_be_bytes();
    let [src_0, src_1, src_2, src_3] = kind.source(packet).to_ne_bytes();
    let [dst_0, dst_1, dst_2, dst_3] = packet.src_addr.to_ne_bytes();
    answer.ip = [
        IPV4_VERSION_IHL,
        TOS_INTERNETCONTROL,
        len_high,
        len_low,
        0, // identification
        0,
        0, // flags and fragment offset
        0,
        TTL,
        icmp::PROTOCOL,
        0, // checksum, below
        0,
        src_0, // from the frontend the client addressed, or the node
        src_1,
        src_2,
        src_3,
        dst_0, // to the sender
        dst_1,
        dst_2,
        dst_3,
    ];
    let [ip_csum_high, ip_csum_low] = csum::internet_checksum(&answer.ip, 0);
    answer.ip[10] = ip_csum_high;
    answer.ip[11] = ip_csum_low;

    let quote_sum = csum::ones_complement_sum(&answer.quote);
    let [icmp_csum_high, icmp_csum_low] = csum::internet_checksum(&answer.icmp, quote_sum);
    answer.icmp[2] = icmp_csum_high;
    answer.icmp[3] = icmp_csum_low;
    emit(ctx, answer)
}

/// [`send`] for an IPv6 packet: the ICMPv6 error `kind`, from the frontend (a refusal) or
/// the node.
#[inline(never)]
pub fn send6(
    ctx: &TcContext,
    packet: &Packet<Ipv6>,
    kind: &Answer<Ipv6>,
    charge: bool,
) -> Result<i32, NotAnswered> {
    let kind = *kind;
    if packet.l4_offset != L3_OFFSET + IPV6_LEN {
        return Err(NotAnswered::IpOptions);
    }
    let limits = refusal_limits();
    let (icmp_header, limited) = kind.header6(&limits);
    if charge && limited && !error_allowed(&REFUSED_CLIENTS6, &packet.src_addr, &limits) {
        return Err(NotAnswered::RateLimited);
    }
    let answer = ANSWER6.get_ptr_mut(0).ok_or(NotAnswered::HelperFailed)?;
    // SAFETY: as in `send`.
    let answer = unsafe { &mut *answer };
    start(ctx, &mut answer.eth, &mut answer.quote)?;
    answer.icmp = icmp_header;

    let payload_len = (size_of::<Icmp6Answer>() - EthHdr::LEN - IPV6_LEN) as u16;
    let [len_high, len_low] = payload_len.to_be_bytes();
    let source = kind.source(packet);
    answer.ip[..8].copy_from_slice(&[0x60, 0, 0, 0, len_high, len_low, icmp6::PROTOCOL, TTL]);
    // The pseudo-header: both addresses, the upper-layer length and next header.
    let mut pseudo = u32::from(payload_len) + u32::from(icmp6::PROTOCOL);
    for (index, (from, to)) in source.0.iter().zip(packet.src_addr.0).enumerate() {
        let (from, to) = (from.to_ne_bytes(), to.to_ne_bytes());
        answer.ip[8 + index * 4..12 + index * 4].copy_from_slice(&from);
        answer.ip[24 + index * 4..28 + index * 4].copy_from_slice(&to);
        pseudo += csum::ones_complement_sum(&from) + csum::ones_complement_sum(&to);
    }
    let partial = pseudo + csum::ones_complement_sum(&answer.quote);
    let [icmp_csum_high, icmp_csum_low] = csum::internet_checksum(&answer.icmp, partial);
    answer.icmp[2] = icmp_csum_high;
    answer.icmp[3] = icmp_csum_low;
    emit(ctx, answer)
}

/// The node's ICMP rate limits, as the loader set them.
#[inline(always)]
fn refusal_limits() -> RefusalLimits {
    // SAFETY: a load-time constant; volatile so the compiler keeps the loader's value.
    unsafe { ptr::read_volatile(&raw const REFUSAL_LIMITS) }
}

/// Starts an answer: its Ethernet header back to where the packet came from (the MAC
/// addresses swapped, the EtherType kept) and the quote of the packet from its IP header
/// on.
#[inline(always)]
fn start<const N: usize>(
    ctx: &TcContext,
    eth: &mut [u8; EthHdr::LEN],
    quote: &mut [u8; N],
) -> Result<(), NotAnswered> {
    load(ctx, 0, eth)?;
    load(ctx, L3_OFFSET, quote)?;
    let mut destination = [0u8; 6];
    destination.copy_from_slice(&eth[6..12]);
    eth.copy_within(0..6, 6);
    eth[..6].copy_from_slice(&destination);
    Ok(())
}

/// Replaces the packet with `answer`'s bytes and redirects it back out of its device.
#[inline(always)]
fn emit<T>(ctx: &TcContext, answer: &T) -> Result<i32, NotAnswered> {
    // SAFETY: `skb` is the program's context; the helper trims or zero-extends the packet.
    let resized = unsafe { bpf_skb_change_tail(ctx.skb.skb, size_of::<T>() as u32, 0) };
    if resized != 0 {
        return Err(NotAnswered::HelperFailed);
    }
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum in step with the new bytes.
    // SAFETY: `skb` is the program's context; `answer` holds as many bytes as passed.
    let stored = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb,
            0,
            (answer as *const T).cast(),
            size_of::<T>() as u32,
            BPF_F_RECOMPUTE_CSUM.into(),
        )
    };
    if stored != 0 {
        return Err(NotAnswered::HelperFailed);
    }
    // SAFETY: `skb` is the program's context pointer.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; flags 0 redirects to the device's egress.
    let verdict = unsafe { bpf_redirect(ingress, 0) };
    Ok(verdict as i32)
}

/// Copies the packet's bytes at `offset` into `into` (scratch memory).
#[inline(always)]
fn load<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    into: &mut [u8; N],
) -> Result<(), NotAnswered> {
    // SAFETY: `skb` is the program's context; `into` holds N writable bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            offset as u32,
            into.as_mut_ptr().cast(),
            N as u32,
        )
    };
    if loaded == 0 {
        Ok(())
    } else {
        Err(NotAnswered::HelperFailed)
    }
}

/// Whether an error to `client` may go out now, as `icmp_send` decides for its own errors:
/// the node-wide budget first, then the client's bucket, and only an error that goes out
/// is charged to the node-wide budget.
#[inline(always)]
fn error_allowed<K>(
    clients: &LruHashMap<K, ClientBucket>,
    client: &K,
    limits: &RefusalLimits,
) -> bool {
    // SAFETY: the helper has no preconditions.
    let now_ns = unsafe { bpf_ktime_get_ns() };
    let Some(budget) = REFUSAL_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    if !node_allows(budget, limits, now_ns) || !client_allows(clients, client, limits, now_ns) {
        return false;
    }
    // The kernel charges a random 0, 1 or 2 (1 on average), so that the budget tells an
    // off-path prober nothing exact (CVE-2020-25705).
    // SAFETY: the helper has no preconditions.
    let charge = i64::from(unsafe { bpf_get_prandom_u32() } % 3);
    if charge != 0 {
        // SAFETY: `budget` points into the array's only entry, which lives as long as the
        // map; CPUs race on it, hence the atomic add.
        unsafe {
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(&raw mut (*budget).credit, -charge)
        };
    }
    true
}

/// `icmp_global_allow`: room while the credit is positive; else, if 20 ms have passed, a
/// refill of `per_second` × elapsed (elapsed counted up to 1 s), capped at `burst`.
#[inline(always)]
fn node_allows(budget: *mut NodeBudget, limits: &RefusalLimits, now_ns: u64) -> bool {
    // SAFETY: `budget` points into the array's only entry. Racing CPUs may both refill
    // (the kernel's cmpxchg lets one); the excess is at most one refill per CPU.
    unsafe {
        let credit = ptr::read_volatile(&raw const (*budget).credit);
        if credit > 0 {
            return true;
        }
        let elapsed = now_ns
            .saturating_sub((*budget).refilled_ns)
            .min(NANOS_PER_SECOND);
        if elapsed < REFILL_MIN_NS {
            return false;
        }
        let refill = u64::from(limits.per_second) * elapsed / NANOS_PER_SECOND;
        if refill == 0 {
            return false;
        }
        (*budget).refilled_ns = now_ns;
        (*budget).credit = (credit + refill as i64).min(i64::from(limits.burst));
    }
    true
}

/// `inet_peer_xrlim_allow`: the client's bucket gains the time since its last refusal,
/// up to [`RefusalLimits::CLIENT_BURST`] intervals, and a refusal takes one interval. A
/// client seen for the first time starts full, as the kernel's new peer does.
#[inline(always)]
fn client_allows<K>(
    clients: &LruHashMap<K, ClientBucket>,
    client: &K,
    limits: &RefusalLimits,
    now_ns: u64,
) -> bool {
    let interval = limits.client_interval_ns;
    if interval == 0 {
        return true;
    }
    let full = RefusalLimits::CLIENT_BURST * interval;
    let Some(bucket) = clients.get_ptr_mut(client) else {
        let bucket = ClientBucket {
            tokens_ns: full - interval,
            last_ns: now_ns,
        };
        // A full map evicts its least recent client; should the insert still fail, the
        // kernel without a peer entry lets the error out too.
        let _ = clients.insert(client, &bucket, 0);
        return true;
    };
    // SAFETY: the pointer comes from a successful lookup; racing CPUs may lose one
    // another's update, as the kernel's unlocked peer update may.
    unsafe {
        let gained = now_ns.saturating_sub((*bucket).last_ns);
        let tokens = (*bucket).tokens_ns.saturating_add(gained).min(full);
        (*bucket).last_ns = now_ns;
        let allowed = tokens >= interval;
        (*bucket).tokens_ns = if allowed { tokens - interval } else { tokens };
        allowed
    }
}
