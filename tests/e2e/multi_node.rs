//! Across nodes: two node namespaces on a fabric, each running its own daemon, pods routed
//! host-gw style (see the multi-node table in the proxy-lab crate docs).
//!
//! - ClusterIP from a pod on node 1 to backends only on node 2: node 1 DNATs, the packet
//!   crosses the fabric, and the reply is reverse-NATed on node 1's fabric device.
//! - externalTrafficPolicy=Cluster, NodePort on node 1 with the backends only on node 2:
//!   node 1 SNATs to its own address and a port of the SNAT range, so the backends see node
//!   1 as the client and answer through it; 200 connections held open at once all work.
//! - externalTrafficPolicy=Local: the node with the endpoint serves NodePort traffic and the
//!   backend sees the client's own address; the node without one drops. Its
//!   healthCheckNodePort answers 200 on the node with endpoints, 503 on the other.
//!
//! The traffic tests run with tc alone and with the XDP program on the nodes' devices
//! (`--xdp off`, `--xdp native`).

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, daemons_on_nodes_1_and_2, endpoints_on};
use proxy_lab::{Cluster, Service, addr, is_timeout, require_lab};

/// The Service's `healthCheckNodePort` (the API allocates it from the NodePort range).
const HEALTH_CHECK_NODE_PORT: u16 = 32000;
/// Two backends, 40 connections: all on one with probability 2 · (1/2)^40.
const CONNECTIONS: usize = 40;
/// Long enough that a dropped SYN (first retransmit after 1 s) is clearly dropped.
const DROP_WAIT: Duration = Duration::from_millis(1500);

/// Node 1 with one pod (the caller), node 2 with two (the backends).
fn cluster() -> Result<Cluster> {
    Cluster::builder().pods_per_node(&[1, 2]).build()
}

/// The `--xdp` modes the traffic tests run with.
const XDP_MODES: [&str; 2] = ["off", "native"];

#[test]
fn cluster_ip_from_a_pod_reaches_backends_on_another_node() -> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        cluster_ip_reaches_backends_on_another_node(xdp)
            .map_err(|error| error.context(format!("--xdp {xdp}")))?;
    }
    Ok(())
}

fn cluster_ip_reaches_backends_on_another_node(xdp: &str) -> Result<()> {
    let cluster = cluster()?;
    let service = Service::cluster_ip("echo", addr::CLUSTER_IP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let _daemons =
        daemons_on_nodes_1_and_2(&cluster, &service, &endpoints_on(cluster.node(2)), xdp)?;
    let caller = &cluster.node(1).pod(1).ns;

    let mut served = BTreeSet::new();
    for _ in 0..CONNECTIONS {
        served.insert(caller.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?.body);
    }
    let remote: BTreeSet<String> = cluster
        .node(2)
        .pods()
        .iter()
        .map(|pod| pod.name.clone())
        .collect();
    ensure!(served == remote, "ClusterIP served by {served:?}");

    let reply = caller.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    ensure!(
        reply.peer == SocketAddr::V4(SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_UDP_PORT)),
        "UDP answer from {} instead of the VIP",
        reply.peer
    );
    ensure!(remote.contains(&reply.body), "UDP served by {reply:?}");
    Ok(())
}

/// Connections held open at once through node 1's NodePort in the SNAT test.
const SNAT_CONNECTIONS: usize = 200;

#[test]
fn node_port_to_backends_on_another_node_is_snated_to_the_node_address() -> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        node_port_snat(xdp).map_err(|error| error.context(format!("--xdp {xdp}")))?;
    }
    Ok(())
}

fn node_port_snat(xdp: &str) -> Result<()> {
    let cluster = cluster()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP).tcp_node_port(
        SERVICE_TCP_PORT,
        addr::PEER_REPORT_PORT,
        addr::NODE_PORT_TCP,
    );
    let _daemons =
        daemons_on_nodes_1_and_2(&cluster, &service, &endpoints_on(cluster.node(2)), xdp)?;
    let client = cluster.client();
    let node_1 = cluster.node(1).ip;

    // All open at once: flows sharing an SNAT tuple would break one another.
    let mut sessions = (0..SNAT_CONNECTIONS)
        .map(|_| client.tcp_session(node_1, addr::NODE_PORT_TCP))
        .collect::<Result<Vec<_>>>()?;
    for round in 0..2 {
        for (i, session) in sessions.iter_mut().enumerate() {
            let seen: Ipv4Addr = session.request()?.parse()?;
            ensure!(
                seen == node_1,
                "connection {i} (round {round}): the backend saw {seen}, not node 1's address"
            );
            let peer = session.peer()?;
            ensure!(
                peer == SocketAddr::V4(SocketAddrV4::new(node_1, addr::NODE_PORT_TCP)),
                "connection {i} answered by {peer}"
            );
        }
    }
    Ok(())
}

#[test]
fn external_traffic_policy_local_serves_only_on_the_endpoints_node_and_keeps_the_client_address()
-> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        local_policy(xdp).map_err(|error| error.context(format!("--xdp {xdp}")))?;
    }
    Ok(())
}

fn local_policy(xdp: &str) -> Result<()> {
    let cluster = cluster()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(
            SERVICE_TCP_PORT,
            addr::PEER_REPORT_PORT,
            addr::NODE_PORT_TCP,
        )
        .external_traffic_policy_local();
    let _daemons =
        daemons_on_nodes_1_and_2(&cluster, &service, &endpoints_on(cluster.node(2)), xdp)?;
    let client = cluster.client();

    for _ in 0..CONNECTIONS {
        let reply = client.tcp_request(cluster.node(2).ip, addr::NODE_PORT_TCP)?;
        let seen: Ipv4Addr = reply.body.parse()?;
        ensure!(
            seen == addr::FABRIC_CLIENT_IP,
            "the backend saw {seen}, not the client's address"
        );
    }
    match client.tcp_connect(cluster.node(1).ip, addr::NODE_PORT_TCP, DROP_WAIT) {
        Ok(_) => bail!("node 1 served the NodePort without a local endpoint"),
        Err(error) => ensure!(
            is_timeout(&error),
            "node 1 did not drop but failed: {error}"
        ),
    }
    Ok(())
}

#[test]
fn health_check_node_port_answers_200_on_the_endpoints_node_and_503_elsewhere() -> Result<()> {
    require_lab!();
    let cluster = cluster()?;
    let service = Service::load_balancer(
        "echo-lb",
        addr::NODE_PORT_SERVICE_IP,
        addr::LOAD_BALANCER_IP,
    )
    .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
    .external_traffic_policy_local()
    .health_check_node_port(HEALTH_CHECK_NODE_PORT);
    let _daemons =
        daemons_on_nodes_1_and_2(&cluster, &service, &endpoints_on(cluster.node(2)), "off")?;

    // (node, expected status, expected localEndpoints): node 2 runs both endpoints.
    for (k, status, local_endpoints) in [(2, 200, 2), (1, 503, 0)] {
        let (code, body) =
            cluster
                .client()
                .http_get(cluster.node(k).ip, HEALTH_CHECK_NODE_PORT, "/healthz")?;
        ensure!(code == status, "node {k} answered {code}: {body}");
        let body: serde_json::Value = serde_json::from_str(&body)?;
        let expected = serde_json::json!({
            "service": {"namespace": "default", "name": "echo-lb"},
            "localEndpoints": local_endpoints,
            "serviceProxyHealthy": true,
        });
        ensure!(body == expected, "node {k} answered {body}");
    }
    Ok(())
}
