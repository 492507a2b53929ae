//! Map keys and values shared by the kernel programs (proxy-ebpf) and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
//! Addresses and ports are stored exactly as they appear on the wire (network byte order)
//! so the datapath compares and rewrites them without conversions; the constructors here
//! take host-order values and do the conversion once, in userspace.
#![no_std]

mod conntrack;
mod family;
mod fragment;
pub mod maglev;
pub mod sctp;
mod sock;

pub use conntrack::{
    CtKey, CtTimeouts, CtValue, EXPIRES_REMOVING, Endpoint, FlowState, Translation, Tuple,
    UDP_STREAM_AFTER_S, ct_flags, ct_seconds, ct_state, flow_expired, next_state, tcp_flags,
};
pub use family::{Address, FamilyMapNames, Ipv6};
pub use fragment::{
    FRAGMENT_TIMEOUT_NS, FragmentKey, FragmentValue, MIN_CHECKED_MTU, fragment_verdict, icmp, icmp6,
};
pub use sock::{
    ECONNREFUSED, EHOSTUNREACH, SockKey, SockValue, TRACE_ERRNO, sock_flags, sock_globals,
    sock_kind, sock_programs,
};

/// IP protocol numbers the datapath balances: the one list the parser, ICMP errors, the
/// socket hooks, the planner and the CLI go by.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    /// Balanced like TCP: its chunks drive the same conntrack states ([`crate::sctp`]).
    pub const SCTP: u8 = 132;

    /// Whether the tc datapath translates packets of `proto`.
    pub const fn is_balanced(proto: u8) -> bool {
        matches!(proto, TCP | UDP | SCTP)
    }

    /// Whether conntrack follows a handshake and a close for `proto` (TCP's flags, SCTP's
    /// chunks read as them), rather than UDP's replies and streams.
    pub const fn is_connection(proto: u8) -> bool {
        matches!(proto, TCP | SCTP)
    }

    /// Lowercase name, as kube-proxy's chain hashes and iptables' `-p` spell it.
    pub const fn name(proto: u8) -> &'static str {
        match proto {
            TCP => "tcp",
            UDP => "udp",
            SCTP => "sctp",
            _ => "?",
        }
    }
}

/// Names under which the maps are pinned (in the daemon's bpffs root) and looked up.
pub mod map_names {
    /// The layout record: each pinned map's name ([`super::LayoutName`]) → the version of
    /// its layout, written by the daemon, so a daemon of another version recognises pins
    /// whose layout differs from its own instead of misreading them. Its own layout never
    /// changes.
    pub const LAYOUT: &str = "LAYOUT";
    /// Frontend → its header (kind, ids, and where its backends sit in BACKEND_SLOTS).
    pub const SERVICES: &str = "SERVICES";
    /// One array of backend slots; each frontend owns a contiguous slice of it.
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    /// Assured flows (netfilter's term: answered, and TCP past the handshake).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Flows not yet assured, and the direct flows to backends being tracked: a flood of
    /// unanswered packets churns only this map.
    pub const CONNTRACK_PENDING: &str = "CONNTRACK_PENDING";
    /// CONNTRACK and CONNTRACK_PENDING of IPv6 flows: same entries, 16-byte addresses.
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const CONNTRACK_PENDING6: &str = "CONNTRACK_PENDING6";
    /// AFFINITY of IPv6 clients.
    pub const AFFINITY6: &str = "AFFINITY6";
    pub const STATS: &str = "STATS";
    /// Session affinity: each client's backend per Service port (written by the datapath).
    pub const AFFINITY: &str = "AFFINITY";
    /// Which endpoint addresses each frontend has now, and whether they take new
    /// connections or only keep their flows (written by the daemon for every frontend).
    pub const MEMBERSHIP: &str = "MEMBERSHIP";
    /// One counter, raised by the daemon after it changed MEMBERSHIP: a flow re-checks its
    /// backend's membership only when it changed since the flow's last check.
    pub const MEMBERSHIP_EPOCH: &str = "MEMBERSHIP_EPOCH";
    /// The conntrack idle timeouts (one `CtTimeouts`), written by the daemon from its flags.
    pub const CT_TIMEOUTS: &str = "CT_TIMEOUTS";
    /// Every backend (address, port, protocol) → its id: the datapath tracks direct flows
    /// to backends, which could clash with Service flows; the daemon and the CLI read the
    /// ids from it.
    pub const BACKEND_IDS: &str = "BACKEND_IDS";
    /// The devices the program is attached to → their kind (`device_kind`): whether a new
    /// connection comes from a pod of this node or from outside (written by the daemon).
    pub const DEVICES: &str = "DEVICES";
    /// IPv4 datagrams whose first fragment passed: what was done to it, so the later
    /// fragments (which carry no ports) follow (LRU).
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// FRAGMENTS of IPv6 datagrams (keyed by their fragment header's identification).
    pub const FRAGMENTS6: &str = "FRAGMENTS6";
    /// Metadata for people, not for packets: which Service port each frontend belongs to.
    pub const SVC_NAMES: &str = "SVC_NAMES";
    /// `loadBalancerSourceRanges`: the client prefixes each restricted frontend admits.
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    /// Maglev lookup tables, in chunks, per slice of BACKEND_SLOTS (written by the daemon).
    pub const MAGLEV: &str = "MAGLEV";
    /// The devices the XDP program runs on natively (a device map): a packet the XDP
    /// program routes out of one of them is redirected there (written by the daemon).
    pub const XDP_EGRESS: &str = "XDP_EGRESS";
    /// Not pinned: each `ebpf-proxy trace` process gets its own, private to its dry run.
    pub const TRACE: &str = "TRACE";
    /// IPv6's counterparts of SERVICES, BACKEND_SLOTS, BACKEND_IDS, MEMBERSHIP, SVC_NAMES,
    /// SOURCE_RANGES and MAGLEV: the same types with 16-byte addresses (see
    /// [`Address`](crate::Address)); their ids and slots count apart from IPv4's.
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKEND_SLOTS6: &str = "BACKEND_SLOTS6";
    pub const BACKEND_IDS6: &str = "BACKEND_IDS6";
    pub const MEMBERSHIP6: &str = "MEMBERSHIP6";
    pub const SVC_NAMES6: &str = "SVC_NAMES6";
    pub const SOURCE_RANGES6: &str = "SOURCE_RANGES6";
    pub const MAGLEV6: &str = "MAGLEV6";
    /// The programs `epx_ingress` and `epx_trace` tail-call (`tail_call`); filled by the
    /// process that loads them (pinned: a program array is emptied when no process holds
    /// it, and the attached programs outlive the daemon).
    pub const TAIL_CALLS: &str = "TAIL_CALLS";
    /// [`TAIL_CALLS`] of the XDP programs `epx_xdp` and `epx_xdp_trace` (a program array
    /// holds programs of one type only), with the same slots.
    pub const XDP_TAIL_CALLS: &str = "XDP_TAIL_CALLS";
    /// Socket-level translations, per socket cookie (see [`SockKey`](crate::SockKey)).
    pub const SOCK_XLATE: &str = "SOCK_XLATE";
    /// Session affinity of sockets: each network namespace's backend per frontend (a
    /// socket's source address is not known at `connect()`; its namespace stands for it).
    pub const SOCK_AFFINITY: &str = "SOCK_AFFINITY";
    /// SOCK_XLATE and SOCK_AFFINITY of IPv6 sockets to IPv6 frontends (16-byte addresses).
    pub const SOCK_XLATE6: &str = "SOCK_XLATE6";
    pub const SOCK_AFFINITY6: &str = "SOCK_AFFINITY6";
}

