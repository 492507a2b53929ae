//! Model: the cluster state the planner reads, as compact interpreted records.
//!
//! Sources (the manifests directory, the Kubernetes watchers) feed Services and
//! EndpointSlices in as they change, one object at a time; each is interpreted once into a
//! record ([`ServiceRecord`]: kube-proxy's `ServicePort` info; [`SliceRecord`]: what its
//! `EndpointSliceCache` keeps) and only the record is kept, one copy. Slices are indexed by
//! the Service they belong to (their `kubernetes.io/service-name` label). The model is also
//! the change tracker (kube-proxy's `ServiceChangeTracker` / `EndpointsChangeTracker`): a
//! mutation that changes a record marks its Service dirty, so the planner re-plans only
//! those; one that leaves the record equal (a new resourceVersion, a status the planner
//! ignores) marks nothing. The Kubernetes source also keeps this node's labels here, as
//! kube-proxy does: they carry the zone for topology-aware routing; and its primary
//! address and whether it is being deleted ([`NodeState`]).

pub mod address;
mod changes;
mod endpoint_slice;
mod problem;
pub mod selection;
pub(crate) mod service;

use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use foldhash::{HashMap, HashSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proxy_common::proto;

pub use address::Family;
pub use changes::{LAST_CHANGE_TRIGGER_TIME, ModelChanges, trigger_time};
pub use endpoint_slice::{EndpointRecord, Hints, SERVICE_NAME_LABEL, SlicePort, SliceRecord};
pub use problem::{ModelError, Problem, ProblemKind};
pub use service::{
    DEFAULT_AFFINITY_TIMEOUT, HEADLESS_LABEL, PortRecord, ProxiedService, SERVICE_PROXY_NAME_LABEL,
    ServiceRecord,
};

/// The namespace of an object whose `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` of a namespaced object. Its copies (the model's indexes, the planner's,
/// the sources' bookkeeping) share the strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object; `None` when `metadata.name` is missing or empty. An absent or
    /// empty namespace means [`DEFAULT_NAMESPACE`].
    pub fn from_metadata(metadata: &ObjectMeta) -> Option<Self> {
        let name = metadata.name.as_deref().filter(|name| !name.is_empty())?;
        let namespace = metadata
            .namespace
            .as_deref()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE);
        Some(ObjectKey::new(namespace, name))
    }
}

/// A name as long as Kubernetes allows is shown whole; a longer one (only a hostile or
/// broken object has one, and it is refused) is cut, so a megabyte name can't flood the log.
impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LONGEST: usize = 253;
        let part = |f: &mut fmt::Formatter<'_>, text: &str| match text.char_indices().nth(LONGEST) {
            Some((end, _)) => write!(f, "{}…({} bytes)", &text[..end], text.len()),
            None => f.write_str(text),
        };
        part(f, &self.namespace)?;
        f.write_str("/")?;
        part(f, &self.name)
    }
}

/// Transport protocol of a Service port and its frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number, as stored in the maps.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }

    /// Lowercase name, as kube-proxy uses it in chain hashes.
    pub fn as_str(self) -> &'static str {
        proto::name(self.number())
    }
}

/// What the daemon reads from the Node it runs on, besides its labels (the Kubernetes
/// source only: the default while no Node is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The Node's primary IPv4 address: its first InternalIP, else ExternalIP, of that
    /// family (kube-proxy's node IP, which `--nodeport-addresses primary` stands for).
    pub primary_ipv4: Option<Ipv4Addr>,
    /// The same for IPv6.
    pub primary_ipv6: Option<Ipv6Addr>,
    /// The Node has a deletion timestamp or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint: kube-proxy's `/healthz` answers 503 so that
    /// load balancers drain the node first.
    pub being_deleted: bool,
}

/// Shares the node and zone names that thousands of endpoints repeat.
#[derive(Clone, Debug, Default)]
pub struct Interner(HashSet<Arc<str>>);

impl Interner {
    pub fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        self.0.insert(shared.clone());
        shared
    }
}

/// Service and EndpointSlice records keyed by `namespace/name`, slices also indexed by
/// Service, and what changed since the planner last looked.
#[derive(Clone, Debug, Default)]
pub struct Model {
    services: BTreeMap<ObjectKey, ServiceRecord>,
    endpoint_slices: BTreeMap<ObjectKey, SliceRecord>,
    /// Service key → keys of the slices labelled with its name (same namespace), sorted: a
    /// Service has few, and a vector costs one allocation where a set costs a node.
    slices_by_service: HashMap<ObjectKey, Vec<ObjectKey>>,
    /// The labels of the Node this daemon runs on; empty while no source knows them.
    node_labels: BTreeMap<String, String>,
    /// The rest of what the daemon reads from its Node object.
    node_state: NodeState,
    names: Interner,
    /// What the mutations changed since the last [`take_changes`](Self::take_changes):
    /// recorded where old and new are both at hand, so nobody keeps a copy to diff.
    changes: ModelChanges,
}

impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.services == other.services
            && self.endpoint_slices == other.endpoint_slices
            && self.node_labels == other.node_labels
            && self.node_state == other.node_state
    }
}

impl Model {
    /// Interprets and adds or replaces a Service.
    pub fn insert_service(&mut self, service: Service) -> Result<(), ModelError> {
        let key = ObjectKey::from_metadata(&service.metadata).ok_or(ModelError::MissingName)?;
        let record = ServiceRecord::from_service(&key, &service);
        self.upsert_service(key, record);
        Ok(())
    }

    /// Adds or replaces a Service's record; whether it changed.
    pub fn upsert_service(&mut self, key: ObjectKey, record: ServiceRecord) -> bool {
        match self.services.entry(key) {
            btree_map::Entry::Occupied(mut occupied) => {
                if *occupied.get() == record {
                    return false;
                }
                self.changes.service_changed(occupied.key());
                occupied.insert(record);
            }
            btree_map::Entry::Vacant(vacant) => {
                self.changes.service_changed(vacant.key());
                vacant.insert(record);
            }
        }
        true
    }

    /// Removes a Service; whether it was there.
    pub fn remove_service(&mut self, key: &ObjectKey) -> bool {
        let removed = self.services.remove(key).is_some();
        if removed {
            self.changes.service_changed(key);
        }
        removed
    }

    /// Replaces all Services (a watcher's relist). Objects that can't enter are skipped and
    /// returned as errors; the others are kept.
    pub fn replace_services(
        &mut self,
        services: impl IntoIterator<Item = Service>,
    ) -> Vec<ModelError> {
        let mut errors = Vec::new();
        let records = services.into_iter().filter_map(|service| {
            match ObjectKey::from_metadata(&service.metadata) {
                Some(key) => {
                    let record = ServiceRecord::from_service(&key, &service);
                    Some((key, record))
                }
                None => {
                    errors.push(ModelError::MissingName);
                    None
                }
            }
        });
        let records: Vec<_> = records.collect();
        self.replace_service_records(records);
        errors
    }

    /// Replaces all Services with these records: the ones not among them are removed.
    pub fn replace_service_records(
        &mut self,
        records: impl IntoIterator<Item = (ObjectKey, ServiceRecord)>,
    ) {
        let mut gone: BTreeSet<ObjectKey> = self.services.keys().cloned().collect();
        for (key, record) in records {
            gone.remove(&key);
            self.upsert_service(key, record);
        }
        for key in gone {
            self.remove_service(&key);
        }
    }

    /// Interprets and adds or replaces an EndpointSlice. A slice must name its Service with
    /// the [`SERVICE_NAME_LABEL`] label; one that lost it is removed (it belongs to no
    /// Service any more) and refused.
    pub fn insert_endpoint_slice(&mut self, slice: EndpointSlice) -> Result<(), ModelError> {
        let key = ObjectKey::from_metadata(&slice.metadata).ok_or(ModelError::MissingName)?;
        let Some(record) = SliceRecord::from_slice(&key, &slice, &mut self.names) else {
            self.remove_endpoint_slice(&key);
            return Err(ModelError::MissingServiceNameLabel { slice: key });
        };
        self.upsert_endpoint_slice(key, record, trigger_time(&slice));
        Ok(())
    }

    /// Adds or replaces a slice's record; whether it changed. `trigger_time` is the slice's
    /// [`LAST_CHANGE_TRIGGER_TIME`] (network programming latency starts there).
    pub fn upsert_endpoint_slice(
        &mut self,
        key: ObjectKey,
        mut record: SliceRecord,
        trigger_time: Option<chrono::DateTime<chrono::Utc>>,
    ) -> bool {
        record.share_names(&mut self.names);
        let service = record.service.clone();
        // One lookup: the slice it replaces, if any, is unlinked from its Service here.
        let replaced = match self.endpoint_slices.entry(key.clone()) {
            btree_map::Entry::Occupied(mut occupied) => {
                if *occupied.get() == record {
                    return false;
                }
                Some(occupied.insert(record))
            }
            btree_map::Entry::Vacant(vacant) => {
                vacant.insert(record);
                None
            }
        };
        if let Some(replaced) = replaced {
            unlink_from_service(&mut self.slices_by_service, &replaced.service, &key);
            // The Service it belonged to changes too (it may now belong to another).
            self.changes.dirty_services.insert(replaced.service);
        }
        self.changes.slice_changed(&service);
        self.changes.trigger_times.extend(trigger_time);
        // Most Services have one slice: room for one, not the four a first push reserves.
        let slices =
            (self.slices_by_service.entry(service)).or_insert_with(|| Vec::with_capacity(1));
        if let Err(position) = slices.binary_search(&key) {
            slices.insert(position, key);
        }
        true
    }

