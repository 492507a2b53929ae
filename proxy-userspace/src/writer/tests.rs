//! The writer's tests, on maps held in memory ([`FakeMaps`]) that check, write by write,
//! what a packet could meet: every header complete ([`MapImage::missing_for`]), slices
//! that never overlap, and no slot written that a packet may still be reading (named by a
//! header since the last barrier).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use proxy_common::maglev::{MaglevChunk, MaglevKey};
use proxy_common::{
    Address, FrontendKey, Ipv6, MembershipKey, SourceRange, map_names, membership, service_flags,
};

use super::*;
use crate::plan::{
    BackendAddr, DesiredState, EmptyFrontend, Frontend, FrontendChange, FrontendKind, FrontendPlan,
    Protocol, Selection, ServicePortName,
};

/// Maps in memory: what the kernel would hold, with limits that refuse writes as full.
/// One family's (`A`).
#[derive(Clone, Debug, Default)]
pub(super) struct FakeMaps<A = u32> {
    pub image: MapImage<A>,
    /// The slots a packet may still read: named by a header since the last barrier.
    readable: BTreeSet<u32>,
    /// Entries a map holds at most (absent: no limit).
    pub limits: BTreeMap<&'static str, usize>,
    pub barriers: usize,
    /// Headers switched to a new slice with the same contents (an evacuation).
    pub relocations: usize,
    /// MAGLEV's contents (the image keeps only its keys).
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
    /// Where the writes come from, for failure messages.
    pub at: String,
    /// Writes so far.
    pub written: usize,
}

impl<A: Address> MapSink<A> for FakeMaps<A> {
    /// A batch is its elements in order: each is written and checked as a single write.
    fn write(&mut self, phase: Phase<'_, A>) -> Vec<Result<(), WriteError>> {
        phase
            .ops()
            .map(|op| {
                self.written += 1;
                let at = format!("{}, write {}", self.at, self.written);
                self.write_one(&op, &at)
            })
            .collect()
    }
}

impl<A: Address> FakeMaps<A> {
    /// Writes `op` as the kernel would, refusing it when its map is at its limit, and
    /// checks it: a slot is never written while a packet may read it, and after the write
    /// every header is complete.
    pub fn write_one(&mut self, op: &MapOp<A>, at: &str) -> Result<(), WriteError> {
        if let MapOp::PutSlot(index, _) = op {
            assert!(
                !self.readable.contains(index),
                "{at}: {op:?} writes a slot a packet may be reading"
            );
        }
        if let MapOp::PutMaglev(chunk, _) = op {
            let named = (self.image.services.values())
                .any(|header| super::image::maglev_keys(header).any(|named| named == *chunk));
            assert!(!named, "{at}: {op:?} rewrites a table a header names");
        }
        if self.is_full_for(op) {
            return Err(WriteError::Full);
        }
        if let MapOp::PutService(key, header) = op
            && let Some(old) = self.image.services.get(key)
            && old.base != header.base
            && self.image.slots_of(old) == self.image.slots_of(header)
        {
            self.relocations += 1;
        }
        self.image.apply(op);
        match op {
            MapOp::PutMaglev(key, chunk) => {
                self.maglev.insert(*key, *chunk);
            }
            MapOp::DeleteMaglev(key) => {
                self.maglev.remove(key);
            }
            MapOp::PutService(_, header) => self.readable.extend(slice_of(header).range()),
            MapOp::Barrier => {
                self.barriers += 1;
                self.readable = (self.image.services.values())
                    .flat_map(|header| slice_of(header).range())
                    .collect();
            }
            _ => {}
        }
        assert_consistent(&self.image, at, op);
        Ok(())
    }

