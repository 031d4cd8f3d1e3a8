//! One namespace's radix tree of blocks: lock-free reads, per-node locks for writers.
//!
//! Shape: a node is a **run** of consecutive blocks that the same workers hold (every member of
//! a node holds every block of its run), keyed under its parent by the local hash of its first
//! block. Blocks live in three parallel arrays indexed by a `u32` block id (local hash, external
//! hash, owning node); a run is a range of consecutive block ids, so a query compares a run
//! against the request with sequential loads. Node `0` is the root (an empty run).
//!
//! Concurrency protocol (see `docs/architecture.md`):
//! * **Readers** pin an epoch and load, per node, `members` then `extent` then `children`, all
//!   Acquire. They never lock, never write, and never see a freed node, block or set: every
//!   unlink retires the memory through crossbeam-epoch; node and block ids are recycled only
//!   after the grace period.
//! * **Writers** are the event threads. A stream (worker, dp_rank) is owned by one thread, so only
//!   that thread adds or removes the stream's slot. A node's words are replaced only under the
//!   node's lock bit. Locks are taken parent before child, never the other way.
//! * **Split** (a run whose blocks stop being held uniformly): under the node's lock, the tail
//!   becomes a new node that takes over the members (a copy) and the children; then the node's
//!   children word becomes the tail, then its extent shrinks (Release each). A reader that saw
//!   the old extent and the new children finds the tail at the wrong depth and stops there (each
//!   node records the depth of its first block): it may under-report, never over-report.
//!   Membership only grows on a node after its extent shrank, and readers load members before
//!   the extent, so a reader never credits a new member with blocks the node no longer has.
//! * A node is unlinked only while its parent and itself are locked, and only if nobody holds it
//!   and it has no children: a writer that found the node under the parent's lock and locked it
//!   before releasing the parent can therefore never add a block to an unlinked node (the race
//!   that loses blocks in Dynamo 1.6.1's thread pool).
//! * **External hashes** resolve through one shared map `ext -> block` per namespace (writers
//!   only, sharded mutexes): engines use the same sequence hash for the same prefix, so one entry
//!   serves every worker. A worker whose hash differs from the block's first hash keeps a private
//!   exception in its stream state (INDEXER.md §0.1). Block ids never change on a split, so
//!   neither the map nor the exceptions move.

use crate::children;
use crate::error::KvCacheEventError;
use crate::ext_map::ExtTable;
use crate::members::{self, Members};
use crate::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, OverlapScores, ResidencyDomain, RouterEvent, ScoreMap,
    StorageTier, WorkerWithDpRank,
};
use crate::ranges::FreeRanges;
use crate::segmented::SegmentedVec;
use crate::slots::Slots;
use crate::snapshot::{IndexSnapshot, SnapshotHolder, SnapshotNode};
use crate::spin::{SpinGuard, SpinLock};
use crate::sync::{spin_wait, AtomicU32, AtomicU64, Mutex, Ordering};
use crossbeam_epoch::{self as epoch, Guard};
use crossbeam_utils::CachePadded;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

pub(crate) const ROOT: u32 = 0;
const LOCKED: u32 = 1;
const LIVE: u32 = 2;
/// In a block's owner word: the block is the entry of its `ext` in the shared map.
const OWNS_EXT: u32 = 1 << 31;
const NODE_MASK: u32 = !OWNS_EXT;
#[cfg(not(loom))]
const EXT_SHARDS: usize = 64;
/// loom models hold a few blocks: two shards still exercise the sharding.
#[cfg(loom)]
const EXT_SHARDS: usize = 2;
/// Fresh block ids taken from the arena at a time by one stream.
#[cfg(not(loom))]
const BLOCK_BATCH: u32 = 256;
#[cfg(loom)]
const BLOCK_BATCH: u32 = 1;
/// An external hash and the block it names, as the map's batches carry them.
type ExtBlock = (u64, u32);

/// How far ahead of its probe an ext-map bucket is prefetched: enough to cover a miss, few
/// enough to stay within the core's outstanding-miss buffers (24 measured no better).
const PREFETCH_AHEAD: usize = 10;
/// A free range shorter than this is not worth starting a run in (it would cut the run).
#[cfg(not(loom))]
const MIN_REUSED_RANGE: u32 = 16;
#[cfg(loom)]
const MIN_REUSED_RANGE: u32 = 1;

/// One run of blocks. All fields are atomics so that a recycled slot can be re-initialised
/// through a shared reference; `parent` and `depth` are written only under locks that order
/// them before any reader can reach the node.
#[derive(Default)]
pub(crate) struct Node {
    /// `first block id | len << 32`. The first id never changes while the node is live; the
    /// length only shrinks.
    extent: AtomicU64,
    members: AtomicU64,
    children: AtomicU64,
    parent: AtomicU32,
    state: AtomicU32,
    /// Position of the first block along the path from the root (root's children: 0).
    depth: AtomicU32,
    _pad: AtomicU32,
    /// The local hash of the first block: the node's key under its parent, kept here so that
    /// a child lookup reads the child's node only, not also its first block (one cache miss
    /// per node of a query instead of two). Written before the node is linked; fixed while
    /// the node is live, since its first block never changes.
    first: AtomicU64,
}

// SAFETY: Node is atomics only; all-zero is a valid (free, unlinked, empty) node.
unsafe impl crate::segmented::Zeroable for Node {}

#[inline]
fn extent_word(start: u32, len: u32) -> u64 {
    start as u64 | (len as u64) << 32
}

#[inline]
fn extent_parts(word: u64) -> (u32, u32) {
    (word as u32, (word >> 32) as u32)
}

#[inline]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// The per-stream state owned by the stream's event thread.
pub(crate) struct StreamState {
    pub(crate) slot: u32,
    pub(crate) blocks: u64,
    /// Private external hashes (those that differ from the block's shared one).
    exc_by_ext: hashbrown::HashMap<u64, u32>,
    exc_by_block: hashbrown::HashMap<u32, u64>,
    /// Nodes unlinked by the current event, freed together after the grace period.
    unlinked: Vec<u32>,
    /// Block id ranges freed by the current event, recycled after the grace period.
    freed: Vec<(u32, u32)>,
    /// Free node indices reserved for this stream's next allocations.
    node_cache: Vec<u32>,
    /// Consecutive free block ids `[next, end)` reserved for this stream's next runs.
    block_cache: (u32, u32),
    /// Shared-map entries of blocks that died in the current event, dropped together when the
    /// event ends (one batch, so one lock per map shard per event).
    dead_entries: Vec<ExtBlock>,
}

impl StreamState {
    pub(crate) fn new(slot: u32) -> Self {
        Self {
            slot,
            blocks: 0,
            exc_by_ext: hashbrown::HashMap::new(),
            exc_by_block: hashbrown::HashMap::new(),
            unlinked: Vec::new(),
            freed: Vec::new(),
            node_cache: Vec::new(),
            block_cache: (0, 0),
            dead_entries: Vec::new(),
        }
    }
}

/// What a successful store did, for the duplicate_store warning.
pub(crate) struct StoreOutcome {
    pub(crate) duplicate: bool,
}

/// Bytes used by the index, for memory reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Node arena and the block arrays (allocated chunks, live or free).
    pub node_bytes: usize,
    /// Heap member sets, child tables and the external-hash map.
    pub heap_bytes: usize,
    /// Live blocks (distinct cached blocks), excluding the root.
    pub live_nodes: usize,
    /// Live runs (tree nodes) holding those blocks.
    pub live_runs: usize,
    /// Of `heap_bytes`: member sets.
    pub member_bytes: usize,
    /// Of `heap_bytes`: child tables.
    pub child_bytes: usize,
    /// Of `heap_bytes`: the external-hash map.
    pub map_bytes: usize,
    /// Block ids handed out so far (live, free or reserved by a stream): the block arrays'
    /// touched length, 20 bytes each.
    pub block_ids: usize,
}

/// Where one map shard's buckets live, for prefetching without its lock: `ExtTable::location`
/// as of its last growth (address, bucket count); 0 while empty. Kept apart from the shard's
/// mutex, and rewritten only when the table moved, so that reading it costs no cache-line
/// transfer between the event threads.
#[derive(Default)]
struct ExtHint {
    at: AtomicU64,
    cap: AtomicU64,
}

/// Bytes of the map's shard tables when sized for `expected` blocks up front.
pub(crate) fn map_bytes_for(expected: usize) -> usize {
    EXT_SHARDS * ExtTable::bytes_for(expected.div_ceil(EXT_SHARDS))
}

/// The tree of one namespace.
pub(crate) struct Tree {
    nodes: SegmentedVec<Node>,
    /// Per block id: local hash (read by queries), shared external hash and owner node (writers).
    locals: SegmentedVec<AtomicU64>,
    exts: SegmentedVec<AtomicU64>,
    owner: SegmentedVec<AtomicU32>,
    free_nodes: Mutex<Vec<u32>>,
    free_blocks: Mutex<FreeRanges>,
    ext_map: Box<[CachePadded<SpinLock<ExtTable>>]>,
    ext_hints: Box<[ExtHint]>,
    pub(crate) slots: Slots,
    /// Mirror of every stream's exceptions, read by dumps: (slot, block) -> ext.
    exceptions: Mutex<HashMap<(u32, u32), u64>>,
}

