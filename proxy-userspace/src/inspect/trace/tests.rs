use std::net::IpAddr;

use proxy_common::{
    Address, Backend, CtValue, FragmentValue, FrontendKey, FrontendValue, Ipv6, TraceRecord, Tuple,
    ct_flags, maglev, proto, service_flags, stat, tcp_flags, trace_answer, trace_ct,
    trace_fragment, trace_table,
};

use super::lookups::report_of;
use super::{Destination, Fragment, IcmpError, IcmpKind, TracePacket, TraceReport, render};
use crate::inspect::Endpoint;

pub(in crate::inspect) fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        address: IpAddr::from(address),
        port,
    }
}

pub(in crate::inspect) fn endpoint6(address: &str, port: u16) -> Endpoint {
    Endpoint {
        address: address.parse().unwrap(),
        port,
    }
}

/// [`report_of`] in the packet's family, the frontend named `frontend_name`.
fn report(
    packet: &TracePacket,
    return_code: u32,
    output: &[u8],
    record: &TraceRecord,
    frontend_name: Option<&str>,
) -> TraceReport {
    type ReportOf =
        fn(&TracePacket, u32, &[u8], &TraceRecord, Option<String>, Option<String>) -> TraceReport;
    let report_of: ReportOf = if packet.is_ipv6() {
        report_of::<Ipv6>
    } else {
        report_of::<u32>
    };
    let frontend_name = frontend_name.map(str::to_owned);
    report_of(packet, return_code, output, record, frontend_name, None)
}

/// An address as the maps hold it, in the family of `A`.
fn wire<A: Address>(address: &str) -> A {
    A::from_ip(address.parse().unwrap()).unwrap()
}

/// A run's record on its CPU, the program's path `outcome`, nothing else found.
pub(in crate::inspect) fn recorded(outcome: u32) -> TraceRecord {
    TraceRecord {
        recorded: 1,
        outcome: outcome as u8,
        ..TraceRecord::default()
    }
}

/// The record of a new TCP flow to `frontend` (header `service`) given `(slot, backend
/// id, backend)`, in the frontend's family.
pub(in crate::inspect) fn new_flow_record(
    (slot, backend_id, backend): (u16, u32, Endpoint),
    frontend: Endpoint,
    service: FrontendValue,
) -> TraceRecord {
    fn place<A: Address>(record: &mut TraceRecord, backend: Endpoint, frontend: Endpoint) {
        let address = |endpoint: Endpoint| wire::<A>(&endpoint.address.to_string());
        let traced = A::traced_mut(record);
        traced.backend = Backend {
            addr: address(backend),
            port: backend.port.to_be(),
            proto: proto::TCP,
            _pad: 0,
        };
        traced.frontend = FrontendKey {
            addr: address(frontend),
            port: frontend.port.to_be(),
            proto: proto::TCP,
            _pad: 0,
        };
    }
    let mut record = TraceRecord {
        slot,
        backend_id,
        service,
        ..recorded(stat::NEW_FLOW)
    };
    if frontend.address.is_ipv6() {
        place::<Ipv6>(&mut record, backend, frontend);
    } else {
        place::<u32>(&mut record, backend, frontend);
    }
    record
}

/// A reply entry of the family of `A` rewriting to `source → destination`.
fn reply_entry<A: Address>(source: Endpoint, destination: Endpoint) -> CtValue<A> {
    let address = |endpoint: Endpoint| wire::<A>(&endpoint.address.to_string());
    CtValue {
        to: Tuple {
            src_addr: address(source),
            dst_addr: address(destination),
            src_port: source.port.to_be(),
            dst_port: destination.port.to_be(),
        },
        flags: ct_flags::REPLY,
        ..Default::default()
    }
}

/// A ClusterIP header with `count` backends from BACKEND_SLOTS[`base`].
pub(in crate::inspect) fn cluster_ip(rev_nat_id: u32, base: u32, count: u16) -> FrontendValue {
    FrontendValue {
        rev_nat_id,
        base,
        count,
        flags: service_flags::CLUSTER_IP,
        ..FrontendValue::default()
    }
}

