//! Packet tests of the XDP program `epx_xdp` through `BPF_PROG_TEST_RUN`, byte for byte
//! like `testrun.rs`: what it translates and sends itself (XDP_TX, MACs from the FIB), what
//! it translates and marks for the stack (XDP_PASS with the `XDP_DECIDED` metadata, which
//! makes the tc program let the packet through), and what it leaves untouched to tc.

mod datapath;

use datapath::*;
use proxy_common::{ct_flags, ct_state, proto, service_flags, stat};
use proxy_userspace::xdp::{XDP_DROP, XDP_PASS, XDP_TX, XdpRun};

/// Runs `frame` through XDP (arriving on `ifindex`) and asserts it was sent back out of
/// that device as `expected`, byte for byte, with valid checksums.
fn assert_sent_back(datapath: &Datapath, ifindex: u32, frame: Frame, expected: Frame) -> XdpRun {
    let run = datapath.run_xdp_on(&frame.build(), ifindex);
    assert_eq!(run.action, XDP_TX, "{run:02x?}");
    assert_eq!(run.frame, expected.build(), "{:02x?}", run.frame);
    assert_checksums_valid(&run.frame);
    run
}

#[test]
fn a_new_flow_to_a_local_backend_is_dnated_and_marked_for_the_stack() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let syn = Frame::new(CLIENT, VIP, SYN);
    let run = datapath.run_xdp(&syn.build());
    assert_eq!(run.action, XDP_PASS);
    assert!(run.decided, "tc must let the translated packet through");
    assert_eq!(run.frame, syn.between(CLIENT, BACKEND_1).build());
    assert_checksums_valid(&run.frame);

    // The backend's answer comes back through its pod's device (tc), the client's next
    // packet through XDP again: the flow XDP recorded is the one tc follows.
    let syn_ack = Frame::new(BACKEND_1, CLIENT, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
    let ack = Frame::new(CLIENT, VIP, ACK);
    let run = datapath.run_xdp(&ack.build());
    assert!(run.action == XDP_PASS && run.decided);
    assert_eq!(run.frame, ack.between(CLIENT, BACKEND_1).build());
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::REPLY, 1),
        (stat::CT_HIT, 1),
        (stat::XDP_PASS, 2),
    ]);
    assert_eq!(
        datapath
            .conntrack_entry(ct_key(CLIENT, VIP, proto::TCP))
            .packets,
        2
    );
}

#[test]
fn udp_without_checksum_keeps_it_and_udp_with_one_is_updated_in_place() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr(VIP.ip().octets(), 53);
    let server = addr(BACKEND_1.ip().octets(), 5353);
    datapath.add_service(frontend(dns, proto::UDP), &[backend(server, proto::UDP)]);
    for (port, transport) in [(40_001, UDP), (40_002, Transport::Udp { checksum: false })] {
        let client = addr(CLIENT.ip().octets(), port);
        let query = Frame::new(client, dns, transport);
        let run = datapath.run_xdp(&query.build());
        assert!(run.action == XDP_PASS && run.decided);
        assert_eq!(run.frame, query.between(client, server).build());
        assert_checksums_valid(&run.frame);
    }
}

#[test]
fn a_packet_of_no_flow_and_no_frontend_passes_marked_and_untouched() {
    let Some(datapath) = Datapath::load() else {
        return;
    };
    let frame = Frame::new(CLIENT, OTHER, SYN).build();
    let run = datapath.run_xdp(&frame);
    assert!(
        run.action == XDP_PASS && run.decided,
        "tc need not look again"
    );
    assert_eq!(run.frame, frame);
    datapath.assert_stats(&[(stat::PASS, 1), (stat::XDP_PASS, 1)]);
}

#[test]
fn refusals_and_what_xdp_does_not_parse_are_left_to_tc() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let syn = Frame::new(CLIENT, VIP, SYN).build();
    assert_left_to_tc(&datapath.run_xdp(&syn), &syn);
    let fragment = Frame {
        more_fragments: true,
        ..Frame::new(CLIENT, VIP, UDP)
    }
    .build();
    assert_left_to_tc(&datapath.run_xdp(&fragment), &fragment);
    datapath.assert_stats(&[(stat::XDP_TO_TC, 2)]);
    // tc then refuses, as without XDP.
    assert_refused(&datapath, &syn);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn a_flow_that_must_select_again_is_left_to_tc_with_its_entry() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let key = ct_key(CLIENT, VIP, proto::TCP);
    let syn = Frame::new(CLIENT, VIP, SYN);
    let fin = Frame::new(CLIENT, VIP, FIN_ACK);
    for frame in [syn, fin] {
        let run = datapath.run_xdp(&frame.build());
        assert_eq!((run.action, run.decided), (XDP_PASS, true));
        assert_eq!(run.frame, frame.between(CLIENT, BACKEND_1).build());
    }
    let closing = datapath.conntrack_entry(key);
    assert_eq!(closing.state, ct_state::FIN_CLIENT);

    // The client reuses its port: XDP would have to retire the closing entry before it
    // selects again, so it leaves the SYN to tc whole, the entry as it was.
    let again = syn.build();
    assert_left_to_tc(&datapath.run_xdp(&again), &again);
    let kept = datapath.conntrack_entry(key);
    assert_eq!((kept.state, kept.packets), (closing.state, closing.packets));
    // tc retires it and selects, as without XDP.
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let fresh = datapath.conntrack_entry(key);
    assert_eq!((fresh.state, fresh.packets), (0, 1));
    datapath.assert_stats(&[
        (stat::XDP_PASS, 2),
        (stat::XDP_TO_TC, 1),
        (stat::CT_MISS, 2),
        (stat::NEW_FLOW, 2),
        (stat::CT_HIT, 1),
    ]);
}

