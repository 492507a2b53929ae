//! Connection tracking: the entry layout and the rules that the datapath, the garbage
//! collector and the CLI share, so the three never disagree.
//!
//! A tracked flow has two entries, each keyed by a tuple as it appears on the wire: the
//! client's (client → frontend) and the backend's (backend → peer, where the peer is what
//! the backend sees as its client). Each entry holds the tuple its packets are rewritten
//! to, so the entry of the other direction is always keyed by the reverse of that tuple
//! ([`CtKey::partner`]) — netfilter's original and reply tuples. Two entries are needed
//! because a reply carries nothing that names its frontend; Katran keeps one because its
//! replies bypass it (direct server return).
//!
//! The translation of a flow is decided once, for its first packet, by [`Translation`]:
//! backend, reverse NAT, hairpin, SNAT, a port remap after a clash, and which directions
//! the program routes itself. Both entries are derived from that one record.

use crate::{Address, proto, service_flags};

/// Addresses and ports of a packet as on the wire (network byte order), of either family
/// (`A`: its [`Address`], IPv4 by default).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Tuple<A = u32> {
    pub src_addr: A,
    pub dst_addr: A,
    pub src_port: u16,
    pub dst_port: u16,
}

impl<A: Address> Tuple<A> {
    /// The same flow seen from the other end.
    pub const fn reversed(self) -> Self {
        Self {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// Key of the CONNTRACK and CONNTRACK_PENDING maps (CONNTRACK6 and CONNTRACK_PENDING6 with
/// IPv6 addresses): a packet's tuple and protocol. Which side of its flow an entry is for
/// is in its value (`ct_flags::REPLY`), so one lookup serves a packet in either direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey<A = u32> {
    pub tuple: Tuple<A>,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl<A: Address> CtKey<A> {
    pub const fn new(tuple: Tuple<A>, proto: u8) -> Self {
        Self {
            tuple,
            proto,
            _pad: [0; 3],
        }
    }

    /// The key of the other entry of `value`'s flow: the reverse of the tuple its packets
    /// become.
    pub const fn partner(value: &CtValue<A>, proto: u8) -> Self {
        Self::new(value.to.reversed(), proto)
    }

    /// Whether `partner` (found at `CtKey::partner` of this key's entry) points back here:
    /// the two entries belong to one flow. A key can be taken over by a newer flow.
    pub fn is_mutual(&self, partner: &CtValue<A>) -> bool {
        // Field by field: no reversed copy (40 bytes of a BPF frame for an IPv6 tuple).
        let (to, tuple) = (&partner.to, &self.tuple);
        to.src_addr == tuple.dst_addr
            && to.dst_addr == tuple.src_addr
            && to.src_port == tuple.dst_port
            && to.dst_port == tuple.src_port
    }
}

/// Bits of [`CtValue::flags`]: which side of the flow an entry is, and how the flow is
/// translated. Written once, when the flow is created.
pub mod ct_flags {
    /// The backend's entry (keyed backend → peer); without it, the client's.
    pub const REPLY: u8 = 1 << 0;
    /// Packets of this entry leave with one of the node's own addresses as source (a
    /// NodePort reply, both directions of an SNAT flow, a hairpin through a NodePort). The
    /// kernel drops forwarded packets with a local source as martians, so the program
    /// routes them itself (FIB lookup + redirect).
    pub const ROUTES_ITSELF: u8 = 1 << 1;
    /// Hairpin: the client is its own backend. Its source becomes the frontend address
    /// (kube-proxy masquerades these), so its kernel does not see its own address as source.
    pub const HAIRPIN: u8 = 1 << 2;
    /// SNAT: outside traffic to a backend reached through the device it came in on (a
    /// backend on another node) gets a node address and a port of the SNAT range as source
    /// (kube-proxy's MASQUERADE), so the replies come back through this node.
    pub const SNAT: u8 = 1 << 3;
    /// The client's source port was replaced with one of the SNAT range because its reply
    /// tuple belonged to another live flow (netfilter's `get_unique_tuple`).
    pub const REMAPPED: u8 = 1 << 4;
    /// A flow straight to a backend, through no Service: tracked only so no Service flow is
    /// created over its reply tuple (and the reverse). Untranslated unless `REMAPPED`.
    pub const DIRECT: u8 = 1 << 5;
}

/// Bits of [`CtValue::state`]: what the flow has seen. Set with atomic ORs in both entries,
/// never cleared while the flow lives, so concurrent packets cannot lose a transition.
pub mod ct_state {
    /// The backend answered.
    pub const REPLIED: u64 = 1 << 0;
    /// Netfilter's ASSURED: TCP, the client spoke after the backend's answer (the
    /// handshake completed); UDP, traffic after a reply and at least
    /// [`super::UDP_STREAM_AFTER_S`] after the start (a stream). Assured flows move from
    /// CONNTRACK_PENDING to CONNTRACK, where nothing unanswered can evict them.
    pub const ASSURED: u64 = 1 << 1;
    /// TCP: the client sent a FIN.
    pub const FIN_CLIENT: u64 = 1 << 2;
    /// TCP: the backend sent a FIN.
    pub const FIN_BACKEND: u64 = 1 << 3;
    /// TCP: either side sent a reset.
    pub const RST: u64 = 1 << 4;
    /// The connection is ending: a new SYN on the client's tuple is a new connection.
    pub const CLOSING: u64 = FIN_CLIENT | FIN_BACKEND | RST;
}

/// TCP header flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Conntrack time: whole seconds of CLOCK_MONOTONIC (the datapath reads the coarse clock,
/// `bpf_ktime_get_coarse_ns`). A multiplication and shifts instead of a division, which
/// costs tens of nanoseconds in a BPF program; the result is off from true seconds by less
/// than one part in ten million, and every reader uses this same function.
pub const fn ct_seconds(monotonic_ns: u64) -> u32 {
    // 2^50 / 10^9 ≈ 1 125 900: seconds = (ns >> 20) · 2^20 / 10^9 = ((ns >> 20) · 1 125 900) >> 30.
    // No overflow for 540 years of uptime.
    (((monotonic_ns >> 20) * 1_125_900) >> 30) as u32
}

/// A UDP flow that still sees traffic this long after its start, with a reply, is a stream
/// (netfilter's rule: "still active after two seconds").
pub const UDP_STREAM_AFTER_S: u32 = 2;

/// [`CtValue::expires_ns`] of an entry that is being removed: whoever set it (with a
/// compare-and-exchange from the expiry it saw) deletes the key; nobody else writes or
/// replaces the entry meanwhile, so a deletion never hits a flow created in its place.
pub const EXPIRES_REMOVING: u64 = 0;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Value of the conntrack maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue<A = u32> {
    /// The tuple this entry's packets are rewritten to: for the client's entry
    /// peer → backend, for the backend's entry frontend → client. Equal to the key's
    /// tuple when nothing is rewritten (a direct flow).
    pub to: Tuple<A>,
    /// The frontend (SERVICES' `rev_nat_id`); 0 for a direct flow.
    pub rev_nat_id: u32,
    /// The backend chosen (its BACKEND_IDS id); 0 for a direct flow.
    pub backend_id: u32,
    /// Bits of [`ct_flags`].
    pub flags: u8,
    pub _pad: [u8; 3],
    /// [`ct_seconds`] when the flow was created.
    pub created: u32,
    /// The MEMBERSHIP_EPOCH at which the backend was last found serving the frontend.
    pub epoch: u32,
    /// Bits of [`ct_state`], shared by both entries (64 bits: BPF's atomic OR is).
    pub state: u64,
    /// Coarse CLOCK_MONOTONIC nanoseconds after which this entry is idle past its timeout
    /// (refreshed by its packets, from the flow's state); [`EXPIRES_REMOVING`] while it is
    /// being removed. The flow ends when both entries expired.
    pub expires_ns: u64,
    /// Packets and bytes that matched this entry.
    pub packets: u64,
    pub bytes: u64,
}

impl<A> CtValue<A> {
    pub const fn is_reply(&self) -> bool {
        self.flags & ct_flags::REPLY != 0
    }

    /// This entry's own idle time ran out, or it is being removed.
    pub const fn entry_expired(&self, now_ns: u64) -> bool {
        self.expires_ns == EXPIRES_REMOVING || self.expires_ns < now_ns
    }

    /// The connection is over: a reset, or a FIN from both sides.
    pub const fn is_closed(&self) -> bool {
        let both_fins = ct_state::FIN_CLIENT | ct_state::FIN_BACKEND;
        self.state & ct_state::RST != 0 || self.state & both_fins == both_fins
    }
}

/// Whether the flow of the entry `value` at `key` is over: its entry expired, and so did
/// its partner (or the partner is gone, or belongs to a newer flow). One direction alone
/// keeps a flow alive, as netfilter's single entry does.
pub fn flow_expired<A: Address>(
    key: &CtKey<A>,
    value: &CtValue<A>,
    partner: Option<&CtValue<A>>,
    now_ns: u64,
) -> bool {
    value.entry_expired(now_ns)
        && match partner {
            Some(partner) => !key.is_mutual(partner) || partner.entry_expired(now_ns),
            None => true,
        }
}

/// The flow's state after one more packet (`tcp`: the TCP flag byte, SCTP's first chunk
/// read as one, 0 for UDP; `now` and
/// `created` in [`ct_seconds`]).
pub fn next_state(
    proto: u8,
    state: u64,
    from_backend: bool,
    tcp: u8,
    now: u32,
    created: u32,
) -> u64 {
    let mut next = state;
    if from_backend {
        next |= ct_state::REPLIED;
    }
    if proto::is_connection(proto) {
        if tcp & tcp_flags::RST != 0 {
            next |= ct_state::RST;
        }
        if tcp & tcp_flags::FIN != 0 {
            next |= if from_backend {
                ct_state::FIN_BACKEND
            } else {
                ct_state::FIN_CLIENT
            };
        }
        let handshake_done = !from_backend
            && state & ct_state::REPLIED != 0
            && tcp & (tcp_flags::SYN | tcp_flags::RST) == 0;
        if handshake_done {
            next |= ct_state::ASSURED;
        }
    } else if next & ct_state::REPLIED != 0 && now.wrapping_sub(created) >= UDP_STREAM_AFTER_S {
        next |= ct_state::ASSURED;
    }
    next
}

/// A flow's state by name, as netfilter names TCP states. SCTP associations take the TCP
/// states (their chunks read as TCP flags, `sctp::tcp_flags_of`): INIT is `syn_sent`, INIT
/// ACK `syn_recv`, COOKIE ECHO makes it `established`, SHUTDOWN and SHUTDOWN ACK close it
/// like FINs, ABORT and SHUTDOWN COMPLETE like a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// TCP: the client's first packet, no answer yet.
    SynSent,
    /// TCP: the backend answered, the client has not completed the handshake.
    SynRecv,
    Established,
    /// TCP: one side sent a FIN, the other may still send (netfilter's FIN_WAIT and
    /// CLOSE_WAIT, not told apart: the longer timeout applies).
    CloseWait,
    /// TCP: both sides sent a FIN.
    TimeWait,
    /// TCP: a reset.
    Close,
    /// UDP: no answer yet.
    Unreplied,
    /// UDP: answered, not (yet) a stream.
    Replied,
    /// UDP: a stream (netfilter's ASSURED).
    Stream,
}

impl FlowState {
    pub fn of(proto: u8, state: u64) -> Self {
        let both_fins = ct_state::FIN_CLIENT | ct_state::FIN_BACKEND;
        let fins = state & both_fins;
        if !proto::is_connection(proto) {
            return if state & ct_state::ASSURED != 0 {
                Self::Stream
            } else if state & ct_state::REPLIED != 0 {
                Self::Replied
            } else {
                Self::Unreplied
            };
        }
        if state & ct_state::RST != 0 {
            Self::Close
        } else if fins == both_fins {
            Self::TimeWait
        } else if fins != 0 {
            Self::CloseWait
        } else if state & ct_state::ASSURED != 0 {
            Self::Established
        } else if state & ct_state::REPLIED != 0 {
            Self::SynRecv
        } else {
            Self::SynSent
        }
    }

    /// Stable names (CLI and JSON).
    pub const fn name(self) -> &'static str {
        match self {
            Self::SynSent => "syn_sent",
            Self::SynRecv => "syn_recv",
            Self::Established => "established",
            Self::CloseWait => "close_wait",
            Self::TimeWait => "time_wait",
            Self::Close => "close",
            Self::Unreplied => "unreplied",
            Self::Replied => "replied",
            Self::Stream => "stream",
        }
    }
}

/// Idle timeouts per state, in seconds: a flow is forgotten this long after its last
/// packet. The value of the CT_TIMEOUTS map (one entry), which the daemon writes from its
/// flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_close_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    /// A UDP flow that is not a stream (unanswered, or a single exchange).
    pub udp: u32,
    pub udp_stream: u32,
}