/// Key of the LAYOUT map: a map's pin name, NUL-padded.
pub type LayoutName = [u8; 32];

/// The LAYOUT map's key for `name` (`None` if it does not fit).
pub fn layout_name(name: &str) -> Option<LayoutName> {
    let mut key = [0; 32];
    key.get_mut(..name.len())?.copy_from_slice(name.as_bytes());
    Some(key)
}

/// The one tc program: attached on pod-side veths and on the node's external devices.
pub const PROGRAM_NAME: &str = "epx_ingress";

/// The XDP program (`--xdp`): the same packet path, on the external devices only, ahead of
/// the tc program there. What it decides it marks in the packet's XDP metadata
/// ([`XDP_DECIDED`]), so the tc program lets that packet pass untouched.
pub const XDP_PROGRAM_NAME: &str = "epx_xdp";

/// [`XDP_PROGRAM_NAME`] as a dry run, as [`TRACE_PROGRAM_NAME`] is to [`PROGRAM_NAME`].
pub const XDP_TRACE_PROGRAM_NAME: &str = "epx_xdp_trace";

/// The 4 bytes of XDP metadata (in front of the frame) by which the XDP program tells the
/// tc program behind it that it decided the packet — translated it or found nothing to do —
/// so tc must not look at it again. Anything else there (no metadata, or zero: the XDP
/// program left the packet to tc) and tc runs its packet path as usual.
pub const XDP_DECIDED: u32 = 0x4550_5801;

/// The conntrack reaper: removes the entries it is given whose flows are over (see
/// [`ReapRequest`]). Never attached: the daemon's garbage collector runs it with
/// BPF_PROG_TEST_RUN, so the check and the removal happen in the kernel, under the
/// datapath's own removal protocol.
pub const REAP_PROGRAM_NAME: &str = "epx_ct_reap";

/// Keys per run of [`REAP_PROGRAM_NAME`] (a test run's input must fit a page).
pub const REAP_BATCH: usize = 128;

/// The input of [`REAP_PROGRAM_NAME`]: this header, then `count` [`CtKey`]s of the family
/// named by `bits`. The program returns how many of the entries it removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReapRequest {
    /// Which map: [`trace_table::ASSURED`] (CONNTRACK) or [`trace_table::PENDING`].
    pub table: u32,
    pub count: u32,
    /// The keys' family, as [`Address::BITS`]: 32 (CONNTRACK, CONNTRACK_PENDING) or 128
    /// (CONNTRACK6, CONNTRACK_PENDING6).
    pub bits: u32,
    pub _pad: u32,
}

/// Keys of a family per run of [`REAP_PROGRAM_NAME`]: a test run's input must fit a page.
pub const fn reap_batch<A: Address>() -> usize {
    if A::BITS == 32 {
        REAP_BATCH
    } else {
        REAP_BATCH / 2
    }
}

/// The IPv6 packet path of [`PROGRAM_NAME`]: a program of its own, which `epx_ingress`
/// tail-calls through the [`map_names::TAIL_CALLS`] slot [`tail_call::IPV6`], so that the
/// IPv6 path's frames get the BPF stack to themselves. The daemon loads it and fills the
/// slot; never attached.
pub const PROGRAM6_NAME: &str = "epx_ingress6";

/// [`PROGRAM6_NAME`] of the dry run [`TRACE_PROGRAM_NAME`] (slot [`tail_call::IPV6_TRACE`]).
pub const TRACE6_PROGRAM_NAME: &str = "epx_trace6";

/// The IPv6 packet path of [`XDP_PROGRAM_NAME`], which it tail-calls through the
/// [`map_names::XDP_TAIL_CALLS`] slot [`tail_call::IPV6`], as [`PROGRAM6_NAME`] is to
/// [`PROGRAM_NAME`].
pub const XDP6_PROGRAM_NAME: &str = "epx_xdp6";

/// [`XDP6_PROGRAM_NAME`] of the dry run [`XDP_TRACE_PROGRAM_NAME`] (slot
/// [`tail_call::IPV6_TRACE`] of [`map_names::XDP_TAIL_CALLS`]).
pub const XDP_TRACE6_PROGRAM_NAME: &str = "epx_xdp_trace6";

/// Slots of the [`map_names::TAIL_CALLS`] and [`map_names::XDP_TAIL_CALLS`] program
/// arrays.
pub mod tail_call {
    pub const IPV6: u32 = 0;
    pub const IPV6_TRACE: u32 = 1;
}

/// The same packet path as [`PROGRAM_NAME`] as a dry run: it rewrites the packet it is
/// given but writes no conntrack entry and no counter, and records its decision in the
/// TRACE map. Never attached: `ebpf-proxy trace` runs it with BPF_PROG_TEST_RUN.
pub const TRACE_PROGRAM_NAME: &str = "epx_trace";

/// Key of the SERVICES map (SERVICES6 with an IPv6 address): a frontend, `addr:port/proto`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FrontendKey<A = u32> {
    /// The address, network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl FrontendKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// Bits of [`FrontendValue::flags`]: the frontend's kind (so listings can tell them
