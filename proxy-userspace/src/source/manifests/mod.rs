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

mod parse;
mod validate;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use parse::ParseLimits;
use parse::{ContentHash, Decoded, FileRead, Kind, ManifestObject, ObjectId, read_file};
pub use watch::ManifestWatcher;

use crate::model::{Model, Problem, ProblemKind};

/// A directory of manifests: what each file defined, and which file's version of each
/// object the model holds.
#[derive(Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    limits: ParseLimits,
    files: BTreeMap<PathBuf, FileState>,
    /// The files that define each object, in name order: the first one's version is in the
    /// model.
    definitions: BTreeMap<ObjectId, BTreeSet<PathBuf>>,
    /// The versions of files that define an object another file defined first.
    shadowed: BTreeMap<(ObjectId, PathBuf), ManifestObject>,
}

#[derive(Debug, Default)]
struct FileState {
    /// Its metadata when last read; `None` when the metadata could not be read.
    stat: Option<StatIdentity>,
    /// The hash of the contents last parsed (even when they failed to parse: the same
    /// contents fail the same way).
    hash: Option<ContentHash>,
    /// The objects it defines, as last read (or kept from before).
    objects: BTreeSet<ObjectId>,
    /// Why it could not be used the last time it was read: the same failure is reported
    /// once, not on every look.
    failure: Option<String>,
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
            definitions: BTreeMap::new(),
            shadowed: BTreeMap::new(),
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
        let state = self.files.entry(path.clone()).or_default();
        state.stat = file.stat;
        let previous = std::mem::take(&mut state.objects);
        let mut problem = |object: Option<String>, reason: &'static str, message: String| {
            let object = object
                .map(|object| format!("{object}: "))
                .unwrap_or_default();
            let kind = ProblemKind::File;
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
                let state = self.files.get_mut(path).expect("just added");
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

