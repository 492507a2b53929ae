//! Hairpin: a pod reaching a Service whose only endpoint is itself gets its own answer.
//! Its packets come back to it with the frontend address as source (kube-proxy masquerades
//! them), since a packet carrying its own address as source would be dropped as a martian.
//! Both families: an IPv4 Service through its ClusterIP and the node's IPv4 NodePort, a
//! single-stack IPv6 one through its IPv6 ClusterIP and the node's IPv6 address.

mod common;

use std::net::{IpAddr, SocketAddr};

use anyhow::{Result, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT};
use proxy_lab::{Lab, Service, addr, require_lab};

/// Enough rounds that a flow which only worked for its first packet would show.
const CONNECTIONS: usize = 10;

#[test]
fn a_pod_reaches_itself_through_its_cluster_ip_and_node_port() -> Result<()> {
    require_lab!();
    reaches_itself(addr::CLUSTER_IP.into(), addr::NODE_IP.into())
}

#[test]
fn a_pod_reaches_itself_over_ipv6_through_its_cluster_ip_and_node_port() -> Result<()> {
    require_lab!();
    reaches_itself(addr::CLUSTER_IPV6.into(), addr::NODE_IPV6.into())
}

/// pod-1 is the only endpoint of a Service at `cluster_ip` (a NodePort one, on the node's
/// `node_ip`): it reaches itself through both, over TCP and UDP, and pod-2 reaches it too.
fn reaches_itself(cluster_ip: IpAddr, node_ip: IpAddr) -> Result<()> {
    let lab = Lab::builder().pods(2).build()?;
    let service = Service::node_port("echo", cluster_ip)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest([lab.pod(1)]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let pod = &lab.pod(1).ns;

    for _ in 0..CONNECTIONS {
        for (address, port) in [
            (cluster_ip, SERVICE_TCP_PORT),
            (node_ip, addr::NODE_PORT_TCP),
        ] {
            let mut session = pod.tcp_session(address, port)?;
            for round in 0..3 {
                let body = session.request()?;
                ensure!(body == "pod-1", "{address}:{port} round {round}: {body:?}");
            }
        }
        let reply = pod.udp_request(cluster_ip, SERVICE_UDP_PORT)?;
        ensure!(reply.body == "pod-1", "UDP answered {reply:?}");
        let vip = SocketAddr::new(cluster_ip, SERVICE_UDP_PORT);
        ensure!(reply.peer == vip, "UDP answer from {}", reply.peer);
    }
    // Another pod still reaches it with its own address, untouched.
    let reply = lab.pod(2).ns.tcp_request(cluster_ip, SERVICE_TCP_PORT)?;
    ensure!(reply.body == "pod-1", "pod-2 got {reply:?}");
    Ok(())
}
