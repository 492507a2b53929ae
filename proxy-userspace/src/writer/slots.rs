//! Where frontends' slices go in BACKEND_SLOTS.
//!
//! A slice a header names is never written: a changed frontend gets a new slice, written
//! while no header names it, and then its header switches over (one element update, which
//! a packet sees whole). The old slice is *quarantined*: a packet that read the old header
//! a moment earlier may still be reading it. It becomes free again only after a
//! [`MapOp::Barrier`](super::MapOp::Barrier), an RCU grace period, after which no program
//! run that started before it can still be going. Barriers are taken only when the free
//! ranges run out, so their cost (milliseconds) comes once per pass over the array, not
//! once per change.
//!
//! Free ranges are kept coalesced and a slice takes the smallest one it fits (best fit),
//! which keeps large ranges for large frontends. When no free range fits although enough
//! slots are free (fragmentation), the writer evacuates a window: [`SlotAllocator::
//! evacuation`] picks the window of the needed size holding the fewest live slots whose
//! slices fit elsewhere, and reserves their new places; they are moved (copies written,
//! headers switched), and after a barrier the window is free.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// A slice of `len` slots from `base` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slice {
    pub base: u32,
    pub len: u32,
}

impl Slice {
    pub fn range(self) -> Range<u32> {
        self.base..self.end()
    }

    fn end(self) -> u32 {
        self.base + self.len
    }

    fn overlaps(self, other: Slice) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// The state of every slot of BACKEND_SLOTS: free, reserved (being written, named by no
/// header yet), held (free, kept for a frontend waiting for an evacuation), quarantined
/// (named by a header until recently) or live (named by a header: everything else).
#[derive(Clone, Debug)]
pub struct SlotAllocator {
    capacity: u32,
    /// Free ranges, base → length, coalesced.
    free: BTreeMap<u32, u32>,
    /// The same ranges by (length, base): best fit in O(log n) however fragmented the
    /// array is (a million slots after thousands of changes).
    free_by_len: BTreeSet<(u32, u32)>,
    /// Slices headers stopped naming since the last barrier.
    quarantined: Vec<Slice>,
    /// Slices reserved for writing, not yet named by a header: base → length.
    reserved: BTreeMap<u32, u32>,
    /// Free parts of windows being evacuated, kept out of reach until the batch ends.
    held: Vec<Slice>,
    /// Quarantined slices were freed since the last barrier: a packet may still read some
    /// free slots, so nothing may be written before a barrier passes.
    barrier_pending: bool,
}

/// A reserved slice, and whether a barrier must pass before it is written (quarantined
/// slots were freed since the last one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub slice: Slice,
    pub after_barrier: bool,
}