    fn is_full_for(&self, op: &MapOp<A>) -> bool {
        let Some(&limit) = op.map().and_then(|map| self.limits.get(map)) else {
            return false;
        };
        let image = &self.image;
        match op {
            MapOp::PutService(key, _) => {
                !image.services.contains_key(key) && image.services.len() >= limit
            }
            MapOp::PutBackend(id, _) => {
                !image.backends.contains_key(id) && image.backends.len() >= limit
            }
            MapOp::PutMembership(key, _) => {
                !image.membership.contains_key(key) && image.membership.len() >= limit
            }
            MapOp::PutMaglev(key, _) => !image.maglev.contains(key) && image.maglev.len() >= limit,
            _ => false,
        }
    }
}

/// Every header names only written slots of backends BACKEND_IDS holds that are members
/// of its set, and is restricted only with its ranges ([`MapImage::missing_for`]); every
/// header's frontend has its name; no two headers' slices overlap.
pub(super) fn assert_consistent<A: Address>(image: &MapImage<A>, at: &str, op: &MapOp<A>) {
    let mut taken: BTreeMap<u32, FrontendKey<A>> = BTreeMap::new();
    for (key, header) in &image.services {
        if let Some(missing) = image.missing_for(key, header) {
            panic!("{at}, after {op:?}: {missing}");
        }
        assert!(
            image.names.contains_key(&header.rev_nat_id),
            "{at}, after {op:?}: {key:?} has no name"
        );
        for index in slice_of(header).range() {
            if let Some(other) = taken.insert(index, *key) {
                panic!("{at}, after {op:?}: slot {index} is named by {key:?} and {other:?}");
            }
        }
    }
}

/// Syncs `sync` into `maps` through `mirror`, checking every write.
pub(super) fn sync_into<A: Address>(
    mirror: &mut MapMirror<A>,
    maps: &mut FakeMaps<A>,
    sync: Sync<'_>,
    at: &str,
) -> ApplyReport {
    maps.at = at.to_owned();
    maps.written = 0;
    mirror.sync(sync, maps)
}

pub(super) fn frontend(addr: [u8; 4], port: u16) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(addr).into(),
        port,
        protocol: Protocol::Tcp,
    }
}

fn key(addr: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey::new(addr, port, proxy_common::proto::TCP)
}

fn backends(last_octets: &[u8]) -> Vec<BackendAddr> {
    last_octets
        .iter()
        .map(|octet| BackendAddr {
            addr: Ipv4Addr::new(198, 18, 1, *octet).into(),
            port: 8080,
        })
        .collect()
}

fn plan(name: &str, octets: &[u8]) -> FrontendPlan {
    FrontendPlan {
        service: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port_name: "".into(),
        },
        kind: FrontendKind::ClusterIp,
        backends: backends(octets),
        cluster_backends: None,
        when_empty: EmptyFrontend::Reject,
        session_affinity: None,
        serving_addrs: Vec::new(),
        source_ranges: Vec::new(),
        selection: Selection::Random,
    }
}

pub(super) fn desired(entries: &[(Frontend, &[u8])]) -> DesiredState {
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
        state.frontends.insert(frontend, plan(name, octets));
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

/// The same state choosing by Maglev tables of `table_size` positions.
fn with_maglev(mut state: DesiredState, table_size: u32) -> DesiredState {
    for plan in state.frontends.values_mut() {
        plan.kind = FrontendKind::NodePort;
        plan.selection = Selection::Maglev { table_size };
    }
    state
}

/// Maps holding `state`, written by a mirror of `slots` slots.
pub(super) fn written(state: &DesiredState, slots: u32) -> (MapMirror, FakeMaps) {
    let mut mirror = MapMirror::new(MapImage::default(), slots);
    let mut maps = FakeMaps::default();
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(state), "setup");
    assert!(report.complete(), "{report:?}");
    (mirror, maps)
}

