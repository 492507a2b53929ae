//! The tc and XDP programs: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (one lookup, either direction) → frontend lookup → backend selection
//! → conntrack create → NAT. A packet to no frontend is checked for being the answer of a
//! flow not yet assured, or part of a direct flow to a backend (tracked so that Service
//! flows never clash with it); anything else passes untouched. One module per concern,
//! like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
//!
//! `epx_ingress` is the datapath at tc ingress of every device; `epx_xdp` runs the same
//! path at XDP on the external devices, in front of it (see [`xdp`]). `epx_trace` and
//! `epx_xdp_trace` run them as dry runs for `ebpf-proxy trace` (see [`mode`]);
//! `epx_ct_reap` removes finished flows for the daemon's garbage collector. Those three are
//! never attached.
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
mod maglev;
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
mod verdict;
mod xdp;

use core::num::NonZeroU16;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use proxy_common::{BackendSet, CtKey, Translation, Tuple, ct_flags, service_flags, stat, to_tc};

use crate::{
    conntrack::{Entry, Followed, NotCreated, Now, Table},
    context::Context,
    lb::{Client, Frontend, LbKey, Selection},
    mode::{DryRun, Live, Mode},
    parse::Packet,
    reject::NotRefused,
    route::Hop,
    sock::{Call, Sock},
    verdict::Verdict,
};

#[classifier]
pub fn epx_ingress(ctx: TcContext) -> i32 {
    if xdp::decided(&ctx) {
        return TC_ACT_OK;
    }
    tc_action(balance(&ctx, &Live))
}

#[classifier]
pub fn epx_trace(ctx: TcContext) -> i32 {
    match DryRun::start() {
        Some(dry_run) => tc_action(balance(&ctx, &dry_run)),
        None => TC_ACT_OK,
    }
}

#[xdp]
pub fn epx_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx, &Live, || balance(&ctx, &Live))
}

#[xdp]
pub fn epx_xdp_trace(ctx: XdpContext) -> u32 {
    match DryRun::start() {
        Some(dry_run) => xdp::run(&ctx, &dry_run, || balance(&ctx, &dry_run)),
        None => aya_ebpf::bindings::xdp_action::XDP_PASS,
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

/// The tc action for a verdict (tc never leaves a packet to itself).
#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Accept | Verdict::ToTc(_) => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Sent(action) => action,
    }
}

#[inline(always)]
fn balance<C: Context, M: Mode>(ctx: &C, mode: &M) -> Verdict {
    let Some(packet) = parse::packet(ctx) else {
        if C::IS_XDP {
            return Verdict::ToTc(to_tc::NOT_HANDLED);
        }
        mode.count(stat::NOT_HANDLED);
        return Verdict::Accept;
    };
    let now = Now::read();
    let key = packet.key();
    // An assured flow, in either direction: one lookup.
    if let Some(entry) = Table::Assured.get(&key)
        && let Some(verdict) = tracked(ctx, mode, entry, &key, &packet, now)
    {
        return verdict;
    }
    let destination = LbKey::destination(&packet);
    if let Some(frontend) = lb::frontend(&destination) {
        // A flow of this frontend not yet assured (a retransmitted SYN, the handshake's
        // last ACK, a UDP flow before it became a stream), or a new one.
        if let Some(entry) = Table::Pending.get(&key)
            && let Some(verdict) = tracked(ctx, mode, entry, &key, &packet, now)
        {
            return verdict;
        }
        return new_flow(ctx, mode, &packet, &frontend, now);
    }
    // To no frontend: the first answer of a pending flow, a packet of a direct flow to a
    // backend, or nothing of ours.
    let answer = packet.may_answer();
    if answer
        && let Some(entry) = Table::Pending.get(&key)
        && let Some(verdict) = tracked(ctx, mode, entry, &key, &packet, now)
    {
        return verdict;
    }
    if lb::is_backend(&destination) {
        if !answer
            && let Some(entry) = Table::Pending.get(&key)
            && let Some(verdict) = tracked(ctx, mode, entry, &key, &packet, now)
        {
            return verdict;
        }
        return direct_flow(ctx, mode, &packet, now);
    }
    mode.count(stat::PASS);
    Verdict::Accept
}

