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

/// Services per `nft -f` transaction where rules are loaded in parts: small enough that
/// the kernel's per-transaction walks stay short, large enough that the few `nft` runs
/// (each reads the ruleset in place first) cost little.
const NFT_SERVICES_PER_TRANSACTION: usize = 1_000;

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

    /// The same rules as [`Netfilter::rules`], in parts to load one after the other, for
    /// where only the rules in place matter: nftables' in transactions of
    /// [`NFT_SERVICES_PER_TRANSACTION`] Services (one transaction costs O(N²) in the kernel,
    /// see [`kube_rules::nft_transactions`]); iptables' in one (`iptables-restore` replaces
    /// the whole table).
    pub fn rules_in_parts(self, cluster: &Cluster) -> Vec<String> {
        match self {
            Netfilter::Iptables => vec![kube_rules::iptables_restore(cluster)],
            Netfilter::Nftables => {
                kube_rules::nft_transactions(cluster, NFT_SERVICES_PER_TRANSACTION)
            }
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

/// Loads `parts` one after the other (see [`Netfilter::rules_in_parts`]); stops when all
/// of them together take longer than `timeout`.
pub fn load_parts(
    namespace: &Netns,
    netfilter: Netfilter,
    parts: &[String],
    timeout: Duration,
) -> Result<Loaded> {
    let started = Instant::now();
    for part in parts {
        let left = timeout.saturating_sub(started.elapsed());
        if let Loaded::StoppedAfter(_) = load(namespace, netfilter, part, left)? {
            return Ok(Loaded::StoppedAfter(started.elapsed()));
        }
    }
    Ok(Loaded::In(started.elapsed()))
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
