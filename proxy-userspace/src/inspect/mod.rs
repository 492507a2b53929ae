//! The node-admin CLI: views of the kernel state read from the pinned maps (no daemon
//! needed), `explain` (that state as the iptables rules kube-proxy would write) and
//! `trace` (a dry run of the packet path against the live maps).
//!
//! Every view is plain data first, built by a pure function of what the maps hold
//! ([`MapImage`], conntrack entries), so `-o json` has a stable schema (documented in the
//! README) and tests need no kernel; then it is rendered as an aligned table. One module
//! per view.

mod backends;
mod conntrack;
pub mod explain;
mod services;
mod sockets;
mod stats;
pub mod trace;
mod trace_connect;
pub mod trace_hooks;

use std::fmt;
use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, MapError};
use aya::programs::{Program, SchedClassifier};
use aya::{Ebpf, EbpfLoader};
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{Table, presets::NOTHING};
use proxy_common::maglev::{MaglevChunk, MaglevKey};
use proxy_common::{
    Address, Backend, FrontendKey, FrontendValue, Ipv6, ServiceName, proto, service_flags,
};
use serde::Serialize;

use crate::datapath::DEFAULT_BPFFS_ROOT;
use crate::writer::{MapImage, read_slots};

pub use backends::BackendView;
pub use conntrack::FlowView;
pub use services::{FrontendView, SlotView};
pub use sockets::SocketView;
pub use stats::StatsView;

/// The CLI's read-only subcommands (and `conntrack flush`), flattened into `ebpf-proxy`'s.
#[derive(Subcommand)]
pub enum Command {
    /// One row per frontend (VIP or node address : port / proto): type, Service, backends.
    Services(ServicesArgs),
    /// One row per backend: id, address, state and the Services using it.
    Backends(ListArgs),
    /// Live flows: client → frontend → backend, age, packets and bytes.
    Conntrack(conntrack::ConntrackArgs),
    /// Connections translated at the socket (--socket-lb): cookie, process, Service,
    /// backend.
    Sockets(sockets::SocketsArgs),
    /// Datapath counters summed over CPUs, and how full the maps are.
    Stats(ListArgs),
    /// The datapath's Services as the iptables-save text kube-proxy would write for them.
    Explain(explain::ExplainArgs),
    /// Runs a packet through the program as a dry run: verdict, backend, rewritten headers
    /// and the map entries that decided. Needs root (it loads a program).
    Trace(trace::TraceArgs),
}

impl Command {
    pub fn run(self) -> Result<()> {
        match self {
            Command::Services(args) => args.list.show(
                |root| {
                    let mut rows = services::view(&read_image::<u32>(root)?);
                    rows.extend(services::view(&read_image::<Ipv6>(root)?));
                    Ok(rows)
                },
                |rows| services::render(rows, args.wide),
            ),
            Command::Backends(args) => args.show(
                |root| {
                    let mut rows = backends::view(&read_image::<u32>(root)?);
                    rows.extend(backends::view(&read_image::<Ipv6>(root)?));
                    Ok(rows)
                },
                |rows| backends::render(rows),
            ),
            Command::Conntrack(args) => args.run(),
            Command::Sockets(args) => args.run(),
            Command::Stats(args) => args.show(stats::read, stats::render),
            Command::Explain(args) => args.run(),
            Command::Trace(args) => args.run(),
        }
    }
}

#[derive(Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    list: ListArgs,
    /// Also list every backend with its slot and state.
    #[arg(long)]
    wide: bool,
}

/// What every listing takes: where the pins are, the output format, and `--watch`.
#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    pins: PinArgs,
    /// Output format: an aligned table, or JSON (one document; with --watch, one compact
    /// document per line and refresh).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Refresh every SECONDS (default 2) until interrupted (Ctrl-C).
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
    watch: Option<f64>,
    /// With --watch: stop after this many refreshes.
    #[arg(long, value_name = "N", requires = "watch")]
    watch_count: Option<u64>,
}

