//! Packet tests of the tc program `epx_ingress` through `BPF_PROG_TEST_RUN`, in the style
//! of Katran's fixtures: a crafted frame in, the exact verdict and the exact frame out.
//! The dry-run twin `epx_trace` (behind `ebpf-proxy trace`) is held to the same bytes, and
//! to leaving every map as it found it.
//!
//! Expected frames are built independently (etherparse, full checksums) and compared
//! whole; the output's checksums are also verified from scratch. Test-run skbs are not
//! CHECKSUM_PARTIAL, so every input frame carries fully valid checksums.
//!
//! Each test loads its own copy of the object. Its maps are pinned by name, so aya needs a
//! bpffs directory: every test mounts a private bpffs instance and unmounts it on drop
//! (also on panic), which frees the maps.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Header, Icmpv4Type, IpDscp, IpFragOffset, IpNumber,
    Ipv4Header, Ipv4Options, PacketBuilder, TcpHeader, UdpHeader, icmpv4::DestUnreachableHeader,
};
use proxy_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, CtKey, CtValue, PROGRAM_NAME,
    REFUSAL_LIMITS_GLOBAL, RefusalLimits, SNAT_PORT_MAX_GLOBAL, SNAT_PORT_MIN_GLOBAL, ServiceKey,
    ServiceValue, SourceRange, ct_dir, ct_flags, map_names, proto, service_flags, stat,
};
use proxy_lab::PrivateBpffs;
use proxy_userspace::inspect::trace::{TracePacket, Tracer};

/// Whether this process can load BPF programs. Without root (or without a working `bpf()`
/// syscall) the tests print why and pass as skipped, except under `CI=true`, where a
/// silently skipped datapath test would hide a broken runner: there they fail.
fn bpf_available() -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("needs root".to_owned())
    } else {
        bpf_syscall_error().map(|error| format!("bpf() is unavailable: {error}"))
    };
    let Some(reason) = reason else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("BPF test-run tests cannot run under CI=true: {reason}");
    }
    println!("skipped: {reason}");
    false
}

/// Creates (and closes) a one-entry array map: the smallest proof that `bpf()` works.
fn bpf_syscall_error() -> Option<std::io::Error> {
    /// The leading `union bpf_attr` fields of BPF_MAP_CREATE.
    #[repr(C)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: `attr` outlives the call and its size is passed along.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &raw const attr,
            size_of::<MapCreateAttr>(),
        )
    };
    if fd < 0 {
        return Some(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is closed once.
    unsafe { libc::close(fd as libc::c_int) };
    None
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: SocketAddrV4 = addr([198, 18, 0, 10], 40_000);
const VIP: SocketAddrV4 = addr([198, 19, 0, 10], 80);
const BACKEND_1: SocketAddrV4 = addr([198, 18, 1, 10], 8080);
const BACKEND_2: SocketAddrV4 = addr([198, 18, 1, 11], 8080);
const BACKEND_3: SocketAddrV4 = addr([198, 18, 1, 12], 8080);
/// A destination that is no frontend.
const OTHER: SocketAddrV4 = addr([198, 18, 5, 5], 80);
const REV_NAT_ID: u32 = 7;
/// The SNAT range the tests load: two ports, so a third flow to one backend finds none.
const SNAT_PORTS: (u16, u16) = (61_000, 61_001);

const fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port)
}

fn frontend(addr: SocketAddrV4, proto: u8) -> ServiceKey {
    ServiceKey::new(addr.ip().octets(), addr.port(), proto, 0)
}

fn backend(addr: SocketAddrV4, proto: u8) -> Backend {
    Backend::new(addr.ip().octets(), addr.port(), proto)
}

fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, dir: u8) -> CtKey {
    CtKey {
        src_addr: u32::from_ne_bytes(src.ip().octets()),
        dst_addr: u32::from_ne_bytes(dst.ip().octets()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        proto,
        dir,
        _pad: 0,
    }
}

/// The loaded program and its maps, pinned in a private bpffs.
struct Datapath {
    // Declared (and so dropped) before the bpffs it pins into.
    ebpf: Ebpf,
    bpffs: PrivateBpffs,
    next_backend_id: u32,
}

impl Datapath {
    /// Loads the object, or returns `None` when the test must be skipped.
    fn load() -> Option<Self> {
        Self::load_with(RefusalLimits::KERNEL_DEFAULTS)
    }

    /// [`Datapath::load`] with the given rate limits on refusals.
    fn load_with(refusal_limits: RefusalLimits) -> Option<Self> {
        if !bpf_available() {
            return None;
        }
        let bpffs = PrivateBpffs::mount("testrun").expect("mounting a private bpffs");
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs.path())
            .override_global(SNAT_PORT_MIN_GLOBAL, &SNAT_PORTS.0, true)
            .override_global(SNAT_PORT_MAX_GLOBAL, &SNAT_PORTS.1, true)
            .override_global(REFUSAL_LIMITS_GLOBAL, &refusal_limits, true)
            .load(proxy_userspace::EBPF_OBJECT)
            .unwrap_or_else(|e| panic!("loading the eBPF object: {e:?}"));
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME)
            .expect("program in object")
            .try_into()
            .expect("a tc classifier");
        program
            .load()
            .unwrap_or_else(|e| panic!("loading {PROGRAM_NAME}: {e:?}"));
        Some(Self {
            ebpf,
            bpffs,
            next_backend_id: 1,
        })
    }

    /// Installs a frontend with `backends` in slots 1..=n, the way the daemon does
    /// (backends and slots first, then the slot-0 header). Returns the backend ids.
    fn add_service(&mut self, frontend: ServiceKey, backends: &[Backend]) -> Vec<u32> {
        self.add_service_with(frontend, backends, 0, 0)
    }

    /// [`Datapath::add_service`] with header `flags` and session affinity (0: none) and,
    /// with affinity, the AFFINITY_MATCH entries the daemon writes.
    fn add_service_with(
        &mut self,
        frontend: ServiceKey,
        backends: &[Backend],
        flags: u16,
        affinity_timeout_s: u32,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        for (slot, backend) in (1..).zip(backends) {
            let id = self.next_backend_id;
            self.next_backend_id += 1;
            self.insert_backend(id, *backend);
            self.insert_service_entry(
                frontend.with_slot(slot),
                ServiceValue {
                    backend_id: id,
                    ..ServiceValue::default()
                },
            );
            ids.push(id);
        }
        if affinity_timeout_s != 0 {
            let mut matches: BpfHashMap<_, AffinityMatchKey, u8> =
                BpfHashMap::try_from(self.ebpf.map_mut(map_names::AFFINITY_MATCH).unwrap())
                    .unwrap();
            for backend_id in &ids {
                let key = AffinityMatchKey {
                    rev_nat_id: REV_NAT_ID,
                    backend_id: *backend_id,
                };
                matches.insert(key, 1, 0).unwrap();
            }
        }
        self.insert_service_entry(
            frontend,
            ServiceValue {
                count: backends.len().try_into().unwrap(),
                rev_nat_id: REV_NAT_ID,
                flags,
                affinity_timeout_s,
                ..ServiceValue::default()
            },
        );
        ids
    }

    /// Admits clients in `network/prefix_len` to the frontend [`REV_NAT_ID`]
    /// (loadBalancerSourceRanges), as the daemon writes it.
    fn allow_sources(&mut self, network: [u8; 4], prefix_len: u32) {
        let mut ranges: LpmTrie<_, SourceRange, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES).unwrap()).unwrap();
        let range = SourceRange {
            rev_nat_id: REV_NAT_ID,
            addr: u32::from_ne_bytes(network),
        };
        let key = Key::new(SourceRange::FRONTEND_BITS + prefix_len, range);
        ranges.insert(&key, 1, 0).unwrap();
    }

    fn affinity_map(&mut self) -> BpfHashMap<&mut aya::maps::MapData, AffinityKey, AffinityValue> {
        BpfHashMap::try_from(self.ebpf.map_mut(map_names::AFFINITY).unwrap()).unwrap()
    }

    fn insert_service_entry(&mut self, key: ServiceKey, value: ServiceValue) {
        let mut services: BpfHashMap<_, ServiceKey, ServiceValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::SERVICES).unwrap()).unwrap();
        services.insert(key, value, 0).unwrap();
    }

    fn insert_backend(&mut self, id: u32, backend: Backend) {
        let mut backends: BpfHashMap<_, u32, Backend> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::BACKENDS).unwrap()).unwrap();
        backends.insert(id, backend, 0).unwrap();
    }

    /// Runs the program on `frame`: its verdict and the frame it leaves.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &SchedClassifier =
            self.ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
        let mut out = vec![0; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Every counter, summed over the CPUs, by name.
    fn stats(&self) -> BTreeMap<&'static str, u64> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::STATS).unwrap()).unwrap();
        (0..stat::COUNT)
            .map(|index| {
                let total = stats.get(&index, 0).unwrap().iter().sum();
                (stat::NAMES[index as usize], total)
            })
            .collect()
    }

    /// Asserts the counters equal `expected`, all others being zero.
    fn assert_stats(&self, expected: &[(u32, u64)]) {
        let mut want: BTreeMap<_, _> = stat::NAMES.iter().map(|name| (*name, 0)).collect();
        for (index, count) in expected {
            want.insert(stat::NAMES[*index as usize], *count);
        }
        assert_eq!(self.stats(), want);
    }

    fn conntrack(&self) -> HashMap<CtKey, CtValue> {
        let conntrack: BpfHashMap<_, CtKey, CtValue> =
            BpfHashMap::try_from(self.ebpf.map(map_names::CONNTRACK).unwrap()).unwrap();
        conntrack.iter().map(Result::unwrap).collect()
    }

    /// `epx_trace`, loaded the way `ebpf-proxy trace` loads it: against these pinned maps.
    fn tracer(&self) -> Tracer {
        Tracer::load(self.bpffs.path()).unwrap_or_else(|e| panic!("loading epx_trace: {e:?}"))
    }

    fn conntrack_entry(&self, key: CtKey) -> CtValue {
        *self
            .conntrack()
            .get(&key)
            .unwrap_or_else(|| panic!("no conntrack entry {key:?}"))
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
    },
    /// `checksum: false` sends the RFC 768 "no checksum" zero.
    Udp {
        checksum: bool,
    },
}

const SYN: Transport = Transport::Tcp {
    syn: true,
    ack: false,
    fin: false,
};
const SYN_ACK: Transport = Transport::Tcp {
    syn: true,
    ack: true,
    fin: false,
};
const ACK: Transport = Transport::Tcp {
    syn: false,
    ack: true,
    fin: false,
};
const FIN_ACK: Transport = Transport::Tcp {
    syn: false,
    ack: true,
    fin: true,
};
const UDP: Transport = Transport::Udp { checksum: true };

/// An odd length, so checksums cover a padded last byte.
const PAYLOAD: &[u8] = b"hello, backend!";

/// A description of an Ethernet/IPv4/TCP-or-UDP frame; `build` gives its bytes with full,
/// valid checksums.
#[derive(Clone, Copy)]
struct Frame {
    src: SocketAddrV4,
    dst: SocketAddrV4,
    transport: Transport,
    ip_options: &'static [u8],
    more_fragments: bool,
    fragment_offset: u16,
    payload: &'static [u8],
    ttl: u8,
}

impl Frame {
    fn new(src: SocketAddrV4, dst: SocketAddrV4, transport: Transport) -> Self {
        Self {
            src,
            dst,
            transport,
            ip_options: &[],
            more_fragments: false,
            fragment_offset: 0,
            payload: PAYLOAD,
            ttl: 64,
        }
    }

    /// The frame after one routing hop (TTL decremented), as the program forwards it.
    fn routed(self) -> Self {
        Self {
            ttl: self.ttl - 1,
            ..self
        }
    }

    /// The same frame between other endpoints: what a translation should produce.
    fn between(self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self { src, dst, ..self }
    }

