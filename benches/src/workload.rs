//! Workload `mooncake-replay v1` (`shared/bench/WORKLOAD.md`): turns the Mooncake conversation
//! trace into the KV events and overlap queries a router-side indexer sees.
//!
//! Pipeline: [`load_trace`] (parse + stable sort by timestamp) → [`generate`] (expansion by the
//! length factor `F` and duplication `D`, worker assignment with splitmix64, local / sequence
//! hashes, prefix-aware LRU worker caches) → [`Workload`]: the op stream ([`Op`]) plus counts and
//! the simulated caches' final state.
//!
//! Everything is deterministic: the same trace and [`WorkloadConfig`] give the same op stream.

use std::path::{Path, PathBuf};

use hashbrown::HashMap;
use kvindex_engine::protocol::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The XXH3 seed of both the local and the sequence hash (INDEXER.md §2.1, §2.2).
pub const HASH_SEED: u64 = 1337;

/// Seed of the splitmix64 worker-assignment generator.
pub const DEFAULT_SEED: u64 = 42;

/// Why the trace could not be loaded or the workload could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read trace {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace line {line}: {source}")]
    Parse {
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("trace line {line}: timestamp is not a finite number")]
    BadTimestamp { line: usize },
    #[error("invalid workload parameter: {0}")]
    InvalidConfig(String),
    #[error("expanded block id overflows u64 (trace id {trace_id}, copy {copy})")]
    IdOverflow { trace_id: u64, copy: u64 },
}

/// One trace line (only the fields the workload uses).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// 1-based line number in the trace file (tie-breaker of the timestamp sort, error messages).
    pub line: usize,
    /// Milliseconds since the start of the trace.
    pub timestamp: f64,
    /// Prefix-block ids of 512-token trace blocks.
    pub hash_ids: Vec<u64>,
}

#[derive(Deserialize)]
struct RawLine {
    timestamp: f64,
    hash_ids: Vec<u64>,
}

/// `<repo>/../shared/data/traces/conversation_trace.jsonl`, where `<repo>` is the workspace root
/// this crate was built from.
pub fn default_trace_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared")
        .join("data")
        .join("traces")
        .join("conversation_trace.jsonl")
}

/// Parse JSONL trace text (blank lines are skipped) and sort it by timestamp; ties keep line order.
pub fn parse_trace(text: &str) -> Result<Vec<TraceRequest>, WorkloadError> {
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let parsed: RawLine =
            serde_json::from_str(raw).map_err(|source| WorkloadError::Parse { line, source })?;
        if !parsed.timestamp.is_finite() {
            return Err(WorkloadError::BadTimestamp { line });
        }
        out.push(TraceRequest {
            line,
            timestamp: parsed.timestamp,
            hash_ids: parsed.hash_ids,
        });
    }
    // Stable sort: equal timestamps keep line order.
    out.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(out)
}

/// Read and parse a trace file (see [`parse_trace`]).
pub fn load_trace(path: &Path) -> Result<Vec<TraceRequest>, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_trace(&text)
}

/// Workload parameters; the defaults are those of WORKLOAD.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadConfig {
    /// `F`: engine blocks per trace block.
    pub length_factor: u64,
    /// `D`: interleaved copies of every request in disjoint hash spaces.
    pub duplication: u64,
    /// `W`: number of workers (`worker_id` 0..W-1, `dp_rank` 0).
    pub workers: u64,
    /// `C`: blocks each simulated worker cache holds at most.
    pub capacity: usize,
    /// Use only the first N requests of the timestamp-sorted trace.
    pub limit_requests: Option<usize>,
    /// splitmix64 seed of the worker assignment.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            length_factor: 16,
            duplication: 4,
            workers: 256,
            capacity: 16_384,
            limit_requests: None,
            seed: DEFAULT_SEED,
        }
    }
}

