//! Socket-level load balancing: a process of the node itself (a host-network client, in
//! the node's namespace and in the daemon's cgroup) reaches Services, which no tc program
//! would see; `--socket-lb all` gives pods the same at `connect()`.
//!
//! Every daemon attaches to the lab's private cgroup (`Daemon::cgroup`), never the
//! machine's root; the client threads join it through `Netns::place_in`.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{
    BACKEND_NAMES, REFUSAL_WITHIN, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends,
    cli_json, connected_udp_request, counter_in, daemon_with_echo, daemon_with_echo_and,
    echo_service, spread,
};
use proxy_lab::{Endpoint, Netns, Service, addr, require_lab, udp_exchange};

const REQUESTS: usize = 300;

fn vip(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(addr::CLUSTER_IP, port))
}

#[test]
fn a_host_network_client_reaches_a_cluster_ip_over_tcp_and_udp() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());

    // TCP: getpeername() shows the ClusterIP (the connection itself goes to a pod).
    spread(
        "TCP, new connections",
        vip(SERVICE_TCP_PORT),
        REQUESTS,
        || node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT),
    )?;
    // Unconnected UDP, a new socket each: recvfrom() shows the ClusterIP as the source.
    spread(
        "UDP, unconnected sockets",
        vip(SERVICE_UDP_PORT),
        REQUESTS,
        || node.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT),
    )?;
    // Connected UDP: getpeername() and recvfrom() show the ClusterIP.
    spread(
        "UDP, connected sockets",
        vip(SERVICE_UDP_PORT),
        REQUESTS,
        || connected_udp_request(node, vip(SERVICE_UDP_PORT)),
    )?;

    // The CLI lists an open connection's socket: the node's, this process, the Service and
    // the backend it really talks to.
    let mut session = node.tcp_session(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    let serving = session.request()?;
    let serving_ip = lab
        .pods()
        .iter()
        .find(|pod| pod.name == serving)
        .context("an unknown backend")?
        .ip;
    let sockets = cli_json(&daemon, &["sockets", "--service", "198.19.0.10:80"])?;
    let row = sockets
        .as_array()
        .context("sockets is not an array")?
        .iter()
        .find(|row| row["backend"]["address"] == serving_ip.to_string())
        .with_context(|| format!("no socket to {serving_ip} in {sockets}"))?;
    ensure!(
        row["host"] == true && row["call"] == "connect" && row["protocol"] == "tcp",
        "{row}"
    );
    ensure!(
        row["pid"] == std::process::id() && row["frontend"]["port"] == 80,
        "{row}"
    );
    ensure!(row["service"] == "default/echo:tcp-80", "{row}");
    drop(session);

    // trace --connect explains a connect() the same way, as a dry run.
    let trace = common::trace_connect(&daemon, "198.19.0.10:80/tcp")?;
    ensure!(trace["outcome"] == "translated", "{trace}");
    ensure!(
        trace["frontend"]["service"] == "default/echo:tcp-80",
        "{trace}"
    );
    let backend = trace["connects_to"]["address"]
        .as_str()
        .context("no backend")?;
    ensure!(
        backends(&lab)
            .iter()
            .any(|pod| pod.ip.to_string() == backend),
        "{trace}"
    );
    ensure!(trace["socket_lb_attached"] == true, "{trace}");

    // All of it at the socket: the counters say so, the tc program translated nothing.
    let stats = cli_json(&daemon, &["stats"])?;
    let counters = |name| counter_in(&stats, name);
    ensure!(counters("sock_connect")? >= 2 * REQUESTS as u64, "{stats}");
    ensure!(counters("sock_sendmsg")? >= REQUESTS as u64);
    ensure!(counters("sock_reverse")? >= 2 * REQUESTS as u64);
    ensure!(
        counters("new_flow")? == 0,
        "the tc program translated a host flow"
    );
    Ok(())
}