    fn build(&self) -> Vec<u8> {
        let mut ip = Ipv4Header::new(
            0,
            self.ttl,
            IpNumber::TCP,
            self.src.ip().octets(),
            self.dst.ip().octets(),
        )
        .unwrap();
        ip.identification = 0x4242;
        ip.dont_fragment = !self.more_fragments && self.fragment_offset == 0;
        ip.more_fragments = self.more_fragments;
        ip.fragment_offset = IpFragOffset::try_new(self.fragment_offset).unwrap();
        ip.options = Ipv4Options::try_from(self.ip_options).unwrap();
        let l4 = match self.transport {
            Transport::Tcp { syn, ack, fin } => {
                let mut tcp = TcpHeader::new(self.src.port(), self.dst.port(), 1_000, 64_240);
                tcp.syn = syn;
                tcp.ack = ack;
                tcp.fin = fin;
                tcp.acknowledgment_number = if ack { 5_000 } else { 0 };
                ip.set_payload_len(tcp.header_len() + self.payload.len())
                    .unwrap();
                tcp.checksum = tcp.calc_checksum_ipv4(&ip, self.payload).unwrap();
                tcp.to_bytes().to_vec()
            }
            Transport::Udp { checksum } => {
                ip.protocol = IpNumber::UDP;
                ip.set_payload_len(UdpHeader::LEN + self.payload.len())
                    .unwrap();
                let mut udp = UdpHeader::with_ipv4_checksum(
                    self.src.port(),
                    self.dst.port(),
                    &ip,
                    self.payload,
                )
                .unwrap();
                if !checksum {
                    udp.checksum = 0;
                }
                udp.to_bytes().to_vec()
            }
        };
        ip.header_checksum = ip.calc_header_checksum();
        let eth = Ethernet2Header {
            source: [0x02, 0, 0, 0, 0, 0x01],
            destination: [0x02, 0, 0, 0, 0, 0x02],
            ether_type: EtherType::IPV4,
        };
        [&eth.to_bytes()[..], &ip.to_bytes(), &l4, self.payload].concat()
    }
}

/// Asserts, computing from scratch, that the IPv4 header checksum and the TCP/UDP
/// checksum (over the pseudo-header) of `frame` are valid. A zero UDP checksum is valid.
fn assert_checksums_valid(frame: &[u8]) {
    let ip = &frame[Ethernet2Header::LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(
        ones_complement_sum(&ip[..header_len]),
        0xffff,
        "IPv4 header checksum of {frame:02x?}"
    );
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let segment = &ip[header_len..total_len];
    let protocol = ip[9];
    if protocol == proto::UDP && segment[6..8] == [0, 0] {
        return;
    }
    let segment_len = u16::try_from(segment.len()).unwrap().to_be_bytes();
    let pseudo_header = [&ip[12..20], &[0, protocol], &segment_len[..]].concat();
    assert_eq!(
        ones_complement_sum(&[&pseudo_header[..], segment].concat()),
        0xffff,
        "L4 checksum of {frame:02x?}"
    );
}

fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Runs `input` and asserts the verdict is TC_ACT_OK and the output is exactly `expected`
/// with valid checksums.
fn assert_translated(datapath: &Datapath, input: Frame, expected: Frame) {
    let (verdict, out) = datapath.run(&input.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, expected.build());
    assert_checksums_valid(&out);
}

/// The ICMP port unreachable the kernel would send for `refused` (a frame without IPv4
/// options): from its destination back to its source, with its IPv4 header and first 8
/// payload bytes, in the kernel's own style (precedence "internetwork control", TTL 64).
fn port_unreachable_for(refused: &[u8]) -> Vec<u8> {
    let eth = Ethernet2Header::from_slice(refused).unwrap().0;
    let (ip, _) = Ipv4Header::from_slice(&refused[Ethernet2Header::LEN..]).unwrap();
    let quote = &refused[Ethernet2Header::LEN..Ethernet2Header::LEN + Ipv4Header::MIN_LEN + 8];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
        quote,
    );
    let mut answer = Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        IpNumber::ICMP,
        ip.destination,
        ip.source,
    )
    .unwrap();
    answer.dscp = IpDscp::CS6;
    answer.identification = 0;
    answer.dont_fragment = false;
    answer.header_checksum = answer.calc_header_checksum();
    let eth = Ethernet2Header {
        source: eth.destination,
        destination: eth.source,
        ether_type: EtherType::IPV4,
    };
    [
        &eth.to_bytes()[..],
        &answer.to_bytes(),
        &icmp.to_bytes(),
        quote,
    ]
    .concat()
}

/// Runs `refused` and asserts it was turned, exactly, into its ICMP port unreachable and
/// redirected back out of its device.
fn assert_refused(datapath: &Datapath, refused: &[u8]) {
    let (verdict, out) = datapath.run(refused);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, port_unreachable_for(refused), "{out:02x?}");
    let ip = &out[Ethernet2Header::LEN..];
    assert_eq!(ones_complement_sum(&ip[..Ipv4Header::MIN_LEN]), 0xffff);
    assert_eq!(ones_complement_sum(&ip[Ipv4Header::MIN_LEN..]), 0xffff);
}

/// Runs `frame` and asserts it passes (TC_ACT_OK) byte for byte unchanged.
fn assert_untouched(datapath: &Datapath, frame: &[u8]) {
    let (verdict, out) = datapath.run(frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
}

#[test]
fn new_tcp_flow_is_dnated_to_the_backend_and_tracked() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);

    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1)]);
    let conntrack = datapath.conntrack();
    assert_eq!(conntrack.len(), 2, "{conntrack:?}");
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP, ct_dir::FORWARD));
    assert!(forward.created_ns > 0);
    assert_eq!(
        forward,
        CtValue {
            nat_addr: u32::from_ne_bytes(BACKEND_1.ip().octets()),
            nat_port: BACKEND_1.port().to_be(),
            rev_nat_id: REV_NAT_ID,
            backend_id: ids[0],
            flags: 0,
            created_ns: forward.created_ns,
            last_seen_ns: forward.created_ns,
            packets: 1,
            bytes: syn.build().len() as u64,
            snat_addr: 0,
            snat_port: 0,
            _pad: 0,
        }
    );
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::TCP, ct_dir::REPLY));
    assert_eq!(
        reply,
        CtValue {
            nat_addr: u32::from_ne_bytes(VIP.ip().octets()),
            nat_port: VIP.port().to_be(),
            packets: 0,
            bytes: 0,
            ..forward
        }
    );
}

#[test]
fn backend_reply_gets_the_frontend_as_source() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    let syn_ack = Frame::new(BACKEND_1, CLIENT, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));

    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, CLIENT, proto::TCP, ct_dir::REPLY));
    assert_eq!(reply.packets, 1);
    assert_eq!(reply.bytes, syn_ack.build().len() as u64);
}

/// Runs `test` on a thread in a fresh network namespace where this node holds `NODE` and
/// reaches the backends and clients through `lo`, the device test runs see packets arrive
/// on: so backends look like pods of another node, reached through the arrival device.
fn on_a_node_with_remote_backends(test: impl FnOnce() + Send) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: affects only this thread, which ends with the test.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
                for args in [
                    &["link", "set", "lo", "up"][..],
                    &["addr", "add", "198.18.0.1/32", "dev", "lo"],
                    &[
                        "route",
                        "add",
                        "198.18.0.0/16",
                        "dev",
                        "lo",
                        "src",
                        "198.18.0.1",
                    ],
                ] {
                    let status = std::process::Command::new("ip")
                        .args(args)
                        .status()
                        .unwrap();
                    assert!(status.success(), "ip {args:?}");
                }
                // /proc/sys/net shows the namespace of the thread that opens it.
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
                test();
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    });
}

