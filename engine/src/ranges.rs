//! Free ranges of block ids: the tree stores a run of blocks in consecutive ids, so freed ids
//! are kept as coalesced ranges and handed out best-fit, which keeps new runs contiguous.

use std::collections::{BTreeMap, BTreeSet};

/// A set of free `[start, start + len)` ranges, merged with their neighbours on insert.
#[derive(Default)]
pub(crate) struct FreeRanges {
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
    total: u64,
}

impl FreeRanges {
    /// Give `[start, start + len)` back (it must not overlap a free range).
    pub(crate) fn insert(&mut self, mut start: u32, mut len: u32) {
        if len == 0 {
            return;
        }
        self.total += len as u64;
        if let Some((&s, &l)) = self.by_start.range(..start).next_back() {
            if s as u64 + l as u64 == start as u64 {
                self.remove_entry(s, l);
                start = s;
                len += l;
            }
        }
        let end = start as u64 + len as u64;
        if end <= u32::MAX as u64 {
            if let Some(l) = self.by_start.get(&(end as u32)).copied() {
                self.remove_entry(end as u32, l);
                len += l;
            }
        }
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
    }

    fn remove_entry(&mut self, start: u32, len: u32) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
    }

    /// Take up to `want` consecutive ids: the smallest range that holds all of them, else the
    /// largest range there is (shorter than `want`). `None` when nothing is free.
    pub(crate) fn take(&mut self, want: u32) -> Option<(u32, u32)> {
        let want = want.max(1);
        let &(len, start) = self
            .by_len
            .range((want, 0)..)
            .next()
            .or_else(|| self.by_len.iter().next_back())?;
        self.remove_entry(start, len);
        let got = len.min(want);
        if len > got {
            self.by_start.insert(start + got, len - got);
            self.by_len.insert((len - got, start + got));
        }
        self.total -= got as u64;
        Some((start, got))
    }

    /// The longest free range's length (0 when none).
    pub(crate) fn longest(&self) -> u32 {
        self.by_len.iter().next_back().map_or(0, |&(l, _)| l)
    }

    /// Free ids in all.
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn neighbours_coalesce_and_best_fit_keeps_runs_whole() {
        let mut f = FreeRanges::default();
        f.insert(10, 5);
        f.insert(20, 3);
        f.insert(15, 5); // joins both neighbours: [10, 23)
        assert_eq!(f.longest(), 13);
        f.insert(100, 4);
        assert_eq!(f.take(4), Some((100, 4)), "exact fit preferred");
        assert_eq!(f.take(3), Some((10, 3)));
        assert_eq!(f.total(), 10);
        assert_eq!(f.take(50), Some((13, 10)), "largest when none fits");
        assert_eq!(f.take(1), None);
    }

    #[test]
    fn insert_at_the_top_of_the_id_space_does_not_overflow() {
        let mut f = FreeRanges::default();
        f.insert(u32::MAX - 2, 2);
        f.insert(u32::MAX - 4, 2);
        assert_eq!(f.take(4), Some((u32::MAX - 4, 4)));
    }
}
