//! Protocol: **retiring and reclaiming a node while a reader is pinned.**
//!
//! Removing the last holder of a leaf unlinks it (parent and node locked) and hands its index to
//! the free list through the epoch collector (`release_unlinked`: one deferred batch per event).
//! The writer's next allocation takes from the free list, re-initialising the node with new
//! contents. A reader pins an epoch for the whole walk.
//!
//! Invariant: **a node a pinned reader reached is not recycled while it stays pinned** — every
//! read of it during the pin shows the block it was reached by (key 11, held by worker 1 or
//! by nobody once removed), never the block the recycled node holds next (key 12). The model
//! also checks that it is not vacuous: in some executions the index *is* recycled.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{advance_epoch, plant_eager_reclamation, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, removed, stored};
use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const OLD: u64 = 11;
const NEW: u64 = 12;

fn pinned_reader_and_recycling_writer(recycled: &'static AtomicUsize) {
    model(move || {
        let idx = Arc::new(Index::new());
        let mut lane = Lane::new();
        lane.apply(&idx, &stored(1, None, &[OLD])).unwrap();
        let old_index = idx.pin().walk(&[OLD]).expect("setup stored the block");

        let reader = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || {
                let r = idx.pin();
                let Some(n) = r.walk(&[OLD]) else {
                    return Ok(());
                };
                let first = r.read(n);
                thread::yield_now();
                let second = r.read(n);
                for seen in [first, second] {
                    if seen.local != OLD || seen.holders.iter().any(|&w| w != 1) {
                        return Err(format!(
                            "a pinned reader saw its node recycled: {seen:?} (reached as key {OLD})"
                        ));
                    }
                }
                Ok(())
            })
        };

        // The writer: remove the block (unlink + deferred free), let epochs pass as later
        // events would, and store a new block, which takes a recycled index when it can.
        let r1 = lane.apply(&idx, &removed(1, &[OLD]));
        advance_epoch();
        let r2 = lane.apply(&idx, &stored(1, None, &[NEW]));

        let seen = reader.join().unwrap();
        invariant!(r1.is_ok() && r2.is_ok(), "writer failed: {r1:?} {r2:?}");
        seen?;
        let new_index = idx.pin().walk(&[NEW]);
        invariant!(new_index.is_some(), "the new block is not reachable");
        if new_index == Some(old_index) {
            recycled.fetch_add(1, Ordering::Relaxed);
        }
        invariant!(
            idx.find_matches(&[OLD]).is_empty() && idx.find_matches(&[NEW]) == [(1, 1)],
            "final state wrong"
        );
        Ok(())
    });
}

#[test]
fn a_pinned_reader_never_sees_its_node_recycled() {
    static RECYCLED: AtomicUsize = AtomicUsize::new(0);
    pinned_reader_and_recycling_writer(&RECYCLED);
    assert!(
        RECYCLED.load(Ordering::Relaxed) > 0,
        "vacuous model: the node was never recycled"
    );
}

/// The planted bug: unlinked nodes go back to the free list without a grace period. loom must
/// find a pinned reader that sees its node re-initialised as the new block.
#[test]
#[should_panic(expected = "recycled")]
fn planted_bug_reclaiming_without_a_grace_period_is_caught() {
    static RECYCLED: AtomicUsize = AtomicUsize::new(0);
    plant_eager_reclamation(true);
    pinned_reader_and_recycling_writer(&RECYCLED);
}
