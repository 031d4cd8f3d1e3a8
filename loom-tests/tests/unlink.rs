//! Protocol: **the node lock and unlink, against a concurrent store through the same node.**
//!
//! Writers lock parent before child. A store walks hand over hand: it finds (or creates) the
//! child under the parent's lock and locks the child before letting the parent go. An unlink
//! happens only with the parent and the node locked, and only if the node holds nobody and has
//! no children (re-checked under both locks).
//!
//! Invariant: **a block stored concurrently with the unlink of its node (or of its parent) is
//! never lost** — the race that loses blocks in Dynamo 1.6.1's thread pool. Worker 1 removes
//! block 11 (its only holder, so the node is unlinked) while worker 2 stores the chain
//! [11, 12]; afterwards worker 2's chain is reachable with score 2, worker 1 is gone, and no
//! unlinked node is left reachable.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, removed, stored};
use loom::thread;
use std::sync::Arc;

#[test]
fn a_store_racing_an_unlink_is_never_lost() {
    model(|| {
        let idx = Arc::new(Index::new());
        let mut remover = Lane::new();
        remover.apply(&idx, &stored(1, None, &[11])).unwrap();

        let a = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || remover.apply(&idx, &removed(1, &[11])))
        };
        let b = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || Lane::new().apply(&idx, &stored(2, None, &[11, 12])))
        };
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        invariant!(ra.is_ok() && rb.is_ok(), "writers failed: {ra:?} {rb:?}");

        let got = idx.find_matches(&[11, 12]);
        invariant!(
            got == [(2, 2)],
            "worker 2's chain lost or worker 1 left over: {got:?}"
        );
        let r = idx.pin();
        let n11 = r.walk(&[11]);
        let Some(n11) = n11 else {
            return Err("block 11 unreachable".into());
        };
        let node = r.read(n11);
        invariant!(node.holders == [2], "block 11 held by {:?}", node.holders);
        let kids = r.children(n11);
        invariant!(
            kids.len() == 1 && kids[0].local == 12 && kids[0].holders == [2],
            "block 12 under 11: {kids:?}"
        );
        let roots = r.children(0);
        invariant!(
            roots.len() == 1,
            "root has {} children: {roots:?}",
            roots.len()
        );
        Ok(())
    });
}

/// The same lock protocol when the store joins only the **head** of the run its last holder is
/// leaving. Worker 1 holds the run [11, 12] alone and removes it; worker 2 stores [11]. If
/// worker 2 locks the run after worker 1 took its membership away but before worker 1's
/// unlink, it splits off [12] with the run's (now empty) membership, and worker 1's unlink then
/// sees worker 2 on [11] and stops. Invariant: **no run that nobody holds is left linked**
/// (block 12 would stay allocated, reachable and unreclaimed for good).
#[test]
fn a_store_joining_the_head_of_a_run_being_left_leaves_no_unheld_tail() {
    model(|| {
        let idx = Arc::new(Index::new());
        let mut remover = Lane::new();
        remover.apply(&idx, &stored(1, None, &[11, 12])).unwrap();

        let a = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || remover.apply(&idx, &removed(1, &[12, 11])))
        };
        let b = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || Lane::new().apply(&idx, &stored(2, None, &[11])))
        };
        let (ra, rb) = (a.join().unwrap(), b.join().unwrap());
        invariant!(ra.is_ok() && rb.is_ok(), "writers failed: {ra:?} {rb:?}");

        let got = idx.find_matches(&[11, 12]);
        invariant!(got == [(2, 1)], "scores: {got:?}");
        let r = idx.pin();
        let Some(n11) = r.walk(&[11]) else {
            return Err("block 11 unreachable".into());
        };
        invariant!(
            r.read(n11).holders == [2],
            "block 11 held by {:?}",
            r.read(n11).holders
        );
        let kids = r.children(n11);
        invariant!(
            kids.is_empty(),
            "a run nobody holds is left below 11: {kids:?}"
        );
        Ok(())
    });
}
