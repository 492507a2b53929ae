//! Socket-level load balancing: the cgroup programs translate a socket's address before any
//! packet exists (Cilium's `bpf_sock.c`), with the packet path's own lookups (`lb`):
//! frontend, session affinity, random selection, membership.
//!
//! - `connect4`, `connect6`: a TCP or UDP `connect()` to a frontend is connected to a
//!   backend instead; without endpoints it fails with ECONNREFUSED at once (kube-proxy's
//!   REJECT), a frontend that drops fails it with EHOSTUNREACH.
//! - `sendmsg4`, `sendmsg6`: each datagram of an unconnected UDP socket to a frontend goes
//!   to its flow's backend, kept like a conntrack UDP flow: until it idles past the UDP
//!   timeout or the backend stops serving the frontend.
//! - `recvmsg4`, `getpeername4` (and `*6`): the backend's address is shown as the
//!   frontend's again, from SOCK_XLATE (keyed by socket cookie and backend).
//! - `sock_release`: a closed connected socket's entry goes with it.
//!
//! Both families run one code path over a [`View`] of the hook's addresses: the `*6` hooks
//! serve IPv6 frontends from IPv6's maps (SOCK_XLATE6, SOCK_AFFINITY6, `lb6`), and an
//! IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket's IPv4 peer) from IPv4's,
//! written back mapped, as Cilium's `sock6_xlate_v4_in_v6`.
//!
//! Which sockets: those of the daemon's own network namespace (the node's processes, which
//! no tc program sees), and with `--socket-lb all` pods' TCP sockets too. Pods' UDP stays
//! with the tc path, whose conntrack moves a flow off a backend that left even for a
//! connected socket; so do frontends with source ranges for pods (the pod's address, which
//! the ranges check, is not known at `connect()`).

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::map,
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
};
use core::{marker::PhantomData, num::NonZeroU16, ptr};
use proxy_common::{
    ECONNREFUSED, EHOSTUNREACH, Ipv6, Origin, SockKey, SockValue, default_max_entries, proto,
    service_flags, sock_flags, sock_kind, stat,
};

use crate::{
    affinity, conntrack,
    family::Family,
    lb::{self, Client, Frontend, LbKey},
    membership,
    mode::Mode,
    source_ranges,
};

/// The daemon's network namespace cookie, set at load time: its sockets are the node's.
#[unsafe(no_mangle)]
static SOCK_LB_HOST_NETNS: u64 = 0;
/// 1 when pods' TCP sockets are translated too (`--socket-lb all`), set at load time.
#[unsafe(no_mangle)]
static SOCK_LB_ALL: u8 = 0;

/// Named like `proxy_common::map_names::SOCK_XLATE`; pinned so a restarted daemon's
/// programs keep answering for sockets translated before, and the CLI lists it. LRU: the
/// least recently used go first when it is full. IPv6 sockets to IPv6 frontends have
/// SOCK_XLATE6 (`lb6`), bound by `Family::sock_xlate`.
#[map]
pub(crate) static SOCK_XLATE: LruHashMap<SockKey, SockValue> =
    LruHashMap::pinned(default_max_entries::SOCK_XLATE, 0);

/// The return value that lets the system call go on (0 fails it).
pub const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Which system call a forward translation serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Connect,
    /// A datagram of an unconnected UDP socket.
    SendMsg,
}

/// What became of a forward translation.
pub enum Verdict {
    /// Not ours (no frontend, not a socket we translate): the call goes on untouched.
    Untouched,
    /// The address now names the backend.
    Translated,
    /// The call fails with this errno.
    Refused(i32),
}

