//! The Kubernetes source against a test API server (fake_apiserver), through the real
//! kube-rs client configured from a kubeconfig: initial lists, watch events, dropped
//! watches, 410 Gone, bookmarks, the Node, and what the requests carry. Each case ends with
//! the model the source built and the frontends the planner makes of it.
//!
//! The source runs on its own task and publishes the model after every change it reports;
//! every wait is bounded by [`TIMEOUT`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use proxy_lab::fake_apiserver::{self, Close, FakeApiServer, GoneResponse, Kind, Outage, Request};
use proxy_lab::kubeconfig_for;
use proxy_userspace::model::Model;
use proxy_userspace::plan::{self, NodeFacts};
use proxy_userspace::source::kubernetes::{API_READ_TIMEOUT, ApiServer, KubernetesSource};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Generous: a 410 costs one backoff step (0.8 s, with jitter up to twice that).
const TIMEOUT: Duration = Duration::from_secs(15);
const NODE_NAME: &str = "node-a";

/// The label selector kube-proxy's informers use, as requirements.
const PROXIED_SELECTOR: [&str; 2] = [
    "!service.kubernetes.io/headless",
    "!service.kubernetes.io/service-proxy-name",
];

// --- Objects, as the API server stores them -------------------------------------------

fn service(name: &str, cluster_ip: &str, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|port| {
            json!({ "name": format!("p{port}"), "port": port, "protocol": "TCP",
                    "targetPort": 8000 + port })
        })
        .collect();
    json!({
        "metadata": { "namespace": "web", "name": name },
        "spec": { "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                  "ports": ports },
    })
}

/// A slice of Service `service` with one endpoint per address, serving ports 80 and 443
/// (target ports 8080 and 8443); `ready` says which endpoints are ready.
fn slice(name: &str, service: &str, endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, ready)| {
            json!({ "addresses": [address], "conditions": { "ready": ready },
                    "nodeName": NODE_NAME })
        })
        .collect();
    json!({
        "metadata": { "namespace": "web", "name": name,
                      "labels": { "kubernetes.io/service-name": service } },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            { "name": "p80", "port": 8080, "protocol": "TCP" },
            { "name": "p443", "port": 8443, "protocol": "TCP" },
        ],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "metadata": { "name": name, "labels": { "topology.kubernetes.io/zone": zone } },
        "status": { "conditions": [{ "type": "Ready", "status": "True" }] },
    })
}

fn with_label(mut object: Value, key: &str, value: &str) -> Value {
    object["metadata"]["labels"][key] = json!(value);
    object
}

/// A cluster with one proxied Service (two slices), objects kube-proxy's selectors leave
/// out, and two Nodes.
fn seed(server: &FakeApiServer) {
    server.edit(|cluster| {
        cluster.apply(Kind::Service, service("frontend", "198.18.100.10", &[80]));
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-a", "frontend", &[("198.18.1.1", true)]),
        );
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-b", "frontend", &[("198.18.1.2", true)]),
        );
        cluster.apply(
            Kind::Service,
            with_label(
                service("elsewhere", "198.18.100.20", &[80]),
                "service.kubernetes.io/service-proxy-name",
                "other-proxy",
            ),
        );
        cluster.apply(
            Kind::EndpointSlice,
            with_label(
                slice("db-a", "db", &[("198.18.1.9", true)]),
                "service.kubernetes.io/headless",
                "",
            ),
        );
        cluster.apply(Kind::Node, node(NODE_NAME, "zone-a"));
        cluster.apply(Kind::Node, node("node-b", "zone-b"));
    });
}

// --- The source under test --------------------------------------------------------------

/// What the source's task publishes after every change.
#[derive(Clone, Default)]
struct Snapshot {
    model: Model,
    synced: bool,
    /// How many times `changed` returned.
    changes: usize,
}

impl Snapshot {
    /// `frontend → backends` as the planner makes them for this node.
    fn frontends(&self) -> BTreeMap<String, Vec<String>> {
        let node = NodeFacts {
            node_name: NODE_NAME.to_owned(),
            ..NodeFacts::default()
        };
        plan::plan(&self.model, &node)
            .desired
            .frontends
            .iter()
            .map(|(frontend, planned)| {
                let backends = planned.backends.iter().map(ToString::to_string).collect();
                (frontend.to_string(), backends)
            })
            .collect()
    }

