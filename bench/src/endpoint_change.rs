//! Measurement 3, part two: one endpoint change through the real daemon, confirmed by
//! traffic: a probe Service with one endpoint, among background Services, is switched
//! between two pods; the clock runs from the change until the pinned maps name the new
//! pod, and until a new connection from the client namespace is answered by it. The
//! change comes from either source: a rewritten manifest (the background Services in a
//! file of their own; the clock starts at the rename that publishes the probe's file), or
//! the test API server (the daemon lists and watches it as it would a cluster's; the clock
//! starts when the server takes the probe's new EndpointSlice, which its watchers then
//! see as a MODIFIED event).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use proxy_common::{FrontendKey, FrontendValue, Slot, map_names, proto};
use proxy_lab::fake_apiserver::{ApiServerInNetns, Kind};
use proxy_lab::{Daemon, Lab, NODE_NAME, Pod, Service, addr};
use serde_json::json;

use crate::cluster::{Cluster, Endpoints};
use crate::daemon;
use crate::stats::percentile_of_sorted;

/// Outside the background Services' frontends: their VIPs cover 198.19.0.0/16 past 65 536
/// Services, on ports 80 and up.
pub const PROBE_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
pub const PROBE_PORT: u16 = 79;
/// A change not visible in traffic by then fails the benchmark.
const GIVE_UP: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The daemon's flags for this measurement: it syncs as soon as it sees a change, however
/// soon after the previous one (the default keeps syncs 100 ms apart). It learns of the
/// change from inotify.
pub const DAEMON_FLAGS: [&str; 2] = ["--min-sync-period", "0ms"];

#[derive(Clone, Debug)]
pub struct ChangeSettings {
    /// The numbers of background Services measured with the manifests source.
    pub background_services: Vec<usize>,
    /// The numbers of background Services measured through the test API server.
    pub api_background_services: Vec<usize>,
    pub changes: usize,
}

#[derive(Clone, Debug)]
pub struct ChangeResult {
    pub background_services: usize,
    /// Where the change came from: `manifest`, or `API` (an EndpointSlice watch event).
    pub source: &'static str,
    pub changes: usize,
    /// Milliseconds from the manifest change to the maps naming the new endpoint.
    pub to_maps_p50_ms: f64,
    pub to_maps_p99_ms: f64,
    /// Milliseconds from the manifest change to a connection served by the new endpoint.
    pub to_traffic_p50_ms: f64,
    pub to_traffic_p99_ms: f64,
}

pub fn measure(settings: &ChangeSettings) -> Result<Vec<ChangeResult>> {
    let manifests = (settings.background_services.iter()).map(|&background| {
        measure_manifests(background, settings.changes)
            .with_context(|| format!("manifest changes among {background} Services"))
    });
    let api = (settings.api_background_services.iter()).map(|&background| {
        measure_api(background, settings.changes)
            .with_context(|| format!("API changes among {background} Services"))
    });
    manifests.chain(api).collect()
}

/// A lab with two pods, and the daemon serving `background_services` Services (in a file
/// of their own) and the probe Service on pod-1, programmed.
pub struct ProbeSetup {
    pub lab: Lab,
    pub probe: Service,
}

impl ProbeSetup {
    pub fn new() -> Result<Self> {
        let lab = Lab::builder().pods(2).build()?;
        let probe = Service::cluster_ip("probe", PROBE_VIP).tcp(PROBE_PORT, lab.tcp_port());
        Ok(ProbeSetup { lab, probe })
    }

    /// Starts the daemon with [`DAEMON_FLAGS`] and map sizes that fit `extra_services` more
    /// Services, and opens its maps.
    pub fn start(
        &self,
        background_services: usize,
        extra_services: usize,
    ) -> Result<(Daemon<'_>, PinnedMaps)> {
        self.start_with(background_services, extra_services, &[])
    }

    /// [`start`](Self::start) with more command-line arguments.
    pub fn start_with(
        &self,
        background_services: usize,
        extra_services: usize,
        extra_args: &[&str],
    ) -> Result<(Daemon<'_>, PinnedMaps)> {
        let lab = &self.lab;
        let background = self.background(background_services)?;
        let args = daemon_args(background_services + 1 + extra_services, extra_args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = daemon::start(
            lab,
            daemon::Source::Manifests(vec![
                daemon::cluster_manifest(&background),
                self.probe.manifest(&lab.pods()[..1]),
            ]),
            &args,
            background_services + 1,
        )?;
        let maps = PinnedMaps::open(&daemon.bpffs_root())?;
        Ok((daemon, maps))
    }

    /// `services` background Services, all served by the lab's pods.
    fn background(&self, services: usize) -> Result<Cluster> {
        Cluster::new(
            services,
            Endpoints::Shared {
                pods: self.lab.pods().iter().map(|pod| pod.ip).collect(),
                port: self.lab.tcp_port(),
            },
        )
    }
}

/// [`DAEMON_FLAGS`], map sizes that fit `services` Services of two endpoints, then `extra`.
fn daemon_args(services: usize, extra: &[&str]) -> Vec<String> {
    (DAEMON_FLAGS.iter().copied())
        .chain(extra.iter().copied())
        .map(str::to_owned)
        .chain(daemon::map_size_flags(services, 2))
        .collect()
}

fn measure_manifests(background_services: usize, changes: usize) -> Result<ChangeResult> {
    let setup = ProbeSetup::new()?;
    let (daemon, maps) = setup.start(background_services, 0)?;
    let timings = time_changes(&setup, &maps, changes, |target| {
        daemon.apply(&setup.probe.manifest([target]))
    })?;
    timings.result(background_services, "manifest")
}

/// The same probe through the test API server, in the lab node's namespace: the daemon
/// lists everything, then each change is one EndpointSlice update on the server.
fn measure_api(background_services: usize, changes: usize) -> Result<ChangeResult> {
    let setup = ProbeSetup::new()?;
    let lab = &setup.lab;
    let api = ApiServerInNetns::start(lab.node())?;
    let background = setup.background(background_services)?;
    api.edit(|cluster| {
        cluster.apply(Kind::Node, node_object());
        for object in background.api_objects() {
            let kind = if object["kind"] == "Service" {
                Kind::Service
            } else {
                Kind::EndpointSlice
            };
            cluster.apply(kind, object);
        }
        cluster.apply_manifest(&setup.probe.manifest(&lab.pods()[..1]));
    });
    let args = daemon_args(background_services + 1, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let source = daemon::Source::ApiServer(api.url());
    let _daemon = daemon::start(lab, source, &args, background_services + 1)?;
    let maps = PinnedMaps::open(&_daemon.bpffs_root())?;
    let timings = time_changes(&setup, &maps, changes, |target| {
        let slice = (setup.probe.manifest([target]).objects().into_iter())
            .find(|object| object["kind"] == "EndpointSlice")
            .context("the probe's manifest has its EndpointSlice")?;
        api.edit(|cluster| cluster.apply(Kind::EndpointSlice, slice));
        Ok(())
    })?;
    timings.result(background_services, "API")
}

/// This node's Node object, as the daemon watches it.
fn node_object() -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": NODE_NAME, "labels": { "kubernetes.io/hostname": NODE_NAME } },
        "status": { "addresses": [{ "type": "InternalIP", "address": addr::NODE_IP.to_string() }] },
    })
}

