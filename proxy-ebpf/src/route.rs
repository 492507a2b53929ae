//! Routing of packets whose source became one of the node's own addresses.
//!
//! After reverse NAT a NodePort reply leaves with the node address as its source, and so
//! do both directions of an SNAT flow and of a hairpin flow through a NodePort. The
//! kernel's forwarding path drops such packets as martians (a forwarded packet must not
//! claim a local source), so the program does the forwarding step itself: a FIB lookup
//! for the destination, a TTL decrement as the router would do, and the packet handed to
//! the egress device by the context (tc: `bpf_redirect_neigh`, the kernel resolving the
//! next hop's MAC; XDP: the MACs from the FIB written in place, then XDP_TX or a redirect).
//!
//! The next hop is found before the packet is rewritten (and before a new flow is
//! recorded), so a hook that cannot send the packet itself — XDP without the next hop's
//! MAC, or towards a device without native XDP — leaves it untouched to tc.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};
use proxy_common::{Tuple, stat, to_tc};

use crate::{
    context::Context,
    csum,
    mode::Mode,
    parse::{self, L3_OFFSET},
    verdict::Verdict,
};

const AF_INET: u8 = 2;
/// Offsets within the IPv4 header.
const IPV4_TTL_OFFSET: usize = 8;
const IPV4_CSUM_OFFSET: usize = 10;

/// Where a packet leaves: the egress device and, when the neighbour table knows it, the
/// Ethernet addresses to use. Every field is always written (no `Option` around it): the
/// verifier refuses to read a register that was never set, which an `Option`'s absent
/// payload may compile to.
#[derive(Clone, Copy)]
pub struct Hop {
    /// 0: the program does not route the packet; the kernel does.
    pub ifindex: u32,
    /// The FIB answered with the next hop's MAC (`dmac`) and the device's own (`smac`).
    pub neighbour_known: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

impl Hop {
    /// The kernel routes the packet.
    pub const KERNEL: Self = Self {
        ifindex: 0,
        neighbour_known: false,
        smac: [0; 6],
        dmac: [0; 6],
    };

    /// Whether the program sends the packet itself.
    pub fn routed_here(&self) -> bool {
        self.ifindex != 0
    }
}

/// How the packet (to become `to`) leaves when the program routes it itself: `Ok` the hop
/// the context sends it to, or [`Hop::KERNEL`] (tc, when the FIB has no route or the TTL
/// is exhausted: the kernel then sends the ICMP error); `Err` the XDP program leaves it to
/// tc.
#[inline(always)]
pub fn hop_for<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    proto: u8,
    to: &Tuple,
) -> Result<Hop, Verdict> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request skeleton.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = proto;
    params.sport = to.src_port;
    params.dport = to.dst_port;
    params.ifindex = ctx.ifindex();
    params.__bindgen_anon_3.ipv4_src = to.src_addr;
    params.__bindgen_anon_4.ipv4_dst = to.dst_addr;
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let found = unsafe {
        fib_lookup(
            ctx.raw(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    let neighbour_known = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
    let reason = if !neighbour_known && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        if !C::IS_XDP {
            mode.count(stat::FIB_MISS);
        }
        to_tc::NO_ROUTE
    } else if !ttl_allows_a_hop(ctx) {
        to_tc::NO_ROUTE
    } else {
        let hop = Hop {
            ifindex: params.ifindex,
            neighbour_known,
            smac: params.smac,
            dmac: params.dmac,
        };
        match ctx.can_send(&hop) {
            Ok(()) => return Ok(hop),
            Err(reason) => reason,
        }
    };
    if C::IS_XDP {
        Err(Verdict::ToTc(reason))
    } else {
        Ok(Hop::KERNEL)
    }
}

/// Sends the translated packet to `hop` ([`hop_for`] found it): one hop, so the TTL
/// goes down by one.
#[inline(always)]
pub fn forward<C: Context>(ctx: &C, hop: &Hop) -> Verdict {
    if !decrement_ttl(ctx) {
        return Verdict::Accept;
    }
    ctx.send(hop)
}

/// Whether the TTL leaves room for one more hop.
#[inline(always)]
fn ttl_allows_a_hop<C: Context>(ctx: &C) -> bool {
    match parse::at(ctx, L3_OFFSET + IPV4_TTL_OFFSET, 1) {
        // SAFETY: the byte was checked against data_end just above.
        Some(ttl) => (unsafe { *(ttl as *const u8) }) > 1,
        None => false,
    }
}

/// Decrements the TTL and fixes the header checksum; false when it would reach zero.
#[inline(always)]
fn decrement_ttl<C: Context>(ctx: &C) -> bool {
    let Some(ip) = parse::at(ctx, L3_OFFSET, IPV4_CSUM_OFFSET + 2) else {
        return false;
    };
    // SAFETY: the range was checked against data_end just above.
    unsafe {
        let ttl_and_proto = (ip + IPV4_TTL_OFFSET) as *mut [u8; 2];
        let [ttl, protocol] = *ttl_and_proto;
        if ttl <= 1 {
            return false;
        }
        let decremented = [ttl - 1, protocol];
        let check = (ip + IPV4_CSUM_OFFSET) as *mut [u8; 2];
        let diff = csum::diff16(
            u16::from_ne_bytes(*ttl_and_proto),
            u16::from_ne_bytes(decremented),
        );
        *check = csum::updated(u16::from_ne_bytes(*check), diff).to_ne_bytes();
        *ttl_and_proto = decremented;
    }
    true
}
