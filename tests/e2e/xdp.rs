//! The XDP program on the external devices (`--xdp`), with real traffic: outside clients'
//! NodePort flows are decided by XDP, and the tc program behind it never translates them a
//! second time; across nodes, SNAT flows go back out of the node with XDP_TX both ways;
//! `trace` shows which hook decided; IPv6 NodePort flows are decided by XDP as IPv4's are.

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, ensure};
use common::{BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends, cli_json};
use proxy_lab::{Cluster, Daemon, Service, addr, require_lab};

const CONNECTIONS: u64 = 20;
/// A NodePort Service without endpoints.
const EMPTY_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 14);

/// The datapath counters by name.
fn counters(daemon: &Daemon) -> Result<BTreeMap<String, u64>> {
    let stats = cli_json(daemon, &["stats"])?;
    stats["counters"]
        .as_array()
        .context("counters")?
        .iter()
        .map(|counter| {
            let name = counter["name"].as_str().context("name")?.to_owned();
            Ok((name, counter["value"].as_u64().context("value")?))
        })
        .collect()
}

fn node_port_service() -> Service {
    Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP)
}

#[test]
fn node_port_flows_are_decided_by_xdp_and_never_translated_again_by_tc() -> Result<()> {
    require_lab!();
    for mode in ["native", "generic"] {
        let lab = common::lab()?;
        let daemon = lab
            .daemon()
            .manifest(node_port_service().manifest(backends(&lab)))
            .args(["--xdp", mode])
            .start()?;
        daemon.wait_synced(SYNC_TIMEOUT)?;
        let attached = format!("XDP attached device=eth0 ifindex=2 mode={mode}");
        ensure!(
            daemon.log().contains(&attached),
            "{mode}: no `{attached}` logged"
        );
        for _ in 0..CONNECTIONS {
            let tcp = lab
                .client()
                .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
            let udp = lab
                .client()
                .udp_request(addr::NODE_IP, addr::NODE_PORT_UDP)?;
            for reply in [tcp, udp] {
                ensure!(
                    BACKEND_NAMES.contains(&reply.body.as_str()),
                    "{mode}: answered by {reply:?}"
                );
            }
        }
        let counters = counters(&daemon)?;
        // Every flow's packets were translated once: had tc looked at a packet XDP had
        // translated, it would have met a packet to a backend address (a `direct` flow).
        ensure!(
            counters["direct"] == 0,
            "{mode}: tc saw translated packets: {counters:?}"
        );
        // UDP clients may reuse a port (a flow already known): at least the TCP ones.
        ensure!(
            (CONNECTIONS..=2 * CONNECTIONS).contains(&counters["new_flow"]),
            "{mode}: {counters:?}"
        );
        // Each connection's SYN, handshake ACK, request and FIN, and each datagram, came
        // through XDP (the answers come back through the pods' devices: tc).
        ensure!(
            counters["xdp_pass"] >= 5 * CONNECTIONS,
            "{mode}: XDP decided too little: {counters:?}"
        );
    }
    Ok(())
}

#[test]
fn ipv6_node_port_flows_are_decided_by_xdp_as_ipv4_ones_are() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let six = Service::node_port("six", addr::NODE_PORT_SERVICE_IPV6)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    let daemon = lab
        .daemon()
        .manifest(six.manifest(backends(&lab)))
        .args(["--xdp", "native"])
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = IpAddr::V6(addr::NODE_IPV6);
    for _ in 0..CONNECTIONS {
        let tcp = lab.client().tcp_request(node, addr::NODE_PORT_TCP)?;
        let udp = lab.client().udp_request(node, addr::NODE_PORT_UDP)?;
        for (reply, port) in [(tcp, addr::NODE_PORT_TCP), (udp, addr::NODE_PORT_UDP)] {
            ensure!(
                BACKEND_NAMES.contains(&reply.body.as_str())
                    && reply.peer == SocketAddr::new(node, port),
                "answered by {reply:?}"
            );
        }
    }
    let counters = counters(&daemon)?;
    // As for IPv4: every packet translated once (tc never met a translated one as a
    // `direct` flow), each connection's SYN, handshake ACK, request and FIN and each
    // datagram decided by XDP.
    ensure!(
        counters["direct"] == 0,
        "tc saw translated packets: {counters:?}"
    );
    ensure!(
        (CONNECTIONS..=2 * CONNECTIONS).contains(&counters["new_flow"]),
        "{counters:?}"
    );
    ensure!(
        counters["xdp_pass"] >= 5 * CONNECTIONS,
        "XDP decided too little: {counters:?}"
    );
    Ok(())
}

/// The XDP link pins under the daemon's pin root, by name.
fn xdp_pins(daemon: &Daemon) -> Result<Vec<String>> {
    let mut pins: Vec<String> = std::fs::read_dir(daemon.bpffs_root().join("links"))?
        .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
        .filter(|name: &Result<String>| name.as_ref().map_or(true, |name| name.starts_with("xdp-")))
        .collect::<Result<_>>()?;
    pins.sort();
    Ok(pins)
}

