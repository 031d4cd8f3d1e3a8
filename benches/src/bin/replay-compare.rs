//! `replay-compare`: §3 of issue #5 — serving "every event since X" and bringing a cold
//! consumer to the current state, on the same event stream, with a model of vLLM's replay
//! buffer, a model of Dynamo's worker-side local indexer, and kvindex's real log + snapshot.
//!
//! Every reconstructed state is compared with the workload's final simulated caches; the run
//! exits with status 2 if an approach that claims to recover gives a different state.
//!
//! ```text
//! cargo run --release -p kvindex-benches --bin replay-compare -- --workers 4 --reps 3 \
//!     --json-out benches/results/replay-compare.json
//! ```

use kvindex_benches::machine::{cores, Machine};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use kvindex_benches::replay_models::consumer::Consumer;
use kvindex_benches::replay_models::dynamo_local::{
    DynamoLocalIndexer, DynamoReply, DYNAMO_WORKER_BUFFER_EVENTS,
};
use kvindex_benches::replay_models::kvindex_log;
use kvindex_benches::replay_models::stream::{expected_digest, EventStream, StateDigest};
use kvindex_benches::replay_models::vllm_buffer::{
    decode_payload, VllmReplayBuffer, VLLM_BUFFER_STEPS,
};
use kvindex_benches::workload::{self, WorkloadConfig, WorkloadCounts};
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "Event replay: vLLM replay buffer vs Dynamo local indexer vs kvindex log")]
struct Cli {
    /// Trace file (default: <repo>/../shared/data/traces/conversation_trace.jsonl).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Workers `W` (= publishers). Fewer workers give longer per-publisher streams; the
    /// default makes each stream longer than vLLM's 10,000-batch buffer.
    #[arg(long, default_value_t = 4)]
    workers: u64,
    #[arg(long, default_value_t = 16)]
    length_factor: u64,
    #[arg(long, default_value_t = 4)]
    duplication: u64,
    #[arg(long, default_value_t = 16_384)]
    capacity: usize,
    #[arg(long)]
    limit_requests: Option<usize>,
    #[arg(long, default_value_t = workload::DEFAULT_SEED)]
    seed: u64,
    /// vLLM `buffer_steps` (batches kept per publisher).
    #[arg(long, default_value_t = VLLM_BUFFER_STEPS)]
    vllm_buffer: usize,
    /// Dynamo `WORKER_KV_INDEXER_BUFFER_SIZE` (events kept per worker).
    #[arg(long, default_value_t = DYNAMO_WORKER_BUFFER_EVENTS)]
    dynamo_buffer: usize,
    /// Ages (in batches of the asked worker's stream) of the "since X" requests; ages past the
    /// stream's length are skipped, and the whole stream is always added.
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 100, 1_000, 5_000, 10_000, 10_001, 20_000, 40_000])]
    ages: Vec<u64>,
    /// The worker whose stream is asked (default: the one with the most batches).
    #[arg(long)]
    worker: Option<u64>,
    /// Timed repetitions of each measurement (median, min–max).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// kvindex: batches after the snapshot (the log tail a cold start replays).
    #[arg(long, default_value_t = 5_000)]
    tail_batches: usize,
    /// Event threads of every engine (default: all cores).
    #[arg(long)]
    event_threads: Option<usize>,
    /// Directory for the kvindex log (default: a fresh temporary directory, deleted at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return Stat {
            median: 0.0,
            min: 0.0,
            max: 0.0,
        };
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// One "since X" measurement of one approach.
#[derive(Debug, Clone, Serialize)]
struct SinceRow {
    approach: &'static str,
    age_batches: u64,
    start_seq: u64,
    /// `events` (complete history), `tree-dump` (state only), `partial` (batches lost).
    outcome: String,
    /// Whether the consumer can reach the current state from this answer.
    recovers: bool,
    events_returned: u64,
    bytes_returned: Option<u64>,
    secs: Stat,
}

