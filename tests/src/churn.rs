//! Endpoint churn under load (issue 14 item 1, issue 18 item 5): a Service's endpoints
//! change again and again — scaled between 1 and 10 backends, pods replaced — while
//! clients open TCP connections and send UDP queries continuously, a new socket each.
//!
//! One harness for every change source: the caller says how a set of endpoints reaches
//! the daemon (a rewritten manifest, an EndpointSlice update through the test API
//! server), the harness makes the changes, sees each set arrive in the maps (the CLI's
//! `services -o json`, and the daemon's `sync complete` after it) and holds every
//! connection against that timeline ([`Timeline`]):
//! - none fails, because the Service has a ready backend at every moment;
//! - none is served by a pod that had left the maps before it was opened and was in no
//!   set asked for before it ended (its packets leave at some moment in between);
//! - every UDP answer comes from the Service's address and port (reverse NAT), as a
//!   resolver requires.
//!
//! A failure says where a lost query was lost: the examples name the source port, and the
//! report holds what the datapath's counters and the UDP counters of the caller's and
//! every pod's namespace (`/proc/net/snmp`) counted while the clients ran
//! ([`crate::counters`]).
//!
//! UDP queries come from a few recurring source ports, as a resolver's do, so the conntrack
//! entry a port left behind names the pod its previous query went to, and tens of
//! thousands of older flows sit in conntrack throughout, so a cleanup that walked the
//! conntrack map after each write would show. Everything is bounded: the changes in count,
//! each change in time ([`ChurnSettings::settle_timeout`]), the clients by a stop flag and
//! a count.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::addr;
use crate::client::udp_exchange;
use crate::counters::Counters;
use crate::daemon::Daemon;
use crate::lab::{Lab, Pod};
use crate::manifest::Service;
use crate::netns::Netns;
use crate::rng::Rng;

/// The churned Service's ports (the pods serve the lab's echo ports).
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
/// Flows opened before the churn come from ports `OLDER_FLOWS_FIRST_PORT..`; the
/// recurring query ports lie above them.
const OLDER_FLOWS_FIRST_PORT: u16 = 20_000;
const QUERY_FIRST_PORT: u16 = 41_000;
/// Each client thread stops after this many attempts, should the churn never end.
const MAX_ATTEMPTS_PER_THREAD: usize = 1_000_000;
/// Pause between two reads of the maps while waiting for a set.
const POLL_PAUSE: Duration = Duration::from_millis(5);

