//! The behaviour vectors S1–S20 of INDEXER.md §3.8, with kvindex's expected values (the
//! "kvindex's expected values" list after the table wins over the measured Dynamo values where §0
//! makes kvindex differ). Every test drives the engine and the reference model side by side
//! ([`common::Harness`]): each event's outcome, each query and each dump must agree between the two
//! and with the expected value written in the test.
//!
//! Notation as in §3.8: `st(w; [(block_hash, tokens_hash)..]; parent)`, `rm(w; [block_hash..])`.

mod common;

use common::*;
use kvindex_engine::reference::{dump_canonical, ReferenceIndex};
use kvindex_engine::{KvCacheEvent, KvCacheEventData, KvCacheEventError};

use KvCacheEventError::{BlockNotFound, InvalidBlockSequence, ParentBlockNotFound};

/// S1's two stores: w1 holds [1,2,3,4] (hashes 11..14), w2 holds [1,2,30] (hashes 11,12,23).
fn s1() -> Harness {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2), (13, 3), (14, 4)]));
    h.ok(store(2, 0, None, &[(11, 1), (12, 2), (23, 30)]));
    h
}

/// S2: S1, then w1 removes its second block.
fn s2() -> Harness {
    let mut h = s1();
    h.ok(remove(1, 0, &[12]));
    h
}

#[test]
fn s01_scores_are_the_longest_contiguous_prefix_per_worker() {
    let h = s1();
    h.expect(&[1, 2, 3, 4], &[(1, 0, 4), (2, 0, 2)]);
    h.expect(&[1, 2, 30], &[(1, 0, 2), (2, 0, 3)]);
    h.expect(&[1], &[(1, 0, 1), (2, 0, 1)]);
    h.expect(&[9, 1], &[]);
    h.expect(&[], &[]);
    // early_exit: kvindex keeps the measured value of the table (the walk finishes).
    assert_eq!(
        h.scores_of(&lh(&[1, 2, 3, 4]), true),
        expected(&[(1, 0, 4), (2, 0, 2)])
    );
    assert_eq!(h.current_size(), 7);
    assert_eq!(h.worker_block_counts(), vec![(wr(1, 0), 4), (wr(2, 0), 3)]);
    assert_eq!(h.get_workers(), vec![1, 2]);
    h.check_state();
}

#[test]
fn s02_removing_a_mid_chain_block_stops_the_match_at_the_gap_and_keeps_orphans() {
    let mut h = s2();
    h.expect(&[1, 2, 3, 4], &[(1, 0, 1), (2, 0, 2)]);
    // kvindex's dump omits w1's orphans 13 and 14 (their parent 12 is gone)...
    let dump = h.dump();
    let mut want = canonical_set(&[(1, 0, vec![1], 11)]);
    want.extend(canonical_set(&[
        (2, 0, vec![1], 11),
        (2, 0, vec![1, 2], 12),
        (2, 0, vec![1, 2, 30], 23),
    ]));
    assert_eq!(dump, want);
    // ...but still holds them: they count in the size, and re-storing 12 revives them (§0.2).
    assert_eq!(h.current_size(), 6);
    h.ok(store(1, 0, Some(11), &[(12, 2)]));
    h.expect(&[1, 2, 3, 4], &[(1, 0, 4), (2, 0, 2)]);
    h.check_state();
}

#[test]
fn s03_store_under_an_unknown_parent_fails_and_applies_nothing() {
    let mut h = s2();
    h.fails(store(3, 0, Some(12345), &[(99, 9)]), ParentBlockNotFound);
    h.expect(&[9], &[]);
    assert_eq!(h.current_size(), 6);
    h.check_state();
}

#[test]
fn s04_remove_of_an_unknown_block_or_worker_reports_block_not_found() {
    let mut h = s2();
    h.fails(remove(1, 0, &[424242]), BlockNotFound);
    h.fails(remove(55, 0, &[424242]), BlockNotFound);
    h.expect(&[1, 2, 3, 4], &[(1, 0, 1), (2, 0, 2)]);
    assert_eq!(h.current_size(), 6);
    h.check_state();
}

