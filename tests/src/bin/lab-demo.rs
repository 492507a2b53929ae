//! `cargo xtask demo`: builds the lab, applies `deploy/examples/`, runs the real daemon,
//! sends a bounded burst of requests to the example Services and prints how they spread
//! over the backends. Everything is torn down on exit.
//!
//! pod-1..pod-3 are the Services' endpoints; pod-4 is the in-cluster caller, because a pod
//! calling a Service that picks itself needs hairpin SNAT, which is not what this shows.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_lab::{Daemon, Lab, Manifest, Reply, Tally, addr, lab_unavailable_reason};

/// Requests per burst; each burst also stops at [`BURST_DEADLINE`].
const REQUESTS_PER_BURST: usize = 300;
const BURST_DEADLINE: Duration = Duration::from_secs(60);
/// A burst gives up after this many failures in a row (each can take a 2 s timeout).
const FAILURES_IN_A_ROW_LIMIT: usize = 5;
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// The example Services' ports (deploy/examples/).
const SERVICE_TCP_PORT: u16 = 80;
const SERVICE_UDP_PORT: u16 = 53;
const BACKENDS: [&str; 3] = ["pod-1", "pod-2", "pod-3"];

fn main() -> ExitCode {
    if let Some(reason) = lab_unavailable_reason() {
        eprintln!("lab-demo needs root and network namespaces: {reason}");
        return ExitCode::FAILURE;
    }
    let examples = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples"));
    match run(&examples) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lab-demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(examples: &Path) -> Result<()> {
    let manifests = read_manifests(examples)?;
    let lab = Lab::builder().pods(4).build().context("building the lab")?;
    println!("lab {} is up:", lab.id());
    println!(
        "  node    eth0 {} {}  (NodePorts {} tcp, {} udp)",
        addr::NODE_IP,
        addr::NODE_IPV6,
        addr::NODE_PORT_TCP,
        addr::NODE_PORT_UDP
    );
    println!("  client  eth0 {} {}", addr::CLIENT_IP, addr::CLIENT_IPV6);
    for pod in lab.pods() {
        println!("  {:<7} eth0 {} {}", pod.name, pod.ip, pod.ipv6);
    }
    println!(
        "applying {} manifest(s) from {}",
        manifests.len(),
        examples.display()
    );

    let mut daemon = lab.daemon().echo_log_on_drop(false);
    for manifest in manifests {
        daemon = daemon.manifest(manifest);
    }
    let daemon = daemon.start()?;
    let outcome = demonstrate(&lab, &daemon);
    if outcome.is_err() {
        eprintln!("---- ebpf-proxy log ----\n{}\n----", daemon.log());
    }
    outcome?;
    let status = daemon.stop()?;
    println!("daemon stopped ({status}); tearing the lab down");
    Ok(())
}

fn demonstrate(lab: &Lab, daemon: &Daemon<'_>) -> Result<()> {
    daemon.wait_synced(SYNC_TIMEOUT)?;
    if let Some(line) = daemon.last_sync_line() {
        println!("daemon: {line}");
    }
    let caller = &lab.pod(4).ns;
    let client = lab.client();
    println!(
        "sending {REQUESTS_PER_BURST} requests per column (new connection / new socket each)…"
    );
    let bursts = [
        Burst::run(
            "pod-4 → ClusterIP tcp",
            SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_TCP_PORT),
            || caller.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT),
        ),
        Burst::run(
            "pod-4 → ClusterIP udp",
            SocketAddrV4::new(addr::CLUSTER_IP, SERVICE_UDP_PORT),
            || caller.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT),
        ),
        Burst::run(
            "client → NodePort tcp",
            SocketAddrV4::new(addr::NODE_IP, addr::NODE_PORT_TCP),
            || client.tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP),
        ),
    ];
    print_table(&bursts);

    show_cli_views(daemon)?;

    if bursts.iter().any(|burst| burst.answered() == 0) {
        bail!("a burst got no answer at all");
    }
    Ok(())
}

