//! Replays the fuzz targets' seed corpus (persistence/fuzz/corpus) through the same reader
//! entry points the fuzz targets call, plus exhaustive single-byte mutations of a valid segment
//! and snapshot: none may panic, and the valid seeds must read completely.
//!
//! `cargo test -p kvindex-persistence --test fuzz_corpus -- --ignored write_seed_corpus`
//! regenerates the seeds.

mod common;

use std::path::PathBuf;

use common::*;
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::fuzzing::{read_segment_bytes, read_snapshot_bytes};
use kvindex_persistence::*;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// A valid segment with a few records, and a valid snapshot, built through the real writers.
fn valid_files() -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let (idx, _) = DurableIndex::open(
        dir.path(),
        DurableConfig {
            snapshots: manual_snapshots(5),
            ..DurableConfig::default()
        },
        small_engine(),
    )
    .unwrap();
    let mut gen = EventGen::new(
        5,
        vec![WorkerWithDpRank::new(1, 0), WorkerWithDpRank::new(2, 3)],
    );
    for i in 0..6 {
        let mut ev = gen.next_event();
        if i >= 4 {
            // Snapshot format 2 carries lower tiers: make the seed hold some.
            ev.storage_tier = kvindex_engine::StorageTier::HostPinned;
        }
        let _ = idx.submit(&ns(), i, ev).unwrap();
    }
    idx.remove_worker(&ns(), 2).unwrap().wait().unwrap();
    idx.snapshot_now().unwrap();
    idx.close().unwrap();
    let seg = std::fs::read(&segment_files(dir.path())[0]).unwrap();
    let snap = std::fs::read(&snapshot_files(dir.path())[0]).unwrap();
    (seg, snap)
}

#[test]
#[ignore = "regenerates the committed seed corpus"]
fn write_seed_corpus() {
    let (seg, snap) = valid_files();
    let s = corpus_dir("segment_reader");
    std::fs::create_dir_all(&s).unwrap();
    std::fs::write(s.join("seed-valid-segment"), &seg).unwrap();
    std::fs::write(s.join("seed-header-only"), &seg[..32]).unwrap();
    std::fs::write(s.join("seed-torn-tail"), &seg[..seg.len() - 5]).unwrap();
    let mut flipped = seg.clone();
    flipped[48] ^= 4;
    std::fs::write(s.join("seed-bit-flip"), &flipped).unwrap();
    let mut zeros = seg.clone();
    zeros.extend_from_slice(&[0; 64]);
    std::fs::write(s.join("seed-zero-tail"), &zeros).unwrap();
    std::fs::write(s.join("seed-empty"), b"").unwrap();
    let p = corpus_dir("snapshot_reader");
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("seed-valid-snapshot"), &snap).unwrap();
    std::fs::write(p.join("seed-header-only"), &snap[..64]).unwrap();
    let mut flipped = snap.clone();
    let mid = snap.len() / 2;
    flipped[mid] ^= 1;
    std::fs::write(p.join("seed-bit-flip"), &flipped).unwrap();
}

#[test]
fn seed_corpus_replays_through_the_readers_without_panicking() {
    let mut seen = 0;
    for (target, is_segment) in [("segment_reader", true), ("snapshot_reader", false)] {
        let dir = corpus_dir(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for f in files {
            let data = std::fs::read(&f).unwrap();
            let valid = f
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-valid");
            if is_segment {
                let s = read_segment_bytes(&data);
                if valid {
                    assert!(
                        s.header_ok && s.damaged_regions == 0 && s.entries == 7,
                        "{f:?}: {s:?}"
                    );
                }
            } else {
                let r = read_snapshot_bytes(&data);
                if valid {
                    assert!(r.is_ok(), "{f:?}: {r:?}");
                } else {
                    assert!(r.is_err(), "{f:?} accepted");
                }
            }
            seen += 1;
        }
    }
    assert!(seen >= 9);
}

#[test]
fn every_single_byte_corruption_and_truncation_of_a_segment_is_read_without_panicking() {
    let (seg, snap) = valid_files();
    let full = read_segment_bytes(&seg);
    for i in 0..seg.len() {
        for bits in [0x01u8, 0x80, 0xFF] {
            let mut b = seg.clone();
            b[i] ^= bits;
            let s = read_segment_bytes(&b);
            // A flip can only lose entries, never invent them.
            assert!(s.entries <= full.entries, "byte {i}");
            assert!(
                s.damaged_regions >= 1 || s.entries == full.entries,
                "byte {i}"
            );
        }
        let _ = read_segment_bytes(&seg[..i]);
    }
    for i in 0..snap.len() {
        let mut b = snap.clone();
        b[i] ^= 0x20;
        assert!(read_snapshot_bytes(&b).is_err(), "snapshot byte {i}");
        let _ = read_snapshot_bytes(&snap[..i]);
    }
}
