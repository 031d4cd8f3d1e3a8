//! The `mooncake-replay v1` workload as service traffic.
//!
//! The workload's local hash of block id `x` is XXH3 of 16 copies of `(x as u32)`, so with a
//! partition block size of [`SERVICE_BLOCK_SIZE`] the token ids of that block are `[x as u32; 16]`
//! and a server that recomputes local hashes from token ids (as kvindex and Dynamo do for vLLM
//! events and `/query`) gets exactly the workload's hashes. This module recovers the block ids from
//! the trace and builds:
//!
//! * one vLLM `KVEventBatch` per (request, copy) with events: its `BlockStored` (engine hashes =
//!   the workload's sequence hashes) and its `BlockRemoved`, in the op stream's order;
//! * per query, a `/query` body (token ids) and a `/query_by_hash` body (local hashes as i64);
//! * the simulated caches' final state, for exact answers ([`super::agreement`]).

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};
use kvindex_engine::protocol::KvCacheEventData;
use kvindex_server::zmq::test_publisher::{PublishBatch, PublishEvent};

use super::ServiceError;
use crate::workload::{local_hash, Op, TraceRequest, Workload, WorkloadConfig};

/// Tokens per block of the load-test partition: the workload's local hash covers 16 token words.
pub const SERVICE_BLOCK_SIZE: u32 = 16;

/// One vLLM batch of one worker, in publish order.
#[derive(Debug, Clone)]
pub struct WorkerBatch {
    /// Worker (= `instance_id`) the batch belongs to.
    pub worker: u64,
    /// The batch (events of one request copy).
    pub batch: PublishBatch,
    /// Events in the batch.
    pub events: u64,
    /// Blocks stored by the batch.
    pub stored_blocks: u64,
}

/// A workload turned into what the service sees: batches to publish and query bodies.
#[derive(Debug, Clone)]
pub struct ServiceWorkload {
    /// Model name of the single partition.
    pub model: String,
    /// Number of workers (`instance_id` 0..workers, dp_rank 0).
    pub workers: u64,
    /// Batches in op-stream order.
    pub batches: Vec<WorkerBatch>,
    /// Events in all batches (= the workload's events).
    pub events: u64,
    /// Blocks in all `BlockStored` events.
    pub stored_blocks: u64,
    /// `/query` bodies, one per query of the op stream.
    pub token_bodies: Vec<Bytes>,
    /// `/query_by_hash` bodies, one per query of the op stream.
    pub hash_bodies: Vec<Bytes>,
    /// Local hashes of every query (for exact scoring).
    pub query_locals: Vec<Vec<u64>>,
    /// Per worker, the sequence hashes it holds at the end.
    pub final_caches: Vec<HashSet<u64>>,
}

impl ServiceWorkload {
    /// Mean `/query` body size in bytes.
    pub fn mean_token_body_bytes(&self) -> f64 {
        mean_len(&self.token_bodies)
    }

    /// Mean `/query_by_hash` body size in bytes.
    pub fn mean_hash_body_bytes(&self) -> f64 {
        mean_len(&self.hash_bodies)
    }
}

fn mean_len(bodies: &[Bytes]) -> f64 {
    if bodies.is_empty() {
        return 0.0;
    }
    bodies.iter().map(|b| b.len() as f64).sum::<f64>() / bodies.len() as f64
}

/// Map every local hash the workload can contain back to its token word (`block id as u32`),
/// enumerating the expanded ids exactly as [`crate::workload::generate`] does.
fn token_words(
    trace: &[TraceRequest],
    config: &WorkloadConfig,
) -> Result<HashMap<u64, u32>, ServiceError> {
    let requests = match config.limit_requests {
        Some(n) => &trace[..n.min(trace.len())],
        None => trace,
    };
    let f = config.length_factor;
    let overflow = || ServiceError::Workload("expanded block id overflows u64".into());
    let mut max_id = 0u64;
    for r in requests {
        for &h in &r.hash_ids {
            let last = h
                .checked_mul(f)
                .and_then(|v| v.checked_add(f.saturating_sub(1)))
                .ok_or_else(overflow)?;
            max_id = max_id.max(last);
        }
    }
    let span = max_id.checked_add(1).ok_or_else(overflow)?;
    let mut words = HashMap::new();
    for r in requests {
        for copy in 0..config.duplication {
            let offset = copy.checked_mul(span).ok_or_else(overflow)?;
            for &h in &r.hash_ids {
                for j in 0..f {
                    let id = h
                        .checked_mul(f)
                        .and_then(|v| v.checked_add(j))
                        .and_then(|v| v.checked_add(offset))
                        .ok_or_else(overflow)?;
                    words.entry(local_hash(id)).or_insert(id as u32);
                }
            }
        }
    }
    Ok(words)
}

