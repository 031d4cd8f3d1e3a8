//! `service-load`: load tests of the running service (issue #5 §4). Starts `kvindex serve` (the
//! release binary, temp data directory, free port) once per `--fsync` policy and, with
//! `--dynamo-python`, Dynamo 1.6.1's `python -m dynamo.indexer`; floods each with the trace's
//! events over ZMQ (vLLM wire protocol, one publisher per worker) and measures published →
//! applied events/s; checks every target's answers against exact scoring; then runs closed-loop
//! `/query` and `/query_by_hash` load at increasing concurrency. Medians over `--runs`, JSON and
//! SVG plots.
//!
//! ```text
//! cargo build --release -p kvindex-server --bin kvindex
//! cargo build --release -p kvindex-benches --bin service-load
//! target/release/service-load --runs 3 --dynamo-python /tmp/dynvenv-load/bin/python \
//!     --json-out benches/results/service-<commit>.json --plots-dir docs/img
//! ```

use kvindex_benches::machine::Machine;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use kvindex_benches::service::agreement;
use kvindex_benches::service::http::HttpConn;
use kvindex_benches::service::ingest;
use kvindex_benches::service::load::{self, LoadSpec};
use kvindex_benches::service::plot::{self, LoadFigure};
use kvindex_benches::service::summary::{self, RunRecord, TargetRun, TargetSummary};
use kvindex_benches::service::target::{self, TargetKind, TargetProcess};
use kvindex_benches::service::trace_bodies::{self, ServiceWorkload};
use kvindex_benches::workload::{self, WorkloadConfig};
use serde::Serialize;

#[derive(Debug, Parser, Serialize)]
#[command(
    about = "Load tests of kvindex serve (and Dynamo's standalone indexer) over HTTP and ZMQ"
)]
struct Cli {
    /// Trace file (default: <repo>/../shared/data/traces/conversation_trace.jsonl).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// First N requests of the sorted trace (keeps runs short; 0 = whole trace).
    #[arg(long, default_value_t = 2000)]
    limit_requests: usize,
    /// Workers (one ZMQ publisher and one registration each).
    #[arg(long, default_value_t = 64)]
    workers: u64,
    /// Workload length factor F.
    #[arg(long, default_value_t = 16)]
    length_factor: u64,
    /// Workload duplication D.
    #[arg(long, default_value_t = 4)]
    duplication: u64,
    /// Simulated cache capacity C (blocks per worker).
    #[arg(long, default_value_t = 16_384)]
    capacity: usize,
    /// Worker-assignment seed.
    #[arg(long, default_value_t = workload::DEFAULT_SEED)]
    seed: u64,
    /// The `kvindex` binary (default: <repo>/target/release/kvindex).
    #[arg(long)]
    kvindex_bin: Option<PathBuf>,
    /// `--fsync` policies to measure ingest under, one kvindex process each.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "never,interval:10,always"
    )]
    fsync_modes: Vec<String>,
    /// The policy whose kvindex process also gets the query load (queries do not write).
    #[arg(long, default_value = "always")]
    load_fsync: String,
    /// Python with `ai-dynamo-runtime==1.6.1`; without it (or if it lacks `dynamo.indexer`)
    /// Dynamo is skipped with a note.
    #[arg(long)]
    dynamo_python: Option<PathBuf>,
    /// `--threads` of every target (both servers default to 4).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Closed-loop client counts.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// Routes to load.
    #[arg(long, value_delimiter = ',', default_value = "/query,/query_by_hash")]
    routes: Vec<String>,
    /// Unrecorded warm-up per load level.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Recorded time per load level.
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Runs (fresh processes each; the target order rotates run by run); medians and min–max
    /// over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Check every N-th query against exact scoring after ingest (both routes).
    #[arg(long, default_value_t = 10)]
    agreement_stride: usize,
    /// Give up on an ingest after this many seconds.
    #[arg(long, default_value_t = 300)]
    ingest_timeout_s: u64,
    /// Tokio worker threads of this client.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Write the full results (runs, summaries, ratios) as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write service-query-rps.svg, service-query-p99.svg and service-ingest.svg here.
    #[arg(long)]
    plots_dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report<'a> {
    tool: &'static str,
    command: String,
    machine: Machine,
    config: &'a Cli,
    counts: Counts,
    notes: Vec<String>,
    runs: Vec<RunRecord>,
    summaries: Vec<TargetSummary>,
    ratios: Vec<summary::Ratio>,
}

