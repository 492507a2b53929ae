//! What the BPF_PROG_TEST_RUN tests share: the loaded object with its maps in a private
//! bpffs ([`Datapath`]), frames built independently with full checksums ([`Frame`]), and
//! the assertions that compare whole frames. [`wire`] reads, builds and checksums frames
//! byte by byte, for frames no header library would build (the fuzzer's).
#![allow(dead_code)] // each test binary uses its own subset

pub mod ipv6;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
pub use std::net::SocketAddrV4;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, Xdp},
};
use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, TcpHeader,
    UdpHeader,
};
use proxy_common::maglev::{self, MaglevChunk, MaglevKey};
use proxy_common::{
    AffinityKey, AffinityValue, Backend, CtKey, CtTimeouts, CtValue, FragmentKey, FragmentValue,
    FrontendKey, FrontendValue, MembershipKey, PROGRAM_NAME, REFUSAL_LIMITS_GLOBAL, RefusalLimits,
    SNAT_PORT_MAX_GLOBAL, SNAT_PORT_MIN_GLOBAL, Slot, SourceRange, Tuple, XDP_PROGRAM_NAME,
    map_names, membership, service_flags, stat,
};
use proxy_lab::PrivateBpffs;
use proxy_userspace::inspect::trace::{TracePacket, Tracer};
use proxy_userspace::xdp::XdpRun;
pub use wire::{ones_complement_sum, port_unreachable_for};

/// Whether this process can load BPF programs. Without root (or without a working `bpf()`
/// syscall) the tests print why and pass as skipped, except under `CI=true`, where a
/// silently skipped datapath test would hide a broken runner: there they fail.
pub fn bpf_available() -> bool {
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
pub fn bpf_syscall_error() -> Option<std::io::Error> {
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

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: SocketAddrV4 = addr([198, 18, 0, 10], 40_000);
pub const VIP: SocketAddrV4 = addr([198, 19, 0, 10], 80);
pub const BACKEND_1: SocketAddrV4 = addr([198, 18, 1, 10], 8080);
pub const BACKEND_2: SocketAddrV4 = addr([198, 18, 1, 11], 8080);
pub const BACKEND_3: SocketAddrV4 = addr([198, 18, 1, 12], 8080);
/// A destination that is no frontend.
pub const OTHER: SocketAddrV4 = addr([198, 18, 5, 5], 80);
pub const REV_NAT_ID: u32 = 7;
/// The Service port of every frontend the tests install (they share session affinity).
pub const SERVICE_PORT_ID: u32 = 3;
/// Where the tests' first slice starts in BACKEND_SLOTS (not 0, so an index that forgot
/// the base shows).
pub const FIRST_SLOT: u32 = 5;
/// The device BPF_PROG_TEST_RUN runs a frame on: the namespace's loopback.
pub const TEST_RUN_IFINDEX: u32 = 1;
/// The SNAT range the tests load: two ports, so a third flow to one backend finds none.
pub const SNAT_PORTS: (u16, u16) = (61_000, 61_001);

pub const fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port)
}

pub fn frontend(addr: SocketAddrV4, proto: u8) -> FrontendKey {
    FrontendKey::new(addr.ip().octets(), addr.port(), proto)
}

pub fn backend(addr: SocketAddrV4, proto: u8) -> Backend {
    Backend::new(addr.ip().octets(), addr.port(), proto)
}

