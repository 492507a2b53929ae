//! SCTP as the datapath sees it: the common header's ports, its first chunk read as TCP
//! flags (so conntrack follows an association with TCP's states), and the CRC32c update a
//! port rewrite needs.
//!
//! The CRC32c (RFC 9260, appendix A) covers the SCTP packet only, not the IP addresses:
//! an address rewrite leaves it valid. A port rewrite changes it, and since a CRC is linear
//! over GF(2), the change depends only on the bits that changed and on how far they lie
//! from the packet's end: for two packets of equal length, `crc(a) ^ crc(b)` is the CRC
//! without initial value and final inversion of `a ^ b`. The ports are the packet's first
//! four bytes, so the change is `Δ · x^(8·len) mod P` (`Δ`: the old and new port bytes
//! XORed), one multiplication modulo the CRC polynomial after two table lookups for
//! `x^(8·len)`, whatever the packet's length — no pass over the payload.

use crate::tcp_flags;

/// The common header: source and destination port, verification tag, checksum.
pub const COMMON_HEADER_LEN: usize = 12;
/// The CRC32c within the common header, stored least significant byte first.
pub const CHECKSUM_OFFSET: usize = 8;
/// What the datapath reads: the common header and the first chunk's type.
pub const READ_LEN: usize = COMMON_HEADER_LEN + 1;