#[derive(Serialize, Clone)]
struct Counts {
    workers: u64,
    batches: u64,
    events: u64,
    stored_blocks: u64,
    queries: u64,
    mean_query_body_bytes: f64,
    mean_query_by_hash_body_bytes: f64,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Everything a target needs for one measurement.
struct Plan<'a> {
    cli: &'a Cli,
    workload: &'a ServiceWorkload,
    buffer_steps: usize,
    ticks: f64,
}

async fn measure(plan: &Plan<'_>, kind: TargetKind, with_load: bool) -> anyhow::Result<TargetRun> {
    let cli = plan.cli;
    let label = kind.label();
    let mut target = TargetProcess::start(kind, cli.threads)
        .await
        .with_context(|| format!("start {label}"))?;
    let mut conn = HttpConn::connect(target.addr).await?;
    let pubs = ingest::bind_publishers(plan.workload.workers, plan.buffer_steps).await?;
    ingest::register_workers(&mut conn, &pubs, &plan.workload.model).await?;
    ingest::wait_subscribed(
        &mut conn,
        plan.workload.workers,
        Duration::from_secs(1),
        Duration::from_secs(60),
    )
    .await?;
    let cpu = |t: &TargetProcess| target::cpu_seconds(t.pid(), plan.ticks);
    let cpu_before = cpu(&target);
    let mut ingest = ingest::flood(
        plan.workload,
        &pubs,
        &mut conn,
        Duration::from_millis(5),
        Duration::from_secs(cli.ingest_timeout_s),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{label} ingest: {e}\nlog tail:\n{}", target.log_tail(15)))?;
    ingest.server_cpu_s = cpu(&target)
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    eprintln!(
        "[{label}] ingest: {} events in {:.2}s ({:.0} events/s, publish {:.2}s, server CPU {:.2}s) applied {:?} listeners {:?}",
        ingest.events, ingest.e2e_s, ingest.events_per_s, ingest.publish_s,
        ingest.server_cpu_s.unwrap_or(f64::NAN), ingest.applied, ingest.listener_totals
    );
    let rss_after_ingest_bytes = target::rss_bytes(target.pid());
    let agreement = agreement::check(&mut conn, plan.workload, cli.agreement_stride).await?;
    eprintln!(
        "[{label}] agreement: {} queries, {} mismatches ({} below exact, {} above)",
        agreement.queries, agreement.mismatches, agreement.below_exact, agreement.above_exact
    );
    let mut loads = Vec::new();
    if with_load {
        for route in &cli.routes {
            let bodies = Arc::new(match route.as_str() {
                "/query" => plan.workload.token_bodies.clone(),
                "/query_by_hash" => plan.workload.hash_bodies.clone(),
                other => bail!("unknown route {other} (use /query or /query_by_hash)"),
            });
            for &c in &cli.concurrency {
                let spec = LoadSpec {
                    path: route.clone(),
                    concurrency: c,
                    warmup: Duration::from_millis(cli.warmup_ms),
                    duration: Duration::from_millis(cli.duration_ms),
                    requests_per_client: None,
                };
                let before = cpu(&target);
                let mut r = load::run(target.addr, &spec, bodies.clone()).await?;
                r.server_cpu_us_per_request = cpu(&target)
                    .zip(before)
                    .filter(|_| r.sent_incl_warmup > 0)
                    .map(|(a, b)| (a - b) * 1e6 / r.sent_incl_warmup as f64);
                eprintln!(
                    "[{label}] {route} c={c}: {:.0} req/s p50 {:.0}us p99 {:.0}us p99.9 {:.0}us, server CPU {:.0}us/req ({} ok, {} errors)",
                    r.requests_per_s, r.p50_us, r.p99_us, r.p999_us,
                    r.server_cpu_us_per_request.unwrap_or(f64::NAN), r.ok, r.errors
                );
                loads.push(r);
            }
        }
    }
    target.check_alive()?;
    drop(pubs);
    Ok(TargetRun {
        label,
        ingest,
        rss_after_ingest_bytes,
        agreement,
        loads,
    })
}

fn fmt_stat(s: &summary::Stat, digits: usize) -> String {
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits, s.median, digits, s.min, digits, s.max
    )
}

