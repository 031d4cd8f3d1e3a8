//! Concurrency stress tests: writers on several threads (each owning distinct workers) store the
//! same shared prefixes at the same moment while reader threads query.
//!
//! * Readers check that a score never exceeds what the worker's writer had *submitted* before the
//!   query returned (a published, monotone high-water mark written before each `apply`): the
//!   engine may under-count an in-flight write but never over-count (INDEXER.md §4.4, §8.3).
//! * After the writers join and a `flush()`, the engine's whole state equals the reference model
//!   fed the same per-stream event sequences.
//! * Many workers storing the same chain at once are all indexed, every round (Dynamo loses
//!   blocks here, SERVICE.md "concurrency race").
//!
//! Everything is bounded by counts, never by time.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

use common::*;
use kvindex_engine::reference::{dump_canonical, ReferenceIndex};
use kvindex_engine::{Namespace, RouterEvent, WorkerWithDpRank};

/// A barrier that gives up (panics) when another participant panicked, so a failing assertion
/// in one thread fails the test instead of hanging it.
struct SpinBarrier {
    parties: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    aborted: AtomicBool,
}

impl SpinBarrier {
    fn new(parties: usize) -> Self {
        Self {
            parties,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
        }
    }

    fn wait(&self) {
        let generation = self.generation.load(SeqCst);
        if self.arrived.fetch_add(1, SeqCst) + 1 == self.parties {
            self.arrived.store(0, SeqCst);
            self.generation.fetch_add(1, SeqCst);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(SeqCst) == generation {
            assert!(!self.is_aborted(), "another thread of the test panicked");
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        }
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(SeqCst)
    }

    /// Aborts the barrier if the holder's thread unwinds.
    fn guard(&self) -> AbortOnPanic<'_> {
        AbortOnPanic(self)
    }
}

struct AbortOnPanic<'a>(&'a SpinBarrier);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.aborted.store(true, SeqCst);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared prefixes, private suffixes, never over-report
// ---------------------------------------------------------------------------------------------

const WRITERS: usize = 3;
const WORKERS_PER_WRITER: usize = 2;
const WORKERS: usize = WRITERS * WORKERS_PER_WRITER;
const READERS: usize = 2;
const CHAINS: usize = 6;
const PREFIX: usize = 48;
const SUFFIX: usize = 16;
const PATH: usize = PREFIX + SUFFIX;
/// Stores are issued in chunks, so that concurrent writers extend the same nodes.
const CHUNK: usize = 8;
const PHASE_B_ROUNDS: usize = 3;
const MIN_QUERIES_PER_READER: usize = 300;

fn worker_id(index: usize) -> u64 {
    index as u64 + 1
}

/// Chain `chain`'s shared prefix followed by worker `worker`'s private suffix.
fn path(worker: usize, chain: usize) -> Vec<u64> {
    let prefix = run(1_000 * (chain as u64 + 1), PREFIX);
    let suffix = run(1_000_000 * (worker as u64 + 1) + 100 * chain as u64, SUFFIX);
    prefix.into_iter().chain(suffix).collect()
}

/// What each worker's writer has submitted: per (worker, chain), the length of the longest
/// prefix of `path(worker, chain)` that any store it issued covered. Raised before `apply`.
struct Submitted(Vec<AtomicUsize>);

impl Submitted {
    fn new() -> Self {
        Self((0..WORKERS * CHAINS).map(|_| AtomicUsize::new(0)).collect())
    }
    fn raise(&self, worker: usize, chain: usize, len: usize) {
        self.0[worker * CHAINS + chain].fetch_max(len, SeqCst);
    }
    fn get(&self, worker: usize, chain: usize) -> usize {
        self.0[worker * CHAINS + chain].load(SeqCst)
    }
}

/// What a writer did, in order, for replay into the reference model.
enum Logged {
    Event(RouterEvent),
    RemoveWorker(u64),
}

/// One writer thread: owns `WORKERS_PER_WRITER` workers and records everything it does.
struct Writer<'a> {
    ns: &'a Namespace,
    submitted: &'a Submitted,
    workers: Vec<usize>,
    log: Vec<Logged>,
    rng: SplitMix64,
}

