//! The map contents as data: [`MapImage`] (what SERVICES, BACKENDS, MEMBERSHIP,
//! SOURCE_RANGES and SVC_NAMES hold), the one place that turns a frontend's plan into its
//! entries ([`frontend_entries`], with stable ids from an [`IdRegistry`]), and [`diff`], the
//! one ordering rule that keeps every packet consistent while entries change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aya::maps::lpm_trie::Key;
use proxy_common::{
    Backend, MembershipKey, ServiceKey, ServiceName, ServiceValue, SourceRange, membership,
    service_flags,
};

use crate::plan::{DesiredState, EmptyFrontend, Frontend, FrontendKind, FrontendPlan};

/// The contents of the SERVICES, BACKENDS, MEMBERSHIP and SVC_NAMES maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapImage {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    /// Each frontend's endpoint addresses: selectable, serving (`proxy_common::membership`).
    pub membership: BTreeMap<MembershipKey, u8>,
    /// rev_nat_id → the Service port of that frontend.
    pub names: BTreeMap<u32, ServiceName>,
    /// The client prefixes of each restricted frontend (SOURCE_RANGES' keys).
    pub source_ranges: BTreeSet<SourceRangeEntry>,
}

/// One SOURCE_RANGES key: a frontend's prefix of `prefix_len` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRangeEntry {
    pub range: SourceRange,
    pub prefix_len: u8,
}

impl SourceRangeEntry {
    pub fn key(&self) -> Key<SourceRange> {
        Key::new(
            SourceRange::FRONTEND_BITS + u32::from(self.prefix_len),
            self.range,
        )
    }

    pub fn from_key(key: &Key<SourceRange>) -> Self {
        Self {
            range: key.data(),
            prefix_len: key.prefix_len().saturating_sub(SourceRange::FRONTEND_BITS) as u8,
        }
    }
}

/// Gives backends and frontends ids that stay the same across syncs and daemon restarts
/// (it is seeded from the pinned maps), so conntrack entries keep naming the right ones.
/// Ids grow monotonically and are not reused soon after release, so a listing never
/// attributes an old flow to a new backend.
#[derive(Clone, Debug, Default)]
pub struct IdRegistry {
    backends: HashMap<Backend, u32>,
    frontends: HashMap<ServiceKey, u32>,
    last_backend_id: u32,
    last_rev_nat_id: u32,
}

impl IdRegistry {
    /// Learns the ids already in the maps.
    pub fn from_image(image: &MapImage) -> Self {
        let mut ids = Self::default();
        for (id, backend) in &image.backends {
            ids.backends.insert(*backend, *id);
            ids.last_backend_id = ids.last_backend_id.max(*id);
        }
        for (key, value) in image.services.iter().filter(|(key, _)| key.slot == 0) {
            ids.frontends.insert(*key, value.rev_nat_id);
            ids.last_rev_nat_id = ids.last_rev_nat_id.max(value.rev_nat_id);
        }
        ids
    }

    fn backend_id(&mut self, backend: Backend) -> u32 {
        if let Some(id) = self.backends.get(&backend) {
            return *id;
        }
        let id = next_free(&mut self.last_backend_id, |id| {
            self.backends.values().any(|used| *used == id)
        });
        self.backends.insert(backend, id);
        id
    }

    fn rev_nat_id(&mut self, frontend: ServiceKey) -> u32 {
        if let Some(id) = self.frontends.get(&frontend) {
            return *id;
        }
        let id = next_free(&mut self.last_rev_nat_id, |id| {
            self.frontends.values().any(|used| *used == id)
        });
        self.frontends.insert(frontend, id);
        id
    }

    /// Forgets a frontend's id (it left the maps).
    pub fn release_frontend(&mut self, header: ServiceKey) {
        self.frontends.remove(&header);
    }

    /// Forgets a backend's id (no slot names it any more).
    pub fn release_backend(&mut self, backend: &Backend) {
        self.backends.remove(backend);
    }

    /// Gives unused buckets back after most ids were released.
    pub fn shrink_sparse(&mut self) {
        crate::allocator::shrink_sparse(&mut self.backends);
        crate::allocator::shrink_sparse(&mut self.frontends);
    }

