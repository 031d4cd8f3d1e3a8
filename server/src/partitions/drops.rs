//! Partition drops in progress ("dropping") and drops that could not be logged ("pending").
//!
//! A partition whose last worker leaves is dropped: a `DropNamespace` entry is logged and its
//! index removed. The intent comes first: `/unregister` writes `registry.json` with the key in
//! its `dropping` list (the partition no longer in `partitions`), then logs the drop and syncs
//! the log, and only then removes the key from `dropping` (one more write of the file; should
//! that fail, the key stays listed, which is harmless: see below). So a restart finds every drop
//! whose `DropNamespace` may not be on disk in `registry.json`, and nothing else: a namespace
//! recovery rebuilds that the file does not list and that is not in `dropping` is not a dropped
//! partition (a `kvindex replay import` into the directory, or a hand-edited file) and is kept.
//!
//! When logging the drop fails, the index is removed all the same, but the log still holds the
//! old partition's entries without a drop after them: recovery would replay them into whatever
//! partition of the same key (and block size) exists by then. So the key stays here (and in the
//! file's `dropping`), and a partition of that key is created again only once its drop is logged
//! and on disk: [`PendingDrops::settle`], called under the registry's write mutex by every path
//! that creates a partition (registration, `POST /events?block_size=` / the NATS
//! `Kvindex-Block-Size` header and peer recovery through `ensure_partition`). The creation's
//! own write of `registry.json` then lists the key in `partitions` and no longer in `dropping`.
//!
//! At start-up `load` reads `dropping`: a key that is also a listed partition was created again
//! after its drop was logged (a creation logs a pending drop first), and is only cleared; any
//! other key's drop is logged then (logging it again when it is already in the log changes
//! nothing), or the key stays pending. One exception: when recovery finds event entries of the
//! key logged at or after the moment the drop was decided (`dropped_at_lsn`), the drop was
//! withdrawn — the `/unregister` that wrote it failed afterwards (its file write, e.g. the
//! directory's fsync after the rename) and put the worker back, and the file could not be
//! written again before the process stopped — and the partition is kept.
//!
//! Invariant: a key pending here is in the `dropping` list of the last `registry.json` written
//! (a key is added only together with a write of the file, and that write failing takes it out
//! again); the file may list more (drops logged since, whose clearing write failed).

use std::collections::BTreeMap;
use std::sync::Arc;

use kvindex_engine::NamespaceKey;
use kvindex_persistence::DurableIndex;

use super::RegistryError;

/// Where the registry logs partition drops (the event log, in the service), and what it asks the
/// log about them.
pub trait DropLogger: Send + Sync {
    /// Log the drop of partition `key` and wait until it is on disk (synced, whatever the
    /// `--fsync` policy).
    fn log_drop(&self, key: &NamespaceKey) -> Result<(), String>;

    /// The LSN the log's next entry gets (`None`: unknown). Recorded with a drop's intent in
    /// `registry.json` (`dropped_at_lsn`).
    fn next_lsn(&self) -> Option<u64> {
        None
    }

    /// The LSN of the last event entry of namespace `key` that recovery found, in the snapshot
    /// or the log (`None`: none, or unknown).
    fn last_event_lsn(&self, _key: &NamespaceKey) -> Option<u64> {
        None
    }
}

/// A bare function logs drops and knows nothing else.
impl<F> DropLogger for F
where
    F: Fn(&NamespaceKey) -> Result<(), String> + Send + Sync,
{
    fn log_drop(&self, key: &NamespaceKey) -> Result<(), String> {
        self(key)
    }
}

/// The registry's [`DropLogger`].
pub type DropLog = Arc<dyn DropLogger>;

/// Gauge: keys whose drop is not logged yet.
pub const DROPS_PENDING: &str = "kvindex_partition_drops_pending";

/// Log the drop of partition `key` in `durable` and wait until it is on disk: the append's
/// ticket only waits for what `--fsync` promises (written to the kernel under `interval:<ms>`
/// and `never`), so the log is synced after it when the drop is not synced yet. The entry also
/// removes the namespace from the engine (an unknown one is logged all the same and changes
/// nothing there).
pub fn log_drop(durable: &DurableIndex, key: &NamespaceKey) -> Result<(), String> {
    let last = durable
        .drop_namespace(key)
        .and_then(|t| t.wait())
        .map_err(|e| e.to_string())?;
    let log = durable.log();
    if log.synced_lsn() <= last {
        let synced = log.sync().map_err(|e| e.to_string())?;
        if synced <= last {
            return Err(format!(
                "the log synced up to LSN {synced} only, the drop is LSN {last}"
            ));
        }
    }
    Ok(())
}

/// The [`DropLogger`] of a [`DurableIndex`]. Holds the index weakly (the registry lives as long
/// as the service, which closes the index at shutdown).
struct DurableDropLog(std::sync::Weak<DurableIndex>);

