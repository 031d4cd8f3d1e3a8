//! The engine and the reference model agree, orphans included, on the event streams the log
//! tests generate (unique external hashes, few distinct locals, mid-chain removals, clears):
//! the premise of every "recovered index equals the model" assertion in this crate.

mod common;
use common::*;
use kvindex_engine::*;

#[test]
fn engine_state_equals_the_model_after_every_generated_event() {
    let engine = small_engine();
    let ns = engine
        .create_namespace(NamespaceKey::new("m", "g"), 4)
        .expect("namespace");
    let mut model = Model::default();
    let streams = vec![WorkerWithDpRank::new(10, 0), WorkerWithDpRank::new(10, 1)];
    let mut gen = EventGen::new(7, streams);
    for i in 0..1500 {
        let ev = gen.next_event();
        let _ = ns.apply_and_wait(ev.clone());
        model.apply(&ev);
        let engine_state = ns.snapshot().expect("snapshot").canonical();
        assert_eq!(
            engine_state,
            model.canonical(),
            "diverged after event {i}: {ev:?}"
        );
    }
}
