//! Connection tracking: keeps a flow on the backend chosen for its first packet, restores
//! the frontend on the backend's replies, and makes sure no two flows ever share a reply
//! tuple (see `proxy_common::conntrack` for the entry layout and the shared rules).
//!
//! Two maps. CONNTRACK holds assured flows (TCP past the handshake, UDP streams): one
//! lookup finds either entry of such a flow. CONNTRACK_PENDING holds everything not yet
//! assured, and the direct flows to backends this node tracks: a flood of SYNs nobody
//! completes churns only this map, never the established flows. A flow moves over when it
//! becomes assured.
//!
//! Removal protocol: an entry is removed only by whoever first swaps its expiry for
//! `EXPIRES_REMOVING` (compare-and-exchange from the expiry it saw); new entries are only
//! inserted where no key exists. So a removal (by the datapath or the garbage collector)
//! can never hit a flow that was created on the same key after the decision: that race cost
//! the rare failed connection of issue 18.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_or, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_coarse_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray},
};
use proxy_common::{
    CtKey, CtTimeouts, CtValue, EXPIRES_REMOVING, Translation, Tuple, ct_flags, ct_state,
    default_max_entries, flow_expired, next_state, proto, trace_ct,
};

use crate::{family::Family, membership, mode::Mode, parse::Packet, snat};

/// Named like `proxy_common::map_names::CONNTRACK`; pinned so the daemon can collect its
/// garbage and the CLI list it. LRU: when full, the least recently used flows go. IPv6
/// flows have CONNTRACK6 and CONNTRACK_PENDING6 (`lb6`), bound by `Family`.
#[map]
pub(crate) static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::pinned(default_max_entries::CONNTRACK, 0);

/// Named like `proxy_common::map_names::CONNTRACK_PENDING`.
#[map]
pub(crate) static CONNTRACK_PENDING: LruHashMap<CtKey, CtValue> =
    LruHashMap::pinned(default_max_entries::CONNTRACK_PENDING, 0);

/// Named like `proxy_common::map_names::CT_TIMEOUTS`: the idle timeouts, which the daemon
/// writes from its flags before it attaches the program. Pinned, so the CLI shows expiries
/// by the same values; an array read, which the verifier inlines.
#[map]
static CT_TIMEOUTS: Array<CtTimeouts> = Array::pinned(1, 0);

/// This CPU's new entry under construction ([`create`]); not pinned.
#[map]
pub(crate) static NEW_ENTRY: PerCpuArray<CtValue> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch keys ([`KeySlot`]); not pinned.
#[map]
pub(crate) static CT_KEYS: PerCpuArray<CtKey> = PerCpuArray::with_max_entries(3, 0);

/// Now: CLOCK_MONOTONIC from the coarse clock (precision beyond a tick buys nothing here,
/// and it is the cheaper read).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// When a flow in `state` whose latest packet is now goes idle past its timeout.
#[inline(always)]
fn expiry(proto: u8, state: u64, now_ns: u64) -> u64 {
    match CT_TIMEOUTS.get(0) {
        Some(timeouts) => timeouts.expiry_ns(proto, state, now_ns),
        None => now_ns,
    }
}

/// How long a UDP flow that is not a stream lives idle (`--conntrack-udp-timeout`), in
/// ns: the socket programs keep an unconnected UDP socket's flow that long too.
#[inline(always)]
pub fn udp_timeout_ns() -> u64 {
    expiry(proto::UDP, 0, 0)
}

/// The current time of an operation: the clock, and the same in conntrack seconds.
#[derive(Clone, Copy)]
pub struct Now {
    pub ns: u64,
    pub seconds: u32,
}

impl Now {
    #[inline(always)]
    pub fn read() -> Self {
        let ns = now_ns();
        Self {
            ns,
            seconds: proxy_common::ct_seconds(ns),
        }
    }
}

/// One of the two maps (of the key's family).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Assured,
    Pending,
}

impl Table {
    #[inline(always)]
    fn map<A: Family>(self) -> &'static LruHashMap<CtKey<A>, CtValue<A>> {
        match self {
            Table::Assured => A::conntrack(),
            Table::Pending => A::conntrack_pending(),
        }
    }

    #[inline(always)]
    pub fn get<A: Family>(self, key: &CtKey<A>) -> Option<Entry<A>> {
        let ptr = self.map::<A>().get_ptr_mut(key)?;
        Some(Entry { ptr, table: self })
    }

    #[inline(always)]
    fn insert_new<A: Family>(self, key: &CtKey<A>, value: &CtValue<A>) -> bool {
        self.map::<A>()
            .insert(key, value, BPF_NOEXIST.into())
            .is_ok()
    }

    #[inline(always)]
    fn remove<A: Family>(self, key: &CtKey<A>) {
        let _ = self.map::<A>().remove(key);
    }
}

