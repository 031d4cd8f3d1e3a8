//! Fast end-to-end checks of the engine's core paths (the full suites live beside this file).

use kvindex_engine::*;

mod common;

fn st(w: u64, dp: u32, blocks: &[(u64, u64)], parent: Option<u64>) -> RouterEvent {
    common::store(w, dp, parent, blocks)
}

fn rm(w: u64, hashes: &[u64]) -> RouterEvent {
    common::remove(w, 0, hashes)
}

fn q(ns: &Namespace, locals: &[u64]) -> Vec<(u64, u32, u32)> {
    let seq: Vec<_> = locals.iter().map(|&l| LocalBlockHash(l)).collect();
    ns.find_matches(&seq, false)
        .sorted()
        .into_iter()
        .map(|(k, s)| (k.worker_id, k.dp_rank, s))
        .collect()
}

fn engine() -> (Engine, Namespace) {
    let e = Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 64,
        ..EngineConfig::default()
    });
    let ns = e
        .create_namespace(NamespaceKey::new("m", "default"), 16)
        .unwrap();
    (e, ns)
}

#[test]
fn shared_prefix_scores_and_orphan_revival() {
    let (_e, ns) = engine();
    ns.apply_and_wait(st(1, 0, &[(11, 1), (12, 2), (13, 3), (14, 4)], None))
        .unwrap();
    ns.apply_and_wait(st(2, 0, &[(11, 1), (12, 2), (23, 30)], None))
        .unwrap();
    assert_eq!(q(&ns, &[1, 2, 3, 4]), vec![(1, 0, 4), (2, 0, 2)]);
    assert_eq!(q(&ns, &[1, 2, 30]), vec![(1, 0, 2), (2, 0, 3)]);
    assert_eq!(q(&ns, &[9, 1]), vec![]);
    ns.apply_and_wait(rm(1, &[12])).unwrap();
    assert_eq!(q(&ns, &[1, 2, 3, 4]), vec![(1, 0, 1), (2, 0, 2)]);
    // The orphans 13, 14 count again once 12 is back.
    ns.apply_and_wait(st(1, 0, &[(12, 2)], Some(11))).unwrap();
    assert_eq!(q(&ns, &[1, 2, 3, 4]), vec![(1, 0, 4), (2, 0, 2)]);
    assert_eq!(ns.current_size(), 7);
}

#[test]
fn unknown_parent_and_unknown_block_errors() {
    let (_e, ns) = engine();
    assert_eq!(
        ns.apply_and_wait(st(3, 0, &[(99, 9)], Some(12345))),
        Err(EngineError::Event(KvCacheEventError::ParentBlockNotFound))
    );
    ns.apply_and_wait(st(1, 0, &[(11, 1), (12, 2), (13, 3)], None))
        .unwrap();
    assert_eq!(
        ns.apply_and_wait(rm(1, &[999, 13])),
        Err(EngineError::Event(KvCacheEventError::BlockNotFound))
    );
    assert_eq!(q(&ns, &[1, 2, 3]), vec![(1, 0, 2)]);
    let c = ns.event_counters();
    assert_eq!(c.get("stored", "parent_block_not_found"), 1);
    assert_eq!(c.get("removed", "block_not_found"), 1);
}

#[test]
fn many_workers_share_a_node_through_a_heap_member_set() {
    let (_e, ns) = engine();
    for w in 0..300u64 {
        ns.apply(st(w, 0, &[(11, 1), (12, 2)], None)).unwrap();
    }
    ns.apply(st(7, 0, &[(13, 3)], Some(12))).unwrap();
    ns.flush().unwrap();
    let got = q(&ns, &[1, 2, 3]);
    assert_eq!(got.len(), 300);
    assert!(got.iter().all(|&(w, _, s)| s == if w == 7 { 3 } else { 2 }));
    ns.remove_worker(7).unwrap();
    for w in 0..298u64 {
        ns.remove_worker(w).unwrap_or(());
    }
    assert_eq!(q(&ns, &[1, 2, 3]), vec![(298, 0, 2), (299, 0, 2)]);
    assert_eq!(ns.get_workers(), vec![298, 299]);
}

#[test]
fn dump_replays_into_an_equal_index() {
    let (e, ns) = engine();
    ns.apply(st(1, 0, &[(11, 1), (12, 2)], None)).unwrap();
    ns.apply(st(1, 0, &[(13, 3)], Some(12))).unwrap();
    ns.apply(st(1, 0, &[(15, 5)], Some(12))).unwrap();
    ns.apply(st(2, 1, &[(11, 1), (22, 20)], None)).unwrap();
    let dump = ns.dump().unwrap();
    let ns2 = e
        .create_namespace(NamespaceKey::new("m", "copy"), 16)
        .unwrap();
    for ev in dump.clone() {
        ns2.apply_and_wait(ev).unwrap();
    }
    for query in [&[1u64, 2, 3][..], &[1, 2, 5], &[1, 20]] {
        assert_eq!(q(&ns, query), q(&ns2, query));
    }
    assert_eq!(ns2.current_size(), ns.current_size());
}

