use proxy_common::{Backend, FrontendValue, TraceAddresses, service_flags};

use super::*;

/// [`report_of`] in the packet's family.
fn report(
    packet: &TracePacket,
    return_code: u32,
    output: &[u8],
    record: &TraceRecord,
    frontend_name: Option<String>,
    flow_name: Option<String>,
) -> TraceReport {
    if packet.is_ipv6() {
        report_of::<Ipv6>(
            packet,
            return_code,
            output,
            record,
            frontend_name,
            flow_name,
        )
    } else {
        report_of::<u32>(
            packet,
            return_code,
            output,
            record,
            frontend_name,
            flow_name,
        )
    }
}

pub(super) fn endpoint(address: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        address: IpAddr::from(address),
        port,
    }
}

pub(super) fn endpoint6(address: &str, port: u16) -> Endpoint {
    Endpoint {
        address: address.parse().unwrap(),
        port,
    }
}

#[test]
fn destinations_parse_with_a_default_protocol() {
    let udp: Destination = "198.19.0.10:53/udp".parse().unwrap();
    assert_eq!(
        (udp.endpoint, udp.protocol),
        (endpoint([198, 19, 0, 10], 53), proto::UDP)
    );
    let tcp: Destination = "198.19.0.10:80".parse().unwrap();
    assert_eq!(tcp.protocol, proto::TCP);
    assert!("198.19.0.10/tcp".parse::<Destination>().is_err());
    let sctp: Destination = "198.19.0.10:3868/sctp".parse().unwrap();
    assert_eq!(sctp.protocol, proto::SCTP);
    assert!("198.19.0.10:80/quic".parse::<Destination>().is_err());
}

/// The record of a new flow to `frontend` (header `service`) given `(slot, backend id,
/// backend)`.
fn new_flow_record(
    (slot, backend_id, backend): (u16, u32, Backend),
    frontend: FrontendKey,
    service: FrontendValue,
) -> TraceRecord {
    TraceRecord {
        recorded: 1,
        outcome: stat::NEW_FLOW as u8,
        slot,
        backend_id,
        ipv4: TraceAddresses {
            backend,
            frontend,
            ..TraceAddresses::default()
        },
        service,
        ..TraceRecord::default()
    }
}

#[test]
fn a_new_flow_report_names_every_entry_that_decided() {
    let packet = TracePacket::opening(
        proto::TCP,
        endpoint([198, 18, 1, 14], 40000),
        endpoint([198, 19, 0, 10], 80),
    );
    let record = new_flow_record(
        (2, 5, Backend::new([198, 18, 1, 12], 8080, proto::TCP)),
        FrontendKey::new([198, 19, 0, 10], 80, proto::TCP),
        FrontendValue {
            rev_nat_id: 1,
            base: 12,
            count: 3,
            flags: service_flags::CLUSTER_IP,
            ..FrontendValue::default()
        },
    );
    let output = TracePacket {
        destination: endpoint([198, 18, 1, 12], 8080),
        ..packet
    };
    let report = report(
        &packet,
        0,
        &output.frame(),
        &record,
        Some("default/echo:tcp-80".into()),
        None,
    );
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "new_flow")
    );
    assert_eq!(
        report.decided_by,
        [
            "SERVICES[198.19.0.10:80/tcp] = ClusterIP default/echo:tcp-80, rev_nat_id 1, \
             3 backends at BACKEND_SLOTS[12..15]",
            "BACKEND_SLOTS[13] = backend 5, 198.18.1.12:8080 (slot 2 of 3, chosen at random)",
        ]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["backend"]["address"], "198.18.1.12");
    assert_eq!(json["selection"]["of"], 3);
    assert_eq!(json["selection"]["index"], 13);
    assert_eq!(json["selection"]["set"], "frontend");
    assert_eq!(json["selection"]["chosen_by"], "random");
    assert_eq!(json["origin"], serde_json::Value::Null);
    assert_eq!(json["conntrack"], serde_json::Value::Null);
    assert_eq!(json["output"]["destination"]["port"], 8080);
    let text = render(&report);
    assert!(
        text.contains("rewritten   tcp 198.18.1.14:40000 → 198.18.1.12:8080"),
        "{text}"
    );
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
            (3, 7, Backend::new([198, 18, 2, 12], 8080, proto::TCP)),
            FrontendKey::new([198, 18, 0, 1], 30080, proto::TCP),
            FrontendValue {
                rev_nat_id: 2,
                base: 20,
                count: 4,
                flags: service_flags::NODE_PORT,
                maglev: maglev::header_value(maglev::DEFAULT_TABLE_SIZE).unwrap(),
                ..FrontendValue::default()
            },
        )
    };
    let report = report(&packet, 0, &packet.frame(), &record, None, None);
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
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::PASS as u8,
        ..TraceRecord::default()
    };
    let report = report(&packet, 0, &packet.frame(), &record, None, None);
    assert_eq!(report.path, "pass");
    assert!(report.frontend.is_none() && report.backend.is_none());
    assert_eq!(
        report.decided_by,
        ["no CONNTRACK entry for the tuple, no SERVICES entry for 198.18.5.5:53/udp"]
    );
}

