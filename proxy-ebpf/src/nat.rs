//! Address and port rewriting: DNAT towards a backend, reverse NAT of its replies.

use aya_ebpf::{cty::c_long, programs::TcContext};

use crate::{
    csum::L4Checksum,
    parse::{L3_OFFSET, Packet},
};

/// Offsets of the addresses within the IPv4 header.
const IPV4_SRC_OFFSET: usize = 12;
const IPV4_DST_OFFSET: usize = 16;
/// Offsets of the ports within the TCP and UDP headers (same in both).
const L4_SRC_PORT_OFFSET: usize = 0;
const L4_DST_PORT_OFFSET: usize = 2;

/// Rewrites the destination to `addr:port` (wire order): client → frontend becomes
/// client → backend (DNAT), and a SNATed reply's node address:port becomes the client.
#[inline(always)]
pub fn rewrite_destination(
    ctx: &TcContext,
    packet: &Packet,
    addr: u32,
    port: u16,
) -> Result<(), c_long> {
    let csum = L4Checksum::of(packet);
    rewrite_addr(
        ctx,
        &csum,
        L3_OFFSET + IPV4_DST_OFFSET,
        packet.dst_addr,
        addr,
    )?;
    rewrite_port(
        ctx,
        &csum,
        packet.l4_offset + L4_DST_PORT_OFFSET,
        packet.dst_port,
        port,
    )
}

/// Rewrites the source to `addr:port` (wire order): backend → client becomes
/// frontend → client, so the client sees the address it connected to; and a SNATed
/// flow's client becomes the node address:port.
#[inline(always)]
pub fn rewrite_source(
    ctx: &TcContext,
    packet: &Packet,
    addr: u32,
    port: u16,
) -> Result<(), c_long> {
    let csum = L4Checksum::of(packet);
    rewrite_addr(
        ctx,
        &csum,
        L3_OFFSET + IPV4_SRC_OFFSET,
        packet.src_addr,
        addr,
    )?;
    rewrite_port(
        ctx,
        &csum,
        packet.l4_offset + L4_SRC_PORT_OFFSET,
        packet.src_port,
        port,
    )
}

/// Hairpin, towards the backend: the source becomes the frontend address the packet was
/// sent to (`ct_flags::HAIRPIN`), so the client, which is the backend, does not get its
/// own address as source. Run after [`rewrite_destination`]: `packet` still holds the original
/// addresses.
#[inline(always)]
pub fn hairpin_source(ctx: &TcContext, packet: &Packet) -> Result<(), c_long> {
    let csum = L4Checksum::of(packet);
    rewrite_addr(
        ctx,
        &csum,
        L3_OFFSET + IPV4_SRC_OFFSET,
        packet.src_addr,
        packet.dst_addr,
    )
}

/// Hairpin, the reply: the destination (the frontend address the client's source became)
/// goes back to the client, which is the replying backend itself. Run after
/// [`rewrite_source`].
#[inline(always)]
pub fn hairpin_destination(ctx: &TcContext, packet: &Packet) -> Result<(), c_long> {
    let csum = L4Checksum::of(packet);
    rewrite_addr(
        ctx,
        &csum,
        L3_OFFSET + IPV4_DST_OFFSET,
        packet.dst_addr,
        packet.src_addr,
    )
}

/// Stores `to` over the address `from` at `offset` and fixes the checksums.
#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    csum: &L4Checksum,
    offset: usize,
    from: u32,
    to: u32,
) -> Result<(), c_long> {
    if from == to {
        return Ok(());
    }
    ctx.store(offset, &to, 0)?;
    csum.address_changed(ctx, from, to)
}

/// Stores `to` over the port `from` at `offset` and fixes the L4 checksum.
#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    csum: &L4Checksum,
    offset: usize,
    from: u16,
    to: u16,
) -> Result<(), c_long> {
    if from == to {
        return Ok(());
    }
    ctx.store(offset, &to, 0)?;
    csum.port_changed(ctx, from, to)
}
