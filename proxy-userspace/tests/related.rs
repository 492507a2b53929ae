//! The packets around a translated flow, through `BPF_PROG_TEST_RUN`, whole frames in and
//! out as in `testrun`: IP fragments of its datagrams (later ones follow the first), ICMP
//! errors about its packets (translated outer and quoted headers, every checksum), and the
//! forwarding checks' own errors ("fragmentation needed", "time exceeded"), and the XDP
//! program leaving fragments and ICMP errors to tc. Every expected frame is built from
//! scratch here, its checksums computed independently.

mod datapath;

use datapath::wire::icmp_answer_for;
use datapath::*;
use etherparse::{Icmpv4Type, icmpv4::DestUnreachableHeader};
use proxy_common::{proto, service_flags, stat};
use proxy_userspace::inspect::trace::{Fragment, IcmpError, IcmpKind, TracePacket};
use proxy_userspace::xdp::XDP_PASS;

const ETHERNET: usize = 14;
const IPV4: usize = 20;
/// Bytes of IP payload in a fragment over a 1500-byte MTU.
const FRAGMENT_DATA: usize = 1480;
/// A router between this node and the client.
const ROUTER: [u8; 4] = [198, 18, 0, 254];
/// This node's address in the `on_a_node_*` namespaces.
const NODE: [u8; 4] = [198, 18, 0, 1];

/// Sets the IPv4 header checksum of the header at the start of `ip` (20 bytes).
fn set_ip_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = !ones_complement_sum(&ip[..IPV4]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// `frame` (Ethernet, IPv4 without options, payload) as the fragments a sender cuts it
/// into for a 1500-byte MTU: each carries 1480 bytes of the IP payload (the last one the
/// rest), all but the last "more fragments"; all keep the identification.
fn fragments(frame: &[u8]) -> Vec<Vec<u8>> {
    let (head, data) = frame.split_at(ETHERNET + IPV4);
    let chunks = data.chunks(FRAGMENT_DATA).count();
    data.chunks(FRAGMENT_DATA)
        .enumerate()
        .map(|(index, part)| {
            let mut out = [head, part].concat();
            let ip = &mut out[ETHERNET..];
            ip[2..4].copy_from_slice(&((IPV4 + part.len()) as u16).to_be_bytes());
            let more = if index + 1 < chunks { 0x2000 } else { 0 };
            let offset = (index * FRAGMENT_DATA / 8) as u16;
            ip[6..8].copy_from_slice(&(more | offset).to_be_bytes());
            set_ip_checksum(ip);
            out
        })
        .collect()
}

/// The whole frame the fragments were cut from (the first fragment's header, "don't
/// fragment" set again), to check the datagram's L4 checksum end to end.
fn reassembled(fragments: &[Vec<u8>]) -> Vec<u8> {
    let mut whole = fragments[0].clone();
    for later in &fragments[1..] {
        whole.extend_from_slice(&later[ETHERNET + IPV4..]);
    }
    let length = (whole.len() - ETHERNET) as u16;
    let ip = &mut whole[ETHERNET..];
    ip[2..4].copy_from_slice(&length.to_be_bytes());
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
    set_ip_checksum(ip);
    whole
}

/// Sends `datagram` as its fragments; asserts each is translated, exactly, into the
/// matching fragment of `expected`, and the reassembled output's checksums; returns how
/// many fragments there were.
fn assert_datagram_translated(datapath: &Datapath, datagram: Frame, expected: Frame) -> usize {
    let out = assert_fragments(
        datapath,
        &fragments(&datagram.build()),
        TC_ACT_OK,
        &fragments(&expected.build()),
    );
    assert_checksums_valid(&reassembled(&out));
    out.len()
}

/// An ICMP error `icmp` from `from` to `to` quoting `packet`'s IPv4 header and first 8
/// payload bytes, as a host or router sends it (TTL 64, identification 0).
fn icmp_error(from: [u8; 4], to: [u8; 4], icmp: Icmpv4Type, packet: &[u8]) -> Vec<u8> {
    let quote = &packet[ETHERNET..ETHERNET + IPV4 + 8];
    let icmp = etherparse::Icmpv4Header::with_checksum(icmp, quote);
    let mut ip = etherparse::Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        etherparse::IpNumber::ICMP,
        from,
        to,
    )
    .unwrap();
    ip.identification = 0;
    ip.dont_fragment = false;
    ip.header_checksum = ip.calc_header_checksum();
    let eth = [0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    [&eth[..], &ip.to_bytes(), &icmp.to_bytes(), quote].concat()
}

/// The node's hop toward the client is narrower than the pods' MTU: a device of MTU 1000.
const NARROW_HOP_TO_CLIENT: [&[&str]; 4] = [
    &[
        "link",
        "add",
        "clients",
        "mtu",
        "1000",
        "type",
        "veth",
        "peer",
        "name",
        "clients-peer",
    ],
    &["link", "set", "clients", "up"],
    &["link", "set", "clients-peer", "up"],
    &["route", "add", "198.18.0.10/32", "dev", "clients"],
];

/// The last four bytes of a "fragmentation needed" header: the next hop's MTU.
fn mtu(mtu: u16) -> [u8; 4] {
    let [high, low] = mtu.to_be_bytes();
    [0, 0, high, low]
}

fn port_unreachable() -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
}

