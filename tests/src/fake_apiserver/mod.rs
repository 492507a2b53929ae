//! A test API server: the part of kube-apiserver's list/watch protocol that watchers use,
//! over plain HTTP, for Services, EndpointSlices and Nodes (cluster-wide). It serves on
//! 127.0.0.1 of the calling namespace, or of a lab node's ([`FakeApiServer::start_in`]), so
//! the real daemon there can watch it.
//!
//! Like the real one it counts one resourceVersion for everything (etcd's revision), serves
//! lists at the current version, replays the history after a watch's resourceVersion,
//! turns objects entering or leaving a watch's selector into ADDED / DELETED as the watch
//! cache does, sends BOOKMARKs only to watches that asked for them, and answers a watch
//! from a compacted resourceVersion with 410 Gone. Tests change objects, end or expire
//! watches and compact the history through it, put it through [`Outage`]s (down, stalled,
//! failing, answering garbage), and read back every request it received.

mod gate;
mod selector;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::manifest::Manifest;
use crate::netns::Netns;
use gate::{Binding, GatedListener, Power};
use selector::Filter;

/// The kinds the daemon watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

    /// The cluster-wide collection path (what `Api::all` requests).
    fn path(self) -> &'static str {
        match self {
            Kind::Service => "/api/v1/services",
            Kind::EndpointSlice => "/apis/discovery.k8s.io/v1/endpointslices",
            Kind::Node => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind an object names in its `kind` field.
    fn of(object: &Value) -> Self {
        let name = object["kind"].as_str().unwrap_or_default();
        Kind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .unwrap_or_else(|| panic!("the test server holds no {name:?}"))
    }
}

/// How a watch from a compacted resourceVersion is refused.
#[derive(Clone, Copy, Debug, Default)]
pub enum GoneResponse {
    /// HTTP 200, then an ERROR event carrying a 410 Status: what kube-apiserver does.
    #[default]
    ErrorEvent,
    /// HTTP 410 with the Status as body: what some proxies in front of it do.
    HttpStatus,
}

/// How open watches end.
#[derive(Clone, Copy, Debug)]
pub enum Close {
    /// The response ends properly, as when its timeoutSeconds expire.
    Clean,
    /// The connection breaks mid-response (no final chunk), as when a server dies.
    Abort,
}

/// How the server fails, until [`FakeApiServer::restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// The server is gone: nothing listens (connects are refused), and every connection
    /// made before breaks at its next read or write.
    Down,
    /// Connections are accepted but requests are not answered, and open watches deliver
    /// nothing (a network partition, or a server stuck on its storage). On restore the
    /// waiting requests are answered and the watches deliver what they held back.
    Stalled,
    /// Every request gets this HTTP status with a `Status` body (500: a broken server, 503:
    /// one shedding load). Open watches break.
    Failing(u16),
    /// Every request gets 200 with a body that is not JSON (a misconfigured proxy in
    /// front of the server); open watches get a line of it, then break.
    Garbage,
    /// Like `Stalled`, but what is held is lost: after restore, the requests that waited
    /// are never answered and the watches that were open never deliver again, their
    /// connections left open and silent — a partition during which the server restarted.
    /// Only a timeout of the client's ends them.
    Blackhole,
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: Kind,
    pub watch: bool,
    pub query: BTreeMap<String, String>,
    /// The outage in force when the request arrived.
    pub outage: Option<Outage>,
}

impl Request {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }
}

