//! Dynamo-compatible wire types: `KvCacheEvent`, `RouterEvent` and friends (INDEXER.md §1.2).
//!
//! These types are decoded once at the edge (JSON or named-field msgpack) and then passed by value
//! down the event path. Field names, variant names and tolerance rules follow Dynamo 1.6.1:
//! unsigned hashes only, lowercase variants, optional fields defaulted, unknown fields ignored.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::KvCacheEventError;

/// Hash of the tokens inside one block (plus LoRA/namespace seed and multimodal hashes):
/// the tree's navigation key. Serialised as a bare u64.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct LocalBlockHash(pub u64);

/// The engine's own (rolling) hash of a block: the per-worker identity of a block, used to
/// resolve `parent_hash` and removals. Opaque to the index. Serialised as a bare u64.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct ExternalSequenceBlockHash(pub u64);

impl From<i64> for ExternalSequenceBlockHash {
    /// Engines that hash to i64 (vLLM) are reinterpreted bit for bit.
    fn from(v: i64) -> Self {
        ExternalSequenceBlockHash(v as u64)
    }
}

impl From<u64> for ExternalSequenceBlockHash {
    fn from(v: u64) -> Self {
        ExternalSequenceBlockHash(v)
    }
}

/// Instance id of a worker.
pub type WorkerId = u64;
/// Data-parallel rank (0 when DP is off).
pub type DpRank = u32;

/// The unit that owns cache: every score, lookup and clear is keyed by this pair.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub struct WorkerWithDpRank {
    pub worker_id: WorkerId,
    #[serde(default)]
    pub dp_rank: DpRank,
}

impl WorkerWithDpRank {
    pub fn new(worker_id: WorkerId, dp_rank: DpRank) -> Self {
        Self { worker_id, dp_rank }
    }
}

/// Memory tier an event concerns: `device` goes to the radix tree, the others to the
/// lower-tier maps (engine/src/lower_tiers.rs).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    #[default]
    Device,
    HostPinned,
    Disk,
    External,
}

/// Multimodal object attached to a block: only `mm_hash` takes part in hashing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockMmObjectInfo {
    pub mm_hash: u64,
    #[serde(default)]
    pub offsets: Vec<(usize, usize)>,
}

/// Multimodal extra info of one block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BlockExtraInfo {
    #[serde(default)]
    pub mm_objects: Vec<BlockMmObjectInfo>,
}

/// One stored block: the engine's hash and the local (token) hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    pub block_hash: ExternalSequenceBlockHash,
    pub tokens_hash: LocalBlockHash,
    #[serde(default)]
    pub mm_extra_info: Option<BlockExtraInfo>,
}

/// A `stored` event: a chain of blocks appended under `parent_hash` (root when `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    #[serde(default)]
    pub parent_hash: Option<ExternalSequenceBlockHash>,
    #[serde(default)]
    pub start_position: Option<u32>,
    pub blocks: Vec<KvCacheStoredBlockData>,
}

/// A `removed` event: blocks evicted by the engine, by external hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    pub block_hashes: Vec<ExternalSequenceBlockHash>,
}

/// What happened to the cache: externally tagged, snake_case (`{"stored":..}`, `{"removed":..}`,
/// `"cleared"`; `{"cleared": null}` is accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    Stored(KvCacheStoreData),
    Removed(KvCacheRemoveData),
    Cleared,
}

impl KvCacheEventData {
    /// The `event_type` metric label of this event.
    pub fn kind_label(&self) -> &'static str {
        match self {
            KvCacheEventData::Stored(_) => "stored",
            KvCacheEventData::Removed(_) => "removed",
            KvCacheEventData::Cleared => "cleared",
        }
    }
}

/// One engine event, as the index consumes it (the worker id travels beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    pub event_id: u64,
    pub data: KvCacheEventData,
    #[serde(default)]
    pub dp_rank: DpRank,
}

/// Batch wrapper used by Dynamo publishers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvCacheEvents {
    pub events: Vec<KvCacheEvent>,
    #[serde(default)]
    pub shutdown: bool,
}

/// Which cache domain an event concerns (Dynamo's `residency_domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResidencyDomain {
    /// `"worker"`: the worker's own cache.
    Worker,
    /// `"cache_owner"`: a shared cache owner; never valid on the device tier.
    CacheOwner,
    /// Any other string: the event is skipped.
    Unknown(String),
    /// null, numbers, bools, maps, arrays: the event is skipped.
    Invalid,
}

impl Serialize for ResidencyDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ResidencyDomain::Worker => s.serialize_str("worker"),
            ResidencyDomain::CacheOwner => s.serialize_str("cache_owner"),
            ResidencyDomain::Unknown(v) => s.serialize_str(v),
            ResidencyDomain::Invalid => s.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for ResidencyDomain {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Any value is accepted here; classification decides whether the event is usable.
        let value = serde_value_any::AnyValue::deserialize(d)?;
        Ok(match value {
            serde_value_any::AnyValue::Str(s) if s == "worker" => ResidencyDomain::Worker,
            serde_value_any::AnyValue::Str(s) if s == "cache_owner" => ResidencyDomain::CacheOwner,
            serde_value_any::AnyValue::Str(s) => ResidencyDomain::Unknown(s),
            serde_value_any::AnyValue::Other => ResidencyDomain::Invalid,
        })
    }
}

