//! The tc and XDP programs: Service load balancing for TCP/UDP/SCTP over IPv4 and IPv6.
//!
//! parse → conntrack (one lookup, either direction) → frontend lookup → backend selection
//! → conntrack create → forwarding checks → NAT (XDP: the checks before the create). A packet to no frontend is checked for
//! being the answer of a flow not yet assured, or part of a direct flow to a backend
//! (tracked so that Service flows never clash with it); anything else passes untouched.
//! A later fragment follows its datagram's first fragment (`fragment`), an ICMP error
//! about a tracked flow is translated as the flow is (`icmp_error`). One module per
//! concern, like Cilium's `bpf/lib/{lb,conntrack,nat,csum}.h`.
//!
//! The packet path is generic over the address family ([`family::Family`]) and compiled
//! once per family; each family has its own maps.
//!
//! `epx_ingress` is the datapath at tc ingress of every device; `epx_xdp` runs the same
//! path at XDP on the external devices, in front of it (see [`xdp`]). `epx_trace` and
//! `epx_xdp_trace` run them as dry runs for `ebpf-proxy trace` (see [`mode`]);
//! `epx_ct_reap` removes finished flows for the daemon's garbage collector. Those three are
//! never attached.
//!
//! The cgroup programs (`epx_connect4`, `epx_sendmsg4`, `epx_recvmsg4`,
//! `epx_getpeername4`, their `*6` twins, `epx_sock_release`) balance at the socket
//! instead, with the same lookups (see [`sock`]); `epx_connect4_trace` and
//! `epx_connect6_trace` are `connect4`'s and `connect6`'s dry runs.
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
mod family;
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
    maps::{PerCpuArray, ProgramArray},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use proxy_common::{CtKey, Ipv6, Translation, Tuple, ct_flags, service_flags, stat, to_tc};

use crate::{
    answer::{Answer, NotAnswered},
    conntrack::{Followed, NotCreated, Now, Table},
    context::Context,
    family::Family,
    forwarding::{Checked, Translated},
    lb::{Client, Frontend, LbKey},
    mode::{DryRun, Live, Mode},
    parse::{Packet, Parsed, Parsed6},
    route::Hop,
    sock::Call,
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

/// `epx_ingress` for an IPv6 packet (its tail call).
#[classifier]
pub fn epx_ingress6(ctx: TcContext) -> i32 {
    tc_action(balance6(&ctx, &Live))
}

/// `epx_trace` for an IPv6 packet (its tail call).
#[classifier]
pub fn epx_trace6(ctx: TcContext) -> i32 {
    match DryRun::start() {
        Some(dry_run) => tc_action(balance6(&ctx, &dry_run)),
        None => TC_ACT_OK,
    }
}

/// Named like `proxy_common::map_names::TAIL_CALLS`: the IPv6 packet paths
/// (`proxy_common::tail_call`), which the loading process puts here. Pinned: a program
/// array is emptied when no process holds it, and the attached programs outlive the
/// daemon that loaded them.
#[map]
static TAIL_CALLS: ProgramArray = ProgramArray::pinned(2, 0);

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

/// `epx_xdp` for an IPv6 frame (its tail call, the mark already reserved).
#[xdp]
pub fn epx_xdp6(ctx: XdpContext) -> u32 {
    xdp::finish(&ctx, &Live, balance6(&ctx, &Live))
}

/// `epx_xdp_trace` for an IPv6 frame (its tail call).
#[xdp]
pub fn epx_xdp_trace6(ctx: XdpContext) -> u32 {
    match DryRun::start() {
        Some(dry_run) => xdp::finish(&ctx, &dry_run, balance6(&ctx, &dry_run)),
        None => aya_ebpf::bindings::xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn epx_ct_reap(ctx: TcContext) -> i32 {
    reap::batch(&ctx) as i32
}

#[cgroup_sock_addr(connect4)]
pub fn epx_connect4(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward4(&ctx, &Live, Call::Connect))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn epx_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward4(&ctx, &Live, Call::SendMsg))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn epx_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx, &Live);
    sock::PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn epx_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx, &Live);
    sock::PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn epx_connect6(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward6(&ctx, &Live, Call::Connect))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn epx_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::finish(sock::forward6(&ctx, &Live, Call::SendMsg))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn epx_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx, &Live);
    sock::PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn epx_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx, &Live);
    sock::PROCEED
}

