//! Maglev lookup tables (Eisenbud et al., NSDI 2016, §3.4): from a frontend's backends, the
//! table the datapath indexes with a flow's hash (`proxy_common::maglev`). Pure, so every
//! node computes the same table from the same backends; the planner's backends are sorted,
//! which fixes the order in which backends take turns.
//!
//! Each backend walks its own permutation of the table's positions and, in turns, takes
//! its next preferred position still free, until the table is full: every backend ends up
//! with `size / n` positions give or take one, and a backend that leaves hands over only
//! its own positions, plus a few others as the turns shift (the paper measures about 1 %
//! at 100 positions per backend).

use std::net::IpAddr;

use proxy_common::maglev::{ipv6_digest, permutation};

use super::BackendAddr;

/// The table for `backends` (in the plan's sorted order) of `size` positions (a prime,
/// see `proxy_common::maglev::valid_table_size`): each position holds the index of its
/// backend in `backends`. Empty without backends.
pub fn table(backends: &[BackendAddr], size: u32) -> Vec<u16> {
    const FREE: u16 = u16::MAX;
    let Ok(count) = u16::try_from(backends.len()) else {
        // Never: a frontend's backends fit a u16 slot count.
        return Vec::new();
    };
    if count == 0 || count == FREE {
        return Vec::new();
    }
    let permutations: Vec<(u32, u32)> = backends
        .iter()
        .map(|backend| permutation(address_digest(backend.addr), backend.port, size))
        .collect();
    // How far each backend got along its permutation.
    let mut next = vec![0u32; backends.len()];
    let mut table = vec![FREE; size as usize];
    let mut filled = 0;
    while filled < size {
        for (index, &(offset, skip)) in (0..count).zip(&permutations) {
            let walked = &mut next[usize::from(index)];
            let mut position = position(offset, skip, *walked, size);
            while table[position] != FREE {
                *walked += 1;
                position = self::position(offset, skip, *walked, size);
            }
            table[position] = index;
            *walked += 1;
            filled += 1;
            if filled == size {
                break;
            }
        }
    }
    table
}

/// A backend address as [`permutation`] takes it (host order for IPv4).
fn address_digest(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(addr) => u32::from(addr),
        IpAddr::V6(addr) => ipv6_digest(addr.octets()),
    }
}

/// The `step`-th position of the permutation `(offset, skip)`.
fn position(offset: u32, skip: u32, step: u32, size: u32) -> usize {
    ((u64::from(offset) + u64::from(step) * u64::from(skip)) % u64::from(size)) as usize
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::maglev::{DEFAULT_TABLE_SIZE, flow_hash};

    use super::*;

    fn backends(count: u8) -> Vec<BackendAddr> {
        (0..count)
            .map(|i| BackendAddr {
                addr: Ipv4Addr::new(198, 18, 2, 10 + i).into(),
                port: 8080,
            })
            .collect()
    }

    /// Positions per backend.
    fn shares(table: &[u16], count: usize) -> Vec<usize> {
        let mut shares = vec![0; count];
        for &index in table {
            shares[usize::from(index)] += 1;
        }
        shares
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for count in [1, 2, 3, 7, 10, 50, 160] {
            let table = table(&backends(count), DEFAULT_TABLE_SIZE);
            assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
            let even = DEFAULT_TABLE_SIZE as usize / usize::from(count);
            for share in shares(&table, usize::from(count)) {
                assert!(
                    share.abs_diff(even) <= 1,
                    "{count} backends: {share} vs {even}"
                );
            }
        }
        assert!(table(&[], DEFAULT_TABLE_SIZE).is_empty());
    }

    #[test]
    fn a_backend_that_leaves_moves_about_its_share_and_no_more() {
        for count in [3u8, 10, 50] {
            let before_backends = backends(count);
            let before = table(&before_backends, DEFAULT_TABLE_SIZE);
            let leaving = before_backends[usize::from(count) / 2];
            let after_backends: Vec<BackendAddr> = before_backends
                .iter()
                .copied()
                .filter(|backend| *backend != leaving)
                .collect();
            let after = table(&after_backends, DEFAULT_TABLE_SIZE);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(was, now)| {
                    before_backends[usize::from(**was)] != after_backends[usize::from(**now)]
                })
                .count();
            let share = 1.0 / f64::from(count);
            let fraction = moved as f64 / f64::from(DEFAULT_TABLE_SIZE);
            // The leaving backend's share must move; the rest barely does.
            assert!(
                fraction >= share * 0.99 && fraction <= share + 0.02,
                "{count} backends: {fraction:.4} moved, its share is {share:.4}"
            );
        }
    }

    #[test]
    fn a_backend_that_joins_takes_about_its_share() {
        let before = table(&backends(9), DEFAULT_TABLE_SIZE);
        let joined = backends(10);
        let after = table(&joined, DEFAULT_TABLE_SIZE);
        let old = backends(9);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(was, now)| old[usize::from(**was)] != joined[usize::from(**now)])
            .count();
        let fraction = moved as f64 / f64::from(DEFAULT_TABLE_SIZE);
        assert!((0.099..=0.12).contains(&fraction), "{fraction:.4} moved");
    }

    #[test]
    fn each_backends_permutation_visits_every_position() {
        for backend in backends(5) {
            let (offset, skip) = permutation(address_digest(backend.addr), backend.port, 251);
            let mut seen = vec![false; 251];
            for step in 0..251 {
                seen[position(offset, skip, step, 251)] = true;
            }
            assert!(seen.iter().all(|&visited| visited), "{backend}");
        }
    }

    #[test]
    fn flows_spread_over_the_backends_like_their_shares() {
        let count = 4;
        let table = table(&backends(count), DEFAULT_TABLE_SIZE);
        let mut hits = vec![0u32; usize::from(count)];
        let flows = 40_000u32;
        for flow in 0..flows {
            let client = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + flow / 1000;
            let hash = flow_hash(client.to_be(), (10_000 + flow % 1000) as u16, 6);
            hits[usize::from(table[(hash % DEFAULT_TABLE_SIZE) as usize])] += 1;
        }
        let expected = f64::from(flows) / f64::from(count);
        let chi_square: f64 = hits
            .iter()
            .map(|&hit| (f64::from(hit) - expected).powi(2) / expected)
            .sum();
        // 3 degrees of freedom, p = 0.001.
        assert!(chi_square < 16.27, "{hits:?}: χ² {chi_square:.2}");
    }

    #[test]
    fn the_same_backends_give_the_same_table_anywhere() {
        // What another node computes: the same set, built again.
        assert_eq!(table(&backends(7), 4093), table(&backends(7), 4093));
    }
}
