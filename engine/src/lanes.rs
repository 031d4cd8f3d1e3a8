//! Event threads ("lanes"): each owns a set of streams (worker, dp_rank) and is the only writer
//! of their state, so a stream's events apply in the order they were accepted. Queues are
//! bounded: a full queue blocks the producer (or fails `try_apply`), never grows memory.

use crate::counters::EventCounters;
use crate::error::KvCacheEventError;
use crate::lower_tiers::{LowerTiers, StreamTiers};
use crate::protocol::{KvCacheEventData, RouterEvent, StorageTier, WorkerWithDpRank};
use crate::sync::channel::{self, Receiver, Sender};
use crate::sync::AtomicBool;
use crate::tree::{StreamState, Tree};
use crossbeam_epoch as epoch;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What a namespace shares with the lanes.
pub(crate) struct NsShared {
    pub(crate) id: u64,
    pub(crate) tree: Arc<Tree>,
    /// host_pinned / disk / external blocks, written by the same lanes as the tree.
    pub(crate) lower: LowerTiers,
    pub(crate) counters: EventCounters,
}

/// Which streams to drop, for `remove_worker*` and `clear_all_blocks`.
pub(crate) struct StreamFilter {
    pub(crate) worker_id: u64,
    pub(crate) dp_rank: Option<u32>,
    /// Forget the stream (remove_worker) or keep it listed with no blocks (clear_all_blocks).
    pub(crate) forget: bool,
}

/// One unit of work for a lane.
pub(crate) enum Task {
    Event {
        ns: Arc<NsShared>,
        /// Boxed: each lane's bounded queue allocates all its slots up front, each the size of
        /// the largest task, so an inline event would cost ~3 MB per lane before any event.
        event: Box<RouterEvent>,
        reply: Option<Sender<Result<(), KvCacheEventError>>>,
    },
    RemoveStreams {
        ns: Arc<NsShared>,
        filter: StreamFilter,
        done: Sender<()>,
    },
    DropNamespace {
        ns_id: u64,
        done: Sender<()>,
    },
    /// Take ownership of restored stream states (snapshot load).
    AdoptStreams {
        ns: Arc<NsShared>,
        states: Vec<(WorkerWithDpRank, StreamState)>,
        done: Sender<()>,
    },
    Barrier(Sender<()>),
    /// Test hook: make the lane panic, to exercise the offline path.
    Panic,
    /// Test hook: block the lane until the sender side is dropped (to fill its queue).
    Pause {
        entered: Sender<()>,
        resume: Receiver<()>,
    },
    Shutdown,
}

struct Lane {
    streams: HashMap<(u64, WorkerWithDpRank), StreamState>,
    /// This lane's handles on its streams' lower tiers (the namespace registry is the truth;
    /// this only saves its lock per event).
    lower: HashMap<(u64, WorkerWithDpRank), Arc<StreamTiers>>,
}

impl Lane {
    /// The lower tiers of `stream`: cached, else the namespace's (restored ones included), else
    /// new ones (`create`); `None` when the stream has none and `create` is false.
    fn lower_of(
        &mut self,
        ns: &Arc<NsShared>,
        stream: WorkerWithDpRank,
        create: bool,
    ) -> Option<Arc<StreamTiers>> {
        let key = (ns.id, stream);
        if let Some(st) = self.lower.get(&key) {
            return Some(Arc::clone(st));
        }
        let st = if create {
            Some(ns.lower.get_or_create(stream))
        } else {
            ns.lower.get(stream)
        }?;
        self.lower.insert(key, Arc::clone(&st));
        Some(st)
    }

    /// Clear every lower tier of `stream` (AllBlocksCleared covers all tiers, SERVICE.md §5.3).
    fn clear_lower(&mut self, ns: &Arc<NsShared>, stream: WorkerWithDpRank) {
        if let Some(lt) = self.lower_of(ns, stream, false) {
            ns.lower.clear(&lt);
        }
    }

    /// Apply a store or remove on a lower tier.
    fn apply_lower(
        &mut self,
        ns: &Arc<NsShared>,
        stream: WorkerWithDpRank,
        tier: StorageTier,
        data: &KvCacheEventData,
    ) -> Result<(), KvCacheEventError> {
        let lt = self
            .lower_of(ns, stream, true)
            .ok_or(KvCacheEventError::IndexerInvariantViolation)?;
        let outcome = ns.lower.apply(&lt, tier, data)?;
        if outcome.duplicate {
            ns.counters.record_duplicate_store();
        }
        Ok(())
    }

