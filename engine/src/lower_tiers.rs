//! The lower storage tiers (`host_pinned`, `disk`, `external`) of one namespace, and the
//! continuation walk that extends a device match through them (SERVICE.md §6.4).
//!
//! Shape: per stream (worker, dp_rank) and per tier, a [`TierBlocks`] map of the blocks the
//! worker holds there: external hash → (local hash, parent external hash), plus the reverse link
//! `(parent, local) → external hash` the walk follows. Lower-tier stores never need their parent
//! to exist (in any tier); a block only counts in a query when its parent is the block matched
//! just before it.
//!
//! Concurrency: a stream's maps are written only by the stream's event thread (the same thread
//! that applies its device events, so per-stream order holds across tiers), each under its own
//! `RwLock`. Queries take each lock for reading only for the few probes of one stream's walk
//! (never while walking the device tree), so a query waits at most for one event of that stream
//! and the device path stays lock-free. See docs/architecture.md.

use crate::error::KvCacheEventError;
use crate::protocol::{
    DpRank, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, ResidencyDomain, RouterEvent, ScoreMap, StorageTier,
    WorkerId, WorkerWithDpRank,
};
use crate::snapshot::SnapshotLowerBlock;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The lower tiers in walk order: a query continues on `host_pinned`, then `disk`, then
/// `external` (Dynamo 1.6.1: each tier continues where the previous one stopped; `external`
/// counts under `disk`).
pub const LOWER_TIERS: [StorageTier; 3] = [
    StorageTier::HostPinned,
    StorageTier::Disk,
    StorageTier::External,
];

/// Position of a lower tier in [`LOWER_TIERS`]; `None` for the device tier.
pub(crate) fn tier_index(tier: StorageTier) -> Option<usize> {
    match tier {
        StorageTier::Device => None,
        StorageTier::HostPinned => Some(0),
        StorageTier::Disk => Some(1),
        StorageTier::External => Some(2),
    }
}

/// Cumulative match of one stream over the tiers, in blocks: `device ≤ host ≤ disk`, where
/// `disk` also covers the `external` tier (SERVICE.md §3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TierDepths {
    /// Leading query blocks held on the device (the `find_matches` score).
    pub device: u32,
    /// `device` plus the host_pinned continuation.
    pub host: u32,
    /// `host` plus the disk continuation, plus the external continuation after it.
    pub disk: u32,
}

impl TierDepths {
    /// The depths of a stream matched on the device only: `host = disk = device`.
    pub fn device_only(device: u32) -> Self {
        Self {
            device,
            host: device,
            disk: device,
        }
    }

    /// Whether the lower tiers add to the device match (`disk > device`; `host ≤ disk`, so this
    /// also covers a host_pinned continuation).
    pub fn extends_device(&self) -> bool {
        self.disk > self.device
    }
}

/// Per-stream hash map with a fast non-cryptographic hasher (foldhash).
type StreamMap<V> = HashMap<WorkerWithDpRank, V, hashbrown::DefaultHashBuilder>;

/// The streams whose lower tiers extend their device match (`disk > device`, see
/// [`TierDepths::extends_device`]), with their cumulative depths: the only part of a tiered
/// answer that the device scores do not already say. It exists so that the query path copies
/// nothing per device-matched stream: a namespace without lower-tier blocks answers with an
/// empty one. Collecting depths into it keeps only the extending ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierExtensions(StreamMap<TierDepths>);

impl TierExtensions {
    /// The depths of `stream` when its lower tiers extend its device match.
    pub fn get(&self, stream: &WorkerWithDpRank) -> Option<&TierDepths> {
        if self.0.is_empty() {
            return None;
        }
        self.0.get(stream)
    }

    /// Number of extended streams.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no stream's lower tiers add to its device match.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The extended streams, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&WorkerWithDpRank, &TierDepths)> {
        self.0.iter()
    }

    /// Record `depths` of `stream` if they extend its device match; otherwise nothing.
    fn insert(&mut self, stream: WorkerWithDpRank, depths: TierDepths) {
        if depths.extends_device() {
            self.0.insert(stream, depths);
        }
    }
}

impl FromIterator<(WorkerWithDpRank, TierDepths)> for TierExtensions {
    /// Keeps the entries whose depths extend the device match (a device-only entry is implied
    /// by the device scores).
    fn from_iter<I: IntoIterator<Item = (WorkerWithDpRank, TierDepths)>>(iter: I) -> Self {
        let mut out = Self::default();
        for (stream, depths) in iter {
            out.insert(stream, depths);
        }
        out
    }
}