impl WorkloadConfig {
    fn validate(&self) -> Result<(), WorkloadError> {
        if self.length_factor == 0 {
            return Err(WorkloadError::InvalidConfig(
                "length factor F must be >= 1".into(),
            ));
        }
        if self.duplication == 0 {
            return Err(WorkloadError::InvalidConfig(
                "duplication D must be >= 1".into(),
            ));
        }
        if self.workers == 0 {
            return Err(WorkloadError::InvalidConfig(
                "workers W must be >= 1".into(),
            ));
        }
        if self.capacity == 0 {
            return Err(WorkloadError::InvalidConfig(
                "capacity C must be >= 1".into(),
            ));
        }
        Ok(())
    }
}

/// The splitmix64 generator of WORKLOAD.md (wrapping arithmetic).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next worker in `0..workers`: `(z as u128 * W as u128) >> 64`.
    pub fn next_worker(&mut self, workers: u64) -> u64 {
        ((self.next_u64() as u128 * workers as u128) >> 64) as u64
    }
}

/// XXH3-64 (seed 1337) of token ids written as u32 little-endian: the local hash of one full
/// block of tokens (INDEXER.md §2.1, no LoRA / namespace / multimodal).
pub fn hash_tokens(tokens: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(&bytes, HASH_SEED)
}

/// Local hash of expanded block id `x`: XXH3-64 (seed 1337) of 16 copies of `(x as u32)` LE.
pub fn local_hash(block_id: u64) -> u64 {
    let word = (block_id as u32).to_le_bytes();
    let mut buf = [0u8; 64];
    for chunk in buf.chunks_exact_mut(4) {
        chunk.copy_from_slice(&word);
    }
    xxh3_64_with_seed(&buf, HASH_SEED)
}

/// One link of the sequence chain: XXH3-64 (seed 1337) of `le(parent) ++ le(local)`.
pub fn next_seq_hash(parent_seq: u64, local: u64) -> u64 {
    let mut buf = [0u8; 16];
    buf[..8].copy_from_slice(&parent_seq.to_le_bytes());
    buf[8..].copy_from_slice(&local.to_le_bytes());
    xxh3_64_with_seed(&buf, HASH_SEED)
}

/// The sequence (external) hashes of a chain of local hashes: `seq[0] = local[0]`,
/// `seq[i] = next_seq_hash(seq[i-1], local[i])`.
pub fn seq_hashes(locals: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(locals.len());
    let mut prev = None;
    for &l in locals {
        let s = match prev {
            None => l,
            Some(p) => next_seq_hash(p, l),
        };
        out.push(s);
        prev = Some(s);
    }
    out
}

/// One element of the op stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `find_matches` on a request's full local-hash list.
    Query { local_hashes: Vec<LocalBlockHash> },
    /// A `stored` or `removed` event of one worker.
    Event(RouterEvent),
}

/// Sizes of a generated workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadCounts {
    /// Trace lines used.
    pub trace_requests: u64,
    /// (request, copy) pairs = queries.
    pub requests: u64,
    /// Events (stored + removed).
    pub events: u64,
    pub stored_events: u64,
    pub removed_events: u64,
    /// Blocks in all `stored` events.
    pub stored_blocks: u64,
    /// Blocks in all `removed` events.
    pub removed_blocks: u64,
    /// Blocks in all queries (the expanded, uncapped request lengths).
    pub query_blocks: u64,
    /// Largest expanded block id of copy 0 (copy `i` adds `i * (max_expanded_id + 1)`).
    pub max_expanded_id: u64,
}

impl WorkloadCounts {
    /// (block, worker) pairs still held at the end: `stored_blocks - removed_blocks`.
    pub fn live_pairs(&self) -> u64 {
        self.stored_blocks.saturating_sub(self.removed_blocks)
    }
}

