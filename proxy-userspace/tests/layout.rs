//! The layout record against real pins (a private bpffs): every map has the sizes its
//! layout version says, a restart reuses every map, and pins recorded by a newer release
//! are refused with nothing touched. The upgrade from
//! the previous release, with traffic, is the lab's `upgrade` test.

use std::path::{Path, PathBuf};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use proxy_common::{CtTimeouts, LayoutName, layout_name, map_names};
use proxy_lab::{PrivateBpffs, require_lab};
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::layout::{PINNED_MAPS, PREVIOUS_DIR, pinned_sizes};
use proxy_userspace::socket_lb::SocketLbMode;

fn load(root: &Path) -> Result<Datapath> {
    Datapath::load(
        root,
        MapSizes::default(),
        CtTimeouts::DEFAULT,
        SocketLbMode::Off,
    )
}

fn pins(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_restart_reuses_the_maps_and_a_newer_layout_is_refused_untouched() -> Result<()> {
    require_lab!();
    let bpffs = PrivateBpffs::mount("layout")?;
    let root: PathBuf = bpffs.path().join("ebpf-proxy");
    let first = load(&root)?;
    assert!(!first.upgrading(), "fresh pins");
    let mut changed = Vec::new();
    for map in PINNED_MAPS {
        let sizes = pinned_sizes(&root.join(map.name))?;
        if sizes != (map.key_size, map.value_size) {
            changed.push(format!("{} is {sizes:?}", map.name));
        }
    }
    assert!(
        changed.is_empty(),
        "maps whose layout changed: {changed:?}; raise their versions in PINNED_MAPS and \
         write their new (key, value) sizes there"
    );
    drop(first);
    let conntrack_id = |root: &Path| -> Result<u32> {
        Ok(MapData::from_pin(root.join(map_names::CONNTRACK))?
            .info()?
            .id())
    };
    let before = conntrack_id(&root)?;

    let restarted = load(&root)?;
    assert!(!restarted.upgrading(), "a restart is no upgrade");
    assert_eq!(conntrack_id(&root)?, before, "CONNTRACK was re-created");
    drop(restarted);

    // A newer release raised CONNTRACK's layout.
    let mut record: BpfHashMap<MapData, LayoutName, u32> = BpfHashMap::try_from(Map::HashMap(
        MapData::from_pin(root.join(map_names::LAYOUT))?,
    ))?;
    record.insert(layout_name(map_names::CONNTRACK).unwrap(), 99, 0)?;
    let pins_before = pins(&root);
    let error = format!("{:#}", load(&root).err().expect("refused"));
    assert!(
        error.contains("CONNTRACK") && error.contains("newer release"),
        "{error}"
    );
    assert_eq!(pins(&root), pins_before, "pins touched");
    assert!(!root.join(PREVIOUS_DIR).exists());
    assert_eq!(conntrack_id(&root)?, before);
    Ok(())
}
