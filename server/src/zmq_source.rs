//! The ZMQ event source wired into the service: [`ZmqSupervisor`] implements the registry's
//! [`ListenerSupervisor`] with [`kvindex_server::zmq::ZmqIngest`], and [`ServiceSink`] feeds
//! the decoded batches into the durable intake ([`Ingest`]): log, then apply.
//!
//! * **Streams and watermarks.** A listener is one sequence stream `(instance, registered
//!   dp_rank)`; the events of a batch carry their effective dp_rank (the batch's
//!   `data_parallel_rank` if any, SERVICE.md §5.2) and are logged under it, with the batch's
//!   sequence number as `source_seq`. The log therefore keeps a durable watermark per
//!   `(namespace, instance, dp_rank)` stream.
//! * **Restart.** Registrations restored from `registry.json` (and `--workers`) are held until
//!   [`ZmqSupervisor::open`], which starts each listener *after* its durable watermark: the
//!   listener asks the publisher's replay endpoint for everything the log is missing. When an
//!   instance has one listener, batches it received under another rank (override) count for it
//!   too (it resumes after the watermark logged last); with several listeners only the
//!   listener's own rank counts. A resume point past the publisher (an engine restarted while
//!   kvindex was down, another source's numbering) shows with the first live batch, which the
//!   listener then takes for a publisher restart (`zmq::listener`).
//! * **New registrations** (`POST /register`) start with an unset watermark (SERVICE.md §7.5).
//! * **Stopping** a listener fences its stream first: no batch of it reaches the log after
//!   [`ListenerSupervisor::stop`] returns, so the removal logged by `/unregister` is final.
//!   Every listener start — registration, re-registration, resume after a pause — gets a new
//!   generation ([`Fence`]), and a pause stops the stream in the fence, so a paused or
//!   superseded listener whose task still runs cannot log either.
//! * **No registry gate.** This fence is what orders ZMQ batches against `/unregister`, so the
//!   sink does not enter the registry's intake gate (`partitions/gate.rs`): it runs on the async
//!   workers, and `/unregister` holds that gate exclusively across a log fsync.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, Weak};
use std::time::Duration;

use kvindex_engine::{NamespaceKey, RouterEvent};
use kvindex_persistence::PersistError;
use kvindex_server::zmq::{self, EventSink, IngestConfig, SinkError, ZmqIngest};
use tokio::runtime::Handle;

use crate::ingest::{Ingest, IngestError};
use crate::listeners::{
    ListenerDetails, ListenerSpec, ListenerState, ListenerStatus, ListenerSupervisor,
};
use crate::partitions::{Partitions, RegistryView};

type StreamId = (u64, u32);

/// How often the registry's stored listener states (metrics, worker status) are refreshed.
const STATUS_SYNC_PERIOD: Duration = Duration::from_millis(200);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counter: ZMQ batches refused by the fence, by `reason` (`stopped`: the stream's listener
/// was stopped by `/unregister` or paused; `superseded`: the stream was registered again or
/// resumed and the batch comes from the old listener, whose task had not yet ended).
pub const FENCED_BATCHES: &str = "kvindex_zmq_batches_fenced_total";

/// Keeps stopped and superseded listeners out of the log.
///
/// Every start of a stream's listener (registration, resume) gets a new generation, which the
/// listener passes with each batch; a batch is admitted only while its generation is the
/// stream's current one. An aborted listener task stops only at its next await, so one inside
/// a long replay-apply loop keeps submitting after `stop` (unregister, pause) or after a new
/// listener of the same stream started: its batches are refused here
/// ([`SinkError::Fenced`]: its watermark does not move).
///
/// Submits hold the read side of `inflight` from the check to the log append (the registry
/// is read after the check, under it); `stop` takes the write side once after forgetting the
/// stream, so when it returns no batch of the stream is between the check and the log. This
/// is the whole ordering of ZMQ batches against `/unregister`, which stops the streams before
/// it logs the removal: the registry's intake gate is not needed for them.
#[derive(Default)]
struct Fence {
    inflight: RwLock<()>,
    /// The current generation of every started stream.
    current: Mutex<HashMap<StreamId, u64>>,
    /// Last generation handed out (unique per process; only uniqueness matters, so `Relaxed`).
    last: AtomicU64,
    closed: AtomicBool,
    #[cfg(test)]
    hooks: tests::FenceHooks,
}

impl Fence {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.inflight.write().unwrap_or_else(|e| e.into_inner()));
    }

    fn stop(&self, id: StreamId) {
        lock(&self.current).remove(&id);
        // Wait for submits already past the check.
        drop(self.inflight.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// A new generation for a listener of `id` about to start; older ones are refused from now.
    fn start(&self, id: StreamId) -> u64 {
        let generation = self.last.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&self.current).insert(id, generation);
        generation
    }

    /// Let a batch of listener `(id, generation)` through: hold the returned guard until it is
    /// appended to the log. Refusals of stopped or superseded listeners are counted.
    fn admit(&self, id: StreamId, generation: u64) -> Result<RwLockReadGuard<'_, ()>, SinkError> {
        #[cfg(test)]
        self.hooks.before_admit(id, generation);
        let result = self.admit_inner(id, generation);
        #[cfg(test)]
        self.hooks.admitted(id, generation, &result);
        result
    }

    fn admit_inner(
        &self,
        id: StreamId,
        generation: u64,
    ) -> Result<RwLockReadGuard<'_, ()>, SinkError> {
        let inflight = self.inflight.read().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Err(SinkError::Unavailable(
                "the service is shutting down".into(),
            ));
        }
        let (instance_id, dp_rank) = id;
        match lock(&self.current).get(&id) {
            Some(current) if *current == generation => Ok(inflight),
            Some(_) => {
                metrics::counter!(FENCED_BATCHES, "reason" => "superseded").increment(1);
                Err(SinkError::Fenced(format!(
                    "listener of instance {instance_id} dp_rank {dp_rank} was superseded by a newer start of its stream"
                )))
            }
            None => {
                metrics::counter!(FENCED_BATCHES, "reason" => "stopped").increment(1);
                Err(SinkError::Fenced(format!(
                    "listener of instance {instance_id} dp_rank {dp_rank} is stopped or paused"
                )))
            }
        }
    }
}

