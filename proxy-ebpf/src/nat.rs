//! Address and port rewriting: DNAT towards a backend, reverse NAT of its replies, and the
//! source rewrites of hairpin, SNAT and remapped flows — all one operation: the packet's
//! tuple becomes the tuple its conntrack entry (or new flow) names.
//!
//! Later fragments get the address rewrite alone ([`rewrite_addresses`]), and ICMP errors
//! about a flow the same operations on their outer and quoted headers (`icmp_error`).
//!
//! The new addresses and ports are written in place, the IPv4 header checksum is fixed by
//! the program (IPv6 has none), and the TCP/UDP checksum gets one difference for the addresses (which it
//! covers through its pseudo-header) and one for the ports, through the context
//! ([`Context::add_to_l4_checksum`]), which knows how the skb's checksum is to be completed.
//! SCTP's CRC32c covers no addresses; a port change updates it in place
//! ([`fix_sctp_checksum`]).

use aya_ebpf::cty::c_long;
use proxy_common::{Tuple, proto, sctp};

use crate::{
    context::Context,
    csum,
    family::Family,
    parse::{self, L3_OFFSET, Packet},
};

/// Offsets within the IPv4 header.
const IPV4_CSUM_OFFSET: usize = 10;
const IPV4_SRC_OFFSET: usize = 12;
/// Offsets of the checksum within the TCP and UDP headers.
pub const TCP_CSUM_OFFSET: usize = 16;
pub const UDP_CSUM_OFFSET: usize = 6;
/// A helper failed or the headers were not where the parse found them.
const NOT_WRITABLE: c_long = -1;

/// What replacing the addresses (`src`, `dst`) with (`to_src`, `to_dst`) adds to a
/// checksum over them (the IPv4 header's, or an L4 pseudo-header's).
#[inline(always)]
pub fn address_diff(src: u32, dst: u32, to_src: u32, to_dst: u32) -> u32 {
    let mut diff = 0;
    if src != to_src {
        diff = csum::diff32(src, to_src);
    }
    if dst != to_dst {
        diff = csum::add(diff, csum::diff32(dst, to_dst));
    }
    diff
}

/// Writes the addresses of the IPv4 header at `ip` and updates its checksum by `diff`
/// (their [`address_diff`]).
///
/// # Safety
/// `ip` points to at least 20 writable bytes of packet data, checked against data_end.
#[inline(always)]
pub unsafe fn set_addresses(ip: usize, src: u32, dst: u32, diff: u32) {
    let mut addresses = [0u8; 8];
    addresses[..4].copy_from_slice(&src.to_ne_bytes());
    addresses[4..].copy_from_slice(&dst.to_ne_bytes());
    // SAFETY: within the 20 bytes the caller vouches for.
    unsafe {
        *((ip + IPV4_SRC_OFFSET) as *mut [u8; 8]) = addresses;
        let check = (ip + IPV4_CSUM_OFFSET) as *mut [u8; 2];
        *check = csum::updated(u16::from_ne_bytes(*check), diff).to_ne_bytes();
    }
}

/// Rewrites the addresses of the packet's IP header from (`src`, `dst`) to `to`'s (fixing
/// IPv4's header checksum): all a later fragment needs (its datagram's L4 checksum sits in
/// the first fragment).
#[inline(always)]
pub fn rewrite_addresses<C: Context, A: Family>(
    ctx: &C,
    src: &A,
    dst: &A,
    to: &Tuple<A>,
) -> Result<(), c_long> {
    if *src == to.src_addr && *dst == to.dst_addr {
        return Ok(());
    }
    let ip = parse::at(ctx, L3_OFFSET, A::HEADER_LEN).ok_or(NOT_WRITABLE)?;
    let diff = A::address_diff(src, dst, to);
    // SAFETY: the range was checked against data_end just above.
    unsafe { A::set_addresses(ip, to, diff) };
    Ok(())
}