impl SlotAllocator {
    /// An array of `capacity` slots, all free.
    pub fn new(capacity: u32) -> Self {
        let mut allocator = Self {
            capacity,
            free: BTreeMap::new(),
            free_by_len: BTreeSet::new(),
            quarantined: Vec::new(),
            reserved: BTreeMap::new(),
            held: Vec::new(),
            barrier_pending: false,
        };
        if capacity > 0 {
            allocator.add_free(0, capacity);
        }
        allocator
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// After the maps were read again: the slices headers name are `live`; the others are
    /// free, except that what was quarantined stays so until the next barrier.
    pub fn rebuild(&mut self, live: impl IntoIterator<Item = Slice>) {
        let live: Vec<Slice> = live.into_iter().filter(|slice| slice.len > 0).collect();
        self.quarantined
            .retain(|q| !live.iter().any(|slice| slice.overlaps(*q)));
        let mut used: Vec<Slice> = live;
        used.extend(self.quarantined.iter().copied());
        used.sort();
        self.reserved.clear();
        self.held.clear();
        self.free.clear();
        self.free_by_len.clear();
        let mut next = 0;
        for slice in used {
            if slice.base > next {
                self.add_free(next, slice.base.min(self.capacity) - next);
            }
            next = next.max(slice.end().min(self.capacity));
        }
        if next < self.capacity {
            self.add_free(next, self.capacity - next);
        }
    }

    /// Reserves `len` (> 0) slots: the smallest free range that fits, else the same after
    /// freeing the quarantine (then a barrier must pass before the slice is written).
    /// `None` when no range fits either way; [`Self::evacuation`] may make room.
    pub fn reserve(&mut self, len: u32) -> Option<Reservation> {
        let slice = match self.take_best_fit(len) {
            Some(slice) => slice,
            None if self.quarantined.is_empty() => return None,
            None => {
                self.free_quarantine();
                self.take_best_fit(len)?
            }
        };
        Some(Reservation {
            slice,
            after_barrier: self.barrier_pending,
        })
    }

    /// Frees what was quarantined, to be written only after a barrier (see
    /// [`Self::barrier_pending`]).
    fn free_quarantine(&mut self) {
        if self.quarantined.is_empty() {
            return;
        }
        for slice in std::mem::take(&mut self.quarantined) {
            self.insert_free(slice);
        }
        self.barrier_pending = true;
    }

    /// Whether a barrier must pass before anything reserved now is written.
    pub fn barrier_pending(&self) -> bool {
        self.barrier_pending
    }

    /// A barrier passed: no packet reads what was freed before it.
    pub fn barrier_done(&mut self) {
        self.barrier_pending = false;
    }

    fn take_best_fit(&mut self, len: u32) -> Option<Slice> {
        let &(free_len, base) = self.free_by_len.range((len, 0)..).next()?;
        self.remove_free(base);
        if free_len > len {
            self.add_free(base + len, free_len - len);
        }
        self.reserved.insert(base, len);
        Some(Slice { base, len })
    }

    /// A header now names `slice` (reserved before, or live already).
    pub fn named(&mut self, slice: Slice) {
        self.reserved.remove(&slice.base);
    }

    /// A header stopped naming `slice`: quarantined until the next barrier.
    pub fn released(&mut self, slice: Slice) {
        if slice.len > 0 {
            self.quarantined.push(slice);
        }
    }

    /// The end of a batch of writes: reservations no header came to name (a write was
    /// refused: no packet ever saw them) and held windows are free again. Returns the
    /// unnamed reservations.
    pub fn settle(&mut self) -> Vec<Slice> {
        let unnamed: Vec<Slice> = std::mem::take(&mut self.reserved)
            .into_iter()
            .map(|(base, len)| Slice { base, len })
            .collect();
        for slice in unnamed
            .iter()
            .copied()
            .chain(std::mem::take(&mut self.held))
        {
            self.insert_free(slice);
        }
        unnamed
    }

    fn insert_free(&mut self, slice: Slice) {
        if slice.len == 0 {
            return;
        }
        let mut base = slice.base;
        let mut len = slice.len;
        if let Some((&before, &before_len)) = self.free.range(..base).next_back()
            && before + before_len == base
        {
            self.remove_free(before);
            base = before;
            len += before_len;
        }
        if let Some(after_len) = self.remove_free(base + len) {
            len += after_len;
        }
        self.add_free(base, len);
    }

    fn add_free(&mut self, base: u32, len: u32) {
        self.free.insert(base, len);
        self.free_by_len.insert((len, base));
    }

    /// Removes the free range at `base`; its length, if there was one.
    fn remove_free(&mut self, base: u32) -> Option<u32> {
        let len = self.free.remove(&base)?;
        self.free_by_len.remove(&(len, base));
        Some(len)
    }

    /// Whether slices wait in quarantine (a barrier would free them).
    pub fn has_quarantine(&self) -> bool {
        !self.quarantined.is_empty()
    }

    /// Slots not free: live, reserved, held or quarantined.
    pub fn used(&self) -> u32 {
        self.capacity - self.free.values().sum::<u32>()
    }

    /// Makes room for `len` slots when [`Self::reserve`] found none: picks the window of
    /// `len` slots holding the fewest live slots — only `movable` ones, none of `fixed`;
    /// the quarantine counts as free, a barrier passing first — whose slices all fit in
    /// free ranges outside it, reserves their new places and holds the window's free parts
    /// for the rest of the batch. Returns the moves `(old, new)`: the caller writes each
    /// copy and switches its header; once the old slices are released and a barrier
    /// passed, [`Self::reserve`] finds the window. `None` when no window works.
    pub fn evacuation(
        &mut self,
        len: u32,
        movable: &[Slice],
        fixed: &[Slice],
    ) -> Option<Vec<(Slice, Slice)>> {
        self.free_quarantine();
        let free_slots: u32 = self.free.values().sum();
        if free_slots < len || len > self.capacity {
            return None;
        }
        let mut live: Vec<Slice> = movable.iter().copied().filter(|s| s.len > 0).collect();
        live.sort();
        // Windows worth trying start at a free range or right after a live slice.
        let mut starts: Vec<u32> = self.free.keys().copied().collect();
        starts.extend(live.iter().chain(fixed).map(|slice| slice.end()));
        starts.push(0);
        starts.sort_unstable();
        starts.dedup();
        let mut blocked: Vec<Slice> = self
            .reserved
            .iter()
            .map(|(&base, &len)| Slice { base, len })
            .chain(self.held.iter().copied())
            .chain(fixed.iter().copied().filter(|s| s.len > 0))
            .collect();
        blocked.sort();
        // The furthest end among the blocked slices up to each: a window overlaps one iff
        // the furthest end of those starting before the window's end lies past its start.
        let blocked_reach: Vec<u32> = (blocked.iter())
            .scan(0, |reach, slice| {
                *reach = (*reach).max(slice.end());
                Some(*reach)
            })
            .collect();
        // Live slices are disjoint, so sorted by base they are sorted by end too: the ones
        // a window overlaps are a run, found by two cursors moving forward as the windows
        // do; their cost is a difference of running sums. Linear after the sorts.
        let mut sums = Vec::with_capacity(live.len() + 1);
        sums.push(0u64);
        for slice in &live {
            sums.push(sums[sums.len() - 1] + u64::from(slice.len));
        }
        let (mut first, mut past) = (0, 0);
        let mut windows: Vec<(u64, u32)> = Vec::new();
        for base in starts {
            let window = Slice { base, len };
            if window.end() > self.capacity {
                continue;
            }
            let before = blocked.partition_point(|slice| slice.base < window.end());
            if before > 0 && blocked_reach[before - 1] > base {
                continue;
            }
            while first < live.len() && live[first].end() <= base {
                first += 1;
            }
            past = past.max(first);
            while past < live.len() && live[past].base < window.end() {
                past += 1;
            }
            windows.push((sums[past] - sums[first], base));
        }
        // The cheapest window whose slices fit elsewhere; the first of equally cheap ones.
        windows.sort_unstable();
        let (window, mut victims) = windows.into_iter().find_map(|(_, base)| {
            let window = Slice { base, len };
            let first = live.partition_point(|slice| slice.end() <= base);
            let past = live.partition_point(|slice| slice.base < window.end());
            let inside = live[first..past].to_vec();
            self.fits_outside(&inside, window)
                .then_some((window, inside))
        })?;
        let held = self.carve(window);
        victims.sort_by_key(|victim| std::cmp::Reverse(victim.len));
        let mut moves = Vec::new();
        for victim in victims {
            let new = self
                .take_best_fit(victim.len)
                .expect("checked to fit outside the window");
            moves.push((victim, new));
        }
        self.held.extend(held);
        Some(moves)
    }

    /// Whether `slices` all fit (best fit, largest first) in the free ranges' parts
    /// outside `window`.
    fn fits_outside(&self, slices: &[Slice], window: Slice) -> bool {
        let mut free: Vec<u32> = Vec::new();
        for (&base, &len) in &self.free {
            let range = Slice { base, len };
            if base < window.base {
                free.push(range.end().min(window.base) - base);
            }
            if range.end() > window.end() {
                free.push(range.end() - base.max(window.end()));
            }
        }
        let mut sizes: Vec<u32> = slices.iter().map(|slice| slice.len).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        sizes.into_iter().all(|size| {
            let fit = free
                .iter_mut()
                .filter(|free| **free >= size)
                .min_by_key(|free| **free);
            fit.map(|fit| *fit -= size).is_some()
        })
    }

    /// Takes the free parts inside `window` out of the free ranges; returns them.
    fn carve(&mut self, window: Slice) -> Vec<Slice> {
        let first =
            (self.free.range(..window.base).next_back()).map_or(window.base, |(&base, _)| base);
        let overlapping: Vec<(u32, u32)> = (self.free.range(first..window.end()))
            .map(|(&base, &len)| (base, len))
            .filter(|&(base, len)| Slice { base, len }.overlaps(window))
            .collect();
        let mut inside = Vec::new();
        for (base, len) in overlapping {
            self.remove_free(base);
            let range = Slice { base, len };
            if base < window.base {
                self.add_free(base, window.base - base);
            }
            if range.end() > window.end() {
                self.add_free(window.end(), range.end() - window.end());
            }
            let start = base.max(window.base);
            inside.push(Slice {
                base: start,
                len: range.end().min(window.end()) - start,
            });
        }
        inside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(base: u32, len: u32) -> Slice {
        Slice { base, len }
    }

    #[test]
    fn best_fit_and_coalescing() {
        let mut slots = SlotAllocator::new(100);
        let a = slots.reserve(10).unwrap().slice;
        let b = slots.reserve(20).unwrap().slice;
        let c = slots.reserve(10).unwrap().slice;
        for s in [a, b, c] {
            slots.named(s);
        }
        assert_eq!((a, b, c), (slice(0, 10), slice(10, 20), slice(30, 10)));
        slots.released(a);
        slots.released(b);
        // Quarantined slots are not reused before a barrier.
        assert_eq!(slots.reserve(50).unwrap().slice, slice(40, 50));
        let wait = slots.reserve(25).unwrap();
        assert!(wait.after_barrier, "needs the quarantined range");
        assert_eq!(wait.slice, slice(0, 25), "a and b coalesced");
        // The smallest range that fits: 5 slots left at 25, 10 at 90.
        let next = slots.reserve(4).unwrap();
        assert_eq!((next.slice, next.after_barrier), (slice(25, 4), true));
        slots.barrier_done();
        assert_eq!(slots.reserve(9).unwrap().slice, slice(90, 9));
        assert_eq!(slots.reserve(2), None);
        assert_eq!(slots.settle().len(), 4);
        assert_eq!(slots.used(), 10, "only c is live");
    }

    #[test]
    fn rebuild_keeps_the_quarantine() {
        let mut slots = SlotAllocator::new(50);
        slots.released(slice(0, 10));
        slots.rebuild([slice(20, 5)]);
        assert_eq!(slots.used(), 15);
        let reserved = slots.reserve(25).unwrap();
        assert_eq!(
            (reserved.slice, reserved.after_barrier),
            (slice(25, 25), false)
        );
        let reserved = slots.reserve(20).unwrap();
        assert_eq!(
            (reserved.slice, reserved.after_barrier),
            (slice(0, 20), true)
        );
        assert!(slots.barrier_pending());
    }

    #[test]
    fn a_failed_reservation_still_owes_the_barrier() {
        let mut slots = SlotAllocator::new(10);
        slots.rebuild([slice(0, 8)]);
        slots.released(slice(0, 3));
        slots.rebuild([slice(3, 5)]);
        assert_eq!(slots.reserve(9), None, "5 free after the barrier, not 9");
        let reserved = slots.reserve(2).unwrap();
        assert!(
            reserved.after_barrier,
            "the quarantine was freed: a barrier is owed"
        );
    }

    #[test]
    fn evacuation_moves_the_fewest_live_slots_out_of_a_window() {
        let mut slots = SlotAllocator::new(40);
        // Live: 0..4, 10..12, 20..30, 35..37; free: 4..10, 12..20, 30..35, 37..40.
        let live = [slice(0, 4), slice(10, 2), slice(20, 10), slice(35, 2)];
        slots.rebuild(live);
        assert_eq!(slots.reserve(12), None, "22 slots free, none 12 in a row");
        let moves = slots.evacuation(12, &live, &[]).unwrap();
        assert_eq!(moves.len(), 1);
        let (old, new) = moves[0];
        assert_eq!(
            old,
            slice(10, 2),
            "the window 4..16 holds only 2 live slots"
        );
        assert!(
            !new.overlaps(slice(4, 12)),
            "moved out of the window: {new:?}"
        );
        slots.named(new);
        slots.released(old);
        slots.settle();
        let reserved = slots.reserve(12).unwrap();
        assert!(reserved.after_barrier);
        assert!(reserved.slice.len == 12 && reserved.slice.end() <= 20);
    }

    #[test]
    fn no_evacuation_without_enough_free_slots() {
        let mut slots = SlotAllocator::new(10);
        let live = [slice(0, 3), slice(5, 5)];
        slots.rebuild(live);
        assert_eq!(slots.evacuation(3, &live, &[]), None);
        // 10 slots free, but every window of 7 holds a slice that may not move.
        let fixed = [slice(3, 1), slice(8, 1)];
        let mut slots = SlotAllocator::new(12);
        slots.rebuild(fixed);
        assert_eq!(slots.evacuation(7, &[], &fixed), None);
    }

    /// The window a plain search picks: every start, the cheapest that fits, the first of
    /// equally cheap ones (what [`SlotAllocator::evacuation`] computes with cursors).
    fn plain_search(
        slots: &SlotAllocator,
        len: u32,
        movable: &[Slice],
        fixed: &[Slice],
    ) -> Option<Vec<Slice>> {
        let mut slots = slots.clone();
        slots.free_quarantine();
        if slots.free.values().sum::<u32>() < len {
            return None;
        }
        let mut starts: Vec<u32> = slots.free.keys().copied().collect();
        starts.extend(movable.iter().chain(fixed).map(|slice| slice.end()));
        starts.push(0);
        starts.sort_unstable();
        starts.dedup();
        let mut best: Option<(u32, Vec<Slice>)> = None;
        for base in starts {
            let window = slice(base, len);
            let blocked = (slots.reserved.iter().map(|(&base, &len)| slice(base, len)))
                .chain(slots.held.iter().copied())
                .chain(fixed.iter().copied())
                .any(|blocked| blocked.len > 0 && blocked.overlaps(window));
            if window.end() > slots.capacity || blocked {
                continue;
            }
            let mut inside: Vec<Slice> = (movable.iter().copied())
                .filter(|live| live.len > 0 && live.overlaps(window))
                .collect();
            inside.sort();
            let cost = inside.iter().map(|live| live.len).sum();
            if best.as_ref().is_none_or(|(best, _)| cost < *best)
                && slots.fits_outside(&inside, window)
            {
                best = Some((cost, inside));
            }
        }
        best.map(|(_, inside)| inside)
    }

    /// xorshift64: enough to draw test layouts.
    fn draw(state: &mut u64, below: u32) -> u32 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state % u64::from(below)) as u32
    }