/// A generated workload: the op stream in order, its counts, and the final simulated caches.
#[derive(Debug, Clone)]
pub struct Workload {
    pub config: WorkloadConfig,
    pub ops: Vec<Op>,
    pub counts: WorkloadCounts,
    /// Per worker (index = worker id), the sequence hashes it holds after the last request,
    /// most recently used first.
    pub final_caches: Vec<Vec<ExternalSequenceBlockHash>>,
}

impl Workload {
    /// The events of the op stream, in order.
    pub fn events(&self) -> impl Iterator<Item = &RouterEvent> + '_ {
        self.ops.iter().filter_map(|op| match op {
            Op::Event(e) => Some(e),
            Op::Query { .. } => None,
        })
    }

    /// The queries of the op stream, in order (query index = position in this vector).
    pub fn queries(&self) -> Vec<&[LocalBlockHash]> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Query { local_hashes } => Some(local_hashes.as_slice()),
                Op::Event(_) => None,
            })
            .collect()
    }

    /// For each query (in order), the number of events that precede it in the op stream.
    pub fn events_before_queries(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.counts.requests as usize);
        let mut events = 0usize;
        for op in &self.ops {
            match op {
                Op::Query { .. } => out.push(events),
                Op::Event(_) => events += 1,
            }
        }
        out
    }
}

const NIL: u32 = u32::MAX;

/// Intrusive doubly linked LRU lists (one per worker) over one shared slab of slots.
struct Slab {
    key: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    free: Vec<u32>,
}

struct WorkerCache {
    /// sequence hash → slot
    map: HashMap<u64, u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    next_event_id: u64,
}

impl WorkerCache {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            head: NIL,
            tail: NIL,
            next_event_id: 0,
        }
    }
}

impl Slab {
    fn alloc(&mut self, key: u64) -> Result<u32, WorkloadError> {
        if let Some(slot) = self.free.pop() {
            self.key[slot as usize] = key;
            return Ok(slot);
        }
        let slot = u32::try_from(self.key.len())
            .ok()
            .filter(|&s| s != NIL)
            .ok_or_else(|| {
                WorkloadError::InvalidConfig("more than 2^32-1 live cached blocks".into())
            })?;
        self.key.push(key);
        self.prev.push(NIL);
        self.next.push(NIL);
        Ok(slot)
    }

    fn unlink(&mut self, cache: &mut WorkerCache, slot: u32) {
        let (p, n) = (self.prev[slot as usize], self.next[slot as usize]);
        if p == NIL {
            cache.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            cache.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[slot as usize] = NIL;
        self.next[slot as usize] = NIL;
    }

    fn push_front(&mut self, cache: &mut WorkerCache, slot: u32) {
        self.prev[slot as usize] = NIL;
        self.next[slot as usize] = cache.head;
        if cache.head == NIL {
            cache.tail = slot;
        } else {
            self.prev[cache.head as usize] = slot;
        }
        cache.head = slot;
    }
}

/// The simulated worker caches (prefix-aware LRU, leaf-first eviction).
///
/// Invariant that makes plain LRU leaf-first: every request touches its whole chain, and the
/// chain is moved to the front deepest block first, so a cached parent is always more recent
/// than each of its cached children. The least recently used block is therefore always a leaf
/// (no cached child), and since a request holds at most `C` blocks, it is never a block of the
/// current request while the cache is over capacity. Evicting from the tail thus evicts
/// children before parents, as the `removed` event must list them.
struct Caches {
    slab: Slab,
    workers: Vec<WorkerCache>,
    capacity: usize,
    // Scratch: slots of the current request's hit prefix.
    hit_slots: Vec<u32>,
}

/// What one request did to its worker's cache.
struct Outcome {
    /// Number of leading blocks that were already cached.
    hit: usize,
    /// Evicted sequence hashes, children before parents.
    evicted: Vec<u64>,
    event_ids: (u64, u64),
}

impl Caches {
    fn new(workers: usize, capacity: usize) -> Self {
        Self {
            slab: Slab {
                key: Vec::new(),
                prev: Vec::new(),
                next: Vec::new(),
                free: Vec::new(),
            },
            workers: (0..workers).map(|_| WorkerCache::new()).collect(),
            capacity,
            hit_slots: Vec::new(),
        }
    }

