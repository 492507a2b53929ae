//! `ebpf-proxy services`: one row per frontend, as the datapath holds it.

use std::net::{IpAddr, SocketAddr};

use proxy_common::{Address, BackendSet, Origin, maglev};
use serde::Serialize;

use super::{kind_name, new_table, protocol_name, service_of, socket_addr};
use crate::writer::{MapImage, maglev_keys};

/// One frontend. JSON schema: every field, always present (`service` may be null).
#[derive(Debug, Serialize)]
pub struct FrontendView {
    /// `IPv4` or `IPv6`: each family's frontends sit in maps of their own, and their ids
    /// (`rev_nat_id`, backend ids) count apart.
    pub family: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    pub kind: &'static str,
    /// `namespace/name:port-name` (kube-proxy's spelling), null if the daemon named none.
    pub service: Option<String>,
    /// The frontend's id in conntrack entries.
    pub rev_nat_id: u32,
    /// In slot order; empty when no endpoint is usable here (see `when_empty`).
    pub backends: Vec<SlotView>,
    /// An external frontend of an `externalTrafficPolicy: Local` Service: the Service
    /// port's Cluster endpoints, which new connections from this node's pods use instead
    /// of `backends` (kube-proxy's "pod traffic for external destinations"). Null for
    /// every other frontend.
    pub pod_backends: Option<Vec<SlotView>>,
    /// What new connections meet while `backends` is empty: `reject` (the Service has no
    /// endpoints: ICMP port unreachable) or `drop` (its Local traffic policy leaves none on
    /// this node).
    pub when_empty: &'static str,
    /// How new connections choose among `backends`: `random`, or `maglev` (the frontend's
    /// Maglev table, by the client's address, port and protocol; see the README).
    pub algorithm: &'static str,
    /// The Maglev table's size (positions); null for `random`.
    pub maglev_table_size: Option<u32>,
    /// Whether every chunk of the Maglev table is in MAGLEV (false only for a moment while
    /// the daemon writes; the datapath then chooses at random). Null for `random`.
    pub maglev_table_written: Option<bool>,
}

/// One backend slot of a frontend.
#[derive(Debug, Serialize)]
pub struct SlotView {
    /// 1-based within its set.
    pub slot: u16,
    /// Where it sits in BACKEND_SLOTS.
    pub index: u32,
    /// Null if the slot itself is missing (a transient while the daemon writes).
    pub id: Option<u32>,
    /// Null with `port` when the backend is missing.
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    /// `active`: new flows may pick it; `missing`: the slot could not be read (the daemon
    /// rewrote the frontend while it was being listed).
    pub state: &'static str,
}

pub fn view<A: Address>(image: &MapImage<A>) -> Vec<FrontendView> {
    image
        .services
        .iter()
        .map(|(key, header)| {
            let endpoint = socket_addr(key.addr, key.port);
            let own = header.backends_for(Origin::Outside);
            let pods = header.backends_for(Origin::Pod);
            let table_size = maglev::table_size(header.maglev);
            let written = maglev_keys(header).all(|chunk| image.maglev.contains(&chunk));
            FrontendView {
                family: A::NAME,
                address: endpoint.ip(),
                port: endpoint.port(),
                protocol: protocol_name(key.proto),
                kind: kind_name(header.flags),
                service: service_of(image, header.rev_nat_id),
                rev_nat_id: header.rev_nat_id,
                backends: slot_views(image, &own),
                pod_backends: pods.cluster.then(|| slot_views(image, &pods)),
                when_empty: if own.drops_when_empty {
                    "drop"
                } else {
                    "reject"
                },
                algorithm: if table_size.is_some() {
                    "maglev"
                } else {
                    "random"
                },
                maglev_table_size: table_size,
                maglev_table_written: table_size.map(|_| written),
            }
        })
        .collect()
}

fn slot_views<A: Address>(image: &MapImage<A>, set: &BackendSet) -> Vec<SlotView> {
    (0..set.count)
        .map(|position| {
            let index = set.first + u32::from(position);
            let slot = image.slots.get(&index);
            let endpoint = slot.map(|slot| socket_addr(slot.backend.addr, slot.backend.port));
            SlotView {
                slot: position + 1,
                index,
                id: slot.map(|slot| slot.backend_id),
                address: endpoint.map(|endpoint| endpoint.ip()),
                port: endpoint.map(|endpoint| endpoint.port()),
                state: if slot.is_some() { "active" } else { "missing" },
            }
        })
        .collect()
}

