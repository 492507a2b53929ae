//! The lab topology: node, pods and client namespaces, wired as in the crate docs' table.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result, ensure};

use crate::addr;
use crate::daemon::DaemonBuilder;
use crate::echo::EchoServers;
use crate::netns::Netns;
use crate::scratch::unique_prefix;
use crate::xdp_pass::XdpPass;

/// The Kubernetes node name the daemon runs as and the examples' endpoints name.
pub const NODE_NAME: &str = "lab-node";

/// A pod: a namespace behind a veth (`eth0` inside, `lxc<i>` on the node), with an
/// address of each family, running echo servers (on both) that answer with [`Pod::name`].
#[derive(Debug)]
pub struct Pod {
    /// `pod-<i>`, what its echo servers answer.
    pub name: String,
    pub ip: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ns: Netns,
}

/// Builds a [`Lab`]; see [`Lab::builder`].
#[derive(Clone, Debug)]
pub struct LabBuilder {
    pods: usize,
    tcp_port: u16,
    udp_port: u16,
}

impl LabBuilder {
    /// Number of pods (default 3), named `pod-1` … `pod-n`.
    pub fn pods(mut self, count: usize) -> Self {
        self.pods = count;
        self
    }

    /// Port of the pods' TCP echo servers (default [`addr::ECHO_TCP_PORT`]).
    pub fn tcp_port(mut self, port: u16) -> Self {
        self.tcp_port = port;
        self
    }

    /// Port of the pods' UDP echo servers (default [`addr::ECHO_UDP_PORT`]).
    pub fn udp_port(mut self, port: u16) -> Self {
        self.udp_port = port;
        self
    }

    /// Creates the namespaces, links, addresses and routes, and starts the echo servers.
    /// Whatever was created is removed again if a later step fails.
    pub fn build(self) -> Result<Lab> {
        ensure!(
            self.pods <= addr::MAX_PODS,
            "at most {} pods, asked for {}",
            addr::MAX_PODS,
            self.pods
        );
        let id = unique_prefix();
        let node = Netns::create(format!("{id}-node"))?;
        node.ip(&["link", "set", "lo", "up"])?;
        node.sysctl("net/ipv4/ip_forward", "1")?;
        prepare_ipv6(&node)?;
        node.sysctl("net/ipv6/conf/all/forwarding", "1")?;

        let client = Netns::create(format!("{id}-client"))?;
        prepare_ipv6(&client)?;
        wire_client(&node, &client).context("wiring the client namespace")?;
        let client_end = XdpPass::attach(&client, "eth0")?;

        let mut lab = Lab {
            _wire_end: client_end,
            servers: EchoServers::default(),
            pods: Vec::with_capacity(self.pods),
            client,
            node,
            id,
            tcp_port: self.tcp_port,
            udp_port: self.udp_port,
        };
        for i in 1..=self.pods {
            let pod = lab
                .add_pod(i)
                .with_context(|| format!("creating pod-{i}"))?;
            lab.servers.spawn_pair(&pod, self.tcp_port, self.udp_port)?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }
}

/// A pod created after the lab was built, with its own echo servers. Dropping it stops
/// them and deletes the pod's namespace, which removes its veth from the node.
#[derive(Debug)]
pub struct LatePod {
    // Held for its Drop, which must run first: servers stop before their namespace goes.
    _servers: EchoServers,
    pub pod: Pod,
}

/// A node namespace with pods and an outside client. Dropping it stops the echo servers and
/// deletes every namespace (and with them every veth).
#[derive(Debug)]
pub struct Lab {
    /// The client's end of the external wire, ready for the node's XDP_TX.
    _wire_end: XdpPass,
    // Drop order matters: servers stop before their namespaces go.
    servers: EchoServers,
    pods: Vec<Pod>,
    client: Netns,
    node: Netns,
    id: String,
    tcp_port: u16,
    udp_port: u16,
}

impl Lab {
    pub fn builder() -> LabBuilder {
        LabBuilder {
            pods: 3,
            tcp_port: addr::ECHO_TCP_PORT,
            udp_port: addr::ECHO_UDP_PORT,
        }
    }

    /// `epx<pid>-<counter>`: the prefix of all this lab's namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node namespace, where the daemon runs.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The outside client's namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Pod `i`, numbered from 1 like its name.
    pub fn pod(&self, i: usize) -> &Pod {
        assert!(
            (1..=self.pods.len()).contains(&i),
            "the lab has pod-1..=pod-{}, asked for pod-{i}",
            self.pods.len()
        );
        &self.pods[i - 1]
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Port of the pods' TCP echo servers.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// Port of the pods' UDP echo servers.
    pub fn udp_port(&self) -> u16 {
        self.udp_port
    }

    /// Creates pod `i` (after the built ones) while the lab, and maybe a daemon, runs: how
    /// a pod appears on a real node. Dropping the returned pod deletes it again.
    pub fn start_late_pod(&self, i: usize) -> Result<LatePod> {
        ensure!(
            i > self.pods.len() && i <= addr::MAX_PODS,
            "late pod {i} must come after the {} built pods and stay within {}",
            self.pods.len(),
            addr::MAX_PODS
        );
        let pod = self
            .add_pod(i)
            .with_context(|| format!("creating pod-{i}"))?;
        let mut servers = EchoServers::default();
        servers.spawn_pair(&pod, self.tcp_port, self.udp_port)?;
        Ok(LatePod {
            _servers: servers,
            pod,
        })
    }

    /// Starts configuring the ebpf-proxy daemon for this lab's node.
    pub fn daemon(&self) -> DaemonBuilder<'_> {
        DaemonBuilder::new(&self.node, NODE_NAME)
    }

