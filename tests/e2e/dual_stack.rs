//! The dual-stack lab and a dual-stack LoadBalancer Service (`ipFamilies: [IPv4, IPv6]`,
//! `externalTrafficPolicy: Local`, a healthCheckNodePort) on it, as far as issue 12 has
//! come.
//!
//! The lab's plumbing: node, client and pods have an IPv6 address each (2001:db8::/32,
//! inside the lab's namespaces only), the node forwards IPv6, the pods' echo servers answer
//! on both families, and IPv6 goes pod to pod and client to pod straight through the
//! node with the daemon running.
//!
//! IPv6 end to end: a single-stack IPv6 ClusterIP and NodePort answered over TCP and UDP
//! from the client and from a pod (every answer from the frontend, every backend
//! reached), the dual-stack Service over both families, and an IPv6 Service without
//! endpoints refused at once (ICMPv6 port unreachable: connection refused). UDP datagrams
//! over the MTU (a 4,000-byte query, a 30,000-byte answer: IPv6 fragments, cut by their
//! sender) through an IPv6 ClusterIP from a pod and its NodePort from the client, answered
//! whole from the frontend: the later fragments follow their first through FRAGMENTS6.
//!
//! Restarts keep IPv6 flows: a pod's TCP connections and connected UDP flows to an IPv6
//! ClusterIP keep their backends across a daemon restart (CONNTRACK6 is pinned).
//!
//! The CLI on a real IPv6 flow: `conntrack` lists it from CONNTRACK6 (`-o json` with its
//! family) and its IPv6 filters select it, `trace` follows its conntrack entry and dry-runs
//! a new connection through the IPv6 maps, `conntrack flush` removes it.
//!
//! The LoadBalancer Service: its IPv4 half serves (ClusterIP from a pod, NodePort from
//! outside), its IPv6 half is planned from the IPv6 EndpointSlice (the pods' IPv6
//! addresses) and written into the IPv6 maps, which the CLI reads back, and the health
//! check answers over both families.

mod common;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use common::{
    BACKEND_NAMES, SERVICE_TCP_PORT, SERVICE_UDP_PORT, SYNC_TIMEOUT, caller, cli_json, counter,
    flows_of, health_check, in_netns, kube_rules,
};
use proxy_lab::{Lab, LargeServers, Manifest, NODE_NAME, Reply, Service, addr, require_lab};

const CLUSTER_IPV6: &str = "2001:db8:ff::10";
const STICKY_IPV6: &str = "2001:db8:ff::11";
const EMPTY_IPV6: &str = "2001:db8:ff::12";
const HEALTH_CHECK_NODE_PORT: u16 = 32002;

/// The Service, its IPv4 slice (pod-1..pod-3) and its IPv6 slice (the same pods' IPv6
/// addresses).
fn dual_stack_manifest(lab: &Lab) -> Manifest {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  clusterIP: {v4}\n  clusterIPs: [{v4}, \"{v6}\"]\n\
         \x20 ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n\
         \x20 externalTrafficPolicy: Local\n  healthCheckNodePort: {health}\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {echo}\n\
         \x20   nodePort: {node_port}\n\
         status:\n  loadBalancer:\n    ingress:\n    - ip: {lb}\n    - ip: \"{lb6}\"\n",
        v4 = addr::NODE_PORT_SERVICE_IP,
        v6 = CLUSTER_IPV6,
        health = HEALTH_CHECK_NODE_PORT,
        echo = addr::ECHO_TCP_PORT,
        node_port = addr::NODE_PORT_TCP,
        lb = addr::LOAD_BALANCER_IP,
        lb6 = addr::LOAD_BALANCER_IPV6,
    );
    for (family, name, addresses) in [
        (
            "IPv4",
            "dual-v4",
            lab.pods()[..3]
                .iter()
                .map(|pod| pod.ip.to_string())
                .collect::<Vec<_>>(),
        ),
        (
            "IPv6",
            "dual-v6",
            lab.pods()[..3]
                .iter()
                .map(|pod| pod.ipv6.to_string())
                .collect(),
        ),
    ] {
        yaml.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
             \x20 name: {name}\n  namespace: default\n  labels:\n\
             \x20   kubernetes.io/service-name: dual\naddressType: {family}\n\
             ports:\n  - name: http\n    protocol: TCP\n    port: {echo}\nendpoints:\n",
            echo = addr::ECHO_TCP_PORT,
        ));
        for address in addresses {
            yaml.push_str(&format!(
                "  - addresses: [\"{address}\"]\n    nodeName: {NODE_NAME}\n\
                 \x20   conditions: {{ready: true}}\n"
            ));
        }
    }
    // Single-stack IPv6 Services: one with session affinity, one without endpoints.
    yaml.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: sticky6\n  namespace: default\n\
         spec:\n  clusterIP: \"{STICKY_IPV6}\"\n  ipFamilies: [IPv6]\n\
         \x20 sessionAffinity: ClientIP\n\
         \x20 sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 600}}}}\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: {echo}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n\
         \x20 name: sticky6\n  namespace: default\n  labels:\n\
         \x20   kubernetes.io/service-name: sticky6\naddressType: IPv6\n\
         ports:\n  - name: http\n    protocol: TCP\n    port: {echo}\nendpoints:\n\
         \x20 - addresses: [\"{pod_1}\"]\n    conditions: {{ready: true}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: empty6\n  namespace: default\n\
         spec:\n  clusterIP: \"{EMPTY_IPV6}\"\n  ipFamilies: [IPv6]\n\
         \x20 ports:\n  - name: http\n    protocol: TCP\n    port: 80\n",
        echo = addr::ECHO_TCP_PORT,
        pod_1 = lab.pod(1).ipv6,
    ));
    Manifest {
        file_name: "dual.yaml".to_owned(),
        yaml,
    }
}