fn frag_needed(mtu: u16) -> Icmpv4Type {
    Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
        next_hop_mtu: mtu,
    })
}

/// Asserts the IPv4 header checksum and the ICMP checksum of an ICMP frame, and those of
/// the IPv4 header it quotes.
fn assert_icmp_checksums_valid(frame: &[u8]) {
    let ip = &frame[ETHERNET..];
    assert_eq!(
        ones_complement_sum(&ip[..IPV4]),
        0xffff,
        "outer IPv4 checksum"
    );
    assert_eq!(ones_complement_sum(&ip[IPV4..]), 0xffff, "ICMP checksum");
    let quoted = &ip[IPV4 + 8..];
    assert_eq!(
        ones_complement_sum(&quoted[..IPV4]),
        0xffff,
        "quoted IPv4 checksum"
    );
}

/// Asserts tc passes the ICMP error `error` on as `want`, byte for byte, with valid
/// checksums.
fn assert_error_translated(datapath: &Datapath, error: &[u8], want: &[u8]) {
    let (verdict, out) = datapath.run(error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, want, "{out:02x?}");
    assert_icmp_checksums_valid(&out);
}

#[test]
fn fragments_of_a_cluster_ip_datagram_follow_their_first_fragment_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let server = addr(BACKEND_1.ip().octets(), 53);
    let dns = addr(VIP.ip().octets(), 53);
    datapath.add_service(frontend(dns, proto::UDP), &[backend(server, proto::UDP)]);

    // A 4,000-byte query: cut into fragments by the client, each translated on its own.
    let query = Frame {
        payload: payload(4000 - IPV4 - 8),
        ..Frame::new(CLIENT, dns, UDP)
    };
    let sent = assert_datagram_translated(&datapath, query, query.between(CLIENT, server));
    assert_eq!(sent, 3, "fragments");

    // A 30,000-byte answer, fragmented by the backend: the client gets it from the Service.
    let answer = Frame {
        payload: payload(30_000 - IPV4 - 8),
        ..Frame::new(server, CLIENT, UDP)
    };
    let sent = assert_datagram_translated(&datapath, answer, answer.between(dns, CLIENT));
    assert_eq!(sent, 21, "fragments");

    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::REPLY, 1),
        (stat::FRAGMENT, 2 + 20),
    ]);
}

