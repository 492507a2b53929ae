//! A network-namespace lab for ebpf-proxy: a `node` namespace that runs the daemon, `pod-i`
//! namespaces behind veths with echo servers that answer with their own name, and a
//! `client` namespace outside the node. Tests send real traffic through the real kernel.
//!
//! # Addresses
//!
//! Everything lives in 198.18.0.0/15, the benchmarking range; nothing touches the root
//! namespace. This table is the one place the lab's addressing is written down
//! (constants in [`addr`]).
//!
//! | what | namespace | interface | address |
//! |---|---|---|---|
//! | node, external side | `node` | `eth0` | 198.18.0.1/24 ([`addr::NODE_IP`]) |
//! | outside client | `client` | `eth0` | 198.18.0.2/24, default via 198.18.0.1 ([`addr::CLIENT_IP`]) |
//! | pods' gateway, on every pod veth | `node` | `lxc<i>` | 198.18.1.1/32 ([`addr::POD_GATEWAY`]) |
//! | pod i (i = 1, 2, …) | `pod-i` | `eth0` | 198.18.1.(10+i)/32, default via 198.18.1.1 ([`addr::pod_ip`]) |
//! | service VIPs | — | — | 198.19.0.0/16 ([`addr::CLUSTER_IP`] = 198.19.0.10, [`addr::NODE_PORT_SERVICE_IP`] = 198.19.0.11) |
//! | NodePorts | `node` | `eth0` | 198.18.0.1:[`addr::NODE_PORT_TCP`] (30080), :[`addr::NODE_PORT_UDP`] (30053) |
//! | external IP, load-balancer IP | — | — | [`addr::EXTERNAL_IP`] = 198.18.9.1, [`addr::LOAD_BALANCER_IP`] = 198.18.8.1, via the client's default route |
//!
//! The node routes each pod's /32 to its `lxc<i>` and forwards (ip_forward=1 inside the
//! node namespace only). Every pod runs a TCP echo server on [`addr::ECHO_TCP_PORT`] (8080)
//! and a UDP one on [`addr::ECHO_UDP_PORT`] (5353); both ports are configurable per lab.
//! `deploy/examples/` uses exactly these addresses.
//!
//! The multi-node lab ([`Cluster`]) has its own namespaces and addresses, disjoint from the
//! table above: nodes and an outside client on one L2 fabric (a bridge in a namespace of
//! its own), each node with a pod CIDR routed host-gw style via its fabric address.
//!
//! | what | namespace | interface | address |
//! |---|---|---|---|
//! | fabric bridge | `fabric` | `fabric0`, ports `node<k>`, `client` | none |
//! | node k (k = 1..=3), Kubernetes name `lab-node-<k>` | `node-<k>` | `eth0` | 198.18.16.k/24 ([`addr::fabric_node_ip`]); routes to the other nodes' pod CIDRs via their 198.18.16.j |
//! | outside client | `client` | `eth0` | 198.18.16.100/24 ([`addr::FABRIC_CLIENT_IP`]), no default route |
//! | node k's pod CIDR and pods' gateway | `node-<k>` | `lxc<i>` | 198.18.(16+k).0/24, gateway 198.18.(16+k).1/32 ([`addr::node_pod_gateway`]) |
//! | pod i of node k | `n<k>-pod-<i>` | `eth0` | 198.18.(16+k).(10+i)/32 ([`addr::node_pod_ip`]) |
//!
//! Its pods run the echo servers and a peer reporter on [`addr::PEER_REPORT_PORT`] (8081)
//! that answers with the source address it sees. Service VIPs are 198.19.0.0/16 as above.
//!
//! # Safety of the host
//!
//! Namespaces are named `epx<pid>-<counter>-<role>`, so labs run in parallel; veth pairs are
//! created directly inside the lab's namespaces, so nothing appears in the root namespace,
//! not even briefly. Sockets are made by threads that first `setns` into a lab namespace
//! (see [`Netns::run`]). Namespaces, the daemon, its private bpffs mount and temp
//! directories are released on drop, also when a test panics.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use proxy_lab::{Lab, Service, addr};
//! let lab = Lab::builder().pods(4).build()?;
//! let echo = Service::cluster_ip("echo", addr::CLUSTER_IP).tcp(80, addr::ECHO_TCP_PORT);
//! let daemon = lab.daemon().manifest(echo.manifest(&lab.pods()[..3])).start()?;
//! daemon.wait_synced(std::time::Duration::from_secs(30))?;
//! let reply = lab.pod(4).ns.tcp_request(addr::CLUSTER_IP, 80)?;
//! println!("served by {}", reply.body);
//! # Ok(())
//! # }
//! ```

pub mod addr;
mod bpffs;
mod cgroup;
pub mod churn;
mod client;
mod cluster;
pub mod counters;
mod daemon;
mod echo;
pub mod fake_apiserver;
pub mod hostile;
mod lab;
mod large;
pub mod load;
mod manifest;
mod netns;
mod previous_release;
mod rng;
mod scratch;
mod tally;
mod xdp_pass;

pub use bpffs::PrivateBpffs;
pub use cgroup::Cgroup;
pub use client::{REQUEST_TIMEOUT, Reply, TcpSession, UdpFlow, is_timeout, udp_exchange};
pub use cluster::{Cluster, ClusterBuilder, ClusterNode};
pub use daemon::{Daemon, DaemonBuilder, daemon_binary, kubeconfig_for};
pub use lab::{Lab, LabBuilder, LatePod, NODE_NAME, Pod};
pub use large::{LargeServers, Received};
pub use manifest::{Endpoint, Manifest, Protocol, Service};
pub use netns::{Netns, Placement};
pub use previous_release::{PREVIOUS_RELEASE, previous_release_binary};
pub use rng::Rng;
pub use tally::{CHI_SQUARE_CRITICAL_P001, Tally};

/// Why the lab cannot run here, if it cannot: it needs root, network namespaces and `ip`.
pub fn lab_unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if let Err(error) = netns::probe_unshare() {
        return Some(format!("cannot create a network namespace: {error}"));
    }
    match std::process::Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => None,
        _ => Some("iproute2's `ip` is not installed".into()),
    }
}

/// True when running under CI (`CI=true`), where a skipped lab test would hide a broken
/// machine and must fail instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Returns `Ok(())` early from the calling test when the lab cannot run (not root, no
/// network namespaces), printing why; under `CI=true` it panics instead.
#[macro_export]
macro_rules! require_lab {
    () => {
        if let Some(reason) = $crate::lab_unavailable_reason() {
            if $crate::in_ci() {
                panic!("the netns lab cannot run under CI=true: {reason}");
            }
            eprintln!("skipped: needs root ({reason})");
            return Ok(());
        }
    };
}
