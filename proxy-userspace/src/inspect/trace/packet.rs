//! The packet `trace` runs through the dry run: built byte by byte with valid checksums,
//! and read back from the frame the program leaves.
//!
//! Besides a TCP segment, UDP datagram or SCTP packet it can be one fragment of a datagram (the first,
//! which carries the ports, or a later one, which carries none), a packet of a given
//! length and TTL (to see the forwarding checks answer), or an ICMP error about the
//! packet (to see the error translated as its flow is).

use std::net::Ipv4Addr;

use proxy_common::{icmp, proto, sctp, tcp_flags};

use crate::inspect::Endpoint;

const ETHERNET_LEN: usize = 14;
pub(super) const IPV4_LEN: usize = 20;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// The SCTP common header and one chunk header.
const SCTP_LEN: usize = sctp::COMMON_HEADER_LEN + 4;
const ICMP_HEADER_LEN: usize = 8;
/// The fragment offset of a traced later fragment, in 8-byte units: where the second
/// fragment of a datagram sent over a 1500-byte MTU starts.
const LATER_FRAGMENT_OFFSET: u16 = 1480 / 8;
const IP_DONT_FRAGMENT: u16 = 0x4000;
const IP_MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET: u16 = 0x1fff;

/// The packet to trace: a TCP segment or a UDP datagram (or one fragment of it), or an
/// ICMP error about one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracePacket {
    pub protocol: u8,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// TCP: the flag bits (`proxy_common::tcp_flags`); SCTP: the chunk they stand for
    /// ([`sctp_chunk`]).
    pub tcp_flags: u8,
    /// The IPv4 total length, the payload zero-filled up to it (raised to the headers'
    /// length if shorter).
    pub length: u16,
    pub ttl: u8,
    pub fragment: Fragment,
    /// The IPv4 identification, which names a fragment's datagram.
    pub ip_id: u16,
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
    /// A later fragment (offset 1480): no TCP/UDP header of its own.
    Later,
}

/// An ICMP error about the traced packet, as the host that could not deliver it sends it:
/// from `from` (default: the packet's destination) to the packet's source, quoting the
/// packet's IPv4 header and its first 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    pub kind: IcmpKind,
    pub from: Option<Ipv4Addr>,
}

/// The errors `trace --icmp-error` builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    NetUnreachable,
    HostUnreachable,
    PortUnreachable,
    /// "Fragmentation needed", naming the next hop's MTU.
    FragNeeded {
        mtu: u16,
    },
    TimeExceeded,
}