/// The Service whose endpoints change: `churn` at [`addr::CLUSTER_IP`], TCP and UDP.
pub fn service() -> Service {
    Service::cluster_ip("churn", addr::CLUSTER_IP)
        .tcp(TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(UDP_PORT, addr::ECHO_UDP_PORT)
}

/// The scenario's sizes.
#[derive(Clone, Debug)]
pub struct ChurnSettings {
    /// Endpoint changes to make.
    pub changes: usize,
    /// pod-1 ..= pod-`servers` may serve; the pod after them is the caller.
    pub servers: usize,
    /// The fewest and most endpoints the Service has at any moment.
    pub min_backends: usize,
    pub max_backends: usize,
    pub tcp_threads: usize,
    pub udp_threads: u16,
    /// Each UDP thread cycles through this many source ports.
    pub ports_per_udp_thread: u16,
    /// Connect and answer timeout of one connection or query.
    pub answer_timeout: Duration,
    /// UDP flows opened before the churn (one query from each of as many ports).
    pub older_flows: u16,
    /// How long a set may take to reach the maps.
    pub settle_timeout: Duration,
    /// Fixes the sequence of sets.
    pub seed: u64,
}

impl ChurnSettings {
    /// The scenario with `changes` changes: 1 to 10 of 12 pods serve.
    pub fn with_changes(changes: usize) -> Self {
        Self {
            changes,
            servers: 12,
            min_backends: 1,
            max_backends: 10,
            tcp_threads: 2,
            udp_threads: 4,
            ports_per_udp_thread: 4,
            answer_timeout: Duration::from_secs(2),
            older_flows: 16_000,
            settle_timeout: Duration::from_secs(30),
            seed: 14,
        }
    }

    /// Pods the lab needs: the servers and the caller.
    pub fn pods(&self) -> usize {
        self.servers + 1
    }

    fn caller(&self) -> usize {
        self.servers + 1
    }
}

/// The sequence of endpoint sets: each change either scales the Service to another size
/// within the bounds (keeping the pods that stay) or replaces one to three of its pods
/// with pods it did not have, keeping the size — as a Deployment's scaling and rolling
/// update do. Sets are pod numbers (1-based), sorted.
#[derive(Clone, Debug)]
pub struct EndpointSets {
    servers: usize,
    min: usize,
    max: usize,
    rng: Rng,
    current: Vec<usize>,
}

impl EndpointSets {
    pub fn new(servers: usize, min: usize, max: usize, seed: u64) -> Self {
        assert!(
            1 <= min && min <= max && max < servers,
            "sizes {min}..={max} of {servers} servers leave no pod to replace with"
        );
        let mut sets = Self {
            servers,
            min,
            max,
            rng: Rng::new(seed),
            current: Vec::new(),
        };
        let size = sets.size();
        sets.current = sets.pick(size, &[]);
        sets
    }

    pub fn current(&self) -> &[usize] {
        &self.current
    }

    /// Moves to the next set and returns it.
    pub fn advance(&mut self) -> &[usize] {
        let mut next = if self.rng.below(2) == 0 {
            self.scaled()
        } else {
            self.replaced()
        };
        next.sort_unstable();
        self.current = next;
        &self.current
    }

    fn size(&mut self) -> usize {
        self.min + self.rng.below(self.max - self.min + 1)
    }

    /// Another size; the pods that stay are kept.
    fn scaled(&mut self) -> Vec<usize> {
        let mut size = self.size();
        while size == self.current.len() && self.min < self.max {
            size = self.size();
        }
        let mut kept = self.current.clone();
        while kept.len() > size {
            kept.swap_remove(self.rng.below(kept.len()));
        }
        let added = self.pick(size - kept.len(), &kept);
        kept.extend(added);
        kept
    }

    /// The same size, one to three pods swapped for pods outside the set.
    fn replaced(&mut self) -> Vec<usize> {
        let outside = self.servers - self.current.len();
        let count = (1 + self.rng.below(3)).min(outside).min(self.current.len());
        let mut kept = self.current.clone();
        for _ in 0..count {
            kept.swap_remove(self.rng.below(kept.len()));
        }
        let current = self.current.clone();
        kept.extend(self.pick(count, &current));
        kept
    }

    /// `count` distinct pods, none of them in `avoid`.
    fn pick(&mut self, count: usize, avoid: &[usize]) -> Vec<usize> {
        let mut picked: Vec<usize> = Vec::with_capacity(count);
        while picked.len() < count {
            let pod = 1 + self.rng.below(self.servers);
            if !avoid.contains(&pod) && !picked.contains(&pod) {
                picked.push(pod);
            }
        }
        picked
    }
}

/// When each set of endpoints was asked for (written to the source) and when the maps
/// were seen holding it. The datapath holds a set from some moment in between.
#[derive(Clone, Debug)]
pub struct Timeline {
    sets: Vec<TimedSet>,
}

#[derive(Clone, Debug)]
struct TimedSet {
    asked: Instant,
    seen: Instant,
    pods: BTreeSet<String>,
}

impl Timeline {
    /// Starts with `pods`, in the maps since `since`.
    pub fn new(since: Instant, pods: BTreeSet<String>) -> Self {
        Self {
            sets: vec![TimedSet {
                asked: since,
                seen: since,
                pods,
            }],
        }
    }

    /// A set asked for at `asked` and seen in the maps at `seen`.
    pub fn push(&mut self, asked: Instant, seen: Instant, pods: BTreeSet<String>) {
        self.sets.push(TimedSet { asked, seen, pods });
    }

    /// The pods a connection in flight from `opened` to `ended` may reach: those of the
    /// set the maps held for sure when it was opened (the last one seen before), and of
    /// every set asked for before it ended (its packets leave at some moment in between).
    /// A pod that left the maps before `opened` and came back in no set asked for by
    /// `ended` is never among them. Before the timeline starts, the first set holds.
    pub fn may_serve(&self, opened: Instant, ended: Instant) -> BTreeSet<String> {
        let settled = self
            .sets
            .iter()
            .rposition(|set| set.seen <= opened)
            .unwrap_or(0);
        self.sets[settled..]
            .iter()
            .enumerate()
            .filter(|(index, set)| *index == 0 || set.asked <= ended)
            .flat_map(|(_, set)| set.pods.iter().cloned())
            .collect()
    }
}

/// One connection or query: when it was opened, when it ended and who answered (an
/// error: nobody).
#[derive(Clone, Debug)]
struct Attempt {
    opened: Instant,
    ended: Instant,
    /// The client's source port, for a UDP query (its flow's key in conntrack).
    source_port: Option<u16>,
    answer: Result<String, String>,
    /// A UDP answer's source when it was not the Service's address and port: its reverse
    /// NAT did not happen.
    untranslated_from: Option<SocketAddr>,
}

/// What the clients of one protocol saw.
#[derive(Clone, Debug, Default)]
pub struct ProtocolCounts {
    pub attempts: usize,
    /// Not answered (a failed connect, a reset, a timeout).
    pub failed: usize,
    /// Answered by a pod the maps no longer held when the attempt was opened.
    pub by_removed: usize,
    /// Answered from another source than the Service's address and port (UDP: the reply
    /// was not reverse-translated; a resolver would drop it).
    pub untranslated: usize,
}

/// What a churn run saw.
#[derive(Clone, Debug)]
pub struct ChurnReport {
    pub changes: usize,
    pub elapsed: Duration,
    /// The slowest set's time from its write to the maps (its sync complete, its slots in
    /// the CLI's view).
    pub slowest_change: Duration,
    pub tcp: ProtocolCounts,
    pub udp: ProtocolCounts,
    /// The first few violations, described.
    pub examples: Vec<String>,
    /// What the datapath and the kernel (UDP counters of the caller and every pod)
    /// counted while the clients ran: where a lost query was lost.
    pub counters: String,
}

impl ChurnReport {
    /// Fails unless every attempt was answered, none by a removed pod, and each protocol
    /// made enough attempts to mean something.
    pub fn check(&self) -> Result<()> {
        for (name, counts) in [("TCP", &self.tcp), ("UDP", &self.udp)] {
            ensure!(
                counts.attempts >= self.changes,
                "{name}: {} attempts over {} changes: too few to mean anything",
                counts.attempts,
                self.changes
            );
            ensure!(
                counts.failed == 0 && counts.by_removed == 0 && counts.untranslated == 0,
                "{self}\n{:#?}\nwhile the clients ran:\n{}",
                self.examples,
                self.counters
            );
        }
        Ok(())
    }
}

impl fmt::Display for ChurnReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} endpoint changes in {:.1} s (slowest programmed after {} ms): ",
            self.changes,
            self.elapsed.as_secs_f64(),
            self.slowest_change.as_millis()
        )?;
        for (name, counts, unit) in [
            ("TCP", &self.tcp, "connections"),
            ("UDP", &self.udp, "queries"),
        ] {
            write!(
                f,
                "{name} {} {unit}, {} failed, {} to a removed pod, {} untranslated; ",
                counts.attempts, counts.failed, counts.by_removed, counts.untranslated
            )?;
        }
        Ok(())
    }
}

