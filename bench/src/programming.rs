//! Measurement 3, programming: how long N Services × 10 endpoints take to program from
//! scratch — ebpf-proxy's planner and map writer into freshly loaded maps, against
//! `iptables-restore` and `nft -f` of kube-proxy's rules into a fresh namespace — and how
//! long one endpoint change takes from the event to updated maps (in process: the daemon's
//! sync step, a full plan and a diff; [`crate::endpoint_change`] adds the manifests source
//! and confirms by traffic).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use proxy_common::{CtTimeouts, default_max_entries};
use proxy_lab::Lab;
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::model::Model;
use proxy_userspace::plan::{self, NodeFacts};
use proxy_userspace::writer::MapWriter;

use crate::cluster::{Cluster, Endpoints, endpoint_slice, lab_node, spare_address};
use crate::netfilter::{self, Loaded, Netfilter};
use crate::stats::{Rng, Summary, percentile_of_sorted};
use proxy_lab::PrivateBpffs;

const ENDPOINTS_PER_SERVICE: usize = 10;

#[derive(Clone, Debug)]
pub struct ProgrammingSettings {
    pub sizes: Vec<usize>,
    pub runs: usize,
    /// No further run of a tool at a size starts once its runs took this long.
    pub budget: Duration,
    /// A single load still running after this is stopped and reported as such.
    pub timeout: Duration,
    /// Endpoint changes timed at each size.
    pub changes: usize,
}

/// Seconds to program from scratch, or how long a load ran before it was stopped.
#[derive(Clone, Copy, Debug)]
pub enum Timing {
    Seconds(Summary),
    StoppedAfter(Duration),
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timing::Seconds(seconds) => f.write_str(&seconds.display(3)),
            Timing::StoppedAfter(after) => write!(f, "> {:.0} (stopped)", after.as_secs_f64()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProgrammingResult {
    pub services: usize,
    pub ours: Summary,
    pub iptables: Timing,
    pub nftables: Timing,
    /// One endpoint change, event to maps, in milliseconds.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
}

pub fn measure(settings: &ProgrammingSettings) -> Result<Vec<ProgrammingResult>> {
    settings
        .sizes
        .iter()
        .map(|&services| {
            measure_at(services, settings)
                .with_context(|| format!("programming {services} Services"))
        })
        .collect()
}

fn measure_at(services: usize, settings: &ProgrammingSettings) -> Result<ProgrammingResult> {
    let cluster = Cluster::new(
        services,
        Endpoints::Distinct {
            per_service: ENDPOINTS_PER_SERVICE,
        },
    )?;
    let mut model = cluster.model()?;
    let node = lab_node();

    let mut ours_seconds = Vec::new();
    let mut datapath = None;
    for _ in 0..settings.runs {
        let mut fresh = OurDatapath::load(services)?;
        ours_seconds.push(fresh.sync(&model, &node)?.as_secs_f64());
        datapath = Some(fresh);
    }
    let ours = Summary::of(&ours_seconds).context("no runs")?;
    eprintln!("  {services} Services: ebpf-proxy {:.3} s", ours.median);
    let mut datapath = datapath.context("no runs")?;
    let changes = endpoint_changes(&mut datapath, &mut model, &node, &cluster, settings.changes)?;

    let netfilter_timing = |mode: Netfilter| -> Result<Timing> {
        let rules = mode.rules(&cluster);
        let timing = timed_runs(settings, || {
            let lab = Lab::builder().pods(0).build()?;
            netfilter::load(lab.node(), mode, &rules, settings.timeout)
        })?;
        eprintln!("  {services} Services: {} {timing} s", mode.label());
        Ok(timing)
    };
    let iptables = netfilter_timing(Netfilter::Iptables)?;
    let nftables = netfilter_timing(Netfilter::Nftables)?;
    Ok(ProgrammingResult {
        services,
        ours,
        iptables,
        nftables,
        change_p50_ms: percentile_of_sorted(&changes, 50.0).context("no changes")?,
        change_p99_ms: percentile_of_sorted(&changes, 99.0).context("no changes")?,
    })
}

/// Repeats `run` up to `settings.runs` times while the runs so far stay within the
/// budget; stops at the first load that had to be stopped.
fn timed_runs(
    settings: &ProgrammingSettings,
    mut run: impl FnMut() -> Result<Loaded>,
) -> Result<Timing> {
    let mut seconds = Vec::new();
    let mut spent = Duration::ZERO;
    while seconds.len() < settings.runs && (seconds.is_empty() || spent < settings.budget) {
        match run()? {
            Loaded::In(elapsed) => {
                spent += elapsed;
                seconds.push(elapsed.as_secs_f64());
            }
            Loaded::StoppedAfter(elapsed) => return Ok(Timing::StoppedAfter(elapsed)),
        }
    }
    Ok(Timing::Seconds(Summary::of(&seconds).context("no runs")?))
}

/// Freshly loaded maps and the writer that fills them.
struct OurDatapath {
    // Dropped in declaration order: maps, then the program, then their bpffs.
    writer: MapWriter,
    _datapath: Datapath,
    _bpffs: PrivateBpffs,
}

impl OurDatapath {
    fn load(services: usize) -> Result<Self> {
        let bpffs = PrivateBpffs::mount("bench")?;
        let frontends = u32::try_from(services)?;
        let sizes = MapSizes {
            services: default_max_entries::SERVICES.max(frontends * 11 + 1024),
            backends: default_max_entries::BACKENDS.max(frontends * 10 + 1024),
            ..MapSizes::default()
        };
        let root: PathBuf = bpffs.path().join("ebpf-proxy");
        let mut datapath = Datapath::load(&root, sizes, CtTimeouts::DEFAULT)?;
        let maps = datapath.take_maps()?;
        Ok(Self {
            writer: MapWriter::new(maps.services, maps.backends, maps.membership, maps.names)?
                .with_flow_maps(maps.flow_maps)?,
            _datapath: datapath,
            _bpffs: bpffs,
        })
    }

    /// What the daemon does on every sync: plan everything, write the difference.
    fn sync(&mut self, model: &Model, node: &NodeFacts) -> Result<Duration> {
        let started = Instant::now();
        let planned = plan::plan(model, node);
        let report = self.writer.apply(&planned.desired);
        let elapsed = started.elapsed();
        ensure!(
            planned.problems.is_empty() && report.map_full == 0 && report.failures.is_empty(),
            "programming failed: problems {:?}, {} writes refused as full, failures {:?}",
            planned.problems,
            report.map_full,
            report.failures
        );
        Ok(elapsed)
    }
}

/// Times `count` endpoint changes, each from the EndpointSlice event to the maps
/// written; milliseconds, sorted.
fn endpoint_changes(
    datapath: &mut OurDatapath,
    model: &mut Model,
    node: &NodeFacts,
    cluster: &Cluster,
    count: usize,
) -> Result<Vec<f64>> {
    let mut rng = Rng::new(cluster.services as u64);
    let mut milliseconds = Vec::with_capacity(count);
    for change in 0..count {
        let service = cluster.service(rng.below(cluster.services));
        let mut endpoints = service.endpoints.clone();
        endpoints[0] = spare_address(change);
        let slice = endpoint_slice(&service, &endpoints);
        let started = Instant::now();
        model.insert_endpoint_slice(slice)?;
        datapath.sync(model, node)?;
        milliseconds.push(started.elapsed().as_secs_f64() * 1e3);
    }
    milliseconds.sort_by(f64::total_cmp);
    Ok(milliseconds)
}
