//! `kvindex serve` settings: flags, an optional TOML file and defaults merged (flags > file >
//! default) and validated into one [`ServeConfig`]. Every error here ends the process with exit
//! code 1 before anything is opened, like Dynamo's start-up exceptions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::HeaderName;
use kvindex_persistence::{
    DurableConfig, FsyncPolicy, LogConfig, RecoveryPolicy, SnapshotPolicy, DEFAULT_DATA_DIR,
};
use kvindex_server::zmq::IngestConfig;
use serde::Deserialize;
use thiserror::Error;

use crate::cli::{ReplayTuningArgs, ServeArgs};
use crate::endpoint::{parse_workers, WorkerSpec, WorkersArgError};
use crate::http::connections::ConnectionLimits;

/// Dynamo's default HTTP port.
pub const DEFAULT_PORT: u16 = 8090;
/// Dynamo's default `--threads`.
pub const DEFAULT_THREADS: usize = 4;
/// Default partition names.
pub const DEFAULT_GROUP: &str = "default";
/// Environment variable gating start-up on a number of registered workers.
pub const MIN_WORKERS_ENV: &str = "DYN_ROUTER_MIN_INITIAL_WORKERS";
/// Environment variable mounting the test-only routes.
pub const TEST_ENDPOINTS_ENV: &str = "DYN_KV_INDEXER_TEST_ENDPOINTS";

/// Why the settings are unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("--block-size is required when --workers is specified")]
    BlockSizeRequired,
    #[error(transparent)]
    Workers(#[from] WorkersArgError),
    #[error("cannot read the config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason} (keys are the `kvindex serve` flag names with `_`, e.g. `data_dir = \"/var/lib/kvindex\"`)")]
    ParseFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{MIN_WORKERS_ENV} must be a non-negative integer, got {value:?}: {reason}")]
    MinWorkers { value: String, reason: String },
}

/// `peers` in the TOML file: a list or a comma-separated string.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
enum PeerList {
    One(String),
    Many(Vec<String>),
}

/// The TOML file: the same settings as the flags.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    port: Option<u16>,
    host: Option<String>,
    threads: Option<usize>,
    expected_blocks: Option<usize>,
    workers: Option<String>,
    block_size: Option<u32>,
    model_name: Option<String>,
    routing_group: Option<String>,
    tenant_id: Option<String>,
    peers: Option<PeerList>,
    access_log: Option<PathBuf>,
    trace_id_header: Option<String>,
    access_log_local_time: Option<bool>,
    data_dir: Option<PathBuf>,
    fsync: Option<String>,
    recovery: Option<String>,
    snapshot_every_entries: Option<u64>,
    snapshot_interval_secs: Option<u64>,
    snapshot_keep: Option<usize>,
    replay_timeout_ms: Option<u64>,
    replay_attempts: Option<u32>,
    replay_backoff_ms: Option<u64>,
    replay_backoff_max_ms: Option<u64>,
    nats_url: Option<String>,
    nats_subject_prefix: Option<String>,
    nats_events: Option<bool>,
    nats_jetstream_stream: Option<String>,
    nats_jetstream_consumer: Option<String>,
    nats_jetstream_ack_wait_secs: Option<u64>,
    nats_queries: Option<bool>,
    nats_query_group: Option<String>,
    http_read_timeout_ms: Option<u64>,
    http_max_connections: Option<usize>,
    http_events_inflight_mib: Option<usize>,
    http_write_timeout_ms: Option<u64>,
    http_query_inflight_mib: Option<usize>,
    http_max_dumps: Option<usize>,
    http_dump_wait_ms: Option<u64>,
    http_dump_timeout_s: Option<u64>,
    max_event_partitions: Option<usize>,
    max_partitions: Option<usize>,
    shutdown_timeout_s: Option<u64>,
}

/// Most replay attempts per gap accepted by `--replay-attempts`.
pub const MAX_REPLAY_ATTEMPTS: u32 = 100;
/// Longest `--replay-timeout-ms`, `--replay-backoff-ms` and `--replay-backoff-max-ms` (1 hour).
pub const MAX_REPLAY_MS: u64 = 3_600_000;

/// The validated replay settings of the ZMQ listeners (SERVICE.md §0.2): how long a replay
/// request may stay silent and how often it is retried before the listener turns `degraded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayTuning {
    pub timeout: Duration,
    pub attempts: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
}

impl Default for ReplayTuning {
    fn default() -> Self {
        let d = IngestConfig::default();
        Self {
            timeout: d.replay_timeout,
            attempts: d.replay_attempts,
            backoff: d.replay_backoff,
            backoff_max: d.replay_backoff_max,
        }
    }
}

