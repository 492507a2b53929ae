//! `cargo xtask setup | test | demo`: orchestration only — installing the toolchain pieces
//! the eBPF build needs, running the checks CI runs, and starting the lab demo. The logic
//! being tested lives in the workspace crates.

mod command;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use command::{Cargo, run_step};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ebpf-proxy development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (nightly rust-src, LLVM 22, bpf-linker, iproute2,
    /// iptables) and mount bpffs. Idempotent; needs root.
    Setup,
    /// setup, then fmt, clippy, build the daemon and run every test with it.
    Test,
    /// setup, build, and run the lab demo: the example Services under a burst of traffic.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.task {
        Task::Setup => setup::run(),
        Task::Test => test(),
        Task::Demo => demo(),
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
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy")?;
    let mut tests = cargo.command(&["test", "--workspace", "--exclude", "proxy-ebpf"]);
    tests.env("EBPF_PROXY_BIN", &daemon);
    run_step(tests)?;
    println!("\nxtask test: fmt, clippy, build and tests all passed");
    Ok(())
}

fn demo() -> Result<()> {
    setup::run()?;
    let cargo = Cargo::new(workspace_root());
    let daemon = cargo.build_binary("proxy-userspace", "ebpf-proxy")?;
    let demo = cargo.build_binary("proxy-lab", "lab-demo")?;
    let mut run = std::process::Command::new(demo);
    run.env("EBPF_PROXY_BIN", daemon);
    run_step(run)
}
