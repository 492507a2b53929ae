//! Health, kube-proxy compatible: `/healthz` and `/livez` with kube-proxy's JSON bodies.
//!
//! The daemon is unhealthy when an update it was told about (a Service or EndpointSlice
//! change) has stayed unapplied longer than the timeout — a stuck loop or maps that
//! refuse writes — exactly kube-proxy's definition. `/healthz` is additionally unhealthy
//! while the node is being deleted (deletion timestamp or the cluster autoscaler's
//! `ToBeDeletedByClusterAutoscaler` taint), so load balancers drain it first.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};

/// kube-proxy's taint check for nodes about to be removed.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// Shared health state: the daemon loop reports, the HTTP handlers read.
#[derive(Debug)]
pub struct Health {
    timeout: Duration,
    inner: Mutex<HealthInner>,
}

/// What the endpoints answer.
#[derive(Debug, PartialEq, Eq)]
pub struct HealthStatus {
    pub healthy: bool,
    pub last_updated: Option<SystemTime>,
    pub node_eligible: bool,
}

impl Health {
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            inner: Mutex::new(HealthInner {
                last_updated: None,
                oldest_pending: None,
                // Eligible while starting, until the Node says otherwise.
                node_eligible: true,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A change arrived that the datapath does not reflect yet.
    pub fn queued_update(&self, now: SystemTime) {
        self.lock().oldest_pending.get_or_insert(now);
    }

    /// The datapath reflects everything received so far.
    pub fn updated(&self, now: SystemTime) {
        let mut inner = self.lock();
        inner.oldest_pending = None;
        inner.last_updated = Some(now);
    }

    /// kube-proxy's node eligibility (`/healthz` only); whether it changed.
    pub fn set_node_eligible(&self, eligible: bool) -> bool {
        let mut inner = self.lock();
        let changed = inner.node_eligible != eligible;
        inner.node_eligible = eligible;
        changed
    }

    /// The proxy's own health (for `/livez`), and node eligibility (added for `/healthz`).
    pub fn status(&self, now: SystemTime) -> HealthStatus {
        let inner = self.lock();
        let late = inner
            .oldest_pending
            .is_some_and(|queued| now.duration_since(queued).unwrap_or_default() >= self.timeout);
        HealthStatus {
            healthy: !late,
            last_updated: inner.last_updated,
            node_eligible: inner.node_eligible,
        }
    }
}

/// Go's `time.Time` String() layout, which kube-proxy's bodies use.
fn go_time(time: SystemTime) -> String {
    DateTime::<Utc>::from(time)
        .format("%Y-%m-%d %H:%M:%S%.f +0000 UTC")
        .to_string()
}

/// kube-proxy reports "now" as lastUpdated while healthy (its compatibility rule), and
/// the real last update when not.
fn last_updated_field(status: &HealthStatus, healthy: bool, now: SystemTime) -> String {
    let time = if healthy {
        now
    } else {
        status.last_updated.unwrap_or(SystemTime::UNIX_EPOCH)
    };
    go_time(time)
}

/// The `/healthz` response: status code and body.
pub fn healthz_response(status: &HealthStatus, now: SystemTime) -> (StatusCode, String) {
    let healthy = status.healthy && status.node_eligible;
    let body = format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {}}}"#,
        last_updated_field(status, healthy, now),
        go_time(now),
        status.node_eligible
    );
    (code(healthy), body)
}

/// The `/livez` response: like `/healthz` without node eligibility.
pub fn livez_response(status: &HealthStatus, now: SystemTime) -> (StatusCode, String) {
    let body = format!(
        r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
        last_updated_field(status, status.healthy, now),
        go_time(now)
    );
    (code(status.healthy), body)
}

fn code(healthy: bool) -> StatusCode {
    if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn json(response: (StatusCode, String)) -> impl IntoResponse {
    let (code, body) = response;
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

/// The routes of the health server (`--healthz-bind-address`).
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|State(health): State<Arc<Health>>| async move {
                let now = SystemTime::now();
                json(healthz_response(&health.status(now), now))
            }),
        )
        .route(
            "/livez",
            get(|State(health): State<Arc<Health>>| async move {
                let now = SystemTime::now();
                json(livez_response(&health.status(now), now))
            }),
        )
        .with_state(health)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + seconds)
    }

    #[test]
    fn health_follows_pending_updates_and_node_eligibility() {
        // (case, steps applied to a fresh state with a 60 s timeout, check time, healthz, livez)
        type Step = fn(&Health);
        let cases: [(&str, &[Step], u64, StatusCode, StatusCode); 6] = [
            ("starting up", &[], 0, StatusCode::OK, StatusCode::OK),
            (
                "update pending, not late",
                &[|h| h.queued_update(at(0))],
                59,
                StatusCode::OK,
                StatusCode::OK,
            ),
            (
                "update pending too long",
                &[|h| h.queued_update(at(0))],
                60,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                "applied in time",
                &[|h| h.queued_update(at(0)), |h| h.updated(at(10))],
                600,
                StatusCode::OK,
                StatusCode::OK,
            ),
            (
                "oldest pending update counts",
                &[|h| h.queued_update(at(0)), |h| h.queued_update(at(50))],
                61,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                "node being deleted: healthz only",
                &[|h| {
                    h.set_node_eligible(false);
                }],
                0,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::OK,
            ),
        ];
        for (name, steps, now, healthz, livez) in cases {
            let health = Health::new(Duration::from_secs(60));
            for step in steps {
                step(&health);
            }
            let status = health.status(at(now));
            assert_eq!(
                healthz_response(&status, at(now)).0,
                healthz,
                "{name}: healthz"
            );
            assert_eq!(livez_response(&status, at(now)).0, livez, "{name}: livez");
        }
    }

    #[test]
    fn bodies_have_kube_proxys_fields() {
        let health = Health::new(Duration::from_secs(60));
        health.updated(at(0));
        let now = at(5);
        let (_, body) = healthz_response(&health.status(now), now);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["nodeEligible"], true);
        assert_eq!(parsed["currentTime"], "2027-01-15 08:00:05 +0000 UTC");
        assert_eq!(
            parsed["lastUpdated"], parsed["currentTime"],
            "healthy: lastUpdated is now"
        );

        health.queued_update(at(10));
        let late = at(100);
        let (_, body) = livez_response(&health.status(late), late);
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["lastUpdated"], "2027-01-15 08:00:00 +0000 UTC");
        assert!(parsed.get("nodeEligible").is_none());
    }
}
