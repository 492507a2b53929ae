//! What the maps hold, followed write by write, so a change costs only its frontends: the
//! mirror image, the ids, where the slices lie in BACKEND_SLOTS, and how many slots name
//! each backend (a backend is written when its first slot appears and deleted after its
//! last one goes, as Cilium's reconciler reference-counts backends).
//!
//! A delta writes the changed frontends' entries with the same [`diff`] as a full sync, run
//! over just those frontends and the backends whose count reaches or leaves zero: the same
//! never-half-written order per frontend, and for backends shared with untouched frontends
//! no write at all. [`MapMirror::sync`] plans and writes a batch through any writer — the
//! kernel maps, or the tests' maps in memory — and holds back what would leave a packet
//! with half a frontend when a write was refused.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::{HashMap, HashMapExt, HashSet};
use proxy_common::maglev::{MaglevChunk, MaglevKey};
use proxy_common::{
    Address, Backend, FrontendKey, FrontendValue, MembershipKey, ServiceName, Slot,
};

use super::ids::IdRegistry;
use super::image::{
    DesiredImage, Entries, MapImage, MapOp, MapWrites, Puts, Scope, SourceRangeEntry, diff,
    frontend_entries, frontend_key, is_bulk, materialize, merge, place, slice_of,
};
use super::slots::{Slice, SlotAllocator};
use crate::plan::{DesiredState, FrontendChange};

/// Passes of one sync: a frontend waiting for room (an evacuation, or slices this pass
/// freed) is placed by the next.
const MAX_PASSES: usize = 4;

/// Why a write failed.
#[derive(Debug)]
pub enum WriteError {
    /// The map is full (E2BIG): retried by the next (full) sync.
    Full,
    Failed(String),
}

