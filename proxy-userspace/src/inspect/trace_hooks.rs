//! Which hooks `trace` runs a packet through, and as arriving on which device: on a node
//! whose external devices run the XDP program (`--xdp`), a packet from outside meets it
//! first, and the tc program only when XDP left the packet to tc. The device matters to
//! both: their routes and their SNAT decision start from it.

use std::ffi::CString;
use std::path::Path;

use anyhow::{Result, bail};
use proxy_common::{TraceRecord, to_tc};
use serde::Serialize;

use crate::xdp::{XDP_DROP, XDP_PASS, XDP_REDIRECT, XDP_TX, XdpRun};

/// `trace --hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// XDP first when the node's external devices run it (or `--device` names one that
    /// does), then tc if XDP leaves the packet to it; tc alone otherwise.
    Auto,
    /// The XDP program alone.
    Xdp,
    /// The tc program alone.
    Tc,
}

/// The device a traced packet arrives on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub name: String,
    pub ifindex: u32,
    /// How the XDP program is attached to it (`native`, `generic`), if it is.
    pub xdp: Option<String>,
}

/// An XDP link pin, `xdp-<mode>-<ifindex>-<ifname>` (see `crate::xdp::link_pin_name`).
fn parse_pin(name: &str) -> Option<(String, u32, String)> {
    let mut parts = name.strip_prefix("xdp-")?.splitn(3, '-');
    let mode = parts.next()?.to_owned();
    let ifindex = parts.next()?.parse().ok()?;
    Some((mode, ifindex, parts.next()?.to_owned()))
}

/// The XDP links pinned under `root/links`: (mode, ifindex, ifname), by ifindex.
fn xdp_pins(root: &Path) -> Vec<(String, u32, String)> {
    let Ok(entries) = std::fs::read_dir(root.join("links")) else {
        return Vec::new();
    };
    let mut pins: Vec<_> = entries
        .filter_map(|entry| parse_pin(&entry.ok()?.file_name().to_string_lossy()))
        .collect();
    pins.sort_by_key(|(_, ifindex, _)| *ifindex);
    pins
}

/// The index of `name` in this process's network namespace.
fn ifindex_here(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid C string; the lookup happens in this process's namespace.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The arrival device: `device` if given, else the first device the daemon attached the
/// XDP program to (by its pins), else none (the test run's loopback). A pinned device must
/// have the pinned index here: the CLI must run in the node's network namespace.
pub fn arrival(root: &Path, device: Option<&str>) -> Result<Option<Arrival>> {
    let pins = xdp_pins(root);
    let Some(name) = device.or_else(|| pins.first().map(|(_, _, name)| name.as_str())) else {
        return Ok(None);
    };
    let Some(ifindex) = ifindex_here(name) else {
        bail!(
            "no device {name} here: run trace in the node's network namespace, or name another with --device"
        );
    };
    let pinned = pins.iter().find(|(_, _, pinned)| pinned == name);
    if let Some((_, pinned_index, _)) = pinned
        && *pinned_index != ifindex
    {
        bail!(
            "the daemon's pins name {name} as ifindex {pinned_index}, but here it is \
             {ifindex}: run trace in the node's network namespace"
        );
    }
    Ok(Some(Arrival {
        name: name.to_owned(),
        ifindex,
        xdp: pinned.map(|(mode, _, _)| mode.clone()),
    }))
}

/// What the XDP program did with the packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct XdpView {
    /// `pass` (into the stack, decided: tc lets it through), `tx` (back out of its device),
    /// `redirect` (out of another device running XDP natively), `drop`, or `to-tc` (left
    /// untouched to tc).
    pub action: &'static str,
    /// Why XDP left the packet to tc (`not-handled`, `answer`, `no-neighbour`,
    /// `other-device`, `no-route`, `reselect`, `fragment`, `icmp`, `no-metadata`); null
    /// when it decided.
    pub left_to_tc: Option<&'static str>,
}