    /// Apply one request (its sequence hashes, already capped at `C`) to worker `w`.
    fn request(&mut self, w: usize, seqs: &[u64]) -> Result<Outcome, WorkloadError> {
        let cache = &mut self.workers[w];
        let slab = &mut self.slab;
        self.hit_slots.clear();
        for s in seqs {
            match cache.map.get(s) {
                Some(&slot) => self.hit_slots.push(slot),
                None => break,
            }
        }
        let hit = self.hit_slots.len();
        // Touch / insert, deepest first, so the request's root block ends up most recent.
        for i in (0..seqs.len()).rev() {
            let slot = if i < hit {
                let slot = self.hit_slots[i];
                slab.unlink(cache, slot);
                slot
            } else {
                let slot = slab.alloc(seqs[i])?;
                cache.map.insert(seqs[i], slot);
                slot
            };
            slab.push_front(cache, slot);
        }
        let mut evicted = Vec::new();
        while cache.map.len() > self.capacity {
            let slot = cache.tail;
            if slot == NIL {
                break;
            }
            slab.unlink(cache, slot);
            let key = slab.key[slot as usize];
            cache.map.remove(&key);
            slab.free.push(slot);
            evicted.push(key);
        }
        let stored_id = cache.next_event_id;
        if hit < seqs.len() {
            cache.next_event_id += 1;
        }
        let removed_id = cache.next_event_id;
        if !evicted.is_empty() {
            cache.next_event_id += 1;
        }
        Ok(Outcome {
            hit,
            evicted,
            event_ids: (stored_id, removed_id),
        })
    }

