//! The previous release's `ebpf-proxy`, built from its commit, for upgrade tests.
//!
//! The source comes out of this repository's history (`git archive`) and builds with its
//! own target directory under the workspace's `target/previous-release/<commit>/`, once:
//! later tests (and later runs in the same checkout) reuse the binary. Concurrent callers
//! wait on a lock file there.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

/// The previous release: the last commit before the layout record (its maps have layout
/// version 0 in `proxy_userspace::layout`).
pub const PREVIOUS_RELEASE: &str = "a7370e7";

/// The previous release's binary, built if it is not there yet.
pub fn previous_release_binary() -> Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the lab crate has no parent directory")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let dir = target.join("previous-release").join(PREVIOUS_RELEASE);
    let binary = dir.join("target").join("debug").join("ebpf-proxy");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _lock = lock(&dir.join(".lock"))?;
    if binary.is_file() {
        return Ok(binary);
    }
    let source = dir.join("src");
    if !source.join("Cargo.toml").is_file() {
        extract(workspace, &source)?;
    }
    let log_path = dir.join("build.log");
    let log = File::create(&log_path)?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "proxy-userspace", "--bin", "ebpf-proxy"])
        .current_dir(&source)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running cargo build for the previous release")?;
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        bail!(
            "building the previous release ({PREVIOUS_RELEASE}) failed ({status}); {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    ensure!(binary.is_file(), "the build left no {}", binary.display());
    Ok(binary)
}

/// Writes the tree of [`PREVIOUS_RELEASE`] into `source` (through a temporary directory,
/// so an interrupted extraction is never taken for a complete one).
fn extract(workspace: &Path, source: &Path) -> Result<()> {
    let staging = source.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let archive = staging.with_extension("tar");
    let status = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["archive", "--format=tar", "-o"])
        .arg(&archive)
        .arg(PREVIOUS_RELEASE)
        .status()
        .context("running git archive")?;
    ensure!(
        status.success(),
        "git archive {PREVIOUS_RELEASE} failed ({status}): the upgrade test needs the \
         repository's history (a full clone)"
    );
    let status = Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&staging)
        .status()
        .context("running tar")?;
    ensure!(status.success(), "unpacking {} failed", archive.display());
    std::fs::remove_file(&archive)?;
    let _ = std::fs::remove_dir_all(source);
    std::fs::rename(&staging, source)
        .with_context(|| format!("moving the source to {}", source.display()))?;
    Ok(())
}

/// An exclusive `flock` on `path`, released when the file closes.
fn lock(path: &Path) -> Result<File> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}
