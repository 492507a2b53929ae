//! Measurement 5, XDP (issue 15): outside traffic to a NodePort through the XDP program in
//! front of the tc program (`--xdp native`), through the tc program alone (`--xdp off`),
//! and through kube-proxy-shaped iptables rules.
//!
//! 1. Per packet: `epx_xdp` and `epx_ingress` run by BPF_PROG_TEST_RUN on the very same
//!    frames, as arriving on the same device: one end of a veth in a namespace of the
//!    bench's own, whose neighbour table knows the next hops, so both programs route what
//!    they route themselves (tc: `bpf_redirect_neigh`; XDP: the FIB's MACs and XDP_TX). The
//!    maps are filled by the real planner and writer with two NodePort Services on the
//!    node's address: one served by pods of this node (behind another device: DNAT only),
//!    one by pods of other nodes (reached back through the arrival device: DNAT, SNAT, and
//!    the program sends both directions itself). One call per packet (a test run reruns
//!    the same buffer, which a first run already rewrote; and the XDP program's metadata
//!    would pile up), the median of the calls with the kernel's timer floor (single-run
//!    minus repeated pass-through, measured with tc) subtracted. A test run performs no
//!    redirect: what XDP saves beyond the program itself — the skb, the stack's receive
//!    path, the neighbour lookup — only the lab shows.
//! 2. Requests per second through the lab: new TCP connections from the outside client to
//!    the NodePort, one request and answer each, for the variants (XDP native, generic,
//!    off, and iptables), each in a lab of
//!    its own, taking turns run by run; once with the backends on the node itself (the
//!    single-node lab) and once on another node (the multi-node lab: kube-proxy and
//!    ebpf-proxy SNAT).
//!
//! Every per-packet figure is checked against the program's counters and its return code:
//! a run that did not take the path it measures fails the benchmark.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use proxy_lab::load::{self, LoadSettings};
use proxy_lab::{Cluster, Daemon, Endpoint, Lab, Netns, addr};

use crate::cluster::{self, Endpoints};
use crate::connections::LoadSamples;
use crate::netfilter::{self, Loaded, Netfilter};
use crate::stats::{Summary, median};

mod per_packet;

#[derive(Clone, Debug)]
pub struct XdpSettings {
    pub runs: usize,
    /// Calls per packet kind, hook and run.
    pub single_runs: usize,
    /// `repeat` of the pass-through run that gives the timer floor.
    pub repeat: u32,
    pub pods: usize,
    pub load: LoadSettings,
    pub request_runs: usize,
    pub warmup: usize,
    pub rules_timeout: Duration,
}

/// One packet kind: nanoseconds per packet through each hook.
#[derive(Clone, Debug)]
pub struct XdpPacketCost {
    /// The packet kind; IPv6's rows begin `IPv6: `.
    pub packet: String,
    pub tc: Summary,
    pub xdp: Summary,
}

/// Requests per second through one variant.
#[derive(Clone, Debug)]
pub struct XdpRequests {
    pub backends: &'static str,
    pub variant: &'static str,
    pub rate: Summary,
    pub p50_us: Summary,
    pub p99_us: Summary,
    pub completed: usize,
    pub failed: usize,
}

#[derive(Clone, Debug, Default)]
pub struct XdpResults {
    pub packet: Vec<XdpPacketCost>,
    pub requests: Vec<XdpRequests>,
}

pub fn measure(settings: &XdpSettings) -> Result<XdpResults> {
    let packet = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: affects only this thread, which ends with the measurement.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    bail!("unshare: {}", std::io::Error::last_os_error());
                }
                per_packet::measure(settings)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
    .context("per packet, XDP and tc")?;
    let mut requests = requests_on_one_node(settings).context("requests, backends on the node")?;
    requests.extend(requests_across_nodes(settings).context("requests, backends elsewhere")?);
    Ok(XdpResults { packet, requests })
}

// 2. Requests per second through the lab.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Native,
    Generic,
    Tc,
    Iptables,
}

const VARIANTS: [Variant; 4] = [
    Variant::Native,
    Variant::Generic,
    Variant::Tc,
    Variant::Iptables,
];

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Native => "ebpf-proxy --xdp native",
            Variant::Generic => "ebpf-proxy --xdp generic",
            Variant::Tc => "ebpf-proxy --xdp off (tc)",
            Variant::Iptables => "iptables (kube-proxy shape)",
        }
    }

    fn xdp_flag(self) -> Option<&'static str> {
        match self {
            Variant::Native => Some("native"),
            Variant::Generic => Some("generic"),
            Variant::Tc => Some("off"),
            Variant::Iptables => None,
        }
    }
}

/// The NodePort Service of the lab's runs and kube-proxy's rules for it.
fn lab_service(pods: &[Ipv4Addr]) -> (proxy_lab::Service, String) {
    let service = proxy_lab::Service::node_port("web", addr::NODE_PORT_SERVICE_IP).tcp_node_port(
        80,
        addr::ECHO_TCP_PORT,
        addr::NODE_PORT_TCP,
    );
    let cluster = cluster::Cluster::new(
        1,
        Endpoints::Shared {
            pods: pods.to_vec(),
            port: addr::ECHO_TCP_PORT,
        },
    )
    .expect("one Service fits");
    let rules =
        crate::kube_rules::iptables_restore_with_node_port(&cluster, Some(addr::NODE_PORT_TCP));
    (service, rules)
}