    /// Per worker, the cached sequence hashes, most recently used first.
    fn contents(&self) -> Vec<Vec<ExternalSequenceBlockHash>> {
        self.workers
            .iter()
            .map(|c| {
                let mut out = Vec::with_capacity(c.map.len());
                let mut slot = c.head;
                while slot != NIL {
                    out.push(ExternalSequenceBlockHash(self.slab.key[slot as usize]));
                    slot = self.slab.next[slot as usize];
                }
                out
            })
            .collect()
    }
}

/// Generate the op stream of WORKLOAD.md from a timestamp-sorted trace (see [`load_trace`]).
pub fn generate(
    trace: &[TraceRequest],
    config: &WorkloadConfig,
) -> Result<Workload, WorkloadError> {
    config.validate()?;
    let requests = match config.limit_requests {
        Some(n) => &trace[..n.min(trace.len())],
        None => trace,
    };
    let f = config.length_factor;
    let workers = usize::try_from(config.workers)
        .map_err(|_| WorkloadError::InvalidConfig("too many workers".into()))?;

    // Largest expanded id of copy 0; every copy is offset by a multiple of (max + 1).
    let mut max_expanded_id = 0u64;
    for r in requests {
        for &h in &r.hash_ids {
            let last = h.checked_mul(f).and_then(|v| v.checked_add(f - 1)).ok_or(
                WorkloadError::IdOverflow {
                    trace_id: h,
                    copy: 0,
                },
            )?;
            max_expanded_id = max_expanded_id.max(last);
        }
    }
    let span = max_expanded_id
        .checked_add(1)
        .ok_or(WorkloadError::IdOverflow {
            trace_id: max_expanded_id,
            copy: 0,
        })?;

    let mut rng = SplitMix64::new(config.seed);
    let mut caches = Caches::new(workers, config.capacity);
    let mut counts = WorkloadCounts {
        trace_requests: requests.len() as u64,
        max_expanded_id,
        ..Default::default()
    };
    let mut ops = Vec::with_capacity(requests.len() * config.duplication as usize * 3);
    let mut locals: Vec<u64> = Vec::new();

    for r in requests {
        for copy in 0..config.duplication {
            let offset = copy
                .checked_mul(span)
                .ok_or(WorkloadError::IdOverflow { trace_id: 0, copy })?;
            let worker = rng.next_worker(config.workers);

            locals.clear();
            for &h in &r.hash_ids {
                for j in 0..f {
                    // Cannot overflow for copy 0 (checked above); offsets are checked here.
                    let id = (h * f + j)
                        .checked_add(offset)
                        .ok_or(WorkloadError::IdOverflow { trace_id: h, copy })?;
                    locals.push(local_hash(id));
                }
            }
            let capped = locals.len().min(config.capacity);
            let seqs = seq_hashes(&locals[..capped]);

            counts.requests += 1;
            counts.query_blocks += locals.len() as u64;
            ops.push(Op::Query {
                local_hashes: locals.iter().map(|&l| LocalBlockHash(l)).collect(),
            });

            let outcome = caches.request(worker as usize, &seqs)?;
            if outcome.hit < seqs.len() {
                let blocks: Vec<KvCacheStoredBlockData> = (outcome.hit..seqs.len())
                    .map(|i| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(seqs[i]),
                        tokens_hash: LocalBlockHash(locals[i]),
                        mm_extra_info: None,
                    })
                    .collect();
                counts.stored_events += 1;
                counts.stored_blocks += blocks.len() as u64;
                let parent_hash = outcome
                    .hit
                    .checked_sub(1)
                    .map(|i| ExternalSequenceBlockHash(seqs[i]));
                ops.push(Op::Event(RouterEvent::new(
                    worker,
                    KvCacheEvent {
                        event_id: outcome.event_ids.0,
                        data: KvCacheEventData::Stored(KvCacheStoreData {
                            parent_hash,
                            start_position: None,
                            blocks,
                        }),
                        dp_rank: 0,
                    },
                )));
            }
            if !outcome.evicted.is_empty() {
                counts.removed_events += 1;
                counts.removed_blocks += outcome.evicted.len() as u64;
                ops.push(Op::Event(RouterEvent::new(
                    worker,
                    KvCacheEvent {
                        event_id: outcome.event_ids.1,
                        data: KvCacheEventData::Removed(KvCacheRemoveData {
                            block_hashes: outcome
                                .evicted
                                .into_iter()
                                .map(ExternalSequenceBlockHash)
                                .collect(),
                        }),
                        dp_rank: 0,
                    },
                )));
            }
        }
    }
    counts.events = counts.stored_events + counts.removed_events;

    Ok(Workload {
        config: config.clone(),
        final_caches: caches.contents(),
        ops,
        counts,
    })
}

