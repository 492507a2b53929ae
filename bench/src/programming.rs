//! Measurement 3, programming: how long N Services × 10 endpoints take to program from
//! scratch — ebpf-proxy parsing their manifests, planning and writing freshly loaded maps,
//! against `iptables-restore` and `nft -f` of kube-proxy's rules into a fresh namespace —
//! and how long one endpoint change takes from the event to updated maps in process (the
//! daemon's partial sync: the model marks the Service dirty, the planner re-plans it, the
//! writer writes its frontend; [`crate::endpoint_change`] adds the manifests source and
//! confirms by traffic).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use proxy_common::{CtTimeouts, default_max_entries};
use proxy_lab::Lab;
use proxy_userspace::datapath::{Datapath, MapSizes};
use proxy_userspace::model::Model;
use proxy_userspace::plan::{NodeFacts, Planner};
use proxy_userspace::source::manifests::{ManifestSource, ParseLimits};
use proxy_userspace::writer::{ApplyReport, MapWriter};

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
    /// iptables and nftables are loaded up to this many Services (beyond, a load runs for
    /// minutes and is stopped anyway).
    pub netfilter_max_services: usize,
}

/// Seconds to program from scratch, or how long a load ran before it was stopped.
#[derive(Clone, Copy, Debug)]
pub enum Timing {
    Seconds(Summary),
    StoppedAfter(Duration),
    NotMeasured,
}

impl fmt::Display for Timing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Timing::Seconds(seconds) => f.write_str(&seconds.display(3)),
            Timing::StoppedAfter(after) => write!(f, "> {:.0} (stopped)", after.as_secs_f64()),
            Timing::NotMeasured => f.write_str("not measured"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProgrammingResult {
    pub services: usize,
    /// Parsing the manifests, planning and writing the maps.
    pub ours_with_parsing: Summary,
    /// Planning and writing only.
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
    let node = lab_node();
    let manifests = ManifestsDir::write(&cluster)?;

    let mut with_parsing = Vec::new();
    let mut plan_and_write = Vec::new();
    let mut last = None;
    let mut spent = Duration::ZERO;
    while with_parsing.len() < settings.runs && (with_parsing.is_empty() || spent < settings.budget)
    {
        // Dropped first: a run's maps and model go before the next run loads its own.
        drop(last.take());
        let mut fresh = OurDatapath::load(services)?;
        let started = Instant::now();
        let mut model = Model::default();
        ManifestSource::new(&manifests.0, ParseLimits::default()).load(&mut model)?;
        let rejected = model.take_changes().rejected;
        ensure!(rejected.is_empty(), "manifests refused: {rejected:?}");
        let parsed = started.elapsed();
        let planner = fresh.full_sync(&model, &node)?;
        let elapsed = started.elapsed();
        spent += elapsed;
        with_parsing.push(elapsed.as_secs_f64());
        plan_and_write.push((elapsed - parsed).as_secs_f64());
        last = Some((fresh, model, planner));
    }
    let ours_with_parsing = Summary::of(&with_parsing).context("no runs")?;
    let ours = Summary::of(&plan_and_write).context("no runs")?;
    eprintln!(
        "  {services} Services: ebpf-proxy {:.3} s ({:.3} s without parsing)",
        ours_with_parsing.median, ours.median
    );
    let (mut datapath, mut model, mut planner) = last.context("no runs")?;
    let changes = endpoint_changes(
        &mut datapath,
        &mut model,
        &mut planner,
        &cluster,
        settings.changes,
    )?;
    drop((datapath, model, planner));

    let netfilter_timing = |mode: Netfilter| -> Result<Timing> {
        if services > settings.netfilter_max_services {
            return Ok(Timing::NotMeasured);
        }
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
        ours_with_parsing,
        ours,
        iptables,
        nftables,
        change_p50_ms: percentile_of_sorted(&changes, 50.0).context("no changes")?,
        change_p99_ms: percentile_of_sorted(&changes, 99.0).context("no changes")?,
    })
}

/// The cluster's manifests in a directory of their own, removed on drop.
struct ManifestsDir(PathBuf);

impl ManifestsDir {
    fn write(cluster: &Cluster) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "epx-bench-programming-{}-{}",
            std::process::id(),
            cluster.services
        ));
        std::fs::create_dir_all(&dir)?;
        let dir = ManifestsDir(dir);
        std::fs::write(dir.0.join("bench.yaml"), cluster.manifest_yaml())?;
        Ok(dir)
    }
}

impl Drop for ManifestsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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
            services: default_max_entries::SERVICES.max(frontends + 1024),
            backend_slots: default_max_entries::BACKEND_SLOTS.max(frontends * 12 + 1024),
            backends: default_max_entries::BACKENDS.max(frontends * 10 + 1024),
            ..MapSizes::default()
        };
        let root: PathBuf = bpffs.path().join("ebpf-proxy");
        let mut datapath = Datapath::load(
            &root,
            sizes,
            CtTimeouts::DEFAULT,
            proxy_userspace::socket_lb::SocketLbMode::Off,
        )?;
        let maps = datapath.take_maps()?;
        Ok(Self {
            writer: MapWriter::new(maps.writer)?,
            _datapath: datapath,
            _bpffs: bpffs,
        })
    }

    /// The daemon's first sync: every Service planned, the maps written.
    fn full_sync(&mut self, model: &Model, node: &NodeFacts) -> Result<Planner> {
        let mut planner = Planner::new(node, model);
        let delta = planner.update_all(model);
        let report = self.writer.apply(planner.desired());
        ensure!(
            delta.new_problems.is_empty(),
            "programming found problems: {:?}",
            delta.new_problems
        );
        succeeded(&report)?;
        Ok(planner)
    }
}

fn succeeded(report: &ApplyReport) -> Result<()> {
    ensure!(report.complete(), "programming failed: {report:?}");
    Ok(())
}

/// Times `count` endpoint changes, each from the EndpointSlice event to the maps written
/// (the daemon's partial sync); milliseconds, sorted.
fn endpoint_changes(
    datapath: &mut OurDatapath,
    model: &mut Model,
    planner: &mut Planner,
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
        let changes = model.take_changes();
        let delta = planner.update(model, changes.dirty_services);
        let report = datapath.writer.apply_delta(&delta.frontends);
        milliseconds.push(started.elapsed().as_secs_f64() * 1e3);
        succeeded(&report)?;
        ensure!(
            delta.frontends.len() == 1,
            "one endpoint change touched {} frontends",
            delta.frontends.len()
        );
    }
    milliseconds.sort_by(f64::total_cmp);
    Ok(milliseconds)
}
