//! Recovery keeps the log's shape (docs/log-format.md §1, §5): segment i holds LSNs
//! [name_i, name_{i+1}), the writer only resumes a segment recovery read, never inside its
//! header, a flipped bit in a record's length is damage rather than a torn write, cut bytes are
//! never overwritten, and `sync()` makes new segments durable under every fsync policy.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::format::{self, SEGMENT_HEADER_LEN};
use kvindex_persistence::tool::{self, Finding};
use kvindex_persistence::*;

fn conf(policy: RecoveryPolicy, segment_bytes: u64) -> LogConfig {
    LogConfig {
        recovery: policy,
        segment_bytes,
        ..cfg(IoBackendChoice::Portable, FsyncPolicy::Always)
    }
}

/// A log of `n` acknowledged single-entry batches (LSNs 1..=n) in segments of about 1 KiB.
fn small_segments(dir: &Path, n: u64, gen: &mut EventGen) {
    let (log, _) =
        EventLog::open(dir, conf(RecoveryPolicy::Absolute, 1024), &mut NullSink).unwrap();
    for i in 0..n {
        log.append(&[LogEntry::event(ns(), i + 1, gen.next_event())])
            .unwrap()
            .wait()
            .unwrap();
    }
    log.close().unwrap();
}

fn gen() -> EventGen {
    EventGen::new(42, vec![WorkerWithDpRank::new(1, 0)])
}

/// `(offset, end)` of every record of a segment file.
fn record_spans(path: &Path) -> Vec<(usize, usize)> {
    let r = SegmentReader::open(path).unwrap();
    r.records()
        .map(|x| x.map(|v| (v.offset, v.end)).unwrap())
        .collect()
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn lsns(entries: &[LoggedEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.lsn).collect()
}

fn open_collect(
    dir: &Path,
    policy: RecoveryPolicy,
) -> Result<(EventLog, Vec<LoggedEntry>, RecoveryReport)> {
    let mut sink = CollectingSink::default();
    let (log, report) = EventLog::open(dir, conf(policy, 1 << 20), &mut sink)?;
    Ok((log, sink.entries, report))
}

// ---- D5: the writer resumes only a segment recovery read, never inside its header ----------

/// The snapshot's position is the last segment's name (a snapshot taken right before the
/// append that rolled) and that segment is empty (a crash between its creation and its header
/// write): recovery removes it, and the segment before it, which recovery did not read (it is
/// wholly below the snapshot), must not become the writer's tail, let alone at offset 0.
#[test]
fn an_unread_segment_below_the_snapshot_never_becomes_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = gen();
    small_segments(dir.path(), 40, &mut gen);
    let segs = segment_files(dir.path());
    let (a, b) = (segs[segs.len() - 2].clone(), segs[segs.len() - 1].clone());
    let x = segment_first_lsn(&b);
    set_len(&b, 0);
    SnapshotStore::new(dir.path())
        .write(&SnapshotImage {
            next_lsn: x,
            ..Default::default()
        })
        .unwrap();
    let a_before = std::fs::read(&a).unwrap();

    let (log, entries, report) = open_collect(dir.path(), RecoveryPolicy::TolerateTail).unwrap();
    assert!(entries.is_empty());
    assert_eq!(report.next_lsn, x);
    assert!(report.truncated[0].file_removed, "{report:?}");
    let t = log
        .append(&[LogEntry::event(ns(), 999, gen.next_event())])
        .unwrap();
    assert_eq!(t.first_lsn(), x);
    t.wait().unwrap();
    assert_eq!(
        log.segments().last().map(|(l, p)| (*l, p.clone())),
        Some((x, b.clone())),
        "the append went into a new segment named for it"
    );
    log.close().unwrap();
    assert_eq!(
        std::fs::read(&a).unwrap(),
        a_before,
        "{} untouched",
        a.display()
    );

    // Every policy reads it back: from the snapshot, and (snapshot gone) from LSN 1.
    let (log, entries, report) = open_collect(dir.path(), RecoveryPolicy::Absolute).unwrap();
    log.close().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(lsns(&entries), vec![x]);
    for s in snapshot_files(dir.path()) {
        std::fs::remove_file(s).unwrap();
    }
    let mut sink = CollectingSink::default();
    read_log(dir.path(), RecoveryPolicy::Absolute, None, &mut sink).unwrap();
    assert_eq!(lsns(&sink.entries), (1..=x).collect::<Vec<_>>());
}