impl Writer<'_> {
    fn send(&mut self, ev: RouterEvent) {
        self.log.push(Logged::Event(ev.clone()));
        self.ns.apply(ev).expect("apply");
    }

    /// Store `path(worker, chain)[from..to]` under its predecessor, announcing it first.
    fn store_range(&mut self, worker: usize, chain: usize, from: usize, to: usize) {
        let path = path(worker, chain);
        self.submitted.raise(worker, chain, to);
        self.send(store_chain_after(
            worker_id(worker),
            0,
            &path[..from],
            &path[from..to],
        ));
    }

    fn remove_range(&mut self, worker: usize, chain: usize, from: usize, to: usize) {
        let path = path(worker, chain);
        self.send(remove_chain(worker_id(worker), 0, &path, from..to));
    }

    /// Phase A for one chain: every worker of this writer stores the whole path, chunk by chunk,
    /// interleaved with its other workers (and, through the barrier, with the other writers).
    fn store_chain_in_chunks(&mut self, chain: usize) {
        for from in (0..PATH).step_by(CHUNK) {
            for i in 0..self.workers.len() {
                let worker = self.workers[i];
                self.store_range(worker, chain, from, (from + CHUNK).min(PATH));
            }
        }
    }

    /// Phase B for one chain: removals (tail, mid-chain, whole stream or worker) and re-stores,
    /// always within the worker's own paths.
    fn churn(&mut self, chain: usize) {
        for i in 0..self.workers.len() {
            let worker = self.workers[i];
            match self.rng.below(10) {
                0..=2 => {
                    let k = 1 + self.rng.below(12) as usize;
                    self.remove_range(worker, chain, PATH - k, PATH);
                    if self.rng.chance(50) {
                        self.store_range(worker, chain, PATH - k, PATH);
                    }
                }
                3..=5 => {
                    let at = self.rng.below(PATH as u64) as usize;
                    self.remove_range(worker, chain, at, at + 1);
                    if self.rng.chance(60) {
                        self.store_range(worker, chain, at, at + 1);
                    }
                }
                6 => {
                    // A duplicate of the shared prefix, stored by everyone at once.
                    self.store_range(worker, chain, 0, PREFIX);
                }
                7 => {
                    self.send(cleared(worker_id(worker), 0));
                    self.store_range(worker, chain, 0, PATH);
                }
                8 => {
                    let id = worker_id(worker);
                    self.log.push(Logged::RemoveWorker(id));
                    self.ns.remove_worker(id).expect("remove_worker");
                    self.store_range(worker, chain, 0, PREFIX);
                }
                _ => {
                    // A remove naming a block the worker never held (the other workers' suffix).
                    let other = (worker + 1) % WORKERS;
                    let foreign = canonical_hashes(&path(other, chain))[PATH - 1];
                    self.send(remove(worker_id(worker), 0, &[foreign]));
                }
            }
        }
    }
}

/// One reader query: a random worker's path for a random chain, possibly cut short or extended
/// past the end; every reported score must be backed by submitted stores.
fn query_and_check(ns: &Namespace, submitted: &Submitted, rng: &mut SplitMix64) {
    let chain = rng.below(CHAINS as u64) as usize;
    let owner = rng.below(WORKERS as u64) as usize;
    let mut query = path(owner, chain);
    match rng.below(3) {
        0 => query.truncate(1 + rng.below(PATH as u64) as usize),
        1 => query.push(77_777_777),
        _ => {}
    }
    let scores = ns.find_matches(&lh(&query), false);
    // Read the marks only after the query returned: the engine can only have applied stores
    // that were announced before it.
    for (stream, score) in scores.sorted() {
        let worker = (stream.worker_id as usize)
            .checked_sub(1)
            .filter(|&w| w < WORKERS && stream.dp_rank == 0)
            .unwrap_or_else(|| panic!("score for a stream nobody wrote: {stream:?}"));
        let issued = submitted.get(worker, chain);
        let backed = if worker == owner {
            issued
        } else {
            issued.min(PREFIX)
        };
        let bound = backed.min(query.len());
        assert!(
            score as usize <= bound,
            "over-report: {stream:?} scored {score} on chain {chain} (query owner {owner}, \
             length {}), but its submitted stores back at most {bound} blocks of that query \
             ({issued} blocks of its own path submitted)",
            query.len()
        );
    }
}

