//! The packet generator: a seeded sequence of frames, each a pure function of the seed and
//! the frames before it (fragments of one datagram come in a row), so a seed and a count
//! reproduce a run's input. It aims at the program's corners rather than at random bytes
//! alone: well-formed TCP, UDP and SCTP between the node's clients, frontends, backends and SNAT
//! ports (so flows form, are answered and reused), the same with one to three mutations
//! (truncated at any length, IPv4 options, bad lengths, header lengths and versions,
//! fragment bits, other protocols and EtherTypes, VLAN tags, zero ports, bad checksums,
//! flipped bits, trailing bytes), ICMP errors quoting the node's flows, fragment series
//! of datagrams to frontends, and random bytes; and a share of IPv6 frames of the same
//! kinds ([`ipv6`]).
//!
//! Frames are never shorter than an Ethernet header: BPF_PROG_TEST_RUN refuses those for
//! a tc program, which the kernel never hands one either.

use std::collections::VecDeque;

use proxy_common::{CtKey, REAP_BATCH, ReapRequest, proto, sctp, tcp_flags, trace_table};
use proxy_lab::Rng;

#[path = "generate6.rs"]
mod ipv6;

use crate::cluster::Pools;
use crate::datapath::wire::{
    ETH_LEN, End, Ipv4Spec, ethernet, fix_ip_checksum, frame, icmp, sctp_packet, segment, tuple,
};

/// One generated frame.
#[derive(Clone, Debug)]
pub struct Generated {
    pub frame: Vec<u8>,
    /// What was generated, for the summary and for a failure report.
    pub kind: &'static str,
    /// For a fragment: the key of the datagram it belongs to.
    pub datagram: Option<CtKey>,
}

/// The share of IPv6 frames, in percent.
const IPV6_SHARE: usize = 20;
/// Client ports: a few, so flows are reused.
const CLIENT_PORTS: [u16; 6] = [40_000, 40_001, 40_002, 40_003, 33_000, 1_024];
/// An address a router would send ICMP errors from.
const ROUTER: [u8; 4] = [198, 18, 0, 254];

pub struct Generator {
    rng: Rng,
    pools: Pools,
    /// Fragments of a datagram not yet handed out.
    queue: VecDeque<Generated>,
    next_id: u16,
}

impl Generator {
    pub fn new(seed: u64, pools: Pools) -> Self {
        Self {
            rng: Rng::new(seed),
            pools,
            queue: VecDeque::new(),
            next_id: 1,
        }
    }

    pub fn next_frame(&mut self) -> Generated {
        if let Some(fragment) = self.queue.pop_front() {
            return fragment;
        }
        if self.rng.below(100) < IPV6_SHARE {
            return self.ipv6();
        }
        match self.rng.below(100) {
            0..45 => {
                let (frame, kind) = self.transport();
                Generated {
                    frame,
                    kind,
                    datagram: None,
                }
            }
            45..75 => {
                let (mut frame, _) = self.transport();
                let kind = self.mutate(&mut frame);
                Generated {
                    frame,
                    kind,
                    datagram: None,
                }
            }
            75..83 => self.icmp(),
            83..89 => self.fragments(),
            89..95 => Generated {
                frame: self.some_bytes(ETH_LEN, 200),
                kind: "random bytes",
                datagram: None,
            },
            _ => self.random_ipv4(),
        }
    }

    /// A request for `epx_ct_reap`: its header and keys, mostly of flows the node may
    /// hold (`recent`), sometimes cut short, overlong or garbage.
    pub fn reap_request(&mut self, recent: &[CtKey]) -> Vec<u8> {
        let table = match self.rng.below(10) {
            0..4 => u32::from(trace_table::ASSURED),
            4..8 => u32::from(trace_table::PENDING),
            _ => self.rng.next_u64() as u32,
        };
        let keys = match self.rng.below(20) {
            0 => REAP_BATCH + 1,
            1 => REAP_BATCH,
            _ => self.rng.below(9),
        };
        let count = match self.rng.below(10) {
            0 => self.rng.next_u64() as u32,
            1 => self.rng.below(REAP_BATCH + 2) as u32,
            _ => keys as u32,
        };
        let request = ReapRequest {
            table,
            count,
            bits: 32,
            _pad: 0,
        };
        let mut bytes = as_bytes(&request).to_vec();
        for _ in 0..keys {
            let key = if recent.is_empty() || self.rng.below(4) == 0 {
                let mut key = CtKey::default();
                key.tuple.src_addr = self.rng.next_u64() as u32;
                key.tuple.dst_addr = self.rng.next_u64() as u32;
                key.tuple.src_port = self.rng.next_u64() as u16;
                key.tuple.dst_port = self.rng.next_u64() as u16;
                key.proto = self.pick(&[proto::TCP, proto::UDP, proto::SCTP, 1, 0]);
                key
            } else {
                recent[self.rng.below(recent.len())]
            };
            bytes.extend_from_slice(as_bytes(&key));
        }
        match self.rng.below(10) {
            0 => bytes.truncate(ETH_LEN.max(self.rng.below(bytes.len() + 1))),
            1 => bytes.extend(self.some_bytes(1, 31)),
            _ => {}
        }
        bytes
    }