#[test]
fn a_later_fragment_before_its_first_passes_untouched_and_is_counted() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::UDP), &[backend(BACKEND_1, proto::UDP)]);
    let query = Frame {
        payload: payload(2000),
        ..Frame::new(CLIENT, VIP, UDP)
    };
    let sent = fragments(&query.build());
    // Out of order: nothing knows its datagram yet. The receiver would drop the datagram
    // (its first fragment goes elsewhere), as for a lost fragment; the sender retries.
    assert_untouched(&datapath, &sent[1]);
    datapath.assert_stats(&[(stat::FRAGMENT_UNMATCHED, 1)]);
    // The whole datagram again (the sender's retry): now its first fragment leads.
    assert_fragments(
        &datapath,
        &sent,
        TC_ACT_OK,
        &fragments(&query.between(CLIENT, BACKEND_1).build()),
    );
}

#[test]
fn fragments_of_a_datagram_to_no_service_pass_untouched() {
    let Some(datapath) = Datapath::load() else {
        return;
    };
    let datagram = Frame {
        payload: payload(2000),
        ..Frame::new(CLIENT, OTHER, UDP)
    };
    for fragment in fragments(&datagram.build()) {
        assert_untouched(&datapath, &fragment);
    }
    datapath.assert_stats(&[(stat::PASS, 1), (stat::FRAGMENT, 1)]);
}

#[test]
fn the_rest_of_a_refused_datagram_is_dropped() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::UDP), &[]);
    let query = Frame {
        payload: payload(2000),
        ..Frame::new(CLIENT, VIP, UDP)
    };
    let sent = fragments(&query.build());
    assert_refused(&datapath, &sent[0]);
    let (verdict, _) = datapath.run(&sent[1]);
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::REJECTED, 1), (stat::FRAGMENT_DROPPED, 1)]);
}

#[test]
fn fragments_through_snat_are_routed_by_the_program_both_ways() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        let server = addr(BACKEND_1.ip().octets(), 5353);
        datapath.add_service_with(
            frontend(NODE_PORT, proto::UDP),
            &[backend(server, proto::UDP)],
            service_flags::NODE_PORT,
            0,
        );
        let query = Frame {
            payload: payload(4000),
            ..Frame::new(CLIENT, NODE_PORT, UDP)
        };
        let sent = fragments(&query.build());
        let (verdict, out) = datapath.run(&sent[0]);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let snat = addr(NODE, u16::from_be_bytes([out[34], out[35]]));
        let expected = fragments(&query.between(snat, server).routed().build());
        assert_eq!(out, expected[0]);
        assert_fragments(&datapath, &sent[1..], TC_ACT_REDIRECT, &expected[1..]);

        let answer = Frame {
            payload: payload(4000),
            ..Frame::new(server, snat, UDP)
        };
        assert_fragments(
            &datapath,
            &fragments(&answer.build()),
            TC_ACT_REDIRECT,
            &fragments(&answer.between(NODE_PORT, CLIENT).routed().build()),
        );
        // A later fragment whose TTL runs out here: no error may be sent about it.
        let mut last_hop = fragments(&answer.build()).pop().unwrap();
        last_hop[ETHERNET + 8] = 1;
        set_ip_checksum(&mut last_hop[ETHERNET..]);
        assert_eq!(datapath.run(&last_hop).0, TC_ACT_SHOT);
        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::REPLY, 1),
            (stat::FRAGMENT, 4),
            (stat::NOT_FORWARDABLE, 1),
        ]);
    });
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_from_the_service() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::UDP), &[backend(BACKEND_1, proto::UDP)]);
    let query = Frame::new(CLIENT, VIP, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, BACKEND_1));
    // The backend has no listener: its kernel answers about the query as it got it.
    let error = icmp_error(
        BACKEND_1.ip().octets(),
        CLIENT.ip().octets(),
        port_unreachable(),
        &query.between(CLIENT, BACKEND_1).build(),
    );
    // The client's socket, connected to the Service, accepts only this.
    let want = icmp_error(
        VIP.ip().octets(),
        CLIENT.ip().octets(),
        port_unreachable(),
        &query.build(),
    );
    assert_error_translated(&datapath, &error, &want);
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::ICMP_ERROR, 1),
    ]);
    // An error refreshes nothing and counts as no packet of the flow.
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::UDP));
    assert_eq!(reply.packets, 0);
}

