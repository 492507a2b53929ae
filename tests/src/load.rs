//! The load generator: threads in a lab namespace open new TCP connections to random
//! targets, one request and reply each (optionally held open a while first), as fast as
//! they complete, bounded by a duration and a count. Connections end with a reset
//! (SO_LINGER 0), so no TIME_WAIT state piles up and ports can be reused at once, for
//! every variant alike. The benchmarks measure rates with it; the tests demand that none
//! fail while the daemon resyncs and collects conntrack garbage.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Netns;
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct LoadSettings {
    pub threads: usize,
    pub duration: Duration,
    /// Upper bound on connections per run, over all threads.
    pub max_connections: usize,
    /// Connect and read timeout of one connection.
    pub timeout: Duration,
    /// How long each connection stays open before its request (0: not at all).
    pub hold: Duration,
}

/// What one run of the generator saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub completed: usize,
    pub failed: usize,
    pub elapsed: Duration,
    /// Time from `connect` to an established connection, one per completed connection.
    pub connect_latencies: Vec<Duration>,
    /// Each failed connection: when (since the start) and why.
    pub failures: Vec<(Duration, String)>,
}

impl LoadReport {
    pub fn connections_per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs the generator from `client` against `targets`; `seed` fixes the target sequence.
pub fn generate<T: Copy + Into<SocketAddr> + Sync>(
    client: &Netns,
    targets: &[T],
    settings: &LoadSettings,
    seed: u64,
) -> Result<LoadReport> {
    if targets.is_empty() {
        bail!("no targets");
    }
    let start_line = Barrier::new(settings.threads + 1);
    let per_thread = settings.max_connections.div_ceil(settings.threads);
    let reports = std::thread::scope(|scope| -> Result<Vec<LoadReport>> {
        let workers: Vec<_> = (0..settings.threads)
            .map(|thread| {
                let start_line = &start_line;
                scope.spawn(move || {
                    client.run(|| {
                        let mut rng = Rng::new(seed.wrapping_add(thread as u64));
                        start_line.wait();
                        let started = Instant::now();
                        let mut report = LoadReport::default();
                        while started.elapsed() < settings.duration
                            && report.completed + report.failed < per_thread
                        {
                            let target: SocketAddr = targets[rng.below(targets.len())].into();
                            match connection(target, settings.timeout, settings.hold) {
                                Ok(latency) => {
                                    report.completed += 1;
                                    report.connect_latencies.push(latency);
                                }
                                Err(error) => {
                                    report.failed += 1;
                                    report
                                        .failures
                                        .push((started.elapsed(), format!("{target}: {error}")));
                                }
                            }
                        }
                        report.elapsed = started.elapsed();
                        report
                    })
                })
            })
            .collect();
        start_line.wait();
        workers
            .into_iter()
            .map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    .context("load thread could not enter the client namespace")
            })
            .collect()
    })?;
    let mut total = LoadReport::default();
    for report in reports {
        total.completed += report.completed;
        total.failed += report.failed;
        total.elapsed = total.elapsed.max(report.elapsed);
        total.connect_latencies.extend(report.connect_latencies);
        total.failures.extend(report.failures);
    }
    total.failures.sort_by_key(|(when, _)| *when);
    Ok(total)
}

/// One connection with one request and its reply; returns how long `connect` took.
fn connection(target: SocketAddr, timeout: Duration, hold: Duration) -> std::io::Result<Duration> {
    let begin = Instant::now();
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    let connected = begin.elapsed();
    if !hold.is_zero() {
        std::thread::sleep(hold);
    }
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    (&stream).write_all(b"ping\n")?;
    let mut reply = [0u8; 64];
    let read = (&stream).read(&mut reply)?;
    reset_on_close(&stream);
    if read == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(connected)
}

/// SO_LINGER with a zero timeout: closing sends a reset instead of entering TIME_WAIT.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value that outlives the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// The daemon's flags for the churn scenario: a full resync and a conntrack sweep every
/// second.
pub const CHURN_DAEMON_ARGS: [&str; 4] = ["--resync-seconds", "1", "--conntrack-gc-interval", "1s"];

/// The client's `ip_local_port_range` for the churn scenario: at the rate
/// [`churn_settings`] reaches, a port comes back after about the closing timeout (10 s), so
/// flows are swept and their ports reused around the same time.
pub const CHURN_PORT_RANGE: &str = "40000 55000";

/// The churn scenario's load (without a duration): many threads holding their connections
/// open 30 ms each, so some connection is always alive when the sweep runs.
pub fn churn_settings() -> LoadSettings {
    LoadSettings {
        threads: 32,
        duration: Duration::ZERO,
        max_connections: usize::MAX,
        timeout: Duration::from_secs(1),
        hold: Duration::from_millis(30),
    }
}