/// apart), what it does while empty, and which clients it restricts or treats apart.
pub mod service_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const EXTERNAL_IP: u16 = 1 << 2;
    pub const LOAD_BALANCER: u16 = 1 << 3;
    /// The frontend is empty only because its traffic policy is Local and none of the
    /// Service's endpoints is on this node: new connections are dropped (kube-proxy's
    /// "has no local endpoints" DROP). An empty frontend without it has no endpoints at
    /// all and refuses (kube-proxy's REJECT: ICMP port unreachable).
    pub const NO_LOCAL_ENDPOINTS: u16 = 1 << 4;
    /// A load-balancer frontend with `loadBalancerSourceRanges`: new connections from
    /// clients outside its SOURCE_RANGES prefixes are dropped (kube-proxy's KUBE-FW chain).
    pub const SOURCE_RANGES: u16 = 1 << 5;
    /// An external frontend (NodePort, externalIP, load-balancer IP) of an
    /// `externalTrafficPolicy: Local` Service: its header also names the Service port's
    /// Cluster endpoints ([`FrontendValue::cluster_count`] slots after its own), which new
    /// connections from pods of this node (and from the node itself) use instead of the
    /// local ones, without SNAT — kube-proxy's KUBE-EXT chain sends such traffic to
    /// KUBE-SVC, never to the "no local endpoints" DROP.
    pub const CLUSTER_SET: u16 = 1 << 6;
}

/// Value of the SERVICES map: a frontend's header. Its backends sit contiguously in
/// BACKEND_SLOTS: `count` from `base` on (the frontend's own set, its traffic policy's),
/// then, with `service_flags::CLUSTER_SET`, `cluster_count` more (the Service port's
/// Cluster set, for pod traffic). A new flow picks slot `random % count` of its set, which
/// gives every backend probability 1/n — the same distribution as kube-proxy's chain of
/// `-m statistic --mode random --probability 1/n, 1/(n-1), …` rules. The daemon never
/// rewrites a slice a header names: it writes a new one and then switches the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FrontendValue {
    /// Identifies the frontend in conntrack entries (for listings and flushes). 32 bits so
    /// clusters with more than 65 535 frontends fit.
    pub rev_nat_id: u32,
    /// The Service port the frontend belongs to: its ClusterIP, NodePorts, external and
    /// load-balancer IPs share it, and with it their session affinity (kube-proxy keeps
    /// one `recent` list per Service port and endpoint).
    pub service_port_id: u32,
    /// The index of the frontend's first slot in BACKEND_SLOTS (0 when it has none).
    pub base: u32,
    /// Number of backends of the frontend's own set. 0 means no endpoint is usable here.
    pub count: u16,
    /// With `service_flags::CLUSTER_SET`: the number of Cluster backends after them.
    pub cluster_count: u16,
    /// Bits of [`service_flags`].
    pub flags: u16,
    /// How a new connection chooses among the own set: 0 at random; `i + 1`: by the Maglev
    /// table of [`maglev::TABLE_SIZES`]`[i]` positions that MAGLEV holds for this slice
    /// (keyed by `base` and this value, see [`maglev::MaglevKey`]).
    pub maglev: u16,
    /// `sessionAffinity: ClientIP`: a client's new connections keep its backend while they
    /// come less than this many seconds apart. 0: no affinity.
    pub affinity_timeout_s: u32,
}

/// Where a new connection comes from, as far as the choice of backends goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Arrived on an external device (or a device the daemon did not name).
    Outside,
    /// Arrived on a pod's device: a pod of this node.
    Pod,
    /// A process of the node itself (a socket hook; kube-proxy masquerades it).
    Node,
}

/// Values of the DEVICES map: the kind of device the program is attached to.
pub mod device_kind {
    /// A device outside traffic arrives on (`--devices`).
    pub const EXTERNAL: u8 = 1;
    /// The host side of a pod's veth (`--pod-devices`).
    pub const POD: u8 = 2;
}

/// The backends a new connection chooses among: `count` slots from `first` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSet {
    pub first: u32,
    pub count: u16,
    /// The Service port's Cluster set of an externalTrafficPolicy Local frontend (see
    /// `service_flags::CLUSTER_SET`), not the frontend's own.
    pub cluster: bool,
    /// While empty, new connections are dropped rather than refused (see
    /// `service_flags::NO_LOCAL_ENDPOINTS`).
    pub drops_when_empty: bool,
}

impl BackendSet {
    /// The MEMBERSHIP bit that says an address belongs to this set (session affinity
    /// reuses a remembered backend only if it does).
    pub const fn membership_bit(&self) -> u8 {
        if self.cluster {
            membership::CLUSTER_SELECTABLE
        } else {
            membership::SELECTABLE
        }
    }
}

impl FrontendValue {
    /// Which backends a new connection from `origin` chooses among: the frontend's own,
    /// except that pods and the node reach an externalTrafficPolicy Local frontend's
    /// Cluster set (kube-proxy's "pod traffic for … external destinations" and "route
    /// LOCAL traffic" rules jump to KUBE-SVC).
    pub const fn backends_for(&self, origin: Origin) -> BackendSet {
        let from_inside = matches!(origin, Origin::Pod | Origin::Node);
        if from_inside && self.flags & service_flags::CLUSTER_SET != 0 {
            BackendSet {
                first: self.base.wrapping_add(self.count as u32),
                count: self.cluster_count,
                cluster: true,
                drops_when_empty: false,
            }
        } else {
            BackendSet {
                first: self.base,
                count: self.count,
                cluster: false,
                drops_when_empty: self.flags & service_flags::NO_LOCAL_ENDPOINTS != 0,
            }
        }
    }

    /// How many slots the frontend's slice spans (both sets).
    pub const fn slots(&self) -> u32 {
        let cluster = if self.flags & service_flags::CLUSTER_SET != 0 {
            self.cluster_count as u32
        } else {
            0
        };
        self.count as u32 + cluster
    }
}

/// Value of the BACKEND_SLOTS array: one backend of a frontend, inline, so a selection
/// reads one slot and nothing else.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Slot<A = u32> {
    pub backend: Backend<A>,
    /// The backend's id (BACKEND_IDS), recorded in conntrack entries.
    pub backend_id: u32,
    pub _pad: u32,
}

/// A backend (address, port, protocol): the key of BACKEND_IDS (value: its id, never 0),
/// and what a slot holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Backend<A = u32> {
    /// The address, network byte order.
    pub addr: A,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl Backend {
    /// Builds a backend from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// Key of the AFFINITY map (AFFINITY6 with an IPv6 client): a client of a Service port
/// with session affinity. Keyed by the client's address only, as kube-proxy's `recent`
/// lists are, and shared by all the port's frontends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey<A = u32> {
    /// The client's address, network byte order.
    pub client_addr: A,
    /// [`FrontendValue::service_port_id`].
    pub service_port_id: u32,
}

/// Key of the SOCK_AFFINITY map: a network namespace (a pod, or the node itself) as the
/// client of a Service port with session affinity, for connections translated at the
/// socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockAffinityKey {
    /// `bpf_get_netns_cookie` of the socket.
    pub netns_cookie: u64,
    /// [`FrontendValue::service_port_id`].
    pub service_port_id: u32,
    pub _pad: u32,
}