    fn service_names(&self) -> Vec<String> {
        self.model
            .services()
            .map(|(key, _)| key.to_string())
            .collect()
    }

    fn slice_names(&self) -> Vec<String> {
        let slices = self.model.endpoint_slices();
        slices.map(|(key, _)| key.to_string()).collect()
    }

    /// What a failed wait prints.
    fn summary(&self) -> String {
        format!(
            "synced: {}, changes: {}, services: {:?}, slices: {:?}, zone: {:?}, frontends: {:?}",
            self.synced,
            self.changes,
            self.service_names(),
            self.slice_names(),
            self.zone(),
            self.frontends()
        )
    }

    fn zone(&self) -> Option<&str> {
        let labels = self.model.node_labels();
        labels
            .get("topology.kubernetes.io/zone")
            .map(String::as_str)
    }
}

fn frontends(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(frontend, backends)| {
            let backends = backends.iter().map(|backend| backend.to_string()).collect();
            (frontend.to_string(), backends)
        })
        .collect()
}

/// A [`KubernetesSource`] on its own task, and the model it keeps.
struct RunningSource {
    snapshots: watch::Receiver<Snapshot>,
    task: JoinHandle<()>,
}

impl Drop for RunningSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RunningSource {
    /// Connects the way `ebpf-proxy daemon --kubeconfig` does (the file is read once).
    async fn start(server: &FakeApiServer) -> Self {
        Self::start_with(server, |_| {}).await
    }

    /// [`start`](Self::start), with the client's configuration adjusted first.
    async fn start_with(server: &FakeApiServer, adjust: impl FnOnce(&mut kube::Config)) -> Self {
        let kubeconfig = TempFile::new("kubeconfig", &kubeconfig_for(server.url()));
        let mut config = ApiServer::Kubeconfig(kubeconfig.0.clone())
            .config()
            .await
            .expect("a client configuration from the kubeconfig");
        adjust(&mut config);
        let client = kube::Client::try_from(config).expect("a client");
        let mut source = KubernetesSource::new(client, NODE_NAME);
        let (publish, snapshots) = watch::channel(Snapshot::default());
        let task = tokio::spawn(async move {
            let mut model = Model::default();
            for changes in 1.. {
                source.changed(&mut model).await;
                publish.send_replace(Snapshot {
                    model: model.clone(),
                    synced: source.has_synced(),
                    changes,
                });
            }
        });
        RunningSource { snapshots, task }
    }

    /// The first snapshot for which `done` holds.
    async fn wait_for(&mut self, what: &str, done: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        let waited = tokio::time::timeout(TIMEOUT, self.snapshots.wait_for(done))
            .await
            .map(|snapshot| snapshot.expect("the source task runs").clone());
        waited.unwrap_or_else(|_| {
            panic!(
                "no {what} within {TIMEOUT:?}; last snapshot: {}",
                self.snapshots.borrow().summary()
            )
        })
    }

    async fn synced(&mut self) -> Snapshot {
        self.wait_for("sync", |snapshot| snapshot.synced).await
    }
}

