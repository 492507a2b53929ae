//! Socket-level load balancing over IPv6: a process of the node (in the node's namespace
//! and in the daemon's cgroup) reaches IPv6 frontends through `connect6`, `sendmsg6`,
//! `recvmsg6` and `getpeername6`, and an IPv6 socket naming an IPv4 frontend by its
//! IPv4-mapped address (`::ffff:198.19.0.10`, a dual-stack socket) is served by IPv4's
//! frontends, as Cilium's socket programs serve it.
//!
//! As in `socket_lb`, every daemon attaches to the lab's private cgroup, never the
//! machine's root.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{
    BACKEND_NAMES, REFUSAL_WITHIN, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, backends,
    cli_json, connected_udp_request, counter, counter_in, spread,
};
use proxy_lab::{Daemon, Lab, Service, addr, require_lab, udp_exchange};
use serde_json::Value;

const REQUESTS: usize = 150;
const EMPTY_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x12);
const STICKY_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x13);

/// The dual-stack `echo` (ClusterIPs 198.19.0.10 and 2001:db8:ff::10, TCP 80 and UDP 53),
/// an IPv6 Service with session affinity and one without endpoints; the daemon synced.
fn daemon<'lab>(lab: &'lab Lab) -> Result<Daemon<'lab>> {
    let echo = common::echo_service().dual_stack(addr::CLUSTER_IPV6);
    let sticky = Service::cluster_ip("sticky6", STICKY_IPV6)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .client_ip_affinity(600);
    let empty = Service::cluster_ip("empty6", EMPTY_IPV6)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let daemon = lab
        .daemon()
        .manifest(echo.manifest(backends(lab)))
        .manifest(sticky.manifest(backends(lab)))
        .manifest(empty.manifest([]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    Ok(daemon)
}

fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(addr::CLUSTER_IPV6), port)
}

/// The IPv4 ClusterIP as an IPv6 socket names it: `::ffff:198.19.0.10`.
fn mapped_vip() -> IpAddr {
    IpAddr::V6(addr::CLUSTER_IP.to_ipv6_mapped())
}

/// The `sockets -o json --service service` row of the open connection to `backend`.
fn socket_row(daemon: &Daemon, service: &str, backend: IpAddr) -> Result<Value> {
    let sockets = cli_json(daemon, &["sockets", "--service", service])?;
    (sockets.as_array().into_iter().flatten())
        .find(|row| row["backend"]["address"] == backend.to_string())
        .cloned()
        .with_context(|| format!("no socket to {backend} in {sockets}"))
}

