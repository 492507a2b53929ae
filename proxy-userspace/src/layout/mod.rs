//! The layout of the pinned maps, recorded beside them, and what a daemon does with pins
//! that another release left.
//!
//! Every map the daemon pins is listed in [`PINNED_MAPS`] with the version of its layout,
//! and the daemon records those versions in the LAYOUT map. On start, a pin whose recorded
//! layout is this daemon's is reused (a restart); any other is moved aside into
//! `previous/` before the object is loaded, so the loader creates the map afresh and the
//! program still attached to the pinned links keeps the old one meanwhile. What the map
//! carries ([`Carries`]) decides the rest: maps the daemon programs from its sources are
//! filled by its first sync, conntrack entries are converted ([`legacy_conntrack`]), the
//! datapath's runtime state is lost. The daemon swaps its program into the pinned links
//! only after its first sync, then removes `previous/` (see [`crate::daemon`]), so no
//! packet meets an empty map and no pin is left that the program does not use.
//!
//! Pins without a record come from a release before the record (up to commit a7370e7):
//! their layout is version 0. Pins recorded by a newer release (a version above this
//! one's, or a map this one does not know) are refused before anything is touched.

pub mod legacy_conntrack;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use proxy_common::{LayoutName, layout_name, map_names};
use tracing::{info, warn};

/// What becomes of a map's entries when its layout changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carries {
    /// Written by the daemon from its sources and flags: re-created, filled by the first
    /// sync before the new program runs.
    Programmed,
    /// Conntrack, which established flows need: converted where a conversion from the old
    /// layout exists ([`legacy_conntrack`]).
    Flows,
    /// The datapath's own state that is not converted (counters, session affinities,
    /// socket translations, fragments in flight): re-created empty.
    Runtime,
}

/// A map the daemon pins, the version of its layout, and its key and value sizes in that
/// version (bytes).
#[derive(Clone, Copy, Debug)]
pub struct PinnedMap {
    pub name: &'static str,
    pub version: u32,
    pub carries: Carries,
    pub key_size: u32,
    pub value_size: u32,
}

const fn pinned(
    name: &'static str,
    version: u32,
    carries: Carries,
    (key_size, value_size): (u32, u32),
) -> PinnedMap {
    PinnedMap {
        name,
        version,
        carries,
        key_size,
        value_size,
    }
}

