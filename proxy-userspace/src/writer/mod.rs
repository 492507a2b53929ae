//! Writer: turns the planner's desired state into map entries and writes them in an order
//! that keeps every packet consistent.
//!
//! [`image`] is pure (frontends and backends → entries, where new slices go, the ordered
//! difference between two images), [`slots`] keeps track of BACKEND_SLOTS (free, live and
//! quarantined slices), [`delta`] follows what the maps hold so a change writes only the
//! frontends it touched, with reference-counted backends, and writes a batch through any
//! writer; [`MapWriter`] is the only code that writes the kernel's maps.

#[cfg(test)]
mod backend_refs_tests;
mod delta;
mod ids;
mod image;
mod slots;
#[cfg(test)]
mod sync_property;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use aya::Pod;
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, LpmTrie, MapData, MapError};
use proxy_common::maglev::{MaglevChunk, MaglevKey};
use proxy_common::{
    Address, Backend, FrontendKey, FrontendValue, Ipv6, MembershipKey, ServiceName, Slot,
    SourceRange,
};
use tracing::warn;

#[cfg(test)]
pub use delta::AcceptingMaps;
pub use delta::{ApplyReport, Batch, MapMirror, MapSink, Phase, Sync, WriteError};
pub use ids::IdRegistry;
pub use image::{
    DesiredImage, FrontendEntry, MapImage, MapOp, MapWrites, SourceRangeEntry, frontend_key,
    maglev_keys, maglev_table, materialize, slice_of,
};

use crate::bpf_batch;
use crate::plan::{DesiredState, FrontendChange};

/// One address family's maps that the writer owns, as pinned by the datapath (IPv4's
/// SERVICES, …, or IPv6's SERVICES6, …: `A::MAPS`).
pub struct FamilyMaps<A: Address = u32> {
    pub services: BpfHashMap<MapData, FrontendKey<A>, FrontendValue>,
    pub slots: Array<MapData, Slot<A>>,
    pub backend_ids: BpfHashMap<MapData, Backend<A>, u32>,
    pub membership: BpfHashMap<MapData, MembershipKey<A>, u8>,
    pub names: BpfHashMap<MapData, u32, ServiceName>,
    pub source_ranges: LpmTrie<MapData, SourceRange<A>, u8>,
    pub maglev: BpfHashMap<MapData, MaglevKey, MaglevChunk>,
}

impl<A: Address> FamilyMaps<A> {
    fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let names = A::MAPS;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow::anyhow!("map {name} missing from the eBPF object"))
        };
        Ok(Self {
            services: take(names.services)?.try_into()?,
            slots: take(names.backend_slots)?.try_into()?,
            backend_ids: take(names.backend_ids)?.try_into()?,
            membership: take(names.membership)?.try_into()?,
            names: take(names.svc_names)?.try_into()?,
            source_ranges: take(names.source_ranges)?.try_into()?,
            maglev: take(names.maglev)?.try_into()?,
        })
    }
}

/// The maps the writer owns, as pinned by the datapath: each family's, and the one
/// MEMBERSHIP_EPOCH both raise.
pub struct WriterMaps {
    pub ipv4: FamilyMaps<u32>,
    pub ipv6: FamilyMaps<Ipv6>,
    /// Raised after MEMBERSHIP or MEMBERSHIP6 changed: flows re-check their backend.
    pub membership_epoch: Array<MapData, u32>,
}

impl WriterMaps {
    /// Takes the writer's maps out of the loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let epoch = proxy_common::map_names::MEMBERSHIP_EPOCH;
        Ok(Self {
            ipv4: FamilyMaps::take(ebpf)?,
            ipv6: FamilyMaps::take(ebpf)?,
            membership_epoch: ebpf
                .take_map(epoch)
                .ok_or_else(|| anyhow::anyhow!("map {epoch} missing from the eBPF object"))?
                .try_into()?,
        })
    }
}

/// Writes the maps of both families, following what they hold in a [`MapMirror`] each.
pub struct MapWriter {
    ipv4: FamilyWriter<u32>,
    ipv6: FamilyWriter<Ipv6>,
    membership_epoch: Array<MapData, u32>,
}

/// One family's maps, what they hold, and their capacities.
struct FamilyWriter<A: Address> {
    maps: FamilyMaps<A>,
    mirror: MapMirror<A>,
    /// Each map's capacity, read once (a reused pin keeps the size it was created with).
    capacities: BTreeMap<&'static str, u32>,
}

/// How full one map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

