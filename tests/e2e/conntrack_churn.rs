//! Issue 18, item 3: connections run continuously across many resyncs and conntrack
//! sweeps, and none may fail.
//!
//! The cause of the rare failed connection was the sweep: it read the whole map, picked the
//! flows idle past their timeout, and deleted their keys one by one afterwards; a client
//! that reused a port in between got its new flow deleted under it (reset, or its ACK sent
//! to another backend). The shape here is what reproduced it: connections held open a
//! while (so one is alive when its key is swept), ports cycling back after about the
//! closing timeout, a sweep every second and a resync every second. `cargo xtask soak`
//! runs the same for ten minutes (`EBPF_PROXY_CHURN_SECONDS`, default here 20).

mod common;

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Result, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, echo_service};
use proxy_lab::load::{self, LoadSettings};
use proxy_lab::{addr, require_lab};

#[test]
fn connections_survive_resyncs_and_conntrack_sweeps() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .args(load::CHURN_DAEMON_ARGS)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let client = caller(&lab);
    client.sysctl("net/ipv4/ip_local_port_range", load::CHURN_PORT_RANGE)?;
    let seconds = std::env::var("EBPF_PROXY_CHURN_SECONDS")
        .ok()
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or(20);
    let settings = LoadSettings {
        duration: Duration::from_secs(seconds),
        ..load::churn_settings()
    };
    let target = SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_TCP_PORT);
    let syncs_before = daemon.syncs();
    let report = load::generate(client, &[target], &settings, 1)?;
    let syncs = daemon.syncs() - syncs_before;
    println!(
        "{} connections, {} failed, {syncs} syncs meanwhile",
        report.completed, report.failed
    );
    ensure!(
        report.completed > 1_000,
        "too few connections to mean anything"
    );
    ensure!(
        syncs as u64 >= seconds / 2,
        "only {syncs} resyncs during the run"
    );
    ensure!(
        report.failures.is_empty(),
        "{} of {} connections failed: {:?}",
        report.failed,
        report.completed + report.failed,
        report.failures
    );
    Ok(())
}
