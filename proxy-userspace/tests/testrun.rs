//! Packet tests of the tc program `epx_ingress` through `BPF_PROG_TEST_RUN`, in the style
//! of Katran's fixtures: a crafted frame in, the exact verdict and the exact frame out.
//! The dry-run twin `epx_trace` (behind `ebpf-proxy trace`) is held to the same bytes, and
//! to leaving every map as it found it.
//!
//! Expected frames are built independently (etherparse, full checksums) and compared
//! whole; the output's checksums are also verified from scratch. Test-run skbs are not
//! CHECKSUM_PARTIAL, so every input frame carries fully valid checksums.
//!
//! Each test loads its own copy of the object (see `datapath`). Its maps are pinned by name, so aya needs a
//! bpffs directory: every test mounts a private bpffs instance and unmounts it on drop
//! (also on panic), which frees the maps.

mod datapath;

use std::net::IpAddr;

use datapath::*;
use etherparse::{Ethernet2Header, Ipv4Header, PacketBuilder};
use proxy_common::{
    AffinityValue, CtTimeouts, CtValue, FrontendValue, PROGRAM_NAME, PROGRAM6_NAME, RefusalLimits,
    XDP_PROGRAM_NAME, XDP6_PROGRAM_NAME, ct_flags, ct_state, map_names, proto, service_flags, stat,
};
use proxy_userspace::inspect::trace::TracePacket;

#[test]
fn new_tcp_flow_is_dnated_to_the_backend_and_tracked() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);

    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1)]);
    let conntrack = datapath.conntrack_map(map_names::CONNTRACK_PENDING);
    assert_eq!(
        conntrack.len(),
        2,
        "an unanswered flow waits in CONNTRACK_PENDING: {conntrack:?}"
    );
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP));
    assert!(forward.created > 0);
    // SYN_SENT: 120 s from the SYN on.
    let syn_sent = u64::from(CtTimeouts::DEFAULT.tcp_syn_sent) * SECOND_NS;
    let now = proxy_userspace::conntrack::monotonic_now_ns();
    assert!((now + syn_sent - 2 * SECOND_NS..=now + syn_sent).contains(&forward.expires_ns));
    assert_eq!(
        forward,
        CtValue {
            to: tuple(CLIENT, BACKEND_1),
            rev_nat_id: REV_NAT_ID,
            backend_id: ids[0],
            flags: 0,
            _pad: [0; 3],
            created: forward.created,
            epoch: 0,
            state: 0,
            expires_ns: forward.expires_ns,
            packets: 1,
            bytes: syn.build().len() as u64,
        }
    );
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::TCP));
    assert_eq!(
        reply,
        CtValue {
            to: tuple(VIP, CLIENT),
            flags: ct_flags::REPLY,
            packets: 0,
            bytes: 0,
            ..forward
        }
    );
}

#[test]
fn backend_reply_gets_the_frontend_as_source() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    let syn_ack = Frame::new(BACKEND_1, CLIENT, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));

    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::TCP));
    assert_eq!(reply.packets, 1);
    assert_eq!(reply.bytes, syn_ack.build().len() as u64);
}

#[test]
fn remote_backend_gets_the_node_address_and_an_snat_port_and_replies_are_reversed() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        let flags = service_flags::NODE_PORT;
        datapath.add_service_with(
            frontend(NODE_PORT, proto::TCP),
            &[backend(BACKEND_1, proto::TCP)],
            flags,
            0,
        );
        let syn = Frame::new(CLIENT, NODE_PORT, SYN);
        let (verdict, out) = datapath.run(&syn.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "{port}");
        let snat = addr([198, 18, 0, 1], port);
        assert_eq!(
            out,
            syn.between(snat, BACKEND_1).routed().build(),
            "{out:02x?}"
        );

        let ack = Frame::new(CLIENT, NODE_PORT, ACK);
        assert_routed(&datapath, ack, ack.between(snat, BACKEND_1));
        let syn_ack = Frame::new(BACKEND_1, snat, SYN_ACK);
        assert_routed(&datapath, syn_ack, syn_ack.between(NODE_PORT, CLIENT));

        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::CT_HIT, 1),
            (stat::REPLY, 1),
        ]);
        let forward = datapath.conntrack_entry(ct_key(CLIENT, NODE_PORT, proto::TCP));
        assert_eq!(forward.flags, ct_flags::SNAT | ct_flags::ROUTES_ITSELF);
        assert_eq!(forward.to, tuple(snat, BACKEND_1));
        let reply = datapath.conntrack_entry(ct_key(BACKEND_1, snat, proto::TCP));
        assert_eq!(
            reply.flags,
            ct_flags::SNAT | ct_flags::REPLY | ct_flags::ROUTES_ITSELF
        );
        assert_eq!(reply.to, tuple(NODE_PORT, CLIENT));
        assert_eq!(reply.packets, 1);
        assert_eq!(datapath.conntrack().len(), 2);
    });
}