/// A NodePort of the node address set up by [`on_a_node_with_remote_backends`].
const NODE_PORT: SocketAddrV4 = addr([198, 18, 0, 1], 30_080);

/// Runs `frame` and asserts the program forwarded it itself (FIB + redirect), as `expected`
/// one hop later, byte for byte.
fn assert_routed(datapath: &Datapath, frame: Frame, expected: Frame) {
    let (verdict, out) = datapath.run(&frame.build());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, expected.routed().build(), "{out:02x?}");
}

#[test]
fn remote_backend_gets_the_node_address_and_an_snat_port_and_replies_are_reversed() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        let flags = service_flags::NODE_PORT;
        datapath.add_service_with(
            frontend(NODE_PORT, proto::TCP),
            &[backend(BACKEND_1, proto::TCP)],
            flags,
            0,
        );
        let syn = Frame::new(CLIENT, NODE_PORT, SYN);
        let (verdict, out) = datapath.run(&syn.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let port = u16::from_be_bytes([out[34], out[35]]);
        assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&port), "{port}");
        let snat = addr([198, 18, 0, 1], port);
        assert_eq!(
            out,
            syn.between(snat, BACKEND_1).routed().build(),
            "{out:02x?}"
        );

        let ack = Frame::new(CLIENT, NODE_PORT, ACK);
        assert_routed(&datapath, ack, ack.between(snat, BACKEND_1));
        let syn_ack = Frame::new(BACKEND_1, snat, SYN_ACK);
        assert_routed(&datapath, syn_ack, syn_ack.between(NODE_PORT, CLIENT));

        datapath.assert_stats(&[
            (stat::CT_MISS, 1),
            (stat::NEW_FLOW, 1),
            (stat::CT_HIT, 1),
            (stat::REPLY, 1),
        ]);
        let forward =
            datapath.conntrack_entry(ct_key(CLIENT, NODE_PORT, proto::TCP, ct_dir::FORWARD));
        assert_eq!(forward.flags, ct_flags::SNAT | ct_flags::LOCAL_FRONTEND);
        assert_eq!(
            (forward.snat_addr, forward.snat_port),
            (u32::from_ne_bytes([198, 18, 0, 1]), port.to_be())
        );
        let reply = datapath.conntrack_entry(ct_key(BACKEND_1, snat, proto::TCP, ct_dir::REPLY));
        assert_eq!(reply.flags, ct_flags::SNAT | ct_flags::LOCAL_FRONTEND);
        assert_eq!(
            (reply.snat_addr, reply.snat_port),
            (
                u32::from_ne_bytes(CLIENT.ip().octets()),
                CLIENT.port().to_be()
            )
        );
        assert_eq!(reply.packets, 1);
        assert_eq!(datapath.conntrack().len(), 2);
    });
}

#[test]
fn snat_udp_is_translated_both_ways() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        let server = addr(BACKEND_1.ip().octets(), 5353);
        datapath.add_service_with(
            frontend(NODE_PORT, proto::UDP),
            &[backend(server, proto::UDP)],
            service_flags::NODE_PORT,
            0,
        );
        let query = Frame::new(CLIENT, NODE_PORT, UDP);
        let (verdict, out) = datapath.run(&query.build());
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let snat = addr([198, 18, 0, 1], u16::from_be_bytes([out[34], out[35]]));
        assert_eq!(out, query.between(snat, server).routed().build());
        let answer = Frame::new(server, snat, UDP);
        assert_routed(&datapath, answer, answer.between(NODE_PORT, CLIENT));
    });
}

#[test]
fn snat_ports_are_never_shared_and_running_out_drops() {
    if !bpf_available() {
        return;
    }
    on_a_node_with_remote_backends(|| {
        let mut datapath = Datapath::load().unwrap();
        datapath.add_service_with(
            frontend(NODE_PORT, proto::TCP),
            &[backend(BACKEND_1, proto::TCP)],
            service_flags::NODE_PORT,
            0,
        );
        // Two ports in the range: two clients get one each (the tries walk on from a
        // random port, so both are tried), the third finds none.
        let mut ports = Vec::new();
        for client_port in [40_001, 40_002] {
            let client = addr(CLIENT.ip().octets(), client_port);
            let (verdict, out) = datapath.run(&Frame::new(client, NODE_PORT, SYN).build());
            assert_eq!(verdict, TC_ACT_REDIRECT);
            ports.push(u16::from_be_bytes([out[34], out[35]]));
        }
        ports.sort_unstable();
        assert_eq!(ports, [SNAT_PORTS.0, SNAT_PORTS.1]);
        let third = addr(CLIENT.ip().octets(), 40_003);
        let (verdict, _) = datapath.run(&Frame::new(third, NODE_PORT, SYN).build());
        assert_eq!(verdict, TC_ACT_SHOT);
        datapath.assert_stats(&[
            (stat::CT_MISS, 3),
            (stat::NEW_FLOW, 2),
            (stat::SNAT_FAILED, 1),
        ]);
    });
}

#[test]
fn hairpin_flow_gets_the_frontend_as_source_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    // BACKEND_1 is its own client: its source becomes the VIP, keeping its port.
    let client = addr(BACKEND_1.ip().octets(), 40_000);
    let masqueraded = addr(VIP.ip().octets(), client.port());

    let syn = Frame::new(client, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(masqueraded, BACKEND_1));
    let ack = Frame::new(client, VIP, ACK);
    assert_translated(&datapath, ack, ack.between(masqueraded, BACKEND_1));
    let syn_ack = Frame::new(BACKEND_1, masqueraded, SYN_ACK);
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, client));

    datapath.assert_stats(&[
        (stat::CT_MISS, 1),
        (stat::NEW_FLOW, 1),
        (stat::CT_HIT, 1),
        (stat::REPLY, 1),
    ]);
    let forward = datapath.conntrack_entry(ct_key(client, VIP, proto::TCP, ct_dir::FORWARD));
    assert_eq!(forward.flags, ct_flags::HAIRPIN);
    let reply = datapath.conntrack_entry(ct_key(BACKEND_1, masqueraded, proto::TCP, ct_dir::REPLY));
    assert_eq!(reply.flags, ct_flags::HAIRPIN);
    assert_eq!(reply.packets, 1);
    assert_eq!(datapath.conntrack().len(), 2);
}

