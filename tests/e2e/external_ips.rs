//! A LoadBalancer Service's ingress IP (`status.loadBalancer.ingress`) and its external IP
//! (`spec.externalIPs`) are reachable from the outside client, over TCP and UDP, and UDP
//! answers come from the address the client sent to. The client reaches both through its
//! default route via the node; neither address is configured anywhere.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends};
use proxy_lab::{Lab, Service, addr, require_lab};

const REQUESTS: usize = 10;

fn check_reachable(lab: &Lab, ip: Ipv4Addr) -> Result<()> {
    let frontend = SocketAddr::V4(SocketAddrV4::new(ip, SERVICE_UDP_PORT));
    for _ in 0..REQUESTS {
        let tcp = lab.client().tcp_request(ip, SERVICE_TCP_PORT)?;
        ensure!(
            BACKEND_NAMES.contains(&tcp.body.as_str()),
            "{ip} TCP answered by {tcp:?}"
        );
        let udp = lab.client().udp_request(ip, SERVICE_UDP_PORT)?;
        ensure!(
            BACKEND_NAMES.contains(&udp.body.as_str()),
            "{ip} UDP answered by {udp:?}"
        );
        ensure!(
            udp.peer == frontend,
            "UDP answer came from {} instead of {frontend}",
            udp.peer
        );
    }
    Ok(())
}

#[test]
fn load_balancer_and_external_ips_are_reachable_from_outside() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::load_balancer("echo-lb", addr::CLUSTER_IP, addr::LOAD_BALANCER_IP)
        .external_ip(addr::EXTERNAL_IP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    check_reachable(&lab, addr::LOAD_BALANCER_IP)?;
    check_reachable(&lab, addr::EXTERNAL_IP)
}
