//! The per-segment LSN index (docs/log-format.md §2.4): "events since LSN X" read through the
//! index gives exactly what a scan of the segment from its start gives, for every X, and a
//! missing, corrupt or stale index falls back to the scan (counted) and is rebuilt by recovery.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kvindex_engine::{RouterEvent, WorkerWithDpRank};
use kvindex_persistence::lsn_index::{
    self, encode_file, index_path, IndexFault, IndexMark, SeekVia, INDEX_ENTRY_LEN,
    INDEX_HEADER_LEN,
};
use kvindex_persistence::tool::{export, export_scanning, ExportIter};
use kvindex_persistence::*;

const STRIDE: u32 = 512;

fn log_cfg(stride: u32) -> LogConfig {
    LogConfig {
        io: IoBackendChoice::Portable,
        fsync: FsyncPolicy::Never,
        segment_bytes: 8192,
        lsn_index_stride: stride,
        ..LogConfig::default()
    }
}

/// Appends `batches` batches of 1 to 4 entries (events of three streams and, now and then, a
/// control operation) to the log in `dir`; returns the next LSN.
fn write_batches(dir: &Path, stride: u32, batches: usize, seed: u64) -> Lsn {
    write_batches_with(dir, log_cfg(stride), batches, seed)
}

fn write_batches_with(dir: &Path, cfg: LogConfig, batches: usize, seed: u64) -> Lsn {
    let (log, _) = EventLog::open(dir, cfg, &mut NullSink).unwrap();
    let streams = vec![
        WorkerWithDpRank::new(1, 0),
        WorkerWithDpRank::new(2, 0),
        WorkerWithDpRank::new(2, 1),
    ];
    let mut gen = EventGen::new(seed, streams);
    let mut rng = Rng::new(seed);
    for b in 0..batches {
        let n = 1 + rng.below(4) as usize;
        let mut entries: Vec<LogEntry> = (0..n)
            .map(|i| LogEntry::event(ns(), (b * 10 + i) as u64, gen.next_event()))
            .collect();
        if b % 17 == 5 {
            entries.push(LogEntry::control(ns(), 2, 1, LogOp::RemoveWorkerDpRank));
        }
        let _ = log.append(&entries).unwrap();
    }
    let next = log.next_lsn();
    log.close().unwrap();
    next
}

/// What an index case must fall back with.
type FaultCheck = fn(&IndexFault) -> bool;

type Answer = std::result::Result<Vec<RouterEvent>, String>;

fn collect(it: Result<ExportIter>) -> (Answer, Option<(SeekVia, u64)>) {
    let mut it = match it {
        Ok(it) => it,
        Err(e) => return (Err(e.to_string()), None),
    };
    let mut out = Vec::new();
    for r in it.by_ref() {
        match r {
            Ok(ev) => out.push(ev),
            Err(e) => {
                let stats = (it.cursor().start().clone(), it.cursor().records_read());
                return (Err(format!("{out:?} then {e}")), Some(stats));
            }
        }
    }
    let stats = (it.cursor().start().clone(), it.cursor().records_read());
    (Ok(out), Some(stats))
}

/// `(indexed answer, scanning answer, how the indexed walk started, records it read)`.
fn both(dir: &Path, from: Lsn, to: Lsn, worker: Option<u64>) -> (Answer, Answer, Option<SeekVia>) {
    let (a, sa) = collect(export(dir, from, to, worker));
    let (b, _) = collect(export_scanning(dir, from, to, worker));
    (a, b, sa.map(|s| s.0))
}

fn index_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvidx"))
        .collect();
    v.sort();
    v
}

#[test]
fn indexed_export_equals_the_scan_for_every_start_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let end = write_batches(dir.path(), STRIDE, 400, 7);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3, "the log spans several segments");
    assert_eq!(index_files(dir.path()).len(), segs.len());
    let mut via_index = 0;
    for from in 0..=end + 2 {
        // A window after every start (where the index matters), the whole rest now and then.
        let rest = if from % 50 == 0 { u64::MAX } else { from + 40 };
        for (to, worker) in [(rest, None), (from.saturating_add(5), Some(2))] {
            let (a, b, via) = both(dir.path(), from, to, worker);
            assert_eq!(a, b, "from {from} to {to} worker {worker:?}");
            assert!(a.is_ok(), "from {from}: {a:?}");
            match via {
                Some(SeekVia::Index { lsn }) => {
                    assert!(lsn <= from);
                    via_index += 1;
                }
                Some(SeekVia::SegmentStart) => {}
                other => panic!("from {from}: an intact index was not used: {other:?}"),
            }
        }
    }
    assert!(
        via_index > end,
        "the index served most starts ({via_index})"
    );
}