/// What a node admin would see after the bursts: the node-admin CLI on the same pins.
fn show_cli_views(daemon: &Daemon<'_>) -> Result<()> {
    let binary = proxy_lab::daemon_binary()?;
    let root = daemon.bpffs_root();
    for view in ["services", "stats"] {
        let output = std::process::Command::new(&binary)
            .arg(view)
            .arg("--bpffs-root")
            .arg(&root)
            .output()
            .with_context(|| format!("running `ebpf-proxy {view}`"))?;
        if !output.status.success() {
            bail!(
                "`ebpf-proxy {view}` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        println!(
            "\n$ ebpf-proxy {view}\n{}",
            String::from_utf8_lossy(&output.stdout).trim_end()
        );
    }
    Ok(())
}

/// The outcome of one bounded burst of requests to one frontend.
struct Burst {
    title: &'static str,
    tally: Tally,
    failures: usize,
    /// Replies whose source was not the frontend (reverse NAT missing).
    wrong_source: usize,
    first_error: Option<String>,
}

impl Burst {
    fn run(
        title: &'static str,
        frontend: SocketAddrV4,
        mut request: impl FnMut() -> Result<Reply>,
    ) -> Self {
        let mut burst = Burst {
            title,
            tally: Tally::new(BACKENDS),
            failures: 0,
            wrong_source: 0,
            first_error: None,
        };
        let deadline = Instant::now() + BURST_DEADLINE;
        let mut failures_in_a_row = 0;
        for _ in 0..REQUESTS_PER_BURST {
            if Instant::now() >= deadline || failures_in_a_row == FAILURES_IN_A_ROW_LIMIT {
                break;
            }
            match request() {
                Ok(reply) => {
                    failures_in_a_row = 0;
                    if reply.peer != SocketAddr::V4(frontend) {
                        burst.wrong_source += 1;
                    }
                    burst.tally.record(&reply.body);
                }
                Err(error) => {
                    failures_in_a_row += 1;
                    burst.failures += 1;
                    burst.first_error.get_or_insert(format!("{error:#}"));
                }
            }
        }
        burst
    }

    fn answered(&self) -> u64 {
        self.tally.total()
    }
}

fn print_table(bursts: &[Burst]) {
    print!("\n{:<10}", "backend");
    for burst in bursts {
        print!(" {:>24}", burst.title);
    }
    println!();
    let mut rows: Vec<String> = BACKENDS.iter().map(|name| name.to_string()).collect();
    for burst in bursts {
        for name in burst.tally.unexpected() {
            if !rows.iter().any(|row| row == name) {
                rows.push(name.to_owned());
            }
        }
    }
    for row in &rows {
        print!("{row:<10}");
        for burst in bursts {
            let count = burst.tally.count(row);
            let share = 100.0 * count as f64 / burst.answered().max(1) as f64;
            print!(" {:>24}", format!("{count} ({share:.0}%)"));
        }
        println!();
    }
    print!("{:<10}", "failed");
    for burst in bursts {
        print!(" {:>24}", burst.failures);
    }
    println!();
    print!("{:<10}", "bad source");
    for burst in bursts {
        print!(" {:>24}", burst.wrong_source);
    }
    println!();
    print!("{:<10}", "chi²");
    for burst in bursts {
        let verdict = match (burst.answered(), burst.tally.looks_uniform()) {
            (0, _) => "no answers".to_owned(),
            (_, true) => format!("{:.2} uniform", burst.tally.chi_square()),
            (_, false) => format!("{:.2} skewed", burst.tally.chi_square()),
        };
        print!(" {verdict:>24}");
    }
    println!(
        "\n(chi² against an even spread; above {} rejects it at p = 0.001)",
        Tally::new(BACKENDS).chi_square_critical()
    );
    for burst in bursts {
        if let Some(error) = &burst.first_error {
            println!("first failure of {}: {error}", burst.title);
        }
    }
    println!();
}

/// Every `*.yaml` file of the examples directory, in name order.
fn read_manifests(dir: &Path) -> Result<Vec<Manifest>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<std::io::Result<_>>()?;
    paths.retain(|path| path.extension().is_some_and(|ext| ext == "yaml"));
    paths.sort();
    if paths.is_empty() {
        bail!("no *.yaml manifests in {}", dir.display());
    }
    paths
        .into_iter()
        .map(|path| {
            let yaml = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file_name = path
                .file_name()
                .expect("read_dir entries have names")
                .to_string_lossy()
                .into_owned();
            Ok(Manifest { file_name, yaml })
        })
        .collect()
}
