//! Endpoint churn under load (issue 14 item 1, issue 18 item 5), from both sources: a
//! Service scaled between 1 and 10 backends and its pods replaced, change after change,
//! while clients open TCP connections and send UDP queries continuously (a new socket
//! each; the queries from a few recurring ports, as a resolver's, with 16 000 older flows
//! in conntrack). Every connection and query is answered, and none by a pod that had left
//! the maps before it was opened (and came back in no set asked for before it ended). The
//! harness is `proxy_lab::churn`; the two tests differ only in how a set of endpoints
//! reaches the daemon: a rewritten manifest, or an EndpointSlice update through the test
//! API server to the daemon's kube-rs watcher.
//!
//! `EBPF_PROXY_ENDPOINT_CHANGES` sets the number of changes per source (default 1 000);
//! `cargo xtask soak` makes 10 000.

mod common;

use anyhow::{Context, Result};
use common::SYNC_TIMEOUT;
use proxy_lab::churn::{self, Churn, ChurnSettings};
use proxy_lab::fake_apiserver::{ApiServerInNetns, Kind};
use proxy_lab::{Lab, Pod, require_lab};

/// Changes per source in `cargo xtask test`.
const CHANGES: usize = 1_000;
/// Every change synced at once, and no periodic resync in between.
const SYNC_AT_ONCE: [&str; 4] = ["--min-sync-period", "0ms", "--resync-seconds", "3600"];

fn settings() -> ChurnSettings {
    let changes = std::env::var("EBPF_PROXY_ENDPOINT_CHANGES")
        .ok()
        .and_then(|changes| changes.parse().ok())
        .unwrap_or(CHANGES);
    ChurnSettings::with_changes(changes)
}

#[test]
fn churn_through_manifests_loses_no_connection_and_reaches_no_removed_pod() -> Result<()> {
    require_lab!();
    let settings = settings();
    let lab = Lab::builder().pods(settings.pods()).build()?;
    let mut churn = Churn::new(&lab, settings)?;
    let service = churn::service();
    let daemon = lab
        .daemon()
        .manifest(service.manifest(churn.current()))
        .args(["--manifests-poll-ms", "10"])
        .args(SYNC_AT_ONCE)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let report = churn.run(&daemon, |pods| {
        daemon.apply(&service.manifest(pods.iter().copied()))
    })?;
    println!("manifests: {report}");
    report.check()
}

#[test]
fn churn_through_the_api_server_loses_no_connection_and_reaches_no_removed_pod() -> Result<()> {
    require_lab!();
    let settings = settings();
    let lab = Lab::builder().pods(settings.pods()).build()?;
    let mut churn = Churn::new(&lab, settings)?;
    let service = churn::service();
    let api = ApiServerInNetns::start(lab.node())?;
    api.edit(|cluster| cluster.apply_manifest(&service.manifest(churn.current())));
    let daemon = lab
        .daemon()
        .api_server(api.url())
        .args(SYNC_AT_ONCE)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let report = churn.run(&daemon, |pods: &[&Pod]| {
        let slice = (service.manifest(pods.iter().copied()).objects().into_iter())
            .find(|object| object["kind"] == "EndpointSlice")
            .context("a lab manifest holds its EndpointSlice")?;
        api.edit(|cluster| cluster.apply(Kind::EndpointSlice, slice));
        Ok(())
    })?;
    println!("API server: {report}");
    report.check()
}