/// How a hook's socket addresses read and write as addresses of one family: the `*4`
/// hooks' as IPv4 ([`Inet4`]), the `*6` hooks' as IPv6 ([`Inet6`]), or an IPv4-mapped
/// address on an IPv6 socket as IPv4 again ([`Mapped4`]). The rest of this module is
/// written once over it.
///
/// The context allows only 4-byte loads of most of these fields (and none of another
/// family's hook): each word is read on its own, so the compiler cannot merge them.
trait View {
    type A: Family;
    /// The `user_family` of the calls this view serves.
    const USER_FAMILY: u32;
    /// The address the call names (the destination, or a datagram's source in recvmsg).
    fn address(sock_addr: &bpf_sock_addr) -> Self::A;
    fn set_address(sock_addr: &mut bpf_sock_addr, addr: Self::A);
    /// The source a datagram names (`IP_PKTINFO`, `IPV6_PKTINFO`), unspecified if none.
    /// Read only by `sendmsg` hooks: no other may.
    fn message_source(sock_addr: &bpf_sock_addr) -> Self::A;
    /// The address the socket is bound to, unspecified when unbound.
    fn local(sk: &bpf_sock) -> Self::A;
    /// The peer the socket is connected to, unspecified if none.
    fn remote(sk: &bpf_sock) -> Self::A;
}

/// The `connect4`, `sendmsg4`, … hooks: IPv4 sockets.
enum Inet4 {}

/// The `connect6`, `sendmsg6`, … hooks with an IPv6 address.
enum Inet6 {}

/// The `*6` hooks with an IPv4-mapped address (`::ffff:a.b.c.d`): a dual-stack socket's
/// IPv4 peer, served by IPv4's frontends and SOCK_XLATE, and written back mapped (Cilium's
/// `sock6_xlate_v4_in_v6`).
enum Mapped4 {}

impl View for Inet4 {
    type A = u32;
    const USER_FAMILY: u32 = AF_INET;

    #[inline(always)]
    fn address(sock_addr: &bpf_sock_addr) -> u32 {
        sock_addr.user_ip4
    }
    #[inline(always)]
    fn set_address(sock_addr: &mut bpf_sock_addr, addr: u32) {
        sock_addr.user_ip4 = addr;
    }
    #[inline(always)]
    fn message_source(sock_addr: &bpf_sock_addr) -> u32 {
        sock_addr.msg_src_ip4
    }
    #[inline(always)]
    fn local(sk: &bpf_sock) -> u32 {
        sk.src_ip4
    }
    #[inline(always)]
    fn remote(sk: &bpf_sock) -> u32 {
        sk.dst_ip4
    }
}

impl View for Inet6 {
    type A = Ipv6;
    const USER_FAMILY: u32 = AF_INET6;

    #[inline(always)]
    fn address(sock_addr: &bpf_sock_addr) -> Ipv6 {
        read_words(&sock_addr.user_ip6)
    }
    #[inline(always)]
    fn set_address(sock_addr: &mut bpf_sock_addr, addr: Ipv6) {
        write_words(&mut sock_addr.user_ip6, addr);
    }
    #[inline(always)]
    fn message_source(sock_addr: &bpf_sock_addr) -> Ipv6 {
        read_words(&sock_addr.msg_src_ip6)
    }
    #[inline(always)]
    fn local(sk: &bpf_sock) -> Ipv6 {
        read_words(&sk.src_ip6)
    }
    #[inline(always)]
    fn remote(sk: &bpf_sock) -> Ipv6 {
        read_words(&sk.dst_ip6)
    }
}

impl View for Mapped4 {
    type A = u32;
    const USER_FAMILY: u32 = AF_INET6;

    #[inline(always)]
    fn address(sock_addr: &bpf_sock_addr) -> u32 {
        ipv4_of(Inet6::address(sock_addr))
    }
    #[inline(always)]
    fn set_address(sock_addr: &mut bpf_sock_addr, addr: u32) {
        Inet6::set_address(sock_addr, Ipv6::mapping_ipv4(addr));
    }
    #[inline(always)]
    fn message_source(sock_addr: &bpf_sock_addr) -> u32 {
        ipv4_of(Inet6::message_source(sock_addr))
    }
    #[inline(always)]
    fn local(sk: &bpf_sock) -> u32 {
        ipv4_of(Inet6::local(sk))
    }
    #[inline(always)]
    fn remote(sk: &bpf_sock) -> u32 {
        ipv4_of(Inet6::remote(sk))
    }
}

/// The IPv4 address of an IPv4-mapped one; unspecified for any other (`::` is unbound).
#[inline(always)]
fn ipv4_of(addr: Ipv6) -> u32 {
    addr.ipv4_mapped().unwrap_or(0)
}

