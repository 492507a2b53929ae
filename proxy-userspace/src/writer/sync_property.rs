//! The change path's property test: random sequences of changes — Services and
//! EndpointSlices added, changed and deleted (conflicting frontends, traffic policies,
//! session affinity, source ranges and Maglev tables switched on and off, endpoints on this node and
//! others, terminating, hinted) and changes of the node (addresses, zone, primary
//! address) — each synced as the daemon syncs it (a delta, or a full sync when the node
//! changed), one to three changes per sync. After every step:
//! - the planner's incremental desired state equals a plan from scratch;
//! - the maps of each family written incrementally equal what a full sync writes into empty maps (ids
//!   aside: they depend on history), and a full sync over them has nothing left to write;
//! - every single write left the maps consistent (the writer's ordering rule);
//! - the backends' reference counts are exact: every backend in the maps is named by a
//!   slot, and each count is the number of slots naming it.
//!
//! Seeded, so a failure names its seed and step and replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use proxy_common::maglev::MaglevKey;
use proxy_common::{Address, Backend, FrontendKey, Ipv6, service_flags};

use super::image::maglev_table;
use super::tests::{FakeMaps, sync_into};
use super::{MapImage, MapMirror, Sync};
use crate::inspect::service_port_name;
use crate::model::selection::{ALGORITHM_ANNOTATION, SelectionDefaults, TABLE_SIZE_ANNOTATION};
use crate::model::{Model, ObjectKey};
use crate::plan::testing::{Slice, Svc, ep, slice, svc};
use crate::plan::{self, NodeFacts, Planner, ZONE_LABEL};

const SEEDS: u64 = 40;
const STEPS: usize = 150;

/// SplitMix64: small, seeded, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// A random subset, in order.
    fn subset<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        items.iter().filter(|_| self.chance(50)).cloned().collect()
    }
}

/// Few names and addresses, so Services collide on frontends and share backends.
const SERVICES: [(&str, &str); 6] = [
    ("a", "s0"),
    ("a", "s1"),
    ("a", "s2"),
    ("b", "s0"),
    ("b", "s1"),
    ("b", "s2"),
];
const CLUSTER_IPS: [&str; 4] = ["198.19.0.1", "198.19.0.2", "198.19.0.3", "198.19.0.4"];
const CLUSTER_IPS6: [&str; 2] = ["2001:db8:ff::1", "2001:db8:ff::2"];
const EXTERNAL_IPS: [&str; 3] = ["198.18.9.1", "198.18.9.2", "2001:db8:e::1"];
const INGRESS_IPS: [&str; 3] = ["198.18.8.1", "198.18.8.2", "2001:db8:1b::1"];
const PODS6: [&str; 3] = ["2001:db8:1::10", "2001:db8:1::11", "2001:db8:1::12"];
const PODS: [&str; 8] = [
    "198.18.1.10",
    "198.18.1.11",
    "198.18.1.12",
    "198.18.1.13",
    "198.18.1.14",
    "198.18.1.15",
    "198.18.1.16",
    "198.18.1.17",
];
const NODE: &str = "node-a";
const ZONES: [&str; 2] = ["zone-a", "zone-b"];

