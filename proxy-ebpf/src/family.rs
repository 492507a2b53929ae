//! The address-family seam (Cilium's lb4/lb6, as one generic path instead of two copies):
//! [`Family`] binds each `proxy_common::Address` — IPv4's `u32`, IPv6's 16 bytes — to its
//! own maps and to the little that differs in its IP header (where the addresses sit,
//! whether the header has a checksum, the hop limit, the FIB family, the ICMP error). The
//! packet path, conntrack, selection and NAT are written once over `A: Family` and
//! compiled once per family. IPv4's maps stay in the modules that use them (`lb`,
//! `membership`, `conntrack`, …), IPv6's are in `lb6`: separate maps keep IPv4's keys small.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use proxy_common::{
    Address, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragmentKey, FragmentValue,
    FrontendKey, FrontendValue, Ipv6, MembershipKey, Slot, SockAffinityKey, SockKey, SockValue,
    SourceRange, Tuple,
    maglev::{MaglevChunk, MaglevKey},
};

use crate::{
    Decision,
    answer::{self, Answer, NotAnswered},
    csum, lb6, nat,
    parse::Packet,
};

/// An address family of the packet path: its maps and its header's differences.
pub trait Family: Address {
    /// `AF_INET`, `AF_INET6`: the FIB lookup's family.
    const AF: u8;
    /// Bytes of the fixed IP header (IPv6: without extension headers).
    const HEADER_LEN: usize;
    /// Offset of the TTL (IPv4) or hop limit (IPv6) in the header.
    const HOP_LIMIT_OFFSET: usize;
    /// The packet path's lookups run in frames of their own, a level less deep (`decide`):
    /// IPv6's addresses take so many registers that its frames would not fit the BPF stack
    /// otherwise.
    const FRAMES_APART: bool;

    fn services() -> &'static HashMap<FrontendKey<Self>, FrontendValue>;
    fn backend_slots() -> &'static Array<Slot<Self>>;
    fn backend_ids() -> &'static HashMap<Backend<Self>, u32>;
    fn membership() -> &'static HashMap<MembershipKey<Self>, u8>;
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, u8>;
    fn maglev() -> &'static HashMap<MaglevKey, MaglevChunk>;
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>>;
    fn conntrack_pending() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>>;
    /// This CPU's conntrack entry under construction (`conntrack::create`).
    fn new_entry() -> &'static PerCpuArray<CtValue<Self>>;
    /// This CPU's scratch conntrack keys (`conntrack::KeySlot`).
    fn ct_keys() -> &'static PerCpuArray<CtKey<Self>>;
    /// Session affinity of this family's clients (`affinity`).
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>>;
    /// This CPU's decision for the packet in hand (`service_path`).
    fn decision() -> &'static PerCpuArray<Decision<Self>>;
    /// The translations of sockets to this family's frontends (`sock`).
    fn sock_xlate() -> &'static LruHashMap<SockKey<Self>, SockValue<Self>>;
    /// Session affinity of sockets to this family's frontends (`affinity`).
    fn sock_affinity() -> &'static LruHashMap<SockAffinityKey, AffinityValue<Self>>;
    /// What became of the first fragments of this family's datagrams (`fragment`).
    fn fragments() -> &'static LruHashMap<FragmentKey<Self>, FragmentValue<Self>>;

    /// A datagram's identification as its [`FragmentKey`] holds it, from the packet's
    /// (`parse::IpFields::id`): IPv4's 16 bits, IPv6's 32.
    fn fragment_id(id: u32) -> Self::FragmentId;

    /// The address as IPv4's `u32`, `None` for IPv6: what is IPv4 only (the socket hooks'
    /// affinity) takes IPv4 addresses through it.
    fn ipv4(self) -> Option<u32>;
    /// The IPv4 address `addr` in this family, `None` for IPv6.
    fn from_ipv4(addr: u32) -> Option<Self>;

