//! Crash recovery (docs/log-format.md §5): newest valid snapshot, then the log from its
//! position, in LSN order, into a [`ReplaySink`]; damage handled by the [`RecoveryPolicy`].

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvindex_engine::NamespaceKey;

use crate::config::{LogConfig, RecoveryPolicy, RecoveryProgress};
use crate::entry::{LogEntry, LoggedEntry, Lsn, NamespaceSpec, FIRST_LSN};
use crate::error::{Damage, PersistError, Result, CORRUPT_ADVICE};
use crate::format::{self, SEGMENT_HEADER_LEN};
use crate::lsn_index::{self, IndexMark, MarkPlanner};
use crate::record::{ArchivedEntryRecord, ArchivedNamespaceRecord};
use crate::scan::{self, ScanStep, SegmentScan};
use crate::segment::{list_dir, segment_file_name, SegmentReader};
use crate::snapshot::{LoadedSnapshot, SnapshotFailure, SnapshotMeta, SnapshotStore};
use crate::writer::{WatermarkTable, WriterStart};

/// One entry as recovery hands it over: borrowed from the mapped segment.
#[derive(Clone, Copy)]
pub struct EntryView<'a> {
    pub namespace: &'a ArchivedNamespaceRecord,
    pub record: &'a ArchivedEntryRecord,
}

impl EntryView<'_> {
    /// The entry's namespace.
    pub fn namespace_spec(&self) -> NamespaceSpec {
        self.namespace.to_spec()
    }

    /// The entry's namespace key (without the block size).
    pub fn namespace_key(&self) -> NamespaceKey {
        NamespaceKey::new(
            self.namespace.model_name.as_str(),
            self.namespace.routing_group.as_str(),
        )
    }

    pub fn worker_id(&self) -> u64 {
        self.record.worker_id.to_native()
    }

    pub fn dp_rank(&self) -> u32 {
        self.record.dp_rank.to_native()
    }

    pub fn source_seq(&self) -> u64 {
        self.record.source_seq.to_native()
    }

    /// An owned copy of the entry.
    pub fn to_entry(&self) -> LogEntry {
        LogEntry {
            namespace: std::sync::Arc::new(self.namespace_spec()),
            worker_id: self.worker_id(),
            dp_rank: self.dp_rank(),
            source_seq: self.source_seq(),
            op: self.record.op.to_op(self.worker_id(), self.dp_rank()),
        }
    }
}

/// Where recovery delivers state: the snapshot first (if any), then every entry after it.
pub trait ReplaySink {
    /// Called at most once, before any entry, with the validated snapshot recovery starts from.
    fn restore_snapshot(&mut self, snapshot: &LoadedSnapshot) -> Result<()>;
    /// Called for every recovered entry with LSN at or after the snapshot's `next_lsn`, in LSN
    /// order. An error aborts recovery.
    fn apply(&mut self, lsn: Lsn, entry: EntryView<'_>) -> Result<()>;
}

/// A sink that keeps everything (tests, tools, small logs).
#[derive(Debug, Default)]
pub struct CollectingSink {
    /// The snapshot recovery started from: `(path, next_lsn)`.
    pub snapshot: Option<(PathBuf, Lsn)>,
    pub entries: Vec<LoggedEntry>,
}

impl ReplaySink for CollectingSink {
    fn restore_snapshot(&mut self, snapshot: &LoadedSnapshot) -> Result<()> {
        self.snapshot = Some((snapshot.path().to_path_buf(), snapshot.next_lsn()));
        Ok(())
    }

    fn apply(&mut self, lsn: Lsn, entry: EntryView<'_>) -> Result<()> {
        self.entries.push(LoggedEntry {
            lsn,
            entry: entry.to_entry(),
        });
        Ok(())
    }
}

/// A sink that ignores everything (used to open a log just to append).
#[derive(Debug, Default)]
pub struct NullSink;

impl ReplaySink for NullSink {
    fn restore_snapshot(&mut self, _: &LoadedSnapshot) -> Result<()> {
        Ok(())
    }
    fn apply(&mut self, _: Lsn, _: EntryView<'_>) -> Result<()> {
        Ok(())
    }
}

/// Bytes cut off the end of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailCut {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub damage: Damage,
    /// Where the cut bytes were saved: for any damage other than a torn write with nothing
    /// after it, so always when valid records were cut (a torn group commit).
    pub saved_to: Option<PathBuf>,
    /// Whether the whole file was removed (its header was incomplete or damaged).
    pub file_removed: bool,
}

