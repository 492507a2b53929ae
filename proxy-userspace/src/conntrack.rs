//! Conntrack garbage collection and cleanup.
//!
//! The CONNTRACK map is an LRU, so the kernel evicts the oldest entries when it is full;
//! this sweep additionally removes flows that have been idle longer than their timeout,
//! so a closed or abandoned flow does not pin a client's next connection with the same
//! ports to an old backend. A flow's two entries (forward and reply) expire together,
//! judged by the later of their last packets.
//!
//! UDP flows are also cleared when their backend stops serving their frontend (kube-proxy's
//! `CleanStaleEntries`): a UDP client that keeps its source port (a DNS resolver) would
//! otherwise keep sending into a backend that is gone, for as long as it keeps sending.
//! TCP flows are left alone: a connection to a vanished backend fails on its own, and one to
//! a terminating backend must keep working.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use proxy_common::{CtKey, CtValue, ct_dir, ct_flags, proto};

use crate::plan::{DesiredState, Frontend, Protocol};

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

/// The reply entry that belongs to a forward entry: addressed to the client, or for a
/// hairpin flow to the frontend address its source became (`ct_flags::HAIRPIN`), or for an
/// SNAT flow to the node address and SNAT port its source became (`ct_flags::SNAT`).
pub fn reply_key(forward: &CtKey, value: &CtValue) -> CtKey {
    let hairpin = value.flags & ct_flags::HAIRPIN != 0;
    let snat = value.flags & ct_flags::SNAT != 0;
    CtKey {
        src_addr: value.nat_addr,
        dst_addr: if snat {
            value.snat_addr
        } else if hairpin {
            forward.dst_addr
        } else {
            forward.src_addr
        },
        src_port: value.nat_port,
        dst_port: if snat {
            value.snat_port
        } else {
            forward.src_port
        },
        proto: forward.proto,
        dir: ct_dir::REPLY,
        _pad: 0,
    }
}

/// One flow's conntrack entries: its FORWARD entry with the REPLY entry that belongs to
/// it, or a lone REPLY entry whose FORWARD entry the LRU evicted.
pub struct FlowEntries<'a> {
    pub forward: Option<(CtKey, &'a CtValue)>,
    pub reply: Option<(CtKey, &'a CtValue)>,
}

impl<'a> FlowEntries<'a> {
    /// The entries present (one or two).
    pub fn present(&self) -> impl Iterator<Item = (CtKey, &'a CtValue)> + use<'a> {
        self.forward.into_iter().chain(self.reply)
    }

    /// The flow's protocol (the same in both entries).
    pub fn protocol(&self) -> u8 {
        self.present().next().map_or(0, |(key, _)| key.proto)
    }
}

/// Pairs the entries into flows, in one pass over the forward entries and one over the
/// replies (a map of hundreds of thousands of entries is swept every few seconds).
pub fn pair_flows(entries: &HashMap<CtKey, CtValue>) -> Vec<FlowEntries<'_>> {
    let mut paired = HashSet::new();
    let mut flows = Vec::new();
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::FORWARD) {
        let reply = entries
            .get_key_value(&reply_key(key, value))
            .map(|(reply_key, reply)| (*reply_key, reply));
        if let Some((reply_key, _)) = reply {
            paired.insert(reply_key);
        }
        flows.push(FlowEntries {
            forward: Some((*key, value)),
            reply,
        });
    }
    for (key, value) in entries.iter().filter(|(k, _)| k.dir == ct_dir::REPLY) {
        if !paired.contains(key) {
            flows.push(FlowEntries {
                forward: None,
                reply: Some((*key, value)),
            });
        }
    }
    flows
}

/// How long `flow` may stay idle: judged by its later direction and all its flags. A lone
/// reply counts as replied.
pub fn flow_timeout(flow: &FlowEntries, timeouts: &CtTimeouts) -> Duration {
    let flags = flow
        .present()
        .fold(0, |flags, (_, value)| flags | value.flags);
    let replied = match (flow.forward, flow.reply) {
        (Some(_), reply) => reply.is_some_and(|(_, reply)| reply.packets > 0),
        (None, _) => true,
    };
    idle_timeout(flow.protocol(), flags, replied, timeouts)
}

/// CLOCK_MONOTONIC time of the flow's latest packet in either direction.
pub fn flow_last_seen_ns(flow: &FlowEntries) -> u64 {
    flow.present()
        .map(|(_, value)| value.last_seen_ns)
        .max()
        .unwrap_or(0)
}

