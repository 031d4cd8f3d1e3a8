//! Dynamo's indexer interface tests (INDEXER.md §6), ported to kvindex: the numbered tests 1–17
//! and 19–30, the LoRA tests and the long-sequence tests, plus two `radix_tree.rs` items.
//!
//! As in Dynamo's tests, local hashes are small integers and every external hash is the canonical
//! rolling hash of the path (`store_chain`, `store_chain_after`, `remove_chain`). Every test drives
//! the engine and the reference model side by side ([`common::Harness`]).
//!
//! Not ported:
//! * test 18 (approximate / TTL mode): kvindex has no approximate mode yet;
//! * test 20 (flat/positional only: dumps keep `start_position`): kvindex's dumps are tree dumps,
//!   which write `start_position: null` (§3.2.7, checked by S15).

mod common;

use common::*;
use kvindex_engine::reference::{dump_canonical, ReferenceIndex};
use kvindex_engine::{EngineError, KvCacheEventError, NamespaceKey};

use KvCacheEventError::{BlockNotFound, ParentBlockNotFound};

// ---------------------------------------------------------------------------------------------
// The local hashing helper itself (INDEXER.md §2.5 golden vectors).
// ---------------------------------------------------------------------------------------------

#[test]
fn local_hash_helper_matches_the_spec_golden_vectors() {
    let tokens: Vec<u32> = (0..64).collect();
    let locals = local_hashes(&tokens, 16);
    assert_eq!(
        raw(&locals),
        vec![
            15310707395893867146,
            15292316782987903195,
            5532946206955930018,
            14928757266181269122
        ]
    );
    assert_eq!(
        seq_hashes(&locals),
        vec![
            15310707395893867146,
            13769157705258532664,
            11879827756109914528,
            3888788807566526800
        ]
    );
    let lora = local_hashes_with(&tokens, 16, Some("my-lora"), None);
    assert_eq!(
        seq_hashes(&lora),
        vec![
            7774427462321301335,
            13956809587245606139,
            7580671835638698099,
            11490194441755537719
        ]
    );
    let four: Vec<u32> = (0..4).collect();
    assert_eq!(
        raw(&local_hashes_with(&four, 4, Some(""), None)),
        vec![9143094415614847814]
    );
    assert_eq!(
        raw(&local_hashes_with(&four, 4, None, Some("tenant-a"))),
        vec![17009624042690211646]
    );
    assert_eq!(
        raw(&local_hashes_with(
            &four,
            4,
            Some("adapter-a"),
            Some("tenant-a")
        )),
        vec![8269515957840517240]
    );
    assert_eq!(
        raw(&local_hashes(&tokens[..17], 16)),
        vec![15310707395893867146]
    );
    assert!(local_hashes(&tokens[..15], 16).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Interface tests 1–17, 19–30
// ---------------------------------------------------------------------------------------------

/// §6 test 1.
#[test]
fn duplicate_store_replay_changes_nothing_and_counts_one_warning() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    let before = h.dump();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    assert_eq!(h.dump(), before);
    assert_eq!(h.current_size(), 3);
    assert_eq!(h.model.duplicate_store_warnings(), 1);
    let counters = h.ns.event_counters();
    assert_eq!(counters.duplicate_store, 1);
    assert!(
        counters
            .applied
            .iter()
            .all(|(_, status, _)| *status == "ok"),
        "no error status expected: {counters:?}"
    );
}

/// §6 test 2.
#[test]
fn continuation_store_under_the_tail_extends_the_match_without_warning() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5]));
    h.expect(&[1, 2, 3, 4, 5], &[(1, 0, 5)]);
    assert_eq!(h.model.duplicate_store_warnings(), 0);
    assert_eq!(h.ns.event_counters().duplicate_store, 0);
    h.check_state();
}

/// §6 test 3.
#[test]
fn stored_chain_is_found() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    assert_eq!(h.dump(), canonical_chain(1, 0, &[1, 2, 3]));
}