/// Under `never` a new segment's header is written but not synced when the segment is created;
/// `sync()` (which every snapshot calls first) must `fdatasync` it even when no record was
/// appended, or a snapshot could make the segment's name durable without its header.
#[test]
fn under_never_sync_makes_a_new_segments_header_durable() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            faults: IoFaults {
                fail_sync: true,
                ..IoFaults::default()
            },
            ..cfg(io, FsyncPolicy::Never)
        };
        let (log, _) = EventLog::open(dir.path(), config, &mut NullSink).unwrap();
        let err = log
            .sync()
            .expect_err("sync() must fdatasync the new segment's header");
        assert!(err.to_string().contains("fdatasync"), "{io:?}: {err}");
        // Without the fault it succeeds, and a second sync has nothing left to do.
        let dir = tempfile::tempdir().unwrap();
        let (log, _) =
            EventLog::open(dir.path(), cfg(io, FsyncPolicy::Never), &mut NullSink).unwrap();
        assert_eq!(log.sync().unwrap(), 1);
        assert_eq!(log.sync().unwrap(), 1);
        log.close().unwrap();
    }
}

// ---- D8: sync() under `never` also syncs the directory -------------------------------------

/// `EventLog::sync` "forces everything appended so far to disk" (docs/log-format.md §4): under
/// `never` the segments created since the last directory sync have directory entries that are
/// not durable yet, so it fsyncs the directory too (`kvindex replay import` relies on it).
#[test]
fn under_never_sync_fsyncs_the_directory_after_creating_segments() {
    let spec = ns();
    for io in backends() {
        // The segment created at open.
        let dir = tempfile::tempdir().unwrap();
        let faulty = LogConfig {
            faults: IoFaults {
                fail_dir_sync: true,
                ..IoFaults::default()
            },
            ..cfg(io, FsyncPolicy::Never)
        };
        let (log, _) = EventLog::open(dir.path(), faulty, &mut NullSink).unwrap();
        let err = log.sync().expect_err("sync() must fsync the directory");
        assert!(err.to_string().contains("fsync directory"), "{io:?}: {err}");
        drop(log);

        // Segments created by rolling, after a sync that covered the directory: the first
        // sync after the roll syncs it again.
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(
            dir.path(),
            LogConfig {
                segment_bytes: 1024,
                ..cfg(io, FsyncPolicy::Never)
            },
            &mut NullSink,
        )
        .unwrap();
        log.sync().unwrap();
        let mut gen = gen();
        while log.segments().len() < 3 {
            log.append(&[LogEntry::event(spec.clone(), 1, gen.next_event())])
                .unwrap()
                .wait()
                .unwrap();
        }
        log.sync().unwrap();
        log.close().unwrap();
    }
}

// ---- D4: LSNs never restart below a later segment's name ------------------------------------

