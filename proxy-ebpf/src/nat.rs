//! Address and port rewriting: DNAT towards a backend, reverse NAT of its replies, and the
//! source rewrites of hairpin, SNAT and remapped flows — all one operation: the packet's
//! tuple becomes the tuple its conntrack entry (or new flow) names.
//!
//! The new addresses and ports are written in place, the IPv4 header checksum is fixed by
//! the program, and the TCP/UDP checksum gets one difference for the addresses (which it
//! covers through its pseudo-header) and one for the ports, through the context
//! ([`Context::add_to_l4_checksum`]), which knows how the skb's checksum is to be completed.

use aya_ebpf::cty::c_long;
use proxy_common::{Tuple, proto};

use crate::{
    context::Context,
    csum,
    parse::{self, L3_OFFSET, Packet},
};

/// Offsets within the IPv4 header.
const IPV4_CSUM_OFFSET: usize = 10;
const IPV4_SRC_OFFSET: usize = 12;
const IPV4_LEN: usize = 20;
/// Offsets of the checksum within the TCP and UDP headers.
const TCP_CSUM_OFFSET: usize = 16;
const UDP_CSUM_OFFSET: usize = 6;
/// A helper failed or the headers were not where the parse found them.
const NOT_WRITABLE: c_long = -1;

/// Rewrites `packet`'s addresses and ports to `to` and fixes its checksums.
#[inline(always)]
pub fn rewrite<C: Context>(ctx: &C, packet: &Packet, to: &Tuple) -> Result<(), c_long> {
    let from = packet.tuple();
    if from == *to {
        return Ok(());
    }
    let mut address_diff = 0;
    if from.src_addr != to.src_addr {
        address_diff = csum::diff32(from.src_addr, to.src_addr);
    }
    if from.dst_addr != to.dst_addr {
        address_diff = csum::add(address_diff, csum::diff32(from.dst_addr, to.dst_addr));
    }
    let mut port_diff = 0;
    if from.src_port != to.src_port {
        port_diff = csum::diff16(from.src_port, to.src_port);
    }
    if from.dst_port != to.dst_port {
        port_diff = csum::add(port_diff, csum::diff16(from.dst_port, to.dst_port));
    }
    let addresses_changed = from.src_addr != to.src_addr || from.dst_addr != to.dst_addr;
    let ports_changed = from.src_port != to.src_port || from.dst_port != to.dst_port;

    // In place, before any helper (a helper call invalidates packet pointers).
    let ip = parse::at(ctx, L3_OFFSET, IPV4_LEN).ok_or(NOT_WRITABLE)?;
    let l4 = parse::at(ctx, packet.l4_offset, 4).ok_or(NOT_WRITABLE)?;
    // SAFETY: both ranges were checked against data_end just above; tc programs may
    // write packet data (the verifier unclones the skb first).
    unsafe {
        if addresses_changed {
            let mut addresses = [0u8; 8];
            addresses[..4].copy_from_slice(&to.src_addr.to_ne_bytes());
            addresses[4..].copy_from_slice(&to.dst_addr.to_ne_bytes());
            *((ip + IPV4_SRC_OFFSET) as *mut [u8; 8]) = addresses;
            let check = (ip + IPV4_CSUM_OFFSET) as *mut [u8; 2];
            let updated = csum::updated(u16::from_ne_bytes(*check), address_diff);
            *check = updated.to_ne_bytes();
        }
        if ports_changed {
            let mut ports = [0u8; 4];
            ports[..2].copy_from_slice(&to.src_port.to_ne_bytes());
            ports[2..].copy_from_slice(&to.dst_port.to_ne_bytes());
            *(l4 as *mut [u8; 4]) = ports;
        }
    }
    let udp = packet.proto == proto::UDP;
    let l4_csum = packet.l4_offset
        + if udp {
            UDP_CSUM_OFFSET
        } else {
            TCP_CSUM_OFFSET
        };
    if addresses_changed {
        ctx.add_to_l4_checksum(l4_csum, address_diff, true, udp)?;
    }
    if ports_changed {
        ctx.add_to_l4_checksum(l4_csum, port_diff, false, udp)?;
    }
    Ok(())
}