/// IPv4, dual-stack (either family first) or IPv6 only.
fn random_service(rng: &mut Rng, (namespace, name): (&str, &str)) -> Svc {
    let key = format!("{namespace}/{name}");
    let (ipv4, ipv6) = (rng.pick(&CLUSTER_IPS), rng.pick(&CLUSTER_IPS6));
    let mut service = match rng.below(5) {
        0 => svc(&key, ipv4)
            .cluster_ips(&[ipv4, ipv6])
            .ip_families(&["IPv4", "IPv6"]),
        1 => svc(&key, ipv6)
            .cluster_ips(&[ipv6, ipv4])
            .ip_families(&["IPv6", "IPv4"]),
        2 => svc(&key, ipv6),
        _ => svc(&key, ipv4),
    };
    let service_type = rng.pick(&["ClusterIP", "NodePort", "LoadBalancer"]);
    service = service.service_type(service_type);
    let node_ports = service_type != "ClusterIP";
    if rng.chance(20) {
        // A single unnamed port.
        service = service.port("", 80, "TCP");
        if node_ports {
            let ports = service.spec().ports.as_mut().expect("just added");
            ports[0].node_port = Some(rng.pick(&[30080, 30081]));
        }
    } else {
        if rng.chance(80) {
            service = if node_ports {
                service.node_port("http", 80, rng.pick(&[30080, 30081]))
            } else {
                service.port("http", 80, "TCP")
            };
        }
        if rng.chance(60) {
            service = service.port("dns", 53, "UDP");
            if node_ports {
                let ports = service.spec().ports.as_mut().expect("just added");
                ports.last_mut().expect("just added").node_port = Some(30053);
            }
        }
    }
    let external_ips: Vec<&str> = rng.subset(&EXTERNAL_IPS);
    if !external_ips.is_empty() {
        service = service.external_ips(&external_ips);
    }
    if service_type == "LoadBalancer" {
        for ip in rng.subset(&INGRESS_IPS) {
            service = service.ingress(Some(ip), None);
        }
        if rng.chance(40) {
            service = service.load_balancer_source_ranges(&[rng.pick(&[
                "198.18.0.0/24",
                "198.18.0.1/32",
                "10.0.0.0/8",
                "2001:db8::/64",
            ])]);
        }
    }
    if rng.chance(40) {
        service = service.external_traffic_policy("Local");
    }
    if rng.chance(30) {
        service = service.internal_traffic_policy("Local");
    }
    if rng.chance(40) {
        service = service.client_ip_affinity(rng.pick(&[None, Some(10), Some(60)]));
    }
    // Drawn from a side stream (the main one's state, which it leaves as it is), so the
    // sequences of the other cases stay those the seeds were chosen for.
    let mut side = Rng(rng.0 ^ 0x6d61_676c_6576);
    if side.chance(30) {
        service = service.annotation(ALGORITHM_ANNOTATION, "maglev");
        if side.chance(50) {
            service = service.annotation(TABLE_SIZE_ANNOTATION, side.pick(&["251", "509"]));
        }
    }
    service
}

fn random_slice(rng: &mut Rng, (namespace, service): (&str, &str), index: usize) -> Slice {
    let mut slice = slice(&format!("{namespace}/{service}-{index}"), service);
    let ipv6 = rng.chance(30);
    if ipv6 {
        slice = slice.address_type("IPv6");
    }
    match rng.below(4) {
        0 => slice = slice.port(None, Some(8080), "TCP"),
        _ => {
            if rng.chance(80) {
                slice = slice.port(Some("http"), Some(rng.pick(&[8080, 8081])), "TCP");
            }
            if rng.chance(60) {
                slice = slice.port(Some("dns"), Some(5353), "UDP");
            }
        }
    }
    let hinted = rng.chance(30);
    for _ in 0..rng.below(5) {
        let mut endpoint = ep(if ipv6 {
            rng.pick(&PODS6)
        } else {
            rng.pick(&PODS)
        });
        endpoint = match rng.below(6) {
            0 => endpoint.serving_terminating(),
            1 => endpoint.not_ready(),
            _ => endpoint,
        };
        match rng.below(3) {
            0 => endpoint = endpoint.on_node(NODE),
            1 => endpoint = endpoint.on_node("node-b"),
            _ => {}
        }
        if hinted {
            endpoint = endpoint.for_zones(&[rng.pick(&ZONES)]);
        }
        slice = slice.endpoint(endpoint);
    }
    slice
}

/// Changes the node: its addresses, its zone label or its primary address.
fn change_node(rng: &mut Rng, model: &mut Model, node: &mut NodeFacts) {
    match rng.below(3) {
        0 => {
            node.addresses = vec!["198.18.0.1".parse().expect("address")];
            if rng.chance(50) {
                node.addresses.push("198.18.0.2".parse().expect("address"));
            }
            if rng.chance(50) {
                node.addresses.push("2001:db8::1".parse().expect("address"));
            }
        }
        1 => {
            let labels = BTreeMap::from([(ZONE_LABEL.to_owned(), rng.pick(&ZONES).to_string())]);
            model.set_node_labels(labels);
        }
        _ => {
            let mut state = model.node_state().clone();
            state.primary_ipv4 = rng
                .chance(50)
                .then(|| rng.pick(&[Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2)]));
            state.primary_ipv6 = rng
                .chance(50)
                .then(|| "2001:db8::1".parse().expect("address"));
            model.set_node_state(state);
        }
    }
}

/// One random change of the cluster or the node.
fn change(rng: &mut Rng, model: &mut Model, node: &mut NodeFacts) {
    let service = rng.pick(&SERVICES);
    match rng.below(10) {
        0..=2 => {
            let object = random_service(rng, service);
            model.insert_service(object.0).expect("named");
        }
        3 => {
            model.remove_service(&ObjectKey::new(service.0, service.1));
        }
        4..=7 => {
            let index = rng.below(2);
            let object = random_slice(rng, service, index);
            model.insert_endpoint_slice(object.0).expect("labelled");
        }
        8 => {
            let key = ObjectKey::new(service.0, format!("{}-{}", service.1, rng.below(2)));
            model.remove_endpoint_slice(&key);
        }
        _ => change_node(rng, model, node),
    }
}

