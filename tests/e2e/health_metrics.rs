//! kube-proxy compatible health (`/healthz`, `/livez` on :10256) and Prometheus metrics
//! (`/metrics` on 127.0.0.1:10249), served by the daemon in the node namespace.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{SERVICE_TCP_PORT, SYNC_TIMEOUT, backends, caller, daemon_with_echo, echo_service};
use proxy_lab::{Lab, Netns, addr, require_lab};

/// One HTTP/1.0 GET from inside `ns`: (status code, body).
fn get(ns: &Netns, port: u16, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || -> Result<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .context("no status code")?;
        Ok((code, body.to_string()))
    })?
}

#[test]
fn healthz_livez_and_metrics_answer_like_kube_proxy() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let _daemon = daemon_with_echo(&lab)?;
    for _ in 0..5 {
        caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    }

    let (code, body) = get(lab.node(), 10256, "/healthz")?;
    ensure!(code == 200, "/healthz answered {code}: {body}");
    let health: serde_json::Value = serde_json::from_str(&body)?;
    for field in ["lastUpdated", "currentTime", "nodeEligible"] {
        ensure!(
            health.get(field).is_some(),
            "/healthz body lacks {field}: {body}"
        );
    }
    let (code, body) = get(lab.node(), 10256, "/livez")?;
    ensure!(code == 200, "/livez answered {code}: {body}");

    let (code, metrics) = get(lab.node(), 10249, "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    for expected in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
        "kubeproxy_sync_proxy_rules_service_changes_total 1",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "ebpf_proxy_datapath_packets_total{counter=\"new_flow\"} 5",
        "ebpf_proxy_map_max_entries{map=\"CONNTRACK\"}",
        "ebpf_proxy_map_entries{map=\"SERVICES\"} 2",
        "ebpf_proxy_map_entries{map=\"BACKEND_SLOTS\"} 6",
        // Each family's maps are their own metrics' labels.
        "ebpf_proxy_map_entries{map=\"SERVICES6\"} 0",
        "ebpf_proxy_map_max_entries{map=\"CONNTRACK6\"}",
        "ebpf_proxy_map_max_entries{map=\"CONNTRACK_PENDING6\"}",
        "ebpf_proxy_map_entries{map=\"AFFINITY6\"} 0",
        "ebpf_proxy_map_max_entries{map=\"AFFINITY6\"}",
    ] {
        ensure!(
            metrics.contains(expected),
            "/metrics lacks {expected:?}:\n{metrics}"
        );
    }
    Ok(())
}

#[test]
fn healthz_turns_unhealthy_when_updates_cannot_be_applied() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(3).build()?;
    // Two frontends need two SERVICES entries; one fits.
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .arg("--max-services=1")
        .arg("--healthz-timeout=1s")
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = get(lab.node(), 10256, "/healthz")?;
        if code == 503 {
            let (livez, _) = get(lab.node(), 10256, "/livez")?;
            ensure!(
                livez == 503,
                "/livez answered {livez} while /healthz is 503"
            );
            ensure!(
                daemon.log().contains("map full"),
                "no map-full error logged"
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("/healthz stayed {code} although writes were refused: {body}");
        }
        sleep(Duration::from_millis(200));
    }
}
