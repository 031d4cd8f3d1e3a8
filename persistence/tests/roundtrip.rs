//! Round trips: log → replay → index equals the live index; snapshot → load → equal index;
//! segment rolling, compaction, watermarks, group commit, both write paths, every fsync policy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::*;

fn streams() -> Vec<WorkerWithDpRank> {
    vec![
        WorkerWithDpRank::new(1, 0),
        WorkerWithDpRank::new(1, 1),
        WorkerWithDpRank::new(2, 0),
        WorkerWithDpRank::new(3, 0),
    ]
}

fn policies() -> Vec<FsyncPolicy> {
    vec![
        FsyncPolicy::Always,
        FsyncPolicy::Interval(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ]
}

#[test]
fn appended_batches_are_replayed_in_lsn_order_after_reopen_with_every_backend_and_policy() {
    for io in backends() {
        for fsync in policies() {
            let dir = tempfile::tempdir().unwrap();
            let ns = ns();
            let mut gen = EventGen::new(7, streams());
            let mut expected = Vec::new();
            {
                let (log, report) =
                    EventLog::open(dir.path(), cfg(io, fsync), &mut NullSink).unwrap();
                assert!(report.is_clean());
                assert_eq!(report.next_lsn, FIRST_LSN);
                assert_eq!(
                    log.io_backend(),
                    match io {
                        IoBackendChoice::IoUring => IoBackendKind::IoUring,
                        _ => IoBackendKind::Portable,
                    }
                );
                for i in 0..50u64 {
                    let batch: Vec<LogEntry> = (0..1 + i % 3)
                        .map(|k| LogEntry::event(ns.clone(), i * 10 + k, gen.next_event()))
                        .collect();
                    let t = log.append(&batch).unwrap();
                    assert_eq!(t.first_lsn(), expected.len() as u64 + 1);
                    assert_eq!(t.wait().unwrap(), t.last_lsn());
                    expected.extend(batch);
                }
                log.close().unwrap();
            }
            let mut sink = CollectingSink::default();
            let (log, report) = EventLog::open(dir.path(), cfg(io, fsync), &mut sink).unwrap();
            assert!(report.is_clean(), "{io:?} {fsync}: {report:?}");
            assert_eq!(report.entries_replayed, expected.len() as u64);
            assert_eq!(log.next_lsn(), expected.len() as u64 + 1);
            let lsns: Vec<_> = sink.entries.iter().map(|e| e.lsn).collect();
            assert_eq!(lsns, (1..=expected.len() as u64).collect::<Vec<_>>());
            assert_eq!(entries_of(&sink.entries), expected, "{io:?} {fsync}");
        }
    }
}

#[test]
fn every_field_of_a_router_event_survives_the_log() {
    use kvindex_engine::{BlockExtraInfo, BlockMmObjectInfo, ResidencyDomain, StorageTier};
    let dir = tempfile::tempdir().unwrap();
    let mut ev = stored(9, 3, 77, Some(5), &[(10, 20), (11, 21)]);
    ev.storage_tier = StorageTier::HostPinned;
    ev.residency_domain = Some(ResidencyDomain::Unknown("elsewhere".into()));
    if let kvindex_engine::KvCacheEventData::Stored(s) = &mut ev.event.data {
        s.start_position = Some(128);
        s.blocks[1].mm_extra_info = Some(BlockExtraInfo {
            mm_objects: vec![BlockMmObjectInfo {
                mm_hash: 0xABCD,
                offsets: vec![(1, 5), (7, 9)],
            }],
        });
    }
    let mut ev2 = removed(9, 3, 78, &[u64::MAX, 0]);
    ev2.residency_domain = Some(ResidencyDomain::Invalid);
    let entries = vec![
        LogEntry::event(ns(), 1, ev),
        LogEntry::event(ns_b(), 2, ev2),
        LogEntry::event(ns(), 3, cleared(9, 3, 79)),
        LogEntry::control(ns(), 9, 0, LogOp::RemoveWorker),
        LogEntry::control(ns(), 9, 3, LogOp::RemoveWorkerDpRank),
        LogEntry::control(ns_b(), 9, 0, LogOp::ClearAllBlocks),
    ];
    {
        let (log, _) = EventLog::open(dir.path(), LogConfig::default(), &mut NullSink).unwrap();
        log.append(&entries).unwrap().wait().unwrap();
    }
    let mut sink = CollectingSink::default();
    let (_log, _) = EventLog::open(dir.path(), LogConfig::default(), &mut sink).unwrap();
    assert_eq!(entries_of(&sink.entries), entries);
}

#[test]
fn concurrent_appenders_get_dense_lsns_and_group_commit_acknowledges_all() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) =
            EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut NullSink).unwrap();
        let log = Arc::new(log);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let mut gen = EventGen::new(100 + t, vec![WorkerWithDpRank::new(t, 0)]);
                    let mut got = Vec::new();
                    for i in 0..40 {
                        let e = LogEntry::event(ns(), i, gen.next_event());
                        let ticket = log.append(std::slice::from_ref(&e)).unwrap();
                        ticket.wait().unwrap();
                        got.push((ticket.first_lsn(), e));
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<_> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_by_key(|(l, _)| *l);
        assert_eq!(
            all.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            (1..=160).collect::<Vec<_>>()
        );
        assert_eq!(log.synced_lsn(), 161);
        drop(log);
        let mut sink = CollectingSink::default();
        let (_log, _) =
            EventLog::open(dir.path(), cfg(io, FsyncPolicy::Always), &mut sink).unwrap();
        let replayed: Vec<_> = sink.entries.into_iter().map(|e| (e.lsn, e.entry)).collect();
        assert_eq!(replayed, all);
    }
}

