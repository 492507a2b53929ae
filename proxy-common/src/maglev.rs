//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the rules the datapath and the
//! daemon share. The daemon computes a frontend's lookup table from its backend set; the
//! datapath picks `table[flow_hash(client) % size]`. Every node computes the same table
//! from the same backends, so a client's flow reaches the same backend through any node
//! (an outside load balancer may move it), and when a backend leaves only the flows it
//! had move.

/// The table sizes a frontend may use: primes, so every backend's permutation visits every
/// position (Cilium's list). A header names its table's size by its index in this list.
pub const TABLE_SIZES: [u32; 10] = [
    251, 509, 1_021, 2_039, 4_093, 8_191, 16_381, 32_749, 65_521, 131_071,
];

/// The default table size (`--maglev-table-size`): about 100 positions per backend up to
/// 160 backends, which keeps each backend's share within about 1 % of the others (the
/// paper's advice).
pub const DEFAULT_TABLE_SIZE: u32 = 16_381;

/// Whether `size` can be a Maglev table's size: one of [`TABLE_SIZES`].
pub const fn valid_table_size(size: u32) -> bool {
    size_index(size).is_some()
}

/// The index of `size` in [`TABLE_SIZES`].
pub const fn size_index(size: u32) -> Option<usize> {
    let mut index = 0;
    while index < TABLE_SIZES.len() {
        if TABLE_SIZES[index] == size {
            return Some(index);
        }
        index += 1;
    }
    None
}

/// [`TABLE_SIZES`] by header value (index + 1), 0 where a value names no table; 16
/// entries so the datapath's lookup is masked into bounds (the verifier cannot follow a
/// range check the compiler moved to another register).
const SIZE_BY_HEADER: [u32; 16] = {
    let mut sizes = [0; 16];
    let mut index = 0;
    while index < TABLE_SIZES.len() {
        sizes[index + 1] = TABLE_SIZES[index];
        index += 1;
    }
    sizes
};

/// The size of table `maglev` (a header's [`crate::FrontendValue::maglev`]: the index in
/// [`TABLE_SIZES`] plus one); `None` for 0 (random) or a value that names no size. The
/// value is read modulo 16 (the daemon writes 0 to 10): a range check before the lookup
/// would let the compiler drop the mask, and the verifier then rejects the lookup.
#[inline(always)]
pub const fn table_size(maglev: u16) -> Option<u32> {
    match SIZE_BY_HEADER[maglev as usize & (SIZE_BY_HEADER.len() - 1)] {
        0 => None,
        size => Some(size),
    }
}

/// The header value naming a table of `size` positions (one of [`TABLE_SIZES`]).
pub const fn header_value(size: u32) -> Option<u16> {
    match size_index(size) {
        Some(index) => Some(index as u16 + 1),
        None => None,
    }
}

/// Positions per MAGLEV entry.
pub const CHUNK_POSITIONS: usize = 32;

/// How many MAGLEV entries a table of `size` positions takes.
pub const fn chunks(size: u32) -> u32 {
    size.div_ceil(CHUNK_POSITIONS as u32)
}

/// Key of the MAGLEV map: one chunk of the table of the slice at `base` of BACKEND_SLOTS,
/// of the size `maglev` names. A new backend set is a new slice (the daemon never rewrites
/// a slice a header names), and a new size a new key, so a table a header names is never
/// rewritten either: the daemon writes the new one, then switches the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MaglevKey {
    pub base: u32,
    /// [`crate::FrontendValue::maglev`].
    pub maglev: u16,
    pub _pad: u16,
    pub chunk: u32,
}

/// Value of the MAGLEV map: [`CHUNK_POSITIONS`] positions of a table, each the index of a
/// backend in its frontend's own set (its slot minus `base`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevChunk {
    pub positions: [u16; CHUNK_POSITIONS],
}

