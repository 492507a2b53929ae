//! Start-up hygiene. A daemon whose pin root is not on a bpffs mounts one on the root's
//! parent (as Cilium does) and serves from it. A second daemon on the same pins is refused
//! with the first one's pid, without touching them, and the first keeps serving; so is
//! `ebpf-proxy cleanup` while a daemon runs. All mounts are the test's own, under its
//! scratch directory.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, daemon_with_echo, echo_service};
use proxy_lab::{NODE_NAME, addr, daemon_binary, require_lab};

/// Bounds the wait for a daemon that should refuse to start at once.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn a_missing_bpffs_is_mounted_and_the_daemon_serves_from_it() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .without_bpffs()
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    ensure!(
        daemon.bpffs_mounted(),
        "no bpffs at {}",
        daemon.bpffs().display()
    );
    let log = daemon.log();
    ensure!(
        log.contains("bpffs was not mounted: mounted one"),
        "the mount is not logged:\n{log}"
    );
    ensure!(daemon.bpffs_root().join("SERVICES").exists());
    caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    Ok(())
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused_and_the_first_keeps_serving() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let first = daemon_with_echo(&lab)?;
    let first_pid = first.pid().context("the first daemon runs")?;

    // In the lab node's namespace, like the first: were it not refused, it would attach
    // there, never to the machine's devices. No health or metrics servers, whose ports the
    // first holds: the pins must be the reason it stops.
    let mut second = Command::new("nsenter")
        .arg(format!("--net={}", lab.node().path().display()))
        .arg(daemon_binary()?)
        .args(["daemon", "--node-name", NODE_NAME, "--manifests"])
        .arg(first.manifests_dir())
        .arg("--bpffs-root")
        .arg(first.bpffs_root())
        .args(["--healthz-bind-address=", "--metrics-bind-address="])
        // Refused before it attaches anything; never the machine's root cgroup regardless.
        .arg("--socket-lb=off")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + REFUSAL_TIMEOUT;
    let status = loop {
        if let Some(status) = second.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            second.kill()?;
            second.wait()?;
            anyhow::bail!("a second daemon on the same pins ran for {REFUSAL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(second.stderr.take().context("piped stderr")?)?;
    ensure!(!status.success(), "the second daemon exited with {status}");
    let expected = format!(
        "another ebpf-proxy daemon (pid {first_pid}) holds the pins at {}",
        first.bpffs_root().display()
    );
    ensure!(stderr.contains(&expected), "{stderr}");

    for _ in 0..5 {
        caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    }
    let cleanup = first.cli_output(&["cleanup"])?;
    ensure!(
        !cleanup.status.success() && String::from_utf8_lossy(&cleanup.stderr).contains(&expected),
        "cleanup under a running daemon: {cleanup:?}"
    );
    ensure!(first.bpffs_root().join("SERVICES").exists());
    caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    Ok(())
}
