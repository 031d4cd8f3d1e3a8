//! Per-block cost of a query walk on one long chain (warm cache), for design decisions.
//! `cargo run --release -p kvindex-benches --example walk_floor`
use kvindex_engine::*;
use std::time::Instant;

fn main() {
    let engine = Engine::new(EngineConfig {
        event_threads: 1,
        queue_capacity: 16,
        ..EngineConfig::default()
    });
    let ns = engine
        .create_namespace(NamespaceKey::new("m", "g"), 16)
        .unwrap();
    let n = 4000u64;
    let blocks: Vec<_> = (0..n)
        .map(|i| KvCacheStoredBlockData {
            block_hash: ExternalSequenceBlockHash(1_000_000 + i),
            tokens_hash: LocalBlockHash(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            mm_extra_info: None,
        })
        .collect();
    let query: Vec<_> = blocks.iter().map(|b| b.tokens_hash).collect();
    for w in 0..3u64 {
        let ev = RouterEvent::new(
            w,
            KvCacheEvent {
                event_id: 0,
                dp_rank: 0,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    start_position: None,
                    blocks: if w == 0 {
                        blocks.clone()
                    } else {
                        blocks[..8].to_vec()
                    },
                }),
            },
        );
        ns.apply_and_wait(ev).unwrap();
    }
    for _ in 0..100 {
        ns.find_matches(&query, false);
    }
    let reps = 2000;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(ns.find_matches(&query, false));
    }
    let per = t.elapsed().as_nanos() as f64 / reps as f64;
    println!(
        "{:.1} µs per 4000-block query, {:.2} ns per block",
        per / 1000.0,
        per / n as f64
    );
}