/// The [`EventSink`] of the service: every batch is logged (one record) and applied.
pub struct ServiceSink {
    ingest: Weak<Ingest>,
    partitions: Weak<Partitions>,
    fence: Arc<Fence>,
}

impl EventSink for ServiceSink {
    fn submit(
        &self,
        worker_id: u64,
        dp_rank: u32,
        generation: u64,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<(), SinkError> {
        let _inflight = self.fence.admit((worker_id, dp_rank), generation)?;
        if events.is_empty() {
            return Ok(());
        }
        let (Some(ingest), Some(partitions)) = (self.ingest.upgrade(), self.partitions.upgrade())
        else {
            return Err(SinkError::Unavailable(
                "the service is shutting down".into(),
            ));
        };
        // Read under the fence: while `_inflight` is held, no `/unregister` of this stream gets
        // past stopping it, so the worker seen here is still registered when the batch is
        // appended below (the removal is logged after it). Hence no registry gate.
        let view = partitions.view();
        let Some(inst) = view.instances.get(&worker_id) else {
            return Err(SinkError::Unavailable(format!(
                "instance {worker_id} is not registered"
            )));
        };
        // Each event keeps its effective rank: the batch's `data_parallel_rank` when it named
        // one (the decoder put it on every event), the listener's otherwise. One record, all
        // or nothing.
        let events = events
            .into_iter()
            .map(|mut ev| {
                ev.worker_id = worker_id;
                (source_seq, ev)
            })
            .collect();
        let result = ingest.submit_ungated(&view, &inst.key, events);
        // Not waiting for the ticket: the log orders the record before anything later, and a
        // crash before it is durable leaves the watermark behind, so replay asks again.
        result.map(|_ticket| ()).map_err(sink_error)
    }
}

/// Counter: ZMQ batches the service refused for good, by `reason`: `too_large` (its events
/// encode to more than one log record may hold, 64 MiB), `block_size` (its partition has
/// block size 0). The listener skips such a batch: its watermark moves past it (the batch is
/// also counted in `kvindex_zmq_batches_total{outcome="sink_rejected"}`).
pub const REJECTED_BATCHES: &str = "kvindex_zmq_batches_rejected_total";

/// Register the descriptions of [`FENCED_BATCHES`] and [`REJECTED_BATCHES`].
pub fn describe() {
    metrics::describe_counter!(
        FENCED_BATCHES,
        "ZMQ batches refused by the listener fence, by reason (stopped, superseded)"
    );
    metrics::describe_counter!(
        REJECTED_BATCHES,
        "ZMQ batches the service refused for good, by reason (too_large, block_size)"
    );
}

/// What the listener is told about a batch the intake did not take: for good
/// ([`SinkError::Rejected`], counted in [`REJECTED_BATCHES`]) when the same batch can never be
/// taken; [`SinkError::Failed`] when the log writer has stopped (nothing is appended until the
/// process restarts: the listener stops submitting and replaying, and the restart resumes after
/// the durable watermark); else for now ([`SinkError::Unavailable`]: the watermark stays and the
/// batch is asked for again after the listener's backoff).
///
/// A batch too large for one log record is refused for good: asking for it again brings the
/// same batch (and a replay per later batch, and in the end a batch counted lost). It is not
/// split into several records either: a batch is logged all or nothing, with its sequence
/// number as the stream's watermark; split, a crash between its records would leave the
/// watermark at its sequence with only part of it durable, and the restart's replay (from
/// the next sequence) would never bring the rest.
fn sink_error(e: IngestError) -> SinkError {
    let reason = match &e {
        IngestError::Log(PersistError::RecordTooLarge { .. }) => "too_large",
        IngestError::ZeroBlockSize { .. } => "block_size",
        IngestError::Log(PersistError::WriterFailed { .. }) => {
            return SinkError::Failed(e.to_string())
        }
        _ => return SinkError::Unavailable(e.to_string()),
    };
    metrics::counter!(REJECTED_BATCHES, "reason" => reason).increment(1);
    SinkError::Rejected(e.to_string())
}

/// Turn a ZMQ listener status into the registry's state and `/workers` details.
fn convert(s: &zmq::listener::ListenerStatus) -> (ListenerState, ListenerDetails) {
    let status = match s.state {
        zmq::ListenerState::Pending => ListenerStatus::Pending,
        zmq::ListenerState::Active => ListenerStatus::Active,
        zmq::ListenerState::Paused => ListenerStatus::Paused,
        zmq::ListenerState::Failed => ListenerStatus::Failed,
    };
    (
        ListenerState {
            status,
            last_error: s.last_error.clone(),
        },
        ListenerDetails {
            degraded: s.degraded,
            replaying: s.replaying,
            connected: s.connected,
            watermark: s.watermark,
            gaps: s.counters.gaps,
            replays: s.counters.replay_requests,
            replayed_batches: s.counters.replayed_batches,
            lost_batches: s.counters.lost_batches,
        },
    )
}

fn pending() -> ListenerState {
    ListenerState {
        status: ListenerStatus::Pending,
        last_error: None,
    }
}

/// The [`ListenerSupervisor`] of `kvindex serve`: one ZMQ listener per registration.
pub struct ZmqSupervisor {
    zmq: ZmqIngest,
    fence: Arc<Fence>,
    /// Registrations started before [`Self::open`] (restored or `--workers`); `None` once open.
    deferred: Mutex<Option<Vec<ListenerSpec>>>,
}

impl ZmqSupervisor {
    /// A supervisor whose listeners run on `runtime` and feed `ingest`.
    pub fn new(
        runtime: Handle,
        partitions: &Arc<Partitions>,
        ingest: &Arc<Ingest>,
        config: IngestConfig,
    ) -> Arc<Self> {
        let fence = Arc::new(Fence::default());
        let sink = Arc::new(ServiceSink {
            ingest: Arc::downgrade(ingest),
            partitions: Arc::downgrade(partitions),
            fence: Arc::clone(&fence),
        });
        Arc::new(Self {
            zmq: ZmqIngest::new(runtime, sink, config),
            fence,
            deferred: Mutex::new(Some(Vec::new())),
        })
    }

