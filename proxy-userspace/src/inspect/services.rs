//! `ebpf-proxy services`: one row per frontend, as the datapath holds it.

use std::net::Ipv4Addr;

use proxy_common::{ServiceKey, service_flags};
use serde::Serialize;

use super::{Endpoint, kind_name, new_table, protocol_name, service_of};
use crate::writer::MapImage;

/// One frontend. JSON schema: every field, always present (`service` may be null).
#[derive(Debug, Serialize)]
pub struct FrontendView {
    pub address: Ipv4Addr,
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
    /// What new connections meet while `backends` is empty: `reject` (the Service has no
    /// endpoints: ICMP port unreachable) or `drop` (its Local traffic policy leaves none on
    /// this node).
    pub when_empty: &'static str,
}

/// One backend slot of a frontend.
#[derive(Debug, Serialize)]
pub struct SlotView {
    pub slot: u16,
    /// Null if the slot itself is missing (a transient while the daemon writes).
    pub id: Option<u32>,
    /// Null with `port` when the backend is missing.
    pub address: Option<Ipv4Addr>,
    pub port: Option<u16>,
    /// `active`: new flows may pick it; `missing`: the slot or its backend is absent, so a
    /// flow that picks it is dropped (counted as `backend_missing`).
    pub state: &'static str,
}

pub fn view(image: &MapImage) -> Vec<FrontendView> {
    image
        .services
        .iter()
        .filter(|(key, _)| key.slot == 0)
        .map(|(key, header)| {
            let endpoint = Endpoint::from_wire(key.addr, key.port);
            FrontendView {
                address: endpoint.address,
                port: endpoint.port,
                protocol: protocol_name(key.proto),
                kind: kind_name(header.flags),
                service: service_of(image, header.rev_nat_id),
                rev_nat_id: header.rev_nat_id,
                backends: (1..=header.count)
                    .map(|slot| slot_view(image, key, slot))
                    .collect(),
                when_empty: if header.flags & service_flags::NO_LOCAL_ENDPOINTS != 0 {
                    "drop"
                } else {
                    "reject"
                },
            }
        })
        .collect()
}

fn slot_view(image: &MapImage, frontend: &ServiceKey, slot: u16) -> SlotView {
    let id = image
        .services
        .get(&frontend.with_slot(slot))
        .map(|value| value.backend_id);
    let backend = id.and_then(|id| image.backends.get(&id));
    let endpoint = backend.map(|backend| Endpoint::from_wire(backend.addr, backend.port));
    SlotView {
        slot,
        id,
        address: endpoint.map(|endpoint| endpoint.address),
        port: endpoint.map(|endpoint| endpoint.port),
        state: if endpoint.is_some() {
            "active"
        } else {
            "missing"
        },
    }
}

pub fn render(frontends: &[FrontendView], wide: bool) -> String {
    let mut table = if wide {
        new_table(["FRONTEND", "TYPE", "SERVICE", "ID", "BACKENDS"])
    } else {
        new_table(["FRONTEND", "TYPE", "SERVICE", "BACKENDS"])
    };
    for frontend in frontends {
        let endpoint = Endpoint {
            address: frontend.address,
            port: frontend.port,
        };
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
        let kind = frontend.kind.to_owned();
        if wide {
            table.add_row([
                label,
                kind,
                service,
                frontend.rev_nat_id.to_string(),
                backends,
            ]);
        } else {
            table.add_row([label, kind, service, backends]);
        }
    }
    table.to_string()
}

/// `2: 198.18.1.12:8080 (id 5, active)`.
fn slot_line(slot: &SlotView) -> String {
    let target = match (slot.address, slot.port) {
        (Some(address), Some(port)) => Endpoint { address, port }.to_string(),
        _ => "?".to_owned(),
    };
    let id = slot.id.map_or_else(|| "-".to_owned(), |id| id.to_string());
    format!("{}: {target} (id {id}, {})", slot.slot, slot.state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::test_support::{Port, image};
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
        ]);
        // A backend the daemon has not written yet.
        let gone = image.services[&ServiceKey::new([198, 19, 0, 10], 80, 6, 2)].backend_id;
        image.backends.remove(&gone);

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
        assert_eq!(json[1]["backends"][1]["state"], "missing");
        assert_eq!(json[1]["backends"][1]["address"], serde_json::Value::Null);

        let table = render(&views, false);
        assert!(table.contains("198.19.0.10:80/tcp"), "{table}");
        assert!(table.contains("0 (no endpoints: refused)"), "{table}");
        assert_eq!(json[0]["when_empty"], "reject");
        let wide = render(&views, true);
        assert!(wide.contains("1: 198.18.1.11:8080 (id"), "{wide}");
        assert!(wide.contains("2: ? (id"), "{wide}");
    }
}
