//! Conversion of conntrack entries from layout 0 (the release before the layout record,
//! commit a7370e7) to this release's, so established flows keep their backend across the
//! upgrade.
//!
//! Layout 0 kept a flow as a FORWARD entry (client → frontend, holding the backend) and a
//! REPLY entry (backend → peer, holding the frontend) told apart by a direction byte in
//! the key, with no flow state but packet counts. Each FORWARD entry and its REPLY become
//! one [`Translation`] — the rule the datapath derives both entries from — with the ids
//! the new daemon gave the frontend and backend (looked up by what they name, so ids
//! need not survive), and a state inferred from the packets each side sent.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapType};
use proxy_common::{
    Backend, CtKey, CtTimeouts, CtValue, FrontendKey, FrontendValue, Translation, ct_seconds,
    ct_state, map_names, proto, service_flags,
};

use crate::conntrack::monotonic_now_ns;

/// Key of layout 0's CONNTRACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LegacyKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// [`DIR_FORWARD`] or [`DIR_REPLY`].
    pub dir: u8,
    pub _pad: u16,
}

/// Value of layout 0's CONNTRACK.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LegacyValue {
    /// FORWARD: the backend. REPLY: the frontend address.
    pub nat_addr: u32,
    pub rev_nat_id: u32,
    pub backend_id: u32,
    pub nat_port: u16,
    pub flags: u16,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// With [`SNAT`]: FORWARD, the source the flow's packets get; REPLY, the client.
    pub snat_addr: u32,
    pub snat_port: u16,
    pub _pad: u16,
}

// SAFETY: #[repr(C)], Copy, integers only, explicit padding: every bit pattern is valid.
unsafe impl aya::Pod for LegacyKey {}
// SAFETY: as above.
unsafe impl aya::Pod for LegacyValue {}

pub const DIR_FORWARD: u8 = 0;
pub const DIR_REPLY: u8 = 1;
/// Layout 0's flags.
const CLOSING: u16 = 1 << 0;
const LOCAL_FRONTEND: u16 = 1 << 1;
const HAIRPIN: u16 = 1 << 2;
const SNAT: u16 = 1 << 3;

/// What the new daemon's maps say about a flow's frontend and backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NewIds {
    /// The frontend's `rev_nat_id`, 0 if it no longer exists.
    pub rev_nat_id: u32,
    /// The backend's id, 0 if it no longer exists.
    pub backend_id: u32,
}

/// One converted flow: both entries, and whether it belongs in CONNTRACK (assured) or
/// CONNTRACK_PENDING.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Converted {
    pub assured: bool,
    pub forward: (CtKey, CtValue),
    pub reply: (CtKey, CtValue),
}

/// The key of the REPLY entry that belongs to the FORWARD entry `value` at `key`.
pub fn reply_key(key: &LegacyKey, value: &LegacyValue) -> LegacyKey {
    let peer = if value.flags & SNAT != 0 {
        (value.snat_addr, value.snat_port)
    } else if value.flags & HAIRPIN != 0 {
        (key.dst_addr, key.src_port)
    } else {
        (key.src_addr, key.src_port)
    };
    LegacyKey {
        src_addr: value.nat_addr,
        dst_addr: peer.0,
        src_port: value.nat_port,
        dst_port: peer.1,
        proto: key.proto,
        dir: DIR_REPLY,
        _pad: 0,
    }
}