    /// Start the listeners registered so far, each after its durable watermark, and every later
    /// one at once. Also starts the task that mirrors listener states into the registry.
    pub fn open(self: &Arc<Self>, partitions: &Arc<Partitions>, ingest: &Ingest, runtime: &Handle) {
        let deferred = lock(&self.deferred).take().unwrap_or_default();
        let view = partitions.view();
        for spec in deferred {
            let resume = resume_point(&view, ingest, &spec);
            tracing::info!(
                instance_id = spec.instance_id,
                dp_rank = spec.dp_rank,
                endpoint = %spec.endpoint,
                resume_after = ?resume,
                "starting restored ZMQ listener"
            );
            let state = self.register(&spec, resume);
            partitions.set_listener_status(spec.instance_id, spec.dp_rank, state);
        }
        let (me, parts) = (Arc::downgrade(self), Arc::downgrade(partitions));
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(STATUS_SYNC_PERIOD).await;
                let (Some(me), Some(parts)) = (me.upgrade(), parts.upgrade()) else {
                    return;
                };
                me.sync_states(&parts);
            }
        });
    }

    /// Open the ready gate (SERVICE.md §1.3): the listeners started by [`Self::open`] connected
    /// then and held what they received; from now on they catch up and apply it, and every
    /// later listener applies at once. `kvindex serve` calls it once its peer recovery is
    /// loaded, so live events are applied on top of the dump. (Only with
    /// `IngestConfig::start_open` false does the gate start closed.)
    pub fn ready(&self) {
        self.zmq.open();
    }

    /// Copy changed listener states into the registry view (worker status, metrics).
    fn sync_states(&self, partitions: &Partitions) {
        let view = partitions.view();
        for st in self.zmq.statuses() {
            let (state, _) = convert(&st);
            let stored = view
                .instances
                .get(&st.worker_id)
                .and_then(|i| i.listeners.get(&st.dp_rank));
            if stored.is_some_and(|l| l.state != state) {
                partitions.set_listener_status(st.worker_id, st.dp_rank, state);
            }
        }
    }

    fn register(&self, spec: &ListenerSpec, resume: Option<u64>) -> ListenerState {
        let id = (spec.instance_id, spec.dp_rank);
        // A leftover listener of the same stream (not expected: the registry refuses duplicates).
        if self.zmq.status(id.0, id.1).is_some() {
            self.fence.stop(id);
            let _ = self.zmq.unregister(id.0, id.1);
        }
        let generation = self.fence.start(id);
        let mut zs = zmq::ListenerSpec::new(
            spec.instance_id,
            spec.dp_rank,
            spec.endpoint.clone(),
            spec.block_size,
        )
        .with_generation(generation);
        if let Some(replay) = &spec.replay_endpoint {
            zs = zs.with_replay(replay.clone());
        }
        if let Some(seq) = resume {
            zs = zs.resuming_after(seq);
        }
        match self.zmq.register(zs) {
            Ok(()) => self
                .zmq
                .status(id.0, id.1)
                .map(|s| convert(&s).0)
                .unwrap_or_else(pending),
            Err(e) => {
                tracing::warn!(instance_id = id.0, dp_rank = id.1, error = %e, "listener not started");
                ListenerState {
                    status: ListenerStatus::Failed,
                    last_error: Some(e.to_string()),
                }
            }
        }
    }
}