#[test]
fn snat_udp_is_translated_both_ways() {
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
        let query = Frame::new(CLIENT, NODE_PORT, UDP);
        let (verdict, out) = datapath.run(&query.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let snat = addr([198, 18, 0, 1], u16::from_be_bytes([out[34], out[35]]));
        assert_eq!(out, query.between(snat, server).routed().build());
        let answer = Frame::new(server, snat, UDP);
        assert_routed(&datapath, answer, answer.between(NODE_PORT, CLIENT));
    });
}

#[test]
fn snat_ports_are_never_shared_and_running_out_drops() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service_with(
            frontend(NODE_PORT, proto::TCP),
            &[backend(BACKEND_1, proto::TCP)],
            service_flags::NODE_PORT,
            0,
        );
        // Two ports in the range: two clients get one each (the tries walk on from a
        // random port, so both are tried), the third finds none.
        let mut ports = Vec::new();
        for client_port in [40_001, 40_002] {
            let client = addr(CLIENT.ip().octets(), client_port);
            let (verdict, out) = datapath.run(&Frame::new(client, NODE_PORT, SYN).build());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            ports.push(u16::from_be_bytes([out[34], out[35]]));
        }
        ports.sort_unstable();
        assert_eq!(ports, [SNAT_PORTS.0, SNAT_PORTS.1]);
        let third = addr(CLIENT.ip().octets(), 40_003);
        let (verdict, _) = datapath.run(&Frame::new(third, NODE_PORT, SYN).build());
        assert_eq!(verdict, TC_ACT_SHOT);
        datapath.assert_stats(&[
            (stat::CT_MISS, 3),
            (stat::NEW_FLOW, 2),
            (stat::SNAT_FAILED, 1),
        ]);
    });
}

#[test]
fn hairpin_flow_gets_the_frontend_as_source_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    // BACKEND_1 is its own client: its source becomes the VIP, keeping its port.
    let client = addr(BACKEND_1.ip().octets(), 40_000);
    let masqueraded = addr(VIP.ip().octets(), client.port());

    let syn = Frame::new(client, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(masqueraded, BACKEND_1));
    let ack = Frame::new(client, VIP, ACK);
    assert_translated(&datapath, ack, ack.between(masqueraded, BACKEND_1));
    let syn_ack = Frame::new(BACKEND_1, masqueraded, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, client));

    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::CT_HIT, 1),
        (stat::REPLY, 1),
    ]);
    let forward = datapath.conntrack_entry(ct_key(client, VIP, proto::TCP));
    assert_eq!(forward.flags, ct_flags::HAIRPIN);
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, masqueraded, proto::TCP));
    assert_eq!(reply.flags, ct_flags::HAIRPIN | ct_flags::REPLY);
    assert_eq!(reply.packets, 1);
    assert_eq!(datapath.conntrack().len(), 2);
}

#[test]
fn hairpin_udp_is_translated_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr(VIP.ip().octets(), 53);
    let server = addr(BACKEND_1.ip().octets(), 5353);
    datapath.add_service(frontend(dns, proto::UDP), &[backend(server, proto::UDP)]);
    let client = addr(server.ip().octets(), 40_000);
    let masqueraded = addr(dns.ip().octets(), client.port());

    let query = Frame::new(client, dns, UDP);
    assert_translated(&datapath, query, query.between(masqueraded, server));
    let answer = Frame::new(server, masqueraded, UDP);
    assert_translated(&datapath, answer, answer.between(dns, client));
}

