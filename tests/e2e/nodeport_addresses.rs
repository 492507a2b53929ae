//! `--nodeport-addresses` as kube-proxy takes it: CIDRs of both families (each family
//! follows its own CIDRs only), and healthCheckNodePorts that
//! listen on the node addresses inside the CIDRs, loopback included — or, when none is
//! inside, nowhere, and the log says so instead of claiming a bind.

mod common;

use std::io::ErrorKind;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, health_check};
use proxy_lab::{Daemon, Lab, Netns, Service, addr, require_lab};

/// The Service's `healthCheckNodePort`.
const HEALTH_CHECK_NODE_PORT: u16 = 32001;

/// A LoadBalancer Service with externalTrafficPolicy Local over the three local pods: it
/// has a NodePort and a healthCheckNodePort.
fn local_lb() -> Service {
    Service::load_balancer(
        "echo-lb",
        addr::NODE_PORT_SERVICE_IP,
        addr::LOAD_BALANCER_IP,
    )
    .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
    .external_traffic_policy_local()
    .health_check_node_port(HEALTH_CHECK_NODE_PORT)
}

fn start<'lab>(lab: &'lab Lab, nodeport_addresses: &str) -> Result<Daemon<'lab>> {
    let daemon = lab
        .daemon()
        .manifest(local_lb().manifest(backends(lab)))
        .arg(format!("--nodeport-addresses={nodeport_addresses}"))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

/// Whether `address:port` refuses a connection from `ns` (nothing listens there).
fn refused(ns: &Netns, address: std::net::Ipv4Addr, port: u16) -> bool {
    matches!(
        ns.tcp_connect(address, port, Duration::from_secs(2)),
        Err(error) if error.kind() == ErrorKind::ConnectionRefused
    )
}

#[test]
fn a_loopback_range_serves_the_health_check_on_loopback_beside_an_ipv6_range() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    // The IPv6 range holds no node address: IPv6 is served nowhere, IPv4 on loopback.
    let daemon = start(&lab, "127.0.0.0/8,2001:db8:ffff::/64")?;
    let log = daemon.log();
    ensure!(
        log.contains("health check listening") && log.contains("addresses=[127.0.0.1]"),
        "no line naming the loopback listener:\n{log}"
    );

    let (code, local_endpoints) = health_check(
        lab.node(),
        std::net::Ipv4Addr::LOCALHOST,
        HEALTH_CHECK_NODE_PORT,
    )?;
    ensure!(
        code == 200 && local_endpoints == 3,
        "{code}, {local_endpoints}"
    );
    // Only the addresses inside the CIDRs: not the node's external one, and no NodePort
    // there either (loopback NodePorts are not programmed: the program sees no loopback
    // traffic).
    ensure!(refused(lab.node(), addr::NODE_IP, HEALTH_CHECK_NODE_PORT));
    ensure!(refused(lab.client(), addr::NODE_IP, addr::NODE_PORT_TCP));
    Ok(())
}

#[test]
fn an_ipv4_range_next_to_an_ipv6_one_serves_node_ports_and_health_checks_there() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(&lab, "2001:db8:ffff::/64,198.18.0.0/24")?;
    let (code, local_endpoints) =
        health_check(lab.client(), addr::NODE_IP, HEALTH_CHECK_NODE_PORT)?;
    ensure!(
        code == 200 && local_endpoints == 3,
        "{code}, {local_endpoints}"
    );
    lab.client()
        .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
    ensure!(refused(
        lab.node(),
        std::net::Ipv4Addr::LOCALHOST,
        HEALTH_CHECK_NODE_PORT
    ));
    Ok(())
}

#[test]
fn no_matching_address_serves_no_health_check_and_says_so() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    // A range of each family (a family without one would be unrestricted: the lab's node
    // has IPv6 addresses).
    let daemon = start(&lab, "203.0.113.0/24,2001:db8:ffff::/64")?;
    let log = daemon.log();
    ensure!(
        log.contains("health check not served: no node address is inside --nodeport-addresses"),
        "{log}"
    );
    ensure!(!log.contains("health check listening"), "{log}");
    ensure!(refused(lab.node(), addr::NODE_IP, HEALTH_CHECK_NODE_PORT));
    Ok(())
}