/// The keys of idle flows (both entries of each), given the entries and the current
/// CLOCK_MONOTONIC time.
pub fn expired(
    entries: &HashMap<CtKey, CtValue>,
    now_ns: u64,
    timeouts: &CtTimeouts,
) -> Vec<CtKey> {
    pair_flows(entries)
        .iter()
        .filter(|flow| idle_for(now_ns, flow_last_seen_ns(flow)) > flow_timeout(flow, timeouts))
        .flat_map(|flow| flow.present().map(|(key, _)| key))
        .collect()
}

fn idle_for(now_ns: u64, last_seen_ns: u64) -> Duration {
    Duration::from_nanos(now_ns.saturating_sub(last_seen_ns))
}

/// How long a flow may stay idle, by protocol and state.
fn idle_timeout(protocol: u8, flags: u16, replied: bool, timeouts: &CtTimeouts) -> Duration {
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
) -> Result<SweepReport, MapError> {
    let entries = read_all(map)?;
    let doomed = expired(&entries, monotonic_now_ns(), timeouts);
    let mut removed = 0;
    for key in doomed {
        if map.remove(&key).is_ok() {
            removed += 1;
        }
    }
    Ok(SweepReport {
        removed,
        remaining: entries.len() - removed,
    })
}

/// What one [`sweep`] did; `remaining` doubles as the map's fill level.
#[derive(Clone, Copy, Debug)]
pub struct SweepReport {
    pub removed: usize,
    pub remaining: usize,
}

/// The entries (both directions) of UDP flows whose backend address is not among the
/// serving addresses of their frontend — all of them when none serves, as kube-proxy's
/// `CleanStaleEntries` clears them: the client's next datagram is then refused at once
/// instead of going on into a backend that stopped serving.
pub fn stale_udp_flows(entries: &HashMap<CtKey, CtValue>, desired: &DesiredState) -> Vec<CtKey> {
    entries
        .iter()
        .filter(|(key, _)| key.proto == proto::UDP)
        .filter(|(key, value)| {
            let (frontend_addr, frontend_port, backend_addr) = match key.dir {
                ct_dir::FORWARD => (key.dst_addr, key.dst_port, value.nat_addr),
                _ => (value.nat_addr, value.nat_port, key.src_addr),
            };
            let frontend = Frontend {
                addr: Ipv4Addr::from(frontend_addr.to_ne_bytes()),
                port: u16::from_be(frontend_port),
                protocol: Protocol::Udp,
            };
            desired.frontends.get(&frontend).is_some_and(|plan| {
                !plan
                    .serving_addrs
                    .contains(&Ipv4Addr::from(backend_addr.to_ne_bytes()))
            })
        })
        .map(|(key, _)| *key)
        .collect()
}

/// Runs the UDP cleanup only when it can find something: reading the whole conntrack map
/// costs two syscalls per entry, and most syncs only add endpoints or touch TCP.
#[derive(Debug, Default)]
pub struct UdpCleanup {
    /// The serving addresses of each UDP frontend when the map was last cleaned.
    cleaned_against: BTreeMap<Frontend, Vec<Ipv4Addr>>,
}

impl UdpCleanup {
    /// Whether a UDP frontend of `desired` may have flows to an address that no longer
    /// serves it: one lost a serving address (its last one included), or is new to us
    /// (after a restart, flows from before are unknown).
    pub fn needed(&self, desired: &DesiredState) -> bool {
        desired
            .frontends
            .iter()
            .filter(|(frontend, _)| frontend.protocol == Protocol::Udp)
            .any(
                |(frontend, plan)| match self.cleaned_against.get(frontend) {
                    Some(before) => before.iter().any(|addr| !plan.serving_addrs.contains(addr)),
                    None => true,
                },
            )
    }

    /// Deletes the stale UDP flows of `desired` if [`needed`](Self::needed); returns how
    /// many entries went.
    pub fn run(
        &mut self,
        map: &mut BpfHashMap<MapData, CtKey, CtValue>,
        desired: &DesiredState,
    ) -> Result<usize, MapError> {
        if !self.needed(desired) {
            return Ok(0);
        }
        let stale = stale_udp_flows(&read_all(map)?, desired);
        let removed = stale.iter().filter(|key| map.remove(key).is_ok()).count();
        self.cleaned_against = desired
            .frontends
            .iter()
            .filter(|(frontend, _)| frontend.protocol == Protocol::Udp)
            .map(|(frontend, plan)| (*frontend, plan.serving_addrs.clone()))
            .collect();
        Ok(removed)
    }