/// Converts the flow of the FORWARD entry `forward` at `key` and its REPLY entry `reply`;
/// `epoch` goes into both entries (one before the current MEMBERSHIP_EPOCH makes the
/// datapath re-check the backend's membership on the flow's next packet, where it may
/// move). `None` if the flow expired by `now_ns` under `timeouts`.
pub fn convert(
    key: &LegacyKey,
    forward: &LegacyValue,
    reply: &LegacyValue,
    ids: NewIds,
    epoch: u32,
    timeouts: &CtTimeouts,
    now_ns: u64,
) -> Option<Converted> {
    let snat = forward.flags & SNAT != 0;
    // Layout 0 marked a NodePort flow's REPLY entry (LOCAL_FRONTEND); SNAT flows route
    // themselves either way.
    let frontend_flags = if reply.flags & LOCAL_FRONTEND != 0 && !snat {
        service_flags::NODE_PORT
    } else {
        0
    };
    let mut translation = Translation::service(
        key.proto,
        (key.src_addr, key.src_port),
        (key.dst_addr, key.dst_port),
        frontend_flags,
        ids.rev_nat_id,
        (forward.nat_addr, forward.nat_port),
        ids.backend_id,
        snat.then_some(forward.snat_addr),
    );
    if snat {
        translation.set_peer_port(forward.snat_port);
    }
    let state = state(key.proto, forward, reply);
    let last_seen = forward.last_seen_ns.max(reply.last_seen_ns);
    let expires = timeouts.expiry_ns(key.proto, state, last_seen);
    if expires < now_ns {
        return None;
    }
    let created = ct_seconds(forward.created_ns);
    let with = |mut value: CtValue, old: &LegacyValue| {
        value.state = state;
        value.epoch = epoch;
        value.packets = old.packets;
        value.bytes = old.bytes;
        value
    };
    Some(Converted {
        assured: state & ct_state::ASSURED != 0,
        forward: (
            translation.forward_key(),
            with(translation.forward_entry(created, expires), forward),
        ),
        reply: (
            translation.reply_key(),
            with(translation.reply_entry(created, expires), reply),
        ),
    })
}

/// The flow's state as far as layout 0 tells: the backend answered if its entry saw
/// packets; TCP is past the handshake once the client sent more than its SYN after that,
/// UDP a stream once it lived on past the stream threshold after a reply; a FIN or RST
/// (layout 0's CLOSING) counts as the client's FIN, which keeps the flow working but lets a
/// new SYN on its tuple re-select.
fn state(protocol: u8, forward: &LegacyValue, reply: &LegacyValue) -> u64 {
    let mut state = 0;
    if reply.packets > 0 {
        state |= ct_state::REPLIED;
        let assured = if protocol == proto::TCP {
            forward.packets >= 2
        } else {
            let last = forward.last_seen_ns.max(reply.last_seen_ns);
            ct_seconds(last).wrapping_sub(ct_seconds(forward.created_ns))
                >= proxy_common::UDP_STREAM_AFTER_S
        };
        if assured {
            state |= ct_state::ASSURED;
        }
    }
    if (forward.flags | reply.flags) & CLOSING != 0 {
        state |= ct_state::FIN_CLIENT;
    }
    state
}

/// What [`migrate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Flows written (two entries each).
    pub flows: usize,
    pub assured: usize,
    pub pending: usize,
    /// Flows the new maps held already (written by an earlier pass or the new program).
    pub already_there: usize,
    pub expired: usize,
    /// FORWARD entries whose REPLY entry was gone (evicted): their flows cannot be rebuilt.
    pub unpaired: usize,
    /// Flows whose frontend or backend the new daemon does not have (id 0): their next
    /// UDP datagram or unanswered SYN re-selects; established TCP keeps its backend.
    pub frontend_gone: usize,
}