fn wire(address: [u8; 4]) -> u32 {
    u32::from_ne_bytes(address)
}

#[test]
fn a_later_fragment_shows_its_datagrams_record_and_no_ports() {
    let packet = TracePacket {
        fragment: Fragment::Later,
        ip_id: 4660,
        ..TracePacket::opening(
            proto::UDP,
            endpoint([198, 18, 1, 14], 35676),
            endpoint([198, 19, 0, 10], 53),
        )
    };
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::FRAGMENT as u8,
        fragment: trace_fragment::LATER,
        fragment_found: 1,
        fragment_record: proxy_common::FragmentValue {
            to: proxy_common::Tuple {
                src_addr: wire([198, 18, 1, 14]),
                dst_addr: wire([198, 18, 1, 11]),
                src_port: 0,
                dst_port: 0,
            },
            ..Default::default()
        },
        ..TraceRecord::default()
    };
    let output = TracePacket {
        destination: endpoint([198, 18, 1, 11], 53),
        ..packet
    };
    let report = report(&packet, 0, &output.frame(), &record, None, None);
    assert_eq!(report.path, "fragment");
    assert_eq!(
        report.decided_by,
        [
            "FRAGMENTS[udp 198.18.1.14 → 198.19.0.10 id 4660] = forward as 198.18.1.14 → \
          198.18.1.11"
        ]
    );
    let text = render(&report);
    for line in [
        "packet      udp 198.18.1.14 → 198.19.0.10 (later fragment, id 4660, 28 bytes, TTL 64)",
        "rewritten   udp 198.18.1.14 → 198.18.1.11 (later fragment, id 4660, 28 bytes, TTL 64)",
    ] {
        assert!(text.contains(line), "{line:?} not in\n{text}");
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["fragment"]["record"]["verdict"], "forward");
    assert_eq!(json["output"]["fragment"], "later");
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
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::ICMP_ERROR as u8,
        conntrack: trace_ct::REPLY,
        table: trace_table::PENDING,
        ipv4: TraceAddresses {
            flow: proxy_common::CtValue {
                to: proxy_common::Tuple {
                    src_addr: wire([198, 19, 0, 10]),
                    dst_addr: wire([198, 18, 1, 14]),
                    src_port: 54u16.to_be(),
                    dst_port: 35676u16.to_be(),
                },
                flags: ct_flags::REPLY,
                ..Default::default()
            },
            ..TraceAddresses::default()
        },
        ..TraceRecord::default()
    };
    let translated = TracePacket {
        destination: endpoint([198, 19, 0, 10], 54),
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: Some(IpAddr::from([198, 19, 0, 10])),
        }),
        ..about
    };
    let translated_report = report(&error, 0, &translated.frame(), &record, None, None);
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
        recorded: 1,
        outcome: stat::FRAG_NEEDED as u8,
        answered: trace_answer::FRAG_NEEDED,
        mtu: 1000,
        ..TraceRecord::default()
    };
    let answer = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::FragNeeded { mtu: 1000 },
            from: Some(IpAddr::from([198, 18, 1, 1])),
        }),
        ..big
    };
    let report = report(&big, 2, &answer.frame(), &record, None, None);
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

