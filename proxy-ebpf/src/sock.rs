//! Socket-level load balancing: the cgroup programs translate a socket's address before any
//! packet exists (Cilium's `bpf_sock.c`), with the packet path's own lookups (`lb`):
//! frontend, session affinity, random selection, membership.
//!
//! - `connect4`: a TCP or UDP `connect()` to a frontend is connected to a backend instead;
//!   without endpoints it fails with ECONNREFUSED at once (kube-proxy's REJECT), a frontend
//!   that drops fails it with EHOSTUNREACH.
//! - `sendmsg4`: each datagram of an unconnected UDP socket to a frontend goes to its flow's
//!   backend, kept like a conntrack UDP flow: until it idles past the UDP timeout or the
//!   backend stops serving the frontend.
//! - `recvmsg4`, `getpeername4`: the backend's address is shown as the frontend's again,
//!   from SOCK_XLATE (keyed by socket cookie and backend).
//! - `sock_release`: a closed connected socket's entry goes with it.
//!
//! Which sockets: those of the daemon's own network namespace (the node's processes, which
//! no tc program sees), and with `--socket-lb all` pods' TCP sockets too. Pods' UDP stays
//! with the tc path, whose conntrack moves a flow off a backend that left even for a
//! connected socket; so do frontends with source ranges for pods (the pod's address, which
//! the ranges check, is not known at `connect()`).

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval,
    },
    macros::map,
    maps::LruHashMap,
    programs::{SockAddrContext, SockContext},
};
use core::{num::NonZeroU16, ptr};
use proxy_common::{
    ECONNREFUSED, EHOSTUNREACH, Origin, SockKey, SockValue, default_max_entries, proto,
    service_flags, sock_flags, sock_kind, stat,
};

