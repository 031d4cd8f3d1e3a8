//! The on-disk payload types (rkyv archives) of log records, and their conversion to and from the
//! engine's protocol types. `docs/log-format.md` §2.3 is the specification; any change to these
//! types changes the format and must bump [`crate::format::FORMAT_VERSION`] (as `DropNamespace`
//! did: version 2).
//!
//! These mirror the engine's types instead of deriving rkyv on them, so the engine stays free of
//! storage concerns and the format cannot change by accident when the engine evolves.

use kvindex_engine::{
    BlockExtraInfo, BlockMmObjectInfo, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, NamespaceKey,
    ResidencyDomain, RouterEvent, StorageTier,
};
use rkyv::{Archive, Deserialize, Serialize};

use crate::entry::{LogEntry, LogOp, NamespaceSpec};

/// One log record's payload: a batch of entries with dense LSNs from `first_lsn`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct LogBatch {
    /// LSN of `entries[0]`; entry `i` has LSN `first_lsn + i`.
    pub first_lsn: u64,
    /// Namespaces referenced by the entries (by index), so strings are stored once per batch.
    pub namespaces: Vec<NamespaceRecord>,
    /// The entries, in LSN order.
    pub entries: Vec<EntryRecord>,
}

/// A namespace as stored in a record: the key plus its block size.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct NamespaceRecord {
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
}

/// One entry: a stream, the producer's sequence and what happened.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct EntryRecord {
    /// Index into [`LogBatch::namespaces`].
    pub namespace: u32,
    pub worker_id: u64,
    pub dp_rank: u32,
    /// The producer's own sequence number (0 for control operations).
    pub source_seq: u64,
    pub op: OpRecord,
}

/// What an entry does to the index.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum OpRecord {
    /// A RouterEvent of the stream.
    Event(EventRecord),
    /// `Namespace::remove_worker(worker_id)`.
    RemoveWorker,
    /// `Namespace::remove_worker_dp_rank(worker_id, dp_rank)`.
    RemoveWorkerDpRank,
    /// `Namespace::clear_all_blocks(worker_id)`.
    ClearAllBlocks,
    /// `Engine::remove_namespace(namespace)`: the partition was dropped. Added with segment
    /// format version 2; only written into version-2 segments, so that a build reading version 1
    /// only refuses the segment (bad header version) instead of meeting an unknown variant.
    DropNamespace,
}

/// A `RouterEvent` minus the stream (stored in the entry).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct EventRecord {
    pub event_id: u64,
    pub storage_tier: TierRecord,
    pub residency_domain: DomainRecord,
    pub data: DataRecord,
}

/// Mirror of [`StorageTier`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum TierRecord {
    Device,
    HostPinned,
    Disk,
    External,
}

impl From<StorageTier> for TierRecord {
    fn from(t: StorageTier) -> Self {
        match t {
            StorageTier::Device => TierRecord::Device,
            StorageTier::HostPinned => TierRecord::HostPinned,
            StorageTier::Disk => TierRecord::Disk,
            StorageTier::External => TierRecord::External,
        }
    }
}

impl ArchivedTierRecord {
    /// The engine's tier.
    pub fn to_tier(&self) -> StorageTier {
        match self {
            ArchivedTierRecord::Device => StorageTier::Device,
            ArchivedTierRecord::HostPinned => StorageTier::HostPinned,
            ArchivedTierRecord::Disk => StorageTier::Disk,
            ArchivedTierRecord::External => StorageTier::External,
        }
    }
}

/// Mirror of `Option<ResidencyDomain>` (`Absent` = `None`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DomainRecord {
    Absent,
    Worker,
    CacheOwner,
    Unknown(String),
    Invalid,
}

/// Mirror of [`KvCacheEventData`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum DataRecord {
    Stored {
        parent_hash: Option<u64>,
        start_position: Option<u32>,
        blocks: Vec<BlockRecord>,
    },
    Removed {
        block_hashes: Vec<u64>,
    },
    Cleared,
}

/// Mirror of [`KvCacheStoredBlockData`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct BlockRecord {
    pub block_hash: u64,
    pub tokens_hash: u64,
    pub mm_extra_info: Option<Vec<MmObjectRecord>>,
}

