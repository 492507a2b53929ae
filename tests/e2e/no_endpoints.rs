//! A Service without endpoints refuses at once, as kube-proxy's REJECT rule does: a TCP
//! connect fails with "connection refused" and a connected UDP socket gets the ICMP port
//! unreachable, both well under 100 ms (a drop would leave the client waiting for its
//! timeout). From a pod to the ClusterIP and from outside to the NodePort; another Service
//! keeps working.

mod common;

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{
    BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, caller, echo_service,
};
use proxy_lab::{Netns, Service, addr, require_lab};

/// VIP and node ports of the Service without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
const EMPTY_NODE_PORT_TCP: u16 = 30081;
const EMPTY_NODE_PORT_UDP: u16 = 30054;
const REFUSAL_LIMIT: Duration = Duration::from_millis(100);
/// What the client would wait for if the packet were dropped instead.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Asserts that a TCP connect from `from` to `addr:port` is refused within the limit.
fn assert_tcp_refused(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<Duration> {
    let started = Instant::now();
    let result = from.tcp_connect(addr, port, CLIENT_TIMEOUT);
    let elapsed = started.elapsed();
    match result {
        Ok(_) => bail!("TCP to {addr}:{port} connected"),
        Err(error) => ensure!(
            error.kind() == ErrorKind::ConnectionRefused,
            "TCP to {addr}:{port} was not refused but failed after {elapsed:?}: {error}"
        ),
    }
    ensure!(
        elapsed < REFUSAL_LIMIT,
        "TCP to {addr}:{port} was refused only after {elapsed:?}"
    );
    println!("TCP {} → {addr}:{port} refused in {elapsed:?}", from.name());
    Ok(elapsed)
}

/// Asserts that a datagram from `from` to `addr:port` is refused within the limit.
fn assert_udp_refused(from: &Netns, addr: Ipv4Addr, port: u16) -> Result<Duration> {
    let flow = from.udp_flow(addr, port, CLIENT_TIMEOUT)?;
    let started = Instant::now();
    let result = flow.request();
    let elapsed = started.elapsed();
    match result {
        Ok(answer) => bail!("UDP to {addr}:{port} was answered by {answer}"),
        Err(error) => ensure!(
            error.kind() == ErrorKind::ConnectionRefused,
            "UDP to {addr}:{port} was not refused but failed after {elapsed:?}: {error}"
        ),
    }
    ensure!(
        elapsed < REFUSAL_LIMIT,
        "UDP to {addr}:{port} was refused only after {elapsed:?}"
    );
    println!("UDP {} → {addr}:{port} refused in {elapsed:?}", from.name());
    Ok(elapsed)
}

#[test]
fn service_without_endpoints_refuses_at_once_while_another_works() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let empty = Service::node_port("empty", EMPTY_VIP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, EMPTY_NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, EMPTY_NODE_PORT_UDP);
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .manifest(empty.manifest([]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    assert_tcp_refused(caller(&lab), EMPTY_VIP, SERVICE_TCP_PORT)?;
    assert_udp_refused(caller(&lab), EMPTY_VIP, SERVICE_UDP_PORT)?;
    assert_tcp_refused(lab.client(), addr::NODE_IP, EMPTY_NODE_PORT_TCP)?;
    assert_udp_refused(lab.client(), addr::NODE_IP, EMPTY_NODE_PORT_UDP)?;

    let working = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(
        BACKEND_NAMES.contains(&working.body.as_str()),
        "answered by {working:?}"
    );
    Ok(())
}