impl CtTimeouts {
    /// netfilter's defaults, with kube-proxy's settings for established (24 h,
    /// `--conntrack-tcp-timeout-established`) and close-wait (1 h,
    /// `--conntrack-tcp-timeout-close-wait`).
    pub const DEFAULT: Self = Self {
        tcp_syn_sent: 120,
        tcp_syn_recv: 60,
        tcp_established: 86_400,
        tcp_close_wait: 3_600,
        tcp_time_wait: 120,
        tcp_close: 10,
        udp: 30,
        udp_stream: 120,
    };

    /// The expiry of a flow in `state` whose latest packet is now.
    pub fn expiry_ns(&self, proto: u8, state: u64, now_ns: u64) -> u64 {
        now_ns.wrapping_add(u64::from(self.of(proto, state)) * NANOS_PER_SECOND)
    }

    /// The idle timeout of a flow in `state`, in seconds.
    pub fn of(&self, proto: u8, state: u64) -> u32 {
        match FlowState::of(proto, state) {
            FlowState::SynSent => self.tcp_syn_sent,
            FlowState::SynRecv => self.tcp_syn_recv,
            FlowState::Established => self.tcp_established,
            FlowState::CloseWait => self.tcp_close_wait,
            FlowState::TimeWait => self.tcp_time_wait,
            FlowState::Close => self.tcp_close,
            FlowState::Unreplied | FlowState::Replied => self.udp,
            FlowState::Stream => self.udp_stream,
        }
    }
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The translation of one flow, decided for its first packet: the one record both of its
/// conntrack entries are derived from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Translation<A = u32> {
    pub proto: u8,
    /// What the client sends: client → frontend (a direct flow: client → backend).
    pub original: Tuple<A>,
    /// What the backend answers: backend → peer. The peer is the client, or for hairpin
    /// the frontend address with the client's port, for SNAT a node address and SNAT port,
    /// after a clash the client with a remapped port.
    pub reply: Tuple<A>,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// `HAIRPIN`, `SNAT`, `REMAPPED`, `DIRECT` (see [`ct_flags`]).
    pub kind: u8,
    /// Whether each direction leaves with a node address as source (`ROUTES_ITSELF`).
    pub forward_routes_itself: bool,
    pub reply_routes_itself: bool,
}

