//! Measurement 1b, per-packet cost of the packets around a translated flow (issue 19),
//! with the same harness as the per-packet section: the real `epx_ingress` run by
//! BPF_PROG_TEST_RUN, `repeat` iterations per call, each verified by its counter.
//!
//! Every figure belongs to one established TCP flow, client → VIP → backend (assured, in
//! CONNTRACK), and repeats in place by the per-packet section's mirror method: a mirror
//! entry translates the packet back, so every iteration takes the measured path again.
//! - **established, 54 bytes**: the per-packet section's established packet, for reference.
//! - **established, 1,500 bytes**: a full-size segment with "don't fragment": the egress
//!   MTU check adds a FIB lookup (`bpf_fib_lookup` with the length) before the rewrite.
//! - **later fragment**: a 1,500-byte fragment after the first of one of the flow's
//!   datagrams: a FRAGMENTS lookup and the address rewrite (the mirror: a FRAGMENTS record
//!   for the translated datagram). The protocol plays no part on this path, so the flow's
//!   TCP serves as well as UDP would.
//! - **ICMP error**: a router's "fragmentation needed" about one of the flow's segments
//!   (the Path-MTU case): the conntrack lookup by the quote, then the outer and quoted
//!   headers and all four checksums rewritten (the mirror: a conntrack entry for the
//!   translated quote).
//! - **SCTP established, 50 and 1,500 bytes**: an association to the same Service's SCTP
//!   port (port 80 → target port 8080), assured after INIT, INIT ACK and a client chunk:
//!   its DATA packets' ports change, so the CRC32c is updated (`proxy_common::sctp`: two
//!   table lookups and two carry-less multiplications, whatever the length), where TCP's
//!   checksum takes its two differences.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};
use aya::maps::HashMap as BpfHashMap;
use etherparse::{Icmpv4Header, Icmpv4Type, PacketBuilder, icmpv4::DestUnreachableHeader};
use proxy_common::{
    CtKey, CtValue, FragmentKey, FragmentValue, fragment_verdict, map_names, proto, stat, tcp_flags,
};
use proxy_userspace::inspect::Endpoint;
use proxy_userspace::inspect::trace::TracePacket;
use proxy_userspace::plan;

use crate::cluster::{Cluster, Endpoints, lab_node};
use crate::packet::{CLIENT, LoadedProgram, PacketSettings, destination, tuple};
use crate::stats::Summary;

/// The IPv4 identification of the measured datagram.
const DATAGRAM_ID: u16 = 0x5eed;
/// A router on the way to the backend.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const FULL_SIZE: usize = 1500;
const ETHERNET: usize = 14;
const IPV4: usize = 20;

/// Nanoseconds per packet, over the runs.
#[derive(Clone, Debug)]
pub struct RelatedCosts {
    pub established: Summary,
    pub established_full_size: Summary,
    pub later_fragment: Summary,
    pub icmp_error: Summary,
    pub sctp_established: Summary,
    pub sctp_established_full_size: Summary,
}

