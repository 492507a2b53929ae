//! The map lookups that decided, read from a dry run's TRACE record: the conntrack entry,
//! the frontend, the slot or the client's remembered backend, a fragment's record, an
//! answer the program sent, each with the `decided by` line naming the entry.

use std::fmt::Write as _;

use proxy_common::{
    Address, BackendSet, FlowState, FragmentValue, FrontendKey, Ipv6, Origin, TraceRecord,
    ct_flags, ct_state, fragment_verdict, maglev, map_names, stat, trace_answer, trace_ct,
    trace_fragment, trace_origin, trace_table,
};

use super::report::{
    AnswerView, BackendMatch, FlowMatch, FragmentMatch, FragmentRecord, FrontendMatch, Selection,
    TraceReport, TupleView, explanation, icmp_kind_name, verdict,
};
use super::{PacketView, TracePacket};
use crate::conntrack::CtTable;
use crate::inspect::{Endpoint, frontend_label, kind_name, protocol_name};

/// What a new connection's lookups decided: the frontend, the slot or the client's
/// remembered backend, and the backend.
pub(in crate::inspect) struct Decision {
    pub frontend: Option<FrontendMatch>,
    pub selection: Option<Selection>,
    pub backend: Option<BackendMatch>,
}

/// The frontend, selection and backend of a dry run's `record` (`affinity_key` names the
/// affinity entry that kept a backend), with the map entries they came from appended to
/// `decided_by`.
pub(in crate::inspect) fn decision<A: Address>(
    record: &TraceRecord,
    frontend_name: Option<String>,
    affinity_key: &str,
    decided_by: &mut Vec<String>,
) -> Decision {
    let header = &record.service;
    let traced = A::traced(record);
    let slots = A::MAPS.backend_slots;
    let frontend = (traced.frontend != FrontendKey::default()).then(|| {
        let key = &traced.frontend;
        let endpoint = Endpoint::from_wire(key.addr, key.port);
        let own = header.backends_for(Origin::Outside);
        let pods = header.backends_for(Origin::Pod);
        let mut line = format!(
            "{}[{}] = {} {}, rev_nat_id {}, {}",
            A::MAPS.services,
            frontend_label(key),
            kind_name(header.flags),
            frontend_name.as_deref().unwrap_or("(unnamed)"),
            header.rev_nat_id,
            slice_text(slots, &own),
        );
        if pods.cluster {
            write!(line, ", pods and the node: {}", slice_text(slots, &pods)).unwrap();
        }
        decided_by.push(line);
        FrontendMatch {
            address: endpoint.address,
            port: endpoint.port,
            protocol: protocol_name(key.proto),
            kind: kind_name(header.flags),
            service: frontend_name,
            rev_nat_id: header.rev_nat_id,
            backend_count: header.count,
            pod_backend_count: pods.cluster.then_some(pods.count),
        }
    });
    match record.origin {
        trace_origin::POD => decided_by.push(
            "DEVICES[arrival device] = a pod's: its new connections use the Service port's \
             Cluster endpoints (kube-proxy's \"pod traffic for external destinations\")"
                .to_owned(),
        ),
        trace_origin::OUTSIDE => decided_by.push(
            "DEVICES[arrival device] = not a pod's: the frontend's own (Local) endpoints"
                .to_owned(),
        ),
        _ => {}
    }
    let set = header.backends_for(if record.cluster_set != 0 {
        Origin::Pod
    } else {
        Origin::Outside
    });
    let selection = (record.slot != 0).then(|| {
        let index = set.first + u32::from(record.slot) - 1;
        let endpoint = Endpoint::from_wire(traced.backend.addr, traced.backend.port);
        let chosen = match maglev::table_size(header.maglev).filter(|_| record.maglev != 0) {
            Some(size) => format!(
                "given by the frontend's Maglev table of {size} positions for the client's \
                 address, port and protocol"
            ),
            None => "chosen at random".to_owned(),
        };
        decided_by.push(format!(
            "{slots}[{index}] = backend {}, {endpoint} (slot {} of {}, {chosen})",
            record.backend_id, record.slot, set.count
        ));
        Selection {
            slot: record.slot,
            of: set.count,
            index,
            set: if set.cluster { "cluster" } else { "frontend" },
            chosen_by: if record.maglev != 0 {
                "maglev"
            } else {
                "random"
            },
        }
    });
    let backend = (selection.is_some() || record.affinity != 0).then(|| {
        let endpoint = Endpoint::from_wire(traced.backend.addr, traced.backend.port);
        if record.affinity != 0 {
            let set_name = if set.cluster {
                "Cluster set's"
            } else {
                "frontend's"
            };
            decided_by.push(format!(
                "{affinity_key} = backend {}, {endpoint} (session affinity: the client's \
                 backend on this Service port, still one of the {set_name})",
                record.backend_id
            ));
        }
        BackendMatch {
            id: record.backend_id,
            address: endpoint.address,
            port: endpoint.port,
        }
    });
    Decision {
        frontend,
        selection,
        backend,
    }
}

