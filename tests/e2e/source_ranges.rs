//! `loadBalancerSourceRanges`: the outside client (198.18.0.2) reaches the load-balancer IP
//! of a Service whose ranges contain it, and is dropped (times out) at one whose ranges do
//! not; the restricted Service's externalIP stays open, as in kube-proxy, which applies the
//! ranges to load-balancer IPs only. When a range holds the node's address, a client whose
//! source is one of the Service's load-balancer IPs is admitted too (kube-proxy's
//! `allowFromNode`: a node's request to a VIP configured on it loops back from the VIP).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SYNC_TIMEOUT, backends};
use proxy_lab::{Lab, Service, addr, is_timeout, require_lab};

/// A second load-balancer IP, reached like [`addr::LOAD_BALANCER_IP`].
const CLOSED_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 2);
/// The two load-balancer IPs of a Service whose only range is the node's address: the
/// client connects to the first, from the second.
const NODE_RANGE_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 3);
const NODE_RANGE_SECOND_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 4);
/// That Service's cluster IP.
const NODE_RANGE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);
/// Enough that a range check that let some SYNs through would show.
const CONNECTIONS: usize = 10;
/// Long enough that a dropped SYN (first retransmit after 1 s) is clearly dropped.
const DROP_WAIT: Duration = Duration::from_millis(1500);

fn reachable(lab: &Lab, ip: Ipv4Addr) -> Result<()> {
    for _ in 0..CONNECTIONS {
        let reply = lab.client().tcp_request(ip, SERVICE_TCP_PORT)?;
        ensure!(
            BACKEND_NAMES.contains(&reply.body.as_str()),
            "{ip} answered by {reply:?}"
        );
    }
    Ok(())
}

fn dropped(lab: &Lab, ip: Ipv4Addr) -> Result<()> {
    match lab.client().tcp_connect(ip, SERVICE_TCP_PORT, DROP_WAIT) {
        Ok(_) => bail!("a client outside the source ranges connected to {ip}"),
        Err(error) => ensure!(
            is_timeout(&error),
            "the connection to {ip} was not dropped but failed: {error}"
        ),
    }
    Ok(())
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_others() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let open = Service::load_balancer("open-lb", addr::CLUSTER_IP, addr::LOAD_BALANCER_IP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .load_balancer_source_ranges(&["198.18.0.0/24"]);
    let closed = Service::load_balancer(
        "closed-lb",
        addr::NODE_PORT_SERVICE_IP,
        CLOSED_LOAD_BALANCER_IP,
    )
    .external_ip(addr::EXTERNAL_IP)
    .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
    .load_balancer_source_ranges(&["198.18.5.0/24", "203.0.113.0/24"]);
    let daemon = lab
        .daemon()
        .manifest(open.manifest(backends(&lab)))
        .manifest(closed.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    reachable(&lab, addr::LOAD_BALANCER_IP)?;
    reachable(&lab, addr::EXTERNAL_IP)?;
    dropped(&lab, CLOSED_LOAD_BALANCER_IP)
}

/// A Service whose only range is the node's own address (written with leading zeros, as
/// kube-proxy reads them): the client (198.18.0.2, outside it) is dropped, but the same
/// client sending from the Service's other load-balancer IP is admitted — the datapath's
/// trie holds the range and both load-balancer IPs.
#[test]
fn a_range_holding_the_node_admits_the_load_balancer_ips_as_sources() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::load_balancer(
        "node-range-lb",
        NODE_RANGE_CLUSTER_IP,
        NODE_RANGE_LOAD_BALANCER_IP,
    )
    .ingress_ip(NODE_RANGE_SECOND_LOAD_BALANCER_IP)
    .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
    .load_balancer_source_ranges(&["198.018.000.001/032"]);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    dropped(&lab, NODE_RANGE_LOAD_BALANCER_IP)?;

    // The client takes the second load-balancer IP as its source towards the first (a
    // /32 of its own and a route with that source); the node routes replies back to it.
    let source = NODE_RANGE_SECOND_LOAD_BALANCER_IP.to_string();
    let target = format!("{NODE_RANGE_LOAD_BALANCER_IP}/32");
    lab.client()
        .ip(&["addr", "add", &format!("{source}/32"), "dev", "eth0"])?;
    lab.client().ip(&[
        "route",
        "add",
        &target,
        "via",
        &addr::NODE_IP.to_string(),
        "src",
        &source,
    ])?;
    lab.node().ip(&[
        "route",
        "add",
        &format!("{source}/32"),
        "via",
        &addr::CLIENT_IP.to_string(),
    ])?;
    reachable(&lab, NODE_RANGE_LOAD_BALANCER_IP)
}
