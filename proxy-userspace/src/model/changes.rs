//! The change tracker's record (kube-proxy's `ServiceChangeTracker` /
//! `EndpointsChangeTracker`): what the model's mutations changed since the planner last
//! looked — which Services to re-plan, and the counts and trigger times of kube-proxy's
//! change metrics.

use std::collections::BTreeSet;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{ObjectKey, Problem};

/// The EndpointSlice annotation the EndpointSlice controller sets to when the change
/// that the slice reflects happened: the start of kube-proxy's network programming latency.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// What changed since the planner last looked: which Services to re-plan, and the counts
/// and times of kube-proxy's change metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelChanges {
    /// Services added, changed or removed.
    pub services: u64,
    /// EndpointSlices added, changed or removed.
    pub endpoint_slices: u64,
    /// Trigger times of the added or changed slices that carry one.
    pub trigger_times: Vec<chrono::DateTime<chrono::Utc>>,
    /// The Services whose record or slices changed (existing or not): only they are
    /// re-planned.
    pub dirty_services: BTreeSet<ObjectKey>,
    /// The node's labels changed: its zone may have, which touches every Service.
    pub node_labels: bool,
    /// Objects the sources refused since the last call.
    pub rejected: Vec<Problem>,
    /// Counts changes for [`Model::revision`](super::Model::revision); kept across
    /// [`Model::take_changes`](super::Model::take_changes).
    pub(super) revision: u64,
}

impl ModelChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.services == 0
            && self.endpoint_slices == 0
            && self.trigger_times.is_empty()
            && self.dirty_services.is_empty()
            && !self.node_labels
            && self.rejected.is_empty()
    }

    pub(super) fn service_changed(&mut self, key: &ObjectKey) {
        self.revision += 1;
        self.services += 1;
        self.dirty_services.insert(key.clone());
    }

    pub(super) fn slice_changed(&mut self, service: &ObjectKey) {
        self.revision += 1;
        self.endpoint_slices += 1;
        self.dirty_services.insert(service.clone());
    }
}

/// The slice's [`LAST_CHANGE_TRIGGER_TIME`], if it has a valid one.
pub fn trigger_time(slice: &EndpointSlice) -> Option<chrono::DateTime<chrono::Utc>> {
    let time = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    let time = chrono::DateTime::parse_from_rfc3339(time).ok()?;
    Some(time.with_timezone(&chrono::Utc))
}
