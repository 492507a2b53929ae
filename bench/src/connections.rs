//! Measurement 2, end to end in the netns lab: new TCP connections per second and connect
//! latency from the client namespace through a ClusterIP, for ebpf-proxy (the real daemon),
//! kube-proxy-shaped iptables and nftables rules for the same Services, and straight to the
//! pods with no proxy as the floor.
//!
//! Every variant gets a fresh lab, so no state (conntrack, rules) leaks between them, and
//! the same load settings and target sequences. Services are all served by the lab's
//! pods; kube-proxy still writes one endpoint chain per Service and pod, and every
//! connection goes to a random Service, so the iptables walk is on average half of
//! KUBE-SERVICES long.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use proxy_lab::Lab;

use crate::cluster::{Cluster, Endpoints};
use crate::daemon;
use crate::netfilter::{self, Loaded, Netfilter};
use crate::stats::{Summary, percentile_of_sorted};
use proxy_lab::load::{self, LoadSettings};

/// How a connection reaches a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Direct,
    EbpfProxy,
    Iptables,
    Nftables,
}

pub const VARIANTS: [Variant; 4] = [
    Variant::Direct,
    Variant::EbpfProxy,
    Variant::Iptables,
    Variant::Nftables,
];

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct (no proxy)",
            Variant::EbpfProxy => "ebpf-proxy",
            Variant::Iptables => "iptables (kube-proxy shape)",
            Variant::Nftables => "nftables (kube-proxy shape)",
        }
    }

    /// The kube-proxy mode this variant loads, if any.
    fn netfilter(self) -> Option<Netfilter> {
        match self {
            Variant::Iptables => Some(Netfilter::Iptables),
            Variant::Nftables => Some(Netfilter::Nftables),
            Variant::Direct | Variant::EbpfProxy => None,
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
}

pub fn measure(settings: &ConnectionSettings) -> Result<Vec<ConnectionResult>> {
    let mut results = Vec::new();
    for &services in &settings.sizes {
        for variant in VARIANTS {
            let result = measure_one(variant, services, settings).with_context(|| {
                format!("connections via {} at {services} Services", variant.label())
            })?;
            eprintln!(
                "  {services} Services, {}: {:.0} connections/s",
                variant.label(),
                result.rate.median
            );
            results.push(result);
        }
    }
    Ok(results)
}

fn measure_one(
    variant: Variant,
    services: usize,
    settings: &ConnectionSettings,
) -> Result<ConnectionResult> {
    let lab = Lab::builder().pods(settings.pods).build()?;
    let pods: Vec<Ipv4Addr> = lab.pods().iter().map(|pod| pod.ip).collect();
    let cluster = Cluster::new(
        services,
        Endpoints::Shared {
            pods: pods.clone(),
            port: lab.tcp_port(),
        },
    )?;
    // Declared after the lab: stopped before its namespaces go.
    let _daemon = match variant {
        Variant::EbpfProxy => Some(daemon::start(
            &lab,
            vec![daemon::cluster_manifest(&cluster)],
            &[],
            services,
        )?),
        _ => None,
    };
    if let Some(mode) = variant.netfilter() {
        let rules = mode.rules(&cluster);
        if let Loaded::StoppedAfter(after) =
            netfilter::load(lab.node(), mode, &rules, settings.rules_timeout)?
        {
            bail!("loading the rules took longer than {after:?}");
        }
    }
    let targets: Vec<SocketAddrV4> = match variant {
        Variant::Direct => pods
            .iter()
            .map(|pod| SocketAddrV4::new(*pod, lab.tcp_port()))
            .collect(),
        _ => cluster
            .iter()
            .map(|service| SocketAddrV4::new(service.vip, service.port))
            .collect(),
    };

    let warmup = LoadSettings {
        max_connections: settings.warmup,
        duration: Duration::from_secs(60),
        ..settings.load.clone()
    };
    let report = load::generate(lab.client(), &targets, &warmup, u64::MAX)?;
    ensure!(
        report.failed == 0 && report.completed > 0,
        "warm-up: {} of {} connections failed",
        report.failed,
        report.failed + report.completed
    );

    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let (mut completed, mut failed) = (0, 0);
    for run in 0..settings.runs {
        let report = load::generate(lab.client(), &targets, &settings.load, run as u64)?;
        completed += report.completed;
        failed += report.failed;
        rates.push(report.connections_per_second());
        let mut latencies: Vec<f64> = report
            .connect_latencies
            .iter()
            .map(|latency| latency.as_secs_f64() * 1e6)
            .collect();
        latencies.sort_by(f64::total_cmp);
        p50s.push(percentile_of_sorted(&latencies, 50.0).context("no connection completed")?);
        p99s.push(percentile_of_sorted(&latencies, 99.0).context("no connection completed")?);
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(ConnectionResult {
        variant,
        services,
        rate: summary(&rates)?,
        p50_us: summary(&p50s)?,
        p99_us: summary(&p99s)?,
        completed,
        failed,
    })
}
