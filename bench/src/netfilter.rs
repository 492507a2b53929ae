//! Loading the kube-proxy-shaped baselines into a lab namespace: `iptables-restore` and
//! `nft -f`, run with `ip netns exec` so the rules exist only in that namespace, timed,
//! and stopped when they take too long (the namespace, and with it anything half-loaded,
//! goes with the lab).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_lab::Netns;

use crate::cluster::Cluster;
use crate::kube_rules;

/// A kube-proxy mode that programs netfilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Netfilter {
    Iptables,
    Nftables,
}

impl Netfilter {
    pub fn label(self) -> &'static str {
        match self {
            Netfilter::Iptables => "iptables",
            Netfilter::Nftables => "nftables",
        }
    }

    /// The command that loads rules from a file.
    fn loader(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Netfilter::Iptables => ("iptables-restore", &[]),
            Netfilter::Nftables => ("nft", &["-f"]),
        }
    }

    /// kube-proxy's rules for `cluster` in this mode's input format.
    pub fn rules(self, cluster: &Cluster) -> String {
        match self {
            Netfilter::Iptables => kube_rules::iptables_restore(cluster),
            Netfilter::Nftables => kube_rules::nft_script(cluster),
        }
    }

    /// The tool's own version line, for the machine description.
    pub fn version(self) -> String {
        let tool = match self {
            Netfilter::Iptables => "iptables",
            Netfilter::Nftables => "nft",
        };
        Command::new(tool)
            .arg("--version")
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_else(|| format!("{tool}: not installed"))
    }
}

/// How long loading took, or that it was stopped.
#[derive(Clone, Copy, Debug)]
pub enum Loaded {
    In(Duration),
    StoppedAfter(Duration),
}

/// Loads `rules` into `namespace` with `netfilter`'s tool; stops it after `timeout`.
pub fn load(
    namespace: &Netns,
    netfilter: Netfilter,
    rules: &str,
    timeout: Duration,
) -> Result<Loaded> {
    let file = RulesFile::write(rules)?;
    let (program, args) = netfilter.loader();
    let mut child = Command::new("ip")
        .args(["netns", "exec", namespace.name(), program])
        .args(args)
        .arg(&file.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} in {}", namespace.name()))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            if !status.success() {
                let mut errors = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut stderr, &mut errors)?;
                }
                let errors: String = errors.lines().take(5).collect::<Vec<_>>().join("\n");
                bail!("{program} failed ({status}): {errors}");
            }
            return Ok(Loaded::In(elapsed));
        }
        if started.elapsed() >= timeout {
            // `ip netns exec` execs the tool itself, so this stops the tool.
            child.kill()?;
            child.wait()?;
            return Ok(Loaded::StoppedAfter(started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rules written to a temporary file, removed on drop.
struct RulesFile {
    path: PathBuf,
}

impl RulesFile {
    fn write(rules: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "epx-bench-{}-{}.rules",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, rules).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
