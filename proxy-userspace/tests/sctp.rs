//! SCTP Services through `BPF_PROG_TEST_RUN` (this kernel has no SCTP sockets, so frames
//! are the proof): a crafted frame in, the exact frame out. Expected frames carry a CRC32c
//! computed from scratch, bit by bit (`datapath::wire::crc32c`), so an output equal to them
//! has the CRC a full recomputation gives — the program itself only updates it for the
//! changed ports (`proxy_common::sctp`).

mod datapath;

use datapath::*;
use proxy_common::{CtTimeouts, FlowState, ct_flags, proto, sctp, service_flags, stat};

/// The CRC32c field of a built frame without IPv4 options.
fn crc_of(frame: &[u8]) -> [u8; 4] {
    let at = 14 + 20 + sctp::CHECKSUM_OFFSET;
    frame[at..at + 4].try_into().unwrap()
}

/// The datapath with one SCTP Service, VIP:80 → BACKEND_1:8080: every translation
/// changes a port.
fn with_one_service() -> Option<Datapath> {
    let mut datapath = Datapath::load()?;
    datapath.add_service(
        frontend(VIP, proto::SCTP),
        &[backend(BACKEND_1, proto::SCTP)],
    );
    Some(datapath)
}

fn assert_crc_valid(frame: &[u8]) {
    assert_eq!(
        wire::sctp_checksum_valid(&frame[14 + 20..]),
        Some(true),
        "CRC32c of {}",
        wire::hex(frame)
    );
}

#[test]
fn an_association_is_dnated_with_its_crc_recomputed_and_replies_reversed() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    // Service port 80, target port 8080: both directions change a port.
    let ids = datapath.add_service(
        frontend(VIP, proto::SCTP),
        &[backend(BACKEND_1, proto::SCTP)],
    );

    let init = Frame::new(CLIENT, VIP, SCTP_INIT);
    let expected = init.between(CLIENT, BACKEND_1);
    assert_translated(&datapath, init, expected);
    assert_ne!(crc_of(&init.build()), crc_of(&expected.build()));

    let init_ack = Frame::new(BACKEND_1, CLIENT, SCTP_INIT_ACK);
    assert_translated(&datapath, init_ack, init_ack.between(VIP, CLIENT));
    // COOKIE ECHO (any chunk but INIT and ABORT) completes the handshake.
    let cookie_echo = Frame::new(
        CLIENT,
        VIP,
        Transport::Sctp {
            chunk: 10,
            checksum: true,
        },
    );
    assert_translated(
        &datapath,
        cookie_echo,
        cookie_echo.between(CLIENT, BACKEND_1),
    );
    let data = Frame::new(BACKEND_1, CLIENT, SCTP_DATA);
    assert_translated(&datapath, data, data.between(VIP, CLIENT));

    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::CT_HIT, 1),
        (stat::REPLY, 2),
    ]);
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::SCTP));
    assert_eq!(forward.to, tuple(CLIENT, BACKEND_1));
    assert_eq!(forward.backend_id, ids[0]);
    assert_eq!(forward.packets, 2);
    assert_eq!(
        FlowState::of(proto::SCTP, forward.state),
        FlowState::Established
    );
    // An established association idles out as a TCP connection does.
    let established = u64::from(CtTimeouts::DEFAULT.tcp_established) * SECOND_NS;
    let now = proxy_userspace::conntrack::monotonic_now_ns();
    assert!(forward.expires_ns > now + established - 2 * SECOND_NS);
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::SCTP));
    assert_eq!(reply.to, tuple(VIP, CLIENT));
    assert_eq!(reply.flags, ct_flags::REPLY);
}

#[test]
fn an_address_only_rewrite_leaves_the_crc_as_it_was() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let vip = addr(VIP.ip().octets(), 3868);
    let server = addr(BACKEND_1.ip().octets(), 3868);
    datapath.add_service(frontend(vip, proto::SCTP), &[backend(server, proto::SCTP)]);
    let init = Frame::new(CLIENT, vip, SCTP_INIT);
    let (verdict, out) = datapath.run(&init.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, init.between(CLIENT, server).build());
    // The CRC32c covers no addresses.
    assert_eq!(crc_of(&out), crc_of(&init.build()));
    let init_ack = Frame::new(server, CLIENT, SCTP_INIT_ACK);
    assert_translated(&datapath, init_ack, init_ack.between(vip, CLIENT));
}