/// An address and port, wire order.
pub type Endpoint<A = u32> = (A, u16);

impl<A: Address> Translation<A> {
    /// Whether a new flow of this frontend to `backend`, chosen from `set`, may need SNAT,
    /// so the datapath asks the FIB whether the backend is on another node: outside
    /// traffic (not to a ClusterIP) that is not hairpin. Pods taking an
    /// externalTrafficPolicy Local frontend's Cluster set keep their address, as
    /// kube-proxy's "pod traffic for … external destinations" rule jumps to KUBE-SVC
    /// without marking it for masquerade.
    pub fn may_snat(
        frontend_flags: u16,
        set: &crate::BackendSet,
        client_addr: A,
        backend_addr: A,
    ) -> bool {
        frontend_flags & service_flags::CLUSTER_IP == 0
            && !set.cluster
            && client_addr != backend_addr
    }

    /// A flow from `client` to a frontend sent to `backend`. `snat_source`: the node
    /// address to use as source when [`Self::may_snat`] and the backend is on another node;
    /// its port is set by [`Self::set_peer_port`].
    #[allow(clippy::too_many_arguments)]
    pub fn service(
        proto: u8,
        client: Endpoint<A>,
        frontend: Endpoint<A>,
        frontend_flags: u16,
        rev_nat_id: u32,
        backend: Endpoint<A>,
        backend_id: u32,
        snat_source: Option<A>,
    ) -> Self {
        let node_port = frontend_flags & service_flags::NODE_PORT != 0;
        let hairpin = backend.0 == client.0;
        let (peer, kind) = match snat_source {
            _ if hairpin => ((frontend.0, client.1), ct_flags::HAIRPIN),
            Some(node) => ((node, 0), ct_flags::SNAT),
            None => (client, 0),
        };
        let snat = kind == ct_flags::SNAT;
        Self {
            proto,
            original: tuple(client, frontend),
            reply: tuple(backend, peer),
            rev_nat_id,
            backend_id,
            kind,
            forward_routes_itself: snat || (hairpin && node_port),
            reply_routes_itself: snat || node_port,
        }
    }