pub fn render(frontends: &[FrontendView], wide: bool) -> String {
    let mut table = if wide {
        new_table(["FRONTEND", "TYPE", "SERVICE", "ID", "SELECTION", "BACKENDS"])
    } else {
        new_table(["FRONTEND", "TYPE", "SERVICE", "BACKENDS"])
    };
    for frontend in frontends {
        let endpoint = SocketAddr::new(frontend.address, frontend.port);
        let label = format!("{endpoint}/{}", frontend.protocol);
        let service = frontend.service.clone().unwrap_or_else(|| "-".into());
        let backends = if frontend.backends.is_empty() {
            match frontend.when_empty {
                "drop" => "0 (no local endpoints: dropped)".to_owned(),
                _ => "0 (no endpoints: refused)".to_owned(),
            }
        } else if wide {
            frontend
                .backends
                .iter()
                .map(slot_line)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            frontend.backends.len().to_string()
        };
        let backends = match &frontend.pod_backends {
            Some(pods) if wide => {
                let lines: Vec<String> = pods.iter().map(slot_line).collect();
                format!("{backends}\npods (Cluster set):\n{}", lines.join("\n"))
            }
            Some(pods) => format!("{backends} (pods: {})", pods.len()),
            None => backends,
        };
        let kind = frontend.kind.to_owned();
        if wide {
            table.add_row([
                label,
                kind,
                service,
                frontend.rev_nat_id.to_string(),
                selection_text(frontend),
                backends,
            ]);
        } else {
            table.add_row([label, kind, service, backends]);
        }
    }
    table.to_string()
}

/// `random`, `maglev 16381` or `maglev 16381 (table not written)`.
fn selection_text(frontend: &FrontendView) -> String {
    match (frontend.maglev_table_size, frontend.maglev_table_written) {
        (Some(size), Some(false)) => format!("maglev {size} (table not written)"),
        (Some(size), _) => format!("maglev {size}"),
        (None, _) => frontend.algorithm.to_owned(),
    }
}

/// `2: 198.18.1.12:8080 (id 5, active)`.
fn slot_line(slot: &SlotView) -> String {
    let target = match (slot.address, slot.port) {
        (Some(address), Some(port)) => SocketAddr::new(address, port).to_string(),
        _ => "?".to_owned(),
    };
    let id = slot.id.map_or_else(|| "-".to_owned(), |id| id.to_string());
    format!("{}: {target} (id {id}, {})", slot.slot, slot.state)
}

#[cfg(test)]
mod tests {
    use proxy_common::FrontendKey;

    use proxy_common::Ipv6;

    use super::*;
    use crate::inspect::test_support::{Port, dual_stack, image, written};
    use crate::plan::{FrontendKind, Protocol};

