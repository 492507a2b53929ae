//! Writer: turns the planner's desired state into map entries and writes them in an order
//! that keeps every packet consistent.
//!
//! [`image`] is pure (frontends and backends → entries, the ordered difference between two
//! images), [`delta`] follows what the maps hold so a change writes only the frontends it
//! touched, with reference-counted backends; [`MapWriter`] is the only code that writes the
//! aya maps.

mod delta;
mod image;
#[cfg(test)]
mod property;

use std::collections::HashMap;

use aya::Pod;
use aya::maps::{Array, HashMap as BpfHashMap, IterableMap, LpmTrie, MapData, MapError};
use proxy_common::{Backend, MembershipKey, ServiceKey, ServiceName, ServiceValue, SourceRange};

pub use delta::MapMirror;
pub use image::{IdRegistry, MapImage, MapOp, MapWrites, SourceRangeEntry, diff, materialize};

use crate::bpf_batch;
use crate::plan::{DesiredState, FrontendChange};

/// What one [`MapWriter::apply`] or [`MapWriter::apply_delta`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub ops: usize,
    /// Writes refused because a map was full; retried by the next (full) sync.
    pub map_full: usize,
    /// Other failed writes, with the reason; retried on the next sync.
    pub failures: Vec<String>,
}

impl ApplyReport {
    /// Whether every write succeeded.
    pub fn complete(&self) -> bool {
        self.map_full == 0 && self.failures.is_empty()
    }
}

/// Owns the SERVICES, BACKENDS, MEMBERSHIP and SVC_NAMES maps (and BACKEND_IDS,
/// MEMBERSHIP_EPOCH, SOURCE_RANGES) and a mirror of their contents.
pub struct MapWriter {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    membership: BpfHashMap<MapData, MembershipKey, u8>,
    names: BpfHashMap<MapData, u32, ServiceName>,
    /// Optional, so callers that never restrict sources (the benchmarks) need not open it;
    /// without it, a plan with source ranges reports failed writes.
    source_ranges: Option<LpmTrie<MapData, SourceRange, u8>>,
    /// BACKENDS inverted, written with it, and the epoch raised after MEMBERSHIP changed
    /// (see [`MapWriter::with_flow_maps`]).
    flow_maps: Option<FlowMaps>,
    mirror: MapMirror,
}

/// The maps the datapath's conntrack reads besides the Services: which (address, port)
/// pairs are backends, and whether MEMBERSHIP changed since a flow last checked it.
pub struct FlowMaps {
    pub backend_ids: BpfHashMap<MapData, Backend, u32>,
    pub membership_epoch: Array<MapData, u32>,
}

impl MapWriter {
    /// Takes the maps and learns what they already hold (they may be pinned from a
    /// previous run of the daemon).
    pub fn new(
        services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
        backends: BpfHashMap<MapData, u32, Backend>,
        membership: BpfHashMap<MapData, MembershipKey, u8>,
        names: BpfHashMap<MapData, u32, ServiceName>,
    ) -> Result<Self, MapError> {
        let mut writer = Self {
            services,
            backends,
            membership,
            names,
            source_ranges: None,
            flow_maps: None,
            mirror: MapMirror::default(),
        };
        writer.mirror = MapMirror::new(writer.read()?);
        Ok(writer)
    }

    /// Also writes SOURCE_RANGES (`loadBalancerSourceRanges`), learning what it holds.
    pub fn with_source_ranges(
        mut self,
        source_ranges: LpmTrie<MapData, SourceRange, u8>,
    ) -> Result<Self, MapError> {
        self.source_ranges = Some(source_ranges);
        self.reread()?;
        Ok(self)
    }

    /// Also writes BACKEND_IDS with BACKENDS and raises MEMBERSHIP_EPOCH after changing
    /// MEMBERSHIP: what the datapath needs to track direct flows to backends and to move
    /// flows off backends that left.
    pub fn with_flow_maps(mut self, flow_maps: FlowMaps) -> Result<Self, MapError> {
        self.flow_maps = Some(flow_maps);
        self.reread()?;
        Ok(self)
    }

