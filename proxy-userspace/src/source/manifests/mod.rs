//! Manifests source: Services and EndpointSlices from a directory of ordinary Kubernetes
//! YAML/JSON files, so the daemon runs without an API server (`ebpf-proxy daemon
//! --manifests DIR`: demos, tests, a node outside any cluster).
//!
//! The directory is read flat: `*.yaml`, `*.yml` and `*.json` files, multi-document YAML and
//! `kind: List` allowed; dotfiles are ignored, which also keeps out the `..data` and
//! `..<timestamp>` entries of a kubelet-mounted ConfigMap while its visible `name.yaml`
//! symlinks are followed. Kinds other than `v1 Service` and `discovery.k8s.io/v1
//! EndpointSlice` are skipped.
//!
//! Changes are per file and per object: a file whose metadata and contents are unchanged is
//! never read or parsed again ([`parse`] skips a file whose contents hash the same), and a
//! changed file's objects are compared with what that file defined before, so only the
//! objects that changed reach the model. [`watch`] follows the directory (inotify, with
//! polling as the fallback) and parses changed files off the event loop.
//!
//! Bad input loses nothing: an invalid object is reported (file, object, reason) and
//! skipped while the rest load. When an object that loaded before turns invalid, or its
//! whole file stops parsing or turns empty (say, caught mid-write), its last good version
//! stays until the file is fixed or deleted. An object defined in two files keeps the first
//! file's version (by name); the other takes over when the first goes.

mod decode;
mod definitions;
mod parse;
mod watch;
mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use foldhash::HashSet;

use decode::{Decoded, ObjectId};
use definitions::Definitions;
pub use parse::ParseLimits;
use parse::{ContentHash, FileRead, read_file};
pub use watch::ManifestWatcher;

use crate::model::{Model, Problem, ProblemKind};

/// A directory of manifests: what each file defined, and which file's version of each
/// object the model holds.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    limits: ParseLimits,
    files: BTreeMap<PathBuf, FileState>,
    definitions: Definitions,
}

#[derive(Debug)]
struct FileState {
    /// Its path, shared with the definitions of its objects.
    path: Arc<Path>,
    /// Its metadata when last read; `None` when the metadata could not be read.
    stat: Option<StatIdentity>,
    /// The hash of the contents last parsed (even when they failed to parse: the same
    /// contents fail the same way).
    hash: Option<ContentHash>,
    /// The objects it defines, as last read (or kept from before).
    objects: HashSet<ObjectId>,
    /// Why it could not be used the last time it was read: the same failure is reported
    /// once, not on every look.
    failure: Option<String>,
}

impl FileState {
    fn new(path: &Path) -> Self {
        FileState {
            path: Arc::from(path),
            stat: None,
            hash: None,
            objects: HashSet::default(),
            failure: None,
        }
    }
}

/// What the metadata says of a file's contents: any write changes one of these (a write
/// within the same clock tick of the same size aside; see [`ManifestSource::scan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatIdentity {
    device: u64,
    inode: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl StatIdentity {
    fn of(metadata: &Metadata) -> Self {
        StatIdentity {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            mtime: (metadata.mtime(), metadata.mtime_nsec()),
            ctime: (metadata.ctime(), metadata.ctime_nsec()),
        }
    }
}

/// A file to read: its path, its metadata now, and the hash of its contents last parsed.
#[derive(Clone, Debug)]
pub struct FileToRead {
    pub path: PathBuf,
    stat: Option<StatIdentity>,
    previous: Option<ContentHash>,
}

/// What a look at the directory found.
#[derive(Debug, Default)]
pub struct Scan {
    pub to_read: Vec<FileToRead>,
    pub removed: Vec<PathBuf>,
}

