//! The lab itself, without the daemon: namespaces, routing, echo servers, client helpers
//! and cleanup.

use std::net::{SocketAddr, SocketAddrV4};

use anyhow::{Result, ensure};
use proxy_lab::{Cluster, Lab, addr, require_lab};

#[test]
fn pods_reach_each_other_directly() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(3).build()?;
    for from in lab.pods() {
        for to in lab.pods() {
            let tcp = from.ns.tcp_request(to.ip, lab.tcp_port())?;
            ensure!(
                tcp.body == to.name,
                "{} → {}: TCP answered {tcp:?}",
                from.name,
                to.name
            );
            let udp = from.ns.udp_request(to.ip, lab.udp_port())?;
            ensure!(
                udp.body == to.name,
                "{} → {}: UDP answered {udp:?}",
                from.name,
                to.name
            );
            let expected_peer = SocketAddr::V4(SocketAddrV4::new(to.ip, lab.udp_port()));
            ensure!(udp.peer == expected_peer, "UDP reply from {}", udp.peer);
        }
    }
    Ok(())
}

#[test]
fn client_reaches_pods_through_the_node() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(2).build()?;
    for pod in lab.pods() {
        ensure!(lab.client().tcp_request(pod.ip, lab.tcp_port())?.body == pod.name);
        ensure!(lab.client().udp_request(pod.ip, lab.udp_port())?.body == pod.name);
    }
    Ok(())
}

#[test]
fn one_tcp_session_carries_many_rounds() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(2).build()?;
    let mut session = lab.pod(1).ns.tcp_session(lab.pod(2).ip, lab.tcp_port())?;
    for round in 0..100 {
        let body = session.request()?;
        ensure!(body == "pod-2", "round {round} answered {body:?}");
    }
    Ok(())
}

#[test]
fn echo_ports_are_configurable() -> Result<()> {
    require_lab!();
    let lab = Lab::builder()
        .pods(1)
        .tcp_port(9090)
        .udp_port(9053)
        .build()?;
    let pod = lab.pod(1);
    ensure!(lab.client().tcp_request(pod.ip, 9090)?.body == "pod-1");
    ensure!(lab.client().udp_request(pod.ip, 9053)?.body == "pod-1");
    Ok(())
}

#[test]
fn node_namespace_forwards_and_knows_its_addresses() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(1).build()?;
    let forwarding = lab
        .node()
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward"))??;
    ensure!(
        forwarding.trim() == "1",
        "ip_forward in the node namespace is {forwarding:?}"
    );
    // The client's route to the node address: a TCP connect to a closed port is refused
    // (RST from the node), which proves the path without any server.
    let refused = lab
        .client()
        .tcp_connect(addr::NODE_IP, 1, proxy_lab::REQUEST_TIMEOUT)
        .expect_err("nothing listens on the node");
    ensure!(
        refused.kind() == std::io::ErrorKind::ConnectionRefused,
        "expected a refusal from the node, got {refused}"
    );
    Ok(())
}

#[test]
fn dropping_the_lab_removes_its_namespaces() -> Result<()> {
    require_lab!();
    let lab = Lab::builder().pods(2).build()?;
    let paths: Vec<_> = [lab.node(), lab.client()]
        .into_iter()
        .chain(lab.pods().iter().map(|pod| &pod.ns))
        .map(|ns| ns.path())
        .collect();
    ensure!(paths.iter().all(|path| path.exists()));
    drop(lab);
    let left: Vec<_> = paths.iter().filter(|path| path.exists()).collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    Ok(())
}

#[test]
fn parallel_labs_are_isolated() -> Result<()> {
    require_lab!();
    let first = Lab::builder().pods(1).build()?;
    let second = Lab::builder().pods(1).build()?;
    ensure!(first.id() != second.id());
    // Both labs use the same addresses and interface names; each node must see only its own
    // pod veth.
    for lab in [&first, &second] {
        ensure!(
            lab.client()
                .tcp_request(lab.pod(1).ip, lab.tcp_port())?
                .body
                == "pod-1"
        );
        let links = std::process::Command::new("ip")
            .args(["-n", lab.node().name(), "-o", "link", "show"])
            .output()?;
        let links = String::from_utf8_lossy(&links.stdout);
        let lxc_links = links.lines().filter(|line| line.contains(": lxc")).count();
        ensure!(
            lxc_links == 1,
            "node {} sees {lxc_links} pod veths",
            lab.id()
        );
    }
    Ok(())
}

#[test]
fn a_panicking_test_still_removes_its_lab() -> Result<()> {
    require_lab!();
    let (sender, receiver) = std::sync::mpsc::channel();
    let outcome = std::panic::catch_unwind(move || {
        let lab = Lab::builder().pods(1).build().expect("lab");
        sender.send(lab.node().path()).expect("send");
        panic!("deliberate panic with the lab alive");
    });
    ensure!(outcome.is_err());
    let node_path = receiver.recv()?;
    ensure!(
        !node_path.exists(),
        "{} survived the panic",
        node_path.display()
    );
    Ok(())
}

#[test]
fn cluster_pods_reach_each_other_across_nodes_unchanged() -> Result<()> {
    require_lab!();
    let cluster = Cluster::builder().pods_per_node(&[1, 1, 1]).build()?;
    let pods: Vec<_> = (1..=3).map(|k| cluster.node(k).pod(1)).collect();
    for from in &pods {
        for to in &pods {
            let tcp = from.ns.tcp_request(to.ip, addr::ECHO_TCP_PORT)?;
            ensure!(tcp.body == to.name, "{} → {}: {tcp:?}", from.name, to.name);
            let udp = from.ns.udp_request(to.ip, addr::ECHO_UDP_PORT)?;
            ensure!(udp.body == to.name, "{} → {}: {udp:?}", from.name, to.name);
            // The peer reporter sees the pod's own address: host-gw routing, no NAT.
            let seen = from.ns.tcp_request(to.ip, addr::PEER_REPORT_PORT)?.body;
            ensure!(seen == from.ip.to_string(), "{} seen as {seen}", from.name);
        }
    }
    Ok(())
}

#[test]
fn dropping_the_cluster_removes_its_namespaces() -> Result<()> {
    require_lab!();
    let cluster = Cluster::builder().build()?;
    let prefix = format!("{}-", cluster.id());
    let ours = || -> Result<Vec<String>> {
        Ok(std::fs::read_dir("/run/netns")?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with(&prefix))
            .collect())
    };
    // fabric, client, two nodes, two pods each.
    ensure!(ours()?.len() == 8, "namespaces: {:?}", ours()?);
    drop(cluster);
    ensure!(ours()?.is_empty(), "namespaces left behind: {:?}", ours()?);
    Ok(())
}
