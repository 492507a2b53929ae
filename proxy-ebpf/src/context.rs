//! The packet context the packet path works on: a thin layer over the program type's own
//! context (Cilium's `__ctx_buff`), so parsing, conntrack, NAT and routing are written once
//! and only what truly differs per hook lives in an implementation: the tc hook
//! (`TcContext`, an skb) and the XDP hook (`XdpContext`, a frame before any skb exists).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, xdp_action},
    cty::{c_long, c_void},
    helpers::{bpf_l4_csum_replace, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
};
use core::ptr;
use proxy_common::to_tc;

use crate::{
    answer::{Answer, NotAnswered},
    csum,
    family::Family,
    parse::{self, Packet},
    route::Hop,
    verdict::Verdict,
    xdp,
};

/// A helper failed, or the bytes were not where the parse found them.
const NOT_WRITABLE: c_long = -1;

pub trait Context {
    /// The XDP hook: what it cannot do itself it leaves, untouched, to the tc program behind
    /// it ([`Verdict::ToTc`]), so tc-only paths are compiled out of the other hook.
    const IS_XDP: bool;
    /// Start and end of the directly accessible packet data.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Makes the first `len` bytes directly accessible (the headers of a GRO'd skb may sit
    /// outside its linear part). Invalidates earlier packet pointers.
    fn pull(&self, len: u32) -> Result<(), c_long>;
    /// Length of the packet in bytes.
    fn len(&self) -> u32;
    /// The payload bytes of each segment a GSO packet leaves as; 0 for a plain packet.
    fn gso_size(&self) -> u32;
    /// The device the packet arrived on.
    fn ifindex(&self) -> u32;
    /// The raw context, for helpers that take any program's context (FIB lookups).
    fn raw(&self) -> *mut c_void;
    /// Adds the ones' complement difference `diff` to the TCP/UDP checksum at `offset`
    /// after rewritten fields: `pseudo_header` when the fields are addresses (which the
    /// checksum covers only through its pseudo-header), `udp` to keep a UDP checksum of
    /// zero ("none") zero. Invalidates packet pointers.
    fn add_to_l4_checksum(
        &self,
        offset: usize,
        diff: u32,
        pseudo_header: bool,
        udp: bool,
    ) -> Result<(), c_long>;
    /// Whether this hook can send a packet to `hop` itself; else why not (a
    /// `proxy_common::to_tc` reason).
    fn can_send(&self, hop: &Hop) -> Result<(), u8>;
    /// Sends the (translated, TTL-decremented) packet to `hop`, which [`Self::can_send`]
    /// accepted.
    fn send(&self, hop: &Hop) -> Verdict;
    /// Hands the packet to the program in `slot` of the hook's TAIL_CALLS (XDP:
    /// XDP_TAIL_CALLS; `proxy_common::tail_call`); returns only if there is none there.
    fn tail_call(&self, slot: u32);
    /// Turns the packet into the ICMP error `answer` to its sender and sends it back out of
    /// its device (kube-proxy's REJECT; the kernel's forwarding errors), if the ICMP rate
    /// limits allow (`charge`: counts against them; false for a dry run).
    fn answer<A: Family>(
        &self,
        packet: &Packet<A>,
        answer: Answer<A>,
        charge: bool,
    ) -> Result<Verdict, NotAnswered>;
}

impl Context for TcContext {
    const IS_XDP: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn pull(&self, len: u32) -> Result<(), c_long> {
        self.pull_data(len)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }

    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: `skb` is the program's context pointer.
        unsafe { (*self.skb.skb).gso_size }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `skb` is the program's context pointer.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.skb.skb as *mut c_void
    }

    /// Through `bpf_l4_csum_replace` in its difference mode (size 0): the kernel knows
    /// whether the skb is CHECKSUM_PARTIAL (a local sender over a veth: the field holds
    /// only the pseudo-header seed, which changes with addresses and not with ports) or
    /// CHECKSUM_COMPLETE (whose `skb->csum` it keeps in step), which the program cannot see.
    #[inline(always)]
    fn add_to_l4_checksum(
        &self,
        offset: usize,
        diff: u32,
        pseudo_header: bool,
        udp: bool,
    ) -> Result<(), c_long> {
        let mut flags = 0u64;
        if pseudo_header {
            flags |= u64::from(BPF_F_PSEUDO_HDR);
        }
        if udp {
            flags |= u64::from(BPF_F_MARK_MANGLED_0);
        }
        // SAFETY: `skb` is the program's context; the helper bounds-checks the offset.
        let result =
            unsafe { bpf_l4_csum_replace(self.skb.skb, offset as u32, 0, u64::from(diff), flags) };
        if result == 0 { Ok(()) } else { Err(result) }
    }

    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        // SAFETY: the program's own context; a failed tail call returns.
        unsafe { crate::TAIL_CALLS.tail_call(self, slot) };
    }

    /// `bpf_redirect_neigh` sends anywhere and resolves a missing neighbour itself.
    #[inline(always)]
    fn can_send(&self, _hop: &Hop) -> Result<(), u8> {
        Ok(())
    }

    #[inline(always)]
    fn send(&self, hop: &Hop) -> Verdict {
        // SAFETY: no neighbour parameters: the kernel resolves the next hop from the FIB.
        Verdict::Sent(unsafe { bpf_redirect_neigh(hop.ifindex, ptr::null_mut(), 0, 0) } as i32)
    }

    #[inline(always)]
    fn answer<A: Family>(
        &self,
        packet: &Packet<A>,
        answer: Answer<A>,
        charge: bool,
    ) -> Result<Verdict, NotAnswered> {
        A::send_answer(self, packet, &answer, charge).map(Verdict::Sent)
    }
}

