//! `kvindex replay` logic: inspect, export, import, state, diff.

mod common;

use std::io::Write;

use common::*;
use kvindex_engine::codec::encode_router_event_json;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::tool::*;
use kvindex_persistence::*;

fn no_auto_snapshots() -> DurableConfig {
    DurableConfig {
        log: LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    }
}

/// A data dir with 300 events of two workers, and the events in order.
fn data_dir(dir: &std::path::Path, snapshot_at: Option<u64>) -> Vec<kvindex_engine::RouterEvent> {
    let (idx, _) = DurableIndex::open(dir, no_auto_snapshots(), small_engine()).unwrap();
    let mut gen = EventGen::new(
        31,
        vec![WorkerWithDpRank::new(1, 0), WorkerWithDpRank::new(2, 1)],
    );
    let mut events = Vec::new();
    for i in 0..300u64 {
        let ev = gen.next_event();
        events.push(ev.clone());
        let _ = idx.submit(&ns(), 1000 + i, ev).unwrap();
        if Some(i + 1) == snapshot_at {
            idx.snapshot_now().unwrap();
        }
    }
    idx.close().unwrap();
    events
}

#[test]
fn inspect_lists_segments_snapshots_streams_and_finds_damage() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), Some(100));
    let r = inspect(dir.path()).unwrap();
    assert!(r.is_clean(), "{r}");
    assert!(r.segments.len() > 1);
    assert_eq!(r.snapshots.len(), 1);
    assert_eq!(r.snapshots[0].next_lsn, 101);
    assert_eq!(r.lsn_range.unwrap().1, 300);
    assert_eq!(r.streams.len(), 2);
    assert_eq!(
        r.streams.iter().map(|s| s.entries).sum::<u64>(),
        r.total_entries
    );
    assert_eq!(
        r.streams.iter().map(|s| s.last_source_seq.unwrap()).max(),
        Some(1299)
    );
    let text = r.to_string();
    assert!(
        text.contains("no damage found") && text.contains("worker 2 dp_rank 1"),
        "{text}"
    );

    // Damage inside a segment and a missing segment are both found.
    let segs = segment_files(dir.path());
    let mut b = std::fs::read(&segs[0]).unwrap();
    b[60] ^= 0xFF;
    std::fs::write(&segs[0], b).unwrap();
    std::fs::remove_file(&segs[1]).unwrap();
    let r = inspect(dir.path()).unwrap();
    assert!(r
        .findings
        .iter()
        .any(|f| matches!(f, Finding::Damaged { path, at_tail: false, .. } if *path == segs[0])));
    assert!(r
        .findings
        .iter()
        .any(|f| matches!(f, Finding::MissingLsns { .. })));
    assert!(r.to_string().contains("skip-corrupt"));
}

#[test]
fn export_yields_router_events_in_lsn_order_filtered_by_range_and_worker() {
    let dir = tempfile::tempdir().unwrap();
    let events = data_dir(dir.path(), None);
    let all: Vec<_> = export(dir.path(), 1, u64::MAX, None)
        .unwrap()
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(all, events);
    let some: Vec<_> = export(dir.path(), 50, 99, Some(2))
        .unwrap()
        .collect::<Result<_>>()
        .unwrap();
    let want: Vec<_> = events[49..99]
        .iter()
        .filter(|e| e.worker_id == 2)
        .cloned()
        .collect();
    assert_eq!(some, want);
    let mut out = Vec::new();
    let n = export_jsonl(dir.path(), 1, 10, None, &mut out).unwrap();
    assert_eq!(n, 10);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(
        text.lines().next().unwrap(),
        encode_router_event_json(&events[0]).unwrap()
    );
}

/// The LSN range a segment's valid records hold.
fn lsns_of(path: &std::path::Path) -> (Lsn, Lsn) {
    let r = SegmentReader::open(path).unwrap();
    let recs: Vec<_> = r.records().map(|x| x.unwrap()).collect();
    let first = recs[0].batch.first_lsn.to_native();
    let last = recs.last().unwrap();
    (
        first,
        last.batch.first_lsn.to_native() + last.batch.entries.len() as u64 - 1,
    )
}

/// Every `export` result of `from..=to`: the events, or the error that ended the walk.
fn export_all(
    dir: &std::path::Path,
    from: Lsn,
    to: Lsn,
) -> Result<Vec<kvindex_engine::RouterEvent>> {
    export(dir, from, to, None)?.collect()
}

