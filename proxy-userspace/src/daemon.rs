//! The daemon: keeps the datapath equal to the manifests and the node's interfaces.
//!
//! One task, one loop: every input (manifest change, netlink event, timers, signals)
//! leads to the same idempotent steps — reconcile devices, plan, apply the diff — so the
//! order of events never matters and a periodic resync repairs anything missed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::conntrack::{self, CtTimeouts};
use crate::datapath::{Datapath, MapSizes};
use crate::model::Model;
use crate::netlink::{self, Device, DevicePolicy, Netlink};
use crate::plan::{self, NodeFacts};
use crate::source::manifests::ManifestSource;
use crate::writer::MapWriter;

/// Everything the daemon is told on the command line.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub manifests: PathBuf,
    pub node_name: String,
    pub bpffs_root: PathBuf,
    pub devices: DevicePolicy,
    pub nodeport_cidrs: Vec<Ipv4Net>,
    pub map_sizes: MapSizes,
    pub ct_timeouts: CtTimeouts,
    /// How often the manifests directory is checked for changes.
    pub poll_interval: Duration,
    /// How often the maps are re-read and fully re-applied, and the devices re-listed.
    pub resync_interval: Duration,
    /// How often idle conntrack entries are swept.
    pub ct_gc_interval: Duration,
}

struct Daemon {
    config: DaemonConfig,
    datapath: Datapath,
    writer: MapWriter,
    conntrack: aya::maps::HashMap<aya::maps::MapData, proxy_common::CtKey, proxy_common::CtValue>,
    netlink: Netlink,
    source: ManifestSource,
    model: Model,
    node: NodeFacts,
    attached: BTreeSet<Device>,
    reported_problems: Vec<String>,
}

/// Runs until SIGTERM or SIGINT. The datapath stays pinned and keeps working after exit.
pub async fn run(config: DaemonConfig) -> Result<()> {
    let mut datapath = Datapath::load(&config.bpffs_root, config.map_sizes)?;
    let maps = datapath.take_maps()?;
    let writer = MapWriter::new(maps.services, maps.backends).context("reading the pinned maps")?;
    let netlink = Netlink::connect()?;
    let source = ManifestSource::new(&config.manifests);
    let node = NodeFacts {
        node_name: config.node_name.clone(),
        addresses: Vec::new(),
        nodeport_cidrs: config.nodeport_cidrs.clone(),
    };
    let mut daemon = Daemon {
        config,
        datapath,
        writer,
        conntrack: maps.conntrack,
        netlink,
        source,
        model: Model::default(),
        node,
        attached: BTreeSet::new(),
        reported_problems: Vec::new(),
    };
    info!(
        bpffs_root = %daemon.config.bpffs_root.display(),
        manifests = %daemon.config.manifests.display(),
        node = %daemon.config.node_name,
        "datapath loaded"
    );
    daemon.reconcile_devices().await;
    daemon.reload_manifests();
    daemon.sync();
    daemon.event_loop().await
}

impl Daemon {
    async fn event_loop(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut poll = tokio::time::interval(self.config.poll_interval);
        let mut resync = tokio::time::interval(self.config.resync_interval);
        let mut ct_gc = tokio::time::interval(self.config.ct_gc_interval);
        let mut fingerprint = self.source.fingerprint().ok();
        loop {
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                Some(()) = self.netlink.events.recv() => {
                    // A burst of events (a pod starting) needs one reconcile, not one each.
                    while self.netlink.events.try_recv().is_ok() {}
                    if self.reconcile_devices().await {
                        self.sync();
                    }
                }
                _ = poll.tick() => {
                    let now = self.source.fingerprint().ok();
                    if now != fingerprint {
                        fingerprint = now;
                        self.reload_manifests();
                        self.sync();
                    }
                }
                _ = resync.tick() => {
                    if let Err(error) = self.writer.reread() {
                        warn!(%error, "re-reading the maps for resync failed");
                    }
                    self.reconcile_devices().await;
                    self.sync();
                }
                _ = ct_gc.tick() => match conntrack::sweep(&mut self.conntrack, &self.config.ct_timeouts) {
                    Ok(0) => {}
                    Ok(removed) => debug!(removed, "conntrack: idle flows removed"),
                    Err(error) => warn!(%error, "conntrack sweep failed"),
                },
            }
        }
        info!("shutting down; the datapath stays pinned and keeps forwarding");
        Ok(())
    }

    /// Attaches to new devices, forgets vanished ones, refreshes node addresses. Returns
    /// whether the node addresses changed (then NodePort frontends must be re-planned).
    async fn reconcile_devices(&mut self) -> bool {
        let interfaces = match self.netlink.interfaces().await {
            Ok(interfaces) => interfaces,
            Err(error) => {
                warn!(error = format!("{error:#}"), "listing interfaces failed");
                return false;
            }
        };
        let devices: BTreeSet<Device> = netlink::select_devices(&interfaces, &self.config.devices)
            .into_iter()
            .collect();
        for device in devices.difference(&self.attached.clone()) {
            match self.datapath.attach(device) {
                Ok(()) => {
                    info!(device = %device.name, ifindex = device.index, role = ?device.role, "attached");
                    self.attached.insert(device.clone());
                }
                // Retried on the next event or resync; the device may have just vanished.
                Err(error) => {
                    warn!(device = %device.name, error = format!("{error:#}"), "attach failed")
                }
            }
        }
        self.attached.retain(|device| devices.contains(device));
        let current: Vec<Device> = self.attached.iter().cloned().collect();
        match self.datapath.release_stale_links(&current) {
            Ok(released) => {
                for pin in released {
                    info!(%pin, "released the link of a vanished device");
                }
            }
            Err(error) => warn!(%error, "releasing stale link pins failed"),
        }
        let addresses = netlink::node_addresses(&interfaces);
        if addresses != self.node.addresses {
            info!(addresses = ?addresses, "node addresses");
            self.node.addresses = addresses;
            return true;
        }
        false
    }

    fn reload_manifests(&mut self) {
        match self.source.reload() {
            Ok(reload) => {
                self.model = reload.model;
                let problems: Vec<String> =
                    reload.problems.iter().map(ToString::to_string).collect();
                for problem in &problems {
                    warn!(problem = %problem, "manifest skipped");
                }
            }
            Err(error) => error!(
                dir = %self.config.manifests.display(),
                %error,
                "reading the manifests directory failed; keeping the last good state"
            ),
        }
    }

    fn sync(&mut self) {
        let started = Instant::now();
        let planned = plan::plan(&self.model, &self.node);
        if planned.problems != self.reported_problems {
            for problem in &planned.problems {
                warn!(problem = %problem, "service not fully programmed");
            }
            self.reported_problems = planned.problems.clone();
        }
        let report = self.writer.apply(&planned.desired);
        if report.map_full > 0 {
            error!(
                refused = report.map_full,
                services_max = self.config.map_sizes.services,
                backends_max = self.config.map_sizes.backends,
                "map full: writes refused, some frontends are incomplete (raise --max-services / --max-backends)"
            );
        }
        for failure in &report.failures {
            error!(%failure, "map write failed; retried on the next sync");
        }
        info!(
            frontends = report.frontends,
            backends = report.backends,
            writes = report.ops,
            elapsed_us = started.elapsed().as_micros() as u64,
            "sync complete"
        );
    }
}
