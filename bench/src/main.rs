//! `proxy-bench`: ebpf-proxy side by side with kube-proxy's iptables and nftables rules —
//! per-packet cost in the kernel, connections end to end in the netns lab, programming
//! time, one endpoint change, and the daemon's memory. Prints one table per measurement
//! and writes `benchmarks.md` and `benchmarks.png` to the output directory.
//!
//! Run it through `cargo xtask bench [--quick]` (release build, as root). All traffic and
//! all netfilter rules stay in network namespaces the lab creates; maps are pinned in
//! private bpffs mounts; everything is removed afterwards, also when a step fails.

mod chart;
mod cluster;
mod connections;
mod conntrack_gc;
mod daemon;
mod endpoint_change;
mod hostile;
mod kube_rules;
mod machine;
mod memory;
mod netfilter;
mod packet;
mod programming;
mod related;
mod report;
mod soak;
mod stats;
mod xdp;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use proxy_lab::Lab;

use connections::ConnectionSettings;
use conntrack_gc::GcSettings;
use endpoint_change::ChangeSettings;
use hostile::HostileSettings;
use memory::MemorySettings;
use packet::PacketSettings;
use programming::ProgrammingSettings;
use proxy_lab::load::LoadSettings;
use report::{DocumentContext, Results, Table};
use soak::SoakSettings;
use xdp::XdpSettings;

#[derive(Parser)]
#[command(about = "Benchmarks ebpf-proxy against kube-proxy-shaped iptables and nftables rules")]
struct Cli {
    /// CI's smoke check: small sizes, short runs; proves the harness works, the figures
    /// mean nothing.
    #[arg(long)]
    quick: bool,
    /// Where benchmarks.md and benchmarks.png go.
    #[arg(long, default_value = "docs")]
    out_dir: PathBuf,
    /// Run only these measurements (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Section>,
    /// Connections, programming and memory at these numbers of Services only (default: the
    /// run's sizes); such a run writes under the target directory, not docs/.
    #[arg(long, value_delimiter = ',')]
    services: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Packet,
    /// The packets around a flow: later fragments, ICMP errors, full-size segments.
    Related,
    /// Conntrack garbage collection.
    Gc,
    Connections,
    Programming,
    Change,
    Memory,
    Soak,
    Hostile,
    /// NodePort through XDP, tc alone and kube-proxy's iptables.
    Xdp,
}

/// The lab's load per run: `threads` clients for `duration`, at most `max_connections`,
/// 1 s timeouts, nothing held open.
fn lab_load(threads: usize, duration: Duration, max_connections: usize) -> LoadSettings {
    LoadSettings {
        threads,
        duration,
        max_connections,
        timeout: Duration::from_secs(1),
        hold: Duration::ZERO,
    }
}

/// The sizes, counts and durations of every measurement.
struct Settings {
    packet: PacketSettings,
    gc: GcSettings,
    connections: ConnectionSettings,
    programming: ProgrammingSettings,
    change: ChangeSettings,
    memory: MemorySettings,
    soak: SoakSettings,
    hostile: HostileSettings,
    xdp: XdpSettings,
}

impl Settings {
    fn full() -> Self {
        Self {
            packet: PacketSettings {
                sizes: vec![1, 1_000, 10_000, 100_000],
                runs: 7,
                repeat: 1_000_000,
                single_runs: 5_000,
            },
            gc: GcSettings {
                sizes: vec![1 << 18, 1 << 20],
                runs: 3,
            },
            connections: ConnectionSettings {
                sizes: vec![1, 1_000, 10_000],
                pods: 10,
                load: lab_load(4, Duration::from_secs(2), 100_000),
                runs: 5,
                warmup: 300,
                rules_timeout: Duration::from_secs(180),
            },
            programming: ProgrammingSettings {
                sizes: vec![1_000, 10_000, 100_000],
                runs: 3,
                budget: Duration::from_secs(40),
                timeout: Duration::from_secs(90),
                changes: 200,
                netfilter_max_services: 10_000,
            },
            change: ChangeSettings {
                background_services: vec![10_000, 100_000],
                api_background_services: vec![1_000, 10_000],
                changes: 100,
            },
            memory: MemorySettings {
                services: vec![10_000, 100_000],
                endpoints_per_service: 10,
            },
            soak: SoakSettings {
                background_services: 10_000,
                changes: 1_000,
                sample_every: 100,
            },
            hostile: HostileSettings {
                changes: 20,
                large_manifest: true,
            },
            xdp: XdpSettings {
                runs: 7,
                single_runs: 3_000,
                repeat: 1_000_000,
                pods: 4,
                load: lab_load(4, Duration::from_secs(2), 100_000),
                request_runs: 5,
                warmup: 300,
                rules_timeout: Duration::from_secs(60),
            },
        }
    }

