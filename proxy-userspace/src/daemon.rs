//! The daemon: keeps the datapath equal to the source's Services and the node's interfaces.
//!
//! One task, one loop: every input (source change, netlink event, timers, signals) leads to
//! the same idempotent steps, so the order of events never matters. A change travels
//! sources → model (records; the Services it touched marked dirty) → planner (re-plans the
//! dirty Services only; emits the frontends whose plan changed) → writer (writes those
//! frontends, backends reference-counted). A full sync — every Service planned, the maps
//! re-read and their whole difference written — runs at start-up, at the periodic resync
//! (repairs drift), when the node's addresses or labels change, and after a write failed:
//! kube-proxy's `needFullSync`. Syncs follow kube-proxy's `BoundedFrequencyRunner`: at once
//! after a quiet spell, never more often than `--min-sync-period`, and under a steady
//! stream of changes still at least once every period; the loop looks at the sync first,
//! so no stream of events can hold it off.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use aya::maps::MapData;
use proxy_common::{Address, AffinityKey, AffinityValue, CtTimeouts, Ipv6, map_names};

use crate::bpf_batch::count_entries;
use crate::conntrack::gc::{Collector, Reaper};
use crate::datapath::{Datapath, MapSizes};
use crate::health::Health;
use crate::metrics::{MapLabel, Metrics};
use crate::model::{Model, ModelChanges, Problem};
use crate::netlink::{self, Device, DevicePolicy, DeviceRole, Netlink};
use crate::node_port_addresses::NodePortAddresses;
use crate::plan::{NodeFacts, Planner, SelectionDefaults};
use crate::service_health::ServiceHealthServers;
use crate::socket_lb::terminate::Terminator;
use crate::socket_lb::{self, SocketLbMode};
use crate::source::kubernetes::{ApiServer, KubernetesSource};
use crate::source::manifests::{ManifestWatcher, ParseLimits};
use crate::writer::{ApplyReport, MapWriter};
use crate::xdp::{Attached, XdpMode};

/// Everything the daemon is told on the command line.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub source: SourceConfig,
    pub node_name: String,
    /// `--node-zone`: the zone for topology hints while no Node labels are known.
    pub node_zone: Option<String>,
    pub bpffs_root: PathBuf,
    pub devices: DevicePolicy,
    /// `--xdp`: the XDP program on the external devices.
    pub xdp: XdpMode,
    /// `--lb-algorithm`, `--maglev-table-size`: how external frontends choose backends
    /// unless their Service's annotations say otherwise.
    pub selection: SelectionDefaults,
    pub nodeport_addresses: NodePortAddresses,
    pub map_sizes: MapSizes,
    /// Conntrack idle timeouts per state.
    pub ct_timeouts: CtTimeouts,
    /// How long after a source change the sync waits for more changes to batch with it.
    pub min_sync_period: Duration,
    /// How often the maps are re-read and fully re-applied, and the devices re-listed.
    pub resync_interval: Duration,
    /// How often finished conntrack flows are swept; `None`: an interval that adapts to
    /// how much the sweeps find.
    pub ct_gc_interval: Option<Duration>,
    /// `/healthz` and `/livez`; `None` disables the server.
    pub healthz_bind_address: Option<SocketAddr>,
    /// `/metrics`; `None` disables the server.
    pub metrics_bind_address: Option<SocketAddr>,
    /// How long a received change may stay unapplied before the daemon reports unhealthy.
    pub healthz_timeout: Duration,
    /// Which sockets are balanced at `connect()` (`--socket-lb`).
    pub socket_lb: SocketLbMode,
    /// The cgroup the socket programs attach to; `None`: the unified hierarchy's root.
    pub cgroup_root: Option<PathBuf>,
}

