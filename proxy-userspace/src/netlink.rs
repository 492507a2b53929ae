//! The node's interfaces and addresses, read and followed with rtnetlink.
//!
//! Pod interfaces come and go with pods; node addresses can change (DHCP, a second NIC).
//! Rather than interpreting individual events, every link or address event triggers a
//! fresh dump, and [`select_devices`] decides from the whole picture which interfaces get
//! the program. That keeps the daemon correct even when events are lost (ENOBUFS).

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc::UnboundedReceiver;

/// One network interface of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub index: u32,
    pub name: String,
    pub loopback: bool,
    /// Its addresses of both families, IPv6 link-local ones left out (see
    /// [`is_node_address`]).
    pub addresses: Vec<IpAddr>,
}

/// Which interfaces get the program.
#[derive(Clone, Debug)]
pub struct DevicePolicy {
    /// `--devices`: the external devices by name. `None`: every interface holding an
    /// address of either family (IPv6 link-local aside), except loopback and pod
    /// interfaces.
    pub external: Option<Vec<String>>,
    /// `--pod-devices`: glob patterns for the host side of pod veths.
    pub pod_patterns: Vec<glob::Pattern>,
}

impl DevicePolicy {
    fn is_pod_device(&self, name: &str) -> bool {
        self.pod_patterns
            .iter()
            .any(|pattern| pattern.matches(name))
    }
}

/// An interface to attach to, and why.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device {
    pub index: u32,
    pub name: String,
    pub role: DeviceRole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceRole {
    /// Traffic from outside the node: NodePort, ExternalIP, LoadBalancer IP.
    External,
    /// The host side of a pod's veth: pod → Service, and backend replies.
    Pod,
}

/// Decides which interfaces get the program.
pub fn select_devices(interfaces: &[Interface], policy: &DevicePolicy) -> Vec<Device> {
    let mut devices: Vec<Device> = interfaces
        .iter()
        .filter_map(|interface| {
            let role = if policy.is_pod_device(&interface.name) {
                DeviceRole::Pod
            } else if is_external(interface, policy) {
                DeviceRole::External
            } else {
                return None;
            };
            Some(Device {
                index: interface.index,
                name: interface.name.clone(),
                role,
            })
        })
        .collect();
    devices.sort();
    devices
}

fn is_external(interface: &Interface, policy: &DevicePolicy) -> bool {
    match &policy.external {
        Some(names) => names.contains(&interface.name),
        None => !interface.loopback && !interface.addresses.is_empty(),
    }
}

/// The node's addresses of both families, loopback included, as kube-proxy lists them for
/// `--nodeport-addresses` (the planner decides which serve NodePorts and health checks).
/// Sorted, IPv4 first.
pub fn node_addresses(interfaces: &[Interface]) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = interfaces
        .iter()
        .flat_map(|interface| interface.addresses.iter().copied())
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

/// Whether an interface address counts as the node's: every address but IPv6 link-local
/// ones (`fe80::/10`), which every pod veth's host side carries — a NodePort on each would
/// multiply the frontends by the pods, and a link-local address is no way into the node
/// from another network anyway.
fn is_node_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(_) => true,
        IpAddr::V6(addr) => !is_link_local(addr),
    }
}