impl<A: Address + std::marker::Sync> FamilyWriter<A> {
    fn new(maps: FamilyMaps<A>) -> Result<Self, MapError> {
        let names = A::MAPS;
        let capacity = maps.slots.len();
        let image = read(&maps)?;
        let mut capacities = BTreeMap::new();
        for (name, map) in [
            (names.services, maps.services.map()),
            (names.backend_ids, maps.backend_ids.map()),
            (names.membership, maps.membership.map()),
            (names.svc_names, maps.names.map()),
            (names.source_ranges, maps.source_ranges.map()),
            (names.maglev, maps.maglev.map()),
        ] {
            capacities.insert(name, map.info()?.max_entries());
        }
        capacities.insert(names.backend_slots, capacity);
        Ok(Self {
            maps,
            mirror: MapMirror::new(image, capacity),
            capacities,
        })
    }

    fn fill(&self) -> impl Iterator<Item = MapFill> + '_ {
        let names = A::MAPS;
        let image = self.mirror.image();
        [
            (names.services, image.services.len() as u64),
            (names.backend_slots, self.mirror.named_slots()),
            (names.backend_ids, image.backends.len() as u64),
            (names.membership, image.membership.len() as u64),
            (names.svc_names, image.names.len() as u64),
            (names.source_ranges, image.source_ranges.len() as u64),
            (names.maglev, image.maglev.len() as u64),
        ]
        .into_iter()
        .map(|(map, entries)| MapFill {
            map,
            entries,
            max_entries: self.capacities.get(map).copied().unwrap_or(0),
        })
    }

    fn reread(&mut self) -> Result<(), MapError> {
        let image = read(&self.maps)?;
        self.mirror.reset(image);
        Ok(())
    }

    /// Writes `sync`'s frontends of this family; whether a MEMBERSHIP write succeeded.
    fn sync(&mut self, sync: Sync<'_>) -> (ApplyReport, bool) {
        let mut kernel = KernelMaps {
            maps: &mut self.maps,
            membership_changed: false,
        };
        let report = self.mirror.sync(sync, &mut kernel);
        (report, kernel.membership_changed)
    }
}

impl MapWriter {
    /// Takes the maps and learns what they already hold (they may be pinned from a
    /// previous run of the daemon).
    pub fn new(maps: WriterMaps) -> Result<Self, MapError> {
        Ok(Self {
            ipv4: FamilyWriter::new(maps.ipv4)?,
            ipv6: FamilyWriter::new(maps.ipv6)?,
            membership_epoch: maps.membership_epoch,
        })
    }

    /// How full the maps the writer owns are, as last written (BACKEND_SLOTS: the slots
    /// headers name), IPv4's then IPv6's.
    pub fn fill(&self) -> Vec<MapFill> {
        self.ipv4.fill().chain(self.ipv6.fill()).collect()
    }

    /// Reads the maps again, so the next [`apply`](Self::apply) repairs anything that was
    /// changed behind our back.
    pub fn reread(&mut self) -> Result<(), MapError> {
        self.ipv4.reread()?;
        self.ipv6.reread()
    }

    /// What the IPv4 maps hold, as last written.
    pub fn image(&self) -> &MapImage {
        self.ipv4.mirror.image()
    }

    /// What the IPv6 maps hold, as last written.
    pub fn image6(&self) -> &MapImage<Ipv6> {
        self.ipv6.mirror.image()
    }

    /// Makes the maps equal to `desired`, writing only the difference to what they hold (a
    /// full sync: start-up, resync, a change of the node).
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        self.sync(Sync::Full(desired))
    }

    /// Writes the changed frontends only (a partial sync).
    pub fn apply_delta(&mut self, changes: &[FrontendChange]) -> ApplyReport {
        self.sync(Sync::Delta(changes))
    }

    fn sync(&mut self, sync: Sync<'_>) -> ApplyReport {
        let (mut report, ipv4_members) = self.ipv4.sync(sync);
        let (ipv6_report, ipv6_members) = self.ipv6.sync(sync);
        report.add(ipv6_report);
        // After the writes: a flow that reads the new epoch finds the new membership.
        if (ipv4_members || ipv6_members)
            && let Err(error) = raise_membership_epoch(&mut self.membership_epoch)
        {
            report
                .failures
                .push(format!("raising MEMBERSHIP_EPOCH: {error}"));
        }
        report
    }
}

/// The kernel's maps as the mirror writes them: each phase of a hash map or the slot array
/// as one batch (BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH, applied element by element
/// in order, as single writes were); SOURCE_RANGES, an LPM trie of a few entries per
/// restricted frontend, one entry at a time.
struct KernelMaps<'a, A: Address> {
    maps: &'a mut FamilyMaps<A>,
    /// Whether a MEMBERSHIP write succeeded (MEMBERSHIP_EPOCH is raised after the sync).
    membership_changed: bool,
}