pub fn measure(settings: &PacketSettings) -> Result<RelatedCosts> {
    let cluster = Cluster::new(1, Endpoints::Distinct { per_service: 10 })?;
    let planned = plan::plan(&cluster.model_with_sctp()?, &lab_node());
    let mut datapath = LoadedProgram::load(1)?;
    let report = datapath.writer.apply(&planned.desired);
    anyhow::ensure!(report.complete(), "filling the maps failed: {report:?}");
    let service = cluster.service(0);
    let vip = SocketAddrV4::new(service.vip, service.port);

    let ack = datapath.open_established_flow(&service)?;
    let backend = destination(&datapath.once(&ack, stat::CT_HIT)?)?;
    let full_size = segment(CLIENT, vip, FULL_SIZE, 0x4000)?;
    let [first, later] = fragments(&segment(CLIENT, vip, 3000, 0)?);
    datapath.once(&first, stat::CT_HIT)?;
    let error = frag_needed_about(&segment(CLIENT, backend, FULL_SIZE, 0x4000)?);
    mirror_the_quote(&mut datapath, CLIENT, vip, backend)?;
    let sctp_data = open_sctp_association(&mut datapath, vip)?;
    let sctp_full_size = sctp_packet(CLIENT, vip, tcp_flags::ACK, FULL_SIZE);

    let mut figures: [Vec<f64>; 6] = Default::default();
    for _ in 0..settings.runs {
        // A fragment's record stands for the reassembly timeout: renewed before each run.
        record_fragments(&mut datapath, CLIENT, vip, backend)?;
        let measured = [
            datapath.repeated(&ack, settings.repeat, stat::CT_HIT)?,
            datapath.repeated(&full_size, settings.repeat, stat::CT_HIT)?,
            datapath.repeated(&later, settings.repeat, stat::FRAGMENT)?,
            datapath.repeated(&error, settings.repeat, stat::ICMP_ERROR)?,
            datapath.repeated(&sctp_data, settings.repeat, stat::CT_HIT)?,
            datapath.repeated(&sctp_full_size, settings.repeat, stat::CT_HIT)?,
        ];
        for (figure, value) in figures.iter_mut().zip(measured) {
            figure.push(value);
        }
    }
    let summary = |values: &[f64]| Summary::of(values).context("no runs");
    Ok(RelatedCosts {
        established: summary(&figures[0])?,
        established_full_size: summary(&figures[1])?,
        later_fragment: summary(&figures[2])?,
        icmp_error: summary(&figures[3])?,
        sctp_established: summary(&figures[4])?,
        sctp_established_full_size: summary(&figures[5])?,
    })
}

/// An SCTP packet of `length` bytes (IPv4) whose first chunk `flags` stand for (INIT,
/// INIT ACK, DATA: `trace`'s mapping), CRC32c complete.
fn sctp_packet(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, length: usize) -> Vec<u8> {
    let endpoint = |end: SocketAddrV4| Endpoint {
        address: (*end.ip()).into(),
        port: end.port(),
    };
    TracePacket {
        tcp_flags: flags,
        length: length as u16,
        ..TracePacket::opening(proto::SCTP, endpoint(src), endpoint(dst))
    }
    .frame()
}

/// Opens an association from [`CLIENT`] to the SCTP port at `vip` (INIT, the backend's
/// INIT ACK, a client chunk: assured) and mirrors it as `open_established_flow` does, so
/// its DATA packet is a conntrack hit with a full rewrite at every iteration. Returns that
/// packet (50 bytes).
fn open_sctp_association(datapath: &mut LoadedProgram, vip: SocketAddrV4) -> Result<Vec<u8>> {
    let small = IPV4 + 16;
    let out = datapath.once(
        &sctp_packet(CLIENT, vip, tcp_flags::SYN, small),
        stat::NEW_FLOW,
    )?;
    let backend = SocketAddrV4::new(
        Ipv4Addr::from(<[u8; 4]>::try_from(&out[ETHERNET + 16..ETHERNET + 20])?),
        u16::from_be_bytes([out[ETHERNET + IPV4 + 2], out[ETHERNET + IPV4 + 3]]),
    );
    let init_ack = sctp_packet(backend, CLIENT, tcp_flags::SYN | tcp_flags::ACK, small);
    datapath.once(&init_ack, stat::REPLY)?;
    let data = sctp_packet(CLIENT, vip, tcp_flags::ACK, small);
    datapath.once(&data, stat::CT_HIT)?;
    let key = |dst| CtKey::new(tuple(CLIENT, dst), proto::SCTP);
    let forward = (datapath.conntrack.get(&key(vip), 0))
        .context("the association is not assured after its handshake")?;
    let back_to_vip = CtValue {
        to: tuple(CLIENT, vip),
        ..forward
    };
    datapath.conntrack.insert(key(backend), back_to_vip, 0)?;
    Ok(data)
}

