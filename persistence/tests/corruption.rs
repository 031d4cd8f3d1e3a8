//! Damage on disk gives the documented outcome (docs/log-format.md §5.2) under each recovery
//! policy, never a panic: truncated tails, bit flips in records, headers and snapshots,
//! missing segments, zero-filled and garbage tails, a full disk and a failing fsync.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::format::{frame_len, SEGMENT_HEADER_LEN};
use kvindex_persistence::tool::{self, Finding};
use kvindex_persistence::*;

const POLICIES: [RecoveryPolicy; 3] = [
    RecoveryPolicy::Absolute,
    RecoveryPolicy::TolerateTail,
    RecoveryPolicy::SkipCorrupt,
];

/// Writes `batches` batches of 1..=3 entries into `dir` with small segments; returns the batches.
fn build_log(dir: &Path, batches: usize, segment_bytes: u64) -> Vec<Vec<LogEntry>> {
    let config = LogConfig {
        segment_bytes,
        ..cfg(IoBackendChoice::Portable, FsyncPolicy::Never)
    };
    let (log, _) = EventLog::open(dir, config, &mut NullSink).unwrap();
    let mut gen = EventGen::new(
        42,
        vec![WorkerWithDpRank::new(1, 0), WorkerWithDpRank::new(2, 0)],
    );
    let mut out = Vec::new();
    for i in 0..batches {
        let b: Vec<LogEntry> = (0..1 + i % 3)
            .map(|k| LogEntry::event(ns(), (i * 10 + k) as u64, gen.next_event()))
            .collect();
        let _ = log.append(&b).unwrap();
        out.push(b);
    }
    log.close().unwrap();
    out
}

/// `(offset, end)` of every record of a segment file.
fn record_spans(path: &Path) -> Vec<(usize, usize)> {
    let r = SegmentReader::open(path).unwrap();
    r.records()
        .map(|x| x.map(|v| (v.offset, v.end)).unwrap())
        .collect()
}

fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn open_with(dir: &Path, policy: RecoveryPolicy) -> Result<(Vec<LoggedEntry>, RecoveryReport)> {
    let mut sink = CollectingSink::default();
    let (log, report) = EventLog::open(dir, cfg_policy(policy), &mut sink)?;
    log.close()?;
    Ok((sink.entries, report))
}

fn flat(batches: &[Vec<LogEntry>]) -> Vec<LogEntry> {
    batches.iter().flatten().cloned().collect()
}

fn dir_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("LOCK"))
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_tail_cut_at_any_byte_of_the_last_record_is_truncated_under_every_policy() {
    let probe = tempfile::tempdir().unwrap();
    let batches = build_log(probe.path(), 6, 1 << 20);
    let seg = segment_files(probe.path())[0].clone();
    let (start, end) = *record_spans(&seg).last().unwrap();
    for policy in POLICIES {
        for cut in (start + 1..end).step_by(3) {
            let dir = tempfile::tempdir().unwrap();
            build_log(dir.path(), 6, 1 << 20);
            let seg = segment_files(dir.path())[0].clone();
            let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(cut as u64).unwrap();
            drop(f);
            let (entries, report) = open_with(dir.path(), policy)
                .unwrap_or_else(|e| panic!("{policy} cut at {cut}: {e}"));
            assert_eq!(
                entries_of(&entries),
                flat(&batches[..5]),
                "{policy} cut {cut}"
            );
            assert_eq!(report.truncated.len(), 1);
            assert_eq!(report.truncated[0].offset, start as u64);
            assert!(report.truncated[0].damage.is_torn_write());
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), start as u64);
            // The log goes on where the cut left it.
            let (log, _) = EventLog::open(dir.path(), cfg_policy(policy), &mut NullSink).unwrap();
            assert_eq!(log.next_lsn(), flat(&batches[..5]).len() as u64 + 1);
            log.append(&batches[5]).unwrap().wait().unwrap();
            log.close().unwrap();
            let (entries, report) = open_with(dir.path(), RecoveryPolicy::Absolute).unwrap();
            assert!(report.is_clean());
            assert_eq!(entries_of(&entries), flat(&batches));
        }
    }
}

#[test]
fn a_segment_cut_inside_its_header_is_removed_under_every_policy() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 30, 1024);
        let segs = segment_files(dir.path());
        let last = segs.last().unwrap();
        // Replace the last segment by a crash-during-creation stub.
        let lost = record_spans(last).len();
        std::fs::write(last, &std::fs::read(last).unwrap()[..10]).unwrap();
        let (entries, report) = open_with(dir.path(), policy).unwrap();
        assert!(report.truncated[0].file_removed);
        let kept: usize = batches.len() - lost;
        assert_eq!(entries_of(&entries), flat(&batches[..kept]));
    }
}

#[test]
fn zero_filled_tail_is_cut_under_every_policy() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 5, 1 << 20);
        let seg = segment_files(dir.path())[0].clone();
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(len + 4096).unwrap();
        drop(f);
        let (entries, report) = open_with(dir.path(), policy).unwrap();
        assert_eq!(entries_of(&entries), flat(&batches));
        assert_eq!(report.truncated[0].damage, Damage::ZeroFilledTail);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    }
}

