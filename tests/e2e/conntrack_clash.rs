//! Issue 16, with real sockets bound to a fixed source port: a client reaches a backend
//! through a Service and then straight at its pod address and target port, from the same
//! port (`socat …,sourceport=`, `dig -b …#port`). The direct flow must be answered by the
//! pod itself, never with the Service's address, whether the Service flow is closed or
//! still alive (then netfilter, and we, remap the newer flow's port); and the reverse: a
//! Service flow opened beside a live direct flow. On one node, and across nodes (the
//! caller's node translates, the backend is on the other).

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, echo_service};
use proxy_lab::{Cluster, Endpoint, Netns, Pod, addr, require_lab, udp_exchange};

const TIMEOUT: Duration = Duration::from_secs(2);
/// The caller's fixed source ports, one per case.
const TCP_CLOSED: u16 = 40_080;
const TCP_ALIVE: u16 = 40_081;
const TCP_DIRECT_FIRST: u16 = 40_082;
const UDP_PORT: u16 = 40_053;

/// The address of the backend pod that answered with `name`.
fn pod_address(backends: &[Pod], name: &str) -> Result<Ipv4Addr> {
    backends
        .iter()
        .find(|pod| pod.name == name)
        .map(|pod| pod.ip)
        .with_context(|| format!("answered by {name}, which is no backend"))
}

/// TCP through the Service and closed, then straight to the same backend from the same
/// port; then one of each alive at once; then direct connections first.
fn tcp_cases(caller: &Netns, vip: Ipv4Addr, backends: &[Pod], tcp_port: u16) -> Result<()> {
    let pod_address = |name: &str| pod_address(backends, name);
    let mut service = caller.tcp_connect_from(TCP_CLOSED, vip, SERVICE_TCP_PORT, TIMEOUT)?;
    let pod = service.request()?;
    drop(service);
    let backend = pod_address(&pod)?;
    // Both sides' FINs (the echo server closes when the client does) end the flow.
    std::thread::sleep(Duration::from_millis(200));
    let mut direct = caller
        .tcp_connect_from(TCP_CLOSED, backend, tcp_port, TIMEOUT)
        .context("a direct connection after a closed Service connection, same source port")?;
    ensure!(direct.request()? == pod, "answered by another pod");
    ensure!(
        direct.peer()? == SocketAddr::V4(SocketAddrV4::new(backend, tcp_port)),
        "the direct connection is not to the pod"
    );
    direct.reset_on_close()?;
    drop(direct);

    let mut service = caller.tcp_connect_from(TCP_ALIVE, vip, SERVICE_TCP_PORT, TIMEOUT)?;
    let pod = service.request()?;
    let backend = pod_address(&pod)?;
    let mut direct = caller
        .tcp_connect_from(TCP_ALIVE, backend, tcp_port, TIMEOUT)
        .context("a direct connection beside a live Service connection, same source port")?;
    for round in 0..3 {
        ensure!(direct.request()? == pod, "direct, round {round}");
        ensure!(
            service.request()? == pod,
            "through the Service, round {round}"
        );
    }
    for session in [&service, &direct] {
        session.reset_on_close()?;
    }
    drop((service, direct));

    // A direct connection to every backend from one port, then the Service from it: its
    // backend is one of theirs, so its reply tuple is taken and it gets another port.
    let mut directs = Vec::new();
    for pod in backends {
        let mut direct = caller.tcp_connect_from(TCP_DIRECT_FIRST, pod.ip, tcp_port, TIMEOUT)?;
        ensure!(direct.request()? == pod.name);
        directs.push(direct);
    }
    let mut service = caller
        .tcp_connect_from(TCP_DIRECT_FIRST, vip, SERVICE_TCP_PORT, TIMEOUT)
        .context("a Service connection beside live direct ones, same source port")?;
    let pod = service.request()?;
    for (direct, pod) in directs.iter_mut().zip(backends) {
        let name = &pod.name;
        ensure!(
            direct.request()? == *name,
            "{name} after the Service connection opened"
        );
    }
    ensure!(service.request()? == pod);
    for session in directs.iter().chain([&service]) {
        session.reset_on_close()?;
    }
    Ok(())
}

/// `dig -b caller#port @vip`, then `@backend` from the same port while the Service flow
/// lives, then the Service again: every answer from the address it was sent to.
fn udp_case(caller: &Netns, vip: Ipv4Addr, backends: &[Pod], udp_port: u16) -> Result<()> {
    let pod_address = |name: &str| pod_address(backends, name);
    let socket = caller.udp_socket_from(UDP_PORT, TIMEOUT)?;
    let service = udp_exchange(&socket, vip, SERVICE_UDP_PORT)?;
    ensure!(service.peer == SocketAddr::V4(SocketAddrV4::new(vip, SERVICE_UDP_PORT)));
    let backend = pod_address(&service.body)?;
    for round in 0..3 {
        let direct = udp_exchange(&socket, backend, udp_port)
            .with_context(|| format!("direct query {round} from the Service flow's port"))?;
        ensure!(
            direct.peer == SocketAddr::V4(SocketAddrV4::new(backend, udp_port)),
            "the direct answer came from {}, not the pod",
            direct.peer
        );
        ensure!(direct.body == service.body);
        let again = udp_exchange(&socket, vip, SERVICE_UDP_PORT)?;
        ensure!(again.peer == service.peer && again.body == service.body);
    }
    Ok(())
}

#[test]
fn direct_flows_from_a_service_flows_port_reach_the_pod_itself() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    // Two backends, so the direct-first case can hold a connection to each.
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(&lab.pods()[..2]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let caller = &lab.pod(4).ns;
    let backends = &lab.pods()[..2];
    tcp_cases(caller, addr::CLUSTER_IP, backends, lab.tcp_port())?;
    udp_case(caller, addr::CLUSTER_IP, backends, lab.udp_port())
}

#[test]
fn across_nodes_the_callers_node_keeps_direct_flows_apart() -> Result<()> {
    require_lab!();
    let cluster = Cluster::builder().pods_per_node(&[1, 2]).build()?;
    let backends: Vec<Endpoint> = cluster
        .node(2)
        .pods()
        .iter()
        .map(|pod| Endpoint::of(pod).on_node(&cluster.node(2).name))
        .collect();
    let service = echo_service();
    let daemons = (1..=2)
        .map(|k| {
            cluster
                .daemon(k)
                .manifest(service.manifest_with(&backends))
                .start()
        })
        .collect::<Result<Vec<_>>>()?;
    for daemon in &daemons {
        daemon.wait_synced(SYNC_TIMEOUT)?;
    }
    let caller = &cluster.node(1).pod(1).ns;
    let backends = cluster.node(2).pods();
    tcp_cases(caller, addr::CLUSTER_IP, backends, addr::ECHO_TCP_PORT)?;
    udp_case(caller, addr::CLUSTER_IP, backends, addr::ECHO_UDP_PORT)
}
