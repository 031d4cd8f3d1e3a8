//! Shared helpers for the engine's integration tests: event builders, a local copy of the
//! token hashing, and a [`Harness`] that drives the engine and the reference model side by side.
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use kvindex_engine::reference::{dump_canonical, CanonicalBlock, ReferenceIndex};
use kvindex_engine::{
    Engine, EngineConfig, EngineError, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheEventError, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash,
    Namespace, NamespaceKey, ResidencyDomain, RouterEvent, StorageTier, WorkerWithDpRank,
};

/// Block size of every namespace in these tests unless stated otherwise (Dynamo's tests use 32).
pub const BLOCK_SIZE: u32 = 32;

// ---------------------------------------------------------------------------------------------
// Engine construction
// ---------------------------------------------------------------------------------------------

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        event_threads: 2,
        queue_capacity: 1024,
        ..EngineConfig::default()
    }
}

pub fn new_engine() -> Engine {
    Engine::new(engine_config())
}

/// The default test namespace: model "m", routing group "default".
pub fn ns_key() -> NamespaceKey {
    NamespaceKey::new("m", "default")
}

pub fn create_namespace(engine: &Engine, key: NamespaceKey, block_size: u32) -> Namespace {
    engine
        .create_namespace(key, block_size)
        .expect("create_namespace")
}

/// An engine with the default test namespace.
pub fn engine_and_namespace() -> (Engine, Namespace) {
    let engine = new_engine();
    let ns = create_namespace(&engine, ns_key(), BLOCK_SIZE);
    (engine, ns)
}

// ---------------------------------------------------------------------------------------------
// Hashing (INDEXER.md §2.1/§2.2).
// TODO: switch to `kvindex_engine::hashing::{compute_block_hash_for_seq, compute_seq_hash_for_block}`
// once that module lands; this local copy only keeps the tests independent of it meanwhile.
// ---------------------------------------------------------------------------------------------

pub const XXH3_SEED: u64 = 1337;

fn xxh3(bytes: &[u8], seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(bytes, seed)
}

/// The per-block hash seed: 1337 plus the LoRA (inner seed 0) and cache namespace (inner seed 1)
/// hashes; empty strings count as absent.
pub fn salt_seed(lora_name: Option<&str>, cache_namespace: Option<&str>) -> u64 {
    let mut seed = XXH3_SEED;
    if let Some(lora) = lora_name.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3(lora.as_bytes(), 0));
    }
    if let Some(namespace) = cache_namespace.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3(namespace.as_bytes(), 1));
    }
    seed
}

/// Local block hashes of the full blocks of `tokens` (a partial tail is dropped).
pub fn local_hashes_with(
    tokens: &[u32],
    block_size: u32,
    lora_name: Option<&str>,
    cache_namespace: Option<&str>,
) -> Vec<LocalBlockHash> {
    if block_size == 0 {
        return Vec::new();
    }
    let seed = salt_seed(lora_name, cache_namespace);
    tokens
        .chunks_exact(block_size as usize)
        .map(|block| {
            let bytes: Vec<u8> = block.iter().flat_map(|t| t.to_le_bytes()).collect();
            LocalBlockHash(xxh3(&bytes, seed))
        })
        .collect()
}

pub fn local_hashes(tokens: &[u32], block_size: u32) -> Vec<LocalBlockHash> {
    local_hashes_with(tokens, block_size, None, None)
}

/// The rolling sequence hashes: seq[0] = local[0], seq[i] = xxh3(le(seq[i-1]) ‖ le(local[i]), 1337).
pub fn seq_hashes(locals: &[LocalBlockHash]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::with_capacity(locals.len());
    for local in locals {
        let next = match out.last() {
            None => local.0,
            Some(prev) => {
                let mut bytes = [0u8; 16];
                bytes[..8].copy_from_slice(&prev.to_le_bytes());
                bytes[8..].copy_from_slice(&local.0.to_le_bytes());
                xxh3(&bytes, XXH3_SEED)
            }
        };
        out.push(next);
    }
    out
}

/// `[1, 2, 3]` → local hashes 1, 2, 3 (Dynamo's tests use small integers as local hashes).
pub fn lh(locals: &[u64]) -> Vec<LocalBlockHash> {
    locals.iter().map(|&l| LocalBlockHash(l)).collect()
}

/// Local hashes as bare u64s (the form the chain builders take).
pub fn raw(locals: &[LocalBlockHash]) -> Vec<u64> {
    locals.iter().map(|l| l.0).collect()
}

