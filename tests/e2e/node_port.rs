//! outside client → nodeIP:nodePort: a backend answers, and the answer comes from the
//! node address and node port; with tc alone and with the XDP program in front of it.

mod common;

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends};
use proxy_lab::{Lab, Service, addr, require_lab};

/// Runs `requests` (ten, from the outside client to the NodePort) in a fresh lab with
/// tc alone and again with the XDP program in front of it; each answer comes from a backend
/// and, `via` the frontend, carries its address as the source.
fn ten_requests_with_and_without_xdp(
    request: impl Fn(&Lab) -> Result<proxy_lab::Reply>,
    via: Option<SocketAddr>,
) -> Result<()> {
    for xdp in ["off", "native"] {
        let lab = common::lab()?;
        let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
            .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
            .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
        let daemon = lab
            .daemon()
            .manifest(service.manifest(backends(&lab)))
            .args(["--xdp", xdp])
            .start()?;
        daemon.wait_synced(SYNC_TIMEOUT)?;
        for _ in 0..10 {
            let reply = request(&lab)?;
            ensure!(
                BACKEND_NAMES.contains(&reply.body.as_str()),
                "--xdp {xdp}: answered by {reply:?}"
            );
            if let Some(frontend) = via {
                ensure!(
                    reply.peer == frontend,
                    "--xdp {xdp}: reply came from {} instead of {frontend}",
                    reply.peer
                );
            }
        }
    }
    Ok(())
}

#[test]
fn client_reaches_node_port_over_tcp() -> Result<()> {
    require_lab!();
    ten_requests_with_and_without_xdp(
        |lab| lab.client().tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP),
        None,
    )
}

#[test]
fn client_reaches_node_port_over_udp_and_the_reply_comes_from_the_node() -> Result<()> {
    require_lab!();
    ten_requests_with_and_without_xdp(
        |lab| lab.client().udp_request(addr::NODE_IP, addr::NODE_PORT_UDP),
        Some(SocketAddr::V4(SocketAddrV4::new(
            addr::NODE_IP,
            addr::NODE_PORT_UDP,
        ))),
    )
}
