//! Connection tracking through `BPF_PROG_TEST_RUN`, whole frames in and out as in
//! `testrun`: TCP states and their timeouts, where unanswered flows live (a SYN flood never
//! evicts an established flow), flows that clash on a reply tuple (issue 16: a Service flow
//! and a direct flow to the same backend port from the same client port), flows that leave
//! a backend which stopped serving, a new flow beside a reply entry the reaper is removing,
//! and the reaper the garbage collector runs.

mod datapath;

use datapath::*;
use proxy_common::{
    CtKey, CtTimeouts, CtValue, MembershipKey, ct_flags, ct_state, map_names, membership, proto,
    stat,
};
use proxy_userspace::conntrack::{CtTable, gc::Reaper, monotonic_now_ns};

const DNS: SocketAddrV4 = addr([198, 19, 0, 53], 53);
const DNS_2: SocketAddrV4 = addr([198, 19, 0, 54], 53);
const SERVER_1: SocketAddrV4 = addr([198, 18, 1, 10], 5353);
const SERVER_2: SocketAddrV4 = addr([198, 18, 1, 11], 5353);

/// Seconds until `value` expires, from now.
fn expires_in(value: &CtValue) -> u64 {
    value.expires_ns.saturating_sub(monotonic_now_ns()) / SECOND_NS
}

/// Asserts that both entries of the flow keyed `forward` / `reply` are in `map` with
/// `state` and expire in about `seconds`.
fn assert_flow(datapath: &Datapath, map: &str, keys: [CtKey; 2], state: u64, seconds: u32) {
    let entries = datapath.conntrack_map(map);
    for key in keys {
        let value = entries
            .get(&key)
            .unwrap_or_else(|| panic!("{key:?} not in {map}: {entries:?}"));
        assert_eq!(value.state, state, "{key:?}");
        let left = expires_in(value);
        assert!(
            (u64::from(seconds) - 2..=u64::from(seconds)).contains(&left),
            "{key:?} expires in {left} s, not {seconds} s"
        );
    }
}

/// The port the program gave `frame`'s source (a remapped client).
fn source_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

#[test]
fn tcp_states_follow_the_handshake_and_the_close_in_both_entries() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let keys = [
        ct_key(CLIENT, VIP, proto::TCP),
        ct_key(BACKEND_1, CLIENT, proto::TCP),
    ];
    let t = CtTimeouts::DEFAULT;
    let from_client = |transport| Frame::new(CLIENT, VIP, transport);
    let from_backend = |transport| Frame::new(BACKEND_1, CLIENT, transport);

    let syn = from_client(SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    assert_flow(
        &datapath,
        map_names::CONNTRACK_PENDING,
        keys,
        0,
        t.tcp_syn_sent,
    );

    let syn_ack = from_backend(SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
    let replied = ct_state::REPLIED;
    assert_flow(
        &datapath,
        map_names::CONNTRACK_PENDING,
        keys,
        replied,
        t.tcp_syn_recv,
    );

    // The handshake completes: the flow is assured and moves to CONNTRACK.
    let ack = from_client(ACK);
    assert_translated(&datapath, ack, ack.between(CLIENT, BACKEND_1));
    let established = replied | ct_state::ASSURED;
    assert_flow(
        &datapath,
        map_names::CONNTRACK,
        keys,
        established,
        t.tcp_established,
    );
    assert!(
        datapath
            .conntrack_map(map_names::CONNTRACK_PENDING)
            .is_empty()
    );

    let fin = from_client(FIN_ACK);
    assert_translated(&datapath, fin, fin.between(CLIENT, BACKEND_1));
    let half_closed = established | ct_state::FIN_CLIENT;
    assert_flow(
        &datapath,
        map_names::CONNTRACK,
        keys,
        half_closed,
        t.tcp_close_wait,
    );

    let fin_ack = from_backend(FIN_ACK);
    assert_translated(&datapath, fin_ack, fin_ack.between(VIP, CLIENT));
    let closed = half_closed | ct_state::FIN_BACKEND;
    assert_flow(
        &datapath,
        map_names::CONNTRACK,
        keys,
        closed,
        t.tcp_time_wait,
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::CT_HIT, 2),
        (stat::REPLY, 2),
    ]);
}

