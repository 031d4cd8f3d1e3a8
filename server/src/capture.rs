//! `kvindex capture`: record a live vLLM / SGLang ZMQ event stream into a kvindex event log, for
//! later replay.
//!
//! One ZMQ listener (the same one `serve` uses: SUB socket, per-stream sequencing, gap replay
//! with timeout and bounded retries) feeds a sink that appends every decoded batch to the
//! persistence crate's [`EventLog`] as one record, under the partition given by `--model-name`,
//! `--routing-group` and `--block-size`. The directory is therefore an ordinary data directory:
//! `kvindex replay inspect|export|state DIR` read it and `kvindex serve --data-dir DIR` serves it
//! (the partition is adopted from the log).
//!
//! It ends on SIGINT / SIGTERM, after `--duration`, or once `--max-events` events are logged;
//! then the log is synced and a summary is printed: one JSON object on stdout, one line on
//! stderr. Gaps are filled by replay when `--replay-endpoint` is given; otherwise they are
//! logged (stderr), counted (`gaps`, `lost_batches`) and reported. Undecodable frames and
//! payloads are counted and reported, never fatal.
//!
//! Exit codes: 0 — captured and synced; 1 — bad value, target not empty, the endpoint cannot be
//! used, or the log failed; 2 — usage error (clap).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kvindex_engine::RouterEvent;
use kvindex_persistence::{EventLog, FsyncPolicy, LogConfig, LogEntry, NamespaceSpec, NullSink};
use kvindex_server::zmq::listener::ListenerCounters;
use kvindex_server::zmq::{EventSink, ListenerSpec, ListenerState, SinkError, ZmqIngest};
use serde::Serialize;

use crate::cli::ReplayTuningArgs;
use crate::config::{ReplayTuning, DEFAULT_GROUP};

/// vLLM's default block size, used when `--block-size` is not given.
pub const DEFAULT_CAPTURE_BLOCK_SIZE: u32 = 16;
/// How often the listener's state is checked for a `failed` endpoint.
const STATE_POLL: Duration = Duration::from_millis(200);

/// Flags of `kvindex capture`.
#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    /// The engine's ZMQ PUB endpoint (vLLM `--kv-events-config` endpoint), e.g. tcp://host:5557.
    #[arg(long, value_name = "ENDPOINT")]
    pub zmq: String,
    /// Directory to write the event log into; must be new or empty.
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// The engine's ROUTER replay endpoint: gaps are filled from it. Without it gaps are
    /// recorded (stderr, counters, summary) and the batches are lost.
    #[arg(long, value_name = "ENDPOINT")]
    pub replay_endpoint: Option<String>,
    /// Worker (instance) id the events are logged under.
    #[arg(long, default_value_t = 0)]
    pub worker_id: u64,
    /// dp_rank of batches that do not name their own `data_parallel_rank`.
    #[arg(long, default_value_t = 0)]
    pub dp_rank: u32,
    /// Tokens per block of the engine (local hashes are computed with it).
    #[arg(long, default_value_t = DEFAULT_CAPTURE_BLOCK_SIZE)]
    pub block_size: u32,
    /// Model name of the logged partition.
    #[arg(long, default_value = DEFAULT_GROUP)]
    pub model_name: String,
    /// Routing group of the logged partition.
    #[arg(long, default_value = DEFAULT_GROUP)]
    pub routing_group: String,
    /// Stop after this long: `30`, `30s`, `500ms`, `5m`, `1h` (plain numbers are seconds).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop once this many events are logged (the batch that reaches it is kept whole).
    #[arg(long, value_name = "N")]
    pub max_events: Option<u64>,
    /// When the log is forced to disk: always | interval:<ms> | never [default: always].
    #[arg(long)]
    pub fsync: Option<String>,
    #[command(flatten)]
    pub replay: ReplayTuningArgs,
}

/// Parse `--duration`: a number with an optional unit `ms`, `s`, `m` or `h` (default seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number with an optional unit ms, s, m, h")
    })?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m or h"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("invalid duration {text:?}: must be above 0"));
    }
    Ok(d)
}

/// Why the capture stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Signal,
    Duration,
    MaxEvents,
    LogFailed,
    ListenerFailed,
}

/// The sink of the capture listener: each decoded batch becomes one log record.
struct CaptureSink {
    log: Arc<EventLog>,
    spec: Arc<NamespaceSpec>,
    max_events: Option<u64>,
    /// Submits hold the read side; closing takes the write side after setting `closed`, so no
    /// record reaches the log after [`CaptureSink::close`] returns.
    inflight: RwLock<()>,
    closed: AtomicBool,
    events: AtomicU64,
    records: AtomicU64,
    empty_batches: AtomicU64,
    seqs: Mutex<Option<(u64, u64)>>,
    stop: tokio::sync::watch::Sender<Option<StopReason>>,
}

