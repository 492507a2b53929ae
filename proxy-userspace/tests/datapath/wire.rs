//! Frames as the fuzzer sees them, computed independently of the program: building them
//! byte by byte (any field may be wrong on purpose), reading them back the way the
//! program decides what it handles, and the Internet checksums from scratch.

use proxy_common::{CtKey, Tuple, proto, sctp};

pub const ETH_LEN: usize = 14;
pub const IPV4_MIN_LEN: usize = 20;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const ICMP_LEN: usize = 8;
pub const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// Bytes of a TCP header the program reads (through its flags), of a UDP header all 8.
const TCP_READ_LEN: usize = 14;
/// The TCP checksum field, within the TCP header.
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
/// The SCTP common header and a chunk header.
pub const SCTP_LEN: usize = 16;
/// Bytes of an SCTP packet the program reads: the common header and the first chunk's type.
const SCTP_READ_LEN: usize = 13;

/// One end of a flow: an IPv4 address and a port, as written on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct End {
    pub addr: [u8; 4],
    pub port: u16,
}

impl End {
    pub const fn new(addr: [u8; 4], port: u16) -> Self {
        Self { addr, port }
    }
}

/// A tuple as the maps store it (wire order) from two ends.
pub fn tuple(src: End, dst: End) -> Tuple {
    Tuple {
        src_addr: u32::from_ne_bytes(src.addr),
        dst_addr: u32::from_ne_bytes(dst.addr),
        src_port: src.port.to_be(),
        dst_port: dst.port.to_be(),
    }
}

/// The ends of a stored tuple.
pub fn ends(tuple: &Tuple) -> (End, End) {
    (
        End::new(tuple.src_addr.to_ne_bytes(), u16::from_be(tuple.src_port)),
        End::new(tuple.dst_addr.to_ne_bytes(), u16::from_be(tuple.dst_port)),
    )
}

/// What the program makes of a frame, decided as it decides (`parse.rs`): only unfragmented
/// IPv4 TCP and UDP with their headers present are translated; ICMP and fragments are
/// what issue 19 adds; anything else passes untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Another EtherType, a bad version or header length, another protocol, or headers cut
    /// short.
    Foreign,
    /// An IPv4 fragment (more fragments, or an offset).
    Fragment(Ipv4),
    /// IPv4 ICMP, unfragmented.
    Icmp(Ipv4),
    /// Unfragmented IPv4 TCP or UDP with the header bytes the program reads.
    Transport(Transport),
}

/// The IPv4 header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4 {
    /// Header length in bytes (IHL × 4).
    pub header_len: usize,
    pub total_len: usize,
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// The fragment offset in 8-byte units.
    pub fragment_offset: u16,
}

impl Ipv4 {
    pub fn l4_offset(&self) -> usize {
        ETH_LEN + self.header_len
    }

    /// The bytes after the header that the total length claims and the frame holds.
    pub fn payload<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        let end = ETH_LEN + self.total_len;
        (self.total_len >= self.header_len && end <= frame.len())
            .then(|| &frame[self.l4_offset()..end])
    }
}

/// An unfragmented TCP or UDP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub ip: Ipv4,
    pub src: End,
    pub dst: End,
    /// TCP's flag byte, SCTP's first chunk as the program reads it, 0 for UDP.
    pub tcp_flags: u8,
}

impl Transport {
    pub fn proto(&self) -> u8 {
        self.ip.protocol
    }

    pub fn key(&self) -> CtKey {
        CtKey::new(tuple(self.src, self.dst), self.proto())
    }

    /// Where the L4 checksum field sits in the frame.
    pub fn csum_offset(&self) -> usize {
        self.ip.l4_offset()
            + match self.proto() {
                proto::UDP => UDP_CSUM,
                proto::SCTP => sctp::CHECKSUM_OFFSET,
                _ => TCP_CSUM,
            }
    }
}