/// Mirror of [`BlockMmObjectInfo`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MmObjectRecord {
    pub mm_hash: u64,
    pub offsets: Vec<OffsetRecord>,
}

/// One `(start, end)` pair of [`BlockMmObjectInfo::offsets`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct OffsetRecord {
    pub start: u64,
    pub end: u64,
}

// ---------------------------------------------------------------------------------------------
// Owned → record (write path)

impl LogBatch {
    /// Build the record of `entries`, whose first entry gets `first_lsn`.
    pub fn from_entries(first_lsn: u64, entries: &[LogEntry]) -> Self {
        let mut namespaces: Vec<NamespaceRecord> = Vec::with_capacity(1);
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let idx = match namespaces.iter().position(|n| {
                n.model_name == e.namespace.key.model_name
                    && n.routing_group == e.namespace.key.routing_group
                    && n.block_size == e.namespace.block_size
            }) {
                Some(i) => i,
                None => {
                    namespaces.push(NamespaceRecord {
                        model_name: e.namespace.key.model_name.clone(),
                        routing_group: e.namespace.key.routing_group.clone(),
                        block_size: e.namespace.block_size,
                    });
                    namespaces.len() - 1
                }
            };
            out.push(EntryRecord {
                namespace: idx as u32,
                worker_id: e.worker_id,
                dp_rank: e.dp_rank,
                source_seq: e.source_seq,
                op: OpRecord::from_op(&e.op),
            });
        }
        LogBatch {
            first_lsn,
            namespaces,
            entries: out,
        }
    }
}

impl OpRecord {
    fn from_op(op: &LogOp) -> Self {
        match op {
            LogOp::Event(ev) => OpRecord::Event(EventRecord::from_event(ev)),
            LogOp::RemoveWorker => OpRecord::RemoveWorker,
            LogOp::RemoveWorkerDpRank => OpRecord::RemoveWorkerDpRank,
            LogOp::ClearAllBlocks => OpRecord::ClearAllBlocks,
            LogOp::DropNamespace => OpRecord::DropNamespace,
        }
    }
}