/// SplitMix64's finalizer: a fixed, well-spread 64-bit mix (the same on every node and
/// every version, which the tables' agreement across nodes relies on).
pub const fn mix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The hash that places a client's flow in a frontend's table: its address, port and
/// protocol as the packet carries them (wire order). The frontend's own address is left
/// out: a NodePort flow that an outside load balancer moves to another node arrives there
/// with that node's address, and must land on the same position.
pub const fn flow_hash(client_addr: u32, client_port: u16, proto: u8) -> u32 {
    let key = ((client_addr as u64) << 32) | ((client_port as u64) << 8) | proto as u64;
    (mix64(key) >> 32) as u32
}

/// [`flow_hash`] of a client of either family ([`crate::Address::maglev_word`] of its address):
/// the one rule by which the datapath places an IPv4 or IPv6 flow.
pub fn client_flow_hash<A: crate::Address>(client_addr: A, client_port: u16, proto: u8) -> u32 {
    flow_hash(client_addr.maglev_word(), client_port, proto)
}

/// An IPv6 address as the 32 bits Maglev's hashes take ([`client_flow_hash`], [`permutation`]):
/// its halves mixed together, so every bit counts (an IPv4 address is its own 32 bits).
pub const fn ipv6_digest(octets: [u8; 16]) -> u32 {
    let mut high = 0u64;
    let mut low = 0u64;
    let mut index = 0;
    while index < 8 {
        high = (high << 8) | octets[index] as u64;
        low = (low << 8) | octets[index + 8] as u64;
        index += 1;
    }
    (mix64(mix64(high) ^ low) >> 32) as u32
}

/// A backend's permutation of the table's positions, `(offset, skip)`: its preference
/// list is `offset, offset + skip, offset + 2·skip, …` modulo `size`. Derived from the
/// backend's address and port only (host order), so every node derives the same.
pub const fn permutation(addr: u32, port: u16, size: u32) -> (u32, u32) {
    let identity = ((addr as u64) << 16) | port as u64;
    let first = mix64(identity);
    let second = mix64(first ^ 0x6d61_676c_6576_0001);
    let offset = (first % size as u64) as u32;
    // 1..size: with `size` prime, any such skip is coprime with it.
    let skip = (second % (size as u64 - 1)) as u32 + 1;
    (offset, skip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_sizes_are_the_listed_primes() {
        for size in TABLE_SIZES {
            let mut divisor = 2;
            while divisor * divisor <= size {
                assert!(size % divisor != 0, "{size} is no prime");
                divisor += 1;
            }
            assert!(valid_table_size(size), "{size}");
        }
        assert!(valid_table_size(DEFAULT_TABLE_SIZE));
        for size in [0, 1, 250, 16_383, 65_536, 131_072, 262_139, 1_031] {
            assert!(!valid_table_size(size), "{size}");
        }
    }

    #[test]
    fn headers_name_table_sizes_by_index() {
        assert_eq!(table_size(0), None);
        for size in TABLE_SIZES {
            assert_eq!(table_size(header_value(size).unwrap()), Some(size));
        }
        for beyond in [TABLE_SIZES.len() as u16 + 1, 15, 16, 0xfff0] {
            assert_eq!(table_size(beyond), None, "{beyond}");
        }
        assert_eq!(header_value(16_383), None);
        assert_eq!(chunks(DEFAULT_TABLE_SIZE), 512);
        assert_eq!(chunks(251), 8);
        assert_eq!(size_of::<MaglevKey>(), 12);
        assert_eq!(size_of::<MaglevChunk>(), 64);
    }

    #[test]
    fn flow_hashes_ignore_nothing_of_the_client() {
        let base = flow_hash(0x0a00_0001, 40_000, 6);
        assert_ne!(base, flow_hash(0x0a00_0002, 40_000, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 40_001, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 40_000, 17));
        assert_eq!(base, flow_hash(0x0a00_0001, 40_000, 6));
    }

    #[test]
    fn permutations_skip_within_the_table() {
        for port in 0..200 {
            let (offset, skip) = permutation(0xc612_0a0a, port, DEFAULT_TABLE_SIZE);
            assert!(offset < DEFAULT_TABLE_SIZE);
            assert!((1..DEFAULT_TABLE_SIZE).contains(&skip));
        }
    }
}
