//! Loads the kernel programs, pins their maps and links under the bpffs root, and attaches
//! the classifier to devices.
//!
//! Everything is pinned so the datapath keeps forwarding while the daemon restarts or is
//! upgraded: on start the maps are reused from their pins, and a device whose link is
//! already pinned gets the new program swapped in atomically (`bpf_link_update`), with no
//! moment where packets pass unbalanced.
//!
//! Pins of another layout (an upgrade across a change of the maps) are set aside and
//! replaced, their conntrack converted, before the new program is swapped in (see
//! [`layout`](crate::layout)).
//!
//! Layout of the bpffs root: `LAYOUT`, `SERVICES`, `BACKEND_SLOTS`, `BACKEND_IDS`, `CONNTRACK`,
//! `CONNTRACK_PENDING`, `CT_TIMEOUTS`, `STATS`, `AFFINITY`, `MEMBERSHIP`,
//! `MEMBERSHIP_EPOCH`, `SVC_NAMES`, `SOURCE_RANGES`, `DEVICES`, `SOCK_XLATE`,
//! `SOCK_AFFINITY`, `XDP_EGRESS` (maps), `links/<ifindex>-<ifname>` (tcx ingress links),
//! `links/xdp-<mode>-<ifindex>-<ifname>` (XDP links of the external devices, see
//! [`crate::xdp`]) and `sock-links/<program>` (the socket programs' cgroup links, see
//! [`socket_lb`](crate::socket_lb)).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray, xdp::DevMapHash,
};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{
    LinkOrder, Program, SchedClassifier, TcAttachType, TestRun as _, TestRunOptions, Xdp,
};
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use proxy_common::{
    Address, CtTimeouts, Ipv6, PROGRAM_NAME, PROGRAM6_NAME, REFUSAL_LIMITS_GLOBAL, RefusalLimits,
    SNAT_PORT_MAX_GLOBAL, SNAT_PORT_MIN_GLOBAL, XDP_PROGRAM_NAME, XDP6_PROGRAM_NAME, device_kind,
    map_names, sock_globals, tail_call,
};
use tracing::{info, warn};

use proxy_common::maglev::DEFAULT_TABLE_SIZE;

use crate::conntrack::ConntrackSizes;
use crate::layout::{self, Upgrade, legacy_conntrack};
use crate::netlink::{Device, DeviceRole};
use crate::pin_root::PinRoot;
use crate::socket_lb::{self, SocketLbMode};
use crate::writer::WriterMaps;
use crate::xdp::{self, Attached, XdpMode};

/// Where the daemon pins, and the CLI looks, unless told otherwise (`--bpffs-root`).
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/ebpf-proxy";

/// Map sizes (entries) and the SNAT port range: the load-time settings of the object,
/// whose defaults are compiled into it.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Frontends (SERVICES).
    pub services: u32,
    /// Backend slots over all frontends (BACKEND_SLOTS).
    pub backend_slots: u32,
    /// Distinct backends (BACKEND_IDS).
    pub backends: u32,
    /// Maglev tables of the default size (MAGLEV holds this many tables' chunks).
    pub maglev_tables: u32,
    pub conntrack: ConntrackSizes,
    /// FRAGMENTS and FRAGMENTS6 (each): fragmented datagrams in flight whose later
    /// fragments follow the first.
    pub fragments: u32,
    /// Source ports (inclusive, host order) for SNAT to backends on other nodes.
    pub snat_ports: SnatPortRange,
}

/// An inclusive port range, `min <= max` (`--snat-port-range MIN-MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for SnatPortRange {
    fn default() -> Self {
        let (min, max) = proxy_common::SNAT_PORT_RANGE;
        Self { min, max }
    }
}

impl std::fmt::Display for SnatPortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl std::str::FromStr for SnatPortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a port range MIN-MAX"))?;
        let parse = |port: &str| {
            port.trim()
                .parse::<u16>()
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| format!("{port:?} is not a port (1-65535)"))
        };
        let (min, max) = (parse(min)?, parse(max)?);
        if min > max {
            return Err(format!("{s:?}: the first port is above the last"));
        }
        Ok(Self { min, max })
    }
}