#[derive(Args)]
pub struct PinArgs {
    /// The daemon's bpffs directory (its --bpffs-root).
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

impl ListArgs {
    /// Reads with `read` and prints with `table` (or as JSON), once or every --watch
    /// interval.
    fn show<T: Serialize>(
        &self,
        read: impl Fn(&Path) -> Result<T>,
        table: impl Fn(&T) -> String,
    ) -> Result<()> {
        let root = &self.pins.bpffs_root;
        let Some(seconds) = self.watch else {
            let view = read(root)?;
            return print(&match self.output {
                Output::Table => table(&view),
                Output::Json => serde_json::to_string_pretty(&view)?,
            });
        };
        let interval = Duration::try_from_secs_f64(seconds)
            .ok()
            .filter(|interval| !interval.is_zero())
            .ok_or_else(|| anyhow!("--watch takes a positive number of seconds"))?;
        let clear_screen = std::io::stdout().is_terminal();
        let mut refreshes = 0;
        loop {
            let view = read(root)?;
            let text = match self.output {
                Output::Json => serde_json::to_string(&view)?,
                Output::Table if clear_screen => format!(
                    "\x1b[H\x1b[2J(every {seconds}s, Ctrl-C to stop)\n{}",
                    table(&view)
                ),
                Output::Table if refreshes > 0 => format!("\n{}", table(&view)),
                Output::Table => table(&view),
            };
            print(&text)?;
            refreshes += 1;
            if self.watch_count.is_some_and(|count| refreshes >= count) {
                return Ok(());
            }
            std::thread::sleep(interval);
        }
    }
}

/// Prints a line to stdout; a reader that went away (`| head`) ends the output quietly.
fn print(text: &str) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Opens a pinned map of this release's layout, with a hint when the pins are not there.
pub(crate) fn open_pinned(root: &Path, name: &str) -> Result<MapData> {
    let path: PathBuf = root.join(name);
    if !path.exists() {
        return Err(anyhow!(
            "no pinned map at {}: is the daemon running? (looked in {}; set --bpffs-root)",
            path.display(),
            root.display()
        ));
    }
    // Never misread a map another release pinned with another layout.
    crate::layout::check(root, name)?;
    MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
}

/// Loads the embedded object against the maps pinned under `root` and loads `programs`
/// from it (tc classifiers or XDP programs): the side programs (dry runs, conntrack reaper)
/// that share the datapath's maps. The maps in `pins` must be pinned already (so a missing
/// pin is an error, not a new empty map).
pub(crate) fn load_beside_pins(root: &Path, pins: &[&str], programs: &[&str]) -> Result<Ebpf> {
    let mut ebpf = object_beside_pins(root, pins, &mut EbpfLoader::new())?;
    for &name in programs {
        let program = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
        let loaded = match program {
            Program::Xdp(xdp) => xdp.load(),
            other => <&mut SchedClassifier>::try_from(other)?.load(),
        };
        loaded.with_context(|| format!("loading {name} (needs root or CAP_BPF)"))?;
    }
    Ok(ebpf)
}

/// Loads the embedded object with `loader` (its globals set) against the maps pinned under
/// `root`; the maps in `pins` must be pinned already.
pub(crate) fn object_beside_pins(
    root: &Path,
    pins: &[&str],
    loader: &mut EbpfLoader,
) -> Result<Ebpf> {
    for name in pins {
        open_pinned(root, name)?;
    }
    loader
        .default_map_pin_directory(root)
        .load(crate::EBPF_OBJECT)
        .with_context(|| {
            format!(
                "loading the eBPF object against the pins in {}",
                root.display()
            )
        })
}

/// Opens a pinned map as the typed map `M`.
fn open_typed<M: TryFrom<Map, Error = MapError>>(root: &Path, name: &str) -> Result<M> {
    let map = Map::from_map_data(open_pinned(root, name)?)?;
    M::try_from(map).with_context(|| format!("{name} under {}", root.display()))
}

/// Reads one family's SERVICES, the BACKEND_SLOTS they name, BACKEND_IDS and SVC_NAMES
/// (IPv6's: SERVICES6, …).
pub fn read_image<A: Address>(root: &Path) -> Result<MapImage<A>> {
    let maps = A::MAPS;
    let services: BpfHashMap<MapData, _, _> = open_typed(root, maps.services)?;
    let backend_ids: BpfHashMap<MapData, Backend<A>, u32> = open_typed(root, maps.backend_ids)?;
    let names: BpfHashMap<MapData, _, _> = open_typed(root, maps.svc_names)?;
    let services = read_entries(&services)?;
    let slots = read_slots(&open_pinned(root, maps.backend_slots)?, &services)
        .with_context(|| format!("reading {}", maps.backend_slots))?;
    let maglev = read_maglev_keys(root, maps.maglev, &services)?;
    Ok(MapImage {
        services,
        slots,
        backends: read_entries(&backend_ids)?
            .into_iter()
            .map(|(backend, id)| (id, backend))
            .collect(),
        // No view shows the endpoint addresses per frontend: the slots say the same.
        membership: Default::default(),
        names: read_entries(&names)?,
        // The views show a frontend's restriction by its header flag.
        source_ranges: Default::default(),
        maglev,
    })
}

/// The keys of MAGLEV (`map`: its family's), read only when a header names a table.
fn read_maglev_keys<A: Address>(
    root: &Path,
    map: &str,
    services: &std::collections::BTreeMap<FrontendKey<A>, FrontendValue>,
) -> Result<std::collections::BTreeSet<MaglevKey>> {
    if services.values().all(|header| header.maglev == 0) {
        return Ok(Default::default());
    }
    let tables: BpfHashMap<MapData, MaglevKey, MaglevChunk> = open_typed(root, map)?;
    let mut keys = std::collections::BTreeSet::new();
    for key in tables.keys() {
        match key {
            Ok(key) => {
                keys.insert(key);
            }
            Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(keys)
}

/// All entries of a hash map, skipping those deleted while it was being listed.
fn read_entries<K: aya::Pod + Ord, V: aya::Pod>(
    map: &BpfHashMap<MapData, K, V>,
) -> Result<std::collections::BTreeMap<K, V>> {
    let mut entries = std::collections::BTreeMap::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) => {
                entries.insert(key, value);
            }
            Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(entries)
}

/// An address and port, in host order: IPv4's (`Ipv4Addr`, the default) or either
/// family's (`IpAddr`). JSON: `{"address": "…", "port": n}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint<I = Ipv4Addr> {
    pub address: I,
    pub port: u16,
}

impl Endpoint {
    /// From the wire-order address and port the maps store.
    pub fn from_wire(addr: u32, port: u16) -> Self {
        Self {
            address: Ipv4Addr::from(addr.to_ne_bytes()),
            port: u16::from_be(port),
        }
    }
}

impl Endpoint<IpAddr> {
    /// From the wire-order address of either family and port the maps store.
    pub fn of<A: Address>(addr: A, port: u16) -> Self {
        let endpoint = socket_addr(addr, port);
        Self {
            address: endpoint.ip(),
            port: endpoint.port(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.address, self.port)
    }
}

impl fmt::Display for Endpoint<IpAddr> {
    /// `addr:port`, `[addr]:port` for IPv6.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::SocketAddr::new(self.address, self.port).fmt(f)
    }
}

/// `addr:port/proto` (`[addr]:port/proto` for IPv6), the way every view names a frontend.
fn frontend_label<A: Address>(key: &FrontendKey<A>) -> String {
    format!(
        "{}/{}",
        socket_addr(key.addr, key.port),
        protocol_name(key.proto)
    )
}

/// A wire-order address and port of either family, as `std` shows them.
fn socket_addr<A: Address>(addr: A, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.to_ip(), u16::from_be(port))
}