#[test]
fn a_long_packet_gets_the_crc_a_full_recomputation_gives() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    // Lengths across both bytes of the program's length tables, up to a 1500-byte MTU.
    static VALUE: [u8; 1452] = {
        let mut value = [0u8; 1452];
        let mut i = 0;
        while i < value.len() {
            value[i] = (i * 7 + 3) as u8;
            i += 1;
        }
        value
    };
    for len in [0, 1, 200, 252, 253, 700, 1452] {
        let data = Frame {
            payload: &VALUE[..len],
            ..Frame::new(CLIENT, VIP, SCTP_DATA)
        };
        let (verdict, out) = datapath.run(&data.build());
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            data.between(CLIENT, BACKEND_1).build(),
            "value of {len}"
        );
        assert_crc_valid(&out);
    }
}

#[test]
fn a_crc_left_to_the_device_stays_zero() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    // A pod's SCTP socket behind a veth (SCTP CRC offload) sends the field zero; the
    // kernel or the NIC computes it over the packet as it leaves, rewritten ports included.
    let offloaded = Transport::Sctp {
        chunk: sctp::chunk::INIT,
        checksum: false,
    };
    let init = Frame::new(CLIENT, VIP, offloaded);
    let (verdict, out) = datapath.run(&init.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, init.between(CLIENT, BACKEND_1).build());
    assert_eq!(crc_of(&out), [0; 4]);
}

#[test]
fn a_node_port_to_another_node_is_snated_with_valid_crcs_both_ways() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service_with(
            frontend(NODE_PORT, proto::SCTP),
            &[backend(BACKEND_1, proto::SCTP)],
            service_flags::NODE_PORT,
            0,
        );
        let init = Frame::new(CLIENT, NODE_PORT, SCTP_INIT);
        let (verdict, out) = datapath.run(&init.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        // Both ports change: the SNAT source port and the target port.
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "{port}");
        let snat = addr([198, 18, 0, 1], port);
        assert_eq!(out, init.between(snat, BACKEND_1).routed().build());
        assert_crc_valid(&out);

        let init_ack = Frame::new(BACKEND_1, snat, SCTP_INIT_ACK);
        assert_routed(&datapath, init_ack, init_ack.between(NODE_PORT, CLIENT));
        let data = Frame::new(CLIENT, NODE_PORT, SCTP_DATA);
        assert_routed(&datapath, data, data.between(snat, BACKEND_1));

        let forward = datapath.conntrack_entry(ct_key(CLIENT, NODE_PORT, proto::SCTP));
        assert_eq!(forward.flags, ct_flags::SNAT | ct_flags::ROUTES_ITSELF);
        let reply = datapath.conntrack_entry(ct_key(BACKEND_1, snat, proto::SCTP));
        assert_eq!(reply.to, tuple(NODE_PORT, CLIENT));
    });
}

#[test]
fn a_backend_reaching_its_own_service_is_hairpinned() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    let client = addr(BACKEND_1.ip().octets(), 40_000);
    let masqueraded = addr(VIP.ip().octets(), client.port());
    let init = Frame::new(client, VIP, SCTP_INIT);
    assert_translated(&datapath, init, init.between(masqueraded, BACKEND_1));
    let init_ack = Frame::new(BACKEND_1, masqueraded, SCTP_INIT_ACK);
    assert_translated(&datapath, init_ack, init_ack.between(VIP, client));
    let forward = datapath.conntrack_entry(ct_key(client, VIP, proto::SCTP));
    assert_eq!(forward.flags, ct_flags::HAIRPIN);
}

#[test]
fn a_service_without_endpoints_refuses_with_an_icmp_port_unreachable() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::SCTP), &[]);
    assert_refused(&datapath, &Frame::new(CLIENT, VIP, SCTP_INIT).build());
    datapath.assert_stats(&[(stat::REJECTED, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn other_protocols_frontends_leave_sctp_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    // A TCP Service on the same address and port is no SCTP Service.
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    assert_untouched(&datapath, &Frame::new(CLIENT, VIP, SCTP_INIT).build());
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn abort_ends_the_association_and_a_new_init_selects_again() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    let init = Frame::new(CLIENT, VIP, SCTP_INIT);
    assert_translated(&datapath, init, init.between(CLIENT, BACKEND_1));
    let abort = Frame::new(
        BACKEND_1,
        CLIENT,
        Transport::Sctp {
            chunk: sctp::chunk::ABORT,
            checksum: true,
        },
    );
    assert_translated(&datapath, abort, abort.between(VIP, CLIENT));
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::SCTP));
    assert_eq!(FlowState::of(proto::SCTP, forward.state), FlowState::Close);
    // The client's next INIT on the same ports is a new association.
    assert_translated(&datapath, init, init.between(CLIENT, BACKEND_1));
    datapath.assert_stats(&[(stat::CT_MISS, 2), (stat::NEW_FLOW, 2), (stat::REPLY, 1)]);
}

