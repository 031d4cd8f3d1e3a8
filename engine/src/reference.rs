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
//! * Events with a residency domain other than absent/`worker` are rejected with
//!   `UnsupportedResidencyDomain` and change nothing.
//! * **Lower tiers** (`host_pinned`, `disk`, `external`; SERVICE.md §6.4): per stream and tier, a
//!   list of blocks `(external hash, local hash, parent external hash)` in the order they were
//!   linked. A store needs no parent anywhere; block *i*'s parent is block *i-1* (the event's
//!   parent for the first); a repeated hash in the event (or one equal to the parent) is an
//!   `InvalidBlockSequence`; re-storing a hash with a different local or parent moves it to the
//!   end of the list; a store changing nothing is a duplicate. Removes work as on the device
//!   (first miss reported, no cascade). `Cleared` (whatever its tier) empties the device **and**
//!   every lower tier of its stream; `remove_worker*` and `clear_all_blocks` cover all tiers.
//! * **find_matches_tiered**: a stream's device depth `d` is its `find_matches` score; then each
//!   lower tier in the order host_pinned, disk, external continues from the current position:
//!   the next query block matches when the tier holds a block with that local hash whose parent
//!   is the previously matched block's external hash (the stream's device hash for the block at
//!   depth `d`, or the last lower-tier match), or no parent at position 0; the first such block
//!   in list order is followed. `host` is the depth after host_pinned, `disk` after external.
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

/// One lower-tier block of the model: (external hash, local hash, parent external hash).
pub type LowerEntry = (u64, u64, Option<u64>);

/// One lower-tier block in canonical form: (stream, tier, external, local, parent).
pub type CanonicalLowerBlock = (WorkerWithDpRank, StorageTier, u64, u64, Option<u64>);

fn lower_tier_rank(t: StorageTier) -> u8 {
    match t {
        StorageTier::Device => 0,
        StorageTier::HostPinned => 1,
        StorageTier::Disk => 2,
        StorageTier::External => 3,
    }
}

/// Single-threaded reference model of kvindex's index (see the module docs for the rules).
#[derive(Debug, Clone, Default)]
pub struct ReferenceIndex {
    streams: BTreeMap<WorkerWithDpRank, StreamBlocks>,
    /// Lower tiers: (stream, tier rank 1..=3) → blocks in link order.
    lower: BTreeMap<(WorkerWithDpRank, u8), Vec<LowerEntry>>,
    duplicate_stores: u64,
}

