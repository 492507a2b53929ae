//! `ebpf-proxy conntrack`: live flows (client → frontend → backend) of both conntrack
//! maps of each family (CONNTRACK and CONNTRACK_PENDING, CONNTRACK6 and CONNTRACK_PENDING6)
//! with their state, and `conntrack flush`, which deletes the flows matching the same
//! filters.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use clap::{Args, Subcommand};
use proxy_common::{
    Address, CtKey, CtTimeouts, CtValue, Ipv6, ServiceName, ct_flags, ct_seconds, map_names,
};
use serde::Serialize;

use super::{
    Endpoint, ListArgs, Output, PinArgs, family_name, new_table, open_pinned, open_typed, print,
    protocol_name, read_entries, service_port_name,
};
use crate::conntrack::{CtEntry, CtTable, FlowEntries, monotonic_now_ns, pair_flows, read_all};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConntrackArgs {
    #[command(subcommand)]
    flush: Option<ConntrackCommand>,
    #[command(flatten)]
    filter: FlowFilter,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Subcommand)]
enum ConntrackCommand {
    /// Deletes the matching flows (both entries of each): their next packets select a
    /// backend again, as after `conntrack -D` on a kube-proxy node.
    Flush(FlushArgs),
}

#[derive(Args)]
struct FlushArgs {
    #[command(flatten)]
    filter: FlowFilter,
    /// Delete every flow; required when no filter is given.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    pins: PinArgs,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The flows `conntrack` lists and `conntrack flush` deletes: all given filters must match.
#[derive(Args, Clone, Debug, Default)]
struct FlowFilter {
    /// Only flows of this Service: `namespace/name`, `namespace/name:port-name`, or a
    /// frontend `address[:port]`.
    #[arg(long, value_name = "SERVICE")]
    service: Option<ServicePattern>,
    /// Only flows to this backend: `address[:port]`.
    #[arg(long, value_name = "ADDRESS[:PORT]")]
    backend: Option<EndpointPattern>,
    /// Only flows from this client: `address[:port]`.
    #[arg(long, value_name = "ADDRESS[:PORT]")]
    client: Option<EndpointPattern>,
}

impl FlowFilter {
    fn is_empty(&self) -> bool {
        self.service.is_none() && self.backend.is_none() && self.client.is_none()
    }

    fn matches(&self, flow: &FlowView) -> bool {
        self.service.as_ref().is_none_or(|s| s.matches(flow))
            && self.backend.is_none_or(|b| b.matches(&flow.backend))
            && self.client.is_none_or(|c| c.matches(&flow.client))
    }

    fn select(&self, flows: Vec<FlowView>) -> Vec<FlowView> {
        flows
            .into_iter()
            .filter(|flow| self.matches(flow))
            .collect()
    }
}

impl ConntrackArgs {
    pub fn run(self) -> Result<()> {
        if let Some(ConntrackCommand::Flush(flush)) = self.flush {
            return flush.run();
        }
        self.list.show(
            |root| Ok(self.filter.select(read_flows(root)?.0)),
            |flows| render(flows),
        )
    }
}

impl FlushArgs {
    fn run(self) -> Result<()> {
        let filter = &self.filter;
        if filter.is_empty() && !self.all {
            bail!("conntrack flush needs a filter (--service, --backend, --client) or --all");
        }
        let root = &self.pins.bpffs_root;
        let (flows, mut maps) = read_flows(root)?;
        let mut report = FlushReport::default();
        for flow in filter.select(flows) {
            report.flows += 1;
            for key in &flow.keys {
                // Already gone (expired or evicted meanwhile) counts as flushed.
                if maps.remove(key)? {
                    report.entries += 1;
                }
            }
        }
        print(&match self.output {
            Output::Table => format!(
                "flushed: {} flows, {} conntrack entries",
                report.flows, report.entries
            ),
            Output::Json => serde_json::to_string_pretty(&report)?,
        })
    }
}

/// What `conntrack flush` removed. JSON: `{"flows": n, "entries": m}`.
#[derive(Debug, Default, Serialize)]
struct FlushReport {
    flows: u64,
    entries: u64,
}

/// One family's pinned conntrack maps.
struct FamilyMaps {
    assured: Map,
    pending: Map,
}

impl FamilyMaps {
    fn open<A: Address>(root: &Path) -> Result<Self> {
        let open = |table: CtTable| -> Result<Map> {
            Ok(Map::from_map_data(open_pinned(
                root,
                table.map_name_of::<A>(),
            )?)?)
        };
        Ok(Self {
            assured: open(CtTable::Assured)?,
            pending: open(CtTable::Pending)?,
        })
    }