impl CaptureSink {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        drop(self.inflight.write().unwrap_or_else(|e| e.into_inner()));
    }

    fn request_stop(&self, reason: StopReason) {
        self.stop.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

impl EventSink for CaptureSink {
    fn submit(
        &self,
        _worker_id: u64,
        _dp_rank: u32,
        _generation: u64,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<(), SinkError> {
        let _inflight = self.inflight.read().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Err(SinkError::Rejected("the capture has stopped".into()));
        }
        {
            let mut seqs = self.seqs.lock().unwrap_or_else(|e| e.into_inner());
            let (first, _) = seqs.unwrap_or((source_seq, source_seq));
            *seqs = Some((first.min(source_seq), source_seq));
        }
        if events.is_empty() {
            self.empty_batches.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let n = events.len() as u64;
        // The decoder stamped every event with the listener's worker id and the batch's
        // effective dp_rank: the entry's stream is taken from the event.
        let entries: Vec<LogEntry> = events
            .into_iter()
            .map(|ev| LogEntry::event(Arc::clone(&self.spec), source_seq, ev))
            .collect();
        if let Err(e) = self.log.append(&entries) {
            tracing::error!(error = %e, source_seq, "the event log refused a batch; stopping");
            self.request_stop(StopReason::LogFailed);
            return Err(SinkError::Unavailable(e.to_string()));
        }
        self.records.fetch_add(1, Ordering::Relaxed);
        let total = self.events.fetch_add(n, Ordering::Relaxed) + n;
        if self.max_events.is_some_and(|max| total >= max) {
            // Nothing after this batch is logged.
            self.closed.store(true, Ordering::SeqCst);
            self.request_stop(StopReason::MaxEvents);
        }
        Ok(())
    }
}

/// What `kvindex capture` prints when it ends (stdout, one JSON object).
#[derive(Debug, Serialize)]
pub struct CaptureSummary {
    pub stopped_by: StopReason,
    pub dir: String,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
    pub worker_id: u64,
    /// Events written to the log.
    pub events: u64,
    /// Batches accepted (including batches with nothing indexable).
    pub batches: u64,
    /// Log records written (one per batch with at least one event).
    pub records: u64,
    /// Batches that decoded to no event (not logged).
    pub empty_batches: u64,
    /// First and last batch sequence numbers seen by the sink.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The last LSN of the log, synced.
    pub last_lsn: u64,
    /// Decode errors: malformed messages + undecodable payloads + rejected events.
    pub errors: u64,
    /// The listener's counters (gaps, replays, lost batches, decode failures, ...).
    pub listener: ListenerCounters,
    /// The replay endpoint failed its last request.
    pub degraded: bool,
    pub seconds: f64,
}

fn ensure_empty_target(dir: &Path) -> Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "capture target {} is not empty: capture writes a new log; choose a new or empty directory",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// Run `kvindex capture`; returns the exit code.
pub fn run(args: &CaptureArgs) -> i32 {
    match capture(args) {
        Ok(summary) => {
            eprintln!(
                "capture: {} events in {} batches ({} empty) from {} into {}, last_lsn={}; gaps={} lost_batches={} replays={} replay_failures={} errors={} (malformed={} undecodable={} rejected_events={}); stopped by {:?}",
                summary.events,
                summary.batches,
                summary.empty_batches,
                summary.endpoint,
                summary.dir,
                summary.last_lsn,
                summary.listener.gaps,
                summary.listener.lost_batches,
                summary.listener.replay_requests,
                summary.listener.replay_failures,
                summary.errors,
                summary.listener.malformed_messages,
                summary.listener.decode_failures,
                summary.listener.events_rejected,
                summary.stopped_by,
            );
            match serde_json::to_string(&summary) {
                Ok(json) => println!("{json}"),
                Err(e) => eprintln!("error: cannot print the summary: {e}"),
            }
            match summary.stopped_by {
                StopReason::LogFailed | StopReason::ListenerFailed => 1,
                _ => 0,
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

fn capture(args: &CaptureArgs) -> Result<CaptureSummary> {
    if args.block_size == 0 {
        bail!("--block-size must be at least 1");
    }
    if args.max_events == Some(0) {
        bail!("--max-events must be at least 1");
    }
    let tuning = ReplayTuning::resolve(&args.replay, &ReplayTuningArgs::default())?;
    let fsync: FsyncPolicy = match &args.fsync {
        Some(s) => s.parse()?,
        None => FsyncPolicy::Always,
    };
    kvindex_server::zmq::validate_endpoint(&args.zmq)?;
    if let Some(r) = &args.replay_endpoint {
        kvindex_server::zmq::validate_endpoint(r).context("--replay-endpoint")?;
    }
    ensure_empty_target(&args.to)?;
    let config = LogConfig {
        fsync,
        ..LogConfig::default()
    };
    let (log, _) = EventLog::open(&args.to, config, &mut NullSink)
        .with_context(|| format!("cannot open an event log in {}", args.to.display()))?;
    let log = Arc::new(log);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(None);
    let sink = Arc::new(CaptureSink {
        log: Arc::clone(&log),
        spec: Arc::new(NamespaceSpec::new(
            &args.model_name,
            &args.routing_group,
            args.block_size,
        )),
        max_events: args.max_events,
        inflight: RwLock::new(()),
        closed: AtomicBool::new(false),
        events: AtomicU64::new(0),
        records: AtomicU64::new(0),
        empty_batches: AtomicU64::new(0),
        seqs: Mutex::new(None),
        stop: stop_tx,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kvindex-capture")
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let zmq = ZmqIngest::new(
        runtime.handle().clone(),
        Arc::clone(&sink) as Arc<dyn EventSink>,
        tuning.ingest_config(),
    );
    let mut spec = ListenerSpec::new(args.worker_id, args.dp_rank, &args.zmq, args.block_size);
    if let Some(r) = &args.replay_endpoint {
        spec = spec.with_replay(r.clone());
    }
    let reason = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        zmq.register(spec)?;
        tracing::info!(
            endpoint = %args.zmq,
            replay_endpoint = ?args.replay_endpoint,
            dir = %args.to.display(),
            "capturing"
        );
        let deadline = async {
            match args.duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut poll = tokio::time::interval(STATE_POLL);
        let reason = loop {
            tokio::select! {
                _ = int.recv() => break StopReason::Signal,
                _ = term.recv() => break StopReason::Signal,
                _ = &mut deadline => break StopReason::Duration,
                changed = stop_rx.wait_for(Option::is_some) => {
                    break changed.ok().and_then(|r| *r).unwrap_or(StopReason::Signal);
                }
                _ = poll.tick() => {
                    let failed = zmq
                        .status(args.worker_id, args.dp_rank)
                        .filter(|s| s.state == ListenerState::Failed);
                    if let Some(s) = failed {
                        tracing::error!(error = ?s.last_error, "the listener cannot run");
                        break StopReason::ListenerFailed;
                    }
                }
            }
        };
        anyhow::Ok(reason)
    })?;
    tracing::info!(?reason, "stopping the capture");
    sink.close();
    runtime.block_on(zmq.shutdown_and_wait());
    let status = zmq.status(args.worker_id, args.dp_rank);
    drop(zmq);
    runtime.shutdown_timeout(Duration::from_secs(2));
    // `sync` answers the next LSN, below which everything is durable.
    let last_lsn = log
        .sync()
        .context("syncing the event log")?
        .saturating_sub(1);
    if let Some(failure) = log.writer_failure() {
        bail!("the event log failed: {failure}");
    }
    let counters = status
        .as_ref()
        .map(|s| s.counters.clone())
        .unwrap_or_default();
    let seqs = *sink.seqs.lock().unwrap_or_else(|e| e.into_inner());
    Ok(CaptureSummary {
        stopped_by: reason,
        dir: args.to.display().to_string(),
        endpoint: args.zmq.clone(),
        replay_endpoint: args.replay_endpoint.clone(),
        model_name: args.model_name.clone(),
        routing_group: args.routing_group.clone(),
        block_size: args.block_size,
        worker_id: args.worker_id,
        events: sink.events.load(Ordering::Relaxed),
        batches: counters.batches_applied,
        records: sink.records.load(Ordering::Relaxed),
        empty_batches: sink.empty_batches.load(Ordering::Relaxed),
        first_seq: seqs.map(|s| s.0),
        last_seq: seqs.map(|s| s.1),
        last_lsn,
        errors: counters.malformed_messages + counters.decode_failures + counters.events_rejected,
        degraded: status.as_ref().is_some_and(|s| s.degraded),
        listener: counters,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0").unwrap_err().contains("above 0"));
        assert!(parse_duration("5d").unwrap_err().contains("unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn a_non_empty_target_is_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(ensure_empty_target(d.path()).is_ok());
        assert!(ensure_empty_target(&d.path().join("new")).is_ok());
        std::fs::write(d.path().join("x"), b"1").unwrap();
        let e = ensure_empty_target(d.path()).unwrap_err().to_string();
        assert!(e.contains("is not empty"), "{e}");
    }
}
