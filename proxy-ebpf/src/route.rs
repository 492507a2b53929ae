//! Routing of packets whose source became one of the node's own addresses.
//!
//! After reverse NAT a NodePort reply leaves with the node address as its source, and so
//! do both directions of an SNAT flow and of a hairpin flow through a NodePort. The
//! kernel's forwarding path drops such packets as martians (a forwarded packet must not
//! claim a local source), so the program does the forwarding step itself: a FIB lookup
//! for the destination, a TTL decrement as the router would do, and a redirect to the
//! egress device with the kernel resolving the next hop's MAC.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup},
    helpers::bpf_fib_lookup as fib_lookup,
};
use proxy_common::{Tuple, stat};

use crate::{
    context::Context,
    csum,
    parse::{self, L3_OFFSET},
    stats,
};

const AF_INET: u8 = 2;
/// Offsets within the IPv4 header.
const IPV4_TTL_OFFSET: usize = 8;
const IPV4_CSUM_OFFSET: usize = 10;

/// Forwards the already translated packet (now `to`) towards its destination. Falls back
/// to the kernel (TC_ACT_OK) when the FIB has no answer or the TTL is exhausted (the kernel
/// then sends the ICMP error).
#[inline(always)]
pub fn redirect<C: Context>(ctx: &C, proto: u8, to: &Tuple) -> i32 {
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
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        stats::count(stat::FIB_MISS);
        return TC_ACT_OK as i32;
    }
    if !decrement_ttl(ctx) {
        return TC_ACT_OK as i32;
    }
    ctx.redirect_neigh(params.ifindex)
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