/// One phase of a sync's writes: entries of one map, independent of each other (see
/// [`MapWrites`]), written as one batch.
#[derive(Clone, Copy, Debug)]
pub enum Phase<'a, A = u32> {
    PutNames(&'a [(u32, ServiceName)]),
    PutBackends(&'a [(u32, Backend<A>)]),
    PutMembership(&'a [(MembershipKey<A>, u8)]),
    /// An RCU grace period (see [`MapOp::Barrier`]).
    Barrier,
    PutSlots(&'a [(u32, Slot<A>)]),
    PutMaglev(&'a [(MaglevKey, MaglevChunk)]),
    PutSourceRanges(&'a [SourceRangeEntry<A>]),
    PutHeaders(&'a [(FrontendKey<A>, FrontendValue)]),
    DeleteHeaders(&'a [FrontendKey<A>]),
    DeleteMembership(&'a [MembershipKey<A>]),
    DeleteSourceRanges(&'a [SourceRangeEntry<A>]),
    DeleteBackends(&'a [(u32, Backend<A>)]),
    DeleteMaglev(&'a [MaglevKey]),
    DeleteNames(&'a [u32]),
}

impl<'a, A: Address> Phase<'a, A> {
    /// How many writes the phase holds (a barrier: one).
    pub fn writes(&self) -> usize {
        match self {
            Phase::PutNames(entries) => entries.len(),
            Phase::PutBackends(entries) | Phase::DeleteBackends(entries) => entries.len(),
            Phase::PutMembership(entries) => entries.len(),
            Phase::Barrier => 1,
            Phase::PutSlots(entries) => entries.len(),
            Phase::PutMaglev(entries) => entries.len(),
            Phase::PutSourceRanges(entries) | Phase::DeleteSourceRanges(entries) => entries.len(),
            Phase::PutHeaders(entries) => entries.len(),
            Phase::DeleteHeaders(keys) => keys.len(),
            Phase::DeleteMembership(keys) => keys.len(),
            Phase::DeleteMaglev(keys) => keys.len(),
            Phase::DeleteNames(ids) => ids.len(),
        }
    }

    /// Whether the phase puts into a hash map or the slot array: writes that other threads
    /// may make at the same time into other maps.
    pub fn puts_shared(&self) -> bool {
        matches!(
            self,
            Phase::PutNames(_)
                | Phase::PutBackends(_)
                | Phase::PutMembership(_)
                | Phase::PutSlots(_)
                | Phase::PutMaglev(_)
                | Phase::PutHeaders(_)
        )
    }

    /// The phase's writes one at a time, in order.
    pub fn ops(self) -> Box<dyn Iterator<Item = MapOp<A>> + 'a> {
        match self {
            Phase::PutNames(entries) => {
                Box::new(entries.iter().map(|(id, name)| MapOp::PutName(*id, *name)))
            }
            Phase::PutBackends(entries) => Box::new(
                entries
                    .iter()
                    .map(|(id, backend)| MapOp::PutBackend(*id, *backend)),
            ),
            Phase::PutMembership(entries) => Box::new(
                entries
                    .iter()
                    .map(|(key, bits)| MapOp::PutMembership(*key, *bits)),
            ),
            Phase::Barrier => Box::new(std::iter::once(MapOp::Barrier)),
            Phase::PutSlots(entries) => Box::new(
                entries
                    .iter()
                    .map(|(index, slot)| MapOp::PutSlot(*index, *slot)),
            ),
            Phase::PutMaglev(entries) => Box::new(
                entries
                    .iter()
                    .map(|(key, chunk)| MapOp::PutMaglev(*key, *chunk)),
            ),
            Phase::PutSourceRanges(entries) => {
                Box::new(entries.iter().map(|entry| MapOp::PutSourceRange(*entry)))
            }
            Phase::PutHeaders(entries) => Box::new(
                entries
                    .iter()
                    .map(|(key, header)| MapOp::PutService(*key, *header)),
            ),
            Phase::DeleteHeaders(keys) => {
                Box::new(keys.iter().map(|key| MapOp::DeleteService(*key)))
            }
            Phase::DeleteMembership(keys) => {
                Box::new(keys.iter().map(|key| MapOp::DeleteMembership(*key)))
            }
            Phase::DeleteSourceRanges(entries) => {
                Box::new(entries.iter().map(|entry| MapOp::DeleteSourceRange(*entry)))
            }
            Phase::DeleteBackends(entries) => Box::new(
                entries
                    .iter()
                    .map(|(id, backend)| MapOp::DeleteBackend(*id, *backend)),
            ),
            Phase::DeleteMaglev(keys) => Box::new(keys.iter().map(|key| MapOp::DeleteMaglev(*key))),
            Phase::DeleteNames(ids) => Box::new(ids.iter().map(|id| MapOp::DeleteName(*id))),
        }
    }
}

/// Where a sync's writes go: the kernel's maps of family `A`, or the tests' maps in memory.
pub trait MapSink<A = u32> {
    /// Writes `phase`'s entries in order (a key already gone counts as deleted): the
    /// outcome of each, one per entry (a barrier: one).
    fn write(&mut self, phase: Phase<'_, A>) -> Vec<Result<(), WriteError>>;

    /// Writes phases that are independent of each other (puts into different maps that
    /// only headers written later name), in any order or side by side: the outcomes of
    /// each phase, as [`write`](Self::write) gives them.
    fn write_together(&mut self, phases: &[Phase<'_, A>]) -> Vec<Vec<Result<(), WriteError>>>
    where
        A: Copy,
    {
        phases.iter().map(|phase| self.write(*phase)).collect()
    }
}

/// Maps that take every write, for tests that want only what the mirror follows.
#[cfg(test)]
pub struct AcceptingMaps;

#[cfg(test)]
impl<A: Address> MapSink<A> for AcceptingMaps {
    fn write(&mut self, phase: Phase<'_, A>) -> Vec<Result<(), WriteError>> {
        phase.ops().map(|_| Ok(())).collect()
    }
}

/// Splits `entries` into those `keep` accepts and how many it left out.
fn split<T: Copy>(entries: &[T], keep: impl Fn(&T) -> bool) -> (Vec<T>, usize) {
    let kept: Vec<T> = entries
        .iter()
        .copied()
        .filter(|entry| keep(entry))
        .collect();
    let left = entries.len() - kept.len();
    (kept, left)
}

/// Whether a write succeeded; a refused one is counted in `report` (a full map by map,
/// another failure with its reason).
fn succeeded<A: Address>(
    op: &MapOp<A>,
    result: Result<(), WriteError>,
    report: &mut ApplyReport,
) -> bool {
    match result {
        Ok(()) => return true,
        Err(WriteError::Full) => {
            let map = op.map().unwrap_or("?");
            *report.map_full.entry(map).or_default() += 1;
        }
        Err(WriteError::Failed(reason)) => {
            report.failures.push(format!("{op:?}: {reason}"));
        }
    }
    false
}

/// The slices a header names before and after a write (an empty one is none); `None`
/// when they are the same.
fn switched(
    old: Option<&FrontendValue>,
    new: Option<&FrontendValue>,
) -> Option<(Option<Slice>, Option<Slice>)> {
    let old = old.map(slice_of).filter(|slice| slice.len > 0);
    let new = new.map(slice_of).filter(|slice| slice.len > 0);
    (old != new).then_some((old, new))
}

/// What one sync wrote, and what it could not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub ops: usize,
    /// Writes refused because a map was full, by map (BACKEND_SLOTS: frontends whose
    /// slice found no room); retried by the next (full) sync.
    pub map_full: BTreeMap<&'static str, usize>,
    /// Writes held back because something they depend on was refused: headers naming a
    /// slot, backend, membership or source range that is not in the maps, and removals a
    /// held-back header still needs. The frontend stays as it was.
    pub held_back: usize,
    /// Other failed writes, with the reason; retried on the next sync.
    pub failures: Vec<String>,
}

impl ApplyReport {
    /// Whether every write succeeded.
    pub fn complete(&self) -> bool {
        self.map_full.is_empty() && self.held_back == 0 && self.failures.is_empty()
    }

    /// Writes refused as full, over all maps.
    pub fn refused_as_full(&self) -> usize {
        self.map_full.values().sum()
    }

    pub fn add(&mut self, other: ApplyReport) {
        self.ops += other.ops;
        for (map, count) in other.map_full {
            *self.map_full.entry(map).or_default() += count;
        }
        self.held_back += other.held_back;
        self.failures.extend(other.failures);
    }
}

/// Which frontends a sync writes.
#[derive(Clone, Copy, Debug)]
pub enum Sync<'a> {
    /// All of them: the maps become exactly this state.
    Full(&'a DesiredState),
    /// The changed ones only.
    Delta(&'a [FrontendChange]),
}

/// The writes of one pass, and the frontends they leave as they are.
#[derive(Debug)]
pub struct Batch<A = u32> {
    pub writes: MapWrites<A>,
    /// Frontends with no room for their slice.
    pub unplaced: usize,
    /// Frontends waiting for an evacuation this batch does (placed by the next pass).
    pub deferred: usize,
}

impl<A: Address> Batch<A> {
    /// The writes one at a time, in order.
    pub fn ops(&self) -> Vec<MapOp<A>> {
        self.writes.ops().collect()
    }
}

/// The maps' contents as last written, and the ids, slices and backend counts that go
/// with them: one per address family (`A`), each family's maps followed apart.
#[derive(Clone, Debug)]
pub struct MapMirror<A = u32> {
    current: MapImage<A>,
    ids: IdRegistry<A>,
    slots: SlotAllocator,
    /// Backend id → how many slots of live headers name it.
    backend_refs: HashMap<u32, u32>,
    /// How many slots the headers name, followed with them: the fill metric reads it after
    /// every sync, where a sum over the headers would cost every Service.
    named_slots: u64,
}

impl<A: Address> MapMirror<A> {
    /// Follows maps that hold `current` (read from the pins: ids stay stable across
    /// restarts), with `slot_capacity` slots in BACKEND_SLOTS.
    pub fn new(current: MapImage<A>, slot_capacity: u32) -> Self {
        let mut mirror = MapMirror {
            ids: IdRegistry::from_image(&current),
            current: MapImage::default(),
            slots: SlotAllocator::new(slot_capacity),
            backend_refs: HashMap::new(),
            named_slots: 0,
        };
        mirror.reset(current);
        mirror
    }

    /// What the maps hold, as far as the writes that succeeded tell.
    pub fn image(&self) -> &MapImage<A> {
        &self.current
    }

    /// BACKEND_SLOTS: slots in use (named, being written, or quarantined), and capacity.
    pub fn slots_used(&self) -> (u32, u32) {
        (self.slots.used(), self.slots.capacity())
    }

    /// BACKEND_SLOTS: the slots live headers name.
    pub fn named_slots(&self) -> u64 {
        self.named_slots
    }

    /// Forgets what was written and takes `current` as the truth (re-read from the maps),
    /// keeping the ids it knows and the quarantine of BACKEND_SLOTS.
    pub fn reset(&mut self, current: MapImage<A>) {
        self.slots.rebuild(current.services.values().map(slice_of));
        self.named_slots = (current.services.values())
            .map(|header| u64::from(slice_of(header).len))
            .sum();
        self.current = current;
        self.count_backend_refs();
    }

    /// Plans and writes `sync` into `maps`, in passes (bounded): a frontend waiting for an
    /// evacuation, or one that found no room while this pass freed slices (they are
    /// reusable after a barrier), is placed by the next.
    pub fn sync(&mut self, sync: Sync<'_>, maps: &mut impl MapSink<A>) -> ApplyReport {
        let mut report = ApplyReport::default();
        for pass in 1..=MAX_PASSES {
            let batch = match sync {
                Sync::Full(desired) => self.full(desired),
                Sync::Delta(changes) => self.delta(changes),
            };
            let left = batch.unplaced + batch.deferred;
            report.add(self.write(batch, maps));
            let room_coming = self.slots.has_quarantine();
            if left == 0 || !room_coming || pass == MAX_PASSES {
                if left > 0 {
                    *report.map_full.entry(A::MAPS.backend_slots).or_default() += left;
                }
                break;
            }
        }
        report
    }

    /// The writes that make the maps hold exactly `desired` (a full sync).
    pub fn full(&mut self, desired: &DesiredState) -> Batch<A> {
        let mut next = materialize(desired, &mut self.ids);
        self.forget_unused_ids(&next);
        let placement = place(&self.current, &mut next, Scope::Full, &mut self.slots);
        Batch {
            writes: diff(&self.current, &next, &placement),
            unplaced: placement.unplaced.len(),
            deferred: placement.deferred.len(),
        }
    }

    /// The writes for the changed frontends only: their entries, new backends before the
    /// slots that name them, unused backends after the last slot that named them went.
    pub fn delta(&mut self, changes: &[FrontendChange]) -> Batch<A> {
        let mut old = MapImage::default();
        let mut new = Entries::default();
        let mut keys = BTreeSet::new();
        for change in changes {
            let Some(key) = frontend_key(&change.frontend) else {
                continue;
            };
            keys.insert(key);
            old.extend(self.current.frontend_part(&key));
            if let Some(plan) = &change.new {
                frontend_entries(&change.frontend, plan, &mut self.ids, &mut new);
            }
        }
        let mut new = new.into_image();
        let placement = place(
            &self.current,
            &mut new,
            Scope::Frontends(&keys),
            &mut self.slots,
        );
        let mut refs: HashMap<u32, i64> = HashMap::new();
        for id in old.slot_backends() {
            *refs.entry(id).or_default() -= 1;
        }
        for id in new.slot_backends() {
            *refs.entry(id).or_default() += 1;
        }
        // Backends whose count stays above zero are neither written nor deleted.
        new.backends
            .retain(|id, _| !self.current.backends.contains_key(id));
        for (id, change) in refs {
            let count = i64::from(self.backend_refs.get(&id).copied().unwrap_or(0)) + change;
            if count <= 0
                && let Some(backend) = self.current.backends.get(&id)
            {
                old.backends.insert(id, *backend);
            }
        }
        Batch {
            writes: diff(&old, &new, &placement),
            unplaced: placement.unplaced.len(),
            deferred: placement.deferred.len(),
        }
    }

    /// Forgets the ids of what neither `next` nor the maps name any more.
    fn forget_unused_ids(&mut self, next: &DesiredImage<A>) {
        let mut service_ports: HashSet<u32> = (next.frontends.values())
            .map(|entry| entry.header.service_port_id)
            .collect();
        // Every id `next` names comes from the registry: when the registry holds no more
        // ids than that, none is unused (a first sync, a resync that changed nothing) and
        // the walk over a million backends is saved.
        let named = (
            next.backends.len(),
            next.frontends.len(),
            service_ports.len(),
        );
        if self.ids.counts() == named {
            return;
        }
        let current = &self.current;
        service_ports.extend(
            current
                .services
                .values()
                .map(|header| header.service_port_id),
        );
        self.ids.retain(
            |id| next.backends.contains_key(&id) || current.backends.contains_key(&id),
            |key| next.frontends.contains_key(key) || current.services.contains_key(key),
            |id| service_ports.contains(&id),
        );
    }

    /// Writes a batch into `maps` phase by phase, each phase one batch, following what
    /// succeeded. A header is written only once everything it names is in the maps;
    /// removals that a held-back header still needs are held back with it.
    pub fn write(&mut self, batch: Batch<A>, maps: &mut impl MapSink<A>) -> ApplyReport {
        let writes = batch.writes;
        let mut report = ApplyReport {
            ops: writes.len(),
            ..ApplyReport::default()
        };
        // What headers will name, each map's puts independent of the others'; slots that
        // reuse quarantined ones only after a barrier.
        let mut together = vec![
            Phase::PutNames(&writes.put_names),
            Phase::PutBackends(&writes.put_backends),
            Phase::PutMembership(&writes.grow_membership),
        ];
        let slots = Phase::PutSlots(&writes.put_slots);
        if !writes.needs_barrier() {
            together.push(slots);
        }
        let results = maps.write_together(&together);
        for (phase, results) in together.iter().zip(results) {
            self.record(*phase, results, &mut report);
        }
        if writes.needs_barrier() {
            self.write_phase(maps, Phase::Barrier, &mut report);
            self.write_phase(maps, slots, &mut report);
        }
        self.write_phase(maps, Phase::PutMaglev(&writes.put_maglev), &mut report);
        let ranges = &writes.put_source_ranges;
        self.write_phase(maps, Phase::PutSourceRanges(ranges), &mut report);
        // Frontends (rev_nat_id) whose header stays as it was.
        let mut held: BTreeSet<u32> = BTreeSet::new();
        let (ready, waiting): (Vec<_>, Vec<_>) = (writes.put_headers.iter().copied())
            .partition(|(key, header)| self.current.missing_for(key, header).is_none());
        report.held_back += waiting.len();
        held.extend(waiting.iter().map(|(_, header)| header.rev_nat_id));
        let results = maps.write(Phase::PutHeaders(&ready));
        for ((_, header), result) in ready.iter().zip(&results) {
            if result.is_err() {
                held.insert(header.rev_nat_id);
            }
        }
        self.record_headers(&ready, results, &mut report);
        self.write_phase(
            maps,
            Phase::DeleteHeaders(&writes.delete_headers),
            &mut report,
        );
        // What a held-back header still names stays.
        let (shrink, kept) = split(&writes.shrink_membership, |(key, _)| {
            !held.contains(&key.rev_nat_id)
        });
        let (delete_members, kept_members) = split(&writes.delete_membership, |key| {
            !held.contains(&key.rev_nat_id)
        });
        let (delete_ranges, kept_ranges) = split(&writes.delete_source_ranges, |entry| {
            !held.contains(&entry.range.rev_nat_id)
        });
        let (delete_backends, kept_backends) = split(&writes.delete_backends, |(id, _)| {
            self.backend_refs.get(id).is_none_or(|count| *count == 0)
        });
        report.held_back += kept + kept_members + kept_ranges + kept_backends;
        self.write_phase(maps, Phase::PutMembership(&shrink), &mut report);
        self.write_phase(maps, Phase::DeleteMembership(&delete_members), &mut report);
        self.write_phase(maps, Phase::DeleteSourceRanges(&delete_ranges), &mut report);
        self.write_phase(maps, Phase::DeleteBackends(&delete_backends), &mut report);
        // A table a held-back (or moved) header still names stays. (Looked for only when
        // tables go: a change of a frontend without one costs no walk over every header.)
        let named: BTreeSet<MaglevKey> = if writes.delete_maglev.is_empty() {
            BTreeSet::new()
        } else {
            (self.current.services.values())
                .flat_map(super::image::maglev_keys)
                .collect()
        };
        let (delete_tables, kept_tables) = split(&writes.delete_maglev, |key| !named.contains(key));
        report.held_back += kept_tables;
        self.write_phase(maps, Phase::DeleteMaglev(&delete_tables), &mut report);
        self.write_phase(maps, Phase::DeleteNames(&writes.delete_names), &mut report);
        for slice in self.slots.settle() {
            self.forget_slots(slice);
        }
        self.shrink_sparse();
        report
    }

    /// Writes one phase into `maps` and records the outcome.
    fn write_phase(
        &mut self,
        maps: &mut impl MapSink<A>,
        phase: Phase<'_, A>,
        report: &mut ApplyReport,
    ) {
        let results = maps.write(phase);
        self.record(phase, results, report);
    }

    /// Records the outcome of each write of `phase`, in order: those that succeeded in the
    /// mirror, the others in the report (retried by the next, full, sync).
    fn record(
        &mut self,
        phase: Phase<'_, A>,
        results: Vec<Result<(), WriteError>>,
        report: &mut ApplyReport,
    ) {
        let mut puts = Puts::default();
        for (op, result) in phase.ops().zip(results) {
            if succeeded(&op, result, report) {
                self.applied(op, &mut puts);
            }
        }
        puts.merge_into(&mut self.current);
    }

    /// Records the outcome of each header write, as [`record`](Self::record) does. Many
    /// beside the headers the maps hold (a full sync) are taken in one pass: their slices
    /// switched, the headers merged into the image, and every backend's count taken again
    /// over the slices headers name — switching one header at a time counts its slots one
    /// by one, in a map of a million at 100 000 Services.
    fn record_headers(
        &mut self,
        headers: &[(FrontendKey<A>, FrontendValue)],
        results: Vec<Result<(), WriteError>>,
        report: &mut ApplyReport,
    ) {
        if !is_bulk(headers.len(), self.current.services.len()) {
            return self.record(Phase::PutHeaders(headers), results, report);
        }
        let mut written = Vec::with_capacity(headers.len());
        for (&(key, header), result) in headers.iter().zip(results) {
            if succeeded(&MapOp::PutService(key, header), result, report) {
                let old = self.current.services.get(&key);
                if let Some((old, new)) = switched(old, Some(&header)) {
                    self.move_slices(old, new);
                }
                written.push((key, header));
            }
        }
        merge(&mut self.current.services, &mut written);
        self.count_backend_refs();
    }

    /// Counts again, over every header's slice, how many slots name each backend.
    fn count_backend_refs(&mut self) {
        let mut refs = HashMap::with_capacity(self.current.backends.len());
        for id in self.current.slot_backends() {
            *refs.entry(id).or_default() += 1;
        }
        self.backend_refs = refs;
    }

    /// Gives unused buckets back after most entries went.
    fn shrink_sparse(&mut self) {
        crate::allocator::shrink_sparse(&mut self.backend_refs);
        self.ids.shrink_sparse();
    }

    /// Records a write that succeeded. Plain puts wait in `puts`, to be merged into the
    /// image together (see [`Puts`]); anything else first merges what waits, so the writes
    /// count in order.
    fn applied(&mut self, op: MapOp<A>, puts: &mut Puts<A>) {
        let Some(op) = puts.take(op) else {
            return;
        };
        puts.merge_into(&mut self.current);
        match op {
            MapOp::PutService(key, header) => {
                let old = self.current.services.insert(key, header);
                self.switch_slices(old.as_ref(), Some(&header));
            }
            MapOp::DeleteService(key) => {
                let old = self.current.services.remove(&key);
                self.switch_slices(old.as_ref(), None);
                self.ids.release_frontend(key);
            }
            MapOp::DeleteBackend(id, backend) => {
                self.current.backends.remove(&id);
                self.ids.release_backend(&backend);
            }
            MapOp::Barrier => self.slots.barrier_done(),
            op => self.current.apply(&op),
        }
    }

    /// A header stopped naming `old`'s slice and names `new`'s: the backends' counts move
    /// with the slots, the old slice goes to quarantine.
    fn switch_slices(&mut self, old: Option<&FrontendValue>, new: Option<&FrontendValue>) {
        let Some((old, new)) = switched(old, new) else {
            return;
        };
        if let Some(slice) = new {
            for (_, slot) in self.current.slots.range(slice.range()) {
                *self.backend_refs.entry(slot.backend_id).or_default() += 1;
            }
        }
        if let Some(slice) = old {
            for (_, slot) in self.current.slots.range(slice.range()) {
                if let Some(count) = self.backend_refs.get_mut(&slot.backend_id) {
                    *count -= 1;
                    if *count == 0 {
                        self.backend_refs.remove(&slot.backend_id);
                    }
                }
            }
        }
        self.move_slices(old, new);
    }

    /// A header names `new` (reserved until now) instead of `old`, which the mirror
    /// forgets and BACKEND_SLOTS quarantines.
    fn move_slices(&mut self, old: Option<Slice>, new: Option<Slice>) {
        let len = |slice: Option<Slice>| u64::from(slice.map_or(0, |slice| slice.len));
        self.named_slots = self.named_slots + len(new) - len(old);
        if let Some(slice) = new {
            self.slots.named(slice);
        }
        if let Some(slice) = old {
            self.forget_slots(slice);
            self.slots.released(slice);
        }
    }

    /// Drops a slice no header names from the mirror (the array keeps its bytes, which
    /// nothing reads).
    fn forget_slots(&mut self, slice: Slice) {
        for index in slice.range() {
            self.current.slots.remove(&index);
        }
    }

    /// Backend id → how many slots of live headers name it, as followed write by write.
    #[cfg(test)]
    pub fn backend_refs(&self) -> &HashMap<u32, u32> {
        &self.backend_refs
    }

    /// The header of `key` as the mirror knows it.
    pub fn header(&self, key: &FrontendKey<A>) -> Option<&FrontendValue> {
        self.current.services.get(key)
    }
}
