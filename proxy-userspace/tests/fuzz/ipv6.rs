//! IPv6 frames as the fuzzer reads them, independently of the program: which part of the
//! IPv6 path a frame takes (`parse6`'s decisions: the fixed header, up to four hop-by-hop,
//! routing, destination-options and fragment headers, then TCP, UDP, SCTP or ICMPv6), its
//! conntrack and FRAGMENTS6 keys, and its L4 checksum computed from scratch.

use proxy_common::{CtKey, FragmentKey, Ipv6, Tuple, proto, sctp};

use crate::datapath::ipv6::v6;
use crate::datapath::wire::{self, ETH_LEN, ETHERTYPE_IPV6, ICMPV6, IPV6_FRAGMENT, IPV6_LEN};

/// Extension headers the program skips (besides the fragment header), and how many.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const DESTINATION_OPTIONS: u8 = 60;
const MAX_EXTENSION_HEADERS: usize = 4;
/// Bytes of an L4 header the program reads: TCP through its flags, UDP all 8, SCTP's
/// common header and the first chunk's type.
const READ_LEN: [(u8, usize); 3] = [(proto::TCP, 14), (proto::UDP, 8), (proto::SCTP, 13)];

/// One end of an IPv6 flow: an address and a port, as written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct End6 {
    pub addr: [u8; 16],
    pub port: u16,
}

impl End6 {
    pub const fn new(addr: [u8; 16], port: u16) -> Self {
        Self { addr, port }
    }
}

/// A tuple as CONNTRACK6 stores it.
pub fn tuple6(src: End6, dst: End6) -> Tuple<Ipv6> {
    crate::datapath::ipv6::tuple6((src.addr, src.port), (dst.addr, dst.port))
}

/// What the IPv6 path makes of a frame.
#[derive(Clone, Copy, Debug)]
pub enum Shape6 {
    /// Not IPv6, too short, another version, protocol or extension header, a routing
    /// header with segments left, a deeper chain, headers cut short, a fragment of
    /// another protocol.
    Foreign,
    /// TCP, UDP or SCTP with the header bytes the program reads: a whole packet or the
    /// first fragment of a datagram.
    Transport(Packet6),
    /// A later fragment (an offset) of a TCP, UDP or SCTP datagram.
    LaterFragment(FragmentKey<Ipv6>),
    /// ICMPv6 (not a first fragment), its header at this offset.
    Icmp(usize),
}

/// A TCP, UDP or SCTP packet (or first fragment) of an IPv6 frame.
#[derive(Clone, Copy, Debug)]
pub struct Packet6 {
    pub proto: u8,
    pub src: End6,
    pub dst: End6,
    /// Where its L4 header starts in the frame.
    pub l4: usize,
    /// The FRAGMENTS6 key of its datagram when it is a first fragment.
    pub first_fragment: Option<FragmentKey<Ipv6>>,
}

impl Packet6 {
    pub fn key(&self) -> CtKey<Ipv6> {
        CtKey::new(tuple6(self.src, self.dst), self.proto)
    }

    /// Where its L4 checksum field sits in the frame, and how wide it is.
    pub fn checksum_field(&self) -> std::ops::Range<usize> {
        let (at, len) = match self.proto {
            proto::TCP => (16, 2),
            proto::UDP => (6, 2),
            _ => (sctp::CHECKSUM_OFFSET, 4),
        };
        self.l4 + at..self.l4 + at + len
    }
}

/// The addresses of an IPv6 frame at least a fixed header long.
pub fn addresses(frame: &[u8]) -> ([u8; 16], [u8; 16]) {
    let at = |offset: usize| -> [u8; 16] {
        frame[ETH_LEN + offset..ETH_LEN + offset + 16]
            .try_into()
            .expect("16 bytes")
    };
    (at(8), at(24))
}

pub fn is_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE_IPV6[..])
}

/// Decides as `parse6` does.
pub fn shape6(frame: &[u8]) -> Shape6 {
    if !is_ipv6(frame) || frame.len() < ETH_LEN + IPV6_LEN || frame[ETH_LEN] >> 4 != 6 {
        return Shape6::Foreign;
    }
    let (src, dst) = addresses(frame);
    let mut next = frame[ETH_LEN + 6];
    let mut l4 = ETH_LEN + IPV6_LEN;
    let mut first_fragment = None;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let Some(header) = frame.get(l4..l4 + 4) else {
            // Cut short inside the chain (a fragment header needs 8 bytes).
            return if matches!(next, HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS)
                || next == IPV6_FRAGMENT
            {
                Shape6::Foreign
            } else {
                break;
            };
        };
        if next == IPV6_FRAGMENT {
            let Some(fragment) = frame.get(l4..l4 + 8) else {
                return Shape6::Foreign;
            };
            let key = FragmentKey {
                src_addr: v6(src),
                dst_addr: v6(dst),
                id: u32::from_ne_bytes(fragment[4..8].try_into().expect("4 bytes")),
                proto: fragment[0],
                _pad: [0; 3],
            };
            let offset = u16::from_be_bytes([fragment[2], fragment[3]]) & 0xfff8;
            if offset != 0 {
                return if proto::is_balanced(fragment[0]) {
                    Shape6::LaterFragment(key)
                } else {
                    Shape6::Foreign
                };
            }
            if fragment[3] & 1 != 0 {
                first_fragment = Some(key);
            }
            next = fragment[0];
            l4 += 8;
            continue;
        }
        if !matches!(next, HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS) {
            break;
        }
        if next == ROUTING && header[3] != 0 {
            return Shape6::Foreign;
        }
        next = header[0];
        l4 += (usize::from(header[1]) + 1) * 8;
    }
    if next == ICMPV6 && first_fragment.is_none() {
        return Shape6::Icmp(l4);
    }
    let Some(&(_, read)) = READ_LEN.iter().find(|(protocol, _)| *protocol == next) else {
        return Shape6::Foreign;
    };
    if frame.len() < l4 + read {
        return Shape6::Foreign;
    }
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Shape6::Transport(Packet6 {
        proto: next,
        src: End6::new(src, port(l4)),
        dst: End6::new(dst, port(l4 + 2)),
        l4,
        first_fragment: first_fragment.map(|key| FragmentKey { proto: next, ..key }),
    })
}

/// Whether the L4 checksum of a whole packet holds, computed from scratch over the bytes
/// from `l4` to the end its payload length gives (false when the frame holds fewer):
/// TCP's, UDP's and ICMPv6's over the IPv6 pseudo-header (`l4_proto`), SCTP's CRC32c over
/// the packet (a zero one counts as valid).
pub fn checksum_valid6(frame: &[u8], l4: usize, l4_proto: u8) -> bool {
    let payload_len = usize::from(u16::from_be_bytes([frame[ETH_LEN + 4], frame[ETH_LEN + 5]]));
    let Some(segment) = frame.get(l4..ETH_LEN + IPV6_LEN + payload_len) else {
        return false;
    };
    if l4_proto == proto::SCTP {
        return wire::sctp_checksum_valid(segment) == Some(true);
    }
    let (src, dst) = addresses(frame);
    let sum = wire::ipv6_pseudo_checksum(src, dst, l4_proto, segment);
    // The checksum over a segment whose checksum field holds: the complement of 0xffff.
    sum == [0, 0] || sum == [0xff, 0xff]
}