/// Goes from `from` to `to` (full syncs), checking every write; the writes it took.
fn transition(from: &DesiredState, to: &DesiredState) -> usize {
    let (mut mirror, mut maps) = written(from, 64);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(to), "transition");
    assert!(report.complete(), "{report:?}");
    assert_eq!(maps.image.desired(), mirror.image().desired());
    assert_eq!(mirror.full(to).ops(), Vec::new(), "nothing left to write");
    report.ops
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
        (
            "Maglev switched on",
            desired(&[(vip, &[10, 11])]),
            with_maglev(desired(&[(vip, &[10, 11])]), 251),
        ),
        (
            "Maglev frontend's backends change",
            with_maglev(desired(&[(vip, &[10, 11]), (other, &[12])]), 251),
            with_maglev(desired(&[(vip, &[11, 12]), (other, &[12])]), 251),
        ),
        (
            "Maglev table resized",
            with_maglev(desired(&[(vip, &[10, 11])]), 251),
            with_maglev(desired(&[(vip, &[10, 11])]), 509),
        ),
        (
            "Maglev switched off",
            with_maglev(desired(&[(vip, &[10, 11])]), 251),
            desired(&[(vip, &[10, 11])]),
        ),
        (
            "Maglev frontend loses its endpoints, then goes",
            with_maglev(desired(&[(vip, &[10, 11])]), 251),
            with_maglev(desired(&[(vip, &[])]), 251),
        ),
        (
            "Maglev frontend removed",
            with_maglev(desired(&[(vip, &[10]), (other, &[12])]), 251),
            desired(&[(other, &[12])]),
        ),
    ];
    for (name, from, to) in cases {
        let ops = transition(from, to);
        assert!(ops > 0, "{name}: expected writes");
    }
}

#[test]
fn maglev_tables_follow_their_slices_and_go_when_nothing_names_them() {
    let vip = frontend([198, 19, 0, 10], 80);
    let vip_key = key([198, 19, 0, 10], 80);
    let (mut mirror, mut maps) = written(&with_maglev(desired(&[(vip, &[10, 11, 12])]), 251), 16);
    // The table of the header's slice: the planner's table of its backends, chunk by chunk.
    let expected =
        |octets: &[u8]| -> Vec<u16> { crate::plan::maglev::table(&backends(octets), 251) };
    let table_of = |maps: &FakeMaps| -> Vec<u16> {
        let header = maps.image.services[&vip_key];
        let chunks: Vec<MaglevKey> = super::image::maglev_keys(&header).collect();
        assert_eq!(
            maps.maglev.keys().copied().collect::<Vec<_>>(),
            chunks,
            "exactly the named table's chunks"
        );
        let mut positions: Vec<u16> = chunks
            .iter()
            .flat_map(|chunk| maps.maglev[chunk].positions)
            .collect();
        positions.truncate(251);
        positions
    };
    assert_eq!(table_of(&maps), expected(&[10, 11, 12]));
    assert_eq!(
        maps.image.services[&vip_key].maglev, 1,
        "251 is the first size"
    );

    // A backend leaves: a new slice, a new table; the old one goes after the header moved.
    let state = with_maglev(desired(&[(vip, &[10, 12])]), 251);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "backend leaves");
    assert_eq!(table_of(&maps), expected(&[10, 12]));

    // Back to random: the header switches first, the table goes after.
    let state = desired(&[(vip, &[10, 12])]);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "random");
    assert!(maps.maglev.is_empty() && mirror.image().maglev.is_empty());
}

#[test]
fn a_full_maglev_map_leaves_the_frontend_on_its_whole_old_table() {
    let vip = frontend([198, 19, 0, 10], 80);
    let vip_key = key([198, 19, 0, 10], 80);
    let (mut mirror, mut maps) = written(&with_maglev(desired(&[(vip, &[10, 11, 12])]), 251), 16);
    let before = maps.image.services[&vip_key];
    // Room for one table of 251 positions (8 chunks): the new one does not fit beside it.
    maps.limits.insert(
        map_names::MAGLEV,
        proxy_common::maglev::chunks(251) as usize,
    );
    let state = with_maglev(desired(&[(vip, &[10, 12])]), 251);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "full");
    assert!(report.map_full[map_names::MAGLEV] >= 1, "{report:?}");
    assert_eq!(
        maps.image.services[&vip_key], before,
        "still on its old slice and table"
    );

    // Room returns: the next full sync switches it, and the old table goes.
    maps.limits.clear();
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "room again");
    assert!(report.complete(), "{report:?}");
    let after = maps.image.services[&vip_key];
    assert_eq!(after.count, 2);
    assert_eq!(
        maps.maglev.keys().copied().collect::<Vec<_>>(),
        super::image::maglev_keys(&after).collect::<Vec<_>>()
    );
}

