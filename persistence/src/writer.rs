//! The append path: callers encode their batch, get LSNs under a short lock and queue it; one
//! writer thread gathers whatever is queued into a single write (group commit), syncs it as the
//! fsync policy says, and wakes the callers waiting on their [`AppendTicket`]s.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::sync::channel::{self, Receiver, RecvTimeoutError, Sender};
use crate::sync::{Condvar, Mutex, MutexGuard};
use kvindex_engine::NamespaceKey;
use rkyv::rancor;
use rkyv::util::AlignedVec;

use crate::config::{FsyncPolicy, LogConfig};
use crate::entry::{LogEntry, LogOp, Lsn, NamespaceSpec, StreamKey, StreamWatermark};
use crate::error::{PersistError, Result};
use crate::format::{self, frame_len, MAX_RECORD_LEN, SEGMENT_HEADER_LEN};
use crate::io::{IoBackendKind, SegmentIo};
use crate::lsn_index::{self, IndexAppender, IndexMark, MarkPlanner};
use crate::record::{ArchivedLogBatch, LogBatch};
use crate::segment::segment_file_name;
use crate::seq_set::{split_tagged, TaggedSeqs};

/// `(worker_id, dp_rank)` → `(source_seq, lsn)` of the stream's last event entry.
type StreamMarks = HashMap<(u64, u32), (u64, Lsn)>;

/// Per-stream `(source_seq, lsn)` of the last event entry, by namespace, and the exact set of
/// tagged source sequences of event entries (docs/log-format.md §6).
#[derive(Debug, Default, Clone)]
pub(crate) struct WatermarkTable {
    map: HashMap<NamespaceKey, StreamMarks>,
    tagged: TaggedSeqs,
}

impl WatermarkTable {
    pub(crate) fn set(&mut self, ns: &NamespaceKey, worker: u64, dp: u32, seq: u64, lsn: Lsn) {
        if let Some(m) = self.map.get_mut(ns) {
            m.insert((worker, dp), (seq, lsn));
        } else {
            self.map
                .entry(ns.clone())
                .or_default()
                .insert((worker, dp), (seq, lsn));
        }
    }

    /// Record an event entry's source sequence in the tagged set (untagged: ignored).
    pub(crate) fn insert_tagged(&mut self, source_seq: u64) {
        self.tagged.insert(source_seq);
    }

    /// Add a snapshot's (or another table's) tagged sequences.
    pub(crate) fn union_tagged(&mut self, other: &TaggedSeqs) {
        self.tagged.union(other);
    }

    pub(crate) fn tagged(&self) -> &TaggedSeqs {
        &self.tagged
    }

    pub(crate) fn tagged_mut(&mut self) -> &mut TaggedSeqs {
        &mut self.tagged
    }

    pub(crate) fn merge(&mut self, other: WatermarkTable) {
        self.tagged.union(&other.tagged);
        for (ns, m) in other.map {
            let dst = self.map.entry(ns).or_default();
            for (k, (seq, lsn)) in m {
                match dst.get(&k) {
                    Some(&(_, l)) if l > lsn => {}
                    _ => {
                        dst.insert(k, (seq, lsn));
                    }
                }
            }
        }
    }

    pub(crate) fn insert_all(&mut self, wms: &[StreamWatermark]) {
        for w in wms {
            self.set(
                &w.stream.namespace,
                w.stream.worker_id,
                w.stream.dp_rank,
                w.source_seq,
                w.lsn,
            );
        }
    }

    pub(crate) fn to_vec(&self) -> Vec<StreamWatermark> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .flat_map(|(ns, m)| {
                m.iter().map(
                    |(&(worker_id, dp_rank), &(source_seq, lsn))| StreamWatermark {
                        stream: StreamKey {
                            namespace: ns.clone(),
                            worker_id,
                            dp_rank,
                        },
                        source_seq,
                        lsn,
                    },
                )
            })
            .collect();
        v.sort();
        v
    }
}

/// Watermark moves carried by one request: `(namespace, worker, dp_rank, source_seq, lsn)`.
type WatermarkMoves = Vec<(Arc<NamespaceSpec>, u64, u32, u64, Lsn)>;

struct Request {
    end_lsn: Lsn,
    payload: AlignedVec,
    watermarks: WatermarkMoves,
    /// The batch holds an entry of segment format version 2 (`DropNamespace`).
    needs_v2: bool,
    /// Tagged source sequences of the batch's event entries (usually one).
    tagged: Vec<u64>,
}

enum Msg {
    Append(Request),
    Sync(Sender<Result<Lsn>>),
}

#[derive(Debug, Default)]
struct Progress {
    /// Every LSN below this is written (handed to the kernel).
    written: Lsn,
    /// Every LSN below this is on disk.
    synced: Lsn,
    /// Why the writer stopped, once it has.
    failed: Option<String>,
}

