//! IPv6's maps (Cilium's lb6): SERVICES, BACKEND_SLOTS, BACKEND_IDS, MEMBERSHIP,
//! SVC_NAMES, SOURCE_RANGES and MAGLEV with 16-byte addresses (`proxy_common::Address`),
//! which the daemon writes through the same writer as IPv4's, the conntrack maps of
//! IPv6 flows, which the packet path writes, and the socket programs' maps of IPv6
//! sockets, and FRAGMENTS6, the first fragments of IPv6 datagrams. Named like `proxy_common::map_names::*6`, so
//! IPv4's keys stay small; `family::Family` binds them to the generic packet path.
//!
//! The hash maps are not preallocated: a node without IPv6 Services pays nothing for them
//! but the slot array. SVC_NAMES6 is read by the CLI only.

use crate::parse::Packet;
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragmentKey, FragmentValue, FrontendKey,
    FrontendValue, Ipv6, MembershipKey, ServiceName, Slot, SockAffinityKey, SockKey, SockValue,
    SourceRange, default_max_entries,
    maglev::{MaglevChunk, MaglevKey},
};

#[map]
pub(crate) static SERVICES6: HashMap<FrontendKey<Ipv6>, FrontendValue> =
    HashMap::pinned(default_max_entries::SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static BACKEND_SLOTS6: Array<Slot<Ipv6>> =
    Array::pinned(default_max_entries::BACKEND_SLOTS, 0);

#[map]
pub(crate) static BACKEND_IDS6: HashMap<Backend<Ipv6>, u32> =
    HashMap::pinned(default_max_entries::BACKEND_IDS, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static MEMBERSHIP6: HashMap<MembershipKey<Ipv6>, u8> =
    HashMap::pinned(default_max_entries::MEMBERSHIP, BPF_F_NO_PREALLOC);

#[map]
static SVC_NAMES6: HashMap<u32, ServiceName> =
    HashMap::pinned(default_max_entries::SVC_NAMES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static SOURCE_RANGES6: LpmTrie<SourceRange<Ipv6>, u8> =
    LpmTrie::pinned(default_max_entries::SOURCE_RANGES, 0);

#[map]
pub(crate) static MAGLEV6: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(default_max_entries::MAGLEV, BPF_F_NO_PREALLOC);

/// CONNTRACK of IPv6 flows, sized like IPv4's (LRU maps allocate as they fill).
#[map]
pub(crate) static CONNTRACK6: LruHashMap<CtKey<Ipv6>, CtValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::CONNTRACK, 0);

/// CONNTRACK_PENDING of IPv6 flows.
#[map]
pub(crate) static CONNTRACK_PENDING6: LruHashMap<CtKey<Ipv6>, CtValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::CONNTRACK_PENDING, 0);

/// This CPU's new IPv6 entry under construction (`conntrack::create`); not pinned.
#[map]
pub(crate) static NEW_ENTRY6: PerCpuArray<CtValue<Ipv6>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's IPv6 packet being balanced (`balance6`): the IPv6 path's frames have no room
/// for it. Not pinned.
#[map]
pub(crate) static PACKET6: PerCpuArray<Packet<Ipv6>> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch IPv6 conntrack keys (`conntrack::KeySlot`); not pinned.
#[map]
pub(crate) static CT_KEYS6: PerCpuArray<CtKey<Ipv6>> = PerCpuArray::with_max_entries(3, 0);

/// AFFINITY of IPv6 clients, sized like IPv4's; LRU.
#[map]
pub(crate) static AFFINITY6: LruHashMap<AffinityKey<Ipv6>, AffinityValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::AFFINITY, 0);

/// SOCK_XLATE of IPv6 sockets to IPv6 frontends (an IPv4-mapped peer's entries are
/// SOCK_XLATE's), sized like IPv4's; LRU.
#[map]
pub(crate) static SOCK_XLATE6: LruHashMap<SockKey<Ipv6>, SockValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::SOCK_XLATE, 0);

/// SOCK_AFFINITY of sockets to IPv6 frontends, sized like IPv4's; LRU.
#[map]
pub(crate) static SOCK_AFFINITY6: LruHashMap<SockAffinityKey, AffinityValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::SOCK_AFFINITY, 0);

/// FRAGMENTS of IPv6 datagrams, keyed by their fragment header's identification; sized
/// like FRAGMENTS (`--max-fragments`); LRU.
#[map]
pub(crate) static FRAGMENTS6: LruHashMap<FragmentKey<Ipv6>, FragmentValue<Ipv6>> =
    LruHashMap::pinned(default_max_entries::FRAGMENTS, 0);
