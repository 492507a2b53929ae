//! Packet tests of the IPv6 path (`epx_ingress6`, which `epx_ingress` tail-calls for
//! IPv6) through `BPF_PROG_TEST_RUN`, as `testrun.rs` tests IPv4: a frame in, the exact
//! verdict and frame out. Frames are built byte by byte (`datapath::wire`), their TCP,
//! UDP and ICMPv6 checksums computed there over the IPv6 pseudo-header, independently of
//! the program; outputs are compared whole and their checksums verified from scratch.

mod datapath;

use std::net::IpAddr;

use datapath::ipv6::ends::{BACKEND, CLIENT, NODE_PORT, VIP};
use datapath::ipv6::*;
use datapath::wire::{self, Extension};
use datapath::*;
use proxy_common::{
    CtKey, ct_flags, fragment_verdict, map_names, proto, service_flags, sock_programs, stat,
};
use proxy_userspace::conntrack::gc::Reaper;
use proxy_userspace::inspect::Endpoint;
use proxy_userspace::inspect::trace::{Fragment, TracePacket};

/// Runs `frame` and asserts it leaves as `expected` to the kernel, checksums valid.
fn assert_translated6(datapath: &Datapath, frame: &[u8], expected: &[u8]) {
    let (verdict, out) = datapath.run(frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, expected, "{out:02x?}");
}

fn tcp_service(datapath: &mut Datapath) -> Vec<u32> {
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
        service_flags::CLUSTER_IP,
    )
}

#[test]
fn clusterip_tcp_is_dnated_and_its_replies_reverse_natted() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = tcp_service(&mut datapath);

    let syn = frame6(CLIENT, VIP, SYN6);
    let dnated = frame6(CLIENT, BACKEND, SYN6);
    assert_translated6(&datapath, &syn, &dnated);
    assert!(wire::ipv6_checksum_valid(&dnated));

    let conntrack = datapath.conntrack6();
    assert_eq!(conntrack.len(), 2, "{conntrack:?}");
    let forward = conntrack[&CtKey::new(tuple6(CLIENT, VIP), proto::TCP)];
    assert_eq!(forward.to, tuple6(CLIENT, BACKEND));
    assert_eq!(forward.backend_id, ids[0]);
    assert_eq!(forward.rev_nat_id, REV_NAT_ID);
    let reply = conntrack[&CtKey::new(tuple6(BACKEND, CLIENT), proto::TCP)];
    assert_eq!(reply.to, tuple6(VIP, CLIENT));
    assert_eq!(reply.flags, ct_flags::REPLY);

    let syn_ack = frame6(BACKEND, CLIENT, SYN_ACK6);
    assert_translated6(&datapath, &syn_ack, &frame6(VIP, CLIENT, SYN_ACK6));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
    // IPv4's conntrack saw nothing.
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn clusterip_udp_is_dnated_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, 53, proto::UDP),
        &[backend6(BACKEND6_1, 5353, proto::UDP)],
        service_flags::CLUSTER_IP,
    );
    let (vip, backend) = ((VIP6, 53), (BACKEND6_1, 5353));
    let query = frame6(CLIENT, vip, L4::Udp);
    let dnated = frame6(CLIENT, backend, L4::Udp);
    assert_translated6(&datapath, &query, &dnated);
    assert!(wire::ipv6_checksum_valid(&dnated));
    let answer = frame6(backend, CLIENT, L4::Udp);
    let reversed = frame6(vip, CLIENT, L4::Udp);
    assert_translated6(&datapath, &answer, &reversed);
    assert!(wire::ipv6_checksum_valid(&reversed));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
}