impl Default for MapSizes {
    fn default() -> Self {
        use proxy_common::default_max_entries as max;
        Self {
            services: max::SERVICES,
            backend_slots: max::BACKEND_SLOTS,
            backends: max::BACKENDS,
            maglev_tables: max::MAGLEV / proxy_common::maglev::chunks(DEFAULT_TABLE_SIZE),
            conntrack: ConntrackSizes::default(),
            fragments: max::FRAGMENTS,
            snat_ports: SnatPortRange::default(),
        }
    }
}

/// The maps, taken out of the loaded object for their single owners.
pub struct Maps {
    pub writer: WriterMaps,
    pub stats: PerCpuArray<MapData, u64>,
    /// AFFINITY and AFFINITY6, read for their fill only (the datapath writes them).
    pub affinity: AffinityMaps,
}

/// Each family's session-affinity map.
pub struct AffinityMaps {
    pub ipv4: MapData,
    pub ipv6: MapData,
}

/// The loaded programs and their attachments.
pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    links_dir: PathBuf,
    socket_links_dir: PathBuf,
    timeouts: CtTimeouts,
    /// The pins of another layout, until the new program is swapped in.
    upgrade: Option<Upgrade>,
    /// This daemon's claim on the pins, held while it runs.
    _pin_root: PinRoot,
}

impl Datapath {
    /// Loads the embedded object, reusing (or creating) the maps pinned under `root`, once
    /// `root` is on a bpffs and this daemon's alone (see [`PinRoot`]), and sets the
    /// conntrack timeouts (before anything is attached). `socket_lb` tells the socket
    /// programs which sockets are theirs (this process's network namespace is the node's).
    pub fn load(
        root: &Path,
        sizes: MapSizes,
        timeouts: CtTimeouts,
        socket_lb: SocketLbMode,
    ) -> Result<Self> {
        let pin_root = PinRoot::prepare(root)?;
        let upgrade = layout::set_aside(root)?;
        let host_netns = match socket_lb {
            SocketLbMode::Off => 0,
            SocketLbMode::Host | SocketLbMode::All => socket_lb::own_netns_cookie()?,
        };
        let all_sockets = u8::from(socket_lb == SocketLbMode::All);
        let refusal_limits = refusal_limits(|name| {
            let path = format!("/proc/sys/net/ipv4/{name}");
            fs::read_to_string(&path)
                .inspect_err(
                    |error| warn!(%path, %error, "cannot read; the kernel's default applies"),
                )
                .ok()
        });
        info!(
            per_client_interval_ms = refusal_limits.client_interval_ns / 1_000_000,
            per_client_burst = RefusalLimits::CLIENT_BURST,
            node_per_second = refusal_limits.per_second,
            node_burst = refusal_limits.burst,
            limited = refusal_limits.limited != 0,
            "refusals are rate limited like the node's ICMP errors (net.ipv4.icmp_*)"
        );
        let links_dir = root.join("links");
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(root)
            .map_max_entries(map_names::CONNTRACK, sizes.conntrack.assured)
            .map_max_entries(map_names::CONNTRACK_PENDING, sizes.conntrack.pending)
            .map_max_entries(map_names::CONNTRACK6, sizes.conntrack.assured)
            .map_max_entries(map_names::CONNTRACK_PENDING6, sizes.conntrack.pending)
            .map_max_entries(map_names::FRAGMENTS, sizes.fragments)
            .map_max_entries(map_names::FRAGMENTS6, sizes.fragments);
        // Each family's maps get the same sizes.
        for family in [<u32 as Address>::MAPS, <Ipv6 as Address>::MAPS] {
            loader
                .map_max_entries(family.services, sizes.services)
                .map_max_entries(family.backend_slots, sizes.backend_slots)
                // One name per frontend, and frontends are bounded by SERVICES.
                .map_max_entries(family.svc_names, sizes.services)
                // About one entry per slot (an endpoint address of a frontend).
                .map_max_entries(
                    family.membership,
                    sizes.backend_slots.saturating_add(sizes.services),
                )
                .map_max_entries(family.backend_ids, sizes.backends)
                .map_max_entries(
                    family.maglev,
                    sizes
                        .maglev_tables
                        .saturating_mul(proxy_common::maglev::chunks(DEFAULT_TABLE_SIZE)),
                );
        }
        let mut ebpf = loader
            .override_global(SNAT_PORT_MIN_GLOBAL, &sizes.snat_ports.min, true)
            .override_global(SNAT_PORT_MAX_GLOBAL, &sizes.snat_ports.max, true)
            .override_global(REFUSAL_LIMITS_GLOBAL, &refusal_limits, true)
            .override_global(sock_globals::HOST_NETNS, &host_netns, true)
            .override_global(sock_globals::ALL, &all_sockets, true)
            .load(crate::EBPF_OBJECT)
            .with_context(|| {
                format!(
                    "loading the eBPF object with maps pinned under {} (a pin left by an \
                     incompatible version can be removed with `ebpf-proxy cleanup`)",
                    root.display()
                )
            })?;
        // The loaded object holds its own copies of everything it needs from the file.
        crate::allocator::release_embedded(crate::EBPF_OBJECT);
        program(&mut ebpf)?
            .load()
            .context("loading the tc program into the kernel")?;
        load_ipv6_path(&mut ebpf, PROGRAM6_NAME, tail_call::IPV6)?;
        set_timeouts(&mut ebpf, timeouts)?;
        layout::record(root)?;
        Ok(Self {
            ebpf,
            root: root.to_path_buf(),
            links_dir,
            socket_links_dir: socket_lb::links_dir(root),
            timeouts,
            upgrade,
            _pin_root: pin_root,
        })
    }