#[test]
fn later_packets_of_a_flow_stay_on_its_backend() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
    );
    let (verdict, out) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_OK);
    let chosen = backends
        .into_iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends");

    let ack = Frame::new(CLIENT, VIP, ACK);
    for _ in 0..20 {
        assert_translated(&datapath, ack, ack.between(CLIENT, chosen));
    }
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::CT_HIT, 20)]);
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP));
    assert_eq!(forward.packets, 21);
    assert_eq!(
        forward.state, 0,
        "the backend never answered: still SYN_SENT"
    );
}

#[test]
fn fin_marks_the_flow_closing_and_a_new_syn_selects_again() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let forward_key = ct_key(CLIENT, VIP, proto::TCP);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    let fin = Frame::new(CLIENT, VIP, FIN_ACK);
    assert_translated(&datapath, fin, fin.between(CLIENT, BACKEND_1));
    assert_eq!(
        datapath.conntrack_entry(forward_key).state,
        ct_state::FIN_CLIENT
    );

    // The client reuses its port: a fresh selection replaces the closing entry.
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let forward = datapath.conntrack_entry(forward_key);
    assert_eq!((forward.state, forward.packets), (0, 1));
    datapath.assert_stats(&[(stat::CT_MISS, 2), (stat::NEW_FLOW, 2), (stat::CT_HIT, 1)]);
}

#[test]
fn udp_flow_is_translated_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    let dns_backend = addr([198, 18, 1, 53], 5353);
    datapath.add_service(
        frontend(dns, proto::UDP),
        &[backend(dns_backend, proto::UDP)],
    );

    let query = Frame::new(CLIENT, dns, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, dns_backend));
    let answer = Frame::new(dns_backend, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(dns, CLIENT));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
}

#[test]
fn udp_without_checksum_keeps_a_zero_checksum() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    let dns_backend = addr([198, 18, 1, 53], 5353);
    datapath.add_service(
        frontend(dns, proto::UDP),
        &[backend(dns_backend, proto::UDP)],
    );
    let no_checksum = Transport::Udp { checksum: false };

    let query = Frame::new(CLIENT, dns, no_checksum);
    assert_translated(&datapath, query, query.between(CLIENT, dns_backend));
    let answer = Frame::new(dns_backend, CLIENT, no_checksum);
    let (verdict, out) = datapath.run(&answer.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, answer.between(dns, CLIENT).build());
    let udp_checksum = Ethernet2Header::LEN + Ipv4Header::MIN_LEN + 6;
    assert_eq!(out[udp_checksum..udp_checksum + 2], [0, 0]);
}

