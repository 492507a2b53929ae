//! Writer: turns the planner's desired state into map entries and writes them in an order
//! that keeps every packet consistent.
//!
//! [`image`] is pure (frontends and backends → entries, the ordered difference between two
//! images), [`delta`] follows what the maps hold so a change writes only the frontends it
//! touched, with reference-counted backends; [`MapWriter`] is the only code that writes the
//! aya maps.

mod delta;
mod image;

use aya::maps::{HashMap as BpfHashMap, LpmTrie, MapData, MapError};
use proxy_common::{AffinityMatchKey, Backend, ServiceKey, ServiceName, ServiceValue, SourceRange};

pub use delta::MapMirror;
pub use image::{IdRegistry, MapImage, MapOp, SourceRangeEntry, diff, materialize};

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
        let ops = self.mirror.full(desired);
        self.write_all(ops)
    }

    /// Writes the changed frontends only (a partial sync).
    pub fn apply_delta(&mut self, changes: &[FrontendChange]) -> ApplyReport {
        let ops = self.mirror.delta(changes);
        self.write_all(ops)
    }

    fn write_all(&mut self, ops: Vec<MapOp>) -> ApplyReport {
        let mut report = ApplyReport {
            ops: ops.len(),
            ..ApplyReport::default()
        };
        for op in ops {
            match self.write(op) {
                Ok(()) => self.mirror.applied(op),
                Err(error) if is_map_full(&error) => report.map_full += 1,
                Err(error) => report.failures.push(format!("{op:?}: {error}")),
            }
        }
        self.mirror.shrink_sparse();
        report
    }

    fn write(&mut self, op: MapOp) -> Result<(), MapError> {
        match op {
            MapOp::PutName(id, name) => self.names.insert(id, name, 0),
            MapOp::PutBackend(id, backend) => self.backends.insert(id, backend, 0),
            MapOp::PutService(key, value) => self.services.insert(key, value, 0),
            MapOp::PutAffinityMatch(key) => self.affinity_matches.insert(key, 1, 0),
            MapOp::DeleteService(key) => ignore_missing(self.services.remove(&key)),
            MapOp::DeleteAffinityMatch(key) => ignore_missing(self.affinity_matches.remove(&key)),
            MapOp::DeleteBackend(id) => ignore_missing(self.backends.remove(&id)),
            MapOp::DeleteName(id) => ignore_missing(self.names.remove(&id)),
            MapOp::PutSourceRange(entry) => self.source_ranges()?.insert(&entry.key(), 1, 0),
            MapOp::DeleteSourceRange(entry) => {
                ignore_missing(self.source_ranges()?.remove(&entry.key()))
            }
        }
    }

    fn source_ranges(&mut self) -> Result<&mut LpmTrie<MapData, SourceRange, u8>, MapError> {
        self.source_ranges.as_mut().ok_or_else(|| {
            MapError::IoError(std::io::Error::other(
                "the writer was not given the SOURCE_RANGES map",
            ))
        })
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

/// A hash map that is full refuses new keys with E2BIG.
fn is_map_full(error: &MapError) -> bool {
    matches!(error, MapError::SyscallError(error) if error.io_error.raw_os_error() == Some(libc::E2BIG))
}