/// An entry found in a table; it lives in the map, so updates are shared.
pub struct Entry<A = u32> {
    ptr: *mut CtValue<A>,
    pub table: Table,
}

impl<A: Family> Entry<A> {
    /// The entry, read in place: copies would cost 64 bytes of stack each. Fields other
    /// packets change (expiry, state, epoch, counters) may change between two reads; code
    /// that decides on the expiry reads it once (the removal protocol swaps from the
    /// expiry it saw).
    #[inline(always)]
    pub fn value(&self) -> &CtValue<A> {
        // SAFETY: `ptr` comes from a successful lookup; map values stay valid for the
        // whole program run.
        unsafe { &*self.ptr }
    }

    /// Removes the entry at `key` if it still has the expiry `seen` (see the removal
    /// protocol above); false when another packet refreshed it or someone else is
    /// removing it.
    #[inline(always)]
    fn retire(&self, key: &CtKey<A>, seen: u64) -> bool {
        if seen == EXPIRES_REMOVING {
            return false;
        }
        // SAFETY: as in `value`; an aligned u64 of the entry.
        let (_, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                &raw mut (*self.ptr).expires_ns,
                seen,
                EXPIRES_REMOVING,
            )
        };
        if swapped {
            self.table.remove(key);
        }
        swapped
    }

    /// Sets the expiry to `expires` unless the entry is being removed.
    #[inline(always)]
    fn refresh(&self, seen: u64, expires: u64) {
        if seen != expires && seen != EXPIRES_REMOVING {
            // SAFETY: as in `retire`. A failure means a concurrent refresh or removal.
            unsafe {
                atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                    &raw mut (*self.ptr).expires_ns,
                    seen,
                    expires,
                );
            }
        }
    }

    #[inline(always)]
    fn add_state(&self, bits: u64) {
        // SAFETY: as in `retire`.
        unsafe {
            atomic_or::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*self.ptr).state, bits)
        };
    }

    #[inline(always)]
    fn account(&self, len: u32) {
        // SAFETY: as in `retire`; counters are shared between CPUs, hence atomic adds.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*self.ptr).packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*self.ptr).bytes,
                u64::from(len),
            );
        }
    }

    #[inline(always)]
    fn set_epoch(&self, epoch: u32) {
        // SAFETY: as in `retire`; any racing writer stores an equal or newer epoch.
        unsafe { (*self.ptr).epoch = epoch };
    }
}

/// What a found entry means for the packet.
pub enum Followed<A = u32> {
    /// Rewrite the packet to the entry's tuple.
    Hit(Hit<A>),
    /// The client opens a new connection on the tuple of a closing one, or its flow's
    /// backend left: the old entry is gone, select a backend again.
    Reselect,
    /// The same, where the caller may not retire the entry (XDP, which leaves such
    /// packets to tc untouched): the entry stays as it was.
    ReselectElsewhere,
    /// The flow is over or being removed: as if there were no entry.
    Gone,
}

/// A conntrack hit: what to do with the packet.
pub struct Hit<A = u32> {
    pub to: Tuple<A>,
    pub flags: u8,
}

/// Which of this CPU's scratch keys (`Family::ct_keys`): a key built for a lookup lives
/// there rather than on the stack, where an IPv6 key's 40 bytes each would crowd the
/// frames of the packet path. Each role has its own, so no two uses overlap.
#[derive(Clone, Copy)]
enum KeySlot {
    /// The partner of an entry ([`partner`]).
    Partner = 0,
    /// A new flow's client key ([`create`]).
    Owner = 1,
    /// A new flow's reply key ([`create`]).
    Reply = 2,
}

/// This CPU's scratch key `slot`.
#[inline(always)]
fn scratch_key<A: Family>(slot: KeySlot) -> Option<*mut CtKey<A>> {
    A::ct_keys().get_ptr_mut(slot as u32)
}