/// A damaged region recovery stepped over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRegion {
    pub path: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub damage: Damage,
    /// True when every LSN in it was already covered by the snapshot (no loss, policy not
    /// consulted).
    pub covered_by_snapshot: bool,
}

/// What recovery found and did; logged, exported as metrics, returned to the caller.
#[derive(Debug, Clone)]
pub struct RecoveryReport {
    pub policy: RecoveryPolicy,
    /// The snapshot recovery started from.
    pub snapshot: Option<SnapshotMeta>,
    /// Newer snapshots that failed validation.
    pub snapshots_rejected: Vec<SnapshotFailure>,
    pub segments_scanned: usize,
    pub records_replayed: u64,
    pub entries_replayed: u64,
    pub bytes_scanned: u64,
    pub truncated: Vec<TailCut>,
    pub skipped: Vec<SkippedRegion>,
    /// LSN ranges known to be lost (inclusive).
    pub lost_lsns: Vec<(Lsn, Lsn)>,
    /// The LSN the next append gets.
    pub next_lsn: Lsn,
    /// Whether files were left untouched (read-only tools).
    pub read_only: bool,
    /// LSN index files rewritten because they were missing, stale or corrupt (docs/log-format.md
    /// §2.4); only in read-write recovery.
    pub lsn_indexes_rebuilt: usize,
    pub elapsed: Duration,
}

impl RecoveryReport {
    fn new(policy: RecoveryPolicy, read_only: bool) -> Self {
        Self {
            policy,
            snapshot: None,
            snapshots_rejected: Vec::new(),
            segments_scanned: 0,
            records_replayed: 0,
            entries_replayed: 0,
            bytes_scanned: 0,
            truncated: Vec::new(),
            skipped: Vec::new(),
            lost_lsns: Vec::new(),
            next_lsn: FIRST_LSN,
            read_only,
            lsn_indexes_rebuilt: 0,
            elapsed: Duration::ZERO,
        }
    }

    /// Number of LSNs known lost.
    pub fn lost_lsn_count(&self) -> u64 {
        self.lost_lsns.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Whether anything was skipped (not merely cut off a tail, nor covered by the snapshot).
    pub fn skipped_anything(&self) -> bool {
        self.skipped.iter().any(|s| !s.covered_by_snapshot) || !self.lost_lsns.is_empty()
    }

    /// True when nothing was cut, skipped, lost or rejected.
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty()
            && self.skipped.is_empty()
            && self.lost_lsns.is_empty()
            && self.snapshots_rejected.is_empty()
    }
}

/// Whether recovery may change files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    ReadWrite,
    ReadOnly,
}

pub(crate) struct Recovered {
    pub report: RecoveryReport,
    pub start: WriterStart,
}

struct Progress<'a> {
    cfg: &'a LogConfig,
    total: u64,
    done_before: u64,
    last: Instant,
    started: Instant,
}

impl Progress<'_> {
    fn tick(&mut self, in_segment: u64, entries: u64, force: bool) {
        if !force && self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last = Instant::now();
        let scanned = self.done_before + in_segment;
        let ratio = if self.total == 0 {
            1.0
        } else {
            scanned as f64 / self.total as f64
        };
        metrics::gauge!("kvindex_recovery_progress_ratio").set(ratio);
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        tracing::info!(
            scanned_mib = scanned >> 20,
            total_mib = self.total >> 20,
            entries,
            entries_per_sec = (entries as f64 / secs) as u64,
            "recovering the event log"
        );
        if let Some(cb) = &self.cfg.progress {
            cb(RecoveryProgress {
                bytes_scanned: scanned,
                bytes_total: self.total,
                entries_replayed: entries,
            });
        }
    }
}