/// Slots in BACKEND_SLOTS (and BACKEND_SLOTS6): the generated states' frontends of one
/// family name up to about 60, and a changed
/// frontend's new slice needs room while its old one is still live, so slices are reused
/// after barriers, now and then evacuated, and a burst of changes sometimes finds no room
/// at all until the next (full) sync.
const SLOTS: u32 = 68;

/// The daemon's state between syncs, with the maps kept in memory.
struct Node {
    model: Model,
    node: NodeFacts,
    planner: Planner,
    ipv4: Written<u32>,
    ipv6: Written<Ipv6>,
}

/// One family's maps as the daemon writes them.
struct Written<A: Address> {
    mirror: MapMirror<A>,
    /// What the maps hold, written op by op.
    maps: FakeMaps<A>,
    /// Syncs that found no room for a slice and were caught up by the next, full one.
    retries: usize,
}

impl<A: Address> Written<A> {
    fn new() -> Self {
        Self {
            mirror: MapMirror::new(MapImage::default(), SLOTS),
            maps: FakeMaps::default(),
            retries: 0,
        }
    }

    fn sync(&mut self, sync: Sync<'_>, planner: &Planner, at: &str) {
        let at = format!("{at} ({})", A::NAME);
        let report = sync_into(&mut self.mirror, &mut self.maps, sync, &at);
        if !report.complete() {
            // As the daemon does after refused writes: the next sync is a full one, and
            // by then the slices this one let go are free after a barrier.
            assert!(
                report.failures.is_empty() && report.held_back == 0,
                "{at}: {report:?}"
            );
            self.retries += 1;
            let retry = format!("{at} (retried in full)");
            let desired = Sync::Full(planner.desired());
            let report = sync_into(&mut self.mirror, &mut self.maps, desired, &retry);
            assert!(report.complete(), "{retry}: {report:?}");
        }
    }

    fn check(&self, planner: &Planner, from_scratch: &plan::Planned, at: &str) {
        let at = format!("{at} ({})", A::NAME);
        let maps = &self.maps.image;
        assert_eq!(
            maps.desired(),
            self.mirror.image().desired(),
            "{at}: the mirror drifted"
        );
        let mut fresh_mirror: MapMirror<A> = MapMirror::new(MapImage::default(), SLOTS);
        let mut fresh = FakeMaps::default();
        let from_scratch_at = format!("{at} (from scratch)");
        let desired = Sync::Full(&from_scratch.desired);
        sync_into(&mut fresh_mirror, &mut fresh, desired, &from_scratch_at);
        assert_same(&canonical(maps), &canonical(&fresh.image), &at);
        let mut again = self.mirror.clone();
        assert_eq!(
            again.full(planner.desired()).ops(),
            Vec::new(),
            "{at}: a full sync would still write"
        );
        check_backend_refs(maps, &self.mirror, &at);
        check_maglev_tables(&self.maps, &at);
    }
}

impl Node {
    fn new() -> Self {
        let model = Model::default();
        let node = NodeFacts {
            node_name: NODE.to_owned(),
            zone: Some(ZONES[0].to_owned()),
            addresses: vec!["198.18.0.1".parse().expect("address")],
            nodeport_cidrs: Vec::new(),
            loopback_node_ports: false,
            // Small tables keep the test quick; the annotation asks for 509 now and then.
            selection: SelectionDefaults {
                table_size: 251,
                ..SelectionDefaults::default()
            },
        };
        Node {
            planner: Planner::new(&node, &model),
            model,
            node,
            ipv4: Written::new(),
            ipv6: Written::new(),
        }
    }

    /// One sync, as the daemon runs it: a delta of the dirty Services, or a full sync when
    /// the node changed. Writes op by op, checking the maps after each. Whether it was a
    /// full sync.
    fn sync(&mut self, at: &str) -> bool {
        let changes = self.model.take_changes();
        let full = self.planner.set_node(&self.node, &self.model);
        if full {
            self.planner.update_all(&self.model);
            let desired = Sync::Full(self.planner.desired());
            self.ipv4.sync(desired, &self.planner, at);
            self.ipv6.sync(desired, &self.planner, at);
        } else {
            let delta = self.planner.update(&self.model, changes.dirty_services);
            let changes = Sync::Delta(&delta.frontends);
            self.ipv4.sync(changes, &self.planner, at);
            self.ipv6.sync(changes, &self.planner, at);
        }
        full
    }