/// State shared between callers and the writer thread.
pub(crate) struct Shared {
    progress: Mutex<Progress>,
    cond: Condvar,
    durable: Mutex<WatermarkTable>,
    /// Segments of the log, oldest first: `(first_lsn, path)`; the last is being written.
    pub(crate) segments: Mutex<Vec<(Lsn, PathBuf)>>,
    policy: FsyncPolicy,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; keep going with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn acked(&self, p: &Progress) -> Lsn {
        match self.policy {
            FsyncPolicy::Always => p.synced,
            _ => p.written,
        }
    }

    /// Publish that every LSN below `end` is written (and on disk when `synced`). Called after
    /// the bytes were handed to the kernel: a waiter that sees the new value (under the progress
    /// lock) can map the file and find every record below `end` complete.
    fn set_progress(&self, end: Lsn, synced: bool) {
        let mut p = lock(&self.progress);
        p.written = end;
        if synced {
            p.synced = end;
        }
    }

    fn fail(&self, cause: String) {
        let mut p = lock(&self.progress);
        if p.failed.is_none() {
            tracing::error!(%cause, "log writer stopped");
            metrics::counter!("kvindex_log_writer_failures_total").increment(1);
            p.failed = Some(cause);
        }
        self.cond.notify_all();
    }
}

/// A pending append: which LSNs it got, and a way to wait until it is acknowledged.
#[must_use = "an append is acknowledged only once `wait` returns Ok"]
pub struct AppendTicket {
    shared: Arc<Shared>,
    first_lsn: Lsn,
    end_lsn: Lsn,
}

impl AppendTicket {
    /// LSN of the batch's first entry.
    pub fn first_lsn(&self) -> Lsn {
        self.first_lsn
    }

    /// LSN of the batch's last entry.
    pub fn last_lsn(&self) -> Lsn {
        self.end_lsn - 1
    }

