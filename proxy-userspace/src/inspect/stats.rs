//! `ebpf-proxy stats`: the datapath counters summed over CPUs, and map fill levels.

use std::path::Path;

use anyhow::Result;
use aya::Pod;
use aya::maps::{Map, MapData, PerCpuArray};
use proxy_common::{
    Address, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragmentKey, FragmentValue,
    FrontendKey, FrontendValue, Ipv6, MembershipKey, ServiceName, SockAffinityKey, SockKey,
    SockValue, map_names, stat,
};

use serde::Serialize;

use crate::bpf_batch;

use super::{new_table, open_pinned};

/// JSON schema: `counters` in `proxy_common::stat` order, then `maps`.
#[derive(Debug, Serialize)]
pub struct StatsView {
    pub counters: Vec<Counter>,
    pub maps: Vec<MapFill>,
}

/// A datapath counter summed over CPUs; `name` is one of `proxy_common::stat::NAMES`.
#[derive(Debug, Serialize)]
pub struct Counter {
    pub name: &'static str,
    pub value: u64,
}

/// How full a map is. A full CONNTRACK, CONNTRACK_PENDING or AFFINITY (LRU maps) forgets
/// its least recently used entries; a full SERVICES, BACKEND_SLOTS, BACKEND_IDS or
/// MEMBERSHIP refuses the daemon's writes, and the frontends they were for stay as they
/// were. BACKEND_SLOTS: the slots frontends' headers name.
#[derive(Debug, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u32,
}

pub fn read(root: &Path) -> Result<StatsView> {
    let stats: PerCpuArray<MapData, u64> =
        Map::from_map_data(open_pinned(root, map_names::STATS)?)?.try_into()?;
    let mut counters = Vec::new();
    for (index, name) in (0..).zip(stat::NAMES) {
        let per_cpu = stats.get(&index, 0)?;
        counters.push(Counter {
            name,
            value: per_cpu.iter().sum(),
        });
    }
    let mut maps = vec![
        fill::<CtKey, CtValue>(root, map_names::CONNTRACK)?,
        fill::<CtKey, CtValue>(root, map_names::CONNTRACK_PENDING)?,
        fill::<FragmentKey, FragmentValue>(root, map_names::FRAGMENTS)?,
        fill::<AffinityKey, AffinityValue>(root, map_names::AFFINITY)?,
        fill::<SockKey, SockValue>(root, map_names::SOCK_XLATE)?,
        fill::<SockAffinityKey, AffinityValue>(root, map_names::SOCK_AFFINITY)?,
        fill::<CtKey<Ipv6>, CtValue<Ipv6>>(root, map_names::CONNTRACK6)?,
        fill::<CtKey<Ipv6>, CtValue<Ipv6>>(root, map_names::CONNTRACK_PENDING6)?,
        fill::<AffinityKey<Ipv6>, AffinityValue<Ipv6>>(root, map_names::AFFINITY6)?,
        fill::<SockKey<Ipv6>, SockValue<Ipv6>>(root, map_names::SOCK_XLATE6)?,
        fill::<SockAffinityKey, AffinityValue<Ipv6>>(root, map_names::SOCK_AFFINITY6)?,
        fill::<FragmentKey<Ipv6>, FragmentValue<Ipv6>>(root, map_names::FRAGMENTS6)?,
    ];
    maps.splice(0..0, service_maps::<u32>(root)?);
    maps.extend(service_maps::<Ipv6>(root)?);
    Ok(StatsView { counters, maps })
}

/// The fill of the maps the daemon writes for one family (IPv4's SERVICES, …; IPv6's
/// SERVICES6, …).
fn service_maps<A: Address>(root: &Path) -> Result<Vec<MapFill>> {
    let names = A::MAPS;
    Ok(vec![
        fill::<FrontendKey<A>, FrontendValue>(root, names.services)?,
        slots_fill::<A>(root)?,
        fill::<Backend<A>, u32>(root, names.backend_ids)?,
        fill::<MembershipKey<A>, u8>(root, names.membership)?,
        fill::<u32, ServiceName>(root, names.svc_names)?,
    ])
}

/// Counts a hash map's entries, read in batches (the kernel keeps no count).
fn fill<K: Pod, V: Pod>(root: &Path, name: &'static str) -> Result<MapFill> {
    let data = open_pinned(root, name)?;
    Ok(MapFill {
        name,
        entries: bpf_batch::count_entries::<K, V>(&data)?,
        max_entries: data.info()?.max_entries(),
    })
}

/// BACKEND_SLOTS' (BACKEND_SLOTS6's) fill: the slots the frontends' headers name.
fn slots_fill<A: Address>(root: &Path) -> Result<MapFill> {
    let names = A::MAPS;
    let services = open_pinned(root, names.services)?;
    let mut entries = 0;
    bpf_batch::for_each_entry(
        &services,
        4096,
        |_: &FrontendKey<A>, header: &FrontendValue| {
            entries += u64::from(header.slots());
            Ok(())
        },
    )?;
    let slots = open_pinned(root, names.backend_slots)?;
    Ok(MapFill {
        name: names.backend_slots,
        entries,
        max_entries: slots.info()?.max_entries(),
    })
}

pub fn render(view: &StatsView) -> String {
    let mut counters = new_table(["COUNTER", "VALUE"]);
    for counter in &view.counters {
        counters.add_row([counter.name.to_owned(), counter.value.to_string()]);
    }
    let mut maps = new_table(["MAP", "ENTRIES", "MAX", "FILL"]);
    for map in &view.maps {
        let fill = 100.0 * map.entries as f64 / f64::from(map.max_entries.max(1));
        maps.add_row([
            map.name.to_owned(),
            map.entries.to_string(),
            map.max_entries.to_string(),
            format!("{fill:.1}%"),
        ]);
    }
    format!("{counters}\n\n{maps}")
}
