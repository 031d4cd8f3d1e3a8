//! The event intake: every event source (the ZMQ listeners, `POST /events`, peer recovery)
//! hands decoded events to an [`IngestSink`], which logs them durably and applies them to the
//! partition's index. This is the one place events enter the index.

use std::sync::Arc;

use kvindex_engine::{DpRank, NamespaceKey, RouterEvent, WorkerId};
use kvindex_persistence::{AppendTicket, DurableIndex, LogEntry, PersistError};
use thiserror::Error;

use crate::partitions::{Admission, Partition, Partitions, RegistryView};

/// Why events were not accepted.
#[derive(Debug, Error)]
pub enum IngestError {
    /// The partition does not exist (Dynamo's wording).
    #[error("no indexer for model={model} routing_group={group}")]
    NoIndexer { model: String, group: String },
    /// Dynamo accepts `block_size: 0` registrations; such a partition cannot hold blocks.
    #[error(
        "partition model={model} routing_group={group} has block_size 0 and cannot index events"
    )]
    ZeroBlockSize { model: String, group: String },
    /// The log refused the append (disk full, failed writer, ...); nothing was applied.
    #[error("event log: {0}")]
    Log(#[from] PersistError),
}

/// Where event sources submit events. Implemented by [`Ingest`]; the ZMQ listener calls it
/// once per decoded batch (one `source_seq` per vLLM batch) and must wait on the returned
/// ticket only if it needs durability before going on (it does not, for live traffic).
#[allow(dead_code)] // `submit` and `durable_watermark` serve tests and future sources (NATS)
pub trait IngestSink: Send + Sync {
    /// Log and apply one event of stream `(namespace, worker_id, dp_rank)`. The event's
    /// `worker_id` and `dp_rank` are overwritten with the stream's, so the log and the index
    /// always agree on the stream.
    fn submit(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
        dp_rank: DpRank,
        source_seq: u64,
        event: RouterEvent,
    ) -> Result<AppendTicket, IngestError> {
        self.submit_batch(namespace, worker_id, dp_rank, source_seq, vec![event])
            .and_then(|t| t.ok_or(IngestError::Log(PersistError::EmptyBatch)))
    }

    /// Log (as one all-or-nothing record) and apply the events of one producer batch. Returns
    /// `None` for an empty batch.
    fn submit_batch(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
        dp_rank: DpRank,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<Option<AppendTicket>, IngestError>;

    /// The last source sequence of the stream that is on disk: after a restart, ask the
    /// producer to replay from the next one.
    fn durable_watermark(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
        dp_rank: DpRank,
    ) -> Option<u64>;
}

/// The [`IngestSink`] of the server: partition lookup, then [`DurableIndex`].
pub struct Ingest {
    durable: Arc<DurableIndex>,
    partitions: Arc<Partitions>,
}

impl Ingest {
    /// An intake feeding `durable`, resolving partitions in `partitions`.
    pub fn new(durable: Arc<DurableIndex>, partitions: Arc<Partitions>) -> Self {
        Self {
            durable,
            partitions,
        }
    }

    fn partition(view: &RegistryView, key: &NamespaceKey) -> Result<Partition, IngestError> {
        let p = view
            .partitions
            .get(key)
            .ok_or_else(|| IngestError::NoIndexer {
                model: key.model_name.clone(),
                group: key.routing_group.clone(),
            })?;
        if p.namespace.is_none() {
            return Err(IngestError::ZeroBlockSize {
                model: key.model_name.clone(),
                group: key.routing_group.clone(),
            });
        }
        Ok(p.clone())
    }

    /// Enter the registry's intake gate (see [`Partitions::admit`]): resolve partitions and
    /// workers from the admission's view and submit with [`Self::submit_admitted`], so that no
    /// `/unregister` logs its removal in between.
    pub fn admit(&self) -> Admission<'_> {
        self.partitions.admit()
    }

    /// Log and apply events of several streams of one partition as one record; each item is
    /// `(source_seq, event)` and keeps its own `worker_id` / `dp_rank`.
    pub fn submit_mixed(
        &self,
        namespace: &NamespaceKey,
        events: Vec<(u64, RouterEvent)>,
    ) -> Result<Option<AppendTicket>, IngestError> {
        if events.is_empty() {
            return Ok(None);
        }
        let admission = self.admit();
        self.submit_admitted(&admission, namespace, events)
    }

    /// [`Self::submit_mixed`] under an admission the caller holds (and resolved the events
    /// with). The partition must exist in the admission's view: events never create one.
    pub fn submit_admitted(
        &self,
        admission: &Admission<'_>,
        namespace: &NamespaceKey,
        events: Vec<(u64, RouterEvent)>,
    ) -> Result<Option<AppendTicket>, IngestError> {
        if events.is_empty() {
            return Ok(None);
        }
        let p = Self::partition(admission.view(), namespace)?;
        admission.before_log();
        self.append(&p, events)
    }

