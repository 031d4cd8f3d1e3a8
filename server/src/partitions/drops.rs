//! Partition drops that could not be logged ("pending drops").
//!
//! A partition whose last worker leaves is dropped: a `DropNamespace` entry is logged and its
//! index removed. When logging the drop fails, the index is removed all the same, but the log
//! still holds the old partition's entries without a drop after them: recovery would replay
//! them into whatever partition of the same key (and block size) exists by then. So the key is
//! remembered here, and a partition of that key is created again only once its drop is logged
//! (and durable): [`PendingDrops::settle`], called under the registry's write mutex by every
//! path that creates a partition (registration, `POST /events?block_size=` / the NATS
//! `Kvindex-Block-Size` header and peer recovery through `ensure_partition`, `load`). After a
//! restart the set is empty; `load` rebuilds what matters from the log instead: a recovered
//! namespace that `registry.json` does not list is a partition dropped without a logged drop,
//! and its drop is logged then (or the key becomes pending again).

use std::collections::BTreeSet;
use std::sync::Arc;

use kvindex_engine::NamespaceKey;
use kvindex_persistence::DurableIndex;

use super::RegistryError;

/// Logs the drop of a partition and waits until it is durable (the event log, in the service).
pub type DropFn = dyn Fn(&NamespaceKey) -> Result<(), String> + Send + Sync;

/// The registry's [`DropFn`].
pub type DropLog = Arc<DropFn>;

/// Gauge: keys whose drop is not logged yet.
pub const DROPS_PENDING: &str = "kvindex_partition_drops_pending";
/// Counter: partition creations refused because the drop of the key's previous partition still
/// could not be logged.
pub const CREATIONS_REFUSED: &str = "kvindex_partition_creations_refused_total";

/// Log the drop of partition `key` in `durable` and wait until it is durable. The entry also
/// removes the namespace from the engine (an unknown one is logged all the same and changes
/// nothing there).
pub fn log_drop(durable: &DurableIndex, key: &NamespaceKey) -> Result<(), String> {
    durable
        .drop_namespace(key)
        .and_then(|t| t.wait())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// [`log_drop`] as the registry's [`DropLog`]. Holds the index weakly (the registry lives as
/// long as the service, which closes the index at shutdown).
pub fn durable_drop_log(durable: &Arc<DurableIndex>) -> DropLog {
    let durable = Arc::downgrade(durable);
    Arc::new(move |key| match durable.upgrade() {
        Some(d) => log_drop(&d, key),
        None => Err("the event log is closed".into()),
    })
}

/// The keys whose drop is not logged yet. Lives inside the registry's write mutex: every
/// change, and every creation of a partition, happens under it, so no creation of a pending
/// key can slip in between a failed drop and its remembering here, or between the drop being
/// logged by [`Self::settle`] and the partition's creation.
#[derive(Default)]
pub(super) struct PendingDrops {
    keys: BTreeSet<NamespaceKey>,
}

impl PendingDrops {
    /// Logging the drop of `key` failed: its partition must not be created again before the
    /// drop is logged.
    pub(super) fn insert(&mut self, key: NamespaceKey) {
        self.keys.insert(key);
        self.publish();
    }

    #[cfg(test)]
    pub(super) fn contains(&self, key: &NamespaceKey) -> bool {
        self.keys.contains(key)
    }

    /// Before a partition `key` is created: if the drop of an earlier partition of that key is
    /// pending, log it now with `log` (`None`: no log to record it in), and forget it once it is
    /// durable. An error means the partition must not be created.
    pub(super) fn settle(
        &mut self,
        key: &NamespaceKey,
        log: Option<&DropFn>,
    ) -> Result<(), RegistryError> {
        if !self.keys.contains(key) {
            return Ok(());
        }
        let logged = match log {
            Some(log) => log(key),
            None => Err("no event log to record it in".to_owned()),
        };
        match logged {
            Ok(()) => {
                tracing::info!(partition = %key, "pending drop of the previous partition logged; creating the partition again");
                self.keys.remove(key);
                self.publish();
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(partition = %key, error = %reason, "partition not created: the drop of its previous partition still cannot be logged");
                metrics::counter!(CREATIONS_REFUSED).increment(1);
                Err(RegistryError::DropNotLogged {
                    model: key.model_name.clone(),
                    group: key.routing_group.clone(),
                    reason,
                })
            }
        }
    }

    /// Try once more to log every pending drop but those in `skip` (cheap when none is
    /// pending); failures stay pending.
    pub(super) fn retry(
        &mut self,
        log: &dyn Fn(&NamespaceKey) -> Result<(), String>,
        skip: &[NamespaceKey],
    ) {
        if self.keys.is_empty() {
            return;
        }
        let before = self.keys.len();
        self.keys.retain(|key| {
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
        if self.keys.len() != before {
            self.publish();
        }
    }

    fn publish(&self) {
        metrics::gauge!(DROPS_PENDING).set(self.keys.len() as f64);
    }
}