/// Loads kube-proxy's rules into `node`.
fn load_rules(node: &Netns, rules: &str, timeout: Duration) -> Result<()> {
    if let Loaded::StoppedAfter(after) = netfilter::load(node, Netfilter::Iptables, rules, timeout)?
    {
        bail!("loading the rules took longer than {after:?}");
    }
    Ok(())
}

/// One variant ready for load: where its client is and what it connects to.
struct Ready<'a> {
    variant: Variant,
    client: &'a Netns,
    target: SocketAddrV4,
    _daemons: Vec<Daemon<'a>>,
}

fn warm_up(ready: &Ready, settings: &XdpSettings) -> Result<()> {
    let warmup = LoadSettings {
        max_connections: settings.warmup,
        duration: Duration::from_secs(60),
        ..settings.load.clone()
    };
    let report = load::generate(ready.client, &[ready.target], &warmup, u64::MAX)?;
    ensure!(
        report.failed == 0 && report.completed > 0,
        "{}: warm-up: {} of {} connections failed",
        ready.variant.label(),
        report.failed,
        report.failed + report.completed
    );
    Ok(())
}

fn requests_on_one_node(settings: &XdpSettings) -> Result<Vec<XdpRequests>> {
    let labs = VARIANTS
        .iter()
        .map(|_| Lab::builder().pods(settings.pods).build())
        .collect::<Result<Vec<_>>>()?;
    let mut ready = Vec::new();
    for (&variant, lab) in VARIANTS.iter().zip(&labs) {
        let pods: Vec<Ipv4Addr> = lab.pods().iter().map(|pod| pod.ip).collect();
        let (service, rules) = lab_service(&pods);
        let daemons = match variant.xdp_flag() {
            Some(mode) => {
                let daemon = lab
                    .daemon()
                    .manifest(service.manifest(lab.pods()))
                    .args(["--xdp", mode])
                    .echo_log_on_drop(false)
                    .start()?;
                daemon.wait_synced(crate::daemon::SYNC_TIMEOUT)?;
                vec![daemon]
            }
            None => {
                load_rules(lab.node(), &rules, settings.rules_timeout)?;
                Vec::new()
            }
        };
        let variant_ready = Ready {
            variant,
            client: lab.client(),
            target: SocketAddrV4::new(addr::NODE_IP, addr::NODE_PORT_TCP),
            _daemons: daemons,
        };
        warm_up(&variant_ready, settings)?;
        ready.push(variant_ready);
    }
    take_turns("on the node", &ready, settings)
}

fn requests_across_nodes(settings: &XdpSettings) -> Result<Vec<XdpRequests>> {
    let clusters = VARIANTS
        .iter()
        .map(|_| {
            Cluster::builder()
                .pods_per_node(&[0, settings.pods])
                .build()
        })
        .collect::<Result<Vec<_>>>()?;
    let mut ready = Vec::new();
    for (&variant, cluster) in VARIANTS.iter().zip(&clusters) {
        let node_2 = cluster.node(2);
        let pods: Vec<Ipv4Addr> = node_2.pods().iter().map(|pod| pod.ip).collect();
        let (service, rules) = lab_service(&pods);
        let endpoints: Vec<Endpoint> = node_2
            .pods()
            .iter()
            .map(|pod| Endpoint::of(pod).on_node(&node_2.name))
            .collect();
        let mut daemons = Vec::new();
        for k in 1..=2 {
            match variant.xdp_flag() {
                Some(mode) => {
                    let daemon = cluster
                        .daemon(k)
                        .manifest(service.manifest_with(&endpoints))
                        .args(["--xdp", mode])
                        .echo_log_on_drop(false)
                        .start()?;
                    daemon.wait_synced(crate::daemon::SYNC_TIMEOUT)?;
                    daemons.push(daemon);
                }
                None => load_rules(&cluster.node(k).ns, &rules, settings.rules_timeout)?,
            }
        }
        let variant_ready = Ready {
            variant,
            client: cluster.client(),
            target: SocketAddrV4::new(cluster.node(1).ip, addr::NODE_PORT_TCP),
            _daemons: daemons,
        };
        warm_up(&variant_ready, settings)?;
        ready.push(variant_ready);
    }
    take_turns("on another node", &ready, settings)
}

/// The variants take turns, run by run.
fn take_turns(
    backends: &'static str,
    ready: &[Ready],
    settings: &XdpSettings,
) -> Result<Vec<XdpRequests>> {
    let mut samples: Vec<LoadSamples> = ready.iter().map(|_| LoadSamples::default()).collect();
    for run in 0..settings.request_runs {
        for (variant, samples) in ready.iter().zip(&mut samples) {
            let report = load::generate(
                variant.client,
                &[variant.target],
                &settings.load,
                run as u64,
            )?;
            samples.record(&report)?;
        }
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    ready
        .iter()
        .zip(samples)
        .map(|(variant, samples)| {
            eprintln!(
                "  backends {backends}, {}: {:.0} requests/s",
                variant.variant.label(),
                median(&samples.rates).unwrap_or(0.0)
            );
            Ok(XdpRequests {
                backends,
                variant: variant.variant.label(),
                rate: summary(&samples.rates)?,
                p50_us: summary(&samples.p50s)?,
                p99_us: summary(&samples.p99s)?,
                completed: samples.completed,
                failed: samples.failed,
            })
        })
        .collect()
}
