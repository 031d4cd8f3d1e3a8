//! [`DurableIndex`]: an [`Engine`] whose every change is logged first, with periodic snapshots
//! and compaction; opening it rebuilds the engine from disk. This is the piece the server wires
//! between its event sources and the engine.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::channel::{self, RecvTimeoutError, Sender};
use kvindex_engine::{Engine, EngineError, Namespace, NamespaceKey, RouterEvent, WorkerId};

use crate::config::LogConfig;
use crate::entry::{LogEntry, LogOp, Lsn, NamespaceSpec, StreamWatermark};
use crate::error::{PersistError, Result};
use crate::log::EventLog;
use crate::record::ArchivedOpRecord;
use crate::recovery::{EntryView, RecoveryReport, ReplaySink};
use crate::snapshot::{LoadedSnapshot, SnapshotImage, SnapshotMeta, SnapshotStore};
use crate::writer::AppendTicket;

/// When snapshots are taken, and how many are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Take one after this many entries since the last (None: never by count).
    pub every_entries: Option<u64>,
    /// Take one this long after the last, if anything was appended (None: never by time).
    pub every: Option<Duration>,
    /// Snapshots kept on disk (at least 1).
    pub keep: usize,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            every_entries: Some(1_000_000),
            every: Some(Duration::from_secs(600)),
            keep: 2,
        }
    }
}

/// Configuration of a [`DurableIndex`].
#[derive(Debug, Clone, Default)]
pub struct DurableConfig {
    pub log: LogConfig,
    pub snapshots: SnapshotPolicy,
}

/// A [`ReplaySink`] that rebuilds an [`Engine`]: restores the snapshot, then applies entries
/// through the same calls the live path uses (per-stream order is kept by the engine's sticky
/// event threads).
pub struct EngineSink {
    engine: Engine,
    /// The namespace of the previous entry: consecutive entries nearly always share it.
    last: Option<(String, String, u32, Namespace)>,
    namespaces: HashMap<NamespaceKey, Namespace>,
    /// Entries applied.
    pub applied: u64,
}

impl EngineSink {
    /// A sink feeding `engine`.
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            last: None,
            namespaces: HashMap::new(),
            applied: 0,
        }
    }

    /// The engine being fed.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn namespace_for(&mut self, view: &EntryView<'_>) -> Result<Namespace> {
        let model = view.namespace.model_name.as_str();
        let group = view.namespace.routing_group.as_str();
        let bs = view.namespace.block_size.to_native();
        if let Some((m, g, b, ns)) = &self.last {
            if m == model && g == group && *b == bs {
                return Ok(ns.clone());
            }
        }
        let key = NamespaceKey::new(model, group);
        let ns = match self.namespaces.get(&key) {
            Some(ns) if ns.block_size() == bs => ns.clone(),
            _ => {
                let ns = match self.engine.create_namespace(key.clone(), bs) {
                    // The partition was dropped and created again with another block size
                    // (`/unregister`, then a new registration) in a log written before drops
                    // were logged (`DropNamespace`): the first entry of the new size stands for
                    // the drop, as the live service removed the old namespace before creating
                    // the new one.
                    Err(EngineError::BlockSizeMismatch { existing, .. }) => {
                        tracing::info!(namespace = %key, old_block_size = existing, block_size = bs, "replay: partition re-created with another block size; the old one is dropped");
                        self.engine.remove_namespace(&key)?;
                        self.engine.create_namespace(key.clone(), bs)?
                    }
                    other => other?,
                };
                self.namespaces.insert(key, ns.clone());
                ns
            }
        };
        self.last = Some((model.to_owned(), group.to_owned(), bs, ns.clone()));
        Ok(ns)
    }
}

impl ReplaySink for EngineSink {
    fn restore_snapshot(&mut self, snapshot: &LoadedSnapshot) -> Result<()> {
        snapshot.image()?.restore_into(&self.engine)
    }

