//! Dropped partitions (docs/log-format.md §2.1, §2.3): the drop is logged (`DropNamespace`, in a
//! version-2 segment) and replayed, so a partition created again under the same key starts empty
//! even when no snapshot was taken after the drop.

mod common;

use std::path::Path;

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::format::{BASE_FORMAT_VERSION, FORMAT_VERSION};
use kvindex_persistence::*;

fn segment_version(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    u16::from_le_bytes([bytes[8], bytes[9]])
}

#[test]
fn a_partition_dropped_and_recreated_with_the_same_block_size_holds_only_its_own_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: manual_snapshots(2),
        ..DurableConfig::default()
    };
    let part = ns();
    let live;
    let mut new_entries = Vec::new();
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        let mut old_gen = EventGen::new(5, vec![WorkerWithDpRank::new(1, 0)]);
        for i in 0..40 {
            let _ = idx.submit(&part, i, old_gen.next_event()).unwrap();
        }
        idx.drop_namespace(&part.key).unwrap().wait().unwrap();
        assert!(idx.engine().namespace(&part.key).is_none());
        // Re-created with the same block size, by another worker.
        let mut new_gen = EventGen::new(6, vec![WorkerWithDpRank::new(2, 0)]);
        for i in 0..40 {
            let ev = new_gen.next_event();
            new_entries.push(LogEntry::event(part.clone(), i, ev.clone()));
            idx.submit(&part, i, ev).unwrap().wait().unwrap();
        }
        idx.engine().flush().unwrap();
        live = engine_canonical(idx.engine(), &part.key);
        assert!(!live.is_empty());
        // No snapshot after the drop: as after a crash before it, or a failed snapshot.
        idx.close().unwrap();
    }
    assert!(snapshot_files(dir.path()).is_empty());
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
    assert_eq!(report.entries_replayed, 81);
    assert_eq!(engine_canonical(&engine, &part.key), live);
    assert_eq!(live, model_of(&new_entries).canonical());
    assert!(live.iter().all(|(stream, _, _)| stream.worker_id == 2));
}

#[test]
fn a_drop_goes_into_a_version_2_segment_and_other_segments_stay_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let part = ns();
    let mut gen = EventGen::new(9, vec![WorkerWithDpRank::new(1, 0)]);
    let mut expected = Vec::new();
    {
        let (log, _) = EventLog::open(dir.path(), LogConfig::default(), &mut NullSink).unwrap();
        for i in 0..10 {
            let e = LogEntry::event(part.clone(), i, gen.next_event());
            let _ = log.append(std::slice::from_ref(&e)).unwrap();
            expected.push(e);
        }
        let drop = LogEntry::drop_namespace(part.clone());
        log.append(std::slice::from_ref(&drop))
            .unwrap()
            .wait()
            .unwrap();
        expected.push(drop);
        for i in 10..15 {
            let e = LogEntry::event(part.clone(), i, gen.next_event());
            let _ = log.append(std::slice::from_ref(&e)).unwrap();
            expected.push(e);
        }
        log.close().unwrap();
    }
    let segs = segment_files(dir.path());
    assert_eq!(segs.len(), 2, "{segs:?}");
    assert_eq!(segment_version(&segs[0]), BASE_FORMAT_VERSION);
    assert_eq!(segment_version(&segs[1]), FORMAT_VERSION);
    assert!(segs[1].ends_with(segment::segment_file_name(11)));

    // Read back as written, and the version-2 tail is resumed, not replaced.
    let mut sink = CollectingSink::default();
    let (log, report) = EventLog::open(dir.path(), LogConfig::default(), &mut sink).unwrap();
    assert!(report.is_clean());
    assert_eq!(entries_of(&sink.entries), expected);
    log.append(&[LogEntry::event(part.clone(), 99, gen.next_event())])
        .unwrap()
        .wait()
        .unwrap();
    log.close().unwrap();
    assert_eq!(segment_files(dir.path()), segs);
}

#[test]
fn a_drop_as_the_first_record_of_a_segment_rewrites_its_empty_header_as_version_2() {
    let dir = tempfile::tempdir().unwrap();
    let part = ns();
    {
        let (log, _) = EventLog::open(dir.path(), LogConfig::default(), &mut NullSink).unwrap();
        assert_eq!(
            segment_version(&segment_files(dir.path())[0]),
            BASE_FORMAT_VERSION
        );
        log.append(&[LogEntry::drop_namespace(part.clone())])
            .unwrap()
            .wait()
            .unwrap();
        log.close().unwrap();
    }
    let segs = segment_files(dir.path());
    assert_eq!(segs.len(), 1);
    assert_eq!(segment_version(&segs[0]), FORMAT_VERSION);
    let mut sink = CollectingSink::default();
    let (_log, report) = EventLog::open(dir.path(), LogConfig::default(), &mut sink).unwrap();
    assert!(report.is_clean());
    assert_eq!(
        entries_of(&sink.entries),
        vec![LogEntry::drop_namespace(part)]
    );
}
