//! The property the incremental path rests on: after any sequence of changes — Services and
//! slices added, changed and removed, frontends contested, policies and affinity flipped,
//! the node's addresses changed — the maps written incrementally (the daemon's partial
//! syncs, full syncs where the daemon does them) hold exactly what a full sync from scratch
//! would write, and every single write on the way, in the order the batches apply them,
//! leaves the maps consistent. Ids differ between the two (they are handed out in
//! another order), so the maps are compared by what they say: per frontend its header,
//! its backends slot by slot, its members, its name.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use proxy_common::{Backend, ServiceKey, ServiceName};

use super::MapMirror;
use super::image::tests::assert_consistent;
use super::image::{IdRegistry, MapImage, materialize};
use crate::model::{Model, ObjectKey};
use crate::plan::testing::{ep, slice, svc};
use crate::plan::{NodeFacts, Planner};

/// xorshift64*: small and seedable, so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % bound
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const SERVICES: usize = 8;
const NODE: &str = "node-a";

/// One random change to the model (or the node): what the daemon receives.
fn change(rng: &mut Rng, model: &mut Model, node: &mut NodeFacts) {
    let service = rng.below(SERVICES);
    let name = format!("web/s{service}");
    match rng.below(10) {
        // A Service, with a ClusterIP from a small pool (so frontends are contested),
        // one or two ports, sometimes NodePorts, affinity or a Local policy.
        0..=3 => {
            let cluster_ip = format!("198.19.0.{}", 1 + rng.below(5));
            let mut object = svc(&name, &cluster_ip);
            if rng.chance(40) {
                object =
                    object
                        .service_type("NodePort")
                        .node_port("http", 80, 30_080 + service as i32);
            } else {
                object = object.port("http", 80, "TCP");
            }
            if rng.chance(50) {
                object = object.port("dns", 53, "UDP");
            }
            if rng.chance(30) {
                object = object.client_ip_affinity(Some(60 + rng.below(100) as i32));
            }
            if rng.chance(30) {
                object = object.external_traffic_policy("Local");
            }
            model.insert_service(object.0).unwrap();
        }
        4 => {
            model.remove_service(&ObjectKey::new("web", format!("s{service}")));
        }
        // A slice of the Service (two per Service at most) with random endpoints.
        5..=7 => {
            let slice_name = format!("{name}-{}", rng.below(2));
            let mut object = slice(&slice_name, &format!("s{service}"))
                .port(Some("http"), Some(8080), "TCP")
                .port(Some("dns"), Some(5353), "UDP");
            for address in 1..=6 {
                if rng.chance(40) {
                    let mut endpoint = ep(&format!("198.18.1.{address}"));
                    if rng.chance(20) {
                        endpoint = endpoint.not_ready();
                    }
                    let on = if rng.chance(70) { NODE } else { "node-b" };
                    object = object.endpoint(endpoint.on_node(on));
                }
            }
            model.insert_endpoint_slice(object.0).unwrap();
        }
        8 => {
            let slice_name = format!("s{service}-{}", rng.below(2));
            model.remove_endpoint_slice(&ObjectKey::new("web", slice_name));
        }
        // The node's addresses (its NodePorts) change.
        _ => {
            let count = 1 + rng.below(2);
            node.addresses = (0..count)
                .map(|i| Ipv4Addr::new(198, 18, 0, 1 + i as u8))
                .collect();
        }
    }
}

/// What an image says, without the ids it happens to use: per frontend header, its flags,
/// count and timeout, backends slot by slot, members (address, bits) and name; and the
/// backends BACKENDS holds.
type Canonical = (
    BTreeMap<
        ServiceKey,
        (
            u16,
            u16,
            u32,
            Vec<Endpoint>,
            BTreeSet<(u32, u8)>,
            Option<ServiceName>,
        ),
    >,
    BTreeSet<Endpoint>,
);

/// A backend as something ordered: address, port, protocol.
type Endpoint = (u32, u16, u8);

fn endpoint(backend: &Backend) -> Endpoint {
    (backend.addr, backend.port, backend.proto)
}

fn canonical(image: &MapImage) -> Canonical {
    let mut frontends = BTreeMap::new();
    for (key, header) in image.services.iter().filter(|(key, _)| key.slot == 0) {
        let backend = |id: &u32| endpoint(&image.backends[id]);
        let slots: Vec<Endpoint> = (1..=header.count)
            .map(|slot| backend(&image.services[&key.with_slot(slot)].backend_id))
            .collect();
        let members: BTreeSet<(u32, u8)> = (image.membership.iter())
            .filter(|(member, _)| member.rev_nat_id == header.rev_nat_id)
            .map(|(member, bits)| (member.addr, *bits))
            .collect();
        let name = image.names.get(&header.rev_nat_id).copied();
        frontends.insert(
            *key,
            (
                header.flags,
                header.count,
                header.affinity_timeout_s,
                slots,
                members,
                name,
            ),
        );
    }
    let slots = image.services.len() - frontends.len();
    let referenced: usize = frontends.values().map(|frontend| frontend.3.len()).sum();
    assert_eq!(slots, referenced, "slots no header counts");
    (frontends, image.backends.values().map(endpoint).collect())
}

#[test]
fn incremental_writes_equal_a_full_sync_at_every_step() {
    for seed in [1_u64, 7, 42, 2026] {
        let mut rng = Rng(seed);
        let mut model = Model::default();
        let mut node = NodeFacts {
            node_name: NODE.to_owned(),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 1)],
            ..NodeFacts::default()
        };
        let mut planner = Planner::new(&node, &model);
        let mut mirror = MapMirror::default();
        // What the maps hold, written op by op.
        let mut maps = MapImage::default();
        for step in 0..300 {
            for _ in 0..1 + rng.below(3) {
                change(&mut rng, &mut model, &mut node);
            }
            // The daemon's sync: full when the node changed, else the dirty Services only.
            let changes = model.take_changes();
            let full = planner.set_node(&node, &model);
            let writes = if full {
                planner.update_all(&model);
                mirror.full(planner.desired())
            } else {
                let delta = planner.update(&model, changes.dirty_services);
                mirror.delta(&delta.frontends)
            };
            for op in writes.ops() {
                maps.apply(op);
                assert_consistent(&maps, step);
                mirror.applied(op);
            }
            assert_eq!(
                &maps,
                mirror.image(),
                "seed {seed} step {step}: the mirror drifted"
            );

            let mut scratch = Planner::new(&node, &model);
            scratch.update_all(&model);
            let ours = &planner.desired().frontends;
            let theirs = &scratch.desired().frontends;
            let differing: Vec<String> = (ours.keys().chain(theirs.keys()))
                .filter(|frontend| ours.get(frontend) != theirs.get(frontend))
                .map(|frontend| {
                    format!(
                        "{frontend}: incremental {:?}\n    from scratch {:?}",
                        ours.get(frontend)
                            .map(|plan| (&plan.service, plan.backends.len())),
                        theirs
                            .get(frontend)
                            .map(|plan| (&plan.service, plan.backends.len()))
                    )
                })
                .collect();
            assert!(
                differing.is_empty(),
                "seed {seed} step {step} (full: {full}): the planner drifted:\n{}\nservices: {:?}",
                differing.join("\n"),
                model
                    .services()
                    .map(|(key, record)| (key.to_string(), record))
                    .collect::<Vec<_>>()
            );
            let from_scratch = materialize(scratch.desired(), &mut IdRegistry::default());
            assert_eq!(
                canonical(&maps),
                canonical(&from_scratch),
                "seed {seed} step {step} (full: {full})"
            );
        }
    }
}