#[inline(always)]
fn read_words(words: &[u32; 4]) -> Ipv6 {
    // SAFETY: reads of the context's own fields, one word each (see `View`).
    unsafe {
        Ipv6([
            ptr::read_volatile(&raw const words[0]),
            ptr::read_volatile(&raw const words[1]),
            ptr::read_volatile(&raw const words[2]),
            ptr::read_volatile(&raw const words[3]),
        ])
    }
}

#[inline(always)]
fn write_words(words: &mut [u32; 4], addr: Ipv6) {
    // SAFETY: writes of the context's own field, which these hooks may write.
    unsafe {
        ptr::write_volatile(&raw mut words[0], addr.0[0]);
        ptr::write_volatile(&raw mut words[1], addr.0[1]);
        ptr::write_volatile(&raw mut words[2], addr.0[2]);
        ptr::write_volatile(&raw mut words[3], addr.0[3]);
    }
}

/// The socket address a program is given, and its socket, read through the view `V`.
struct Sock<'a, V> {
    ctx: &'a SockAddrContext,
    view: PhantomData<V>,
}

impl<'a, V: View> Sock<'a, V> {
    #[inline(always)]
    fn new(ctx: &'a SockAddrContext) -> Self {
        Self {
            ctx,
            view: PhantomData,
        }
    }

    #[inline(always)]
    fn sock_addr(&self) -> &bpf_sock_addr {
        // SAFETY: the context pointer is the program's own, valid while it runs.
        unsafe { &*self.ctx.sock_addr }
    }

    #[inline(always)]
    fn sk(&self) -> &bpf_sock {
        // SAFETY: `sk` is never null in these hooks.
        unsafe { &*self.sock_addr().__bindgen_anon_1.sk }
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        self.sock_addr().protocol as u8
    }

    /// Whether the call names an address of the view's kind and a protocol the programs
    /// translate.
    #[inline(always)]
    fn is_served(&self) -> bool {
        let proto = self.protocol();
        self.sock_addr().user_family == V::USER_FAMILY
            && (proto == proto::TCP || proto == proto::UDP)
    }

    /// The address and port (network byte order) the call names.
    #[inline(always)]
    fn address(&self) -> (V::A, u16) {
        // The port is in network byte order in the low 16 bits.
        (
            V::address(self.sock_addr()),
            self.sock_addr().user_port as u16,
        )
    }

    #[inline(always)]
    fn set_address(&self, addr: V::A, port: u16) {
        // SAFETY: as in `sock_addr`; these hooks may write the user address.
        let sock_addr = unsafe { &mut *self.ctx.sock_addr };
        V::set_address(sock_addr, addr);
        sock_addr.user_port = u32::from(port);
    }

    /// The address the socket is bound to (unspecified when unbound), or the one a
    /// datagram names with IP_PKTINFO / IPV6_PKTINFO.
    #[inline(always)]
    fn source_address(&self, call: Call) -> V::A {
        if call == Call::SendMsg {
            let named = V::message_source(self.sock_addr());
            if named != V::A::default() {
                return named;
            }
        }
        V::local(self.sk())
    }

    /// The peer the socket is connected to now, if it is (a UDP socket may connect again).
    #[inline(always)]
    fn connected_peer(&self) -> (V::A, u16) {
        let sk = self.sk();
        (V::remote(sk), sk.dst_port as u16)
    }

    #[inline(always)]
    fn cookie(&self) -> u64 {
        // SAFETY: the helper takes the program's context.
        unsafe { bpf_get_socket_cookie(self.ctx.as_ptr()) }
    }

    #[inline(always)]
    fn netns_cookie(&self) -> u64 {
        // SAFETY: as in `cookie`.
        unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
    }
}

impl Sock<'_, Inet6> {
    /// Whether the `*6` hook's address is IPv4-mapped: the call is IPv4's ([`Mapped4`]).
    #[inline(always)]
    fn names_ipv4(&self) -> bool {
        Inet6::address(self.sock_addr()).ipv4_mapped().is_some()
    }
}