/// The partner of the entry `value` at `key`, if it is still its flow's; its key is in the
/// [`KeySlot::Partner`] scratch key until the next call.
#[inline(always)]
fn partner<A: Family>(table: Table, key: &CtKey<A>, value: &CtValue<A>) -> Option<Entry<A>> {
    let partner_key = scratch_key::<A>(KeySlot::Partner)?;
    // SAFETY: this CPU's scratch key, used by nothing else until the next call.
    let partner_key = unsafe {
        // Field by field: a reversed IPv6 tuple built first would take 40 bytes of the
        // frame (`claim`'s, below `create`'s).
        let (to, tuple) = (&value.to, &mut (*partner_key).tuple);
        tuple.src_addr = to.dst_addr;
        tuple.dst_addr = to.src_addr;
        tuple.src_port = to.dst_port;
        tuple.dst_port = to.src_port;
        (*partner_key).proto = key.proto;
        (*partner_key)._pad = [0; 3];
        &*partner_key
    };
    let entry = table.get(partner_key)?;
    key.is_mutual(entry.value()).then_some(entry)
}

/// Whether the flow of the entry `value` at `key` is over (both its entries idle past
/// their timeouts).
#[inline(always)]
fn expired<A: Family>(table: Table, key: &CtKey<A>, value: &CtValue<A>, now_ns: u64) -> bool {
    if !value.entry_expired(now_ns) {
        return false;
    }
    let partner = partner(table, key, value);
    flow_expired(key, value, partner.as_ref().map(Entry::value), now_ns)
}

/// Decides what `entry`, found for `packet` at `key`, does with it; in live mode, also
/// accounts the packet, advances the flow's state, refreshes its expiry and moves it to
/// CONNTRACK once assured. With `may_retire` false, a flow that must select again is left
/// as it was ([`Followed::ReselectElsewhere`]).
#[inline(always)]
pub fn follow<A: Family, M: Mode>(
    entry: Entry<A>,
    key: &CtKey<A>,
    packet: &Packet<A>,
    len: u32,
    now: Now,
    mode: &M,
    may_retire: bool,
) -> Followed<A> {
    let value = entry.value();
    let seen = value.expires_ns;
    if seen == EXPIRES_REMOVING || expired(entry.table, key, value, now.ns) {
        return Followed::Gone;
    }
    let from_backend = value.is_reply();
    if !from_backend {
        let reselect = if packet.opens_connection() && value.state & ct_state::CLOSING != 0 {
            Some(trace_ct::CLOSING_REUSED)
        } else if backend_left(&entry, value, packet, mode) {
            Some(trace_ct::BACKEND_LEFT)
        } else {
            None
        };
        if let Some(kind) = reselect {
            if !may_retire {
                return Followed::ReselectElsewhere;
            }
            mode.flow_found(kind, entry.table, value);
            // If the entry cannot be removed, a concurrent packet is replacing it: the
            // new flow's creation then finds that flow.
            if !M::DRY_RUN {
                entry.retire(key, seen);
            }
            return Followed::Reselect;
        }
    }
    let kind = if from_backend {
        trace_ct::REPLY
    } else {
        trace_ct::FORWARD
    };
    mode.flow_found(kind, entry.table, value);
    if !M::DRY_RUN {
        advance(&entry, key, seen, packet, len, now);
    }
    Followed::Hit(Hit {
        to: value.to,
        flags: value.flags,
    })
}

/// Whether the Service flow `value` must leave its backend: the packet may still move (a
/// UDP datagram, or a SYN the backend never answered) and the backend stopped serving the
/// frontend since the flow last looked. Established TCP connections keep their backend.
#[inline(always)]
fn backend_left<A: Family, M: Mode>(
    entry: &Entry<A>,
    value: &CtValue<A>,
    packet: &Packet<A>,
    mode: &M,
) -> bool {
    let may_move = packet.proto == proto::UDP
        || (packet.opens_connection() && value.state & ct_state::ASSURED == 0);
    if !may_move || value.flags & ct_flags::DIRECT != 0 {
        return false;
    }
    let epoch = membership::epoch();
    if value.epoch == epoch {
        return false;
    }
    let stays = membership::may_stay(value.rev_nat_id, value.to.dst_addr);
    if stays && !M::DRY_RUN {
        entry.set_epoch(epoch);
    }
    if !stays {
        mode.count(proxy_common::stat::BACKEND_LEFT);
    }
    !stays
}

