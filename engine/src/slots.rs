//! Dense `u32` slots for (worker_id, dp_rank) streams, so that node membership costs 4 bytes (or
//! one bit) per worker instead of a 16-byte key.
//!
//! A slot's identity is written before the slot is published in any node (Release on the node's
//! membership word), so a reader that sees the slot in a node sees its identity. A freed slot is
//! reused only after an epoch grace period, so a pinned reader never maps a slot to the wrong
//! worker.

use crate::error::KvCacheEventError;
use crate::members::MAX_SLOT;
use crate::protocol::WorkerWithDpRank;
use crate::segmented::SegmentedVec;
use crate::sync::{AtomicU32, AtomicU64, Mutex, MutexGuard, Ordering};
use std::collections::BTreeMap;

/// What a slot means, readable lock-free.
#[derive(Default)]
pub(crate) struct SlotEntry {
    worker_id: AtomicU64,
    dp_rank: AtomicU32,
    /// Blocks the stream currently holds (written by its owning event thread only).
    pub(crate) blocks: AtomicU64,
}

// SAFETY: SlotEntry is three atomics; all-zero is a valid value.
unsafe impl crate::segmented::Zeroable for SlotEntry {}

#[derive(Default)]
struct Registry {
    by_stream: BTreeMap<WorkerWithDpRank, u32>,
    free: Vec<u32>,
}

/// The slot table of one namespace.
pub(crate) struct Slots {
    entries: SegmentedVec<SlotEntry>,
    registry: Mutex<Registry>,
}

impl Slots {
    pub(crate) fn new() -> Self {
        Self {
            entries: SegmentedVec::new(),
            registry: Mutex::new(Registry::default()),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The slot of `stream`, assigning one on first sight.
    pub(crate) fn assign(&self, stream: WorkerWithDpRank) -> Result<u32, KvCacheEventError> {
        let mut reg = self.registry();
        if let Some(&s) = reg.by_stream.get(&stream) {
            return Ok(s);
        }
        let slot = match reg.free.pop() {
            Some(s) => s,
            None => self
                .entries
                .push_index()
                .filter(|&s| s <= MAX_SLOT)
                .ok_or(KvCacheEventError::CapacityExhausted)?,
        };
        let e = self.entries.get(slot);
        // Relaxed: published to readers by the Release store of a membership word that
        // contains the slot (and to writers by the registry mutex).
        e.worker_id.store(stream.worker_id, Ordering::Relaxed);
        e.dp_rank.store(stream.dp_rank, Ordering::Relaxed);
        e.blocks.store(0, Ordering::Relaxed);
        reg.by_stream.insert(stream, slot);
        Ok(slot)
    }

    /// Forget `stream`; its slot becomes reusable once `recycle` is called (after a grace period).
    pub(crate) fn unregister(&self, stream: WorkerWithDpRank) -> Option<u32> {
        self.registry().by_stream.remove(&stream)
    }

    /// Make a slot reusable. Call only after every node has dropped it and an epoch has passed.
    pub(crate) fn recycle(&self, slot: u32) {
        self.registry().free.push(slot);
    }

    /// Lock-free: which stream a slot seen in a published membership word belongs to.
    #[inline]
    pub(crate) fn stream_of(&self, slot: u32) -> WorkerWithDpRank {
        let e = self.entries.get(slot);
        WorkerWithDpRank {
            worker_id: e.worker_id.load(Ordering::Relaxed),
            dp_rank: e.dp_rank.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn entry(&self, slot: u32) -> &SlotEntry {
        self.entries.get(slot)
    }

    /// Every registered stream with its slot.
    pub(crate) fn streams(&self) -> Vec<(WorkerWithDpRank, u32)> {
        self.registry()
            .by_stream
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
    }
}
