//! The logic of `kvindex replay` (the server crate wires the command line): look inside a data
//! directory, export its events as Dynamo RouterEvent JSON lines, import such lines into a new
//! log, rebuild the index as of any LSN, and diff two points in time.
//!
//! Every function here is read-only on the data directory (except `import`, which writes the
//! target), takes no lock, and may run against the directory of a live server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvindex_engine::codec::{decode_router_event_json, encode_router_event_json};
use kvindex_engine::{Engine, EngineConfig, NamespaceKey, RouterEvent, WorkerId, WorkerWithDpRank};

use crate::config::{FsyncPolicy, LogConfig, RecoveryPolicy};
use crate::durable::EngineSink;
use crate::entry::{LogEntry, LogOp, LoggedEntry, Lsn, NamespaceSpec, StreamKey, FIRST_LSN};
use crate::error::{Damage, PersistError, Result, CORRUPT_ADVICE};
use crate::format::{self, SEGMENT_HEADER_LEN};
use crate::log::{read_log, EventLog};
use crate::lsn_index::{self, SeekVia};
use crate::recovery::{NullSink, RecoveryReport};
use crate::scan::{torn_group_tail, ScanStep, SegmentScan};
use crate::segment::{list_dir, SegmentReader};
use crate::seq_set::split_tagged;
use crate::snapshot::LoadedSnapshot;

// ---------------------------------------------------------------------------------------------
// inspect

/// What `inspect` found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// From the header (`None` if the header is damaged).
    pub first_lsn: Option<Lsn>,
    pub records: u64,
    pub entries: u64,
    /// First and last LSN of the valid records.
    pub lsn_range: Option<(Lsn, Lsn)>,
}

/// What `inspect` found in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub path: PathBuf,
    pub bytes: u64,
    /// From the file name.
    pub next_lsn: Lsn,
    /// Per namespace: `(namespace, streams, nodes, (block, stream) pairs)`, or why the file is
    /// invalid.
    pub content: std::result::Result<Vec<(NamespaceSpec, usize, usize, usize)>, String>,
}

/// Per-stream summary of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub stream: StreamKey,
    /// Entries (events and control operations) of this stream.
    pub entries: u64,
    pub first_lsn: Lsn,
    pub last_lsn: Lsn,
    /// Source sequence of the first and last event entries.
    pub first_source_seq: Option<u64>,
    pub last_source_seq: Option<u64>,
}

/// Damage or a gap found by `inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A damaged region: what recovery would cut (tail) or refuse / skip (inside the log).
    Damaged {
        path: PathBuf,
        offset: u64,
        /// The region's length; for a tail, everything recovery would cut (to the file's end).
        bytes: u64,
        damage: Damage,
        /// Whether it is a tail (docs/log-format.md §5): nothing valid after it in the last
        /// segment, or a torn group commit (a zero-filled page in the damage, then at most one
        /// group's worth of records). A bit flip followed by valid records never is.
        at_tail: bool,
    },
    /// LSNs missing between two records (a deleted or cut segment, or skipped damage).
    MissingLsns {
        first: Lsn,
        last: Lsn,
        before: PathBuf,
    },
}

/// Everything `kvindex replay inspect` shows.
#[derive(Debug, Clone)]
pub struct InspectReport {
    pub dir: PathBuf,
    pub segments: Vec<SegmentInfo>,
    pub snapshots: Vec<SnapshotInfo>,
    pub streams: Vec<StreamInfo>,
    pub findings: Vec<Finding>,
    /// Files listed but deleted before they could be read: a live server compacted (segments)
    /// or pruned (snapshots) them meanwhile. Not damage; left out of the report.
    pub compacted_away: Vec<PathBuf>,
    /// First and last LSN found in the log.
    pub lsn_range: Option<(Lsn, Lsn)>,
    pub total_entries: u64,
}

impl InspectReport {
    /// Whether no damage and no gap was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.snapshots.iter().all(|s| s.content.is_ok())
    }
}

