//! Address families: the one abstraction through which the maps, the writer and the CLI
//! handle IPv4 and IPv6 alike. Each family has maps of its own (Cilium's lb4/lb6), so an
//! IPv4 key stays as small as it was: the map types are generic over their [`Address`],
//! IPv4's `u32` by default.

use core::fmt::Debug;
use core::hash::Hash;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{FragmentValue, TraceAddresses, TraceRecord};

/// An IPv6 address as the maps hold it: its 16 bytes in wire order, held as four words
/// read in native order (as IPv4's `u32` is), so the datapath copies and compares it a word
/// at a time (as bytes, each copy would take 16 loads and stores, and the frames of the
/// packet path would not fit the BPF stack). Every map type that holds one has its address
/// at a multiple of 4 and a size a multiple of 4: the alignment adds no padding.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv6(pub [u32; 4]);

impl Ipv6 {
    /// The address of these bytes (wire order).
    pub const fn from_octets(octets: [u8; 16]) -> Self {
        let mut words = [0u32; 4];
        let mut index = 0;
        while index < 4 {
            let at = index * 4;
            words[index] =
                u32::from_ne_bytes([octets[at], octets[at + 1], octets[at + 2], octets[at + 3]]);
            index += 1;
        }
        Self(words)
    }

    /// The IPv4 address of an IPv4-mapped one (`::ffff:a.b.c.d`, RFC 4291 2.5.5.2: what
    /// an IPv6 socket names an IPv4 peer by), as IPv4's `u32`; `None` for any other.
    pub const fn ipv4_mapped(self) -> Option<u32> {
        if self.0[0] == 0 && self.0[1] == 0 && self.0[2] == MAPPED_PREFIX {
            Some(self.0[3])
        } else {
            None
        }
    }

    /// `::ffff:a.b.c.d` for IPv4's `addr` (wire order, as the maps hold it).
    pub const fn mapping_ipv4(addr: u32) -> Self {
        Self([0, 0, MAPPED_PREFIX, addr])
    }

    /// The address's bytes (wire order).
    pub const fn octets(self) -> [u8; 16] {
        let mut octets = [0u8; 16];
        let mut index = 0;
        while index < 16 {
            octets[index] = self.0[index / 4].to_ne_bytes()[index % 4];
            index += 1;
        }
        octets
    }
}

/// The third word of an IPv4-mapped address: bytes `00 00 ff ff`.
const MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for super::Ipv6 {}
}

/// An address as the maps of its family hold it, in wire order: IPv4's `u32` (its bytes
/// as on the wire, read in native order), IPv6's 16 bytes. Sealed: the map types are
/// plain old data only for these two (no implicit padding in any of them).
pub trait Address: sealed::Sealed + Copy + Debug + Default + Eq + Ord + Hash + 'static {
    /// Bits of an address (LPM prefixes count them).
    const BITS: u8;
    /// "IPv4", "IPv6": as the Kubernetes API names the family.
    const NAME: &'static str;
    /// The family's maps that the daemon writes.
    const MAPS: FamilyMapNames;
    /// The padding after a `Backend<Self>` and a `u32` that aligns a `u64` to 8 bytes
    /// (`AffinityValue`): 4 bytes for IPv4, none for IPv6.
    type Align8Pad: Copy + Debug + Default + Eq + Hash + 'static;
    /// The padding after an address and a 4-byte word that aligns a `u64` to 8 bytes
    /// (`SockKey`, `SockValue`): none for IPv4, 4 bytes for IPv6.
    type WordAlign8Pad: Copy + Debug + Default + Eq + Ord + Hash + 'static;
    /// A fragmented datagram's identification (`FragmentKey`): IPv4's 16-bit header
    /// field, IPv6's 32-bit one of its fragment header.
    type FragmentId: Copy + Debug + Default + Eq + Ord + Hash + 'static;
    /// The padding after a `FragmentKey`'s protocol byte: 1 byte for IPv4, 3 for IPv6.
    type FragmentPad: Copy + Debug + Default + Eq + Ord + Hash + 'static;
    /// The lowest and the highest address (bounds of a range over one frontend's keys).
    const LOWEST: Self;
    const HIGHEST: Self;

    /// The 32 bits of the address that Maglev's flow hash takes
    /// ([`crate::maglev::client_flow_hash`]): IPv4's word as the maps hold it, IPv6's
    /// [`crate::maglev::ipv6_digest`].
    fn maglev_word(self) -> u32;

    /// The address of this family, `None` for the other one.
    fn from_ip(addr: IpAddr) -> Option<Self>;
    fn to_ip(self) -> IpAddr;

    /// This family's place in a dry run's record.
    fn traced(record: &TraceRecord) -> &TraceAddresses<Self>;
    fn traced_mut(record: &mut TraceRecord) -> &mut TraceAddresses<Self>;
    /// This family's fragment record in a dry run's record.
    fn traced_fragment(record: &TraceRecord) -> &FragmentValue<Self>;
    fn traced_fragment_mut(record: &mut TraceRecord) -> &mut FragmentValue<Self>;
}

/// The pin names of one family's maps that the daemon writes (their types are the generic
/// ones instantiated with the family's [`Address`]; MEMBERSHIP_EPOCH is shared).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FamilyMapNames {
    pub services: &'static str,
    pub backend_slots: &'static str,
    pub backend_ids: &'static str,
    pub membership: &'static str,
    pub svc_names: &'static str,
    pub source_ranges: &'static str,
    pub maglev: &'static str,
}