/// Accounts the packet and applies its effect on the flow's state and expiry (`seen`: the
/// expiry the packet's decision was made on).
#[inline(always)]
fn advance<A: Family>(
    entry: &Entry<A>,
    key: &CtKey<A>,
    seen: u64,
    packet: &Packet<A>,
    len: u32,
    now: Now,
) {
    let value = entry.value();
    entry.account(len);
    let state = next_state(
        key.proto,
        value.state,
        value.is_reply(),
        packet.tcp_flags,
        now.seconds,
        value.created,
    );
    let expires = expiry(key.proto, state, now.ns);
    let new_bits = state & !value.state;
    let partner = if new_bits != 0 {
        partner(entry.table, key, value)
    } else {
        None
    };
    if new_bits != 0 {
        entry.add_state(new_bits);
        // A state change shortens or lengthens the whole flow's life, not one direction's.
        if let Some(partner) = &partner {
            partner.add_state(new_bits);
            partner.refresh(partner.value().expires_ns, expires);
        }
    }
    entry.refresh(seen, expires);
    if entry.table == Table::Pending && state & ct_state::ASSURED != 0 {
        promote(entry, key, partner);
    }
}

/// Moves an assured flow from CONNTRACK_PENDING to CONNTRACK: copies first, so every
/// packet finds the flow in one map or the other throughout.
#[inline(always)]
fn promote<A: Family>(entry: &Entry<A>, key: &CtKey<A>, partner: Option<Entry<A>>) {
    if move_to_assured(key, entry.value()) {
        Table::Pending.remove(key);
    }
    // The partner's key, as `partner` left it.
    if let Some(partner) = partner
        && let Some(partner_key) = scratch_key::<A>(KeySlot::Partner)
    {
        // SAFETY: this CPU's scratch key; nothing writes it before this use ends.
        let partner_key = unsafe { &*partner_key };
        if move_to_assured(partner_key, partner.value()) {
            Table::Pending.remove(partner_key);
        }
    }
}

/// Inserts `value` at `key` in CONNTRACK. An entry already there is over: a live one
/// would have matched the flow's packets before its pending entry did.
#[inline(always)]
fn move_to_assured<A: Family>(key: &CtKey<A>, value: &CtValue<A>) -> bool {
    if let Some(existing) = Table::Assured.get(key)
        && !existing.retire(key, existing.value().expires_ns)
    {
        return false;
    }
    Table::Assured.insert_new(key, value)
}

/// Why a new flow could not be created.
pub enum NotCreated {
    /// Its reply tuple was taken and no port of the SNAT range was free for it.
    NoPort,
    /// The entry on its forward tuple is being removed or replaced concurrently.
    Busy,
}

/// The outcome of claiming a key for a new flow.
enum Claim {
    Done,
    /// A live flow of another client holds it.
    Taken,
    Busy,
}

/// Claims `key` for a new flow whose client key is `owner` (in either map): replaces an
/// entry of the same client or of a flow that is over (see [`make_room`]); refuses when a
/// live flow of another client holds it. A BPF subprogram: the paths through it meet again
/// at its return, so the verifier walks what follows a claim once per outcome (else once
/// per path, for each of a new flow's port tries); and its frame, not `create`'s, holds
/// what a removal needs (with `create`'s, an IPv6 flow's would not fit the BPF stack).
#[inline(never)]
fn claim<A: Family>(key: &CtKey<A>, owner: &CtKey<A>, value: &CtValue<A>, now_ns: u64) -> Claim {
    if let Some(existing) = Table::Assured.get(key) {
        match make_room(&existing, key, owner, now_ns) {
            Claim::Done => {}
            refused => return refused,
        }
    }
    // Usually the key is free and the insert is all it takes.
    if Table::Pending.insert_new(key, value) {
        return Claim::Done;
    }
    let Some(existing) = Table::Pending.get(key) else {
        // Removed meanwhile: one more try.
        return if Table::Pending.insert_new(key, value) {
            Claim::Done
        } else {
            Claim::Busy
        };
    };
    match make_room(&existing, key, owner, now_ns) {
        Claim::Done if Table::Pending.insert_new(key, value) => Claim::Done,
        Claim::Done => Claim::Busy,
        refused => refused,
    }
}

/// Removes `existing` (at `key`) for a new flow whose client key is `owner`, if it is the
/// same client's earlier flow or a flow that is over (idle past its timeout, or closed by
/// FINs or a reset); refuses when it is a live flow of another client.
#[inline(always)]
fn make_room<A: Family>(
    existing: &Entry<A>,
    key: &CtKey<A>,
    owner: &CtKey<A>,
    now_ns: u64,
) -> Claim {
    let table = existing.table;
    let value = existing.value();
    let seen = value.expires_ns;
    let own = *key == *owner || owner.is_mutual(value);
    if !own && !value.is_closed() && !expired(table, key, value, now_ns) {
        return Claim::Taken;
    }
    if existing.retire(key, seen) {
        Claim::Done
    } else {
        Claim::Busy
    }
}