#[test]
fn the_lab_carries_ipv6_pod_to_pod_and_from_the_client_with_the_daemon_running() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab
        .daemon()
        .manifest(common::echo_service().manifest(common::backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    for pod in common::backends(&lab) {
        // Straight to the pod's IPv6 address: from another pod through the node, and from
        // outside through the node's external link; TCP and UDP, both echo servers.
        for from in [caller(&lab), lab.client()] {
            for (protocol, reply) in [
                ("TCP", from.tcp_request(pod.ipv6, addr::ECHO_TCP_PORT)?),
                ("UDP", from.udp_request(pod.ipv6, addr::ECHO_UDP_PORT)?),
            ] {
                ensure!(
                    reply.body == pod.name && reply.peer.ip() == IpAddr::V6(pod.ipv6),
                    "{protocol} from {} to [{}]: {reply:?}",
                    from.name(),
                    pod.ipv6
                );
            }
        }
        // The node reaches its pods over IPv6 too, and IPv4 is as it was.
        let reply = lab.node().tcp_request(pod.ipv6, addr::ECHO_TCP_PORT)?;
        ensure!(reply.body == pod.name, "node to [{}]: {reply:?}", pod.ipv6);
        let reply = lab.client().udp_request(pod.ip, addr::ECHO_UDP_PORT)?;
        ensure!(reply.body == pod.name, "client to {}: {reply:?}", pod.ip);
    }
    // The IPv4 Service is served as before, beside.
    let reply = caller(&lab).udp_request(addr::CLUSTER_IP, SERVICE_UDP_PORT)?;
    ensure!(
        BACKEND_NAMES.contains(&reply.body.as_str())
            && reply.peer == (addr::CLUSTER_IP, SERVICE_UDP_PORT).into(),
        "{reply:?}"
    );
    let reply = caller(&lab).tcp_request(addr::CLUSTER_IP, SERVICE_TCP_PORT)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");
    Ok(())
}

/// Requests until every backend answered or `MAX_REQUESTS` were made: each answer from one
/// of the three backends and from `expected_peer` (the frontend: reverse NAT).
fn answered_by_every_backend(
    what: &str,
    expected_peer: SocketAddr,
    mut request: impl FnMut() -> Result<Reply>,
) -> Result<()> {
    const MAX_REQUESTS: usize = 60;
    let mut seen = BTreeSet::new();
    for _ in 0..MAX_REQUESTS {
        let reply = request().with_context(|| what.to_owned())?;
        ensure!(
            BACKEND_NAMES.contains(&reply.body.as_str()) && reply.peer == expected_peer,
            "{what}: {reply:?}, not a backend from {expected_peer}"
        );
        seen.insert(reply.body);
        if seen.len() == BACKEND_NAMES.len() {
            return Ok(());
        }
    }
    // Missing a backend in 60 draws of three: probability 3 · (2/3)^60 ≈ 1e-10.
    bail!("{what}: only {seen:?} answered in {MAX_REQUESTS} requests")
}

#[test]
fn ipv6_services_answer_tcp_and_udp_from_the_client_and_a_pod_and_refuse_without_endpoints()
-> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let six = Service::node_port("six", addr::NODE_PORT_SERVICE_IPV6)
        .tcp_node_port(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT, addr::NODE_PORT_TCP)
        .udp_node_port(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT, addr::NODE_PORT_UDP);
    let dual = Service::cluster_ip("dual", addr::CLUSTER_IP)
        .dual_stack(addr::CLUSTER_IPV6)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let empty_ip: Ipv6Addr = EMPTY_IPV6.parse()?;
    let empty = Service::cluster_ip("empty6", empty_ip).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT);
    let backends = common::backends(&lab);
    let daemon = lab
        .daemon()
        .manifest(six.manifest(backends))
        .manifest(dual.manifest(backends))
        .manifest(empty.manifest([]))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let pod = caller(&lab);
    let client = lab.client();
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    let six_ip = IpAddr::V6(addr::NODE_PORT_SERVICE_IPV6);
    let node = IpAddr::V6(addr::NODE_IPV6);
    // The single-stack IPv6 Service: its ClusterIP from a pod, its NodePorts from outside.
    for (what, from, ip, tcp_port, udp_port) in [
        (
            "ClusterIP from a pod",
            pod,
            six_ip,
            SERVICE_TCP_PORT,
            SERVICE_UDP_PORT,
        ),
        (
            "NodePort from outside",
            client,
            node,
            addr::NODE_PORT_TCP,
            addr::NODE_PORT_UDP,
        ),
        (
            "NodePort from a pod",
            pod,
            node,
            addr::NODE_PORT_TCP,
            addr::NODE_PORT_UDP,
        ),
    ] {
        answered_by_every_backend(&format!("IPv6 {what}, TCP"), at(ip, tcp_port), || {
            from.tcp_request(ip, tcp_port)
        })?;
        answered_by_every_backend(&format!("IPv6 {what}, UDP"), at(ip, udp_port), || {
            from.udp_request(ip, udp_port)
        })?;
    }
    // The dual-stack Service over both families, from a pod.
    for ip in [IpAddr::V4(addr::CLUSTER_IP), IpAddr::V6(addr::CLUSTER_IPV6)] {
        answered_by_every_backend(
            &format!("dual-stack {ip}, TCP"),
            at(ip, SERVICE_TCP_PORT),
            || pod.tcp_request(ip, SERVICE_TCP_PORT),
        )?;
        answered_by_every_backend(
            &format!("dual-stack {ip}, UDP"),
            at(ip, SERVICE_UDP_PORT),
            || pod.udp_request(ip, SERVICE_UDP_PORT),
        )?;
    }
    // No endpoints: refused at once (ICMPv6 port unreachable), from a pod and from outside.
    for from in [pod, client] {
        match from.tcp_connect(empty_ip, SERVICE_TCP_PORT, Duration::from_secs(2)) {
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {}
            other => bail!(
                "{} to [{empty_ip}]:80 without endpoints: {other:?}",
                from.name()
            ),
        }
    }
    Ok(())
}

