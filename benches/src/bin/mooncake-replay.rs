//! `mooncake-replay`: the reference workload of `shared/bench/WORKLOAD.md` against our engine and
//! NVIDIA Dynamo 1.6.1's indexers.
//!
//! Every measured run happens in a fresh child process of this binary (`--child`, hidden), which
//! prints its `RunResult` as JSON on stdout; the parent aggregates medians over `--runs` and, with
//! `--compare`, checks that every backend gave the same answers (non-zero exit otherwise).
//!
//! ```text
//! cargo run --release -p kvindex-benches --bin mooncake-replay -- --compare --runs 3
//! cargo run --release -p kvindex-benches --bin mooncake-replay -- --backend dynamo-crtc \
//!     --event-threads 2 --query-threads 2 --runs 3
//! cargo run --release -p kvindex-benches --bin mooncake-replay -- --sweep --runs 3 \
//!     --rates 5000,10000,20000,40000,80000,160000,320000 --json-out sweep.json
//! ```
//!
//! `--sweep` runs the offered-load sweep of `kvindex_benches::sweep` instead: every
//! (rate, backend, run) point in a fresh child process.

use kvindex_benches::machine::{cores, Machine};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use kvindex_benches::backend::{BackendKind, DynamoBackend, NullBackend};
use kvindex_benches::backend_kvindex::KvindexBackend;
use kvindex_benches::replay::{self, Phases, RunConfig, RunResult};
use kvindex_benches::sweep::{self, SweepPointConfig, SweepPointResult};
use kvindex_benches::workload::{self, WorkloadConfig, WorkloadCounts};
use serde::Serialize;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Let mimalloc return freed memory to the OS before an RSS reading.
fn mimalloc_collect() {
    extern "C" {
        fn mi_collect(force: bool);
    }
    // SAFETY: `mi_collect` is part of mimalloc's public C API (linked in by the `mimalloc`
    // crate, our global allocator) and may be called at any time from any thread.
    unsafe { mi_collect(true) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BackendArg {
    Kvindex,
    DynamoCrtc,
    DynamoPositional,
    /// Calibration: indexes nothing (harness overhead, RSS left by freed event buffers).
    Null,
}

impl BackendArg {
    fn kind(self) -> BackendKind {
        match self {
            BackendArg::Kvindex => BackendKind::Kvindex,
            BackendArg::DynamoCrtc => BackendKind::DynamoCrtc,
            BackendArg::DynamoPositional => BackendKind::DynamoPositional,
            BackendArg::Null => BackendKind::Null,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PhaseArg {
    /// Ingest + memory.
    Ingest,
    /// Agreement digest + timed queries (implies ingest).
    Query,
    /// Mixed replay on a fresh index.
    Mixed,
}

#[derive(Debug, Parser)]
#[command(about = "Replay the mooncake-replay v1 workload against kvindex and Dynamo 1.6.1")]
struct Cli {
    /// Backend to measure (without --compare).
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Measure several backends, each in fresh child processes, print our/their ratios and fail
    /// if their answers differ.
    #[arg(long)]
    compare: bool,
    /// Backends for --compare (default: all three).
    #[arg(long, value_enum, value_delimiter = ',')]
    backends: Vec<BackendArg>,
    /// Event threads `T` of the index (default: all cores).
    #[arg(long)]
    event_threads: Option<usize>,
    /// Query threads `Q` of the query phase (default: all cores).
    #[arg(long)]
    query_threads: Option<usize>,
    /// Timed passes over all queries in the query phase (WORKLOAD.md: 1; more for steadier
    /// throughput numbers on a busy machine).
    #[arg(long, default_value_t = 1)]
    query_passes: usize,
    /// Runs per backend (medians, min–max).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Phases to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [PhaseArg::Ingest, PhaseArg::Query, PhaseArg::Mixed])]
    phases: Vec<PhaseArg>,
    /// Trace file (default: <repo>/../shared/data/traces/conversation_trace.jsonl).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Length factor `F`.
    #[arg(long, default_value_t = 16)]
    length_factor: u64,
    /// Duplication `D`.
    #[arg(long, default_value_t = 4)]
    duplication: u64,
    /// Workers `W`.
    #[arg(long, default_value_t = 256)]
    workers: u64,
    /// Per-worker cache capacity `C`, in blocks.
    #[arg(long, default_value_t = 16_384)]
    capacity: usize,
    /// Use only the first N requests of the (timestamp-sorted) trace.
    #[arg(long)]
    limit_requests: Option<usize>,
    /// kvindex only: `EngineConfig::expected_blocks`, the distinct blocks the index is sized
    /// for up front (0: the default, grow as needed; the workload's peak is at most W × C).
    #[arg(long, default_value_t = 0)]
    expected_blocks: usize,
    /// Seed of the splitmix64 worker assignment.
    #[arg(long, default_value_t = workload::DEFAULT_SEED)]
    seed: u64,
    /// Skip the check of every answer against exact scoring of the simulated caches.
    #[arg(long)]
    skip_exact: bool,
    /// Print a JSON summary instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Run in this process instead of fresh child processes (debugging only).
    #[arg(long)]
    in_process: bool,
    /// Offered-load sweep instead of the WORKLOAD.md phases (see `kvindex_benches::sweep`).
    #[arg(long)]
    sweep: bool,
    /// Offered rates of the sweep, ops (events + queries) per second.
    #[arg(long, value_delimiter = ',', default_values_t = [5_000.0, 10_000.0, 20_000.0, 40_000.0, 80_000.0, 160_000.0, 320_000.0])]
    rates: Vec<f64>,
    /// Longest window of one sweep point, seconds (lower rates replay fewer ops).
    #[arg(long, default_value_t = 3.0)]
    point_secs: f64,
    /// Fraction of the op stream applied unpaced before a sweep point's measured slice.
    #[arg(long, default_value_t = 0.5)]
    warm_fraction: f64,
    /// Internal: the offered rate of one sweep point (with --child).
    #[arg(long, hide = true)]
    sweep_rate: Option<f64>,
    /// Internal: run one measurement and print its RunResult as JSON.
    #[arg(long, hide = true)]
    child: bool,
}

impl Cli {
    fn event_threads(&self) -> usize {
        self.event_threads.unwrap_or_else(cores)
    }
    fn query_threads(&self) -> usize {
        self.query_threads.unwrap_or_else(cores)
    }
    fn trace_path(&self) -> PathBuf {
        self.trace
            .clone()
            .unwrap_or_else(workload::default_trace_path)
    }
    fn workload_config(&self) -> WorkloadConfig {
        WorkloadConfig {
            length_factor: self.length_factor,
            duplication: self.duplication,
            workers: self.workers,
            capacity: self.capacity,
            limit_requests: self.limit_requests,
            seed: self.seed,
        }
    }
    fn phases(&self) -> Phases {
        Phases {
            ingest: self.phases.contains(&PhaseArg::Ingest),
            query: self.phases.contains(&PhaseArg::Query),
            mixed: self.phases.contains(&PhaseArg::Mixed),
        }
    }
    fn selected_backends(&self) -> anyhow::Result<Vec<BackendKind>> {
        if self.compare {
            if self.backends.is_empty() {
                Ok(BackendKind::ALL.to_vec())
            } else {
                Ok(self.backends.iter().map(|b| b.kind()).collect())
            }
        } else {
            match self.backend {
                Some(b) => Ok(vec![b.kind()]),
                None => anyhow::bail!(
                    "give --backend <kvindex|dynamo-crtc|dynamo-positional> or --compare"
                ),
            }
        }
    }
    /// Arguments of a child process measuring `kind` once.
    fn child_args(&self, kind: BackendKind) -> Vec<String> {
        let mut a = vec![
            "--child".to_string(),
            "--backend".into(),
            kind.name().into(),
            "--event-threads".into(),
            self.event_threads().to_string(),
            "--query-threads".into(),
            self.query_threads().to_string(),
            "--query-passes".into(),
            self.query_passes.to_string(),
            "--trace".into(),
            self.trace_path().display().to_string(),
            "--length-factor".into(),
            self.length_factor.to_string(),
            "--duplication".into(),
            self.duplication.to_string(),
            "--workers".into(),
            self.workers.to_string(),
            "--capacity".into(),
            self.capacity.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--phases".into(),
        ];
        if self.skip_exact {
            a.insert(0, "--skip-exact".into());
        }
        let phases: Vec<&str> = self
            .phases
            .iter()
            .map(|p| match p {
                PhaseArg::Ingest => "ingest",
                PhaseArg::Query => "query",
                PhaseArg::Mixed => "mixed",
            })
            .collect();
        a.push(phases.join(","));
        if let Some(n) = self.limit_requests {
            a.push("--limit-requests".into());
            a.push(n.to_string());
        }
        if self.expected_blocks > 0 {
            a.push("--expected-blocks".into());
            a.push(self.expected_blocks.to_string());
        }
        a
    }
}

impl Cli {
    /// Arguments of a child process measuring one sweep point.
    fn sweep_child_args(&self, kind: BackendKind, rate: f64) -> Vec<String> {
        let mut a = self.child_args(kind);
        a.extend([
            "--sweep-rate".to_string(),
            rate.to_string(),
            "--point-secs".into(),
            self.point_secs.to_string(),
            "--warm-fraction".into(),
            self.warm_fraction.to_string(),
        ]);
        a
    }
}

/// One sweep point of `kind` in this process.
fn sweep_here(cli: &Cli, kind: BackendKind, rate: f64) -> anyhow::Result<SweepPointResult> {
    let trace = workload::load_trace(&cli.trace_path())?;
    let wl = workload::generate(&trace, &cli.workload_config())?;
    let ts = sweep::op_timestamps(&wl, &trace)?;
    drop(trace);
    let et = cli.event_threads();
    let cfg = SweepPointConfig {
        offered_ops_per_sec: rate,
        point_secs: cli.point_secs,
        warm_fraction: cli.warm_fraction,
    };
    let mut r = match kind {
        BackendKind::Kvindex => {
            let expected = cli.expected_blocks;
            sweep::run_point(
                &|| KvindexBackend::with_expected_blocks(et, expected),
                &wl,
                &ts,
                et,
                &cfg,
            )?
        }
        BackendKind::DynamoCrtc => {
            sweep::run_point(&|| DynamoBackend::crtc(et), &wl, &ts, et, &cfg)?
        }
        BackendKind::DynamoPositional => {
            sweep::run_point(&|| DynamoBackend::positional(et), &wl, &ts, et, &cfg)?
        }
        BackendKind::Null => sweep::run_point(&|| Ok(NullBackend::new()), &wl, &ts, et, &cfg)?,
    };
    r.backend = kind.name().to_string();
    Ok(r)
}

/// One sweep point of `kind` in a fresh child process.
fn sweep_child(cli: &Cli, kind: BackendKind, rate: f64) -> anyhow::Result<SweepPointResult> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = Command::new(exe)
        .args(cli.sweep_child_args(kind, rate))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("spawning child process")?;
    if !out.status.success() {
        anyhow::bail!("sweep child for {} failed: {}", kind.name(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("sweep child for {} printed no result", kind.name()))?;
    serde_json::from_str(line)
        .with_context(|| format!("parsing the sweep point of {}", kind.name()))
}

/// Medians (min–max) of one backend at one offered rate.
#[derive(Debug, Serialize)]
struct SweepStat {
    backend: String,
    offered_ops_per_sec: f64,
    runs: usize,
    achieved_ops_per_sec: (f64, f64, f64),
    query_p50_us: (f64, f64, f64),
    query_p99_us: (f64, f64, f64),
    query_p999_us: (f64, f64, f64),
    query_lag_p99_us: (f64, f64, f64),
    /// Seconds after the window until every event was applied (elapsed − window, ≥ 0): how
    /// long queries saw an index behind the stream.
    drain_after_window_secs: (f64, f64, f64),
    /// Runs in which every event was applied within the window.
    applied_within_window: usize,
}

#[derive(Debug, Serialize)]
struct SweepSummary {
    command: String,
    machine: Machine,
    trace: String,
    workload: WorkloadConfig,
    event_threads: usize,
    point_secs: f64,
    warm_fraction: f64,
    points: Vec<SweepPointResult>,
    stats: Vec<SweepStat>,
    failures: Vec<String>,
}

fn run_sweep(cli: &Cli) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(!cli.rates.is_empty(), "--rates is empty");
    let kinds = if cli.backends.is_empty() {
        BackendKind::ALL.to_vec()
    } else {
        cli.backends.iter().map(|b| b.kind()).collect()
    };
    let mut points = Vec::new();
    let mut failures = Vec::new();
    for run in 0..cli.runs {
        for &rate in &cli.rates {
            for &kind in &kinds {
                eprintln!(
                    "--- sweep run {}/{}: {} at {rate} ops/s ---",
                    run + 1,
                    cli.runs,
                    kind.name()
                );
                let r = if cli.in_process {
                    sweep_here(cli, kind, rate)
                } else {
                    sweep_child(cli, kind, rate)
                };
                match r {
                    Ok(p) => points.push(p),
                    Err(e) => {
                        eprintln!("error: {} at {rate}: {e:#}", kind.name());
                        failures.push(format!("{} at {rate} run {}: {e:#}", kind.name(), run + 1));
                    }
                }
            }
        }
    }
    let mut stats = Vec::new();
    for &kind in &kinds {
        for &rate in &cli.rates {
            let ps: Vec<&SweepPointResult> = points
                .iter()
                .filter(|p| p.backend == kind.name() && p.offered_ops_per_sec == rate)
                .collect();
            let m = |f: fn(&SweepPointResult) -> f64| {
                median(ps.iter().map(|p| f(p)).collect()).unwrap_or((0.0, 0.0, 0.0))
            };
            if ps.is_empty() {
                continue;
            }
            stats.push(SweepStat {
                backend: kind.name().to_string(),
                offered_ops_per_sec: rate,
                runs: ps.len(),
                achieved_ops_per_sec: m(|p| p.achieved_ops_per_sec),
                query_p50_us: m(|p| p.query_latency_us.p50),
                query_p99_us: m(|p| p.query_latency_us.p99),
                query_p999_us: m(|p| p.query_latency_us.p999),
                query_lag_p99_us: m(|p| p.query_lag_us.p99),
                drain_after_window_secs: m(|p| (p.elapsed_secs - p.window_secs).max(0.0)),
                applied_within_window: ps.iter().filter(|p| p.applied_within_window).count(),
            });
        }
    }
    println!("offered-load sweep (medians of {} runs, min–max)", cli.runs);
    println!(
        "  {:<18} {:>9} {:>22} {:>9} {:>9} {:>10} {:>12} {:>9} applied in window",
        "backend",
        "offered",
        "achieved ops/s",
        "q p50 µs",
        "q p99 µs",
        "q p99.9 µs",
        "lag p99 µs",
        "drain s"
    );
    for s in &stats {
        println!(
            "  {:<18} {:>9} {:>9} ({}–{}) {:>9.1} {:>9.1} {:>10.1} {:>12.1} {:>9.2} {}/{}",
            s.backend,
            fmt_num(s.offered_ops_per_sec),
            fmt_num(s.achieved_ops_per_sec.0),
            fmt_num(s.achieved_ops_per_sec.1),
            fmt_num(s.achieved_ops_per_sec.2),
            s.query_p50_us.0,
            s.query_p99_us.0,
            s.query_p999_us.0,
            s.query_lag_p99_us.0,
            s.drain_after_window_secs.0,
            s.applied_within_window,
            s.runs
        );
    }
    let summary = SweepSummary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        trace: cli.trace_path().display().to_string(),
        workload: cli.workload_config(),
        event_threads: cli.event_threads(),
        point_secs: cli.point_secs,
        warm_fraction: cli.warm_fraction,
        points,
        stats,
        failures: failures.clone(),
    };
    if let Some(path) = &cli.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    for f in &failures {
        println!("FAILED: {f}");
    }
    if !failures.is_empty() {
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// One measurement of `kind` in this process.
fn run_here(cli: &Cli, kind: BackendKind) -> anyhow::Result<RunResult> {
    let t = Instant::now();
    let trace = workload::load_trace(&cli.trace_path())?;
    let wl = workload::generate(&trace, &cli.workload_config())?;
    drop(trace);
    let generate_secs = t.elapsed().as_secs_f64();
    let c = &wl.counts;
    eprintln!(
        "[{}] workload in {:.2}s: {} requests, {} events ({} stored blocks, {} removed blocks), {} query blocks",
        kind.name(),
        generate_secs,
        c.requests,
        c.events,
        c.stored_blocks,
        c.removed_blocks,
        c.query_blocks
    );
    let et = cli.event_threads();
    let cfg = RunConfig {
        query_threads: cli.query_threads(),
        query_passes: cli.query_passes,
        phases: cli.phases(),
        check_exact: !cli.skip_exact && kind != BackendKind::Null,
        trim: mimalloc_collect,
    };
    let mut r = match kind {
        BackendKind::Kvindex => {
            let expected = cli.expected_blocks;
            replay::run(
                &|| KvindexBackend::with_expected_blocks(et, expected),
                &wl,
                et,
                generate_secs,
                &cfg,
            )?
        }
        BackendKind::DynamoCrtc => {
            replay::run(&|| DynamoBackend::crtc(et), &wl, et, generate_secs, &cfg)?
        }
        BackendKind::DynamoPositional => replay::run(
            &|| DynamoBackend::positional(et),
            &wl,
            et,
            generate_secs,
            &cfg,
        )?,
        BackendKind::Null => replay::run(&|| Ok(NullBackend::new()), &wl, et, generate_secs, &cfg)?,
    };
    r.backend = kind.name().to_string();
    Ok(r)
}

/// The order in which run `run` (0-based) measures `n` backends: each run starts one backend
/// later than the one before, so every backend goes first equally often.
fn run_order(run: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (run + i) % n)
}

/// One measurement of `kind` in a fresh child process.
fn run_child(cli: &Cli, kind: BackendKind) -> anyhow::Result<RunResult> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let out = Command::new(exe)
        .args(cli.child_args(kind))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("spawning child process")?;
    if !out.status.success() {
        anyhow::bail!("child process for {} failed: {}", kind.name(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("child process for {} printed no result", kind.name()))?;
    serde_json::from_str(line).with_context(|| format!("parsing the result of {}", kind.name()))
}

/// A metric extracted from a run, with its better direction.
struct Metric {
    name: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    get: fn(&RunResult) -> Option<f64>,
}

const METRICS: &[Metric] = &[
    Metric {
        name: "ingest events/s",
        unit: "ev/s",
        higher_is_better: true,
        get: |r| r.ingest.as_ref().map(|i| i.events_per_sec),
    },
    Metric {
        name: "ingest stored blocks/s",
        unit: "blk/s",
        higher_is_better: true,
        get: |r| r.ingest.as_ref().map(|i| i.stored_blocks_per_sec),
    },
    Metric {
        name: "memory bytes/live pair",
        unit: "B",
        higher_is_better: false,
        get: |r| r.memory.as_ref().map(|m| m.bytes_per_pair),
    },
    Metric {
        name: "memory RSS delta",
        unit: "MiB",
        higher_is_better: false,
        get: |r| {
            r.memory
                .as_ref()
                .map(|m| m.delta_bytes as f64 / (1024.0 * 1024.0))
        },
    },
    Metric {
        name: "query queries/s",
        unit: "q/s",
        higher_is_better: true,
        get: |r| r.query.as_ref().map(|q| q.queries_per_sec),
    },
    Metric {
        name: "query blocks/s",
        unit: "blk/s",
        higher_is_better: true,
        get: |r| r.query.as_ref().map(|q| q.query_blocks_per_sec),
    },
    Metric {
        name: "query p50",
        unit: "us",
        higher_is_better: false,
        get: |r| r.query.as_ref().map(|q| q.latency_us.p50),
    },
    Metric {
        name: "query p99",
        unit: "us",
        higher_is_better: false,
        get: |r| r.query.as_ref().map(|q| q.latency_us.p99),
    },
    Metric {
        name: "query p99.9",
        unit: "us",
        higher_is_better: false,
        get: |r| r.query.as_ref().map(|q| q.latency_us.p999),
    },
    Metric {
        name: "mixed ops/s",
        unit: "op/s",
        higher_is_better: true,
        get: |r| r.mixed.as_ref().map(|m| m.ops_per_sec),
    },
    Metric {
        name: "mixed query p50",
        unit: "us",
        higher_is_better: false,
        get: |r| r.mixed.as_ref().map(|m| m.query_latency_us.p50),
    },
    Metric {
        name: "mixed query p99",
        unit: "us",
        higher_is_better: false,
        get: |r| r.mixed.as_ref().map(|m| m.query_latency_us.p99),
    },
    Metric {
        name: "mixed query p99.9",
        unit: "us",
        higher_is_better: false,
        get: |r| r.mixed.as_ref().map(|m| m.query_latency_us.p999),
    },
];

#[derive(Debug, Clone, Serialize)]
struct Stat {
    metric: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    median: f64,
    min: f64,
    max: f64,
}

fn median(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((med, v[0], v[n - 1]))
}

fn stats(runs: &[RunResult]) -> Vec<Stat> {
    METRICS
        .iter()
        .filter_map(|m| {
            let vals: Vec<f64> = runs.iter().filter_map(|r| (m.get)(r)).collect();
            median(vals).map(|(median, min, max)| Stat {
                metric: m.name,
                unit: m.unit,
                higher_is_better: m.higher_is_better,
                median,
                min,
                max,
            })
        })
        .collect()
}

#[derive(Debug, Serialize)]
struct BackendSummary {
    backend: String,
    runs: Vec<RunResult>,
    stats: Vec<Stat>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    ours: String,
    theirs: String,
    metric: &'static str,
    ratio: f64,
    higher_is_better: bool,
}

#[derive(Debug, Serialize)]
struct Summary {
    command: String,
    machine: Machine,
    trace: String,
    workload: WorkloadConfig,
    counts: Option<WorkloadCounts>,
    event_threads: usize,
    query_threads: usize,
    query_passes: usize,
    backends: Vec<BackendSummary>,
    ratios: Vec<Ratio>,
    failures: Vec<String>,
    agreement_ok: bool,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn print_human(s: &Summary) {
    println!("mooncake-replay v1");
    println!("command : {}", s.command);
    println!(
        "machine : nproc={} cpu=\"{}\" commit={}",
        s.machine.nproc, s.machine.cpu, s.machine.commit
    );
    println!("trace   : {}", s.trace);
    let w = &s.workload;
    println!(
        "workload: F={} D={} W={} C={} limit={} seed={}  T={} Q={} query passes={}",
        w.length_factor,
        w.duplication,
        w.workers,
        w.capacity,
        w.limit_requests
            .map_or("none".to_string(), |n| n.to_string()),
        w.seed,
        s.event_threads,
        s.query_threads,
        s.query_passes
    );
    if let Some(c) = &s.counts {
        println!(
            "counts  : trace requests={} requests={} events={} (stored {} / removed {}) stored blocks={} removed blocks={} live pairs={} query blocks={}",
            c.trace_requests,
            c.requests,
            c.events,
            c.stored_events,
            c.removed_events,
            c.stored_blocks,
            c.removed_blocks,
            c.live_pairs(),
            c.query_blocks
        );
    }
    for b in &s.backends {
        println!();
        println!("== {} ({} runs) ==", b.backend, b.runs.len());
        for st in &b.stats {
            println!(
                "  {:<24} {:>10} {:<6} (min {} – max {})",
                st.metric,
                fmt_num(st.median),
                st.unit,
                fmt_num(st.min),
                fmt_num(st.max)
            );
        }
        if let Some(a) = b.runs.iter().find_map(|r| r.agreement.as_ref()) {
            println!(
                "  agreement: score_sum={} entries={} digest={}",
                a.score_sum, a.entries, a.digest
            );
        }
        if let Some(x) = b.runs.iter().find_map(|r| r.exact.as_ref()) {
            let all_match = b
                .runs
                .iter()
                .all(|r| r.exact.is_none() || r.agreement == r.exact);
            println!(
                "  exact scoring: score_sum={} entries={} digest={} ({})",
                x.score_sum,
                x.entries,
                x.digest,
                if all_match {
                    "all runs match"
                } else {
                    "MISMATCH"
                }
            );
        }
    }
    if !s.ratios.is_empty() {
        println!();
        println!("== ratios (ours / theirs, medians) ==");
        for r in &s.ratios {
            println!(
                "  {:<18} / {:<18} {:<24} {:>7.3}  ({} is better)",
                r.ours,
                r.theirs,
                r.metric,
                r.ratio,
                if r.higher_is_better {
                    "higher"
                } else {
                    "lower"
                }
            );
        }
    }
    for f in &s.failures {
        println!("FAILED: {f}");
    }
    if !s.agreement_ok {
        println!(
            "AGREEMENT FAILED: query answers differ between backends or from exact scoring (see digests above)"
        );
    }
}

/// Every run of every backend (except `null`) must give the same answers, and each run that also
/// computed exact scoring must equal it. Returns one message per mismatch.
fn agreement_mismatches(per_backend: &[(BackendKind, Vec<RunResult>)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut reference: Option<(&str, &replay::Agreement)> = None;
    for (kind, results) in per_backend {
        if *kind == BackendKind::Null {
            continue;
        }
        for r in results {
            if let (Some(a), Some(x)) = (&r.agreement, &r.exact) {
                if a != x {
                    out.push(format!(
                        "EXACT-SCORING MISMATCH: {} answered {a:?}, exact scoring gives {x:?}",
                        kind.name()
                    ));
                }
            }
            if let Some(a) = &r.agreement {
                match reference {
                    None => reference = Some((kind.name(), a)),
                    Some((name, ra)) if ra != a => out.push(format!(
                        "AGREEMENT MISMATCH: {name} {ra:?} vs {} {a:?}",
                        kind.name()
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    out
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
    if cli.child {
        let kind = match cli.backend {
            Some(b) => b.kind(),
            None => anyhow::bail!("--child needs --backend"),
        };
        if let Some(rate) = cli.sweep_rate {
            let p = sweep_here(&cli, kind, rate)?;
            println!("{}", serde_json::to_string(&p)?);
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let r = run_here(&cli, kind)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(std::process::ExitCode::SUCCESS);
    }
    anyhow::ensure!(cli.runs > 0, "--runs must be >= 1");
    if cli.sweep {
        return run_sweep(&cli);
    }
    let kinds = cli.selected_backends()?;

    let mut per_backend: Vec<(BackendKind, Vec<RunResult>)> =
        kinds.iter().map(|&k| (k, Vec::new())).collect();
    let mut failures = Vec::new();
    // Interleave backends run by run, so that slow drift of the machine hits them alike, and
    // rotate which one goes first (A B, B A, A B, ...): on the shared VM, back-to-back runs
    // showed a position bias (docs/benchmarks.md, session 7), which a fixed order would hand
    // to one side every time.
    for run in 0..cli.runs {
        for idx in run_order(run, per_backend.len()) {
            let (kind, results) = &mut per_backend[idx];
            eprintln!("--- run {}/{}: {} ---", run + 1, cli.runs, kind.name());
            let r = if cli.in_process {
                run_here(&cli, *kind)
            } else {
                run_child(&cli, *kind)
            };
            match r {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("error: {} run {}: {e:#}", kind.name(), run + 1);
                    failures.push(format!("{} run {}: {e:#}", kind.name(), run + 1));
                }
            }
        }
    }

    let mismatches = agreement_mismatches(&per_backend);
    for m in &mismatches {
        eprintln!("{m}");
    }
    let agreement_ok = mismatches.is_empty();

    let backends: Vec<BackendSummary> = per_backend
        .iter()
        .map(|(k, runs)| BackendSummary {
            backend: k.name().to_string(),
            stats: stats(runs),
            runs: runs.clone(),
        })
        .collect();

    // Ratios: kvindex against each other backend, or else the first against the rest.
    let mut ratios = Vec::new();
    if backends.len() > 1 {
        let ours_idx = backends
            .iter()
            .position(|b| b.backend == BackendKind::Kvindex.name())
            .unwrap_or(0);
        let ours = &backends[ours_idx];
        for (i, theirs) in backends.iter().enumerate() {
            if i == ours_idx || theirs.backend == BackendKind::Null.name() {
                continue;
            }
            for so in &ours.stats {
                if let Some(st) = theirs.stats.iter().find(|t| t.metric == so.metric) {
                    if st.median != 0.0 {
                        ratios.push(Ratio {
                            ours: ours.backend.clone(),
                            theirs: theirs.backend.clone(),
                            metric: so.metric,
                            ratio: so.median / st.median,
                            higher_is_better: so.higher_is_better,
                        });
                    }
                }
            }
        }
    }

    let counts = per_backend
        .iter()
        .find_map(|(_, rs)| rs.first().map(|r| r.counts.clone()));
    let summary = Summary {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::detect(),
        trace: cli.trace_path().display().to_string(),
        workload: cli.workload_config(),
        counts,
        event_threads: cli.event_threads(),
        query_threads: cli.query_threads(),
        query_passes: cli.query_passes,
        backends,
        ratios,
        failures: failures.clone(),
        agreement_ok,
    };
    if let Some(path) = &cli.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_human(&summary);
    }
    if !agreement_ok {
        eprintln!("error: backends disagree on query answers");
        return Ok(std::process::ExitCode::from(2));
    }
    if !failures.is_empty() {
        eprintln!("error: {} run(s) failed", failures.len());
        return Ok(std::process::ExitCode::FAILURE);
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvindex_benches::replay::Agreement;

    #[test]
    fn runs_rotate_which_backend_goes_first() {
        let order = |run| run_order(run, 2).collect::<Vec<_>>();
        assert_eq!(order(0), vec![0, 1]);
        assert_eq!(order(1), vec![1, 0]);
        assert_eq!(order(2), vec![0, 1]);
        let three: Vec<Vec<usize>> = (0..3).map(|r| run_order(r, 3).collect()).collect();
        assert_eq!(three, vec![vec![0, 1, 2], vec![1, 2, 0], vec![2, 0, 1]]);
        // Every backend goes first once in n runs, and each run measures each backend once.
        let firsts: Vec<usize> = three.iter().map(|o| o[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        assert!(three.iter().all(|o| {
            let mut s = o.clone();
            s.sort_unstable();
            s == vec![0, 1, 2]
        }));
    }

    fn result(digest: &str, exact: Option<&str>) -> RunResult {
        let a = |d: &str| Agreement {
            score_sum: 1,
            entries: 1,
            digest: d.to_string(),
        };
        RunResult {
            backend: String::new(),
            event_threads: 1,
            query_threads: 1,
            counts: WorkloadCounts::default(),
            generate_secs: 0.0,
            ingest: None,
            memory: None,
            query: None,
            agreement: Some(a(digest)),
            mixed: None,
            exact: exact.map(a),
        }
    }

    #[test]
    fn agreement_check_catches_disagreement() {
        let ok = vec![
            (
                BackendKind::DynamoCrtc,
                vec![result("aa", Some("aa")), result("aa", None)],
            ),
            (
                BackendKind::DynamoPositional,
                vec![result("aa", Some("aa"))],
            ),
            (BackendKind::Null, vec![result("zz", None)]),
        ];
        assert!(agreement_mismatches(&ok).is_empty());
        let between = vec![
            (BackendKind::DynamoCrtc, vec![result("aa", None)]),
            (BackendKind::Kvindex, vec![result("bb", None)]),
        ];
        assert_eq!(agreement_mismatches(&between).len(), 1);
        let exact = vec![(BackendKind::Kvindex, vec![result("bb", Some("aa"))])];
        assert_eq!(agreement_mismatches(&exact).len(), 1);
    }
}