/// Recover `dir`: replay into `sink`, fix the tail (ReadWrite), and say where the writer starts.
/// With `upto`, only entries with LSN `<= upto` are replayed and only snapshots covering no more.
pub(crate) fn recover(
    dir: &Path,
    cfg: &LogConfig,
    mode: Mode,
    upto: Option<Lsn>,
    sink: &mut dyn ReplaySink,
) -> Result<Recovered> {
    let started = Instant::now();
    let policy = cfg.recovery;
    let mut report = RecoveryReport::new(policy, mode == Mode::ReadOnly);
    let listing = list_dir(dir)?;
    if mode == Mode::ReadWrite {
        for t in &listing.temps {
            tracing::info!(path = %t.display(), "removing an interrupted snapshot write");
            std::fs::remove_file(t).map_err(|e| PersistError::io("delete", t, None, e))?;
        }
    }

    // 1. Snapshot.
    let store = SnapshotStore::new(dir);
    let (snap, rejected) = store.load_newest_valid(upto.map(|u| u.saturating_add(1)))?;
    report.snapshots_rejected = rejected;
    let mut watermarks = WatermarkTable::default();
    let start_lsn = match &snap {
        Some(s) => {
            sink.restore_snapshot(s)?;
            watermarks.insert_all(&s.image()?.watermarks());
            watermarks.union_tagged(s.tagged_seqs());
            report.snapshot = Some(SnapshotMeta {
                path: s.path().to_path_buf(),
                next_lsn: s.next_lsn(),
            });
            s.next_lsn()
        }
        None => FIRST_LSN,
    };
    drop(snap);

    // 2. Segments to scan: from the last one starting at or before `start_lsn`.
    let segs = listing.segments;
    if policy != RecoveryPolicy::SkipCorrupt {
        refuse_unreadable_snapshot_over_compacted_log(&report, &segs, start_lsn)?;
    }
    let first_idx = segs.iter().rposition(|(l, _)| *l <= start_lsn).unwrap_or(0);
    let mut progress = Progress {
        cfg,
        total: segs[first_idx.min(segs.len())..]
            .iter()
            .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum(),
        done_before: 0,
        last: Instant::now(),
        started,
    };

    let mut expected: Option<Lsn> = None;
    // Survivors, oldest first. Those before `first_idx` (wholly below the snapshot) and after
    // `upto` are not read.
    let mut kept: Vec<KeptSegment> = segs[..first_idx]
        .iter()
        .map(|(l, p)| KeptSegment::unscanned(*l, p))
        .collect();
    // LSN index marks of each scanned segment that survives: `(first_lsn, path, marks)`.
    let mut scanned_marks: Vec<(Lsn, PathBuf, Vec<IndexMark>)> = Vec::new();
    let mut done = false;
    let mut last_key: Option<NamespaceKey> = None;
    // Tails to cut (at most one: only the last segment has a tail), applied after the scan.
    let mut cuts: Vec<PendingCut> = Vec::new();

    for i in first_idx..segs.len() {
        if done {
            kept.push(KeptSegment::unscanned(segs[i].0, &segs[i].1));
            continue;
        }
        let (name_lsn, path) = (&segs[i].0, &segs[i].1);
        let is_last = i + 1 == segs.len();
        let next_seg_lsn = segs.get(i + 1).map(|(l, _)| *l);
        report.segments_scanned += 1;
        // The process holding the LOCK maps its segments (no writer runs yet); a read-only
        // reader takes no lock and reads them into memory, since a live server may cut or
        // delete them meanwhile (a deleted one is `CompactedAway`).
        let reader = match mode {
            Mode::ReadWrite => SegmentReader::map(path)?,
            Mode::ReadOnly => SegmentReader::open(path)?,
        };
        let bytes = reader.bytes();
        let header_damage = match reader.first_lsn() {
            Ok(l) if l == *name_lsn => None,
            Ok(l) => Some(Damage::BadHeader(format!(
                "header says first LSN {l}, file name says {name_lsn}"
            ))),
            // A file cut inside its header (or zero-filled) is a torn creation.
            Err(_) if bytes.len() < SEGMENT_HEADER_LEN => Some(Damage::IncompleteFrame {
                needed: SEGMENT_HEADER_LEN as u64,
                available: bytes.len() as u64,
            }),
            Err(_) if bytes.iter().all(|&b| b == 0) => Some(Damage::ZeroFilledTail),
            Err(d) => Some(d),
        };
        let mut scan = SegmentScan::new(bytes, header_damage);
        let mut first_record = true;
        let mut planner = MarkPlanner::new(cfg.lsn_index_stride);
        let mut marks = Vec::new();
        let mut has_records = false;
        // Damage was skipped in this segment (skip-corrupt): the writer never appends to it.
        let mut skipped_here = false;
        // (offset, damage, remove the file, save the cut bytes)
        let mut cut: Option<(u64, Damage, bool, bool)> = None;

        while let Some(step) = scan.next_step() {
            let rec = match step {
                ScanStep::Record(rec) => rec,
                ScanStep::Damaged { at, damage, resume } => {
                    let next_known = resume
                        .and_then(|o| format::read_record(bytes, o).ok().flatten())
                        .map(|r| r.batch.first_lsn.to_native())
                        .or(next_seg_lsn);
                    // Nothing valid follows the damage in the last segment.
                    let is_tail = resume.is_none() && is_last;
                    let region_end = resume.unwrap_or(bytes.len());
                    if !is_tail && next_known.is_some_and(|l| l <= start_lsn) {
                        // Everything in here is older than the snapshot: harmless.
                        tracing::info!(path = %path.display(), offset = at, %damage, "damage in a region covered by the snapshot; ignored");
                        report.skipped.push(SkippedRegion {
                            path: path.clone(),
                            offset: at as u64,
                            bytes: (region_end - at) as u64,
                            damage,
                            covered_by_snapshot: true,
                        });
                    } else if is_tail {
                        if damage.is_torn_write() || policy != RecoveryPolicy::Absolute {
                            // A torn write holds nothing worth keeping; other damage is saved.
                            let save = !damage.is_torn_write();
                            cut = Some((at as u64, damage, at < SEGMENT_HEADER_LEN, save));
                            break;
                        }
                        return Err(corrupt(path, at, damage, policy));
                    } else if policy != RecoveryPolicy::Absolute
                        && is_last
                        && resume.is_some_and(|r| {
                            scan::torn_group_tail(bytes, at, r, cfg.max_group_bytes)
                        })
                    {
                        // A torn group commit (an unwritten, zero-filled page in the damage,
                        // valid records after it within one group): its valid records after the
                        // hole were never acknowledged and follow a gap, so they go too (saved
                        // with the rest). `absolute` refuses it as damage inside the log (below);
                        // a bit flip (no zero page) is damage inside the log for every policy.
                        cut = Some((at as u64, damage, false, true));
                        break;
                    } else if policy == RecoveryPolicy::SkipCorrupt {
                        tracing::warn!(path = %path.display(), offset = at, bytes = region_end - at, %damage, "skipping a damaged region of the log");
                        metrics::counter!("kvindex_recovery_skipped_bytes_total")
                            .increment((region_end - at) as u64);
                        metrics::counter!("kvindex_recovery_skipped_regions_total", "reason" => damage.label())
                        .increment(1);
                        report.skipped.push(SkippedRegion {
                            path: path.clone(),
                            offset: at as u64,
                            bytes: (region_end - at) as u64,
                            damage,
                            covered_by_snapshot: false,
                        });
                        skipped_here = true;
                    } else {
                        return Err(corrupt(path, at, damage, policy));
                    }
                    continue;
                }
            };
            let first = rec.batch.first_lsn.to_native();
            let n = format::batch_len(rec.batch);
            if first_record {
                first_record = false;
                if let Ok(h) = reader.first_lsn() {
                    if h != first && rec.offset == SEGMENT_HEADER_LEN {
                        scan.reject(
                            rec.offset,
                            Damage::LsnMismatch {
                                expected: h,
                                found: first,
                            },
                        );
                        continue;
                    }
                }
            }
            let exp = expected.unwrap_or(start_lsn.min(first));
            if first < exp {
                scan.reject(
                    rec.offset,
                    Damage::LsnMismatch {
                        expected: exp,
                        found: first,
                    },
                );
                continue;
            }
            if first > exp {
                // LSNs exp..first are not in the log. Below the snapshot's position they do
                // not matter.
                let lost_from = exp.max(start_lsn);
                if first > lost_from {
                    let range = (lost_from, first - 1);
                    if policy != RecoveryPolicy::SkipCorrupt {
                        return Err(missing(range, path, policy));
                    }
                    tracing::warn!(first = range.0, last = range.1, before = %path.display(), "LSNs missing from the log; skipped");
                    metrics::counter!("kvindex_recovery_lost_lsns_total")
                        .increment(range.1 - range.0 + 1);
                    report.lost_lsns.push(range);
                }
            }
            // Deliver.
            if first + n > start_lsn {
                for (k, e) in rec.batch.entries.iter().enumerate() {
                    let lsn = first + k as u64;
                    if lsn < start_lsn {
                        continue;
                    }
                    if upto.is_some_and(|u| lsn > u) {
                        done = true;
                        break;
                    }
                    // Index checked by `access_batch`.
                    let Some(ns) = rec.batch.namespaces.get(e.namespace.to_native() as usize)
                    else {
                        continue;
                    };
                    let view = EntryView {
                        namespace: ns,
                        record: e,
                    };
                    if e.op.is_event() {
                        // Consecutive entries nearly always share a namespace: build its key
                        // only when it changes.
                        let same = last_key.as_ref().is_some_and(|k: &NamespaceKey| {
                            k.model_name == ns.model_name.as_str()
                                && k.routing_group == ns.routing_group.as_str()
                        });
                        if !same {
                            last_key = Some(view.namespace_key());
                        }
                        watermarks.insert_tagged(view.source_seq());
                        if let Some(key) = &last_key {
                            watermarks.set(
                                key,
                                view.worker_id(),
                                view.dp_rank(),
                                view.source_seq(),
                                lsn,
                            );
                        }
                    }
                    sink.apply(lsn, view)?;
                    report.entries_replayed += 1;
                }
                report.records_replayed += 1;
            }
            expected = Some(first + n);
            has_records = true;
            if let Some(m) = planner.observe(rec.offset as u64, first) {
                marks.push(m);
            }
            if done {
                break;
            }
            progress.tick(rec.end as u64, report.entries_replayed, false);
        }

        let file_len = bytes.len() as u64;
        progress.done_before += file_len;
        report.bytes_scanned += file_len;
        drop(reader);

        match cut {
            Some((offset, damage, remove, save)) => {
                // Cut once the whole log was read: a refusal below changes nothing on disk.
                cuts.push(PendingCut {
                    path: path.clone(),
                    offset,
                    bytes: file_len - offset,
                    damage,
                    remove,
                    save,
                });
                if !remove {
                    kept.push(KeptSegment {
                        first: *name_lsn,
                        path: path.clone(),
                        end: offset,
                        has_records,
                        scanned: true,
                        damaged: skipped_here,
                    });
                    scanned_marks.push((*name_lsn, path.clone(), marks));
                }
            }
            None => {
                kept.push(KeptSegment {
                    first: *name_lsn,
                    path: path.clone(),
                    end: file_len,
                    has_records,
                    scanned: true,
                    damaged: skipped_here,
                });
                scanned_marks.push((*name_lsn, path.clone(), marks));
            }
        }
    }
    let log_end = expected.unwrap_or(start_lsn);
    let mut next_lsn = log_end.max(start_lsn);
    if upto.is_none() {
        // Segment i holds LSNs [name_i, name_{i+1}) (docs/log-format.md §1): the writer names a
        // segment for the LSN after everything before it, so the newest segment's name, even
        // one holding no record (or just removed as a torn creation), says every LSN below it
        // was written. When the records end before it (damage at the end of an earlier segment,
        // skipped by skip-corrupt; or a segment missing), those LSNs are lost, and the next one
        // must not be given again: a segment named below an existing one breaks the rule that
        // compaction and recovery's choice of the first segment to read rely on.
        if let Some((named, named_path)) = segs.last() {
            if *named > next_lsn {
                let range = (next_lsn, *named - 1);
                if policy != RecoveryPolicy::SkipCorrupt {
                    return Err(missing(range, named_path, policy));
                }
                tracing::warn!(first = range.0, last = range.1, before = %named_path.display(), "LSNs missing from the end of the log; skipped");
                metrics::counter!("kvindex_recovery_lost_lsns_total")
                    .increment(range.1 - range.0 + 1);
                report.lost_lsns.push(range);
                next_lsn = *named;
            }
        }
    }
    report.next_lsn = next_lsn;

    // Nothing was refused: cut the damaged tail and bring the LSN indexes up to date.
    for c in cuts {
        apply_cut(c, mode, &mut report)?;
    }
    if mode == Mode::ReadWrite {
        report.lsn_indexes_rebuilt =
            rebuild_indexes(&scanned_marks, cfg.lsn_index_stride, &listing.indexes);
    }
    progress.tick(0, report.entries_replayed, true);
    metrics::counter!("kvindex_recovery_replayed_entries_total").increment(report.entries_replayed);

    // 3. Where the writer starts.
    let mut tail = None;
    let mut tail_marks = Vec::new();
    if let Some(KeptSegment {
        first,
        path,
        end,
        has_records,
        scanned,
        damaged,
    }) = kept.last().cloned()
    {
        // Only a segment this recovery read, whose valid end it knows, can be resumed: one
        // below the snapshot was not read (its `end` means nothing), and the writer would
        // overwrite it from there. Its records must also end exactly at `next_lsn`.
        let appendable = scanned
            && !damaged
            && upto.is_none()
            && if has_records {
                log_end == next_lsn
            } else {
                first == next_lsn
            };
        if appendable {
            kept.pop();
            tail_marks = scanned_marks
                .iter()
                .find(|(_, p, _)| *p == path)
                .map(|(_, _, m)| m.clone())
                .unwrap_or_default();
            tail = Some((first, path, end));
        } else if scanned && first == next_lsn && end <= SEGMENT_HEADER_LEN as u64 {
            // An empty segment already named for the next LSN: reuse it.
            kept.pop();
            tail = Some((first, path, SEGMENT_HEADER_LEN as u64));
        } else if first == next_lsn {
            return Err(PersistError::Unavailable(format!(
                "cannot start a new segment {}: a damaged file with that name exists; move it \
                 aside and restart",
                dir.join(segment_file_name(next_lsn)).display()
            )));
        }
    }
    if log_end < start_lsn && expected.is_some() {
        tracing::info!(
            log_end,
            snapshot_next = start_lsn,
            "the log ends before the snapshot's position; new segment starts after the snapshot"
        );
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        snapshot = ?report.snapshot.as_ref().map(|s| s.path.display().to_string()),
        entries = report.entries_replayed,
        next_lsn,
        truncated = report.truncated.len(),
        skipped = report.skipped.len(),
        lost_lsns = report.lost_lsn_count(),
        elapsed_ms = report.elapsed.as_millis() as u64,
        "recovery finished"
    );
    Ok(Recovered {
        report,
        start: WriterStart {
            dir: dir.to_path_buf(),
            tail,
            next_lsn,
            older_segments: kept.into_iter().map(|k| (k.first, k.path)).collect(),
            watermarks,
            tail_marks,
        },
    })
}