    /// What replacing the addresses `src`, `dst` with those of `to` adds to a checksum
    /// over them (an L4 pseudo-header's; IPv4's header checksum too).
    fn address_diff(src: &Self, dst: &Self, to: &Tuple<Self>) -> u32;

    /// Writes `to`'s addresses into the IP header at `ip`, fixing its checksum (IPv4) by
    /// `diff`, their [`Self::address_diff`].
    ///
    /// # Safety
    /// `ip` points to [`Self::HEADER_LEN`] writable bytes of packet data, checked against
    /// data_end.
    unsafe fn set_addresses(ip: usize, to: &Tuple<Self>, diff: u32);

    /// Decrements the TTL or hop limit of the header at `ip` (fixing IPv4's checksum); false
    /// when it would reach zero.
    ///
    /// # Safety
    /// As for [`Self::set_addresses`].
    unsafe fn decrement_hop_limit(ip: usize) -> bool;

    /// Sets the FIB lookup's addresses (`src`: the unspecified address lets the kernel
    /// choose).
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self);
    /// The source address a `BPF_FIB_LOOKUP_SRC` lookup chose.
    fn fib_source(params: &bpf_fib_lookup) -> Self;

    /// Turns `packet` into the ICMP (ICMPv6) error `kind` back to its sender (`answer`).
    fn send_answer(
        ctx: &TcContext,
        packet: &Packet<Self>,
        kind: &Answer<Self>,
        charge: bool,
    ) -> Result<i32, NotAnswered>;
}

impl Family for u32 {
    const AF: u8 = 2;
    const HEADER_LEN: usize = 20;
    const HOP_LIMIT_OFFSET: usize = 8;
    const FRAMES_APART: bool = false;

    #[inline(always)]
    fn services() -> &'static HashMap<FrontendKey<Self>, FrontendValue> {
        &crate::lb::SERVICES
    }
    #[inline(always)]
    fn backend_slots() -> &'static Array<Slot<Self>> {
        &crate::lb::BACKEND_SLOTS
    }
    #[inline(always)]
    fn backend_ids() -> &'static HashMap<Backend<Self>, u32> {
        &crate::lb::BACKEND_IDS
    }
    #[inline(always)]
    fn membership() -> &'static HashMap<MembershipKey<Self>, u8> {
        &crate::membership::MEMBERSHIP
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, u8> {
        &crate::source_ranges::SOURCE_RANGES
    }
    #[inline(always)]
    fn maglev() -> &'static HashMap<MaglevKey, MaglevChunk> {
        &crate::maglev::MAGLEV
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &crate::conntrack::CONNTRACK
    }
    #[inline(always)]
    fn conntrack_pending() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &crate::conntrack::CONNTRACK_PENDING
    }
    #[inline(always)]
    fn new_entry() -> &'static PerCpuArray<CtValue<Self>> {
        &crate::conntrack::NEW_ENTRY
    }
    #[inline(always)]
    fn ct_keys() -> &'static PerCpuArray<CtKey<Self>> {
        &crate::conntrack::CT_KEYS
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>> {
        &crate::affinity::AFFINITY
    }
    #[inline(always)]
    fn decision() -> &'static PerCpuArray<Decision<Self>> {
        &crate::DECISION
    }
    #[inline(always)]
    fn sock_xlate() -> &'static LruHashMap<SockKey<Self>, SockValue<Self>> {
        &crate::sock::SOCK_XLATE
    }
    #[inline(always)]
    fn sock_affinity() -> &'static LruHashMap<SockAffinityKey, AffinityValue<Self>> {
        &crate::affinity::SOCK_AFFINITY
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragmentKey<Self>, FragmentValue<Self>> {
        &crate::fragment::FRAGMENTS
    }

    #[inline(always)]
    fn fragment_id(id: u32) -> u16 {
        // The header's 16 bits, kept in the low half (`parse`).
        id as u16
    }

    #[inline(always)]
    fn ipv4(self) -> Option<u32> {
        Some(self)
    }

    #[inline(always)]
    fn from_ipv4(addr: u32) -> Option<Self> {
        Some(addr)
    }

    #[inline(always)]
    fn address_diff(src: &Self, dst: &Self, to: &Tuple<Self>) -> u32 {
        nat::address_diff(*src, *dst, to.src_addr, to.dst_addr)
    }

    #[inline(always)]
    unsafe fn set_addresses(ip: usize, to: &Tuple<Self>, diff: u32) {
        // SAFETY: the caller vouches for the header's 20 bytes.
        unsafe { nat::set_addresses(ip, to.src_addr, to.dst_addr, diff) }
    }

    #[inline(always)]
    unsafe fn decrement_hop_limit(ip: usize) -> bool {
        const IPV4_CSUM_OFFSET: usize = 10;
        // SAFETY: within the header's 20 bytes the caller vouches for.
        unsafe {
            let ttl_and_proto = (ip + Self::HOP_LIMIT_OFFSET) as *mut [u8; 2];
            let [ttl, protocol] = *ttl_and_proto;
            if ttl <= 1 {
                return false;
            }
            let decremented = [ttl - 1, protocol];
            let check = (ip + IPV4_CSUM_OFFSET) as *mut [u8; 2];
            let diff = csum::diff16(
                u16::from_ne_bytes(*ttl_and_proto),
                u16::from_ne_bytes(decremented),
            );
            *check = csum::updated(u16::from_ne_bytes(*check), diff).to_ne_bytes();
            *ttl_and_proto = decremented;
        }
        true
    }

    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.__bindgen_anon_3.ipv4_src = src;
        params.__bindgen_anon_4.ipv4_dst = dst;
    }

    #[inline(always)]
    fn fib_source(params: &bpf_fib_lookup) -> Self {
        // SAFETY: every bit pattern is a valid u32.
        unsafe { params.__bindgen_anon_3.ipv4_src }
    }

    #[inline(always)]
    fn send_answer(
        ctx: &TcContext,
        packet: &Packet<Self>,
        kind: &Answer<Self>,
        charge: bool,
    ) -> Result<i32, NotAnswered> {
        answer::send(ctx, packet, kind, charge)
    }
}