impl EventRecord {
    fn from_event(ev: &RouterEvent) -> Self {
        EventRecord {
            event_id: ev.event.event_id,
            storage_tier: match ev.storage_tier {
                StorageTier::Device => TierRecord::Device,
                StorageTier::HostPinned => TierRecord::HostPinned,
                StorageTier::Disk => TierRecord::Disk,
                StorageTier::External => TierRecord::External,
            },
            residency_domain: match &ev.residency_domain {
                None => DomainRecord::Absent,
                Some(ResidencyDomain::Worker) => DomainRecord::Worker,
                Some(ResidencyDomain::CacheOwner) => DomainRecord::CacheOwner,
                Some(ResidencyDomain::Unknown(s)) => DomainRecord::Unknown(s.clone()),
                Some(ResidencyDomain::Invalid) => DomainRecord::Invalid,
            },
            data: match &ev.event.data {
                KvCacheEventData::Stored(s) => DataRecord::Stored {
                    parent_hash: s.parent_hash.map(|h| h.0),
                    start_position: s.start_position,
                    blocks: s
                        .blocks
                        .iter()
                        .map(|b| BlockRecord {
                            block_hash: b.block_hash.0,
                            tokens_hash: b.tokens_hash.0,
                            mm_extra_info: b.mm_extra_info.as_ref().map(|x| {
                                x.mm_objects
                                    .iter()
                                    .map(|o| MmObjectRecord {
                                        mm_hash: o.mm_hash,
                                        offsets: o
                                            .offsets
                                            .iter()
                                            .map(|&(s, e)| OffsetRecord {
                                                start: s as u64,
                                                end: e as u64,
                                            })
                                            .collect(),
                                    })
                                    .collect()
                            }),
                        })
                        .collect(),
                },
                KvCacheEventData::Removed(r) => DataRecord::Removed {
                    block_hashes: r.block_hashes.iter().map(|h| h.0).collect(),
                },
                KvCacheEventData::Cleared => DataRecord::Cleared,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Archived → owned (read path). The archive was validated by rkyv's checked access; namespace
// indices are checked by the reader (`validate_batch`) before these are called.

impl ArchivedNamespaceRecord {
    /// The owned namespace this record describes.
    pub fn to_spec(&self) -> NamespaceSpec {
        NamespaceSpec {
            key: NamespaceKey::new(self.model_name.as_str(), self.routing_group.as_str()),
            block_size: self.block_size.to_native(),
        }
    }
}

impl ArchivedEventRecord {
    /// Rebuild the RouterEvent of stream `(worker_id, dp_rank)`.
    pub fn to_router_event(&self, worker_id: u64, dp_rank: u32) -> RouterEvent {
        let storage_tier = match self.storage_tier {
            ArchivedTierRecord::Device => StorageTier::Device,
            ArchivedTierRecord::HostPinned => StorageTier::HostPinned,
            ArchivedTierRecord::Disk => StorageTier::Disk,
            ArchivedTierRecord::External => StorageTier::External,
        };
        let residency_domain = match &self.residency_domain {
            ArchivedDomainRecord::Absent => None,
            ArchivedDomainRecord::Worker => Some(ResidencyDomain::Worker),
            ArchivedDomainRecord::CacheOwner => Some(ResidencyDomain::CacheOwner),
            ArchivedDomainRecord::Unknown(s) => Some(ResidencyDomain::Unknown(s.to_string())),
            ArchivedDomainRecord::Invalid => Some(ResidencyDomain::Invalid),
        };
        let data = match &self.data {
            ArchivedDataRecord::Stored {
                parent_hash,
                start_position,
                blocks,
            } => KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent_hash
                    .as_ref()
                    .map(|h| ExternalSequenceBlockHash(h.to_native())),
                start_position: start_position.as_ref().map(|p| p.to_native()),
                blocks: blocks
                    .iter()
                    .map(|b| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(b.block_hash.to_native()),
                        tokens_hash: LocalBlockHash(b.tokens_hash.to_native()),
                        mm_extra_info: b.mm_extra_info.as_ref().map(|objs| BlockExtraInfo {
                            mm_objects: objs
                                .iter()
                                .map(|o| BlockMmObjectInfo {
                                    mm_hash: o.mm_hash.to_native(),
                                    offsets: o
                                        .offsets
                                        .iter()
                                        .map(|r| {
                                            (
                                                r.start.to_native() as usize,
                                                r.end.to_native() as usize,
                                            )
                                        })
                                        .collect(),
                                })
                                .collect(),
                        }),
                    })
                    .collect(),
            }),
            ArchivedDataRecord::Removed { block_hashes } => {
                KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: block_hashes
                        .iter()
                        .map(|h| ExternalSequenceBlockHash(h.to_native()))
                        .collect(),
                })
            }
            ArchivedDataRecord::Cleared => KvCacheEventData::Cleared,
        };
        RouterEvent {
            worker_id,
            storage_tier,
            residency_domain,
            event: KvCacheEvent {
                event_id: self.event_id.to_native(),
                data,
                dp_rank,
            },
        }
    }
}

impl ArchivedOpRecord {
    /// The owned operation (for `Event`, the RouterEvent of stream `(worker_id, dp_rank)`).
    pub fn to_op(&self, worker_id: u64, dp_rank: u32) -> LogOp {
        match self {
            ArchivedOpRecord::Event(e) => LogOp::Event(e.to_router_event(worker_id, dp_rank)),
            ArchivedOpRecord::RemoveWorker => LogOp::RemoveWorker,
            ArchivedOpRecord::RemoveWorkerDpRank => LogOp::RemoveWorkerDpRank,
            ArchivedOpRecord::ClearAllBlocks => LogOp::ClearAllBlocks,
            ArchivedOpRecord::DropNamespace => LogOp::DropNamespace,
        }
    }

    /// Whether this is a source event (which moves watermarks).
    pub fn is_event(&self) -> bool {
        matches!(self, ArchivedOpRecord::Event(_))
    }

    /// Whether this drops the entry's whole namespace.
    pub fn is_drop_namespace(&self) -> bool {
        matches!(self, ArchivedOpRecord::DropNamespace)
    }
}