    /// Removes a slice; whether it was there.
    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) -> bool {
        match self.unlink_endpoint_slice(key) {
            Some(removed) => {
                self.changes.slice_changed(&removed.service);
                true
            }
            None => false,
        }
    }

    /// Takes a slice out of both indexes without recording a change.
    fn unlink_endpoint_slice(&mut self, key: &ObjectKey) -> Option<SliceRecord> {
        let slice = self.endpoint_slices.remove(key)?;
        unlink_from_service(&mut self.slices_by_service, &slice.service, key);
        // The Service it belonged to changes too (it may now belong to another).
        self.changes.dirty_services.insert(slice.service.clone());
        Some(slice)
    }

    /// Replaces all EndpointSlices (a watcher's relist). Objects that can't enter are
    /// skipped and returned as errors; the others are kept.
    pub fn replace_endpoint_slices(
        &mut self,
        slices: impl IntoIterator<Item = EndpointSlice>,
    ) -> Vec<ModelError> {
        let mut errors = Vec::new();
        let mut records = Vec::new();
        for slice in slices {
            match self.slice_record(&slice) {
                Ok(record) => records.push(record),
                Err(error) => errors.push(error),
            }
        }
        self.replace_endpoint_slice_records(records);
        errors
    }

    /// Interprets a slice with this model's shared names: its key, record and trigger time.
    pub fn slice_record(&mut self, slice: &EndpointSlice) -> Result<SliceEntry, ModelError> {
        let key = ObjectKey::from_metadata(&slice.metadata).ok_or(ModelError::MissingName)?;
        match SliceRecord::from_slice(&key, slice, &mut self.names) {
            Some(record) => Ok((key, record, trigger_time(slice))),
            None => Err(ModelError::MissingServiceNameLabel { slice: key }),
        }
    }

    /// Replaces all EndpointSlices with these records: the ones not among them are removed.
    pub fn replace_endpoint_slice_records(
        &mut self,
        records: impl IntoIterator<Item = SliceEntry>,
    ) {
        let mut gone: BTreeSet<ObjectKey> = self.endpoint_slices.keys().cloned().collect();
        for (key, record, trigger_time) in records {
            gone.remove(&key);
            self.upsert_endpoint_slice(key, record, trigger_time);
        }
        for key in gone {
            self.remove_endpoint_slice(&key);
        }
    }

    /// All Services, ordered by `namespace/name`.
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &ServiceRecord)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceRecord> {
        self.services.get(key)
    }

    pub fn endpoint_slice(&self, key: &ObjectKey) -> Option<&SliceRecord> {
        self.endpoint_slices.get(key)
    }

    /// Counts every recorded change (mutations that changed a record, node labels,
    /// refusals): a source tells by it whether it changed the model.
    pub fn revision(&self) -> u64 {
        self.changes.revision
    }

    /// All EndpointSlices, ordered by `namespace/name`.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&ObjectKey, &SliceRecord)> {
        self.endpoint_slices.iter()
    }

    /// Sets the labels of the Node this daemon runs on (empty: unknown); whether they changed.
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) -> bool {
        let changed = self.node_labels != labels;
        self.node_labels = labels;
        self.changes.node_labels |= changed;
        self.changes.revision += u64::from(changed);
        changed
    }

    pub fn node_labels(&self) -> &BTreeMap<String, String> {
        &self.node_labels
    }

    /// Sets what the Node object says besides its labels; whether that changed.
    pub fn set_node_state(&mut self, state: NodeState) -> bool {
        let changed = self.node_state != state;
        self.node_state = state;
        self.changes.revision += u64::from(changed);
        changed
    }

    pub fn node_state(&self) -> &NodeState {
        &self.node_state
    }

    /// The slices that belong to a Service (whether or not the Service exists), ordered by
    /// slice name.
    pub fn endpoint_slices_of<'a>(
        &'a self,
        service: &ObjectKey,
    ) -> impl Iterator<Item = &'a SliceRecord> + use<'a> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.endpoint_slices.get(slice))
    }

    /// Records an object a source refused (logged and counted with the next sync).
    pub fn reject(&mut self, problem: Problem) {
        self.changes.revision += 1;
        self.changes.rejected.push(problem);
    }

    /// What the mutations changed since the last call.
    pub fn take_changes(&mut self) -> ModelChanges {
        crate::allocator::shrink_sparse(&mut self.slices_by_service);
        let revision = self.changes.revision;
        let changes = std::mem::take(&mut self.changes);
        self.changes.revision = revision;
        changes
    }
}