#[test]
fn unchanged_state_writes_nothing() {
    let state = desired(&[(frontend([198, 19, 0, 10], 80), &[10, 11, 12])]);
    let (mut mirror, _) = written(&state, 16);
    assert_eq!(mirror.full(&state).ops(), Vec::new());
}

#[test]
fn a_changed_frontend_gets_a_new_slice_and_its_old_one_waits_for_a_barrier() {
    let vip = frontend([198, 19, 0, 10], 80);
    let (mut mirror, mut maps) = written(&desired(&[(vip, &[10, 11])]), 4);
    let first = maps.image.services[&key([198, 19, 0, 10], 80)];
    assert_eq!((first.base, first.count), (0, 2));

    // Room for the new slice next to the old one: no barrier.
    let state = desired(&[(vip, &[11, 12])]);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "change 1");
    let second = maps.image.services[&key([198, 19, 0, 10], 80)];
    assert_eq!(second.base, 2, "written beside the live slice, not over it");
    assert_eq!(maps.barriers, 0);

    // The array is full but for the quarantined slice: reused after one barrier.
    let state = desired(&[(vip, &[10, 12])]);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "change 2");
    let third = maps.image.services[&key([198, 19, 0, 10], 80)];
    assert_eq!((third.base, maps.barriers), (0, 1));
    assert_eq!(mirror.slots_used(), (4, 4), "two live, two quarantined");
}

#[test]
fn shared_backend_is_written_once_and_kept_while_used() {
    let a = frontend([198, 19, 0, 10], 80);
    let b = frontend([198, 19, 0, 11], 80);
    let (mut mirror, maps) = written(&desired(&[(a, &[10]), (b, &[10])]), 16);
    assert_eq!(maps.image.backends.len(), 1);
    let ops = mirror.full(&desired(&[(b, &[10])])).ops();
    assert!(!ops.iter().any(|op| matches!(op, MapOp::DeleteBackend(..))));
}

#[test]
fn ids_are_stable_across_syncs_and_restarts() {
    let vip = frontend([198, 19, 0, 10], 80);
    let (mut mirror, mut maps) = written(&desired(&[(vip, &[10, 11])]), 16);
    let id_of = |image: &MapImage, octet: u8| {
        image
            .backends
            .iter()
            .find(|(_, b)| b.addr.to_ne_bytes()[3] == octet)
            .map(|(id, _)| *id)
    };
    let first = maps.image.clone();
    let state = desired(&[(vip, &[11, 12])]);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "change");
    assert_eq!(id_of(&first, 11), id_of(&maps.image, 11));
    assert_ne!(
        id_of(&first, 10),
        id_of(&maps.image, 12),
        "released id reused at once"
    );

    let mut restarted = MapMirror::new(maps.image.clone(), 16);
    assert_eq!(
        restarted.full(&state).ops(),
        Vec::new(),
        "nothing to rewrite"
    );
}

#[test]
fn header_records_count_kind_and_ids() {
    let state = desired(&[(frontend([198, 19, 0, 10], 80), &[10, 11, 12])]);
    let (_, maps) = written(&state, 16);
    let header = maps.image.services[&key([198, 19, 0, 10], 80)];
    assert_eq!(header.count, 3);
    assert_eq!(header.flags, service_flags::CLUSTER_IP);
    assert_ne!(header.rev_nat_id, 0);
    assert_ne!(header.service_port_id, 0);
    assert_eq!((maps.image.services.len(), maps.image.slots.len()), (1, 3));
}

