//! Addresses and CIDRs as Kubernetes reads them from objects and flags: the API server and
//! kube-proxy parse with `netutils.ParseIPSloppy` / `ParseCIDRSloppy` (Go's parser before
//! 1.17), which reads IPv4 fields with leading zeros as decimal — `172.30.0.041` is
//! 172.30.0.41, `010.180.00.001` is 10.180.0.1, `/025` is a /25 — and treats an IPv4-mapped
//! IPv6 address (`::ffff:1.2.3.4`) as the IPv4 address it maps. Objects written that way
//! were valid until Kubernetes 1.33 and still exist, so every address or CIDR read from an
//! object (clusterIPs, externalIPs, load-balancer ingress, loadBalancerSourceRanges,
//! endpoint addresses, Node addresses), from `--nodeport-addresses`, and by the manifests
//! source's validation goes through this one pair of functions.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An address family, as Kubernetes names them (`ipFamilies`, an EndpointSlice's
/// `addressType`). kube-proxy runs one proxier per family; the planner keeps the families
/// apart the same way (a frontend gets only backends of its own family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn of_net(net: &IpNet) -> Self {
        Family::of(net.addr())
    }

    /// `IPv4` / `IPv6`, as `ipFamilies` and `addressType` spell them; `None` for anything
    /// else (`FQDN`).
    pub fn from_api(name: &str) -> Option<Self> {
        match name {
            "IPv4" => Some(Family::Ipv4),
            "IPv6" => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// An address as `ParseIPSloppy` reads it: IPv4 fields in decimal with any leading zeros,
/// an IPv4-mapped IPv6 address as IPv4. `None` for anything else (no surrounding spaces).
pub fn parse_ip_sloppy(text: &str) -> Option<IpAddr> {
    if !text.contains(':') {
        return parse_ipv4_fields(text).map(IpAddr::V4);
    }
    let ipv6 = parse_ipv6_sloppy(text)?;
    Some(match ipv6.to_ipv4_mapped() {
        Some(ipv4) => IpAddr::V4(ipv4),
        None => IpAddr::V6(ipv6),
    })
}

/// A CIDR as `ParseCIDRSloppy` reads it (the address as [`parse_ip_sloppy`] does, the
/// prefix length in decimal with any leading zeros), truncated to its network as Go's
/// `ParseCIDR` returns it. An IPv6-written CIDR stays IPv6, even an IPv4-mapped one.
pub fn parse_cidr_sloppy(text: &str) -> Option<IpNet> {
    let (addr, prefix_len) = text.split_once('/')?;
    let prefix_len = decimal(prefix_len)?;
    if addr.contains(':') {
        let addr = parse_ipv6_sloppy(addr)?;
        let prefix_len = u8::try_from(prefix_len).ok()?;
        Some(IpNet::V6(Ipv6Net::new(addr, prefix_len).ok()?.trunc()))
    } else {
        let addr = parse_ipv4_fields(addr)?;
        let prefix_len = u8::try_from(prefix_len).ok()?;
        Some(IpNet::V4(Ipv4Net::new(addr, prefix_len).ok()?.trunc()))
    }
}

/// `a.b.c.d`, each field decimal digits worth at most 255, leading zeros allowed.
fn parse_ipv4_fields(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut fields = text.split('.');
    for octet in &mut octets {
        *octet = u8::try_from(decimal(fields.next()?)?).ok()?;
    }
    if fields.next().is_some() {
        return None;
    }
    Some(Ipv4Addr::from(octets))
}

/// An IPv6 address whose embedded IPv4 tail (`::ffff:010.0.0.1`) may have leading zeros.
fn parse_ipv6_sloppy(text: &str) -> Option<Ipv6Addr> {
    match text.rsplit_once(':') {
        Some((head, tail)) if tail.contains('.') => {
            let tail = parse_ipv4_fields(tail)?;
            format!("{head}:{tail}").parse().ok()
        }
        _ => text.parse().ok(),
    }
}

/// One or more ASCII digits, read in decimal, any number of leading zeros (Go's `dtoi`,
/// which gives up once the value reaches 2^24 - 1).
fn decimal(text: &str) -> Option<u32> {
    const GIVE_UP: u32 = 0x00FF_FFFF;
    if text.is_empty() {
        return None;
    }
    text.bytes().try_fold(0u32, |value, byte| {
        let digit = char::from(byte).to_digit(10)?;
        Some(value * 10 + digit).filter(|&value| value < GIVE_UP)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_kube_proxy_parses_them() {
        // (text, parsed)
        let cases: [(&str, Option<&str>); 21] = [
            ("172.30.0.41", Some("172.30.0.41")),
            ("172.30.0.041", Some("172.30.0.41")),
            ("10.180.00.001", Some("10.180.0.1")),
            ("010.000.000.010", Some("10.0.0.10")),
            ("0.0.0.0", Some("0.0.0.0")),
            ("1.2.3.00000255", Some("1.2.3.255")),
            ("1.2.3.000000000000000000001", Some("1.2.3.1")),
            ("1.2.3.256", None),
            ("1.2.3.0256", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1.2..4", None),
            ("1.2.3.-4", None),
            ("1.2.3.+4", None),
            (" 1.2.3.4", None),
            ("1.2.3.4 ", None),
            ("0x1.2.3.4", None),
            ("fd00::10", Some("fd00::10")),
            ("::ffff:1.2.3.4", Some("1.2.3.4")),
            ("::ffff:010.002.003.004", Some("10.2.3.4")),
            ("fd00::1%eth0", None),
        ];
        for (text, expected) in cases {
            let parsed = parse_ip_sloppy(text).map(|addr| addr.to_string());
            assert_eq!(parsed.as_deref(), expected, "{text:?}");
        }
    }

    #[test]
    fn cidrs_parse_as_kube_proxy_parses_them() {
        // (text, parsed: the network)
        let cases: [(&str, Option<&str>); 13] = [
            ("203.0.113.0/25", Some("203.0.113.0/25")),
            ("203.0.113.000/025", Some("203.0.113.0/25")),
            ("010.1.2.3/8", Some("10.0.0.0/8")),
            ("198.18.0.1/32", Some("198.18.0.1/32")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("0.0.0.0/00", Some("0.0.0.0/0")),
            ("1.2.3.4/33", None),
            ("1.2.3.4/", None),
            ("1.2.3.4", None),
            ("1.2.3.4/-1", None),
            ("2001:db8::1/64", Some("2001:db8::/64")),
            ("2001:db8::/0129", None),
            ("::ffff:1.2.3.0/120", Some("::ffff:1.2.3.0/120")),
        ];
        for (text, expected) in cases {
            let parsed = parse_cidr_sloppy(text).map(|net| net.to_string());
            assert_eq!(parsed.as_deref(), expected, "{text:?}");
        }
    }
}
