//! IPv6 beside IPv4: the harness's frontends, backends and conntrack entries in the IPv6
//! maps (SERVICES6, BACKEND_SLOTS6, …, CONNTRACK6), written the way the daemon writes
//! them, the tests' IPv6 addresses (documentation prefix 2001:db8::/32), and their frames
//! (built byte by byte by `wire`, checksums computed there).

use std::collections::HashMap;
use std::net::Ipv6Addr;

use aya::maps::{HashMap as BpfHashMap, LpmTrie, lpm_trie::Key};
use proxy_common::{
    Address, AffinityKey, AffinityValue, Backend, CtKey, CtValue, FragmentKey, FragmentValue,
    FrontendKey, FrontendValue, Ipv6, MembershipKey, Slot, SourceRange, Tuple, map_names,
    membership, proto, tcp_flags,
};

use super::wire::{self, Extension};
use super::{Datapath, PAYLOAD, REV_NAT_ID, SERVICE_PORT_ID};

pub const CLIENT6: [u8; 16] = ip6(0x0018, 0x0a);
pub const VIP6: [u8; 16] = ip6(0x0019, 0x0a);
pub const BACKEND6_1: [u8; 16] = ip6(0x0118, 0x0a);
pub const BACKEND6_2: [u8; 16] = ip6(0x0118, 0x0b);
/// The node's own address (a NodePort frontend).
pub const NODE6: [u8; 16] = ip6(0x0001, 0x01);
pub const CLIENT6_PORT: u16 = 40_000;
pub const VIP6_PORT: u16 = 80;
pub const BACKEND6_PORT: u16 = 8080;

/// The tests' IPv6 endpoints (address, port), under the names the IPv4 tests give theirs:
/// imported by name (`use datapath::ipv6::ends::{CLIENT, …}`), which shadows IPv4's from
/// the `datapath` glob.
pub mod ends {
    use super::*;

    pub const CLIENT: ([u8; 16], u16) = (CLIENT6, CLIENT6_PORT);
    pub const VIP: ([u8; 16], u16) = (VIP6, VIP6_PORT);
    pub const BACKEND: ([u8; 16], u16) = (BACKEND6_1, BACKEND6_PORT);
    /// A NodePort on [`NODE6`].
    pub const NODE_PORT: ([u8; 16], u16) = (NODE6, 30_080);
}

/// The Ethernet addresses (source, destination) of the frames [`frame6`] builds.
pub const MACS6: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]);
pub const SYN6: L4 = L4::Tcp(tcp_flags::SYN);
pub const SYN_ACK6: L4 = L4::Tcp(tcp_flags::SYN | tcp_flags::ACK);
pub const ACK6: L4 = L4::Tcp(tcp_flags::ACK);

/// The L4 header of a frame: TCP with its flags, UDP (with a checksum: IPv6 requires
/// one), or SCTP: one chunk of `chunk` carrying the payload, its CRC32c computed from
/// scratch (`wire::sctp_packet`; no pseudo-header), or the field left zero without
/// `checksum`.
#[derive(Clone, Copy)]
pub enum L4 {
    Tcp(u8),
    Udp,
    Sctp { chunk: u8, checksum: bool },
}

impl L4 {
    pub fn proto(self) -> u8 {
        match self {
            L4::Tcp(_) => proto::TCP,
            L4::Udp => proto::UDP,
            L4::Sctp { .. } => proto::SCTP,
        }
    }
}

/// An IPv6 frame from `src` to `dst` with hop limit 64.
pub fn frame6(src: ([u8; 16], u16), dst: ([u8; 16], u16), l4: L4) -> Vec<u8> {
    frame6_with(src, dst, l4, &[], 64)
}

/// [`frame6`] with `extensions` and `hop_limit`.
pub fn frame6_with(
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    l4: L4,
    extensions: &[Extension],
    hop_limit: u8,
) -> Vec<u8> {
    frame6_via(MACS6, src, dst, l4, extensions, hop_limit)
}

/// [`frame6_with`] between the Ethernet addresses `macs` (source, destination).
pub fn frame6_via(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    l4: L4,
    extensions: &[Extension],
    hop_limit: u8,
) -> Vec<u8> {
    let (header, csum_offset, payload) = match l4 {
        L4::Tcp(flags) => (wire::tcp_header(src.1, dst.1, flags), Some(16), PAYLOAD),
        L4::Udp => (
            wire::udp_header(src.1, dst.1, PAYLOAD.len()),
            Some(6),
            PAYLOAD,
        ),
        L4::Sctp { chunk, checksum } => (
            wire::sctp_packet(src.1, dst.1, chunk, PAYLOAD, checksum),
            None,
            &[][..],
        ),
    };
    wire::ipv6_frame(
        macs,
        src.0,
        dst.0,
        hop_limit,
        extensions,
        l4.proto(),
        &header,
        csum_offset,
        payload,
    )
}

/// A UDP datagram from `src` to `dst` carrying `payload` (hop limit 64), its checksum
/// computed here.
pub fn udp6(src: ([u8; 16], u16), dst: ([u8; 16], u16), payload: &[u8]) -> Vec<u8> {
    udp6_with(src, dst, payload, 64)
}