#[test]
fn frontends_of_a_service_port_share_its_affinity_id() {
    let vip = frontend([198, 19, 0, 10], 80);
    let node_port = frontend([198, 18, 0, 1], 30080);
    let other = frontend([198, 19, 0, 11], 80);
    let state = named([
        (vip, "web", &[10][..]),
        (node_port, "web", &[10]),
        (other, "api", &[10]),
    ]);
    let (_, maps) = written(&state, 16);
    let port_id = |addr, port| maps.image.services[&key(addr, port)].service_port_id;
    assert_eq!(
        port_id([198, 19, 0, 10], 80),
        port_id([198, 18, 0, 1], 30080)
    );
    assert_ne!(port_id([198, 19, 0, 10], 80), port_id([198, 19, 0, 11], 80));
    let mut restarted = MapMirror::new(maps.image.clone(), 16);
    assert_eq!(restarted.full(&state).ops(), Vec::new(), "ids learned back");
}

#[test]
fn local_policy_frontends_carry_the_cluster_set_after_their_own() {
    let node_port = frontend([198, 18, 0, 1], 30080);
    let mut state = desired(&[(node_port, &[11])]);
    let plan = state.frontends.get_mut(&node_port).unwrap();
    plan.kind = FrontendKind::NodePort;
    plan.cluster_backends = Some(backends(&[10, 11, 12]));
    let (_, maps) = written(&state, 16);
    let header = maps.image.services[&key([198, 18, 0, 1], 30080)];
    assert_eq!((header.count, header.cluster_count), (1, 3));
    assert_ne!(header.flags & service_flags::CLUSTER_SET, 0);
    let slots = maps.image.slots_of(&header).unwrap();
    let last_octets: Vec<u8> = slots
        .iter()
        .map(|slot| slot.backend.addr.to_ne_bytes()[3])
        .collect();
    assert_eq!(last_octets, [11, 10, 11, 12]);
    let bits = |octet| {
        let member = MembershipKey {
            rev_nat_id: header.rev_nat_id,
            addr: u32::from_ne_bytes([198, 18, 1, octet]),
        };
        maps.image.membership[&member]
    };
    assert_eq!(bits(10), membership::CLUSTER_SELECTABLE);
    assert_eq!(
        bits(11),
        membership::SELECTABLE | membership::CLUSTER_SELECTABLE
    );
}

#[test]
fn names_follow_their_frontends() {
    let vip = frontend([198, 19, 0, 10], 80);
    let other = frontend([198, 19, 0, 11], 80);
    let (mut mirror, mut maps) =
        written(&named([(vip, "web", &[10][..]), (other, "api", &[11])]), 16);
    let name_of = |image: &MapImage, key: FrontendKey| {
        let id = image.services[&key].rev_nat_id;
        image.names[&id].name().to_owned()
    };
    let vip_key = key([198, 19, 0, 10], 80);
    assert_eq!(name_of(&maps.image, vip_key), "web");

    // `api` takes over the VIP (same frontend, same id) and `other` goes away.
    let state = named([(vip, "api", &[11][..])]);
    let ops = mirror.full(&state).ops();
    let rev_nat_id = maps.image.services[&vip_key].rev_nat_id;
    assert!(
        ops.iter()
            .any(|op| matches!(op, MapOp::PutName(id, _) if *id == rev_nat_id)),
        "{ops:?}"
    );
    assert!(matches!(ops.last(), Some(MapOp::DeleteName(_))), "{ops:?}");
    let mut mirror = MapMirror::new(maps.image.clone(), 16);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "take over");
    assert_eq!(name_of(&maps.image, vip_key), "api");
    assert_eq!(maps.image.names.len(), 1);
}

#[test]
fn overlong_names_leave_the_frontend_unnamed_but_balanced() {
    let long = "x".repeat(64);
    let state = named([(frontend([198, 19, 0, 10], 80), long.as_str(), &[10][..])]);
    let mut mirror: MapMirror = MapMirror::new(MapImage::default(), 16);
    let report = mirror.sync(Sync::Full(&state), &mut AcceptingMaps);
    assert!(report.complete());
    assert!(mirror.image().names.is_empty());
    assert_eq!(mirror.image().services.len(), 1);
}

