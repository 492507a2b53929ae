//! sessionAffinity ClientIP: every new connection of a client reaches the backend of its
//! previous one while they come within timeoutSeconds of each other; once the client has
//! been quiet for longer, the next connection is balanced anew.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, caller};
use proxy_lab::{Daemon, Lab, Service, addr, require_lab};

const CONNECTIONS: usize = 30;
/// The short timeout of the expiry test, and how long the client stays quiet to outlast it.
const SHORT_TIMEOUT_SECONDS: u32 = 2;
const QUIET: Duration = Duration::from_millis(2_500);
/// Each quiet spell ends in a fresh choice, which keeps the old backend with probability
/// 1/3: twelve spells all keep it with probability (1/3)^12 ≈ 2e-6.
const QUIET_SPELLS: usize = 12;

fn start(lab: &Lab, timeout_seconds: u32) -> Result<Daemon<'_>> {
    let service = common::echo_service().client_ip_affinity(timeout_seconds);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

fn tcp_served_by(lab: &Lab) -> Result<String> {
    Ok(caller(lab)
        .tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?
        .body)
}

#[test]
fn a_client_keeps_its_backend_across_new_connections() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(&lab, 10_800)?;
    let tcp: BTreeSet<String> = (0..CONNECTIONS)
        .map(|_| tcp_served_by(&lab))
        .collect::<Result<_>>()?;
    ensure!(tcp.len() == 1, "new TCP connections reached {tcp:?}");
    // Every request from a new socket: a new UDP flow each time.
    let udp: BTreeSet<String> = (0..CONNECTIONS)
        .map(|_| {
            caller(&lab)
                .udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)
                .map(|reply| reply.body)
        })
        .collect::<Result<_>>()?;
    ensure!(udp.len() == 1, "new UDP flows reached {udp:?}");
    for served in tcp.iter().chain(&udp) {
        ensure!(
            BACKEND_NAMES.contains(&served.as_str()),
            "served by {served}"
        );
    }
    Ok(())
}

/// kube-proxy's ClusterIP and NodePort rules jump to one KUBE-SVC chain with one `recent`
/// list per endpoint: a client's backend is the same through either.
#[test]
fn the_frontends_of_a_service_port_share_a_clients_backend() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .client_ip_affinity(10_800);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let frontends = [
        (addr::NODE_PORT_SERVICE_IP, SERVICE_TCP_PORT),
        (addr::NODE_IP, addr::NODE_PORT_TCP),
    ];
    let served: BTreeSet<String> = (0..CONNECTIONS)
        .map(|index| {
            let (address, port) = frontends[index % frontends.len()];
            caller(&lab)
                .tcp_request(address, port)
                .map(|reply| reply.body)
        })
        .collect::<Result<_>>()?;
    ensure!(
        served.len() == 1,
        "through the ClusterIP and the NodePort the client reached {served:?}"
    );
    Ok(())
}

#[test]
fn after_the_timeout_a_new_backend_can_be_chosen() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(&lab, SHORT_TIMEOUT_SECONDS)?;
    let first = tcp_served_by(&lab)?;
    for _ in 0..CONNECTIONS {
        let next = tcp_served_by(&lab)?;
        ensure!(
            next == first,
            "within the timeout {first} was left for {next}"
        );
    }
    for spell in 1..=QUIET_SPELLS {
        std::thread::sleep(QUIET);
        let next = tcp_served_by(&lab)?;
        if next != first {
            println!("after {spell} quiet spell(s) of {QUIET:?} the client moved to {next}");
            return Ok(());
        }
    }
    bail!("after {QUIET_SPELLS} quiet spells of {QUIET:?} the client still reached only {first}")
}