#[test]
fn destinations_parse_with_a_default_protocol_and_ipv6_in_brackets() {
    for (text, expected) in [
        (
            "198.19.0.10:53/udp",
            (endpoint([198, 19, 0, 10], 53), proto::UDP),
        ),
        (
            "198.19.0.10:80",
            (endpoint([198, 19, 0, 10], 80), proto::TCP),
        ),
        (
            "198.19.0.10:3868/sctp",
            (endpoint([198, 19, 0, 10], 3868), proto::SCTP),
        ),
        (
            "[2001:db8:ff::10]:53/udp",
            (endpoint6("2001:db8:ff::10", 53), proto::UDP),
        ),
    ] {
        let destination: Destination = text.parse().unwrap();
        assert_eq!(
            (destination.endpoint, destination.protocol),
            expected,
            "{text}"
        );
    }
    for text in [
        "198.19.0.10/tcp",
        "198.19.0.10:80/quic",
        "[2001:db8:ff::10]/udp",
        "2001:db8:ff::10",
    ] {
        assert!(text.parse::<Destination>().is_err(), "{text}");
    }
}

#[test]
fn a_new_flow_report_names_every_entry_that_decided_from_its_familys_maps() {
    for (client, frontend, backend, name, decided_by, rewritten) in [
        (
            endpoint([198, 18, 1, 14], 40000),
            endpoint([198, 19, 0, 10], 80),
            endpoint([198, 18, 1, 12], 8080),
            "default/echo:tcp-80",
            [
                "SERVICES[198.19.0.10:80/tcp] = ClusterIP default/echo:tcp-80, rev_nat_id 1, \
                 3 backends at BACKEND_SLOTS[12..15]",
                "BACKEND_SLOTS[13] = backend 5, 198.18.1.12:8080 (slot 2 of 3, chosen at \
                 random)",
            ],
            "rewritten   tcp 198.18.1.14:40000 → 198.18.1.12:8080",
        ),
        (
            endpoint6("2001:db8:1::14", 40000),
            endpoint6("2001:db8:ff::10", 80),
            endpoint6("2001:db8:1::12", 8080),
            "default/web6:http",
            [
                "SERVICES6[[2001:db8:ff::10]:80/tcp] = ClusterIP default/web6:http, \
                 rev_nat_id 1, 3 backends at BACKEND_SLOTS6[12..15]",
                "BACKEND_SLOTS6[13] = backend 5, [2001:db8:1::12]:8080 (slot 2 of 3, chosen \
                 at random)",
            ],
            "rewritten   tcp [2001:db8:1::14]:40000 → [2001:db8:1::12]:8080",
        ),
    ] {
        let packet = TracePacket::opening(proto::TCP, client, frontend);
        let record = new_flow_record((2, 5, backend), frontend, cluster_ip(1, 12, 3));
        let output = TracePacket {
            destination: backend,
            ..packet
        };
        let report = report(&packet, 0, &output.frame(), &record, Some(name));
        assert_eq!(
            (report.verdict.as_str(), report.path),
            ("accept", "new_flow")
        );
        assert_eq!(report.decided_by, decided_by);
        let json = serde_json::to_value(&report).unwrap();
        let family = if client.address.is_ipv6() {
            "IPv6"
        } else {
            "IPv4"
        };
        assert_eq!(json["packet"]["family"], family);
        assert_eq!(json["frontend"]["address"], frontend.address.to_string());
        assert_eq!(json["backend"]["address"], backend.address.to_string());
        assert_eq!(json["selection"]["of"], 3);
        assert_eq!(json["selection"]["index"], 13);
        assert_eq!(json["selection"]["set"], "frontend");
        assert_eq!(json["selection"]["chosen_by"], "random");
        assert_eq!(json["origin"], serde_json::Value::Null);
        assert_eq!(json["conntrack"], serde_json::Value::Null);
        assert_eq!(
            json["output"]["destination"]["address"],
            backend.address.to_string()
        );
        assert_eq!(json["output"]["destination"]["port"], 8080);
        let text = render(&report);
        assert!(text.contains(rewritten), "{text}");
    }
}

#[test]
fn a_maglev_choice_names_the_table_and_is_not_called_random() {
    let packet = TracePacket::opening(
        proto::TCP,
        endpoint([203, 0, 113, 7], 40000),
        endpoint([198, 18, 0, 1], 30080),
    );
    let record = TraceRecord {
        maglev: 1,
        ..new_flow_record(
            (3, 7, endpoint([198, 18, 2, 12], 8080)),
            endpoint([198, 18, 0, 1], 30080),
            FrontendValue {
                flags: service_flags::NODE_PORT,
                maglev: maglev::header_value(maglev::DEFAULT_TABLE_SIZE).unwrap(),
                ..cluster_ip(2, 20, 4)
            },
        )
    };
    let report = report(&packet, 0, &packet.frame(), &record, None);
    assert_eq!(
        report.decided_by[1],
        "BACKEND_SLOTS[22] = backend 7, 198.18.2.12:8080 (slot 3 of 4, given by the \
         frontend's Maglev table of 16381 positions for the client's address, port and \
         protocol)"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["selection"]["chosen_by"], "maglev");
    assert!(!render(&report).contains("random"), "{}", render(&report));
}

