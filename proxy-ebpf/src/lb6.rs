//! IPv6's load-balancing maps (Cilium's lb6): SERVICES, BACKEND_SLOTS, BACKEND_IDS,
//! MEMBERSHIP, SVC_NAMES, SOURCE_RANGES and MAGLEV with 16-byte addresses
//! (`proxy_common::Address`), named like `proxy_common::map_names::*6`, so IPv4's keys
//! stay small. The daemon writes them through the same writer as IPv4's; no program reads
//! them yet (the IPv6 packet path is issue 12's next step): the `#[map]` export keeps them
//! in the object so the daemon creates and pins them with the others.
//!
//! The hash maps are not preallocated: a node without IPv6 Services pays nothing for them
//! but the slot array.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie},
};
use proxy_common::{
    Backend, FrontendKey, FrontendValue, Ipv6, MembershipKey, ServiceName, Slot, SourceRange,
    default_max_entries,
    maglev::{MaglevChunk, MaglevKey},
};

#[map]
static SERVICES6: HashMap<FrontendKey<Ipv6>, FrontendValue> =
    HashMap::pinned(default_max_entries::SERVICES, BPF_F_NO_PREALLOC);

#[map]
static BACKEND_SLOTS6: Array<Slot<Ipv6>> = Array::pinned(default_max_entries::BACKEND_SLOTS, 0);

#[map]
static BACKEND_IDS6: HashMap<Backend<Ipv6>, u32> =
    HashMap::pinned(default_max_entries::BACKEND_IDS, BPF_F_NO_PREALLOC);

#[map]
static MEMBERSHIP6: HashMap<MembershipKey<Ipv6>, u8> =
    HashMap::pinned(default_max_entries::MEMBERSHIP, BPF_F_NO_PREALLOC);

#[map]
static SVC_NAMES6: HashMap<u32, ServiceName> =
    HashMap::pinned(default_max_entries::SVC_NAMES, BPF_F_NO_PREALLOC);

#[map]
static SOURCE_RANGES6: LpmTrie<SourceRange<Ipv6>, u8> =
    LpmTrie::pinned(default_max_entries::SOURCE_RANGES, 0);

#[map]
static MAGLEV6: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(default_max_entries::MAGLEV, BPF_F_NO_PREALLOC);