#[test]
fn hairpin_udp_is_translated_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr(VIP.ip().octets(), 53);
    let server = addr(BACKEND_1.ip().octets(), 5353);
    datapath.add_service(frontend(dns, proto::UDP), &[backend(server, proto::UDP)]);
    let client = addr(server.ip().octets(), 40_000);
    let masqueraded = addr(dns.ip().octets(), client.port());

    let query = Frame::new(client, dns, UDP);
    assert_translated(&datapath, query, query.between(masqueraded, server));
    let answer = Frame::new(server, masqueraded, UDP);
    assert_translated(&datapath, answer, answer.between(dns, client));
}

#[test]
fn later_packets_of_a_flow_stay_on_its_backend() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
    );
    let (verdict, out) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_OK);
    let chosen = backends
        .into_iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends");

    let ack = Frame::new(CLIENT, VIP, ACK);
    for _ in 0..20 {
        assert_translated(&datapath, ack, ack.between(CLIENT, chosen));
    }
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::CT_HIT, 20)]);
    let forward = datapath.conntrack_entry(ct_key(CLIENT, VIP, proto::TCP, ct_dir::FORWARD));
    assert_eq!(forward.packets, 21);
    assert!(forward.last_seen_ns >= forward.created_ns);
}

#[test]
fn fin_marks_the_flow_closing_and_a_new_syn_selects_again() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let forward_key = ct_key(CLIENT, VIP, proto::TCP, ct_dir::FORWARD);
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));

    let fin = Frame::new(CLIENT, VIP, FIN_ACK);
    assert_translated(&datapath, fin, fin.between(CLIENT, BACKEND_1));
    assert_eq!(
        datapath.conntrack_entry(forward_key).flags,
        ct_flags::CLOSING
    );

    // The client reuses its port: a fresh selection replaces the closing entry.
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let forward = datapath.conntrack_entry(forward_key);
    assert_eq!((forward.flags, forward.packets), (0, 1));
    datapath.assert_stats(&[(stat::CT_MISS, 2), (stat::NEW_FLOW, 2), (stat::CT_HIT, 1)]);
}

#[test]
fn udp_flow_is_translated_both_ways() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    let dns_backend = addr([198, 18, 1, 53], 5353);
    datapath.add_service(
        frontend(dns, proto::UDP),
        &[backend(dns_backend, proto::UDP)],
    );

    let query = Frame::new(CLIENT, dns, UDP);
    assert_translated(&datapath, query, query.between(CLIENT, dns_backend));
    let answer = Frame::new(dns_backend, CLIENT, UDP);
    assert_translated(&datapath, answer, answer.between(dns, CLIENT));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
}

#[test]
fn udp_without_checksum_keeps_a_zero_checksum() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    let dns_backend = addr([198, 18, 1, 53], 5353);
    datapath.add_service(
        frontend(dns, proto::UDP),
        &[backend(dns_backend, proto::UDP)],
    );
    let no_checksum = Transport::Udp { checksum: false };

    let query = Frame::new(CLIENT, dns, no_checksum);
    assert_translated(&datapath, query, query.between(CLIENT, dns_backend));
    let answer = Frame::new(dns_backend, CLIENT, no_checksum);
    let (verdict, out) = datapath.run(&answer.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, answer.between(dns, CLIENT).build());
    let udp_checksum = Ethernet2Header::LEN + Ipv4Header::MIN_LEN + 6;
    assert_eq!(out[udp_checksum..udp_checksum + 2], [0, 0]);
}

