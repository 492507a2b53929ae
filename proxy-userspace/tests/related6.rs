//! ICMPv6 errors about a translated IPv6 flow, through `BPF_PROG_TEST_RUN`, as `related.rs`
//! tests ICMP's: the outer addresses and the quoted packet translated as the flow is, the
//! quoted UDP checksum and the ICMPv6 checksum (over its pseudo-header) kept valid. Every
//! expected frame is built from scratch (`datapath::wire`), its checksums computed there.

mod datapath;

use datapath::ipv6::ends::{BACKEND, CLIENT, VIP};
use datapath::ipv6::*;
use datapath::wire;
use datapath::*;
use proxy_common::{icmp6, proto, service_flags, stat};

/// A router between this node and the client.
const ROUTER: [u8; 16] = ip6(0x0018, 0xfe);

/// An ICMPv6 error of `icmp_type` and `code` (`rest`: the header's last four bytes) from
/// `from` to `to`, quoting `packet`'s IPv6 header and first 8 payload bytes.
fn icmp6_error(
    from: [u8; 16],
    to: [u8; 16],
    (icmp_type, code, rest): (u8, u8, [u8; 4]),
    packet: &[u8],
) -> Vec<u8> {
    let quote = &packet[wire::ETH_LEN..wire::ETH_LEN + wire::IPV6_LEN + 8];
    let header = [icmp_type, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    wire::ipv6_frame(
        MACS6,
        from,
        to,
        64,
        &[],
        wire::ICMPV6,
        &header,
        Some(2),
        quote,
    )
}

fn port_unreachable() -> (u8, u8, [u8; 4]) {
    (icmp6::DEST_UNREACH, icmp6::PORT_UNREACH, [0; 4])
}

/// "Packet too big" naming the next hop's `mtu`.
fn packet_too_big(mtu: u32) -> (u8, u8, [u8; 4]) {
    (icmp6::PACKET_TOO_BIG, 0, mtu.to_be_bytes())
}

/// Asserts tc passes the ICMPv6 error `error` on as `want`, byte for byte, its checksum
/// valid.
fn assert_error_translated(datapath: &Datapath, error: &[u8], want: &[u8]) {
    let (verdict, out) = datapath.run(error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, want, "{out:02x?}");
    assert!(wire::ipv6_checksum_valid(&out));
}

#[test]
fn a_backends_port_unreachable_reaches_the_client_from_the_service() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let (dns, server) = ((VIP6, 53), (BACKEND6_1, 5353));
    datapath.add_service6(
        frontend6(dns.0, dns.1, proto::UDP),
        &[backend6(server.0, server.1, proto::UDP)],
        service_flags::CLUSTER_IP,
    );
    let query = frame6(CLIENT, dns, L4::Udp);
    let dnated = frame6(CLIENT, server, L4::Udp);
    let (_, out) = datapath.run(&query);
    assert_eq!(out, dnated);
    // The backend has no listener: its kernel answers about the query as it got it.
    let error = icmp6_error(BACKEND6_1, CLIENT6, port_unreachable(), &dnated);
    // The client's socket, connected to the Service, accepts only this: from the Service,
    // quoting the query as it was sent (its UDP checksum, within the quote, too).
    let want = icmp6_error(VIP6, CLIENT6, port_unreachable(), &query);
    assert_error_translated(&datapath, &error, &want);
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::ICMP_ERROR, 1),
    ]);
}

#[test]
fn a_routers_packet_too_big_about_a_tcp_segment_to_a_backend_reaches_the_client() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, VIP6_PORT, proto::TCP),
        &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
        service_flags::CLUSTER_IP,
    );
    let syn = frame6(CLIENT, VIP, SYN6);
    datapath.run(&syn);
    // A router on the way to the backend cannot forward the segment: it quotes it as it
    // saw it (8 bytes of TCP: the checksum lies beyond the quote and stays as it was).
    let error = icmp6_error(
        ROUTER,
        CLIENT6,
        packet_too_big(1280),
        &frame6(CLIENT, BACKEND, SYN6),
    );
    // netfilter's translation: the quote as the client sent it, from the Service's address
    // (the flow's reply direction rewrites the source).
    let want = icmp6_error(VIP6, CLIENT6, packet_too_big(1280), &syn);
    assert_error_translated(&datapath, &error, &want);
}

#[test]
fn a_routers_packet_too_big_about_a_node_port_reply_reaches_the_backend() {
    if !bpf_available() {
        return;
    }
    on_an_ipv6_node("pods", || {
        let mut datapath = Datapath::load().unwrap();
        let node_port = (NODE6, 30_080);
        datapath.add_service6(
            frontend6(node_port.0, node_port.1, proto::TCP),
            &[backend6(BACKEND6_1, BACKEND6_PORT, proto::TCP)],
            service_flags::NODE_PORT,
        );
        datapath.run(&frame6(CLIENT, node_port, SYN6));
        // The backend's reply leaves with the node's address, routed by the program.
        let (verdict, out) = datapath.run(&frame6(BACKEND, CLIENT, SYN_ACK6));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let routed = frame6_with(node_port, CLIENT, SYN_ACK6, &[], 63);
        assert_eq!(out, routed);
        // A router toward the client: the reply was too big for its next hop. It answers
        // the node address the reply came from.
        let error = icmp6_error(ROUTER, NODE6, packet_too_big(1280), &routed);
        // To the backend, about its segment as it sent it (the hop limit in the quote is
        // the one the router saw): its TCP lowers its segment size.
        let want = icmp6_error(
            ROUTER,
            BACKEND6_1,
            packet_too_big(1280),
            &frame6_with(BACKEND, CLIENT, SYN_ACK6, &[], 63),
        );
        let (verdict, out) = datapath.run(&error);
        assert_eq!(verdict, TC_ACT_OK, "the kernel forwards it to the pod");
        assert_eq!(out, want, "{out:02x?}");
        assert!(wire::ipv6_checksum_valid(&out));
        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::REPLY, 1),
            (stat::ICMP_ERROR, 1),
        ]);
    });
}

#[test]
fn icmpv6_messages_about_nothing_tracked_pass_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service6(
        frontend6(VIP6, 53, proto::UDP),
        &[backend6(BACKEND6_1, 5353, proto::UDP)],
        service_flags::CLUSTER_IP,
    );
    // An error about a flow this node never saw.
    let other = (BACKEND6_2, 5353);
    let error = icmp6_error(
        BACKEND6_2,
        CLIENT6,
        port_unreachable(),
        &frame6(CLIENT, other, L4::Udp),
    );
    assert_untouched(&datapath, &error);
    // An echo request is no error.
    let echo = icmp6_error(
        BACKEND6_2,
        CLIENT6,
        (128, 0, [0, 1, 0, 1]),
        &frame6(CLIENT, other, L4::Udp),
    );
    assert_untouched(&datapath, &echo);
    datapath.assert_stats(&[(stat::PASS, 1), (stat::NOT_HANDLED, 1)]);
}