#[test]
fn bit_flip_in_the_last_record_refuses_under_absolute_and_is_cut_otherwise() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 6, 1 << 20);
        let seg = segment_files(dir.path())[0].clone();
        let (start, end) = *record_spans(&seg).last().unwrap();
        flip(&seg, (start + end) / 2);
        let before = dir_bytes(dir.path());
        match (policy, open_with(dir.path(), policy)) {
            (
                RecoveryPolicy::Absolute,
                Err(PersistError::Corrupt {
                    path,
                    offset,
                    damage,
                    ..
                }),
            ) => {
                assert_eq!(path, seg);
                assert_eq!(offset, start as u64);
                assert!(matches!(damage, Damage::ChecksumMismatch { .. }));
                let msg = open_with(dir.path(), policy).unwrap_err().to_string();
                assert!(msg.contains(&seg.display().to_string()) && msg.contains("skip-corrupt"));
                assert_eq!(dir_bytes(dir.path()), before, "nothing changed on refusal");
            }
            (RecoveryPolicy::Absolute, other) => panic!("absolute: {other:?}"),
            (_, Ok((entries, report))) => {
                assert_eq!(entries_of(&entries), flat(&batches[..5]));
                let cut = &report.truncated[0];
                assert_eq!(cut.offset, start as u64);
                let saved = cut.saved_to.as_ref().expect("cut bytes saved");
                assert_eq!(
                    std::fs::metadata(saved).unwrap().len(),
                    (end - start) as u64
                );
            }
            (p, Err(e)) => panic!("{p}: {e}"),
        }
    }
}

#[test]
fn bit_flip_in_an_earlier_record_refuses_unless_skip_corrupt_which_skips_that_batch() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 8, 1 << 20);
        let seg = segment_files(dir.path())[0].clone();
        let spans = record_spans(&seg);
        let (start, end) = spans[3];
        flip(&seg, start + 12);
        let before = dir_bytes(dir.path());
        let res = open_with(dir.path(), policy);
        match policy {
            RecoveryPolicy::SkipCorrupt => {
                let (entries, report) = res.unwrap();
                let mut want = flat(&batches[..3]);
                want.extend(flat(&batches[4..]));
                assert_eq!(entries_of(&entries), want);
                assert_eq!(report.skipped.len(), 1);
                assert_eq!(report.skipped[0].offset, start as u64);
                assert_eq!(report.skipped[0].bytes, (end - start) as u64);
                let first_lost = flat(&batches[..3]).len() as u64 + 1;
                assert_eq!(
                    report.lost_lsns,
                    vec![(first_lost, first_lost + batches[3].len() as u64 - 1)]
                );
            }
            _ => {
                match res {
                    Err(PersistError::Corrupt { offset, .. }) => assert_eq!(offset, start as u64),
                    other => panic!("{policy}: {other:?}"),
                }
                assert_eq!(dir_bytes(dir.path()), before);
            }
        }
    }
}

#[test]
fn after_a_skip_corrupt_recovery_the_index_snapshots_so_the_default_policy_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 8, 1 << 20);
    let seg = segment_files(dir.path())[0].clone();
    let (start, _) = record_spans(&seg)[2];
    flip(&seg, start + 12);
    let skip = DurableConfig {
        log: cfg_policy(RecoveryPolicy::SkipCorrupt),
        ..DurableConfig::default()
    };
    let (idx, report) = DurableIndex::open(dir.path(), skip, small_engine()).unwrap();
    assert!(report.skipped_anything());
    assert_eq!(
        snapshot_files(dir.path()).len(),
        1,
        "snapshot taken at once"
    );
    idx.close().unwrap();
    let (_idx, report) =
        DurableIndex::open(dir.path(), DurableConfig::default(), small_engine()).unwrap();
    assert!(report.snapshot.is_some());
}

#[test]
fn bit_flip_in_a_middle_segment_header_refuses_unless_skip_corrupt_which_loses_nothing() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 40, 1024);
        let segs = segment_files(dir.path());
        assert!(segs.len() >= 3);
        flip(&segs[1], 3);
        match (policy, open_with(dir.path(), policy)) {
            (RecoveryPolicy::SkipCorrupt, Ok((entries, report))) => {
                // The records after the header are intact and carry their own LSNs.
                assert_eq!(entries_of(&entries), flat(&batches));
                assert_eq!(report.skipped[0].offset, 0);
                assert!(report.lost_lsns.is_empty());
            }
            (RecoveryPolicy::SkipCorrupt, Err(e)) => panic!("{e}"),
            (
                _,
                Err(PersistError::Corrupt {
                    path,
                    offset: 0,
                    damage: Damage::BadHeader(_),
                    ..
                }),
            ) => {
                assert_eq!(path, segs[1]);
            }
            (p, other) => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn a_missing_segment_refuses_unless_skip_corrupt_which_counts_the_lost_lsns() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 40, 1024);
        let segs = segment_files(dir.path());
        let first_of = |p: &Path| SegmentReader::open(p).unwrap().first_lsn().unwrap();
        let (gone_first, next_first) = (first_of(&segs[1]), first_of(&segs[2]));
        std::fs::remove_file(&segs[1]).unwrap();
        match (policy, open_with(dir.path(), policy)) {
            (RecoveryPolicy::SkipCorrupt, Ok((entries, report))) => {
                assert_eq!(report.lost_lsns, vec![(gone_first, next_first - 1)]);
                let all = flat(&batches);
                let mut want = all[..gone_first as usize - 1].to_vec();
                want.extend_from_slice(&all[next_first as usize - 1..]);
                assert_eq!(entries_of(&entries), want);
            }
            (RecoveryPolicy::SkipCorrupt, Err(e)) => panic!("{e}"),
            (_, Err(PersistError::MissingRecords { first, last, .. })) => {
                assert_eq!((first, last), (gone_first, next_first - 1));
            }
            (p, other) => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn garbage_after_the_last_record_refuses_under_absolute_and_is_cut_otherwise() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 4, 1 << 20);
        let seg = segment_files(dir.path())[0].clone();
        let mut b = std::fs::read(&seg).unwrap();
        let valid = b.len();
        b.extend_from_slice(&[0x55; 100]);
        std::fs::write(&seg, b).unwrap();
        match (policy, open_with(dir.path(), policy)) {
            (RecoveryPolicy::Absolute, Err(PersistError::Corrupt { offset, .. })) => {
                assert_eq!(offset, valid as u64)
            }
            (RecoveryPolicy::Absolute, other) => panic!("{other:?}"),
            (_, Ok((entries, _))) => assert_eq!(entries_of(&entries), flat(&batches)),
            (p, Err(e)) => panic!("{p}: {e}"),
        }
    }
}

