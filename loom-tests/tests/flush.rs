//! Protocol: **the `flush()` barrier.**
//!
//! `Namespace::apply` routes each event to the event thread ("lane") that owns its stream and
//! queues it (FIFO per lane). `flush()` sends a barrier task through every lane and waits for
//! every lane's reply; a lane replies only after it has applied everything queued before the
//! barrier. The engine, lanes and queues here are the production code (`Engine`, `Lanes`,
//! `run_lane`); under loom the queues are the shim's mutex + condvar channel and the lanes are
//! loom threads.
//!
//! Invariant: **once `flush()` returns, every event accepted before it is visible to a query on
//! the flushing thread** — here two workers' blocks, stored through two different lanes, are
//! both scored.
#![cfg(loom)]

use kvindex_engine::{Engine, EngineConfig, LocalBlockHash, NamespaceKey};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::{model, stored};

#[test]
fn flush_makes_every_accepted_event_visible() {
    model(|| {
        let engine = Engine::new(EngineConfig {
            event_threads: 1,
            queue_capacity: 2,
            ..EngineConfig::default()
        });
        let key = NamespaceKey::new("m", "g");
        let ns = engine
            .create_namespace(key.clone(), 4)
            .map_err(|e| e.to_string())?;
        // Two streams, queued on the one lane behind each other.
        ns.apply(stored(1, None, &[11]))
            .map_err(|e| e.to_string())?;
        ns.apply(stored(2, None, &[12]))
            .map_err(|e| e.to_string())?;
        ns.flush().map_err(|e| e.to_string())?;
        let a = ns.find_matches(&[LocalBlockHash(11)], false);
        let b = ns.find_matches(&[LocalBlockHash(12)], false);
        drop(ns);
        // The engine's registry holds namespace handles, which hold the engine: remove the
        // namespace so that the engine (and its loom channels) is freed within the model.
        engine.remove_namespace(&key).map_err(|e| e.to_string())?;
        engine.shutdown();
        let score = |s: &kvindex_engine::OverlapScores, w: u64| {
            s.scores
                .iter()
                .find(|(k, _)| k.worker_id == w)
                .map(|(_, &v)| v)
        };
        invariant!(
            score(&a, 1) == Some(1) && a.scores.len() == 1,
            "after flush, block 11 scored {:?}",
            a.scores
        );
        invariant!(
            score(&b, 2) == Some(1) && b.scores.len() == 1,
            "after flush, block 12 scored {:?}",
            b.scores
        );
        Ok(())
    });
}

/// Two lanes: the barrier goes through both, and the event queued on the first lane must be
/// applied before `flush()` returns, whichever lane answers first.
#[test]
fn flush_waits_for_every_lane() {
    model(|| {
        let engine = Engine::new(EngineConfig {
            event_threads: 2,
            queue_capacity: 2,
            ..EngineConfig::default()
        });
        let key = NamespaceKey::new("m", "g");
        let ns = engine
            .create_namespace(key.clone(), 4)
            .map_err(|e| e.to_string())?;
        ns.apply(stored(1, None, &[11]))
            .map_err(|e| e.to_string())?;
        ns.flush().map_err(|e| e.to_string())?;
        let a = ns.find_matches(&[LocalBlockHash(11)], false);
        drop(ns);
        engine.remove_namespace(&key).map_err(|e| e.to_string())?;
        engine.shutdown();
        invariant!(
            a.scores.len() == 1 && a.scores.values().all(|&v| v == 1),
            "after flush, block 11 scored {:?}",
            a.scores
        );
        Ok(())
    });
}
