//! The tc programs: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (one lookup, either direction) → frontend lookup → backend selection
//! → conntrack create → forwarding checks → NAT. A packet to no frontend is checked for
//! being the answer of a flow not yet assured, or part of a direct flow to a backend
//! (tracked so that Service flows never clash with it); anything else passes untouched.
//! A later fragment follows its datagram's first fragment (`fragment`), an ICMP error
//! about a tracked flow is translated as the flow is (`icmp_error`). One module per
//! concern, like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
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
mod answer;
mod conntrack;
mod context;
mod csum;
mod devices;
mod forwarding;
mod fragment;
mod icmp_error;
mod lb;
mod membership;
mod mode;
mod names;
mod nat;
mod parse;
mod reap;
mod route;
mod select;
mod snat;
mod sock;
mod source_ranges;
mod stats;

use core::num::NonZeroU16;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{cgroup_sock, cgroup_sock_addr, classifier},
    programs::{SockAddrContext, SockContext, TcContext},
};
use proxy_common::{Translation, Tuple, ct_flags, service_flags, stat};

use crate::{
    answer::{Answer, NotAnswered},
    conntrack::{Followed, Hit, NotCreated, Now, Table},
    context::Context,
    forwarding::{Checked, Egress},
    fragment::Fate,
    lb::{Client, Frontend, LbKey},
    mode::{DryRun, Live, Mode},
    parse::{Packet, Parsed},
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
    match parse::packet(ctx) {
        Parsed::Packet(packet) => service_path(ctx, mode, &packet),
        Parsed::LaterFragment(fragment) => fragment::follow(ctx, mode, &fragment),
        Parsed::Icmp { l4_offset } => icmp_error::translate(ctx, mode, l4_offset),
        Parsed::NotHandled => {
            mode.count(stat::NOT_HANDLED);
            ACCEPT
        }
    }
}

/// What the packet path decided for a TCP/UDP packet ([`decide`]), carried out by
/// [`service_path`]. A struct with every field set, not an enum with data: LLVM leaves the
/// unused payload of an enum undefined, and the verifier refuses to store a register that
/// holds a pointer there.
#[derive(Clone, Copy)]
struct Decision {
    action: Action,
    /// [`Action::Translate`]: the counter that names what happened; [`Action::Create`]:
    /// the one the packet counts in once the flow is recorded.
    counter: u32,
    /// [`Action::Translate`]: the tuple to rewrite the packet to.
    to: Tuple,
    /// [`Action::Translate`]: its source becomes a node address, so the program forwards
    /// it (the kernel would drop it as a martian).
    routes_itself: bool,
    /// [`Action::Create`]: the new flow.
    flow: Translation,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Rewrite it and send it on.
    Translate,
    /// Record the new flow, then translate it.
    Create,
    /// Refuse it with an ICMP port unreachable (a frontend without endpoints).
    Refuse,
    /// Drop it (counted where that was decided).
    Drop,
    /// Nothing of ours: it passes untouched.
    Pass,
}

impl Decision {
    #[inline(always)]
    fn translate(to: Tuple, routes_itself: bool, counter: u32) -> Self {
        Self {
            counter,
            to,
            routes_itself,
            ..Self::only(Action::Translate)
        }
    }

    #[inline(always)]
    fn create(flow: Translation, counter: u32) -> Self {
        Self {
            counter,
            flow,
            ..Self::only(Action::Create)
        }
    }

    #[inline(always)]
    fn only(action: Action) -> Self {
        Self {
            action,
            counter: stat::PASS,
            to: Tuple::default(),
            routes_itself: false,
            flow: Translation::default(),
        }
    }
}

/// A TCP/UDP packet (or a datagram's first fragment): decided, then carried out. The
/// decision's many paths meet here, so what follows them — recording a new flow, the
/// forwarding checks, the rewrite, the fragment record — exists once, and the verifier
/// walks it once per kind of decision rather than once per path that led to it (a new
/// flow's record, with its claim of a reply tuple, would otherwise be walked for every
/// way a packet can miss conntrack).
#[inline(always)]
fn service_path<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet) -> i32 {
    let now = Now::read();
    let mut decision = decide(ctx, mode, packet, &now);
    if decision.action == Action::Create {
        decision = create(
            mode,
            &mut decision.flow,
            packet,
            ctx.len(),
            &now,
            decision.counter,
        );
    }
    let (verdict, fate) = match decision.action {
        Action::Translate => translate(ctx, mode, packet, &decision),
        Action::Refuse => refuse(ctx, mode, packet),
        // `create` leaves no Create behind.
        Action::Drop | Action::Create => (DROP, Fate::dropped()),
        Action::Pass => {
            mode.count(stat::PASS);
            (ACCEPT, Fate::forward(packet.tuple(), false))
        }
    };
    fragment::remember(mode, packet, &fate);
    verdict
}

