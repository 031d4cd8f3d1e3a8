//! Protocol: **clearing a stream while another stream splits one of its runs.**
//!
//! `clear` (a `cleared` event, also worker removal) scans the node arena and drops the stream
//! from every node that holds it. A split by another stream copies the run's members, the
//! cleared stream included, into a new node, and that node may take a recycled index the scan
//! has already passed. So the scan repeats until a pass finds nothing (`Tree::clear`).
//!
//! Worker 3 frees a low node index first; worker 1 holds the run [11, 12, 13] at a higher
//! index; then worker 1 clears while worker 2 stores [11], which splits worker 1's run and puts
//! the tail [12, 13] in the recycled low index. Invariant: afterwards worker 1 holds nothing
//! (checked on the tail itself: an orphaned holding would not show in a query), and worker 2
//! holds [11]. A single-pass scan fails this model.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{advance_epoch, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{cleared, model, removed, stored};
use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn a_clear_racing_a_split_leaves_nothing_behind() {
    static TAIL_BELOW_HEAD: AtomicUsize = AtomicUsize::new(0);
    model(|| {
        let idx = Arc::new(Index::new());
        let mut w3 = Lane::new();
        let mut w1 = Lane::new();
        w3.apply(&idx, &stored(3, None, &[99])).unwrap();
        w1.apply(&idx, &stored(1, None, &[11, 12, 13])).unwrap();
        w3.apply(&idx, &removed(3, &[99])).unwrap();
        advance_epoch();

        let (head, b12) = {
            let r = idx.pin();
            let b11 = r.walk(&[11]).expect("setup stored 11");
            (r.run_of(b11), r.walk(&[11, 12]).expect("setup stored 12"))
        };
        let splitter = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || Lane::new().apply(&idx, &stored(2, None, &[11])))
        };
        let r1 = w1.apply(&idx, &cleared(1));
        let r2 = splitter.join().unwrap();
        invariant!(r1.is_ok() && r2.is_ok(), "writers failed: {r1:?} {r2:?}");
        if idx.pin().run_of(b12) < head {
            TAIL_BELOW_HEAD.fetch_add(1, Ordering::Relaxed);
        }
        let got = idx.find_matches(&[11, 12, 13]);
        invariant!(
            got == [(2, 1)],
            "after worker 1's clear: {got:?} (worker 1 must be gone)"
        );
        let tail = idx.find_matches(&[12, 13]);
        invariant!(tail.is_empty(), "a root-level run appeared: {tail:?}");
        // Orphaned holdings do not score (the head lost worker 1), so look at the tail itself.
        let held = idx.pin().read(b12).holders;
        invariant!(
            !held.contains(&1),
            "worker 1 still holds block 12 after its clear: {held:?}"
        );
        Ok(())
    });
    assert!(
        TAIL_BELOW_HEAD.load(Ordering::Relaxed) > 0,
        "vacuous model: the split's tail never took an index below the run's"
    );
}
