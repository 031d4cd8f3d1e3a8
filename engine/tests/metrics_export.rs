//! The event counters reach the `metrics` crate with Dynamo's names and labels (INDEXER.md §7).
//! Its own test binary, because it installs a process-wide recorder before any engine starts.

use kvindex_engine::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

mod common;

fn stored(w: u64, blocks: &[(u64, u64)], parent: Option<u64>) -> RouterEvent {
    common::store(w, 0, parent, blocks)
}

#[test]
fn applied_and_warning_counters_carry_dynamo_names_and_labels() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("no other recorder in this test binary");

    let engine = Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 16,
        ..EngineConfig::default()
    });
    let ns = engine
        .create_namespace(NamespaceKey::new("m", "g"), 4)
        .unwrap();
    ns.apply_and_wait(stored(1, &[(11, 1), (12, 2)], None))
        .unwrap();
    ns.apply_and_wait(stored(1, &[(11, 1), (12, 2)], None))
        .unwrap(); // duplicate
    let _ = ns.apply_and_wait(stored(1, &[(13, 3)], Some(999))); // unknown parent

    let mut found = std::collections::HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let k = key.key();
        let mut labels: Vec<String> = k
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        if let DebugValue::Counter(n) = value {
            found.insert(format!("{}{{{}}}", k.name(), labels.join(",")), n);
        }
    }
    assert_eq!(
        found.get("dynamo_kvrouter_kv_cache_events_applied{event_type=stored,status=ok}"),
        Some(&2),
        "{found:?}"
    );
    assert_eq!(
        found.get(
            "dynamo_kvrouter_kv_cache_events_applied{event_type=stored,status=parent_block_not_found}"
        ),
        Some(&1),
        "{found:?}"
    );
    assert_eq!(
        found.get("dynamo_kvrouter_kv_cache_event_warnings{warning_kind=duplicate_store}"),
        Some(&1),
        "{found:?}"
    );
}
