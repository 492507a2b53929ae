//! The tc and XDP programs: Service load balancing for IPv4 TCP/UDP.
//!
//! parse → conntrack (one lookup, either direction) → frontend lookup → backend selection
//! → conntrack create → forwarding checks → NAT (XDP: the checks before the create). A packet to no frontend is checked for
//! being the answer of a flow not yet assured, or part of a direct flow to a backend
//! (tracked so that Service flows never clash with it); anything else passes untouched.
//! A later fragment follows its datagram's first fragment (`fragment`), an ICMP error
//! about a tracked flow is translated as the flow is (`icmp_error`). One module per
//! concern, like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
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
mod answer;
mod conntrack;
mod context;
mod csum;
mod devices;
mod forwarding;
mod fragment;
mod icmp_error;
mod lb;
mod lb6;
mod maglev;
mod membership;
mod mode;
mod names;
mod nat;
mod parse;
mod reap;
mod recycled;
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
    macros::{cgroup_sock, cgroup_sock_addr, classifier, map, xdp},
    maps::PerCpuArray,
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use proxy_common::{
    CtKey, FrontendKey, FrontendValue, Translation, Tuple, ct_flags, service_flags, stat, to_tc,
};

use crate::{
    answer::{Answer, NotAnswered},
    conntrack::{Entry, Followed, NotCreated, Now, Table},
    context::Context,
    forwarding::{Checked, Translated},
    fragment::Fate,
    lb::{Client, Frontend, LbKey},
    mode::{DryRun, Live, Mode},
    parse::{Packet, Parsed},
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

/// The packet path of either hook. The XDP program leaves IP fragments to tc, the first
/// with the later ones (the first decides for its datagram's rest, so every fragment goes
/// one way), and ICMP messages (tc translates errors about tracked flows).
#[inline(always)]
fn balance<C: Context, M: Mode>(ctx: &C, mode: &M) -> Verdict {
    match parse::packet(ctx) {
        Parsed::Packet(packet) if C::IS_XDP && packet.is_first_fragment() => {
            Verdict::ToTc(to_tc::FRAGMENT)
        }
        Parsed::Packet(packet) => service_path(ctx, mode, &packet),
        Parsed::LaterFragment(_) if C::IS_XDP => Verdict::ToTc(to_tc::FRAGMENT),
        Parsed::LaterFragment(fragment) => fragment::follow(ctx, mode, &fragment),
        Parsed::Icmp { .. } if C::IS_XDP => Verdict::ToTc(to_tc::ICMP),
        Parsed::Icmp { l4_offset } => icmp_error::translate(ctx, mode, l4_offset),
        Parsed::NotHandled if C::IS_XDP => Verdict::ToTc(to_tc::NOT_HANDLED),
        Parsed::NotHandled => {
            mode.count(stat::NOT_HANDLED);
            Verdict::Accept
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
    /// [`Action::Translate`], XDP: where the forwarding checks send the translated packet
    /// ([`Hop::KERNEL`]: the kernel routes it).
    hop: Hop,
    /// [`Action::Create`]: the new flow.
    flow: Translation,
    /// [`Action::Done`]: the packet's verdict, as [`Verdict::to_parts`] gives it.
    verdict: (u8, i32),
}

/// This CPU's decision for the packet in hand: [`decide`] writes it, [`service_path`]
/// carries it out. About 100 bytes that the stack, already holding the lookups' frames
/// beside the packet path's, has no room for. Not pinned.
#[map]
static DECISION: PerCpuArray<Decision> = PerCpuArray::with_max_entries(1, 0);

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
    /// Decided before anything was recorded for it: an ICMP error went back in its place
    /// (the forwarding checks), or the XDP program leaves it to tc.
    Done,
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

    /// Ends the decision with `verdict` (see [`Action::Done`]).
    #[inline(always)]
    fn finish(&mut self, verdict: Verdict) {
        self.action = Action::Done;
        self.verdict = verdict.to_parts();
    }

    #[inline(always)]
    fn done(verdict: Verdict) -> Self {
        Self {
            verdict: verdict.to_parts(),
            ..Self::only(Action::Done)
        }
    }

    #[inline(always)]
    fn only(action: Action) -> Self {
        Self {
            action,
            counter: stat::PASS,
            to: Tuple::default(),
            routes_itself: false,
            hop: Hop::KERNEL,
            flow: Translation::default(),
            verdict: Verdict::Drop.to_parts(),
        }
    }
}

/// A TCP/UDP packet (or a datagram's first fragment): decided, then carried out. The
/// decision's many paths meet here, so what follows them — the forwarding checks,
/// recording a new flow, the rewrite, the fragment record — exists once, and the verifier
/// walks it once per kind of decision rather than once per path that led to it (a new
/// flow's record, with its claim of a reply tuple, would otherwise be walked for every
/// way a packet can miss conntrack).
#[inline(always)]
fn service_path<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet) -> Verdict {
    let Some(decision) = DECISION.get_ptr_mut(0) else {
        // Never: the array has its one entry.
        return Verdict::Drop;
    };
    // SAFETY: this CPU's entry, used only within this run (no preemption while the
    // program runs); `decide` writes all of it before anything reads it.
    let decision = unsafe { &mut *decision };
    let now = Now::read();
    if decide(ctx, mode, packet, &now, decision) {
        if C::IS_XDP {
            // XDP runs the forwarding checks before a new flow is recorded, so it can still
            // leave the packet to tc with nothing recorded (an SNAT port claimed later
            // changes only the source port, which routes do not look at). tc runs them in
            // `translate`, after: walking the flow's record once per outcome of the checks
            // would take the verifier past its budget, and tc answers what they find itself.
            if decision.action == Action::Create {
                decision.to = decision.flow.reply.reversed();
                decision.routes_itself = decision.flow.forward_routes_itself;
            }
            match checked(ctx, mode, packet, &decision.to, decision.routes_itself) {
                Ok(hop) => decision.hop = hop,
                Err(verdict) => decision.finish(verdict),
            }
        }
        if decision.action == Action::Create {
            create(mode, decision, packet, ctx.len(), &now);
        }
    }
    let (verdict, fate) = match decision.action {
        Action::Translate => translate(ctx, mode, packet, decision),
        Action::Refuse => refuse(ctx, mode, packet),
        Action::Done => (Verdict::from_parts(decision.verdict), Fate::dropped()),
        // `create` leaves no Create behind.
        Action::Drop | Action::Create => (Verdict::Drop, Fate::dropped()),
        Action::Pass => {
            mode.count(stat::PASS);
            (Verdict::Accept, Fate::forward(packet.tuple(), false))
        }
    };
    fragment::remember(mode, packet, &fate);
    verdict
}

/// Writes into `decision` what becomes of `packet`: a tracked flow's translation, a new
/// flow, or none. A BPF subprogram: its lookups take a stack frame of their own, which is
/// gone by the time the flow is recorded and the packet rewritten (the chain of frames must
/// stay within 512 bytes). It writes the decision through a reference and returns whether
/// it translates (or records a new flow): a struct returned compiles to a pointer into the
/// caller's stack handed back in R0, and so may a function that returns nothing (R0 left
/// as it was last used); the verifier refuses both.
#[inline(never)]
fn decide<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    now: &Now,
    decision: &mut Decision,
) -> bool {
    *decision = decision_for(ctx, mode, packet, now);
    matches!(decision.action, Action::Translate | Action::Create)
}

