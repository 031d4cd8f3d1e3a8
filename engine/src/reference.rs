//! A small, obviously-correct, single-threaded model of kvindex's index semantics.
//!
//! It exists so that tests (and tools) can compare the concurrent [`crate::Engine`] against a model
//! whose correctness can be checked by reading it. It favours clarity over speed: every held block
//! is stored with its whole path from the root.
//!
//! # The model (INDEXER.md §0, §3, and the kvindex column of §3.8)
//!
//! * Each stream ([`WorkerWithDpRank`]) holds a **bijection** between external block hashes and
//!   *paths*: the sequence of [`LocalBlockHash`]es from the root down to that block. Nothing is
//!   shared between streams: two workers storing the same tokens under different external hashes
//!   each keep their own hashes (§0.1).
//! * **Store** (`parent_hash`, blocks):
//!   1. any `block_hash == parent_hash` → `InvalidBlockSequence`, nothing applied;
//!   2. a `parent_hash` not held *by this stream* → `ParentBlockNotFound`, nothing applied
//!      (also for an empty block list);
//!   3. block *i*'s path is block *i-1*'s path (the parent's path for the first block, the empty
//!      path at the root) plus its `tokens_hash`;
//!   4. storing a path under an external hash replaces whatever that hash and that path were bound
//!      to before (so re-storing a path under a new hash drops the old hash);
//!   5. a non-empty store whose every block is already held with the same hash is a *duplicate*:
//!      it changes nothing and counts one `duplicate_store` warning.
//! * **Remove**: hashes are handled in order; an unknown hash is skipped and the first such miss
//!   is reported as `BlockNotFound` after the rest were applied. Removing a block never removes
//!   the stream's deeper blocks: they stay held as *orphans* (§0.2), invisible to matching until
//!   the gap is re-stored.
//! * **Cleared** drops every block of the emitting stream; the stream stays known.
//! * Events on a tier other than `device`, or with a residency domain other than absent/`worker`,
//!   are rejected with `UnsupportedResidencyDomain` and change nothing.
//! * Any other event (even one that fails) makes its stream known, so its worker is listed by
//!   [`ReferenceIndex::get_workers`] until `remove_worker`/`remove_worker_dp_rank` (§3.2.1, §3.7).
//!   `clear_all_blocks` empties every rank of a worker but keeps them listed.
//! * **find_matches**: a stream's score is the largest `k` such that it holds every prefix
//!   `sequence[..=i]` for `i < k`; streams scoring 0 are omitted; `frequencies` is empty.
//! * **dump**: Stored events covering exactly the *reachable* blocks (every prefix of the block's
//!   path is held by the stream), parents before children, event ids renumbered from 0. Orphans
//!   cannot be expressed in a Dynamo-compatible dump and are omitted.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::error::KvCacheEventError;
use crate::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, OverlapScores, ResidencyDomain, RouterEvent,
    StorageTier, WorkerId, WorkerWithDpRank,
};

/// A block's position in the tree: the local hashes from the root down to (and including) it.
pub type BlockPath = Vec<LocalBlockHash>;

/// One block of a canonical dump: who holds it, where it sits, and under which external hash.
pub type CanonicalBlock = (WorkerWithDpRank, BlockPath, ExternalSequenceBlockHash);

/// The blocks one stream holds: external hash ↔ path, kept as a bijection.
#[derive(Debug, Clone, Default)]
struct StreamBlocks {
    path_of: HashMap<ExternalSequenceBlockHash, BlockPath>,
    hash_of: HashMap<BlockPath, ExternalSequenceBlockHash>,
}

impl StreamBlocks {
    /// Bind `hash` ↔ `path`, dropping any previous partner of either side.
    fn bind(&mut self, hash: ExternalSequenceBlockHash, path: BlockPath) {
        if let Some(old_path) = self.path_of.remove(&hash) {
            self.hash_of.remove(&old_path);
        }
        if let Some(old_hash) = self.hash_of.remove(&path) {
            self.path_of.remove(&old_hash);
        }
        self.path_of.insert(hash, path.clone());
        self.hash_of.insert(path, hash);
    }

    /// Unbind `hash`; false when this stream did not hold it.
    fn unbind(&mut self, hash: ExternalSequenceBlockHash) -> bool {
        match self.path_of.remove(&hash) {
            Some(path) => {
                self.hash_of.remove(&path);
                true
            }
            None => false,
        }
    }