/// The second-to-last segment A is damaged at its end (its last record, LSN N-1, has a bit
/// flip) and the last segment B, named N, holds no record (a crash right after the roll).
/// `skip-corrupt` must count LSN N-1 lost and continue at N, into B, never below B's name:
/// otherwise a later snapshot at a position inside B's range sends recovery to B, which would
/// not hold the acknowledged entries after it, and their LSNs would be given out again.
#[test]
fn skip_corrupt_never_restarts_lsns_below_a_later_segments_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut gen = gen();
    small_segments(dir.path(), 40, &mut gen);
    let segs = segment_files(dir.path());
    let (a, b) = (segs[segs.len() - 2].clone(), segs[segs.len() - 1].clone());
    set_len(&b, SEGMENT_HEADER_LEN as u64);
    let (s, e) = *record_spans(&a).last().unwrap();
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[(s + e) / 2] ^= 0x10;
    std::fs::write(&a, bytes).unwrap();
    let n = segment_first_lsn(&b);

    let (log, _, report) = open_collect(dir.path(), RecoveryPolicy::SkipCorrupt).unwrap();
    assert_eq!(report.next_lsn, n, "{report:?}");
    assert_eq!(report.lost_lsns, vec![(n - 1, n - 1)]);
    assert!(report.skipped_anything());
    let mut last = 0;
    while log.next_lsn() < n + 6 {
        last = log
            .append(&[LogEntry::event(
                ns(),
                1000 + log.next_lsn(),
                gen.next_event(),
            )])
            .unwrap()
            .wait()
            .unwrap();
    }
    log.close().unwrap();
    assert_eq!(
        segment_files(dir.path()),
        segs,
        "the entries went into B, no segment was named below it"
    );

    // A snapshot inside B's range: recovery starts at B and finds every entry after it.
    let p = n + 2;
    SnapshotStore::new(dir.path())
        .write(&SnapshotImage {
            next_lsn: p,
            ..Default::default()
        })
        .unwrap();
    let (log, entries, report) = open_collect(dir.path(), RecoveryPolicy::TolerateTail).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(lsns(&entries), (p..=last).collect::<Vec<_>>());
    assert_eq!(log.next_lsn(), last + 1);
    log.close().unwrap();
}

/// LSNs missing at the end of the log, before the name of the last segment (which holds no
/// record): `absolute` and `tolerate-tail` refuse them as missing records, like any gap between
/// segments; `skip-corrupt` counts them lost and continues at that name, even when that last
/// segment is itself removed as a torn creation.
#[test]
fn lsns_missing_before_the_last_segments_name_are_a_gap() {
    for remove_last in [false, true] {
        for policy in [
            RecoveryPolicy::Absolute,
            RecoveryPolicy::TolerateTail,
            RecoveryPolicy::SkipCorrupt,
        ] {
            let dir = tempfile::tempdir().unwrap();
            small_segments(dir.path(), 40, &mut gen());
            let segs = segment_files(dir.path());
            let (a, b) = (segs[segs.len() - 2].clone(), segs[segs.len() - 1].clone());
            let n = segment_first_lsn(&b);
            // A loses its last record whole (no damage left to see), B is only a header (or
            // a torn creation, removed by every policy).
            let (s, _) = *record_spans(&a).last().unwrap();
            set_len(&a, s as u64);
            set_len(
                &b,
                if remove_last {
                    0
                } else {
                    SEGMENT_HEADER_LEN as u64
                },
            );
            let what = format!("{policy}, last segment removed: {remove_last}");
            match open_collect(dir.path(), policy) {
                Err(PersistError::MissingRecords { first, last, .. }) => {
                    assert_ne!(policy, RecoveryPolicy::SkipCorrupt, "{what}");
                    assert_eq!((first, last), (n - 1, n - 1), "{what}");
                }
                Err(e) => panic!("{what}: {e}"),
                Ok((log, entries, report)) => {
                    assert_eq!(policy, RecoveryPolicy::SkipCorrupt, "{what}: {report:?}");
                    assert_eq!(lsns(&entries), (1..n - 1).collect::<Vec<_>>(), "{what}");
                    assert_eq!(report.lost_lsns, vec![(n - 1, n - 1)], "{what}");
                    assert_eq!(log.next_lsn(), n, "{what}");
                    log.append(&[LogEntry::event(ns(), 7, gen().next_event())])
                        .unwrap()
                        .wait()
                        .unwrap();
                    log.close().unwrap();
                    assert_eq!(segment_files(dir.path()).last(), Some(&b), "{what}");
                    let mut sink = CollectingSink::default();
                    read_log(dir.path(), RecoveryPolicy::SkipCorrupt, None, &mut sink).unwrap();
                    assert_eq!(sink.entries.last().map(|e| e.lsn), Some(n), "{what}");
                }
            }
        }
    }
}