pub fn shape(frame: &[u8]) -> Shape {
    let Some(ip) = ipv4(frame) else {
        return Shape::Foreign;
    };
    if ip.fragment_offset != 0 || frame[ETH_LEN + 6] & 0x20 != 0 {
        return Shape::Fragment(ip);
    }
    let l4 = ip.l4_offset();
    let needed = match ip.protocol {
        proto::TCP => TCP_READ_LEN,
        proto::UDP => UDP_LEN,
        proto::SCTP => SCTP_READ_LEN,
        1 => return Shape::Icmp(ip),
        _ => return Shape::Foreign,
    };
    if frame.len() < l4 + needed {
        return Shape::Foreign;
    }
    let port = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
    Shape::Transport(Transport {
        ip,
        src: End::new(ip.src, port(l4)),
        dst: End::new(ip.dst, port(l4 + 2)),
        tcp_flags: match ip.protocol {
            proto::TCP => frame[l4 + 13],
            proto::SCTP => sctp::tcp_flags_of(frame[l4 + 12]),
            _ => 0,
        },
    })
}

/// The IPv4 header, if the frame carries one the program would read: the EtherType, a
/// 20-byte header in the frame, version 4 and a header length of at least 20.
pub fn ipv4(frame: &[u8]) -> Option<Ipv4> {
    if frame.len() < ETH_LEN + IPV4_MIN_LEN || frame[12..14] != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[ETH_LEN..];
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || header_len < IPV4_MIN_LEN {
        return None;
    }
    Some(Ipv4 {
        header_len,
        total_len: usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        protocol: ip[9],
        src: ip[12..16].try_into().expect("4 bytes"),
        dst: ip[16..20].try_into().expect("4 bytes"),
        fragment_offset: u16::from_be_bytes([ip[6] & 0x1f, ip[7]]),
    })
}

/// The ones' complement sum of `bytes` (big-endian words, an odd last byte padded), folded.
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store over `bytes` whose checksum field is zero.
pub fn checksum(bytes: &[u8]) -> [u8; 2] {
    (!ones_complement_sum(bytes)).to_be_bytes()
}

/// Whether the IPv4 header checksum holds; None if the header is not all in the frame.
pub fn ip_checksum_valid(frame: &[u8], ip: &Ipv4) -> Option<bool> {
    let header = frame.get(ETH_LEN..ETH_LEN + ip.header_len)?;
    Some(ones_complement_sum(header) == 0xffff)
}

/// Whether the TCP or UDP checksum holds (pseudo-header included), where it can be told:
/// the segment the lengths claim is all in the frame. A UDP checksum of zero ("none")
/// counts as valid.
pub fn l4_checksum_valid(frame: &[u8], packet: &Transport) -> Option<bool> {
    let segment = packet.ip.payload(frame)?;
    if packet.proto() == proto::SCTP {
        return sctp_checksum_valid(segment);
    }
    let segment = if packet.proto() == proto::UDP {
        let udp_len = usize::from(u16::from_be_bytes([*segment.get(4)?, *segment.get(5)?]));
        if segment.get(6..8)? == [0, 0] {
            return Some(true);
        }
        segment.get(..udp_len).filter(|_| udp_len >= UDP_LEN)?
    } else {
        segment.get(..TCP_CSUM + 2).map(|_| segment)?
    };
    let length = u16::try_from(segment.len()).ok()?.to_be_bytes();
    let pseudo = [
        &packet.ip.src[..],
        &packet.ip.dst,
        &[0, packet.proto()],
        &length,
    ]
    .concat();
    Some(ones_complement_sum(&[&pseudo[..], segment].concat()) == 0xffff)
}

/// CRC32c (RFC 9260 appendix A) bit by bit, as SCTP stores it: written independently of
/// the program's incremental update (`proxy_common::sctp`) and of the `crc` crate `trace`
/// uses.
pub fn crc32c(bytes: &[u8]) -> [u8; 4] {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let low_bit = crc & 1;
            crc >>= 1;
            if low_bit != 0 {
                crc ^= 0x82f6_3b78;
            }
        }
    }
    (!crc).to_le_bytes()
}

