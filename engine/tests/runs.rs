//! The run representation (a node is a run of consecutive blocks held by the same workers):
//! runs compress chains, split where holders diverge, shrink from the tail on leaf-first
//! eviction, and survive a snapshot round trip with the same shape. Answers are checked too, so
//! a shape bug that changes what a query sees fails here as well as in the model tests.

use kvindex_engine::*;

mod common;

fn q(ns: &Namespace, locals: &[u64]) -> Vec<(u64, u32)> {
    let seq: Vec<_> = locals.iter().map(|&l| LocalBlockHash(l)).collect();
    ns.find_matches(&seq, false)
        .sorted()
        .into_iter()
        .map(|(k, s)| (k.worker_id, s))
        .collect()
}

/// Local hashes 1..=n; external hashes from the common canonical chaining.
fn chain(n: u64) -> Vec<u64> {
    (1..=n).collect()
}

fn shape(ns: &Namespace) -> (usize, usize) {
    let m = ns.memory();
    (m.live_nodes, m.live_runs)
}

#[test]
fn a_chain_is_one_run_and_splits_where_holders_diverge() {
    let (_e, ns) = common::engine_and_namespace();
    let path = chain(100);
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    assert_eq!(shape(&ns), (100, 1), "one event's chain is one run");
    // Worker 2 holds the first 40: the run splits after block 40.
    ns.apply_and_wait(common::store_chain(2, 0, &path[..40]))
        .unwrap();
    assert_eq!(shape(&ns), (100, 2));
    assert_eq!(q(&ns, &path), vec![(1, 100), (2, 40)]);
    // Worker 3 diverges after block 10: a third split, plus its own new run.
    let mut other: Vec<u64> = path[..10].to_vec();
    other.extend([1001, 1002]);
    ns.apply_and_wait(common::store_chain(3, 0, &other))
        .unwrap();
    assert_eq!(shape(&ns), (102, 4));
    assert_eq!(q(&ns, &other), vec![(1, 10), (2, 10), (3, 12)]);
    assert_eq!(q(&ns, &path), vec![(1, 100), (2, 40), (3, 10)]);
}

#[test]
fn leaf_first_eviction_shrinks_a_run_without_splitting_it() {
    let (_e, ns) = common::engine_and_namespace();
    let path = chain(64);
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    let hashes = common::canonical_hashes(&path);
    // Evict the last 16 blocks, child before parent, in one event.
    let evicted: Vec<u64> = hashes[48..].iter().rev().copied().collect();
    ns.apply_and_wait(common::remove(1, 0, &evicted)).unwrap();
    assert_eq!(shape(&ns), (48, 1));
    assert_eq!(q(&ns, &path), vec![(1, 48)]);
    // The freed ids are reused: storing 16 blocks again keeps the same footprint.
    let before = ns.memory().node_bytes;
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    assert_eq!(q(&ns, &path), vec![(1, 64)]);
    assert_eq!(ns.memory().node_bytes, before);
}

#[test]
fn a_shared_run_evicted_by_one_holder_splits_once_per_event() {
    let (_e, ns) = common::engine_and_namespace();
    let path = chain(64);
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    ns.apply_and_wait(common::store_chain(2, 0, &path)).unwrap();
    let hashes = common::canonical_hashes(&path);
    let evicted: Vec<u64> = hashes[32..].iter().rev().copied().collect();
    ns.apply_and_wait(common::remove(1, 0, &evicted)).unwrap();
    assert_eq!(shape(&ns), (64, 2), "one split for the 32 evicted blocks");
    assert_eq!(q(&ns, &path), vec![(1, 32), (2, 64)]);
    // A middle block: worker 2 keeps its orphans below it, and a re-store revives them.
    ns.apply_and_wait(common::remove(2, 0, &[hashes[10]]))
        .unwrap();
    assert_eq!(q(&ns, &path), vec![(1, 32), (2, 10)]);
    ns.apply_and_wait(common::store(
        2,
        0,
        Some(hashes[9]),
        &[(hashes[10], path[10])],
    ))
    .unwrap();
    assert_eq!(q(&ns, &path), vec![(1, 32), (2, 64)]);
    assert_eq!(ns.current_size(), 32 + 64);
}

#[test]
fn clearing_a_worker_frees_its_runs_and_keeps_the_others() {
    let (_e, ns) = common::engine_and_namespace();
    let path = chain(50);
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    ns.apply_and_wait(common::store_chain(2, 0, &path[..20]))
        .unwrap();
    ns.apply_and_wait(common::cleared(1, 0)).unwrap();
    assert_eq!(q(&ns, &path), vec![(2, 20)]);
    assert_eq!(shape(&ns).0, 20, "worker 1's tail blocks are gone");
    ns.apply_and_wait(common::cleared(2, 0)).unwrap();
    assert_eq!(shape(&ns), (0, 0));
    assert!(ns.dump().unwrap().is_empty());
}