#[test]
fn the_node_reaches_an_ipv6_cluster_ip_and_a_mapped_ipv4_one_at_the_socket() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    let v6 = IpAddr::V6(addr::CLUSTER_IPV6);

    // TCP (connect6; getpeername6 shows the ClusterIP), unconnected UDP (sendmsg6;
    // recvmsg6 shows the ClusterIP as the source), connected UDP (both).
    spread("IPv6 TCP", vip6(SERVICE_TCP_PORT), REQUESTS, || {
        node.tcp_request(v6, SERVICE_TCP_PORT)
    })?;
    spread(
        "IPv6 UDP, unconnected",
        vip6(SERVICE_UDP_PORT),
        REQUESTS,
        || node.udp_request(v6, SERVICE_UDP_PORT),
    )?;
    spread(
        "IPv6 UDP, connected",
        vip6(SERVICE_UDP_PORT),
        REQUESTS,
        || connected_udp_request(node, vip6(SERVICE_UDP_PORT)),
    )?;

    // An IPv6 socket to the IPv4 ClusterIP, IPv4-mapped: IPv4's frontend serves it, and
    // the socket sees the mapped ClusterIP as its peer.
    let mapped = |port| SocketAddr::new(mapped_vip(), port);
    spread(
        "IPv4-mapped TCP",
        mapped(SERVICE_TCP_PORT),
        REQUESTS,
        || node.tcp_request(mapped_vip(), SERVICE_TCP_PORT),
    )?;
    spread(
        "IPv4-mapped UDP, unconnected",
        mapped(SERVICE_UDP_PORT),
        REQUESTS,
        || node.udp_request(mapped_vip(), SERVICE_UDP_PORT),
    )?;
    spread(
        "IPv4-mapped UDP, connected",
        mapped(SERVICE_UDP_PORT),
        REQUESTS,
        || connected_udp_request(node, mapped(SERVICE_UDP_PORT)),
    )?;

    // The CLI lists open connections of both kinds: the IPv6 one from SOCK_XLATE6 (picked
    // by its IPv6 frontend, `--service [2001:db8:ff::10]:80`), the mapped one as IPv4's.
    let pod_named = |name: &str| backends(&lab).iter().find(|pod| pod.name == name);
    let mut session = node.tcp_session(v6, SERVICE_TCP_PORT)?;
    let serving = pod_named(&session.request()?).context("an unknown backend")?;
    let row = socket_row(
        &daemon,
        &vip6(SERVICE_TCP_PORT).to_string(),
        IpAddr::V6(serving.ipv6),
    )?;
    ensure!(
        row["family"] == "IPv6"
            && row["frontend"]["address"] == addr::CLUSTER_IPV6.to_string()
            && row["frontend"]["port"] == SERVICE_TCP_PORT
            && row["host"] == true
            && row["call"] == "connect"
            && row["pid"] == std::process::id(),
        "{row}"
    );
    drop(session);
    let mut session = node.tcp_session(mapped_vip(), SERVICE_TCP_PORT)?;
    let serving = pod_named(&session.request()?).context("an unknown backend")?;
    let row = socket_row(&daemon, "default/echo:tcp-80", IpAddr::V4(serving.ip))?;
    ensure!(
        row["family"] == "IPv4" && row["frontend"]["address"] == addr::CLUSTER_IP.to_string(),
        "{row}"
    );
    drop(session);

    // trace --connect explains both kinds as connect6 decides them, writing nothing: the
    // IPv6 ClusterIP from IPv6's maps, the mapped one from IPv4's (connected to a mapped
    // backend), the IPv6 Service without endpoints refused.
    let connects = counter(&daemon, "sock_connect")?;
    let v6_backends: Vec<String> = (backends(&lab).iter())
        .map(|pod| pod.ipv6.to_string())
        .collect();
    let mapped_backends: Vec<String> = (backends(&lab).iter())
        .map(|pod| pod.ip.to_ipv6_mapped().to_string())
        .collect();
    for (destination, family, frontend, connects_to) in [
        (vip6(SERVICE_TCP_PORT), "IPv6", v6.to_string(), &v6_backends),
        (
            SocketAddr::new(mapped_vip(), SERVICE_TCP_PORT),
            "IPv4",
            addr::CLUSTER_IP.to_string(),
            &mapped_backends,
        ),
    ] {
        let trace = common::trace_connect(&daemon, &format!("{destination}/tcp"))?;
        ensure!(
            trace["outcome"] == "translated"
                && trace["family"] == family
                && trace["frontend"]["address"] == frontend
                && trace["frontend"]["service"] == "default/echo:tcp-80"
                && trace["socket_lb_attached"] == true,
            "{trace}"
        );
        let backend = trace["connects_to"]["address"].as_str().unwrap_or_default();
        ensure!(connects_to.iter().any(|ip| ip == backend), "{trace}");
    }
    let refused =
        common::trace_connect(&daemon, &format!("[{EMPTY_IPV6}]:{SERVICE_TCP_PORT}/tcp"))?;
    ensure!(
        refused["outcome"] == "refused" && refused["errno"] == 111,
        "{refused}"
    );
    ensure!(
        counter(&daemon, "sock_connect")? == connects,
        "a dry run counted a connect()"
    );

    // All of it at the socket: the tc program translated nothing.
    let stats = cli_json(&daemon, &["stats"])?;
    ensure!(
        counter_in(&stats, "sock_connect")? >= 4 * REQUESTS as u64
            && counter_in(&stats, "sock_sendmsg")? >= 2 * REQUESTS as u64
            && counter_in(&stats, "sock_reverse")? >= 6 * REQUESTS as u64,
        "{stats}"
    );
    ensure!(
        counter_in(&stats, "new_flow")? == 0,
        "the tc program translated a flow of the node: {stats}"
    );
    Ok(())
}