#[test]
fn an_unanswered_syn_keeps_its_backend_until_its_flow_expires() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
    );
    let first = chosen_backend(&datapath, CLIENT, &backends);
    // Retransmitted SYNs stay on the backend while the flow lives (SYN_SENT, 120 s)…
    for _ in 0..5 {
        assert_eq!(chosen_backend(&datapath, CLIENT, &backends), first);
    }
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::CT_HIT, 5)]);
    // … and are selected anew once it expired.
    datapath.expire(ct_key(CLIENT, VIP, proto::TCP));
    datapath.expire(ct_key(first, CLIENT, proto::TCP));
    chosen_backend(&datapath, CLIENT, &backends);
    datapath.assert_stats(&[(stat::CT_MISS, 2), (stat::NEW_FLOW, 2), (stat::CT_HIT, 5)]);
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP));
    assert_eq!((forward.packets, forward.state), (1, 0), "a fresh flow");
}

/// Opens a TCP connection from `client` to `VIP` through its handshake; returns the
/// backend.
fn establish(datapath: &Datapath, client: SocketAddrV4, backends: &[SocketAddrV4]) -> SocketAddrV4 {
    let chosen = chosen_backend(datapath, client, backends);
    let syn_ack = Frame::new(chosen, client, SYN_ACK);
    assert_translated(datapath, syn_ack, syn_ack.between(VIP, client));
    let ack = Frame::new(client, VIP, ACK);
    assert_translated(datapath, ack, ack.between(client, chosen));
    chosen
}

#[test]
fn a_syn_flood_never_evicts_established_flows() {
    const PENDING: u32 = 256;
    const ESTABLISHED: u16 = 32;
    const FLOOD: u16 = 4_000;
    let Some(mut datapath) = Datapath::load_with_conntrack(1_024, PENDING) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let clients = (0..ESTABLISHED).map(|i| addr(CLIENT.ip().octets(), 20_000 + i));
    for client in clients.clone() {
        establish(&datapath, client, &[BACKEND_1]);
    }
    // SYNs from everywhere that nobody completes: the backend answers none of them.
    for i in 0..FLOOD {
        let flooder = addr([203, 0, 113, (i % 200) as u8], 30_000 + i);
        let syn = Frame::new(flooder, VIP, SYN);
        assert_translated(&datapath, syn, syn.between(flooder, BACKEND_1));
    }
    let pending = datapath.conntrack_map(map_names::CONNTRACK_PENDING);
    assert!(pending.len() <= PENDING as usize, "{}", pending.len());
    let assured = datapath.conntrack_map(map_names::CONNTRACK);
    assert_eq!(assured.len(), 2 * usize::from(ESTABLISHED));
    for client in clients {
        let ack = Frame::new(client, VIP, ACK);
        assert_translated(&datapath, ack, ack.between(client, BACKEND_1));
    }
}

#[test]
fn a_full_conntrack_evicts_its_least_recently_used_flows() {
    const ASSURED: u32 = 1_024;
    const FLOWS: u16 = 800;
    let Some(mut datapath) = Datapath::load_with_conntrack(ASSURED, ASSURED) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let busy = addr(CLIENT.ip().octets(), 10_000);
    establish(&datapath, busy, &[BACKEND_1]);
    let busy_ack = Frame::new(busy, VIP, ACK);
    let busy_answer = Frame::new(BACKEND_1, busy, ACK);
    for i in 1..FLOWS {
        establish(
            &datapath,
            addr(CLIENT.ip().octets(), 10_000 + i),
            &[BACKEND_1],
        );
        // One connection keeps talking, both ways, while the others go quiet.
        assert_translated(&datapath, busy_ack, busy_ack.between(busy, BACKEND_1));
        assert_translated(&datapath, busy_answer, busy_answer.between(VIP, busy));
    }
    let assured = datapath.conntrack_map(map_names::CONNTRACK);
    assert!(assured.len() <= ASSURED as usize, "{}", assured.len());
    assert!(
        assured.contains_key(&ct_key(busy, VIP, proto::TCP))
            && assured.contains_key(&ct_key(BACKEND_1, busy, proto::TCP)),
        "the busy flow was evicted"
    );
    let first_quiet = ct_key(addr(CLIENT.ip().octets(), 10_001), VIP, proto::TCP);
    assert!(
        !assured.contains_key(&first_quiet),
        "the oldest quiet flow stayed"
    );
}

