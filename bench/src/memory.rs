//! Measurement 4, memory: the daemon's resident set once it has programmed N Services with
//! distinct endpoints, from /proc/<pid>/status, its peak while it loaded them, and what it
//! keeps once their file is gone; and, for the full picture, the kernel memory of the maps
//! it holds (their `memlock` in /proc/<pid>/fdinfo), which RSS does not count.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use proxy_lab::Lab;

use crate::cluster::{Cluster, Endpoints};
use crate::daemon;

/// Time for the allocator to settle after the first sync before RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct MemorySettings {
    /// The numbers of Services measured.
    pub services: Vec<usize>,
    pub endpoints_per_service: usize,
}

#[derive(Clone, Debug)]
pub struct MemoryResult {
    pub services: usize,
    pub endpoints: usize,
    pub rss_kib: u64,
    /// VmHWM: the peak resident set, reached during the first load.
    pub peak_rss_kib: u64,
    /// VmRSS once the file is removed and its Services are gone from the maps.
    pub rss_after_removal_kib: u64,
    pub kernel_maps_kib: u64,
}

pub fn measure(settings: &MemorySettings) -> Result<Vec<MemoryResult>> {
    settings
        .services
        .iter()
        .map(|&services| {
            measure_at(services, settings.endpoints_per_service)
                .with_context(|| format!("memory at {services} Services"))
        })
        .collect()
}

fn measure_at(services: usize, endpoints_per_service: usize) -> Result<MemoryResult> {
    let lab = Lab::builder().pods(0).build()?;
    let cluster = Cluster::new(
        services,
        Endpoints::Distinct {
            per_service: endpoints_per_service,
        },
    )?;
    let endpoints = services * endpoints_per_service;
    let sizes = daemon::map_size_flags(services, endpoints_per_service);
    let args: Vec<&str> = sizes.iter().map(String::as_str).collect();
    let manifest = daemon::cluster_manifest(&cluster);
    let file_name = manifest.file_name.clone();
    let daemon = daemon::start(
        &lab,
        daemon::Source::Manifests(vec![manifest]),
        &args,
        services,
    )?;
    let synced = daemon.last_sync_line().unwrap_or_default();
    if !synced.contains(&format!("backends={endpoints} ")) {
        bail!("the daemon did not program {endpoints} backends: {synced}");
    }
    std::thread::sleep(SETTLE);
    let pid = daemon.pid().context("the daemon is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status_kib(&status, "VmRSS")?;
    let peak_rss_kib = status_kib(&status, "VmHWM")?;
    let kernel_maps_kib = map_memlock_bytes(pid)? / 1024;

    daemon.delete(&file_name)?;
    daemon.wait_for_sync_line("frontends=0 ", daemon::SYNC_TIMEOUT)?;
    std::thread::sleep(SETTLE);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(MemoryResult {
        services,
        endpoints,
        rss_kib,
        peak_rss_kib,
        rss_after_removal_kib: status_kib(&status, "VmRSS")?,
        kernel_maps_kib,
    })
}

/// A `Name:   1234 kB` line of /proc/<pid>/status.
pub fn status_kib(status: &str, name: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB"))
        .and_then(|value| value.trim().parse().ok())
        .with_context(|| format!("no {name} in /proc/<pid>/status"))
}

/// The summed `memlock` of every BPF map the process holds open.
fn map_memlock_bytes(pid: u32) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(info) = std::fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        if !info.lines().any(|line| line.starts_with("map_id:")) {
            continue;
        }
        total += info
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_lines_of_proc_status() {
        let status = "Name:\tebpf-proxy\nVmHWM:\t  51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(status, "VmRSS").unwrap(), 40_960);
        assert_eq!(status_kib(status, "VmHWM").unwrap(), 51_200);
        assert!(status_kib(status, "VmSwap").is_err());
    }
}