/// Scores of every worker's path of every chain (and a mid-prefix cut), engine vs model.
fn assert_same_state(ns: &Namespace, model: &ReferenceIndex) {
    for chain in 0..CHAINS {
        for worker in 0..WORKERS {
            let path = path(worker, chain);
            for query in [&path[..], &path[..PREFIX / 2]] {
                assert_eq!(
                    ns.find_matches(&lh(query), false).sorted(),
                    model.find_matches(&lh(query), false).sorted(),
                    "scores of worker {worker}'s chain {chain} (length {}): engine (left), \
                     reference (right)",
                    query.len()
                );
            }
        }
    }
    assert_eq!(
        assert_dump_well_formed(&ns.dump().expect("dump")),
        model.canonical(),
        "dump: engine (left), reference (right)"
    );
    assert_eq!(ns.get_workers(), model.get_workers());
    assert_eq!(ns.current_size(), model.current_size());
    assert_eq!(ns.worker_block_counts(), model.worker_block_counts());
}

#[test]
fn concurrent_readers_never_see_more_than_was_submitted_and_the_final_state_is_exact() {
    let (_engine, ns) = engine_and_namespace();
    let submitted = Submitted::new();
    // Writers meet before every chain (phase A) and every churn step (phase B).
    let barrier = SpinBarrier::new(WRITERS);
    let writers_done = AtomicUsize::new(0);
    let phase_a_done = SpinBarrier::new(WRITERS + 1);

    let logs: Vec<Vec<Logged>> = std::thread::scope(|scope| {
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let (ns, submitted, barrier, writers_done) =
                    (&ns, &submitted, &barrier, &writers_done);
                scope.spawn(move || {
                    let _guard = barrier.guard();
                    let mut rng = SplitMix64::new(0xC0FFEE + r as u64);
                    let mut queries = 0;
                    while (queries < MIN_QUERIES_PER_READER || writers_done.load(SeqCst) < WRITERS)
                        && !barrier.is_aborted()
                    {
                        query_and_check(ns, submitted, &mut rng);
                        queries += 1;
                    }
                    queries
                })
            })
            .collect();

        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (ns, submitted, barrier, writers_done, phase_a_done) =
                    (&ns, &submitted, &barrier, &writers_done, &phase_a_done);
                scope.spawn(move || {
                    let _guard = barrier.guard();
                    let _guard_a = phase_a_done.guard();
                    let mut writer = Writer {
                        ns,
                        submitted,
                        workers: (0..WORKERS_PER_WRITER)
                            .map(|i| w * WORKERS_PER_WRITER + i)
                            .collect(),
                        log: Vec::new(),
                        rng: SplitMix64::new(0x5EED + w as u64),
                    };
                    // Phase A: stores only.
                    for chain in 0..CHAINS {
                        barrier.wait();
                        writer.store_chain_in_chunks(chain);
                    }
                    phase_a_done.wait(); // the main thread checks the phase A state
                    phase_a_done.wait();
                    // Phase B: stores and removals.
                    for _ in 0..PHASE_B_ROUNDS {
                        for chain in 0..CHAINS {
                            barrier.wait();
                            writer.churn(chain);
                        }
                    }
                    writers_done.fetch_add(1, SeqCst);
                    writer.log
                })
            })
            .collect();

        // Between the phases: everything stored in phase A is indexed.
        {
            let _guard = phase_a_done.guard();
            let _abort_writers = barrier.guard();
            phase_a_done.wait();
            ns.flush().expect("flush");
            for chain in 0..CHAINS {
                for owner in 0..WORKERS {
                    let want: Vec<(u64, u32, u32)> = (0..WORKERS)
                        .map(|w| {
                            (
                                worker_id(w),
                                0,
                                (if w == owner { PATH } else { PREFIX }) as u32,
                            )
                        })
                        .collect();
                    assert_eq!(
                        ns.find_matches(&lh(&path(owner, chain)), false).sorted(),
                        expected(&want),
                        "after phase A, chain {chain}, worker {owner}'s path"
                    );
                }
            }
            assert_eq!(ns.current_size(), WORKERS * CHAINS * PATH);
            phase_a_done.wait();
        }

        for reader in readers {
            let queries = reader.join().expect("reader panicked");
            assert!(queries >= MIN_QUERIES_PER_READER);
        }
        writers
            .into_iter()
            .map(|w| w.join().expect("writer panicked"))
            .collect()
    });

    ns.flush().expect("flush");
    let mut model = ReferenceIndex::new();
    for log in &logs {
        for entry in log {
            match entry {
                // Outcomes may be errors (removes of foreign or already-removed blocks).
                Logged::Event(ev) => {
                    let _ = model.apply(ev);
                }
                Logged::RemoveWorker(id) => model.remove_worker(*id),
            }
        }
    }
    assert_same_state(&ns, &model);
}

