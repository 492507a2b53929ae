//! The packets around a translated flow, with real sockets (issue 19's table): UDP
//! datagrams over the MTU, whose IP fragments must follow their first fragment, in both
//! directions and through every frontend kind; a backend's refusal, which must reach the
//! client as the Service's; and a TCP transfer over a hop narrower than the pods' MTU,
//! which only completes when Path-MTU discovery works through the translation. Across
//! nodes too, where node 1 SNATs to a backend on node 2.
//!
//! The pods' servers (`LargeServers`): a UDP server answering each query with the size it
//! asks for, a TCP server sending 200 KB to each connection. Veth MTU 1,500 everywhere
//! unless a test narrows a hop.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{SYNC_TIMEOUT, counter};
use proxy_lab::{
    Cluster, Endpoint, Lab, LargeServers, Netns, Received, Service, addr, require_lab,
};

/// Where the pods' sized UDP server and bulk TCP server listen.
const SIZED_PORT: u16 = 5454;
const BULK_PORT: u16 = 8082;
/// A port nothing listens on in the pods.
const CLOSED_PORT: u16 = 5999;
/// Service ports: the sized server, the closed port, the bulk server.
const SIZED: u16 = 53;
const CLOSED: u16 = 54;
const BULK: u16 = 80;
/// NodePorts of the sized server and of the closed port.
const SIZED_NODE_PORT: u16 = 30053;
const CLOSED_NODE_PORT: u16 = 30054;
const BULK_BYTES: usize = 200 * 1024;
/// Long enough for a datagram of 21 fragments through two namespaces on a busy machine;
/// a lost fragment loses the datagram, and then this passes unanswered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);
/// Query and answer sizes of the table: one datagram, a few fragments, many.
const SMALL: (usize, usize) = (50, 100);
const SIZES: [(usize, usize); 3] = [(50, 4_000), (50, 30_000), (4_000, 100)];

/// Asserts that a query of `query` bytes from `from` to `addr:port` draws a whole answer
/// of `answer` bytes from the pod `pod`, sent from `addr:port` (the client's socket is
/// connected there, so nothing else would reach it).
fn assert_answered(
    from: &Netns,
    addr: Ipv4Addr,
    port: u16,
    (query, answer): (usize, usize),
    pod: &str,
) -> Result<()> {
    let reply = from
        .udp_sized_request(addr, port, query, answer, ANSWER_TIMEOUT)
        .with_context(|| {
            format!(
                "{} → {addr}:{port}: a {query}-byte query for a {answer}-byte answer",
                from.name()
            )
        })?;
    ensure!(
        reply.body == pod,
        "{addr}:{port}: answered by {:?}, not {pod}",
        reply.body
    );
    ensure!(
        reply.peer == SocketAddr::V4(SocketAddrV4::new(addr, port)),
        "{addr}:{port}: answered from {}",
        reply.peer
    );
    println!(
        "UDP {} → {addr}:{port}: {query} B query, {answer} B answer from {pod}",
        from.name()
    );
    Ok(())
}

/// Asserts that a datagram from `from` to `addr:port` is refused: the receive on the
/// connected socket fails with "connection refused" (an ICMP port unreachable arrived and
/// matched the socket), not with a timeout.
fn assert_refused(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<()> {
    match from.udp_sized_request(addr, port, SMALL.0, SMALL.1, ANSWER_TIMEOUT) {
        Ok(reply) => bail!("{addr}:{port} answered: {reply:?}"),
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
            println!("UDP {} → {addr}:{port}: refused", from.name());
            Ok(())
        }
        Err(error) => bail!("{addr}:{port} was not refused: {error}"),
    }
}

/// The lab: pod-1 serves (sized UDP, bulk TCP), pod-2 calls.
fn lab() -> Result<(Lab, LargeServers)> {
    let lab = Lab::builder().pods(2).build()?;
    let mut servers = LargeServers::default();
    servers.udp_sized(lab.pod(1), SIZED_PORT)?;
    servers.tcp_bulk(lab.pod(1), BULK_PORT, BULK_BYTES)?;
    Ok((lab, servers))
}

