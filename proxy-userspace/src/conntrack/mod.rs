//! Conntrack from userspace: the flows of both conntrack maps (of either family) paired for
//! listings and flushes, map sizes from the machine's memory, batched reads ([`crate::bpf_batch`]) and the garbage
//! collector ([`gc`]).
//!
//! Which entries belong together, when a flow is over and what state it is in are decided
//! by `proxy_common`'s conntrack rules, the very code the datapath runs.

pub mod gc;

use std::collections::HashMap;

use aya::maps::MapData;
use proxy_common::{Address, CtKey, CtValue, FlowState, ct_state, flow_expired};

/// One of the two conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CtTable {
    /// CONNTRACK: assured flows.
    Assured,
    /// CONNTRACK_PENDING: flows not yet assured, and direct flows to backends.
    Pending,
}

impl CtTable {
    pub const ALL: [CtTable; 2] = [CtTable::Assured, CtTable::Pending];

    pub fn map_name(self) -> &'static str {
        match self {
            CtTable::Assured => proxy_common::map_names::CONNTRACK,
            CtTable::Pending => proxy_common::map_names::CONNTRACK_PENDING,
        }
    }

    /// The map of addresses `A`: IPv4's ([`Self::map_name`]) or IPv6's (CONNTRACK6,
    /// CONNTRACK_PENDING6).
    pub fn map_name_of<A: proxy_common::Address>(self) -> &'static str {
        use proxy_common::map_names::{CONNTRACK_PENDING6, CONNTRACK6};
        match (A::BITS == 32, self) {
            (true, table) => table.map_name(),
            (false, CtTable::Assured) => CONNTRACK6,
            (false, CtTable::Pending) => CONNTRACK_PENDING6,
        }
    }
}

/// An entry read from one of the maps (of the family of addresses `A`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry<A = u32> {
    pub table: CtTable,
    pub key: CtKey<A>,
    pub value: CtValue<A>,
}

/// One flow's entries: the client's with the backend's that belongs to it, or an entry
/// whose partner is gone (evicted, or its key taken over by a newer flow).
#[derive(Clone, Copy, Debug)]
pub struct FlowEntries<'a, A = u32> {
    /// The client's entry (keyed client → frontend).
    pub forward: Option<&'a CtEntry<A>>,
    /// The backend's entry (keyed backend → peer).
    pub reply: Option<&'a CtEntry<A>>,
}

impl<'a, A: Address> FlowEntries<'a, A> {
    /// The entries present (one or two).
    pub fn present(&self) -> impl Iterator<Item = &'a CtEntry<A>> + use<'a, A> {
        self.forward.into_iter().chain(self.reply)
    }

    fn first(&self) -> &'a CtEntry<A> {
        self.present()
            .next()
            .expect("a flow has at least one entry")
    }

    pub fn protocol(&self) -> u8 {
        self.first().key.proto
    }

    /// The flow's state bits (both entries carry them; the union covers a partner that
    /// missed an update).
    pub fn state(&self) -> u64 {
        self.present()
            .fold(0, |state, entry| state | entry.value.state)
    }

    pub fn flow_state(&self) -> FlowState {
        FlowState::of(self.protocol(), self.state())
    }

    /// Closing: a FIN or a reset was seen.
    pub fn is_closing(&self) -> bool {
        self.state() & ct_state::CLOSING != 0
    }

    /// The later expiry of its entries: when the flow ends if it stays idle.
    pub fn expires_ns(&self) -> u64 {
        self.present()
            .map(|entry| entry.value.expires_ns)
            .max()
            .unwrap_or(0)
    }

    /// Whether the flow is over at `now_ns` (the datapath's and the reaper's rule).
    pub fn is_over(&self, now_ns: u64) -> bool {
        let entry = self.first();
        let partner = match (self.forward, self.reply) {
            (Some(_), Some(reply)) => Some(&reply.value),
            _ => None,
        };
        flow_expired(&entry.key, &entry.value, partner, now_ns)
    }

    /// In CONNTRACK (assured), not CONNTRACK_PENDING.
    pub fn is_assured(&self) -> bool {
        self.present().all(|entry| entry.table == CtTable::Assured)
    }

    /// Its translation's flags (`ct_flags`), the same in both entries.
    pub fn flags(&self) -> u8 {
        self.first().value.flags
    }
}

