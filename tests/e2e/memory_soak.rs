//! Memory stays flat under changes (issue: RSS grew from 38 to 60 MiB over 50 changes at
//! 1,000 Services): the short version of the bench's `soak` section. Each change rewrites
//! a file of ten Services whose names rotate through 100 and moves their endpoints; once
//! warm, the daemon's RSS must not grow with the number of changes.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{SYNC_TIMEOUT, backends, daemon_with_echo_and};
use proxy_lab::{Manifest, require_lab};

const CHANGES: usize = 300;
const WARM_AFTER: usize = 100;
/// Allocator noise, far below what keeping per-change state would add (the growth
/// was ~0.4 MiB a change).
const ALLOWED_GROWTH_KIB: u64 = 2 * 1024;

fn churn(change: usize, pods: &[std::net::Ipv4Addr]) -> Manifest {
    let mut yaml = String::new();
    for offset in 0..10 {
        let index = (change + offset) % 100;
        let pod = pods[(change + offset) % pods.len()];
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: churn-{index}, namespace: soak}}\n\
             spec: {{clusterIP: 198.19.201.{}, ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: churn-{index}, namespace: soak, \
             labels: {{kubernetes.io/service-name: churn-{index}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{pod}\"]}}]\n",
            index + 1
        );
    }
    Manifest {
        file_name: "churn.yaml".to_owned(),
        yaml,
    }
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .context("no VmRSS")
}

#[test]
fn rss_stays_flat_under_a_stream_of_changes() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo_and(&lab, &["--min-sync-period", "0ms"])?;
    let pid = daemon.pid().context("the daemon is not running")?;
    let pods: Vec<std::net::Ipv4Addr> = backends(&lab).iter().map(|pod| pod.ip).collect();
    let mut warm = 0;
    // The echo Service's 2 frontends and the ten churning ones.
    let synced = |daemon: &proxy_lab::Daemon| {
        let log = daemon.log();
        log.lines()
            .filter(|line| line.contains("frontends=12 "))
            .count()
    };
    for change in 1..=CHANGES {
        let before = synced(&daemon);
        daemon.apply(&churn(change, &pods))?;
        // Each change applied before the next one (bounded).
        let deadline = Instant::now() + SYNC_TIMEOUT;
        while synced(&daemon) == before {
            ensure!(Instant::now() < deadline, "change {change} was not synced");
            std::thread::sleep(Duration::from_millis(1));
        }
        if change == WARM_AFTER {
            warm = rss_kib(pid)?;
        }
    }
    let end = rss_kib(pid)?;
    println!("RSS after {WARM_AFTER} changes: {warm} KiB; after {CHANGES}: {end} KiB");
    ensure!(
        end <= warm + ALLOWED_GROWTH_KIB,
        "RSS grew from {warm} KiB to {end} KiB over {} changes",
        CHANGES - WARM_AFTER
    );
    Ok(())
}