/// A tuple as the maps store it (wire order).
pub fn tuple(src: SocketAddrV4, dst: SocketAddrV4) -> Tuple {
    Tuple {
        src_addr: u32::from_ne_bytes(src.ip().octets()),
        dst_addr: u32::from_ne_bytes(dst.ip().octets()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
    }
}

/// The conntrack key of a packet from `src` to `dst`.
pub fn ct_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> CtKey {
    CtKey::new(tuple(src, dst), proto)
}

/// The loaded program and its maps, pinned in a private bpffs.
pub struct Datapath {
    // Declared (and so dropped) before the bpffs it pins into.
    ebpf: Ebpf,
    bpffs: PrivateBpffs,
    next_backend_id: u32,
    /// Where the next slice goes in BACKEND_SLOTS (slices are never reused here).
    next_slot: u32,
}

impl Datapath {
    /// Loads the object, or returns `None` when the test must be skipped.
    pub fn load() -> Option<Self> {
        Self::load_with(RefusalLimits::KERNEL_DEFAULTS)
    }

    /// [`Datapath::load`] with the given rate limits on refusals.
    pub fn load_with(refusal_limits: RefusalLimits) -> Option<Self> {
        Self::load_configured(refusal_limits, |loader| loader)
    }

    /// [`Datapath::load`] with CONNTRACK and CONNTRACK_PENDING of the given sizes.
    pub fn load_with_conntrack(assured: u32, pending: u32) -> Option<Self> {
        Self::load_configured(RefusalLimits::KERNEL_DEFAULTS, |loader| {
            loader
                .map_max_entries(map_names::CONNTRACK, assured)
                .map_max_entries(map_names::CONNTRACK_PENDING, pending)
        })
    }

    /// [`Datapath::load`] with an AFFINITY map of `entries` entries.
    pub fn load_with_affinity(entries: u32) -> Option<Self> {
        Self::load_configured(RefusalLimits::KERNEL_DEFAULTS, |loader| {
            loader.map_max_entries(map_names::AFFINITY, entries)
        })
    }

    fn load_configured(
        refusal_limits: RefusalLimits,
        configure: impl for<'a, 'b> FnOnce(&'a mut EbpfLoader<'b>) -> &'a mut EbpfLoader<'b>,
    ) -> Option<Self> {
        if !bpf_available() {
            return None;
        }
        let bpffs = PrivateBpffs::mount("testrun").expect("mounting a private bpffs");
        let mut loader = EbpfLoader::new();
        configure(&mut loader);
        let mut ebpf = loader
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
        proxy_userspace::datapath::load_ipv6_path(
            &mut ebpf,
            proxy_common::PROGRAM6_NAME,
            proxy_common::tail_call::IPV6,
        )
        .unwrap_or_else(|e| panic!("loading the IPv6 path: {e:?}"));
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM_NAME)
            .expect("XDP program in object")
            .try_into()
            .expect("an XDP program");
        xdp.load()
            .unwrap_or_else(|e| panic!("loading {XDP_PROGRAM_NAME}: {e:?}"));
        proxy_userspace::datapath::load_ipv6_path(
            &mut ebpf,
            proxy_common::XDP6_PROGRAM_NAME,
            proxy_common::tail_call::IPV6,
        )
        .unwrap_or_else(|e| panic!("loading the XDP IPv6 path: {e:?}"));
        proxy_userspace::datapath::set_timeouts(&mut ebpf, CtTimeouts::DEFAULT).unwrap();
        // The CLI and the reaper read only pins of a recorded layout.
        proxy_userspace::layout::record(bpffs.path()).unwrap();
        Some(Self {
            ebpf,
            bpffs,
            next_backend_id: 1,
            next_slot: FIRST_SLOT,
        })
    }

    /// Installs a frontend with `backends` in a slice of BACKEND_SLOTS, the way the daemon
    /// does (backends, membership and the slice first, then the header). Returns the
    /// backend ids.
    pub fn add_service(&mut self, frontend: FrontendKey, backends: &[Backend]) -> Vec<u32> {
        self.add_service_with(frontend, backends, 0, 0)
    }

    /// [`Datapath::add_service`] with header `flags` and session affinity (0: none), and
    /// the MEMBERSHIP and BACKEND_IDS entries the daemon writes.
    pub fn add_service_with(
        &mut self,
        frontend: FrontendKey,
        backends: &[Backend],
        flags: u16,
        affinity_timeout_s: u32,
    ) -> Vec<u32> {
        self.add_frontend(
            frontend,
            REV_NAT_ID,
            backends,
            None,
            flags,
            affinity_timeout_s,
        )
    }

    /// An external frontend of an externalTrafficPolicy Local Service: its own (`local`)
    /// backends, then the Service port's Cluster set (`cluster`) that pods use. Returns
    /// the ids of the local backends, then of the Cluster ones.
    pub fn add_local_policy_service(
        &mut self,
        frontend: FrontendKey,
        local: &[Backend],
        cluster: &[Backend],
        flags: u16,
        affinity_timeout_s: u32,
    ) -> Vec<u32> {
        let flags = flags | service_flags::CLUSTER_SET;
        let cluster = Some(cluster);
        self.add_frontend(
            frontend,
            REV_NAT_ID,
            local,
            cluster,
            flags,
            affinity_timeout_s,
        )
    }

    /// Installs frontend `rev_nat_id` of the tests' Service port ([`SERVICE_PORT_ID`]): its
    /// own backends, then (with `service_flags::CLUSTER_SET` in `flags`) the Cluster set
    /// its pods use. Returns the backend ids in slot order.
    pub fn add_frontend(
        &mut self,
        frontend: FrontendKey,
        rev_nat_id: u32,
        own: &[Backend],
        cluster: Option<&[Backend]>,
        flags: u16,
        affinity_timeout_s: u32,
    ) -> Vec<u32> {
        let base = self.next_slot;
        let mut ids = Vec::new();
        let sets = [
            (own, membership::SELECTABLE),
            (cluster.unwrap_or_default(), membership::CLUSTER_SELECTABLE),
        ];
        for (backends, bit) in sets {
            for backend in backends {
                let id = self.backend_id(*backend);
                self.put_slot(
                    self.next_slot,
                    Slot {
                        backend: *backend,
                        backend_id: id,
                        _pad: 0,
                    },
                );
                self.next_slot += 1;
                let key = MembershipKey {
                    rev_nat_id,
                    addr: backend.addr,
                };
                let bits = self.membership(key) | bit | membership::SERVING;
                self.set_membership(key, bits);
                ids.push(id);
            }
        }
        let count = |backends: &[Backend]| u16::try_from(backends.len()).unwrap();
        self.insert_service_entry(
            frontend,
            FrontendValue {
                rev_nat_id,
                service_port_id: SERVICE_PORT_ID,
                base,
                count: count(own),
                cluster_count: cluster.map_or(0, count),
                flags,
                affinity_timeout_s,
                ..FrontendValue::default()
            },
        );
        ids
    }

    /// The id of `backend`, written to BACKEND_IDS the first time it is asked for.
    fn backend_id(&mut self, backend: Backend) -> u32 {
        let backend_ids: BpfHashMap<_, Backend, u32> =
            BpfHashMap::try_from(self.ebpf.map(map_names::BACKEND_IDS).unwrap()).unwrap();
        if let Ok(id) = backend_ids.get(&backend, 0) {
            return id;
        }
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        self.insert_backend(id, backend);
        id
    }

    /// Gives frontend `key` (installed by [`Datapath::add_frontend`]) a Maglev table of
    /// `size` positions over its own set, as the daemon writes it: the table's MAGLEV
    /// chunks, then the header that names it.
    pub fn use_maglev(&mut self, key: FrontendKey, size: u32) {
        let header = FrontendValue {
            maglev: maglev::header_value(size).expect("a Maglev table size"),
            ..self.service_entry(key)
        };
        let slots: aya::maps::Array<_, Slot> =
            aya::maps::Array::try_from(self.ebpf.map(map_names::BACKEND_SLOTS).unwrap()).unwrap();
        let own: Vec<Slot> = (header.base..header.base + u32::from(header.count))
            .map(|index| slots.get(&index, 0).unwrap())
            .collect();
        let mut tables: BpfHashMap<_, MaglevKey, MaglevChunk> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::MAGLEV).unwrap()).unwrap();
        for (chunk_key, chunk) in proxy_userspace::writer::maglev_table(&header, &own) {
            tables.insert(chunk_key, chunk, 0).unwrap();
        }
        self.insert_service_entry(key, header);
    }

    /// Writes BACKEND_SLOTS[`index`].
    pub fn put_slot(&mut self, index: u32, slot: Slot) {
        let mut slots: aya::maps::Array<_, Slot> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::BACKEND_SLOTS).unwrap())
                .unwrap();
        slots.set(index, slot, 0).unwrap();
    }

    /// Admits clients in `network/prefix_len` to the frontend [`REV_NAT_ID`]
    /// (loadBalancerSourceRanges), as the daemon writes it.
    pub fn allow_sources(&mut self, network: [u8; 4], prefix_len: u32) {
        let mut ranges: LpmTrie<_, SourceRange, u8> =
            LpmTrie::try_from(self.ebpf.map_mut(map_names::SOURCE_RANGES).unwrap()).unwrap();
        let range = SourceRange {
            rev_nat_id: REV_NAT_ID,
            addr: u32::from_ne_bytes(network),
        };
        let key = Key::new(SourceRange::<u32>::FRONTEND_BITS + prefix_len, range);
        ranges.insert(&key, 1, 0).unwrap();
    }

    pub fn affinity_map(
        &mut self,
    ) -> BpfHashMap<&mut aya::maps::MapData, AffinityKey, AffinityValue> {
        BpfHashMap::try_from(self.ebpf.map_mut(map_names::AFFINITY).unwrap()).unwrap()
    }

    /// The AFFINITY key of `client` on the tests' Service port.
    pub fn affinity_key(client: SocketAddrV4) -> AffinityKey {
        AffinityKey {
            client_addr: u32::from_ne_bytes(client.ip().octets()),
            service_port_id: SERVICE_PORT_ID,
        }
    }

    /// Names the device frames are test-run on ([`TEST_RUN_IFINDEX`]) in DEVICES as
    /// `kind` (`proxy_common::device_kind`), as the daemon names the devices it attaches to.
    pub fn run_on_device(&mut self, kind: u8) {
        let mut devices: BpfHashMap<_, u32, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::DEVICES).unwrap()).unwrap();
        devices.insert(TEST_RUN_IFINDEX, kind, 0).unwrap();
    }

    pub fn insert_service_entry(&mut self, key: FrontendKey, value: FrontendValue) {
        let mut services: BpfHashMap<_, FrontendKey, FrontendValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::SERVICES).unwrap()).unwrap();
        services.insert(key, value, 0).unwrap();
    }

    /// The header of `key`.
    pub fn service_entry(&self, key: FrontendKey) -> FrontendValue {
        let services: BpfHashMap<_, FrontendKey, FrontendValue> =
            BpfHashMap::try_from(self.ebpf.map(map_names::SERVICES).unwrap()).unwrap();
        services.get(&key, 0).unwrap()
    }

    pub fn remove_service_entry(&mut self, key: FrontendKey) {
        let mut services: BpfHashMap<_, FrontendKey, FrontendValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::SERVICES).unwrap()).unwrap();
        services.remove(&key).unwrap();
    }

    /// Writes BACKEND_IDS[`backend`] = `id`.
    pub fn insert_backend(&mut self, id: u32, backend: Backend) {
        let mut backend_ids: BpfHashMap<_, Backend, u32> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::BACKEND_IDS).unwrap()).unwrap();
        backend_ids.insert(backend, id, 0).unwrap();
    }

    /// MEMBERSHIP[`key`], 0 when absent.
    pub fn membership(&self, key: MembershipKey) -> u8 {
        let members: BpfHashMap<_, MembershipKey, u8> =
            BpfHashMap::try_from(self.ebpf.map(map_names::MEMBERSHIP).unwrap()).unwrap();
        members.get(&key, 0).unwrap_or(0)
    }

    /// Sets (`bits` != 0) or removes a MEMBERSHIP entry, as the daemon's writer does.
    pub fn set_membership(&mut self, key: MembershipKey, bits: u8) {
        let mut members: BpfHashMap<_, MembershipKey, u8> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::MEMBERSHIP).unwrap()).unwrap();
        if bits == 0 {
            members.remove(&key).unwrap();
        } else {
            members.insert(key, bits, 0).unwrap();
        }
    }

    /// Where the maps are pinned (what the daemon calls its bpffs root).
    pub fn pins(&self) -> &std::path::Path {
        self.bpffs.path()
    }

    /// Moves the entry at `key` (in either conntrack map) past its expiry, as if its
    /// timeout had passed since its latest packet.
    pub fn expire(&mut self, key: CtKey) {
        self.set_expiry(key, 1);
    }

    /// Marks the entry at `key` (in either conntrack map) as being removed: what another
    /// CPU's reaper leaves between its compare-and-exchange and its delete.
    pub fn mark_removing(&mut self, key: CtKey) {
        self.set_expiry(key, proxy_common::EXPIRES_REMOVING);
    }

    fn set_expiry(&mut self, key: CtKey, expires_ns: u64) {
        for name in [map_names::CONNTRACK, map_names::CONNTRACK_PENDING] {
            let mut map: BpfHashMap<_, CtKey, CtValue> =
                BpfHashMap::try_from(self.ebpf.map_mut(name).unwrap()).unwrap();
            if let Ok(mut value) = map.get(&key, 0) {
                value.expires_ns = expires_ns;
                map.insert(key, value, 0).unwrap();
                return;
            }
        }
        panic!("no conntrack entry {key:?} to change");
    }

    /// Moves the entry at `key` from CONNTRACK_PENDING to CONNTRACK, as a flow that became
    /// assured.
    pub fn move_to_assured(&mut self, key: CtKey) {
        let mut pending: BpfHashMap<_, CtKey, CtValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK_PENDING).unwrap()).unwrap();
        let value = pending.get(&key, 0).unwrap();
        pending.remove(&key).unwrap();
        let mut assured: BpfHashMap<_, CtKey, CtValue> =
            BpfHashMap::try_from(self.ebpf.map_mut(map_names::CONNTRACK).unwrap()).unwrap();
        assured.insert(key, value, 0).unwrap();
    }

    /// Raises MEMBERSHIP_EPOCH, as the daemon does after it changed MEMBERSHIP.
    pub fn raise_membership_epoch(&mut self) {
        let mut epoch: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.ebpf.map_mut(map_names::MEMBERSHIP_EPOCH).unwrap())
                .unwrap();
        let next = epoch.get(&0, 0).unwrap() + 1;
        epoch.set(0, next, 0).unwrap();
    }

    /// How many instructions the verifier walked to load the program `name`.
    pub fn verified_instructions(&self, name: &str) -> u32 {
        self.ebpf
            .program(name)
            .unwrap()
            .info()
            .unwrap()
            .verified_instruction_count()
            .expect("the kernel reports verified instructions (5.16 and later)")
    }

    /// Loads the cgroup socket program `name` as the daemon does (never attached here):
    /// the verifier's word on it.
    pub fn load_socket_program(&mut self, name: &str) {
        let program = self
            .ebpf
            .program_mut(name)
            .unwrap_or_else(|| panic!("{name} missing from the object"));
        proxy_userspace::socket_lb::load(program)
            .unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
    }

    /// Runs the program on `frame`: its verdict and the frame it leaves.
    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(frame, 0)
    }

    /// [`Datapath::run`] as arriving on `ifindex` (0: loopback).
    pub fn run_on(&self, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let program: &SchedClassifier =
            self.ebpf.program(PROGRAM_NAME).unwrap().try_into().unwrap();
        proxy_userspace::datapath::run_frame_on(program, frame, ifindex).unwrap()
    }

    /// Runs the XDP program on `frame` as if it arrived on `ingress_ifindex` (0: loopback,
    /// where tc test runs see packets arrive).
    pub fn run_xdp_on(&self, frame: &[u8], ingress_ifindex: u32) -> XdpRun {
        let program: &Xdp = self
            .ebpf
            .program(XDP_PROGRAM_NAME)
            .unwrap()
            .try_into()
            .unwrap();
        proxy_userspace::xdp::run_frame(program, frame, ingress_ifindex).unwrap()
    }

    /// [`Datapath::run_xdp_on`] loopback.
    pub fn run_xdp(&self, frame: &[u8]) -> XdpRun {
        self.run_xdp_on(frame, 0)
    }

    /// Every counter, summed over the CPUs, by name.
    pub fn stats(&self) -> BTreeMap<&'static str, u64> {
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
    pub fn assert_stats(&self, expected: &[(u32, u64)]) {
        let mut want: BTreeMap<_, _> = stat::NAMES.iter().map(|name| (*name, 0)).collect();
        for (index, count) in expected {
            want.insert(stat::NAMES[*index as usize], *count);
        }
        assert_eq!(self.stats(), want);
    }

    /// Every conntrack entry, of both maps.
    pub fn conntrack(&self) -> HashMap<CtKey, CtValue> {
        let mut entries = self.conntrack_map(map_names::CONNTRACK);
        entries.extend(self.conntrack_map(map_names::CONNTRACK_PENDING));
        entries
    }

    /// The entries of one conntrack map (`map_names::CONNTRACK` or `CONNTRACK_PENDING`).
    pub fn conntrack_map(&self, name: &str) -> HashMap<CtKey, CtValue> {
        let conntrack: BpfHashMap<_, CtKey, CtValue> =
            BpfHashMap::try_from(self.ebpf.map(name).unwrap()).unwrap();
        conntrack.iter().map(Result::unwrap).collect()
    }

    /// Every FRAGMENTS entry: the datagrams whose first fragment passed.
    pub fn fragments(&self) -> HashMap<FragmentKey, FragmentValue> {
        let map: BpfHashMap<_, FragmentKey, FragmentValue> =
            BpfHashMap::try_from(self.ebpf.map(map_names::FRAGMENTS).unwrap()).unwrap();
        map.iter().map(Result::unwrap).collect()
    }

    /// `epx_trace`, loaded the way `ebpf-proxy trace` loads it: against these pinned maps.
    pub fn tracer(&self) -> Tracer {
        Tracer::load(self.bpffs.path()).unwrap_or_else(|e| panic!("loading epx_trace: {e:?}"))
    }

    pub fn conntrack_entry(&self, key: CtKey) -> CtValue {
        *self
            .conntrack()
            .get(&key)
            .unwrap_or_else(|| panic!("no conntrack entry {key:?}"))
    }
}

