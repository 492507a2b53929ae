//! What the program and the kernel counted over a stretch of a test, so a lost packet
//! says where it was lost: the datapath's drop counters (`ebpf-proxy stats`) name a drop
//! by the program, the UDP counters of `/proc/net/snmp` in each namespace one by the
//! kernel (`NoPorts`: nothing listened, `InErrors`/`RcvbufErrors`: a full socket,
//! `InDatagrams`/`OutDatagrams`: where a datagram went missing).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::daemon::Daemon;
use crate::netns::Netns;

/// The counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// The datapath's counters by name, summed over CPUs.
    datapath: BTreeMap<String, u64>,
    /// Each namespace's `Udp:` counters, by the namespace's label.
    udp: Vec<(String, BTreeMap<String, u64>)>,
}

impl Counters {
    /// Reads the daemon's datapath counters and the UDP counters of `namespaces`
    /// (label, namespace).
    pub fn read(daemon: &Daemon, namespaces: &[(String, &Netns)]) -> Result<Self> {
        let text = daemon.cli(&["stats", "-o", "json"])?;
        let stats: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
        let datapath = (stats["counters"]
            .as_array()
            .context("stats counters")?
            .iter())
        .filter_map(|counter| {
            Some((
                counter["name"].as_str()?.to_owned(),
                counter["value"].as_u64()?,
            ))
        })
        .collect();
        let udp = namespaces
            .iter()
            .map(|(label, netns)| Ok((label.clone(), netns.udp_counters()?)))
            .collect::<Result<_>>()?;
        Ok(Self { datapath, udp })
    }

    /// What changed since `before`, one line per source, counters that did not move left
    /// out.
    pub fn since(&self, before: &Counters) -> String {
        let mut text = String::new();
        let moved = |now: &BTreeMap<String, u64>, then: Option<&BTreeMap<String, u64>>| {
            now.iter()
                .filter_map(|(name, value)| {
                    let was = then.and_then(|then| then.get(name)).copied().unwrap_or(0);
                    (*value != was).then(|| format!("{name} +{}", value.wrapping_sub(was)))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            text,
            "datapath: {}",
            moved(&self.datapath, Some(&before.datapath))
        );
        for (label, now) in &self.udp {
            let then =
                (before.udp.iter()).find_map(|(other, then)| (other == label).then_some(then));
            let _ = writeln!(text, "{label} Udp: {}", moved(now, then));
        }
        text
    }
}

impl Netns {
    /// This namespace's `Udp:` counters from `/proc/net/snmp` (read from a thread inside
    /// it: `/proc/thread-self/net` shows the thread's namespace, `/proc/self/net` the
    /// process's).
    pub fn udp_counters(&self) -> Result<BTreeMap<String, u64>> {
        let text = self
            .run(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))?
            .with_context(|| format!("reading /proc/net/snmp in {}", self.name()))?;
        parse_snmp(&text, "Udp")
    }
}

/// The counters of `protocol` in `/proc/net/snmp` text: a line of names, then a line of
/// values, both starting with `Protocol:`.
fn parse_snmp(text: &str, protocol: &str) -> Result<BTreeMap<String, u64>> {
    let prefix = format!("{protocol}:");
    let mut lines = text.lines().filter(|line| line.starts_with(&prefix));
    let (names, values) = lines
        .next()
        .zip(lines.next())
        .with_context(|| format!("no {protocol} lines in {text}"))?;
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(name, value)| {
            let value = value
                .parse()
                .with_context(|| format!("{protocol} {name} = {value:?}"))?;
            Ok((name.to_owned(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNMP: &str = "Icmp: InMsgs InErrors\nIcmp: 3 0\n\
        Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
        Udp: 100 1 2 99 2\nUdpLite: InDatagrams\nUdpLite: 0\n";

    #[test]
    fn udp_counters_are_read_by_name_and_their_changes_shown() {
        let udp = parse_snmp(SNMP, "Udp").unwrap();
        assert_eq!(udp["InDatagrams"], 100);
        assert_eq!(udp["RcvbufErrors"], 2);
        assert_eq!(udp.len(), 5);
        let before = Counters {
            datapath: [
                ("ct_create_failed".to_owned(), 0),
                ("new_flow".to_owned(), 5),
            ]
            .into(),
            udp: vec![("pod-1".to_owned(), udp.clone())],
        };
        let mut after = before.clone();
        after.datapath.insert("new_flow".to_owned(), 7);
        after.udp[0].1.insert("NoPorts".to_owned(), 3);
        assert_eq!(
            after.since(&before),
            "datapath: new_flow +2\npod-1 Udp: NoPorts +2\n"
        );
    }
}
