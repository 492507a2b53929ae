//! Map keys and values shared by the kernel programs (proxy-ebpf) and userspace.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree byte for byte.
//! Addresses and ports are stored exactly as they appear on the wire (network byte order)
//! so the datapath compares and rewrites them without conversions; the constructors here
//! take host-order values and do the conversion once, in userspace.
#![no_std]

/// IP protocol numbers the datapath balances.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Names under which the maps are pinned (in the daemon's bpffs root) and looked up.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const STATS: &str = "STATS";
}

/// The one tc program: attached on pod-side veths and on the node's external devices.
pub const PROGRAM_NAME: &str = "epx_ingress";

/// Key of the SERVICES map: a frontend (`addr:port/proto`) and a slot.
///
/// Slot 0 holds the frontend's header ([`ServiceValue::count`] backends); slots
/// `1..=count` each name one backend. A new flow picks slot `random % count + 1`, which
/// gives every backend probability 1/n — the same distribution as kube-proxy's chain of
/// `-m statistic --mode random --probability 1/n, 1/(n-1), …` rules.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
    /// Port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad0: u8,
    pub slot: u16,
    pub _pad1: u16,
}

impl ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8, slot: u16) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: port.to_be(),
            proto,
            _pad0: 0,
            slot,
            _pad1: 0,
        }
    }

    /// The same frontend at another slot.
    pub const fn with_slot(self, slot: u16) -> Self {
        Self { slot, ..self }
    }
}

/// Frontend kinds, recorded in [`ServiceValue::flags`] so listings can tell them apart.
pub mod service_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const EXTERNAL_IP: u16 = 1 << 2;
    pub const LOAD_BALANCER: u16 = 1 << 3;
}

/// Value of the SERVICES map. In slot 0 `count`, `rev_nat_id` and `flags` describe the
/// frontend and `backend_id` is 0; in slot i only `backend_id` is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Identifies the frontend in conntrack entries (for listings and flushes). 32 bits so
    /// clusters with more than 65 535 frontends fit.
    pub rev_nat_id: u32,
    /// Number of backends (slot 0 only). 0 means the Service has no endpoints.
    pub count: u16,
    pub flags: u16,
}

/// Value of the BACKENDS map (key: backend id, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Backend {
    /// IPv4 address, network byte order.
    pub addr: u32,
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

/// Direction of a conntrack entry.
pub mod ct_dir {
    /// Keyed by the client's original tuple (client → frontend); the value holds the backend.
    pub const FORWARD: u8 = 0;
    /// Keyed by the backend's reply tuple (backend → client); the value holds the frontend.
    pub const REPLY: u8 = 1;
}

/// Key of the CONNTRACK map: the packet's 5-tuple as seen on the wire, plus a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub dir: u8,
    pub _pad: u16,
}

/// Conntrack entry flags.
pub mod ct_flags {
    /// A FIN or RST was seen: the flow is ending; a new SYN on the same tuple re-selects,
    /// and the daemon's garbage collector reaps it after a short grace period.
    pub const CLOSING: u16 = 1 << 0;
    /// The frontend is one of the node's own addresses (a NodePort). After reverse NAT the
    /// reply's source is local, and the kernel drops forwarded packets with a local source
    /// as martians; so the program routes these replies itself (FIB lookup + redirect).
    pub const LOCAL_FRONTEND: u16 = 1 << 1;
}

/// Value of the CONNTRACK map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// FORWARD: the backend address to DNAT to. REPLY: the frontend address to restore.
    pub nat_addr: u32,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// FORWARD: the backend port. REPLY: the frontend port. Network byte order.
    pub nat_port: u16,
    /// Bits of [`ct_flags`].
    pub flags: u16,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the flow was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the latest packet in this direction.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
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
    /// The conntrack entry could not be created (map full or update failed); the packet
    /// was still translated but its flow may not stay on one backend.
    pub const CT_CREATE_FAILED: u32 = 4;
    /// The frontend has no backends: the packet was dropped.
    pub const NO_BACKEND: u32 = 5;
    /// A slot named a backend id missing from BACKENDS (a transient during updates).
    pub const BACKEND_MISSING: u32 = 6;
    /// The packet matched no frontend and no flow and passed untouched.
    pub const PASS: u32 = 7;
    /// Not IPv4 TCP/UDP, or an IP fragment: passed untouched.
    pub const NOT_HANDLED: u32 = 8;
    /// Rewriting the packet failed (helper error); the packet was dropped.
    pub const REWRITE_FAILED: u32 = 9;
    /// A reply from a NodePort flow found no route in the FIB and was left to the kernel.
    pub const FIB_MISS: u32 = 10;
    /// Number of counters (size of the STATS array).
    pub const COUNT: u32 = 11;

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
    ];
}

/// Default map sizes compiled into the object; the daemon can override them at load time.
pub mod default_max_entries {
    pub const SERVICES: u32 = 262_144;
    pub const BACKENDS: u32 = 131_072;
    pub const CONNTRACK: u32 = 262_144;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is #[repr(C)], Copy, made only of integers with explicit padding
    // fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 48);
    }

    #[test]
    fn constructors_store_wire_order() {
        let key = ServiceKey::new([198, 19, 0, 10], 80, proto::TCP, 0);
        assert_eq!(key.addr.to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(key.port.to_ne_bytes(), [0, 80]);
        let backend = Backend::new([198, 18, 1, 10], 8080, proto::UDP);
        assert_eq!(backend.port.to_ne_bytes(), 8080u16.to_be_bytes());
    }

    #[test]
    fn every_counter_has_a_name() {
        assert_eq!(stat::NAMES.len(), stat::COUNT as usize);
    }
}
