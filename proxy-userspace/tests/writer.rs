//! The map writer against real kernel maps (small ones, in a private bpffs): batched
//! writes fill them exactly as planned; when a map fills up mid-batch, the entries before
//! the full one are written, the full one is counted, the rest go on, no header is
//! switched before all it names is written, and the writer's record of the maps stays
//! true to what they hold; entries that vanished behind the writer's back count as
//! deleted.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use proxy_common::{Backend, CtTimeouts, FrontendKey, FrontendValue, Slot, map_names};
use proxy_lab::{PrivateBpffs, require_lab};
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::plan::{
    BackendAddr, DesiredState, EmptyFrontend, Frontend, FrontendKind, FrontendPlan, Protocol,
    ServicePortName,
};
use proxy_userspace::socket_lb::SocketLbMode;
use proxy_userspace::writer::MapWriter;

/// SERVICES holds 4 frontends, BACKEND_SLOTS 16 slots, BACKEND_IDS 6 backends.
const SERVICES: u32 = 4;
const SLOTS: u32 = 16;
const BACKENDS: u32 = 6;

/// `frontends` ClusterIPs 198.19.0.1.. with `backends` distinct backends each.
fn desired(frontends: u8, backends: u8) -> DesiredState {
    let mut state = DesiredState::default();
    for frontend in 0..frontends {
        let plan = FrontendPlan {
            service: ServicePortName {
                namespace: "default".into(),
                name: format!("svc-{frontend}").into(),
                port_name: "".into(),
            },
            kind: FrontendKind::ClusterIp,
            backends: (0..backends)
                .map(|backend| BackendAddr {
                    addr: Ipv4Addr::new(198, 18, 1 + frontend, 1 + backend).into(),
                    port: 8080,
                })
                .collect(),
            cluster_backends: None,
            when_empty: EmptyFrontend::Reject,
            session_affinity: Some(Duration::from_secs(60)),
            serving_addrs: Vec::new(),
            source_ranges: Vec::new(),
            selection: proxy_userspace::plan::Selection::Random,
        };
        let address = Frontend {
            addr: Ipv4Addr::new(198, 19, 0, 1 + frontend).into(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        state.frontends.insert(address, plan);
    }
    state
}

/// The maps the writer fills, opened again from their pins.
struct Pinned {
    services: BpfHashMap<MapData, FrontendKey, FrontendValue>,
    slots: Array<MapData, Slot>,
    backend_ids: BpfHashMap<MapData, Backend, u32>,
}

impl Pinned {
    /// (headers, backends) held, and whether every header names only written slots of
    /// backends BACKEND_IDS holds under the slot's id.
    fn contents(&self) -> (usize, usize, bool) {
        let headers: Vec<FrontendValue> =
            self.services.iter().map(|entry| entry.unwrap().1).collect();
        let backends = self.backend_ids.keys().count();
        let consistent = headers.iter().all(|header| {
            (header.base..header.base + header.slots()).all(|index| {
                let slot = self.slots.get(&index, 0).unwrap();
                slot.backend_id != 0
                    && self.backend_ids.get(&slot.backend, 0).ok() == Some(slot.backend_id)
            })
        });
        (headers.len(), backends, consistent)
    }
}

/// The entries the writer believes `map` holds.
fn believed(writer: &MapWriter, map: &str) -> u64 {
    let fill = writer.fill().into_iter().find(|fill| fill.map == map);
    fill.expect("a map the writer owns").entries
}

#[test]
fn batched_writes_fill_the_maps_and_a_full_map_is_counted_and_recorded_truly() -> Result<()> {
    require_lab!();
    let bpffs = PrivateBpffs::mount("writer")?;
    let root: PathBuf = bpffs.path().join("ebpf-proxy");
    let sizes = MapSizes {
        services: SERVICES,
        backend_slots: SLOTS,
        backends: BACKENDS,
        ..MapSizes::default()
    };
    let mut datapath = Datapath::load(&root, sizes, CtTimeouts::DEFAULT, SocketLbMode::Off)?;
    let maps = datapath.take_maps()?;
    let open = |name: &str| -> Result<aya::maps::Map> {
        Ok(aya::maps::Map::from_map_data(MapData::from_pin(
            root.join(name),
        )?)?)
    };
    let mut pinned = Pinned {
        services: open(map_names::SERVICES)?.try_into()?,
        slots: open(map_names::BACKEND_SLOTS)?.try_into()?,
        backend_ids: open(map_names::BACKEND_IDS)?.try_into()?,
    };
    let mut writer = MapWriter::new(maps.writer)?;

    // Two frontends of two backends, in a few batches.
    let report = writer.apply(&desired(2, 2));
    assert!(report.complete(), "{report:?}");
    assert_eq!(
        report.ops,
        2 + 4 + 4 + 4 + 2,
        "names, backends, members, slots, headers"
    );
    assert_eq!(pinned.contents(), (2, 4, true));
    assert_eq!(believed(&writer, map_names::SERVICES), 2);
    assert_eq!(believed(&writer, map_names::BACKEND_SLOTS), 4);
    assert_eq!(believed(&writer, map_names::BACKEND_IDS), 4);

    // Four frontends of three backends: 12 backends don't fit in 6. The writes that fit
    // land, the others are counted as refused, no header is switched before all it names
    // is there, and the writer's record agrees with the maps.
    let report = writer.apply(&desired(4, 3));
    assert!(report.refused_as_full() > 0, "{report:?}");
    assert!(
        report.map_full.contains_key(map_names::BACKEND_IDS),
        "{report:?}"
    );
    assert!(report.failures.is_empty(), "{report:?}");
    let (headers, backends, consistent) = pinned.contents();
    assert!(consistent, "a header names what the maps lack");
    assert_eq!(backends, BACKENDS as usize);
    assert_eq!(believed(&writer, map_names::SERVICES), headers as u64);
    assert_eq!(believed(&writer, map_names::BACKEND_IDS), backends as u64);

    // Back to what fits: the maps hold exactly that again, consistent.
    let report = writer.apply(&desired(2, 2));
    assert!(report.complete(), "{report:?}");
    assert_eq!(pinned.contents(), (2, 4, true));

    // A backend deleted behind the writer's back: deleting it again counts as done.
    let gone = pinned.backend_ids.keys().next().expect("a backend")?;
    pinned.backend_ids.remove(&gone)?;
    let report = writer.apply(&desired(0, 0));
    assert!(report.complete(), "{report:?}");
    assert_eq!(pinned.contents(), (0, 0, true));
    assert_eq!(believed(&writer, map_names::BACKEND_IDS), 0);
    Ok(())
}