    /// Forgets the ids of everything that is no longer in `image`.
    fn retain(&mut self, image: &MapImage) {
        self.backends
            .retain(|_, id| image.backends.contains_key(id));
        self.frontends
            .retain(|key, _| image.services.contains_key(&key.with_slot(0)));
    }
}

/// The id after `last` that is not 0 and not in use. The in-use check only runs after the
/// 32-bit counter wraps, which in practice never happens.
fn next_free(last: &mut u32, in_use: impl Fn(u32) -> bool) -> u32 {
    let mut wrapped = false;
    loop {
        *last = last.wrapping_add(1);
        if *last == 0 {
            *last = 1;
            wrapped = true;
        }
        if !wrapped || !in_use(*last) {
            return *last;
        }
    }
}

/// The header flags: the frontend's kind, whether it drops while empty, and whether its
/// clients are restricted to source ranges.
fn header_flags(plan: &FrontendPlan) -> u16 {
    let kind = match plan.kind {
        FrontendKind::ClusterIp => service_flags::CLUSTER_IP,
        FrontendKind::NodePort => service_flags::NODE_PORT,
        FrontendKind::ExternalIp => service_flags::EXTERNAL_IP,
        FrontendKind::LoadBalancer => service_flags::LOAD_BALANCER,
    };
    let mut flags = kind;
    if plan.backends.is_empty() && plan.when_empty == EmptyFrontend::Drop {
        flags |= service_flags::NO_LOCAL_ENDPOINTS;
    }
    if !plan.source_ranges.is_empty() {
        flags |= service_flags::SOURCE_RANGES;
    }
    flags
}

/// The key of a frontend's header (slot 0).
pub fn header_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey::new(
        frontend.addr.octets(),
        frontend.port,
        frontend.protocol.number(),
        0,
    )
}

/// Builds the map contents for `desired`, forgetting the ids of everything else.
pub fn materialize(desired: &DesiredState, ids: &mut IdRegistry) -> MapImage {
    let mut image = MapImage::default();
    for (frontend, plan) in &desired.frontends {
        frontend_entries(frontend, plan, ids, &mut image);
    }
    ids.retain(&image);
    image
}

/// Adds one frontend's entries to `image`: its header, one slot per backend (in the plan's
/// sorted order) and those backends, its MEMBERSHIP entries, the SOURCE_RANGES prefixes of a restricted one, and its SVC_NAMES name. The one place
/// that knows how a plan becomes map entries. A Service port whose name exceeds
/// Kubernetes' limits (possible only in hand-written manifests) is balanced all the same,
/// just listed without a name.
pub fn frontend_entries(
    frontend: &Frontend,
    plan: &FrontendPlan,
    ids: &mut IdRegistry,
    image: &mut MapImage,
) {
    let proto = frontend.protocol.number();
    let header = header_key(frontend);
    let rev_nat_id = ids.rev_nat_id(header);
    for (index, backend) in plan.backends.iter().enumerate() {
        let backend = Backend::new(backend.addr.octets(), backend.port, proto);
        let backend_id = ids.backend_id(backend);
        image.backends.insert(backend_id, backend);
        let slot = u16::try_from(index + 1).expect("more than 65535 backends for one frontend");
        image.services.insert(
            header.with_slot(slot),
            ServiceValue {
                backend_id,
                ..ServiceValue::default()
            },
        );
        *image
            .membership
            .entry(MembershipKey {
                rev_nat_id,
                addr: backend.addr,
            })
            .or_default() |= membership::SELECTABLE;
    }
    insert_serving(&mut image.membership, rev_nat_id, plan);
    for network in &plan.source_ranges {
        image.source_ranges.insert(SourceRangeEntry {
            range: SourceRange {
                rev_nat_id,
                addr: u32::from_ne_bytes(network.network().octets()),
            },
            prefix_len: network.prefix_len(),
        });
    }
    image.services.insert(
        header,
        ServiceValue {
            backend_id: 0,
            rev_nat_id,
            count: u16::try_from(plan.backends.len()).unwrap_or(u16::MAX),
            flags: header_flags(plan),
            // The planner keeps timeouts within the API's 1..=86400 s.
            affinity_timeout_s: plan.session_affinity.map_or(0, |timeout| {
                u32::try_from(timeout.as_secs()).unwrap_or(u32::MAX)
            }),
        },
    );
    let service = &plan.service;
    if let Some(name) = ServiceName::new(&service.namespace, &service.name, &service.port_name) {
        image.names.insert(rev_nat_id, name);
    }
}

