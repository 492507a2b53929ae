//! FIB lookups: routing of packets whose source became one of the node's own addresses,
//! the egress MTU of translated packets, and the node's address toward a host.
//!
//! After reverse NAT a NodePort reply leaves with the node address as its source, and so
//! do both directions of an SNAT flow and of a hairpin flow through a NodePort. The
//! kernel's forwarding path drops such packets as martians (a forwarded packet must not
//! claim a local source), so the program does the forwarding step itself: a FIB lookup
//! for the destination, a TTL decrement as the router would do, and the packet handed to
//! the egress device by the context (tc: `bpf_redirect_neigh`, the kernel resolving the
//! next hop's MAC; XDP: the MACs from the FIB written in place, then XDP_TX or a redirect).
//! The same lookup, given the packet's length, tells whether it fits the egress device's
//! MTU (see `forwarding`).
//!
//! The next hop is found before the packet is rewritten (and before a new flow is
//! recorded), so a hook that cannot send the packet itself — XDP without the next hop's
//! MAC, or towards a device without native XDP — leaves it untouched to tc.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_fib_lookup,
    },
    helpers::bpf_fib_lookup as fib_lookup,
    macros::map,
    maps::PerCpuArray,
};
use proxy_common::Tuple;

use crate::{
    context::Context,
    family::Family,
    mode::Mode,
    parse::{self, L3_OFFSET},
    verdict::Verdict,
};

/// This CPU's lookup parameters: 64 bytes the packet path's stack has no room for. Each
/// lookup fills them anew; not pinned.
#[map]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Runs a FIB lookup: `fill` sets the request in zeroed parameters, `read` takes what it
/// needs from the result (return code and parameters).
#[inline(always)]
fn fib<C: Context, T>(
    ctx: &C,
    flags: u32,
    fill: impl FnOnce(&mut bpf_fib_lookup),
    read: impl FnOnce(i64, &bpf_fib_lookup) -> T,
) -> Option<T> {
    let params = FIB_PARAMS.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry, used only within this call (no preemption while the
    // program runs); an all-zero bpf_fib_lookup is a valid request skeleton.
    let params = unsafe {
        params.write_bytes(0, 1);
        &mut *params
    };
    fill(params);
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let found = unsafe { fib_lookup(ctx.raw(), params, size_of::<bpf_fib_lookup>() as i32, flags) };
    Some(read(found, params))
}

/// Where a packet leaves when the program routes it: the egress device and, when the
/// neighbour table knows it, the Ethernet addresses to use. Every field is always written
/// (no `Option` around it): the verifier refuses to read a register that was never set,
/// which an `Option`'s absent payload may compile to.
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

/// Where a packet of the tuple `to` goes, as the kernel's forwarding step would decide.
#[derive(Clone, Copy)]
pub enum Route {
    /// Out of this hop's device.
    Via(Hop),
    /// Larger than the route's MTU (which it names).
    TooBig { mtu: u16 },
    /// To this node: delivered, not forwarded.
    Local,
    /// No route (unreachable, blackhole, forwarding disabled on the arrival device, …).
    None,
}

/// A forwarding lookup for a packet of `proto` that now is `to`, as if it arrived on the
/// packet's device. `l3_len`: the IPv4 length of the largest packet it leaves as (a GSO
/// segment), checked against the route's MTU as the kernel's forwarding does; with 0 the
/// kernel checks the skb itself against the egress device's MTU instead.
#[inline(always)]
pub fn lookup<C: Context, A: Family>(ctx: &C, proto: u8, to: &Tuple<A>, l3_len: u16) -> Route {
    let ingress = ctx.ifindex();
    let route = fib(
        ctx,
        0,
        |params| {
            params.family = A::AF;
            params.l4_protocol = proto;
            params.sport = to.src_port;
            params.dport = to.dst_port;
            params.ifindex = ingress;
            params.__bindgen_anon_1.tot_len = l3_len;
            A::fib_addresses(params, to.src_addr, to.dst_addr);
        },
        |found, params| {
            let neighbour_known = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS);
            if neighbour_known || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
                Route::Via(Hop {
                    ifindex: params.ifindex,
                    neighbour_known,
                    smac: params.smac,
                    dmac: params.dmac,
                })
            } else if found == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) {
                // SAFETY: the kernel stores the route's MTU in the union when it says so.
                Route::TooBig {
                    mtu: unsafe { params.__bindgen_anon_1.mtu_result },
                }
            } else if found == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) {
                Route::Local
            } else {
                Route::None
            }
        },
    );
    route.unwrap_or(Route::None)
}

/// Sends the already translated packet on: to the kernel when `hop` is [`Hop::KERNEL`],
/// else out of `hop` (found by [`lookup`], accepted by the context's `can_send`) with the
/// TTL (hop limit) decremented as a router does; a dry run only records where. `None` when the TTL is
/// exhausted: the caller drops the packet (the error, where one is due, was sent before
/// the packet was translated).
#[inline(always)]
pub fn send<C: Context, M: Mode, A: Family>(ctx: &C, mode: &M, hop: &Hop) -> Option<Verdict> {
    if !hop.routed_here() {
        return Some(Verdict::Accept);
    }
    if M::DRY_RUN {
        mode.routes_itself(hop.ifindex);
        return Some(Verdict::Accept);
    }
    if !decrement_hop_limit::<C, A>(ctx) {
        return None;
    }
    Some(ctx.send(hop))
}

/// The node address a packet toward `addr` leaves with (`BPF_FIB_LOOKUP_SRC`, a
/// forwarding lookup from the arrival device), and the device it leaves by.
#[inline(always)]
pub fn source_toward<C: Context, A: Family>(
    ctx: &C,
    proto: u8,
    addr: A,
    port: u16,
) -> Option<(A, u32)> {
    let ingress = ctx.ifindex();
    fib(
        ctx,
        BPF_FIB_LOOKUP_SRC,
        |params| {
            params.family = A::AF;
            params.l4_protocol = proto;
            params.dport = port;
            params.ifindex = ingress;
            A::fib_addresses(params, A::default(), addr);
        },
        |found, params| {
            let routed = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
                || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
            // The lookup filled in the source (BPF_FIB_LOOKUP_SRC).
            let source = A::fib_source(params);
            (routed && source != A::default()).then_some((source, params.ifindex))
        },
    )
    .flatten()
}

/// Decrements the TTL or hop limit (fixing IPv4's header checksum); false when it would
/// reach zero.
#[inline(always)]
fn decrement_hop_limit<C: Context, A: Family>(ctx: &C) -> bool {
    let Some(ip) = parse::at(ctx, L3_OFFSET, A::HEADER_LEN) else {
        return false;
    };
    // SAFETY: the header was checked against data_end just above.
    unsafe { A::decrement_hop_limit(ip) }
}
