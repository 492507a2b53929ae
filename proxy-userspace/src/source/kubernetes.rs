//! Kubernetes source: Services, EndpointSlices and this node's Node, followed on the API
//! server with kube-runtime watchers (what client-go calls reflectors).
//!
//! Each watcher lists, then watches from the list's resourceVersion. A watch that ends or
//! breaks resumes from the last resourceVersion seen, which bookmarks keep fresh while
//! nothing we select changes; a 410 Gone (the version was compacted away) restarts with a
//! relist (at once: the server is answering again), after which the listed objects replace
//! the old ones in the model. Errors back off exponentially (kube-runtime's client-go-like
//! default, 0.8 s up to 30 s, jittered up to twice that); a response silent for
//! [`API_READ_TIMEOUT`] counts as an error.
//!
//! Like kube-proxy, Services and EndpointSlices are selected with
//! `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`: objects another
//! proxy owns and headless Services never reach this node. The Node is selected by
//! `metadata.name`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ResourceExt};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{Expression, Selector};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::health::TO_BE_DELETED_TAINT;
use crate::model::address::parse_ip_sloppy;
use crate::model::{
    Model, ModelError, NodeState, ObjectKey, Problem, ProblemKind, ServiceRecord, SliceEntry,
};
use crate::plan::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::source::validate::{validate_endpoint_slice, validate_service};

/// How to reach the API server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiServer {
    /// From inside a pod: `KUBERNETES_SERVICE_HOST`/`_PORT` and the ServiceAccount's token.
    InCluster,
    /// The current context of a kubeconfig file.
    Kubeconfig(PathBuf),
}

/// How long a response may send nothing before the request fails and is retried. kube-rs
/// sets no limit, so a list whose connection died silently (a partition during which the
/// server restarted: no reset reaches us until we send) would wait forever, and the daemon
/// would never catch up. Above kube-apiserver's 60 s limit on a list and its roughly
/// once-a-minute bookmarks on a quiet watch, so a healthy server never meets it; a watch
/// that does is resumed from its resourceVersion, without a relist.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(120);

impl ApiServer {
    pub async fn client(&self) -> Result<Client> {
        Client::try_from(self.config().await?).context("building the Kubernetes client")
    }

    /// The client configuration: this server's, with [`API_READ_TIMEOUT`] counted from
    /// each request sent.
    pub async fn config(&self) -> Result<kube::Config> {
        let mut config = match self {
            ApiServer::InCluster => {
                kube::Config::incluster().context("loading the in-cluster configuration")?
            }
            ApiServer::Kubeconfig(path) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("using kubeconfig {}", path.display()))?
            }
        };
        config.read_timeout = Some(API_READ_TIMEOUT);
        config.reset_reader_on_write = true;
        Ok(config)
    }
}

impl std::fmt::Display for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiServer::InCluster => f.write_str("in-cluster"),
            ApiServer::Kubeconfig(path) => write!(f, "kubeconfig {}", path.display()),
        }
    }
}

/// kube-proxy's informer selector: not owned by another proxy, not headless.
pub fn proxied_objects_selector() -> Selector {
    [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL]
        .into_iter()
        .map(|label| Expression::DoesNotExist(label.to_owned()))
        .collect()
}

/// The watchers of one API server, merged into one stream of model changes.
pub struct KubernetesSource {
    events: SelectAll<BoxStream<'static, Observed>>,
    services: Reflector<Service>,
    endpoint_slices: Reflector<EndpointSlice>,
    node: Reflector<Node>,
}

/// One watcher's output, tagged with its kind so the three can share a stream (boxed: the
/// kinds differ in size by kilobytes).
enum Observed {
    Service(Box<watcher::Result<Event<Service>>>),
    EndpointSlice(Box<watcher::Result<Event<EndpointSlice>>>),
    Node(Box<watcher::Result<Event<Node>>>),
}

impl KubernetesSource {
    /// Starts nothing yet: the watchers run as [`changed`](Self::changed) polls them.
    pub fn new(client: Client, node_name: &str) -> Self {
        let proxied = from_watch_cache().labels_from(&proxied_objects_selector());
        let this_node = from_watch_cache().fields(&format!("metadata.name={node_name}"));
        let events = futures::stream::select_all([
            watch(Api::all(client.clone()), proxied.clone())
                .map(|event| Observed::Service(Box::new(event)))
                .boxed(),
            watch(Api::all(client.clone()), proxied)
                .map(|event| Observed::EndpointSlice(Box::new(event)))
                .boxed(),
            watch(Api::all(client), this_node)
                .map(|event| Observed::Node(Box::new(event)))
                .boxed(),
        ]);
        KubernetesSource {
            events,
            services: Reflector::default(),
            endpoint_slices: Reflector::default(),
            node: Reflector::default(),
        }
    }