impl FamilyMapNames {
    /// Every map, for listings of fill and capacity.
    pub const fn all(&self) -> [&'static str; 7] {
        [
            self.services,
            self.backend_slots,
            self.backend_ids,
            self.membership,
            self.svc_names,
            self.source_ranges,
            self.maglev,
        ]
    }
}

impl Address for u32 {
    type Align8Pad = u32;
    type WordAlign8Pad = ();
    type FragmentId = u16;
    type FragmentPad = u8;
    const BITS: u8 = 32;
    const NAME: &'static str = "IPv4";
    const LOWEST: Self = 0;
    const HIGHEST: Self = u32::MAX;
    const MAPS: FamilyMapNames = {
        use crate::map_names::*;
        FamilyMapNames {
            services: SERVICES,
            backend_slots: BACKEND_SLOTS,
            backend_ids: BACKEND_IDS,
            membership: MEMBERSHIP,
            svc_names: SVC_NAMES,
            source_ranges: SOURCE_RANGES,
            maglev: MAGLEV,
        }
    };

    fn maglev_word(self) -> u32 {
        self
    }

    fn from_ip(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V4(addr) => Some(u32::from_ne_bytes(addr.octets())),
            IpAddr::V6(_) => None,
        }
    }

    fn to_ip(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self.to_ne_bytes()))
    }

    fn traced(record: &TraceRecord) -> &TraceAddresses<Self> {
        &record.ipv4
    }

    fn traced_mut(record: &mut TraceRecord) -> &mut TraceAddresses<Self> {
        &mut record.ipv4
    }

    fn traced_fragment(record: &TraceRecord) -> &FragmentValue<Self> {
        &record.fragment_record
    }

    fn traced_fragment_mut(record: &mut TraceRecord) -> &mut FragmentValue<Self> {
        &mut record.fragment_record
    }
}

impl Address for Ipv6 {
    type Align8Pad = ();
    type WordAlign8Pad = u32;
    type FragmentId = u32;
    type FragmentPad = [u8; 3];
    const BITS: u8 = 128;
    const NAME: &'static str = "IPv6";
    const LOWEST: Self = Ipv6([0; 4]);
    const HIGHEST: Self = Ipv6([u32::MAX; 4]);
    const MAPS: FamilyMapNames = {
        use crate::map_names::*;
        FamilyMapNames {
            services: SERVICES6,
            backend_slots: BACKEND_SLOTS6,
            backend_ids: BACKEND_IDS6,
            membership: MEMBERSHIP6,
            svc_names: SVC_NAMES6,
            source_ranges: SOURCE_RANGES6,
            maglev: MAGLEV6,
        }
    };

    fn maglev_word(self) -> u32 {
        crate::maglev::ipv6_digest(self.octets())
    }

    fn from_ip(addr: IpAddr) -> Option<Self> {
        match addr {
            IpAddr::V4(_) => None,
            IpAddr::V6(addr) => Some(Ipv6::from_octets(addr.octets())),
        }
    }

    fn to_ip(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self.octets()))
    }

    fn traced(record: &TraceRecord) -> &TraceAddresses<Self> {
        &record.ipv6
    }

    fn traced_mut(record: &mut TraceRecord) -> &mut TraceAddresses<Self> {
        &mut record.ipv6
    }

    fn traced_fragment(record: &TraceRecord) -> &FragmentValue<Self> {
        &record.fragment_record6
    }

    fn traced_fragment_mut(record: &mut TraceRecord) -> &mut FragmentValue<Self> {
        &mut record.fragment_record6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_their_own_family_only() {
        let v4: IpAddr = "198.19.0.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let key = u32::from_ip(v4).unwrap();
        assert_eq!(key.to_ne_bytes(), [198, 19, 0, 10]);
        assert_eq!(key.to_ip(), v4);
        assert_eq!(Ipv6::from_ip(v6).unwrap().to_ip(), v6);
        assert_eq!(u32::from_ip(v6), None);
        assert_eq!(Ipv6::from_ip(v4), None);
    }

    #[test]
    fn ipv4_mapped_addresses_are_told_from_other_ipv6_ones() {
        let ipv4 = u32::from_ip("198.19.0.10".parse().unwrap()).unwrap();
        let mapped = Ipv6::from_ip("::ffff:198.19.0.10".parse().unwrap()).unwrap();
        assert_eq!(mapped.ipv4_mapped(), Some(ipv4));
        assert_eq!(Ipv6::mapping_ipv4(ipv4), mapped);
        // IPv4-compatible (deprecated), NAT64's well-known prefix, an ordinary address: no.
        for other in [
            "::198.19.0.10",
            "64:ff9b::198.19.0.10",
            "2001:db8::ffff:c613:a",
        ] {
            let other = Ipv6::from_ip(other.parse().unwrap()).unwrap();
            assert_eq!(other.ipv4_mapped(), None, "{other:?}");
        }
    }

    #[test]
    fn each_family_has_maps_of_its_own() {
        for name in u32::MAPS.all() {
            assert!(!Ipv6::MAPS.all().contains(&name), "{name} shared");
        }
    }
}
