//! What the maps hold, followed write by write, so a change costs only its frontends: the
//! mirror image, the ids, and how many slots name each backend (a backend is written when
//! its first slot appears and deleted after its last one goes, as Cilium's reconciler
//! reference-counts backends).
//!
//! A delta writes the changed frontends' entries with the same [`diff`] as a full sync, run
//! over just those frontends and the backends whose count reaches or leaves zero: the same
//! never-half-written order per frontend, and for backends shared with untouched frontends
//! no write at all.

use std::collections::HashMap;

use super::image::{
    IdRegistry, MapImage, MapOp, MapWrites, diff, frontend_entries, header_key, materialize,
};
use crate::plan::{DesiredState, FrontendChange};

/// The maps' contents as last written, and the ids and backend counts that go with them.
#[derive(Clone, Debug, Default)]
pub struct MapMirror {
    current: MapImage,
    ids: IdRegistry,
    /// Backend id → how many slots name it.
    backend_refs: HashMap<u32, u32>,
}

impl MapMirror {
    /// Follows maps that hold `current` (read from the pins: ids stay stable across
    /// restarts).
    pub fn new(current: MapImage) -> Self {
        let mut mirror = MapMirror {
            ids: IdRegistry::from_image(&current),
            current,
            backend_refs: HashMap::new(),
        };
        mirror.count_backend_refs();
        mirror
    }

    /// What the maps hold, as far as the writes that succeeded tell.
    pub fn image(&self) -> &MapImage {
        &self.current
    }

    /// Forgets what was written and takes `current` as the truth (re-read from the maps),
    /// keeping the ids it knows.
    pub fn reset(&mut self, current: MapImage) {
        self.current = current;
        self.count_backend_refs();
    }

    /// The writes that make the maps hold exactly `desired` (a full sync).
    pub fn full(&mut self, desired: &DesiredState) -> MapWrites {
        let next = materialize(desired, &mut self.ids);
        diff(&self.current, &next)
    }

    /// The writes for the changed frontends only: their entries, new backends before the
    /// slots that name them, unused backends after the last slot that named them went.
    pub fn delta(&mut self, changes: &[FrontendChange]) -> MapWrites {
        let mut old = MapImage::default();
        let mut new = MapImage::default();
        for change in changes {
            old.extend(self.current.frontend_part(&change.frontend));
            match &change.new {
                Some(plan) => frontend_entries(&change.frontend, plan, &mut self.ids, &mut new),
                None => self.ids.release_frontend(header_key(&change.frontend)),
            }
        }
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
                self.ids.release_backend(backend);
            }
        }
        diff(&old, &new)
    }

    /// Records a write that succeeded.
    pub fn applied(&mut self, op: MapOp) {
        match op {
            MapOp::PutService(key, value) if key.slot != 0 => {
                if let Some(previous) = self.current.services.get(&key) {
                    release(&mut self.backend_refs, previous.backend_id);
                }
                *self.backend_refs.entry(value.backend_id).or_default() += 1;
            }
            MapOp::DeleteService(key) if key.slot != 0 => {
                if let Some(previous) = self.current.services.get(&key) {
                    release(&mut self.backend_refs, previous.backend_id);
                }
            }
            _ => {}
        }
        self.current.apply(op);
    }

    /// Gives unused buckets back after most entries went.
    pub fn shrink_sparse(&mut self) {
        crate::allocator::shrink_sparse(&mut self.backend_refs);
        self.ids.shrink_sparse();
    }

    fn count_backend_refs(&mut self) {
        self.backend_refs.clear();
        for id in self.current.slot_backends() {
            *self.backend_refs.entry(id).or_default() += 1;
        }
    }
}

fn release(refs: &mut HashMap<u32, u32>, id: u32) {
    if let Some(count) = refs.get_mut(&id) {
        *count -= 1;
        if *count == 0 {
            refs.remove(&id);
        }
    }
}