    /// Reads the maps again, so the next [`apply`](Self::apply) repairs anything that was
    /// changed behind our back.
    pub fn reread(&mut self) -> Result<(), MapError> {
        let image = self.read()?;
        self.mirror.reset(image);
        Ok(())
    }

    fn read(&mut self) -> Result<MapImage, MapError> {
        let mut image = MapImage::default();
        for entry in self.services.iter() {
            let (key, value) = entry?;
            image.services.insert(key, value);
        }
        for entry in self.backends.iter() {
            let (id, backend) = entry?;
            image.backends.insert(id, backend);
        }
        for entry in self.membership.iter() {
            let (key, bits) = entry?;
            image.membership.insert(key, bits);
        }
        for entry in self.names.iter() {
            let (id, name) = entry?;
            image.names.insert(id, name);
        }
        for key in self.source_ranges.iter().flat_map(LpmTrie::keys) {
            image
                .source_ranges
                .insert(SourceRangeEntry::from_key(&key?));
        }
        if let Some(flow_maps) = &mut self.flow_maps {
            repair_backend_ids(flow_maps, &mut image)?;
        }
        Ok(image)
    }

    /// Entries in SERVICES and BACKENDS, as last written.
    pub fn fill(&self) -> (usize, usize) {
        let image = self.mirror.image();
        (image.services.len(), image.backends.len())
    }

    /// Makes the maps equal to `desired`, writing only the difference to what they hold (a
    /// full sync: start-up, resync, a change of the node).
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyReport {
        let writes = self.mirror.full(desired);
        self.write_all(writes)
    }

    /// Writes the changed frontends only (a partial sync).
    pub fn apply_delta(&mut self, changes: &[FrontendChange]) -> ApplyReport {
        let writes = self.mirror.delta(changes);
        self.write_all(writes)
    }

    /// Writes phase by phase, each phase of a hash map as one batch per map (the kernel
    /// applies a batch's elements in order, as single writes would be); SOURCE_RANGES, an
    /// LPM trie of a few entries per restricted frontend, one entry at a time. BACKEND_IDS
    /// goes with BACKENDS (its reverse entry first, last out), and MEMBERSHIP_EPOCH is
    /// raised once MEMBERSHIP changed.
    fn write_all(&mut self, writes: MapWrites) -> ApplyReport {
        let mut report = ApplyReport {
            ops: writes.len(),
            ..ApplyReport::default()
        };
        let MapWriter {
            services,
            backends,
            membership,
            names,
            source_ranges,
            flow_maps,
            mirror,
        } = self;
        let mut phase = Phase {
            mirror,
            report: &mut report,
            membership_changed: false,
        };
        phase.put(names.map(), &writes.put_names, |(id, name)| {
            MapOp::PutName(id, name)
        });
        phase.put_backends(backends.map(), flow_maps.as_ref(), &writes.put_backends);
        phase.put(membership.map(), &writes.grow_membership, |(key, bits)| {
            MapOp::PutMembership(key, bits)
        });
        phase.put(services.map(), &writes.put_slots, |(key, value)| {
            MapOp::PutService(key, value)
        });
        for entry in &writes.put_source_ranges {
            let written = match source_ranges.as_mut() {
                Some(ranges) => ranges.insert(&entry.key(), 1, 0),
                None => Err(no_source_ranges()),
            };
            phase.single(MapOp::PutSourceRange(*entry), written);
        }
        phase.put(services.map(), &writes.put_headers, |(key, value)| {
            MapOp::PutService(key, value)
        });
        phase.delete(services.map(), &writes.delete_headers, MapOp::DeleteService);
        phase.delete(services.map(), &writes.delete_slots, MapOp::DeleteService);
        phase.put(
            membership.map(),
            &writes.shrink_membership,
            |(key, bits)| MapOp::PutMembership(key, bits),
        );
        phase.delete(
            membership.map(),
            &writes.delete_membership,
            MapOp::DeleteMembership,
        );
        for entry in &writes.delete_source_ranges {
            let removed = match source_ranges.as_mut() {
                Some(ranges) => ignore_missing(ranges.remove(&entry.key())),
                None => Err(no_source_ranges()),
            };
            phase.single(MapOp::DeleteSourceRange(*entry), removed);
        }
        phase.delete_backends(backends.map(), flow_maps.as_ref(), &writes.delete_backends);
        phase.delete(names.map(), &writes.delete_names, MapOp::DeleteName);
        // After the writes: a flow that reads the new epoch finds the new membership.
        if phase.membership_changed
            && let Err(error) = raise_membership_epoch(flow_maps.as_mut())
        {
            report
                .failures
                .push(format!("raising MEMBERSHIP_EPOCH: {error}"));
        }
        self.mirror.shrink_sparse();
        report
    }
}

