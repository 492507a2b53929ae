//! Measurement 2, end to end in the netns lab: new TCP connections per second and connect
//! latency from a pod through a ClusterIP, for ebpf-proxy (the real daemon) translating at
//! the socket (`--socket-lb all`: once, at `connect()`) or per packet (tc only),
//! kube-proxy-shaped iptables and nftables rules for the same Services, and straight to the
//! pods with no proxy as the floor. The calling pod is no backend.
//!
//! Every variant gets a lab of its own, so no state (conntrack, rules) leaks between them,
//! and the same load settings and target sequences. The eight labs stand side by side and
//! the variants take turns run by run, so a noisy spell of the machine hits them all
//! alike rather than posing as a difference between them. Services are all served by the
//! lab's pods; kube-proxy still writes one endpoint chain per Service and pod, and every
//! connection goes to a random Service, so the iptables walk is on average half of
//! KUBE-SERVICES long. For ebpf-proxy, the daemon's CPU time during each measured run is
//! reported too.
//!
//! IPv6 beside IPv4: the same Services as single-stack IPv6 ones (IPv6 ClusterIPs, the
//! pods' IPv6 addresses as endpoints) served by the daemon at the socket (`connect6`) and
//! by its tc program, and straight to the pods' IPv6 addresses as that family's floor.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use proxy_lab::{Daemon, Lab, Netns, Placement};

use crate::cluster::{Cluster, Endpoints, ipv6_twin};
use crate::daemon;
use crate::netfilter::{self, Loaded, Netfilter};
use crate::stats::{Summary, percentile_of_sorted};
use proxy_lab::load::{self, LoadReport, LoadSettings};

/// How a connection reaches a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Direct,
    /// The daemon with `--socket-lb all`: the caller's `connect()` is translated.
    EbpfProxySocketLb,
    /// The daemon translating packets (tc) only.
    EbpfProxyTc,
    Iptables,
    Nftables,
    /// Straight to the pods' IPv6 addresses.
    DirectIpv6,
    /// The daemon translating at `connect()` (`connect6`) to IPv6 ClusterIPs.
    EbpfProxySocketLbIpv6,
    /// The daemon translating packets (tc) to IPv6 ClusterIPs.
    EbpfProxyTcIpv6,
}

pub const VARIANTS: [Variant; 8] = [
    Variant::Direct,
    Variant::EbpfProxySocketLb,
    Variant::EbpfProxyTc,
    Variant::Iptables,
    Variant::Nftables,
    Variant::DirectIpv6,
    Variant::EbpfProxySocketLbIpv6,
    Variant::EbpfProxyTcIpv6,
];

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct (no proxy)",
            Variant::EbpfProxySocketLb => "ebpf-proxy, socket LB (--socket-lb all)",
            Variant::EbpfProxyTc => "ebpf-proxy, tc only",
            Variant::Iptables => "iptables (kube-proxy shape)",
            Variant::Nftables => "nftables (kube-proxy shape)",
            Variant::DirectIpv6 => "IPv6: direct (no proxy)",
            Variant::EbpfProxySocketLbIpv6 => "IPv6: ebpf-proxy, socket LB",
            Variant::EbpfProxyTcIpv6 => "IPv6: ebpf-proxy, tc only",
        }
    }

    /// Connects over IPv6 (to IPv6 ClusterIPs, or the pods' IPv6 addresses).
    pub fn ipv6(self) -> bool {
        matches!(
            self,
            Variant::DirectIpv6 | Variant::EbpfProxySocketLbIpv6 | Variant::EbpfProxyTcIpv6
        )
    }

    /// The floor of this variant's family: straight to the pods.
    pub fn direct(self) -> Variant {
        if self.ipv6() {
            Variant::DirectIpv6
        } else {
            Variant::Direct
        }
    }

    /// The kube-proxy mode this variant loads, if any.
    fn netfilter(self) -> Option<Netfilter> {
        match self {
            Variant::Iptables => Some(Netfilter::Iptables),
            Variant::Nftables => Some(Netfilter::Nftables),
            Variant::Direct
            | Variant::EbpfProxySocketLb
            | Variant::EbpfProxyTc
            | Variant::DirectIpv6
            | Variant::EbpfProxySocketLbIpv6
            | Variant::EbpfProxyTcIpv6 => None,
        }
    }

    /// The daemon's `--socket-lb`, for the daemon's variants.
    fn socket_lb(self) -> Option<&'static str> {
        match self {
            Variant::EbpfProxySocketLb | Variant::EbpfProxySocketLbIpv6 => Some("all"),
            Variant::EbpfProxyTc | Variant::EbpfProxyTcIpv6 => Some("off"),
            Variant::Direct | Variant::Iptables | Variant::Nftables | Variant::DirectIpv6 => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    pub sizes: Vec<usize>,
    pub pods: usize,
    pub load: LoadSettings,
    pub runs: usize,
    /// Connections before the timed runs (they also prove every path works).
    pub warmup: usize,
    pub rules_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct ConnectionResult {
    pub variant: Variant,
    pub services: usize,
    pub rate: Summary,
    /// Connect latency in microseconds, per-run percentiles summarized over the runs.
    pub p50_us: Summary,
    pub p99_us: Summary,
    pub completed: usize,
    pub failed: usize,
    /// ebpf-proxy only: the daemon's CPU seconds (user + system) during each measured run.
    pub daemon_cpu_seconds: Option<Summary>,
}

pub fn measure(settings: &ConnectionSettings) -> Result<Vec<ConnectionResult>> {
    let mut results = Vec::new();
    for &services in &settings.sizes {
        let at_size = measure_size(services, settings)
            .with_context(|| format!("connections at {services} Services"))?;
        for result in &at_size {
            eprintln!(
                "  {services} Services, {}: {:.0} connections/s",
                result.variant.label(),
                result.rate.median
            );
        }
        results.extend(at_size);
    }
    Ok(results)
}

/// One variant, ready to take load.
struct Prepared<'lab> {
    variant: Variant,
    caller: &'lab Netns,
    /// With socket LB: the caller's sockets are made in the daemon's cgroup.
    _placement: Option<Placement<'lab>>,
    daemon: Option<Daemon<'lab>>,
    targets: Vec<SocketAddr>,
}

