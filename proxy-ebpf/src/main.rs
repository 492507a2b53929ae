//! The tc program `epx_ingress`: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (reply, then forward) → frontend lookup → backend selection →
//! conntrack create → DNAT. Anything that matches no flow and no frontend passes
//! untouched. One module per concern, like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
#![no_std]
#![no_main]
// Atomic adds on shared conntrack counters: the bpf target has no `AtomicU64::fetch_add`
// (no compare-and-swap), but LLVM lowers the intrinsic to the BPF atomic add.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for BPF atomic adds")]

mod conntrack;
mod csum;
mod lookup;
mod nat;
mod parse;
mod route;
mod select;
mod stats;

use core::num::NonZeroU16;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::stat;

use crate::parse::Packet;

/// Let the packet continue (translated or untouched).
const ACCEPT: i32 = TC_ACT_OK;
/// Drop the packet.
const DROP: i32 = TC_ACT_SHOT;

#[classifier]
pub fn epx_ingress(ctx: TcContext) -> i32 {
    let Some(packet) = parse::packet(&ctx) else {
        stats::count(stat::NOT_HANDLED);
        return ACCEPT;
    };
    // SAFETY: the helper has no preconditions.
    let now_ns = unsafe { bpf_ktime_get_ns() };

    if let Some(flow) = conntrack::reply_flow(&packet) {
        flow.record(&packet, ctx.len(), now_ns);
        let (addr, port) = flow.nat_target();
        let verdict = verdict(nat::to_frontend(&ctx, &packet, addr, port), stat::REPLY);
        if verdict == ACCEPT && flow.routes_reply() {
            return route::redirect_reply(&ctx, &packet, addr, port);
        }
        return verdict;
    }
    if let Some(flow) = conntrack::forward_flow(&packet) {
        // A SYN on a closing flow is the client reusing the port for a new connection:
        // it gets a fresh backend selection below.
        if !(packet.opens_connection && flow.is_closing()) {
            flow.record(&packet, ctx.len(), now_ns);
            let (addr, port) = flow.nat_target();
            return verdict(nat::to_backend(&ctx, &packet, addr, port), stat::CT_HIT);
        }
    }
    new_flow(&ctx, &packet, now_ns)
}

/// A packet without a flow: if it is addressed to a frontend, selects a backend,
/// records the flow and translates.
#[inline(always)]
fn new_flow(ctx: &TcContext, packet: &Packet, now_ns: u64) -> i32 {
    let Some(frontend) = lookup::frontend(packet) else {
        stats::count(stat::PASS);
        return ACCEPT;
    };
    let Some(count) = NonZeroU16::new(frontend.header.count) else {
        stats::count(stat::NO_BACKEND);
        return DROP;
    };
    stats::count(stat::CT_MISS);
    let slot = select::random_slot(count);
    let Some((backend_id, backend)) = lookup::backend(&frontend, slot) else {
        stats::count(stat::BACKEND_MISSING);
        return DROP;
    };
    if conntrack::create(packet, ctx.len(), now_ns, &frontend, backend_id, &backend).is_err() {
        stats::count(stat::CT_CREATE_FAILED);
    }
    verdict(
        nat::to_backend(ctx, packet, backend.addr, backend.port),
        stat::NEW_FLOW,
    )
}

/// Counts `translated` and accepts if the rewrite succeeded; counts the failure and
/// drops otherwise (a half-rewritten packet must not leave).
#[inline(always)]
fn verdict(rewrite: Result<(), c_long>, translated: u32) -> i32 {
    match rewrite {
        Ok(()) => {
            stats::count(translated);
            ACCEPT
        }
        Err(_) => {
            stats::count(stat::REWRITE_FAILED);
            DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
