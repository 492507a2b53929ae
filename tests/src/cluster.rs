//! The multi-node lab: several node namespaces on one shared L2 "fabric" (a bridge in its
//! own namespace), each node with its own pod CIDR and pods, routes between the pod CIDRs
//! via the node addresses (host-gw style, as flannel's host-gw or Calico without overlay),
//! and an outside client on the fabric. Addresses: the crate docs' second table.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};

use crate::addr;
use crate::daemon::DaemonBuilder;
use crate::echo::EchoServers;
use crate::lab::{Pod, prepare_ipv6, wire_pod};
use crate::netns::Netns;
use crate::scratch::unique_prefix;
use crate::xdp_pass::XdpPass;

/// The bridge inside the fabric namespace.
const BRIDGE: &str = "fabric0";

/// One node of a [`Cluster`]: its namespace (`eth0` on the fabric) and its pods.
#[derive(Debug)]
pub struct ClusterNode {
    /// The Kubernetes node name its daemon runs as: `lab-node-<k>`.
    pub name: String,
    /// Its address on the fabric, where its NodePorts answer.
    pub ip: Ipv4Addr,
    // Pods go before the node: their veths are deleted with either namespace.
    pods: Vec<Pod>,
    pub ns: Netns,
}

impl ClusterNode {
    /// Pod `i` of this node, numbered from 1.
    pub fn pod(&self, i: usize) -> &Pod {
        assert!(
            (1..=self.pods.len()).contains(&i),
            "{} has pods 1..={}, asked for {i}",
            self.name,
            self.pods.len()
        );
        &self.pods[i - 1]
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
}

/// Builds a [`Cluster`]; see [`Cluster::builder`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    pods_per_node: Vec<usize>,
}

impl ClusterBuilder {
    /// One node per entry, with that many pods (default: two nodes with two pods each).
    pub fn pods_per_node(mut self, counts: &[usize]) -> Self {
        self.pods_per_node = counts.to_vec();
        self
    }

    /// Creates fabric, client, nodes and pods, starts the pods' servers (TCP and UDP echo
    /// on the lab's echo ports, the peer reporter on [`addr::PEER_REPORT_PORT`]). Whatever
    /// was created is removed again if a later step fails.
    pub fn build(self) -> Result<Cluster> {
        let node_count = self.pods_per_node.len();
        ensure!(
            (1..=addr::MAX_CLUSTER_NODES).contains(&node_count),
            "1..={} nodes, asked for {node_count}",
            addr::MAX_CLUSTER_NODES
        );
        let id = unique_prefix();
        let fabric = Netns::create(format!("{id}-fabric"))?;
        fabric.ip(&["link", "set", "lo", "up"])?;
        fabric.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        fabric.ip(&["link", "set", BRIDGE, "up"])?;
        let client = Netns::create(format!("{id}-client"))?;
        let client_port = attach_to_fabric(
            &fabric,
            &client,
            "client",
            addr::FABRIC_CLIENT_IP,
            addr::FABRIC_CLIENT_IPV6,
        )
        .context("wiring the client to the fabric")?;

        let mut cluster = Cluster {
            fabric_ports: vec![client_port],
            servers: EchoServers::default(),
            nodes: Vec::with_capacity(node_count),
            client,
            fabric,
            id,
        };
        for (index, &pods) in self.pods_per_node.iter().enumerate() {
            let k = index + 1;
            cluster
                .add_node(k, node_count, pods)
                .with_context(|| format!("creating node {k}"))?;
        }
        Ok(cluster)
    }
}