// ---- D1: a flipped length bit in the last record is damage, not a torn write ---------------

fn cut_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".cut-"))
        .collect();
    v.sort();
    v
}

/// A log of 6 acknowledged records in one segment; returns it and its last record's span.
fn one_segment(dir: &Path) -> (PathBuf, (usize, usize)) {
    let (log, _) =
        EventLog::open(dir, conf(RecoveryPolicy::Absolute, 1 << 20), &mut NullSink).unwrap();
    let mut gen = gen();
    for i in 0..6u64 {
        let batch: Vec<LogEntry> = (0..1 + i % 3)
            .map(|k| LogEntry::event(ns(), i * 10 + k, gen.next_event()))
            .collect();
        log.append(&batch).unwrap().wait().unwrap();
    }
    log.close().unwrap();
    let seg = segment_files(dir)[0].clone();
    let span = *record_spans(&seg).last().unwrap();
    (seg, span)
}

/// Every single-bit flip of the last record's length that points past the end of the file
/// (so the frame looks incomplete, like a torn write) is recognised by its CRC: `absolute`
/// refuses it, `tolerate-tail` and `skip-corrupt` cut it and save the bytes, `export` and
/// `inspect` report it as damage rather than the end of a crashed log.
#[test]
fn a_flipped_length_bit_in_the_last_record_is_damage_not_a_torn_write() {
    let probe = tempfile::tempdir().unwrap();
    let (_, (start, end)) = one_segment(probe.path());
    let len = (end - start - 8) as u32;
    // The flips that make the frame run past the end of the file (below the record limit).
    let bits: Vec<u32> = (0..26)
        .filter(|b| format::frame_len((len ^ (1 << b)) as usize) > format::frame_len(len as usize))
        .collect();
    assert!(bits.len() > 10, "{bits:?}");
    for bit in bits {
        let flipped = len ^ (1 << bit);
        for policy in [
            RecoveryPolicy::Absolute,
            RecoveryPolicy::TolerateTail,
            RecoveryPolicy::SkipCorrupt,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (seg, _) = one_segment(dir.path());
            let mut bytes = std::fs::read(&seg).unwrap();
            bytes[start..start + 4].copy_from_slice(&flipped.to_le_bytes());
            std::fs::write(&seg, &bytes).unwrap();
            let expected = Damage::LengthBitFlip {
                stored: flipped,
                actual: len,
            };
            let what = format!("{policy}, bit {bit}");
            match open_collect(dir.path(), policy) {
                Err(PersistError::Corrupt { offset, damage, .. }) => {
                    assert_eq!(policy, RecoveryPolicy::Absolute, "{what}");
                    assert_eq!((offset, damage), (start as u64, expected), "{what}");
                    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "{what}: unchanged");
                    assert!(cut_files(dir.path()).is_empty(), "{what}");
                }
                Err(e) => panic!("{what}: {e}"),
                Ok((log, entries, report)) => {
                    log.close().unwrap();
                    assert_ne!(policy, RecoveryPolicy::Absolute, "{what}");
                    assert_eq!(
                        entries.len(),
                        9,
                        "{what}: the last batch (3 entries) is cut"
                    );
                    let cut = &report.truncated[0];
                    assert_eq!((cut.offset, &cut.damage), (start as u64, &expected));
                    assert!(!cut.damage.is_torn_write());
                    let saved = cut.saved_to.as_ref().expect("the cut bytes are saved");
                    assert_eq!(std::fs::read(saved).unwrap(), bytes[start..], "{what}");
                }
            }
            if policy != RecoveryPolicy::Absolute {
                continue;
            }
            // The read-only tools agree.
            let err = tool::export(dir.path(), 1, u64::MAX, None)
                .unwrap()
                .find_map(|r| r.err())
                .unwrap_or_else(|| panic!("{what}: export ended as if at a torn tail"));
            assert!(err.to_string().contains("flipped bit"), "{what}: {err}");
            let report = tool::inspect(dir.path()).unwrap();
            assert!(
                report.findings.iter().any(|f| matches!(
                    f,
                    Finding::Damaged {
                        damage: Damage::LengthBitFlip { .. },
                        at_tail: true,
                        ..
                    }
                )),
                "{what}: {:?}",
                report.findings
            );
        }
    }
}