/// §6 test 4.
#[test]
fn block_counts_stay_exact_through_duplicates_continuations_and_removals() {
    let mut h = Harness::new();
    let full = [1, 2, 3, 4, 5];
    let check = |h: &Harness, score: u32, blocks: usize| {
        let want: &[(u64, u32, u32)] = if score == 0 { &[] } else { &[(1, 0, score)] };
        h.expect(&full, want);
        assert_eq!(h.current_size(), blocks);
        let counts = if blocks == 0 {
            vec![]
        } else {
            vec![(wr(1, 0), blocks)]
        };
        assert_eq!(h.worker_block_counts(), counts);
    };
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    check(&h, 3, 3);
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    check(&h, 3, 3);
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5]));
    check(&h, 5, 5);
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5]));
    check(&h, 5, 5);
    h.ok(remove_chain(1, 0, &full, 3..5));
    check(&h, 3, 3);
    h.fails(remove_chain(1, 0, &full, 3..5), BlockNotFound);
    check(&h, 3, 3);
    h.ok(remove_chain(1, 0, &full, 0..3));
    check(&h, 0, 0);
    assert!(h.dump().is_empty());
    assert_eq!(h.model.duplicate_store_warnings(), 2);
    h.check_state();
}

/// §6 test 5 (Dynamo: compressed tree only; kvindex keeps the orphans, §0.2).
#[test]
fn mid_chain_remove_keeps_the_lookup_consistent_through_restores() {
    let mut h = Harness::new();
    let full = [1, 2, 3, 4, 5];
    h.ok(store_chain(1, 0, &full));
    h.ok(remove_chain(1, 0, &full, 2..3));
    h.expect(&full, &[(1, 0, 2)]);
    assert_eq!(h.current_size(), 4, "blocks 4 and 5 stay held as orphans");
    h.ok(store_chain_after(1, 0, &[1, 2], &[3]));
    h.expect(&full, &[(1, 0, 5)]);
    assert_eq!(h.current_size(), 5);
    // Re-storing 4 and 5 is now a duplicate: no double counting.
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5]));
    h.expect(&full, &[(1, 0, 5)]);
    assert_eq!(h.current_size(), 5);
    assert_eq!(h.model.duplicate_store_warnings(), 1);
    // The lookup still resolves 4 exactly once.
    h.ok(remove_chain(1, 0, &full, 3..4));
    h.expect(&full, &[(1, 0, 3)]);
    h.fails(remove_chain(1, 0, &full, 3..4), BlockNotFound);
    assert_eq!(h.current_size(), 4);
    h.check_state();
}

/// §6 test 6.
#[test]
fn store_under_another_workers_branch_is_rejected() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5, 6]));
    h.ok(store_chain_after(2, 0, &[1, 2, 3], &[7, 8]));
    // w2 names w1's block 6 as its parent: not w2's block.
    h.fails(
        store_chain_after(2, 0, &[1, 2, 3, 4, 5, 6], &[9]),
        ParentBlockNotFound,
    );
    h.expect(&[1, 2, 3, 4, 5, 6], &[(1, 0, 6), (2, 0, 3)]);
    h.expect(&[1, 2, 3, 7, 8], &[(1, 0, 3), (2, 0, 5)]);
    h.expect(&[1, 2, 3, 4, 5, 6, 9], &[(1, 0, 6), (2, 0, 3)]);
    h.check_state();
}

/// §6 test 7.
#[test]
fn worker_reusing_another_workers_suffix_can_extend_it() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3, 4, 5, 6]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.ok(store_chain_after(2, 0, &[1, 2, 3], &[4, 5, 6]));
    h.expect(&[1, 2, 3, 4, 5, 6], &[(1, 0, 6), (2, 0, 6)]);
    h.ok(store_chain_after(2, 0, &[1, 2, 3, 4, 5, 6], &[7, 8, 9]));
    h.expect(&[1, 2, 3, 4, 5, 6, 7, 8, 9], &[(1, 0, 6), (2, 0, 9)]);
    h.check_state();
}