/// Look at every segment and snapshot of `dir` without changing anything: sizes, LSN ranges,
/// streams, and every damaged region or gap (the scan resumes after damage to find them all).
pub fn inspect(dir: impl AsRef<Path>) -> Result<InspectReport> {
    let dir = dir.as_ref();
    let listing = list_dir(dir)?;
    let mut report = InspectReport {
        dir: dir.to_path_buf(),
        segments: Vec::new(),
        snapshots: Vec::new(),
        streams: Vec::new(),
        findings: Vec::new(),
        compacted_away: Vec::new(),
        lsn_range: None,
        total_entries: 0,
    };
    let mut streams: BTreeMap<StreamKey, StreamInfo> = BTreeMap::new();
    let mut expected: Option<Lsn> = None;
    let n_segs = listing.segments.len();
    for (i, (_, path)) in listing.segments.iter().enumerate() {
        let reader = match SegmentReader::open(path) {
            Ok(r) => r,
            Err(PersistError::CompactedAway { path }) => {
                // Compaction deletes the oldest segments: the LSNs before the next one are
                // gone, not missing.
                tracing::warn!(path = %path.display(), "segment compacted away while inspecting; skipped");
                report.compacted_away.push(path);
                expected = None;
                continue;
            }
            Err(e) => return Err(e),
        };
        let bytes = reader.bytes();
        let mut info = SegmentInfo {
            path: path.clone(),
            bytes: reader.len(),
            first_lsn: reader.first_lsn().ok(),
            records: 0,
            entries: 0,
            lsn_range: None,
        };
        let is_last = i + 1 == n_segs;
        let mut scan = SegmentScan::new(bytes, reader.first_lsn().err());
        while let Some(step) = scan.next_step() {
            let rec = match step {
                ScanStep::Record(rec) => rec,
                ScanStep::Damaged { at, damage, resume } => {
                    // As recovery decides it (docs/log-format.md §5: a zero-filled page in the
                    // damage, valid records after it within one group), with the writer's
                    // default group-commit limit (the server does not change it).
                    let at_tail = is_last
                        && resume.is_none_or(|r| {
                            torn_group_tail(bytes, at, r, LogConfig::default().max_group_bytes)
                        });
                    let end = if at_tail {
                        bytes.len()
                    } else {
                        resume.unwrap_or(bytes.len())
                    };
                    report.findings.push(Finding::Damaged {
                        path: path.clone(),
                        offset: at as u64,
                        bytes: (end - at) as u64,
                        damage,
                        at_tail,
                    });
                    continue;
                }
            };
            let first = rec.batch.first_lsn.to_native();
            let n = format::batch_len(rec.batch);
            if let Some(exp) = expected {
                if first > exp {
                    report.findings.push(Finding::MissingLsns {
                        first: exp,
                        last: first - 1,
                        before: path.clone(),
                    });
                } else if first < exp {
                    scan.reject(
                        rec.offset,
                        Damage::LsnMismatch {
                            expected: exp,
                            found: first,
                        },
                    );
                    continue;
                }
            }
            for (k, e) in rec.batch.entries.iter().enumerate() {
                let lsn = first + k as u64;
                let Some(ns) = rec.batch.namespaces.get(e.namespace.to_native() as usize) else {
                    continue;
                };
                if e.op.is_drop_namespace() {
                    // Not an entry of a stream (its worker and rank are 0).
                    continue;
                }
                let key = StreamKey {
                    namespace: NamespaceKey::new(ns.model_name.as_str(), ns.routing_group.as_str()),
                    worker_id: e.worker_id.to_native(),
                    dp_rank: e.dp_rank.to_native(),
                };
                let s = streams.entry(key.clone()).or_insert(StreamInfo {
                    stream: key,
                    entries: 0,
                    first_lsn: lsn,
                    last_lsn: lsn,
                    first_source_seq: None,
                    last_source_seq: None,
                });
                s.entries += 1;
                s.last_lsn = lsn;
                if e.op.is_event() {
                    let seq = e.source_seq.to_native();
                    s.first_source_seq.get_or_insert(seq);
                    s.last_source_seq = Some(seq);
                }
            }
            info.records += 1;
            info.entries += n;
            info.lsn_range = Some((info.lsn_range.map_or(first, |r| r.0), first + n - 1));
            report.lsn_range = Some((report.lsn_range.map_or(first, |r| r.0), first + n - 1));
            report.total_entries += n;
            expected = Some(first + n);
        }
        report.segments.push(info);
    }
    for (next_lsn, path) in &listing.snapshots {
        let meta = match std::fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "snapshot pruned while inspecting; skipped");
                report.compacted_away.push(path.clone());
                continue;
            }
            Err(e) => return Err(PersistError::io("stat", path, None, e)),
        };
        let bytes = meta.len();
        let content = LoadedSnapshot::load(path)
            .and_then(|s| {
                let img = s.image()?;
                Ok(img
                    .namespaces
                    .iter()
                    .map(|ns| {
                        let pairs = ns.nodes.iter().map(|n| n.holders.len()).sum();
                        (ns.spec(), ns.streams.len(), ns.nodes.len(), pairs)
                    })
                    .collect())
            })
            .map_err(|e| e.to_string());
        report.snapshots.push(SnapshotInfo {
            path: path.clone(),
            bytes,
            next_lsn: *next_lsn,
            content,
        });
    }
    report.streams = streams.into_values().collect();
    Ok(report)
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data directory {}", self.dir.display())?;
        match self.lsn_range {
            Some((a, b)) => writeln!(f, "log: LSN {a}..={b}, {} entries", self.total_entries)?,
            None => writeln!(f, "log: empty")?,
        }
        writeln!(f, "segments ({}):", self.segments.len())?;
        for s in &self.segments {
            let range = s
                .lsn_range
                .map(|(a, b)| format!("LSN {a}..={b}"))
                .unwrap_or_else(|| "no records".into());
            writeln!(
                f,
                "  {}  {} bytes  {} records  {} entries  {range}",
                s.path.display(),
                s.bytes,
                s.records,
                s.entries
            )?;
        }
        writeln!(f, "snapshots ({}):", self.snapshots.len())?;
        for s in &self.snapshots {
            match &s.content {
                Ok(nss) => {
                    writeln!(
                        f,
                        "  {}  {} bytes  covers LSN < {}  valid",
                        s.path.display(),
                        s.bytes,
                        s.next_lsn
                    )?;
                    for (spec, streams, nodes, pairs) in nss {
                        writeln!(
                            f,
                            "    {} (block_size {}): {streams} streams, {nodes} blocks, {pairs} (block, stream) pairs",
                            spec.key, spec.block_size
                        )?;
                    }
                }
                Err(e) => writeln!(f, "  {}  INVALID: {e}", s.path.display())?,
            }
        }
        writeln!(f, "streams ({}):", self.streams.len())?;
        for s in &self.streams {
            writeln!(
                f,
                "  {} worker {} dp_rank {}: {} entries, LSN {}..={}, source seq {}..={}",
                s.stream.namespace,
                s.stream.worker_id,
                s.stream.dp_rank,
                s.entries,
                s.first_lsn,
                s.last_lsn,
                s.first_source_seq.map_or("-".into(), |v| v.to_string()),
                s.last_source_seq.map_or("-".into(), |v| v.to_string()),
            )?;
        }
        for p in &self.compacted_away {
            writeln!(
                f,
                "note: {} was deleted while inspecting (compacted away by the live server); skipped",
                p.display()
            )?;
        }
        if self.findings.is_empty() {
            writeln!(f, "no damage found")?;
        } else {
            writeln!(f, "damage ({}):", self.findings.len())?;
            for d in &self.findings {
                match d {
                    Finding::Damaged {
                        path,
                        offset,
                        bytes,
                        damage,
                        at_tail,
                    } => writeln!(
                        f,
                        "  {} at byte {offset} ({bytes} bytes): {damage}{}",
                        path.display(),
                        if *at_tail {
                            " [tail: cut by tolerate-tail; by absolute only if a torn write with nothing valid after it]"
                        } else {
                            " [inside the log: refused unless --recovery skip-corrupt]"
                        }
                    )?,
                    Finding::MissingLsns {
                        first,
                        last,
                        before,
                    } => writeln!(
                        f,
                        "  LSNs {first}..={last} missing before {} [refused unless --recovery skip-corrupt]",
                        before.display()
                    )?,
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// export

/// A lazy, in-order walk over the log's records, yielding entries. It starts in the segment
/// holding `from`, at the last record its LSN index places at or before `from`
/// (docs/log-format.md §2.4), so the work is the answer plus at most about one index stride.
///
/// Safe against the live server writing the directory: the listed segments are opened up to
/// [`OPEN_AHEAD`] ahead of the walk (an open file survives compaction deleting it) and read into
/// memory when the walk reaches them (a tail cut meanwhile reads as a shorter file, never as a
/// fault). A segment deleted before the walk came near it means compaction overtook the walk:
/// [`PersistError::CompactedAway`].
///
/// LSNs are checked to be dense, as recovery checks them: LSNs missing inside `from..=to` end
/// the walk with [`PersistError::MissingRecords`], a record repeating or going back with
/// [`PersistError::Corrupt`]; the walk never yields an incomplete range as if it were whole.
pub struct ReplayCursor {
    /// The listed segments from the one holding `from` on; those within [`OPEN_AHEAD`] of the
    /// walk are open.
    files: Vec<(PathBuf, Option<std::fs::File>)>,
    /// The segment being read (`files[seg]`).
    reader: Option<SegmentReader>,
    seg: usize,
    offset: usize,
    pending: std::collections::VecDeque<LoggedEntry>,
    from: Lsn,
    to: Lsn,
    failed: bool,
    start: SeekVia,
    records_read: u64,
    /// The first LSN the next record must start at (none before the first record read): LSNs
    /// are dense, so anything else is a gap (a segment deleted or cut) or damage.
    expected: Option<Lsn>,
}

impl ReplayCursor {
    /// Entries with `from <= lsn <= to` from the segments of `dir`.
    pub fn open(dir: &Path, from: Lsn, to: Lsn) -> Result<Self> {
        Self::open_with(dir, from, to, true)
    }

    /// The same walk without the LSN index: every record of the segment holding `from` is read
    /// from the segment's start. The reference the indexed walk is tested against.
    pub fn open_scanning(dir: &Path, from: Lsn, to: Lsn) -> Result<Self> {
        Self::open_with(dir, from, to, false)
    }

    fn open_with(dir: &Path, from: Lsn, to: Lsn, use_index: bool) -> Result<Self> {
        // A segment compacted away between the listing and its opening: list again (the next
        // listing starts at a later segment, and the check below says what is left).
        let mut attempts = 0;
        let files = loop {
            attempts += 1;
            match open_segments_from(dir, from) {
                Err(PersistError::CompactedAway { path }) if attempts < LISTING_ATTEMPTS => {
                    tracing::info!(path = %path.display(), "segment compacted away since the listing; listing again");
                }
                other => break other?,
            }
        };
        let reader = match files.first() {
            Some((path, Some(file))) => Some(SegmentReader::read_from(file, path)?),
            _ => None,
        };
        if let Some(first) = reader.as_ref().and_then(|r| r.first_lsn().ok()) {
            if first > from && from >= FIRST_LSN && first > FIRST_LSN {
                return Err(PersistError::Unavailable(format!(
                    "LSNs {from}..{first} are no longer in the log of {} (compacted into a \
                     snapshot); export from LSN {first}, or use `state` to see the index then",
                    dir.display()
                )));
            }
        }
        let (offset, start) = match &reader {
            Some(r) if use_index => {
                let s = lsn_index::seek(r, from);
                (s.offset, s.via)
            }
            _ => (SEGMENT_HEADER_LEN, SeekVia::SegmentStart),
        };
        Ok(Self {
            files,
            reader,
            seg: 0,
            offset,
            pending: Default::default(),
            from,
            to,
            failed: false,
            start,
            records_read: 0,
            expected: None,
        })
    }

    /// How the walk found its first record (index entry, segment start, or a counted fallback).
    pub fn start(&self) -> &SeekVia {
        &self.start
    }

    /// Records read (checked and decoded) so far, including those before `from`.
    pub fn records_read(&self) -> u64 {
        self.records_read
    }
}

impl Iterator for ReplayCursor {
    type Item = Result<LoggedEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if self.failed {
                return None;
            }
            if self.reader.is_none() {
                if self.seg >= self.files.len() {
                    return None;
                }
                if let Err(e) = open_window(&mut self.files, self.seg) {
                    self.failed = true;
                    return Some(Err(e));
                }
                let (path, Some(file)) = &self.files[self.seg] else {
                    return None; // open_window opened it
                };
                match SegmentReader::read_from(file, path) {
                    Ok(r) => self.reader = Some(r),
                    Err(e) => {
                        self.failed = true;
                        return Some(Err(e));
                    }
                }
            }
            let reader = self.reader.as_ref()?;
            let is_last = self.seg + 1 == self.files.len();
            if let Err(d) = reader.first_lsn() {
                self.failed = true;
                return Some(Err(corrupt_for_tool(reader.path(), 0, d)));
            }
            match format::read_record(reader.bytes(), self.offset) {
                Ok(None) => {
                    self.files[self.seg].1 = None; // read: its descriptor is not needed
                    self.seg += 1;
                    self.reader = None;
                    self.offset = SEGMENT_HEADER_LEN;
                }
                Err(d) => {
                    self.failed = true;
                    // A torn tail of the last segment is the normal end of a crashed log (or of
                    // one whose tail the live server cut after the listing).
                    if is_last && d.is_torn_write() {
                        return None;
                    }
                    return Some(Err(corrupt_for_tool(reader.path(), self.offset, d)));
                }
                Ok(Some(rec)) => {
                    self.offset = rec.end;
                    self.records_read += 1;
                    let first = rec.batch.first_lsn.to_native();
                    let next = first.saturating_add(format::batch_len(rec.batch));
                    let continuity = check_continuity(
                        &mut self.expected,
                        self.from,
                        (reader.path(), rec.offset),
                        (first, next),
                    );
                    if let Err(e) = continuity {
                        self.failed = true;
                        return Some(Err(e));
                    }
                    for (k, e) in rec.batch.entries.iter().enumerate() {
                        let lsn = first + k as u64;
                        if lsn < self.from {
                            continue;
                        }
                        if lsn > self.to {
                            self.failed = true; // done
                            break;
                        }
                        let Some(ns) = rec.batch.namespaces.get(e.namespace.to_native() as usize)
                        else {
                            continue;
                        };
                        let view = crate::recovery::EntryView {
                            namespace: ns,
                            record: e,
                        };
                        self.pending.push_back(LoggedEntry {
                            lsn,
                            entry: view.to_entry(),
                        });
                    }
                    if next > self.to {
                        // Done: what follows (a gap included) is past the range asked for.
                        self.failed = true;
                    }
                }
            }
        }
    }
}

/// Check that a record of LSNs `first..next` follows the previous one read (`expected`), as
/// recovery does (`state` refuses a gap too): a gap that reaches `from` or beyond is
/// [`PersistError::MissingRecords`], a record starting before the expected LSN (a duplicate or
/// out of order) is [`PersistError::Corrupt`] ([`Damage::LsnMismatch`]). Moves `expected` past
/// the record.
fn check_continuity(
    expected: &mut Option<Lsn>,
    from: Lsn,
    (path, offset): (&Path, usize),
    (first, next): (Lsn, Lsn),
) -> Result<()> {
    if let Some(exp) = *expected {
        if first < exp {
            return Err(corrupt_for_tool(
                path,
                offset,
                Damage::LsnMismatch {
                    expected: exp,
                    found: first,
                },
            ));
        }
        // The walk stops once past `to` (so `exp <= to` here); a gap wholly before `from` (in
        // the records read only to reach it) takes nothing from the answer.
        if first > exp && first > from {
            return Err(PersistError::MissingRecords {
                first: exp,
                last: first - 1,
                next_file: path.display().to_string(),
                policy: "export",
                advice: "a segment file is missing or was cut short, so the export would \
                         silently lack these entries. Restore the file from a backup, or \
                         export the ranges on either side of the gap (`--to`, `--from`)",
            });
        }
    }
    *expected = Some(next);
    Ok(())
}

/// How many times a read-only tool lists the directory again after a listed file was compacted
/// away before it could be opened.
const LISTING_ATTEMPTS: u32 = 3;

/// How many listed segments a [`ReplayCursor`] keeps open from the one it reads on: enough that
/// compaction (which deletes the oldest segments first) must overtake the walk by that many
/// segments to pull one from under it, few enough that a log of thousands of segments does not
/// exhaust the process's file descriptors.
const OPEN_AHEAD: usize = 16;

/// List the segments of `dir` from the one holding `from` on, the first [`OPEN_AHEAD`] opened.
fn open_segments_from(dir: &Path, from: Lsn) -> Result<Vec<(PathBuf, Option<std::fs::File>)>> {
    let listing = list_dir(dir)?;
    let first_idx = listing
        .segments
        .iter()
        .rposition(|(l, _)| *l <= from)
        .unwrap_or(0);
    let mut files: Vec<_> = listing.segments[first_idx.min(listing.segments.len())..]
        .iter()
        .map(|(_, p)| (p.clone(), None))
        .collect();
    open_window(&mut files, 0)?;
    Ok(files)
}

/// Open the listed segments `at..at + OPEN_AHEAD` not open yet; one deleted since the listing is
/// [`PersistError::CompactedAway`].
fn open_window(files: &mut [(PathBuf, Option<std::fs::File>)], at: usize) -> Result<()> {
    let end = files.len().min(at.saturating_add(OPEN_AHEAD));
    for (path, file) in files.get_mut(at..end).unwrap_or_default() {
        if file.is_none() {
            *file = Some(crate::segment::open_listed(path)?);
        }
    }
    Ok(())
}

fn corrupt_for_tool(path: &Path, offset: usize, damage: Damage) -> PersistError {
    PersistError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        damage,
        policy: "export",
        advice: CORRUPT_ADVICE,
    }
}

