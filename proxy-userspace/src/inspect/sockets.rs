//! `ebpf-proxy sockets`: the translations made at the socket (`--socket-lb`), from
//! SOCK_XLATE and SOCK_XLATE6: one row per socket and backend — its cookie (`ss -e` shows
//! it as `sk:`), the process and network namespace that made it, the Service and the
//! backend. These connections have no conntrack entry: no packet of theirs is translated.
//! IPv4's rows come first, then IPv6's; an IPv6 socket's connection to an IPv4-mapped
//! address is IPv4's (it was served by IPv4's frontends).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use clap::Args;
use proxy_common::{
    Address, Ipv6, ServiceName, SockKey, SockValue, map_names, sock_flags, sock_kind,
};
use serde::Serialize;

use super::conntrack::{EndpointPattern, ServicePattern, duration};
use super::{
    Endpoint, ListArgs, new_table, open_typed, protocol_name, read_entries, service_port_name,
};
use crate::conntrack::monotonic_now_ns;

#[derive(Args)]
pub struct SocketsArgs {
    #[command(flatten)]
    filter: SocketFilter,
    #[command(flatten)]
    list: ListArgs,
}

/// The sockets `sockets` lists: all given filters must match. An address matches
/// translations of its own family only, as `conntrack`'s filters do: a dual-stack socket's
/// IPv4-mapped connection is IPv4's (`198.19.0.10`, not `::ffff:198.19.0.10`).
#[derive(Args, Clone, Debug, Default)]
struct SocketFilter {
    /// Only sockets of this Service: `namespace/name`, `namespace/name:port-name`, or a
    /// frontend `address[:port]` (`[address]:port` for IPv6).
    #[arg(long, value_name = "SERVICE")]
    service: Option<ServicePattern>,
    /// Only sockets sent to this backend: `address[:port]` (`[address]:port` for IPv6).
    #[arg(long, value_name = "ADDRESS[:PORT]")]
    backend: Option<EndpointPattern>,
}

impl SocketFilter {
    fn matches(&self, socket: &SocketView) -> bool {
        self.service.as_ref().is_none_or(|pattern| {
            pattern.matches_parts(socket.service.as_deref(), &socket.frontend)
        }) && self
            .backend
            .is_none_or(|pattern| pattern.matches(&socket.backend))
    }
}

impl SocketsArgs {
    pub fn run(self) -> Result<()> {
        self.list.show(
            |root| {
                let mut sockets = read(root)?;
                sockets.retain(|socket| self.filter.matches(socket));
                Ok(sockets)
            },
            |sockets| render(sockets),
        )
    }
}

/// One socket's translation to one backend. JSON schema: every field, always present
/// (`service`, `command` may be null).
#[derive(Debug, Serialize, PartialEq)]
pub struct SocketView {
    /// `IPv4` or `IPv6`: the family of the frontend (each family's translations sit in a
    /// map of their own, and their ids count apart).
    pub family: &'static str,
    /// The socket cookie (`ss -e` prints it in hex as `sk:`).
    pub cookie: u64,
    pub protocol: &'static str,
    /// `connect` (TCP, or a connected UDP socket) or `sendmsg` (an unconnected UDP
    /// socket's flow).
    pub call: &'static str,
    /// Whether the socket is the node's own (the daemon's network namespace), or a pod's.
    pub host: bool,
    pub netns_cookie: u64,
    /// The process that made the translation, and its command while it runs.
    pub pid: u32,
    pub command: Option<String>,
    pub frontend: Endpoint,
    pub backend: Endpoint,
    pub service: Option<String>,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    /// Since the socket last sent through this translation (an unconnected UDP flow ends
    /// after the conntrack UDP timeout idle); for a connected socket, since its connect().
    pub idle_seconds: u64,
}

fn read(root: &Path) -> Result<Vec<SocketView>> {
    let mut sockets = read_family::<u32>(root, map_names::SOCK_XLATE)?;
    sockets.extend(read_family::<Ipv6>(root, map_names::SOCK_XLATE6)?);
    Ok(sockets)
}

/// The rows of one family's translations (`xlate`), named from its SVC_NAMES.
fn read_family<A: Address>(root: &Path, xlate: &str) -> Result<Vec<SocketView>> {
    let map: BpfHashMap<MapData, SockKey<A>, SockValue<A>> = open_typed(root, xlate)?;
    let names: BpfHashMap<MapData, u32, ServiceName> = open_typed(root, A::MAPS.svc_names)?;
    Ok(view(
        &read_entries(&map)?,
        &read_entries(&names)?,
        monotonic_now_ns(),
        |pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|command| command.trim_end().to_owned())
        },
    ))
}

