//! Socket-level load balancing (the cgroup programs): the layout of the map they share
//! with the CLI, and the settings the daemon gives them at load time.
//!
//! A socket's `connect()` to a frontend (or an unconnected UDP socket's `sendmsg()`) is
//! given a backend by the same lookups as a packet's (proxy-ebpf's `lb`), and its address
//! is rewritten before any packet exists. SOCK_XLATE remembers, per socket (its cookie),
//! what was translated, so `getpeername()` and `recvmsg()` can show the frontend again
//! (Cilium's `lb4_reverse_sk`), and an unconnected UDP socket's datagrams to a frontend
//! stay on one backend like a conntrack flow.
//!
//! IPv6 sockets have SOCK_XLATE6, the same entries with 16-byte addresses; an IPv6 socket
//! that names an IPv4 peer by its IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack
//! socket) is served by IPv4's frontends and entered in SOCK_XLATE, as Cilium's
//! `sock6_xlate_v4_in_v6` does.

use crate::Address;

/// Bits of [`SockKey::kind`]: which of a socket's entries a key names.
pub mod sock_kind {
    /// `addr:port` is the backend the socket was sent to; the value holds the frontend.
    /// Looked up by `recvmsg()` (a datagram's source) and `getpeername()`.
    pub const REVERSE: u8 = 1;
    /// `addr:port` is a frontend an unconnected UDP socket sends to; the value holds the
    /// backend its datagrams go to (its flow). Looked up by `sendmsg()`.
    pub const FORWARD: u8 = 2;
}

/// Bits of [`SockValue::flags`].
pub mod sock_flags {
    /// Made by `connect()` (TCP, or a connected UDP socket); without it, by an unconnected
    /// UDP socket's `sendmsg()`.
    pub const CONNECTED: u8 = 1 << 0;
    /// The socket lives in the daemon's own network namespace (a host-network process).
    pub const HOST: u8 = 1 << 1;
}

/// Key of SOCK_XLATE (SOCK_XLATE6 with an IPv6 address): one socket (its cookie, unique
/// for the machine's uptime) and an address as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SockKey<A: Address = u32> {
    pub cookie: u64,
    /// Network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// A [`sock_kind`] constant.
    pub kind: u8,
    /// None after an IPv4 address, 4 bytes after an IPv6 one.
    pub _pad: A::WordAlign8Pad,
}

/// Value of SOCK_XLATE (SOCK_XLATE6: IPv6 addresses).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockValue<A: Address = u32> {
    /// [`sock_kind::REVERSE`]: the frontend; [`sock_kind::FORWARD`]: the backend (network
    /// byte order).
    pub addr: A,
    pub port: u16,
    /// Bits of [`sock_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// The frontend (its header's `rev_nat_id`).
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// The process (thread group) that made the translation.
    pub pid: u32,
    /// FORWARD: the membership epoch at which the backend was last found serving.
    pub epoch: u32,
    /// None after an IPv4 address, 4 bytes after an IPv6 one.
    pub _align: A::WordAlign8Pad,
    /// The socket's network namespace (`bpf_get_netns_cookie`).
    pub netns_cookie: u64,
    /// When the socket last sent to the frontend through this entry (CLOCK_MONOTONIC, ns):
    /// an unconnected UDP flow idle for the conntrack UDP timeout selects a backend anew.
    pub last_used_ns: u64,
}

/// Names of the load-time globals of the socket programs.
pub mod sock_globals {
    /// `u64`: the network namespace cookie of the daemon: sockets there are the node's own.
    pub const HOST_NETNS: &str = "SOCK_LB_HOST_NETNS";
    /// `u8`: 1 when pods' sockets are translated too (`--socket-lb all`).
    pub const ALL: &str = "SOCK_LB_ALL";
}

/// The socket programs, each with the cgroup hook it is attached to.
pub mod sock_programs {
    pub const CONNECT4: &str = "epx_connect4";
    pub const SENDMSG4: &str = "epx_sendmsg4";
    pub const RECVMSG4: &str = "epx_recvmsg4";
    pub const GETPEERNAME4: &str = "epx_getpeername4";
    /// The IPv6 hooks: IPv6 frontends, and IPv4 ones named by IPv4-mapped addresses.
    pub const CONNECT6: &str = "epx_connect6";
    pub const SENDMSG6: &str = "epx_sendmsg6";
    pub const RECVMSG6: &str = "epx_recvmsg6";
    pub const GETPEERNAME6: &str = "epx_getpeername6";
    pub const SOCK_RELEASE: &str = "epx_sock_release";
    /// `connect4` as a dry run for `ebpf-proxy trace --connect`: records its decision in
    /// TRACE and refuses the `connect()` with [`TRACE_ERRNO`](super::TRACE_ERRNO), so
    /// nothing is sent and nothing is written. Attached only to the CLI's own short-lived
    /// cgroup.
    pub const CONNECT4_TRACE: &str = "epx_connect4_trace";
    /// `connect6` as a dry run, likewise: an IPv6 frontend from IPv6's maps, an
    /// IPv4-mapped address from IPv4's, as `connect6` serves them.
    pub const CONNECT6_TRACE: &str = "epx_connect6_trace";
}

/// The errno the dry runs of `connect4` and `connect6` end every traced `connect()` with
/// (ENOTRECOVERABLE, which no connect() returns otherwise): the CLI tells its own refusal
/// from others.
pub const TRACE_ERRNO: i32 = 131;

/// The errno a `connect()` or `sendmsg()` to a frontend without endpoints gets: kube-proxy's
/// REJECT answers with an ICMP port unreachable, which a socket reports as this.
pub const ECONNREFUSED: i32 = 111;
/// The errno of a frontend that drops (kube-proxy's DROP: a Local traffic policy without a
/// local endpoint, a client outside `loadBalancerSourceRanges`): the socket is told at once
/// instead of waiting for its timeout.
pub const EHOSTUNREACH: i32 = 113;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    use crate::Ipv6;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(size_of::<SockValue>(), 40);
        // 8 + 16 + 4 + 4 (explicit) and 16 + 4 + 16 + 4 (explicit) + 16.
        assert_eq!(size_of::<SockKey<Ipv6>>(), 32);
        assert_eq!(size_of::<SockValue<Ipv6>>(), 56);
    }
}