struct Daemon {
    config: DaemonConfig,
    datapath: Datapath,
    writer: MapWriter,
    /// AFFINITY, read for its fill at full syncs (the datapath writes it).
    affinity: crate::datapath::AffinityMaps,
    /// The conntrack garbage collector's thread, stopped when the daemon ends.
    _conntrack_gc: Collector,
    netlink: Netlink,
    source: Source,
    model: Model,
    planner: Planner,
    /// The next sync plans every Service and writes the maps' whole difference.
    need_full_sync: bool,
    /// The next sync re-reads the maps first (the periodic resync: repairs drift).
    need_reread: bool,
    /// The last sync left writes undone (a full map, a failed write): the maps lag behind.
    writes_pending: bool,
    runner: SyncRunner,
    node: NodeFacts,
    attached: BTreeSet<Device>,
    /// The external devices the XDP program is attached to, and how.
    xdp_attached: BTreeMap<Device, Attached>,
    /// Attaching waits for the first sync: the pins were of another layout, and the
    /// previous release's program serves from them until then (see [`crate::layout`]).
    held_for_upgrade: bool,
    health: Arc<Health>,
    /// The healthCheckNodePort servers of Services with externalTrafficPolicy Local.
    service_health: ServiceHealthServers,
    metrics: Metrics,
    /// EndpointSlice trigger times of changes not yet programmed (network programming
    /// latency is observed once the datapath reflects them).
    pending_trigger_times: Vec<chrono::DateTime<chrono::Utc>>,
    /// When the oldest change not yet synced arrived (network programming latency).
    first_pending_change: Option<SystemTime>,
    /// Closes the node's connected UDP sockets whose backend left (with `--socket-lb`).
    socket_terminator: Option<Terminator>,
}

/// Runs until SIGTERM or SIGINT. The datapath stays pinned and keeps working after exit.
pub async fn run(config: DaemonConfig) -> Result<()> {
    // First, so that a bad kubeconfig fails before anything is loaded.
    let source = Source::start(&config.source, &config.node_name).await?;
    let mut datapath = Datapath::load(
        &config.bpffs_root,
        config.map_sizes,
        config.ct_timeouts,
        config.socket_lb,
    )?;
    let maps = datapath.take_maps()?;
    if config.xdp != XdpMode::Off {
        datapath.load_xdp()?;
    }
    // Across a change of the maps' layout, the old program keeps serving from the old
    // maps until the first sync has filled the new ones.
    let held_for_upgrade = datapath.upgrading();
    if !held_for_upgrade {
        attach_sockets(&mut datapath, &config)?;
    }
    let health = Health::new(config.healthz_timeout);
    let (metrics, registry) = Metrics::new(Some(maps.stats));
    for (map, max) in [
        (map_names::CONNTRACK, config.map_sizes.conntrack.assured),
        (
            map_names::CONNTRACK_PENDING,
            config.map_sizes.conntrack.pending,
        ),
        (map_names::CONNTRACK6, config.map_sizes.conntrack.assured),
        (
            map_names::CONNTRACK_PENDING6,
            config.map_sizes.conntrack.pending,
        ),
        (map_names::FRAGMENTS, config.map_sizes.fragments),
        (map_names::FRAGMENTS6, config.map_sizes.fragments),
    ] {
        metrics
            .map_max_entries
            .get_or_create(&MapLabel { map })
            .set(i64::from(max));
    }
    if let Some(address) = config.healthz_bind_address {
        serve("healthz", address, crate::health::router(health.clone())).await?;
    }
    if let Some(address) = config.metrics_bind_address {
        serve("metrics", address, crate::metrics::router(registry)).await?;
    }
    let writer = MapWriter::new(maps.writer).context("reading the pinned maps")?;
    let affinity = maps.affinity;
    let conntrack_gc = Collector::spawn(
        Reaper::load(&config.bpffs_root)?,
        config.ct_gc_interval,
        metrics.clone(),
    )?;
    let netlink = Netlink::connect()?;
    let socket_terminator = match config.socket_lb {
        SocketLbMode::Off => None,
        SocketLbMode::Host | SocketLbMode::All => Some(Terminator::open(&config.bpffs_root)?),
    };
    if config.nodeport_addresses == NodePortAddresses::Primary {
        info!(
            source = %config.source,
            "--nodeport-addresses primary: NodePorts of a family open on every node address \
             of that family until the Node object names a primary address of it (never in \
             standalone mode)"
        );
    }
    let node = NodeFacts {
        node_name: config.node_name.clone(),
        zone: config.node_zone.clone(),
        addresses: Vec::new(),
        nodeport_cidrs: config.nodeport_addresses.cidrs(None, None),
        selection: config.selection,
        loopback_node_ports: config.socket_lb != SocketLbMode::Off,
    };
    let mut daemon = Daemon {
        runner: SyncRunner::new(config.min_sync_period),
        config,
        datapath,
        writer,
        affinity,
        _conntrack_gc: conntrack_gc,
        netlink,
        source,
        model: Model::default(),
        planner: Planner::default(),
        need_full_sync: true,
        need_reread: false,
        writes_pending: false,
        node,
        attached: BTreeSet::new(),
        xdp_attached: BTreeMap::new(),
        held_for_upgrade,
        service_health: ServiceHealthServers::new(health.clone()),
        health,
        metrics,
        pending_trigger_times: Vec::new(),
        first_pending_change: None,
        socket_terminator,
    };
    info!(
        bpffs_root = %daemon.config.bpffs_root.display(),
        source = %daemon.config.source,
        node = %daemon.config.node_name,
        "datapath loaded"
    );
    daemon.reconcile_devices().await;
    daemon.event_loop().await
}

