//! Protocol: **publishing a new node (a new child link) while a reader walks.**
//!
//! An event thread allocates a node, initialises it with Relaxed stores (key, holders, links),
//! and only then links it into its parent: the parent's `children` word (one inline child) or one
//! entry of the parent's child table is stored with Release. Readers never lock: they load the
//! link with Acquire and then read the child's fields.
//!
//! Invariant: **a reader that sees a link sees the child fully initialised** — its key is the
//! key it was stored under (never the zero of a fresh node), it is held by the worker that
//! stored it, and that worker's slot maps back to the right worker id (the slot's identity is
//! published by the same Release). A query may miss the block while it is in flight, never
//! report it half-built.
#![cfg(loom)]

use kvindex_engine::loom_hooks::{plant_weak_publication, Index, Lane};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, stored};
use loom::thread;
use std::sync::Arc;

const ROOT: u32 = 0;
const WRITER: u64 = 8;
const OLD: u64 = 7;

/// The reader side: walk the root's children as `find_matches` would, and check each one.
/// Returns the violation, if any (asserted by the caller once the other threads are joined:
/// loom cannot unwind a model while other threads are still running).
fn check_children(idx: &Index, expected: &[(u64, u64)]) -> Result<(), String> {
    let r = idx.pin();
    for c in r.children(ROOT) {
        let Some(want) = expected.iter().find(|(local, _)| *local == c.local) else {
            return Err(format!(
                "a reader saw a child with key {:#x}: not initialised",
                c.local
            ));
        };
        if c.holders != [want.1] {
            return Err(format!(
                "child {:#x} seen with holders {:?}, stored by {}",
                c.local, c.holders, want.1
            ));
        }
    }
    Ok(())
}

/// The root has no child; a writer stores block 11 (the root's `children` word becomes the new
/// node's index) while a reader walks and queries.
fn first_child() {
    model(|| {
        let idx = Arc::new(Index::new());
        let writer = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || {
                Lane::new()
                    .apply(&idx, &stored(WRITER, None, &[11]))
                    .unwrap();
            })
        };
        let seen = check_children(&idx, &[(11, WRITER)]);
        let got = idx.find_matches(&[11]);
        writer.join().unwrap();
        seen?;
        invariant!(got.is_empty() || got == [(WRITER, 1)], "query saw {got:?}");
        let after = idx.find_matches(&[11]);
        invariant!(
            after == [(WRITER, 1)],
            "after the store, query saw {after:?}"
        );
        Ok(())
    });
}

#[test]
fn a_reader_never_sees_a_half_built_first_child() {
    first_child();
}

/// The root already has three children, so its child table has room: the writer's new child
/// goes into one table entry in place (the entry store is the publication).
#[test]
fn a_reader_never_sees_a_half_built_child_table_entry() {
    model(|| {
        let idx = Arc::new(Index::new());
        let mut setup = Lane::new();
        for b in [11, 12, 13] {
            setup.apply(&idx, &stored(OLD, None, &[b])).unwrap();
        }
        let writer = {
            let idx = Arc::clone(&idx);
            thread::spawn(move || {
                Lane::new()
                    .apply(&idx, &stored(WRITER, None, &[14]))
                    .unwrap();
            })
        };
        let seen = check_children(&idx, &[(11, OLD), (12, OLD), (13, OLD), (14, WRITER)]);
        let got = idx.find_matches(&[14]);
        writer.join().unwrap();
        seen?;
        invariant!(got.is_empty() || got == [(WRITER, 1)], "query saw {got:?}");
        let after = idx.find_matches(&[14]);
        invariant!(
            after == [(WRITER, 1)],
            "after the store, query saw {after:?}"
        );
        drop(setup);
        Ok(())
    });
}

/// The planted bug: the same model with the link published `Relaxed` instead of `Release`.
/// loom must find an execution where the reader sees the link but not the child's key.
#[test]
#[should_panic(expected = "not initialised")]
fn planted_bug_relaxed_publication_is_caught() {
    plant_weak_publication(true);
    first_child();
}