fn protocol_name(protocol: u8) -> &'static str {
    proto::name(protocol)
}

/// The frontend kind recorded in a header's flags, named like the Service field.
fn kind_name(flags: u16) -> &'static str {
    if flags & service_flags::NODE_PORT != 0 {
        "NodePort"
    } else if flags & service_flags::LOAD_BALANCER != 0 {
        "LoadBalancer"
    } else if flags & service_flags::EXTERNAL_IP != 0 {
        "ExternalIP"
    } else {
        "ClusterIP"
    }
}

/// `namespace/name:port-name`, or `namespace/name` for an unnamed port: kube-proxy's
/// `ServicePortName.String()`, which its comments and chain hashes use.
pub fn service_port_name(name: &ServiceName) -> String {
    match name.port_name() {
        "" => format!("{}/{}", name.namespace(), name.name()),
        port => format!("{}/{}:{port}", name.namespace(), name.name()),
    }
}

/// The Service port of the frontend with this rev_nat_id, if the daemon named it.
fn service_of<A: Address>(image: &MapImage<A>, rev_nat_id: u32) -> Option<String> {
    image.names.get(&rev_nat_id).map(service_port_name)
}

fn new_table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(NOTHING).set_header(header);
    table
}

#[cfg(test)]
mod test_support {
    //! A small cluster state built through the real planner output types and the writer's
    //! `materialize`, so views are tested on exactly what the daemon would write.
    use std::net::Ipv4Addr;

