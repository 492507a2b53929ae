//! `ebpf-proxy backends`: one row per backend, with the frontends that use it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use proxy_common::Address;
use serde::Serialize;

use super::{frontend_label, new_table, protocol_name, service_of, socket_addr};
use crate::writer::{MapImage, slice_of};

/// One backend. JSON schema: every field, always present.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// `IPv4` or `IPv6`: each family's backends sit in maps of their own, and their ids
    /// count apart.
    pub family: &'static str,
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// `active`: a frontend slot names it; `unused`: none does (the daemon deletes it
    /// right after the slots that named it).
    pub state: &'static str,
    /// The Service ports (`namespace/name:port-name`) of those frontends, sorted.
    pub services: Vec<String>,
    /// Those frontends, as `addr:port/proto`, sorted.
    pub frontends: Vec<String>,
}

pub fn view<A: Address>(image: &MapImage<A>) -> Vec<BackendView> {
    let mut users: BTreeMap<u32, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
    for (key, header) in &image.services {
        let slots = slice_of(header)
            .range()
            .filter_map(|index| image.slots.get(&index));
        for slot in slots {
            let (services, frontends) = users.entry(slot.backend_id).or_default();
            frontends.insert(frontend_label(key));
            services.extend(service_of(image, header.rev_nat_id));
        }
    }
    image
        .backends
        .iter()
        .map(|(id, backend)| {
            let endpoint = socket_addr(backend.addr, backend.port);
            let (services, frontends) = users.remove(id).unwrap_or_default();
            BackendView {
                family: A::NAME,
                id: *id,
                address: endpoint.ip(),
                port: endpoint.port(),
                protocol: protocol_name(backend.proto),
                state: if frontends.is_empty() {
                    "unused"
                } else {
                    "active"
                },
                services: services.into_iter().collect(),
                frontends: frontends.into_iter().collect(),
            }
        })
        .collect()
}

pub fn render(backends: &[BackendView]) -> String {
    let mut table = new_table(["ID", "BACKEND", "STATE", "SERVICES", "FRONTENDS"]);
    for backend in backends {
        let endpoint = SocketAddr::new(backend.address, backend.port);
        table.add_row([
            backend.id.to_string(),
            format!("{endpoint}/{}", backend.protocol),
            backend.state.to_owned(),
            backend.services.join(" "),
            backend.frontends.join(" "),
        ]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use proxy_common::{Backend, proto};

    use super::*;
    use crate::inspect::test_support::{Port, dual_stack, image, written};
    use crate::plan::{FrontendKind, Protocol};

    #[test]
    fn backends_name_every_frontend_and_service_using_them() {
        let shared = ([198, 18, 1, 11], 8080);
        let mut image = image(&[
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::ClusterIp,
                frontend: ([198, 19, 0, 10], 80, Protocol::Tcp),
                backends: &[shared],
            },
            Port {
                service: ("default", "web", "http"),
                kind: FrontendKind::NodePort,
                frontend: ([198, 18, 0, 1], 30080, Protocol::Tcp),
                backends: &[shared, ([198, 18, 1, 12], 8080)],
            },
        ]);
        image
            .backends
            .insert(99, Backend::new([198, 18, 1, 13], 8080, proto::TCP));

        let views = view(&image);
        assert_eq!(views.len(), 3);
        let shared = views
            .iter()
            .find(|b| b.address == std::net::Ipv4Addr::new(198, 18, 1, 11));
        let shared = shared.unwrap();
        assert_eq!(shared.state, "active");
        assert_eq!(shared.services, ["default/web:http"]);
        assert_eq!(
            shared.frontends,
            ["198.18.0.1:30080/tcp", "198.19.0.10:80/tcp"]
        );
        let orphan = views.iter().find(|b| b.id == 99).unwrap();
        assert_eq!((orphan.state, orphan.services.len()), ("unused", 0));

        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[2]["id"], 99);
        assert_eq!(json[2]["protocol"], "tcp");
        assert!(render(&views).contains("198.18.1.13:8080/tcp"));
    }

    /// Each family's backends come from its own maps; their ids count apart.
    #[test]
    fn ipv6_backends_are_listed_with_their_frontends() {
        let desired = dual_stack();
        let mut views = view(&written::<u32>(&desired));
        views.extend(view(&written::<proxy_common::Ipv6>(&desired)));
        let json = serde_json::to_value(&views).unwrap();
        assert_eq!(json[1]["family"], "IPv6");
        assert_eq!(json[1]["address"], "2001:db8:1::11");
        assert_eq!(json[1]["frontends"][0], "[2001:db8:ff::10]:80/tcp");
        assert_eq!(json[1]["services"][0], "default/dual:http");
        assert_eq!(json[0]["family"], "IPv4");
        assert!(render(&views).contains("[2001:db8:1::11]:8080/tcp"));
    }
}
