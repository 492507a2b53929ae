//! Which backends a new connection chooses among, run through the real program with
//! BPF_PROG_TEST_RUN: an externalTrafficPolicy Local frontend gives outside clients its
//! local endpoints and pods of this node the Service port's Cluster set (kube-proxy's "pod
//! traffic for … external destinations" rule), and a client's session affinity is shared
//! by every frontend of its Service port (kube-proxy keeps one `recent` list per Service
//! port and endpoint).

mod datapath;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU16, Ordering};

use datapath::*;
use proxy_common::{device_kind, proto, service_flags, stat};

/// An external IP of the tests' Service port, beside its ClusterIP ([`VIP`]).
const EXTERNAL_IP: SocketAddrV4 = addr([198, 19, 0, 20], 80);
/// The external IP's frontend id (the ClusterIP's is [`REV_NAT_ID`]).
const EXTERNAL_REV_NAT_ID: u32 = REV_NAT_ID + 1;
/// New connections per check: all to one of three backends by chance with probability
/// 3 · (1/3)^30.
const CONNECTIONS: u16 = 30;
const ALL: [SocketAddrV4; 3] = [BACKEND_1, BACKEND_2, BACKEND_3];

fn tcp(backends: &[SocketAddrV4]) -> Vec<proxy_common::Backend> {
    backends.iter().map(|b| backend(*b, proto::TCP)).collect()
}

/// A port of [`CLIENT`] no connection of this process used yet: each connection is new.
fn fresh_client() -> SocketAddrV4 {
    static NEXT_PORT: AtomicU16 = AtomicU16::new(41_000);
    addr(
        CLIENT.ip().octets(),
        NEXT_PORT.fetch_add(1, Ordering::Relaxed),
    )
}

/// The backends `CONNECTIONS` new connections from fresh ports of [`CLIENT`] reached.
fn reached(
    datapath: &Datapath,
    frontend: SocketAddrV4,
    among: &[SocketAddrV4],
) -> BTreeSet<SocketAddrV4> {
    (0..CONNECTIONS)
        .map(|_| chosen_backend_of(datapath, fresh_client(), frontend, among))
        .collect()
}

#[test]
fn outside_clients_get_the_local_endpoints_and_pods_the_cluster_set() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_local_policy_service(
        frontend(VIP, proto::TCP),
        &tcp(&[BACKEND_1]),
        &tcp(&ALL),
        service_flags::EXTERNAL_IP,
        0,
    );

    // A device the daemon did not name, then an external one: outside, the local set.
    assert_eq!(reached(&datapath, VIP, &ALL), BTreeSet::from([BACKEND_1]));
    datapath.run_on_device(device_kind::EXTERNAL);
    assert_eq!(reached(&datapath, VIP, &ALL), BTreeSet::from([BACKEND_1]));

    // A pod's device: the Cluster set, every backend.
    datapath.run_on_device(device_kind::POD);
    assert_eq!(reached(&datapath, VIP, &ALL), BTreeSet::from(ALL));
    let flows = u64::from(CONNECTIONS) * 3;
    datapath.assert_stats(&[(stat::CT_MISS, flows), (stat::NEW_FLOW, flows)]);
}

#[test]
fn without_local_endpoints_outside_clients_are_dropped_and_pods_served() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_local_policy_service(
        frontend(VIP, proto::TCP),
        &[],
        &tcp(&[BACKEND_2]),
        service_flags::EXTERNAL_IP | service_flags::NO_LOCAL_ENDPOINTS,
        0,
    );
    let syn = Frame::new(CLIENT, VIP, SYN);
    let (verdict, out) = datapath.run(&syn.build());
    assert_eq!(
        (verdict, out),
        (TC_ACT_SHOT, syn.build()),
        "kube-proxy's DROP"
    );
    datapath.assert_stats(&[(stat::NO_BACKEND, 1)]);

    datapath.run_on_device(device_kind::POD);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_2));
    datapath.assert_stats(&[
        (stat::NO_BACKEND, 1),
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
    ]);
}

#[test]
fn pods_reach_remote_cluster_endpoints_with_their_own_address() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_local_policy_service(
            frontend(NODE_PORT, proto::TCP),
            &tcp(&[BACKEND_1]),
            &tcp(&[BACKEND_2]),
            service_flags::NODE_PORT,
            0,
        );
        // From outside, a backend reached through the arrival device is masqueraded
        // (kube-proxy would have only local endpoints here; the lab's are all remote).
        let outside = Frame::new(CLIENT, NODE_PORT, SYN);
        let (verdict, out) = datapath.run(&outside.build());
        assert_eq!(verdict, TC_ACT_REDIRECT, "SNAT, routed by the program");
        assert_eq!(out[30..34], BACKEND_1.ip().octets());
        assert_eq!(out[26..30], [198, 18, 0, 1], "the node address");

        // A pod keeps its address, as kube-proxy's KUBE-SVC jump does not masquerade.
        datapath.run_on_device(device_kind::POD);
        let pod = fresh_client();
        let syn = Frame::new(pod, NODE_PORT, SYN);
        assert_translated(&datapath, syn, syn.between(pod, BACKEND_2));
        let forward = datapath.conntrack_entry(ct_key(pod, NODE_PORT, proto::TCP));
        assert_eq!(forward.flags, 0, "no SNAT: {forward:?}");
        // The answer leaves from the node's address: the program routes it itself.
        let answer = Frame::new(BACKEND_2, pod, SYN_ACK);
        assert_routed(&datapath, answer, answer.between(NODE_PORT, pod));
    });
}

