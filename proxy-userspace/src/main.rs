//! `ebpf-proxy`: the node daemon and the node-admin CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use proxy_common::CtTimeouts;
use proxy_common::maglev::DEFAULT_TABLE_SIZE;
use proxy_userspace::conntrack::{self, ConntrackSizes};
use proxy_userspace::daemon::{self, DaemonConfig, SourceConfig};
use proxy_userspace::datapath::{DEFAULT_BPFFS_ROOT, MapSizes, SnatPortRange};
use proxy_userspace::inspect;
use proxy_userspace::model::selection::{Algorithm, SelectionDefaults, parse_table_size};
use proxy_userspace::netlink::DevicePolicy;
use proxy_userspace::node_port_addresses::NodePortAddresses;
use proxy_userspace::socket_lb::SocketLbMode;
use proxy_userspace::source::kubernetes::ApiServer;
use proxy_userspace::source::manifests::ParseLimits;
use proxy_userspace::xdp::XdpMode;

/// A kube-proxy replacement whose datapath runs in the kernel as eBPF.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EBPF_PROXY_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon: load the datapath and keep it equal to the Services.
    Daemon(Box<DaemonArgs>),
    /// Remove everything the daemon pinned (maps and links): the datapath stops.
    /// Like `kube-proxy --cleanup`.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
    },
    /// The node-admin views: services, backends, conntrack, stats, explain, trace.
    #[command(flatten)]
    Inspect(inspect::Command),
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Standalone mode: a directory of Kubernetes YAML (v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice), re-read when it changes.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Watch the API server of this kubeconfig's current context. Without this flag and
    /// without --manifests, the in-cluster configuration is used (in a pod).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// After a change from the API server or the manifests, wait this long for more
    /// changes and sync them together (kube-proxy's --iptables-min-sync-period).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// This node's name (for traffic policies that prefer local endpoints).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This node's zone (`topology.kubernetes.io/zone`), for topology hints in standalone
    /// mode; with the API server the Node's own label is used.
    #[arg(long, env = "NODE_ZONE")]
    node_zone: Option<String>,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// External devices for NodePort/ExternalIP/LoadBalancer traffic [default: the
    /// interfaces holding the node's addresses, except loopback and pod devices].
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// The XDP program on the external devices: `native` (in the driver; generic where the
    /// driver has none), `generic`, or `off` (tc only). It handles outside traffic to
    /// NodePorts, externalIPs and load-balancer IPs ahead of tc and leaves tc the rest.
    /// Off by default, as measured: on veths it costs more than it saves (see README).
    #[arg(long, value_enum, default_value_t = XdpMode::Off)]
    xdp: XdpMode,
    /// How NodePorts, externalIPs and load-balancer IPs choose a new connection's backend:
    /// `random` (kube-proxy's) or `maglev` (consistent hashing: every node picks the same
    /// backend for a client's flow); a Service's `ebpf-proxy.io/lb-algorithm` annotation
    /// overrides it. ClusterIPs always choose at random.
    #[arg(long, default_value = "random")]
    lb_algorithm: Algorithm,
    /// Positions in each Maglev table, one of the primes 251, 509, 1021, 2039, 4093, 8191,
    /// 16381, 32749, 65521, 131071 (about 100 per backend keeps the shares within 1 %); a
    /// Service's `ebpf-proxy.io/maglev-table-size` annotation overrides it.
    #[arg(long, default_value_t = DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
    maglev_table_size: u32,
    /// Glob patterns naming the host side of pod veths; attached as they appear.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lxc*,veth*,cali*,gke*,eni*,azv*,cilium_*"
    )]
    pod_devices: Vec<glob::Pattern>,
    /// Only open NodePorts (and healthCheckNodePorts) on node addresses inside these CIDRs
    /// of either family, or `primary`: the Node's primary address (kube-proxy's flag)
    /// [default: every node address; NodePorts never on loopback ones].
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<String>,
    /// SERVICES map size: frontends (each ClusterIP, NodePort per node address, external
    /// and load-balancer IP of each Service port).
    #[arg(long, default_value_t = MapSizes::default().services)]
    max_services: u32,
    /// BACKEND_SLOTS size: the backends of all frontends together (each frontend's in a
    /// contiguous slice; keep room for the slices changes write before they free the old
    /// ones). MEMBERSHIP gets this plus --max-services.
    #[arg(long, default_value_t = MapSizes::default().backend_slots)]
    max_backend_slots: u32,
    /// BACKEND_IDS size: distinct backends (address, port, protocol).
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// MAGLEV size, in Maglev tables of the default 16381 positions (64 KiB of kernel
    /// memory each, taken only while it exists): one per external frontend of a Maglev
    /// Service; a table of another size counts in proportion.
    #[arg(long, default_value_t = MapSizes::default().maglev_tables)]
    max_maglev_tables: u32,
    /// CONNTRACK map size: assured flows, two entries each, the least recently used evicted
    /// when full; CONNTRACK_PENDING (flows not yet assured) gets a quarter of it [default:
    /// from the machine's memory, see --conntrack-memory-ratio].
    #[arg(long)]
    max_conntrack: Option<u32>,
    /// FRAGMENTS and FRAGMENTS6 map size (each): fragmented IPv4 and IPv6 datagrams in
    /// flight whose first fragment passed, so their later fragments follow it (LRU;
    /// Cilium's --bpf-fragments-map-max).
    #[arg(long, default_value_t = MapSizes::default().fragments, value_parser = clap::value_parser!(u32).range(1..))]
    max_fragments: u32,
    /// The share of the machine's memory the conntrack maps take when --max-conntrack is
    /// not given (Cilium's --bpf-map-dynamic-size-ratio).
    #[arg(long, default_value_t = conntrack::DEFAULT_MEMORY_RATIO)]
    conntrack_memory_ratio: f64,
    /// Source ports (MIN-MAX) for SNAT of outside traffic to backends on other nodes. The
    /// default lies above the NodePort range and Linux's default ip_local_port_range.
    #[arg(long, default_value_t = SnatPortRange::default())]
    snat_port_range: SnatPortRange,
    /// Idle timeout of established TCP connections (kube-proxy's flag).
    #[arg(long, default_value = "24h0m0s", value_parser = parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle timeout of TCP connections one side closed (FIN sent), kube-proxy's flag.
    #[arg(long, default_value = "1h0m0s", value_parser = parse_duration)]
    conntrack_tcp_timeout_close_wait: Duration,
    /// Idle timeout of a TCP connection whose SYN was never answered (netfilter's
    /// nf_conntrack_tcp_timeout_syn_sent): the client's next SYN selects a backend again.
    #[arg(long, default_value = "2m0s", value_parser = parse_duration)]
    conntrack_tcp_timeout_syn_sent: Duration,
    /// Idle timeout of UDP flows that are not streams (kube-proxy's flag; netfilter's
    /// default).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Idle timeout of UDP streams (kube-proxy's flag; netfilter's default).
    #[arg(long, default_value = "2m0s", value_parser = parse_duration)]
    conntrack_udp_timeout_stream: Duration,
    /// Interval of the conntrack garbage collector; 0s: one that adapts to what the sweeps
    /// find (1 s to 5 min).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    conntrack_gc_interval: Duration,
    /// How often the manifests directory is checked for changes, in milliseconds (inotify
    /// reports most changes at once; the poll catches the rest).
    #[arg(long, default_value_t = 250)]
    manifests_poll_ms: u64,
    /// A manifest file larger than this is refused unread (bytes).
    #[arg(long, default_value_t = ParseLimits::default().max_file_bytes)]
    manifests_max_file_bytes: u64,
    /// The deepest nesting of mappings and sequences a manifest document may have.
    #[arg(long, default_value_t = ParseLimits::default().max_depth)]
    manifests_max_depth: usize,
    /// How many nodes YAML aliases (`*name`) may stand for in one document, all uses
    /// together: what anchors may expand to.
    #[arg(long, default_value_t = ParseLimits::default().max_alias_expansion)]
    manifests_max_alias_expansion: usize,
    /// How often the maps are re-read and fully re-applied, in seconds.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// `ip:port` of the /healthz and /livez server (kube-proxy's default); empty disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// `ip:port` of the Prometheus /metrics server (kube-proxy's default); empty disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// Unhealthy when a received change stays unapplied this long (kube-proxy: twice its
    /// sync period).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    healthz_timeout: Duration,
    /// Balance at the socket (cgroup connect/sendmsg hooks): `host`, the node's own
    /// processes (which no tc program sees); `all`, pods' TCP connections too (translated
    /// once at connect() instead of per packet); `off`.
    #[arg(long, value_enum, default_value_t = SocketLbMode::Host)]
    socket_lb: SocketLbMode,
    /// The cgroup v2 directory the socket programs attach to; they see the sockets of its
    /// processes and those of every cgroup below [default: the root of the unified
    /// hierarchy, where it is mounted: /sys/fs/cgroup, /sys/fs/cgroup/unified on hybrid
    /// hosts].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
}

