//! The event stream the §3 replay comparison runs on: WORKLOAD.md's events grouped into the
//! batches engines publish, and a digest of index state that every recovery path is checked
//! against.

use hashbrown::HashMap;
use kvindex_engine::protocol::{RouterEvent, WorkerWithDpRank};
use kvindex_engine::{IndexSnapshot, Namespace};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::workload::{Op, Workload};

/// Why the stream could not be built or a state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("events of one request belong to different workers ({first} and {other})")]
    MixedWorkers { first: u64, other: u64 },
    #[error("engine: {0}")]
    Engine(#[from] kvindex_engine::EngineError),
}

/// One engine step's events of one worker: what a publisher sends as one message with one
/// sequence number (vLLM's `KVEventBatch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub worker_id: u64,
    /// The worker's own batch sequence number, from 0.
    pub seq: u64,
    pub events: Vec<RouterEvent>,
}

/// Every batch of the workload, in stream order (all workers interleaved).
#[derive(Debug, Clone)]
pub struct EventStream {
    pub batches: Vec<Batch>,
    /// Batches per worker (index = worker id).
    pub per_worker: Vec<u64>,
}

impl EventStream {
    /// Group the op stream's events: the `stored` and `removed` events that follow one query
    /// come from one request on one worker and are published together, as an engine publishes
    /// every event of a scheduler step in one batch. Requests without events add no batch.
    pub fn from_workload(w: &Workload) -> Result<Self, StreamError> {
        let workers = usize::try_from(w.config.workers).unwrap_or(usize::MAX);
        let mut per_worker = vec![0u64; workers];
        let mut batches = Vec::new();
        let mut current: Vec<RouterEvent> = Vec::new();
        let mut flush =
            |current: &mut Vec<RouterEvent>, batches: &mut Vec<Batch>| -> Result<(), StreamError> {
                let Some(first) = current.first() else {
                    return Ok(());
                };
                let worker_id = first.worker_id;
                if let Some(other) = current.iter().find(|e| e.worker_id != worker_id) {
                    return Err(StreamError::MixedWorkers {
                        first: worker_id,
                        other: other.worker_id,
                    });
                }
                let idx = usize::try_from(worker_id).unwrap_or(usize::MAX);
                if idx >= per_worker.len() {
                    per_worker.resize(idx + 1, 0);
                }
                let seq = per_worker[idx];
                per_worker[idx] += 1;
                batches.push(Batch {
                    worker_id,
                    seq,
                    events: std::mem::take(current),
                });
                Ok(())
            };
        for op in &w.ops {
            match op {
                Op::Query { .. } => flush(&mut current, &mut batches)?,
                Op::Event(e) => current.push(e.clone()),
            }
        }
        flush(&mut current, &mut batches)?;
        Ok(Self {
            batches,
            per_worker,
        })
    }

    /// Number of events in all batches.
    pub fn event_count(&self) -> u64 {
        self.batches.iter().map(|b| b.events.len() as u64).sum()
    }

    /// The batches of one worker, in order (index = seq).
    pub fn worker_batches(&self, worker_id: u64) -> impl Iterator<Item = &Batch> + '_ {
        self.batches
            .iter()
            .filter(move |b| b.worker_id == worker_id)
    }
}

/// An order-independent summary of which `(worker, dp_rank)` holds which block: the number of
/// held `(stream, sequence hash)` pairs and an XXH3 of their sorted list. Two indexes with the
/// same digest hold the same blocks on the same workers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub pairs: u64,
    pub digest: String,
}

fn digest_of(mut pairs: Vec<(u64, u32, u64)>) -> StateDigest {
    pairs.sort_unstable();
    let mut h = Xxh3::new();
    for (w, dp, ext) in &pairs {
        h.update(&w.to_le_bytes());
        h.update(&dp.to_le_bytes());
        h.update(&ext.to_le_bytes());
    }
    StateDigest {
        pairs: pairs.len() as u64,
        digest: format!("{:016x}", h.digest()),
    }
}

/// The digest the workload's simulated caches give after the last request: the ground truth
/// every reconstructed index must equal.
pub fn expected_digest(w: &Workload) -> StateDigest {
    let mut pairs = Vec::new();
    for (worker, cache) in w.final_caches.iter().enumerate() {
        for h in cache {
            pairs.push((worker as u64, 0u32, h.0));
        }
    }
    digest_of(pairs)
}

/// The digest of an engine snapshot (a stream's own external hash where it differs from the
/// node's shared one).
pub fn snapshot_digest(snap: &IndexSnapshot) -> StateDigest {
    let mut pairs = Vec::new();
    for node in &snap.nodes {
        for h in &node.holders {
            let Some(WorkerWithDpRank { worker_id, dp_rank }) =
                snap.streams.get(h.stream as usize).copied()
            else {
                continue;
            };
            let ext = h.private_ext.unwrap_or(node.ext);
            pairs.push((worker_id, dp_rank, ext.0));
        }
    }
    digest_of(pairs)
}

/// The digest of a live namespace (flushes it first: `snapshot` is a barrier).
pub fn namespace_digest(ns: &Namespace) -> Result<StateDigest, StreamError> {
    Ok(snapshot_digest(&ns.snapshot()?))
}

/// Per-worker first event id of each batch (index = seq), for mapping a batch sequence number
/// to Dynamo's per-event ids.
pub fn first_event_ids(stream: &EventStream) -> HashMap<u64, Vec<u64>> {
    let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
    for b in &stream.batches {
        if let Some(e) = b.events.first() {
            out.entry(b.worker_id).or_default().push(e.event.event_id);
        }
    }
    out
}