/// §6 test 8.
#[test]
fn partial_match_stops_at_the_first_unknown_block() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[1, 2, 999], &[(1, 0, 2)]);
    h.expect(&[1, 2, 999, 3], &[(1, 0, 2)]);
}

/// §6 test 9.
#[test]
fn removing_every_block_leaves_no_scores() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(remove_chain(1, 0, &[1, 2, 3], 0..3));
    h.expect(&[1, 2, 3], &[]);
    assert_eq!(h.current_size(), 0);
    h.check_state();
}

/// §6 test 10.
#[test]
fn shared_first_block_with_different_second_blocks_scores_each_branch() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2]));
    h.ok(store_chain(2, 0, &[1, 3]));
    h.expect(&[1], &[(1, 0, 1), (2, 0, 1)]);
    h.expect(&[1, 2], &[(1, 0, 2), (2, 0, 1)]);
    h.expect(&[1, 3], &[(1, 0, 1), (2, 0, 2)]);
    h.check_state();
}

/// §6 test 11.
#[test]
fn remove_worker_keeps_only_the_other_workers() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(1, 1, &[1, 2]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.remove_worker(1);
    h.expect(&[1, 2, 3], &[(2, 0, 3)]);
    assert_eq!(h.get_workers(), vec![2]);
    assert_eq!(h.dump(), canonical_chain(2, 0, &[1, 2, 3]));
    h.check_state();
}

/// §6 test 12.
#[test]
fn dump_restored_into_a_fresh_namespace_gives_an_equal_snapshot() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3, 4, 5]));
    h.ok(store_chain(1, 1, &[1, 2, 7]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.ok(store_chain_after(2, 0, &[1, 2, 3], &[8, 9]));
    h.ok(store(3, 0, None, &[(501, 1), (502, 2)])); // engine-specific (non-canonical) hashes
    h.ok(store(3, 0, Some(502), &[(503, 6)]));
    h.ok(remove_chain(1, 0, &[1, 2, 3, 4, 5], 3..4)); // leaves 5 as an orphan
    let dump = h.raw_dump();
    assert!(!dump.is_empty());

    let restored = create_namespace(&h.engine, NamespaceKey::new("m", "restored"), BLOCK_SIZE);
    for ev in &dump {
        assert_eq!(
            event_outcome(restored.apply_and_wait(ev.clone())),
            Ok(()),
            "replaying {ev:?}"
        );
    }
    assert_eq!(
        assert_dump_well_formed(&restored.dump().expect("dump")),
        dump_canonical(&dump)
    );
    for query in [
        vec![1, 2, 3, 4, 5],
        vec![1, 2, 7],
        vec![1, 2, 3, 8, 9],
        vec![1, 2, 6],
        vec![1],
    ] {
        assert_eq!(
            restored.find_matches(&lh(&query), false).sorted(),
            h.scores(&query),
            "query {query:?}"
        );
    }
    // Only the orphan is missing from the restored index.
    assert_eq!(restored.current_size() + 1, h.current_size());
}

/// §6 test 13.
#[test]
fn cleared_event_removes_only_the_emitting_worker() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.ok(cleared(1, 0));
    h.expect(&[1, 2, 3], &[(2, 0, 3)]);
    assert_eq!(h.worker_block_counts(), vec![(wr(2, 0), 3)]);
    h.check_state();
}

/// §6 test 14.
#[test]
fn empty_query_matches_nothing() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[], &[]);
    assert!(h.scores_of(&[], true).is_empty());
}

/// §6 test 15.
#[test]
fn query_of_unknown_blocks_matches_nothing() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[4, 5, 6], &[]);
    h.expect(&[2, 3], &[]);
}