    /// Whether time passes for a flow before the next reap request: none (mostly), its
    /// entry alone, or the whole flow (both entries).
    pub fn aging(&mut self) -> Option<bool> {
        match self.rng.below(8) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// A well-formed TCP, UDP or SCTP frame between the node's kinds of ends.
    fn transport(&mut self) -> (Vec<u8>, &'static str) {
        let protocol = self.protocol();
        let (src, dst, kind) = self.ends(protocol);
        let mut ip = Ipv4Spec::new(src.addr, dst.addr, protocol);
        self.vary_header(&mut ip);
        let payload = self.payload();
        let segment = self.segment(&ip, src, dst, &payload);
        (frame(&ip, &segment), kind)
    }

    fn protocol(&mut self) -> u8 {
        match self.rng.below(100) {
            0..45 => proto::TCP,
            45..85 => proto::UDP,
            _ => proto::SCTP,
        }
    }

    /// The L4 packet of `ip.protocol`: TCP with chosen flags, UDP or SCTP with a chosen
    /// chunk, now and then without a checksum (UDP's "none", SCTP's left to the device).
    fn segment(&mut self, ip: &Ipv4Spec, src: End, dst: End, payload: &[u8]) -> Vec<u8> {
        let checksum = self.rng.below(10) != 0;
        if ip.protocol == proto::SCTP {
            let chunk = self.sctp_chunk();
            return sctp_packet(src.port, dst.port, chunk, payload, checksum);
        }
        let flags = self.tcp_flags();
        segment(ip, src.port, dst.port, flags, payload, checksum)
    }

    /// An association's chunks, the ones that change its state most.
    fn sctp_chunk(&mut self) -> u8 {
        use sctp::chunk::{ABORT, INIT, INIT_ACK, SHUTDOWN, SHUTDOWN_ACK, SHUTDOWN_COMPLETE};
        const DATA: u8 = 0;
        const COOKIE_ECHO: u8 = 10;
        match self.rng.below(100) {
            0..30 => INIT,
            30..45 => INIT_ACK,
            45..65 => DATA,
            65..72 => COOKIE_ECHO,
            72..78 => SHUTDOWN,
            78..84 => SHUTDOWN_ACK,
            84..90 => ABORT,
            90..94 => SHUTDOWN_COMPLETE,
            _ => self.rng.next_u64() as u8,
        }
    }

    /// Source and destination: mostly what the node meets (clients to frontends, backends
    /// answering clients and SNAT ports, clients straight to backends), and strays.
    fn ends(&mut self, protocol: u8) -> (End, End, &'static str) {
        let client = End::new(self.client(), self.client_port());
        match self.rng.below(100) {
            0..40 => (client, self.frontend(protocol), "to a frontend"),
            40..55 => (self.backend(protocol), client, "backend to client"),
            55..63 => {
                let snat = End::new(self.pools.node, self.snat_port());
                (self.backend(protocol), snat, "backend to an SNAT port")
            }
            63..73 => (client, self.backend(protocol), "client to a backend"),
            73..80 => {
                let frontend = self.frontend(protocol);
                let stray = End::new(frontend.addr, self.port());
                (client, stray, "to a frontend address, another port")
            }
            80..90 => {
                let src = self.any_end(protocol);
                (src, self.any_end(protocol), "between known ends")
            }
            _ => (
                End::new(self.address(), self.port()),
                End::new(self.address(), self.port()),
                "between random ends",
            ),
        }
    }

    fn any_end(&mut self, protocol: u8) -> End {
        match self.rng.below(5) {
            0 => self.frontend(protocol),
            1 => self.backend(protocol),
            2 => End::new(self.client(), self.client_port()),
            3 => End::new(self.pools.node, self.snat_port()),
            _ => End::new(self.address(), self.port()),
        }
    }

    /// A frontend, of the protocol mostly.
    fn frontend(&mut self, protocol: u8) -> End {
        let wanted = self.rng.below(10) != 0;
        let candidates: Vec<End> = (self.pools.frontends.iter())
            .filter(|(_, p)| !wanted || *p == protocol)
            .map(|(end, _)| *end)
            .collect();
        candidates[self.rng.below(candidates.len())]
    }

    fn backend(&mut self, protocol: u8) -> End {
        let candidates: Vec<End> = (self.pools.backends.iter())
            .filter(|(_, p)| *p == protocol)
            .map(|(end, _)| *end)
            .collect();
        candidates[self.rng.below(candidates.len())]
    }

    fn client(&mut self) -> [u8; 4] {
        self.pools.clients[self.rng.below(self.pools.clients.len())]
    }

    fn client_port(&mut self) -> u16 {
        match self.rng.below(20) {
            0 => 0,
            1 => self.port(),
            _ => CLIENT_PORTS[self.rng.below(CLIENT_PORTS.len())],
        }
    }

    fn snat_port(&mut self) -> u16 {
        let (min, max) = self.pools.snat_ports;
        min + self.rng.below(usize::from(max - min) + 1) as u16
    }

    fn port(&mut self) -> u16 {
        match self.rng.below(10) {
            0 => 0,
            1 => 65_535,
            _ => self.rng.next_u64() as u16,
        }
    }

    /// An address of 198.18.0.0/15 mostly, anything sometimes.
    fn address(&mut self) -> [u8; 4] {
        let value = self.rng.next_u64() as u32;
        if self.rng.below(4) == 0 {
            value.to_be_bytes()
        } else {
            [
                198,
                18 + (value >> 24) as u8 % 2,
                (value >> 8) as u8,
                value as u8,
            ]
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        use tcp_flags::{ACK, FIN, RST, SYN};
        match self.rng.below(100) {
            0..35 => SYN,
            35..55 => ACK,
            55..70 => SYN | ACK,
            70..78 => FIN | ACK,
            78..85 => RST,
            85..90 => RST | ACK,
            _ => self.rng.next_u64() as u8,
        }
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 0,
            1 => 200 + self.rng.below(1_000),
            _ => self.rng.below(64),
        };
        self.bytes(len)
    }

    /// TTL, TOS, identification, DF and IPv4 options.
    fn vary_header(&mut self, ip: &mut Ipv4Spec) {
        ip.ttl = match self.rng.below(20) {
            0 => 0,
            1 => 1,
            2 => 255,
            _ => 64,
        };
        ip.tos = if self.rng.below(10) == 0 {
            self.rng.next_u64() as u8
        } else {
            0
        };
        ip.identification = self.rng.next_u64() as u16;
        ip.dont_fragment = self.rng.below(2) == 0;
        if self.rng.below(100) < 15 {
            ip.options = self.options();
        }
    }

    /// 4 to 40 bytes of IPv4 options: NOPs and an end, a record-route, or junk.
    fn options(&mut self) -> Vec<u8> {
        let len = 4 * (1 + self.rng.below(10));
        match self.rng.below(3) {
            0 => {
                let mut options = vec![1; len];
                options[len - 1] = 0;
                options
            }
            1 => {
                let mut options = vec![7, len as u8 - 1, 4];
                options.resize(len, 0);
                options
            }
            _ => self.bytes(len),
        }
    }

    /// One to three mutations of a well-formed frame; the name of the first.
    fn mutate(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let mut first = None;
        for _ in 0..1 + self.rng.below(3) {
            let kind = self.mutation(frame);
            first.get_or_insert(kind);
        }
        first.unwrap_or("mutated")
    }

    fn mutation(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let ip = ETH_LEN;
        let refix = self.rng.below(2) == 0;
        let fix = |frame: &mut Vec<u8>| {
            if refix {
                fix_ip_checksum(frame)
            }
        };
        match self.rng.below(14) {
            0 => {
                let len = ETH_LEN + self.rng.below(frame.len() - ETH_LEN + 1);
                frame.truncate(len);
                "truncated"
            }
            1 if frame.len() > ip => {
                frame[ip] = (frame[ip] & 0xf0) | self.rng.below(16) as u8;
                fix(frame);
                "header length"
            }
            2 if frame.len() > ip => {
                frame[ip] = ((self.rng.below(16) as u8) << 4) | (frame[ip] & 0x0f);
                fix(frame);
                "IP version"
            }
            3 if frame.len() > ip + 4 => {
                let total = u16::from_be_bytes([frame[ip + 2], frame[ip + 3]]);
                let bad = match self.rng.below(4) {
                    0 => 0,
                    1 => u16::MAX,
                    2 => total.wrapping_add(1 + self.rng.below(64) as u16),
                    _ => total.saturating_sub(1 + self.rng.below(64) as u16),
                };
                frame[ip + 2..ip + 4].copy_from_slice(&bad.to_be_bytes());
                fix(frame);
                "total length"
            }
            4 if frame.len() > ip + 8 => {
                let offset = match self.rng.below(3) {
                    0 => 0x2000,
                    1 => 1 + self.rng.below(0x1fff) as u16,
                    _ => 0x2000 | self.rng.below(0x2000) as u16,
                };
                frame[ip + 6..ip + 8].copy_from_slice(&offset.to_be_bytes());
                fix_ip_checksum(frame);
                "fragment bits"
            }
            5 if frame.len() > ip + 10 => {
                frame[ip + 9] = self.pick(&[0, 1, 2, 4, 41, 47, 50, 58, 132, 255]);
                fix(frame);
                "protocol"
            }
            6 if frame.len() > ip + 12 => {
                frame[ip + 10] ^= 1 + self.rng.below(255) as u8;
                "IP checksum"
            }
            7 => {
                let at = ip + 20 + self.rng.below(24);
                if let Some(byte) = frame.get_mut(at) {
                    *byte ^= 1 + self.rng.below(255) as u8;
                }
                "L4 bytes"
            }
            8 => {
                self.ethertype(frame);
                "EtherType or VLAN"
            }
            9 => {
                for _ in 0..1 + self.rng.below(8) {
                    let at = self.rng.below(frame.len());
                    frame[at] ^= 1 << self.rng.below(8);
                }
                "bit flips"
            }
            10 => {
                let tail = self.some_bytes(1, 64);
                frame.extend(tail);
                "trailing bytes"
            }
            11 => {
                let header_len = usize::from(frame.get(ip).copied().unwrap_or(0x45) & 0x0f) * 4;
                if let Some(byte) = frame.get_mut(ip + header_len + 12) {
                    *byte = (self.rng.below(16) as u8) << 4;
                }
                "TCP data offset"
            }
            12 => {
                let header_len = usize::from(frame.get(ip).copied().unwrap_or(0x45) & 0x0f) * 4;
                let at = ip + header_len + 2 * self.rng.below(2);
                if let Some(port) = frame.get_mut(at..at + 2) {
                    port.fill(0);
                }
                "zero port"
            }
            _ => {
                let at = self.rng.below(frame.len());
                frame[at] = self.pick(&[0, 0xff]);
                "byte set"
            }
        }
    }

    /// Another EtherType, or one or two VLAN tags in front of the IPv4 header.
    fn ethertype(&mut self, frame: &mut Vec<u8>) {
        let tag = |tpid: [u8; 2], tci: u16| [tpid[0], tpid[1], (tci >> 8) as u8, tci as u8];
        match self.rng.below(5) {
            0 => frame[12..14].copy_from_slice(&[0x08, 0x06]),
            1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
            2 => {
                let vlan = tag([0x81, 0x00], self.rng.next_u64() as u16);
                frame.splice(12..12, vlan);
            }
            3 => {
                let outer = tag([0x88, 0xa8], self.rng.next_u64() as u16);
                let inner = tag([0x81, 0x00], self.rng.next_u64() as u16);
                frame.splice(12..12, [outer, inner].concat());
            }
            _ => {
                let ethertype = self.rng.next_u64() as u16;
                frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
        }
    }

    /// An ICMP error quoting a packet of the node's kinds of flows (in either direction),
    /// or an echo.
    fn icmp(&mut self) -> Generated {
        let (quoted, _) = self.transport();
        let inner = &quoted[ETH_LEN..];
        let header_len = usize::from(inner[0] & 0x0f) * 4;
        let quote_len = match self.rng.below(6) {
            0 => self.rng.below(header_len + 8),
            1 => inner.len(),
            _ => header_len + 8,
        }
        .min(inner.len());
        let quote = &inner[..quote_len];
        let (kind, code, rest, name) = match self.rng.below(10) {
            0..4 => (3, 3, [0; 4], "ICMP port unreachable"),
            4..6 => (3, 4, [0, 0, 0x05, 0xdc], "ICMP fragmentation needed"),
            6 => (3, self.rng.below(16) as u8, [0; 4], "ICMP unreachable"),
            7 => (11, 0, [0; 4], "ICMP time exceeded"),
            8 => (12, 0, [0; 4], "ICMP parameter problem"),
            _ => (8, 0, [0, 1, 0, 1], "ICMP echo"),
        };
        let quoted_src: [u8; 4] = inner[12..16].try_into().expect("4 bytes");
        let quoted_dst: [u8; 4] = inner[16..20].try_into().expect("4 bytes");
        // Errors go back to the quoted packet's sender, from its receiver or a router.
        let from = if self.rng.below(3) == 0 {
            ROUTER
        } else {
            quoted_dst
        };
        let ip = Ipv4Spec::new(from, quoted_src, 1);
        let message = if kind == 8 {
            icmp(kind, code, rest, &self.some_bytes(0, 56))
        } else {
            icmp(kind, code, rest, quote)
        };
        Generated {
            frame: frame(&ip, &message),
            kind: name,
            datagram: None,
        }
    }

    /// The fragments of a datagram (2 to 4), queued: in order, reversed or shuffled, one
    /// sometimes lost or repeated, a later one now and then with a TTL of 1. Returns the
    /// first to go out.
    fn fragments(&mut self) -> Generated {
        let protocol = self.protocol();
        let (src, dst, _) = self.ends(protocol);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let mut ip = Ipv4Spec::new(src.addr, dst.addr, protocol);
        ip.identification = id;
        ip.dont_fragment = false;
        let payload = self.some_bytes(40, 560);
        let whole = self.segment(&ip, src, dst, &payload);
        let pieces = 2 + self.rng.below(3);
        let step = (whole.len() / pieces).max(8) / 8 * 8;
        let mut fragments = Vec::new();
        let mut offset = 0;
        while offset < whole.len() {
            let end = if fragments.len() + 1 == pieces {
                whole.len()
            } else {
                (offset + step).min(whole.len())
            };
            let mut piece = ip.clone();
            piece.fragment_offset = (offset / 8) as u16;
            piece.more_fragments = end < whole.len();
            // Now and then a later fragment whose TTL runs out here (it took another path):
            // no error may be sent about it.
            if offset > 0 && self.rng.below(8) == 0 {
                piece.ttl = 1;
            }
            fragments.push(Generated {
                frame: frame(&piece, &whole[offset..end]),
                kind: if offset == 0 {
                    "first fragment"
                } else {
                    "later fragment"
                },
                datagram: Some(CtKey::new(tuple(src, dst), protocol)),
            });
            offset = end;
        }
        self.shuffle(&mut fragments);
        self.queue.extend(fragments);
        self.queue.pop_front().unwrap_or_else(|| self.random_ipv4())
    }

    /// The order a datagram's fragments go out in: as cut mostly, reversed or shuffled,
    /// one sometimes lost or repeated.
    fn shuffle(&mut self, fragments: &mut Vec<Generated>) {
        match self.rng.below(10) {
            0 => fragments.reverse(),
            1 => {
                for index in (1..fragments.len()).rev() {
                    fragments.swap(index, self.rng.below(index + 1));
                }
            }
            2 => {
                fragments.remove(self.rng.below(fragments.len()));
            }
            3 => {
                let again = fragments[self.rng.below(fragments.len())].clone();
                fragments.push(again);
            }
            _ => {}
        }
    }

    /// An Ethernet frame with an IPv4-looking header of random contents (version 4, a
    /// sane header length most of the time) and random bytes after it.
    fn random_ipv4(&mut self) -> Generated {
        let mut packet = self.some_bytes(20, 80);
        packet[0] = 0x45;
        packet[9] = self.pick(&[proto::TCP, proto::UDP, proto::SCTP, 1]);
        let total = packet.len() as u16;
        if self.rng.below(2) == 0 {
            packet[2..4].copy_from_slice(&total.to_be_bytes());
            packet[6..8].fill(0);
        }
        let mut frame = ethernet(&packet);
        fix_ip_checksum(&mut frame);
        Generated {
            frame,
            kind: "random IPv4",
            datagram: None,
        }
    }

    /// `min` to `min + spread - 1` random bytes.
    fn some_bytes(&mut self, min: usize, spread: usize) -> Vec<u8> {
        let len = min + self.rng.below(spread);
        self.bytes(len)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.rng.next_u64() as u8).collect()
    }

    fn pick<T: Copy>(&mut self, values: &[T]) -> T {
        values[self.rng.below(values.len())]
    }
}

/// The bytes of a plain-old-data map type.
fn as_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `T` is Pod: initialized, without padding holes, valid as bytes.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::cluster::pools;