/// The server; it stops when dropped.
pub struct FakeApiServer {
    url: String,
    cluster: Arc<Mutex<Cluster>>,
    power: Arc<Power>,
    /// Whether requests and open watches are held back (stalled, blackholed).
    hold: watch::Sender<Hold>,
    serving: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

/// What every request handler shares.
#[derive(Clone)]
struct Shared {
    cluster: Arc<Mutex<Cluster>>,
    hold: watch::Receiver<Hold>,
}

/// Whether requests and watch lines are held back, and which of the held ones are lost.
#[derive(Clone, Copy, Debug, Default)]
struct Hold {
    held: bool,
    /// Counts the holds; what is held during hold `n` is lost if `n <= lost_through`.
    epoch: u64,
    lost_through: u64,
}

impl Hold {
    /// The outage `ended` is over: what it held goes on, or, after a blackhole, is lost.
    fn end(&mut self, ended: Option<Outage>) {
        if ended == Some(Outage::Blackhole) {
            self.lost_through = self.epoch;
        }
        self.held = false;
    }
}

/// Waits while the server holds things back. Something held during a hold that turned out
/// a blackhole waits forever (until the client gives up on it).
async fn released(hold: &mut watch::Receiver<Hold>) {
    let held_in = {
        let now = *hold.borrow_and_update();
        now.held.then_some(now.epoch)
    };
    let Ok(after) = hold.wait_for(|hold| !hold.held).await.map(|hold| *hold) else {
        return std::future::pending().await;
    };
    if held_in.is_some_and(|epoch| epoch <= after.lost_through) {
        std::future::pending::<()>().await;
    }
}

impl FakeApiServer {
    /// Serves on 127.0.0.1 (a free port) of the calling thread's namespace. Must be called
    /// inside a tokio runtime, which runs the server.
    pub async fn start() -> Self {
        Self::serve(Binding {
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            netns: None,
        })
    }

    /// Serves on 127.0.0.1 (a free port) of `ns`, where a daemon of that namespace reaches
    /// it. Must be called inside a tokio runtime, which runs the server.
    pub fn start_in(ns: &Netns) -> Self {
        Self::serve(Binding {
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            netns: Some(ns.path()),
        })
    }

