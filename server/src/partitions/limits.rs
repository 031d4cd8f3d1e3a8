//! The bounds on partitions and the sizing of their index: how many partitions the registry
//! creates (`--max-partitions` in all, `--max-event-partitions` of them without a registered
//! worker), and which get their `external hash -> block` map sized up front
//! (`--expected-blocks`: those of registered workers only).
//!
//! Why: `/register` and events are open to any client, and every partition costs memory: its
//! index, and with `--expected-blocks` a map of ~11.5 bytes per expected block allocated when
//! it is created. Sized up front for every partition, events alone could allocate
//! `--max-event-partitions` such maps (256 × ~50 MB at `--expected-blocks 4194304`).
//!
//! Partitions restored at start-up (`registry.json`, the log, peer recovery) and the
//! `--workers` partition are never refused, so a restart never loses data; they count, so later
//! creations are refused until fewer partitions exist. An existing partition is never refused
//! (a registration joining it, events naming it).

use kvindex_engine::NamespaceKey;

use super::{RegistryError, RegistryView};

/// Counter, label `reason` ([`RefusalReason`]): partition creations refused.
pub const CREATIONS_REFUSED: &str = "kvindex_partition_creations_refused_total";

/// Default `--max-partitions`.
pub const DEFAULT_MAX_PARTITIONS: usize = 4096;

/// Why a partition creation was refused: the `reason` label of [`CREATIONS_REFUSED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `--max-partitions` partitions exist.
    MaxPartitions,
    /// Events asked while `--max-event-partitions` partitions have no registered worker.
    MaxEventPartitions,
    /// The drop of the key's previous partition still cannot be logged (see `drops`).
    DropNotLogged,
}

impl RefusalReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::MaxPartitions => "max_partitions",
            RefusalReason::MaxEventPartitions => "max_event_partitions",
            RefusalReason::DropNotLogged => "drop_not_logged",
        }
    }

    /// Count one refusal in [`CREATIONS_REFUSED`].
    pub fn count(self) {
        metrics::counter!(CREATIONS_REFUSED, "reason" => self.as_str()).increment(1);
    }
}

/// Who asks for a new partition: decides the limits it is held to and how its map is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creator {
    /// `POST /register`: held to `--max-partitions`; map sized up front.
    Registration,
    /// `--workers` at start-up: the operator's configuration, never refused (a WARN past
    /// `--max-partitions`); map sized up front.
    Configured,
    /// Events (`POST /events?block_size=`, the NATS `Kvindex-Block-Size` header): held to
    /// `max_event_partitions` (`--max-event-partitions`) and `--max-partitions`; the map grows
    /// as needed, also once a worker registers in the partition (until a restart, which sizes
    /// the maps of every partition with a registered worker).
    Events { max_event_partitions: usize },
    /// Peer recovery at start-up: a copy of what a peer holds, never refused (a WARN past
    /// `--max-partitions`); the map grows as needed.
    PeerRecovery,
}

impl Creator {
    /// Whether the partition is created for a registered worker.
    fn registers(self) -> bool {
        matches!(self, Creator::Registration | Creator::Configured)
    }
}

/// The registry's partition settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLimits {
    /// `--max-partitions`: partitions beyond which registrations and events create none.
    pub max_partitions: usize,
    /// `--expected-blocks`: blocks the map of a partition with a registered worker is sized
    /// for up front (0: every map grows as needed). The engine itself runs with 0, so that
    /// what it creates on its own (recovery, the log) grows as needed.
    pub expected_blocks: usize,
}

impl Default for PartitionLimits {
    fn default() -> Self {
        Self {
            max_partitions: DEFAULT_MAX_PARTITIONS,
            expected_blocks: 0,
        }
    }
}

impl PartitionLimits {
    /// May `creator` create the partition `key`, which `view` does not hold? A refusal is
    /// counted in [`CREATIONS_REFUSED`] and logged.
    pub(crate) fn admit(
        &self,
        view: &RegistryView,
        key: &NamespaceKey,
        creator: Creator,
    ) -> Result<(), RegistryError> {
        if let Creator::Events {
            max_event_partitions,
        } = creator
        {
            if view.partitions_without_workers() >= max_event_partitions {
                RefusalReason::MaxEventPartitions.count();
                return Err(RegistryError::PartitionLimit {
                    model: key.model_name.clone(),
                    group: key.routing_group.clone(),
                    limit: max_event_partitions,
                });
            }
        }
        let existing = view.partitions.len();
        if existing < self.max_partitions {
            return Ok(());
        }
        match creator {
            Creator::Registration | Creator::Events { .. } => {
                tracing::warn!(partition = %key, partitions = existing, max_partitions = self.max_partitions, ?creator, "partition not created: --max-partitions reached");
                RefusalReason::MaxPartitions.count();
                Err(RegistryError::TooManyPartitions {
                    model: key.model_name.clone(),
                    group: key.routing_group.clone(),
                    limit: self.max_partitions,
                })
            }
            Creator::Configured | Creator::PeerRecovery => {
                tracing::warn!(partition = %key, partitions = existing + 1, max_partitions = self.max_partitions, ?creator, "partition created past --max-partitions (start-up creations are never refused); registrations and events create none until fewer partitions exist");
                Ok(())
            }
        }
    }