/// Zero `from..to` of `path`: the hole a crash leaves when a write's pages reach the disk out
/// of order (later pages persisted, earlier ones not).
fn punch_hole(path: &Path, from: usize, to: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[from..to].fill(0);
    std::fs::write(path, b).unwrap();
}

/// The page of the segment a hole is punched into, and the index of the record the hole starts
/// in (the first one ending past the page's start). A whole page, aligned in the file: what a
/// real torn write leaves (recovery requires one, docs/log-format.md §5).
const HOLE: (usize, usize) = (4096, 8192);

fn first_record_hit_by_hole(spans: &[(usize, usize)]) -> usize {
    spans.iter().position(|&(_, end)| end > HOLE.0).unwrap()
}

/// A crash during the last group commit persisted its pages out of order: a zero-filled page
/// in the middle, valid records after it up to the end of the file, all within one group's
/// bytes. That is a torn tail (docs/log-format.md §5): cut at the damaged record, the cut bytes
/// saved and counted like any tail cut, the records after the hole dropped (none was
/// acknowledged), and the log appends on from the record before the hole. It used to be
/// refused as damage inside the log.
#[test]
fn a_hole_in_the_last_group_commit_is_a_torn_tail_cut_by_tolerate_tail_and_skip_corrupt() {
    use metrics_util::debugging::DebuggingRecorder;
    for policy in [RecoveryPolicy::TolerateTail, RecoveryPolicy::SkipCorrupt] {
        let dir = tempfile::tempdir().unwrap();
        let batches = build_log(dir.path(), 100, 1 << 20);
        let seg = segment_files(dir.path())[0].clone();
        let spans = record_spans(&seg);
        let hit = first_record_hit_by_hole(&spans);
        let (cut_at, _) = spans[hit];
        let len = std::fs::metadata(&seg).unwrap().len() as usize;
        assert!(len > HOLE.1 + 1024, "valid records follow the hole");
        punch_hole(&seg, HOLE.0, HOLE.1);
        let damaged = std::fs::read(&seg).unwrap();

        // `inspect` says what recovery will do.
        let found = tool::inspect(dir.path()).unwrap();
        assert!(
            found.findings.iter().any(|f| matches!(
                f,
                Finding::Damaged { offset, bytes, at_tail: true, .. }
                    if *offset == cut_at as u64 && *bytes == (len - cut_at) as u64
            )),
            "{:?}",
            found.findings
        );

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let (entries, report) = metrics::with_local_recorder(&recorder, || {
            open_with(dir.path(), policy)
                .unwrap_or_else(|e| panic!("{policy} refused a torn group commit: {e}"))
        });
        assert_eq!(entries_of(&entries), flat(&batches[..hit]), "{policy}");
        assert_eq!(report.truncated.len(), 1, "{report:?}");
        assert!(report.skipped.is_empty() && report.lost_lsns.is_empty());
        let cut = &report.truncated[0];
        assert_eq!(
            (cut.offset, cut.bytes, cut.file_removed),
            (cut_at as u64, (len - cut_at) as u64, false)
        );
        let saved = cut.saved_to.as_ref().expect("cut bytes saved");
        assert_eq!(*saved, seg.with_extension(format!("kvlog.cut-{cut_at}")));
        assert_eq!(std::fs::read(saved).unwrap(), damaged[cut_at..]);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), cut_at as u64);
        let counter = counter_totals(&snapshotter);
        assert_eq!(
            counter("kvindex_recovery_truncated_bytes_total"),
            (len - cut_at) as u64
        );
        assert_eq!(counter("kvindex_recovery_skipped_regions_total"), 1);

        // Opening again finds a clean log; appending continues after the record before the hole.
        let (again, report) = open_with(dir.path(), policy).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(entries_of(&again), flat(&batches[..hit]));
        let (log, _) = EventLog::open(dir.path(), cfg_policy(policy), &mut NullSink).unwrap();
        let kept = flat(&batches[..hit]).len() as u64;
        assert_eq!(log.next_lsn(), kept + 1);
        let t = log.append(&batches[hit]).unwrap();
        assert_eq!(t.first_lsn(), kept + 1);
        t.wait().unwrap();
        log.close().unwrap();
        let (entries, report) = open_with(dir.path(), RecoveryPolicy::Absolute).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(entries_of(&entries), flat(&batches[..=hit]));
    }
}