#[test]
fn s05_dp_ranks_score_and_clear_independently() {
    let mut h = s2();
    h.ok(store(1, 1, None, &[(11, 1), (12, 2)]));
    h.expect(&[1, 2, 3], &[(1, 0, 1), (1, 1, 2), (2, 0, 2)]);
    h.ok(cleared(1, 1));
    h.expect(&[1, 2, 3], &[(1, 0, 1), (2, 0, 2)]);
    h.ok(cleared(2, 0));
    h.expect(&[1, 2, 3], &[(1, 0, 1)]);
    h.remove_worker(1);
    h.expect(&[1, 2, 3], &[]);
    assert!(h.dump().is_empty());
    assert!(h.ns.dump().expect("dump").is_empty());
    // A cleared stream stays known; a removed worker does not.
    assert_eq!(h.get_workers(), vec![2]);
    assert_eq!(h.current_size(), 0);
    h.check_state();
}

#[test]
fn s06_orphans_stay_removable_and_count_again_once_the_gap_is_restored() {
    let mut h = Harness::new();
    h.ok(store(
        1,
        0,
        None,
        &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
    ));
    h.ok(remove(1, 0, &[13]));
    h.expect(&[1, 2, 3, 4, 5], &[(1, 0, 2)]);
    assert_eq!(
        h.dump(),
        canonical_set(&[(1, 0, vec![1], 11), (1, 0, vec![1, 2], 12)])
    );
    // kvindex: 14 is still held (an orphan), so removing it succeeds.
    h.ok(remove(1, 0, &[14]));
    h.ok(store(1, 0, Some(12), &[(13, 3)]));
    // 14 is gone; 15 is an orphan behind the gap.
    h.expect(&[1, 2, 3, 4, 5], &[(1, 0, 3)]);
    assert_eq!(h.current_size(), 4);
    h.ok(store(1, 0, Some(13), &[(14, 4), (15, 5)]));
    h.expect(&[1, 2, 3, 4, 5], &[(1, 0, 5)]);
    assert_eq!(
        h.dump(),
        canonical_set(&[
            (1, 0, vec![1], 11),
            (1, 0, vec![1, 2], 12),
            (1, 0, vec![1, 2, 3], 13),
            (1, 0, vec![1, 2, 3, 4], 14),
            (1, 0, vec![1, 2, 3, 4, 5], 15),
        ])
    );
    assert_eq!(h.current_size(), 5);
    h.check_state();
}

#[test]
fn s07_early_exit_with_a_single_worker_still_scores_the_whole_chain() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2), (13, 3), (14, 4)]));
    assert_eq!(
        h.scores_of(&lh(&[1, 2, 3, 4]), true),
        expected(&[(1, 0, 4)])
    );
    h.expect(&[1, 2, 3, 4], &[(1, 0, 4)]);
}

#[test]
fn s08_storing_the_same_blocks_twice_is_accepted_and_changes_nothing() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2)]));
    h.ok(store(1, 0, None, &[(11, 1), (12, 2)]));
    h.expect(&[1, 2], &[(1, 0, 2)]);
    assert_eq!(h.current_size(), 2);
    assert_eq!(h.model.duplicate_store_warnings(), 1);
    assert_eq!(h.ns.event_counters().duplicate_store, 1);
    h.check_state();
}

#[test]
fn s09_a_block_whose_hash_is_its_parent_hash_is_an_invalid_sequence() {
    let mut h = Harness::new();
    h.fails(
        store(1, 0, Some(12), &[(12, 2), (13, 3)]),
        InvalidBlockSequence,
    );
    // Also when the parent is held: nothing of the event is applied.
    h.ok(store(1, 0, None, &[(12, 2)]));
    h.fails(
        store(1, 0, Some(12), &[(13, 3), (12, 2)]),
        InvalidBlockSequence,
    );
    h.expect(&[2, 3], &[(1, 0, 1)]);
    assert_eq!(h.current_size(), 1);
    h.check_state();
}

#[test]
fn s10_empty_store_and_remove_are_accepted_but_an_unknown_parent_is_not() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[]));
    h.ok(remove(1, 0, &[]));
    h.fails(store(1, 0, Some(999), &[]), ParentBlockNotFound);
    assert_eq!(h.current_size(), 0);
    assert!(h.worker_block_counts().is_empty());
    assert_eq!(h.model.duplicate_store_warnings(), 0);
    h.check_state();
}