/// The rows of `entries` (their reverse entries: one per socket and backend), ordered by
/// cookie. `command` names a running process.
pub fn view<A: Address>(
    entries: &BTreeMap<SockKey<A>, SockValue<A>>,
    names: &BTreeMap<u32, ServiceName>,
    now_ns: u64,
    command: impl Fn(u32) -> Option<String>,
) -> Vec<SocketView> {
    entries
        .iter()
        .filter(|(key, _)| key.kind == sock_kind::REVERSE)
        .map(|(key, value)| SocketView {
            family: A::NAME,
            cookie: key.cookie,
            protocol: protocol_name(key.proto),
            call: if value.flags & sock_flags::CONNECTED != 0 {
                "connect"
            } else {
                "sendmsg"
            },
            host: value.flags & sock_flags::HOST != 0,
            netns_cookie: value.netns_cookie,
            pid: value.pid,
            command: command(value.pid),
            frontend: Endpoint::from_wire(value.addr, value.port),
            backend: Endpoint::from_wire(key.addr, key.port),
            service: names.get(&value.rev_nat_id).map(service_port_name),
            rev_nat_id: value.rev_nat_id,
            backend_id: value.backend_id,
            idle_seconds: now_ns.saturating_sub(value.last_used_ns) / 1_000_000_000,
        })
        .collect()
}