/// The RouterEvents with `from <= LSN <= to` (of `worker`, if given) in LSN order, read lazily
/// from the segments (read into memory). Control operations (worker removals) are not RouterEvents and are
/// left out. Damage ends the iteration with an error naming the file and offset.
pub fn export(
    dir: impl AsRef<Path>,
    from: Lsn,
    to: Lsn,
    worker: Option<WorkerId>,
) -> Result<ExportIter> {
    Ok(ExportIter {
        cursor: ReplayCursor::open(dir.as_ref(), from, to)?,
        worker,
    })
}

/// [`export`] without the LSN index (the segment holding `from` is read from its start): the
/// reference the indexed export is checked against.
pub fn export_scanning(
    dir: impl AsRef<Path>,
    from: Lsn,
    to: Lsn,
    worker: Option<WorkerId>,
) -> Result<ExportIter> {
    Ok(ExportIter {
        cursor: ReplayCursor::open_scanning(dir.as_ref(), from, to)?,
        worker,
    })
}

/// Iterator returned by [`export`].
pub struct ExportIter {
    cursor: ReplayCursor,
    worker: Option<WorkerId>,
}

impl ExportIter {
    /// The underlying walk (where it started, how many records it read).
    pub fn cursor(&self) -> &ReplayCursor {
        &self.cursor
    }
}