/// Marks a frontend's serving endpoints in MEMBERSHIP: their flows stay on them.
fn insert_serving(
    membership: &mut BTreeMap<MembershipKey, u8>,
    rev_nat_id: u32,
    plan: &FrontendPlan,
) {
    for addr in &plan.serving_addrs {
        let key = MembershipKey {
            rev_nat_id,
            addr: u32::from_ne_bytes(addr.octets()),
        };
        *membership.entry(key).or_default() |= membership::SERVING;
    }
}

impl MapImage {
    /// The entries this image holds for one frontend (header, slots, membership,
    /// source ranges, name), without its backends, which frontends share.
    pub fn frontend_part(&self, frontend: &Frontend) -> MapImage {
        let header = header_key(frontend);
        let mut part = MapImage::default();
        let last = ServiceKey {
            slot: u16::MAX,
            _pad1: u16::MAX,
            ..header
        };
        part.services.extend(self.services.range(header..=last));
        let Some(rev_nat_id) = part.services.get(&header).map(|value| value.rev_nat_id) else {
            return part;
        };
        let members = MembershipKey {
            rev_nat_id,
            addr: 0,
        }..=MembershipKey {
            rev_nat_id,
            addr: u32::MAX,
        };
        part.membership.extend(self.membership.range(members));
        let ranges = SourceRangeEntry {
            range: SourceRange {
                rev_nat_id,
                addr: 0,
            },
            prefix_len: 0,
        }..=SourceRangeEntry {
            range: SourceRange {
                rev_nat_id,
                addr: u32::MAX,
            },
            prefix_len: u8::MAX,
        };
        part.source_ranges.extend(self.source_ranges.range(ranges));
        part.names
            .extend(self.names.get(&rev_nat_id).map(|name| (rev_nat_id, *name)));
        part
    }

    /// The backend ids named by this image's slots.
    pub fn slot_backends(&self) -> impl Iterator<Item = u32> + '_ {
        self.services
            .iter()
            .filter(|(key, _)| key.slot != 0)
            .map(|(_, value)| value.backend_id)
    }

    /// Adds `other`'s entries.
    pub fn extend(&mut self, other: MapImage) {
        self.services.extend(other.services);
        self.backends.extend(other.backends);
        self.membership.extend(other.membership);
        self.names.extend(other.names);
        self.source_ranges.extend(other.source_ranges);
    }
}

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapOp {
    PutName(u32, ServiceName),
    PutBackend(u32, Backend),
    PutService(ServiceKey, ServiceValue),
    PutMembership(MembershipKey, u8),
    PutSourceRange(SourceRangeEntry),
    DeleteService(ServiceKey),
    DeleteMembership(MembershipKey),
    DeleteSourceRange(SourceRangeEntry),
    DeleteBackend(u32),
    DeleteName(u32),
}

/// The writes that turn one image into another, phase by phase in the one order that
/// keeps every packet consistent (see [`diff`]). The writes of one phase are independent
/// of each other — any order of them is as safe as another — so each phase goes to the
/// kernel as one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapWrites {
    pub put_names: Vec<(u32, ServiceName)>,
    pub put_backends: Vec<(u32, Backend)>,
    /// Membership entries that gain bits (or appear).
    pub grow_membership: Vec<(MembershipKey, u8)>,
    pub put_slots: Vec<(ServiceKey, ServiceValue)>,
    pub put_source_ranges: Vec<SourceRangeEntry>,
    pub put_headers: Vec<(ServiceKey, ServiceValue)>,
    pub delete_headers: Vec<ServiceKey>,
    pub delete_slots: Vec<ServiceKey>,
    /// Membership entries that lose bits.
    pub shrink_membership: Vec<(MembershipKey, u8)>,
    pub delete_membership: Vec<MembershipKey>,
    pub delete_source_ranges: Vec<SourceRangeEntry>,
    pub delete_backends: Vec<u32>,
    pub delete_names: Vec<u32>,
}

