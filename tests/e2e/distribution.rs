//! New connections spread evenly over the backends: 600 TCP connections over 3 backends
//! pass a chi-square goodness-of-fit test against the uniform spread at p = 0.001
//! (df = 2, critical value 13.816), so a correct selector fails this one run in a thousand.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, caller, daemon_with_echo};
use proxy_lab::{Tally, addr, require_lab};

const CONNECTIONS: usize = 600;
const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn new_tcp_connections_spread_uniformly() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    let mut tally = Tally::new(BACKEND_NAMES);
    let started = Instant::now();
    for _ in 0..CONNECTIONS {
        if started.elapsed() > DEADLINE {
            bail!("only {} connections within {DEADLINE:?}", tally.total());
        }
        let reply = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        tally.record(&reply.body);
    }
    println!(
        "{CONNECTIONS} connections in {:?}:\n{tally}chi² = {:.3} (critical {})",
        started.elapsed(),
        tally.chi_square(),
        tally.chi_square_critical()
    );
    ensure!(
        tally.unexpected().is_empty(),
        "unexpected backends:\n{tally}"
    );
    ensure!(
        tally.looks_uniform(),
        "spread is not uniform at p = 0.001 (chi² = {:.3} ≥ {}):\n{tally}",
        tally.chi_square(),
        tally.chi_square_critical()
    );
    Ok(())
}
