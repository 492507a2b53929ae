//! The tc programs: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (reply, then forward) → frontend lookup → backend selection →
//! conntrack create → DNAT. Anything that matches no flow and no frontend passes
//! untouched. One module per concern, like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
//!
//! `epx_ingress` is the datapath. `epx_trace` runs the same path as a dry run for
//! `ebpf-proxy trace` (see [`mode`]); it is never attached.
#![no_std]
#![no_main]
// Atomic adds on shared conntrack counters: the bpf target has no `AtomicU64::fetch_add`
// (no compare-and-swap), but LLVM lowers the intrinsic to the BPF atomic add.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for BPF atomic adds")]

mod affinity;
mod conntrack;
mod csum;
mod lookup;
mod mode;
mod names;
mod nat;
mod parse;
mod reject;
mod route;
mod select;
mod snat;
mod source_ranges;
mod stats;

use core::num::NonZeroU16;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    helpers::bpf_ktime_get_ns,
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{service_flags, stat, trace_ct};

use crate::{
    lookup::Frontend,
    mode::{DryRun, Live, Mode},
    parse::Packet,
    reject::NotRefused,
};

/// Let the packet continue (translated or untouched).
const ACCEPT: i32 = TC_ACT_OK;
/// Drop the packet.
const DROP: i32 = TC_ACT_SHOT;

#[classifier]
pub fn epx_ingress(ctx: TcContext) -> i32 {
    balance(&ctx, &Live)
}

#[classifier]
pub fn epx_trace(ctx: TcContext) -> i32 {
    match DryRun::start() {
        Some(dry_run) => balance(&ctx, &dry_run),
        None => ACCEPT,
    }
}

#[inline(always)]
fn balance<M: Mode>(ctx: &TcContext, mode: &M) -> i32 {
    let Some(packet) = parse::packet(ctx) else {
        mode.count(stat::NOT_HANDLED);
        return ACCEPT;
    };
    // SAFETY: the helper has no preconditions.
    let now_ns = unsafe { bpf_ktime_get_ns() };

    if let Some(flow) = conntrack::reply_flow(&packet) {
        mode.flow_found(trace_ct::REPLY, &flow);
        if !M::DRY_RUN {
            flow.record(&packet, ctx.len(), now_ns);
        }
        let (addr, port) = flow.nat_target();
        let hairpin = flow.is_hairpin();
        let snat = flow.snat();
        let rewrite = nat::rewrite_source(ctx, &packet, addr, port).and_then(|()| {
            if hairpin {
                nat::hairpin_destination(ctx, &packet)
            } else if let Some((client_addr, client_port)) = snat {
                nat::rewrite_destination(ctx, &packet, client_addr, client_port)
            } else {
                Ok(())
            }
        });
        // A hairpin reply goes back to the backend itself, now its client; an SNAT reply
        // to the client the REPLY entry remembers.
        let client = match snat {
            Some((client_addr, _)) => client_addr,
            None if hairpin => packet.src_addr,
            None => packet.dst_addr,
        };
        let verdict = verdict(mode, rewrite, stat::REPLY);
        return send_on(
            ctx,
            mode,
            &packet,
            verdict,
            flow.routes_itself(),
            (addr, port),
            client,
        );
    }
    if let Some(flow) = conntrack::forward_flow(&packet) {
        // A SYN on a closing flow is the client reusing the port for a new connection:
        // it gets a fresh backend selection below.
        if !(packet.opens_connection && flow.is_closing()) {
            mode.flow_found(trace_ct::FORWARD, &flow);
            if !M::DRY_RUN {
                flow.record(&packet, ctx.len(), now_ns);
            }
            let (addr, port) = flow.nat_target();
            let snat = flow.snat();
            let verdict = verdict(
                mode,
                to_backend(ctx, &packet, addr, port, flow.is_hairpin(), snat),
                stat::CT_HIT,
            );
            let source = snat.unwrap_or((packet.dst_addr, packet.src_port));
            return send_on(
                ctx,
                mode,
                &packet,
                verdict,
                flow.routes_itself(),
                source,
                addr,
            );
        }
        mode.flow_found(trace_ct::CLOSING_REUSED, &flow);
    }
    new_flow(ctx, mode, &packet, now_ns)
}