fn print_summary(summaries: &[TargetSummary], ratios: &[summary::Ratio]) {
    println!("\n== ingest (published -> applied), medians (min–max) ==");
    for s in summaries {
        println!(
            "{:<28} events/s {:<28} blocks/s {:<34} e2e s {}  server CPU s {}  agreement {}/{} mismatches",
            s.label,
            fmt_stat(&s.ingest_events_per_s, 0),
            fmt_stat(&s.ingest_blocks_per_s, 0),
            fmt_stat(&s.ingest_e2e_s, 2),
            fmt_stat(&s.ingest_server_cpu_s, 2),
            s.agreement_mismatches,
            s.agreement_queries * 2,
        );
    }
    println!("\n== query load, medians (min–max) ==");
    for s in summaries.iter().filter(|s| !s.loads.is_empty()) {
        for l in &s.loads {
            println!(
                "{:<24} {:<15} c={:<3} req/s {:<26} p50 us {:<22} p99 us {:<24} p99.9 us {:<24} CPU us/req {}",
                s.label,
                l.path,
                l.concurrency,
                fmt_stat(&l.requests_per_s, 0),
                fmt_stat(&l.p50_us, 0),
                fmt_stat(&l.p99_us, 0),
                fmt_stat(&l.p999_us, 0),
                fmt_stat(&l.server_cpu_us_per_request, 0),
            );
        }
    }
    if !ratios.is_empty() {
        println!("\n== kvindex vs Dynamo (medians; advantage > 1 = kvindex better) ==");
        for r in ratios {
            println!(
                "{:<24} {:<32} kvindex {:>12.1}  dynamo {:>12.1}  x{:.2}",
                r.kvindex_label, r.what, r.kvindex, r.dynamo, r.advantage
            );
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.client_threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let machine = Machine::detect();
    let mut notes = vec![format!(
        "shared machine: nproc={} ({}); clients, publishers and servers share these cores with other \
         engineers' jobs, so absolute figures are noisy",
        machine.nproc, machine.cpu
    )];
    let kvindex_bin = cli
        .kvindex_bin
        .clone()
        .unwrap_or_else(|| repo_root().join("target").join("release").join("kvindex"));
    if !kvindex_bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p kvindex-server --bin kvindex` \
             or pass --kvindex-bin",
            kvindex_bin.display()
        );
    }
    let dynamo = match &cli.dynamo_python {
        Some(py) if target::dynamo_available(py) => Some(py.clone()),
        Some(py) => {
            let n = format!(
                "Dynamo skipped: `{} -m dynamo.indexer --help` failed (install with \
                 `python3 -m venv /tmp/dynvenv-load && /tmp/dynvenv-load/bin/pip install ai-dynamo-runtime==1.6.1`)",
                py.display()
            );
            eprintln!("note: {n}");
            notes.push(n);
            None
        }
        None => {
            let n = "Dynamo skipped: no --dynamo-python given".to_owned();
            eprintln!("note: {n}");
            notes.push(n);
            None
        }
    };
    if !cli.fsync_modes.contains(&cli.load_fsync) {
        bail!("--load-fsync {} is not among --fsync-modes", cli.load_fsync);
    }

    let trace_path = cli
        .trace
        .clone()
        .unwrap_or_else(workload::default_trace_path);
    let trace = workload::load_trace(&trace_path)?;
    let config = WorkloadConfig {
        length_factor: cli.length_factor,
        duplication: cli.duplication,
        workers: cli.workers,
        capacity: cli.capacity,
        limit_requests: (cli.limit_requests > 0).then_some(cli.limit_requests),
        seed: cli.seed,
    };
    let generated = workload::generate(&trace, &config)?;
    let service = trace_bodies::build(&trace, &generated, "m")?;
    drop(generated);
    let mut per_worker = vec![0usize; service.workers as usize];
    for b in &service.batches {
        per_worker[b.worker as usize] += 1;
    }
    let buffer_steps = per_worker.iter().copied().max().unwrap_or(0) + 16;
    let counts = Counts {
        workers: service.workers,
        batches: service.batches.len() as u64,
        events: service.events,
        stored_blocks: service.stored_blocks,
        queries: service.token_bodies.len() as u64,
        mean_query_body_bytes: service.mean_token_body_bytes(),
        mean_query_by_hash_body_bytes: service.mean_hash_body_bytes(),
    };
    eprintln!(
        "workload: {} workers, {} batches, {} events, {} stored blocks, {} queries (mean body {:.0} B /query, {:.0} B /query_by_hash)",
        counts.workers, counts.batches, counts.events, counts.stored_blocks, counts.queries,
        counts.mean_query_body_bytes, counts.mean_query_by_hash_body_bytes
    );

    let plan = Plan {
        cli: &cli,
        workload: &service,
        buffer_steps,
        ticks: target::clock_ticks_per_second(),
    };
    let mut runs = Vec::new();
    for run in 1..=cli.runs.max(1) {
        eprintln!("--- run {run}/{} ---", cli.runs.max(1));
        let mut kinds: Vec<(TargetKind, bool)> = cli
            .fsync_modes
            .iter()
            .map(|mode| {
                let kind = TargetKind::Kvindex {
                    bin: kvindex_bin.clone(),
                    fsync: mode.clone(),
                };
                (kind, *mode == cli.load_fsync)
            })
            .collect();
        if let Some(py) = &dynamo {
            kinds.push((TargetKind::Dynamo { python: py.clone() }, true));
        }
        // Rotate the order run by run so that no target always goes first (or after the same
        // neighbour) on a noisy machine.
        let len = kinds.len();
        kinds.rotate_left((run - 1) % len);
        let mut targets = Vec::new();
        for (kind, with_load) in kinds {
            targets.push(measure(&plan, kind, with_load).await?);
        }
        runs.push(RunRecord { run, targets });
    }

    let summaries = summary::summarize(&runs);
    let ratios = summary::ratios(&summaries);
    print_summary(&summaries, &ratios);

    if let Some(dir) = &cli.plots_dir {
        std::fs::create_dir_all(dir)?;
        let loaded: Vec<TargetSummary> = summaries
            .iter()
            .filter(|s| !s.loads.is_empty())
            .cloned()
            .collect();
        plot::plot_load(
            &dir.join("service-query-rps.svg"),
            &loaded,
            LoadFigure::RequestsPerSecond,
            &format!(
                "requests/s vs concurrency ({}, {} runs)",
                machine.commit,
                runs.len()
            ),
        )?;
        plot::plot_load(
            &dir.join("service-query-p99.svg"),
            &loaded,
            LoadFigure::P99,
            &format!(
                "p99 latency vs concurrency ({}, {} runs)",
                machine.commit,
                runs.len()
            ),
        )?;
        plot::plot_ingest(
            &dir.join("service-ingest.svg"),
            &summaries,
            &format!(
                "end-to-end ingest, {} events over ZMQ ({}, {} runs)",
                counts.events,
                machine.commit,
                runs.len()
            ),
        )?;
    }

    let load_errors: u64 = summaries
        .iter()
        .flat_map(|s| s.loads.iter())
        .map(|l| l.errors)
        .sum();
    let kvindex_mismatches: u64 = summaries
        .iter()
        .filter(|s| s.label != "dynamo")
        .map(|s| s.agreement_mismatches)
        .sum();
    if let Some(path) = &cli.json_out {
        let report = Report {
            tool: "service-load",
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine,
            config: &cli,
            counts: counts.clone(),
            notes,
            runs,
            summaries,
            ratios,
        };
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if load_errors > 0 {
        bail!("{load_errors} requests were not answered 200 (see first_error in the JSON)");
    }
    if kvindex_mismatches > 0 {
        bail!("kvindex answered {kvindex_mismatches} queries differently from exact scoring");
    }
    Ok(())
}
