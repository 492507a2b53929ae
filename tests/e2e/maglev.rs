//! Maglev consistent hashing across nodes (`ebpf-proxy.io/lb-algorithm: maglev`): every
//! node computes the same table from the same backends, so a client's flow reaches the same
//! backend whichever node it enters. A new TCP connection from the same client port through
//! either node's NodePort; a UDP flow whose path to a load-balancer IP moves from node 1 to
//! node 2 midway (an outside router rehashing): it keeps its backend and its answers; a TCP
//! connection moved the same way: node 2 sends it to the backend node 1 chose (the
//! connection itself does not survive where a node SNATs it: the backend sees another
//! source, see the README). With kube-proxy's random choice (the same Service without the
//! annotation) the nodes disagree. With `--xdp off` and `--xdp native`. IPv6 alike: a
//! single-stack IPv6 Service's new TCP connections from one client port through either
//! node's IPv6 NodePort reach the same backend (an IPv6 client placed by its address's
//! digest, IPv6 backends placed as the writer places them; remote ones SNATed).
//!
//! Three nodes: the client enters through nodes 1 and 2, which run the daemons; the five
//! backends sit on all three (node 1's and node 2's pods are local to one entry node and
//! remote to the other).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::flows_of;
use proxy_lab::{Cluster, Daemon, Endpoint, Service, addr, require_lab};

/// Client ports tried: with five backends, random choices would agree on all of them with
/// probability (1/5)^20.
const FLOWS: u16 = 20;
const FIRST_CLIENT_PORT: u16 = 41_000;
const FIRST_UDP_PORT: u16 = 42_000;
const FIRST_MOVED_TCP_PORT: u16 = 43_000;
const TIMEOUT: Duration = Duration::from_secs(2);

/// The Service: a load balancer whose ingress IP the client routes to one node or another,
/// with NodePorts; `maglev` adds the annotation.
fn service(maglev: bool) -> Service {
    let service = Service::load_balancer("web", addr::NODE_PORT_SERVICE_IP, addr::LOAD_BALANCER_IP)
        .tcp_node_port(80, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(53, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    if maglev {
        service.annotation("ebpf-proxy.io/lb-algorithm", "maglev")
    } else {
        service
    }
}

/// The `--xdp` modes the tests run with.
const XDP_MODES: [&str; 2] = ["off", "native"];

/// Daemons on nodes 1 and 2 (`--xdp xdp`), every pod of the cluster a backend.
fn entry_daemons<'lab>(
    cluster: &'lab Cluster,
    service: &Service,
    xdp: &str,
) -> Result<Vec<Daemon<'lab>>> {
    let endpoints: Vec<Endpoint> = (1..=3)
        .flat_map(|k| common::endpoints_on(cluster.node(k)))
        .collect();
    common::daemons_on_nodes_1_and_2(cluster, service, &endpoints, xdp)
}

/// Routes the client's traffic to the load-balancer IP through node `k`.
fn route_through(cluster: &Cluster, k: usize) -> Result<()> {
    let lb_ip = addr::LOAD_BALANCER_IP.to_string();
    let node = cluster.node(k).ip.to_string();
    cluster
        .client()
        .ip(&["route", "replace", &lb_ip, "via", &node])
}

fn cluster() -> Result<Cluster> {
    Cluster::builder().pods_per_node(&[1, 1, 3]).build()
}

/// For each client port: the pod that answered a TCP request through node 1's NodePort,
/// and then one through node 2's, each a new connection from that port; `node_ip(k)` is
/// node k's address of the family tried.
fn tcp_through_both_nodes(
    cluster: &Cluster,
    node_ip: impl Fn(usize) -> IpAddr,
) -> Result<Vec<(String, String)>> {
    (0..FLOWS)
        .map(|flow| {
            let port = FIRST_CLIENT_PORT + flow;
            let mut answers = Vec::new();
            for k in [1, 2] {
                let mut session = cluster
                    .client()
                    .tcp_connect_from(port, node_ip(k), addr::NODE_PORT_TCP, TIMEOUT)
                    .with_context(|| format!("port {port} through node {k}"))?;
                answers.push(session.request()?);
                session.reset_on_close()?;
            }
            Ok((answers[0].clone(), answers[1].clone()))
        })
        .collect()
}

/// For each client port: the pod that answered a UDP flow to the load-balancer IP while
/// the client's route to it went through node 1, and after the route moved to node 2.
fn udp_moving_from_node_1_to_node_2(cluster: &Cluster) -> Result<Vec<(String, String)>> {
    let client = cluster.client();
    route_through(cluster, 1)?;
    let sockets = (0..FLOWS)
        .map(|flow| client.udp_socket_from(FIRST_UDP_PORT + flow, TIMEOUT))
        .collect::<std::io::Result<Vec<_>>>()?;
    let ask = |socket: &std::net::UdpSocket| -> Result<String> {
        Ok(proxy_lab::udp_exchange(socket, addr::LOAD_BALANCER_IP, 53)?.body)
    };
    let before = sockets.iter().map(ask).collect::<Result<Vec<_>>>()?;
    route_through(cluster, 2)?;
    let after = sockets.iter().map(ask).collect::<Result<Vec<_>>>()?;
    Ok(before.into_iter().zip(after).collect())
}