impl IcmpKind {
    /// ICMP type, code and the header's last four bytes (the MTU of "fragmentation needed").
    pub fn header(self) -> (u8, u8, [u8; 4]) {
        match self {
            IcmpKind::NetUnreachable => (icmp::DEST_UNREACH, icmp::NET_UNREACH, [0; 4]),
            IcmpKind::HostUnreachable => (icmp::DEST_UNREACH, icmp::HOST_UNREACH, [0; 4]),
            IcmpKind::PortUnreachable => (icmp::DEST_UNREACH, icmp::PORT_UNREACH, [0; 4]),
            IcmpKind::FragNeeded { mtu } => {
                let [high, low] = mtu.to_be_bytes();
                (icmp::DEST_UNREACH, icmp::FRAG_NEEDED, [0, 0, high, low])
            }
            IcmpKind::TimeExceeded => (icmp::TIME_EXCEEDED, icmp::TTL_EXCEEDED, [0; 4]),
        }
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
            length: (IPV4_LEN + l4_header_len(protocol)) as u16,
            ttl: 64,
            fragment: Fragment::Whole,
            ip_id: 1,
            icmp_error: None,
        }
    }

    fn l4_len(&self) -> usize {
        match self.fragment {
            Fragment::Later => 0,
            _ => l4_header_len(self.protocol),
        }
    }

    /// Ethernet, then the packet's IPv4 datagram (or the ICMP error about it).
    pub fn frame(&self) -> Vec<u8> {
        let datagram = self.datagram();
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
        match &self.icmp_error {
            None => frame.extend_from_slice(&datagram),
            Some(error) => frame.extend_from_slice(&self.icmp_error_about(error, &datagram)),
        }
        frame
    }

    /// The packet itself: IPv4 with valid checksums (test-run skbs are not
    /// CHECKSUM_PARTIAL, so the checksum helpers update real sums).
    fn datagram(&self) -> Vec<u8> {
        let l4_len = self.l4_len();
        let total_len = usize::from(self.length).max(IPV4_LEN + l4_len.max(8));
        let (flags, offset) = match self.fragment {
            Fragment::Whole => (IP_DONT_FRAGMENT, 0),
            Fragment::First => (IP_MORE_FRAGMENTS, 0),
            Fragment::Later => (0, LATER_FRAGMENT_OFFSET),
        };
        let ip = ipv4_header(
            total_len as u16,
            self.ip_id,
            flags | offset,
            self.ttl,
            self.protocol,
            self.source.address,
            self.destination.address,
        );
        let mut payload = vec![0u8; total_len - IPV4_LEN];
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
                let udp_len = (total_len - IPV4_LEN) as u16;
                l4[4..6].copy_from_slice(&udp_len.to_be_bytes());
                6
            };
            let pseudo_header = [
                &ip[12..20],
                &[0, self.protocol],
                &((total_len - IPV4_LEN) as u16).to_be_bytes(),
            ]
            .concat();
            let l4_checksum = checksum(&[&pseudo_header, &payload]);
            payload[checksum_offset..checksum_offset + 2]
                .copy_from_slice(&l4_checksum.to_be_bytes());
        }
        [&ip[..], &payload].concat()
    }

    /// The ICMP error about `datagram`: from the error's sender to the packet's source,
    /// quoting the packet's IPv4 header and first 8 bytes.
    fn icmp_error_about(&self, error: &IcmpError, datagram: &[u8]) -> Vec<u8> {
        let quote = &datagram[..(IPV4_LEN + 8).min(datagram.len())];
        let (icmp_type, code, rest) = error.kind.header();
        let mut message = [&[icmp_type, code, 0, 0][..], &rest, quote].concat();
        let icmp_checksum = checksum(&[&message]);
        message[2..4].copy_from_slice(&icmp_checksum.to_be_bytes());
        let ip = ipv4_header(
            (IPV4_LEN + message.len()) as u16,
            0,
            0,
            64,
            icmp::PROTOCOL,
            error.from.unwrap_or(self.destination.address),
            self.source.address,
        );
        [&ip[..], &message].concat()
    }

    /// Reads the addresses and ports back from a frame the program returned, as `traced`
    /// (what was sent in) left it: an ICMP error's quoted packet, a later fragment's
    /// addresses (its ports, which it does not carry, stay the traced ones).
    pub fn parse_as(frame: &[u8], traced: &TracePacket) -> Option<Self> {
        let ip = frame.get(ETHERNET_LEN..)?;
        let header_len = usize::from(ip.first()? & 0x0f) * 4;
        let address = |bytes: &[u8], at: usize| -> Option<Ipv4Addr> {
            Some(Ipv4Addr::from(
                <[u8; 4]>::try_from(bytes.get(at..at + 4)?).ok()?,
            ))
        };
        if traced.icmp_error.is_some() {
            // The outer header must still be an ICMP error: an answer in its place, or a
            // drop, leaves something else.
            if *ip.get(9)? != icmp::PROTOCOL {
                return None;
            }
            let quoted = ip.get(header_len + ICMP_HEADER_LEN..)?;
            let mut about = Self::parse_datagram(quoted, traced)?;
            about.icmp_error = Some(IcmpError {
                from: Some(address(ip, 12)?),
                ..*traced.icmp_error.as_ref()?
            });
            return Some(about);
        }
        Self::parse_datagram(ip, traced)
    }

    fn parse_datagram(ip: &[u8], traced: &TracePacket) -> Option<Self> {
        let header_len = usize::from(ip.first()? & 0x0f) * 4;
        let l4 = ip.get(header_len..)?;
        let address = |at: usize| -> Option<Ipv4Addr> {
            Some(Ipv4Addr::from(
                <[u8; 4]>::try_from(ip.get(at..at + 4)?).ok()?,
            ))
        };
        let protocol = *ip.get(9)?;
        if protocol != traced.protocol {
            return None;
        }
        // A later fragment carries no ports: its datagram's are the traced ones.
        let has_ports = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & FRAGMENT_OFFSET == 0;
        let port = |at: usize, traced: u16| {
            if has_ports {
                l4.get(at..at + 2)
                    .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
            } else {
                Some(traced)
            }
        };
        // An ICMP error quotes 8 bytes: the flags are not among them.
        let tcp_flags = match l4.get(13) {
            Some(&flags) if protocol == proto::TCP && has_ports => flags,
            _ => traced.tcp_flags,
        };
        Some(Self {
            protocol,
            tcp_flags,
            source: Endpoint {
                address: address(12)?,
                port: port(0, traced.source.port)?,
            },
            destination: Endpoint {
                address: address(16)?,
                port: port(2, traced.destination.port)?,
            },
            length: u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]),
            ttl: *ip.get(8)?,
            ..*traced
        })
    }
}

