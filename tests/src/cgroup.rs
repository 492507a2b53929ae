//! A private cgroup v2 for one daemon: its socket programs attach here (`--cgroup-root`),
//! never to the machine's root cgroup, and only the lab's own client threads run inside.
//!
//! The cgroup is *threaded* (cgroup v2's thread mode), so single threads of the test process
//! can join it: a socket belongs to the cgroup of the thread that created it, and
//! [`Netns::run`](crate::Netns::run) threads join the cgroup a namespace was placed in
//! ([`Netns::place_in`](crate::Netns::place_in)). It is made under the test process's own
//! cgroup (a thread can only move within its process's threaded subtree) and removed on
//! drop, also when a test panics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::scratch::unique_prefix;

/// A threaded cgroup under this process's own cgroup v2; removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `epx<pid>-<n>-<purpose>` under this process's cgroup.
    pub fn create(purpose: &str) -> Result<Self> {
        let parent = own_cgroup()?;
        let path = parent.join(format!("{}-{purpose}", unique_prefix()));
        std::fs::create_dir(&path)
            .with_context(|| format!("creating cgroup {}", path.display()))?;
        let cgroup = Self { path };
        std::fs::write(cgroup.path.join("cgroup.type"), "threaded")
            .with_context(|| format!("making {} threaded", cgroup.path.display()))?;
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread into this cgroup (its sockets are made here from now on).
    pub(crate) fn enter_thread(path: &Path) -> std::io::Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        std::fs::write(path.join("cgroup.threads"), tid.to_string())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Threads leave as they end; give the last ones a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(error) if Instant::now() >= deadline => {
                    eprintln!(
                        "proxy-lab: cannot remove cgroup {}: {error}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// The directory of this process's cgroup in the unified hierarchy: cgroup v2 sits at
/// `/sys/fs/cgroup` or, on hybrid hosts, `/sys/fs/cgroup/unified` (only a cgroup v2 root
/// has `cgroup.controllers`).
fn own_cgroup() -> Result<PathBuf> {
    let mount = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|mount| mount.join("cgroup.controllers").exists())
        .ok_or_else(|| anyhow!("no cgroup v2 hierarchy at /sys/fs/cgroup(/unified)"))?;
    let membership = std::fs::read_to_string("/proc/self/cgroup")?;
    let own = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("this process is in no cgroup v2 (/proc/self/cgroup)"))?;
    Ok(mount.join(own.trim_start_matches('/')))
}