/// The canonical external hashes of a path of small-integer local hashes.
pub fn canonical_hashes(path: &[u64]) -> Vec<u64> {
    seq_hashes(&lh(path))
}

// ---------------------------------------------------------------------------------------------
// Event builders
// ---------------------------------------------------------------------------------------------

static NEXT_EVENT_ID: AtomicU64 = AtomicU64::new(1);

pub fn wr(worker_id: u64, dp_rank: u32) -> WorkerWithDpRank {
    WorkerWithDpRank::new(worker_id, dp_rank)
}

/// A device-tier event without a residency domain (the legacy default).
pub fn event(worker_id: u64, dp_rank: u32, data: KvCacheEventData) -> RouterEvent {
    RouterEvent::new(
        worker_id,
        KvCacheEvent {
            event_id: NEXT_EVENT_ID.fetch_add(1, Ordering::Relaxed),
            data,
            dp_rank,
        },
    )
}

/// A store of explicit `(block_hash, tokens_hash)` pairs under `parent` (root when `None`).
pub fn store(
    worker_id: u64,
    dp_rank: u32,
    parent: Option<u64>,
    blocks: &[(u64, u64)],
) -> RouterEvent {
    event(
        worker_id,
        dp_rank,
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(ExternalSequenceBlockHash),
            start_position: None,
            blocks: blocks
                .iter()
                .map(|&(block_hash, tokens_hash)| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(block_hash),
                    tokens_hash: LocalBlockHash(tokens_hash),
                    mm_extra_info: None,
                })
                .collect(),
        }),
    )
}

pub fn remove(worker_id: u64, dp_rank: u32, block_hashes: &[u64]) -> RouterEvent {
    event(
        worker_id,
        dp_rank,
        KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: block_hashes
                .iter()
                .map(|&h| ExternalSequenceBlockHash(h))
                .collect(),
        }),
    )
}

pub fn cleared(worker_id: u64, dp_rank: u32) -> RouterEvent {
    event(worker_id, dp_rank, KvCacheEventData::Cleared)
}

/// Dynamo's `make_store_event`: a root store of `path` with canonical sequence hashes.
pub fn store_chain(worker_id: u64, dp_rank: u32, path: &[u64]) -> RouterEvent {
    store_chain_after(worker_id, dp_rank, &[], path)
}

/// Dynamo's `make_store_event_with_parent`: `locals` stored under the last block of `prefix`,
/// every hash taken from the canonical chain of `prefix ++ locals`.
pub fn store_chain_after(
    worker_id: u64,
    dp_rank: u32,
    prefix: &[u64],
    locals: &[u64],
) -> RouterEvent {
    let full: Vec<u64> = prefix.iter().chain(locals).copied().collect();
    let hashes = canonical_hashes(&full);
    let parent = prefix.len().checked_sub(1).map(|i| hashes[i]);
    let blocks: Vec<(u64, u64)> = hashes[prefix.len()..]
        .iter()
        .copied()
        .zip(locals.iter().copied())
        .collect();
    store(worker_id, dp_rank, parent, &blocks)
}

/// Remove the blocks of `path` at `positions`, by their canonical hashes.
pub fn remove_chain(
    worker_id: u64,
    dp_rank: u32,
    path: &[u64],
    positions: Range<usize>,
) -> RouterEvent {
    let hashes = canonical_hashes(path);
    remove(worker_id, dp_rank, &hashes[positions])
}