/// Converts the layout-0 CONNTRACK pinned in `previous` into the CONNTRACK and
/// CONNTRACK_PENDING pinned in `root`, whose SERVICES and BACKEND_IDS the new daemon has
/// filled. Flows already in the new maps are left alone (`BPF_NOEXIST`), so a second pass
/// after the swap only adds what the old program created meanwhile. `None` when
/// `previous` holds no CONNTRACK (its layout did not change).
pub fn migrate(previous: &Path, root: &Path, timeouts: &CtTimeouts) -> Result<Option<Migrated>> {
    let old_path = previous.join(map_names::CONNTRACK);
    if !old_path.exists() {
        return Ok(None);
    }
    let old =
        MapData::from_pin(&old_path).with_context(|| format!("opening {}", old_path.display()))?;
    let info = old.info()?;
    let layout = (
        info.map_type()?,
        info.key_size() as usize,
        info.value_size() as usize,
    );
    if layout
        != (
            MapType::LruHash,
            size_of::<LegacyKey>(),
            size_of::<LegacyValue>(),
        )
    {
        bail!(
            "{} is no conntrack of layout 0 (type, key and value sizes: {layout:?})",
            old_path.display()
        );
    }
    let old: BpfHashMap<MapData, LegacyKey, LegacyValue> =
        BpfHashMap::try_from(Map::LruHashMap(old))?;
    let entries: HashMap<LegacyKey, LegacyValue> = old.iter().filter_map(Result::ok).collect();

    let open = |name: &str| -> Result<MapData> {
        MapData::from_pin(root.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let services: BpfHashMap<MapData, FrontendKey, FrontendValue> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::SERVICES)?))?;
    let backend_ids: BpfHashMap<MapData, Backend, u32> =
        BpfHashMap::try_from(Map::HashMap(open(map_names::BACKEND_IDS)?))?;
    let epochs: Array<MapData, u32> =
        Array::try_from(Map::Array(open(map_names::MEMBERSHIP_EPOCH)?))?;
    let mut assured: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(open(map_names::CONNTRACK)?))?;
    let mut pending: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(open(map_names::CONNTRACK_PENDING)?))?;
    let epoch = epochs.get(&0, 0)?.wrapping_sub(1);
    let now = monotonic_now_ns();

    let mut migrated = Migrated::default();
    for (key, forward) in &entries {
        if key.dir != DIR_FORWARD {
            continue;
        }
        let Some(reply) = entries.get(&reply_key(key, forward)) else {
            migrated.unpaired += 1;
            continue;
        };
        let frontend = FrontendKey {
            addr: key.dst_addr,
            port: key.dst_port,
            proto: key.proto,
            _pad: 0,
        };
        let backend = Backend {
            addr: forward.nat_addr,
            port: forward.nat_port,
            proto: key.proto,
            _pad: 0,
        };
        let ids = NewIds {
            rev_nat_id: services
                .get(&frontend, 0)
                .map_or(0, |value| value.rev_nat_id),
            backend_id: backend_ids.get(&backend, 0).unwrap_or(0),
        };
        if ids.rev_nat_id == 0 || ids.backend_id == 0 {
            migrated.frontend_gone += 1;
        }
        let Some(flow) = convert(key, forward, reply, ids, epoch, timeouts, now) else {
            migrated.expired += 1;
            continue;
        };
        let table = if flow.assured {
            &mut assured
        } else {
            &mut pending
        };
        // BPF_NOEXIST: a flow already there stays as it is.
        let no_clobber = 1;
        let exists = |result: Result<(), aya::maps::MapError>| match result {
            Ok(()) => Ok(false),
            Err(aya::maps::MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(true)
            }
            Err(error) => Err(error),
        };
        let forward_exists = exists(table.insert(flow.forward.0, flow.forward.1, no_clobber))?;
        let reply_exists = exists(table.insert(flow.reply.0, flow.reply.1, no_clobber))?;
        if forward_exists || reply_exists {
            migrated.already_there += 1;
            continue;
        }
        migrated.flows += 1;
        if flow.assured {
            migrated.assured += 1;
        } else {
            migrated.pending += 1;
        }
    }
    Ok(Some(migrated))
}

#[cfg(test)]
mod tests {
    use proxy_common::ct_flags;

    use super::*;

    const CLIENT: (u32, u16) = (u32::from_ne_bytes([198, 18, 9, 1]), 40_000u16.to_be());
    const VIP: (u32, u16) = (u32::from_ne_bytes([198, 19, 0, 10]), 80u16.to_be());
    const BACKEND: (u32, u16) = (u32::from_ne_bytes([198, 18, 1, 10]), 8080u16.to_be());
    const NODE: u32 = u32::from_ne_bytes([198, 18, 0, 1]);
    const S: u64 = 1_000_000_000;

    fn forward_key(client: (u32, u16)) -> LegacyKey {
        LegacyKey {
            src_addr: client.0,
            dst_addr: VIP.0,
            src_port: client.1,
            dst_port: VIP.1,
            proto: proto::TCP,
            dir: DIR_FORWARD,
            _pad: 0,
        }
    }

    fn entries(flags: u16, snat: Option<(u32, u16)>) -> (LegacyValue, LegacyValue) {
        let forward = LegacyValue {
            nat_addr: BACKEND.0,
            nat_port: BACKEND.1,
            rev_nat_id: 7,
            backend_id: 3,
            flags,
            created_ns: 100 * S,
            last_seen_ns: 150 * S,
            packets: 10,
            bytes: 1_000,
            snat_addr: snat.map_or(0, |s| s.0),
            snat_port: snat.map_or(0, |s| s.1),
            _pad: 0,
        };
        let reply = LegacyValue {
            nat_addr: VIP.0,
            nat_port: VIP.1,
            flags,
            last_seen_ns: 160 * S,
            packets: 9,
            bytes: 900,
            snat_addr: CLIENT.0,
            snat_port: CLIENT.1,
            ..forward
        };
        (forward, reply)
    }

