//! The generator's IPv6 frames: well-formed TCP, UDP and SCTP between the node's IPv6
//! clients, frontends and backends (and strays), behind extension headers now and then
//! (hop-by-hop, destination options, routing with and without segments left, an atomic
//! fragment header); the same mutated (truncated at any length, bad payload lengths,
//! versions, next headers, extension header lengths, hop limits, flipped bits, zero ports,
//! trailing bytes); ICMPv6 errors quoting them and echoes; fragment series of datagrams;
//! and random bytes after an IPv6 header. Built by `datapath::wire`'s IPv6 builder.

use proxy_common::proto;

use super::Generator;
use crate::datapath::ipv6::MACS6;
use crate::datapath::wire::{
    ETH_LEN, Extension, ICMPV6, IPV6_FRAGMENT, IPV6_LEN, ipv6_frame, sctp_packet, tcp_header,
    udp_header,
};
use crate::generate::Generated;
use crate::ipv6::End6;

/// Where a router would send ICMPv6 errors from.
const ROUTER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe,
];

impl Generator {
    /// One IPv6 frame (fragments of a datagram queue up behind it).
    pub(super) fn ipv6(&mut self) -> Generated {
        let (frame, kind) = match self.rng.below(100) {
            0..45 => self.transport6(true),
            45..75 => {
                let (mut frame, _) = self.transport6(true);
                let kind = self.mutate6(&mut frame);
                (frame, kind)
            }
            75..85 => self.icmp6(),
            85..93 => return self.fragments6(),
            _ => self.random_ipv6(),
        };
        Generated {
            frame,
            kind,
            datagram: None,
        }
    }

    /// A well-formed IPv6 TCP, UDP or SCTP frame between the node's kinds of IPv6 ends,
    /// with extension headers now and then (`extensions`).
    fn transport6(&mut self, extensions: bool) -> (Vec<u8>, &'static str) {
        let protocol = self.protocol();
        let (src, dst, kind) = self.ends6(protocol);
        let extensions = if extensions && self.rng.below(5) == 0 {
            self.extensions()
        } else {
            Vec::new()
        };
        let hop_limit = self.pick(&[64, 64, 64, 64, 64, 64, 1, 0, 255]);
        let payload = self.payload();
        (
            self.packet6(src, dst, protocol, &extensions, hop_limit, &payload),
            kind,
        )
    }

    /// The frame of one L4 packet: TCP with chosen flags, UDP, or SCTP with a chosen
    /// chunk; now and then without its checksum (zero).
    fn packet6(
        &mut self,
        src: End6,
        dst: End6,
        protocol: u8,
        extensions: &[Extension],
        hop_limit: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let checksum = self.rng.below(10) != 0;
        let (header, csum_offset, payload) = match protocol {
            proto::TCP => {
                let flags = self.tcp_flags();
                (tcp_header(src.port, dst.port, flags), Some(16), payload)
            }
            proto::UDP => (
                udp_header(src.port, dst.port, payload.len()),
                Some(6),
                payload,
            ),
            _ => {
                let chunk = self.sctp_chunk();
                let packet = sctp_packet(src.port, dst.port, chunk, payload, checksum);
                (packet, None, &[][..])
            }
        };
        let csum_offset = csum_offset.filter(|_| checksum);
        ipv6_frame(
            MACS6,
            src.addr,
            dst.addr,
            hop_limit,
            extensions,
            protocol,
            &header,
            csum_offset,
            payload,
        )
    }

    /// One to three extension headers the program skips or stops at.
    fn extensions(&mut self) -> Vec<Extension> {
        (0..1 + self.rng.below(3))
            .map(|_| match self.rng.below(5) {
                0 => Extension::hop_by_hop(),
                1 => Extension::destination_options(),
                2 => Extension {
                    kind: 43,
                    bytes: vec![0, 0, 4, self.pick(&[0, 0, 1]), 0, 0, 0, 0],
                },
                // An atomic fragment: offset 0, no more fragments.
                3 => Extension {
                    kind: IPV6_FRAGMENT,
                    bytes: [&[0, 0, 0, 0][..], &self.bytes(4)].concat(),
                },
                _ => Extension {
                    kind: self.pick(&[0, 60]),
                    bytes: {
                        let mut bytes = vec![0, 0];
                        bytes.extend(self.bytes(6));
                        bytes
                    },
                },
            })
            .collect()
    }