/// Whether an SCTP packet's CRC32c holds; a zero field (the CRC left to the device) counts
/// as valid. None when the packet is shorter than its common header.
pub fn sctp_checksum_valid(packet: &[u8]) -> Option<bool> {
    let field = sctp::CHECKSUM_OFFSET..sctp::CHECKSUM_OFFSET + 4;
    let stored = packet.get(field.clone())?;
    if stored == [0; 4] {
        return Some(true);
    }
    let mut zeroed = packet.to_vec();
    zeroed[field].fill(0);
    Some(crc32c(&zeroed) == stored)
}

/// An SCTP packet from `src_port` to `dst_port`: the common header (verification tag
/// 0x0102_0304), one chunk of `chunk_type` carrying `value` (padded to 4 bytes), and its
/// CRC32c, or a zero field without `checksum` (as a socket sends it to a device that
/// offloads the CRC).
pub fn sctp_packet(
    src_port: u16,
    dst_port: u16,
    chunk_type: u8,
    value: &[u8],
    checksum: bool,
) -> Vec<u8> {
    let mut packet = Vec::with_capacity(SCTP_LEN + value.len() + 3);
    packet.extend(src_port.to_be_bytes());
    packet.extend(dst_port.to_be_bytes());
    packet.extend(0x0102_0304u32.to_be_bytes());
    packet.extend([0; 4]);
    packet.extend([chunk_type, 0]);
    packet.extend(((4 + value.len()) as u16).to_be_bytes());
    packet.extend(value);
    packet.resize(packet.len().next_multiple_of(4), 0);
    if checksum {
        let crc = crc32c(&packet);
        packet[sctp::CHECKSUM_OFFSET..sctp::CHECKSUM_OFFSET + 4].copy_from_slice(&crc);
    }
    packet
}