#[test]
fn affinity_frontends_record_their_timeout() {
    let vip = frontend([198, 19, 0, 10], 80);
    let other = frontend([198, 19, 0, 11], 80);
    let mut state = desired(&[(vip, &[10, 11]), (other, &[12])]);
    state.frontends.get_mut(&vip).unwrap().session_affinity = Some(Duration::from_secs(2));
    let (_, maps) = written(&state, 16);
    let timeout = |addr| maps.image.services[&key(addr, 80)].affinity_timeout_s;
    assert_eq!(
        (timeout([198, 19, 0, 10]), timeout([198, 19, 0, 11])),
        (2, 0)
    );
}

#[test]
fn every_frontend_records_its_selectable_and_serving_addresses() {
    let vip = frontend([198, 19, 0, 10], 80);
    let empty = frontend([198, 19, 0, 11], 80);
    let mut state = desired(&[(vip, &[10, 11]), (empty, &[])]);
    // pod .12 is terminating but serving: it keeps its flows, takes no new ones.
    state.frontends.get_mut(&vip).unwrap().serving_addrs = [10, 11, 12]
        .map(|octet| Ipv4Addr::new(198, 18, 1, octet).into())
        .into();
    let (mut mirror, mut maps) = written(&state, 16);
    let vip_id = maps.image.services[&key([198, 19, 0, 10], 80)].rev_nat_id;
    let member = |octet| MembershipKey {
        rev_nat_id: vip_id,
        addr: u32::from_ne_bytes([198, 18, 1, octet]),
    };
    let both = membership::SELECTABLE | membership::SERVING;
    let expected = BTreeMap::from([
        (member(10), both),
        (member(11), both),
        (member(12), membership::SERVING),
    ]);
    assert_eq!(maps.image.membership, expected);

    // A backend that leaves loses its entry after the header stops counting it.
    let plan = state.frontends.get_mut(&vip).unwrap();
    plan.backends.truncate(1);
    plan.serving_addrs.truncate(1);
    let ops = mirror.full(&state).ops();
    let position = |wanted: &MapOp| ops.iter().position(|op| op == wanted).unwrap();
    let header_update = ops
        .iter()
        .position(|op| matches!(op, MapOp::PutService(..)))
        .unwrap();
    assert!(
        header_update < position(&MapOp::DeleteMembership(member(11))),
        "{ops:?}"
    );
    let mut mirror = MapMirror::new(maps.image.clone(), 16);
    sync_into(&mut mirror, &mut maps, Sync::Full(&state), "shrink");
}

