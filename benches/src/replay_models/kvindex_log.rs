//! kvindex's side of the §3 comparison, with the real persistence crate (no model): the stream
//! is written through [`DurableIndex`] (log first, then the engine) into a data directory, a
//! real snapshot is written at a chosen batch, "events since X" is read back with the real log
//! reader ([`tool::export`]), and a cold consumer is rebuilt by real recovery ([`read_log`]
//! into an [`EngineSink`]): newest snapshot + log tail, or the whole log.
//!
//! The snapshot is captured and written the way `DurableIndex` does it, but without the
//! compaction that follows a periodic snapshot, so the whole log stays on disk. (With the
//! default policy — a snapshot every 1M entries, two kept — the server retains at least the
//! last 1M entries; segments entirely covered by the older kept snapshot are deleted.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvindex_engine::protocol::RouterEvent;
use kvindex_engine::{Engine, EngineConfig, NamespaceKey};
use kvindex_persistence::{
    read_log, tool, DurableConfig, DurableIndex, EngineSink, FsyncPolicy, LogConfig, LogEntry, Lsn,
    NamespaceSpec, PersistError, RecoveryPolicy, SnapshotImage, SnapshotPolicy, SnapshotStore,
};

use super::stream::{namespace_digest, EventStream, StateDigest, StreamError};

/// Model name of the namespace the comparison writes.
pub const NAMESPACE_MODEL: &str = "replay-compare";

