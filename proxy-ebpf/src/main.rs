//! The tc programs: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (one lookup, either direction) → frontend lookup → backend selection
//! → conntrack create → NAT. A packet to no frontend is checked for being the answer of a
//! flow not yet assured, or part of a direct flow to a backend (tracked so that Service
//! flows never clash with it); anything else passes untouched. One module per concern,
//! like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
//!
//! `epx_ingress` is the datapath. `epx_trace` runs the same path as a dry run for
//! `ebpf-proxy trace` (see [`mode`]); `epx_ct_reap` removes finished flows for the
//! daemon's garbage collector. Neither of those two is ever attached.
//!
//! The cgroup programs (`epx_connect4`, `epx_sendmsg4`, `epx_recvmsg4`,
//! `epx_getpeername4`, `epx_sock_release`) balance at the socket instead, with the same
//! lookups (see [`sock`]); `epx_connect4_trace` is `connect4`'s dry run.
#![no_std]
#![no_main]
// Atomic operations on shared conntrack entries: the bpf target has no `AtomicU64`
// methods, but LLVM lowers the intrinsics to BPF atomic instructions.
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics for BPF atomics")]

mod affinity;
mod conntrack;
mod context;
mod csum;
mod devices;
mod lb;
mod membership;
mod mode;
mod names;
mod nat;
mod parse;
mod reap;
mod reject;
mod route;
mod select;
mod snat;
mod sock;
mod source_ranges;
mod stats;

use core::num::NonZeroU16;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_long,
    macros::{cgroup_sock, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, SockContext, TcContext},
};
use proxy_common::{BackendSet, Translation, Tuple, ct_flags, service_flags, stat};

use crate::{
    conntrack::{Followed, Hit, NotCreated, Now, Table},
    context::Context,
    lb::{Client, Frontend, LbKey},
    mode::{DryRun, Live, Mode},
    parse::Packet,
    reject::NotRefused,
    sock::{Call, Sock},
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

#[classifier]
pub fn epx_ct_reap(ctx: TcContext) -> i32 {
    reap::batch(&ctx) as i32
}

#[cgroup_sock_addr(connect4)]
pub fn epx_connect4(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward(&Sock::new(&ctx), &Live, Call::Connect))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn epx_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward(&Sock::new(&ctx), &Live, Call::SendMsg))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn epx_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&Sock::new(&ctx), &Live);
    sock::PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn epx_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&Sock::new(&ctx), &Live);
    sock::PROCEED
}

#[cgroup_sock(sock_release)]
pub fn epx_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx);
    sock::PROCEED
}

#[cgroup_sock_addr(connect4)]
pub fn epx_connect4_trace(ctx: SockAddrContext) -> i32 {
    let sock = Sock::new(&ctx);
    if let Some(dry_run) = DryRun::start() {
        sock::forward(&sock, &dry_run, Call::Connect);
    }
    sock::abandon(&sock, proxy_common::TRACE_ERRNO)
}

#[inline(always)]
fn balance<C: Context, M: Mode>(ctx: &C, mode: &M) -> i32 {
    let Some(packet) = parse::packet(ctx) else {
        mode.count(stat::NOT_HANDLED);
        return ACCEPT;
    };
    let now = Now::read();
    let key = packet.key();
    let len = ctx.len();
    // An assured flow, in either direction: one lookup.
    if let Some(entry) = Table::Assured.get(&key)
        && let Followed::Hit(hit) = conntrack::follow(entry, &key, &packet, len, now, mode)
    {
        return apply(ctx, mode, &packet, &hit);
    }
    let destination = LbKey::destination(&packet);
    if let Some(frontend) = lb::frontend(&destination) {
        // A flow of this frontend not yet assured (a retransmitted SYN, the handshake's
        // last ACK, a UDP flow before it became a stream), or a new one.
        if let Some(entry) = Table::Pending.get(&key)
            && let Followed::Hit(hit) = conntrack::follow(entry, &key, &packet, len, now, mode)
        {
            return apply(ctx, mode, &packet, &hit);
        }
        return new_flow(ctx, mode, &packet, &frontend, now);
    }
    // To no frontend: the first answer of a pending flow, a packet of a direct flow to a
    // backend, or nothing of ours.
    let answer = packet.may_answer();
    if answer
        && let Some(entry) = Table::Pending.get(&key)
        && let Followed::Hit(hit) = conntrack::follow(entry, &key, &packet, len, now, mode)
    {
        return apply(ctx, mode, &packet, &hit);
    }
    if lb::is_backend(&destination) {
        if !answer
            && let Some(entry) = Table::Pending.get(&key)
            && let Followed::Hit(hit) = conntrack::follow(entry, &key, &packet, len, now, mode)
        {
            return apply(ctx, mode, &packet, &hit);
        }
        return direct_flow(ctx, mode, &packet, now);
    }
    mode.count(stat::PASS);
    ACCEPT
}