/// [`udp6`] with `hop_limit`.
pub fn udp6_with(
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    payload: &[u8],
    hop_limit: u8,
) -> Vec<u8> {
    wire::ipv6_frame(
        MACS6,
        src.0,
        dst.0,
        hop_limit,
        &[],
        proto::UDP,
        &wire::udp_header(src.1, dst.1, payload.len()),
        Some(6),
        payload,
    )
}

/// The FRAGMENTS6 key of the UDP datagram from `src` to `dst` with identification `id`.
pub fn datagram6(src: [u8; 16], dst: [u8; 16], id: u32) -> FragmentKey<Ipv6> {
    FragmentKey {
        src_addr: v6(src),
        dst_addr: v6(dst),
        id: u32::from_ne_bytes(id.to_be_bytes()),
        proto: proto::UDP,
        _pad: [0; 3],
    }
}

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
        self.add_service6_with(key, backends, flags, 0)
    }

    /// [`Datapath::add_service6`] with session affinity (`affinity_timeout_s`, 0: none).
    pub fn add_service6_with(
        &mut self,
        key: FrontendKey<Ipv6>,
        backends: &[Backend<Ipv6>],
        flags: u16,
        affinity_timeout_s: u32,
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
            affinity_timeout_s,
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

    /// Every FRAGMENTS6 entry: the IPv6 datagrams whose first fragment passed.
    pub fn fragments6(&self) -> HashMap<FragmentKey<Ipv6>, FragmentValue<Ipv6>> {
        let map: BpfHashMap<_, FragmentKey<Ipv6>, FragmentValue<Ipv6>> =
            BpfHashMap::try_from(self.ebpf.map(map_names::FRAGMENTS6).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
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

    /// Every AFFINITY6 entry.
    pub fn affinity6(&self) -> HashMap<AffinityKey<Ipv6>, AffinityValue<Ipv6>> {
        let map: BpfHashMap<_, AffinityKey<Ipv6>, AffinityValue<Ipv6>> =
            BpfHashMap::try_from(self.ebpf.map(map_names::AFFINITY6).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
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

/// Runs `test` (given the wire's ifindex) as [`super::on_a_node_with_a_wire`] does for
/// IPv4: in a fresh network namespace where this node holds [`NODE6`] on `wire0`, one
/// end of a veth, forwards IPv6, and reaches clients (2001:db8:18::/48) and backends
/// (2001:db8:118::/48) through it, its neighbour table knowing the MACs of [`CLIENT6`] and
/// [`BACKEND6_1`] but not of [`BACKEND6_2`].
pub fn on_an_ipv6_node_with_a_wire(test: impl FnOnce(u32) + Send) {
    let mac = |mac: [u8; 6]| mac.map(|byte| format!("{byte:02x}")).join(":");
    let ip = |addr: [u8; 16]| Ipv6Addr::from(addr).to_string();
    let setup = [
        "link set lo up".to_owned(),
        format!(
            "link add wire0 address {} type veth peer name wire1",
            mac(super::NODE_MAC)
        ),
        "link set wire0 up".to_owned(),
        "link set wire1 up".to_owned(),
        format!("-6 addr add {}/128 dev wire0 nodad", ip(NODE6)),
        "-6 route add 2001:db8:18::/48 dev wire0".to_owned(),
        "-6 route add 2001:db8:118::/48 dev wire0".to_owned(),
        format!(
            "-6 neigh add {} lladdr {} dev wire0 nud permanent",
            ip(BACKEND6_1),
            mac(super::BACKEND_1_MAC)
        ),
        format!(
            "-6 neigh add {} lladdr {} dev wire0 nud permanent",
            ip(CLIENT6),
            mac(super::CLIENT_MAC)
        ),
    ];
    let setup: Vec<Vec<&str>> = setup
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let setup: Vec<&[&str]> = setup.iter().map(Vec::as_slice).collect();
    super::in_a_namespace(&setup, &[("net/ipv6/conf/all/forwarding", "1")], || {
        let name = std::ffi::CString::new("wire0").unwrap();
        // SAFETY: a valid C string; the lookup happens in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "wire0's index");
        test(ifindex);
    });
}

/// Runs `test` in a network namespace of its own where this node holds [`NODE6`] and
/// forwards IPv6, reaching clients through `lo` (the device test runs arrive on) and the
/// backends (2001:db8:118::/48) through `backends_via`: `lo` too (backends on other nodes,
/// reached through the arrival device) or a veth of their own (pods of this node).
pub fn on_an_ipv6_node(backends_via: &str, test: impl FnOnce() + Send) {
    let mut commands: Vec<&[&str]> = vec![
        &["link", "set", "lo", "up"],
        &["-6", "addr", "add", "2001:db8:1::1/128", "dev", "lo"],
        &["-6", "route", "add", "2001:db8:18::/48", "dev", "lo"],
    ];
    if backends_via == "pods" {
        commands.extend(super::POD_VETH);
    }
    let route = [
        "-6",
        "route",
        "add",
        "2001:db8:118::/48",
        "dev",
        backends_via,
    ];
    commands.push(&route);
    super::in_a_namespace(&commands, &[("net/ipv6/conf/all/forwarding", "1")], test);
}