/// The daemon's namespace and whether pods count, as set at load time.
#[inline(always)]
fn settings() -> (u64, bool) {
    // SAFETY: plain reads of load-time constants (volatile: the loader rewrites them).
    unsafe {
        (
            ptr::read_volatile(&raw const SOCK_LB_HOST_NETNS),
            ptr::read_volatile(&raw const SOCK_LB_ALL) != 0,
        )
    }
}

/// `connect4` and `sendmsg4`.
#[inline(always)]
pub fn forward4<M: Mode>(ctx: &SockAddrContext, mode: &M, call: Call) -> Verdict {
    forward(&Sock::<Inet4>::new(ctx), mode, call)
}

/// `connect6` and `sendmsg6`: an IPv6 frontend from IPv6's maps, an IPv4-mapped address
/// from IPv4's.
#[inline(always)]
pub fn forward6<M: Mode>(ctx: &SockAddrContext, mode: &M, call: Call) -> Verdict {
    let sock = Sock::<Inet6>::new(ctx);
    if sock.names_ipv4() {
        forward(&Sock::<Mapped4>::new(ctx), mode, call)
    } else {
        forward(&sock, mode, call)
    }
}

/// Translates a call addressed to a frontend. `mode` counts (or records, in the dry run of
/// `ebpf-proxy trace --connect`, which writes nothing).
#[inline(always)]
fn forward<M: Mode, V: View>(sock: &Sock<V>, mode: &M, call: Call) -> Verdict {
    if !sock.is_served() {
        return Verdict::Untouched;
    }
    let proto = sock.protocol();
    let netns = sock.netns_cookie();
    let (host_netns, all) = settings();
    let host = netns == host_netns;
    // Pods: TCP only, with --socket-lb all (their UDP stays with the tc path).
    if !host && (!all || proto != proto::TCP) {
        return Verdict::Untouched;
    }
    let (addr, port) = sock.address();
    let Some(frontend) = lb::frontend(&LbKey { addr, port, proto }) else {
        return Verdict::Untouched;
    };
    mode.frontend_found(&frontend);
    let flags = frontend.header.flags;
    if flags & service_flags::SOURCE_RANGES != 0 {
        if !host {
            return Verdict::Untouched;
        }
        // An unbound socket's source is chosen by the route after this hook: the node
        // itself, which the ranges admit when they hold a node address (the planner then
        // admits the frontend's own address too, kube-proxy's allowFromNode).
        let bound = sock.source_address(call);
        let source = if bound == V::A::default() {
            addr
        } else {
            bound
        };
        if !source_ranges::admits(source, &frontend) {
            mode.count(stat::SOURCE_RANGE_DENIED);
            mode.count(stat::SOCK_UNREACHABLE);
            return Verdict::Refused(EHOSTUNREACH);
        }
    }
    let now_ns = conntrack::now_ns();
    let cookie = sock.cookie();
    if call == Call::SendMsg
        && let Some((backend_addr, backend_port)) =
            kept_flow::<M, V::A>(cookie, &frontend, proto, now_ns, mode)
    {
        sock.set_address(backend_addr, backend_port);
        mode.count(stat::SOCK_SENDMSG);
        return Verdict::Translated;
    }
    // The node and pods reach an externalTrafficPolicy Local frontend's Cluster set
    // (kube-proxy's "route LOCAL traffic" and "pod traffic" rules jump to KUBE-SVC).
    let set = lb::backends_for(&frontend, || if host { Origin::Node } else { Origin::Pod });
    mode.set_chosen(&set);
    let Some(count) = NonZeroU16::new(set.count) else {
        return if set.drops_when_empty {
            mode.count(stat::SOCK_UNREACHABLE);
            Verdict::Refused(EHOSTUNREACH)
        } else {
            mode.count(stat::SOCK_REFUSED);
            Verdict::Refused(ECONNREFUSED)
        };
    };
    let client = Client::Netns(netns);
    // A drawn slot without a backend (a header the daemon did not write): unreachable.
    let Some((backend_id, backend)) = mode.chosen(lb::select_backend(
        &frontend, &set, count, client, None, now_ns,
    )) else {
        return Verdict::Refused(EHOSTUNREACH);
    };
    if !M::DRY_RUN {
        if frontend.header.affinity_timeout_s != 0 {
            affinity::remember(client, &frontend, backend_id, &backend, now_ns);
        }
        let entry = SockValue {
            addr,
            port,
            flags: if call == Call::Connect {
                sock_flags::CONNECTED
            } else {
                0
            } | if host { sock_flags::HOST } else { 0 },
            _pad: 0,
            rev_nat_id: frontend.header.rev_nat_id,
            backend_id,
            // The upper half is the process.
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            epoch: membership::epoch(),
            _align: Default::default(),
            netns_cookie: netns,
            last_used_ns: now_ns,
        };
        if call == Call::Connect && proto == proto::UDP {
            // A UDP socket may connect again: its previous peer's entry goes.
            let (peer_addr, peer_port) = sock.connected_peer();
            if peer_addr != V::A::default() {
                forget(cookie, peer_addr, peer_port, proto);
            }
        }
        let reverse = reverse_key(cookie, backend.addr, backend.port, proto);
        // A failed insert (map full of entries being removed) costs only the reverse
        // translation of this socket's answers.
        let _ = V::A::sock_xlate().insert(&reverse, &entry, 0);
        if call == Call::SendMsg {
            let flow = SockValue {
                addr: backend.addr,
                port: backend.port,
                ..entry
            };
            let _ = V::A::sock_xlate().insert(&forward_key(cookie, &frontend, proto), &flow, 0);
        }
    }
    sock.set_address(backend.addr, backend.port);
    mode.count(if call == Call::Connect {
        stat::SOCK_CONNECT
    } else {
        stat::SOCK_SENDMSG
    });
    Verdict::Translated
}