/// The work of an indexed read is the answer plus at most one stride, wherever X lies in its
/// segment; the scan reads the segment from its start.
#[test]
fn an_indexed_read_touches_about_one_stride_before_x() {
    let dir = tempfile::tempdir().unwrap();
    let end = write_batches(dir.path(), STRIDE, 400, 11);
    let seg = segment_files(dir.path())[0].clone();
    let reader = SegmentReader::open(&seg).unwrap();
    let records: Vec<_> = reader.records().map(|r| r.unwrap()).collect();
    let min_frame = records.iter().map(|r| r.end - r.offset).min().unwrap();
    let last = records.last().unwrap();
    // The last entry of the first segment: deepest into it.
    let x = last.batch.first_lsn.to_native() + last.batch.entries.len() as u64 - 1;
    assert!(x < end);
    let indexed = export(dir.path(), x, x, None).unwrap();
    let scanned = export_scanning(dir.path(), x, x, None).unwrap();
    let (mut indexed, mut scanned) = (indexed, scanned);
    let a: Vec<_> = indexed.by_ref().collect::<Result<_>>().unwrap();
    let b: Vec<_> = scanned.by_ref().collect::<Result<_>>().unwrap();
    assert_eq!(a, b);
    // Records before X's own: at most one stride's worth; plus X's record and one past it.
    let bound = STRIDE as u64 / min_frame as u64 + 3;
    assert!(
        indexed.cursor().records_read() <= bound,
        "indexed read {} records, bound {bound}",
        indexed.cursor().records_read()
    );
    // The scan reads the whole segment (and the next segment's first record, past X).
    assert!(scanned.cursor().records_read() >= records.len() as u64);
    assert!(
        records.len() as u64 > bound,
        "the segment is larger than a stride"
    );
}

#[test]
fn export_before_the_first_retained_lsn_after_compaction_fails_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        log: log_cfg(STRIDE),
        snapshots: manual_snapshots(1),
    };
    let (idx, _) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    let mut gen = EventGen::new(5, vec![WorkerWithDpRank::new(1, 0)]);
    for i in 0..600 {
        let _ = idx.submit(&ns(), i, gen.next_event()).unwrap();
    }
    idx.snapshot_now().unwrap();
    for i in 600..700 {
        let _ = idx.submit(&ns(), i, gen.next_event()).unwrap();
    }
    let end = idx.log().next_lsn();
    idx.close().unwrap();
    let segs = segment_files(dir.path());
    let first_kept: Lsn = segs[0]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("seg-"))
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(first_kept > 1, "compaction deleted the oldest segments");
    // Only the surviving segments have indexes.
    let stems = |v: Vec<PathBuf>| -> Vec<String> {
        v.iter()
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(stems(index_files(dir.path())), stems(segs.clone()));
    for from in [
        1,
        first_kept - 1,
        first_kept,
        first_kept + 1,
        end - 1,
        end,
        end + 5,
    ] {
        let (a, b, _) = both(dir.path(), from, u64::MAX, None);
        assert_eq!(a, b, "from {from}");
        if from < first_kept {
            assert!(a.unwrap_err().contains("compacted"));
        } else {
            assert_eq!(a.unwrap().len() as u64, end.saturating_sub(from));
        }
    }
}

/// Every LSN whose walk starts from an index entry of the first segment (where a bad index
/// matters).
fn indexed_starts(dir: &Path) -> Vec<Lsn> {
    let seg = &segment_files(dir)[0];
    let reader = SegmentReader::open(seg).unwrap();
    let first = reader.first_lsn().unwrap();
    let marks = lsn_index::load(seg, first).unwrap().marks;
    assert!(marks.len() >= 3, "the first segment has several marks");
    let next_seg = segment_files(dir)[1]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("seg-"))
        .and_then(|s| s.parse::<Lsn>().ok())
        .unwrap();
    (marks[0].lsn..next_seg).collect()
}

fn counter(
    snap: &[(
        metrics_util::CompositeKey,
        Option<metrics::Unit>,
        Option<metrics::SharedString>,
        metrics_util::debugging::DebugValue,
    )],
    name: &str,
) -> u64 {
    snap.iter()
        .filter(|(k, ..)| k.key().name() == name)
        .map(|(_, _, _, v)| match v {
            metrics_util::debugging::DebugValue::Counter(c) => *c,
            _ => 0,
        })
        .sum()
}

