//! Decoding of vLLM / SGLang KV-event messages into kvindex [`RouterEvent`]s.
//!
//! The wire facts are from SERVICE.md §5 (cited by section below):
//!
//! * **Frames** (§5.1): a live message is exactly `[topic, seq, payload]`; `seq` is an 8-byte
//!   big-endian u64. Anything else is dropped before its payload is looked at ([`FrameError`]).
//! * **Batch** (§5.2): msgpack array `[ts, events, data_parallel_rank|nil]`. kvindex also accepts
//!   the older 2-element SGLang batch `[ts, events]` (§0.4), extra trailing elements, and (for
//!   symmetry with the map-encoded events) a map batch `{"ts", "events", "data_parallel_rank" |
//!   "attn_dp_rank"}`. A non-nil rank overrides the listener's registered rank for every event.
//! * **Events** (§5.3): a tagged positional array (`["BlockStored", ...]`) or a map with
//!   `"type"`, mixed freely in one batch. Arrays may end early (omitted defaults) or carry extra
//!   elements; maps may lack optional keys or carry unknown ones.
//! * **One bad event never loses its neighbours** (§0.4): each event is first delimited
//!   structurally, then decoded in isolation; a failure becomes a [`RejectedEvent`] (counted
//!   under `kvindex_zmq_events_rejected_total{reason}`) and the others are kept. Only a payload
//!   whose *structure* is broken (not msgpack, not a batch) fails as a whole ([`BatchError`]).
//!   A batch keeps the first [`MAX_DETAILED_REJECTIONS`] rejected events in detail and only
//!   counts the others ([`Rejections`]): a 60 MiB batch of one-byte bad events would otherwise
//!   become 63 million entries (3.4 GiB).
//! * **Hashes** (§4): ints (i64 or u64, normalised by bit reinterpretation) or msgpack `bin`
//!   (vLLM with `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, accepted per §0.4). A `bin` hash maps to
//!   the same u64 vLLM would have published in integer mode: the big-endian value of its last
//!   8 bytes, so identities agree whichever mode the engine runs in.
//! * **Medium** (§5.3 table): `GPU`/`DEVICE`/nil → device, `CPU*` → host_pinned, disk-like →
//!   disk, remote-like → external (case-insensitive). An unknown medium rejects that event with
//!   the label `unknown_medium` (§0.4), never silently.
//! * **Local hashes** (§4): for every `BlockStored`, `tokens_hash` is recomputed from the event's
//!   token ids with the *partition's* block size and the event's LoRA / cache-salt seed
//!   ([`kvindex_engine::hashing`]); the engine's hash stays the block's identity.
//! * **Cache salt** (§0.6): see [`cache_salt_from_extra_keys`].
//!
//! Everything here is pure except [`record_batch_metrics`]; the listener calls it once per batch.

use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};
use kvindex_engine::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, RouterEvent, StorageTier,
};

use super::msgpack::{Kind, MsgpackError, Reader};

/// Length of the sequence-number frame (SERVICE.md §5.1).
pub const SEQ_FRAME_LEN: usize = 8;

/// The `dynamo-cache-salt:` tag Dynamo 1.6.1 recognises in `extra_keys` (SERVICE.md §4).
pub const DYNAMO_CACHE_SALT_TAG: &str = "dynamo-cache-salt:";

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// Why a live ZMQ message was dropped before its payload was decoded (SERVICE.md §5.1). The
/// watermark is not touched. Display strings are Dynamo's log wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not exactly 3 frames.
    #[error("Unexpected ZMQ frame count: {0}")]
    FrameCount(usize),
    /// The sequence frame is not 8 bytes.
    #[error("Invalid sequence number length: {0}")]
    SeqLength(usize),
    /// A sequence number at or above 2^63: kvindex reserves those source sequences for
    /// JetStream (docs/log-format.md §6.1); logged, it would pass for a JetStream one.
    #[error("Reserved sequence number {0} (kvindex accepts sequence numbers below 2^63)")]
    ReservedSeq(u64),
}

impl FrameError {
    /// Metric label (`kvindex_zmq_messages_dropped_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            FrameError::FrameCount(_) => "frame_count",
            FrameError::SeqLength(_) => "seq_length",
            FrameError::ReservedSeq(_) => "reserved_seq",
        }
    }

    /// Metric label of the same fault in a replay reply, which ends the replay.
    pub fn replay_label(&self) -> &'static str {
        match self {
            FrameError::FrameCount(_) => "replay_frame_count",
            FrameError::SeqLength(_) => "replay_seq_length",
            FrameError::ReservedSeq(_) => "replay_reserved_seq",
        }
    }
}

/// A live message split into its three frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawBatch<'a> {
    /// Publisher topic (any value is accepted; the SUB socket subscribes to everything).
    pub topic: &'a [u8],
    /// The publisher's batch sequence number.
    pub seq: u64,
    /// The msgpack `KVEventBatch`.
    pub payload: &'a [u8],
}

/// Parse an 8-byte big-endian sequence frame. A sequence with bit 63 set is refused: the log
/// takes every such source sequence for a tagged JetStream one.
pub fn parse_seq(frame: &[u8]) -> Result<u64, FrameError> {
    let bytes: [u8; SEQ_FRAME_LEN] = frame
        .try_into()
        .map_err(|_| FrameError::SeqLength(frame.len()))?;
    let seq = u64::from_be_bytes(bytes);
    if kvindex_persistence::split_tagged(seq).is_some() {
        return Err(FrameError::ReservedSeq(seq));
    }
    Ok(seq)
}

/// Split a live message `[topic, seq, payload]` (SERVICE.md §5.1).
pub fn split_live_message<B: AsRef<[u8]>>(frames: &[B]) -> Result<RawBatch<'_>, FrameError> {
    match frames {
        [topic, seq, payload] => Ok(RawBatch {
            topic: topic.as_ref(),
            seq: parse_seq(seq.as_ref())?,
            payload: payload.as_ref(),
        }),
        _ => Err(FrameError::FrameCount(frames.len())),
    }
}

// ---------------------------------------------------------------------------------------------
// Typed engine events
// ---------------------------------------------------------------------------------------------

/// A decoded `KVEventBatch`, before conversion to kvindex events.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineBatch {
    /// The batch timestamp (seconds), if it was a number.
    pub ts: Option<f64>,
    /// The batch's `data_parallel_rank` / `attn_dp_rank`; `None` when nil or absent.
    pub dp_rank: Option<u32>,
    /// Events that decoded, with their position in the batch.
    pub events: Vec<(usize, EngineEvent)>,
    /// Events that did not decode; the others are unaffected.
    pub rejected: Rejections,
}

/// Rejected events of one batch kept in detail ([`Rejections::detailed`]); the others are
/// only counted. The listener logs the first 8 one by one and the rest in one line.
pub const MAX_DETAILED_REJECTIONS: usize = 16;

/// The events of one batch that could not be decoded: every one counted (in total and by
/// metric label), the first [`MAX_DETAILED_REJECTIONS`] kept in detail. Its size does not
/// depend on how many there are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rejections {
    /// The first rejected events, in batch order.
    detailed: Vec<RejectedEvent>,
    /// Every rejected event, by [`EventError::label`] (a handful of labels).
    by_label: Vec<(&'static str, usize)>,
    /// Every rejected event.
    total: usize,
}

impl Rejections {
    /// Count a rejected event; keep it in detail while there is room.
    pub fn push(&mut self, rejected: RejectedEvent) {
        let label = rejected.error.label();
        match self.by_label.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => self.by_label.push((label, 1)),
        }
        self.total += 1;
        if self.detailed.len() < MAX_DETAILED_REJECTIONS {
            self.detailed.push(rejected);
        }
    }

    /// How many events were rejected.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether none was.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The first [`MAX_DETAILED_REJECTIONS`] rejected events, in batch order.
    pub fn detailed(&self) -> &[RejectedEvent] {
        &self.detailed
    }

    /// How many were rejected, by [`EventError::label`] (labels with none left out).
    pub fn by_label(&self) -> impl Iterator<Item = (&'static str, usize)> + '_ {
        self.by_label.iter().copied()
    }
}

/// One event of a batch that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedEvent {
    /// Position in the batch's `events` array.
    pub index: usize,
    /// Why it was rejected.
    pub error: EventError,
}

/// One engine event, as vLLM names it (SERVICE.md §5.3).
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// `BlockStored`: a chain of blocks cached under a parent.
    BlockStored(BlockStored),
    /// `BlockRemoved`: blocks evicted, by engine hash.
    BlockRemoved(BlockRemoved),
    /// `AllBlocksCleared`: everything of this (worker, dp_rank) is gone.
    AllBlocksCleared,
    /// `Ignored`: accepted and does nothing.
    Ignored,
}

/// Token ids of a `BlockStored`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIds {
    /// Plain token ids.
    Plain(Vec<u32>),
    /// Eagle / bigram token ids: pair `i` is `(t_i, t_{i+1})`.
    Bigram(Vec<[u32; 2]>),
}

impl TokenIds {
    fn len(&self) -> usize {
        match self {
            TokenIds::Plain(v) => v.len(),
            TokenIds::Bigram(v) => v.len(),
        }
    }
}

/// Which KV-cache group an event belongs to (hybrid models publish one stream per group).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvGroup {
    /// `group_idx`, if present.
    pub group_idx: Option<i64>,
    /// `kv_cache_spec_kind`, if present.
    pub kv_cache_spec_kind: Option<String>,
}

