//! `ebpf-proxy`: the node daemon and the node-admin CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use proxy_userspace::conntrack::CtTimeouts;
use proxy_userspace::daemon::{self, DaemonConfig};
use proxy_userspace::datapath::MapSizes;
use proxy_userspace::inspect;
use proxy_userspace::netlink::DevicePolicy;

const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ebpf-proxy";

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
    Daemon(DaemonArgs),
    /// Remove everything the daemon pinned (maps and links): the datapath stops.
    /// Like `kube-proxy --cleanup`.
    Cleanup {
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
    },
    /// One row per frontend with its backends, as the datapath holds them.
    Services(ViewArgs),
    /// Datapath counters, summed over CPUs.
    Stats(ViewArgs),
}

#[derive(clap::Args)]
struct ViewArgs {
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

impl ViewArgs {
    fn print<T: serde::Serialize>(&self, rows: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
        match self.output {
            Output::Table => println!("{}", table(rows)),
            Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Standalone mode: a directory of Kubernetes YAML (v1 Service,
    /// discovery.k8s.io/v1 EndpointSlice), re-read when it changes.
    #[arg(long)]
    manifests: PathBuf,
    /// This node's name (for traffic policies that prefer local endpoints).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// bpffs directory where maps and links are pinned.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// External devices for NodePort/ExternalIP/LoadBalancer traffic [default: the
    /// interfaces holding the node's addresses, except loopback and pod devices].
    #[arg(long, value_delimiter = ',')]
    devices: Option<Vec<String>>,
    /// Glob patterns naming the host side of pod veths; attached as they appear.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lxc*,veth*,cali*,gke*,eni*,azv*,cilium_*"
    )]
    pod_devices: Vec<glob::Pattern>,
    /// Only open NodePorts on node addresses inside these CIDRs [default: all node
    /// addresses except loopback].
    #[arg(long, value_delimiter = ',')]
    nodeport_addresses: Vec<Ipv4Net>,
    /// SERVICES map size (one entry per frontend and one per frontend backend).
    #[arg(long, default_value_t = MapSizes::default().services)]
    max_services: u32,
    /// BACKENDS map size.
    #[arg(long, default_value_t = MapSizes::default().backends)]
    max_backends: u32,
    /// CONNTRACK map size (two entries per flow; the oldest are evicted when full).
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    max_conntrack: u32,
    /// Idle timeout of established TCP flows, in seconds (kube-proxy's
    /// --conntrack-tcp-timeout-established).
    #[arg(long, default_value_t = CtTimeouts::default().tcp_established.as_secs())]
    conntrack_tcp_established_seconds: u64,
    /// How often the manifests directory is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 250)]
    manifests_poll_ms: u64,
    /// How often the maps are re-read and fully re-applied, in seconds.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
}

impl DaemonArgs {
    fn into_config(self) -> DaemonConfig {
        DaemonConfig {
            manifests: self.manifests,
            node_name: self.node_name,
            bpffs_root: self.bpffs_root,
            devices: DevicePolicy {
                external: self.devices,
                pod_patterns: self.pod_devices,
            },
            nodeport_cidrs: self.nodeport_addresses,
            map_sizes: MapSizes {
                services: self.max_services,
                backends: self.max_backends,
                conntrack: self.max_conntrack,
            },
            ct_timeouts: CtTimeouts {
                tcp_established: Duration::from_secs(self.conntrack_tcp_established_seconds),
                ..CtTimeouts::default()
            },
            poll_interval: Duration::from_millis(self.manifests_poll_ms.max(10)),
            resync_interval: Duration::from_secs(self.resync_seconds.max(1)),
            ct_gc_interval: Duration::from_secs(10),
        }
    }
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
        Command::Daemon(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")
            .and_then(|runtime| runtime.block_on(daemon::run(args.into_config()))),
        Command::Cleanup { bpffs_root } => cleanup(&bpffs_root),
        Command::Services(args) => inspect::read_services(&args.bpffs_root)
            .and_then(|rows| args.print(&rows, |rows| inspect::render_services(rows))),
        Command::Stats(args) => inspect::read_stats(&args.bpffs_root)
            .and_then(|rows| args.print(&rows, |rows| inspect::render_stats(rows))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}
