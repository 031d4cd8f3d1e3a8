//! The engine: namespaces, event threads and the lock-free query path.
//!
//! An [`Engine`] owns the event threads shared by all namespaces; a [`Namespace`] is a handle on
//! one (model, routing group) index with its own block size. Events are routed to the event
//! thread that owns their stream (sticky, round-robin on first sight); queries run on the
//! caller's thread and take no lock.

use crate::counters::{EventCounters, EventCountsSnapshot};
use crate::error::{EngineError, KvCacheEventError};
use crate::hashing::{compute_block_hash_for_seq, HashOptions};
use crate::lanes::{Lanes, NsShared, StreamFilter, Task};
use crate::lower_tiers::{TierDepths, TieredScores};
use crate::protocol::{
    LocalBlockHash, OverlapScores, RouterEvent, StorageTier, WorkerId, WorkerWithDpRank,
};
use crate::snapshot::IndexSnapshot;
use crate::tree::{MemoryReport, Tree};
use crossbeam_epoch::{self as epoch, Atomic, Owned};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of event threads (default: available cores).
    pub event_threads: usize,
    /// Capacity of each event thread's queue, in tasks (backpressure beyond it).
    pub queue_capacity: usize,
    /// Distinct blocks one namespace is expected to hold at its peak: at most workers ×
    /// blocks per worker, less when workers share prefixes. Each namespace's `external hash ->
    /// block` map is sized for it up front, so it does not grow (re-placing every entry under
    /// a shard lock) while the index fills; past it, the map grows as usual. About 11.5 bytes
    /// per expected block, allocated when the namespace is created. 0 (the default): start
    /// empty and grow. At most [`MAX_EXPECTED_BLOCKS`] (larger values are clamped to it).
    /// Applies to every namespace; to size only some, leave it 0 and call
    /// [`Namespace::presize_map`] on those.
    pub expected_blocks: usize,
}

/// The most blocks `EngineConfig::expected_blocks` can ask for: block ids are 32-bit, so no
/// namespace holds more.
pub const MAX_EXPECTED_BLOCKS: usize = u32::MAX as usize;

/// Bytes the map of one namespace takes up front for `expected_blocks` (the `--expected-blocks`
/// cost that operators see in the start-up log).
pub fn expected_blocks_map_bytes(expected_blocks: usize) -> usize {
    crate::tree::map_bytes_for(expected_blocks.min(MAX_EXPECTED_BLOCKS))
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            event_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            queue_capacity: 16_384,
            expected_blocks: 0,
        }
    }
}

/// Identifies one index: a model and a routing group (tenant), each with its own block size.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceKey {
    pub model_name: String,
    pub routing_group: String,
}

impl NamespaceKey {
    pub fn new(model_name: impl Into<String>, routing_group: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            routing_group: routing_group.into(),
        }
    }
}

impl std::fmt::Display for NamespaceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.model_name, self.routing_group)
    }
}

/// What the registry keeps of a namespace: its parts, not a `Namespace` handle, because a handle
/// holds the engine and the engine holds the registry (a cycle that would keep the event threads
/// alive after the last outside handle is dropped).
#[derive(Clone)]
struct NsParts {
    shared: Arc<NsShared>,
    meta: Arc<NsMeta>,
}

type Registry = HashMap<NamespaceKey, NsParts>;

struct EngineInner {
    lanes: Lanes,
    /// Read lock-free by `Engine::namespace`; replaced whole under `registry_write`.
    registry: Atomic<Registry>,
    registry_write: Mutex<()>,
    next_ns_id: AtomicU64,
    next_lane: AtomicUsize,
    expected_blocks: usize,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.lanes.shutdown();
        // SAFETY: `&mut self`: no other thread can hold a guard-protected reference into the
        // registry of an engine being dropped (every Namespace handle holds an Arc to it).
        unsafe {
            let guard = epoch::unprotected();
            let old = self
                .registry
                .swap(epoch::Shared::null(), Ordering::AcqRel, guard);
            if !old.is_null() {
                drop(old.into_owned());
            }
        }
    }
}

