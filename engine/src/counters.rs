//! Event outcome counters: exported through the `metrics` crate with Dynamo's names and labels
//! (INDEXER.md §7), and kept as plain atomics per namespace so that callers can read them.

use crate::error::KvCacheEventError;
use crate::sync::{AtomicU64, Ordering};

/// Prometheus name of the applied-events counter (Dynamo's unregistered-instance name).
pub const EVENTS_APPLIED: &str = "dynamo_kvrouter_kv_cache_events_applied";
/// Prometheus name of the suspicious-events counter.
pub const EVENT_WARNINGS: &str = "dynamo_kvrouter_kv_cache_event_warnings";

const TYPES: [&str; 3] = ["stored", "removed", "cleared"];
const STATUSES: [&str; 7] = [
    "ok",
    "parent_block_not_found",
    "block_not_found",
    "invalid_block",
    "capacity_exhausted",
    "unsupported_residency_domain",
    "indexer_invariant_violation",
];

fn status_index(r: &Result<(), KvCacheEventError>) -> usize {
    match r {
        Ok(()) => 0,
        Err(KvCacheEventError::ParentBlockNotFound) => 1,
        Err(KvCacheEventError::BlockNotFound) => 2,
        Err(KvCacheEventError::InvalidBlockSequence) => 3,
        Err(KvCacheEventError::CapacityExhausted) => 4,
        Err(KvCacheEventError::UnsupportedResidencyDomain) => 5,
        Err(KvCacheEventError::IndexerInvariantViolation) => 6,
    }
}

fn type_index(event_type: &str) -> usize {
    TYPES.iter().position(|t| *t == event_type).unwrap_or(0)
}

/// Per-namespace tallies of applied events by (event_type, status) and of warnings.
#[derive(Default)]
pub(crate) struct EventCounters {
    applied: [[AtomicU64; 7]; 3],
    duplicate_store: AtomicU64,
}

/// A point-in-time copy of a namespace's event counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCountsSnapshot {
    /// `(event_type, status) -> count`, only non-zero entries.
    pub applied: Vec<(&'static str, &'static str, u64)>,
    /// `warning_kind="duplicate_store"` count.
    pub duplicate_store: u64,
}

impl EventCountsSnapshot {
    /// Count for one (event_type, status) pair.
    pub fn get(&self, event_type: &str, status: &str) -> u64 {
        self.applied
            .iter()
            .find(|(t, s, _)| *t == event_type && *s == status)
            .map_or(0, |(_, _, n)| *n)
    }
}

impl EventCounters {
    pub(crate) fn record(&self, event_type: &'static str, result: &Result<(), KvCacheEventError>) {
        let s = status_index(result);
        self.applied[type_index(event_type)][s].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(EVENTS_APPLIED, "event_type" => event_type, "status" => STATUSES[s])
            .increment(1);
    }

    pub(crate) fn record_duplicate_store(&self) {
        self.duplicate_store.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(EVENT_WARNINGS, "warning_kind" => "duplicate_store").increment(1);
    }

    pub(crate) fn snapshot(&self) -> EventCountsSnapshot {
        let mut applied = Vec::new();
        for (ti, t) in TYPES.iter().enumerate() {
            for (si, s) in STATUSES.iter().enumerate() {
                let n = self.applied[ti][si].load(Ordering::Relaxed);
                if n > 0 {
                    applied.push((*t, *s, n));
                }
            }
        }
        EventCountsSnapshot {
            applied,
            duplicate_store: self.duplicate_store.load(Ordering::Relaxed),
        }
    }
}
