//! Hostile manifests (issue: one bad file stalled every update or ate gigabytes): with a
//! file nested 60 000 levels deep, an alias bomb and a file over the size limit in the
//! manifests directory, each is refused with its reason, and an unrelated endpoint change
//! still reaches traffic as fast as without them (within the 2 s of `endpoint_update`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{backends, daemon_with_echo_and, echo_service, served_by, until_avoided};
use proxy_lab::{Manifest, require_lab};

const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);

fn manifest(file_name: &str, yaml: String) -> Manifest {
    Manifest {
        file_name: file_name.to_owned(),
        yaml,
    }
}

#[test]
fn hostile_files_are_refused_and_do_not_hold_up_other_changes() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo_and(&lab, &["--manifests-max-file-bytes", "1048576"])?;

    let deep = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: deep}}\nspec: {}{}\n",
        "[".repeat(60_000),
        "]".repeat(60_000)
    );
    let anchor: Vec<String> = (0..2_000).map(|i| format!("item-{i}")).collect();
    let bomb = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bomb, annotations: {{a: &a [{}]}}}}\n\
         spec: {{externalIPs: [{}]}}\n",
        anchor.join(", "),
        vec!["*a"; 2_000].join(", ")
    );
    let large = format!("# {}\n", "x".repeat(2 * 1024 * 1024));
    daemon.apply(&manifest("deep.yaml", deep))?;
    daemon.apply(&manifest("bomb.yaml", bomb))?;
    daemon.apply(&manifest("large.yaml", large))?;

    // An unrelated change: pod-3 leaves the echo Service.
    let removed = &lab.pod(3).name;
    let changed = Instant::now();
    daemon.apply(&echo_service().manifest(&backends(&lab)[..2]))?;
    let last_seen = until_avoided(&lab, removed, changed, || Ok(()))?;
    println!("{removed} last served a new connection at {last_seen:?} after its removal");
    ensure!(
        last_seen.is_none_or(|seen| seen <= PROPAGATION_LIMIT),
        "{removed} served new connections until {last_seen:?} after its removal"
    );

    // Each file refused, named, with its reason.
    let deadline = Instant::now() + PROPAGATION_LIMIT;
    for (file, reason) in [
        ("deep.yaml", "too_deep"),
        ("bomb.yaml", "alias_expansion"),
        ("large.yaml", "too_large"),
    ] {
        loop {
            let log = daemon.log();
            let refused = log.lines().any(|line| {
                line.contains("skipped") && line.contains(file) && line.contains(reason)
            });
            if refused {
                break;
            }
            if Instant::now() > deadline {
                bail!("{file} not refused as {reason}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // And the Service still answers from its two pods.
    let backend = served_by(&lab)?;
    ensure!(backend != *removed, "{backend} still serves");
    Ok(())
}