#[test]
fn the_next_packet_of_a_flow_reuses_its_conntrack_entry() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    tcp_service(&mut datapath);
    assert_translated6(
        &datapath,
        &frame6(CLIENT, VIP, SYN6),
        &frame6(CLIENT, BACKEND, SYN6),
    );
    assert_translated6(
        &datapath,
        &frame6(BACKEND, CLIENT, SYN_ACK6),
        &frame6(VIP, CLIENT, SYN_ACK6),
    );
    // The handshake's last ACK: the tracked flow, now assured (CONNTRACK6).
    assert_translated6(
        &datapath,
        &frame6(CLIENT, VIP, ACK6),
        &frame6(CLIENT, BACKEND, ACK6),
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::REPLY, 1),
        (stat::CT_HIT, 1),
    ]);
    let forward = CtKey::new(tuple6(CLIENT, VIP), proto::TCP);
    let assured = datapath.conntrack6_map(map_names::CONNTRACK6);
    assert_eq!(assured.len(), 2, "{assured:?}");
    assert_eq!(assured[&forward].packets, 2);
    assert!(
        datapath
            .conntrack6_map(map_names::CONNTRACK_PENDING6)
            .is_empty()
    );
}

#[test]
fn a_frontend_without_endpoints_refuses_with_an_icmpv6_port_unreachable() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[],
        service_flags::CLUSTER_IP,
    );
    let syn = frame6(CLIENT, VIP, SYN6);
    let (verdict, out) = datapath.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT, "back out of its device");
    // From the frontend to the client: destination unreachable, port unreachable (type 1,
    // code 4), quoting the IPv6 header and 8 bytes of the refused packet (RFC 4443).
    let quote = &syn[wire::ETH_LEN..wire::ETH_LEN + wire::IPV6_LEN + 8];
    let expected = wire::ipv6_frame(
        (MACS6.1, MACS6.0),
        VIP6,
        CLIENT6,
        64,
        &[],
        wire::ICMPV6,
        &[1, 4, 0, 0, 0, 0, 0, 0],
        Some(2),
        quote,
    );
    assert_eq!(out, expected, "{out:02x?}");
    assert!(wire::ipv6_checksum_valid(&out));
    datapath.assert_stats(&[(stat::REJECTED, 1)]);
    assert!(datapath.conntrack6().is_empty());
}

#[test]
fn extension_headers_are_skipped_to_find_the_ports() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    tcp_service(&mut datapath);
    let extensions = [Extension::hop_by_hop(), Extension::destination_options()];
    let syn = frame6_with(CLIENT, VIP, SYN6, &extensions, 64);
    // The extension headers stay; the TCP checksum (over the pseudo-header, which they
    // are not part of) is the one of the DNATed segment.
    let dnated = frame6_with(CLIENT, BACKEND, SYN6, &extensions, 64);
    assert_translated6(&datapath, &syn, &dnated);
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1)]);
}

/// The identification the tests' senders give a fragmented datagram.
const DATAGRAM_ID: u32 = 0x1234_5678;

/// A UDP Service on [`VIP6`]:53 served by [`BACKEND6_1`]:5353; its frontend and backend.
fn udp_service(datapath: &mut Datapath) -> (([u8; 16], u16), ([u8; 16], u16)) {
    let (dns, server) = ((VIP6, 53), (BACKEND6_1, 5353));
    datapath.add_service6(
        frontend6(dns.0, dns.1, proto::UDP),
        &[backend6(server.0, server.1, proto::UDP)],
        service_flags::CLUSTER_IP,
    );
    (dns, server)
}

/// Sends the UDP datagram `src` → `dst` of `len` bytes of payload as its fragments and
/// asserts each leaves (to the kernel) as the matching fragment of the datagram `to_src`
/// → `to_dst` built from scratch (its UDP checksum computed over the new addresses and
/// sitting in the first fragment: a later one's bytes past its headers are untouched),
/// the reassembled output's checksum valid; returns how many fragments there were.
fn assert_datagram6_translated(
    datapath: &Datapath,
    (src, dst): (([u8; 16], u16), ([u8; 16], u16)),
    (to_src, to_dst): (([u8; 16], u16), ([u8; 16], u16)),
    len: usize,
) -> usize {
    let data = payload(len);
    let sent = wire::ipv6_fragments(&udp6(src, dst, data), DATAGRAM_ID);
    let expected = wire::ipv6_fragments(&udp6(to_src, to_dst, data), DATAGRAM_ID);
    let out = assert_fragments(datapath, &sent, TC_ACT_OK, &expected);
    assert!(wire::ipv6_checksum_valid(&wire::ipv6_reassembled(&out)));
    out.len()
}

