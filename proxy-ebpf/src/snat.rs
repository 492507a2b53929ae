//! SNAT for outside traffic to a backend on another node (kube-proxy's MASQUERADE for
//! `externalTrafficPolicy: Cluster`): the source becomes the node address the route to the
//! backend uses, with a port from the SNAT range, so the backend's replies come back
//! through this node, where the REPLY entry (see `ct_flags::SNAT`) reverses both NATs.

use core::{num::NonZeroU32, ptr};

use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{Backend, SNAT_PORT_RANGE};

use crate::{context::Context, family::Family, route};

/// Ports tried per new flow before giving up (`stat::SNAT_FAILED`): consecutive ones from
/// a random start (wrapping within the range). Clash remaps draw from the same range.
pub const PORT_TRIES: u32 = 8;

/// The SNAT range (inclusive, host order), set at load time (`--snat-port-range`).
#[unsafe(no_mangle)]
static SNAT_PORT_MIN: u16 = SNAT_PORT_RANGE.0;
#[unsafe(no_mangle)]
static SNAT_PORT_MAX: u16 = SNAT_PORT_RANGE.1;

/// The node address to use as the new source when a packet that came in on this device
/// goes to `backend` through the same device: a backend on another node. `None` when the
/// backend is reached another way (a pod of this node) or the FIB has no route.
#[inline(always)]
pub fn source_for<C: Context, A: Family>(ctx: &C, backend: &Backend<A>) -> Option<A> {
    // A forwarding lookup, as for the packet itself (from its arrival device), with the
    // source address the node would use on the way out.
    let (source, egress) = route::source_toward(ctx, backend.proto, backend.addr, backend.port)?;
    (egress == ctx.ifindex()).then_some(source)
}

/// A random offset into the SNAT range, for [`port`].
#[inline(always)]
pub fn random_start() -> u32 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_prandom_u32() }
}

/// The port `start + attempt` of the SNAT range (wrapping within it), wire order.
#[inline(always)]
pub fn port(start: u32, attempt: u32) -> u16 {
    // SAFETY: the globals are plain integers, patched only at load time.
    let (min, max) = unsafe {
        (
            ptr::read_volatile(&raw const SNAT_PORT_MIN),
            ptr::read_volatile(&raw const SNAT_PORT_MAX),
        )
    };
    let (min, max) = (u32::from(min), u32::from(max));
    // A non-zero divisor keeps the remainder free of a panic branch (see `select`).
    let size = NonZeroU32::new(max.wrapping_sub(min).wrapping_add(1)).unwrap_or(NonZeroU32::MIN);
    // With `min <= max` (checked when set) the result is at most `max` <= u16::MAX.
    let port = min.wrapping_add(start.wrapping_add(attempt) % size);
    (port as u16).to_be()
}
