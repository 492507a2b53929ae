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
//! Bad input loses nothing: an invalid object is reported (file, object, reason) and
//! skipped while the rest load. When an object that loaded before turns invalid, or its
//! whole file stops parsing or turns empty (say, caught mid-write), its last good version
//! stays until the file is fixed or deleted.

use std::collections::BTreeMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::fs::{self, Metadata};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::debug;

use crate::model::{DEFAULT_NAMESPACE, Model, ObjectKey, SERVICE_NAME_LABEL};

/// A directory of manifests and the last good objects of each of its files.
#[derive(Clone, Debug)]
pub struct ManifestSource {
    dir: PathBuf,
    last_good: BTreeMap<PathBuf, FileObjects>,
}

/// The result of a reload: the model to use and what was wrong with the input.
#[derive(Clone, Debug, PartialEq)]
pub struct Reload {
    pub model: Model,
    pub problems: Vec<ManifestProblem>,
}

/// Something in the directory that could not be used as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestProblem {
    pub file: PathBuf,
    /// `Kind namespace/name`, or `document N` when the object has no usable name.
    pub object: Option<String>,
    pub reason: String,
}

impl fmt::Display for ManifestProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        f.write_str(&self.reason)
    }
}

/// Files modified this recently also have their contents fingerprinted: a file's mtime
/// moves in kernel ticks on some filesystems, so two same-size writes within one tick would
/// otherwise look alike. (The fingerprint changes once more when the window passes: one
/// spare reload per edit.)
const RECENT_CHANGE_WINDOW: Duration = Duration::from_secs(2);

impl ManifestSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestSource {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    /// Cheap: a fingerprint (paths, sizes, mtimes) to decide whether to reload. Used by a
    /// poll loop every ~250 ms.
    pub fn fingerprint(&self) -> io::Result<u64> {
        let mut hasher = DefaultHasher::new();
        for (file, metadata) in manifest_files(&self.dir)? {
            file.hash(&mut hasher);
            match metadata {
                Ok(metadata) => {
                    (
                        metadata.dev(),
                        metadata.ino(),
                        metadata.size(),
                        metadata.mtime(),
                        metadata.mtime_nsec(),
                        metadata.ctime(),
                        metadata.ctime_nsec(),
                    )
                        .hash(&mut hasher);
                    if changed_recently(&metadata) {
                        fs::read(&file).ok().hash(&mut hasher);
                    }
                }
                Err(error) => error.kind().hash(&mut hasher),
            }
        }
        Ok(hasher.finish())
    }

    /// Re-reads the directory. Err only if the directory itself can't be read (then the
    /// caller keeps the old model).
    pub fn reload(&mut self) -> io::Result<Reload> {
        let files = manifest_files(&self.dir)?;
        let mut problems = Vec::new();
        let mut loaded = BTreeMap::new();
        for (file, _) in files {
            let previous = self.last_good.remove(&file).unwrap_or_default();
            let objects = load_file(&file, previous, &mut problems);
            loaded.insert(file, objects);
        }
        self.last_good = loaded;
        let model = build_model(&self.last_good, &mut problems);
        Ok(Reload { model, problems })
    }
}

/// The objects one file contributes, by kind and `namespace/name`.
type FileObjects = BTreeMap<ObjectId, ManifestObject>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
}