        let mut fresh: BTreeMap<ObjectId, ManifestObject> = BTreeMap::new();
        let mut kept = BTreeSet::new();
        let mut problems = Vec::new();
        for (location, decoded) in documents {
            match decoded {
                Decoded::Skipped => {}
                Decoded::Object(id, _) if fresh.contains_key(&id) || kept.contains(&id) => {
                    problems.push((
                        Some(id.to_string()),
                        "duplicate",
                        "defined twice in this file; keeping the first".to_owned(),
                    ));
                }
                Decoded::Object(id, object) => {
                    fresh.insert(id, object);
                }
                Decoded::Invalid { id, mut reason } => {
                    if let Some(id) = id.as_ref().filter(|id| previous.contains(id))
                        && !fresh.contains_key(id)
                    {
                        reason.push_str("; keeping its last good version");
                        kept.insert(id.clone());
                    }
                    let object = id.map_or(location, |id| id.to_string());
                    problems.push((Some(object), "invalid", reason));
                }
            }
        }
        for (object, reason, message) in problems {
            problem(object, reason, message);
        }
        for id in previous
            .iter()
            .filter(|id| !fresh.contains_key(id) && !kept.contains(id))
        {
            self.undefine(id, path, model);
        }
        let mut objects = kept;
        for (id, object) in fresh {
            objects.insert(id.clone());
            self.define(id, path, object, model);
        }
        self.file_mut(path).objects = objects;
    }

    /// A file that is gone: its objects go with it (or fall back to another file's).
    pub fn remove(&mut self, path: &Path, model: &mut Model) {
        let Some(state) = self.files.remove(path) else {
            return;
        };
        for id in &state.objects {
            self.undefine(id, path, model);
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
        self.files.entry(path.to_owned()).or_default()
    }

    /// `path` defines `id` as `object`: the model gets it if `path` is the first file to
    /// define it.
    fn define(&mut self, id: ObjectId, path: &Path, object: ManifestObject, model: &mut Model) {
        let files = self.definitions.entry(id.clone()).or_default();
        let owner_before = files.first().cloned();
        files.insert(path.to_owned());
        let owner = files.first().expect("just inserted").clone();
        if owner != path {
            model.reject(Problem::new(
                ProblemKind::File,
                "duplicate",
                format!(
                    "{}: {id}: also defined in {}; keeping that one",
                    path.display(),
                    owner.display()
                ),
            ));
            self.shadowed.insert((id, path.to_owned()), object);
            return;
        }
        // A file earlier in name order takes the object over from the one that had it.
        if let Some(before) = owner_before.filter(|before| before != path)
            && let Some(theirs) = model_object(model, &id)
        {
            model.reject(Problem::new(
                ProblemKind::File,
                "duplicate",
                format!(
                    "{}: {id}: also defined in {}; keeping that one",
                    before.display(),
                    path.display()
                ),
            ));
            self.shadowed.insert((id.clone(), before), theirs);
        }
        put(model, &id, object);
    }

    /// `path` no longer defines `id`: the next file's version takes its place, if any.
    fn undefine(&mut self, id: &ObjectId, path: &Path, model: &mut Model) {
        let Some(files) = self.definitions.get_mut(id) else {
            return;
        };
        let was_owner = files.first().is_some_and(|owner| owner == path);
        files.remove(path);
        let next = files.first().cloned();
        if files.is_empty() {
            self.definitions.remove(id);
        }
        if !was_owner {
            self.shadowed.remove(&(id.clone(), path.to_owned()));
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

/// What [`ManifestSource::read`] found, for [`ManifestSource::apply`].
#[derive(Debug)]
pub struct FileReadResult(FileRead);

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
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::model::{ObjectKey, ServiceRecord};

    /// A fresh directory under the system temp dir, removed on drop (also on panic).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "ebpf-proxy-manifests-{test}-{}-{unique}",
                std::process::id()
            ));
            fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn service_yaml(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: web\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: http\n    port: 80\n"
        )
    }

    fn slice_yaml(name: &str, service: &str, addr: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
             namespace: web\n  labels:\n    kubernetes.io/service-name: {service}\n\
             addressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n\
             - addresses: [\"{addr}\"]\n"
        )
    }

    fn service_names(model: &Model) -> Vec<String> {
        model.services().map(|(key, _)| key.to_string()).collect()
    }

    /// A reload as the daemon does one: the changed files read and applied, then what the
    /// model holds and the problems, as `file name: object: reason`.
    struct Reload {
        model: Model,
        problems: Vec<String>,
    }

    fn reload_into(source: &mut ManifestSource, model: &mut Model) -> Reload {
        source.load(model).unwrap();
        let dir = format!("{}/", source.dir().display());
        let problems = model
            .take_changes()
            .rejected
            .iter()
            .map(|problem| problem.message.replace(&dir, ""))
            .collect();
        Reload {
            model: model.clone(),
            problems,
        }
    }

    /// A fresh source over `dir`, loaded once.
    fn load(dir: &TempDir) -> Reload {
        reload_into(&mut source(dir), &mut Model::default())
    }

    fn source(dir: &TempDir) -> ManifestSource {
        ManifestSource::new(&dir.0, ParseLimits::default())
    }

    fn slice_names(model: &Model) -> Vec<String> {
        model
            .endpoint_slices()
            .map(|(key, _)| key.to_string())
            .collect()
    }

    fn cluster_ip(model: &Model, key: &str) -> String {
        let (namespace, name) = key.split_once('/').unwrap();
        match model.service(&ObjectKey::new(namespace, name)).unwrap() {
            ServiceRecord::Proxied(service) => service.cluster_ip.to_string(),
            other => panic!("{key} is not proxied: {other:?}"),
        }
    }

    fn problem_lines(reload: &Reload) -> Vec<String> {
        reload.problems.clone()
    }

    #[test]
    fn loads_multi_document_yaml_json_and_lists() {
        let dir = TempDir::new("multi");
        dir.write(
            "web.yaml",
            &format!(
                "# the web tier\n---\n{}---\n{}---\napiVersion: v1\nkind: ConfigMap\n\
                 metadata:\n  name: settings\n---\n",
                service_yaml("front", "198.19.0.10"),
                slice_yaml("front-1", "front", "198.18.1.1"),
            ),
        );
        dir.write(
            "api.json",
            r#"{"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "api"},
                "spec": {"clusterIP": "198.19.0.11", "ports": [{"port": 80}]}}"#,
        );
        dir.write(
            "list.yml",
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  \
             metadata: {name: listed, namespace: web}\n  spec: {clusterIP: 198.19.0.12}\n",
        );
        dir.write(".hidden.yaml", &service_yaml("hidden", "198.19.0.99"));
        dir.write("notes.txt", &service_yaml("notes", "198.19.0.98"));

        let reload = load(&dir);
        assert_eq!(problem_lines(&reload), Vec::<String>::new());
        assert_eq!(
            service_names(&reload.model),
            ["default/api", "web/front", "web/listed"]
        );
        assert_eq!(slice_names(&reload.model), ["web/front-1"]);
        assert_eq!(cluster_ip(&reload.model, "default/api"), "198.19.0.11");
        let front_slices = reload
            .model
            .endpoint_slices_of(&ObjectKey::new("web", "front"));
        assert_eq!(front_slices.count(), 1);
    }

    /// What `kubectl get svc,endpointslices -o yaml` prints, server-set fields and all.
    #[test]
    fn kubectl_get_output_loads() {
        let dir = TempDir::new("kubectl");
        dir.write(
            "dump.yaml",
            r#"apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: v1
  kind: Service
  metadata:
    creationTimestamp: "2026-01-01T00:00:00Z"
    labels: {app: web}
    name: web
    namespace: shop
    resourceVersion: "1234"
    uid: 0b0c5a8e-0000-4000-8000-000000000001
  spec:
    clusterIP: 198.19.0.10
    clusterIPs: [198.19.0.10]
    externalTrafficPolicy: Cluster
    internalTrafficPolicy: Cluster
    ipFamilies: [IPv4]
    ipFamilyPolicy: SingleStack
    ports:
    - {name: http, nodePort: 30080, port: 80, protocol: TCP, targetPort: http}
    selector: {app: web}
    sessionAffinity: None
    type: NodePort
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses: [198.18.1.1]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
    targetRef: {kind: Pod, name: web-5d8f, namespace: shop, uid: 0b0c5a8e-0000-4000-8000-000000000002}
  kind: EndpointSlice
  metadata:
    generateName: web-
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: web
    name: web-x7k2p
    namespace: shop
    ownerReferences:
    - {apiVersion: v1, blockOwnerDeletion: true, controller: true, kind: Service, name: web, uid: 0b0c5a8e-0000-4000-8000-000000000001}
  ports:
  - {name: http, port: 8080, protocol: TCP}
"#,
        );
        let reload = load(&dir);
        assert_eq!(problem_lines(&reload), Vec::<String>::new());
        assert_eq!(service_names(&reload.model), ["shop/web"]);
        assert_eq!(slice_names(&reload.model), ["shop/web-x7k2p"]);
    }

    #[test]
    fn invalid_objects_are_reported_and_skipped_while_others_load() {
        let dir = TempDir::new("invalid");
        let documents = [
            service_yaml("good", "198.19.0.10"),
            "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: web\nspec: {}\n".to_owned(),
            service_yaml("bad-ip", "198.19.0.300"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: no-port, namespace: web}\n\
             spec:\n  ports:\n  - name: http\n"
                .to_owned(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad-protocol, namespace: web}\n\
             spec:\n  ports:\n  - {port: 80, protocol: HTTP}\n"
                .to_owned(),
            service_yaml("wrong-version", "198.19.0.13")
                .replace("apiVersion: v1", "apiVersion: v2"),
            service_yaml("text-port", "198.19.0.14").replace("port: 80", "port: http"),
            slice_yaml("orphan", "x", "198.18.1.1")
                .replace("  labels:\n    kubernetes.io/service-name: x\n", ""),
            slice_yaml("v6-in-v4", "good", "fd00::1"),
            "just a string\n".to_owned(),
            service_yaml("sticky-forever", "198.19.0.15").replace(
                "spec:\n",
                "spec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: \
                 {clientIP: {timeoutSeconds: 0}}\n",
            ),
        ];
        dir.write("all.yaml", &documents.join("---\n"));

        let reload = load(&dir);
        assert_eq!(service_names(&reload.model), ["web/good"]);
        assert_eq!(slice_names(&reload.model), Vec::<String>::new());
        assert_eq!(
            problem_lines(&reload),
            [
                "all.yaml: document 2: Service has no metadata.name",
                "all.yaml: Service web/bad-ip: spec.clusterIP \"198.19.0.300\" is not an IP address",
                "all.yaml: Service web/no-port: spec.ports[0].port is missing",
                "all.yaml: Service web/bad-protocol: spec.ports[0].protocol \"HTTP\" is invalid; \
                 expected one of TCP, UDP, SCTP",
                "all.yaml: Service web/wrong-version: apiVersion v2 is wrong for Service; expected v1",
                "all.yaml: Service web/text-port: spec.ports[0].port: invalid type: string \"http\", \
                 expected i32",
                "all.yaml: EndpointSlice web/orphan: label kubernetes.io/service-name is missing \
                 (it names the slice's Service)",
                "all.yaml: EndpointSlice web/v6-in-v4: endpoints[0].addresses: \"fd00::1\" is not \
                 an IPv4 address",
                "all.yaml: document 10: not a Kubernetes object: kind is missing",
                "all.yaml: Service web/sticky-forever: spec.sessionAffinityConfig.clientIP.\
                 timeoutSeconds 0 is out of range (1-86400)",
            ]
        );
    }

    #[test]
    fn object_that_becomes_invalid_keeps_its_last_good_version() {
        let dir = TempDir::new("last-good");
        let file = dir.write(
            "web.yaml",
            &format!(
                "{}---\n{}",
                service_yaml("front", "198.19.0.10"),
                service_yaml("back", "198.19.0.20")
            ),
        );
        let mut source = source(&dir);
        let mut model = Model::default();
        assert!(reload_into(&mut source, &mut model).problems.is_empty());

        // front turns invalid, back changes validly: front keeps its last good version.
        fs::write(
            &file,
            format!(
                "{}---\n{}",
                service_yaml("front", "not-an-ip"),
                service_yaml("back", "198.19.0.21")
            ),
        )
        .unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(service_names(&reload.model), ["web/back", "web/front"]);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.10");
        assert_eq!(cluster_ip(&reload.model, "web/back"), "198.19.0.21");
        assert_eq!(
            problem_lines(&reload),
            [
                "web.yaml: Service web/front: spec.clusterIP \"not-an-ip\" is not an IP address; \
                 keeping its last good version"
            ]
        );

        // Still invalid on the next reload: still kept.
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.10");

        // The whole file caught mid-write: everything it had stays.
        fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: fr").unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(service_names(&reload.model), ["web/back", "web/front"]);
        assert_eq!(reload.problems.len(), 1);
        let reason = &reload.problems[0];
        assert!(reason.starts_with("web.yaml: invalid YAML: "), "{reason}");
        assert!(
            reason.ends_with("; keeping its last good objects"),
            "{reason}"
        );

        // Truncated, not yet rewritten: kept too.
        fs::write(&file, "").unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(service_names(&reload.model), ["web/back", "web/front"]);
        assert_eq!(
            problem_lines(&reload),
            ["web.yaml: is empty; keeping its last good objects"]
        );

        // Fixed: the new version replaces it.
        fs::write(&file, service_yaml("front", "198.19.0.30")).unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert!(reload.problems.is_empty());
        assert_eq!(service_names(&reload.model), ["web/front"]);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.30");
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let dir = TempDir::new("deleted");
        dir.write("front.yaml", &service_yaml("front", "198.19.0.10"));
        let back = dir.write("back.yaml", &service_yaml("back", "198.19.0.20"));
        let mut source = source(&dir);
        let mut model = Model::default();
        assert_eq!(
            service_names(&reload_into(&mut source, &mut model).model),
            ["web/back", "web/front"]
        );

        fs::remove_file(back).unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(service_names(&reload.model), ["web/front"]);
        assert!(reload.problems.is_empty());
    }

    #[test]
    fn object_defined_in_two_files_keeps_the_first() {
        let dir = TempDir::new("duplicate");
        dir.write("a.yaml", &service_yaml("front", "198.19.0.10"));
        dir.write("b.yaml", &service_yaml("front", "198.19.0.20"));
        let reload = load(&dir);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.10");
        let lines = problem_lines(&reload);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("b.yaml: Service web/front: also defined in "),
            "{lines:?}"
        );
    }

    #[test]
    fn kubelet_configmap_layout_is_read_once_through_its_symlinks() {
        let dir = TempDir::new("configmap");
        let data = dir.0.join("..2026_01_01_00_00_00.000000001");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("web.yaml"), service_yaml("front", "198.19.0.10")).unwrap();
        std::os::unix::fs::symlink(data.file_name().unwrap(), dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", dir.0.join("web.yaml")).unwrap();

        let reload = load(&dir);
        assert!(reload.problems.is_empty(), "{:?}", reload.problems);
        assert_eq!(service_names(&reload.model), ["web/front"]);
    }

    /// Sets a file's modification time back, as if it was written long ago.
    fn age(path: &Path) {
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
    }

    #[test]
    fn unchanged_files_are_not_parsed_again_and_the_detector_never_flips() {
        let dir = TempDir::new("unchanged");
        let web = dir.write("web.yaml", &service_yaml("front", "198.19.0.10"));
        let mut source = source(&dir);
        let mut model = Model::default();
        reload_into(&mut source, &mut model);
        let revision = model.revision();

        // Just written: read again (a same-size write within one tick would not show in the
        // metadata), but its contents are the same, so it is not parsed.
        let scan = source.scan(&BTreeSet::new()).unwrap();
        assert_eq!(scan.to_read.len(), 1);
        let read = ManifestSource::read(source.limits(), &scan.to_read[0]);
        assert!(matches!(read.0, FileRead::Unchanged), "{read:?}");
        source.apply(&scan.to_read[0], read, &mut model);
        assert_eq!(model.revision(), revision, "nothing changed");

        // Old, and looked at once more since: never read again, however often one looks.
        age(&web);
        reload_into(&mut source, &mut model);
        for _ in 0..3 {
            assert!(source.scan(&BTreeSet::new()).unwrap().to_read.is_empty());
        }
        assert_eq!(model.revision(), revision);

        // An event naming it gets it read; still the same contents.
        let named = BTreeSet::from([web.clone()]);
        assert_eq!(source.scan(&named).unwrap().to_read.len(), 1);

        // A real edit is read and applied.
        fs::write(&web, service_yaml("front", "198.19.0.11")).unwrap();
        let reload = reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.11");
    }

    #[test]
    fn only_the_objects_that_changed_reach_the_model() {
        let dir = TempDir::new("per-object");
        dir.write(
            "web.yaml",
            &format!(
                "{}---\n{}---\n{}",
                service_yaml("front", "198.19.0.10"),
                service_yaml("back", "198.19.0.20"),
                slice_yaml("front-1", "front", "198.18.1.1"),
            ),
        );
        dir.write("api.yaml", &service_yaml("api", "198.19.0.30"));
        let mut source = source(&dir);
        let mut model = Model::default();
        reload_into(&mut source, &mut model);

        // One endpoint of one slice changes; the file's other objects are parsed again but
        // equal, and the other file is not read at all.
        dir.write(
            "web.yaml",
            &format!(
                "{}---\n{}---\n{}",
                service_yaml("front", "198.19.0.10"),
                service_yaml("back", "198.19.0.20"),
                slice_yaml("front-1", "front", "198.18.1.2"),
            ),
        );
        source.load(&mut model).unwrap();
        let changes = model.take_changes();
        let dirty: Vec<String> = changes
            .dirty_services
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(dirty, ["web/front"]);
        assert_eq!((changes.services, changes.endpoint_slices), (0, 1));

        // An object that leaves its file leaves the model; the rest stays untouched.
        dir.write("web.yaml", &service_yaml("front", "198.19.0.10"));
        source.load(&mut model).unwrap();
        let changes = model.take_changes();
        let dirty: Vec<String> = changes
            .dirty_services
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(dirty, ["web/back", "web/front"]);
        assert_eq!(service_names(&model), ["web/api", "web/front"]);
    }

    #[test]
    fn the_second_definition_takes_over_when_the_first_goes() {
        let dir = TempDir::new("takeover");
        let first = dir.write("a.yaml", &service_yaml("front", "198.19.0.10"));
        dir.write("b.yaml", &service_yaml("front", "198.19.0.20"));
        let mut source = source(&dir);
        let mut model = Model::default();
        reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&model, "web/front"), "198.19.0.10");

        fs::remove_file(&first).unwrap();
        let loaded = reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&loaded.model, "web/front"), "198.19.0.20");

        // A file earlier in name order defines it again: it wins again.
        dir.write("0.yaml", &service_yaml("front", "198.19.0.30"));
        let loaded = reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&loaded.model, "web/front"), "198.19.0.30");
        assert_eq!(loaded.problems.len(), 1, "{:?}", loaded.problems);
        fs::remove_file(dir.0.join("0.yaml")).unwrap();
        let loaded = reload_into(&mut source, &mut model);
        assert_eq!(cluster_ip(&loaded.model, "web/front"), "198.19.0.20");
    }

    #[test]
    fn hostile_files_are_refused_cheaply_and_the_last_good_objects_stay() {
        let dir = TempDir::new("hostile");
        let file = dir.write("web.yaml", &service_yaml("front", "198.19.0.10"));
        let limits = ParseLimits {
            max_file_bytes: 256 * 1024,
            ..ParseLimits::default()
        };
        let mut source = ManifestSource::new(&dir.0, limits);
        let mut model = Model::default();
        reload_into(&mut source, &mut model);

        let deep_flow = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: front, namespace: web}}\nspec: {}{}\n",
            "[".repeat(60_000),
            "]".repeat(60_000)
        );
        let mut deep_block =
            String::from("apiVersion: v1\nkind: Service\nmetadata: {name: front}\nspec:\n");
        for level in 1..100 {
            deep_block.push_str(&format!("{}a{level}:\n", " ".repeat(level)));
        }
        let anchor: Vec<String> = (0..1000).map(|i| format!("x{i}")).collect();
        let bomb = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: front, namespace: web, \
             annotations: {{a: &a [{}]}}}}\nspec: {{externalIPs: [{}]}}\n",
            anchor.join(", "),
            vec!["*a"; 1000].join(", ")
        );
        let too_large = format!("# {}\n", "x".repeat(300 * 1024));
        for (name, text, reason) in [
            ("deep flow", deep_flow, "too_deep"),
            ("deep block", deep_block, "too_deep"),
            ("alias bomb", bomb, "alias_expansion"),
            ("too large", too_large, "too_large"),
        ] {
            fs::write(&file, text).unwrap();
            source.load(&mut model).unwrap();
            let changes = model.take_changes();
            let problems: Vec<(&str, &str)> = changes
                .rejected
                .iter()
                .map(|problem| (problem.reason, problem.message.as_str()))
                .collect();
            assert_eq!(problems.len(), 1, "{name}: {problems:?}");
            assert_eq!(problems[0].0, reason, "{name}: {problems:?}");
            assert!(
                problems[0].1.ends_with("keeping its last good objects"),
                "{name}: {problems:?}"
            );
            assert_eq!(cluster_ip(&model, "web/front"), "198.19.0.10", "{name}");
            assert!(changes.dirty_services.is_empty(), "{name}");
        }
    }

    #[test]
    fn a_list_is_read_item_by_item() {
        let dir = TempDir::new("list");
        let items: Vec<String> = (0..50)
            .map(|i| {
                format!(
                    "- apiVersion: v1\n  kind: Service\n  metadata: {{name: s{i}, namespace: web}}\n  \
                     spec: {{clusterIP: 198.19.1.{i}, ports: [{{port: 80}}]}}\n"
                )
            })
            .collect();
        dir.write(
            "list.yaml",
            &format!(
                "apiVersion: v1\nkind: List\nitems:\n{}- just a string\n",
                items.concat()
            ),
        );
        let reload = load(&dir);
        assert_eq!(reload.model.services().count(), 50);
        assert_eq!(
            reload.problems,
            ["list.yaml: document 1 item 51: not a Kubernetes object: kind is missing"]
        );
    }

    #[test]
    fn a_large_file_parsed_in_parts_reads_like_a_small_one() {
        let dir = TempDir::new("large");
        let mut documents: Vec<String> = (0..12_000)
            .map(|i| service_yaml(&format!("s{i}"), &format!("198.19.{}.{}", i / 250, i % 250)))
            .collect();
        documents[5000] = "just a string\n".to_owned();
        let text = documents.join("---\n");
        assert!(text.len() as u64 > parse::PARALLEL_FROM_BYTES);
        dir.write("large.yaml", &text);
        let reload = load(&dir);
        assert_eq!(reload.model.services().count(), 11_999);
        assert_eq!(
            reload.problems,
            ["large.yaml: document 5001: not a Kubernetes object: kind is missing"]
        );
        assert_eq!(cluster_ip(&reload.model, "web/s11999"), "198.19.47.249");
    }

    #[test]
    fn unreadable_directory_is_an_error() {
        let dir = TempDir::new("missing");
        let mut source = ManifestSource::new(dir.0.join("absent"), ParseLimits::default());
        assert!(source.load(&mut Model::default()).is_err());
    }
}
