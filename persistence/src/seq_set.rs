//! Exact sets of tagged source sequences (docs/log-format.md §6): a source sequence with bit 63
//! set names one message of a globally sequenced source (JetStream: `TAG | group << 47 | seq`,
//! the group telling apart streams whose sequences restarted). The log keeps, per group, the
//! exact set of such sequences whose entries are durable, as ranges (sequences are mostly
//! contiguous), so a redelivered message can be recognised as logged or not.

use std::collections::{BTreeMap, HashMap};

/// Bit 63: the source sequence is tagged.
pub const SOURCE_SEQ_TAG: u64 = 1 << 63;
/// Bits 47..=62 hold the group.
pub const SOURCE_SEQ_GROUP_SHIFT: u32 = 47;
/// Largest sequence a tagged source sequence can carry (47 bits).
pub const MAX_TAGGED_SEQ: u64 = (1 << SOURCE_SEQ_GROUP_SHIFT) - 1;

/// `TAG | group << 47 | seq`, or `None` when `seq` does not fit in 47 bits.
pub fn tagged_source_seq(group: u16, seq: u64) -> Option<u64> {
    (seq <= MAX_TAGGED_SEQ)
        .then(|| SOURCE_SEQ_TAG | (u64::from(group) << SOURCE_SEQ_GROUP_SHIFT) | seq)
}

/// `(group, seq)` of a tagged source sequence; `None` for an untagged one.
pub fn split_tagged(source_seq: u64) -> Option<(u16, u64)> {
    if source_seq & SOURCE_SEQ_TAG == 0 {
        return None;
    }
    let group = ((source_seq & !SOURCE_SEQ_TAG) >> SOURCE_SEQ_GROUP_SHIFT) as u16;
    Some((group, source_seq & MAX_TAGGED_SEQ))
}

/// A set of `u64` kept as disjoint, non-adjacent inclusive ranges `first..=last`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqSet {
    /// `first` → `last`; ranges never overlap nor touch (`last + 1 < next first`).
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &last)| seq <= last)
    }

    /// Add `seq`.
    pub fn insert(&mut self, seq: u64) {
        self.insert_range(seq, seq);
    }

    /// Add every sequence of `first..=last` (nothing when `first > last`).
    pub fn insert_range(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        let (mut lo, mut hi) = (first, last);
        // A range starting at or before `lo` that reaches it (or ends just before it).
        if let Some((&f, &l)) = self.ranges.range(..=lo).next_back() {
            if l.saturating_add(1) >= lo {
                if l >= hi {
                    return;
                }
                lo = f;
            }
        }
        // Ranges starting inside `lo..=hi + 1` are swallowed.
        let reach = hi.saturating_add(1);
        let swallowed: Vec<(u64, u64)> = self
            .ranges
            .range(lo..=reach)
            .map(|(&f, &l)| (f, l))
            .collect();
        for (f, l) in swallowed {
            self.ranges.remove(&f);
            hi = hi.max(l);
        }
        self.ranges.insert(lo, hi);
    }

    /// Remove every sequence `<= floor`.
    pub fn remove_up_to(&mut self, floor: u64) {
        let Some(above) = floor.checked_add(1) else {
            self.ranges.clear();
            return;
        };
        let mut kept = self.ranges.split_off(&above);
        if let Some((_, &l)) = self.ranges.iter().next_back() {
            if l >= above {
                kept.insert(above, l);
            }
        }
        self.ranges = kept;
    }

    /// Add every sequence of `other`.
    pub fn union(&mut self, other: &SeqSet) {
        for (f, l) in other.ranges() {
            self.insert_range(f, l);
        }
    }

    /// The ranges `(first, last)`, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&f, &l)| (f, l))
    }

    /// The largest sequence of the set.
    pub fn last(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }

    /// How many ranges the set is made of (its memory, roughly).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// The exact durable tagged source sequences, by group.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TaggedSeqs {
    groups: HashMap<u16, SeqSet>,
}

impl TaggedSeqs {
    /// Record `source_seq` if it is tagged (untagged ones are ignored).
    pub fn insert(&mut self, source_seq: u64) {
        if let Some((g, s)) = split_tagged(source_seq) {
            self.groups.entry(g).or_default().insert(s);
        }
    }

    /// Whether the tagged `source_seq` is in the set (`false` for an untagged one).
    pub fn contains(&self, source_seq: u64) -> bool {
        split_tagged(source_seq)
            .is_some_and(|(g, s)| self.groups.get(&g).is_some_and(|set| set.contains(s)))
    }

    /// Add a range of group `group`.
    pub fn insert_range(&mut self, group: u16, first: u64, last: u64) {
        self.groups
            .entry(group)
            .or_default()
            .insert_range(first, last);
    }

    /// Add everything of `other`.
    pub fn union(&mut self, other: &TaggedSeqs) {
        for (g, set) in &other.groups {
            self.groups.entry(*g).or_default().union(set);
        }
    }

    /// Keep only group `group`, without its sequences `<= floor`.
    pub fn retain_above(&mut self, group: u16, floor: u64) {
        self.groups.retain(|g, _| *g == group);
        if let Some(set) = self.groups.get_mut(&group) {
            set.remove_up_to(floor);
            if set.is_empty() {
                self.groups.remove(&group);
            }
        }
    }

    /// `(group, set)` pairs, by ascending group.
    pub fn groups(&self) -> Vec<(u16, &SeqSet)> {
        let mut v: Vec<_> = self.groups.iter().map(|(g, s)| (*g, s)).collect();
        v.sort_by_key(|(g, _)| *g);
        v
    }

