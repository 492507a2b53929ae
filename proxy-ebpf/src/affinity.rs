//! Session affinity (`sessionAffinity: ClientIP`): a client's new connections to a Service
//! port go to the backend of its previous one as long as they come within the timeout of
//! each other — kube-proxy's `-m recent --rcheck --seconds T --reap` before the random
//! choice and `--set` on every new connection.
//!
//! AFFINITY remembers {client address, Service port} → {backend, last new connection};
//! SOCK_AFFINITY the same for connections translated at the socket, whose client is a
//! network namespace (see [`Client`]). One memory per Service port, which its ClusterIP,
//! NodePorts, external and load-balancer IPs share, as kube-proxy's `recent` lists are per
//! Service port and endpoint. A remembered backend is reused only if MEMBERSHIP says it is
//! in the set the connection chooses from (the chain being walked, in kube-proxy's terms):
//! one that left (removed, terminating, outside the traffic policy) is not, and the
//! connection is balanced anew.
//!
//! IPv6 clients are remembered in AFFINITY6, sockets to IPv6 frontends in SOCK_AFFINITY6
//! (`lb6`), bound by `Family::affinity` and `Family::sock_affinity`.

use aya_ebpf::{macros::map, maps::LruHashMap};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, BackendSet, SockAffinityKey, default_max_entries,
};

use crate::{
    family::Family,
    lb::{Client, Frontend},
    membership,
};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Named like `proxy_common::map_names::AFFINITY`; pinned so affinities survive a daemon
/// restart. LRU: the least recently used clients are forgotten when it is full.
#[map]
pub(crate) static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::AFFINITY, 0);

/// Named like `proxy_common::map_names::SOCK_AFFINITY`: as AFFINITY, for sockets.
#[map]
pub(crate) static SOCK_AFFINITY: LruHashMap<SockAffinityKey, AffinityValue> =
    LruHashMap::pinned(default_max_entries::SOCK_AFFINITY, 0);

/// The backend `client` used last on `frontend`'s Service port, if that was within the
/// timeout and the backend is in `set`.
#[inline(always)]
pub fn remembered_backend<A: Family>(
    client: Client<A>,
    frontend: &Frontend<A>,
    set: &BackendSet,
    now_ns: u64,
) -> Option<(u32, Backend<A>)> {
    // SAFETY (both lookups): the value is copied out at once.
    let remembered = match client {
        Client::Address(addr) => *unsafe { A::affinity().get(key(addr, frontend)) }?,
        Client::Netns(cookie) => *unsafe { A::sock_affinity().get(sock_key(cookie, frontend)) }?,
    };
    let timeout_ns = u64::from(frontend.header.affinity_timeout_s) * NANOS_PER_SECOND;
    if now_ns.saturating_sub(remembered.last_used_ns) > timeout_ns {
        return None;
    }
    let bits = membership::of(frontend.header.rev_nat_id, remembered.backend.addr);
    (bits & set.membership_bit() != 0).then_some((remembered.backend_id, remembered.backend))
}

/// Records that the client's new connection to `frontend`'s Service port went to
/// `backend` now. A failed update only costs the next connection its affinity.
#[inline(always)]
pub fn remember<A: Family>(
    client: Client<A>,
    frontend: &Frontend<A>,
    backend_id: u32,
    backend: &Backend<A>,
    now_ns: u64,
) {
    let value = AffinityValue {
        backend: *backend,
        backend_id,
        _pad: Default::default(),
        last_used_ns: now_ns,
    };
    let _ = match client {
        Client::Address(addr) => A::affinity().insert(key(addr, frontend), value, 0),
        Client::Netns(cookie) => A::sock_affinity().insert(sock_key(cookie, frontend), value, 0),
    };
}

#[inline(always)]
fn key<A: Family>(client_addr: A, frontend: &Frontend<A>) -> AffinityKey<A> {
    AffinityKey {
        client_addr,
        service_port_id: frontend.header.service_port_id,
    }
}

#[inline(always)]
fn sock_key<A>(netns_cookie: u64, frontend: &Frontend<A>) -> SockAffinityKey {
    SockAffinityKey {
        netns_cookie,
        service_port_id: frontend.header.service_port_id,
        _pad: 0,
    }
}
