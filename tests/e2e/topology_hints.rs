//! Topology hints: with the node's zone given (`--node-zone`, standalone mode), new
//! connections to a ClusterIP reach only the endpoints hinted for that zone; endpoints
//! hinted for another zone get none. Without a zone, every endpoint is used.

mod common;

use std::collections::BTreeSet;

use anyhow::{Result, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, echo_service};
use proxy_lab::{Daemon, Endpoint, Lab, addr, require_lab};

const ZONE: &str = "zone-a";
/// With three backends, 30 new connections all reach one with probability 3 · (1/3)^30.
const CONNECTIONS: usize = 30;

/// pod-1 hinted for this node's zone, the others for another zone.
fn start<'lab>(lab: &'lab Lab, node_zone: Option<&str>) -> Result<Daemon<'lab>> {
    let endpoints: Vec<Endpoint> = backends(lab)
        .iter()
        .enumerate()
        .map(|(index, pod)| Endpoint::of(pod).for_zone(if index == 0 { ZONE } else { "zone-b" }))
        .collect();
    let mut daemon = lab
        .daemon()
        .manifest(echo_service().manifest_with(&endpoints));
    if let Some(zone) = node_zone {
        daemon = daemon.arg("--node-zone").arg(zone);
    }
    let daemon = daemon.start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

fn served(lab: &Lab) -> Result<BTreeSet<String>> {
    (0..CONNECTIONS)
        .map(|_| {
            caller(lab)
                .tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)
                .map(|reply| reply.body)
        })
        .collect()
}

#[test]
fn connections_stay_in_the_nodes_zone() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(&lab, Some(ZONE))?;
    let served = served(&lab)?;
    ensure!(
        served == BTreeSet::from(["pod-1".to_owned()]),
        "served by {served:?}"
    );
    Ok(())
}

#[test]
fn a_node_without_a_zone_uses_every_endpoint() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(&lab, None)?;
    let served = served(&lab)?;
    ensure!(served.len() == 3, "served by {served:?}");
    Ok(())
}
