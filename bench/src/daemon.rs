//! The real ebpf-proxy daemon in a lab's node namespace, started with the bench's
//! manifests and trusted only once it reports every frontend programmed.

use std::time::Duration;

use anyhow::{Result, bail};
use proxy_lab::{Daemon, Lab, Manifest};

use crate::cluster::Cluster;

/// Generous: at 10 000 Services the first sync parses megabytes of YAML.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(300);

/// The file the bench's Services go to in the daemon's manifests directory.
pub fn cluster_manifest(cluster: &Cluster) -> Manifest {
    Manifest {
        file_name: "bench.yaml".to_owned(),
        yaml: cluster.manifest_yaml(),
    }
}

/// Where the daemon under measurement reads its Services.
pub enum Source<'s> {
    Manifests(Vec<Manifest>),
    /// The test API server at this URL (in the lab node's namespace).
    ApiServer(&'s str),
}

/// Starts the daemon on `source` with `args` and waits until a sync reports `frontends`
/// frontends.
pub fn start<'lab>(
    lab: &'lab Lab,
    source: Source,
    args: &[&str],
    frontends: usize,
) -> Result<Daemon<'lab>> {
    let mut builder = lab.daemon().echo_log_on_drop(false);
    match source {
        Source::Manifests(manifests) => {
            for manifest in manifests {
                builder = builder.manifest(manifest);
            }
        }
        Source::ApiServer(url) => builder = builder.api_server(url),
    }
    for arg in args {
        builder = builder.arg(*arg);
    }
    let daemon = builder.start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let expected = format!("frontends={frontends} ");
    match daemon.last_sync_line() {
        Some(line) if line.contains(&expected) => Ok(daemon),
        line => bail!(
            "the daemon's first sync did not program {frontends} frontends: {line:?}\n{}",
            tail(&daemon.log(), 20)
        ),
    }
}

/// `--max-services`, `--max-backends` and `--max-backend-slots` for `services` Services of
/// one port with `endpoints` endpoints each (never below the defaults); the slots keep a
/// fifth spare for the slices changes write before they free the old ones.
pub fn map_size_flags(services: usize, endpoints: usize) -> [String; 6] {
    let defaults = proxy_userspace::datapath::MapSizes::default();
    let services_entries = (services * (endpoints + 1) + 1024).max(defaults.services as usize);
    let backends = (services * endpoints + 1024).max(defaults.backends as usize);
    let slots = (services * endpoints * 6 / 5 + 1024).max(defaults.backend_slots as usize);
    [
        "--max-services".to_owned(),
        services_entries.to_string(),
        "--max-backends".to_owned(),
        backends.to_string(),
        "--max-backend-slots".to_owned(),
        slots.to_string(),
    ]
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