/// A file under the system temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "ebpf-proxy-kube-source-{}-{unique}-{name}",
            std::process::id()
        ));
        std::fs::write(&path, contents).expect("writing a temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits, bounded, until `done` holds for the server.
async fn server_until(server: &FakeApiServer, what: &str, done: impl Fn(&FakeApiServer) -> bool) {
    if tokio::time::timeout(TIMEOUT, server.until(done))
        .await
        .is_err()
    {
        panic!(
            "no {what} within {TIMEOUT:?}; requests: {:#?}",
            server.requests()
        );
    }
}

/// Waits until the three watches are open, so that a disconnect ends all of them.
async fn all_watching(server: &FakeApiServer) {
    server_until(server, "three open watches", |server| {
        server.open_watches() == 3
    })
    .await;
}

fn resource_version(request: &Request) -> Option<u64> {
    let version = request.param("resourceVersion")?;
    Some(version.parse().expect("a numeric resourceVersion"))
}

fn resource_versions(requests: &[Request]) -> Vec<Option<u64>> {
    requests.iter().map(resource_version).collect()
}

fn label_requirements(request: &Request) -> BTreeSet<&str> {
    request
        .param("labelSelector")
        .unwrap_or_default()
        .split(',')
        .collect()
}

// --- Tests ------------------------------------------------------------------------------

#[tokio::test]
async fn initial_list_then_added_modified_and_deleted_events() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let listed_at = server.edit(|cluster| cluster.revision());
    let mut source = RunningSource::start(&server).await;

    let synced = source.synced().await;
    assert_eq!(synced.service_names(), ["web/frontend"]);
    assert_eq!(synced.slice_names(), ["web/frontend-a", "web/frontend-b"]);
    assert_eq!(synced.zone(), Some("zone-a"));
    assert_eq!(
        synced.frontends(),
        frontends(&[(
            "198.18.100.10:80/tcp",
            &["198.18.1.1:8080", "198.18.1.2:8080"]
        )])
    );

    // ADDED: a third slice joins the merge.
    server.edit(|cluster| {
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-c", "frontend", &[("198.18.1.3", true)]),
        )
    });
    let expected = frontends(&[(
        "198.18.100.10:80/tcp",
        &["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"],
    )]);
    source
        .wait_for("the added slice", |s| s.frontends() == expected)
        .await;

    // MODIFIED: an endpoint stops being ready; the Service gains a port.
    server.edit(|cluster| {
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-a", "frontend", &[("198.18.1.1", false)]),
        );
        cluster.apply(
            Kind::Service,
            service("frontend", "198.18.100.10", &[80, 443]),
        )
    });
    let expected = frontends(&[
        (
            "198.18.100.10:443/tcp",
            &["198.18.1.2:8443", "198.18.1.3:8443"],
        ),
        (
            "198.18.100.10:80/tcp",
            &["198.18.1.2:8080", "198.18.1.3:8080"],
        ),
    ]);
    source
        .wait_for("the modified slice and Service", |s| {
            s.frontends() == expected
        })
        .await;

    // DELETED: a slice goes.
    server.edit(|cluster| cluster.delete(Kind::EndpointSlice, "web/frontend-b"));
    let expected = frontends(&[
        ("198.18.100.10:443/tcp", &["198.18.1.3:8443"]),
        ("198.18.100.10:80/tcp", &["198.18.1.3:8080"]),
    ]);
    source
        .wait_for("the deleted slice", |s| s.frontends() == expected)
        .await;

    // A label that hands the Service to another proxy: it leaves the selector, and the
    // watch reports it deleted.
    server.edit(|cluster| {
        cluster.apply(
            Kind::Service,
            with_label(
                service("frontend", "198.18.100.10", &[80, 443]),
                "service.kubernetes.io/service-proxy-name",
                "other-proxy",
            ),
        )
    });
    let handed_over = source
        .wait_for("the Service handed to another proxy", |s| {
            s.frontends().is_empty()
        })
        .await;
    assert!(handed_over.service_names().is_empty());
    assert_eq!(
        handed_over.slice_names(),
        ["web/frontend-a", "web/frontend-c"]
    );

    // What the requests carried: kube-proxy's selectors, lists from the watch cache,
    // watches from the list's resourceVersion with bookmarks.
    for kind in [Kind::Service, Kind::EndpointSlice] {
        let lists = server.requests_of(kind, false);
        assert_eq!(lists.len(), 1, "{kind:?} lists: {lists:#?}");
        assert_eq!(label_requirements(&lists[0]), PROXIED_SELECTOR.into());
        assert_eq!(lists[0].param("fieldSelector"), None);
    }
    let node_lists = server.requests_of(Kind::Node, false);
    assert_eq!(node_lists.len(), 1);
    assert_eq!(
        node_lists[0].param("fieldSelector"),
        Some("metadata.name=node-a")
    );
    assert_eq!(node_lists[0].param("labelSelector"), None);
    for kind in Kind::ALL {
        let list = &server.requests_of(kind, false)[0];
        assert_eq!(list.param("resourceVersion"), Some("0"));
        assert_eq!(list.param("resourceVersionMatch"), Some("NotOlderThan"));
        assert_eq!(list.param("limit"), None);
        let watches = server.requests_of(kind, true);
        assert_eq!(watches.len(), 1, "{kind:?} watches: {watches:#?}");
        assert_eq!(resource_version(&watches[0]), Some(listed_at));
        assert_eq!(watches[0].param("allowWatchBookmarks"), Some("true"));
        assert_eq!(
            watches[0].param("labelSelector"),
            list.param("labelSelector")
        );
        assert_eq!(
            watches[0].param("fieldSelector"),
            list.param("fieldSelector")
        );
    }
}

