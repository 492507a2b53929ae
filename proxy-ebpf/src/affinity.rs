//! Session affinity (`sessionAffinity: ClientIP`): a client's new connections to a frontend
//! go to the backend of its previous one as long as they come within the frontend's timeout
//! of each other — kube-proxy's `-m recent --rcheck --seconds T --reap` before the random
//! choice and `--set` on every new connection.
//!
//! AFFINITY remembers {client, frontend} → {backend, last new connection}. AFFINITY_MATCH,
//! written by the daemon, lists the backends each affinity frontend has now: a remembered
//! backend that left (removed, terminating, outside the traffic policy) is not reused and
//! the connection is balanced anew, as in kube-proxy, whose per-endpoint rules go with the
//! endpoint.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
};
use proxy_common::{AffinityKey, AffinityMatchKey, AffinityValue, Backend, default_max_entries};

use crate::{lookup, lookup::Frontend, parse::Packet};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Named like `proxy_common::map_names::AFFINITY`; pinned so affinities survive a daemon
/// restart. LRU: the least recently used clients are forgotten when it is full.
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::AFFINITY, 0);

/// Named like `proxy_common::map_names::AFFINITY_MATCH`; the daemon fills it.
#[map]
static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::pinned(default_max_entries::AFFINITY_MATCH, 0);

/// The backend this client used last on `frontend`, if that was within the timeout and the
/// backend is still one of the frontend's.
#[inline(always)]
pub fn remembered_backend(
    packet: &Packet,
    frontend: &Frontend,
    now_ns: u64,
) -> Option<(u32, Backend)> {
    let key = key(packet, frontend);
    // SAFETY: the value is copied out at once.
    let remembered = *unsafe { AFFINITY.get(key) }?;
    let timeout_ns = u64::from(frontend.header.affinity_timeout_s) * NANOS_PER_SECOND;
    if now_ns.saturating_sub(remembered.last_used_ns) > timeout_ns {
        return None;
    }
    let membership = AffinityMatchKey {
        rev_nat_id: frontend.header.rev_nat_id,
        backend_id: remembered.backend_id,
    };
    // SAFETY: only the presence of the entry is used.
    unsafe { AFFINITY_MATCH.get(membership) }?;
    let backend = lookup::backend_by_id(remembered.backend_id)?;
    Some((remembered.backend_id, backend))
}

/// Records that the client's new connection to `frontend` went to `backend_id` now. A
/// failed update only costs the next connection its affinity.
#[inline(always)]
pub fn remember(packet: &Packet, frontend: &Frontend, backend_id: u32, now_ns: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now_ns,
    };
    let _ = AFFINITY.insert(key(packet, frontend), value, 0);
}

#[inline(always)]
fn key(packet: &Packet, frontend: &Frontend) -> AffinityKey {
    AffinityKey {
        client_addr: packet.src_addr,
        rev_nat_id: frontend.header.rev_nat_id,
    }
}
