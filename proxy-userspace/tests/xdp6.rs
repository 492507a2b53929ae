//! Packet tests of the XDP program's IPv6 path (`epx_xdp6`, which `epx_xdp` tail-calls for
//! IPv6) through `BPF_PROG_TEST_RUN`, as `xdp.rs` tests IPv4's: what it translates and
//! sends itself (XDP_TX, MACs from the FIB, the hop limit decremented), what it translates
//! and marks for the stack (XDP_PASS with the `XDP_DECIDED` metadata), and what it leaves
//! untouched to tc. Frames are built byte by byte (`datapath::wire`), their checksums
//! computed there over the IPv6 pseudo-header; outputs are compared whole and their
//! checksums verified from scratch.

mod datapath;

use datapath::ipv6::ends::{BACKEND, CLIENT, NODE_PORT, VIP};
use datapath::ipv6::*;
use datapath::wire;
use datapath::*;
use proxy_common::{CtKey, ct_flags, proto, service_flags, stat};
use proxy_userspace::xdp::{XDP_PASS, XDP_TX};

/// Runs `frame` through XDP and asserts it was translated to `expected` and marked for the
/// stack (tc lets it through), checksums valid.
fn assert_marked(datapath: &Datapath, frame: &[u8], expected: &[u8]) {
    let run = datapath.run_xdp(frame);
    assert_eq!((run.action, run.decided), (XDP_PASS, true), "{run:02x?}");
    assert_eq!(run.frame, expected, "{:02x?}", run.frame);
    assert!(wire::ipv6_checksum_valid(&run.frame));
}

/// Runs `frame` through XDP arriving on `wire` and asserts it was sent back out of it as
/// `expected`, checksums valid.
fn assert_sent_back(datapath: &Datapath, wire: u32, frame: &[u8], expected: &[u8]) {
    let run = datapath.run_xdp_on(frame, wire);
    assert_eq!(run.action, XDP_TX, "{run:02x?}");
    assert_eq!(run.frame, expected, "{:02x?}", run.frame);
    assert!(wire::ipv6_checksum_valid(&run.frame));
}

#[test]
fn a_new_flow_to_a_local_backend_is_dnated_and_marked_for_the_stack() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
        service_flags::CLUSTER_IP,
    );
    assert_marked(
        &datapath,
        &frame6(CLIENT, VIP, SYN6),
        &frame6(CLIENT, BACKEND, SYN6),
    );
    // The backend's answer comes back through its pod's device (tc), the client's next
    // packet through XDP again: the flow XDP recorded is the one tc follows.
    let (verdict, out) = datapath.run(&frame6(BACKEND, CLIENT, SYN_ACK6));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame6(VIP, CLIENT, SYN_ACK6));
    assert_marked(
        &datapath,
        &frame6(CLIENT, VIP, ACK6),
        &frame6(CLIENT, BACKEND, ACK6),
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::REPLY, 1),
        (stat::CT_HIT, 1),
        (stat::XDP_PASS, 2),
    ]);
    let forward = datapath.conntrack6()[&CtKey::new(tuple6(CLIENT, VIP), proto::TCP)];
    assert_eq!(forward.packets, 2);
    assert!(
        datapath.conntrack().is_empty(),
        "IPv4's conntrack saw nothing"
    );
}

#[test]
fn udp_is_dnated_with_its_checksum_updated_in_place() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let (dns, server) = ((VIP6, 53), (BACKEND6_1, 5353));
    datapath.add_service6(
        frontend6(dns.0, dns.1, proto::UDP),
        &[backend6(server.0, server.1, proto::UDP)],
        service_flags::CLUSTER_IP,
    );
    assert_marked(
        &datapath,
        &frame6(CLIENT, dns, L4::Udp),
        &frame6(CLIENT, server, L4::Udp),
    );
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::XDP_PASS, 1)]);
}

#[test]
fn a_packet_of_no_flow_and_no_frontend_passes_marked_and_untouched() {
    let Some(datapath) = Datapath::load() else {
        return;
    };
    let frame = frame6(CLIENT, (ip6(0x0019, 0x0b), 80), SYN6);
    assert_marked(&datapath, &frame, &frame);
    datapath.assert_stats(&[(stat::PASS, 1), (stat::XDP_PASS, 1)]);
}

