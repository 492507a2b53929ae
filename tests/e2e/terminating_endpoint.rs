//! A terminating endpoint (ready false, serving true, terminating true) gets no new
//! connections while other endpoints are ready, but its open connection keeps working;
//! when it is the only one left it gets new connections again (kube-proxy's
//! serving-terminating fallback).

mod common;

use std::time::Instant;

use anyhow::{Result, bail, ensure};
use common::{
    BACKEND_NAMES, GIVE_UP, SERVICE_TCP_PORT, backends, caller, daemon_with_echo, echo_service,
    served_by, until_avoided,
};
use proxy_lab::{Endpoint, Pod, addr, require_lab};

#[test]
fn terminating_endpoint_keeps_its_connection_but_gets_no_new_ones() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let mut session = caller(&lab).tcp_session(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    let terminating_name = session.request()?;
    ensure!(
        BACKEND_NAMES.contains(&terminating_name.as_str()),
        "answered by {terminating_name:?}"
    );
    let is_terminating = |pod: &Pod| pod.name == terminating_name;
    let endpoints: Vec<Endpoint> = backends(&lab)
        .iter()
        .map(|pod| {
            if is_terminating(pod) {
                Endpoint::of(pod).terminating()
            } else {
                Endpoint::of(pod)
            }
        })
        .collect();
    daemon.apply(&echo_service().manifest_with(&endpoints))?;

    // New connections stop reaching it once the daemon has synced; the open one keeps
    // answering from it all along.
    let changed = Instant::now();
    until_avoided(&lab, &terminating_name, changed, || {
        let answer = session.request()?;
        ensure!(
            answer == terminating_name,
            "the open connection moved from {terminating_name} to {answer}"
        );
        Ok(())
    })?;
    println!(
        "{terminating_name} got no new connection after {:?}; its open one kept working",
        changed.elapsed()
    );

    // Only the terminating endpoint left: it serves new connections again.
    let terminating_only: Vec<Endpoint> = backends(&lab)
        .iter()
        .filter(|pod| is_terminating(pod))
        .map(|pod| Endpoint::of(pod).terminating())
        .collect();
    daemon.apply(&echo_service().manifest_with(&terminating_only))?;
    let changed = Instant::now();
    while served_by(&lab)? != terminating_name {
        if changed.elapsed() > GIVE_UP {
            bail!("{terminating_name}, the last endpoint, got no new connection in {GIVE_UP:?}");
        }
    }
    ensure!(session.request()? == terminating_name);
    Ok(())
}