#[test]
fn a_local_policy_frontend_without_local_endpoints_drops_in_xdp() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
    datapath.add_service_with(frontend(VIP, proto::TCP), &[], flags, 0);
    let run = datapath.run_xdp(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(run.action, XDP_DROP);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1), (stat::XDP_DROP, 1)]);
}

#[test]
fn a_remote_backend_gets_snat_and_both_directions_go_back_out_with_xdp_tx() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_a_wire(|wire| {
        let datapath = node_port_to(BACKEND_1);
        let syn = Frame::new(CLIENT, NODE_PORT, SYN).macs(CLIENT_MAC, NODE_MAC);
        let run = datapath.run_xdp_on(&syn.build(), wire);
        assert_eq!(run.action, XDP_TX, "{run:02x?}");
        let snat = addr(
            [198, 18, 0, 1],
            u16::from_be_bytes([run.frame[34], run.frame[35]]),
        );
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&snat.port()));
        let forwarded = syn.between(snat, BACKEND_1).macs(NODE_MAC, BACKEND_1_MAC);
        assert_eq!(run.frame, forwarded.routed().build());
        assert_checksums_valid(&run.frame);

        // The backend's answer: reverse SNAT and DNAT, back to the client.
        let syn_ack = Frame::new(BACKEND_1, snat, SYN_ACK).macs(BACKEND_1_MAC, NODE_MAC);
        let answered = syn_ack
            .between(NODE_PORT, CLIENT)
            .macs(NODE_MAC, CLIENT_MAC)
            .routed();
        assert_sent_back(&datapath, wire, syn_ack, answered);
        // The handshake's last ACK follows the flow.
        let ack = Frame::new(CLIENT, NODE_PORT, ACK).macs(CLIENT_MAC, NODE_MAC);
        let forwarded = ack
            .between(snat, BACKEND_1)
            .macs(NODE_MAC, BACKEND_1_MAC)
            .routed();
        assert_sent_back(&datapath, wire, ack, forwarded);

        let forward = datapath.conntrack_entry(ct_key(CLIENT, NODE_PORT, proto::TCP));
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
fn sctp_is_decided_in_xdp_as_tcp_is_with_its_crc_updated_for_the_port_change() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_a_wire(|wire| {
        let mut datapath = Datapath::load().unwrap();
        // To a local backend: DNAT (port 80 → 8080), marked for the stack. Expected frames
        // carry a CRC32c computed from scratch.
        datapath.add_service(
            frontend(VIP, proto::SCTP),
            &[backend(BACKEND_1, proto::SCTP)],
        );
        let init = Frame::new(CLIENT, VIP, SCTP_INIT);
        let run = datapath.run_xdp(&init.build());
        assert!(run.action == XDP_PASS && run.decided, "{run:02x?}");
        assert_eq!(run.frame, init.between(CLIENT, BACKEND_1).build());

        // To another node: SNAT, sent back out of the wire both ways.
        datapath.add_service_with(
            frontend(NODE_PORT, proto::SCTP),
            &[backend(BACKEND_1, proto::SCTP)],
            service_flags::NODE_PORT,
            0,
        );
        let init = Frame::new(CLIENT, NODE_PORT, SCTP_INIT).macs(CLIENT_MAC, NODE_MAC);
        let run = datapath.run_xdp_on(&init.build(), wire);
        assert_eq!(run.action, XDP_TX, "{run:02x?}");
        let snat = addr(
            [198, 18, 0, 1],
            u16::from_be_bytes([run.frame[34], run.frame[35]]),
        );
        let forwarded = init.between(snat, BACKEND_1).macs(NODE_MAC, BACKEND_1_MAC);
        assert_eq!(run.frame, forwarded.routed().build());
        let init_ack = Frame::new(BACKEND_1, snat, SCTP_INIT_ACK).macs(BACKEND_1_MAC, NODE_MAC);
        let answered = init_ack
            .between(NODE_PORT, CLIENT)
            .macs(NODE_MAC, CLIENT_MAC)
            .routed();
        let run = datapath.run_xdp_on(&init_ack.build(), wire);
        assert_eq!(run.action, XDP_TX, "{run:02x?}");
        assert_eq!(run.frame, answered.build());
        datapath.assert_stats(&[
            (stat::CT_MISS, 2),
            (stat::NEW_FLOW, 2),
            (stat::REPLY, 1),
            (stat::XDP_PASS, 1),
            (stat::XDP_TX, 2),
        ]);
    });
}

#[test]
fn without_the_next_hops_mac_xdp_records_nothing_and_tc_sends_the_packet() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_a_wire(|wire| {
        // BACKEND_2's MAC is not in the neighbour table.
        let datapath = node_port_to(BACKEND_2);
        let syn = Frame::new(CLIENT, NODE_PORT, SYN).build();
        assert_left_to_tc(&datapath.run_xdp_on(&syn, wire), &syn);
        assert!(datapath.conntrack().is_empty(), "nothing recorded");
        datapath.assert_stats(&[(stat::XDP_TO_TC, 1)]);
        // tc then translates it and hands it to bpf_redirect_neigh, which resolves the MAC.
        let (verdict, out) = datapath.run_on(&syn, wire);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(&out[30..34], &BACKEND_2.ip().octets(), "DNATed: {out:02x?}");
    });
}

/// The datapath with a NodePort of the wire's node address served by `server` alone.
fn node_port_to(server: SocketAddrV4) -> Datapath {
    let mut datapath = Datapath::load().unwrap();
    datapath.add_service_with(
        frontend(NODE_PORT, proto::TCP),
        &[backend(server, proto::TCP)],
        service_flags::NODE_PORT,
        0,
    );
    datapath
}
