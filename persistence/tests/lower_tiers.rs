//! Lower storage tiers (host_pinned, disk, external) across persistence: logged lower-tier events
//! replay on recovery, snapshots carry them exactly, and a version-1 snapshot (written before
//! lower tiers existed) is refused with a clear error while recovery falls back to the log.

mod common;

use common::*;
use kvindex_engine::{LocalBlockHash, Namespace, RouterEvent, StorageTier, WorkerWithDpRank};
use kvindex_persistence::*;

fn on(tier: StorageTier, mut ev: RouterEvent) -> RouterEvent {
    ev.storage_tier = tier;
    ev
}

/// Device block 1 (ext 11), host_pinned 2 under it, disk 3 under that; worker 2 on external.
fn tiered_events() -> Vec<RouterEvent> {
    vec![
        stored(1, 0, 1, None, &[(11, 1)]),
        on(
            StorageTier::HostPinned,
            stored(1, 0, 2, Some(11), &[(12, 2)]),
        ),
        on(
            StorageTier::Disk,
            stored(1, 0, 3, Some(12), &[(13, 3), (14, 4)]),
        ),
        on(StorageTier::Disk, removed(1, 0, 4, &[14])),
        on(StorageTier::External, stored(2, 1, 1, None, &[(21, 1)])),
    ]
}

fn depths(ns: &Namespace) -> Vec<(WorkerWithDpRank, (u32, u32, u32))> {
    ns.flush().unwrap();
    let q: Vec<LocalBlockHash> = [1, 2, 3, 4].into_iter().map(LocalBlockHash).collect();
    ns.find_matches_tiered(&q)
        .sorted()
        .into_iter()
        .map(|(w, d)| (w, (d.device, d.host, d.disk)))
        .collect()
}

fn expected() -> Vec<(WorkerWithDpRank, (u32, u32, u32))> {
    vec![
        (WorkerWithDpRank::new(1, 0), (1, 2, 3)),
        (WorkerWithDpRank::new(2, 1), (0, 0, 1)),
    ]
}

fn no_snapshots() -> DurableConfig {
    DurableConfig {
        snapshots: manual_snapshots(2),
        ..DurableConfig::default()
    }
}

#[test]
fn logged_lower_tier_events_replay_on_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ns();
    {
        let (idx, _) = DurableIndex::open(dir.path(), no_snapshots(), small_engine()).unwrap();
        for (i, ev) in tiered_events().into_iter().enumerate() {
            let _ = idx.submit(&spec, i as u64, ev).unwrap();
        }
        idx.log().sync().unwrap();
        let live = idx.engine().namespace(&spec.key).unwrap();
        assert_eq!(depths(&live), expected());
        idx.close().unwrap();
    }
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), no_snapshots(), engine.clone()).unwrap();
    assert!(report.snapshot.is_none());
    let ns = engine.namespace(&spec.key).unwrap();
    assert_eq!(depths(&ns), expected());
    assert_eq!(ns.lower_tier_size(), 3);
}

#[test]
fn snapshots_carry_lower_tiers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_engine();
    let ns_handle = engine.create_namespace(ns().key.clone(), 16).unwrap();
    for ev in tiered_events() {
        ns_handle.apply(ev).unwrap();
    }
    let image = SnapshotImage::capture(&engine, 6, &[]).unwrap();
    assert_eq!(image.namespaces[0].lower.len(), 3);
    let store = SnapshotStore::new(dir.path());
    let meta = store.write(&image).unwrap();
    let loaded = store.load(&meta.path).unwrap();
    let fresh = small_engine();
    loaded.image().unwrap().restore_into(&fresh).unwrap();
    let restored = fresh.namespace(&ns().key).unwrap();
    assert_eq!(depths(&restored), expected());
    assert_eq!(
        restored.snapshot().unwrap().lower_canonical(),
        ns_handle.snapshot().unwrap().lower_canonical()
    );
}

#[test]
fn a_version_1_snapshot_is_refused_clearly_and_recovery_uses_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ns();
    {
        let (idx, _) = DurableIndex::open(dir.path(), no_snapshots(), small_engine()).unwrap();
        for (i, ev) in tiered_events().into_iter().enumerate() {
            let _ = idx.submit(&spec, i as u64, ev).unwrap();
        }
        idx.log().sync().unwrap();
        idx.snapshot_now().unwrap();
        idx.close().unwrap();
    }
    // Turn the snapshot into a version-1 file (header CRC recomputed, so only the version is off).
    let path = snapshot_files(dir.path()).pop().expect("a snapshot");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = SnapshotStore::new(dir.path())
        .load(&path)
        .err()
        .expect("a v1 snapshot must be refused")
        .to_string();
    assert!(
        err.contains("version 1 predates lower-tier indexing"),
        "{err}"
    );
    let engine = small_engine();
    let (_idx, report) = DurableIndex::open(dir.path(), no_snapshots(), engine.clone()).unwrap();
    assert!(report.snapshot.is_none());
    assert_eq!(depths(&engine.namespace(&spec.key).unwrap()), expected());
}