/// `absolute` cuts only a torn write with nothing valid after it: the same hole, followed by
/// valid records, is refused like damage inside the log, and nothing on disk changes.
#[test]
fn a_hole_in_the_last_group_commit_refuses_under_absolute() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 100, 1 << 20);
    let seg = segment_files(dir.path())[0].clone();
    let spans = record_spans(&seg);
    let (cut_at, _) = spans[first_record_hit_by_hole(&spans)];
    punch_hole(&seg, HOLE.0, HOLE.1);
    let before = dir_bytes(dir.path());
    match open_with(dir.path(), RecoveryPolicy::Absolute) {
        Err(PersistError::Corrupt {
            path,
            offset,
            damage,
            ..
        }) => {
            assert_eq!((path, offset), (seg, cut_at as u64));
            assert!(!damage.is_torn_write(), "{damage}");
        }
        other => panic!("absolute: {other:?}"),
    }
    assert_eq!(dir_bytes(dir.path()), before, "nothing changed on refusal");
}

/// A bit flip in records of the last group commit (already written, maybe acknowledged),
/// valid records after it: non-zero damage with no zero-filled page is not a torn write, so it
/// is never cut. `tolerate-tail` (and `absolute`) refuse it with nothing changed on disk;
/// `skip-corrupt` skips that batch alone and counts its LSNs lost, keeping the records after it;
/// `inspect` calls it damage inside the log. Before the zero-page rule, `tolerate-tail` and
/// `skip-corrupt` cut it with every record after it.
#[test]
fn a_bit_flip_in_the_last_group_commit_is_not_a_torn_write_and_is_never_cut() {
    let dir = tempfile::tempdir().unwrap();
    let batches = build_log(dir.path(), 100, 1 << 20);
    let seg = segment_files(dir.path())[0].clone();
    let spans = record_spans(&seg);
    let hit = first_record_hit_by_hole(&spans);
    let (start, end) = spans[hit];
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    assert!(
        len - start < LogConfig::default().max_group_bytes,
        "within one group"
    );
    assert!(hit + 10 < spans.len(), "valid records follow the damage");
    // Flip a bit in every 16th byte of the record's payload: garbage, not zeros.
    let mut b = std::fs::read(&seg).unwrap();
    for i in (start + 8..end).step_by(16) {
        b[i] ^= 0x10;
    }
    std::fs::write(&seg, b).unwrap();
    let before = dir_bytes(dir.path());

    let found = tool::inspect(dir.path()).unwrap();
    assert!(
        found.findings.iter().any(|f| matches!(
            f,
            Finding::Damaged { offset, bytes, at_tail: false, .. }
                if *offset == start as u64 && *bytes == (end - start) as u64
        )),
        "{:?}",
        found.findings
    );

    for policy in POLICIES {
        match (policy, open_with(dir.path(), policy)) {
            (RecoveryPolicy::SkipCorrupt, Ok((entries, report))) => {
                assert!(report.truncated.is_empty(), "nothing cut: {report:?}");
                assert_eq!(report.skipped.len(), 1, "{report:?}");
                assert_eq!(
                    (report.skipped[0].offset, report.skipped[0].bytes),
                    (start as u64, (end - start) as u64)
                );
                let mut want = flat(&batches[..hit]);
                want.extend(flat(&batches[hit + 1..]));
                assert_eq!(entries_of(&entries), want);
                let first_lost = flat(&batches[..hit]).len() as u64 + 1;
                assert_eq!(
                    report.lost_lsns,
                    vec![(first_lost, first_lost + batches[hit].len() as u64 - 1)]
                );
                assert!(std::fs::metadata(&seg).unwrap().len() >= len as u64);
            }
            (RecoveryPolicy::SkipCorrupt, Err(e)) => panic!("skip-corrupt: {e}"),
            (
                _,
                Err(PersistError::Corrupt {
                    path,
                    offset,
                    damage,
                    ..
                }),
            ) => {
                assert_eq!((&path, offset), (&seg, start as u64), "{policy}");
                assert!(!damage.is_torn_write(), "{damage}");
                assert_eq!(dir_bytes(dir.path()), before, "{policy}: nothing changed");
            }
            (p, other) => panic!("{p}: {other:?}"),
        }
    }
}

/// The same hole followed by more valid records than one group commit can hold (the default
/// limit, 4 MiB) cannot be a crash during the last write: damage inside the log, refused by
/// `tolerate-tail` (and `absolute`) exactly as before, skipped by `skip-corrupt`.
#[test]
fn a_hole_followed_by_more_than_a_group_commit_of_records_still_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let mut batches = build_log(dir.path(), 100, 64 << 20);
    // Then about 6 MiB of large records, in the same segment.
    let (log, _) = EventLog::open(
        dir.path(),
        cfg(IoBackendChoice::Portable, FsyncPolicy::Never),
        &mut NullSink,
    )
    .unwrap();
    for i in 0..48u64 {
        let blocks: Vec<(u64, u64)> = (0..4096).map(|k| (i << 20 | k, k + 1)).collect();
        let b = vec![LogEntry::event(
            ns(),
            10_000 + i,
            stored(3, 0, 10_000 + i, None, &blocks),
        )];
        let _ = log.append(&b).unwrap();
        batches.push(b);
    }
    log.close().unwrap();
    let segs = segment_files(dir.path());
    assert_eq!(segs.len(), 1);
    let seg = segs[0].clone();
    let spans = record_spans(&seg);
    let hit = first_record_hit_by_hole(&spans);
    let (cut_at, end) = spans[hit];
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    assert!(len - cut_at > LogConfig::default().max_group_bytes + (1 << 20));
    punch_hole(&seg, HOLE.0, HOLE.1);
    let before = dir_bytes(dir.path());
    for policy in POLICIES {
        match (policy, open_with(dir.path(), policy)) {
            (RecoveryPolicy::SkipCorrupt, Ok((entries, report))) => {
                assert!(report.truncated.is_empty(), "{report:?}");
                assert_eq!(report.skipped.len(), 1);
                assert_eq!(report.skipped[0].offset, cut_at as u64);
                let mut want = flat(&batches[..hit]);
                let skipped_to = cut_at + report.skipped[0].bytes as usize;
                assert!(skipped_to >= end);
                let resumed = spans.iter().position(|&(o, _)| o == skipped_to).unwrap();
                want.extend(flat(&batches[resumed..]));
                assert_eq!(entries_of(&entries), want);
            }
            (RecoveryPolicy::SkipCorrupt, Err(e)) => panic!("skip-corrupt: {e}"),
            (_, Err(PersistError::Corrupt { path, offset, .. })) => {
                assert_eq!((&path, offset), (&seg, cut_at as u64), "{policy}");
                assert_eq!(dir_bytes(dir.path()), before, "{policy}: nothing changed");
            }
            (p, other) => panic!("{p}: {other:?}"),
        }
    }
}

