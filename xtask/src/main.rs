//! `cargo xtask setup | test | demo | bench | soak | fuzz`: orchestration only — installing
//! the toolchain pieces the eBPF build needs, running the checks CI runs, starting the lab
//! demo, running the benchmarks, and the long variants of the reliability tests and the
//! packet fuzzer. The logic being tested lives in the workspace crates.

mod command;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use command::{Cargo, Profile, run_step};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ebpf-proxy development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (nightly rust-src, LLVM 22, bpf-linker, iproute2,
    /// iptables, nftables, a font for the benchmark chart) and mount bpffs. Idempotent;
    /// needs root.
    Setup,
    /// setup, then fmt, clippy, build the daemon, run every test with it, and a quick
    /// benchmark run as a smoke check.
    Test,
    /// setup, build, and run the lab demo: the example Services under a burst of traffic.
    Demo,
    /// setup, build in release mode, and run the benchmarks against kube-proxy-shaped
    /// iptables and nftables rules; writes docs/benchmarks.md and docs/benchmarks.png.
    Bench {
        /// Small sizes and short runs (a minute or two): proves the harness works, the
        /// figures mean nothing. Writes under the target directory, not docs/.
        #[arg(long)]
        quick: bool,
        /// Run only these sections (packet, related, gc, connections, programming, change,
        /// memory, soak, hostile); a partial run writes under the target directory, not
        /// docs/.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Connections, programming and memory at these numbers of Services only (e.g.
        /// 100000); such a run writes under the target directory, not docs/.
        #[arg(long, value_delimiter = ',')]
        services: Vec<usize>,
    },
    /// setup, build, and run the long variants of lab tests: the API outage (each phase —
    /// down, stalled, 500, 503, garbage, blackhole — minutes instead of seconds), TCP
    /// connections across resyncs and conntrack sweeps, and TCP connections and UDP queries
    /// during endpoint churn (from manifests and through the test API server). Prints
    /// their figures.
    Soak {
        /// Seconds per outage phase (six phases).
        #[arg(long, default_value_t = 120)]
        phase_seconds: u64,
        /// Seconds of connections across resyncs and conntrack sweeps (`conntrack_churn`).
        #[arg(long, default_value_t = 600)]
        churn_seconds: u64,
        /// Endpoint changes per source under TCP connections and UDP queries
        /// (`endpoint_churn`).
        #[arg(long, default_value_t = 10_000)]
        endpoint_changes: u64,
    },
    /// setup, then the packet fuzzer in a release build: every program BPF_PROG_TEST_RUN
    /// can run (`epx_ingress`, `epx_trace`, `epx_ct_reap`) against generated packets,
    /// each checked against the properties in proxy-userspace/tests/fuzz/. Prints the rate;
    /// a failure prints the seed, the packet in hex and the command that replays the run.
    Fuzz {
        /// Packets to generate (each goes through the datapath and its dry run, and a
        /// request through the reaper).
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// The generator's seed; a new one each run if not given.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.task {
        Task::Setup => setup::run(),
        Task::Test => test(),
        Task::Demo => demo(),
        Task::Bench {
            quick,
            only,
            services,
        } => bench(quick, &only, &services),
        Task::Soak {
            phase_seconds,
            churn_seconds,
            endpoint_changes,
        } => soak(phase_seconds, churn_seconds, endpoint_changes),
        Task::Fuzz { packets, seed } => fuzz(packets, seed),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\nxtask failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (xtask's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn test() -> Result<()> {
    setup::run()?;
    let cargo = Cargo::new(workspace_root());
    run_step(cargo.command(&["fmt", "--all", "--check"]))?;
    // proxy-ebpf builds only for bpfel-unknown-none with nightly (`#![feature]`, no
    // unwinding): clippy for the host target cannot compile it. proxy-userspace's build.rs
    // compiles it for the real target on every build.
    run_step(cargo.command(&[
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy", Profile::Debug)?;
    let mut tests = cargo.command(&["test", "--workspace", "--exclude", "proxy-ebpf"]);
    tests.env("EBPF_PROXY_BIN", &daemon);
    run_step(tests)?;
    // The benchmarks' smoke check, no timing assertions. Debug builds: they reuse what the
    // tests built, and the figures of a quick run mean nothing anyway.
    run_bench(&cargo, Profile::Debug, true, &[], &[])?;
    println!("\nxtask test: fmt, clippy, build, tests and the benchmarks' smoke run all passed");
    Ok(())
}

fn demo() -> Result<()> {
    setup::run()?;
    let cargo = Cargo::new(workspace_root());
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy", Profile::Debug)?;
    let demo = cargo.build_binary("proxy-lab", "lab-demo", Profile::Debug)?;
    let mut run = std::process::Command::new(demo);
    run.env("EBPF_PROXY_BIN", daemon);
    run_step(run)
}

fn soak(phase_seconds: u64, churn_seconds: u64, endpoint_changes: u64) -> Result<()> {
    setup::run()?;
    let cargo = Cargo::new(workspace_root());
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy", Profile::Debug)?;
    for (test, variable, value) in [
        (
            "api_outage",
            "EBPF_PROXY_OUTAGE_PHASE_SECONDS",
            phase_seconds,
        ),
        ("conntrack_churn", "EBPF_PROXY_CHURN_SECONDS", churn_seconds),
        (
            "endpoint_churn",
            "EBPF_PROXY_ENDPOINT_CHANGES",
            endpoint_changes,
        ),
    ] {
        let mut run = cargo.command(&[
            "test",
            "--package",
            "proxy-lab",
            "--test",
            test,
            "--",
            "--nocapture",
        ]);
        run.env("EBPF_PROXY_BIN", &daemon)
            .env(variable, value.to_string());
        run_step(run)?;
    }
    Ok(())
}

fn fuzz(packets: u64, seed: Option<u64>) -> Result<()> {
    setup::run()?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |since| since.as_nanos() as u64)
    });
    println!("\nfuzzing {packets} packets with seed {seed}");
    let mut run = Cargo::new(workspace_root()).command(&[
        "test",
        "--release",
        "--package",
        "proxy-userspace",
        "--test",
        "fuzz",
        "--",
        "--nocapture",
    ]);
    run.env("EBPF_PROXY_FUZZ_PACKETS", packets.to_string())
        .env("EBPF_PROXY_FUZZ_SEED", seed.to_string());
    run_step(run)
}

fn bench(quick: bool, only: &[String], services: &[usize]) -> Result<()> {
    setup::run()?;
    let cargo = Cargo::new(workspace_root());
    run_bench(&cargo, Profile::Release, quick, only, services)
}

/// Builds the daemon and the benchmarks with `profile` and runs them. A full run writes
/// docs/; a quick or partial one writes next to the binary, so it never overwrites the
/// published figures.
fn run_bench(
    cargo: &Cargo,
    profile: Profile,
    quick: bool,
    only: &[String],
    services: &[usize],
) -> Result<()> {
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy", profile)?;
    let bench = cargo.build_binary("proxy-bench", "proxy-bench", profile)?;
    let beside_binary = |name| {
        bench
            .parent()
            .expect("an executable lives in a directory")
            .join(name)
    };
    let out_dir = if quick {
        beside_binary("bench-quick")
    } else if !only.is_empty() || !services.is_empty() {
        beside_binary("bench-partial")
    } else {
        workspace_root().join("docs")
    };
    let mut run = std::process::Command::new(bench);
    run.arg("--out-dir")
        .arg(out_dir)
        .env("EBPF_PROXY_BIN", daemon);
    if quick {
        run.arg("--quick");
    }
    if !only.is_empty() {
        run.arg("--only").arg(only.join(","));
    }
    if !services.is_empty() {
        let sizes: Vec<String> = services.iter().map(usize::to_string).collect();
        run.arg("--services").arg(sizes.join(","));
    }
    run_step(run)
}
