//! Index operations, kvindex (`Engine` / `Namespace`) beside Dynamo 1.6.1's
//! `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` ("dynamo-crtc"), both with one event thread:
//!
//! * `find_depth/<case>/<backend>/<depth>`: one worker holds one chain of `depth` blocks; queries
//!   of `depth` blocks that match fully (`hit`), not at all (`miss`: the first block is unknown),
//!   up to half (`partial`: the second half is unknown), and a full match with `early_exit = true`
//!   (`hit_early_exit`);
//! * `find_workers/<case>/<backend>/<workers>`: the same 64-block chain held by every worker;
//! * `find_100k/{hit,partial}/<backend>`: in the 100k-block index, a 96-block sequence of worker 0
//!   (its 32-block prefix is held by all 8 workers), fully and up to the prefix;
//! * `store_remove/<backend>`: on top of the 100k-block index, store a fresh 64-block chain, remove
//!   it, flush (so the index is the same before and after every iteration);
//! * `dump/<backend>`: Dynamo-compatible dump of the 100k-block index (kvindex `Namespace::dump`,
//!   Dynamo `KvIndexerInterface::dump_events`; both include their barrier);
//! * `snapshot/kvindex`, `restore/kvindex`: kvindex's exact image of that index and loading it
//!   into an empty namespace (Dynamo has no equivalent);
//! * `reload_dump/<backend>`: apply a backend's own dump to an empty index and flush (how either
//!   rebuilds from a dump; Dynamo's only load path).
//!
//! The 100k-block index: 125 groups × 12 sequences; a group's sequences share a 32-block prefix
//! and each adds 64 blocks of its own (125 × 32 + 1500 × 64 = 100,000 distinct blocks); sequence
//! `s` is stored by worker `s % 8`, in one event from the root (128,000 (block, worker) pairs).
//!
//! Queries and events are converted to each backend's own types before the timed region; scores
//! are the backends' native `OverlapScores` (dropped inside the timed region, as a caller would).
//!
//! Run: `cargo bench -p kvindex-benches --bench index_ops` (a few minutes on 2 cores).

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion,
    SamplingMode,
};
use dynamo_kv_router::indexer::{KvIndexerInterface, SyncIndexer};
use dynamo_kv_router::protocols as dy;
use dynamo_kv_router::ConcurrentRadixTreeCompressed;
use kvindex_benches::backend::{block_on, Backend, DynamoBackend};
use kvindex_benches::backend_kvindex::KvindexBackend;
use kvindex_benches::workload::{local_hash, seq_hashes};
use kvindex_engine::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};

type Crtc = DynamoBackend<ConcurrentRadixTreeCompressed>;

/// Event threads of both backends: with the benchmark thread, the two cores of the machine.
const EVENT_THREADS: usize = 1;

const DEPTHS: [usize; 4] = [1, 64, 1024, 8192];
const WORKER_COUNTS: [u64; 4] = [1, 16, 256, 1024];
const WORKERS_DEPTH: usize = 64;
const CHURN_DEPTH: usize = 64;

/// Block ids (input of `local_hash`) of blocks never stored.
const UNKNOWN_BASE: u64 = 0xF000_0000;
/// Block ids of the store/remove chain.
const CHURN_BASE: u64 = 0xE000_0000;
const CHURN_WORKER: u64 = 9_999;

/// What the micro-benchmarks need beyond [`Backend`]: the native calls, without conversions.
trait Micro: Backend + Sized {
    fn fresh() -> Self;
    /// Native `find_matches`; the result is black-boxed and dropped.
    fn find(&self, query: &Self::Query, early_exit: bool);
    /// Native Dynamo-compatible dump (with the backend's barrier).
    fn dump_native(&self) -> Vec<Self::Event>;
}

impl Micro for KvindexBackend {
    fn fresh() -> Self {
        KvindexBackend::new(EVENT_THREADS).expect("kvindex backend")
    }
    fn find(&self, query: &Self::Query, early_exit: bool) {
        black_box(self.namespace().find_matches(query, early_exit));
    }
    fn dump_native(&self) -> Vec<RouterEvent> {
        self.namespace().dump().expect("kvindex dump")
    }
}

impl Micro for Crtc {
    fn fresh() -> Self {
        DynamoBackend::crtc(EVENT_THREADS).expect("dynamo backend")
    }
    fn find(&self, query: &Self::Query, early_exit: bool) {
        black_box(self.indexer().backend().find_matches(query, early_exit));
    }
    fn dump_native(&self) -> Vec<Self::Event> {
        block_on(self.indexer().dump_events()).expect("dynamo dump_events")
    }
}

fn locals(ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
    ids.into_iter().map(local_hash).collect()
}

