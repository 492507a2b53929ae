//! The layout record against real pins (a private bpffs): a restart reuses every map, and
//! pins recorded by a newer release are refused with nothing touched. The upgrade from
//! the previous release, with traffic, is the lab's `upgrade` test.

use std::path::{Path, PathBuf};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use proxy_common::{CtTimeouts, LayoutName, layout_name, map_names};
use proxy_lab::{PrivateBpffs, require_lab};
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::layout::{PINNED_MAPS, PREVIOUS_DIR};
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
    for map in PINNED_MAPS {
        assert!(root.join(map.name).exists(), "{} not pinned", map.name);
    }
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