impl Tree {
    /// A tree whose shared map is sized for `expected` blocks up front
    /// (`EngineConfig::expected_blocks`).
    pub(crate) fn with_expected_blocks(expected: usize) -> Arc<Tree> {
        let per_shard = expected.div_ceil(EXT_SHARDS);
        let t = Tree {
            nodes: SegmentedVec::new(),
            locals: SegmentedVec::new(),
            exts: SegmentedVec::new(),
            owner: SegmentedVec::new(),
            free_nodes: Mutex::new(Vec::new()),
            free_blocks: Mutex::new(FreeRanges::default()),
            ext_map: (0..EXT_SHARDS)
                .map(|_| CachePadded::new(SpinLock::new(ExtTable::with_capacity(per_shard))))
                .collect(),
            ext_hints: (0..EXT_SHARDS).map(|_| ExtHint::default()).collect(),
            slots: Slots::new(),
            exceptions: Mutex::new(HashMap::new()),
        };
        let root = t.nodes.push_index();
        debug_assert_eq!(root, Some(ROOT));
        // Block id 0 is never part of a run: it stands for the root in the loom probes.
        let b0 = t.locals.push_index();
        debug_assert_eq!(b0, Some(0));
        t.exts.ensure(0);
        t.owner.ensure(0);
        t.nodes.get(ROOT).state.store(LIVE, Ordering::Release);
        Arc::new(t)
    }

    /// Size the shared map for `expected` blocks, as [`Tree::with_expected_blocks`] does,
    /// unless it is that large already (see [`ExtTable::reserve`]). Each shard is re-placed
    /// under its lock: the events touching that shard wait meanwhile.
    pub(crate) fn presize_map(&self, expected: usize) {
        let per_shard = expected.div_ceil(EXT_SHARDS);
        for (shard, map) in self.ext_map.iter().enumerate() {
            let mut table = map.lock();
            table.reserve(per_shard);
            let (at, cap) = table.location();
            // Relaxed: a prefetch hint only (see `ext_group`).
            self.ext_hints[shard].at.store(at as u64, Ordering::Relaxed);
            self.ext_hints[shard]
                .cap
                .store(cap as u64, Ordering::Relaxed);
        }
    }

    #[inline]
    fn node(&self, i: u32) -> &Node {
        self.nodes.get(i)
    }

    #[inline]
    fn extent(&self, i: u32) -> (u32, u32) {
        extent_parts(self.node(i).extent.load(Ordering::Acquire))
    }

    /// Block `b`'s shared external hash (writer-side data).
    #[inline]
    fn ext_of(&self, b: u32) -> u64 {
        self.exts.get(b).load(Ordering::Relaxed)
    }

    #[inline]
    fn local_of(&self, b: u32) -> u64 {
        // Relaxed: `b` was reached through an Acquire load of a word published (Release) after
        // the block was initialised.
        self.locals.get(b).load(Ordering::Relaxed)
    }

    /// The key of node `i` under its parent: its first block's local hash.
    #[inline]
    fn first_local(&self, i: u32) -> u64 {
        // Relaxed: `i` was reached through an Acquire load of a link published (Release) after
        // the node was initialised, or under a lock that orders it.
        self.node(i).first.load(Ordering::Relaxed)
    }

    #[inline]
    fn owner_of(&self, b: u32) -> u32 {
        // Acquire: pairs with the Release of a split's owner update, so the node read next (a
        // tail a split just allocated, possibly in an arena chunk this thread has not seen
        // published) is visible: callers read owners before locking anything (`lock_owner`,
        // `holds`), and an owner seen before its node's chunk is a null chunk (loom model
        // `a_store_joining_the_head_of_a_run_being_left_leaves_no_unheld_tail`).
        self.owner.get(b).load(Ordering::Acquire) & NODE_MASK
    }

    #[inline]
    fn owns_ext(&self, b: u32) -> bool {
        self.owner.get(b).load(Ordering::Relaxed) & OWNS_EXT != 0
    }

    fn lock(&self, i: u32) {
        let state = &self.node(i).state;
        let mut spins = 0;
        loop {
            let s = state.load(Ordering::Relaxed);
            // Acquire: everything the previous holder wrote before unlocking (Release) is visible.
            if s & LOCKED == 0
                && state
                    .compare_exchange_weak(s, s | LOCKED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            spin_wait(&mut spins);
        }
    }

    fn unlock(&self, i: u32) {
        // Release: publishes this holder's writes to the next holder.
        self.node(i).state.fetch_and(!LOCKED, Ordering::Release);
    }

    /// Lock the node that holds block `b` now. `b` must be held by the calling stream (so it
    /// cannot die); splits by other streams may move it to a new node, hence the retry: a
    /// splitter rewrites owners before it unlocks, so after locking a stale owner the fresh
    /// owner is visible.
    fn lock_owner(&self, b: u32) -> Result<u32, KvCacheEventError> {
        for _ in 0..1_000_000 {
            let n = self.owner_of(b);
            self.lock(n);
            let (start, len) = self.extent(n);
            if self.node(n).state.load(Ordering::Relaxed) & LIVE != 0
                && n != ROOT
                && b >= start
                && b < start + len
            {
                return Ok(n);
            }
            self.unlock(n);
        }
        Err(KvCacheEventError::IndexerInvariantViolation)
    }

    #[inline]
    fn shard_of(ext: u64) -> usize {
        // Low half: the table's tag (and home slot) is the high half of the same mix.
        (mix(ext) as u32 >> 8) as usize % EXT_SHARDS
    }

    fn ext_shard(&self, shard: usize) -> SpinGuard<'_, ExtTable> {
        self.ext_map[shard].lock()
    }

    fn ext_lookup(&self, ext: u64) -> Option<u32> {
        self.ext_shard(Self::shard_of(ext))
            .find(mix(ext), |b| self.ext_of(b) == ext)
    }

    /// Run `op` on every `(ext, block)` of `batch` under its shard's lock, one lock per shard,
    /// taking the shards that are free first (see below). Buckets are prefetched
    /// `PREFETCH_AHEAD` operations ahead, so the batch's cache misses overlap instead of
    /// queueing behind each other. `rotate` spreads the starting shard so that two event
    /// threads do not walk the shards in step.
    fn ext_batch(
        &self,
        batch: &mut [ExtBlock],
        rotate: u32,
        mut op: impl FnMut(&mut ExtTable, u64, u32),
    ) {
        if batch.len() > 1 {
            // Counting sort by shard, starting at `rotate`.
            let key = |ext: u64| (Self::shard_of(ext) + rotate as usize) % EXT_SHARDS;
            let mut starts = [0usize; EXT_SHARDS + 1];
            for &(ext, _) in batch.iter() {
                starts[key(ext) + 1] += 1;
            }
            for k in 0..EXT_SHARDS {
                starts[k + 1] += starts[k];
            }
            let mut sorted = vec![(0u64, 0u32); batch.len()];
            for &(ext, b) in batch.iter() {
                let k = key(ext);
                sorted[starts[k]] = (ext, b);
                starts[k] += 1;
            }
            batch.copy_from_slice(&sorted);
        }
        for &(ext, _) in batch.iter().take(PREFETCH_AHEAD) {
            self.prefetch_home(ext);
        }
        // First pass: every shard group whose lock is free now. A held shard is skipped
        // instead of waited for: its holder may be growing the table (a long critical
        // section) or be preempted, and the other groups are useful work meanwhile. Second
        // pass: the skipped groups, waiting. Groups are whole shards, so the operations on
        // any one table keep their order.
        let mut skipped: Vec<Range<usize>> = Vec::new();
        let mut i = 0;
        while i < batch.len() {
            let shard = Self::shard_of(batch[i].0);
            let mut end = i + 1;
            while end < batch.len() && Self::shard_of(batch[end].0) == shard {
                end += 1;
            }
            match self.ext_map[shard].try_lock() {
                Some(mut table) => self.ext_group(&mut table, shard, batch, i..end, &mut op),
                None => skipped.push(i..end),
            }
            i = end;
        }
        for group in skipped {
            let shard = Self::shard_of(batch[group.start].0);
            for &(ext, _) in batch[group.clone()].iter().take(PREFETCH_AHEAD) {
                self.prefetch_home(ext);
            }
            let mut table = self.ext_shard(shard);
            self.ext_group(&mut table, shard, batch, group, &mut op);
        }
    }

    /// Hint the CPU to fetch the home bucket of `ext` and the one after it (see
    /// `ext_map::prefetch`).
    #[inline]
    fn prefetch_home(&self, ext: u64) {
        let hint = &self.ext_hints[Self::shard_of(ext)];
        // Relaxed: a hint only (see `ext_map::prefetch`).
        let at = hint.at.load(Ordering::Relaxed) as usize;
        let cap = hint.cap.load(Ordering::Relaxed) as usize;
        crate::ext_map::prefetch((at, cap), mix(ext));
    }

    /// Run `op` on `batch[group]`, all of shard `shard`, whose table the caller has locked,
    /// prefetching `PREFETCH_AHEAD` operations ahead; then refresh the shard's prefetch hint.
    #[inline]
    fn ext_group(
        &self,
        table: &mut ExtTable,
        shard: usize,
        batch: &[ExtBlock],
        group: Range<usize>,
        op: &mut impl FnMut(&mut ExtTable, u64, u32),
    ) {
        for k in group {
            if let Some(&(ahead, _)) = batch.get(k + PREFETCH_AHEAD) {
                self.prefetch_home(ahead);
            }
            let (ext, b) = batch[k];
            op(table, ext, b);
        }
        let (at, cap) = table.location();
        let hint = &self.ext_hints[shard];
        if hint.at.load(Ordering::Relaxed) != at as u64 {
            hint.at.store(at as u64, Ordering::Relaxed);
            hint.cap.store(cap as u64, Ordering::Relaxed);
        }
    }

    /// Queue the shared-map entries of the dead blocks `start..start + len` (those that own
    /// one) for the end of the event. Until then a lookup may still find such a block: `holds`
    /// rejects it (it is outside its node's extent, or its node holds nobody).
    fn ext_release_range(&self, st: &mut StreamState, start: u32, len: u32) {
        st.dead_entries.extend(
            (start..start + len)
                .filter(|&b| self.owns_ext(b))
                .map(|b| (self.ext_of(b), b)),
        );
    }