fn store_event(worker: u64, locals: &[u64]) -> RouterEvent {
    let exts = seq_hashes(locals);
    let blocks = locals
        .iter()
        .zip(&exts)
        .map(|(&l, &e)| KvCacheStoredBlockData {
            block_hash: ExternalSequenceBlockHash(e),
            tokens_hash: LocalBlockHash(l),
            mm_extra_info: None,
        })
        .collect();
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                start_position: None,
                blocks,
            }),
            dp_rank: 0,
        },
    )
}

fn remove_event(worker: u64, locals: &[u64]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 1,
            data: KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: seq_hashes(locals)
                    .into_iter()
                    .map(ExternalSequenceBlockHash)
                    .collect(),
            }),
            dp_rank: 0,
        },
    )
}

fn hashes(locals: &[u64]) -> Vec<LocalBlockHash> {
    locals.iter().copied().map(LocalBlockHash).collect()
}

/// A backend holding `events`, flushed.
fn loaded<B: Micro>(events: &[RouterEvent]) -> B {
    let b = B::fresh();
    for e in events {
        b.apply(e).expect("apply");
    }
    b.flush().expect("flush");
    b
}

/// Sorted `(worker, score)` of a query, through the converting `Backend` path (checks only).
fn scores<B: Backend>(b: &B, query: &[LocalBlockHash]) -> Vec<(u64, u32)> {
    let mut s: Vec<_> = b
        .find_matches(query)
        .into_iter()
        .map(|(w, _, s)| (w, s))
        .collect();
    s.sort_unstable();
    s
}

/// The queries of one chain of `depth` blocks: `(case, query, expected score per worker)`.
fn chain_queries(chain: &[u64]) -> Vec<(&'static str, Vec<LocalBlockHash>, u32, bool)> {
    let depth = chain.len();
    let mut miss = chain.to_vec();
    miss[0] = local_hash(UNKNOWN_BASE);
    let mut out = vec![
        ("hit", hashes(chain), depth as u32, false),
        ("miss", hashes(&miss), 0, false),
    ];
    if depth >= 2 {
        let half = depth / 2;
        let mut partial = chain[..half].to_vec();
        partial.extend(locals(
            UNKNOWN_BASE + 1..UNKNOWN_BASE + 1 + (depth - half) as u64,
        ));
        out.push(("partial", hashes(&partial), half as u32, false));
    }
    out
}

