//! The planner's state between syncs, so a change re-plans only the Services it touched
//! (kube-proxy's partial sync): each Service's claimed frontends and problems, the index of
//! contested frontends, and the desired state, which [`Planner::update`] keeps equal to what
//! planning everything from scratch would give, and whose changed frontends it returns.
//!
//! A full plan is the same code run over every Service of a fresh planner; the daemon does
//! that at start-up, at the periodic resync and when the node's facts change (addresses,
//! labels, zone: they touch every Service), as kube-proxy's `needFullSync`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use foldhash::HashMap;

use super::claims::{Claim, Claims};
use super::endpoints::NodeIdentity;
use super::service_port::{NodeContext, plan_service};
use super::{DesiredState, Frontend, FrontendPlan, NodeFacts, ServiceHealthCheck, ZONE_LABEL};
use crate::model::{Family, Model, ObjectKey, Problem};

/// Desired state kept up to date one Service at a time.
#[derive(Clone, Debug, Default)]
pub struct Planner {
    node: NodeContext,
    services: HashMap<ObjectKey, ServiceState>,
    claims: Claims,
    desired: DesiredState,
    health_checks: BTreeMap<ObjectKey, ServiceHealthCheck>,
}

/// What the planner remembers of one Service.
#[derive(Clone, Debug, Default)]
struct ServiceState {
    /// The frontends it claims (owned or lost), in claim order.
    frontends: Vec<Frontend>,
    /// Its own problems (ports it can't program, fields skipped).
    problems: Vec<Problem>,
    /// Every problem last reported for it (its own and its lost claims).
    reported: Vec<Problem>,
}

/// What one [`Planner::update`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanDelta {
    /// The frontends whose plan changed, in frontend order; empty after
    /// [`Planner::update_all`] (a full sync writes [`Planner::desired`] whole).
    pub frontends: Vec<FrontendChange>,
    /// Problems that were not there before this update, in Service order.
    pub new_problems: Vec<Problem>,
    /// Whether any Service's health check appeared, changed or went.
    pub health_checks_changed: bool,
    /// How many Services were planned (the dirty ones, and claimants that took a
    /// frontend over).
    pub services_planned: usize,
}

/// One frontend's plan before and after an update (`None`: not programmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendChange {
    pub frontend: Frontend,
    pub old: Option<FrontendPlan>,
    pub new: Option<FrontendPlan>,
}

/// One update's work in progress.
#[derive(Default)]
struct Pass {
    /// Services still to plan, in order.
    queue: BTreeSet<ObjectKey>,
    /// What a partial update records to return its delta; `None` for a full one, which
    /// looks at every Service and hands over the whole desired state.
    changes: Option<Changes>,
    health_checks_changed: bool,
    services_planned: usize,
}

/// What a partial update records as it goes.
#[derive(Default)]
struct Changes {
    /// The plan each touched frontend had before this update.
    before: BTreeMap<Frontend, Option<FrontendPlan>>,
    /// The Services whose problems may have changed.
    affected: BTreeSet<ObjectKey>,
}

impl Planner {
    /// An empty planner for this node (its zone from the model's Node labels when a source
    /// knows them, else from the configuration).
    pub fn new(node: &NodeFacts, model: &Model) -> Self {
        Planner {
            node: node_context(node, model),
            ..Planner::default()
        }
    }

    /// Takes the node's facts (its addresses, name, zone from the model's Node labels);
    /// whether they changed: then every Service must be planned anew (a full sync).
    pub fn set_node(&mut self, node: &NodeFacts, model: &Model) -> bool {
        let context = node_context(node, model);
        let changed = self.node != context;
        self.node = context;
        changed
    }

    /// What the maps should hold.
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    pub fn health_checks(&self) -> &BTreeMap<ObjectKey, ServiceHealthCheck> {
        &self.health_checks
    }

    /// Every current problem, ordered by Service: its own, then the frontends it lost.
    pub fn problems(&self) -> Vec<Problem> {
        let keys: BTreeSet<&ObjectKey> = self.services.keys().collect();
        keys.into_iter()
            .flat_map(|key| self.problems_of(key))
            .collect()
    }