#[test]
fn packet_to_a_non_service_address_passes_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    assert_untouched(&datapath, &Frame::new(CLIENT, OTHER, SYN).build());
    // The frontend's address, but another port, and another protocol.
    assert_untouched(
        &datapath,
        &Frame::new(CLIENT, addr([198, 19, 0, 10], 443), SYN).build(),
    );
    assert_untouched(&datapath, &Frame::new(CLIENT, VIP, UDP).build());
    datapath.assert_stats(&[(stat::PASS, 3)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn service_without_endpoints_refuses_tcp_with_an_icmp_port_unreachable() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    // 69 bytes: the 70-byte answer grows the packet.
    let syn = Frame::new(CLIENT, VIP, SYN).build();
    assert_refused(&datapath, &syn);
    assert_eq!(
        port_unreachable_for(&syn)[..],
        [
            // Ethernet: back to the sender's MAC.
            &[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00][..],
            // IPv4: tos 0xc0, length 56, TTL 64, ICMP, 198.19.0.10 → 198.18.0.10.
            &[0x45, 0xc0, 0x00, 0x38, 0, 0, 0, 0, 0x40, 0x01, 0xed, 0xcb],
            &[198, 19, 0, 10, 198, 18, 0, 10],
            // ICMP destination unreachable, port unreachable.
            &[0x03, 0x03, 0x5c, 0x84, 0, 0, 0, 0],
            // The refused SYN's IPv4 header and ports, sequence number.
            &syn[14..42],
        ]
        .concat()[..],
        "the expected answer itself, spelled out"
    );
    datapath.assert_stats(&[(stat::REJECTED, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn service_without_endpoints_refuses_udp_of_any_length() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    datapath.add_service(frontend(dns, proto::UDP), &[]);
    let short = Frame {
        payload: b"?",
        ..Frame::new(CLIENT, dns, UDP)
    };
    assert_refused(&datapath, &short.build());
    let long = Frame {
        payload: &[0x5a; 1200],
        ..Frame::new(CLIENT, dns, Transport::Udp { checksum: false })
    };
    assert_refused(&datapath, &long.build());
    datapath.assert_stats(&[(stat::REJECTED, 2)]);
    assert!(datapath.conntrack().is_empty());
}

/// Sends one SYN to `VIP` (a frontend without endpoints) from each of `clients` in turn;
/// returns how many were refused (answered) and how many dropped, checking that nothing
/// else happened, and how long the loop took.
fn refusals(datapath: &Datapath, clients: &[SocketAddrV4]) -> (u64, u64, std::time::Duration) {
    let started = std::time::Instant::now();
    let (mut answered, mut dropped) = (0, 0);
    for client in clients {
        let syn = Frame::new(*client, VIP, SYN).build();
        match datapath.run(&syn) {
            (TC_ACT_REDIRECT, out) => {
                assert_eq!(out, port_unreachable_for(&syn));
                answered += 1;
            }
            (TC_ACT_SHOT, _) => dropped += 1,
            (verdict, _) => panic!("verdict {verdict} for a refusal"),
        }
    }
    (answered, dropped, started.elapsed())
}

/// 60 SYNs from one client, each from another port.
fn one_client_flood() -> Vec<SocketAddrV4> {
    (0..60)
        .map(|port| addr([198, 18, 0, 10], 40_000 + port))
        .collect()
}

/// The kernel's per-peer limit (`icmp_ratelimit`, 1 s): one client gets a burst of 6
/// refusals, then one per second (the test allows one more per second it took); the rest
/// are dropped and counted. Another client still gets its own burst.
#[test]
fn refusals_to_one_client_stop_after_a_burst_of_six() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let flood = one_client_flood();
    let (answered, dropped, took) = refusals(&datapath, &flood);
    let refills = took.as_secs() + 1;
    assert!(
        (6..=6 + refills).contains(&answered),
        "{answered} refusals to one client in {took:?}"
    );
    let (other, _, _) = refusals(&datapath, &[addr([198, 18, 0, 11], 40_000)]);
    assert_eq!(other, 1, "another client has its own bucket");
    datapath.assert_stats(&[
        (stat::REJECTED, answered + other),
        (stat::REJECT_RATE_LIMITED, dropped),
    ]);
}

/// The kernel's node-wide limit (`icmp_msgs_per_sec`, `icmp_msgs_burst`): many clients,
/// one refusal each, share a budget of `burst`, charged a random 0-2 per refusal (1 on
/// average), so about 20 of 300 get an answer: at least 10 (every charge 2), at most 60
/// (60 charges summing below 20 has a probability far under 1e-20) plus what 1000/s
/// refills while the loop runs (a refill comes after 20 ms at the earliest).
#[test]
fn refusals_node_wide_stop_at_the_burst() {
    let Some(mut datapath) = Datapath::load_with(RefusalLimits {
        burst: 20,
        ..RefusalLimits::KERNEL_DEFAULTS
    }) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let clients: Vec<SocketAddrV4> = (0..300u16)
        .map(|i| addr([198, 18, 2 + (i / 200) as u8, (i % 200) as u8 + 1], 40_000))
        .collect();
    let (answered, dropped, took) = refusals(&datapath, &clients);
    let refills = (took.as_secs_f64() * 1000.0).ceil() as u64;
    assert!(
        (10..=60 + refills).contains(&answered),
        "{answered} of 300 clients refused in {took:?}"
    );
    datapath.assert_stats(&[
        (stat::REJECTED, answered),
        (stat::REJECT_RATE_LIMITED, dropped),
    ]);
}

/// An `icmp_ratemask` without "destination unreachable" leaves the kernel's port
/// unreachables unlimited, and so ours.
#[test]
fn an_icmp_ratemask_without_unreachable_lifts_the_limits() {
    let Some(mut datapath) = Datapath::load_with(RefusalLimits {
        limited: 0,
        ..RefusalLimits::KERNEL_DEFAULTS
    }) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let flood = one_client_flood();
    let (answered, dropped, _) = refusals(&datapath, &flood);
    assert_eq!((answered, dropped), (60, 0));
    datapath.assert_stats(&[(stat::REJECTED, 60)]);
}

#[test]
fn local_policy_frontend_without_local_endpoints_drops() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
    datapath.add_service_with(frontend(VIP, proto::TCP), &[], flags, 0);
    let (verdict, _) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn refusal_of_a_packet_with_ip_options_is_a_drop() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let syn = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(CLIENT, VIP, SYN)
    };
    let (verdict, _) = datapath.run(&syn.build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1)]);
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_others() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let load_balancer = addr([198, 18, 8, 1], 80);
    datapath.add_service_with(
        frontend(load_balancer, proto::TCP),
        &[backend(BACKEND_1, proto::TCP)],
        service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES,
        0,
    );
    datapath.allow_sources([198, 18, 0, 0], 24);
    datapath.allow_sources([203, 0, 113, 7], 32);

    let inside = Frame::new(CLIENT, load_balancer, SYN);
    assert_translated(&datapath, inside, inside.between(CLIENT, BACKEND_1));
    let single = addr([203, 0, 113, 7], 40_000);
    let exact = Frame::new(single, load_balancer, SYN);
    assert_translated(&datapath, exact, exact.between(single, BACKEND_1));
    for outside in [
        addr([198, 18, 1, 10], 40_000),
        addr([203, 0, 113, 8], 40_000),
    ] {
        let (verdict, _) = datapath.run(&Frame::new(outside, load_balancer, SYN).build());
        assert_eq!(verdict, TC_ACT_SHOT, "{outside}");
    }
    datapath.assert_stats(&[
        (stat::CT_MISS, 2),
        (stat::NEW_FLOW, 2),
        (stat::SOURCE_RANGE_DENIED, 2),
    ]);
    assert_eq!(
        datapath.conntrack().len(),
        4,
        "only the admitted flows are tracked"
    );
}