/// A damaged tail recovery cuts once it has read the whole log.
struct PendingCut {
    path: PathBuf,
    offset: u64,
    bytes: u64,
    damage: Damage,
    /// Remove the whole file (its header is incomplete or damaged).
    remove: bool,
    /// Save the cut bytes to `<path>.cut-<offset>` first.
    save: bool,
}

/// Cut a damaged tail (files change only in read-write mode), logged, counted and reported.
fn apply_cut(c: PendingCut, mode: Mode, report: &mut RecoveryReport) -> Result<()> {
    let PendingCut {
        path,
        offset,
        bytes,
        damage,
        remove,
        save,
    } = c;
    let mut saved_to = None;
    if mode == Mode::ReadWrite {
        if save {
            let saved = save_cut(&path, offset)?;
            // The saved copy's name is durable before the bytes are cut from the segment.
            let dir = saved
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            crate::snapshot::sync_dir(dir)?;
            saved_to = Some(saved);
        }
        if remove {
            std::fs::remove_file(&path).map_err(|e| PersistError::io("delete", &path, None, e))?;
            remove_index(&path);
        } else {
            truncate(&path, offset)?;
        }
    }
    tracing::warn!(path = %path.display(), offset, bytes, %damage, removed = remove, saved_to = ?saved_to, "cut a damaged log tail");
    metrics::counter!("kvindex_recovery_truncated_bytes_total").increment(bytes);
    metrics::counter!("kvindex_recovery_skipped_regions_total", "reason" => damage.label())
        .increment(1);
    report.truncated.push(TailCut {
        path,
        offset,
        bytes,
        damage,
        saved_to,
        file_removed: remove,
    });
    Ok(())
}