    /// A flow from `client` straight to `backend`.
    pub fn direct(proto: u8, client: Endpoint<A>, backend: Endpoint<A>) -> Self {
        let mut flow = Self::default();
        flow.set_direct(proto, client, backend);
        flow
    }

    /// Makes this [`Self::direct`], field by field (in place: the datapath's flows live in
    /// a map's scratch entry).
    pub fn set_direct(&mut self, proto: u8, client: Endpoint<A>, backend: Endpoint<A>) {
        self.proto = proto;
        self.original = tuple(client, backend);
        self.reply = tuple(backend, client);
        self.rev_nat_id = 0;
        self.backend_id = 0;
        self.kind = ct_flags::DIRECT;
        self.forward_routes_itself = false;
        self.reply_routes_itself = false;
    }

    /// SNAT flows: the port of the peer (node address) the backend answers to.
    pub fn needs_port(&self) -> bool {
        self.kind & ct_flags::SNAT != 0
    }

    pub fn set_peer_port(&mut self, port: u16) {
        self.reply.dst_port = port;
    }

    /// The reply tuple belongs to another live flow: answer to `port` instead, restored to
    /// the client's own port on the way back.
    pub fn remap(&mut self, port: u16) {
        self.reply.dst_port = port;
        if !self.needs_port() {
            self.kind |= ct_flags::REMAPPED;
        }
    }