/// Each way an index can be wrong: the answer is the scan's, the walk says why it fell back,
/// and every fallback is counted.
#[test]
fn a_missing_corrupt_or_stale_index_falls_back_to_the_scan_and_is_counted() {
    use metrics_util::debugging::DebuggingRecorder;
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), STRIDE, 300, 3);
    let seg = segment_files(dir.path())[0].clone();
    let seg1 = segment_files(dir.path())[1].clone();
    let idx = index_path(&seg);
    let good = std::fs::read(&idx).unwrap();
    let first = SegmentReader::open(&seg).unwrap().first_lsn().unwrap();
    let marks = lsn_index::load(&seg, first).unwrap().marks;
    let starts = indexed_starts(dir.path());

    let mut flipped_entry = good.clone();
    flipped_entry[INDEX_HEADER_LEN + INDEX_ENTRY_LEN + 2] ^= 0x10;
    let mut flipped_header = good.clone();
    flipped_header[25] ^= 1;
    // Valid CRCs, wrong facts: a mark moved by one frame slot, a mark naming another LSN, a
    // mark past the end of the segment (an index that outlived a cut tail).
    let shift = |f: &dyn Fn(IndexMark) -> IndexMark| {
        encode_file(
            first,
            STRIDE,
            &marks.iter().map(|m| f(*m)).collect::<Vec<_>>(),
        )
    };
    let moved = shift(&|m| IndexMark {
        offset: m.offset + 8,
        ..m
    });
    let renamed = shift(&|m| IndexMark {
        lsn: m.lsn + 1,
        ..m
    });
    let other = std::fs::read(index_path(&seg1)).unwrap();

    let cases: Vec<(&str, Option<Vec<u8>>, FaultCheck)> = vec![
        ("missing", None, |f| *f == IndexFault::Missing),
        ("flipped entry", Some(flipped_entry), |f| {
            matches!(f, IndexFault::BadEntry { index: 1 })
        }),
        ("flipped header", Some(flipped_header), |f| {
            matches!(f, IndexFault::BadHeader(_))
        }),
        ("moved marks", Some(moved), |f| {
            matches!(f, IndexFault::Stale { .. })
        }),
        ("renamed marks", Some(renamed), |f| {
            matches!(f, IndexFault::Stale { .. })
        }),
        ("another segment's index", Some(other), |f| {
            matches!(f, IndexFault::WrongSegment { .. })
        }),
        ("garbage", Some(vec![0xAB; 100]), |f| {
            matches!(f, IndexFault::BadHeader(_))
        }),
    ];
    for (what, bytes, expect) in cases {
        match &bytes {
            Some(b) => std::fs::write(&idx, b).unwrap(),
            None => std::fs::remove_file(&idx).unwrap(),
        }
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let mut fallbacks = 0;
        metrics::with_local_recorder(&recorder, || {
            for &from in &starts {
                let (a, b, via) = both(dir.path(), from, u64::MAX, None);
                assert_eq!(a, b, "{what}: from {from}");
                assert!(a.is_ok(), "{what}: from {from}");
                match via {
                    Some(SeekVia::Fallback(f)) => {
                        assert!(expect(&f), "{what}: from {from}: {f}");
                        fallbacks += 1;
                    }
                    // A moved or renamed mark is only caught where it is used; others are not.
                    other if what.ends_with("marks") => {
                        assert!(
                            matches!(other, Some(SeekVia::SegmentStart)),
                            "{what}: {other:?}"
                        )
                    }
                    other => panic!("{what}: from {from}: {other:?}"),
                }
            }
        });
        assert!(fallbacks > 0, "{what}");
        let snap = snapshotter.snapshot().into_vec();
        assert_eq!(
            counter(&snap, "kvindex_lsn_index_fallbacks_total"),
            fallbacks,
            "{what}"
        );
    }

    // A partial trailing entry (an append cut by a crash) leaves the index usable.
    let mut torn = good.clone();
    torn.extend_from_slice(&[1, 2, 3, 4, 5]);
    std::fs::write(&idx, &torn).unwrap();
    let (a, b, via) = both(dir.path(), *starts.last().unwrap(), u64::MAX, None);
    assert_eq!(a, b);
    assert!(matches!(via, Some(SeekVia::Index { .. })), "{via:?}");
}

