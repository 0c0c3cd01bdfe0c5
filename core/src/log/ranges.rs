//! Watermark tracking for one stream: the highest seq below which everything is present,
//! the seqs present above it (as ranges, so memory grows with the number of gaps, not the
//! number of records), and the gaps between. Pure.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watermark {
    /// Every seq in `1..=watermark` is present (or was, before retention).
    watermark: u64,
    /// Present seqs above `watermark + 1`, as `start -> end` (inclusive), disjoint and not
    /// adjacent to each other or to the watermark.
    above: BTreeMap<u64, u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// Newly present.
    New,
    /// Already present: nothing changes.
    Duplicate,
    /// Would open more disjoint ranges above the watermark than the bound
    /// (`log.present_ranges_max`) allows: not taken. Only [`Watermark::check`] says so.
    TooFragmented,
}

impl Watermark {
    pub fn new(watermark: u64) -> Watermark {
        Watermark { watermark, above: BTreeMap::new() }
    }

    pub fn get(&self) -> u64 {
        self.watermark
    }

    /// Highest seq present (the watermark if nothing is above it).
    pub fn last(&self) -> u64 {
        self.above.last_key_value().map_or(self.watermark, |(_, &end)| end)
    }

    pub fn contains(&self, seq: u64) -> bool {
        seq <= self.watermark || self.above.range(..=seq).next_back().is_some_and(|(_, &end)| seq <= end)
    }

    /// What inserting `seq` would do, without doing it, if at most `ranges_max` disjoint
    /// ranges may be kept above the watermark.
    pub fn check(&self, seq: u64, ranges_max: usize) -> Insert {
        if self.contains(seq) {
            return Insert::Duplicate;
        }
        let joins_left = seq == self.watermark.saturating_add(1) || self.above.range(..seq).next_back().is_some_and(|(_, &end)| end.saturating_add(1) == seq);
        let joins_right = seq.checked_add(1).is_some_and(|next| self.above.contains_key(&next));
        if !joins_left && !joins_right && self.above.len() >= ranges_max {
            return Insert::TooFragmented;
        }
        Insert::New
    }

    /// Marks `seq` (>= 1) present, whatever the number of ranges: a caller that bounds them
    /// asks [`Watermark::check`] first. (What a store holds is present, even if it holds more
    /// ranges than a bound lowered since.)
    pub fn insert(&mut self, seq: u64) -> Insert {
        debug_assert!(seq >= 1);
        let verdict = self.check(seq, usize::MAX);
        if verdict != Insert::New {
            return verdict;
        }
        let mut start = seq;
        let mut end = seq;
        if let Some((&s, &e)) = self.above.range(..seq).next_back() {
            if e.saturating_add(1) == seq {
                self.above.remove(&s);
                start = s;
            }
        }
        if let Some(e) = seq.checked_add(1).and_then(|next| self.above.remove(&next)) {
            end = e;
        }
        if start == self.watermark.saturating_add(1) {
            self.watermark = end;
        } else {
            self.above.insert(start, end);
        }
        Insert::New
    }

    /// The lowest seq from `seq` on that is present (or was, before retention, at or below the
    /// watermark); `seq` itself when nothing from there on is.
    pub fn next_present(&self, seq: u64) -> u64 {
        if self.contains(seq) {
            return seq;
        }
        self.above.range(seq..).next().map_or(seq, |(&start, _)| start)
    }

    /// The missing ranges between the watermark and the highest present seq, at most `max`.
    pub fn gaps(&self, max: usize) -> Vec<RangeInclusive<u64>> {
        let mut out = Vec::new();
        let mut next = self.watermark.saturating_add(1);
        for (&start, &end) in &self.above {
            if out.len() == max {
                break;
            }
            out.push(next..=start - 1);
            next = end.saturating_add(1);
        }
        out
    }

    /// How many seqs are missing between the watermark and the highest present seq (the
    /// gaps' sizes summed, over every gap, not only those [`Watermark::gaps`] lists).
    pub fn missing(&self) -> u64 {
        let above: u64 = self.above.iter().map(|(&start, &end)| end - start + 1).sum();
        (self.last() - self.watermark) - above
    }

