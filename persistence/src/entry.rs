//! The owned types callers append and recovery hands back: one [`LogEntry`] per event or control
//! operation, identified once logged by its [`Lsn`].

use std::sync::Arc;

use kvindex_engine::{DpRank, NamespaceKey, RouterEvent, WorkerId};

/// Log sequence number: global, dense, starting at 1 (docs/log-format.md §1).
pub type Lsn = u64;

/// The first LSN of an empty log.
pub const FIRST_LSN: Lsn = 1;

/// Which index an entry belongs to, with the block size needed to create it on replay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespaceSpec {
    pub key: NamespaceKey,
    pub block_size: u32,
}

impl NamespaceSpec {
    /// A namespace of `model_name` / `routing_group` with `block_size` tokens per block.
    pub fn new(
        model_name: impl Into<String>,
        routing_group: impl Into<String>,
        block_size: u32,
    ) -> Self {
        Self {
            key: NamespaceKey::new(model_name, routing_group),
            block_size,
        }
    }
}

/// What an entry does to its namespace's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// An event of the entry's stream (its `worker_id` and `event.dp_rank` match the entry's).
    Event(RouterEvent),
    /// Every rank of the worker is dropped.
    RemoveWorker,
    /// The entry's `(worker_id, dp_rank)` is dropped.
    RemoveWorkerDpRank,
    /// Every block of every rank of the worker is dropped; the worker stays listed.
    ClearAllBlocks,
    /// The whole namespace (partition) is dropped: its index, every worker and block in it.
    /// Written in a version-2 segment (docs/log-format.md §2.1); the entry's stream fields are 0.
    DropNamespace,
}

/// One accepted change to the index, as appended to the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Shared so that a batch of entries of one namespace does not copy its strings.
    pub namespace: Arc<NamespaceSpec>,
    pub worker_id: WorkerId,
    pub dp_rank: DpRank,
    /// The producer's own sequence number (vLLM batch seq, or the event id); 0 for control ops.
    pub source_seq: u64,
    pub op: LogOp,
}

impl LogEntry {
    /// An event entry; the stream is taken from the event itself.
    pub fn event(namespace: Arc<NamespaceSpec>, source_seq: u64, event: RouterEvent) -> Self {
        Self {
            namespace,
            worker_id: event.worker_id,
            dp_rank: event.event.dp_rank,
            source_seq,
            op: LogOp::Event(event),
        }
    }

    /// A control entry (`op` must not be `Event`; use [`LogEntry::event`] for events).
    pub fn control(
        namespace: Arc<NamespaceSpec>,
        worker_id: WorkerId,
        dp_rank: DpRank,
        op: LogOp,
    ) -> Self {
        Self {
            namespace,
            worker_id,
            dp_rank,
            source_seq: 0,
            op,
        }
    }
}

impl LogEntry {
    /// A [`LogOp::DropNamespace`] entry for `namespace` (its block size is informational).
    pub fn drop_namespace(namespace: Arc<NamespaceSpec>) -> Self {
        Self::control(namespace, 0, 0, LogOp::DropNamespace)
    }

    /// Whether this entry needs a version-2 segment (docs/log-format.md §2.1).
    pub fn needs_v2_segment(&self) -> bool {
        matches!(self.op, LogOp::DropNamespace)
    }
}

/// An entry read back from the log, with the LSN it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEntry {
    pub lsn: Lsn,
    pub entry: LogEntry,
}

/// A stream of one namespace: the unit watermarks are kept for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    pub namespace: NamespaceKey,
    pub worker_id: WorkerId,
    pub dp_rank: DpRank,
}

/// How far a stream is in the log: the source sequence (and LSN) of its last event entry.
/// After a crash the server asks the producer to replay everything after `source_seq`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamWatermark {
    pub stream: StreamKey,
    pub source_seq: u64,
    pub lsn: Lsn,
}
