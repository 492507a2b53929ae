//! Connection tracking: keeps a flow on the backend chosen for its first packet and
//! remembers the frontend to restore on the backend's replies.
//!
//! Each translated flow has two entries in CONNTRACK: FORWARD, keyed by the client's
//! tuple (client → frontend), holding the backend; and REPLY, keyed by the backend's
//! reply tuple (backend → client), holding the frontend.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    macros::map,
    maps::LruHashMap,
};
use proxy_common::{Backend, CtKey, CtValue, ct_dir, ct_flags, default_max_entries, service_flags};

use crate::{lookup::Frontend, parse::Packet, snat};

/// Named like `proxy_common::map_names::CONNTRACK`; pinned so the daemon can list and
/// garbage-collect it. LRU: when full, the least recently used flows are evicted
/// instead of new flows failing.
#[map]
static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::pinned(default_max_entries::CONNTRACK, 0);

/// A conntrack entry found for the packet; it lives in the map, so updates are shared.
pub struct Flow {
    entry: *mut CtValue,
}

impl Flow {
    /// Where to rewrite to: the backend (FORWARD) or the frontend (REPLY).
    #[inline(always)]
    pub fn nat_target(&self) -> (u32, u16) {
        // SAFETY: `entry` comes from a successful map lookup and map values stay valid
        // for the whole program run.
        unsafe { ((*self.entry).nat_addr, (*self.entry).nat_port) }
    }

    /// A copy of the entry, for the dry run's record.
    #[inline(always)]
    pub fn value(&self) -> CtValue {
        // SAFETY: as in `nat_target`.
        unsafe { *self.entry }
    }

    /// The entry's packets leave with a node address as source and must be routed by the
    /// program (see `ct_flags::LOCAL_FRONTEND`).
    #[inline(always)]
    pub fn routes_itself(&self) -> bool {
        // SAFETY: as in `nat_target`.
        unsafe { (*self.entry).flags & ct_flags::LOCAL_FRONTEND != 0 }
    }

    /// The client is its own backend (see `ct_flags::HAIRPIN`).
    #[inline(always)]
    pub fn is_hairpin(&self) -> bool {
        // SAFETY: as in `nat_target`.
        unsafe { (*self.entry).flags & ct_flags::HAIRPIN != 0 }
    }

    /// The flow is SNATed (see `ct_flags::SNAT`): FORWARD, the new source; REPLY, the
    /// client to restore as destination.
    #[inline(always)]
    pub fn snat(&self) -> Option<(u32, u16)> {
        // SAFETY: as in `nat_target`.
        unsafe {
            ((*self.entry).flags & ct_flags::SNAT != 0)
                .then(|| ((*self.entry).snat_addr, (*self.entry).snat_port))
        }
    }

    #[inline(always)]
    pub fn is_closing(&self) -> bool {
        // SAFETY: as in `nat_target`.
        unsafe { (*self.entry).flags & ct_flags::CLOSING != 0 }
    }

    /// Accounts one packet of `len` bytes at `now_ns`; a FIN or RST marks the flow closing.
    #[inline(always)]
    pub fn record(&self, packet: &Packet, len: u32, now_ns: u64) {
        // SAFETY: as in `nat_target`. The counters are shared between CPUs, hence the
        // atomic adds; `last_seen_ns` and `flags` are plain stores because any racing
        // writer stores an equivalent value.
        unsafe {
            let entry = self.entry;
            (*entry).last_seen_ns = now_ns;
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*entry).packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*entry).bytes,
                u64::from(len),
            );
            if packet.closes_connection {
                (*entry).flags |= ct_flags::CLOSING;
            }
        }
    }
}

/// The REPLY entry for the packet: it is a backend answering a translated flow.
#[inline(always)]
pub fn reply_flow(packet: &Packet) -> Option<Flow> {
    lookup(packet, ct_dir::REPLY)
}

/// The FORWARD entry for the packet: it belongs to a flow that was already translated.
#[inline(always)]
pub fn forward_flow(packet: &Packet) -> Option<Flow> {
    lookup(packet, ct_dir::FORWARD)
}

#[inline(always)]
fn lookup(packet: &Packet, dir: u8) -> Option<Flow> {
    CONNTRACK
        .get_ptr_mut(packet_key(packet, dir))
        .map(|entry| Flow { entry })
}

