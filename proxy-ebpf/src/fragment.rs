//! Fragmented datagrams, IPv4's and IPv6's alike: the first fragment decides, the later
//! ones follow.
//!
//! A datagram's first fragment carries its TCP/UDP header and goes through the packet
//! path like any packet; what happened to it — translated to a tuple (and routed by the
//! program or not), passed untouched, or dropped — is recorded in FRAGMENTS (IPv6:
//! `lb6::FRAGMENTS6`, by the fragment header's 32-bit identification) under the
//! datagram's identity (see `proxy_common::FragmentKey`). A later fragment, which carries
//! no ports, looks the record up and is treated the same: its addresses rewritten (the L4
//! checksum covers the whole datagram and sits in the first fragment, where the
//! translation fixed it; IPv4's header checksum is fixed, IPv6 has none), passed, or
//! dropped.
//!
//! A later fragment that arrives before its first one (or whose first one this node never
//! saw, or whose record expired or was evicted) is passed untouched and counted
//! (`fragment_unmatched`): a tc program cannot hold it until the first arrives, and
//! dropping it would break fragmented traffic this node does not translate. Linux sends a
//! datagram's fragments in order, and a veth or a flow-hashed queue keeps the order (all
//! fragments of a datagram hash alike, by addresses), so this is rare; the datagram is
//! then lost, as if a fragment had been lost, and its sender's retry goes through.

use aya_ebpf::{macros::map, maps::LruHashMap};
use proxy_common::{
    FragmentKey, FragmentValue, MIN_CHECKED_MTU, Tuple, default_max_entries, fragment_verdict, stat,
};

use crate::{
    conntrack::now_ns,
    context::Context,
    family::Family,
    mode::Mode,
    nat,
    parse::Packet,
    route::{self, Hop, Route},
    verdict::Verdict,
};

/// Named like `proxy_common::map_names::FRAGMENTS`; pinned so the CLI shows its fill and
/// the dry run finds the live program's records. LRU: a datagram's record is needed only
/// while its fragments pass (microseconds), so the least recently used go first.
#[map]
pub(crate) static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::pinned(default_max_entries::FRAGMENTS, 0);

/// What became of a packet, which its datagram's later fragments follow. A struct with
/// every field set, not an enum: LLVM leaves an enum's unused payload undefined, and the
/// verifier refuses the store of a register that holds anything there.
#[derive(Clone, Copy)]
pub struct Fate<A = u32> {
    /// Where it went (its own tuple when it passed untouched); unset when dropped.
    to: Tuple<A>,
    /// A `fragment_verdict` constant.
    verdict: u8,
    routes_itself: bool,
}

impl<A: Family> Fate<A> {
    /// It left rewritten to `to`, routed by the program if `routes_itself`.
    #[inline(always)]
    pub fn forward(to: Tuple<A>, routes_itself: bool) -> Self {
        Self {
            to,
            verdict: fragment_verdict::FORWARD,
            routes_itself,
        }
    }

    /// It was dropped, or answered with an ICMP error in its place.
    #[inline(always)]
    pub fn dropped() -> Self {
        Self {
            to: Tuple::default(),
            verdict: fragment_verdict::DROP,
            routes_itself: false,
        }
    }
}

/// Records `fate` for the later fragments of `packet`'s datagram, a first fragment. The dry
/// run only reports the record. A BPF subprogram, so the record takes no room in the packet
/// path's stack frame.
#[inline(never)]
pub fn remember<M: Mode, A: Family>(mode: &M, packet: &Packet<A>, fate: &Fate<A>) {
    let record = FragmentValue {
        to: fate.to,
        verdict: fate.verdict,
        routes_itself: u8::from(fate.routes_itself),
        _pad: [0; 2],
        seen_ns: now_ns(),
    };
    if M::DRY_RUN {
        mode.first_fragment(&record);
    } else {
        // A failed insert (no memory) leaves the later fragments unmatched: counted there.
        let _ = A::fragments().insert(&packet.datagram(), &record, 0);
    }
}

/// A later fragment of `datagram`, `total_len` bytes from its IP header on (host order):
/// treated as its datagram's first fragment was. A BPF subprogram (a stack frame of its
/// own).
#[inline(never)]
pub fn follow<C: Context, M: Mode, A: Family>(
    ctx: &C,
    mode: &M,
    datagram: &FragmentKey<A>,
    total_len: u16,
) -> Verdict {
    // SAFETY: the value is copied out at once (the LRU may recycle the element).
    let record = unsafe { A::fragments().get(datagram) }
        .copied()
        .filter(|record| record.is_fresh(now_ns()));
    mode.later_fragment(record.as_ref());
    let Some(record) = record else {
        mode.count(stat::FRAGMENT_UNMATCHED);
        return Verdict::Accept;
    };
    if record.verdict == fragment_verdict::DROP {
        mode.count(stat::FRAGMENT_DROPPED);
        return Verdict::Drop;
    }
    let mut hop = Hop::KERNEL;
    if record.routes_itself != 0 {
        // Its source is a node address: the kernel would drop it as a martian, so the
        // program forwards it, and cannot fragment it; nor may an ICMP error be sent
        // about a later fragment (the kernel sends none).
        let length = if total_len > MIN_CHECKED_MTU {
            total_len
        } else {
            0
        };
        match route::lookup(ctx, datagram.proto, &record.to, length) {
            Route::Via(via) => hop = via,
            Route::TooBig { .. } => {
                mode.count(stat::NOT_FORWARDABLE);
                return Verdict::Drop;
            }
            Route::Local | Route::None => mode.count(stat::FIB_MISS),
        }
    }
    if nat::rewrite_addresses(ctx, &datagram.src_addr, &datagram.dst_addr, &record.to).is_err() {
        mode.count(stat::REWRITE_FAILED);
        return Verdict::Drop;
    }
    let Some(verdict) = route::send::<C, M, A>(ctx, mode, &hop) else {
        // The TTL (hop limit) ran out here: the kernel drops a later fragment silently too.
        mode.count(stat::NOT_FORWARDABLE);
        return Verdict::Drop;
    };
    mode.count(stat::FRAGMENT);
    verdict
}
