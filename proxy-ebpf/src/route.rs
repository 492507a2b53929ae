//! Routing of packets whose source became one of the node's own addresses.
//!
//! After reverse NAT a NodePort reply leaves with the node address as its source, and so
//! do both directions of a hairpin flow through a NodePort. The
//! kernel's forwarding path drops such packets as martians (a forwarded packet must not
//! claim a local source), so the program does the forwarding step itself: a FIB lookup
//! for the client, a TTL decrement as the router would do, and a redirect to the egress
//! device with the kernel resolving the next hop's MAC (`bpf_redirect_neigh`).

use core::{mem::size_of, ptr};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, bpf_fib_lookup},
    cty::c_void,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};
use proxy_common::stat;

use crate::{
    parse::{L3_OFFSET, Packet},
    stats,
};

const AF_INET: u8 = 2;
/// Offsets within the IPv4 header.
const IPV4_TTL_OFFSET: usize = 8;
const IPV4_CSUM_OFFSET: usize = 10;

/// Forwards the already translated packet (now `src_addr:src_port` → `dst_addr`) towards
/// `dst_addr`. Falls back to the kernel (TC_ACT_OK) when the FIB has no answer or the TTL
/// is exhausted (the kernel then sends the ICMP error).
#[inline(always)]
pub fn redirect(
    ctx: &TcContext,
    packet: &Packet,
    src_addr: u32,
    src_port: u16,
    dst_addr: u32,
) -> i32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request skeleton.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = packet.proto;
    params.sport = src_port;
    params.dport = packet.dst_port;
    // SAFETY: `skb` is the program's context pointer.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = src_addr;
    params.__bindgen_anon_4.ipv4_dst = dst_addr;
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size passed.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut c_void,
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        stats::count(stat::FIB_MISS);
        return TC_ACT_OK;
    }
    if decrement_ttl(ctx).is_err() {
        return TC_ACT_OK;
    }
    // SAFETY: no neighbour parameters: the kernel resolves the next hop from the FIB.
    unsafe { bpf_redirect_neigh(params.ifindex, ptr::null_mut(), 0, 0) as i32 }
}

/// Decrements the TTL and fixes the header checksum; Err when it would reach zero.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), ()> {
    let ttl_and_proto: [u8; 2] = ctx.load(L3_OFFSET + IPV4_TTL_OFFSET).map_err(|_| ())?;
    let [ttl, protocol] = ttl_and_proto;
    if ttl <= 1 {
        return Err(());
    }
    let decremented = [ttl - 1, protocol];
    ctx.l3_csum_replace(
        L3_OFFSET + IPV4_CSUM_OFFSET,
        u16::from_ne_bytes(ttl_and_proto).into(),
        u16::from_ne_bytes(decremented).into(),
        size_of::<u16>() as u64,
    )
    .map_err(|_| ())?;
    ctx.store(L3_OFFSET + IPV4_TTL_OFFSET, &decremented, 0)
        .map_err(|_| ())
}
