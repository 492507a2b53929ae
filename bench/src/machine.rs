//! The machine the figures were taken on, for docs/benchmarks.md.

use std::process::Command;

use crate::netfilter::Netfilter;

/// (what, value) pairs: date, CPU, cores, memory, kernel, tool versions.
pub fn describe() -> Vec<(String, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown".to_owned(), |(_, model)| model.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
        .map_or("unknown".to_owned(), |kib| {
            format!("{:.1} GiB", kib / 1024.0 / 1024.0)
        });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".to_owned(), |release| release.trim().to_owned());
    [
        (
            "date",
            command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
        ("CPU", cpu),
        ("cores (nproc)", cores.to_string()),
        ("memory", memory),
        ("kernel", kernel),
        ("iptables", Netfilter::Iptables.version()),
        ("nft", Netfilter::Nftables.version()),
    ]
    .into_iter()
    .map(|(what, value)| (what.to_owned(), value))
    .collect()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map_or("unknown".to_owned(), |output| {
            String::from_utf8_lossy(&output.stdout).trim().to_owned()
        })
}