impl XdpView {
    /// From a dry run arriving on `ingress`. The dry run routes nothing, so a packet it
    /// would send itself returns XDP_PASS; its record names the egress device.
    pub fn of(run: &XdpRun, record: &TraceRecord, ingress: u32) -> Self {
        let left_to_tc = match record.to_tc {
            to_tc::NO => None,
            to_tc::NOT_HANDLED => Some("not-handled"),
            to_tc::ANSWER => Some("answer"),
            to_tc::NO_NEIGHBOUR => Some("no-neighbour"),
            to_tc::OTHER_DEVICE => Some("other-device"),
            to_tc::NO_ROUTE => Some("no-route"),
            to_tc::RESELECT => Some("reselect"),
            to_tc::FRAGMENT => Some("fragment"),
            to_tc::ICMP => Some("icmp"),
            _ => Some("no-metadata"),
        };
        let action = match run.action {
            _ if left_to_tc.is_some() || (run.action == XDP_PASS && !run.decided) => "to-tc",
            XDP_PASS if record.routes_reply != 0 && record.egress_ifindex == ingress => "tx",
            XDP_PASS if record.routes_reply != 0 => "redirect",
            XDP_PASS => "pass",
            XDP_TX => "tx",
            XDP_REDIRECT => "redirect",
            XDP_DROP => "drop",
            _ => "aborted",
        };
        Self { action, left_to_tc }
    }

    /// Whether tc takes the packet on.
    pub fn left_to_tc(&self) -> bool {
        self.action == "to-tc"
    }

    /// The trace's verdict in tc's words.
    pub fn verdict(&self) -> &'static str {
        match self.action {
            "pass" | "to-tc" => "accept",
            "tx" | "redirect" => "redirect",
            _ => "drop",
        }
    }

    /// One line for the table view.
    pub fn describe(&self, device: &str) -> String {
        match (self.action, self.left_to_tc) {
            ("pass", _) => "XDP decided: into the stack, tc lets it through".to_owned(),
            ("tx", _) => format!("XDP decided: sent back out of {device} (XDP_TX)"),
            ("redirect", _) => "XDP decided: redirected out of another XDP device".to_owned(),
            ("drop", _) => "XDP decided: dropped".to_owned(),
            (_, Some(reason)) => format!("tc: XDP on {device} left it untouched ({})", why(reason)),
            _ => format!("XDP returned {}", self.action),
        }
    }
}

fn why(reason: &str) -> &'static str {
    match reason {
        "not-handled" => "not IPv4 TCP/UDP/SCTP",
        "answer" => "an ICMP error goes back in its place, which tc builds",
        "no-neighbour" => "the next hop's MAC is not known yet; tc resolves it",
        "other-device" => "it leaves by a device without native XDP",
        "no-route" => "no route; tc hands it to the kernel",
        "reselect" => "its flow must choose a backend again; tc retires the entry",
        "fragment" => "an IP fragment; tc takes the whole datagram",
        "icmp" => "an ICMP message; tc translates errors about tracked flows",
        _ => "the driver keeps no XDP metadata",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_name_mode_index_and_device() {
        assert_eq!(
            parse_pin("xdp-native-2-eth0"),
            Some(("native".into(), 2, "eth0".into()))
        );
        assert_eq!(
            parse_pin("xdp-generic-14-br-ex"),
            Some(("generic".into(), 14, "br-ex".into()))
        );
        assert_eq!(parse_pin("2-eth0"), None);
        assert_eq!(parse_pin("xdp-native-x-eth0"), None);
    }

    #[test]
    fn the_dry_runs_pass_of_a_packet_it_routes_is_the_live_programs_tx() {
        let run = |action, decided| XdpRun {
            action,
            decided,
            frame: Vec::new(),
        };
        let routed = |egress| TraceRecord {
            routes_reply: 1,
            egress_ifindex: egress,
            ..TraceRecord::default()
        };
        assert_eq!(
            XdpView::of(&run(XDP_PASS, true), &routed(2), 2).action,
            "tx"
        );
        assert_eq!(
            XdpView::of(&run(XDP_PASS, true), &routed(3), 2).action,
            "redirect"
        );
        let plain = TraceRecord::default();
        assert_eq!(XdpView::of(&run(XDP_PASS, true), &plain, 2).action, "pass");
        let left = TraceRecord {
            to_tc: to_tc::ANSWER,
            ..TraceRecord::default()
        };
        let view = XdpView::of(&run(XDP_PASS, false), &left, 2);
        assert_eq!((view.action, view.left_to_tc), ("to-tc", Some("answer")));
        assert!(view.left_to_tc());
        assert_eq!(
            XdpView::of(&run(XDP_DROP, false), &plain, 2).verdict(),
            "drop"
        );
    }
}