/// `3 backends at BACKEND_SLOTS[12..15]`, `no backends` (`slots`: the family's
/// BACKEND_SLOTS).
fn slice_text(slots: &str, set: &BackendSet) -> String {
    let end = set.first + u32::from(set.count);
    match set.count {
        0 => "no backends".to_owned(),
        1 => format!("1 backend at {slots}[{}..{end}]", set.first),
        n => format!("{n} backends at {slots}[{}..{end}]", set.first),
    }
}

/// The report for one run of a packet of the family of `A`: pure, from the packet, the
/// program's verdict and output, and its record (read in the family's place).
pub(super) fn report_of<A: Address>(
    packet: &TracePacket,
    return_code: u32,
    output: &[u8],
    record: &TraceRecord,
    frontend_name: Option<String>,
    flow_name: Option<String>,
) -> TraceReport {
    let traced = A::traced(record);
    let mut decided_by = Vec::new();
    if let Some(error) = &packet.icmp_error {
        let (kind, _) = icmp_kind_name(error.kind);
        decided_by.push(format!(
            "ICMP {kind} about {} {} → {}: the quoted packet's flow decides (its entry for \
             the error's direction is keyed by the quote reversed)",
            protocol_name(packet.protocol),
            packet.source,
            packet.destination
        ));
    }
    let conntrack = (record.conntrack != trace_ct::NONE).then(|| {
        let flow = &traced.flow;
        let direction = match record.conntrack {
            trace_ct::REPLY => "reply",
            trace_ct::FORWARD => "forward",
            trace_ct::BACKEND_LEFT => "backend-left",
            _ => "closing-reused",
        };
        let entry = if flow.is_reply() { "reply" } else { "forward" };
        let nat = if flow.is_reply() {
            Endpoint::from_wire(flow.to.src_addr, flow.to.src_port)
        } else {
            Endpoint::from_wire(flow.to.dst_addr, flow.to.dst_port)
        };
        let direct = flow.flags & ct_flags::DIRECT != 0;
        let outcome = match record.conntrack {
            _ if direct => "a direct flow to a backend: nothing to translate".to_owned(),
            trace_ct::REPLY => format!("source becomes the frontend {nat}"),
            trace_ct::FORWARD => format!("backend {} ({nat})", flow.backend_id),
            trace_ct::BACKEND_LEFT => format!(
                "backend {} ({nat}) no longer serves the frontend: selected anew",
                flow.backend_id
            ),
            _ => format!(
                "backend {} ({nat}), closing, and the packet is a SYN: selected anew",
                flow.backend_id
            ),
        };
        let (table, map) = if record.table == trace_table::ASSURED {
            ("assured", CtTable::Assured.map_name_of::<A>())
        } else {
            ("pending", CtTable::Pending.map_name_of::<A>())
        };
        let flow_state = FlowState::of(packet.protocol, flow.state).name();
        // The packet's own tuple is the key, in either direction; an ICMP error's, the
        // quoted packet's reversed.
        let (from, to) = if packet.icmp_error.is_some() {
            (packet.destination, packet.source)
        } else {
            (packet.source, packet.destination)
        };
        decided_by.push(format!(
            "{map}[{} {from} → {to} {entry}, {flow_state}] = {outcome}",
            protocol_name(packet.protocol),
        ));
        FlowMatch {
            direction,
            table,
            kind: if direct { "direct" } else { "service" },
            flow_state,
            rev_nat_id: flow.rev_nat_id,
            service: flow_name,
            backend_id: flow.backend_id,
            nat,
            rewrites_to: TupleView {
                protocol: protocol_name(packet.protocol),
                source: Endpoint::from_wire(flow.to.src_addr, flow.to.src_port),
                destination: Endpoint::from_wire(flow.to.dst_addr, flow.to.dst_port),
                tcp_flags: None,
            },
            closing: flow.state & ct_state::CLOSING != 0,
            packets: flow.packets,
            bytes: flow.bytes,
        }
    });
    let affinity = if A::BITS == 32 {
        map_names::AFFINITY
    } else {
        map_names::AFFINITY6
    };
    let affinity_key = format!(
        "{affinity}[{} service port {}]",
        packet.source.address, record.service.service_port_id
    );
    let origin = match record.origin {
        trace_origin::POD => Some("pod"),
        trace_origin::OUTSIDE => Some("outside"),
        _ => None,
    };
    let Decision {
        frontend,
        selection,
        backend,
    } = decision::<A>(record, frontend_name, &affinity_key, &mut decided_by);
    let backend = if backend.is_some() {
        backend
    } else if record.conntrack == trace_ct::FORWARD && traced.flow.flags & ct_flags::DIRECT == 0 {
        let endpoint = Endpoint::from_wire(traced.flow.to.dst_addr, traced.flow.to.dst_port);
        Some(BackendMatch {
            id: record.backend_id,
            address: endpoint.address,
            port: endpoint.port,
        })
    } else {
        None
    };
    let fragment = fragment_match(packet, record, &mut decided_by);
    let answer = if packet.icmp_error.is_none() {
        AnswerView::parse(output)
    } else {
        None
    };
    if let Some(answer) = &answer {
        match record.answered {
            trace_answer::FRAG_NEEDED => decided_by.push(format!(
                "FIB: the route for the translated packet leaves by a device of MTU {} < \
                 {} bytes, and the packet may not be fragmented here: answered from {}",
                record.mtu,
                packet.frame().len() - 14,
                answer.from
            )),
            trace_answer::TIME_EXCEEDED => decided_by.push(format!(
                "TTL {}: it would run out at this hop: answered from {}",
                packet.ttl, answer.from
            )),
            _ => {}
        }
    }
    if decided_by.is_empty() {
        decided_by.push(match u32::from(record.outcome) {
            stat::NOT_HANDLED => "no map: the parser let the packet through".to_owned(),
            _ => format!(
                "no {} entry for the tuple, no {} entry for {}/{}",
                CtTable::Assured.map_name_of::<A>(),
                A::MAPS.services,
                packet.destination,
                protocol_name(packet.protocol)
            ),
        });
    }
    let path = u32::from(record.outcome);
    TraceReport {
        packet: packet.into(),
        verdict: verdict(return_code),
        return_code,
        path: stat::NAMES
            .get(usize::from(record.outcome))
            .copied()
            .unwrap_or("?"),
        explanation: explanation(path),
        conntrack,
        frontend,
        origin,
        selection,
        backend,
        fragment,
        output: match answer {
            Some(_) => None,
            None => TracePacket::parse_as(output, packet)
                .as_ref()
                .map(PacketView::from),
        },
        answer,
        routes_reply: record.routes_reply != 0,
        decided_by,
        hook: "tc",
        device: None,
        xdp: None,
    }
}