/// A packet whose tuple has a conntrack `entry`: rewritten to the entry's tuple, unless the
/// flow is over or must select again (`None`: go on as without the entry).
#[inline(always)]
fn tracked<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    entry: Entry,
    key: &CtKey,
    packet: &Packet,
    now: Now,
) -> Option<Verdict> {
    // The entry's tuple and flags never change while it lives: where the packet will go is
    // known before the flow accounts it (XDP may still leave it to tc untouched).
    let seen = entry.value();
    let routes_itself = seen.flags & ct_flags::ROUTES_ITSELF != 0;
    let hop = match hop(ctx, mode, packet, routes_itself, &seen.to) {
        Ok(hop) => hop,
        Err(verdict) => return Some(verdict),
    };
    // XDP leaves a flow that must select again to tc: retiring its entry and then leaving
    // the new flow to tc (a refusal, an unknown neighbour) would not leave tc the packet
    // untouched with nothing recorded.
    let hit = match conntrack::follow(entry, key, packet, ctx.len(), now, mode, !C::IS_XDP) {
        Followed::Hit(hit) => hit,
        Followed::ReselectElsewhere => return Some(Verdict::ToTc(to_tc::RESELECT)),
        Followed::Reselect | Followed::Gone => return None,
    };
    let counter = if hit.flags & ct_flags::DIRECT != 0 {
        stat::DIRECT
    } else if hit.flags & ct_flags::REPLY != 0 {
        stat::REPLY
    } else {
        stat::CT_HIT
    };
    Some(translate(
        ctx,
        mode,
        packet,
        &hit.to,
        counter,
        routes_itself,
        hop,
    ))
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
) -> Verdict {
    mode.frontend_found(frontend);
    let flags = frontend.header.flags;
    if flags & service_flags::SOURCE_RANGES != 0
        && !source_ranges::admits(packet.src_addr, frontend)
    {
        mode.count(stat::SOURCE_RANGE_DENIED);
        return Verdict::Drop;
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
    let client = Client::Address(packet.src_addr);
    let flow = maglev::Flow {
        addr: packet.src_addr,
        port: packet.src_port,
        proto: packet.proto,
    };
    let selection = lb::select_backend(frontend, &set, count, client, Some(flow), now.ns);
    let (backend_id, backend) = match selection {
        Selection::Affinity { id, backend } | Selection::Slot { id, backend, .. } => (id, backend),
        Selection::Missing => {
            mode.count(stat::CT_MISS);
            mode.chosen(selection);
            return Verdict::Drop;
        }
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
    // The route before anything is recorded, so XDP can still leave the packet to tc. An
    // SNAT port claimed below changes only the source port, which routes do not look at.
    let hop = match hop(
        ctx,
        mode,
        packet,
        translation.forward_routes_itself,
        &translation.reply.reversed(),
    ) {
        Ok(hop) => hop,
        Err(verdict) => return verdict,
    };
    mode.count(stat::CT_MISS);
    mode.chosen(selection);
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
    let routes_itself = translation.forward_routes_itself;
    translate(ctx, mode, packet, &to, stat::NEW_FLOW, routes_itself, hop)
}

/// A packet straight to a backend that belongs to no tracked flow: starts tracking the
/// direct flow, so no Service flow is created over its reply tuple. If a live Service flow
/// holds that tuple already, the direct flow's source port is remapped instead.
#[inline(always)]
fn direct_flow<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet, now: Now) -> Verdict {
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
    translate(ctx, mode, packet, &to, stat::DIRECT, false, Hop::KERNEL)
}

/// Records a new flow; on failure, the verdict for its packet (counted).
#[inline(always)]
fn create<M: Mode>(
    mode: &M,
    translation: &mut Translation,
    packet: &Packet,
    len: u32,
    now: Now,
) -> Result<(), Verdict> {
    match conntrack::create(translation, packet, len, now) {
        Ok(()) => {
            if translation.kind & ct_flags::REMAPPED != 0 {
                mode.count(stat::REMAPPED);
            }
            Ok(())
        }
        Err(NotCreated::NoPort) => {
            mode.count(stat::SNAT_FAILED);
            Err(Verdict::Drop)
        }
        Err(NotCreated::Busy) => {
            mode.count(stat::CT_CREATE_FAILED);
            Err(Verdict::Drop)
        }
    }
}

/// Where a packet that will leave as `to` goes when its source becomes one of the node's
/// own addresses (`routes_itself`): the kernel would drop it as a martian, so the program
/// routes it itself (see [`route`]). [`Hop::KERNEL`]: the kernel routes it.
#[inline(always)]
fn hop<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    routes_itself: bool,
    to: &Tuple,
) -> Result<Hop, Verdict> {
    if !routes_itself {
        return Ok(Hop::KERNEL);
    }
    route::hop_for(ctx, mode, packet.proto, to)
}

/// Rewrites the packet to `to`, counts `translated`, and sends it to `hop` unless that is
/// [`Hop::KERNEL`]; a failed rewrite is counted and dropped (a half-rewritten packet must
/// not leave). `routes_itself`: the packet's source became a node address (for the trace).
#[inline(always)]
fn translate<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    to: &Tuple,
    translated: u32,
    routes_itself: bool,
    hop: Hop,
) -> Verdict {
    if nat::rewrite(ctx, packet, to).is_err() {
        mode.count(stat::REWRITE_FAILED);
        return Verdict::Drop;
    }
    mode.count(translated);
    if M::DRY_RUN {
        if routes_itself {
            mode.routes_itself(hop.ifindex);
        }
        return Verdict::Accept;
    }
    if hop.routed_here() {
        route::forward(ctx, &hop)
    } else {
        Verdict::Accept
    }
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
) -> Verdict {
    if set.drops_when_empty {
        mode.count(stat::NO_BACKEND);
        return Verdict::Drop;
    }
    match ctx.refuse(packet, !M::DRY_RUN) {
        Ok(Verdict::ToTc(reason)) => Verdict::ToTc(reason),
        Ok(verdict) => {
            mode.count(stat::REJECTED);
            verdict
        }
        Err(NotRefused::RateLimited) => {
            mode.count(stat::REJECT_RATE_LIMITED);
            Verdict::Drop
        }
        Err(NotRefused::IpOptions) => {
            mode.count(stat::NO_BACKEND);
            Verdict::Drop
        }
        Err(NotRefused::HelperFailed) => {
            mode.count(stat::REWRITE_FAILED);
            Verdict::Drop
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