    /// Number of disjoint present ranges above the watermark.
    pub fn fragments(&self) -> usize {
        self.above.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_and_out_of_order() {
        let mut w = Watermark::default();
        assert_eq!(w.insert(1), Insert::New);
        assert_eq!(w.insert(2), Insert::New);
        assert_eq!(w.get(), 2);
        assert_eq!(w.insert(5), Insert::New);
        assert_eq!(w.insert(7), Insert::New);
        assert_eq!(w.gaps(10), vec![3..=4, 6..=6]);
        assert_eq!(w.insert(5), Insert::Duplicate);
        assert_eq!(w.insert(2), Insert::Duplicate);
        assert_eq!(w.insert(6), Insert::New);
        assert_eq!(w.gaps(10), vec![3..=4]);
        assert_eq!(w.last(), 7);
        assert_eq!(w.insert(4), Insert::New);
        assert_eq!(w.insert(3), Insert::New);
        assert_eq!((w.get(), w.fragments(), w.gaps(10)), (7, 0, vec![]));
    }

    #[test]
    fn missing_counts_every_gap() {
        let mut w = Watermark::new(5);
        assert_eq!(w.missing(), 0);
        w.insert(8);
        w.insert(9);
        w.insert(12);
        assert_eq!(w.missing(), 2 + 2, "6..=7 and 10..=11");
        w.insert(6);
        w.insert(7);
        assert_eq!((w.get(), w.missing()), (9, 2));
    }

    #[test]
    fn next_present_steps_over_gaps() {
        let mut w = Watermark::new(5);
        w.insert(8);
        w.insert(9);
        w.insert(12);
        let next: Vec<u64> = [3, 5, 6, 7, 8, 10, 12, 13].iter().map(|&s| w.next_present(s)).collect();
        assert_eq!(next, [3, 5, 8, 8, 8, 12, 12, 13]);
    }

    #[test]
    fn the_highest_seqs_do_not_overflow() {
        let mut w = Watermark::new(3);
        assert_eq!(w.insert(u64::MAX), Insert::New);
        assert_eq!(w.insert(u64::MAX - 1), Insert::New);
        assert_eq!(w.check(u64::MAX, 1), Insert::Duplicate);
        assert_eq!(w.gaps(10), vec![4..=u64::MAX - 2]);
        assert_eq!((w.last(), w.next_present(4)), (u64::MAX, u64::MAX - 1));
    }

    #[test]
    fn fragmentation_is_bounded() {
        const RANGES_MAX: usize = 16;
        let mut w = Watermark::default();
        for i in 0..RANGES_MAX as u64 {
            assert_eq!(w.check(10 + 2 * i, RANGES_MAX), Insert::New);
            w.insert(10 + 2 * i);
        }
        assert_eq!(w.check(1_000_000, RANGES_MAX), Insert::TooFragmented);
        // Filling next to an existing range is still accepted.
        assert_eq!(w.check(11, RANGES_MAX), Insert::New);
        assert_eq!(w.insert(11), Insert::New);
        assert_eq!(w.fragments(), RANGES_MAX - 1);
        // Unbounded insert (loading what a store holds) takes a range beyond the bound.
        assert_eq!(w.insert(1_000_000), Insert::New);
        assert_eq!(w.fragments(), RANGES_MAX);
    }

    proptest! {
        /// A shuffled sequence with duplicates and holes: the watermark and gaps are exactly
        /// those of the set of distinct seqs inserted, whatever the order.
        #[test]
        fn watermark_and_gaps_match_the_set(
            present in proptest::collection::btree_set(1u64..300, 0..200),
            dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..50),
            seed in any::<u64>(),
        ) {
            let mut order: Vec<u64> = present.iter().copied().collect();
            let all = order.clone();
            if !all.is_empty() {
                order.extend(dups.iter().map(|i| all[i.index(all.len())]));
            }
            // Deterministic shuffle from the seed.
            let mut state = seed | 1;
            for i in (1..order.len()).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut w = Watermark::default();
            let mut news = 0;
            for &s in &order {
                if w.insert(s) == Insert::New { news += 1; }
            }
            prop_assert_eq!(news, present.len(), "each distinct seq is new exactly once");

            let mut expected_wm = 0;
            while present.contains(&(expected_wm + 1)) { expected_wm += 1; }
            let mut expected_gaps = Vec::new();
            let last = present.iter().next_back().copied().unwrap_or(0);
            let mut s = expected_wm + 1;
            while s <= last {
                if !present.contains(&s) {
                    let start = s;
                    while !present.contains(&s) { s += 1; }
                    expected_gaps.push(start..=s - 1);
                } else { s += 1; }
            }
            prop_assert_eq!(w.get(), expected_wm);
            prop_assert_eq!(w.last(), last.max(expected_wm));
            prop_assert_eq!(w.gaps(usize::MAX), expected_gaps);
            for s in 1..310 {
                prop_assert_eq!(w.contains(s), present.contains(&s));
            }
        }
    }
}