/// Pairs the entries of both maps into flows: each client entry with the backend entry
/// at the reverse of the tuple it rewrites to, when that entry points back; then every
/// backend entry left alone.
pub fn pair_flows<A: Address>(entries: &[CtEntry<A>]) -> Vec<FlowEntries<'_, A>> {
    let by_key: HashMap<CtKey<A>, &CtEntry<A>> = entries.iter().map(|e| (e.key, e)).collect();
    let mut paired = std::collections::HashSet::new();
    let mut flows = Vec::new();
    for forward in entries.iter().filter(|e| !e.value.is_reply()) {
        let reply = by_key
            .get(&CtKey::partner(&forward.value, forward.key.proto))
            .copied()
            .filter(|reply| reply.value.is_reply() && forward.key.is_mutual(&reply.value));
        if let Some(reply) = reply {
            paired.insert(reply.key);
        }
        flows.push(FlowEntries {
            forward: Some(forward),
            reply,
        });
    }
    for reply in entries.iter().filter(|e| e.value.is_reply()) {
        if !paired.contains(&reply.key) {
            flows.push(FlowEntries {
                forward: None,
                reply: Some(reply),
            });
        }
    }
    flows
}

/// Reads every entry of both maps (CONNTRACK's first: a flow caught while it moves from
/// CONNTRACK_PENDING is listed once).
pub fn read_all<A: Address>(maps: &[(CtTable, &MapData)]) -> std::io::Result<Vec<CtEntry<A>>> {
    let mut entries: Vec<CtEntry<A>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (table, map) in maps {
        crate::bpf_batch::for_each_entry(map, 4096, |key: &CtKey<A>, value: &CtValue<A>| {
            if seen.insert(*key) {
                entries.push(CtEntry {
                    table: *table,
                    key: *key,
                    value: *value,
                });
            }
            Ok(())
        })?;
    }
    Ok(entries)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`, which
/// the datapath stamps its expiries with.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The sizes of the two conntrack maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackSizes {
    /// CONNTRACK (assured flows), entries.
    pub assured: u32,
    /// CONNTRACK_PENDING (flows not yet assured), entries.
    pub pending: u32,
}

/// Kernel memory per entry of a preallocated LRU hash map with our key and value: the
/// element header (48 bytes), key (16), value (64) and a bucket (16).
pub const CT_ENTRY_BYTES: u64 = 48 + 16 + 64 + 16;

/// The share of the machine's memory the conntrack maps get by default, as Cilium's
/// `--bpf-map-dynamic-size-ratio` (0.25 %).
pub const DEFAULT_MEMORY_RATIO: f64 = 0.0025;

impl ConntrackSizes {
    /// Bounds of CONNTRACK's size from memory: never below 2^17 entries, never above 2^24.
    const ASSURED_MIN: u64 = 1 << 17;
    const ASSURED_MAX: u64 = 1 << 24;
    /// CONNTRACK_PENDING gets a fifth of the entries, and never fewer than this.
    const PENDING_MIN: u64 = 1 << 14;

    /// Sizes from `ratio` of `memory_bytes`: four fifths of the entries for assured flows,
    /// one fifth for pending ones.
    pub fn from_memory(memory_bytes: u64, ratio: f64) -> Self {
        let entries = (memory_bytes as f64 * ratio / CT_ENTRY_BYTES as f64) as u64;
        let assured = (entries * 4 / 5).clamp(Self::ASSURED_MIN, Self::ASSURED_MAX);
        Self::with_assured(assured as u32)
    }

    /// CONNTRACK sized `assured`, CONNTRACK_PENDING a quarter of that.
    pub fn with_assured(assured: u32) -> Self {
        let pending = (u64::from(assured) / 4).max(Self::PENDING_MIN);
        Self {
            assured,
            pending: pending as u32,
        }
    }
}

impl Default for ConntrackSizes {
    fn default() -> Self {
        Self::with_assured(proxy_common::default_max_entries::CONNTRACK)
    }
}

/// The machine's memory (MemTotal), in bytes.
pub fn total_memory() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::{Translation, ct_flags, proto, service_flags};

    const CLIENT: (u32, u16) = (0x0a00_0001, 40_000);
    const VIP: (u32, u16) = (0x0a00_0064, 80);
    const BACKEND: (u32, u16) = (0x0a00_0002, 8080);

    fn entries(translation: &Translation, table: CtTable, expires: [u64; 2]) -> [CtEntry; 2] {
        [
            CtEntry {
                table,
                key: translation.forward_key(),
                value: translation.forward_entry(0, expires[0]),
            },
            CtEntry {
                table,
                key: translation.reply_key(),
                value: translation.reply_entry(0, expires[1]),
            },
        ]
    }

    #[test]
    fn entries_pair_into_flows_and_lone_ones_stay_alone() {
        let plain = Translation::service(
            proto::TCP,
            CLIENT,
            VIP,
            service_flags::CLUSTER_IP,
            1,
            BACKEND,
            2,
            None,
        );
        let mut remapped = plain;
        remapped.original.src_port = 40_001;
        remapped.remap(61_000);
        let direct = Translation::direct(proto::UDP, CLIENT, BACKEND);
        let [orphan_forward, _] = entries(
            &Translation::service(proto::TCP, (CLIENT.0, 40_002), VIP, 0, 1, BACKEND, 2, None),
            CtTable::Pending,
            [5, 5],
        );
        let mut all = Vec::new();
        all.extend(entries(&plain, CtTable::Assured, [10, 20]));
        all.extend(entries(&remapped, CtTable::Pending, [10, 10]));
        all.extend(entries(&direct, CtTable::Pending, [30, 30]));
        all.push(orphan_forward);
        let flows = pair_flows(&all);
        assert_eq!(flows.len(), 4);
        let paired = flows
            .iter()
            .filter(|f| f.forward.is_some() && f.reply.is_some())
            .count();
        assert_eq!(paired, 3);
        let plain_flow = flows
            .iter()
            .find(|f| f.forward.is_some_and(|e| e.key == plain.forward_key()))
            .unwrap();
        assert!(plain_flow.is_assured());
        assert_eq!(plain_flow.expires_ns(), 20);
        assert!(!plain_flow.is_over(15), "its reply entry lives on");
        assert!(plain_flow.is_over(21));
        let remapped_flow = flows
            .iter()
            .find(|f| f.forward.is_some_and(|e| e.key == remapped.forward_key()))
            .unwrap();
        assert_eq!(remapped_flow.flags(), ct_flags::REMAPPED);
        assert!(!remapped_flow.is_assured());
    }

    #[test]
    fn sizes_follow_memory_within_bounds() {
        let gib = 1u64 << 30;
        // 24 GiB × 0.25 % / 144 B ≈ 447 000 entries: 357 913 assured, a quarter pending.
        let sizes = ConntrackSizes::from_memory(24 * gib, DEFAULT_MEMORY_RATIO);
        assert_eq!(sizes.assured, 357_913);
        assert_eq!(sizes.pending, 357_913 / 4);
        assert_eq!(
            ConntrackSizes::from_memory(gib, DEFAULT_MEMORY_RATIO),
            ConntrackSizes::with_assured(1 << 17)
        );
        assert_eq!(
            ConntrackSizes::from_memory(1 << 50, 0.5).assured,
            1 << 24,
            "capped"
        );
        assert_eq!(ConntrackSizes::with_assured(1000).pending, 1 << 14);
    }

    #[test]
    fn meminfo_has_a_total() {
        assert!(total_memory().unwrap() > 0);
    }
}