#[test]
fn udp_over_the_mtu_through_an_ipv6_cluster_ip_and_node_port_is_answered_whole() -> Result<()> {
    require_lab!();
    // pod-1's sized UDP server (it answers with the size asked for); 5454: no echo port.
    const SIZED_PORT: u16 = 5454;
    const SIZED_NODE_PORT: u16 = 30053;
    let lab = common::lab()?;
    let mut servers = LargeServers::default();
    servers.udp_sized(lab.pod(1), SIZED_PORT)?;
    let six = Service::node_port("large6", addr::NODE_PORT_SERVICE_IPV6).udp_node_port(
        SERVICE_UDP_PORT,
        SIZED_PORT,
        SIZED_NODE_PORT,
    );
    let daemon = lab.daemon().manifest(six.manifest([lab.pod(1)])).start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let six_ip = IpAddr::V6(addr::NODE_PORT_SERVICE_IPV6);
    let node = IpAddr::V6(addr::NODE_IPV6);
    for (what, from, ip, port) in [
        (
            "ClusterIP from a pod",
            caller(&lab),
            six_ip,
            SERVICE_UDP_PORT,
        ),
        (
            "NodePort from the client",
            lab.client(),
            node,
            SIZED_NODE_PORT,
        ),
    ] {
        // A fragmented query, then a fragmented answer (a lost fragment loses the datagram:
        // the request times out).
        for (query, answer) in [(4_000, 100), (50, 30_000)] {
            let reply = from
                .udp_sized_request(ip, port, query, answer, Duration::from_secs(3))
                .with_context(|| format!("{what}: {query} B query, {answer} B answer"))?;
            ensure!(
                reply.body == "pod-1",
                "{what}: answered by {:?}",
                reply.body
            );
            ensure!(
                reply.peer == SocketAddr::new(ip, port),
                "{what}: answered from {}",
                reply.peer
            );
            println!("UDP {what} [{ip}]:{port}: {query} B query, {answer} B answer");
        }
    }
    ensure!(
        counter(&daemon, "fragment")? > 0,
        "no fragment was followed"
    );
    Ok(())
}

