//! The daemon handle: SIGTERM ends the daemon cleanly, and its bpffs mount and
//! directories are gone afterwards.

mod common;

use anyhow::{Result, ensure};
use common::daemon_with_echo;
use proxy_lab::require_lab;

#[test]
fn sigterm_stops_the_daemon_and_its_resources_are_released() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let bpffs = daemon.bpffs().to_path_buf();
    let manifests = daemon.manifests_dir();
    let status = daemon.stop()?;
    ensure!(
        status.success(),
        "ebpf-proxy exited with {status} on SIGTERM"
    );
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let mount_point = bpffs.to_string_lossy();
    ensure!(
        !mounts
            .lines()
            .any(|line| line.split(' ').nth(1) == Some(&*mount_point)),
        "{mount_point} is still mounted"
    );
    ensure!(
        !bpffs.exists() && !manifests.exists(),
        "daemon directories left behind"
    );
    Ok(())
}