/// Value of the AFFINITY, AFFINITY6, SOCK_AFFINITY and SOCK_AFFINITY6 maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue<A: Address = u32> {
    /// The backend of the client's latest new connection (inline, so reusing it needs no
    /// other map than MEMBERSHIP).
    pub backend: Backend<A>,
    pub backend_id: u32,
    /// Aligns the time to 8 bytes: 4 bytes after an IPv4 backend, none after an IPv6 one.
    pub _pad: A::Align8Pad,
    /// `bpf_ktime_get_ns` of that connection.
    pub last_used_ns: u64,
}

/// Key of the MEMBERSHIP map (value: bits of [`membership`]): `addr` is an endpoint
/// address of the frontend `rev_nat_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MembershipKey<A = u32> {
    pub rev_nat_id: u32,
    /// The address, network byte order.
    pub addr: A,
}

/// Bits of a MEMBERSHIP value.
pub mod membership {
    /// New connections to the frontend may go to the address (it fills a slot of the
    /// frontend's own set): session affinity reuses a remembered backend only while it has
    /// this bit (or [`CLUSTER_SELECTABLE`], for the Cluster set).
    pub const SELECTABLE: u8 = 1 << 0;
    /// The endpoint is serving (ready, or terminating but serving): its UDP flows and
    /// unanswered TCP connections stay on it (kube-proxy clears only flows to endpoints
    /// that stopped serving). A flow to an address without it is given a new backend, or
    /// refused when the frontend has none left (or is gone).
    pub const SERVING: u8 = 1 << 1;
    /// The address fills a slot of the frontend's Cluster set (`service_flags::CLUSTER_SET`:
    /// what pods reaching an externalTrafficPolicy Local frontend use).
    pub const CLUSTER_SELECTABLE: u8 = 1 << 2;
}

/// The data of a SOURCE_RANGES key (an LPM trie; the value is a `u8`, always 1): the
/// frontend, then a client prefix. Keys match their first `32 + prefix length` bits, so a
/// lookup with the client's full address finds an entry exactly when one of the frontend's
/// prefixes contains it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange<A = u32> {
    /// The frontend's id. Always matched whole, so its byte order does not matter.
    pub rev_nat_id: u32,
    /// The client address or prefix, network byte order.
    pub addr: A,
}

impl<A> SourceRange<A> {
    /// Bits of the key before the address: the whole `rev_nat_id`.
    pub const FRONTEND_BITS: u32 = 32;
}

