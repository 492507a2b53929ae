//! Refusal of new connections to a frontend without endpoints, generated in the program:
//! kube-proxy's `REJECT` rule, whose answer is an ICMP port unreachable for TCP and UDP
//! alike (Cilium drops instead, and the client waits for its timeout).
//!
//! The packet is rewritten in place into the answer and sent back out of the device it
//! arrived on (`bpf_redirect`): Ethernet addresses swapped, a new IPv4 header from the
//! frontend to the client, ICMP type 3 code 3, then the original IPv4 header and the first
//! 8 bytes of its payload (RFC 792), by which the client's kernel finds the socket to fail.
//!
//! Not yet handled: a packet whose L4 checksum a device was still to complete
//! (CHECKSUM_PARTIAL: a sender on this host, through a veth or virtio) keeps that state.
//! A veth peer takes the answer as verified, which is the pod case; a device that would
//! complete the checksum on the way out would write into the quoted bytes.

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    cty::c_long,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    csum,
    parse::{L3_OFFSET, Packet},
};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// IPv4 version 4, header length 5 words.
const IPV4_VERSION_IHL: u8 = 0x45;
/// The precedence the kernel gives its own ICMP errors (IPTOS_PREC_INTERNETCONTROL).
const TOS_INTERNETCONTROL: u8 = 0xc0;
const TTL: u8 = 64;
/// Bytes of the refused datagram quoted after its header: its ports (RFC 792).
const QUOTED_PAYLOAD_LEN: usize = 8;
const ICMP_HEADER_LEN: usize = 8;

/// The answer, byte for byte: Ethernet, IPv4, ICMP, and the quote of the refused packet.
#[repr(C)]
struct PortUnreachable {
    eth: [u8; EthHdr::LEN],
    ip: [u8; Ipv4Hdr::LEN],
    icmp: [u8; ICMP_HEADER_LEN],
    quote: [u8; Ipv4Hdr::LEN + QUOTED_PAYLOAD_LEN],
}

/// Why no answer was sent; the caller drops the packet.
pub enum NotRefused {
    /// IPv4 options: the quote would not fit the fixed answer (such packets are rare
    /// enough that dropping them costs nothing).
    IpOptions,
    /// A helper failed (the packet may be half rewritten).
    HelperFailed,
}

impl From<c_long> for NotRefused {
    fn from(_: c_long) -> Self {
        NotRefused::HelperFailed
    }
}

/// Turns `packet` into an ICMP port unreachable to its sender and redirects it back out
/// of its ingress device; returns the verdict (TC_ACT_REDIRECT).
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, packet: &Packet) -> Result<i32, NotRefused> {
    if packet.l4_offset != L3_OFFSET + Ipv4Hdr::LEN {
        return Err(NotRefused::IpOptions);
    }
    let eth: [u8; EthHdr::LEN] = ctx.load(0)?;
    let mut answer = PortUnreachable {
        eth,
        ip: [0; Ipv4Hdr::LEN],
        icmp: [0; ICMP_HEADER_LEN],
        quote: ctx.load(L3_OFFSET)?,
    };
    // Back to where it came from: the MAC addresses swap, the EtherType stays IPv4.
    answer.eth[..6].copy_from_slice(&eth[6..12]);
    answer.eth[6..12].copy_from_slice(&eth[..6]);

    let total_len = (size_of::<PortUnreachable>() - EthHdr::LEN) as u16;
    let [len_high, len_low] = total_len.to_be_bytes();
    let [src_0, src_1, src_2, src_3] = packet.dst_addr.to_ne_bytes();
    let [dst_0, dst_1, dst_2, dst_3] = packet.src_addr.to_ne_bytes();
    answer.ip = [
        IPV4_VERSION_IHL,
        TOS_INTERNETCONTROL,
        len_high,
        len_low,
        0, // identification
        0,
        0, // flags and fragment offset
        0,
        TTL,
        IPPROTO_ICMP,
        0, // checksum, below
        0,
        src_0, // from the frontend the client addressed
        src_1,
        src_2,
        src_3,
        dst_0, // to the client
        dst_1,
        dst_2,
        dst_3,
    ];
    let [ip_csum_high, ip_csum_low] = csum::internet_checksum(&answer.ip, 0);
    answer.ip[10] = ip_csum_high;
    answer.ip[11] = ip_csum_low;

    answer.icmp[0] = ICMP_DEST_UNREACH;
    answer.icmp[1] = ICMP_PORT_UNREACH;
    let quote_sum = csum::ones_complement_sum(&answer.quote);
    let [icmp_csum_high, icmp_csum_low] = csum::internet_checksum(&answer.icmp, quote_sum);
    answer.icmp[2] = icmp_csum_high;
    answer.icmp[3] = icmp_csum_low;

    // SAFETY: `skb` is the program's context; the helper trims or zero-extends the packet.
    let resized =
        unsafe { bpf_skb_change_tail(ctx.skb.skb, size_of::<PortUnreachable>() as u32, 0) };
    if resized != 0 {
        return Err(NotRefused::HelperFailed);
    }
    // RECOMPUTE_CSUM keeps a CHECKSUM_COMPLETE skb's sum in step with the new bytes.
    ctx.store(0, &answer, BPF_F_RECOMPUTE_CSUM.into())?;
    // SAFETY: `skb` is the program's context pointer.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; flags 0 redirects to the device's egress.
    let verdict = unsafe { bpf_redirect(ingress, 0) };
    Ok(verdict as i32)
}
