//! Named network namespaces (`ip netns`), and running code inside one.
//!
//! `setns(CLONE_NEWNET)` switches only the calling thread, and a socket belongs to the
//! namespace of the thread that created it for its whole life. So [`Netns::run`] runs a
//! closure on a fresh thread that enters the namespace first and ends afterwards: the
//! caller's thread never leaves the namespace it was in.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::cgroup::Cgroup;

/// A network namespace created by the lab (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// The cgroup that [`Netns::run`] threads join (see [`Netns::place_in`]).
    cgroup: Mutex<Option<PathBuf>>,
}

/// While it lives, threads of [`Netns::run`] in its namespace join its cgroup.
#[derive(Debug)]
pub struct Placement<'a> {
    netns: &'a Netns,
}

impl Drop for Placement<'_> {
    fn drop(&mut self) {
        *self.netns.cgroup.lock().expect("cgroup lock") = None;
    }
}

impl Netns {
    pub(crate) fn create(name: String) -> Result<Self> {
        run_ip(&["netns", "add", &name])?;
        Ok(Self {
            name,
            cgroup: Mutex::new(None),
        })
    }

    /// From now until the returned placement drops, the threads that make sockets in this
    /// namespace ([`Netns::run`], so every client helper) do it from inside `cgroup`: the
    /// daemon's socket programs, attached there, see those sockets — as they see a process
    /// of the node (or a pod) on a real machine.
    pub fn place_in(&self, cgroup: &Cgroup) -> Placement<'_> {
        *self.cgroup.lock().expect("cgroup lock") = Some(cgroup.path().to_owned());
        Placement { netns: self }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file that `setns` opens.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <this namespace> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs `ip -n <this namespace> <args>` and returns what it printed.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip_stdout(&full)
    }

    /// Runs `f` on a new thread inside this namespace and returns its result. Sockets that
    /// `f` creates stay in this namespace and may be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let namespace = self.open()?;
        let cgroup = self.cgroup.lock().expect("cgroup lock").clone();
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| -> Result<T> {
                enter(&namespace).with_context(|| format!("entering netns {}", self.name))?;
                if let Some(cgroup) = &cgroup {
                    Cgroup::enter_thread(cgroup)
                        .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
                }
                Ok(f())
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Sets a sysctl of this namespace (`key` as a path under /proc/sys, e.g.
    /// `net/ipv4/ip_forward`). /proc/sys/net shows the namespace of the thread that opens
    /// it, so this runs in [`Netns::run`], which fails before writing if `setns` failed.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("writing {} in netns {}", path.display(), self.name))
    }

    /// Runs `ethtool <args>` inside this namespace (ethtool has no `-n`; the child enters
    /// the namespace before it execs).
    pub fn ethtool(&self, args: &[&str]) -> Result<()> {
        let namespace = self.open()?;
        let mut command = Command::new("ethtool");
        command.args(args);
        // SAFETY: setns is a plain syscall, safe between fork and exec.
        unsafe { command.pre_exec(move || enter(&namespace)) };
        let output = command
            .output()
            .context("running `ethtool` (`cargo xtask setup` installs it)")?;
        if !output.status.success() {
            bail!(
                "`ethtool {}` in netns {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Makes `device` (a veth in this namespace) send like a NIC onto a wire: it computes
    /// its checksums itself instead of handing partial ones across (a NIC's transmit
    /// offload puts complete checksums on the wire; an XDP program at the other end cannot
    /// tell a partial one from a complete one, and updates it as complete).
    pub fn like_a_wire(&self, device: &str) -> Result<()> {
        self.ethtool(&["-K", device, "tx", "off"])
    }

    /// An open handle on the namespace, for `setns` in a child process.
    pub(crate) fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening netns {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run_ip(&["netns", "delete", &self.name]) {
            eprintln!("proxy-lab: cannot delete netns {}: {error:#}", self.name);
        }
    }
}

/// Moves the calling thread into `namespace`.
pub(crate) fn enter(namespace: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open namespace file descriptor.
    if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that this process may create network namespaces: a throwaway thread unshares
/// into a new one, which disappears when the thread ends.
pub(crate) fn probe_unshare() -> std::io::Result<()> {
    std::thread::spawn(|| {
        // SAFETY: affects only this short-lived thread.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .expect("probe thread panicked")
}

fn run_ip(args: &[&str]) -> Result<()> {
    ip_stdout(args).map(drop)
}

fn ip_stdout(args: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