impl Family for Ipv6 {
    const AF: u8 = 10;
    const HEADER_LEN: usize = 40;
    const HOP_LIMIT_OFFSET: usize = 7;
    const FRAMES_APART: bool = true;

    #[inline(always)]
    fn services() -> &'static HashMap<FrontendKey<Self>, FrontendValue> {
        &lb6::SERVICES6
    }
    #[inline(always)]
    fn backend_slots() -> &'static Array<Slot<Self>> {
        &lb6::BACKEND_SLOTS6
    }
    #[inline(always)]
    fn backend_ids() -> &'static HashMap<Backend<Self>, u32> {
        &lb6::BACKEND_IDS6
    }
    #[inline(always)]
    fn membership() -> &'static HashMap<MembershipKey<Self>, u8> {
        &lb6::MEMBERSHIP6
    }
    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self>, u8> {
        &lb6::SOURCE_RANGES6
    }
    #[inline(always)]
    fn maglev() -> &'static HashMap<MaglevKey, MaglevChunk> {
        &lb6::MAGLEV6
    }
    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &lb6::CONNTRACK6
    }
    #[inline(always)]
    fn conntrack_pending() -> &'static LruHashMap<CtKey<Self>, CtValue<Self>> {
        &lb6::CONNTRACK_PENDING6
    }
    #[inline(always)]
    fn new_entry() -> &'static PerCpuArray<CtValue<Self>> {
        &lb6::NEW_ENTRY6
    }
    #[inline(always)]
    fn ct_keys() -> &'static PerCpuArray<CtKey<Self>> {
        &lb6::CT_KEYS6
    }
    #[inline(always)]
    fn affinity() -> &'static LruHashMap<AffinityKey<Self>, AffinityValue<Self>> {
        &lb6::AFFINITY6
    }
    #[inline(always)]
    fn decision() -> &'static PerCpuArray<Decision<Self>> {
        &crate::DECISION6
    }
    #[inline(always)]
    fn sock_xlate() -> &'static LruHashMap<SockKey<Self>, SockValue<Self>> {
        &lb6::SOCK_XLATE6
    }
    #[inline(always)]
    fn sock_affinity() -> &'static LruHashMap<SockAffinityKey, AffinityValue<Self>> {
        &lb6::SOCK_AFFINITY6
    }
    #[inline(always)]
    fn fragments() -> &'static LruHashMap<FragmentKey<Self>, FragmentValue<Self>> {
        &lb6::FRAGMENTS6
    }

    #[inline(always)]
    fn fragment_id(id: u32) -> u32 {
        id
    }

    #[inline(always)]
    fn ipv4(self) -> Option<u32> {
        None
    }

    #[inline(always)]
    fn from_ipv4(_addr: u32) -> Option<Self> {
        None
    }

    #[inline(always)]
    fn address_diff(src: &Self, dst: &Self, to: &Tuple<Self>) -> u32 {
        let mut sum = 0;
        if *src != to.src_addr {
            sum += diff128(src, &to.src_addr);
        }
        if *dst != to.dst_addr {
            sum += diff128(dst, &to.dst_addr);
        }
        // At most eight 33-bit terms: two folds leave 32 bits with their carries.
        let sum = (sum & 0xffff_ffff) + (sum >> 32);
        ((sum & 0xffff_ffff) + (sum >> 32)) as u32
    }

    /// IPv6 has no header checksum: the addresses are all there is to write.
    #[inline(always)]
    unsafe fn set_addresses(ip: usize, to: &Tuple<Self>, _diff: u32) {
        const SRC_OFFSET: usize = 8;
        // SAFETY: within the header's 40 bytes the caller vouches for.
        unsafe {
            *((ip + SRC_OFFSET) as *mut [u8; 16]) = to.src_addr.octets();
            *((ip + SRC_OFFSET + 16) as *mut [u8; 16]) = to.dst_addr.octets();
        }
    }

    #[inline(always)]
    unsafe fn decrement_hop_limit(ip: usize) -> bool {
        // SAFETY: within the header's 40 bytes the caller vouches for.
        unsafe {
            let hop_limit = (ip + Self::HOP_LIMIT_OFFSET) as *mut u8;
            if *hop_limit <= 1 {
                return false;
            }
            *hop_limit -= 1;
        }
        true
    }

    #[inline(always)]
    fn fib_addresses(params: &mut bpf_fib_lookup, src: Self, dst: Self) {
        params.__bindgen_anon_3.ipv6_src = src.0;
        params.__bindgen_anon_4.ipv6_dst = dst.0;
    }

    #[inline(always)]
    fn fib_source(params: &bpf_fib_lookup) -> Self {
        // SAFETY: every bit pattern is a valid [u32; 4].
        let words = unsafe { params.__bindgen_anon_3.ipv6_src };
        Ipv6(words)
    }

    #[inline(always)]
    fn send_answer(
        ctx: &TcContext,
        packet: &Packet<Self>,
        kind: &Answer<Self>,
        charge: bool,
    ) -> Result<i32, NotAnswered> {
        answer::send6(ctx, packet, kind, charge)
    }
}

/// What replacing the address `from` with `to` adds to a checksum over it, not yet folded:
/// one running sum, where word-by-word ones' complement additions would hold all eight
/// words in registers at once and spill them to the stack.
#[inline(always)]
fn diff128(from: &Ipv6, to: &Ipv6) -> u64 {
    let mut sum = 0;
    let mut index = 0;
    while index < 4 {
        sum += u64::from(!from.0[index]) + u64::from(to.0[index]);
        index += 1;
    }
    sum
}
