//! Correctness of the mooncake-replay workload on a slice of the real trace: count invariants,
//! event-stream consistency (replayed against an independent per-worker model), and Dynamo
//! 1.6.1's answers against exact scoring of the simulated caches' final state.

use hashbrown::{HashMap, HashSet};
use kvindex_benches::backend::{Backend, DynamoBackend};
use kvindex_benches::replay::{exact_agreement, DigestBuilder};
use kvindex_benches::workload::{self, exact_scores, local_hash, Op, Workload, WorkloadConfig};
use kvindex_engine::protocol::KvCacheEventData;

fn slice_workload(cfg: &WorkloadConfig) -> Workload {
    let path = workload::default_trace_path();
    let trace = workload::load_trace(&path).unwrap_or_else(|e| {
        panic!(
            "the trace is needed for this test ({}): {e}",
            path.display()
        )
    });
    workload::generate(&trace, cfg).expect("workload generation")
}

/// First 200 requests, few workers and a small capacity: many evictions and many hits.
fn small_config() -> WorkloadConfig {
    WorkloadConfig {
        length_factor: 4,
        duplication: 2,
        workers: 8,
        capacity: 200,
        limit_requests: Some(200),
        seed: 42,
    }
}

/// Per worker: sequence hash → parent sequence hash (None at the root).
type Model = Vec<HashMap<u64, Option<u64>>>;

/// Replay the event stream into a simple model, checking every event against it.
fn check_event_stream(w: &Workload) -> Model {
    let workers = w.config.workers as usize;
    let mut model: Model = vec![HashMap::new(); workers];
    let mut last_event_id: Vec<Option<u64>> = vec![None; workers];
    let (mut stored_events, mut removed_events, mut stored_blocks, mut removed_blocks) =
        (0u64, 0u64, 0u64, 0u64);
    let mut queries = 0u64;
    let mut query_blocks = 0u64;
    for op in &w.ops {
        let ev = match op {
            Op::Query { local_hashes } => {
                // Between requests (after each stored + removed pair) no cache exceeds C.
                for (wid, cache) in model.iter().enumerate() {
                    assert!(
                        cache.len() <= w.config.capacity,
                        "worker {wid} over capacity"
                    );
                }
                queries += 1;
                query_blocks += local_hashes.len() as u64;
                continue;
            }
            Op::Event(ev) => ev,
        };
        let wid = ev.worker_id as usize;
        assert!(wid < workers, "worker id out of range");
        assert_eq!(ev.event.dp_rank, 0);
        if let Some(prev) = last_event_id[wid] {
            assert!(
                ev.event.event_id > prev,
                "event ids of worker {wid} must increase"
            );
        }
        last_event_id[wid] = Some(ev.event.event_id);
        let cache = &mut model[wid];
        match &ev.event.data {
            KvCacheEventData::Stored(s) => {
                stored_events += 1;
                assert!(!s.blocks.is_empty(), "empty stored events are skipped");
                assert!(s.start_position.is_none());
                if let Some(p) = s.parent_hash {
                    assert!(
                        cache.contains_key(&p.0),
                        "parent must be held by the worker"
                    );
                }
                let mut parent = s.parent_hash.map(|h| h.0);
                let mut prev_seq = parent;
                for b in &s.blocks {
                    // The block hash is the sequence hash of its chain.
                    let expect = match prev_seq {
                        None => b.tokens_hash.0,
                        Some(p) => workload::next_seq_hash(p, b.tokens_hash.0),
                    };
                    assert_eq!(b.block_hash.0, expect, "block_hash must be the seq hash");
                    assert!(
                        !cache.contains_key(&b.block_hash.0),
                        "stored block already held"
                    );
                    cache.insert(b.block_hash.0, parent);
                    parent = Some(b.block_hash.0);
                    prev_seq = parent;
                    stored_blocks += 1;
                }
            }
            KvCacheEventData::Removed(r) => {
                removed_events += 1;
                assert!(!r.block_hashes.is_empty());
                for h in &r.block_hashes {
                    assert!(
                        cache.contains_key(&h.0),
                        "removed block must have been stored earlier on that worker"
                    );
                    // Leaf first: no block still held has it as a parent, so within one event
                    // every child is listed before its parent.
                    assert!(
                        !cache.values().any(|p| *p == Some(h.0)),
                        "a removed block must not have a cached child (children before parents)"
                    );
                    cache.remove(&h.0);
                    removed_blocks += 1;
                }
            }
            KvCacheEventData::Cleared => panic!("the workload has no clear events"),
        }
    }
    for (wid, cache) in model.iter().enumerate() {
        assert!(
            cache.len() <= w.config.capacity,
            "worker {wid} over capacity at the end"
        );
    }
    let c = &w.counts;
    assert_eq!(c.stored_events, stored_events);
    assert_eq!(c.removed_events, removed_events);
    assert_eq!(c.events, stored_events + removed_events);
    assert_eq!(c.stored_blocks, stored_blocks);
    assert_eq!(c.removed_blocks, removed_blocks);
    assert_eq!(c.requests, queries);
    assert_eq!(c.requests, c.trace_requests * w.config.duplication);
    assert_eq!(c.query_blocks, query_blocks);
    model
}

