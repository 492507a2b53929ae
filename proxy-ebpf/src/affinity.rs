//! Session affinity (`sessionAffinity: ClientIP`): a client's new connections to a frontend
//! go to the backend of its previous one as long as they come within the frontend's timeout
//! of each other — kube-proxy's `-m recent --rcheck --seconds T --reap` before the random
//! choice and `--set` on every new connection.
//!
//! AFFINITY remembers {client address, frontend} → {backend, last new connection};
//! SOCK_AFFINITY the same for connections translated at the socket, whose client is a
//! network namespace (see [`Client`]). A remembered
//! backend is reused only while MEMBERSHIP says it takes new connections for the frontend:
//! one that left (removed, terminating, outside the traffic policy) is not, and the
//! connection is balanced anew, as in kube-proxy, whose per-endpoint rules go with the
//! endpoint.

use aya_ebpf::{macros::map, maps::LruHashMap};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, SockAffinityKey, default_max_entries, membership,
};

use crate::{
    lb,
    lb::{Client, Frontend},
    membership as members,
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Named like `proxy_common::map_names::AFFINITY`; pinned so affinities survive a daemon
/// restart. LRU: the least recently used clients are forgotten when it is full.
#[map]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::AFFINITY, 0);

/// Named like `proxy_common::map_names::SOCK_AFFINITY`: as AFFINITY, for sockets.
#[map]
static SOCK_AFFINITY: LruHashMap<SockAffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::SOCK_AFFINITY, 0);

/// The backend `client` used last on `frontend`, if that was within the timeout and the
/// backend still takes the frontend's new connections.
#[inline(always)]
pub fn remembered_backend(
    client: Client,
    frontend: &Frontend,
    now_ns: u64,
) -> Option<(u32, Backend)> {
    // SAFETY: the value is copied out at once.
    let remembered = *match client {
        Client::Address(addr) => unsafe { AFFINITY.get(key(addr, frontend)) },
        Client::Netns(cookie) => unsafe { SOCK_AFFINITY.get(sock_key(cookie, frontend)) },
    }?;
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
pub fn remember(client: Client, frontend: &Frontend, backend_id: u32, now_ns: u64) {
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now_ns,
    };
    let _ = match client {
        Client::Address(addr) => AFFINITY.insert(key(addr, frontend), value, 0),
        Client::Netns(cookie) => SOCK_AFFINITY.insert(sock_key(cookie, frontend), value, 0),
    };
}

#[inline(always)]
fn key(client_addr: u32, frontend: &Frontend) -> AffinityKey {
    AffinityKey {
        client_addr,
        rev_nat_id: frontend.header.rev_nat_id,
    }
}

#[inline(always)]
fn sock_key(netns_cookie: u64, frontend: &Frontend) -> SockAffinityKey {
    SockAffinityKey {
        netns_cookie,
        rev_nat_id: frontend.header.rev_nat_id,
        _pad: 0,
    }
}