    /// Block until the batch is acknowledged under the fsync policy (synced for `always`,
    /// written otherwise); returns its last LSN. Fails if the writer stopped before that.
    pub fn wait(&self) -> Result<Lsn> {
        let mut p = lock(&self.shared.progress);
        loop {
            if self.shared.acked(&p) >= self.end_lsn {
                return Ok(self.end_lsn - 1);
            }
            if let Some(cause) = &p.failed {
                return Err(PersistError::WriterFailed {
                    cause: cause.clone(),
                });
            }
            p = self.shared.cond.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Intake {
    next_lsn: Lsn,
    tx: Option<Sender<Msg>>,
}

/// The log's append handle: assigns LSNs, queues batches for the writer thread (bounded queue,
/// so producers feel backpressure) and reports durable progress.
pub struct LogWriter {
    shared: Arc<Shared>,
    intake: Mutex<Intake>,
    thread: Mutex<Option<JoinHandle<()>>>,
    kind: IoBackendKind,
    /// Largest payload of one record ([`LogConfig::max_record_bytes`], clamped to
    /// `1..=MAX_RECORD_LEN`).
    max_record: u64,
}

/// Where the writer starts: the open segment and its valid end.
pub(crate) struct WriterStart {
    pub dir: PathBuf,
    /// `Some((first_lsn, path, valid_end))` to append to an existing segment; `None` to start a
    /// new segment at `next_lsn`.
    pub tail: Option<(Lsn, PathBuf, u64)>,
    pub next_lsn: Lsn,
    /// Older segments (not written any more), oldest first.
    pub older_segments: Vec<(Lsn, PathBuf)>,
    pub watermarks: WatermarkTable,
    /// The LSN index marks of `tail`'s records, as recovery computed them.
    pub tail_marks: Vec<IndexMark>,
}

impl LogWriter {
    pub(crate) fn start(start: WriterStart, cfg: &LogConfig) -> Result<Self> {
        let mut io =
            SegmentIo::new(cfg.io, cfg.faults.clone()).map_err(PersistError::IoUringUnavailable)?;
        let kind = io.kind();
        tracing::info!(backend = %kind, fsync = %cfg.fsync, "log writer starting");
        let mut tail_marks = start.tail_marks;
        // A segment created here under `never` has neither its header nor its directory entry
        // synced yet: the next sync (`EventLog::sync`, hence every snapshot) must do both.
        let mut created_unsynced = false;
        let (seg_first, path, file, offset, seg_version) = match start.tail {
            Some((first, path, end)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| PersistError::io("open", &path, None, e))?;
                check_resume_point(&file, &path, end)?;
                let seg_version = read_segment_version(&file, &path)?;
                // The records recovered from this segment count as synced from here on
                // (watermarks included, which acknowledge redeliveries), but recovery read
                // them from the page cache: the process that wrote them may have died before
                // its fdatasync. Make them, and the segment's directory entry, durable first.
                io.sync_recovered(&file)
                    .map_err(|e| PersistError::io("fdatasync", &path, None, e))?;
                io.sync_dir(&start.dir)
                    .map_err(|e| PersistError::io("fsync directory", &start.dir, None, e))?;
                (first, path, file, end, seg_version)
            }
            None => {
                let version = format::BASE_FORMAT_VERSION;
                let (path, file) =
                    create_segment(&mut io, &start.dir, start.next_lsn, version, cfg.fsync)?;
                created_unsynced = cfg.fsync == FsyncPolicy::Never;
                tail_marks.clear();
                (
                    start.next_lsn,
                    path,
                    file,
                    SEGMENT_HEADER_LEN as u64,
                    version,
                )
            }
        };
        let (index, planner) = open_index(&path, seg_first, cfg.lsn_index_stride, &tail_marks);
        let mut segments = start.older_segments;
        segments.push((seg_first, path.clone()));
        let shared = Arc::new(Shared {
            progress: Mutex::new(Progress {
                written: start.next_lsn,
                synced: start.next_lsn,
                failed: None,
            }),
            cond: Condvar::new(),
            durable: Mutex::new(start.watermarks),
            segments: Mutex::new(segments),
            policy: cfg.fsync,
        });
        let (tx, rx) = channel::bounded(cfg.queue_capacity.max(1));
        let mut thread = WriterThread {
            dir: start.dir,
            io,
            policy: cfg.fsync,
            // At most what the read-only tools read whole (segment::MAX_READ_SEGMENT_BYTES),
            // one record past the limit included.
            segment_bytes: cfg.segment_bytes.clamp(
                SEGMENT_HEADER_LEN as u64 + 8,
                crate::segment::MAX_READ_SEGMENT_BYTES - 2 * format::MAX_RECORD_LEN as u64,
            ),
            max_group_bytes: cfg.max_group_bytes.max(1),
            file,
            path,
            offset,
            seg_version,
            buf: Vec::with_capacity(1 << 16),
            buf_end_lsn: start.next_lsn,
            index_stride: cfg.lsn_index_stride,
            index,
            planner,
            pending_marks: Vec::new(),
            dirty_since: created_unsynced.then(Instant::now),
            dir_dirty: created_unsynced,
            pending: WatermarkTable::default(),
            shared: Arc::clone(&shared),
            rx,
        };
        let handle = std::thread::Builder::new()
            .name("kvindex-log-writer".into())
            .spawn(move || thread.run())
            .map_err(|e| PersistError::io("spawn writer thread", "", None, e))?;
        Ok(Self {
            shared,
            intake: Mutex::new(Intake {
                next_lsn: start.next_lsn,
                tx: Some(tx),
            }),
            thread: Mutex::new(Some(handle)),
            kind,
            max_record: u64::from(cfg.max_record_bytes.clamp(1, MAX_RECORD_LEN)),
        })
    }

    /// Which write path runs.
    pub fn io_backend(&self) -> IoBackendKind {
        self.kind
    }

    /// Append `entries` as one record (all or nothing after a crash). Returns once the batch is
    /// queued; `wait()` on the ticket for the acknowledgement.
    pub fn append(&self, entries: &[LogEntry]) -> Result<AppendTicket> {
        // Encode outside the lock; the LSN is patched in below.
        let mut payload = encode_record(entries, self.max_record)?;
        let n = entries.len() as u64;
        let mut intake = lock(&self.intake);
        if let Some(cause) = &lock(&self.shared.progress).failed {
            return Err(PersistError::WriterFailed {
                cause: cause.clone(),
            });
        }
        let first_lsn = intake.next_lsn;
        patch_first_lsn(&mut payload, first_lsn);
        let watermarks = watermark_moves(entries, first_lsn);
        let needs_v2 = entries.iter().any(LogEntry::needs_v2_segment);
        let tagged = tagged_seqs(entries);
        let tx = intake
            .tx
            .as_ref()
            .ok_or_else(|| PersistError::WriterFailed {
                cause: "the log is closed".into(),
            })?;
        // Sent while holding the intake lock: queue order is LSN order.
        tx.send(Msg::Append(Request {
            end_lsn: first_lsn + n,
            payload,
            watermarks,
            needs_v2,
            tagged,
        }))
        .map_err(|_| PersistError::WriterFailed {
            cause: self.failure_cause(),
        })?;
        intake.next_lsn = first_lsn + n;
        Ok(AppendTicket {
            shared: Arc::clone(&self.shared),
            first_lsn,
            end_lsn: first_lsn + n,
        })
    }

    fn failure_cause(&self) -> String {
        lock(&self.shared.progress)
            .failed
            .clone()
            .unwrap_or_else(|| "the writer thread is gone".into())
    }

    /// Force everything appended so far to disk (whatever the policy); returns the next LSN,
    /// below which everything is durable.
    pub fn sync(&self) -> Result<Lsn> {
        let (tx, rx) = channel::bounded(1);
        {
            let intake = lock(&self.intake);
            let sender = intake
                .tx
                .as_ref()
                .ok_or_else(|| PersistError::WriterFailed {
                    cause: "the log is closed".into(),
                })?;
            sender
                .send(Msg::Sync(tx))
                .map_err(|_| PersistError::WriterFailed {
                    cause: self.failure_cause(),
                })?;
        }
        // A writer that fails drains its queue once and exits; a request sent between that drain
        // and the exit is never answered (and its reply sender never dropped), so watch the
        // failure flag instead of blocking forever.
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(reply) => return reply,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(PersistError::WriterFailed {
                        cause: self.failure_cause(),
                    })
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(cause) = self.failure() {
                        return rx
                            .try_recv()
                            .unwrap_or(Err(PersistError::WriterFailed { cause }));
                    }
                }
            }
        }
    }

    /// The LSN the next entry will get.
    pub fn next_lsn(&self) -> Lsn {
        lock(&self.intake).next_lsn
    }

    /// Every LSN below this is on disk.
    pub fn synced_lsn(&self) -> Lsn {
        lock(&self.shared.progress).synced
    }

    /// Per-stream watermarks of what is on disk (see docs/log-format.md §6).
    pub fn durable_watermarks(&self) -> Vec<StreamWatermark> {
        lock(&self.shared.durable).to_vec()
    }

    /// Whether the tagged `source_seq` is in the durable set (docs/log-format.md §6).
    pub fn tagged_seq_durable(&self, source_seq: u64) -> bool {
        lock(&self.shared.durable).tagged().contains(source_seq)
    }

    /// The durable tagged source sequences (a copy, for a snapshot).
    pub fn durable_tagged_seqs(&self) -> TaggedSeqs {
        lock(&self.shared.durable).tagged().clone()
    }

    /// The groups of the durable tagged set (the sets are not copied).
    pub fn durable_tagged_groups(&self) -> Vec<u16> {
        lock(&self.shared.durable).tagged().group_ids()
    }

    /// The largest durable tagged sequence of `group`.
    pub fn durable_tagged_last(&self, group: u16) -> Option<u64> {
        lock(&self.shared.durable).tagged().last_of(group)
    }

    /// Forget every durable tagged sequence but those of `group` above `floor`. Returns the
    /// ranges left.
    pub fn prune_tagged_seqs(&self, group: u16, floor: u64) -> usize {
        let mut d = lock(&self.shared.durable);
        d.tagged_mut().retain_above(group, floor);
        d.tagged().range_count()
    }

    /// Why the writer stopped, if it has.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.progress).failed.clone()
    }

    pub(crate) fn segments(&self) -> Vec<(Lsn, PathBuf)> {
        lock(&self.shared.segments).clone()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Drain the queue, sync (unless `never`) and stop the writer thread. Idempotent.
    pub fn close(&self) -> Result<()> {
        let tx = lock(&self.intake).tx.take();
        drop(tx);
        if let Some(h) = lock(&self.thread).take() {
            let _ = h.join();
        }
        match self.failure() {
            Some(cause) => Err(PersistError::WriterFailed { cause }),
            None => Ok(()),
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// Encode `entries` as the payload of one record (its first LSN 0, patched in when it is
/// appended), refusing what [`LogWriter::append`] refuses before queueing anything: an empty
/// batch ([`PersistError::EmptyBatch`]) and one over `max_record` bytes (the writer's configured record limit)
/// ([`PersistError::RecordTooLarge`]). `tool::import` checks its batches with it before it
/// writes any.
pub(crate) fn encode_record(entries: &[LogEntry], max_record: u64) -> Result<AlignedVec> {
    if entries.is_empty() {
        return Err(PersistError::EmptyBatch);
    }
    let batch = LogBatch::from_entries(0, entries);
    let payload =
        rkyv::to_bytes::<rancor::Error>(&batch).map_err(|e| PersistError::Encode(e.to_string()))?;
    if payload.len() as u64 > max_record {
        return Err(PersistError::RecordTooLarge {
            bytes: payload.len() as u64,
            max: max_record,
        });
    }
    Ok(payload)
}

/// Overwrite the root's `first_lsn` of an encoded batch. rkyv puts the root object at the end
/// of the buffer, and archived structs are laid out in declaration order (`repr(C)`).
fn patch_first_lsn(payload: &mut AlignedVec, lsn: Lsn) {
    let root = payload.len() - std::mem::size_of::<ArchivedLogBatch>();
    let at = root + std::mem::offset_of!(ArchivedLogBatch, first_lsn);
    payload[at..at + 8].copy_from_slice(&lsn.to_le_bytes());
    debug_assert_eq!(
        format::access_batch(payload).map(|b| b.first_lsn.to_native()),
        Ok(lsn)
    );
}

/// The distinct tagged source sequences of a batch's event entries, ascending (sorted and
/// deduplicated: linear-logarithmic in the batch, which is built under the intake lock).
fn tagged_seqs(entries: &[LogEntry]) -> Vec<u64> {
    let mut out: Vec<u64> = entries
        .iter()
        .filter(|e| matches!(e.op, LogOp::Event(_)) && split_tagged(e.source_seq).is_some())
        .map(|e| e.source_seq)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The last event entry of each stream of a batch.
fn watermark_moves(entries: &[LogEntry], first_lsn: Lsn) -> WatermarkMoves {
    let mut out: WatermarkMoves = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if !matches!(e.op, LogOp::Event(_)) {
            continue;
        }
        let lsn = first_lsn + i as u64;
        match out
            .iter_mut()
            .find(|w| w.1 == e.worker_id && w.2 == e.dp_rank && w.0.key == e.namespace.key)
        {
            Some(w) => {
                w.3 = e.source_seq;
                w.4 = lsn;
            }
            None => out.push((
                Arc::clone(&e.namespace),
                e.worker_id,
                e.dp_rank,
                e.source_seq,
                lsn,
            )),
        }
    }
    out
}

/// The format version in the (already validated by recovery) header of segment `file`.
fn read_segment_version(file: &File, path: &Path) -> Result<u16> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| PersistError::io("read header of", path, Some(0), e))?;
    format::decode_segment_header_version(&h)
        .map(|(_, v)| v)
        .map_err(|damage| PersistError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            damage,
            policy: "writer",
            advice: crate::error::CORRUPT_ADVICE,
        })
}