impl KvGroup {
    /// Whether the event concerns the main (full-attention) KV group (SERVICE.md §5.3,
    /// "Filtering of non-main KV groups"): by kind when present, else `group_idx` absent or 0.
    pub fn is_main(&self) -> bool {
        match self.kv_cache_spec_kind.as_deref() {
            Some(kind) => matches!(
                kind,
                "full_attention" | "mla_attention" | "sink_full_attention"
            ),
            None => self.group_idx.unwrap_or(0) == 0,
        }
    }
}

/// A decoded `BlockStored`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    /// Engine hashes, one per block (bit-normalised to u64).
    pub block_hashes: Vec<u64>,
    /// Engine hash of the parent block; `None` = the chain starts at the root.
    pub parent_block_hash: Option<u64>,
    /// Token ids of the blocks, concatenated.
    pub token_ids: TokenIds,
    /// The engine's block size (must equal the partition's for anything to be stored).
    pub block_size: u64,
    /// Tier, from `medium`.
    pub tier: StorageTier,
    /// LoRA adapter name (seeds the local hash).
    pub lora_name: Option<String>,
    /// Cache salt: SGLang metadata `cache_salt`, a `dynamo-cache-salt:` tag, or vLLM's bare salt
    /// in the first block's `extra_keys`.
    pub cache_salt: Option<String>,
    /// KV group of the event.
    pub group: KvGroup,
}