/// Every map the daemon pins, with the version of its layout and its (key, value) sizes:
/// raise a map's version with any change to its type, key, value or the meaning of their
/// bits. The sizes are written out, not computed, so a struct that grows fails the
/// `layout` test until its version is raised too; a pin recorded at a version but of other
/// sizes is refused. A new map is one line.
pub const PINNED_MAPS: &[PinnedMap] = &[
    // 2: the padding became `maglev` (the frontend's Maglev table).
    pinned(map_names::SERVICES, 2, Carries::Programmed, (8, 24)),
    pinned(map_names::BACKEND_SLOTS, 1, Carries::Programmed, (4, 16)),
    pinned(map_names::BACKEND_IDS, 1, Carries::Programmed, (8, 4)),
    pinned(map_names::MEMBERSHIP, 1, Carries::Programmed, (8, 1)),
    pinned(map_names::MEMBERSHIP_EPOCH, 1, Carries::Programmed, (4, 4)),
    pinned(map_names::SVC_NAMES, 1, Carries::Programmed, (4, 145)),
    pinned(map_names::SOURCE_RANGES, 1, Carries::Programmed, (12, 1)),
    pinned(map_names::MAGLEV, 1, Carries::Programmed, (12, 64)),
    pinned(map_names::SERVICES6, 1, Carries::Programmed, (20, 24)),
    pinned(map_names::BACKEND_SLOTS6, 1, Carries::Programmed, (4, 28)),
    pinned(map_names::BACKEND_IDS6, 1, Carries::Programmed, (20, 4)),
    pinned(map_names::MEMBERSHIP6, 1, Carries::Programmed, (20, 1)),
    pinned(map_names::SVC_NAMES6, 1, Carries::Programmed, (4, 145)),
    pinned(map_names::SOURCE_RANGES6, 1, Carries::Programmed, (24, 1)),
    pinned(map_names::MAGLEV6, 1, Carries::Programmed, (12, 64)),
    pinned(map_names::XDP_EGRESS, 1, Carries::Programmed, (4, 8)),
    pinned(map_names::DEVICES, 1, Carries::Programmed, (4, 1)),
    pinned(map_names::CT_TIMEOUTS, 1, Carries::Programmed, (4, 32)),
    pinned(map_names::CONNTRACK, 1, Carries::Flows, (16, 64)),
    pinned(map_names::CONNTRACK_PENDING, 1, Carries::Flows, (16, 64)),
    pinned(map_names::CONNTRACK6, 1, Carries::Flows, (40, 88)),
    pinned(map_names::CONNTRACK_PENDING6, 1, Carries::Flows, (40, 88)),
    // The programs it holds are the loading daemon's: filled anew at every load.
    pinned(map_names::TAIL_CALLS, 1, Carries::Runtime, (4, 4)),
    pinned(map_names::XDP_TAIL_CALLS, 1, Carries::Runtime, (4, 4)),
    pinned(map_names::AFFINITY, 1, Carries::Runtime, (8, 24)),
    pinned(map_names::AFFINITY6, 1, Carries::Runtime, (20, 32)),
    pinned(map_names::SOCK_AFFINITY, 1, Carries::Runtime, (16, 24)),
    pinned(map_names::SOCK_XLATE, 1, Carries::Runtime, (16, 40)),
    pinned(map_names::SOCK_AFFINITY6, 1, Carries::Runtime, (16, 32)),
    pinned(map_names::SOCK_XLATE6, 1, Carries::Runtime, (32, 56)),
    pinned(map_names::FRAGMENTS, 1, Carries::Runtime, (12, 24)),
    pinned(map_names::FRAGMENTS6, 1, Carries::Runtime, (40, 48)),
    // 2: 36 counters (the XDP verdicts), not 31.
    pinned(map_names::STATS, 2, Carries::Runtime, (4, 8)),
];

/// The (key, value) sizes of the map pinned at `path`.
pub fn pinned_sizes(path: &Path) -> Result<(u32, u32)> {
    let info = MapData::from_pin(path)
        .with_context(|| format!("opening {}", path.display()))?
        .info()?;
    Ok((info.key_size(), info.value_size()))
}

/// Maps that earlier releases pinned and this one no longer has: removed with the rest of
/// `previous/` once the new program runs.
const RETIRED_MAPS: &[&str] = &["BACKENDS", "AFFINITY_MATCH"];

/// Where the pins of another layout wait until the new program is swapped in.
pub const PREVIOUS_DIR: &str = "previous";

/// What the daemon does with one pin it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Its layout is this daemon's.
    Reuse,
    /// Another (older) layout: moved to `previous/`, the map is created afresh.
    Replace { from: u32, carries: Carries },
    /// A map this release no longer has: moved to `previous/`, removed after the swap.
    Retire,
}

/// Decides what becomes of each pin in `pins` (map pin names found in the root), given
/// the LAYOUT record (`None` without one); refuses pins of a newer release.
pub fn plan(
    pins: &[String],
    record: Option<&BTreeMap<String, u32>>,
) -> Result<BTreeMap<String, Action>> {
    let ours = |name: &str| PINNED_MAPS.iter().find(|map| map.name == name);
    let newer = |what: String| {
        anyhow!(
            "{what}: these pins were written by a newer release of ebpf-proxy, whose maps this \
             one cannot read; nothing was changed. Run that release (or a newer one), or remove \
             the pins with `ebpf-proxy cleanup` (which ends the established flows through the \
             proxy on this node)"
        )
    };
    for (name, version) in record.into_iter().flatten() {
        match ours(name) {
            Some(map) if *version > map.version => {
                return Err(newer(format!(
                    "map {name} has layout version {version}, this daemon knows up to {}",
                    map.version
                )));
            }
            None if !RETIRED_MAPS.contains(&name.as_str()) => {
                return Err(newer(format!(
                    "map {name} (layout version {version}) is unknown to this daemon"
                )));
            }
            _ => {}
        }
    }
    let mut actions = BTreeMap::new();
    for name in pins {
        if name == map_names::LAYOUT {
            continue;
        }
        let version = record.and_then(|record| record.get(name)).copied();
        let action = match ours(name) {
            Some(map) if version == Some(map.version) => Action::Reuse,
            Some(map) => Action::Replace {
                from: version.unwrap_or(0),
                carries: map.carries,
            },
            None if RETIRED_MAPS.contains(&name.as_str()) => Action::Retire,
            None => {
                return Err(newer(format!(
                    "pin {name} is not a map this daemon knows{}",
                    if record.is_some() {
                        " (nor recorded in LAYOUT)"
                    } else {
                        ""
                    }
                )));
            }
        };
        actions.insert(name.clone(), action);
    }
    Ok(actions)
}