impl Iterator for ExportIter {
    type Item = Result<RouterEvent>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.cursor.next()? {
                Err(e) => return Some(Err(e)),
                Ok(l) => match l.entry.op {
                    LogOp::Event(ev)
                        if self.worker.is_none() || self.worker == Some(ev.worker_id) =>
                    {
                        return Some(Ok(ev))
                    }
                    _ => continue,
                },
            }
        }
    }
}

/// [`export`] written as JSON lines in Dynamo's RouterEvent shape; returns the number written.
pub fn export_jsonl(
    dir: impl AsRef<Path>,
    from: Lsn,
    to: Lsn,
    worker: Option<WorkerId>,
    out: &mut dyn Write,
) -> Result<u64> {
    let mut n = 0;
    for ev in export(dir, from, to, worker)? {
        let line =
            encode_router_event_json(&ev?).map_err(|e| PersistError::Encode(e.to_string()))?;
        writeln!(out, "{line}").map_err(|e| PersistError::io("write", "<output>", None, e))?;
        n += 1;
    }
    Ok(n)
}

// ---------------------------------------------------------------------------------------------
// import

/// What `import` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    pub events: u64,
    pub first_lsn: Lsn,
    pub next_lsn: Lsn,
}

/// Events per record `import` writes; a batch too large for one record is split in halves.
const IMPORT_BATCH: usize = 256;