/// Result of a tier-aware query: the device scores (exactly `find_matches`) and the streams
/// whose lower tiers extend them. Together they give every stream matched on any tier; read
/// them through [`TieredScores::depth`], [`TieredScores::depths`], [`TieredScores::sorted`] or
/// [`TieredScores::by_instance`], which merge the two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TieredScores {
    /// Device scores, exactly [`crate::Namespace::find_matches`].
    pub device: crate::protocol::OverlapScores,
    /// Only the streams whose lower tiers extend their device match (`disk > device`),
    /// including streams matched on lower tiers only (`device = 0`). A stream in `device` and
    /// absent here has depths `device = host = disk` = its score; a stream in neither matched
    /// nothing. Empty whenever the namespace holds no lower-tier block.
    pub tiers: TierExtensions,
}

/// One instance's tiered match, in blocks: the shape of Dynamo's `instances[id]` (SERVICE.md §3.6).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstanceTiers {
    /// Device blocks per dp_rank; a rank matched only on lower tiers shows 0.
    pub dp: std::collections::BTreeMap<DpRank, u32>,
    /// Largest device match over the ranks.
    pub gpu: u32,
    /// Largest device + host_pinned match over the ranks.
    pub cpu: u32,
    /// Largest match over all tiers (external counts under disk); also `longest_matched`.
    pub disk: u32,
}

impl TieredScores {
    /// Cumulative depths of `stream`; `None` when it matched on no tier.
    pub fn depth(&self, stream: &WorkerWithDpRank) -> Option<TierDepths> {
        if let Some(d) = self.tiers.get(stream) {
            return Some(*d);
        }
        self.device
            .scores
            .get(stream)
            .map(|&d| TierDepths::device_only(d))
    }

    /// Every stream matched on any tier with its cumulative depths, in no particular order.
    pub fn depths(&self) -> impl Iterator<Item = (WorkerWithDpRank, TierDepths)> + '_ {
        let device = self.device.scores.iter().map(|(s, &d)| {
            let depths = self
                .tiers
                .get(s)
                .copied()
                .unwrap_or(TierDepths::device_only(d));
            (*s, depths)
        });
        let lower_only = self
            .tiers
            .iter()
            .filter(|(s, _)| !self.device.scores.contains_key(s))
            .map(|(s, d)| (*s, *d));
        device.chain(lower_only)
    }

    /// [`TieredScores::depths`] sorted by stream, for deterministic output and comparison.
    pub fn sorted(&self) -> Vec<(WorkerWithDpRank, TierDepths)> {
        let mut v: Vec<_> = self.depths().collect();
        v.sort_unstable_by_key(|(k, _)| *k);
        v
    }

    /// Per instance: each rank's device depth, and the largest cumulative depths over its ranks.
    pub fn by_instance(&self) -> std::collections::BTreeMap<WorkerId, InstanceTiers> {
        let mut out: std::collections::BTreeMap<WorkerId, InstanceTiers> = Default::default();
        for (s, d) in self.depths() {
            let i = out.entry(s.worker_id).or_default();
            i.dp.insert(s.dp_rank, d.device);
            i.gpu = i.gpu.max(d.device);
            i.cpu = i.cpu.max(d.host);
            i.disk = i.disk.max(d.disk);
        }
        out
    }
}

/// One lower-tier block: its local hash and the parent the engine reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LowerBlock {
    local: u64,
    parent: Option<u64>,
}

/// The blocks sharing one `(parent, local)` link: almost always one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Links {
    One(u64),
    Many(Vec<u64>),
}

impl Links {
    fn first(&self) -> Option<u64> {
        match self {
            Links::One(e) => Some(*e),
            Links::Many(v) => v.first().copied(),
        }
    }

    fn add(&mut self, ext: u64) {
        match self {
            Links::One(e) if *e == ext => {}
            Links::One(e) => *self = Links::Many(vec![*e, ext]),
            Links::Many(v) => {
                if !v.contains(&ext) {
                    v.push(ext)
                }
            }
        }
    }