/// §6 test 16.
#[test]
fn shutdown_drains_accepted_events_and_is_idempotent() {
    let (engine, ns) = engine_and_namespace();
    let path = run(1, 40);
    for len in 1..=path.len() {
        ns.apply(store_chain_after(
            1,
            0,
            &path[..len - 1],
            &path[len - 1..len],
        ))
        .expect("apply before shutdown");
    }
    engine.shutdown();
    engine.shutdown();
    // Everything accepted before the shutdown was applied.
    assert_eq!(
        ns.find_matches(&lh(&path), false).sorted(),
        expected(&[(1, 0, 40)])
    );
    assert_eq!(ns.apply(store_chain(2, 0, &[1])), Err(EngineError::Offline));
    assert_eq!(
        ns.apply_and_wait(store_chain(2, 0, &[1])),
        Err(EngineError::Offline)
    );
    engine.shutdown();
}

/// §6 test 17 (`find_matches_for_request`: tokens are hashed by the caller here).
#[test]
fn token_query_matches_after_storing_the_canonical_hashes() {
    let mut h = Harness::new();
    let tokens: Vec<u32> = (1..=96).collect();
    let locals = local_hashes(&tokens, BLOCK_SIZE);
    assert_eq!(locals.len(), 3);
    h.expect_lh(&locals, &[]);
    h.ok(store_chain(1, 0, &raw(&locals)));
    h.expect_lh(&locals, &[(1, 0, 3)]);
    // A partial tail block is not part of the query.
    let longer: Vec<u32> = (1..=100).collect();
    h.expect_lh(&local_hashes(&longer, BLOCK_SIZE), &[(1, 0, 3)]);
    // The stored external hashes are the rolling hashes of the locals.
    let hashes = seq_hashes(&locals);
    assert!(h.model.holds(wr(1, 0), hashes[2].into()));
    h.check_state();
}

/// §6 test 19.
#[test]
fn parent_hash_chains_extend_only_their_own_worker() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain_after(1, 0, &[1, 2, 3], &[4, 5]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.expect(&[1, 2, 3, 4, 5], &[(1, 0, 5), (2, 0, 3)]);
    h.check_state();
}

/// §6 test 21.
#[test]
fn dp_ranks_of_one_worker_score_separately() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(1, 1, &[1, 2]));
    h.ok(store_chain(1, 2, &[1, 9]));
    h.expect(&[1, 2, 3], &[(1, 0, 3), (1, 1, 2), (1, 2, 1)]);
    assert_eq!(h.get_workers(), vec![1]);
    assert_eq!(
        h.worker_block_counts(),
        vec![(wr(1, 0), 3), (wr(1, 1), 2), (wr(1, 2), 2)]
    );
    // A rank's parent is not another rank's block.
    h.fails(
        store_chain_after(1, 1, &[1, 2, 3], &[4]),
        ParentBlockNotFound,
    );
    h.check_state();
}

/// §6 test 22.
#[test]
fn remove_worker_dp_rank_clears_only_that_rank() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(1, 1, &[1, 2, 3]));
    h.ok(store_chain(2, 0, &[1, 2, 3]));
    h.remove_worker_dp_rank(1, 1);
    h.expect(&[1, 2, 3], &[(1, 0, 3), (2, 0, 3)]);
    assert_eq!(h.get_workers(), vec![1, 2]);
    h.remove_worker_dp_rank(1, 0);
    h.expect(&[1, 2, 3], &[(2, 0, 3)]);
    assert_eq!(h.get_workers(), vec![2]);
    h.check_state();
}