#[derive(Clone, Copy)]
pub enum Transport {
    Tcp {
        syn: bool,
        ack: bool,
        fin: bool,
    },
    /// `checksum: false` sends the RFC 768 "no checksum" zero.
    Udp {
        checksum: bool,
    },
    /// One chunk of `chunk` carrying the payload; `checksum: false` leaves the CRC32c
    /// field zero, as a socket does when the device computes it.
    Sctp {
        chunk: u8,
        checksum: bool,
    },
}

pub const SYN: Transport = Transport::Tcp {
    syn: true,
    ack: false,
    fin: false,
};
pub const SYN_ACK: Transport = Transport::Tcp {
    syn: true,
    ack: true,
    fin: false,
};
pub const ACK: Transport = Transport::Tcp {
    syn: false,
    ack: true,
    fin: false,
};
pub const FIN_ACK: Transport = Transport::Tcp {
    syn: false,
    ack: true,
    fin: true,
};
pub const UDP: Transport = Transport::Udp { checksum: true };
pub const SCTP_INIT: Transport = Transport::Sctp {
    chunk: proxy_common::sctp::chunk::INIT,
    checksum: true,
};
pub const SCTP_INIT_ACK: Transport = Transport::Sctp {
    chunk: proxy_common::sctp::chunk::INIT_ACK,
    checksum: true,
};
/// A DATA chunk.
pub const SCTP_DATA: Transport = Transport::Sctp {
    chunk: 0,
    checksum: true,
};