#[test]
fn a_dual_stack_service_serves_ipv4_plans_ipv6_and_answers_health_checks_on_both() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let daemon = lab.daemon().manifest(dual_stack_manifest(&lab)).start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;

    // The IPv4 half: the ClusterIP from a pod, the NodePort from outside.
    let reply = caller(&lab).tcp_request(addr::NODE_PORT_SERVICE_IP, 80)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");
    let reply = lab
        .client()
        .tcp_request(addr::NODE_IP, addr::NODE_PORT_TCP)?;
    ensure!(BACKEND_NAMES.contains(&reply.body.as_str()), "{reply:?}");

    // The health check over both families: three local endpoints in each.
    for address in [IpAddr::V4(addr::NODE_IP), IpAddr::V6(addr::NODE_IPV6)] {
        let (code, local_endpoints) = health_check(lab.client(), address, HEALTH_CHECK_NODE_PORT)?;
        ensure!(
            code == 200 && local_endpoints == 3,
            "{address}: {code}, {local_endpoints}"
        );
    }

    // The IPv6 half: its ClusterIP, the NodePort on each of the node's IPv6 addresses
    // (`eth0`'s and the pods' gateway, as the IPv4 NodePort opens on both of the IPv4
    // ones) and the IPv6 load-balancer IP are written into the IPv6 maps, with the two
    // IPv6-only ClusterIPs, and served by the IPv6 packet path: the sync line counts them.
    let log = daemon.log();
    ensure!(
        log.contains("ipv6=6") && !log.contains("not served: the packet path"),
        "no sync line counting the 6 IPv6 frontends:\n{log}"
    );
    ensure!(
        log.contains(&addr::NODE_IPV6.to_string()),
        "the node's IPv6 address is not among its addresses:\n{log}"
    );

    // The CLI reads them back from the IPv6 maps: the four frontends with the IPv6
    // slice's endpoints, and as ip6tables rules.
    let services = cli_json(&daemon, &["services"])?;
    let ipv6: Vec<&serde_json::Value> = (services.as_array().into_iter().flatten())
        .filter(|row| row["family"] == "IPv6" && row["service"] == "default/dual:http")
        .collect();
    let addresses: Vec<&str> = ipv6
        .iter()
        .filter_map(|row| row["address"].as_str())
        .collect();
    ensure!(
        addresses.len() == 4
            && addresses.contains(&CLUSTER_IPV6)
            && addresses.contains(&addr::POD_GATEWAY_V6.to_string().as_str())
            && addresses.contains(&addr::LOAD_BALANCER_IPV6.to_string().as_str())
            && addresses.contains(&addr::NODE_IPV6.to_string().as_str()),
        "IPv6 frontends in `services`: {addresses:?}"
    );
    for row in &ipv6 {
        let backends = row["backends"].as_array().map_or(0, Vec::len);
        ensure!(backends == 3, "{row}");
    }
    let stats = cli_json(&daemon, &["stats"])?;
    let entries = |name: &str| {
        (stats["maps"].as_array().into_iter().flatten())
            .find(|map| map["name"] == name)
            .and_then(|map| map["entries"].as_u64())
    };
    // Three distinct backends: sticky6's endpoint is one of dual's.
    ensure!(
        entries("SERVICES6") == Some(6) && entries("BACKEND_IDS6") == Some(3),
        "stats: {stats:#}"
    );
    let rules = daemon.cli(&["explain", "--family", "ipv6"])?;
    ensure!(
        rules.contains(&format!("-d {CLUSTER_IPV6} --dport 80 -j KUBE-SVC-"))
            && rules.contains(&format!("-d {EMPTY_IPV6} --dport 80 -j REJECT"))
            && rules.contains("--rcheck --seconds 600 --reap")
            && rules.matches("-j DNAT --to-destination [2001:db8:").count() == 4,
        "explain --family ipv6:\n{rules}"
    );
    // ip6tables takes them (session affinity's `recent` lists and REJECT included), and ip6tables-save prints back exactly the iptables-save form
    // (in the client's namespace, where nothing jumps to the KUBE chains).
    let saved_form = daemon.cli(&["explain", "--family", "ipv6", "--form", "iptables-save"])?;
    in_netns(lab.client(), "ip6tables-restore", &[], &rules)?;
    let saved = in_netns(lab.client(), "ip6tables-save", &[], "")?;
    ensure!(
        kube_rules(&saved_form) == kube_rules(&saved),
        "explain --family ipv6 --form iptables-save:\n{saved_form}\nip6tables-save:\n{saved}"
    );
    Ok(())
}