#[test]
fn fragments_of_a_clusterip_datagram_follow_their_first_fragment_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let (dns, server) = udp_service(&mut datapath);
    // A 4,000-byte query, cut into fragments by the client: the first DNATed (its UDP
    // checksum updated) and its fate recorded, the later ones rewritten the same.
    let sent = assert_datagram6_translated(&datapath, (CLIENT, dns), (CLIENT, server), 4000);
    assert_eq!(sent, 3, "fragments");
    let record = datapath.fragments6()[&datagram6(CLIENT6, VIP6, DATAGRAM_ID)];
    assert_eq!(record.to, tuple6(CLIENT, server));
    assert_eq!(
        (record.verdict, record.routes_itself),
        (fragment_verdict::FORWARD, 0)
    );
    // A 30,000-byte answer, fragmented by the backend: the client gets it from the Service.
    let sent = assert_datagram6_translated(&datapath, (server, CLIENT), (dns, CLIENT), 30_000);
    assert_eq!(sent, 21, "fragments");
    let record = datapath.fragments6()[&datagram6(BACKEND6_1, CLIENT6, DATAGRAM_ID)];
    assert_eq!(record.to, tuple6(dns, CLIENT));
    assert_eq!(datapath.fragments6().len(), 2);
    assert!(
        datapath.fragments().is_empty(),
        "IPv4's FRAGMENTS saw nothing"
    );
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
    let (dns, server) = udp_service(&mut datapath);
    let sent = wire::ipv6_fragments(&udp6(CLIENT, dns, payload(2000)), DATAGRAM_ID);
    // Out of order: nothing knows its datagram yet.
    assert_untouched(&datapath, &sent[1]);
    datapath.assert_stats(&[(stat::FRAGMENT_UNMATCHED, 1)]);
    assert!(datapath.fragments6().is_empty());
    // The sender's retry: now its first fragment leads.
    assert_datagram6_translated(&datapath, (CLIENT, dns), (CLIENT, server), 2000);
    datapath.assert_stats(&[
        (stat::FRAGMENT_UNMATCHED, 1),
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::FRAGMENT, 1),
    ]);
}

#[test]
fn fragments_of_a_datagram_to_no_service_or_of_icmpv6_pass_untouched() {
    let Some(datapath) = Datapath::load() else {
        return;
    };
    let other = (ip6(0x0019, 0x0b), 53);
    let sent = wire::ipv6_fragments(&udp6(CLIENT, other, payload(2000)), DATAGRAM_ID);
    for fragment in &sent {
        assert_untouched(&datapath, fragment);
    }
    // Its record says so: passed as it was.
    let record = datapath.fragments6()[&datagram6(CLIENT6, other.0, DATAGRAM_ID)];
    assert_eq!(record.to, tuple6(CLIENT, other));
    datapath.assert_stats(&[(stat::PASS, 1), (stat::FRAGMENT, 1)]);
    // A fragmented ICMPv6 echo request: neither fragment is followed.
    let echo = wire::ipv6_frame(
        MACS6,
        CLIENT6,
        VIP6,
        64,
        &[],
        wire::ICMPV6,
        &[128, 0, 0, 0, 0, 1, 0, 1],
        Some(2),
        payload(2000),
    );
    for fragment in &wire::ipv6_fragments(&echo, DATAGRAM_ID) {
        assert_untouched(&datapath, fragment);
    }
    datapath.assert_stats(&[(stat::PASS, 1), (stat::FRAGMENT, 1), (stat::NOT_HANDLED, 2)]);
    assert_eq!(datapath.fragments6().len(), 1);
}

#[test]
fn the_rest_of_a_refused_datagram_is_dropped() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, 53, proto::UDP),
        &[],
        service_flags::CLUSTER_IP,
    );
    let sent = wire::ipv6_fragments(&udp6(CLIENT, (VIP6, 53), payload(2000)), DATAGRAM_ID);
    // No endpoints: a first fragment is dropped, not answered (the quote of its IPv6
    // header and 8 bytes would hold its fragment header, not its ports), as packets with
    // extension headers are.
    for fragment in &sent {
        let (verdict, _) = datapath.run(fragment);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    let record = datapath.fragments6()[&datagram6(CLIENT6, VIP6, DATAGRAM_ID)];
    assert_eq!(record.verdict, fragment_verdict::DROP);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1), (stat::FRAGMENT_DROPPED, 1)]);
    assert!(datapath.conntrack6().is_empty());
}