/// The pins of another layout, set aside until the new program runs.
#[derive(Debug)]
pub struct Upgrade {
    previous: PathBuf,
}

impl Upgrade {
    /// The directory holding the old pins.
    pub fn previous(&self) -> &Path {
        &self.previous
    }

    /// Removes the old pins (the program that used them is no longer attached), which
    /// frees their maps. Returns their names.
    pub fn finish(self) -> Result<Vec<String>> {
        let removed = pin_names(&self.previous)?;
        fs::remove_dir_all(&self.previous)
            .with_context(|| format!("removing {}", self.previous.display()))?;
        Ok(removed)
    }
}

/// Reads the pins under `root` and their record, refuses a newer layout, and moves every
/// pin of another layout into `previous/`. Returns the pending upgrade when `previous/`
/// holds pins (also those of an upgrade that was interrupted before its swap). Call
/// before loading the object; [`record`] after.
pub fn set_aside(root: &Path) -> Result<Option<Upgrade>> {
    let record = read_record(root)?;
    let pins = pin_names(root)?;
    let actions = plan(&pins, record.as_ref())?;
    let previous = root.join(PREVIOUS_DIR);
    let names = |wanted: fn(&Action) -> bool| -> Vec<String> {
        actions
            .iter()
            .filter(|(_, action)| wanted(action))
            .map(|(name, action)| match action {
                Action::Replace { from, .. } => format!("{name} (layout {from})"),
                _ => name.clone(),
            })
            .collect()
    };
    for (name, action) in &actions {
        let map = PINNED_MAPS.iter().find(|map| map.name == name);
        if let (Action::Reuse, Some(map)) = (action, map) {
            let found = pinned_sizes(&root.join(name))?;
            if found != (map.key_size, map.value_size) {
                bail!(
                    "{name} is recorded at layout version {}, but its key and value sizes                      {found:?} are not that layout's {:?}: a build that changed the layout                      without raising its version pinned it; nothing was changed. Remove the                      pins with `ebpf-proxy cleanup` (which ends the established flows through                      the proxy on this node)",
                    map.version,
                    (map.key_size, map.value_size)
                );
            }
        }
    }
    let reused = names(|action| *action == Action::Reuse);
    if !reused.is_empty() {
        info!(maps = ?reused, "reusing the pinned maps (same layout)");
    }
    let replaced = names(|action| matches!(action, Action::Replace { .. }));
    let retired = names(|action| *action == Action::Retire);
    for (name, action) in &actions {
        if *action == Action::Reuse {
            continue;
        }
        fs::create_dir_all(&previous)
            .with_context(|| format!("creating {}", previous.display()))?;
        let (from, to) = (root.join(name), previous.join(name));
        if to.exists() {
            // An interrupted upgrade set the older pin aside already; this one is the
            // interrupted daemon's own, never recorded.
            fs::remove_file(&from).with_context(|| format!("removing {}", from.display()))?;
        } else {
            fs::rename(&from, &to)
                .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
        }
        if let Action::Replace { from, carries } = action {
            let current = PINNED_MAPS
                .iter()
                .find(|map| map.name == name)
                .map_or(0, |map| map.version);
            let fate = match carries {
                Carries::Programmed => "re-created; the first sync fills it",
                Carries::Flows => "re-created; its flows are converted before the swap",
                Carries::Runtime => "re-created empty; its entries are lost",
            };
            info!(map = %name, from_layout = from, to_layout = current, "{fate}");
        }
    }
    if !replaced.is_empty() || !retired.is_empty() {
        info!(
            replaced = ?replaced,
            retired = ?retired,
            previous = %previous.display(),
            "pins of another layout set aside; the program attached keeps them until this \
             daemon's first sync, then its program is swapped in and they are removed"
        );
    }
    if pin_names(&previous)?.is_empty() {
        // Nothing waits (an empty directory is all an earlier run may have left).
        let _ = fs::remove_dir(&previous);
        return Ok(None);
    }
    Ok(Some(Upgrade { previous }))
}