#[inline(always)]
fn forward_key<A: Family>(cookie: u64, frontend: &Frontend<A>, proto: u8) -> SockKey<A> {
    SockKey {
        cookie,
        addr: frontend.key.addr,
        port: frontend.key.port,
        proto,
        kind: sock_kind::FORWARD,
        _pad: Default::default(),
    }
}

#[inline(always)]
fn reverse_key<A: Family>(cookie: u64, addr: A, port: u16, proto: u8) -> SockKey<A> {
    SockKey {
        cookie,
        addr,
        port,
        proto,
        kind: sock_kind::REVERSE,
        _pad: Default::default(),
    }
}

/// The backend of an unconnected UDP socket's flow to `frontend`, if the flow goes on: it
/// was last used within the UDP timeout (a conntrack UDP flow that is not a stream) and its
/// backend still serves the frontend (else the flow leaves it, counted as `backend_left`).
#[inline(always)]
fn kept_flow<M: Mode, A: Family>(
    cookie: u64,
    frontend: &Frontend<A>,
    proto: u8,
    now_ns: u64,
    mode: &M,
) -> Option<(A, u16)> {
    let key = forward_key(cookie, frontend, proto);
    let entry = A::sock_xlate().get_ptr_mut(&key)?;
    // SAFETY: a successful lookup's value, valid for this run; copied out at once.
    let flow = unsafe { *entry };
    if flow.rev_nat_id != frontend.header.rev_nat_id
        || now_ns.saturating_sub(flow.last_used_ns) > conntrack::udp_timeout_ns()
    {
        return None;
    }
    let epoch = membership::epoch();
    if flow.epoch != epoch && !membership::may_stay(flow.rev_nat_id, flow.addr) {
        mode.count(stat::BACKEND_LEFT);
        return None;
    }
    if !M::DRY_RUN {
        // SAFETY: as above; only this socket's calls (under its lock) write its entries.
        unsafe {
            (*entry).last_used_ns = now_ns;
            (*entry).epoch = epoch;
        }
    }
    Some((flow.addr, flow.port))
}

/// `recvmsg4` and `getpeername4`.
#[inline(always)]
pub fn reverse4<M: Mode>(ctx: &SockAddrContext, mode: &M) {
    reverse(&Sock::<Inet4>::new(ctx), mode);
}