/// A decoded `BlockRemoved`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    /// Engine hashes of the removed blocks.
    pub block_hashes: Vec<u64>,
    /// Tier, from `medium`.
    pub tier: StorageTier,
    /// KV group of the event.
    pub group: KvGroup,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Why a whole payload could not be decoded: the watermark does not advance (SERVICE.md §7.4).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The payload is not msgpack, or ends inside the batch.
    #[error("invalid msgpack batch: {0}")]
    Msgpack(#[from] MsgpackError),
    /// The payload is neither an array nor a map.
    #[error("batch must be an array [ts, events, dp_rank] or a map, found {0}")]
    NotABatch(&'static str),
    /// A batch array with fewer than 2 elements.
    #[error("batch array has {0} elements; expected at least 2 (ts, events)")]
    TooShort(usize),
    /// A map batch without `events`.
    #[error("batch has no `events` field")]
    MissingEvents,
    /// `events` is not an array.
    #[error("batch `events` must be an array, found {0}")]
    EventsNotArray(&'static str),
    /// `data_parallel_rank` is neither nil nor a u32.
    #[error("invalid data_parallel_rank: {0}")]
    InvalidDpRank(String),
}

/// Why one event of a batch was rejected (the rest of the batch is kept).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Structurally valid msgpack of the wrong shape inside the event.
    #[error("malformed event: {0}")]
    Malformed(#[from] MsgpackError),
    /// Neither a tagged array nor a map.
    #[error("event must be a tagged array or a map, found {0}")]
    NotAnEvent(&'static str),
    /// An empty array, or a map without `"type"`.
    #[error("event has no type tag")]
    MissingTag,
    /// A tag that is not `BlockStored`, `BlockRemoved`, `AllBlocksCleared` or `Ignored`.
    #[error("unknown event type `{0}`")]
    UnknownTag(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has an unusable value.
    #[error("invalid field `{field}`: {reason}")]
    InvalidField {
        /// The field's name.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A `medium` outside the known tiers (SERVICE.md §0.4: counted, never silently dropped).
    #[error("unknown medium `{0}`")]
    UnknownMedium(String),
}

impl EventError {
    /// Metric label (`kvindex_zmq_events_rejected_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            EventError::Malformed(_) | EventError::NotAnEvent(_) => "malformed",
            EventError::MissingTag | EventError::UnknownTag(_) => "unknown_tag",
            EventError::MissingField(_) => "missing_field",
            EventError::InvalidField { .. } => "invalid_field",
            EventError::UnknownMedium(_) => "unknown_medium",
        }
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        EventError::InvalidField {
            field,
            reason: reason.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Batch decoding
// ---------------------------------------------------------------------------------------------

/// Decode a msgpack `KVEventBatch` payload (SERVICE.md §5.2–§5.3).
///
/// Fails only when the batch structure itself is unusable; a bad event becomes a
/// [`RejectedEvent`] and its neighbours are kept.
pub fn decode_batch(payload: &[u8]) -> Result<EngineBatch, BatchError> {
    let mut r = Reader::new(payload);
    let mut ts = None;
    let mut dp_rank = None;
    let mut events_slice: Option<(&[u8], usize)> = None;

    match r.peek_kind()? {
        Kind::Array => {
            let len = r.read_array_len()?;
            if len < 2 {
                return Err(BatchError::TooShort(len));
            }
            ts = read_ts(&mut r)?;
            events_slice = Some(read_events_header(&mut r)?);
            if len >= 3 {
                dp_rank = read_dp_rank(&mut r)?;
            }
            // Extra trailing elements are ignored (they were delimited by the header count).
        }
        Kind::Map => {
            let len = r.read_map_len()?;
            for _ in 0..len {
                let key = if r.peek_kind()? == Kind::Str {
                    Some(r.read_str_bytes()?)
                } else {
                    r.skip_value()?;
                    None
                };
                match key {
                    Some(b"ts") => ts = read_ts(&mut r)?,
                    Some(b"events") => events_slice = Some(read_events_header(&mut r)?),
                    Some(b"data_parallel_rank" | b"attn_dp_rank" | b"dp_rank") => {
                        dp_rank = read_dp_rank(&mut r)?
                    }
                    _ => r.skip_value()?,
                }
            }
        }
        other => return Err(BatchError::NotABatch(other.name())),
    }

    let (events_bytes, count) = events_slice.ok_or(BatchError::MissingEvents)?;
    // Never trust the header's count for allocation: each event takes at least one byte of
    // the payload, but a decoded event is two orders of magnitude larger than that byte, so
    // the reservation is capped too and the vector grows past it only with events that decode.
    let mut events = Vec::with_capacity(count.min(events_bytes.len()).min(MAX_RESERVED_EVENTS));
    let mut rejected = Rejections::default();
    let mut er = Reader::new(events_bytes);
    for index in 0..count {
        // Delimit the event first (a structural failure here means the batch itself is broken),
        // then decode it in isolation so that a bad field cannot desynchronise its neighbours.
        let one = er.value_slice()?;
        match decode_event(one) {
            Ok(ev) => events.push((index, ev)),
            Err(error) => rejected.push(RejectedEvent { index, error }),
        }
    }
    Ok(EngineBatch {
        ts,
        dp_rank,
        events,
        rejected,
    })
}

/// Events a batch's vector is reserved for up front, whatever its header claims (vLLM batches
/// carry a handful; larger ones grow the vector as their events decode).
const MAX_RESERVED_EVENTS: usize = 1024;

fn read_ts(r: &mut Reader<'_>) -> Result<Option<f64>, BatchError> {
    // The timestamp is informational: any value is accepted, only numbers are kept.
    if matches!(r.peek_kind()?, Kind::Int | Kind::Float) {
        Ok(Some(r.read_number()?))
    } else {
        r.skip_value()?;
        Ok(None)
    }
}

/// Read the `events` array header and return the bytes of its elements plus their count.
fn read_events_header<'a>(r: &mut Reader<'a>) -> Result<(&'a [u8], usize), BatchError> {
    let kind = r.peek_kind()?;
    if kind != Kind::Array {
        return Err(BatchError::EventsNotArray(kind.name()));
    }
    let whole = r.value_slice()?;
    let mut hr = Reader::new(whole);
    let count = hr.read_array_len()?;
    Ok((&whole[hr.position()..], count))
}

fn read_dp_rank(r: &mut Reader<'_>) -> Result<Option<u32>, BatchError> {
    if r.try_nil()? {
        return Ok(None);
    }
    match r.peek_kind()? {
        Kind::Int => {
            let v = r.read_int()?;
            u32::try_from(v)
                .map(Some)
                .map_err(|_| BatchError::InvalidDpRank(v.to_string()))
        }
        other => Err(BatchError::InvalidDpRank(format!("a {}", other.name()))),
    }
}

// ---------------------------------------------------------------------------------------------
// Event decoding
// ---------------------------------------------------------------------------------------------

/// Fields of a `BlockStored` / `BlockRemoved` as they are collected from either encoding.
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<u64>>,
    parent_block_hash: Option<u64>,
    token_ids: Option<TokenIds>,
    block_size: Option<u64>,
    medium: Option<String>,
    lora_name: Option<String>,
    metadata_salt: Option<String>,
    /// Strings of the first block's `extra_keys` entry, with whether each was an MM pair.
    first_extra_keys: Option<Vec<ExtraKey>>,
    group: KvGroup,
}

/// One entry of a block's `extra_keys`, reduced to what the salt rule needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKey {
    /// A bare string (LoRA name, old-style MM hash, cache salt, or a Dynamo salt tag).
    Str(String),
    /// Anything else: an `[identifier, offset]` MM pair, an int (old LoRA id), bytes
    /// (prompt-embeds digest), nil.
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tag {
    Stored,
    Removed,
    Cleared,
    Ignored,
}

fn parse_tag(tag: &str) -> Result<Tag, EventError> {
    match tag {
        "BlockStored" => Ok(Tag::Stored),
        "BlockRemoved" => Ok(Tag::Removed),
        "AllBlocksCleared" => Ok(Tag::Cleared),
        "Ignored" => Ok(Tag::Ignored),
        other => Err(EventError::UnknownTag(other.to_owned())),
    }
}

/// Decode one event (positional or map encoding) from its own msgpack bytes.
pub fn decode_event(bytes: &[u8]) -> Result<EngineEvent, EventError> {
    let mut r = Reader::new(bytes);
    let mut f = Fields::default();
    let tag = match r.peek_kind()? {
        Kind::Array => {
            let len = r.read_array_len()?;
            if len == 0 {
                return Err(EventError::MissingTag);
            }
            let tag = parse_tag(r.read_str()?)?;
            for pos in 1..len {
                read_positional(&mut r, tag, pos, &mut f)?;
            }
            tag
        }
        Kind::Map => {
            let len = r.read_map_len()?;
            let mut tag = None;
            for _ in 0..len {
                let key = if r.peek_kind()? == Kind::Str {
                    Some(r.read_str()?)
                } else {
                    r.skip_value()?;
                    None
                };
                match key {
                    Some("type") => tag = Some(parse_tag(r.read_str()?)?),
                    Some(name) => read_named(&mut r, name, &mut f)?,
                    None => r.skip_value()?,
                }
            }
            tag.ok_or(EventError::MissingTag)?
        }
        other => return Err(EventError::NotAnEvent(other.name())),
    };
    build_event(tag, f)
}

/// Read the element at `pos` (≥ 1) of a positional event.
fn read_positional(
    r: &mut Reader<'_>,
    tag: Tag,
    pos: usize,
    f: &mut Fields,
) -> Result<(), EventError> {
    match (tag, pos) {
        (Tag::Stored, 1) | (Tag::Removed, 1) => f.block_hashes = Some(read_hashes(r)?),
        (Tag::Stored, 2) => f.parent_block_hash = read_opt_hash(r, "parent_block_hash")?,
        (Tag::Stored, 3) => f.token_ids = Some(read_token_ids(r)?),
        (Tag::Stored, 4) => f.block_size = Some(read_block_size(r)?),
        (Tag::Stored, 5) => r.skip_value()?, // lora_id: deprecated, ignored (§4)
        (Tag::Stored, 6) | (Tag::Removed, 2) => f.medium = read_opt_str(r, "medium")?,
        (Tag::Stored, 7) => read_lora_or_metadata(r, f)?,
        (Tag::Stored, 8) => f.first_extra_keys = read_first_extra_keys(r)?,
        (Tag::Stored, _) | (Tag::Removed, _) => read_tail(r, f)?,
        (Tag::Cleared, _) | (Tag::Ignored, _) => r.skip_value()?,
    }
    Ok(())
}

/// Read the field `name` of a map-encoded event (unknown names are skipped).
fn read_named(r: &mut Reader<'_>, name: &str, f: &mut Fields) -> Result<(), EventError> {
    match name {
        "block_hashes" => f.block_hashes = Some(read_hashes(r)?),
        "parent_block_hash" => f.parent_block_hash = read_opt_hash(r, "parent_block_hash")?,
        "token_ids" => f.token_ids = Some(read_token_ids(r)?),
        "block_size" => f.block_size = Some(read_block_size(r)?),
        "medium" => f.medium = read_opt_str(r, "medium")?,
        "lora_name" | "metadata" => read_lora_or_metadata(r, f)?,
        "cache_salt" => f.metadata_salt = read_opt_str(r, "cache_salt")?,
        "extra_keys" => f.first_extra_keys = read_first_extra_keys(r)?,
        "group_idx" => {
            if r.try_nil()? {
                f.group.group_idx = None;
            } else {
                f.group.group_idx = Some(read_i64(r, "group_idx")?);
            }
        }
        "kv_cache_spec_kind" => f.group.kv_cache_spec_kind = read_opt_str(r, "kv_cache_spec_kind")?,
        _ => r.skip_value()?,
    }
    Ok(())
}

/// Optional tail of a positional event, recognised by type (SERVICE.md §5.3): the first int is
/// `group_idx`, the first string `kv_cache_spec_kind`; arrays (`block_mm_infos`), later ints
/// (`kv_cache_spec_sliding_window`) and anything else are skipped.
fn read_tail(r: &mut Reader<'_>, f: &mut Fields) -> Result<(), EventError> {
    match r.peek_kind()? {
        Kind::Int if f.group.group_idx.is_none() => {
            f.group.group_idx = Some(read_i64(r, "group_idx")?);
        }
        Kind::Str if f.group.kv_cache_spec_kind.is_none() => {
            f.group.kv_cache_spec_kind = Some(r.read_str()?.to_owned());
        }
        _ => r.skip_value()?,
    }
    Ok(())
}

fn read_i64(r: &mut Reader<'_>, field: &'static str) -> Result<i64, EventError> {
    let v = r.read_int()?;
    i64::try_from(v).map_err(|_| EventError::invalid(field, format!("{v} out of range")))
}

/// One engine hash: int (i64 or u64 bits) or `bin` (last 8 bytes, big-endian, as vLLM's
/// integer mode computes it).
fn read_hash(r: &mut Reader<'_>, field: &'static str) -> Result<u64, EventError> {
    match r.peek_kind()? {
        Kind::Int => {
            let v = r.read_int()?;
            if let Ok(u) = u64::try_from(v) {
                Ok(u)
            } else if let Ok(i) = i64::try_from(v) {
                Ok(ExternalSequenceBlockHash::from(i).0)
            } else {
                Err(EventError::invalid(
                    field,
                    format!("{v} is not a 64-bit hash"),
                ))
            }
        }
        Kind::Bin => Ok(hash_from_bytes(r.read_bin()?)),
        other => Err(EventError::invalid(
            field,
            format!("expected int or bin, found {}", other.name()),
        )),
    }
}

/// The u64 identity of a `bin` block hash: `int.from_bytes(h, "big") & (2^64 - 1)`, i.e. the
/// big-endian value of the last 8 bytes (what vLLM publishes in integer-hash mode).
pub fn hash_from_bytes(bytes: &[u8]) -> u64 {
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn read_hashes(r: &mut Reader<'_>) -> Result<Vec<u64>, EventError> {
    let kind = r.peek_kind()?;
    if kind != Kind::Array {
        return Err(EventError::invalid(
            "block_hashes",
            format!("expected array, found {}", kind.name()),
        ));
    }
    let len = r.read_array_len()?;
    let mut out = Vec::with_capacity(len.min(4096));
    for _ in 0..len {
        out.push(read_hash(r, "block_hashes")?);
    }
    Ok(out)
}

fn read_opt_hash(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, EventError> {
    if r.try_nil()? {
        Ok(None)
    } else {
        read_hash(r, field).map(Some)
    }
}

fn read_u32(r: &mut Reader<'_>, field: &'static str) -> Result<u32, EventError> {
    let v = r.read_int()?;
    u32::try_from(v).map_err(|_| EventError::invalid(field, format!("{v} is not a u32 token id")))
}

fn read_token_ids(r: &mut Reader<'_>) -> Result<TokenIds, EventError> {
    let kind = r.peek_kind()?;
    if kind != Kind::Array {
        return Err(EventError::invalid(
            "token_ids",
            format!("expected array, found {}", kind.name()),
        ));
    }
    let len = r.read_array_len()?;
    if len == 0 {
        return Ok(TokenIds::Plain(Vec::new()));
    }
    // The first element decides the form: ints (plain) or [int, int] pairs (eagle bigrams).
    if r.peek_kind()? == Kind::Array {
        let mut pairs = Vec::with_capacity(len.min(1 << 16));
        for _ in 0..len {
            let n = r.read_array_len()?;
            if n != 2 {
                return Err(EventError::invalid(
                    "token_ids",
                    format!("bigram entry has {n} elements"),
                ));
            }
            pairs.push([read_u32(r, "token_ids")?, read_u32(r, "token_ids")?]);
        }
        Ok(TokenIds::Bigram(pairs))
    } else {
        let mut ids = Vec::with_capacity(len.min(1 << 16));
        for _ in 0..len {
            ids.push(read_u32(r, "token_ids")?);
        }
        Ok(TokenIds::Plain(ids))
    }
}

fn read_block_size(r: &mut Reader<'_>) -> Result<u64, EventError> {
    let v = r.read_int()?;
    u64::try_from(v).map_err(|_| EventError::invalid("block_size", format!("{v} is negative")))
}

fn read_opt_str(r: &mut Reader<'_>, field: &'static str) -> Result<Option<String>, EventError> {
    if r.try_nil()? {
        return Ok(None);
    }
    match r.peek_kind()? {
        Kind::Str => Ok(Some(r.read_str()?.to_owned())),
        other => Err(EventError::invalid(
            field,
            format!("expected str, found {}", other.name()),
        )),
    }
}

/// Position 7: vLLM's `lora_name` (str), or SGLang's metadata map (`cache_salt`, ...).
fn read_lora_or_metadata(r: &mut Reader<'_>, f: &mut Fields) -> Result<(), EventError> {
    match r.peek_kind()? {
        Kind::Nil => {
            r.skip_value()?;
        }
        Kind::Str => f.lora_name = Some(r.read_str()?.to_owned()),
        Kind::Map => {
            let len = r.read_map_len()?;
            for _ in 0..len {
                let key = if r.peek_kind()? == Kind::Str {
                    Some(r.read_str()?)
                } else {
                    r.skip_value()?;
                    None
                };
                match key {
                    Some("cache_salt") => f.metadata_salt = read_opt_str(r, "cache_salt")?,
                    Some("lora_name") => f.lora_name = read_opt_str(r, "lora_name")?,
                    _ => r.skip_value()?,
                }
            }
        }
        other => {
            return Err(EventError::invalid(
                "lora_name",
                format!("expected str, map or nil, found {}", other.name()),
            ))
        }
    }
    Ok(())
}

/// `extra_keys`: nil, or one entry per block (nil or array). Only the first block's entry can
/// carry a cache salt, so only it is kept.
fn read_first_extra_keys(r: &mut Reader<'_>) -> Result<Option<Vec<ExtraKey>>, EventError> {
    if r.try_nil()? {
        return Ok(None);
    }
    let kind = r.peek_kind()?;
    if kind != Kind::Array {
        return Err(EventError::invalid(
            "extra_keys",
            format!("expected array or nil, found {}", kind.name()),
        ));
    }
    let blocks = r.read_array_len()?;
    let mut first = None;
    for i in 0..blocks {
        if i > 0 || r.peek_kind()? != Kind::Array {
            r.skip_value()?;
            continue;
        }
        let n = r.read_array_len()?;
        let mut keys = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            if r.peek_kind()? == Kind::Str {
                // A non-UTF-8 string cannot be a salt a query could name; treat it as opaque.
                match std::str::from_utf8(r.read_str_bytes()?) {
                    Ok(s) => keys.push(ExtraKey::Str(s.to_owned())),
                    Err(_) => keys.push(ExtraKey::Other),
                }
            } else {
                r.skip_value()?;
                keys.push(ExtraKey::Other);
            }
        }
        first = Some(keys);
    }
    Ok(first)
}

fn is_mm_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache salt carried in the first block's `extra_keys` (SERVICE.md §0.6, §4).
///
/// vLLM builds a block's extra keys as `lora + multimodal + cache_salt + prompt_embeds`, and adds
/// the salt only to the first block of a request. So, in the first block's entry:
///
/// 1. a string `dynamo-cache-salt:<ns>` (Dynamo's tag) wins: the salt is `<ns>`;
/// 2. otherwise the entry at index 0 is skipped if it equals the event's `lora_name` (the LoRA
///    key comes first); strings that are 64-hex digests are old-style multimodal hashes and are
///    skipped; non-strings (`[identifier, offset]` MM pairs, int LoRA ids, prompt-embeds bytes)
///    are skipped;
/// 3. the last remaining string is the salt (it follows the MM keys).
///
/// Empty strings count as absent. Limitation: an old vLLM that published a *user-supplied*
/// multimodal UUID as a bare non-hex string in a salted first block is ambiguous; the rule then
/// picks the last string, which is the salt because salt keys follow MM keys.
pub fn cache_salt_from_extra_keys(keys: &[ExtraKey], lora_name: Option<&str>) -> Option<String> {
    let lora = lora_name.filter(|l| !l.is_empty());
    let mut candidate = None;
    for (i, key) in keys.iter().enumerate() {
        let ExtraKey::Str(s) = key else { continue };
        if let Some(ns) = s.strip_prefix(DYNAMO_CACHE_SALT_TAG) {
            return Some(ns.to_owned()).filter(|ns| !ns.is_empty());
        }
        if i == 0 && lora == Some(s.as_str()) {
            continue;
        }
        if s.is_empty() || is_mm_digest(s) {
            continue;
        }
        candidate = Some(s);
    }
    candidate.cloned()
}

/// Tier of a `medium` string (SERVICE.md §5.3 table); `Err` for an unknown medium.
pub fn tier_for_medium(medium: Option<&str>) -> Result<StorageTier, EventError> {
    let Some(m) = medium else {
        return Ok(StorageTier::Device);
    };
    let upper = m.to_ascii_uppercase();
    Ok(match upper.as_str() {
        "GPU" | "DEVICE" => StorageTier::Device,
        "CPU" | "CPU_PINNED" | "CPU_TIER1" => StorageTier::HostPinned,
        "CPU_TIER2" | "DISK" | "NVME" | "STORAGE" => StorageTier::Disk,
        "EXTERNAL" | "NETWORK" | "REMOTE" | "SHARED" => StorageTier::External,
        _ => return Err(EventError::UnknownMedium(m.to_owned())),
    })
}

fn build_event(tag: Tag, f: Fields) -> Result<EngineEvent, EventError> {
    match tag {
        Tag::Cleared => Ok(EngineEvent::AllBlocksCleared),
        Tag::Ignored => Ok(EngineEvent::Ignored),
        Tag::Removed => Ok(EngineEvent::BlockRemoved(BlockRemoved {
            block_hashes: f
                .block_hashes
                .ok_or(EventError::MissingField("block_hashes"))?,
            tier: tier_for_medium(f.medium.as_deref())?,
            group: f.group,
        })),
        Tag::Stored => {
            let block_hashes = f
                .block_hashes
                .ok_or(EventError::MissingField("block_hashes"))?;
            let token_ids = f.token_ids.ok_or(EventError::MissingField("token_ids"))?;
            let block_size = f.block_size.ok_or(EventError::MissingField("block_size"))?;
            let tier = tier_for_medium(f.medium.as_deref())?;
            let cache_salt = f.metadata_salt.filter(|s| !s.is_empty()).or_else(|| {
                f.first_extra_keys
                    .as_deref()
                    .and_then(|k| cache_salt_from_extra_keys(k, f.lora_name.as_deref()))
            });
            Ok(EngineEvent::BlockStored(BlockStored {
                block_hashes,
                parent_block_hash: f.parent_block_hash,
                token_ids,
                block_size,
                tier,
                lora_name: f.lora_name.filter(|s| !s.is_empty()),
                cache_salt,
                group: f.group,
            }))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Conversion to kvindex events
// ---------------------------------------------------------------------------------------------

/// What conversion needs to know about the listener the batch arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertContext {
    /// The registered worker (instance) id.
    pub worker_id: u64,
    /// The listener's registered dp_rank (used when the batch carries none).
    pub dp_rank: u32,
    /// The partition's block size: local hashes are computed with it.
    pub block_size: u32,
    /// The batch sequence number, used as `event_id` of every event of the batch (the index
    /// treats ids as opaque; the same seq gives the same ids on replay).
    pub seq: u64,
}

/// Why a well-formed event produced no kvindex event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The `Ignored` tag.
    Ignored,
    /// A non-main KV group (sliding window, mamba, `group_idx != 0`, ...).
    NonMainKvGroup,
    /// The event's block size differs from the partition's: nothing stored (SERVICE.md §4).
    BlockSizeMismatch {
        /// The event's `block_size`.
        event: u64,
        /// The partition's block size.
        partition: u32,
    },
    /// Not one complete block of tokens (or no hashes).
    NoCompleteBlock,
    /// The same engine hash twice in one store (parent included): the event is dropped.
    DuplicateBlockHash,
}

impl SkipReason {
    /// Metric label (`kvindex_zmq_events_skipped_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            SkipReason::Ignored => "ignored",
            SkipReason::NonMainKvGroup => "non_main_kv_group",
            SkipReason::BlockSizeMismatch { .. } => "block_size_mismatch",
            SkipReason::NoCompleteBlock => "no_complete_block",
            SkipReason::DuplicateBlockHash => "duplicate_block_hash",
        }
    }
}

/// A batch converted to kvindex events.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertedBatch {
    /// Events to hand to the sink, in batch order.
    pub events: Vec<RouterEvent>,
    /// Well-formed events that produce nothing, with their batch index.
    pub skipped: Vec<(usize, SkipReason)>,
    /// Undecodable events: all counted, the first ones with their batch index.
    pub rejected: Rejections,
    /// Stores cut short because `token_ids` ended before the last hash's block.
    pub truncated_stores: usize,
    /// The effective dp_rank of the batch's events.
    pub dp_rank: u32,
}

/// Convert a decoded batch to kvindex [`RouterEvent`]s (SERVICE.md §4, §5.3, §6).
pub fn convert_batch(batch: EngineBatch, ctx: &ConvertContext) -> ConvertedBatch {
    let dp_rank = batch.dp_rank.unwrap_or(ctx.dp_rank);
    let mut out = ConvertedBatch {
        events: Vec::with_capacity(batch.events.len()),
        skipped: Vec::new(),
        rejected: batch.rejected,
        truncated_stores: 0,
        dp_rank,
    };
    let wrap = |tier: StorageTier, data: KvCacheEventData| RouterEvent {
        worker_id: ctx.worker_id,
        storage_tier: tier,
        residency_domain: None,
        event: KvCacheEvent {
            event_id: ctx.seq,
            data,
            dp_rank,
        },
    };
    for (index, event) in batch.events {
        match event {
            EngineEvent::Ignored => out.skipped.push((index, SkipReason::Ignored)),
            EngineEvent::AllBlocksCleared => {
                out.events
                    .push(wrap(StorageTier::Device, KvCacheEventData::Cleared));
            }
            EngineEvent::BlockRemoved(removed) => {
                if !removed.group.is_main() {
                    out.skipped.push((index, SkipReason::NonMainKvGroup));
                    continue;
                }
                let data = KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: removed
                        .block_hashes
                        .into_iter()
                        .map(ExternalSequenceBlockHash)
                        .collect(),
                });
                out.events.push(wrap(removed.tier, data));
            }
            EngineEvent::BlockStored(stored) => match convert_store(&stored, ctx.block_size) {
                Ok((data, truncated)) => {
                    out.truncated_stores += usize::from(truncated);
                    out.events.push(wrap(stored.tier, data));
                }
                Err(reason) => out.skipped.push((index, reason)),
            },
        }
    }
    out
}

/// Build the `stored` data of one `BlockStored`: local hashes from token ids, engine hashes as
/// identities. Returns whether the store was cut short by too few token ids.
fn convert_store(
    stored: &BlockStored,
    partition_block_size: u32,
) -> Result<(KvCacheEventData, bool), SkipReason> {
    if !stored.group.is_main() {
        return Err(SkipReason::NonMainKvGroup);
    }
    if stored.block_size != u64::from(partition_block_size) || partition_block_size == 0 {
        return Err(SkipReason::BlockSizeMismatch {
            event: stored.block_size,
            partition: partition_block_size,
        });
    }
    // Dynamo drops a store that names the same hash twice (parent included): the chain would
    // reference itself.
    let mut seen: Vec<u64> = stored.block_hashes.clone();
    seen.extend(stored.parent_block_hash);
    seen.sort_unstable();
    if seen.windows(2).any(|w| w[0] == w[1]) {
        return Err(SkipReason::DuplicateBlockHash);
    }

    let bs = partition_block_size as usize;
    let opts = HashOptions {
        lora_name: stored.lora_name.as_deref(),
        cache_namespace: stored.cache_salt.as_deref(),
        block_mm_infos: None,
        is_eagle: matches!(stored.token_ids, TokenIds::Bigram(_)),
    };
    let complete = stored.token_ids.len() / bs;
    let n = complete.min(stored.block_hashes.len());
    if n == 0 {
        return Err(SkipReason::NoCompleteBlock);
    }
    let locals = match &stored.token_ids {
        TokenIds::Plain(ids) => {
            compute_block_hash_for_seq(&ids[..n * bs], partition_block_size, &opts)
        }
        TokenIds::Bigram(pairs) => {
            // Pair i is (t_i, t_{i+1}): n blocks of bigrams cover n*bs + 1 tokens, hashed as
            // eagle windows of bs + 1 tokens with stride bs.
            let used = &pairs[..n * bs];
            let mut flat: Vec<u32> = used.iter().map(|p| p[0]).collect();
            flat.extend(used.last().map(|p| p[1]));
            compute_block_hash_for_seq(&flat, partition_block_size, &opts)
        }
    };
    let blocks = stored
        .block_hashes
        .iter()
        .zip(locals)
        .map(|(&ext, local)| KvCacheStoredBlockData {
            block_hash: ExternalSequenceBlockHash(ext),
            tokens_hash: local,
            mm_extra_info: None,
        })
        .collect();
    let truncated = n < stored.block_hashes.len();
    Ok((
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: stored.parent_block_hash.map(ExternalSequenceBlockHash),
            start_position: None,
            blocks,
        }),
        truncated,
    ))
}