/// A churn run on a lab of [`ChurnSettings::pods`] pods.
pub struct Churn<'lab> {
    lab: &'lab Lab,
    settings: ChurnSettings,
    sets: EndpointSets,
}

impl<'lab> Churn<'lab> {
    pub fn new(lab: &'lab Lab, settings: ChurnSettings) -> Result<Self> {
        ensure!(
            lab.pods().len() >= settings.pods(),
            "the churn needs {} pods, the lab has {}",
            settings.pods(),
            lab.pods().len()
        );
        let sets = EndpointSets::new(
            settings.servers,
            settings.min_backends,
            settings.max_backends,
            settings.seed,
        );
        Ok(Self {
            lab,
            settings,
            sets,
        })
    }

    /// The pods serving now: the first set before [`Churn::run`], which the caller gives
    /// the daemon before starting it.
    pub fn current(&self) -> Vec<&'lab Pod> {
        let lab = self.lab;
        (self.sets.current().iter())
            .map(|&number| lab.pod(number))
            .collect()
    }

    /// Makes the changes through `apply` (which hands a set of endpoints to the daemon's
    /// source) while the clients run, and reports what they saw. `daemon` has synced the
    /// first set.
    pub fn run(
        &mut self,
        daemon: &Daemon,
        mut apply: impl FnMut(&[&'lab Pod]) -> Result<()>,
    ) -> Result<ChurnReport> {
        let Self {
            lab,
            settings,
            sets,
        } = self;
        let lab: &'lab Lab = lab;
        let pods_of = |numbers: &[usize]| -> Vec<&'lab Pod> {
            numbers.iter().map(|&number| lab.pod(number)).collect()
        };
        let first = names(&pods_of(sets.current()));
        until_programmed(daemon, lab, &first, 0, settings.settle_timeout)?;
        let caller = &lab.pod(settings.caller()).ns;
        open_older_flows(caller, settings)?;
        let namespaces: Vec<(String, &Netns)> = (1..=settings.caller())
            .map(|number| lab.pod(number))
            .map(|pod| (pod.name.clone(), &pod.ns))
            .collect();
        let counters_before = Counters::read(daemon, &namespaces)?;
        let started = Instant::now();
        let mut timeline = Timeline::new(started, first);
        let mut slowest_change = Duration::ZERO;
        let stop = AtomicBool::new(false);
        let (attempts, churned) = std::thread::scope(|scope| {
            let clients = scope.spawn(|| clients(caller, settings, &stop));
            let churned = (|| -> Result<()> {
                for _ in 0..settings.changes {
                    let pods = pods_of(sets.advance());
                    let expected = names(&pods);
                    let synced = daemon.syncs();
                    let asked = Instant::now();
                    apply(&pods)?;
                    until_programmed(daemon, lab, &expected, synced, settings.settle_timeout)?;
                    let seen = Instant::now();
                    slowest_change = slowest_change.max(seen - asked);
                    timeline.push(asked, seen, expected);
                }
                Ok(())
            })();
            // The last set, under traffic for a moment too.
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
            let attempts = clients.join().expect("client threads panicked");
            (attempts, churned)
        });
        churned?;
        let (tcp, udp) = attempts?;
        let counters = Counters::read(daemon, &namespaces)?.since(&counters_before);
        let mut examples = Vec::new();
        let mut count = |protocol: &str, attempts: &[Attempt]| -> ProtocolCounts {
            let mut counts = ProtocolCounts {
                attempts: attempts.len(),
                ..ProtocolCounts::default()
            };
            for attempt in attempts {
                let since = attempt.opened.saturating_duration_since(started);
                let took = attempt.ended - attempt.opened;
                let from = attempt
                    .source_port
                    .map(|port| format!(" from port {port}"))
                    .unwrap_or_default();
                let problem = match (&attempt.answer, attempt.untranslated_from) {
                    (Err(error), _) => {
                        counts.failed += 1;
                        format!(
                            "{protocol}{from} opened {since:?} after the start, for {took:?}: \
                             {error}"
                        )
                    }
                    (Ok(pod), Some(source)) => {
                        counts.untranslated += 1;
                        format!(
                            "{protocol}{from} opened {since:?} after the start, for {took:?}, \
                             answered by {pod} from {source}, not from the Service's address"
                        )
                    }
                    (Ok(pod), None) => {
                        let allowed = timeline.may_serve(attempt.opened, attempt.ended);
                        if allowed.contains(pod) {
                            continue;
                        }
                        counts.by_removed += 1;
                        format!(
                            "{protocol}{from} opened {since:?} after the start, for {took:?}, \
                             answered by {pod}, not one of {allowed:?}"
                        )
                    }
                };
                if examples.len() < 20 {
                    examples.push(problem);
                }
            }
            counts
        };
        let tcp = count("TCP", &tcp);
        let udp = count("UDP", &udp);
        Ok(ChurnReport {
            changes: settings.changes,
            elapsed: started.elapsed(),
            slowest_change,
            tcp,
            udp,
            examples,
            counters,
        })
    }
}