    /// Remove `ext`; true when no block is left.
    fn remove(&mut self, ext: u64) -> bool {
        match self {
            Links::One(e) => *e == ext,
            Links::Many(v) => {
                v.retain(|&e| e != ext);
                match v[..] {
                    [] => true,
                    [only] => {
                        *self = Links::One(only);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// The blocks one stream holds on one lower tier.
#[derive(Debug, Default)]
pub(crate) struct TierBlocks {
    by_ext: hashbrown::HashMap<u64, LowerBlock>,
    by_link: hashbrown::HashMap<(Option<u64>, u64), Links>,
}

impl TierBlocks {
    fn len(&self) -> usize {
        self.by_ext.len()
    }

    fn insert(&mut self, ext: u64, block: LowerBlock) {
        if let Some(old) = self.by_ext.insert(ext, block) {
            if old == block {
                return;
            }
            self.unlink(ext, old);
        }
        self.by_link
            .entry((block.parent, block.local))
            .and_modify(|l| l.add(ext))
            .or_insert(Links::One(ext));
    }

    fn unlink(&mut self, ext: u64, block: LowerBlock) {
        let key = (block.parent, block.local);
        if self.by_link.get_mut(&key).is_some_and(|l| l.remove(ext)) {
            self.by_link.remove(&key);
        }
    }

    /// Apply a store: block `i`'s parent is block `i-1` (the event's parent for the first).
    /// Returns whether it was a duplicate (every block already held exactly so).
    fn store(&mut self, data: &KvCacheStoreData) -> Result<bool, KvCacheEventError> {
        let parent = data.parent_hash.map(|p| p.0);
        // A block that is its own ancestor in the event would make a cycle.
        let mut seen: HashSet<u64> = HashSet::with_capacity(data.blocks.len() + 1);
        seen.extend(parent);
        if !data.blocks.iter().all(|b| seen.insert(b.block_hash.0)) {
            return Err(KvCacheEventError::InvalidBlockSequence);
        }
        let mut prev = parent;
        let mut duplicate = !data.blocks.is_empty();
        for b in &data.blocks {
            let block = LowerBlock {
                local: b.tokens_hash.0,
                parent: prev,
            };
            duplicate &= self.by_ext.get(&b.block_hash.0) == Some(&block);
            self.insert(b.block_hash.0, block);
            prev = Some(b.block_hash.0);
        }
        Ok(duplicate)
    }

    /// Remove blocks by external hash. Like the device tier, unknown hashes are skipped and the
    /// first miss is reported after the rest were applied; no cascade to descendants.
    fn remove(&mut self, hashes: &[ExternalSequenceBlockHash]) -> Result<(), KvCacheEventError> {
        let mut first_error = None;
        for h in hashes {
            match self.by_ext.remove(&h.0) {
                Some(old) => self.unlink(h.0, old),
                None => {
                    first_error.get_or_insert(KvCacheEventError::BlockNotFound);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn clear(&mut self) {
        self.by_ext.clear();
        self.by_link.clear();
    }

    /// Continue a walk at `pos` after the block `prev` (`None` only at position 0): follow the
    /// blocks whose parent is the previous match and whose local hash is the next query block.
    /// Returns the new position and the last matched external hash.
    fn walk(&self, seq: &[LocalBlockHash], mut pos: usize, mut prev: Option<u64>) -> Step {
        while let Some(local) = seq.get(pos) {
            let Some(ext) = self.by_link.get(&(prev, local.0)).and_then(Links::first) else {
                break;
            };
            prev = Some(ext);
            pos += 1;
        }
        Step { pos, prev }
    }

    /// Every block, each link's blocks in the order the walk prefers them, so that inserting
    /// them in this order rebuilds the same maps (snapshot round trip).
    fn link_ordered(&self) -> Vec<(u64, LowerBlock)> {
        let mut links: Vec<_> = self.by_link.iter().collect();
        links.sort_unstable_by_key(|(k, _)| **k);
        let mut out = Vec::with_capacity(self.by_ext.len());
        for (_, l) in links {
            let exts: &[u64] = match l {
                Links::One(e) => std::slice::from_ref(e),
                Links::Many(v) => v,
            };
            for e in exts {
                if let Some(b) = self.by_ext.get(e) {
                    out.push((*e, *b));
                }
            }
        }
        out
    }

    /// Blocks as dump entries, parents (within this tier) before children.
    fn ordered(&self) -> Vec<(u64, LowerBlock)> {
        let mut children: hashbrown::HashMap<u64, Vec<u64>> = hashbrown::HashMap::new();
        let mut queue: VecDeque<u64> = VecDeque::new();
        let mut all: Vec<u64> = self.by_ext.keys().copied().collect();
        all.sort_unstable();
        for &ext in &all {
            let b = self.by_ext[&ext];
            match b.parent.filter(|p| self.by_ext.contains_key(p)) {
                Some(p) => children.entry(p).or_default().push(ext),
                None => queue.push_back(ext),
            }
        }
        let mut out = Vec::with_capacity(all.len());
        let mut done: HashSet<u64> = HashSet::with_capacity(all.len());
        while let Some(ext) = queue.pop_front() {
            if !done.insert(ext) {
                continue;
            }
            out.push((ext, self.by_ext[&ext]));
            if let Some(kids) = children.get(&ext) {
                queue.extend(kids.iter().copied());
            }
        }
        // Blocks on a parent cycle (possible across events) have no root: append them.
        for ext in all {
            if done.insert(ext) {
                out.push((ext, self.by_ext[&ext]));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy)]
struct Step {
    pos: usize,
    prev: Option<u64>,
}

/// The lower tiers of one stream. Written by the stream's event thread only.
#[derive(Default)]
pub(crate) struct StreamTiers {
    tiers: [RwLock<TierBlocks>; 3],
    /// Blocks per tier, for metrics and the "anything to walk" check without a lock.
    counts: [AtomicU64; 3],
}

impl StreamTiers {
    fn read(&self, t: usize) -> RwLockReadGuard<'_, TierBlocks> {
        self.tiers[t].read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, t: usize) -> RwLockWriteGuard<'_, TierBlocks> {
        self.tiers[t].write().unwrap_or_else(|e| e.into_inner())
    }

    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// The lower tiers of one namespace.
#[derive(Default)]
pub(crate) struct LowerTiers {
    /// Streams that ever had a lower-tier event (or were restored with lower-tier blocks).
    /// Written when a stream first appears and when it is forgotten; queries copy the list.
    streams: RwLock<HashMap<WorkerWithDpRank, Arc<StreamTiers>>>,
    /// Lower-tier blocks of the whole namespace: 0 lets queries skip the tier walk entirely.
    total: AtomicU64,
}

/// The outcome of one lower-tier event, for the event thread's counters.
pub(crate) struct LowerOutcome {
    pub(crate) duplicate: bool,
}

impl LowerTiers {
    pub(crate) fn get(&self, stream: WorkerWithDpRank) -> Option<Arc<StreamTiers>> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stream)
            .cloned()
    }

    /// The stream's tiers, created on first use.
    pub(crate) fn get_or_create(&self, stream: WorkerWithDpRank) -> Arc<StreamTiers> {
        if let Some(s) = self.get(stream) {
            return s;
        }
        Arc::clone(
            self.streams
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(stream)
                .or_default(),
        )
    }

    /// Refresh the counters of tier `t` of `st` after a write.
    fn recount(&self, st: &StreamTiers, t: usize, now: usize) {
        let old = st.counts[t].swap(now as u64, Ordering::Relaxed);
        let now = now as u64;
        if now >= old {
            self.total.fetch_add(now - old, Ordering::Relaxed);
        } else {
            self.total.fetch_sub(old - now, Ordering::Relaxed);
        }
    }

    /// Apply a store or remove of a lower tier (`Cleared` goes through [`LowerTiers::clear`]).
    pub(crate) fn apply(
        &self,
        st: &StreamTiers,
        tier: StorageTier,
        data: &KvCacheEventData,
    ) -> Result<LowerOutcome, KvCacheEventError> {
        let Some(t) = tier_index(tier) else {
            return Err(KvCacheEventError::IndexerInvariantViolation);
        };
        let mut blocks = st.write(t);
        let result = match data {
            KvCacheEventData::Stored(s) => {
                blocks.store(s).map(|duplicate| LowerOutcome { duplicate })
            }
            KvCacheEventData::Removed(r) => blocks
                .remove(&r.block_hashes)
                .map(|()| LowerOutcome { duplicate: false }),
            KvCacheEventData::Cleared => {
                blocks.clear();
                Ok(LowerOutcome { duplicate: false })
            }
        };
        let n = blocks.len();
        drop(blocks);
        self.recount(st, t, n);
        result
    }

    /// Drop every lower-tier block of a stream (AllBlocksCleared, clear_all_blocks).
    pub(crate) fn clear(&self, st: &StreamTiers) {
        for t in 0..LOWER_TIERS.len() {
            if st.counts[t].load(Ordering::Relaxed) == 0 {
                continue;
            }
            st.write(t).clear();
            self.recount(st, t, 0);
        }
    }

    /// Clear and forget a stream (remove_worker).
    pub(crate) fn forget(&self, stream: WorkerWithDpRank) {
        let removed = self
            .streams
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&stream);
        if let Some(st) = removed {
            self.clear(&st);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.total.load(Ordering::Relaxed) == 0
    }

    /// Lower-tier blocks per (stream, tier), sorted; zero counts omitted.
    pub(crate) fn block_counts(&self) -> Vec<(WorkerWithDpRank, StorageTier, usize)> {
        let streams = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (s, st) in streams.iter() {
            for (t, tier) in LOWER_TIERS.iter().enumerate() {
                let n = st.counts[t].load(Ordering::Relaxed) as usize;
                if n > 0 {
                    out.push((*s, *tier, n));
                }
            }
        }
        out.sort_unstable_by_key(|(s, t, _)| (*s, tier_index(*t)));
        out
    }

    /// Extend the device scores through the lower tiers (SERVICE.md §6.4): the streams whose
    /// lower tiers add to their device match. Returns at once, allocating nothing, when the
    /// namespace holds no lower-tier block; otherwise walks only the streams holding some.
    ///
    /// `device_ext(wanted)` must return, for each `(stream, depth)` (depth ≥ 1), the stream's
    /// external hash of its device block at that depth of `seq`: the parent a continuation must
    /// name.
    pub(crate) fn continue_walk(
        &self,
        seq: &[LocalBlockHash],
        device: &ScoreMap,
        device_ext: impl FnOnce(&[(WorkerWithDpRank, u32)]) -> Vec<Option<u64>>,
    ) -> TierExtensions {
        let mut out = TierExtensions::default();
        if self.is_empty() || seq.is_empty() {
            return out;
        }
        // Held for the walk (no per-stream Arc traffic on the query path); writers take it only
        // when a stream first appears or is forgotten.
        let registry = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let populated: Vec<(WorkerWithDpRank, &StreamTiers)> = registry
            .iter()
            .filter(|(_, st)| st.total() > 0)
            .map(|(s, st)| (*s, &**st))
            .collect();
        walk_streams(seq, device, device_ext, &populated, true, |s, d| {
            out.insert(s, d)
        });
        out
    }

    /// The walk without its shortcuts, in the representation the query path used before
    /// [`TierExtensions`]: every device score copied into a full map, then every stream ever
    /// seen walked on every tier, whatever the block counters say. Only for checking the fast
    /// path against it (tests) and measuring what the fast path saves (benches).
    pub(crate) fn continue_walk_exhaustive(
        &self,
        seq: &[LocalBlockHash],
        device: &ScoreMap,
        device_ext: impl FnOnce(&[(WorkerWithDpRank, u32)]) -> Vec<Option<u64>>,
    ) -> HashMap<WorkerWithDpRank, TierDepths> {
        let mut out: HashMap<WorkerWithDpRank, TierDepths> = device
            .iter()
            .map(|(s, &d)| (*s, TierDepths::device_only(d)))
            .collect();
        let registry = self.streams.read().unwrap_or_else(|e| e.into_inner());
        let every: Vec<(WorkerWithDpRank, &StreamTiers)> =
            registry.iter().map(|(s, st)| (*s, &**st)).collect();
        walk_streams(seq, device, device_ext, &every, false, |s, d| {
            out.insert(s, d);
        });
        out
    }

    /// Dump of the lower tiers: one Stored event per block with its parent, per tier in walk
    /// order, event ids renumbered from 0 in each tier (SERVICE.md §3.8).
    pub(crate) fn dump(&self) -> Vec<RouterEvent> {
        let mut streams: Vec<_> = self
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, st)| (*s, Arc::clone(st)))
            .collect();
        streams.sort_unstable_by_key(|(s, _)| *s);
        let mut out = Vec::new();
        for (t, tier) in LOWER_TIERS.iter().enumerate() {
            let mut event_id = 0u64;
            for (stream, st) in &streams {
                for (ext, b) in st.read(t).ordered() {
                    out.push(RouterEvent {
                        worker_id: stream.worker_id,
                        storage_tier: *tier,
                        residency_domain: Some(ResidencyDomain::Worker),
                        event: KvCacheEvent {
                            event_id,
                            data: KvCacheEventData::Stored(KvCacheStoreData {
                                parent_hash: b.parent.map(ExternalSequenceBlockHash),
                                start_position: None,
                                blocks: vec![KvCacheStoredBlockData {
                                    block_hash: ExternalSequenceBlockHash(ext),
                                    tokens_hash: LocalBlockHash(b.local),
                                    mm_extra_info: None,
                                }],
                            }),
                            dp_rank: stream.dp_rank,
                        },
                    });
                    event_id += 1;
                }
            }
        }
        out
    }

    /// Every lower-tier block, for the engine snapshot; `stream_index` maps a stream to its
    /// index in the snapshot's stream list (adding it when missing).
    pub(crate) fn snapshot(
        &self,
        mut stream_index: impl FnMut(WorkerWithDpRank) -> u32,
    ) -> Vec<SnapshotLowerBlock> {
        let mut streams: Vec<_> = self
            .streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(s, st)| (*s, Arc::clone(st)))
            .collect();
        streams.sort_unstable_by_key(|(s, _)| *s);
        let mut out = Vec::new();
        for (stream, st) in streams {
            if st.total() == 0 {
                continue;
            }
            let idx = stream_index(stream);
            for (t, tier) in LOWER_TIERS.iter().enumerate() {
                for (ext, b) in st.read(t).link_ordered() {
                    out.push(SnapshotLowerBlock {
                        stream: idx,
                        tier: *tier,
                        ext: ExternalSequenceBlockHash(ext),
                        local: LocalBlockHash(b.local),
                        parent: b.parent.map(ExternalSequenceBlockHash),
                    });
                }
            }
        }
        out
    }

    /// Load snapshot blocks into these (empty) tiers.
    pub(crate) fn restore(
        &self,
        streams: &[WorkerWithDpRank],
        blocks: &[SnapshotLowerBlock],
    ) -> Result<(), KvCacheEventError> {
        let mut touched: HashMap<(WorkerWithDpRank, usize), Arc<StreamTiers>> = HashMap::new();
        for b in blocks {
            let stream = *streams
                .get(b.stream as usize)
                .ok_or(KvCacheEventError::IndexerInvariantViolation)?;
            let t = tier_index(b.tier).ok_or(KvCacheEventError::IndexerInvariantViolation)?;
            let st = touched
                .entry((stream, t))
                .or_insert_with(|| self.get_or_create(stream));
            st.write(t).insert(
                b.ext.0,
                LowerBlock {
                    local: b.local.0,
                    parent: b.parent.map(|p| p.0),
                },
            );
        }
        for ((_, t), st) in touched {
            let n = st.read(t).len();
            self.recount(&st, t, n);
        }
        Ok(())
    }
}

/// Continue the device match of each of `streams` through its lower tiers, in walk order, and
/// report `(stream, depths)` for each stream matched on some tier. `skip_empty_tiers` skips the
/// tiers whose block counter is 0 without taking their lock.
fn walk_streams(
    seq: &[LocalBlockHash],
    device: &ScoreMap,
    device_ext: impl FnOnce(&[(WorkerWithDpRank, u32)]) -> Vec<Option<u64>>,
    streams: &[(WorkerWithDpRank, &StreamTiers)],
    skip_empty_tiers: bool,
    mut found: impl FnMut(WorkerWithDpRank, TierDepths),
) {
    // The device scores are a flat list: index them once for the per-stream lookups below.
    let device: StreamMap<u32> = device.iter().map(|(s, &d)| (*s, d)).collect();
    let wanted: Vec<(WorkerWithDpRank, u32)> = streams
        .iter()
        .filter_map(|(s, _)| device.get(s).map(|&d| (*s, d)))
        .filter(|(_, d)| *d > 0)
        .collect();
    let exts = device_ext(&wanted);
    let start_of: StreamMap<Option<u64>> =
        wanted.iter().zip(exts).map(|((s, _), e)| (*s, e)).collect();
    for &(stream, st) in streams {
        let d = device.get(&stream).copied().unwrap_or(0);
        let prev = if d == 0 {
            None
        } else {
            match start_of.get(&stream).copied().flatten() {
                Some(e) => Some(e),
                // The device block vanished between the two reads: no continuation.
                None => continue,
            }
        };
        let mut step = Step {
            pos: d as usize,
            prev,
        };
        let mut host = step.pos;
        for t in 0..LOWER_TIERS.len() {
            if !skip_empty_tiers || st.counts[t].load(Ordering::Relaxed) > 0 {
                step = st.read(t).walk(seq, step.pos, step.prev);
            }
            if t == 0 {
                host = step.pos;
            }
        }
        if step.pos == 0 {
            continue;
        }
        found(
            stream,
            TierDepths {
                device: d,
                host: host as u32,
                disk: step.pos as u32,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(parent: Option<u64>, blocks: &[(u64, u64)]) -> KvCacheStoreData {
        KvCacheStoreData {
            parent_hash: parent.map(ExternalSequenceBlockHash),
            start_position: None,
            blocks: blocks
                .iter()
                .map(|&(e, l)| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(e),
                    tokens_hash: LocalBlockHash(l),
                    mm_extra_info: None,
                })
                .collect(),
        }
    }

    fn seq(l: &[u64]) -> Vec<LocalBlockHash> {
        l.iter().map(|&x| LocalBlockHash(x)).collect()
    }

    #[test]
    fn walk_follows_parents_and_stops_at_a_wrong_parent() {
        let mut t = TierBlocks::default();
        assert_eq!(t.store(&store(Some(21), &[(22, 2), (23, 3)])), Ok(false));
        let s = seq(&[1, 2, 3, 4]);
        assert_eq!(t.walk(&s, 1, Some(21)).pos, 3);
        assert_eq!(t.walk(&s, 1, Some(11)).pos, 1);
        assert_eq!(t.walk(&s, 0, None).pos, 0);
        assert_eq!(t.store(&store(Some(21), &[(22, 2), (23, 3)])), Ok(true));
    }

    #[test]
    fn remove_unlinks_only_that_block_and_restore_revives_children() {
        let mut t = TierBlocks::default();
        t.store(&store(None, &[(11, 1), (12, 2), (13, 3)])).unwrap();
        let s = seq(&[1, 2, 3]);
        assert_eq!(
            t.remove(&[ExternalSequenceBlockHash(12), ExternalSequenceBlockHash(99)]),
            Err(KvCacheEventError::BlockNotFound)
        );
        assert_eq!(t.walk(&s, 0, None).pos, 1);
        assert_eq!(t.len(), 2);
        t.store(&store(Some(11), &[(12, 2)])).unwrap();
        assert_eq!(t.walk(&s, 0, None).pos, 3);
    }

    #[test]
    fn shared_links_survive_removal_of_one_block() {
        let mut t = TierBlocks::default();
        t.store(&store(None, &[(11, 1)])).unwrap();
        t.store(&store(None, &[(31, 1)])).unwrap();
        t.remove(&[ExternalSequenceBlockHash(11)]).unwrap();
        let step = t.walk(&seq(&[1]), 0, None);
        assert_eq!((step.pos, step.prev), (1, Some(31)));
    }

    #[test]
    fn self_reference_and_repeated_hashes_are_invalid() {
        let mut t = TierBlocks::default();
        assert_eq!(
            t.store(&store(Some(5), &[(5, 1)])),
            Err(KvCacheEventError::InvalidBlockSequence)
        );
        assert_eq!(
            t.store(&store(None, &[(5, 1), (5, 2)])),
            Err(KvCacheEventError::InvalidBlockSequence)
        );
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn restoring_a_hash_moves_it_to_its_new_link() {
        let mut t = TierBlocks::default();
        t.store(&store(None, &[(11, 1)])).unwrap();
        t.store(&store(Some(7), &[(11, 2)])).unwrap();
        assert_eq!(t.walk(&seq(&[1]), 0, None).pos, 0);
        assert_eq!(t.walk(&seq(&[9, 2]), 1, Some(7)).pos, 2);
        assert_eq!(t.by_link.len(), 1);
    }

    #[test]
    fn ordered_puts_parents_first_and_keeps_cycles() {
        let mut t = TierBlocks::default();
        t.store(&store(Some(12), &[(13, 3)])).unwrap();
        t.store(&store(None, &[(11, 1), (12, 2)])).unwrap();
        t.store(&store(Some(41), &[(40, 4)])).unwrap();
        t.store(&store(Some(40), &[(41, 5)])).unwrap();
        let order: Vec<u64> = t.ordered().into_iter().map(|(e, _)| e).collect();
        assert_eq!(order, vec![11, 12, 13, 40, 41]);
    }
}