fn durable_with_snapshots(dir: &Path) -> Canonical {
    let config = DurableConfig {
        log: LogConfig {
            segment_bytes: 2048,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    };
    let (idx, _) = DurableIndex::open(dir, config, small_engine()).unwrap();
    let mut gen = EventGen::new(
        9,
        vec![WorkerWithDpRank::new(4, 0), WorkerWithDpRank::new(5, 2)],
    );
    for round in 0..3 {
        for i in 0..60 {
            let _ = idx
                .submit(&ns(), round * 100 + i, gen.next_event())
                .unwrap();
        }
        idx.snapshot_now().unwrap();
    }
    for i in 0..20 {
        let _ = idx.submit(&ns(), 1000 + i, gen.next_event()).unwrap();
    }
    let live = engine_canonical(idx.engine(), &ns().key);
    idx.close().unwrap();
    live
}

#[test]
fn bit_flip_in_the_newest_snapshot_falls_back_to_the_older_one_with_nothing_lost() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        let live = durable_with_snapshots(dir.path());
        let snaps = snapshot_files(dir.path());
        assert_eq!(snaps.len(), 2);
        let len = std::fs::metadata(&snaps[1]).unwrap().len() as usize;
        flip(&snaps[1], len / 2);
        let engine = small_engine();
        let config = DurableConfig {
            log: cfg_policy(policy),
            ..DurableConfig::default()
        };
        let (_idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
        assert_eq!(report.snapshots_rejected.len(), 1);
        assert_eq!(report.snapshot.as_ref().unwrap().path, snaps[0]);
        assert_eq!(engine_canonical(&engine, &ns().key), live, "{policy}");
    }
}

/// A snapshot recovery rejected is set aside, so it no longer counts among the snapshots
/// kept: the next snapshots push out neither the valid older one nor the log it needs.
#[test]
fn a_rejected_snapshot_is_set_aside_and_no_longer_counts_as_kept() {
    let dir = tempfile::tempdir().unwrap();
    let live = durable_with_snapshots(dir.path());
    let snaps = snapshot_files(dir.path());
    assert_eq!(snaps.len(), 2);
    let len = std::fs::metadata(&snaps[1]).unwrap().len() as usize;
    flip(&snaps[1], len / 2);
    let config = DurableConfig {
        snapshots: manual_snapshots(2),
        ..DurableConfig::default()
    };
    {
        let (idx, report) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        assert_eq!(report.snapshots_rejected.len(), 1);
        let mut aside = snaps[1].clone().into_os_string();
        aside.push(".rejected");
        assert!(std::path::Path::new(&aside).exists());
        assert_eq!(snapshot_files(dir.path()), vec![snaps[0].clone()]);
        // The next snapshot keeps the valid older one (keep = 2).
        idx.snapshot_now().unwrap();
        let now = snapshot_files(dir.path());
        assert_eq!(now.len(), 2);
        assert_eq!(now[0], snaps[0]);
        idx.close().unwrap();
    }
    // Should the newest be damaged too, the older one still recovers everything.
    let newest = snapshot_files(dir.path())[1].clone();
    let len = std::fs::metadata(&newest).unwrap().len() as usize;
    flip(&newest, len / 2);
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().path, snaps[0]);
    assert_eq!(engine_canonical(&engine, &ns().key), live);
}

/// A snapshot the system cannot read (an I/O error opening or mapping it: EMFILE, ENOMEM,
/// EACCES; nothing about its content) fails the start-up with a typed error, and is neither
/// rejected nor set aside: once the cause is gone, the same start-up uses it.
#[test]
fn a_snapshot_that_cannot_be_read_fails_the_start_up_and_is_not_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let live = durable_with_snapshots(dir.path());
    let snaps = snapshot_files(dir.path());
    assert_eq!(snaps.len(), 2);
    let files = |dir: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = files(dir.path());
    for (op, errno) in [
        ("open", libc::EMFILE),
        ("mmap", libc::ENOMEM),
        ("open", libc::EACCES),
    ] {
        snapshot::test_hooks::fail_loads(Some((op, errno)));
        let res = DurableIndex::open(dir.path(), DurableConfig::default(), small_engine());
        snapshot::test_hooks::fail_loads(None);
        match res.map(|_| ()) {
            Err(PersistError::SnapshotUnreadable {
                path,
                op: failed,
                source,
            }) => {
                assert_eq!(path, snaps[1]);
                assert_eq!(failed, op);
                assert_eq!(source.raw_os_error(), Some(errno));
            }
            other => panic!("{op} {errno}: {other:?}"),
        }
        assert_eq!(
            files(dir.path()),
            before,
            "{op} {errno}: the directory changed"
        );
    }
    let engine = small_engine();
    let (_idx, report) =
        DurableIndex::open(dir.path(), DurableConfig::default(), engine.clone()).unwrap();
    assert!(report.snapshots_rejected.is_empty());
    assert_eq!(report.snapshot.as_ref().unwrap().path, snaps[1]);
    assert_eq!(engine_canonical(&engine, &ns().key), live);
}

