//! Least privilege: the daemon runs with only the capabilities the DaemonSet grants —
//! read from deploy/daemonset.yaml's securityContext — as a container runtime starts it:
//! uid 0 without CAP_SYS_ADMIN or any other capability, no new privileges. It loads and
//! attaches its programs, programs the maps, serves ClusterIP and NodePort traffic and
//! answers `/healthz`; the process holds exactly those capabilities. The ClusterRole only
//! reads (get, list, watch).

mod common;

use std::net::Ipv4Addr;

use anyhow::{Context, Result, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, caller, echo_service};
use proxy_lab::{Service, addr, require_lab};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/");

/// The `capabilities.add` list of the DaemonSet's container (`add: ["BPF", …]`).
fn daemonset_capabilities() -> Result<Vec<String>> {
    let daemonset = std::fs::read_to_string(format!("{DEPLOY}daemonset.yaml"))?;
    let add = daemonset
        .lines()
        .find_map(|line| line.trim().strip_prefix("add:"))
        .context("no capabilities.add in the DaemonSet")?;
    let drop_all = daemonset
        .lines()
        .any(|line| line.trim().replace(' ', "") == "drop:[\"ALL\"]");
    ensure!(drop_all, "the DaemonSet does not drop ALL capabilities");
    Ok(add
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|name| name.trim().trim_matches('"').to_owned())
        .filter(|name| !name.is_empty())
        .collect())
}

/// Capability numbers (linux/capability.h) of the names the DaemonSet may use.
fn capability_bit(name: &str) -> Result<u32> {
    Ok(match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => anyhow::bail!("capability {other} has no number here"),
    })
}

/// The effective capability set of a process (`CapEff` in /proc/PID/status).
fn effective_capabilities(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

#[test]
fn the_daemon_works_with_only_the_daemonsets_capabilities() -> Result<()> {
    require_lab!();
    let capabilities = daemonset_capabilities()?;
    let names: Vec<&str> = capabilities.iter().map(String::as_str).collect();
    let lab = common::lab()?;
    let node_port = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP).tcp_node_port(
        SERVICE_TCP_PORT,
        addr::ECHO_TCP_PORT,
        addr::NODE_PORT_TCP,
    );
    let daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .manifest(node_port.manifest(backends(&lab)))
        .capabilities(&names)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    let pid = daemon.pid().context("the daemon runs")?;
    let expected = names
        .iter()
        .map(|name| capability_bit(name).map(|bit| 1u64 << bit))
        .sum::<Result<u64>>()?;
    let effective = effective_capabilities(pid)?;
    ensure!(
        effective == expected,
        "the daemon runs with CapEff {effective:#x}, the DaemonSet grants {names:?} ({expected:#x})"
    );

    caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    caller(&lab).udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    lab.client()
        .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
    let (code, body) = lab
        .node()
        .http_get(Ipv4Addr::LOCALHOST, 10256, "/healthz")?;
    ensure!(code == 200, "/healthz {code}: {body}");
    // The socket programs (--socket-lb host) are attached too: the node's own process
    // reaches the ClusterIP.
    {
        let _placed = lab.node().place_in(daemon.cgroup());
        let reply = lab.node().tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(reply.peer.ip() == addr::CLUSTER_IP, "{reply:?}");
    }
    // A pod that appears later is attached too (rtnetlink events, a tcx attach).
    let late = lab.start_late_pod(5)?;
    let deadline = std::time::Instant::now() + SYNC_TIMEOUT;
    while !daemon.log().contains("device=lxc5") {
        ensure!(std::time::Instant::now() < deadline, "lxc5 never attached");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    late.pod
        .ns
        .tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(
        !daemon.log().contains("ERROR"),
        "errors under least privilege:\n{}",
        daemon.log()
    );
    Ok(())
}

/// The ClusterRole reads, and only what the daemon watches.
#[test]
fn the_cluster_role_only_reads() -> Result<()> {
    let rbac = std::fs::read_to_string(format!("{DEPLOY}rbac.yaml"))?;
    let verbs: Vec<&str> = rbac
        .lines()
        .filter_map(|line| line.trim().strip_prefix("verbs:"))
        .map(str::trim)
        .collect();
    ensure!(!verbs.is_empty(), "no rules in rbac.yaml");
    for rule in verbs {
        ensure!(
            rule == r#"["get", "list", "watch"]"#,
            "a rule grants {rule}"
        );
    }
    Ok(())
}
