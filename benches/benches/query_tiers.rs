//! The engine side of `/query` (and the NATS query): the tier-aware match, with and without the
//! empty-tier fast path, on the reference workload's shape (every query scores 256 workers).
//!
//! Index: 256 workers, each holding the same 64-block chain on the device (one event each). The
//! query is the full chain, so every worker scores 64. Two states of that index:
//!
//! * `no_lower`: no lower-tier block anywhere (the common deployment);
//! * `with_lower`: workers 0..32 also hold a 16-block host_pinned continuation of the chain, and
//!   the query is the 80-block chain (32 workers extend to 80).
//!
//! Per state, `query_tiers/<state>/<call>`:
//!
//! * `find_matches`: the device-only walk (the floor);
//! * `tiered`: `Namespace::find_matches_tiered` (the fast path: nothing beyond `find_matches`
//!   in `no_lower`; only the extended streams recorded in `with_lower`);
//! * `tiered_by_instance`: `tiered` plus `TieredScores::by_instance`, everything `/query` asks
//!   of the engine before building its JSON;
//! * `tiered_exhaustive`: `Namespace::find_matches_tiered_exhaustive`, the representation used
//!   before the fast path (every device score copied into a std `HashMap`). In `no_lower` this is
//!   exactly the old cost (the old walk stopped there too); in `with_lower` it also locks the two
//!   empty tiers of each stream, which the old walk skipped, so it is an upper bound there.
//!
//! Run: `cargo bench -p kvindex-benches --bench query_tiers` (under a minute on 2 cores). No
//! result is recorded in the docs: the numbers depend on how busy the machine is.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use kvindex_benches::workload::{local_hash, seq_hashes};
use kvindex_engine::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent, StorageTier,
};
use kvindex_engine::{Engine, EngineConfig, Namespace, NamespaceKey};

const WORKERS: u64 = 256;
const DEVICE_DEPTH: u64 = 64;
const HOST_DEPTH: u64 = 16;
const EXTENDED_WORKERS: u64 = 32;

/// `locals[from..]` stored by `worker` on `tier`, under the block before `from`, with the chain's
/// sequence hashes.
fn store(worker: u64, tier: StorageTier, locals: &[u64], from: usize) -> RouterEvent {
    let exts = seq_hashes(locals);
    let blocks = locals[from..]
        .iter()
        .zip(&exts[from..])
        .map(|(&l, &e)| KvCacheStoredBlockData {
            block_hash: ExternalSequenceBlockHash(e),
            tokens_hash: LocalBlockHash(l),
            mm_extra_info: None,
        })
        .collect();
    let mut ev = RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: from
                    .checked_sub(1)
                    .map(|p| ExternalSequenceBlockHash(exts[p])),
                start_position: None,
                blocks,
            }),
            dp_rank: 0,
        },
    );
    ev.storage_tier = tier;
    ev
}

/// The namespace in state `with_lower` (or `no_lower`) and the query of that state.
fn index(engine: &Engine, with_lower: bool) -> (Namespace, Vec<LocalBlockHash>) {
    let group = if with_lower { "with_lower" } else { "no_lower" };
    let ns = engine
        .create_namespace(NamespaceKey::new("bench", group), 16)
        .expect("create_namespace");
    let chain: Vec<u64> = (1..=DEVICE_DEPTH + HOST_DEPTH).map(local_hash).collect();
    let device = DEVICE_DEPTH as usize;
    for w in 0..WORKERS {
        ns.apply(store(w, StorageTier::Device, &chain[..device], 0))
            .expect("apply");
        if with_lower && w < EXTENDED_WORKERS {
            ns.apply(store(w, StorageTier::HostPinned, &chain, device))
                .expect("apply");
        }
    }
    ns.flush().expect("flush");
    let query_len = if with_lower { chain.len() } else { device };
    let query: Vec<LocalBlockHash> = chain[..query_len]
        .iter()
        .map(|&l| LocalBlockHash(l))
        .collect();
    // The index is what the module doc says.
    let t = ns.find_matches_tiered(&query);
    assert_eq!(t.device.scores.len(), WORKERS as usize);
    let extended = if with_lower { EXTENDED_WORKERS } else { 0 };
    assert_eq!(t.tiers.len(), extended as usize);
    assert_eq!(t.sorted().len(), WORKERS as usize);
    (ns, query)
}

fn query_tiers(c: &mut Criterion) {
    let engine = Engine::new(EngineConfig {
        event_threads: 1,
        ..EngineConfig::default()
    });
    let mut group = c.benchmark_group("query_tiers");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for with_lower in [false, true] {
        let (ns, query) = index(&engine, with_lower);
        let state = if with_lower { "with_lower" } else { "no_lower" };
        group.bench_function(BenchmarkId::new(state, "find_matches"), |b| {
            b.iter(|| black_box(ns.find_matches(black_box(&query), false)))
        });
        group.bench_function(BenchmarkId::new(state, "tiered"), |b| {
            b.iter(|| black_box(ns.find_matches_tiered(black_box(&query))))
        });
        group.bench_function(BenchmarkId::new(state, "tiered_by_instance"), |b| {
            b.iter(|| black_box(ns.find_matches_tiered(black_box(&query)).by_instance()))
        });
        group.bench_function(BenchmarkId::new(state, "tiered_exhaustive"), |b| {
            b.iter(|| black_box(ns.find_matches_tiered_exhaustive(black_box(&query))))
        });
    }
    group.finish();
    engine.shutdown();
}

criterion_group!(benches, query_tiers);
criterion_main!(benches);
