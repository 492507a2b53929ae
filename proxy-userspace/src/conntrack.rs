//! Conntrack garbage collection.
//!
//! The CONNTRACK map is an LRU, so the kernel evicts the oldest entries when it is full;
//! this sweep additionally removes flows that have been idle longer than their timeout,
//! so a closed or abandoned flow does not pin a client's next connection with the same
//! ports to an old backend. A flow's two entries (forward and reply) expire together,
//! judged by the later of their last packets.

use std::collections::HashMap;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use proxy_common::{CtKey, CtValue, ct_dir, ct_flags, proto};

/// Idle timeouts, after netfilter's and kube-proxy's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// kube-proxy's `--conntrack-tcp-timeout-established` default: 24 h.
    pub tcp_established: Duration,
    /// After a FIN or RST.
    pub tcp_closing: Duration,
    /// netfilter's nf_conntrack_udp_timeout_stream: a UDP flow that got replies.
    pub udp_replied: Duration,
    /// netfilter's nf_conntrack_udp_timeout: a UDP flow that never got a reply.
    pub udp_unreplied: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        Self {
            tcp_established: Duration::from_secs(24 * 3600),
            tcp_closing: Duration::from_secs(10),
            udp_replied: Duration::from_secs(120),
            udp_unreplied: Duration::from_secs(30),
        }
    }
}

/// The reply entry that belongs to a forward entry.
pub fn reply_key(forward: &CtKey, value: &CtValue) -> CtKey {
    CtKey {
        src_addr: value.nat_addr,
        dst_addr: forward.src_addr,
        src_port: value.nat_port,
        dst_port: forward.src_port,
        proto: forward.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// The keys of idle flows, given the entries and the current CLOCK_MONOTONIC time.
pub fn expired(
    entries: &HashMap<CtKey, CtValue>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Vec<CtKey> {
    let mut doomed = Vec::new();
    let mut paired_replies = Vec::new();
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::FORWARD) {
        let reply_key = reply_key(key, value);
        let reply = entries.get(&reply_key);
        if reply.is_some() {
            paired_replies.push(reply_key);
        }
        let last_seen = reply.map_or(value.last_seen_ns, |r| {
            r.last_seen_ns.max(value.last_seen_ns)
        });
        let flags = value.flags | reply.map_or(0, |r| r.flags);
        let replied = reply.is_some_and(|r| r.packets > 0);
        if idle_for(now_ns, last_seen) > timeout(key.proto, flags, replied, timeouts) {
            doomed.push(*key);
            if reply.is_some() {
                doomed.push(reply_key);
            }
        }
    }
    // Replies whose forward entry was evicted by the LRU age on their own.
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::REPLY) {
        if !paired_replies.contains(key)
            && idle_for(now_ns, value.last_seen_ns)
                > timeout(key.proto, value.flags, true, timeouts)
        {
            doomed.push(*key);
        }
    }
    doomed
}

fn idle_for(now_ns: u64, last_seen_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(last_seen_ns))
}

fn timeout(protocol: u8, flags: u16, replied: bool, timeouts: &CtTimeouts) -> Duration {
    match protocol {
        proto::TCP if flags & ct_flags::CLOSING != 0 => timeouts.tcp_closing,
        proto::TCP => timeouts.tcp_established,
        _ if replied => timeouts.udp_replied,
        _ => timeouts.udp_unreplied,
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Reads all entries.
pub fn read_all(
    map: &BpfHashMap<MapData, CtKey, CtValue>,
) -> Result<HashMap<CtKey, CtValue>, MapError> {
    let mut entries = HashMap::new();
    for entry in map.iter() {
        match entry {
            Ok((key, value)) => {
                entries.insert(key, value);
            }
            // An entry evicted between listing its key and reading it.
            Err(MapError::KeyNotFound) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(entries)
}

/// Deletes idle flows; returns how many entries were removed.
pub fn sweep(
    map: &mut BpfHashMap<MapData, CtKey, CtValue>,
    timeouts: &CtTimeouts,
) -> Result<usize, MapError> {
    let entries = read_all(map)?;
    let doomed = expired(&entries, monotonic_now_ns(), timeouts);
    let mut removed = 0;
    for key in doomed {
        if map.remove(&key).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn flow(protocol: u8, client_port: u16) -> (CtKey, CtValue) {
        let key = CtKey {
            src_addr: u32::from_ne_bytes([198, 18, 1, 10]),
            dst_addr: u32::from_ne_bytes([198, 19, 0, 10]),
            src_port: client_port.to_be(),
            dst_port: 80u16.to_be(),
            proto: protocol,
            dir: ct_dir::FORWARD,
            _pad: 0,
        };
        let value = CtValue {
            nat_addr: u32::from_ne_bytes([198, 18, 1, 11]),
            nat_port: 8080u16.to_be(),
            packets: 1,
            ..CtValue::default()
        };
        (key, value)
    }

    /// Forward and reply entries of one flow, last seen at the given seconds.
    fn pair(
        protocol: u8,
        forward_seen: u64,
        reply_seen: Option<u64>,
        flags: u16,
    ) -> HashMap<CtKey, CtValue> {
        let (key, mut value) = flow(protocol, 40000);
        value.last_seen_ns = forward_seen * SECOND;
        value.flags = flags;
        let mut entries = HashMap::from([(key, value)]);
        if let Some(seen) = reply_seen {
            let reply = CtValue {
                nat_addr: key.dst_addr,
                nat_port: key.dst_port,
                last_seen_ns: seen * SECOND,
                packets: 1,
                ..CtValue::default()
            };
            entries.insert(reply_key(&key, &value), reply);
        }
        entries
    }

    #[test]
    fn expiry_follows_protocol_state_and_the_later_direction() {
        let t = CtTimeouts::default();
        let tcp = proto::TCP;
        let udp = proto::UDP;
        // (case, entries, now in seconds, expected number of deleted entries)
        let cases = [
            ("fresh tcp flow stays", pair(tcp, 100, Some(100), 0), 200, 0),
            (
                "idle tcp flow past 24h goes, both entries",
                pair(tcp, 0, Some(0), 0),
                86_401,
                2,
            ),
            (
                "recent reply keeps the tcp flow",
                pair(tcp, 0, Some(86_000), 0),
                86_401,
                0,
            ),
            (
                "closing tcp flow goes after 10s",
                pair(tcp, 100, Some(100), ct_flags::CLOSING),
                111,
                2,
            ),
            (
                "closing tcp flow stays within 10s",
                pair(tcp, 100, Some(100), ct_flags::CLOSING),
                105,
                0,
            ),
            ("replied udp stays 120s", pair(udp, 0, Some(0), 0), 100, 0),
            (
                "replied udp goes after 120s",
                pair(udp, 0, Some(0), 0),
                121,
                2,
            ),
            ("unreplied udp goes after 30s", pair(udp, 0, None, 0), 31, 1),
        ];
        for (name, entries, now, deleted) in cases {
            assert_eq!(expired(&entries, now * SECOND, &t).len(), deleted, "{name}");
        }
    }

    #[test]
    fn orphaned_reply_ages_on_its_own() {
        let entries = pair(proto::UDP, 0, Some(0), 0);
        let orphans: HashMap<_, _> = entries
            .into_iter()
            .filter(|(k, _)| k.dir == ct_dir::REPLY)
            .collect();
        let t = CtTimeouts::default();
        assert!(expired(&orphans, 60 * SECOND, &t).is_empty());
        assert_eq!(expired(&orphans, 121 * SECOND, &t).len(), 1);
    }
}
