//! A model of vLLM's KV-event replay buffer (`vllm/distributed/kv_events.py`,
//! `ZmqEventPublisher`), written from its public description; no vLLM code is used.
//!
//! What is modelled:
//! * every published batch gets the next sequence number of its publisher (one per engine /
//!   DP rank) and is kept as its **serialized payload** (msgpack) in a deque bounded at
//!   `buffer_steps` entries (default 10,000); the oldest batch falls out when it is full;
//! * a replay request carries a start sequence number; the publisher walks the **whole deque
//!   from the front** and sends every batch whose seq is `>= start` (a linear scan, no index),
//!   then an end marker;
//! * nothing older than the deque is kept anywhere: a start older than the oldest buffered
//!   batch gets the buffered batches only, so the gap between is lost. (The original protocol
//!   gives the consumer no signal; newer versions report the oldest buffered seq, which lets it
//!   detect, not repair, the gap.)
//!
//! Not modelled: ZMQ framing and the network; the consumer-side decode is part of the
//! cold-start measurement, not of serving.

use std::collections::VecDeque;

use kvindex_engine::protocol::RouterEvent;
use serde::{Deserialize, Serialize};

/// vLLM's default `KVEventsConfig.buffer_steps`.
pub const VLLM_BUFFER_STEPS: usize = 10_000;

/// Why a payload could not be produced or read.
#[derive(Debug, thiserror::Error)]
pub enum VllmModelError {
    #[error("encoding a batch: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("decoding a batch: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("replay buffer size must be >= 1")]
    ZeroCapacity,
}

/// The payload of one batch, as the publisher serializes it (vLLM: `KVEventBatch(ts, events)`
/// encoded as a msgpack array).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBatchPayload {
    pub ts: f64,
    pub events: Vec<RouterEvent>,
}

/// What a replay request got back.
#[derive(Debug, Clone, PartialEq)]
pub struct VllmReplay {
    /// `(seq, payload)` of every buffered batch with `seq >= start`, in order.
    pub batches: Vec<(u64, Vec<u8>)>,
    /// Whether the answer covers everything since `start` (false: batches were lost).
    pub complete: bool,
}

impl VllmReplay {
    /// Payload bytes returned.
    pub fn bytes(&self) -> u64 {
        self.batches.iter().map(|(_, p)| p.len() as u64).sum()
    }
}

/// One publisher's bounded replay buffer.
#[derive(Debug, Clone)]
pub struct VllmReplayBuffer {
    buffer: VecDeque<(u64, Vec<u8>)>,
    capacity: usize,
    next_seq: u64,
}

impl VllmReplayBuffer {
    /// A buffer keeping the last `capacity` batches.
    pub fn new(capacity: usize) -> Result<Self, VllmModelError> {
        if capacity == 0 {
            return Err(VllmModelError::ZeroCapacity);
        }
        Ok(Self {
            buffer: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
            next_seq: 0,
        })
    }

    /// Serialize and buffer one batch; returns its sequence number.
    pub fn publish(&mut self, ts: f64, events: &[RouterEvent]) -> Result<u64, VllmModelError> {
        let payload = rmp_serde::to_vec_named(&EventBatchPayload {
            ts,
            events: events.to_vec(),
        })?;
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.buffer.len() == self.capacity {
            self.buffer.pop_front();
        }
        self.buffer.push_back((seq, payload));
        Ok(seq)
    }

    /// The sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The oldest batch still buffered.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.buffer.front().map(|(s, _)| *s)
    }

    /// Whether every batch since `start` is still buffered.
    pub fn can_replay_from(&self, start: u64) -> bool {
        match self.oldest_seq() {
            Some(oldest) => start >= oldest,
            // Empty buffer: only "nothing yet" is complete.
            None => start >= self.next_seq,
        }
    }

    /// Serve a replay request: scan the whole deque from the front and copy out every batch
    /// with `seq >= start` (vLLM sends each as its own message; here they are collected).
    pub fn replay_since(&self, start: u64) -> VllmReplay {
        let mut batches = Vec::new();
        for (seq, payload) in &self.buffer {
            if *seq >= start {
                batches.push((*seq, payload.clone()));
            }
        }
        VllmReplay {
            batches,
            complete: self.can_replay_from(start),
        }
    }
}

/// Decode one payload back into events (the consumer's side).
pub fn decode_payload(payload: &[u8]) -> Result<EventBatchPayload, VllmModelError> {
    Ok(rmp_serde::from_slice(payload)?)
}
