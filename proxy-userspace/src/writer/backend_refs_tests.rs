//! How many slots name each backend, as the mirror follows it: a full sync counts them in
//! one pass over the headers it wrote, a change frontend by frontend; both must agree with
//! counting the maps' slots.

use std::collections::BTreeMap;

use proxy_common::{Backend, map_names};

use super::tests::{FakeMaps, desired, frontend, sync_into, written};
use super::*;
use crate::plan::{DesiredState, Frontend, FrontendChange};

/// Forty frontends, each naming five backends of a pool of 23 they share; `shift` moves
/// every frontend to other backends.
fn shared(shift: u8) -> (Vec<Frontend>, DesiredState) {
    let frontends: Vec<Frontend> = (0..40).map(|i| frontend([198, 19, 0, i], 80)).collect();
    let pools: Vec<Vec<u8>> = (0..40u8)
        .map(|i| (0..5u8).map(|j| 10 + (i + j * 7 + shift) % 23).collect())
        .collect();
    let entries: Vec<(Frontend, &[u8])> = (frontends.iter().copied())
        .zip(pools.iter().map(Vec::as_slice))
        .collect();
    (frontends, desired(&entries))
}

/// The mirror's counts, by backend (ids depend on the order they were given out).
fn refs_by_backend(mirror: &MapMirror) -> BTreeMap<Backend<u32>, u32> {
    (mirror.backend_refs().iter())
        .map(|(id, count)| (mirror.image().backends[id], *count))
        .collect()
}

/// The counts the maps' slots give, by backend.
fn counted(maps: &FakeMaps) -> BTreeMap<Backend<u32>, u32> {
    let mut counts = BTreeMap::new();
    for id in maps.image.slot_backends() {
        *counts.entry(maps.image.backends[&id]).or_default() += 1;
    }
    counts
}

#[test]
fn one_pass_counts_equal_the_counts_taken_frontend_by_frontend() {
    let (frontends, state) = shared(0);
    // At once: the headers of a full sync into empty maps are recorded in one pass.
    let (at_once, at_once_maps) = written(&state, 1024);
    // Half at once, then one frontend per change: each header recorded on its own.
    let half = DesiredState {
        frontends: (state.frontends.iter())
            .filter(|(frontend, _)| frontends[..20].contains(frontend))
            .map(|(frontend, plan)| (*frontend, plan.clone()))
            .collect(),
    };
    let (mut steps, mut maps) = written(&half, 1024);
    for frontend in &frontends[20..] {
        let change = FrontendChange {
            frontend: *frontend,
            old: None,
            new: Some(state.frontends[frontend].clone()),
        };
        let report = sync_into(&mut steps, &mut maps, Sync::Delta(&[change]), "one by one");
        assert!(report.complete(), "{report:?}");
    }
    assert_eq!(refs_by_backend(&at_once), counted(&at_once_maps));
    assert_eq!(refs_by_backend(&steps), counted(&maps));
    assert_eq!(refs_by_backend(&at_once), refs_by_backend(&steps));
    assert_eq!(at_once.backend_refs().values().sum::<u32>(), 40 * 5);
}

#[test]
fn a_full_sync_that_moves_every_frontend_counts_only_the_new_slices() {
    let (_, before) = shared(0);
    let (_, after) = shared(5);
    let (mut mirror, mut maps) = written(&before, 1024);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&after), "moved");
    assert!(report.complete(), "{report:?}");
    assert_eq!(refs_by_backend(&mirror), counted(&maps));
    // The old slices are quarantined and forgotten: the mirror holds the new ones only.
    assert_eq!(mirror.image().slots.len(), 40 * 5);
    assert_eq!(mirror.image().desired(), maps.image.desired());
}

#[test]
fn headers_a_full_map_refuses_in_one_pass_are_reported_and_not_counted() {
    let (_, state) = shared(0);
    let mut mirror = MapMirror::new(MapImage::default(), 1024);
    let mut maps = FakeMaps::default();
    maps.limits.insert(map_names::SERVICES, 30);
    let report = sync_into(&mut mirror, &mut maps, Sync::Full(&state), "full");
    assert_eq!(report.map_full[map_names::SERVICES], 10, "{report:?}");
    assert_eq!(mirror.image().services.len(), 30);
    assert_eq!(refs_by_backend(&mirror), counted(&maps));
    assert_eq!(mirror.backend_refs().values().sum::<u32>(), 30 * 5);
    // The refused frontends' slices were never named: free again, only the 30 in use.
    assert_eq!(mirror.slots_used().0, 30 * 5);
}