/// What the runs of one variant measured.
#[derive(Default)]
struct Samples {
    load: LoadSamples,
    cpu_seconds: Vec<f64>,
}

/// What the load generator's runs of one variant saw: per run the rate and the connect
/// latency's p50 and p99 (µs), and the connections over all runs.
#[derive(Default)]
pub struct LoadSamples {
    pub rates: Vec<f64>,
    pub p50s: Vec<f64>,
    pub p99s: Vec<f64>,
    pub completed: usize,
    pub failed: usize,
}

impl LoadSamples {
    /// Adds one run.
    pub fn record(&mut self, report: &LoadReport) -> Result<()> {
        self.completed += report.completed;
        self.failed += report.failed;
        self.rates.push(report.connections_per_second());
        let mut latencies: Vec<f64> = report
            .connect_latencies
            .iter()
            .map(|latency| latency.as_secs_f64() * 1e6)
            .collect();
        latencies.sort_by(f64::total_cmp);
        let percentile = |p| percentile_of_sorted(&latencies, p).context("no connection completed");
        self.p50s.push(percentile(50.0)?);
        self.p99s.push(percentile(99.0)?);
        Ok(())
    }
}

fn measure_size(services: usize, settings: &ConnectionSettings) -> Result<Vec<ConnectionResult>> {
    // The last pod calls; the others serve.
    let labs = VARIANTS
        .iter()
        .map(|_| Lab::builder().pods(settings.pods + 1).build())
        .collect::<Result<Vec<Lab>>>()?;
    let prepared = VARIANTS
        .iter()
        .zip(&labs)
        .map(|(&variant, lab)| {
            prepare(variant, lab, services, settings)
                .with_context(|| format!("preparing {}", variant.label()))
        })
        .collect::<Result<Vec<Prepared>>>()?;
    let mut samples: Vec<Samples> = prepared.iter().map(|_| Samples::default()).collect();
    for run in 0..settings.runs {
        for (variant, samples) in prepared.iter().zip(&mut samples) {
            let cpu_before = variant
                .daemon
                .as_ref()
                .map(daemon_cpu_seconds)
                .transpose()?;
            let report =
                load::generate(variant.caller, &variant.targets, &settings.load, run as u64)?;
            if let (Some(before), Some(daemon)) = (cpu_before, &variant.daemon) {
                samples
                    .cpu_seconds
                    .push(daemon_cpu_seconds(daemon)? - before);
            }
            samples.load.record(&report)?;
        }
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    prepared
        .iter()
        .zip(samples)
        .map(|(variant, samples)| {
            Ok(ConnectionResult {
                variant: variant.variant,
                services,
                rate: summary(&samples.load.rates)?,
                p50_us: summary(&samples.load.p50s)?,
                p99_us: summary(&samples.load.p99s)?,
                completed: samples.load.completed,
                failed: samples.load.failed,
                daemon_cpu_seconds: Summary::of(&samples.cpu_seconds),
            })
        })
        .collect()
}

/// Starts the daemon or loads the rules of `variant` in `lab`, and warms it up.
fn prepare<'lab>(
    variant: Variant,
    lab: &'lab Lab,
    services: usize,
    settings: &ConnectionSettings,
) -> Result<Prepared<'lab>> {
    let (caller, serving) = lab.pods().split_last().context("a lab without pods")?;
    let pods: Vec<Ipv4Addr> = serving.iter().map(|pod| pod.ip).collect();
    let ipv6_of: HashMap<Ipv4Addr, Ipv6Addr> =
        serving.iter().map(|pod| (pod.ip, pod.ipv6)).collect();
    let cluster = Cluster::new(
        services,
        Endpoints::Shared {
            pods: pods.clone(),
            port: lab.tcp_port(),
        },
    )?;
    let daemon = match variant.socket_lb() {
        Some(socket_lb) => {
            let sizes = daemon::map_size_flags(services, pods.len());
            let mut args: Vec<&str> = sizes.iter().map(String::as_str).collect();
            args.extend(["--socket-lb", socket_lb]);
            let manifest = if variant.ipv6() {
                proxy_lab::Manifest {
                    file_name: "bench.yaml".to_owned(),
                    yaml: cluster.ipv6_manifest(|pod| ipv6_of[&pod]),
                }
            } else {
                daemon::cluster_manifest(&cluster)
            };
            Some(daemon::start(
                lab,
                daemon::Source::Manifests(vec![manifest]),
                &args,
                services,
            )?)
        }
        None => None,
    };
    let placement = match (&daemon, variant) {
        (Some(daemon), Variant::EbpfProxySocketLb | Variant::EbpfProxySocketLbIpv6) => {
            Some(caller.ns.place_in(daemon.cgroup()))
        }
        _ => None,
    };
    if let Some(mode) = variant.netfilter() {
        // The rate is measured with the rules in place; how long kube-proxy's one
        // transaction takes to load is the programming section's measurement.
        let parts = mode.rules_in_parts(&cluster);
        match netfilter::load_parts(lab.node(), mode, &parts, settings.rules_timeout)? {
            Loaded::In(took) => eprintln!(
                "  {services} Services, {}: rules loaded in {:.1} s ({} {})",
                variant.label(),
                took.as_secs_f64(),
                parts.len(),
                if parts.len() == 1 { "part" } else { "parts" }
            ),
            Loaded::StoppedAfter(after) => {
                bail!("loading the rules took longer than {after:?}")
            }
        }
    }
    let targets: Vec<SocketAddr> = match variant {
        Variant::Direct => pods
            .iter()
            .map(|pod| SocketAddr::new((*pod).into(), lab.tcp_port()))
            .collect(),
        Variant::DirectIpv6 => serving
            .iter()
            .map(|pod| SocketAddr::new(pod.ipv6.into(), lab.tcp_port()))
            .collect(),
        Variant::EbpfProxySocketLbIpv6 | Variant::EbpfProxyTcIpv6 => cluster
            .iter()
            .map(|service| SocketAddr::new(ipv6_twin(service.vip).into(), service.port))
            .collect(),
        _ => cluster
            .iter()
            .map(|service| SocketAddr::new(service.vip.into(), service.port))
            .collect(),
    };
    let warmup = LoadSettings {
        max_connections: settings.warmup,
        duration: Duration::from_secs(60),
        ..settings.load.clone()
    };
    let report = load::generate(&caller.ns, &targets, &warmup, u64::MAX)?;
    ensure!(
        report.failed == 0 && report.completed > 0,
        "warm-up: {} of {} connections failed",
        report.failed,
        report.failed + report.completed
    );
    if let Some(daemon) = &daemon {
        ensure_translated_where_expected(variant, daemon, report.completed)?;
    }
    Ok(Prepared {
        variant,
        caller: &caller.ns,
        _placement: placement,
        daemon,
        targets,
    })
}

