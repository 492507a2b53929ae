use super::super::tests::{endpoint, endpoint6};
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
    assert_eq!(
        IpAddr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
        about.destination.address
    );
    assert_eq!(
        IpAddr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        about.source.address
    );
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

fn packet6(protocol: u8) -> TracePacket {
    TracePacket {
        length: 200,
        ..TracePacket::opening(
            protocol,
            endpoint6("2001:db8:1::14", 40000),
            endpoint6("2001:db8:ff::10", 80),
        )
    }
}

/// Asserts an IPv6 packet's L4 checksum over its pseudo-header, summed here word by
/// word from the header's fields (not with the builder's helpers).
fn assert_valid6(ip: &[u8]) {
    assert_eq!(ip[0] >> 4, 6, "version");
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    assert_eq!(ip.len(), IPV6_LEN + payload_len, "payload length");
    let next_header = ip[6];
    let l4 = &ip[IPV6_LEN..];
    let mut sum: u64 = ip[8..40]
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    sum += payload_len as u64 + u64::from(next_header);
    sum += l4
        .chunks(2)
        .map(|pair| u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum::<u64>();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    assert_eq!(sum, 0xffff, "L4 checksum over the IPv6 pseudo-header");
}

#[test]
fn ipv6_frames_carry_valid_checksums_and_parse_back() {
    for protocol in [proto::TCP, proto::UDP] {
        let packet = packet6(protocol);
        let frame = packet.frame();
        assert_eq!(&frame[12..14], [0x86, 0xdd], "ethertype");
        let ip = &frame[ETHERNET_LEN..];
        assert_eq!(ip.len(), 200);
        assert_eq!((ip[6], ip[7]), (protocol, 64), "next header, hop limit");
        assert_eq!(
            &ip[8..24],
            &"2001:db8:1::14"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_valid6(ip);
        assert_eq!(TracePacket::parse_as(&frame, &packet), Some(packet));
    }
    // SCTP carries its CRC32c, no pseudo-header sum.
    let sctp = packet6(proto::SCTP);
    let frame = sctp.frame();
    let mut chunk = frame[ETHERNET_LEN + IPV6_LEN..].to_vec();
    let field = sctp::CHECKSUM_OFFSET..sctp::CHECKSUM_OFFSET + 4;
    let stored: [u8; 4] = chunk[field.clone()].try_into().unwrap();
    chunk[field].fill(0);
    assert_eq!(stored, SCTP_CRC.checksum(&chunk).to_le_bytes());
    assert_eq!(TracePacket::parse_as(&frame, &sctp), Some(sctp));
    assert_eq!(packet6(proto::TCP).check(), Ok(()));
}

#[test]
fn an_icmpv6_error_quotes_the_packet_with_its_pseudo_header_checksum() {
    let about = packet6(proto::UDP);
    let traced = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::FragNeeded { mtu: 1280 },
            from: Some("2001:db8::1".parse().unwrap()),
        }),
        ..about
    };
    let frame = traced.frame();
    let ip = &frame[ETHERNET_LEN..];
    assert_eq!(ip[6], icmp6::PROTOCOL);
    assert_valid6(ip);
    let message = &ip[IPV6_LEN..];
    assert_eq!(&message[..2], [2, 0], "packet too big");
    assert_eq!(&message[4..8], 1280u32.to_be_bytes());
    assert_eq!(
        &message[8..],
        &about.frame()[ETHERNET_LEN..ETHERNET_LEN + IPV6_LEN + 8]
    );
    let parsed = TracePacket::parse_as(&frame, &traced).unwrap();
    assert_eq!(
        (parsed.source, parsed.destination, parsed.icmp_error),
        (about.source, about.destination, traced.icmp_error)
    );
    for kind in [
        IcmpKind::NetUnreachable,
        IcmpKind::HostUnreachable,
        IcmpKind::PortUnreachable,
        IcmpKind::FragNeeded { mtu: 1280 },
        IcmpKind::TimeExceeded,
    ] {
        for ipv6 in [false, true] {
            let (icmp_type, code, rest) = kind.header(ipv6);
            assert_eq!(IcmpKind::of(ipv6, icmp_type, code, rest), Some(kind));
        }
    }
}

#[test]
fn a_packet_of_two_families_or_an_ipv4_id_over_16_bits_is_refused() {
    let mixed = TracePacket {
        destination: endpoint([198, 19, 0, 10], 80),
        ..packet6(proto::TCP)
    };
    assert!(mixed.check().unwrap_err().contains("one family"));
    let long_id = TracePacket {
        fragment: Fragment::First,
        ip_id: 0x1_0000,
        ..packet(proto::UDP)
    };
    assert!(long_id.check().unwrap_err().contains("16 bits"));
    // IPv6's identification is 32 bits.
    let ipv6 = TracePacket {
        fragment: Fragment::First,
        ip_id: 0x1_0000,
        ..packet6(proto::UDP)
    };
    assert_eq!(ipv6.check(), Ok(()));
    let error_from_v4 = TracePacket {
        icmp_error: Some(IcmpError {
            kind: IcmpKind::PortUnreachable,
            from: Some("198.18.0.1".parse().unwrap()),
        }),
        ..packet6(proto::UDP)
    };
    assert!(error_from_v4.check().is_err());
}

/// The IPv6 packet `ip` without its fragment header (its next header and payload length
/// set back): the datagram the fragment's L4 checksum is over.
fn without_fragment_header(ip: &[u8]) -> Vec<u8> {
    let mut header = ip[..IPV6_LEN].to_vec();
    header[6] = ip[IPV6_LEN];
    let payload_len = u16::from_be_bytes([ip[4], ip[5]]) - 8;
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    [&header[..], &ip[IPV6_LEN + 8..]].concat()
}

#[test]
fn ipv6_fragments_carry_a_fragment_header_and_parse_back() {
    let first = TracePacket {
        fragment: Fragment::First,
        ip_id: 0x1234_5678,
        ..packet6(proto::UDP)
    };
    let frame = first.frame();
    let ip = &frame[ETHERNET_LEN..];
    assert_eq!(ip.len(), 200);
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 160, "payload length");
    assert_eq!(ip[6], 44, "a fragment header follows");
    assert_eq!(
        ip[IPV6_LEN..IPV6_LEN + 8],
        [proto::UDP, 0, 0, 1, 0x12, 0x34, 0x56, 0x78],
        "UDP next, offset 0 with more fragments, the identification"
    );
    assert_eq!(
        &ip[IPV6_LEN + 8..IPV6_LEN + 12],
        [0x9c, 0x40, 0, 80],
        "ports"
    );
    assert_valid6(&without_fragment_header(ip));
    assert_eq!(TracePacket::parse_as(&frame, &first), Some(first));

    let later = TracePacket {
        fragment: Fragment::Later,
        ..first
    };
    let frame = later.frame();
    let ip = &frame[ETHERNET_LEN..];
    assert_eq!(
        ip[IPV6_LEN..IPV6_LEN + 8],
        [proto::UDP, 0, 0x05, 0xa8, 0x12, 0x34, 0x56, 0x78],
        "offset 1448, no more fragments"
    );
    assert!(ip[IPV6_LEN + 8..].iter().all(|&byte| byte == 0), "no ports");
    assert_eq!(TracePacket::parse_as(&frame, &later), Some(later));
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