impl Kind {
    fn from_name(kind: &str) -> Option<Self> {
        match kind {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            _ => None,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectId {
    kind: Kind,
    key: ObjectKey,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum ManifestObject {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
}

/// What one document (or `List` item) turned out to be.
enum Decoded {
    /// Empty, or a kind this source does not read.
    Skipped,
    Object(ObjectId, ManifestObject),
    /// `id` is known when kind and name could be read, which lets a last good version stand in.
    Invalid {
        id: Option<ObjectId>,
        reason: String,
    },
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
        let is_manifest = !file_name.starts_with('.')
            && [".yaml", ".yml", ".json"]
                .iter()
                .any(|extension| file_name.ends_with(extension));
        if !is_manifest {
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

fn changed_recently(metadata: &Metadata) -> bool {
    metadata
        .modified()
        .ok()
        .and_then(|modified| modified.elapsed().ok())
        .is_none_or(|age| age < RECENT_CHANGE_WINDOW)
}

/// The objects of one file; `previous` are its objects from the last reload.
fn load_file(
    file: &Path,
    mut previous: FileObjects,
    problems: &mut Vec<ManifestProblem>,
) -> FileObjects {
    let mut problem = |object: Option<String>, reason: String| {
        problems.push(ManifestProblem {
            file: file.to_owned(),
            object,
            reason,
        });
    };
    let documents = match fs::read_to_string(file) {
        // Truncated by a writer that has not written yet, most likely: removing objects
        // takes deleting the file (or their documents).
        Ok(text) if text.is_empty() && !previous.is_empty() => Err("is empty".to_owned()),
        Ok(text) => parse_documents(file, &text),
        Err(error) => Err(format!("can't be read: {error}")),
    };
    let documents = match documents {
        Ok(documents) => documents,
        Err(reason) => {
            let keeping = if previous.is_empty() {
                ""
            } else {
                "; keeping its last good objects"
            };
            problem(None, format!("{reason}{keeping}"));
            return previous;
        }
    };

    let mut objects = FileObjects::new();
    for (location, decoded) in documents
        .into_iter()
        .enumerate()
        .flat_map(|(index, document)| decode_document(format!("document {}", index + 1), document))
    {
        match decoded {
            Decoded::Skipped => {}
            Decoded::Object(id, _) if objects.contains_key(&id) => problem(
                Some(id.to_string()),
                "defined twice in this file; keeping the first".to_owned(),
            ),
            Decoded::Object(id, object) => {
                objects.insert(id, object);
            }
            Decoded::Invalid { id, mut reason } => {
                let last_good = id.as_ref().and_then(|id| previous.remove_entry(id));
                if let Some((id, object)) = last_good {
                    reason.push_str("; keeping its last good version");
                    objects.entry(id).or_insert(object);
                }
                problem(Some(id.map_or(location, |id| id.to_string())), reason);
            }
        }
    }
    objects
}

/// The documents of a file: one for JSON, any number for YAML. Err when the file as a whole
/// does not parse; a document that parses but has no JSON form (a non-string key) fails
/// alone.
fn parse_documents(file: &Path, text: &str) -> Result<Vec<Result<Value, String>>, String> {
    if file
        .extension()
        .is_some_and(|extension| extension == "json")
    {
        return serde_json::from_str(text)
            .map(|document| vec![Ok(document)])
            .map_err(|error| format!("invalid JSON: {error}"));
    }
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            let document = serde_norway::Value::deserialize(document)
                .map_err(|error| format!("invalid YAML: {error}"))?;
            Ok(serde_json::to_value(document).map_err(|error| error.to_string()))
        })
        .collect()
}

/// A document, or each item of a `kind: List` document (what `kubectl get -o yaml` writes).
fn decode_document(location: String, document: Result<Value, String>) -> Vec<(String, Decoded)> {
    let document = match document {
        Ok(document) => document,
        Err(reason) => return vec![(location, Decoded::Invalid { id: None, reason })],
    };
    let mut list = match document {
        Value::Object(map) if map.get("kind").and_then(Value::as_str) == Some("List") => map,
        document => return vec![(location, decode_object(document))],
    };
    match list.remove("items") {
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                (
                    format!("{location} item {}", index + 1),
                    decode_object(item),
                )
            })
            .collect(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => vec![(
            location,
            Decoded::Invalid {
                id: None,
                reason: "items of a List must be a sequence".to_owned(),
            },
        )],
    }
}

fn decode_object(document: Value) -> Decoded {
    if document.is_null() {
        return Decoded::Skipped;
    }
    let invalid = |id: Option<&ObjectId>, reason: String| Decoded::Invalid {
        id: id.cloned(),
        reason,
    };
    let Some(kind_name) = document.get("kind").and_then(Value::as_str) else {
        return invalid(None, "not a Kubernetes object: kind is missing".to_owned());
    };
    let Some(kind) = Kind::from_name(kind_name) else {
        debug!(
            kind = kind_name,
            "manifest object skipped: not a Service or EndpointSlice"
        );
        return Decoded::Skipped;
    };
    let metadata = document.get("metadata");
    let metadata_field = |field: &str| {
        metadata
            .and_then(|metadata| metadata.get(field))
            .and_then(Value::as_str)
            .filter(|value| !value.is_empty())
    };
    let Some(name) = metadata_field("name") else {
        return invalid(None, format!("{kind} has no metadata.name"));
    };
    let namespace = metadata_field("namespace").unwrap_or(DEFAULT_NAMESPACE);
    let id = ObjectId {
        kind,
        key: ObjectKey::new(namespace, name),
    };
    let expected_api_version = kind.api_version();
    match document.get("apiVersion").and_then(Value::as_str) {
        Some(api_version) if api_version == expected_api_version => {}
        Some(api_version) => {
            return invalid(
                Some(&id),
                format!(
                    "apiVersion {api_version} is wrong for {kind}; expected {expected_api_version}"
                ),
            );
        }
        None => {
            return invalid(
                Some(&id),
                format!("apiVersion is missing; expected {expected_api_version}"),
            );
        }
    }

    let namespace = namespace.to_owned();
    let object = match kind {
        Kind::Service => deserialize::<Service>(document).and_then(|mut service| {
            validate_service(&service)?;
            service.metadata.namespace = Some(namespace);
            Ok(ManifestObject::Service(Box::new(service)))
        }),
        Kind::EndpointSlice => deserialize::<EndpointSlice>(document).and_then(|mut slice| {
            validate_endpoint_slice(&slice)?;
            slice.metadata.namespace = Some(namespace);
            Ok(ManifestObject::EndpointSlice(Box::new(slice)))
        }),
    };
    match object {
        Ok(object) => Decoded::Object(id, object),
        Err(reason) => invalid(Some(&id), reason),
    }
}

/// Deserializes with the path of the offending field in the error, e.g.
/// `spec.ports[0].port: invalid type: string "http", expected i32`.
fn deserialize<T: DeserializeOwned>(document: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(document).map_err(|error| {
        let path = error.path().to_string();
        if path == "." {
            error.inner().to_string()
        } else {
            format!("{path}: {}", error.inner())
        }
    })
}

/// Reasons collected while validating one object; Err joins them.
#[derive(Default)]
struct Reasons(Vec<String>);

impl Reasons {
    fn add(&mut self, reason: String) {
        self.0.push(reason);
    }

    fn check(&mut self, ok: bool, reason: impl FnOnce() -> String) {
        if !ok {
            self.add(reason());
        }
    }

    fn ip(&mut self, field: &str, addr: &str) {
        self.check(addr.parse::<IpAddr>().is_ok(), || {
            format!("{field} {addr:?} is not an IP address")
        });
    }

    fn port(&mut self, field: &str, port: i32) {
        self.check((1..=65535).contains(&port), || {
            format!("{field} {port} is out of range (1-65535)")
        });
    }

    fn protocol(&mut self, field: &str, protocol: Option<&str>) {
        self.one_of(field, protocol, &["TCP", "UDP", "SCTP"]);
    }

    fn one_of(&mut self, field: &str, value: Option<&str>, allowed: &[&str]) {
        if let Some(value) = value {
            self.check(allowed.contains(&value), || {
                format!(
                    "{field} {value:?} is invalid; expected one of {}",
                    allowed.join(", ")
                )
            });
        }
    }

    fn into_result(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("; "))
        }
    }
}

/// What the API server would refuse and the planner relies on.
fn validate_service(service: &Service) -> Result<(), String> {
    let mut reasons = Reasons::default();
    if let Some(spec) = &service.spec {
        reasons.one_of(
            "spec.type",
            spec.type_.as_deref(),
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
        );
        let policies = ["Cluster", "Local"];
        reasons.one_of(
            "spec.externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
            &policies,
        );
        reasons.one_of(
            "spec.internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
            &policies,
        );
        reasons.one_of(
            "spec.sessionAffinity",
            spec.session_affinity.as_deref(),
            &["None", "ClientIP"],
        );
        let affinity_timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|config| config.client_ip.as_ref())
            .and_then(|client_ip| client_ip.timeout_seconds);
        if let Some(seconds) = affinity_timeout {
            reasons.check((1..=86_400).contains(&seconds), || {
                format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds {seconds} is out of \
                     range (1-86400)"
                )
            });
        }
        if let Some(cluster_ip) = spec.cluster_ip.as_deref()
            && !matches!(cluster_ip, "" | "None")
        {
            reasons.ip("spec.clusterIP", cluster_ip);
        }
        for (index, cluster_ip) in spec.cluster_ips.iter().flatten().enumerate() {
            if cluster_ip != "None" {
                reasons.ip(&format!("spec.clusterIPs[{index}]"), cluster_ip);
            }
        }
        for (index, external_ip) in spec.external_ips.iter().flatten().enumerate() {
            reasons.ip(&format!("spec.externalIPs[{index}]"), external_ip);
        }
        let mut port_names = Vec::new();
        for (index, port) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{index}]");
            // k8s-openapi reads a missing port as 0.
            if port.port == 0 {
                reasons.add(format!("{field}.port is missing"));
            } else {
                reasons.port(&format!("{field}.port"), port.port);
            }
            reasons.protocol(&format!("{field}.protocol"), port.protocol.as_deref());
            if let Some(node_port) = port.node_port.filter(|&node_port| node_port != 0) {
                reasons.port(&format!("{field}.nodePort"), node_port);
            }
            let name = port.name.as_deref().unwrap_or_default();
            reasons.check(!port_names.contains(&name), || {
                format!("{field}.name {name:?} is used by another port")
            });
            port_names.push(name);
        }
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|load_balancer| load_balancer.ingress.as_ref());
    for (index, ingress) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &ingress.ip {
            reasons.ip(&format!("status.loadBalancer.ingress[{index}].ip"), ip);
        }
    }
    reasons.into_result()
}