    fn apply(&mut self, _lsn: Lsn, view: EntryView<'_>) -> Result<()> {
        if view.record.op.is_drop_namespace() {
            // The partition was dropped (docs/log-format.md §2.3): forget it, so that later
            // entries of the same key create a new, empty namespace, as the live service did.
            let key = view.namespace_key();
            self.namespaces.remove(&key);
            self.last = None;
            self.engine.remove_namespace(&key)?;
            self.applied += 1;
            return Ok(());
        }
        let ns = self.namespace_for(&view)?;
        let (worker, dp) = (view.worker_id(), view.dp_rank());
        match &view.record.op {
            ArchivedOpRecord::Event(e) => ns.apply(e.to_router_event(worker, dp))?,
            ArchivedOpRecord::RemoveWorker => ns.remove_worker(worker)?,
            ArchivedOpRecord::RemoveWorkerDpRank => ns.remove_worker_dp_rank(worker, dp)?,
            ArchivedOpRecord::ClearAllBlocks => ns.clear_all_blocks(worker)?,
            // Handled above.
            ArchivedOpRecord::DropNamespace => {}
        }
        self.applied += 1;
        Ok(())
    }
}

struct Inner {
    engine: Engine,
    log: EventLog,
    store: SnapshotStore,
    /// Held while an entry is appended and handed to the engine, and while a snapshot is
    /// captured: so queue order equals LSN order per stream, and a snapshot matches its LSN.
    intake: Mutex<()>,
    /// Entries replayed at open plus entries appended since.
    appended: AtomicU64,
    /// `appended` as of the capture of the last snapshot written (entries since then are not
    /// covered by a snapshot). Moves only when a snapshot is written: a failed one leaves it,
    /// so the snapshot stays due and is tried again.
    covered: AtomicU64,
    /// When the last snapshot written was captured.
    last_snapshot: Mutex<Instant>,
    /// Failed snapshot attempts in a row, and when the next periodic one may start.
    backoff: Mutex<Backoff>,
    /// Failed snapshot attempts since open (each also counted in
    /// `kvindex_snapshot_failures_total`).
    failures: AtomicU64,
    /// The snapshot thread is writing a periodic snapshot.
    snapshotting: AtomicBool,
    policy: SnapshotPolicy,
}

/// The periodic snapshot's retry state after failures.
#[derive(Debug, Default)]
struct Backoff {
    /// Failed attempts since the last snapshot written.
    failed_in_a_row: u32,
    /// When the last failed attempt ended.
    failed_at: Option<Instant>,
    /// No periodic attempt before this.
    retry_at: Option<Instant>,
}

/// Why no snapshot is being taken for now: the failures since the last snapshot written, and
/// when the periodic snapshot tries again ([`DurableIndex::snapshot_retry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotRetry {
    /// Failed attempts in a row.
    pub failed_in_a_row: u32,
    /// When the last of them ended.
    pub failed_at: Instant,
    /// No periodic attempt starts before this.
    pub retry_at: Instant,
}

/// The wait before the first retry of a failed snapshot; it doubles with each failure in a
/// row, up to the snapshot interval ([`SnapshotPolicy::every`], or [`SNAPSHOT_RETRY_MAX`] when
/// snapshots are not taken by time).
pub const SNAPSHOT_RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between retries of a failed snapshot when [`SnapshotPolicy::every`] is
/// `None`.
pub const SNAPSHOT_RETRY_MAX: Duration = Duration::from_secs(600);