#[test]
fn segments_roll_at_the_size_limit_and_replay_across_them() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes: 4096,
            ..cfg(io, FsyncPolicy::Never)
        };
        let mut gen = EventGen::new(3, streams());
        let mut expected = Vec::new();
        {
            let (log, _) = EventLog::open(dir.path(), config.clone(), &mut NullSink).unwrap();
            for i in 0..300 {
                let e = LogEntry::event(ns(), i, gen.next_event());
                let _ = log.append(std::slice::from_ref(&e)).unwrap();
                expected.push(e);
            }
            log.sync().unwrap();
            assert!(log.segments().len() > 3, "{:?}", log.segments());
        }
        let files = segment_files(dir.path());
        assert!(files.len() > 3);
        for f in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 4096 + 2048);
        }
        let mut sink = CollectingSink::default();
        let (_log, report) = EventLog::open(dir.path(), config, &mut sink).unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.segments_scanned, files.len());
        assert_eq!(entries_of(&sink.entries), expected);
    }
}

#[test]
fn replaying_the_log_rebuilds_an_index_equal_to_the_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: manual_snapshots(2),
        ..DurableConfig::default()
    };
    let (a, b) = (ns(), ns_b());
    let live_a;
    let live_b;
    let mut all = Vec::new();
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        let mut gen = EventGen::new(11, streams());
        for i in 0..400 {
            let spec = if i % 3 == 0 { &b } else { &a };
            let ev = gen.next_event();
            all.push((spec.clone(), ev.clone()));
            let _ = idx.submit(spec, i, ev).unwrap();
        }
        let t = idx.remove_worker_dp_rank(&a, 1, 1).unwrap();
        t.wait().unwrap();
        live_a = engine_canonical(idx.engine(), &a.key);
        live_b = engine_canonical(idx.engine(), &b.key);
        assert!(!live_a.is_empty() && !live_b.is_empty());
        idx.close().unwrap();
    }
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
    assert_eq!(report.entries_replayed, 401);
    assert_eq!(engine_canonical(&engine, &a.key), live_a);
    assert_eq!(engine_canonical(&engine, &b.key), live_b);
    // And both equal the reference model fed the same entries.
    let mut ma = Model::default();
    let mut mb = Model::default();
    for (spec, ev) in &all {
        if spec.key == a.key {
            ma.apply(ev)
        } else {
            mb.apply(ev)
        }
    }
    ma.apply_op(&LogEntry::control(
        a.clone(),
        1,
        1,
        LogOp::RemoveWorkerDpRank,
    ));
    assert_eq!(ma.canonical(), live_a);
    assert_eq!(mb.canonical(), live_b);
}