/// Refuse to resume a segment at `end` unless that is past its header and exactly at the end
/// of the file: anywhere else the next write would overwrite what the segment holds (its
/// header, or records recovery did not read).
fn check_resume_point(file: &File, path: &Path, end: u64) -> Result<()> {
    let file_len = file
        .metadata()
        .map_err(|e| PersistError::io("stat", path, None, e))?
        .len();
    if end < SEGMENT_HEADER_LEN as u64 || end != file_len {
        tracing::error!(path = %path.display(), offset = end, file_len, "refusing to resume a log segment at that offset");
        return Err(PersistError::UnsafeTail {
            path: path.to_path_buf(),
            offset: end,
            file_len,
            header_len: SEGMENT_HEADER_LEN as u64,
        });
    }
    Ok(())
}

/// Create segment `first_lsn` of format `version` in `dir` with its header (synced, with the
/// directory, unless `never`: then the caller marks both for the next sync).
fn create_segment(
    io: &mut SegmentIo,
    dir: &Path,
    first_lsn: Lsn,
    version: u16,
    policy: FsyncPolicy,
) -> Result<(PathBuf, File)> {
    let path = dir.join(segment_file_name(first_lsn));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| PersistError::io("create", &path, None, e))?;
    let sync = policy != FsyncPolicy::Never;
    let header = format::encode_segment_header_version(first_lsn, version);
    io.write_at(&file, 0, &header, sync)
        .map_err(|e| PersistError::io("write header of", &path, Some(0), e))?;
    if sync {
        io.sync_dir(dir)
            .map_err(|e| PersistError::io("fsync directory", dir, None, e))?;
    }
    metrics::counter!("kvindex_log_segments_created_total").increment(1);
    Ok((path, file))
}