/// A conntrack hit: rewrites the packet to the entry's tuple.
#[inline(always)]
fn apply<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet, hit: &Hit) -> i32 {
    let counter = if hit.flags & ct_flags::DIRECT != 0 {
        stat::DIRECT
    } else if hit.flags & ct_flags::REPLY != 0 {
        stat::REPLY
    } else {
        stat::CT_HIT
    };
    let verdict = verdict(mode, nat::rewrite(ctx, packet, &hit.to), counter);
    send_on(
        ctx,
        mode,
        packet,
        verdict,
        hit.flags & ct_flags::ROUTES_ITSELF != 0,
        &hit.to,
    )
}

/// A packet to a frontend without a flow: selects a backend (the client's previous one
/// under session affinity, else a random one) among the set its origin reaches, records
/// the flow and translates.
#[inline(always)]
fn new_flow<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    frontend: &Frontend,
    now: Now,
) -> i32 {
    mode.frontend_found(frontend);
    let flags = frontend.header.flags;
    if flags & service_flags::SOURCE_RANGES != 0
        && !source_ranges::admits(packet.src_addr, frontend)
    {
        mode.count(stat::SOURCE_RANGE_DENIED);
        return DROP;
    }
    let set = lb::backends_for(frontend, || {
        let origin = devices::origin_of(ctx.ifindex());
        mode.origin_found(origin);
        origin
    });
    mode.set_chosen(&set);
    let Some(count) = NonZeroU16::new(set.count) else {
        return without_backends(ctx, mode, packet, &set);
    };
    mode.count(stat::CT_MISS);
    let client = Client::Address(packet.src_addr);
    let Some((backend_id, backend)) =
        mode.chosen(lb::select_backend(frontend, &set, count, client, now.ns))
    else {
        return DROP;
    };
    let snat_source = if Translation::may_snat(flags, &set, packet.src_addr, backend.addr) {
        snat::source_for(ctx, &backend)
    } else {
        None
    };
    let mut translation = Translation::service(
        packet.proto,
        (packet.src_addr, packet.src_port),
        (packet.dst_addr, packet.dst_port),
        flags,
        frontend.header.rev_nat_id,
        (backend.addr, backend.port),
        backend_id,
        snat_source,
    );
    if M::DRY_RUN {
        // Nothing is claimed in a dry run: a port of the range is shown.
        if translation.needs_port() {
            translation.set_peer_port(snat::port(snat::random_start(), 0));
        }
    } else {
        if frontend.header.affinity_timeout_s != 0 {
            affinity::remember(client, frontend, backend_id, &backend, now.ns);
        }
        if let Err(refused) = create(mode, &mut translation, packet, ctx.len(), now) {
            return refused;
        }
    }
    let to = translation.reply.reversed();
    let verdict = verdict(mode, nat::rewrite(ctx, packet, &to), stat::NEW_FLOW);
    send_on(
        ctx,
        mode,
        packet,
        verdict,
        translation.forward_routes_itself,
        &to,
    )
}

/// A packet straight to a backend that belongs to no tracked flow: starts tracking the
/// direct flow, so no Service flow is created over its reply tuple. If a live Service flow
/// holds that tuple already, the direct flow's source port is remapped instead.
#[inline(always)]
fn direct_flow<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet, now: Now) -> i32 {
    let mut translation = Translation::direct(
        packet.proto,
        (packet.src_addr, packet.src_port),
        (packet.dst_addr, packet.dst_port),
    );
    if !M::DRY_RUN
        && let Err(refused) = create(mode, &mut translation, packet, ctx.len(), now)
    {
        return refused;
    }
    let to = translation.reply.reversed();
    verdict(mode, nat::rewrite(ctx, packet, &to), stat::DIRECT)
}

/// Records a new flow; on failure, the verdict for its packet (counted).
#[inline(always)]
fn create<M: Mode>(
    mode: &M,
    translation: &mut Translation,
    packet: &Packet,
    len: u32,
    now: Now,
) -> Result<(), i32> {
    match conntrack::create(translation, packet, len, now) {
        Ok(()) => {
            if translation.kind & ct_flags::REMAPPED != 0 {
                mode.count(stat::REMAPPED);
            }
            Ok(())
        }
        Err(NotCreated::NoPort) => {
            mode.count(stat::SNAT_FAILED);
            Err(DROP)
        }
        Err(NotCreated::Busy) => {
            mode.count(stat::CT_CREATE_FAILED);
            Err(DROP)
        }
    }
}

/// Lets an accepted, translated packet (now `to`) go on. When its source became one of
/// the node's own addresses (`routes_itself`) the kernel would drop it as a martian, so
/// the program routes it itself.
#[inline(always)]
fn send_on<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    verdict: i32,
    routes_itself: bool,
    to: &Tuple,
) -> i32 {
    if verdict != ACCEPT || !routes_itself {
        return verdict;
    }
    if M::DRY_RUN {
        mode.routes_itself();
        return verdict;
    }
    route::redirect(ctx, packet.proto, to)
}

/// A packet for a frontend whose set of backends is empty: dropped when only its traffic
/// policy left none on this node, otherwise refused at once (kube-proxy's DROP and
/// REJECT).
#[inline(always)]
fn without_backends<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    set: &BackendSet,
) -> i32 {
    if set.drops_when_empty {
        mode.count(stat::NO_BACKEND);
        return DROP;
    }
    match ctx.refuse(packet, !M::DRY_RUN) {
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