#[test]
fn udp_over_the_mtu_through_a_cluster_ip_both_ways_and_a_refusal_from_the_service() -> Result<()> {
    require_lab!();
    let (lab, _servers) = lab()?;
    let service = Service::cluster_ip("large", addr::CLUSTER_IP)
        .udp(SIZED, SIZED_PORT)
        .udp(CLOSED, CLOSED_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest([lab.pod(1)]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let caller = &lab.pod(2).ns;

    for sizes in [SMALL].into_iter().chain(SIZES) {
        assert_answered(caller, addr::CLUSTER_IP, SIZED, sizes, "pod-1")?;
    }
    assert_answered(caller, addr::CLUSTER_IP, SIZED, (30_000, 30_000), "pod-1")?;
    assert_refused(caller, addr::CLUSTER_IP, CLOSED)?;
    ensure!(counter(&daemon, "fragment")? > 0, "no fragment was counted");
    ensure!(
        counter(&daemon, "icmp_error")? > 0,
        "no ICMP error was counted"
    );
    Ok(())
}

#[test]
fn udp_over_the_mtu_from_outside_through_node_port_external_ip_and_load_balancer_ip() -> Result<()>
{
    require_lab!();
    let (lab, _servers) = lab()?;
    let service =
        Service::load_balancer("large", addr::NODE_PORT_SERVICE_IP, addr::LOAD_BALANCER_IP)
            .external_ip(addr::EXTERNAL_IP)
            .udp_node_port(SIZED, SIZED_PORT, SIZED_NODE_PORT)
            .udp_node_port(CLOSED, CLOSED_PORT, CLOSED_NODE_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest([lab.pod(1)]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let client = lab.client();

    for (frontend, port) in [
        (addr::NODE_IP, SIZED_NODE_PORT),
        (addr::EXTERNAL_IP, SIZED),
        (addr::LOAD_BALANCER_IP, SIZED),
    ] {
        for sizes in [SMALL].into_iter().chain(SIZES) {
            assert_answered(client, frontend, port, sizes, "pod-1")?;
        }
    }
    // Before, the node's own stack reassembled the query for a port nobody listens on and
    // refused it; a backend's refusal now reaches the client from the NodePort.
    assert_refused(client, addr::NODE_IP, CLOSED_NODE_PORT)?;
    assert_refused(client, addr::EXTERNAL_IP, CLOSED)?;
    Ok(())
}

#[test]
fn a_pod_reaching_itself_through_its_service_sends_and_gets_datagrams_over_the_mtu() -> Result<()> {
    require_lab!();
    let (lab, _servers) = lab()?;
    let service = Service::cluster_ip("large", addr::CLUSTER_IP).udp(SIZED, SIZED_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest([lab.pod(1)]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    // Hairpin: the pod is its own backend, the frontend address its peer both ways.
    for sizes in SIZES {
        assert_answered(&lab.pod(1).ns, addr::CLUSTER_IP, SIZED, sizes, "pod-1")?;
    }
    Ok(())
}

#[test]
fn tcp_through_a_cluster_ip_over_a_narrow_hop_finds_its_path_mtu() -> Result<()> {
    require_lab!();
    let (lab, _servers) = lab()?;
    let service = Service::cluster_ip("large", addr::CLUSTER_IP).tcp(BULK, BULK_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest([lab.pod(1)]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    // The node's hop toward the calling pod is narrower than the pods' MTU (a tunnel, a
    // cloud hop): the backend's full-size segments do not fit, and only a "fragmentation
    // needed" that reaches the backend, about its own segment, makes it send smaller ones.
    lab.node().ip(&["link", "set", "lxc2", "mtu", "1000"])?;

    let received =
        lab.pod(2)
            .ns
            .tcp_receive_all(addr::CLUSTER_IP, BULK, Duration::from_secs(10))?;
    ensure!(
        received
            == Received {
                bytes: BULK_BYTES,
                complete: true
            },
        "got {received:?} of {BULK_BYTES} bytes"
    );
    ensure!(
        counter(&daemon, "frag_needed")? > 0,
        "the transfer completed without a fragmentation-needed answer"
    );
    Ok(())
}

#[test]
fn across_nodes_fragments_and_refusals_pass_node_1s_snat_both_ways() -> Result<()> {
    require_lab!();
    let cluster = Cluster::builder().pods_per_node(&[1, 1]).build()?;
    let backend = cluster.node(2).pod(1);
    let mut servers = LargeServers::default();
    servers.udp_sized(backend, SIZED_PORT)?;
    let service = Service::node_port("large", addr::NODE_PORT_SERVICE_IP)
        .udp_node_port(SIZED, SIZED_PORT, SIZED_NODE_PORT)
        .udp_node_port(CLOSED, CLOSED_PORT, CLOSED_NODE_PORT);
    let endpoints = [Endpoint::of(backend).on_node(&cluster.node(2).name)];
    let daemons = (1..=2)
        .map(|k| {
            cluster
                .daemon(k)
                .manifest(service.manifest_with(&endpoints))
                .start()
        })
        .collect::<Result<Vec<_>>>()?;
    for daemon in &daemons {
        daemon.wait_synced(SYNC_TIMEOUT)?;
    }
    // From outside to node 1, whose only endpoint is on node 2: SNAT to node 1's address.
    let node_1 = cluster.node(1).ip;
    for sizes in [SMALL].into_iter().chain(SIZES) {
        assert_answered(
            cluster.client(),
            node_1,
            SIZED_NODE_PORT,
            sizes,
            &backend.name,
        )?;
    }
    assert_refused(cluster.client(), node_1, CLOSED_NODE_PORT)?;
    Ok(())
}