impl DropLogger for DurableDropLog {
    fn log_drop(&self, key: &NamespaceKey) -> Result<(), String> {
        match self.0.upgrade() {
            Some(d) => log_drop(&d, key),
            None => Err("the event log is closed".into()),
        }
    }

    fn next_lsn(&self) -> Option<u64> {
        self.0.upgrade().map(|d| d.log().next_lsn())
    }

    fn last_event_lsn(&self, key: &NamespaceKey) -> Option<u64> {
        let d = self.0.upgrade()?;
        d.watermarks()
            .into_iter()
            .filter(|w| w.stream.namespace == *key)
            .map(|w| w.lsn)
            .max()
    }
}

/// [`log_drop`] as the registry's [`DropLog`], which also reads the log's next LSN and the
/// recovered event LSNs of a namespace (its durable watermarks).
pub fn durable_drop_log(durable: &Arc<DurableIndex>) -> DropLog {
    Arc::new(DurableDropLog(Arc::downgrade(durable)))
}

/// The keys whose drop is not logged yet, each with the log's next LSN when the drop was decided
/// (`None`: unknown). Lives inside the registry's write mutex: every change, and every creation
/// of a partition, happens under it, so no creation of a pending key can slip in between a
/// failed drop and its remembering here, or between the drop being logged by [`Self::settle`]
/// and the partition's creation. Written to `registry.json` as `dropping` with every write.
#[derive(Default)]
pub(super) struct PendingDrops {
    keys: BTreeMap<NamespaceKey, Option<u64>>,
}

impl PendingDrops {
    /// The partition `key` is dropped (its drop decided at `lsn`), and the drop is not logged
    /// yet: its partition must not be created again before it is. The caller writes
    /// `registry.json` next, and takes the key out again if that fails.
    pub(super) fn insert(&mut self, key: NamespaceKey, lsn: Option<u64>) {
        self.keys.insert(key, lsn);
        self.publish();
    }

    /// The drop of `key` is logged and on disk, or withdrawn.
    pub(super) fn remove(&mut self, key: &NamespaceKey) -> bool {
        let removed = self.keys.remove(key).is_some();
        if removed {
            self.publish();
        }
        removed
    }

    #[cfg(test)]
    pub(super) fn contains(&self, key: &NamespaceKey) -> bool {
        self.keys.contains_key(key)
    }

    /// The keys and their `dropped_at_lsn`, in key order (`registry.json`'s `dropping`).
    pub(super) fn iter(&self) -> impl Iterator<Item = (&NamespaceKey, Option<u64>)> {
        self.keys.iter().map(|(k, lsn)| (k, *lsn))
    }

    /// Before a partition `key` is created: if the drop of an earlier partition of that key is
    /// pending, log it now with `log` (`None`: no log to record it in), and forget it once it is
    /// on disk (the creation's write of `registry.json` then no longer lists it in `dropping`).
    /// An error means the partition must not be created.
    pub(super) fn settle(
        &mut self,
        key: &NamespaceKey,
        log: Option<&dyn DropLogger>,
    ) -> Result<(), RegistryError> {
        if !self.keys.contains_key(key) {
            return Ok(());
        }
        let logged = match log {
            Some(log) => log.log_drop(key),
            None => Err("no event log to record it in".to_owned()),
        };
        match logged {
            Ok(()) => {
                tracing::info!(partition = %key, "pending drop of the previous partition logged; creating the partition again");
                self.remove(key);
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(partition = %key, error = %reason, "partition not created: the drop of its previous partition still cannot be logged");
                super::limits::RefusalReason::DropNotLogged.count();
                Err(RegistryError::DropNotLogged {
                    model: key.model_name.clone(),
                    group: key.routing_group.clone(),
                    reason,
                })
            }
        }
    }

    /// Try once more to log every pending drop but those in `skip` (cheap when none is
    /// pending); failures stay pending. Returns whether any was logged (the caller then writes
    /// `registry.json` again, to take them out of `dropping`).
    pub(super) fn retry(
        &mut self,
        log: &dyn Fn(&NamespaceKey) -> Result<(), String>,
        skip: &[NamespaceKey],
    ) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let before = self.keys.len();
        self.keys.retain(|key, _| {
            if skip.contains(key) {
                return true;
            }
            match log(key) {
                Ok(()) => {
                    tracing::info!(partition = %key, "pending partition drop logged");
                    false
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "pending partition drop still not logged");
                    true
                }
            }
        });
        let changed = self.keys.len() != before;
        if changed {
            self.publish();
        }
        changed
    }

    fn publish(&self) {
        metrics::gauge!(DROPS_PENDING).set(self.keys.len() as f64);
    }
}