/// §6 test 23. Many cheap single-block stores are queued (fire and forget) right before the
/// reset, so that a reset which overtook queued events would leave some of them applied after it.
#[test]
fn rank_reset_is_ordered_after_events_accepted_before_it() {
    const QUEUED: u64 = 3_000;
    const ROUNDS: u64 = 3;
    let (_engine, ns) = engine_and_namespace();
    let mut model = ReferenceIndex::new();
    let rank1 = run(1, 10);
    let ev = store_chain(1, 1, &rank1);
    model.apply(&ev).expect("model");
    ns.apply(ev).expect("apply");
    for round in 0..ROUNDS {
        // Built before sending, so the queue fills faster than it drains.
        let events: Vec<_> = (0..QUEUED)
            .map(|i| store(1, 0, None, &[(1_000_000 + i, 1_000_000 + i)]))
            .collect();
        for ev in &events {
            model.apply(ev).expect("model");
        }
        for ev in events {
            ns.apply(ev).expect("apply");
        }
        if round % 2 == 0 {
            // A Cleared event applied and waited for lands after the rank's queued stores.
            let clear = cleared(1, 0);
            model.apply(&clear).expect("model");
            assert_eq!(event_outcome(ns.apply_and_wait(clear)), Ok(()));
        } else {
            // remove_worker_dp_rank likewise lands after everything accepted before it.
            ns.remove_worker_dp_rank(1, 0)
                .expect("remove_worker_dp_rank");
            model.remove_worker_dp_rank(1, 0);
        }
        let held = |ns: &kvindex_engine::Namespace| {
            ns.worker_block_counts()
                .into_iter()
                .find(|(stream, _)| *stream == wr(1, 0))
        };
        assert_eq!(
            held(&ns),
            None,
            "round {round}: rank 0 right after its reset"
        );
        ns.flush().expect("flush");
        assert_eq!(
            held(&ns),
            None,
            "round {round}: a queued store was applied after the reset"
        );
        assert_eq!(ns.worker_block_counts(), model.worker_block_counts());
        assert_eq!(ns.worker_block_counts(), vec![(wr(1, 1), 10)]);
        assert_eq!(
            ns.find_matches(&lh(&rank1), false).sorted(),
            expected(&[(1, 1, 10)])
        );
    }
}

/// §6 test 24.
#[test]
fn removing_the_tail_block_shortens_the_match() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(remove_chain(1, 0, &[1, 2, 3], 2..3));
    h.expect(&[1, 2, 3], &[(1, 0, 2)]);
    h.expect(&[1, 2], &[(1, 0, 2)]);
    h.check_state();
}

/// §6 test 25: Dynamo re-stores to 3 (forgets 4 and 5); kvindex revives them, giving 5 (§0.2).
#[test]
fn restoring_a_removed_mid_chain_block_revives_the_orphans_behind_it() {
    let mut h = Harness::new();
    let full = [1, 2, 3, 4, 5];
    h.ok(store_chain(1, 0, &full));
    h.ok(remove_chain(1, 0, &full, 2..3));
    h.expect(&full, &[(1, 0, 2)]);
    h.ok(store_chain_after(1, 0, &[1, 2], &[3]));
    h.expect(&full, &[(1, 0, 5)]);
    assert_eq!(h.dump(), canonical_chain(1, 0, &full));
    h.check_state();
}

/// §6 test 26.
#[test]
fn removing_an_unknown_worker_is_harmless() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.remove_worker(999);
    h.remove_worker_dp_rank(999, 3);
    h.remove_worker_dp_rank(1, 7);
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    assert_eq!(h.get_workers(), vec![1]);
    h.check_state();
}

/// §6 test 27.
#[test]
fn removing_unknown_blocks_reports_block_not_found_and_changes_nothing() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.fails(remove(1, 0, &[424242, 434343]), BlockNotFound);
    // Another worker's (or rank's) hash is unknown to this one.
    h.fails(remove_chain(2, 0, &[1, 2, 3], 0..3), BlockNotFound);
    h.fails(remove_chain(1, 1, &[1, 2, 3], 0..3), BlockNotFound);
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    assert_eq!(h.current_size(), 3);
    h.check_state();
}

/// §6 test 28.
#[test]
fn cleared_worker_can_store_again() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(cleared(1, 0));
    h.expect(&[1, 2, 3], &[]);
    h.ok(store_chain(1, 0, &[4, 5]));
    h.expect(&[4, 5], &[(1, 0, 2)]);
    h.expect(&[1, 2, 3], &[]);
    // The old hashes are gone: a continuation under them fails.
    h.fails(
        store_chain_after(1, 0, &[1, 2, 3], &[6]),
        ParentBlockNotFound,
    );
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    h.check_state();
}