impl ReplayTuning {
    /// Merge `flags` over `file` over the defaults and validate the result.
    pub fn resolve(flags: &ReplayTuningArgs, file: &ReplayTuningArgs) -> Result<Self, ConfigError> {
        let d = Self::default();
        let ms = |flag: &str, v: Option<u64>, default: Duration, min: u64| match v {
            None => Ok(default),
            Some(v) if (min..=MAX_REPLAY_MS).contains(&v) => Ok(Duration::from_millis(v)),
            Some(v) => Err(ConfigError::Invalid(format!(
                "--{flag} must be between {min} and {MAX_REPLAY_MS} ms, got {v}"
            ))),
        };
        let timeout = ms(
            "replay-timeout-ms",
            flags.replay_timeout_ms.or(file.replay_timeout_ms),
            d.timeout,
            1,
        )?;
        let backoff = ms(
            "replay-backoff-ms",
            flags.replay_backoff_ms.or(file.replay_backoff_ms),
            d.backoff,
            0,
        )?;
        let backoff_max = ms(
            "replay-backoff-max-ms",
            flags.replay_backoff_max_ms.or(file.replay_backoff_max_ms),
            d.backoff_max.max(backoff),
            0,
        )?;
        if backoff_max < backoff {
            return Err(ConfigError::Invalid(format!(
                "--replay-backoff-max-ms ({}) must not be below --replay-backoff-ms ({})",
                backoff_max.as_millis(),
                backoff.as_millis()
            )));
        }
        let attempts = match flags.replay_attempts.or(file.replay_attempts) {
            None => d.attempts,
            Some(n) if (1..=MAX_REPLAY_ATTEMPTS).contains(&n) => n,
            Some(n) => {
                return Err(ConfigError::Invalid(format!(
                    "--replay-attempts must be between 1 and {MAX_REPLAY_ATTEMPTS}, got {n}"
                )))
            }
        };
        Ok(Self {
            timeout,
            attempts,
            backoff,
            backoff_max,
        })
    }

    /// The listener configuration with these replay settings.
    pub fn ingest_config(&self) -> IngestConfig {
        IngestConfig {
            replay_timeout: self.timeout,
            replay_attempts: self.attempts,
            replay_backoff: self.backoff,
            replay_backoff_max: self.backoff_max,
            ..IngestConfig::default()
        }
    }
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Engine event threads (resolved: never 0).
    pub event_threads: usize,
    /// `EngineConfig::expected_blocks` (0: grow as needed).
    pub expected_blocks: usize,
    pub workers: Vec<WorkerSpec>,
    pub block_size: Option<u32>,
    pub model_name: String,
    pub routing_group: String,
    pub peers: Vec<String>,
    pub access_log: Option<PathBuf>,
    /// `--trace-id-header`, lower-cased and checked to be a valid header name.
    pub trace_id_header: HeaderName,
    pub access_log_local_time: bool,
    pub data_dir: PathBuf,
    pub durable: DurableConfig,
    /// `DYN_ROUTER_MIN_INITIAL_WORKERS` (0 = no wait).
    pub min_initial_workers: usize,
    /// `DYN_KV_INDEXER_TEST_ENDPOINTS` is set to a true value.
    pub test_endpoints: bool,
    /// Replay timeout and retries of the ZMQ listeners.
    pub replay: ReplayTuning,
    /// The NATS transport (`None` without `--nats-url`).
    pub nats: Option<NatsConfig>,
    /// Read deadline and connection cap of the HTTP server.
    pub http: ConnectionLimits,
    /// Partitions without a registered worker beyond which events create none.
    pub max_event_partitions: usize,
    /// Partitions beyond which registrations and events create none (`--max-partitions`).
    pub max_partitions: usize,
    /// How long the graceful shutdown may take from the first signal (`--shutdown-timeout-s`).
    pub shutdown_timeout: Duration,
}

/// Default first token of the NATS subjects.
pub const DEFAULT_NATS_PREFIX: &str = "kvindex";
/// Default durable consumer name and query queue group.
pub const DEFAULT_NATS_NAME: &str = "kvindex";

/// The NATS transport settings, validated: where to connect and which subscriptions to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URLs (at least one; each parses as a NATS server address).
    pub urls: Vec<String>,
    /// Subject prefix (`kvindex` → `kvindex.events.<model>.<group>`).
    pub subject_prefix: String,
    /// Core NATS subscription to the event subjects.
    pub core_events: bool,
    /// The durable JetStream consumer, when a stream is configured.
    pub jetstream: Option<JetStreamConfig>,
    /// The queue group answering queries (`None`: no query subscriptions).
    pub query_group: Option<String>,
}