/// Records this daemon's layout of every map in LAYOUT (pinned by the loader), dropping
/// entries of maps it no longer has.
pub fn record(root: &Path) -> Result<()> {
    let mut layout = open_record(root)?.ok_or_else(|| {
        anyhow!(
            "no pinned {} under {} after loading",
            map_names::LAYOUT,
            root.display()
        )
    })?;
    let stale: Vec<LayoutName> = layout
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !PINNED_MAPS.iter().any(|map| layout_key(map.name) == *key))
        .collect();
    for key in stale {
        let _ = layout.remove(&key);
    }
    for map in PINNED_MAPS {
        layout
            .insert(layout_key(map.name), map.version, 0)
            .with_context(|| format!("recording the layout of {}", map.name))?;
    }
    Ok(())
}

/// Fails unless the map pinned as `name` under `root` has this release's layout: what the
/// CLI checks before it reads a pin.
pub fn check(root: &Path, name: &str) -> Result<()> {
    let expected = PINNED_MAPS
        .iter()
        .find(|map| map.name == name)
        .map(|map| map.version);
    let recorded = read_record(root)?;
    let found = recorded
        .as_ref()
        .and_then(|record| record.get(name))
        .copied();
    match (expected, found) {
        (Some(expected), Some(found)) if expected == found => Ok(()),
        (_, None) if recorded.is_none() => bail!(
            "the pins under {} carry no layout record: an earlier release of ebpf-proxy wrote \
             them. Start this release's daemon on them (it converts them), or use the \
             release that runs",
            root.display()
        ),
        _ => bail!(
            "{name} under {} has layout version {}, this release reads version {}: another \
             release of ebpf-proxy pinned it; use that release's CLI",
            root.display(),
            found.map_or("none".into(), |found| found.to_string()),
            expected.map_or("none".into(), |expected| expected.to_string()),
        ),
    }
}

fn layout_key(name: &str) -> LayoutName {
    layout_name(name).expect("map names fit the LAYOUT key")
}

fn open_record(root: &Path) -> Result<Option<BpfHashMap<MapData, LayoutName, u32>>> {
    let path = root.join(map_names::LAYOUT);
    let data = match MapData::from_pin(&path) {
        Ok(data) => data,
        Err(_) if !path.exists() => return Ok(None),
        Err(error) => return Err(error).with_context(|| format!("opening {}", path.display())),
    };
    let map = BpfHashMap::try_from(Map::HashMap(data)).with_context(|| {
        format!(
            "{} is not this release's layout record (name → version)",
            path.display()
        )
    })?;
    Ok(Some(map))
}

/// The LAYOUT record under `root`, `None` if there is none.
fn read_record(root: &Path) -> Result<Option<BTreeMap<String, u32>>> {
    let Some(layout) = open_record(root)? else {
        return Ok(None);
    };
    let mut record = BTreeMap::new();
    for entry in layout.iter() {
        let (key, version) = entry.context("reading the layout record")?;
        let end = key.iter().position(|&byte| byte == 0).unwrap_or(key.len());
        let name = String::from_utf8_lossy(&key[..end]).into_owned();
        record.insert(name, version);
    }
    Ok(Some(record))
}