#[test]
fn affinity_sends_a_clients_new_connections_to_its_backend() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    let ids = datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    let first = chosen_backend(&datapath, CLIENT, &backends);
    for port in 50_000..50_030 {
        let client = addr(CLIENT.ip().octets(), port);
        assert_eq!(chosen_backend(&datapath, client, &backends), first);
    }
    datapath.assert_stats(&[
        (stat::CT_MISS, 31),
        (stat::NEW_FLOW, 31),
        (stat::AFFINITY, 30),
    ]);
    let key = Datapath::affinity_key(CLIENT);
    let remembered = datapath.affinity_map().get(&key, 0).unwrap();
    let index = backends.iter().position(|b| *b == first).unwrap();
    assert_eq!(remembered.backend_id, ids[index]);
    assert!(remembered.last_used_ns > 0);
}

#[test]
fn affinity_ends_after_the_timeout_and_when_the_backend_leaves() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1];
    let ids = datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    // A second backend that is no longer the frontend's (no MEMBERSHIP entry).
    let gone = backend(BACKEND_2, proto::TCP);
    datapath.insert_backend(ids[0] + 1, gone);
    let key = Datapath::affinity_key(CLIENT);
    let now = proxy_userspace::conntrack::monotonic_now_ns();
    let kept = backend(BACKEND_1, proto::TCP);
    let cases = [
        ("within the timeout", ids[0], kept, now - 5 * SECOND_NS, 1),
        ("past the timeout", ids[0], kept, now - 11 * SECOND_NS, 0),
        (
            "backend left the frontend",
            ids[0] + 1,
            gone,
            now - SECOND_NS,
            0,
        ),
    ];
    let mut affinity_hits = 0;
    for (flows, (name, backend_id, backend, last_used_ns, kept)) in (1..).zip(cases) {
        let remembered = AffinityValue {
            backend,
            backend_id,
            _pad: 0,
            last_used_ns,
        };
        datapath.affinity_map().insert(key, remembered, 0).unwrap();
        let client = addr(CLIENT.ip().octets(), 51_000 + flows as u16);
        assert_eq!(
            chosen_backend(&datapath, client, &backends),
            BACKEND_1,
            "{name}"
        );
        affinity_hits += kept;
        datapath.assert_stats(&[
            (stat::CT_MISS, flows),
            (stat::NEW_FLOW, flows),
            (stat::AFFINITY, affinity_hits),
        ]);
        let refreshed = datapath.affinity_map().get(&key, 0).unwrap();
        assert_eq!(
            refreshed.backend_id, ids[0],
            "{name}: the choice is remembered"
        );
        assert!(refreshed.last_used_ns >= now, "{name}: and its time");
    }
}