    /// Allocate a node, LIVE and LOCKED, not yet linked.
    #[allow(clippy::too_many_arguments)]
    fn alloc_node(
        &self,
        cache: &mut Vec<u32>,
        first: u64,
        start: u32,
        len: u32,
        parent: u32,
        depth: u32,
        members_word: u64,
        children_word: u64,
    ) -> Result<u32, KvCacheEventError> {
        if cache.is_empty() {
            self.refill_nodes(cache);
        }
        let i = cache.pop().ok_or(KvCacheEventError::CapacityExhausted)?;
        let n = self.node(i);
        // Relaxed: nobody can reach `i` until it is linked with a Release store.
        n.extent.store(extent_word(start, len), Ordering::Relaxed);
        n.first.store(first, Ordering::Relaxed);
        n.members.store(members_word, Ordering::Relaxed);
        n.children.store(children_word, Ordering::Relaxed);
        n.parent.store(parent, Ordering::Relaxed);
        n.depth.store(depth, Ordering::Relaxed);
        n.state.store(LIVE | LOCKED, Ordering::Release);
        Ok(i)
    }

    /// Take a batch of node indices for one stream's allocations: recycled ones first, else a
    /// fresh range (the shared free list stays off the per-node path).
    fn refill_nodes(&self, cache: &mut Vec<u32>) {
        #[cfg(not(loom))]
        const BATCH: usize = 64;
        // One index at a time under loom, so that a model's second allocation can already
        // take a recycled node.
        #[cfg(loom)]
        const BATCH: usize = 1;
        {
            let mut free = self.free_nodes.lock().unwrap_or_else(|e| e.into_inner());
            let take = free.len().min(BATCH);
            let at = free.len() - take;
            cache.extend(free.drain(at..));
        }
        if cache.is_empty() {
            if let Some(first) = self.nodes.push_indices(BATCH as u32) {
                cache.extend((first..first + BATCH as u32).rev());
            }
        }
    }

    /// Up to `want` consecutive fresh block ids for `st` (at least one, or an error).
    fn take_blocks(
        &self,
        st: &mut StreamState,
        want: u32,
    ) -> Result<(u32, u32), KvCacheEventError> {
        let (next, end) = st.block_cache;
        if next == end {
            let reused = {
                let mut free = self.free_blocks.lock().unwrap_or_else(|e| e.into_inner());
                if free.longest() >= want.min(MIN_REUSED_RANGE) {
                    free.take(want.max(BATCH_HINT))
                } else {
                    None
                }
            };
            st.block_cache = match reused {
                Some((s, l)) => (s, s + l),
                None => {
                    let n = want.max(BLOCK_BATCH);
                    let first = self
                        .locals
                        .push_indices(n)
                        .ok_or(KvCacheEventError::CapacityExhausted)?;
                    self.exts.ensure(first + n - 1);
                    self.owner.ensure(first + n - 1);
                    (first, first + n)
                }
            };
        }
        let (next, end) = st.block_cache;
        let got = (end - next).min(want);
        st.block_cache.0 += got;
        Ok((next, got))
    }