    /// Re-plans every Service: each one in the model, and each one this planner still has
    /// frontends or problems for — a Service removed since the last update lets them go
    /// (a full sync that planned only the model's Services would leave them programmed).
    /// The delta's `frontends` stay empty: a full sync writes the whole desired state, so
    /// no frontend's plan is copied into it.
    pub fn update_all(&mut self, model: &Model) -> PlanDelta {
        let removed: Vec<ObjectKey> = (self.services.keys())
            .filter(|key| model.service(key).is_none())
            .cloned()
            .collect();
        let mut pass = Pass::default();
        for key in model.services().map(|(key, _)| key).chain(&removed) {
            self.plan(model, key, &mut pass);
        }
        while let Some(key) = pass.queue.pop_first() {
            self.plan(model, &key, &mut pass);
        }
        // Every Service was planned: each one's problems are looked at, in Service order.
        let mut new_problems = Vec::new();
        for (key, _) in model.services() {
            self.report(key, &mut new_problems);
        }
        // Rebuilt in one pass, the map's nodes come out full, where inserts in Service
        // order leave them a third empty.
        self.desired.frontends = std::mem::take(&mut self.desired.frontends)
            .into_iter()
            .collect();
        self.shrink();
        PlanDelta {
            frontends: Vec::new(),
            new_problems,
            health_checks_changed: pass.health_checks_changed,
            services_planned: pass.services_planned,
        }
    }

    /// Re-plans the `dirty` Services (present in the model or not) and returns what
    /// changed. A Service that takes a frontend over from one that let it go is re-planned
    /// too, so the desired state always equals a plan from scratch.
    pub fn update(
        &mut self,
        model: &Model,
        dirty: impl IntoIterator<Item = ObjectKey>,
    ) -> PlanDelta {
        let mut pass = Pass {
            queue: dirty.into_iter().collect(),
            changes: Some(Changes::default()),
            ..Pass::default()
        };
        while let Some(key) = pass.queue.pop_first() {
            self.plan(model, &key, &mut pass);
        }
        let changes = pass.changes.take().unwrap_or_default();
        let mut new_problems = Vec::new();
        for key in &changes.affected {
            self.report(key, &mut new_problems);
        }
        let frontends: Vec<FrontendChange> = (changes.before.into_iter())
            .filter_map(|(frontend, old)| {
                let new = self.desired.frontends.get(&frontend).cloned();
                (old != new).then_some(FrontendChange { frontend, old, new })
            })
            .collect();
        if frontends.len() * 2 > self.desired.frontends.len() {
            // Most frontends were planned anew: rebuilt in one pass, as after a full sync.
            self.desired.frontends = std::mem::take(&mut self.desired.frontends)
                .into_iter()
                .collect();
        }
        self.shrink();
        PlanDelta {
            frontends,
            new_problems,
            health_checks_changed: pass.health_checks_changed,
            services_planned: pass.services_planned,
        }
    }

    /// Plans one Service and takes its claims, desired frontends and health check; queues
    /// the Services that take over a frontend it let go.
    fn plan(&mut self, model: &Model, key: &ObjectKey, pass: &mut Pass) {
        pass.services_planned += 1;
        let record = model.service(key);
        let plan = plan_service(key, record, model.endpoint_slices_of(key), &self.node);
        if let Some(changes) = &mut pass.changes {
            changes.affected.insert(key.clone());
        }
        let old = self.services.remove(key).unwrap_or_default();
        let claimed: Vec<Frontend> = plan.frontends.iter().map(|(f, _)| *f).collect();

        for &frontend in old.frontends.iter().filter(|f| !claimed.contains(f)) {
            let owned = (self.claims.owner(&frontend)).is_some_and(|owner| owner.is_by(key));
            self.claims.remove(frontend, key);
            if let Some(changes) = &mut pass.changes {
                let claimants = self.claims.of(&frontend).iter().map(Claim::service);
                changes.affected.extend(claimants);
            }
            if owned {
                self.set_desired(frontend, None, &mut pass.changes);
                if let Some(next) = self.claims.owner(&frontend) {
                    pass.queue.insert(next.service());
                }
            }
        }
        for (frontend, frontend_plan) in plan.frontends {
            let claim = Claim {
                port: frontend_plan.service.clone(),
                kind: frontend_plan.kind,
            };
            if self.claims.upsert(frontend, claim)
                && let Some(changes) = &mut pass.changes
            {
                let claimants = self.claims.of(&frontend).iter().map(Claim::service);
                changes.affected.extend(claimants);
            }
            let owned = (self.claims.owner(&frontend)).is_some_and(|owner| owner.is_by(key));
            if owned {
                self.set_desired(frontend, Some(frontend_plan), &mut pass.changes);
            }
        }

        let health_check = plan.health_check;
        if self.health_checks.get(key) != health_check.as_ref() {
            pass.health_checks_changed = true;
            match health_check {
                Some(check) => self.health_checks.insert(key.clone(), check),
                None => self.health_checks.remove(key),
            };
        }
        if record.is_some() {
            let state = ServiceState {
                frontends: claimed,
                problems: plan.problems,
                reported: old.reported,
            };
            self.services.insert(key.clone(), state);
        }
    }

