//! `cargo xtask setup`: makes a fresh machine able to build and test ebpf-proxy. Each step
//! checks first and acts only when something is missing, saying which it did.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::command::{output_of, run_step};

/// Debian packages: LLVM 22 for bpf-linker, iproute2 and ethtool for the lab (its veths
/// stand for wires: see `Netns::like_a_wire`), iptables and nftables for the
/// kube-proxy-shaped baselines, and the font the benchmark chart's text is drawn in.
const DEBIAN_PACKAGES: [&str; 7] = [
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "ethtool",
    "iptables",
    "nftables",
    "fonts-dejavu-core",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    println!("==> setup");
    require_root()?;
    nightly_rust_src()?;
    debian_packages()?;
    bpf_linker()?;
    bpffs_mounted()?;
    println!("setup: done");
    Ok(())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "setup needs root: it installs packages, mounts bpffs, and the lab creates network \
             namespaces. Run it as root (e.g. `sudo -E cargo xtask setup`)."
        );
    }
    Ok(())
}

fn report(what: &str, present: bool) {
    let verdict = if present {
        "present"
    } else {
        "missing, installing"
    };
    println!("  {what}: {verdict}");
}

/// aya-build compiles proxy-ebpf with nightly's `-Z build-std`, which needs rust-src.
fn nightly_rust_src() -> Result<()> {
    let installed = output_of(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .is_some_and(|list| list.lines().any(|line| line.starts_with("rust-src")));
    report("rust-src for the nightly toolchain", installed);
    if !installed {
        let mut add = Command::new("rustup");
        add.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        run_step(add)?;
    }
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .into_iter()
        .filter(|package| {
            let installed = output_of("dpkg-query", &["-W", "-f=${Status}", package])
                .is_some_and(|status| status.contains("install ok installed"));
            report(&format!("Debian package {package}"), installed);
            !installed
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut update = Command::new("apt-get");
    update.arg("update");
    run_step(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_step(install)
}

/// bpf-linker links the eBPF object; it must be built against the LLVM installed above.
fn bpf_linker() -> Result<()> {
    let present = on_path("bpf-linker");
    report("bpf-linker on PATH", present);
    if !present {
        let mut install = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        install
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX);
        run_step(install)?;
    }
    Ok(())
}

/// The daemon pins maps and links under bpffs; tests mount private instances of their own.
fn bpffs_mounted() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
        })
    });
    println!(
        "  bpffs at {BPFFS}: {}",
        if mounted {
            "mounted"
        } else {
            "not mounted, mounting"
        }
    );
    if !mounted {
        let mut mount = Command::new("mount");
        mount.args(["-t", "bpf", "bpf", BPFFS]);
        run_step(mount)?;
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
