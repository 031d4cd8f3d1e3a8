//! The command line: `kvindex serve | capture | replay | demo`. Parsing only; `config.rs` turns
//! the `serve` flags (plus an optional TOML file) into a validated [`crate::config::ServeConfig`]
//! and the replay tuning flags (shared by `serve` and `capture`) into
//! [`crate::config::ReplayTuning`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// kvindex: which worker already holds the longest prefix of this request's KV cache?
#[derive(Parser, Debug)]
#[command(name = "kvindex", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the indexer service (HTTP API; Dynamo `python -m dynamo.indexer` compatible).
    Serve(Box<ServeArgs>),
    /// Record a live vLLM / SGLang ZMQ event stream into an event log (a data directory that
    /// `kvindex replay` and `kvindex serve --data-dir` read).
    Capture(Box<crate::capture::CaptureArgs>),
    /// Look into, export, import and rebuild a data directory's event log.
    Replay(crate::replay_cmd::ReplayArgs),
    /// Replay the shared production trace into the index and query it.
    Demo(crate::demo::DemoArgs),
}

/// Flags of `kvindex serve`. Every flag is optional here so that `--config FILE` can supply it;
/// defaults are applied in `config.rs` (flags > file > default).
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys are the flag names with `_`); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// HTTP port [default: 8090]; 0 picks a free port (logged at start-up).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address to bind [default: 0.0.0.0, like Dynamo].
    #[arg(long)]
    pub host: Option<String>,
    /// Event threads of the index [default: 4]; 0 means one per core.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Distinct blocks each index partition is expected to hold at its peak (about workers ×
    /// blocks per worker): its hash map is sized for them at start, about 11.5 bytes each, so
    /// that it does not grow while the index fills [default: 0, grow as needed].
    #[arg(long)]
    pub expected_blocks: Option<usize>,
    /// Initial ZMQ workers: "id[:dp]=endpoint,...". Needs --block-size.
    #[arg(long)]
    pub workers: Option<String>,
    /// Tokens per block of the --workers partition (required with --workers).
    #[arg(long)]
    pub block_size: Option<u32>,
    /// Model name of the --workers entries [default: default].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Routing group of the --workers entries [default: default].
    #[arg(long)]
    pub routing_group: Option<String>,
    /// Legacy alias accepted for compatibility; it has no effect.
    #[arg(long, hide = true)]
    pub tenant_id: Option<String>,
    /// Peer indexer base URLs ("http://h:8090,...") to recover from at start-up.
    #[arg(long)]
    pub peers: Option<String>,
    /// Write a JSON-lines access log to this file (reopened by POST /reopen_logs).
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<PathBuf>,
    /// Request header logged as `trace_id` [default: x-trace-id].
    #[arg(long)]
    pub trace_id_header: Option<String>,
    /// Access-log timestamps in local time instead of UTC.
    #[arg(long)]
    pub access_log_local_time: bool,
    /// Data directory: event log, snapshots, registrations [default: ./kvindex-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// When the log is forced to disk: always | interval:<ms> | never [default: always].
    #[arg(long)]
    pub fsync: Option<String>,
    /// What recovery does with damage: absolute | tolerate-tail | skip-corrupt
    /// [default: tolerate-tail].
    #[arg(long)]
    pub recovery: Option<String>,
    /// Snapshot after this many logged entries [default: 1000000]; 0 disables.
    #[arg(long)]
    pub snapshot_every_entries: Option<u64>,
    /// Snapshot this many seconds after the previous one if anything changed [default: 600];
    /// 0 disables.
    #[arg(long)]
    pub snapshot_interval_secs: Option<u64>,
    /// Snapshots kept on disk [default: 2].
    #[arg(long)]
    pub snapshot_keep: Option<usize>,
    /// NATS server URL(s), comma-separated ("nats://127.0.0.1:4222"); enables the NATS
    /// transport (events and queries, docs/api.md). Off by default.
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// First subject token(s) of every NATS subject [default: kvindex].
    #[arg(long, value_name = "PREFIX")]
    pub nats_subject_prefix: Option<String>,
    /// Core NATS subscription to `<prefix>.events.>` [default: true, false when
    /// --nats-jetstream-stream is set].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_events: Option<bool>,
    /// JetStream stream to consume events from with a durable pull consumer (created with
    /// subjects `<prefix>.events.>` when missing).
    #[arg(long, value_name = "STREAM")]
    pub nats_jetstream_stream: Option<String>,
    /// Durable consumer name; one per kvindex process [default: kvindex].
    #[arg(long, value_name = "NAME")]
    pub nats_jetstream_consumer: Option<String>,
    /// Seconds JetStream waits for kvindex's ack before redelivering a message [default: 30].
    #[arg(long, value_name = "SECS")]
    pub nats_jetstream_ack_wait_secs: Option<u64>,
    /// Answer queries on `<prefix>.query.*.*` and `<prefix>.query_by_hash.*.*` [default: true].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub nats_queries: Option<bool>,
    /// Queue group of the query subscriptions: processes in one group share the requests
    /// [default: kvindex].
    #[arg(long, value_name = "NAME")]
    pub nats_query_group: Option<String>,
    /// Deadline in ms for a request head to arrive (an idle keep-alive connection is closed
    /// after it too), and then for the request body [default: 30000].
    #[arg(long, value_name = "MS")]
    pub http_read_timeout_ms: Option<u64>,
    /// Open HTTP connections at most; a connection beyond it is closed at once
    /// [default: 4096].
    #[arg(long, value_name = "N")]
    pub http_max_connections: Option<usize>,
    /// Deadline in ms for a response write to make progress: a client that stops reading its
    /// response is disconnected after it [default: 30000].
    #[arg(long, value_name = "MS")]
    pub http_write_timeout_ms: Option<u64>,
    /// MiB of `POST /events` bodies received and not yet submitted at once; more requests wait
    /// their turn (msgpack events decode to about 16 times their body) [default: 32].
    #[arg(long, value_name = "MIB")]
    pub http_events_inflight_mib: Option<usize>,
    /// MiB of `POST /query` and `POST /query_by_hash` bodies received and not yet answered at
    /// once; more requests wait their turn [default: 32].
    #[arg(long, value_name = "MIB")]
    pub http_query_inflight_mib: Option<usize>,
    /// `GET /dump` responses built or sent at once; more wait up to --http-dump-wait-ms for
    /// one to end, then are answered 503 [default: 2].
    #[arg(long, value_name = "N")]
    pub http_max_dumps: Option<usize>,
    /// How long a `GET /dump` beyond --http-max-dumps waits for a slot, in ms; 0: answered 503
    /// at once [default: 5000].
    #[arg(long, value_name = "MS")]
    pub http_dump_wait_ms: Option<u64>,
    /// Deadline in seconds for one `GET /dump` response, from its slot to its last byte: a
    /// client still reading it then is disconnected and its slot freed [default: 300].
    #[arg(long, value_name = "SECS")]
    pub http_dump_timeout_s: Option<u64>,
    /// Events (`POST /events?block_size=`, the NATS `Kvindex-Block-Size` header) create a
    /// partition only while fewer partitions than this have no registered worker; 0: events
    /// never create partitions. --max-partitions bounds them too [default: 256].
    #[arg(long, value_name = "N")]
    pub max_event_partitions: Option<usize>,
    /// Registrations and events create a partition only while fewer partitions than this
    /// exist (at least 1); partitions restored at start-up, recovered from peers or of
    /// --workers are never refused [default: 4096].
    #[arg(long, value_name = "N")]
    pub max_partitions: Option<usize>,
    /// How long the graceful shutdown may take, in seconds from the first SIGINT / SIGTERM (at
    /// least 1): what still runs then (HTTP requests, the NATS drain, a snapshot being
    /// written) is cut off, the event log is synced and the process exits 0. Keep it below
    /// the orchestrator's grace period [default: 20].
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout_s: Option<u64>,
    #[command(flatten)]
    pub replay: ReplayTuningArgs,
}

/// How ZMQ listeners ask a publisher's replay endpoint for missed batches; shared by `serve`
/// and `capture`. Every flag is optional so the `serve` config file can supply it.
#[derive(Args, Debug, Default, Clone)]
pub struct ReplayTuningArgs {
    /// Longest wait for the replay endpoint to accept a connection or send the next frame, in
    /// ms [default: 3000].
    #[arg(long, value_name = "MS")]
    pub replay_timeout_ms: Option<u64>,
    /// Replay attempts per gap: the first request plus its retries [default: 3].
    #[arg(long, value_name = "N")]
    pub replay_attempts: Option<u32>,
    /// Delay before the first retry, in ms; doubles up to --replay-backoff-max-ms [default: 100].
    #[arg(long, value_name = "MS")]
    pub replay_backoff_ms: Option<u64>,
    /// Longest delay between retries, in ms [default: 2000].
    #[arg(long, value_name = "MS")]
    pub replay_backoff_max_ms: Option<u64>,
}
