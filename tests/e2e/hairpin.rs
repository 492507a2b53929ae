//! Hairpin: a pod reaching a Service whose only endpoint is itself gets its own answer.
//! Its packets come back to it with the frontend address as source (kube-proxy masquerades
//! them), since a packet carrying its own address as source would be dropped as a martian.

mod common;

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT};
use proxy_lab::{Lab, Service, addr, require_lab};

/// Enough rounds that a flow which only worked for its first packet would show.
const CONNECTIONS: usize = 10;

#[test]
fn a_pod_reaches_itself_through_its_cluster_ip_and_node_port() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(2).build()?;
    let service = Service::node_port("echo", addr::CLUSTER_IP)
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
            (addr::CLUSTER_IP, SERVICE_TCP_PORT),
            (addr::NODE_IP, addr::NODE_PORT_TCP),
        ] {
            let mut session = pod.tcp_session(address, port)?;
            for round in 0..3 {
                let body = session.request()?;
                ensure!(body == "pod-1", "{address}:{port} round {round}: {body:?}");
            }
        }
        let reply = pod.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(reply.body == "pod-1", "UDP answered {reply:?}");
        let vip = SocketAddr::V4(SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_UDP_PORT));
        ensure!(reply.peer == vip, "UDP answer from {}", reply.peer);
    }
    // Another pod still reaches it with its own address, untouched.
    let reply = lab
        .pod(2)
        .ns
        .tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(reply.body == "pod-1", "pod-2 got {reply:?}");
    Ok(())
}