/// A bind address flag: empty disables the server.
fn bind_address(flag: &str, value: &str) -> Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("--{flag} {value:?}: expected ip:port, or empty to disable"))
}

impl DaemonArgs {
    /// `in_cluster`: whether the process runs in a pod (`KUBERNETES_SERVICE_HOST` is set).
    fn into_config(self, in_cluster: bool) -> Result<DaemonConfig> {
        let conntrack = match self.max_conntrack {
            Some(max) => ConntrackSizes::with_assured(max),
            None => ConntrackSizes::from_memory(
                conntrack::total_memory().context("reading the machine's memory size")?,
                self.conntrack_memory_ratio,
            ),
        };
        let seconds = |flag: &str, duration: Duration| -> Result<u32> {
            let seconds = u32::try_from(duration.as_secs()).ok().filter(|&s| s > 0);
            seconds.with_context(|| {
                format!("--{flag} {duration:?}: expected at least one second and at most 136 years")
            })
        };
        let ct_timeouts = CtTimeouts {
            tcp_syn_sent: seconds(
                "conntrack-tcp-timeout-syn-sent",
                self.conntrack_tcp_timeout_syn_sent,
            )?,
            tcp_established: seconds(
                "conntrack-tcp-timeout-established",
                self.conntrack_tcp_timeout_established,
            )?,
            tcp_close_wait: seconds(
                "conntrack-tcp-timeout-close-wait",
                self.conntrack_tcp_timeout_close_wait,
            )?,
            udp: seconds("conntrack-udp-timeout", self.conntrack_udp_timeout)?,
            udp_stream: seconds(
                "conntrack-udp-timeout-stream",
                self.conntrack_udp_timeout_stream,
            )?,
            ..CtTimeouts::DEFAULT
        };
        let source = match (self.manifests, self.kubeconfig) {
            (Some(dir), _) => SourceConfig::Manifests {
                dir,
                poll_interval: Duration::from_millis(self.manifests_poll_ms.max(10)),
                limits: ParseLimits {
                    max_file_bytes: self.manifests_max_file_bytes,
                    max_depth: self.manifests_max_depth,
                    max_alias_expansion: self.manifests_max_alias_expansion,
                },
            },
            (None, Some(kubeconfig)) => SourceConfig::Kubernetes(ApiServer::Kubeconfig(kubeconfig)),
            (None, None) if in_cluster => SourceConfig::Kubernetes(ApiServer::InCluster),
            (None, None) => bail!(
                "no source of Services: pass --manifests DIR (standalone) or --kubeconfig PATH, \
                 or run in a pod (in-cluster configuration needs KUBERNETES_SERVICE_HOST)"
            ),
        };
        Ok(DaemonConfig {
            source,
            node_name: self.node_name,
            node_zone: self.node_zone,
            bpffs_root: self.bpffs_root,
            devices: DevicePolicy {
                external: self.devices,
                pod_patterns: self.pod_devices,
            },
            xdp: self.xdp,
            selection: SelectionDefaults {
                algorithm: self.lb_algorithm,
                table_size: self.maglev_table_size,
            },
            nodeport_addresses: NodePortAddresses::parse(&self.nodeport_addresses)
                .map_err(|problem| anyhow::anyhow!("--nodeport-addresses: {problem}"))?,
            map_sizes: MapSizes {
                services: self.max_services,
                backend_slots: self.max_backend_slots,
                backends: self.max_backends,
                maglev_tables: self.max_maglev_tables,
                conntrack,
                fragments: self.max_fragments,
                snat_ports: self.snat_port_range,
            },
            ct_timeouts,
            min_sync_period: self.min_sync_period,
            resync_interval: Duration::from_secs(self.resync_seconds.max(1)),
            ct_gc_interval: (!self.conntrack_gc_interval.is_zero())
                .then_some(self.conntrack_gc_interval),
            healthz_bind_address: bind_address("healthz-bind-address", &self.healthz_bind_address)?,
            metrics_bind_address: bind_address("metrics-bind-address", &self.metrics_bind_address)?,
            healthz_timeout: self.healthz_timeout,
            socket_lb: self.socket_lb,
            cgroup_root: self.cgroup_root,
        })
    }
}

