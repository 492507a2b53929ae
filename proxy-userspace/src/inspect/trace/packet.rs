//! The packet `trace` runs through the dry run: built byte by byte with valid checksums,
//! and read back from the frame the program leaves. IPv4 or IPv6, as its addresses are.
//!
//! Besides a TCP segment, UDP datagram or SCTP packet it can be one fragment of a datagram (the first,
//! which carries the ports, or a later one, which carries none; IPv6's behind a fragment
//! header), a packet of a given
//! length and TTL or hop limit (to see the forwarding checks answer), or an ICMP (ICMPv6)
//! error about the packet (to see the error translated as its flow is).

use std::net::IpAddr;

use proxy_common::{icmp, icmp6, proto, sctp, tcp_flags};

use crate::inspect::Endpoint;

const ETHERNET_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// The SCTP common header and one chunk header.
const SCTP_LEN: usize = sctp::COMMON_HEADER_LEN + 4;
const ICMP_HEADER_LEN: usize = 8;
/// Bytes an ICMP error quotes after the packet's IP header: its ports.
const QUOTED_L4_LEN: usize = 8;
/// The fragment offset of a traced later fragment, in 8-byte units: where the second
/// fragment of a datagram sent over a 1500-byte MTU starts.
const LATER_FRAGMENT_OFFSET: u16 = 1480 / 8;
const IP_DONT_FRAGMENT: u16 = 0x4000;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET: u16 = 0x1fff;
/// IPv6's fragment header: its next-header value and length; the offset of a traced later
/// fragment in bytes (a multiple of 8: the field's 13 bits above its three low ones) where
/// the second fragment over a 1500-byte MTU starts (1500 less both headers, down to a
/// multiple of 8); the "more fragments" bit.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_FRAGMENT_LEN: usize = 8;
const IPV6_LATER_FRAGMENT_OFFSET: u16 = 1448;
const IPV6_MORE_FRAGMENTS: u16 = 0x0001;
const IPV6_FRAGMENT_OFFSET: u16 = 0xfff8;

/// The packet to trace: a TCP segment, a UDP datagram or an SCTP packet (or one fragment of
/// it), or an ICMP error about one. Its family is its addresses' (both of one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracePacket {
    pub protocol: u8,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// TCP: the flag bits (`proxy_common::tcp_flags`); SCTP: the chunk they stand for
    /// ([`sctp_chunk`]).
    pub tcp_flags: u8,
    /// The IP packet's length (IPv4's total length; IPv6's 40-byte header and its payload),
    /// the payload zero-filled up to it (raised to the headers' length if shorter).
    pub length: u16,
    /// The TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    pub fragment: Fragment,
    /// The identification, which names a fragment's datagram: IPv4's 16 bits, IPv6's 32
    /// (its fragment header's).
    pub ip_id: u32,
    /// Trace the ICMP error this packet drew instead of the packet itself.
    pub icmp_error: Option<IcmpError>,
}

/// Which part of a datagram the packet is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Fragment {
    /// A whole datagram, "don't fragment" set (as Linux sends TCP and PMTU-probing UDP).
    #[default]
    Whole,
    /// The first fragment: offset 0, more fragments follow; it carries the ports.
    First,
    /// A later fragment (offset 1480; IPv6: 1448): no TCP/UDP header of its own.
    Later,
}

/// An ICMP error about the traced packet, as the host that could not deliver it sends it:
/// from `from` (default: the packet's destination) to the packet's source, quoting the
/// packet's IP header and its first 8 bytes. ICMPv6 for an IPv6 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub kind: IcmpKind,
    pub from: Option<IpAddr>,
}

/// The errors `trace --icmp-error` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    NetUnreachable,
    HostUnreachable,
    PortUnreachable,
    /// "Fragmentation needed" (ICMPv6: "packet too big"), naming the next hop's MTU.
    FragNeeded {
        mtu: u16,
    },
    TimeExceeded,
}