/// Exact scores of a query against explicit per-worker block sets: for each worker holding the
/// query's first block, the length of the longest prefix it holds entirely (by sequence hash).
/// Returns `(worker_id, dp_rank = 0, score)` sorted by worker, workers scoring 0 omitted.
pub fn exact_scores(
    caches: &[hashbrown::HashSet<u64>],
    query: &[LocalBlockHash],
) -> Vec<(u64, u32, u32)> {
    let locals: Vec<u64> = query.iter().map(|h| h.0).collect();
    let seqs = seq_hashes(&locals);
    let mut out = Vec::new();
    for (w, set) in caches.iter().enumerate() {
        let score = seqs.iter().take_while(|s| set.contains(*s)).count();
        if score > 0 {
            out.push((w as u64, 0u32, score as u32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_local_and_seq_hashes() {
        // INDEXER.md §2.5: tokens 0..64, bs 16.
        let tokens: Vec<u32> = (0..64).collect();
        let locals: Vec<u64> = tokens.chunks(16).map(hash_tokens).collect();
        assert_eq!(
            locals,
            vec![
                15310707395893867146,
                15292316782987903195,
                5532946206955930018,
                14928757266181269122
            ]
        );
        assert_eq!(
            seq_hashes(&locals),
            vec![
                15310707395893867146,
                13769157705258532664,
                11879827756109914528,
                3888788807566526800
            ]
        );
        // tokens [4294967295]×4, bs 4.
        assert_eq!(hash_tokens(&[u32::MAX; 4]), 12410542959481710713);
        // The block-id hash is 16 copies of the id as a token.
        assert_eq!(local_hash(7), hash_tokens(&[7u32; 16]));
        assert_eq!(local_hash((1u64 << 32) + 7), local_hash(7));
    }

    #[test]
    fn splitmix_reference_values() {
        // splitmix64 seeded with 0: first outputs of the reference implementation.
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut g = SplitMix64::new(42);
        for _ in 0..1000 {
            assert!(g.next_worker(256) < 256);
        }
    }

    #[test]
    fn parse_sorts_stably_and_reports_line() {
        let text = "{\"timestamp\": 5, \"hash_ids\": [1]}\n\n{\"timestamp\": 1, \"hash_ids\": [2]}\n{\"timestamp\": 5, \"hash_ids\": [3], \"input_length\": 1}\n";
        let t = parse_trace(text).expect("valid trace");
        let ids: Vec<u64> = t.iter().map(|r| r.hash_ids[0]).collect();
        assert_eq!(ids, vec![2, 1, 3]);
        assert_eq!(t[0].line, 3);
        let err = parse_trace("{\"timestamp\": 1, \"hash_ids\": [1]}\n{\"timestamp\": 2}\n");
        assert!(matches!(err, Err(WorkloadError::Parse { line: 2, .. })));
        assert!(matches!(
            parse_trace("{\"timestamp\": 1, \"hash_ids\": [-1]}"),
            Err(WorkloadError::Parse { line: 1, .. })
        ));
    }

    fn req(ts: f64, ids: &[u64]) -> TraceRequest {
        TraceRequest {
            line: 0,
            timestamp: ts,
            hash_ids: ids.to_vec(),
        }
    }

    #[test]
    fn lru_is_prefix_aware_and_leaf_first() {
        // One worker, F = 1, D = 1, C = 4.
        let cfg = WorkloadConfig {
            length_factor: 1,
            duplication: 1,
            workers: 1,
            capacity: 4,
            limit_requests: None,
            seed: 42,
        };
        let trace = vec![
            req(0.0, &[1, 2, 3]), // store 1,2,3
            req(1.0, &[1, 4]),    // hit 1, store 4 → 4 blocks
            req(2.0, &[5]),       // store 5 → evict LRU leaf: 3 (2,3 older than 1,4)
            req(3.0, &[6, 7]),    // store 6,7 → evict 2 (now a leaf), then 4
        ];
        let w = generate(&trace, &cfg).expect("workload");
        let seq = |ids: &[u64]| seq_hashes(&ids.iter().map(|&i| local_hash(i)).collect::<Vec<_>>());
        let s123 = seq(&[1, 2, 3]);
        let s14 = seq(&[1, 4]);
        let removed: Vec<Vec<u64>> = w
            .events()
            .filter_map(|e| match &e.event.data {
                KvCacheEventData::Removed(r) => Some(r.block_hashes.iter().map(|h| h.0).collect()),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec![vec![s123[2]], vec![s123[1], s14[1]]]);
        let stored_parent: Vec<Option<u64>> = w
            .events()
            .filter_map(|e| match &e.event.data {
                KvCacheEventData::Stored(s) => Some(s.parent_hash.map(|h| h.0)),
                _ => None,
            })
            .collect();
        assert_eq!(stored_parent, vec![None, Some(s14[0]), None, None]);
        let ids: Vec<u64> = w.events().map(|e| e.event.event_id).collect();
        assert_eq!(ids, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(w.counts.stored_blocks, 7);
        assert_eq!(w.counts.removed_blocks, 3);
        assert_eq!(w.final_caches[0].len(), 4);
    }
}