/// Where a restored listener resumes: the durable watermark of its stream, or — for an
/// instance with a single listener — the watermark logged last (highest LSN) of any of the
/// instance's streams (batches that named their own dp_rank count for the single listener).
/// Only watermarks this registration wrote count (logged at or after its `registered_at_lsn`):
/// after an unregister and a re-register of the same stream, the old registration's watermark
/// says nothing about the new one (SERVICE.md §7.5), which starts from scratch like any new
/// registration.
///
/// The last one logged, not the highest sequence: the ranks' last batches may come from
/// different engine incarnations (an engine that restarted counts from 0 again, and its new
/// batches named only one rank so far), or another source may have logged its own numbering
/// (`event_id`s of `POST /events` or core NATS) for another rank of the instance. The log does
/// not record which source wrote an entry, so a watermark of another numbering can still be
/// the last one; the listener then sees its first live batch at or below the resume point, takes
/// it for an engine restarted while kvindex was down, and replays from 0 (`zmq::listener`).
fn resume_point(view: &RegistryView, ingest: &Ingest, spec: &ListenerSpec) -> Option<u64> {
    let key = NamespaceKey::new(&spec.model_name, &spec.routing_group);
    let marks = ingest.worker_watermarks(&key, spec.instance_id);
    let single = view
        .instances
        .get(&spec.instance_id)
        .is_some_and(|i| i.listeners.len() == 1);
    pick_resume_point(&marks, spec.dp_rank, single, spec.registered_at_lsn)
}

/// [`resume_point`] over `(dp_rank, source_seq, lsn)` watermarks: the eligible one with the
/// highest LSN. Watermarks tagged as JetStream sequences (`JETSTREAM_SEQ_TAG`) are another
/// source's numbering: taken as a ZMQ sequence they would put the listener past every batch
/// its publisher will ever send.
fn pick_resume_point(
    marks: &[(u32, u64, u64)],
    dp_rank: u32,
    single: bool,
    registered_at_lsn: u64,
) -> Option<u64> {
    marks
        .iter()
        .filter(|(dp, seq, lsn)| {
            (*dp == dp_rank || single)
                && *lsn >= registered_at_lsn
                && seq & crate::nats::intake::JETSTREAM_SEQ_TAG == 0
        })
        .max_by_key(|(_, _, lsn)| *lsn)
        .map(|(_, seq, _)| *seq)
}

impl ListenerSupervisor for ZmqSupervisor {
    fn start(&self, spec: &ListenerSpec) -> ListenerState {
        self.restart(spec, None)
    }

    fn restart(&self, spec: &ListenerSpec, resume_after: Option<u64>) -> ListenerState {
        {
            let mut deferred = lock(&self.deferred);
            if let Some(list) = deferred.as_mut() {
                list.retain(|s| (s.instance_id, s.dp_rank) != (spec.instance_id, spec.dp_rank));
                list.push(spec.clone());
                return pending();
            }
        }
        self.register(spec, resume_after)
    }

    fn stop(&self, instance_id: u64, dp_rank: u32) {
        self.stop_with_watermark(instance_id, dp_rank);
    }

    fn stop_with_watermark(&self, instance_id: u64, dp_rank: u32) -> Option<u64> {
        if let Some(list) = lock(&self.deferred).as_mut() {
            list.retain(|s| (s.instance_id, s.dp_rank) != (instance_id, dp_rank));
        }
        self.fence.stop((instance_id, dp_rank));
        // Fenced first: no batch is logged after this, and a fenced one leaves the watermark.
        // (A batch the sink took just before may not be in the status yet, its task updating
        // it right after: a restart from here takes that one batch once more, which changes
        // nothing — its stores are there, its removals find nothing.)
        self.zmq
            .unregister(instance_id, dp_rank)
            .ok()
            .and_then(|s| s.watermark)
    }

    fn pause(&self, instance_id: u64, dp_rank: u32) -> ListenerState {
        // Fenced first, as `stop` does: the aborted task ends only at its next await, and may
        // still be applying a replay; none of it reaches the log after this.
        self.fence.stop((instance_id, dp_rank));
        if let Err(e) = self.zmq.pause(instance_id, dp_rank) {
            tracing::warn!(instance_id, dp_rank, error = %e, "pause");
        }
        self.zmq
            .status(instance_id, dp_rank)
            .map(|s| convert(&s).0)
            .unwrap_or(ListenerState {
                status: ListenerStatus::Paused,
                last_error: None,
            })
    }

