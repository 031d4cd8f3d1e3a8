//! The engine: namespaces, event threads and the lock-free query path. (Stub API; implementation
//! in progress.)

use crate::error::EngineError;
use crate::protocol::{LocalBlockHash, OverlapScores, RouterEvent, WorkerId, WorkerWithDpRank};

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Number of event threads (default: available cores).
    pub event_threads: usize,
    /// Capacity of each event thread's queue, in tasks (backpressure beyond it).
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            event_threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            queue_capacity: 16_384,
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

/// The index engine: owns the event threads shared by all namespaces.
pub struct Engine {
    _cfg: EngineConfig,
}

impl Engine {
    pub fn new(cfg: EngineConfig) -> Self {
        Self { _cfg: cfg }
    }

    /// Create (or get, if it exists with the same block size) a namespace.
    pub fn create_namespace(
        &self,
        _key: NamespaceKey,
        _block_size: u32,
    ) -> Result<Namespace, EngineError> {
        todo!()
    }

    pub fn namespace(&self, _key: &NamespaceKey) -> Option<Namespace> {
        todo!()
    }

    pub fn remove_namespace(&self, _key: &NamespaceKey) -> Result<(), EngineError> {
        todo!()
    }

    pub fn namespaces(&self) -> Vec<NamespaceKey> {
        todo!()
    }

    /// Stop the event threads after draining their queues.
    pub fn shutdown(&self) {
        todo!()
    }
}

/// A handle to one namespace's index. Cheap to clone.
#[derive(Clone)]
pub struct Namespace {}

impl Namespace {
    pub fn key(&self) -> &NamespaceKey {
        todo!()
    }
    pub fn block_size(&self) -> u32 {
        todo!()
    }
    /// Enqueue an event for its stream's event thread; blocks while that queue is full.
    pub fn apply(&self, _event: RouterEvent) -> Result<(), EngineError> {
        todo!()
    }
    /// Enqueue without blocking: `QueueFull` when the owning queue is full.
    pub fn try_apply(&self, _event: RouterEvent) -> Result<(), EngineError> {
        todo!()
    }
    /// Apply and wait for the outcome (`EngineError::Event` when it failed).
    pub fn apply_and_wait(&self, _event: RouterEvent) -> Result<(), EngineError> {
        todo!()
    }
    /// Lock-free: scores of every (worker, dp_rank) holding a prefix of `sequence`.
    pub fn find_matches(&self, _sequence: &[LocalBlockHash], _early_exit: bool) -> OverlapScores {
        todo!()
    }
    /// Barrier: returns once every event accepted before the call is applied.
    pub fn flush(&self) -> Result<(), EngineError> {
        todo!()
    }
    pub fn remove_worker(&self, _worker_id: WorkerId) -> Result<(), EngineError> {
        todo!()
    }
    pub fn remove_worker_dp_rank(&self, _worker_id: WorkerId, _dp_rank: u32) -> Result<(), EngineError> {
        todo!()
    }
    pub fn clear_all_blocks(&self, _worker_id: WorkerId) -> Result<(), EngineError> {
        todo!()
    }
    /// Dynamo-compatible dump (a barrier first): Stored RouterEvents, parents before children.
    pub fn dump(&self) -> Result<Vec<RouterEvent>, EngineError> {
        todo!()
    }
    pub fn get_workers(&self) -> Vec<WorkerId> {
        todo!()
    }
    pub fn current_size(&self) -> usize {
        todo!()
    }
    pub fn worker_block_counts(&self) -> Vec<(WorkerWithDpRank, usize)> {
        todo!()
    }
}
