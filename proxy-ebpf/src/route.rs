//! FIB lookups: routing of packets whose source became one of the node's own addresses,
//! the egress MTU of translated packets, and the node's address toward a host.
//!
//! After reverse NAT a NodePort reply leaves with the node address as its source, and so
//! do both directions of an SNAT flow and of a hairpin flow through a NodePort. The
//! kernel's forwarding path drops such packets as martians (a forwarded packet must not
//! claim a local source), so the program does the forwarding step itself: a FIB lookup
//! for the destination, a TTL decrement as the router would do, and a redirect to the
//! egress device with the kernel resolving the next hop's MAC. The same lookup, given the
//! packet's length, tells whether it fits the egress device's MTU (see `forwarding`).

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
    csum,
    parse::{self, L3_OFFSET},
};

const AF_INET: u8 = 2;

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

/// Offsets within the IPv4 header.
const IPV4_TTL_OFFSET: usize = 8;
const IPV4_CSUM_OFFSET: usize = 10;

/// Where a packet of the tuple `to` goes, as the kernel's forwarding step would decide.
#[derive(Clone, Copy)]
pub enum Route {
    /// Out of this device.
    Via { ifindex: u32 },
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
pub fn lookup<C: Context>(ctx: &C, proto: u8, to: &Tuple, l3_len: u16) -> Route {
    let ingress = ctx.ifindex();
    let route = fib(
        ctx,
        0,
        |params| {
            params.family = AF_INET;
            params.l4_protocol = proto;
            params.sport = to.src_port;
            params.dport = to.dst_port;
            params.ifindex = ingress;
            params.__bindgen_anon_1.tot_len = l3_len;
            params.__bindgen_anon_3.ipv4_src = to.src_addr;
            params.__bindgen_anon_4.ipv4_dst = to.dst_addr;
        },
        |found, params| {
            if found == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
                || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
            {
                Route::Via {
                    ifindex: params.ifindex,
                }
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

/// Forwards the already translated packet out of `ifindex` (found by [`lookup`]): the TTL
/// decremented as a router does, the kernel resolving the next hop's MAC. `None` when the
/// TTL is exhausted (the caller drops; the error, where one is due, was sent before the
/// packet was translated).
#[inline(always)]
pub fn send<C: Context>(ctx: &C, ifindex: u32) -> Option<i32> {
    if !decrement_ttl(ctx) {
        return None;
    }
    Some(ctx.redirect_neigh(ifindex))
}

/// The node address a packet toward `addr` leaves with (`BPF_FIB_LOOKUP_SRC`, a
/// forwarding lookup from the arrival device), and the device it leaves by.
#[inline(always)]
pub fn source_toward<C: Context>(ctx: &C, proto: u8, addr: u32, port: u16) -> Option<(u32, u32)> {
    let ingress = ctx.ifindex();
    fib(
        ctx,
        BPF_FIB_LOOKUP_SRC,
        |params| {
            params.family = AF_INET;
            params.l4_protocol = proto;
            params.dport = port;
            params.ifindex = ingress;
            params.__bindgen_anon_4.ipv4_dst = addr;
        },
        |found, params| {
            let routed = found == i64::from(BPF_FIB_LKUP_RET_SUCCESS)
                || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH);
            // SAFETY: the lookup filled in the IPv4 source (BPF_FIB_LOOKUP_SRC).
            let source = unsafe { params.__bindgen_anon_3.ipv4_src };
            (routed && source != 0).then_some((source, params.ifindex))
        },
    )
    .flatten()
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
