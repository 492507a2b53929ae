//! `ebpf-proxy conntrack`: live flows (client → frontend → backend), and
//! `conntrack flush`, which deletes the flows matching the same filters.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Result, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use clap::{Args, Subcommand};
use proxy_common::{CtKey, CtValue, ServiceName, ct_dir, ct_flags, map_names};
use serde::Serialize;

use super::{
    Endpoint, ListArgs, Output, PinArgs, new_table, open_typed, print, protocol_name, read_entries,
    service_port_name,
};
use crate::conntrack::{
    CtTimeouts, FlowEntries, flow_last_seen_ns, flow_timeout, monotonic_now_ns, pair_flows,
    read_all,
};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConntrackArgs {
    #[command(subcommand)]
    flush: Option<ConntrackCommand>,
    #[command(flatten)]
    filter: FlowFilter,
    #[command(flatten)]
    list: ListArgs,
    #[command(flatten)]
    timeouts: TimeoutArgs,
}

/// The daemon's timeouts are flags, not kernel state: pass the same value here when the
/// daemon runs with a non-default one, so expiries are right.
#[derive(Args, Clone, Copy, Debug)]
struct TimeoutArgs {
    /// The daemon's --conntrack-tcp-established-seconds.
    #[arg(long, default_value_t = CtTimeouts::default().tcp_established.as_secs())]
    conntrack_tcp_established_seconds: u64,
}

