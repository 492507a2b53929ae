//! The map writer against real kernel maps (small ones, in a private bpffs): batched
//! writes fill them exactly as planned; when a map fills up mid-batch, the entries before
//! the full one are written, the full one is counted, the rest go on, and the writer's
//! record of the maps stays true to what they hold; entries that vanished behind the
//! writer's back count as deleted.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{Backend, CtTimeouts, ServiceKey, ServiceValue};
use proxy_lab::{PrivateBpffs, require_lab};
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::plan::{
    BackendAddr, DesiredState, EmptyFrontend, Frontend, FrontendKind, FrontendPlan, Protocol,
    ServicePortName,
};
use proxy_userspace::socket_lb::SocketLbMode;
use proxy_userspace::writer::MapWriter;

/// SERVICES holds 12 entries (headers and slots), BACKENDS 6.
const SERVICES: u32 = 12;
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
                    addr: Ipv4Addr::new(198, 18, 1 + frontend, 1 + backend),
                    port: 8080,
                })
                .collect(),
            when_empty: EmptyFrontend::Reject,
            session_affinity: Some(Duration::from_secs(60)),
            serving_addrs: Vec::new(),
            source_ranges: Vec::new(),
        };
        let address = Frontend {
            addr: Ipv4Addr::new(198, 19, 0, 1 + frontend),
            port: 80,
            protocol: Protocol::Tcp,
        };
        state.frontends.insert(address, plan);
    }
    state
}

/// What SERVICES and BACKENDS hold: (entries, entries), and whether every header counts
/// only slots that exist and every slot names a backend that exists.
fn contents(
    services: &BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: &BpfHashMap<MapData, u32, Backend>,
) -> (usize, usize, bool) {
    let services: Vec<(ServiceKey, ServiceValue)> = services.iter().map(Result::unwrap).collect();
    let backend_ids: Vec<u32> = backends.keys().map(Result::unwrap).collect();
    let consistent = services
        .iter()
        .filter(|(key, _)| key.slot == 0)
        .all(|(key, header)| {
            (1..=header.count).all(|slot| {
                services
                    .iter()
                    .find(|(other, _)| *other == key.with_slot(slot))
                    .is_some_and(|(_, value)| backend_ids.contains(&value.backend_id))
            })
        });
    (services.len(), backend_ids.len(), consistent)
}

#[test]
fn batched_writes_fill_the_maps_and_a_full_map_is_counted_and_recorded_truly() -> Result<()> {
    require_lab!();
    let bpffs = PrivateBpffs::mount("writer")?;
    let root: PathBuf = bpffs.path().join("ebpf-proxy");
    let sizes = MapSizes {
        services: SERVICES,
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
    let services: BpfHashMap<MapData, ServiceKey, ServiceValue> = open("SERVICES")?.try_into()?;
    let mut backends: BpfHashMap<MapData, u32, Backend> = open("BACKENDS")?.try_into()?;
    let mut writer = MapWriter::new(maps.services, maps.backends, maps.membership, maps.names)?
        .with_flow_maps(maps.flow_maps)?;

    // Two frontends of two backends: 6 SERVICES entries, 4 backends, in a few batches.
    let report = writer.apply(&desired(2, 2));
    assert!(report.complete(), "{report:?}");
    assert_eq!(
        report.ops,
        6 + 4 + 4 + 2,
        "slots, headers, backends, matches, names"
    );
    assert_eq!(contents(&services, &backends), (6, 4, true));
    assert_eq!(writer.fill(), (6, 4));

    // Four frontends of three backends: 16 entries and 12 backends don't fit. The writes
    // that fit land, the others are counted as refused, and the writer's record agrees
    // with the maps entry for entry.
    let report = writer.apply(&desired(4, 3));
    assert!(report.map_full > 0, "{report:?}");
    assert!(report.failures.is_empty(), "{report:?}");
    let (services_held, backends_held, _) = contents(&services, &backends);
    assert_eq!(
        (services_held, backends_held),
        (SERVICES as usize, BACKENDS as usize)
    );
    assert_eq!(writer.fill(), (services_held, backends_held));

    // Back to what fits: the maps hold exactly that again, consistent.
    let report = writer.apply(&desired(2, 2));
    assert!(report.complete(), "{report:?}");
    assert_eq!(contents(&services, &backends), (6, 4, true));

    // A backend deleted behind the writer's back: deleting it again counts as done.
    let gone = backends.keys().next().expect("a backend")?;
    backends.remove(&gone)?;
    let report = writer.apply(&desired(0, 0));
    assert!(report.complete(), "{report:?}");
    assert_eq!(contents(&services, &backends), (0, 0, true));
    assert_eq!(writer.fill(), (0, 0));
    Ok(())
}