/// Records the new flow `translation` (its first packet: `packet`, `len` bytes) in
/// CONNTRACK_PENDING. The reply tuple is claimed first: if a live flow of another client
/// holds it (a direct flow to the same backend port, or a Service flow of another
/// frontend), the peer's port is remapped into the SNAT range, as netfilter remaps a
/// clashing tuple; SNAT flows take a port of the range in any case.
///
/// A reply tuple whose entry someone else is removing or replacing right now (the
/// reaper between its compare-and-exchange and its delete, or a concurrent packet) is
/// remapped the same way: the program cannot wait for that delete, and the delete, aimed
/// at the old key, can never hit the remapped flow. Dropping there lost a client's query
/// whenever a port's flow came back to a backend at the instant the collector reaped its
/// stale reply entry. A BPF subprogram, called from one place: the verifier walks its
/// claims once per kind of new flow.
#[inline(never)]
pub fn create<A: Family>(
    translation: &mut Translation<A>,
    packet: &Packet<A>,
    len: u32,
    now: &Now,
) -> Result<(), NotCreated> {
    let now = *now;
    let (Some(owner), Some(reply)) = (
        scratch_key::<A>(KeySlot::Owner),
        scratch_key::<A>(KeySlot::Reply),
    ) else {
        return Err(NotCreated::Busy);
    };
    // SAFETY: this CPU's scratch keys, used only within this call.
    let (owner, reply) = unsafe { (&mut *owner, &mut *reply) };

    let state = next_state(
        translation.proto,
        0,
        false,
        packet.tcp_flags,
        now.seconds,
        now.seconds,
    );
    let expires = expiry(translation.proto, state, now.ns);
    // The entries are built in this CPU's scratch entry, the reply entry and then the
    // forward entry: on the stack they would take 128 bytes of the packet path's 512.
    let entry = A::new_entry().get_ptr_mut(0).ok_or(NotCreated::Busy)?;
    // SAFETY: this CPU's scratch entry, used only within this call (no preemption while
    // the program runs).
    let entry = unsafe { &mut *entry };
    let mut remap = translation.needs_port();
    let mut start = None;
    let mut claimed = false;
    for attempt in 0..=snat::PORT_TRIES {
        if remap {
            if attempt == snat::PORT_TRIES {
                break;
            }
            let start = *start.get_or_insert_with(snat::random_start);
            translation.remap(snat::port(start, attempt));
        }
        translation.write_reply_entry(entry, now.seconds, expires);
        entry.state = state;
        // The keys again after each remap: the reply key's port changed.
        translation.write_keys(owner, reply);
        match claim(reply, owner, entry, now.ns) {
            Claim::Done => {
                claimed = true;
                break;
            }
            Claim::Taken | Claim::Busy => remap = true,
        }
    }
    if !claimed {
        return Err(NotCreated::NoPort);
    }
    translation.write_forward_entry(entry, now.seconds, expires);
    entry.state = state;
    entry.packets = 1;
    entry.bytes = u64::from(len);
    // The packet found no usable entry on its own tuple: usually there is none, and an
    // insert is all it takes; else the entry left there (over, or being replaced) goes.
    if Table::Pending.insert_new(owner, entry) {
        return Ok(());
    }
    match claim(owner, owner, entry, now.ns) {
        Claim::Done => Ok(()),
        Claim::Taken | Claim::Busy => Err(NotCreated::Busy),
    }
}

/// Removes the entry at `key` if its flow is over; whether it did.
#[inline(always)]
pub fn reap<A: Family>(table: Table, key: &CtKey<A>, now_ns: u64) -> bool {
    let Some(entry) = table.get(key) else {
        return false;
    };
    let value = entry.value();
    let seen = value.expires_ns;
    seen != EXPIRES_REMOVING && expired(table, key, value, now_ns) && entry.retire(key, seen)
}

/// The live entry at `key`, for a packet related to its flow (an ICMP error about one of
/// its packets): looked up in both maps, nothing updated — an error neither refreshes nor
/// advances a flow, as in netfilter.
#[inline(always)]
pub fn related<A: Family>(key: &CtKey<A>, now_ns: u64) -> Option<Entry<A>> {
    let entry = match Table::Assured.get(key) {
        Some(entry) => entry,
        None => Table::Pending.get(key)?,
    };
    let value = entry.value();
    if value.expires_ns == EXPIRES_REMOVING || expired(entry.table, key, value, now_ns) {
        return None;
    }
    Some(entry)
}