/// Recovery rewrites every index it can check (the segments it scans) to what the writer would
/// have written, removes indexes of deleted segments, and the writer then keeps extending the
/// tail's index.
#[test]
fn recovery_rebuilds_bad_indexes_exactly_and_the_writer_continues_them() {
    let dir = tempfile::tempdir().unwrap();
    let end = write_batches(dir.path(), STRIDE, 300, 9);
    let segs = segment_files(dir.path());
    let written: Vec<Vec<u8>> = segs
        .iter()
        .map(|s| std::fs::read(index_path(s)).unwrap())
        .collect();
    // Break one, delete one, truncate the tail's to its header, leave an orphan.
    let mut b = written[0].clone();
    b[INDEX_HEADER_LEN + 3] ^= 0xFF;
    std::fs::write(index_path(&segs[0]), b).unwrap();
    std::fs::remove_file(index_path(&segs[1])).unwrap();
    let tail = segs.last().unwrap();
    std::fs::write(
        index_path(tail),
        &written[segs.len() - 1][..INDEX_HEADER_LEN],
    )
    .unwrap();
    let orphan = dir.path().join("seg-00000000000099999999.kvidx");
    std::fs::write(&orphan, b"old").unwrap();

    let mut sink = CollectingSink::default();
    let (log, report) = EventLog::open(dir.path(), log_cfg(STRIDE), &mut sink).unwrap();
    assert_eq!(sink.entries.len() as u64, end - 1);
    let tail_had_marks = written[segs.len() - 1].len() > INDEX_HEADER_LEN;
    assert_eq!(report.lsn_indexes_rebuilt, 2 + usize::from(tail_had_marks));
    for (s, w) in segs.iter().zip(&written) {
        assert_eq!(&std::fs::read(index_path(s)).unwrap(), w, "{}", s.display());
    }
    assert!(!orphan.exists());

    // Keep writing into the tail: its index grows as the writer's planner says, so a second
    // recovery finds nothing to rebuild.
    let mut gen = EventGen::new(99, vec![WorkerWithDpRank::new(4, 0)]);
    for i in 0..200 {
        let _ = log
            .append(&[LogEntry::event(ns(), i, gen.next_event())])
            .unwrap();
    }
    let end = log.next_lsn();
    log.close().unwrap();
    let (log, report) = EventLog::open(dir.path(), log_cfg(STRIDE), &mut NullSink).unwrap();
    assert_eq!(report.lsn_indexes_rebuilt, 0, "writer and recovery agree");
    log.close().unwrap();
    for from in (1..end + 1).step_by(7) {
        let (a, b, via) = both(dir.path(), from, u64::MAX, None);
        assert_eq!(a, b, "from {from}");
        assert!(!matches!(via, Some(SeekVia::Fallback(_))), "{via:?}");
    }
}

/// A log written without indexes (as before they existed, or with the stride at 0) reads the
/// same, by scanning; opening it with indexing on builds the indexes of the segments recovery
/// scans.
#[test]
fn a_log_without_indexes_reads_by_scanning_and_gets_them_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let end = write_batches(dir.path(), 0, 300, 21);
    assert!(index_files(dir.path()).is_empty());
    for from in (1..=end).step_by(5) {
        let (a, b, via) = both(dir.path(), from, u64::MAX, None);
        assert_eq!(a, b);
        assert!(matches!(
            via,
            Some(SeekVia::Fallback(IndexFault::Missing)) | Some(SeekVia::SegmentStart)
        ));
    }
    let (log, report) = EventLog::open(dir.path(), log_cfg(STRIDE), &mut NullSink).unwrap();
    log.close().unwrap();
    let n = segment_files(dir.path()).len();
    assert_eq!(index_files(dir.path()).len(), n);
    assert!(report.lsn_indexes_rebuilt >= n - 1);
    let (a, b, via) = both(dir.path(), end - 3, u64::MAX, None);
    assert_eq!(a, b);
    assert!(!matches!(via, Some(SeekVia::Fallback(_))), "{via:?}");
}