/// §6 test 29.
#[test]
fn two_disjoint_sequences_per_worker_match_only_a_contiguous_prefix() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(1, 0, &[100, 101, 102]));
    h.expect(&[1, 100], &[(1, 0, 1)]);
    h.expect(&[100, 101], &[(1, 0, 2)]);
    h.expect(&[100, 2], &[(1, 0, 1)]);
    assert_eq!(h.current_size(), 6);
    h.check_state();
}

/// §6 test 30.
#[test]
fn cleared_event_affects_only_its_dp_rank() {
    let mut h = Harness::new();
    h.ok(store_chain(1, 0, &[1, 2, 3]));
    h.ok(store_chain(1, 1, &[1, 2, 3]));
    h.ok(cleared(1, 1));
    h.expect(&[1, 2, 3], &[(1, 0, 3)]);
    assert_eq!(h.get_workers(), vec![1]);
    h.check_state();
}

// ---------------------------------------------------------------------------------------------
// radix_tree.rs items
// ---------------------------------------------------------------------------------------------

#[test]
fn remove_of_unknown_block_applies_the_rest_and_reports_block_not_found() {
    let mut h = Harness::new();
    let full = [1, 2, 3, 4];
    h.ok(store_chain(1, 0, &full));
    let hashes = canonical_hashes(&full);
    h.fails(remove(1, 0, &[hashes[3], 999, hashes[2]]), BlockNotFound);
    h.expect(&full, &[(1, 0, 2)]);
    assert_eq!(h.current_size(), 2);
    h.check_state();
}

#[test]
fn batched_removal_equals_serial_removal_in_any_order() {
    let mut h = Harness::new();
    let full = run(1, 8);
    let hashes = canonical_hashes(&full);
    let doomed = [hashes[1], hashes[4], hashes[7]];
    for rank in 0..3 {
        h.ok(store_chain(1, rank, &full));
    }
    h.ok(remove(1, 0, &doomed));
    for &hash in &doomed {
        h.ok(remove(1, 1, &[hash]));
    }
    for &hash in doomed.iter().rev() {
        h.ok(remove(1, 2, &[hash]));
    }
    h.expect(&full, &[(1, 0, 1), (1, 1, 1), (1, 2, 1)]);
    let counts = h.worker_block_counts();
    assert_eq!(counts, vec![(wr(1, 0), 5), (wr(1, 1), 5), (wr(1, 2), 5)]);
    h.ok(store_chain_after(1, 1, &full[..1], &full[1..2]));
    h.expect(&full, &[(1, 0, 1), (1, 1, 4), (1, 2, 1)]);
    h.check_state();
}

// ---------------------------------------------------------------------------------------------
// LoRA / cache-namespace tests
// ---------------------------------------------------------------------------------------------

fn tokens(n: u32) -> Vec<u32> {
    (0..n).collect()
}

#[test]
fn base_and_lora_hashes_of_the_same_tokens_are_separate_paths() {
    let mut h = Harness::new();
    let t = tokens(96);
    let base = local_hashes(&t, BLOCK_SIZE);
    let lora = local_hashes_with(&t, BLOCK_SIZE, Some("my-lora"), None);
    assert_ne!(base, lora);
    h.ok(store_chain(1, 0, &raw(&base)));
    h.ok(store_chain(2, 0, &raw(&lora)));
    h.expect_lh(&base, &[(1, 0, 3)]);
    h.expect_lh(&lora, &[(2, 0, 3)]);
    // An empty LoRA name is the base model.
    h.expect_lh(
        &local_hashes_with(&t, BLOCK_SIZE, Some(""), None),
        &[(1, 0, 3)],
    );
    h.check_state();
}