#[test]
fn dead_event_thread_gives_errors_not_panics() {
    let (e, ns) = engine();
    e.inject_event_thread_panic(0).unwrap();
    // Wait until the lane is gone: a barrier fails once it is.
    let mut failed = false;
    for _ in 0..1000 {
        if ns.flush().is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed);
    assert_eq!(
        ns.apply(st(1, 0, &[(1, 1)], None)),
        Err(EngineError::Offline)
    );
    assert_eq!(q(&ns, &[1]), vec![]);
}

#[test]
fn snapshot_keeps_orphans_and_restores_exactly() {
    let (e, ns) = engine();
    ns.apply(st(1, 0, &[(11, 1), (12, 2), (13, 3)], None))
        .unwrap();
    ns.apply(st(2, 0, &[(21, 1), (22, 2)], None)).unwrap(); // private hashes on shared nodes
    ns.apply(rm(1, &[12])).unwrap(); // 13 becomes an orphan of worker 1
    ns.apply(common::cleared(3, 0)).unwrap();
    let snap = ns.snapshot().unwrap();
    assert_eq!(snap.pairs(), 4);
    let copy = e
        .create_namespace(NamespaceKey::new("m", "restored"), 16)
        .unwrap();
    copy.restore(&snap).unwrap();
    assert_eq!(copy.snapshot().unwrap().canonical(), snap.canonical());
    assert_eq!(copy.get_workers(), vec![1, 2, 3]);
    // The orphan counts again once its parent is re-stored, and private hashes still remove.
    copy.apply_and_wait(st(1, 0, &[(12, 2)], Some(11))).unwrap();
    assert_eq!(q(&copy, &[1, 2, 3]), vec![(1, 0, 3), (2, 0, 2)]);
    copy.apply_and_wait(rm(2, &[22])).unwrap();
    assert_eq!(q(&copy, &[1, 2, 3]), vec![(1, 0, 3), (2, 0, 1)]);
    assert_eq!(copy.restore(&snap), Err(EngineError::NamespaceNotEmpty));
}

