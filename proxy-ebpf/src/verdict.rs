//! What the packet path decided for a packet, whichever hook runs it; each program turns it
//! into its own return code (a tc action, an XDP action).

/// The packet path's decision.
#[derive(Clone, Copy)]
pub enum Verdict {
    /// On into the kernel's stack, translated or untouched.
    Accept,
    Drop,
    /// The context sent the packet itself (a redirect, XDP_TX): its return code.
    Sent(i32),
    /// XDP only: the packet is left, untouched and with nothing recorded for it, to the tc
    /// program behind the XDP one, which does what XDP cannot. The reason is a
    /// `proxy_common::to_tc` constant.
    ToTc(u8),
}

impl Verdict {
    /// The verdict as two fields that are always set, for a struct the packet path copies
    /// between BPF frames: an enum leaves the payload of its other variants undefined, and
    /// the verifier refuses to read the register LLVM copies such bytes through.
    #[inline(always)]
    pub fn to_parts(self) -> (u8, i32) {
        match self {
            Verdict::Accept => (0, 0),
            Verdict::Drop => (1, 0),
            Verdict::Sent(action) => (2, action),
            Verdict::ToTc(reason) => (3, i32::from(reason)),
        }
    }

    /// The verdict [`Verdict::to_parts`] gave.
    #[inline(always)]
    pub fn from_parts((kind, value): (u8, i32)) -> Self {
        match kind {
            0 => Verdict::Accept,
            2 => Verdict::Sent(value),
            3 => Verdict::ToTc(value as u8),
            _ => Verdict::Drop,
        }
    }
}