    fn resume(&self, spec: &ListenerSpec) -> ListenerState {
        let id = (spec.instance_id, spec.dp_rank);
        // The registry calls this under its write lock, so the state read here holds until
        // the resume below. Only a paused listener gets a new generation: starting one for a
        // running listener would fence it out.
        let paused = self
            .zmq
            .status(id.0, id.1)
            .is_some_and(|s| s.state == zmq::ListenerState::Paused);
        let resumed = if paused {
            // Installed before the task is spawned: its first batch is admitted. The paused
            // task, if still running, has the old generation and stays refused.
            let generation = self.fence.start(id);
            self.zmq.resume_with_generation(id.0, id.1, generation)
        } else {
            self.zmq.resume(id.0, id.1)
        };
        match resumed {
            Ok(()) => self
                .zmq
                .status(spec.instance_id, spec.dp_rank)
                .map(|s| convert(&s).0)
                .unwrap_or_else(pending),
            Err(zmq::IngestError::NotFound { .. }) => self.register(spec, None),
            Err(e) => {
                tracing::warn!(instance_id = spec.instance_id, dp_rank = spec.dp_rank, error = %e, "resume");
                self.zmq
                    .status(spec.instance_id, spec.dp_rank)
                    .map(|s| convert(&s).0)
                    .unwrap_or_else(pending)
            }
        }
    }

    fn shutdown(&self) {
        self.zmq.shutdown();
        self.fence.close();
    }