    fn frames(seed: u64, count: usize) -> Vec<Generated> {
        let mut generator = Generator::new(seed, pools());
        (0..count).map(|_| generator.next_frame()).collect()
    }

    #[test]
    fn a_seed_gives_the_same_frames_and_they_cover_every_kind() {
        let first = frames(3, 20_000);
        let again = frames(3, 20_000);
        let other = frames(4, 20_000);
        let bytes = |frames: &[Generated]| -> Vec<Vec<u8>> {
            frames
                .iter()
                .map(|generated| generated.frame.clone())
                .collect()
        };
        assert_eq!(bytes(&first), bytes(&again));
        assert_ne!(bytes(&first), bytes(&other));
        assert!(
            first
                .iter()
                .all(|generated| generated.frame.len() >= ETH_LEN)
        );
        let kinds: BTreeSet<&str> = first.iter().map(|generated| generated.kind).collect();
        for kind in [
            "to a frontend",
            "backend to client",
            "backend to an SNAT port",
            "client to a backend",
            "truncated",
            "header length",
            "total length",
            "fragment bits",
            "protocol",
            "IP checksum",
            "EtherType or VLAN",
            "zero port",
            "first fragment",
            "later fragment",
            "ICMP port unreachable",
            "ICMP fragmentation needed",
            "ICMP echo",
            "random bytes",
            "random IPv4",
        ] {
            assert!(kinds.contains(kind), "{kind} never generated: {kinds:?}");
        }
        let truncated: BTreeSet<usize> = (first.iter())
            .filter(|generated| generated.kind == "truncated")
            .map(|generated| generated.frame.len())
            .collect();
        assert!(
            (ETH_LEN..=60).all(|len| truncated.contains(&len)),
            "not truncated at every header length: {truncated:?}"
        );
        // SCTP to frontends, answered, in fragments and quoted by errors, with every
        // chunk that moves an association.
        let is_sctp =
            |generated: &Generated| generated.frame.get(ETH_LEN + 9) == Some(&proto::SCTP);
        for kind in ["to a frontend", "backend to client", "first fragment"] {
            let count = (first.iter())
                .filter(|generated| generated.kind == kind && is_sctp(generated))
                .count();
            assert!(count > 50, "too few SCTP packets {kind}: {count}");
        }
        let chunks: BTreeSet<u8> = (first.iter())
            .filter(|generated| generated.kind == "to a frontend" && is_sctp(generated))
            .filter_map(|generated| generated.frame.get(ETH_LEN + 20 + 12).copied())
            .collect();
        for chunk in [0, 1, 2, 6, 7, 8, 10, 14] {
            assert!(chunks.contains(&chunk), "chunk {chunk} never generated");
        }
        // IPv6: each kind, and truncated inside and past the fixed header.
        for kind in [
            "IPv6 to a frontend",
            "IPv6 backend to client",
            "IPv6 truncated",
            "IPv6 payload length",
            "IPv6 next header",
            "IPv6 extension length",
            "IPv6 first fragment",
            "IPv6 later fragment",
            "ICMPv6 port unreachable",
            "ICMPv6 packet too big",
            "random IPv6",
        ] {
            assert!(kinds.contains(kind), "{kind} never generated: {kinds:?}");
        }
        let truncated6 = |range: std::ops::Range<usize>| {
            (first.iter()).any(|generated| {
                generated.kind == "IPv6 truncated" && range.contains(&generated.frame.len())
            })
        };
        assert!(truncated6(ETH_LEN..ETH_LEN + 40) && truncated6(ETH_LEN + 40..ETH_LEN + 60));
        let quoting_sctp = (first.iter()).filter(|generated| {
            generated.kind == "ICMP port unreachable"
                && generated.frame.get(ETH_LEN + 20 + 8 + 9) == Some(&proto::SCTP)
        });
        assert!(quoting_sctp.count() > 10, "too few errors about SCTP");
    }
}