/// A TCP connection through `VIP` to its only backend, `BACKEND_1`, closed by both sides
/// (TIME_WAIT), or left open.
fn service_connection(datapath: &Datapath, close: bool) {
    establish(datapath, CLIENT, &[BACKEND_1]);
    if close {
        let fin = Frame::new(CLIENT, VIP, FIN_ACK);
        assert_translated(datapath, fin, fin.between(CLIENT, BACKEND_1));
        let fin_ack = Frame::new(BACKEND_1, CLIENT, FIN_ACK);
        assert_translated(datapath, fin_ack, fin_ack.between(VIP, CLIENT));
    }
}

#[test]
fn a_direct_connection_after_a_closed_service_connection_is_left_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    service_connection(&datapath, true);
    // The client's next connection, from the same port, straight to the backend: its
    // answers must not come back as the Service's.
    for (src, dst, transport) in [
        (CLIENT, BACKEND_1, SYN),
        (BACKEND_1, CLIENT, SYN_ACK),
        (CLIENT, BACKEND_1, ACK),
        (BACKEND_1, CLIENT, ACK),
    ] {
        assert_untouched(&datapath, &Frame::new(src, dst, transport).build());
    }
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::TCP));
    assert_eq!(
        reply.flags,
        ct_flags::DIRECT | ct_flags::REPLY,
        "the closed Service flow gave its reply tuple up"
    );
    assert_eq!(datapath.stats()["direct"], 4);
}

#[test]
fn a_direct_datagram_after_an_expired_service_flow_is_left_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    let answer = Frame::new(SERVER_1, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(DNS, CLIENT));
    datapath.expire(ct_key(CLIENT, DNS, proto::UDP));
    datapath.expire(ct_key(SERVER_1, CLIENT, proto::UDP));

    assert_untouched(&datapath, &Frame::new(CLIENT, SERVER_1, UDP).build());
    assert_untouched(&datapath, &Frame::new(SERVER_1, CLIENT, UDP).build());
    assert_eq!(datapath.stats()["direct"], 2);
}

#[test]
fn a_direct_flow_beside_a_live_service_flow_gets_another_port() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));

    // `dig -b client#40000 @server`: the same client port, straight to the backend, while
    // the Service flow lives. Netfilter would remap the newer flow's port; so do we.
    let direct = Frame::new(CLIENT, SERVER_1, UDP);
    let (verdict, out) = datapath.run(&direct.build());
    assert_eq!(verdict, TC_ACT_OK);
    let remapped = addr(CLIENT.ip().octets(), source_port(&out));
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&remapped.port()),
        "{remapped}"
    );
    assert_eq!(out, direct.between(remapped, SERVER_1).build());
    assert_checksums_valid(&out);
    // Each flow's answers come back the way they went.
    let direct_answer = Frame::new(SERVER_1, remapped, UDP);
    assert_translated(
        &datapath,
        direct_answer,
        direct_answer.between(SERVER_1, CLIENT),
    );
    let service_answer = Frame::new(SERVER_1, CLIENT, UDP);
    assert_translated(
        &datapath,
        service_answer,
        service_answer.between(DNS, CLIENT),
    );
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::CT_HIT, 1),
        (stat::REPLY, 1),
        (stat::DIRECT, 2),
        (stat::REMAPPED, 1),
    ]);
}

