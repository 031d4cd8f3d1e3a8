//! One namespace's radix tree of blocks: lock-free reads, per-node locks for writers.
//!
//! Shape: one node per block, keyed by its local hash under its parent; node `0` is the root.
//! Nodes live in a [`SegmentedVec`] and link to each other by `u32` index (40 bytes a node).
//!
//! Concurrency protocol (see `docs/architecture.md`):
//! * **Readers** pin an epoch and walk `children` words and `members` words with Acquire loads.
//!   They never lock, never write, and never see a freed node or set: every unlink retires the
//!   memory through crossbeam-epoch, and a node index is recycled only after the grace period.
//! * **Writers** are the event threads. A stream (worker, dp_rank) is owned by one thread, so only
//!   that thread ever adds or removes the stream's slot. A node's `members` and `children` words
//!   are replaced only under the node's lock bit. Locks are taken parent before child, never the
//!   other way, so writers cannot deadlock. A node is unlinked only while its parent and itself
//!   are locked, and only if nobody holds it and it has no children: a writer that found the node
//!   under the parent's lock and locked it before releasing the parent can therefore never add a
//!   block to an unlinked node (the race that loses blocks in Dynamo 1.6.1's thread pool).
//! * **External hashes** resolve through one shared map `ext -> node` per namespace (writers
//!   only, sharded mutexes): engines use the same sequence hash for the same prefix, so one entry
//!   serves every worker. A worker whose hash differs from the node's first hash keeps a private
//!   exception in its stream state (INDEXER.md §0.1).

use crate::children;
use crate::error::KvCacheEventError;
use crate::members::{self, Members};
use crate::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, OverlapScores, ResidencyDomain, RouterEvent,
    StorageTier, WorkerWithDpRank,
};
use crate::segmented::SegmentedVec;
use crate::slots::Slots;
use crate::snapshot::{IndexSnapshot, SnapshotHolder, SnapshotNode};
use crate::sync::{spin_wait, AtomicU32, AtomicU64, Mutex, MutexGuard, Ordering};
use crossbeam_epoch::{self as epoch, Guard};
use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

pub(crate) const ROOT: u32 = 0;
const LOCKED: u32 = 1;
const LIVE: u32 = 2;
/// The node is the entry of its `ext` in the shared external-hash map.
const OWNS_EXT: u32 = 4;
#[cfg(not(loom))]
const EXT_SHARDS: usize = 64;
/// loom models hold a few blocks: two shards still exercise the sharding.
#[cfg(loom)]
const EXT_SHARDS: usize = 2;

/// One block of the tree: 32 bytes, so two share a cache line and none straddles one. All
/// fields are atomics so that a recycled slot can be re-initialised
/// through a shared reference; `local`, `ext` and `parent` are written only before publication.
#[derive(Default)]
pub(crate) struct Node {
    local: AtomicU64,
    members: AtomicU64,
    children: AtomicU64,
    parent: AtomicU32,
    state: AtomicU32,
}

// SAFETY: Node is five atomics; all-zero is a valid (free, unlinked) node.
unsafe impl crate::segmented::Zeroable for Node {}