/// Indexes into the per-CPU STATS array.
pub mod stat {
    /// A new flow was DNATed to a selected backend.
    pub const NEW_FLOW: u32 = 0;
    /// A packet of an existing flow was DNATed (conntrack hit, forward).
    pub const CT_HIT: u32 = 1;
    /// A reply was reverse-NATed back to the frontend address (conntrack hit, reply).
    pub const REPLY: u32 = 2;
    /// A packet for a service frontend found no conntrack entry and went to selection.
    pub const CT_MISS: u32 = 3;
    /// A new flow could not be recorded: the entry on its own (forward) tuple was being
    /// removed or replaced by another CPU at that instant. The packet was dropped; the
    /// client's retransmission creates the flow. (A reply tuple in that state is remapped
    /// like a clash instead, see `REMAPPED`.)
    pub const CT_CREATE_FAILED: u32 = 4;
    /// The frontend has no backends on this node (traffic policy Local, see
    /// `service_flags::NO_LOCAL_ENDPOINTS`), or its refusal could not be built (IPv4
    /// options): the packet was dropped.
    pub const NO_BACKEND: u32 = 5;
    /// The drawn slot lies outside BACKEND_SLOTS or was never written (a header the
    /// daemon did not write): dropped, never sent to 0.0.0.0.
    pub const BACKEND_MISSING: u32 = 6;
    /// The packet matched no frontend and no flow and passed untouched.
    pub const PASS: u32 = 7;
    /// Not IPv4 TCP/UDP (nor a fragment of such a datagram, nor an ICMP error), or
    /// truncated: passed untouched.
    pub const NOT_HANDLED: u32 = 8;
    /// Rewriting the packet failed (helper error); the packet was dropped.
    pub const REWRITE_FAILED: u32 = 9;
    /// A packet whose source became a node address (a NodePort reply, or a hairpin through
    /// a NodePort) found no route in the FIB and was left to the kernel.
    pub const FIB_MISS: u32 = 10;
    /// The frontend has no endpoints at all: the packet was answered with an ICMP port
    /// unreachable (kube-proxy's REJECT).
    pub const REJECTED: u32 = 11;
    /// A new flow went to the client's backend by session affinity instead of a random one.
    pub const AFFINITY: u32 = 12;
    /// A new connection to a frontend with `loadBalancerSourceRanges` came from outside
    /// them and was dropped.
    pub const SOURCE_RANGE_DENIED: u32 = 13;
    /// A new flow to a backend on another node needed SNAT and found no free port in the
    /// SNAT range for its backend after a few random tries: the packet was dropped.
    pub const SNAT_FAILED: u32 = 14;
    /// A refusal (see [`REJECTED`]) was due, but the kernel's ICMP rate limits (see
    /// [`RefusalLimits`](crate::RefusalLimits)) had no room for it: the packet was dropped
    /// without an answer, as kube-proxy's REJECT does then.
    pub const REJECT_RATE_LIMITED: u32 = 15;
    /// A packet of a flow straight to a backend (through no Service), tracked so that no
    /// Service flow is created over its reply tuple: passed untouched, or with its source
    /// port remapped when it clashed with a live Service flow.
    pub const DIRECT: u32 = 16;
    /// A new flow's reply tuple belonged to another live flow, or its entry was being
    /// removed by another CPU: its source port was replaced with one of the SNAT range
    /// (netfilter's clash remap).
    pub const REMAPPED: u32 = 17;
    /// A tracked flow's backend stopped serving its frontend (a UDP flow, or a SYN not yet
    /// answered): the packet went to a newly selected backend.
    pub const BACKEND_LEFT: u32 = 18;
    /// A `connect()` to a frontend was given a backend at the socket (no packet is
    /// translated for it).
    pub const SOCK_CONNECT: u32 = 19;
    /// A datagram of an unconnected UDP socket to a frontend was sent to its flow's
    /// backend at the socket.
    pub const SOCK_SENDMSG: u32 = 20;
    /// `recvmsg()` or `getpeername()` showed the frontend in place of the backend.
    pub const SOCK_REVERSE: u32 = 21;
    /// A `connect()` or `sendmsg()` to a frontend without endpoints failed with
    /// ECONNREFUSED (kube-proxy's REJECT).
    pub const SOCK_REFUSED: u32 = 22;
    /// A `connect()` or `sendmsg()` to a frontend that drops (no local endpoint under a
    /// Local policy, a client outside the source ranges) failed with EHOSTUNREACH.
    pub const SOCK_UNREACHABLE: u32 = 23;
    /// A later fragment of a TCP/UDP datagram (no ports of its own) went the way its first
    /// fragment went: translated the same way, or passed (see
    /// [`FragmentValue`](crate::FragmentValue); dropped ones count as
    /// [`FRAGMENT_DROPPED`]).
    pub const FRAGMENT: u32 = 24;
    /// A later fragment whose first fragment this node has not seen (it came later, went
    /// elsewhere, or its record expired or was evicted): passed untouched.
    pub const FRAGMENT_UNMATCHED: u32 = 25;
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) about a
    /// tracked flow was translated as its flow is: outer addresses, the quoted packet and
    /// the checksums.
    pub const ICMP_ERROR: u32 = 26;
    /// A translated packet was too big for the device it would leave by: answered with an
    /// ICMP "fragmentation needed" to its sender, about the packet as the sender sent it,
    /// as the kernel's forwarding path answers (the packet was dropped).
    pub const FRAG_NEEDED: u32 = 27;
    /// A translated packet's TTL ran out here: answered with an ICMP "time exceeded" to its
    /// sender (rate limited like the kernel's).
    pub const TTL_EXCEEDED: u32 = 28;
    /// A packet the program routes itself could not go and no ICMP error may be sent about
    /// it (a later fragment, an ICMP error): too big for the device (a fragment cannot be
    /// fragmented there; its first fragment got "fragmentation needed"), or its TTL ran
    /// out. Dropped silently, as the kernel drops such packets.
    pub const NOT_FORWARDABLE: u32 = 29;
    /// A later fragment of a datagram whose first fragment was dropped or answered with an
    /// ICMP error in its place: dropped too, as the kernel drops a datagram it could not
    /// deliver whole.
    pub const FRAGMENT_DROPPED: u32 = 30;
    /// XDP verdicts (the XDP program on the external devices, `--xdp`). XDP_PASS of a
    /// packet the XDP program decided (translated, or nothing to do): the stack takes it on
    /// and the tc program lets it through untouched.
    pub const XDP_PASS: u32 = 31;
    /// XDP_TX: the XDP program sent the packet back out of the device it came in on
    /// (outside traffic to a backend on another node, and its replies).
    pub const XDP_TX: u32 = 32;
    /// XDP_REDIRECT: sent out of another device running the XDP program natively.
    pub const XDP_REDIRECT: u32 = 33;
    /// XDP_DROP: dropped by the XDP program (its reasons are counted like tc's).
    pub const XDP_DROP: u32 = 34;
    /// XDP_PASS untouched, left to the tc program: what only tc does (an ICMP error to
    /// send back, IP fragments, ICMP messages, a packet whose next hop has no neighbour
    /// entry yet or lies behind a device without native XDP, one that is not IPv4 TCP/UDP/SCTP;
    /// see [`to_tc`](crate::to_tc)). tc counts the path it takes.
    pub const XDP_TO_TC: u32 = 35;
    /// Number of counters (size of the STATS array).
    pub const COUNT: u32 = 36;

    /// Stable names, indexed like the constants above (used by logs, metrics and the CLI).
    pub const NAMES: [&str; COUNT as usize] = [
        "new_flow",
        "ct_hit",
        "reply",
        "ct_miss",
        "ct_create_failed",
        "no_backend",
        "backend_missing",
        "pass",
        "not_handled",
        "rewrite_failed",
        "fib_miss",
        "rejected",
        "affinity",
        "source_range_denied",
        "snat_failed",
        "reject_rate_limited",
        "direct",
        "remapped",
        "backend_left",
        "sock_connect",
        "sock_sendmsg",
        "sock_reverse",
        "sock_refused",
        "sock_unreachable",
        "fragment",
        "fragment_unmatched",
        "icmp_error",
        "frag_needed",
        "ttl_exceeded",
        "not_forwardable",
        "fragment_dropped",
        "xdp_pass",
        "xdp_tx",
        "xdp_redirect",
        "xdp_drop",
        "xdp_to_tc",
    ];
}

/// Value of the SVC_NAMES map, keyed by a frontend's `rev_nat_id`: the Service port
/// (`namespace/name:port-name`) the frontend was planned for. bpffs holds no regular
/// files, so the names live in a pinned map next to the others. The datapath never reads
/// it; listings and `ebpf-proxy explain` (whose chain names hash these strings) do.
///
/// Sized by Kubernetes' validation: namespaces and Service names are DNS labels (at most
/// 63 bytes), port names IANA service names (at most 15).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceName {
    pub namespace_len: u8,
    pub name_len: u8,
    pub port_name_len: u8,
    pub _pad: u8,
    pub namespace: [u8; ServiceName::MAX_NAME_LEN],
    pub name: [u8; ServiceName::MAX_NAME_LEN],
    pub port_name: [u8; ServiceName::MAX_PORT_NAME_LEN],
}

impl ServiceName {
    pub const MAX_NAME_LEN: usize = 63;
    pub const MAX_PORT_NAME_LEN: usize = 15;

    /// The name, or `None` when a part is longer than Kubernetes allows.
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Option<Self> {
        let mut value = Self {
            namespace_len: 0,
            name_len: 0,
            port_name_len: 0,
            _pad: 0,
            namespace: [0; Self::MAX_NAME_LEN],
            name: [0; Self::MAX_NAME_LEN],
            port_name: [0; Self::MAX_PORT_NAME_LEN],
        };
        value.namespace_len = copy_name(&mut value.namespace, namespace)?;
        value.name_len = copy_name(&mut value.name, name)?;
        value.port_name_len = copy_name(&mut value.port_name, port_name)?;
        Some(value)
    }

    pub fn namespace(&self) -> &str {
        stored_name(&self.namespace, self.namespace_len)
    }

    pub fn name(&self) -> &str {
        stored_name(&self.name, self.name_len)
    }

    /// Empty for a Service's single unnamed port.
    pub fn port_name(&self) -> &str {
        stored_name(&self.port_name, self.port_name_len)
    }
}

/// Copies `text` to the start of `field`; its length, or `None` if it does not fit.
fn copy_name(field: &mut [u8], text: &str) -> Option<u8> {
    let bytes = text.as_bytes();
    field.get_mut(..bytes.len())?.copy_from_slice(bytes);
    u8::try_from(bytes.len()).ok()
}