impl IcmpKind {
    /// ICMP type, code and the header's last four bytes (the MTU of "fragmentation
    /// needed"); ICMPv6's for `ipv6` (RFC 4443: no route, address unreachable, port
    /// unreachable, packet too big with a 32-bit MTU, hop limit exceeded).
    pub fn header(self, ipv6: bool) -> (u8, u8, [u8; 4]) {
        match (self, ipv6) {
            (IcmpKind::NetUnreachable, false) => (icmp::DEST_UNREACH, icmp::NET_UNREACH, [0; 4]),
            (IcmpKind::HostUnreachable, false) => (icmp::DEST_UNREACH, icmp::HOST_UNREACH, [0; 4]),
            (IcmpKind::PortUnreachable, false) => (icmp::DEST_UNREACH, icmp::PORT_UNREACH, [0; 4]),
            (IcmpKind::FragNeeded { mtu }, false) => {
                let [high, low] = mtu.to_be_bytes();
                (icmp::DEST_UNREACH, icmp::FRAG_NEEDED, [0, 0, high, low])
            }
            (IcmpKind::TimeExceeded, false) => (icmp::TIME_EXCEEDED, icmp::TTL_EXCEEDED, [0; 4]),
            (IcmpKind::NetUnreachable, true) => (icmp6::DEST_UNREACH, icmp6::NO_ROUTE, [0; 4]),
            (IcmpKind::HostUnreachable, true) => (icmp6::DEST_UNREACH, icmp6::ADDR_UNREACH, [0; 4]),
            (IcmpKind::PortUnreachable, true) => (icmp6::DEST_UNREACH, icmp6::PORT_UNREACH, [0; 4]),
            (IcmpKind::FragNeeded { mtu }, true) => {
                (icmp6::PACKET_TOO_BIG, 0, u32::from(mtu).to_be_bytes())
            }
            (IcmpKind::TimeExceeded, true) => {
                (icmp6::TIME_EXCEEDED, icmp6::HOP_LIMIT_EXCEEDED, [0; 4])
            }
        }
    }

    /// The error of this type, code and last four header bytes, if it is one `trace`
    /// names: the inverse of [`IcmpKind::header`].
    pub fn of(ipv6: bool, icmp_type: u8, code: u8, rest: [u8; 4]) -> Option<Self> {
        [
            IcmpKind::NetUnreachable,
            IcmpKind::HostUnreachable,
            IcmpKind::PortUnreachable,
            IcmpKind::TimeExceeded,
        ]
        .into_iter()
        .find(|kind| {
            let (kind_type, kind_code, _) = kind.header(ipv6);
            (kind_type, kind_code) == (icmp_type, code)
        })
        .or_else(|| {
            let (too_big_type, too_big_code, _) = IcmpKind::FragNeeded { mtu: 0 }.header(ipv6);
            let mtu = if ipv6 {
                u16::try_from(u32::from_be_bytes(rest)).unwrap_or(u16::MAX)
            } else {
                u16::from_be_bytes([rest[2], rest[3]])
            };
            ((icmp_type, code) == (too_big_type, too_big_code))
                .then_some(IcmpKind::FragNeeded { mtu })
        })
    }
}

impl std::str::FromStr for IcmpKind {
    type Err = String;

    /// `net-unreachable`, `host-unreachable`, `port-unreachable`, `frag-needed[=MTU]`
    /// (MTU 1400 if omitted), `time-exceeded`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, mtu) = match text.split_once('=') {
            Some((name, mtu)) => (name, Some(mtu)),
            None => (text, None),
        };
        let kind = match name {
            "net-unreachable" => IcmpKind::NetUnreachable,
            "host-unreachable" => IcmpKind::HostUnreachable,
            "port-unreachable" => IcmpKind::PortUnreachable,
            "time-exceeded" => IcmpKind::TimeExceeded,
            "frag-needed" => {
                let mtu = match mtu {
                    Some(mtu) => mtu
                        .parse::<u16>()
                        .ok()
                        .filter(|&mtu| mtu >= 68)
                        .ok_or_else(|| format!("{mtu:?}: an MTU is 68 to 65535"))?,
                    None => 1400,
                };
                return Ok(IcmpKind::FragNeeded { mtu });
            }
            other => {
                return Err(format!(
                    "{other:?}: the errors are net-unreachable, host-unreachable, \
                     port-unreachable, frag-needed[=MTU] and time-exceeded"
                ));
            }
        };
        match mtu {
            Some(_) => Err(format!("{text:?}: only frag-needed takes =MTU")),
            None => Ok(kind),
        }
    }
}