#[test]
fn a_header_naming_slots_beyond_the_array_drops() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.insert_service_entry(
        frontend(VIP, proto::TCP),
        FrontendValue {
            rev_nat_id: REV_NAT_ID,
            base: proxy_common::default_max_entries::BACKEND_SLOTS,
            count: 1,
            ..FrontendValue::default()
        },
    );
    let (verdict, _) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::BACKEND_MISSING, 1)]);
}

#[test]
fn a_slot_never_written_drops_rather_than_sending_to_nowhere() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    // The array's zeroes: no backend id, address 0.0.0.0.
    datapath.insert_service_entry(
        frontend(VIP, proto::TCP),
        FrontendValue {
            rev_nat_id: REV_NAT_ID,
            base: FIRST_SLOT + 100,
            count: 1,
            ..FrontendValue::default()
        },
    );
    let (verdict, _) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::BACKEND_MISSING, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn non_ip_and_ipv6_to_no_frontend_pass_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);

    let arp_request = [
        &[0xff; 6][..],               // broadcast
        &[0x02, 0, 0, 0, 0, 0x01],    // source MAC
        &[0x08, 0x06],                // ARP
        &[0, 1, 0x08, 0, 6, 4, 0, 1], // Ethernet/IPv4, request
        &[0x02, 0, 0, 0, 0, 0x01],    // sender MAC
        &CLIENT.ip().octets(),        // sender IP
        &[0; 6],                      // target MAC
        &VIP.ip().octets(),           // target IP
    ]
    .concat();
    assert_untouched(&datapath, &arp_request);

    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02])
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40_000, 80, 1_000, 64_240)
        .syn()
        .write(&mut ipv6, PAYLOAD)
        .unwrap();
    assert_untouched(&datapath, &ipv6);

    // ARP is not IP; the IPv6 packet is parsed and addressed to no IPv6 frontend.
    datapath.assert_stats(&[(stat::NOT_HANDLED, 1), (stat::PASS, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    // IHL 6: Router Alert (RFC 2113), 4 bytes.
    let syn = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(CLIENT, VIP, SYN)
    };
    assert_eq!(syn.build()[Ethernet2Header::LEN], 0x46);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let syn_ack = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(BACKEND_1, CLIENT, SYN_ACK)
    };
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    const FLOWS: u16 = 3_000;
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
    );
    let mut per_backend = [0_u32; 3];
    for port in 10_000..10_000 + FLOWS {
        let client = addr(CLIENT.ip().octets(), port);
        let (verdict, out) = datapath.run(&Frame::new(client, VIP, SYN).build());
        assert_eq!(verdict, TC_ACT_OK);
        let chosen = backends
            .iter()
            .position(|b| out[30..34] == b.ip().octets())
            .expect("DNATed to one of the backends");
        assert_eq!(out, Frame::new(client, backends[chosen], SYN).build());
        per_backend[chosen] += 1;
    }
    // Expected 1000 each, standard deviation ~26: these bounds only catch a broken spread.
    assert!(
        per_backend.iter().all(|n| (800..=1_200).contains(n)),
        "{per_backend:?}"
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, FLOWS.into()),
        (stat::NEW_FLOW, FLOWS.into()),
    ]);
}