#[test]
fn every_snapshot_corrupt_with_a_compacted_log_refuses_unless_skip_corrupt() {
    for policy in POLICIES {
        let dir = tempfile::tempdir().unwrap();
        durable_with_snapshots(dir.path());
        for s in snapshot_files(dir.path()) {
            flip(&s, 5);
        }
        let res = open_with(dir.path(), policy);
        match (policy, res) {
            (RecoveryPolicy::SkipCorrupt, Ok((_, report))) => {
                assert_eq!(report.snapshots_rejected.len(), 2);
                assert_eq!(report.lost_lsns[0].0, 1);
            }
            (RecoveryPolicy::SkipCorrupt, Err(e)) => panic!("{e}"),
            (_, Err(PersistError::MissingRecords { first: 1, .. })) => {}
            (p, other) => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn every_snapshot_corrupt_with_a_complete_log_replays_from_the_first_lsn() {
    let dir = tempfile::tempdir().unwrap();
    let batches = build_log(dir.path(), 10, 1 << 20);
    let engine = small_engine();
    let image = SnapshotImage::capture(&engine, 5, &[]).unwrap();
    let meta = SnapshotStore::new(dir.path()).write(&image).unwrap();
    flip(&meta.path, 20);
    let (entries, report) = open_with(dir.path(), RecoveryPolicy::Absolute).unwrap();
    assert!(report.snapshot.is_none());
    assert_eq!(entries_of(&entries), flat(&batches));
}

#[test]
fn a_bit_flip_anywhere_in_a_snapshot_is_rejected_by_load_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_engine();
    let h = engine.create_namespace(ns().key.clone(), 16).unwrap();
    let mut gen = EventGen::new(1, vec![WorkerWithDpRank::new(1, 0)]);
    for _ in 0..5 {
        h.apply(gen.next_event()).unwrap();
    }
    let image = SnapshotImage::capture(&engine, 6, &[]).unwrap();
    let store = SnapshotStore::new(dir.path());
    let meta = store.write(&image).unwrap();
    let good = std::fs::read(&meta.path).unwrap();
    for i in 0..good.len() {
        let mut b = good.clone();
        b[i] ^= 1 << (i % 8);
        std::fs::write(&meta.path, &b).unwrap();
        match store.load(&meta.path) {
            Err(PersistError::CorruptSnapshot { path, .. }) => assert_eq!(path, meta.path),
            Err(e) => panic!("byte {i}: {e}"),
            Ok(_) => panic!("byte {i}: flipped snapshot accepted"),
        }
    }
    // Truncations too.
    for cut in [0, 10, 63, 64, good.len() - 1] {
        std::fs::write(&meta.path, &good[..cut]).unwrap();
        assert!(store.load(&meta.path).is_err());
    }
}

#[test]
fn a_full_disk_fails_the_append_stops_the_writer_and_restart_keeps_every_acknowledged_batch() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            faults: IoFaults {
                fail_writes_after_bytes: Some(3000),
                ..IoFaults::default()
            },
            ..cfg(io, FsyncPolicy::Always)
        };
        let (log, _) = EventLog::open(dir.path(), config, &mut NullSink).unwrap();
        let mut gen = EventGen::new(77, vec![WorkerWithDpRank::new(1, 0)]);
        let mut acked = Vec::new();
        let mut failed = false;
        for i in 0..200 {
            let e = LogEntry::event(ns(), i, gen.next_event());
            match log.append(std::slice::from_ref(&e)).and_then(|t| t.wait()) {
                Ok(_) => acked.push(e),
                Err(PersistError::WriterFailed { cause }) => {
                    assert!(
                        cause.contains("No space left") || cause.contains("os error 28"),
                        "{cause}"
                    );
                    failed = true;
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(failed, "{io:?}: the simulated disk never filled");
        assert!(log.writer_failure().is_some());
        assert!(matches!(
            log.append(&[LogEntry::event(ns(), 999, gen.next_event())]),
            Err(PersistError::WriterFailed { .. })
        ));
        assert!(log.sync().is_err());
        drop(log);
        let mut sink = CollectingSink::default();
        let (_log, report) =
            EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut sink).unwrap();
        // The writer cut its partial write itself: nothing torn is left.
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(entries_of(&sink.entries), acked, "{io:?}");
    }
}

#[test]
fn a_failing_fsync_fails_the_append_and_stops_the_writer() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) =
                EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut NullSink).unwrap();
            drop(log);
        }
        let config = LogConfig {
            faults: IoFaults {
                fail_writes_after_bytes: None,
                fail_sync: true,
                ..IoFaults::default()
            },
            ..cfg(io, FsyncPolicy::Always)
        };
        let (log, _) = EventLog::open(dir.path(), config, &mut NullSink).unwrap();
        let t = log
            .append(&[LogEntry::event(ns(), 1, stored(1, 0, 1, None, &[(1, 1)]))])
            .unwrap();
        assert!(matches!(t.wait(), Err(PersistError::WriterFailed { .. })));
        drop(log);
        let mut sink = CollectingSink::default();
        let (_log, _) =
            EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut sink).unwrap();
        assert!(sink.entries.is_empty(), "the unacknowledged batch was cut");
    }
}

