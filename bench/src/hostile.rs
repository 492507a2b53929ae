//! Hostile input (issue 17): with each hostile file in the manifests directory — nested
//! 60 000 and 100 000 levels deep, alias bombs, not YAML, not UTF-8, an EndpointSlice of
//! 10 000 endpoints, a 50 MB manifest of 30 000 Services (valid: it is loaded), a Service
//! rewritten every millisecond — how long an unrelated change (the probe's endpoint moved,
//! as in the change measurement) takes to reach traffic, and the daemon's peak and final
//! memory. A fresh daemon per input, so each peak is that input's; the first row has none.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proxy_lab::Manifest;
use proxy_lab::hostile::{self, Expected};

use crate::cluster::{Cluster, Endpoints};
use crate::endpoint_change::{ProbeSetup, time_changes};
use crate::memory::status_kib;

/// The daemon's `--manifests-max-file-bytes` here: the 50 MB manifest fits.
const MAX_FILE_BYTES: usize = 64 * 1024 * 1024;
/// Services in the 50 MB manifest (× 10 endpoints each, about 1.67 KB a Service).
const LARGE_MANIFEST_SERVICES: usize = 30_000;
/// How long the daemon gets to take a large input in before its memory is read.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct HostileSettings {
    /// Unrelated changes timed with each input present.
    pub changes: usize,
    /// Whether the 50 MB manifest is measured (the quick run leaves it out).
    pub large_manifest: bool,
}

#[derive(Clone, Debug)]
pub struct HostileResult {
    pub input: String,
    pub bytes: usize,
    /// What the daemon made of it (the metric's reason, or `loaded`).
    pub outcome: String,
    pub changes: usize,
    pub change_p50_ms: f64,
    /// The slowest of the changes: the stall, if the input caused one.
    pub change_max_ms: f64,
    pub peak_rss_kib: u64,
    pub rss_after_kib: u64,
}

/// One input: a file (name, contents, expected outcome), or the flapping Service.
enum Input {
    File {
        name: String,
        contents: Vec<u8>,
        outcome: String,
    },
    Flapping,
    Nothing,
}

impl Input {
    /// As the report's first column names it.
    fn name(&self) -> String {
        match self {
            Input::File { name, .. } => name.clone(),
            Input::Flapping => "a Service rewritten every millisecond".to_owned(),
            Input::Nothing => "(none)".to_owned(),
        }
    }
}

pub fn measure(settings: &HostileSettings) -> Result<Vec<HostileResult>> {
    let mut inputs = vec![Input::Nothing];
    for file in hostile::hostile_files(MAX_FILE_BYTES) {
        if file.file_name == "too-large.yaml" {
            continue; // 64 MiB of comment: refused unread, nothing to measure
        }
        inputs.push(Input::File {
            name: file.file_name.to_owned(),
            contents: file.contents,
            outcome: file.reason.to_owned(),
        });
    }
    let deeper = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    inputs.push(Input::File {
        name: "deep-200k.yaml".to_owned(),
        contents: deeper.into_bytes(),
        outcome: "too_deep".to_owned(),
    });
    let anchor: Vec<String> = (0..5_000).map(|i| format!("item-{i:04}")).collect();
    let bomb = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bomb, annotations: {{a: &a [{}]}}}}\n\
         spec: {{externalIPs: [{}]}}\n",
        anchor.join(", "),
        vec!["*a"; 5_000].join(", ")
    );
    inputs.push(Input::File {
        name: "alias-bomb-80k.yaml".to_owned(),
        contents: bomb.into_bytes(),
        outcome: "alias_expansion".to_owned(),
    });
    let many = (hostile::hostile_objects().into_iter())
        .find(|case| case.name == "slice-10k-endpoints")
        .context("the catalogue has the 10k-endpoint slice")?;
    if let Expected::Refused(_, reason) = many.expected {
        inputs.push(Input::File {
            name: "slice-10k-endpoints.json".to_owned(),
            contents: hostile::as_list(&many).into_bytes(),
            outcome: reason.to_owned(),
        });
    }
    if settings.large_manifest {
        let cluster = Cluster::new(
            LARGE_MANIFEST_SERVICES,
            Endpoints::Distinct { per_service: 10 },
        )?;
        inputs.push(Input::File {
            name: "large-50mb.yaml".to_owned(),
            contents: cluster.manifest_yaml().into_bytes(),
            outcome: "loaded".to_owned(),
        });
    }
    inputs.push(Input::Flapping);
    inputs
        .into_iter()
        .map(|input| {
            let name = input.name();
            measure_input(input, settings.changes).with_context(|| format!("with {name} present"))
        })
        .collect()
}

fn measure_input(input: Input, changes: usize) -> Result<HostileResult> {
    let setup = ProbeSetup::new()?;
    let extra = LARGE_MANIFEST_SERVICES + 1;
    let max_bytes = MAX_FILE_BYTES.to_string();
    let (daemon, maps) = setup.start_with(0, extra, &["--manifests-max-file-bytes", &max_bytes])?;
    let pid = daemon.pid().context("the daemon is not running")?;
    let name = input.name();
    let (bytes, outcome) = match &input {
        Input::Nothing => (0, "-".to_owned()),
        Input::File {
            name,
            contents,
            outcome,
        } => {
            daemon.apply_bytes(name, contents)?;
            (contents.len(), outcome.clone())
        }
        Input::Flapping => (0, "loaded".to_owned()),
    };
    let stop = AtomicBool::new(false);
    let timings = std::thread::scope(|scope| {
        if matches!(input, Input::Flapping) {
            scope.spawn(|| flap(&daemon, &stop));
        }
        let timings = time_changes(&setup, &maps, changes, |target| {
            daemon.apply(&setup.probe.manifest([target]))
        });
        stop.store(true, Ordering::Relaxed);
        timings
    })?;
    std::thread::sleep(SETTLE);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let to_traffic = &timings.to_traffic;
    Ok(HostileResult {
        input: name,
        bytes,
        outcome,
        changes: to_traffic.len(),
        change_p50_ms: crate::stats::percentile_of_sorted(to_traffic, 50.0)
            .context("no changes")?,
        change_max_ms: to_traffic.last().copied().context("no changes")?,
        peak_rss_kib: status_kib(&status, "VmHWM")?,
        rss_after_kib: status_kib(&status, "VmRSS")?,
    })
}

/// Rewrites a one-Service manifest every millisecond until `stop`.
fn flap(daemon: &proxy_lab::Daemon, stop: &AtomicBool) {
    let started = Instant::now();
    let mut index = 0u32;
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: flapping, namespace: bench}}\n\
             spec: {{clusterIP: 198.19.251.1, ports: [{{name: http, port: {}}}]}}\n",
            1000 + index % 2
        );
        let manifest = Manifest {
            file_name: "flapping.yaml".to_owned(),
            yaml,
        };
        // A failed write is the end of the run, not a measurement.
        if daemon.apply(&manifest).is_err() {
            return;
        }
        index += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
}