/// What becomes of `packet` (see [`decide`]).
#[inline(always)]
fn decision_for<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet, now: &Now) -> Decision {
    let now = *now;
    let key = packet.key();
    // An assured flow, in either direction: one lookup.
    if let Some(entry) = Table::Assured.get(&key)
        && let Some(decision) = tracked(ctx, mode, entry, &key, packet, now)
    {
        return decision;
    }
    let destination = LbKey::destination(packet);
    let found = lb::frontend(&destination);
    let is_frontend = found.is_some();
    // Zeros where there is none: an `Option`'s payload left undefined lives across the
    // lookups below, and LLVM may spill it from a register the verifier holds unset.
    let frontend = found.unwrap_or(Frontend {
        key: FrontendKey::default(),
        header: FrontendValue::default(),
    });
    // A flow not yet assured: of a frontend (a retransmitted SYN, the handshake's last
    // ACK, a UDP flow before it became a stream), the first answer of one, or a direct
    // flow to a backend. Anything else to no frontend is nothing of ours.
    let mut to_backend = None;
    let may_be_pending = is_frontend || packet.may_answer() || {
        let is_backend = lb::is_backend(&destination);
        to_backend = Some(is_backend);
        is_backend
    };
    if may_be_pending
        && let Some(entry) = Table::Pending.get(&key)
        && let Some(decision) = tracked(ctx, mode, entry, &key, packet, now)
    {
        return decision;
    }
    if is_frontend {
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
) -> Option<Decision> {
    // XDP leaves a flow that must select again to tc: retiring its entry and then leaving
    // the new flow to tc (a refusal, an unknown neighbour) would not leave tc the packet
    // untouched with nothing recorded.
    let hit = match conntrack::follow(entry, key, packet, ctx.len(), now, mode, !C::IS_XDP) {
        Followed::Hit(hit) => hit,
        Followed::ReselectElsewhere => {
            return Some(Decision::done(Verdict::ToTc(to_tc::RESELECT)));
        }
        Followed::Reselect | Followed::Gone => return None,
    };
    let counter = if hit.flags & ct_flags::DIRECT != 0 {
        stat::DIRECT
    } else if hit.flags & ct_flags::REPLY != 0 {
        stat::REPLY
    } else {
        stat::CT_HIT
    };
    Some(Decision::translate(
        hit.to,
        hit.flags & ct_flags::ROUTES_ITSELF != 0,
        counter,
    ))
}

/// A packet to a frontend without a flow: selects a backend (the client's previous one
/// under session affinity, else by the frontend's Maglev table or at random) among the set
/// its origin reaches, for the new flow.
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
    let client = Client::Address(packet.src_addr);
    let hashed = maglev::Flow {
        addr: packet.src_addr,
        port: packet.src_port,
        proto: packet.proto,
    };
    let selection = lb::select_backend(frontend, &set, count, client, Some(hashed), now.ns);
    let Some((backend_id, backend)) = mode.chosen(selection) else {
        // Counted by `chosen`; the miss here, a new flow's in `create`.
        mode.count(stat::CT_MISS);
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

/// The kernel's forwarding checks for `packet`, about to be translated to `to` (see
/// `forwarding`): `Ok` where it goes, `Err` the verdict in place of the translation (an
/// ICMP error went back, or XDP leaves the packet to tc). A packet that stays as it is (a
/// direct flow) gets the kernel's own checks.
#[inline(always)]
fn checked<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    to: &Tuple,
    routes_itself: bool,
) -> Result<Hop, Verdict> {
    if !routes_itself && *to == packet.tuple() {
        return Ok(Hop::KERNEL);
    }
    let mut translated = Translated {
        to: *to,
        routes_itself,
        hop: Hop::KERNEL,
    };
    match forwarding::check(ctx, mode, packet, &mut translated) {
        Checked::Go => Ok(translated.hop),
        Checked::Answered(verdict) => Err(verdict),
    }
}

/// Records the new flow of `decision` (nothing in a dry run): the packet is then to be
/// translated as its flow says, counted as its counter, or dropped, counted as why. A
/// Service's new flow counts its conntrack miss here, once it is sure to be recorded by
/// this hook (XDP may leave it to tc before).
#[inline(always)]
fn create<M: Mode>(mode: &M, decision: &mut Decision, packet: &Packet, len: u32, now: &Now) {
    if decision.counter == stat::NEW_FLOW {
        mode.count(stat::CT_MISS);
    }
    let flow = &mut decision.flow;
    if !M::DRY_RUN {
        if let Err(not_created) = conntrack::create(flow, packet, len, now) {
            mode.count(match not_created {
                NotCreated::NoPort => stat::SNAT_FAILED,
                NotCreated::Busy => stat::CT_CREATE_FAILED,
            });
            decision.action = Action::Drop;
            return;
        }
        if flow.kind & ct_flags::REMAPPED != 0 {
            mode.count(stat::REMAPPED);
        }
    }
    decision.to = flow.reply.reversed();
    decision.routes_itself = flow.forward_routes_itself;
    decision.action = Action::Translate;
}

/// Translates `packet` as `decision` says and lets it go on: tc's forwarding checks (an
/// error may go back instead; XDP's ran before), the rewrite, then, when its source became
/// one of the node's own addresses, the program's own forwarding step. Returns the verdict and what became of the packet, for
/// the rest of its datagram.
#[inline(always)]
fn translate<C: Context, M: Mode>(
    ctx: &C,
    mode: &M,
    packet: &Packet,
    decision: &Decision,
) -> (Verdict, Fate) {
    let to = &decision.to;
    let hop = if C::IS_XDP {
        decision.hop
    } else {
        match checked(ctx, mode, packet, to, decision.routes_itself) {
            Ok(hop) => hop,
            Err(verdict) => return (verdict, Fate::dropped()),
        }
    };
    let hop = &hop;
    if nat::rewrite(ctx, packet, to).is_err() {
        // A half-rewritten packet must not leave.
        mode.count(stat::REWRITE_FAILED);
        return (Verdict::Drop, Fate::dropped());
    }
    // The TTL was checked before the translation: only a packet the check could not
    // answer runs out of it here.
    let Some(verdict) = route::send(ctx, mode, hop) else {
        mode.count(stat::NOT_FORWARDABLE);
        return (Verdict::Drop, Fate::dropped());
    };
    mode.count(decision.counter);
    (verdict, Fate::forward(*to, decision.routes_itself))
}

/// Refuses `packet` with an ICMP port unreachable, sent back out of its device, if the
/// ICMP rate limits allow; the rest of a refused datagram goes nowhere either. XDP leaves
/// it to tc, which builds the answer.
#[inline(always)]
fn refuse<C: Context, M: Mode>(ctx: &C, mode: &M, packet: &Packet) -> (Verdict, Fate) {
    let (verdict, counter) = match ctx.answer(packet, Answer::PortUnreachable, !M::DRY_RUN) {
        Ok(Verdict::ToTc(reason)) => return (Verdict::ToTc(reason), Fate::dropped()),
        Ok(verdict) => (verdict, stat::REJECTED),
        Err(NotAnswered::RateLimited) => (Verdict::Drop, stat::REJECT_RATE_LIMITED),
        Err(NotAnswered::IpOptions) => (Verdict::Drop, stat::NO_BACKEND),
        // A half-rewritten packet must not leave.
        Err(NotAnswered::HelperFailed) => (Verdict::Drop, stat::REWRITE_FAILED),
    };
    mode.count(counter);
    (verdict, Fate::dropped())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