#[test]
fn different_lora_adapters_do_not_conflict() {
    let mut h = Harness::new();
    let t = tokens(96);
    let a = local_hashes_with(&t, BLOCK_SIZE, Some("adapter-a"), None);
    let b = local_hashes_with(&t, BLOCK_SIZE, Some("adapter-b"), None);
    h.ok(store_chain(1, 0, &raw(&a)));
    h.ok(store_chain(2, 0, &raw(&b)));
    h.expect_lh(&a, &[(1, 0, 3)]);
    h.expect_lh(&b, &[(2, 0, 3)]);
    h.expect_lh(&local_hashes(&t, BLOCK_SIZE), &[]);
    h.check_state();
}

#[test]
fn different_cache_namespaces_do_not_conflict() {
    let mut h = Harness::new();
    let t = tokens(96);
    let a = local_hashes_with(&t, BLOCK_SIZE, None, Some("tenant-a"));
    let b = local_hashes_with(&t, BLOCK_SIZE, None, Some("tenant-b"));
    let lora_a = local_hashes_with(&t, BLOCK_SIZE, Some("tenant-a"), None);
    assert_ne!(a, lora_a, "a namespace is not a LoRA of the same name");
    h.ok(store_chain(1, 0, &raw(&a)));
    h.ok(store_chain(2, 0, &raw(&b)));
    // find_matches_for_request(tokens, None, Some("tenant-a"), None)
    h.expect_lh(
        &local_hashes_with(&t, BLOCK_SIZE, None, Some("tenant-a")),
        &[(1, 0, 3)],
    );
    h.expect_lh(&b, &[(2, 0, 3)]);
    h.expect_lh(&lora_a, &[]);
    h.check_state();
}

// ---------------------------------------------------------------------------------------------
// Long sequences
// ---------------------------------------------------------------------------------------------

fn concat(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().chain(b).copied().collect()
}

#[test]
fn long_branching_continuations_score_each_branch() {
    let mut h = Harness::new();
    let common_prefix = run(1, 30);
    let long_branch = run(1_000, 60);
    let short_branch = run(2_000, 30);
    h.ok(store_chain(1, 0, &common_prefix));
    h.ok(store_chain(2, 0, &common_prefix));
    h.ok(store_chain_after(1, 0, &common_prefix, &long_branch));
    h.ok(store_chain_after(2, 0, &common_prefix, &short_branch));
    h.expect(
        &concat(&common_prefix, &long_branch),
        &[(1, 0, 90), (2, 0, 30)],
    );
    h.expect(
        &concat(&common_prefix, &short_branch),
        &[(1, 0, 30), (2, 0, 60)],
    );
    h.check_state();
}

#[test]
fn removing_a_long_tail_leaves_the_prefix() {
    let mut h = Harness::new();
    let path = run(1, 100);
    h.ok(store_chain(1, 0, &path));
    h.ok(remove_chain(1, 0, &path, 79..100));
    h.expect(&path, &[(1, 0, 79)]);
    h.expect(&path[..79], &[(1, 0, 79)]);
    assert_eq!(h.current_size(), 79);
    h.check_state();
}

#[test]
fn scores_are_exact_at_jump_boundaries() {
    let mut h = Harness::new();
    let path = run(1, 128);
    let lengths = [31usize, 32, 33, 63, 64, 65, 96];
    for (i, &len) in lengths.iter().enumerate() {
        h.ok(store_chain(i as u64 + 1, 0, &path[..len]));
    }
    let want: Vec<(u64, u32, u32)> = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| (i as u64 + 1, 0, len as u32))
        .collect();
    h.expect(&path, &want);
    for &len in &lengths {
        let want: Vec<(u64, u32, u32)> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u64 + 1, 0, l.min(len) as u32))
            .collect();
        h.expect(&path[..len], &want);
    }
    h.check_state();
}