/// The durable JetStream consumer of the NATS transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    pub stream: String,
    pub consumer: String,
    /// How long the server waits for an ack before redelivering (set when the consumer is
    /// created; an existing durable consumer keeps its own).
    pub ack_wait: Duration,
}

/// Default JetStream ack wait.
pub const DEFAULT_ACK_WAIT_SECS: u64 = 30;

/// A stream, consumer or queue-group name: one subject token, no wildcards or whitespace.
fn check_nats_name(flag: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>'))
    {
        return Err(ConfigError::Invalid(format!(
            "invalid {flag} {value:?}: must be non-empty, without whitespace, `.`, `*` or `>`"
        )));
    }
    Ok(())
}

fn check_nats_prefix(value: &str) -> Result<(), ConfigError> {
    let bad_token = |t: &str| {
        t.is_empty()
            || t == "*"
            || t == ">"
            || t.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if value.split('.').any(bad_token) {
        return Err(ConfigError::Invalid(format!(
            "invalid --nats-subject-prefix {value:?}: must be dot-separated non-empty tokens without wildcards or whitespace"
        )));
    }
    Ok(())
}

/// Merge the `--nats-*` flags and file keys; `None` when NATS is off.
fn resolve_nats(args: &ServeArgs, file: &FileConfig) -> Result<Option<NatsConfig>, ConfigError> {
    let url = args.nats_url.clone().or(file.nats_url.clone());
    let Some(url) = url else {
        let given = [
            (
                "--nats-subject-prefix",
                args.nats_subject_prefix.is_some() || file.nats_subject_prefix.is_some(),
            ),
            (
                "--nats-events",
                args.nats_events.is_some() || file.nats_events.is_some(),
            ),
            (
                "--nats-jetstream-stream",
                args.nats_jetstream_stream.is_some() || file.nats_jetstream_stream.is_some(),
            ),
            (
                "--nats-jetstream-consumer",
                args.nats_jetstream_consumer.is_some() || file.nats_jetstream_consumer.is_some(),
            ),
            (
                "--nats-jetstream-ack-wait-secs",
                args.nats_jetstream_ack_wait_secs.is_some()
                    || file.nats_jetstream_ack_wait_secs.is_some(),
            ),
            (
                "--nats-queries",
                args.nats_queries.is_some() || file.nats_queries.is_some(),
            ),
            (
                "--nats-query-group",
                args.nats_query_group.is_some() || file.nats_query_group.is_some(),
            ),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            return Err(ConfigError::Invalid(format!("{flag} needs --nats-url")));
        }
        return Ok(None);
    };
    let urls = split_list(&url);
    if urls.is_empty() {
        return Err(ConfigError::Invalid("--nats-url is empty".into()));
    }
    for u in &urls {
        u.parse::<async_nats::ServerAddr>()
            .map_err(|e| ConfigError::Invalid(format!("invalid --nats-url `{u}`: {e}")))?;
    }
    let subject_prefix = args
        .nats_subject_prefix
        .clone()
        .or(file.nats_subject_prefix.clone())
        .unwrap_or_else(|| DEFAULT_NATS_PREFIX.into());
    check_nats_prefix(&subject_prefix)?;
    let stream = args
        .nats_jetstream_stream
        .clone()
        .or(file.nats_jetstream_stream.clone());
    let consumer = args
        .nats_jetstream_consumer
        .clone()
        .or(file.nats_jetstream_consumer.clone());
    let jetstream = match (stream, consumer) {
        (Some(stream), consumer) => {
            let consumer = consumer.unwrap_or_else(|| DEFAULT_NATS_NAME.into());
            check_nats_name("--nats-jetstream-stream", &stream)?;
            check_nats_name("--nats-jetstream-consumer", &consumer)?;
            let secs = args
                .nats_jetstream_ack_wait_secs
                .or(file.nats_jetstream_ack_wait_secs)
                .unwrap_or(DEFAULT_ACK_WAIT_SECS);
            if secs == 0 {
                return Err(ConfigError::Invalid(
                    "--nats-jetstream-ack-wait-secs must be at least 1".into(),
                ));
            }
            Some(JetStreamConfig {
                stream,
                consumer,
                ack_wait: Duration::from_secs(secs),
            })
        }
        (None, Some(_)) => {
            return Err(ConfigError::Invalid(
                "--nats-jetstream-consumer needs --nats-jetstream-stream".into(),
            ))
        }
        (None, None) => {
            if args.nats_jetstream_ack_wait_secs.is_some()
                || file.nats_jetstream_ack_wait_secs.is_some()
            {
                return Err(ConfigError::Invalid(
                    "--nats-jetstream-ack-wait-secs needs --nats-jetstream-stream".into(),
                ));
            }
            None
        }
    };
    let core_events = args
        .nats_events
        .or(file.nats_events)
        .unwrap_or(jetstream.is_none());
    let queries = args.nats_queries.or(file.nats_queries).unwrap_or(true);
    let group = args
        .nats_query_group
        .clone()
        .or(file.nats_query_group.clone())
        .unwrap_or_else(|| DEFAULT_NATS_NAME.into());
    check_nats_name("--nats-query-group", &group)?;
    Ok(Some(NatsConfig {
        urls,
        subject_prefix,
        core_events,
        jetstream,
        query_group: queries.then_some(group),
    }))
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        reason: e.to_string().trim().replace('\n', " "),
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether an environment flag value means "on" (`1`, `true`, `yes`, `on`).
pub fn env_flag_on(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Parse `DYN_ROUTER_MIN_INITIAL_WORKERS`.
pub fn parse_min_workers(value: Option<&str>) -> Result<usize, ConfigError> {
    match value {
        None => Ok(0),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map_err(|e| ConfigError::MinWorkers {
                value: v.to_owned(),
                reason: e.to_string(),
            }),
    }
}

impl ServeConfig {
    /// Merge flags, the `--config` file and defaults; read the environment variables.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let nats = resolve_nats(args, &file)?;
        let http = resolve_http_limits(args, &file)?;
        let max_event_partitions = args
            .max_event_partitions
            .or(file.max_event_partitions)
            .unwrap_or(crate::http::DEFAULT_MAX_EVENT_PARTITIONS);
        let max_partitions = args
            .max_partitions
            .or(file.max_partitions)
            .unwrap_or(crate::partitions::DEFAULT_MAX_PARTITIONS);
        if max_partitions == 0 {
            return Err(ConfigError::Invalid(
                "--max-partitions must be at least 1, got 0".into(),
            ));
        }
        let shutdown_timeout = match args.shutdown_timeout_s.or(file.shutdown_timeout_s) {
            None => crate::shutdown::DEFAULT_SHUTDOWN_TIMEOUT,
            Some(0) => {
                return Err(ConfigError::Invalid(
                    "--shutdown-timeout-s must be at least 1, got 0".into(),
                ))
            }
            Some(s) => Duration::from_secs(s),
        };
        let workers_spec = args.workers.clone().or(file.workers);
        let block_size = args.block_size.or(file.block_size);
        let workers = match &workers_spec {
            Some(spec) => {
                if block_size.is_none() {
                    return Err(ConfigError::BlockSizeRequired);
                }
                parse_workers(spec)?
            }
            None => Vec::new(),
        };
        let expected_blocks = args.expected_blocks.or(file.expected_blocks).unwrap_or(0);
        if expected_blocks > kvindex_engine::MAX_EXPECTED_BLOCKS {
            return Err(ConfigError::Invalid(format!(
                "--expected-blocks must be at most {} (block ids are 32-bit), got {expected_blocks}",
                kvindex_engine::MAX_EXPECTED_BLOCKS
            )));
        }
        let threads = args.threads.or(file.threads).unwrap_or(DEFAULT_THREADS);
        let event_threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let peers = match (&args.peers, file.peers) {
            (Some(p), _) => split_list(p),
            (None, Some(PeerList::One(p))) => split_list(&p),
            (None, Some(PeerList::Many(v))) => v.into_iter().filter(|p| !p.is_empty()).collect(),
            (None, None) => Vec::new(),
        };
        let fsync: FsyncPolicy = args
            .fsync
            .clone()
            .or(file.fsync)
            .map(|s| s.parse())
            .transpose()
            .map_err(|e: kvindex_persistence::PersistError| ConfigError::Invalid(e.to_string()))?
            .unwrap_or(FsyncPolicy::Always);
        let recovery: RecoveryPolicy = args
            .recovery
            .clone()
            .or(file.recovery)
            .map(|s| s.parse())
            .transpose()
            .map_err(|e: kvindex_persistence::PersistError| ConfigError::Invalid(e.to_string()))?
            .unwrap_or_default();
        let defaults = SnapshotPolicy::default();
        let every_entries = match args.snapshot_every_entries.or(file.snapshot_every_entries) {
            Some(0) => None,
            Some(n) => Some(n),
            None => defaults.every_entries,
        };
        let every = match args.snapshot_interval_secs.or(file.snapshot_interval_secs) {
            Some(0) => None,
            Some(s) => Some(Duration::from_secs(s)),
            None => defaults.every,
        };
        let keep = args
            .snapshot_keep
            .or(file.snapshot_keep)
            .unwrap_or(defaults.keep);
        if keep == 0 {
            return Err(ConfigError::Invalid(
                "--snapshot-keep must be at least 1".into(),
            ));
        }
        let replay = ReplayTuning::resolve(
            &args.replay,
            &ReplayTuningArgs {
                replay_timeout_ms: file.replay_timeout_ms,
                replay_attempts: file.replay_attempts,
                replay_backoff_ms: file.replay_backoff_ms,
                replay_backoff_max_ms: file.replay_backoff_max_ms,
            },
        )?;
        let trace_id_header = args
            .trace_id_header
            .clone()
            .or(file.trace_id_header.clone())
            .unwrap_or_else(|| "x-trace-id".into());
        let trace_id_header = HeaderName::from_bytes(
            trace_id_header.to_ascii_lowercase().as_bytes(),
        )
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "invalid --trace-id-header {trace_id_header:?}: {e}"
            ))
        })?;
        let _ = (&args.tenant_id, &file.tenant_id); // accepted, no effect (Dynamo's legacy flag)
        let test_endpoints = std::env::var(TEST_ENDPOINTS_ENV)
            .map(|v| env_flag_on(&v))
            .unwrap_or(false);
        let min_initial_workers =
            parse_min_workers(std::env::var(MIN_WORKERS_ENV).ok().as_deref())?;
        Ok(Self {
            host: args
                .host
                .clone()
                .or(file.host)
                .unwrap_or_else(|| "0.0.0.0".into()),
            port: args.port.or(file.port).unwrap_or(DEFAULT_PORT),
            event_threads,
            expected_blocks,
            workers,
            block_size,
            model_name: args
                .model_name
                .clone()
                .or(file.model_name)
                .unwrap_or_else(|| DEFAULT_GROUP.into()),
            routing_group: args
                .routing_group
                .clone()
                .or(file.routing_group)
                .unwrap_or_else(|| DEFAULT_GROUP.into()),
            peers,
            access_log: args.access_log.clone().or(file.access_log),
            trace_id_header,
            access_log_local_time: args.access_log_local_time
                || file.access_log_local_time.unwrap_or(false),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            durable: DurableConfig {
                log: LogConfig {
                    fsync,
                    recovery,
                    ..LogConfig::default()
                },
                snapshots: SnapshotPolicy {
                    every_entries,
                    every,
                    keep,
                },
            },
            min_initial_workers,
            test_endpoints,
            replay,
            nats,
            http,
            max_event_partitions,
            max_partitions,
            shutdown_timeout,
        })
    }
}