    fn quick() -> Self {
        Self {
            packet: PacketSettings {
                sizes: vec![1, 1_000],
                runs: 2,
                repeat: 20_000,
                single_runs: 300,
            },
            gc: GcSettings {
                sizes: vec![1 << 14],
                runs: 1,
            },
            connections: ConnectionSettings {
                sizes: vec![1, 100],
                pods: 3,
                load: lab_load(2, Duration::from_millis(300), 5_000),
                runs: 1,
                warmup: 20,
                rules_timeout: Duration::from_secs(60),
            },
            programming: ProgrammingSettings {
                sizes: vec![100, 1_000],
                runs: 1,
                budget: Duration::from_secs(10),
                timeout: Duration::from_secs(30),
                changes: 10,
                netfilter_max_services: 1_000,
            },
            change: ChangeSettings {
                background_services: vec![10],
                api_background_services: vec![10],
                changes: 4,
            },
            memory: MemorySettings {
                services: vec![100],
                endpoints_per_service: 10,
            },
            soak: SoakSettings {
                background_services: 10,
                changes: 40,
                sample_every: 10,
            },
            hostile: HostileSettings {
                changes: 2,
                large_manifest: false,
            },
            xdp: XdpSettings {
                runs: 2,
                single_runs: 200,
                repeat: 20_000,
                pods: 2,
                load: lab_load(2, Duration::from_millis(300), 5_000),
                request_runs: 1,
                warmup: 20,
                rules_timeout: Duration::from_secs(60),
            },
        }
    }

    /// One line per measurement, for the docs.
    fn describe(&self) -> Vec<String> {
        let Self {
            packet,
            gc,
            connections,
            programming,
            change,
            memory,
            soak,
            hostile,
            xdp,
        } = self;
        vec![
            format!(
                "per packet: {:?} Services × 10 endpoints; {} runs of `repeat` {} and of {} \
                 single runs each; the packets around a flow at 1 Service, {} runs of \
                 `repeat` {}",
                packet.sizes,
                packet.runs,
                packet.repeat,
                packet.single_runs,
                packet.runs,
                packet.repeat
            ),
            format!(
                "conntrack garbage collection: CONNTRACK of {:?} entries, full, half of the \
                 flows over; {} runs each",
                gc.sizes, gc.runs
            ),
            format!(
                "connections: {:?} Services, {} pods; {} runs of {:?} with {} client threads \
                 (at most {} connections a run, {:?} timeouts) after {} warm-up connections",
                connections.sizes,
                connections.pods,
                connections.runs,
                connections.load.duration,
                connections.load.threads,
                connections.load.max_connections,
                connections.load.timeout,
                connections.warmup
            ),
            format!(
                "programming: {:?} Services × 10 endpoints; up to {} runs per tool and size \
                 (no new run after {:?} spent), a load stopped after {:?}, iptables and \
                 nftables up to {} Services; {} endpoint changes per size",
                programming.sizes,
                programming.runs,
                programming.budget,
                programming.timeout,
                programming.netfilter_max_services,
                programming.changes
            ),
            format!(
                "endpoint change through the daemon: {} changes among {:?} background Services \
                 (manifests) and {:?} (test API server)",
                change.changes, change.background_services, change.api_background_services
            ),
            format!(
                "memory: {:?} Services × {} endpoints",
                memory.services, memory.endpoints_per_service
            ),
            format!(
                "soak: {} changes among {} background Services, RSS every {}",
                soak.changes, soak.background_services, soak.sample_every
            ),
            format!(
                "hostile input: {} unrelated changes with each input present{}",
                hostile.changes,
                if hostile.large_manifest {
                    ", the 50 MB manifest included"
                } else {
                    ""
                }
            ),
            format!(
                "XDP: per packet {} runs of {} single runs per packet kind, family and hook; NodePort \
                 requests through {} pods, {} runs of {:?} with {} client threads after {} \
                 warm-up connections",
                xdp.runs,
                xdp.single_runs,
                xdp.pods,
                xdp.request_runs,
                xdp.load.duration,
                xdp.load.threads,
                xdp.warmup
            ),
        ]
    }
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("proxy-bench failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    if let Some(reason) = proxy_lab::lab_unavailable_reason() {
        bail!("the benchmarks need root and network namespaces: {reason}");
    }
    let started = Instant::now();
    let mut settings = if cli.quick {
        Settings::quick()
    } else {
        Settings::full()
    };
    if !cli.services.is_empty() {
        settings.connections.sizes = cli.services.clone();
        settings.programming.sizes = cli.services.clone();
        settings.memory.services = cli.services.clone();
    }
    let wants = |section| cli.only.is_empty() || cli.only.contains(&section);
    let mut results = Results::default();