/// The key for the packet's own tuple as seen on the wire.
#[inline(always)]
fn packet_key(packet: &Packet, dir: u8) -> CtKey {
    CtKey {
        src_addr: packet.src_addr,
        dst_addr: packet.dst_addr,
        src_port: packet.src_port,
        dst_port: packet.dst_port,
        proto: packet.proto,
        dir,
        _pad: 0,
    }
}

/// What [`create`] wrote.
pub struct Created {
    /// The SNAT source (node address, port; wire order) the flow got, if it needed SNAT.
    pub snat: Option<(u32, u16)>,
    /// Both entries were written (else a map update failed: `stat::CT_CREATE_FAILED`).
    pub complete: bool,
}

/// A flow needing SNAT found no free port in the range: `stat::SNAT_FAILED`.
pub struct NoSnatPort;

/// Records a new flow of `packet` to `frontend`, translated to `backend`: the FORWARD
/// entry (this packet, already accounted) and the REPLY entry the backend's answers hit.
/// Existing entries for the same tuples (a reused port) are replaced. A client that is its
/// own backend gets hairpin entries (see `ct_flags::HAIRPIN`). With `snat_addr` (a backend
/// on another node) the flow gets a port of the SNAT range: random tries, each claiming the
/// REPLY tuple backend → `snat_addr`:port with BPF_NOEXIST, so no two flows share one.
#[inline(always)]
pub fn create(
    packet: &Packet,
    len: u32,
    now_ns: u64,
    frontend: &Frontend,
    backend_id: u32,
    backend: &Backend,
    snat_addr: Option<u32>,
) -> Result<Created, NoSnatPort> {
    let hairpin = is_hairpin(packet, backend);
    let hairpin_flag = if hairpin { ct_flags::HAIRPIN } else { 0 };
    let local_frontend = if frontend.header.flags & service_flags::NODE_PORT != 0 {
        ct_flags::LOCAL_FRONTEND
    } else {
        0
    };
    // Towards the backend, only a hairpin flow's source becomes the node address.
    let forward_flags = if hairpin {
        hairpin_flag | local_frontend
    } else {
        0
    };
    let mut forward = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        rev_nat_id: frontend.header.rev_nat_id,
        backend_id,
        flags: forward_flags,
        created_ns: now_ns,
        last_seen_ns: now_ns,
        packets: 1,
        bytes: u64::from(len),
        snat_addr: 0,
        snat_port: 0,
        _pad: 0,
    };
    let mut reply_key = CtKey {
        src_addr: backend.addr,
        // Hairpin replies are addressed to the frontend address the source became.
        dst_addr: if hairpin {
            packet.dst_addr
        } else {
            packet.src_addr
        },
        src_port: backend.port,
        dst_port: packet.src_port,
        proto: packet.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    };
    let mut reply = CtValue {
        nat_addr: packet.dst_addr,
        nat_port: packet.dst_port,
        flags: local_frontend | hairpin_flag,
        packets: 0,
        bytes: 0,
        ..forward
    };
    let mut snat = None;
    let reply_written = if let Some(snat_addr) = snat_addr {
        // Both directions leave with a node address as source: the program routes them.
        forward.flags = ct_flags::SNAT | ct_flags::LOCAL_FRONTEND;
        reply.flags = ct_flags::SNAT | ct_flags::LOCAL_FRONTEND;
        reply.snat_addr = packet.src_addr;
        reply.snat_port = packet.src_port;
        reply_key.dst_addr = snat_addr;
        let start = snat::random_start();
        for attempt in 0..snat::PORT_TRIES {
            let port = snat::port(start, attempt);
            reply_key.dst_port = port;
            if CONNTRACK
                .insert(reply_key, reply, BPF_NOEXIST.into())
                .is_ok()
            {
                snat = Some((snat_addr, port));
                break;
            }
        }
        let Some((_, port)) = snat else {
            return Err(NoSnatPort);
        };
        forward.snat_addr = snat_addr;
        forward.snat_port = port;
        true
    } else {
        CONNTRACK.insert(reply_key, reply, BPF_ANY.into()).is_ok()
    };
    let forward_written = CONNTRACK
        .insert(packet_key(packet, ct_dir::FORWARD), forward, BPF_ANY.into())
        .is_ok();
    Ok(Created {
        snat,
        complete: forward_written && reply_written,
    })
}

/// The client is the backend chosen for it: a pod reaching itself through a Service.
#[inline(always)]
pub fn is_hairpin(packet: &Packet, backend: &Backend) -> bool {
    backend.addr == packet.src_addr
}
