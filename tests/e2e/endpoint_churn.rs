//! Issue 18, item 5: while a UDP Service's endpoints change again and again, resolvers that
//! open a new socket per query on a few recurring ports get every query answered, and never
//! by a pod the maps no longer held when the query was sent. (The conntrack entry of a
//! port still names the pod its previous query went to; the datapath finds out at once
//! that the pod left, instead of waiting for a sweep of the conntrack map; and the answers
//! of queries in flight keep their reverse translation.)
//!
//! The maps are polled for each new set right after its manifest is written, and tens of
//! thousands of older flows sit in conntrack, so a cleanup that walks the conntrack map
//! after the write (as the daemon's used to) would show here.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{SERVICE_UDP_PORT, SYNC_TIMEOUT, cli_json};
use proxy_lab::{Daemon, Lab, Pod, Rng, Service, addr, require_lab, udp_exchange};

/// pod-1..=pod-6 serve, pod-7 asks.
const SERVERS: usize = 6;
const CALLER: usize = 7;
/// Changes in the test; `cargo xtask soak` makes 300 (`EBPF_PROXY_ENDPOINT_CHANGES`).
const CHANGES: usize = 30;
/// Each set has this many of the servers.
const SET_SIZE: usize = 3;
const CLIENT_THREADS: u16 = 4;
const PORTS_PER_THREAD: u16 = 4;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Flows opened before the churn, from as many ports, to fill conntrack.
const OLDER_FLOWS: u16 = 16_000;

fn service() -> Service {
    Service::cluster_ip("dns", addr::CLUSTER_IP).udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT)
}

/// One query: when it was sent, and who answered (None: nobody within the timeout).
struct Query {
    sent: Instant,
    answered_by: Option<String>,
}

/// The pods serving the Service, as the daemon's `services` view lists them.
fn serving(daemon: &Daemon, lab: &Lab) -> Result<BTreeSet<String>> {
    let services = cli_json(daemon, &["services"])?;
    let frontend = services
        .as_array()
        .and_then(|frontends| frontends.iter().find(|f| f["protocol"] == "udp"))
        .context("no UDP frontend")?;
    let addresses: BTreeSet<String> = frontend["backends"]
        .as_array()
        .context("no backends")?
        .iter()
        .filter_map(|backend| backend["address"].as_str().map(str::to_owned))
        .collect();
    Ok(lab
        .pods()
        .iter()
        .filter(|pod| addresses.contains(&pod.ip.to_string()))
        .map(|pod| pod.name.clone())
        .collect())
}

/// One query from each of `count` ports: that many flows in conntrack.
fn open_flows(lab: &Lab, count: u16) -> Result<()> {
    let caller = &lab.pod(CALLER).ns;
    for port in 0..count {
        let socket = caller.udp_socket_from(20_000 + port, ANSWER_TIMEOUT)?;
        udp_exchange(&socket, addr::CLUSTER_IP, SERVICE_UDP_PORT)
            .with_context(|| format!("query {port} before the churn"))?;
    }
    Ok(())
}

/// Polls the maps until they hold `expected`.
fn until_written(daemon: &Daemon, lab: &Lab, expected: &BTreeSet<String>) -> Result<()> {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        if serving(daemon, lab)? == *expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the maps never held {expected:?}"
        );
    }
}

/// Resolver-like clients: each thread cycles through its ports, one new socket per query.
fn ask_until(lab: &Lab, stop: &AtomicBool) -> Result<Vec<Query>> {
    let caller = &lab.pod(CALLER).ns;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CLIENT_THREADS)
            .map(|thread| {
                scope.spawn(move || -> Result<Vec<Query>> {
                    let mut queries = Vec::new();
                    let ports = (0..PORTS_PER_THREAD)
                        .map(|i| 41_000 + thread * 100 + i)
                        .cycle();
                    for port in ports {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let socket = caller.udp_socket_from(port, ANSWER_TIMEOUT)?;
                        let sent = Instant::now();
                        let answered_by = udp_exchange(&socket, addr::CLUSTER_IP, SERVICE_UDP_PORT)
                            .ok()
                            .map(|reply| reply.body);
                        queries.push(Query { sent, answered_by });
                    }
                    Ok(queries)
                })
            })
            .collect();
        let mut all = Vec::new();
        for thread in threads {
            all.extend(thread.join().expect("client thread panicked")?);
        }
        Ok(all)
    })
}

