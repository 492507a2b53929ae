//! Session affinity (`sessionAffinity: ClientIP`): a client's new connections to a frontend
//! go to the backend of its previous one as long as they come within the frontend's timeout
//! of each other — kube-proxy's `-m recent --rcheck --seconds T --reap` before the random
//! choice and `--set` on every new connection.
//!
//! AFFINITY remembers {client, frontend} → {backend, last new connection}. A remembered
//! backend is reused only while MEMBERSHIP says it takes new connections for the frontend:
//! one that left (removed, terminating, outside the traffic policy) is not, and the
//! connection is balanced anew, as in kube-proxy, whose per-endpoint rules go with the
//! endpoint.

use aya_ebpf::{macros::map, maps::LruHashMap};
use proxy_common::{AffinityKey, AffinityValue, Backend, default_max_entries, membership};

use crate::{lb, lb::Frontend, membership as members};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Named like `proxy_common::map_names::AFFINITY`; pinned so affinities survive a daemon
/// restart. LRU: the least recently used clients are forgotten when it is full.
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::AFFINITY, 0);

/// The backend `client_addr` used last on `frontend`, if that was within the timeout and
/// the backend still takes the frontend's new connections.
#[inline(always)]
pub fn remembered_backend(
    client_addr: u32,
    frontend: &Frontend,
    now_ns: u64,
) -> Option<(u32, Backend)> {
    let key = key(client_addr, frontend);
    // SAFETY: the value is copied out at once.
    let remembered = *unsafe { AFFINITY.get(key) }?;
    let timeout_ns = u64::from(frontend.header.affinity_timeout_s) * NANOS_PER_SECOND;
    if now_ns.saturating_sub(remembered.last_used_ns) > timeout_ns {
        return None;
    }
    let backend = lb::backend_by_id(remembered.backend_id)?;
    let bits = members::of(frontend.header.rev_nat_id, backend.addr);
    (bits & membership::SELECTABLE != 0).then_some((remembered.backend_id, backend))
}

/// Records that the client's new connection to `frontend` went to `backend_id` now. A
/// failed update only costs the next connection its affinity.
#[inline(always)]
pub fn remember(client_addr: u32, frontend: &Frontend, backend_id: u32, now_ns: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now_ns,
    };
    let _ = AFFINITY.insert(key(client_addr, frontend), value, 0);
}

#[inline(always)]
fn key(client_addr: u32, frontend: &Frontend) -> AffinityKey {
    AffinityKey {
        client_addr,
        rev_nat_id: frontend.header.rev_nat_id,
    }
}
