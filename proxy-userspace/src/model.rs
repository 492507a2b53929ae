//! Model: the cluster state the planner reads, as plain data.
//!
//! Sources (the manifests directory, the Kubernetes watchers) feed Services and
//! EndpointSlices in with insert/remove/replace; the planner reads them back, slices grouped
//! by the Service they belong to (their `kubernetes.io/service-name` label), as kube-proxy's
//! EndpointSliceCache merges them. The Kubernetes source also keeps this node's labels here,
//! as kube-proxy does: they carry the zone for topology-aware routing; and its primary
//! address and whether it is being deleted ([`NodeState`]). No policy lives here:
//! which objects matter, and how, is the planner's business.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The namespace of an object whose `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
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

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why an object can't enter the model.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("metadata.name is missing")]
    MissingName,
    #[error("EndpointSlice {slice} has no {SERVICE_NAME_LABEL} label")]
    MissingServiceNameLabel { slice: ObjectKey },
}

/// What the daemon reads from the Node it runs on, besides its labels (the Kubernetes
/// source only: the default while no Node is known).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The Node's primary IPv4 address: its first InternalIP, else ExternalIP, of that
    /// family (kube-proxy's node IP, which `--nodeport-addresses primary` stands for).
    pub primary_ipv4: Option<Ipv4Addr>,
    /// The Node has a deletion timestamp or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint: kube-proxy's `/healthz` answers 503 so that
    /// load balancers drain the node first.
    pub being_deleted: bool,
}

/// Services and EndpointSlices keyed by `namespace/name`, slices also indexed by Service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    services: BTreeMap<ObjectKey, Service>,
    endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Service key → keys of the slices labelled with its name (same namespace).
    slices_by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// The labels of the Node this daemon runs on; empty while no source knows them.
    node_labels: BTreeMap<String, String>,
    /// The rest of what the daemon reads from its Node object.
    node_state: NodeState,
    /// What the mutations changed since the last [`take_changes`](Self::take_changes):
    /// counted here, where old and new are both at hand, so nobody keeps a copy to diff.
    changes: ModelChanges,
}

impl Model {
    /// Adds or replaces a Service; returns the one it replaced.
    pub fn insert_service(&mut self, service: Service) -> Result<Option<Service>, ModelError> {
        let key = ObjectKey::from_metadata(&service.metadata).ok_or(ModelError::MissingName)?;
        let replaced = self.services.insert(key.clone(), service);
        if replaced.as_ref() != self.services.get(&key) {
            self.changes.services += 1;
        }
        Ok(replaced)
    }

    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<Service> {
        let removed = self.services.remove(key);
        if removed.is_some() {
            self.changes.services += 1;
        }
        removed
    }

    /// Replaces all Services (a watcher's relist). Objects that can't enter are skipped and
    /// returned as errors; the others are kept.
    pub fn replace_services(
        &mut self,
        services: impl IntoIterator<Item = Service>,
    ) -> Vec<ModelError> {
        let before = std::mem::take(&mut self.services);
        let counted = self.changes.services;
        let errors = services
            .into_iter()
            .filter_map(|service| self.insert_service(service).err())
            .collect();
        self.changes.services = counted + changed_keys(&before, &self.services);
        errors
    }

    /// Adds or replaces an EndpointSlice; returns the one it replaced. A slice must name its
    /// Service with the [`SERVICE_NAME_LABEL`] label.
    pub fn insert_endpoint_slice(
        &mut self,
        slice: EndpointSlice,
    ) -> Result<Option<EndpointSlice>, ModelError> {
        let key = ObjectKey::from_metadata(&slice.metadata).ok_or(ModelError::MissingName)?;
        let service = service_of_slice(&key, &slice)
            .ok_or_else(|| ModelError::MissingServiceNameLabel { slice: key.clone() })?;
        let replaced = self.unlink_endpoint_slice(&key);
        if replaced.as_ref() != Some(&slice) {
            self.changes.endpoint_slices += 1;
            self.changes.trigger_times.extend(trigger_time(&slice));
        }
        self.slices_by_service
            .entry(service)
            .or_default()
            .insert(key.clone());
        self.endpoint_slices.insert(key, slice);
        Ok(replaced)
    }

    pub fn remove_endpoint_slice(&mut self, key: &ObjectKey) -> Option<EndpointSlice> {
        let removed = self.unlink_endpoint_slice(key);
        if removed.is_some() {
            self.changes.endpoint_slices += 1;
        }
        removed
    }