    if wants(Section::Packet) {
        heading("1. Per-packet cost in the kernel (ns per packet)");
        // BPF_PROG_TEST_RUN sends nothing anywhere; running it in a lab namespace keeps
        // even its test skbs off the host's own network stack.
        let lab = Lab::builder().pods(0).build()?;
        results.packet = lab.node().run(|| packet::measure(&settings.packet))??;
        show(&report::packet_table(&results.packet));
        show(&report::packet_family_table(&results.packet));
    }
    if wants(Section::Related) {
        heading("1. Per-packet cost of the packets around a flow (ns per packet)");
        let lab = Lab::builder().pods(0).build()?;
        let related = lab.node().run(|| related::measure(&settings.packet))??;
        show(&report::related_table(&related));
        results.related = Some(related);
    }
    if wants(Section::Gc) {
        heading("1. Conntrack garbage collection (one sweep)");
        let lab = Lab::builder().pods(0).build()?;
        results.gc = lab.node().run(|| conntrack_gc::measure(&settings.gc))??;
        show(&report::gc_table(&results.gc));
    }
    if wants(Section::Connections) {
        heading("2. New TCP connections through a ClusterIP, end to end");
        results.connections = connections::measure(&settings.connections)?;
        show(&report::connections_table(&results.connections));
    }
    if wants(Section::Programming) {
        heading("3. Programming from scratch (seconds)");
        results.programming = programming::measure(&settings.programming)?;
        show(&report::programming_table(&results.programming));
        heading("3. One endpoint change, event to maps, in process");
        show(&report::change_in_process_table(&results.programming));
    }
    if wants(Section::Change) {
        heading("3. One endpoint change through the daemon, confirmed by traffic");
        results.change = endpoint_change::measure(&settings.change)?;
        show(&report::change_daemon_table(&results.change));
    }
    if wants(Section::Memory) {
        heading("4. Daemon memory");
        results.memory = memory::measure(&settings.memory)?;
        show(&report::memory_table(&results.memory));
    }
    if wants(Section::Soak) {
        heading("4. Daemon memory under a stream of changes");
        let soak = soak::measure(&settings.soak)?;
        show(&report::soak_table(&soak));
        results.soak = Some(soak);
    }
    if wants(Section::Hostile) {
        heading("4. Hostile input: an unrelated change, and memory");
        results.hostile = hostile::measure(&settings.hostile)?;
        show(&report::hostile_table(&results.hostile));
    }
    if wants(Section::Xdp) {
        heading("5. NodePort through XDP, tc and iptables");
        results.xdp = xdp::measure(&settings.xdp)?;
        show(&report::xdp_packet_table(&results.xdp.packet));
        show(&report::xdp_requests_table(&results.xdp.requests));
    }
    let doc_path = cli.out_dir.join("benchmarks.md");
    let earlier = std::fs::read_to_string(&doc_path)
        .ok()
        .and_then(|doc| report::EarlierRun::parse(&doc));
    heading("Targets");
    show(&report::targets_table(&results, earlier.as_ref()));

    std::fs::create_dir_all(&cli.out_dir)
        .with_context(|| format!("creating {}", cli.out_dir.display()))?;
    let chart_file = "benchmarks.png";
    chart::draw(
        &cli.out_dir.join(chart_file),
        &results.packet,
        &results.connections,
    )?;
    let context = DocumentContext {
        machine: machine::describe(),
        settings: settings.describe(),
        elapsed: started.elapsed(),
        quick: cli.quick,
        chart_file: chart_file.to_owned(),
        earlier,
    };
    std::fs::write(&doc_path, report::document(&results, &context))
        .with_context(|| format!("writing {}", doc_path.display()))?;
    println!(
        "\nwrote {} and {} ({:.1} min)",
        doc_path.display(),
        cli.out_dir.join(chart_file).display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

fn heading(title: &str) {
    println!("\n== {title}\n");
}

fn show(table: &Table) {
    println!("{}", table.markdown());
}