    /// Whether every watcher has completed its first list. Until then the model is partial,
    /// and programming it would delete the frontends a restarted daemon left pinned.
    pub fn has_synced(&self) -> bool {
        self.services.listed && self.endpoint_slices.listed && self.node.listed
    }

    /// Waits until a watch event changes `model`, and applies it. Cancel safe: every event
    /// is applied as soon as it arrives, so dropping the future loses nothing.
    pub async fn changed(&mut self, model: &mut Model) {
        loop {
            let was_synced = self.has_synced();
            let Some(observed) = self.events.next().await else {
                // kube-runtime watchers retry forever; never expected, but never spin.
                return std::future::pending().await;
            };
            let changed = match observed {
                Observed::Service(event) => self.services.handle(*event, model),
                Observed::EndpointSlice(event) => self.endpoint_slices.handle(*event, model),
                Observed::Node(event) => self.node.handle(*event, model),
            };
            if !was_synced && self.has_synced() {
                info!(
                    services = model.services().count(),
                    endpoint_slices = model.endpoint_slices().count(),
                    node_labels = model.node_labels().len(),
                    "initial lists complete"
                );
            }
            if changed {
                return;
            }
        }
    }
}

/// Lists served from the API server's watch cache (resourceVersion=0), as client-go's
/// informers do: every node lists at start, and quorum reads from each would all go to etcd.
/// The cache serves such a list whole; kube-rs would drop resourceVersion=0 from a paged
/// list, so there is no page size.
fn from_watch_cache() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default()
    }
    .any_semantic()
}

/// How often a watcher may relist at once after a 410 Gone instead of backing off first.
/// A server that expires versions faster than this (or a proxy that answers 410 to
/// everything) gets the backoff, so relists never hammer it.
const PROMPT_RELIST_INTERVAL: Duration = Duration::from_secs(30);

/// A watcher with backoff on errors that relists at once on a 410 Gone.
///
/// The API server reports an expired resourceVersion as a 410 ERROR event on an open watch,
/// which kube-runtime answers with a relist; some servers and proxies answer the watch
/// request itself with HTTP 410, which kube-runtime would retry with the same expired
/// version forever. Restarting the watcher there makes it relist, as client-go does.
///
/// A 410 is typically what a watcher meets when the server returns after an outage that
/// outlasted its history; the server is answering again, so the relist follows at once
/// (at most once per [`PROMPT_RELIST_INTERVAL`]) rather than after one more backoff step,
/// which after minutes of outage is up to a minute (30 s, jittered up to twice that).
fn watch<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = watcher::Result<Event<K>>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let start = move || watcher(api.clone(), config.clone()).boxed();
    let state = (start(), start, None::<Instant>);
    futures::stream::unfold(state, |(mut inner, start, mut prompt_relist)| async move {
        loop {
            let item = inner.next().await?;
            let gone_at_start = matches!(
                &item,
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) if status.code == 410
            );
            let gone = gone_at_start
                || matches!(&item, Err(watcher::Error::WatchError(status)) if status.code == 410);
            if gone_at_start {
                inner = start();
            }
            let prompt = gone
                && prompt_relist.is_none_or(|last| last.elapsed() >= PROMPT_RELIST_INTERVAL);
            if prompt {
                info!(kind = %K::kind(&()), "resourceVersion expired (410 Gone): relisting now");
                prompt_relist = Some(Instant::now());
                continue;
            }
            return Some((item, (inner, start, prompt_relist)));
        }
    })
    .default_backoff()
}

/// An object the source refuses: why, and which, when it has a name (its last good version
/// then stays, as kube-proxy's caches keep theirs).
struct Refused {
    key: Option<ObjectKey>,
    problem: Problem,
}

impl Refused {
    fn unnamed(error: ModelError, kind: ProblemKind) -> Self {
        Refused {
            key: None,
            problem: error.problem(kind),
        }
    }

    /// `key` failed validation for `reason`; `kept` says whether a last good version stays.
    fn invalid(key: ObjectKey, reason: String, kind: ProblemKind, kept: bool) -> Self {
        let keeping = if kept {
            "; keeping its last good version"
        } else {
            ""
        };
        let problem = Problem::new(kind, "invalid", format!("{key}: {reason}{keeping}"));
        Refused {
            key: Some(key),
            problem,
        }
    }
}