/// A watch that ends, cleanly or not, resumes from the last resourceVersion it saw and
/// gets what it missed, without relisting.
#[tokio::test]
async fn a_dropped_watch_resumes_from_its_last_resource_version() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let listed_at = server.edit(|cluster| cluster.revision());
    let mut source = RunningSource::start(&server).await;
    source.synced().await;

    let mut slices_seen_at = listed_at;
    let mut services_seen_at = listed_at;
    for (round, close) in [Close::Clean, Close::Abort].into_iter().enumerate() {
        all_watching(&server).await;
        let ports: &[u16] = if round == 0 { &[80, 443] } else { &[443] };
        let (services_at, slices_at) = server.disconnect(close, |cluster| {
            let slices_at = cluster.apply(
                Kind::EndpointSlice,
                slice("frontend-a", "frontend", &[("198.18.1.1", round == 1)]),
            );
            let services_at =
                cluster.apply(Kind::Service, service("frontend", "198.18.100.10", ports));
            (services_at, slices_at)
        });
        let expected = if round == 0 {
            frontends(&[
                ("198.18.100.10:443/tcp", &["198.18.1.2:8443"]),
                ("198.18.100.10:80/tcp", &["198.18.1.2:8080"]),
            ])
        } else {
            frontends(&[(
                "198.18.100.10:443/tcp",
                &["198.18.1.1:8443", "198.18.1.2:8443"],
            )])
        };
        source
            .wait_for(&format!("the changes missed ({close:?})"), |s| {
                s.frontends() == expected
            })
            .await;

        // Each watch resumed where it was; nothing was listed again.
        let resumed = |kind| server.requests_of(kind, true)[round + 1].clone();
        assert_eq!(
            resource_version(&resumed(Kind::Service)),
            Some(services_seen_at)
        );
        assert_eq!(
            resource_version(&resumed(Kind::EndpointSlice)),
            Some(slices_seen_at)
        );
        assert_eq!(resource_version(&resumed(Kind::Node)), Some(listed_at));
        for kind in Kind::ALL {
            assert_eq!(
                server.requests_of(kind, false).len(),
                1,
                "{kind:?} relisted"
            );
        }
        services_seen_at = services_at;
        slices_seen_at = slices_at;
    }
}

