//! outside client → nodeIP:nodePort: a backend answers, and the answer comes from the
//! node address and node port; with tc alone and with the XDP program in front of it.

mod common;

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends};
use proxy_lab::{Daemon, Lab, Service, addr, require_lab};

/// The `--xdp` modes each test runs with.
const XDP_MODES: [&str; 2] = ["off", "native"];

fn daemon_with_node_port<'lab>(lab: &'lab Lab, xdp: &str) -> Result<Daemon<'lab>> {
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(lab)))
        .args(["--xdp", xdp])
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

#[test]
fn client_reaches_node_port_over_tcp() -> Result<()> {
    require_lab!();
    for xdp in XDP_MODES {
        let lab = common::lab()?;
        let _daemon = daemon_with_node_port(&lab, xdp)?;
        for _ in 0..10 {
            let reply = lab
                .client()
                .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
            ensure!(
                BACKEND_NAMES.contains(&reply.body.as_str()),
                "--xdp {xdp}: answered by {reply:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn client_reaches_node_port_over_udp_and_the_reply_comes_from_the_node() -> Result<()> {
    require_lab!();
    let frontend = SocketAddr::V4(SocketAddrV4::new(addr::NODE_IP, addr::NODE_PORT_UDP));
    for xdp in XDP_MODES {
        let lab = common::lab()?;
        let _daemon = daemon_with_node_port(&lab, xdp)?;
        for _ in 0..10 {
            let reply = lab
                .client()
                .udp_request(addr::NODE_IP, addr::NODE_PORT_UDP)?;
            ensure!(
                BACKEND_NAMES.contains(&reply.body.as_str()),
                "--xdp {xdp}: answered by {reply:?}"
            );
            ensure!(
                reply.peer == frontend,
                "--xdp {xdp}: reply came from {} instead of {frontend}",
                reply.peer
            );
        }
    }
    Ok(())
}
