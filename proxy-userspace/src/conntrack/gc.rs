//! The conntrack garbage collector, on a thread of its own so that a sweep never holds up a
//! sync of the Services.
//!
//! The datapath treats a flow that is over as absent and replaces it when its tuple is
//! reused, so collecting garbage only frees room: dead entries would otherwise crowd out
//! live ones when an LRU map fills. A sweep reads each map in batches (thousands of entries
//! per system call) and hands the keys of entries whose own expiry passed to the reaper,
//! `epx_ct_reap`, which removes those whose flow is over by the datapath's own rule and
//! under its removal protocol — checked and removed in the kernel, so a flow created on a
//! key after the sweep read it is never removed. (The previous sweep deleted keys from a
//! snapshot seconds old, which cut the rare connection that reused a port in between.)
//!
//! Both families' maps are swept: CONNTRACK and CONNTRACK_PENDING, CONNTRACK6 and
//! CONNTRACK_PENDING6.
//!
//! The interval adapts, in the spirit of Cilium's CT GC: shorter while sweeps remove much
//! or the maps run full, longer while they find little.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::Ebpf;
use aya::maps::{Map, MapData};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use proxy_common::{
    Address, CtKey, CtValue, EXPIRES_REMOVING, Ipv6, REAP_PROGRAM_NAME, ReapRequest, map_names,
    reap_batch, trace_table,
};
use tracing::{debug, warn};

use super::{CtTable, monotonic_now_ns};
use crate::metrics::{MapLabel, Metrics};

/// Entries read per system call.
const SCAN_CHUNK: usize = 4096;

/// `epx_ct_reap` and the conntrack maps of both families, loaded against the daemon's
/// pins.
pub struct Reaper {
    assured: MapData,
    pending: MapData,
    assured6: MapData,
    pending6: MapData,
    ebpf: Ebpf,
}

impl Reaper {
    /// Loads the reaper from the embedded object, reusing the maps pinned under `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let pins = [
            map_names::CONNTRACK,
            map_names::CONNTRACK_PENDING,
            map_names::CONNTRACK6,
            map_names::CONNTRACK_PENDING6,
        ];
        let mut ebpf = crate::inspect::load_beside_pins(root, &pins, &[REAP_PROGRAM_NAME])?;
        let mut take = |name: &str| -> Result<MapData> {
            match ebpf.take_map(name) {
                Some(Map::LruHashMap(data)) => Ok(data),
                Some(_) => bail!("{name} is not an LRU hash map"),
                None => bail!("map {name} missing from the eBPF object"),
            }
        };
        let assured = take(map_names::CONNTRACK)?;
        let pending = take(map_names::CONNTRACK_PENDING)?;
        let assured6 = take(map_names::CONNTRACK6)?;
        let pending6 = take(map_names::CONNTRACK_PENDING6)?;
        Ok(Self {
            assured,
            pending,
            assured6,
            pending6,
            ebpf,
        })
    }

    fn map<A: Address>(&self, table: CtTable) -> &MapData {
        match (A::BITS == 32, table) {
            (true, CtTable::Assured) => &self.assured,
            (true, CtTable::Pending) => &self.pending,
            (false, CtTable::Assured) => &self.assured6,
            (false, CtTable::Pending) => &self.pending6,
        }
    }

    /// One pass over the maps of both families.
    pub fn sweep(&self) -> Result<SweepReport> {
        let started = Instant::now();
        let mut tables = Vec::with_capacity(4);
        for table in CtTable::ALL {
            tables.push(self.sweep_table::<u32>(table)?);
        }
        for table in CtTable::ALL {
            tables.push(self.sweep_table::<Ipv6>(table)?);
        }
        Ok(SweepReport {
            tables,
            elapsed: started.elapsed(),
        })
    }

    fn sweep_table<A: Address>(&self, table: CtTable) -> Result<TableSweep> {
        let map = self.map::<A>(table);
        let name = table.map_name_of::<A>();
        let capacity = map.info()?.max_entries();
        let now_ns = monotonic_now_ns();
        let mut entries = 0;
        let mut reaped = 0;
        let mut candidates = Vec::with_capacity(reap_batch::<A>());
        crate::bpf_batch::for_each_entry(map, SCAN_CHUNK, |key: &CtKey<A>, value: &CtValue<A>| {
            entries += 1;
            // The reaper applies the whole rule (both entries of the flow); this only
            // spares it the entries that are certainly alive.
            if value.expires_ns != EXPIRES_REMOVING && value.expires_ns < now_ns {
                candidates.push(*key);
                if candidates.len() == reap_batch::<A>() {
                    reaped += self
                        .reap(table, &candidates)
                        .map_err(std::io::Error::other)?;
                    candidates.clear();
                }
            }
            Ok(())
        })
        .with_context(|| format!("reading {name}"))?;
        reaped += self.reap(table, &candidates)?;
        Ok(TableSweep {
            map: name,
            entries,
            reaped,
            capacity,
        })
    }

    /// Runs `epx_ct_reap` over `keys` of one family (at most its [`reap_batch`]); how many
    /// it removed.
    pub fn reap<A: Address>(&self, table: CtTable, keys: &[CtKey<A>]) -> Result<usize> {
        if keys.is_empty() {
            return Ok(0);
        }
        let request = ReapRequest {
            table: u32::from(match table {
                CtTable::Assured => trace_table::ASSURED,
                CtTable::Pending => trace_table::PENDING,
            }),
            count: u32::try_from(keys.len().min(reap_batch::<A>()))?,
            bits: u32::from(A::BITS),
            _pad: 0,
        };
        let mut input = Vec::with_capacity(size_of::<ReapRequest>() + size_of_val(keys));
        input.extend_from_slice(as_bytes(&request));
        for key in &keys[..request.count as usize] {
            input.extend_from_slice(as_bytes(key));
        }
        let result = self
            .program()?
            .test_run(TestRunOptions {
                data_in: Some(&input),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN of epx_ct_reap")?;
        Ok(result.return_value as usize)
    }

    /// `epx_ct_reap` itself, for callers that build their own input (the fuzzer).
    pub fn program(&self) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(REAP_PROGRAM_NAME)
            .context("epx_ct_reap not loaded")?
            .try_into()?)
    }
}