impl Daemon {
    async fn event_loop(&mut self) -> Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut resync = tokio::time::interval(self.config.resync_interval);
        // The first tick is immediate; start-up syncs once the source has listed everything.
        resync.tick().await;
        loop {
            let sync_due = self.runner.due();
            tokio::select! {
                // First: a due sync runs before any further event is taken in.
                biased;
                () = until(sync_due) => {
                    self.sync();
                    if self.held_for_upgrade && self.source.has_synced() {
                        self.complete_upgrade().await?;
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                Some(()) = self.netlink.events.recv() => {
                    // A burst of events (a pod starting) needs one reconcile, not one each.
                    while self.netlink.events.try_recv().is_ok() {}
                    if self.reconcile_devices().await {
                        self.need_full_sync = true;
                        self.runner.request(tokio::time::Instant::now());
                    }
                }
                () = self.source.changed(&mut self.model) => {
                    self.follow_node_state();
                    // kube-proxy queues updates only once its informers have synced: a
                    // proxy still listing (or whose API server is down at start) is healthy
                    // while the datapath it inherited keeps serving.
                    if self.source.has_synced() {
                        let now = SystemTime::now();
                        self.health.queued_update(now);
                        self.first_pending_change.get_or_insert(now);
                    }
                    self.runner.request(tokio::time::Instant::now());
                }
                _ = resync.tick() => {
                    self.reconcile_devices().await;
                    self.need_full_sync = true;
                    self.need_reread = true;
                    self.runner.request(tokio::time::Instant::now());
                }
            }
        }
        info!("shutting down; the datapath stays pinned and keeps forwarding");
        Ok(())
    }

    /// The first sync after an upgrade across a change of the maps' layout has filled the
    /// new maps: converts the previous conntrack, swaps the new programs into the pinned
    /// links, converts what the old program created meanwhile, and removes the old pins.
    async fn complete_upgrade(&mut self) -> Result<()> {
        self.datapath.convert_flows("before the swap");
        self.held_for_upgrade = false;
        let started = Instant::now();
        attach_sockets(&mut self.datapath, &self.config)?;
        if self.reconcile_devices().await {
            self.need_full_sync = true;
            self.runner.request(tokio::time::Instant::now());
        }
        let swapped_us = started.elapsed().as_micros() as u64;
        self.datapath.finish_upgrade()?;
        info!(
            devices = self.attached.len(),
            swapped_us, "upgrade complete: this release's program runs on every attached device"
        );
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
        let attachable = if self.held_for_upgrade {
            BTreeSet::new()
        } else {
            devices.clone()
        };
        for device in attachable.difference(&self.attached.clone()) {
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
        self.reconcile_xdp(&devices);
        let current: Vec<Device> = self.attached.iter().cloned().collect();
        // While held, the pinned links are the previous release's, which keep serving.
        let release = if self.held_for_upgrade {
            Ok(Vec::new())
        } else {
            let xdp: Vec<(Device, Attached)> = self
                .xdp_attached
                .iter()
                .map(|(device, attached)| (device.clone(), *attached))
                .collect();
            self.datapath.release_stale_links(&current, &xdp)
        };
        match release {
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

    /// Attaches the XDP program to the external devices that have the tc program and no XDP
    /// program yet, forgets vanished ones, and keeps XDP_EGRESS equal to the native ones.
    fn reconcile_xdp(&mut self, devices: &BTreeSet<Device>) {
        self.xdp_attached
            .retain(|device, _| devices.contains(device));
        let external = self.attached.iter().filter(|device| {
            device.role == DeviceRole::External && self.config.xdp != XdpMode::Off
        });
        for device in external.cloned().collect::<Vec<_>>() {
            if self.xdp_attached.contains_key(&device) {
                continue;
            }
            match self.datapath.attach_xdp(&device, self.config.xdp) {
                Ok(Some(attached)) => {
                    info!(device = %device.name, ifindex = device.index, mode = %attached, "XDP attached");
                    self.xdp_attached.insert(device, attached);
                }
                Ok(None) => {}
                // Retried on the next event or resync; tc serves the device meanwhile.
                Err(error) => {
                    warn!(device = %device.name, error = format!("{error:#}"), "XDP attach failed")
                }
            }
        }
        let native: Vec<u32> = self
            .xdp_attached
            .iter()
            .filter(|(_, attached)| **attached == Attached::Native)
            .map(|(device, _)| device.index)
            .collect();
        if let Err(error) = self.datapath.set_xdp_egress(&native) {
            warn!(error = format!("{error:#}"), "writing XDP_EGRESS failed");
        }
    }

    fn sync(&mut self) {
        self.runner.ran(tokio::time::Instant::now());
        if !self.source.has_synced() {
            debug!("sync deferred: the source has not listed everything yet");
            return;
        }
        let started = Instant::now();
        let changes = self.model.take_changes();
        self.report_rejected(&changes.rejected);
        let node_changed = self.planner.set_node(&self.node, &self.model);
        let full = self.need_full_sync || node_changed;
        let delta = if full {
            self.planner.update_all(&self.model)
        } else {
            self.planner
                .update(&self.model, changes.dirty_services.iter().cloned())
        };
        self.report_problems(&delta.new_problems);
        if self.need_reread
            && let Err(error) = self.writer.reread()
        {
            warn!(%error, "re-reading the maps for resync failed");
        }
        let report = if full {
            self.writer.apply(self.planner.desired())
        } else {
            self.writer.apply_delta(&delta.frontends)
        };
        self.report_refused(&report);
        if self.writes_pending && report.complete() {
            info!("every frontend is written again: the maps had room for what was refused");
        }
        self.writes_pending = !report.complete();
        // A refused write is retried by a full sync: the next one writes what is missing.
        self.need_full_sync = !report.complete();
        if full || !delta.frontends.is_empty() {
            self.close_stale_sockets();
        }
        self.need_reread = false;
        self.record_sync(&report, changes, started, full);
        let addresses = self.node.health_check_addresses();
        self.service_health
            .sync(self.planner.health_checks(), &addresses);
        let desired = self.planner.desired();
        let ipv6_frontends = self.writer.image6().services.len();
        // A full sync writes the whole desired state and does not list what changed.
        let changed = if full {
            "all".to_owned()
        } else {
            delta.frontends.len().to_string()
        };
        info!(
            frontends = desired.frontends.len(),
            backends = self.writer.image().backends.len() + self.writer.image6().backends.len(),
            writes = report.ops,
            all_written = report.complete(),
            changed = %changed,
            full,
            // Not `ipv6_frontends=`: tests and tools look for `frontends=N `.
            ipv6 = ipv6_frontends,
            elapsed_us = started.elapsed().as_micros() as u64,
            "sync complete"
        );
        if full || delta.services_planned > RETURN_MEMORY_AFTER {
            // After the delta is gone: it holds the plans of every frontend it touched.
            drop(delta);
            crate::allocator::return_freed_memory();
        }
    }

    /// Logs what a sync could not write: each full map, with the flag that sizes it, and
    /// the frontends left as they were. The next sync is a full one and writes it all
    /// once there is room.
    fn report_refused(&self, report: &ApplyReport) {
        let sizes = &self.config.map_sizes;
        for (map, refused) in &report.map_full {
            // Each family's maps are sized by the same flags.
            let (max, flag) = match *map {
                map_names::SERVICES | map_names::SERVICES6 => (sizes.services, "--max-services"),
                map_names::BACKEND_SLOTS | map_names::BACKEND_SLOTS6 => {
                    (sizes.backend_slots, "--max-backend-slots")
                }
                map_names::BACKEND_IDS | map_names::BACKEND_IDS6 => {
                    (sizes.backends, "--max-backends")
                }
                map_names::MEMBERSHIP | map_names::MEMBERSHIP6 => (
                    sizes.backend_slots.saturating_add(sizes.services),
                    "--max-backend-slots",
                ),
                map_names::MAGLEV | map_names::MAGLEV6 => (
                    sizes
                        .maglev_tables
                        .saturating_mul(proxy_common::maglev::chunks(
                            proxy_common::maglev::DEFAULT_TABLE_SIZE,
                        )),
                    "--max-maglev-tables",
                ),
                _ => (0, "its size"),
            };
            error!(
                map = *map,
                refused = *refused,
                max,
                "map full: writes refused, the frontends they belong to stay as they were \
                 (new ones are not served) until there is room (raise {flag})"
            );
        }
        if report.held_back > 0 {
            warn!(
                held_back = report.held_back,
                "writes held back: a frontend is switched only once all it names is in the maps"
            );
        }
        for failure in &report.failures {
            error!(%failure, "map write failed; retried on the next sync");
        }
    }

    /// AFFINITY's and AFFINITY6's fill (LRUs: when full, the least recently seen clients
    /// lose their affinity).
    fn record_affinity_fill(&self) {
        self.record_affinity_fill_of::<u32>(map_names::AFFINITY, &self.affinity.ipv4);
        self.record_affinity_fill_of::<Ipv6>(map_names::AFFINITY6, &self.affinity.ipv6);
    }

    fn record_affinity_fill_of<A: Address>(&self, map: &'static str, data: &MapData) {
        let label = MapLabel { map };
        match count_entries::<AffinityKey<A>, AffinityValue<A>>(data) {
            Ok(entries) => {
                self.metrics
                    .map_entries
                    .get_or_create(&label)
                    .set(entries as i64);
            }
            Err(error) => warn!(%error, "counting {map}'s entries failed"),
        }
        if let Ok(info) = data.info() {
            self.metrics
                .map_max_entries
                .get_or_create(&label)
                .set(i64::from(info.max_entries()));
        }
    }

    /// Closes the node's connected UDP sockets whose backend no longer serves (see
    /// [`Terminator`]).
    fn close_stale_sockets(&mut self) {
        let Some(terminator) = &mut self.socket_terminator else {
            return;
        };
        match terminator.run() {
            Ok(0) => {}
            Ok(closed) => info!(
                closed,
                "closed connected UDP sockets of the node whose backend left (ECONNABORTED)"
            ),
            Err(error) => warn!(
                error = format!("{error:#}"),
                "closing connected UDP sockets whose backend left failed"
            ),
        }
    }

    /// Logs and counts the objects the source refused.
    fn report_rejected(&self, rejected: &[Problem]) {
        for problem in rejected {
            warn!(kind = problem.kind.as_str(), reason = problem.reason, problem = %problem, "skipped");
            self.metrics.count_rejected(problem);
        }
    }

    /// Logs and counts the problems the planner found that were not there before.
    fn report_problems(&self, problems: &[Problem]) {
        for problem in problems {
            warn!(reason = problem.reason, problem = %problem, "service not fully programmed");
            self.metrics.count_rejected(problem);
        }
    }
}

/// A sync that planned more Services than this hands freed memory back to the system.
const RETURN_MEMORY_AFTER: usize = 1_000;

impl Daemon {
    /// What the Node object says beyond its labels: whether it is being deleted (kube-proxy's
    /// node eligibility, `/healthz` only) and its primary address (`--nodeport-addresses
    /// primary`). Logged when either changes.
    fn follow_node_state(&mut self) {
        let state = self.model.node_state();
        let eligible = !state.being_deleted;
        if self.health.set_node_eligible(eligible) {
            if eligible {
                info!("the Node is no longer being deleted: /healthz follows the proxy again");
            } else {
                warn!(
                    "the Node is being deleted (deletion timestamp or ToBeDeletedByClusterAutoscaler \
                     taint): /healthz answers 503 so load balancers drain this node"
                );
            }
        }
        let cidrs = (self.config.nodeport_addresses).cidrs(state.primary_ipv4, state.primary_ipv6);
        if cidrs != self.node.nodeport_cidrs {
            if cidrs.is_empty() {
                info!(
                    flag = %self.config.nodeport_addresses,
                    "the Node's primary addresses are unknown: NodePorts open on every node address"
                );
            } else {
                info!(cidrs = ?cidrs, flag = %self.config.nodeport_addresses, "NodePorts open on the node addresses in these CIDRs");
            }
            self.node.nodeport_cidrs = cidrs;
        }
    }

    /// Health and metrics after a sync. A sync with refused writes leaves the update
    /// pending, so a datapath that stays behind turns the daemon unhealthy.
    fn record_sync(
        &mut self,
        report: &ApplyReport,
        changes: ModelChanges,
        started: Instant,
        full: bool,
    ) {
        let now = SystemTime::now();
        self.pending_trigger_times.extend(changes.trigger_times);
        self.metrics.service_changes.inc_by(changes.services);
        self.metrics
            .endpoint_changes
            .inc_by(changes.endpoint_slices);
        for (map, refused) in &report.map_full {
            self.metrics
                .map_full
                .get_or_create(&MapLabel { map })
                .inc_by(*refused as u64);
        }
        self.metrics
            .sync_duration
            .observe(started.elapsed().as_secs_f64());
        for fill in self.writer.fill() {
            let label = MapLabel { map: fill.map };
            self.metrics
                .map_entries
                .get_or_create(&label)
                .set(fill.entries as i64);
            self.metrics
                .map_max_entries
                .get_or_create(&label)
                .set(i64::from(fill.max_entries));
        }
        if full {
            self.record_affinity_fill();
        }
        if !report.complete() {
            return;
        }
        // Programming latency from the EndpointSlice controller's trigger time when the
        // slices carry one (a cluster), else from when the change reached us.
        let mut starts: Vec<SystemTime> = self
            .pending_trigger_times
            .drain(..)
            .map(SystemTime::from)
            .collect();
        if starts.is_empty() {
            starts.extend(self.first_pending_change);
        }
        for start in starts {
            let latency = now.duration_since(start).unwrap_or_default();
            self.metrics
                .network_programming
                .observe(latency.as_secs_f64());
        }
        self.first_pending_change = None;
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .last_sync_timestamp
            .set(since_epoch.as_secs_f64());
        self.health.updated(now);
    }
}

/// Attaches the socket programs (`--socket-lb`) to `--cgroup-root`, or releases them.
fn attach_sockets(datapath: &mut Datapath, config: &DaemonConfig) -> Result<()> {
    let cgroup = match config.socket_lb {
        SocketLbMode::Off => PathBuf::new(),
        SocketLbMode::Host | SocketLbMode::All => {
            socket_lb::cgroup_root(config.cgroup_root.as_deref())?
        }
    };
    datapath
        .attach_sockets(config.socket_lb, &cgroup)
        .with_context(|| {
            format!(
                "--socket-lb {}: attaching the socket programs to cgroup {} (--socket-lb off \
                 runs without them)",
                config.socket_lb,
                cgroup.display()
            )
        })?;
    if config.socket_lb != SocketLbMode::Off {
        info!(mode = %config.socket_lb, cgroup = %cgroup.display(), "socket load balancing attached");
    }
    Ok(())
}

/// Binds `address` (failing the start clearly if it can't) and serves `router` on it.
async fn serve(what: &str, address: SocketAddr, router: axum::Router) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the {what} server to {address}"))?;
    info!(%address, "{what} server listening");
    let what = what.to_string();
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            error!(%error, "{what} server stopped");
        }
    });
    Ok(())
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// Standalone: a directory of manifests, followed with inotify and checked every
    /// `poll_interval`.
    Manifests {
        dir: PathBuf,
        poll_interval: Duration,
        limits: ParseLimits,
    },
    /// A cluster: the API server, watched.
    Kubernetes(ApiServer),
}