#[test]
fn s11_a_parent_held_only_by_another_worker_is_not_found() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2)]));
    h.fails(store(2, 0, Some(12), &[(13, 3)]), ParentBlockNotFound);
    h.expect(&[1, 2, 3], &[(1, 0, 2)]);
    assert_eq!(h.current_size(), 2);
    h.check_state();
}

#[test]
fn s12_each_worker_keeps_and_removes_by_its_own_external_hashes() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2)]));
    h.ok(store(2, 0, None, &[(21, 1), (22, 2)]));
    h.expect(&[1, 2], &[(1, 0, 2), (2, 0, 2)]);
    assert_eq!(
        h.dump(),
        canonical_set(&[
            (1, 0, vec![1], 11),
            (1, 0, vec![1, 2], 12),
            (2, 0, vec![1], 21),
            (2, 0, vec![1, 2], 22),
        ])
    );
    // kvindex (§0.1): w2's own hash removes its block; w1's hash is unknown to w2.
    h.ok(remove(2, 0, &[22]));
    h.expect(&[1, 2], &[(1, 0, 2), (2, 0, 1)]);
    h.fails(remove(2, 0, &[12]), BlockNotFound);
    h.expect(&[1, 2], &[(1, 0, 2), (2, 0, 1)]);
    assert_eq!(
        h.dump(),
        canonical_set(&[
            (1, 0, vec![1], 11),
            (1, 0, vec![1, 2], 12),
            (2, 0, vec![1], 21)
        ])
    );
    h.check_state();
}

#[test]
fn s13_removing_the_first_block_hides_the_chain_but_keeps_its_blocks_removable() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2), (13, 3)]));
    h.ok(remove(1, 0, &[11]));
    h.expect(&[1, 2, 3], &[]);
    assert!(h.dump().is_empty());
    // kvindex: 12 is still held as an orphan, so its removal succeeds.
    h.ok(remove(1, 0, &[12]));
    h.expect(&[1, 2, 3], &[]);
    assert_eq!(h.current_size(), 1);
    h.check_state();
}

#[test]
fn s14_full_range_u64_hashes_are_indexed_and_negative_hashes_do_not_parse() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(u64::MAX, u64::MAX - 1)]));
    h.expect(&[u64::MAX - 1], &[(1, 0, 1)]);
    assert_eq!(
        h.dump(),
        canonical_set(&[(1, 0, vec![u64::MAX - 1], u64::MAX)])
    );
    let max = r#"{"event_id":1,"data":{"stored":{"parent_hash":null,
        "blocks":[{"block_hash":18446744073709551615,"tokens_hash":18446744073709551614}]}}}"#;
    let parsed: KvCacheEvent = serde_json::from_str(max).expect("2^64-1 is a valid hash");
    let KvCacheEventData::Stored(s) = parsed.data else {
        panic!("not a store")
    };
    assert_eq!(s.blocks[0].block_hash.0, u64::MAX);
    let negative = r#"{"event_id":1,"data":{"stored":{"parent_hash":null,
        "blocks":[{"block_hash":-5,"tokens_hash":1}]}}}"#;
    assert!(serde_json::from_str::<KvCacheEvent>(negative).is_err());
}

#[test]
fn s15_start_position_is_accepted_and_dumped_as_null() {
    let mut h = Harness::new();
    let mut ev = store(1, 0, None, &[(11, 1), (12, 2)]);
    let KvCacheEventData::Stored(s) = &mut ev.event.data else {
        unreachable!()
    };
    s.start_position = Some(5);
    h.ok(ev);
    h.expect(&[1, 2], &[(1, 0, 2)]);
    // `dump()` checks start_position is None in every dumped event.
    assert_eq!(
        h.dump(),
        canonical_set(&[(1, 0, vec![1], 11), (1, 0, vec![1, 2], 12)])
    );
}

