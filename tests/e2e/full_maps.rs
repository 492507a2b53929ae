//! Full maps the daemon writes: a Service whose backends find no room in BACKEND_SLOTS is
//! left out — logged with the map and the flag that sizes it, counted in
//! `ebpf_proxy_map_full_writes`, the fill shown by `/metrics` and `ebpf-proxy stats` —
//! while every Service already programmed keeps serving; when room returns (another
//! Service goes), the next sync writes it. (SERVICES full: `health_metrics`; the
//! datapath's LRU maps: the TestRun tests.)

mod common;

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{
    BACKEND_NAMES, SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, cli_json, echo_service,
};
use proxy_lab::{Daemon, Lab, Service, addr, is_timeout, require_lab};

/// `echo` takes 6 slots (TCP and UDP, three backends each); `second` needs 3 more.
const SLOTS: u32 = 8;
const SECOND_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 30);
/// Long enough that a SYN to no frontend is clearly unanswered.
const NO_ANSWER: Duration = Duration::from_millis(1500);

fn metrics(lab: &Lab) -> Result<String> {
    let (code, body) = lab
        .node()
        .http_get(Ipv4Addr::LOCALHOST, 10249, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    Ok(body)
}

/// The value of the sample `name` (with its labels) in a Prometheus text page.
fn metric(page: &str, name: &str) -> Result<f64> {
    let line = page
        .lines()
        .find(|line| line.starts_with(name))
        .with_context(|| format!("/metrics lacks {name}:\n{page}"))?;
    Ok(line[name.len()..].trim().parse()?)
}

/// `ebpf-proxy stats`' entry for BACKEND_SLOTS: (entries, max_entries).
fn slots_fill(daemon: &Daemon) -> Result<(u64, u64)> {
    let stats = cli_json(daemon, &["stats"])?;
    let map = stats["maps"]
        .as_array()
        .context("maps")?
        .iter()
        .find(|map| map["name"] == "BACKEND_SLOTS")
        .with_context(|| format!("no BACKEND_SLOTS in {stats:#}"))?;
    Ok((
        map["entries"].as_u64().context("entries")?,
        map["max_entries"].as_u64().context("max_entries")?,
    ))
}

#[test]
fn a_service_without_room_is_left_out_logged_and_written_once_room_returns() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let echo = echo_service().manifest(backends(&lab));
    let daemon = lab
        .daemon()
        .manifest(echo.clone())
        .arg(format!("--max-backend-slots={SLOTS}"))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    ensure!(slots_fill(&daemon)? == (6, u64::from(SLOTS)));

    let second =
        Service::cluster_ip("second", SECOND_IP).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT);
    daemon.apply(&second.manifest(backends(&lab)))?;
    daemon.wait_for_sync_line("all_written=false", SYNC_TIMEOUT)?;
    let log = daemon.log();
    ensure!(
        log.lines().any(|line| line.contains("map full")
            && line.contains("map=\"BACKEND_SLOTS\"")
            && line.contains("--max-backend-slots")),
        "no map-full error naming BACKEND_SLOTS and its flag:\n{log}"
    );
    let body = metrics(&lab)?;
    let refused = metric(
        &body,
        "ebpf_proxy_map_full_writes_total{map=\"BACKEND_SLOTS\"}",
    )?;
    ensure!(refused >= 1.0, "{refused} refusals counted");
    for expected in [
        "ebpf_proxy_map_entries{map=\"BACKEND_SLOTS\"} 6",
        "ebpf_proxy_map_max_entries{map=\"BACKEND_SLOTS\"} 8",
    ] {
        ensure!(
            body.contains(expected),
            "/metrics lacks {expected:?}:\n{body}"
        );
    }
    ensure!(slots_fill(&daemon)? == (6, u64::from(SLOTS)));
    // `echo` keeps serving; `second` is not programmed: its SYN meets the node's routing
    // as any address the node does not know (the lab's node has no route for it), never a
    // wrong backend.
    let reply = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");
    match caller(&lab).tcp_connect(SECOND_IP, SERVICE_TCP_PORT, NO_ANSWER) {
        Ok(_) => bail!("the Service that found no room answered"),
        Err(error) => ensure!(
            is_timeout(&error) || error.kind() == ErrorKind::NetworkUnreachable,
            "{error}"
        ),
    }

    // Room returns: `echo` goes, and the sync after it writes `second`.
    daemon.delete(&echo.file_name)?;
    daemon.wait_for_sync_line("frontends=1 backends=3 writes", SYNC_TIMEOUT)?;
    let last = daemon.last_sync_line().unwrap_or_default();
    ensure!(last.contains("all_written=true"), "{last}");
    let reply = caller(&lab).tcp_request(SECOND_IP, SERVICE_TCP_PORT)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");
    ensure!(slots_fill(&daemon)? == (3, u64::from(SLOTS)));
    ensure!(
        daemon.log().contains("every frontend is written again"),
        "no log line says the maps caught up:\n{}",
        daemon.log()
    );
    Ok(())
}
