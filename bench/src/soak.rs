//! Memory under a stream of changes: the daemon's resident set, sampled as changes keep
//! coming, must stay flat once warm (a daemon whose memory grows with every change runs out
//! on a busy cluster). Each change rewrites the probe Service's manifest (its endpoint
//! moves between two pods) and a file of ten churning Services whose names rotate through
//! 200, so objects keep appearing and disappearing; the next change waits until the maps
//! show the probe's new endpoint.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_lab::Manifest;

use crate::endpoint_change::ProbeSetup;

const GIVE_UP: Duration = Duration::from_secs(10);
/// Churning Services present at once, and the names they rotate through.
const CHURN_PRESENT: usize = 10;
const CHURN_NAMES: usize = 200;

#[derive(Clone, Debug)]
pub struct SoakSettings {
    pub background_services: usize,
    pub changes: usize,
    pub sample_every: usize,
}

#[derive(Clone, Debug)]
pub struct SoakResult {
    pub background_services: usize,
    pub changes: usize,
    pub sample_every: usize,
    /// (changes so far, VmRSS in KiB), from before the first change.
    pub samples: Vec<(usize, u64)>,
}

pub fn measure(settings: &SoakSettings) -> Result<SoakResult> {
    let setup = ProbeSetup::new()?;
    let (daemon, maps) = setup.start(settings.background_services, CHURN_PRESENT)?;
    let (lab, probe) = (&setup.lab, &setup.probe);
    let pid = daemon.pid().context("the daemon is not running")?;
    let mut samples = vec![(0, rss_kib(pid)?)];
    for change in 1..=settings.changes {
        let target = lab.pod(1 + change % 2);
        daemon.apply(&churn_manifest(change, target.ip, lab.tcp_port()))?;
        daemon.apply(&probe.manifest([target]))?;
        let started = Instant::now();
        while maps.probe_backend()? != Some(target.ip) {
            if started.elapsed() > GIVE_UP {
                bail!("change {change} not in the maps after {GIVE_UP:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if change % settings.sample_every == 0 {
            samples.push((change, rss_kib(pid)?));
        }
    }
    Ok(SoakResult {
        background_services: settings.background_services,
        changes: settings.changes,
        sample_every: settings.sample_every,
        samples,
    })
}

/// Ten Services of a window that moves by one name each change, served by `pod`.
fn churn_manifest(change: usize, pod: std::net::Ipv4Addr, port: u16) -> Manifest {
    let mut yaml = String::new();
    for offset in 0..CHURN_PRESENT {
        let index = (change + offset) % CHURN_NAMES;
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: churn-{index}, namespace: soak}}\n\
             spec: {{clusterIP: 198.19.251.{index}, ports: [{{name: http, port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: churn-{index}, namespace: soak, \
             labels: {{kubernetes.io/service-name: churn-{index}}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
             endpoints: [{{addresses: [\"{pod}\"]}}]\n"
        );
    }
    Manifest {
        file_name: "churn.yaml".to_owned(),
        yaml,
    }
}

/// The process's VmRSS in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    crate::memory::status_kib(&status, "VmRSS")
}