    fn check(&self, at: &str) {
        let from_scratch = plan::plan(&self.model, &self.node);
        assert_eq!(
            self.planner.desired(),
            &from_scratch.desired,
            "{at}: the incremental plan differs from a plan from scratch"
        );
        self.ipv4.check(&self.planner, &from_scratch, at);
        self.ipv6.check(&self.planner, &from_scratch, at);
    }
}

/// MAGLEV holds exactly the chunks headers name, each table the one its slice's own set
/// gives.
fn check_maglev_tables<A: Address>(maps: &FakeMaps<A>, at: &str) {
    let mut named = BTreeSet::new();
    for (key, entry) in &maps.image.desired().frontends {
        let own = &entry.slots[..usize::from(entry.header.count)];
        for (chunk, expected) in maglev_table(&entry.header, own) {
            assert_eq!(
                maps.maglev.get(&chunk),
                Some(&expected),
                "{at}: {key:?} {chunk:?}"
            );
            named.insert(chunk);
        }
    }
    let held: BTreeSet<MaglevKey> = maps.maglev.keys().copied().collect();
    assert_eq!(held, named, "{at}: Maglev chunks held vs named");
}

fn check_backend_refs<A: Address>(maps: &MapImage<A>, mirror: &MapMirror<A>, at: &str) {
    let mut counted: BTreeMap<u32, u32> = BTreeMap::new();
    for id in maps.slot_backends() {
        *counted.entry(id).or_default() += 1;
    }
    let followed: BTreeMap<u32, u32> = mirror
        .backend_refs()
        .iter()
        .map(|(id, count)| (*id, *count))
        .collect();
    assert_eq!(followed, counted, "{at}: backend reference counts");
    let held: BTreeSet<u32> = maps.backends.keys().copied().collect();
    let named: BTreeSet<u32> = counted.keys().copied().collect();
    assert_eq!(held, named, "{at}: backends held vs named by a slot");
    let named_slots: u64 = (maps.services.values())
        .map(|header| u64::from(header.slots()))
        .sum();
    assert_eq!(
        mirror.named_slots(),
        named_slots,
        "{at}: the slots headers name, as followed"
    );
}

/// The maps' contents as sorted lines of text, ids replaced by what they name (ids depend
/// on history), so a difference reads as the lines only one side has.
fn canonical<A: Address>(maps: &MapImage<A>) -> BTreeSet<String> {
    let label = |key: &FrontendKey<A>| {
        let endpoint = SocketAddr::new(key.addr.to_ip(), u16::from_be(key.port));
        format!("{endpoint}/{}", key.proto)
    };
    let frontends: BTreeMap<u32, String> = maps
        .services
        .iter()
        .map(|(key, header)| (header.rev_nat_id, label(key)))
        .collect();
    let backend = |backend: &Backend<A>| {
        let endpoint = SocketAddr::new(backend.addr.to_ip(), u16::from_be(backend.port));
        format!("{endpoint}/{}", backend.proto)
    };
    let address = |addr: A| addr.to_ip();
    let mut lines = BTreeSet::new();
    let mut service_ports: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
    for (key, entry) in &maps.desired().frontends {
        let header = entry.header;
        let slots: Vec<String> = entry
            .slots
            .iter()
            .map(|slot| backend(&slot.backend))
            .collect();
        lines.insert(format!(
            "frontend {} flags {:#x} affinity {} maglev {} counts {}+{} slots {slots:?}",
            label(key),
            header.flags,
            header.affinity_timeout_s,
            header.maglev,
            header.count,
            header.cluster_count,
        ));
        service_ports
            .entry(header.service_port_id)
            .or_default()
            .insert(label(key));
    }
    // Which frontends share a Service port (and so their clients' affinity).
    lines.extend(
        service_ports
            .into_values()
            .map(|frontends| format!("service port {frontends:?}")),
    );
    lines.extend(
        maps.backends
            .values()
            .map(|b| format!("backend {}", backend(b))),
    );
    lines.extend(maps.membership.iter().map(|(key, bits)| {
        let frontend = &frontends[&key.rev_nat_id];
        format!("member {frontend} {} bits {bits}", address(key.addr))
    }));
    lines.extend(
        maps.names
            .iter()
            .map(|(id, name)| format!("name {} {}", frontends[id], service_port_name(name))),
    );
    lines.extend(maps.source_ranges.iter().map(|entry| {
        let range = entry.range;
        let frontend = &frontends[&range.rev_nat_id];
        format!(
            "range {frontend} {}/{}",
            address(range.addr),
            entry.prefix_len
        )
    }));
    lines
}