/// Append the RouterEvents of a JSON-lines file (one object per line, blank lines ignored) to
/// the log in `to_dir` (created if needed), as namespace `(model, routing_group)` with
/// `block_size`. Each event's `event_id` becomes its source sequence.
///
/// All or nothing with respect to the input: a first pass decodes and checks every line and
/// encodes every batch exactly as the writing pass does, without touching `to_dir`; a line it
/// refuses ([`PersistError::BadInput`] naming the line: not a RouterEvent, unreadable, an
/// `event_id` at or above 2^63, which is reserved for JetStream's tagged sequences, or an
/// event too large for one log record) leaves `to_dir` as it was (not even created). Only then
/// is the file read a second time and written, in records of up to 256 events. The file must
/// be a regular file ([`PersistError::NotAFile`] otherwise), and must not change meanwhile:
/// only the bytes checked are written, and a line that no longer passes fails the import there.
///
/// An error while writing (an I/O error such as a full disk, a log that cannot be opened or
/// synced) is not covered: the records appended before it stay in the log, as a prefix of the
/// file's events ending at a record boundary (a torn last record is cut by the next open).
pub fn import(
    jsonl: impl AsRef<Path>,
    to_dir: impl AsRef<Path>,
    model: &str,
    routing_group: &str,
    block_size: u32,
) -> Result<ImportReport> {
    let path = jsonl.as_ref();
    if block_size == 0 {
        return Err(PersistError::Config("block_size must be > 0".into()));
    }
    let spec = Arc::new(NamespaceSpec::new(model, routing_group, block_size));
    let mut file = open_regular_file(path)?;
    // Pass 1: nothing is written; the target is not even opened.
    let checked = import_pass(path, std::io::BufReader::new(&file), &spec, &mut |batch| {
        crate::writer::encode_record(batch, crate::format::MAX_RECORD_LEN as u64).map(|_| ())
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| PersistError::io("seek", path, Some(0), e))?;
    // Pass 2: the same bytes (lines appended since the check are left out), written.
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let (log, _) = EventLog::open(to_dir.as_ref(), config, &mut NullSink)?;
    let first_lsn = log.next_lsn();
    let written = import_pass(
        path,
        std::io::BufReader::new((&file).take(checked.bytes)),
        &spec,
        &mut |batch| log.append(batch).map(|_| ()),
    )
    .map_err(|e| match e {
        PersistError::BadInput { path, line, reason } => PersistError::BadInput {
            path,
            line,
            reason: format!(
                "{reason} (the file changed while it was being imported, after every line had \
                 passed the check; events of the lines before this one may be in the target)"
            ),
        },
        other => other,
    })?;
    log.sync()?;
    let next_lsn = log.next_lsn();
    log.close()?;
    Ok(ImportReport {
        events: written.events,
        first_lsn,
        next_lsn,
    })
}

/// Open `path` for reading, refusing anything but a regular file (which can be read twice).
fn open_regular_file(path: &Path) -> Result<std::fs::File> {
    let not_a_file = || PersistError::NotAFile {
        path: path.to_path_buf(),
    };
    // By name first: opening a FIFO for reading would wait for a writer.
    let meta = std::fs::metadata(path).map_err(|e| PersistError::io("open", path, None, e))?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    let file = std::fs::File::open(path).map_err(|e| PersistError::io("open", path, None, e))?;
    // Again on the handle: the name may have been replaced in between.
    let meta = file
        .metadata()
        .map_err(|e| PersistError::io("open", path, None, e))?;
    if !meta.is_file() {
        return Err(not_a_file());
    }
    Ok(file)
}

/// What one pass of `import` went through.
struct ImportPass {
    /// Events handed to the sink.
    events: u64,
    /// Bytes of the file read.
    bytes: u64,
}

/// One pass of `import` over `reader`: decode and check every line, gather the events in
/// batches of [`IMPORT_BATCH`] and hand each to `sink` (split by [`put_batch`] when too large).
/// Both passes run this, so the check pass refuses exactly what the writing pass would.
fn import_pass(
    path: &Path,
    reader: impl BufRead,
    spec: &Arc<NamespaceSpec>,
    sink: &mut dyn FnMut(&[LogEntry]) -> Result<()>,
) -> Result<ImportPass> {
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    let mut lines = Vec::with_capacity(IMPORT_BATCH);
    let mut events = 0;
    let bytes = read_jsonl_events(path, reader, |line, ev| {
        // Bit 63 set: a tagged source sequence, which only JetStream intake may log (the log
        // would take it for one of its stream sequences, docs/log-format.md §6.1).
        if split_tagged(ev.event.event_id).is_some() {
            return Err(PersistError::BadInput {
                path: path.to_path_buf(),
                line,
                reason: format!(
                    "event_id {} is reserved (kvindex accepts event ids below 2^63; larger \
                     ones tag JetStream stream sequences in its log)",
                    ev.event.event_id
                ),
            });
        }
        batch.push(LogEntry::event(spec.clone(), ev.event.event_id, ev));
        lines.push(line);
        events += 1;
        if batch.len() == IMPORT_BATCH {
            put_batch(path, &batch, &lines, sink)?;
            batch.clear();
            lines.clear();
        }
        Ok(())
    })?;
    if !batch.is_empty() {
        put_batch(path, &batch, &lines, sink)?;
    }
    Ok(ImportPass { events, bytes })
}

/// Hand `batch` (the events of input lines `lines`) to `sink` as one record; when it is too
/// large for one ([`PersistError::RecordTooLarge`], refused before anything is queued), as its
/// two halves, recursively. A single event too large for a record is refused naming its line.
fn put_batch(
    path: &Path,
    batch: &[LogEntry],
    lines: &[u64],
    sink: &mut dyn FnMut(&[LogEntry]) -> Result<()>,
) -> Result<()> {
    match sink(batch) {
        Err(PersistError::RecordTooLarge { bytes, max }) => {
            if batch.len() > 1 {
                let mid = batch.len() / 2;
                put_batch(path, &batch[..mid], &lines[..mid], sink)?;
                put_batch(path, &batch[mid..], &lines[mid..], sink)
            } else {
                Err(PersistError::BadInput {
                    path: path.to_path_buf(),
                    line: lines.first().copied().unwrap_or(0),
                    reason: format!(
                        "the event takes {bytes} bytes as a log record, more than a record \
                         holds ({max} bytes)"
                    ),
                })
            }
        }
        other => other,
    }
}

/// Call `f` with each RouterEvent of a JSON-lines file; errors name the line.
fn for_each_jsonl_event(path: &Path, f: impl FnMut(u64, RouterEvent) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| PersistError::io("open", path, None, e))?;
    read_jsonl_events(path, std::io::BufReader::new(file), f).map(|_| ())
}