/// The names of the pins (not directories) in `dir`; none if it does not exist.
fn pin_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Logs what the conversion of conntrack did, or that the flows were lost.
pub fn report_migration(result: &Result<Option<legacy_conntrack::Migrated>>, pass: &str) {
    match result {
        Ok(None) => {}
        Ok(Some(migrated)) => info!(
            pass,
            flows = migrated.flows,
            assured = migrated.assured,
            pending = migrated.pending,
            already_there = migrated.already_there,
            expired = migrated.expired,
            unpaired = migrated.unpaired,
            frontend_gone = migrated.frontend_gone,
            "conntrack converted from the previous layout"
        ),
        Err(error) => warn!(
            pass,
            error = format!("{error:#}"),
            "conntrack of the previous layout not converted: its flows are lost"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    fn current_record() -> BTreeMap<String, u32> {
        PINNED_MAPS
            .iter()
            .map(|map| (map.name.to_string(), map.version))
            .collect()
    }

    #[test]
    fn a_restart_reuses_every_map() {
        let all: Vec<String> = PINNED_MAPS.iter().map(|map| map.name.into()).collect();
        let mut with_record = all.clone();
        with_record.push(map_names::LAYOUT.into());
        let actions = plan(&with_record, Some(&current_record())).unwrap();
        assert_eq!(actions.len(), PINNED_MAPS.len());
        assert!(actions.values().all(|action| *action == Action::Reuse));
    }

    #[test]
    fn pins_without_a_record_are_the_first_releases_and_replaced() {
        // What commit a7370e7 pinned.
        let found = pins(&[
            "SERVICES",
            "BACKENDS",
            "CONNTRACK",
            "STATS",
            "AFFINITY",
            "AFFINITY_MATCH",
            "SVC_NAMES",
            "SOURCE_RANGES",
        ]);
        let actions = plan(&found, None).unwrap();
        let action = |name: &str| actions[name];
        assert_eq!(
            action("CONNTRACK"),
            Action::Replace {
                from: 0,
                carries: Carries::Flows
            }
        );
        assert_eq!(
            action("SERVICES"),
            Action::Replace {
                from: 0,
                carries: Carries::Programmed
            }
        );
        assert_eq!(
            action("STATS"),
            Action::Replace {
                from: 0,
                carries: Carries::Runtime
            }
        );
        assert_eq!(action("BACKENDS"), Action::Retire);
        assert_eq!(action("AFFINITY_MATCH"), Action::Retire);
    }

    #[test]
    fn only_the_maps_whose_layout_changed_are_replaced() {
        let mut record = current_record();
        record.insert(map_names::CONNTRACK.into(), 0);
        let actions = plan(&pins(&["CONNTRACK", "SERVICES", "LAYOUT"]), Some(&record)).unwrap();
        assert_eq!(actions["SERVICES"], Action::Reuse);
        assert!(matches!(
            actions["CONNTRACK"],
            Action::Replace { from: 0, .. }
        ));
    }

    #[test]
    fn a_newer_layout_is_refused() {
        let mut record = current_record();
        record.insert(map_names::CONNTRACK.into(), 99);
        let error = plan(&pins(&["CONNTRACK"]), Some(&record)).unwrap_err();
        assert!(format!("{error}").contains("layout version 99"), "{error}");

        let mut record = current_record();
        record.insert("MAGLEV_NEXT".into(), 1);
        let error = plan(&pins(&["SERVICES"]), Some(&record)).unwrap_err();
        assert!(format!("{error}").contains("newer release"), "{error}");

        let error = plan(&pins(&["SOMETHING_ELSE"]), None).unwrap_err();
        assert!(format!("{error}").contains("SOMETHING_ELSE"), "{error}");
    }

    #[test]
    fn every_map_name_fits_the_record_once() {
        let mut seen = std::collections::BTreeSet::new();
        for map in PINNED_MAPS {
            assert!(layout_name(map.name).is_some(), "{}", map.name);
            assert!(seen.insert(map.name), "{} listed twice", map.name);
            assert!(!RETIRED_MAPS.contains(&map.name));
        }
    }
}