/// The warm-up went the way the variant says: with socket LB every connection was
/// translated at `connect()`, without it none was.
fn ensure_translated_where_expected(
    variant: Variant,
    daemon: &Daemon,
    warmup: usize,
) -> Result<()> {
    let stats = daemon.cli(&["stats", "-o", "json"])?;
    let stats: serde_json::Value = serde_json::from_str(&stats)?;
    let translated = stats["counters"]
        .as_array()
        .and_then(|counters| {
            counters
                .iter()
                .find(|counter| counter["name"] == "sock_connect")
        })
        .and_then(|counter| counter["value"].as_u64())
        .context("no sock_connect counter")?;
    match variant {
        Variant::EbpfProxySocketLb | Variant::EbpfProxySocketLbIpv6 => ensure!(
            translated >= warmup as u64,
            "socket LB translated {translated} of {warmup} warm-up connections"
        ),
        _ => ensure!(
            translated == 0,
            "tc only, yet {translated} connections translated at the socket"
        ),
    }
    Ok(())
}

/// The daemon's CPU time so far (user + system), from /proc/<pid>/stat.
fn daemon_cpu_seconds(daemon: &Daemon) -> Result<f64> {
    let pid = daemon.pid().context("the daemon is not running")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("unreadable /proc/<pid>/stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/<pid>/stat")?
        .iter()
        .map(|field| field.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / per_second.max(1) as f64)
}