impl TracePacket {
    /// A new connection's first packet: a TCP SYN, an SCTP INIT, or a UDP datagram.
    pub fn opening(protocol: u8, source: Endpoint, destination: Endpoint) -> Self {
        Self {
            protocol,
            source,
            destination,
            tcp_flags: if proto::is_connection(protocol) {
                tcp_flags::SYN
            } else {
                0
            },
            length: (ip_header_len(source.address) + l4_header_len(protocol)) as u16,
            ttl: 64,
            fragment: Fragment::Whole,
            ip_id: 1,
            icmp_error: None,
        }
    }

    /// Whether the packet is IPv6 (its source is; [`TracePacket::check`] makes sure the
    /// rest is of the same family).
    pub fn is_ipv6(&self) -> bool {
        self.source.address.is_ipv6()
    }

    /// Why this packet cannot be built, if it cannot: addresses of two families, or what
    /// only IPv4 has.
    pub fn check(&self) -> Result<(), String> {
        let family = |address: IpAddr| address.is_ipv6();
        if family(self.destination.address) != self.is_ipv6()
            || self
                .icmp_error
                .and_then(|error| error.from)
                .is_some_and(|from| family(from) != self.is_ipv6())
        {
            return Err(format!(
                "{} → {}: the addresses of a packet are of one family",
                self.source, self.destination
            ));
        }
        if !self.is_ipv6() && u16::try_from(self.ip_id).is_err() {
            return Err(format!(
                "--ip-id {}: IPv4's identification is 16 bits (IPv6's 32)",
                self.ip_id
            ));
        }
        Ok(())
    }

    /// Whether the packet carries IPv6's fragment header.
    fn has_fragment_header(&self) -> bool {
        self.is_ipv6() && self.fragment != Fragment::Whole
    }

    /// Bytes of its IP header (IPv6's with its fragment header).
    fn header_len(&self) -> usize {
        ip_header_len(self.source.address)
            + if self.has_fragment_header() {
                IPV6_FRAGMENT_LEN
            } else {
                0
            }
    }

    /// The IP packet's length as built: [`TracePacket::length`], raised to its headers'
    /// and at least 8 bytes after the IP header.
    pub fn total_len(&self) -> u16 {
        let least = self.header_len() + self.l4_len().max(8);
        self.length.max(least as u16)
    }

    fn l4_len(&self) -> usize {
        match self.fragment {
            Fragment::Later => 0,
            _ => l4_header_len(self.protocol),
        }
    }

    /// Ethernet, then the packet's IPv4 or IPv6 datagram (or the ICMP error about it).
    pub fn frame(&self) -> Vec<u8> {
        let datagram = self.datagram();
        let ethertype = if self.is_ipv6() {
            ETHERTYPE_IPV6
        } else {
            ETHERTYPE_IPV4
        };
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        frame.extend_from_slice(&ethertype);
        match &self.icmp_error {
            None => frame.extend_from_slice(&datagram),
            Some(error) => frame.extend_from_slice(&self.icmp_error_about(error, &datagram)),
        }
        frame
    }