/// Decode and convert one payload: [`decode_batch`] then [`convert_batch`].
pub fn decode_payload(payload: &[u8], ctx: &ConvertContext) -> Result<ConvertedBatch, BatchError> {
    decode_batch(payload).map(|b| convert_batch(b, ctx))
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Counter: live messages dropped before decoding, by `reason` (`frame_count`, `seq_length`,
/// `decode_failed`).
pub const METRIC_MESSAGES_DROPPED: &str = "kvindex_zmq_messages_dropped_total";
/// Counter: events rejected inside otherwise good batches, by `reason`
/// (`unknown_medium`, `unknown_tag`, `missing_field`, `invalid_field`, `malformed`).
pub const METRIC_EVENTS_REJECTED: &str = "kvindex_zmq_events_rejected_total";
/// Counter: well-formed events that produce nothing, by `reason` ([`SkipReason::label`]).
pub const METRIC_EVENTS_SKIPPED: &str = "kvindex_zmq_events_skipped_total";
/// Counter: kvindex events produced, by `event_type` (`stored`, `removed`, `cleared`).
pub const METRIC_EVENTS_DECODED: &str = "kvindex_zmq_events_decoded_total";
/// Counter: stores cut short by too few token ids.
pub const METRIC_TRUNCATED_STORES: &str = "kvindex_zmq_truncated_stores_total";

/// Count a frame-level drop.
pub fn record_frame_error(err: &FrameError) {
    metrics::counter!(METRIC_MESSAGES_DROPPED, "reason" => err.label()).increment(1);
}

/// Count a payload that failed to decode as a whole.
pub fn record_batch_error(_err: &BatchError) {
    metrics::counter!(METRIC_MESSAGES_DROPPED, "reason" => "decode_failed").increment(1);
}

/// Count the outcome of one converted batch.
pub fn record_batch_metrics(batch: &ConvertedBatch) {
    for (label, n) in batch.rejected.by_label() {
        metrics::counter!(METRIC_EVENTS_REJECTED, "reason" => label).increment(n as u64);
    }
    for (_, reason) in &batch.skipped {
        metrics::counter!(METRIC_EVENTS_SKIPPED, "reason" => reason.label()).increment(1);
    }
    for event in &batch.events {
        metrics::counter!(METRIC_EVENTS_DECODED, "event_type" => event.event.data.kind_label())
            .increment(1);
    }
    if batch.truncated_stores > 0 {
        metrics::counter!(METRIC_TRUNCATED_STORES).increment(batch.truncated_stores as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvindex_engine::hashing::compute_block_hash_for_seq;
    use kvindex_engine::LocalBlockHash;
    use proptest::prelude::*;

    /// A hand-rolled msgpack builder: every byte of the test inputs is visible in the test.
    #[derive(Default, Clone)]
    struct Mp(Vec<u8>);

    impl Mp {
        fn arr(mut self, n: u32) -> Self {
            rmp::encode::write_array_len(&mut self.0, n).unwrap();
            self
        }
        fn map(mut self, n: u32) -> Self {
            rmp::encode::write_map_len(&mut self.0, n).unwrap();
            self
        }
        fn s(mut self, v: &str) -> Self {
            rmp::encode::write_str(&mut self.0, v).unwrap();
            self
        }
        fn u(mut self, v: u64) -> Self {
            rmp::encode::write_uint(&mut self.0, v).unwrap();
            self
        }
        fn i(mut self, v: i64) -> Self {
            rmp::encode::write_sint(&mut self.0, v).unwrap();
            self
        }
        fn nil(mut self) -> Self {
            rmp::encode::write_nil(&mut self.0).unwrap();
            self
        }
        fn bin(mut self, v: &[u8]) -> Self {
            rmp::encode::write_bin(&mut self.0, v).unwrap();
            self
        }
        fn f(mut self, v: f64) -> Self {
            rmp::encode::write_f64(&mut self.0, v).unwrap();
            self
        }
        fn raw(mut self, other: &Mp) -> Self {
            self.0.extend_from_slice(&other.0);
            self
        }
        fn uints(self, vs: &[u64]) -> Self {
            let mut m = self.arr(vs.len() as u32);
            for &v in vs {
                m = m.u(v);
            }
            m
        }
    }

    const BS: u32 = 4;
    /// SERVICE.md §4 check value: tokens [1,2,3,4], block size 4.
    const H1234: u64 = 14_643_705_804_678_351_452;

    fn ctx() -> ConvertContext {
        ConvertContext {
            worker_id: 7,
            dp_rank: 0,
            block_size: BS,
            seq: 42,
        }
    }

    /// `[ts, events, dp]` around already-encoded events.
    fn batch(events: &[Mp], dp: Option<u64>) -> Vec<u8> {
        let mut m = Mp::default().arr(3).f(1.5).arr(events.len() as u32);
        for e in events {
            m = m.raw(e);
        }
        match dp {
            Some(d) => m.u(d).0,
            None => m.nil().0,
        }
    }

    /// A positional BlockStored array of `fields` elements with its first five written (tag,
    /// `hashes`, `parent`, `tokens`, `block_size`); the caller appends the other `fields - 5`.
    fn stored_head(
        fields: u32,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u64],
        block_size: u64,
    ) -> Mp {
        let m = Mp::default().arr(fields).s("BlockStored").uints(hashes);
        let m = match parent {
            Some(p) => m.u(p),
            None => m.nil(),
        };
        m.uints(tokens).u(block_size)
    }

    /// Positional BlockStored with the seven always-present fields.
    fn stored_pos(hashes: &[u64], parent: Option<u64>, tokens: &[u64], medium: Option<&str>) -> Mp {
        let m = stored_head(8, hashes, parent, tokens, u64::from(BS)).nil();
        let m = match medium {
            Some(md) => m.s(md),
            None => m.nil(),
        };
        m.nil()
    }

    fn convert(payload: &[u8]) -> ConvertedBatch {
        decode_payload(payload, &ctx()).expect("batch decodes")
    }

    fn stored_blocks(ev: &RouterEvent) -> Vec<(u64, u64)> {
        match &ev.event.data {
            KvCacheEventData::Stored(s) => s
                .blocks
                .iter()
                .map(|b| (b.block_hash.0, b.tokens_hash.0))
                .collect(),
            other => panic!("not a store: {other:?}"),
        }
    }

    fn local(tokens: &[u32], lora: Option<&str>, salt: Option<&str>) -> Vec<LocalBlockHash> {
        compute_block_hash_for_seq(
            tokens,
            BS,
            &HashOptions {
                lora_name: lora,
                cache_namespace: salt,
                ..HashOptions::default()
            },
        )
    }

    // -- frames ---------------------------------------------------------------------------

    #[test]
    fn three_frames_with_big_endian_seq_split() {
        let frames: [&[u8]; 3] = [b"kv-events", &[0, 0, 0, 0, 0, 0, 1, 2], b"payload"];
        let raw = split_live_message(&frames).unwrap();
        assert_eq!(raw.seq, 258);
        assert_eq!(raw.topic, b"kv-events");
        assert_eq!(raw.payload, b"payload");
    }

    #[test]
    fn wrong_frame_count_and_short_seq_are_frame_errors() {
        let two: [&[u8]; 2] = [b"", &[0; 8]];
        assert_eq!(split_live_message(&two), Err(FrameError::FrameCount(2)));
        assert_eq!(
            FrameError::FrameCount(2).to_string(),
            "Unexpected ZMQ frame count: 2"
        );
        let short: [&[u8]; 3] = [b"", &[0; 4], b"x"];
        assert_eq!(split_live_message(&short), Err(FrameError::SeqLength(4)));
        assert_eq!(
            FrameError::SeqLength(4).to_string(),
            "Invalid sequence number length: 4"
        );
        let none: [&[u8]; 0] = [];
        assert_eq!(split_live_message(&none), Err(FrameError::FrameCount(0)));
        // Bit 63 set: reserved for JetStream's tagged sequences, dropped like a bad frame.
        let reserved = [&b"t"[..], &(1u64 << 63 | 5).to_be_bytes()[..], &b"p"[..]];
        assert_eq!(
            split_live_message(&reserved),
            Err(FrameError::ReservedSeq(1 << 63 | 5))
        );
        assert_eq!(
            FrameError::ReservedSeq(1 << 63).label(),
            "reserved_seq",
            "counted in kvindex_zmq_messages_dropped_total"
        );
        let largest = [&b"t"[..], &((1u64 << 63) - 1).to_be_bytes()[..], &b"p"[..]];
        assert_eq!(
            split_live_message(&largest).map(|r| r.seq),
            Ok((1 << 63) - 1)
        );
    }

    // -- stores ----------------------------------------------------------------------------

    #[test]
    fn positional_store_recomputes_local_hash_and_keeps_engine_hash() {
        let out = convert(&batch(
            &[stored_pos(&[11], None, &[1, 2, 3, 4], Some("GPU"))],
            None,
        ));
        assert_eq!(out.events.len(), 1);
        let ev = &out.events[0];
        assert_eq!(ev.worker_id, 7);
        assert_eq!(ev.storage_tier, StorageTier::Device);
        assert_eq!(ev.event.event_id, 42, "event id is the batch sequence");
        assert_eq!(ev.event.dp_rank, 0);
        assert_eq!(stored_blocks(ev), vec![(11, H1234)]);
        match &ev.event.data {
            KvCacheEventData::Stored(s) => assert_eq!(s.parent_hash, None),
            _ => unreachable!(),
        }
    }

    #[test]
    fn map_store_in_any_field_order_with_unknown_keys_matches_positional() {
        let map = Mp::default()
            .map(7)
            .s("token_ids")
            .uints(&[1, 2, 3, 4, 5, 6, 7, 8])
            .s("some_future_field")
            .arr(1)
            .map(0)
            .s("block_size")
            .u(4)
            .s("type")
            .s("BlockStored")
            .s("parent_block_hash")
            .u(10)
            .s("block_hashes")
            .uints(&[11, 12])
            .s("medium")
            .s("GPU");
        let pos = stored_pos(&[11, 12], Some(10), &[1, 2, 3, 4, 5, 6, 7, 8], Some("GPU"));
        let a = convert(&batch(&[map], None));
        let b = convert(&batch(&[pos], None));
        assert_eq!(a.events, b.events);
        let want = local(&[1, 2, 3, 4, 5, 6, 7, 8], None, None);
        assert_eq!(
            stored_blocks(&a.events[0]),
            vec![(11, want[0].0), (12, want[1].0)]
        );
    }

    #[test]
    fn positional_and_map_events_mix_in_one_batch() {
        let map_removed = Mp::default()
            .map(2)
            .s("type")
            .s("BlockRemoved")
            .s("block_hashes")
            .uints(&[11]);
        let cleared = Mp::default().arr(1).s("AllBlocksCleared");
        let out = convert(&batch(
            &[
                stored_pos(&[11], None, &[1, 2, 3, 4], None),
                map_removed,
                cleared,
            ],
            None,
        ));
        let kinds: Vec<_> = out
            .events
            .iter()
            .map(|e| e.event.data.kind_label())
            .collect();
        assert_eq!(kinds, ["stored", "removed", "cleared"]);
    }

    #[test]
    fn arrays_ending_early_and_extra_trailing_elements_are_accepted() {
        // Only tag, hashes, parent, tokens, block_size: lora_id, medium, lora_name omitted.
        let short = stored_head(5, &[11], None, &[1, 2, 3, 4], 4);
        // Every field plus a block_mm_infos, group_idx 0, kind, window and an unknown extra.
        let long = stored_pos(&[21], None, &[1, 2, 3, 4], Some("GPU"));
        let mut long_bytes = long.0.clone();
        long_bytes[0] = 0x9e; // fixarray of 14 instead of 8
        let long = Mp(long_bytes)
            .nil() // extra_keys
            .nil() // block_mm_infos
            .u(0) // group_idx
            .s("full_attention")
            .u(128) // sliding window
            .s("something newer");
        let out = convert(&batch(&[short, long], None));
        assert!(out.rejected.is_empty(), "{:?}", out.rejected);
        assert_eq!(out.events.len(), 2);
        assert_eq!(stored_blocks(&out.events[0]), vec![(11, H1234)]);
        assert_eq!(stored_blocks(&out.events[1]), vec![(21, H1234)]);
    }

    #[test]
    fn non_main_kv_groups_are_skipped() {
        let with_tail = |tail: &dyn Fn(Mp) -> Mp, n: u8| {
            let base = stored_pos(&[11], None, &[1, 2, 3, 4], None);
            let mut bytes = base.0;
            bytes[0] = 0x90 + 9 + n; // 8 fields + extra_keys + n tail fields
            tail(Mp(bytes).nil())
        };
        let group1 = with_tail(&|m| m.nil().u(1), 2);
        let group2_full = with_tail(&|m| m.nil().u(2).s("full_attention"), 3);
        let sliding = with_tail(&|m| m.nil().u(0).s("sliding_window"), 3);
        let out = convert(&batch(&[group1, group2_full, sliding], None));
        assert_eq!(out.events.len(), 1, "only group 2 + full_attention is kept");
        assert_eq!(
            out.skipped,
            vec![
                (0, SkipReason::NonMainKvGroup),
                (2, SkipReason::NonMainKvGroup)
            ]
        );
        // Map form: group_idx alone.
        let map = Mp::default()
            .map(3)
            .s("type")
            .s("BlockRemoved")
            .s("block_hashes")
            .uints(&[1])
            .s("group_idx")
            .u(3);
        let out = convert(&batch(&[map], None));
        assert_eq!(out.skipped, vec![(0, SkipReason::NonMainKvGroup)]);
    }

    #[test]
    fn signed_and_bin_hashes_normalise_to_the_same_identity() {
        let signed = Mp::default()
            .arr(5)
            .s("BlockStored")
            .arr(1)
            .i(-5)
            .i(-6)
            .uints(&[1, 2, 3, 4])
            .u(4);
        let out = convert(&batch(&[signed], None));
        assert_eq!(stored_blocks(&out.events[0]), vec![(u64::MAX - 4, H1234)]);
        match &out.events[0].event.data {
            KvCacheEventData::Stored(s) => {
                assert_eq!(s.parent_hash, Some(ExternalSequenceBlockHash(u64::MAX - 5)))
            }
            _ => unreachable!(),
        }
        // vLLM with integer hashes off: 32-byte digests; the identity is the last 8 bytes BE,
        // exactly what integer mode would have published.
        let mut digest = [0x5au8; 32];
        digest[24..].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        let bin = Mp::default()
            .arr(5)
            .s("BlockStored")
            .arr(1)
            .bin(&digest)
            .bin(&[1, 0])
            .uints(&[1, 2, 3, 4])
            .u(4);
        let removed = Mp::default().arr(2).s("BlockRemoved").arr(1).bin(&digest);
        let out = convert(&batch(&[bin, removed], None));
        assert_eq!(
            stored_blocks(&out.events[0]),
            vec![(0x0102_0304_0506_0708, H1234)]
        );
        match &out.events[1].event.data {
            KvCacheEventData::Removed(r) => assert_eq!(
                r.block_hashes,
                vec![ExternalSequenceBlockHash(0x0102_0304_0506_0708)]
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(hash_from_bytes(&[1, 0]), 256);
        assert_eq!(hash_from_bytes(&[]), 0);
    }

    #[test]
    fn unknown_medium_rejects_only_that_event_with_its_label() {
        let out = convert(&batch(
            &[
                stored_pos(&[11], None, &[1, 2, 3, 4], Some("FOO")),
                stored_pos(&[12], None, &[1, 2, 3, 4], Some("GPU")),
            ],
            None,
        ));
        assert_eq!(out.events.len(), 1);
        assert_eq!(stored_blocks(&out.events[0]), vec![(12, H1234)]);
        assert_eq!(out.rejected.total(), 1);
        assert_eq!(out.rejected.detailed()[0].index, 0);
        assert_eq!(
            out.rejected.detailed()[0].error,
            EventError::UnknownMedium("FOO".into())
        );
        assert_eq!(out.rejected.detailed()[0].error.label(), "unknown_medium");
    }

    #[test]
    fn medium_maps_to_tiers() {
        for (medium, tier) in [
            (None, StorageTier::Device),
            (Some("GPU"), StorageTier::Device),
            (Some("device"), StorageTier::Device),
            (Some("CPU"), StorageTier::HostPinned),
            (Some("CPU_PINNED"), StorageTier::HostPinned),
            (Some("CPU_TIER1"), StorageTier::HostPinned),
            (Some("CPU_TIER2"), StorageTier::Disk),
            (Some("DISK"), StorageTier::Disk),
            (Some("NVME"), StorageTier::Disk),
            (Some("STORAGE"), StorageTier::Disk),
            (Some("EXTERNAL"), StorageTier::External),
            (Some("NETWORK"), StorageTier::External),
            (Some("REMOTE"), StorageTier::External),
            (Some("SHARED"), StorageTier::External),
        ] {
            assert_eq!(tier_for_medium(medium).unwrap(), tier, "{medium:?}");
        }
        let removed_cpu = Mp::default().arr(3).s("BlockRemoved").uints(&[11]).s("CPU");
        let out = convert(&batch(&[removed_cpu], None));
        assert_eq!(out.events[0].storage_tier, StorageTier::HostPinned);
    }

    #[test]
    fn bad_events_are_rejected_and_their_neighbours_kept() {
        let unknown_tag = Mp::default().arr(2).s("Bogus").u(1);
        let empty = Mp::default().arr(0);
        let not_event = Mp::default().u(5);
        let map_without_type = Mp::default().map(1).s("block_hashes").uints(&[1]);
        let bad_hash = Mp::default()
            .arr(5)
            .s("BlockStored")
            .arr(1)
            .s("x")
            .nil()
            .uints(&[1, 2, 3, 4])
            .u(4);
        let missing_tokens = Mp::default().arr(2).s("BlockStored").uints(&[1]);
        let token_too_big = stored_head(5, &[1], None, &[1, 2, 3, 1 << 40], 4);
        let good = stored_pos(&[11], None, &[1, 2, 3, 4], None);
        let out = convert(&batch(
            &[
                unknown_tag,
                good.clone(),
                empty,
                not_event,
                map_without_type,
                bad_hash,
                missing_tokens,
                token_too_big,
                good,
            ],
            None,
        ));
        assert_eq!(out.events.len(), 2);
        let labels: Vec<_> = out
            .rejected
            .detailed()
            .iter()
            .map(|r| (r.index, r.error.label()))
            .collect();
        assert_eq!(
            labels,
            [
                (0, "unknown_tag"),
                (2, "unknown_tag"),
                (3, "malformed"),
                (4, "unknown_tag"),
                (5, "invalid_field"),
                (6, "missing_field"),
                (7, "invalid_field"),
            ]
        );
        assert_eq!(
            out.rejected.detailed()[0].error.to_string(),
            "unknown event type `Bogus`"
        );
    }

    #[test]
    fn lora_name_seeds_the_local_hash() {
        let m = stored_head(8, &[11], None, &[1, 2, 3, 4], 4)
            .u(3) // lora_id: ignored
            .s("GPU")
            .s("my-lora");
        let out = convert(&batch(&[m], None));
        let want = local(&[1, 2, 3, 4], Some("my-lora"), None)[0].0;
        assert_ne!(want, H1234);
        assert_eq!(stored_blocks(&out.events[0]), vec![(11, want)]);
    }

    /// A vLLM-shaped store: lora_name at 7, extra_keys at 8 with `first` as block 0's entry.
    fn vllm_store(lora: Option<&str>, first: Mp, first_len: u32) -> Mp {
        let m = stored_head(9, &[11, 12], None, &[1, 2, 3, 4, 5, 6, 7, 8], 4)
            .nil()
            .s("GPU");
        let m = match lora {
            Some(l) => m.s(l),
            None => m.nil(),
        };
        m.arr(2).arr(first_len).raw(&first).nil()
    }

    #[test]
    fn vllm_cache_salt_in_first_block_extra_keys_is_honoured() {
        let tokens = [1u32, 2, 3, 4, 5, 6, 7, 8];
        let cases: Vec<(Option<&str>, Mp, u32, Option<&str>)> = vec![
            // [salt]
            (None, Mp::default().s("tenant-a"), 1, Some("tenant-a")),
            // [lora, salt]
            (
                Some("my-lora"),
                Mp::default().s("my-lora").s("tenant-a"),
                2,
                Some("tenant-a"),
            ),
            // [lora] only: no salt
            (Some("my-lora"), Mp::default().s("my-lora"), 1, None),
            // [lora, mm digest, salt]
            (
                Some("my-lora"),
                Mp::default().s("my-lora").s(&"ab".repeat(32)).s("tenant-a"),
                3,
                Some("tenant-a"),
            ),
            // [[mm id, offset], salt, prompt-embeds bytes]
            (
                None,
                Mp::default()
                    .arr(2)
                    .s("img-1")
                    .u(0)
                    .s("tenant-a")
                    .bin(&[9; 32]),
                3,
                Some("tenant-a"),
            ),
            // old int LoRA id then salt
            (None, Mp::default().u(3).s("tenant-a"), 2, Some("tenant-a")),
            // Dynamo's tag wins
            (
                None,
                Mp::default().s("x").s("dynamo-cache-salt:ns-1"),
                2,
                Some("ns-1"),
            ),
            // a salt equal to the LoRA name: only the leading LoRA key is skipped
            (
                Some("same"),
                Mp::default().s("same").s("same"),
                2,
                Some("same"),
            ),
        ];
        for (lora, first, len, salt) in cases {
            let out = convert(&batch(&[vllm_store(lora, first, len)], None));
            let want = local(&tokens, lora, salt);
            assert_eq!(
                stored_blocks(&out.events[0]),
                vec![(11, want[0].0), (12, want[1].0)],
                "lora {lora:?} salt {salt:?}"
            );
        }
        // Salted differs from unsalted: a query without the salt cannot match.
        assert_ne!(
            local(&tokens, None, Some("tenant-a")),
            local(&tokens, None, None)
        );
    }

    #[test]
    fn salt_only_counts_in_the_first_block_entry() {
        let m = stored_head(9, &[11], None, &[1, 2, 3, 4], 4)
            .nil()
            .nil()
            .nil()
            .arr(2)
            .nil()
            .arr(1)
            .s("later-block-key");
        let out = convert(&batch(&[m], None));
        assert_eq!(stored_blocks(&out.events[0]), vec![(11, H1234)]);
    }

    #[test]
    fn sglang_metadata_map_cache_salt_is_honoured() {
        let m = stored_head(8, &[11], None, &[1, 2, 3, 4], 4)
            .nil()
            .nil()
            .map(2)
            .s("session_id")
            .s("abc")
            .s("cache_salt")
            .s("tenant-b");
        let out = convert(&batch(&[m], None));
        let want = local(&[1, 2, 3, 4], None, Some("tenant-b"))[0].0;
        assert_eq!(stored_blocks(&out.events[0]), vec![(11, want)]);
    }

    #[test]
    fn block_size_mismatch_short_tokens_and_duplicates() {
        let mismatch = stored_head(5, &[11], None, &[1, 2, 3, 4, 5, 6, 7, 8], 8);
        let short = stored_pos(&[11, 12], None, &[1, 2, 3, 4, 5, 6], None);
        let dup = stored_pos(&[11, 11], None, &[1, 2, 3, 4, 5, 6, 7, 8], None);
        let dup_parent = stored_pos(&[11], Some(11), &[1, 2, 3, 4], None);
        let too_short = stored_pos(&[11], None, &[1, 2, 3], None);
        let out = convert(&batch(&[mismatch, short, dup, dup_parent, too_short], None));
        assert_eq!(out.events.len(), 1);
        assert_eq!(
            stored_blocks(&out.events[0]),
            vec![(11, H1234)],
            "blocks up to the last complete one"
        );
        assert_eq!(out.truncated_stores, 1);
        assert_eq!(
            out.skipped,
            vec![
                (
                    0,
                    SkipReason::BlockSizeMismatch {
                        event: 8,
                        partition: 4
                    }
                ),
                (2, SkipReason::DuplicateBlockHash),
                (3, SkipReason::DuplicateBlockHash),
                (4, SkipReason::NoCompleteBlock),
            ]
        );
    }

    #[test]
    fn bigram_token_ids_hash_as_eagle_windows() {
        // Pairs (t_i, t_{i+1}) over tokens 1..=9: two blocks of 4 bigrams.
        let mut m = Mp::default()
            .arr(5)
            .s("BlockStored")
            .uints(&[11, 12])
            .nil()
            .arr(8);
        for t in 1..=8u64 {
            m = m.arr(2).u(t).u(t + 1);
        }
        let out = convert(&batch(&[m.u(4)], None));
        let flat: Vec<u32> = (1..=9).collect();
        let want = compute_block_hash_for_seq(
            &flat,
            BS,
            &HashOptions {
                is_eagle: true,
                ..HashOptions::default()
            },
        );
        assert_eq!(want.len(), 2);
        assert_eq!(
            stored_blocks(&out.events[0]),
            vec![(11, want[0].0), (12, want[1].0)]
        );
    }

    #[test]
    fn removes_and_clears_in_all_shapes() {
        let old_sglang = Mp::default().arr(2).s("BlockRemoved").uints(&[1, 2]);
        let with_tail = Mp::default()
            .arr(5)
            .s("BlockRemoved")
            .uints(&[3])
            .nil()
            .u(0)
            .s("full_attention");
        let clear_with_str = Mp::default().arr(2).s("AllBlocksCleared").s("x");
        let clear_with_int = Mp::default().arr(2).s("AllBlocksCleared").u(1);
        let clear_map = Mp::default().map(1).s("type").s("AllBlocksCleared");
        let ignored = Mp::default().arr(1).s("Ignored");
        let out = convert(&batch(
            &[
                old_sglang,
                with_tail,
                clear_with_str,
                clear_with_int,
                clear_map,
                ignored,
            ],
            None,
        ));
        assert!(out.rejected.is_empty());
        assert_eq!(out.events.len(), 5);
        assert_eq!(out.skipped, vec![(5, SkipReason::Ignored)]);
        match &out.events[0].event.data {
            KvCacheEventData::Removed(r) => assert_eq!(
                r.block_hashes,
                vec![ExternalSequenceBlockHash(1), ExternalSequenceBlockHash(2)]
            ),
            other => panic!("{other:?}"),
        }
        assert!(out.events[2..]
            .iter()
            .all(|e| e.event.data == KvCacheEventData::Cleared));
    }

    // -- batches ---------------------------------------------------------------------------

    #[test]
    fn batch_dp_rank_overrides_the_registered_rank() {
        let ev = stored_pos(&[11], None, &[1, 2, 3, 4], None);
        let out = convert(&batch(std::slice::from_ref(&ev), Some(3)));
        assert_eq!(out.dp_rank, 3);
        assert_eq!(out.events[0].event.dp_rank, 3);
        let mut c = ctx();
        c.dp_rank = 2;
        let out = decode_payload(&batch(&[ev], None), &c).unwrap();
        assert_eq!(out.events[0].event.dp_rank, 2);
    }

    #[test]
    fn two_element_sglang_batch_extra_elements_and_map_batch_are_accepted() {
        let ev = stored_pos(&[11], None, &[1, 2, 3, 4], None);
        let two = Mp::default().arr(2).f(1.0).arr(1).raw(&ev);
        let four = Mp::default().arr(4).u(1).arr(1).raw(&ev).u(1).s("extra");
        let map = Mp::default()
            .map(3)
            .s("attn_dp_rank")
            .u(2)
            .s("events")
            .arr(1)
            .raw(&ev)
            .s("ts")
            .f(3.0);
        assert_eq!(convert(&two.0).events.len(), 1);
        let out = convert(&four.0);
        assert_eq!(out.events[0].event.dp_rank, 1);
        let out = convert(&map.0);
        assert_eq!(out.events[0].event.dp_rank, 2);
        assert_eq!(decode_batch(&map.0).unwrap().ts, Some(3.0));
    }

    #[test]
    fn structurally_broken_batches_fail_as_a_whole() {
        let ev = stored_pos(&[11], None, &[1, 2, 3, 4], None);
        assert!(matches!(
            decode_batch(&[0xc1]),
            Err(BatchError::Msgpack(MsgpackError::Reserved(0)))
        ));
        assert_eq!(
            decode_batch(&Mp::default().u(1).0),
            Err(BatchError::NotABatch("int"))
        );
        assert_eq!(
            decode_batch(&Mp::default().arr(1).f(1.0).0),
            Err(BatchError::TooShort(1))
        );
        assert_eq!(
            decode_batch(&Mp::default().arr(3).f(1.0).u(5).nil().0),
            Err(BatchError::EventsNotArray("int"))
        );
        assert_eq!(
            decode_batch(&Mp::default().map(1).s("ts").u(1).0),
            Err(BatchError::MissingEvents)
        );
        assert!(matches!(
            decode_batch(&Mp::default().arr(3).f(1.0).arr(0).i(-1).0),
            Err(BatchError::InvalidDpRank(_))
        ));
        assert!(matches!(
            decode_batch(&Mp::default().arr(3).f(1.0).arr(0).s("0").0),
            Err(BatchError::InvalidDpRank(_))
        ));
        // A header announcing 2^32 - 1 events must fail cleanly, not allocate for them.
        let mut huge = Mp::default().arr(3).f(1.0).0;
        huge.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        huge.push(0xc0);
        assert!(matches!(
            decode_batch(&huge),
            Err(BatchError::Msgpack(MsgpackError::Truncated(_)))
        ));
        // An events array announcing more events than the payload holds.
        let truncated = Mp::default().arr(3).f(1.0).arr(2).raw(&ev).0;
        assert!(matches!(
            decode_batch(&truncated),
            Err(BatchError::Msgpack(MsgpackError::Truncated(_)))
        ));
    }

    /// A batch of many one-byte bad events (nils) decodes with every one rejected, and the
    /// events vector is not reserved for the header's count: a decoded event is ~170 bytes, a
    /// nil one byte, so reserving one per byte would turn a large message into a far larger
    /// allocation.
    #[test]
    fn a_batch_of_many_tiny_bad_events_reserves_a_bounded_vector() {
        let n = 50_000u32;
        let mut msg = Mp::default().arr(2).f(1.0).arr(n).0;
        msg.extend(std::iter::repeat_n(0xc0u8, n as usize));
        let out = decode_batch(&msg).expect("the batch itself is well formed");
        assert_eq!(out.rejected.total(), n as usize);
        assert!(out.events.is_empty());
        assert!(
            out.events.capacity() <= MAX_RESERVED_EVENTS,
            "reserved {} events for a batch with none",
            out.events.capacity()
        );
    }

    /// A large batch of one-byte bad events (the review's 60 MiB of nils became 63 million
    /// 56-byte entries, 3.4 GiB) keeps only the first few in detail, in batch order, while the
    /// counts, in total, by label and in the metric, are exact.
    #[test]
    fn a_large_batch_of_bad_events_keeps_a_few_in_detail_and_counts_every_one() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let nils = 1_000_000usize;
        let tags = 3usize;
        let good = stored_pos(&[11], None, &[1, 2, 3, 4], None);
        let mut msg = Mp::default().arr(2).f(1.0).arr((nils + tags + 1) as u32).0;
        msg.extend(std::iter::repeat_n(0xc0u8, nils));
        for _ in 0..tags {
            msg.extend(Mp::default().arr(1).s("Bogus").0);
        }
        msg.extend(good.0);
        let out = convert(&msg);
        assert_eq!(out.events.len(), 1, "the good event is kept");
        assert_eq!(out.rejected.total(), nils + tags);
        assert!(!out.rejected.is_empty());
        let indexes: Vec<usize> = out.rejected.detailed().iter().map(|r| r.index).collect();
        assert_eq!(indexes, (0..MAX_DETAILED_REJECTIONS).collect::<Vec<_>>());
        let mut by_label: Vec<_> = out.rejected.by_label().collect();
        by_label.sort();
        assert_eq!(by_label, [("malformed", nils), ("unknown_tag", tags)]);

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || record_batch_metrics(&out));
        let mut counted: Vec<(String, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == METRIC_EVENTS_REJECTED)
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(v) => Some((
                    key.key().labels().map(|l| l.value().to_owned()).collect(),
                    v,
                )),
                _ => None,
            })
            .collect();
        counted.sort();
        assert_eq!(
            counted,
            [
                ("malformed".to_owned(), nils as u64),
                ("unknown_tag".to_owned(), tags as u64)
            ]
        );
    }

    #[test]
    fn rejected_and_skipped_events_are_counted_by_label() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let out = convert(&batch(
                &[
                    stored_pos(&[11], None, &[1, 2, 3, 4], Some("FOO")),
                    Mp::default().arr(1).s("Ignored"),
                    stored_pos(&[12], None, &[1, 2, 3, 4], None),
                ],
                None,
            ));
            record_batch_metrics(&out);
        });
        let counters: Vec<(String, Vec<String>, u64)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Counter(v) => Some((
                    key.key().name().to_owned(),
                    key.key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect(),
                    v,
                )),
                _ => None,
            })
            .collect();
        let get = |name: &str, label: &str| {
            counters
                .iter()
                .find(|(n, l, _)| n == name && l.iter().any(|x| x == label))
                .map(|c| c.2)
        };
        assert_eq!(
            get(METRIC_EVENTS_REJECTED, "reason=unknown_medium"),
            Some(1)
        );
        assert_eq!(get(METRIC_EVENTS_SKIPPED, "reason=ignored"), Some(1));
        assert_eq!(get(METRIC_EVENTS_DECODED, "event_type=stored"), Some(1));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_payload(&bytes, &ctx());
            let frames = [&bytes[..bytes.len() / 3], &bytes[bytes.len() / 3..], &bytes[..]];
            let _ = split_live_message(&frames);
            let _ = decode_event(&bytes);
        }

        #[test]
        fn mutated_valid_batches_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = batch(
                &[
                    vllm_store(Some("l"), Mp::default().s("l").s("salt"), 2),
                    Mp::default().arr(3).s("BlockRemoved").uints(&[1, 2]).s("CPU"),
                    Mp::default().map(1).s("type").s("AllBlocksCleared"),
                ],
                Some(1),
            );
            for (at, b) in flips {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            let end = cut.index(bytes.len() + 1);
            let _ = decode_payload(&bytes[..end], &ctx());
        }
    }
}