/// One query from each of `older_flows` ports: that many flows in conntrack.
fn open_older_flows(caller: &Netns, settings: &ChurnSettings) -> Result<()> {
    for index in 0..settings.older_flows {
        let socket =
            caller.udp_socket_from(OLDER_FLOWS_FIRST_PORT + index, settings.answer_timeout)?;
        let reply = udp_exchange(&socket, addr::CLUSTER_IP, UDP_PORT)
            .with_context(|| format!("query {index} before the churn"))?;
        ensure!(
            reply.peer == SocketAddr::from((addr::CLUSTER_IP, UDP_PORT)),
            "query {index} before the churn answered from {}",
            reply.peer
        );
    }
    Ok(())
}

/// TCP clients (a new connection with one request each) and resolver-like UDP clients
/// (each thread cycles through its ports, a new socket per query), until `stop`.
fn clients(
    caller: &Netns,
    settings: &ChurnSettings,
    stop: &AtomicBool,
) -> Result<(Vec<Attempt>, Vec<Attempt>)> {
    let timeout = settings.answer_timeout;
    let service_address = SocketAddr::from((addr::CLUSTER_IP, UDP_PORT));
    let keep_going = |made: usize| !stop.load(Ordering::Relaxed) && made < MAX_ATTEMPTS_PER_THREAD;
    std::thread::scope(|scope| {
        let tcp: Vec<_> = (0..settings.tcp_threads)
            .map(|_| {
                scope.spawn(move || {
                    let mut attempts = Vec::new();
                    while keep_going(attempts.len()) {
                        let opened = Instant::now();
                        let answer = caller
                            .tcp_connect(addr::CLUSTER_IP, TCP_PORT, timeout)
                            .map_err(anyhow::Error::from)
                            .and_then(|mut session| {
                                let pod = session.request()?;
                                session.reset_on_close()?;
                                Ok(pod)
                            })
                            .map_err(|error| format!("{error:#}"));
                        let ended = Instant::now();
                        attempts.push(Attempt {
                            opened,
                            ended,
                            source_port: None,
                            answer,
                            untranslated_from: None,
                        });
                    }
                    attempts
                })
            })
            .collect();
        let udp: Vec<_> = (0..settings.udp_threads)
            .map(|thread| {
                let first = QUERY_FIRST_PORT + thread * 100;
                let ports = (first..first + settings.ports_per_udp_thread).cycle();
                scope.spawn(move || -> Result<Vec<Attempt>> {
                    let mut attempts = Vec::new();
                    for port in ports {
                        if !keep_going(attempts.len()) {
                            break;
                        }
                        let socket = caller.udp_socket_from(port, timeout)?;
                        let opened = Instant::now();
                        let reply = udp_exchange(&socket, addr::CLUSTER_IP, UDP_PORT);
                        let ended = Instant::now();
                        let untranslated_from = (reply.as_ref().ok())
                            .map(|reply| reply.peer)
                            .filter(|peer| *peer != service_address);
                        attempts.push(Attempt {
                            opened,
                            ended,
                            source_port: Some(port),
                            answer: reply
                                .map(|reply| reply.body)
                                .map_err(|error| error.to_string()),
                            untranslated_from,
                        });
                    }
                    Ok(attempts)
                })
            })
            .collect();
        let mut tcp_attempts = Vec::new();
        for thread in tcp {
            tcp_attempts.extend(thread.join().expect("a TCP client panicked"));
        }
        let mut udp_attempts = Vec::new();
        for thread in udp {
            udp_attempts.extend(thread.join().expect("a UDP client panicked")?);
        }
        Ok((tcp_attempts, udp_attempts))
    })
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|pod| pod.name.clone()).collect()
}