#[cgroup_sock(sock_release)]
pub fn epx_sock_release(ctx: SockContext) -> i32 {
    sock::release(&ctx);
    sock::PROCEED
}

#[cgroup_sock_addr(connect4)]
pub fn epx_connect4_trace(ctx: SockAddrContext) -> i32 {
    if let Some(dry_run) = DryRun::start() {
        sock::forward4(&ctx, &dry_run, Call::Connect);
    }
    sock::abandon4(&ctx, proxy_common::TRACE_ERRNO)
}

#[cgroup_sock_addr(connect6)]
pub fn epx_connect6_trace(ctx: SockAddrContext) -> i32 {
    if let Some(dry_run) = DryRun::start() {
        sock::forward6(&ctx, &dry_run, Call::Connect);
    }
    sock::abandon6(&ctx, proxy_common::TRACE_ERRNO)
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
        Parsed::Ipv6 => {
            // On in the IPv6 program; here only if it is not loaded: untouched (XDP: to tc).
            ctx.tail_call(M::IPV6_SLOT);
            if C::IS_XDP {
                return Verdict::ToTc(to_tc::NOT_HANDLED);
            }
            mode.count(stat::NOT_HANDLED);
            Verdict::Accept
        }
        Parsed::LaterFragment(_) if C::IS_XDP => Verdict::ToTc(to_tc::FRAGMENT),
        Parsed::LaterFragment(fragment) => {
            fragment::follow(ctx, mode, &fragment.datagram, fragment.total_len)
        }
        Parsed::Icmp { .. } if C::IS_XDP => Verdict::ToTc(to_tc::ICMP),
        Parsed::Icmp { l4_offset } => icmp_error::translate::<C, M, u32>(ctx, mode, l4_offset),
        Parsed::NotHandled if C::IS_XDP => Verdict::ToTc(to_tc::NOT_HANDLED),
        Parsed::NotHandled => {
            mode.count(stat::NOT_HANDLED);
            Verdict::Accept
        }
    }
}