impl fmt::Display for SourceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceConfig::Manifests { dir, .. } => write!(f, "manifests {}", dir.display()),
            SourceConfig::Kubernetes(api_server) => write!(f, "API server ({api_server})"),
        }
    }
}

/// A running source: the event loop waits on it like on any other input.
enum Source {
    Manifests(Box<ManifestWatcher>),
    Kubernetes(KubernetesSource),
}

impl Source {
    async fn start(config: &SourceConfig, node_name: &str) -> Result<Self> {
        Ok(match config {
            SourceConfig::Manifests {
                dir,
                poll_interval,
                limits,
            } => Source::Manifests(Box::new(ManifestWatcher::new(
                dir.clone(),
                *limits,
                *poll_interval,
            ))),
            SourceConfig::Kubernetes(api_server) => {
                let client = api_server.client().await?;
                Source::Kubernetes(KubernetesSource::new(client, node_name))
            }
        })
    }

    /// Whether the model is complete enough to program. Before that, a sync would delete
    /// the frontends that a restarted daemon found pinned.
    fn has_synced(&self) -> bool {
        match self {
            Source::Manifests(manifests) => manifests.has_synced(),
            Source::Kubernetes(kubernetes) => kubernetes.has_synced(),
        }
    }

    /// Waits until the source changes `model`. Cancel safe.
    async fn changed(&mut self, model: &mut Model) {
        match self {
            Source::Manifests(manifests) => manifests.changed(model).await,
            Source::Kubernetes(kubernetes) => kubernetes.changed(model).await,
        }
    }
}