/// The bytes of a plain-old-data map type.
fn as_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `T` is Pod: initialized, without padding holes, valid as bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// What one sweep of one map found.
#[derive(Clone, Copy, Debug)]
pub struct TableSweep {
    /// The map's name.
    pub map: &'static str,
    /// Entries before the sweep.
    pub entries: usize,
    pub reaped: usize,
    pub capacity: u32,
}

impl TableSweep {
    fn share(&self, count: usize) -> f64 {
        count as f64 / f64::from(self.capacity.max(1))
    }
}

/// What one sweep did.
#[derive(Clone, Debug)]
pub struct SweepReport {
    pub tables: Vec<TableSweep>,
    pub elapsed: Duration,
}

impl SweepReport {
    pub fn reaped(&self) -> usize {
        self.tables.iter().map(|table| table.reaped).sum()
    }
}

/// The sweep interval's bounds: the first sweep comes after [`FIRST_INTERVAL`].
pub const FIRST_INTERVAL: Duration = Duration::from_secs(10);
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// The next interval after `report`: halved while a sweep removed over a quarter of a
/// map's capacity or left a map over three quarters full (dead flows would otherwise push
/// live ones out of the LRU), grown by half while sweeps remove under 5 % and the maps are
/// under half full, kept otherwise.
pub fn next_interval(current: Duration, report: &SweepReport) -> Duration {
    let busy = report.tables.iter().any(|table| {
        table.share(table.reaped) > 0.25 || table.share(table.entries - table.reaped) > 0.75
    });
    let quiet = report.tables.iter().all(|table| {
        table.share(table.reaped) < 0.05 && table.share(table.entries - table.reaped) < 0.5
    });
    let next = if busy {
        current / 2
    } else if quiet {
        current.mul_f64(1.5)
    } else {
        current
    };
    next.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// The running collector; dropping it stops the thread.
pub struct Collector {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    /// Starts sweeping every `fixed` interval, or at the adaptive one when `None`.
    pub fn spawn(reaper: Reaper, fixed: Option<Duration>, metrics: Metrics) -> Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                let mut interval = fixed.unwrap_or(FIRST_INTERVAL);
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                    match reaper.sweep() {
                        Ok(report) => {
                            record(&report, &metrics);
                            if fixed.is_none() {
                                interval = next_interval(interval, &report);
                            }
                            metrics.conntrack_gc_interval.set(interval.as_secs_f64());
                        }
                        Err(error) => warn!(error = format!("{error:#}"), "conntrack sweep failed"),
                    }
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn record(report: &SweepReport, metrics: &Metrics) {
    let reaped = report.reaped();
    if reaped > 0 {
        debug!(
            reaped,
            elapsed_us = report.elapsed.as_micros() as u64,
            "conntrack: finished flows removed"
        );
    }
    metrics.conntrack_gc_removed.inc_by(reaped as u64);
    metrics
        .conntrack_gc_duration
        .observe(report.elapsed.as_secs_f64());
    for table in &report.tables {
        metrics
            .map_entries
            .get_or_create(&MapLabel { map: table.map })
            .set((table.entries - table.reaped) as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entries: usize, reaped: usize) -> SweepReport {
        SweepReport {
            tables: vec![
                TableSweep {
                    map: map_names::CONNTRACK,
                    entries,
                    reaped,
                    capacity: 1000,
                },
                TableSweep {
                    map: map_names::CONNTRACK_PENDING,
                    entries: 0,
                    reaped: 0,
                    capacity: 250,
                },
            ],
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn the_interval_follows_deletions_and_fill() {
        let ten = Duration::from_secs(10);
        // (case, entries before, reaped, next interval)
        let cases = [
            ("quiet: grows by half", 100, 10, Duration::from_secs(15)),
            ("many removed: halves", 600, 300, Duration::from_secs(5)),
            (
                "full of live flows: halves",
                900,
                10,
                Duration::from_secs(5),
            ),
            ("in between: stays", 600, 100, ten),
        ];
        for (name, entries, reaped, expected) in cases {
            assert_eq!(
                next_interval(ten, &report(entries, reaped)),
                expected,
                "{name}"
            );
        }
        assert_eq!(next_interval(MIN_INTERVAL, &report(900, 0)), MIN_INTERVAL);
        assert_eq!(next_interval(MAX_INTERVAL, &report(0, 0)), MAX_INTERVAL);
    }
}