/// A fragment's datagram and its FRAGMENTS (IPv6: FRAGMENTS6) record, with the line that
/// explains it.
fn fragment_match(
    packet: &TracePacket,
    record: &TraceRecord,
    decided_by: &mut Vec<String>,
) -> Option<FragmentMatch> {
    let part = match record.fragment {
        trace_fragment::FIRST => "first",
        trace_fragment::LATER => "later",
        _ => return None,
    };
    let key = format!(
        "{}[{} {} → {} id {}]",
        if packet.is_ipv6() {
            map_names::FRAGMENTS6
        } else {
            map_names::FRAGMENTS
        },
        protocol_name(packet.protocol),
        packet.source.address,
        packet.destination.address,
        packet.ip_id
    );
    let found = record.fragment == trace_fragment::FIRST || record.fragment_found != 0;
    let fragment_record = found.then(|| {
        if packet.is_ipv6() {
            fragment_record(Ipv6::traced_fragment(record))
        } else {
            fragment_record(u32::traced_fragment(record))
        }
    });
    let said = match &fragment_record {
        None => "none: its first fragment has not passed here (or came later, or its \
                 record expired or was evicted)"
            .to_owned(),
        Some(value) if value.verdict == "drop" => {
            "drop (its first fragment was dropped or answered with an ICMP error)".to_owned()
        }
        Some(value) => format!(
            "forward as {} → {}{}",
            value.source,
            value.destination,
            if value.routes_itself {
                ", routed by the program"
            } else {
                ""
            }
        ),
    };
    decided_by.push(match part {
        "first" => format!(
            "{key} ← {said} (what the live program records for the later fragments; the \
             dry run writes nothing)"
        ),
        _ => format!("{key} = {said}"),
    });
    Some(FragmentMatch {
        part,
        source: packet.source.address,
        destination: packet.destination.address,
        ip_id: packet.ip_id,
        record: fragment_record,
    })
}

/// A FRAGMENTS (FRAGMENTS6) record as the report shows it.
fn fragment_record<A: Address>(value: &FragmentValue<A>) -> FragmentRecord {
    FragmentRecord {
        verdict: if value.verdict == fragment_verdict::DROP {
            "drop"
        } else {
            "forward"
        },
        source: value.to.src_addr.to_ip(),
        destination: value.to.dst_addr.to_ip(),
        routes_itself: value.routes_itself != 0,
    }
}