/// The stored text; empty if the map holds bytes no `ServiceName::new` wrote.
fn stored_name(field: &[u8], len: u8) -> &str {
    field
        .get(..usize::from(len))
        .and_then(|bytes| core::str::from_utf8(bytes).ok())
        .unwrap_or("")
}

/// What the conntrack lookup of a dry run found ([`TraceRecord::conntrack`]).
pub mod trace_ct {
    /// No entry for the packet's tuple: a new flow (or not a service packet at all).
    pub const NONE: u8 = 0;
    /// The client's FORWARD entry: the packet follows its flow's backend.
    pub const FORWARD: u8 = 1;
    /// A REPLY entry: the packet is a backend's answer, its source becomes the frontend.
    pub const REPLY: u8 = 2;
    /// A FORWARD entry marked closing, and the packet is a SYN: the client reuses the
    /// port for a new connection, which gets a fresh backend selection.
    pub const CLOSING_REUSED: u8 = 3;
    /// A FORWARD entry whose backend no longer serves the frontend, for a packet that may
    /// move (UDP, or a SYN not yet answered): a fresh backend selection.
    pub const BACKEND_LEFT: u8 = 4;
}

/// Which conntrack map held the entry of a trace ([`TraceRecord::table`]).
pub mod trace_table {
    /// CONNTRACK: an assured flow.
    pub const ASSURED: u8 = 0;
    /// CONNTRACK_PENDING: a flow not yet assured, or a direct flow being tracked.
    pub const PENDING: u8 = 1;
}

/// What the dry run learned of a new connection's origin ([`TraceRecord::origin`]).
pub mod trace_origin {
    /// Not looked up: the frontend has one backend set for everyone.
    pub const NOT_READ: u8 = 0;
    /// From outside (an external device, or one the daemon did not name).
    pub const OUTSIDE: u8 = 1;
    /// From a pod of this node (a pod device).
    pub const POD: u8 = 2;
}

/// Value of the TRACE map (one per-CPU entry): the decisions of one `epx_trace` run, for
/// `ebpf-proxy trace`. Copies of the map entries that decided are kept, so the report
/// shows what the program saw even if the daemon changes the maps a moment later.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceRecord {
    /// 1 in the copy of the CPU that ran the program: per-CPU maps are read per CPU, and
    /// userspace cannot choose where BPF_PROG_TEST_RUN runs.
    pub recorded: u8,
    /// A [`trace_ct`] constant.
    pub conntrack: u8,
    /// The [`stat`] counter the live program would have raised last: it names the path
    /// taken (`new_flow`, `ct_hit`, `reply`, `pass`, `no_backend`, …).
    pub outcome: u8,
    /// 1 when the live program would route this reverse-NATed reply itself (FIB lookup and
    /// redirect, see `ct_flags::ROUTES_ITSELF`); the dry run stops before routing.
    pub routes_reply: u8,
    /// The slot selected for a new flow, 1-based within its set (1..=count), 0 if none
    /// was.
    pub slot: u16,
    /// 1 when session affinity gave the new flow the client's previous backend (no slot
    /// was drawn).
    pub affinity: u8,
    /// A [`trace_table`] constant: where the conntrack entry was found.
    pub table: u8,
    /// The backend the packet was sent to (new flow or FORWARD entry), 0 if none.
    pub backend_id: u32,
    /// A [`trace_origin`] constant: where the new connection came from, if that mattered.
    pub origin: u8,
    /// 1 when the new connection chose among the Service port's Cluster set (see
    /// `service_flags::CLUSTER_SET`).
    pub cluster_set: u8,
    /// A [`to_tc`] constant: why the XDP program left the packet to the tc program (XDP
    /// dry runs only).
    pub to_tc: u8,
    /// 1 when the frontend's Maglev table gave the slot (else it was drawn at random).
    pub maglev: u8,
    /// SERVICES[frontend], the frontend's header (SERVICES6's for an IPv6 packet).
    pub service: FrontendValue,
    /// What an IPv4 packet's run found (zero after an IPv6 packet's).
    pub ipv4: TraceAddresses,
    /// What an IPv6 packet's run found (zero after an IPv4 packet's). Both families have
    /// their place, so one program (`epx_trace`, and the IPv6 path it tail-calls) writes
    /// one record whatever the packet; [`Address::traced`] picks a family's.
    pub ipv6: TraceAddresses<Ipv6>,
    /// A first fragment: the record its later fragments would find (the dry run writes
    /// none). A later fragment: the record it found, if [`TraceRecord::fragment_found`].
    pub fragment_record: FragmentValue,
    /// [`TraceRecord::fragment_record`] of an IPv6 fragment (FRAGMENTS6's).
    pub fragment_record6: FragmentValue<Ipv6>,
    /// A [`trace_fragment`] constant.
    pub fragment: u8,
    /// 1 when a later fragment found its datagram's record.
    pub fragment_found: u8,
    /// An ICMP error being translated: its type and code (type 0: none).
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// A [`trace_answer`] constant: an ICMP error the program sent instead of the packet.
    pub answered: u8,
    pub _pad1: u8,
    /// The egress MTU named in a "fragmentation needed" answer.
    pub mtu: u16,
    /// With [`TraceRecord::routes_reply`]: the device the FIB sends the packet out of (0 if
    /// it found no route).
    pub egress_ifindex: u32,
    pub _pad_end: u32,
}

/// The map entries of one family that decided a dry run ([`TraceRecord::ipv4`],
/// [`TraceRecord::ipv6`]): copies, so the report shows what the program saw even if the
/// daemon changes the maps a moment later.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceAddresses<A = u32> {
    /// The conntrack entry that matched, if [`TraceRecord::conntrack`] is not NONE.
    pub flow: CtValue<A>,
    /// The backend as read during the selection (its slot, or the affinity entry); zero
    /// for conntrack hits.
    pub backend: Backend<A>,
    /// The frontend looked up, zero when no lookup happened or none matched.
    pub frontend: FrontendKey<A>,
}

/// Which part of a fragmented datagram a trace saw ([`TraceRecord::fragment`]).
pub mod trace_fragment {
    /// Not a fragment.
    pub const NONE: u8 = 0;
    /// The first fragment: it carries the ports and decides for the others.
    pub const FIRST: u8 = 1;
    /// A later fragment: no ports, it follows the first.
    pub const LATER: u8 = 2;
}

/// The ICMP error the program answered a packet with ([`TraceRecord::answered`]).
pub mod trace_answer {
    pub const NONE: u8 = 0;
    /// "Fragmentation needed": too big for its egress device.
    pub const FRAG_NEEDED: u8 = 1;
    /// "Time exceeded": its TTL ran out here.
    pub const TIME_EXCEEDED: u8 = 2;
}