/// Call `f` with each RouterEvent of the JSON lines of `reader` (read from `path`, which errors
/// name with the line); returns the bytes read.
fn read_jsonl_events(
    path: &Path,
    mut reader: impl BufRead,
    mut f: impl FnMut(u64, RouterEvent) -> Result<()>,
) -> Result<u64> {
    let mut bytes = 0u64;
    let mut line_no = 0u64;
    let mut buf = String::new();
    loop {
        line_no += 1;
        buf.clear();
        let n = reader
            .read_line(&mut buf)
            .map_err(|e| PersistError::BadInput {
                path: path.to_path_buf(),
                line: line_no,
                reason: format!("cannot read: {e}"),
            })?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes += n as u64;
        let line = match buf.strip_suffix('\n') {
            Some(l) => l.strip_suffix('\r').unwrap_or(l),
            None => buf.as_str(),
        };
        if line.trim().is_empty() {
            continue;
        }
        let ev = decode_router_event_json(line.as_bytes()).map_err(|e| PersistError::BadInput {
            path: path.to_path_buf(),
            line: line_no,
            reason: format!(
                "{e}; each line must be one RouterEvent JSON object, as written by \
                 `kvindex replay export` or a Dynamo dump"
            ),
        })?;
        f(line_no, ev)?;
    }
}