/// Independent phases of at least this many entries in all are written side by side, one
/// thread each: at 100 000 Services the kernel spends about a second on a million
/// BACKEND_IDS and a million MEMBERSHIP entries, which need not wait for each other.
const TOGETHER_FROM: usize = 16 * 1024;

impl<A: Address> KernelMaps<'_, A> {
    fn outcomes(
        &mut self,
        phase: Phase<'_, A>,
        results: Vec<io::Result<()>>,
    ) -> Vec<Result<(), WriteError>> {
        if matches!(phase, Phase::PutMembership(_) | Phase::DeleteMembership(_)) {
            self.membership_changed |= results.iter().any(Result::is_ok);
        }
        results
            .into_iter()
            .map(|result| {
                result.map_err(|error| {
                    if error.raw_os_error() == Some(libc::E2BIG) {
                        // A full hash map refuses new keys with E2BIG.
                        WriteError::Full
                    } else {
                        WriteError::Failed(error.to_string())
                    }
                })
            })
            .collect()
    }
}

/// Writes a phase that puts into a hash map or the slot array ([`Phase::puts_shared`]),
/// which need only shared access (the kernel orders concurrent writers).
fn put_shared<A: Address>(maps: &FamilyMaps<A>, phase: Phase<'_, A>) -> Vec<io::Result<()>> {
    match phase {
        Phase::PutNames(entries) => put(maps.names.map(), entries),
        Phase::PutBackends(entries) => {
            // BACKEND_IDS is keyed by the backend.
            let (ids, backends): (Vec<u32>, Vec<Backend<A>>) = entries.iter().copied().unzip();
            update_each(maps.backend_ids.map(), &backends, &ids)
        }
        Phase::PutMembership(entries) => put(maps.membership.map(), entries),
        Phase::PutSlots(entries) => put(maps.slots.map(), entries),
        Phase::PutMaglev(entries) => put(maps.maglev.map(), entries),
        Phase::PutHeaders(entries) => put(maps.services.map(), entries),
        other => panic!("{other:?} is not written through shared maps"),
    }
}

impl<A: Address + std::marker::Sync> MapSink<A> for KernelMaps<'_, A> {
    fn write_together(&mut self, phases: &[Phase<'_, A>]) -> Vec<Vec<Result<(), WriteError>>> {
        let entries: usize = phases.iter().map(|phase| phase.writes()).sum();
        if entries < TOGETHER_FROM || !phases.iter().all(|phase| phase.puts_shared()) {
            return phases.iter().map(|phase| self.write(*phase)).collect();
        }
        let maps = &*self.maps;
        let results: Vec<Vec<io::Result<()>>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (phases.iter())
                .map(|phase| scope.spawn(move || put_shared(maps, *phase)))
                .collect();
            (threads.into_iter())
                .map(|thread| thread.join().expect("a map writer thread panicked"))
                .collect()
        });
        (phases.iter().zip(results))
            .map(|(phase, results)| self.outcomes(*phase, results))
            .collect()
    }

    fn write(&mut self, phase: Phase<'_, A>) -> Vec<Result<(), WriteError>> {
        if phase.puts_shared() {
            let results = put_shared(self.maps, phase);
            return self.outcomes(phase, results);
        }
        let maps = &mut *self.maps;
        let results = match phase {
            Phase::Barrier => {
                grace_period();
                vec![Ok(())]
            }
            Phase::PutSourceRanges(entries) => (entries.iter())
                .map(|entry| maps.source_ranges.insert(&entry.key(), 1, 0))
                .map(io_result)
                .collect(),
            Phase::DeleteHeaders(keys) => delete_each(maps.services.map(), keys),
            Phase::DeleteMembership(keys) => delete_each(maps.membership.map(), keys),
            Phase::DeleteSourceRanges(entries) => (entries.iter())
                .map(|entry| ignore_missing(maps.source_ranges.remove(&entry.key())))
                .map(io_result)
                .collect(),
            Phase::DeleteBackends(entries) => {
                let backends: Vec<Backend<A>> =
                    entries.iter().map(|(_, backend)| *backend).collect();
                delete_each(maps.backend_ids.map(), &backends)
            }
            Phase::DeleteMaglev(keys) => delete_each(maps.maglev.map(), keys),
            Phase::DeleteNames(ids) => delete_each(maps.names.map(), ids),
            shared => put_shared(maps, shared),
        };
        self.outcomes(phase, results)
    }
}

fn put<K: Pod, V: Pod>(map: &MapData, entries: &[(K, V)]) -> Vec<io::Result<()>> {
    let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
    update_each(map, &keys, &values)
}