/// A 410 Gone — as an ERROR event on resume, as an HTTP status on resume, or on an open
/// watch — makes each watcher relist, and the list replaces what the model held: objects
/// deleted meanwhile go, even though no watch reported their deletion.
#[tokio::test]
async fn gone_relists_and_the_list_replaces_the_model() {
    enum Expiry {
        OnResume(GoneResponse),
        OnOpenWatch,
    }
    for expiry in [
        Expiry::OnResume(GoneResponse::ErrorEvent),
        Expiry::OnResume(GoneResponse::HttpStatus),
        Expiry::OnOpenWatch,
    ] {
        let server = FakeApiServer::start().await;
        seed(&server);
        let listed_at = server.edit(|cluster| cluster.revision());
        let mut source = RunningSource::start(&server).await;
        source.synced().await;
        all_watching(&server).await;

        let missed = |cluster: &mut fake_apiserver::Cluster| {
            cluster.delete(Kind::EndpointSlice, "web/frontend-b");
            cluster.apply(
                Kind::EndpointSlice,
                slice("frontend-c", "frontend", &[("198.18.1.3", true)]),
            );
            cluster.apply(Kind::Node, node(NODE_NAME, "zone-c"));
        };
        let label = match expiry {
            Expiry::OnResume(response) => {
                server.set_gone_response(response);
                server.disconnect(Close::Clean, |cluster| {
                    missed(cluster);
                    cluster.compact();
                });
                format!("the relist after a 410 on resume ({response:?})")
            }
            Expiry::OnOpenWatch => {
                server.expire_watches(missed);
                "the relist after a 410 on the open watch".to_owned()
            }
        };
        let relisted = source
            .wait_for(&label, |s| {
                s.zone() == Some("zone-c")
                    && s.slice_names() == ["web/frontend-a", "web/frontend-c"]
            })
            .await;
        assert_eq!(
            relisted.frontends(),
            frontends(&[(
                "198.18.100.10:80/tcp",
                &["198.18.1.1:8080", "198.18.1.3:8080"]
            )]),
            "{label}"
        );

        // Every watcher relisted, and the watch after the relist starts from the new list.
        let relisted_at = server.edit(|cluster| cluster.revision());
        server_until(&server, "watches from the relist", |server| {
            Kind::ALL.into_iter().all(|kind| {
                let watches = server.requests_of(kind, true);
                watches.last().and_then(resource_version) == Some(relisted_at)
            })
        })
        .await;
        for kind in Kind::ALL {
            assert_eq!(
                server.requests_of(kind, false).len(),
                2,
                "{label}: {kind:?}"
            );
            let watches = resource_versions(&server.requests_of(kind, true));
            let expected = match expiry {
                // The refused resume, then the watch after the relist.
                Expiry::OnResume(_) => vec![Some(listed_at), Some(listed_at), Some(relisted_at)],
                Expiry::OnOpenWatch => vec![Some(listed_at), Some(relisted_at)],
            };
            assert_eq!(watches, expected, "{label}: {kind:?}");
        }
    }
}

/// Bookmarks move a quiet watch's resourceVersion forward: after a compaction it resumes
/// where a watch without bookmarks has to relist.
#[tokio::test]
async fn a_bookmarked_watch_resumes_across_a_compaction() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let listed_at = server.edit(|cluster| cluster.revision());
    let mut source = RunningSource::start(&server).await;
    source.synced().await;
    all_watching(&server).await;

    // Changes the Service watch does not select, then a bookmark at their version.
    let bookmarked_at = server.edit(|cluster| {
        for port in [81, 82, 83] {
            cluster.apply(
                Kind::Service,
                with_label(
                    service("elsewhere", "198.18.100.20", &[port]),
                    "service.kubernetes.io/service-proxy-name",
                    "other-proxy",
                ),
            );
        }
        cluster.revision()
    });
    server.bookmark(Kind::Service);
    server.disconnect(Close::Clean, |cluster| {
        cluster.compact();
        cluster.apply(Kind::Service, service("frontend", "198.18.100.10", &[443]));
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-c", "frontend", &[("198.18.1.3", true)]),
        );
    });
    let expected = frontends(&[(
        "198.18.100.10:443/tcp",
        &["198.18.1.1:8443", "198.18.1.2:8443", "198.18.1.3:8443"],
    )]);
    source
        .wait_for("the changes after the compaction", |s| {
            s.frontends() == expected
        })
        .await;

    let service_watches = resource_versions(&server.requests_of(Kind::Service, true));
    assert_eq!(service_watches, [Some(listed_at), Some(bookmarked_at)]);
    assert_eq!(server.requests_of(Kind::Service, false).len(), 1);
    // The slice watch had no bookmark: its resume was refused and it relisted.
    assert_eq!(server.requests_of(Kind::EndpointSlice, false).len(), 2);
}

/// Only this node's Node is watched, only its labels enter the model, and its status
/// updates cause no change.
#[tokio::test]
async fn the_node_watch_keeps_this_nodes_labels_only() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = RunningSource::start(&server).await;
    let synced = source.synced().await;
    assert_eq!(synced.zone(), Some("zone-a"));

    server.edit(|cluster| {
        let mut heartbeat = node(NODE_NAME, "zone-a");
        heartbeat["status"]["conditions"][0]["lastHeartbeatTime"] = json!("2026-01-01T00:00:00Z");
        cluster.apply(Kind::Node, heartbeat);
        cluster.apply(Kind::Node, node("node-b", "zone-x"));
        cluster.apply(Kind::Node, node(NODE_NAME, "zone-b"));
    });
    let relabelled = source
        .wait_for("the new zone", |s| s.zone() == Some("zone-b"))
        .await;
    // The heartbeat (same watch, before the new zone) changed nothing; node-b is not watched.
    assert_eq!(relabelled.changes, synced.changes + 1);

    server.edit(|cluster| cluster.delete(Kind::Node, NODE_NAME));
    let deleted = source
        .wait_for("the Node's deletion", |s| s.model.node_labels().is_empty())
        .await;
    assert_eq!(deleted.changes, relabelled.changes + 1);
}