/// Longest `--http-read-timeout-ms` (1 hour).
pub const MAX_HTTP_READ_TIMEOUT_MS: u64 = 3_600_000;

/// Largest `--http-events-inflight-mib` and `--http-query-inflight-mib` (64 GiB).
pub const MAX_HTTP_EVENTS_INFLIGHT_MIB: usize = 65_536;

/// Longest `--http-dump-timeout-s` (1 day).
pub const MAX_HTTP_DUMP_TIMEOUT_S: u64 = 86_400;

/// Merge the `--http-*` limits with the file and defaults.
fn resolve_http_limits(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<ConnectionLimits, ConfigError> {
    let defaults = ConnectionLimits::default();
    let ms = |flag: &str, v: Option<u64>, default: Duration| match v {
        None => Ok(default),
        Some(ms) if (1..=MAX_HTTP_READ_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        Some(ms) => Err(ConfigError::Invalid(format!(
            "--{flag} must be between 1 and {MAX_HTTP_READ_TIMEOUT_MS}, got {ms}"
        ))),
    };
    let mib = |flag: &str, v: Option<usize>, default: usize| match v {
        None => Ok(default),
        Some(mib) if (1..=MAX_HTTP_EVENTS_INFLIGHT_MIB).contains(&mib) => Ok(mib << 20),
        Some(mib) => Err(ConfigError::Invalid(format!(
            "--{flag} must be between 1 and {MAX_HTTP_EVENTS_INFLIGHT_MIB}, got {mib}"
        ))),
    };
    let read_timeout = ms(
        "http-read-timeout-ms",
        args.http_read_timeout_ms.or(file.http_read_timeout_ms),
        defaults.read_timeout,
    )?;
    let write_timeout = ms(
        "http-write-timeout-ms",
        args.http_write_timeout_ms.or(file.http_write_timeout_ms),
        defaults.write_timeout,
    )?;
    let max_connections = match args.http_max_connections.or(file.http_max_connections) {
        None => defaults.max_connections,
        Some(0) => {
            return Err(ConfigError::Invalid(
                "--http-max-connections must be at least 1".into(),
            ))
        }
        Some(n) => n,
    };
    let events_body_budget = mib(
        "http-events-inflight-mib",
        args.http_events_inflight_mib
            .or(file.http_events_inflight_mib),
        defaults.events_body_budget,
    )?;
    let query_body_budget = mib(
        "http-query-inflight-mib",
        args.http_query_inflight_mib
            .or(file.http_query_inflight_mib),
        defaults.query_body_budget,
    )?;
    let max_dumps = match args.http_max_dumps.or(file.http_max_dumps) {
        None => defaults.max_dumps,
        Some(0) => {
            return Err(ConfigError::Invalid(
                "--http-max-dumps must be at least 1".into(),
            ))
        }
        Some(n) => n,
    };
    let dump_wait = match args.http_dump_wait_ms.or(file.http_dump_wait_ms) {
        None => defaults.dump_wait,
        Some(ms) if ms <= MAX_HTTP_READ_TIMEOUT_MS => Duration::from_millis(ms),
        Some(ms) => {
            return Err(ConfigError::Invalid(format!(
                "--http-dump-wait-ms must be between 0 and {MAX_HTTP_READ_TIMEOUT_MS}, got {ms}"
            )))
        }
    };
    let dump_timeout = match args.http_dump_timeout_s.or(file.http_dump_timeout_s) {
        None => defaults.dump_timeout,
        Some(s) if (1..=MAX_HTTP_DUMP_TIMEOUT_S).contains(&s) => Duration::from_secs(s),
        Some(s) => {
            return Err(ConfigError::Invalid(format!(
                "--http-dump-timeout-s must be between 1 and {MAX_HTTP_DUMP_TIMEOUT_S}, got {s}"
            )))
        }
    };
    Ok(ConnectionLimits {
        read_timeout,
        write_timeout,
        max_connections,
        events_body_budget,
        query_body_budget,
        max_dumps,
        dump_wait,
        dump_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "port = 9000\nfsync = \"never\"\npeers = [\"http://a:1\"]\nsnapshot_keep = 3\nexpected_blocks = 4096\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            port: Some(9100),
            ..Default::default()
        };
        let c = ServeConfig::resolve(&args).unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.durable.log.fsync, FsyncPolicy::Never);
        assert_eq!(c.peers, vec!["http://a:1".to_string()]);
        assert_eq!(c.durable.snapshots.keep, 3);
        assert_eq!(c.expected_blocks, 4096);
        assert_eq!(c.host, "0.0.0.0");
        assert_eq!(c.model_name, "default");
    }

    #[test]
    fn defaults_are_dynamos() {
        let c = ServeConfig::resolve(&ServeArgs::default()).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("0.0.0.0", 8090));
        assert_eq!(c.event_threads, 4);
        assert_eq!(c.expected_blocks, 0);
        assert_eq!(c.trace_id_header, "x-trace-id");
        assert_eq!(
            (c.model_name.as_str(), c.routing_group.as_str()),
            ("default", "default")
        );
        assert!(!c.access_log_local_time && c.access_log.is_none() && c.peers.is_empty());
        assert_eq!(c.http, ConnectionLimits::default());
        assert_eq!(
            c.max_event_partitions,
            crate::http::DEFAULT_MAX_EVENT_PARTITIONS
        );
        assert_eq!(c.max_partitions, crate::partitions::DEFAULT_MAX_PARTITIONS);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(20));
    }

    #[test]
    fn http_limits_come_from_flags_or_the_file_and_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "http_read_timeout_ms = 250\nhttp_max_connections = 9\nhttp_events_inflight_mib = 5\n\
             http_write_timeout_ms = 750\nhttp_query_inflight_mib = 6\nhttp_max_dumps = 3\n\
             http_dump_wait_ms = 0\nhttp_dump_timeout_s = 60\nmax_event_partitions = 0\n\
             max_partitions = 7\nshutdown_timeout_s = 3\n",
        )
        .unwrap();
        let file = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let c = ServeConfig::resolve(&file).unwrap();
        assert_eq!(c.http.read_timeout, Duration::from_millis(250));
        assert_eq!(c.http.max_connections, 9);
        assert_eq!(c.http.events_body_budget, 5 << 20);
        assert_eq!(c.http.write_timeout, Duration::from_millis(750));
        assert_eq!(c.http.query_body_budget, 6 << 20);
        assert_eq!(c.http.max_dumps, 3);
        assert_eq!(c.http.dump_wait, Duration::ZERO);
        assert_eq!(c.http.dump_timeout, Duration::from_secs(60));
        assert_eq!(c.max_event_partitions, 0);
        assert_eq!(c.max_partitions, 7);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(3));
        let flags = ServeArgs {
            http_max_connections: Some(3),
            ..file.clone()
        };
        assert_eq!(
            ServeConfig::resolve(&flags).unwrap().http.max_connections,
            3
        );
        for bad in [
            ServeArgs {
                http_read_timeout_ms: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_read_timeout_ms: Some(MAX_HTTP_READ_TIMEOUT_MS + 1),
                ..Default::default()
            },
            ServeArgs {
                http_max_connections: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_events_inflight_mib: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_events_inflight_mib: Some(MAX_HTTP_EVENTS_INFLIGHT_MIB + 1),
                ..Default::default()
            },
            ServeArgs {
                http_write_timeout_ms: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_query_inflight_mib: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_max_dumps: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_dump_wait_ms: Some(MAX_HTTP_READ_TIMEOUT_MS + 1),
                ..Default::default()
            },
            ServeArgs {
                http_dump_timeout_s: Some(0),
                ..Default::default()
            },
            ServeArgs {
                http_dump_timeout_s: Some(MAX_HTTP_DUMP_TIMEOUT_S + 1),
                ..Default::default()
            },
            ServeArgs {
                expected_blocks: Some(kvindex_engine::MAX_EXPECTED_BLOCKS + 1),
                ..Default::default()
            },
            ServeArgs {
                max_partitions: Some(0),
                ..Default::default()
            },
            ServeArgs {
                shutdown_timeout_s: Some(0),
                ..Default::default()
            },
        ] {
            assert!(ServeConfig::resolve(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn workers_without_block_size_is_refused_with_dynamos_message() {
        let args = ServeArgs {
            workers: Some("1=tcp://127.0.0.1:5557".into()),
            ..Default::default()
        };
        assert_eq!(
            ServeConfig::resolve(&args).unwrap_err().to_string(),
            "--block-size is required when --workers is specified"
        );
    }

    #[test]
    fn unknown_file_keys_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "prot = 1\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let msg = ServeConfig::resolve(&args).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn replay_tuning_defaults_file_flags_and_validation() {
        let d = ReplayTuning::resolve(&Default::default(), &Default::default()).unwrap();
        assert_eq!(d, ReplayTuning::default());
        assert_eq!(d.timeout, Duration::from_secs(3));
        assert_eq!(d.attempts, 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "replay_attempts = 7\nreplay_timeout_ms = 250\n").unwrap();
        let mut args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        args.replay.replay_attempts = Some(5);
        let c = ServeConfig::resolve(&args).unwrap();
        assert_eq!(c.replay.attempts, 5);
        assert_eq!(c.replay.timeout, Duration::from_millis(250));
        assert_eq!(c.replay.ingest_config().replay_attempts, 5);
        let bad = |a: ReplayTuningArgs| {
            ReplayTuning::resolve(&a, &Default::default())
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            bad(ReplayTuningArgs {
                replay_attempts: Some(0),
                ..Default::default()
            }),
            "--replay-attempts must be between 1 and 100, got 0"
        );
        assert_eq!(
            bad(ReplayTuningArgs {
                replay_timeout_ms: Some(0),
                ..Default::default()
            }),
            "--replay-timeout-ms must be between 1 and 3600000 ms, got 0"
        );
        assert!(bad(ReplayTuningArgs {
            replay_backoff_ms: Some(500),
            replay_backoff_max_ms: Some(100),
            ..Default::default()
        })
        .contains("must not be below"));
        // A backoff above the default cap raises the cap with it.
        let t = ReplayTuning::resolve(
            &ReplayTuningArgs {
                replay_backoff_ms: Some(5000),
                ..Default::default()
            },
            &Default::default(),
        )
        .unwrap();
        assert_eq!(t.backoff_max, Duration::from_secs(5));
    }

    #[test]
    fn nats_is_off_by_default_and_its_flags_need_a_url() {
        let c = ServeConfig::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(c.nats, None);
        let args = ServeArgs {
            nats_jetstream_stream: Some("EV".into()),
            ..Default::default()
        };
        assert_eq!(
            ServeConfig::resolve(&args).unwrap_err().to_string(),
            "--nats-jetstream-stream needs --nats-url"
        );
    }

    #[test]
    fn nats_defaults_and_jetstream_turns_core_events_off() {
        let args = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..Default::default()
        };
        let n = ServeConfig::resolve(&args).unwrap().nats.unwrap();
        assert_eq!(n.urls, vec!["nats://127.0.0.1:4222".to_string()]);
        assert_eq!(n.subject_prefix, "kvindex");
        assert!(n.core_events);
        assert_eq!(n.jetstream, None);
        assert_eq!(n.query_group.as_deref(), Some("kvindex"));
        let args = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            nats_jetstream_stream: Some("KV".into()),
            nats_queries: Some(false),
            ..Default::default()
        };
        let n = ServeConfig::resolve(&args).unwrap().nats.unwrap();
        assert!(!n.core_events);
        assert_eq!(
            n.jetstream,
            Some(JetStreamConfig {
                stream: "KV".into(),
                consumer: "kvindex".into(),
                ack_wait: Duration::from_secs(30),
            })
        );
        assert_eq!(n.query_group, None);
    }

    #[test]
    fn nats_settings_come_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "nats_url = \"127.0.0.1:4222\"\nnats_subject_prefix = \"a.b\"\nnats_events = true\nnats_jetstream_stream = \"S\"\nnats_jetstream_consumer = \"c1\"\nnats_query_group = \"g\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let n = ServeConfig::resolve(&args).unwrap().nats.unwrap();
        assert_eq!(n.subject_prefix, "a.b");
        assert!(n.core_events);
        assert_eq!(n.jetstream.unwrap().consumer, "c1");
        assert_eq!(n.query_group.as_deref(), Some("g"));
    }

    #[test]
    fn bad_nats_settings_are_refused_clearly() {
        let base = || ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..Default::default()
        };
        let url = ServeArgs {
            nats_url: Some("nats://host:notaport".into()),
            ..Default::default()
        };
        let e = ServeConfig::resolve(&url).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid --nats-url `nats://host:notaport`: "),
            "{e}"
        );
        let prefix = ServeArgs {
            nats_subject_prefix: Some("a..b".into()),
            ..base()
        };
        let e = ServeConfig::resolve(&prefix).unwrap_err().to_string();
        assert!(e.starts_with("invalid --nats-subject-prefix"), "{e}");
        let stream = ServeArgs {
            nats_jetstream_stream: Some("a.b".into()),
            ..base()
        };
        let e = ServeConfig::resolve(&stream).unwrap_err().to_string();
        assert!(e.starts_with("invalid --nats-jetstream-stream"), "{e}");
        let consumer = ServeArgs {
            nats_jetstream_consumer: Some("c".into()),
            ..base()
        };
        assert_eq!(
            ServeConfig::resolve(&consumer).unwrap_err().to_string(),
            "--nats-jetstream-consumer needs --nats-jetstream-stream"
        );
    }

    #[test]
    fn ack_wait_needs_a_url_and_a_stream_like_every_nats_flag() {
        let wait = ServeArgs {
            nats_jetstream_ack_wait_secs: Some(10),
            ..Default::default()
        };
        assert_eq!(
            ServeConfig::resolve(&wait).unwrap_err().to_string(),
            "--nats-jetstream-ack-wait-secs needs --nats-url"
        );
        let no_stream = ServeArgs {
            nats_url: Some("nats://127.0.0.1:4222".into()),
            ..wait.clone()
        };
        assert_eq!(
            ServeConfig::resolve(&no_stream).unwrap_err().to_string(),
            "--nats-jetstream-ack-wait-secs needs --nats-jetstream-stream"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(
            &path,
            "nats_url = \"127.0.0.1:4222\"\nnats_jetstream_ack_wait_secs = 5\n",
        )
        .unwrap();
        let file = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        assert_eq!(
            ServeConfig::resolve(&file).unwrap_err().to_string(),
            "--nats-jetstream-ack-wait-secs needs --nats-jetstream-stream"
        );
        let zero = ServeArgs {
            nats_jetstream_stream: Some("KV".into()),
            nats_jetstream_ack_wait_secs: Some(0),
            ..no_stream.clone()
        };
        assert_eq!(
            ServeConfig::resolve(&zero).unwrap_err().to_string(),
            "--nats-jetstream-ack-wait-secs must be at least 1"
        );
        let ok = ServeArgs {
            nats_jetstream_stream: Some("KV".into()),
            ..no_stream
        };
        let js = ServeConfig::resolve(&ok).unwrap().nats.unwrap().jetstream;
        assert_eq!(js.unwrap().ack_wait, Duration::from_secs(10));
    }

    #[test]
    fn trace_id_header_is_lower_cased_and_validated() {
        let args = ServeArgs {
            trace_id_header: Some("X-Request-Id".into()),
            ..Default::default()
        };
        assert_eq!(
            ServeConfig::resolve(&args).unwrap().trace_id_header,
            "x-request-id"
        );
        let bad = ServeArgs {
            trace_id_header: Some("x trace".into()),
            ..Default::default()
        };
        let e = ServeConfig::resolve(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("invalid --trace-id-header \"x trace\": "),
            "{e}"
        );
    }

    #[test]
    fn min_workers_parsing() {
        assert_eq!(parse_min_workers(None).unwrap(), 0);
        assert_eq!(parse_min_workers(Some("2")).unwrap(), 2);
        let e = parse_min_workers(Some("abc")).unwrap_err().to_string();
        assert!(e.starts_with(
            "DYN_ROUTER_MIN_INITIAL_WORKERS must be a non-negative integer, got \"abc\": "
        ));
    }
}
