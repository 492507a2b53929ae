//! The lab's addresses (the table in the crate docs). `deploy/examples/` uses the same ones.
//!
//! The lab is dual-stack: beside each IPv4 address, an IPv6 one from the documentation
//! prefix 2001:db8::/32 whose last group reads like the IPv4 address's last octet
//! (198.18.1.11 ↔ 2001:db8:1::11), configured inside lab namespaces only.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The node's external address (`eth0` in the node namespace); NodePorts answer here.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Prefix length of the external link between node and client.
pub const EXTERNAL_PREFIX_LEN: u8 = 24;
/// The outside client (`eth0` in the client namespace).
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The pods' gateway: the node side of every pod veth carries it as a /32.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Highest pod number: pod addresses are 198.18.1.(10+i).
pub const MAX_PODS: usize = 200;

/// Address of pod `i` (numbered from 1): 198.18.1.(10+i).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_PODS).contains(&i),
        "pods are numbered 1..={MAX_PODS}, got {i}"
    );
    Ipv4Addr::new(198, 18, 1, 10 + i as u8)
}

/// The node's external IPv6 address (`eth0`, beside [`NODE_IP`]).
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Prefix length of the external link's IPv6 network.
pub const EXTERNAL_PREFIX_LEN_V6: u8 = 64;
/// The outside client's IPv6 address (beside [`CLIENT_IP`]).
pub const CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// The pods' IPv6 gateway, a /128 on every pod veth's node side (beside [`POD_GATEWAY`]).
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// IPv6 address of pod `i`: 2001:db8:1::(10+i), the last group written like the last
/// octet of [`pod_ip`] (pod-1: 2001:db8:1::11).
pub fn pod_ipv6(i: usize) -> Ipv6Addr {
    let ipv4 = pod_ip(i);
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, reads_like(ipv4.octets()[3]))
}

/// The IPv6 group whose hex digits read like `n`'s decimal ones (11 → 0x11).
fn reads_like(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

/// The IPv6 ClusterIP beside [`CLUSTER_IP`] (IPv6 Service VIPs come from 2001:db8:ff::/64).
pub const CLUSTER_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
/// The IPv6 cluster IP beside [`NODE_PORT_SERVICE_IP`].
pub const NODE_PORT_SERVICE_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x11);
/// An IPv6 external IP, routed to the node by the client's default route (beside
/// [`EXTERNAL_IP`]).
pub const EXTERNAL_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
/// An IPv6 load-balancer ingress IP (beside [`LOAD_BALANCER_IP`]).
pub const LOAD_BALANCER_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 8, 0, 0, 0, 0, 1);

/// The example ClusterIP Service's VIP (service VIPs come from 198.19.0.0/16).
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// The example NodePort Service's cluster IP.
pub const NODE_PORT_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// The example NodePort Service's TCP node port.
pub const NODE_PORT_TCP: u16 = 30080;
/// The example NodePort Service's UDP node port.
pub const NODE_PORT_UDP: u16 = 30053;

/// An external IP (`spec.externalIPs`) of the lab's Services: routed to the node by the
/// client's default route, nowhere configured as an address.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 1);
/// A load balancer's ingress IP (`status.loadBalancer.ingress`), reached like
/// [`EXTERNAL_IP`]: the "load balancer" is the client's route via the node.
pub const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 8, 1);

/// Default port of every pod's TCP echo server.
pub const ECHO_TCP_PORT: u16 = 8080;
/// Default port of every pod's UDP echo server.
pub const ECHO_UDP_PORT: u16 = 5353;

// The multi-node lab ([`crate::Cluster`]): its own namespaces, its own addresses, none of
// them shared with the single-node lab's above.

/// The fabric: one L2 segment (a bridge in its own namespace) joining nodes and client.
pub const FABRIC_PREFIX_LEN: u8 = 24;
/// Highest node number of the multi-node lab.
pub const MAX_CLUSTER_NODES: usize = 3;
/// Highest pod number per node of the multi-node lab.
pub const MAX_PODS_PER_NODE: usize = 100;
/// The outside client on the fabric.
pub const FABRIC_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 16, 100);
/// Port of the multi-node lab's peer reporters: every pod answers each line with the
/// source address its connection arrived from.
pub const PEER_REPORT_PORT: u16 = 8081;