#[test]
fn each_family_is_served_by_its_own_frontends_only() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    // An IPv4 Service and an IPv6 Service on the same port.
    datapath.add_service(
        frontend(datapath::VIP, proto::TCP),
        &[backend(BACKEND_1, proto::TCP)],
    );
    tcp_service(&mut datapath);

    // IPv6 to an address that is an IPv6 frontend of nothing: untouched.
    let other = (ip6(0x0019, 0x0b), VIP6_PORT);
    assert_untouched(&datapath, &frame6(CLIENT, other, SYN6));
    // IPv4 to an address with no IPv4 frontend: untouched.
    assert_untouched(&datapath, &Frame::new(datapath::CLIENT, OTHER, SYN).build());
    datapath.assert_stats(&[(stat::PASS, 2)]);

    // Each family's frontend translates its own packets into its own conntrack.
    let syn4 = Frame::new(datapath::CLIENT, datapath::VIP, SYN);
    assert_translated(&datapath, syn4, syn4.between(datapath::CLIENT, BACKEND_1));
    assert_translated6(
        &datapath,
        &frame6(CLIENT, VIP, SYN6),
        &frame6(CLIENT, BACKEND, SYN6),
    );
    assert_eq!(datapath.conntrack().len(), 2);
    assert_eq!(datapath.conntrack6().len(), 2);
}

#[test]
fn the_collector_reaps_finished_ipv6_flows_and_only_those() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    tcp_service(&mut datapath);
    let second = (CLIENT6, CLIENT6_PORT + 1);
    for client in [CLIENT, second] {
        datapath.run(&frame6(client, VIP, SYN6));
    }
    assert_eq!(datapath.conntrack6().len(), 4);
    // The first flow's two entries idle past their timeouts.
    datapath.expire6(CtKey::new(tuple6(CLIENT, VIP), proto::TCP));
    datapath.expire6(CtKey::new(tuple6(BACKEND, CLIENT), proto::TCP));

    let report = Reaper::load(datapath.pins()).unwrap().sweep().unwrap();
    assert_eq!(report.reaped(), 2);
    let left = datapath.conntrack6();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains_key(&CtKey::new(tuple6(second, VIP), proto::TCP)));
    let pending6 = report
        .tables
        .iter()
        .find(|table| table.map == map_names::CONNTRACK_PENDING6)
        .unwrap();
    assert_eq!((pending6.entries, pending6.reaped), (4, 2));
}

#[test]
fn a_node_port_reply_is_routed_by_the_program_with_its_hop_limit_decremented() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node("pods", || {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service6(
            frontend6(NODE_PORT.0, NODE_PORT.1, proto::TCP),
            &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
            service_flags::NODE_PORT,
        );
        // To a pod of this node: DNAT, and the kernel forwards it.
        assert_translated6(
            &datapath,
            &frame6(CLIENT, NODE_PORT, SYN6),
            &frame6(CLIENT, BACKEND, SYN6),
        );
        // The reply leaves with the node's address as source: the program routes it (the
        // kernel would drop it as a martian), one hop less.
        let (verdict, out) = datapath.run(&frame6(BACKEND, CLIENT, SYN_ACK6));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let routed = frame6_with(NODE_PORT, CLIENT, SYN_ACK6, &[], 63);
        assert_eq!(out, routed, "{out:02x?}");
        assert!(wire::ipv6_checksum_valid(&out));
        datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
    });
}