    #[test]
    fn evacuation_moves_what_a_plain_search_would() {
        let mut state = 0x5eed_u64;
        for _ in 0..2_000 {
            let capacity = 20 + draw(&mut state, 60);
            // Disjoint live slices with gaps, some of them fixed.
            let (mut movable, mut fixed) = (Vec::new(), Vec::new());
            let mut next = draw(&mut state, 4);
            loop {
                let live = slice(next, 1 + draw(&mut state, 8));
                if live.end() > capacity {
                    break;
                }
                if draw(&mut state, 5) == 0 {
                    fixed.push(live);
                } else {
                    movable.push(live);
                }
                next = live.end() + draw(&mut state, 5);
            }
            let mut slots = SlotAllocator::new(capacity);
            slots.rebuild(movable.iter().chain(&fixed).copied());
            let len = 1 + draw(&mut state, capacity / 2);
            let expected = plain_search(&slots, len, &movable, &fixed);
            let moves = slots.evacuation(len, &movable, &fixed);
            let mut moved: Option<Vec<Slice>> = moves
                .as_ref()
                .map(|moves| moves.iter().map(|(old, _)| *old).collect());
            if let Some(moved) = &mut moved {
                moved.sort();
            }
            assert_eq!(
                moved, expected,
                "{len} slots among {movable:?}, fixed {fixed:?}"
            );
            for (old, new) in moves.unwrap_or_default() {
                assert_eq!(old.len, new.len);
                assert!(movable.iter().chain(&fixed).all(|live| !live.overlaps(new)));
            }
        }
    }

