//! The real daemon watching the test API server (in the lab node's namespace), with real
//! traffic through the datapath while the server is out: gone (connections refused), then
//! stalled (requests and watch events held back), failing with 500, then 503, then answering
//! garbage — and its history compacted meanwhile, so the return is a 410 and a relist. Each
//! phase changes the cluster.
//!
//! While the server is out the datapath serves the last good state (no request fails, none
//! reaches what changed since), `/healthz` and `/livez` stay 200 although the healthz
//! timeout is far shorter than the outage — kube-proxy's rule: unhealthy only when a
//! received update stays unapplied, and an outage delivers none — and when the server
//! returns the daemon catches up with every change, nothing lost. Also through the API
//! server: `/healthz` turns 503 while the Node is being deleted.
//!
//! Each phase lasts `EBPF_PROXY_OUTAGE_PHASE_SECONDS` (default 4: the watchers' backoff has
//! reached its longer steps by the end); `cargo xtask soak` runs minutes per phase, and
//! adds a blackhole (a partition during which the server restarted), which only the
//! daemon's read timeout ends. The figures are printed.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, caller, echo_service};
use proxy_lab::fake_apiserver::{ApiServerInNetns, FakeApiServer, Kind, Outage};
use proxy_lab::{Daemon, Endpoint, Lab, NODE_NAME, Netns, Service, addr, require_lab};
use serde_json::{Value, json};

/// A Service deleted while the server is out.
const DOOMED_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
/// A Service created while the server is out.
const NEWCOMER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
/// Far shorter than any outage here: a daemon that queued an update because of the outage
/// itself would turn unhealthy.
const HEALTHZ_TIMEOUT: &str = "--healthz-timeout=3s";
/// The daemon's `API_READ_TIMEOUT`, which ends a blackholed request, plus the longest
/// jittered backoff step (30 s, up to twice that) and room for a slow machine.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120 + 60 + 30);
/// Without a blackhole, the longest jittered backoff step and room for a slow machine.
const SHORT_CATCH_UP_LIMIT: Duration = Duration::from_secs(60 + 30);

fn phase_duration() -> Duration {
    let seconds = std::env::var("EBPF_PROXY_OUTAGE_PHASE_SECONDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(4);
    Duration::from_secs(seconds)
}

/// The soak run (long phases) adds a blackhole, whose end waits for the read timeout.
fn long_run() -> bool {
    phase_duration() >= Duration::from_secs(60)
}

fn doomed() -> Service {
    Service::cluster_ip("doomed", DOOMED_IP).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
}

fn newcomer() -> Service {
    Service::cluster_ip("newcomer", NEWCOMER_IP).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
}

/// This node's Node object: its InternalIP, and, if given, the cluster autoscaler's taint.
fn node(tainted: bool) -> Value {
    let mut node = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE_NAME, "labels": { "kubernetes.io/hostname": NODE_NAME } },
        "status": { "addresses": [{ "type": "InternalIP", "address": addr::NODE_IP.to_string() }] },
    });
    if tainted {
        node["spec"] = json!({ "taints": [{
            "key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule",
        }] });
    }
    node
}

/// A lab, the API server with `echo` (pod-1, pod-2), `doomed` (pod-3) and the Node, and
/// the daemon watching it, synced.
fn start(lab: &Lab) -> Result<(ApiServerInNetns, Daemon<'_>)> {
    let api = ApiServerInNetns::start(lab.node())?;
    api.edit(|cluster| {
        cluster.apply(Kind::Node, node(false));
        cluster.apply_manifest(&echo_service().manifest(&lab.pods()[..2]));
        cluster.apply_manifest(&doomed().manifest([lab.pod(3)]));
    });
    let daemon = lab
        .daemon()
        .api_server(api.url())
        .arg(HEALTHZ_TIMEOUT)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok((api, daemon))
}

/// `/healthz` and `/livez` of the daemon: (status, body) each.
fn health(ns: &Netns) -> Result<((u16, String), (u16, String))> {
    Ok((
        ns.http_get(Ipv4Addr::LOCALHOST, 10256, "/healthz")?,
        ns.http_get(Ipv4Addr::LOCALHOST, 10256, "/livez")?,
    ))
}

/// The datapath's frontends (`services -o json`): `address:port/protocol` → backend
/// addresses, sorted.
fn frontends(daemon: &Daemon) -> Result<BTreeMap<String, Vec<String>>> {
    let text = daemon.cli(&["services", "-o", "json"])?;
    let parsed: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    let mut frontends = BTreeMap::new();
    for frontend in parsed.as_array().context("services is an array")? {
        let key = format!(
            "{}:{}/{}",
            frontend["address"].as_str().unwrap_or_default(),
            frontend["port"],
            frontend["protocol"].as_str().unwrap_or_default()
        );
        let mut backends: Vec<String> = frontend["backends"]
            .as_array()
            .context("backends")?
            .iter()
            .filter_map(|backend| backend["address"].as_str().map(str::to_owned))
            .collect();
        backends.sort();
        frontends.insert(key, backends);
    }
    Ok(frontends)
}

fn expected(entries: &[(Ipv4Addr, u16, &str, &[Ipv4Addr])]) -> BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(address, port, protocol, backends)| {
            let mut backends: Vec<String> = backends.iter().map(ToString::to_string).collect();
            backends.sort();
            (format!("{address}:{port}/{protocol}"), backends)
        })
        .collect()
}

