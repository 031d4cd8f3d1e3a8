//! Recovery throughput benchmark (not a test): writes N events (default 10 million) to a fresh
//! log, then times (1) a scan-only recovery (validation + decoding, `NullSink`) and (2) a full
//! recovery into an engine (`EngineSink`).
//!
//!   cargo run --release -p kvindex-persistence --example recovery_bench -- [events] [batch]
//!
//! Runs in a temporary directory under $TMPDIR; prints events per second.

use std::sync::Arc;
use std::time::Instant;

use kvindex_engine::{
    Engine, EngineConfig, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};
use kvindex_persistence::{
    read_log, EngineSink, EventLog, FsyncPolicy, LogConfig, LogEntry, NamespaceSpec, NullSink,
    RecoveryPolicy,
};

fn event(i: u64) -> RouterEvent {
    let worker = i % 16;
    // Stores of 4-block chains, and removals of the chain stored 8 events earlier (same worker).
    let data = if i & 1 == 0 {
        let base = i * 4;
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: None,
            start_position: None,
            blocks: (0..4)
                .map(|k| KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(base + k),
                    tokens_hash: LocalBlockHash((i / 32 % 1000) * 8 + k),
                    mm_extra_info: None,
                })
                .collect(),
        })
    } else {
        let base = (i.saturating_sub(17)) * 4;
        KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: (0..4)
                .map(|k| ExternalSequenceBlockHash(base + k))
                .collect(),
        })
    };
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: i,
            data,
            dp_rank: 0,
        },
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args
        .get(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000);
    let batch: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(16);
    let dir = std::env::temp_dir().join(format!("kvindex-recovery-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let spec = Arc::new(NamespaceSpec::new("bench-model", "default", 16));

    let t = Instant::now();
    {
        let config = LogConfig {
            fsync: FsyncPolicy::Never,
            ..LogConfig::default()
        };
        let (log, _) = EventLog::open(&dir, config, &mut NullSink).expect("open");
        let mut i = 0;
        while i < n {
            let entries: Vec<LogEntry> = (i..(i + batch).min(n))
                .map(|k| LogEntry::event(spec.clone(), k, event(k)))
                .collect();
            i += entries.len() as u64;
            let _ = log.append(&entries).expect("append");
        }
        log.sync().expect("sync");
        log.close().expect("close");
    }
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    println!(
        "wrote {n} events in batches of {batch}: {:.2} s, {} MiB on disk",
        t.elapsed().as_secs_f64(),
        bytes >> 20
    );

    let t = Instant::now();
    let report = read_log(&dir, RecoveryPolicy::TolerateTail, None, &mut NullSink).expect("scan");
    let s = t.elapsed().as_secs_f64();
    println!(
        "scan + validate + decode (NullSink): {} entries in {s:.2} s = {:.2} M events/s",
        report.entries_replayed,
        report.entries_replayed as f64 / s / 1e6
    );

    let engine = Engine::new(EngineConfig::default());
    let t = Instant::now();
    let mut sink = EngineSink::new(engine.clone());
    let report = read_log(&dir, RecoveryPolicy::TolerateTail, None, &mut sink).expect("recover");
    engine.flush().expect("flush");
    let s = t.elapsed().as_secs_f64();
    println!(
        "full recovery into the engine: {} entries in {s:.2} s = {:.2} M events/s",
        report.entries_replayed,
        report.entries_replayed as f64 / s / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}