/// How one watched kind enters the model.
trait Watched: Resource<DynamicType = ()> + Clone + Debug + Send + 'static {
    /// What a relist buffers until it is complete: the interpreted object, never the
    /// whole API object.
    type Entry;
    /// Checks and interprets the object (kube-proxy's change trackers do it as the event
    /// arrives). The API server has checked it already; it is checked again, the same way
    /// as a manifest, so that a broken or hostile object never reaches the planner.
    fn entry(self, model: &mut Model) -> Result<Self::Entry, Refused>;
    /// The model's entry for `key`: the last good version of a refused object, which a
    /// relist keeps.
    fn kept(key: &ObjectKey, model: &Model) -> Option<Self::Entry>;
    /// Adds or replaces the object's entry; whether the model changed.
    fn insert(entry: Self::Entry, model: &mut Model) -> bool;
    /// Removes the object; whether the model changed.
    fn delete(&self, model: &mut Model) -> bool;
    /// Replaces every object of this kind after a (re)list.
    fn replace(entries: Vec<Self::Entry>, model: &mut Model);
    /// What a refusal counts as.
    const PROBLEM_KIND: ProblemKind;
}

impl Watched for Service {
    type Entry = (ObjectKey, ServiceRecord);
    const PROBLEM_KIND: ProblemKind = ProblemKind::Service;

    fn entry(self, model: &mut Model) -> Result<Self::Entry, Refused> {
        let key = ObjectKey::from_metadata(&self.metadata)
            .ok_or_else(|| Refused::unnamed(ModelError::MissingName, Self::PROBLEM_KIND))?;
        if let Err(reason) = validate_service(&self) {
            let kept = model.service(&key).is_some();
            return Err(Refused::invalid(key, reason, Self::PROBLEM_KIND, kept));
        }
        let record = ServiceRecord::from_service(&key, &self);
        Ok((key, record))
    }

    fn kept(key: &ObjectKey, model: &Model) -> Option<Self::Entry> {
        let record = model.service(key)?;
        Some((key.clone(), record.clone()))
    }

    fn insert((key, record): Self::Entry, model: &mut Model) -> bool {
        model.upsert_service(key, record)
    }

    fn delete(&self, model: &mut Model) -> bool {
        ObjectKey::from_metadata(&self.metadata).is_some_and(|key| model.remove_service(&key))
    }

    fn replace(entries: Vec<Self::Entry>, model: &mut Model) {
        model.replace_service_records(entries);
    }
}

impl Watched for EndpointSlice {
    type Entry = SliceEntry;
    const PROBLEM_KIND: ProblemKind = ProblemKind::EndpointSlice;

    /// A slice without its service-name label (or a broken one) is refused like any
    /// invalid object: kube-proxy's EndpointSliceCache ignores such an update too, and the
    /// slice's last good version stays until it is fixed or deleted.
    fn entry(self, model: &mut Model) -> Result<Self::Entry, Refused> {
        let key = ObjectKey::from_metadata(&self.metadata)
            .ok_or_else(|| Refused::unnamed(ModelError::MissingName, Self::PROBLEM_KIND))?;
        if let Err(reason) = validate_endpoint_slice(&self) {
            let kept = model.endpoint_slice(&key).is_some();
            return Err(Refused::invalid(key, reason, Self::PROBLEM_KIND, kept));
        }
        model
            .slice_record(&self)
            .map_err(|error| Refused::unnamed(error, Self::PROBLEM_KIND))
    }

    fn kept(key: &ObjectKey, model: &Model) -> Option<Self::Entry> {
        let record = model.endpoint_slice(key)?;
        Some((key.clone(), record.clone(), None))
    }

    fn insert((key, record, trigger_time): Self::Entry, model: &mut Model) -> bool {
        model.upsert_endpoint_slice(key, record, trigger_time)
    }

    fn delete(&self, model: &mut Model) -> bool {
        ObjectKey::from_metadata(&self.metadata)
            .is_some_and(|key| model.remove_endpoint_slice(&key))
    }

    fn replace(entries: Vec<Self::Entry>, model: &mut Model) {
        model.replace_endpoint_slice_records(entries);
    }
}

/// Of the Node, only what the daemon reads enters the model: its labels (the zone), its
/// primary IPv4 address and whether it is being deleted. Its frequent status updates then
/// leave the model as it was, and cause no sync.
impl Watched for Node {
    type Entry = Node;
    const PROBLEM_KIND: ProblemKind = ProblemKind::File;

    /// One small object: kept whole until its list completes.
    fn entry(self, _model: &mut Model) -> Result<Self::Entry, Refused> {
        Ok(self)
    }