/// One round of traffic from pod-4 through the last good state: `echo` over TCP and UDP
/// (new sockets each) served by pod-1 or pod-2, `doomed` by pod-3. Returns the requests
/// made; any failure or wrong backend is an error.
fn last_good_state_serves(lab: &Lab) -> Result<usize> {
    for reply in [
        caller(lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?,
        caller(lab).udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?,
    ] {
        ensure!(
            reply.body == "pod-1" || reply.body == "pod-2",
            "echo served by {} during the outage",
            reply.body
        );
    }
    let reply = caller(lab).tcp_request(DOOMED_IP, SERVICE_TCP_PORT)?;
    ensure!(reply.body == "pod-3", "doomed served by {}", reply.body);
    Ok(3)
}

#[test]
fn outages_keep_the_datapath_and_the_daemon_catches_up_with_everything() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let (api, daemon) = start(&lab)?;
    let server: &FakeApiServer = &api;
    last_good_state_serves(&lab)?;

    let pod = |i: usize| lab.pod(i).ip;
    let mut phases = vec![
        Outage::Down,
        Outage::Stalled,
        Outage::Failing(500),
        Outage::Failing(503),
        Outage::Garbage,
    ];
    if long_run() {
        phases.push(Outage::Blackhole);
    }
    let phase = phase_duration();
    let requests_before = server.requests().len();
    let outage_started = Instant::now();
    let mut requests = 0;
    for (round, outage) in phases.iter().copied().enumerate() {
        server.outage(outage);
        // What changes while the server is out, one step per phase.
        server.edit(|cluster| match round {
            // pod-3 joins echo, and the history is compacted: a 410 on return.
            0 => {
                cluster.apply_manifest(&echo_service().manifest(&lab.pods()[..3]));
                cluster.compact();
            }
            1 => cluster.delete_manifest(&doomed().manifest([lab.pod(3)])),
            2 => {
                cluster.apply_manifest(&newcomer().manifest([lab.pod(3)]));
            }
            3 => {
                let echo = [Endpoint::of(lab.pod(1)), Endpoint::of(lab.pod(3))];
                cluster.apply_manifest(&echo_service().manifest_with(&echo));
            }
            _ => {
                cluster.apply_manifest(&newcomer().manifest([lab.pod(1), lab.pod(3)]));
            }
        });
        let phase_end = Instant::now() + phase;
        while Instant::now() < phase_end {
            requests += last_good_state_serves(&lab)
                .with_context(|| format!("traffic during {outage:?}"))?;
            let ((healthz, healthz_body), (livez, _)) = health(lab.node())?;
            ensure!(
                healthz == 200 && livez == 200,
                "during {outage:?}: /healthz {healthz} ({healthz_body}), /livez {livez}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let outage = outage_started.elapsed();
    let met: Vec<(Kind, bool, Outage)> = server.requests()[requests_before..]
        .iter()
        .filter_map(|request| Some((request.kind, request.watch, request.outage?)))
        .collect();

    server.restore();
    let returned = Instant::now();
    let caught_up_state = expected(&[
        (addr::CLUSTER_IP, SERVICE_TCP_PORT, "tcp", &[pod(1), pod(3)]),
        (addr::CLUSTER_IP, SERVICE_UDP_PORT, "udp", &[pod(1), pod(3)]),
        (NEWCOMER_IP, SERVICE_TCP_PORT, "tcp", &[pod(1), pod(3)]),
    ]);
    let limit = if long_run() {
        CATCH_UP_LIMIT
    } else {
        SHORT_CATCH_UP_LIMIT
    };
    loop {
        if frontends(&daemon)? == caught_up_state {
            break;
        }
        if returned.elapsed() > limit {
            bail!(
                "not caught up {limit:?} after the API server returned: {:#?}\n{}",
                frontends(&daemon)?,
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let catch_up = returned.elapsed();
    println!(
        "API outage: {:.0} s in {} phases of {:?} ({phases:?}); {requests} requests through \
         the datapath meanwhile, 0 failed; requests that met the outage (kind, watch, \
         outage): {met:?}; caught up {:.1} s after the API server returned",
        outage.as_secs_f64(),
        phases.len(),
        phase,
        catch_up.as_secs_f64()
    );

    // The caught-up state serves: pod-2 left echo, doomed is gone, newcomer answers.
    for _ in 0..20 {
        let reply = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(
            reply.body != "pod-2",
            "echo still sends new connections to pod-2"
        );
    }
    let reply = caller(&lab).tcp_request(NEWCOMER_IP, SERVICE_TCP_PORT)?;
    ensure!(
        reply.body == "pod-1" || reply.body == "pod-3",
        "{}",
        reply.body
    );
    ensure!(
        caller(&lab)
            .tcp_request(DOOMED_IP, SERVICE_TCP_PORT)
            .is_err(),
        "the deleted Service still answers"
    );
    let ((healthz, body), (livez, _)) = health(lab.node())?;
    ensure!(healthz == 200 && livez == 200, "after the return: {body}");
    ensure!(
        daemon.log().contains("retrying with backoff"),
        "the daemon never noticed the outage:\n{}",
        daemon.log()
    );
    Ok(())
}

/// kube-proxy's node eligibility through the API server: while the Node carries the
/// cluster autoscaler's taint, `/healthz` answers 503 with `nodeEligible: false` and
/// `/livez` stays 200; the taint removed, both are 200 again.
#[test]
fn healthz_is_503_while_the_node_is_being_deleted() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let (api, _daemon) = start(&lab)?;
    for tainted in [true, false] {
        api.edit(|cluster| cluster.apply(Kind::Node, node(tainted)));
        let deadline = Instant::now() + SYNC_TIMEOUT;
        let expected = if tainted { 503 } else { 200 };
        loop {
            let ((healthz, body), (livez, _)) = health(lab.node())?;
            let eligible: Value = serde_json::from_str(&body)?;
            if healthz == expected && eligible["nodeEligible"] == json!(!tainted) {
                ensure!(livez == 200, "/livez {livez} (tainted: {tainted})");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "/healthz stayed {healthz} ({body}) with the Node tainted: {tainted}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}