/// Open (or repair) the LSN index of the segment being written, holding `marks`. A failure
/// only costs readers a scan: it is logged and counted, and the segment goes unindexed.
fn open_index(
    segment: &Path,
    first_lsn: Lsn,
    stride: u32,
    marks: &[IndexMark],
) -> (Option<IndexAppender>, MarkPlanner) {
    if stride == 0 {
        return (None, MarkPlanner::new(0));
    }
    match lsn_index::ensure(segment, first_lsn, stride, marks) {
        Ok((appender, _)) => (Some(appender), MarkPlanner::resume(stride, marks)),
        Err(e) => {
            index_write_failed(segment, &e);
            (None, MarkPlanner::new(0))
        }
    }
}

fn index_write_failed(segment: &Path, e: &std::io::Error) {
    tracing::warn!(segment = %segment.display(), error = %e, "cannot write the segment's LSN index; readers will scan it");
    metrics::counter!("kvindex_lsn_index_write_failures_total").increment(1);
}

struct WriterThread {
    dir: PathBuf,
    io: SegmentIo,
    policy: FsyncPolicy,
    segment_bytes: u64,
    max_group_bytes: usize,
    file: File,
    path: PathBuf,
    /// End of the valid data in `file`.
    offset: u64,
    /// Format version of `file`'s header.
    seg_version: u16,
    /// Frames gathered for the next write.
    buf: Vec<u8>,
    /// End LSN of the last request in `buf` (or of the last written one).
    buf_end_lsn: Lsn,
    index_stride: u32,
    /// The LSN index file of the current segment (`None`: not indexed).
    index: Option<IndexAppender>,
    planner: MarkPlanner,
    /// Marks of records in `buf`, appended to the index once `buf` is written.
    pending_marks: Vec<IndexMark>,
    /// When the oldest written but not yet synced data was written (or, under `never`, the
    /// current segment's unsynced header).
    dirty_since: Option<Instant>,
    /// A segment was created (under `never`) since the directory was last synced.
    dir_dirty: bool,
    /// Watermarks of written, not yet synced entries.
    pending: WatermarkTable,
    shared: Arc<Shared>,
    rx: Receiver<Msg>,
}