#[test]
fn a_routers_error_about_a_tcp_segment_to_a_remote_backend_reaches_the_client() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    // A router on the way to the backend's node cannot forward the segment: it quotes it
    // as it saw it (20 bytes of TCP header: the quote ends before the checksum, which
    // stays as it was, as netfilter leaves it).
    let error = icmp_error(
        ROUTER,
        CLIENT.ip().octets(),
        frag_needed(1000),
        &syn.between(CLIENT, BACKEND_1).build(),
    );
    // netfilter's translation: the quote as the client sent it, from the Service's
    // address (the flow's reply direction rewrites the source).
    let want = icmp_error(
        VIP.ip().octets(),
        CLIENT.ip().octets(),
        frag_needed(1000),
        &syn.between(CLIENT, VIP).build(),
    );
    assert_error_translated(&datapath, &error, &want);
}

#[test]
fn a_routers_frag_needed_about_a_node_port_reply_reaches_the_backend() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_local_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service_with(
            frontend(NODE_PORT, proto::TCP),
            &[backend(BACKEND_1, proto::TCP)],
            service_flags::NODE_PORT,
            0,
        );
        let syn = Frame::new(CLIENT, NODE_PORT, SYN);
        assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
        let syn_ack = Frame::new(BACKEND_1, CLIENT, SYN_ACK);
        assert_routed(&datapath, syn_ack, syn_ack.between(NODE_PORT, CLIENT));
        // A router toward the client: the reply was too big for its next hop. It answers
        // the node address the reply came from.
        let reply = Frame {
            payload: payload(1400),
            ..Frame::new(BACKEND_1, CLIENT, ACK)
        };
        let error = icmp_error(
            ROUTER,
            NODE,
            frag_needed(1000),
            &reply.between(NODE_PORT, CLIENT).routed().build(),
        );
        // To the backend, about its segment as it sent it (the TTL in the quote is the
        // one the router saw): its TCP lowers its segment size.
        let want = icmp_error(
            ROUTER,
            BACKEND_1.ip().octets(),
            frag_needed(1000),
            &reply.routed().build(),
        );
        let (verdict, out) = datapath.run(&error);
        assert_eq!(verdict, TC_ACT_OK, "the kernel forwards it to the pod");
        assert_eq!(out, want, "{out:02x?}");
        assert_icmp_checksums_valid(&out);
    });
}

#[test]
fn icmp_messages_about_nothing_tracked_pass_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::UDP), &[backend(BACKEND_1, proto::UDP)]);
    // An error about a flow this node never saw.
    let error = icmp_error(
        BACKEND_2.ip().octets(),
        CLIENT.ip().octets(),
        port_unreachable(),
        &Frame::new(CLIENT, BACKEND_2, UDP).build(),
    );
    assert_untouched(&datapath, &error);
    // An echo request is no error.
    let echo = icmp_error(
        BACKEND_2.ip().octets(),
        CLIENT.ip().octets(),
        Icmpv4Type::EchoRequest(etherparse::IcmpEchoHeader { id: 1, seq: 1 }),
        &Frame::new(CLIENT, BACKEND_2, UDP).build(),
    );
    assert_untouched(&datapath, &echo);
    datapath.assert_stats(&[(stat::PASS, 1), (stat::NOT_HANDLED, 1)]);
}