/// Writes `keys[i]` → `values[i]` as batches, each resuming after an element that failed;
/// the outcome of each element.
fn update_each<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Vec<io::Result<()>> {
    let mut results = Vec::with_capacity(keys.len());
    while results.len() < keys.len() {
        let start = results.len();
        match bpf_batch::update(map, &keys[start..], &values[start..]) {
            Ok(()) => results.resize_with(keys.len(), || Ok(())),
            Err(stopped) => {
                results.resize_with(start + stopped.applied, || Ok(()));
                results.push(Err(stopped.error));
            }
        }
    }
    results
}

/// Deletes `keys` as batches, each resuming after an element that failed; a key that is
/// gone already counts as deleted. The outcome of each element.
fn delete_each<K: Pod>(map: &MapData, keys: &[K]) -> Vec<io::Result<()>> {
    let mut results = Vec::with_capacity(keys.len());
    while results.len() < keys.len() {
        let start = results.len();
        match bpf_batch::delete(map, &keys[start..]) {
            Ok(()) => results.resize_with(keys.len(), || Ok(())),
            Err(stopped) => {
                results.resize_with(start + stopped.applied, || Ok(()));
                let gone = stopped.error.raw_os_error() == Some(libc::ENOENT);
                results.push(if gone { Ok(()) } else { Err(stopped.error) });
            }
        }
    }
    results
}

/// A single write's outcome as a batch element's.
fn io_result(result: Result<(), MapError>) -> io::Result<()> {
    result.map_err(|error| match error {
        MapError::SyscallError(error) => error.io_error,
        other => io::Error::other(other.to_string()),
    })
}

/// Reads what the maps hold: every header, the slots they name, the backends, membership,
/// names and source ranges. BACKEND_IDS entries no slot names, or that disagree with the
/// slots, are left out, so the next full sync writes them again.
fn read<A: Address>(maps: &FamilyMaps<A>) -> Result<MapImage<A>, MapError> {
    let mut image = MapImage::default();
    for entry in maps.services.iter() {
        let (key, header) = entry?;
        image.services.insert(key, header);
    }
    image.slots = read_slots(maps.slots.map(), &image.services).map_err(MapError::IoError)?;
    for entry in maps.backend_ids.iter() {
        let (backend, id) = entry?;
        image.backends.insert(id, backend);
    }
    for entry in maps.membership.iter() {
        let (key, bits) = entry?;
        image.membership.insert(key, bits);
    }
    for entry in maps.names.iter() {
        let (id, name) = entry?;
        image.names.insert(id, name);
    }
    for key in maps.source_ranges.keys() {
        image
            .source_ranges
            .insert(SourceRangeEntry::from_key(&key?));
    }
    bpf_batch::for_each_entry(
        maps.maglev.map(),
        4096,
        |key: &MaglevKey, _: &MaglevChunk| {
            image.maglev.insert(*key);
            Ok(())
        },
    )
    .map_err(MapError::IoError)?;
    Ok(image)
}

/// The slots of BACKEND_SLOTS (`map`) that `headers` name, read in batches.
pub fn read_slots<A: Address>(
    map: &MapData,
    headers: &BTreeMap<FrontendKey<A>, FrontendValue>,
) -> io::Result<BTreeMap<u32, Slot<A>>> {
    let named: Vec<std::ops::Range<u32>> = headers
        .values()
        .map(|header| slice_of(header).range())
        .filter(|range| !range.is_empty())
        .collect();
    let mut slots = BTreeMap::new();
    if named.is_empty() {
        return Ok(slots);
    }
    bpf_batch::for_each_entry(map, 4096, |index: &u32, slot: &Slot<A>| {
        if named.iter().any(|range| range.contains(index)) {
            slots.insert(*index, *slot);
        }
        Ok(())
    })?;
    Ok(slots)
}

fn raise_membership_epoch(epoch: &mut Array<MapData, u32>) -> Result<(), MapError> {
    let next = epoch.get(&0, 0)?.wrapping_add(1);
    epoch.set(0, next, 0)
}

/// Waits for an RCU grace period: every program run that started before has finished, so
/// no packet still reads a header replaced before. `membarrier(MEMBARRIER_CMD_GLOBAL)` is
/// exactly that (the kernel calls `synchronize_rcu`; a few milliseconds). Where it is not
/// available (nohz_full kernels, a seccomp filter) a pause far longer than any program
/// run stands in.
fn grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    const FALLBACK: Duration = Duration::from_millis(100);
    // SAFETY: membarrier takes no pointers.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        warn!(
            error = %io::Error::last_os_error(),
            "membarrier(MEMBARRIER_CMD_GLOBAL) failed; pausing 100 ms instead of an RCU grace period"
        );
        std::thread::sleep(FALLBACK);
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}