    /// The packet itself, with valid checksums (test-run skbs are not CHECKSUM_PARTIAL, so
    /// the checksum helpers update real sums).
    fn datagram(&self) -> Vec<u8> {
        let fragment_header = self.has_fragment_header();
        let header_len = self.header_len();
        let l4_len = self.l4_len();
        let total_len = usize::from(self.total_len());
        let (flags, offset) = match (self.is_ipv6(), self.fragment) {
            (false, Fragment::Whole) => (IP_DONT_FRAGMENT, 0),
            (false, Fragment::First) => (IP_MORE_FRAGMENTS, 0),
            (false, Fragment::Later) => (0, LATER_FRAGMENT_OFFSET),
            // IPv6: no flags in its header; the fragment header's field below.
            (true, Fragment::First) => (IPV6_MORE_FRAGMENTS, 0),
            (true, _) => (0, IPV6_LATER_FRAGMENT_OFFSET),
        };
        let mut ip = ip_header(
            IpFields {
                total_len,
                // IPv4's 16 bits (`check`); IPv6's go into the fragment header.
                id: self.ip_id as u16,
                flags_and_offset: flags | offset,
                ttl: self.ttl,
                protocol: if fragment_header {
                    IPV6_FRAGMENT
                } else {
                    self.protocol
                },
            },
            self.source.address,
            self.destination.address,
        );
        if fragment_header {
            ip.extend_from_slice(&[self.protocol, 0]);
            ip.extend_from_slice(&(flags | offset).to_be_bytes());
            ip.extend_from_slice(&self.ip_id.to_be_bytes());
        }
        let mut payload = vec![0u8; total_len - header_len];
        if l4_len > 0 {
            let l4 = &mut payload[..l4_len];
            l4[0..2].copy_from_slice(&self.source.port.to_be_bytes());
            l4[2..4].copy_from_slice(&self.destination.port.to_be_bytes());
            if self.protocol == proto::SCTP {
                // Verification tag 1, the chunk, and the CRC32c over the whole packet (a
                // first fragment's: over what is traced).
                l4[4..8].copy_from_slice(&1u32.to_be_bytes());
                l4[12] = sctp_chunk(self.tcp_flags);
                l4[14..16].copy_from_slice(&4u16.to_be_bytes());
                let crc = SCTP_CRC.checksum(&payload).to_le_bytes();
                let field = sctp::CHECKSUM_OFFSET;
                payload[field..field + 4].copy_from_slice(&crc);
                return [&ip[..], &payload].concat();
            }
            let checksum_offset = if self.protocol == proto::TCP {
                l4[4..8].copy_from_slice(&1u32.to_be_bytes()); // sequence number
                l4[12] = (TCP_LEN as u8 / 4) << 4;
                l4[13] = self.tcp_flags;
                l4[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
                16
            } else {
                // A first fragment's UDP length is the whole datagram's; this one's ends
                // here (the checksum covers what is traced).
                let udp_len = (total_len - header_len) as u16;
                l4[4..6].copy_from_slice(&udp_len.to_be_bytes());
                6
            };
            let pseudo = pseudo_header(&ip, self.protocol, payload.len());
            let mut l4_checksum = checksum(&[&pseudo, &payload]);
            // UDP sends a sum of zero as all ones (zero: no checksum, which IPv6 forbids).
            if self.protocol == proto::UDP && l4_checksum == 0 {
                l4_checksum = 0xffff;
            }
            payload[checksum_offset..checksum_offset + 2]
                .copy_from_slice(&l4_checksum.to_be_bytes());
        }
        [&ip[..], &payload].concat()
    }

    /// The ICMP (ICMPv6) error about `datagram`: from the error's sender to the packet's
    /// source, quoting the packet's IP header and first 8 bytes.
    fn icmp_error_about(&self, error: &IcmpError, datagram: &[u8]) -> Vec<u8> {
        let header_len = ip_header_len(self.source.address);
        let quote = &datagram[..(header_len + QUOTED_L4_LEN).min(datagram.len())];
        let (icmp_type, code, rest) = error.kind.header(self.is_ipv6());
        let mut message = [&[icmp_type, code, 0, 0][..], &rest, quote].concat();
        let protocol = if self.is_ipv6() {
            icmp6::PROTOCOL
        } else {
            icmp::PROTOCOL
        };
        let ip = ip_header(
            IpFields {
                total_len: header_len + message.len(),
                id: 0,
                flags_and_offset: 0,
                ttl: 64,
                protocol,
            },
            error.from.unwrap_or(self.destination.address),
            self.source.address,
        );
        // ICMPv6's checksum covers the pseudo-header, ICMP's the message alone.
        let pseudo = if self.is_ipv6() {
            pseudo_header(&ip, protocol, message.len())
        } else {
            Vec::new()
        };
        let icmp_checksum = checksum(&[&pseudo, &message]);
        message[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());
        [&ip[..], &message].concat()
    }

    /// Reads the addresses and ports back from a frame the program returned, as `traced`
    /// (what was sent in) left it: an ICMP error's quoted packet, a later fragment's
    /// addresses (its ports, which it does not carry, stay the traced ones).
    pub fn parse_as(frame: &[u8], traced: &TracePacket) -> Option<Self> {
        let ip = frame.get(ETHERNET_LEN..)?;
        if traced.icmp_error.is_some() {
            // The outer header must still be an ICMP error: an answer in its place, or a
            // drop, leaves something else.
            let outer = IpHeader::parse(ip)?;
            if !outer.is_icmp() {
                return None;
            }
            let quoted = ip.get(outer.len + ICMP_HEADER_LEN..)?;
            let mut about = Self::parse_datagram(quoted, traced)?;
            about.icmp_error = Some(IcmpError {
                from: Some(outer.source),
                ..*traced.icmp_error.as_ref()?
            });
            return Some(about);
        }
        Self::parse_datagram(ip, traced)
    }

    fn parse_datagram(ip: &[u8], traced: &TracePacket) -> Option<Self> {
        let header = IpHeader::parse(ip)?;
        let l4 = ip.get(header.len..)?;
        if header.protocol != traced.protocol {
            return None;
        }
        // A later fragment carries no ports: its datagram's are the traced ones.
        let port = |at: usize, traced: u16| {
            if header.has_ports {
                l4.get(at..at + 2)
                    .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
            } else {
                Some(traced)
            }
        };
        // An ICMP error quotes 8 bytes: the flags are not among them.
        let tcp_flags = match l4.get(13) {
            Some(&flags) if header.protocol == proto::TCP && header.has_ports => flags,
            _ => traced.tcp_flags,
        };
        Some(Self {
            protocol: header.protocol,
            tcp_flags,
            source: Endpoint {
                address: header.source,
                port: port(0, traced.source.port)?,
            },
            destination: Endpoint {
                address: header.destination,
                port: port(2, traced.destination.port)?,
            },
            length: header.total_len,
            ttl: header.ttl,
            ..*traced
        })
    }
}

/// What `trace` reads of an IPv4 or IPv6 header (an IPv6 header without extension headers
/// but a fragment header, as `trace` builds them and the program answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IpHeader {
    /// Bytes of the header (IPv4's with its options; IPv6's with its fragment header).
    pub len: usize,
    /// IPv4's protocol, IPv6's next header.
    pub protocol: u8,
    pub source: IpAddr,
    pub destination: IpAddr,
    /// The packet's length: IPv4's total length, IPv6's header and payload length.
    pub total_len: u16,
    /// The TTL or hop limit.
    pub ttl: u8,
    /// Not a later fragment: the L4 header follows.
    pub has_ports: bool,
}