/// Asserts two canonical images are equal, showing the lines only one of them has.
fn assert_same(incremental: &BTreeSet<String>, from_scratch: &BTreeSet<String>, at: &str) {
    let only_incremental: Vec<&String> = incremental.difference(from_scratch).collect();
    let only_from_scratch: Vec<&String> = from_scratch.difference(incremental).collect();
    assert!(
        only_incremental.is_empty() && only_from_scratch.is_empty(),
        "{at}: the maps written incrementally differ from a full sync from scratch\n\
         only incremental: {only_incremental:#?}\nonly from scratch: {only_from_scratch:#?}"
    );
}

/// How often the generated states met the cases the test is about, over all steps.
#[derive(Debug, Default)]
struct Coverage {
    full_syncs: usize,
    deltas: usize,
    conflicts: usize,
    affinity: usize,
    dropping: usize,
    refusing: usize,
    restricted: usize,
    shared_backends: usize,
    cluster_sets: usize,
    maglev: usize,
    barriers: usize,
    relocations: usize,
    retries: usize,
    ipv6_frontends: usize,
}

impl Coverage {
    fn count(&mut self, node: &Node) {
        self.ipv6_frontends += node.ipv6.maps.image.services.len();
        let ipv4 = node.ipv4.maps.image.services.values();
        for header in ipv4.chain(node.ipv6.maps.image.services.values()) {
            self.cluster_sets += usize::from(header.flags & service_flags::CLUSTER_SET != 0);
            self.affinity += usize::from(header.affinity_timeout_s != 0);
            self.maglev += usize::from(header.maglev != 0);
            self.dropping += usize::from(header.flags & service_flags::NO_LOCAL_ENDPOINTS != 0);
            self.refusing += usize::from(
                header.count == 0 && header.flags & service_flags::NO_LOCAL_ENDPOINTS == 0,
            );
            self.restricted += usize::from(header.flags & service_flags::SOURCE_RANGES != 0);
        }
        let problems = node.planner.problems();
        self.conflicts += problems
            .iter()
            .filter(|problem| problem.reason == "frontend_conflict")
            .count();
        let ipv4 = node.ipv4.mirror.backend_refs().values();
        self.shared_backends += (ipv4.chain(node.ipv6.mirror.backend_refs().values()))
            .filter(|count| **count > 1)
            .count();
    }
}

#[test]
fn incremental_syncs_equal_a_full_sync_after_every_step() {
    let mut coverage = Coverage::default();
    let (mut barriers, mut relocations, mut retries) = (0, 0, 0);
    for seed in 0..SEEDS {
        let mut rng = Rng(seed);
        let mut node = Node::new();
        for step in 0..STEPS {
            let at = format!("seed {seed} step {step}");
            // One to three changes per sync, as a burst reaches the daemon: a Service may
            // go in the same full sync as a change of the node.
            for _ in 0..1 + rng.below(3) {
                let (model, facts) = (&mut node.model, &mut node.node);
                change(&mut rng, model, facts);
            }
            if node.sync(&at) {
                coverage.full_syncs += 1;
            } else {
                coverage.deltas += 1;
            }
            node.check(&at);
            coverage.count(&node);
        }
        barriers += node.ipv4.maps.barriers + node.ipv6.maps.barriers;
        relocations += node.ipv4.maps.relocations + node.ipv6.maps.relocations;
        retries += node.ipv4.retries + node.ipv6.retries;
    }
    coverage.barriers = barriers;
    coverage.relocations = relocations;
    coverage.retries = retries;
    // The generator reaches every case often (thousands of frontend-steps each).
    let Coverage {
        full_syncs,
        deltas,
        conflicts,
        affinity,
        dropping,
        refusing,
        restricted,
        shared_backends,
        cluster_sets,
        maglev,
        barriers,
        relocations,
        retries,
        ipv6_frontends,
    } = coverage;
    for (case, seen) in [
        ("full syncs", full_syncs),
        ("deltas", deltas),
        ("conflicts", conflicts),
        ("affinity", affinity),
        ("dropping", dropping),
        ("refusing", refusing),
        ("restricted", restricted),
        ("shared backends", shared_backends),
        ("Cluster sets for pods", cluster_sets),
        ("Maglev tables", maglev),
        ("IPv6 frontends", ipv6_frontends),
    ] {
        assert!(seen >= 100, "{case}: seen {seen} times only ({coverage:?})");
    }
    for (case, seen) in [
        ("barriers before reusing slots", barriers),
        ("slices moved out of a window (evacuations)", relocations),
        ("syncs without room caught up by the next", retries),
    ] {
        assert!(seen > 0, "{case}: never seen ({coverage:?})");
    }
}