    fn holds_path(&self, path: &[LocalBlockHash]) -> bool {
        self.hash_of.contains_key(path)
    }

    /// The reachable blocks: those whose every prefix path is held. Shortest paths first, so a
    /// block is reachable exactly when it is a root block or its parent path is reachable.
    fn reachable(&self) -> Vec<(&BlockPath, ExternalSequenceBlockHash)> {
        let mut by_depth: Vec<(&BlockPath, ExternalSequenceBlockHash)> = self
            .hash_of
            .iter()
            .map(|(path, hash)| (path, *hash))
            .collect();
        by_depth.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then_with(|| a.0.cmp(b.0)));
        let mut reachable: HashSet<&[LocalBlockHash]> = HashSet::new();
        by_depth.retain(|(path, _)| {
            let ok = path.len() == 1 || reachable.contains(&path[..path.len() - 1]);
            if ok {
                reachable.insert(path.as_slice());
            }
            ok
        });
        by_depth
    }

    fn len(&self) -> usize {
        self.path_of.len()
    }

    fn clear(&mut self) {
        self.path_of.clear();
        self.hash_of.clear();
    }
}

/// Single-threaded reference model of kvindex's index (see the module docs for the rules).
#[derive(Debug, Clone, Default)]
pub struct ReferenceIndex {
    streams: BTreeMap<WorkerWithDpRank, StreamBlocks>,
    duplicate_stores: u64,
}