    /// Blocks the map of a partition `creator` creates is sized for (0: grows as needed).
    pub(crate) fn expected_blocks_for(&self, creator: Creator) -> usize {
        if creator.registers() {
            self.expected_blocks
        } else {
            0
        }
    }

    /// Start-up: `registry.json` and the log restored `partitions` partitions, all kept; a
    /// WARN when that is more than `--max-partitions`.
    pub(crate) fn check_restored(&self, partitions: usize) {
        if partitions > self.max_partitions {
            tracing::warn!(partitions, max_partitions = self.max_partitions, "more partitions restored than --max-partitions: all are kept, and registrations and events create none until fewer exist");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use kvindex_engine::{expected_blocks_map_bytes, Engine, EngineConfig};
    use kvindex_persistence::{DurableConfig, DurableIndex};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    use super::*;
    use crate::listeners::NoListeners;
    use crate::partitions::{durable_drop_log, Partitions, Registration};

    const EXPECTED: usize = 50_000;

    /// An engine as the service runs it: `expected_blocks` 0, one event thread.
    fn engine() -> Engine {
        Engine::new(EngineConfig {
            event_threads: 1,
            queue_capacity: 64,
            expected_blocks: 0,
        })
    }

    fn limits(max_partitions: usize) -> PartitionLimits {
        PartitionLimits {
            max_partitions,
            expected_blocks: EXPECTED,
        }
    }

    fn reg(id: u64, model: &str) -> Registration {
        Registration {
            instance_id: id,
            model_name: model.into(),
            routing_group: "default".into(),
            block_size: 4,
            dp_rank: 0,
            endpoint: "tcp://127.0.0.1:5557".into(),
            replay_endpoint: None,
        }
    }

    /// Bytes of the map of partition `model`/default.
    fn map_bytes(p: &Partitions, model: &str) -> usize {
        p.view()
            .partition(model, "default")
            .unwrap()
            .namespace
            .as_ref()
            .unwrap()
            .map_bytes()
    }

    fn refused(snapshotter: &Snapshotter, reason: &str) -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, _, _, _)| {
                k.key().name() == CREATIONS_REFUSED
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == reason)
            })
            .map(|(_, _, _, v)| match v {
                DebugValue::Counter(c) => c,
                _ => 0,
            })
            .sum()
    }

    /// Only the partitions created for a registered worker (`/register`, `--workers`) get the
    /// map `--expected-blocks` sizes up front; those created by events or peer recovery start
    /// empty and grow, also once a worker registers in one.
    #[test]
    fn only_registered_partitions_get_a_presized_map() {
        let p = Partitions::new(engine(), None, Arc::new(NoListeners)).with_limits(limits(100));
        let presized = expected_blocks_map_bytes(EXPECTED);
        p.register(reg(1, "registered")).unwrap();
        assert_eq!(map_bytes(&p, "registered"), presized);
        p.register_initial(reg(2, "configured")).unwrap();
        assert_eq!(map_bytes(&p, "configured"), presized);
        p.ensure_partition_for_events("events", "default", 4, 10)
            .unwrap();
        assert_eq!(map_bytes(&p, "events"), 0);
        p.ensure_partition("peer", "default", 4).unwrap();
        assert_eq!(map_bytes(&p, "peer"), 0);
        p.register(reg(3, "events")).unwrap();
        assert_eq!(map_bytes(&p, "events"), 0, "sized when a worker joined");
    }

    fn open(dir: &Path) -> (Arc<DurableIndex>, Partitions) {
        let engine = engine();
        let (durable, _) =
            DurableIndex::open(dir, DurableConfig::default(), engine.clone()).unwrap();
        let durable = Arc::new(durable);
        let p = Partitions::new(engine, Some(dir), Arc::new(NoListeners)).with_limits(limits(2));
        p.set_drop_log(durable_drop_log(&durable));
        p.load().unwrap();
        (durable, p)
    }

    fn close(durable: Arc<DurableIndex>, p: Partitions) {
        drop(p);
        Arc::into_inner(durable).unwrap().close().unwrap();
    }

    /// Log and apply a store of one block in `model`/default.
    fn store(durable: &DurableIndex, p: &Partitions, model: &str) {
        let spec = Arc::clone(&p.view().partition(model, "default").unwrap().spec);
        let event = crate::test_support::one_block_store(9, 1, 109);
        durable.submit(&spec, 9, event).unwrap().wait().unwrap();
    }

    /// A restart (recovery rebuilds every namespace growing as needed) sizes the maps of the
    /// partitions with a registered worker, not the others; and it keeps every partition, also
    /// more than `--max-partitions`, while creations stay refused until fewer exist.
    #[test]
    fn a_restart_presizes_registered_partitions_and_keeps_them_all_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (durable, p) = open(dir.path());
        p.register(reg(1, "registered")).unwrap();
        p.ensure_partition_for_events("events", "default", 4, 10)
            .unwrap();
        store(&durable, &p, "registered");
        store(&durable, &p, "events");
        // Past the limit of 2: the start-up paths are never refused.
        p.ensure_partition("peer", "default", 4).unwrap();
        store(&durable, &p, "peer");
        close(durable, p);

        let (durable, p) = open(dir.path());
        let view = p.view();
        assert_eq!(view.partitions.len(), 3, "a restored partition was lost");
        assert_eq!(
            map_bytes(&p, "registered"),
            expected_blocks_map_bytes(EXPECTED)
        );
        assert!(map_bytes(&p, "events") < expected_blocks_map_bytes(EXPECTED));
        assert!(map_bytes(&p, "peer") < expected_blocks_map_bytes(EXPECTED));
        for model in ["registered", "events", "peer"] {
            let ns = view
                .partition(model, "default")
                .unwrap()
                .namespace
                .clone()
                .unwrap();
            ns.flush().unwrap();
            assert_eq!(ns.current_size(), 1, "{model} lost its block");
        }
        let e = p.register(reg(2, "new")).unwrap_err();
        assert!(
            matches!(e, RegistryError::TooManyPartitions { limit: 2, .. }),
            "{e}"
        );
        // Joining a restored partition is no creation.
        p.register(reg(3, "events")).unwrap();
        p.register(reg(4, "registered")).unwrap();
        close(durable, p);
    }

    /// `--max-partitions` bounds registrations and events (all partitions, also past
    /// `--max-event-partitions`), answering `TooManyPartitions` and counting it; registering
    /// in or sending events to an existing partition, `--workers` and peer recovery are never
    /// refused; the limit of events without a worker is counted apart.
    #[test]
    fn max_partitions_bounds_registrations_and_events() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let p = Partitions::new(engine(), None, Arc::new(NoListeners)).with_limits(limits(2));
            p.register(reg(1, "a")).unwrap();
            p.ensure_partition_for_events("b", "default", 4, 10)
                .unwrap();
            let e = p.register(reg(2, "c")).unwrap_err();
            assert_eq!(
                e.to_string(),
                "partition model=c routing_group=default not created: 2 partitions exist, \
                 the most this service holds (--max-partitions)"
            );
            let e = p
                .ensure_partition_for_events("c", "default", 4, 10)
                .err()
                .expect("refused");
            assert!(
                matches!(e, RegistryError::TooManyPartitions { limit: 2, .. }),
                "{e}"
            );
            assert!(p.view().partition("c", "default").is_err());
            // Existing partitions take registrations and events.
            p.register(reg(3, "a")).unwrap();
            p.register(reg(4, "b")).unwrap();
            p.ensure_partition_for_events("a", "default", 4, 10)
                .unwrap();
            // The configured and recovered ones are created anyway, and counted.
            p.register_initial(reg(5, "workers")).unwrap();
            p.ensure_partition("peer", "default", 4).unwrap();
            assert_eq!(p.view().partitions.len(), 4);
            p.register(reg(6, "d")).unwrap_err();
            // Events past --max-event-partitions (peer has no worker) are refused first.
            let e = p
                .ensure_partition_for_events("e", "default", 4, 1)
                .err()
                .expect("refused");
            assert!(
                matches!(e, RegistryError::PartitionLimit { limit: 1, .. }),
                "{e}"
            );
        });
        assert_eq!(refused(&snapshotter, "max_partitions"), 3);
        assert_eq!(refused(&snapshotter, "max_event_partitions"), 1);
        assert_eq!(refused(&snapshotter, "drop_not_logged"), 0);
    }
}