// ---------------------------------------------------------------------------------------------
// Many workers store the same prefix at once
// ---------------------------------------------------------------------------------------------

const SAME_PREFIX_THREADS: usize = 4;
const SAME_PREFIX_WORKERS_PER_THREAD: usize = 4;
const SAME_PREFIX_WORKERS: usize = SAME_PREFIX_THREADS * SAME_PREFIX_WORKERS_PER_THREAD;
const SAME_PREFIX_BLOCKS: usize = 64;
const SAME_PREFIX_ROUNDS: usize = 50;

#[test]
fn many_workers_storing_the_same_prefix_at_once_are_all_indexed_every_round() {
    let (_engine, ns) = engine_and_namespace();
    let chain = run(1, SAME_PREFIX_BLOCKS);
    // The main thread checks between the threads' store and removal steps.
    let barrier = SpinBarrier::new(SAME_PREFIX_THREADS + 1);

    std::thread::scope(|scope| {
        for t in 0..SAME_PREFIX_THREADS {
            let (ns, chain, barrier) = (&ns, &chain, &barrier);
            scope.spawn(move || {
                let _guard = barrier.guard();
                let workers: Vec<u64> = (0..SAME_PREFIX_WORKERS_PER_THREAD)
                    .map(|i| (t * SAME_PREFIX_WORKERS_PER_THREAD + i) as u64 + 1)
                    .collect();
                for round in 0..SAME_PREFIX_ROUNDS {
                    barrier.wait();
                    // Even rounds: one event per worker. Odd rounds: chunks, interleaved across
                    // this thread's workers, so extensions of the same nodes race too.
                    let chunk = if round % 2 == 0 {
                        SAME_PREFIX_BLOCKS
                    } else {
                        16
                    };
                    for from in (0..SAME_PREFIX_BLOCKS).step_by(chunk) {
                        for &w in &workers {
                            let ev =
                                store_chain_after(w, 0, &chain[..from], &chain[from..from + chunk]);
                            ns.apply(ev).expect("apply");
                        }
                    }
                    barrier.wait(); // stores submitted
                    barrier.wait(); // main checked
                    for &w in &workers {
                        ns.remove_worker(w).expect("remove_worker");
                    }
                    barrier.wait(); // removals done
                }
            });
        }

        let _guard = barrier.guard();
        let all: Vec<(u64, u32, u32)> = (1..=SAME_PREFIX_WORKERS as u64)
            .map(|w| (w, 0, SAME_PREFIX_BLOCKS as u32))
            .collect();
        let full_dump: BTreeSet<_> = (1..=SAME_PREFIX_WORKERS as u64)
            .flat_map(|w| canonical_chain(w, 0, &chain))
            .collect();
        for round in 0..SAME_PREFIX_ROUNDS {
            barrier.wait();
            barrier.wait();
            ns.flush().expect("flush");
            assert_eq!(
                ns.find_matches(&lh(&chain), false).sorted(),
                expected(&all),
                "round {round}: every worker holds the whole chain"
            );
            assert_eq!(
                ns.current_size(),
                SAME_PREFIX_WORKERS * SAME_PREFIX_BLOCKS,
                "round {round}"
            );
            let counts: Vec<(WorkerWithDpRank, usize)> = (1..=SAME_PREFIX_WORKERS as u64)
                .map(|w| (wr(w, 0), SAME_PREFIX_BLOCKS))
                .collect();
            assert_eq!(ns.worker_block_counts(), counts, "round {round}");
            if round % 10 == 0 {
                let dump = ns.dump().expect("dump");
                assert_eq!(assert_dump_well_formed(&dump), full_dump, "round {round}");
                assert_eq!(
                    dump_canonical(&dump).len(),
                    SAME_PREFIX_WORKERS * SAME_PREFIX_BLOCKS
                );
            }
            barrier.wait();
            barrier.wait();
            assert_eq!(
                ns.find_matches(&lh(&chain), false).sorted(),
                vec![],
                "round {round}"
            );
            assert_eq!(ns.current_size(), 0, "round {round}");
            assert_eq!(ns.get_workers(), Vec::<u64>::new(), "round {round}");
        }
    });
}