use crate::{
    affinity, conntrack,
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
/// least recently used go first when it is full.
#[map]
static SOCK_XLATE: LruHashMap<SockKey, SockValue> =
    LruHashMap::pinned(default_max_entries::SOCK_XLATE, 0);

/// The return value that lets the system call go on (0 fails it).
pub const PROCEED: i32 = 1;
const REJECT: i32 = 0;

const AF_INET: u32 = 2;

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

/// The socket address a program is given, and its socket.
pub struct Sock<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> Sock<'a> {
    #[inline(always)]
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx }
    }

    #[inline(always)]
    fn protocol(&self) -> u8 {
        // SAFETY: the context pointer is the program's own.
        unsafe { (*self.ctx.sock_addr).protocol as u8 }
    }

    #[inline(always)]
    fn is_ipv4(&self) -> bool {
        // SAFETY: as in `protocol`.
        unsafe { (*self.ctx.sock_addr).user_family == AF_INET }
    }

    /// The address the call names (the destination, or a datagram's source in recvmsg).
    #[inline(always)]
    fn address(&self) -> (u32, u16) {
        // SAFETY: as in `protocol`. The port is in network byte order in the low 16 bits.
        unsafe {
            let sock_addr = &*self.ctx.sock_addr;
            (sock_addr.user_ip4, sock_addr.user_port as u16)
        }
    }

    #[inline(always)]
    fn set_address(&self, addr: u32, port: u16) {
        // SAFETY: as in `protocol`; these hooks may write the user address.
        unsafe {
            let sock_addr = &mut *self.ctx.sock_addr;
            sock_addr.user_ip4 = addr;
            sock_addr.user_port = u32::from(port);
        }
    }

    /// The address the socket is bound to (0 when unbound), or the one a datagram names
    /// with IP_PKTINFO.
    #[inline(always)]
    fn source_address(&self, call: Call) -> u32 {
        // SAFETY: as in `protocol`; `sk` is never null in these hooks.
        unsafe {
            let sock_addr = &*self.ctx.sock_addr;
            if call == Call::SendMsg && sock_addr.msg_src_ip4 != 0 {
                return sock_addr.msg_src_ip4;
            }
            (*sock_addr.__bindgen_anon_1.sk).src_ip4
        }
    }

    /// The peer the socket is connected to now, if it is (a UDP socket may connect again).
    #[inline(always)]
    fn connected_peer(&self) -> (u32, u16) {
        // SAFETY: as in `source_address`.
        unsafe {
            let sk = &*(*self.ctx.sock_addr).__bindgen_anon_1.sk;
            (sk.dst_ip4, sk.dst_port)
        }
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

/// `connect4` and `sendmsg4`: translates a call addressed to a frontend. `mode` counts (or
/// records, in the dry run of `ebpf-proxy trace --connect`, which writes nothing).
#[inline(always)]
pub fn forward<M: Mode>(sock: &Sock, mode: &M, call: Call) -> Verdict {
    let proto = sock.protocol();
    if !sock.is_ipv4() || (proto != proto::TCP && proto != proto::UDP) {
        return Verdict::Untouched;
    }
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
        let source = match sock.source_address(call) {
            0 => addr,
            bound => bound,
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
        && let Some(backend) = kept_flow::<M>(cookie, &frontend, proto, now_ns, mode)
    {
        sock.set_address(backend.0, backend.1);
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
            netns_cookie: netns,
            last_used_ns: now_ns,
        };
        if call == Call::Connect && proto == proto::UDP {
            // A UDP socket may connect again: its previous peer's entry goes.
            let (peer_addr, peer_port) = sock.connected_peer();
            if peer_addr != 0 {
                forget(cookie, peer_addr, peer_port, proto);
            }
        }
        let reverse = SockKey {
            cookie,
            addr: backend.addr,
            port: backend.port,
            proto,
            kind: sock_kind::REVERSE,
        };
        // A failed insert (map full of entries being removed) costs only the reverse
        // translation of this socket's answers.
        let _ = SOCK_XLATE.insert(&reverse, &entry, 0);
        if call == Call::SendMsg {
            let flow = SockValue {
                addr: backend.addr,
                port: backend.port,
                ..entry
            };
            let _ = SOCK_XLATE.insert(&forward_key(cookie, &frontend, proto), &flow, 0);
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
fn forward_key(cookie: u64, frontend: &Frontend, proto: u8) -> SockKey {
    SockKey {
        cookie,
        addr: frontend.key.addr,
        port: frontend.key.port,
        proto,
        kind: sock_kind::FORWARD,
    }
}

/// The backend of an unconnected UDP socket's flow to `frontend`, if the flow goes on: it
/// was last used within the UDP timeout (a conntrack UDP flow that is not a stream) and its
/// backend still serves the frontend (else the flow leaves it, counted as `backend_left`).
#[inline(always)]
fn kept_flow<M: Mode>(
    cookie: u64,
    frontend: &Frontend,
    proto: u8,
    now_ns: u64,
    mode: &M,
) -> Option<(u32, u16)> {
    let key = forward_key(cookie, frontend, proto);
    let entry = SOCK_XLATE.get_ptr_mut(&key)?;
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

/// `recvmsg4` and `getpeername4`: shows a backend the socket was translated to as its
/// frontend, while that frontend still exists. These hooks cannot fail the call.
#[inline(always)]
pub fn reverse<M: Mode>(sock: &Sock, mode: &M) {
    let proto = sock.protocol();
    if !sock.is_ipv4() || (proto != proto::TCP && proto != proto::UDP) {
        return;
    }
    let (addr, port) = sock.address();
    let key = SockKey {
        cookie: sock.cookie(),
        addr,
        port,
        proto,
        kind: sock_kind::REVERSE,
    };
    // SAFETY: the value is copied out at once.
    let Some(entry) = (unsafe { SOCK_XLATE.get(&key) }).copied() else {
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
                let _ = SOCK_XLATE.remove(&key);
            }
        }
    }
}

/// `sock_release`: a connected socket that was translated takes its entry along. (An
/// unconnected UDP socket's entries are left to the LRU: nothing here names them.)
#[inline(always)]
pub fn release(ctx: &SockContext) {
    // SAFETY: the context pointer is the program's own.
    let (proto, addr, port) = unsafe {
        let sk = &*ctx.sock;
        (sk.protocol as u8, sk.dst_ip4, sk.dst_port)
    };
    if addr == 0 || (proto != proto::TCP && proto != proto::UDP) {
        return;
    }
    // SAFETY: the helper takes the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    forget(cookie, addr, port, proto);
}

#[inline(always)]
fn forget(cookie: u64, addr: u32, port: u16, proto: u8) {
    let key = SockKey {
        cookie,
        addr,
        port,
        proto,
        kind: sock_kind::REVERSE,
    };
    let _ = SOCK_XLATE.remove(&key);
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

/// The dry run's end: whatever it decided, the address is made to name nothing (so the
/// live program in a parent cgroup, which runs next, finds no frontend) and the call fails
/// with `errno`, so nothing is sent.
#[inline(always)]
pub fn abandon(sock: &Sock, errno: i32) -> i32 {
    sock.set_address(0, 0);
    fail(errno)
}