/// A packet without a flow: if it is addressed to a frontend, selects a backend (the
/// client's previous one under session affinity, else a random one), records the flow and
/// translates.
#[inline(always)]
fn new_flow<M: Mode>(ctx: &TcContext, mode: &M, packet: &Packet, now_ns: u64) -> i32 {
    let Some(frontend) = lookup::frontend(packet) else {
        mode.count(stat::PASS);
        return ACCEPT;
    };
    mode.frontend_found(&frontend);
    if frontend.header.flags & service_flags::SOURCE_RANGES != 0
        && !source_ranges::admits(packet, &frontend)
    {
        mode.count(stat::SOURCE_RANGE_DENIED);
        return DROP;
    }
    let Some(count) = NonZeroU16::new(frontend.header.count) else {
        return without_backends(ctx, mode, packet, &frontend);
    };
    mode.count(stat::CT_MISS);
    let has_affinity = frontend.header.affinity_timeout_s != 0;
    let remembered = if has_affinity {
        affinity::remembered_backend(packet, &frontend, now_ns)
    } else {
        None
    };
    let (backend_id, backend) = match remembered {
        Some((backend_id, backend)) => {
            mode.count(stat::AFFINITY);
            mode.affinity_kept(backend_id, &backend);
            (backend_id, backend)
        }
        None => {
            let slot = select::random_slot(count);
            let Some((backend_id, backend)) = lookup::backend(&frontend, slot) else {
                mode.count(stat::BACKEND_MISSING);
                return DROP;
            };
            mode.backend_selected(slot, backend_id, &backend);
            (backend_id, backend)
        }
    };
    let hairpin = conntrack::is_hairpin(packet, &backend);
    // Outside traffic (not to a ClusterIP) for a backend on another node: SNAT.
    let snat_addr = if !hairpin && frontend.header.flags & service_flags::CLUSTER_IP == 0 {
        snat::source_for(ctx, packet, &backend)
    } else {
        None
    };
    let snat = if M::DRY_RUN {
        // Nothing is claimed in a dry run: a port of the range is shown.
        snat_addr.map(|addr| (addr, snat::port(snat::random_start(), 0)))
    } else {
        if has_affinity {
            affinity::remember(packet, &frontend, backend_id, now_ns);
        }
        match conntrack::create(
            packet,
            ctx.len(),
            now_ns,
            &frontend,
            backend_id,
            &backend,
            snat_addr,
        ) {
            Ok(created) => {
                if !created.complete {
                    mode.count(stat::CT_CREATE_FAILED);
                }
                created.snat
            }
            Err(conntrack::NoSnatPort) => {
                mode.count(stat::SNAT_FAILED);
                return DROP;
            }
        }
    };
    let verdict = verdict(
        mode,
        to_backend(ctx, packet, backend.addr, backend.port, hairpin, snat),
        stat::NEW_FLOW,
    );
    // Hairpin through a NodePort, or SNAT: the source became the node's own address.
    let routes_itself =
        snat.is_some() || (hairpin && frontend.header.flags & service_flags::NODE_PORT != 0);
    let source = snat.unwrap_or((packet.dst_addr, packet.src_port));
    send_on(
        ctx,
        mode,
        packet,
        verdict,
        routes_itself,
        source,
        backend.addr,
    )
}

/// Lets an accepted, translated packet (now `source` → `destination`) go on. When its
/// source became one of the node's own addresses (`routes_itself`: a NodePort reply, or a
/// hairpin through a NodePort) the kernel would drop it as a martian, so the program
/// routes it itself.
#[inline(always)]
fn send_on<M: Mode>(
    ctx: &TcContext,
    mode: &M,
    packet: &Packet,
    verdict: i32,
    routes_itself: bool,
    source: (u32, u16),
    destination: u32,
) -> i32 {
    if verdict != ACCEPT || !routes_itself {
        return verdict;
    }
    if M::DRY_RUN {
        mode.routes_reply();
        return verdict;
    }
    let (src_addr, src_port) = source;
    route::redirect(ctx, packet, src_addr, src_port, destination)
}

/// DNAT to the backend, and for a hairpin flow also the source to the frontend address,
/// for an SNAT flow the source to `snat` (node address, port).
#[inline(always)]
fn to_backend(
    ctx: &TcContext,
    packet: &Packet,
    addr: u32,
    port: u16,
    hairpin: bool,
    snat: Option<(u32, u16)>,
) -> Result<(), c_long> {
    nat::rewrite_destination(ctx, packet, addr, port)?;
    if hairpin {
        nat::hairpin_source(ctx, packet)?;
    }
    if let Some((snat_addr, snat_port)) = snat {
        nat::rewrite_source(ctx, packet, snat_addr, snat_port)?;
    }
    Ok(())
}

/// A packet for a frontend without backends: dropped when only its traffic policy left
/// none on this node, otherwise refused at once (kube-proxy's DROP and REJECT).
#[inline(always)]
fn without_backends<M: Mode>(
    ctx: &TcContext,
    mode: &M,
    packet: &Packet,
    frontend: &Frontend,
) -> i32 {
    if frontend.header.flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
        mode.count(stat::NO_BACKEND);
        return DROP;
    }
    match reject::port_unreachable(ctx, packet, !M::DRY_RUN) {
        Ok(verdict) => {
            mode.count(stat::REJECTED);
            verdict
        }
        Err(NotRefused::RateLimited) => {
            mode.count(stat::REJECT_RATE_LIMITED);
            DROP
        }
        Err(NotRefused::IpOptions) => {
            mode.count(stat::NO_BACKEND);
            DROP
        }
        Err(NotRefused::HelperFailed) => {
            mode.count(stat::REWRITE_FAILED);
            DROP
        }
    }
}

/// Counts `translated` and accepts if the rewrite succeeded; counts the failure and
/// drops otherwise (a half-rewritten packet must not leave).
#[inline(always)]
fn verdict<M: Mode>(mode: &M, rewrite: Result<(), c_long>, translated: u32) -> i32 {
    match rewrite {
        Ok(()) => {
            mode.count(translated);
            ACCEPT
        }
        Err(_) => {
            mode.count(stat::REWRITE_FAILED);
            DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