    /// Makes the next [`run`](Self::run) read the map whatever changed: the periodic
    /// resync uses it to catch a flow created by a packet that raced a map update.
    pub fn forget(&mut self) {
        self.cleaned_against.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{BackendAddr, EmptyFrontend, FrontendKind, FrontendPlan, ServicePortName};

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

    #[test]
    fn reply_key_of_a_hairpin_flow_is_addressed_to_the_frontend() {
        let (key, mut value) = flow(proto::TCP, 40000);
        assert_eq!(reply_key(&key, &value).dst_addr, key.src_addr);
        value.flags = ct_flags::HAIRPIN;
        let reply = reply_key(&key, &value);
        assert_eq!(
            (reply.src_addr, reply.src_port),
            (value.nat_addr, value.nat_port)
        );
        assert_eq!(
            (reply.dst_addr, reply.dst_port),
            (key.dst_addr, key.src_port)
        );
    }

    #[test]
    fn reply_key_of_an_snat_flow_is_addressed_to_the_node_address_and_port() {
        let (key, mut value) = flow(proto::TCP, 40000);
        value.flags = ct_flags::SNAT | ct_flags::LOCAL_FRONTEND;
        value.snat_addr = u32::from_ne_bytes([198, 18, 0, 1]);
        value.snat_port = 61000u16.to_be();
        let reply = reply_key(&key, &value);
        assert_eq!(
            (reply.src_addr, reply.src_port),
            (value.nat_addr, value.nat_port)
        );
        assert_eq!(
            (reply.dst_addr, reply.dst_port),
            (value.snat_addr, value.snat_port)
        );
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

    /// A UDP frontend serving from `serving` (last octets of 198.18.1.x).
    fn udp_frontend(addr: [u8; 4], port: u16, serving: &[u8]) -> (Frontend, FrontendPlan) {
        let frontend = Frontend {
            addr: Ipv4Addr::from(addr),
            port,
            protocol: Protocol::Udp,
        };
        let serving_addrs: Vec<Ipv4Addr> = serving
            .iter()
            .map(|octet| Ipv4Addr::new(198, 18, 1, *octet))
            .collect();
        let plan = FrontendPlan {
            service: ServicePortName {
                namespace: "kube-system".into(),
                name: "dns".into(),
                port_name: "dns".into(),
            },
            kind: FrontendKind::ClusterIp,
            backends: serving_addrs
                .iter()
                .map(|addr| BackendAddr {
                    addr: *addr,
                    port: 5353,
                })
                .collect(),
            when_empty: EmptyFrontend::Reject,
            session_affinity: None,
            serving_addrs,
            source_ranges: Vec::new(),
        };
        (frontend, plan)
    }

    fn desired(frontends: &[(Frontend, FrontendPlan)]) -> DesiredState {
        DesiredState {
            frontends: frontends.iter().cloned().collect(),
        }
    }

    const DNS_VIP: [u8; 4] = [198, 19, 0, 53];

    /// The forward and reply entries of a flow from client port `port` to `frontend`,
    /// translated to 198.18.1.`backend`:5353.
    fn translated_flow(
        protocol: u8,
        frontend: ([u8; 4], u16),
        port: u16,
        backend: u8,
    ) -> [(CtKey, CtValue); 2] {
        let client = u32::from_ne_bytes([198, 18, 1, 20]);
        let (vip, vip_port) = frontend;
        let backend_addr = u32::from_ne_bytes([198, 18, 1, backend]);
        let forward = CtKey {
            src_addr: client,
            dst_addr: u32::from_ne_bytes(vip),
            src_port: port.to_be(),
            dst_port: vip_port.to_be(),
            proto: protocol,
            dir: ct_dir::FORWARD,
            _pad: 0,
        };
        let forward_value = CtValue {
            nat_addr: backend_addr,
            nat_port: 5353u16.to_be(),
            ..CtValue::default()
        };
        let reply_value = CtValue {
            nat_addr: forward.dst_addr,
            nat_port: forward.dst_port,
            ..CtValue::default()
        };
        [
            (forward, forward_value),
            (reply_key(&forward, &forward_value), reply_value),
        ]
    }

    #[test]
    fn udp_flows_to_addresses_that_no_longer_serve_are_stale_in_both_directions() {
        let dns = (DNS_VIP, 53);
        let other = ([198, 19, 0, 54], 53);
        let entries: HashMap<CtKey, CtValue> = [
            translated_flow(proto::UDP, dns, 40_000, 10), // backend left
            translated_flow(proto::UDP, dns, 40_001, 11), // still serving
            translated_flow(proto::TCP, dns, 40_002, 10), // TCP: never cleared here
            translated_flow(proto::UDP, other, 40_003, 10), // no endpoint serves any more
            translated_flow(proto::UDP, ([198, 19, 0, 55], 53), 40_004, 10), // not planned
        ]
        .into_iter()
        .flatten()
        .collect();
        let state = desired(&[
            udp_frontend(DNS_VIP, 53, &[11, 12]),
            udp_frontend([198, 19, 0, 54], 53, &[]),
        ]);
        let order = |key: &CtKey| (key.dir, key.src_port, key.dst_port);
        let mut stale = stale_udp_flows(&entries, &state);
        stale.sort_by_key(order);
        let mut expected: Vec<CtKey> = [
            translated_flow(proto::UDP, dns, 40_000, 10),
            translated_flow(proto::UDP, other, 40_003, 10),
        ]
        .iter()
        .flatten()
        .map(|(key, _)| *key)
        .collect();
        expected.sort_by_key(order);
        assert_eq!(stale, expected);
    }

    #[test]
    fn orphaned_reply_of_a_stale_udp_flow_is_found_on_its_own() {
        let [_, reply] = translated_flow(proto::UDP, (DNS_VIP, 53), 40_000, 10);
        let entries = HashMap::from([reply]);
        let state = desired(&[udp_frontend(DNS_VIP, 53, &[11])]);
        assert_eq!(stale_udp_flows(&entries, &state), [reply.0]);
    }

    #[test]
    fn udp_cleanup_reads_the_map_only_when_a_serving_address_may_have_left() {
        let cleaned = |frontends: &[(Frontend, FrontendPlan)]| UdpCleanup {
            cleaned_against: desired(frontends)
                .frontends
                .into_iter()
                .map(|(frontend, plan)| (frontend, plan.serving_addrs))
                .collect(),
        };
        let tcp = {
            let (mut frontend, plan) = udp_frontend([198, 19, 0, 80], 80, &[10]);
            frontend.protocol = Protocol::Tcp;
            (frontend, plan)
        };
        // (case, cleaned against, now, cleanup needed)
        let cases = [
            (
                "first sync (after a start)",
                UdpCleanup::default(),
                vec![udp_frontend(DNS_VIP, 53, &[10])],
                true,
            ),
            (
                "nothing changed",
                cleaned(&[udp_frontend(DNS_VIP, 53, &[10, 11])]),
                vec![udp_frontend(DNS_VIP, 53, &[10, 11])],
                false,
            ),
            (
                "an address was added",
                cleaned(&[udp_frontend(DNS_VIP, 53, &[10])]),
                vec![udp_frontend(DNS_VIP, 53, &[10, 11])],
                false,
            ),
            (
                "an address left",
                cleaned(&[udp_frontend(DNS_VIP, 53, &[10, 11])]),
                vec![udp_frontend(DNS_VIP, 53, &[11])],
                true,
            ),
            (
                "the last address left: its flows go, as kube-proxy clears them",
                cleaned(&[udp_frontend(DNS_VIP, 53, &[10])]),
                vec![udp_frontend(DNS_VIP, 53, &[])],
                true,
            ),
            (
                "endpoints are back after none (their flows went then)",
                cleaned(&[udp_frontend(DNS_VIP, 53, &[])]),
                vec![udp_frontend(DNS_VIP, 53, &[12])],
                false,
            ),
            (
                "only TCP frontends",
                UdpCleanup::default(),
                vec![tcp],
                false,
            ),
        ];
        for (name, cleanup, now, needed) in cases {
            assert_eq!(cleanup.needed(&desired(&now)), needed, "{name}");
        }
        let mut forgetful = cleaned(&[udp_frontend(DNS_VIP, 53, &[10])]);
        forgetful.forget();
        assert!(forgetful.needed(&desired(&[udp_frontend(DNS_VIP, 53, &[10])])));
    }
}
