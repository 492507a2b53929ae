//! The XDP hook on the external devices (`--xdp`): the tc program's packet path run on the
//! frame before the kernel builds an skb for it, so outside traffic to a backend on
//! another node (and its replies) is translated and sent back out with XDP_TX, never
//! entering the stack. What XDP cannot do itself it leaves untouched to the tc program
//! behind it ([`Verdict::ToTc`]); what it decided it marks in the frame's XDP metadata
//! ([`XDP_DECIDED`]), which the kernel hands on to the skb, so tc passes that packet
//! untouched instead of looking it up a second time.
//!
//! IPv6 runs in a program of its own, `epx_xdp6`, which `epx_xdp` tail-calls through
//! [`XDP_TAIL_CALLS`] (as `epx_ingress` does `epx_ingress6`): the mark is reserved and
//! zeroed before the tail call, and the IPv6 program ends the run ([`finish`]).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_meta,
    macros::map,
    maps::{DevMapHash, ProgramArray},
    programs::{TcContext, XdpContext},
};
use proxy_common::{XDP_DECIDED, stat, to_tc};

use crate::{context::Context, mode::Mode, verdict::Verdict};

/// Named like `proxy_common::map_names::XDP_EGRESS`: the devices the daemon attached the
/// XDP program to natively, by ifindex; a packet routed out of one of them (other than
/// its arrival device) is redirected there. Pinned, written by the daemon.
#[map]
static XDP_EGRESS: DevMapHash =
    DevMapHash::pinned(proxy_common::default_max_entries::XDP_EGRESS, 0);

/// Named like `proxy_common::map_names::XDP_TAIL_CALLS`: `TAIL_CALLS` for the XDP program
/// (a program array holds programs of one type only), with the same slots
/// (`proxy_common::tail_call`). Pinned, filled by the process that loads the programs.
#[map]
pub(crate) static XDP_TAIL_CALLS: ProgramArray = ProgramArray::pinned(2, 0);

const MARK_LEN: usize = size_of::<u32>();

/// Whether packets may be redirected to `ifindex` from XDP.
#[inline(always)]
pub fn is_egress(ifindex: u32) -> bool {
    XDP_EGRESS.get(ifindex).is_some()
}

/// Redirects the frame to `ifindex`, one of [`XDP_EGRESS`]'s devices.
#[inline(always)]
pub fn redirect(ifindex: u32) -> Verdict {
    match XDP_EGRESS.redirect(ifindex, 0) {
        Ok(action) => Verdict::Sent(action as i32),
        // Gone since `is_egress` said yes: the frame is already rewritten.
        Err(_) => Verdict::Drop,
    }
}

/// Runs the packet path on the frame, marks what it decided, and counts its verdict;
/// returns the XDP action. `balance` may tail-call the IPv6 program, which then ends the
/// run itself ([`finish`]).
#[inline(always)]
pub fn run<M: Mode>(ctx: &XdpContext, mode: &M, balance: impl FnOnce() -> Verdict) -> u32 {
    // Room for the mark first: a helper that moves data_meta invalidates packet pointers.
    // SAFETY: the helper checks the room it is asked for.
    let reserved = unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MARK_LEN as i32)) } == 0;
    let verdict = if reserved && write_mark(ctx, 0) {
        balance()
    } else {
        Verdict::ToTc(to_tc::NO_METADATA)
    };
    finish(ctx, mode, verdict)
}

/// Ends a run whose packet path gave `verdict`: marks what it decided and counts it;
/// returns the XDP action. The IPv6 program's whole end, its mark reserved by [`run`].
#[inline(always)]
pub fn finish<M: Mode>(ctx: &XdpContext, mode: &M, verdict: Verdict) -> u32 {
    let (action, counter) = match verdict {
        Verdict::Accept if write_mark(ctx, XDP_DECIDED) => (xdp_action::XDP_PASS, stat::XDP_PASS),
        // The mark vanished (cannot happen once written): drop rather than let tc
        // translate a translated packet again.
        Verdict::Accept | Verdict::Drop => (xdp_action::XDP_DROP, stat::XDP_DROP),
        Verdict::Sent(action) if action as u32 == xdp_action::XDP_TX => {
            (xdp_action::XDP_TX, stat::XDP_TX)
        }
        Verdict::Sent(action) => (action as u32, stat::XDP_REDIRECT),
        Verdict::ToTc(reason) => {
            mode.left_to_tc(reason);
            (xdp_action::XDP_PASS, stat::XDP_TO_TC)
        }
    };
    mode.xdp_verdict(counter);
    action
}

/// Writes `value` into the 4 bytes of metadata in front of the frame.
#[inline(always)]
fn write_mark(ctx: &XdpContext, value: u32) -> bool {
    let meta = ctx.metadata();
    if meta + MARK_LEN > ctx.data() {
        return false;
    }
    // SAFETY: the 4 bytes lie between data_meta and data, just checked.
    unsafe { *(meta as *mut u32) = value };
    true
}

/// Whether the XDP program in front of this tc program decided the packet (see
/// [`XDP_DECIDED`]): then tc lets it pass untouched.
#[inline(always)]
pub fn decided(ctx: &TcContext) -> bool {
    // SAFETY: `skb` is the program's context pointer.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, Context::data(ctx)) };
    if meta + MARK_LEN > data {
        return false;
    }
    // SAFETY: the 4 bytes lie between data_meta and data, just checked.
    unsafe { *(meta as *const u32) == XDP_DECIDED }
}