/// A segment deleted from the middle of the log: `export` over its LSNs fails with the range
/// missing (as `state` does), instead of returning the rest as if complete; the ranges on either
/// side of the gap still export.
#[test]
fn export_over_a_missing_segment_fails_with_the_missing_range() {
    let dir = tempfile::tempdir().unwrap();
    let events = data_dir(dir.path(), None);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let (gone_first, gone_last) = lsns_of(&segs[1]);
    std::fs::remove_file(&segs[1]).unwrap();
    for (from, to) in [
        (1, u64::MAX),
        (gone_first, gone_last),
        (gone_last, gone_last + 1),
        (gone_first - 1, gone_first),
    ] {
        match export_all(dir.path(), from, to) {
            Err(PersistError::MissingRecords {
                first,
                last,
                next_file,
                ..
            }) => {
                assert_eq!((first, last), (gone_first, gone_last), "{from}..={to}");
                assert!(next_file.contains(segs[2].file_name().unwrap().to_str().unwrap()));
            }
            other => panic!("{from}..={to}: {:?}", other.map(|v| v.len())),
        }
    }
    let e = export_jsonl(dir.path(), 1, u64::MAX, None, &mut std::io::sink()).unwrap_err();
    assert!(e.to_string().contains("missing LSNs"), "{e}");
    // Before and after the gap: complete, so no error.
    let before = export_all(dir.path(), 1, gone_first - 1).unwrap();
    assert_eq!(before, events[..gone_first as usize - 1]);
    let after = export_all(dir.path(), gone_last + 1, u64::MAX).unwrap();
    assert_eq!(after, events[gone_last as usize..]);
}

/// A segment whose records repeat LSNs already read (a copy of an older segment under a later
/// name) is damage: `export` fails naming the file, rather than yield the entries twice.
#[test]
fn export_over_repeated_lsns_fails_as_damage() {
    let dir = tempfile::tempdir().unwrap();
    data_dir(dir.path(), None);
    let segs = segment_files(dir.path());
    let (_, last) = lsns_of(segs.last().unwrap());
    let copy = dir.path().join(format!("seg-{:020}.kvlog", last + 1));
    std::fs::copy(&segs[0], &copy).unwrap();
    match export_all(dir.path(), 1, u64::MAX) {
        Err(PersistError::Corrupt { path, damage, .. }) => {
            assert_eq!(path, copy);
            assert_eq!(
                damage,
                Damage::LsnMismatch {
                    expected: last + 1,
                    found: 1
                }
            );
        }
        other => panic!("{:?}", other.map(|v| v.len())),
    }
    // Up to the end of the real log: complete.
    assert_eq!(
        export_all(dir.path(), 1, last).unwrap().len(),
        last as usize
    );
}

#[test]
fn export_of_compacted_lsns_says_where_the_log_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = DurableIndex::open(dir.path(), no_auto_snapshots(), small_engine()).unwrap();
    let mut gen = EventGen::new(3, vec![WorkerWithDpRank::new(1, 0)]);
    for i in 0..300 {
        let _ = idx.submit(&ns(), i, gen.next_event()).unwrap();
    }
    idx.snapshot_now().unwrap();
    idx.close().unwrap();
    match export(dir.path(), 1, 10, None) {
        Err(PersistError::Unavailable(msg)) => assert!(msg.contains("compacted"), "{msg}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("exported compacted LSNs"),
    }
}

#[test]
fn import_then_export_gives_back_the_same_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let events = data_dir(dir.path(), None);
    let jsonl = dir.path().join("events.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    export_jsonl(dir.path(), 1, u64::MAX, None, &mut f).unwrap();
    f.write_all(b"\n").unwrap();
    drop(f);
    let target = dir.path().join("imported");
    let rep = import(&jsonl, &target, "model-a", "default", 16).unwrap();
    assert_eq!(rep.events, 300);
    assert_eq!((rep.first_lsn, rep.next_lsn), (1, 301));
    let back: Vec<_> = export(&target, 1, u64::MAX, None)
        .unwrap()
        .collect::<Result<_>>()
        .unwrap();
    assert_eq!(back, events);
    // The imported log rebuilds the same index.
    let a = state(&StateSource::DataDir(dir.path().into()), None).unwrap();
    let b = state(&StateSource::DataDir(target.clone()), None).unwrap();
    assert_eq!(
        engine_canonical(&a.engine, &ns().key),
        engine_canonical(&b.engine, &ns().key)
    );
}