/// An odd length, so checksums cover a padded last byte.
pub const PAYLOAD: &[u8] = b"hello, backend!";

/// A description of an Ethernet/IPv4/TCP, UDP or SCTP frame; `build` gives its bytes with full,
/// valid checksums.
#[derive(Clone, Copy)]
pub struct Frame {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub transport: Transport,
    pub ip_options: &'static [u8],
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub payload: &'static [u8],
    pub ttl: u8,
    /// Ethernet source and destination.
    pub macs: ([u8; 6], [u8; 6]),
}

impl Frame {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, transport: Transport) -> Self {
        Self {
            src,
            dst,
            transport,
            ip_options: &[],
            more_fragments: false,
            fragment_offset: 0,
            payload: PAYLOAD,
            ttl: 64,
            macs: ([0x02, 0, 0, 0, 0, 0x01], [0x02, 0, 0, 0, 0, 0x02]),
        }
    }

    /// The same frame between other Ethernet addresses (`source`, `destination`).
    pub fn macs(self, source: [u8; 6], destination: [u8; 6]) -> Self {
        Self {
            macs: (source, destination),
            ..self
        }
    }

    /// The frame after one routing hop (TTL decremented), as the program forwards it.
    pub fn routed(self) -> Self {
        Self {
            ttl: self.ttl - 1,
            ..self
        }
    }

    /// The same frame between other endpoints: what a translation should produce.
    pub fn between(self, src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        Self { src, dst, ..self }
    }

    pub fn build(&self) -> Vec<u8> {
        let eth = Ethernet2Header {
            source: self.macs.0,
            destination: self.macs.1,
            ether_type: EtherType::IPV4,
        }
        .to_bytes();
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
            Transport::Sctp { chunk, checksum } => {
                let sctp = wire::sctp_packet(
                    self.src.port(),
                    self.dst.port(),
                    chunk,
                    self.payload,
                    checksum,
                );
                ip.protocol = IpNumber::SCTP;
                ip.set_payload_len(sctp.len()).unwrap();
                ip.header_checksum = ip.calc_header_checksum();
                return [&eth[..], &ip.to_bytes(), &sctp].concat();
            }
        };
        ip.header_checksum = ip.calc_header_checksum();
        [&eth[..], &ip.to_bytes(), &l4, self.payload].concat()
    }
}