#[test]
fn the_node_reaches_its_node_ports_external_ips_and_load_balancer_ips() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::load_balancer("echo-lb", addr::CLUSTER_IP, addr::LOAD_BALANCER_IP)
        .external_ip(addr::EXTERNAL_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    // kube-proxy's OUTPUT chain: the node's own traffic to every kind of frontend, and
    // localhost:NodePort as its iptables mode opens it.
    let frontends = [
        (addr::NODE_IP, addr::NODE_PORT_TCP, addr::NODE_PORT_UDP),
        (
            Ipv4Addr::LOCALHOST,
            addr::NODE_PORT_TCP,
            addr::NODE_PORT_UDP,
        ),
        (addr::EXTERNAL_IP, SERVICE_TCP_PORT, SERVICE_UDP_PORT),
        (addr::LOAD_BALANCER_IP, SERVICE_TCP_PORT, SERVICE_UDP_PORT),
        (addr::CLUSTER_IP, SERVICE_TCP_PORT, SERVICE_UDP_PORT),
    ];
    for (ip, tcp_port, udp_port) in frontends {
        for _ in 0..10 {
            let tcp = node.tcp_request(ip, tcp_port)?;
            ensure!(BACKEND_NAMES.contains(&tcp.body.as_str()), "{ip}: {tcp:?}");
            ensure!(
                tcp.peer == SocketAddr::V4(SocketAddrV4::new(ip, tcp_port)),
                "{tcp:?}"
            );
            let udp = node.udp_request(ip, udp_port)?;
            ensure!(BACKEND_NAMES.contains(&udp.body.as_str()), "{ip}: {udp:?}");
            ensure!(
                udp.peer == SocketAddr::V4(SocketAddrV4::new(ip, udp_port)),
                "{udp:?}"
            );
        }
    }
    Ok(())
}

/// internalTrafficPolicy Local holds for the node's own connections too: only this node's
/// endpoint; without one, the connect() fails at once (the tc path drops, kube-proxy's
/// DROP: a socket is told instead of waiting for its timeout).
#[test]
fn internal_traffic_policy_local_keeps_the_nodes_connections_on_this_node() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let endpoints = |pod_1_local: bool| -> Vec<Endpoint> {
        backends(&lab)
            .iter()
            .enumerate()
            .map(|(index, pod)| match index {
                0 if pod_1_local => Endpoint::of(pod),
                _ => Endpoint::of(pod).on_node("other-node"),
            })
            .collect()
    };
    let local = echo_service().internal_traffic_policy_local();
    let daemon = lab
        .daemon()
        .manifest(local.manifest_with(&endpoints(true)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    // Three backends: 30 connections all on one by chance has probability 3 · (1/3)^30.
    for _ in 0..30 {
        let reply = node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(reply.body == "pod-1", "reached {}", reply.body);
        let reply = node.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(reply.body == "pod-1", "reached {}", reply.body);
    }

    let syncs = daemon.syncs();
    daemon.apply(&local.manifest_with(&endpoints(false)))?;
    daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;
    let started = Instant::now();
    let error = node
        .tcp_connect(addr::CLUSTER_IP, SERVICE_TCP_PORT, Duration::from_secs(5))
        .err()
        .context("connected without a local endpoint")?;
    ensure!(
        error.raw_os_error() == Some(libc::EHOSTUNREACH),
        "TCP without a local endpoint: {error}"
    );
    ensure!(started.elapsed() < REFUSAL_WITHIN);
    let stats = cli_json(&daemon, &["stats"])?;
    ensure!(counter_in(&stats, "sock_unreachable")? >= 1, "{stats}");
    Ok(())
}

/// externalTrafficPolicy Local does not bind the node itself: kube-proxy's "route LOCAL
/// traffic" rule sends its connections to a Local NodePort to the Service port's Cluster
/// endpoints, local or not — so with none on this node the node is still served.
#[test]
fn the_node_reaches_a_local_policy_node_port_through_every_endpoint() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .external_traffic_policy_local();
    // No endpoint on this node.
    let elsewhere: Vec<Endpoint> = backends(&lab)
        .iter()
        .map(|pod| Endpoint::of(pod).on_node("other-node"))
        .collect();
    let daemon = lab
        .daemon()
        .manifest(service.manifest_with(&elsewhere))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    // Three backends: 30 connections miss one by chance with probability 3 · (2/3)^30.
    let mut reached = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let reply = node.tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
        reached.insert(reply.body);
    }
    let all: std::collections::BTreeSet<String> =
        BACKEND_NAMES.iter().map(ToString::to_string).collect();
    ensure!(reached == all, "the node reached {reached:?}");
    Ok(())
}

