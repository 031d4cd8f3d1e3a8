//! Protocol: **splitting a run while a reader walks it.**
//!
//! A node is a run of blocks that the same workers hold. When a worker comes to hold only a
//! prefix of a run, the writer splits it under the node's lock: the tail becomes a new node
//! (a copy of the members, all the children), then the node's children word becomes the tail,
//! then its extent shrinks (Release each), and only then is the new member added to the head.
//! Readers load members, then extent, then children (Acquire each) and accept a child only if
//! it starts at the depth they reached.
//!
//! Worker 1 holds the run [11, 12, 13] with the block [14] below it; worker 2 stores [11, 12],
//! which splits the run after 12, while a reader queries [11, 12, 13, 13]. Invariants:
//! * worker 2 is never credited with more than the 2 blocks it stores;
//! * worker 1 is never credited with more than 3: the query's fourth block (13) is not what
//!   worker 1 holds at depth 4 (14). A reader that saw the old extent (3 blocks) and the new
//!   children (the tail, whose first block is 13) would match the tail at the wrong depth and
//!   report 4 without the depth check; the planted bug shows loom finds that execution.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{plant_no_depth_check, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, stored};
use loom::thread;
use std::sync::Arc;

fn split_while_reading() {
    model(|| {
        let idx = Arc::new(Index::new());
        let mut w1 = Lane::new();
        w1.apply(&idx, &stored(1, None, &[11, 12, 13])).unwrap();
        w1.apply(&idx, &stored(1, Some(13), &[14])).unwrap();

        let writer = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || Lane::new().apply(&idx, &stored(2, None, &[11, 12])))
        };
        let seen = idx.find_matches(&[11, 12, 13, 13]);
        let written = writer.join().unwrap();
        invariant!(written.is_ok(), "writer failed: {written:?}");
        for &(worker, score) in &seen {
            let most = if worker == 1 { 3 } else { 2 };
            invariant!(
                score <= most,
                "worker {worker} reported with {score} blocks (holds {most} of the query)"
            );
        }
        invariant!(
            seen.iter().any(|&(w, _)| w == 1),
            "worker 1 (which held its blocks throughout) is missing: {seen:?}"
        );
        let after = idx.find_matches(&[11, 12, 13, 14]);
        invariant!(after == [(1, 4), (2, 2)], "final state wrong: {after:?}");
        Ok(())
    });
}

#[test]
fn a_reader_never_over_reports_across_a_split() {
    split_while_reading();
}

/// The planted bug: readers take a child without checking its depth.
#[test]
#[should_panic(expected = "reported with 4 blocks")]
fn planted_bug_no_depth_check_is_caught() {
    plant_no_depth_check(true);
    split_while_reading();
}