#[test]
fn packet_to_a_non_service_address_passes_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    assert_untouched(&datapath, &Frame::new(CLIENT, OTHER, SYN).build());
    // The frontend's address, but another port, and another protocol.
    assert_untouched(
        &datapath,
        &Frame::new(CLIENT, addr([198, 19, 0, 10], 443), SYN).build(),
    );
    assert_untouched(&datapath, &Frame::new(CLIENT, VIP, UDP).build());
    datapath.assert_stats(&[(stat::PASS, 3)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn service_without_endpoints_refuses_tcp_with_an_icmp_port_unreachable() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    // 69 bytes: the 70-byte answer grows the packet.
    let syn = Frame::new(CLIENT, VIP, SYN).build();
    assert_refused(&datapath, &syn);
    assert_eq!(
        port_unreachable_for(&syn)[..],
        [
            // Ethernet: back to the sender's MAC.
            &[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00][..],
            // IPv4: tos 0xc0, length 56, TTL 64, ICMP, 198.19.0.10 → 198.18.0.10.
            &[0x45, 0xc0, 0x00, 0x38, 0, 0, 0, 0, 0x40, 0x01, 0xed, 0xcb],
            &[198, 19, 0, 10, 198, 18, 0, 10],
            // ICMP destination unreachable, port unreachable.
            &[0x03, 0x03, 0x5c, 0x84, 0, 0, 0, 0],
            // The refused SYN's IPv4 header and ports, sequence number.
            &syn[14..42],
        ]
        .concat()[..],
        "the expected answer itself, spelled out"
    );
    datapath.assert_stats(&[(stat::REJECTED, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn service_without_endpoints_refuses_udp_of_any_length() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let dns = addr([198, 19, 0, 53], 53);
    datapath.add_service(frontend(dns, proto::UDP), &[]);
    let short = Frame {
        payload: b"?",
        ..Frame::new(CLIENT, dns, UDP)
    };
    assert_refused(&datapath, &short.build());
    let long = Frame {
        payload: &[0x5a; 1200],
        ..Frame::new(CLIENT, dns, Transport::Udp { checksum: false })
    };
    assert_refused(&datapath, &long.build());
    datapath.assert_stats(&[(stat::REJECTED, 2)]);
    assert!(datapath.conntrack().is_empty());
}

/// Sends one SYN to `VIP` (a frontend without endpoints) from each of `clients` in turn;
/// returns how many were refused (answered) and how many dropped, checking that nothing
/// else happened, and how long the loop took.
fn refusals(datapath: &Datapath, clients: &[SocketAddrV4]) -> (u64, u64, std::time::Duration) {
    let started = std::time::Instant::now();
    let (mut answered, mut dropped) = (0, 0);
    for client in clients {
        let syn = Frame::new(*client, VIP, SYN).build();
        match datapath.run(&syn) {
            (TC_ACT_REDIRECT, out) => {
                assert_eq!(out, port_unreachable_for(&syn));
                answered += 1;
            }
            (TC_ACT_SHOT, _) => dropped += 1,
            (verdict, _) => panic!("verdict {verdict} for a refusal"),
        }
    }
    (answered, dropped, started.elapsed())
}

/// 60 SYNs from one client, each from another port.
fn one_client_flood() -> Vec<SocketAddrV4> {
    (0..60)
        .map(|port| addr([198, 18, 0, 10], 40_000 + port))
        .collect()
}

/// The kernel's per-peer limit (`icmp_ratelimit`, 1 s): one client gets a burst of 6
/// refusals, then one per second (the test allows one more per second it took); the rest
/// are dropped and counted. Another client still gets its own burst.
#[test]
fn refusals_to_one_client_stop_after_a_burst_of_six() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let flood = one_client_flood();
    let (answered, dropped, took) = refusals(&datapath, &flood);
    let refills = took.as_secs() + 1;
    assert!(
        (6..=6 + refills).contains(&answered),
        "{answered} refusals to one client in {took:?}"
    );
    let (other, _, _) = refusals(&datapath, &[addr([198, 18, 0, 11], 40_000)]);
    assert_eq!(other, 1, "another client has its own bucket");
    datapath.assert_stats(&[
        (stat::REJECTED, answered + other),
        (stat::REJECT_RATE_LIMITED, dropped),
    ]);
}

/// The kernel's node-wide limit (`icmp_msgs_per_sec`, `icmp_msgs_burst`): many clients,
/// one refusal each, share a budget of `burst`, charged a random 0-2 per refusal (1 on
/// average), so about 20 of 300 get an answer: at least 10 (every charge 2), at most 60
/// (60 charges summing below 20 has a probability far under 1e-20) plus what 1000/s
/// refills while the loop runs (a refill comes after 20 ms at the earliest).
#[test]
fn refusals_node_wide_stop_at_the_burst() {
    let Some(mut datapath) = Datapath::load_with(RefusalLimits {
        burst: 20,
        ..RefusalLimits::KERNEL_DEFAULTS
    }) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let clients: Vec<SocketAddrV4> = (0..300u16)
        .map(|i| addr([198, 18, 2 + (i / 200) as u8, (i % 200) as u8 + 1], 40_000))
        .collect();
    let (answered, dropped, took) = refusals(&datapath, &clients);
    let refills = (took.as_secs_f64() * 1000.0).ceil() as u64;
    assert!(
        (10..=60 + refills).contains(&answered),
        "{answered} of 300 clients refused in {took:?}"
    );
    datapath.assert_stats(&[
        (stat::REJECTED, answered),
        (stat::REJECT_RATE_LIMITED, dropped),
    ]);
}

/// An `icmp_ratemask` without "destination unreachable" leaves the kernel's port
/// unreachables unlimited, and so ours.
#[test]
fn an_icmp_ratemask_without_unreachable_lifts_the_limits() {
    let Some(mut datapath) = Datapath::load_with(RefusalLimits {
        limited: 0,
        ..RefusalLimits::KERNEL_DEFAULTS
    }) else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let flood = one_client_flood();
    let (answered, dropped, _) = refusals(&datapath, &flood);
    assert_eq!((answered, dropped), (60, 0));
    datapath.assert_stats(&[(stat::REJECTED, 60)]);
}

#[test]
fn local_policy_frontend_without_local_endpoints_drops() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
    datapath.add_service_with(frontend(VIP, proto::TCP), &[], flags, 0);
    let (verdict, _) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn refusal_of_a_packet_with_ip_options_is_a_drop() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let syn = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(CLIENT, VIP, SYN)
    };
    let (verdict, _) = datapath.run(&syn.build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::NO_BACKEND, 1)]);
}

#[test]
fn source_ranges_admit_clients_inside_and_drop_the_others() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let load_balancer = addr([198, 18, 8, 1], 80);
    datapath.add_service_with(
        frontend(load_balancer, proto::TCP),
        &[backend(BACKEND_1, proto::TCP)],
        service_flags::LOAD_BALANCER | service_flags::SOURCE_RANGES,
        0,
    );
    datapath.allow_sources([198, 18, 0, 0], 24);
    datapath.allow_sources([203, 0, 113, 7], 32);

    let inside = Frame::new(CLIENT, load_balancer, SYN);
    assert_translated(&datapath, inside, inside.between(CLIENT, BACKEND_1));
    let single = addr([203, 0, 113, 7], 40_000);
    let exact = Frame::new(single, load_balancer, SYN);
    assert_translated(&datapath, exact, exact.between(single, BACKEND_1));
    for outside in [
        addr([198, 18, 1, 10], 40_000),
        addr([203, 0, 113, 8], 40_000),
    ] {
        let (verdict, _) = datapath.run(&Frame::new(outside, load_balancer, SYN).build());
        assert_eq!(verdict, TC_ACT_SHOT, "{outside}");
    }
    datapath.assert_stats(&[
        (stat::CT_MISS, 2),
        (stat::NEW_FLOW, 2),
        (stat::SOURCE_RANGE_DENIED, 2),
    ]);
    assert_eq!(
        datapath.conntrack().len(),
        4,
        "only the admitted flows are tracked"
    );
}

/// The backend a SYN from `client` was DNATed to.
fn chosen_backend(
    datapath: &Datapath,
    client: SocketAddrV4,
    backends: &[SocketAddrV4],
) -> SocketAddrV4 {
    let (verdict, out) = datapath.run(&Frame::new(client, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_OK);
    *backends
        .iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends")
}

const AFFINITY_TIMEOUT_S: u32 = 10;
const SECOND_NS: u64 = 1_000_000_000;

#[test]
fn affinity_sends_a_clients_new_connections_to_its_backend() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    let ids = datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    let first = chosen_backend(&datapath, CLIENT, &backends);
    for port in 50_000..50_030 {
        let client = addr(CLIENT.ip().octets(), port);
        assert_eq!(chosen_backend(&datapath, client, &backends), first);
    }
    datapath.assert_stats(&[
        (stat::CT_MISS, 31),
        (stat::NEW_FLOW, 31),
        (stat::AFFINITY, 30),
    ]);
    let key = AffinityKey {
        client_addr: u32::from_ne_bytes(CLIENT.ip().octets()),
        rev_nat_id: REV_NAT_ID,
    };
    let remembered = datapath.affinity_map().get(&key, 0).unwrap();
    let index = backends.iter().position(|b| *b == first).unwrap();
    assert_eq!(remembered.backend_id, ids[index]);
    assert!(remembered.last_used_ns > 0);
}