#[test]
fn trace_rewrites_like_ingress_and_leaves_the_maps_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let mut tracer = datapath.tracer();
    let packet = trace_packet(CLIENT, VIP, proto::TCP);

    // Many runs, so they land on several CPUs: each finds its own per-CPU record.
    for _ in 0..20 {
        let report = tracer.run(&packet).unwrap();
        assert_eq!(
            (report.verdict.as_str(), report.path),
            ("accept", "new_flow")
        );
        assert!(report.conntrack.is_none());
        let backend = report.backend.expect("a backend was selected");
        assert_eq!(
            (backend.id, backend.address, backend.port),
            (ids[0], IpAddr::V4(*BACKEND_1.ip()), 8080)
        );
        assert_eq!(report.selection.map(|s| (s.slot, s.of)), Some((1, 1)));
        let output = report.output.expect("the rewritten packet");
        assert_eq!(output.destination.address, *BACKEND_1.ip());
    }
    datapath.assert_stats(&[]);
    assert!(datapath.conntrack().is_empty());

    // Byte for byte what epx_ingress makes of the same frame.
    let frame = packet.frame();
    let traced = tracer.run_frame(&frame).unwrap();
    let live = datapath.run(&frame);
    assert_eq!(traced, live);
    assert_eq!(live.0, TC_ACT_OK);
    assert_checksums_valid(&live.1);
}

#[test]
fn trace_follows_a_tracked_flow_and_its_replies() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::UDP),
        &backends.map(|b| backend(b, proto::UDP)),
    );
    let query = Frame::new(CLIENT, VIP, UDP);
    let (_, out) = datapath.run(&query.build());
    let chosen = backends
        .into_iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends");
    let conntrack_before = datapath.conntrack();
    let stats_before = datapath.stats();
    let mut tracer = datapath.tracer();

    let forward = tracer.run(&trace_packet(CLIENT, VIP, proto::UDP)).unwrap();
    assert_eq!(forward.path, "ct_hit");
    let flow = forward.conntrack.expect("the forward entry decided");
    assert_eq!(
        (flow.direction, flow.nat.address),
        ("forward", IpAddr::V4(*chosen.ip()))
    );
    assert_eq!(
        forward.backend.map(|b| b.address),
        Some(IpAddr::V4(*chosen.ip()))
    );
    assert!(forward.frontend.is_none(), "no SERVICES lookup on a hit");

    let reply = tracer
        .run(&trace_packet(chosen, CLIENT, proto::UDP))
        .unwrap();
    assert_eq!(reply.path, "reply");
    assert_eq!(reply.conntrack.map(|c| c.direction), Some("reply"));
    let output = reply.output.expect("the rewritten reply");
    assert_eq!(
        (output.source.address, output.source.port),
        (IpAddr::V4(*VIP.ip()), VIP.port())
    );

    assert_eq!(
        datapath.conntrack(),
        conntrack_before,
        "packet counts untouched"
    );
    assert_eq!(datapath.stats(), stats_before);
}

#[test]
fn trace_reports_drops_and_passes() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let local_only = addr([198, 19, 0, 11], 80);
    let flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
    datapath.add_service_with(frontend(local_only, proto::TCP), &[], flags, 0);
    let mut tracer = datapath.tracer();

    let refused = tracer.run(&trace_packet(CLIENT, VIP, proto::TCP)).unwrap();
    assert_eq!(
        (refused.verdict.as_str(), refused.path),
        ("redirect", "rejected")
    );
    assert_eq!(refused.frontend.map(|f| f.backend_count), Some(0));
    let dropped = tracer
        .run(&trace_packet(CLIENT, local_only, proto::TCP))
        .unwrap();
    assert_eq!(
        (dropped.verdict.as_str(), dropped.path),
        ("drop", "no_backend")
    );

    let passed = tracer
        .run(&trace_packet(CLIENT, OTHER, proto::TCP))
        .unwrap();
    assert_eq!((passed.verdict.as_str(), passed.path), ("accept", "pass"));
    assert!(passed.frontend.is_none() && passed.backend.is_none());
    datapath.assert_stats(&[]);
}

