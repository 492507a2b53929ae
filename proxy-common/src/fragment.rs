//! IP fragments and ICMP errors: what the datapath keeps about a fragmented datagram, and
//! the ICMP and ICMPv6 numbers it reads and writes.
//!
//! Only a datagram's first fragment carries its TCP/UDP header, so only it can be matched
//! to a flow. The datapath decides it like any packet and records that decision under the
//! datagram's identity (RFC 791: source, destination, protocol, identification); the later
//! fragments look it up and get the same treatment — the IPv4 addresses rewritten the same
//! way (the L4 checksum, which covers the whole datagram, sits in the first fragment and was
//! fixed there), passed, or dropped. Cilium keeps the first fragment's ports under the
//! same key (`ipv4_frag_datagrams`). IPv6 keys by its fragment header's 32-bit
//! identification (RFC 8200 4.5: source, destination, identification) in a map of its own,
//! FRAGMENTS6 (Cilium's `ipv6_frag_datagrams`), with the same values over its addresses.

use crate::{Address, Tuple};

/// Key of the FRAGMENTS (IPv6: FRAGMENTS6) map: one datagram, as its fragments carry it
/// (wire order). 12 bytes for IPv4, 40 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FragmentKey<A: Address = u32> {
    pub src_addr: A,
    pub dst_addr: A,
    /// The IPv4 identification field; IPv6: its fragment header's identification.
    pub id: A::FragmentId,
    pub proto: u8,
    pub _pad: A::FragmentPad,
}

/// What the later fragments of a datagram do: [`FragmentValue::verdict`].
pub mod fragment_verdict {
    /// Rewrite the addresses to [`FragmentValue::to`] (unchanged when the first fragment
    /// passed untouched) and go on, routed by the program if `routes_itself`.
    pub const FORWARD: u8 = 0;
    /// The first fragment was dropped (or answered with an ICMP error instead): so are
    /// the others, as the kernel drops a datagram it could not deliver whole.
    pub const DROP: u8 = 1;
}

/// Value of the FRAGMENTS (FRAGMENTS6) map: what happened to the datagram's first
/// fragment. 24 bytes for IPv4, 48 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentValue<A: Address = u32> {
    /// The addresses and ports the first fragment left with (its own when untouched).
    pub to: Tuple<A>,
    /// A [`fragment_verdict`] constant.
    pub verdict: u8,
    /// 1 when the program routes the datagram itself (its source became a node address,
    /// see `ct_flags::ROUTES_ITSELF`).
    pub routes_itself: u8,
    pub _pad: [u8; 2],
    /// When the first fragment passed (coarse CLOCK_MONOTONIC): a record older than
    /// [`FRAGMENT_TIMEOUT_NS`] is ignored.
    pub seen_ns: u64,
}

impl<A: Address> FragmentValue<A> {
    /// Whether the record still stands at `now_ns`: within the time a receiver keeps
    /// fragments for reassembly, so a later datagram reusing the identification never
    /// meets it.
    pub const fn is_fresh(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.seen_ns) <= FRAGMENT_TIMEOUT_NS
    }
}

/// How long a datagram's record stands: the kernel's reassembly timeout
/// (`net.ipv4.ipfrag_time`, 30 s), after which a receiver has given up on the datagram too.
pub const FRAGMENT_TIMEOUT_NS: u64 = 30_000_000_000;

/// Packets of at most this many bytes (IPv4 total length) are never checked against the
/// egress MTU: Linux never lowers a path MTU below it (`net.ipv4.route.min_pmtu`, 552), so
/// a narrower link breaks Path-MTU discovery with or without the check, and the small
/// packets that make up most traffic skip a FIB lookup.
pub const MIN_CHECKED_MTU: u16 = 552;

/// ICMP types and codes (RFC 792) the datapath translates or sends.
pub mod icmp {
    pub const PROTOCOL: u8 = 1;
    pub const DEST_UNREACH: u8 = 3;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// Codes of [`DEST_UNREACH`].
    pub const NET_UNREACH: u8 = 0;
    pub const HOST_UNREACH: u8 = 1;
    pub const PORT_UNREACH: u8 = 3;
    pub const FRAG_NEEDED: u8 = 4;
    /// Code of [`TIME_EXCEEDED`]: the TTL ran out in transit.
    pub const TTL_EXCEEDED: u8 = 0;

    /// Whether an ICMP message of `icmp_type` is an error quoting the packet it is about,
    /// which the datapath translates when that packet belongs to a tracked flow.
    pub const fn is_error(icmp_type: u8) -> bool {
        matches!(icmp_type, DEST_UNREACH | TIME_EXCEEDED | PARAMETER_PROBLEM)
    }
}

/// ICMPv6 types and codes (RFC 4443) the datapath translates or sends.
pub mod icmp6 {
    /// ICMPv6's next-header value.
    pub const PROTOCOL: u8 = 58;
    pub const DEST_UNREACH: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAMETER_PROBLEM: u8 = 4;
    /// Codes of [`DEST_UNREACH`].
    pub const NO_ROUTE: u8 = 0;
    pub const ADDR_UNREACH: u8 = 3;
    pub const PORT_UNREACH: u8 = 4;
    /// Code of [`TIME_EXCEEDED`]: the hop limit ran out in transit.
    pub const HOP_LIMIT_EXCEEDED: u8 = 0;

    /// Whether an ICMPv6 message of `icmp_type` is an error quoting the packet it is about
    /// (types below 128; RFC 4443 2.1), which the datapath translates when that packet
    /// belongs to a tracked flow.
    pub const fn is_error(icmp_type: u8) -> bool {
        matches!(
            icmp_type,
            DEST_UNREACH | PACKET_TOO_BIG | TIME_EXCEEDED | PARAMETER_PROBLEM
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_stand_for_the_reassembly_timeout() {
        let value: FragmentValue = FragmentValue {
            seen_ns: 5_000_000_000,
            ..FragmentValue::default()
        };
        assert!(value.is_fresh(5_000_000_000));
        assert!(value.is_fresh(35_000_000_000));
        assert!(!value.is_fresh(35_000_000_001));
        // A clock read before the record (another CPU's coarse clock) is fresh.
        assert!(value.is_fresh(4_000_000_000));
    }

    #[test]
    fn errors_are_the_types_that_quote_a_packet() {
        for error in [
            icmp::DEST_UNREACH,
            icmp::TIME_EXCEEDED,
            icmp::PARAMETER_PROBLEM,
        ] {
            assert!(icmp::is_error(error));
        }
        // Echo request and reply, redirect: not errors the datapath translates.
        for other in [0, 8, 5] {
            assert!(!icmp::is_error(other));
        }
        for error in [
            icmp6::DEST_UNREACH,
            icmp6::PACKET_TOO_BIG,
            icmp6::TIME_EXCEEDED,
            icmp6::PARAMETER_PROBLEM,
        ] {
            assert!(icmp6::is_error(error));
        }
        // Echo request and reply, neighbour solicitation: informational.
        for other in [128, 129, 135] {
            assert!(!icmp6::is_error(other));
        }
    }
}