impl TimeoutArgs {
    fn timeouts(self) -> CtTimeouts {
        CtTimeouts {
            tcp_established: Duration::from_secs(self.conntrack_tcp_established_seconds),
            ..CtTimeouts::default()
        }
    }
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
        let timeouts = self.timeouts.timeouts();
        self.list.show(
            |root| Ok(self.filter.select(read_flows(root, &timeouts)?.0)),
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
        let (flows, mut map) = read_flows(root, &CtTimeouts::default())?;
        let mut report = FlushReport::default();
        for flow in filter.select(flows) {
            report.flows += 1;
            for key in &flow.keys {
                // Already gone (expired or evicted meanwhile) counts as flushed.
                if map.remove(key).is_ok() {
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

/// The flows in CONNTRACK, and the map (for flushes).
fn read_flows(
    root: &Path,
    timeouts: &CtTimeouts,
) -> Result<(Vec<FlowView>, BpfHashMap<MapData, CtKey, CtValue>)> {
    let conntrack: BpfHashMap<MapData, CtKey, CtValue> = open_typed(root, map_names::CONNTRACK)?;
    let names: BpfHashMap<MapData, u32, ServiceName> = open_typed(root, map_names::SVC_NAMES)?;
    let entries = read_all(&conntrack)?;
    let flows = flows(
        &entries,
        &read_entries(&names)?,
        monotonic_now_ns(),
        timeouts,
    );
    Ok((flows, conntrack))
}

/// One connection as the datapath tracks it. JSON schema: every field, always present
/// (`service` may be null).
#[derive(Debug, Serialize)]
pub struct FlowView {
    pub protocol: &'static str,
    pub client: Endpoint,
    /// The address the client connected to (a VIP or a node address).
    pub frontend: Endpoint,
    pub backend: Endpoint,
    /// `namespace/name:port-name` of the frontend, null if unknown.
    pub service: Option<String>,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// `open`, or `closing` once a FIN or RST was seen.
    pub state: &'static str,
    /// Since the flow's first packet.
    pub age_seconds: u64,
    /// Since its latest packet in either direction.
    pub idle_seconds: u64,
    /// Until the daemon's garbage collector removes it if it stays idle (its idle
    /// timeout for the protocol and state, minus the idle time).
    pub expires_in_seconds: u64,
    pub packets_to_backend: u64,
    pub bytes_to_backend: u64,
    pub packets_from_backend: u64,
    pub bytes_from_backend: u64,
    /// Which of the flow's entries exist: `forward` (keyed client → frontend) and
    /// `reply` (keyed backend → client). The LRU may evict one before the other.
    pub entries: Vec<&'static str>,
    #[serde(skip)]
    keys: Vec<CtKey>,
}

/// One view per flow (see [`pair_flows`]), sorted by client, then frontend.
pub fn flows(
    entries: &HashMap<CtKey, CtValue>,
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
    let (key, value) = flow
        .present()
        .next()
        .expect("a flow has at least one entry");
    let forward = flow.forward.map(|(_, value)| value);
    let reply = flow.reply.map(|(_, value)| value);
    // Keyed client → frontend (forward) or backend → client (reply).
    let (client, frontend, backend) = if key.dir == ct_dir::FORWARD {
        (
            endpoint(key.src_addr, key.src_port),
            endpoint(key.dst_addr, key.dst_port),
            endpoint(value.nat_addr, value.nat_port),
        )
    } else {
        (
            endpoint(key.dst_addr, key.dst_port),
            endpoint(value.nat_addr, value.nat_port),
            endpoint(key.src_addr, key.src_port),
        )
    };
    let created_ns = flow.present().map(|(_, v)| v.created_ns).min().unwrap_or(0);
    let closing = flow
        .present()
        .any(|(_, v)| v.flags & ct_flags::CLOSING != 0);
    let seconds = |ns: u64| Duration::from_nanos(now_ns.saturating_sub(ns)).as_secs();
    let idle = seconds(flow_last_seen_ns(flow));
    let keys: Vec<CtKey> = flow.present().map(|(key, _)| key).collect();
    FlowView {
        protocol: protocol_name(key.proto),
        client,
        frontend,
        backend,
        service: names.get(&value.rev_nat_id).map(service_port_name),
        rev_nat_id: value.rev_nat_id,
        backend_id: value.backend_id,
        state: if closing { "closing" } else { "open" },
        age_seconds: seconds(created_ns),
        idle_seconds: idle,
        expires_in_seconds: flow_timeout(flow, timeouts).as_secs().saturating_sub(idle),
        packets_to_backend: forward.map_or(0, |v| v.packets),
        bytes_to_backend: forward.map_or(0, |v| v.bytes),
        packets_from_backend: reply.map_or(0, |v| v.packets),
        bytes_from_backend: reply.map_or(0, |v| v.bytes),
        entries: keys
            .iter()
            .map(|key| match key.dir {
                ct_dir::FORWARD => "forward",
                _ => "reply",
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
    fn matches(&self, endpoint: &Endpoint) -> bool {
        self.address == endpoint.address && self.port.is_none_or(|port| port == endpoint.port)
    }
}

impl FromStr for EndpointPattern {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, port) = match text.split_once(':') {
            Some((address, port)) => (address, Some(port)),
            None => (text, None),
        };
        Ok(Self {
            address: address
                .parse()
                .map_err(|_| format!("{text:?}: expected an IPv4 address[:port]"))?,
            port: port
                .map(|port| port.parse())
                .transpose()
                .map_err(|_| format!("{text:?}: bad port"))?,
        })
    }
}

/// `namespace/name[:port-name]` or a frontend `address[:port]`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ServicePattern {
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
        match self {
            // `ns/web` matches every port of the Service, `ns/web:http` only that one.
            Self::Name(name) => flow.service.as_deref().is_some_and(|service| {
                service == name
                    || service
                        .strip_prefix(name.as_str())
                        .is_some_and(|rest| rest.starts_with(':'))
            }),
            Self::Frontend(frontend) => frontend.matches(&flow.frontend),
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
            flow.service.clone().unwrap_or_else(|| "-".into()),
            flow.state.to_owned(),
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
fn duration(seconds: u64) -> String {
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{:02}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use proxy_common::proto;

    use crate::conntrack::reply_key;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::from(address),
            port,
        }
    }

    /// A flow's two entries as the datapath writes them.
    fn flow(
        client: Endpoint,
        frontend: Endpoint,
        backend: Endpoint,
        rev_nat_id: u32,
    ) -> [(CtKey, CtValue); 2] {
        let wire = |e: Endpoint| (u32::from_ne_bytes(e.address.octets()), e.port.to_be());
        let (client_addr, client_port) = wire(client);
        let (frontend_addr, frontend_port) = wire(frontend);
        let (backend_addr, backend_port) = wire(backend);
        let forward_key = CtKey {
            src_addr: client_addr,
            dst_addr: frontend_addr,
            src_port: client_port,
            dst_port: frontend_port,
            proto: proto::TCP,
            dir: ct_dir::FORWARD,
            _pad: 0,
        };
        let forward = CtValue {
            nat_addr: backend_addr,
            nat_port: backend_port,
            rev_nat_id,
            backend_id: 7,
            created_ns: 100 * SECOND,
            last_seen_ns: 130 * SECOND,
            packets: 3,
            bytes: 180,
            ..CtValue::default()
        };
        let reply = CtValue {
            nat_addr: frontend_addr,
            nat_port: frontend_port,
            last_seen_ns: 140 * SECOND,
            packets: 2,
            bytes: 120,
            ..forward
        };
        [
            (forward_key, forward),
            (reply_key(&forward_key, &forward), reply),
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
        let entries = HashMap::from([web_forward, web_reply, np_reply]);
        let names = BTreeMap::from([
            (1, ServiceName::new("default", "web", "http").unwrap()),
            (2, ServiceName::new("default", "web-np", "").unwrap()),
        ]);
        let _ = np_forward;

        let flows = flows(&entries, &names, 150 * SECOND, &CtTimeouts::default());
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