impl ReferenceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one event; on error the reported outcome is exactly what kvindex must report.
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), KvCacheEventError> {
        if event.storage_tier != StorageTier::Device {
            return Err(KvCacheEventError::UnsupportedResidencyDomain);
        }
        match event.residency_domain {
            None | Some(ResidencyDomain::Worker) => {}
            Some(_) => return Err(KvCacheEventError::UnsupportedResidencyDomain),
        }
        let stream = self.streams.entry(event.stream()).or_default();
        match &event.event.data {
            KvCacheEventData::Stored(store) => {
                let duplicate = Self::store(stream, store)?;
                if duplicate {
                    self.duplicate_stores += 1;
                }
                Ok(())
            }
            KvCacheEventData::Removed(remove) => {
                let mut first_error = None;
                for hash in &remove.block_hashes {
                    if !stream.unbind(*hash) && first_error.is_none() {
                        first_error = Some(KvCacheEventError::BlockNotFound);
                    }
                }
                first_error.map_or(Ok(()), Err)
            }
            KvCacheEventData::Cleared => {
                stream.clear();
                Ok(())
            }
        }
    }

    /// Apply a store to one stream; `Ok(true)` when it was a duplicate (nothing changed).
    fn store(
        stream: &mut StreamBlocks,
        store: &KvCacheStoreData,
    ) -> Result<bool, KvCacheEventError> {
        if let Some(parent) = store.parent_hash {
            if store.blocks.iter().any(|b| b.block_hash == parent) {
                return Err(KvCacheEventError::InvalidBlockSequence);
            }
        }
        let parent_path = match store.parent_hash {
            None => Vec::new(),
            Some(parent) => stream
                .path_of
                .get(&parent)
                .cloned()
                .ok_or(KvCacheEventError::ParentBlockNotFound)?,
        };
        // Compute every block's path first, so that the duplicate check sees the state before
        // the store.
        let mut path = parent_path;
        let mut bindings = Vec::with_capacity(store.blocks.len());
        for block in &store.blocks {
            path.push(block.tokens_hash);
            bindings.push((block.block_hash, path.clone()));
        }
        let duplicate = !bindings.is_empty()
            && bindings
                .iter()
                .all(|(hash, path)| stream.path_of.get(hash) == Some(path));
        if !duplicate {
            for (hash, path) in bindings {
                stream.bind(hash, path);
            }
        }
        Ok(duplicate)
    }

    /// Exact overlap scores. `early_exit` is accepted for parity with the engine; the exact score
    /// is also a valid early-exit answer, so it is ignored.
    pub fn find_matches(&self, sequence: &[LocalBlockHash], _early_exit: bool) -> OverlapScores {
        let mut scores = crate::protocol::ScoreMap::default();
        for (stream, blocks) in &self.streams {
            let depth = (1..=sequence.len())
                .take_while(|&len| blocks.holds_path(&sequence[..len]))
                .count();
            if depth > 0 {
                scores.insert(*stream, depth as u32);
            }
        }
        OverlapScores {
            scores,
            frequencies: Vec::new(),
        }
    }

    /// Forget every rank of `worker_id` (an unknown worker is a no-op).
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        self.streams
            .retain(|stream, _| stream.worker_id != worker_id);
    }

    /// Forget one rank of `worker_id` (an unknown rank is a no-op).
    pub fn remove_worker_dp_rank(&mut self, worker_id: WorkerId, dp_rank: u32) {
        self.streams
            .remove(&WorkerWithDpRank::new(worker_id, dp_rank));
    }

    /// Drop every block of every rank of `worker_id`, keeping the ranks known.
    pub fn clear_all_blocks(&mut self, worker_id: WorkerId) {
        for (_, blocks) in self
            .streams
            .iter_mut()
            .filter(|(stream, _)| stream.worker_id == worker_id)
        {
            blocks.clear();
        }
    }

    /// Dynamo-compatible dump of the reachable blocks: one Stored event per block, ordered by
    /// stream and then by depth, so every parent comes before its children.
    pub fn dump(&self) -> Vec<RouterEvent> {
        let mut events = Vec::new();
        for (stream, blocks) in &self.streams {
            let reachable = blocks.reachable();
            for (path, hash) in reachable {
                let parent_hash = match path.len() {
                    1 => None,
                    n => Some(blocks.hash_of[&path[..n - 1]]),
                };
                let event_id = events.len() as u64;
                events.push(RouterEvent {
                    worker_id: stream.worker_id,
                    storage_tier: StorageTier::Device,
                    residency_domain: Some(ResidencyDomain::Worker),
                    event: KvCacheEvent {
                        event_id,
                        data: KvCacheEventData::Stored(KvCacheStoreData {
                            parent_hash,
                            start_position: None,
                            blocks: vec![KvCacheStoredBlockData {
                                block_hash: hash,
                                tokens_hash: *path.last().expect("paths are non-empty"),
                                mm_extra_info: None,
                            }],
                        }),
                        dp_rank: stream.dp_rank,
                    },
                });
            }
        }
        events
    }

    /// Sorted, de-duplicated worker ids of every known stream (including empty ones).
    pub fn get_workers(&self) -> Vec<WorkerId> {
        let ids: BTreeSet<WorkerId> = self.streams.keys().map(|s| s.worker_id).collect();
        ids.into_iter().collect()
    }

    /// Every known stream, sorted (including streams that hold no block).
    pub fn streams(&self) -> Vec<WorkerWithDpRank> {
        self.streams.keys().copied().collect()
    }

    /// Blocks held, counted per stream (orphans included).
    pub fn current_size(&self) -> usize {
        self.streams.values().map(StreamBlocks::len).sum()
    }

    /// Blocks held per stream (orphans included), sorted by stream; streams holding nothing are
    /// omitted.
    pub fn worker_block_counts(&self) -> Vec<(WorkerWithDpRank, usize)> {
        self.streams
            .iter()
            .filter(|(_, blocks)| blocks.len() > 0)
            .map(|(stream, blocks)| (*stream, blocks.len()))
            .collect()
    }

    /// Number of `duplicate_store` warnings (stores that changed nothing).
    pub fn duplicate_store_warnings(&self) -> u64 {
        self.duplicate_stores
    }

    /// Whether `stream` holds a block under `hash` (reachable or not).
    pub fn holds(&self, stream: WorkerWithDpRank, hash: ExternalSequenceBlockHash) -> bool {
        self.streams
            .get(&stream)
            .is_some_and(|blocks| blocks.path_of.contains_key(&hash))
    }

    /// Every block `stream` holds (orphans included) as (hash, path), sorted by path.
    pub fn blocks(&self, stream: WorkerWithDpRank) -> Vec<(ExternalSequenceBlockHash, BlockPath)> {
        let mut out: Vec<_> = self
            .streams
            .get(&stream)
            .map(|blocks| {
                blocks
                    .path_of
                    .iter()
                    .map(|(hash, path)| (*hash, path.clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        out
    }

    /// Every held block, orphans included: what an exact snapshot (`IndexSnapshot::canonical`)
    /// must contain, as opposed to `canonical`, which is what a dump can express.
    pub fn held_blocks(&self) -> BTreeSet<CanonicalBlock> {
        let mut out = BTreeSet::new();
        for (stream, blocks) in &self.streams {
            for (hash, path) in &blocks.path_of {
                out.insert((*stream, path.clone(), *hash));
            }
        }
        out
    }

    /// The canonical form of this model's reachable state (what any correct dump expands to).
    pub fn canonical(&self) -> BTreeSet<CanonicalBlock> {
        let mut out = BTreeSet::new();
        for (stream, blocks) in &self.streams {
            for (path, hash) in blocks.reachable() {
                out.insert((*stream, path.clone(), hash));
            }
        }
        out
    }
}

/// Expand a dump into per-block `(stream, path, external hash)` triples, so that dumps which chain
/// the same blocks into events differently compare equal.
///
/// # Panics
/// When the events are not a valid dump: a non-`Stored` event, or a `parent_hash` that no earlier
/// event of the same stream stored (parents must come before children).
pub fn dump_canonical(events: &[RouterEvent]) -> BTreeSet<CanonicalBlock> {
    let mut paths: HashMap<WorkerWithDpRank, HashMap<ExternalSequenceBlockHash, BlockPath>> =
        HashMap::new();
    let mut out = BTreeSet::new();
    for (index, event) in events.iter().enumerate() {
        let stream = event.stream();
        let KvCacheEventData::Stored(store) = &event.event.data else {
            panic!("dump event #{index} of {stream:?} is not a Stored event: {event:?}");
        };
        let known = paths.entry(stream).or_default();
        let mut path = match store.parent_hash {
            None => Vec::new(),
            Some(parent) => known.get(&parent).cloned().unwrap_or_else(|| {
                panic!(
                    "dump event #{index} of {stream:?} has parent {parent:?}, \
                     which no earlier event of that stream stored"
                )
            }),
        };
        for block in &store.blocks {
            path.push(block.tokens_hash);
            known.insert(block.block_hash, path.clone());
            out.insert((stream, path.clone(), block.block_hash));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(worker_id: u64, dp_rank: u32) -> WorkerWithDpRank {
        WorkerWithDpRank::new(worker_id, dp_rank)
    }

    fn ev(worker_id: u64, dp_rank: u32, data: KvCacheEventData) -> RouterEvent {
        let mut e = RouterEvent::new(
            worker_id,
            KvCacheEvent {
                event_id: 0,
                data,
                dp_rank,
            },
        );
        e.residency_domain = None;
        e
    }

    /// `blocks` are (external hash, local hash) pairs.
    fn st(worker_id: u64, dp_rank: u32, parent: Option<u64>, blocks: &[(u64, u64)]) -> RouterEvent {
        ev(
            worker_id,
            dp_rank,
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(ExternalSequenceBlockHash),
                start_position: None,
                blocks: blocks
                    .iter()
                    .map(|&(ext, local)| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(ext),
                        tokens_hash: LocalBlockHash(local),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        )
    }

    fn rm(worker_id: u64, dp_rank: u32, hashes: &[u64]) -> RouterEvent {
        ev(
            worker_id,
            dp_rank,
            KvCacheEventData::Removed(crate::protocol::KvCacheRemoveData {
                block_hashes: hashes
                    .iter()
                    .map(|&h| ExternalSequenceBlockHash(h))
                    .collect(),
            }),
        )
    }

    fn q(index: &ReferenceIndex, locals: &[u64]) -> Vec<(WorkerWithDpRank, u32)> {
        let seq: Vec<_> = locals.iter().map(|&l| LocalBlockHash(l)).collect();
        index.find_matches(&seq, false).sorted()
    }

    fn path(locals: &[u64]) -> BlockPath {
        locals.iter().map(|&l| LocalBlockHash(l)).collect()
    }

    fn ext(h: u64) -> ExternalSequenceBlockHash {
        ExternalSequenceBlockHash(h)
    }

    /// S1 of §3.8.
    fn s1() -> ReferenceIndex {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2), (13, 3), (14, 4)]))
            .unwrap();
        r.apply(&st(2, 0, None, &[(11, 1), (12, 2), (23, 30)]))
            .unwrap();
        r
    }

    #[test]
    fn scores_are_longest_held_prefix_per_stream() {
        let r = s1();
        assert_eq!(q(&r, &[1, 2, 3, 4]), vec![(w(1, 0), 4), (w(2, 0), 2)]);
        assert_eq!(q(&r, &[1, 2, 30]), vec![(w(1, 0), 2), (w(2, 0), 3)]);
        assert_eq!(q(&r, &[1]), vec![(w(1, 0), 1), (w(2, 0), 1)]);
        assert_eq!(q(&r, &[9, 1]), vec![]);
        assert_eq!(q(&r, &[]), vec![]);
        assert!(r.find_matches(&path(&[1]), false).frequencies.is_empty());
        assert_eq!(r.current_size(), 7);
        assert_eq!(r.worker_block_counts(), vec![(w(1, 0), 4), (w(2, 0), 3)]);
    }

    #[test]
    fn unknown_parent_rejects_the_whole_store() {
        let mut r = s1();
        assert_eq!(
            r.apply(&st(3, 0, Some(12345), &[(99, 9)])),
            Err(KvCacheEventError::ParentBlockNotFound)
        );
        // Another stream's block is not a parent for this one.
        assert_eq!(
            r.apply(&st(2, 0, Some(14), &[(15, 5)])),
            Err(KvCacheEventError::ParentBlockNotFound)
        );
        assert_eq!(
            r.apply(&st(1, 0, Some(999), &[])),
            Err(KvCacheEventError::ParentBlockNotFound)
        );
        assert_eq!(q(&r, &[9]), vec![]);
        assert_eq!(r.current_size(), 7);
        // The failed event still made stream 3 known.
        assert_eq!(r.get_workers(), vec![1, 2, 3]);
        assert_eq!(r.worker_block_counts().len(), 2);
    }

    #[test]
    fn self_referencing_store_is_invalid_and_applies_nothing() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(12, 2)])).unwrap();
        assert_eq!(
            r.apply(&st(1, 0, Some(12), &[(13, 3), (12, 2)])),
            Err(KvCacheEventError::InvalidBlockSequence)
        );
        // Checked before the parent lookup.
        assert_eq!(
            r.apply(&st(1, 0, Some(77), &[(77, 3)])),
            Err(KvCacheEventError::InvalidBlockSequence)
        );
        assert_eq!(r.current_size(), 1);
        assert!(!r.holds(w(1, 0), ext(13)));
    }

    #[test]
    fn remove_continues_past_unknown_hashes_and_reports_the_first_miss() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
            .unwrap();
        assert_eq!(
            r.apply(&rm(1, 0, &[999, 13, 998])),
            Err(KvCacheEventError::BlockNotFound)
        );
        assert_eq!(q(&r, &[1, 2, 3]), vec![(w(1, 0), 2)]);
        assert_eq!(
            r.apply(&rm(55, 0, &[424242])),
            Err(KvCacheEventError::BlockNotFound)
        );
        assert_eq!(r.apply(&rm(1, 0, &[])), Ok(()));
        assert_eq!(r.get_workers(), vec![1, 55]);
    }

    #[test]
    fn removing_a_mid_chain_block_keeps_orphans_and_restoring_it_revives_them() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(
            1,
            0,
            None,
            &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
        ))
        .unwrap();
        r.apply(&rm(1, 0, &[13])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4, 5]), vec![(w(1, 0), 2)]);
        assert_eq!(r.current_size(), 4);
        assert_eq!(
            dump_canonical(&r.dump()),
            BTreeSet::from([
                (w(1, 0), path(&[1]), ext(11)),
                (w(1, 0), path(&[1, 2]), ext(12)),
            ])
        );
        // An orphan is still held: its removal succeeds (S6, kvindex column).
        assert_eq!(r.apply(&rm(1, 0, &[14])), Ok(()));
        r.apply(&st(1, 0, Some(12), &[(13, 3)])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4, 5]), vec![(w(1, 0), 3)]);
        r.apply(&st(1, 0, Some(13), &[(14, 4), (15, 5)])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4, 5]), vec![(w(1, 0), 5)]);
        // Orphans also revive without re-storing them (§6 test 25).
        let mut r = ReferenceIndex::new();
        r.apply(&st(
            1,
            0,
            None,
            &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
        ))
        .unwrap();
        r.apply(&rm(1, 0, &[13])).unwrap();
        r.apply(&st(1, 0, Some(12), &[(13, 3)])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4, 5]), vec![(w(1, 0), 5)]);
    }

    #[test]
    fn an_orphan_can_be_a_parent() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
            .unwrap();
        r.apply(&rm(1, 0, &[12])).unwrap();
        r.apply(&st(1, 0, Some(13), &[(14, 4)])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4]), vec![(w(1, 0), 1)]);
        r.apply(&st(1, 0, Some(11), &[(12, 2)])).unwrap();
        assert_eq!(q(&r, &[1, 2, 3, 4]), vec![(w(1, 0), 4)]);
    }

    #[test]
    fn duplicate_store_counts_a_warning_and_changes_nothing() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
        assert_eq!(r.duplicate_store_warnings(), 1);
        r.apply(&st(1, 0, Some(11), &[(12, 2)])).unwrap();
        assert_eq!(r.duplicate_store_warnings(), 2);
        // Partly new, or empty: not a duplicate.
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2), (13, 3)]))
            .unwrap();
        r.apply(&st(1, 0, None, &[])).unwrap();
        // Same path, another hash: not a duplicate either.
        r.apply(&st(1, 0, None, &[(111, 1)])).unwrap();
        assert_eq!(r.duplicate_store_warnings(), 2);
        // Another stream storing the same blocks is not a duplicate.
        r.apply(&st(2, 0, None, &[(11, 1), (12, 2)])).unwrap();
        assert_eq!(r.duplicate_store_warnings(), 2);
    }

    #[test]
    fn restoring_a_path_under_a_new_hash_replaces_the_old_hash() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
        r.apply(&st(1, 0, None, &[(111, 1)])).unwrap();
        assert!(!r.holds(w(1, 0), ext(11)));
        assert!(r.holds(w(1, 0), ext(111)));
        assert_eq!(r.current_size(), 2);
        assert_eq!(
            r.apply(&rm(1, 0, &[11])),
            Err(KvCacheEventError::BlockNotFound)
        );
        // The child keeps its path, and the new hash is now its parent in the dump.
        assert_eq!(q(&r, &[1, 2]), vec![(w(1, 0), 2)]);
        assert_eq!(
            dump_canonical(&r.dump()),
            BTreeSet::from([
                (w(1, 0), path(&[1]), ext(111)),
                (w(1, 0), path(&[1, 2]), ext(12)),
            ])
        );
        // Re-using a hash for another path moves it: the old path is no longer held.
        r.apply(&st(1, 0, None, &[(12, 7)])).unwrap();
        assert_eq!(q(&r, &[1, 2]), vec![(w(1, 0), 1)]);
        assert_eq!(q(&r, &[7]), vec![(w(1, 0), 1)]);
        assert_eq!(r.current_size(), 2);
    }

    #[test]
    fn per_stream_external_hashes_are_independent() {
        // S12, kvindex column.
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
        r.apply(&st(2, 0, None, &[(21, 1), (22, 2)])).unwrap();
        assert_eq!(q(&r, &[1, 2]), vec![(w(1, 0), 2), (w(2, 0), 2)]);
        assert_eq!(r.apply(&rm(2, 0, &[22])), Ok(()));
        assert_eq!(
            r.apply(&rm(2, 0, &[12])),
            Err(KvCacheEventError::BlockNotFound)
        );
        assert_eq!(q(&r, &[1, 2]), vec![(w(1, 0), 2), (w(2, 0), 1)]);
    }

    #[test]
    fn clears_and_worker_removal_are_scoped() {
        let mut r = ReferenceIndex::new();
        for (worker, rank) in [(1, 0), (1, 3), (2, 0)] {
            r.apply(&st(worker, rank, None, &[(11, 1)])).unwrap();
        }
        let cleared = ev(1, 3, KvCacheEventData::Cleared);
        r.apply(&cleared).unwrap();
        assert_eq!(q(&r, &[1]), vec![(w(1, 0), 1), (w(2, 0), 1)]);
        assert_eq!(r.streams(), vec![w(1, 0), w(1, 3), w(2, 0)]);
        r.apply(&st(1, 3, None, &[(11, 1)])).unwrap();
        r.clear_all_blocks(1);
        assert_eq!(q(&r, &[1]), vec![(w(2, 0), 1)]);
        assert_eq!(r.get_workers(), vec![1, 2]);
        r.clear_all_blocks(12345);
        r.remove_worker(12345);
        assert_eq!(r.get_workers(), vec![1, 2]);
        r.apply(&st(2, 1, None, &[(11, 1)])).unwrap();
        r.remove_worker_dp_rank(2, 0);
        assert_eq!(q(&r, &[1]), vec![(w(2, 1), 1)]);
        r.remove_worker(2);
        r.remove_worker(1);
        assert_eq!(r.get_workers(), Vec::<u64>::new());
        assert_eq!(r.dump(), vec![]);
    }

    #[test]
    fn unsupported_tier_or_domain_is_rejected_without_effect() {
        let mut r = ReferenceIndex::new();
        let mut e = st(1, 0, None, &[(11, 1)]);
        e.storage_tier = StorageTier::HostPinned;
        assert_eq!(
            r.apply(&e),
            Err(KvCacheEventError::UnsupportedResidencyDomain)
        );
        for domain in [
            ResidencyDomain::CacheOwner,
            ResidencyDomain::Unknown("x".into()),
            ResidencyDomain::Invalid,
        ] {
            let mut e = st(1, 0, None, &[(11, 1)]);
            e.residency_domain = Some(domain);
            assert_eq!(
                r.apply(&e),
                Err(KvCacheEventError::UnsupportedResidencyDomain)
            );
        }
        assert_eq!(r.get_workers(), Vec::<u64>::new());
        let mut e = st(1, 0, None, &[(11, 1)]);
        e.residency_domain = Some(ResidencyDomain::Worker);
        r.apply(&e).unwrap();
        assert_eq!(q(&r, &[1]), vec![(w(1, 0), 1)]);
    }

    #[test]
    fn dump_is_well_formed_omits_orphans_and_replays_to_the_same_state() {
        let mut r = s1();
        r.apply(&st(1, 2, None, &[(11, 1), (12, 2)])).unwrap();
        r.apply(&st(1, 2, Some(12), &[(50, 5)])).unwrap();
        r.apply(&rm(1, 0, &[12])).unwrap();
        let dump = r.dump();
        for (i, e) in dump.iter().enumerate() {
            assert_eq!(e.event.event_id, i as u64);
            assert_eq!(e.storage_tier, StorageTier::Device);
            assert_eq!(e.residency_domain, Some(ResidencyDomain::Worker));
            let KvCacheEventData::Stored(s) = &e.event.data else {
                panic!("not a store")
            };
            assert_eq!(s.start_position, None);
            assert!(s.blocks.iter().all(|b| b.mm_extra_info.is_none()));
        }
        let canonical = dump_canonical(&dump);
        assert_eq!(canonical, r.canonical());
        // w1 rank 0 keeps only block 11 reachable; 13 and 14 are orphans.
        let w10: Vec<_> = canonical.iter().filter(|b| b.0 == w(1, 0)).collect();
        assert_eq!(w10, vec![&(w(1, 0), path(&[1]), ext(11))]);
        assert_eq!(canonical.len(), 1 + 3 + 3);

        let mut replayed = ReferenceIndex::new();
        for e in &dump {
            replayed.apply(e).unwrap();
        }
        assert_eq!(dump_canonical(&replayed.dump()), canonical);
        assert_eq!(replayed.current_size(), 7);
    }

    #[test]
    fn dump_canonical_ignores_how_blocks_are_chained_into_events() {
        let chained = vec![st(1, 0, None, &[(11, 1), (12, 2), (13, 3)])];
        let split = vec![
            st(1, 0, None, &[(11, 1)]),
            st(1, 0, Some(11), &[(12, 2)]),
            st(1, 0, Some(12), &[(13, 3)]),
        ];
        assert_eq!(dump_canonical(&chained), dump_canonical(&split));
        assert_eq!(dump_canonical(&chained).len(), 3);
        let other_hash = vec![st(1, 0, None, &[(11, 1), (12, 2), (99, 3)])];
        assert_ne!(dump_canonical(&chained), dump_canonical(&other_hash));
    }

    #[test]
    #[should_panic(expected = "no earlier event of that stream stored")]
    fn dump_canonical_rejects_a_child_before_its_parent() {
        dump_canonical(&[st(1, 0, Some(11), &[(12, 2)]), st(1, 0, None, &[(11, 1)])]);
    }

    #[test]
    #[should_panic(expected = "no earlier event of that stream stored")]
    fn dump_canonical_resolves_parents_per_stream() {
        dump_canonical(&[st(1, 0, None, &[(11, 1)]), st(1, 1, Some(11), &[(12, 2)])]);
    }
}