#[test]
fn trace_rewrites_an_sctp_packet_as_ingress_does() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    let mut tracer = datapath.tracer();
    let packet = trace_packet(CLIENT, VIP, proto::SCTP);
    let report = tracer.run(&packet).unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "new_flow")
    );
    assert_eq!(
        (report.packet.protocol, report.packet.sctp_chunk),
        ("sctp", Some("INIT"))
    );
    let output = report.output.expect("the rewritten packet");
    assert_eq!(
        (output.destination.address, output.destination.port),
        (std::net::IpAddr::V4(*BACKEND_1.ip()), 8080)
    );
    let frame = packet.frame();
    let traced = tracer.run_frame(&frame).unwrap();
    let live = datapath.run(&frame);
    assert_eq!(traced, live);
    assert_eq!(live.0, TC_ACT_OK);
    assert_crc_valid(&live.1);
}

#[test]
fn an_icmp_error_about_an_association_reaches_the_client_with_its_quote_translated() {
    let Some(datapath) = with_one_service() else {
        return;
    };
    let init = Frame::new(CLIENT, VIP, SCTP_INIT);
    assert_translated(&datapath, init, init.between(CLIENT, BACKEND_1));
    let received = init.between(CLIENT, BACKEND_1).build();
    let error = |from: SocketAddrV4, about: &[u8], quote_len: usize| {
        let ip = wire::Ipv4Spec::new(from.ip().octets(), CLIENT.ip().octets(), 1);
        let quote = &about[wire::ETH_LEN..wire::ETH_LEN + quote_len];
        wire::frame(&ip, &wire::icmp(3, 3, [0; 4], quote))
    };
    // RFC 792's 8 bytes (the ports and verification tag), and the whole packet, whose
    // quoted CRC32c is kept valid as netfilter keeps it.
    let whole = received.len() - wire::ETH_LEN;
    for quote_len in [wire::IPV4_MIN_LEN + 8, whole] {
        let (verdict, out) = datapath.run(&error(BACKEND_1, &received, quote_len));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(
            out,
            error(VIP, &init.build(), quote_len),
            "a quote of {quote_len} bytes: {}",
            wire::hex(&out)
        );
        assert_eq!(
            wire::ones_complement_sum(&out[wire::ETH_LEN + 20..]),
            0xffff
        );
    }
    let quote = &error(VIP, &init.build(), whole)[wire::ETH_LEN + 28..];
    assert_eq!(wire::sctp_checksum_valid(&quote[20..]), Some(true));
}

/// The same associations over IPv6 (`epx_ingress6`): frames built by `datapath::ipv6`
/// (SCTP's CRC32c covers no pseudo-header, so only changed ports change it).
mod over_ipv6 {
    use super::*;
    use datapath::ipv6::ends::{BACKEND, CLIENT, NODE_PORT, VIP};
    use datapath::ipv6::*;
    use proxy_common::CtKey;

    const INIT6: L4 = L4::Sctp {
        chunk: sctp::chunk::INIT,
        checksum: true,
    };
    const INIT_ACK6: L4 = L4::Sctp {
        chunk: sctp::chunk::INIT_ACK,
        checksum: true,
    };
    const DATA6: L4 = L4::Sctp {
        chunk: 0,
        checksum: true,
    };
    /// Where the SCTP packet starts in a frame without extension headers.
    const SCTP_AT: usize = wire::ETH_LEN + wire::IPV6_LEN;

    fn crc_of6(frame: &[u8]) -> [u8; 4] {
        let at = SCTP_AT + sctp::CHECKSUM_OFFSET;
        frame[at..at + 4].try_into().unwrap()
    }