    /// Give a stream's unused cached node and block ids back (the stream is going away).
    pub(crate) fn return_cache(&self, st: &mut StreamState) {
        if !st.node_cache.is_empty() {
            self.free_nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut st.node_cache);
        }
        let (next, end) = std::mem::take(&mut st.block_cache);
        if next < end {
            self.free_blocks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(next, end - next);
        }
    }

    /// Return the nodes and blocks freed by the stream's last event to the free lists after the
    /// epoch grace period. One deferred closure per event, not per node: crossbeam collects a
    /// bounded number of deferred functions per pin.
    pub(crate) fn release_unlinked(self: &Arc<Self>, st: &mut StreamState, guard: &Guard) {
        // The map entries first: the ids must not be reused while an entry still names them.
        if !st.dead_entries.is_empty() {
            // Taken, not cleared: 256 streams each keeping their largest event's buffer would
            // hold megabytes for nothing.
            let mut dead = std::mem::take(&mut st.dead_entries);
            self.ext_batch(&mut dead, st.slot, |t, ext, b| {
                t.remove(mix(ext), b);
            });
        }
        if st.unlinked.is_empty() && st.freed.is_empty() {
            return;
        }
        let nodes = std::mem::take(&mut st.unlinked);
        let blocks = std::mem::take(&mut st.freed);
        let tree = Arc::clone(self);
        let free = move || {
            tree.free_nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(nodes);
            let mut fb = tree.free_blocks.lock().unwrap_or_else(|e| e.into_inner());
            for (s, l) in blocks {
                fb.insert(s, l);
            }
        };
        #[cfg(loom)]
        if crate::sync::loom_support::eager_reclamation() {
            // Planted bug (loom-tests/tests/reclaim.rs): no grace period.
            free();
            return;
        }
        guard.defer(free);
        // Hand the bag to the global queue now so that other threads can collect it.
        guard.flush();
    }

    /// Whether `ext` is block `b`'s shared hash.
    fn canonical_for(&self, b: u32, ext: u64) -> bool {
        self.ext_of(b) == ext && self.owns_ext(b)
    }

    fn set_exception(&self, st: &mut StreamState, b: u32, ext: u64) {
        if let Some(old_block) = st.exc_by_ext.insert(ext, b) {
            if old_block != b {
                st.exc_by_block.remove(&old_block);
            }
        }
        if let Some(old_ext) = st.exc_by_block.insert(b, ext) {
            if old_ext != ext {
                st.exc_by_ext.remove(&old_ext);
            }
        }
        self.exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((st.slot, b), ext);
    }

    fn clear_exception(&self, st: &mut StreamState, b: u32) {
        if st.exc_by_block.is_empty() {
            return;
        }
        if let Some(ext) = st.exc_by_block.remove(&b) {
            if st.exc_by_ext.get(&ext) == Some(&b) {
                st.exc_by_ext.remove(&ext);
            }
            self.exceptions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(st.slot, b));
        }
    }

    /// Whether `st`, which holds block `b`, names it `ext` (what `resolve(ext)` would return).
    fn names(&self, st: &StreamState, b: u32, ext: u64) -> bool {
        if !st.exc_by_ext.is_empty() {
            if let Some(&x) = st.exc_by_ext.get(&ext) {
                return x == b;
            }
            if st.exc_by_block.contains_key(&b) {
                return false;
            }
        }
        self.canonical_for(b, ext)
    }

    /// The hash under which `st` holds block `b`.
    fn held_ext(&self, st: &StreamState, b: u32) -> u64 {
        st.exc_by_block
            .get(&b)
            .copied()
            .unwrap_or_else(|| self.ext_of(b))
    }

    /// Another block `st` holds under `ext`, about to be named by `b` instead.
    fn held_elsewhere(&self, st: &StreamState, b: u32, ext: u64, guard: &Guard) -> Option<u32> {
        if self.canonical_for(b, ext) {
            if st.exc_by_ext.is_empty() {
                return None;
            }
            return st.exc_by_ext.get(&ext).copied().filter(|&o| o != b);
        }
        self.resolve(st, ext, guard).filter(|&o| o != b)
    }

    /// Whether the stream holds block `b` (lock-free; exact for the owning thread, since only
    /// it adds or removes its slot and splits copy membership).
    fn holds(&self, slot: u32, b: u32, guard: &Guard) -> bool {
        let mut n = self.owner_of(b);
        loop {
            if n == ROOT {
                return false;
            }
            let node = self.node(n);
            let m = node.members.load(Ordering::Acquire);
            let (start, len) = extent_parts(node.extent.load(Ordering::Acquire));
            if b >= start && b < start + len {
                return Members::from_word(m, guard).contains(slot);
            }
            // Outside its owner's extent: either a split moved it (the splitter rewrote the
            // owner before the Release store of the shorter extent just read, so the re-read
            // sees the new owner) or it was cut off and is dead (its map entry not yet dropped).
            let again = self.owner_of(b);
            if again == n {
                return false;
            }
            n = again;
        }
    }

    /// The block `st` holds under external hash `ext`, if any.
    fn resolve(&self, st: &StreamState, ext: u64, guard: &Guard) -> Option<u32> {
        if !st.exc_by_ext.is_empty() {
            if let Some(&b) = st.exc_by_ext.get(&ext) {
                return Some(b);
            }
        }
        let b = self.ext_lookup(ext)?;
        (self.holds(st.slot, b, guard)
            && (st.exc_by_block.is_empty() || !st.exc_by_block.contains_key(&b))
            && self.ext_of(b) == ext)
            .then_some(b)
    }

    /// Split locked node `n` at `k` (`0 < k < len`): blocks `k..` move to a new node, returned
    /// LOCKED, which takes a copy of the members and all the children.
    fn split(
        &self,
        st: &mut StreamState,
        n: u32,
        k: u32,
        guard: &Guard,
    ) -> Result<u32, KvCacheEventError> {
        let node = self.node(n);
        let (start, len) = extent_parts(node.extent.load(Ordering::Relaxed));
        if k == 0 || k >= len {
            return Err(KvCacheEventError::IndexerInvariantViolation);
        }
        let mw = node.members.load(Ordering::Relaxed);
        let copy = members::encode(&Members::from_word(mw, guard).to_vec());
        let cw = node.children.load(Ordering::Relaxed);
        let depth = node.depth.load(Ordering::Relaxed) + k;
        let t = match self.alloc_node(
            &mut st.node_cache,
            self.local_of(start + k),
            start + k,
            len - k,
            n,
            depth,
            copy,
            cw,
        ) {
            Ok(t) => t,
            Err(e) => {
                members::free_now(copy);
                return Err(e);
            }
        };
        for b in start + k..start + len {
            // Keep the OWNS_EXT bit, which the run's creator may be setting right now without
            // this node's lock (see `claim_exts`): a read-modify-write, not a store.
            // Release: another writer may read this owner before locking anything (`owner_of`)
            // and must then see node `t` and the arena chunk holding it.
            let _ = self
                .owner
                .get(b)
                .fetch_update(Ordering::Release, Ordering::Relaxed, |o| {
                    Some(t | (o & OWNS_EXT))
                });
        }
        children::for_each_child(cw, guard, |c| {
            self.node(c).parent.store(t, Ordering::Relaxed)
        });
        // Release (children, then extent): a reader that sees the short extent also sees the
        // tail as the only child; one that sees the old extent and the new child rejects the
        // child by its depth.
        node.children
            .store(t as u64 + 1, crate::sync::publish_link());
        node.extent.store(extent_word(start, k), Ordering::Release);
        Ok(t)
    }

    /// Replace locked node `n`'s members word by `change(old)` (when it returns a new word) and
    /// retire the old one. Release: pairs with readers' Acquire; for a joiner, the node's shorter
    /// extent (if a split just made it) was stored before and is visible first.
    fn change_members(
        &self,
        n: u32,
        guard: &Guard,
        change: impl FnOnce(u64, &Guard) -> Option<u64>,
    ) -> bool {
        let node = self.node(n);
        let mw = node.members.load(Ordering::Relaxed);
        match change(mw, guard) {
            Some(nw) => {
                node.members.store(nw, Ordering::Release);
                members::retire(mw, guard);
                true
            }
            None => false,
        }
    }

    fn add_member(&self, n: u32, slot: u32, guard: &Guard) -> bool {
        self.change_members(n, guard, |w, g| members::with_added(w, slot, g))
    }

    fn remove_member(&self, n: u32, slot: u32, guard: &Guard) -> bool {
        self.change_members(n, guard, |w, g| members::with_removed(w, slot, g))
    }

    /// Write a fresh block (not yet reachable); its map claim comes after, in a batch.
    #[inline]
    fn init_block(&self, b: u32, local: u64, ext: u64, node: u32) {
        self.locals.get(b).store(local, Ordering::Relaxed);
        self.exts.get(b).store(ext, Ordering::Relaxed);
        self.owner.get(b).store(node, Ordering::Relaxed);
    }

    /// Claim the shared-map entry of each fresh block whose hash no live block owns yet.
    fn claim_exts(&self, fresh: &mut [ExtBlock], rotate: u32) {
        self.ext_batch(fresh, rotate, |t, ext, b| {
            if t.claim(mix(ext), b, |m| self.ext_of(m) == ext) {
                // An atomic OR: a concurrent split may be rewriting the owner (see `split`).
                self.owner.get(b).fetch_or(OWNS_EXT, Ordering::Relaxed);
            }
        });
    }

    /// Build fresh nodes for `blocks` (one per contiguous id range), held by `st` only, as a
    /// chain under locked `parent` whose run ends at `depth`. Returns the chain's nodes, still
    /// LOCKED, the first of them already linked into `parent`, and the fresh `(ext, block)`
    /// pairs, whose map claims the caller makes once every lock is released (`claim_exts`): a
    /// batch of map operations is tens of microseconds of cache misses, too long to hold the
    /// parent (often the root, or a run every request shares) while the other event threads
    /// wait for it. Until then another stream that joins the run sees the blocks as not owning
    /// their hash and records a private exception with the same hash: correct, only wasteful.
    fn grow(
        &self,
        st: &mut StreamState,
        parent: u32,
        mut depth: u32,
        blocks: &[KvCacheStoredBlockData],
        guard: &Guard,
    ) -> Result<(Vec<u32>, Vec<ExtBlock>), KvCacheEventError> {
        let mut made: Vec<u32> = Vec::new();
        let mut fresh: Vec<ExtBlock> = Vec::with_capacity(blocks.len());
        let mut k = 0usize;
        while k < blocks.len() {
            let want = (blocks.len() - k).min(u32::MAX as usize) as u32;
            let (start, got) = self.take_blocks(st, want)?;
            let above = made.last().copied().unwrap_or(parent);
            let n = match self.alloc_node(
                &mut st.node_cache,
                blocks[k].tokens_hash.0,
                start,
                got,
                above,
                depth,
                members::encode(&[st.slot]),
                0,
            ) {
                Ok(n) => n,
                Err(e) => {
                    st.freed.push((start, got));
                    return Err(e);
                }
            };
            for q in 0..got {
                let blk = &blocks[k + q as usize];
                self.init_block(start + q, blk.tokens_hash.0, blk.block_hash.0, n);
                fresh.push((blk.block_hash.0, start + q));
            }
            if let Some(&prev) = made.last() {
                // Relaxed: `prev` is not reachable yet; the head's Release link publishes all.
                self.node(prev)
                    .children
                    .store(n as u64 + 1, Ordering::Relaxed);
            }
            made.push(n);
            depth += got;
            k += got as usize;
        }
        if let Some(&head) = made.first() {
            let p = self.node(parent);
            let pw = p.children.load(Ordering::Relaxed);
            let key = blocks[0].tokens_hash.0;
            if let Some(nw) = children::insert_child(pw, key, head, &|i| self.first_local(i), guard)
            {
                // Release: the chain's initialisation is visible to readers that see it.
                p.children.store(nw, crate::sync::publish_link());
            }
        }
        Ok((made, fresh))
    }

    /// Apply a `stored` event of the stream `st`.
    pub(crate) fn store(
        self: &Arc<Self>,
        st: &mut StreamState,
        data: &KvCacheStoreData,
        guard: &Guard,
    ) -> Result<StoreOutcome, KvCacheEventError> {
        let parent_ext = data.parent_hash.map(|h| h.0);
        if let Some(p) = parent_ext {
            if data.blocks.iter().any(|b| b.block_hash.0 == p) {
                tracing::warn!(
                    worker_slot = st.slot,
                    "Detected self-referencing store event"
                );
                return Err(KvCacheEventError::InvalidBlockSequence);
            }
        }
        let parent_block = match parent_ext {
            None => None,
            Some(p) => Some(
                self.resolve(st, p, guard)
                    .ok_or(KvCacheEventError::ParentBlockNotFound)?,
            ),
        };
        if data.blocks.is_empty() {
            return Ok(StoreOutcome { duplicate: false });
        }
        let (mut cur, mut j) = match parent_block {
            None => {
                self.lock(ROOT);
                (ROOT, 0)
            }
            Some(b) => {
                let n = self.lock_owner(b)?;
                (n, b - self.extent(n).0 + 1)
            }
        };
        let blocks = &data.blocks;
        let slot = st.slot;
        let mut duplicate = true;
        // Blocks this stream held under a hash it now reuses for another block: a worker's hash
        // names one block, so the old one is gone. Dropped after the walk, with no lock held.
        let mut displaced: Vec<(u32, u64)> = Vec::new();
        // Tails split off a run that nobody held when this stream joined its head (its last
        // holder left and has not unlinked it yet; that holder's unlink then sees this stream
        // and stops). Such a tail holds nobody either, and when nothing hangs below it, nobody
        // else would ever unlink it: tried after the walk, with no lock held (an unlink locks
        // the parent before the child).
        let mut unheld_tails: Vec<u32> = Vec::new();
        let mut i = 0usize;
        // Invariant: `cur` is locked, `j <= len(cur)` is the next position to match in it.
        // An error leaves the walk (with no lock held) but not the tails above.
        let walked: Result<(), KvCacheEventError> = 'walk: loop {
            let (start, len) = extent_parts(self.node(cur).extent.load(Ordering::Relaxed));
            if j < len {
                let mut m = 0u32;
                let rest = &blocks[i..];
                self.locals.for_each_slice(start + j, len - j, |s| {
                    for x in s {
                        match rest.get(m as usize) {
                            Some(b) if b.tokens_hash.0 == x.load(Ordering::Relaxed) => m += 1,
                            _ => return false,
                        }
                    }
                    true
                });
                let member =
                    Members::from_word(self.node(cur).members.load(Ordering::Relaxed), guard)
                        .contains(slot);
                if m > 0 && !member {
                    if j > 0 {
                        // Not reachable by the protocol (a stream enters a run it does not hold
                        // only at its first block); handled for safety.
                        let t = match self
                            .split(st, cur, j, guard)
                            .inspect_err(|_| self.unlock(cur))
                        {
                            Ok(t) => t,
                            Err(e) => break 'walk Err(e),
                        };
                        self.unlock(cur);
                        cur = t;
                        j = 0;
                    }
                    let (_, len_now) = self.extent(cur);
                    if m < len_now {
                        // Relaxed: `cur` is locked, and members change only under its lock.
                        let unheld = self.node(cur).members.load(Ordering::Relaxed) == 0;
                        let t = match self
                            .split(st, cur, m, guard)
                            .inspect_err(|_| self.unlock(cur))
                        {
                            Ok(t) => t,
                            Err(e) => break 'walk Err(e),
                        };
                        self.unlock(t);
                        if unheld {
                            unheld_tails.push(t);
                        }
                    }
                    self.add_member(cur, slot, guard);
                    duplicate = false;
                    st.blocks += m as u64;
                    let (s2, _) = self.extent(cur);
                    for q in 0..m {
                        let b = s2 + j + q;
                        let ext = blocks[i + q as usize].block_hash.0;
                        if let Some(old) = self.held_elsewhere(st, b, ext, guard) {
                            displaced.push((old, ext));
                        }
                        if !self.canonical_for(b, ext) {
                            self.set_exception(st, b, ext);
                        }
                    }
                } else {
                    for q in 0..m {
                        let b = start + j + q;
                        let ext = blocks[i + q as usize].block_hash.0;
                        if let Some(old) = self.held_elsewhere(st, b, ext, guard) {
                            displaced.push((old, ext));
                        }
                        if self.held_ext(st, b) != ext {
                            // Same block re-stored under another hash: the newest hash wins.
                            duplicate = false;
                            self.clear_exception(st, b);
                            if !self.canonical_for(b, ext) {
                                self.set_exception(st, b, ext);
                            }
                        }
                    }
                }
                i += m as usize;
                j += m;
                if i == blocks.len() {
                    self.unlock(cur);
                    break 'walk Ok(());
                }
                let (_, len_now) = self.extent(cur);
                if j < len_now {
                    if j == 0 {
                        self.unlock(cur);
                        break 'walk Err(KvCacheEventError::IndexerInvariantViolation);
                    }
                    // The stream's chain leaves this run in its middle: cut it there.
                    let t = match self
                        .split(st, cur, j, guard)
                        .inspect_err(|_| self.unlock(cur))
                    {
                        Ok(t) => t,
                        Err(e) => break 'walk Err(e),
                    };
                    self.unlock(t);
                }
            }
            let local = blocks[i].tokens_hash.0;
            let cw = self.node(cur).children.load(Ordering::Relaxed);
            match children::find_child(cw, local, &|c| self.first_local(c), guard) {
                Some(c) => {
                    // Parent locked, so `c` is linked and live; lock it before letting go of the
                    // parent so that nobody can unlink it in between.
                    self.lock(c);
                    self.unlock(cur);
                    cur = c;
                    j = 0;
                }
                None => {
                    let node = self.node(cur);
                    let (_, len_now) = extent_parts(node.extent.load(Ordering::Relaxed));
                    let depth = node.depth.load(Ordering::Relaxed) + len_now;
                    let (made, mut fresh) = match self.grow(st, cur, depth, &blocks[i..], guard) {
                        Ok(grown) => grown,
                        Err(e) => {
                            self.unlock(cur);
                            break 'walk Err(e);
                        }
                    };
                    // The grown runs' block ranges, taken while their nodes are still locked:
                    // once unlocked, another stream may join a run and split it, and the node's
                    // extent then no longer spans every block grown here (loom model
                    // `fresh_run`).
                    #[allow(unused_mut)]
                    let mut runs: Vec<(u32, u32)> = made.iter().map(|&n| self.extent(n)).collect();
                    for &n in &made {
                        self.unlock(n);
                    }
                    self.unlock(cur);
                    self.claim_exts(&mut fresh, st.slot);
                    #[cfg(loom)]
                    if crate::sync::loom_support::late_fresh_extents() {
                        // Planted bug (loom-tests/tests/fresh_run.rs).
                        runs = made.iter().map(|&n| self.extent(n)).collect();
                    }
                    duplicate = false;
                    st.blocks += (blocks.len() - i) as u64;
                    for (s, l) in runs {
                        for b in s..s + l {
                            let ext = self.ext_of(b);
                            if let Some(old) = self.held_elsewhere(st, b, ext, guard) {
                                displaced.push((old, ext));
                            }
                            if !self.owns_ext(b) {
                                self.set_exception(st, b, ext);
                            }
                        }
                    }
                    break 'walk Ok(());
                }
            }
        };
        for t in unheld_tails {
            // `t` cannot have been recycled: ids are reused only after a grace period, and
            // `guard` has been pinned since the split. `try_unlink` checks again under the
            // locks (someone may have joined `t`, or hung a child below it, meanwhile).
            self.try_unlink(st, t, guard);
        }
        walked?;
        for (old, ext) in displaced {
            // Still held under `ext` means it is the block just stored (a re-store): keep it.
            if self.resolve(st, ext, guard) != Some(old) && self.holds(st.slot, old, guard) {
                duplicate = false;
                self.drop_one(st, old, guard)?;
            }
        }
        Ok(StoreOutcome { duplicate })
    }

    /// Apply a `removed` event: every hash is tried; the first failure is reported. Engines
    /// evict leaf first, so a run of hashes usually names consecutive blocks of one node,
    /// last first: those are dropped together.
    pub(crate) fn remove(
        self: &Arc<Self>,
        st: &mut StreamState,
        hashes: &[ExternalSequenceBlockHash],
        guard: &Guard,
    ) -> Result<(), KvCacheEventError> {
        let mut first_err = None;
        let mut i = 0usize;
        while i < hashes.len() {
            let Some(b) = self.resolve(st, hashes[i].0, guard) else {
                tracing::warn!(
                    worker_slot = st.slot,
                    block_hash = hashes[i].0,
                    "Failed to find block to remove; skipping remove operation"
                );
                first_err.get_or_insert(KvCacheEventError::BlockNotFound);
                i += 1;
                continue;
            };
            let n = self.lock_owner(b)?;
            let (start, _) = self.extent(n);
            let hi = b - start;
            let mut lo = hi;
            while lo > 0 {
                let Some(h) = hashes.get(i + 1 + (hi - lo) as usize) else {
                    break;
                };
                if !self.names(st, start + lo - 1, h.0) {
                    break;
                }
                lo -= 1;
            }
            i += (hi - lo + 1) as usize;
            self.drop_range(st, n, lo, hi, guard)?;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Drop block `b`, held by `st` (no lock held by the caller).
    fn drop_one(
        self: &Arc<Self>,
        st: &mut StreamState,
        b: u32,
        guard: &Guard,
    ) -> Result<(), KvCacheEventError> {
        let n = self.lock_owner(b)?;
        let off = b - self.extent(n).0;
        self.drop_range(st, n, off, off, guard)
    }

    /// `st` stops holding blocks `lo..=hi` of locked node `n` (which it holds). Unlocks `n`.
    fn drop_range(
        self: &Arc<Self>,
        st: &mut StreamState,
        n: u32,
        lo: u32,
        hi: u32,
        guard: &Guard,
    ) -> Result<(), KvCacheEventError> {
        let (start, len) = self.extent(n);
        if hi + 1 < len {
            let t = self
                .split(st, n, hi + 1, guard)
                .inspect_err(|_| self.unlock(n))?;
            self.unlock(t);
        }
        for b in start + lo..=start + hi {
            self.clear_exception(st, b);
        }
        st.blocks = st.blocks.saturating_sub((hi - lo + 1) as u64);
        let node = self.node(n);
        let mw = node.members.load(Ordering::Relaxed);
        let sole = members::count(mw, guard) == 1;
        if sole && lo > 0 && node.children.load(Ordering::Relaxed) == 0 {
            // Only this stream holds the run and nothing hangs below it: cut the tail off.
            node.extent.store(extent_word(start, lo), Ordering::Release);
            self.ext_release_range(st, start + lo, hi - lo + 1);
            st.freed.push((start + lo, hi - lo + 1));
            self.unlock(n);
            return Ok(());
        }
        let target = if lo > 0 {
            let t = self
                .split(st, n, lo, guard)
                .inspect_err(|_| self.unlock(n))?;
            self.unlock(n);
            t
        } else {
            n
        };
        self.remove_member(target, st.slot, guard);
        self.unlock(target);
        self.try_unlink(st, target, guard);
        Ok(())
    }

    /// Unlink `n` and then its ancestors while they hold nobody and have no children.
    fn try_unlink(&self, st: &mut StreamState, mut n: u32, guard: &Guard) {
        loop {
            if n == ROOT {
                return;
            }
            let node = self.node(n);
            if node.members.load(Ordering::Acquire) != 0
                || node.children.load(Ordering::Acquire) != 0
            {
                return;
            }
            let p = node.parent.load(Ordering::Relaxed);
            self.lock(p);
            self.lock(n);
            let s = node.state.load(Ordering::Relaxed);
            let empty = s & LIVE != 0
                && node.members.load(Ordering::Relaxed) == 0
                && node.children.load(Ordering::Relaxed) == 0;
            if !empty {
                self.unlock(n);
                self.unlock(p);
                return;
            }
            if node.parent.load(Ordering::Relaxed) != p {
                // A split moved `n` under a new node meanwhile: lock that one instead.
                self.unlock(n);
                self.unlock(p);
                continue;
            }
            let parent = self.node(p);
            let key = self.first_local(n);
            let pw = parent.children.load(Ordering::Relaxed);
            if let Some(nw) = children::remove_child(pw, key, n, guard) {
                // Release: readers that load the new word no longer reach `n`.
                parent.children.store(nw, Ordering::Release);
            }
            let (start, len) = extent_parts(node.extent.load(Ordering::Relaxed));
            self.ext_release_range(st, start, len);
            st.freed.push((start, len));
            // Not LIVE, unlocked. Readers that still hold `n` see no members.
            node.state.store(0, Ordering::Release);
            st.unlinked.push(n);
            let parent_empty = p != ROOT
                && parent.members.load(Ordering::Relaxed) == 0
                && parent.children.load(Ordering::Relaxed) == 0;
            self.unlock(p);
            if !parent_empty {
                return;
            }
            n = p;
        }
    }

    /// Drop every block of the stream (a `cleared` event, or before removing the stream).
    /// Cost: sequential scans of the node arena, repeated until one finds nothing (a split by
    /// another stream copies this stream's membership into a node the scan may have passed).
    pub(crate) fn clear(self: &Arc<Self>, st: &mut StreamState, guard: &mut Guard) {
        loop {
            let mut found = false;
            let high = self.nodes.high_water();
            for i in 1..high {
                if i % 4096 == 0 {
                    // Do not hold back reclamation for the whole scan.
                    guard.repin();
                }
                let node = self.node(i);
                if node.state.load(Ordering::Acquire) & LIVE == 0 {
                    continue;
                }
                if !Members::from_word(node.members.load(Ordering::Acquire), guard)
                    .contains(st.slot)
                {
                    continue;
                }
                found = true;
                self.lock(i);
                let removed = node.state.load(Ordering::Relaxed) & LIVE != 0
                    && self.remove_member(i, st.slot, guard);
                self.unlock(i);
                if removed {
                    self.try_unlink(st, i, guard);
                }
            }
            if !found {
                break;
            }
        }
        st.blocks = 0;
        let slot = st.slot;
        st.exc_by_ext.clear();
        st.exc_by_block.clear();
        self.exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), _| *s != slot);
    }

    /// How many leading blocks of `seq` equal the run `start..start + len`.
    #[inline]
    fn match_run(&self, start: u32, len: u32, seq: &[LocalBlockHash]) -> u32 {
        let len = len.min(seq.len() as u32);
        let mut m = 0u32;
        self.locals.for_each_slice(start, len, |s| {
            let q = &seq[m as usize..m as usize + s.len()];
            let same = common_prefix(s, q);
            m += same as u32;
            same == s.len()
        });
        m
    }

    /// Lock-free: the child of `parent` whose first block is `local`, if it starts at `pos`
    /// (a child at another depth was seen through a torn split and is not on this path).
    #[inline]
    fn child_at(&self, parent: &Node, local: u64, pos: usize, guard: &Guard) -> Option<u32> {
        let word = parent.children.load(Ordering::Acquire);
        let c = children::find_child(word, local, &|i| self.first_local(i), guard)?;
        #[cfg(loom)]
        if crate::sync::loom_support::no_depth_check() {
            // Planted bug (loom-tests/tests/split.rs).
            return Some(c);
        }
        (self.node(c).depth.load(Ordering::Relaxed) as usize == pos).then_some(c)
    }

    /// Hint the CPU to fetch node `n` (48 bytes: one or two cache lines).
    #[inline]
    fn prefetch_node(&self, n: u32) {
        let addr = self.node(n) as *const Node as usize;
        crate::sync::prefetch_span(addr, std::mem::size_of::<Node>(), 2);
    }

    /// Hint the CPU to fetch what a query's visit of node `n` will read: its member set, the
    /// first blocks of its run (at most `remaining`, the query's unmatched length) and its
    /// only child, if it has one. The words are read Relaxed because they are used as hints
    /// only; the visit itself reads them again with the orderings the protocol needs.
    #[inline]
    fn prefetch_visit(&self, n: u32, remaining: usize) {
        let node = self.node(n);
        members::prefetch(node.members.load(Ordering::Relaxed));
        let (start, len) = extent_parts(node.extent.load(Ordering::Relaxed));
        let len = len.min(remaining.min(u32::MAX as usize) as u32);
        self.locals.prefetch_range(start, len, RUN_PREFETCH_LINES);
        let next = node.children.load(Ordering::Relaxed);
        if next != 0 && !children::is_table(next) {
            self.prefetch_node((next - 1) as u32);
        }
    }

    /// Lock-free longest-prefix scoring (INDEXER.md §3.5). Always exact: `early_exit` may only
    /// lower a score, and an exact score is a valid lower bound that also matches every value
    /// Dynamo 1.6.1 was measured to return (S1, S7).
    pub(crate) fn find_matches(&self, seq: &[LocalBlockHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        let guard = epoch::pin();
        let mut active: Option<ActiveSet> = None;
        // A slot dropped from the active set scores where the run that dropped it starts.
        let score = |scores: &mut ScoreMap, slot: u32, at: usize| {
            if at > 0 {
                scores.push_new(self.slots.stream_of(slot), at as u32);
            }
        };
        let mut pos = 0usize;
        let mut cur = self.node(ROOT);
        while let Some(h) = seq.get(pos) {
            let Some(c) = self.child_at(cur, h.0, pos, &guard) else {
                break;
            };
            let node = self.node(c);
            // Members before extent: see the module docs.
            let mw = node.members.load(Ordering::Acquire);
            let (start, len) = extent_parts(node.extent.load(Ordering::Acquire));
            // Misses to overlap: the member set (when it is on the heap), this run's blocks and
            // the next node of a chain (a single child, whose index is in this node's line).
            // So the member set is fetched now and used after the run's compare (the scores
            // depend only on where the run starts). On a chain these were already requested
            // one node ahead (below), and asking again costs next to nothing.
            members::prefetch(mw);
            self.locals.prefetch_range(
                start,
                len.min((seq.len() - pos) as u32),
                RUN_PREFETCH_LINES,
            );
            let next = node.children.load(Ordering::Acquire);
            let chain = next != 0 && !children::is_table(next);
            if chain {
                self.prefetch_node((next - 1) as u32);
            }
            let at = pos;
            let rest = seq.len() - pos;
            if cfg!(not(loom)) && chain && (len as usize) < rest {
                // Betting that this run matches in full (a wasted hint otherwise): the next
                // node's line was requested one visit ago, so read its words now and request
                // what its visit will wait for (members, blocks, the node after), to arrive
                // while this run is compared. A long chain then costs about one memory round
                // trip per node, not two or three in a row.
                self.prefetch_visit((next - 1) as u32, rest - len as usize);
            }
            let matched = self.match_run(start, len, &seq[pos..]);
            pos += matched as usize;
            let m = Members::from_word(mw, &guard);
            match &mut active {
                None => {
                    let a = ActiveSet::from_members(m);
                    // Every score comes from a slot of the first node.
                    out.scores.reserve(a.len());
                    active = Some(a);
                }
                Some(a) => a.intersect(m, |slot| score(&mut out.scores, slot, at)),
            }
            if matched < len || active.as_ref().is_some_and(ActiveSet::is_empty) {
                break;
            }
            cur = node;
        }
        if let Some(a) = active {
            a.for_each(|slot| score(&mut out.scores, slot, pos));
        }
        out
    }

    /// A node's children, largest first-block local hash first, so that a LIFO walk visits them
    /// in ascending order: dumps come out the same whatever the insertion history.
    fn sorted_children(&self, node: &Node, guard: &Guard) -> Vec<u32> {
        let mut v = Vec::new();
        children::for_each_child(node.children.load(Ordering::Acquire), guard, |c| v.push(c));
        v.sort_unstable_by_key(|&c| std::cmp::Reverse(self.first_local(c)));
        v
    }

    /// Every live node below the root, parents before children, each with its parent's last
    /// block (`None` under the root), its holders and its blocks.
    fn walk_nodes(
        &self,
        guard: &Guard,
        mut f: impl FnMut(u32, Option<u32>, Members<'_>, u32, u32),
    ) {
        let mut stack: Vec<(u32, Option<u32>)> = Vec::new();
        for c in self.sorted_children(self.node(ROOT), guard) {
            stack.push((c, None));
        }
        while let Some((n, above)) = stack.pop() {
            let node = self.node(n);
            if node.state.load(Ordering::Acquire) & LIVE == 0 {
                continue;
            }
            let m = Members::from_word(node.members.load(Ordering::Acquire), guard);
            let (start, len) = extent_parts(node.extent.load(Ordering::Acquire));
            if len == 0 {
                continue;
            }
            f(n, above, m, start, len);
            for c in self.sorted_children(node, guard) {
                stack.push((c, Some(start + len - 1)));
            }
        }
    }

    /// Dynamo-compatible dump: one Stored event per maximal chain a stream holds, reachable
    /// blocks only, parents before children, event ids 0..n.
    pub(crate) fn dump(&self) -> Vec<RouterEvent> {
        struct Pending {
            slot: u32,
            parent: Option<u64>,
            blocks: Vec<KvCacheStoredBlockData>,
        }
        let guard = epoch::pin();
        let exceptions = self
            .exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let ext_of = |slot: u32, b: u32| {
            exceptions
                .get(&(slot, b))
                .copied()
                .unwrap_or_else(|| self.ext_of(b))
        };
        let mut pending: Vec<Pending> = Vec::new();
        // slot -> (index in `pending`, block that event currently ends with)
        let mut open: HashMap<u32, (usize, u32)> = HashMap::new();
        // node -> streams reaching it (holding every block from the root to it)
        let mut reach_of: HashMap<u32, Rc<Vec<u32>>> = HashMap::new();
        let mut owner_of_last: HashMap<u32, u32> = HashMap::new();
        self.walk_nodes(&guard, |n, above, m, start, len| {
            let mut reach: Vec<u32> = match above {
                None => m.to_vec(),
                Some(pb) => match owner_of_last.get(&pb).and_then(|p| reach_of.get(p)) {
                    Some(pr) => pr.iter().copied().filter(|&s| m.contains(s)).collect(),
                    None => Vec::new(),
                },
            };
            // Deterministic output: streams by identity (slot numbers depend on arrival order).
            reach.sort_unstable_by_key(|&s| self.slots.stream_of(s));
            for b in start..start + len {
                let p = if b == start { above } else { Some(b - 1) };
                for &s in &reach {
                    let block = KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(ext_of(s, b)),
                        tokens_hash: LocalBlockHash(self.local_of(b)),
                        mm_extra_info: None,
                    };
                    match open.get_mut(&s) {
                        Some((idx, tail)) if p == Some(*tail) => {
                            pending[*idx].blocks.push(block);
                            *tail = b;
                        }
                        _ => {
                            pending.push(Pending {
                                slot: s,
                                parent: p.map(|pb| ext_of(s, pb)),
                                blocks: vec![block],
                            });
                            open.insert(s, (pending.len() - 1, b));
                        }
                    }
                }
            }
            owner_of_last.insert(start + len - 1, n);
            reach_of.insert(n, Rc::new(reach));
        });
        pending
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let stream = self.slots.stream_of(p.slot);
                RouterEvent {
                    worker_id: stream.worker_id,
                    storage_tier: StorageTier::Device,
                    residency_domain: Some(ResidencyDomain::Worker),
                    event: KvCacheEvent {
                        event_id: i as u64,
                        data: KvCacheEventData::Stored(KvCacheStoreData {
                            parent_hash: p.parent.map(ExternalSequenceBlockHash),
                            start_position: None,
                            blocks: p.blocks,
                        }),
                        dp_rank: stream.dp_rank,
                    },
                }
            })
            .collect()
    }

    /// Whether the tree holds no block at all.
    pub(crate) fn is_empty(&self) -> bool {
        self.node(ROOT).children.load(Ordering::Acquire) == 0
    }

    /// An exact image of the tree, one snapshot node per block (call at a barrier for a
    /// consistent one).
    pub(crate) fn snapshot(&self) -> IndexSnapshot {
        let guard = epoch::pin();
        let streams = self.slots.streams();
        let stream_index: HashMap<u32, u32> = streams
            .iter()
            .enumerate()
            .map(|(i, (_, slot))| (*slot, i as u32))
            .collect();
        let exceptions = self
            .exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut nodes: Vec<SnapshotNode> = Vec::new();
        // block id -> its snapshot index
        let mut index_of: HashMap<u32, u32> = HashMap::new();
        self.walk_nodes(&guard, |_, above, m, start, len| {
            let slots = m.to_vec();
            let mut parent = above.and_then(|pb| index_of.get(&pb).copied());
            for b in start..start + len {
                let holders = slots
                    .iter()
                    .filter_map(|&slot| {
                        stream_index.get(&slot).map(|&stream| SnapshotHolder {
                            stream,
                            private_ext: exceptions
                                .get(&(slot, b))
                                .map(|&e| ExternalSequenceBlockHash(e)),
                        })
                    })
                    .collect();
                let me = nodes.len() as u32;
                nodes.push(SnapshotNode {
                    parent,
                    local: LocalBlockHash(self.local_of(b)),
                    ext: ExternalSequenceBlockHash(self.ext_of(b)),
                    holders,
                });
                parent = Some(me);
            }
            index_of.insert(start + len - 1, nodes.len() as u32 - 1);
        });
        IndexSnapshot {
            streams: streams.into_iter().map(|(s, _)| s).collect(),
            nodes,
            lower: Vec::new(),
        }
    }

    /// Rebuild an image into this (empty) tree. Returns the stream states, for the event
    /// threads to adopt. Nodes must come parents first (as `snapshot` writes them); a block
    /// extends its parent's run when it is that run's only continuation with the same holders.
    pub(crate) fn restore(
        &self,
        snap: &IndexSnapshot,
    ) -> Result<HashMap<WorkerWithDpRank, StreamState>, KvCacheEventError> {
        let guard = epoch::pin();
        let mut states: Vec<StreamState> = Vec::with_capacity(snap.streams.len());
        for s in &snap.streams {
            states.push(StreamState::new(self.slots.assign(*s)?));
        }
        // Private allocation state for the restore (no stream owns it).
        let mut scratch = StreamState::new(u32::MAX);
        // snapshot index -> block id
        let mut block_of: Vec<u32> = Vec::with_capacity(snap.nodes.len());
        // node -> (end of its reserved ids, its holder slots)
        let mut reserved: HashMap<u32, (u32, Vec<u32>)> = HashMap::new();
        for n in &snap.nodes {
            let mut slots = Vec::with_capacity(n.holders.len());
            for h in &n.holders {
                let st = states
                    .get(h.stream as usize)
                    .ok_or(KvCacheEventError::IndexerInvariantViolation)?;
                if !slots.contains(&st.slot) {
                    slots.push(st.slot);
                }
            }
            slots.sort_unstable();
            let (local, ext) = (n.local.0, n.ext.0);
            let parent_block = match n.parent {
                None => None,
                Some(p) => Some(
                    *block_of
                        .get(p as usize)
                        .ok_or(KvCacheEventError::IndexerInvariantViolation)?,
                ),
            };
            let b = self.restore_block(
                &mut scratch,
                &mut reserved,
                parent_block,
                local,
                ext,
                slots,
                &guard,
            )?;
            for h in &n.holders {
                let st = &mut states[h.stream as usize];
                st.blocks += 1;
                match h.private_ext {
                    Some(e) if !self.canonical_for(b, e.0) => self.set_exception(st, b, e.0),
                    None if !self.canonical_for(b, ext) => self.set_exception(st, b, ext),
                    _ => {}
                }
            }
            block_of.push(b);
        }
        for (n, (end, _)) in reserved {
            let (start, len) = self.extent(n);
            if start + len < end {
                scratch.freed.push((start + len, end - start - len));
            }
        }
        scratch
            .freed
            .extend((scratch.block_cache.0 < scratch.block_cache.1).then(|| {
                (
                    scratch.block_cache.0,
                    scratch.block_cache.1 - scratch.block_cache.0,
                )
            }));
        {
            let mut fb = self.free_blocks.lock().unwrap_or_else(|e| e.into_inner());
            for (s, l) in scratch.freed.drain(..) {
                fb.insert(s, l);
            }
        }
        self.free_nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(&mut scratch.node_cache);
        for st in &states {
            self.slots
                .entry(st.slot)
                .blocks
                .store(st.blocks, Ordering::Relaxed);
        }
        Ok(snap.streams.iter().copied().zip(states).collect())
    }

    /// One block of a restore: appended to its parent's run when possible, else a new node.
    #[allow(clippy::too_many_arguments)]
    fn restore_block(
        &self,
        scratch: &mut StreamState,
        reserved: &mut HashMap<u32, (u32, Vec<u32>)>,
        parent_block: Option<u32>,
        local: u64,
        ext: u64,
        slots: Vec<u32>,
        guard: &Guard,
    ) -> Result<u32, KvCacheEventError> {
        let parent = match parent_block {
            None => ROOT,
            Some(pb) => self.owner_of(pb),
        };
        let pnode = self.node(parent);
        let (pstart, plen) = extent_parts(pnode.extent.load(Ordering::Relaxed));
        if let Some(pb) = parent_block {
            if pb < pstart || pb >= pstart + plen {
                return Err(KvCacheEventError::IndexerInvariantViolation);
            }
            if pb + 1 != pstart + plen {
                // A second child of a block that an earlier child's blocks extended: cut the
                // run after the parent block (its reserved ids stay with the tail).
                self.lock(parent);
                let t = self.split(scratch, parent, pb + 1 - pstart, guard);
                self.unlock(parent);
                let t = t?;
                self.unlock(t);
                if let Some(r) = reserved.remove(&parent) {
                    reserved.insert(t, r);
                }
            }
        }
        let (pstart, plen) = extent_parts(pnode.extent.load(Ordering::Relaxed));
        let pw = pnode.children.load(Ordering::Relaxed);
        if children::find_child(pw, local, &|i| self.first_local(i), guard).is_some() {
            return Err(KvCacheEventError::IndexerInvariantViolation);
        }
        if let (Some(pb), 0) = (parent_block, pw) {
            if let Some((end, held)) = reserved.get(&parent) {
                if *held == slots && pb + 1 < *end {
                    let b = pb + 1;
                    self.init_block(b, local, ext, parent);
                    self.claim_exts(&mut [(ext, b)], 0);
                    pnode
                        .extent
                        .store(extent_word(pstart, plen + 1), Ordering::Release);
                    return Ok(b);
                }
            }
        }
        let (start, got) = self.take_blocks(scratch, BLOCK_BATCH)?;
        let depth = pnode.depth.load(Ordering::Relaxed) + plen;
        let n = self.alloc_node(
            &mut scratch.node_cache,
            local,
            start,
            1,
            parent,
            depth,
            members::encode(&slots),
            0,
        )?;
        self.init_block(start, local, ext, n);
        self.claim_exts(&mut [(ext, start)], 0);
        if let Some(nw) = children::insert_child(pw, local, n, &|i| self.first_local(i), guard) {
            pnode.children.store(nw, Ordering::Release);
        }
        self.unlock(n);
        reserved.insert(n, (start + got, slots));
        Ok(start)
    }

    /// Heap bytes of the shared map's shard tables (one lock per shard, no walk).
    pub(crate) fn map_bytes(&self) -> usize {
        self.ext_map.iter().map(|m| m.lock().bytes()).sum()
    }

    /// Current memory use of this tree.
    pub(crate) fn memory(&self) -> MemoryReport {
        let guard = epoch::pin();
        let mut r = MemoryReport::default();
        let high = self.nodes.high_water();
        for i in 1..high {
            let node = self.node(i);
            if node.state.load(Ordering::Acquire) & LIVE == 0 {
                continue;
            }
            r.live_runs += 1;
            r.live_nodes += extent_parts(node.extent.load(Ordering::Acquire)).1 as usize;
            let mw = node.members.load(Ordering::Acquire);
            if let Members::Bits(bits) = Members::from_word(mw, &guard) {
                r.member_bytes += (bits.len() + 2) * 8;
            }
            r.child_bytes += children::heap_bytes(node.children.load(Ordering::Acquire), &guard);
        }
        r.map_bytes = self.map_bytes();
        r.heap_bytes = r.member_bytes + r.child_bytes + r.map_bytes;
        r.block_ids = self.locals.high_water() as usize;
        r.node_bytes = self.nodes.allocated_bytes()
            + self.locals.allocated_bytes()
            + self.exts.allocated_bytes()
            + self.owner.allocated_bytes();
        r
    }
}

