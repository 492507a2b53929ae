//! The manifests source as the daemon uses it: files read, changed and removed, problems
//! reported, objects that reach the model.

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
        ServiceRecord::Proxied(service) => (service.cluster_ips.iter())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
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
        service_yaml("wrong-version", "198.19.0.13").replace("apiVersion: v1", "apiVersion: v2"),
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

/// Issue 14: every hostile object kind and file of the lab's catalogue, side by side with
/// a good Service: each refused or skipped with its kind, reason and name, the rest
/// taken in, the good Service planned as if they were not there.
#[test]
fn hostile_objects_and_files_are_refused_with_their_reasons_while_others_load() {
    use proxy_lab::hostile::{self, Reported};

    let dir = TempDir::new("hostile-catalogue");
    let limits = ParseLimits {
        max_file_bytes: 4 * 1024 * 1024,
        ..ParseLimits::default()
    };
    let cases = hostile::hostile_objects();
    for case in &cases {
        dir.write(&format!("{}.json", case.name), &hostile::as_list(case));
    }
    let files = hostile::hostile_files(limits.max_file_bytes as usize);
    for file in &files {
        fs::write(dir.0.join(file.file_name), &file.contents).unwrap();
    }
    let (repeated_name, repeated) = hostile::repeated_key_document();
    dir.write(
        "repeated-key.yaml",
        &format!(
            "{repeated}---\n{}",
            service_yaml("beside-repeated", "198.19.0.41")
        ),
    );
    dir.write("good.yaml", &service_yaml("good", "198.19.0.40"));

    let mut source = ManifestSource::new(&dir.0, limits);
    let mut model = Model::default();
    source.load(&mut model).unwrap();
    let node = crate::plan::NodeFacts::default();
    let planned = crate::plan::plan(&model, &node);
    let reported: Vec<Reported> = (model.take_changes().rejected.iter())
        .chain(&planned.problems)
        .map(|problem| Reported {
            kind: problem.kind.as_str().to_owned(),
            reason: problem.reason.to_owned(),
            message: problem.message.clone(),
        })
        .collect();
    let present = |object: &serde_json::Value| {
        let key = ObjectKey::new(
            object["metadata"]["namespace"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap(),
        );
        match object["kind"].as_str() {
            Some("Service") => model.service(&key).is_some(),
            _ => model.endpoint_slice(&key).is_some(),
        }
    };
    hostile::check_outcomes(&cases, &reported, present).unwrap();

    for file in &files {
        let refused = reported.iter().any(|problem| {
            problem.kind == "file"
                && problem.reason == file.reason
                && problem.message.contains(file.file_name)
        });
        assert!(
            refused,
            "{} not refused as {}: {reported:?}",
            file.file_name, file.reason
        );
    }
    let repeated_refused = reported.iter().any(|problem| {
        problem.reason == "invalid"
            && problem.message.contains("repeated-key.yaml")
            && problem.message.contains("twice")
    });
    assert!(repeated_refused, "{repeated_name}: {reported:?}");
    assert_eq!(cluster_ip(&model, "web/beside-repeated"), "198.19.0.41");
    assert_eq!(cluster_ip(&model, "web/good"), "198.19.0.40");
    let good = (planned.desired.frontends.keys())
        .any(|frontend| frontend.to_string() == "198.19.0.40:80/tcp");
    assert!(good, "{:?}", planned.desired.frontends.keys());
}