/// Asserts, computing from scratch, that the IPv4 header checksum and the TCP/UDP
/// checksum (over the pseudo-header) of `frame` are valid. A zero UDP checksum is valid.
pub fn assert_checksums_valid(frame: &[u8]) {
    let wire::Shape::Transport(packet) = wire::shape(frame) else {
        panic!("not an IPv4 TCP or UDP frame: {frame:02x?}");
    };
    assert_eq!(
        wire::ip_checksum_valid(frame, &packet.ip),
        Some(true),
        "IPv4 header checksum of {frame:02x?}"
    );
    assert_eq!(
        wire::l4_checksum_valid(frame, &packet),
        Some(true),
        "L4 checksum of {frame:02x?}"
    );
}

/// Runs `input` and asserts the verdict is TC_ACT_OK and the output is exactly `expected`
/// with valid checksums.
pub fn assert_translated(datapath: &Datapath, input: Frame, expected: Frame) {
    let (verdict, out) = datapath.run(&input.build());
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, expected.build());
    assert_checksums_valid(&out);
}

/// Runs `refused` and asserts it was turned, exactly, into its ICMP port unreachable and
/// redirected back out of its device.
pub fn assert_refused(datapath: &Datapath, refused: &[u8]) {
    let (verdict, out) = datapath.run(refused);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, port_unreachable_for(refused), "{out:02x?}");
    let ip = &out[Ethernet2Header::LEN..];
    assert_eq!(ones_complement_sum(&ip[..Ipv4Header::MIN_LEN]), 0xffff);
    assert_eq!(ones_complement_sum(&ip[Ipv4Header::MIN_LEN..]), 0xffff);
}