    pub fn forward_key(&self) -> CtKey<A> {
        CtKey::new(self.original, self.proto)
    }

    pub fn reply_key(&self) -> CtKey<A> {
        CtKey::new(self.reply, self.proto)
    }

    /// [`Self::forward_key`] and [`Self::reply_key`], written over `forward` and `reply`
    /// field by field (the datapath keeps them in scratch memory).
    pub fn write_keys(&self, forward: &mut CtKey<A>, reply: &mut CtKey<A>) {
        forward.tuple = self.original;
        forward.proto = self.proto;
        forward._pad = [0; 3];
        reply.tuple = self.reply;
        reply.proto = self.proto;
        reply._pad = [0; 3];
    }

    /// The client's entry: its packets become peer → backend.
    pub fn forward_entry(&self, created: u32, expires_ns: u64) -> CtValue<A> {
        let mut entry = CtValue::default();
        self.write_forward_entry(&mut entry, created, expires_ns);
        entry
    }

    /// The backend's entry: its packets become frontend → client.
    pub fn reply_entry(&self, created: u32, expires_ns: u64) -> CtValue<A> {
        let mut entry = CtValue::default();
        self.write_reply_entry(&mut entry, created, expires_ns);
        entry
    }

    /// [`Self::forward_entry`], written over `entry` field by field (the datapath builds
    /// it in a map's scratch entry: an IPv6 entry built on the stack and copied would not
    /// fit the BPF stack frame).
    pub fn write_forward_entry(&self, entry: &mut CtValue<A>, created: u32, expires_ns: u64) {
        let routes = if self.forward_routes_itself {
            ct_flags::ROUTES_ITSELF
        } else {
            0
        };
        self.write_entry(entry, &self.reply, self.kind | routes, created, expires_ns);
    }