/// `n` distinct small local hashes starting at `start`.
pub fn run(start: u64, n: usize) -> Vec<u64> {
    (start..start + n as u64).collect()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// A dump must be Stored events only: the device tier first, then host_pinned, disk and
/// external (one block per event); ids renumbered from 0 per tier, `"worker"` domain, no start
/// positions or multimodal info, device parents before children (checked by `dump_canonical`).
/// Returns the device blocks, canonically.
pub fn assert_dump_well_formed(dump: &[RouterEvent]) -> BTreeSet<CanonicalBlock> {
    let mut next_id: std::collections::BTreeMap<StorageTier, u64> = Default::default();
    let mut last_tier = StorageTier::Device;
    for (i, e) in dump.iter().enumerate() {
        assert!(
            e.storage_tier >= last_tier,
            "dump event {i}: tiers out of order"
        );
        last_tier = e.storage_tier;
        let id = next_id.entry(e.storage_tier).or_insert(0);
        assert_eq!(
            e.event.event_id, *id,
            "dump event ids must be renumbered 0..n per tier"
        );
        *id += 1;
        if e.storage_tier != StorageTier::Device {
            let KvCacheEventData::Stored(s) = &e.event.data else {
                panic!("dump event {i} is not a Stored event: {e:?}");
            };
            assert_eq!(s.blocks.len(), 1, "lower-tier dump event {i}: one block");
        }
        assert_eq!(
            e.residency_domain,
            Some(ResidencyDomain::Worker),
            "dump event {i} must carry residency_domain \"worker\""
        );
        let KvCacheEventData::Stored(s) = &e.event.data else {
            panic!("dump event {i} is not a Stored event: {e:?}");
        };
        assert_eq!(s.start_position, None, "dump event {i}");
        assert!(!s.blocks.is_empty(), "dump event {i} stores no block");
        assert!(
            s.blocks.iter().all(|b| b.mm_extra_info.is_none()),
            "dump event {i} carries mm_extra_info"
        );
    }
    dump_canonical(dump)
}

/// A short description of a query for assertion messages (long queries are elided).
pub fn describe(query: &[LocalBlockHash]) -> String {
    if query.len() <= 12 {
        format!("{:?}", raw(query))
    } else {
        let (head, tail) = (raw(&query[..4]), raw(&query[query.len() - 4..]));
        format!("{} blocks {head:?}..{tail:?}", query.len())
    }
}

/// `(worker, dp_rank, score)` triples → the shape of `OverlapScores::sorted()`.
pub fn expected(scores: &[(u64, u32, u32)]) -> Vec<(WorkerWithDpRank, u32)> {
    let mut v: Vec<_> = scores.iter().map(|&(w, r, s)| (wr(w, r), s)).collect();
    v.sort_unstable();
    v
}

/// `(worker, dp_rank, path, external hash)` → the canonical dump triples.
pub fn canonical_set(blocks: &[(u64, u32, Vec<u64>, u64)]) -> BTreeSet<CanonicalBlock> {
    blocks
        .iter()
        .map(|(w, r, path, ext)| (wr(*w, *r), lh(path), ExternalSequenceBlockHash(*ext)))
        .collect()
}

/// Canonical triples of a chain of `path` stored by one stream with canonical hashes.
pub fn canonical_chain(worker_id: u64, dp_rank: u32, path: &[u64]) -> BTreeSet<CanonicalBlock> {
    let hashes = canonical_hashes(path);
    (1..=path.len())
        .map(|len| {
            (
                wr(worker_id, dp_rank),
                lh(&path[..len]),
                ExternalSequenceBlockHash(hashes[len - 1]),
            )
        })
        .collect()
}

/// Map an engine call's outcome to the event outcome; any other engine failure fails the test.
pub fn event_outcome(result: Result<(), EngineError>) -> Result<(), KvCacheEventError> {
    match result {
        Ok(()) => Ok(()),
        Err(EngineError::Event(e)) => Err(e),
        Err(other) => panic!("engine call failed: {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Harness: the engine and the reference model, side by side
// ---------------------------------------------------------------------------------------------

/// Drives one engine namespace and one reference model with the same operations, and checks that
/// they agree on every outcome it observes.
pub struct Harness {
    pub engine: Engine,
    pub ns: Namespace,
    pub model: ReferenceIndex,
}

impl Harness {
    pub fn new() -> Self {
        let (engine, ns) = engine_and_namespace();
        Self {
            engine,
            ns,
            model: ReferenceIndex::new(),
        }
    }

    /// Apply and wait; the engine and the model must report the same outcome.
    pub fn apply(&mut self, ev: RouterEvent) -> Result<(), KvCacheEventError> {
        let model = self.model.apply(&ev);
        let engine = event_outcome(self.ns.apply_and_wait(ev.clone()));
        assert_eq!(
            engine, model,
            "engine (left) and reference (right) disagree on {ev:?}"
        );
        engine
    }

    /// Apply an event that must succeed.
    pub fn ok(&mut self, ev: RouterEvent) {
        let outcome = self.apply(ev.clone());
        assert_eq!(outcome, Ok(()), "event should apply cleanly: {ev:?}");
    }

    /// Apply an event that must fail with `error`.
    pub fn fails(&mut self, ev: RouterEvent, error: KvCacheEventError) {
        let outcome = self.apply(ev.clone());
        assert_eq!(outcome, Err(error), "event should fail: {ev:?}");
    }

    pub fn scores_of(
        &self,
        query: &[LocalBlockHash],
        early_exit: bool,
    ) -> Vec<(WorkerWithDpRank, u32)> {
        let engine = self.ns.find_matches(query, early_exit);
        let model = self.model.find_matches(query, early_exit);
        assert!(
            engine.frequencies.is_empty(),
            "frequencies is legacy and must be empty"
        );
        assert_eq!(
            engine.sorted(),
            model.sorted(),
            "engine (left) and reference (right) disagree on query {}",
            describe(query)
        );
        engine.sorted()
    }

    /// Scores of a query of small-integer local hashes (engine and model must agree).
    pub fn scores(&self, query: &[u64]) -> Vec<(WorkerWithDpRank, u32)> {
        self.scores_of(&lh(query), false)
    }

    /// Assert the scores of `query`, as `(worker, dp_rank, score)` triples.
    pub fn expect(&self, query: &[u64], scores: &[(u64, u32, u32)]) {
        self.expect_lh(&lh(query), scores);
    }

    pub fn expect_lh(&self, query: &[LocalBlockHash], scores: &[(u64, u32, u32)]) {
        let want = expected(scores);
        assert_eq!(
            self.ns.find_matches(query, false).sorted(),
            want,
            "engine scores for {}",
            describe(query)
        );
        assert_eq!(
            self.model.find_matches(query, false).sorted(),
            want,
            "reference scores for {}",
            describe(query)
        );
    }

    pub fn remove_worker(&mut self, worker_id: u64) {
        self.ns.remove_worker(worker_id).expect("remove_worker");
        self.model.remove_worker(worker_id);
    }

    pub fn remove_worker_dp_rank(&mut self, worker_id: u64, dp_rank: u32) {
        self.ns
            .remove_worker_dp_rank(worker_id, dp_rank)
            .expect("remove_worker_dp_rank");
        self.model.remove_worker_dp_rank(worker_id, dp_rank);
    }

    pub fn clear_all_blocks(&mut self, worker_id: u64) {
        self.ns
            .clear_all_blocks(worker_id)
            .expect("clear_all_blocks");
        self.model.clear_all_blocks(worker_id);
    }

    /// The engine's dump (well-formed, canonicalised); it must equal the model's reachable state.
    pub fn dump(&self) -> BTreeSet<CanonicalBlock> {
        let engine = assert_dump_well_formed(&self.ns.dump().expect("dump"));
        let model = assert_dump_well_formed(&self.model.dump());
        assert_eq!(
            engine, model,
            "engine (left) and reference (right) dumps differ"
        );
        assert_eq!(model, self.model.canonical());
        engine
    }

    /// The raw engine dump (after checking it against the model).
    pub fn raw_dump(&self) -> Vec<RouterEvent> {
        let dump = self.ns.dump().expect("dump");
        assert_eq!(assert_dump_well_formed(&dump), self.model.canonical());
        dump
    }

    pub fn current_size(&self) -> usize {
        let engine = self.ns.current_size();
        assert_eq!(
            engine,
            self.model.current_size(),
            "current_size: engine (left), reference (right)"
        );
        engine
    }

    pub fn worker_block_counts(&self) -> Vec<(WorkerWithDpRank, usize)> {
        let engine = self.ns.worker_block_counts();
        assert_eq!(
            engine,
            self.model.worker_block_counts(),
            "worker_block_counts: engine (left), reference (right)"
        );
        engine
    }

    pub fn get_workers(&self) -> Vec<u64> {
        let engine = self.ns.get_workers();
        assert_eq!(
            engine,
            self.model.get_workers(),
            "get_workers: engine (left), reference (right)"
        );
        engine
    }

    /// Every read API of the engine agrees with the model.
    pub fn check_state(&self) {
        self.get_workers();
        self.current_size();
        self.worker_block_counts();
        self.dump();
        self.exact_snapshot();
    }

    /// The engine's exact image (orphans and private hashes included) equals every block the
    /// model holds.
    pub fn exact_snapshot(&self) {
        let engine: BTreeSet<_> = self
            .ns
            .snapshot()
            .expect("snapshot")
            .canonical()
            .into_iter()
            .collect();
        let model: BTreeSet<_> = self
            .model
            .held_blocks()
            .into_iter()
            .map(|(s, path, ext)| (s, path.iter().map(|l| l.0).collect::<Vec<_>>(), ext.0))
            .collect();
        assert_eq!(
            engine, model,
            "engine snapshot (left) and model (right) differ"
        );
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny deterministic PRNG (SplitMix64), so tests need no extra dependency.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