    fn live(&self, instance_id: u64, dp_rank: u32) -> Option<(ListenerState, ListenerDetails)> {
        self.zmq.status(instance_id, dp_rank).map(|s| convert(&s))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use super::{
        lock, pick_resume_point, sink_error, EventSink, Fence, ServiceSink, StreamId,
        ZmqSupervisor, FENCED_BATCHES, REJECTED_BATCHES,
    };
    use crate::ingest::Ingest;
    use crate::listeners::NoListeners;
    use crate::partitions::{Partitions, Registration};

    use kvindex_engine::{Engine, EngineConfig, RouterEvent};
    use kvindex_persistence::{DurableConfig, DurableIndex};
    use kvindex_server::zmq::test_publisher::{PublishBatch, PublisherConfig, VllmPublisher};
    use kvindex_server::zmq::{IngestConfig, SinkError};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    type AdmitHook = Arc<dyn Fn(StreamId, u64) + Send + Sync>;

    /// Test hooks of the [`Fence`]: act before a batch's check, and record every outcome.
    #[derive(Default)]
    pub(super) struct FenceHooks {
        before: Mutex<Option<AdmitHook>>,
        /// `(stream, generation, admitted)` of every check.
        outcomes: Mutex<Vec<(StreamId, u64, bool)>>,
    }

    impl FenceHooks {
        pub(super) fn before_admit(&self, id: StreamId, generation: u64) {
            let hook = lock(&self.before).clone();
            if let Some(hook) = hook {
                hook(id, generation);
            }
        }

        pub(super) fn admitted<T>(&self, id: StreamId, generation: u64, r: &Result<T, SinkError>) {
            lock(&self.outcomes).push((id, generation, r.is_ok()));
        }

        fn outcome_of(&self, id: StreamId, generation: u64) -> Option<bool> {
            lock(&self.outcomes)
                .iter()
                .find(|(i, g, _)| (*i, *g) == (id, generation))
                .map(|(.., ok)| *ok)
        }
    }

    use crate::test_support::{Latch, DEADLINE};

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + DEADLINE;
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The registry and the durable intake over `dir`, as `kvindex serve` builds them.
    fn service(dir: &Path) -> (Arc<Partitions>, Arc<Ingest>) {
        service_with(dir, DurableConfig::default())
    }

    fn service_with(dir: &Path, config: DurableConfig) -> (Arc<Partitions>, Arc<Ingest>) {
        let engine = Engine::new(EngineConfig {
            event_threads: 1,
            queue_capacity: 64,
            ..EngineConfig::default()
        });
        let (durable, _) = DurableIndex::open(dir, config, engine.clone()).unwrap();
        let partitions = Arc::new(Partitions::new(engine, Some(dir), Arc::new(NoListeners)));
        partitions.load().unwrap();
        let ingest = Arc::new(Ingest::new(Arc::new(durable), Arc::clone(&partitions)));
        (partitions, ingest)
    }

    fn register(partitions: &Partitions, instance_id: u64, endpoint: &str) {
        partitions
            .register(Registration {
                instance_id,
                model_name: "m".into(),
                routing_group: "default".into(),
                block_size: 4,
                dp_rank: 0,
                endpoint: endpoint.into(),
                replay_endpoint: None,
            })
            .unwrap();
    }

    /// The service over `dir` with a real ZMQ supervisor on a runtime of its own, and worker 7
    /// registered with a listener on a fresh publisher (no replay endpoint). The intake must
    /// outlive the test: the listeners' sink holds it weakly.
    fn listening_to_worker_7(
        dir: &Path,
    ) -> (
        tokio::runtime::Runtime,
        Arc<Partitions>,
        Arc<Ingest>,
        Arc<ZmqSupervisor>,
        VllmPublisher,
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (partitions, ingest) = service(dir);
        let supervisor = ZmqSupervisor::new(
            rt.handle().clone(),
            &partitions,
            &ingest,
            IngestConfig::default(),
        );
        partitions.set_supervisor(supervisor.clone());
        supervisor.open(&partitions, &ingest, rt.handle());
        let publisher = rt
            .block_on(VllmPublisher::bind(
                PublisherConfig::loopback_without_replay(),
            ))
            .unwrap();
        register(&partitions, 7, publisher.endpoint());
        (rt, partitions, ingest, supervisor, publisher)
    }

    fn store(worker_id: u64) -> RouterEvent {
        crate::test_support::one_block_store(worker_id, 0, 5)
    }

    /// The ZMQ sink runs on the async workers: it must not wait while an `/unregister` holds
    /// the registry's intake gate (across its removal's fsync); its own fence orders it.
    #[test]
    fn the_zmq_sink_does_not_wait_for_the_registry_gate() {
        let dir = tempfile::tempdir().unwrap();
        let (partitions, ingest) = service(dir.path());
        register(&partitions, 7, "tcp://127.0.0.1:1");
        let fence = Arc::new(Fence::default());
        let sink = Arc::new(ServiceSink {
            ingest: Arc::downgrade(&ingest),
            partitions: Arc::downgrade(&partitions),
            fence: Arc::clone(&fence),
        });
        let generation = fence.start((7, 0));
        let closed = partitions.hold_gate();
        let (tx, rx) = std::sync::mpsc::channel();
        let submitter = std::thread::spawn(move || {
            let _ = tx.send(sink.submit(7, 0, generation, 0, vec![store(7)]));
        });
        let answer = rx.recv_timeout(DEADLINE);
        drop(closed);
        submitter.join().unwrap();
        assert_eq!(
            answer,
            Ok(Ok(())),
            "the ZMQ sink waited for the registry gate"
        );
    }

    /// A real listener task is held inside the sink (as inside a replay's synchronous apply
    /// loop, where its abort cannot land) while its listener is paused and resumed: once it
    /// goes on, its batch is refused, and the resumed listener's batches are logged.
    #[test]
    fn a_paused_listener_task_still_running_is_refused_after_the_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, partitions, _ingest, supervisor, publisher) = listening_to_worker_7(dir.path());
        let stream = (7, 0);
        let fence = &supervisor.fence;
        let generation = || lock(&fence.current).get(&stream).copied();
        let old = generation().expect("the listener started");
        let publish = || {
            rt.block_on(publisher.publish(&PublishBatch::new(Vec::new())))
                .unwrap();
        };
        // ZMQ's slow joiner: publish until a batch reaches the sink live.
        wait_until("a live batch", || {
            publish();
            fence.hooks.outcome_of(stream, old) == Some(true)
        });

        // Hold the listener's next batch before its check.
        let (reached, release) = (Arc::new(Latch::default()), Arc::new(Latch::default()));
        {
            let (r, g) = (Arc::clone(&reached), Arc::clone(&release));
            let held = AtomicBool::new(false);
            *lock(&fence.hooks.before) = Some(Arc::new(move |id, generation| {
                if id == stream && generation == old && !held.swap(true, Ordering::SeqCst) {
                    r.set();
                    g.wait("the pause and the resume");
                }
            }));
        }
        wait_until("the listener's next batch", || {
            publish();
            reached.is_set()
        });

