//! Checksum arithmetic (RFC 1071, RFC 1624), done by the program itself: a rewrite adds
//! one difference per checksum instead of calling a helper per changed field.
//!
//! Values are 16- and 32-bit words exactly as loaded from the packet; ones' complement
//! sums commute with byte swapping, so no conversion to host order is needed.

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

/// Ones' complement addition of two 32-bit partial sums (end-around carry).
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

/// What replacing the 32-bit field `from` with `to` adds to a checksum's sum.
#[inline(always)]
pub fn diff32(from: u32, to: u32) -> u32 {
    add(!from, to)
}

/// What replacing the 16-bit field `from` with `to` adds to a checksum's sum.
#[inline(always)]
pub fn diff16(from: u16, to: u16) -> u32 {
    add(u32::from(!from), u32::from(to))
}

/// A checksum field after fields under it changed by `diff` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn updated(check: u16, diff: u32) -> u16 {
    let sum = add(u32::from(!check), diff);
    let folded = (sum & 0xffff) + (sum >> 16);
    !(((folded & 0xffff) + (folded >> 16)) as u16)
}
