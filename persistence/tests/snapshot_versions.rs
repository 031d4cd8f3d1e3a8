//! A snapshot of an older format (docs/log-format.md §3, "Versions") over a compacted log: the
//! fallback to "the log from its start" is impossible, and recovery says so and what to do.

mod common;

use std::path::Path;

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::*;

/// A data dir whose log was compacted past LSN 1 (small segments, three snapshots).
fn compacted_dir(dir: &Path) {
    let config = DurableConfig {
        log: LogConfig {
            segment_bytes: 2048,
            ..LogConfig::default()
        },
        snapshots: manual_snapshots(2),
    };
    let (idx, _) = DurableIndex::open(dir, config, small_engine()).unwrap();
    let mut gen = EventGen::new(3, vec![WorkerWithDpRank::new(4, 0)]);
    for round in 0..3 {
        for i in 0..60 {
            let _ = idx
                .submit(&ns(), round * 100 + i, gen.next_event())
                .unwrap();
        }
        idx.snapshot_now().unwrap();
    }
    idx.close().unwrap();
}

/// Rewrite `path` as a format-version-1 snapshot (header CRC recomputed: only the version is off).
fn make_version_1(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn version_1_snapshots_over_a_compacted_log_are_refused_with_what_to_do() {
    for policy in [
        RecoveryPolicy::Absolute,
        RecoveryPolicy::TolerateTail,
        RecoveryPolicy::SkipCorrupt,
    ] {
        let dir = tempfile::tempdir().unwrap();
        compacted_dir(dir.path());
        let log_start = segment_first_lsn(&segment_files(dir.path())[0]);
        assert!(log_start > 1);
        let snaps = snapshot_files(dir.path());
        for s in &snaps {
            make_version_1(s);
        }
        let res = EventLog::open(dir.path(), cfg_policy(policy), &mut NullSink);
        match (policy, res) {
            (RecoveryPolicy::SkipCorrupt, Ok((_, report))) => {
                assert_eq!(report.lost_lsns[0], (1, log_start - 1));
            }
            (
                _,
                Err(
                    e @ PersistError::SnapshotFormatTooOld {
                        version: 1,
                        replay_from: 1,
                        ..
                    },
                ),
            ) => {
                let PersistError::SnapshotFormatTooOld {
                    snapshot,
                    log_starts_at,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*log_starts_at, log_start);
                assert_eq!(snapshot, snaps.last().unwrap());
                let msg = e.to_string();
                assert!(msg.contains("skip-corrupt"), "{msg}");
                assert!(msg.contains("start empty"), "{msg}");
            }
            (p, other) => panic!("{p}: {:?}", other.map(|(_, r)| r)),
        }
    }
}

/// A format-2 snapshot (still readable) that is damaged is damage, not an older format: over a
/// compacted log it is refused as missing records, never as `SnapshotFormatTooOld`.
#[test]
fn a_damaged_version_2_snapshot_is_not_called_too_old() {
    let dir = tempfile::tempdir().unwrap();
    compacted_dir(dir.path());
    for snap in snapshot_files(dir.path()) {
        let mut bytes = std::fs::read(&snap).unwrap();
        bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[0..60]);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        std::fs::write(&snap, &bytes).unwrap();
    }
    let err = match DurableIndex::open(dir.path(), DurableConfig::default(), small_engine()) {
        Ok(_) => panic!("a compacted log without a usable snapshot must be refused"),
        Err(e) => e,
    };
    assert!(
        !matches!(err, PersistError::SnapshotFormatTooOld { .. }),
        "{err}"
    );
}

/// The format version in a snapshot file's header.
fn version_of(path: &Path) -> u16 {
    let bytes = std::fs::read(path).unwrap();
    u16::from_le_bytes([bytes[8], bytes[9]])
}

/// Version 3 only when there are tagged sequences to carry: a data directory that never saw
/// JetStream (or whose set was pruned empty) keeps writing version 2, which the previous build
/// reads (docs/operations.md, "Going back to an older build").
#[test]
fn snapshots_are_version_2_unless_they_carry_tagged_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let config = DurableConfig {
        snapshots: manual_snapshots(1),
        ..DurableConfig::default()
    };
    let spec = ns();
    let ev = |id: u64| stored(1, 0, id, None, &[(id, id)]);
    let (idx, _) = DurableIndex::open(dir.path(), config.clone(), small_engine()).unwrap();
    let newest = || snapshot_files(dir.path()).pop().unwrap();
    idx.submit(&spec, 1, ev(1)).unwrap().wait().unwrap();
    idx.snapshot_now().unwrap();
    assert_eq!(version_of(&newest()), 2, "untagged sequences only");

    let tagged = tagged_source_seq(3, 7).unwrap();
    idx.submit(&spec, tagged, ev(2)).unwrap().wait().unwrap();
    idx.snapshot_now().unwrap();
    assert_eq!(version_of(&newest()), 3, "a tagged sequence to carry");
    let loaded = LoadedSnapshot::load(&newest()).unwrap();
    assert!(loaded.tagged_seqs().contains(tagged));

    idx.prune_tagged_seqs(3, 7);
    idx.submit(&spec, 2, ev(3)).unwrap().wait().unwrap();
    idx.snapshot_now().unwrap();
    assert_eq!(version_of(&newest()), 2, "the set was pruned empty");
    idx.close().unwrap();
    // And a version-2 snapshot reads back with an empty set.
    let (idx, report) = DurableIndex::open(dir.path(), config, small_engine()).unwrap();
    assert!(report.snapshot.is_some());
    assert!(idx.tagged_groups().is_empty());
}

/// The version error says which versions this build reads.
#[test]
fn an_unknown_snapshot_version_names_the_versions_read() {
    let dir = tempfile::tempdir().unwrap();
    compacted_dir(dir.path());
    let snap = snapshot_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[8..10].copy_from_slice(&4u16.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&snap, &bytes).unwrap();
    let err = LoadedSnapshot::load(&snap)
        .err()
        .expect("version 4 refused");
    assert!(
        err.to_string()
            .contains("format version 4, this build reads 2 and 3"),
        "{err}"
    );
}