#[test]
fn conntrack_and_trace_read_a_real_ipv6_flow_and_flush_removes_it() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let six =
        Service::cluster_ip("six", addr::CLUSTER_IPV6).tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT);
    let backends = common::backends(&lab);
    let daemon = lab.daemon().manifest(six.manifest(backends)).start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let client = lab.pod(4).ipv6;
    let vip = addr::CLUSTER_IPV6.to_string();

    let mut session = caller(&lab).tcp_session(addr::CLUSTER_IPV6, SERVICE_TCP_PORT)?;
    let served_by = session.request()?;
    let backend = backends
        .iter()
        .find(|pod| pod.name == served_by)
        .with_context(|| format!("answered by {served_by}"))?;
    let backend_ip = backend.ipv6.to_string();

    // `conntrack` reads the flow from CONNTRACK6.
    let flows = flows_of(&daemon, client, &[])?;
    ensure!(flows.len() == 1, "one flow from [{client}]: {flows:#?}");
    let flow = &flows[0];
    ensure!(
        flow["family"] == "IPv6"
            && flow["protocol"] == "tcp"
            && flow["frontend"]["address"] == vip
            && flow["frontend"]["port"] == SERVICE_TCP_PORT
            && flow["backend"]["address"] == backend_ip
            && flow["backend"]["port"] == addr::ECHO_TCP_PORT
            && flow["backend_sees"]["address"] == client.to_string()
            && flow["service"] == "default/six:tcp-80"
            && flow["flow_state"] == "established"
            && flow["assured"] == true
            && flow["entries"] == serde_json::json!(["forward", "reply"]),
        "{flow:#}"
    );
    let other_ip = backends
        .iter()
        .find(|pod| pod.ipv6 != backend.ipv6)
        .context("a second pod")?
        .ipv6
        .to_string();
    let vip_port = format!("[{vip}]:{SERVICE_TCP_PORT}");
    for (filter, expected) in [
        (vec!["--service", vip_port.as_str()], 1),
        (vec!["--service", vip.as_str()], 1),
        (vec!["--service", "default/six"], 1),
        (vec!["--service", "198.19.0.10:80"], 0),
        (vec!["--backend", backend_ip.as_str()], 1),
        (vec!["--backend", other_ip.as_str()], 0),
    ] {
        let flows = flows_of(&daemon, client, &filter)?;
        ensure!(flows.len() == expected, "{filter:?}: {flows:#?}");
    }
    let table = daemon.cli(&["conntrack"])?;
    ensure!(
        table.contains(&format!("[{client}]:{}", flow["client"]["port"]))
            && table.contains(&vip_port),
        "{table}"
    );

    // `trace` of the flow's own tuple follows its CONNTRACK6 entry to the same backend.
    let source = format!("[{client}]:{}", flow["client"]["port"]);
    let destination = format!("{vip_port}/tcp");
    let trace = cli_json(&daemon, &["trace", &source, &destination])?;
    ensure!(
        trace["packet"]["family"] == "IPv6"
            && trace["path"] == "ct_hit"
            && trace["conntrack"]["direction"] == "forward"
            && trace["backend"]["address"] == backend_ip
            && trace["output"]["destination"]["address"] == backend_ip,
        "{trace:#}"
    );
    ensure!(
        trace["decided_by"][0]
            .as_str()
            .is_some_and(|line| line.starts_with("CONNTRACK6[tcp ")),
        "{trace:#}"
    );
    // A new port: a new connection's dry run through SERVICES6 and BACKEND_SLOTS6, which
    // writes no flow.
    let trace = cli_json(
        &daemon,
        &["trace", &format!("[{client}]:45678"), &destination],
    )?;
    let reached = trace["output"]["destination"]["address"]
        .as_str()
        .unwrap_or("");
    ensure!(
        trace["path"] == "new_flow"
            && trace["frontend"]["address"] == vip
            && trace["frontend"]["service"] == "default/six:tcp-80"
            && trace["backend"]["address"] == reached
            && backends.iter().any(|pod| pod.ipv6.to_string() == reached)
            && trace["output"]["source"]["port"] == 45678,
        "{trace:#}"
    );
    ensure!(
        trace["decided_by"][0]
            .as_str()
            .is_some_and(|line| line.starts_with(&format!("SERVICES6[{vip_port}/tcp]"))),
        "{trace:#}"
    );
    ensure!(
        flows_of(&daemon, client, &[])?.len() == 1,
        "the dry run created a flow"
    );

    // `conntrack flush` removes both of its CONNTRACK6 entries.
    let client_ip = client.to_string();
    let flushed = cli_json(&daemon, &["conntrack", "flush", "--client", &client_ip])?;
    ensure!(
        flushed["flows"] == 1 && flushed["entries"] == 2,
        "{flushed:#}"
    );
    let left = flows_of(&daemon, client, &[])?;
    ensure!(left.is_empty(), "after the flush: {left:#?}");
    drop(session);
    Ok(())
}