/// A segment that survives recovery.
#[derive(Clone)]
struct KeptSegment {
    /// The LSN in its name.
    first: Lsn,
    path: PathBuf,
    /// End of its valid data (only known when `scanned`).
    end: u64,
    /// It holds at least one valid record (assumed for a segment not read).
    has_records: bool,
    /// Recovery read it: only such a segment may become the writer's tail.
    scanned: bool,
    /// Recovery skipped damage inside it.
    damaged: bool,
}

impl KeptSegment {
    /// A segment recovery did not read (wholly below the snapshot, or after `upto`).
    fn unscanned(first: Lsn, path: &Path) -> Self {
        Self {
            first,
            path: path.to_path_buf(),
            end: 0,
            has_records: true,
            scanned: false,
            damaged: false,
        }
    }
}

/// A snapshot of an older format (docs/log-format.md §3, "Versions") was rejected, so recovery
/// falls back to an older snapshot or the log's start; when the log was compacted past that
/// point, refuse with [`PersistError::SnapshotFormatTooOld`] rather than the generic
/// `MissingRecords` (nothing is damaged or missing by accident; the advice differs).
fn refuse_unreadable_snapshot_over_compacted_log(
    report: &RecoveryReport,
    segs: &[(Lsn, PathBuf)],
    start_lsn: Lsn,
) -> Result<()> {
    let Some(&(log_starts_at, _)) = segs.first() else {
        return Ok(());
    };
    if log_starts_at <= start_lsn {
        return Ok(());
    }
    let old = report
        .snapshots_rejected
        .iter()
        .find_map(|f| older_snapshot_format(&f.path).map(|v| (f.path.clone(), v)));
    match old {
        Some((snapshot, version)) => Err(PersistError::SnapshotFormatTooOld {
            snapshot,
            version,
            replay_from: start_lsn,
            log_starts_at,
        }),
        None => Ok(()),
    }
}