/// A partition dropped and created again with another block size (the service's
/// `/unregister` then a new registration) replays: the first entry of the new size stands
/// for the drop, which the log does not record. Recovery refused to start before.
#[test]
fn a_partition_recreated_with_another_block_size_replays() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: manual_snapshots(2),
        ..DurableConfig::default()
    };
    let old = ns();
    let new = Arc::new(NamespaceSpec::new(
        old.key.model_name.clone(),
        old.key.routing_group.clone(),
        old.block_size * 2,
    ));
    let live;
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        let mut gen = EventGen::new(5, streams());
        for i in 0..50 {
            let _ = idx.submit(&old, i, gen.next_event()).unwrap();
        }
        idx.engine().remove_namespace(&old.key).unwrap();
        for i in 50..100 {
            let _ = idx.submit(&new, i, gen.next_event()).unwrap();
        }
        idx.engine().flush().unwrap();
        live = engine_canonical(idx.engine(), &new.key);
        assert!(!live.is_empty());
        idx.close().unwrap();
    }
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
    assert_eq!(report.entries_replayed, 100);
    let ns = engine.namespace(&new.key).expect("the partition");
    assert_eq!(ns.block_size(), new.block_size);
    assert_eq!(engine_canonical(&engine, &new.key), live);
}

#[test]
fn snapshot_write_then_load_restores_an_equal_index() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_engine();
    let ns_handle = engine.create_namespace(ns().key.clone(), 16).unwrap();
    let mut gen = EventGen::new(5, streams());
    for _ in 0..500 {
        ns_handle.apply(gen.next_event()).unwrap();
    }
    let live = engine_canonical(&engine, &ns().key);
    let wm = vec![StreamWatermark {
        stream: StreamKey {
            namespace: ns().key.clone(),
            worker_id: 1,
            dp_rank: 1,
        },
        source_seq: 99,
        lsn: 42,
    }];
    let image = SnapshotImage::capture(&engine, 501, &wm).unwrap();
    let store = SnapshotStore::new(dir.path());
    let meta = store.write(&image).unwrap();
    assert_eq!(meta.next_lsn, 501);
    let loaded = store.load(&meta.path).unwrap();
    assert_eq!(loaded.next_lsn(), 501);
    let archived = loaded.image().unwrap();
    assert_eq!(archived.watermarks(), wm);
    let fresh = small_engine();
    archived.restore_into(&fresh).unwrap();
    assert_eq!(engine_canonical(&fresh, &ns().key), live);
    let original = engine.namespace(&ns().key).unwrap().snapshot().unwrap();
    let restored = fresh.namespace(&ns().key).unwrap().snapshot().unwrap();
    assert_eq!(original.pairs(), restored.pairs());
}

#[test]
fn recovery_starts_from_the_snapshot_and_replays_only_the_tail_and_compaction_deletes_covered_segments(
) {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        log: LogConfig {
            segment_bytes: 2048,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    };
    let spec = ns();
    let live;
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        let mut gen = EventGen::new(21, streams());
        for i in 0..200 {
            let _ = idx.submit(&spec, i, gen.next_event()).unwrap();
        }
        let s1 = idx.snapshot_now().unwrap();
        assert_eq!(s1.next_lsn, 201);
        for i in 200..300 {
            let _ = idx.submit(&spec, i, gen.next_event()).unwrap();
        }
        idx.log().sync().unwrap();
        let segs_before = segment_files(dir.path()).len();
        let s2 = idx.snapshot_now().unwrap();
        assert_eq!(s2.next_lsn, 301);
        // Compaction follows the oldest kept snapshot (201): segments wholly below it go.
        let segs_after = segment_files(dir.path()).len();
        assert!(segs_after < segs_before, "{segs_before} -> {segs_after}");
        // Every remaining segment but the active one still holds LSNs >= 201.
        let segs = idx.log().segments();
        for w in segs.windows(2) {
            assert!(w[1].0 > 201, "{segs:?}");
        }
        for i in 300..350 {
            let _ = idx.submit(&spec, i, gen.next_event()).unwrap();
        }
        idx.snapshot_now().unwrap();
        assert_eq!(snapshot_files(dir.path()).len(), 2, "keep = 2");
        for i in 350..380 {
            let _ = idx.submit(&spec, i, gen.next_event()).unwrap();
        }
        live = engine_canonical(idx.engine(), &spec.key);
        idx.close().unwrap();
    }
    let engine = small_engine();
    let (idx, report) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().next_lsn, 351);
    assert_eq!(report.entries_replayed, 30);
    assert_eq!(engine_canonical(&engine, &spec.key), live);
    assert_eq!(idx.log().next_lsn(), 381);
}