/// Milliseconds from each change to the maps and to traffic, sorted.
pub struct Timings {
    pub to_maps: Vec<f64>,
    pub to_traffic: Vec<f64>,
}

impl Timings {
    fn result(self, background_services: usize, source: &'static str) -> Result<ChangeResult> {
        let percentile = |sorted: &[f64], p| percentile_of_sorted(sorted, p).context("no changes");
        Ok(ChangeResult {
            background_services,
            source,
            changes: self.to_maps.len(),
            to_maps_p50_ms: percentile(&self.to_maps, 50.0)?,
            to_maps_p99_ms: percentile(&self.to_maps, 99.0)?,
            to_traffic_p50_ms: percentile(&self.to_traffic, 50.0)?,
            to_traffic_p99_ms: percentile(&self.to_traffic, 99.0)?,
        })
    }
}

/// Moves the probe between the two pods `changes` times through `change` (which makes the
/// given pod its only endpoint), timing each until the maps and then traffic follow.
pub fn time_changes(
    setup: &ProbeSetup,
    maps: &PinnedMaps,
    changes: usize,
    change: impl Fn(&Pod) -> Result<()> + Sync,
) -> Result<Timings> {
    let lab = &setup.lab;
    let mut timings = Timings {
        to_maps: Vec::with_capacity(changes),
        to_traffic: Vec::with_capacity(changes),
    };
    lab.client().run(|| -> Result<()> {
        for index in 0..changes {
            // Alternates pod-2, pod-1, …: every change moves the probe to the other pod.
            let target = lab.pod(2 - index % 2);
            change(target)?;
            let changed = Instant::now();
            let mut in_maps = None;
            loop {
                if changed.elapsed() > GIVE_UP {
                    bail!(
                        "{} still not serving the probe {GIVE_UP:?} after change {index}",
                        target.name
                    );
                }
                if in_maps.is_none() && maps.probe_backend()? == Some(target.ip) {
                    in_maps = Some(changed.elapsed());
                }
                if served_by().ok().as_deref() == Some(target.name.as_str()) {
                    let served = changed.elapsed();
                    timings
                        .to_maps
                        .push(in_maps.unwrap_or(served).as_secs_f64() * 1e3);
                    timings.to_traffic.push(served.as_secs_f64() * 1e3);
                    break;
                }
            }
        }
        Ok(())
    })??;
    timings.to_maps.sort_by(f64::total_cmp);
    timings.to_traffic.sort_by(f64::total_cmp);
    Ok(timings)
}

/// The name of the pod that answers a new connection to the probe.
fn served_by() -> Result<String> {
    let target = SocketAddr::V4(SocketAddrV4::new(PROBE_VIP, PROBE_PORT));
    let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
    stream.write_all(b"ping\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// The daemon's SERVICES and BACKEND_SLOTS maps, opened from their pins.
pub struct PinnedMaps {
    services: BpfHashMap<MapData, FrontendKey, FrontendValue>,
    slots: Array<MapData, Slot>,
}

impl PinnedMaps {
    pub fn open(root: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let pin = root.join(name);
            let data = MapData::from_pin(&pin)
                .with_context(|| format!("opening the pinned map {}", pin.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            services: open(map_names::SERVICES)?.try_into()?,
            slots: open(map_names::BACKEND_SLOTS)?.try_into()?,
        })
    }

    /// The probe's backend address when it has exactly one.
    pub fn probe_backend(&self) -> Result<Option<Ipv4Addr>> {
        let key = FrontendKey::new(PROBE_VIP.octets(), PROBE_PORT, proto::TCP);
        let Ok(header) = self.services.get(&key, 0) else {
            return Ok(None);
        };
        if header.count != 1 {
            return Ok(None);
        }
        Ok(self
            .slots
            .get(&header.base, 0)
            .ok()
            .map(|slot| Ipv4Addr::from(slot.backend.addr.to_ne_bytes())))
    }
}