#[test]
fn import_names_the_file_and_line_of_a_bad_event() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("bad.jsonl");
    let good = encode_router_event_json(&stored(1, 0, 1, None, &[(1, 1)])).unwrap();
    std::fs::write(&jsonl, format!("{good}\n{{\"worker_id\": -1}}\n")).unwrap();
    match import(&jsonl, dir.path().join("out"), "m", "g", 16) {
        Err(PersistError::BadInput { path, line, reason }) => {
            assert_eq!(path, jsonl);
            assert_eq!(line, 2);
            assert!(reason.contains("RouterEvent"), "{reason}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// An `event_id` at or above 2^63 would be logged as a tagged (JetStream) source sequence and
/// enter the set of logged JetStream sequences: import refuses it, naming the line.
#[test]
fn import_refuses_an_event_id_at_or_above_2_pow_63_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("reserved.jsonl");
    let good = encode_router_event_json(&stored(1, 0, (1 << 63) - 1, None, &[(1, 1)])).unwrap();
    let reserved = encode_router_event_json(&stored(1, 0, 1 << 63, Some(1), &[(2, 2)])).unwrap();
    std::fs::write(&jsonl, format!("{good}\n\n{reserved}\n")).unwrap();
    match import(&jsonl, dir.path().join("out"), "m", "g", 16) {
        Err(PersistError::BadInput { path, line, reason }) => {
            assert_eq!(path, jsonl);
            assert_eq!(line, 3);
            assert!(
                reason.contains("event_id 9223372036854775808 is reserved"),
                "{reason}"
            );
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

/// `n` JSON lines: stores of one block each by worker 1, event ids 1..=n.
fn good_lines(n: u64) -> String {
    (1..=n)
        .map(|i| {
            let ev = stored(1, 0, i, None, &[(i, 1000 + i)]);
            encode_router_event_json(&ev).unwrap() + "\n"
        })
        .collect()
}

/// Every file under `dir` (relative name) with its bytes; `None` when `dir` does not exist.
fn contents(dir: &std::path::Path) -> Option<std::collections::BTreeMap<String, Vec<u8>>> {
    if !dir.exists() {
        return None;
    }
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    Some(out)
}

/// Import is all or nothing with respect to its input: a refused line far past the first
/// batches (256 events each) leaves the target as it was, whether it is new (not even created)
/// or holds an earlier import (every file byte for byte the same), for each kind of refusal.
#[test]
fn import_of_a_file_with_a_refused_line_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reserved = encode_router_event_json(&stored(1, 0, 1 << 63, None, &[(9, 9)])).unwrap();
    let cases = [
        ("{\"worker_id\": -1}", "RouterEvent"),
        (reserved.as_str(), "is reserved"),
    ];
    // An existing target: 300 events imported before.
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, good_lines(300)).unwrap();
    let existing = dir.path().join("existing");
    let rep = import(&first, &existing, "m", "g", 16).unwrap();
    assert_eq!((rep.events, rep.next_lsn), (300, 301));
    let before = contents(&existing).unwrap();
    for (i, (bad, why)) in cases.iter().enumerate() {
        // Lines 1..=600 good (two full batches and more), line 601 refused, one more after it.
        let jsonl = dir.path().join(format!("bad-{i}.jsonl"));
        std::fs::write(
            &jsonl,
            format!("{}{bad}\n{}", good_lines(600), good_lines(1)),
        )
        .unwrap();
        let fresh = dir.path().join(format!("fresh-{i}"));
        for target in [&fresh, &existing] {
            match import(&jsonl, target, "m", "g", 16) {
                Err(PersistError::BadInput { path, line, reason }) => {
                    assert_eq!((path, line), (jsonl.clone(), 601));
                    assert!(reason.contains(why), "{reason}");
                }
                other => panic!("{:?}", other.map(|_| ())),
            }
        }
        assert_eq!(contents(&fresh), None, "the new target was created");
        assert!(
            contents(&existing) == Some(before.clone()),
            "the target changed"
        );
    }
    // The existing target still reads as the first import alone.
    let r = inspect(&existing).unwrap();
    assert!(r.is_clean(), "{r}");
    assert_eq!(r.lsn_range.unwrap().1, 300);
}

/// Import reads its input twice, so it takes a regular file only; a FIFO (which it does not
/// even open: that would wait for a writer) or a directory is refused before the target exists.
#[test]
fn import_refuses_an_input_it_cannot_read_twice() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("events.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let target = dir.path().join("out");
    for input in [&fifo, &dir.path().to_path_buf()] {
        match import(input, &target, "m", "g", 16) {
            Err(e @ PersistError::NotAFile { .. }) => {
                assert!(e.to_string().contains("not a regular file"), "{e}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
    assert!(!target.exists());
}

#[test]
fn state_at_an_lsn_equals_the_model_fed_that_prefix_from_a_data_dir_or_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let events = data_dir(dir.path(), None);
    // Same events, with a snapshot at LSN 100 (and the log before it compacted away).
    let snapped = tempfile::tempdir().unwrap();
    assert_eq!(data_dir(snapped.path(), Some(100)), events);
    let jsonl = dir.path().join("events.jsonl");
    let mut f = std::fs::File::create(&jsonl).unwrap();
    export_jsonl(dir.path(), 1, u64::MAX, None, &mut f).unwrap();
    drop(f);
    for at in [0u64, 50, 100, 101, 250, 300] {
        let mut model = Model::default();
        for e in &events[..at as usize] {
            model.apply(e);
        }
        let from_dir = state(&StateSource::DataDir(dir.path().into()), Some(at)).unwrap();
        assert_eq!(from_dir.position, at);
        assert_eq!(
            engine_canonical(&from_dir.engine, &ns().key),
            model.canonical(),
            "data dir at {at}"
        );
        if at >= 100 {
            let from_snap = state(&StateSource::DataDir(snapped.path().into()), Some(at)).unwrap();
            assert_eq!(
                from_snap
                    .report
                    .as_ref()
                    .unwrap()
                    .snapshot
                    .as_ref()
                    .unwrap()
                    .next_lsn,
                101
            );
            assert_eq!(
                engine_canonical(&from_snap.engine, &ns().key),
                model.canonical(),
                "snapshot + log at {at}"
            );
        }
        let src = StateSource::JsonLines {
            path: jsonl.clone(),
            namespace: (*ns()).clone(),
        };
        let from_jsonl = state(&src, Some(at)).unwrap();
        assert_eq!(from_jsonl.position, at);
        assert_eq!(
            engine_canonical(&from_jsonl.engine, &ns().key),
            model.canonical(),
            "jsonl at {at}"
        );
    }
}

#[test]
fn state_older_than_the_compacted_log_is_refused_with_the_earliest_available_position() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: SnapshotPolicy {
            keep: 1,
            ..no_auto_snapshots().snapshots
        },
        ..no_auto_snapshots()
    };
    let (idx, _) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    let mut gen = EventGen::new(3, vec![WorkerWithDpRank::new(1, 0)]);
    for i in 0..300 {
        let _ = idx.submit(&ns(), i, gen.next_event()).unwrap();
    }
    idx.snapshot_now().unwrap();
    idx.close().unwrap();
    match state(&StateSource::DataDir(dir.path().into()), Some(5)) {
        Err(PersistError::Unavailable(msg)) => assert!(
            msg.contains("earliest state available is at LSN 300"),
            "{msg}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("rebuilt a compacted state"),
    }
}

#[test]
fn diff_reports_which_stream_gained_and_lost_which_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ns();
    {
        let (idx, _) = DurableIndex::open(dir.path(), no_auto_snapshots(), small_engine()).unwrap();
        let _ = idx
            .submit(&spec, 1, stored(1, 0, 1, None, &[(100, 7), (101, 8)]))
            .unwrap();
        let _ = idx
            .submit(&spec, 1, stored(2, 0, 1, None, &[(200, 7)]))
            .unwrap();
        let _ = idx.submit(&spec, 2, removed(1, 0, 2, &[101])).unwrap();
        let _ = idx
            .submit(&spec, 2, stored(2, 0, 2, Some(200), &[(201, 9)]))
            .unwrap();
        idx.close().unwrap();
    }
    let src = StateSource::DataDir(dir.path().into());
    let d = diff(&src, 2, 4).unwrap();
    assert_eq!(
        d,
        vec![
            StreamDiff {
                namespace: spec.key.clone(),
                stream: WorkerWithDpRank::new(1, 0),
                gained: vec![],
                lost: vec![BlockRef {
                    path: vec![7, 8],
                    ext: 101
                }],
            },
            StreamDiff {
                namespace: spec.key.clone(),
                stream: WorkerWithDpRank::new(2, 0),
                gained: vec![BlockRef {
                    path: vec![7, 9],
                    ext: 201
                }],
                lost: vec![],
            },
        ]
    );
    assert!(diff(&src, 4, 4).unwrap().is_empty());
}