#[test]
fn a_direct_connection_beside_a_live_service_connection_gets_another_port() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    service_connection(&datapath, false);
    let syn = Frame::new(CLIENT, BACKEND_1, SYN);
    let (verdict, out) = datapath.run(&syn.build());
    assert_eq!(verdict, TC_ACT_OK);
    let remapped = addr(CLIENT.ip().octets(), source_port(&out));
    assert_eq!(out, syn.between(remapped, BACKEND_1).build());
    let syn_ack = Frame::new(BACKEND_1, remapped, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(BACKEND_1, CLIENT));
    let ack = Frame::new(CLIENT, BACKEND_1, ACK);
    assert_translated(&datapath, ack, ack.between(remapped, BACKEND_1));
    // The Service connection carries on, both ways.
    let data = Frame::new(CLIENT, VIP, ACK);
    assert_translated(&datapath, data, data.between(CLIENT, BACKEND_1));
    let answer = Frame::new(BACKEND_1, CLIENT, ACK);
    assert_translated(&datapath, answer, answer.between(VIP, CLIENT));
}

#[test]
fn a_service_connection_beside_a_live_direct_connection_gets_another_port() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    for (src, dst, transport) in [
        (CLIENT, BACKEND_1, SYN),
        (BACKEND_1, CLIENT, SYN_ACK),
        (CLIENT, BACKEND_1, ACK),
    ] {
        assert_untouched(&datapath, &Frame::new(src, dst, transport).build());
    }
    // The same client port to the Service, which has only that backend: the reply tuple
    // belongs to the direct connection, so the Service connection gets another port.
    let syn = Frame::new(CLIENT, VIP, SYN);
    let (verdict, out) = datapath.run(&syn.build());
    assert_eq!(verdict, TC_ACT_OK);
    let remapped = addr(CLIENT.ip().octets(), source_port(&out));
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&remapped.port()),
        "{remapped}"
    );
    assert_eq!(out, syn.between(remapped, BACKEND_1).build());
    let syn_ack = Frame::new(BACKEND_1, remapped, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
    // The direct connection's packets stay as they are.
    assert_untouched(&datapath, &Frame::new(BACKEND_1, CLIENT, ACK).build());
    assert_untouched(&datapath, &Frame::new(CLIENT, BACKEND_1, ACK).build());
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP));
    assert_eq!(forward.flags, ct_flags::REMAPPED);
}

#[test]
fn two_frontends_with_one_backend_never_share_a_reply_tuple() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    datapath.add_service(
        frontend(DNS_2, proto::UDP),
        &[backend(SERVER_1, proto::UDP)],
    );
    // One socket asks both Services (a resolver with two name servers).
    let first = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, first, first.between(CLIENT, SERVER_1));
    let second = Frame::new(CLIENT, DNS_2, UDP);
    let (_, out) = datapath.run(&second.build());
    let remapped = addr(CLIENT.ip().octets(), source_port(&out));
    assert_eq!(out, second.between(remapped, SERVER_1).build());
    let answer = Frame::new(SERVER_1, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(DNS, CLIENT));
    let answer_2 = Frame::new(SERVER_1, remapped, UDP);
    assert_translated(&datapath, answer_2, answer_2.between(DNS_2, CLIENT));
}

/// Takes `left` out of the DNS Service, which keeps `staying` (as the daemon writes it):
/// slots and header, then MEMBERSHIP (`serving`: the address still serves, as a
/// terminating endpoint does), then the epoch.
fn remove_from_dns(
    datapath: &mut Datapath,
    protocol: u8,
    left: SocketAddrV4,
    staying: SocketAddrV4,
    serving: bool,
) {
    let service = if protocol == proto::UDP { DNS } else { VIP };
    datapath.add_service(frontend(service, protocol), &[backend(staying, protocol)]);
    let bits = if serving { membership::SERVING } else { 0 };
    datapath.set_membership(member(left), bits);
    datapath.raise_membership_epoch();
}

