//! A model of Dynamo 1.6.1's worker-side local indexer (`LocalKvIndexer`, crate
//! `dynamo-kv-router`, `src/indexer/local.rs`), written from its public source and docs; no
//! Dynamo code is copied. The tree itself *is* Dynamo's: the model keeps the worker's blocks in
//! `dynamo_kv_router::RadixTree` (what `LocalKvIndexer`'s inner `KvIndexer` runs) and uses its
//! own `dump_tree_as_events`.
//!
//! What is modelled (one instance per worker publisher, as in Dynamo):
//! * every applied event goes into the tree and into a buffer of the most recent events,
//!   bounded at `max_buffer_size` **events** (the router sets `WORKER_KV_INDEXER_BUFFER_SIZE`
//!   = 1024 in Dynamo 1.6.1's `lib/llm/src/kv_router.rs`);
//! * a query for the events since `start_id`: no start → tree dump; empty buffer → dump;
//!   start newer than the newest buffered id → "too new"; start older than the oldest buffered
//!   id → **tree dump** (the worker's whole state as synthetic `stored` events); otherwise a
//!   binary search for `start_id` and a copy of the buffered suffix;
//! * the consumer receiving a dump resets the worker and applies the dump; it gets the state,
//!   not the history (removals in the gap are implied, not delivered).
//!
//! Not modelled: the cached-dump reuse between concurrent requesters (each measurement asks
//! once), lower storage tiers, `Cleared` truncation of the buffered answer (the workload has no
//! `Cleared` events), and the request/response transport.

use std::collections::VecDeque;

use dynamo_kv_router::protocols as dy;
use dynamo_kv_router::RadixTree;
use kvindex_engine::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};

use crate::backend::to_dynamo_event;

/// Dynamo 1.6.1's `WORKER_KV_INDEXER_BUFFER_SIZE`: events each worker's local indexer keeps.
pub const DYNAMO_WORKER_BUFFER_EVENTS: usize = 1024;

/// Why an event could not go through the model.
#[derive(Debug, thiserror::Error)]
pub enum DynamoModelError {
    #[error("converting an event to Dynamo's types: {0}")]
    Convert(String),
    #[error("Dynamo's RadixTree rejected event {event_id} of worker {worker_id}: {message}")]
    Apply {
        worker_id: u64,
        event_id: u64,
        message: String,
    },
    #[error("buffer size must be >= 1")]
    ZeroCapacity,
}

/// A reply to "events since `start_id`".
#[derive(Debug, Clone, PartialEq)]
pub enum DynamoReply {
    /// The buffered events from `start_id` on: the history is complete.
    Events {
        events: Vec<RouterEvent>,
        last_event_id: u64,
    },
    /// The whole tree as synthetic `stored` events: the consumer must reset the worker first.
    TreeDump {
        events: Vec<RouterEvent>,
        last_event_id: u64,
    },
    /// `start_id` is past the newest buffered event.
    TooNew { newest: u64 },
}

impl DynamoReply {
    /// The events carried.
    pub fn events(&self) -> &[RouterEvent] {
        match self {
            DynamoReply::Events { events, .. } | DynamoReply::TreeDump { events, .. } => events,
            DynamoReply::TooNew { .. } => &[],
        }
    }

    /// A short name for reports: `events`, `tree-dump`, `too-new`.
    pub fn kind(&self) -> &'static str {
        match self {
            DynamoReply::Events { .. } => "events",
            DynamoReply::TreeDump { .. } => "tree-dump",
            DynamoReply::TooNew { .. } => "too-new",
        }
    }
}

/// One worker's local indexer: Dynamo's RadixTree plus a bounded buffer of recent events.
pub struct DynamoLocalIndexer {
    tree: RadixTree,
    buffer: VecDeque<RouterEvent>,
    capacity: usize,
}

impl DynamoLocalIndexer {
    /// A local indexer keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Result<Self, DynamoModelError> {
        if capacity == 0 {
            return Err(DynamoModelError::ZeroCapacity);
        }
        Ok(Self {
            tree: RadixTree::new(),
            buffer: VecDeque::with_capacity(capacity.min(1 << 16)),
            capacity,
        })
    }

    /// Apply one event to the tree, then record it in the buffer.
    pub fn apply(&mut self, event: &RouterEvent) -> Result<(), DynamoModelError> {
        let dy_event =
            to_dynamo_event(event).map_err(|e| DynamoModelError::Convert(format!("{e:#}")))?;
        self.tree
            .apply_event(dy_event)
            .map_err(|e| DynamoModelError::Apply {
                worker_id: event.worker_id,
                event_id: event.event.event_id,
                message: e.to_string(),
            })?;
        if self.buffer.len() == self.capacity {
            self.buffer.pop_front();
        }
        self.buffer.push_back(event.clone());
        Ok(())
    }

    /// The oldest buffered event id.
    pub fn oldest_event_id(&self) -> Option<u64> {
        self.buffer.front().map(|e| e.event.event_id)
    }

    /// The newest buffered event id.
    pub fn newest_event_id(&self) -> Option<u64> {
        self.buffer.back().map(|e| e.event.event_id)
    }

    /// Serve "every event since `start_id`" (None: the whole state).
    pub fn events_since(&self, start_id: Option<u64>) -> DynamoReply {
        let (Some(first), Some(last)) = (self.oldest_event_id(), self.newest_event_id()) else {
            return self.tree_dump(0);
        };
        let Some(start) = start_id else {
            return self.tree_dump(last);
        };
        if start > last {
            return DynamoReply::TooNew { newest: last };
        }
        if start < first {
            return self.tree_dump(last);
        }
        let idx = self
            .buffer
            .binary_search_by_key(&start, |e| e.event.event_id)
            .unwrap_or_else(|insert_at| insert_at);
        DynamoReply::Events {
            events: self.buffer.range(idx..).cloned().collect(),
            last_event_id: last,
        }
    }

    fn tree_dump(&self, last_event_id: u64) -> DynamoReply {
        DynamoReply::TreeDump {
            events: self
                .tree
                .dump_tree_as_events()
                .iter()
                .map(from_dynamo_event)
                .collect(),
            last_event_id,
        }
    }
}

/// Dynamo's event → ours, field by field (dump events are `stored` events without extra info).
pub fn from_dynamo_event(e: &dy::RouterEvent) -> RouterEvent {
    let data = match &e.event.data {
        dy::KvCacheEventData::Stored(s) => KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: s.parent_hash.map(|h| ExternalSequenceBlockHash(h.0)),
            start_position: s.start_position,
            blocks: s
                .blocks
                .iter()
                .map(|b| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(b.block_hash.0),
                    tokens_hash: LocalBlockHash(b.tokens_hash.0),
                    mm_extra_info: None,
                })
                .collect(),
        }),
        dy::KvCacheEventData::Removed(r) => KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: r
                .block_hashes
                .iter()
                .map(|h| ExternalSequenceBlockHash(h.0))
                .collect(),
        }),
        dy::KvCacheEventData::Cleared => KvCacheEventData::Cleared,
    };
    RouterEvent::new(
        e.worker_id,
        KvCacheEvent {
            event_id: e.event.event_id,
            data,
            dp_rank: e.event.dp_rank,
        },
    )
}