pub fn render(sockets: &[SocketView]) -> String {
    let mut table = new_table([
        "COOKIE", "PROTO", "CALL", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "IDLE",
    ]);
    for socket in sockets {
        let namespace = if socket.host {
            "node".to_owned()
        } else {
            format!("netns {}", socket.netns_cookie)
        };
        let process = match &socket.command {
            Some(command) => format!("{} ({command})", socket.pid),
            None => socket.pid.to_string(),
        };
        table.add_row([
            format!("{:#x}", socket.cookie),
            socket.protocol.to_owned(),
            socket.call.to_owned(),
            format!("{namespace}, pid {process}"),
            socket.frontend.to_string(),
            socket.backend.to_string(),
            socket.service.clone().unwrap_or_else(|| "-".into()),
            duration(socket.idle_seconds),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use proxy_common::proto;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn wire(addr: [u8; 4], port: u16) -> (u32, u16) {
        (u32::from_ne_bytes(addr), port.to_be())
    }

    fn key<A: Address>(kind: u8, (addr, port): (A, u16)) -> SockKey<A> {
        SockKey {
            cookie: 0x2a,
            addr,
            port,
            proto: proto::UDP,
            kind,
            _pad: Default::default(),
        }
    }

    #[test]
    fn each_socket_shows_its_client_service_and_backend() {
        let (vip, vip_port) = wire([198, 19, 0, 10], 53);
        let (pod, pod_port) = wire([198, 18, 1, 11], 5353);
        let flow = SockValue {
            addr: pod,
            port: pod_port,
            flags: sock_flags::HOST,
            rev_nat_id: 4,
            backend_id: 2,
            pid: 77,
            netns_cookie: 1,
            last_used_ns: 90 * SECOND,
            ..SockValue::default()
        };
        let reverse = SockValue {
            addr: vip,
            port: vip_port,
            ..flow
        };
        let entries = BTreeMap::from([
            (key(sock_kind::REVERSE, (pod, pod_port)), reverse),
            // The unconnected flow's forward entry is the same translation: no row.
            (key(sock_kind::FORWARD, (vip, vip_port)), flow),
        ]);
        let names = BTreeMap::from([(4, ServiceName::new("default", "dns", "udp").unwrap())]);
        let rows = view(&entries, &names, 100 * SECOND, |pid| {
            (pid == 77).then(|| "resolver".to_owned())
        });
        assert_eq!(
            rows,
            [SocketView {
                family: "IPv4",
                cookie: 0x2a,
                protocol: "udp",
                call: "sendmsg",
                host: true,
                netns_cookie: 1,
                pid: 77,
                command: Some("resolver".into()),
                frontend: Endpoint::from_wire(vip, vip_port),
                backend: Endpoint::from_wire(pod, pod_port),
                service: Some("default/dns:udp".into()),
                rev_nat_id: 4,
                backend_id: 2,
                idle_seconds: 10,
            }]
        );
        let table = render(&rows);
        assert!(table.contains("0x2a"), "{table}");
        assert!(table.contains("node, pid 77 (resolver)"), "{table}");
        assert!(table.contains("198.19.0.10:53"), "{table}");
        assert!(table.contains("198.18.1.11:5353"), "{table}");
    }

    /// A row of family `A`'s translation from `frontend` to `backend`, of `service`.
    fn row<A: Address>(frontend: &str, backend: &str, service: &str) -> SocketView {
        let endpoint = |text: &str| {
            let pattern: EndpointPattern = text.parse().unwrap();
            let address = A::from_ip(pattern.address).unwrap();
            (address, pattern.port.unwrap().to_be())
        };
        let (vip, vip_port) = endpoint(frontend);
        let reverse = SockValue {
            addr: vip,
            port: vip_port,
            rev_nat_id: 1,
            ..SockValue::default()
        };
        let entries = BTreeMap::from([(key(sock_kind::REVERSE, endpoint(backend)), reverse)]);
        let (namespace, rest) = service.split_once('/').unwrap();
        let (name, port) = rest.split_once(':').unwrap();
        let names = BTreeMap::from([(1, ServiceName::new(namespace, name, port).unwrap())]);
        view(&entries, &names, 0, |_| None).remove(0)
    }

    #[test]
    fn filters_take_addresses_of_either_family_and_match_their_own_only() {
        let rows = [
            row::<u32>("198.19.0.10:80", "198.18.1.11:8080", "default/echo:tcp-80"),
            row::<Ipv6>(
                "[2001:db8:ff::10]:80",
                "[2001:db8:1::11]:8080",
                "default/echo:tcp-80",
            ),
            row::<Ipv6>(
                "[2001:db8:ff::20]:53",
                "[2001:db8:1::12]:5353",
                "default/dns:udp",
            ),
        ];
        let kept = |service: Option<&str>, backend: Option<&str>| -> Vec<String> {
            let filter = SocketFilter {
                service: service.map(|text| text.parse().unwrap()),
                backend: backend.map(|text| text.parse().unwrap()),
            };
            (rows.iter())
                .filter(|socket| filter.matches(socket))
                .map(|socket| socket.backend.to_string())
                .collect()
        };
        for (service, backend, expected) in [
            (
                Some("[2001:db8:ff::10]:80"),
                None,
                vec!["[2001:db8:1::11]:8080"],
            ),
            (Some("2001:db8:ff::20"), None, vec!["[2001:db8:1::12]:5353"]),
            (Some("[2001:db8:ff::10]:53"), None, vec![]),
            (None, Some("2001:db8:1::12"), vec!["[2001:db8:1::12]:5353"]),
            (
                None,
                Some("[2001:db8:1::11]:8080"),
                vec!["[2001:db8:1::11]:8080"],
            ),
            (Some("198.19.0.10"), None, vec!["198.18.1.11:8080"]),
            // An IPv4-mapped address is IPv6's: it matches no IPv4 translation.
            (Some("::ffff:198.19.0.10"), None, vec![]),
            (None, Some("[::ffff:198.18.1.11]:8080"), vec![]),
            // A Service name matches its translations of both families.
            (
                Some("default/echo"),
                None,
                vec!["198.18.1.11:8080", "[2001:db8:1::11]:8080"],
            ),
            (
                Some("default/echo"),
                Some("2001:db8:1::11"),
                vec!["[2001:db8:1::11]:8080"],
            ),
        ] {
            assert_eq!(
                kept(service, backend),
                expected,
                "--service {service:?} --backend {backend:?}"
            );
        }
    }

    #[test]
    fn ipv6_sockets_show_their_ipv6_frontend_and_backend() {
        let address = |text: &str| Ipv6::from_ip(text.parse().unwrap()).unwrap();
        let (vip, pod) = (address("2001:db8:ff::10"), address("2001:db8:1::b"));
        let reverse = SockValue {
            addr: vip,
            port: 80u16.to_be(),
            flags: sock_flags::HOST | sock_flags::CONNECTED,
            rev_nat_id: 1,
            backend_id: 3,
            ..SockValue::default()
        };
        let entries = BTreeMap::from([(key(sock_kind::REVERSE, (pod, 8080u16.to_be())), reverse)]);
        let names = BTreeMap::from([(1, ServiceName::new("default", "dual", "http").unwrap())]);
        let rows = view(&entries, &names, 0, |_| None);
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.family, row.call, row.service.as_deref()),
            ("IPv6", "connect", Some("default/dual:http"))
        );
        let json = serde_json::to_value(row).unwrap();
        assert_eq!(json["family"], "IPv6");
        assert_eq!(json["frontend"]["address"], "2001:db8:ff::10");
        assert_eq!(json["backend"]["port"], 8080);
        let table = render(&rows);
        assert!(table.contains("[2001:db8:ff::10]:80"), "{table}");
        assert!(table.contains("[2001:db8:1::b]:8080"), "{table}");
    }
}