/// Why the XDP program left a packet, untouched, to the tc program behind it
/// ([`TraceRecord::to_tc`], and the XDP_TO_TC counter).
pub mod to_tc {
    /// It did not: XDP decided (or the run was not XDP's).
    pub const NO: u8 = 0;
    /// Not IPv4 TCP/UDP/SCTP (nor a fragment or an ICMP message): tc's parser decides.
    pub const NOT_HANDLED: u8 = 1;
    /// An ICMP error goes back in the packet's place: a refusal (port unreachable of a
    /// frontend without endpoints) or a forwarding check's answer (fragmentation needed,
    /// time exceeded). tc builds it, within the ICMP rate limits.
    pub const ANSWER: u8 = 2;
    /// The next hop's MAC address is not known yet (no neighbour entry): tc's
    /// `bpf_redirect_neigh` resolves it.
    pub const NO_NEIGHBOUR: u8 = 3;
    /// The packet leaves by another device, which runs no native XDP program: tc
    /// redirects it.
    pub const OTHER_DEVICE: u8 = 4;
    /// No route: tc hands the packet to the kernel (counted as `fib_miss`).
    pub const NO_ROUTE: u8 = 5;
    /// The driver keeps no XDP metadata, so the XDP program cannot tell tc what it
    /// decided and decides nothing.
    pub const NO_METADATA: u8 = 6;
    /// The packet's flow must choose its backend again (a SYN on the tuple of a closing
    /// connection, or its backend left): tc retires the entry and selects.
    pub const RESELECT: u8 = 7;
    /// An IP fragment, first or later: tc translates the whole datagram, its first
    /// fragment's FRAGMENTS record guiding the others, so every fragment goes one way.
    pub const FRAGMENT: u8 = 8;
    /// An ICMP message: tc translates an error about a tracked flow as its flow is.
    pub const ICMP: u8 = 9;
}

/// Default map sizes compiled into the object; the daemon can override them at load time.
/// The default SNAT source-port range (inclusive), host order: above the NodePort range
/// (30000-32767) and above Linux's default `ip_local_port_range` (32768-60999), so an SNAT
/// port never meets a NodePort nor a socket of the node's own. `--snat-port-range` changes it.
pub const SNAT_PORT_RANGE: (u16, u16) = (61000, 65535);
/// Names of the program's load-time globals holding the SNAT range (u16, host order).
pub const SNAT_PORT_MIN_GLOBAL: &str = "SNAT_PORT_MIN";
pub const SNAT_PORT_MAX_GLOBAL: &str = "SNAT_PORT_MAX";

/// How refusals (the ICMP port unreachable of a frontend without endpoints) are rate
/// limited: like the kernel's own ICMP errors, which is what kube-proxy's REJECT sends, with
/// the node's settings (`net.ipv4.icmp_ratelimit`, `icmp_ratemask`, `icmp_msgs_per_sec`,
/// `icmp_msgs_burst`), read by the daemon when it loads the program. Per client, a token
/// bucket of [`RefusalLimits::CLIENT_BURST`] refusals refilled one per `client_interval_ns`
/// (the kernel's per-peer limit); node-wide, `per_second` refusals with bursts of `burst`
/// (its global limit).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalLimits {
    /// `icmp_ratelimit`, in nanoseconds; 0 lifts the per-client limit.
    pub client_interval_ns: u64,
    /// `icmp_msgs_per_sec`.
    pub per_second: u32,
    /// `icmp_msgs_burst`.
    pub burst: u32,
    /// 0 when `icmp_ratemask` leaves "destination unreachable" out: then no limit applies
    /// to refusals.
    pub limited: u32,
    /// The same for "time exceeded" (the answer to a translated packet whose TTL ran out).
    /// "Fragmentation needed" is never limited, as in the kernel ("don't limit PMTU
    /// discovery").
    pub time_exceeded_limited: u32,
}

impl RefusalLimits {
    /// The kernel's `XRLIM_BURST_FACTOR`: a client's bucket holds this many refusals.
    pub const CLIENT_BURST: u64 = 6;
    /// The kernel's defaults (1000 ms, 1000/s, 50, a ratemask with types 3 and 11).
    pub const KERNEL_DEFAULTS: Self = Self {
        client_interval_ns: 1_000_000_000,
        per_second: 1000,
        burst: 50,
        limited: 1,
        time_exceeded_limited: 1,
    };
}

/// Name of the program's load-time global holding the [`RefusalLimits`].
pub const REFUSAL_LIMITS_GLOBAL: &str = "REFUSAL_LIMITS";