fn raise_membership_epoch(flow_maps: Option<&mut FlowMaps>) -> Result<(), MapError> {
    let epoch = &mut flow_maps.ok_or_else(no_flow_maps)?.membership_epoch;
    let next = epoch.get(&0, 0)?.wrapping_add(1);
    epoch.set(0, next, 0)
}

fn no_flow_maps() -> MapError {
    MapError::IoError(std::io::Error::other(
        "the writer was not given BACKEND_IDS and MEMBERSHIP_EPOCH",
    ))
}

fn no_source_ranges() -> MapError {
    MapError::IoError(std::io::Error::other(
        "the writer was not given the SOURCE_RANGES map",
    ))
}

/// Applies phases and records the outcome of each write: those that succeeded in the
/// mirror, the others in the report (retried by the next, full, sync).
struct Phase<'w> {
    mirror: &'w mut MapMirror,
    report: &'w mut ApplyReport,
    /// Whether a MEMBERSHIP write succeeded.
    membership_changed: bool,
}

impl Phase<'_> {
    fn put<K: Pod, V: Pod>(
        &mut self,
        map: &MapData,
        entries: &[(K, V)],
        op: impl Fn((K, V)) -> MapOp,
    ) {
        let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
        let results = update_each(map, &keys, &values);
        self.record(entries.iter().map(|entry| op(*entry)), results);
    }

    fn delete<K: Pod>(&mut self, map: &MapData, keys: &[K], op: impl Fn(K) -> MapOp) {
        let results = delete_each(map, keys);
        self.record(keys.iter().map(|key| op(*key)), results);
    }

    /// BACKENDS with their BACKEND_IDS entries: a reverse entry that an id's new backend
    /// replaces goes first, then the reverse entries, then the backends; a backend counts
    /// as written when all of its writes succeeded.
    fn put_backends(
        &mut self,
        map: &MapData,
        flow_maps: Option<&FlowMaps>,
        entries: &[(u32, Backend)],
    ) {
        let Some(flow_maps) = flow_maps else {
            let results = entries
                .iter()
                .map(|_| Err(std::io::Error::other(no_flow_maps().to_string())));
            self.record(
                entries
                    .iter()
                    .map(|(id, backend)| MapOp::PutBackend(*id, *backend)),
                results.collect(),
            );
            return;
        };
        let reverse = flow_maps.backend_ids.map();
        let mut results: Vec<std::io::Result<()>> = entries.iter().map(|_| Ok(())).collect();
        let replaced: Vec<(usize, Backend)> = (entries.iter().enumerate())
            .filter_map(|(index, (id, backend))| {
                let old = self.mirror.image().backends.get(id)?;
                (old != backend).then_some((index, *old))
            })
            .collect();
        let old_keys: Vec<Backend> = replaced.iter().map(|(_, old)| *old).collect();
        for ((index, _), result) in replaced.iter().zip(delete_each(reverse, &old_keys)) {
            results[*index] = result;
        }
        let pending = |results: &[std::io::Result<()>]| -> Vec<usize> {
            (0..entries.len())
                .filter(|&index| results[index].is_ok())
                .collect()
        };
        let still = pending(&results);
        let keys: Vec<Backend> = still.iter().map(|&index| entries[index].1).collect();
        let ids: Vec<u32> = still.iter().map(|&index| entries[index].0).collect();
        for (index, result) in still.iter().zip(update_each(reverse, &keys, &ids)) {
            results[*index] = result;
        }
        let still = pending(&results);
        let ids: Vec<u32> = still.iter().map(|&index| entries[index].0).collect();
        let values: Vec<Backend> = still.iter().map(|&index| entries[index].1).collect();
        for (index, result) in still.iter().zip(update_each(map, &ids, &values)) {
            results[*index] = result;
        }
        self.record(
            entries
                .iter()
                .map(|(id, backend)| MapOp::PutBackend(*id, *backend)),
            results,
        );
    }

    /// BACKENDS entries, then their BACKEND_IDS entries.
    fn delete_backends(&mut self, map: &MapData, flow_maps: Option<&FlowMaps>, ids: &[u32]) {
        let mut results = delete_each(map, ids);
        if let Some(flow_maps) = flow_maps {
            let reverse: Vec<(usize, Backend)> = (ids.iter().enumerate())
                .filter(|(index, _)| results[*index].is_ok())
                .filter_map(|(index, id)| Some((index, *self.mirror.image().backends.get(id)?)))
                .collect();
            let keys: Vec<Backend> = reverse.iter().map(|(_, backend)| *backend).collect();
            let reverse_results = delete_each(flow_maps.backend_ids.map(), &keys);
            for ((index, _), result) in reverse.iter().zip(reverse_results) {
                results[*index] = result;
            }
        }
        self.record(ids.iter().map(|id| MapOp::DeleteBackend(*id)), results);
    }

    /// Records the outcome of each write, in order.
    fn record(&mut self, ops: impl Iterator<Item = MapOp>, results: Vec<std::io::Result<()>>) {
        for (op, result) in ops.zip(results) {
            match result {
                Ok(()) => self.applied(op),
                Err(error) if error.raw_os_error() == Some(libc::E2BIG) => {
                    self.report.map_full += 1;
                }
                Err(error) => self.report.failures.push(format!("{op:?}: {error}")),
            }
        }
    }

    /// Records one single write.
    fn single(&mut self, op: MapOp, result: Result<(), MapError>) {
        match result {
            Ok(()) => self.applied(op),
            Err(error) if is_map_full(&error) => self.report.map_full += 1,
            Err(error) => self.report.failures.push(format!("{op:?}: {error}")),
        }
    }

    fn applied(&mut self, op: MapOp) {
        self.membership_changed |=
            matches!(op, MapOp::PutMembership(..) | MapOp::DeleteMembership(_));
        self.mirror.applied(op);
    }
}