/// Why writing or reading the log failed.
#[derive(Debug, thiserror::Error)]
pub enum KvindexLogError {
    #[error("persistence: {0}")]
    Persist(#[from] PersistError),
    #[error("engine: {0}")]
    Engine(#[from] kvindex_engine::EngineError),
    #[error("state: {0}")]
    State(#[from] StreamError),
    #[error("worker {worker_id} has no batch {seq} in the log")]
    UnknownBatch { worker_id: u64, seq: u64 },
    #[error("namespace {0} missing after recovery")]
    MissingNamespace(String),
    #[error("moving the snapshot aside: {0}")]
    Io(#[from] std::io::Error),
}

/// A written log: where it is, and where each batch landed.
#[derive(Debug, Clone)]
pub struct KvindexLog {
    pub dir: PathBuf,
    pub spec: Arc<NamespaceSpec>,
    /// Per worker, the LSN of each batch's first entry (index = batch seq). The log keeps
    /// per-stream watermarks, not a per-batch index: this side table maps a producer's batch
    /// number to a log position, as a consumer tracking LSNs would already know it.
    pub batch_lsn: HashMap<u64, Vec<Lsn>>,
    /// `next_lsn` of the snapshot written (None: none).
    pub snapshot_next_lsn: Option<Lsn>,
    pub snapshot_path: Option<PathBuf>,
    /// The LSN after the last entry.
    pub end_lsn: Lsn,
    /// State of the writing engine after the last batch.
    pub written_digest: StateDigest,
}

/// The namespace every batch goes to (block size as in the replay harness).
pub fn namespace_spec() -> Arc<NamespaceSpec> {
    Arc::new(NamespaceSpec::new(
        NAMESPACE_MODEL,
        "default",
        crate::backend::BENCH_BLOCK_SIZE,
    ))
}

/// Write `stream` through a [`DurableIndex`] in `dir` (one log record per batch, source
/// sequence = the batch's seq); after `snapshot_after` batches (if given) write a snapshot.
/// The log is not fsynced per record (`--fsync never`): only reads are measured.
pub fn write(
    dir: &Path,
    stream: &EventStream,
    snapshot_after: Option<usize>,
    event_threads: usize,
) -> Result<KvindexLog, KvindexLogError> {
    let spec = namespace_spec();
    let engine = Engine::new(EngineConfig {
        event_threads: event_threads.max(1),
        ..EngineConfig::default()
    });
    let config = DurableConfig {
        log: LogConfig {
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        },
        snapshots: SnapshotPolicy {
            every_entries: None,
            every: None,
            keep: 2,
        },
    };
    let (durable, _report) = DurableIndex::open(dir, config, engine.clone())?;
    let mut batch_lsn: HashMap<u64, Vec<Lsn>> = HashMap::new();
    let mut snapshot = None;
    for (i, batch) in stream.batches.iter().enumerate() {
        let entries = batch
            .events
            .iter()
            .map(|e| LogEntry::event(Arc::clone(&spec), batch.seq, e.clone()))
            .collect();
        let ticket = durable.submit_batch(entries)?;
        batch_lsn
            .entry(batch.worker_id)
            .or_default()
            .push(ticket.first_lsn());
        if snapshot_after == Some(i + 1) {
            // What DurableIndex's snapshot does (intake is ours alone here), minus compaction.
            let next = durable.log().next_lsn();
            durable.log().sync()?;
            let image = SnapshotImage::capture(durable.engine(), next, &durable.watermarks())?;
            snapshot = Some(SnapshotStore::new(dir).write(&image)?);
        }
    }
    durable.log().sync()?;
    let end_lsn = durable.log().next_lsn();
    let ns = durable
        .engine()
        .namespace(&spec.key)
        .ok_or_else(|| KvindexLogError::MissingNamespace(spec.key.model_name.clone()))?;
    let written_digest = namespace_digest(&ns)?;
    drop(ns);
    durable.close()?;
    engine.shutdown();
    Ok(KvindexLog {
        dir: dir.to_path_buf(),
        spec,
        batch_lsn,
        snapshot_next_lsn: snapshot.as_ref().map(|m| m.next_lsn),
        snapshot_path: snapshot.map(|m| m.path),
        end_lsn,
        written_digest,
    })
}

impl KvindexLog {
    /// The LSN of `worker_id`'s batch `seq`.
    pub fn lsn_of(&self, worker_id: u64, seq: u64) -> Result<Lsn, KvindexLogError> {
        self.batch_lsn
            .get(&worker_id)
            .and_then(|v| v.get(usize::try_from(seq).ok()?))
            .copied()
            .ok_or(KvindexLogError::UnknownBatch { worker_id, seq })
    }

    /// Every event of `worker_id` since its batch `seq`, read from the log on disk.
    pub fn events_since(
        &self,
        worker_id: u64,
        seq: u64,
    ) -> Result<Vec<RouterEvent>, KvindexLogError> {
        let from = self.lsn_of(worker_id, seq)?;
        tool::export(&self.dir, from, Lsn::MAX, Some(worker_id))?
            .map(|r| r.map_err(KvindexLogError::from))
            .collect()
    }

    /// Every event of every worker from LSN `from` on (what a consumer tracking the global log
    /// position asks for).
    pub fn all_events_since_lsn(&self, from: Lsn) -> Result<Vec<RouterEvent>, KvindexLogError> {
        tool::export(&self.dir, from, Lsn::MAX, None)?
            .map(|r| r.map_err(KvindexLogError::from))
            .collect()
    }

    /// Bytes of the data directory (segments + snapshots).
    pub fn bytes_on_disk(&self) -> Result<u64, KvindexLogError> {
        let mut total = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let meta = entry?.metadata()?;
            if meta.is_file() {
                total += meta.len();
            }
        }
        Ok(total)
    }

    /// Rebuild a fresh engine by real recovery: the newest snapshot, then the log after it.
    /// Returns the engine (flushed) and the number of log entries replayed.
    pub fn cold_start(&self, event_threads: usize) -> Result<(Engine, u64), KvindexLogError> {
        let engine = Engine::new(EngineConfig {
            event_threads: event_threads.max(1),
            ..EngineConfig::default()
        });
        let mut sink = EngineSink::new(engine.clone());
        read_log(&self.dir, RecoveryPolicy::default(), None, &mut sink)?;
        engine.flush()?;
        Ok((engine, sink.applied))
    }

    /// Rebuild a fresh engine from the whole log, ignoring the snapshot (it is moved aside for
    /// the duration and put back, also on error).
    pub fn cold_start_full_log(
        &self,
        event_threads: usize,
    ) -> Result<(Engine, u64), KvindexLogError> {
        let Some(path) = &self.snapshot_path else {
            return self.cold_start(event_threads);
        };
        let aside = self.dir.with_extension("snapshot-aside");
        std::fs::rename(path, &aside)?;
        let result = self.cold_start(event_threads);
        std::fs::rename(&aside, path)?;
        result
    }

    /// The digest of an engine rebuilt by [`KvindexLog::cold_start`].
    pub fn engine_digest(&self, engine: &Engine) -> Result<StateDigest, KvindexLogError> {
        let ns = engine
            .namespace(&self.spec.key)
            .ok_or_else(|| KvindexLogError::MissingNamespace(self.spec.key.model_name.clone()))?;
        Ok(namespace_digest(&ns)?)
    }
}

/// The namespace key of the comparison's namespace.
pub fn namespace_key() -> NamespaceKey {
    namespace_spec().key.clone()
}