/// The packet path of an IPv6 packet, in a program of its own (`epx_ingress6`,
/// `epx_trace6`; XDP: `epx_xdp6`, `epx_xdp_trace6`), which `balance` tail-calls: IPv6's
/// frames get the BPF stack to themselves. XDP leaves fragments (as IPv4's), ICMPv6 and
/// what is not parsed to tc.
#[inline(always)]
fn balance6<C: Context, M: Mode>(ctx: &C, mode: &M) -> Verdict {
    let Some(packet) = lb6::PACKET6.get_ptr_mut(0) else {
        return Verdict::Drop;
    };
    // SAFETY: this CPU's entry, used only within this run (no preemption while the program
    // runs); `packet6` writes all of it before anything reads it.
    let packet = unsafe { &mut *packet };
    match parse::packet6(ctx, packet) {
        Parsed6::Packet if C::IS_XDP && packet.is_first_fragment() => {
            Verdict::ToTc(to_tc::FRAGMENT)
        }
        Parsed6::Packet => service_path(ctx, mode, packet),
        Parsed6::LaterFragment if C::IS_XDP => Verdict::ToTc(to_tc::FRAGMENT),
        Parsed6::LaterFragment => {
            fragment::follow(ctx, mode, &packet.datagram(), packet.ip.total_len)
        }
        Parsed6::Icmp if C::IS_XDP => Verdict::ToTc(to_tc::ICMP),
        Parsed6::Icmp => icmp_error::translate::<C, M, Ipv6>(ctx, mode, packet.l4_offset),
        Parsed6::NotHandled if C::IS_XDP => Verdict::ToTc(to_tc::NOT_HANDLED),
        Parsed6::NotHandled => {
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
pub struct Decision<A = u32> {
    action: Action,
    /// [`Action::Translate`]: the counter that names what happened; [`Action::Create`]:
    /// the one the packet counts in once the flow is recorded.
    counter: u32,
    /// [`Action::Translate`]: the tuple to rewrite the packet to; whether its source
    /// becomes a node address, so the program forwards it (the kernel would drop it as a
    /// martian); and where the forwarding checks send it ([`Hop::KERNEL`]: the kernel
    /// routes it).
    out: Translated<A>,
    /// [`Action::Create`]: the new flow.
    flow: Translation<A>,
    /// [`Action::Done`]: the packet's verdict, as [`Verdict::to_parts`] gives it.
    verdict: (u8, i32),
    /// Scratch of [`decide`]: the packet's destination as a frontend (its header zero
    /// when it is none), and its conntrack key. Held here, not on the stack: an IPv6 key
    /// and frontend would crowd the frames of the lookups (see `Ipv6`).
    frontend: Frontend<A>,
    key: CtKey<A>,
}

/// This CPU's decision for the packet in hand: [`decide`] writes it, [`service_path`]
/// carries it out. About 150 bytes (IPv6: 250) that the stack, already holding the
/// lookups' frames beside the packet path's, has no room for. Not pinned.
#[map]
static DECISION: PerCpuArray<Decision> = PerCpuArray::with_max_entries(1, 0);

/// [`DECISION`] for IPv6 packets.
#[map]
static DECISION6: PerCpuArray<Decision<Ipv6>> = PerCpuArray::with_max_entries(1, 0);

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

impl<A: Family> Decision<A> {
    /// Starts the decision `action`: every field but the tuple and the flow, which only
    /// [`Action::Translate`] and [`Action::Create`] read, and which their setters write.
    /// Written in place: a decision built on the stack and copied would not fit an IPv6
    /// packet's frame (an IPv6 flow is 88 bytes).
    #[inline(always)]
    fn set(&mut self, action: Action) {
        self.action = action;
        self.counter = stat::PASS;
        self.out.routes_itself = false;
        self.out.hop = Hop::KERNEL;
        self.verdict = Verdict::Drop.to_parts();
    }

    #[inline(always)]
    fn set_translate(&mut self, to: Tuple<A>, routes_itself: bool, counter: u32) {
        self.set(Action::Translate);
        self.counter = counter;
        self.out.to = to;
        self.out.routes_itself = routes_itself;
    }

    /// Aims the translation at the new flow: its forward tuple (the reply tuple reversed),
    /// field by field (a reversed IPv6 tuple built first would take 40 bytes of the XDP
    /// program's frame).
    #[inline(always)]
    fn aim_at_flow(&mut self) {
        let (reply, to) = (&self.flow.reply, &mut self.out.to);
        to.src_addr = reply.dst_addr;
        to.dst_addr = reply.src_addr;
        to.src_port = reply.dst_port;
        to.dst_port = reply.src_port;
        self.out.routes_itself = self.flow.forward_routes_itself;
    }

    /// Ends the decision with `verdict` (see [`Action::Done`]).
    #[inline(always)]
    fn finish(&mut self, verdict: Verdict) {
        self.action = Action::Done;
        self.verdict = verdict.to_parts();
    }
}

/// A TCP/UDP packet (or a datagram's first fragment): decided, then carried out. The
/// decision's many paths meet here, so what follows them — the forwarding checks,
/// recording a new flow, the rewrite, the fragment record — exists once, and the verifier
/// walks it once per kind of decision rather than once per path that led to it (a new
/// flow's record, with its claim of a reply tuple, would otherwise be walked for every
/// way a packet can miss conntrack).
#[inline(always)]
fn service_path<C: Context, M: Mode, A: Family>(ctx: &C, mode: &M, packet: &Packet<A>) -> Verdict {
    let Some(decision) = A::decision().get_ptr_mut(0) else {
        // Never: the array has its one entry.
        return Verdict::Drop;
    };
    // SAFETY: this CPU's entry, used only within this run (no preemption while the
    // program runs); `decide` writes all of it before anything reads it.
    let decision = unsafe { &mut *decision };
    let now = Now::read();
    let decided = if A::FRAMES_APART {
        decide_inline(ctx, mode, packet, &now, decision)
    } else {
        decide(ctx, mode, packet, &now, decision)
    };
    if decided {
        if C::IS_XDP {
            // XDP runs the forwarding checks before a new flow is recorded, so it can still
            // leave the packet to tc with nothing recorded (an SNAT port claimed later
            // changes only the source port, which routes do not look at). tc runs them in
            // `translate`, after: walking the flow's record once per outcome of the checks
            // would take the verifier past its budget, and tc answers what they find itself.
            if decision.action == Action::Create {
                decision.aim_at_flow();
            }
            if let Some(verdict) = checked(ctx, mode, packet, &mut decision.out) {
                decision.finish(verdict);
            }
        }
        if decision.action == Action::Create {
            create(mode, decision, packet, ctx.len(), &now);
        }
    }
    let (verdict, sent) = match decision.action {
        Action::Translate => translate(ctx, mode, packet, decision),
        Action::Refuse => (refuse(ctx, mode, packet), false),
        Action::Done => (Verdict::from_parts(decision.verdict), false),
        // `create` leaves no Create behind.
        Action::Drop | Action::Create => (Verdict::Drop, false),
        Action::Pass => {
            mode.count(stat::PASS);
            (Verdict::Accept, true)
        }
    };
    if packet.is_first_fragment() {
        fragment::remember(mode, packet, &decision.fate(packet, sent));
    }
    verdict
}

impl<A: Family> Decision<A> {
    /// What became of the packet this decision was for, for the rest of its datagram:
    /// `sent` on, translated as decided or passed untouched; else dropped (or answered).
    #[inline(always)]
    fn fate(&self, packet: &Packet<A>, sent: bool) -> fragment::Fate<A> {
        match self.action {
            Action::Translate if sent => {
                fragment::Fate::forward(self.out.to, self.out.routes_itself)
            }
            Action::Pass => fragment::Fate::forward(packet.tuple(), false),
            _ => fragment::Fate::dropped(),
        }
    }
}

/// Writes into `decision` what becomes of `packet`: a tracked flow's translation, a new
/// flow, or none. A BPF subprogram: its lookups take a stack frame of their own, which is
/// gone by the time the flow is recorded and the packet rewritten (the chain of frames must
/// stay within 512 bytes). It writes the decision through a reference and returns whether
/// it translates (or records a new flow): a struct returned compiles to a pointer into the
/// caller's stack handed back in R0, and so may a function that returns nothing (R0 left
/// as it was last used); the verifier refuses both.
#[inline(never)]
fn decide<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    now: &Now,
    decision: &mut Decision<A>,
) -> bool {
    decide_inline(ctx, mode, packet, now, decision)
}

/// [`decide`], in the caller's frame: the IPv6 path, whose lookups have frames of their
/// own ([`tracked`], [`new_flow`]) and which would not fit one more level of frames.
#[inline(always)]
fn decide_inline<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    now: &Now,
    decision: &mut Decision<A>,
) -> bool {
    decide_into(ctx, mode, packet, now, decision);
    matches!(decision.action, Action::Translate | Action::Create)
}

/// Writes what becomes of `packet` into `decision` (see [`decide`]).
#[inline(always)]
fn decide_into<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    now: &Now,
    decision: &mut Decision<A>,
) {
    // An assured flow, in either direction: one lookup.
    let mut lookup = Lookup {
        table: Table::Assured,
        now: *now,
    };
    if tracked(ctx, mode, packet, &lookup, decision) {
        return;
    }
    let destination = LbKey::destination(packet);
    let is_frontend = lb::find_frontend(&destination, &mut decision.frontend);
    // A flow not yet assured: of a frontend (a retransmitted SYN, the handshake's last
    // ACK, a UDP flow before it became a stream), the first answer of one, or a direct
    // flow to a backend. Anything else to no frontend is nothing of ours.
    let mut to_backend = None;
    let may_be_pending = is_frontend || packet.may_answer() || {
        let is_backend = lb::is_backend(&destination);
        to_backend = Some(is_backend);
        is_backend
    };
    lookup.table = Table::Pending;
    if may_be_pending && tracked(ctx, mode, packet, &lookup, decision) {
        return;
    }
    if is_frontend {
        new_flow(ctx, mode, packet, &lookup, decision);
        return;
    }
    if to_backend.unwrap_or_else(|| lb::is_backend(&destination)) {
        // A packet straight to a backend that belongs to no tracked flow: the direct flow
        // is tracked, so no Service flow is created over its reply tuple. If a live
        // Service flow holds that tuple already, its source port is remapped instead.
        decision.set(Action::Create);
        decision.counter = stat::DIRECT;
        decision.flow.set_direct(
            packet.proto,
            (packet.src_addr, packet.src_port),
            (packet.dst_addr, packet.dst_port),
        );
        return;
    }
    decision.set(Action::Pass);
}

