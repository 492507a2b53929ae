//! Incremental checksum fixes after a rewrite, through the kernel helpers.
//!
//! The helpers handle every `ip_summed` state: for CHECKSUM_PARTIAL skbs (local sockets
//! over veth) they adjust only the pseudo-header seed the device or stack completes
//! later; for CHECKSUM_COMPLETE they keep `skb->csum` in step. Recomputing a full
//! checksum by hand would break the former.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::c_long,
    programs::TcContext,
};
use proxy_common::proto;

use crate::parse::{L3_OFFSET, Packet};

/// Offset of the checksum within the IPv4 header.
const IPV4_CSUM_OFFSET: usize = 10;
/// Offset of the checksum within the TCP header.
const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum within the UDP header.
const UDP_CSUM_OFFSET: usize = 6;

/// The packet's L4 checksum field and how the helpers must treat it.
pub struct L4Checksum {
    offset: usize,
    /// UDP: `BPF_F_MARK_MANGLED_0` leaves an absent (zero) checksum zero and writes a
    /// computed zero as 0xffff, as RFC 768 requires.
    flags: u64,
}

impl L4Checksum {
    #[inline(always)]
    pub fn of(packet: &Packet) -> Self {
        if packet.proto == proto::UDP {
            Self {
                offset: packet.l4_offset + UDP_CSUM_OFFSET,
                flags: BPF_F_MARK_MANGLED_0.into(),
            }
        } else {
            Self {
                offset: packet.l4_offset + TCP_CSUM_OFFSET,
                flags: 0,
            }
        }
    }

    /// Fixes the IPv4 header checksum and the L4 checksum (whose pseudo-header includes
    /// the addresses) after an IPv4 address changed `from` → `to` (wire order).
    #[inline(always)]
    pub fn address_changed(&self, ctx: &TcContext, from: u32, to: u32) -> Result<(), c_long> {
        let size = size_of::<u32>() as u64;
        ctx.l3_csum_replace(L3_OFFSET + IPV4_CSUM_OFFSET, from.into(), to.into(), size)?;
        ctx.l4_csum_replace(
            self.offset,
            from.into(),
            to.into(),
            u64::from(BPF_F_PSEUDO_HDR) | self.flags | size,
        )
    }

    /// Fixes the L4 checksum after a port changed `from` → `to` (wire order).
    #[inline(always)]
    pub fn port_changed(&self, ctx: &TcContext, from: u16, to: u16) -> Result<(), c_long> {
        let size = size_of::<u16>() as u64;
        ctx.l4_csum_replace(self.offset, from.into(), to.into(), self.flags | size)
    }
}

/// The ones' complement sum of `bytes` as big-endian 16-bit words (an even count of
/// bytes), not yet folded: for checksums over bytes the program builds itself.
#[inline(always)]
pub fn ones_complement_sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0;
    let mut index = 0;
    while index + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[index], bytes[index + 1]]));
        index += 2;
    }
    sum
}

/// The Internet checksum (RFC 1071) of `bytes` plus an already summed `partial`, in wire
/// order, ready to store. The checksum field inside `bytes` must be zero.
#[inline(always)]
pub fn internet_checksum<const N: usize>(bytes: &[u8; N], partial: u32) -> [u8; 2] {
    let mut sum = u64::from(ones_complement_sum(bytes)) + u64::from(partial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 bits.
    (!(sum as u16)).to_be_bytes()
}