fn tokens_of(words: &HashMap<u64, u32>, locals: &[u64]) -> Result<Vec<u32>, ServiceError> {
    let mut tokens = Vec::with_capacity(locals.len() * SERVICE_BLOCK_SIZE as usize);
    for l in locals {
        let word = words
            .get(l)
            .ok_or_else(|| ServiceError::Workload(format!("local hash {l} has no block id")))?;
        tokens.extend(std::iter::repeat_n(*word, SERVICE_BLOCK_SIZE as usize));
    }
    Ok(tokens)
}

fn json_body(value: serde_json::Value) -> Bytes {
    Bytes::from(value.to_string())
}

/// Turn `workload` (generated from `trace` with its config) into service traffic for model
/// `model`.
pub fn build(
    trace: &[TraceRequest],
    workload: &Workload,
    model: &str,
) -> Result<ServiceWorkload, ServiceError> {
    let words = token_words(trace, &workload.config)?;
    let mut out = ServiceWorkload {
        model: model.to_owned(),
        workers: workload.config.workers,
        batches: Vec::new(),
        events: 0,
        stored_blocks: 0,
        token_bodies: Vec::new(),
        hash_bodies: Vec::new(),
        query_locals: Vec::new(),
        final_caches: workload
            .final_caches
            .iter()
            .map(|c| c.iter().map(|h| h.0).collect())
            .collect(),
    };
    let mut current: Option<WorkerBatch> = None;
    for op in &workload.ops {
        match op {
            Op::Query { local_hashes } => {
                out.batches.extend(current.take());
                let locals: Vec<u64> = local_hashes.iter().map(|h| h.0).collect();
                let tokens = tokens_of(&words, &locals)?;
                out.token_bodies.push(json_body(
                    serde_json::json!({"token_ids": tokens, "model_name": model}),
                ));
                let hashes: Vec<i64> = locals.iter().map(|&h| h as i64).collect();
                out.hash_bodies.push(json_body(
                    serde_json::json!({"block_hashes": hashes, "model_name": model}),
                ));
                out.query_locals.push(locals);
            }
            Op::Event(ev) => {
                let (event, stored) = match &ev.event.data {
                    KvCacheEventData::Stored(s) => {
                        let locals: Vec<u64> = s.blocks.iter().map(|b| b.tokens_hash.0).collect();
                        let event = PublishEvent::stored(
                            s.blocks.iter().map(|b| b.block_hash.0).collect(),
                            s.parent_hash.map(|p| p.0),
                            tokens_of(&words, &locals)?,
                            SERVICE_BLOCK_SIZE,
                        );
                        (event, s.blocks.len() as u64)
                    }
                    KvCacheEventData::Removed(r) => (
                        PublishEvent::removed(r.block_hashes.iter().map(|h| h.0).collect()),
                        0,
                    ),
                    KvCacheEventData::Cleared => (PublishEvent::Cleared, 0),
                };
                let worker = ev.worker_id;
                if current.as_ref().is_some_and(|b| b.worker != worker) {
                    out.batches.extend(current.take());
                }
                let batch = current.get_or_insert_with(|| WorkerBatch {
                    worker,
                    batch: PublishBatch::new(Vec::new()).with_dp_rank(0),
                    events: 0,
                    stored_blocks: 0,
                });
                batch.batch.events.push(event);
                batch.events += 1;
                batch.stored_blocks += stored;
                out.events += 1;
                out.stored_blocks += stored;
            }
        }
    }
    out.batches.extend(current.take());
    Ok(out)
}