/// Flows per protocol kept across the restart: were a restarted daemon to forget them and
/// choose again, all of them would keep their backend with probability (1/3)^5 each.
const KEPT_FLOWS: usize = 5;

#[test]
fn ipv6_flows_keep_their_backends_across_a_daemon_restart() -> Result<()> {
    require_lab!();
    let lab = common::lab()?;
    let service = Service::cluster_ip("six", addr::CLUSTER_IPV6)
        .tcp(SERVICE_TCP_PORT, addr::ECHO_TCP_PORT)
        .udp(SERVICE_UDP_PORT, addr::ECHO_UDP_PORT);
    let mut daemon = lab
        .daemon()
        .manifest(service.manifest(common::backends(&lab)))
        .start()?;
    daemon.wait_synced(SYNC_TIMEOUT)?;
    let pod = caller(&lab);
    let timeout = Duration::from_secs(2);
    // Established TCP connections and connected UDP flows from a pod, through tc.
    let mut sessions = (0..KEPT_FLOWS)
        .map(|_| pod.tcp_session(addr::CLUSTER_IPV6, SERVICE_TCP_PORT))
        .collect::<Result<Vec<_>>>()?;
    let flows = (0..KEPT_FLOWS)
        .map(|_| pod.udp_flow(addr::CLUSTER_IPV6, SERVICE_UDP_PORT, timeout))
        .collect::<std::io::Result<Vec<_>>>()?;
    let tcp_before = (sessions.iter_mut())
        .map(|session| session.request())
        .collect::<Result<Vec<_>>>()?;
    let udp_before = flows
        .iter()
        .map(|flow| flow.request())
        .collect::<std::io::Result<Vec<_>>>()?;

    let syncs = daemon.syncs();
    daemon.restart()?;
    daemon.wait_for_syncs(syncs + 1, SYNC_TIMEOUT)?;
    // Each keeps its backend: the pinned CONNTRACK6 outlived the daemon.
    for (session, before) in sessions.iter_mut().zip(&tcp_before) {
        let after = session
            .request()
            .context("a TCP connection after the restart")?;
        ensure!(&after == before, "TCP moved from {before} to {after}");
    }
    for (flow, before) in flows.iter().zip(&udp_before) {
        let after = flow.request().context("a UDP flow after the restart")?;
        ensure!(&after == before, "UDP moved from {before} to {after}");
    }
    // New flows are served as before.
    let reply = pod.tcp_request(addr::CLUSTER_IPV6, SERVICE_TCP_PORT)?;
    ensure!(
        BACKEND_NAMES.contains(&reply.body.as_str())
            && reply.peer == SocketAddr::new(addr::CLUSTER_IPV6.into(), SERVICE_TCP_PORT),
        "{reply:?}"
    );
    Ok(())
}