/// The format version of snapshot `path` when its header is otherwise intact (magic, header
/// CRC) and the version is older than this build reads; `None` otherwise.
fn older_snapshot_format(path: &Path) -> Option<u16> {
    use std::io::Read;
    let mut h = [0u8; 64];
    std::fs::File::open(path).ok()?.read_exact(&mut h).ok()?;
    let crc = u32::from_le_bytes([h[60], h[61], h[62], h[63]]);
    if h[0..8] != format::SNAPSHOT_MAGIC || crc32c::crc32c(&h[0..60]) != crc {
        return None;
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    (version < format::MIN_SNAPSHOT_FORMAT_VERSION).then_some(version)
}

/// Make the LSN index of every scanned segment match its records (docs/log-format.md §2.4) and
/// delete index files whose segment is gone; returns how many were rewritten. Failures only
/// cost readers a scan: logged and counted, never fatal.
fn rebuild_indexes(
    scanned: &[(Lsn, PathBuf, Vec<IndexMark>)],
    stride: u32,
    indexes: &[(Lsn, PathBuf)],
) -> usize {
    let mut rebuilt = 0;
    if stride > 0 {
        for (first, path, marks) in scanned {
            match lsn_index::ensure(path, *first, stride, marks) {
                Ok((_, true)) => {
                    tracing::info!(segment = %path.display(), marks = marks.len(), "rebuilt the segment's LSN index");
                    metrics::counter!("kvindex_lsn_index_rebuilt_total").increment(1);
                    rebuilt += 1;
                }
                Ok((_, false)) => {}
                Err(e) => {
                    tracing::warn!(segment = %path.display(), error = %e, "cannot write the segment's LSN index; readers will scan it");
                    metrics::counter!("kvindex_lsn_index_write_failures_total").increment(1);
                }
            }
        }
    }
    for (lsn, idx) in indexes {
        let seg = idx.with_file_name(segment_file_name(*lsn));
        if !seg.exists() {
            tracing::info!(path = %idx.display(), "removing the LSN index of a deleted segment");
            remove_index(&seg);
        }
    }
    rebuilt
}

/// Delete the LSN index of `segment` (if any); a failure is logged, the file is harmless.
pub(crate) fn remove_index(segment: &Path) {
    let idx = lsn_index::index_path(segment);
    match std::fs::remove_file(&idx) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %idx.display(), error = %e, "cannot delete an LSN index"),
    }
}