fn is_link_local(addr: &Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// A netlink connection that both answers dumps and reports link and address changes.
pub struct Netlink {
    handle: Handle,
    /// Receives one item per link or address event.
    pub events: UnboundedReceiver<()>,
}

impl Netlink {
    /// Opens the connection in the calling thread's network namespace. Must be called
    /// inside a tokio runtime.
    pub fn connect() -> Result<Self> {
        let (connection, handle, mut messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .context("opening an rtnetlink socket")?;
        tokio::spawn(connection);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            use futures::StreamExt;
            while messages.next().await.is_some() {
                if events_tx.send(()).is_err() {
                    break;
                }
            }
        });
        Ok(Self { handle, events })
    }

    /// Dumps all interfaces with their addresses.
    pub async fn interfaces(&self) -> Result<Vec<Interface>> {
        let mut interfaces = Vec::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.context("dumping links")? {
            let name = link
                .attributes
                .iter()
                .find_map(|attribute| match attribute {
                    LinkAttribute::IfName(name) => Some(name.clone()),
                    _ => None,
                });
            if let Some(name) = name {
                interfaces.push(Interface {
                    index: link.header.index,
                    name,
                    loopback: link.header.flags.contains(LinkFlags::Loopback),
                    addresses: Vec::new(),
                });
            }
        }
        let mut addresses = self.handle.address().get().execute();
        while let Some(address) = addresses.try_next().await.context("dumping addresses")? {
            let Some(interface) = interfaces
                .iter_mut()
                .find(|interface| interface.index == address.header.index)
            else {
                continue;
            };
            for attribute in &address.attributes {
                let (AddressAttribute::Local(addr) | AddressAttribute::Address(addr)) = attribute
                else {
                    continue;
                };
                if is_node_address(addr) && !interface.addresses.contains(addr) {
                    interface.addresses.push(*addr);
                }
            }
        }
        Ok(interfaces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interface(index: u32, name: &str, addrs: &[[u8; 4]]) -> Interface {
        Interface {
            index,
            name: name.to_string(),
            loopback: name == "lo",
            addresses: addrs.iter().map(|a| IpAddr::from(*a)).collect(),
        }
    }

    fn policy(external: Option<&[&str]>) -> DevicePolicy {
        DevicePolicy {
            external: external.map(|names| names.iter().map(|n| n.to_string()).collect()),
            pod_patterns: ["lxc*", "veth*", "cali*"]
                .iter()
                .map(|p| glob::Pattern::new(p).unwrap())
                .collect(),
        }
    }

    fn node() -> Vec<Interface> {
        vec![
            interface(1, "lo", &[[127, 0, 0, 1]]),
            interface(2, "eth0", &[[198, 18, 0, 1]]),
            interface(3, "eth1", &[]),
            interface(4, "lxc0", &[[198, 18, 1, 1]]),
            interface(5, "cali12ab", &[]),
            interface(6, "vethfoo", &[]),
            interface(7, "docker0", &[[198, 18, 9, 1]]),
        ]
    }

    fn names(devices: &[Device], role: DeviceRole) -> Vec<&str> {
        devices
            .iter()
            .filter(|d| d.role == role)
            .map(|d| d.name.as_str())
            .collect()
    }

    #[test]
    fn default_external_devices_are_those_with_addresses() {
        let devices = select_devices(&node(), &policy(None));
        assert_eq!(names(&devices, DeviceRole::External), ["eth0", "docker0"]);
        assert_eq!(
            names(&devices, DeviceRole::Pod),
            ["lxc0", "cali12ab", "vethfoo"]
        );
    }

    #[test]
    fn explicit_devices_replace_the_default() {
        let devices = select_devices(&node(), &policy(Some(&["eth1"])));
        assert_eq!(names(&devices, DeviceRole::External), ["eth1"]);
    }

    #[test]
    fn pod_pattern_wins_over_explicit_device() {
        let devices = select_devices(&node(), &policy(Some(&["lxc0"])));
        assert_eq!(names(&devices, DeviceRole::External), Vec::<&str>::new());
        assert!(names(&devices, DeviceRole::Pod).contains(&"lxc0"));
    }

    #[test]
    fn node_addresses_include_loopback_and_are_deduplicated() {
        let mut interfaces = node();
        interfaces.push(interface(8, "lxc1", &[[198, 18, 1, 1]]));
        let addresses = node_addresses(&interfaces);
        assert_eq!(
            addresses,
            [
                [127, 0, 0, 1],
                [198, 18, 0, 1],
                [198, 18, 1, 1],
                [198, 18, 9, 1]
            ]
            .map(IpAddr::from)
        );
    }

    #[test]
    fn ipv6_addresses_count_link_local_ones_do_not() {
        let addrs = [
            "2001:db8::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "::1",
            "198.18.0.1",
        ];
        let kept: Vec<&str> = (addrs.iter().copied())
            .filter(|addr| is_node_address(&addr.parse().unwrap()))
            .collect();
        assert_eq!(kept, ["2001:db8::1", "fec0::1", "::1", "198.18.0.1"]);
    }
}
