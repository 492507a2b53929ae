//! An upgrade from the previous release, whose maps have another layout (commit a7370e7,
//! built from this repository's history): this release's daemon started on its pins keeps
//! the established TCP connections and UDP flows through a ClusterIP and a NodePort on
//! their backends, new connections never fail meanwhile, and no pin of the old layout is
//! left.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, caller, echo_service};
use proxy_lab::{Netns, REQUEST_TIMEOUT, Service, TcpSession, UdpFlow, addr, require_lab};

/// Long-lived connections per frontend, opened before the upgrade.
const SESSIONS: usize = 6;
/// How long the prober may run at most (bounds its loop).
const PROBE_LIMIT: Duration = Duration::from_secs(120);

/// A connection made before the upgrade and the pod that served it.
struct Established<T> {
    what: &'static str,
    flow: T,
    served_by: String,
}

#[test]
fn an_upgrade_from_the_previous_release_keeps_established_flows() -> Result<()> {
    require_lab!();
    let previous = proxy_lab::previous_release_binary()?;
    let lab = common::lab()?;
    let node_port = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    let mut daemon = lab
        .daemon()
        .manifest(echo_service().manifest(backends(&lab)))
        .manifest(node_port.manifest(backends(&lab)))
        .previous_release(previous)
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let root = daemon.bpffs_root();
    ensure!(
        root.join("BACKENDS").exists() && !root.join("LAYOUT").exists(),
        "not the previous release's pins"
    );

    let pod = caller(&lab);
    let outside = lab.client();
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for _ in 0..SESSIONS {
        for (what, ns, ip, port) in [
            ("ClusterIP", pod, addr::CLUSTER_IP, SERVICE_TCP_PORT),
            ("NodePort", outside, addr::NODE_IP, addr::NODE_PORT_TCP),
        ] {
            let mut flow = ns.tcp_session(ip, port)?;
            let served_by = flow.request()?;
            tcp.push(Established {
                what,
                flow,
                served_by,
            });
        }
    }
    for (what, ns, ip, port) in [
        ("ClusterIP UDP", pod, addr::CLUSTER_IP, SERVICE_UDP_PORT),
        ("NodePort UDP", outside, addr::NODE_IP, addr::NODE_PORT_UDP),
    ] {
        let flow = ns.udp_flow(ip, port, REQUEST_TIMEOUT)?;
        let served_by = flow.request()?;
        udp.push(Established {
            what,
            flow,
            served_by,
        });
    }
    // The UDP flows become streams (assured) as the old release saw them: traffic after
    // a reply, past the stream threshold.
    thread::sleep(Duration::from_millis(2_100));
    round(&mut tcp, &udp).context("before the upgrade")?;

    // New connections all through the upgrade, from a pod and from outside.
    let stop = AtomicBool::new(false);
    let (probes, window) = thread::scope(|scope| -> Result<_> {
        let prober = scope.spawn(|| probe(pod, outside, &stop));
        let started = Instant::now();
        let syncs = daemon.syncs();
        let upgraded = daemon
            .upgrade()
            .and_then(|()| daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT))
            .and_then(|()| wait_for_log(&daemon, "upgrade complete", SYNC_TIMEOUT));
        let window = started.elapsed();
        // A little past the swap, so connections made after it count too.
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let probes = prober.join().expect("prober panicked");
        upgraded?;
        Ok((probes, window))
    })?;

    round(&mut tcp, &udp).context("after the upgrade")?;
    for (what, ns, ip, port) in [
        ("ClusterIP", pod, addr::CLUSTER_IP, SERVICE_TCP_PORT),
        ("NodePort", outside, addr::NODE_IP, addr::NODE_PORT_TCP),
    ] {
        ns.tcp_request(ip, port)
            .with_context(|| format!("a new {what} connection after the upgrade"))?;
    }
    for (what, ns, ip, port) in [
        ("ClusterIP", pod, addr::CLUSTER_IP, SERVICE_UDP_PORT),
        ("NodePort", outside, addr::NODE_IP, addr::NODE_PORT_UDP),
    ] {
        ns.udp_request(ip, port)
            .with_context(|| format!("a new {what} UDP flow after the upgrade"))?;
    }

    let log = daemon.log();
    for retired in ["BACKENDS", "AFFINITY_MATCH", "previous"] {
        ensure!(
            !root.join(retired).exists(),
            "{retired} is still pinned after the upgrade"
        );
    }
    ensure!(root.join("LAYOUT").exists(), "no layout record");
    ensure!(
        log.contains("conntrack converted from the previous layout"),
        "no conversion logged"
    );
    // The CLI reads the new pins (it refuses pins of another layout).
    let flows = daemon.cli(&["conntrack"])?;
    ensure!(
        flows.contains(&addr::NODE_IP.to_string()),
        "conntrack after the upgrade:\n{flows}"
    );

    let kept = tcp.len() + udp.len();
    eprintln!(
        "upgrade from {}: {kept} established flows kept ({} TCP, {} UDP); {} new connections \
         during the upgrade, {} failed; {:.1} s from stopping the old daemon to the swap",
        proxy_lab::PREVIOUS_RELEASE,
        tcp.len(),
        udp.len(),
        probes.attempted,
        probes.failed.len(),
        window.as_secs_f64()
    );
    ensure!(
        probes.attempted > 0,
        "no connection was attempted during the upgrade"
    );
    ensure!(
        probes.failed.is_empty(),
        "{} of {} new connections failed during the upgrade: {:?}",
        probes.failed.len(),
        probes.attempted,
        probes.failed
    );
    Ok(())
}

/// One request on every established flow: each still reaches the pod that served it.
fn round(tcp: &mut [Established<TcpSession>], udp: &[Established<UdpFlow>]) -> Result<()> {
    for session in tcp.iter_mut() {
        let served_by = session
            .flow
            .request()
            .with_context(|| format!("established {} connection", session.what))?;
        ensure!(
            served_by == session.served_by,
            "an established {} connection moved from {} to {served_by}",
            session.what,
            session.served_by
        );
    }
    for flow in udp {
        let served_by = flow
            .flow
            .request()
            .with_context(|| format!("established {} flow", flow.what))?;
        ensure!(
            served_by == flow.served_by,
            "an established {} flow moved from {} to {served_by}",
            flow.what,
            flow.served_by
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Probes {
    attempted: usize,
    failed: Vec<String>,
}

/// New TCP connections to the ClusterIP (from a pod) and the NodePort (from outside),
/// one after another, until `stop` (or [`PROBE_LIMIT`]).
fn probe(pod: &Netns, outside: &Netns, stop: &AtomicBool) -> Probes {
    let mut probes = Probes::default();
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < PROBE_LIMIT {
        for (what, ns, ip, port) in [
            ("ClusterIP", pod, addr::CLUSTER_IP, SERVICE_TCP_PORT),
            ("NodePort", outside, addr::NODE_IP, addr::NODE_PORT_TCP),
        ] {
            probes.attempted += 1;
            if let Err(error) = ns.tcp_request(ip, port) {
                probes.failed.push(format!(
                    "{what} at {:.2} s: {error:#}",
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    probes
}

/// Waits until the daemon's log contains `text`.
fn wait_for_log(daemon: &proxy_lab::Daemon<'_>, text: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !daemon.log().contains(text) {
        ensure!(
            Instant::now() < deadline,
            "the daemon did not log {text:?} within {timeout:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