    /// Takes a slice out of both indexes without counting a change.
    fn unlink_endpoint_slice(&mut self, key: &ObjectKey) -> Option<EndpointSlice> {
        let slice = self.endpoint_slices.remove(key)?;
        if let Some(service) = service_of_slice(key, &slice)
            && let Some(slices) = self.slices_by_service.get_mut(&service)
        {
            slices.remove(key);
            if slices.is_empty() {
                self.slices_by_service.remove(&service);
            }
        }
        Some(slice)
    }

    /// Replaces all EndpointSlices (a watcher's relist). Objects that can't enter are
    /// skipped and returned as errors; the others are kept.
    pub fn replace_endpoint_slices(
        &mut self,
        slices: impl IntoIterator<Item = EndpointSlice>,
    ) -> Vec<ModelError> {
        let before = std::mem::take(&mut self.endpoint_slices);
        self.slices_by_service.clear();
        // Against an emptied index every insert looks new: count against `before` instead.
        let counted = std::mem::take(&mut self.changes);
        let errors = slices
            .into_iter()
            .filter_map(|slice| self.insert_endpoint_slice(slice).err())
            .collect();
        let mut changes = counted;
        changes.endpoint_slices += changed_keys(&before, &self.endpoint_slices);
        changes.trigger_times.extend(
            self.endpoint_slices
                .iter()
                .filter(|(key, slice)| before.get(*key) != Some(*slice))
                .filter_map(|(_, slice)| trigger_time(slice)),
        );
        self.changes = changes;
        errors
    }

    /// All Services, ordered by `namespace/name`.
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &Service)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// All EndpointSlices, ordered by `namespace/name`.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = (&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices.iter()
    }

    /// Sets the labels of the Node this daemon runs on (empty: unknown); whether they changed.
    pub fn set_node_labels(&mut self, labels: BTreeMap<String, String>) -> bool {
        let changed = self.node_labels != labels;
        self.node_labels = labels;
        changed
    }

    pub fn node_labels(&self) -> &BTreeMap<String, String> {
        &self.node_labels
    }

    /// Sets what the Node object says besides its labels; whether that changed.
    pub fn set_node_state(&mut self, state: NodeState) -> bool {
        let changed = self.node_state != state;
        self.node_state = state;
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
    ) -> impl Iterator<Item = &'a EndpointSlice> + use<'a> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.endpoint_slices.get(slice))
    }
}

/// The Service a slice belongs to: its namespace and its service-name label.
fn service_of_slice(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let service_name = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .filter(|name| !name.is_empty())?;
    Some(ObjectKey::new(key.namespace.clone(), service_name.clone()))
}

/// The EndpointSlice annotation the EndpointSlice controller sets to when the change
/// that the slice reflects happened: the start of kube-proxy's network programming latency.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What changed between two models, for kube-proxy's change counters and latency metric.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelChanges {
    /// Services added, changed or removed.
    pub services: u64,
    /// EndpointSlices added, changed or removed.
    pub endpoint_slices: u64,
    /// Trigger times of the added or changed slices that carry one.
    pub trigger_times: Vec<chrono::DateTime<chrono::Utc>>,
}

impl Model {
    /// What the mutations changed since the last call.
    pub fn take_changes(&mut self) -> ModelChanges {
        std::mem::take(&mut self.changes)
    }

    /// Becomes `next` (a freshly read model), recording what that changes.
    pub fn replace_with(&mut self, next: Model) {
        let mut changes = std::mem::take(&mut self.changes);
        let difference = next.changes_since(self);
        changes.services += difference.services;
        changes.endpoint_slices += difference.endpoint_slices;
        changes.trigger_times.extend(difference.trigger_times);
        *self = next;
        self.changes = changes;
    }

    /// Counts what differs from `earlier`.
    fn changes_since(&self, earlier: &Model) -> ModelChanges {
        let mut changes = ModelChanges {
            services: changed_keys(&earlier.services, &self.services),
            endpoint_slices: changed_keys(&earlier.endpoint_slices, &self.endpoint_slices),
            trigger_times: Vec::new(),
        };
        for (key, slice) in &self.endpoint_slices {
            if earlier.endpoint_slices.get(key) == Some(slice) {
                continue;
            }
            changes.trigger_times.extend(trigger_time(slice));
        }
        changes
    }
}

