//! `kvindex replay` against the data directory of a live server (docs/log-format.md §7): a
//! segment's tail cut, or a segment compacted away, after the tool listed the directory never
//! crashes the tool; it ends cleanly, starts over from a new listing, or says what happened.

mod common;

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::segment::test_hooks;
use kvindex_persistence::tool::*;
use kvindex_persistence::*;

fn config() -> DurableConfig {
    DurableConfig {
        log: LogConfig {
            segment_bytes: 64 << 10,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    }
}

/// A data dir of at least two segments whose last one is at least 16 KiB (so a cut leaves whole
/// pages of an earlier map past the end of the file); returns the entries in LSN order.
fn data_dir(dir: &Path) -> Vec<LogEntry> {
    let (idx, _) = DurableIndex::open(dir, config(), small_engine()).unwrap();
    let mut gen = EventGen::new(
        41,
        vec![WorkerWithDpRank::new(1, 0), WorkerWithDpRank::new(2, 1)],
    );
    let mut entries = Vec::new();
    for i in 0.. {
        let ev = gen.next_event();
        entries.push(LogEntry::event(ns(), i, ev.clone()));
        idx.submit(&ns(), i, ev).unwrap().wait().unwrap();
        let segs = segment_files(dir);
        let last = std::fs::metadata(segs.last().unwrap()).unwrap().len();
        if segs.len() >= 2 && last >= 16 << 10 {
            break;
        }
    }
    idx.close().unwrap();
    entries
}

/// Run `f` once, on the `nth` listing of a directory (1-based) on this thread.
fn on_listing(nth: u32, f: impl FnOnce(&Path) + 'static) {
    let calls = Rc::new(Cell::new(0u32));
    let mut f = Some(f);
    test_hooks::set_after_listing(Some(Box::new(move |dir: &Path| {
        calls.set(calls.get() + 1);
        if calls.get() == nth {
            if let Some(f) = f.take() {
                f(dir);
            }
        }
    })));
}

/// A snapshot of `dir`'s state taken in a copy of `dir` (the one a live server writing `dir`
/// would take next), to be put into `dir` by a hook; returns the copy and the snapshot's path.
fn snapshot_in_a_copy(dir: &Path) -> (tempfile::TempDir, PathBuf) {
    let copy = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(dir).unwrap() {
        let p = f.unwrap().path();
        std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    let (idx, _) = DurableIndex::open(copy.path(), config(), small_engine()).unwrap();
    let meta = idx.snapshot_now().unwrap();
    idx.close().unwrap();
    (copy, meta.path)
}

fn clear_hook() {
    test_hooks::set_after_listing(None);
}

#[test]
fn export_survives_the_last_segment_cut_after_it_was_listed() {
    let dir = tempfile::tempdir().unwrap();
    let entries = data_dir(dir.path());
    let segs = segment_files(dir.path());
    let last = segs.last().unwrap().clone();
    let last_first_lsn = segment_first_lsn(&last);
    // Cut at the end of the first record ending in the segment's second page: the pages after
    // it are wholly past the new end of the file.
    let (cut, records_kept) = {
        let reader = segment::SegmentReader::open(&last).unwrap();
        let ends: Vec<usize> = reader.records().map(|r| r.unwrap().end).collect();
        let i = ends.iter().position(|&e| e > 4096).unwrap();
        assert!(ends[i] < 8192 && reader.len() > 3 * 4096);
        (ends[i] as u64, i + 1)
    };
    let events = export(dir.path(), 1, u64::MAX, None).unwrap();
    // The live server cuts the tail (recovery after its crash, or a failed write): the walk
    // has listed and opened the segment, and not read it yet.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let got: Vec<_> = events.map(|r| r.unwrap()).collect();
    // A clean end at the cut: every event before the cut segment, and those it kept (one per
    // record).
    assert_eq!(got.len(), (last_first_lsn - 1) as usize + records_kept);
    assert!(got.len() < entries.len());
    let expected: Vec<_> = entries
        .iter()
        .take(got.len())
        .map(|e| match &e.op {
            LogOp::Event(ev) => ev.clone(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(got, expected);
}

#[test]
fn export_from_a_segment_compacted_away_after_the_listing_names_the_first_position_left() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path());
    let segs = segment_files(dir.path());
    let first = segs[0].clone();
    on_listing(1, move |_| std::fs::remove_file(&first).unwrap());
    let res = export(dir.path(), 1, u64::MAX, None);
    clear_hook();
    match res {
        Err(PersistError::Unavailable(msg)) => {
            assert!(msg.contains("no longer in the log"), "{msg}")
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("export of compacted LSNs succeeded"),
    }
}

#[test]
fn inspect_notes_a_segment_compacted_away_after_the_listing_and_reports_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let entries = data_dir(dir.path());
    let segs = segment_files(dir.path());
    let first = segs[0].clone();
    let gone = first.clone();
    on_listing(1, move |_| std::fs::remove_file(&gone).unwrap());
    let r = inspect(dir.path());
    clear_hook();
    let r = r.unwrap();
    assert_eq!(r.compacted_away, vec![first]);
    assert!(r.findings.is_empty(), "{r}");
    assert_eq!(r.lsn_range.unwrap().1, entries.len() as u64);
    assert!(r.to_string().contains("compacted away"), "{r}");
}

#[test]
fn state_starts_over_when_compaction_deletes_a_segment_it_listed() {
    let dir = tempfile::tempdir().unwrap();
    let entries = data_dir(dir.path());
    let want = state(&StateSource::DataDir(dir.path().to_path_buf()), None).unwrap();
    let want_canonical = engine_canonical(&want.engine, &ns().key);
    assert_eq!(want.position, entries.len() as u64);

    // The snapshot the live server is about to write.
    let (_copy, snap) = snapshot_in_a_copy(dir.path());
    let first = segment_files(dir.path())[0].clone();
    // After the reader listed the directory and its snapshots (none yet), the server writes
    // the snapshot and compacts the first segment away.
    on_listing(2, move |d: &Path| {
        std::fs::copy(&snap, d.join(snap.file_name().unwrap())).unwrap();
        std::fs::remove_file(&first).unwrap();
    });
    let got = state(&StateSource::DataDir(dir.path().to_path_buf()), None);
    clear_hook();
    let got = got.unwrap();
    assert_eq!(got.position, entries.len() as u64);
    assert!(got.report.as_ref().unwrap().snapshot.is_some());
    assert_eq!(engine_canonical(&got.engine, &ns().key), want_canonical);
}

/// The descriptors this process holds on files of `dir`.
fn open_files_under(dir: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .count()
}

#[test]
fn export_of_a_long_log_keeps_a_bounded_number_of_segments_open() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DurableConfig {
        log: LogConfig {
            segment_bytes: 4 << 10,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    };
    let (idx, _) = DurableIndex::open(dir.path(), cfg, small_engine()).unwrap();
    let mut gen = EventGen::new(7, vec![WorkerWithDpRank::new(1, 0)]);
    let mut events = Vec::new();
    while segment_files(dir.path()).len() < 60 {
        let ev = gen.next_event();
        let seq = events.len() as u64;
        idx.submit(&ns(), seq, ev.clone()).unwrap().wait().unwrap();
        events.push(ev);
    }
    idx.close().unwrap();
    let dir = std::fs::canonicalize(dir.path()).unwrap();

    let mut walk = export(&dir, 1, u64::MAX, None).unwrap();
    // Every listed segment open at once would be 60 descriptors (a log of thousands of
    // segments would exhaust the process's limit).
    let open = open_files_under(&dir);
    assert!((1..=16).contains(&open), "{open} segment files open");
    let mut got = Vec::new();
    for ev in walk.by_ref() {
        got.push(ev.unwrap());
        assert!(open_files_under(&dir) <= 16);
    }
    assert_eq!(got, events);
}

#[test]
fn a_segment_file_too_large_to_be_ours_is_refused_not_read_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path());
    let last = segment_files(dir.path()).pop().unwrap();
    // A sparse 5 GiB file under a segment's name (no disk space used).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    let err = export(dir.path(), 1, u64::MAX, None)
        .unwrap()
        .find_map(|r| r.err())
        .expect("the oversized segment was read");
    match err {
        PersistError::SegmentTooLarge { path, len, .. } => {
            assert_eq!(path, last);
            assert_eq!(len, 5 << 30);
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn state_starts_over_when_the_snapshots_it_listed_are_pruned_before_it_loads_them() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path());
    // Two snapshots, then more events.
    let (idx, _) = DurableIndex::open(dir.path(), config(), small_engine()).unwrap();
    let mut gen = EventGen::new(43, vec![WorkerWithDpRank::new(3, 0)]);
    let mut listed = Vec::new();
    for round in 0..3u64 {
        for i in 0..20 {
            idx.submit(&ns(), 1000 * round + i, gen.next_event())
                .unwrap()
                .wait()
                .unwrap();
        }
        if round < 2 {
            listed.push(idx.snapshot_now().unwrap().path);
        }
    }
    idx.close().unwrap();
    let want = state(&StateSource::DataDir(dir.path().to_path_buf()), None).unwrap();
    let want_canonical = engine_canonical(&want.engine, &ns().key);

    // The newer snapshot the live server writes meanwhile.
    let (_copy, newest) = snapshot_in_a_copy(dir.path());
    // The log left starts after LSN 1 (compacted): without a snapshot the state is lost.
    assert!(segment_files(dir.path()).len() < 3);
    // After the reader listed the snapshots, the server writes a newer one and prunes both
    // listed ones.
    on_listing(2, move |d: &Path| {
        std::fs::copy(&newest, d.join(newest.file_name().unwrap())).unwrap();
        for s in &listed {
            std::fs::remove_file(s).unwrap();
        }
    });
    let got = state(&StateSource::DataDir(dir.path().to_path_buf()), None);
    clear_hook();
    let got = got.unwrap();
    let report = got.report.as_ref().unwrap();
    assert!(report.snapshots_rejected.is_empty(), "{report:?}");
    assert!(report.snapshot.is_some());
    assert_eq!(got.position, want.position);
    assert_eq!(engine_canonical(&got.engine, &ns().key), want_canonical);
}
