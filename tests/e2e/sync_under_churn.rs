//! kube-proxy's guarantee under a steady stream of changes (issue: a change every 0.4 s
//! held off every sync for 19 s): while a manifest is rewritten far faster than the sync
//! period, the daemon keeps syncing, and the maps catch up during the stream, not only
//! after it ends.

mod common;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::daemon_with_echo_and;
use proxy_lab::{Manifest, require_lab};

/// One more Service per rewrite, so every sync shows how far the maps got.
fn growing_manifest(services: usize) -> Manifest {
    let mut yaml = String::new();
    for index in 0..services {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: churn-{index}, namespace: churn}}\n\
             spec: {{clusterIP: 198.19.200.{}, ports: [{{port: 80}}]}}\n",
            index % 250 + 1
        );
    }
    Manifest {
        file_name: "churn.yaml".to_owned(),
        yaml,
    }
}

/// The `frontends=N` of each sync line.
fn synced_frontend_counts(log: &str) -> Vec<usize> {
    log.lines()
        .filter(|line| line.contains("sync complete"))
        .filter_map(|line| {
            let count = line.split("frontends=").nth(1)?.split_whitespace().next()?;
            count.parse().ok()
        })
        .collect()
}

#[test]
fn a_stream_of_changes_faster_than_the_sync_period_keeps_the_maps_catching_up() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo_and(&lab, &["--min-sync-period", "300ms"])?;
    let before = synced_frontend_counts(&daemon.log()).len();

    // 3 s of rewrites, one every 5 ms (bounded in count and time).
    let started = Instant::now();
    let mut written = 0;
    while started.elapsed() < Duration::from_secs(3) && written < 600 {
        written += 1;
        daemon.apply(&growing_manifest(written.min(240)))?;
        std::thread::sleep(Duration::from_millis(5));
    }
    let during: Vec<usize> = synced_frontend_counts(&daemon.log())[before..].to_vec();
    let distinct: BTreeSet<usize> = during.iter().copied().collect();
    println!(
        "{written} rewrites in {:?}; syncs meanwhile: {during:?}",
        started.elapsed()
    );
    // A period of 300 ms in 3 s allows ten; demand a few, each with more Services.
    ensure!(
        distinct.len() >= 3,
        "the maps did not keep up while changes streamed in: syncs {during:?}"
    );

    // Once the stream ends, the last state arrives.
    let last = 2 + written.min(240);
    daemon.wait_for_sync_line(&format!("frontends={last} "), Duration::from_secs(5))?;
    Ok(())
}