#[test]
fn a_passing_packet_says_what_was_missing() {
    let packet = TracePacket {
        tcp_flags: 0,
        ..TracePacket::opening(
            proto::UDP,
            endpoint([198, 18, 1, 14], 40000),
            endpoint([198, 18, 5, 5], 53),
        )
    };
    let report = report(&packet, 0, &packet.frame(), &recorded(stat::PASS), None);
    assert_eq!(report.path, "pass");
    assert!(report.frontend.is_none() && report.backend.is_none());
    assert_eq!(
        report.decided_by,
        ["no CONNTRACK entry for the tuple, no SERVICES entry for 198.18.5.5:53/udp"]
    );
}

/// The report of a later UDP fragment from `source` to `destination` (id 4660) whose
/// datagram's record, in the family of `A`, forwards it to `backend`.
fn later_fragment_report<A: Address>(
    source: Endpoint,
    destination: Endpoint,
    backend: Endpoint,
) -> TraceReport {
    let packet = TracePacket {
        fragment: Fragment::Later,
        ip_id: 4660,
        ..TracePacket::opening(proto::UDP, source, destination)
    };
    let mut record = TraceRecord {
        fragment: trace_fragment::LATER,
        fragment_found: 1,
        ..recorded(stat::FRAGMENT)
    };
    *A::traced_fragment_mut(&mut record) = FragmentValue {
        to: Tuple {
            src_addr: A::from_ip(source.address).unwrap(),
            dst_addr: A::from_ip(backend.address).unwrap(),
            src_port: 0,
            dst_port: 0,
        },
        ..Default::default()
    };
    let output = TracePacket {
        destination: backend,
        ..packet
    };
    report(&packet, 0, &output.frame(), &record, None)
}

#[test]
fn a_later_fragment_shows_its_datagrams_record_and_no_ports() {
    // IPv4's record in FRAGMENTS, IPv6's in FRAGMENTS6 (the later fragment behind its
    // fragment header: 40 + 8 + 8 bytes).
    let cases = [
        (
            later_fragment_report::<u32>(
                endpoint([198, 18, 1, 14], 35676),
                endpoint([198, 19, 0, 10], 53),
                endpoint([198, 18, 1, 11], 53),
            ),
            "FRAGMENTS[udp 198.18.1.14 → 198.19.0.10 id 4660] = forward as 198.18.1.14 → \
             198.18.1.11",
            [
                "packet      udp 198.18.1.14 → 198.19.0.10 (later fragment, id 4660, 28 bytes, \
                 TTL 64)",
                "rewritten   udp 198.18.1.14 → 198.18.1.11 (later fragment, id 4660, 28 bytes, \
                 TTL 64)",
            ],
        ),
        (
            later_fragment_report::<Ipv6>(
                endpoint6("2001:db8:1::14", 35676),
                endpoint6("2001:db8:ff::10", 53),
                endpoint6("2001:db8:2::11", 53),
            ),
            "FRAGMENTS6[udp 2001:db8:1::14 → 2001:db8:ff::10 id 4660] = forward as \
             2001:db8:1::14 → 2001:db8:2::11",
            [
                "packet      udp 2001:db8:1::14 → 2001:db8:ff::10 (later fragment, id 4660, 56 \
                 bytes, TTL 64)",
                "rewritten   udp 2001:db8:1::14 → 2001:db8:2::11 (later fragment, id 4660, 56 \
                 bytes, TTL 64)",
            ],
        ),
    ];
    for (report, decided_by, lines) in cases {
        assert_eq!(report.path, "fragment");
        assert_eq!(report.decided_by, [decided_by]);
        let text = render(&report);
        for line in lines {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["fragment"]["record"]["verdict"], "forward");
        assert_eq!(json["output"]["fragment"], "later");
    }
}