/// What the API server would refuse and the model and planner rely on.
fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    let mut reasons = Reasons::default();
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        .filter(|name| !name.is_empty());
    reasons.check(service_name.is_some(), || {
        format!("label {SERVICE_NAME_LABEL} is missing (it names the slice's Service)")
    });
    let address_type = slice.address_type.as_str();
    reasons.one_of("addressType", Some(address_type), &["IPv4", "IPv6", "FQDN"]);
    for (index, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        let field = format!("endpoints[{index}].addresses");
        reasons.check(!endpoint.addresses.is_empty(), || {
            format!("{field} is empty")
        });
        for addr in &endpoint.addresses {
            let valid = match address_type {
                "IPv4" => addr.parse::<Ipv4Addr>().is_ok(),
                "IPv6" => addr.parse::<Ipv6Addr>().is_ok(),
                _ => true,
            };
            reasons.check(valid, || {
                format!("{field}: {addr:?} is not an {address_type} address")
            });
        }
    }
    for (index, port) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{index}]");
        if let Some(port) = port.port {
            reasons.port(&format!("{field}.port"), port);
        }
        reasons.protocol(&format!("{field}.protocol"), port.protocol.as_deref());
    }
    reasons.into_result()
}

/// The model from every file's objects. Files are taken in name order: an object defined
/// in two files keeps the first definition.
fn build_model(
    files: &BTreeMap<PathBuf, FileObjects>,
    problems: &mut Vec<ManifestProblem>,
) -> Model {
    let mut model = Model::default();
    let mut defined_in: BTreeMap<&ObjectId, &Path> = BTreeMap::new();
    for (file, objects) in files {
        for (id, object) in objects {
            let mut problem = |reason: String| {
                problems.push(ManifestProblem {
                    file: file.clone(),
                    object: Some(id.to_string()),
                    reason,
                });
            };
            if let Some(first) = defined_in.get(id) {
                problem(format!(
                    "also defined in {}; keeping that one",
                    first.display()
                ));
                continue;
            }
            defined_in.insert(id, file);
            let inserted = match object.clone() {
                ManifestObject::Service(service) => model.insert_service(*service).map(drop),
                ManifestObject::EndpointSlice(slice) => {
                    model.insert_endpoint_slice(*slice).map(drop)
                }
            };
            if let Err(error) = inserted {
                problem(error.to_string());
            }
        }
    }
    model
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

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

    fn slice_names(model: &Model) -> Vec<String> {
        model
            .endpoint_slices()
            .map(|(key, _)| key.to_string())
            .collect()
    }

    fn cluster_ip(model: &Model, key: &str) -> String {
        let (namespace, name) = key.split_once('/').unwrap();
        let service = model.service(&ObjectKey::new(namespace, name)).unwrap();
        service.spec.as_ref().unwrap().cluster_ip.clone().unwrap()
    }

    /// Problems as `file name: object: reason`, without the temp dir.
    fn problem_lines(reload: &Reload) -> Vec<String> {
        reload
            .problems
            .iter()
            .map(|problem| {
                let file = problem.file.file_name().unwrap().to_string_lossy();
                ManifestProblem {
                    file: PathBuf::from(file.as_ref()),
                    ..problem.clone()
                }
                .to_string()
            })
            .collect()
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

        let reload = ManifestSource::new(&dir.0).reload().unwrap();
        assert_eq!(problem_lines(&reload), Vec::<String>::new());
        assert_eq!(
            service_names(&reload.model),
            ["default/api", "web/front", "web/listed"]
        );
        assert_eq!(slice_names(&reload.model), ["web/front-1"]);
        let api = reload
            .model
            .service(&ObjectKey::new("default", "api"))
            .unwrap();
        assert_eq!(api.metadata.namespace.as_deref(), Some("default"));
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
        let reload = ManifestSource::new(&dir.0).reload().unwrap();
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

        let reload = ManifestSource::new(&dir.0).reload().unwrap();
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
        let mut source = ManifestSource::new(&dir.0);
        assert!(source.reload().unwrap().problems.is_empty());

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
        let reload = source.reload().unwrap();
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
        let reload = source.reload().unwrap();
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.10");

        // The whole file caught mid-write: everything it had stays.
        fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: fr").unwrap();
        let reload = source.reload().unwrap();
        assert_eq!(service_names(&reload.model), ["web/back", "web/front"]);
        assert_eq!(reload.problems.len(), 1);
        let reason = &reload.problems[0].reason;
        assert!(reason.starts_with("invalid YAML: "), "{reason}");
        assert!(
            reason.ends_with("; keeping its last good objects"),
            "{reason}"
        );

        // Truncated, not yet rewritten: kept too.
        fs::write(&file, "").unwrap();
        let reload = source.reload().unwrap();
        assert_eq!(service_names(&reload.model), ["web/back", "web/front"]);
        assert_eq!(
            problem_lines(&reload),
            ["web.yaml: is empty; keeping its last good objects"]
        );

        // Fixed: the new version replaces it.
        fs::write(&file, service_yaml("front", "198.19.0.30")).unwrap();
        let reload = source.reload().unwrap();
        assert!(reload.problems.is_empty());
        assert_eq!(service_names(&reload.model), ["web/front"]);
        assert_eq!(cluster_ip(&reload.model, "web/front"), "198.19.0.30");
    }

    #[test]
    fn deleted_file_removes_its_objects() {
        let dir = TempDir::new("deleted");
        dir.write("front.yaml", &service_yaml("front", "198.19.0.10"));
        let back = dir.write("back.yaml", &service_yaml("back", "198.19.0.20"));
        let mut source = ManifestSource::new(&dir.0);
        assert_eq!(
            service_names(&source.reload().unwrap().model),
            ["web/back", "web/front"]
        );

        fs::remove_file(back).unwrap();
        let reload = source.reload().unwrap();
        assert_eq!(service_names(&reload.model), ["web/front"]);
        assert!(reload.problems.is_empty());
    }

    #[test]
    fn object_defined_in_two_files_keeps_the_first() {
        let dir = TempDir::new("duplicate");
        dir.write("a.yaml", &service_yaml("front", "198.19.0.10"));
        dir.write("b.yaml", &service_yaml("front", "198.19.0.20"));
        let reload = ManifestSource::new(&dir.0).reload().unwrap();
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

        let reload = ManifestSource::new(&dir.0).reload().unwrap();
        assert!(reload.problems.is_empty(), "{:?}", reload.problems);
        assert_eq!(service_names(&reload.model), ["web/front"]);
    }

    #[test]
    fn fingerprint_changes_on_edit_only() {
        let dir = TempDir::new("fingerprint");
        let file = dir.write("web.yaml", &service_yaml("front", "198.19.0.10"));
        let source = ManifestSource::new(&dir.0);
        let first = source.fingerprint().unwrap();
        assert_eq!(source.fingerprint().unwrap(), first);

        // Same size, written right away: caught even if the mtime did not move.
        fs::write(&file, service_yaml("front", "198.19.0.11")).unwrap();
        let edited = source.fingerprint().unwrap();
        assert_ne!(edited, first);

        dir.write("api.yaml", &service_yaml("api", "198.19.0.12"));
        assert_ne!(source.fingerprint().unwrap(), edited);
        dir.write(".swap.yaml", "ignored");
        dir.write("README.md", "ignored");
        let with_api = source.fingerprint().unwrap();
        assert_eq!(source.fingerprint().unwrap(), with_api);
    }

    #[test]
    fn unreadable_directory_is_an_error() {
        let dir = TempDir::new("missing");
        let mut source = ManifestSource::new(dir.0.join("absent"));
        assert!(source.reload().is_err());
        assert!(source.fingerprint().is_err());
    }
}