/// The index engine: owns the event threads shared by all namespaces. Dropping the last handle
/// (engine and namespaces) drains and stops the threads.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

impl Engine {
    /// Start the event threads.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            inner: Arc::new(EngineInner {
                lanes: Lanes::start(cfg.event_threads.max(1), cfg.queue_capacity),
                registry: Atomic::new(HashMap::new()),
                registry_write: Mutex::new(()),
                next_ns_id: AtomicU64::new(1),
                next_lane: AtomicUsize::new(0),
                expected_blocks: cfg.expected_blocks.min(MAX_EXPECTED_BLOCKS),
            }),
        }
    }

    /// Number of event threads.
    pub fn event_threads(&self) -> usize {
        self.inner.lanes.count()
    }

    /// Create a namespace, or return the existing one if it has the same block size.
    pub fn create_namespace(
        &self,
        key: NamespaceKey,
        block_size: u32,
    ) -> Result<Namespace, EngineError> {
        if block_size == 0 {
            return Err(EngineError::InvalidBlockSize);
        }
        if block_size == 1 {
            tracing::warn!("block_size=1 is supported for KV indexers, but consider avoiding it because KV events may saturate network bandwidth");
        }
        let _w = self
            .inner
            .registry_write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(ns) = self.namespace(&key) {
            if ns.block_size() != block_size {
                return Err(EngineError::BlockSizeMismatch {
                    namespace: key.to_string(),
                    existing: ns.block_size(),
                    requested: block_size,
                });
            }
            return Ok(ns);
        }
        let ns = Namespace {
            shared: Arc::new(NsShared {
                id: self.inner.next_ns_id.fetch_add(1, Ordering::Relaxed),
                tree: Tree::with_expected_blocks(self.inner.expected_blocks),
                lower: Default::default(),
                counters: EventCounters::default(),
            }),
            meta: Arc::new(NsMeta {
                key: key.clone(),
                block_size,
                routes: RwLock::new(HashMap::new()),
            }),
            engine: Arc::clone(&self.inner),
        };
        self.update_registry(|r| {
            r.insert(
                key,
                NsParts {
                    shared: Arc::clone(&ns.shared),
                    meta: Arc::clone(&ns.meta),
                },
            );
        });
        Ok(ns)
    }

    fn update_registry(&self, f: impl FnOnce(&mut Registry)) {
        let guard = epoch::pin();
        let cur = self.inner.registry.load(Ordering::Acquire, &guard);
        // SAFETY: `cur` is protected by `guard`; the registry is never null while the engine
        // lives (it is replaced, never cleared, except in Drop).
        let mut next = unsafe { cur.as_ref() }.cloned().unwrap_or_default();
        f(&mut next);
        // Release: the new map's contents are visible to readers that load it (Acquire).
        let old = self
            .inner
            .registry
            .swap(Owned::new(next), Ordering::AcqRel, &guard);
        // SAFETY: `old` is unreachable from now on; readers pinned before the swap may still
        // read it, and `defer_destroy` waits for them.
        unsafe { guard.defer_destroy(old) };
    }

    /// Lock-free lookup of a namespace handle.
    pub fn namespace(&self, key: &NamespaceKey) -> Option<Namespace> {
        let guard = epoch::pin();
        let cur = self.inner.registry.load(Ordering::Acquire, &guard);
        // SAFETY: protected by `guard` (see `update_registry`).
        unsafe { cur.as_ref() }
            .and_then(|r| r.get(key))
            .map(|p| Namespace {
                shared: Arc::clone(&p.shared),
                meta: Arc::clone(&p.meta),
                engine: Arc::clone(&self.inner),
            })
    }

    /// Remove a namespace: its streams are dropped from every event thread.
    pub fn remove_namespace(&self, key: &NamespaceKey) -> Result<(), EngineError> {
        let _w = self
            .inner
            .registry_write
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(ns) = self.namespace(key) else {
            return Ok(());
        };
        self.update_registry(|r| {
            r.remove(key);
        });
        let id = ns.shared.id;
        self.inner
            .lanes
            .broadcast(|done| Task::DropNamespace { ns_id: id, done })
    }

    /// Every namespace, sorted.
    pub fn namespaces(&self) -> Vec<NamespaceKey> {
        let guard = epoch::pin();
        let cur = self.inner.registry.load(Ordering::Acquire, &guard);
        // SAFETY: protected by `guard`.
        let mut keys: Vec<_> = unsafe { cur.as_ref() }
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Barrier over every namespace: all events accepted before the call are applied.
    pub fn flush(&self) -> Result<(), EngineError> {
        self.inner.lanes.broadcast(Task::Barrier)
    }

    /// Stop the event threads (after they drain what is queued). Later calls get `Offline`.
    pub fn shutdown(&self) {
        self.inner.lanes.shutdown();
    }

    /// Whether the event threads are gone (shut down or died).
    pub fn is_offline(&self) -> bool {
        self.inner.lanes.is_offline()
    }

    /// Tasks waiting in all event queues.
    pub fn queued_tasks(&self) -> usize {
        self.inner.lanes.queued()
    }

    /// Number of live handles on this engine's shared state (engines and namespaces), for tests
    /// that check nothing keeps the engine alive after its last handle is gone.
    #[doc(hidden)]
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Test hook: block every event thread until the returned guard is dropped, so that a test
    /// can fill the bounded queues deterministically.
    #[doc(hidden)]
    pub fn pause_event_threads(&self) -> Result<PauseGuard, EngineError> {
        let mut resume = Vec::new();
        for lane in 0..self.inner.lanes.count() {
            resume.push(self.inner.lanes.pause(lane)?);
        }
        Ok(PauseGuard { _resume: resume })
    }

    /// Test hook: make event thread `lane` panic, to check that callers get errors, not panics.
    #[doc(hidden)]
    pub fn inject_event_thread_panic(&self, lane: usize) -> Result<(), EngineError> {
        self.inner.lanes.inject_panic(lane)
    }
}