#[test]
fn watermarks_name_the_last_source_sequence_per_stream_and_survive_restart_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ns();
    let config = DurableConfig {
        snapshots: manual_snapshots(1),
        ..DurableConfig::default()
    };
    let wm_of = |wms: &[StreamWatermark], w: u64, dp: u32| {
        wms.iter()
            .find(|x| x.stream.worker_id == w && x.stream.dp_rank == dp)
            .map(|x| x.source_seq)
    };
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        let _ = idx
            .submit(&spec, 10, stored(1, 0, 1, None, &[(1, 1)]))
            .unwrap();
        let _ = idx
            .submit(&spec, 11, stored(1, 0, 2, Some(1), &[(2, 2)]))
            .unwrap();
        let _ = idx
            .submit(&spec, 500, stored(2, 3, 1, None, &[(3, 1)]))
            .unwrap();
        idx.remove_worker(&spec, 1).unwrap().wait().unwrap();
        let wms = idx.watermarks();
        assert_eq!(
            wm_of(&wms, 1, 0),
            Some(11),
            "control ops do not move watermarks"
        );
        assert_eq!(wm_of(&wms, 2, 3), Some(500));
        idx.snapshot_now().unwrap();
        idx.submit(&spec, 501, stored(2, 3, 2, Some(3), &[(4, 2)]))
            .unwrap()
            .wait()
            .unwrap();
        idx.close().unwrap();
    }
    let (idx, _) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    let wms = idx.watermarks();
    assert_eq!(wm_of(&wms, 1, 0), Some(11));
    assert_eq!(wm_of(&wms, 2, 3), Some(501));
}

#[test]
fn a_second_open_of_a_locked_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, _) = EventLog::open(dir.path(), LogConfig::default(), &mut NullSink).unwrap();
    match EventLog::open(dir.path(), LogConfig::default(), &mut NullSink) {
        Err(PersistError::Locked { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("second open succeeded"),
    }
}

#[test]
fn periodic_snapshots_are_taken_by_entry_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: SnapshotPolicy {
            every_entries: Some(50),
            every: None,
            keep: 2,
        },
        ..DurableConfig::default()
    };
    let (idx, _) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    let mut gen = EventGen::new(8, streams());
    for i in 0..120 {
        let _ = idx.submit(&ns(), i, gen.next_event()).unwrap();
    }
    // The snapshot thread reacts to the nudge; wait for it (bounded).
    for _ in 0..200 {
        if !snapshot_files(dir.path()).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!snapshot_files(dir.path()).is_empty());
}

#[test]
fn policies_parse_from_and_print_as_their_command_line_spelling() {
    for s in ["always", "never", "interval:250"] {
        assert_eq!(s.parse::<FsyncPolicy>().unwrap().to_string(), s);
    }
    assert!("interval:0".parse::<FsyncPolicy>().is_err());
    assert!("sometimes".parse::<FsyncPolicy>().is_err());
    for s in ["absolute", "tolerate-tail", "skip-corrupt"] {
        assert_eq!(s.parse::<RecoveryPolicy>().unwrap().to_string(), s);
    }
    assert!("lenient".parse::<RecoveryPolicy>().is_err());
}