/// Writes the IPv4 header checksum of a frame afresh.
pub fn fix_ip_checksum(frame: &mut [u8]) {
    let Some(header_len) = frame.get(ETH_LEN).map(|byte| usize::from(byte & 0x0f) * 4) else {
        return;
    };
    let end = (ETH_LEN + header_len).min(frame.len());
    if end < ETH_LEN + 12 {
        return;
    }
    frame[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let sum = checksum(&frame[ETH_LEN..end]);
    frame[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&sum);
}

/// An IPv4 packet to build: any header field may be set to what a fuzzer wants.
#[derive(Clone, Debug)]
pub struct Ipv4Spec {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    pub ttl: u8,
    pub tos: u8,
    pub identification: u16,
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub fragment_offset: u16,
    /// A multiple of 4, at most 40 bytes.
    pub options: Vec<u8>,
}

impl Ipv4Spec {
    pub fn new(src: [u8; 4], dst: [u8; 4], protocol: u8) -> Self {
        Self {
            src,
            dst,
            protocol,
            ttl: 64,
            tos: 0,
            identification: 0x4242,
            dont_fragment: true,
            more_fragments: false,
            fragment_offset: 0,
            options: Vec::new(),
        }
    }

    /// The header for `payload_len` bytes of payload, checksum included.
    pub fn header(&self, payload_len: usize) -> Vec<u8> {
        assert!(self.options.len() <= 40 && self.options.len().is_multiple_of(4));
        let header_len = IPV4_MIN_LEN + self.options.len();
        let total = (header_len + payload_len) as u16;
        let flags = (u16::from(self.dont_fragment) << 14)
            | (u16::from(self.more_fragments) << 13)
            | (self.fragment_offset & 0x1fff);
        let mut header = vec![0x40 | (header_len / 4) as u8, self.tos];
        header.extend(total.to_be_bytes());
        header.extend(self.identification.to_be_bytes());
        header.extend(flags.to_be_bytes());
        header.extend([self.ttl, self.protocol, 0, 0]);
        header.extend(self.src);
        header.extend(self.dst);
        header.extend(&self.options);
        let sum = checksum(&header);
        header[10..12].copy_from_slice(&sum);
        header
    }
}

/// An Ethernet frame around an IPv4 packet.
pub fn ethernet(packet: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    frame.extend(ETHERTYPE_IPV4);
    frame.extend(packet);
    frame
}

/// The TCP or UDP segment (`ip.protocol`) from `src_port` to `dst_port` with `payload`,
/// its checksum over the pseudo-header of `ip` (or zero: UDP's "none").
pub fn segment(
    ip: &Ipv4Spec,
    src_port: u16,
    dst_port: u16,
    tcp_flags: u8,
    payload: &[u8],
    udp_checksum: bool,
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(TCP_LEN + payload.len());
    segment.extend(src_port.to_be_bytes());
    segment.extend(dst_port.to_be_bytes());
    if ip.protocol == proto::UDP {
        segment.extend(((UDP_LEN + payload.len()) as u16).to_be_bytes());
        segment.extend([0, 0]);
    } else {
        segment.extend(1_000u32.to_be_bytes());
        segment.extend(5_000u32.to_be_bytes());
        segment.extend([0x50, tcp_flags]);
        segment.extend(64_240u16.to_be_bytes());
        segment.extend([0, 0, 0, 0]);
    }
    segment.extend(payload);
    if ip.protocol != proto::UDP || udp_checksum {
        let length = (segment.len() as u16).to_be_bytes();
        let pseudo = [&ip.src[..], &ip.dst, &[0, ip.protocol], &length].concat();
        let mut sum = checksum(&[&pseudo[..], &segment].concat());
        if ip.protocol == proto::UDP && sum == [0, 0] {
            sum = [0xff, 0xff];
        }
        let at = if ip.protocol == proto::UDP {
            UDP_CSUM
        } else {
            TCP_CSUM
        };
        segment[at..at + 2].copy_from_slice(&sum);
    }
    segment
}

/// A whole frame: Ethernet, IPv4 and `payload` (a segment, an ICMP message, anything).
pub fn frame(ip: &Ipv4Spec, payload: &[u8]) -> Vec<u8> {
    ethernet(&[ip.header(payload.len()), payload.to_vec()].concat())
}

/// An ICMP message of `kind` and `code` (rest of header `rest`) carrying `body`, checksummed.
pub fn icmp(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut message = vec![kind, code, 0, 0];
    message.extend(rest);
    message.extend(body);
    let sum = checksum(&message);
    message[2..4].copy_from_slice(&sum);
    message
}

/// The ICMP port unreachable the program answers a refused frame with (kube-proxy's
/// REJECT, as the kernel would send it): from the refused packet's destination, see
/// [`icmp_answer_for`]. Built from the raw bytes, whatever they hold.
pub fn port_unreachable_for(refused: &[u8]) -> Vec<u8> {
    let from = refused[ETH_LEN + 16..ETH_LEN + 20]
        .try_into()
        .expect("4 bytes");
    icmp_answer_for(refused, from, 3, 3, [0; 4])
}

/// The ICMP error (`kind`, `code`, the header's last four bytes `rest`: the next-hop MTU of
/// "fragmentation needed") the kernel would send from `from` about `packet` (a frame
/// without IPv4 options), back out of the device it came in on: to its source, quoting its
/// IPv4 header and first 8 payload bytes, in the kernel's own style (precedence
/// "internetwork control", TTL 64, no identification, fragments allowed).
pub fn icmp_answer_for(packet: &[u8], from: [u8; 4], kind: u8, code: u8, rest: [u8; 4]) -> Vec<u8> {
    let quote = &packet[ETH_LEN..ETH_LEN + IPV4_MIN_LEN + 8];
    let mut ip = Ipv4Spec::new(
        from,
        packet[ETH_LEN + 12..ETH_LEN + 16]
            .try_into()
            .expect("4 bytes"),
        1,
    );
    ip.tos = 0xc0;
    ip.identification = 0;
    ip.dont_fragment = false;
    let message = icmp(kind, code, rest, quote);
    let mut answer = [&packet[6..12], &packet[0..6], &packet[12..14]].concat();
    answer.extend(ip.header(message.len()));
    answer.extend(message);
    answer
}

/// Hex of a frame, 32 bytes a line, for failure reports.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(32)
        .map(|line| line.iter().map(|byte| format!("{byte:02x}")).collect())
        .collect::<Vec<String>>()
        .join("\n")
}