#[test]
fn a_reply_too_big_for_the_hop_to_the_client_draws_frag_needed_to_the_backend() {
    if !bpf_available() {
        return;
    }
    on_a_node(
        &[&LOCAL_BACKENDS[..], &NARROW_HOP_TO_CLIENT].concat(),
        || {
            let mut datapath = Datapath::load().unwrap();
            datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
            // The handshake, small segments.
            let syn = Frame::new(CLIENT, VIP, SYN);
            assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
            let syn_ack = Frame::new(BACKEND_1, CLIENT, SYN_ACK);
            assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
            let ack = Frame::new(CLIENT, VIP, ACK);
            assert_translated(&datapath, ack, ack.between(CLIENT, BACKEND_1));
            let reply = Frame {
                payload: payload(1400),
                ..Frame::new(BACKEND_1, CLIENT, ACK)
            };
            // As the kernel's forwarding would answer: from the node's address toward the
            // backend, about the segment as the backend sent it, naming the route's MTU.
            let (verdict, out) = datapath.run(&reply.build());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out, icmp_answer_for(&reply.build(), NODE, 3, 4, mtu(1000)));
            assert_icmp_checksums_valid(&out);
            // Small enough: translated as usual.
            let small = Frame {
                payload: payload(900),
                ..reply
            };
            assert_translated(&datapath, small, small.between(VIP, CLIENT));
            datapath.assert_stats(&[
                (stat::CT_MISS, 1),
                (stat::NEW_FLOW, 1),
                (stat::CT_HIT, 1),
                (stat::FRAG_NEEDED, 1),
                (stat::REPLY, 2),
            ]);
        },
    );
}

#[test]
fn a_node_port_reply_the_program_routes_draws_frag_needed_even_without_df() {
    if !bpf_available() {
        return;
    }
    on_a_node(
        &[&LOCAL_BACKENDS[..], &NARROW_HOP_TO_CLIENT].concat(),
        || {
            let mut datapath = Datapath::load().unwrap();
            datapath.add_service_with(
                frontend(NODE_PORT, proto::UDP),
                &[backend(BACKEND_1, proto::UDP)],
                service_flags::NODE_PORT,
                0,
            );
            let query = Frame::new(CLIENT, NODE_PORT, UDP);
            assert_translated(&datapath, query, query.between(CLIENT, BACKEND_1));
            // A whole datagram the kernel would fragment if it forwarded it; the program,
            // which routes it (its source becomes the node's address), cannot.
            let answer = Frame {
                payload: payload(1400),
                ..Frame::new(BACKEND_1, CLIENT, UDP)
            };
            let mut unfragmentable = answer.build();
            unfragmentable[ETHERNET + 6] = 0; // "don't fragment" cleared
            set_ip_checksum(&mut unfragmentable[ETHERNET..]);
            let (verdict, out) = datapath.run(&unfragmentable);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out, icmp_answer_for(&unfragmentable, NODE, 3, 4, mtu(1000)));
            datapath.assert_stats(&[
                (stat::CT_MISS, 1),
                (stat::NEW_FLOW, 1),
                (stat::FRAG_NEEDED, 1),
            ]);
        },
    );
}

#[test]
fn a_translated_packet_whose_ttl_runs_out_draws_time_exceeded() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_local_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service(frontend(VIP, proto::UDP), &[backend(BACKEND_1, proto::UDP)]);
        let query = Frame {
            ttl: 1,
            ..Frame::new(CLIENT, VIP, UDP)
        };
        let (verdict, out) = datapath.run(&query.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, icmp_answer_for(&query.build(), NODE, 11, 0, [0; 4]));
        // The flow was recorded before the check: the next query, with TTL to spare, goes
        // to the same backend.
        datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::TTL_EXCEEDED, 1)]);
        let again = Frame::new(CLIENT, VIP, UDP);
        assert_translated(&datapath, again, again.between(CLIENT, BACKEND_1));
    });
}

