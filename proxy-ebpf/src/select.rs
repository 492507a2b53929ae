//! Backend selection for a new flow.

use core::num::{NonZeroU16, NonZeroU32};

use aya_ebpf::helpers::bpf_get_prandom_u32;

/// Picks one of a set's `count` slots uniformly: `random % count`, the distribution of
/// kube-proxy's `--probability 1/n, 1/(n-1), …` chain. The modulo bias (at most
/// count / 2^32) is negligible. A non-zero divisor type keeps the remainder free of a
/// division-by-zero panic branch, which the verifier would reject.
#[inline(always)]
pub fn random_index(count: NonZeroU16) -> u16 {
    // SAFETY: the helper has no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    // `random % count < count <= u16::MAX`: the narrowing cannot truncate.
    (random % NonZeroU32::from(count)) as u16
}