/// The same flip in a record that others follow is damage inside the log, and skip-corrupt
/// resumes right after the record (its true length), losing only its batch.
#[test]
fn a_flipped_length_bit_inside_the_log_loses_only_that_batch_under_skip_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, _) = one_segment(dir.path());
    let spans = record_spans(&seg);
    let (start, end) = spans[spans.len() - 2];
    let len = (end - start - 8) as u32;
    let mut bytes = std::fs::read(&seg).unwrap();
    // Past the end of the file from this record on.
    let flipped = len ^ (1 << 16);
    assert!(start + format::frame_len(flipped as usize) > bytes.len());
    bytes[start..start + 4].copy_from_slice(&flipped.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    match open_collect(dir.path(), RecoveryPolicy::TolerateTail) {
        Err(PersistError::Corrupt { damage, .. }) => {
            assert!(matches!(damage, Damage::LengthBitFlip { .. }), "{damage:?}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("tolerate-tail cut a record that valid records follow"),
    }
    let (log, entries, report) = open_collect(dir.path(), RecoveryPolicy::SkipCorrupt).unwrap();
    log.close().unwrap();
    // Batches of 1, 2, 3, 1, 2, 3 entries: the fifth (LSNs 8..=9) is lost.
    assert_eq!(report.lost_lsns, vec![(8, 9)], "{report:?}");
    assert_eq!(report.skipped[0].bytes, (end - start) as u64);
    assert_eq!(lsns(&entries), vec![1, 2, 3, 4, 5, 6, 7, 10, 11, 12]);
}

/// A second cut at the offset of an earlier one keeps the earlier `.cut-<offset>` file and
/// saves its bytes under a new name.
#[test]
fn a_second_cut_at_the_same_offset_keeps_the_first_cuts_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, (_, end)) = one_segment(dir.path());
    let mut saved = Vec::new();
    for fill in [0x55u8, 0x66, 0x77] {
        let mut bytes = std::fs::read(&seg).unwrap();
        assert_eq!(bytes.len(), end);
        bytes.extend_from_slice(&[fill; 100]);
        std::fs::write(&seg, &bytes).unwrap();
        let (log, entries, report) =
            open_collect(dir.path(), RecoveryPolicy::TolerateTail).unwrap();
        log.close().unwrap();
        assert_eq!(entries.len(), 12);
        let to = report.truncated[0].saved_to.clone().expect("saved");
        assert_eq!(std::fs::read(&to).unwrap(), vec![fill; 100]);
        saved.push(to);
    }
    let base = format!("{}.cut-{end}", seg.display());
    assert_eq!(
        saved,
        vec![
            PathBuf::from(&base),
            PathBuf::from(format!("{base}.1")),
            PathBuf::from(format!("{base}.2")),
        ]
    );
    for (path, fill) in saved.iter().zip([0x55u8, 0x66, 0x77]) {
        assert_eq!(
            std::fs::read(path).unwrap(),
            vec![fill; 100],
            "{}",
            path.display()
        );
    }
    // They are not segments: the log is clean.
    let (log, _, report) = open_collect(dir.path(), RecoveryPolicy::Absolute).unwrap();
    log.close().unwrap();
    assert!(report.is_clean(), "{report:?}");
}