/// How many leading blocks of `run` equal `seq` (same length). Eight at a time with no
/// early exit inside a group, so the compiler can use vector compares.
#[cfg(not(loom))]
#[inline]
fn common_prefix(run: &[AtomicU64], seq: &[LocalBlockHash]) -> usize {
    // SAFETY: `AtomicU64` has the same size, alignment and bit validity as `u64`. The blocks of a
    // run a reader reached are written only before the run was published (Release, and the
    // reader loaded the publishing word with Acquire) and are not written again until their id
    // is recycled, which waits for every reader pinned now (the caller holds an epoch guard).
    // So these plain reads race with no write.
    let run: &[u64] = unsafe { std::slice::from_raw_parts(run.as_ptr() as *const u64, run.len()) };
    let n = run.len().min(seq.len());
    let mut i = 0;
    while i + 8 <= n {
        let mut diff = 0u64;
        for k in 0..8 {
            diff |= run[i + k] ^ seq[i + k].0;
        }
        if diff != 0 {
            break;
        }
        i += 8;
    }
    while i < n && run[i] == seq[i].0 {
        i += 1;
    }
    i
}

/// Under loom the loads stay atomic (loom tracks every access).
#[cfg(loom)]
fn common_prefix(run: &[AtomicU64], seq: &[LocalBlockHash]) -> usize {
    run.iter()
        .zip(seq)
        .take_while(|(x, h)| x.load(Ordering::Relaxed) == h.0)
        .count()
}