    /// The largest sequence of group `group`.
    pub fn last_of(&self, group: u16) -> Option<u64> {
        self.groups.get(&group).and_then(SeqSet::last)
    }

    /// The groups holding sequences, ascending (without copying the sets).
    pub fn group_ids(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .groups
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(g, _)| *g)
            .collect();
        v.sort_unstable();
        v
    }

    /// Ranges over every group.
    pub fn range_count(&self) -> usize {
        self.groups.values().map(SeqSet::range_count).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.values().all(SeqSet::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> SeqSet {
        let mut s = SeqSet::default();
        for &(f, l) in ranges {
            s.insert_range(f, l);
        }
        s
    }

    fn ranges(s: &SeqSet) -> Vec<(u64, u64)> {
        s.ranges().collect()
    }

    #[test]
    fn contiguous_inserts_make_one_range_and_gaps_stay_out() {
        let mut s = SeqSet::default();
        for q in [1, 2, 3, 5, 6, 4, 9] {
            s.insert(q);
        }
        assert_eq!(ranges(&s), vec![(1, 6), (9, 9)]);
        assert!(s.contains(1) && s.contains(4) && s.contains(6) && s.contains(9));
        assert!(!s.contains(0) && !s.contains(7) && !s.contains(8) && !s.contains(10));
        s.insert(3);
        assert_eq!(ranges(&s), vec![(1, 6), (9, 9)], "idempotent");
    }

    #[test]
    fn a_range_merges_with_every_range_it_overlaps_or_touches() {
        let mut s = set(&[(1, 2), (5, 6), (9, 10), (20, 30)]);
        s.insert_range(3, 8);
        assert_eq!(ranges(&s), vec![(1, 10), (20, 30)]);
        s.insert_range(22, 25);
        assert_eq!(ranges(&s), vec![(1, 10), (20, 30)]);
        s.insert_range(12, 19);
        assert_eq!(ranges(&s), vec![(1, 10), (12, 30)]);
        s.insert_range(0, 40);
        assert_eq!(ranges(&s), vec![(0, 40)]);
        s.insert_range(7, 3);
        assert_eq!(ranges(&s), vec![(0, 40)], "an empty range adds nothing");
        let mut top = SeqSet::default();
        top.insert_range(u64::MAX - 1, u64::MAX);
        top.insert(u64::MAX - 2);
        assert_eq!(ranges(&top), vec![(u64::MAX - 2, u64::MAX)]);
    }

    #[test]
    fn removing_up_to_a_floor_cuts_a_range_in_the_middle() {
        let mut s = set(&[(1, 5), (8, 12), (20, 20)]);
        s.remove_up_to(9);
        assert_eq!(ranges(&s), vec![(10, 12), (20, 20)]);
        assert!(!s.contains(9) && s.contains(10));
        s.remove_up_to(12);
        assert_eq!(ranges(&s), vec![(20, 20)]);
        s.remove_up_to(0);
        assert_eq!(ranges(&s), vec![(20, 20)]);
        s.remove_up_to(u64::MAX);
        assert!(s.is_empty());
    }

    #[test]
    fn the_set_matches_a_plain_set_on_random_operations() {
        // A small deterministic generator: no dependency, same sequence every run.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut s = SeqSet::default();
        let mut plain = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            match next(10) {
                0 => {
                    let f = next(300);
                    s.remove_up_to(f);
                    plain.retain(|&q| q > f);
                }
                1..=3 => {
                    let f = next(300);
                    let l = f + next(6);
                    s.insert_range(f, l);
                    plain.extend(f..=l);
                }
                _ => {
                    let q = next(300);
                    s.insert(q);
                    plain.insert(q);
                }
            }
        }
        for q in 0..320 {
            assert_eq!(s.contains(q), plain.contains(&q), "seq {q}");
        }
        let mut prev: Option<u64> = None;
        for (f, l) in s.ranges() {
            assert!(f <= l);
            assert!(prev.is_none_or(|p| p + 1 < f), "ranges touch or overlap");
            prev = Some(l);
        }
    }

    #[test]
    fn tagged_sequences_are_kept_by_group_and_untagged_ones_ignored() {
        let a = tagged_source_seq(1, 7).unwrap();
        let b = tagged_source_seq(2, 7).unwrap();
        assert_eq!(split_tagged(a), Some((1, 7)));
        assert_eq!(split_tagged(7), None);
        assert_eq!(tagged_source_seq(1, MAX_TAGGED_SEQ + 1), None);
        assert_eq!(
            split_tagged(tagged_source_seq(u16::MAX, MAX_TAGGED_SEQ).unwrap()),
            Some((u16::MAX, MAX_TAGGED_SEQ))
        );
        // A sequence of the version-1 layout (`TAG | seq`) is group 0.
        assert_eq!(split_tagged(SOURCE_SEQ_TAG | 5), Some((0, 5)));

        let mut t = TaggedSeqs::default();
        t.insert(a);
        t.insert(7);
        assert!(t.contains(a));
        assert!(!t.contains(b), "another group (a re-created stream)");
        assert!(!t.contains(7));
        t.insert(b);
        t.insert(tagged_source_seq(2, 9).unwrap());
        t.retain_above(2, 7);
        assert!(!t.contains(a), "other groups dropped");
        assert!(!t.contains(b), "at the floor: dropped");
        assert!(t.contains(tagged_source_seq(2, 9).unwrap()));
        assert_eq!(t.range_count(), 1);
    }
}