#[test]
fn a_node_port_to_a_backend_on_another_node_is_snated_both_ways() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node("lo", || {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service6(
            frontend6(NODE_PORT.0, NODE_PORT.1, proto::TCP),
            &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
            service_flags::NODE_PORT,
        );
        // Out through the device it came in on: the node's address and an SNAT port as
        // source (kube-proxy's MASQUERADE), routed by the program.
        let (verdict, out) = datapath.run(&frame6(CLIENT, NODE_PORT, SYN6));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let port = u16::from_be_bytes([out[54], out[55]]);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "port {port}");
        let snat = (NODE6, port);
        assert_eq!(out, frame6_with(snat, BACKEND, SYN6, &[], 63), "{out:02x?}");
        assert!(wire::ipv6_checksum_valid(&out));
        // The backend answers the node; the client gets the NodePort's answer.
        let (verdict, out) = datapath.run(&frame6(BACKEND, snat, SYN_ACK6));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(out, frame6_with(NODE_PORT, CLIENT, SYN_ACK6, &[], 63));
        let reply = datapath.conntrack6()[&CtKey::new(tuple6(BACKEND, snat), proto::TCP)];
        assert_eq!(
            reply.flags,
            ct_flags::SNAT | ct_flags::REPLY | ct_flags::ROUTES_ITSELF
        );
    });
}

#[test]
fn fragments_through_snat_are_routed_by_the_program_both_ways() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node("lo", || {
        let mut datapath = Datapath::load().unwrap();
        let server = (BACKEND6_1, 5353);
        datapath.add_service6(
            frontend6(NODE_PORT.0, NODE_PORT.1, proto::UDP),
            &[backend6(server.0, server.1, proto::UDP)],
            service_flags::NODE_PORT,
        );
        let (query, answer) = (payload(4000), payload(3000));
        let sent = wire::ipv6_fragments(&udp6(CLIENT, NODE_PORT, query), DATAGRAM_ID);
        let (verdict, out) = datapath.run(&sent[0]);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        // The UDP source port, behind the fixed and the fragment header.
        let port_at = wire::ETH_LEN + wire::IPV6_LEN + wire::IPV6_FRAGMENT_LEN;
        let snat = (NODE6, u16::from_be_bytes([out[port_at], out[port_at + 1]]));
        let expected = wire::ipv6_fragments(&udp6_with(snat, server, query, 63), DATAGRAM_ID);
        assert_eq!(out, expected[0], "{out:02x?}");
        // The later fragments go where the first went, routed by the program too.
        assert_fragments(&datapath, &sent[1..], TC_ACT_REDIRECT, &expected[1..]);

        let back = wire::ipv6_fragments(&udp6(server, snat, answer), DATAGRAM_ID);
        let expected = wire::ipv6_fragments(&udp6_with(NODE_PORT, CLIENT, answer, 63), DATAGRAM_ID);
        let out = assert_fragments(&datapath, &back, TC_ACT_REDIRECT, &expected);
        assert!(wire::ipv6_checksum_valid(&wire::ipv6_reassembled(&out)));
        // A later fragment whose hop limit runs out here: no error may be sent about it.
        let mut last_hop = back.last().unwrap().clone();
        last_hop[wire::ETH_LEN + 7] = 1;
        assert_eq!(datapath.run(&last_hop).0, TC_ACT_SHOT);
        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::REPLY, 1),
            (stat::FRAGMENT, 2 + 2),
            (stat::NOT_FORWARDABLE, 1),
        ]);
    });
}

#[test]
fn source_ranges_admit_ipv6_clients_inside_their_prefixes_only() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
        service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES,
    );
    // 2001:db8:18::/48 admitted; the client is inside, another one outside.
    datapath.allow_sources6(ip6(0x0018, 0), 48);
    let outside = (ip6(0x0020, 0x0a), CLIENT6_PORT);
    let (verdict, _) = datapath.run(&frame6(outside, VIP, SYN6));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, out) = datapath.run(&frame6(CLIENT, VIP, SYN6));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame6(CLIENT, BACKEND, SYN6));
    datapath.assert_stats(&[
        (stat::SOURCE_RANGE_DENIED, 1),
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
    ]);
}