fn corrupt(path: &Path, at: usize, damage: Damage, policy: RecoveryPolicy) -> PersistError {
    PersistError::Corrupt {
        path: path.to_path_buf(),
        offset: at as u64,
        damage,
        policy: policy.as_str(),
        advice: CORRUPT_ADVICE,
    }
}

fn missing(range: (Lsn, Lsn), path: &Path, policy: RecoveryPolicy) -> PersistError {
    PersistError::MissingRecords {
        first: range.0,
        last: range.1,
        next_file: path.display().to_string(),
        policy: policy.as_str(),
        advice: "a segment file is missing or was cut short (or every snapshot covering the \
                 compacted log is gone). Restore it from a backup, or restart with \
                 `--recovery skip-corrupt` to accept the loss",
    }
}

fn truncate(path: &Path, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| PersistError::io("open", path, None, e))?;
    f.set_len(len)
        .map_err(|e| PersistError::io("truncate", path, Some(len), e))?;
    f.sync_all()
        .map_err(|e| PersistError::io("fsync", path, None, e))
}

/// How many `.cut-<offset>` names [`save_cut`] tries (`.cut-<offset>`, then `.cut-<offset>.1`,
/// ...) before giving up.
const CUT_NAME_ATTEMPTS: u32 = 1000;

/// Copy the bytes from `offset` to the end into a new file `<path>.cut-<offset>`, or
/// `<path>.cut-<offset>.<n>` when an earlier cut at the same offset already saved its bytes
/// there: evidence is never overwritten.
fn save_cut(path: &Path, offset: u64) -> Result<PathBuf> {
    let data = std::fs::read(path).map_err(|e| PersistError::io("read", path, None, e))?;
    let (out, mut f) = create_cut_file(path, offset)?;
    f.write_all(data.get(offset as usize..).unwrap_or(&[]))
        .and_then(|_| f.sync_all())
        .map_err(|e| PersistError::io("write", &out, None, e))?;
    Ok(out)
}

/// Create (never open an existing) file for the bytes cut from `path` at `offset`.
fn create_cut_file(path: &Path, offset: u64) -> Result<(PathBuf, std::fs::File)> {
    let mut last_err = None;
    for n in 0..CUT_NAME_ATTEMPTS {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".cut-{offset}"));
        if n > 0 {
            name.push(format!(".{n}"));
        }
        let out = PathBuf::from(name);
        match OpenOptions::new().write(true).create_new(true).open(&out) {
            Ok(f) => return Ok((out, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last_err = Some((out, e)),
            Err(e) => return Err(PersistError::io("create", &out, None, e)),
        }
    }
    let (out, e) = last_err.unwrap_or_else(|| {
        (
            path.to_path_buf(),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        )
    });
    Err(PersistError::io("create", out, None, e))
}