#[test]
fn interval_policy_acknowledges_on_write_and_syncs_within_the_interval_when_idle() {
    for io in backends() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = EventLog::open(
            dir.path(),
            cfg(io, FsyncPolicy::Interval(Duration::from_millis(20))),
            &mut NullSink,
        )
        .unwrap();
        let t = log
            .append(&[LogEntry::event(ns(), 5, stored(1, 0, 1, None, &[(1, 1)]))])
            .unwrap();
        assert_eq!(t.wait().unwrap(), 1);
        // No further appends: the writer's timer must sync on its own (bounded wait).
        let mut synced = false;
        for _ in 0..500 {
            if log.synced_lsn() == 2 {
                synced = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(synced, "{io:?}: never synced");
        let wms = log.durable_watermarks();
        assert_eq!(wms.len(), 1);
        assert_eq!((wms[0].source_seq, wms[0].lsn), (5, 1));
    }
}

/// The exact set of durable tagged source sequences (docs/log-format.md §6) is rebuilt at
/// recovery from the snapshot (which carries it: the log before the snapshot is compacted)
/// plus the log after it; gaps stay gaps, other groups stay apart, pruning is carried over.
#[test]
fn tagged_source_sequences_survive_snapshot_compaction_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: manual_snapshots(1),
        ..DurableConfig::default()
    };
    let spec = ns();
    let seq = |g: u16, s: u64| tagged_source_seq(g, s).unwrap();
    let ev = |id: u64| stored(1, 0, id, None, &[(id, id)]);
    {
        let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
        // Before the snapshot: 1..=3 and 5 of group 1 (4 never logged), 9 of group 2.
        for (i, s) in [seq(1, 1), seq(1, 2), seq(1, 3), seq(1, 5), seq(2, 9)]
            .into_iter()
            .enumerate()
        {
            idx.submit(&spec, s, ev(i as u64)).unwrap().wait().unwrap();
        }
        assert_eq!(idx.prune_tagged_seqs(1, 1), 2, "{{2,3}} and {{5}} left");
        idx.snapshot_now().unwrap();
        // After the snapshot: 6 of group 1, and an untagged sequence.
        idx.submit(&spec, seq(1, 6), ev(10))
            .unwrap()
            .wait()
            .unwrap();
        idx.submit(&spec, 7, ev(11)).unwrap().wait().unwrap();
        idx.close().unwrap();
    }
    let (idx, report) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    assert!(report.snapshot.is_some(), "recovered from the snapshot");
    for s in [2, 3, 5, 6] {
        assert!(idx.tagged_seq_durable(seq(1, s)), "group 1 seq {s}");
    }
    assert!(
        !idx.tagged_seq_durable(seq(1, 1)),
        "pruned before the snapshot"
    );
    assert!(!idx.tagged_seq_durable(seq(1, 4)), "never logged");
    assert!(!idx.tagged_seq_durable(seq(2, 9)), "group 2 pruned");
    assert!(!idx.tagged_seq_durable(seq(2, 5)), "another group");
    assert!(!idx.tagged_seq_durable(7), "untagged");
    assert_eq!(idx.tagged_groups(), vec![1]);
}

/// `LogConfig::max_record_bytes` bounds one record: a batch that encodes larger is refused with
/// `RecordTooLarge` carrying the configured limit, and nothing is logged (the next append gets
/// the LSN the refused one would have had); a batch within it is logged. 0 means 1 byte.
#[test]
fn a_batch_over_the_configured_record_limit_is_refused_and_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_record_bytes: 4096,
        ..LogConfig::default()
    };
    let blocks: Vec<(u64, u64)> = (0..200).map(|i| (i + 1, i + 1_000)).collect();
    let big: Vec<LogEntry> = (0..2)
        .map(|i| LogEntry::event(ns(), i, stored(1, 0, i, None, &blocks)))
        .collect();
    let small = vec![LogEntry::event(
        ns(),
        9,
        stored(1, 0, 9, None, &blocks[..4]),
    )];
    {
        let (log, _) = EventLog::open(dir.path(), config.clone(), &mut NullSink).unwrap();
        match log.append(&big) {
            Err(PersistError::RecordTooLarge { bytes, max }) => {
                assert_eq!(max, 4096);
                assert!(bytes > 4096, "{bytes}");
            }
            Err(other) => panic!("expected RecordTooLarge, got {other}"),
            Ok(_) => panic!("a batch over the limit was logged"),
        }
        let t = log.append(&small).unwrap();
        assert_eq!(t.first_lsn(), FIRST_LSN);
        t.wait().unwrap();
        log.close().unwrap();
    }
    let mut sink = CollectingSink::default();
    let (_log, report) = EventLog::open(dir.path(), config, &mut sink).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(entries_of(&sink.entries), small);
    let zero = tempfile::tempdir().unwrap();
    let config = LogConfig {
        max_record_bytes: 0,
        ..LogConfig::default()
    };
    let (log, _) = EventLog::open(zero.path(), config, &mut NullSink).unwrap();
    assert!(matches!(
        log.append(&small),
        Err(PersistError::RecordTooLarge { max: 1, .. })
    ));
}