impl ReferenceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one event; on error the reported outcome is exactly what kvindex must report.
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), KvCacheEventError> {
        match event.residency_domain {
            None | Some(ResidencyDomain::Worker) => {}
            Some(_) => return Err(KvCacheEventError::UnsupportedResidencyDomain),
        }
        let key = event.stream();
        if matches!(event.event.data, KvCacheEventData::Cleared) {
            self.lower.retain(|(s, _), _| *s != key);
        } else if event.storage_tier != StorageTier::Device {
            self.streams.entry(key).or_default();
            let list = self
                .lower
                .entry((key, lower_tier_rank(event.storage_tier)))
                .or_default();
            let duplicate = Self::apply_lower(list, &event.event.data)?;
            if duplicate {
                self.duplicate_stores += 1;
            }
            return Ok(());
        }
        let stream = self.streams.entry(key).or_default();
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

    /// Apply a lower-tier store or remove to one (stream, tier) list; `Ok(true)` for a
    /// duplicate store.
    fn apply_lower(
        list: &mut Vec<LowerEntry>,
        data: &KvCacheEventData,
    ) -> Result<bool, KvCacheEventError> {
        match data {
            KvCacheEventData::Stored(store) => {
                let mut seen: BTreeSet<u64> = store.parent_hash.map(|p| p.0).into_iter().collect();
                if !store.blocks.iter().all(|b| seen.insert(b.block_hash.0)) {
                    return Err(KvCacheEventError::InvalidBlockSequence);
                }
                let mut parent = store.parent_hash.map(|p| p.0);
                let mut duplicate = !store.blocks.is_empty();
                for b in &store.blocks {
                    let entry = (b.block_hash.0, b.tokens_hash.0, parent);
                    match list.iter().position(|e| e.0 == entry.0) {
                        Some(i) if list[i] == entry => {}
                        Some(i) => {
                            duplicate = false;
                            list.remove(i);
                            list.push(entry);
                        }
                        None => {
                            duplicate = false;
                            list.push(entry);
                        }
                    }
                    parent = Some(b.block_hash.0);
                }
                Ok(duplicate)
            }
            KvCacheEventData::Removed(remove) => {
                let mut first_error = None;
                for h in &remove.block_hashes {
                    match list.iter().position(|e| e.0 == h.0) {
                        Some(i) => {
                            list.remove(i);
                        }
                        None => {
                            first_error.get_or_insert(KvCacheEventError::BlockNotFound);
                        }
                    }
                }
                first_error.map_or(Ok(false), Err)
            }
            KvCacheEventData::Cleared => {
                list.clear();
                Ok(false)
            }
        }
    }

    /// Tier-aware depths (see the module docs): every stream that matched on any tier.
    pub fn find_matches_tiered(
        &self,
        sequence: &[LocalBlockHash],
    ) -> BTreeMap<WorkerWithDpRank, crate::lower_tiers::TierDepths> {
        let device = self.find_matches(sequence, false).scores;
        let mut out = BTreeMap::new();
        for (stream, blocks) in &self.streams {
            let d = device.get(stream).copied().unwrap_or(0) as usize;
            let mut prev = match d {
                0 => None,
                _ => blocks.hash_of.get(&sequence[..d]).map(|h| h.0),
            };
            let mut pos = d;
            let mut host = d;
            for rank in 1..=3u8 {
                if let Some(list) = self.lower.get(&(*stream, rank)) {
                    while let Some(local) = sequence.get(pos) {
                        let Some(e) = list.iter().find(|e| e.1 == local.0 && e.2 == prev) else {
                            break;
                        };
                        prev = Some(e.0);
                        pos += 1;
                    }
                }
                if rank == 1 {
                    host = pos;
                }
            }
            if pos > 0 {
                out.insert(
                    *stream,
                    crate::lower_tiers::TierDepths {
                        device: d as u32,
                        host: host as u32,
                        disk: pos as u32,
                    },
                );
            }
        }
        out
    }

    /// Every lower-tier block, canonically.
    pub fn lower_blocks(&self) -> BTreeSet<CanonicalLowerBlock> {
        let tiers = [
            StorageTier::HostPinned,
            StorageTier::Disk,
            StorageTier::External,
        ];
        let mut out = BTreeSet::new();
        for ((stream, rank), list) in &self.lower {
            for &(ext, local, parent) in list {
                out.insert((*stream, tiers[*rank as usize - 1], ext, local, parent));
            }
        }
        out
    }

    /// Lower-tier blocks per (stream, tier), sorted; zero counts omitted.
    pub fn lower_tier_block_counts(&self) -> Vec<(WorkerWithDpRank, StorageTier, usize)> {
        let tiers = [
            StorageTier::HostPinned,
            StorageTier::Disk,
            StorageTier::External,
        ];
        self.lower
            .iter()
            .filter(|(_, l)| !l.is_empty())
            .map(|((s, r), l)| (*s, tiers[*r as usize - 1], l.len()))
            .collect()
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
        self.lower.retain(|(s, _), _| s.worker_id != worker_id);
    }

    /// Forget one rank of `worker_id` (an unknown rank is a no-op).
    pub fn remove_worker_dp_rank(&mut self, worker_id: WorkerId, dp_rank: u32) {
        let key = WorkerWithDpRank::new(worker_id, dp_rank);
        self.streams.remove(&key);
        self.lower.retain(|(s, _), _| *s != key);
    }

    /// Drop every block of every rank of `worker_id` (all tiers), keeping the ranks known.
    pub fn clear_all_blocks(&mut self, worker_id: WorkerId) {
        self.lower.retain(|(s, _), _| s.worker_id != worker_id);
        for (_, blocks) in self
            .streams
            .iter_mut()
            .filter(|(stream, _)| stream.worker_id == worker_id)
        {
            blocks.clear();
        }
    }

    /// Dynamo-compatible dump of the reachable **device** blocks: one Stored event per block,
    /// ordered by stream and then by depth, so every parent comes before its children. (Lower
    /// tiers: compare [`ReferenceIndex::lower_blocks`] with [`dump_lower_canonical`].)
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
/// Lower-tier events (`storage_tier != device`) are skipped: see [`dump_lower_canonical`].
pub fn dump_canonical(events: &[RouterEvent]) -> BTreeSet<CanonicalBlock> {
    let mut paths: HashMap<WorkerWithDpRank, HashMap<ExternalSequenceBlockHash, BlockPath>> =
        HashMap::new();
    let mut out = BTreeSet::new();
    for (index, event) in events.iter().enumerate() {
        if event.storage_tier != StorageTier::Device {
            continue;
        }
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

/// The lower-tier blocks of a dump, canonically: `(stream, tier, ext, local, parent)` per block.
///
/// # Panics
/// When a lower-tier event is not a `Stored` event.
pub fn dump_lower_canonical(events: &[RouterEvent]) -> BTreeSet<CanonicalLowerBlock> {
    let mut out = BTreeSet::new();
    for event in events {
        if event.storage_tier == StorageTier::Device {
            continue;
        }
        let KvCacheEventData::Stored(store) = &event.event.data else {
            panic!("lower-tier dump event is not a Stored event: {event:?}");
        };
        let mut parent = store.parent_hash.map(|p| p.0);
        for b in &store.blocks {
            out.insert((
                event.stream(),
                event.storage_tier,
                b.block_hash.0,
                b.tokens_hash.0,
                parent,
            ));
            parent = Some(b.block_hash.0);
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
    fn lower_tiers_continue_the_device_match_per_stream() {
        let mut r = ReferenceIndex::new();
        r.apply(&st(1, 0, None, &[(21, 1)])).unwrap();
        let mut disk = st(1, 0, Some(11), &[(12, 2), (13, 3)]);
        disk.storage_tier = StorageTier::Disk;
        r.apply(&disk).unwrap();
        let mut cpu = st(1, 0, Some(21), &[(22, 2)]);
        cpu.storage_tier = StorageTier::HostPinned;
        r.apply(&cpu).unwrap();
        let depths =
            r.find_matches_tiered(&[LocalBlockHash(1), LocalBlockHash(2), LocalBlockHash(3)]);
        let d = depths[&w(1, 0)];
        assert_eq!((d.device, d.host, d.disk), (1, 2, 2));
        assert_eq!(r.lower_blocks().len(), 3);
        r.apply(&ev(1, 0, KvCacheEventData::Cleared)).unwrap();
        assert!(r.lower_blocks().is_empty());
        assert!(r.find_matches_tiered(&[LocalBlockHash(1)]).is_empty());
    }

    #[test]
    fn unsupported_domain_is_rejected_without_effect() {
        let mut r = ReferenceIndex::new();
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
