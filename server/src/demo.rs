//! `kvindex demo`: replays the shared production trace into the engine and queries it, so a new
//! user sees the index work end to end before the network service exists.

use anyhow::{Context, Result};
use kvindex_engine::hashing::{
    compute_block_hash_for_seq, compute_seq_hash_for_block, HashOptions,
};
use kvindex_engine::{
    Engine, EngineConfig, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
    KvCacheStoreData, KvCacheStoredBlockData, NamespaceKey, RouterEvent,
};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

/// Options of `kvindex demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Trace in the Mooncake JSON-lines format.
    #[arg(long, default_value = "../shared/data/traces/conversation_trace.jsonl")]
    pub trace: PathBuf,
    /// Simulated workers (requests are assigned round-robin).
    #[arg(long, default_value_t = 16)]
    pub workers: u64,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    pub block_size: u32,
    /// Engine blocks per 512-token trace block.
    #[arg(long, default_value_t = 4)]
    pub blocks_per_trace_block: u32,
    /// Stop after this many requests (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Event threads (0 = available cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(serde::Deserialize)]
struct TraceLine {
    hash_ids: Vec<u64>,
}

fn tokens_for(hash_ids: &[u64], args: &DemoArgs) -> Vec<u32> {
    let per = args.blocks_per_trace_block as u64;
    let mut tokens = Vec::with_capacity(hash_ids.len() * (per * args.block_size as u64) as usize);
    for &h in hash_ids {
        for j in 0..per {
            let id = (h * per + j) as u32;
            tokens.extend(std::iter::repeat_n(id, args.block_size as usize));
        }
    }
    tokens
}

/// Run the demo and print what the index holds.
pub fn run(args: DemoArgs) -> Result<()> {
    let file = std::fs::File::open(&args.trace).with_context(|| {
        format!(
            "cannot open the trace {}; pass --trace PATH (run from the repository root, with shared/ beside it)",
            args.trace.display()
        )
    })?;
    let mut requests = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", args.trace.display()))?;
        let t: TraceLine = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a trace line", args.trace.display(), n + 1))?;
        requests.push(t.hash_ids);
        if args.limit > 0 && requests.len() >= args.limit {
            break;
        }
    }
    let threads = if args.threads == 0 {
        EngineConfig::default().event_threads
    } else {
        args.threads
    };
    let engine = Engine::new(EngineConfig {
        event_threads: threads,
        ..EngineConfig::default()
    });
    let ns = engine.create_namespace(NamespaceKey::new("demo", "default"), args.block_size)?;
    let opts = HashOptions::default();
    let workers = args.workers.max(1);

    let hashed: Vec<_> = requests
        .iter()
        .map(|ids| {
            let locals =
                compute_block_hash_for_seq(&tokens_for(ids, &args), args.block_size, &opts);
            let seq = compute_seq_hash_for_block(&locals);
            (locals, seq)
        })
        .collect();

    let start = Instant::now();
    let mut blocks = 0usize;
    for (i, (locals, seq)) in hashed.iter().enumerate() {
        blocks += locals.len();
        let event = RouterEvent::new(
            i as u64 % workers,
            KvCacheEvent {
                event_id: (i as u64) / workers,
                dp_rank: 0,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    start_position: None,
                    blocks: locals
                        .iter()
                        .zip(seq)
                        .map(|(l, s)| KvCacheStoredBlockData {
                            block_hash: ExternalSequenceBlockHash(*s),
                            tokens_hash: *l,
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
            },
        );
        ns.apply(event)?;
    }
    ns.flush()?;
    let ingest = start.elapsed();

    let mut latencies = Vec::with_capacity(hashed.len());
    let mut matched = 0u64;
    for (locals, _) in &hashed {
        let t = Instant::now();
        let scores = ns.find_matches(locals, false);
        latencies.push(t.elapsed().as_nanos() as u64);
        matched += scores.scores.values().copied().max().unwrap_or(0) as u64;
    }
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let mem = ns.memory();
    println!("kvindex demo on {}", args.trace.display());
    println!(
        "  ingested {} store events ({} blocks) on {} event threads in {:.3}s: {:.0} events/s, {:.0} blocks/s",
        hashed.len(),
        blocks,
        engine.event_threads(),
        ingest.as_secs_f64(),
        hashed.len() as f64 / ingest.as_secs_f64(),
        blocks as f64 / ingest.as_secs_f64()
    );
    println!(
        "  index: {} workers, {} (block, worker) pairs, {} distinct blocks, {:.1} bytes/pair",
        ns.get_workers().len(),
        ns.current_size(),
        mem.live_nodes,
        (mem.node_bytes + mem.heap_bytes) as f64 / ns.current_size().max(1) as f64
    );
    println!(
        "  {} queries: p50 {:.1}µs p99 {:.1}µs, mean best match {:.1} blocks",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        matched as f64 / latencies.len().max(1) as f64
    );
    if let Some((locals, _)) = hashed.last() {
        let mut best = ns.find_matches(locals, false).sorted();
        best.sort_by_key(|(_, s)| std::cmp::Reverse(*s));
        best.truncate(3);
        println!("  last request's best workers (worker, dp_rank, blocks): {best:?}");
    }
    let c = ns.event_counters();
    println!(
        "  events ok: {}, duplicate stores: {}",
        c.get("stored", "ok"),
        c.duplicate_store
    );
    Ok(())
}