    fn map(&mut self, table: CtTable) -> &mut Map {
        match table {
            CtTable::Assured => &mut self.assured,
            CtTable::Pending => &mut self.pending,
        }
    }

    fn entries<A: Address>(&self) -> Result<Vec<CtEntry<A>>> {
        fn data(map: &Map) -> Result<&MapData> {
            match map {
                Map::LruHashMap(data) => Ok(data),
                _ => Err(anyhow::anyhow!("a conntrack map is not an LRU hash map")),
            }
        }
        Ok(read_all(&[
            (CtTable::Assured, data(&self.assured)?),
            (CtTable::Pending, data(&self.pending)?),
        ])?)
    }

    /// Removes one entry; false if it was gone already.
    fn remove<A: Address>(&mut self, table: CtTable, key: &CtKey<A>) -> Result<bool> {
        let mut map: BpfHashMap<&mut MapData, CtKey<A>, CtValue<A>> = self.map(table).try_into()?;
        Ok(map.remove(key).is_ok())
    }
}

/// The pinned conntrack maps of both families, and the timeouts.
struct ConntrackMaps {
    ipv4: FamilyMaps,
    ipv6: FamilyMaps,
    timeouts: CtTimeouts,
}

impl ConntrackMaps {
    fn open(root: &Path) -> Result<Self> {
        let timeouts: Array<MapData, CtTimeouts> = open_typed(root, map_names::CT_TIMEOUTS)?;
        Ok(Self {
            ipv4: FamilyMaps::open::<u32>(root)?,
            ipv6: FamilyMaps::open::<Ipv6>(root)?,
            timeouts: timeouts.get(&0, 0)?,
        })
    }

    /// Removes one entry; false if it was gone already.
    fn remove(&mut self, key: &EntryKey) -> Result<bool> {
        match key {
            EntryKey::Ipv4(table, key) => self.ipv4.remove(*table, key),
            EntryKey::Ipv6(table, key) => self.ipv6.remove(*table, key),
        }
    }
}

/// Where one of a flow's entries sits: its family's map and its key (a flush removes it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EntryKey {
    Ipv4(CtTable, CtKey),
    Ipv6(CtTable, CtKey<Ipv6>),
}

/// A family's conntrack entries, as [`EntryKey`]s know them.
trait FlowFamily: Address {
    fn entry_key(table: CtTable, key: CtKey<Self>) -> EntryKey;
}

impl FlowFamily for u32 {
    fn entry_key(table: CtTable, key: CtKey) -> EntryKey {
        EntryKey::Ipv4(table, key)
    }
}

impl FlowFamily for Ipv6 {
    fn entry_key(table: CtTable, key: CtKey<Ipv6>) -> EntryKey {
        EntryKey::Ipv6(table, key)
    }
}

/// The flows in the conntrack maps of both families (IPv4's first), and the maps (for
/// flushes). Each family's flows are named from its own SVC_NAMES: rev_nat_ids count per
/// family.
fn read_flows(root: &Path) -> Result<(Vec<FlowView>, ConntrackMaps)> {
    let maps = ConntrackMaps::open(root)?;
    let now_ns = monotonic_now_ns();
    let mut flows = family_flows::<u32>(root, &maps.ipv4, now_ns, &maps.timeouts)?;
    flows.extend(family_flows::<Ipv6>(
        root,
        &maps.ipv6,
        now_ns,
        &maps.timeouts,
    )?);
    Ok((flows, maps))
}