/// Rewrites `packet`'s addresses and ports to `to` and fixes its checksums.
#[inline(always)]
pub fn rewrite<C: Context, A: Family>(
    ctx: &C,
    packet: &Packet<A>,
    to: &Tuple<A>,
) -> Result<(), c_long> {
    if packet.has_tuple(to) {
        return Ok(());
    }
    // From the packet's fields, not a copy of its tuple (an IPv6 tuple would take 36
    // bytes of the frame).
    let addresses = A::address_diff(&packet.src_addr, &packet.dst_addr, to);
    let mut port_diff = 0;
    if packet.src_port != to.src_port {
        port_diff = csum::diff16(packet.src_port, to.src_port);
    }
    if packet.dst_port != to.dst_port {
        port_diff = csum::add(port_diff, csum::diff16(packet.dst_port, to.dst_port));
    }
    let addresses_changed = packet.src_addr != to.src_addr || packet.dst_addr != to.dst_addr;
    let ports_changed = packet.src_port != to.src_port || packet.dst_port != to.dst_port;

    // In place, before any helper (a helper call invalidates packet pointers).
    let ip = parse::at(ctx, L3_OFFSET, A::HEADER_LEN).ok_or(NOT_WRITABLE)?;
    let l4 = parse::at(ctx, packet.l4_offset, 4).ok_or(NOT_WRITABLE)?;
    // SAFETY: both ranges were checked against data_end just above; tc programs may
    // write packet data (the verifier unclones the skb first).
    unsafe {
        if addresses_changed {
            A::set_addresses(ip, to, addresses);
        }
        if ports_changed {
            *(l4 as *mut [u8; 4]) = port_bytes(to);
        }
    }
    if packet.proto == proto::SCTP {
        if ports_changed {
            fix_sctp_checksum(ctx, packet, to)?;
        }
        return Ok(());
    }
    let udp = packet.proto == proto::UDP;
    let l4_csum = packet.l4_offset
        + if udp {
            UDP_CSUM_OFFSET
        } else {
            TCP_CSUM_OFFSET
        };
    if addresses_changed {
        ctx.add_to_l4_checksum(l4_csum, addresses, true, udp)?;
    }
    if ports_changed {
        ctx.add_to_l4_checksum(l4_csum, port_diff, false, udp)?;
    }
    Ok(())
}

/// The ports of `tuple` as the L4 header's first four bytes.
#[inline(always)]
pub fn port_bytes<A>(tuple: &Tuple<A>) -> [u8; 4] {
    let mut ports = [0u8; 4];
    ports[..2].copy_from_slice(&tuple.src_port.to_ne_bytes());
    ports[2..].copy_from_slice(&tuple.dst_port.to_ne_bytes());
    ports
}

/// The ports of `packet` as its L4 header's first four bytes.
#[inline(always)]
fn packet_port_bytes<A>(packet: &Packet<A>) -> [u8; 4] {
    let mut ports = [0u8; 4];
    ports[..2].copy_from_slice(&packet.src_port.to_ne_bytes());
    ports[2..].copy_from_slice(&packet.dst_port.to_ne_bytes());
    ports
}

/// Updates the CRC32c of an SCTP packet whose ports changed from its own to `to`'s (the
/// addresses are not under it). Two cases leave the field alone:
/// - zero: the sender left the CRC to the device (`CHECKSUM_PARTIAL`; a pod's SCTP
///   socket behind a veth, which offers SCTP CRC offload, sends it so), and the kernel or
///   the NIC computes it over the rewritten packet on the way out. A tc program cannot
///   read `ip_summed`, but the kernel's SCTP writes a zero field when it offloads, and a
///   computed CRC is zero once in 2^32 packets.
/// - the first fragment of a datagram: the CRC covers the whole datagram, whose length
///   the fragment does not tell. SCTP sets DF and splits its own chunks to the path MTU,
///   so such datagrams are rare; the receiver discards one, as a lost packet.
#[inline(always)]
fn fix_sctp_checksum<C: Context, A: Family>(
    ctx: &C,
    packet: &Packet<A>,
    to: &Tuple<A>,
) -> Result<(), c_long> {
    let ip_header_len = (packet.l4_offset - L3_OFFSET) as u16;
    let Some(len) = packet.ip.total_len.checked_sub(ip_header_len) else {
        return Ok(());
    };
    if packet.is_first_fragment() || usize::from(len) < sctp::COMMON_HEADER_LEN {
        return Ok(());
    }
    let header = parse::at(ctx, packet.l4_offset, sctp::COMMON_HEADER_LEN).ok_or(NOT_WRITABLE)?;
    // SAFETY: within the common header, checked against data_end just above.
    unsafe {
        let field = (header + sctp::CHECKSUM_OFFSET) as *mut [u8; 4];
        let stored = *field;
        if stored != [0; 4] {
            let from = packet_port_bytes(packet);
            *field = sctp::checksum_after_port_change(stored, from, port_bytes(to), len);
        }
    }
    Ok(())
}