/// Decides what becomes of `packet`: a tracked flow's translation, a new flow, or none.
/// A BPF subprogram: its lookups take a stack frame of their own, which is gone by the
/// time the flow is recorded and the packet rewritten (the chain of frames must stay
/// within 512 bytes).
#[inline(never)]
fn decide<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet, now: &Now) -> Decision {
    let now = *now;
    let key = packet.key();
    let len = ctx.len();
    // An assured flow, in either direction: one lookup.
    if let Some(entry) = Table::Assured.get(&key)
        && let Followed::Hit(hit) = conntrack::follow(entry, &key, packet, len, now, mode)
    {
        return tracked(&hit);
    }
    let destination = LbKey::destination(packet);
    let frontend = lb::frontend(&destination);
    // A flow not yet assured: of a frontend (a retransmitted SYN, the handshake's last
    // ACK, a UDP flow before it became a stream), the first answer of one, or a direct
    // flow to a backend. Anything else to no frontend is nothing of ours.
    let mut to_backend = None;
    let may_be_pending = frontend.is_some() || packet.may_answer() || {
        let is_backend = lb::is_backend(&destination);
        to_backend = Some(is_backend);
        is_backend
    };
    if may_be_pending
        && let Some(entry) = Table::Pending.get(&key)
        && let Followed::Hit(hit) = conntrack::follow(entry, &key, packet, len, now, mode)
    {
        return tracked(&hit);
    }
    if let Some(frontend) = frontend {
        return new_flow(ctx, mode, packet, &frontend, now);
    }
    if to_backend.unwrap_or_else(|| lb::is_backend(&destination)) {
        // A packet straight to a backend that belongs to no tracked flow: the direct flow
        // is tracked, so no Service flow is created over its reply tuple. If a live
        // Service flow holds that tuple already, its source port is remapped instead.
        let flow = Translation::direct(
            packet.proto,
            (packet.src_addr, packet.src_port),
            (packet.dst_addr, packet.dst_port),
        );
        return Decision::create(flow, stat::DIRECT);
    }
    Decision::only(Action::Pass)
}

/// A conntrack hit: the packet is rewritten to the entry's tuple.
#[inline(always)]
fn tracked(hit: &Hit) -> Decision {
    let counter = if hit.flags & ct_flags::DIRECT != 0 {
        stat::DIRECT
    } else if hit.flags & ct_flags::REPLY != 0 {
        stat::REPLY
    } else {
        stat::CT_HIT
    };
    Decision::translate(hit.to, hit.flags & ct_flags::ROUTES_ITSELF != 0, counter)
}

/// A packet to a frontend without a flow: selects a backend (the client's previous one
/// under session affinity, else a random one) among the set its origin reaches, for the
/// new flow.
#[inline(always)]
fn new_flow<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    frontend: &Frontend,
    now: Now,
) -> Decision {
    mode.frontend_found(frontend);
    let flags = frontend.header.flags;
    if flags & service_flags::SOURCE_RANGES != 0
        && !source_ranges::admits(packet.src_addr, frontend)
    {
        mode.count(stat::SOURCE_RANGE_DENIED);
        return Decision::only(Action::Drop);
    }
    let set = lb::backends_for(frontend, || {
        let origin = devices::origin_of(ctx.ifindex());
        mode.origin_found(origin);
        origin
    });
    mode.set_chosen(&set);
    let Some(count) = NonZeroU16::new(set.count) else {
        // Dropped when only its traffic policy left none on this node, otherwise refused
        // at once (kube-proxy's DROP and REJECT).
        if set.drops_when_empty {
            mode.count(stat::NO_BACKEND);
            return Decision::only(Action::Drop);
        }
        return Decision::only(Action::Refuse);
    };
    mode.count(stat::CT_MISS);
    let client = Client::Address(packet.src_addr);
    let Some((backend_id, backend)) =
        mode.chosen(lb::select_backend(frontend, &set, count, client, now.ns))
    else {
        // Counted by `chosen`.
        return Decision::only(Action::Drop);
    };
    let snat_source = if Translation::may_snat(flags, &set, packet.src_addr, backend.addr) {
        snat::source_for(ctx, &backend)
    } else {
        None
    };
    let mut flow = Translation::service(
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
        if flow.needs_port() {
            flow.set_peer_port(snat::port(snat::random_start(), 0));
        }
    } else if frontend.header.affinity_timeout_s != 0 {
        affinity::remember(client, frontend, backend_id, &backend, now.ns);
    }
    Decision::create(flow, stat::NEW_FLOW)
}

