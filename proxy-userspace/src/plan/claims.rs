//! Contested frontends: when Services claim the same address:port/protocol, the first by
//! `namespace/name` keeps it and the others are told (what a full plan that visits Services
//! in that order does). The index survives incremental changes, so the rule holds whatever
//! order the changes come in: a Service that sorts first takes the frontend over, and when
//! the owner lets go, the next claimant gets it.

use foldhash::HashMap;

use super::{Frontend, FrontendKind, ServicePortName};
use crate::model::{ObjectKey, Problem, ProblemKind};

/// One Service port's claim on a frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Claim {
    pub port: ServicePortName,
    pub kind: FrontendKind,
}

impl Claim {
    /// Whether the claim is made by this Service.
    pub fn is_by(&self, service: &ObjectKey) -> bool {
        self.port.namespace == service.namespace && self.port.name == service.name
    }

    pub fn service(&self) -> ObjectKey {
        ObjectKey::new(self.port.namespace.clone(), self.port.name.clone())
    }

    fn order(&self) -> (&str, &str) {
        (&self.port.namespace, &self.port.name)
    }
}

/// Every claimed frontend's claims, first by `namespace/name` (the owner) first. A Service
/// claims a frontend at most once (its own ports settle among themselves first).
#[derive(Clone, Debug, Default)]
pub(super) struct Claims {
    by_frontend: HashMap<Frontend, Vec<Claim>>,
}

impl Claims {
    /// Adds or replaces the claim of `claim`'s Service; whether the claims changed.
    pub fn upsert(&mut self, frontend: Frontend, claim: Claim) -> bool {
        // Almost every frontend has one claimant: room for one, not the four a first push
        // reserves.
        let claims = (self.by_frontend.entry(frontend)).or_insert_with(|| Vec::with_capacity(1));
        match claims.binary_search_by(|existing| existing.order().cmp(&claim.order())) {
            Ok(index) if claims[index] == claim => false,
            Ok(index) => {
                claims[index] = claim;
                true
            }
            Err(index) => {
                claims.insert(index, claim);
                true
            }
        }
    }

    /// Withdraws `service`'s claim; whether it had one.
    pub fn remove(&mut self, frontend: Frontend, service: &ObjectKey) -> bool {
        let Some(claims) = self.by_frontend.get_mut(&frontend) else {
            return false;
        };
        let before = claims.len();
        claims.retain(|claim| !claim.is_by(service));
        let removed = claims.len() != before;
        if claims.is_empty() {
            self.by_frontend.remove(&frontend);
        }
        removed
    }

    /// Gives unused buckets back after most claims went.
    pub fn shrink_sparse(&mut self) {
        crate::allocator::shrink_sparse(&mut self.by_frontend);
    }

    /// The claim that keeps the frontend.
    pub fn owner(&self, frontend: &Frontend) -> Option<&Claim> {
        self.by_frontend.get(frontend)?.first()
    }

    /// All claims on the frontend, the owner first.
    pub fn of(&self, frontend: &Frontend) -> &[Claim] {
        self.by_frontend.get(frontend).map_or(&[], Vec::as_slice)
    }

    /// `service`'s claim on the frontend, if it lost it to another Service: the conflict.
    pub fn lost_by(&self, frontend: Frontend, service: &ObjectKey) -> Option<Problem> {
        let claims = self.of(&frontend);
        let owner = claims.first()?;
        if owner.is_by(service) {
            return None;
        }
        let lost = claims.iter().find(|claim| claim.is_by(service))?;
        Some(conflict(
            &lost.port,
            frontend,
            lost.kind,
            &owner.port,
            owner.kind,
        ))
    }
}

/// The problem of a claim that lost `frontend` to `owner`.
pub(super) fn conflict(
    service: &ServicePortName,
    frontend: Frontend,
    kind: FrontendKind,
    owner: &ServicePortName,
    owner_kind: FrontendKind,
) -> Problem {
    Problem::new(
        ProblemKind::Service,
        "frontend_conflict",
        format!(
            "{service}: {frontend} ({kind:?}) is already taken by {owner} ({owner_kind:?}), skipped"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::FrontendKind::ClusterIp;
    use super::super::testing::*;

    #[test]
    fn conflicting_frontends() {
        run(vec![
            Case {
                name: "two Services, one ClusterIP:port: the first by namespace/name keeps it",
                services: vec![
                    svc("default/web", "198.19.0.10").port("http", 80, "TCP"),
                    svc("default/api", "198.19.0.10").port("http", 80, "TCP"),
                ],
                slices: vec![
                    web_slice(),
                    slice("default/api-1", "api")
                        .port(Some("http"), Some(9000), "TCP")
                        .endpoint(ep("198.18.3.1")),
                ],
                frontends: vec![("198.19.0.10:80/tcp", ClusterIp, vec!["198.18.3.1:9000"])],
                problems: vec![
                    "default/web:http: 198.19.0.10:80/tcp (ClusterIp) is already taken by default/api:http (ClusterIp), skipped",
                ],
                ..Case::default()
            },
            Case {
                name: "an externalIP on another Service's ClusterIP",
                services: vec![
                    svc("default/a", "198.19.0.10").port("http", 80, "TCP"),
                    svc("default/b", "198.19.0.11")
                        .port("http", 80, "TCP")
                        .external_ips(&["198.19.0.10"]),
                ],
                frontends: vec![
                    ("198.19.0.10:80/tcp", ClusterIp, vec![REJECTS]),
                    ("198.19.0.11:80/tcp", ClusterIp, vec![REJECTS]),
                ],
                problems: vec![
                    "default/b:http: 198.19.0.10:80/tcp (ExternalIp) is already taken by default/a:http (ClusterIp), skipped",
                ],
                ..Case::default()
            },
        ]);
    }
}