/// The slice's [`LAST_CHANGE_TRIGGER_TIME`], if it has a valid one.
fn trigger_time(slice: &EndpointSlice) -> Option<chrono::DateTime<chrono::Utc>> {
    let time = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    let time = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    Some(time.with_timezone(&chrono::Utc))
}

fn changed_keys<V: PartialEq>(
    earlier: &BTreeMap<ObjectKey, V>,
    now: &BTreeMap<ObjectKey, V>,
) -> u64 {
    let added_or_changed = now
        .iter()
        .filter(|(key, value)| earlier.get(key) != Some(value));
    let removed = earlier.keys().filter(|key| !now.contains_key(key));
    (added_or_changed.count() + removed.count()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: Option<&str>, name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: namespace.map(str::to_owned),
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
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
        model
            .endpoint_slices_of(service)
            .map(|slice| slice.metadata.name.clone().unwrap_or_default())
            .collect()
    }

    #[test]
    fn services_are_keyed_by_namespace_and_name_with_default_namespace() {
        let mut model = Model::default();
        assert_eq!(model.insert_service(service(None, "a")), Ok(None));
        assert_eq!(model.insert_service(service(Some("web"), "a")), Ok(None));
        let replaced = model.insert_service(service(Some("web"), "a")).unwrap();
        assert!(replaced.is_some());
        let keys: Vec<String> = model.services().map(|(key, _)| key.to_string()).collect();
        assert_eq!(keys, ["default/a", "web/a"]);

        assert!(
            model
                .remove_service(&ObjectKey::new("default", "a"))
                .is_some()
        );
        assert!(model.service(&ObjectKey::new("default", "a")).is_none());
        assert_eq!(
            model.insert_service(Service::default()),
            Err(ModelError::MissingName)
        );
    }

    #[test]
    fn slices_are_grouped_by_their_service_name_label() {
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

        // Replacing a slice with one labelled for another Service moves it.
        let replaced = model
            .insert_endpoint_slice(slice("frontend-b", Some("other"), "IPv6"))
            .unwrap();
        assert_eq!(
            replaced.map(|slice| slice.address_type).as_deref(),
            Some("IPv4")
        );
        assert_eq!(slice_names_of(&model, &frontend), ["frontend-a"]);
        assert_eq!(
            slice_names_of(&model, &ObjectKey::new("web", "other")),
            ["frontend-b", "other-a"]
        );

        model.remove_endpoint_slice(&ObjectKey::new("web", "frontend-a"));
        assert!(slice_names_of(&model, &frontend).is_empty());
        assert_eq!(model.endpoint_slices().count(), 2);
    }

    #[test]
    fn slice_without_service_name_label_is_refused() {
        let mut model = Model::default();
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
        model.insert_service(service(None, "old")).unwrap();
        model
            .insert_endpoint_slice(slice("old-a", Some("old"), "IPv4"))
            .unwrap();

        let errors = model.replace_services([service(None, "new"), Service::default()]);
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
        let mut after = before.clone();
        after
            .insert_endpoint_slice(slice("a", Some("2026-11-22T03:00:00Z"), 81))
            .unwrap();
        after.remove_endpoint_slice(&ObjectKey::new("default", "b"));
        after.insert_endpoint_slice(slice("c", None, 80)).unwrap();

        // Counted by the mutations themselves…
        before.take_changes();
        let changes = after.take_changes();
        assert_eq!(
            changes.endpoint_slices, 5,
            "a, b and c inserted, then a changed, b removed, c added"
        );
        assert_eq!(changes.trigger_times.len(), 1);
        assert_eq!(after.take_changes(), ModelChanges::default(), "taken");

        // …by a relist, against what was there before (unchanged slices don't count)…
        let mut relisted = before.clone();
        relisted.replace_endpoint_slices([
            slice("a", Some("2026-11-22T03:00:00Z"), 81),
            slice("b", None, 80),
        ]);
        let changes = relisted.take_changes();
        assert_eq!(changes.endpoint_slices, 1, "only a changed");
        assert_eq!(changes.trigger_times.len(), 1);

        // …and by replacing a whole model (a manifests reload).
        let mut reloaded = before.clone();
        reloaded.replace_with(after.clone());
        let changes = reloaded.take_changes();
        assert_eq!(changes.endpoint_slices, 3, "a changed, b removed, c added");
        assert_eq!(changes.services, 0);
        assert_eq!(changes.trigger_times.len(), 1);
    }
}