    #[test]
    fn a_fragmented_array_of_a_million_slots() {
        // 100 000 slices of 10 two slots apart, every tenth one gone (holes of 14), and
        // 200 002 slots free at the end.
        let capacity = 1_400_000;
        let live: Vec<Slice> = (0..100_000u32)
            .filter(|index| index % 10 != 5)
            .map(|index| slice(index * 12, 10))
            .collect();
        let mut slots = SlotAllocator::new(capacity);
        slots.rebuild(live.iter().copied());
        // Best fit: the first hole of 14 for 12 slots, not the long free end.
        let hole = slots.reserve(12).unwrap().slice;
        assert_eq!(hole, slice(4 * 12 + 10, 12));
        let end = slots.reserve(200_002).unwrap().slice;
        assert_eq!(end.end(), capacity);
        slots.named(hole);
        slots.named(end);
        assert_eq!(slots.reserve(30), None, "no 30 slots in a row");
        let moves = (slots.evacuation(30, &live, &[hole, end])).expect("room can be made");
        let moved: Vec<Slice> = moves.iter().map(|(old, _)| *old).collect();
        assert_eq!(
            moved.iter().map(|old| old.len).sum::<u32>(),
            20,
            "a window of 30 holds a hole of 14 and two slices at best"
        );
        for (old, new) in &moves {
            let taken = live.iter().chain([&hole, &end]);
            assert!(
                !taken.into_iter().any(|live| live.overlaps(*new)),
                "{new:?}"
            );
            slots.named(*new);
            slots.released(*old);
        }
        slots.settle();
        let reserved = slots.reserve(30).expect("the window, after a barrier");
        assert!(reserved.after_barrier);
        assert!(
            (live.iter())
                .filter(|live| !moved.contains(live))
                .all(|live| !live.overlaps(reserved.slice)),
            "{reserved:?} overlaps a slice still live"
        );
    }
}
