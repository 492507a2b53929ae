//! `trace`'s table output: the report as lines.

use std::fmt::Write as _;

use proxy_common::{Address, Ipv6};

use super::report::{BackendMatch, PacketView, TraceReport};
use crate::inspect::Endpoint;

pub fn render(report: &TraceReport) -> String {
    let mut out = String::new();
    writeln!(out, "packet      {}", describe(&report.packet)).unwrap();
    writeln!(out, "verdict     {}", report.verdict).unwrap();
    let device = report.device.as_deref().unwrap_or("lo");
    match &report.xdp {
        Some(xdp) => writeln!(out, "hook        {}", xdp.describe(device)).unwrap(),
        None => writeln!(out, "hook        tc (arriving on {device})").unwrap(),
    }
    writeln!(out, "path        {} ({})", report.path, report.explanation).unwrap();
    write_decision(&mut out, &report.decided_by, report.backend.as_ref());
    if let Some(output) = &report.output {
        let label = if *output == report.packet {
            "unchanged"
        } else {
            "rewritten"
        };
        writeln!(out, "{label:<11} {}", describe(output)).unwrap();
    }
    if let Some(answer) = &report.answer {
        let mtu = answer
            .mtu
            .map(|mtu| format!(" (MTU {mtu})"))
            .unwrap_or_default();
        writeln!(
            out,
            "answered    {} {}{mtu} {} → {}, quoting the packet as it came",
            icmp_name(report.packet.family),
            answer.kind,
            answer.from,
            answer.to
        )
        .unwrap();
    }
    if report.routes_reply {
        writeln!(
            out,
            "then        routed by the program itself (FIB lookup and redirect: its source \
             became a node address)"
        )
        .unwrap();
    }
    out.push_str("dry run     nothing was written: no conntrack entry, no counter");
    if report
        .selection
        .as_ref()
        .is_some_and(|selection| selection.of > 1 && selection.chosen_by == "random")
    {
        out.push_str("\n            (the slot is random: another run may pick another backend)");
    }
    out
}

/// One line for a packet: `udp 198.18.0.10:40000 → 198.19.0.10:53 (first fragment, id 7,
/// 1500 bytes)`, or for an ICMP error `icmp port-unreachable from 198.18.1.10 about udp …`.
fn describe(view: &PacketView) -> String {
    let mut notes = Vec::new();
    if let Some(flags) = &view.tcp_flags {
        notes.push(flags.clone());
    }
    if let Some(chunk) = view.sctp_chunk {
        notes.push(chunk.to_owned());
    }
    if let Some(part) = view.fragment {
        notes.push(format!("{part} fragment, id {}", view.ip_id));
    }
    notes.push(format!("{} bytes, TTL {}", view.length, view.ttl));
    // A later fragment carries no ports: only its addresses are its own.
    let packet = if view.fragment == Some("later") {
        format!(
            "{} {} → {} ({})",
            view.protocol,
            view.source.address,
            view.destination.address,
            notes.join(", ")
        )
    } else {
        format!(
            "{} {} → {} ({})",
            view.protocol,
            view.source,
            view.destination,
            notes.join(", ")
        )
    };
    match &view.icmp_error {
        None => packet,
        Some(error) => {
            let mtu = error
                .mtu
                .map(|mtu| format!(" (MTU {mtu})"))
                .unwrap_or_default();
            format!(
                "{} {}{mtu} from {} about {packet}",
                icmp_name(view.family),
                error.kind,
                error.from
            )
        }
    }
}

/// `icmp`, or `icmpv6` for the errors of an IPv6 packet.
fn icmp_name(family: &str) -> &'static str {
    if family == Ipv6::NAME {
        "icmpv6"
    } else {
        "icmp"
    }
}

/// The `decided by` lines (the map entries read) and the chosen backend, as `trace` and
/// `trace --connect` print them.
pub(in crate::inspect) fn write_decision(
    out: &mut String,
    decided_by: &[String],
    backend: Option<&BackendMatch>,
) {
    for (index, entry) in decided_by.iter().enumerate() {
        let label = if index == 0 { "decided by" } else { "" };
        writeln!(out, "{label:<11} {entry}").unwrap();
    }
    if let Some(backend) = backend {
        let endpoint = Endpoint {
            address: backend.address,
            port: backend.port,
        };
        writeln!(out, "backend     {endpoint} (id {})", backend.id).unwrap();
    }
}