    fn add_pod(&self, i: usize) -> Result<Pod> {
        let name = format!("pod-{i}");
        let ns = Netns::create(format!("{}-{name}", self.id))?;
        let pod = Pod {
            name,
            ip: addr::pod_ip(i),
            ipv6: addr::pod_ipv6(i),
            ns,
        };
        wire_pod(
            &self.node,
            &pod,
            &format!("lxc{i}"),
            addr::POD_GATEWAY,
            addr::POD_GATEWAY_V6,
        )?;
        Ok(pod)
    }
}

/// Makes IPv6 addresses and neighbours usable at once in `ns`, a lab namespace: no
/// duplicate address detection (a tentative address cannot be used for a second or more,
/// also the link-local ones neighbour discovery starts from). Links created in `ns`
/// afterwards take it from `default`.
pub(crate) fn prepare_ipv6(ns: &Netns) -> Result<()> {
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net/ipv6/conf/{scope}/accept_dad"), "0")?;
    }
    Ok(())
}

/// Connects `pod`'s namespace to `node` by a veth (`eth0` in the pod, `host_side` on the
/// node), in both families: the pod gets its address as a /32 (/128) and a default route
/// via `gateway` (`gateway_v6`), the node the gateway as a /32 (/128) on `host_side` and a
/// /32 (/128) route to the pod. IPv6 addresses skip duplicate address detection.
pub(crate) fn wire_pod(
    node: &Netns,
    pod: &Pod,
    host_side: &str,
    gateway: Ipv4Addr,
    gateway_v6: Ipv6Addr,
) -> Result<()> {
    let (ip, ipv6) = (pod.ip, pod.ipv6);
    let pod = &pod.ns;
    prepare_ipv6(pod)?;
    let gateway = gateway.to_string();
    let gateway_v6 = gateway_v6.to_string();
    // Both ends are created inside lab namespaces: nothing appears in the root namespace.
    node.ip(&[
        "link",
        "add",
        host_side,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod.name(),
    ])?;
    node.ip(&["addr", "add", &format!("{gateway}/32"), "dev", host_side])?;
    node.ip(&["link", "set", host_side, "up"])?;
    node.ip(&["route", "add", &format!("{ip}/32"), "dev", host_side])?;
    pod.ip(&["link", "set", "lo", "up"])?;
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
    pod.ip(&["route", "add", "default", "via", &gateway])?;
    let host_route = format!("{ipv6}/128");
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{gateway_v6}/128"),
        "dev",
        host_side,
        "nodad",
    ])?;
    node.ip(&["-6", "route", "add", &host_route, "dev", host_side])?;
    pod.ip(&["-6", "addr", "add", &host_route, "dev", "eth0", "nodad"])?;
    pod.ip(&[
        "-6",
        "route",
        "add",
        &format!("{gateway_v6}/128"),
        "dev",
        "eth0",
    ])?;
    pod.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gateway_v6,
        "dev",
        "eth0",
    ])?;
    Ok(())
}

/// The external link: node `eth0` 198.18.0.1/24 and 2001:db8::1/64 ↔ client `eth0`
/// 198.18.0.2/24 and 2001:db8::2/64, the client's default routes via the node.
fn wire_client(node: &Netns, client: &Netns) -> Result<()> {
    let prefix = addr::EXTERNAL_PREFIX_LEN;
    node.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        client.name(),
    ])?;
    node.ip(&[
        "addr",
        "add",
        &format!("{}/{prefix}", addr::NODE_IP),
        "dev",
        "eth0",
    ])?;
    node.ip(&["link", "set", "eth0", "up"])?;
    client.ip(&["link", "set", "lo", "up"])?;
    client.ip(&[
        "addr",
        "add",
        &format!("{}/{prefix}", addr::CLIENT_IP),
        "dev",
        "eth0",
    ])?;
    client.ip(&["link", "set", "eth0", "up"])?;
    client.like_a_wire("eth0")?;
    client.ip(&["route", "add", "default", "via", &addr::NODE_IP.to_string()])?;
    let prefix_v6 = addr::EXTERNAL_PREFIX_LEN_V6;
    for (ns, ip) in [(node, addr::NODE_IPV6), (client, addr::CLIENT_IPV6)] {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip}/{prefix_v6}"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    client.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        &addr::NODE_IPV6.to_string(),
    ])?;
    Ok(())
}