/// What the daemon reads from its Node besides the labels: the primary address of each
/// family (InternalIP before ExternalIP, leading zeros allowed) and whether it is being deleted — the cluster
/// autoscaler's taint or a deletion timestamp, kept from the deleted object when it goes.
#[tokio::test]
async fn the_node_watch_follows_the_primary_address_and_deletion() {
    let server = FakeApiServer::start().await;
    let with_addresses = |mut node: Value| {
        node["status"]["addresses"] = json!([
            { "type": "Hostname", "address": NODE_NAME },
            { "type": "ExternalIP", "address": "203.0.113.7" },
            { "type": "InternalIP", "address": "2001:db8::1" },
            // Leading zeros, read as kube-proxy reads them (decimal): 198.18.0.1.
            { "type": "InternalIP", "address": "198.018.000.001" },
        ]);
        node
    };
    seed(&server);
    server.edit(|cluster| cluster.apply(Kind::Node, with_addresses(node(NODE_NAME, "zone-a"))));
    let mut source = RunningSource::start(&server).await;
    let node_ip = "198.18.0.1".parse().ok();
    let synced = source
        .wait_for("the Node's primary address", |s| {
            s.synced && s.model.node_state().primary_ipv4 == node_ip
        })
        .await;
    assert_eq!(
        synced.model.node_state().primary_ipv6,
        "2001:db8::1".parse().ok()
    );
    assert!(!synced.model.node_state().being_deleted);

    let mut tainted = with_addresses(node(NODE_NAME, "zone-a"));
    tainted["spec"]["taints"] = json!([
        { "key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule" },
        { "key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule" },
    ]);
    server.edit(|cluster| cluster.apply(Kind::Node, tainted));
    source
        .wait_for("the autoscaler's taint", |s| {
            s.model.node_state().being_deleted
        })
        .await;

    server.edit(|cluster| cluster.apply(Kind::Node, with_addresses(node(NODE_NAME, "zone-a"))));
    source
        .wait_for("the taint removed", |s| !s.model.node_state().being_deleted)
        .await;

    let mut deleting = with_addresses(node(NODE_NAME, "zone-a"));
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    server.edit(|cluster| cluster.apply(Kind::Node, deleting));
    let marked = source
        .wait_for("the deletion timestamp", |s| {
            s.model.node_state().being_deleted
        })
        .await;

    server.edit(|cluster| cluster.delete(Kind::Node, NODE_NAME));
    let deleted = source
        .wait_for("the Node's deletion", |s| s.model.node_labels().is_empty())
        .await;
    assert_eq!(deleted.model.node_state(), marked.model.node_state());
}

/// The model counts as synced only once every kind has listed: a Node list refused for
/// lack of RBAC keeps the source unsynced, and is retried with backoff until it works.
#[tokio::test]
async fn the_source_is_synced_only_when_every_kind_has_listed() {
    let server = FakeApiServer::start().await;
    seed(&server);
    server.forbid(Kind::Node, true);
    let mut source = RunningSource::start(&server).await;

    let partial = source
        .wait_for("the Service and EndpointSlice lists", |s| {
            !s.slice_names().is_empty() && !s.service_names().is_empty()
        })
        .await;
    assert!(!partial.synced);
    server_until(&server, "a retried Node list", |server| {
        server.requests_of(Kind::Node, false).len() >= 2
    })
    .await;
    assert!(!source.snapshots.borrow().synced);

    server.forbid(Kind::Node, false);
    let synced = source.synced().await;
    assert_eq!(synced.zone(), Some("zone-a"));
    assert_eq!(synced.frontends().len(), 1);
}

