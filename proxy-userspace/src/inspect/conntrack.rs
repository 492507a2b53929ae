//! `ebpf-proxy conntrack`: live flows (client → frontend → backend) of both conntrack
//! maps with their state, and `conntrack flush`, which deletes the flows matching the same
//! filters.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use clap::{Args, Subcommand};
use proxy_common::{CtKey, CtTimeouts, CtValue, ServiceName, ct_flags, ct_seconds, map_names};
use serde::Serialize;

use super::{
    Endpoint, ListArgs, Output, PinArgs, new_table, open_pinned, open_typed, print, protocol_name,
    read_entries, service_port_name,
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
            for (table, key) in &flow.keys {
                // Already gone (expired or evicted meanwhile) counts as flushed.
                if maps.remove(*table, key)? {
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

/// The pinned conntrack maps and timeouts.
struct ConntrackMaps {
    assured: Map,
    pending: Map,
    timeouts: CtTimeouts,
}

impl ConntrackMaps {
    fn open(root: &Path) -> Result<Self> {
        let timeouts: Array<MapData, CtTimeouts> = open_typed(root, map_names::CT_TIMEOUTS)?;
        Ok(Self {
            assured: Map::from_map_data(open_pinned(root, map_names::CONNTRACK)?)?,
            pending: Map::from_map_data(open_pinned(root, map_names::CONNTRACK_PENDING)?)?,
            timeouts: timeouts.get(&0, 0)?,
        })
    }

    fn map(&mut self, table: CtTable) -> &mut Map {
        match table {
            CtTable::Assured => &mut self.assured,
            CtTable::Pending => &mut self.pending,
        }
    }

    fn entries(&mut self) -> Result<Vec<CtEntry>> {
        fn data(map: &Map) -> Result<&MapData> {
            match map {
                Map::LruHashMap(data) => Ok(data),
                _ => Err(anyhow::anyhow!("a conntrack map is not an LRU hash map")),
            }
        }
        let (assured, pending) = (data(&self.assured)?, data(&self.pending)?);
        Ok(read_all(&[
            (CtTable::Assured, assured),
            (CtTable::Pending, pending),
        ])?)
    }

    /// Removes one entry; false if it was gone already.
    fn remove(&mut self, table: CtTable, key: &CtKey) -> Result<bool> {
        let mut map: BpfHashMap<&mut MapData, CtKey, CtValue> = self.map(table).try_into()?;
        Ok(map.remove(key).is_ok())
    }
}

/// The flows in both conntrack maps, and the maps (for flushes).
fn read_flows(root: &Path) -> Result<(Vec<FlowView>, ConntrackMaps)> {
    let mut maps = ConntrackMaps::open(root)?;
    let names: BpfHashMap<MapData, u32, ServiceName> = open_typed(root, map_names::SVC_NAMES)?;
    let entries = maps.entries()?;
    let flows = flows(
        &entries,
        &read_entries(&names)?,
        monotonic_now_ns(),
        &maps.timeouts,
    );
    Ok((flows, maps))
}

/// One connection as the datapath tracks it. JSON schema: every field, always present
/// (`service` may be null).
#[derive(Debug, Serialize)]
pub struct FlowView {
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
    keys: Vec<(CtTable, CtKey)>,
}

/// One view per flow (see [`pair_flows`]), sorted by client, then frontend.
pub fn flows(
    entries: &[CtEntry],
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

fn view(
    flow: &FlowEntries,
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
    let keys: Vec<(CtTable, CtKey)> = flow.present().map(|e| (e.table, e.key)).collect();
    FlowView {
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
        entries: keys
            .iter()
            .map(|(_, key)| {
                if flow.forward.is_some_and(|e| e.key == *key) {
                    "forward"
                } else {
                    "reply"
                }
            })
            .collect(),
        keys,
    }
}

/// `address` or `address:port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EndpointPattern {
    pub address: Ipv4Addr,
    pub port: Option<u16>,
}

impl EndpointPattern {
    /// Against an endpoint of either family (`sockets` lists IPv6 ones too).
    pub(super) fn matches<I: Copy + Into<IpAddr>>(&self, endpoint: &Endpoint<I>) -> bool {
        IpAddr::V4(self.address) == endpoint.address.into()
            && self.port.is_none_or(|port| port == endpoint.port)
    }
}

impl FromStr for EndpointPattern {
    type Err = String;

    /// `addr`, `addr:port`, or an IPv6 address as `[addr]:port` or bare, which is named
    /// as such: the maps these views read hold IPv4 only (see the README's "IPv6 and
    /// dual-stack").
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
            Ok(IpAddr::V4(address)) => address,
            Ok(IpAddr::V6(_)) => {
                return Err(format!(
                    "{text:?}: an IPv6 address; the datapath's maps are IPv4 only so far \
                     (the planner plans IPv6 frontends, nothing programs them yet)"
                ));
            }
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
    pub(super) fn matches_parts<I: Copy + Into<IpAddr>>(
        &self,
        service: Option<&str>,
        frontend: &Endpoint<I>,
    ) -> bool {
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
mod tests {
    use proxy_common::{Translation, ct_state, proto, service_flags};

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::from(address),
            port,
        }
    }

    /// An established flow's two entries as the datapath writes them: created at 100 s,
    /// the client's last packet at 130 s, the backend's at 140 s.
    fn flow(
        client: Endpoint,
        frontend: Endpoint,
        backend: Endpoint,
        rev_nat_id: u32,
    ) -> [CtEntry; 2] {
        let wire = |e: Endpoint| (u32::from_ne_bytes(e.address.octets()), e.port.to_be());
        let translation = Translation::service(
            proto::TCP,
            wire(client),
            wire(frontend),
            service_flags::CLUSTER_IP,
            rev_nat_id,
            wire(backend),
            7,
            None,
        );
        let timeouts = CtTimeouts::DEFAULT;
        let state = ct_state::REPLIED | ct_state::ASSURED;
        let created = ct_seconds(100 * SECOND);
        let mut forward =
            translation.forward_entry(created, timeouts.expiry_ns(proto::TCP, state, 130 * SECOND));
        (forward.state, forward.packets, forward.bytes) = (state, 3, 180);
        let mut reply =
            translation.reply_entry(created, timeouts.expiry_ns(proto::TCP, state, 140 * SECOND));
        (reply.state, reply.packets, reply.bytes) = (state, 2, 120);
        [
            CtEntry {
                table: CtTable::Assured,
                key: translation.forward_key(),
                value: forward,
            },
            CtEntry {
                table: CtTable::Assured,
                key: translation.reply_key(),
                value: reply,
            },
        ]
    }

    #[test]
    fn entries_pair_into_flows_that_filters_select() {
        let vip = endpoint([198, 19, 0, 10], 80);
        let node_port = endpoint([198, 18, 0, 1], 30080);
        let pod_1 = endpoint([198, 18, 1, 11], 8080);
        let pod_2 = endpoint([198, 18, 1, 12], 8080);
        let caller = endpoint([198, 18, 1, 14], 40000);
        let outside = endpoint([198, 18, 0, 2], 50000);
        let [web_forward, web_reply] = flow(caller, vip, pod_1, 1);
        let [np_forward, np_reply] = flow(outside, node_port, pod_2, 2);
        // The LRU evicted this flow's forward entry.
        let entries = [web_forward, web_reply, np_reply];
        let names = BTreeMap::from([
            (1, ServiceName::new("default", "web", "http").unwrap()),
            (2, ServiceName::new("default", "web-np", "").unwrap()),
        ]);
        let _ = np_forward;

        let flows = flows(&entries, &names, 150 * SECOND, &CtTimeouts::DEFAULT);
        assert_eq!(flows.len(), 2);
        let web = &flows[1];
        assert_eq!(
            (web.client, web.frontend, web.backend),
            (caller, vip, pod_1)
        );
        assert_eq!(web.service.as_deref(), Some("default/web:http"));
        assert_eq!((web.age_seconds, web.idle_seconds), (50, 10));
        // An open TCP flow expires after 24 h of idleness.
        assert_eq!(web.expires_in_seconds, 86_400 - 10);
        assert_eq!((web.packets_to_backend, web.packets_from_backend), (3, 2));
        assert_eq!(web.entries, ["forward", "reply"]);
        assert_eq!(
            (web.flow_state, web.assured, web.kind),
            ("established", true, "service")
        );
        assert_eq!(web.backend_sees, caller);
        assert!(web.translation.is_empty());
        let orphan = &flows[0];
        assert_eq!(
            (orphan.client, orphan.frontend, orphan.backend),
            (outside, node_port, pod_2)
        );
        assert_eq!(orphan.entries, ["reply"]);

        let select = |filter: FlowFilter| -> Vec<Endpoint> {
            flows
                .iter()
                .filter(|f| filter.matches(f))
                .map(|f| f.client)
                .collect()
        };
        let service = |text: &str| FlowFilter {
            service: Some(text.parse().unwrap()),
            ..FlowFilter::default()
        };
        assert_eq!(select(service("default/web")), [caller]);
        assert_eq!(select(service("default/web:http")), [caller]);
        assert_eq!(select(service("default/web:dns")), []);
        assert_eq!(select(service("default/web-np")), [outside]);
        assert_eq!(select(service("198.18.0.1")), [outside]);
        assert_eq!(select(service("198.19.0.10:80")), [caller]);
        let backend = FlowFilter {
            backend: Some("198.18.1.11".parse().unwrap()),
            ..FlowFilter::default()
        };
        assert_eq!(select(backend), [caller]);
        let client = FlowFilter {
            client: Some("198.18.0.2:50000".parse().unwrap()),
            backend: Some("198.18.1.12:8080".parse().unwrap()),
            ..FlowFilter::default()
        };
        assert_eq!(select(client), [outside]);

        let json = serde_json::to_value(&flows[1]).unwrap();
        assert_eq!(json["client"]["address"], "198.18.1.14");
        assert_eq!(json["frontend"]["port"], 80);
        assert_eq!(json["state"], "open");
        assert!(json.get("keys").is_none());
        let table = render(&flows);
        assert!(table.contains("198.18.1.14:40000"), "{table}");
        assert!(table.contains("3/2"), "{table}");
    }

    #[test]
    fn patterns_parse_or_explain_why_not() {
        assert_eq!("198.18.0.2".parse::<EndpointPattern>().unwrap().port, None);
        assert!("198.18.0.2:x".parse::<EndpointPattern>().is_err());
        for ipv6 in ["[2001:db8::10]:80", "2001:db8::10", "[2001:db8::10]"] {
            let error = ipv6.parse::<EndpointPattern>().unwrap_err();
            assert!(error.contains("an IPv6 address"), "{ipv6}: {error}");
        }
        assert!(
            "[2001:db8::10:80"
                .parse::<EndpointPattern>()
                .unwrap_err()
                .contains("no ']'")
        );
        assert!("web".parse::<ServicePattern>().is_err());
        assert_eq!(
            "kube-system/kube-dns:dns".parse::<ServicePattern>(),
            Ok(ServicePattern::Name("kube-system/kube-dns:dns".into()))
        );
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(187), "3m07s");
        assert_eq!(duration(5 * 3600 + 120), "5h02m");
        assert_eq!(duration(2 * 86400 + 3 * 3600), "2d03h");
    }
}
