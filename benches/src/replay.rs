//! The measurements of WORKLOAD.md (ingest, query, mixed, memory, agreement) for one backend in
//! the current process. `mooncake-replay` runs this once per child process.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::Instant;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::backend::{Backend, Score};
use crate::workload::{Workload, WorkloadCounts};

/// Which measurements to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phases {
    /// Ingest + memory (and the state the query phase needs).
    pub ingest: bool,
    /// Warm-up (agreement digest) + timed queries; implies ingest.
    pub query: bool,
    /// Mixed replay on a fresh index.
    pub mixed: bool,
}

impl Default for Phases {
    fn default() -> Self {
        Self {
            ingest: true,
            query: true,
            mixed: true,
        }
    }
}

/// Settings of one measured run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Threads issuing queries in the query phase (`Q`).
    pub query_threads: usize,
    /// Timed passes over all queries in the query phase (WORKLOAD.md: 1).
    pub query_passes: usize,
    pub phases: Phases,
    /// Also compute [`exact_agreement`] (after the measurements).
    pub check_exact: bool,
    /// Called before each RSS reading, to let the allocator return freed memory to the OS.
    pub trim: fn(),
}

fn no_trim() {}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            query_threads: 1,
            query_passes: 1,
            phases: Phases::default(),
            check_exact: true,
            trim: no_trim,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestResult {
    pub secs: f64,
    pub events_per_sec: f64,
    pub stored_blocks_per_sec: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryResult {
    pub rss_before: u64,
    pub rss_after: u64,
    pub delta_bytes: i64,
    pub live_pairs: u64,
    pub bytes_per_pair: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencyUs {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryResult {
    pub warmup_secs: f64,
    pub secs: f64,
    pub queries_per_sec: f64,
    pub query_blocks_per_sec: f64,
    pub latency_us: LatencyUs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedResult {
    pub secs: f64,
    pub ops_per_sec: f64,
    pub query_latency_us: LatencyUs,
}

/// Digest of every query answer after full ingest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    /// Sum of all scores.
    pub score_sum: u64,
    /// Number of `(query, worker, dp_rank, score)` entries.
    pub entries: u64,
    /// XXH3-64 of the sorted `(query index u64, worker_id u64, dp_rank u32, score u32)` list,
    /// little-endian, as 16 hex digits.
    pub digest: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub backend: String,
    pub event_threads: usize,
    pub query_threads: usize,
    pub counts: WorkloadCounts,
    pub generate_secs: f64,
    pub ingest: Option<IngestResult>,
    pub memory: Option<MemoryResult>,
    pub query: Option<QueryResult>,
    pub agreement: Option<Agreement>,
    pub mixed: Option<MixedResult>,
    /// The digest exact scoring of the simulated caches' final state gives (when computed):
    /// `agreement` must equal it.
    #[serde(default)]
    pub exact: Option<Agreement>,
}

/// Builds the agreement digest incrementally; feed queries in index order.
pub struct DigestBuilder {
    hasher: Xxh3,
    score_sum: u64,
    entries: u64,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DigestBuilder {
    pub fn new() -> Self {
        Self {
            hasher: Xxh3::new(),
            score_sum: 0,
            entries: 0,
        }
    }

    /// Add the answer of query `index` (any order; sorted here).
    pub fn add(&mut self, index: usize, scores: &mut [Score]) {
        scores.sort_unstable();
        for &(w, dp, s) in scores.iter() {
            let mut buf = [0u8; 24];
            buf[..8].copy_from_slice(&(index as u64).to_le_bytes());
            buf[8..16].copy_from_slice(&w.to_le_bytes());
            buf[16..20].copy_from_slice(&dp.to_le_bytes());
            buf[20..].copy_from_slice(&s.to_le_bytes());
            self.hasher.update(&buf);
            self.score_sum += u64::from(s);
            self.entries += 1;
        }
    }

    pub fn finish(&self) -> Agreement {
        Agreement {
            score_sum: self.score_sum,
            entries: self.entries,
            digest: format!("{:016x}", self.hasher.digest()),
        }
    }
}

/// The agreement digest of exact scoring against the workload's final simulated caches: per
/// query and worker, the longest prefix (by sequence hash) the worker holds entirely.
pub fn exact_agreement(workload: &Workload) -> Agreement {
    // sequence hash → workers holding it, ascending.
    let mut holders: HashMap<u64, Vec<u32>> = HashMap::new();
    for (w, cache) in workload.final_caches.iter().enumerate() {
        for h in cache {
            holders.entry(h.0).or_default().push(w as u32);
        }
    }
    let mut digest = DigestBuilder::new();
    let mut scores: Vec<Score> = Vec::new();
    let mut active: Vec<u32> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    for (qi, q) in workload.queries().into_iter().enumerate() {
        scores.clear();
        active.clear();
        let mut seq = 0u64;
        for (depth, local) in q.iter().enumerate() {
            seq = if depth == 0 {
                local.0
            } else {
                crate::workload::next_seq_hash(seq, local.0)
            };
            let held: &[u32] = holders.get(&seq).map_or(&[], Vec::as_slice);
            if depth == 0 {
                active.extend_from_slice(held);
            } else {
                // Merge: workers of `active` still holding this block continue, the others
                // score `depth`.
                next.clear();
                let mut j = 0;
                for &w in &active {
                    while j < held.len() && held[j] < w {
                        j += 1;
                    }
                    if j < held.len() && held[j] == w {
                        next.push(w);
                    } else {
                        scores.push((u64::from(w), 0, depth as u32));
                    }
                }
                std::mem::swap(&mut active, &mut next);
            }
            if active.is_empty() {
                break;
            }
        }
        for &w in &active {
            scores.push((u64::from(w), 0, q.len() as u32));
        }
        digest.add(qi, &mut scores);
    }
    digest.finish()
}

/// Resident set size of this process: `/proc/self/statm` resident pages × page size.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("malformed /proc/self/statm"))?
        .parse()?;
    Ok(pages * page_size())
}

fn page_size() -> u64 {
    extern "C" {
        fn sysconf(name: i32) -> i64;
    }
    const SC_PAGESIZE: i32 = 30; // Linux (glibc and musl)
                                 // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let v = unsafe { sysconf(SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Nearest-rank percentiles of nanosecond latencies, in microseconds.
pub fn latency_summary(mut ns: Vec<u64>) -> LatencyUs {
    if ns.is_empty() {
        return LatencyUs {
            p50: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
        };
    }
    ns.sort_unstable();
    let pick = |p: f64| {
        let rank = (p * ns.len() as f64).ceil() as usize;
        ns[rank.clamp(1, ns.len()) - 1] as f64 / 1e3
    };
    LatencyUs {
        p50: pick(0.50),
        p99: pick(0.99),
        p999: pick(0.999),
        max: ns[ns.len() - 1] as f64 / 1e3,
    }
}

fn prepare_events<B: Backend>(b: &B, w: &Workload) -> anyhow::Result<Vec<B::Event>> {
    w.events().map(|e| b.prepare(e)).collect()
}

/// Run the selected phases on fresh backends built by `make`.
pub fn run<B: Backend>(
    make: &dyn Fn() -> anyhow::Result<B>,
    workload: &Workload,
    event_threads: usize,
    generate_secs: f64,
    cfg: &RunConfig,
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(cfg.query_threads > 0, "query threads must be >= 1");
    anyhow::ensure!(cfg.query_passes > 0, "query passes must be >= 1");
    let counts = workload.counts.clone();
    let mut result = RunResult {
        backend: String::new(),
        event_threads,
        query_threads: cfg.query_threads,
        counts: counts.clone(),
        generate_secs,
        ingest: None,
        memory: None,
        query: None,
        agreement: None,
        mixed: None,
        exact: None,
    };
    let queries_raw = workload.queries();

    if cfg.phases.ingest || cfg.phases.query {
        // 4. memory: RSS from before the backend exists, so that what it allocates up front
        // (a pre-sized map, thread stacks) counts too.
        (cfg.trim)();
        let rss_before = rss_bytes()?;
        let backend = make()?;
        result.backend = backend.name().to_string();

        // 1. ingest
        let events = prepare_events(&backend, workload)?;
        eprintln!("[{}] ingest: {} events", backend.name(), events.len());
        let start = Instant::now();
        for ev in events {
            backend.apply_prepared(ev)?;
        }
        backend.flush()?;
        let secs = start.elapsed().as_secs_f64();
        (cfg.trim)();
        let rss_after = rss_bytes()?;
        if let Some(m) = backend.memory_breakdown() {
            eprintln!("[{}] index memory: {m}", backend.name());
        }
        result.ingest = Some(IngestResult {
            secs,
            events_per_sec: counts.events as f64 / secs,
            stored_blocks_per_sec: counts.stored_blocks as f64 / secs,
        });
        let delta = rss_after as i64 - rss_before as i64;
        let live = counts.live_pairs();
        result.memory = Some(MemoryResult {
            rss_before,
            rss_after,
            delta_bytes: delta,
            live_pairs: live,
            bytes_per_pair: if live > 0 {
                delta as f64 / live as f64
            } else {
                0.0
            },
        });

        if cfg.phases.query {
            // 5. agreement, computed by the warm-up pass.
            let queries: Vec<B::Query> = queries_raw
                .iter()
                .map(|q| backend.prepare_query(q))
                .collect();
            eprintln!(
                "[{}] query: warm-up over {} queries",
                backend.name(),
                queries.len()
            );
            let start = Instant::now();
            let mut digest = DigestBuilder::new();
            for (i, q) in queries.iter().enumerate() {
                let mut s = backend.find_prepared(q);
                digest.add(i, &mut s);
            }
            let warmup_secs = start.elapsed().as_secs_f64();
            result.agreement = Some(digest.finish());

            // 2. query: every query once per pass, from Q threads (query i on thread i % Q).
            let qn = cfg.query_threads;
            let passes = cfg.query_passes;
            let barrier = Barrier::new(qn + 1);
            let (secs, latencies) = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..qn)
                    .map(|t| {
                        let (barrier, backend, queries) = (&barrier, &backend, &queries);
                        scope.spawn(move || {
                            let mut lat = Vec::with_capacity(passes * (queries.len() / qn + 1));
                            barrier.wait();
                            for _ in 0..passes {
                                for q in queries.iter().skip(t).step_by(qn) {
                                    let t0 = Instant::now();
                                    black_box(backend.find_prepared(q));
                                    lat.push(t0.elapsed().as_nanos() as u64);
                                }
                            }
                            lat
                        })
                    })
                    .collect();
                barrier.wait();
                let start = Instant::now();
                let mut all = Vec::with_capacity(queries.len());
                for h in handles {
                    match h.join() {
                        Ok(l) => all.extend(l),
                        Err(p) => std::panic::resume_unwind(p),
                    }
                }
                (start.elapsed().as_secs_f64(), all)
            });
            result.query = Some(QueryResult {
                warmup_secs,
                secs,
                queries_per_sec: (passes as u64 * counts.requests) as f64 / secs,
                query_blocks_per_sec: (passes as u64 * counts.query_blocks) as f64 / secs,
                latency_us: latency_summary(latencies),
            });
        }
        drop(backend);
    }

    if cfg.phases.mixed {
        // 3. mixed: one submitting thread, one querying thread, a query waits until every
        // event before it in the stream was submitted.
        let backend = make()?;
        result.backend = backend.name().to_string();
        let events = prepare_events(&backend, workload)?;
        let queries: Vec<B::Query> = queries_raw
            .iter()
            .map(|q| backend.prepare_query(q))
            .collect();
        let events_before = workload.events_before_queries();
        eprintln!(
            "[{}] mixed: {} events + {} queries",
            backend.name(),
            events.len(),
            queries.len()
        );
        let submitted = AtomicUsize::new(0);
        let start = Instant::now();
        let (submit_result, latencies) = std::thread::scope(|scope| {
            let (backend_ref, submitted_ref) = (&backend, &submitted);
            let submitter = scope.spawn(move || -> anyhow::Result<()> {
                for (k, ev) in events.into_iter().enumerate() {
                    if let Err(e) = backend_ref.apply_prepared(ev) {
                        // Release the querier; the run fails below.
                        submitted_ref.store(usize::MAX, Ordering::Release);
                        return Err(e);
                    }
                    submitted_ref.store(k + 1, Ordering::Release);
                }
                Ok(())
            });
            let (queries_ref, before_ref) = (&queries, &events_before);
            let querier = scope.spawn(move || {
                let mut lat = Vec::with_capacity(queries_ref.len());
                for (q, &need) in queries_ref.iter().zip(before_ref.iter()) {
                    let mut spins = 0u32;
                    while submitted_ref.load(Ordering::Acquire) < need {
                        if spins < 64 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                        spins = spins.saturating_add(1);
                    }
                    let t0 = Instant::now();
                    black_box(backend_ref.find_prepared(q));
                    lat.push(t0.elapsed().as_nanos() as u64);
                }
                lat
            });
            let s = match submitter.join() {
                Ok(r) => r,
                Err(p) => std::panic::resume_unwind(p),
            };
            let l = match querier.join() {
                Ok(l) => l,
                Err(p) => std::panic::resume_unwind(p),
            };
            (s, l)
        });
        submit_result?;
        backend.flush()?;
        let secs = start.elapsed().as_secs_f64();
        result.mixed = Some(MixedResult {
            secs,
            ops_per_sec: (counts.events + counts.requests) as f64 / secs,
            query_latency_us: latency_summary(latencies),
        });
        drop(backend);
    }
    if cfg.check_exact && result.agreement.is_some() {
        result.exact = Some(exact_agreement(workload));
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_nearest_rank() {
        let l = latency_summary((1..=1000).map(|v| v * 1000).collect());
        assert_eq!(l.p50, 500.0);
        assert_eq!(l.p99, 990.0);
        assert_eq!(l.p999, 999.0);
        assert_eq!(l.max, 1000.0);
    }

    #[test]
    fn digest_is_order_independent_within_a_query() {
        let mut a = DigestBuilder::new();
        a.add(0, &mut [(2, 0, 5), (1, 0, 3)]);
        let mut b = DigestBuilder::new();
        b.add(0, &mut [(1, 0, 3), (2, 0, 5)]);
        assert_eq!(a.finish(), b.finish());
        assert_eq!(a.finish().score_sum, 8);
        let mut c = DigestBuilder::new();
        c.add(1, &mut [(1, 0, 3), (2, 0, 5)]);
        assert_ne!(a.finish().digest, c.finish().digest);
    }
}