pub mod default_max_entries {
    /// Frontends.
    pub const SERVICES: u32 = 65_536;
    /// Backend slots over all frontends (16 bytes each, 4 MiB), with room for the slices
    /// the daemon writes before it frees the ones they replace.
    pub const BACKEND_SLOTS: u32 = 262_144;
    /// Distinct backends (address, port, protocol).
    pub const BACKENDS: u32 = 131_072;
    /// The daemon sizes both conntrack maps from the machine's memory (`--conntrack-memory-ratio`).
    pub const CONNTRACK: u32 = 262_144;
    pub const CONNTRACK_PENDING: u32 = 65_536;
    /// Clients × Service ports with affinity; LRU, so the least recently seen are
    /// forgotten first.
    pub const AFFINITY: u32 = 65_536;
    /// One entry per endpoint address of each frontend: about one per slot.
    pub const MEMBERSHIP: u32 = BACKEND_SLOTS;
    /// One entry per backend.
    pub const BACKEND_IDS: u32 = BACKENDS;
    /// One entry per frontend, and every frontend has a SERVICES entry, so SERVICES' size
    /// always suffices. The map is not preallocated: unused room costs nothing.
    pub const SVC_NAMES: u32 = SERVICES;
    /// Devices the program is attached to (external ones and pod veths).
    pub const DEVICES: u32 = 16_384;
    /// Prefixes over all restricted frontends; not preallocated (an LPM trie never is).
    pub const SOURCE_RANGES: u32 = 65_536;
    /// One entry per socket connected to a frontend, two per unconnected UDP flow; LRU.
    pub const SOCK_XLATE: u32 = 131_072;
    /// Network namespaces × affinity frontends; LRU.
    pub const SOCK_AFFINITY: u32 = 16_384;
    /// External devices with native XDP.
    pub const XDP_EGRESS: u32 = 256;
    /// Maglev chunks: 1024 tables of the default size (`--max-maglev-tables`); not
    /// preallocated, so only the tables that exist take memory.
    pub const MAGLEV: u32 = 1024 * crate::maglev::chunks(crate::maglev::DEFAULT_TABLE_SIZE);
    /// Fragmented datagrams in flight whose first fragment passed (Cilium's
    /// `bpf-fragments-map-max` default); LRU, about 100 bytes each.
    pub const FRAGMENTS: u32 = 8_192;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers with explicit padding
    // fields, so every bit pattern is valid and there are no implicit holes.
    use super::Address;
    // Generic over the two sealed `Address` types, whose sizes (4, 16) leave no holes.
    unsafe impl<A: Address> aya::Pod for super::FrontendKey<A> {}
    unsafe impl aya::Pod for super::FrontendValue {}
    unsafe impl aya::Pod for super::maglev::MaglevKey {}
    unsafe impl aya::Pod for super::maglev::MaglevChunk {}
    unsafe impl<A: Address> aya::Pod for super::Slot<A> {}
    unsafe impl<A: Address> aya::Pod for super::Backend<A> {}
    unsafe impl<A: Address> aya::Pod for super::CtKey<A> {}
    unsafe impl<A: Address> aya::Pod for super::CtValue<A> {}
    unsafe impl<A: Address> aya::Pod for super::AffinityKey<A> {}
    unsafe impl<A: Address> aya::Pod for super::AffinityValue<A> {}
    unsafe impl<A: Address> aya::Pod for super::MembershipKey<A> {}
    unsafe impl aya::Pod for super::CtTimeouts {}
    unsafe impl aya::Pod for super::ReapRequest {}
    unsafe impl<A: Address> aya::Pod for super::SourceRange<A> {}
    unsafe impl aya::Pod for super::ServiceName {}
    unsafe impl aya::Pod for super::TraceRecord {}
    unsafe impl<A: Address> aya::Pod for super::TraceAddresses<A> {}
    unsafe impl aya::Pod for super::RefusalLimits {}
    unsafe impl<A: Address> aya::Pod for super::SockKey<A> {}
    unsafe impl<A: Address> aya::Pod for super::SockValue<A> {}
    unsafe impl aya::Pod for super::SockAffinityKey {}
    unsafe impl<A: Address> aya::Pod for super::FragmentKey<A> {}
    unsafe impl<A: Address> aya::Pod for super::FragmentValue<A> {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FrontendKey>(), 8);
        assert_eq!(size_of::<FrontendValue>(), 24);
        assert_eq!(size_of::<Slot>(), 16);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 64);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 24);
        assert_eq!(size_of::<SockAffinityKey>(), 16);
        assert_eq!(size_of::<MembershipKey>(), 8);
        assert_eq!(size_of::<CtTimeouts>(), 32);
        assert_eq!(size_of::<RefusalLimits>(), 24);
        assert_eq!(size_of::<ServiceName>(), 4 + 63 + 63 + 15);
        assert_eq!(size_of::<TraceAddresses>(), 80);
        assert_eq!(size_of::<TraceAddresses<Ipv6>>(), 128);
        assert_eq!(size_of::<TraceRecord>(), 336);
        assert_eq!(size_of::<FragmentKey>(), 12);
        assert_eq!(size_of::<FragmentValue>(), 24);
        assert_eq!(size_of::<FragmentKey<Ipv6>>(), 40);
        assert_eq!(size_of::<FragmentValue<Ipv6>>(), 48);
        assert_eq!(size_of::<FrontendKey<Ipv6>>(), 20);
        assert_eq!(size_of::<Backend<Ipv6>>(), 20);
        assert_eq!(size_of::<Slot<Ipv6>>(), 28);
        assert_eq!(size_of::<MembershipKey<Ipv6>>(), 20);
        assert_eq!(size_of::<SourceRange<Ipv6>>(), 20);
        assert_eq!(size_of::<CtKey<Ipv6>>(), 40);
        assert_eq!(size_of::<CtValue<Ipv6>>(), 88);
        assert_eq!(size_of::<AffinityKey<Ipv6>>(), 20);
        assert_eq!(size_of::<AffinityValue<Ipv6>>(), 32);
    }

    #[test]
    fn service_names_round_trip_and_refuse_what_does_not_fit() {
        let name = ServiceName::new("kube-system", "kube-dns", "dns-tcp").unwrap();
        assert_eq!(
            (name.namespace(), name.name(), name.port_name()),
            ("kube-system", "kube-dns", "dns-tcp")
        );
        let longest = "a".repeat(63);
        assert!(ServiceName::new(&longest, &longest, "fifteen-chars-x").is_some());
        assert!(ServiceName::new(&"a".repeat(64), "web", "").is_none());
        assert!(ServiceName::new("default", "web", "sixteen-chars-xx").is_none());
    }

    #[test]
    fn constructors_store_wire_order() {
        let key = FrontendKey::new([198, 19, 0, 10], 80, proto::TCP);
        assert_eq!(key.addr.to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        let backend = Backend::new([198, 18, 1, 10], 8080, proto::UDP);
        assert_eq!(backend.port.to_ne_bytes(), 8080u16.to_be_bytes());
    }

    #[test]
    fn pods_and_the_node_reach_the_cluster_set_of_a_local_policy_frontend() {
        let local_policy = FrontendValue {
            base: 100,
            count: 1,
            cluster_count: 3,
            flags: service_flags::NODE_PORT | service_flags::CLUSTER_SET,
            ..FrontendValue::default()
        };
        let own = BackendSet {
            first: 100,
            count: 1,
            cluster: false,
            drops_when_empty: false,
        };
        let cluster = BackendSet {
            first: 101,
            count: 3,
            cluster: true,
            drops_when_empty: false,
        };
        assert_eq!(local_policy.backends_for(Origin::Outside), own);
        assert_eq!(local_policy.backends_for(Origin::Pod), cluster);
        assert_eq!(local_policy.backends_for(Origin::Node), cluster);
        assert_eq!(local_policy.slots(), 4);
        assert_eq!(cluster.membership_bit(), membership::CLUSTER_SELECTABLE);

        // No local endpoint: outside clients meet the DROP, pods still the Cluster set.
        let none_here = FrontendValue {
            count: 0,
            flags: local_policy.flags | service_flags::NO_LOCAL_ENDPOINTS,
            ..local_policy
        };
        assert!(none_here.backends_for(Origin::Outside).drops_when_empty);
        assert_eq!(none_here.backends_for(Origin::Pod).count, 3);

        // Everyone else: one set.
        let cluster_policy = FrontendValue {
            flags: service_flags::NODE_PORT,
            cluster_count: 0,
            ..local_policy
        };
        assert_eq!(cluster_policy.backends_for(Origin::Pod), own);
        assert_eq!(cluster_policy.slots(), 1);
    }

    #[test]
    fn every_counter_has_a_name() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
