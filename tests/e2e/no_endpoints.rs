//! A Service without endpoints drops its traffic (the connection attempt times out rather
//! than being refused or routed), while another Service keeps working.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{
    BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, caller, echo_service,
};
use proxy_lab::{Service, addr, is_timeout, require_lab};

/// VIP of the Service without endpoints.
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 12);
/// Long enough that a dropped SYN (first retransmit after 1 s) is clearly dropped.
const DROP_WAIT: Duration = Duration::from_millis(1500);

#[test]
fn service_without_endpoints_drops_while_another_works() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let empty = Service::cluster_ip("empty", EMPTY_VIP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .manifest(empty.manifest([]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    let tcp = caller(&lab).tcp_connect(EMPTY_VIP, SERVICE_TCP_PORT, DROP_WAIT);
    match tcp {
        Ok(_) => anyhow::bail!("TCP to a Service without endpoints connected"),
        Err(error) => ensure!(
            is_timeout(&error),
            "TCP was not dropped but failed: {error}"
        ),
    }
    // An unconnected UDP socket hears no ICMP errors, so for UDP only "no answer" is
    // checked; the TCP check above is the one that tells a drop from an unreachable route.
    let udp = caller(&lab).udp_request_within(EMPTY_VIP, SERVICE_UDP_PORT, DROP_WAIT);
    match udp {
        Ok(reply) => anyhow::bail!("UDP to a Service without endpoints answered: {reply:?}"),
        Err(error) => ensure!(
            is_timeout(&error),
            "UDP was not dropped but failed: {error}"
        ),
    }

    let working = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(
        BACKEND_NAMES.contains(&working.body.as_str()),
        "answered by {working:?}"
    );
    Ok(())
}