    /// [`Self::reply_entry`], written over `entry` field by field.
    pub fn write_reply_entry(&self, entry: &mut CtValue<A>, created: u32, expires_ns: u64) {
        let routes = if self.reply_routes_itself {
            ct_flags::ROUTES_ITSELF
        } else {
            0
        };
        let flags = self.kind | ct_flags::REPLY | routes;
        self.write_entry(entry, &self.original, flags, created, expires_ns);
    }

    /// Writes the entry whose packets become the reverse of `reversed`.
    fn write_entry(
        &self,
        entry: &mut CtValue<A>,
        reversed: &Tuple<A>,
        flags: u8,
        created: u32,
        expires_ns: u64,
    ) {
        entry.to.src_addr = reversed.dst_addr;
        entry.to.dst_addr = reversed.src_addr;
        entry.to.src_port = reversed.dst_port;
        entry.to.dst_port = reversed.src_port;
        entry.rev_nat_id = self.rev_nat_id;
        entry.backend_id = self.backend_id;
        entry.flags = flags;
        entry._pad = [0; 3];
        entry.created = created;
        entry.epoch = 0;
        entry.state = 0;
        entry.expires_ns = expires_ns;
        entry.packets = 0;
        entry.bytes = 0;
    }
}

const fn tuple<A: Address>(src: Endpoint<A>, dst: Endpoint<A>) -> Tuple<A> {
    Tuple {
        src_addr: src.0,
        dst_addr: dst.0,
        src_port: src.1,
        dst_port: dst.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_flags;

    const CLIENT: Endpoint = (0x0a00_0001, 40_000);
    const VIP: Endpoint = (0x0a00_0064, 80);
    const BACKEND: Endpoint = (0x0a00_0002, 8080);
    const NODE: u32 = 0x0a00_00fe;

    fn translation(client: Endpoint, flags: u16, snat: Option<u32>) -> Translation {
        Translation::service(proto::TCP, client, VIP, flags, 7, BACKEND, 3, snat)
    }

    #[test]
    fn entries_of_a_flow_are_each_others_partners() {
        let cases = [
            translation(CLIENT, service_flags::CLUSTER_IP, None),
            translation((BACKEND.0, 40_000), service_flags::NODE_PORT, None),
            {
                let mut snat = translation(CLIENT, service_flags::NODE_PORT, Some(NODE));
                snat.set_peer_port(61_000);
                snat
            },
            {
                let mut remapped = translation(CLIENT, service_flags::CLUSTER_IP, None);
                remapped.remap(61_001);
                remapped
            },
            Translation::direct(proto::UDP, CLIENT, BACKEND),
        ];
        for t in cases {
            let (forward_key, reply_key) = (t.forward_key(), t.reply_key());
            let (forward, reply) = (t.forward_entry(1, 2), t.reply_entry(1, 2));
            assert_eq!(CtKey::partner(&forward, t.proto), reply_key, "{t:?}");
            assert_eq!(CtKey::partner(&reply, t.proto), forward_key, "{t:?}");
            assert!(forward_key.is_mutual(&reply) && reply_key.is_mutual(&forward));
            assert!(reply.is_reply() && !forward.is_reply());
        }
    }

    #[test]
    fn the_rule_decides_peer_and_routing() {
        let plain = translation(CLIENT, service_flags::CLUSTER_IP, None);
        assert_eq!(
            plain.forward_entry(0, 0).to,
            Tuple {
                src_addr: CLIENT.0,
                dst_addr: BACKEND.0,
                src_port: CLIENT.1,
                dst_port: BACKEND.1
            }
        );
        assert_eq!(
            plain.reply_entry(0, 0).to,
            Tuple {
                src_addr: VIP.0,
                dst_addr: CLIENT.0,
                src_port: VIP.1,
                dst_port: CLIENT.1
            }
        );
        assert_eq!(plain.forward_entry(0, 0).flags, 0);

        // A pod reaching itself through a NodePort: the frontend address as source, and
        // both directions leave with a node address.
        let hairpin = translation((BACKEND.0, 40_000), service_flags::NODE_PORT, Some(NODE));
        assert_eq!(hairpin.kind, ct_flags::HAIRPIN, "hairpin wins over SNAT");
        assert_eq!(hairpin.reply.dst_addr, VIP.0);
        assert_eq!(
            hairpin.forward_entry(0, 0).flags,
            ct_flags::HAIRPIN | ct_flags::ROUTES_ITSELF
        );

        let mut snat = translation(CLIENT, service_flags::NODE_PORT, Some(NODE));
        assert!(snat.needs_port());
        snat.remap(61_000);
        assert_eq!(snat.kind, ct_flags::SNAT, "an SNAT port is no remap");
        assert_eq!(
            snat.reply_entry(0, 0).flags,
            ct_flags::SNAT | ct_flags::REPLY | ct_flags::ROUTES_ITSELF
        );
        let own = crate::BackendSet {
            first: 0,
            count: 1,
            cluster: false,
            drops_when_empty: false,
        };
        let pods_cluster_set = crate::BackendSet {
            cluster: true,
            ..own
        };
        let may_snat = |flags, set, client| Translation::may_snat(flags, set, client, BACKEND.0);
        assert!(!may_snat(service_flags::CLUSTER_IP, &own, CLIENT.0));
        assert!(
            !may_snat(service_flags::NODE_PORT, &own, BACKEND.0),
            "hairpin"
        );
        assert!(may_snat(service_flags::LOAD_BALANCER, &own, CLIENT.0));
        assert!(!may_snat(
            service_flags::NODE_PORT | service_flags::CLUSTER_SET,
            &pods_cluster_set,
            CLIENT.0
        ));
    }

    #[test]
    fn tcp_states_follow_the_handshake_and_the_close() {
        use tcp_flags::{ACK, FIN, RST, SYN};
        let tcp =
            |state, from_backend, flags| next_state(proto::TCP, state, from_backend, flags, 10, 10);
        let syn_sent = tcp(0, false, SYN);
        assert_eq!(FlowState::of(proto::TCP, syn_sent), FlowState::SynSent);
        let syn_recv = tcp(syn_sent, true, SYN | ACK);
        assert_eq!(FlowState::of(proto::TCP, syn_recv), FlowState::SynRecv);
        assert_eq!(tcp(syn_recv, false, SYN), syn_recv, "a retransmitted SYN");
        let established = tcp(syn_recv, false, ACK);
        assert_eq!(
            FlowState::of(proto::TCP, established),
            FlowState::Established
        );
        let half_closed = tcp(established, false, FIN | ACK);
        assert_eq!(FlowState::of(proto::TCP, half_closed), FlowState::CloseWait);
        let closed = tcp(half_closed, true, FIN | ACK);
        assert_eq!(FlowState::of(proto::TCP, closed), FlowState::TimeWait);
        assert!(
            CtValue::<u32> {
                state: closed,
                ..CtValue::default()
            }
            .is_closed()
        );
        let refused = tcp(syn_sent, true, RST | ACK);
        assert_eq!(FlowState::of(proto::TCP, refused), FlowState::Close);
        assert_eq!(refused & ct_state::ASSURED, 0);
        // Picked up mid-stream: the client's first packet is not a SYN.
        assert_eq!(
            FlowState::of(proto::TCP, tcp(0, false, ACK)),
            FlowState::SynSent
        );
    }

    #[test]
    fn sctp_associations_take_the_tcp_states_from_their_chunks() {
        use crate::sctp::{chunk, tcp_flags_of};
        const DATA: u8 = 0;
        const COOKIE_ECHO: u8 = 10;
        let sctp = |state, from_backend, first_chunk| {
            next_state(
                proto::SCTP,
                state,
                from_backend,
                tcp_flags_of(first_chunk),
                10,
                10,
            )
        };
        let of = |state| FlowState::of(proto::SCTP, state);
        let init = sctp(0, false, chunk::INIT);
        assert_eq!(of(init), FlowState::SynSent);
        let init_ack = sctp(init, true, chunk::INIT_ACK);
        assert_eq!(of(init_ack), FlowState::SynRecv);
        assert_eq!(
            sctp(init_ack, false, chunk::INIT),
            init_ack,
            "a retransmitted INIT"
        );
        let established = sctp(init_ack, false, COOKIE_ECHO);
        assert_eq!(of(established), FlowState::Established);
        assert_eq!(sctp(established, true, DATA), established);
        let shutdown = sctp(established, false, chunk::SHUTDOWN);
        assert_eq!(of(shutdown), FlowState::CloseWait);
        let shutdown_ack = sctp(shutdown, true, chunk::SHUTDOWN_ACK);
        assert_eq!(of(shutdown_ack), FlowState::TimeWait);
        let complete = sctp(shutdown_ack, false, chunk::SHUTDOWN_COMPLETE);
        assert_eq!(of(complete), FlowState::Close);
        assert_eq!(of(sctp(established, true, chunk::ABORT)), FlowState::Close);
        assert_eq!(CtTimeouts::DEFAULT.of(proto::SCTP, established), 86_400);
    }

    #[test]
    fn udp_becomes_a_stream_when_it_lives_on_after_a_reply() {
        let udp =
            |state, from_backend, now| next_state(proto::UDP, state, from_backend, 0, now, 100);
        let answered = udp(0, true, 100);
        assert_eq!(FlowState::of(proto::UDP, answered), FlowState::Replied);
        assert_eq!(
            FlowState::of(proto::UDP, udp(answered, false, 101)),
            FlowState::Replied
        );
        assert_eq!(
            FlowState::of(proto::UDP, udp(answered, false, 102)),
            FlowState::Stream
        );
        assert_eq!(
            FlowState::of(proto::UDP, udp(0, false, 200)),
            FlowState::Unreplied
        );
    }

    #[test]
    fn timeouts_are_netfilters_and_kube_proxys() {
        let t = CtTimeouts::DEFAULT;
        let cases = [
            (proto::TCP, 0, 120),
            (proto::TCP, ct_state::REPLIED, 60),
            (proto::TCP, ct_state::REPLIED | ct_state::ASSURED, 86_400),
            (proto::TCP, ct_state::ASSURED | ct_state::FIN_BACKEND, 3_600),
            (
                proto::TCP,
                ct_state::FIN_CLIENT | ct_state::FIN_BACKEND,
                120,
            ),
            (proto::TCP, ct_state::ASSURED | ct_state::RST, 10),
            (proto::UDP, 0, 30),
            (proto::UDP, ct_state::REPLIED, 30),
            (proto::UDP, ct_state::REPLIED | ct_state::ASSURED, 120),
        ];
        for (protocol, state, seconds) in cases {
            assert_eq!(
                t.of(protocol, state),
                seconds,
                "{:?}",
                FlowState::of(protocol, state)
            );
        }
    }

    #[test]
    fn conntrack_seconds_are_seconds() {
        assert_eq!(ct_seconds(0), 0);
        assert_eq!(ct_seconds(999_999_999), 0);
        assert_eq!(ct_seconds(1_001_000_000), 1);
        // A year of uptime: within a few seconds of the truth.
        let year = 365 * 86_400_u64;
        assert!(ct_seconds(year * 1_000_000_000).abs_diff(year as u32) <= 3);
    }

    #[test]
    fn a_flow_lives_while_either_entry_does() {
        let t = translation(CLIENT, service_flags::CLUSTER_IP, None);
        let key = t.forward_key();
        let forward = t.forward_entry(0, 100);
        let reply = |expires| t.reply_entry(0, expires);
        assert!(!flow_expired(&key, &forward, Some(&reply(50)), 99));
        assert!(
            !flow_expired(&key, &forward, Some(&reply(200)), 150),
            "the reply is recent"
        );
        assert!(flow_expired(&key, &forward, Some(&reply(120)), 150));
        assert!(
            flow_expired(&key, &forward, None, 150),
            "its partner is gone"
        );
        let newer = translation((CLIENT.0, 40_001), service_flags::CLUSTER_IP, None);
        let taken_over = newer.reply_entry(0, 500);
        assert!(
            flow_expired(&key, &forward, Some(&taken_over), 150),
            "not its partner"
        );
        let removing = CtValue {
            expires_ns: EXPIRES_REMOVING,
            ..forward
        };
        assert!(removing.entry_expired(0));
    }
}