/// One cold-consumer measurement.
#[derive(Debug, Clone, Serialize)]
struct ColdRow {
    approach: &'static str,
    outcome: String,
    /// Serve (read / scan / dump) + decode + apply + flush, per repetition.
    secs: Stat,
    events_applied: u64,
    state: StateDigest,
    matches_expected: bool,
    /// False when the approach itself reports it cannot rebuild the state.
    claims_recovery: bool,
}

/// Which gaps an approach can still close.
#[derive(Debug, Clone, Serialize)]
struct RecoverRow {
    age_batches: u64,
    vllm: String,
    dynamo: String,
    kvindex: String,
}

#[derive(Debug, Serialize)]
struct Report {
    command: String,
    machine: Machine,
    workload: WorkloadConfig,
    counts: WorkloadCounts,
    batches: u64,
    events: u64,
    per_worker_batches: Vec<u64>,
    asked_worker: u64,
    vllm_buffer_batches: usize,
    dynamo_buffer_events: usize,
    kvindex_log_bytes: u64,
    kvindex_snapshot_next_lsn: Option<u64>,
    kvindex_end_lsn: u64,
    tail_batches: usize,
    reps: usize,
    expected: StateDigest,
    since: Vec<SinceRow>,
    cold: Vec<ColdRow>,
    recoverability: Vec<RecoverRow>,
    failures: Vec<String>,
}

/// Time `f` `reps` times; returns the per-repetition seconds and the last result.
fn timed<T>(
    reps: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<(Vec<f64>, T)> {
    let mut secs = Vec::with_capacity(reps);
    let mut last = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let r = f()?;
        secs.push(t.elapsed().as_secs_f64());
        last = Some(r);
    }
    let last = last.ok_or_else(|| anyhow::anyhow!("no repetition ran"))?;
    Ok((secs, last))
}

struct Models {
    vllm: Vec<VllmReplayBuffer>,
    dynamo: Vec<DynamoLocalIndexer>,
}