    #[test]
    fn frontends_list_their_service_and_slots() {
        let mut image = image(&[
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 10], 80, Protocol::Tcp),
                backends: &[([198, 18, 1, 11], 8080), ([198, 18, 1, 12], 8080)],
            },
            Port {
                service: ("default", "empty", ""),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30053, Protocol::Udp),
                backends: &[],
            },
            Port {
                service: ("default", "diameter", "sig"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 11], 3868, Protocol::Sctp),
                backends: &[([198, 18, 1, 13], 3869)],
            },
        ]);
        // A slot that could not be read.
        let web = image.services[&FrontendKey::new([198, 19, 0, 10], 80, 6)];
        image.slots.remove(&(web.base + 1));

        let views = view(&image);
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[0]["address"], "198.18.0.1");
        assert_eq!(json[0]["kind"], "NodePort");
        assert_eq!(json[0]["service"], "default/empty");
        assert_eq!(json[0]["backends"], serde_json::json!([]));
        assert_eq!(json[1]["service"], "default/web:http");
        assert_eq!(json[1]["protocol"], "tcp");
        assert_eq!(json[1]["backends"][0]["address"], "198.18.1.11");
        assert_eq!(json[1]["backends"][0]["state"], "active");
        assert_eq!(json[1]["backends"][0]["index"], web.base);
        assert_eq!(json[1]["pod_backends"], serde_json::Value::Null);
        assert_eq!(json[1]["backends"][1]["state"], "missing");
        assert_eq!(json[1]["backends"][1]["address"], serde_json::Value::Null);

        assert_eq!(json[2]["protocol"], "sctp");
        assert_eq!(json[2]["backends"][0]["port"], 3869);

        let table = render(&views, false);
        assert!(table.contains("198.19.0.10:80/tcp"), "{table}");
        assert!(table.contains("198.19.0.11:3868/sctp"), "{table}");
        assert!(table.contains("0 (no endpoints: refused)"), "{table}");
        assert_eq!(json[0]["when_empty"], "reject");
        assert_eq!(json[1]["algorithm"], "random");
        assert_eq!(json[1]["maglev_table_size"], serde_json::Value::Null);
        let wide = render(&views, true);
        assert!(wide.contains("1: 198.18.1.11:8080 (id"), "{wide}");
        assert!(wide.contains("2: ? (id"), "{wide}");
    }

    /// `ebpf-proxy services` lists IPv4's frontends, then IPv6's, from each family's maps.
    #[test]
    fn both_families_are_listed_from_their_own_maps() {
        let desired = dual_stack();
        let mut views = view(&written::<u32>(&desired));
        views.extend(view(&written::<Ipv6>(&desired)));
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[0]["family"], "IPv4");
        assert_eq!(json[0]["address"], "198.19.0.10");
        assert_eq!(json[1]["family"], "IPv6");
        assert_eq!(json[1]["address"], "2001:db8:ff::10");
        assert_eq!(json[1]["service"], "default/dual:http");
        assert_eq!(json[1]["backends"][0]["address"], "2001:db8:1::11");
        assert_eq!(json[1]["backends"][0]["port"], 8080);
        let wide = render(&views, true);
        assert!(wide.contains("[2001:db8:ff::10]:80/tcp"), "{wide}");
        assert!(wide.contains("1: [2001:db8:1::11]:8080 (id"), "{wide}");
        assert!(wide.contains("198.19.0.10:80/tcp"), "{wide}");
    }

    #[test]
    fn local_policy_frontends_list_the_cluster_set_pods_use() {
        let image = image(&[Port {
            service: ("default", "web", "http"),
            kind: FrontendKind::NodePort,
            frontend: ([198, 18, 0, 1], 30080, Protocol::Tcp),
            backends: &[([198, 18, 1, 11], 8080)],
        }]);
        let mut image = image;
        let key = FrontendKey::new([198, 18, 0, 1], 30080, 6);
        // As the writer lays it out: the local set, then the Cluster set.
        let header = image.services.get_mut(&key).unwrap();
        header.flags |= proxy_common::service_flags::CLUSTER_SET;
        header.cluster_count = 1;
        let base = header.base;
        let local = image.slots[&base];
        image.slots.insert(base + 1, local);
        let json = serde_json::to_value(view(&image)).unwrap();
        assert_eq!(json[0]["pod_backends"][0]["address"], "198.18.1.11");
        assert_eq!(json[0]["pod_backends"][0]["index"], base + 1);
        let views = view(&image);
        assert!(render(&views, false).contains("1 (pods: 1)"));
        assert!(render(&views, true).contains("pods (Cluster set):"));
    }

    #[test]
    fn maglev_frontends_show_their_table() {
        let mut image = image(&[Port {
            service: ("default", "web", "http"),
            kind: FrontendKind::NodePort,
            frontend: ([198, 18, 0, 1], 30080, Protocol::Tcp),
            backends: &[([198, 18, 1, 11], 8080)],
        }]);
        let key = FrontendKey::new([198, 18, 0, 1], 30080, 6);
        let header = image.services.get_mut(&key).unwrap();
        header.maglev = maglev::header_value(251).unwrap();
        let header = *header;
        let json = serde_json::to_value(view(&image)).unwrap();
        assert_eq!(json[0]["algorithm"], "maglev");
        assert_eq!(json[0]["maglev_table_size"], 251);
        assert_eq!(json[0]["maglev_table_written"], false);
        assert!(render(&view(&image), true).contains("maglev 251 (table not written)"));
        image.maglev.extend(maglev_keys(&header));
        let wide = render(&view(&image), true);
        assert!(
            wide.contains("SELECTION") && wide.contains("maglev 251 "),
            "{wide}"
        );
        assert!(!wide.contains("not written"), "{wide}");
    }
}
