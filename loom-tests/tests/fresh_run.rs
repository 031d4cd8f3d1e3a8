//! Protocol: **another stream splits a run its creator has just grown, before the creator has
//! recorded its private hashes.**
//!
//! A store that grows fresh blocks links them and unlocks every node first, then claims their
//! external hashes in the shared map (a long batch, made without locks), then records a private
//! exception for each fresh block whose hash another block already owns. Between the unlock and
//! that last step another stream may join the fresh run and split it, so the run's node no
//! longer spans every fresh block: the creator must walk the blocks it grew, not the node's
//! extent of the moment.
//!
//! Worker 9 holds a block (local 50) named 1012, the hash worker 2 will give its second block.
//! Worker 2 stores [11, 12] (named 1011, 1012): a fresh run whose block 12 cannot own 1012, so
//! worker 2 needs an exception for it. Meanwhile worker 3 stores [11], which joins the fresh run
//! and splits it after 11. Invariants: worker 2 can then remove 1012 (its block 12), and holds
//! [11] only; worker 9's block is untouched. Walking the node's extent after the unlock (the
//! bug this model was written for, planted below) loses worker 2's exception, and the remove
//! fails with `BlockNotFound`.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{plant_late_fresh_extents, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{ext, model, removed, stored, stored_as};
use loom::thread;
use std::sync::Arc;

fn fresh_run_split_by_a_joiner() {
    model(|| {
        let idx = Arc::new(Index::new());
        Lane::new()
            .apply(&idx, &stored_as(9, None, &[(50, ext(12))]))
            .unwrap();
        let joiner = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || Lane::new().apply(&idx, &stored(3, None, &[11])))
        };
        let mut w2 = Lane::new();
        let grown = w2.apply(&idx, &stored(2, None, &[11, 12]));
        let joined = joiner.join().unwrap();
        invariant!(
            grown.is_ok() && joined.is_ok(),
            "writers failed: {grown:?} {joined:?}"
        );
        let both = idx.find_matches(&[11, 12]);
        invariant!(
            both.contains(&(2, 2)),
            "worker 2 does not hold its two blocks: {both:?}"
        );
        let r = w2.apply(&idx, &removed(2, &[12]));
        invariant!(r.is_ok(), "worker 2 could not remove its block 12: {r:?}");
        let after = idx.find_matches(&[11, 12]);
        invariant!(
            after == [(2, 1), (3, 1)],
            "after worker 2 removed block 12: {after:?}"
        );
        let other = idx.find_matches(&[50]);
        invariant!(other == [(9, 1)], "worker 9's block changed: {other:?}");
        Ok(())
    });
}

#[test]
fn a_split_of_a_fresh_run_keeps_its_creators_private_hashes() {
    fresh_run_split_by_a_joiner();
}

/// The planted bug: the store reads the fresh runs' extents after unlocking them.
#[test]
#[should_panic(expected = "could not remove its block 12")]
fn planted_bug_reading_fresh_extents_after_unlock_is_caught() {
    plant_late_fresh_extents(true);
    fresh_run_split_by_a_joiner();
}