/// Node `k` (numbered from 1) on the fabric: 198.18.16.k.
pub fn fabric_node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16, node_octet(k))
}

/// Node `k`'s pod CIDR, 198.18.(16+k).0/24; its first address is the pods' gateway.
pub fn node_pod_cidr(k: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::new(198, 18, 16 + node_octet(k), 0), 24)
}

/// The pods' gateway on node `k`: 198.18.(16+k).1, on every pod veth of that node.
pub fn node_pod_gateway(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 16 + node_octet(k), 1)
}

/// Node `k` on the fabric's IPv6 network: 2001:db8:10::k/64.
pub fn fabric_node_ipv6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, u16::from(node_octet(k)))
}

/// The outside client on the fabric's IPv6 network.
pub const FABRIC_CLIENT_IPV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x10, 0, 0, 0, 0, 0x100);
/// Prefix length of the fabric's IPv6 network.
pub const FABRIC_PREFIX_LEN_V6: u8 = 64;

/// Node `k`'s IPv6 pod prefix, 2001:db8:1k::/64 (node 1: 2001:db8:11::/64); its `::1` is
/// the pods' gateway.
pub fn node_pod_prefix_v6(k: usize) -> (Ipv6Addr, u8) {
    let group = reads_like(10 + node_octet(k));
    (Ipv6Addr::new(0x2001, 0xdb8, group, 0, 0, 0, 0, 0), 64)
}

/// The pods' IPv6 gateway on node `k`: 2001:db8:1k::1.
pub fn node_pod_gateway_v6(k: usize) -> Ipv6Addr {
    let (prefix, _) = node_pod_prefix_v6(k);
    let [a, b, c, ..] = prefix.segments();
    Ipv6Addr::new(a, b, c, 0, 0, 0, 0, 1)
}

/// IPv6 address of pod `i` of node `k`: 2001:db8:1k::(10+i), like [`node_pod_ip`]'s last
/// octet.
pub fn node_pod_ipv6(k: usize, i: usize) -> Ipv6Addr {
    let (prefix, _) = node_pod_prefix_v6(k);
    let [a, b, c, ..] = prefix.segments();
    Ipv6Addr::new(
        a,
        b,
        c,
        0,
        0,
        0,
        0,
        reads_like(node_pod_ip(k, i).octets()[3]),
    )
}

/// Pod `i` of node `k` (both from 1): 198.18.(16+k).(10+i).
pub fn node_pod_ip(k: usize, i: usize) -> Ipv4Addr {
    assert!(
        (1..=MAX_PODS_PER_NODE).contains(&i),
        "pods are numbered 1..={MAX_PODS_PER_NODE} per node, got {i}"
    );
    Ipv4Addr::new(198, 18, 16 + node_octet(k), 10 + i as u8)
}

fn node_octet(k: usize) -> u8 {
    assert!(
        (1..=MAX_CLUSTER_NODES).contains(&k),
        "nodes are numbered 1..={MAX_CLUSTER_NODES}, got {k}"
    );
    k as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_read_like_their_ipv4_twins() {
        assert_eq!(pod_ipv6(1).to_string(), "2001:db8:1::11");
        assert_eq!(pod_ipv6(200).to_string(), "2001:db8:1::210");
        assert_eq!(node_pod_ipv6(2, 3).to_string(), "2001:db8:12::13");
        assert_eq!(node_pod_gateway_v6(3).to_string(), "2001:db8:13::1");
        assert_eq!(fabric_node_ipv6(2).to_string(), "2001:db8:10::2");
        let pods: std::collections::BTreeSet<_> = (1..=MAX_PODS).map(pod_ipv6).collect();
        assert_eq!(pods.len(), MAX_PODS);
        assert!(!pods.contains(&POD_GATEWAY_V6));
    }
}