/// A writer resuming a recovered tail segment makes it durable before counting its records as
/// synced: when that fdatasync fails, opening the log fails with the error (and nothing is
/// acknowledged on the strength of records that may be in the page cache only).
#[test]
fn resuming_a_recovered_tail_syncs_it_first() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, _) =
                EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut NullSink).unwrap();
            log.append(&[LogEntry::event(ns(), 1, stored(1, 0, 1, None, &[(1, 1)]))])
                .unwrap()
                .wait()
                .unwrap();
        }
        let config = LogConfig {
            faults: IoFaults {
                fail_reopen_sync: true,
                ..IoFaults::default()
            },
            ..cfg(io, FsyncPolicy::Always)
        };
        let err = EventLog::open(dir.path(), config, &mut NullSink)
            .err()
            .expect("the tail's sync failed");
        assert!(err.to_string().contains("fdatasync"), "{err}");
        // Without the fault the same log opens and keeps its record.
        let mut sink = CollectingSink::default();
        EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut sink).unwrap();
        assert_eq!(sink.entries.len(), 1);
    }
}

/// A skip-corrupt open that appends nothing leaves an empty segment named for the next LSN;
/// opening again (skipping the same damage) must reuse it, not fail on "file exists", and
/// every entry readable before stays readable.
#[test]
fn skip_corrupt_can_reopen_after_an_open_that_appended_nothing() {
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 8, 1 << 20);
    let seg = segment_files(dir.path())[0].clone();
    let (start, _) = record_spans(&seg)[2];
    flip(&seg, start + 12);
    let (first, report) = open_with(dir.path(), RecoveryPolicy::SkipCorrupt).unwrap();
    assert!(report.skipped_anything(), "{report:?}");
    let (second, _) =
        open_with(dir.path(), RecoveryPolicy::SkipCorrupt).expect("the second skip-corrupt open");
    assert_eq!(first.len(), second.len());
    let (third, _) = open_with(dir.path(), RecoveryPolicy::SkipCorrupt).unwrap();
    assert_eq!(first.len(), third.len());
}

#[test]
fn skipped_damage_is_exported_as_metrics() {
    use metrics_util::debugging::DebuggingRecorder;
    let dir = tempfile::tempdir().unwrap();
    build_log(dir.path(), 8, 1 << 20);
    let seg = segment_files(dir.path())[0].clone();
    let (start, end) = record_spans(&seg)[2];
    flip(&seg, start + 12);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        open_with(dir.path(), RecoveryPolicy::SkipCorrupt).unwrap();
    });
    let counter = counter_totals(&snapshotter);
    assert_eq!(
        counter("kvindex_recovery_skipped_bytes_total"),
        (end - start) as u64
    );
    assert_eq!(counter("kvindex_recovery_skipped_regions_total"), 1);
    assert!(counter("kvindex_recovery_lost_lsns_total") >= 1);
    let _ = frame_len(0) + SEGMENT_HEADER_LEN;
}

/// Two writers of the same snapshot position at once (an explicit snapshot racing the periodic
/// one) each use their own temporary file: neither renames the other's, both succeed, and the
/// snapshot they leave loads.
#[test]
fn concurrent_writes_of_one_position_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_engine();
    let h = engine.create_namespace(ns().key.clone(), 16).unwrap();
    let mut gen = EventGen::new(1, vec![WorkerWithDpRank::new(1, 0)]);
    for _ in 0..50 {
        h.apply(gen.next_event()).unwrap();
    }
    let image = SnapshotImage::capture(&engine, 51, &[]).unwrap();
    let store = SnapshotStore::new(dir.path());
    for _ in 0..20 {
        std::thread::scope(|s| {
            let a = s.spawn(|| store.write(&image));
            let b = s.spawn(|| store.write(&image));
            a.join().unwrap().unwrap();
            b.join().unwrap().unwrap();
        });
    }
    let metas = store.list().unwrap();
    assert_eq!(metas.len(), 1);
    let loaded = store.load(&metas[0].path).unwrap();
    assert_eq!(loaded.next_lsn(), 51);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Files of `dir` named like a snapshot being written.
fn snapshot_temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snap-") && n.ends_with(".tmp"))
        .collect()
}

/// A DurableIndex over `dir` whose snapshot writes fail with `fault`, `policy` deciding when
/// periodic snapshots are due, holding `events` logged events.
fn durable_with_snapshot_fault(
    dir: &Path,
    fault: SnapshotFault,
    policy: SnapshotPolicy,
    events: u64,
) -> DurableIndex {
    let config = DurableConfig {
        log: LogConfig {
            faults: IoFaults {
                snapshot: Some(fault),
                ..IoFaults::default()
            },
            ..cfg(IoBackendChoice::Portable, FsyncPolicy::Always)
        },
        snapshots: policy,
    };
    let (idx, _) = DurableIndex::open(dir, config, small_engine()).unwrap();
    let mut gen = EventGen::new(5, vec![WorkerWithDpRank::new(1, 0)]);
    for i in 0..events {
        idx.submit(&ns(), i + 1, gen.next_event())
            .unwrap()
            .wait()
            .unwrap();
    }
    idx
}