    /// [`Self::submit_mixed`] without the registry's intake gate, resolving the partition in
    /// `view`: only for a source whose streams `/unregister` fences by itself before it logs
    /// the removal (the ZMQ listeners: `zmq_source.rs` `Fence` holds each batch from its
    /// registry check to this append, and stopping a stream waits for it). Such a source must
    /// not wait for the gate: the ZMQ sink runs on the async workers, and `/unregister` holds
    /// the gate exclusively across a log fsync.
    pub fn submit_ungated(
        &self,
        view: &RegistryView,
        namespace: &NamespaceKey,
        events: Vec<(u64, RouterEvent)>,
    ) -> Result<Option<AppendTicket>, IngestError> {
        if events.is_empty() {
            return Ok(None);
        }
        let p = Self::partition(view, namespace)?;
        self.append(&p, events)
    }

    /// Append `events` to the log as one record of partition `p`.
    fn append(
        &self,
        p: &Partition,
        events: Vec<(u64, RouterEvent)>,
    ) -> Result<Option<AppendTicket>, IngestError> {
        let n = events.len() as u64;
        let entries = events
            .into_iter()
            .map(|(seq, ev)| LogEntry::event(Arc::clone(&p.spec), seq, ev))
            .collect();
        let ticket = self.durable.submit_batch(entries)?;
        metrics::counter!("kvindex_events_logged_total").increment(n);
        Ok(Some(ticket))
    }

    /// Durable watermarks of every stream of `worker_id` in `namespace`:
    /// `(dp_rank, source_seq, lsn of the entry that set it)`.
    pub fn worker_watermarks(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
    ) -> Vec<(DpRank, u64, u64)> {
        self.durable
            .watermarks()
            .into_iter()
            .filter(|w| w.stream.namespace == *namespace && w.stream.worker_id == worker_id)
            .map(|w| (w.stream.dp_rank, w.source_seq, w.lsn))
            .collect()
    }

    /// Barrier: every event submitted to the partition so far is applied to its index. A
    /// partition dropped meanwhile (its last worker unregistered) has nothing left to wait for.
    pub fn flush(&self, namespace: &NamespaceKey) -> Result<(), IngestError> {
        let view = self.partitions.view();
        if let Some(ns) = view
            .partitions
            .get(namespace)
            .and_then(|p| p.namespace.as_ref())
        {
            ns.flush()
                .map_err(|e| IngestError::Log(PersistError::Engine(e)))?;
        }
        Ok(())
    }
}

impl IngestSink for Ingest {
    fn submit_batch(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
        dp_rank: DpRank,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<Option<AppendTicket>, IngestError> {
        let events = events
            .into_iter()
            .map(|mut ev| {
                ev.worker_id = worker_id;
                ev.event.dp_rank = dp_rank;
                (source_seq, ev)
            })
            .collect();
        self.submit_mixed(namespace, events)
    }

    fn durable_watermark(
        &self,
        namespace: &NamespaceKey,
        worker_id: WorkerId,
        dp_rank: DpRank,
    ) -> Option<u64> {
        self.durable
            .watermarks()
            .into_iter()
            .find(|w| {
                w.stream.namespace == *namespace
                    && w.stream.worker_id == worker_id
                    && w.stream.dp_rank == dp_rank
            })
            .map(|w| w.source_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners::NoListeners;
    use crate::partitions::Registration;
    use kvindex_engine::hashing::HashOptions;
    use kvindex_engine::{Engine, EngineConfig};
    use kvindex_persistence::DurableConfig;

    /// The contract the ZMQ listener relies on: submit with the effective stream, the event is
    /// applied under that stream, and its source sequence becomes the durable watermark.
    #[test]
    fn submit_applies_under_the_given_stream_and_moves_the_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(EngineConfig {
            event_threads: 1,
            queue_capacity: 64,
            ..EngineConfig::default()
        });
        let (durable, _) =
            DurableIndex::open(dir.path(), DurableConfig::default(), engine.clone()).unwrap();
        let durable = Arc::new(durable);
        let partitions = Arc::new(Partitions::new(engine, None, Arc::new(NoListeners)));
        partitions
            .register(Registration {
                instance_id: 7,
                model_name: "m".into(),
                routing_group: "default".into(),
                block_size: 4,
                dp_rank: 0,
                endpoint: "tcp://127.0.0.1:1".into(),
                replay_endpoint: None,
            })
            .unwrap();
        let ingest = Ingest::new(Arc::clone(&durable), Arc::clone(&partitions));
        let sink: &dyn IngestSink = &ingest;
        let key = NamespaceKey::new("m", "default");
        let tokens = crate::test_support::TOKENS;
        // The event claims worker 99 / dp 0; the stream given (7, dp 3) wins.
        let event = crate::test_support::one_block_store(99, 0, 5);
        let ticket = sink.submit(&key, 7, 3, 41, event).unwrap();
        ticket.wait().unwrap();
        ingest.flush(&key).unwrap();
        let view = partitions.view();
        let ns = view.partitions[&key].namespace.clone().unwrap();
        let scores = ns.find_matches_for_tokens(&tokens, &HashOptions::default());
        assert_eq!(
            scores.sorted(),
            vec![(kvindex_engine::WorkerWithDpRank::new(7, 3), 1)]
        );
        assert_eq!(sink.durable_watermark(&key, 7, 3), Some(41));
        assert_eq!(sink.durable_watermark(&key, 7, 0), None);
        let missing = NamespaceKey::new("x", "default");
        assert!(matches!(
            sink.submit_batch(&missing, 1, 0, 0, Vec::new()),
            Ok(None) | Err(IngestError::NoIndexer { .. })
        ));
    }
}