#[test]
fn affinity_ends_after_the_timeout_and_when_the_backend_leaves() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1];
    let ids = datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    // A second backend that is no longer the frontend's (no AFFINITY_MATCH entry).
    datapath.insert_backend(ids[0] + 1, backend(BACKEND_2, proto::TCP));
    let key = AffinityKey {
        client_addr: u32::from_ne_bytes(CLIENT.ip().octets()),
        rev_nat_id: REV_NAT_ID,
    };
    let now = proxy_userspace::conntrack::monotonic_now_ns();
    let cases = [
        ("within the timeout", ids[0], now - 5 * SECOND_NS, 1),
        ("past the timeout", ids[0], now - 11 * SECOND_NS, 0),
        ("backend left the frontend", ids[0] + 1, now - SECOND_NS, 0),
    ];
    let mut affinity_hits = 0;
    for (flows, (name, backend_id, last_used_ns, kept)) in (1..).zip(cases) {
        let remembered = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns,
        };
        datapath.affinity_map().insert(key, remembered, 0).unwrap();
        let client = addr(CLIENT.ip().octets(), 51_000 + flows as u16);
        assert_eq!(
            chosen_backend(&datapath, client, &backends),
            BACKEND_1,
            "{name}"
        );
        affinity_hits += kept;
        datapath.assert_stats(&[
            (stat::CT_MISS, flows),
            (stat::NEW_FLOW, flows),
            (stat::AFFINITY, affinity_hits),
        ]);
        let refreshed = datapath.affinity_map().get(&key, 0).unwrap();
        assert_eq!(
            refreshed.backend_id, ids[0],
            "{name}: the choice is remembered"
        );
        assert!(refreshed.last_used_ns >= now, "{name}: and its time");
    }
}

#[test]
fn slot_naming_a_missing_backend_drops() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let vip = frontend(VIP, proto::TCP);
    datapath.insert_service_entry(
        vip.with_slot(1),
        ServiceValue {
            backend_id: 99,
            ..ServiceValue::default()
        },
    );
    datapath.insert_service_entry(
        vip,
        ServiceValue {
            count: 1,
            rev_nat_id: REV_NAT_ID,
            ..ServiceValue::default()
        },
    );
    let (verdict, _) = datapath.run(&Frame::new(CLIENT, VIP, SYN).build());
    assert_eq!(verdict, TC_ACT_SHOT);
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::BACKEND_MISSING, 1)]);
}

#[test]
fn non_ipv4_and_fragments_pass_untouched() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);

    let arp_request = [
        &[0xff; 6][..],               // broadcast
        &[0x02, 0, 0, 0, 0, 0x01],    // source MAC
        &[0x08, 0x06],                // ARP
        &[0, 1, 0x08, 0, 6, 4, 0, 1], // Ethernet/IPv4, request
        &[0x02, 0, 0, 0, 0, 0x01],    // sender MAC
        &CLIENT.ip().octets(),        // sender IP
        &[0; 6],                      // target MAC
        &VIP.ip().octets(),           // target IP
    ]
    .concat();
    assert_untouched(&datapath, &arp_request);

    let mut ipv6 = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02])
        .ipv6([0xfd; 16], [0xfe; 16], 64)
        .tcp(40_000, 80, 1_000, 64_240)
        .syn()
        .write(&mut ipv6, PAYLOAD)
        .unwrap();
    assert_untouched(&datapath, &ipv6);

    let first_fragment = Frame {
        more_fragments: true,
        ..Frame::new(CLIENT, VIP, SYN)
    };
    assert_untouched(&datapath, &first_fragment.build());
    let last_fragment = Frame {
        fragment_offset: 185,
        ..Frame::new(CLIENT, VIP, SYN)
    };
    assert_untouched(&datapath, &last_fragment.build());

    datapath.assert_stats(&[(stat::NOT_HANDLED, 4)]);
    assert!(datapath.conntrack().is_empty());
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    // IHL 6: Router Alert (RFC 2113), 4 bytes.
    let syn = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(CLIENT, VIP, SYN)
    };
    assert_eq!(syn.build()[Ethernet2Header::LEN], 0x46);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let syn_ack = Frame {
        ip_options: &[0x94, 0x04, 0x00, 0x00],
        ..Frame::new(BACKEND_1, CLIENT, SYN_ACK)
    };
    assert_translated(&datapath, syn_ack, syn_ack.between(VIP, CLIENT));
    datapath.assert_stats(&[(stat::CT_MISS, 1), (stat::NEW_FLOW, 1), (stat::REPLY, 1)]);
}

#[test]
fn new_flows_spread_over_all_backends() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    const FLOWS: u16 = 3_000;
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
    );
    let mut per_backend = [0_u32; 3];
    for port in 10_000..10_000 + FLOWS {
        let client = addr(CLIENT.ip().octets(), port);
        let (verdict, out) = datapath.run(&Frame::new(client, VIP, SYN).build());
        assert_eq!(verdict, TC_ACT_OK);
        let chosen = backends
            .iter()
            .position(|b| out[30..34] == b.ip().octets())
            .expect("DNATed to one of the backends");
        assert_eq!(out, Frame::new(client, backends[chosen], SYN).build());
        per_backend[chosen] += 1;
    }
    // Expected 1000 each, standard deviation ~26: these bounds only catch a broken spread.
    assert!(
        per_backend.iter().all(|n| (800..=1_200).contains(n)),
        "{per_backend:?}"
    );
    datapath.assert_stats(&[
        (stat::CT_MISS, FLOWS.into()),
        (stat::NEW_FLOW, FLOWS.into()),
    ]);
}

/// A packet as `ebpf-proxy trace` builds it (TCP: a SYN).
fn trace_packet(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> TracePacket {
    let endpoint = |a: SocketAddrV4| proxy_userspace::inspect::Endpoint {
        address: *a.ip(),
        port: a.port(),
    };
    TracePacket {
        protocol: proto,
        source: endpoint(src),
        destination: endpoint(dst),
    }
}

#[test]
fn trace_rewrites_like_ingress_and_leaves_the_maps_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let ids = datapath.add_service(frontend(VIP, proto::TCP), &[backend(BACKEND_1, proto::TCP)]);
    let mut tracer = datapath.tracer();
    let packet = trace_packet(CLIENT, VIP, proto::TCP);

    // Many runs, so they land on several CPUs: each finds its own per-CPU record.
    for _ in 0..20 {
        let report = tracer.run(&packet).unwrap();
        assert_eq!(
            (report.verdict.as_str(), report.path),
            ("accept", "new_flow")
        );
        assert!(report.conntrack.is_none());
        let backend = report.backend.expect("a backend was selected");
        assert_eq!(
            (backend.id, backend.address, backend.port),
            (ids[0], *BACKEND_1.ip(), 8080)
        );
        assert_eq!(report.selection.map(|s| (s.slot, s.of)), Some((1, 1)));
        let output = report.output.expect("the rewritten packet");
        assert_eq!(output.destination.address, *BACKEND_1.ip());
    }
    datapath.assert_stats(&[]);
    assert!(datapath.conntrack().is_empty());

    // Byte for byte what epx_ingress makes of the same frame.
    let frame = packet.frame();
    let traced = tracer.run_frame(&frame).unwrap();
    let live = datapath.run(&frame);
    assert_eq!(traced, live);
    assert_eq!(live.0, TC_ACT_OK);
    assert_checksums_valid(&live.1);
}