    fn apply(&mut self, ns: &Arc<NsShared>, event: &RouterEvent) -> Result<(), KvCacheEventError> {
        let stream = event.stream();
        if let std::collections::hash_map::Entry::Vacant(v) = self.streams.entry((ns.id, stream)) {
            // Any event, on any tier, makes its stream known (listed by get_workers).
            let slot = ns.tree.slots.assign(stream)?;
            v.insert(StreamState::new(slot));
        }
        let tier = event.index_tier()?;
        match (&event.event.data, tier) {
            (KvCacheEventData::Cleared, _) => self.clear_lower(ns, stream),
            (data, StorageTier::HostPinned | StorageTier::Disk | StorageTier::External) => {
                return self.apply_lower(ns, stream, tier, data);
            }
            (_, StorageTier::Device) => {}
        }
        let Some(st) = self.streams.get_mut(&(ns.id, stream)) else {
            return Err(KvCacheEventError::IndexerInvariantViolation);
        };
        let mut guard = epoch::pin();
        let result = match &event.event.data {
            KvCacheEventData::Stored(data) => ns.tree.store(st, data, &guard).map(|o| {
                if o.duplicate {
                    ns.counters.record_duplicate_store();
                }
            }),
            KvCacheEventData::Removed(data) => ns.tree.remove(st, &data.block_hashes, &guard),
            KvCacheEventData::Cleared => {
                ns.tree.clear(st, &mut guard);
                Ok(())
            }
        };
        ns.tree.release_unlinked(st, &guard);
        if let Err(KvCacheEventError::ParentBlockNotFound) = result {
            tracing::warn!(
                worker_id = stream.worker_id,
                dp_rank = stream.dp_rank,
                event_id = event.event.event_id,
                "Failed to find parent block; skipping store operation"
            );
        }
        ns.tree
            .slots
            .entry(st.slot)
            .blocks
            .store(st.blocks, std::sync::atomic::Ordering::Relaxed);
        result
    }

    fn remove_streams(&mut self, ns: &Arc<NsShared>, filter: &StreamFilter) {
        let keys: Vec<_> = self
            .streams
            .keys()
            .filter(|(id, s)| {
                *id == ns.id
                    && s.worker_id == filter.worker_id
                    && filter.dp_rank.is_none_or(|d| d == s.dp_rank)
            })
            .copied()
            .collect();
        let mut guard = epoch::pin();
        for key in keys {
            let Some(st) = self.streams.get_mut(&key) else {
                continue;
            };
            ns.tree.clear(st, &mut guard);
            ns.tree.release_unlinked(st, &guard);
            ns.tree
                .slots
                .entry(st.slot)
                .blocks
                .store(0, std::sync::atomic::Ordering::Relaxed);
            if filter.forget {
                self.lower.remove(&key);
                ns.lower.forget(key.1);
            } else if let Some(lt) = self
                .lower
                .get(&key)
                .cloned()
                .or_else(|| ns.lower.get(key.1))
            {
                ns.lower.clear(&lt);
            }
            let Some(st) = self.streams.get_mut(&key) else {
                continue;
            };
            if filter.forget {
                ns.tree.return_cache(st);
                let slot = st.slot;
                self.streams.remove(&key);
                ns.tree.slots.unregister(key.1);
                let tree = Arc::clone(&ns.tree);
                // The slot is out of every node now; reuse it only after pinned readers leave.
                guard.defer(move || tree.slots.recycle(slot));
            }
        }
    }
}

/// Handle to the running lanes.
pub(crate) struct Lanes {
    senders: Vec<Sender<Task>>,
    threads: std::sync::Mutex<Vec<crate::sync::thread::JoinHandle<()>>>,
    offline: Arc<AtomicBool>,
}

impl Lanes {
    pub(crate) fn start(count: usize, capacity: usize) -> Lanes {
        let offline = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let (tx, rx) = channel::bounded(capacity.max(1));
            senders.push(tx);
            let lane_offline = Arc::clone(&offline);
            let handle = crate::sync::thread::Builder::new()
                .name(format!("kvindex-event-{i}"))
                .spawn(move || run_lane(rx, lane_offline))
                .ok();
            match handle {
                Some(h) => threads.push(h),
                None => {
                    tracing::error!("failed to spawn event thread {i}; indexer is offline");
                    offline_flag_set(&offline);
                }
            }
        }
        Lanes {
            senders,
            threads: std::sync::Mutex::new(threads),
            offline,
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.senders.len()
    }

    pub(crate) fn is_offline(&self) -> bool {
        self.offline.load(Ordering::Acquire)
    }

    /// Enqueue on one lane, blocking while its queue is full.
    pub(crate) fn send(&self, lane: usize, task: Task) -> Result<(), crate::EngineError> {
        if self.is_offline() {
            return Err(crate::EngineError::Offline);
        }
        self.senders[lane % self.senders.len()]
            .send(task)
            .map_err(|_| crate::EngineError::Offline)
    }

    /// Enqueue without blocking.
    pub(crate) fn try_send(&self, lane: usize, task: Task) -> Result<(), crate::EngineError> {
        if self.is_offline() {
            return Err(crate::EngineError::Offline);
        }
        self.senders[lane % self.senders.len()]
            .try_send(task)
            .map_err(|e| match e {
                channel::TrySendError::Full(_) => crate::EngineError::QueueFull,
                channel::TrySendError::Disconnected(_) => crate::EngineError::Offline,
            })
    }

