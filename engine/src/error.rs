//! Typed errors of the engine: how an event failed to apply, and how a call to the engine failed.

use thiserror::Error;

/// Why one event could not be (fully) applied. Display strings match Dynamo 1.6.1's
/// `KvCacheEventError` so that logs and HTTP errors read the same (INDEXER.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KvCacheEventError {
    #[error("Failed to find parent block")]
    ParentBlockNotFound,
    #[error("Failed to find block")]
    BlockNotFound,
    #[error("Invalid block sequence")]
    InvalidBlockSequence,
    #[error("Indexer capacity exhausted")]
    CapacityExhausted,
    #[error("Unsupported residency domain or storage tier")]
    UnsupportedResidencyDomain,
    #[error("Indexer invariant violation")]
    IndexerInvariantViolation,
}

impl KvCacheEventError {
    /// The `status` label of `kv_cache_events_applied` for this outcome (INDEXER.md §7).
    pub fn status_label(&self) -> &'static str {
        match self {
            KvCacheEventError::ParentBlockNotFound => "parent_block_not_found",
            KvCacheEventError::BlockNotFound => "block_not_found",
            KvCacheEventError::InvalidBlockSequence => "invalid_block",
            KvCacheEventError::CapacityExhausted => "capacity_exhausted",
            KvCacheEventError::UnsupportedResidencyDomain => "unsupported_residency_domain",
            KvCacheEventError::IndexerInvariantViolation => "indexer_invariant_violation",
        }
    }
}

/// Why a call into the engine failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EngineError {
    /// An event thread died (or the engine shut down): nothing more can be applied.
    #[error("Indexer is offline")]
    Offline,
    /// `try_apply` found the owning event thread's queue full (backpressure).
    #[error("event queue is full")]
    QueueFull,
    /// The event was applied but failed (only from `apply_and_wait`).
    #[error("Failed to apply event: {0}")]
    Event(#[from] KvCacheEventError),
    /// A namespace already exists with another block size.
    #[error("namespace {namespace} has block_size {existing}, not {requested}")]
    BlockSizeMismatch {
        namespace: String,
        existing: u32,
        requested: u32,
    },
    /// Block size 0 is meaningless.
    #[error("block_size must be > 0")]
    InvalidBlockSize,
    /// `restore` needs an empty namespace.
    #[error("namespace is not empty; restore needs an empty namespace")]
    NamespaceNotEmpty,
    /// The namespace was removed while the call was in flight.
    #[error("no indexer for model={model} routing_group={routing_group}")]
    NoSuchNamespace {
        model: String,
        routing_group: String,
    },
}

/// Why bytes could not be decoded into an event.
///
/// The payload is serde's own message (e.g. "invalid value: integer `-5`, expected u64",
/// "missing field `event_id`"), so callers can surface it verbatim as Dynamo does. The JSON prefix
/// is Dynamo's `apply_event` wording and is used for every JSON decoder (RouterEvent included).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not valid JSON of the expected shape (serde_json's message).
    #[error("Failed to deserialize KvCacheEvent: {0}")]
    Json(String),
    /// The bytes are not valid msgpack of the expected shape (rmp_serde's message).
    #[error("Failed to deserialize msgpack event: {0}")]
    Msgpack(String),
}

/// Why an event could not be encoded. Exists so that encoding never panics; with the crate's own
/// types it does not happen in practice (every map key is a string, every length is known).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// serde_json refused the value.
    #[error("Failed to serialize event as JSON: {0}")]
    Json(String),
    /// rmp_serde refused the value.
    #[error("Failed to serialize event as msgpack: {0}")]
    Msgpack(String),
}