#[test]
fn session_affinity_keeps_an_ipv6_client_on_its_backend() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND6_1, BACKEND6_2].map(|addr| backend6(addr, BACKEND6_PORT, proto::TCP));
    datapath.add_service6_with(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &backends,
        service_flags::CLUSTER_IP,
        10_800,
    );
    let backend_of = |out: &[u8]| -> [u8; 16] {
        out[wire::ETH_LEN + 24..wire::ETH_LEN + 40]
            .try_into()
            .unwrap()
    };
    let (_, first) = datapath.run(&frame6(CLIENT, VIP, SYN6));
    let chosen = backend_of(&first);
    // Every new connection of the client (another source port each) goes there too.
    for port in 1..=8 {
        let (verdict, out) = datapath.run(&frame6((CLIENT6, CLIENT6_PORT + port), VIP, SYN6));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            frame6(
                (CLIENT6, CLIENT6_PORT + port),
                (chosen, BACKEND6_PORT),
                SYN6
            )
        );
    }
    let remembered = datapath.affinity6();
    assert_eq!(remembered.len(), 1, "{remembered:?}");
    let (key, value) = remembered.into_iter().next().unwrap();
    assert_eq!(key.client_addr, v6(CLIENT6));
    assert_eq!(value.backend.addr, v6(chosen));
    datapath.assert_stats(&[(stat::CT_MISS, 9), (stat::NEW_FLOW, 9), (stat::AFFINITY, 8)]);
}

#[test]
fn a_packet_whose_hop_limit_runs_out_here_is_answered_with_time_exceeded() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node("pods", || {
        let mut datapath = Datapath::load().unwrap();
        tcp_service(&mut datapath);
        // Hop limit 1: the kernel's forwarding would answer it; the program does, before
        // it translates anything, about the packet as the client sent it, from the node's
        // address toward the client.
        let syn = frame6_with(CLIENT, VIP, SYN6, &[], 1);
        let (verdict, out) = datapath.run(&syn);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let quote = &syn[wire::ETH_LEN..wire::ETH_LEN + wire::IPV6_LEN + 8];
        let expected = wire::ipv6_frame(
            (MACS6.1, MACS6.0),
            NODE6,
            CLIENT6,
            64,
            &[],
            wire::ICMPV6,
            &[3, 0, 0, 0, 0, 0, 0, 0],
            Some(2),
            quote,
        );
        assert_eq!(out, expected, "{out:02x?}");
        assert!(wire::ipv6_checksum_valid(&out));
        datapath.assert_stats(&[(stat::TTL_EXCEEDED, 1), (stat::CT_MISS, 1)]);
    });
}

/// `trace`'s view of an IPv6 address and port.
fn trace_endpoint((address, port): ([u8; 16], u16)) -> Endpoint {
    Endpoint {
        address: IpAddr::from(address),
        port,
    }
}

#[test]
fn the_dry_run_of_an_ipv6_packet_records_its_addresses_and_writes_nothing() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = tcp_service(&mut datapath);
    let syn = TracePacket::opening(proto::TCP, trace_endpoint(CLIENT), trace_endpoint(VIP));
    let mut tracer = datapath.tracer();

    // A new connection: epx_trace6 records the frontend and backend it read.
    let report = tracer.run(&syn).unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "new_flow")
    );
    let frontend = report.frontend.as_ref().expect("the frontend was found");
    assert_eq!(
        (frontend.address, frontend.port),
        (IpAddr::from(VIP6), VIP6_PORT)
    );
    let backend = report.backend.as_ref().expect("a backend was selected");
    assert_eq!(
        (backend.id, backend.address, backend.port),
        (ids[0], IpAddr::from(BACKEND6_1), BACKEND6_PORT)
    );
    let output = report.output.as_ref().expect("the rewritten packet");
    assert_eq!(output.destination, trace_endpoint(BACKEND));
    assert_eq!(output.family, "IPv6");
    assert!(
        report.decided_by[0].starts_with("SERVICES6[[")
            && report.decided_by[1].starts_with("BACKEND_SLOTS6["),
        "{:?}",
        report.decided_by
    );
    assert!(datapath.conntrack6().is_empty(), "the dry run wrote a flow");
    datapath.assert_stats(&[]);

    // A live flow: the trace of its next packet follows its CONNTRACK_PENDING6 entry.
    assert_translated6(
        &datapath,
        &frame6(CLIENT, VIP, SYN6),
        &frame6(CLIENT, BACKEND, SYN6),
    );
    let report = tracer.run(&syn).unwrap();
    assert_eq!(report.path, "ct_hit");
    let flow = report.conntrack.as_ref().expect("the flow's entry decided");
    assert_eq!(
        (flow.direction, flow.table, flow.nat, flow.backend_id),
        ("forward", "pending", trace_endpoint(BACKEND), ids[0])
    );
    assert!(
        report.decided_by[0].starts_with("CONNTRACK_PENDING6[tcp [2001:db8:"),
        "{:?}",
        report.decided_by
    );
    assert_eq!(
        report.backend.as_ref().map(|backend| backend.address),
        Some(IpAddr::from(BACKEND6_1))
    );
}