    /// Loads the XDP program (`--xdp` other than `off`), which shares the tc program's maps.
    pub fn load_xdp(&mut self) -> Result<()> {
        xdp_program(&mut self.ebpf)?
            .load()
            .context("loading the XDP program into the kernel")?;
        load_ipv6_path(&mut self.ebpf, XDP6_PROGRAM_NAME, tail_call::IPV6)
    }

    /// Attaches the XDP program to the external `device` as `mode` asks (with `off`, removes
    /// an XDP link a previous daemon left there); how it is attached now.
    pub fn attach_xdp(&mut self, device: &Device, mode: XdpMode) -> Result<Option<Attached>> {
        let links_dir = self.links_dir.clone();
        xdp::attach(xdp_program(&mut self.ebpf)?, &links_dir, device, mode)
    }

    /// Makes XDP_EGRESS name exactly the devices in `native` (ifindexes).
    pub fn set_xdp_egress(&mut self, native: &[u32]) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(map_names::XDP_EGRESS)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", map_names::XDP_EGRESS))?;
        let mut egress: DevMapHash<&mut MapData> = map.try_into()?;
        xdp::set_egress(&mut egress, native)
    }

    /// Whether pins of another layout wait for this daemon's program to be swapped in:
    /// then attach only after the first sync has filled the new maps, between
    /// [`Self::convert_flows`] and [`Self::finish_upgrade`].
    pub fn upgrading(&self) -> bool {
        self.upgrade.is_some()
    }

    /// Converts the flows of the previous conntrack into the new maps (those already
    /// there are left alone), and logs what it did.
    pub fn convert_flows(&self, pass: &str) {
        if let Some(upgrade) = &self.upgrade {
            let result = legacy_conntrack::migrate(upgrade.previous(), &self.root, &self.timeouts);
            layout::report_migration(&result, pass);
        }
    }

    /// After the swap: converts the flows the old program created meanwhile, then removes
    /// the pins of the previous layout.
    pub fn finish_upgrade(&mut self) -> Result<()> {
        self.convert_flows("after the swap");
        if let Some(upgrade) = self.upgrade.take() {
            let removed = upgrade.finish()?;
            info!(maps = ?removed, "removed the pins of the previous layout");
        }
        Ok(())
    }

    /// Takes the maps out of the object. Call once.
    pub fn take_maps(&mut self) -> Result<Maps> {
        let writer = WriterMaps::take(&mut self.ebpf)?;
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        Ok(Maps {
            writer,
            stats: take(map_names::STATS)?.try_into()?,
            affinity: AffinityMaps {
                ipv4: lru(map_names::AFFINITY, take(map_names::AFFINITY)?)?,
                ipv6: lru(map_names::AFFINITY6, take(map_names::AFFINITY6)?)?,
            },
        })
    }

    /// Runs `frame` through the loaded program with BPF_PROG_TEST_RUN (see [`run_frame`]),
    /// attached or not: the fuzzer drives the very program the daemon loads this way.
    pub fn test_run(&self, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let program: &SchedClassifier = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the eBPF object"))?
            .try_into()?;
        run_frame(program, frame)
    }

    /// Runs `frame` through the XDP program (loaded by [`Datapath::load_xdp`]) as arriving
    /// on the test run's loopback, as [`Datapath::test_run`] runs the tc program.
    pub fn test_run_xdp(&mut self, frame: &[u8]) -> Result<crate::xdp::XdpRun> {
        crate::xdp::run_frame(xdp_program(&mut self.ebpf)?, frame, 0)
    }

    /// DEVICES, which names the kind of every device the program is attached to.
    fn devices(&mut self) -> Result<BpfHashMap<&mut MapData, u32, u8>> {
        let map = self
            .ebpf
            .map_mut(map_names::DEVICES)
            .ok_or_else(|| anyhow!("map {} missing from the eBPF object", map_names::DEVICES))?;
        Ok(map.try_into()?)
    }

    /// Records the kind of `device` in DEVICES before the program runs on it: pods' new
    /// connections to an externalTrafficPolicy Local frontend use its Cluster set.
    fn name_device(&mut self, device: &Device) -> Result<()> {
        let kind = match device.role {
            DeviceRole::Pod => device_kind::POD,
            DeviceRole::External => device_kind::EXTERNAL,
        };
        self.devices()?
            .insert(device.index, kind, 0)
            .with_context(|| format!("naming {} in DEVICES", device.name))
    }

    fn link_pin(&self, device: &Device) -> PathBuf {
        self.links_dir.join(link_pin_name(device))
    }

    /// Attaches the program at tcx ingress of `device` and pins the link. An existing
    /// pinned link (from a previous daemon) gets the new program atomically instead.
    pub fn attach(&mut self, device: &Device) -> Result<()> {
        self.name_device(device)?;
        let pin = self.link_pin(device);
        let program = program(&mut self.ebpf)?;
        let link_id = match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = FdLink::from(pinned)
                    .try_into()
                    .context("pinned link is not a tcx link")?;
                program
                    .attach_to_link(link)
                    .with_context(|| format!("replacing the program on {}", device.name))?
            }
            Err(LinkError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == io::ErrorKind::NotFound =>
            {
                program
                    .attach_with_options(
                        &device.name,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("attaching to {} (tcx ingress)", device.name))?
            }
            Err(error) => {
                return Err(error).with_context(|| format!("opening pin {}", pin.display()));
            }
        };
        let link: FdLink = program.take_link(link_id)?.try_into()?;
        // Replacing the pin: remove the old file first, the link itself stays alive
        // through our fd until the new pin holds it.
        let _ = fs::remove_file(&pin);
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
        Ok(())
    }

    /// Attaches the socket programs to `cgroup` (swapping them into links a previous daemon
    /// pinned there), or with [`SocketLbMode::Off`] releases any such links.
    pub fn attach_sockets(&mut self, mode: SocketLbMode, cgroup: &Path) -> Result<()> {
        match mode {
            SocketLbMode::Off => {
                for pin in unpin_links(&self.socket_links_dir, |_| false)? {
                    info!(%pin, "--socket-lb off: released the socket link");
                }
                Ok(())
            }
            SocketLbMode::Host | SocketLbMode::All => {
                socket_lb::attach(&mut self.ebpf, cgroup, &self.socket_links_dir)
            }
        }
    }

    /// Removes the pins of links whose device is gone (or renamed, or re-created with a
    /// new index), and of XDP links not in `xdp` (a device without XDP now, or in another
    /// mode), which releases those links. Returns the names of the released pins. DEVICES
    /// forgets the gone devices too.
    pub fn release_stale_links(
        &mut self,
        devices: &[Device],
        xdp: &[(Device, Attached)],
    ) -> Result<Vec<String>> {
        let indexes: BTreeSet<u32> = devices.iter().map(|device| device.index).collect();
        let mut named = self.devices()?;
        let gone: Vec<u32> = named
            .keys()
            .filter_map(Result::ok)
            .filter(|index| !indexes.contains(index))
            .collect();
        for index in gone {
            let _ = named.remove(&index);
        }
        let mut keep: BTreeSet<PathBuf> = devices.iter().map(|d| self.link_pin(d)).collect();
        keep.extend(xdp::link_pins(
            &self.links_dir,
            xdp.iter().map(|(device, attached)| (device, *attached)),
        ));
        unpin_links(&self.links_dir, |pin| keep.contains(pin))
    }
}

