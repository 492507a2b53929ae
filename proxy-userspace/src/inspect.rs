//! Node-admin views of the kernel state, read from the pinned maps (no daemon needed).
//!
//! Each view is built as plain data first (serializable, so `-o json` has a stable
//! schema), then rendered as an aligned table.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use comfy_table::{Table, presets::NOTHING};
use proxy_common::{Backend, ServiceKey, ServiceValue, map_names, proto, service_flags, stat};
use serde::Serialize;

/// Opens a pinned map, with a hint when the pins are not there.
fn open_pinned(root: &Path, name: &str) -> Result<Map> {
    let path: PathBuf = root.join(name);
    if !path.exists() {
        return Err(anyhow!(
            "no pinned map at {}: is the daemon running? (looked in {}; set --bpffs-root)",
            path.display(),
            root.display()
        ));
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// A datapath counter summed over CPUs.
#[derive(Debug, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

/// Reads the STATS counters, summed over all CPUs.
pub fn read_stats(root: &Path) -> Result<Vec<Counter>> {
    let stats: PerCpuArray<MapData, u64> = open_pinned(root, map_names::STATS)?.try_into()?;
    let mut counters = Vec::new();
    for (index, name) in stat::NAMES.iter().enumerate() {
        let per_cpu = stats.get(&(index as u32), 0)?;
        counters.push(Counter {
            name,
            value: per_cpu.iter().sum(),
        });
    }
    Ok(counters)
}

pub fn render_stats(counters: &[Counter]) -> String {
    let mut table = new_table(["COUNTER", "VALUE"]);
    for counter in counters {
        table.add_row([counter.name.to_string(), counter.value.to_string()]);
    }
    table.to_string()
}

/// One frontend with its backends, as the datapath holds it.
#[derive(Debug, Serialize)]
pub struct FrontendView {
    pub frontend: String,
    pub kind: &'static str,
    pub rev_nat_id: u32,
    pub backends: Vec<String>,
}

/// Reads SERVICES and BACKENDS into one row per frontend.
pub fn read_services(root: &Path) -> Result<Vec<FrontendView>> {
    let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        open_pinned(root, map_names::SERVICES)?.try_into()?;
    let backends: BpfHashMap<MapData, u32, Backend> =
        open_pinned(root, map_names::BACKENDS)?.try_into()?;
    let mut entries = BTreeMap::new();
    for entry in services.iter() {
        let (key, value) = entry?;
        entries.insert(key, value);
    }
    let mut views = Vec::new();
    for (key, header) in entries.iter().filter(|(key, _)| key.slot == 0) {
        let backends = (1..=header.count)
            .map(|slot| match entries.get(&key.with_slot(slot)) {
                Some(value) => match backends.get(&value.backend_id, 0) {
                    Ok(backend) => format!("{}:{}", addr(backend.addr), u16::from_be(backend.port)),
                    Err(_) => format!("<missing backend {}>", value.backend_id),
                },
                None => format!("<missing slot {slot}>"),
            })
            .collect();
        views.push(FrontendView {
            frontend: format!(
                "{}:{}/{}",
                addr(key.addr),
                u16::from_be(key.port),
                proto_name(key.proto)
            ),
            kind: kind_name(header.flags),
            rev_nat_id: header.rev_nat_id,
            backends,
        });
    }
    Ok(views)
}

pub fn render_services(views: &[FrontendView]) -> String {
    let mut table = new_table(["FRONTEND", "TYPE", "ID", "BACKENDS"]);
    for view in views {
        let backends = if view.backends.is_empty() {
            "(none: dropped)".to_string()
        } else {
            view.backends.join(" ")
        };
        table.add_row([
            view.frontend.clone(),
            view.kind.to_string(),
            view.rev_nat_id.to_string(),
            backends,
        ]);
    }
    table.to_string()
}

fn new_table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header);
    table
}

fn addr(wire: u32) -> Ipv4Addr {
    Ipv4Addr::from(wire.to_ne_bytes())
}

fn proto_name(protocol: u8) -> &'static str {
    match protocol {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "?",
    }
}

fn kind_name(flags: u16) -> &'static str {
    if flags & service_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & service_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if flags & service_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else {
        "ClusterIP"
    }
}
