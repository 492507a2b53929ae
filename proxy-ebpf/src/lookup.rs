//! Frontend and backend lookups in the maps the daemon fills.

use aya_ebpf::{macros::map, maps::HashMap};
use proxy_common::{Backend, ServiceKey, ServiceValue, default_max_entries};

use crate::parse::Packet;

/// Named like `proxy_common::map_names::SERVICES`; pinned so the daemon fills this map.
#[map]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(default_max_entries::SERVICES, 0);

/// Named like `proxy_common::map_names::BACKENDS`; pinned so the daemon fills this map.
#[map]
static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(default_max_entries::BACKENDS, 0);

/// A frontend the packet is addressed to: its key and its slot-0 header.
pub struct Frontend {
    pub key: ServiceKey,
    pub header: ServiceValue,
}

/// The frontend for the packet's destination `addr:port/proto`, if it is one.
#[inline(always)]
pub fn frontend(packet: &Packet) -> Option<Frontend> {
    let key = ServiceKey {
        addr: packet.dst_addr,
        port: packet.dst_port,
        proto: packet.proto,
        _pad0: 0,
        slot: 0,
        _pad1: 0,
    };
    // SAFETY: the value is copied out at once and no reference is kept (a concurrent
    // delete lets the kernel reuse the element).
    let header = *unsafe { SERVICES.get(key) }?;
    Some(Frontend { key, header })
}

/// The backend in `slot` of `frontend` as `(id, backend)`, or `None` while the daemon is
/// between writing a slot and its backend (or after a slot shrank under us).
#[inline(always)]
pub fn backend(frontend: &Frontend, slot: u16) -> Option<(u32, Backend)> {
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