#[test]
fn trace_follows_a_tracked_flow_and_its_replies() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service(
        frontend(VIP, proto::UDP),
        &backends.map(|b| backend(b, proto::UDP)),
    );
    let query = Frame::new(CLIENT, VIP, UDP);
    let (_, out) = datapath.run(&query.build());
    let chosen = backends
        .into_iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends");
    let conntrack_before = datapath.conntrack();
    let stats_before = datapath.stats();
    let mut tracer = datapath.tracer();

    let forward = tracer.run(&trace_packet(CLIENT, VIP, proto::UDP)).unwrap();
    assert_eq!(forward.path, "ct_hit");
    let flow = forward.conntrack.expect("the forward entry decided");
    assert_eq!(
        (flow.direction, flow.nat.address),
        ("forward", *chosen.ip())
    );
    assert_eq!(forward.backend.map(|b| b.address), Some(*chosen.ip()));
    assert!(forward.frontend.is_none(), "no SERVICES lookup on a hit");

    let reply = tracer
        .run(&trace_packet(chosen, CLIENT, proto::UDP))
        .unwrap();
    assert_eq!(reply.path, "reply");
    assert_eq!(reply.conntrack.map(|c| c.direction), Some("reply"));
    let output = reply.output.expect("the rewritten reply");
    assert_eq!(
        (output.source.address, output.source.port),
        (*VIP.ip(), VIP.port())
    );

    assert_eq!(
        datapath.conntrack(),
        conntrack_before,
        "packet counts untouched"
    );
    assert_eq!(datapath.stats(), stats_before);
}

#[test]
fn trace_reports_drops_and_passes() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    datapath.add_service(frontend(VIP, proto::TCP), &[]);
    let local_only = addr([198, 19, 0, 11], 80);
    let flags = service_flags::NODE_PORT | service_flags::NO_LOCAL_ENDPOINTS;
    datapath.add_service_with(frontend(local_only, proto::TCP), &[], flags, 0);
    let mut tracer = datapath.tracer();

    let refused = tracer.run(&trace_packet(CLIENT, VIP, proto::TCP)).unwrap();
    assert_eq!(
        (refused.verdict.as_str(), refused.path),
        ("redirect", "rejected")
    );
    assert_eq!(refused.frontend.map(|f| f.backend_count), Some(0));
    let dropped = tracer
        .run(&trace_packet(CLIENT, local_only, proto::TCP))
        .unwrap();
    assert_eq!(
        (dropped.verdict.as_str(), dropped.path),
        ("drop", "no_backend")
    );

    let passed = tracer
        .run(&trace_packet(CLIENT, OTHER, proto::TCP))
        .unwrap();
    assert_eq!((passed.verdict.as_str(), passed.path), ("accept", "pass"));
    assert!(passed.frontend.is_none() && passed.backend.is_none());
    datapath.assert_stats(&[]);
}

#[test]
fn trace_of_a_node_port_reply_stops_before_routing_it() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let node_port = frontend(VIP, proto::TCP);
    datapath.add_service(node_port, &[backend(BACKEND_1, proto::TCP)]);
    datapath.insert_service_entry(
        node_port,
        ServiceValue {
            count: 1,
            rev_nat_id: REV_NAT_ID,
            flags: proxy_common::service_flags::NODE_PORT,
            ..ServiceValue::default()
        },
    );
    let syn = Frame::new(CLIENT, VIP, SYN);
    assert_translated(&datapath, syn, syn.between(CLIENT, BACKEND_1));
    let stats_before = datapath.stats();

    let report = datapath
        .tracer()
        .run(&trace_packet(BACKEND_1, CLIENT, proto::TCP))
        .unwrap();
    assert_eq!((report.verdict.as_str(), report.path), ("accept", "reply"));
    assert!(
        report.routes_reply,
        "the live program would route this reply itself"
    );
    let output = report.output.expect("the rewritten reply");
    assert_eq!(
        (output.source.address, output.source.port),
        (*VIP.ip(), VIP.port())
    );
    assert_eq!(datapath.stats(), stats_before);
}

#[test]
fn trace_shows_a_backend_kept_by_affinity_and_leaves_it_alone() {
    let Some(mut datapath) = Datapath::load() else {
        return;
    };
    let backends = [BACKEND_1, BACKEND_2, BACKEND_3];
    datapath.add_service_with(
        frontend(VIP, proto::TCP),
        &backends.map(|b| backend(b, proto::TCP)),
        service_flags::CLUSTER_IP,
        AFFINITY_TIMEOUT_S,
    );
    let first = chosen_backend(&datapath, CLIENT, &backends);
    let key = AffinityKey {
        client_addr: u32::from_ne_bytes(CLIENT.ip().octets()),
        rev_nat_id: REV_NAT_ID,
    };
    let remembered = datapath.affinity_map().get(&key, 0).unwrap();
    let stats_before = datapath.stats();
    let mut tracer = datapath.tracer();

    let report = tracer
        .run(&trace_packet(
            addr(CLIENT.ip().octets(), 50_001),
            VIP,
            proto::TCP,
        ))
        .unwrap();
    assert_eq!(
        (report.verdict.as_str(), report.path),
        ("accept", "new_flow")
    );
    assert!(report.selection.is_none(), "no slot was drawn");
    assert_eq!(report.backend.map(|b| b.address), Some(*first.ip()));
    assert!(
        report
            .decided_by
            .iter()
            .any(|line| line.starts_with("AFFINITY[")),
        "{:?}",
        report.decided_by
    );
    assert_eq!(datapath.affinity_map().get(&key, 0).unwrap(), remembered);
    assert_eq!(datapath.stats(), stats_before);
}