    fn serve(binding: Binding) -> Self {
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let hold = watch::Sender::new(Hold::default());
        let power = Power::new();
        let mut router = Router::new();
        for kind in Kind::ALL {
            let handler =
                move |State(shared): State<Shared>,
                      Query(query): Query<BTreeMap<String, String>>| {
                    handle(kind, shared, query)
                };
            router = router.route(kind.path(), get(handler));
        }
        let listener = GatedListener::bind(binding, &power).expect("binding the test API server");
        let url = format!("http://{}", listener.address());
        let router = router.with_state(Shared {
            cluster: cluster.clone(),
            hold: hold.subscribe(),
        });
        let serving = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("serving the test API server");
        });
        FakeApiServer {
            url,
            cluster,
            power,
            hold,
            serving,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Changes objects; open watches see the changes as they happen.
    pub fn edit<T>(&self, change: impl FnOnce(&mut Cluster) -> T) -> T {
        change(&mut self.lock())
    }

    /// Ends every open watch, then changes objects: the watchers miss the changes and learn
    /// of them when they resume (or relist, if `change` compacts).
    pub fn disconnect<T>(&self, close: Close, change: impl FnOnce(&mut Cluster) -> T) -> T {
        let mut cluster = self.lock();
        for watch in cluster.watches.drain(..) {
            if let Close::Abort = close {
                // Ignored if the client has gone already.
                let _ = watch.frames.send(Frame::Abort);
            }
        }
        change(&mut cluster)
    }

    /// Sends an ERROR event with a 410 Status on every open watch and ends it, as
    /// kube-apiserver does when a watcher falls too far behind; then changes objects and
    /// compacts, so that only a relist can find the changes.
    pub fn expire_watches(&self, change: impl FnOnce(&mut Cluster)) {
        let mut cluster = self.lock();
        let line = watch_line("ERROR", gone_status(cluster.revision));
        for watch in cluster.watches.drain(..) {
            let _ = watch.frames.send(Frame::Line(line.clone()));
        }
        change(&mut cluster);
        cluster.compact();
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch of `kind` that
    /// asked for bookmarks.
    pub fn bookmark(&self, kind: Kind) {
        let mut cluster = self.lock();
        let line = watch_line(
            "BOOKMARK",
            json!({
                "kind": kind.name(),
                "apiVersion": kind.api_version(),
                "metadata": { "resourceVersion": cluster.revision.to_string() },
            }),
        );
        cluster.watches.retain(|watch| {
            watch.kind != kind
                || !watch.bookmarks
                || watch.frames.send(Frame::Line(line.clone())).is_ok()
        });
    }

    pub fn set_gone_response(&self, response: GoneResponse) {
        self.lock().gone_response = response;
    }

    /// Refuses (or, with `false`, serves again) every request for `kind` with 403, as when
    /// the ServiceAccount lacks the RBAC rule.
    pub fn forbid(&self, kind: Kind, forbidden: bool) {
        let mut cluster = self.lock();
        if forbidden {
            cluster.forbidden.insert(kind);
        } else {
            cluster.forbidden.remove(&kind);
        }
    }

    /// Starts an outage, or changes the one in force (requests held by a stall are then
    /// answered the new way). Objects can still be changed meanwhile: watchers learn of
    /// the changes after [`restore`](Self::restore).
    pub fn outage(&self, outage: Outage) {
        let mut cluster = self.lock();
        let ended = cluster.outage.replace(outage);
        match outage {
            Outage::Down | Outage::Failing(_) => break_watches(&mut cluster, None),
            Outage::Stalled => {}
            Outage::Garbage => break_watches(&mut cluster, Some(GARBAGE)),
            Outage::Blackhole => {
                // Kept, never written to and never closed: their clients hear nothing more.
                let watches = std::mem::take(&mut cluster.watches);
                cluster.silenced.extend(watches);
            }
        }
        self.power.set_up(outage != Outage::Down);
        let holds = matches!(outage, Outage::Stalled | Outage::Blackhole);
        self.hold.send_modify(|hold| {
            hold.end(ended);
            if holds {
                hold.epoch += 1;
                hold.held = true;
            }
        });
    }

    /// Ends the outage: the server listens and answers again, and what a stall held back
    /// is delivered.
    pub fn restore(&self) {
        let ended = self.lock().outage.take();
        self.power.set_up(true);
        self.hold.send_modify(|hold| hold.end(ended));
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// The requests for one kind, lists or watches.
    pub fn requests_of(&self, kind: Kind, watch: bool) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|request| request.kind == kind && request.watch == watch)
            .collect()
    }

    /// How many watches are open now.
    pub fn open_watches(&self) -> usize {
        let mut cluster = self.lock();
        cluster.watches.retain(|watch| !watch.frames.is_closed());
        cluster.watches.len()
    }

    /// Waits until `done` holds, checking every 5 ms. The caller bounds the wait.
    pub async fn until(&self, done: impl Fn(&FakeApiServer) -> bool) {
        while !done(self) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Cluster> {
        self.cluster.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A test API server in a lab namespace together with the runtime that runs it, for callers
/// without a runtime of their own (lab tests, the benchmarks). Dereferences to the server;
/// both stop when it is dropped.
pub struct ApiServerInNetns {
    server: FakeApiServer,
    // Dropped after the server, whose task it runs.
    _runtime: tokio::runtime::Runtime,
}

impl ApiServerInNetns {
    /// Serves on 127.0.0.1 of `ns` (see [`FakeApiServer::start_in`]).
    pub fn start(ns: &Netns) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let server = {
            let _context = runtime.enter();
            FakeApiServer::start_in(ns)
        };
        Ok(ApiServerInNetns {
            server,
            _runtime: runtime,
        })
    }
}

impl std::ops::Deref for ApiServerInNetns {
    type Target = FakeApiServer;

    fn deref(&self) -> &FakeApiServer {
        &self.server
    }
}

/// The stored objects, their history and the open watches.
#[derive(Default)]
pub struct Cluster {
    /// The resourceVersion of the last change.
    revision: u64,
    objects: BTreeMap<(Kind, String), Value>,
    history: Vec<Change>,
    /// A watch from a resourceVersion before this one gets 410 Gone.
    compacted_before: u64,
    gone_response: GoneResponse,
    watches: Vec<OpenWatch>,
    forbidden: BTreeSet<Kind>,
    outage: Option<Outage>,
    /// Watches cut off by a blackhole: open, silent.
    silenced: Vec<OpenWatch>,
    requests: Vec<Request>,
}

/// One write: the object before and after (`None`: absent).
struct Change {
    kind: Kind,
    revision: u64,
    before: Option<Value>,
    after: Option<Value>,
}

struct OpenWatch {
    kind: Kind,
    filter: Filter,
    bookmarks: bool,
    frames: mpsc::UnboundedSender<Frame>,
}

enum Frame {
    Line(String),
    Abort,
}

impl Cluster {
    /// Creates or replaces an object (ADDED or MODIFIED); returns its resourceVersion.
    pub fn apply(&mut self, kind: Kind, mut object: Value) -> u64 {
        let key = object_key(kind, &object);
        self.revision += 1;
        object["metadata"]["resourceVersion"] = json!(self.revision.to_string());
        let before = self.objects.insert((kind, key), object.clone());
        self.record(kind, before, Some(object));
        self.revision
    }

    /// Creates or replaces the objects of a lab manifest (a Service and its
    /// EndpointSlice); returns the resourceVersion of the last.
    pub fn apply_manifest(&mut self, manifest: &Manifest) -> u64 {
        let mut revision = self.revision;
        for object in manifest.objects() {
            revision = self.apply(Kind::of(&object), object);
        }
        revision
    }

    /// Deletes the objects of a lab manifest.
    pub fn delete_manifest(&mut self, manifest: &Manifest) {
        for object in manifest.objects() {
            let kind = Kind::of(&object);
            self.delete(kind, &object_key(kind, &object));
        }
    }

    /// Deletes an object (`namespace/name`, or the name of a Node); returns the
    /// resourceVersion of the deletion.
    pub fn delete(&mut self, kind: Kind, key: &str) -> u64 {
        let before = self
            .objects
            .remove(&(kind, key.to_owned()))
            .unwrap_or_else(|| panic!("deleting {} {key}, which does not exist", kind.name()));
        self.revision += 1;
        self.record(kind, Some(before), None);
        self.revision
    }

    /// Forgets the history: a watch from any resourceVersion before now gets 410 Gone.
    pub fn compact(&mut self) {
        self.compacted_before = self.revision;
        self.history.clear();
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    fn record(&mut self, kind: Kind, before: Option<Value>, after: Option<Value>) {
        let change = Change {
            kind,
            revision: self.revision,
            before,
            after,
        };
        self.watches
            .retain(|watch| match watch_event(watch, &change) {
                Some(line) => watch.frames.send(Frame::Line(line)).is_ok(),
                None => !watch.frames.is_closed(),
            });
        self.history.push(change);
    }
}

/// `namespace/name` (namespaced kinds) or `name`, from an object's metadata.
fn object_key(kind: Kind, object: &Value) -> String {
    let name = object["metadata"]["name"]
        .as_str()
        .expect("test objects have metadata.name");
    if kind.namespaced() {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .expect("namespaced test objects have metadata.namespace");
        format!("{namespace}/{name}")
    } else {
        name.to_owned()
    }
}

/// The event a watch sees for a change, as the watch cache computes it: an object that
/// starts matching the selector is ADDED, one that stops matching is DELETED (at the
/// change's resourceVersion).
fn watch_event(watch: &OpenWatch, change: &Change) -> Option<String> {
    if watch.kind != change.kind {
        return None;
    }
    let selected = |object: &Option<Value>| -> Option<Value> {
        object.clone().filter(|object| watch.filter.matches(object))
    };
    let (event_type, object) = match (selected(&change.before), selected(&change.after)) {
        (None, Some(after)) => ("ADDED", after),
        (Some(_), Some(after)) => ("MODIFIED", after),
        (Some(before), None) => {
            let mut gone = change.after.clone().unwrap_or(before);
            gone["metadata"]["resourceVersion"] = json!(change.revision.to_string());
            ("DELETED", gone)
        }
        (None, None) => return None,
    };
    Some(watch_line(event_type, with_type_meta(change.kind, object)))
}

fn watch_line(event_type: &str, object: Value) -> String {
    format!("{}\n", json!({ "type": event_type, "object": object }))
}

fn with_type_meta(kind: Kind, mut object: Value) -> Value {
    object["kind"] = json!(kind.name());
    object["apiVersion"] = json!(kind.api_version());
    object
}

fn gone_status(compacted_before: u64) -> Value {
    status(
        StatusCode::GONE,
        "Expired",
        &format!("too old resource version: the oldest available is {compacted_before}"),
    )
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

/// What a broken proxy might answer instead of JSON.
const GARBAGE: &str = "<html><body>502 Bad Gateway \u{fffd}\u{0}{\"kind\":</body></html>\n";

/// Ends every open watch, after a last `line` if one is given.
fn break_watches(cluster: &mut Cluster, line: Option<&str>) {
    for watch in cluster.watches.drain(..) {
        if let Some(line) = line {
            let _ = watch.frames.send(Frame::Line(line.to_owned()));
        }
        let _ = watch.frames.send(Frame::Abort);
    }
}

/// Records the request, holds it while the server is stalled, then answers it.
async fn handle(kind: Kind, shared: Shared, query: BTreeMap<String, String>) -> Response {
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let request = {
        let mut cluster = shared
            .cluster
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let request = Request {
            kind,
            watch,
            query,
            outage: cluster.outage,
        };
        cluster.requests.push(request.clone());
        request
    };
    let mut hold = shared.hold.clone();
    released(&mut hold).await;
    let mut cluster = shared
        .cluster
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    serve(&mut cluster, request, shared.hold.clone())
}

fn serve(cluster: &mut Cluster, request: Request, hold: watch::Receiver<Hold>) -> Response {
    let kind = request.kind;
    match cluster.outage {
        Some(Outage::Failing(code)) => {
            let code = StatusCode::from_u16(code).expect("a valid HTTP status");
            let reason = code.canonical_reason().unwrap_or("Failure");
            return json_response(code, &status(code, reason, "the test server is failing"));
        }
        Some(Outage::Garbage) => {
            return ([(header::CONTENT_TYPE, "application/json")], GARBAGE).into_response();
        }
        // A request of a connection the gate has not cut yet.
        Some(Outage::Down) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some(Outage::Stalled | Outage::Blackhole) | None => {}
    }
    if cluster.forbidden.contains(&kind) {
        let message = format!("{} is forbidden", kind.path());
        return json_response(
            StatusCode::FORBIDDEN,
            &status(StatusCode::FORBIDDEN, "Forbidden", &message),
        );
    }
    let filter = Filter::parse(
        request.param("labelSelector"),
        request.param("fieldSelector"),
    );
    if request.watch {
        start_watch(cluster, kind, filter, &request, hold)
    } else {
        list(cluster, kind, &filter)
    }
}

/// A list at the current resourceVersion. Items carry no kind or apiVersion, as in
/// kube-apiserver's lists; `limit` is ignored, as the watch cache does for
/// resourceVersion=0.
fn list(cluster: &Cluster, kind: Kind, filter: &Filter) -> Response {
    let items: Vec<&Value> = cluster
        .objects
        .iter()
        .filter(|((object_kind, _), object)| *object_kind == kind && filter.matches(object))
        .map(|(_, object)| object)
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", kind.name()),
            "apiVersion": kind.api_version(),
            "metadata": { "resourceVersion": cluster.revision.to_string() },
            "items": items,
        }),
    )
}

/// A watch: the history after its resourceVersion, then changes as they happen.
fn start_watch(
    cluster: &mut Cluster,
    kind: Kind,
    filter: Filter,
    request: &Request,
    hold: watch::Receiver<Hold>,
) -> Response {
    let (frames, lines) = mpsc::unbounded_channel();
    let watch = OpenWatch {
        kind,
        filter,
        bookmarks: request.param("allowWatchBookmarks") == Some("true"),
        frames,
    };
    let from: u64 = match request.param("resourceVersion") {
        Some(version) => version.parse().expect("a numeric resourceVersion"),
        None => panic!("watchers always resume from a resourceVersion"),
    };
    if from < cluster.compacted_before {
        let gone = gone_status(cluster.compacted_before);
        return match cluster.gone_response {
            GoneResponse::HttpStatus => json_response(StatusCode::GONE, &gone),
            GoneResponse::ErrorEvent => {
                let _ = watch.frames.send(Frame::Line(watch_line("ERROR", gone)));
                // The response ends after the error: `watch` is dropped here.
                streaming_response(lines, hold)
            }
        };
    }
    for change in cluster
        .history
        .iter()
        .filter(|change| change.revision > from)
    {
        if let Some(line) = watch_event(&watch, change) {
            let _ = watch.frames.send(Frame::Line(line));
        }
    }
    cluster.watches.push(watch);
    streaming_response(lines, hold)
}

/// A chunked response of watch lines; an `Abort` frame breaks the connection. While the
/// server holds things back nothing is sent: the lines wait in the channel.
fn streaming_response(
    lines: mpsc::UnboundedReceiver<Frame>,
    hold: watch::Receiver<Hold>,
) -> Response {
    let chunks = futures::stream::unfold((lines, hold), |(mut lines, mut hold)| async move {
        let frame = lines.recv().await?;
        released(&mut hold).await;
        let chunk = match frame {
            Frame::Line(line) => Ok(Bytes::from(line)),
            Frame::Abort => Err(std::io::Error::other("connection aborted by the test")),
        };
        Some((chunk, (lines, hold)))
    })
    .boxed();
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(chunks),
    )
        .into_response()
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