#[test]
fn counts_and_event_stream_invariants() {
    let w = slice_workload(&small_config());
    let c = &w.counts;
    assert_eq!(c.trace_requests, 200);
    assert!(c.removed_blocks > 0, "the slice must force evictions");
    assert!(c.removed_events > 0);
    let model = check_event_stream(&w);

    // stored − removed = sum of the final cache sizes, and the model equals the simulator.
    let live: usize = w.final_caches.iter().map(Vec::len).sum();
    assert_eq!(c.live_pairs(), live as u64);
    for (wid, cache) in w.final_caches.iter().enumerate() {
        let sim: HashSet<u64> = cache.iter().map(|h| h.0).collect();
        let replayed: HashSet<u64> = model[wid].keys().copied().collect();
        assert_eq!(
            sim, replayed,
            "worker {wid}: final cache differs from the event replay"
        );
        // Prefix-closed: every held block's parent is held.
        for parent in model[wid].values().flatten() {
            assert!(model[wid].contains_key(parent));
        }
    }

    // Queries are the full, uncapped expanded requests.
    let first = match w.ops.first() {
        Some(Op::Query { local_hashes }) => local_hashes.clone(),
        other => panic!("the stream starts with a query, got {other:?}"),
    };
    assert_eq!(first.first().map(|h| h.0), Some(local_hash(0)));
}

#[test]
fn generation_is_deterministic() {
    let a = slice_workload(&small_config());
    let b = slice_workload(&small_config());
    assert_eq!(a.ops, b.ops);
    assert_eq!(a.counts, b.counts);
}

#[test]
fn default_parameters_on_a_slice() {
    // The real parameters (F=16, D=4, W=256, C=16384) on a short slice: no evictions yet, the
    // expansion and interleaving are visible.
    let cfg = WorkloadConfig {
        limit_requests: Some(50),
        ..WorkloadConfig::default()
    };
    let w = slice_workload(&cfg);
    check_event_stream(&w);
    assert_eq!(w.counts.requests, 200);
    // Copies are interleaved and live in disjoint id spaces of the same shape.
    let queries = w.queries();
    let span = w.counts.max_expanded_id + 1;
    assert_eq!(queries[0].len(), queries[1].len());
    assert_eq!(queries[0].len() % 16, 0);
    assert_eq!(queries[1][0].0, local_hash(span));
    assert_eq!(queries[0][17].0, local_hash(17));
}

fn check_backend_against_exact<B: Backend>(backend: &B, w: &Workload) {
    for ev in w.events() {
        backend.apply(ev).expect("apply");
    }
    backend.flush().expect("flush");
    let sets: Vec<HashSet<u64>> = w
        .final_caches
        .iter()
        .map(|c| c.iter().map(|h| h.0).collect())
        .collect();
    let mut nonzero = 0usize;
    let mut digest = DigestBuilder::new();
    for (i, q) in w.queries().into_iter().enumerate() {
        let mut got = backend.find_matches(q);
        got.sort_unstable();
        let want = exact_scores(&sets, q);
        nonzero += want.len();
        assert_eq!(
            got,
            want,
            "{}: query {i} differs from exact scoring",
            backend.name()
        );
        digest.add(i, &mut got);
    }
    assert!(nonzero > 0, "some queries must match");
    // The harness's exact digest (holder-set walk) agrees with the per-worker scoring.
    assert_eq!(digest.finish(), exact_agreement(w));
}

#[test]
fn dynamo_crtc_matches_exact_scoring() {
    let w = slice_workload(&small_config());
    let backend = DynamoBackend::crtc(2).expect("backend");
    check_backend_against_exact(&backend, &w);
}

#[test]
fn dynamo_positional_matches_exact_scoring() {
    let w = slice_workload(&small_config());
    let backend = DynamoBackend::positional(2).expect("backend");
    check_backend_against_exact(&backend, &w);
}

#[test]
fn local_hash_matches_dynamo() {
    use dynamo_kv_router::protocols::{
        compute_block_hash_for_seq, compute_seq_hash_for_block, BlockHashOptions,
        LocalBlockHash as DyLocal,
    };
    let ids = [0u64, 1, 17, 2_924_639, 11_698_559];
    let tokens: Vec<u32> = ids.iter().flat_map(|&x| [x as u32; 16]).collect();
    let dy = compute_block_hash_for_seq(&tokens, 16, BlockHashOptions::default());
    let ours: Vec<u64> = ids.iter().map(|&x| local_hash(x)).collect();
    assert_eq!(dy.iter().map(|h| h.0).collect::<Vec<_>>(), ours);
    let dy_seq = compute_seq_hash_for_block(&ours.iter().map(|&h| DyLocal(h)).collect::<Vec<_>>());
    assert_eq!(dy_seq, workload::seq_hashes(&ours));
}