/// The backend address `daemon`'s conntrack holds for the client's flow from `port`.
fn backend_of_flow(daemon: &Daemon, port: u16) -> Result<String> {
    let flows = flows_of(daemon, addr::FABRIC_CLIENT_IP, &[])?;
    let flow = flows
        .iter()
        .find(|flow| flow["client"]["port"] == port)
        .with_context(|| format!("no flow from port {port}: {flows:?}"))?;
    Ok(flow["backend"]["address"].to_string())
}

/// For each client port: the backend node 1 gave a TCP connection to the load-balancer
/// IP, and the backend node 2 gave its next packet after the route moved there.
fn tcp_moving_from_node_1_to_node_2(
    cluster: &Cluster,
    daemons: &[Daemon],
) -> Result<Vec<(String, String)>> {
    route_through(cluster, 1)?;
    let mut sessions = (0..FLOWS)
        .map(|flow| {
            let port = FIRST_MOVED_TCP_PORT + flow;
            let mut session = cluster
                .client()
                .tcp_connect_from(port, addr::LOAD_BALANCER_IP, 80, TIMEOUT)
                .with_context(|| format!("port {port} through node 1"))?;
            session.request()?;
            session.reset_on_close()?;
            Ok(session)
        })
        .collect::<Result<Vec<_>>>()?;
    let before = (0..FLOWS)
        .map(|flow| backend_of_flow(&daemons[0], FIRST_MOVED_TCP_PORT + flow))
        .collect::<Result<Vec<_>>>()?;
    route_through(cluster, 2)?;
    for session in &mut sessions {
        // Node 2 translates the packet; whether the backend answers depends on whether
        // it sees the source it knows (see the module's comment): either is fine here.
        let _ = session.request();
    }
    let after = (0..FLOWS)
        .map(|flow| backend_of_flow(&daemons[1], FIRST_MOVED_TCP_PORT + flow))
        .collect::<Result<Vec<_>>>()?;
    Ok(before.into_iter().zip(after).collect())
}

#[test]
fn every_node_sends_a_clients_flow_to_the_same_backend_and_a_moved_flow_keeps_it() -> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        same_backend_through_either_node(xdp)
            .map_err(|error| error.context(format!("--xdp {xdp}")))?;
    }
    Ok(())
}

fn same_backend_through_either_node(xdp: &str) -> Result<()> {
    let cluster = cluster()?;
    let daemons = entry_daemons(&cluster, &service(true), xdp)?;
    for (name, pairs) in [
        (
            "TCP through either node",
            tcp_through_both_nodes(&cluster, |k| cluster.node(k).ip.into())?,
        ),
        (
            "UDP moved from node 1 to node 2",
            udp_moving_from_node_1_to_node_2(&cluster)?,
        ),
        (
            "TCP moved from node 1 to node 2",
            tcp_moving_from_node_1_to_node_2(&cluster, &daemons)?,
        ),
    ] {
        same_backends_spread(name, &pairs)?;
    }
    let services = common::cli_json(&daemons[0], &["services"])?;
    let external = services
        .as_array()
        .context("services JSON is an array")?
        .iter()
        .filter(|frontend| frontend["kind"] != "ClusterIP");
    for frontend in external {
        ensure!(frontend["algorithm"] == "maglev", "{frontend:#}");
        ensure!(frontend["maglev_table_written"] == true, "{frontend:#}");
    }
    Ok(())
}

/// Each flow kept its backend, and the flows spread over more than one.
fn same_backends_spread(name: &str, pairs: &[(String, String)]) -> Result<()> {
    let differing: Vec<&(String, String)> = pairs.iter().filter(|(a, b)| a != b).collect();
    ensure!(
        differing.is_empty(),
        "{name}: backends changed: {differing:?}"
    );
    let spread: std::collections::BTreeSet<&String> = pairs.iter().map(|(a, _)| a).collect();
    ensure!(
        spread.len() > 1,
        "{name}: every flow on one backend: {spread:?}"
    );
    Ok(())
}

#[test]
fn over_ipv6_every_node_sends_a_clients_connection_to_the_same_backend() -> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        let cluster = cluster()?;
        let service = Service::node_port("web6", addr::NODE_PORT_SERVICE_IPV6)
            .tcp_node_port(80, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
            .annotation("ebpf-proxy.io/lb-algorithm", "maglev");
        let endpoints: Vec<Endpoint> = (1..=3)
            .flat_map(|k| {
                let node = cluster.node(k);
                node.pods()
                    .iter()
                    .map(|pod| Endpoint::of_v6(pod).on_node(&node.name))
                    .collect::<Vec<_>>()
            })
            .collect();
        let _daemons = common::daemons_on_nodes_1_and_2(&cluster, &service, &endpoints, xdp)?;
        let pairs = tcp_through_both_nodes(&cluster, |k| addr::fabric_node_ipv6(k).into())
            .with_context(|| format!("--xdp {xdp}"))?;
        same_backends_spread(
            &format!("IPv6 TCP through either node, --xdp {xdp}"),
            &pairs,
        )?;
    }
    Ok(())
}

#[test]
fn with_random_choices_the_nodes_disagree() -> Result<()> {
    require_lab!();
    let cluster = cluster()?;
    let _daemons = entry_daemons(&cluster, &service(false), "off")?;
    let pairs = udp_moving_from_node_1_to_node_2(&cluster)?;
    ensure!(
        pairs.iter().any(|(a, b)| a != b),
        "random choices agreed on all {FLOWS} flows: {pairs:?}"
    );
    Ok(())
}