#[test]
fn full_queue_pushes_back_instead_of_growing() {
    let e = Engine::new(EngineConfig {
        event_threads: 1,
        queue_capacity: 2,
        ..EngineConfig::default()
    });
    let ns = e.create_namespace(NamespaceKey::new("m", "g"), 16).unwrap();
    let pause = e.pause_event_threads().unwrap();
    // The paused lane holds the pause task; its queue takes exactly `queue_capacity` more.
    let mut accepted = 0;
    let mut full = false;
    for i in 0..10u64 {
        match ns.try_apply(st(1, 0, &[(100 + i, i)], None)) {
            Ok(()) => accepted += 1,
            Err(EngineError::QueueFull) => {
                full = true;
                break;
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(full, "try_apply never reported QueueFull");
    assert_eq!(accepted, 2);
    drop(pause);
    ns.flush().unwrap();
    assert_eq!(
        ns.current_size(),
        2,
        "accepted events are applied after the pause"
    );
}

#[test]
fn namespaces_keep_their_own_block_size_and_blocks() {
    use kvindex_engine::hashing::{
        compute_block_hash_for_seq, compute_seq_hash_for_block, HashOptions,
    };
    let (e, ns16) = engine();
    let ns4 = e
        .create_namespace(NamespaceKey::new("m", "small"), 4)
        .unwrap();
    assert_eq!(
        e.create_namespace(NamespaceKey::new("m", "small"), 8).err(),
        Some(EngineError::BlockSizeMismatch {
            namespace: "m:small".into(),
            existing: 4,
            requested: 8
        })
    );
    assert_eq!(
        e.create_namespace(NamespaceKey::new("m", "zero"), 0).err(),
        Some(EngineError::InvalidBlockSize)
    );
    let tokens: Vec<u32> = (0..32).collect();
    for ns in [&ns16, &ns4] {
        let locals = compute_block_hash_for_seq(&tokens, ns.block_size(), &HashOptions::default());
        let seq = compute_seq_hash_for_block(&locals);
        let blocks: Vec<(u64, u64)> = seq.iter().zip(&locals).map(|(s, l)| (*s, l.0)).collect();
        ns.apply_and_wait(st(9, 0, &blocks, None)).unwrap();
    }
    let opts = HashOptions::default();
    let got16 = ns16.find_matches_for_tokens(&tokens, &opts).sorted();
    let got4 = ns4.find_matches_for_tokens(&tokens, &opts).sorted();
    assert_eq!(got16, vec![(WorkerWithDpRank::new(9, 0), 2)]);
    assert_eq!(got4, vec![(WorkerWithDpRank::new(9, 0), 8)]);
    assert_eq!(e.namespaces().len(), 2);
    e.remove_namespace(&NamespaceKey::new("m", "small"))
        .unwrap();
    assert!(e.namespace(&NamespaceKey::new("m", "small")).is_none());
    assert_eq!(ns16.current_size(), 2, "other namespaces are untouched");
}

#[test]
fn reusing_a_hash_for_another_block_drops_the_old_block() {
    let (_e, ns) = engine();
    ns.apply_and_wait(st(1, 0, &[(11, 1), (12, 2)], None))
        .unwrap();
    // Worker 1 now names a different block (tokens 3 under 11) with hash 12.
    ns.apply_and_wait(st(1, 0, &[(12, 3)], Some(11))).unwrap();
    assert_eq!(q(&ns, &[1, 2]), vec![(1, 0, 1)], "the old block 12 is gone");
    assert_eq!(q(&ns, &[1, 3]), vec![(1, 0, 2)]);
    assert_eq!(ns.current_size(), 2);
    // And hash 12 now removes the new block.
    ns.apply_and_wait(rm(1, &[12])).unwrap();
    assert_eq!(q(&ns, &[1, 3]), vec![(1, 0, 1)]);
    assert_eq!(ns.current_size(), 1);
}

#[test]
fn dump_order_does_not_depend_on_arrival_order() {
    let events = [
        st(2, 0, &[(11, 1), (12, 2), (13, 3)], None),
        st(1, 0, &[(11, 1), (12, 2)], None),
        st(1, 1, &[(11, 1), (15, 5)], None),
        st(3, 0, &[(21, 7)], None),
    ];
    let (_a, first) = engine();
    for ev in events.iter().cloned() {
        first.apply_and_wait(ev).unwrap();
    }
    let (_b, second) = engine();
    for ev in events.iter().rev().cloned() {
        second.apply_and_wait(ev).unwrap();
    }
    assert_eq!(first.dump().unwrap(), second.dump().unwrap());
}

#[test]
fn dropping_every_handle_stops_the_engine() {
    let (e, ns) = engine();
    ns.apply_and_wait(st(1, 0, &[(11, 1)], None)).unwrap();
    let looked_up = e.namespace(&NamespaceKey::new("m", "default")).unwrap();
    assert_eq!(
        e.handle_count(),
        3,
        "the engine, `ns` and `looked_up`; the registry holds none"
    );
    drop(looked_up);
    drop(ns);
    assert_eq!(e.handle_count(), 1);
    // The last handle's drop joins the event threads (EngineInner::drop); it must not hang.
    drop(e);
}

/// Long chains cross the node arena's chunk boundaries (the first chunk holds 1024 nodes), where
/// the query walk cannot take the "next index" shortcut: every depth must still score exactly,
/// including chains interleaved with another worker's chain and a branch in the middle.
#[test]
fn long_chains_across_arena_chunks_score_exactly() {
    let (_e, ns) = engine();
    let n = 5000u64;
    let chain: Vec<(u64, u64)> = (0..n).map(|i| (1_000_000 + i, 10 + i)).collect();
    // Worker 2 stores a different chain first, so worker 1's nodes do not start at index 1.
    let other: Vec<(u64, u64)> = (0..700).map(|i| (2_000_000 + i, 900_000 + i)).collect();
    ns.apply(st(2, 0, &other, None)).unwrap();
    for part in chain.chunks(1500) {
        let parent = (part[0].1 > 10).then(|| 1_000_000 + part[0].1 - 11);
        ns.apply(st(1, 0, part, parent)).unwrap();
    }
    // A branch off the middle of the chain (a child that is not the next index).
    let branch: Vec<(u64, u64)> = (0..50).map(|i| (3_000_000 + i, 500_000 + i)).collect();
    ns.apply(st(1, 0, &branch, Some(1_000_000 + 2999))).unwrap();
    ns.flush().unwrap();
    let locals: Vec<u64> = chain.iter().map(|&(_, l)| l).collect();
    assert_eq!(q(&ns, &locals), vec![(1, 0, n as u32)]);
    for k in [1usize, 1023, 1024, 1025, 2047, 3071, 3072, 4999] {
        let mut query = locals.clone();
        query[k] = 7; // no block has local hash 7: the walk stops before position k
        assert_eq!(q(&ns, &query), vec![(1, 0, k as u32)], "mismatch at {k}");
    }
    let mut via_branch: Vec<u64> = locals[..3000].to_vec();
    via_branch.extend(branch.iter().map(|&(_, l)| l));
    assert_eq!(q(&ns, &via_branch), vec![(1, 0, 3050)]);
}

/// `expected_blocks` sizes the map at namespace creation and changes no answer: the same
/// events give the same scores, dump and size as in an engine that grows its map, also past
/// the expected count.
#[test]
fn expected_blocks_presizes_the_map_and_changes_no_answer() {
    let presized = Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 64,
        expected_blocks: 50_000,
    });
    let ns_p = presized
        .create_namespace(NamespaceKey::new("m", "default"), 16)
        .unwrap();
    let (_e, ns_g) = engine();
    // 64 shards × 64-byte buckets for 50,000 entries at 80 % load.
    assert!(ns_p.memory().map_bytes >= 50_000 * 64 / 7);
    assert_eq!(ns_p.memory().map_bytes, expected_blocks_map_bytes(50_000));
    assert_eq!(ns_g.memory().map_bytes, 0);
    // 60,000 blocks: past the expected count, so the pre-sized map grows too.
    for w in 0..60u64 {
        let blocks: Vec<(u64, u64)> = (0..1000u64)
            .map(|i| (w * 10_000 + i + 1, w * 10_000 + i + 1))
            .collect();
        for ns in [&ns_p, &ns_g] {
            ns.apply(st(w, 0, &blocks, None)).unwrap();
        }
    }
    for w in 0..60u64 {
        let hashes: Vec<u64> = (0..500u64)
            .rev()
            .map(|i| w * 10_000 + 500 + i + 1)
            .collect();
        for ns in [&ns_p, &ns_g] {
            ns.apply(rm(w, &hashes)).unwrap();
        }
    }
    ns_p.flush().unwrap();
    ns_g.flush().unwrap();
    assert_eq!(ns_p.current_size(), 30_000);
    assert_eq!(ns_p.current_size(), ns_g.current_size());
    for w in [0u64, 17, 59] {
        let seq: Vec<u64> = (0..1000u64).map(|i| w * 10_000 + i + 1).collect();
        assert_eq!(q(&ns_p, &seq), vec![(w, 0, 500)]);
        assert_eq!(q(&ns_p, &seq), q(&ns_g, &seq));
    }
    // Removing by hash finds every remaining block in the pre-sized map.
    let rest: Vec<u64> = (0..500u64).rev().map(|i| 17 * 10_000 + i + 1).collect();
    ns_p.apply_and_wait(rm(17, &rest)).unwrap();
    assert_eq!(ns_p.current_size(), 29_500);
}

/// `Namespace::presize_map` sizes one namespace's map as `expected_blocks` sizes every one
/// (an empty map, or one holding blocks, whose answers do not change), never shrinks it, and
/// leaves the engine's other namespaces growing as needed.
#[test]
fn presize_map_sizes_one_namespace_and_changes_no_answer() {
    let (e, ns) = engine();
    let other = e
        .create_namespace(NamespaceKey::new("m", "other"), 16)
        .unwrap();
    let blocks: Vec<(u64, u64)> = (1..=2000u64).map(|i| (i, i)).collect();
    ns.apply_and_wait(st(1, 0, &blocks, None)).unwrap();
    let locals: Vec<u64> = (1..=2000u64).collect();
    let before = q(&ns, &locals);
    assert_eq!(before, vec![(1, 0, 2000)]);
    assert!(ns.memory().map_bytes < expected_blocks_map_bytes(50_000));

    ns.presize_map(50_000);
    assert_eq!(ns.memory().map_bytes, expected_blocks_map_bytes(50_000));
    assert_eq!(ns.map_bytes(), ns.memory().map_bytes);
    assert_eq!(q(&ns, &locals), before);
    assert_eq!(other.memory().map_bytes, 0, "another namespace was sized");
    // Every block is still found by its hash: removing them empties the namespace.
    let hashes: Vec<u64> = (1..=2000u64).rev().collect();
    ns.apply_and_wait(rm(1, &hashes)).unwrap();
    assert_eq!(ns.current_size(), 0);
    ns.presize_map(10);
    assert_eq!(
        ns.memory().map_bytes,
        expected_blocks_map_bytes(50_000),
        "presize_map shrank the map"
    );
    other.presize_map(50_000);
    assert_eq!(other.memory().map_bytes, expected_blocks_map_bytes(50_000));
}