impl IpHeader {
    pub(super) fn parse(ip: &[u8]) -> Option<Self> {
        let address = |at: usize, len: usize| -> Option<IpAddr> {
            let bytes = ip.get(at..at + len)?;
            Some(match len {
                4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                _ => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
            })
        };
        let word = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes([*ip.get(at)?, *ip.get(at + 1)?]))
        };
        match ip.first()? >> 4 {
            4 => Some(Self {
                len: usize::from(ip.first()? & 0x0f) * 4,
                protocol: *ip.get(9)?,
                source: address(12, 4)?,
                destination: address(16, 4)?,
                total_len: word(2)?,
                ttl: *ip.get(8)?,
                has_ports: word(6)? & FRAGMENT_OFFSET == 0,
            }),
            6 => {
                let fragment = *ip.get(6)? == IPV6_FRAGMENT;
                let (len, protocol, has_ports) = if fragment {
                    (
                        IPV6_LEN + IPV6_FRAGMENT_LEN,
                        *ip.get(IPV6_LEN)?,
                        word(IPV6_LEN + 2)? & IPV6_FRAGMENT_OFFSET == 0,
                    )
                } else {
                    (IPV6_LEN, *ip.get(6)?, true)
                };
                Some(Self {
                    len,
                    protocol,
                    source: address(8, 16)?,
                    destination: address(24, 16)?,
                    total_len: word(4)?.saturating_add(IPV6_LEN as u16),
                    ttl: *ip.get(7)?,
                    has_ports,
                })
            }
            _ => None,
        }
    }

    pub(super) fn is_ipv6(&self) -> bool {
        self.source.is_ipv6()
    }

    /// An ICMP message (ICMPv6 in IPv6) follows.
    pub(super) fn is_icmp(&self) -> bool {
        self.protocol
            == if self.is_ipv6() {
                icmp6::PROTOCOL
            } else {
                icmp::PROTOCOL
            }
    }
}

