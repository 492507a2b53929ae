//! `loadBalancerSourceRanges`: which clients a restricted load-balancer frontend admits,
//! one LPM trie lookup per new connection (kube-proxy walks its KUBE-FW chain instead).

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use proxy_common::{SourceRange, default_max_entries};

use crate::{family::Family, lb::Frontend};

/// Named like `proxy_common::map_names::SOURCE_RANGES`; written by the daemon.
#[map]
pub(crate) static SOURCE_RANGES: LpmTrie<SourceRange, u8> =
    LpmTrie::pinned(default_max_entries::SOURCE_RANGES, 0);

/// Whether one of `frontend`'s source ranges contains `client_addr` (SOURCE_RANGES6 for an
/// IPv6 client, whose prefixes are IPv6 ones).
#[inline(always)]
pub fn admits<A: Family>(client_addr: A, frontend: &Frontend<A>) -> bool {
    let key = Key::new(
        SourceRange::<A>::FRONTEND_BITS + u32::from(A::BITS),
        SourceRange {
            rev_nat_id: frontend.header.rev_nat_id,
            addr: client_addr,
        },
    );
    A::source_ranges().get(&key).is_some()
}