/// `len` bytes of payload that differ from byte to byte.
pub fn payload(len: usize) -> &'static [u8] {
    Box::leak(
        (0..len)
            .map(|i| (i * 7 + 3) as u8)
            .collect::<Vec<_>>()
            .into_boxed_slice(),
    )
}

/// Runs every fragment; asserts each verdict is `verdict` and the output is `expected`'s
/// fragments; returns the output.
pub fn assert_fragments(
    datapath: &Datapath,
    sent: &[Vec<u8>],
    verdict: u32,
    expected: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    assert_eq!(sent.len(), expected.len());
    sent.iter()
        .zip(expected)
        .enumerate()
        .map(|(index, (fragment, expected))| {
            let (got, out) = datapath.run(fragment);
            assert_eq!(got, verdict, "fragment {index}");
            assert_eq!(&out, expected, "fragment {index}");
            out
        })
        .collect()
}

/// Asserts the XDP program left `frame` to tc: passed, unmarked, untouched.
pub fn assert_left_to_tc(run: &XdpRun, frame: &[u8]) {
    assert_eq!(run.action, proxy_userspace::xdp::XDP_PASS);
    assert!(!run.decided, "tc must see the packet");
    assert_eq!(run.frame, frame, "untouched");
}

/// Runs `frame` and asserts it passes (TC_ACT_OK) byte for byte unchanged.
pub fn assert_untouched(datapath: &Datapath, frame: &[u8]) {
    let (verdict, out) = datapath.run(frame);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
}

