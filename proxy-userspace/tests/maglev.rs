//! Maglev through `BPF_PROG_TEST_RUN`: a frontend whose header names a Maglev table sends
//! a client's new flow to the backend its table gives the client's address, port and
//! protocol. Two loaded objects stand for two nodes: their slices lie elsewhere in
//! BACKEND_SLOTS, yet they agree on every flow, in tc and in XDP; a backend leaving moves
//! its own flows and few others; session affinity still comes first; an
//! externalTrafficPolicy Local frontend's table covers its local endpoints only, while pods
//! reach its Cluster set at random; a header whose table is missing chooses at random
//! rather than dropping.

mod datapath;

use datapath::*;
use proxy_common::{device_kind, maglev::DEFAULT_TABLE_SIZE, proto, service_flags};
use proxy_userspace::xdp::XDP_PASS;

const BACKEND_4: SocketAddrV4 = addr([198, 18, 1, 13], 8080);
const BACKEND_5: SocketAddrV4 = addr([198, 18, 1, 14], 8080);
const BACKENDS: [SocketAddrV4; 5] = [BACKEND_1, BACKEND_2, BACKEND_3, BACKEND_4, BACKEND_5];
/// The table size the tests use besides the default: the smallest, so its table is a few
/// chunks.
const SMALL_TABLE: u32 = 251;

/// The `n`-th client: several addresses, many ports.
fn client(n: u16) -> SocketAddrV4 {
    addr([203, 0, 113, 1 + (n % 7) as u8], 40_000 + n)
}

/// A node with the NodePort frontend over `backends` and a Maglev table of `size`;
/// `others` frontends installed before it, so its slice starts elsewhere in BACKEND_SLOTS.
fn node(backends: &[SocketAddrV4], size: u32, others: u16) -> Option<Datapath> {
    let mut datapath = with_other_frontends(others)?;
    install(&mut datapath, backends, size, 0);
    Some(datapath)
}

/// A loaded datapath with `others` frontends of other Services (one backend each).
fn with_other_frontends(others: u16) -> Option<Datapath> {
    let mut datapath = Datapath::load()?;
    for other in 0..others {
        let key = frontend(addr([198, 19, 9, 1], 1_000 + other), proto::TCP);
        datapath.add_frontend(
            key,
            90 + u32::from(other),
            &[backend(OTHER, proto::TCP)],
            None,
            0,
            0,
        );
    }
    Some(datapath)
}

fn install(datapath: &mut Datapath, backends: &[SocketAddrV4], size: u32, affinity_s: u32) {
    let key = install_random(datapath, backends, affinity_s);
    datapath.use_maglev(key, size);
}

/// The NodePort frontend over `backends`, choosing at random: its key.
fn install_random(
    datapath: &mut Datapath,
    backends: &[SocketAddrV4],
    affinity_s: u32,
) -> proxy_common::FrontendKey {
    let key = frontend(NODE_PORT, proto::TCP);
    let backends: Vec<_> = backends.iter().map(|b| backend(*b, proto::TCP)).collect();
    datapath.add_frontend(
        key,
        REV_NAT_ID,
        &backends,
        None,
        service_flags::NODE_PORT,
        affinity_s,
    );
    key
}

/// The backend the tc program DNATs a new connection of `client` to.
fn through_tc(datapath: &Datapath, client: SocketAddrV4) -> SocketAddrV4 {
    chosen_backend_of(datapath, client, NODE_PORT, &BACKENDS)
}