/// Takes slice `key` out of `service`'s entry of the index.
fn unlink_from_service(
    slices_by_service: &mut HashMap<ObjectKey, Vec<ObjectKey>>,
    service: &ObjectKey,
    key: &ObjectKey,
) {
    if let Some(slices) = slices_by_service.get_mut(service) {
        if let Ok(position) = slices.binary_search(key) {
            slices.remove(position);
        }
        if slices.is_empty() {
            slices_by_service.remove(service);
        }
    }
}

/// A slice's key, record and [`LAST_CHANGE_TRIGGER_TIME`].
pub type SliceEntry = (
    ObjectKey,
    SliceRecord,
    Option<chrono::DateTime<chrono::Utc>>,
);

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: Option<&str>, name: &str, cluster_ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: namespace.map(str::to_owned),
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                cluster_ip: Some(cluster_ip.to_owned()),
                ..Default::default()
            }),
            ..Service::default()
        }
    }

    fn slice(name: &str, service_name: Option<&str>, address_type: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("web".to_owned()),
                name: Some(name.to_owned()),
                labels: service_name
                    .map(|service| [(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..ObjectMeta::default()
            },
            address_type: address_type.to_owned(),
            ..EndpointSlice::default()
        }
    }

    fn slice_names_of(model: &Model, service: &ObjectKey) -> Vec<String> {
        let mut names: Vec<String> = model
            .endpoint_slices()
            .filter(|(_, slice)| slice.service == *service)
            .map(|(key, _)| key.name.to_string())
            .collect();
        names.sort();
        let indexed = model.endpoint_slices_of(service).count();
        assert_eq!(indexed, names.len(), "the index agrees with the slices");
        names
    }

    fn dirty(model: &mut Model) -> Vec<String> {
        let changes = model.take_changes();
        changes
            .dirty_services
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn services_are_keyed_by_namespace_and_name_with_default_namespace() {
        let mut model = Model::default();
        assert_eq!(
            model.insert_service(service(None, "a", "198.19.0.1")),
            Ok(())
        );
        assert_eq!(
            model.insert_service(service(Some("web"), "a", "198.19.0.2")),
            Ok(())
        );
        let keys: Vec<String> = model.services().map(|(key, _)| key.to_string()).collect();
        assert_eq!(keys, ["default/a", "web/a"]);
        assert_eq!(dirty(&mut model), ["default/a", "web/a"]);

        // The same object again changes nothing; another address does.
        model
            .insert_service(service(Some("web"), "a", "198.19.0.2"))
            .unwrap();
        assert_eq!(dirty(&mut model), Vec::<String>::new());
        model
            .insert_service(service(Some("web"), "a", "198.19.0.3"))
            .unwrap();
        assert_eq!(dirty(&mut model), ["web/a"]);

        assert!(model.remove_service(&ObjectKey::new("default", "a")));
        assert!(!model.remove_service(&ObjectKey::new("default", "a")));
        assert!(model.service(&ObjectKey::new("default", "a")).is_none());
        assert_eq!(
            model.insert_service(Service::default()),
            Err(ModelError::MissingName)
        );
    }

    #[test]
    fn slices_are_grouped_by_their_service_name_label_and_dirty_their_service() {
        let mut model = Model::default();
        let frontend = ObjectKey::new("web", "frontend");
        model
            .insert_endpoint_slice(slice("frontend-b", Some("frontend"), "IPv4"))
            .unwrap();
        model
            .insert_endpoint_slice(slice("frontend-a", Some("frontend"), "IPv4"))
            .unwrap();
        model
            .insert_endpoint_slice(slice("other-a", Some("other"), "IPv4"))
            .unwrap();
        assert_eq!(
            slice_names_of(&model, &frontend),
            ["frontend-a", "frontend-b"]
        );
        assert_eq!(dirty(&mut model), ["web/frontend", "web/other"]);

        // Replacing a slice with one labelled for another Service moves it: both change.
        model
            .insert_endpoint_slice(slice("frontend-b", Some("other"), "IPv6"))
            .unwrap();
        assert_eq!(slice_names_of(&model, &frontend), ["frontend-a"]);
        assert_eq!(
            slice_names_of(&model, &ObjectKey::new("web", "other")),
            ["frontend-b", "other-a"]
        );
        assert_eq!(dirty(&mut model), ["web/frontend", "web/other"]);

        model.remove_endpoint_slice(&ObjectKey::new("web", "frontend-a"));
        assert!(slice_names_of(&model, &frontend).is_empty());
        assert_eq!(model.endpoint_slices().count(), 2);
        assert_eq!(dirty(&mut model), ["web/frontend"]);
    }

    #[test]
    fn slice_without_service_name_label_is_refused_and_its_old_version_removed() {
        let mut model = Model::default();
        model
            .insert_endpoint_slice(slice("orphan", Some("web"), "IPv4"))
            .unwrap();
        assert_eq!(
            model.insert_endpoint_slice(slice("orphan", None, "IPv4")),
            Err(ModelError::MissingServiceNameLabel {
                slice: ObjectKey::new("web", "orphan")
            })
        );
        assert_eq!(model.endpoint_slices().count(), 0);
    }

    #[test]
    fn replace_drops_what_is_not_in_the_new_set_and_reports_refusals() {
        let mut model = Model::default();
        model
            .insert_service(service(None, "old", "198.19.0.1"))
            .unwrap();
        model
            .insert_endpoint_slice(slice("old-a", Some("old"), "IPv4"))
            .unwrap();

        let errors =
            model.replace_services([service(None, "new", "198.19.0.2"), Service::default()]);
        assert_eq!(errors, [ModelError::MissingName]);
        let keys: Vec<String> = model.services().map(|(key, _)| key.to_string()).collect();
        assert_eq!(keys, ["default/new"]);

        let errors = model.replace_endpoint_slices([
            slice("new-a", Some("new"), "IPv4"),
            slice("orphan", None, "IPv4"),
        ]);
        assert_eq!(errors.len(), 1);
        assert!(slice_names_of(&model, &ObjectKey::new("web", "old")).is_empty());
        assert_eq!(
            slice_names_of(&model, &ObjectKey::new("web", "new")),
            ["new-a"]
        );
    }

    #[test]
    fn changes_count_added_changed_removed_and_read_trigger_times() {
        let slice = |name: &str, trigger: Option<&str>, port: i32| -> EndpointSlice {
            let mut object: EndpointSlice = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [],
                "ports": [{"port": port}],
            }))
            .unwrap();
            if let Some(time) = trigger {
                object.metadata.annotations =
                    Some([(LAST_CHANGE_TRIGGER_TIME.to_string(), time.to_string())].into());
            }
            object
        };
        let mut before = Model::default();
        before.insert_endpoint_slice(slice("a", None, 80)).unwrap();
        before.insert_endpoint_slice(slice("b", None, 80)).unwrap();
        before.take_changes();
        let mut after = before.clone();
        after
            .insert_endpoint_slice(slice("a", Some("2026-11-22T03:00:00Z"), 81))
            .unwrap();
        after.remove_endpoint_slice(&ObjectKey::new("default", "b"));
        after.insert_endpoint_slice(slice("c", None, 80)).unwrap();
        // Only an annotation: the record is the same, nothing to count.
        after
            .insert_endpoint_slice(slice("c", Some("2026-11-22T03:00:01Z"), 80))
            .unwrap();

        // Counted by the mutations themselves…
        let changes = after.take_changes();
        assert_eq!(changes.endpoint_slices, 3, "a changed, b removed, c added");
        assert_eq!(changes.trigger_times.len(), 1);
        assert_eq!(
            changes.dirty_services,
            BTreeSet::from([ObjectKey::new("default", "web")])
        );
        assert!(after.take_changes().is_empty(), "taken");

        // …and by a relist, against what was there before (unchanged slices don't count).
        let mut relisted = before.clone();
        relisted.replace_endpoint_slices([
            slice("a", Some("2026-11-22T03:00:00Z"), 81),
            slice("b", None, 80),
        ]);
        let changes = relisted.take_changes();
        assert_eq!(changes.endpoint_slices, 1, "only a changed");
        assert_eq!(changes.trigger_times.len(), 1);
    }

    #[test]
    fn node_labels_changes_are_recorded() {
        let mut model = Model::default();
        let zone = || BTreeMap::from([("topology.kubernetes.io/zone".to_owned(), "a".to_owned())]);
        assert!(model.set_node_labels(zone()));
        assert!(!model.set_node_labels(zone()));
        assert!(model.take_changes().node_labels);
        assert!(!model.take_changes().node_labels);
    }
}