/// Cache lines of a run's local hashes a query requests before comparing it (8 hashes a line):
/// a run averages a few dozen blocks on the reference workload, and longer runs are followed
/// by the hardware prefetcher once the compare streams through them.
const RUN_PREFETCH_LINES: usize = 8;

/// Fresh ids wanted from a reused range at least this long (so that a run is not cut short).
const BATCH_HINT: u32 = BLOCK_BATCH;

impl Drop for Tree {
    fn drop(&mut self) {
        // Exclusive access: free every live heap set and child table now.
        let high = self.nodes.high_water();
        for i in 0..high {
            let node = self.nodes.get(i);
            members::free_now(node.members.swap(0, Ordering::Relaxed));
            children::free_now(node.children.swap(0, Ordering::Relaxed));
        }
    }
}

/// The workers still matching during a walk: a short list for the common case, a bitset copy
/// when the first block is held by many.
enum ActiveSet {
    Few(Vec<u32>),
    Many { bits: Vec<u64>, len: usize },
}

impl ActiveSet {
    fn from_members(m: Members<'_>) -> ActiveSet {
        match m {
            Members::Bits(bits) => {
                let len = bits.iter().map(|b| b.count_ones() as usize).sum();
                ActiveSet::Many {
                    bits: bits.to_vec(),
                    len,
                }
            }
            Members::Inline(_) => ActiveSet::Few(m.to_vec()),
        }
    }

