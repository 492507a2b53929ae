//! `--nodeport-addresses`, as kube-proxy reads it (`cmd/kube-proxy/app/server.go`,
//! `pkg/proxy/util/nodeport_addresses.go`).
//!
//! The flag takes CIDRs of both families, or the single keyword `primary`. Each family gets
//! only its own CIDRs, and a family without any opens NodePorts on every address of that
//! family — so `--nodeport-addresses 2001:db8::/64` leaves IPv4 unrestricted. `primary`
//! stands for the Node's primary address of each family (`/32`, `/128`): its first
//! InternalIP, else ExternalIP, of that family; while that is unknown (no Node object, as in
//! standalone mode, or no such address) the family is unrestricted, as in kube-proxy.
//! The planner applies each family's CIDRs to that family's node addresses
//! ([`crate::plan::NodeFacts`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::model::address::parse_cidr_sloppy;

/// kube-proxy's keyword for the Node's primary addresses.
pub const PRIMARY: &str = "primary";

/// The parsed flag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// CIDRs, split by family; both empty (the flag unset) means every node address.
    Cidrs {
        ipv4: Vec<Ipv4Net>,
        ipv6: Vec<Ipv6Net>,
    },
    /// `primary`: the Node's primary address of each family.
    Primary,
    /// Unset: every node address.
    #[default]
    All,
}

impl NodePortAddresses {
    /// Parses the flag's values with kube-proxy's validation: `primary` alone, or CIDRs.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let values: Vec<&str> = values.iter().map(|value| value.as_ref().trim()).collect();
        match values.as_slice() {
            [] => return Ok(NodePortAddresses::All),
            [PRIMARY] => return Ok(NodePortAddresses::Primary),
            _ => {}
        }
        let (mut ipv4, mut ipv6) = (Vec::new(), Vec::new());
        for value in values {
            if value == PRIMARY {
                return Err(format!("{PRIMARY:?} cannot be combined with CIDRs"));
            }
            match parse_cidr_sloppy(value) {
                Some(IpNet::V4(cidr)) => ipv4.push(cidr),
                Some(IpNet::V6(cidr)) => ipv6.push(cidr),
                None => {
                    return Err(format!(
                        "{value:?} is not a CIDR (like 198.18.0.0/24 or 2001:db8::/64) nor \
                         {PRIMARY:?}"
                    ));
                }
            }
        }
        Ok(NodePortAddresses::Cidrs { ipv4, ipv6 })
    }

    /// The CIDRs NodePorts open on, both families, given the Node's primary addresses if
    /// known (IPv4 first). A family without any: every address of the node of that family.
    pub fn cidrs(
        &self,
        primary_ipv4: Option<Ipv4Addr>,
        primary_ipv6: Option<Ipv6Addr>,
    ) -> Vec<IpNet> {
        match self {
            NodePortAddresses::Cidrs { ipv4, ipv6 } => (ipv4.iter().copied().map(IpNet::V4))
                .chain(ipv6.iter().copied().map(IpNet::V6))
                .collect(),
            // kube-proxy skips a loopback node IP.
            NodePortAddresses::Primary => {
                [primary_ipv4.map(IpAddr::V4), primary_ipv6.map(IpAddr::V6)]
                    .into_iter()
                    .flatten()
                    .filter(|address| !address.is_loopback())
                    .map(IpNet::from)
                    .collect()
            }
            NodePortAddresses::All => Vec::new(),
        }
    }
}

impl fmt::Display for NodePortAddresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodePortAddresses::Cidrs { ipv4, ipv6 } => {
                let cidrs: Vec<String> = ipv4
                    .iter()
                    .map(ToString::to_string)
                    .chain(ipv6.iter().map(ToString::to_string))
                    .collect();
                f.write_str(&cidrs.join(","))
            }
            NodePortAddresses::Primary => f.write_str(PRIMARY),
            NodePortAddresses::All => f.write_str("(all node addresses)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    #[test]
    fn the_flag_parses_like_kube_proxys_validation() {
        // (values, parsed or the start of the error)
        let ok: [(&[&str], NodePortAddresses); 6] = [
            (&[], NodePortAddresses::All),
            (&["primary"], NodePortAddresses::Primary),
            (
                &["198.18.0.0/24", "2001:db8::/64", "127.0.0.0/8"],
                NodePortAddresses::Cidrs {
                    ipv4: vec![v4("198.18.0.0/24"), v4("127.0.0.0/8")],
                    ipv6: vec!["2001:db8::/64".parse().unwrap()],
                },
            ),
            (
                &["::/0"],
                NodePortAddresses::Cidrs {
                    ipv4: vec![],
                    ipv6: vec!["::/0".parse().unwrap()],
                },
            ),
            (
                &["0.0.0.0/0"],
                NodePortAddresses::Cidrs {
                    ipv4: vec![v4("0.0.0.0/0")],
                    ipv6: vec![],
                },
            ),
            // Read as kube-proxy reads them (ParseCIDRSloppy): leading zeros are decimal.
            (
                &["198.018.000.001/024"],
                NodePortAddresses::Cidrs {
                    ipv4: vec![v4("198.18.0.0/24")],
                    ipv6: vec![],
                },
            ),
        ];
        for (values, expected) in ok {
            assert_eq!(NodePortAddresses::parse(values), Ok(expected), "{values:?}");
        }
        let bad: [(&[&str], &str); 4] = [
            (
                &["primary", "198.18.0.0/24"],
                "\"primary\" cannot be combined",
            ),
            (
                &["198.18.0.0/24", "primary"],
                "\"primary\" cannot be combined",
            ),
            (&["198.18.0.1"], "\"198.18.0.1\" is not a CIDR"),
            (&["foo"], "\"foo\" is not a CIDR"),
        ];
        for (values, error) in bad {
            let got = NodePortAddresses::parse(values).unwrap_err();
            assert!(got.starts_with(error), "{values:?}: {got}");
        }
    }

    /// Both families' CIDRs are handed on; the planner filters each family with its own
    /// (`NewNodePortAddresses`; see `plan` for the per-family filtering).
    #[test]
    fn both_families_are_handed_on() {
        let net = |text: &str| -> IpNet { text.parse().unwrap() };
        let both = NodePortAddresses::parse(&["2001:db8::/64", "198.18.0.0/24"]).unwrap();
        assert_eq!(
            both.cidrs(None, None),
            [net("198.18.0.0/24"), net("2001:db8::/64")]
        );
        assert_eq!(NodePortAddresses::All.cidrs(None, None), []);
    }

    /// `primary` is the Node's address of each family as a /32 or /128 while it is known
    /// and not loopback (kube-proxy skips a loopback node IP), else every address.
    #[test]
    fn primary_is_the_nodes_address_while_known() {
        let primary = NodePortAddresses::Primary;
        let node_ip = Ipv4Addr::new(198, 18, 0, 1);
        let node_ipv6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let net = |text: &str| -> IpNet { text.parse().unwrap() };
        assert_eq!(primary.cidrs(Some(node_ip), None), [net("198.18.0.1/32")]);
        assert_eq!(
            primary.cidrs(Some(node_ip), Some(node_ipv6)),
            [net("198.18.0.1/32"), net("2001:db8::1/128")]
        );
        assert_eq!(
            primary.cidrs(None, Some(node_ipv6)),
            [net("2001:db8::1/128")]
        );
        assert_eq!(primary.cidrs(None, None), []);
        assert_eq!(
            primary.cidrs(Some(Ipv4Addr::LOCALHOST), Some(Ipv6Addr::LOCALHOST)),
            []
        );
    }
}