/// Records the new flow `flow` (nothing in a dry run): the packet is then translated as
/// its flow says, counted as `counter`, or dropped, counted as why.
#[inline(always)]
fn create<M: Mode>(
    mode: &M,
    flow: &mut Translation,
    packet: &Packet,
    len: u32,
    now: &Now,
    counter: u32,
) -> Decision {
    if !M::DRY_RUN {
        if let Err(not_created) = conntrack::create(flow, packet, len, now) {
            mode.count(match not_created {
                NotCreated::NoPort => stat::SNAT_FAILED,
                NotCreated::Busy => stat::CT_CREATE_FAILED,
            });
            return Decision::only(Action::Drop);
        }
        if flow.kind & ct_flags::REMAPPED != 0 {
            mode.count(stat::REMAPPED);
        }
    }
    Decision::translate(flow.reply.reversed(), flow.forward_routes_itself, counter)
}

/// Translates `packet` as `decision` says and lets it go on: first the kernel's
/// forwarding checks (an error may go back instead, see `forwarding`), then the rewrite,
/// then, when its source became one of the node's own addresses, the program's own
/// forwarding step. Returns the verdict and what became of the packet, for the rest of its
/// datagram.
#[inline(always)]
fn translate<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    decision: &Decision,
) -> (i32, Fate) {
    let to = &decision.to;
    let routes_itself = decision.routes_itself;
    let egress = if routes_itself || *to != packet.tuple() {
        match forwarding::check(ctx, mode, packet, to, routes_itself) {
            Checked::Go(egress) => egress,
            Checked::Answered(verdict) => return (verdict, Fate::dropped()),
        }
    } else {
        Egress::Kernel
    };
    if nat::rewrite(ctx, packet, to).is_err() {
        // A half-rewritten packet must not leave.
        mode.count(stat::REWRITE_FAILED);
        return (DROP, Fate::dropped());
    }
    let verdict = match egress {
        Egress::Kernel => ACCEPT,
        Egress::NoRoute => {
            mode.count(stat::FIB_MISS);
            ACCEPT
        }
        Egress::Routed { .. } if M::DRY_RUN => {
            mode.routes_itself();
            ACCEPT
        }
        Egress::Routed { ifindex } => match route::send(ctx, ifindex) {
            Some(verdict) => verdict,
            // The TTL was checked before the translation: only a packet the check could
            // not answer gets here.
            None => {
                mode.count(stat::NOT_FORWARDABLE);
                return (DROP, Fate::dropped());
            }
        },
    };
    mode.count(decision.counter);
    (verdict, Fate::forward(*to, routes_itself))
}

/// Refuses `packet` with an ICMP port unreachable, sent back out of its device, if the
/// ICMP rate limits allow; the rest of a refused datagram goes nowhere either.
#[inline(always)]
fn refuse<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet) -> (i32, Fate) {
    let (verdict, counter) = match ctx.answer(packet, Answer::PortUnreachable, !M::DRY_RUN) {
        Ok(verdict) => (verdict, stat::REJECTED),
        Err(NotAnswered::RateLimited) => (DROP, stat::REJECT_RATE_LIMITED),
        Err(NotAnswered::IpOptions) => (DROP, stat::NO_BACKEND),
        // A half-rewritten packet must not leave.
        Err(NotAnswered::HelperFailed) => (DROP, stat::REWRITE_FAILED),
    };
    mode.count(counter);
    (verdict, Fate::dropped())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
