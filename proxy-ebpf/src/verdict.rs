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