    fn len(&self) -> usize {
        match self {
            ActiveSet::Few(v) => v.len(),
            ActiveSet::Many { len, .. } => *len,
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only members of `m`; report every slot that drops out.
    fn intersect(&mut self, m: Members<'_>, mut dropped: impl FnMut(u32)) {
        match self {
            ActiveSet::Few(v) => v.retain(|&s| {
                let keep = m.contains(s);
                if !keep {
                    dropped(s);
                }
                keep
            }),
            ActiveSet::Many { bits, len } => {
                match m {
                    Members::Bits(other) => {
                        for (i, w) in bits.iter_mut().enumerate() {
                            let o = other.get(i).copied().unwrap_or(0);
                            let mut gone = *w & !o;
                            *len -= gone.count_ones() as usize;
                            while gone != 0 {
                                dropped(i as u32 * 64 + gone.trailing_zeros());
                                gone &= gone - 1;
                            }
                            *w &= o;
                        }
                    }
                    Members::Inline(_) => {
                        let keep: Vec<u32> = m
                            .to_vec()
                            .into_iter()
                            .filter(|&s| {
                                bits.get((s / 64) as usize)
                                    .is_some_and(|b| b & (1u64 << (s % 64)) != 0)
                            })
                            .collect();
                        for (i, w) in bits.iter().enumerate() {
                            let mut b = *w;
                            while b != 0 {
                                let s = i as u32 * 64 + b.trailing_zeros();
                                if !keep.contains(&s) {
                                    dropped(s);
                                }
                                b &= b - 1;
                            }
                        }
                        *self = ActiveSet::Few(keep);
                        return;
                    }
                }
                if *len <= 2 {
                    let mut v = Vec::with_capacity(2);
                    for (i, w) in bits.iter().enumerate() {
                        let mut b = *w;
                        while b != 0 {
                            v.push(i as u32 * 64 + b.trailing_zeros());
                            b &= b - 1;
                        }
                    }
                    *self = ActiveSet::Few(v);
                }
            }
        }
    }

    fn for_each(&self, mut f: impl FnMut(u32)) {
        match self {
            ActiveSet::Few(v) => v.iter().for_each(|&s| f(s)),
            ActiveSet::Many { bits, .. } => {
                for (i, w) in bits.iter().enumerate() {
                    let mut b = *w;
                    while b != 0 {
                        f(i as u32 * 64 + b.trailing_zeros());
                        b &= b - 1;
                    }
                }
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod layout_tests {
    #[test]
    fn a_node_is_48_bytes() {
        assert_eq!(std::mem::size_of::<super::Node>(), 48);
    }
}

/// Reader-side probes for the loom models (loom-tests/): the same loads, in the same order and
/// with the same orderings, as `find_matches`, but reporting what they saw instead of scoring.
/// They speak in blocks (block ids), whatever run holds them.
#[cfg(loom)]
impl Tree {
    /// The block a lock-free reader reaches from the root by following local hashes `path`.
    pub(crate) fn loom_walk(&self, path: &[u64], guard: &Guard) -> Option<u32> {
        self.path_blocks(path, guard).last().map(|&(b, _)| b)
    }

    /// The blocks right after block `b` (0: the root) as a reader sees them: the next block of its run, or
    /// the first blocks of the run's children (whatever their keys).
    pub(crate) fn loom_children(&self, b: u32, guard: &Guard) -> Vec<u32> {
        let n = self.owner_of(b);
        let node = self.node(n);
        let (start, len) = extent_parts(node.extent.load(Ordering::Acquire));
        if n != ROOT && b + 1 < start + len {
            return vec![b + 1];
        }
        let mut out = Vec::new();
        children::for_each_child(node.children.load(Ordering::Acquire), guard, |c| {
            out.push(extent_parts(self.node(c).extent.load(Ordering::Acquire)).0)
        });
        out
    }

    /// The node (run) holding block `b` now.
    pub(crate) fn loom_owner(&self, b: u32) -> u32 {
        self.owner_of(b)
    }

    /// Block `b` as a reader sees it: its local hash and its run's holders' slots.
    pub(crate) fn loom_read(&self, b: u32, guard: &Guard) -> (u64, Vec<u32>) {
        let node = self.node(self.owner_of(b));
        let holders = Members::from_word(node.members.load(Ordering::Acquire), guard).to_vec();
        (self.local_of(b), holders)
    }
}

/// Read-only support for the lower-tier walk (engine/src/lower_tiers.rs) and the loom probes.
impl Tree {
    /// Lock-free: the blocks along `seq` from the root, each with the node holding it then.
    fn path_blocks(&self, seq: &[u64], guard: &Guard) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut cur = self.node(ROOT);
        while let Some(&h) = seq.get(out.len()) {
            let Some(c) = self.child_at(cur, h, out.len(), guard) else {
                break;
            };
            let node = self.node(c);
            let (start, len) = extent_parts(node.extent.load(Ordering::Acquire));
            let rest: Vec<LocalBlockHash> = seq[out.len()..]
                .iter()
                .map(|&x| LocalBlockHash(x))
                .collect();
            let matched = self.match_run(start, len, &rest);
            out.extend((start..start + matched).map(|b| (b, c)));
            if matched < len {
                break;
            }
            cur = node;
        }
        out
    }

    /// For each `(stream, depth)` (depth ≥ 1), the external hash under which `stream` holds the
    /// device block at `depth` along `seq` (`None` if it does not hold it). Lock-free walk; then
    /// takes the exceptions mutex once (a short, writer-shared lock) when any block is held.
    pub(crate) fn stream_exts_on_path(
        &self,
        seq: &[LocalBlockHash],
        wanted: &[(WorkerWithDpRank, u32)],
    ) -> Vec<Option<u64>> {
        let max = wanted.iter().map(|(_, d)| *d as usize).max().unwrap_or(0);
        let guard = epoch::pin();
        let locals: Vec<u64> = seq.iter().take(max).map(|h| h.0).collect();
        let path = self.path_blocks(&locals, &guard);
        let held: Vec<Option<(u32, u32)>> = wanted
            .iter()
            .map(|(stream, d)| {
                let &(b, n) = path.get((*d as usize).checked_sub(1)?)?;
                let members =
                    Members::from_word(self.node(n).members.load(Ordering::Acquire), &guard);
                let mut slot = None;
                members.for_each(|s| {
                    if slot.is_none() && self.slots.stream_of(s) == *stream {
                        slot = Some(s);
                    }
                });
                slot.map(|s| (s, b))
            })
            .collect();
        if held.iter().all(Option::is_none) {
            return vec![None; wanted.len()];
        }
        let exceptions = self.exceptions.lock().unwrap_or_else(|e| e.into_inner());
        held.into_iter()
            .map(|h| {
                h.map(|(slot, b)| {
                    exceptions
                        .get(&(slot, b))
                        .copied()
                        .unwrap_or_else(|| self.ext_of(b))
                })
            })
            .collect()
    }
}

#[cfg(all(test, not(loom)))]
mod ext_batch_tests {
    use super::*;

    /// A batch whose first pass finds some shards held (here: by this test, released from
    /// another thread a moment later) comes back to them: every operation is applied once,
    /// and nothing is applied to a shard without its lock.
    #[test]
    fn a_batch_comes_back_to_held_shards_and_applies_everything() {
        let tree = Tree::with_expected_blocks(0);
        let exts: Vec<u64> = (1..=2_000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9))
            .collect();
        for (k, &ext) in exts.iter().enumerate() {
            tree.exts.ensure(k as u32 + 1);
            tree.exts.get(k as u32 + 1).store(ext, Ordering::Relaxed);
        }
        let mut batch: Vec<ExtBlock> = exts
            .iter()
            .enumerate()
            .map(|(k, &e)| (e, k as u32 + 1))
            .collect();
        // Hold every other shard until the batch has started.
        let held: Vec<usize> = (0..EXT_SHARDS).step_by(2).collect();
        let guards: Vec<_> = held.iter().map(|&s| tree.ext_map[s].lock()).collect();
        let applied = std::sync::atomic::AtomicUsize::new(0);
        let started = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                started.wait();
                std::thread::sleep(std::time::Duration::from_millis(20));
                drop(guards);
            });
            started.wait();
            tree.ext_batch(&mut batch, 0, |t, ext, b| {
                assert!(t.claim(mix(ext), b, |m| tree.ext_of(m) == ext));
                applied.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(applied.load(Ordering::Relaxed), exts.len());
        for (k, &ext) in exts.iter().enumerate() {
            assert_eq!(tree.ext_lookup(ext), Some(k as u32 + 1), "ext {ext:#x}");
        }
    }
}