/// Nodes, pods and a client on a fabric. Dropping it stops the servers and deletes every
/// namespace (and with them every veth and the bridge).
#[derive(Debug)]
pub struct Cluster {
    /// The fabric's ends of the wires, ready for an XDP_TX from their member.
    fabric_ports: Vec<XdpPass>,
    // Drop order matters: servers stop before their namespaces go.
    servers: EchoServers,
    nodes: Vec<ClusterNode>,
    client: Netns,
    fabric: Netns,
    id: String,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            pods_per_node: vec![2, 2],
        }
    }

    /// `epx<pid>-<counter>`: the prefix of all this lab's namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Node `k`, numbered from 1.
    pub fn node(&self, k: usize) -> &ClusterNode {
        assert!(
            (1..=self.nodes.len()).contains(&k),
            "the cluster has nodes 1..={}, asked for {k}",
            self.nodes.len()
        );
        &self.nodes[k - 1]
    }

    /// The outside client on the fabric ([`addr::FABRIC_CLIENT_IP`]).
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Starts configuring an ebpf-proxy daemon for node `k`.
    pub fn daemon(&self, k: usize) -> DaemonBuilder<'_> {
        let node = self.node(k);
        DaemonBuilder::new(&node.ns, &node.name)
    }

    fn add_node(&mut self, k: usize, node_count: usize, pod_count: usize) -> Result<()> {
        ensure!(
            pod_count <= addr::MAX_PODS_PER_NODE,
            "at most {} pods per node, asked for {pod_count}",
            addr::MAX_PODS_PER_NODE
        );
        let ns = Netns::create(format!("{}-node-{k}", self.id))?;
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        prepare_ipv6(&ns)?;
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        let ip = addr::fabric_node_ip(k);
        let port = attach_to_fabric(
            &self.fabric,
            &ns,
            &format!("node{k}"),
            ip,
            addr::fabric_node_ipv6(k),
        )?;
        self.fabric_ports.push(port);
        // Host-gw routing: every other node's pod CIDR (and IPv6 pod prefix) via that
        // node's fabric address.
        for other in (1..=node_count).filter(|&other| other != k) {
            let (network, prefix) = addr::node_pod_cidr(other);
            let (network_v6, prefix_v6) = addr::node_pod_prefix_v6(other);
            for (destination, via) in [
                (
                    format!("{network}/{prefix}"),
                    addr::fabric_node_ip(other).to_string(),
                ),
                (
                    format!("{network_v6}/{prefix_v6}"),
                    addr::fabric_node_ipv6(other).to_string(),
                ),
            ] {
                ns.ip(&["route", "add", &destination, "via", &via, "dev", "eth0"])?;
            }
        }
        let mut node = ClusterNode {
            name: format!("lab-node-{k}"),
            ip,
            pods: Vec::with_capacity(pod_count),
            ns,
        };
        for i in 1..=pod_count {
            let name = format!("n{k}-pod-{i}");
            let pod = Pod {
                ns: Netns::create(format!("{}-{name}", self.id))?,
                name,
                ip: addr::node_pod_ip(k, i),
                ipv6: addr::node_pod_ipv6(k, i),
            };
            wire_pod(
                &node.ns,
                &pod,
                &format!("lxc{i}"),
                addr::node_pod_gateway(k),
                addr::node_pod_gateway_v6(k),
            )
            .with_context(|| format!("wiring {}", pod.name))?;
            // Pushed before its servers start, so a failure below still deletes it.
            node.pods.push(pod);
            let pod = node.pods.last().expect("just pushed");
            self.servers
                .spawn_pair(pod, addr::ECHO_TCP_PORT, addr::ECHO_UDP_PORT)?;
            self.servers
                .spawn_tcp_peer_reporter(&pod.ns, addr::PEER_REPORT_PORT)?;
        }
        self.nodes.push(node);
        Ok(())
    }
}

/// A veth from `member` (`eth0`, `ip`/24 and `ipv6`/64) to the fabric bridge (`port` in
/// the fabric namespace), created inside lab namespaces only.
fn attach_to_fabric(
    fabric: &Netns,
    member: &Netns,
    port: &str,
    ip: Ipv4Addr,
    ipv6: Ipv6Addr,
) -> Result<XdpPass> {
    prepare_ipv6(member)?;
    fabric.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        member.name(),
    ])?;
    fabric.ip(&["link", "set", port, "master", BRIDGE])?;
    fabric.ip(&["link", "set", port, "up"])?;
    // The member's packets cross with complete checksums, as on a wire.
    member.like_a_wire("eth0")?;
    member.ip(&["link", "set", "lo", "up"])?;
    member.ip(&[
        "addr",
        "add",
        &format!("{ip}/{}", addr::FABRIC_PREFIX_LEN),
        "dev",
        "eth0",
    ])?;
    member.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ipv6}/{}", addr::FABRIC_PREFIX_LEN_V6),
        "dev",
        "eth0",
        "nodad",
    ])?;
    member.ip(&["link", "set", "eth0", "up"])?;
    // The port takes what an XDP program on the member sends back onto the wire.
    XdpPass::attach(fabric, port)
}