    /// Send a task built per lane to every lane and wait until all have run it.
    pub(crate) fn broadcast(
        &self,
        mut make: impl FnMut(Sender<()>) -> Task,
    ) -> Result<(), crate::EngineError> {
        let (tx, rx) = channel::bounded(self.senders.len());
        for lane in 0..self.senders.len() {
            self.send(lane, make(tx.clone()))?;
        }
        drop(tx);
        for _ in 0..self.senders.len() {
            self.wait(&rx)?;
        }
        Ok(())
    }

    /// Wait for a reply from a lane. A lane that died leaves its queued tasks (and their reply
    /// senders) in a channel nobody drains, so waiters also watch the offline flag.
    pub(crate) fn wait<T>(&self, rx: &Receiver<T>) -> Result<T, crate::EngineError> {
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(v) => return Ok(v),
                Err(channel::RecvTimeoutError::Disconnected) => {
                    return Err(crate::EngineError::Offline)
                }
                Err(channel::RecvTimeoutError::Timeout) => {
                    if self.is_offline() {
                        // One last look: the reply may have raced with the flag.
                        return rx.try_recv().map_err(|_| crate::EngineError::Offline);
                    }
                }
            }
        }
    }

    /// Total tasks waiting in all queues.
    pub(crate) fn queued(&self) -> usize {
        self.senders.iter().map(|s| s.len()).sum()
    }

    pub(crate) fn shutdown(&self) {
        for s in &self.senders {
            let _ = s.send(Task::Shutdown);
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        offline_flag_set(&self.offline);
    }

    pub(crate) fn inject_panic(&self, lane: usize) -> Result<(), crate::EngineError> {
        self.send(lane, Task::Panic)
    }

    pub(crate) fn pause(&self, lane: usize) -> Result<Sender<()>, crate::EngineError> {
        let (tx, rx) = channel::bounded(1);
        let (entered_tx, entered_rx) = channel::bounded(1);
        self.send(
            lane,
            Task::Pause {
                entered: entered_tx,
                resume: rx,
            },
        )?;
        // Once the lane runs the pause, its queue is empty and stays so until the test fills it.
        self.wait(&entered_rx)?;
        Ok(tx)
    }
}

fn offline_flag_set(flag: &AtomicBool) {
    // Release: callers that observe the flag also observe why (logged before).
    flag.store(true, Ordering::Release);
}

fn run_lane(rx: Receiver<Task>, offline: Arc<AtomicBool>) {
    let mut lane = Lane {
        streams: HashMap::new(),
        lower: HashMap::new(),
    };
    while let Ok(task) = rx.recv() {
        if matches!(task, Task::Shutdown) {
            return;
        }
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_task(&mut lane, task)));
        if outcome.is_err() {
            tracing::error!(
                "KV indexer event thread panicked; indexer is now offline and will not process events"
            );
            offline_flag_set(&offline);
            return;
        }
    }
}

fn run_task(lane: &mut Lane, task: Task) {
    match task {
        Task::Event { ns, event, reply } => {
            let result = lane.apply(&ns, &event);
            ns.counters.record(event.event.data.kind_label(), &result);
            if let Err(e) = &result {
                tracing::debug!(worker_id = event.worker_id, error = %e, "Failed to apply event");
            }
            if let Some(reply) = reply {
                let _ = reply.send(result);
            }
        }
        Task::RemoveStreams { ns, filter, done } => {
            lane.remove_streams(&ns, &filter);
            let _ = done.send(());
        }
        Task::DropNamespace { ns_id, done } => {
            lane.streams.retain(|(id, _), _| *id != ns_id);
            lane.lower.retain(|(id, _), _| *id != ns_id);
            let _ = done.send(());
        }
        Task::AdoptStreams { ns, states, done } => {
            for (stream, st) in states {
                lane.streams.insert((ns.id, stream), st);
            }
            let _ = done.send(());
        }
        Task::Barrier(done) => {
            let _ = done.send(());
        }
        Task::Panic => panic!("injected event-thread panic (test hook)"),
        Task::Pause { entered, resume } => {
            let _ = entered.send(());
            // Returns when the test drops its sender (or sends).
            let _ = resume.recv();
        }
        Task::Shutdown => {}
    }
}

/// The production event-thread code on a model's tiny state (loom-tests/ only): one lane's
/// private stream table, applying events exactly as `run_lane` does.
#[cfg(loom)]
pub(crate) struct LoomLane(Lane);

#[cfg(loom)]
impl LoomLane {
    pub(crate) fn new() -> Self {
        LoomLane(Lane {
            streams: HashMap::new(),
            lower: HashMap::new(),
        })
    }

    pub(crate) fn apply(
        &mut self,
        ns: &Arc<NsShared>,
        event: &RouterEvent,
    ) -> Result<(), KvCacheEventError> {
        self.0.apply(ns, event)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::Task;

    /// Queue slots are allocated up front at the size of the largest task: keep it small.
    #[test]
    fn a_queued_task_is_small() {
        assert!(
            std::mem::size_of::<Task>() <= 64,
            "Task is {} bytes",
            std::mem::size_of::<Task>()
        );
    }
}