/// Keeps the event threads paused (test hook); they resume when it is dropped.
#[doc(hidden)]
pub struct PauseGuard {
    _resume: Vec<crate::sync::channel::Sender<()>>,
}

struct NsMeta {
    key: NamespaceKey,
    block_size: u32,
    /// Sticky stream -> event thread assignment; entries are never removed, so a stream's
    /// removal and later return share one FIFO.
    routes: RwLock<HashMap<WorkerWithDpRank, usize>>,
}

/// A handle to one namespace's index. Cheap to clone.
#[derive(Clone)]
pub struct Namespace {
    shared: Arc<NsShared>,
    meta: Arc<NsMeta>,
    engine: Arc<EngineInner>,
}

impl Namespace {
    /// The (model, routing group) of this index.
    pub fn key(&self) -> &NamespaceKey {
        &self.meta.key
    }

    /// Tokens per block in this namespace.
    pub fn block_size(&self) -> u32 {
        self.meta.block_size
    }

    fn lane_of(&self, stream: WorkerWithDpRank) -> usize {
        if let Some(&l) = self
            .meta
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&stream)
        {
            return l;
        }
        let mut routes = self.meta.routes.write().unwrap_or_else(|e| e.into_inner());
        let n = self.engine.lanes.count();
        *routes
            .entry(stream)
            .or_insert_with(|| self.engine.next_lane.fetch_add(1, Ordering::Relaxed) % n)
    }

    fn event_task(
        &self,
        event: RouterEvent,
        reply: Option<crate::sync::channel::Sender<Result<(), KvCacheEventError>>>,
    ) -> Task {
        Task::Event {
            ns: Arc::clone(&self.shared),
            event: Box::new(event),
            reply,
        }
    }

    /// Enqueue an event for its stream's event thread; blocks while that queue is full.
    pub fn apply(&self, event: RouterEvent) -> Result<(), EngineError> {
        let lane = self.lane_of(event.stream());
        self.engine.lanes.send(lane, self.event_task(event, None))
    }

    /// Enqueue without blocking: `QueueFull` when the owning queue is full.
    pub fn try_apply(&self, event: RouterEvent) -> Result<(), EngineError> {
        let lane = self.lane_of(event.stream());
        self.engine
            .lanes
            .try_send(lane, self.event_task(event, None))
    }

    /// Apply and wait for the outcome (`EngineError::Event` when it failed).
    pub fn apply_and_wait(&self, event: RouterEvent) -> Result<(), EngineError> {
        let lane = self.lane_of(event.stream());
        let (tx, rx) = crate::sync::channel::bounded(1);
        self.engine
            .lanes
            .send(lane, self.event_task(event, Some(tx)))?;
        self.engine.lanes.wait(&rx)?.map_err(EngineError::Event)
    }

    /// Lock-free: scores of every (worker, dp_rank) holding a prefix of `sequence`.
    ///
    /// `early_exit` is accepted for API compatibility with Dynamo, where it allows a lower-bound
    /// score once one worker is left; kvindex always returns the exact score (which is such a
    /// lower bound, and what Dynamo 1.6.1 returns in every measured case).
    pub fn find_matches(&self, sequence: &[LocalBlockHash], early_exit: bool) -> OverlapScores {
        let _ = early_exit;
        self.shared.tree.find_matches(sequence)
    }

    /// Hash `tokens` with this namespace's block size and `opts` (LoRA, cache namespace,
    /// multimodal, eagle) and score them: the router's entry point (INDEXER.md §2, §3.5).
    pub fn find_matches_for_tokens(&self, tokens: &[u32], opts: &HashOptions) -> OverlapScores {
        let locals = compute_block_hash_for_seq(tokens, self.meta.block_size, opts);
        self.find_matches(&locals, false)
    }

    /// Tier-aware scores (SERVICE.md §3.6, §6.4): the device scores of [`Namespace::find_matches`]
    /// and the streams whose cumulative device → host_pinned → disk/external continuation goes
    /// further (see [`TieredScores`] for reading both as one view).
    ///
    /// The device walk is lock-free. A namespace without lower-tier blocks stops there (one
    /// relaxed counter read; nothing copied). Otherwise each stream that has some is extended
    /// under short per-stream read locks (see `lower_tiers`), which costs one extra device-path
    /// lookup for those streams.
    pub fn find_matches_tiered(&self, sequence: &[LocalBlockHash]) -> TieredScores {
        let device = self.shared.tree.find_matches(sequence);
        let tiers = self
            .shared
            .lower
            .continue_walk(sequence, &device.scores, |wanted| {
                self.shared.tree.stream_exts_on_path(sequence, wanted)
            });
        TieredScores { device, tiers }
    }

    /// [`Namespace::find_matches_tiered`] without its shortcuts, answered in the representation
    /// it had before them: every device-matched stream copied into a full map of depths, and
    /// every stream that ever had a lower-tier block walked on every tier, even in a namespace
    /// holding no lower-tier block. Exists only so that tests can check the fast path against
    /// it and the `query_tiers` bench can show what the fast path saves; not for serving.
    #[doc(hidden)]
    pub fn find_matches_tiered_exhaustive(
        &self,
        sequence: &[LocalBlockHash],
    ) -> (OverlapScores, HashMap<WorkerWithDpRank, TierDepths>) {
        let device = self.shared.tree.find_matches(sequence);
        let depths =
            self.shared
                .lower
                .continue_walk_exhaustive(sequence, &device.scores, |wanted| {
                    self.shared.tree.stream_exts_on_path(sequence, wanted)
                });
        (device, depths)
    }

    /// [`Namespace::find_matches_tiered`] on tokens hashed as in
    /// [`Namespace::find_matches_for_tokens`].
    pub fn find_matches_tiered_for_tokens(
        &self,
        tokens: &[u32],
        opts: &HashOptions,
    ) -> TieredScores {
        let locals = compute_block_hash_for_seq(tokens, self.meta.block_size, opts);
        self.find_matches_tiered(&locals)
    }

    /// Barrier: returns once every event accepted before the call is applied.
    pub fn flush(&self) -> Result<(), EngineError> {
        self.engine.lanes.broadcast(Task::Barrier)
    }

    fn remove_streams(&self, filter: impl Fn() -> StreamFilter) -> Result<(), EngineError> {
        self.engine.lanes.broadcast(|done| Task::RemoveStreams {
            ns: Arc::clone(&self.shared),
            filter: filter(),
            done,
        })
    }

    /// Drop every rank of `worker_id` (a barrier across all event threads).
    pub fn remove_worker(&self, worker_id: WorkerId) -> Result<(), EngineError> {
        self.remove_streams(|| StreamFilter {
            worker_id,
            dp_rank: None,
            forget: true,
        })
    }

    /// Drop one rank of `worker_id` (a barrier across all event threads).
    pub fn remove_worker_dp_rank(
        &self,
        worker_id: WorkerId,
        dp_rank: u32,
    ) -> Result<(), EngineError> {
        self.remove_streams(|| StreamFilter {
            worker_id,
            dp_rank: Some(dp_rank),
            forget: true,
        })
    }

    /// Drop every block of every rank of `worker_id`, keeping the worker listed.
    pub fn clear_all_blocks(&self, worker_id: WorkerId) -> Result<(), EngineError> {
        self.remove_streams(|| StreamFilter {
            worker_id,
            dp_rank: None,
            forget: false,
        })
    }

    /// Dynamo-compatible dump (a barrier first): the device tier as Stored RouterEvents, parents
    /// before children, reachable blocks only (INDEXER.md §3.6 and §3.8); then the lower tiers
    /// (host_pinned, disk, external), one event per block with its parent hash, `event_id`
    /// renumbered from 0 per tier (SERVICE.md §3.8).
    pub fn dump(&self) -> Result<Vec<RouterEvent>, EngineError> {
        self.flush()?;
        let mut events = self.shared.tree.dump();
        events.extend(self.shared.lower.dump());
        Ok(events)
    }

    /// Sorted, de-duplicated worker ids known to this namespace (possibly with no blocks).
    pub fn get_workers(&self) -> Vec<WorkerId> {
        let mut ids: Vec<_> = self
            .shared
            .tree
            .slots
            .streams()
            .into_iter()
            .map(|(s, _)| s.worker_id)
            .collect();
        ids.dedup();
        ids
    }

    /// Sum over streams of the **device** blocks each holds (Dynamo's `current_size`; lower
    /// tiers are counted by [`Namespace::lower_tier_size`]).
    pub fn current_size(&self) -> usize {
        self.worker_block_counts().iter().map(|(_, n)| n).sum()
    }

    /// Sum over streams and lower tiers (host_pinned, disk, external) of the blocks held there.
    pub fn lower_tier_size(&self) -> usize {
        self.lower_tier_block_counts()
            .iter()
            .map(|(_, _, n)| n)
            .sum()
    }

    /// Lower-tier blocks per (worker, dp_rank, tier), sorted; zero counts omitted.
    pub fn lower_tier_block_counts(&self) -> Vec<(WorkerWithDpRank, StorageTier, usize)> {
        self.shared.lower.block_counts()
    }

    /// **Device** blocks held per (worker, dp_rank), sorted; streams holding nothing are omitted.
    pub fn worker_block_counts(&self) -> Vec<(WorkerWithDpRank, usize)> {
        let slots = &self.shared.tree.slots;
        slots
            .streams()
            .into_iter()
            .map(|(s, slot)| (s, slots.entry(slot).blocks.load(Ordering::Relaxed) as usize))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Outcome counters of the events applied so far.
    pub fn event_counters(&self) -> EventCountsSnapshot {
        self.shared.counters.snapshot()
    }

    /// An exact image of the index, orphans included (a barrier first). For a consistent image
    /// under load, stop intake before calling it.
    pub fn snapshot(&self) -> Result<IndexSnapshot, EngineError> {
        self.flush()?;
        let mut snap = self.shared.tree.snapshot();
        let mut index: HashMap<WorkerWithDpRank, u32> = snap
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i as u32))
            .collect();
        let streams = &mut snap.streams;
        snap.lower = self.shared.lower.snapshot(|s| {
            *index.entry(s).or_insert_with(|| {
                streams.push(s);
                (streams.len() - 1) as u32
            })
        });
        Ok(snap)
    }

    /// Load an image into this namespace, which must hold no block yet.
    pub fn restore(&self, snapshot: &IndexSnapshot) -> Result<(), EngineError> {
        self.flush()?;
        if !self.shared.tree.is_empty() || !self.shared.lower.is_empty() {
            return Err(EngineError::NamespaceNotEmpty);
        }
        // Check the lower tiers before touching anything, so a bad image restores nothing.
        if snapshot
            .lower
            .iter()
            .any(|b| b.tier == StorageTier::Device || b.stream as usize >= snapshot.streams.len())
        {
            return Err(EngineError::Event(
                crate::error::KvCacheEventError::IndexerInvariantViolation,
            ));
        }
        let states = self.shared.tree.restore(snapshot)?;
        self.shared
            .lower
            .restore(&snapshot.streams, &snapshot.lower)?;
        let mut per_lane: HashMap<usize, Vec<_>> = HashMap::new();
        for (stream, st) in states {
            per_lane
                .entry(self.lane_of(stream))
                .or_default()
                .push((stream, st));
        }
        let (tx, rx) = crate::sync::channel::bounded(per_lane.len().max(1));
        let lanes = per_lane.len();
        for (lane, states) in per_lane {
            self.engine.lanes.send(
                lane,
                Task::AdoptStreams {
                    ns: Arc::clone(&self.shared),
                    states,
                    done: tx.clone(),
                },
            )?;
        }
        for _ in 0..lanes {
            self.engine.lanes.wait(&rx)?;
        }
        Ok(())
    }

    /// Size this namespace's `external hash -> block` map for `expected_blocks` distinct
    /// blocks, as [`EngineConfig::expected_blocks`] does at creation for every namespace of an
    /// engine (same cost, same clamp to [`MAX_EXPECTED_BLOCKS`]); a map that large already is
    /// left as it is (never shrunk). It exists for services that pre-size only some
    /// namespaces: kvindex sizes the partitions of registered workers, not those that events
    /// create, so it runs its engine with `expected_blocks` 0 and calls this on the former,
    /// at creation or after recovery rebuilt them. On a namespace holding blocks each map shard
    /// is rebuilt under its lock (every entry re-placed once), and events touching that shard
    /// wait meanwhile; queries never wait. [`Namespace::memory`]'s `map_bytes` shows the result.
    pub fn presize_map(&self, expected_blocks: usize) {
        self.shared
            .tree
            .presize_map(expected_blocks.min(MAX_EXPECTED_BLOCKS));
    }

    /// Bytes of this namespace's `external hash -> block` map: [`Namespace::memory`]'s
    /// `map_bytes` without walking the tree (it takes each map shard's lock in turn), cheap
    /// enough for a metrics scrape. What [`Namespace::presize_map`] and
    /// [`EngineConfig::expected_blocks`] allocate shows here.
    pub fn map_bytes(&self) -> usize {
        self.shared.tree.map_bytes()
    }

    /// Memory used by this namespace's index.
    pub fn memory(&self) -> MemoryReport {
        self.shared.tree.memory()
    }
}