/// Runs `test` on a thread in a fresh network namespace where this node holds `NODE` and
/// reaches the backends and clients through `lo`, the device test runs see packets arrive
/// on: so backends look like pods of another node, reached through the arrival device.
pub fn on_a_node_with_remote_backends(test: impl FnOnce() + Send) {
    on_a_node(&[], test);
}

/// [`on_a_node_with_remote_backends`], but the backends (198.18.1.0/24) sit behind a
/// veth of their own, as pods of this node do.
pub fn on_a_node_with_local_backends(test: impl FnOnce() + Send) {
    on_a_node(&LOCAL_BACKENDS, test);
}

/// The `ip` commands that make the veth `pods` (its peer `pods-peer`), up.
pub const POD_VETH: [&[&str]; 3] = [
    &[
        "link",
        "add",
        "pods",
        "type",
        "veth",
        "peer",
        "name",
        "pods-peer",
    ],
    &["link", "set", "pods", "up"],
    &["link", "set", "pods-peer", "up"],
];

/// The `ip` commands that put the backends behind a veth of their own.
pub const LOCAL_BACKENDS: [&[&str]; 4] = [
    POD_VETH[0],
    POD_VETH[1],
    POD_VETH[2],
    &["route", "add", "198.18.1.0/24", "dev", "pods"],
];

/// [`on_a_node_with_remote_backends`], then the `ip` commands `more`.
pub fn on_a_node(more: &[&[&str]], test: impl FnOnce() + Send) {
    let node: [&[&str]; 3] = [
        &["link", "set", "lo", "up"],
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
    ];
    in_a_namespace(
        &[&node[..], more].concat(),
        &[("net/ipv4/ip_forward", "1")],
        test,
    );
}