/// CRC32c, as SCTP computes it (RFC 9260 appendix A).
pub(crate) const SCTP_CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// The IP header of a packet from `source`.
fn ip_header_len(source: IpAddr) -> usize {
    match source {
        IpAddr::V4(_) => IPV4_LEN,
        IpAddr::V6(_) => IPV6_LEN,
    }
}

/// The L4 header a traced packet carries.
fn l4_header_len(protocol: u8) -> usize {
    match protocol {
        proto::TCP => TCP_LEN,
        proto::SCTP => SCTP_LEN,
        _ => UDP_LEN,
    }
}

/// The SCTP chunk type `trace --tcp-flags` stands for: the chunk the datapath reads as
/// those flags (`sctp::tcp_flags_of`).
pub fn sctp_chunk(flags: u8) -> u8 {
    const DATA: u8 = 0;
    if flags & tcp_flags::RST != 0 {
        sctp::chunk::ABORT
    } else if flags & tcp_flags::FIN != 0 {
        sctp::chunk::SHUTDOWN
    } else if flags & tcp_flags::SYN != 0 {
        if flags & tcp_flags::ACK != 0 {
            sctp::chunk::INIT_ACK
        } else {
            sctp::chunk::INIT
        }
    } else {
        DATA
    }
}

/// The name of an SCTP chunk type `trace` builds.
pub fn sctp_chunk_name(chunk: u8) -> &'static str {
    match chunk {
        sctp::chunk::INIT => "INIT",
        sctp::chunk::INIT_ACK => "INIT ACK",
        sctp::chunk::ABORT => "ABORT",
        sctp::chunk::SHUTDOWN => "SHUTDOWN",
        _ => "DATA",
    }
}

/// The IP header fields a traced packet sets (IPv6 takes no identification nor fragment
/// bits: they are in its fragment header).
struct IpFields {
    /// The whole packet's length, header included.
    total_len: usize,
    id: u16,
    flags_and_offset: u16,
    ttl: u8,
    protocol: u8,
}

/// An IPv4 header with its checksum, or an IPv6 header, as the addresses are.
fn ip_header(fields: IpFields, source: IpAddr, destination: IpAddr) -> Vec<u8> {
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let mut ip = [0u8; IPV4_LEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(fields.total_len as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&fields.id.to_be_bytes());
            ip[6..8].copy_from_slice(&fields.flags_and_offset.to_be_bytes());
            ip[8] = fields.ttl;
            ip[9] = fields.protocol;
            ip[12..16].copy_from_slice(&source.octets());
            ip[16..20].copy_from_slice(&destination.octets());
            let ip_checksum = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
            ip.to_vec()
        }
        (source, destination) => {
            let octets = |address: IpAddr| match address {
                IpAddr::V6(address) => address.octets(),
                IpAddr::V4(address) => address.to_ipv6_mapped().octets(),
            };
            let payload_len = (fields.total_len - IPV6_LEN) as u16;
            let mut ip = vec![0x60, 0, 0, 0];
            ip.extend_from_slice(&payload_len.to_be_bytes());
            ip.extend_from_slice(&[fields.protocol, fields.ttl]);
            ip.extend_from_slice(&octets(source));
            ip.extend_from_slice(&octets(destination));
            ip
        }
    }
}

/// The pseudo-header an L4 (or ICMPv6) checksum covers for a payload of `len` bytes after
/// the header `ip`: IPv4's addresses, zero, protocol and 16-bit length; IPv6's addresses,
/// 32-bit length, three zeros and next header (RFC 8200 8.1).
fn pseudo_header(ip: &[u8], protocol: u8, len: usize) -> Vec<u8> {
    if ip[0] >> 4 == 6 {
        [
            &ip[8..40],
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, protocol],
        ]
        .concat()
    } else {
        [&ip[12..20], &[0, protocol], &(len as u16).to_be_bytes()].concat()
    }
}

/// The Internet checksum over the concatenated parts (each of even length but the last).
pub(super) fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests;