/// Where [`tracked`] looks, and when.
struct Lookup {
    table: Table,
    now: Now,
}

/// A packet whose tuple has an entry in the `lookup`'s table: rewritten to the entry's
/// tuple, unless the flow is over or must select again (false, `decision` unset: go on as
/// without the entry). A BPF subprogram, called for either table: its keys take a frame of
/// their own (an IPv6 key is 40 bytes), and the verifier walks it once per call.
#[inline(never)]
fn tracked<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    lookup: &Lookup,
    decision: &mut Decision<A>,
) -> bool {
    decision.key = packet.key();
    let Some(entry) = lookup.table.get(&decision.key) else {
        return false;
    };
    let (key, now) = (&decision.key, lookup.now);
    // XDP leaves a flow that must select again to tc: retiring its entry and then leaving
    // the new flow to tc (a refusal, an unknown neighbour) would not leave tc the packet
    // untouched with nothing recorded.
    let hit = match conntrack::follow(entry, key, packet, ctx.len(), now, mode, !C::IS_XDP) {
        Followed::Hit(hit) => hit,
        Followed::ReselectElsewhere => {
            decision.set(Action::Done);
            decision.finish(Verdict::ToTc(to_tc::RESELECT));
            return true;
        }
        Followed::Reselect | Followed::Gone => return false,
    };
    let counter = if hit.flags & ct_flags::DIRECT != 0 {
        stat::DIRECT
    } else if hit.flags & ct_flags::REPLY != 0 {
        stat::REPLY
    } else {
        stat::CT_HIT
    };
    decision.set_translate(hit.to, hit.flags & ct_flags::ROUTES_ITSELF != 0, counter);
    true
}