    /// Runs `frame`: TC_ACT_OK, exactly `expected`, its CRC32c valid.
    fn assert_translated6(datapath: &Datapath, frame: &[u8], expected: &[u8]) {
        let (verdict, out) = datapath.run(frame);
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, expected, "{}", wire::hex(&out));
        assert_eq!(wire::sctp_checksum_valid(&out[SCTP_AT..]), Some(true));
    }

    fn key6(src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> CtKey<proxy_common::Ipv6> {
        CtKey::new(tuple6(src, dst), proto::SCTP)
    }

    /// VIP6:80 → BACKEND6_1:8080 over SCTP: every translation changes a port.
    fn with_one_service6() -> Option<(Datapath, Vec<u32>)> {
        let mut datapath = Datapath::load()?;
        let ids = datapath.add_service6(
            frontend6(VIP6, VIP6_PORT, proto::SCTP),
            &[backend6(BACKEND6_1, BACKEND6_PORT, proto::SCTP)],
            service_flags::CLUSTER_IP,
        );
        Some((datapath, ids))
    }

    #[test]
    fn an_ipv6_association_is_dnated_with_its_crc_recomputed_and_replies_reversed() {
        let Some((datapath, ids)) = with_one_service6() else {
            return;
        };
        let init = frame6(CLIENT, VIP, INIT6);
        let dnated = frame6(CLIENT, BACKEND, INIT6);
        assert_translated6(&datapath, &init, &dnated);
        assert_ne!(crc_of6(&init), crc_of6(&dnated));
        assert_translated6(
            &datapath,
            &frame6(BACKEND, CLIENT, INIT_ACK6),
            &frame6(VIP, CLIENT, INIT_ACK6),
        );
        // COOKIE ECHO (any chunk but INIT and ABORT) completes the handshake.
        let cookie_echo = L4::Sctp {
            chunk: 10,
            checksum: true,
        };
        assert_translated6(
            &datapath,
            &frame6(CLIENT, VIP, cookie_echo),
            &frame6(CLIENT, BACKEND, cookie_echo),
        );
        assert_translated6(
            &datapath,
            &frame6(BACKEND, CLIENT, DATA6),
            &frame6(VIP, CLIENT, DATA6),
        );
        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::CT_HIT, 1),
            (stat::REPLY, 2),
        ]);
        let conntrack = datapath.conntrack6();
        let forward = conntrack[&key6(CLIENT, VIP)];
        assert_eq!(forward.to, tuple6(CLIENT, BACKEND));
        assert_eq!(forward.backend_id, ids[0]);
        assert_eq!(forward.packets, 2);
        assert_eq!(
            FlowState::of(proto::SCTP, forward.state),
            FlowState::Established
        );
        let reply = conntrack[&key6(BACKEND, CLIENT)];
        assert_eq!(reply.to, tuple6(VIP, CLIENT));
        assert_eq!(reply.flags, ct_flags::REPLY);
        assert!(datapath.conntrack().is_empty(), "IPv4's conntrack");
    }

    #[test]
    fn an_ipv6_address_only_rewrite_leaves_the_crc_as_it_was() {
        let Some(mut datapath) = Datapath::load() else {
            return;
        };
        let (vip, server) = ((VIP6, 3868), (BACKEND6_1, 3868));
        datapath.add_service6(
            frontend6(vip.0, vip.1, proto::SCTP),
            &[backend6(server.0, server.1, proto::SCTP)],
            service_flags::CLUSTER_IP,
        );
        let init = frame6(CLIENT, vip, INIT6);
        let dnated = frame6(CLIENT, server, INIT6);
        assert_translated6(&datapath, &init, &dnated);
        // The CRC32c covers no addresses (no pseudo-header).
        assert_eq!(crc_of6(&init), crc_of6(&dnated));
        assert_translated6(
            &datapath,
            &frame6(server, CLIENT, INIT_ACK6),
            &frame6(vip, CLIENT, INIT_ACK6),
        );
    }

    #[test]
    fn an_ipv6_crc_left_to_the_device_stays_zero() {
        let Some((datapath, _)) = with_one_service6() else {
            return;
        };
        let offloaded = L4::Sctp {
            chunk: sctp::chunk::INIT,
            checksum: false,
        };
        let (verdict, out) = datapath.run(&frame6(CLIENT, VIP, offloaded));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(out, frame6(CLIENT, BACKEND, offloaded));
        assert_eq!(crc_of6(&out), [0; 4]);
    }

    #[test]
    fn an_ipv6_tcp_frontend_leaves_sctp_alone() {
        let Some(mut datapath) = Datapath::load() else {
            return;
        };
        datapath.add_service6(
            frontend6(VIP6, VIP6_PORT, proto::TCP),
            &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
            service_flags::CLUSTER_IP,
        );
        assert_untouched(&datapath, &frame6(CLIENT, VIP, INIT6));
        assert!(datapath.conntrack6().is_empty());
    }

    #[test]
    fn an_ipv6_service_without_endpoints_refuses_with_an_icmpv6_port_unreachable() {
        let Some(mut datapath) = Datapath::load() else {
            return;
        };
        datapath.add_service6(
            frontend6(VIP6, VIP6_PORT, proto::SCTP),
            &[],
            service_flags::CLUSTER_IP,
        );
        let init = frame6(CLIENT, VIP, INIT6);
        let (verdict, out) = datapath.run(&init);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        // Type 1 code 4 from the frontend, quoting the IPv6 header and 8 bytes: the ports
        // and the verification tag.
        let expected = wire::ipv6_frame(
            (MACS6.1, MACS6.0),
            VIP6,
            CLIENT6,
            64,
            &[],
            wire::ICMPV6,
            &[1, 4, 0, 0, 0, 0, 0, 0],
            Some(2),
            &init[wire::ETH_LEN..SCTP_AT + 8],
        );
        assert_eq!(out, expected, "{}", wire::hex(&out));
        assert!(wire::ipv6_checksum_valid(&out));
        datapath.assert_stats(&[(stat::REJECTED, 1)]);
        assert!(datapath.conntrack6().is_empty());
    }

    #[test]
    fn abort_ends_an_ipv6_association_and_a_new_init_selects_again() {
        let Some((datapath, _)) = with_one_service6() else {
            return;
        };
        let (init, dnated) = (frame6(CLIENT, VIP, INIT6), frame6(CLIENT, BACKEND, INIT6));
        assert_translated6(&datapath, &init, &dnated);
        let abort = L4::Sctp {
            chunk: sctp::chunk::ABORT,
            checksum: true,
        };
        assert_translated6(
            &datapath,
            &frame6(BACKEND, CLIENT, abort),
            &frame6(VIP, CLIENT, abort),
        );
        let forward = datapath.conntrack6()[&key6(CLIENT, VIP)];
        assert_eq!(FlowState::of(proto::SCTP, forward.state), FlowState::Close);
        assert_translated6(&datapath, &init, &dnated);
        datapath.assert_stats(&[(stat::CT_MISS, 2), (stat::NEW_FLOW, 2), (stat::REPLY, 1)]);
    }

    #[test]
    fn an_ipv6_node_port_to_another_node_is_snated_with_valid_crcs_both_ways() {
        if !bpf_available() {
            return;
        }
        on_an_ipv6_node("lo", || {
            let mut datapath = Datapath::load().unwrap();
            datapath.add_service6(
                frontend6(NODE_PORT.0, NODE_PORT.1, proto::SCTP),
                &[backend6(BACKEND6_1, BACKEND6_PORT, proto::SCTP)],
                service_flags::NODE_PORT,
            );
            let (verdict, out) = datapath.run(&frame6(CLIENT, NODE_PORT, INIT6));
            assert_eq!(verdict, TC_ACT_REDIRECT);
            // Both ports change: the SNAT source port and the target port.
            let port = u16::from_be_bytes([out[SCTP_AT], out[SCTP_AT + 1]]);
            assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "{port}");
            let snat = (NODE6, port);
            assert_eq!(out, frame6_with(snat, BACKEND, INIT6, &[], 63));
            assert_eq!(wire::sctp_checksum_valid(&out[SCTP_AT..]), Some(true));
            let (verdict, out) = datapath.run(&frame6(BACKEND, snat, INIT_ACK6));
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(out, frame6_with(NODE_PORT, CLIENT, INIT_ACK6, &[], 63));
            assert_eq!(wire::sctp_checksum_valid(&out[SCTP_AT..]), Some(true));
            let reply = datapath.conntrack6()[&key6(BACKEND, snat)];
            assert_eq!(
                reply.flags,
                ct_flags::SNAT | ct_flags::REPLY | ct_flags::ROUTES_ITSELF
            );
        });
    }
}