#[test]
fn refusals_fragments_and_icmpv6_are_left_to_tc() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[],
        service_flags::CLUSTER_IP,
    );
    // tc builds the ICMPv6 refusal.
    let syn = frame6(CLIENT, VIP, SYN6);
    assert_left_to_tc(&datapath.run_xdp(&syn), &syn);
    // A fragmented datagram's first and later fragments (tc decides the first and records
    // it for the rest, so every fragment goes one way), and an ICMPv6 message (an echo
    // request to the frontend).
    let datagram = udp6(CLIENT, (VIP6, 53), payload(2000));
    for fragment in &wire::ipv6_fragments(&datagram, 7) {
        assert_left_to_tc(&datapath.run_xdp(fragment), fragment);
    }
    let echo = wire::ipv6_frame(
        MACS6,
        CLIENT6,
        VIP6,
        64,
        &[],
        wire::ICMPV6,
        &[128, 0, 0, 0, 0, 1, 0, 1],
        Some(2),
        PAYLOAD,
    );
    assert_left_to_tc(&datapath.run_xdp(&echo), &echo);
    datapath.assert_stats(&[(stat::XDP_TO_TC, 4)]);
    // tc then refuses, as without XDP.
    let (verdict, _) = datapath.run(&syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert!(datapath.conntrack6().is_empty());
}

#[test]
fn a_node_port_to_a_backend_on_another_node_is_snated_and_sent_back_out_with_xdp_tx() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node_with_a_wire(|wire| {
        let datapath = node_port_to(BACKEND6_1);
        let syn = frame6_via((CLIENT_MAC, NODE_MAC), CLIENT, NODE_PORT, SYN6, &[], 64);
        let run = datapath.run_xdp_on(&syn, wire);
        assert_eq!(run.action, XDP_TX, "{run:02x?}");
        // The node's address and an SNAT port as source, to the backend's MAC, one hop
        // less.
        let port = u16::from_be_bytes([run.frame[54], run.frame[55]]);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "port {port}");
        let snat = (NODE6, port);
        let forwarded = frame6_via((NODE_MAC, BACKEND_1_MAC), snat, BACKEND, SYN6, &[], 63);
        assert_eq!(run.frame, forwarded, "{:02x?}", run.frame);
        assert!(wire::ipv6_checksum_valid(&run.frame));

        // The backend's answer: reverse SNAT and DNAT, back to the client.
        let syn_ack = frame6_via((BACKEND_1_MAC, NODE_MAC), BACKEND, snat, SYN_ACK6, &[], 64);
        let answered = frame6_via((NODE_MAC, CLIENT_MAC), NODE_PORT, CLIENT, SYN_ACK6, &[], 63);
        assert_sent_back(&datapath, wire, &syn_ack, &answered);
        // The handshake's last ACK follows the flow.
        let ack = frame6_via((CLIENT_MAC, NODE_MAC), CLIENT, NODE_PORT, ACK6, &[], 64);
        let forwarded = frame6_via((NODE_MAC, BACKEND_1_MAC), snat, BACKEND, ACK6, &[], 63);
        assert_sent_back(&datapath, wire, &ack, &forwarded);

        let forward = datapath.conntrack6()[&CtKey::new(tuple6(CLIENT, NODE_PORT), proto::TCP)];
        assert_eq!(forward.flags, ct_flags::SNAT | ct_flags::ROUTES_ITSELF);
        assert_eq!(forward.packets, 2);
        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::REPLY, 1),
            (stat::CT_HIT, 1),
            (stat::XDP_TX, 3),
        ]);
    });
}

#[test]
fn without_the_next_hops_mac_xdp_records_nothing_and_tc_sends_the_packet() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node_with_a_wire(|wire| {
        // BACKEND6_2's MAC is not in the neighbour table.
        let datapath = node_port_to(BACKEND6_2);
        let syn = frame6(CLIENT, NODE_PORT, SYN6);
        assert_left_to_tc(&datapath.run_xdp_on(&syn, wire), &syn);
        assert!(datapath.conntrack6().is_empty(), "nothing recorded");
        datapath.assert_stats(&[(stat::XDP_TO_TC, 1)]);
        // tc then translates it and hands it to bpf_redirect_neigh, which resolves the MAC.
        let (verdict, out) = datapath.run_on(&syn, wire);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let destination = wire::ETH_LEN + 24;
        assert_eq!(
            &out[destination..destination + 16],
            &BACKEND6_2,
            "{out:02x?}"
        );
    });
}

/// The datapath with an IPv6 NodePort of [`NODE6`] served by `server` alone.
fn node_port_to(server: [u8; 16]) -> Datapath {
    let mut datapath = Datapath::load().unwrap();
    datapath.add_service6(
        frontend6(NODE_PORT.0, NODE_PORT.1, proto::TCP),
        &[backend6(server, BACKEND6_PORT, proto::TCP)],
        service_flags::NODE_PORT,
    );
    datapath
}