#[inline]
fn mix(x: u64) -> u64 {
    let x = (x ^ (x >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// The per-stream state owned by the stream's event thread.
pub(crate) struct StreamState {
    pub(crate) slot: u32,
    pub(crate) blocks: u64,
    /// Private external hashes (those that differ from the node's shared one).
    exc_by_ext: hashbrown::HashMap<u64, u32>,
    exc_by_node: hashbrown::HashMap<u32, u64>,
    /// Nodes unlinked by the current event, freed together after the grace period.
    unlinked: Vec<u32>,
    /// Free node indices reserved for this stream's next allocations.
    node_cache: Vec<u32>,
}

impl StreamState {
    pub(crate) fn new(slot: u32) -> Self {
        Self {
            slot,
            blocks: 0,
            exc_by_ext: hashbrown::HashMap::new(),
            exc_by_node: hashbrown::HashMap::new(),
            unlinked: Vec::new(),
            node_cache: Vec::new(),
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
    /// Node arena and its parallel external-hash array (allocated chunks, live or free).
    pub node_bytes: usize,
    /// Heap member sets and child tables reachable now.
    pub heap_bytes: usize,
    /// Live nodes (blocks), excluding the root.
    pub live_nodes: usize,
}

/// The tree of one namespace.
pub(crate) struct Tree {
    nodes: SegmentedVec<Node>,
    /// `exts[i]` is node `i`'s shared external hash. Kept apart from the node because only
    /// writers read it: the 32-byte node then never straddles a cache line on the query path.
    exts: SegmentedVec<AtomicU64>,
    free_nodes: Mutex<Vec<u32>>,
    ext_map: Box<[CachePadded<Mutex<HashTable<u32>>>]>,
    pub(crate) slots: Slots,
    /// Mirror of every stream's exceptions, read by dumps: (slot, node) -> ext.
    exceptions: Mutex<HashMap<(u32, u32), u64>>,
}

impl Tree {
    pub(crate) fn new() -> Arc<Tree> {
        let t = Tree {
            nodes: SegmentedVec::new(),
            exts: SegmentedVec::new(),
            free_nodes: Mutex::new(Vec::new()),
            ext_map: (0..EXT_SHARDS)
                .map(|_| CachePadded::new(Mutex::new(HashTable::new())))
                .collect(),
            slots: Slots::new(),
            exceptions: Mutex::new(HashMap::new()),
        };
        let root = t.nodes.push_index();
        t.exts.ensure(ROOT);
        debug_assert_eq!(root, Some(ROOT));
        t.nodes.get(ROOT).state.store(LIVE, Ordering::Release);
        Arc::new(t)
    }

    #[inline]
    fn node(&self, i: u32) -> &Node {
        self.nodes.get(i)
    }

    /// Node `i`'s shared external hash (writer-side data).
    #[inline]
    fn ext_of(&self, i: u32) -> u64 {
        self.exts.get(i).load(Ordering::Relaxed)
    }

    #[inline]
    fn local_of(&self, i: u32) -> u64 {
        // Relaxed: `i` was obtained through an Acquire load of a link published (Release) after
        // the node was initialised.
        self.node(i).local.load(Ordering::Relaxed)
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

    fn ext_shard(&self, ext: u64) -> MutexGuard<'_, HashTable<u32>> {
        // Middle bits: hashbrown uses the top 7 bits as its tag and the low bits as the bucket,
        // so sharding on either would make every probe in a shard look like a match.
        self.ext_map[(mix(ext) >> 32) as usize % EXT_SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn ext_lookup(&self, ext: u64) -> Option<u32> {
        let shard = self.ext_shard(ext);
        shard.find(mix(ext), |&n| self.ext_of(n) == ext).copied()
    }

    /// Allocate a node, initialised, LIVE and LOCKED, holding `slot`, not yet linked.
    fn alloc_node(
        &self,
        cache: &mut Vec<u32>,
        local: u64,
        ext: u64,
        parent: u32,
        members_word: u64,
    ) -> Result<u32, KvCacheEventError> {
        if cache.is_empty() {
            self.refill(cache);
        }
        let i = cache.pop().ok_or(KvCacheEventError::CapacityExhausted)?;
        let n = self.node(i);
        // Relaxed: nobody can reach `i` until it is linked with a Release store.
        n.local.store(local, Ordering::Relaxed);
        self.exts.get(i).store(ext, Ordering::Relaxed);
        n.members.store(members_word, Ordering::Relaxed);
        n.children.store(0, Ordering::Relaxed);
        n.parent.store(parent, Ordering::Relaxed);
        let mut state = LIVE | LOCKED;
        {
            let mut shard = self.ext_shard(ext);
            let h = mix(ext);
            // One probe: claim the entry if no live node owns this hash yet.
            if let hashbrown::hash_table::Entry::Vacant(v) =
                shard.entry(h, |&m| self.ext_of(m) == ext, |&m| mix(self.ext_of(m)))
            {
                v.insert(i);
                state |= OWNS_EXT;
            }
        }
        n.state.store(state, Ordering::Release);
        Ok(i)
    }

    /// Take a batch of node indices for one stream's allocations: recycled ones first, else a
    /// fresh range. Batching keeps the shared free list and the arena's counter off the per-block
    /// path (they are shared cache lines between event threads).
    fn refill(&self, cache: &mut Vec<u32>) {
        #[cfg(not(loom))]
        const BATCH: usize = 256;
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
                self.exts.ensure(first + BATCH as u32 - 1);
                cache.extend(first..first + BATCH as u32);
            }
        }
        // Descending, so that pops hand out ascending indices: a chain stored by one event lands
        // in (mostly) consecutive nodes, which a long query then walks with sequential loads.
        // Recycled indices come back in per-event batches, so sorting regroups evicted runs.
        cache.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Give a stream's unused cached indices back (the stream is going away).
    pub(crate) fn return_cache(&self, st: &mut StreamState) {
        if !st.node_cache.is_empty() {
            self.free_nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut st.node_cache);
        }
    }

    /// Return the nodes unlinked by the stream's last event to the free list after the epoch
    /// grace period. One deferred closure per event, not per node: crossbeam collects a bounded
    /// number of deferred functions per pin, and per-node deferral fell behind by millions.
    pub(crate) fn release_unlinked(self: &Arc<Self>, st: &mut StreamState, guard: &Guard) {
        if st.unlinked.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut st.unlinked);
        #[cfg(loom)]
        if crate::sync::loom_support::eager_reclamation() {
            // Planted bug (loom-tests/tests/reclaim.rs): no grace period.
            self.free_nodes.lock().unwrap().extend(batch);
            return;
        }
        let tree = Arc::clone(self);
        guard.defer(move || {
            tree.free_nodes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(batch)
        });
        // Hand the bag to the global queue now so that other threads can collect it.
        guard.flush();
    }

    /// Whether `st`'s external hash for node `n` is the node's shared one.
    fn canonical_for(&self, n: u32, ext: u64) -> bool {
        let node = self.node(n);
        self.ext_of(n) == ext && node.state.load(Ordering::Relaxed) & OWNS_EXT != 0
    }

    fn set_exception(&self, st: &mut StreamState, n: u32, ext: u64) {
        if let Some(old_node) = st.exc_by_ext.insert(ext, n) {
            if old_node != n {
                st.exc_by_node.remove(&old_node);
            }
        }
        if let Some(old_ext) = st.exc_by_node.insert(n, ext) {
            if old_ext != ext {
                st.exc_by_ext.remove(&old_ext);
            }
        }
        self.exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((st.slot, n), ext);
    }

    fn clear_exception(&self, st: &mut StreamState, n: u32) {
        if st.exc_by_node.is_empty() {
            return;
        }
        if let Some(ext) = st.exc_by_node.remove(&n) {
            if st.exc_by_ext.get(&ext) == Some(&n) {
                st.exc_by_ext.remove(&ext);
            }
            self.exceptions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(st.slot, n));
        }
    }

    /// Another node `st` holds under `ext`, about to be named by `n` instead. When `n` owns
    /// `ext` in the shared map, only a private exception can name another node, so the common
    /// case costs no map probe. Takes no node lock (only, rarely, a shard mutex).
    fn held_elsewhere(&self, st: &StreamState, n: u32, ext: u64, guard: &Guard) -> Option<u32> {
        if self.canonical_for(n, ext) {
            if st.exc_by_ext.is_empty() {
                return None;
            }
            return st.exc_by_ext.get(&ext).copied().filter(|&o| o != n);
        }
        self.resolve(st, ext, guard).filter(|&o| o != n)
    }

    /// Whether `st` holds node `n` under its shared hash `ext` (and has no private hash for
    /// `ext` elsewhere). Safe on a stale index: only this thread adds `st.slot` to nodes.
    fn holds_canonically(&self, st: &StreamState, n: u32, ext: u64, guard: &Guard) -> bool {
        let node = self.node(n);
        self.ext_of(n) == ext
            && node.state.load(Ordering::Acquire) & (LIVE | OWNS_EXT) == LIVE | OWNS_EXT
            && Members::from_word(node.members.load(Ordering::Acquire), guard).contains(st.slot)
            && (st.exc_by_node.is_empty()
                || (!st.exc_by_node.contains_key(&n) && !st.exc_by_ext.contains_key(&ext)))
    }

    /// The node `st` holds under external hash `ext`, if any.
    fn resolve(&self, st: &StreamState, ext: u64, guard: &Guard) -> Option<u32> {
        if !st.exc_by_ext.is_empty() {
            if let Some(&n) = st.exc_by_ext.get(&ext) {
                return Some(n);
            }
        }
        let n = self.ext_lookup(ext)?;
        let node = self.node(n);
        // Only this thread adds or removes `st.slot`, so if the slot is in the node, the node
        // is live and stays live until this thread removes it.
        let held =
            Members::from_word(node.members.load(Ordering::Acquire), guard).contains(st.slot);
        (held
            && (st.exc_by_node.is_empty() || !st.exc_by_node.contains_key(&n))
            && self.ext_of(n) == ext)
            .then_some(n)
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
        let mut cur = match parent_ext {
            None => ROOT,
            Some(p) => self
                .resolve(st, p, guard)
                .ok_or(KvCacheEventError::ParentBlockNotFound)?,
        };
        if data.blocks.is_empty() {
            return Ok(StoreOutcome { duplicate: false });
        }
        let slot = st.slot;
        let mut duplicate = true;
        // Blocks this stream held under a hash it now reuses for another block: a worker's hash
        // names one block, so the old one is gone. Dropped after the walk, with no lock held.
        let mut displaced: Vec<(u32, u64)> = Vec::new();
        self.lock(cur);
        for b in &data.blocks {
            let (local, ext) = (b.tokens_hash.0, b.block_hash.0);
            let parent = self.node(cur);
            let cw = parent.children.load(Ordering::Relaxed);
            let found = children::find_child(cw, local, &|i| self.local_of(i), guard);
            let child = match found {
                Some(c) => {
                    // Parent locked, so `c` is linked and live; lock it before letting go of the
                    // parent so that nobody can unlink it in between.
                    self.lock(c);
                    c
                }
                None => {
                    let c = match self.alloc_node(
                        &mut st.node_cache,
                        local,
                        ext,
                        cur,
                        members::encode(&[slot]),
                    ) {
                        Ok(c) => c,
                        Err(e) => {
                            self.unlock(cur);
                            return Err(e);
                        }
                    };
                    if let Some(nw) =
                        children::insert_child(cw, local, c, &|i| self.local_of(i), guard)
                    {
                        // Release: the child's initialisation is visible to readers that see it.
                        parent.children.store(nw, crate::sync::publish_link());
                    }
                    self.unlock(cur);
                    duplicate = false;
                    st.blocks += 1;
                    if let Some(old) = self.held_elsewhere(st, c, ext, guard) {
                        displaced.push((old, ext));
                    }
                    if !self.canonical_for(c, ext) {
                        self.set_exception(st, c, ext);
                    }
                    cur = c;
                    continue;
                }
            };
            self.unlock(cur);
            if let Some(old) = self.held_elsewhere(st, child, ext, guard) {
                displaced.push((old, ext));
            }
            let node = self.node(child);
            let mw = node.members.load(Ordering::Relaxed);
            match members::with_added(mw, slot, guard) {
                Some(nw) => {
                    // Release: pairs with readers' Acquire; the slot's identity is visible first.
                    node.members.store(nw, Ordering::Release);
                    members::retire(mw, guard);
                    duplicate = false;
                    st.blocks += 1;
                    if !self.canonical_for(child, ext) {
                        self.set_exception(st, child, ext);
                    }
                }
                None => {
                    let held_ext = st
                        .exc_by_node
                        .get(&child)
                        .copied()
                        .unwrap_or_else(|| self.ext_of(child));
                    if held_ext != ext {
                        // Same block re-stored under another hash: the newest hash wins.
                        duplicate = false;
                        self.clear_exception(st, child);
                        if !self.canonical_for(child, ext) {
                            self.set_exception(st, child, ext);
                        }
                    }
                }
            }
            cur = child;
        }
        self.unlock(cur);
        for (old, ext) in displaced {
            // Still held under `ext` means it is the block just stored (a re-store): keep it.
            if self.resolve(st, ext, guard) != Some(old) {
                duplicate = false;
                self.drop_membership(st, old, guard);
            }
        }
        Ok(StoreOutcome { duplicate })
    }

    /// Apply a `removed` event: every hash is tried; the first failure is reported.
    pub(crate) fn remove(
        self: &Arc<Self>,
        st: &mut StreamState,
        hashes: &[ExternalSequenceBlockHash],
        guard: &Guard,
    ) -> Result<(), KvCacheEventError> {
        let mut first_err = None;
        // Engines evict leaf first, so the next hash is usually the parent of the block just
        // removed: try that before the shared map (saves two cache misses per block).
        let mut hint: Option<u32> = None;
        for h in hashes {
            let found = hint
                .filter(|&p| p != ROOT && self.holds_canonically(st, p, h.0, guard))
                .or_else(|| self.resolve(st, h.0, guard));
            match found {
                Some(n) => {
                    hint = Some(self.node(n).parent.load(Ordering::Relaxed));
                    self.drop_membership(st, n, guard)
                }
                None => {
                    tracing::warn!(
                        worker_slot = st.slot,
                        block_hash = h.0,
                        "Failed to find block to remove; skipping remove operation"
                    );
                    first_err.get_or_insert(KvCacheEventError::BlockNotFound);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn drop_membership(self: &Arc<Self>, st: &mut StreamState, n: u32, guard: &Guard) {
        self.lock(n);
        let node = self.node(n);
        let mw = node.members.load(Ordering::Relaxed);
        if let Some(nw) = members::with_removed(mw, st.slot, guard) {
            node.members.store(nw, Ordering::Release);
            members::retire(mw, guard);
            st.blocks = st.blocks.saturating_sub(1);
        }
        self.unlock(n);
        self.clear_exception(st, n);
        self.try_unlink(st, n, guard);
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
            let still_empty = s & LIVE != 0
                && node.parent.load(Ordering::Relaxed) == p
                && node.members.load(Ordering::Relaxed) == 0
                && node.children.load(Ordering::Relaxed) == 0;
            if !still_empty {
                self.unlock(n);
                self.unlock(p);
                return;
            }
            let parent = self.node(p);
            let local = node.local.load(Ordering::Relaxed);
            let pw = parent.children.load(Ordering::Relaxed);
            if let Some(nw) = children::remove_child(pw, local, n, guard) {
                // Release: readers that load the new word no longer reach `n`.
                parent.children.store(nw, Ordering::Release);
            }
            if s & OWNS_EXT != 0 {
                let ext = self.ext_of(n);
                let mut shard = self.ext_shard(ext);
                if let Ok(entry) = shard.find_entry(mix(ext), |&m| m == n) {
                    entry.remove();
                }
            }
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
    /// Cost: one sequential scan of the node arena.
    pub(crate) fn clear(self: &Arc<Self>, st: &mut StreamState, guard: &mut Guard) {
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
            let held =
                Members::from_word(node.members.load(Ordering::Acquire), guard).contains(st.slot);
            if held {
                self.drop_membership(st, i, guard);
            }
        }
        st.blocks = 0;
        let slot = st.slot;
        st.exc_by_ext.clear();
        st.exc_by_node.clear();
        self.exceptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(s, _), _| *s != slot);
    }

    /// Lock-free: the child (index and node) of node `pi` whose local hash is `local`. A chain stored by one event sits in consecutive indices (see `refill`), so the
    /// single child is usually `pi + 1`: that branch takes the child's address from the
    /// parent's, and the CPU can run ahead down the chain instead of waiting for each link.
    #[inline]
    fn child_of<'a>(
        &'a self,
        pi: u32,
        parent: &'a Node,
        local: u64,
        guard: &Guard,
    ) -> Option<(u32, &'a Node)> {
        let word = parent.children.load(Ordering::Acquire);
        if let Some(c) = children::single_child(word) {
            let n = if c == pi.wrapping_add(1) {
                self.nodes.get_next(pi, parent)
            } else {
                self.node(c)
            };
            return (n.local.load(Ordering::Relaxed) == local).then_some((c, n));
        }
        children::find_child(word, local, &|i| self.local_of(i), guard).map(|c| (c, self.node(c)))
    }

    /// Lock-free longest-prefix scoring (INDEXER.md §3.5). Always exact: `early_exit` may only
    /// lower a score, and an exact score is a valid lower bound that also matches every value
    /// Dynamo 1.6.1 was measured to return (S1, S7).
    pub(crate) fn find_matches(&self, seq: &[LocalBlockHash]) -> OverlapScores {
        let mut out = OverlapScores::default();
        let Some(first_hash) = seq.first() else {
            return out;
        };
        let guard = epoch::pin();
        let Some((first_i, first)) = self.child_of(ROOT, self.node(ROOT), first_hash.0, &guard)
        else {
            return out;
        };
        let first_members = Members::from_word(first.members.load(Ordering::Acquire), &guard);
        let mut active = ActiveSet::from_members(first_members);
        let mut scored: Vec<(u32, u32)> = Vec::new();
        let mut depth = 1u32;
        let mut cur = first;
        let mut cur_i = first_i;
        let mut rest = seq[1..].iter();
        while !active.is_empty() {
            if let ActiveSet::Few(v) = &active {
                if let [slot] = v[..] {
                    // One worker left (the common tail of a long query): a tight loop with no
                    // set bookkeeping.
                    for h in rest.by_ref() {
                        let Some((ci, c)) = self.child_of(cur_i, cur, h.0, &guard) else {
                            break;
                        };
                        let m = Members::from_word(c.members.load(Ordering::Acquire), &guard);
                        if !m.contains(slot) {
                            break;
                        }
                        depth += 1;
                        cur = c;
                        cur_i = ci;
                    }
                    break;
                }
            }
            let Some(h) = rest.next() else {
                break;
            };
            let Some((ci, c)) = self.child_of(cur_i, cur, h.0, &guard) else {
                break;
            };
            let m = Members::from_word(c.members.load(Ordering::Acquire), &guard);
            active.intersect(m, |slot| scored.push((slot, depth)));
            if active.is_empty() {
                break;
            }
            depth += 1;
            cur = c;
            cur_i = ci;
        }
        active.for_each(|slot| scored.push((slot, depth)));
        out.scores.reserve(scored.len());
        for (slot, score) in scored {
            out.scores.insert(self.slots.stream_of(slot), score);
        }
        out
    }

    /// A node's children, largest local hash first, so that a LIFO walk visits them in ascending
    /// order: dumps come out the same whatever the insertion history.
    fn sorted_children(&self, node: &Node, guard: &Guard) -> Vec<u32> {
        let mut v = Vec::new();
        children::for_each_child(node.children.load(Ordering::Acquire), guard, |c| v.push(c));
        v.sort_unstable_by_key(|&c| std::cmp::Reverse(self.local_of(c)));
        v
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
        let ext_of = |slot: u32, n: u32| {
            exceptions
                .get(&(slot, n))
                .copied()
                .unwrap_or_else(|| self.ext_of(n))
        };
        let mut pending: Vec<Pending> = Vec::new();
        // slot -> (index in `pending`, node that event currently ends with)
        let mut open: HashMap<u32, (usize, u32)> = HashMap::new();
        let mut stack: Vec<(u32, Option<Rc<Vec<u32>>>)> = Vec::new();
        for c in self.sorted_children(self.node(ROOT), &guard) {
            stack.push((c, None));
        }
        while let Some((n, parent_reach)) = stack.pop() {
            let node = self.node(n);
            if node.state.load(Ordering::Acquire) & LIVE == 0 {
                continue;
            }
            let m = Members::from_word(node.members.load(Ordering::Acquire), &guard);
            let mut reach: Vec<u32> = match &parent_reach {
                None => m.to_vec(),
                Some(pr) => pr.iter().copied().filter(|&s| m.contains(s)).collect(),
            };
            if reach.is_empty() {
                continue;
            }
            // Deterministic output: streams by identity (slot numbers depend on arrival order).
            reach.sort_unstable_by_key(|&s| self.slots.stream_of(s));
            let p = node.parent.load(Ordering::Relaxed);
            let local = LocalBlockHash(node.local.load(Ordering::Relaxed));
            for &s in &reach {
                let block = KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(ext_of(s, n)),
                    tokens_hash: local,
                    mm_extra_info: None,
                };
                match open.get_mut(&s) {
                    Some((idx, tail)) if *tail == p && p != ROOT => {
                        pending[*idx].blocks.push(block);
                        *tail = n;
                    }
                    _ => {
                        pending.push(Pending {
                            slot: s,
                            parent: (p != ROOT).then(|| ext_of(s, p)),
                            blocks: vec![block],
                        });
                        open.insert(s, (pending.len() - 1, n));
                    }
                }
            }
            let reach = Rc::new(reach);
            for c in self.sorted_children(node, &guard) {
                stack.push((c, Some(Rc::clone(&reach))));
            }
        }
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

    /// An exact image of the tree (call at a barrier for a consistent one).
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
        let mut nodes = Vec::new();
        let mut stack: Vec<(u32, Option<u32>)> = Vec::new();
        children::for_each_child(
            self.node(ROOT).children.load(Ordering::Acquire),
            &guard,
            |c| stack.push((c, None)),
        );
        while let Some((n, parent)) = stack.pop() {
            let node = self.node(n);
            if node.state.load(Ordering::Acquire) & LIVE == 0 {
                continue;
            }
            let mut holders = Vec::new();
            Members::from_word(node.members.load(Ordering::Acquire), &guard).for_each(|slot| {
                if let Some(&stream) = stream_index.get(&slot) {
                    holders.push(SnapshotHolder {
                        stream,
                        private_ext: exceptions
                            .get(&(slot, n))
                            .map(|&e| ExternalSequenceBlockHash(e)),
                    });
                }
            });
            let me = nodes.len() as u32;
            nodes.push(SnapshotNode {
                parent,
                local: LocalBlockHash(node.local.load(Ordering::Relaxed)),
                ext: ExternalSequenceBlockHash(self.ext_of(n)),
                holders,
            });
            children::for_each_child(node.children.load(Ordering::Acquire), &guard, |c| {
                stack.push((c, Some(me)))
            });
        }
        IndexSnapshot {
            streams: streams.into_iter().map(|(s, _)| s).collect(),
            nodes,
            lower: Vec::new(),
        }
    }

    /// Rebuild an image into this (empty) tree. Returns the stream states, for the event
    /// threads to adopt. Nodes must come parents first (as `snapshot` writes them).
    pub(crate) fn restore(
        &self,
        snap: &IndexSnapshot,
    ) -> Result<HashMap<WorkerWithDpRank, StreamState>, KvCacheEventError> {
        let guard = epoch::pin();
        let mut states: Vec<StreamState> = Vec::with_capacity(snap.streams.len());
        for s in &snap.streams {
            states.push(StreamState::new(self.slots.assign(*s)?));
        }
        let mut index: Vec<u32> = Vec::with_capacity(snap.nodes.len());
        let mut cache = Vec::new();
        for n in &snap.nodes {
            let parent = match n.parent {
                None => ROOT,
                Some(p) => *index
                    .get(p as usize)
                    .ok_or(KvCacheEventError::IndexerInvariantViolation)?,
            };
            let mut slots = Vec::with_capacity(n.holders.len());
            for h in &n.holders {
                let st = states
                    .get(h.stream as usize)
                    .ok_or(KvCacheEventError::IndexerInvariantViolation)?;
                if !slots.contains(&st.slot) {
                    slots.push(st.slot);
                }
            }
            let (local, ext) = (n.local.0, n.ext.0);
            self.lock(parent);
            let pw = self.node(parent).children.load(Ordering::Relaxed);
            if children::find_child(pw, local, &|i| self.local_of(i), &guard).is_some() {
                self.unlock(parent);
                return Err(KvCacheEventError::IndexerInvariantViolation);
            }
            let c = match self.alloc_node(&mut cache, local, ext, parent, members::encode(&slots)) {
                Ok(c) => c,
                Err(e) => {
                    self.unlock(parent);
                    return Err(e);
                }
            };
            if let Some(nw) = children::insert_child(pw, local, c, &|i| self.local_of(i), &guard) {
                self.node(parent).children.store(nw, Ordering::Release);
            }
            self.unlock(c);
            self.unlock(parent);
            for h in &n.holders {
                let st = &mut states[h.stream as usize];
                st.blocks += 1;
                match h.private_ext {
                    Some(e) if !self.canonical_for(c, e.0) => self.set_exception(st, c, e.0),
                    None if !self.canonical_for(c, ext) => self.set_exception(st, c, ext),
                    _ => {}
                }
            }
            index.push(c);
        }
        for st in &states {
            self.slots
                .entry(st.slot)
                .blocks
                .store(st.blocks, Ordering::Relaxed);
        }
        Ok(snap.streams.iter().copied().zip(states).collect())
    }

    /// Current memory use of this tree.
    pub(crate) fn memory(&self) -> MemoryReport {
        let guard = epoch::pin();
        let mut heap = 0usize;
        let mut live = 0usize;
        let high = self.nodes.high_water();
        for i in 1..high {
            let node = self.node(i);
            if node.state.load(Ordering::Acquire) & LIVE == 0 {
                continue;
            }
            live += 1;
            let mw = node.members.load(Ordering::Acquire);
            if let Members::Bits(bits) = Members::from_word(mw, &guard) {
                heap += (bits.len() + 2) * 8;
            }
            heap += children::heap_bytes(node.children.load(Ordering::Acquire), &guard);
        }
        let map_bytes: usize = self
            .ext_map
            .iter()
            .map(|m| m.lock().map(|t| t.capacity() * 5).unwrap_or(0))
            .sum();
        MemoryReport {
            node_bytes: self.nodes.allocated_bytes() + self.exts.allocated_bytes(),
            heap_bytes: heap + map_bytes,
            live_nodes: live,
        }
    }
}

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
    fn a_node_is_32_bytes_so_none_straddles_a_cache_line() {
        assert_eq!(std::mem::size_of::<super::Node>(), 32);
        assert_eq!(64 % std::mem::size_of::<super::Node>(), 0);
    }
}

/// Reader-side probes for the loom models (loom-tests/): the same loads, in the same order and
/// with the same orderings, as `find_matches`, but reporting what they saw instead of scoring.
#[cfg(loom)]
impl Tree {
    /// The node a lock-free reader reaches from the root by following local hashes `path`.
    pub(crate) fn loom_walk(&self, path: &[u64], guard: &Guard) -> Option<u32> {
        let mut cur = ROOT;
        for &h in path {
            let word = self.node(cur).children.load(Ordering::Acquire);
            cur = children::find_child(word, h, &|i| self.local_of(i), guard)?;
        }
        Some(cur)
    }

    /// The children of node `i` as a reader sees them (whatever their keys).
    pub(crate) fn loom_children(&self, i: u32, guard: &Guard) -> Vec<u32> {
        let mut out = Vec::new();
        children::for_each_child(self.node(i).children.load(Ordering::Acquire), guard, |c| {
            out.push(c)
        });
        out
    }

    /// Node `i` as a reader sees it: its local hash and its holders' slots.
    pub(crate) fn loom_read(&self, i: u32, guard: &Guard) -> (u64, Vec<u32>) {
        let node = self.node(i);
        let holders = Members::from_word(node.members.load(Ordering::Acquire), guard).to_vec();
        (self.local_of(i), holders)
    }
}

/// Read-only support for the lower-tier walk (engine/src/lower_tiers.rs). Kept apart so that it
/// survives a rework of the tree: it needs only "walk `seq` from the root by local hash, and tell
/// me the external hash under which stream S holds the block at depth d" (the stream's private
/// hash when it has one, else the node's shared one).
impl Tree {
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
        let mut path: Vec<u32> = Vec::with_capacity(max);
        let mut cur = ROOT;
        for h in seq.iter().take(max) {
            let word = self.node(cur).children.load(Ordering::Acquire);
            let next = match children::single_child(word) {
                Some(c) => (self.local_of(c) == h.0).then_some(c),
                None => children::find_child(word, h.0, &|i| self.local_of(i), &guard),
            };
            let Some(c) = next else { break };
            path.push(c);
            cur = c;
        }
        let held: Vec<Option<(u32, u32)>> = wanted
            .iter()
            .map(|(stream, d)| {
                let n = *path.get((*d as usize).checked_sub(1)?)?;
                let members =
                    Members::from_word(self.node(n).members.load(Ordering::Acquire), &guard);
                let mut slot = None;
                members.for_each(|s| {
                    if slot.is_none() && self.slots.stream_of(s) == *stream {
                        slot = Some(s);
                    }
                });
                slot.map(|s| (s, n))
            })
            .collect();
        if held.iter().all(Option::is_none) {
            return vec![None; wanted.len()];
        }
        let exceptions = self.exceptions.lock().unwrap_or_else(|e| e.into_inner());
        held.into_iter()
            .map(|h| {
                h.map(|(slot, n)| {
                    exceptions
                        .get(&(slot, n))
                        .copied()
                        .unwrap_or_else(|| self.ext_of(n))
                })
            })
            .collect()
    }
}