    const IDS: NewIds = NewIds {
        rev_nat_id: 70,
        backend_id: 30,
    };
    const EPOCH: u32 = 4;

    /// [`convert`] with the new ids, at `now_s` seconds.
    fn at(
        key: &LegacyKey,
        forward: &LegacyValue,
        reply: &LegacyValue,
        now_s: u64,
    ) -> Option<Converted> {
        convert(
            key,
            forward,
            reply,
            IDS,
            EPOCH,
            &CtTimeouts::DEFAULT,
            now_s * S,
        )
    }

    #[test]
    fn an_established_flow_keeps_its_backend_under_the_new_ids() {
        let key = forward_key(CLIENT);
        let (forward, reply) = entries(0, None);
        assert_eq!(reply_key(&key, &forward).dst_addr, CLIENT.0);
        let flow = at(&key, &forward, &reply, 200).expect("alive");
        assert!(flow.assured);
        let (fkey, fvalue) = flow.forward;
        assert_eq!(
            (fkey.tuple.src_addr, fkey.tuple.dst_addr),
            (CLIENT.0, VIP.0)
        );
        assert_eq!((fvalue.to.dst_addr, fvalue.to.dst_port), BACKEND);
        assert_eq!(
            (fvalue.rev_nat_id, fvalue.backend_id, fvalue.epoch),
            (70, 30, 4)
        );
        assert_eq!((fvalue.packets, fvalue.bytes), (10, 1_000));
        let (rkey, rvalue) = flow.reply;
        assert_eq!(rkey, CtKey::partner(&fvalue, proto::TCP));
        assert!(fkey.is_mutual(&rvalue) && rkey.is_mutual(&fvalue));
        assert_eq!((rvalue.to.src_addr, rvalue.to.dst_addr), (VIP.0, CLIENT.0));
        assert_eq!(rvalue.flags, ct_flags::REPLY);
        assert_eq!(
            fvalue.expires_ns,
            160 * S + u64::from(CtTimeouts::DEFAULT.tcp_established) * S
        );
    }

    #[test]
    fn snat_and_hairpin_keep_their_peer() {
        let snat_source = (NODE, 61_234u16.to_be());
        let key = forward_key(CLIENT);
        let (forward, reply) = entries(SNAT | LOCAL_FRONTEND, Some(snat_source));
        assert_eq!(
            (
                reply_key(&key, &forward).dst_addr,
                reply_key(&key, &forward).dst_port
            ),
            snat_source
        );
        let flow = at(&key, &forward, &reply, 200).unwrap();
        assert_eq!(
            (flow.reply.0.tuple.dst_addr, flow.reply.0.tuple.dst_port),
            snat_source
        );
        assert_eq!(
            flow.forward.1.flags,
            ct_flags::SNAT | ct_flags::ROUTES_ITSELF
        );
        assert_eq!(
            flow.reply.1.flags,
            ct_flags::SNAT | ct_flags::REPLY | ct_flags::ROUTES_ITSELF
        );

        // A backend reaching itself: its replies go to the frontend address.
        let key = forward_key((BACKEND.0, 40_001u16.to_be()));
        let (forward, reply) = entries(HAIRPIN, None);
        assert_eq!(reply_key(&key, &forward).dst_addr, VIP.0);
        let flow = at(&key, &forward, &reply, 200).unwrap();
        assert_eq!(flow.reply.0.tuple.dst_addr, VIP.0);
        assert_eq!(flow.forward.1.flags, ct_flags::HAIRPIN);
    }

    #[test]
    fn state_follows_what_each_side_sent() {
        let key = forward_key(CLIENT);
        let (forward, mut reply) = entries(0, None);
        reply.packets = 0;
        let unanswered = at(&key, &forward, &reply, 151).unwrap();
        assert!(!unanswered.assured);
        assert_eq!(unanswered.forward.1.state, 0);
        assert!(
            at(&key, &forward, &reply, 400).is_none(),
            "an unanswered SYN expires after 120 s"
        );
        let (forward, reply) = entries(CLOSING, None);
        let closing = at(&key, &forward, &reply, 200).unwrap();
        assert_ne!(closing.forward.1.state & ct_state::CLOSING, 0);
    }
}
