//! The conntrack garbage collector's cost: one sweep of a full CONNTRACK, half of whose
//! flows are over, by the daemon's own collector (batched reads, the in-kernel reaper), next
//! to reading the same map entry by entry (two system calls per entry), which is what the
//! previous sweep did before it could even start deleting.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use aya::EbpfLoader;
use aya::maps::HashMap as BpfHashMap;
use proxy_common::{CtKey, CtTimeouts, CtValue, Translation, map_names, proto, service_flags};
use proxy_lab::PrivateBpffs;
use proxy_userspace::conntrack::gc::Reaper;
use proxy_userspace::conntrack::monotonic_now_ns;

use crate::stats::Summary;

#[derive(Clone, Debug)]
pub struct GcSettings {
    /// CONNTRACK sizes (entries) to sweep, each filled to the brim.
    pub sizes: Vec<u32>,
    pub runs: usize,
}

/// One size's figures, over the runs.
#[derive(Clone, Debug)]
pub struct GcCost {
    pub entries: usize,
    /// Entries of flows that are over, which a sweep removes.
    pub finished: usize,
    /// One sweep of both maps, in milliseconds.
    pub sweep_ms: Summary,
    /// Reading every entry one by one (the previous sweep's first step), in milliseconds.
    pub read_one_by_one_ms: Summary,
}

pub fn measure(settings: &GcSettings) -> Result<Vec<GcCost>> {
    settings
        .sizes
        .iter()
        .map(|&size| {
            measure_at(size, settings.runs)
                .with_context(|| format!("conntrack garbage collection at {size} entries"))
        })
        .collect()
}

fn measure_at(size: u32, runs: usize) -> Result<GcCost> {
    let bpffs = PrivateBpffs::mount("bench-gc")?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(bpffs.path())
        .map_max_entries(map_names::CONNTRACK, size)
        .load(proxy_userspace::EBPF_OBJECT)
        .context("loading the eBPF object")?;
    proxy_userspace::datapath::set_timeouts(&mut ebpf, CtTimeouts::DEFAULT)?;
    let reaper = Reaper::load(bpffs.path())?;
    let mut conntrack: BpfHashMap<_, CtKey, CtValue> = ebpf
        .map_mut(map_names::CONNTRACK)
        .context("no CONNTRACK")?
        .try_into()?;
    let flows = size / 2;
    let mut sweeps = Vec::new();
    let mut reads = Vec::new();
    let mut finished = 0;
    for _ in 0..runs {
        // Every flow's two entries; every other flow over. Refilled each run: the sweep
        // removed the finished ones.
        let now = monotonic_now_ns();
        for flow in 0..flows {
            let translation = flow_to(flow);
            let expires = if flow % 2 == 0 {
                1
            } else {
                now + 3_600_000_000_000
            };
            conntrack.insert(
                translation.forward_key(),
                translation.forward_entry(0, expires),
                0,
            )?;
            conntrack.insert(
                translation.reply_key(),
                translation.reply_entry(0, expires),
                0,
            )?;
        }
        let started = Instant::now();
        let mut read = 0;
        for entry in conntrack.iter() {
            entry?;
            read += 1;
        }
        reads.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(read == 2 * flows as usize, "{read} entries read");
        let report = reaper.sweep()?;
        sweeps.push(report.elapsed.as_secs_f64() * 1e3);
        finished = report.reaped();
        ensure!(
            finished == flows as usize,
            "{finished} entries reaped, not {flows}"
        );
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(GcCost {
        entries: 2 * flows as usize,
        finished,
        sweep_ms: summary(&sweeps)?,
        read_one_by_one_ms: summary(&reads)?,
    })
}

/// The `index`-th flow: a client of 198.18.0.0/16 through a ClusterIP.
fn flow_to(index: u32) -> Translation {
    let client = u32::from_ne_bytes([198, 18, (index >> 16) as u8, (index >> 8) as u8]);
    let client_port = (10_000 + (index & 0xff) as u16).to_be();
    Translation::service(
        proto::TCP,
        (client, client_port),
        (u32::from_ne_bytes([198, 19, 0, 1]), 80u16.to_be()),
        service_flags::CLUSTER_IP,
        1,
        (u32::from_ne_bytes([198, 18, 255, 1]), 8080u16.to_be()),
        1,
        None,
    )
}