/// The IPv6 EtherType and header length.
pub const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
pub const IPV6_LEN: usize = 40;
/// ICMPv6's next-header value.
pub const ICMPV6: u8 = 58;

/// An IPv6 extension header in front of the L4 header: its next-header value (as the
/// header before it names it) and its bytes, whose first byte (this header's own next
/// header) the builder fills in.
#[derive(Clone, Debug)]
pub struct Extension {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

impl Extension {
    /// Hop-by-hop options: PadN to 8 bytes.
    pub fn hop_by_hop() -> Self {
        Self {
            kind: 0,
            bytes: vec![0, 0, 1, 4, 0, 0, 0, 0],
        }
    }

    /// Destination options of 16 bytes (one 8-byte unit more): PadN.
    pub fn destination_options() -> Self {
        Self {
            kind: 60,
            bytes: [&[0, 1, 1, 12][..], &[0; 12]].concat(),
        }
    }
}

/// The IPv6 fragment header's next-header value, and its length.
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_FRAGMENT_LEN: usize = 8;
/// Bytes of a datagram's fragmentable part in each IPv6 fragment over a 1500-byte MTU:
/// 1500 less the fixed and the fragment header, down to a multiple of 8.
pub const IPV6_FRAGMENT_DATA: usize = 1448;

/// `frame` (Ethernet, IPv6 without extension headers, payload) as the fragments its source
/// cuts it into for a 1500-byte MTU (RFC 8200 4.5): each the fixed header (its payload
/// length its own), a fragment header (the offset of its part in 8-byte units, "more
/// fragments" on all but the last, the identification `id`) and 1448 bytes of the
/// datagram's payload (the last one the rest).
pub fn ipv6_fragments(frame: &[u8], id: u32) -> Vec<Vec<u8>> {
    let (head, data) = frame.split_at(ETH_LEN + IPV6_LEN);
    let next_header = head[ETH_LEN + 6];
    let count = data.chunks(IPV6_FRAGMENT_DATA).count();
    data.chunks(IPV6_FRAGMENT_DATA)
        .enumerate()
        .map(|(index, part)| {
            let mut out = head.to_vec();
            let payload_len = u16::try_from(IPV6_FRAGMENT_LEN + part.len()).unwrap();
            out[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
            out[ETH_LEN + 6] = IPV6_FRAGMENT;
            // The offset in 8-byte units above three bits: the byte offset, a multiple of 8.
            let offset = u16::try_from(index * IPV6_FRAGMENT_DATA).unwrap();
            let more = u16::from(index + 1 < count);
            out.extend([next_header, 0]);
            out.extend((offset | more).to_be_bytes());
            out.extend(id.to_be_bytes());
            out.extend(part);
            out
        })
        .collect()
}

/// The datagram [`ipv6_fragments`] cut `fragments` from (the first one's fixed header),
/// to check its L4 checksum end to end.
pub fn ipv6_reassembled(fragments: &[Vec<u8>]) -> Vec<u8> {
    let header = ETH_LEN + IPV6_LEN;
    let mut whole = fragments[0][..header].to_vec();
    whole[ETH_LEN + 6] = fragments[0][header];
    for fragment in fragments {
        whole.extend_from_slice(&fragment[header + IPV6_FRAGMENT_LEN..]);
    }
    let payload_len = u16::try_from(whole.len() - header).unwrap();
    whole[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&payload_len.to_be_bytes());
    whole
}

/// An IPv6 frame, byte by byte: Ethernet (`macs`: source, destination), the fixed header
/// (`hop_limit`), `extensions`, and the L4 header `l4` of protocol `proto` followed by
/// `payload`. The L4 checksum is computed here over the IPv6 pseudo-header (for TCP, UDP
/// and ICMPv6; the field at `csum_offset` within `l4`, which must be zero).
#[allow(clippy::too_many_arguments)]
pub fn ipv6_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 16],
    dst: [u8; 16],
    hop_limit: u8,
    extensions: &[Extension],
    proto: u8,
    l4: &[u8],
    csum_offset: Option<usize>,
    payload: &[u8],
) -> Vec<u8> {
    let mut segment = [l4, payload].concat();
    if let Some(offset) = csum_offset {
        let sum = ipv6_pseudo_checksum(src, dst, proto, &segment);
        segment[offset..offset + 2].copy_from_slice(&sum);
    }
    let mut chain = Vec::new();
    for (index, extension) in extensions.iter().enumerate() {
        let next = extensions.get(index + 1).map_or(proto, |next| next.kind);
        let mut bytes = extension.bytes.clone();
        bytes[0] = next;
        chain.extend(bytes);
    }
    let first = extensions.first().map_or(proto, |extension| extension.kind);
    let payload_len = u16::try_from(chain.len() + segment.len()).unwrap();
    let mut frame = Vec::new();
    frame.extend(macs.1);
    frame.extend(macs.0);
    frame.extend(ETHERTYPE_IPV6);
    frame.extend([0x60, 0, 0, 0]);
    frame.extend(payload_len.to_be_bytes());
    frame.extend([first, hop_limit]);
    frame.extend(src);
    frame.extend(dst);
    frame.extend(chain);
    frame.extend(segment);
    frame
}