fn bench_find<B: Micro>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    events: &[RouterEvent],
    cases: &[(&'static str, Vec<LocalBlockHash>, u32, bool)],
    workers: u64,
    param: u64,
    early_exit_case: bool,
) {
    let b: B = loaded(events);
    let mut run = |case: &str, query: &[LocalBlockHash], early_exit: bool| {
        let q = b.prepare_query(query);
        group.bench_with_input(
            BenchmarkId::new(format!("{case}/{}", b.name()), param),
            &q,
            |bench, q| bench.iter(|| b.find(q, early_exit)),
        );
    };
    for (case, query, expected, _) in cases {
        let want: Vec<(u64, u32)> = if *expected == 0 {
            Vec::new()
        } else {
            (0..workers).map(|w| (w, *expected)).collect()
        };
        assert_eq!(scores(&b, query), want, "{} {case} at {param}", b.name());
        run(case, query, false);
    }
    if early_exit_case {
        run("hit_early_exit", &cases[0].1, true);
    }
}

fn find_depth(c: &mut Criterion) {
    let mut group = c.benchmark_group("find_depth");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for depth in DEPTHS {
        let chain = locals(1..=depth as u64);
        let events = [store_event(0, &chain)];
        let cases = chain_queries(&chain);
        bench_find::<KvindexBackend>(&mut group, &events, &cases, 1, depth as u64, true);
        bench_find::<Crtc>(&mut group, &events, &cases, 1, depth as u64, true);
    }
    group.finish();
}

fn find_workers(c: &mut Criterion) {
    let mut group = c.benchmark_group("find_workers");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    let chain = locals(1..=WORKERS_DEPTH as u64);
    let cases = chain_queries(&chain);
    for workers in WORKER_COUNTS {
        let events: Vec<_> = (0..workers).map(|w| store_event(w, &chain)).collect();
        bench_find::<KvindexBackend>(&mut group, &events, &cases, workers, workers, false);
        bench_find::<Crtc>(&mut group, &events, &cases, workers, workers, false);
    }
    group.finish();
}

/// The events of the 100k-block index (see the module doc).
fn big_index_events() -> Vec<RouterEvent> {
    const GROUPS: u64 = 125;
    const PER_GROUP: u64 = 12;
    const PREFIX: u64 = 32;
    const OWN: u64 = 64;
    let mut events = Vec::with_capacity((GROUPS * PER_GROUP) as usize);
    for g in 0..GROUPS {
        let prefix = locals(g * PREFIX + 1..=(g + 1) * PREFIX);
        for i in 0..PER_GROUP {
            let s = g * PER_GROUP + i;
            let base = 1_000_000 + s * OWN;
            let mut chain = prefix.clone();
            chain.extend(locals(base..base + OWN));
            events.push(store_event(s % 8, &chain));
        }
    }
    events
}

fn store_remove_and_dump<B: Micro>(c: &mut Criterion, events: &[RouterEvent]) -> B
where
    B::Event: Clone,
{
    let b: B = loaded(events);
    let churn = locals(CHURN_BASE..CHURN_BASE + CHURN_DEPTH as u64);
    let probe = hashes(&churn);
    let store = b
        .prepare(&store_event(CHURN_WORKER, &churn))
        .expect("store");
    let remove = b
        .prepare(&remove_event(CHURN_WORKER, &churn))
        .expect("remove");
    // The pair leaves the index as it was.
    b.apply_prepared(store.clone()).expect("apply");
    b.flush().expect("flush");
    assert_eq!(scores(&b, &probe), vec![(CHURN_WORKER, CHURN_DEPTH as u32)]);
    b.apply_prepared(remove.clone()).expect("apply");
    b.flush().expect("flush");
    assert!(scores(&b, &probe).is_empty());

    // A 96-block sequence of the 100k-block index (32-block prefix held by 8 workers, own
    // 64 blocks by worker 0), fully matched, and diverging after the shared prefix.
    let own0 = match &events[0].event.data {
        KvCacheEventData::Stored(s) => s.blocks.iter().map(|b| b.tokens_hash.0).collect::<Vec<_>>(),
        _ => unreachable!("the 100k-block index is made of stored events"),
    };
    let mut diverging = own0[..32].to_vec();
    diverging.extend(locals(UNKNOWN_BASE + 1..UNKNOWN_BASE + 65));
    let mut group = c.benchmark_group("find_100k");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    for (case, query) in [("hit", hashes(&own0)), ("partial", hashes(&diverging))] {
        let got = scores(&b, &query);
        assert_eq!(got.len(), 8, "{case}: every worker holds the group prefix");
        assert!(got
            .iter()
            .all(|&(w, s)| s == if w == 0 && case == "hit" { 96 } else { 32 }));
        let q = b.prepare_query(&query);
        group.bench_function(format!("{case}/{}", b.name()), |bench| {
            bench.iter(|| b.find(&q, false))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("store_remove");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.bench_function(b.name(), |bench| {
        bench.iter_batched(
            || (store.clone(), remove.clone()),
            |(s, r)| {
                b.apply_prepared(s).expect("apply");
                b.apply_prepared(r).expect("apply");
                b.flush().expect("flush");
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    assert!(scores(&b, &probe).is_empty());

    let mut group = c.benchmark_group("dump");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function(b.name(), |bench| {
        bench.iter_with_large_drop(|| b.dump_native())
    });
    group.finish();

    let dump = b.dump_native();
    let mut group = c.benchmark_group("reload_dump");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    group.bench_function(b.name(), |bench| {
        bench.iter_batched(
            || (B::fresh(), dump.clone()),
            |(fresh, events)| {
                for e in events {
                    fresh.apply_prepared(e).expect("apply");
                }
                fresh.flush().expect("flush");
                fresh
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    b
}

fn big_index(c: &mut Criterion) {
    let events = big_index_events();
    let ours: KvindexBackend = store_remove_and_dump(c, &events);
    let theirs: Crtc = store_remove_and_dump(c, &events);

    // Both dumps describe the same 128,000 (block, worker) pairs.
    let ours_pairs: usize = ours
        .dump_native()
        .iter()
        .map(|e| match &e.event.data {
            KvCacheEventData::Stored(s) => s.blocks.len(),
            _ => 0,
        })
        .sum();
    let theirs_pairs: usize = theirs
        .dump_native()
        .iter()
        .map(|e| match &e.event.data {
            dy::KvCacheEventData::Stored(s) => s.blocks.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(ours_pairs, 128_000);
    assert_eq!(theirs_pairs, 128_000);
    let snapshot = ours.namespace().snapshot().expect("snapshot");
    assert_eq!(snapshot.nodes.len(), 100_000);
    assert_eq!(snapshot.pairs(), 128_000);
    drop(theirs);

    let mut group = c.benchmark_group("snapshot");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("kvindex", |bench| {
        bench.iter_with_large_drop(|| ours.namespace().snapshot().expect("snapshot"))
    });
    group.finish();

    let mut group = c.benchmark_group("restore");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("kvindex", |bench| {
        bench.iter_batched(
            KvindexBackend::fresh,
            |fresh| {
                fresh.namespace().restore(&snapshot).expect("restore");
                fresh
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();

    let check = KvindexBackend::fresh();
    check.namespace().restore(&snapshot).expect("restore");
    let again = check.namespace().snapshot().expect("snapshot");
    assert_eq!((again.nodes.len(), again.pairs()), (100_000, 128_000));
}

criterion_group!(benches, find_depth, find_workers, big_index);
criterion_main!(benches);
