//! Load balancing, keyed by a load-balancer key — (address, port, protocol) and the
//! client — rather than by a packet, so any hook can call it (Cilium's `lb4_lookup_service`
//! / `lb4_select_backend_id`): the tc program and the cgroup socket programs (`sock`).

use core::num::NonZeroU16;

use aya_ebpf::{macros::map, maps::HashMap};
use proxy_common::{Backend, ServiceKey, ServiceValue, default_max_entries};

use crate::{affinity, parse::Packet, select};

/// Named like `proxy_common::map_names::SERVICES`; pinned so the daemon fills this map.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(default_max_entries::SERVICES, 0);

/// Named like `proxy_common::map_names::BACKENDS`; pinned so the daemon fills this map.
#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(default_max_entries::BACKENDS, 0);

/// Named like `proxy_common::map_names::BACKEND_IDS`: BACKENDS inverted, written by the
/// daemon with it.
#[map]
static BACKEND_IDS: HashMap<Backend, u32> = HashMap::pinned(default_max_entries::BACKEND_IDS, 0);

/// What a connection is addressed to: address, port (wire order) and protocol.
#[derive(Clone, Copy)]
pub struct LbKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
}

impl LbKey {
    /// The packet's destination.
    #[inline(always)]
    pub fn destination(packet: &Packet) -> Self {
        Self {
            addr: packet.dst_addr,
            port: packet.dst_port,
            proto: packet.proto,
        }
    }
}

/// Who opens a connection, as session affinity tells clients apart.
#[derive(Clone, Copy)]
pub enum Client {
    /// A packet's source address (the tc path).
    Address(u32),
    /// A socket's network namespace cookie (the socket path, where the source address is
    /// not chosen yet at `connect()`: the namespace — a pod, or the node — stands for it).
    Netns(u64),
}

/// A frontend: its key and its slot-0 header.
pub struct Frontend {
    pub key: ServiceKey,
    pub header: ServiceValue,
}

/// The frontend at `key`, if it is one.
#[inline(always)]
pub fn frontend(key: &LbKey) -> Option<Frontend> {
    let key = ServiceKey {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    // SAFETY: the value is copied out at once and no reference is kept (a concurrent
    // delete lets the kernel reuse the element).
    let header = *unsafe { SERVICES.get(key) }?;
    Some(Frontend { key, header })
}

/// Whether `key` is a backend of some frontend: a flow straight to it could clash with a
/// Service flow's replies.
#[inline(always)]
pub fn is_backend(key: &LbKey) -> bool {
    let backend = Backend {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: only the presence of the entry is used.
    unsafe { BACKEND_IDS.get(backend) }.is_some()
}

/// How a new flow's backend was chosen.
pub enum Selection {
    /// The client's previous backend (session affinity).
    Affinity { id: u32, backend: Backend },
    /// A random slot of `1..=count`.
    Slot {
        slot: u16,
        id: u32,
        backend: Backend,
    },
    /// The drawn slot names no backend: the daemon is between writing a slot and its
    /// backend, or the frontend shrank under us.
    Missing,
}

/// Chooses the backend of a new flow of `client` to `frontend` (which has `count`
/// backends): the client's previous one under session affinity, else a random one.
#[inline(always)]
pub fn select_backend(
    frontend: &Frontend,
    count: NonZeroU16,
    client: Client,
    now_ns: u64,
) -> Selection {
    if frontend.header.affinity_timeout_s != 0
        && let Some((id, backend)) = affinity::remembered_backend(client, frontend, now_ns)
    {
        return Selection::Affinity { id, backend };
    }
    let slot = select::random_slot(count);
    match backend(frontend, slot) {
        Some((id, backend)) => Selection::Slot { slot, id, backend },
        None => Selection::Missing,
    }
}

/// The backend in `slot` of `frontend` as `(id, backend)`.
#[inline(always)]
fn backend(frontend: &Frontend, slot: u16) -> Option<(u32, Backend)> {
    // SAFETY: the value is copied out at once.
    let backend_id = unsafe { SERVICES.get(frontend.key.with_slot(slot)) }?.backend_id;
    Some((backend_id, backend_by_id(backend_id)?))
}

/// BACKENDS[`backend_id`], if the backend still exists.
#[inline(always)]
pub fn backend_by_id(backend_id: u32) -> Option<Backend> {
    // SAFETY: the value is copied out at once.
    Some(*unsafe { BACKENDS.get(backend_id) }?)
}