fn family_flows<A: FlowFamily>(
    root: &Path,
    maps: &FamilyMaps,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Result<Vec<FlowView>> {
    let names: BpfHashMap<MapData, u32, ServiceName> = open_typed(root, A::MAPS.svc_names)?;
    Ok(flows(
        &maps.entries::<A>()?,
        &read_entries(&names)?,
        now_ns,
        timeouts,
    ))
}

/// One connection as the datapath tracks it. JSON schema: every field, always present
/// (`service` may be null).
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// `IPv4` or `IPv6`: which family's maps hold the flow (ids count per family).
    pub family: &'static str,
    pub protocol: &'static str,
    pub client: Endpoint,
    /// The address the client connected to (a VIP or a node address; the backend itself
    /// for a direct flow).
    pub frontend: Endpoint,
    pub backend: Endpoint,
    /// Who the backend sees as its client: the client, or the frontend address (hairpin),
    /// a node address and SNAT port, the client with a remapped port.
    pub backend_sees: Endpoint,
    /// `namespace/name:port-name` of the frontend, null if unknown.
    pub service: Option<String>,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// `service`, or `direct`: a flow straight to a backend, tracked so that no Service
    /// flow is created over its reply tuple.
    pub kind: &'static str,
    /// `open`, or `closing` once a FIN or RST was seen.
    pub state: &'static str,
    /// The connection's state: TCP `syn_sent`, `syn_recv`, `established`, `close_wait`,
    /// `time_wait`, `close`; UDP `unreplied`, `replied`, `stream`.
    pub flow_state: &'static str,
    /// In CONNTRACK (answered, and TCP past its handshake), not CONNTRACK_PENDING.
    pub assured: bool,
    /// How the flow is translated besides DNAT: `hairpin`, `snat`, `remapped`.
    pub translation: Vec<&'static str>,
    /// Since the flow's first packet.
    pub age_seconds: u64,
    /// Since its latest packet in either direction.
    pub idle_seconds: u64,
    /// Until the flow is over if it stays idle (the timeout of its state from its latest
    /// packet); the garbage collector removes it some time after.
    pub expires_in_seconds: u64,
    pub packets_to_backend: u64,
    pub bytes_to_backend: u64,
    pub packets_from_backend: u64,
    pub bytes_from_backend: u64,
    /// Which of the flow's entries exist: `forward` (keyed client → frontend) and
    /// `reply` (keyed backend → client). The LRU may evict one before the other.
    pub entries: Vec<&'static str>,
    #[serde(skip)]
    keys: Vec<EntryKey>,
}

/// One view per flow (see [`pair_flows`]) of one family's entries, sorted by client, then
/// frontend.
fn flows<A: FlowFamily>(
    entries: &[CtEntry<A>],
    names: &BTreeMap<u32, ServiceName>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Vec<FlowView> {
    let mut flows: Vec<FlowView> = pair_flows(entries)
        .iter()
        .map(|flow| view(flow, names, now_ns, timeouts))
        .collect();
    flows.sort_by_key(|flow| (flow.client, flow.frontend, flow.protocol));
    flows
}

fn view<A: FlowFamily>(
    flow: &FlowEntries<'_, A>,
    names: &BTreeMap<u32, ServiceName>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> FlowView {
    let endpoint = Endpoint::from_wire;
    let first = flow
        .present()
        .next()
        .expect("a flow has at least one entry");
    let (key, value) = (&first.key.tuple, &first.value);
    // The client's entry is keyed client → frontend and rewrites to peer → backend; the
    // backend's is keyed backend → peer and rewrites to frontend → client.
    let (client, frontend, backend, peer) = if value.is_reply() {
        (
            endpoint(value.to.dst_addr, value.to.dst_port),
            endpoint(value.to.src_addr, value.to.src_port),
            endpoint(key.src_addr, key.src_port),
            endpoint(key.dst_addr, key.dst_port),
        )
    } else {
        (
            endpoint(key.src_addr, key.src_port),
            endpoint(key.dst_addr, key.dst_port),
            endpoint(value.to.dst_addr, value.to.dst_port),
            endpoint(value.to.src_addr, value.to.src_port),
        )
    };
    let created = flow.present().map(|e| e.value.created).min().unwrap_or(0);
    let state = flow.state();
    let expires_ns = flow.expires_ns();
    let timeout_ns = u64::from(timeouts.of(first.key.proto, state)) * 1_000_000_000;
    let last_packet_ns = expires_ns.saturating_sub(timeout_ns);
    let seconds = |ns: u64| Duration::from_nanos(ns).as_secs();
    let forward = flow.forward.map(|e| &e.value);
    let reply = flow.reply.map(|e| &e.value);
    let flags = flow.flags();
    let translation = [
        (ct_flags::HAIRPIN, "hairpin"),
        (ct_flags::SNAT, "snat"),
        (ct_flags::REMAPPED, "remapped"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect();
    let keys: Vec<EntryKey> = flow
        .present()
        .map(|e| A::entry_key(e.table, e.key))
        .collect();
    FlowView {
        family: family_name(client.address),
        protocol: protocol_name(first.key.proto),
        client,
        frontend,
        backend,
        backend_sees: peer,
        service: names.get(&value.rev_nat_id).map(service_port_name),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        kind: if flags & ct_flags::DIRECT != 0 {
            "direct"
        } else {
            "service"
        },
        state: if flow.is_closing() { "closing" } else { "open" },
        flow_state: flow.flow_state().name(),
        assured: flow.is_assured(),
        translation,
        age_seconds: u64::from(ct_seconds(now_ns).saturating_sub(created)),
        idle_seconds: seconds(now_ns.saturating_sub(last_packet_ns)),
        expires_in_seconds: seconds(expires_ns.saturating_sub(now_ns)),
        packets_to_backend: forward.map_or(0, |v| v.packets),
        bytes_to_backend: forward.map_or(0, |v| v.bytes),
        packets_from_backend: reply.map_or(0, |v| v.packets),
        bytes_from_backend: reply.map_or(0, |v| v.bytes),
        entries: flow
            .present()
            .map(|e| {
                if e.value.is_reply() {
                    "reply"
                } else {
                    "forward"
                }
            })
            .collect(),
        keys,
    }
}

/// `address` or `address:port` (`[address]:port` for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EndpointPattern {
    pub address: IpAddr,
    pub port: Option<u16>,
}

impl EndpointPattern {
    pub(super) fn matches(&self, endpoint: &Endpoint) -> bool {
        self.address == endpoint.address && self.port.is_none_or(|port| port == endpoint.port)
    }
}

impl FromStr for EndpointPattern {
    type Err = String;

    /// `addr`, `addr:port`, or an IPv6 address as `[addr]:port`, `[addr]` or bare.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, port) = match text.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some((address, "")) => (address, None),
                Some((address, rest)) => match rest.strip_prefix(':') {
                    Some(port) => (address, Some(port)),
                    None => return Err(format!("{text:?}: expected [address]:port")),
                },
                None => return Err(format!("{text:?}: no ']' after the IPv6 address")),
            },
            None if text.matches(':').count() > 1 => (text, None),
            None => match text.split_once(':') {
                Some((address, port)) => (address, Some(port)),
                None => (text, None),
            },
        };
        let address = match address.parse::<IpAddr>() {
            // `[198.18.0.1]:80` is no address: brackets hold IPv6 only.
            Ok(IpAddr::V4(_)) if text.starts_with('[') => {
                return Err(format!("{text:?}: brackets hold an IPv6 address"));
            }
            Ok(address) => address,
            Err(_) => return Err(format!("{text:?}: expected an address[:port]")),
        };
        Ok(Self {
            address,
            port: port
                .map(|port| port.parse())
                .transpose()
                .map_err(|_| format!("{text:?}: bad port"))?,
        })
    }
}