/// Damage in a segment at or after the start point is reported exactly as the scan reports it.
/// Damage before the start point is not read by the indexed walk (as neither walk reads the
/// segments before the one holding X); `inspect` is what finds it.
#[test]
fn segment_damage_after_the_start_is_reported_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    write_batches(dir.path(), STRIDE, 300, 13);
    let seg = segment_files(dir.path())[0].clone();
    let first = SegmentReader::open(&seg).unwrap().first_lsn().unwrap();
    let marks = lsn_index::load(&seg, first).unwrap().marks;
    let m = marks[1];
    let reader = SegmentReader::open(&seg).unwrap();
    let recs: Vec<_> = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r.offset, r.batch.first_lsn.to_native())
        })
        .collect();
    drop(reader);
    // Damage the first record after the mark that no mark names.
    let is_mark = |off: usize| marks.iter().any(|x| x.offset == off as u64);
    let k = recs.iter().position(|r| r.0 as u64 == m.offset).unwrap();
    let j = (k + 1..recs.len()).find(|&j| !is_mark(recs[j].0)).unwrap();
    let (dmg_off, dmg_lsn) = recs[j];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[dmg_off + 12] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();
    for from in [m.lsn, m.lsn + 1, dmg_lsn] {
        let (a, b, via) = both(dir.path(), from, u64::MAX, None);
        assert_eq!(a, b, "from {from}");
        assert!(a.unwrap_err().contains("CRC32C"), "from {from}");
        assert!(matches!(via, Some(SeekVia::Index { .. })), "{via:?}");
    }
    // Damage in a record a mark names: the mark fails its check, the scan reports the damage.
    let marked = marks[2];
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[marked.offset as usize + 12] ^= 0xFF;
    std::fs::write(&seg, &bytes).unwrap();
    let (a, b, via) = both(dir.path(), marked.lsn, u64::MAX, None);
    assert_eq!(a, b);
    assert!(a.is_err());
    assert!(
        matches!(via, Some(SeekVia::Fallback(IndexFault::Stale { .. }))),
        "{via:?}"
    );
    // Past both, at a later mark: the indexed walk never meets them.
    let after = marks.iter().find(|x| x.offset > marked.offset).unwrap();
    let (a, b, _) = both(dir.path(), after.lsn, u64::MAX, None);
    assert!(a.is_ok(), "{a:?}");
    assert!(b.is_err());
}

/// A crash cuts the segment mid-record after its index got marks for records now gone: a mark
/// inside the file that names a cut record fails its check (counted fallback), marks past the
/// end are not used, the answer is the scan's (the log ends at the torn tail), and the next
/// open cuts the tail and rewrites the index to the surviving records.
#[test]
fn an_index_that_outlived_a_torn_tail_is_caught_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        segment_bytes: 1 << 20,
        ..log_cfg(STRIDE)
    };
    write_batches_with(dir.path(), cfg.clone(), 300, 17);
    let seg = segment_files(dir.path())[0].clone();
    assert_eq!(segment_files(dir.path()).len(), 1);
    let first = SegmentReader::open(&seg).unwrap().first_lsn().unwrap();
    let marks = lsn_index::load(&seg, first).unwrap().marks;
    assert!(marks.len() >= 4);
    // Cut in the middle of the record the second-to-last mark names.
    let cut_mark = marks[marks.len() - 2];
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(cut_mark.offset + 20).unwrap();
    drop(f);
    let prev = marks[marks.len() - 3];
    for from in [
        cut_mark.lsn - 1,
        cut_mark.lsn,
        marks.last().unwrap().lsn + 1,
    ] {
        let (a, b, via) = both(dir.path(), from, u64::MAX, None);
        assert_eq!(a, b, "from {from}");
        if from >= cut_mark.lsn {
            assert!(
                matches!(via, Some(SeekVia::Fallback(IndexFault::Stale { .. }))),
                "from {from}: {via:?}"
            );
            assert_eq!(a.unwrap(), vec![]);
        } else {
            assert_eq!(via, Some(SeekVia::Index { lsn: prev.lsn }), "from {from}");
        }
    }
    // Cut at the second-to-last mark's offset: the marks now past the end are skipped, the one
    // before them is used.
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(cut_mark.offset).unwrap();
    drop(f);
    let (a, b, via) = both(dir.path(), u64::MAX - 1, u64::MAX, None);
    assert_eq!(a, b);
    assert_eq!(via, Some(SeekVia::Index { lsn: prev.lsn }));
    let (log, report) = EventLog::open(dir.path(), cfg, &mut NullSink).unwrap();
    log.close().unwrap();
    // The second cut left the file ending on a record boundary: nothing torn to cut.
    assert!(report.truncated.is_empty());
    assert_eq!(report.lsn_indexes_rebuilt, 1);
    assert_eq!(
        lsn_index::load(&seg, first).unwrap().marks,
        marks[..marks.len() - 2].to_vec()
    );
    let (a, b, via) = both(dir.path(), prev.lsn + 1, u64::MAX, None);
    assert_eq!(a, b);
    assert_eq!(via, Some(SeekVia::Index { lsn: prev.lsn }));
}