#[test]
fn s16_clear_all_blocks_empties_every_rank_but_keeps_the_worker_listed() {
    let mut h = Harness::new();
    for (worker, rank) in [(1, 0), (1, 3), (2, 0)] {
        h.ok(store(worker, rank, None, &[(11, 1)]));
    }
    h.expect(&[1], &[(1, 0, 1), (1, 3, 1), (2, 0, 1)]);
    h.clear_all_blocks(1);
    h.expect(&[1], &[(2, 0, 1)]);
    assert_eq!(h.get_workers(), vec![1, 2]);
    h.remove_worker(12345);
    h.expect(&[1], &[(2, 0, 1)]);
    assert_eq!(h.worker_block_counts(), vec![(wr(2, 0), 1)]);
    h.check_state();
}

#[test]
fn s17_removing_every_block_in_reverse_order_empties_the_index() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2), (13, 3)]));
    h.ok(remove(1, 0, &[13, 12, 11]));
    h.expect(&[1, 2, 3], &[]);
    assert!(h.dump().is_empty());
    assert_eq!(h.current_size(), 0);
    h.check_state();
}

#[test]
fn s18_remove_batch_with_an_unknown_hash_still_removes_the_known_ones() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2), (13, 3)]));
    h.fails(remove(1, 0, &[999, 13]), BlockNotFound);
    h.expect(&[1, 2, 3], &[(1, 0, 2)]);
    assert_eq!(h.current_size(), 2);
    h.check_state();
}

#[test]
fn s19_orphan_in_a_later_store_is_revived_when_its_parent_returns() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1), (12, 2)]));
    h.ok(store(1, 0, Some(12), &[(13, 3)]));
    h.ok(store(2, 0, None, &[(11, 1), (12, 2), (23, 30)]));
    h.ok(remove(1, 0, &[12]));
    h.expect(&[1, 2, 3], &[(1, 0, 1), (2, 0, 2)]);

    // kvindex's dump leaves out the orphan 13, so it replays cleanly into a fresh namespace.
    let dump = h.raw_dump();
    let replay = create_namespace(&h.engine, ns_key_named("replay"), BLOCK_SIZE);
    let mut replayed_model = ReferenceIndex::new();
    for ev in &dump {
        assert_eq!(
            event_outcome(replay.apply_and_wait(ev.clone())),
            Ok(()),
            "replaying {ev:?}"
        );
        replayed_model.apply(ev).expect("model replay");
    }
    assert_eq!(
        assert_dump_well_formed(&replay.dump().expect("dump")),
        dump_canonical(&dump)
    );
    assert_eq!(
        replay.find_matches(&lh(&[1, 2, 3]), false).sorted(),
        expected(&[(1, 0, 1), (2, 0, 2)])
    );
    assert_eq!(
        replayed_model.find_matches(&lh(&[1, 2, 3]), false).sorted(),
        expected(&[(1, 0, 1), (2, 0, 2)])
    );

    h.ok(store(1, 0, Some(11), &[(12, 2)]));
    h.expect(&[1, 2, 3], &[(1, 0, 3), (2, 0, 2)]);
    h.check_state();
}

#[test]
fn s20_a_chain_stored_block_by_block_dumps_as_one_chain() {
    let mut h = Harness::new();
    h.ok(store(1, 0, None, &[(11, 1)]));
    for i in 2..=5u64 {
        h.ok(store(1, 0, Some(10 + i - 1), &[(10 + i, i)]));
    }
    let w1: Vec<_> = (1..=5u64)
        .map(|n| (1, 0, run(1, n as usize), 10 + n))
        .collect();
    assert_eq!(h.dump(), canonical_set(&w1));
    h.ok(store(
        2,
        0,
        None,
        &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
    ));
    h.ok(store(2, 0, Some(15), &[(16, 6)]));
    h.expect(&[1, 2, 3, 4, 5, 6], &[(1, 0, 5), (2, 0, 6)]);
    let w2: Vec<_> = (1..=6u64)
        .map(|n| (2, 0, run(1, n as usize), 10 + n))
        .collect();
    let mut want = canonical_set(&w1);
    want.extend(canonical_set(&w2));
    assert_eq!(h.dump(), want);
    h.check_state();
}

/// A namespace of model "m" with another routing group.
fn ns_key_named(group: &str) -> kvindex_engine::NamespaceKey {
    kvindex_engine::NamespaceKey::new("m", group)
}