/// `trace --fragment` over IPv6: the dry run reports a first fragment's record without
/// writing it, and follows a later one through the live program's FRAGMENTS6 record.
#[test]
fn the_dry_run_of_ipv6_fragments_reports_and_follows_fragments6_and_writes_nothing() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let (dns, server) = udp_service(&mut datapath);
    let first = TracePacket {
        fragment: Fragment::First,
        ip_id: DATAGRAM_ID,
        length: 1496,
        ..TracePacket::opening(proto::UDP, trace_endpoint(CLIENT), trace_endpoint(dns))
    };
    // A first fragment: DNATed, with the record the live program would write for the
    // later ones reported (and none written).
    let report = datapath.tracer().run(&first).unwrap();
    let fragment = report.fragment.as_ref().unwrap();
    assert_eq!(fragment.part, "first");
    let record = fragment.record.as_ref().unwrap();
    assert_eq!(
        (record.verdict, record.destination),
        ("forward", IpAddr::from(server.0))
    );
    assert_eq!(
        report.output.as_ref().unwrap().destination,
        trace_endpoint(server)
    );
    assert!(datapath.fragments6().is_empty());
    assert!(datapath.conntrack6().is_empty());

    // The live program passes the datagram's first fragment: a later one follows it.
    let sent = wire::ipv6_fragments(&udp6(CLIENT, dns, payload(2000)), DATAGRAM_ID);
    assert_eq!(datapath.run(&sent[0]).0, TC_ACT_OK);
    let (stats, recorded) = (datapath.stats(), datapath.fragments6());
    let later = TracePacket {
        fragment: Fragment::Later,
        ..first
    };
    let report = datapath.tracer().run(&later).unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "fragment")
    );
    let record = report.fragment.as_ref().unwrap().record.as_ref().unwrap();
    assert_eq!(record.destination, IpAddr::from(server.0));
    let output = report.output.as_ref().unwrap();
    assert_eq!(output.destination.address, IpAddr::from(server.0));
    assert_eq!(output.fragment, Some("later"));
    // Another datagram of the client: its first fragment never passed.
    let unknown = TracePacket { ip_id: 7, ..later };
    let report = datapath.tracer().run(&unknown).unwrap();
    assert_eq!(report.path, "fragment_unmatched");
    assert!(report.fragment.unwrap().record.is_none());
    // A dry run writes nothing.
    assert_eq!(datapath.stats(), stats);
    assert_eq!(datapath.fragments6(), recorded);
}

/// The socket programs of both families (`connect6` and the others serve IPv6 frontends
/// and IPv4-mapped addresses), and `trace --connect`'s dry runs of `connect4` and
/// `connect6`, are accepted by this kernel's verifier, with room to spare. Their
/// translations are tested in the lab (`socket_lb`, `socket_lb6`): the kernel cannot
/// test-run cgroup socket programs.
#[test]
fn the_socket_programs_of_both_families_verify() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dry_runs = [sock_programs::CONNECT4_TRACE, sock_programs::CONNECT6_TRACE];
    for name in proxy_userspace::socket_lb::PROGRAMS
        .into_iter()
        .chain(dry_runs)
    {
        datapath.load_socket_program(name);
        let verified = datapath.verified_instructions(name);
        eprintln!("{name}: {verified} instructions verified");
        assert!(
            verified < 100_000,
            "{name}: {verified} instructions verified"
        );
    }
}