        partitions.pause_listener(7, 0).unwrap();
        partitions.resume_listener(7, 0).unwrap();
        let new = generation().expect("the listener resumed");
        // The old task is held: the next outcome of `old` is the held batch's.
        lock(&fence.hooks.outcomes).clear();
        release.set();
        wait_until("the held batch's check", || {
            fence.hooks.outcome_of(stream, old).is_some()
        });
        assert_eq!(
            fence.hooks.outcome_of(stream, old),
            Some(false),
            "the paused listener's task logged a batch after the resume"
        );
        *lock(&fence.hooks.before) = None;
        assert_ne!(new, old);
        wait_until("a batch of the resumed listener", || {
            publish();
            fence.hooks.outcome_of(stream, new) == Some(true)
        });
        partitions.shutdown_listeners();
    }

    /// An unregister whose removal fails (here: it cannot be logged) keeps the worker and
    /// starts its listener again after the watermark it had, not from scratch: a fresh start
    /// would replay the publisher's buffer from 0 over the live index, while a restart of
    /// kvindex resumes after the logged watermark.
    #[test]
    fn a_failed_unregister_restarts_the_listener_after_its_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let (rt, partitions, _ingest, _supervisor, publisher) = listening_to_worker_7(dir.path());
        let watermark = || {
            partitions
                .live_listener(7, 0)
                .and_then(|(_, details)| details.watermark)
        };
        // ZMQ's slow joiner: publish until a batch arrives; every later one arrives too.
        wait_until("a live batch", || {
            rt.block_on(publisher.publish(&PublishBatch::new(Vec::new())))
                .unwrap();
            watermark().is_some()
        });
        for _ in 0..3 {
            rt.block_on(publisher.publish(&PublishBatch::new(Vec::new())))
                .unwrap();
        }
        let last = publisher.next_seq() - 1;
        wait_until("every batch published", || watermark() == Some(last));
        let failing = crate::partitions::RemovalLog {
            drop_blocks: &|_| Err("disk full".into()),
            drop_partition: &|_| Ok(()),
        };
        let e = partitions
            .unregister(7, "m", Some("default"), None, &failing)
            .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(
            watermark(),
            Some(last),
            "the listener was not restarted after its watermark"
        );
        partitions.shutdown_listeners();
    }

    /// The counter `name{reason}` as recorded by `snapshotter`.
    fn counted(snapshotter: &Snapshotter, name: &str, reason: &str) -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| {
                k.key().name() == name
                    && k.key()
                        .labels()
                        .any(|l| l.key() == "reason" && l.value() == reason)
            })
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => c,
                _ => 0,
            })
            .sum()
    }

    /// A re-registration while the old listener's task still runs (an abort lands only at its
    /// next await, e.g. after a long replay-apply loop): the old task's batches are refused,
    /// the new listener's pass.
    #[test]
    fn batches_of_a_superseded_or_stopped_listener_are_refused_and_counted() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let fence = Fence::default();
            let stream = (7, 0);
            let old = fence.start(stream);
            assert!(fence.admit(stream, old).is_ok());
            assert!(
                fence.admit((7, 1), old).is_err(),
                "another stream's listener"
            );
            fence.stop(stream);
            let new = fence.start(stream);
            assert_ne!(new, old);
            match fence.admit(stream, old) {
                Err(SinkError::Fenced(e)) => assert_eq!(
                    e,
                    "listener of instance 7 dp_rank 0 was superseded by a newer start of its stream"
                ),
                other => panic!("old listener's batch not refused: {other:?}"),
            }
            assert!(fence.admit(stream, new).is_ok());
            fence.stop(stream);
            match fence.admit(stream, new) {
                Err(SinkError::Fenced(e)) => {
                    assert_eq!(e, "listener of instance 7 dp_rank 0 is stopped or paused")
                }
                other => panic!("stopped listener's batch not refused: {other:?}"),
            }
            fence.close();
            assert!(matches!(
                fence.admit(stream, new),
                Err(SinkError::Unavailable(_))
            ));
        });
        assert_eq!(fenced(&snapshotter, "superseded"), 1);
        assert_eq!(fenced(&snapshotter, "stopped"), 2);
    }

    fn fenced(snapshotter: &Snapshotter, reason: &str) -> u64 {
        counted(snapshotter, FENCED_BATCHES, reason)
    }

    fn rejected(snapshotter: &Snapshotter, reason: &str) -> u64 {
        counted(snapshotter, REJECTED_BATCHES, reason)
    }

    /// A batch too large for one log record can never be logged: the listener is told it is
    /// refused for good (its watermark moves past it, no replay asks for it again), with its
    /// own counted reason; a stopped log writer is a failure for good (until a restart); other
    /// intake failures stay temporary.
    #[test]
    fn intake_errors_are_classified_for_the_listener() {
        use crate::ingest::IngestError;
        use kvindex_persistence::PersistError;
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let too_large = IngestError::Log(PersistError::RecordTooLarge {
                bytes: 70 << 20,
                max: 64 << 20,
            });
            let text = too_large.to_string();
            assert_eq!(sink_error(too_large), SinkError::Rejected(text));
            assert!(matches!(
                sink_error(IngestError::ZeroBlockSize {
                    model: "m".into(),
                    group: "g".into()
                }),
                SinkError::Rejected(_)
            ));
            // The writer stopped: nothing is appended until a restart, so the listener stops
            // replaying (else each later batch would ask the engine for its whole buffer).
            assert!(matches!(
                sink_error(IngestError::Log(PersistError::WriterFailed {
                    cause: "disk full".into()
                })),
                SinkError::Failed(_)
            ));
            assert!(matches!(
                sink_error(IngestError::NoIndexer {
                    model: "m".into(),
                    group: "g".into()
                }),
                SinkError::Unavailable(_)
            ));
        });
        assert_eq!(rejected(&snapshotter, "too_large"), 1);
        assert_eq!(rejected(&snapshotter, "block_size"), 1);
    }

    /// End to end through the service's sink and the real log: a batch whose events encode
    /// past the record limit is rejected for good and counted, nothing of it is applied, and
    /// the stream's next batch is logged.
    #[test]
    fn a_batch_too_large_for_one_log_record_is_rejected_for_good() {
        use kvindex_engine::{
            ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
            KvCacheStoredBlockData, LocalBlockHash,
        };
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let dir = tempfile::tempdir().unwrap();
        // A record limit of 64 KiB (the default is 64 MiB) keeps the batch small.
        let mut config = DurableConfig::default();
        config.log.max_record_bytes = 64 << 10;
        let (partitions, ingest) = service_with(dir.path(), config);
        register(&partitions, 7, "tcp://127.0.0.1:1");
        let fence = Arc::new(Fence::default());
        let sink = ServiceSink {
            ingest: Arc::downgrade(&ingest),
            partitions: Arc::downgrade(&partitions),
            fence: Arc::clone(&fence),
        };
        let generation = fence.start((7, 0));
        // One store of 10,000 blocks: over 64 KiB as a log record.
        let blocks = (0..10_000u64)
            .map(|i| KvCacheStoredBlockData {
                block_hash: ExternalSequenceBlockHash(i),
                tokens_hash: LocalBlockHash(i),
                mm_extra_info: None,
            })
            .collect();
        let huge = RouterEvent::new(
            7,
            KvCacheEvent {
                event_id: 5,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    start_position: None,
                    blocks,
                }),
                dp_rank: 0,
            },
        );
        metrics::with_local_recorder(&recorder, || {
            match sink.submit(7, 0, generation, 5, vec![huge]) {
                Err(SinkError::Rejected(e)) => assert!(e.contains("record limit"), "{e}"),
                other => panic!("not refused for good: {other:?}"),
            }
            assert_eq!(sink.submit(7, 0, generation, 6, vec![store(7)]), Ok(()));
        });
        assert_eq!(rejected(&snapshotter, "too_large"), 1);
        // The stream's durable watermark becomes the next batch's, never the refused one's.
        let key = kvindex_engine::NamespaceKey::new("m", "default");
        let marks = || -> Vec<(u32, u64)> {
            ingest
                .worker_watermarks(&key, 7)
                .into_iter()
                .map(|(dp, seq, _)| (dp, seq))
                .collect()
        };
        wait_until("the next batch durable", || !marks().is_empty());
        assert_eq!(marks(), [(0, 6)], "only the next batch was logged");
    }

    #[test]
    fn resume_point_ignores_jetstream_watermarks() {
        let tagged = crate::nats::intake::JETSTREAM_SEQ_TAG | 5;
        let marks = [(0, 40, 10), (0, tagged, 12)];
        assert_eq!(pick_resume_point(&marks, 0, false, 0), Some(40));
        assert_eq!(pick_resume_point(&[(0, tagged, 12)], 0, true, 0), None);
    }

    #[test]
    fn resume_point_ignores_watermarks_of_an_earlier_registration() {
        // (dp_rank, source_seq, lsn)
        let marks = [(0, 40, 10), (1, 7, 12)];
        assert_eq!(pick_resume_point(&marks, 0, false, 0), Some(40));
        // A single listener resumes after the batch logged last, whatever its rank.
        assert_eq!(pick_resume_point(&marks, 0, true, 0), Some(7));
        // Re-registered at LSN 11: dp 0's watermark is the old registration's.
        assert_eq!(pick_resume_point(&marks, 0, false, 11), None);
        // A single listener counts its other-rank batches, if they are its own.
        assert_eq!(pick_resume_point(&marks, 0, true, 11), Some(7));
        assert_eq!(pick_resume_point(&marks, 0, true, 13), None);
        // The registration's own first batch sits exactly at its LSN.
        assert_eq!(pick_resume_point(&marks, 0, false, 10), Some(40));
    }

    /// A single listener resumes after the watermark logged last, not after the highest
    /// sequence of any rank: here rank 1's last batch (seq 900) came from the engine's earlier
    /// incarnation, or from another source's numbering (`POST /events` `event_id`s), and rank
    /// 0's (seq 12) was logged after it. Resuming after 900 would skip the engine's batches
    /// 13..=900 (before, every one of them was dropped as stale).
    #[test]
    fn a_single_listener_resumes_after_the_watermark_logged_last() {
        // (dp_rank, source_seq, lsn)
        let marks = [(1, 900, 50), (0, 12, 80), (2, 3, 70)];
        assert_eq!(pick_resume_point(&marks, 0, true, 0), Some(12));
        // Several listeners: each its own rank's, as before.
        assert_eq!(pick_resume_point(&marks, 1, false, 0), Some(900));
        assert_eq!(pick_resume_point(&marks, 2, false, 0), Some(3));
        // Tagged (JetStream) watermarks never count, even logged last.
        let tagged = crate::nats::intake::JETSTREAM_SEQ_TAG | 5;
        let marks = [(0, 12, 80), (1, tagged, 90)];
        assert_eq!(pick_resume_point(&marks, 0, true, 0), Some(12));
    }
}