#[test]
fn an_unconnected_udp_socket_keeps_its_backend_like_a_flow() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    // One socket, many datagrams: one flow, one backend, every answer from the ClusterIP.
    let socket = node.udp_socket_from(0, proxy_lab::REQUEST_TIMEOUT)?;
    let first = udp_exchange(&socket, addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    for _ in 0..30 {
        let reply = udp_exchange(&socket, addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(
            reply.peer == vip(SERVICE_UDP_PORT),
            "answer from {}",
            reply.peer
        );
        ensure!(
            reply.body == first.body,
            "the flow moved from {} to {}",
            first.body,
            reply.body
        );
    }
    Ok(())
}

#[test]
fn a_service_without_endpoints_refuses_at_once_over_tcp_and_udp() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let empty = Service::cluster_ip("empty", addr::CLUSTER_IP)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let daemon = lab.daemon().manifest(empty.manifest(&[])).start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());

    let started = Instant::now();
    let error = node
        .tcp_connect(addr::CLUSTER_IP, SERVICE_TCP_PORT, Duration::from_secs(5))
        .err()
        .context("connected to a Service without endpoints")?;
    ensure!(error.kind() == ErrorKind::ConnectionRefused, "TCP: {error}");
    ensure!(
        started.elapsed() < REFUSAL_WITHIN,
        "TCP refused after {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let error = node
        .udp_flow(addr::CLUSTER_IP, SERVICE_UDP_PORT, Duration::from_secs(5))
        .err()
        .context("a UDP socket connected to a Service without endpoints")?;
    ensure!(
        error.kind() == ErrorKind::ConnectionRefused,
        "connected UDP: {error}"
    );
    ensure!(started.elapsed() < REFUSAL_WITHIN);

    let socket = node.udp_socket_from(0, Duration::from_secs(5))?;
    let started = Instant::now();
    let error = socket
        .send_to(b"ping", (addr::CLUSTER_IP, SERVICE_UDP_PORT))
        .err()
        .context("sent a datagram to a Service without endpoints")?;
    ensure!(
        error.kind() == ErrorKind::ConnectionRefused,
        "unconnected UDP: {error}"
    );
    ensure!(started.elapsed() < REFUSAL_WITHIN);
    Ok(())
}

#[test]
fn session_affinity_keeps_the_node_on_one_backend() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let sticky = echo_service().client_ip_affinity(10_800);
    let daemon = lab
        .daemon()
        .manifest(sticky.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    let first = node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?.body;
    for _ in 0..30 {
        let reply = node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(
            reply.body == first,
            "TCP moved from {first} to {}",
            reply.body
        );
    }
    let first = node.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?.body;
    for _ in 0..30 {
        let reply = node.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(
            reply.body == first,
            "UDP moved from {first} to {}",
            reply.body
        );
    }
    Ok(())
}

#[test]
fn a_restarted_daemon_keeps_translating_and_swaps_its_programs_in() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let mut daemon = daemon_with_echo(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    // A connection made before the restart keeps showing the ClusterIP.
    let mut session = node.tcp_session(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    session.request()?;
    let links = daemon.bpffs_root().join("sock-links");
    let before = link_pins(&links)?;

    let syncs = daemon.syncs();
    daemon.restart()?;
    daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;
    // The same pins: the new programs were swapped into the links (BPF_LINK_UPDATE).
    let after = link_pins(&links)?;
    ensure!(
        before == after,
        "the links were replaced: {before:?} → {after:?}"
    );
    ensure!(session.peer()? == vip(SERVICE_TCP_PORT));
    session.request()?;
    for _ in 0..20 {
        let reply = node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(reply.peer == vip(SERVICE_TCP_PORT));
        let reply = node.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
        ensure!(reply.peer == vip(SERVICE_UDP_PORT));
    }
    drop(session);

    // Stopped, the pinned links keep translating; cleanup removes them, after which the
    // ClusterIP is nobody's again (its packets leave by the node's routes: here, none).
    daemon.stop_in_place()?;
    let reply = node.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(reply.peer == vip(SERVICE_TCP_PORT));
    let output = daemon.cli_output(&["cleanup"])?;
    ensure!(output.status.success(), "cleanup: {output:?}");
    ensure!(!links.exists(), "cleanup left {}", links.display());
    // The kernel releases an unpinned link from a work queue: moments later.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match node.tcp_connect(
            addr::CLUSTER_IP,
            SERVICE_TCP_PORT,
            Duration::from_millis(300),
        ) {
            Err(error)
                if proxy_lab::is_timeout(&error)
                    || error.kind() == ErrorKind::NetworkUnreachable =>
            {
                break;
            }
            Err(error) => bail!("after cleanup: {error}"),
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(_) => bail!("the ClusterIP still answers 5 s after cleanup"),
        }
    }
    Ok(())
}

