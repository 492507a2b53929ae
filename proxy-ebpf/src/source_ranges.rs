//! `loadBalancerSourceRanges`: which clients a restricted load-balancer frontend admits,
//! one LPM trie lookup per new connection (kube-proxy walks its KUBE-FW chain instead).

use aya_ebpf::{
    macros::map,
    maps::{LpmTrie, lpm_trie::Key},
};
use proxy_common::{SourceRange, default_max_entries};

use crate::lb::Frontend;

/// Named like `proxy_common::map_names::SOURCE_RANGES`; written by the daemon.
#[map]
static SOURCE_RANGES: LpmTrie<SourceRange, u8> =
    LpmTrie::pinned(default_max_entries::SOURCE_RANGES, 0);

/// Whether one of `frontend`'s source ranges contains `client_addr`.
#[inline(always)]
pub fn admits(client_addr: u32, frontend: &Frontend) -> bool {
    let key = Key::new(
        SourceRange::<u32>::FRONTEND_BITS + 32,
        SourceRange {
            rev_nat_id: frontend.header.rev_nat_id,
            addr: client_addr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}