// ---------------------------------------------------------------------------------------------
// state and diff

/// Where `state` and `diff` read events from.
#[derive(Debug, Clone)]
pub enum StateSource {
    /// A kvindex data directory (snapshots + log); positions are LSNs.
    DataDir(PathBuf),
    /// A RouterEvent JSON-lines file applied to one namespace; position `n` means "after the
    /// first `n` events".
    JsonLines {
        path: PathBuf,
        namespace: NamespaceSpec,
    },
}

/// An index rebuilt as of a position.
pub struct RebuiltState {
    /// The engine holding the rebuilt namespaces (flushed).
    pub engine: Engine,
    /// Position reached: the last LSN (or event count) applied.
    pub position: u64,
    /// For a data directory, what the read found.
    pub report: Option<RecoveryReport>,
}

fn tool_engine() -> Engine {
    Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 4096,
        ..EngineConfig::default()
    })
}

/// Rebuild the index as of `at` (inclusive; `None` = everything), read-only.
pub fn state(source: &StateSource, at: Option<u64>) -> Result<RebuiltState> {
    match source {
        StateSource::DataDir(dir) => {
            // A file compacted away by the live server between the listing and its read: start
            // over from a new listing with a fresh engine (the next one starts past it).
            let mut attempts = 0;
            loop {
                attempts += 1;
                match state_of_dir(dir, at) {
                    Err(PersistError::CompactedAway { path }) if attempts < LISTING_ATTEMPTS => {
                        tracing::info!(path = %path.display(), "file compacted away while reading; reading again");
                    }
                    other => return other,
                }
            }
        }
        StateSource::JsonLines { path, namespace } => {
            let engine = tool_engine();
            let ns = engine.create_namespace(namespace.key.clone(), namespace.block_size)?;
            let mut applied = 0u64;
            let limit = at.unwrap_or(u64::MAX);
            for_each_jsonl_event(path, |_, ev| {
                if applied < limit {
                    ns.apply(ev)?;
                    applied += 1;
                }
                Ok(())
            })?;
            engine.flush()?;
            Ok(RebuiltState {
                engine,
                position: applied,
                report: None,
            })
        }
    }
}

/// [`state`] of a data directory, read once.
fn state_of_dir(dir: &Path, at: Option<u64>) -> Result<RebuiltState> {
    let engine = tool_engine();
    if let Some(at) = at {
        check_reachable(dir, at)?;
    }
    let mut sink = EngineSink::new(engine.clone());
    let report = read_log(dir, RecoveryPolicy::TolerateTail, at, &mut sink)?;
    engine.flush()?;
    let reached = report.next_lsn.saturating_sub(1);
    Ok(RebuiltState {
        engine,
        position: at.map_or(reached, |a| a.min(reached)),
        report: Some(report),
    })
}