/// The checksum to store in an upper-layer `segment` (its checksum field zero) over the
/// IPv6 pseudo-header (RFC 8200 8.1).
pub fn ipv6_pseudo_checksum(src: [u8; 16], dst: [u8; 16], proto: u8, segment: &[u8]) -> [u8; 2] {
    checksum(&with_pseudo_header(src, dst, proto, segment))
}

/// `segment` behind the IPv6 pseudo-header that its checksum covers.
fn with_pseudo_header(src: [u8; 16], dst: [u8; 16], proto: u8, segment: &[u8]) -> Vec<u8> {
    let len = u32::try_from(segment.len()).unwrap();
    [
        &src[..],
        &dst[..],
        &len.to_be_bytes(),
        &[0, 0, 0, proto],
        segment,
    ]
    .concat()
}

/// A TCP header (20 bytes, checksum zero) with `flags` (`proxy_common::tcp_flags`).
pub fn tcp_header(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let ack = if flags & 0x10 != 0 { 5_000u32 } else { 0 };
    [
        &src_port.to_be_bytes()[..],
        &dst_port.to_be_bytes(),
        &1_000u32.to_be_bytes(),
        &ack.to_be_bytes(),
        &[0x50, flags],
        &64_240u16.to_be_bytes(),
        &[0, 0, 0, 0],
    ]
    .concat()
}

/// A UDP header (checksum zero) for `payload_len` bytes of payload.
pub fn udp_header(src_port: u16, dst_port: u16, payload_len: usize) -> Vec<u8> {
    let len = u16::try_from(UDP_LEN + payload_len).unwrap();
    [
        &src_port.to_be_bytes()[..],
        &dst_port.to_be_bytes(),
        &len.to_be_bytes(),
        &[0, 0],
    ]
    .concat()
}

/// Whether the TCP, UDP or ICMPv6 checksum of an IPv6 frame without extension headers
/// holds, computed from scratch.
pub fn ipv6_checksum_valid(frame: &[u8]) -> bool {
    let ip = &frame[ETH_LEN..ETH_LEN + IPV6_LEN];
    let (src, dst): ([u8; 16], [u8; 16]) = (
        ip[8..24].try_into().unwrap(),
        ip[24..40].try_into().unwrap(),
    );
    let segment = &frame[ETH_LEN + IPV6_LEN..];
    ones_complement_sum(&with_pseudo_header(src, dst, ip[6], segment)) == 0xffff
}
