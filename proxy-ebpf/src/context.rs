//! The packet context the packet path works on: a thin layer over the program type's own
//! context (Cilium's `__ctx_buff`), so parsing, conntrack, NAT and routing are written once
//! and only what truly differs per hook lives in an implementation. Today the tc hook
//! (`TcContext`, an skb) implements it; an XDP program would add its own.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    cty::{c_long, c_void},
    helpers::{bpf_l4_csum_replace, bpf_redirect_neigh},
    programs::TcContext,
};
use core::ptr;

use crate::{
    answer::{self, Answer, NotAnswered},
    parse::Packet,
};

pub trait Context {
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
    /// Sends the packet out of `ifindex`, the kernel resolving the next hop's MAC;
    /// returns the program's verdict.
    fn redirect_neigh(&self, ifindex: u32) -> i32;
    /// Turns the packet into the ICMP error `answer` to its sender and sends it back out of
    /// its device (kube-proxy's REJECT; the kernel's forwarding errors), if the ICMP rate
    /// limits allow (`charge`: counts against them; false for a dry run); returns the
    /// verdict.
    fn answer(&self, packet: &Packet, answer: Answer, charge: bool) -> Result<i32, NotAnswered>;
}

impl Context for TcContext {
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
    fn redirect_neigh(&self, ifindex: u32) -> i32 {
        // SAFETY: no neighbour parameters: the kernel resolves the next hop from the FIB.
        unsafe { bpf_redirect_neigh(ifindex, ptr::null_mut(), 0, 0) as i32 }
    }

    #[inline(always)]
    fn answer(&self, packet: &Packet, answer: Answer, charge: bool) -> Result<i32, NotAnswered> {
        answer::send(self, packet, &answer, charge)
    }
}