/// Runs `test` on a thread in a network namespace of its own, set up with `ip` commands
/// and sysctls (paths under /proc/sys/), which the thread's namespace shows. The namespace
/// goes when the thread ends.
pub fn in_a_namespace<T: Send>(
    ip_commands: &[&[&str]],
    sysctls: &[(&str, &str)],
    test: impl FnOnce() -> T + Send,
) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: affects only this thread, which ends with the test.
                assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
                for args in ip_commands {
                    let status = std::process::Command::new("ip")
                        .args(*args)
                        .status()
                        .unwrap();
                    assert!(status.success(), "ip {args:?}");
                }
                for (key, value) in sysctls {
                    // /proc/sys/net shows the namespace of the thread that opens it.
                    std::fs::write(format!("/proc/sys/{key}"), value).unwrap();
                }
                test()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The node's side of the wire [`on_a_node_with_a_wire`] sets up: its MAC.
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
/// The MACs the node's neighbour table knows for [`BACKEND_1`]'s and [`CLIENT`]'s address.
pub const BACKEND_1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x01];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];

/// Runs `test` (given the wire's ifindex) on a thread in a fresh network namespace where
/// this node holds `NODE` on `wire0`, one end of a veth, and reaches backends and clients
/// through it (198.18.0.0/16), its neighbour table knowing the MACs of [`BACKEND_1`] and
/// [`CLIENT`] but not of the other backends: the external device of a node whose backends
/// sit on other nodes, as XDP sees it.
pub fn on_a_node_with_a_wire(test: impl FnOnce(u32) + Send) {
    let mac = |mac: [u8; 6]| mac.map(|byte| format!("{byte:02x}")).join(":");
    let setup = [
        "link set lo up".to_owned(),
        format!(
            "link add wire0 address {} type veth peer name wire1",
            mac(NODE_MAC)
        ),
        "link set wire0 up".to_owned(),
        "link set wire1 up".to_owned(),
        "addr add 198.18.0.1/32 dev wire0".to_owned(),
        "route add 198.18.0.0/16 dev wire0 src 198.18.0.1".to_owned(),
        format!(
            "neigh add {} lladdr {} dev wire0 nud permanent",
            BACKEND_1.ip(),
            mac(BACKEND_1_MAC)
        ),
        format!(
            "neigh add {} lladdr {} dev wire0 nud permanent",
            CLIENT.ip(),
            mac(CLIENT_MAC)
        ),
    ];
    let setup: Vec<Vec<&str>> = setup
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let setup: Vec<&[&str]> = setup.iter().map(Vec::as_slice).collect();
    in_a_namespace(&setup, &[("net/ipv4/ip_forward", "1")], || {
        let name = std::ffi::CString::new("wire0").unwrap();
        // SAFETY: a valid C string; the lookup happens in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "wire0's index");
        test(ifindex);
    });
}

/// A NodePort of the node address set up by [`on_a_node_with_remote_backends`].
pub const NODE_PORT: SocketAddrV4 = addr([198, 18, 0, 1], 30_080);

/// Runs `frame` and asserts the program forwarded it itself (FIB + redirect), as `expected`
/// one hop later, byte for byte.
pub fn assert_routed(datapath: &Datapath, frame: Frame, expected: Frame) {
    let (verdict, out) = datapath.run(&frame.build());
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, expected.routed().build(), "{out:02x?}");
}

/// The backend a SYN from `client` was DNATed to.
pub fn chosen_backend(
    datapath: &Datapath,
    client: SocketAddrV4,
    backends: &[SocketAddrV4],
) -> SocketAddrV4 {
    chosen_backend_of(datapath, client, VIP, backends)
}

/// The backend (one of `backends`) a new TCP connection from `client` to `frontend` was
/// DNATed to; the program must leave the packet to the kernel (no SNAT, no refusal).
pub fn chosen_backend_of(
    datapath: &Datapath,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backends: &[SocketAddrV4],
) -> SocketAddrV4 {
    let (verdict, out) = datapath.run(&Frame::new(client, frontend, SYN).build());
    assert_eq!(verdict, TC_ACT_OK);
    *backends
        .iter()
        .find(|b| out[30..34] == b.ip().octets())
        .expect("DNATed to one of the backends")
}

pub const AFFINITY_TIMEOUT_S: u32 = 10;
pub const SECOND_NS: u64 = 1_000_000_000;

/// A packet as `ebpf-proxy trace` builds it by default (TCP: a SYN).
pub fn trace_packet(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> TracePacket {
    let endpoint = |a: SocketAddrV4| proxy_userspace::inspect::Endpoint {
        address: (*a.ip()).into(),
        port: a.port(),
    };
    TracePacket::opening(proto, endpoint(src), endpoint(dst))
}
