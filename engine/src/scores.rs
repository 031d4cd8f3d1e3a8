//! [`ScoreMap`]: the per-stream scores of one query, as a flat list.
//!
//! A query on a busy namespace commonly scores every worker (every request of the reference
//! trace starts with a block all 256 workers hold), and callers iterate the answer far more
//! often than they look one stream up. Building a hash map per query cost more than the tree
//! walk itself (docs/benchmarks.md, session 6), so the answer is a vector of distinct streams:
//! one push per scored stream, lookups by linear scan.

use crate::protocol::WorkerWithDpRank;
use std::fmt;

/// Scores keyed by stream, in no particular order, each stream at most once. Exists so that a
/// query's answer costs one push per scored stream; it offers the read side of a map (`get`,
/// `iter`, `len`, ...) for callers that treated it as one.
#[derive(Clone, Default)]
pub struct ScoreMap {
    entries: Vec<(WorkerWithDpRank, u32)>,
}

/// Iterator over `(&stream, &score)` pairs of a [`ScoreMap`].
pub type Iter<'a> = std::iter::Map<
    std::slice::Iter<'a, (WorkerWithDpRank, u32)>,
    fn(&'a (WorkerWithDpRank, u32)) -> (&'a WorkerWithDpRank, &'a u32),
>;

impl ScoreMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map with room for `n` streams.
    pub fn with_capacity(n: usize) -> Self {
        ScoreMap {
            entries: Vec::with_capacity(n),
        }
    }

    /// Number of scored streams.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no stream scored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Room for `n` more streams.
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
    }

    /// The score of `stream` (a linear scan).
    pub fn get(&self, stream: &WorkerWithDpRank) -> Option<&u32> {
        self.entries
            .iter()
            .find(|(s, _)| s == stream)
            .map(|(_, score)| score)
    }

    /// Whether `stream` scored.
    pub fn contains_key(&self, stream: &WorkerWithDpRank) -> bool {
        self.get(stream).is_some()
    }

    /// Set the score of `stream`, returning the one it replaces (map semantics; a linear scan).
    pub fn insert(&mut self, stream: WorkerWithDpRank, score: u32) -> Option<u32> {
        match self.entries.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, old)) => Some(std::mem::replace(old, score)),
            None => {
                self.entries.push((stream, score));
                None
            }
        }
    }

    /// Append a stream the caller knows is not in the map yet (the query path: every slot is
    /// scored once and names one stream).
    pub(crate) fn push_new(&mut self, stream: WorkerWithDpRank, score: u32) {
        debug_assert!(!self.contains_key(&stream), "{stream:?} scored twice");
        self.entries.push((stream, score));
    }

    /// Every `(stream, score)`, in no particular order.
    pub fn iter(&self) -> Iter<'_> {
        self.entries.iter().map(|(s, score)| (s, score))
    }

    /// Every scored stream.
    pub fn keys(&self) -> impl Iterator<Item = &WorkerWithDpRank> + '_ {
        self.entries.iter().map(|(s, _)| s)
    }

    /// Every score.
    pub fn values(&self) -> impl Iterator<Item = &u32> + '_ {
        self.entries.iter().map(|(_, score)| score)
    }

    /// The pairs sorted by stream (worker_id, then dp_rank).
    pub fn sorted(&self) -> Vec<(WorkerWithDpRank, u32)> {
        let mut v = self.entries.clone();
        v.sort_unstable();
        v
    }
}

impl PartialEq for ScoreMap {
    /// Equal as maps: the same streams with the same scores, in any order.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.sorted() == other.sorted()
    }
}

impl Eq for ScoreMap {}

impl fmt::Debug for ScoreMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.sorted()).finish()
    }
}

impl<'a> IntoIterator for &'a ScoreMap {
    type Item = (&'a WorkerWithDpRank, &'a u32);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl IntoIterator for ScoreMap {
    type Item = (WorkerWithDpRank, u32);
    type IntoIter = std::vec::IntoIter<(WorkerWithDpRank, u32)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl Extend<(WorkerWithDpRank, u32)> for ScoreMap {
    /// Map semantics: a stream given twice keeps its last score.
    fn extend<I: IntoIterator<Item = (WorkerWithDpRank, u32)>>(&mut self, iter: I) {
        for (stream, score) in iter {
            self.insert(stream, score);
        }
    }
}

impl FromIterator<(WorkerWithDpRank, u32)> for ScoreMap {
    fn from_iter<I: IntoIterator<Item = (WorkerWithDpRank, u32)>>(iter: I) -> Self {
        let mut m = ScoreMap::new();
        m.extend(iter);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(worker_id: u64, dp_rank: u32) -> WorkerWithDpRank {
        WorkerWithDpRank { worker_id, dp_rank }
    }

    #[test]
    fn insert_replaces_and_lookups_find_every_stream() {
        let mut m = ScoreMap::new();
        assert_eq!(m.insert(w(1, 0), 3), None);
        assert_eq!(m.insert(w(1, 1), 5), None);
        assert_eq!(m.insert(w(1, 0), 4), Some(3));
        assert_eq!(m.len(), 2);
        assert_eq!(m.get(&w(1, 0)), Some(&4));
        assert_eq!(m.get(&w(1, 1)), Some(&5));
        assert!(!m.contains_key(&w(2, 0)));
        assert_eq!(m.values().sum::<u32>(), 9);
    }

    #[test]
    fn equality_ignores_order_but_not_scores() {
        let a: ScoreMap = [(w(1, 0), 1), (w(2, 0), 2)].into_iter().collect();
        let b: ScoreMap = [(w(2, 0), 2), (w(1, 0), 1)].into_iter().collect();
        let c: ScoreMap = [(w(2, 0), 2), (w(1, 0), 7)].into_iter().collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.sorted(), vec![(w(1, 0), 1), (w(2, 0), 2)]);
        assert_eq!(format!("{b:?}"), format!("{a:?}"));
    }

    #[test]
    fn collecting_keeps_a_repeated_streams_last_score() {
        let m: ScoreMap = [(w(1, 0), 1), (w(1, 0), 2)].into_iter().collect();
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&w(1, 0)), Some(&2));
        let pairs: Vec<_> = (&m).into_iter().map(|(s, v)| (*s, *v)).collect();
        assert_eq!(pairs, vec![(w(1, 0), 2)]);
    }
}