/// `recvmsg6` and `getpeername6`: an IPv4-mapped backend is looked up in IPv4's map.
#[inline(always)]
pub fn reverse6<M: Mode>(ctx: &SockAddrContext, mode: &M) {
    let sock = Sock::<Inet6>::new(ctx);
    if sock.names_ipv4() {
        reverse(&Sock::<Mapped4>::new(ctx), mode);
    } else {
        reverse(&sock, mode);
    }
}

/// Shows a backend the socket was translated to as its frontend, while that frontend
/// still exists. These hooks cannot fail the call.
#[inline(always)]
fn reverse<M: Mode, V: View>(sock: &Sock<V>, mode: &M) {
    if !sock.is_served() {
        return;
    }
    let proto = sock.protocol();
    let (addr, port) = sock.address();
    let key = reverse_key(sock.cookie(), addr, port, proto);
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { V::A::sock_xlate().get(&key) }).copied() else {
        return;
    };
    let frontend = LbKey {
        addr: entry.addr,
        port: entry.port,
        proto,
    };
    match lb::frontend(&frontend) {
        Some(frontend) if frontend.header.rev_nat_id == entry.rev_nat_id => {
            sock.set_address(entry.addr, entry.port);
            mode.count(stat::SOCK_REVERSE);
        }
        // The Service is gone (or another owns the address now): the backend shows.
        _ => {
            if !M::DRY_RUN {
                let _ = V::A::sock_xlate().remove(&key);
            }
        }
    }
}

/// `sock_release`: a connected socket that was translated takes its entry along (from
/// SOCK_XLATE6 for an IPv6 peer, SOCK_XLATE for an IPv4 or IPv4-mapped one). An
/// unconnected UDP socket's entries are left to the LRU: nothing here names them.
#[inline(always)]
pub fn release(ctx: &SockContext) {
    // SAFETY: the context pointer is the program's own.
    let sk = unsafe { &*ctx.sock };
    match sk.family {
        AF_INET => release_peer::<Inet4>(ctx, sk),
        AF_INET6 if Inet6::remote(sk).ipv4_mapped().is_some() => release_peer::<Mapped4>(ctx, sk),
        AF_INET6 => release_peer::<Inet6>(ctx, sk),
        _ => {}
    }
}

#[inline(always)]
fn release_peer<V: View>(ctx: &SockContext, sk: &bpf_sock) {
    let (proto, addr, port) = (sk.protocol as u8, V::remote(sk), sk.dst_port as u16);
    if addr == V::A::default() || (proto != proto::TCP && proto != proto::UDP) {
        return;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    forget(cookie, addr, port, proto);
}

#[inline(always)]
fn forget<A: Family>(cookie: u64, addr: A, port: u16, proto: u8) {
    let _ = A::sock_xlate().remove(&reverse_key(cookie, addr, port, proto));
}

/// Ends a forward hook: lets the call go on, or fails it with the verdict's errno.
#[inline(always)]
pub fn finish(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Untouched | Verdict::Translated => PROCEED,
        Verdict::Refused(errno) => fail(errno),
    }
}

/// Fails the system call with `errno` (cgroup programs set the error with
/// `bpf_set_retval`; rejecting alone gives EPERM).
#[inline(always)]
pub fn fail(errno: i32) -> i32 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// The end of `connect4`'s dry run: whatever it decided, the address is made to name
/// nothing (so the live program in a parent cgroup, which runs next, finds no frontend)
/// and the call fails with `errno`, so nothing is sent.
#[inline(always)]
pub fn abandon4(ctx: &SockAddrContext, errno: i32) -> i32 {
    abandon::<Inet4>(ctx, errno)
}

/// [`abandon4`] for `connect6`'s dry run: the address becomes `[::]:0`, which names no
/// frontend of either family (it is not IPv4-mapped).
#[inline(always)]
pub fn abandon6(ctx: &SockAddrContext, errno: i32) -> i32 {
    abandon::<Inet6>(ctx, errno)
}

#[inline(always)]
fn abandon<V: View>(ctx: &SockAddrContext, errno: i32) -> i32 {
    Sock::<V>::new(ctx).set_address(V::A::default(), 0);
    fail(errno)
}