/// Files modified this recently are read again on every look, whatever their metadata says:
/// a file's mtime moves in kernel ticks, so two same-size writes within one tick would
/// otherwise look alike. Reading costs little, and unchanged contents are not parsed again.
const RECENT_CHANGE_WINDOW: Duration = Duration::from_secs(2);

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>, limits: ParseLimits) -> Self {
        ManifestSource {
            dir: dir.into(),
            limits,
            files: BTreeMap::new(),
            definitions: Definitions::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks at the directory (names and metadata only): the files to read, and the files
    /// that are gone. `named` are files an event named: read whatever their metadata says.
    /// Err only if the directory itself can't be read (then the caller keeps the last state).
    pub fn scan(&self, named: &BTreeSet<PathBuf>) -> io::Result<Scan> {
        let listed = manifest_files(&self.dir)?;
        let mut scan = Scan::default();
        for (path, metadata) in &listed {
            let stat = metadata.as_ref().ok().map(StatIdentity::of);
            let known = self.files.get(path);
            let recent = metadata.as_ref().is_ok_and(changed_recently);
            let read = match known {
                None => true,
                Some(state) => state.stat != stat || recent || named.contains(path),
            };
            if read {
                scan.to_read.push(FileToRead {
                    path: path.clone(),
                    stat,
                    previous: known.and_then(|state| state.hash),
                });
            }
        }
        let listed: BTreeSet<&PathBuf> = listed.iter().map(|(path, _)| path).collect();
        scan.removed = (self.files.keys())
            .filter(|path| !listed.contains(path))
            .cloned()
            .collect();
        Ok(scan)
    }

    /// Reads one file (blocking: off the event loop in the daemon).
    pub fn read(limits: &ParseLimits, file: &FileToRead) -> FileReadResult {
        FileReadResult(read_file(&file.path, limits, file.previous))
    }

    pub fn limits(&self) -> &ParseLimits {
        &self.limits
    }

    /// Brings what `file` read into the model: only the objects that changed, what it
    /// no longer defines removed, every problem recorded in the model.
    pub fn apply(&mut self, file: &FileToRead, read: FileReadResult, model: &mut Model) {
        let path = &file.path;
        let state = (self.files.entry(path.clone())).or_insert_with(|| FileState::new(path));
        state.stat = file.stat;
        let shared_path = state.path.clone();
        let previous = std::mem::take(&mut state.objects);
        // An object's problem counts as its kind's, the file's own as the file's.
        let mut problem = |object: Option<(ProblemKind, String)>, reason, message: String| {
            let (kind, object) = match object {
                Some((kind, object)) => (kind, format!("{object}: ")),
                None => (ProblemKind::File, String::new()),
            };
            model.reject(Problem::new(
                kind,
                reason,
                format!("{}: {object}{message}", path.display()),
            ));
        };
        let documents = match read.0 {
            FileRead::Unchanged => {
                self.file_mut(path).objects = previous;
                return;
            }
            FileRead::Failed {
                hash,
                reason,
                message,
            } => {
                let state = self.file_mut(path);
                state.hash = hash.or(state.hash);
                let repeated = state.failure.as_ref() == Some(&message);
                state.failure = Some(message.clone());
                if repeated || (reason == "empty" && previous.is_empty()) {
                    state.objects = previous;
                    return;
                }
                let keeping = if previous.is_empty() {
                    ""
                } else {
                    "; keeping its last good objects"
                };
                problem(None, reason, format!("{message}{keeping}"));
                self.file_mut(path).objects = previous;
                return;
            }
            FileRead::Parsed { hash, documents } => {
                let state = self.file_mut(path);
                state.hash = Some(hash);
                state.failure = None;
                documents
            }
        };

        // What the file defines now: its valid objects (in file order) and the ids of the
        // invalid ones whose last good version stays. One hash lookup an object.
        let mut objects = HashSet::with_capacity_and_hasher(documents.len(), Default::default());
        let mut fresh = Vec::with_capacity(documents.len());
        let mut kept = HashSet::default();
        let mut problems = Vec::new();
        for (location, decoded) in documents {
            match decoded {
                Decoded::Skipped => {}
                Decoded::Object(id, object) => {
                    if objects.contains(&id) {
                        problems.push((
                            Some((id.kind.problem_kind(), id.to_string())),
                            "duplicate",
                            "defined twice in this file; keeping the first".to_owned(),
                        ));
                    } else {
                        objects.insert(id.clone());
                        fresh.push((id, object));
                    }
                }
                Decoded::Invalid { id, mut reason } => {
                    // Kept unless a valid version came first in this file.
                    if let Some(id) = id.as_ref().filter(|id| previous.contains(*id))
                        && (!objects.contains(id) || kept.contains(id))
                    {
                        reason.push_str("; keeping its last good version");
                        objects.insert(id.clone());
                        kept.insert(id.clone());
                    }
                    let object = match id {
                        Some(id) => (id.kind.problem_kind(), id.to_string()),
                        None => (ProblemKind::File, location.to_string()),
                    };
                    problems.push((Some(object), "invalid", reason));
                }
            }
        }
        for (object, reason, message) in problems {
            problem(object, reason, message);
        }
        for id in previous.iter().filter(|id| !objects.contains(*id)) {
            self.definitions.undefine(id, path, model);
        }
        for (id, object) in fresh {
            self.definitions.define(id, &shared_path, object, model);
        }
        self.file_mut(path).objects = objects;
    }

    /// A file that is gone: its objects go with it (or fall back to another file's).
    pub fn remove(&mut self, path: &Path, model: &mut Model) {
        let Some(state) = self.files.remove(path) else {
            return;
        };
        for id in &state.objects {
            self.definitions.undefine(id, path, model);
        }
    }

    /// Reads and applies every file that changed since the last call, one after the other
    /// (the daemon reads in parallel, off its loop: [`ManifestWatcher`]).
    pub fn load(&mut self, model: &mut Model) -> io::Result<()> {
        let scan = self.scan(&BTreeSet::new())?;
        for path in &scan.removed {
            self.remove(path, model);
        }
        for file in scan.to_read {
            let read = Self::read(&self.limits, &file);
            self.apply(&file, read, model);
        }
        Ok(())
    }

    fn file_mut(&mut self, path: &Path) -> &mut FileState {
        self.files
            .get_mut(path)
            .expect("added at the start of apply")
    }
}

/// What [`ManifestSource::read`] found, for [`ManifestSource::apply`].
#[derive(Debug)]
pub struct FileReadResult(FileRead);

/// The manifest files of `dir` in name order, each with its metadata (through symlinks).
/// Dotfiles, other extensions and directories are left out; entries whose metadata can't be
/// read (a dangling symlink) are kept so that reading them is reported.
fn manifest_files(dir: &Path) -> io::Result<Vec<(PathBuf, io::Result<Metadata>)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if !is_manifest_name(file_name) {
            continue;
        }
        let path = entry.path();
        let metadata = fs::metadata(&path);
        if metadata.as_ref().is_ok_and(|metadata| !metadata.is_file()) {
            continue;
        }
        files.push((path, metadata));
    }
    files.sort_by(|(a, _), (b, _)| a.cmp(b));
    Ok(files)
}

/// Whether a directory entry of this name is a manifest.
fn is_manifest_name(file_name: &str) -> bool {
    !file_name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|extension| file_name.ends_with(extension))
}

fn changed_recently(metadata: &Metadata) -> bool {
    metadata
        .modified()
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_none_or(|age| age < RECENT_CHANGE_WINDOW)
}

#[cfg(test)]
mod tests;
