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

use aya::Pod;
use aya::maps::{HashMap as BpfHashMap, IterableMap, LpmTrie, MapData, MapError};
use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceName, ServiceValue, SourceRange};

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

/// Owns the SERVICES, BACKENDS, AFFINITY_MATCH and SVC_NAMES maps and a mirror of their
/// contents.
pub struct MapWriter {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, u32, Backend>,
    /// Presence is what counts; the value is always 1.
    affinity_matches: BpfHashMap<MapData, AffinityMatchKey, u8>,
    names: BpfHashMap<MapData, u32, ServiceName>,
    /// Optional, so callers that never restrict sources (the benchmarks) need not open it;
    /// without it, a plan with source ranges reports failed writes.
    source_ranges: Option<LpmTrie<MapData, SourceRange, u8>>,
    mirror: MapMirror,
}

impl MapWriter {
    /// Takes the maps and learns what they already hold (they may be pinned from a
    /// previous run of the daemon).
    pub fn new(
        services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
        backends: BpfHashMap<MapData, u32, Backend>,
        affinity_matches: BpfHashMap<MapData, AffinityMatchKey, u8>,
        names: BpfHashMap<MapData, u32, ServiceName>,
    ) -> Result<Self, MapError> {
        let mut writer = Self {
            services,
            backends,
            affinity_matches,
            names,
            source_ranges: None,
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

    /// Reads the maps again, so the next [`apply`](Self::apply) repairs anything that was
    /// changed behind our back.
    pub fn reread(&mut self) -> Result<(), MapError> {
        let image = self.read()?;
        self.mirror.reset(image);
        Ok(())
    }

    fn read(&self) -> Result<MapImage, MapError> {
        let mut image = MapImage::default();
        for entry in self.services.iter() {
            let (key, value) = entry?;
            image.services.insert(key, value);
        }
        for entry in self.backends.iter() {
            let (id, backend) = entry?;
            image.backends.insert(id, backend);
        }
        for key in self.affinity_matches.keys() {
            image.affinity_matches.insert(key?);
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

    /// Writes phase by phase, each phase of a hash map as one batch (the kernel applies a
    /// batch's elements in order, as single writes would be); SOURCE_RANGES, an LPM trie
    /// of a few entries per restricted frontend, one entry at a time.
    fn write_all(&mut self, writes: MapWrites) -> ApplyReport {
        let mut report = ApplyReport {
            ops: writes.len(),
            ..ApplyReport::default()
        };
        let mut phase = Phase {
            mirror: &mut self.mirror,
            report: &mut report,
        };
        phase.put(self.names.map(), &writes.put_names, |(id, name)| {
            MapOp::PutName(id, name)
        });
        phase.put(
            self.backends.map(),
            &writes.put_backends,
            |(id, backend)| MapOp::PutBackend(id, backend),
        );
        phase.put(self.services.map(), &writes.put_slots, |(key, value)| {
            MapOp::PutService(key, value)
        });
        let matches: Vec<(AffinityMatchKey, u8)> = (writes.put_affinity_matches.iter())
            .map(|key| (*key, 1))
            .collect();
        phase.put(self.affinity_matches.map(), &matches, |(key, _)| {
            MapOp::PutAffinityMatch(key)
        });
        for entry in &writes.put_source_ranges {
            let written = match self.source_ranges.as_mut() {
                Some(ranges) => ranges.insert(&entry.key(), 1, 0),
                None => Err(no_source_ranges()),
            };
            phase.single(MapOp::PutSourceRange(*entry), written);
        }
        phase.put(self.services.map(), &writes.put_headers, |(key, value)| {
            MapOp::PutService(key, value)
        });
        phase.delete(
            self.services.map(),
            &writes.delete_headers,
            MapOp::DeleteService,
        );
        phase.delete(
            self.services.map(),
            &writes.delete_slots,
            MapOp::DeleteService,
        );
        phase.delete(
            self.affinity_matches.map(),
            &writes.delete_affinity_matches,
            MapOp::DeleteAffinityMatch,
        );
        for entry in &writes.delete_source_ranges {
            let removed = match self.source_ranges.as_mut() {
                Some(ranges) => ignore_missing(ranges.remove(&entry.key())),
                None => Err(no_source_ranges()),
            };
            phase.single(MapOp::DeleteSourceRange(*entry), removed);
        }
        phase.delete(
            self.backends.map(),
            &writes.delete_backends,
            MapOp::DeleteBackend,
        );
        phase.delete(self.names.map(), &writes.delete_names, MapOp::DeleteName);
        self.mirror.shrink_sparse();
        report
    }
}

/// Applies phases and records the outcome of each write: those that succeeded in the
/// mirror, the others in the report (retried by the next, full, sync).
struct Phase<'w> {
    mirror: &'w mut MapMirror,
    report: &'w mut ApplyReport,
}

impl Phase<'_> {
    /// Writes `entries` as batches: when one fails, what came before it counts as written,
    /// it is reported, and the rest goes on in another batch.
    fn put<K: Pod, V: Pod>(
        &mut self,
        map: &MapData,
        entries: &[(K, V)],
        op: impl Fn((K, V)) -> MapOp,
    ) {
        let (keys, values): (Vec<K>, Vec<V>) = entries.iter().copied().unzip();
        let mut start = 0;
        while start < keys.len() {
            let outcome = bpf_batch::update(map, &keys[start..], &values[start..]);
            start = self.record(&entries[start..], outcome, start, &op, false);
        }
    }

    /// Deletes `keys` as batches; one that is gone already counts as deleted.
    fn delete<K: Pod>(&mut self, map: &MapData, keys: &[K], op: impl Fn(K) -> MapOp) {
        let mut start = 0;
        while start < keys.len() {
            let outcome = bpf_batch::delete(map, &keys[start..]);
            start = self.record(&keys[start..], outcome, start, &op, true);
        }
    }

    /// Records a batch of `elements` (from index `start` of its phase); returns where the
    /// phase goes on.
    fn record<E: Copy>(
        &mut self,
        elements: &[E],
        outcome: Result<(), bpf_batch::Stopped>,
        start: usize,
        op: impl Fn(E) -> MapOp,
        deleting: bool,
    ) -> usize {
        let (applied, error) = match outcome {
            Ok(()) => (elements.len(), None),
            Err(stopped) => (stopped.applied, Some(stopped.error)),
        };
        for element in &elements[..applied] {
            self.mirror.applied(op(*element));
        }
        let Some(error) = error else {
            return start + applied;
        };
        let failed = op(elements[applied]);
        let gone = deleting && error.raw_os_error() == Some(libc::ENOENT);
        if gone {
            self.mirror.applied(failed);
        } else if error.raw_os_error() == Some(libc::E2BIG) {
            self.report.map_full += 1;
        } else {
            self.report.failures.push(format!("{failed:?}: {error}"));
        }
        start + applied + 1
    }

    /// Records one single write.
    fn single(&mut self, op: MapOp, result: Result<(), MapError>) {
        match result {
            Ok(()) => self.mirror.applied(op),
            Err(error) if is_map_full(&error) => self.report.map_full += 1,
            Err(error) => self.report.failures.push(format!("{op:?}: {error}")),
        }
    }
}

fn no_source_ranges() -> MapError {
    MapError::IoError(std::io::Error::other(
        "the writer was not given the SOURCE_RANGES map",
    ))
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