/// Refuse early (with the earliest reachable position) when `at` predates both the oldest
/// segment and every snapshot.
fn check_reachable(dir: &Path, at: Lsn) -> Result<()> {
    let listing = list_dir(dir)?;
    let oldest_seg = listing.segments.first().map(|(l, _)| *l);
    let snap_ok = listing
        .snapshots
        .iter()
        .any(|(n, _)| *n <= at.saturating_add(1));
    if let Some(first) = oldest_seg {
        if first > FIRST_LSN && at + 1 < first && !snap_ok {
            let earliest = listing
                .snapshots
                .first()
                .map(|(n, _)| n.saturating_sub(1))
                .unwrap_or(first - 1);
            return Err(PersistError::Unavailable(format!(
                "the state at LSN {at} cannot be rebuilt from {}: the log starts at LSN {first} \
                 and no snapshot is that old; the earliest state available is at LSN {earliest}",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// A block as `diff` reports it: its path of local hashes from the root and the stream's
/// external hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockRef {
    pub path: Vec<u64>,
    pub ext: u64,
}

/// What one stream gained and lost between two positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDiff {
    pub namespace: NamespaceKey,
    pub stream: WorkerWithDpRank,
    pub gained: Vec<BlockRef>,
    pub lost: Vec<BlockRef>,
}

type CanonicalSet = BTreeSet<(WorkerWithDpRank, Vec<u64>, u64)>;

fn canonical_by_namespace(engine: &Engine) -> Result<HashMap<NamespaceKey, CanonicalSet>> {
    let mut out = HashMap::new();
    for key in engine.namespaces() {
        if let Some(ns) = engine.namespace(&key) {
            out.insert(key, ns.snapshot()?.canonical());
        }
    }
    Ok(out)
}

/// Which (worker, dp_rank) gained or lost which blocks between positions `from` and `to`
/// (sorted by namespace and stream; streams without change are left out).
pub fn diff(source: &StateSource, from: u64, to: u64) -> Result<Vec<StreamDiff>> {
    let a = canonical_by_namespace(&state(source, Some(from))?.engine)?;
    let b = canonical_by_namespace(&state(source, Some(to))?.engine)?;
    let keys: BTreeSet<&NamespaceKey> = a.keys().chain(b.keys()).collect();
    let empty = CanonicalSet::new();
    let mut out: BTreeMap<(NamespaceKey, WorkerWithDpRank), StreamDiff> = BTreeMap::new();
    for key in keys {
        let (sa, sb) = (a.get(key).unwrap_or(&empty), b.get(key).unwrap_or(&empty));
        let new_diff = |s: WorkerWithDpRank| StreamDiff {
            namespace: key.clone(),
            stream: s,
            gained: Vec::new(),
            lost: Vec::new(),
        };
        for (s, path, ext) in sb.difference(sa) {
            out.entry((key.clone(), *s))
                .or_insert_with(|| new_diff(*s))
                .gained
                .push(BlockRef {
                    path: path.clone(),
                    ext: *ext,
                });
        }
        for (s, path, ext) in sa.difference(sb) {
            out.entry((key.clone(), *s))
                .or_insert_with(|| new_diff(*s))
                .lost
                .push(BlockRef {
                    path: path.clone(),
                    ext: *ext,
                });
        }
    }
    Ok(out.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch too large for one record is handed on as halves, recursively, in order; a single
    /// entry too large is refused naming its line. The sink here refuses more than 3 entries.
    #[test]
    fn put_batch_splits_a_batch_too_large_for_a_record_and_names_the_line_of_one_event() {
        let spec = Arc::new(NamespaceSpec::new("m", "g", 16));
        let entries: Vec<LogEntry> = (0..10)
            .map(|w| LogEntry::control(spec.clone(), w, 0, LogOp::RemoveWorker))
            .collect();
        let lines: Vec<u64> = (0..10).map(|i| 100 + 2 * i).collect();
        let path = Path::new("events.jsonl");
        let mut records: Vec<Vec<u64>> = Vec::new();
        let limit = 3;
        put_batch(path, &entries, &lines, &mut |b| {
            if b.len() > limit {
                return Err(PersistError::RecordTooLarge {
                    bytes: b.len() as u64,
                    max: limit as u64,
                });
            }
            records.push(b.iter().map(|e| e.worker_id).collect());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            records,
            vec![vec![0, 1], vec![2, 3, 4], vec![5, 6], vec![7, 8, 9]]
        );
        let mut calls = 0;
        let refused = put_batch(path, &entries[4..6], &lines[4..6], &mut |_| {
            calls += 1;
            Err(PersistError::RecordTooLarge {
                bytes: 70 << 20,
                max: 64 << 20,
            })
        });
        match refused {
            Err(PersistError::BadInput { path, line, reason }) => {
                assert_eq!((path.as_path(), line), (Path::new("events.jsonl"), 108));
                assert!(reason.contains("more than a record holds"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(calls, 2, "the pair, then its first half");
    }
}