#[test]
fn a_udp_flow_leaves_a_removed_backend_and_answers_in_flight_keep_their_translation() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    remove_from_dns(&mut datapath, proto::UDP, SERVER_1, SERVER_2, false);

    // The removed pod's answer to the query it got before the removal.
    let late = Frame::new(SERVER_1, CLIENT, UDP);
    assert_translated(&datapath, late, late.between(DNS, CLIENT));
    // The client keeps its port; its next query goes to a backend that serves.
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_2));
    let answer = Frame::new(SERVER_2, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(DNS, CLIENT));
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_2));
    datapath.assert_stats(&[
        (stat::CT_MISS, 2),
        (stat::NEW_FLOW, 2),
        (stat::BACKEND_LEFT, 1),
        (stat::REPLY, 2),
        (stat::CT_HIT, 1),
    ]);
}

#[test]
fn a_terminating_backend_keeps_its_udp_flows_but_gets_no_new_ones() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    remove_from_dns(&mut datapath, proto::UDP, SERVER_1, SERVER_2, true);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    let other = addr(CLIENT.ip().octets(), 40_001);
    let new_query = Frame::new(other, DNS, UDP);
    assert_translated(&datapath, new_query, new_query.between(other, SERVER_2));
}

#[test]
fn an_unanswered_syn_leaves_a_removed_backend_but_an_established_connection_stays() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let established = addr(CLIENT.ip().octets(), 40_001);
    establish(&datapath, established, &[BACKEND_1]);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    remove_from_dns(&mut datapath, proto::TCP, BACKEND_1, BACKEND_2, false);

    // The retransmitted SYN goes where new connections go now…
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_2));
    // … while the established connection keeps its backend, as with kube-proxy.
    let ack = Frame::new(established, VIP, ACK);
    assert_translated(&datapath, ack, ack.between(established, BACKEND_1));
    assert_eq!(datapath.stats()["backend_left"], 1);
}

#[test]
fn udp_flows_of_a_frontend_that_is_gone_end() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = frontend(DNS, proto::UDP);
    datapath.add_service(dns, &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    datapath.remove_service_entry(dns);
    datapath.set_membership(member(SERVER_1), 0);
    datapath.raise_membership_epoch();
    assert_untouched(&datapath, &query.build());
}

#[test]
fn udp_flows_end_when_the_last_serving_endpoint_leaves() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = frontend(DNS, proto::UDP);
    datapath.add_service(dns, &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    // The daemon's write: the frontend without endpoints, its last member gone.
    datapath.add_service(dns, &[]);
    datapath.set_membership(member(SERVER_1), 0);
    datapath.raise_membership_epoch();

    // The answer already on its way keeps its translation…
    let late = Frame::new(SERVER_1, CLIENT, UDP);
    assert_translated(&datapath, late, late.between(DNS, CLIENT));
    // … and the client's next query is refused, as after kube-proxy's CleanStaleEntries.
    assert_refused(&datapath, &query.build());
    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::REPLY, 1),
        (stat::BACKEND_LEFT, 1),
        (stat::REJECTED, 1),
    ]);
}

