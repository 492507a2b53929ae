//! The lab's addresses (the table in the crate docs). `deploy/examples/` uses the same ones.

use std::net::Ipv4Addr;

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