/// Every way the API server can fail — gone (connections refused, old ones broken, and
/// the history compacted meanwhile, so the return is a 410 and a relist), stalled (requests
/// and watch events held back), answering 500 or 503, answering garbage — keeps the model
/// at its last good state while it lasts, and loses nothing: once the server is back, the
/// model holds exactly what changed meanwhile.
#[tokio::test]
async fn outages_keep_the_last_good_state_and_lose_nothing() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let mut source = RunningSource::start(&server).await;
    source.synced().await;
    let outages = [
        Outage::Down,
        Outage::Stalled,
        Outage::Failing(500),
        Outage::Failing(503),
        Outage::Garbage,
    ];
    for (round, outage) in outages.into_iter().enumerate() {
        all_watching(&server).await;
        let before = source.snapshots.borrow().clone();
        let requests_before = server.requests().len();
        server.outage(outage);
        // What changes while the server is out: a new endpoint replaces an old one, a
        // Service appears and the previous round's goes.
        let endpoint = format!("198.18.2.{round}");
        let added = format!("round-{round}");
        let added_ip = format!("198.18.100.{}", 50 + round);
        server.edit(|cluster| {
            cluster.apply(
                Kind::EndpointSlice,
                slice("frontend-a", "frontend", &[(&endpoint, true)]),
            );
            cluster.apply(Kind::Service, service(&added, &added_ip, &[80]));
            if round > 0 {
                cluster.delete(Kind::Service, &format!("web/round-{}", round - 1));
            }
            if outage == Outage::Down {
                cluster.compact();
            }
        });
        if matches!(outage, Outage::Down | Outage::Stalled) {
            // Refused connections never reach the server, and during a stall nobody asks
            // (the open watches just go quiet): give the watchers time to try.
            tokio::time::sleep(Duration::from_secs(2)).await;
        } else {
            // Every watcher met the outage at least once.
            server_until(&server, &format!("requests during {outage:?}"), |server| {
                Kind::ALL.into_iter().all(|kind| {
                    server.requests()[requests_before..]
                        .iter()
                        .any(|request| request.kind == kind && request.outage == Some(outage))
                })
            })
            .await;
        }
        let during = source.snapshots.borrow().clone();
        assert_eq!(during.frontends(), before.frontends(), "{outage:?}");

        server.restore();
        let expected = frontends(&[
            (
                "198.18.100.10:80/tcp",
                &["198.18.1.2:8080", &format!("{endpoint}:8080")],
            ),
            (&format!("{added_ip}:80/tcp"), &[]),
        ]);
        let caught_up = source
            .wait_for(&format!("the changes made during {outage:?}"), |s| {
                s.frontends() == expected
            })
            .await;
        assert_eq!(
            caught_up.service_names(),
            ["web/frontend", &format!("web/{added}")]
        );
        if outage == Outage::Down {
            // The history was compacted while the server was gone: every watcher relists.
            server_until(&server, "every watcher relisting", |server| {
                let relists = server.requests()[requests_before..]
                    .iter()
                    .filter(|request| !request.watch)
                    .map(|request| request.kind)
                    .collect::<BTreeSet<_>>();
                relists == Kind::ALL.into()
            })
            .await;
        }
    }
}

/// A partition during which the server restarted: the requests and watches that were
/// open never hear from it again, and no reset reaches the client until it sends. Only
/// the client's read timeout ends them ([`API_READ_TIMEOUT`], shortened here); the source
/// then asks again and catches up.
#[tokio::test]
async fn silent_dead_connections_end_with_the_read_timeout() {
    let server = FakeApiServer::start().await;
    seed(&server);
    let kubeconfig = TempFile::new("kubeconfig", &kubeconfig_for(server.url()));
    let config = ApiServer::Kubeconfig(kubeconfig.0.clone())
        .config()
        .await
        .unwrap();
    assert_eq!(config.read_timeout, Some(API_READ_TIMEOUT));
    assert!(config.reset_reader_on_write);

    let mut source = RunningSource::start_with(&server, |config| {
        config.read_timeout = Some(Duration::from_secs(2));
    })
    .await;
    source.synced().await;
    all_watching(&server).await;
    server.outage(Outage::Blackhole);
    server.edit(|cluster| {
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-c", "frontend", &[("198.18.1.3", true)]),
        )
    });
    // Watches time out and ask again, into the blackhole.
    let requests_before = server.requests().len();
    server_until(&server, "a request into the blackhole", |server| {
        server.requests()[requests_before..]
            .iter()
            .any(|request| request.outage == Some(Outage::Blackhole))
    })
    .await;
    server.restore();
    let expected = frontends(&[(
        "198.18.100.10:80/tcp",
        &["198.18.1.1:8080", "198.18.1.2:8080", "198.18.1.3:8080"],
    )]);
    source
        .wait_for("the change made during the blackhole", |s| {
            s.frontends() == expected
        })
        .await;
}