#[test]
fn a_snapshot_restores_the_same_runs_and_answers() {
    let (e, ns) = common::engine_and_namespace();
    let path = chain(80);
    ns.apply_and_wait(common::store_chain(1, 0, &path)).unwrap();
    ns.apply_and_wait(common::store_chain(2, 0, &path[..30]))
        .unwrap();
    let mut side: Vec<u64> = path[..50].to_vec();
    side.extend([900, 901, 902]);
    ns.apply_and_wait(common::store_chain(3, 0, &side)).unwrap();
    let snap = ns.snapshot().unwrap();
    let restored = common::create_namespace(&e, NamespaceKey::new("m2", "default"), 16);
    restored.restore(&snap).unwrap();
    assert_eq!(shape(&restored), shape(&ns));
    for query in [&path[..], &side[..], &path[..30]] {
        assert_eq!(q(&restored, query), q(&ns, query));
    }
    assert_eq!(restored.dump().unwrap(), ns.dump().unwrap());
    // The restored tree takes further events like the original.
    restored
        .apply_and_wait(common::remove(3, 0, &common::canonical_hashes(&side)[52..]))
        .unwrap();
    assert_eq!(q(&restored, &side), vec![(1, 50), (2, 30), (3, 52)]);
}

#[test]
fn a_snapshot_with_same_holder_branches_restores() {
    // One worker holds two branches below a block, so the snapshot's first branch extends the
    // parent's run during the restore and the second must cut it again.
    let (e, ns) = common::engine_and_namespace();
    let trunk: Vec<u64> = chain(10);
    let mut a = trunk.clone();
    a.extend([501, 502]);
    let mut b = trunk.clone();
    b.extend([601, 602, 603]);
    ns.apply_and_wait(common::store_chain(1, 0, &a)).unwrap();
    ns.apply_and_wait(common::store_chain_after(1, 0, &trunk, &b[10..]))
        .unwrap();
    let snap = ns.snapshot().unwrap();
    let restored = common::create_namespace(&e, NamespaceKey::new("m3", "default"), 16);
    restored.restore(&snap).unwrap();
    assert_eq!(q(&restored, &a), vec![(1, 12)]);
    assert_eq!(q(&restored, &b), vec![(1, 13)]);
    assert_eq!(restored.dump().unwrap(), ns.dump().unwrap());
    assert_eq!(shape(&restored), shape(&ns));
}

/// A clear racing splits: while worker 1 (alone on its event thread) stores a long chain and
/// clears it, workers 2 and 3 (on the other thread) keep storing prefixes of the same chain,
/// which splits worker 1's runs and copies its membership into new nodes. A clear that missed a
/// node created behind its scan would leave worker 1 holding blocks. Bounded by counts.
#[test]
fn a_clear_racing_splits_by_other_streams_leaves_nothing_behind() {
    let e = Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 256,
        ..EngineConfig::default()
    });
    let ns = common::create_namespace(&e, NamespaceKey::new("m", "default"), 16);
    let path = chain(512);
    // Streams go to event threads round-robin at first sight, so worker 1 and the others
    // share or split the two threads depending on arrival; every worker's own events stay
    // ordered either way, and the interleaving is what the test is after.
    std::thread::scope(|s| {
        let ns1 = ns.clone();
        let p1 = path.clone();
        s.spawn(move || {
            for _ in 0..60 {
                ns1.apply(common::store_chain(1, 0, &p1)).unwrap();
                ns1.apply(common::cleared(1, 0)).unwrap();
            }
        });
        for w in [2u64, 3] {
            let nsw = ns.clone();
            let pw = path.clone();
            s.spawn(move || {
                for round in 0..60usize {
                    let len = 8 + (round * 37 + w as usize * 101) % 500;
                    nsw.apply(common::store_chain(w, 0, &pw[..len])).unwrap();
                    let hashes = common::canonical_hashes(&pw[..len]);
                    let cut = len / 2;
                    let evicted: Vec<u64> = hashes[cut..].iter().rev().copied().collect();
                    nsw.apply(common::remove(w, 0, &evicted)).unwrap();
                }
            });
        }
    });
    ns.flush().unwrap();
    let scores = q(&ns, &path);
    assert!(
        scores.iter().all(|&(w, _)| w != 1),
        "worker 1 still scores after its last clear: {scores:?}"
    );
    let dumped = ns.dump().unwrap();
    assert!(dumped.iter().all(|ev| ev.worker_id != 1));
    assert!(ns
        .worker_block_counts()
        .iter()
        .all(|(k, n)| k.worker_id != 1 || *n == 0));
    // Workers 2 and 3 each hold the first half of their last prefix.
    for w in [2u64, 3] {
        let len = 8 + (59 * 37 + w as usize * 101) % 500;
        assert!(scores.contains(&(w, (len / 2) as u32)), "{w}: {scores:?}");
    }
    // And the index is exactly their blocks: no node kept alive by a stale membership.
    let m = ns.memory();
    let held: usize = [2u64, 3]
        .iter()
        .map(|&w| (8 + (59 * 37 + w as usize * 101) % 500) / 2)
        .max()
        .unwrap_or(0);
    assert_eq!(
        m.live_nodes, held,
        "live blocks = the longer of the two halves"
    );
}
