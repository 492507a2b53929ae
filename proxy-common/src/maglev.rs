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
