//! Protocol: **adding and removing workers' membership of a node while a reader scores.**
//!
//! A node's holders are one `members` word: inline for up to two slots, else a pointer to an
//! immutable heap bitset. The writer (the event thread owning the moving worker's stream)
//! replaces the word whole under the node's lock bit, publishes it with Release and retires the
//! old heap set through the epoch collector. Readers pin an epoch and load the word with
//! Acquire. (Two writers on one node serialise on its lock: `unlink.rs` covers writer against
//! writer.)
//!
//! Invariants:
//! * **No over-report, no lost stable holder:** a query reports exactly the workers that held the
//!   block at some moment during the query — workers 1 and 3, who hold it throughout, are always
//!   reported; worker 2 (leaving) or 4 (joining) may or may not be; nobody else ever is.
//! * **A reader never dereferences a retired set after it was freed:** the loom build tracks
//!   every heap set, and dereferencing a freed one fails the model (see `sync::heap_read`).
//! * **Slot identity:** every slot a reader sees maps to the worker that owns it.
//! * After the writer finishes, the holders are exactly {1, 3} plus the joiner.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{warm_up, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, removed, stored};
use loom::thread;
use std::sync::Arc;

const BLOCK: u64 = 11;

fn check(what: &str, holders: &[u64]) -> Result<(), String> {
    invariant!(
        holders.contains(&1) && holders.contains(&3),
        "{what}: stable holders 1 and 3 missing from {holders:?}"
    );
    invariant!(
        holders.iter().all(|w| [1, 2, 3, 4].contains(w)),
        "{what}: a worker that never held the block in {holders:?}"
    );
    let mut sorted = holders.to_vec();
    sorted.dedup();
    invariant!(
        sorted.len() == holders.len(),
        "{what}: duplicate holder in {holders:?}"
    );
    Ok(())
}

/// Workers 1 and 3 hold the block throughout; `mover` (2 or 4) leaves or joins while the
/// reader scores. Three holders at any time, so the word is a heap set: every change builds a new
/// set and retires the old one while the reader may hold it.
fn holder_changes_while_a_reader_scores(mover: u64, joins: bool) {
    model(move || {
        let idx = Arc::new(Index::new());
        let mut stable = Lane::new();
        let mut moving = Lane::new();
        stable.apply(&idx, &stored(1, None, &[BLOCK])).unwrap();
        stable.apply(&idx, &stored(3, None, &[BLOCK])).unwrap();
        if !joins {
            moving.apply(&idx, &stored(mover, None, &[BLOCK])).unwrap();
        }
        let writer = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || {
                warm_up();
                let event = if joins {
                    stored(mover, None, &[BLOCK])
                } else {
                    removed(mover, &[BLOCK])
                };
                moving.apply(&idx, &event)
            })
        };

        // The reader: the production query, then the raw word as a reader sees it.
        let scores = idx.find_matches(&[BLOCK]);
        if joins {
            eprintln!("scores {scores:?}");
        }
        let seen = {
            let r = idx.pin();
            r.walk(&[BLOCK]).map(|n| r.read(n).holders)
        };

        let w = writer.join().unwrap();
        invariant!(w.is_ok(), "writer failed: {w:?}");
        invariant!(
            scores.iter().all(|&(_, s)| s == 1),
            "scores other than 1 in {scores:?}"
        );
        let reported: Vec<u64> = scores.iter().map(|&(w, _)| w).collect();
        check("query", &reported)?;
        let Some(seen) = seen else {
            return Err("a reader lost the node of a block held throughout".into());
        };
        check("members word", &seen)?;

        let after: Vec<u64> = idx.find_matches(&[BLOCK]).iter().map(|&(w, _)| w).collect();
        let expected: &[u64] = if joins { &[1, 3, mover] } else { &[1, 3] };
        invariant!(after == expected, "after the writer, holders are {after:?}");
        drop(stable);
        Ok(())
    });
}

#[test]
fn a_worker_joining_while_a_reader_scores() {
    holder_changes_while_a_reader_scores(4, true);
}

#[test]
fn a_worker_leaving_while_a_reader_scores() {
    holder_changes_while_a_reader_scores(2, false);
}