/// Removes the link pins in `dir` that `keep` does not want, which releases their links
/// (a missing `dir` holds none). Returns the names of the pins removed.
fn unpin_links(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("reading {}", dir.display())),
    };
    let mut released = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if keep(&path) {
            continue;
        }
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        released.push(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
        );
    }
    Ok(released)
}

/// The node's ICMP rate limits from its sysctls (`read` gives a file of
/// /proc/sys/net/ipv4), which the kernel would apply to kube-proxy's REJECT; a value that
/// cannot be read or parsed keeps the kernel's default.
fn refusal_limits(read: impl Fn(&str) -> Option<String>) -> RefusalLimits {
    let value = |name: &str| -> Option<u64> {
        let value: i64 = read(name)?.trim().parse().ok()?;
        Some(value.max(0) as u64)
    };
    let defaults = RefusalLimits::KERNEL_DEFAULTS;
    /// Destination unreachable, the type of a port unreachable, in `icmp_ratemask`.
    const DEST_UNREACH_BIT: u64 = 1 << 3;
    /// Time exceeded, in `icmp_ratemask`.
    const TIME_EXCEEDED_BIT: u64 = 1 << 11;
    RefusalLimits {
        client_interval_ns: value("icmp_ratelimit").map_or(defaults.client_interval_ns, |ms| {
            ms.saturating_mul(1_000_000)
        }),
        per_second: value("icmp_msgs_per_sec")
            .map_or(defaults.per_second, |v| v.min(u64::from(u32::MAX)) as u32),
        burst: value("icmp_msgs_burst")
            .map_or(defaults.burst, |v| v.min(u64::from(u32::MAX)) as u32),
        limited: value("icmp_ratemask").map_or(defaults.limited, |mask| {
            u32::from(mask & DEST_UNREACH_BIT != 0)
        }),
        time_exceeded_limited: value("icmp_ratemask")
            .map_or(defaults.time_exceeded_limited, |mask| {
                u32::from(mask & TIME_EXCEEDED_BIT != 0)
            }),
    }
}

