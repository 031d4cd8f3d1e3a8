//! Shared test helpers: event builders, a deterministic event-stream generator, a small
//! reference model of index semantics, and log configurations for both write paths.
#![allow(dead_code)]

use kvindex_engine::reference::ReferenceIndex;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use kvindex_engine::{
    Engine, EngineConfig, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, NamespaceKey,
    RouterEvent, WorkerWithDpRank,
};
use kvindex_persistence::{
    io_uring_available, FsyncPolicy, IoBackendChoice, LogConfig, LogEntry, LogOp, LoggedEntry,
    NamespaceSpec, RecoveryPolicy,
};

pub type Canonical = BTreeSet<(WorkerWithDpRank, Vec<u64>, u64)>;

/// Snapshots only when a test asks for one, keeping the newest `keep`.
pub fn manual_snapshots(keep: usize) -> kvindex_persistence::SnapshotPolicy {
    kvindex_persistence::SnapshotPolicy {
        every_entries: None,
        every: None,
        keep,
    }
}

pub fn ns() -> Arc<NamespaceSpec> {
    Arc::new(NamespaceSpec::new("model-a", "default", 16))
}

pub fn ns_b() -> Arc<NamespaceSpec> {
    Arc::new(NamespaceSpec::new("model-b", "tenant-7", 32))
}

pub fn stored(
    worker: u64,
    dp: u32,
    id: u64,
    parent: Option<u64>,
    blocks: &[(u64, u64)],
) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: id,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(ExternalSequenceBlockHash),
                start_position: None,
                blocks: blocks
                    .iter()
                    .map(|&(ext, local)| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(ext),
                        tokens_hash: LocalBlockHash(local),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
            dp_rank: dp,
        },
    )
}

pub fn removed(worker: u64, dp: u32, id: u64, hashes: &[u64]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: id,
            data: KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: hashes
                    .iter()
                    .copied()
                    .map(ExternalSequenceBlockHash)
                    .collect(),
            }),
            dp_rank: dp,
        },
    )
}

pub fn cleared(worker: u64, dp: u32, id: u64) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: id,
            data: KvCacheEventData::Cleared,
            dp_rank: dp,
        },
    )
}

/// Small deterministic RNG (xorshift64*).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Generates plausible events for a set of streams: chains extending held blocks, removals of
/// held blocks, occasional clears. External hashes are unique per generator.
pub struct EventGen {
    rng: Rng,
    streams: Vec<WorkerWithDpRank>,
    held: HashMap<WorkerWithDpRank, Vec<u64>>,
    next_ext: u64,
    next_id: u64,
}

impl EventGen {
    pub fn new(seed: u64, streams: Vec<WorkerWithDpRank>) -> Self {
        Self {
            rng: Rng::new(seed),
            streams,
            held: HashMap::new(),
            // Distinct ranges per seed keep generators of one test from colliding.
            next_ext: (seed % 1000 + 1) << 40,
            next_id: 0,
        }
    }

    pub fn next_event(&mut self) -> RouterEvent {
        let s = self.streams[self.rng.below(self.streams.len() as u64) as usize];
        self.event_for(s)
    }

    pub fn event_for(&mut self, s: WorkerWithDpRank) -> RouterEvent {
        self.next_id += 1;
        let id = self.next_id;
        let held = self.held.entry(s).or_default();
        let roll = self.rng.below(100);
        if roll < 3 {
            held.clear();
            return cleared(s.worker_id, s.dp_rank, id);
        }
        if roll < 25 && !held.is_empty() {
            let k = 1 + self.rng.below(3.min(held.len() as u64)) as usize;
            let mut hashes = Vec::new();
            for _ in 0..k {
                let i = self.rng.below(held.len() as u64) as usize;
                hashes.push(held.swap_remove(i));
            }
            if self.rng.below(10) == 0 {
                hashes.push(0xDEAD_0000 + id); // unknown: skipped by the index
            }
            return removed(s.worker_id, s.dp_rank, id, &hashes);
        }
        let parent = if held.is_empty() || self.rng.below(4) == 0 {
            None
        } else {
            Some(held[self.rng.below(held.len() as u64) as usize])
        };
        let n = 1 + self.rng.below(4) as usize;
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            self.next_ext += 1;
            // Few distinct locals so that streams share prefixes.
            blocks.push((self.next_ext, 1 + self.rng.below(6)));
            held.push(self.next_ext);
        }
        stored(s.worker_id, s.dp_rank, id, parent, &blocks)
    }
}

/// The engine's reference model (`kvindex_engine::reference`), driven by log entries.
#[derive(Default, Debug, Clone)]
pub struct Model {
    reference: ReferenceIndex,
}

impl Model {
    pub fn apply(&mut self, ev: &RouterEvent) {
        // Failing events change nothing in the model, exactly as in the engine.
        let _ = self.reference.apply(ev);
    }

    pub fn apply_op(&mut self, e: &LogEntry) {
        match &e.op {
            LogOp::Event(ev) => self.apply(ev),
            LogOp::RemoveWorker => self.reference.remove_worker(e.worker_id),
            LogOp::ClearAllBlocks => self.reference.clear_all_blocks(e.worker_id),
            LogOp::RemoveWorkerDpRank => {
                self.reference.remove_worker_dp_rank(e.worker_id, e.dp_rank)
            }
            LogOp::DropNamespace => *self = Model::default(),
        }
    }

    pub fn canonical(&self) -> Canonical {
        self.reference
            .held_blocks()
            .into_iter()
            .map(|(s, path, ext)| (s, path.iter().map(|l| l.0).collect(), ext.0))
            .collect()
    }
}

/// The model fed `entries` of one namespace.
pub fn model_of<'a>(entries: impl IntoIterator<Item = &'a LogEntry>) -> Model {
    let mut m = Model::default();
    for e in entries {
        m.apply_op(e);
    }
    m
}

/// Canonical image of namespace `key` in `engine` (empty if absent).
pub fn engine_canonical(engine: &Engine, key: &NamespaceKey) -> Canonical {
    match engine.namespace(key) {
        Some(ns) => ns.snapshot().expect("snapshot").canonical(),
        None => Canonical::new(),
    }
}

pub fn small_engine() -> Engine {
    Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 1024,
        ..EngineConfig::default()
    })
}

/// The write paths to test: always the portable one, io_uring when this machine allows it.
pub fn backends() -> Vec<IoBackendChoice> {
    match io_uring_available() {
        Ok(()) => vec![IoBackendChoice::Portable, IoBackendChoice::IoUring],
        Err(e) => {
            eprintln!("note: io_uring unavailable here ({e}); testing the portable writer only");
            vec![IoBackendChoice::Portable]
        }
    }
}

pub fn cfg(io: IoBackendChoice, fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        io,
        fsync,
        ..LogConfig::default()
    }
}

pub fn cfg_policy(policy: RecoveryPolicy) -> LogConfig {
    LogConfig {
        recovery: policy,
        io: IoBackendChoice::Portable,
        ..LogConfig::default()
    }
}

pub fn entries_of(v: &[LoggedEntry]) -> Vec<LogEntry> {
    v.iter().map(|l| l.entry.clone()).collect()
}

/// The first LSN of a segment file, from its name (`seg-<first lsn>.kvlog`).
pub fn segment_first_lsn(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.strip_prefix("seg-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a segment file name: {}", path.display()))
}

pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvlog"))
        .collect();
    v.sort();
    v
}

pub fn snapshot_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvsnap"))
        .collect();
    v.sort();
    v
}