#[test]
fn udp_queries_during_endpoint_churn_are_all_answered_and_never_by_a_removed_pod() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(CALLER).build()?;
    let servers: Vec<&Pod> = lab.pods()[..SERVERS].iter().collect();
    let mut rng = Rng::new(18);
    let mut pauses = Rng::new(5);
    let mut pick = || -> Vec<&Pod> {
        let mut set: Vec<&Pod> = Vec::new();
        while set.len() < SET_SIZE {
            let pod = servers[rng.below(SERVERS)];
            if !set.iter().any(|chosen| chosen.name == pod.name) {
                set.push(pod);
            }
        }
        set
    };
    let first = pick();
    let daemon = lab
        .daemon()
        .manifest(service().manifest(first.iter().copied()))
        .args(["--manifests-poll-ms", "10", "--min-sync-period", "0ms"])
        .args(["--resync-seconds", "3600"])
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    open_flows(&lab, OLDER_FLOWS)?;
    let changes = std::env::var("EBPF_PROXY_ENDPOINT_CHANGES")
        .ok()
        .and_then(|changes| changes.parse().ok())
        .unwrap_or(CHANGES);
    let started = Instant::now();
    // Each set of endpoints: when it was asked for (its manifest written), when the test saw
    // it in the maps, which pods. The datapath holds it from some moment in between.
    let mut timeline = vec![(started, started, serving(&daemon, &lab)?)];
    let stop = AtomicBool::new(false);
    let queries = std::thread::scope(|scope| -> Result<Vec<Query>> {
        let clients = scope.spawn(|| ask_until(&lab, &stop));
        let churn = (|| -> Result<()> {
            for _ in 0..changes {
                std::thread::sleep(Duration::from_millis(100 + pauses.below(400) as u64));
                let set = pick();
                let expected: BTreeSet<String> = set.iter().map(|pod| pod.name.clone()).collect();
                let asked = Instant::now();
                daemon.apply(&service().manifest(set.iter().copied()))?;
                until_written(&daemon, &lab, &expected)?;
                timeline.push((asked, Instant::now(), expected));
            }
            Ok(())
        })();
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let queries = clients.join().expect("clients panicked")?;
        churn?;
        Ok(queries)
    })?;

    // The pods a query sent at `sent` may meet: the set the maps held for sure (the last
    // one seen before), and any asked for but not yet seen.
    let may_serve = |sent: Instant| -> BTreeSet<String> {
        let settled = timeline
            .iter()
            .rposition(|(_, seen, _)| *seen <= sent)
            .expect("the first set holds from the start");
        timeline[settled..]
            .iter()
            .filter(|(asked, _, _)| *asked <= sent)
            .flat_map(|(_, _, pods)| pods.iter().cloned())
            .chain(timeline[settled].2.iter().cloned())
            .collect()
    };
    let lost = queries.iter().filter(|q| q.answered_by.is_none()).count();
    let by_removed: Vec<String> = queries
        .iter()
        .filter_map(|query| {
            let pod = query.answered_by.as_ref()?;
            let serving = may_serve(query.sent);
            (!serving.contains(pod)).then(|| {
                format!(
                    "a query sent {:?} after the start was answered by {pod}, not one of {serving:?}",
                    query.sent - started
                )
            })
        })
        .collect();
    println!(
        "{} queries over {changes} changes: {lost} lost, {} answered by a removed pod",
        queries.len(),
        by_removed.len()
    );
    ensure!(queries.len() > 500, "too few queries to mean anything");
    ensure!(
        lost == 0,
        "{lost} of {} queries got no answer",
        queries.len()
    );
    ensure!(by_removed.is_empty(), "{by_removed:#?}");
    Ok(())
}