#[test]
fn trace_explains_a_later_fragment_and_an_icmp_error() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::UDP), &[backend(BACKEND_1, proto::UDP)]);
    let query = Frame {
        payload: payload(2000),
        ..Frame::new(CLIENT, VIP, UDP)
    };
    assert_eq!(datapath.run(&fragments(&query.build())[0]).0, TC_ACT_OK);
    let stats = datapath.stats();
    let fragments_recorded = datapath.fragments();

    let later = TracePacket {
        fragment: Fragment::Later,
        ip_id: 0x4242,
        length: 548,
        ..trace_packet(CLIENT, VIP, proto::UDP)
    };
    let report = datapath.tracer().run(&later).unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "fragment")
    );
    let record = report.fragment.as_ref().unwrap().record.as_ref().unwrap();
    assert_eq!(
        (record.verdict, record.destination),
        ("forward", std::net::IpAddr::V4(*BACKEND_1.ip()))
    );
    let output = report.output.as_ref().unwrap();
    assert_eq!(output.destination.address, *BACKEND_1.ip());
    assert_eq!(output.fragment, Some("later"));

    // Another datagram of the client: its first fragment never passed.
    let unknown = TracePacket { ip_id: 7, ..later };
    let report = datapath.tracer().run(&unknown).unwrap();
    assert_eq!(report.path, "fragment_unmatched");
    assert!(report.fragment.unwrap().record.is_none());

    // The backend's port unreachable about the query, as the client will get it.
    let error = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: None,
        }),
        ..trace_packet(CLIENT, BACKEND_1, proto::UDP)
    };
    let report = datapath.tracer().run(&error).unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "icmp_error")
    );
    let output = report.output.unwrap();
    assert_eq!(output.destination.address, *VIP.ip(), "quoted as sent");
    assert_eq!(output.icmp_error.unwrap().from, *VIP.ip());
    assert_eq!(report.conntrack.unwrap().direction, "reply");

    // A dry run writes nothing.
    assert_eq!(datapath.stats(), stats);
    assert_eq!(datapath.fragments(), fragments_recorded);
}

/// XDP (`epx_xdp`, on an external device) leaves every fragment of a datagram, the first
/// too, and every ICMP error to tc, untouched and with nothing recorded; tc then
/// translates them as their flow, which XDP opened.
#[test]
fn xdp_leaves_fragments_and_icmp_errors_to_tc_which_translates_them() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let server = addr(BACKEND_1.ip().octets(), 53);
    let dns = addr(VIP.ip().octets(), 53);
    datapath.add_service(frontend(dns, proto::UDP), &[backend(server, proto::UDP)]);
    let left_to_tc = |frame: &[u8]| {
        let run = datapath.run_xdp(frame);
        assert_eq!((run.action, run.decided), (XDP_PASS, false), "left to tc");
        assert_eq!(run.frame, frame, "untouched");
    };

    // A small query: XDP opens the flow.
    let query = Frame::new(CLIENT, dns, UDP);
    let run = datapath.run_xdp(&query.build());
    assert_eq!((run.action, run.decided), (XDP_PASS, true));
    assert_eq!(run.frame, query.between(CLIENT, server).build());

    // A 4,000-byte query of the same socket: XDP leaves all its fragments to tc, which
    // translates them as the flow.
    let big = Frame {
        payload: payload(4000 - IPV4 - 8),
        ..query
    };
    let sent = fragments(&big.build());
    let flows = datapath.conntrack();
    for fragment in &sent {
        left_to_tc(fragment);
    }
    assert_eq!(datapath.conntrack(), flows, "XDP recorded nothing");
    let translated = fragments(&big.between(CLIENT, server).build());
    assert_fragments(&datapath, &sent, TC_ACT_OK, &translated);

    // The backend answers (through its pod's device: tc); the client's host no longer
    // listens and answers port unreachable, which arrives on the external device: XDP
    // leaves it to tc, which sends it on to the backend about the answer as it sent it.
    let answer = Frame::new(server, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(dns, CLIENT));
    let error = icmp_error(
        CLIENT.ip().octets(),
        dns.ip().octets(),
        port_unreachable(),
        &answer.between(dns, CLIENT).build(),
    );
    left_to_tc(&error);
    let want = icmp_error(
        CLIENT.ip().octets(),
        server.ip().octets(),
        port_unreachable(),
        &answer.build(),
    );
    assert_error_translated(&datapath, &error, &want);

    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::XDP_PASS, 1),
        (stat::XDP_TO_TC, 4),
        (stat::CT_HIT, 1),
        (stat::FRAGMENT, 2),
        (stat::REPLY, 1),
        (stat::ICMP_ERROR, 1),
    ]);
}