/// A packet to `decision`'s frontend without a flow: selects a backend (the client's
/// previous one under session affinity, else by the frontend's Maglev table or at random)
/// among the set its origin reaches, for the new flow. A BPF subprogram: the selection's lookups and the
/// new flow take a frame of their own, beside the conntrack lookups' (an IPv6 packet's
/// keys and flow would not fit one frame). Returns whether it records a new flow (a
/// subprogram must return a value, see [`decide`]).
#[inline(never)]
fn new_flow<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    lookup: &Lookup,
    decision: &mut Decision<A>,
) -> bool {
    // Read in place, not copied (an IPv6 frontend would take 44 bytes of the frame): the
    // decision is written only once the frontend is done with.
    let (frontend, now) = (&decision.frontend, lookup.now);
    mode.frontend_found(frontend);
    let flags = frontend.header.flags;
    if flags & service_flags::SOURCE_RANGES != 0
        && !source_ranges::admits(packet.src_addr, frontend)
    {
        mode.count(stat::SOURCE_RANGE_DENIED);
        decision.set(Action::Drop);
        return false;
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
            decision.set(Action::Drop);
            return false;
        }
        decision.set(Action::Refuse);
        return false;
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
        decision.set(Action::Drop);
        return false;
    };
    let snat_source = if Translation::may_snat(flags, &set, packet.src_addr, backend.addr) {
        snat::source_for(ctx, &backend)
    } else {
        None
    };
    let rev_nat_id = frontend.header.rev_nat_id;
    if !M::DRY_RUN && frontend.header.affinity_timeout_s != 0 {
        affinity::remember(client, frontend, backend_id, &backend, now.ns);
    }
    decision.set(Action::Create);
    decision.counter = stat::NEW_FLOW;
    decision.flow = Translation::service(
        packet.proto,
        (packet.src_addr, packet.src_port),
        (packet.dst_addr, packet.dst_port),
        flags,
        rev_nat_id,
        (backend.addr, backend.port),
        backend_id,
        snat_source,
    );
    // Nothing is claimed in a dry run: a port of the range is shown.
    if M::DRY_RUN && decision.flow.needs_port() {
        decision
            .flow
            .set_peer_port(snat::port(snat::random_start(), 0));
    }
    true
}