/// The backend the XDP program DNATs a new connection of `client` to (a backend of this
/// node: marked and passed to the stack).
fn through_xdp(datapath: &Datapath, client: SocketAddrV4) -> SocketAddrV4 {
    let run = datapath.run_xdp(&Frame::new(client, NODE_PORT, SYN).build());
    assert_eq!((run.action, run.decided), (XDP_PASS, true), "{run:02x?}");
    *BACKENDS
        .iter()
        .find(|b| run.frame[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends")
}

/// The backends clients `n` in `clients` reach through `node_1`'s tc program, each the
/// same one through `node_2`'s XDP program.
fn agreed_backends(
    node_1: &Datapath,
    node_2: &Datapath,
    clients: std::ops::Range<u16>,
) -> std::collections::BTreeSet<SocketAddrV4> {
    clients
        .map(|n| {
            let chosen = through_tc(node_1, client(n));
            assert_eq!(
                through_xdp(node_2, client(n)),
                chosen,
                "client {}",
                client(n)
            );
            chosen
        })
        .collect()
}

#[test]
fn every_node_sends_a_clients_flow_to_the_same_backend_in_tc_and_in_xdp() {
    let (Some(node_1), Some(node_2)) = (
        node(&BACKENDS, DEFAULT_TABLE_SIZE, 0),
        node(&BACKENDS, DEFAULT_TABLE_SIZE, 3),
    ) else {
        return;
    };
    let used = agreed_backends(&node_1, &node_2, 0..96);
    assert_eq!(
        used.len(),
        BACKENDS.len(),
        "every backend gets flows: {used:?}"
    );
    // The same client from another port is another flow: it may land elsewhere, but
    // again the same on both nodes.
    let other_port = addr([203, 0, 113, 1], 55_555);
    assert_eq!(
        through_xdp(&node_1, other_port),
        through_tc(&node_2, other_port)
    );
}

#[test]
fn a_backend_leaving_moves_its_flows_and_few_others() {
    let remaining = [BACKEND_1, BACKEND_2, BACKEND_4, BACKEND_5];
    let (Some(before), Some(after)) = (
        node(&BACKENDS, SMALL_TABLE, 0),
        node(&remaining, SMALL_TABLE, 0),
    ) else {
        return;
    };
    let (mut on_left, mut kept, mut moved) = (0, 0, 0);
    for n in 0..400 {
        let (was, is) = (
            through_tc(&before, client(n)),
            through_tc(&after, client(n)),
        );
        if was == BACKEND_3 {
            on_left += 1;
        } else if was == is {
            kept += 1;
        } else {
            moved += 1;
        }
    }
    // About a fifth of the flows were on the backend that left; of the others, Maglev
    // moves only a few (the paper's "minimal disruption" is approximate).
    assert!(
        (40..=120).contains(&on_left),
        "{on_left} of 400 on the backend that left"
    );
    assert!(moved * 10 <= kept, "{moved} moved, {kept} kept");
}

#[test]
fn session_affinity_comes_before_the_table() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    install(&mut datapath, &BACKENDS, SMALL_TABLE, AFFINITY_TIMEOUT_S);
    let Some(fresh) = node(&BACKENDS, SMALL_TABLE, 0) else {
        return;
    };
    let first = client(0);
    let kept = through_tc(&datapath, first);
    // A port of the same client that the table alone sends elsewhere.
    let other = (1..200)
        .map(|port| addr(first.ip().octets(), 50_000 + port))
        .find(|other| through_tc(&fresh, *other) != kept)
        .expect("the table spreads a client's ports");
    assert_eq!(
        through_tc(&datapath, other),
        kept,
        "affinity keeps the backend"
    );
}

/// A node whose NodePort has externalTrafficPolicy Local: `local` its own endpoints (the
/// table's), every backend its Cluster set; `others` frontends installed first.
fn local_policy_node(local: &[SocketAddrV4], others: u16) -> Option<Datapath> {
    let mut datapath = with_other_frontends(others)?;
    let key = frontend(NODE_PORT, proto::TCP);
    let tcp = |backends: &[SocketAddrV4]| -> Vec<_> {
        backends.iter().map(|b| backend(*b, proto::TCP)).collect()
    };
    datapath.add_local_policy_service(
        key,
        &tcp(local),
        &tcp(&BACKENDS),
        service_flags::NODE_PORT,
        0,
    );
    datapath.use_maglev(key, SMALL_TABLE);
    Some(datapath)
}

#[test]
fn a_local_policy_table_covers_the_local_endpoints_and_pods_choose_in_the_cluster_set() {
    let local = [BACKEND_2, BACKEND_4];
    let (Some(mut node_1), Some(node_2)) =
        (local_policy_node(&local, 0), local_policy_node(&local, 2))
    else {
        return;
    };
    // Outside clients: only the local endpoints, each flow where the other node with the
    // same local endpoints sends it (the table does not depend on the Cluster set).
    let used = agreed_backends(&node_1, &node_2, 0..48);
    assert!(
        used.iter().all(|chosen| local.contains(chosen)),
        "only local endpoints: {used:?}"
    );
    assert_eq!(used.len(), local.len(), "both local endpoints get flows");
    // A client without a flow yet, as trace sees it.
    let report = node_1
        .tracer()
        .run(&trace_packet(client(99), NODE_PORT, proto::TCP))
        .unwrap();
    let selection = report.selection.expect("a new flow selects");
    assert_eq!((selection.set, selection.chosen_by), ("frontend", "maglev"));

    // This node's pods: the Cluster set, at random (kube-proxy's rule for pods reaching an
    // external destination; no table covers that set).
    node_1.run_on_device(device_kind::POD);
    let reached: std::collections::BTreeSet<_> = (0..48)
        .map(|n| through_tc(&node_1, client(100 + n)))
        .collect();
    assert!(
        reached.iter().any(|backend| !local.contains(backend)),
        "pods reach the Cluster set: {reached:?}"
    );
    let report = node_1
        .tracer()
        .run(&trace_packet(client(199), NODE_PORT, proto::TCP))
        .unwrap();
    let selection = report.selection.expect("a new flow selects");
    assert_eq!((selection.set, selection.chosen_by), ("cluster", "random"));
}

#[test]
fn trace_names_the_table_and_shows_the_backend_a_real_packet_gets() {
    let Some(datapath) = node(&BACKENDS, DEFAULT_TABLE_SIZE, 0) else {
        return;
    };
    let mut tracer = datapath.tracer();
    for n in 0..8 {
        let report = tracer
            .run(&trace_packet(client(n), NODE_PORT, proto::TCP))
            .unwrap();
        let selection = report.selection.expect("a new flow selects");
        assert_eq!(selection.chosen_by, "maglev");
        assert!(
            report.decided_by[1].contains("Maglev table of 16381 positions"),
            "{:?}",
            report.decided_by
        );
        let traced = report.backend.expect("a backend").address;
        assert_eq!(traced, *through_tc(&datapath, client(n)).ip());
    }
}

#[test]
fn a_header_whose_table_is_missing_chooses_at_random() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let key = install_random(&mut datapath, &BACKENDS, 0);
    // A header naming a table of the smallest size, whose chunks were never written (as
    // for a packet that read the header just before the daemon moved it on).
    let header = proxy_common::FrontendValue {
        maglev: 1,
        ..datapath.service_entry(key)
    };
    datapath.insert_service_entry(key, header);
    let mut tracer = datapath.tracer();
    let report = tracer
        .run(&trace_packet(client(0), NODE_PORT, proto::TCP))
        .unwrap();
    assert_eq!(report.path, "new_flow");
    assert_eq!(report.selection.map(|s| s.chosen_by), Some("random"));
    through_tc(&datapath, client(0));
}