/// How long the periodic snapshot waits after `failed_in_a_row` (at least 1) failures.
fn retry_delay(failed_in_a_row: u32, every: Option<Duration>) -> Duration {
    let cap = every.unwrap_or(SNAPSHOT_RETRY_MAX);
    let doublings = failed_in_a_row.saturating_sub(1).min(20);
    SNAPSHOT_RETRY_FIRST
        .saturating_mul(1u32 << doublings)
        .min(cap)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What [`DurableIndex::close_within`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseOutcome {
    /// Every LSN below this is on disk.
    pub synced_lsn: Lsn,
    /// A snapshot was still being written when the limit passed; it was left unfinished.
    pub snapshot_abandoned: bool,
}

/// An engine kept durable by an [`EventLog`] and a [`SnapshotStore`]; see the module docs.
pub struct DurableIndex {
    inner: Arc<Inner>,
    snapshotter: Option<(Sender<()>, JoinHandle<()>)>,
}

impl DurableIndex {
    /// Open `dir`: rebuild `engine` (which should be empty) from the newest valid snapshot and
    /// the log, then start logging. After a recovery that skipped damage, a snapshot is taken at
    /// once so the damage is never read again.
    pub fn open(
        dir: impl AsRef<Path>,
        config: DurableConfig,
        engine: Engine,
    ) -> Result<(Self, RecoveryReport)> {
        let dir = dir.as_ref();
        let mut sink = EngineSink::new(engine.clone());
        let (log, report) = EventLog::open(dir, config.log.clone(), &mut sink)?;
        engine.flush()?;
        let store = SnapshotStore::new(dir).with_fault(config.log.faults.snapshot);
        // Snapshots recovery rejected leave retention: counted among the `keep` newest, they
        // would push the valid older one out and let compaction delete the log it needs.
        // Renamed, not deleted: they are evidence.
        for rejected in &report.snapshots_rejected {
            match store.quarantine(&rejected.path) {
                Ok(to) => {
                    tracing::warn!(path = %rejected.path.display(), to = %to.display(), "rejected snapshot set aside")
                }
                Err(e) => {
                    tracing::warn!(path = %rejected.path.display(), error = %e, "rejected snapshot could not be set aside")
                }
            }
        }
        let inner = Arc::new(Inner {
            engine,
            log,
            store,
            intake: Mutex::new(()),
            appended: AtomicU64::new(report.entries_replayed),
            covered: AtomicU64::new(0),
            last_snapshot: Mutex::new(Instant::now()),
            backoff: Mutex::new(Backoff::default()),
            failures: AtomicU64::new(0),
            snapshotting: AtomicBool::new(false),
            policy: SnapshotPolicy {
                keep: config.snapshots.keep.max(1),
                ..config.snapshots
            },
        });
        if report.skipped_anything() {
            inner.snapshot()?;
        }
        let snapshotter = if inner.policy.every_entries.is_some() || inner.policy.every.is_some() {
            let (tx, rx) = channel::bounded::<()>(1);
            let bg = Arc::clone(&inner);
            let handle = std::thread::Builder::new()
                .name("kvindex-snapshotter".into())
                .spawn(move || bg.run_snapshotter(&rx))
                .map_err(|e| crate::PersistError::io("spawn snapshot thread", dir, None, e))?;
            Some((tx, handle))
        } else {
            None
        };
        Ok((Self { inner, snapshotter }, report))
    }

    /// The engine (for queries; do not apply events to it directly, or they are not logged).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The log.
    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    /// Log and apply one event of `namespace`. Wait on the ticket before acknowledging the
    /// producer.
    pub fn submit(
        &self,
        namespace: &Arc<NamespaceSpec>,
        source_seq: u64,
        event: RouterEvent,
    ) -> Result<AppendTicket> {
        self.submit_batch(vec![LogEntry::event(
            Arc::clone(namespace),
            source_seq,
            event,
        )])
    }

    /// Log `entries` as one record (all or nothing after a crash), then hand them to the engine.
    /// If the engine fails after the log accepted the batch, the error is returned and the
    /// entries are applied on the next recovery.
    pub fn submit_batch(&self, entries: Vec<LogEntry>) -> Result<AppendTicket> {
        let n = entries.len() as u64;
        let ticket = {
            let _intake = lock(&self.inner.intake);
            let ticket = self.inner.log.append(&entries)?;
            for e in entries {
                apply_live(&self.inner.engine, e)?;
            }
            ticket
        };
        let since = self.inner.since_snapshot_after(n);
        if let (Some(every), Some((tx, _))) = (self.inner.policy.every_entries, &self.snapshotter) {
            if since >= every {
                let _ = tx.try_send(());
            }
        }
        Ok(ticket)
    }

    /// Log and apply `remove_worker(worker_id)`.
    pub fn remove_worker(
        &self,
        namespace: &Arc<NamespaceSpec>,
        worker_id: WorkerId,
    ) -> Result<AppendTicket> {
        self.submit_control(namespace, worker_id, 0, LogOp::RemoveWorker)
    }

    /// Log and apply `remove_worker_dp_rank(worker_id, dp_rank)`.
    pub fn remove_worker_dp_rank(
        &self,
        namespace: &Arc<NamespaceSpec>,
        worker_id: WorkerId,
        dp_rank: u32,
    ) -> Result<AppendTicket> {
        self.submit_control(namespace, worker_id, dp_rank, LogOp::RemoveWorkerDpRank)
    }

    /// Log and apply `clear_all_blocks(worker_id)`.
    pub fn clear_all_blocks(
        &self,
        namespace: &Arc<NamespaceSpec>,
        worker_id: WorkerId,
    ) -> Result<AppendTicket> {
        self.submit_control(namespace, worker_id, 0, LogOp::ClearAllBlocks)
    }

    /// Log that the namespace `key` (a partition) is dropped, and drop it from the engine. The
    /// entry makes recovery drop it too, so a partition created again under the same key starts
    /// empty even when no snapshot was taken after the drop. Dropping an unknown key is logged
    /// all the same (block size 0) and changes nothing.
    pub fn drop_namespace(&self, key: &NamespaceKey) -> Result<AppendTicket> {
        let block_size = self
            .inner
            .engine
            .namespace(key)
            .map_or(0, |ns| ns.block_size());
        let spec = Arc::new(NamespaceSpec {
            key: key.clone(),
            block_size,
        });
        self.submit_batch(vec![LogEntry::drop_namespace(spec)])
    }

    /// Log and apply one control entry (`op` is never `Event`) as a batch of one.
    fn submit_control(
        &self,
        namespace: &Arc<NamespaceSpec>,
        worker_id: WorkerId,
        dp_rank: u32,
        op: LogOp,
    ) -> Result<AppendTicket> {
        self.submit_batch(vec![LogEntry::control(
            Arc::clone(namespace),
            worker_id,
            dp_rank,
            op,
        )])
    }

    /// Take a snapshot now (intake pauses while the index is copied), prune old snapshots and
    /// compact the log. A failure is counted (`kvindex_snapshot_failures_total`) and makes the
    /// periodic snapshot wait before it tries again, as its own failures do.
    pub fn snapshot_now(&self) -> Result<SnapshotMeta> {
        self.inner.snapshot()
    }

    /// Snapshot attempts that failed since open (periodic, [`Self::snapshot_now`] and the one
    /// after a recovery that skipped damage).
    pub fn snapshot_failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// The periodic snapshot's back-off after failed attempts; `None` once a snapshot was
    /// written (or none failed).
    pub fn snapshot_retry(&self) -> Option<SnapshotRetry> {
        let b = lock(&self.inner.backoff);
        Some(SnapshotRetry {
            failed_in_a_row: b.failed_in_a_row,
            failed_at: b.failed_at?,
            retry_at: b.retry_at?,
        })
    }

    /// Per-stream watermarks of what is on disk: what to ask producers to replay after.
    pub fn watermarks(&self) -> Vec<StreamWatermark> {
        self.inner.log.durable_watermarks()
    }

    /// Whether the tagged `source_seq` (docs/log-format.md §6) is in the log and durable: the
    /// exact set, not a watermark.
    pub fn tagged_seq_durable(&self, source_seq: u64) -> bool {
        self.inner.log.tagged_seq_durable(source_seq)
    }

    /// The groups of the durable tagged set, ascending (the set is not copied).
    pub fn tagged_groups(&self) -> Vec<u16> {
        self.inner.log.durable_tagged_groups()
    }

    /// The largest durable tagged sequence of `group` (`None`: the group holds none).
    pub fn tagged_last(&self, group: u16) -> Option<u64> {
        self.inner.log.durable_tagged_last(group)
    }

    /// The largest group recovery found in the tagged set (snapshot plus log), before any
    /// pruning by this process: a group allocated anew must be above it.
    pub fn recovered_max_tagged_group(&self) -> Option<u16> {
        self.inner.log.recovered_max_tagged_group()
    }

    /// Bound the durable tagged set: forget every group but `group`, and its sequences
    /// `<= floor` (the caller knows they are never asked about again). Returns the ranges left.
    pub fn prune_tagged_seqs(&self, group: u16, floor: u64) -> usize {
        self.inner.log.prune_tagged_seqs(group, floor)
    }

    /// Stop the snapshot thread, drain and sync the log.
    pub fn close(mut self) -> Result<()> {
        self.stop_snapshotter();
        self.inner.log.sync().map(|_| ())
    }

    /// Like [`close`](Self::close), but wait at most `limit` for a snapshot being written:
    /// past it the snapshot thread is left to the process exit (its temporary file is removed
    /// at the next open) and the log is synced anyway. An idle snapshot thread is always waited
    /// for (it ends as soon as it is told to). Returns the LSN below which all is durable and
    /// whether a snapshot was abandoned.
    pub fn close_within(mut self, limit: Duration) -> Result<CloseOutcome> {
        let mut snapshot_abandoned = false;
        if let Some((tx, handle)) = self.snapshotter.take() {
            drop(tx);
            let start = Instant::now();
            while !handle.is_finished() {
                if start.elapsed() >= limit && self.inner.snapshotting.load(Ordering::Acquire) {
                    snapshot_abandoned = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            if !snapshot_abandoned {
                let _ = handle.join();
            }
        }
        let synced_lsn = self.inner.log.sync()?;
        Ok(CloseOutcome {
            synced_lsn,
            snapshot_abandoned,
        })
    }

    fn stop_snapshotter(&mut self) {
        if let Some((tx, handle)) = self.snapshotter.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for DurableIndex {
    fn drop(&mut self) {
        self.stop_snapshotter();
    }
}

/// Hand one logged entry to the engine, as recovery's [`EngineSink`] does on replay.
fn apply_live(engine: &Engine, e: LogEntry) -> Result<()> {
    if let LogOp::DropNamespace = e.op {
        engine.remove_namespace(&e.namespace.key)?;
        return Ok(());
    }
    let ns = engine.create_namespace(e.namespace.key.clone(), e.namespace.block_size)?;
    match e.op {
        LogOp::Event(ev) => ns.apply(ev)?,
        LogOp::RemoveWorker => ns.remove_worker(e.worker_id)?,
        LogOp::RemoveWorkerDpRank => ns.remove_worker_dp_rank(e.worker_id, e.dp_rank)?,
        LogOp::ClearAllBlocks => ns.clear_all_blocks(e.worker_id)?,
        // Handled above.
        LogOp::DropNamespace => {}
    }
    Ok(())
}

impl Inner {
    /// Count `n` entries just appended; the entries not covered by a snapshot.
    fn since_snapshot_after(&self, n: u64) -> u64 {
        let appended = self.appended.fetch_add(n, Ordering::Relaxed) + n;
        appended.saturating_sub(self.covered.load(Ordering::Relaxed))
    }

    fn snapshot_due(&self) -> bool {
        let since = self
            .appended
            .load(Ordering::Relaxed)
            .saturating_sub(self.covered.load(Ordering::Relaxed));
        if since == 0 {
            return false;
        }
        if lock(&self.backoff)
            .retry_at
            .is_some_and(|at| Instant::now() < at)
        {
            return false;
        }
        if self.policy.every_entries.is_some_and(|n| since >= n) {
            return true;
        }
        self.policy
            .every
            .is_some_and(|d| lock(&self.last_snapshot).elapsed() >= d)
    }

    /// The snapshot thread: every 500 ms (or when woken by the entry count), a snapshot if one
    /// is due. After a failure the next attempt waits ([`retry_delay`]); once the log writer has
    /// failed, which lasts until the process restarts, it logs that once and stops.
    fn run_snapshotter(&self, rx: &channel::Receiver<()>) {
        loop {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Some(cause) = self.log.writer_failure() {
                tracing::error!(%cause, "the log writer has failed: no more periodic snapshots until the process restarts");
                return;
            }
            if !self.snapshot_due() {
                continue;
            }
            self.snapshotting.store(true, Ordering::Release);
            let result = self.snapshot();
            self.snapshotting.store(false, Ordering::Release);
            match result {
                Ok(_) => {}
                Err(e @ PersistError::WriterFailed { .. }) => {
                    tracing::error!(error = %e, "periodic snapshot failed: the log writer has failed, no more periodic snapshots until the process restarts");
                    return;
                }
                Err(e) => {
                    let retry_in = lock(&self.backoff).retry_at.map_or(Duration::ZERO, |at| {
                        at.saturating_duration_since(Instant::now())
                    });
                    tracing::error!(error = %e, retry_in_ms = retry_in.as_millis() as u64, "periodic snapshot failed; trying again later");
                }
            }
        }
    }

    /// Take a snapshot; a failure is counted and delays the next periodic attempt.
    fn snapshot(&self) -> Result<SnapshotMeta> {
        let result = self.take_snapshot();
        let mut backoff = lock(&self.backoff);
        match &result {
            Ok(_) => *backoff = Backoff::default(),
            Err(_) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("kvindex_snapshot_failures_total").increment(1);
                let now = Instant::now();
                backoff.failed_in_a_row = backoff.failed_in_a_row.saturating_add(1);
                backoff.failed_at = Some(now);
                backoff.retry_at =
                    Some(now + retry_delay(backoff.failed_in_a_row, self.policy.every));
            }
        }
        result
    }

    fn take_snapshot(&self) -> Result<SnapshotMeta> {
        let started = Instant::now();
        let (image, tagged, appended) = {
            let _intake = lock(&self.intake);
            let next = self.log.next_lsn();
            // The snapshot must never cover an LSN the log could still lose.
            self.log.sync()?;
            let wms = self.log.durable_watermarks();
            let tagged = self.log.durable_tagged_seqs();
            let image = SnapshotImage::capture(&self.engine, next, &wms)?;
            (image, tagged, self.appended.load(Ordering::Relaxed))
        };
        // (Re)written even when a snapshot of this position exists: the rename is atomic and
        // replaces a possibly damaged file.
        let meta = self.store.write_with(&image, &tagged)?;
        // Written: what it covers is no longer due (entries appended since the capture still
        // count). Not before: a failed snapshot stays due, and is tried again after a backoff.
        self.covered.fetch_max(appended, Ordering::Relaxed);
        *lock(&self.last_snapshot) = started;
        self.store.prune(self.policy.keep)?;
        if let Some(oldest) = self.store.list()?.first() {
            self.log.compact(oldest.next_lsn)?;
        }
        tracing::info!(
            path = %meta.path.display(),
            next_lsn = meta.next_lsn,
            ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        metrics::histogram!("kvindex_snapshot_seconds").record(started.elapsed().as_secs_f64());
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_up_to_the_snapshot_interval() {
        let every = Some(Duration::from_secs(600));
        let delays: Vec<u64> = (1..=12).map(|n| retry_delay(n, every).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert_eq!(retry_delay(u32::MAX, every), Duration::from_secs(600));
        // Never longer than a short interval; the default cap without one.
        assert_eq!(
            retry_delay(3, Some(Duration::from_millis(300))),
            Duration::from_millis(300)
        );
        assert_eq!(retry_delay(u32::MAX, None), SNAPSHOT_RETRY_MAX);
    }

    #[test]
    fn closing_within_no_time_still_waits_for_an_idle_snapshot_thread_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(kvindex_engine::EngineConfig::default());
        let (idx, _) = DurableIndex::open(dir.path(), DurableConfig::default(), engine).unwrap();
        assert!(idx.snapshotter.is_some());
        let closed = idx.close_within(Duration::ZERO).unwrap();
        assert!(!closed.snapshot_abandoned);
        assert_eq!(closed.synced_lsn, 1);
    }
}