    /// Adds a Service's problems not reported before to `new_problems`, and remembers
    /// them as reported.
    fn report(&mut self, key: &ObjectKey, new_problems: &mut Vec<Problem>) {
        let problems = self.problems_of(key);
        let Some(state) = self.services.get_mut(key) else {
            return;
        };
        new_problems.extend(
            (problems.iter())
                .filter(|problem| !state.reported.contains(problem))
                .cloned(),
        );
        state.reported = problems;
    }

    fn shrink(&mut self) {
        crate::allocator::shrink_sparse(&mut self.services);
        self.claims.shrink_sparse();
    }

    /// Sets a frontend's desired plan, remembering the one it had first in this update
    /// when the update records its changes.
    fn set_desired(
        &mut self,
        frontend: Frontend,
        plan: Option<FrontendPlan>,
        changes: &mut Option<Changes>,
    ) {
        let current = self.desired.frontends.get(&frontend);
        if current == plan.as_ref() {
            return;
        }
        if let Some(changes) = changes {
            (changes.before)
                .entry(frontend)
                .or_insert_with(|| current.cloned());
        }
        match plan {
            Some(plan) => self.desired.frontends.insert(frontend, plan),
            None => self.desired.frontends.remove(&frontend),
        };
    }

    /// A Service's current problems: its own, then the frontends it lost to others.
    fn problems_of(&self, key: &ObjectKey) -> Vec<Problem> {
        let Some(state) = self.services.get(key) else {
            return Vec::new();
        };
        let lost =
            (state.frontends.iter()).filter_map(|&frontend| self.claims.lost_by(frontend, key));
        state.problems.iter().cloned().chain(lost).collect()
    }
}

/// The facts of the node that planning reads.
fn node_context(node: &NodeFacts, model: &Model) -> NodeContext {
    let node_labels = model.node_labels();
    let zone = if node_labels.is_empty() {
        node.zone.as_ref()
    } else {
        node_labels.get(ZONE_LABEL)
    };
    NodeContext {
        identity: NodeIdentity {
            node_name: node.node_name.clone(),
            zone: zone.cloned().unwrap_or_default(),
        },
        node_port_addresses: node.node_port_addresses(),
        source_range_node_ips: source_range_node_ips(node, model),
        selection: node.selection,
    }
}

/// The node's address of each family as kube-proxy's source-range rule sees it (its
/// `nodeIP`): the Node's primary address of that family when known, else each of the
/// node's addresses of that family.
fn source_range_node_ips(node: &NodeFacts, model: &Model) -> Vec<IpAddr> {
    let state = model.node_state();
    let primaries = [
        (Family::Ipv4, state.primary_ipv4.map(IpAddr::V4)),
        (Family::Ipv6, state.primary_ipv6.map(IpAddr::V6)),
    ];
    let mut ips = Vec::new();
    for (family, primary) in primaries {
        match primary {
            Some(primary) => ips.push(primary),
            None => ips.extend((node.addresses.iter()).filter(|addr| Family::of(**addr) == family)),
        }
    }
    ips
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::testing::svc;

    /// Found by the writer's property test: a Service removed in the same sync as a node
    /// change (or a resync) must not stay programmed because the full update planned only
    /// the model's Services.
    #[test]
    fn a_full_update_lets_the_frontends_of_removed_services_go() {
        let node = NodeFacts::default();
        let mut model = Model::default();
        model
            .insert_service(svc("web/a", "198.19.0.1").port("http", 80, "TCP").0)
            .unwrap();
        let mut planner = Planner::new(&node, &model);
        planner.update_all(&model);
        assert_eq!(planner.desired().frontends.len(), 1);

        model.remove_service(&ObjectKey::new("web", "a"));
        planner.update_all(&model);
        assert!(planner.desired().frontends.is_empty());
    }
}
