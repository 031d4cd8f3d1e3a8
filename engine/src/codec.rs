//! Wire decoding and encoding of events, with Dynamo 1.6.1's tolerance rules (INDEXER.md §1.2).
//!
//! Events reach kvindex as JSON (HTTP, older NATS senders, dumps) or as MessagePack with named
//! fields (newer event-plane senders, `rmp_serde::to_vec_named`). Both go through the serde
//! derives in [`crate::protocol`], which encode the rules:
//!
//! * hashes are unsigned integers only (negative, string and float values are rejected;
//!   `2^64 - 1` is accepted; in msgpack any unsigned width, or a non-negative signed int);
//! * variant names are lowercase and case-sensitive; `"cleared"` and `{"cleared": null}` both work;
//! * `event_id`, `block_hash`, `tokens_hash`, `blocks`, `block_hashes` and `worker_id` are required;
//!   `dp_rank`, `parent_hash`, `start_position`, `mm_extra_info`, `storage_tier` are optional;
//! * unknown fields are ignored at every level;
//! * `residency_domain` absent → `None`, any present value (even `null`) → `Some(..)`; whether the
//!   event is usable is decided later by [`RouterEvent::classify`].
//!
//! Every decoder returns `Err` on bad input — it never panics, and nesting depth is bounded
//! (serde_json's limit of 128, and the same limit for msgpack) so hostile input cannot exhaust
//! the stack. (serde_json skips deep values in ignored fields iteratively, without recursion, so
//! those are accepted and harmless.) JSON input must be valid UTF-8 as a whole.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{DecodeError, EncodeError};
use crate::protocol::{KvCacheEvent, RouterEvent};

/// Maximum nesting depth accepted by the msgpack decoders. A real event nests about a dozen
/// levels; rmp_serde's default (1024) is lowered to serde_json's 128 so that a hostile message
/// cannot come close to overflowing a 2 MiB thread stack.
pub const MSGPACK_MAX_DEPTH: usize = 128;

fn from_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    // JSON must be UTF-8 (RFC 8259). serde_json checks strings it decodes but skips validation
    // inside strings it ignores (unknown fields); one upfront pass makes "not UTF-8" always an
    // error. This is stricter than Dynamo only for input no real publisher produces.
    let text = std::str::from_utf8(bytes).map_err(|e| {
        DecodeError::Json(format!("invalid UTF-8 at byte offset {}", e.valid_up_to()))
    })?;
    serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))
}

fn from_msgpack<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, DecodeError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MSGPACK_MAX_DEPTH);
    // Like `rmp_serde::from_slice` (what Dynamo uses), bytes after the first value are ignored.
    T::deserialize(&mut de).map_err(|e| DecodeError::Msgpack(e.to_string()))
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, EncodeError> {
    serde_json::to_string(value).map_err(|e| EncodeError::Json(e.to_string()))
}

fn to_msgpack<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(value).map_err(|e| EncodeError::Msgpack(e.to_string()))
}

/// Decode one [`KvCacheEvent`] from JSON — the payload of Dynamo's `apply_event(worker_id, bytes)`,
/// where the worker id travels separately. A RouterEvent object is rejected here (serde reports
/// the missing `event_id` field), exactly as in Dynamo.
pub fn decode_kv_cache_event_json(bytes: &[u8]) -> Result<KvCacheEvent, DecodeError> {
    from_json(bytes)
}

/// Decode one [`KvCacheEvent`] from named-field msgpack, the binary twin of
/// [`decode_kv_cache_event_json`].
pub fn decode_kv_cache_event_msgpack(bytes: &[u8]) -> Result<KvCacheEvent, DecodeError> {
    from_msgpack(bytes)
}

/// Decode one [`RouterEvent`] from JSON: the unit of older NATS senders, HTTP ingestion and dumps.
pub fn decode_router_event_json(bytes: &[u8]) -> Result<RouterEvent, DecodeError> {
    from_json(bytes)
}

/// Decode a JSON array of [`RouterEvent`]s (a batch). One malformed element fails the batch, as
/// with serde in Dynamo; unusable-but-well-formed events are filtered later by `classify`.
pub fn decode_router_events_json(bytes: &[u8]) -> Result<Vec<RouterEvent>, DecodeError> {
    from_json(bytes)
}

/// Decode one [`RouterEvent`] from named-field msgpack (`rmp_serde::to_vec_named`), as sent by
/// newer event-plane publishers.
pub fn decode_router_event_msgpack(bytes: &[u8]) -> Result<RouterEvent, DecodeError> {
    from_msgpack(bytes)
}

/// Decode a msgpack array of [`RouterEvent`]s: the batch frame of event-plane publishers.
pub fn decode_router_events_msgpack(bytes: &[u8]) -> Result<Vec<RouterEvent>, DecodeError> {
    from_msgpack(bytes)
}

/// Encode a [`KvCacheEvent`] as JSON in Dynamo's field order (`event_id`, `data`, `dp_rank`), e.g.
/// to feed Dynamo's `apply_event` in differential tests.
pub fn encode_kv_cache_event_json(event: &KvCacheEvent) -> Result<String, EncodeError> {
    to_json(event)
}

/// Encode a [`KvCacheEvent`] as named-field msgpack.
pub fn encode_kv_cache_event_msgpack(event: &KvCacheEvent) -> Result<Vec<u8>, EncodeError> {
    to_msgpack(event)
}

/// Encode a [`RouterEvent`] as JSON exactly as Dynamo writes dump strings: field order
/// `worker_id`, `storage_tier`, `residency_domain` (omitted when absent), `event`; optional
/// fields written as `null`.
pub fn encode_router_event_json(event: &RouterEvent) -> Result<String, EncodeError> {
    to_json(event)
}

/// Encode a batch of [`RouterEvent`]s as a JSON array.
pub fn encode_router_events_json(events: &[RouterEvent]) -> Result<String, EncodeError> {
    to_json(events)
}

/// Encode a [`RouterEvent`] as named-field msgpack (`rmp_serde::to_vec_named`), the format of
/// Dynamo's event plane.
pub fn encode_router_event_msgpack(event: &RouterEvent) -> Result<Vec<u8>, EncodeError> {
    to_msgpack(event)
}

/// Encode a batch of [`RouterEvent`]s as a msgpack array of named-field maps.
pub fn encode_router_events_msgpack(events: &[RouterEvent]) -> Result<Vec<u8>, EncodeError> {
    to_msgpack(events)
}