/// CRC32c, as SCTP computes it (RFC 9260 appendix A).
pub(crate) const SCTP_CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

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

fn ipv4_header(
    total_len: u16,
    id: u16,
    flags_and_offset: u16,
    ttl: u8,
    protocol: u8,
    source: Ipv4Addr,
    destination: Ipv4Addr,
) -> [u8; IPV4_LEN] {
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total_len.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
    ip[8] = ttl;
    ip[9] = protocol;
    ip[12..16].copy_from_slice(&source.octets());
    ip[16..20].copy_from_slice(&destination.octets());
    let ip_checksum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    ip
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
mod tests {
    use super::super::tests::endpoint;
    use super::*;

    fn packet(protocol: u8) -> TracePacket {
        TracePacket {
            tcp_flags: if protocol == proto::TCP {
                tcp_flags::SYN | tcp_flags::ACK
            } else {
                0
            },
            ..TracePacket::opening(
                protocol,
                endpoint([198, 18, 1, 14], 40000),
                endpoint([198, 19, 0, 10], 80),
            )
        }
    }

    /// Asserts the IPv4 header checksum, and the L4 one when `ports`.
    fn assert_valid(ip: &[u8], ports: bool) {
        assert_eq!(checksum(&[&ip[..IPV4_LEN]]), 0, "IPv4 header checksum");
        if ports {
            let l4 = &ip[IPV4_LEN..];
            let pseudo = [&ip[12..20], &[0, ip[9]], &(l4.len() as u16).to_be_bytes()].concat();
            assert_eq!(checksum(&[&pseudo, l4]), 0, "L4 checksum");
        }
    }

    #[test]
    fn frames_carry_valid_checksums_and_parse_back() {
        for protocol in [proto::TCP, proto::UDP] {
            let packet = packet(protocol);
            let frame = packet.frame();
            assert_valid(&frame[ETHERNET_LEN..], true);
            assert_eq!(TracePacket::parse_as(&frame, &packet), Some(packet));
        }
    }

    #[test]
    fn an_sctp_packet_carries_its_chunk_and_a_valid_crc32c() {
        for (flags, chunk) in [
            (tcp_flags::SYN, sctp::chunk::INIT),
            (tcp_flags::SYN | tcp_flags::ACK, sctp::chunk::INIT_ACK),
            (tcp_flags::RST, sctp::chunk::ABORT),
            (tcp_flags::ACK, 0),
        ] {
            let packet = TracePacket {
                tcp_flags: flags,
                length: 100,
                ..packet(proto::SCTP)
            };
            let frame = packet.frame();
            let ip = &frame[ETHERNET_LEN..];
            assert_eq!(checksum(&[&ip[..IPV4_LEN]]), 0, "IPv4 header checksum");
            let mut sctp = ip[IPV4_LEN..].to_vec();
            assert_eq!(sctp.len(), 80);
            assert_eq!(sctp[12], chunk);
            assert_eq!(
                sctp::tcp_flags_of(chunk) & tcp_flags::SYN,
                flags & tcp_flags::SYN
            );
            let field = sctp::CHECKSUM_OFFSET..sctp::CHECKSUM_OFFSET + 4;
            let stored: [u8; 4] = sctp[field.clone()].try_into().unwrap();
            sctp[field].fill(0);
            // CRC-32C's catalogue form, bit by bit (not the crate the frame was built with).
            let mut crc = !0u32;
            for byte in &sctp {
                crc ^= u32::from(*byte);
                for _ in 0..8 {
                    crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
                }
            }
            assert_eq!(stored, (!crc).to_le_bytes());
            assert_eq!(TracePacket::parse_as(&frame, &packet), Some(packet));
        }
    }

    #[test]
    fn a_long_packet_is_padded_and_fragments_say_which_part_they_are() {
        let long = TracePacket {
            length: 1400,
            ..packet(proto::UDP)
        };
        let frame = long.frame();
        assert_eq!(frame.len(), ETHERNET_LEN + 1400);
        assert_valid(&frame[ETHERNET_LEN..], true);
        assert_eq!(frame[ETHERNET_LEN + 6], 0x40, "don't fragment");

        let first = TracePacket {
            fragment: Fragment::First,
            ip_id: 0x1234,
            ..long
        };
        let frame = first.frame();
        assert_eq!(
            &frame[ETHERNET_LEN + 4..ETHERNET_LEN + 8],
            [0x12, 0x34, 0x20, 0]
        );
        assert_eq!(TracePacket::parse_as(&frame, &first), Some(first));

        let later = TracePacket {
            fragment: Fragment::Later,
            ..first
        };
        let frame = later.frame();
        assert_valid(&frame[ETHERNET_LEN..], false);
        assert_eq!(
            &frame[ETHERNET_LEN + 6..ETHERNET_LEN + 8],
            185u16.to_be_bytes(),
            "offset 1480, no more fragments"
        );
        // No ports on the wire: the payload starts right after the IPv4 header.
        assert!(
            frame[ETHERNET_LEN + IPV4_LEN..]
                .iter()
                .all(|&byte| byte == 0)
        );
        assert_eq!(TracePacket::parse_as(&frame, &later), Some(later));
    }

    #[test]
    fn an_icmp_error_quotes_the_packet_from_its_destination() {
        let about = packet(proto::UDP);
        let traced = TracePacket {
            icmp_error: Some(IcmpError {
                kind: IcmpKind::FragNeeded { mtu: 1000 },
                from: None,
            }),
            ..about
        };
        let frame = traced.frame();
        let ip = &frame[ETHERNET_LEN..];
        assert_eq!(checksum(&[&ip[..IPV4_LEN]]), 0);
        assert_eq!(ip[9], icmp::PROTOCOL);
        assert_eq!(&ip[12..16], about.destination.address.octets());
        assert_eq!(&ip[16..20], about.source.address.octets());
        let message = &ip[IPV4_LEN..];
        assert_eq!(checksum(&[message]), 0, "ICMP checksum");
        assert_eq!(&message[..2], [3, 4]);
        assert_eq!(&message[6..8], 1000u16.to_be_bytes());
        assert_eq!(
            &message[8..],
            &about.frame()[ETHERNET_LEN..ETHERNET_LEN + 28]
        );
        let parsed = TracePacket::parse_as(&frame, &traced).unwrap();
        assert_eq!(
            (parsed.source, parsed.destination),
            (about.source, about.destination)
        );
        assert_eq!(
            parsed.icmp_error.and_then(|error| error.from),
            Some(about.destination.address)
        );
    }

    #[test]
    fn icmp_errors_parse_by_name() {
        assert_eq!(
            "frag-needed=1000".parse(),
            Ok(IcmpKind::FragNeeded { mtu: 1000 })
        );
        assert_eq!(
            "frag-needed".parse(),
            Ok(IcmpKind::FragNeeded { mtu: 1400 })
        );
        assert_eq!("port-unreachable".parse(), Ok(IcmpKind::PortUnreachable));
        assert!("frag-needed=20".parse::<IcmpKind>().is_err());
        assert!("port-unreachable=3".parse::<IcmpKind>().is_err());
        assert!("echo".parse::<IcmpKind>().is_err());
    }
}
