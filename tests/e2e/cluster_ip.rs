//! pod → ClusterIP: a backend answers, and the answer comes from the VIP.

mod common;

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, caller, daemon_with_echo};
use proxy_lab::{addr, require_lab};

#[test]
fn pod_reaches_cluster_ip_over_tcp() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    let vip = SocketAddr::V4(SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_TCP_PORT));
    for _ in 0..10 {
        let reply = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(
            BACKEND_NAMES.contains(&reply.body.as_str()),
            "answered by {reply:?}"
        );
        ensure!(
            reply.peer == vip,
            "connected to {} instead of {vip}",
            reply.peer
        );
    }
    Ok(())
}

#[test]
fn pod_reaches_cluster_ip_over_udp_and_the_reply_comes_from_the_vip() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    let vip = SocketAddr::V4(SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_UDP_PORT));
    for _ in 0..10 {
        let reply = caller(&lab).udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(
            BACKEND_NAMES.contains(&reply.body.as_str()),
            "answered by {reply:?}"
        );
        ensure!(
            reply.peer == vip,
            "reply came from {} instead of {vip}",
            reply.peer
        );
    }
    Ok(())
}