/// A Service port with session affinity: its ClusterIP ([`VIP`]) over every backend, and
/// an external IP over `external` — with externalTrafficPolicy Local (`local`), `external`
/// is its local set and every backend its Cluster set.
fn affinity_service_port(external: &[SocketAddrV4], local: bool) -> Option<Datapath> {
    let mut datapath = Datapath::load()?;
    datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &tcp(&ALL),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    let cluster = tcp(&ALL);
    let (cluster, flag) = if local {
        (Some(&cluster[..]), service_flags::CLUSTER_SET)
    } else {
        (None, 0)
    };
    datapath.add_frontend(
        frontend(EXTERNAL_IP, proto::TCP),
        EXTERNAL_REV_NAT_ID,
        &tcp(external),
        cluster,
        service_flags::EXTERNAL_IP | flag,
        AFFINITY_TIMEOUT_S,
    );
    Some(datapath)
}

/// The backend AFFINITY remembers for [`CLIENT`].
fn remembered(datapath: &mut Datapath) -> proxy_common::Backend {
    let key = Datapath::affinity_key(CLIENT);
    datapath.affinity_map().get(&key, 0).unwrap().backend
}

#[test]
fn affinity_is_shared_by_the_frontends_of_a_service_port() {
    let Some(mut datapath) = affinity_service_port(&ALL, false) else {
        return;
    };
    let first = chosen_backend_of(&datapath, fresh_client(), VIP, &ALL);
    let only_first = BTreeSet::from([first]);
    assert_eq!(reached(&datapath, EXTERNAL_IP, &ALL), only_first);
    assert_eq!(reached(&datapath, VIP, &ALL), only_first);
    let flows = 1 + 2 * u64::from(CONNECTIONS);
    datapath.assert_stats(&[
        (stat::CT_MISS, flows),
        (stat::NEW_FLOW, flows),
        (stat::AFFINITY, flows - 1),
    ]);
    assert_eq!(remembered(&mut datapath), backend(first, proto::TCP));
    let entries = datapath.affinity_map().keys().count();
    assert_eq!(entries, 1, "one entry per client and port");
}

#[test]
fn a_remembered_backend_outside_the_set_a_connection_chooses_from_is_not_reused() {
    // BACKEND_1 is the external IP's local endpoint.
    let Some(mut datapath) = affinity_service_port(&[BACKEND_1], true) else {
        return;
    };
    // The client's ClusterIP connections stick to a backend other than the local one.
    let mut remote = None;
    for _ in 0..CONNECTIONS {
        datapath
            .affinity_map()
            .remove(&Datapath::affinity_key(CLIENT))
            .ok();
        let chosen = chosen_backend_of(&datapath, fresh_client(), VIP, &ALL);
        if chosen != BACKEND_1 {
            remote = Some(chosen);
            break;
        }
    }
    let remote = remote.expect("a ClusterIP connection reached a remote backend");

    // Reaching the external IP as a pod: the Cluster set holds it, affinity keeps it.
    datapath.run_on_device(device_kind::POD);
    assert_eq!(
        reached(&datapath, EXTERNAL_IP, &ALL),
        BTreeSet::from([remote])
    );

    // As an outside client: the local set lacks it, the connection is balanced anew and
    // the local backend becomes the one remembered.
    datapath.run_on_device(device_kind::EXTERNAL);
    assert_eq!(
        reached(&datapath, EXTERNAL_IP, &ALL),
        BTreeSet::from([BACKEND_1])
    );
    assert_eq!(remembered(&mut datapath), backend(BACKEND_1, proto::TCP));
}

#[test]
fn a_full_affinity_map_forgets_clients_and_never_misroutes() {
    const ENTRIES: u32 = 8;
    let Some(mut datapath) = Datapath::load_with_affinity(ENTRIES) else {
        return;
    };
    datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &tcp(&ALL),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    // Four times as many clients as entries, each connecting twice.
    let clients: Vec<SocketAddrV4> = (0..4 * ENTRIES)
        .map(|index| addr([198, 18, 2, index as u8], 40_000))
        .collect();
    for round in 0..2u16 {
        for client in &clients {
            let remembered = datapath
                .affinity_map()
                .get(&Datapath::affinity_key(*client), 0)
                .ok();
            let port = addr(client.ip().octets(), 40_000 + round);
            let chosen = chosen_backend_of(&datapath, port, VIP, &ALL);
            if let Some(remembered) = remembered {
                // Still remembered: kept (the LRU may forget it only after this choice).
                assert_eq!(backend(chosen, proto::TCP), remembered.backend, "{client}");
            }
        }
        let held = datapath.affinity_map().keys().count();
        assert!(
            held <= ENTRIES as usize,
            "{held} entries in a map of {ENTRIES}"
        );
    }
    // Every connection got a backend of the Service; the ones whose client was forgotten
    // were balanced anew, not dropped.
    let flows = 2 * 4 * u64::from(ENTRIES);
    let stats = datapath.stats();
    assert_eq!(stats["new_flow"], flows, "{stats:?}");
    assert!(
        stats["affinity"] < flows / 2,
        "most clients were forgotten: {stats:?}"
    );
}
