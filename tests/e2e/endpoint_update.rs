//! Endpoint changes reach the datapath quickly: after an endpoint leaves the manifest, new
//! connections stop reaching it within 2 s; after it comes back, they reach it again
//! within 2 s. Judged by traffic, not by the daemon's log.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{backends, daemon_with_echo, echo_service, served_by, until_avoided};
use proxy_lab::require_lab;

const PROPAGATION_LIMIT: Duration = Duration::from_secs(2);
const CHECK_CONNECTIONS: usize = 60;

#[test]
fn removed_endpoint_stops_and_added_endpoint_starts_getting_new_connections() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let removed = &lab.pod(3).name;

    daemon.apply(&echo_service().manifest(&backends(&lab)[..2]))?;
    let last_seen = until_avoided(&lab, removed, Instant::now(), || Ok(()))?;
    println!("{removed} last served a new connection at {last_seen:?} after its removal");
    ensure!(
        last_seen.is_none_or(|seen| seen <= PROPAGATION_LIMIT),
        "{removed} served new connections until {last_seen:?} after its removal"
    );
    for _ in 0..CHECK_CONNECTIONS {
        let backend = served_by(&lab)?;
        ensure!(
            backend != *removed,
            "{removed} served a new connection after removal"
        );
    }

    daemon.apply(&echo_service().manifest(backends(&lab)))?;
    let added = Instant::now();
    loop {
        if served_by(&lab)? == *removed {
            println!(
                "{removed} served again {:?} after it was added",
                added.elapsed()
            );
            return Ok(());
        }
        if added.elapsed() > PROPAGATION_LIMIT {
            bail!("{removed} got no new connection within {PROPAGATION_LIMIT:?} of coming back");
        }
    }
}