/// A TCP ACK of `length` bytes (IPv4) with the given flags-and-offset field; checksums
/// complete.
fn segment(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    length: usize,
    flags_and_offset: u16,
) -> Result<Vec<u8>> {
    let payload = vec![0x5a; length - IPV4 - 20];
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), 1, 64_240)
        .ack(1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, &payload)?;
    let ip = &mut frame[ETHERNET..];
    ip[4..6].copy_from_slice(&DATAGRAM_ID.to_be_bytes());
    ip[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
    set_ip_checksum(ip);
    Ok(frame)
}

/// `frame`'s datagram cut after 1,480 bytes of payload: its first and its second fragment.
fn fragments(frame: &[u8]) -> [Vec<u8>; 2] {
    let (head, data) = frame.split_at(ETHERNET + IPV4);
    let fragment = |part: &[u8], flags_and_offset: u16| {
        let mut out = [head, part].concat();
        let ip = &mut out[ETHERNET..];
        ip[2..4].copy_from_slice(&((IPV4 + part.len()) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
        set_ip_checksum(ip);
        out
    };
    let at = FULL_SIZE - IPV4;
    [
        fragment(&data[..at], 0x2000),
        fragment(&data[at..], (at / 8) as u16),
    ]
}

/// A router's "fragmentation needed" (MTU 1400) about `packet`, to its source.
fn frag_needed_about(packet: &[u8]) -> Vec<u8> {
    let quote = &packet[ETHERNET..ETHERNET + IPV4 + 8];
    let icmp = Icmpv4Header::with_checksum(
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
        quote,
    );
    let mut ip = etherparse::Ipv4Header::new(
        (icmp.header_len() + quote.len()) as u16,
        64,
        etherparse::IpNumber::ICMP,
        ROUTER.octets(),
        packet[ETHERNET + 12..ETHERNET + 16]
            .try_into()
            .expect("4 bytes"),
    )
    .expect("a valid header");
    ip.header_checksum = ip.calc_header_checksum();
    let eth = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    [&eth[..], &ip.to_bytes(), &icmp.to_bytes(), quote].concat()
}

fn set_ip_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = ip[..IPV4]
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    ip[10..12].copy_from_slice(&(!(folded as u16)).to_be_bytes());
}

/// The mirror of the flow's backend entry for the ICMP error: once translated, the error
/// quotes client → VIP, so an entry keyed VIP → client translates the quote back to
/// client → backend.
fn mirror_the_quote(
    datapath: &mut LoadedProgram,
    client: SocketAddrV4,
    vip: SocketAddrV4,
    backend: SocketAddrV4,
) -> Result<()> {
    let reply = datapath
        .conntrack
        .get(&CtKey::new(tuple(backend, client), proto::TCP), 0)
        .context("the flow has no backend entry")?;
    datapath.conntrack.insert(
        CtKey::new(tuple(vip, client), proto::TCP),
        CtValue {
            to: tuple(backend, client),
            ..reply
        },
        0,
    )?;
    Ok(())
}

/// FRAGMENTS records, fresh, for the measured datagram and for it translated (the
/// mirror), each rewriting to the other.
fn record_fragments(
    datapath: &mut LoadedProgram,
    client: SocketAddrV4,
    vip: SocketAddrV4,
    backend: SocketAddrV4,
) -> Result<()> {
    let mut map: BpfHashMap<_, FragmentKey, FragmentValue> = datapath
        .ebpf
        .map_mut(map_names::FRAGMENTS)
        .context("the object has no FRAGMENTS")?
        .try_into()?;
    let seen_ns = proxy_userspace::conntrack::monotonic_now_ns();
    for (from, to) in [(vip, backend), (backend, vip)] {
        let key = FragmentKey {
            src_addr: u32::from_ne_bytes(client.ip().octets()),
            dst_addr: u32::from_ne_bytes(from.ip().octets()),
            id: DATAGRAM_ID.to_be(),
            proto: proto::TCP,
            _pad: 0,
        };
        let value = FragmentValue {
            to: tuple(client, to),
            verdict: fragment_verdict::FORWARD,
            routes_itself: 0,
            _pad: [0; 2],
            seen_ns,
        };
        map.insert(key, value, 0)?;
    }
    Ok(())
}