#[test]
fn divergence_points_around_jump_boundaries_are_exact() {
    let mut h = Harness::new();
    let base = run(1, 128);
    h.ok(store_chain(100, 0, &base));
    let points = [31usize, 32, 33, 63, 64, 65, 95, 96, 97];
    let branch = |i: usize| {
        let d = points[i];
        concat(&base[..d], &run(10_000 * (i as u64 + 1), 128 - d))
    };
    for i in 0..points.len() {
        h.ok(store_chain(i as u64 + 1, 0, &branch(i)));
    }
    // Each branch: its owner holds all of it, everyone else only the shared part of the base.
    for (i, &d) in points.iter().enumerate() {
        let want: Vec<(u64, u32, u32)> = points
            .iter()
            .enumerate()
            .map(|(j, &dj)| (j as u64 + 1, 0, if j == i { 128 } else { dj.min(d) as u32 }))
            .chain([(100, 0, d as u32)])
            .collect();
        h.expect(&branch(i), &want);
    }
    let want: Vec<(u64, u32, u32)> = points
        .iter()
        .enumerate()
        .map(|(i, &d)| (i as u64 + 1, 0, d as u32))
        .chain([(100, 0, 128)])
        .collect();
    h.expect(&base, &want);
    h.check_state();
}

#[test]
fn deep_chain_of_continuations_matches_in_full_and_by_prefix() {
    let mut h = Harness::new();
    let path = run(1, 200);
    for step in 0..20 {
        let (prefix, locals) = path[..(step + 1) * 10].split_at(step * 10);
        h.ok(store_chain_after(1, 0, prefix, locals));
    }
    h.expect(&path, &[(1, 0, 200)]);
    h.expect(&path[..75], &[(1, 0, 75)]);
    assert_eq!(h.current_size(), 200);
    h.check_state();
}

#[test]
fn clear_and_rebuild_a_long_chain() {
    let mut h = Harness::new();
    let path = run(1, 100);
    h.ok(store_chain(1, 0, &path));
    h.expect(&path, &[(1, 0, 100)]);
    h.ok(cleared(1, 0));
    h.expect(&path, &[]);
    assert_eq!(h.current_size(), 0);
    h.ok(store_chain(1, 0, &path));
    h.expect(&path, &[(1, 0, 100)]);
    h.check_state();
}

#[test]
fn three_workers_diverging_after_a_shared_prefix() {
    let mut h = Harness::new();
    let path = run(1, 100);
    let w2 = concat(&path[..40], &run(5_000, 60));
    let w3 = concat(&path[..40], &run(6_000, 60));
    h.ok(store_chain(1, 0, &path));
    h.ok(store_chain(2, 0, &w2));
    h.ok(store_chain(3, 0, &w3));
    h.expect(&path, &[(1, 0, 100), (2, 0, 40), (3, 0, 40)]);
    h.expect(&w2, &[(1, 0, 40), (2, 0, 100), (3, 0, 40)]);
    h.expect(&w3, &[(1, 0, 40), (2, 0, 40), (3, 0, 100)]);
    h.check_state();
}

#[test]
fn staggered_lengths_score_each_worker_its_own_length() {
    let mut h = Harness::new();
    let path = run(1, 100);
    let lengths = [10usize, 20, 35, 64, 100];
    for (i, &len) in lengths.iter().enumerate() {
        h.ok(store_chain(i as u64 + 1, 0, &path[..len]));
    }
    let want: Vec<(u64, u32, u32)> = lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| (i as u64 + 1, 0, len as u32))
        .collect();
    h.expect(&path, &want);
    h.check_state();
}

#[test]
fn thousand_block_chain_full_prefix_and_divergence() {
    let mut h = Harness::new();
    let path = run(1, 1000);
    h.ok(store_chain(1, 0, &path));
    h.expect(&path, &[(1, 0, 1000)]);
    h.expect(&path[..500], &[(1, 0, 500)]);
    let mut diverging = path.clone();
    diverging[499] = 9_999_999;
    h.expect(&diverging, &[(1, 0, 499)]);
    assert_eq!(h.current_size(), 1000);
    h.check_state();
}