/// A snapshot write that fails — a full disk part-way through the temporary file, its fsync,
/// its rename — deletes its temporary file: each attempt has a name of its own, so partial
/// files would otherwise pile up until the log has no room left.
#[test]
fn a_failed_snapshot_write_leaves_no_temporary_file() {
    for fault in [
        SnapshotFault::WriteAfterBytes(100),
        SnapshotFault::WriteAfterBytes(0),
        SnapshotFault::Sync,
        SnapshotFault::Rename,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let idx = durable_with_snapshot_fault(dir.path(), fault, manual_snapshots(2), 50);
        for _ in 0..3 {
            let e = idx.snapshot_now().unwrap_err();
            assert!(matches!(e, PersistError::Io { .. }), "{fault:?}: {e}");
        }
        assert_eq!(
            snapshot_temps(dir.path()),
            Vec::<String>::new(),
            "{fault:?}"
        );
        assert!(snapshot_files(dir.path()).is_empty(), "{fault:?}");
        assert_eq!(
            idx.snapshot_failures(),
            3,
            "{fault:?}: one count per attempt"
        );
        idx.close().unwrap();
    }
}

/// The temporary file of a snapshot write a crash interrupted (named as the writer names them,
/// `<snapshot>.<pid>-<n>.tmp`) is deleted when the directory is opened.
#[test]
fn a_snapshot_temporary_file_left_by_a_crash_is_deleted_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir
        .path()
        .join("snap-00000000000000000005.kvsnap.4242-7.tmp");
    std::fs::write(&tmp, b"partial").unwrap();
    let (idx, _) =
        DurableIndex::open(dir.path(), DurableConfig::default(), small_engine()).unwrap();
    assert!(!tmp.exists());
    idx.close().unwrap();
}

/// A periodic snapshot that keeps failing (its write: a full disk) stays due and is tried
/// again, but only once the wait set by the previous failure has passed, and that wait doubles
/// (1 s, 2 s, ...) instead of a retry at every 500 ms poll; each attempt is counted once. The
/// instants come from the index itself, so a slow machine only makes the waits longer.
#[test]
fn a_failing_periodic_snapshot_is_retried_with_a_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let policy = SnapshotPolicy {
        every_entries: Some(1),
        every: Some(std::time::Duration::from_secs(600)),
        keep: 2,
    };
    let idx = durable_with_snapshot_fault(dir.path(), SnapshotFault::WriteAfterBytes(0), policy, 1);
    let first = wait_for_retry(&idx, 0);
    assert_eq!(
        first.retry_at - first.failed_at,
        durable::SNAPSHOT_RETRY_FIRST
    );
    let later = wait_for_retry(&idx, first.failed_in_a_row);
    assert!(
        later.failed_at >= first.retry_at,
        "an attempt ended {:?} before the retry time the failure before it set",
        first.retry_at - later.failed_at
    );
    assert!(later.failed_in_a_row > first.failed_in_a_row);
    assert!(later.retry_at - later.failed_at >= 2 * durable::SNAPSHOT_RETRY_FIRST);
    // Counted once per attempt: read while no attempt runs (the next is seconds away).
    let failures = idx.snapshot_failures();
    if idx.snapshot_retry() == Some(later) {
        assert_eq!(failures, u64::from(later.failed_in_a_row));
    }
    assert_eq!(snapshot_temps(dir.path()), Vec::<String>::new());
    idx.close().unwrap();
}

/// The back-off of `idx`'s periodic snapshot once more than `after` attempts in a row have
/// failed (bounded wait).
fn wait_for_retry(idx: &DurableIndex, after: u32) -> SnapshotRetry {
    for _ in 0..3000 {
        if let Some(r) = idx.snapshot_retry().filter(|r| r.failed_in_a_row > after) {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("no snapshot attempt failed after {after} failures in a row");
}

/// Once the log writer has failed (it stays failed until the process restarts), the periodic
/// snapshot, which must sync the log first, stops trying instead of failing every 500 ms.
#[test]
fn periodic_snapshots_stop_once_the_log_writer_has_failed() {
    let dir = tempfile::tempdir().unwrap();
    let policy = SnapshotPolicy {
        every_entries: Some(1),
        every: Some(std::time::Duration::from_millis(100)),
        keep: 2,
    };
    let plain = DurableConfig {
        log: cfg(IoBackendChoice::Portable, FsyncPolicy::Always),
        snapshots: manual_snapshots(2),
    };
    let (idx, _) = DurableIndex::open(dir.path(), plain.clone(), small_engine()).unwrap();
    let mut gen = EventGen::new(6, vec![WorkerWithDpRank::new(1, 0)]);
    idx.submit(&ns(), 1, gen.next_event())
        .unwrap()
        .wait()
        .unwrap();
    idx.close().unwrap();
    // The disk is full: the next append fails and stops the writer.
    let config = DurableConfig {
        log: LogConfig {
            faults: IoFaults {
                fail_writes_after_bytes: Some(0),
                ..IoFaults::default()
            },
            ..plain.log
        },
        snapshots: policy,
    };
    let (idx, _) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    if let Ok(t) = idx.submit(&ns(), 2, gen.next_event()) {
        assert!(t.wait().is_err());
    }
    assert!(idx.log().writer_failure().is_some());
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let attempts = idx.snapshot_failures();
    assert!(attempts <= 1, "{attempts} attempts after the writer failed");
    drop(idx);
}

/// The counters recorded so far, summed over their labels, by name.
fn counter_totals(snapshotter: &metrics_util::debugging::Snapshotter) -> impl Fn(&str) -> u64 {
    let snap = snapshotter.snapshot().into_vec();
    move |name| {
        snap.iter()
            .filter(|(k, ..)| k.key().name() == name)
            .map(|(_, _, _, v)| match v {
                metrics_util::debugging::DebugValue::Counter(c) => *c,
                _ => 0,
            })
            .sum()
    }
}
