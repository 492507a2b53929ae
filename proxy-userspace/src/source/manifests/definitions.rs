//! Which file's version of each object the model holds. An object defined in two files
//! keeps the first file's version (by name) and the other is reported; the other takes
//! over when the first goes, or when a file earlier in name order defines it, the
//! earlier one does.

use std::collections::BTreeMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::sync::Arc;

use foldhash::HashMap;

use super::decode::{Kind, ManifestObject, ObjectId};
use crate::model::{Model, Problem, ProblemKind};

/// The files that define each object, and the versions the model does not hold.
#[derive(Debug, Default)]
pub(super) struct Definitions {
    /// The files that define each object (almost always one): the first one's version is
    /// in the model. The paths are shared with the files' own state.
    files: HashMap<ObjectId, Definers>,
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
        let (owner_before, owner) = match self.files.entry(id.clone()) {
            Entry::Vacant(vacant) => {
                vacant.insert(Definers::One(path.clone()));
                (None, path.clone())
            }
            Entry::Occupied(mut occupied) => {
                let definers = occupied.get_mut();
                let before = definers.first().clone();
                definers.add(path);
                (Some(before), definers.first().clone())
            }
        };
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
        let Entry::Occupied(mut definers) = self.files.entry(id.clone()) else {
            return;
        };
        let was_owner = **definers.get().first() == *path;
        let next = match definers.get_mut().remove(path) {
            Some(next) => Some(next.clone()),
            None => {
                definers.remove();
                None
            }
        };
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

/// The files that define an object, in name order: almost always one, kept inline.
#[derive(Debug)]
enum Definers {
    One(Arc<Path>),
    /// Two or more.
    Many(Vec<Arc<Path>>),
}

impl Definers {
    /// The file whose version is in the model.
    fn first(&self) -> &Arc<Path> {
        match self {
            Definers::One(path) => path,
            Definers::Many(paths) => &paths[0],
        }
    }

    fn add(&mut self, path: &Arc<Path>) {
        match self {
            Definers::One(only) if only == path => {}
            Definers::One(only) => {
                let mut paths = vec![only.clone(), path.clone()];
                paths.sort();
                *self = Definers::Many(paths);
            }
            Definers::Many(paths) => {
                if let Err(position) = paths.binary_search(path) {
                    paths.insert(position, path.clone());
                }
            }
        }
    }

    /// Takes `path` out; the first file left, `None` when none is.
    fn remove(&mut self, path: &Path) -> Option<&Arc<Path>> {
        match self {
            Definers::One(only) if **only == *path => return None,
            Definers::One(_) => {}
            Definers::Many(paths) => {
                paths.retain(|file| **file != *path);
                if let [only] = paths.as_slice() {
                    *self = Definers::One(only.clone());
                }
            }
        }
        Some(self.first())
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