/// What the source refused so far and the planner reports, for the hostile catalogue.
fn reported(snapshot: &Snapshot) -> Vec<proxy_lab::hostile::Reported> {
    let node = NodeFacts {
        node_name: NODE_NAME.to_owned(),
        ..NodeFacts::default()
    };
    let mut model = snapshot.model.clone();
    let planned = plan::plan(&model, &node);
    (model.take_changes().rejected.iter())
        .chain(&planned.problems)
        .map(|problem| proxy_lab::hostile::Reported {
            kind: problem.kind.as_str().to_owned(),
            reason: problem.reason.to_owned(),
            message: problem.message.clone(),
        })
        .collect()
}

/// Issue 14: the hostile catalogue through the API server (which a real one would have
/// refused mostly; a broken or impostor one would not): each object refused or skipped
/// exactly as the manifests source does, with its kind, reason and name, and the good
/// Service planned as if they were not there. A good slice that turns invalid by a watch
/// event keeps its last good version, also across a relist.
#[tokio::test]
async fn hostile_objects_are_refused_as_in_manifests_and_the_last_good_versions_stay() {
    use proxy_lab::hostile;

    let server = FakeApiServer::start().await;
    seed(&server);
    let cases = hostile::hostile_objects();
    server.edit(|cluster| {
        for object in cases.iter().flat_map(|case| case.objects.iter()) {
            let kind = if object["kind"] == "Service" {
                Kind::Service
            } else {
                Kind::EndpointSlice
            };
            cluster.apply(kind, object.clone());
        }
    });
    let mut source = RunningSource::start(&server).await;
    let synced = source.synced().await;
    let present = |object: &Value| {
        let key = format!(
            "{}/{}",
            object["metadata"]["namespace"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap()
        );
        if object["kind"] == "Service" {
            synced.service_names().contains(&key)
        } else {
            synced.slice_names().contains(&key)
        }
    };
    hostile::check_outcomes(&cases, &reported(&synced), present).unwrap();
    let good = frontends(&[(
        "198.18.100.10:80/tcp",
        &["198.18.1.1:8080", "198.18.1.2:8080"],
    )]);
    let planned = synced.frontends();
    assert_eq!(
        planned["198.18.100.10:80/tcp"],
        good["198.18.100.10:80/tcp"]
    );

    // A good slice turns invalid: refused, its last good version stays.
    server.edit(|cluster| {
        cluster.apply(
            Kind::EndpointSlice,
            slice("frontend-b", "frontend", &[("198.18.1.999", true)]),
        )
    });
    let refusals = |snapshot: &Snapshot| {
        (reported(snapshot).iter())
            .filter(|problem| {
                problem.message.contains("web/frontend-b")
                    && problem.message.contains("keeping its last good version")
            })
            .count()
    };
    let after = (source.wait_for("the refusal", |snapshot| refusals(snapshot) == 1)).await;
    assert_eq!(
        after.frontends()["198.18.100.10:80/tcp"],
        good["198.18.100.10:80/tcp"]
    );

    // A relist (history compacted) meets it again, and keeps the last good version too.
    server.expire_watches(|_| {});
    let after_relist = (source.wait_for("the relist", |snapshot| refusals(snapshot) == 2)).await;
    assert_eq!(
        after_relist.frontends()["198.18.100.10:80/tcp"],
        good["198.18.100.10:80/tcp"],
        "{}",
        after_relist.summary()
    );
}