    /// Source and destination among the node's IPv6 ends, as [`Generator::ends`] picks
    /// IPv4 ones.
    fn ends6(&mut self, protocol: u8) -> (End6, End6, &'static str) {
        let client = End6::new(self.client6(), self.client_port());
        match self.rng.below(100) {
            0..45 => (client, self.frontend6(protocol), "IPv6 to a frontend"),
            45..65 => (self.backend6(protocol), client, "IPv6 backend to client"),
            65..75 => (client, self.backend6(protocol), "IPv6 client to a backend"),
            75..82 => {
                let frontend = self.frontend6(protocol);
                let stray = End6::new(frontend.addr, self.port());
                (client, stray, "IPv6 to a frontend address, another port")
            }
            _ => (
                End6::new(self.address6(), self.port()),
                End6::new(self.address6(), self.port()),
                "IPv6 between random ends",
            ),
        }
    }

    fn frontend6(&mut self, protocol: u8) -> End6 {
        let wanted = self.rng.below(10) != 0;
        let candidates: Vec<End6> = (self.pools.frontends6.iter())
            .filter(|(_, p)| !wanted || *p == protocol)
            .map(|(end, _)| *end)
            .collect();
        candidates[self.rng.below(candidates.len())]
    }

    fn backend6(&mut self, protocol: u8) -> End6 {
        let candidates: Vec<End6> = (self.pools.backends6.iter())
            .filter(|(_, p)| *p == protocol)
            .map(|(end, _)| *end)
            .collect();
        candidates[self.rng.below(candidates.len())]
    }

    fn client6(&mut self) -> [u8; 16] {
        self.pools.clients6[self.rng.below(self.pools.clients6.len())]
    }

    /// An address of 2001:db8::/32 mostly, anything sometimes.
    fn address6(&mut self) -> [u8; 16] {
        let mut addr: [u8; 16] = self.bytes(16).try_into().expect("16 bytes");
        if self.rng.below(4) != 0 {
            addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        }
        addr
    }

    /// One to three mutations of a well-formed IPv6 frame; the name of the first.
    fn mutate6(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let mut first = None;
        for _ in 0..1 + self.rng.below(3) {
            let kind = self.mutation6(frame);
            first.get_or_insert(kind);
        }
        first.unwrap_or("IPv6 mutated")
    }

