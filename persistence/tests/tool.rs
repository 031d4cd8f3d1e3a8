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