#[test]
fn empty_frontends_are_flagged_when_they_drop() {
    let vip = frontend([198, 19, 0, 10], 80);
    let flags_with = |backends: &[u8], when_empty| {
        let mut state = desired(&[(vip, backends)]);
        state.frontends.get_mut(&vip).unwrap().when_empty = when_empty;
        let (_, maps) = written(&state, 16);
        maps.image.services[&key([198, 19, 0, 10], 80)].flags
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
    let open = desired(&[(lb, &[1])]);
    let mut restricted = open.clone();
    let plan = restricted.frontends.get_mut(&lb).unwrap();
    plan.kind = FrontendKind::LoadBalancer;
    plan.source_ranges = vec!["198.18.0.0/24".parse().unwrap()];

    let (mut mirror, mut maps) = written(&open, 16);
    let ops = mirror.full(&restricted).ops();
    let is_header = |op: &MapOp| matches!(op, MapOp::PutService(..));
    let header = maps.image.services[&key([198, 18, 8, 1], 80)];
    let entry = SourceRangeEntry {
        range: SourceRange {
            rev_nat_id: header.rev_nat_id,
            addr: u32::from_ne_bytes([198, 18, 0, 0]),
        },
        prefix_len: 24,
    };
    assert_eq!(entry.key().prefix_len(), 32 + 24);
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert_eq!(ops[0], MapOp::PutSourceRange(entry));
    assert!(is_header(&ops[1]), "{ops:?}");
    let mut mirror = MapMirror::new(maps.image.clone(), 16);
    sync_into(&mut mirror, &mut maps, Sync::Full(&restricted), "restrict");
    let header = maps.image.services[&key([198, 18, 8, 1], 80)];
    assert_ne!(header.flags & service_flags::SOURCE_RANGES, 0);

    let ops = mirror.full(&open).ops();
    assert_eq!(ops.len(), 2, "{ops:?}");
    assert!(is_header(&ops[0]), "{ops:?}");
    assert_eq!(ops[1], MapOp::DeleteSourceRange(entry));
}

#[test]
fn a_refused_backend_holds_its_frontends_header_back_until_there_is_room() {
    let vip = frontend([198, 19, 0, 10], 80);
    let other = frontend([198, 19, 0, 11], 80);
    let (mut mirror, mut maps) = written(&desired(&[(vip, &[10])]), 16);
    maps.limits.insert(map_names::BACKEND_IDS, 2);

    // Three more backends, room for one: the new frontend that needs two stays out, the
    // changed one stays as it was; nothing half-written.
    let state = desired(&[(vip, &[10, 11]), (other, &[12, 13])]);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "full maps");
    assert!(!report.complete());
    assert!(report.map_full[map_names::BACKEND_IDS] >= 1, "{report:?}");
    assert!(report.held_back >= 1, "{report:?}");
    // Backend 11 found room (the first refused write came after it): vip switched whole;
    // the other frontend misses both of its backends and is not written at all.
    assert_eq!(maps.image.services[&key([198, 19, 0, 10], 80)].count, 2);
    assert!(!maps.image.services.contains_key(&key([198, 19, 0, 11], 80)));

    // Room returns: the next full sync writes what is missing.
    maps.limits.clear();
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "room again");
    assert!(report.complete(), "{report:?}");
    let (_, direct) = written(&state, 16);
    assert_eq!(
        maps.image.desired().frontends.len(),
        direct.image.desired().frontends.len()
    );
    assert_eq!(maps.image.services[&key([198, 19, 0, 11], 80)].count, 2);
}

#[test]
fn a_full_services_map_leaves_new_frontends_out_and_the_others_serving() {
    let a = frontend([198, 19, 0, 10], 80);
    let b = frontend([198, 19, 0, 11], 80);
    let c = frontend([198, 19, 0, 12], 80);
    let (mut mirror, mut maps) = written(&desired(&[(a, &[10])]), 16);
    maps.limits.insert(map_names::SERVICES, 2);
    let state = desired(&[(a, &[10, 11]), (b, &[11]), (c, &[12])]);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "full");
    assert_eq!(report.map_full[map_names::SERVICES], 1, "{report:?}");
    assert_eq!(maps.image.services.len(), 2);
    assert_eq!(maps.image.services[&key([198, 19, 0, 10], 80)].count, 2);
    // The refused frontend's slice was never named: it is free again. In use: a's two and
    // b's one, and a's old one, quarantined.
    assert_eq!(mirror.slots_used().0, 4);
}

#[test]
fn no_room_in_the_slots_leaves_the_frontend_as_it_was() {
    let vip = frontend([198, 19, 0, 10], 80);
    let (mut mirror, mut maps) = written(&desired(&[(vip, &[10, 11])]), 3);
    let state = desired(&[(vip, &[10, 11, 12])]);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "no room");
    assert_eq!(report.map_full[map_names::BACKEND_SLOTS], 1, "{report:?}");
    assert_eq!(maps.image.services[&key([198, 19, 0, 10], 80)].count, 2);
    assert!(
        maps.image.backends.len() == 2,
        "no backend written for nothing"
    );
}

