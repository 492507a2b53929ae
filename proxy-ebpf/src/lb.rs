//! Load balancing, keyed by a load-balancer key — (address, port, protocol), the client,
//! and where the connection comes from — rather than by a packet, so any hook can call it
//! (Cilium's `lb4_lookup_service` / `lb4_select_backend_id`): the tc program and the
//! cgroup socket programs (`sock`).
//!
//! The layout is flat: one hash lookup finds the frontend's header, and its backends sit
//! contiguously in one array, address and port inline (Katran's `reals`/`ch_rings`, in one
//! step), so a selection reads one more cache line and no more hash buckets.

use core::num::NonZeroU16;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use proxy_common::{
    Backend, BackendSet, FrontendKey, FrontendValue, Origin, Slot, default_max_entries,
};

use crate::{
    affinity,
    family::Family,
    maglev::{self, Flow},
    parse::Packet,
    recycled, select,
};

/// Named like `proxy_common::map_names::SERVICES`; pinned so the daemon fills this map.
/// Read through [`recycled::read`]: the daemon rewrites headers in place.
#[map]
pub(crate) static SERVICES: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(default_max_entries::SERVICES, 0);

/// Named like `proxy_common::map_names::BACKEND_SLOTS`; each frontend owns the slice its
/// header names. An array lookup, which the verifier inlines.
#[map]
pub(crate) static BACKEND_SLOTS: Array<Slot> = Array::pinned(default_max_entries::BACKEND_SLOTS, 0);

/// Named like `proxy_common::map_names::BACKEND_IDS`: every backend, written by the daemon
/// before the slots that name it.
#[map]
pub(crate) static BACKEND_IDS: HashMap<Backend, u32> =
    HashMap::pinned(default_max_entries::BACKEND_IDS, 0);

/// What a connection is addressed to: address, port (wire order) and protocol.
#[derive(Clone, Copy)]
pub struct LbKey<A = u32> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
}

impl<A: Family> LbKey<A> {
    /// The packet's destination.
    #[inline(always)]
    pub fn destination(packet: &Packet<A>) -> Self {
        Self {
            addr: packet.dst_addr,
            port: packet.dst_port,
            proto: packet.proto,
        }
    }
}

/// Who opens a connection, as session affinity tells clients apart.
#[derive(Clone, Copy)]
pub enum Client<A = u32> {
    /// A packet's source address (the tc path).
    Address(A),
    /// A socket's network namespace cookie (the socket path, where the source address is
    /// not chosen yet at `connect()`: the namespace — a pod, or the node — stands for it).
    Netns(u64),
}

/// A frontend: its key and its header.
#[derive(Clone, Copy)]
pub struct Frontend<A = u32> {
    pub key: FrontendKey<A>,
    pub header: FrontendValue,
}

/// The frontend at `key`, if it is one.
#[inline(always)]
pub fn frontend<A: Family>(key: &LbKey<A>) -> Option<Frontend<A>> {
    let mut frontend = Frontend {
        key: FrontendKey::default(),
        header: FrontendValue::default(),
    };
    find_frontend(key, &mut frontend).then_some(frontend)
}

/// Whether `key` is a frontend, written to `into` (its header zero when it is none: a
/// header left undefined would live across the lookups that follow, and the verifier
/// refuses to read a register it holds unset). Into the caller's memory, which the IPv6
/// path keeps off the stack.
#[inline(always)]
pub fn find_frontend<A: Family>(key: &LbKey<A>, into: &mut Frontend<A>) -> bool {
    into.key = FrontendKey {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        _pad: 0,
    };
    // Through `recycled`: the daemon rewrites headers in place.
    let found = recycled::read_into(A::services(), &into.key, &mut into.header);
    if !found {
        into.header = FrontendValue::default();
    }
    found
}

/// Whether `key` is a backend of some frontend: a flow straight to it could clash with a
/// Service flow's replies.
#[inline(always)]
pub fn is_backend<A: Family>(key: &LbKey<A>) -> bool {
    let backend = Backend {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        _pad: 0,
    };
    // SAFETY: only the presence of the entry is used.
    unsafe { A::backend_ids().get(backend) }.is_some()
}

/// The backends a new connection to `frontend` chooses among. `origin` is asked only when
/// it matters (an externalTrafficPolicy Local frontend, whose pods reach the Cluster set),
/// so the other frontends never pay for finding out.
#[inline(always)]
pub fn backends_for<A>(frontend: &Frontend<A>, origin: impl FnOnce() -> Origin) -> BackendSet {
    let origin = if frontend.header.flags & proxy_common::service_flags::CLUSTER_SET != 0 {
        origin()
    } else {
        Origin::Outside
    };
    frontend.header.backends_for(origin)
}

/// How a new flow's backend was chosen.
pub enum Selection<A = u32> {
    /// The client's previous backend of the Service port (session affinity).
    Affinity { id: u32, backend: Backend<A> },
    /// A slot of the set: `slot` in `1..=count`, drawn at random or given by the
    /// frontend's Maglev table (`maglev`).
    Slot {
        slot: u16,
        id: u32,
        backend: Backend<A>,
        maglev: bool,
    },
    /// The drawn slot lies outside BACKEND_SLOTS or was never written (a header the
    /// daemon did not write: it names only written slots): dropped, never sent to 0.0.0.0.
    Missing,
}

/// Chooses the backend of a new flow of `client` to `frontend` among `set` (which has
/// `count` backends): the client's previous one under session affinity, if it is in the
/// set; else, for a packet's `flow` to a frontend with a Maglev table (its own set), the
/// table's; else a random one.
#[inline(always)]
pub fn select_backend<A: Family>(
    frontend: &Frontend<A>,
    set: &BackendSet,
    count: NonZeroU16,
    client: Client<A>,
    flow: Option<Flow<A>>,
    now_ns: u64,
) -> Selection<A> {
    if frontend.header.affinity_timeout_s != 0
        && let Some((id, backend)) = affinity::remembered_backend(client, frontend, set, now_ns)
    {
        return Selection::Affinity { id, backend };
    }
    let by_table = match flow {
        Some(flow) if frontend.header.maglev != 0 && !set.cluster => {
            maglev::index(&frontend.header, flow).filter(|&index| index < count.get())
        }
        _ => None,
    };
    let index = by_table.unwrap_or_else(|| select::random_index(count));
    match A::backend_slots().get(set.first.wrapping_add(u32::from(index))) {
        Some(slot) if slot.backend_id != 0 => Selection::Slot {
            slot: index + 1,
            id: slot.backend_id,
            backend: slot.backend,
            maglev: by_table.is_some(),
        },
        _ => Selection::Missing,
    }
}