    fn kept(_key: &ObjectKey, _model: &Model) -> Option<Self::Entry> {
        None
    }

    fn insert(node: Self::Entry, model: &mut Model) -> bool {
        let state = node_state(&node);
        let labels_changed = model.set_node_labels(node.metadata.labels.unwrap_or_default());
        model.set_node_state(state) | labels_changed
    }

    /// The labels (the zone) are unknown from now on; the state stays the deleted object's,
    /// as kube-proxy's node handlers sync the final object of a deletion.
    fn delete(&self, model: &mut Model) -> bool {
        let state_changed = model.set_node_state(node_state(self));
        model.set_node_labels(BTreeMap::new()) | state_changed
    }

    fn replace(entries: Vec<Self::Entry>, model: &mut Model) {
        // The field selector matches at most one Node.
        let Some(node) = entries.into_iter().next() else {
            warn!("no Node named like --node-name; its labels stay unknown until it appears");
            // Gone while unwatched: like a deletion seen late, the last state stays.
            model.set_node_labels(BTreeMap::new());
            return;
        };
        Self::insert(node, model);
    }
}

/// What kube-proxy reads from its Node besides the labels: the node IP
/// (`GetNodeHostIPs`: InternalIPs first, then ExternalIPs) and its eligibility for
/// `/healthz` (`SyncNode`: no deletion timestamp, no `ToBeDeletedByClusterAutoscaler` taint).
fn node_state(node: &Node) -> NodeState {
    let addresses = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    // InternalIPs first, then ExternalIPs: the first of each family is its primary.
    let ordered: Vec<IpAddr> = ["InternalIP", "ExternalIP"]
        .into_iter()
        .flat_map(|kind| {
            addresses
                .iter()
                .filter(move |address| address.type_ == kind)
        })
        .filter_map(|address| parse_ip_sloppy(&address.address))
        .collect();
    let primary_ipv4 = ordered.iter().find_map(|address| match address {
        IpAddr::V4(address) => Some(*address),
        IpAddr::V6(_) => None,
    });
    let primary_ipv6 = ordered.iter().find_map(|address| match address {
        IpAddr::V6(address) => Some(*address),
        IpAddr::V4(_) => None,
    });
    let tainted = node
        .spec
        .as_ref()
        .and_then(|spec| spec.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|taint| taint.key == TO_BE_DELETED_TAINT);
    NodeState {
        primary_ipv4,
        primary_ipv6,
        being_deleted: node.metadata.deletion_timestamp.is_some() || tainted,
    }
}

/// Applies one watcher's events to the model, buffering a (re)list until it is complete so
/// that the model never holds half a list.
struct Reflector<K: Watched> {
    /// The interpreted objects of the list in progress, if one is.
    relisting: Option<Vec<K::Entry>>,
    /// Whether a list has completed once.
    listed: bool,
}

impl<K: Watched> Default for Reflector<K> {
    fn default() -> Self {
        Reflector {
            relisting: None,
            listed: false,
        }
    }
}

impl<K: Watched> Reflector<K> {
    /// Whether the model changed.
    fn handle(&mut self, event: watcher::Result<Event<K>>, model: &mut Model) -> bool {
        let kind = K::kind(&());
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                warn!(%kind, %error, "watch failed; retrying with backoff");
                return false;
            }
        };
        match event {
            Event::Init => {
                debug!(%kind, "listing");
                self.relisting = Some(Vec::new());
                false
            }
            Event::InitApply(object) => {
                let entry = match object.entry(model) {
                    Ok(entry) => Some(entry),
                    Err(refused) => {
                        model.reject(refused.problem);
                        (refused.key.as_ref()).and_then(|key| K::kept(key, model))
                    }
                };
                self.relisting.get_or_insert_default().extend(entry);
                false
            }
            Event::InitDone => {
                let entries = self.relisting.take().unwrap_or_default();
                let count = entries.len();
                K::replace(entries, model);
                if self.listed {
                    info!(%kind, count, "relisted");
                } else {
                    debug!(%kind, count, "listed");
                }
                self.listed = true;
                true
            }
            Event::Apply(object) => {
                debug!(%kind, name = %object.name_any(), "applied");
                match object.entry(model) {
                    Ok(entry) => K::insert(entry, model),
                    Err(refused) => {
                        model.reject(refused.problem);
                        true
                    }
                }
            }
            Event::Delete(object) => {
                debug!(%kind, name = %object.name_any(), "deleted");
                object.delete(model)
            }
        }
    }
}