    use crate::plan::{
        BackendAddr, DesiredState, EmptyFrontend, Frontend, FrontendKind, FrontendPlan, Protocol,
        ServicePortName,
    };
    use crate::writer::{MapImage, MapMirror, Sync};

    pub struct Port<'a> {
        pub service: (&'a str, &'a str, &'a str),
        pub kind: FrontendKind,
        pub frontend: ([u8; 4], u16, Protocol),
        pub backends: &'a [([u8; 4], u16)],
    }

    pub fn image(ports: &[Port<'_>]) -> MapImage {
        image_with_cluster_sets(ports, &[])
    }

    /// [`image`], where the frontends listed in `cluster_sets` are external frontends of
    /// an externalTrafficPolicy Local Service whose pods reach these Cluster endpoints.
    #[allow(clippy::type_complexity)]
    pub fn image_with_cluster_sets(
        ports: &[Port<'_>],
        cluster_sets: &[(([u8; 4], u16, Protocol), &[([u8; 4], u16)])],
    ) -> MapImage {
        let backends = |list: &[([u8; 4], u16)]| -> Vec<BackendAddr> {
            list.iter()
                .map(|(addr, port)| BackendAddr {
                    addr: Ipv4Addr::from(*addr).into(),
                    port: *port,
                })
                .collect()
        };
        let mut desired = DesiredState::default();
        for port in ports {
            let (addr, number, protocol) = port.frontend;
            let (namespace, name, port_name) = port.service;
            let cluster_backends = cluster_sets
                .iter()
                .find(|(frontend, _)| *frontend == port.frontend)
                .map(|(_, cluster)| backends(cluster));
            desired.frontends.insert(
                Frontend {
                    addr: Ipv4Addr::from(addr).into(),
                    port: number,
                    protocol,
                },
                FrontendPlan {
                    service: ServicePortName {
                        namespace: namespace.into(),
                        name: name.into(),
                        port_name: port_name.into(),
                    },
                    kind: port.kind,
                    backends: backends(port.backends),
                    cluster_backends,
                    when_empty: EmptyFrontend::Reject,
                    session_affinity: None,
                    serving_addrs: Vec::new(),
                    source_ranges: Vec::new(),
                    selection: crate::plan::Selection::Random,
                },
            );
        }
        written(&desired)
    }

    /// What the writer puts into family `A`'s maps for `desired`.
    pub fn written<A: proxy_common::Address>(desired: &DesiredState) -> MapImage<A> {
        let mut mirror = MapMirror::new(MapImage::default(), 1024);
        let report = mirror.sync(Sync::Full(desired), &mut crate::writer::AcceptingMaps);
        assert!(report.complete(), "{report:?}");
        mirror.image().clone()
    }

    /// A dual-stack Service port's ClusterIPs, each with one endpoint of its family.
    pub fn dual_stack() -> DesiredState {
        let mut desired = DesiredState::default();
        for (vip, backend) in [
            ("198.19.0.10", "198.18.1.11"),
            ("2001:db8:ff::10", "2001:db8:1::11"),
        ] {
            desired.frontends.insert(
                Frontend {
                    addr: vip.parse().unwrap(),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                FrontendPlan {
                    service: ServicePortName {
                        namespace: "default".into(),
                        name: "dual".into(),
                        port_name: "http".into(),
                    },
                    kind: FrontendKind::ClusterIp,
                    backends: vec![BackendAddr {
                        addr: backend.parse().unwrap(),
                        port: 8080,
                    }],
                    cluster_backends: None,
                    when_empty: EmptyFrontend::Reject,
                    session_affinity: None,
                    serving_addrs: Vec::new(),
                    source_ranges: Vec::new(),
                    selection: crate::plan::Selection::Random,
                },
            );
        }
        desired
    }
}