/// Writes `keys[i]` → `values[i]` as batches, each resuming after an element that failed;
/// the outcome of each element.
fn update_each<K: Pod, V: Pod>(
    map: &MapData,
    keys: &[K],
    values: &[V],
) -> Vec<std::io::Result<()>> {
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
fn delete_each<K: Pod>(map: &MapData, keys: &[K]) -> Vec<std::io::Result<()>> {
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

/// Makes BACKEND_IDS agree with BACKENDS after a re-read: removes what BACKENDS does not
/// name, and drops from the mirror every backend whose reverse entry is missing or wrong,
/// so the next apply writes it (and its reverse entry) again.
fn repair_backend_ids(flow_maps: &mut FlowMaps, image: &mut MapImage) -> Result<(), MapError> {
    let mut held = HashMap::new();
    for entry in flow_maps.backend_ids.iter() {
        let (backend, id) = entry?;
        held.insert(backend, id);
    }
    for (backend, id) in &held {
        if image.backends.get(id) != Some(backend) {
            ignore_missing(flow_maps.backend_ids.remove(backend))?;
        }
    }
    image
        .backends
        .retain(|id, backend| held.get(backend) == Some(id));
    Ok(())
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

/// A hash map that is full refuses new keys with E2BIG.
fn is_map_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(error) if error.io_error.raw_os_error() == Some(libc::E2BIG))
}