#[test]
fn ipv6_at_the_socket_refuses_without_endpoints_keeps_affinity_and_drops_a_removed_backend()
-> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = daemon(&lab)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());

    // No endpoints: connect() and sendto() fail at once with ECONNREFUSED.
    let started = Instant::now();
    let error = node
        .tcp_connect(EMPTY_IPV6, SERVICE_TCP_PORT, Duration::from_secs(5))
        .err()
        .context("connected to an IPv6 Service without endpoints")?;
    ensure!(error.kind() == ErrorKind::ConnectionRefused, "TCP: {error}");
    let socket = node.udp_socket_for(IpAddr::V6(EMPTY_IPV6), 0, Duration::from_secs(5))?;
    let error = socket
        .send_to(b"ping", (EMPTY_IPV6, SERVICE_UDP_PORT))
        .err()
        .context("sent a datagram to an IPv6 Service without endpoints")?;
    ensure!(error.kind() == ErrorKind::ConnectionRefused, "UDP: {error}");
    ensure!(started.elapsed() < 2 * REFUSAL_WITHIN);

    // Session affinity (SOCK_AFFINITY6): the node stays on one backend.
    let first = node.tcp_request(STICKY_IPV6, SERVICE_TCP_PORT)?.body;
    for _ in 0..30 {
        let reply = node.tcp_request(STICKY_IPV6, SERVICE_TCP_PORT)?;
        ensure!(reply.body == first, "moved from {first} to {}", reply.body);
    }

    // An unconnected socket's flow keeps its backend; a connected socket's backend that
    // leaves closes the socket (SOCK_DESTROY of an IPv6 socket), the flow moves.
    let v6 = IpAddr::V6(addr::CLUSTER_IPV6);
    let unconnected = node.udp_socket_for(v6, 0, proxy_lab::REQUEST_TIMEOUT)?;
    let unconnected_backend = udp_exchange(&unconnected, v6, SERVICE_UDP_PORT)?.body;
    for _ in 0..10 {
        let reply = udp_exchange(&unconnected, v6, SERVICE_UDP_PORT)?;
        ensure!(
            reply.body == unconnected_backend && reply.peer == vip6(SERVICE_UDP_PORT),
            "{reply:?}"
        );
    }
    let connected = node.udp_flow(v6, SERVICE_UDP_PORT, proxy_lab::REQUEST_TIMEOUT)?;
    let connected_backend = connected.request()?;
    let remaining: Vec<_> = backends(&lab)
        .iter()
        .filter(|pod| pod.name != connected_backend && pod.name != unconnected_backend)
        .collect();
    let syncs = daemon.syncs();
    let echo = common::echo_service().dual_stack(addr::CLUSTER_IPV6);
    daemon.apply(&echo.manifest(remaining.iter().copied()))?;
    daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;
    let names: BTreeSet<&str> = remaining.iter().map(|pod| pod.name.as_str()).collect();
    let reply = udp_exchange(&unconnected, v6, SERVICE_UDP_PORT)?;
    ensure!(
        names.contains(reply.body.as_str()) && reply.peer == vip6(SERVICE_UDP_PORT),
        "the flow stayed on {} (remaining: {names:?})",
        reply.body
    );
    match connected.request() {
        Err(error)
            if matches!(
                error.raw_os_error(),
                Some(libc::EDESTADDRREQ | libc::ECONNABORTED)
            ) => {}
        other => bail!("an IPv6 socket connected to a removed backend: {other:?}"),
    }
    Ok(())
}

/// kube-proxy opens no `localhost:NodePort` for IPv6 (`route_localnet` has no IPv6
/// counterpart), and neither does ebpf-proxy: `[::1]:NodePort` is nobody's, while the
/// node's own IPv6 address serves the NodePort at the socket.
#[test]
fn the_node_reaches_an_ipv6_node_port_on_its_address_not_on_loopback() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::node_port("echo-nodeport", addr::NODE_PORT_SERVICE_IP)
        .dual_stack(addr::NODE_PORT_SERVICE_IPV6)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP);
    let daemon = lab
        .daemon()
        .manifest(service.manifest(backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let node = lab.node();
    let _placed = node.place_in(daemon.cgroup());
    let node_ip = IpAddr::V6(addr::NODE_IPV6);
    let mut seen = BTreeSet::new();
    // Missing a backend in 60 draws of three: probability 3 · (2/3)^60 ≈ 1e-10.
    for _ in 0..60 {
        let reply = node.tcp_request(node_ip, addr::NODE_PORT_TCP)?;
        ensure!(
            reply.peer == SocketAddr::new(node_ip, addr::NODE_PORT_TCP),
            "{reply:?}"
        );
        seen.insert(reply.body);
    }
    ensure!(seen.len() == BACKEND_NAMES.len(), "reached {seen:?}");
    match node.tcp_connect(
        Ipv6Addr::LOCALHOST,
        addr::NODE_PORT_TCP,
        Duration::from_secs(2),
    ) {
        Err(error) if error.kind() == ErrorKind::ConnectionRefused => Ok(()),
        other => bail!("[::1]:{} answered: {other:?}", addr::NODE_PORT_TCP),
    }
}