#[test]
fn trace_of_a_node_port_reply_stops_before_routing_it() {
    // The dry run asks the FIB about the reply as the live program would (its MTU and
    // TTL checks), so it runs where the node has a route to the client.
    on_a_node_with_local_backends(|| {
        let Some(mut datapath) = Datapath::load() else {
            return;
        };
        let node_port = frontend(VIP, proto::TCP);
        datapath.add_service(node_port, &[backend(BACKEND_1, proto::TCP)]);
        let header = datapath.service_entry(node_port);
        datapath.insert_service_entry(
            node_port,
            FrontendValue {
                flags: proxy_common::service_flags::NODE_PORT,
                ..header
            },
        );
        let syn = Frame::new(CLIENT, VIP, SYN);
        assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
        let stats_before = datapath.stats();

        // A backend's first answer (`trace --tcp-flags syn,ack`): a SYN alone is never one.
        let syn_ack = TracePacket {
            tcp_flags: proxy_common::tcp_flags::SYN | proxy_common::tcp_flags::ACK,
            ..trace_packet(BACKEND_1, CLIENT, proto::TCP)
        };
        let report = datapath.tracer().run(&syn_ack).unwrap();
        assert_eq!((report.verdict.as_str(), report.path), ("accept", "reply"));
        assert!(
            report.routes_reply,
            "the live program would route this reply itself"
        );
        let output = report.output.expect("the rewritten reply");
        assert_eq!(
            (output.source.address, output.source.port),
            (IpAddr::V4(*VIP.ip()), VIP.port())
        );
        assert_eq!(datapath.stats(), stats_before);
    });
}

#[test]
fn trace_shows_a_backend_kept_by_affinity_and_leaves_it_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    let first = chosen_backend(&datapath, CLIENT, &backends);
    let key = Datapath::affinity_key(CLIENT);
    let remembered = datapath.affinity_map().get(&key, 0).unwrap();
    let stats_before = datapath.stats();
    let mut tracer = datapath.tracer();

    let report = tracer
        .run(&trace_packet(
            addr(CLIENT.ip().octets(), 50_001),
            VIP,
            proto::TCP,
        ))
        .unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "new_flow")
    );
    assert!(report.selection.is_none(), "no slot was drawn");
    assert_eq!(
        report.backend.map(|b| b.address),
        Some(IpAddr::V4(*first.ip()))
    );
    assert!(
        report
            .decided_by
            .iter()
            .any(|line| line.starts_with("AFFINITY[")),
        "{:?}",
        report.decided_by
    );
    assert_eq!(datapath.affinity_map().get(&key, 0).unwrap(), remembered);
    assert_eq!(datapath.stats(), stats_before);
}

#[test]
fn the_datapath_verifies_with_room_to_spare() {
    let Some(datapath) = Datapath::load() else {
        return;
    };
    // The kernel's verifier walks at most 1,000,000 instructions per program; a program
    // near that limit fails to load after the next small change. This one's share is a
    // budget for everyone changing the packet path, which both programs run.
    for program in [
        PROGRAM_NAME,
        PROGRAM6_NAME,
        XDP_PROGRAM_NAME,
        XDP6_PROGRAM_NAME,
    ] {
        let verified = datapath.verified_instructions(program);
        eprintln!("{program}: {verified} instructions verified");
        assert!(
            verified < 750_000,
            "{program} took the verifier {verified} instructions of its 1,000,000: split the \
             packet path further (subprograms where paths meet, see main.rs) before adding to it"
        );
    }
}