/// kube-proxy's `BoundedFrequencyRunner`: a requested sync runs at once when the last one
/// is at least `min_interval` old, else when it gets that old. Requests until then ride
/// along, so a burst costs one sync, syncs never come closer than `min_interval`, and a
/// steady stream of changes still gets one every `min_interval`: a request never pushes a
/// due sync back.
#[derive(Debug)]
struct SyncRunner {
    min_interval: Duration,
    last_run: Option<tokio::time::Instant>,
    due: Option<tokio::time::Instant>,
}

impl SyncRunner {
    fn new(min_interval: Duration) -> Self {
        SyncRunner {
            min_interval,
            last_run: None,
            due: None,
        }
    }

    fn request(&mut self, now: tokio::time::Instant) {
        let earliest = self
            .last_run
            .map_or(now, |last| (last + self.min_interval).max(now));
        self.due.get_or_insert(earliest);
    }

    fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// A sync ran: it covered every request so far.
    fn ran(&mut self, now: tokio::time::Instant) {
        self.last_run = Some(now);
        self.due = None;
    }
}

/// Completes at `deadline`; never without one. A deadline already reached completes at
/// once: tokio's timer rounds deadlines up to its next millisecond tick, which would hold
/// every sync requested "now" back by up to two milliseconds.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) if deadline <= tokio::time::Instant::now() => {}
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_runs_at_once_after_a_quiet_spell_and_bursts_ride_along() {
        let start = tokio::time::Instant::now();
        let period = Duration::from_millis(100);
        let mut runner = SyncRunner::new(period);
        assert_eq!(runner.due(), None);
        runner.request(start);
        assert_eq!(runner.due(), Some(start), "the first change syncs at once");
        runner.ran(start);

        // Changes within the period after a sync wait for it to pass, all in one sync.
        for offset_ms in [10, 40, 99] {
            runner.request(start + Duration::from_millis(offset_ms));
        }
        assert_eq!(runner.due(), Some(start + period));
        runner.ran(start + period);
        assert_eq!(runner.due(), None);

        // After a quiet spell: at once again.
        let later = start + Duration::from_millis(500);
        runner.request(later);
        assert_eq!(runner.due(), Some(later));
    }

    /// kube-proxy's guarantee (issue: a change every 0.4 s held off every sync for 19 s):
    /// changes streaming faster than syncs take never hold a sync off; the gap between two
    /// syncs stays within the period plus one sync and one event.
    #[tokio::test]
    async fn a_sync_due_now_runs_without_waiting_for_the_timer() {
        use futures::FutureExt;
        assert!(
            until(Some(tokio::time::Instant::now()))
                .now_or_never()
                .is_some()
        );
        let later = tokio::time::Instant::now() + Duration::from_secs(60);
        assert!(until(Some(later)).now_or_never().is_none());
    }

    #[test]
    fn a_steady_stream_of_changes_still_syncs_every_period() {
        let start = tokio::time::Instant::now();
        let period = Duration::from_millis(100);
        let change_every = Duration::from_millis(7);
        let sync_takes = Duration::from_millis(30);
        let mut runner = SyncRunner::new(period);
        let mut now = start;
        let mut syncs = Vec::new();
        // The daemon's loop, on a virtual clock: a due sync first, else the next change.
        while now < start + Duration::from_secs(5) {
            match runner.due() {
                Some(due) if due <= now => {
                    runner.ran(now);
                    syncs.push(now);
                    now += sync_takes;
                }
                _ => {
                    now += change_every;
                    runner.request(now);
                }
            }
        }
        let gaps: Vec<Duration> = syncs.windows(2).map(|pair| pair[1] - pair[0]).collect();
        let longest = gaps.iter().max().copied().unwrap_or_default();
        assert!(
            longest <= period + sync_takes + change_every,
            "a sync waited {longest:?} ({} syncs)",
            syncs.len()
        );
        assert!(syncs.len() >= 40, "{} syncs in 5 s", syncs.len());
    }

    /// A manifests directory removed when the test ends (also on panic).
    struct ManifestsDir(PathBuf);

    impl Drop for ManifestsDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn service_yaml(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: web}}\n\
             spec: {{clusterIP: 198.18.100.10, ports: [{{port: 80}}]}}\n"
        )
    }

    #[tokio::test]
    async fn the_manifests_source_loads_at_once_then_on_each_change_only() {
        let dir = ManifestsDir(
            std::env::temp_dir().join(format!("ebpf-proxy-daemon-source-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        std::fs::write(dir.0.join("a.yaml"), service_yaml("a")).unwrap();
        let config = SourceConfig::Manifests {
            dir: dir.0.clone(),
            poll_interval: Duration::from_millis(10),
            limits: ParseLimits::default(),
        };
        let mut source = Source::start(&config, "node-a").await.unwrap();
        let mut model = Model::default();
        assert!(!source.has_synced());

        let wait = Duration::from_secs(5);
        tokio::time::timeout(wait, source.changed(&mut model))
            .await
            .expect("the first poll loads the directory");
        assert!(source.has_synced());
        assert_eq!(model.services().count(), 1);

        // Several polls of an unchanged directory: no change.
        let quiet = tokio::time::timeout(Duration::from_millis(100), source.changed(&mut model));
        assert!(quiet.await.is_err(), "a change without a write");

        std::fs::write(dir.0.join("b.yaml"), service_yaml("b")).unwrap();
        tokio::time::timeout(wait, source.changed(&mut model))
            .await
            .expect("the new file is noticed");
        assert_eq!(model.services().count(), 2);
    }

    #[tokio::test]
    async fn an_unreadable_kubeconfig_fails_the_start() {
        let config = SourceConfig::Kubernetes(ApiServer::Kubeconfig(PathBuf::from(
            "/nonexistent/kubeconfig",
        )));
        let Err(error) = Source::start(&config, "node-a").await else {
            panic!("started without a kubeconfig");
        };
        let error = format!("{error:#}");
        assert!(
            error.contains("reading kubeconfig /nonexistent/kubeconfig"),
            "{error}"
        );
    }
}