/// A client port's UDP flow comes back to a backend it left at the instant the collector
/// reaps the stale reply entry it left there (`epx_ct_reap` between its compare-and-exchange
/// and its delete): the new flow takes another port instead of being dropped, and both
/// directions of it are translated. `assured`: the stale entry sits in CONNTRACK.
fn a_new_flow_beside_a_reply_entry_being_removed_gets_another_port(assured: bool) {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let query = Frame::new(CLIENT, DNS, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_1));
    // The flow leaves SERVER_1; its reply entry there stays until it expires.
    remove_from_dns(&mut datapath, proto::UDP, SERVER_1, SERVER_2, false);
    assert_translated(&datapath, query, query.between(CLIENT, SERVER_2));
    let stale = ct_key(SERVER_1, CLIENT, proto::UDP);
    assert!(datapath.conntrack().contains_key(&stale));
    if assured {
        datapath.move_to_assured(stale);
    }
    // The flow is sent back to SERVER_1 while the reaper removes that entry.
    remove_from_dns(&mut datapath, proto::UDP, SERVER_2, SERVER_1, false);
    datapath.set_membership(member(SERVER_1), membership::SERVING);
    datapath.mark_removing(stale);

    let (verdict, out) = datapath.run(&query.build());
    assert_eq!(
        verdict,
        TC_ACT_OK,
        "the query was dropped: {:?}",
        datapath.stats()
    );
    let remapped = addr(CLIENT.ip().octets(), source_port(&out));
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&remapped.port()),
        "{remapped}"
    );
    assert_eq!(out, query.between(remapped, SERVER_1).build());
    assert_checksums_valid(&out);
    let answer = Frame::new(SERVER_1, remapped, UDP);
    assert_translated(&datapath, answer, answer.between(DNS, CLIENT));
    // The flow keeps its port; the entry being removed was left to its remover.
    assert_translated(&datapath, query, query.between(remapped, SERVER_1));
    assert_eq!(
        datapath.conntrack_entry(stale).expires_ns,
        proxy_common::EXPIRES_REMOVING
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, 3),
        (stat::NEW_FLOW, 3),
        (stat::BACKEND_LEFT, 2),
        (stat::REMAPPED, 1),
        (stat::REPLY, 1),
        (stat::CT_HIT, 1),
    ]);
}

#[test]
fn a_new_flow_beside_a_pending_reply_entry_being_removed_gets_another_port() {
    a_new_flow_beside_a_reply_entry_being_removed_gets_another_port(false);
}

#[test]
fn a_new_flow_beside_an_assured_reply_entry_being_removed_gets_another_port() {
    a_new_flow_beside_a_reply_entry_being_removed_gets_another_port(true);
}

/// The MEMBERSHIP key of `endpoint` in the test frontend.
fn member(endpoint: SocketAddrV4) -> MembershipKey {
    MembershipKey {
        rev_nat_id: REV_NAT_ID,
        addr: u32::from_ne_bytes(endpoint.ip().octets()),
    }
}

#[test]
fn the_reaper_removes_finished_flows_and_nothing_else() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(DNS, proto::UDP), &[backend(SERVER_1, proto::UDP)]);
    let client = |port| addr(CLIENT.ip().octets(), port);
    let keys = |port| {
        [
            ct_key(client(port), DNS, proto::UDP),
            ct_key(SERVER_1, client(port), proto::UDP),
        ]
    };
    for port in [40_001, 40_002, 40_003, 40_004] {
        let query = Frame::new(client(port), DNS, UDP);
        assert_translated(&datapath, query, query.between(client(port), SERVER_1));
        let answer = Frame::new(SERVER_1, client(port), UDP);
        assert_translated(&datapath, answer, answer.between(DNS, client(port)));
    }
    // 40001: over. 40002: the client went quiet, the server still talks. 40003: alive.
    // 40004: looked over when the collector read it, then its client came back.
    for key in keys(40_001)
        .into_iter()
        .chain([keys(40_002)[0]])
        .chain(keys(40_004))
    {
        datapath.expire(key);
    }
    let again = Frame::new(client(40_004), DNS, UDP);
    assert_translated(&datapath, again, again.between(client(40_004), SERVER_1));

    let reaper = Reaper::load(datapath.pins()).unwrap();
    let candidates: Vec<CtKey> = [40_001, 40_002, 40_003, 40_004]
        .into_iter()
        .flat_map(keys)
        .collect();
    assert_eq!(reaper.reap(CtTable::Pending, &candidates).unwrap(), 2);
    let left = datapath.conntrack();
    for key in keys(40_001) {
        assert!(!left.contains_key(&key), "{key:?} stayed");
    }
    for key in [40_002, 40_003, 40_004].into_iter().flat_map(keys) {
        assert!(left.contains_key(&key), "{key:?} was reaped");
    }
    // A sweep finds nothing more to do.
    let report = reaper.sweep().unwrap();
    assert_eq!(report.reaped(), 0);
    assert_eq!(report.tables[1].entries, 6);
}