    fn mutation6(&mut self, frame: &mut Vec<u8>) -> &'static str {
        let ip = ETH_LEN;
        let l4 = ip + IPV6_LEN;
        match self.rng.below(11) {
            0 | 1 => {
                let len = ETH_LEN + self.rng.below(frame.len() - ETH_LEN + 1);
                frame.truncate(len);
                "IPv6 truncated"
            }
            2 if frame.len() >= l4 => {
                let len = u16::from_be_bytes([frame[ip + 4], frame[ip + 5]]);
                let bad = match self.rng.below(4) {
                    0 => 0,
                    1 => u16::MAX,
                    2 => len.wrapping_add(1 + self.rng.below(64) as u16),
                    _ => len.saturating_sub(1 + self.rng.below(64) as u16),
                };
                frame[ip + 4..ip + 6].copy_from_slice(&bad.to_be_bytes());
                "IPv6 payload length"
            }
            3 if frame.len() >= l4 => {
                frame[ip] = ((self.rng.below(16) as u8) << 4) | (frame[ip] & 0x0f);
                "IPv6 version"
            }
            4 if frame.len() >= l4 => {
                frame[ip + 6] = self.pick(&[0, 43, 44, 60, 58, 59, 6, 17, 132, 50, 255]);
                "IPv6 next header"
            }
            5 if frame.len() > l4 + 1 => {
                // An extension header's length, or the L4 header's second byte.
                frame[l4 + 1] = self.rng.next_u64() as u8;
                "IPv6 extension length"
            }
            6 if frame.len() >= l4 => {
                frame[ip + 7] = self.pick(&[0, 1, 2]);
                "IPv6 hop limit"
            }
            7 => {
                for _ in 0..1 + self.rng.below(8) {
                    let at = self.rng.below(frame.len());
                    frame[at] ^= 1 << self.rng.below(8);
                }
                "IPv6 bit flips"
            }
            8 => {
                let tail = self.some_bytes(1, 64);
                frame.extend(tail);
                "IPv6 trailing bytes"
            }
            9 => {
                let at = l4 + 2 * self.rng.below(2);
                if let Some(port) = frame.get_mut(at..at + 2) {
                    port.fill(0);
                }
                "IPv6 zero port"
            }
            _ => {
                let at = self.rng.below(frame.len());
                frame[at] = self.pick(&[0, 0xff]);
                "IPv6 byte set"
            }
        }
    }

    /// An ICMPv6 error quoting an IPv6 packet of the node's kinds of flows (its fixed
    /// header and 8 bytes, more, or less), or an echo request.
    fn icmp6(&mut self) -> (Vec<u8>, &'static str) {
        let (quoted, _) = self.transport6(false);
        let inner = &quoted[ETH_LEN..];
        let quote_len = match self.rng.below(6) {
            0 => self.rng.below(IPV6_LEN + 8),
            1 => inner.len(),
            _ => IPV6_LEN + 8,
        }
        .min(inner.len());
        let quote = &inner[..quote_len];
        let (kind, code, rest, name) = match self.rng.below(10) {
            0..4 => (1, 4, [0; 4], "ICMPv6 port unreachable"),
            4..6 => (2, 0, [0, 0, 0x05, 0x00], "ICMPv6 packet too big"),
            6 => (1, self.rng.below(8) as u8, [0; 4], "ICMPv6 unreachable"),
            7 => (3, 0, [0; 4], "ICMPv6 time exceeded"),
            8 => (4, 0, [0; 4], "ICMPv6 parameter problem"),
            _ => (128, 0, [0, 1, 0, 1], "ICMPv6 echo"),
        };
        let quoted_src: [u8; 16] = inner[8..24].try_into().expect("16 bytes");
        let quoted_dst: [u8; 16] = inner[24..40].try_into().expect("16 bytes");
        let from = if self.rng.below(3) == 0 {
            ROUTER6
        } else {
            quoted_dst
        };
        let body = if kind == 128 {
            self.some_bytes(0, 56)
        } else {
            quote.to_vec()
        };
        let header = [&[kind, code, 0, 0][..], &rest].concat();
        let frame = ipv6_frame(
            MACS6,
            from,
            quoted_src,
            64,
            &[],
            ICMPV6,
            &header,
            Some(2),
            &body,
        );
        (frame, name)
    }

    /// The fragments (2 to 4) of an IPv6 datagram, each behind a fragment header, queued:
    /// in order, reversed or shuffled, one sometimes lost or repeated, a later one now and
    /// then with a hop limit of 1. Returns the first to go out.
    fn fragments6(&mut self) -> Generated {
        let protocol = self.protocol();
        let (src, dst, _) = self.ends6(protocol);
        let id = u32::from(self.next_id) | 0x6000_0000;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let payload = self.some_bytes(40, 560);
        let whole = self.packet6(src, dst, protocol, &[], 64, &payload);
        let (head, data) = whole.split_at(ETH_LEN + IPV6_LEN);
        let pieces = 2 + self.rng.below(3);
        let step = (data.len() / pieces).max(8) / 8 * 8;
        let mut fragments = Vec::new();
        let mut offset = 0;
        while offset < data.len() {
            let end = if fragments.len() + 1 == pieces {
                data.len()
            } else {
                (offset + step).min(data.len())
            };
            let mut frame = head.to_vec();
            let payload_len = (8 + end - offset) as u16;
            frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            frame[ETH_LEN + 6] = IPV6_FRAGMENT;
            if offset > 0 && self.rng.below(8) == 0 {
                frame[ETH_LEN + 7] = 1;
            }
            let bits = offset as u16 | u16::from(end < data.len());
            frame.extend([protocol, 0]);
            frame.extend(bits.to_be_bytes());
            frame.extend(id.to_be_bytes());
            frame.extend(&data[offset..end]);
            fragments.push(Generated {
                frame,
                kind: if offset == 0 {
                    "IPv6 first fragment"
                } else {
                    "IPv6 later fragment"
                },
                datagram: None,
            });
            offset = end;
        }
        self.shuffle(&mut fragments);
        self.queue.extend(fragments);
        let fallback = self.random_ipv6();
        self.queue.pop_front().unwrap_or(Generated {
            frame: fallback.0,
            kind: fallback.1,
            datagram: None,
        })
    }

    /// An Ethernet frame with an IPv6 fixed header (version 6, addresses of the node's
    /// kinds or random, a next header the program handles or not, a payload length right
    /// half the time) and random bytes after it.
    fn random_ipv6(&mut self) -> (Vec<u8>, &'static str) {
        let rest = self.some_bytes(0, 80);
        let src = if self.rng.below(2) == 0 {
            self.client6()
        } else {
            self.address6()
        };
        let dst = match self.rng.below(3) {
            0 => self.frontend6(proto::TCP).addr,
            1 => self.backend6(proto::UDP).addr,
            _ => self.address6(),
        };
        let next = self.pick(&[proto::TCP, proto::UDP, proto::SCTP, ICMPV6, 0, 43, 44, 60]);
        let mut frame = ipv6_frame(MACS6, src, dst, 64, &[], next, &rest, None, &[]);
        if self.rng.below(2) == 0 {
            let len = self.rng.next_u64() as u16;
            frame[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&len.to_be_bytes());
        }
        (frame, "random IPv6")
    }
}