/// The socket programs' link pins in `dir` with their inode numbers: a pin swapped into
/// keeps its inode, a new pin gets another.
fn link_pins(dir: &std::path::Path) -> Result<Vec<(String, u64)>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut pins = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        pins.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.metadata()?.ino(),
        ));
    }
    pins.sort();
    if pins.len() != 9 {
        bail!(
            "expected the 9 socket links in {}, found {pins:?}",
            dir.display()
        );
    }
    Ok(pins)
}

#[test]
fn socket_lb_all_translates_a_pods_connections_at_connect() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo_and(&lab, &["--socket-lb", "all"])?;
    let pod = &lab.pod(4).ns;
    let _placed = pod.place_in(daemon.cgroup());
    let tally = spread(
        "pod TCP with --socket-lb all",
        vip(SERVICE_TCP_PORT),
        REQUESTS,
        || pod.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT),
    )?;
    // Its UDP stays with tc: replies from the ClusterIP all the same.
    let reply = pod.udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    ensure!(reply.peer == vip(SERVICE_UDP_PORT));
    let stats = cli_json(&daemon, &["stats"])?;
    let counters = |name| counter_in(&stats, name);
    ensure!(counters("sock_connect")? >= tally.total());
    // tc saw those connections only as direct flows to backends (tracked, untouched).
    ensure!(
        counters("new_flow")? <= 1,
        "tc translated pod TCP flows: {stats}"
    );
    Ok(())
}

#[test]
fn with_socket_lb_host_a_pods_connections_stay_with_tc() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let pod: &Netns = &lab.pod(4).ns;
    let _placed = pod.place_in(daemon.cgroup());
    for _ in 0..10 {
        let reply = pod.tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
        ensure!(reply.peer == vip(SERVICE_TCP_PORT));
    }
    let stats = cli_json(&daemon, &["stats"])?;
    let counters = |name| counter_in(&stats, name);
    ensure!(
        counters("sock_connect")? == 0,
        "a pod's socket was translated: {stats}"
    );
    ensure!(counters("new_flow")? >= 10);
    Ok(())
}

#[test]
fn udp_sockets_of_the_node_leave_a_removed_backend() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon_with_echo(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    let connected = node.udp_flow(
        addr::CLUSTER_IP,
        SERVICE_UDP_PORT,
        proxy_lab::REQUEST_TIMEOUT,
    )?;
    let connected_backend = connected.request()?;
    let unconnected = node.udp_socket_from(0, proxy_lab::REQUEST_TIMEOUT)?;
    let unconnected_backend = udp_exchange(&unconnected, addr::CLUSTER_IP, SERVICE_UDP_PORT)?.body;

    // Both backends leave (one, if they are the same pod); another stays.
    let remaining: Vec<_> = backends(&lab)
        .iter()
        .filter(|pod| pod.name != connected_backend && pod.name != unconnected_backend)
        .collect();
    let syncs = daemon.syncs();
    daemon.apply(&echo_service().manifest(remaining.iter().copied()))?;
    daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;

    // The unconnected socket's flow moves at its next datagram, answered from the
    // ClusterIP by a backend that stayed.
    let reply = udp_exchange(&unconnected, addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    ensure!(reply.peer == vip(SERVICE_UDP_PORT), "{reply:?}");
    ensure!(
        remaining.iter().any(|pod| pod.name == reply.body),
        "the flow stayed on {} (remaining: {:?})",
        reply.body,
        remaining.iter().map(|pod| &pod.name).collect::<Vec<_>>()
    );
    // The connected socket, which no program sees again, was aborted and disconnected:
    // its owner's next send fails (EDESTADDRREQ), a receive with ECONNABORTED.
    let error = connected
        .request()
        .err()
        .context("a connected socket still talks to a removed backend")?;
    ensure!(
        matches!(
            error.raw_os_error(),
            Some(libc::EDESTADDRREQ | libc::ECONNABORTED)
        ),
        "connected socket after its backend left: {error}"
    );
    ensure!(
        daemon.log().contains("closed connected UDP sockets"),
        "not logged"
    );
    // A new one reaches a backend that stayed.
    let fresh = node.udp_flow(
        addr::CLUSTER_IP,
        SERVICE_UDP_PORT,
        proxy_lab::REQUEST_TIMEOUT,
    )?;
    let body = fresh.request()?;
    ensure!(remaining.iter().any(|pod| pod.name == body), "{body}");
    Ok(())
}
