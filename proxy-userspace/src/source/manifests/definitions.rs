//! Which file's version of each object the model holds. An object defined in two files
//! keeps the first file's version (by name) and the other is reported; the other takes
//! over when the first goes, or when a file earlier in name order defines it, the
//! earlier one does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::decode::{Kind, ManifestObject, ObjectId};
use crate::model::{Model, Problem, ProblemKind};

/// The files that define each object, and the versions the model does not hold.
#[derive(Debug, Default)]
pub(super) struct Definitions {
    /// The files that define each object, in name order (almost always one): the first
    /// one's version is in the model. The paths are shared with the files' own state.
    files: BTreeMap<ObjectId, Vec<Arc<Path>>>,
    /// The versions of files that define an object another file defined first.
    shadowed: BTreeMap<(ObjectId, Arc<Path>), ManifestObject>,
}

impl Definitions {
    /// `path` defines `id` as `object`: the model gets it if `path` is the first file to
    /// define it.
    pub fn define(
        &mut self,
        id: ObjectId,
        path: &Arc<Path>,
        object: ManifestObject,
        model: &mut Model,
    ) {
        // Almost every object is defined by one file: room for one, not the four a first
        // push reserves.
        let files = (self.files.entry(id.clone())).or_insert_with(|| Vec::with_capacity(1));
        let owner_before = files.first().cloned();
        if let Err(position) = files.binary_search(path) {
            files.insert(position, path.clone());
        }
        let owner = files[0].clone();
        if owner != *path {
            report_duplicate(model, path, &id, &owner);
            self.shadowed.insert((id, path.clone()), object);
            return;
        }
        // A file earlier in name order takes the object over from the one that had it.
        if let Some(before) = owner_before.filter(|before| before != path)
            && let Some(theirs) = model_object(model, &id)
        {
            report_duplicate(model, &before, &id, path);
            self.shadowed.insert((id.clone(), before), theirs);
        }
        put(model, &id, object);
    }

    /// `path` no longer defines `id`: the next file's version takes its place, if any.
    pub fn undefine(&mut self, id: &ObjectId, path: &Path, model: &mut Model) {
        let Some(files) = self.files.get_mut(id) else {
            return;
        };
        let was_owner = files.first().is_some_and(|owner| **owner == *path);
        files.retain(|file| **file != *path);
        let next = files.first().cloned();
        if files.is_empty() {
            self.files.remove(id);
        }
        if !was_owner {
            self.shadowed
                .retain(|(shadowed, file), _| shadowed != id || **file != *path);
            return;
        }
        match next.and_then(|next| self.shadowed.remove(&(id.clone(), next))) {
            Some(object) => put(model, id, object),
            None => match id.kind {
                Kind::Service => {
                    model.remove_service(&id.key);
                }
                Kind::EndpointSlice => {
                    model.remove_endpoint_slice(&id.key);
                }
            },
        }
    }
}

fn report_duplicate(model: &mut Model, path: &Path, id: &ObjectId, kept: &Path) {
    model.reject(Problem::new(
        ProblemKind::File,
        "duplicate",
        format!(
            "{}: {id}: also defined in {}; keeping that one",
            path.display(),
            kept.display()
        ),
    ));
}

fn put(model: &mut Model, id: &ObjectId, object: ManifestObject) {
    match object {
        ManifestObject::Service(record) => {
            model.upsert_service(id.key.clone(), record);
        }
        ManifestObject::EndpointSlice(record, trigger_time) => {
            model.upsert_endpoint_slice(id.key.clone(), record, trigger_time);
        }
    }
}

/// The model's version of an object, as a manifest object.
fn model_object(model: &Model, id: &ObjectId) -> Option<ManifestObject> {
    match id.kind {
        Kind::Service => model.service(&id.key).cloned().map(ManifestObject::Service),
        Kind::EndpointSlice => (model.endpoint_slice(&id.key).cloned())
            .map(|record| ManifestObject::EndpointSlice(record, None)),
    }
}
