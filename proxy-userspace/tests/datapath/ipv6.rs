//! IPv6 beside IPv4: the harness's frontends, backends and conntrack entries in the IPv6
//! maps (SERVICES6, BACKEND_SLOTS6, …, CONNTRACK6), written the way the daemon writes
//! them, and the tests' IPv6 addresses (documentation prefix 2001:db8::/32).

use std::collections::HashMap;
use std::net::Ipv6Addr;

use aya::maps::{HashMap as BpfHashMap, LpmTrie, lpm_trie::Key};
use proxy_common::{
    Address, Backend, CtKey, CtValue, FrontendKey, FrontendValue, Ipv6, MembershipKey, Slot,
    SourceRange, Tuple, map_names, membership,
};

use super::{Datapath, REV_NAT_ID, SERVICE_PORT_ID};

pub const CLIENT6: [u8; 16] = ip6(0x0018, 0x0a);
pub const VIP6: [u8; 16] = ip6(0x0019, 0x0a);
pub const BACKEND6_1: [u8; 16] = ip6(0x0118, 0x0a);
pub const BACKEND6_2: [u8; 16] = ip6(0x0118, 0x0b);
/// The node's own address (a NodePort frontend).
pub const NODE6: [u8; 16] = ip6(0x0001, 0x01);
pub const CLIENT6_PORT: u16 = 40_000;
pub const VIP6_PORT: u16 = 80;
pub const BACKEND6_PORT: u16 = 8080;

/// 2001:db8:`subnet`::`host`.
pub const fn ip6(subnet: u16, host: u8) -> [u8; 16] {
    let [high, low] = subnet.to_be_bytes();
    [
        0x20, 0x01, 0x0d, 0xb8, high, low, 0, 0, 0, 0, 0, 0, 0, 0, 0, host,
    ]
}

/// The map form of an address.
pub fn v6(addr: [u8; 16]) -> Ipv6 {
    Ipv6::from_ip(Ipv6Addr::from(addr).into()).unwrap()
}

pub fn frontend6(addr: [u8; 16], port: u16, proto: u8) -> FrontendKey<Ipv6> {
    FrontendKey {
        addr: v6(addr),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

pub fn backend6(addr: [u8; 16], port: u16, proto: u8) -> Backend<Ipv6> {
    Backend {
        addr: v6(addr),
        port: port.to_be(),
        proto,
        _pad: 0,
    }
}

/// A tuple as CONNTRACK6 stores it.
pub fn tuple6(src: ([u8; 16], u16), dst: ([u8; 16], u16)) -> Tuple<Ipv6> {
    Tuple {
        src_addr: v6(src.0),
        dst_addr: v6(dst.0),
        src_port: src.1.to_be(),
        dst_port: dst.1.to_be(),
    }
}

impl Datapath {
    /// Installs the IPv6 frontend `key` ([`REV_NAT_ID`]) with `backends` in a slice of
    /// BACKEND_SLOTS6, as the daemon does: backends, membership and the slice first, then
    /// the header. Returns the backend ids.
    pub fn add_service6(
        &mut self,
        key: FrontendKey<Ipv6>,
        backends: &[Backend<Ipv6>],
        flags: u16,
    ) -> Vec<u32> {
        let base = self.next_slot;
        let mut ids = Vec::new();
        for backend in backends {
            let id = self.next_backend_id;
            self.next_backend_id += 1;
            self.map6::<Backend<Ipv6>, u32>(map_names::BACKEND_IDS6)
                .insert(backend, id, 0)
                .unwrap();
            let mut slots: aya::maps::Array<_, Slot<Ipv6>> =
                aya::maps::Array::try_from(self.ebpf.map_mut(map_names::BACKEND_SLOTS6).unwrap())
                    .unwrap();
            let slot = Slot {
                backend: *backend,
                backend_id: id,
                _pad: 0,
            };
            slots.set(self.next_slot, slot, 0).unwrap();
            self.next_slot += 1;
            let member = MembershipKey {
                rev_nat_id: REV_NAT_ID,
                addr: backend.addr,
            };
            self.map6::<MembershipKey<Ipv6>, u8>(map_names::MEMBERSHIP6)
                .insert(member, membership::SELECTABLE | membership::SERVING, 0)
                .unwrap();
            ids.push(id);
        }
        let header = FrontendValue {
            rev_nat_id: REV_NAT_ID,
            service_port_id: SERVICE_PORT_ID,
            base,
            count: u16::try_from(backends.len()).unwrap(),
            flags,
            ..FrontendValue::default()
        };
        self.map6::<FrontendKey<Ipv6>, FrontendValue>(map_names::SERVICES6)
            .insert(key, header, 0)
            .unwrap();
        ids
    }

    /// Every IPv6 conntrack entry, of both maps.
    pub fn conntrack6(&self) -> HashMap<CtKey<Ipv6>, CtValue<Ipv6>> {
        let mut entries = self.conntrack6_map(map_names::CONNTRACK6);
        entries.extend(self.conntrack6_map(map_names::CONNTRACK_PENDING6));
        entries
    }

    /// The entries of one IPv6 conntrack map (`CONNTRACK6` or `CONNTRACK_PENDING6`).
    pub fn conntrack6_map(&self, name: &str) -> HashMap<CtKey<Ipv6>, CtValue<Ipv6>> {
        let map: BpfHashMap<_, CtKey<Ipv6>, CtValue<Ipv6>> =
            BpfHashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    /// Admits IPv6 clients in `network/prefix_len` to the frontend [`REV_NAT_ID`], as the
    /// daemon writes SOURCE_RANGES6.
    pub fn allow_sources6(&mut self, network: [u8; 16], prefix_len: u32) {
        let mut ranges: LpmTrie<_, SourceRange<Ipv6>, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES6).unwrap()).unwrap();
        let range = SourceRange {
            rev_nat_id: REV_NAT_ID,
            addr: v6(network),
        };
        let key = Key::new(SourceRange::<Ipv6>::FRONTEND_BITS + prefix_len, range);
        ranges.insert(&key, 1, 0).unwrap();
    }

    /// Moves the IPv6 entry at `key` (in either map) past its expiry.
    pub fn expire6(&mut self, key: CtKey<Ipv6>) {
        for name in [map_names::CONNTRACK6, map_names::CONNTRACK_PENDING6] {
            let mut map = self.map6::<CtKey<Ipv6>, CtValue<Ipv6>>(name);
            if let Ok(mut value) = map.get(&key, 0) {
                value.expires_ns = 1;
                map.insert(key, value, 0).unwrap();
                return;
            }
        }
        panic!("no IPv6 conntrack entry {key:?} to expire");
    }

    fn map6<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> BpfHashMap<&mut aya::maps::MapData, K, V> {
        BpfHashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap()
    }
}