/// The pin name of a device's link: the index makes a re-created device with the same
/// name a different pin, since the old link died with the old device.
fn link_pin_name(device: &Device) -> String {
    format!("{}-{}", device.index, device.name)
}

/// Writes the conntrack timeouts into the (pinned) CT_TIMEOUTS map of a loaded object.
pub fn set_timeouts(ebpf: &mut Ebpf, timeouts: CtTimeouts) -> Result<()> {
    let map = ebpf.map_mut(map_names::CT_TIMEOUTS).ok_or_else(|| {
        anyhow!(
            "map {} missing from the eBPF object",
            map_names::CT_TIMEOUTS
        )
    })?;
    let mut array: Array<&mut MapData, CtTimeouts> = map.try_into()?;
    array
        .set(0, timeouts, 0)
        .context("writing the conntrack timeouts")
}

/// Runs `frame` through a loaded tc program with BPF_PROG_TEST_RUN (it goes nowhere): the
/// program's return value and the frame it leaves. The dry run, the tests and the
/// benchmark's checks run packets this way.
pub fn run_frame(program: &SchedClassifier, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    run_frame_on(program, frame, 0)
}

/// [`run_frame`] as if the frame arrived on `ifindex` (0: the test run's loopback), which
/// the program's FIB lookups start from.
pub fn run_frame_on(
    program: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>)> {
    // Room for what the program may add (an ICMP error grows the frame).
    let mut output = vec![0; frame.len() + 256];
    // `struct __sk_buff` up to `ifindex` (the kernel takes a prefix, the rest zero):
    // `ingress_ifindex` and `ifindex` are its 10th and 11th words.
    let mut context = [0u32; 11];
    context[9] = ifindex;
    context[10] = ifindex;
    let context: Vec<u8> = context.iter().flat_map(|word| word.to_ne_bytes()).collect();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: (ifindex != 0).then_some(&context[..]),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    output.truncate(result.data_size_out as usize);
    Ok((result.return_value, output))
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program = ebpf
        .program_mut(XDP_PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {XDP_PROGRAM_NAME} missing from the eBPF object"))?;
    Ok(program.try_into()?)
}

/// Loads `name`, the IPv6 packet path of a tc program (an XDP program's), and puts it in
/// the TAIL_CALLS (XDP_TAIL_CALLS) `slot` (`proxy_common::tail_call`) that the program
/// tail-calls for IPv6 packets: until then, tc passes IPv6 untouched and XDP leaves it to
/// tc.
pub fn load_ipv6_path(ebpf: &mut Ebpf, name: &str, slot: u32) -> Result<()> {
    let (fd, map_name) = match ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?
    {
        Program::SchedClassifier(program) => {
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel"))?;
            (program.fd()?.try_clone()?, map_names::TAIL_CALLS)
        }
        Program::Xdp(program) => {
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel"))?;
            (program.fd()?.try_clone()?, map_names::XDP_TAIL_CALLS)
        }
        _ => bail!("{name} is neither a tc nor an XDP program"),
    };
    let map = ebpf
        .map_mut(map_name)
        .ok_or_else(|| anyhow!("map {map_name} missing from the eBPF object"))?;
    ProgramArray::try_from(map)?
        .set(slot, &fd, 0)
        .with_context(|| format!("installing {name} in {map_name}"))?;
    Ok(())
}

/// The data of `map`, an LRU hash map named `name`.
fn lru(name: &str, map: aya::maps::Map) -> Result<MapData> {
    match map {
        aya::maps::Map::LruHashMap(data) => Ok(data),
        _ => Err(anyhow!("{name} is no LRU hash map")),
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    let program = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the eBPF object"))?;
    Ok(program.try_into()?)
}

#[cfg(test)]
mod tests {
    use super::{RefusalLimits, SnatPortRange, refusal_limits};

    #[test]
    fn refusal_limits_follow_the_nodes_icmp_sysctls() {
        fn node(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
            move |name| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| format!("{value}\n"))
            }
        }
        let defaults = [
            ("icmp_ratelimit", "1000"),
            ("icmp_msgs_per_sec", "1000"),
            ("icmp_msgs_burst", "50"),
            ("icmp_ratemask", "6168"),
        ];
        assert_eq!(
            refusal_limits(node(&defaults)),
            RefusalLimits::KERNEL_DEFAULTS
        );
        let tuned = refusal_limits(node(&[
            ("icmp_ratelimit", "250"),
            ("icmp_msgs_per_sec", "20"),
            ("icmp_msgs_burst", "5"),
            // Time exceeded and parameter problem only: port unreachable is not limited.
            ("icmp_ratemask", "6144"),
        ]));
        assert_eq!(tuned.client_interval_ns, 250_000_000);
        assert_eq!((tuned.per_second, tuned.burst, tuned.limited), (20, 5, 0));
        assert_eq!(tuned.time_exceeded_limited, 1);
        // Unreadable or garbled: the kernel's defaults.
        assert_eq!(
            refusal_limits(node(&[("icmp_ratelimit", "x")])),
            RefusalLimits::KERNEL_DEFAULTS
        );
    }

    #[test]
    fn snat_port_ranges_parse_and_reject_what_is_not_one() {
        assert_eq!(
            "32768-60999".parse(),
            Ok(SnatPortRange {
                min: 32768,
                max: 60999
            })
        );
        assert_eq!(SnatPortRange::default().to_string(), "61000-65535");
        for bad in ["61000", "0-10", "10-5", "1-70000", "a-b"] {
            assert!(bad.parse::<SnatPortRange>().is_err(), "{bad}");
        }
    }
}
