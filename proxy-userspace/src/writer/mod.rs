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
mod sync_property;

use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError};
use proxy_common::{Backend, MembershipKey, ServiceKey, ServiceName, ServiceValue, SourceRange};

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
        let mut membership_changed = false;
        for op in ops {
            match self.write(op) {
                Ok(()) => {
                    membership_changed |=
                        matches!(op, MapOp::PutMembership(..) | MapOp::DeleteMembership(_));
                    self.mirror.applied(op);
                }
                Err(error) if is_map_full(&error) => report.map_full += 1,
                Err(error) => report.failures.push(format!("{op:?}: {error}")),
            }
        }
        // After the writes: a flow that reads the new epoch finds the new membership.
        if membership_changed && let Err(error) = self.raise_membership_epoch() {
            report
                .failures
                .push(format!("raising MEMBERSHIP_EPOCH: {error}"));
        }
        report
    }

    fn raise_membership_epoch(&mut self) -> Result<(), MapError> {
        let epoch = &mut self.flow_maps()?.membership_epoch;
        let next = epoch.get(&0, 0)?.wrapping_add(1);
        epoch.set(0, next, 0)
    }

    fn flow_maps(&mut self) -> Result<&mut FlowMaps, MapError> {
        self.flow_maps.as_mut().ok_or_else(|| {
            MapError::IoError(std::io::Error::other(
                "the writer was not given BACKEND_IDS and MEMBERSHIP_EPOCH",
            ))
        })
    }

    fn write(&mut self, op: MapOp) -> Result<(), MapError> {
        match op {
            MapOp::PutName(id, name) => self.names.insert(id, name, 0),
            MapOp::PutBackend(id, backend) => {
                let replaced = self.mirror.image().backends.get(&id).copied();
                let backend_ids = &mut self.flow_maps()?.backend_ids;
                if let Some(old) = replaced.filter(|old| *old != backend) {
                    ignore_missing(backend_ids.remove(&old))?;
                }
                backend_ids.insert(backend, id, 0)?;
                self.backends.insert(id, backend, 0)
            }
            MapOp::PutService(key, value) => self.services.insert(key, value, 0),
            MapOp::PutMembership(key, bits) => self.membership.insert(key, bits, 0),
            MapOp::DeleteService(key) => ignore_missing(self.services.remove(&key)),
            MapOp::DeleteMembership(key) => ignore_missing(self.membership.remove(&key)),
            MapOp::DeleteBackend(id) => {
                ignore_missing(self.backends.remove(&id))?;
                match self.mirror.image().backends.get(&id).copied() {
                    Some(backend) => ignore_missing(self.flow_maps()?.backend_ids.remove(&backend)),
                    None => Ok(()),
                }
            }
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