impl MapWrites {
    /// How many single writes these are.
    pub fn len(&self) -> usize {
        self.put_names.len()
            + self.put_backends.len()
            + self.grow_membership.len()
            + self.put_slots.len()
            + self.put_source_ranges.len()
            + self.put_headers.len()
            + self.delete_headers.len()
            + self.delete_slots.len()
            + self.shrink_membership.len()
            + self.delete_membership.len()
            + self.delete_source_ranges.len()
            + self.delete_backends.len()
            + self.delete_names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every write, one at a time, in order: what the kernel does with the batches.
    pub fn ops(&self) -> impl Iterator<Item = MapOp> + '_ {
        let puts = (self.put_names.iter())
            .map(|(id, name)| MapOp::PutName(*id, *name))
            .chain((self.put_backends.iter()).map(|(id, backend)| MapOp::PutBackend(*id, *backend)))
            .chain(put_membership(&self.grow_membership))
            .chain((self.put_slots.iter()).map(|(key, value)| MapOp::PutService(*key, *value)))
            .chain((self.put_source_ranges.iter()).map(|entry| MapOp::PutSourceRange(*entry)))
            .chain((self.put_headers.iter()).map(|(key, value)| MapOp::PutService(*key, *value)));
        let deletes = (self.delete_headers.iter())
            .chain(&self.delete_slots)
            .map(|key| MapOp::DeleteService(*key))
            .chain(put_membership(&self.shrink_membership))
            .chain((self.delete_membership.iter()).map(|key| MapOp::DeleteMembership(*key)))
            .chain((self.delete_source_ranges.iter()).map(|entry| MapOp::DeleteSourceRange(*entry)))
            .chain((self.delete_backends.iter()).map(|id| MapOp::DeleteBackend(*id)))
            .chain((self.delete_names.iter()).map(|id| MapOp::DeleteName(*id)));
        puts.chain(deletes)
    }
}

fn put_membership(entries: &[(MembershipKey, u8)]) -> impl Iterator<Item = MapOp> + '_ {
    (entries.iter()).map(|(key, bits)| MapOp::PutMembership(*key, *bits))
}

/// The writes that turn `current` into `next`, ordered so that at every step each
/// frontend's header only counts slots that exist and every slot names a backend that
/// exists and is a member of the frontend: new backends, grown membership, then new slots
/// and source ranges, then headers; then removed headers, slots, shrunk membership,
/// source ranges and backends. So a header flagged `SOURCE_RANGES` never lacks its
/// ranges, which would drop every client, and a flow to a new backend never looks as if
/// its backend had left. Names come first and go last, so a listing never shows a live
/// frontend without its name.
pub fn diff(current: &MapImage, next: &MapImage) -> MapWrites {
    let mut writes = MapWrites::default();
    for (id, name) in &next.names {
        if current.names.get(id) != Some(name) {
            writes.put_names.push((*id, *name));
        }
    }
    for (id, backend) in &next.backends {
        if current.backends.get(id) != Some(backend) {
            writes.put_backends.push((*id, *backend));
        }
    }
    // Membership that grows goes first, membership that shrinks with the removals.
    let changed_membership = (next.membership.iter())
        .filter(|(key, bits)| current.membership.get(key) != Some(bits))
        .map(|(key, bits)| (*key, *bits));
    (writes.grow_membership, writes.shrink_membership) =
        changed_membership.partition(|(key, bits)| {
            let before = current.membership.get(key).copied().unwrap_or(0);
            before & !*bits == 0
        });
    let changed_services = (next.services.iter())
        .filter(|(key, value)| current.services.get(key) != Some(value))
        .map(|(key, value)| (*key, *value));
    (writes.put_headers, writes.put_slots) = changed_services.partition(|(key, _)| key.slot == 0);
    writes.put_source_ranges = (next.source_ranges)
        .difference(&current.source_ranges)
        .copied()
        .collect();

    let removed_services = (current.services.keys())
        .filter(|key| !next.services.contains_key(key))
        .copied();
    (writes.delete_headers, writes.delete_slots) = removed_services.partition(|key| key.slot == 0);
    writes.delete_membership = (current.membership.keys())
        .filter(|key| !next.membership.contains_key(key))
        .copied()
        .collect();
    writes.delete_source_ranges = (current.source_ranges)
        .difference(&next.source_ranges)
        .copied()
        .collect();
    writes.delete_backends = (current.backends.keys())
        .filter(|id| !next.backends.contains_key(id))
        .copied()
        .collect();
    writes.delete_names = (current.names.keys())
        .filter(|id| !next.names.contains_key(id))
        .copied()
        .collect();
    writes
}