fn build_models(stream: &EventStream, cli: &Cli) -> anyhow::Result<Models> {
    let workers = stream.per_worker.len();
    let mut vllm = (0..workers)
        .map(|_| VllmReplayBuffer::new(cli.vllm_buffer))
        .collect::<Result<Vec<_>, _>>()?;
    let mut dynamo = (0..workers)
        .map(|_| DynamoLocalIndexer::new(cli.dynamo_buffer))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, b) in stream.batches.iter().enumerate() {
        let w = usize::try_from(b.worker_id)?;
        let seq = vllm[w].publish(i as f64, &b.events)?;
        anyhow::ensure!(
            seq == b.seq,
            "vLLM model numbered batch {seq}, stream says {}",
            b.seq
        );
        for e in &b.events {
            dynamo[w].apply(e)?;
        }
    }
    Ok(Models { vllm, dynamo })
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    anyhow::ensure!(cli.reps > 0, "--reps must be >= 1");
    let threads = cli.event_threads.unwrap_or_else(cores);
    let wcfg = WorkloadConfig {
        length_factor: cli.length_factor,
        duplication: cli.duplication,
        workers: cli.workers,
        capacity: cli.capacity,
        limit_requests: cli.limit_requests,
        seed: cli.seed,
    };
    let trace_path = cli
        .trace
        .clone()
        .unwrap_or_else(workload::default_trace_path);
    let t = Instant::now();
    let trace = workload::load_trace(&trace_path)?;
    let wl = workload::generate(&trace, &wcfg)?;
    drop(trace);
    let stream = EventStream::from_workload(&wl)?;
    let expected = expected_digest(&wl);
    eprintln!(
        "workload in {:.1}s: {} batches, {} events, {} stored blocks, per-worker batches {:?}; final state {} pairs",
        t.elapsed().as_secs_f64(),
        stream.batches.len(),
        stream.event_count(),
        wl.counts.stored_blocks,
        stream.per_worker,
        expected.pairs
    );
    let asked = match cli.worker {
        Some(w) => w,
        None => stream
            .per_worker
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .map(|(w, _)| w as u64)
            .ok_or_else(|| anyhow::anyhow!("the stream is empty"))?,
    };
    let asked_count = *stream
        .per_worker
        .get(usize::try_from(asked)?)
        .ok_or_else(|| anyhow::anyhow!("worker {asked} has no batches"))?;
    anyhow::ensure!(asked_count > 0, "worker {asked} has no batches");

    // Publisher-side state of the two models.
    let t = Instant::now();
    let models = build_models(&stream, &cli)?;
    eprintln!("models built in {:.1}s", t.elapsed().as_secs_f64());

    // kvindex: the real log, with a snapshot `tail_batches` before the end.
    let tmp;
    let data_dir = match &cli.data_dir {
        Some(d) => {
            anyhow::ensure!(
                !d.exists() || std::fs::read_dir(d)?.next().is_none(),
                "--data-dir {} is not empty",
                d.display()
            );
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("kvindex-replay-compare")
                .tempdir()?;
            tmp.path().join("data")
        }
    };
    let snapshot_after = stream.batches.len().saturating_sub(cli.tail_batches);
    let t = Instant::now();
    let log = kvindex_log::write(
        &data_dir,
        &stream,
        (snapshot_after > 0).then_some(snapshot_after),
        threads,
    )?;
    let log_bytes = log.bytes_on_disk()?;
    eprintln!(
        "kvindex log written in {:.1}s: {} entries, {:.1} MiB, snapshot at LSN {:?}",
        t.elapsed().as_secs_f64(),
        log.end_lsn - 1,
        log_bytes as f64 / (1 << 20) as f64,
        log.snapshot_next_lsn
    );
    let mut failures = Vec::new();
    if log.written_digest != expected {
        failures.push(format!(
            "kvindex writer's engine state {:?} != expected {:?}",
            log.written_digest, expected
        ));
    }

    // 1. Since X, for the asked worker.
    let mut ages: Vec<u64> = cli
        .ages
        .iter()
        .copied()
        .filter(|&a| a >= 1 && a < asked_count)
        .collect();
    ages.push(asked_count);
    ages.sort_unstable();
    ages.dedup();
    let w = usize::try_from(asked)?;
    let first_ids = kvindex_benches::replay_models::stream::first_event_ids(&stream);
    let asked_first_ids = first_ids
        .get(&asked)
        .ok_or_else(|| anyhow::anyhow!("worker {asked} has no events"))?;
    let mut since = Vec::new();
    let mut recoverability = Vec::new();
    for &age in &ages {
        let start = asked_count - age;
        eprintln!("since X: age {age} batches (seq {start})");
        // vLLM
        let buf = &models.vllm[w];
        let (secs, reply) = timed(cli.reps, || Ok(buf.replay_since(start)))?;
        let vllm_row = SinceRow {
            approach: "vllm-buffer",
            age_batches: age,
            start_seq: start,
            outcome: if reply.complete {
                "events".into()
            } else {
                format!(
                    "partial: batches {start}..{} lost",
                    buf.oldest_seq().unwrap_or(start)
                )
            },
            recovers: reply.complete,
            events_returned: reply.batches.len() as u64,
            bytes_returned: Some(reply.bytes()),
            secs: stat(secs),
        };
        // Dynamo
        let start_id = *asked_first_ids
            .get(usize::try_from(start)?)
            .ok_or_else(|| anyhow::anyhow!("no batch {start}"))?;
        let local = &models.dynamo[w];
        let (secs, reply) = timed(cli.reps, || Ok(local.events_since(Some(start_id))))?;
        let dynamo_row = SinceRow {
            approach: "dynamo-local-indexer",
            age_batches: age,
            start_seq: start,
            outcome: reply.kind().to_string(),
            recovers: matches!(
                reply,
                DynamoReply::Events { .. } | DynamoReply::TreeDump { .. }
            ),
            events_returned: reply.events().len() as u64,
            bytes_returned: None,
            secs: stat(secs),
        };
        // kvindex
        let (secs, events) = timed(cli.reps, || Ok(log.events_since(asked, start)?))?;
        let expected_events: u64 = stream
            .worker_batches(asked)
            .skip(usize::try_from(start)?)
            .map(|b| b.events.len() as u64)
            .sum();
        if events.len() as u64 != expected_events {
            failures.push(format!(
                "kvindex since seq {start}: {} events, the stream has {expected_events}",
                events.len()
            ));
        }
        let kv_row = SinceRow {
            approach: "kvindex-log",
            age_batches: age,
            start_seq: start,
            outcome: "events".into(),
            recovers: true,
            events_returned: events.len() as u64,
            bytes_returned: None,
            secs: stat(secs),
        };
        recoverability.push(RecoverRow {
            age_batches: age,
            vllm: vllm_row.outcome.clone(),
            dynamo: match dynamo_row.outcome.as_str() {
                "events" => "events".into(),
                "tree-dump" => "state only (tree dump; gap history lost)".into(),
                o => o.into(),
            },
            kvindex: "events (log on disk)".into(),
        });
        since.extend([vllm_row, dynamo_row, kv_row]);
    }

    // 2. Cold consumer: from nothing to the current state of every worker.
    let mut cold = Vec::new();
    eprintln!("cold start: vLLM buffers");
    {
        let recoverable = models.vllm.iter().all(|b| b.can_replay_from(0));
        let (secs, (state, applied)) = timed(cli.reps, || {
            let c = Consumer::new(threads)?;
            let mut applied = 0u64;
            for buf in &models.vllm {
                for (_, payload) in buf.replay_since(0).batches {
                    for e in decode_payload(&payload)?.events {
                        c.apply(e)?;
                        applied += 1;
                    }
                }
            }
            c.flush()?;
            Ok((c.digest()?, applied))
        })?;
        let lost: u64 = models
            .vllm
            .iter()
            .map(|b| b.oldest_seq().unwrap_or(0))
            .sum();
        cold.push(ColdRow {
            approach: "vllm-buffer",
            outcome: if recoverable {
                "full replay from seq 0".into()
            } else {
                format!("unrecoverable: {lost} oldest batches no longer buffered")
            },
            secs: stat(secs),
            events_applied: applied,
            matches_expected: state == expected,
            state,
            claims_recovery: recoverable,
        });
    }
    eprintln!("cold start: Dynamo tree dumps");
    {
        let (secs, (state, applied)) = timed(cli.reps, || {
            let c = Consumer::new(threads)?;
            let mut applied = 0u64;
            for local in &models.dynamo {
                let reply = local.events_since(None);
                anyhow::ensure!(
                    matches!(reply, DynamoReply::TreeDump { .. }),
                    "a cold request must get a tree dump, got {}",
                    reply.kind()
                );
                if let DynamoReply::TreeDump { events, .. } = reply {
                    for e in events {
                        c.apply(e)?;
                        applied += 1;
                    }
                }
            }
            c.flush()?;
            Ok((c.digest()?, applied))
        })?;
        cold.push(ColdRow {
            approach: "dynamo-local-indexer",
            outcome: "tree dump per worker".into(),
            secs: stat(secs),
            events_applied: applied,
            matches_expected: state == expected,
            state,
            claims_recovery: true,
        });
    }
    eprintln!("cold start: kvindex snapshot + log tail");
    {
        let (secs, (state, applied)) = timed(cli.reps, || {
            let (engine, applied) = log.cold_start(threads)?;
            let d = log.engine_digest(&engine)?;
            engine.shutdown();
            Ok((d, applied))
        })?;
        cold.push(ColdRow {
            approach: "kvindex-snapshot+tail",
            outcome: format!("snapshot + {applied} log entries"),
            secs: stat(secs),
            events_applied: applied,
            matches_expected: state == expected,
            state,
            claims_recovery: true,
        });
    }
    eprintln!("cold start: kvindex whole log");
    {
        let (secs, (state, applied)) = timed(cli.reps, || {
            let (engine, applied) = log.cold_start_full_log(threads)?;
            let d = log.engine_digest(&engine)?;
            engine.shutdown();
            Ok((d, applied))
        })?;
        cold.push(ColdRow {
            approach: "kvindex-full-log",
            outcome: format!("{applied} log entries, no snapshot"),
            secs: stat(secs),
            events_applied: applied,
            matches_expected: state == expected,
            state,
            claims_recovery: true,
        });
    }
    for c in &cold {
        if c.claims_recovery && !c.matches_expected {
            failures.push(format!(
                "STATE MISMATCH: {} rebuilt {:?}, expected {:?}",
                c.approach, c.state, expected
            ));
        }
    }

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        workload: wcfg,
        counts: wl.counts.clone(),
        batches: stream.batches.len() as u64,
        events: stream.event_count(),
        per_worker_batches: stream.per_worker.clone(),
        asked_worker: asked,
        vllm_buffer_batches: cli.vllm_buffer,
        dynamo_buffer_events: cli.dynamo_buffer,
        kvindex_log_bytes: log_bytes,
        kvindex_snapshot_next_lsn: log.snapshot_next_lsn,
        kvindex_end_lsn: log.end_lsn,
        tail_batches: cli.tail_batches,
        reps: cli.reps,
        expected,
        since,
        cold,
        recoverability,
        failures: failures.clone(),
    };
    print_human(&report);
    if let Some(p) = &cli.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        return Ok(std::process::ExitCode::from(2));
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