/// Chunk types (RFC 9260, section 3.2) that change an association's state.
pub mod chunk {
    pub const INIT: u8 = 1;
    pub const INIT_ACK: u8 = 2;
    pub const ABORT: u8 = 6;
    pub const SHUTDOWN: u8 = 7;
    pub const SHUTDOWN_ACK: u8 = 8;
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// The packet's first chunk as the TCP flags conntrack's state machine reads: INIT opens
/// (SYN), INIT ACK answers (SYN+ACK), SHUTDOWN and SHUTDOWN ACK close one side each (FIN),
/// ABORT and SHUTDOWN COMPLETE end the association (RST: the short close timeout), any
/// other chunk carries the association on (ACK). INIT, INIT ACK and SHUTDOWN COMPLETE are
/// never bundled with other chunks; an ABORT bundled behind others ends the flow by its
/// idle timeout, as a lost TCP reset does.
pub const fn tcp_flags_of(first_chunk: u8) -> u8 {
    match first_chunk {
        chunk::INIT => tcp_flags::SYN,
        chunk::INIT_ACK => tcp_flags::SYN | tcp_flags::ACK,
        chunk::SHUTDOWN | chunk::SHUTDOWN_ACK => tcp_flags::FIN | tcp_flags::ACK,
        chunk::ABORT | chunk::SHUTDOWN_COMPLETE => tcp_flags::RST,
        _ => tcp_flags::ACK,
    }
}

/// [`tcp_flags_of`] for every chunk type. The datapath reads the flags from this table: a
/// value loaded by an unknown index is one unknown value to the verifier, where the match
/// would hand it one known constant per chunk type, each then walked through the whole
/// packet path (a tripled verification, measured).
pub static TCP_FLAGS_OF_CHUNK: [u8; 256] = {
    let mut table = [0; 256];
    let mut chunk = 0;
    while chunk < 256 {
        table[chunk] = tcp_flags_of(chunk as u8);
        chunk += 1;
    }
    table
};

/// The CRC32c (Castagnoli) polynomial, bit-reflected: bit 31 is x^0's coefficient, bit 0
/// x^31's, as the CRC's register holds it.
const POLYNOMIAL: u32 = 0x82f6_3b78;
/// The polynomial 1, reflected.
const ONE: u32 = 1 << 31;

/// `a · b mod P`, both reflected.
#[inline(always)]
pub const fn multiply(a: u32, b: u32) -> u32 {
    let mut product = 0;
    // b · x^k, for k from 0 up.
    let mut shifted = b;
    let mut k = 0;
    while k < 32 {
        if a & (ONE >> k) != 0 {
            product ^= shifted;
        }
        shifted = if shifted & 1 != 0 {
            (shifted >> 1) ^ POLYNOMIAL
        } else {
            shifted >> 1
        };
        k += 1;
    }
    product
}

/// `x^(8·i·step) mod P` for i in 0..256.
const fn powers(step: u32) -> [u32; 256] {
    let mut x_8 = ONE;
    let mut bit = 0;
    // x^8 is ONE shifted eight degrees up.
    while bit < 8 {
        x_8 = multiply(x_8, ONE >> 1);
        bit += 1;
    }
    let mut factor = ONE;
    let mut count = 0;
    while count < step {
        factor = multiply(factor, x_8);
        count += 1;
    }
    let mut table = [0; 256];
    let mut power = ONE;
    let mut i = 0;
    while i < 256 {
        table[i] = power;
        power = multiply(power, factor);
        i += 1;
    }
    table
}

/// `x^(8·n) mod P` for the low byte of a length `n`, and for its high byte.
static BYTES_LOW: [u32; 256] = powers(1);
static BYTES_HIGH: [u32; 256] = powers(256);

/// `x^(8·len) mod P`: shifting a CRC through `len` zero bytes.
#[inline(always)]
fn x_to_bytes(len: u16) -> u32 {
    multiply(
        BYTES_LOW[usize::from(len & 0xff)],
        BYTES_HIGH[usize::from(len >> 8)],
    )
}

/// The checksum field (as stored) of an SCTP packet of `len` bytes whose first four bytes
/// (the ports) changed from `from` to `to`, given the field before. Exact for any valid
/// checksum; a field of zero is left zero by the caller (a checksum the device is still to
/// compute, see `nat.rs`).
#[inline(always)]
pub fn checksum_after_port_change(
    checksum: [u8; 4],
    from: [u8; 4],
    to: [u8; 4],
    len: u16,
) -> [u8; 4] {
    let changed = u32::from_le_bytes(from) ^ u32::from_le_bytes(to);
    (u32::from_le_bytes(checksum) ^ multiply(changed, x_to_bytes(len))).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC32c bit by bit, straight from the definition (RFC 9260 appendix A), as stored.
    fn crc32c(bytes: &[u8]) -> [u8; 4] {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLYNOMIAL
                } else {
                    crc >> 1
                };
            }
        }
        (!crc).to_le_bytes()
    }

    /// An SCTP packet of `len` bytes with a valid checksum.
    fn packet(len: usize, ports: [u8; 4], seed: u8) -> [u8; 2000] {
        let mut bytes = [0u8; 2000];
        bytes[..4].copy_from_slice(&ports);
        for (i, byte) in bytes[4..len].iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(seed);
        }
        bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].fill(0);
        let checksum = crc32c(&bytes[..len]);
        bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum);
        bytes
    }

    #[test]
    fn the_reference_crc_matches_the_rfc_check_value() {
        // The CRC-32C catalogue's check value over "123456789": 0xe3069283.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283u32.to_le_bytes());
    }

    #[test]
    fn a_port_change_updates_the_checksum_as_a_full_recomputation_does() {
        let ports = [
            [0x9c, 0x40, 0x00, 0x50],
            [0x1f, 0x90, 0x1f, 0x90],
            [0xff, 0xff, 0, 0],
        ];
        let rewrites = [
            [0x9c, 0x40, 0x1f, 0x90],
            [0xee, 0x48, 0x00, 0x50],
            [0, 0, 0xff, 0xff],
        ];
        // Every length class: the smallest packet, one per table byte, past 256 and a
        // typical MTU's.
        for len in [12, 13, 16, 17, 255, 256, 257, 511, 1000, 1480, 1999] {
            for (seed, (&from, &to)) in ports.iter().zip(&rewrites).enumerate() {
                let before = packet(len, from, seed as u8);
                let after = packet(len, to, seed as u8);
                let stored = before[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4]
                    .try_into()
                    .unwrap();
                assert_eq!(
                    checksum_after_port_change(stored, from, to, len as u16),
                    after[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4],
                    "len {len}, {from:02x?} -> {to:02x?}"
                );
            }
        }
    }

    #[test]
    fn the_length_tables_agree_with_shifting_byte_by_byte() {
        let mut power = ONE;
        let x_8 = (0..8).fold(ONE, |p, _| multiply(p, ONE >> 1));
        for len in 0..=2048u16 {
            assert_eq!(x_to_bytes(len), power, "x^(8·{len})");
            power = multiply(power, x_8);
        }
        assert_eq!(
            x_to_bytes(u16::MAX),
            (0..u16::MAX).fold(ONE, |p, _| multiply(p, x_8))
        );
    }

    #[test]
    fn the_table_holds_every_chunks_flags() {
        for chunk in 0..=255u8 {
            assert_eq!(TCP_FLAGS_OF_CHUNK[usize::from(chunk)], tcp_flags_of(chunk));
        }
    }

    #[test]
    fn chunks_read_as_tcp_flags() {
        assert_eq!(tcp_flags_of(chunk::INIT), tcp_flags::SYN);
        assert_eq!(
            tcp_flags_of(chunk::INIT_ACK),
            tcp_flags::SYN | tcp_flags::ACK
        );
        assert_eq!(tcp_flags_of(chunk::ABORT), tcp_flags::RST);
        assert_eq!(tcp_flags_of(chunk::SHUTDOWN_COMPLETE), tcp_flags::RST);
        assert_eq!(
            tcp_flags_of(chunk::SHUTDOWN),
            tcp_flags::FIN | tcp_flags::ACK
        );
        assert_eq!(tcp_flags_of(0), tcp_flags::ACK, "DATA");
        assert_eq!(tcp_flags_of(10), tcp_flags::ACK, "COOKIE ECHO");
    }
}