/// The kernel's forwarding checks for `packet`, about to be translated as `out` says (see
/// `forwarding`), which they complete with where it goes; `Some` verdict in place of the
/// translation (an ICMP error went back, or XDP leaves the packet to tc). A packet that
/// stays as it is (a direct flow) gets the kernel's own checks.
#[inline(always)]
fn checked<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    out: &mut Translated<A>,
) -> Option<Verdict> {
    out.hop = Hop::KERNEL;
    if !out.routes_itself && packet.has_tuple(&out.to) {
        return None;
    }
    match forwarding::check(ctx, mode, packet, out) {
        Checked::Go => None,
        Checked::Answered(verdict) => Some(verdict),
    }
}

/// Records the new flow of `decision` (nothing in a dry run): the packet is then to be
/// translated as its flow says, counted as its counter, or dropped, counted as why. A
/// Service's new flow counts its conntrack miss here, once it is sure to be recorded by
/// this hook (XDP may leave it to tc before).
#[inline(always)]
fn create<M: Mode, A: Family>(
    mode: &M,
    decision: &mut Decision<A>,
    packet: &Packet<A>,
    len: u32,
    now: &Now,
) {
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
    decision.aim_at_flow();
    decision.action = Action::Translate;
}

/// Translates `packet` as `decision` says and lets it go on: tc's forwarding checks (an
/// error may go back instead; XDP's ran before), the rewrite, then, when its source became
/// one of the node's own addresses, the program's own forwarding step. Returns the verdict and what became of the packet, for
/// the rest of its datagram.
#[inline(always)]
fn translate<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    packet: &Packet<A>,
    decision: &mut Decision<A>,
) -> (Verdict, bool) {
    if !C::IS_XDP
        && let Some(verdict) = checked(ctx, mode, packet, &mut decision.out)
    {
        return (verdict, false);
    }
    let (to, hop) = (&decision.out.to, &decision.out.hop);
    if nat::rewrite(ctx, packet, to).is_err() {
        // A half-rewritten packet must not leave.
        mode.count(stat::REWRITE_FAILED);
        return (Verdict::Drop, false);
    }
    // The TTL was checked before the translation: only a packet the check could not
    // answer runs out of it here.
    let Some(verdict) = route::send::<C, M, A>(ctx, mode, hop) else {
        mode.count(stat::NOT_FORWARDABLE);
        return (Verdict::Drop, false);
    };
    mode.count(decision.counter);
    (verdict, true)
}

/// Refuses `packet` with an ICMP (ICMPv6) port unreachable, sent back out of its device, if the
/// ICMP rate limits allow; the rest of a refused datagram goes nowhere either. XDP leaves
/// it to tc, which builds the answer.
#[inline(always)]
fn refuse<C: Context, M: Mode, A: Family>(ctx: &C, mode: &M, packet: &Packet<A>) -> Verdict {
    let (verdict, counter) = match ctx.answer(packet, Answer::PortUnreachable, !M::DRY_RUN) {
        Ok(Verdict::ToTc(reason)) => return Verdict::ToTc(reason),
        Ok(verdict) => (verdict, stat::REJECTED),
        Err(NotAnswered::RateLimited) => (Verdict::Drop, stat::REJECT_RATE_LIMITED),
        Err(NotAnswered::IpOptions) => (Verdict::Drop, stat::NO_BACKEND),
        // A half-rewritten packet must not leave.
        Err(NotAnswered::HelperFailed) => (Verdict::Drop, stat::REWRITE_FAILED),
    };
    mode.count(counter);
    verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