fn print_human(r: &Report) {
    println!("replay-compare");
    println!(
        "machine : nproc={} cpu=\"{}\" commit={}",
        r.machine.nproc, r.machine.cpu, r.machine.commit
    );
    println!(
        "stream  : W={} {} batches, {} events; asked worker {} ({} batches); vLLM buffer {} batches, Dynamo buffer {} events; kvindex log {:.1} MiB, snapshot at LSN {:?} of {}",
        r.workload.workers,
        r.batches,
        r.events,
        r.asked_worker,
        r.per_worker_batches
            .get(r.asked_worker as usize)
            .copied()
            .unwrap_or(0),
        r.vllm_buffer_batches,
        r.dynamo_buffer_events,
        r.kvindex_log_bytes as f64 / (1 << 20) as f64,
        r.kvindex_snapshot_next_lsn,
        r.kvindex_end_lsn
    );
    println!(
        "expected final state: {} pairs, digest {}",
        r.expected.pairs, r.expected.digest
    );
    println!();
    println!("== events since X (median of {} reps, min–max) ==", r.reps);
    for s in &r.since {
        println!(
            "  age {:>6}  {:<22} {:<34} {:>8} ev  {:>10} ({} – {})",
            s.age_batches,
            s.approach,
            s.outcome,
            s.events_returned,
            fmt_secs(s.secs.median),
            fmt_secs(s.secs.min),
            fmt_secs(s.secs.max)
        );
    }
    println!();
    println!("== cold consumer to current state ==");
    for c in &r.cold {
        println!(
            "  {:<24} {:>10} ({} – {})  {:>9} events  state {} pairs {}  [{}]",
            c.approach,
            fmt_secs(c.secs.median),
            fmt_secs(c.secs.min),
            fmt_secs(c.secs.max),
            c.events_applied,
            c.state.pairs,
            if c.matches_expected {
                "= expected"
            } else {
                "!= expected"
            },
            c.outcome
        );
    }
    println!();
    println!("== recoverability (asked worker) ==");
    for row in &r.recoverability {
        println!(
            "  age {:>6}: vLLM {:<34} Dynamo {:<42} kvindex {}",
            row.age_batches, row.vllm, row.dynamo, row.kvindex
        );
    }
}