impl Context for XdpContext {
    const IS_XDP: bool = true;

    /// Read with a volatile load, so a subprogram taking the context reads it itself: LLVM
    /// would otherwise load `data` and `data_end` in the caller and pass them as 32-bit
    /// arguments, which the callee widens with shifts the verifier refuses on packet
    /// pointers (the IPv6 parser, a subprogram, met it).
    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: `ctx` is the program's context pointer.
        unsafe { ptr::read_volatile(&raw const (*self.ctx).data) as usize }
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as in `data`.
        unsafe { ptr::read_volatile(&raw const (*self.ctx).data_end) as usize }
    }

    /// An XDP frame is linear (multi-buffer frames only come with jumbo MTUs, whose first
    /// buffer holds the headers anyway).
    #[inline(always)]
    fn pull(&self, _len: u32) -> Result<(), c_long> {
        Err(NOT_WRITABLE)
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }

    /// A frame is one packet as it came off the wire: never a GSO super-packet.
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: `ctx` is the program's context pointer.
        unsafe { (*self.ctx).ingress_ifindex }
    }

    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.ctx.cast()
    }

    /// In place (RFC 1624). A frame from a wire carries complete checksums, so the
    /// pseudo-header needs no special case; a UDP checksum of zero ("none") stays zero and a
    /// computed zero is sent as 0xffff (RFC 768).
    #[inline(always)]
    fn add_to_l4_checksum(
        &self,
        offset: usize,
        diff: u32,
        _pseudo_header: bool,
        udp: bool,
    ) -> Result<(), c_long> {
        let field = parse::at(self, offset, 2).ok_or(NOT_WRITABLE)? as *mut [u8; 2];
        // SAFETY: the two bytes were checked against data_end just above.
        unsafe {
            let check = u16::from_ne_bytes(*field);
            if udp && check == 0 {
                return Ok(());
            }
            let mut updated = csum::updated(check, diff);
            if udp && updated == 0 {
                updated = 0xffff;
            }
            *field = updated.to_ne_bytes();
        }
        Ok(())
    }

    #[inline(always)]
    fn tail_call(&self, slot: u32) {
        // SAFETY: the program's own context; a failed tail call returns.
        unsafe { xdp::XDP_TAIL_CALLS.tail_call(self, slot) };
    }

    /// XDP has no neighbour resolution, and a redirect reaches only devices whose driver
    /// takes XDP frames: those the daemon attached natively (`xdp::XDP_EGRESS`).
    #[inline(always)]
    fn can_send(&self, hop: &Hop) -> Result<(), u8> {
        if !hop.neighbour_known {
            return Err(to_tc::NO_NEIGHBOUR);
        }
        if hop.ifindex != Context::ifindex(self) && !xdp::is_egress(hop.ifindex) {
            return Err(to_tc::OTHER_DEVICE);
        }
        Ok(())
    }

    #[inline(always)]
    fn send(&self, hop: &Hop) -> Verdict {
        let Some(eth) = parse::at(self, 0, 12) else {
            return Verdict::Drop;
        };
        // SAFETY: the 12 bytes of the two MAC addresses were checked just above.
        unsafe {
            *(eth as *mut [u8; 6]) = hop.dmac;
            *((eth + 6) as *mut [u8; 6]) = hop.smac;
        }
        if hop.ifindex == Context::ifindex(self) {
            Verdict::Sent(xdp_action::XDP_TX as i32)
        } else {
            xdp::redirect(hop.ifindex)
        }
    }

    /// ICMP errors are rare and rate limited: tc builds them.
    #[inline(always)]
    fn answer<A: Family>(
        &self,
        _packet: &Packet<A>,
        _answer: Answer<A>,
        _charge: bool,
    ) -> Result<Verdict, NotAnswered> {
        Ok(Verdict::ToTc(to_tc::ANSWER))
    }
}