#[test]
fn a_restarted_daemon_keeps_swaps_or_releases_the_xdp_link_as_its_mode_says() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let mut daemon = lab
        .daemon()
        .manifest(node_port_service().manifest(backends(&lab)))
        .args(["--xdp", "native"])
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    // (mode, the pins then, what `ip link` shows on the node's device)
    let steps = [
        ("native", vec!["xdp-native-2-eth0"], Some("xdp")),
        ("native", vec!["xdp-native-2-eth0"], Some("xdp")),
        ("generic", vec!["xdp-generic-2-eth0"], Some("xdpgeneric")),
        ("off", vec![], None),
    ];
    for (step, (mode, pins, shown)) in steps.into_iter().enumerate() {
        if step > 0 {
            let syncs = daemon.syncs();
            daemon.set_arg("--xdp", mode);
            daemon.restart()?;
            daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;
        }
        ensure!(
            xdp_pins(&daemon)? == pins,
            "--xdp {mode}: pins {:?}",
            xdp_pins(&daemon)?
        );
        let link = lab.node().ip_output(&["link", "show", "dev", "eth0"])?;
        let attached = ["xdpgeneric", "xdp"].into_iter().find(|kind| {
            link.contains(&format!(" {kind} ")) || link.contains(&format!(" {kind}/"))
        });
        ensure!(
            attached == shown,
            "--xdp {mode}: eth0 shows {attached:?}: {link}"
        );
        let reply = lab
            .client()
            .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
        ensure!(
            BACKEND_NAMES.contains(&reply.body.as_str()),
            "--xdp {mode}: answered by {reply:?}"
        );
    }
    Ok(())
}

#[test]
fn trace_shows_which_hook_decided() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let empty = Service::node_port("empty", EMPTY_SERVICE_IP).tcp_node_port(
        SERVICE_TCP_PORT,
        addr::ECHO_TCP_PORT,
        addr::NODE_PORT_TCP + 1,
    );
    let daemon = lab
        .daemon()
        .manifest(node_port_service().manifest(backends(&lab)))
        .manifest(empty.manifest_with(&[]))
        .args(["--xdp", "native"])
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let client = addr::CLIENT_IP.to_string();
    let node_port = format!("{}:{}/tcp", addr::NODE_IP, addr::NODE_PORT_TCP);
    let trace = cli_json(&daemon, &["trace", &client, &node_port])?;
    ensure!(
        (
            trace["hook"].as_str(),
            trace["device"].as_str(),
            trace["path"].as_str()
        ) == (Some("xdp"), Some("eth0"), Some("new_flow")),
        "{trace:#}"
    );
    ensure!(trace["xdp"]["action"] == "pass", "{trace:#}");
    let text = daemon.cli(&["trace", &client, &node_port])?;
    ensure!(
        text.contains("hook        XDP decided: into the stack, tc lets it through"),
        "{text}"
    );
    // tc alone, asked for: the same decision.
    let tc = cli_json(&daemon, &["trace", &client, &node_port, "--hook", "tc"])?;
    ensure!(
        (tc["hook"].as_str(), tc["path"].as_str()) == (Some("tc"), Some("new_flow")),
        "{tc:#}"
    );
    // A refusal is tc's: XDP leaves the packet to it.
    let refused = format!("{}:{}/tcp", addr::NODE_IP, addr::NODE_PORT_TCP + 1);
    let trace = cli_json(&daemon, &["trace", &client, &refused])?;
    ensure!(
        (trace["hook"].as_str(), trace["path"].as_str()) == (Some("tc"), Some("rejected")),
        "{trace:#}"
    );
    ensure!(
        (
            trace["xdp"]["action"].as_str(),
            trace["xdp"]["left_to_tc"].as_str()
        ) == (Some("to-tc"), Some("answer")),
        "{trace:#}"
    );
    Ok(())
}

#[test]
fn snat_flows_to_another_node_go_back_out_with_xdp_tx_both_ways() -> Result<()> {
    require_lab!();
    let cluster = Cluster::builder().pods_per_node(&[1, 2]).build()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP).tcp_node_port(
        SERVICE_TCP_PORT,
        addr::PEER_REPORT_PORT,
        addr::NODE_PORT_TCP,
    );
    let endpoints = common::endpoints_on(cluster.node(2));
    let daemons = common::daemons_on_nodes_1_and_2(&cluster, &service, &endpoints, "native")?;
    let node_1 = cluster.node(1).ip;
    for _ in 0..CONNECTIONS {
        let reply = cluster.client().tcp_request(node_1, addr::NODE_PORT_TCP)?;
        let seen: Ipv4Addr = reply.body.parse()?;
        ensure!(
            seen == node_1,
            "the backend saw {seen}, not node 1's address"
        );
    }
    let counters = counters(&daemons[0])?;
    ensure!(counters["new_flow"] == CONNECTIONS, "{counters:?}");
    // Both directions of every connection (handshake, request, answer, FINs) went back
    // out of node 1's device from XDP; only a packet whose next hop the node did not
    // know yet (the first) went through tc, which resolved it.
    ensure!(
        counters["xdp_tx"] >= 6 * CONNECTIONS,
        "XDP sent too little itself: {counters:?}"
    );
    // Its neighbour known now, a new connection's SYN is sent back out by XDP.
    let client = addr::FABRIC_CLIENT_IP.to_string();
    let node_port = format!("{node_1}:{}/tcp", addr::NODE_PORT_TCP);
    let trace = cli_json(&daemons[0], &["trace", &client, &node_port])?;
    ensure!(
        (trace["hook"].as_str(), trace["xdp"]["action"].as_str()) == (Some("xdp"), Some("tx")),
        "{trace:#}"
    );
    ensure!(
        trace["output"]["source"]["address"] == node_1.to_string(),
        "SNAT: {trace:#}"
    );
    Ok(())
}