/// Marks the writer failed if its thread unwinds, so that waiters never hang.
struct PanicGuard(Arc<Shared>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("the writer thread panicked".into());
        }
    }
}

impl WriterThread {
    fn run(&mut self) {
        let _guard = PanicGuard(Arc::clone(&self.shared));
        loop {
            let first = match (self.policy, self.dirty_since) {
                (FsyncPolicy::Interval(d), Some(since)) => match self.rx.recv_deadline(since + d) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        if let Err(e) = self.flush(true) {
                            self.stop(e);
                            return;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                _ => match self.rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            let mut group = vec![first];
            let mut bytes = group_bytes(&group[0]);
            while bytes < self.max_group_bytes {
                match self.rx.try_recv() {
                    Ok(m) => {
                        bytes += group_bytes(&m);
                        group.push(m);
                    }
                    Err(_) => break,
                }
            }
            if let Err(e) = self.process(group) {
                self.stop(e);
                return;
            }
        }
        // Clean shutdown: everything queued was processed.
        if self.policy != FsyncPolicy::Never && self.dirty_since.is_some() {
            if let Err(e) = self.flush(true) {
                self.stop(e);
            }
        }
    }

    /// Fail for good: record the cause and answer every queued sync request.
    fn stop(&mut self, e: PersistError) {
        self.shared.fail(e.to_string());
        while let Ok(m) = self.rx.try_recv() {
            if let Msg::Sync(reply) = m {
                let _ = reply.send(Err(PersistError::WriterFailed {
                    cause: e.to_string(),
                }));
            }
        }
    }

    fn process(&mut self, group: Vec<Msg>) -> Result<()> {
        let mut replies = Vec::new();
        for m in group {
            match m {
                Msg::Append(r) => {
                    let flen = frame_len(r.payload.len()) as u64;
                    let used = self.offset + self.buf.len() as u64;
                    let has_records = used > SEGMENT_HEADER_LEN as u64;
                    let full = used + flen > self.segment_bytes && has_records;
                    // A `DropNamespace` goes only into a version-2 segment (docs/log-format.md
                    // §2.1): a build reading version 1 then refuses the segment by its header.
                    let upgrade = r.needs_v2 && self.seg_version < format::FORMAT_VERSION;
                    if full || upgrade {
                        // A closed segment is always synced, whatever the policy: later syncs
                        // only reach the new file.
                        self.flush(true)?;
                        let version = if r.needs_v2 {
                            format::FORMAT_VERSION
                        } else {
                            format::BASE_FORMAT_VERSION
                        };
                        if has_records {
                            self.roll(version)?;
                        } else {
                            self.rewrite_empty_header(version)?;
                        }
                    }
                    // `buf_end_lsn` is still the end of the previous request: this record's
                    // first LSN.
                    let at = self.offset + self.buf.len() as u64;
                    if let Some(m) = self.planner.observe(at, self.buf_end_lsn) {
                        self.pending_marks.push(m);
                    }
                    format::append_frame(&mut self.buf, &r.payload);
                    self.buf_end_lsn = r.end_lsn;
                    for (ns, w, d, seq, lsn) in r.watermarks {
                        self.pending.set(&ns.key, w, d, seq, lsn);
                    }
                    for seq in r.tagged {
                        self.pending.insert_tagged(seq);
                    }
                }
                Msg::Sync(reply) => replies.push(reply),
            }
        }
        let due = match (self.policy, self.dirty_since) {
            (FsyncPolicy::Interval(d), Some(since)) => since.elapsed() >= d,
            _ => false,
        };
        let sync = self.policy == FsyncPolicy::Always || !replies.is_empty() || due;
        let res = self.flush(sync);
        let answer = || match &res {
            Ok(()) => Ok(lock(&self.shared.progress).synced),
            Err(e) => Err(PersistError::WriterFailed {
                cause: e.to_string(),
            }),
        };
        for r in replies {
            let _ = r.send(answer());
        }
        res
    }

    /// Write the gathered frames (and `fdatasync` when `sync`), then publish progress.
    fn flush(&mut self, sync: bool) -> Result<()> {
        let has_data = !self.buf.is_empty();
        let sync = sync && (has_data || self.dirty_since.is_some() || self.dir_dirty);
        if !has_data && !sync {
            return Ok(());
        }
        let started = Instant::now();
        let written = self
            .io
            .write_at(&self.file, self.offset, &self.buf, sync)
            .map_err(|e| {
                PersistError::io(
                    if sync { "write+fdatasync" } else { "write" },
                    &self.path,
                    Some(self.offset),
                    e,
                )
            })
            .and_then(|()| {
                // A synced segment is durable only once its directory entry is: segments
                // created under `never` are not, until here (docs/log-format.md §4).
                if sync && self.dir_dirty {
                    self.io
                        .sync_dir(&self.dir)
                        .map_err(|e| PersistError::io("fsync directory", &self.dir, None, e))
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            // Cut whatever part of this group reached the file: none of it was acknowledged.
            self.pending_marks.clear();
            if let Err(te) = self.file.set_len(self.offset) {
                tracing::error!(path = %self.path.display(), error = %te, "could not truncate after a failed write");
            }
            return Err(e);
        }
        if sync {
            self.dir_dirty = false;
        }
        if has_data {
            metrics::counter!("kvindex_log_bytes_written_total").increment(self.buf.len() as u64);
            metrics::counter!("kvindex_log_group_commits_total").increment(1);
        }
        if sync {
            metrics::counter!("kvindex_log_fsyncs_total").increment(1);
            metrics::histogram!("kvindex_log_sync_seconds").record(started.elapsed().as_secs_f64());
        }
        self.offset += self.buf.len() as u64;
        self.buf.clear();
        self.write_marks();
        self.shared.set_progress(self.buf_end_lsn, sync);
        if sync {
            self.dirty_since = None;
            // Ordering: watermarks and tagged sequences become visible in `durable` only after
            // the write (and fdatasync) above returned, under the `durable` lock readers take:
            // a JetStream redelivery is never called a duplicate of an entry that could still
            // be lost.
            let moved = std::mem::take(&mut self.pending);
            lock(&self.shared.durable).merge(moved);
        } else if has_data {
            self.dirty_since.get_or_insert_with(Instant::now);
            if self.policy == FsyncPolicy::Never {
                // `never` promises durability only against a process crash, which these
                // written entries already survive.
                let moved = std::mem::take(&mut self.pending);
                lock(&self.shared.durable).merge(moved);
            }
        }
        self.shared.cond.notify_all();
        Ok(())
    }

    /// Append the marks of the records just written to the segment's index.
    fn write_marks(&mut self) {
        if self.pending_marks.is_empty() {
            return;
        }
        let marks = std::mem::take(&mut self.pending_marks);
        if let Some(index) = &mut self.index {
            if let Err(e) = index.append(&marks) {
                index_write_failed(&self.path, &e);
                self.index = None;
                self.planner = MarkPlanner::new(0);
            }
        }
    }

    /// Close the current segment (already flushed) and start one of format `version` at
    /// `buf_end_lsn`.
    fn roll(&mut self, version: u16) -> Result<()> {
        let first = self.buf_end_lsn;
        let (path, file) = create_segment(&mut self.io, &self.dir, first, version, self.policy)?;
        if self.policy == FsyncPolicy::Never {
            // Neither the header nor the directory entry is synced yet: the next sync does both.
            self.dirty_since.get_or_insert_with(Instant::now);
            self.dir_dirty = true;
        }
        self.file = file;
        self.path = path.clone();
        self.offset = SEGMENT_HEADER_LEN as u64;
        self.seg_version = version;
        (self.index, self.planner) = open_index(&path, first, self.index_stride, &[]);
        lock(&self.shared.segments).push((first, path));
        Ok(())
    }
}

impl WriterThread {
    /// Give the current segment, which holds no record yet (so no reader depends on its
    /// version), a header of format `version` (its name and first LSN stay). The 32 bytes lie
    /// in one sector; were the write torn all the same, recovery would meet a damaged header
    /// on a last segment without records: cut by `tolerate-tail`, refused by `absolute`.
    fn rewrite_empty_header(&mut self, version: u16) -> Result<()> {
        let first = self.buf_end_lsn;
        let header = format::encode_segment_header_version(first, version);
        let sync = self.policy != FsyncPolicy::Never;
        self.io
            .write_at(&self.file, 0, &header, sync)
            .map_err(|e| PersistError::io("rewrite header of", &self.path, Some(0), e))?;
        self.seg_version = version;
        Ok(())
    }
}

fn group_bytes(m: &Msg) -> usize {
    match m {
        Msg::Append(r) => r.payload.len() + 8,
        Msg::Sync(_) => 0,
    }
}

/// The tail publication on a model's state, for the loom models (loom-tests/): the production
/// `Shared`, `set_progress` + `notify_all` (as `WriterThread::flush` does them) and
/// `AppendTicket::wait`.
#[cfg(loom)]
impl Shared {
    pub(crate) fn for_loom(next_lsn: Lsn, policy: FsyncPolicy) -> Arc<Shared> {
        Arc::new(Shared {
            progress: Mutex::new(Progress {
                written: next_lsn,
                synced: next_lsn,
                failed: None,
            }),
            cond: Condvar::new(),
            durable: Mutex::new(WatermarkTable::default()),
            segments: Mutex::new(Vec::new()),
            policy,
        })
    }

    /// What `WriterThread::flush` does once its write returned.
    pub(crate) fn loom_publish(&self, end: Lsn, synced: bool) {
        self.set_progress(end, synced);
        self.cond.notify_all();
    }

    /// What `WriterThread::stop` does.
    pub(crate) fn loom_fail(&self, cause: &str) {
        self.fail(cause.to_string());
    }
}

#[cfg(loom)]
impl AppendTicket {
    pub(crate) fn for_loom(shared: &Arc<Shared>, first_lsn: Lsn, end_lsn: Lsn) -> AppendTicket {
        AppendTicket {
            shared: Arc::clone(shared),
            first_lsn,
            end_lsn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvindex_engine::{KvCacheEvent, KvCacheEventData, RouterEvent};

    #[test]
    fn patching_the_first_lsn_of_an_encoded_batch_changes_only_that_field() {
        let spec = Arc::new(NamespaceSpec::new("m", "g", 16));
        let entries: Vec<LogEntry> = (0..3)
            .map(|i| {
                LogEntry::event(
                    spec.clone(),
                    i,
                    RouterEvent::new(
                        i,
                        KvCacheEvent {
                            event_id: i,
                            data: KvCacheEventData::Cleared,
                            dp_rank: 0,
                        },
                    ),
                )
            })
            .collect();
        let mut payload =
            rkyv::to_bytes::<rancor::Error>(&LogBatch::from_entries(0, &entries)).unwrap();
        patch_first_lsn(&mut payload, 0xFEED_F00D);
        let direct =
            rkyv::to_bytes::<rancor::Error>(&LogBatch::from_entries(0xFEED_F00D, &entries))
                .unwrap();
        assert_eq!(payload.as_slice(), direct.as_slice());
    }

    /// A writer handed a tail to resume inside its header, or anywhere but the end of the file,
    /// refuses with a typed error and writes nothing (docs/log-format.md §5): appending there
    /// would overwrite the header or records recovery never read.
    #[test]
    fn a_tail_resumed_inside_its_header_or_before_its_end_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(segment_file_name(5));
        let mut bytes = format::encode_segment_header(5).to_vec();
        format::append_frame(&mut bytes, &[1u8; 40]);
        std::fs::write(&path, &bytes).expect("write the segment");
        let len = bytes.len() as u64;
        for end in [0, 8, SEGMENT_HEADER_LEN as u64, len - 8, len + 8] {
            let start = WriterStart {
                dir: dir.path().to_path_buf(),
                tail: Some((5, path.clone(), end)),
                next_lsn: 6,
                older_segments: Vec::new(),
                watermarks: WatermarkTable::default(),
                tail_marks: Vec::new(),
            };
            let cfg = LogConfig {
                io: crate::io::IoBackendChoice::Portable,
                ..LogConfig::default()
            };
            match LogWriter::start(start, &cfg) {
                Err(PersistError::UnsafeTail {
                    offset, file_len, ..
                }) => assert_eq!((offset, file_len), (end, len)),
                Err(e) => panic!("end {end}: {e}"),
                Ok(_) => panic!("end {end}: the writer resumed the segment there"),
            }
            assert_eq!(std::fs::read(&path).expect("read"), bytes, "end {end}");
        }
    }

    #[test]
    fn a_batch_gives_its_distinct_tagged_sequences_once_each() {
        let spec = Arc::new(NamespaceSpec::new("m", "g", 16));
        let tag = crate::seq_set::SOURCE_SEQ_TAG;
        let entries: Vec<LogEntry> = [tag | 9, 4, tag | 2, tag | 9, tag | 2, 4]
            .into_iter()
            .map(|seq| {
                LogEntry::event(
                    spec.clone(),
                    seq,
                    RouterEvent::new(
                        1,
                        KvCacheEvent {
                            event_id: 0,
                            data: KvCacheEventData::Cleared,
                            dp_rank: 0,
                        },
                    ),
                )
            })
            .collect();
        assert_eq!(tagged_seqs(&entries), vec![tag | 2, tag | 9]);
    }
}