/// A duration the way kube-proxy's flags take one (Go's `time.ParseDuration`): numbers
/// with units, `250ms`, `1s`, `2m`, `24h0m0s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.is_empty() {
        return Err("an empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?}: expected a number before each unit"))?;
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let part = match &rest[digits..digits + unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number * 60),
            "h" => Duration::from_secs(number * 3600),
            unit => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
        };
        total += part;
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn cleanup(root: &std::path::Path) -> Result<()> {
    // Unpinning the links of a running daemon would detach its datapath under it.
    proxy_userspace::pin_root::ensure_unused(root)?;
    match std::fs::remove_dir_all(root) {
        Ok(()) => {
            eprintln!("removed {} (maps and links unpinned)", root.display());
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("nothing to clean: {} does not exist", root.display());
            Ok(())
        }
        Err(error) => Err(error).with_context(|| format!("removing {}", root.display())),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Daemon(args) => (*args)
            .into_config(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
            .and_then(|config| {
                proxy_userspace::allocator::configure();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the runtime")?;
                runtime.block_on(daemon::run(config))
            }),
        Command::Cleanup { bpffs_root } => cleanup(&bpffs_root),
        Command::Inspect(command) => command.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon_config(args: &[&str], in_cluster: bool) -> Result<DaemonConfig> {
        let cli = Cli::try_parse_from(
            ["ebpf-proxy", "daemon", "--node-name", "node-a"]
                .iter()
                .chain(args),
        )?;
        let Command::Daemon(args) = cli.command else {
            unreachable!("parsed a daemon command")
        };
        (*args).into_config(in_cluster)
    }

    #[test]
    fn the_source_comes_from_the_flags_or_the_pod() {
        let manifests = daemon_config(&["--manifests", "/m"], true).unwrap();
        assert!(
            matches!(manifests.source, SourceConfig::Manifests { dir, .. } if dir.to_str() == Some("/m"))
        );

        let kubeconfig = daemon_config(&["--kubeconfig", "/k"], true).unwrap();
        assert!(matches!(
            kubeconfig.source,
            SourceConfig::Kubernetes(ApiServer::Kubeconfig(path)) if path.to_str() == Some("/k")
        ));

        let in_cluster = daemon_config(&[], true).unwrap();
        assert!(matches!(
            in_cluster.source,
            SourceConfig::Kubernetes(ApiServer::InCluster)
        ));

        let error = daemon_config(&[], false).unwrap_err().to_string();
        assert!(error.contains("no source of Services"), "{error}");
        let error = daemon_config(&["--manifests", "/m", "--kubeconfig", "/k"], true)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot be used with"), "{error}");
    }

    #[test]
    fn nodeport_addresses_take_both_families_or_primary() {
        let both = daemon_config(
            &[
                "--manifests",
                "/m",
                "--nodeport-addresses",
                "198.18.0.0/24,2001:db8::/64",
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            both.nodeport_addresses.cidrs(None, None),
            ["198.18.0.0/24", "2001:db8::/64"].map(|cidr| cidr.parse::<ipnet::IpNet>().unwrap())
        );

        let primary = daemon_config(
            &["--manifests", "/m", "--nodeport-addresses", "primary"],
            false,
        );
        assert_eq!(
            primary.unwrap().nodeport_addresses,
            NodePortAddresses::Primary
        );

        let error = daemon_config(
            &[
                "--manifests",
                "/m",
                "--nodeport-addresses",
                "primary,198.18.0.0/24",
            ],
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("--nodeport-addresses: "), "{error}");
    }

    #[test]
    fn min_sync_period_takes_kube_proxy_durations() {
        let config = daemon_config(&["--manifests", "/m"], false).unwrap();
        assert_eq!(config.min_sync_period, Duration::from_millis(100));
        let config =
            daemon_config(&["--manifests", "/m", "--min-sync-period", "2s"], false).unwrap();
        assert_eq!(config.min_sync_period, Duration::from_secs(2));

        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h0m0s"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert!(parse_duration("100").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn conntrack_flags_are_kube_proxys_and_sizes_come_from_memory() {
        let config = daemon_config(&["--manifests", "/m"], false).unwrap();
        assert_eq!(config.ct_timeouts, CtTimeouts::DEFAULT);
        assert_eq!(config.ct_gc_interval, None);
        assert!(config.map_sizes.conntrack.assured >= 1 << 17);
        let config = daemon_config(
            &[
                "--manifests",
                "/m",
                "--conntrack-tcp-timeout-established",
                "2h",
                "--conntrack-tcp-timeout-close-wait",
                "60s",
                "--conntrack-udp-timeout-stream",
                "3m",
                "--max-conntrack",
                "65536",
                "--conntrack-gc-interval",
                "5s",
            ],
            false,
        )
        .unwrap();
        let t = config.ct_timeouts;
        assert_eq!(
            (t.tcp_established, t.tcp_close_wait, t.udp_stream),
            (7200, 60, 180)
        );
        assert_eq!(
            config.map_sizes.conntrack,
            ConntrackSizes::with_assured(65536)
        );
        assert_eq!(config.ct_gc_interval, Some(Duration::from_secs(5)));
        let error = daemon_config(
            &["--manifests", "/m", "--conntrack-udp-timeout", "0s"],
            false,
        )
        .unwrap_err();
        assert!(
            format!("{error:#}").contains("at least one second"),
            "{error:#}"
        );
    }
}