/// Waits until both frontends of the churned Service (TCP and UDP) hold exactly `expected`
/// as backends, as the daemon's `services -o json` lists them, and the daemon has completed
/// a sync since it had completed `synced`: the slots are written before the membership
/// that moves flows off a removed pod and the epoch that makes the datapath look, so a
/// change is programmed when its sync is complete, not when its slots show.
fn until_programmed(
    daemon: &Daemon,
    lab: &Lab,
    expected: &BTreeSet<String>,
    synced: usize,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let serving = serving(daemon, lab)?;
        let held = serving.iter().all(|pods| pods == expected) && serving.len() == 2;
        if held && daemon.syncs() > synced {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the maps never held {expected:?} within {timeout:?}: they hold {serving:?}"
        );
        std::thread::sleep(POLL_PAUSE);
    }
}

/// The pods behind each frontend of the churned Service's VIP.
fn serving(daemon: &Daemon, lab: &Lab) -> Result<Vec<BTreeSet<String>>> {
    let text = daemon.cli(&["services", "-o", "json"])?;
    let frontends: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    let vip = addr::CLUSTER_IP.to_string();
    let pod_of = |address: &str| -> Option<String> {
        let address: Ipv4Addr = address.parse().ok()?;
        let pod = lab.pods().iter().find(|pod| pod.ip == address)?;
        Some(pod.name.clone())
    };
    Ok(frontends
        .as_array()
        .context("services is an array")?
        .iter()
        .filter(|frontend| frontend["address"] == vip.as_str())
        .map(|frontend| {
            (frontend["backends"].as_array().into_iter().flatten())
                .filter_map(|backend| pod_of(backend["address"].as_str()?))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_stay_within_their_sizes_and_both_scale_and_replace() {
        let mut sets = EndpointSets::new(12, 1, 10, 7);
        let (mut scaled, mut replaced) = (0, 0);
        let mut sizes = BTreeSet::new();
        for _ in 0..2_000 {
            let before = sets.current().to_vec();
            let after = sets.advance().to_vec();
            assert!((1..=10).contains(&after.len()), "{after:?}");
            assert!(after.iter().all(|pod| (1..=12).contains(pod)), "{after:?}");
            let distinct: BTreeSet<_> = after.iter().collect();
            assert_eq!(distinct.len(), after.len(), "{after:?}");
            assert_ne!(before, after, "a change that changes nothing");
            sizes.insert(after.len());
            if before.len() == after.len() {
                replaced += 1;
                let swapped = after.iter().filter(|pod| !before.contains(pod)).count();
                assert!((1..=3).contains(&swapped), "{before:?} → {after:?}");
            } else {
                scaled += 1;
                let (small, large) = if before.len() < after.len() {
                    (&before, &after)
                } else {
                    (&after, &before)
                };
                assert!(
                    small.iter().all(|pod| large.contains(pod)),
                    "{before:?} → {after:?}"
                );
            }
        }
        assert!(
            scaled > 500 && replaced > 500,
            "{scaled} scaled, {replaced} replaced"
        );
        assert_eq!(sizes, (1..=10).collect());
    }

    #[test]
    fn sets_repeat_for_a_seed() {
        let run = |seed| {
            let mut sets = EndpointSets::new(12, 1, 10, seed);
            (0..50).map(|_| sets.advance().to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    fn pods(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn a_connection_may_reach_the_settled_set_and_those_asked_for_while_in_flight() {
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let mut timeline = Timeline::new(start, pods(&["a", "b"]));
        // {c} asked at 10, seen at 20; {d} asked at 30, seen at 40.
        timeline.push(at(10), at(20), pods(&["c"]));
        timeline.push(at(30), at(40), pods(&["d"]));
        let point = |ms| timeline.may_serve(at(ms), at(ms));
        assert_eq!(point(5), pods(&["a", "b"]));
        assert_eq!(point(10), pods(&["a", "b", "c"]));
        assert_eq!(point(20), pods(&["c"]));
        assert_eq!(point(35), pods(&["c", "d"]));
        assert_eq!(point(40), pods(&["d"]));
        assert_eq!(point(1_000), pods(&["d"]));
        // In flight from 5 to 12: {c} was asked for meanwhile; from 21 to 31: {d}.
        assert_eq!(timeline.may_serve(at(5), at(12)), pods(&["a", "b", "c"]));
        assert_eq!(timeline.may_serve(at(21), at(31)), pods(&["c", "d"]));
        // Opened after {d} was seen: a and b, c left for good.
        assert_eq!(timeline.may_serve(at(41), at(1_000)), pods(&["d"]));
        // Opened before the start: the first set.
        let before = start.checked_sub(Duration::from_millis(1)).unwrap_or(start);
        assert_eq!(timeline.may_serve(before, before), pods(&["a", "b"]));
    }

    #[test]
    fn the_report_fails_on_any_failure_or_removed_pod_and_on_too_little_traffic() {
        let counts = |attempts, failed, by_removed| ProtocolCounts {
            attempts,
            failed,
            by_removed,
            untranslated: 0,
        };
        let report = |tcp, udp| ChurnReport {
            changes: 10,
            elapsed: Duration::from_secs(1),
            slowest_change: Duration::from_millis(50),
            tcp,
            udp,
            examples: Vec::new(),
            counters: String::new(),
        };
        assert!(report(counts(100, 0, 0), counts(100, 0, 0)).check().is_ok());
        let untranslated = ProtocolCounts {
            untranslated: 1,
            ..counts(100, 0, 0)
        };
        assert!(report(counts(100, 0, 0), untranslated).check().is_err());
        assert!(
            report(counts(100, 1, 0), counts(100, 0, 0))
                .check()
                .is_err()
        );
        assert!(
            report(counts(100, 0, 0), counts(100, 0, 1))
                .check()
                .is_err()
        );
        assert!(report(counts(5, 0, 0), counts(100, 0, 0)).check().is_err());
    }
}
