//! The conntrack garbage collector's cost: one sweep of a nine-tenths full CONNTRACK, half
//! of whose flows are over, by the daemon's own collector (batched reads, the in-kernel
//! reaper); a second sweep with nothing left to remove (the read alone); and, for
//! comparison, the previous sweep's method on the same map: every entry read with two system
//! calls, then each finished one deleted with one.

use std::time::Instant;

use anyhow::{Context, Result, ensure};
use aya::EbpfLoader;
use aya::maps::{HashMap as BpfHashMap, MapData};
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
    /// The next sweep, which finds nothing to remove, in milliseconds.
    pub quiet_sweep_ms: Summary,
    /// The previous sweep's method, in milliseconds.
    pub one_by_one_ms: Summary,
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
    // The reaper (like the CLI) reads only pins of a recorded layout.
    proxy_userspace::layout::record(bpffs.path())?;
    let reaper = Reaper::load(bpffs.path())?;
    let mut conntrack: BpfHashMap<_, CtKey, CtValue> = ebpf
        .map_mut(map_names::CONNTRACK)
        .context("no CONNTRACK")?
        .try_into()?;
    // Nine tenths full: an LRU map starts evicting a little before it is completely full.
    let flows = size / 20 * 9;
    // Both entries of every other flow.
    let expected = 2 * flows.div_ceil(2) as usize;
    let (mut sweeps, mut quiet_sweeps, mut one_by_one) = (Vec::new(), Vec::new(), Vec::new());
    let mut finished = 0;
    for _ in 0..runs {
        fill(&mut conntrack, flows)?;
        let started = Instant::now();
        let now = monotonic_now_ns();
        let mut doomed = Vec::new();
        for entry in conntrack.iter() {
            let (key, value) = entry?;
            if value.expires_ns < now {
                doomed.push(key);
            }
        }
        for key in &doomed {
            conntrack.remove(key)?;
        }
        one_by_one.push(started.elapsed().as_secs_f64() * 1e3);
        ensure!(doomed.len() == expected, "{} entries deleted", doomed.len());

        fill(&mut conntrack, flows)?;
        let report = reaper.sweep()?;
        sweeps.push(report.elapsed.as_secs_f64() * 1e3);
        finished = report.reaped();
        ensure!(
            finished == expected,
            "{finished} entries reaped, not {expected}"
        );
        let quiet = reaper.sweep()?;
        ensure!(
            quiet.reaped() == 0,
            "a second sweep reaped {}",
            quiet.reaped()
        );
        quiet_sweeps.push(quiet.elapsed.as_secs_f64() * 1e3);
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(GcCost {
        entries: 2 * flows as usize,
        finished,
        sweep_ms: summary(&sweeps)?,
        quiet_sweep_ms: summary(&quiet_sweeps)?,
        one_by_one_ms: summary(&one_by_one)?,
    })
}

/// Puts `flows` flows' two entries into `conntrack`, every other flow over.
fn fill(conntrack: &mut BpfHashMap<&mut MapData, CtKey, CtValue>, flows: u32) -> Result<()> {
    let alive_until = monotonic_now_ns() + 3_600_000_000_000;
    for flow in 0..flows {
        let translation = flow_to(flow);
        let expires = if flow % 2 == 0 { 1 } else { alive_until };
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
    Ok(())
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