/// A minimal "accept anything, remember whether it was a string" deserializer, so that an invalid
/// `residency_domain` skips the event instead of failing the whole batch.
mod serde_value_any {
    use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
    use std::fmt;

    pub enum AnyValue {
        Str(String),
        Other,
    }

    impl<'de> Deserialize<'de> for AnyValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(AnyVisitor)
        }
    }

    struct AnyVisitor;

    impl<'de> Visitor<'de> for AnyVisitor {
        type Value = AnyValue;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<AnyValue, E> {
            Ok(AnyValue::Str(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<AnyValue, E> {
            Ok(AnyValue::Str(v))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_none<E: de::Error>(self) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<AnyValue, E> {
            Ok(AnyValue::Other)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<AnyValue, D::Error> {
            d.deserialize_any(AnyVisitor)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyValue, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(AnyValue::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyValue, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(AnyValue::Other)
        }
    }
}

/// An event with the worker it came from: the unit of dumps, logs and the NATS/HTTP wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterEvent {
    pub worker_id: WorkerId,
    #[serde(default)]
    pub storage_tier: StorageTier,
    /// `None` = field absent (legacy: the worker domain). An explicit null is `Some(Invalid)`.
    #[serde(
        default,
        deserialize_with = "deserialize_present_residency_domain",
        skip_serializing_if = "Option::is_none"
    )]
    pub residency_domain: Option<ResidencyDomain>,
    pub event: KvCacheEvent,
}

impl RouterEvent {
    pub fn new(worker_id: WorkerId, event: KvCacheEvent) -> Self {
        Self {
            worker_id,
            storage_tier: StorageTier::Device,
            residency_domain: None,
            event,
        }
    }

    /// The stream (worker, dp_rank) this event belongs to.
    pub fn stream(&self) -> WorkerWithDpRank {
        WorkerWithDpRank::new(self.worker_id, self.event.dp_rank)
    }

    /// Whether the primary (GPU, worker-domain) index may consume this event (INDEXER.md §1.2).
    ///
    /// Exists because decoding is deliberately lenient about `storage_tier` and
    /// `residency_domain` (so one odd event does not fail a whole batch); this is where such
    /// events are turned away. Accepted: the `device` tier with a missing domain (legacy, meaning
    /// the worker domain) or `"worker"`. Everything else — another tier, `"cache_owner"`, an
    /// unknown string, or an invalid value such as `null` — gives
    /// [`KvCacheEventError::UnsupportedResidencyDomain`], and the event must be skipped.
    pub fn classify(&self) -> Result<(), KvCacheEventError> {
        if self.storage_tier != StorageTier::Device {
            return Err(KvCacheEventError::UnsupportedResidencyDomain);
        }
        match self.residency_domain {
            None | Some(ResidencyDomain::Worker) => Ok(()),
            Some(
                ResidencyDomain::CacheOwner
                | ResidencyDomain::Unknown(_)
                | ResidencyDomain::Invalid,
            ) => Err(KvCacheEventError::UnsupportedResidencyDomain),
        }
    }
}

impl RouterEvent {
    /// Which tier of the index this event goes to, or why it is refused (SERVICE.md §6.4).
    ///
    /// Exists beside [`RouterEvent::classify`] (the device-only check kept for its callers):
    /// the engine indexes every tier. Accepted: any tier with a missing domain or `"worker"`.
    /// `"cache_owner"`, unknown strings and invalid values give
    /// [`KvCacheEventError::UnsupportedResidencyDomain`].
    pub fn index_tier(&self) -> Result<StorageTier, KvCacheEventError> {
        match self.residency_domain {
            None | Some(ResidencyDomain::Worker) => Ok(self.storage_tier),
            Some(
                ResidencyDomain::CacheOwner
                | ResidencyDomain::Unknown(_)
                | ResidencyDomain::Invalid,
            ) => Err(KvCacheEventError::UnsupportedResidencyDomain),
        }
    }
}

/// Free-function form of [`RouterEvent::classify`], for call sites that filter with a fn pointer
/// (e.g. `events.iter().filter(|e| check_device_worker_domain(e).is_ok())`).
pub fn check_device_worker_domain(event: &RouterEvent) -> Result<(), KvCacheEventError> {
    event.classify()
}

/// `deserialize_with` helper for `RouterEvent::residency_domain`: called only when the field is
/// present, so any present value — including an explicit `null` / msgpack nil — becomes
/// `Some(..)` (`null` → `Some(Invalid)`); an absent field falls back to `default` (`None`).
fn deserialize_present_residency_domain<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<ResidencyDomain>, D::Error> {
    ResidencyDomain::deserialize(d).map(Some)
}

pub use crate::scores::ScoreMap;

/// Result of `find_matches`: per (worker, dp_rank), the number of leading query blocks it holds.
/// Workers scoring 0 are absent. `frequencies` is legacy and always empty.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OverlapScores {
    pub scores: ScoreMap,
    pub frequencies: Vec<usize>,
}

impl OverlapScores {
    /// Scores sorted by (worker_id, dp_rank), for deterministic output and comparison.
    pub fn sorted(&self) -> Vec<(WorkerWithDpRank, u32)> {
        self.scores.sorted()
    }
}