#[test]
fn fragmented_slots_are_evacuated_for_a_large_frontend() {
    // Eight frontends of two, then every other one removed: 8 slots free in holes of 2.
    let frontends: Vec<Frontend> = (0..8).map(|i| frontend([198, 19, 0, 10 + i], 80)).collect();
    let all: Vec<(Frontend, &[u8])> = frontends.iter().map(|f| (*f, &[10u8, 11][..])).collect();
    let (mut mirror, mut maps) = written(&desired(&all), 16);
    let kept: Vec<(Frontend, &[u8])> = all.iter().step_by(2).copied().collect();
    sync_into(
        &mut mirror,
        &mut maps,
        Sync::Full(&desired(&kept)),
        "thin out",
    );

    // A frontend of six: no six free slots in a row, but eight free.
    let mut grown = kept.clone();
    grown.push((frontend([198, 19, 1, 1], 80), &[1, 2, 3, 4, 5, 6]));
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&desired(&grown)), "grow");
    assert!(report.complete(), "{report:?}");
    assert_eq!(maps.image.services[&key([198, 19, 1, 1], 80)].count, 6);
    assert!(maps.barriers >= 1);
}

/// Each family's frontends go into its own maps: an IPv6 frontend of a dual-stack
/// Service leaves the IPv4 maps as if its IPv4 sibling were alone, in a full sync and a
/// delta alike, and the IPv6 maps hold it whole (header, slot, backend, membership, name),
/// with 16-byte addresses.
#[test]
fn each_family_is_written_into_its_own_maps() {
    let vip = frontend([198, 19, 0, 10], 80);
    let vip6 = Frontend {
        addr: "2001:db8:ff::10".parse().unwrap(),
        port: 80,
        protocol: Protocol::Tcp,
    };
    let backend6: std::net::IpAddr = "2001:db8:1::10".parse().unwrap();
    let mut plan6 = plan("web", &[]);
    plan6.backends = vec![BackendAddr {
        addr: backend6,
        port: 8080,
    }];
    plan6.serving_addrs = vec![backend6];
    let mut dual = desired(&[(vip, &[10, 11])]);
    dual.frontends.insert(vip6, plan6.clone());
    let (mut mirror, maps) = written(&dual, 16);
    let (_, alone) = written(&desired(&[(vip, &[10, 11])]), 16);
    assert_eq!(maps.image.desired(), alone.image.desired());
    let change = FrontendChange {
        frontend: vip6,
        old: None,
        new: Some(plan6),
    };
    assert_eq!(
        mirror.delta(std::slice::from_ref(&change)).ops(),
        Vec::new()
    );

    let mut mirror6: MapMirror<Ipv6> = MapMirror::new(MapImage::default(), 16);
    let mut maps6: FakeMaps<Ipv6> = FakeMaps::default();
    let report = sync_into(&mut mirror6, &mut maps6, Sync::Full(&dual), "ipv6 full");
    assert!(report.complete(), "{report:?}");
    let key6 = frontend_key::<Ipv6>(&vip6).unwrap();
    assert_eq!(key6.addr, Ipv6::from_ip(vip6.addr).unwrap());
    let header = maps6.image.services[&key6];
    assert_eq!((header.count, header.flags), (1, service_flags::CLUSTER_IP));
    let slots = maps6.image.slots_of(&header).unwrap();
    assert_eq!(slots[0].backend.addr.to_ip(), backend6);
    assert_eq!(u16::from_be(slots[0].backend.port), 8080);
    let member = MembershipKey {
        rev_nat_id: header.rev_nat_id,
        addr: slots[0].backend.addr,
    };
    assert_eq!(
        maps6.image.membership[&member],
        membership::SELECTABLE | membership::SERVING
    );
    assert_eq!(maps6.image.names[&header.rev_nat_id].name(), "web");
    assert_eq!(maps6.image.services.len(), 1, "no IPv4 frontend in them");

    // The same frontend as a delta into empty IPv6 maps: the same contents.
    let mut delta_mirror: MapMirror<Ipv6> = MapMirror::new(MapImage::default(), 16);
    let mut delta_maps: FakeMaps<Ipv6> = FakeMaps::default();
    let changes = [change];
    let report = sync_into(
        &mut delta_mirror,
        &mut delta_maps,
        Sync::Delta(&changes),
        "delta",
    );
    assert!(report.complete(), "{report:?}");
    assert_eq!(delta_maps.image.desired(), maps6.image.desired());
}