fn wire6(address: &str) -> Ipv6 {
    Ipv6::from_ip(address.parse().unwrap()).unwrap()
}

#[test]
fn an_ipv6_new_flow_is_reported_from_the_ipv6_maps_with_its_addresses() {
    let packet = TracePacket::opening(
        proto::TCP,
        endpoint6("2001:db8:1::14", 40000),
        endpoint6("2001:db8:ff::10", 80),
    );
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::NEW_FLOW as u8,
        slot: 2,
        backend_id: 5,
        ipv6: TraceAddresses {
            backend: Backend {
                addr: wire6("2001:db8:1::12"),
                port: 8080u16.to_be(),
                proto: proto::TCP,
                _pad: 0,
            },
            frontend: FrontendKey {
                addr: wire6("2001:db8:ff::10"),
                port: 80u16.to_be(),
                proto: proto::TCP,
                _pad: 0,
            },
            ..TraceAddresses::default()
        },
        service: FrontendValue {
            rev_nat_id: 1,
            base: 12,
            count: 3,
            flags: service_flags::CLUSTER_IP,
            ..FrontendValue::default()
        },
        ..TraceRecord::default()
    };
    let output = TracePacket {
        destination: endpoint6("2001:db8:1::12", 8080),
        ..packet
    };
    let report = report(
        &packet,
        0,
        &output.frame(),
        &record,
        Some("default/web6:http".into()),
        None,
    );
    assert_eq!(report.path, "new_flow");
    assert_eq!(
        report.decided_by,
        [
            "SERVICES6[[2001:db8:ff::10]:80/tcp] = ClusterIP default/web6:http, rev_nat_id \
             1, 3 backends at BACKEND_SLOTS6[12..15]",
            "BACKEND_SLOTS6[13] = backend 5, [2001:db8:1::12]:8080 (slot 2 of 3, chosen at \
             random)",
        ]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["packet"]["family"], "IPv6");
    assert_eq!(json["frontend"]["address"], "2001:db8:ff::10");
    assert_eq!(json["backend"]["address"], "2001:db8:1::12");
    assert_eq!(json["output"]["destination"]["address"], "2001:db8:1::12");
    let text = render(&report);
    assert!(
        text.contains("rewritten   tcp [2001:db8:1::14]:40000 → [2001:db8:1::12]:8080"),
        "{text}"
    );
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
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::REPLY as u8,
        conntrack: trace_ct::REPLY,
        table: trace_table::PENDING,
        ipv6: TraceAddresses {
            flow: proxy_common::CtValue {
                to: proxy_common::Tuple {
                    src_addr: wire6("2001:db8:ff::10"),
                    dst_addr: wire6("2001:db8:1::14"),
                    src_port: 80u16.to_be(),
                    dst_port: 40000u16.to_be(),
                },
                rev_nat_id: 1,
                backend_id: 5,
                flags: ct_flags::REPLY,
                ..Default::default()
            },
            ..TraceAddresses::default()
        },
        ..TraceRecord::default()
    };
    let output = TracePacket {
        source: endpoint6("2001:db8:ff::10", 80),
        ..packet
    };
    let reply = report(&packet, 0, &output.frame(), &record, None, None);
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
    let record = TraceRecord {
        recorded: 1,
        outcome: stat::REJECTED as u8,
        ..TraceRecord::default()
    };
    let refused = report(&syn, 7, &refusal.frame(), &record, None, None);
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

#[test]
fn ipv6_destinations_parse_in_brackets() {
    let udp: Destination = "[2001:db8:ff::10]:53/udp".parse().unwrap();
    assert_eq!(
        (udp.endpoint, udp.protocol),
        (endpoint6("2001:db8:ff::10", 53), proto::UDP)
    );
    assert!("[2001:db8:ff::10]/udp".parse::<Destination>().is_err());
    assert!("2001:db8:ff::10".parse::<Destination>().is_err());
}