#[test]
fn an_icmp_error_shows_the_flow_of_its_quote_and_the_answer_of_a_check_its_reason() {
    let about = TracePacket::opening(
        proto::UDP,
        endpoint([198, 18, 1, 14], 35676),
        endpoint([198, 18, 1, 11], 5999),
    );
    let error = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: None,
        }),
        ..about
    };
    let mut record = TraceRecord {
        conntrack: trace_ct::REPLY,
        table: trace_table::PENDING,
        ..recorded(stat::ICMP_ERROR)
    };
    record.ipv4.flow = reply_entry(
        endpoint([198, 19, 0, 10], 54),
        endpoint([198, 18, 1, 14], 35676),
    );
    let translated = TracePacket {
        destination: endpoint([198, 19, 0, 10], 54),
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: Some(IpAddr::from([198, 19, 0, 10])),
        }),
        ..about
    };
    let translated_report = report(&error, 0, &translated.frame(), &record, None);
    assert_eq!(translated_report.path, "icmp_error");
    assert!(
        translated_report.decided_by[1]
            .starts_with("CONNTRACK_PENDING[udp 198.18.1.11:5999 → 198.18.1.14:35676 reply"),
        "{:?}",
        translated_report.decided_by
    );
    let text = render(&translated_report);
    assert!(
        text.contains(
            "rewritten   icmp port-unreachable from 198.19.0.10 about udp \
             198.18.1.14:35676 → 198.19.0.10:54 (28 bytes, TTL 64)"
        ),
        "{text}"
    );

    // A packet the MTU check answered: the answer in its place, and why.
    let big = TracePacket {
        length: 1500,
        ..about
    };
    let record = TraceRecord {
        answered: trace_answer::FRAG_NEEDED,
        mtu: 1000,
        ..recorded(stat::FRAG_NEEDED)
    };
    let answer = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::FragNeeded { mtu: 1000 },
            from: Some(IpAddr::from([198, 18, 1, 1])),
        }),
        ..big
    };
    let report = report(&big, 2, &answer.frame(), &record, None);
    assert!(report.output.is_none());
    let text = render(&report);
    assert!(
        text.contains(
            "answered    icmp frag-needed (MTU 1000) 198.18.1.1 → 198.18.1.14, quoting \
             the packet as it came"
        ),
        "{text}"
    );
    assert!(text.contains("MTU 1000 < 1500 bytes"), "{text}");
}

#[test]
fn an_ipv6_reply_names_conntrack6_and_a_refusal_reads_as_icmpv6() {
    let packet = TracePacket {
        tcp_flags: tcp_flags::SYN | tcp_flags::ACK,
        ..TracePacket::opening(
            proto::TCP,
            endpoint6("2001:db8:1::12", 8080),
            endpoint6("2001:db8:1::14", 40000),
        )
    };
    let mut record = TraceRecord {
        conntrack: trace_ct::REPLY,
        table: trace_table::PENDING,
        ..recorded(stat::REPLY)
    };
    record.ipv6.flow = CtValue {
        rev_nat_id: 1,
        backend_id: 5,
        ..reply_entry(
            endpoint6("2001:db8:ff::10", 80),
            endpoint6("2001:db8:1::14", 40000),
        )
    };
    let output = TracePacket {
        source: endpoint6("2001:db8:ff::10", 80),
        ..packet
    };
    let reply = report(&packet, 0, &output.frame(), &record, None);
    assert!(
        reply.decided_by[0].starts_with(
            "CONNTRACK_PENDING6[tcp [2001:db8:1::12]:8080 → [2001:db8:1::14]:40000 reply"
        ),
        "{:?}",
        reply.decided_by
    );
    let flow = reply.conntrack.as_ref().unwrap();
    assert_eq!(flow.nat, endpoint6("2001:db8:ff::10", 80));

    // A frontend without endpoints: the program answers ICMPv6 port unreachable.
    let syn = TracePacket::opening(
        proto::TCP,
        endpoint6("2001:db8:1::14", 40000),
        endpoint6("2001:db8:ff::20", 80),
    );
    let refusal = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: None,
        }),
        ..syn
    };
    let refused = report(&syn, 7, &refusal.frame(), &recorded(stat::REJECTED), None);
    let answer = refused.answer.as_ref().unwrap();
    assert_eq!(answer.kind, "port-unreachable");
    assert_eq!(
        (answer.from, answer.to),
        (syn.destination.address, syn.source.address)
    );
    let text = render(&refused);
    assert!(
        text.contains("answered    icmpv6 port-unreachable 2001:db8:ff::20 → 2001:db8:1::14"),
        "{text}"
    );
}
