//! `loadBalancerSourceRanges`: the outside client (198.18.0.2) reaches the load-balancer IP
//! of a Service whose ranges contain it, and is dropped (times out) at one whose ranges do
//! not; the restricted Service's externalIP stays open, as in kube-proxy, which applies the
//! ranges to load-balancer IPs only.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SYNC_TIMEOUT, backends};
use proxy_lab::{Lab, Service, addr, is_timeout, require_lab};

/// A second load-balancer IP, reached like [`addr::LOAD_BALANCER_IP`].
const CLOSED_LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 2);
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
    match lab
        .client()
        .tcp_connect(CLOSED_LOAD_BALANCER_IP, SERVICE_TCP_PORT, DROP_WAIT)
    {
        Ok(_) => bail!("a client outside the source ranges connected"),
        Err(error) => ensure!(
            is_timeout(&error),
            "the connection was not dropped but failed: {error}"
        ),
    }
    Ok(())
}