/// `namespace/name[:port-name]` or a frontend `address[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ServicePattern {
    Name(String),
    Frontend(EndpointPattern),
}

impl FromStr for ServicePattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(frontend) = text.parse() {
            return Ok(Self::Frontend(frontend));
        }
        if !text.contains('/') {
            return Err(format!(
                "{text:?}: expected namespace/name[:port-name] or a frontend address[:port]"
            ));
        }
        Ok(Self::Name(text.to_owned()))
    }
}

impl ServicePattern {
    fn matches(&self, flow: &FlowView) -> bool {
        self.matches_parts(flow.service.as_deref(), &flow.frontend)
    }

    /// Whether a Service port name (`namespace/name:port-name`) or its frontend matches.
    pub(super) fn matches_parts(&self, service: Option<&str>, frontend: &Endpoint) -> bool {
        match self {
            // `ns/web` matches every port of the Service, `ns/web:http` only that one.
            Self::Name(name) => service.is_some_and(|service| {
                service == name
                    || service
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(':'))
            }),
            Self::Frontend(frontend_pattern) => frontend_pattern.matches(frontend),
        }
    }
}

pub fn render(flows: &[FlowView]) -> String {
    let mut table = new_table([
        "PROTO",
        "CLIENT",
        "FRONTEND",
        "BACKEND",
        "SERVICE",
        "STATE",
        "AGE",
        "IDLE",
        "EXPIRES",
        "PACKETS →/←",
        "BYTES →/←",
    ]);
    for flow in flows {
        table.add_row([
            flow.protocol.to_owned(),
            flow.client.to_string(),
            flow.frontend.to_string(),
            flow.backend.to_string(),
            match flow.kind {
                "direct" => "(direct)".to_owned(),
                _ => flow.service.clone().unwrap_or_else(|| "-".into()),
            },
            flow.flow_state.to_owned(),
            duration(flow.age_seconds),
            duration(flow.idle_seconds),
            duration(flow.expires_in_seconds),
            format!("{}/{}", flow.packets_to_backend, flow.packets_from_backend),
            format!("{}/{}", flow.bytes_to_backend, flow.bytes_from_backend),
        ]);
    }
    table.to_string()
}

/// `42s`, `3m07s`, `5h02m`, `2d03h`.
pub(super) fn duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{:02}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests;