impl MapImage {
    /// Applies one operation to this in-memory image.
    pub fn apply(&mut self, op: MapOp) {
        match op {
            MapOp::PutName(id, name) => {
                self.names.insert(id, name);
            }
            MapOp::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
            }
            MapOp::PutService(key, value) => {
                self.services.insert(key, value);
            }
            MapOp::PutMembership(key, bits) => {
                self.membership.insert(key, bits);
            }
            MapOp::DeleteService(key) => {
                self.services.remove(&key);
            }
            MapOp::DeleteMembership(key) => {
                self.membership.remove(&key);
            }
            MapOp::PutSourceRange(entry) => {
                self.source_ranges.insert(entry);
            }
            MapOp::DeleteSourceRange(entry) => {
                self.source_ranges.remove(&entry);
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
            MapOp::DeleteName(id) => {
                self.names.remove(&id);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::plan::{
        BackendAddr, EmptyFrontend, Frontend, FrontendPlan, Protocol, ServicePortName,
    };

    fn frontend(addr: [u8; 4], port: u16) -> Frontend {
        Frontend {
            addr: Ipv4Addr::from(addr),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn backends(last_octets: &[u8]) -> Vec<BackendAddr> {
        last_octets
            .iter()
            .map(|octet| BackendAddr {
                addr: Ipv4Addr::new(198, 18, 1, *octet),
                port: 8080,
            })
            .collect()
    }

    fn desired(entries: &[(Frontend, &[u8])]) -> DesiredState {
        named(
            entries
                .iter()
                .map(|(frontend, octets)| (*frontend, "web", *octets)),
        )
    }

    /// Like [`desired`], each frontend for its own Service `default/<name>`.
    fn named<'a>(entries: impl IntoIterator<Item = (Frontend, &'a str, &'a [u8])>) -> DesiredState {
        let mut state = DesiredState::default();
        for (frontend, name, octets) in entries {
            state.frontends.insert(
                frontend,
                FrontendPlan {
                    service: ServicePortName {
                        namespace: "default".into(),
                        name: name.into(),
                        port_name: "".into(),
                    },
                    kind: FrontendKind::ClusterIp,
                    backends: backends(octets),
                    when_empty: EmptyFrontend::Reject,
                    session_affinity: None,
                    serving_addrs: Vec::new(),
                    source_ranges: Vec::new(),
                },
            );
        }
        state
    }

    /// The same state with session affinity (3 hours) on every frontend.
    fn with_affinity(mut state: DesiredState) -> DesiredState {
        for plan in state.frontends.values_mut() {
            plan.session_affinity = Some(Duration::from_secs(10_800));
        }
        state
    }

    /// Every header counts only existing slots; every slot names an existing backend whose
    /// address is a selectable member of the frontend; every header's frontend has its name.
    pub(in crate::writer) fn assert_consistent(image: &MapImage, step: usize) {
        for (key, value) in image.services.iter().filter(|(k, _)| k.slot == 0) {
            assert!(
                image.names.contains_key(&value.rev_nat_id),
                "step {step}: {key:?} has no name"
            );
            for slot in 1..=value.count {
                let slot_value = image.services.get(&key.with_slot(slot));
                let slot_value = slot_value
                    .unwrap_or_else(|| panic!("step {step}: {key:?} counts missing slot {slot}"));
                let backend = image.backends.get(&slot_value.backend_id);
                let backend = backend.unwrap_or_else(|| {
                    panic!("step {step}: slot {slot} of {key:?} names a missing backend")
                });
                let member = MembershipKey {
                    rev_nat_id: value.rev_nat_id,
                    addr: backend.addr,
                };
                assert!(
                    image.membership.get(&member).copied().unwrap_or(0) & membership::SELECTABLE
                        != 0,
                    "step {step}: slot {slot} of {key:?} is no selectable member"
                );
            }
        }
    }

    /// Applies the diff from `from` to `to` one op at a time, checking consistency at
    /// every step, and returns the number of ops.
    fn transition(from: &DesiredState, to: &DesiredState) -> usize {
        let mut ids = IdRegistry::default();
        let mut image = materialize(from, &mut ids);
        let next = materialize(to, &mut ids);
        let ops: Vec<MapOp> = diff(&image, &next).ops().collect();
        for (step, op) in ops.iter().enumerate() {
            image.apply(*op);
            assert_consistent(&image, step);
        }
        assert_eq!(image, next);
        ops.len()
    }

    #[test]
    fn transitions_stay_consistent_at_every_step() {
        let vip = frontend([198, 19, 0, 10], 80);
        let other = frontend([198, 19, 0, 11], 53);
        let cases: &[(&str, DesiredState, DesiredState)] = &[
            (
                "add first frontend",
                desired(&[]),
                desired(&[(vip, &[10, 11, 12])]),
            ),
            (
                "grow",
                desired(&[(vip, &[10])]),
                desired(&[(vip, &[10, 11, 12])]),
            ),
            (
                "shrink",
                desired(&[(vip, &[10, 11, 12])]),
                desired(&[(vip, &[12])]),
            ),
            (
                "replace all",
                desired(&[(vip, &[10, 11])]),
                desired(&[(vip, &[20, 21])]),
            ),
            (
                "to no endpoints",
                desired(&[(vip, &[10, 11])]),
                desired(&[(vip, &[])]),
            ),
            (
                "remove frontend",
                desired(&[(vip, &[10]), (other, &[10])]),
                desired(&[(other, &[10])]),
            ),
            (
                "remove everything",
                desired(&[(vip, &[10, 11]), (other, &[12])]),
                desired(&[]),
            ),
            (
                "affinity frontend shrinks and grows",
                with_affinity(desired(&[(vip, &[10, 11])])),
                with_affinity(desired(&[(vip, &[11, 12])])),
            ),
            (
                "affinity switched on",
                desired(&[(vip, &[10, 11])]),
                with_affinity(desired(&[(vip, &[10, 11])])),
            ),
            (
                "affinity frontend removed",
                with_affinity(desired(&[(vip, &[10]), (other, &[12])])),
                desired(&[(other, &[12])]),
            ),
        ];
        for (name, from, to) in cases {
            let ops = transition(from, to);
            assert!(ops > 0, "{name}: expected writes");
        }
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let state = desired(&[(frontend([198, 19, 0, 10], 80), &[10, 11, 12])]);
        assert_eq!(transition(&state, &state), 0);
    }

    #[test]
    fn shared_backend_is_written_once_and_kept_while_used() {
        let a = frontend([198, 19, 0, 10], 80);
        let b = frontend([198, 19, 0, 11], 80);
        let mut ids = IdRegistry::default();
        let both = materialize(&desired(&[(a, &[10]), (b, &[10])]), &mut ids);
        assert_eq!(both.backends.len(), 1);
        let one = materialize(&desired(&[(b, &[10])]), &mut ids);
        let ops: Vec<MapOp> = diff(&both, &one).ops().collect();
        assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(_))));
    }

    #[test]
    fn ids_are_stable_across_syncs_and_restarts() {
        let vip = frontend([198, 19, 0, 10], 80);
        let mut ids = IdRegistry::default();
        let first = materialize(&desired(&[(vip, &[10, 11])]), &mut ids);
        let second = materialize(&desired(&[(vip, &[11, 12])]), &mut ids);
        let id_of = |image: &MapImage, octet: u8| {
            image
                .backends
                .iter()
                .find(|(_, b)| b.addr.to_ne_bytes()[3] == octet)
                .map(|(id, _)| *id)
        };
        assert_eq!(id_of(&first, 11), id_of(&second, 11));
        assert_ne!(
            id_of(&first, 10),
            id_of(&second, 12),
            "released id reused at once"
        );

        let mut restarted = IdRegistry::from_image(&second);
        let after_restart = materialize(&desired(&[(vip, &[11, 12])]), &mut restarted);
        assert_eq!(after_restart, second);
    }

    #[test]
    fn header_records_count_kind_and_rev_nat_id() {
        let vip = frontend([198, 19, 0, 10], 80);
        let image = materialize(
            &desired(&[(vip, &[10, 11, 12])]),
            &mut IdRegistry::default(),
        );
        let header = image.services[&ServiceKey::new([198, 19, 0, 10], 80, 6, 0)];
        assert_eq!(header.count, 3);
        assert_eq!(header.flags, service_flags::CLUSTER_IP);
        assert_ne!(header.rev_nat_id, 0);
        assert_eq!(image.services.len(), 4);
    }

    #[test]
    fn names_follow_their_frontends() {
        let vip = frontend([198, 19, 0, 10], 80);
        let other = frontend([198, 19, 0, 11], 80);
        let mut ids = IdRegistry::default();
        let before = materialize(
            &named([(vip, "web", &[10][..]), (other, "api", &[11])]),
            &mut ids,
        );
        let name_of = |image: &MapImage, key: ServiceKey| {
            let id = image.services[&key].rev_nat_id;
            image.names[&id].name().to_owned()
        };
        let vip_key = ServiceKey::new([198, 19, 0, 10], 80, 6, 0);
        assert_eq!(name_of(&before, vip_key), "web");

        // `api` takes over the VIP (same frontend, same id) and `other` goes away.
        let after = materialize(&named([(vip, "api", &[11][..])]), &mut ids);
        assert_eq!(name_of(&after, vip_key), "api");
        assert_eq!(after.names.len(), 1);
        let ops: Vec<MapOp> = diff(&before, &after).ops().collect();
        let rev_nat_id = after.services[&vip_key].rev_nat_id;
        assert!(ops.contains(&MapOp::PutName(rev_nat_id, after.names[&rev_nat_id])));
        assert!(matches!(ops.last(), Some(MapOp::DeleteName(_))), "{ops:?}");
    }

    #[test]
    fn overlong_names_leave_the_frontend_unnamed_but_balanced() {
        let vip = frontend([198, 19, 0, 10], 80);
        let long = "x".repeat(64);
        let image = materialize(
            &named([(vip, long.as_str(), &[10][..])]),
            &mut IdRegistry::default(),
        );
        assert!(image.names.is_empty());
        assert_eq!(image.services.len(), 2);
    }

    #[test]
    fn next_free_skips_zero_and_used_ids_after_wrapping() {
        let mut last = u32::MAX - 1;
        assert_eq!(next_free(&mut last, |_| false), u32::MAX);
        assert_eq!(next_free(&mut last, |id| id == 1 || id == 2), 3);
    }

    #[test]
    fn affinity_frontends_record_their_timeout() {
        let vip = frontend([198, 19, 0, 10], 80);
        let other = frontend([198, 19, 0, 11], 80);
        let mut state = desired(&[(vip, &[10, 11]), (other, &[12])]);
        state.frontends.get_mut(&vip).unwrap().session_affinity = Some(Duration::from_secs(2));
        let image = materialize(&state, &mut IdRegistry::default());
        let vip_header = image.services[&ServiceKey::new([198, 19, 0, 10], 80, 6, 0)];
        let other_header = image.services[&ServiceKey::new([198, 19, 0, 11], 80, 6, 0)];
        assert_eq!(
            (
                vip_header.affinity_timeout_s,
                other_header.affinity_timeout_s
            ),
            (2, 0)
        );
    }

    #[test]
    fn every_frontend_records_its_selectable_and_serving_addresses() {
        let vip = frontend([198, 19, 0, 10], 80);
        let empty = frontend([198, 19, 0, 11], 80);
        let mut ids = IdRegistry::default();
        let mut state = desired(&[(vip, &[10, 11]), (empty, &[])]);
        // pod .12 is terminating but serving: it keeps its flows, takes no new ones.
        state.frontends.get_mut(&vip).unwrap().serving_addrs = [10, 11, 12]
            .map(|octet| Ipv4Addr::new(198, 18, 1, octet))
            .into();
        let image = materialize(&state, &mut ids);
        let rev_nat_id = |key: [u8; 4]| image.services[&ServiceKey::new(key, 80, 6, 0)].rev_nat_id;
        let vip_id = rev_nat_id([198, 19, 0, 10]);
        let member = |rev_nat_id, octet| MembershipKey {
            rev_nat_id,
            addr: u32::from_ne_bytes([198, 18, 1, octet]),
        };
        let both = membership::SELECTABLE | membership::SERVING;
        let expected = BTreeMap::from([
            (member(vip_id, 10), both),
            (member(vip_id, 11), both),
            (member(vip_id, 12), membership::SERVING),
        ]);
        assert_eq!(image.membership, expected);

        // A backend that leaves loses its entry after the header stops counting it.
        let plan = state.frontends.get_mut(&vip).unwrap();
        plan.backends.truncate(1);
        plan.serving_addrs.truncate(1);
        let next = materialize(&state, &mut ids);
        let ops: Vec<MapOp> = diff(&image, &next).ops().collect();
        let position = |wanted: &MapOp| ops.iter().position(|op| op == wanted).unwrap();
        let header_update = ops
            .iter()
            .position(|op| matches!(op, MapOp::PutService(key, _) if key.slot == 0))
            .unwrap();
        assert!(
            header_update < position(&MapOp::DeleteMembership(member(vip_id, 11))),
            "{ops:?}"
        );
    }

    #[test]
    fn empty_frontends_are_flagged_when_they_drop() {
        let vip = frontend([198, 19, 0, 10], 80);
        let flags_with = |backends: &[u8], when_empty| {
            let mut state = desired(&[(vip, backends)]);
            state.frontends.get_mut(&vip).unwrap().when_empty = when_empty;
            let image = materialize(&state, &mut IdRegistry::default());
            image.services[&ServiceKey::new([198, 19, 0, 10], 80, 6, 0)].flags
        };
        let cluster_ip = service_flags::CLUSTER_IP;
        let dropping = cluster_ip | service_flags::NO_LOCAL_ENDPOINTS;
        assert_eq!(flags_with(&[], EmptyFrontend::Reject), cluster_ip);
        assert_eq!(flags_with(&[], EmptyFrontend::Drop), dropping);
        assert_eq!(flags_with(&[10], EmptyFrontend::Drop), cluster_ip);
    }

    #[test]
    fn source_ranges_come_before_their_flag_and_go_after_it() {
        let lb = frontend([198, 18, 8, 1], 80);
        let mut state = desired(&[(lb, &[1])]);
        let mut ids = IdRegistry::default();
        let open = materialize(&state, &mut ids);
        let plan = state.frontends.get_mut(&lb).unwrap();
        plan.kind = FrontendKind::LoadBalancer;
        plan.source_ranges = vec!["198.18.0.0/24".parse().unwrap()];
        let restricted = materialize(&state, &mut ids);

        let header = restricted.services[&ServiceKey::new([198, 18, 8, 1], 80, 6, 0)];
        assert_ne!(header.flags & service_flags::SOURCE_RANGES, 0);
        let entry = SourceRangeEntry {
            range: SourceRange {
                rev_nat_id: header.rev_nat_id,
                addr: u32::from_ne_bytes([198, 18, 0, 0]),
            },
            prefix_len: 24,
        };
        assert_eq!(restricted.source_ranges, BTreeSet::from([entry]));
        assert_eq!(entry.key().prefix_len(), 32 + 24);

        let is_header = |op: &MapOp| matches!(op, MapOp::PutService(key, _) if key.slot == 0);
        let ops: Vec<MapOp> = diff(&open, &restricted).ops().collect();
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert_eq!(ops[0], MapOp::PutSourceRange(entry));
        assert!(is_header(&ops[1]), "{ops:?}");
        let ops: Vec<MapOp> = diff(&restricted, &open).ops().collect();
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(is_header(&ops[0]), "{ops:?}");
        assert_eq!(ops[1], MapOp::DeleteSourceRange(entry));
    }
}
