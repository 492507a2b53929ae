//! Which endpoint addresses each frontend has now (the daemon writes MEMBERSHIP for every
//! frontend): session affinity reuses only backends that still take new connections, and a
//! tracked flow whose packets may still move — UDP, or a SYN not yet answered — goes to a
//! new backend once its own stopped serving, the moment the daemon's write lands instead of
//! after a sweep of the conntrack map (Cilium checks its backends on conntrack hits too).
//! Established TCP connections keep their backend, as with kube-proxy.
//!
//! MEMBERSHIP_EPOCH counts the daemon's changes of MEMBERSHIP. A flow remembers the epoch
//! at which its backend was last found serving and looks again only when it changed, so a
//! conntrack hit costs one (inlined) array read, not a hash lookup.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};
use proxy_common::{MembershipKey, default_max_entries, membership};

use crate::{family::Family, recycled};

/// Named like `proxy_common::map_names::MEMBERSHIP`; the daemon fills it (MEMBERSHIP6 for
/// IPv6 addresses, in `lb6`; the epoch is shared) and rewrites bits in place, hence read
/// through [`recycled::read`].
#[map]
pub(crate) static MEMBERSHIP: HashMap<MembershipKey, u8> =
    HashMap::pinned(default_max_entries::MEMBERSHIP, 0);

/// Named like `proxy_common::map_names::MEMBERSHIP_EPOCH`; the daemon raises it.
#[map]
static MEMBERSHIP_EPOCH: Array<u32> = Array::pinned(1, 0);

/// The `membership` bits of `addr` for the frontend `rev_nat_id` (0: not an endpoint).
#[inline(always)]
pub fn of<A: Family>(rev_nat_id: u32, addr: A) -> u8 {
    recycled::read(A::membership(), &MembershipKey { rev_nat_id, addr }).unwrap_or(0)
}

/// The current epoch.
#[inline(always)]
pub fn epoch() -> u32 {
    MEMBERSHIP_EPOCH.get(0).copied().unwrap_or(0)
}

/// Whether a flow of the frontend `rev_nat_id` to `addr` may stay where it is: the address
/// still serves the frontend. A flow that may not is decided again as a new one: another
/// backend, or — the last serving endpoint gone, or the frontend — refused, as after
/// kube-proxy's `CleanStaleEntries`.
#[inline(always)]
pub fn may_stay<A: Family>(rev_nat_id: u32, addr: A) -> bool {
    of(rev_nat_id, addr) & membership::SERVING != 0
}
