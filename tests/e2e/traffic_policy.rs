//! Traffic policies `Local`: NodePort traffic with externalTrafficPolicy=Local and ClusterIP
//! traffic with internalTrafficPolicy=Local reach only endpoints on this node; the other
//! policy of the same Service still spreads over all. With no local endpoint the Local
//! frontends drop (time out, not refused), as kube-proxy does.
//!
//! Pods of this node are the exception (kube-proxy's "pod traffic for … external
//! destinations" rule): their connections to an externalTrafficPolicy Local NodePort use
//! every endpoint, local or not.
//!
//! In the EndpointSlice pod-1 runs on this node and pod-2, pod-3 on another one (their pods
//! still live in the lab, so Cluster-policy traffic reaches them).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller};
use proxy_lab::{Daemon, Endpoint, Lab, Service, addr, is_timeout, require_lab};

const OTHER_NODE: &str = "other-node";
/// With three backends, 30 new connections all reach one with probability 3 · (1/3)^30.
const CONNECTIONS: usize = 30;
/// Long enough that a dropped SYN (first retransmit after 1 s) is clearly dropped.
const DROP_WAIT: Duration = Duration::from_millis(1500);

/// pod-1 on this node, the other backends elsewhere (or all elsewhere).
fn endpoints(lab: &Lab, pod_1_local: bool) -> Vec<Endpoint> {
    backends(lab)
        .iter()
        .enumerate()
        .map(|(index, pod)| {
            let endpoint = Endpoint::of(pod);
            if index == 0 && pod_1_local {
                endpoint
            } else {
                endpoint.on_node(OTHER_NODE)
            }
        })
        .collect()
}

fn echo_node_port() -> Service {
    Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP).tcp_node_port(
        SERVICE_TCP_PORT,
        addr::ECHO_TCP_PORT,
        addr::NODE_PORT_TCP,
    )
}

fn start<'lab>(lab: &'lab Lab, service: &Service, pod_1_local: bool) -> Result<Daemon<'lab>> {
    let daemon = lab
        .daemon()
        .manifest(service.manifest_with(&endpoints(lab, pod_1_local)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

/// The backends that served `CONNECTIONS` new connections from the outside client to the
/// NodePort, and from pod-4 to the ClusterIP.
fn served(lab: &Lab) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut node_port = BTreeSet::new();
    let mut cluster_ip = BTreeSet::new();
    for _ in 0..CONNECTIONS {
        let reply = lab
            .client()
            .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
        node_port.insert(reply.body);
        let reply = caller(lab).tcp_request(addr::NODE_PORT_SERVICE_IP, SERVICE_TCP_PORT)?;
        cluster_ip.insert(reply.body);
    }
    Ok((node_port, cluster_ip))
}

fn all_backends() -> BTreeSet<String> {
    BACKEND_NAMES.iter().map(ToString::to_string).collect()
}

#[test]
fn external_traffic_policy_local_keeps_node_port_traffic_on_this_node() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(
        &lab,
        &echo_node_port().external_traffic_policy_local(),
        true,
    )?;
    let (node_port, cluster_ip) = served(&lab)?;
    ensure!(
        node_port == BTreeSet::from(["pod-1".to_owned()]),
        "NodePort served by {node_port:?}"
    );
    ensure!(
        cluster_ip == all_backends(),
        "ClusterIP served by {cluster_ip:?}"
    );
    Ok(())
}

#[test]
fn internal_traffic_policy_local_keeps_cluster_ip_traffic_on_this_node() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(
        &lab,
        &echo_node_port().internal_traffic_policy_local(),
        true,
    )?;
    let (node_port, cluster_ip) = served(&lab)?;
    ensure!(
        cluster_ip == BTreeSet::from(["pod-1".to_owned()]),
        "ClusterIP served by {cluster_ip:?}"
    );
    ensure!(
        node_port == all_backends(),
        "NodePort served by {node_port:?}"
    );
    Ok(())
}

#[test]
fn external_traffic_policy_local_without_local_endpoints_drops() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = start(
        &lab,
        &echo_node_port().external_traffic_policy_local(),
        false,
    )?;
    match lab
        .client()
        .tcp_connect(addr::NODE_IP, addr::NODE_PORT_TCP, DROP_WAIT)
    {
        Ok(_) => bail!("the NodePort connected without a local endpoint"),
        Err(error) => ensure!(
            is_timeout(&error),
            "the NodePort was not dropped but failed: {error}"
        ),
    }
    let reply = caller(&lab).tcp_request(addr::NODE_PORT_SERVICE_IP, SERVICE_TCP_PORT)?;
    ensure!(
        BACKEND_NAMES.contains(&reply.body.as_str()),
        "ClusterIP answered by {reply:?}"
    );
    Ok(())
}

/// The backends that served `CONNECTIONS` new connections from pod-4 to the NodePort.
fn served_to_a_pod_through_the_node_port(lab: &Lab) -> Result<BTreeSet<String>> {
    (0..CONNECTIONS)
        .map(|_| {
            caller(lab)
                .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)
                .map(|reply| reply.body)
        })
        .collect()
}

#[test]
fn pods_reach_a_local_policy_node_port_through_every_endpoint() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = echo_node_port().external_traffic_policy_local();
    let daemon = start(&lab, &service, true)?;
    let served = served_to_a_pod_through_the_node_port(&lab)?;
    ensure!(served == all_backends(), "a pod was served by {served:?}");

    // No local endpoint: outside clients are dropped (see above), pods still served.
    daemon.apply(&service.manifest_with(&endpoints(&lab, false)))?;
    daemon.wait_for_syncs(2, SYNC_TIMEOUT)?;
    let served = served_to_a_pod_through_the_node_port(&lab)?;
    ensure!(
        served == all_backends(),
        "without a local endpoint a pod was served by {served:?}"
    );
    Ok(())
}
