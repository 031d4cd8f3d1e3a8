//! ZMQ listeners: one SUB socket per registered `(worker_id, dp_rank)`, per-stream sequencing,
//! gap replay over the publisher's ROUTER socket, and the status `/workers` shows.
//!
//! # Sequencing (SERVICE.md §7.1, §7.4)
//!
//! Each listener keeps a watermark `w`, the last batch sequence handed to the sink (unset for a
//! fresh registration, or the durable watermark the service passes in [`ListenerSpec::resume_after`]).
//! For a live batch with sequence `s`:
//!
//! * `w` unset and `s == 0`, or `s == w + 1` → decode, submit, `w = s`;
//! * `s <= w` → stale: dropped and counted (e.g. the live copy of a batch replay already applied);
//! * `w` unset and `s > 0`, or `s > w + 1` → gap: replay `[w+1, s)` (or `[0, s)`), then the live
//!   batch is checked again (normally stale by then) and applied if it is still ahead.
//!
//! A batch whose payload does not decode does not advance `w`, so the next batch shows a gap and
//! the failed sequence is asked for again. Frames that are not `[topic, seq(8 bytes), payload]`
//! are dropped without touching `w`.
//!
//! **Publisher restarts.** A live publisher never repeats or rewinds sequence numbers, so a live
//! `s` not above the previous *live* `s` means the engine restarted and counts from 0 again: the
//! watermark is reset (counted as `publisher_restarts`) and the new incarnation is treated like a
//! fresh registration. Only batches whose payload decodes take part (the payload is decoded
//! before any sequence logic), so one corrupt message with a wild sequence number cannot fake a
//! restart or a gap. Without this, a restarted engine's batches would all be "stale" until it
//! passed the old watermark.
//!
//! A task that starts from a watermark ([`ListenerSpec::resume_after`]: a kvindex restart, a
//! resume after a pause) has no previous live `s` to compare with, so its *first* live `s` is
//! compared with the watermark it resumed after: a PUB socket never sends a new subscriber a
//! message published before it connected, and batch `resume_after` was published before this
//! task started, so a first live `s <= resume_after` can only come from an engine that restarted
//! while the listener was away. It is handled like the restart above (the catch-up replay from
//! `resume_after + 1` found nothing, the watermark is reset, `[0, s)` is replayed). A restart
//! while the listener was away stays invisible only once the new incarnation has gone past the
//! old watermark before the listener comes back (the publisher sends no incarnation id): the
//! catch-up replay then brings the new incarnation's batches after the old watermark, and its
//! earlier ones are never asked for.
//!
//! # Replay (SERVICE.md §0.2, §7.2, §7.3, §7.6)
//!
//! Wire format as vLLM / SGLang serve it: the DEALER sends `[b"", start_seq_be64]`; the ROUTER
//! answers `[b"", topic, seq, payload]` (real engines) or `[b"", seq, payload]` (older
//! publishers) for every buffered seq ≥ start, ending with an empty payload. Unlike Dynamo 1.6.1,
//! kvindex bounds every wait: a connect or an idle gap longer than [`IngestConfig::replay_timeout`]
//! fails the attempt, attempts are retried [`IngestConfig::replay_attempts`] times with
//! exponential backoff (resuming after the last batch received), and a replay endpoint that
//! stays dead marks the listener **degraded** — visible in [`ListenerStatus`] — instead of
//! stalling it. While degraded, each later gap makes a single attempt; the first success clears
//! the flag. Live batches arriving during a replay are held (up to
//! [`IngestConfig::max_held_live_batches`]) and processed after it, in order, so nothing is
//! applied twice or out of order. Sequences the watermark jumps over are counted as
//! `lost_batches`. Without a replay endpoint the gap is logged and counted as lost (§7.3).
//!
//! On start with a replay endpoint, the listener asks for replay from `w + 1` (or 0) as soon as
//! its SUB socket is connected, so a restart catches up even if the engine is idle.
//!
//! # A sink that does not take batches (SERVICE.md §7.3)
//!
//! [`SinkError::Unavailable`] leaves the watermark before the refused batch. Inside a replay
//! the apply loop stops there (the batches after it would move the watermark past it, and it
//! would be counted lost and never asked for again). With a replay endpoint the listener then
//! backs off: no replay for [`IngestConfig::sink_retry_backoff`] (doubling, up to
//! [`IngestConfig::sink_retry_backoff_max`], while the sink keeps refusing); live batches that
//! arrive meanwhile are not submitted (`deferred_batches`), and when the delay is over one
//! replay from `w + 1` asks for the refused batch and everything after it — at once if the
//! engine is idle. Without the backoff, each live batch after a refusal would show a gap and
//! ask the engine for its whole buffer (10,000 batches by default). [`SinkError::Failed`] (the
//! service's log writer stopped: nothing is taken until a restart) stops replays for good: every
//! later batch is deferred to the restart, which resumes after the durable watermark.
//!
//! # Ready gate (SERVICE.md §1.3)
//!
//! With [`IngestConfig::start_open`] false, a listener connects at once but submits nothing
//! until [`ZmqIngest::open`]: it stays `pending` and holds the live messages it receives (the
//! same bound as during a replay). Once the gate opens it catches up by replay (when it has a
//! replay endpoint), then processes the held messages in order. The service opens it after its
//! peer recovery, so live events land on top of the recovered dump, never under it.
//!
//! # Threading
//!
//! Listeners are tokio tasks on the runtime handed to [`ZmqIngest::new`]. [`EventSink::submit`]
//! is called inline on that task, once per batch: it must enqueue and return quickly (e.g. append
//! to the log's group-commit queue), not wait for an fsync.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvindex_engine::RouterEvent;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use super::decode::{
    decode_payload, parse_seq, record_batch_error, record_batch_metrics, record_frame_error,
    split_live_message, ConvertContext, ConvertedBatch, FrameError, SkipReason,
    MAX_DETAILED_REJECTIONS, METRIC_MESSAGES_DROPPED,
};
use super::frame_guard::{self, Guard, MessageLimits};

// ---------------------------------------------------------------------------------------------
// Public API: sink, configuration, specs, status
// ---------------------------------------------------------------------------------------------

/// Where decoded batches go: the service logs them, then applies them to the index.
///
/// `worker_id` / `dp_rank` name the **listener** (the sequence stream); the events inside carry
/// their effective dp_rank, which differs when the batch names its own rank (SERVICE.md §5.2).
/// `source_seq` is the publisher's batch sequence number: the durable watermark to pass back in
/// [`ListenerSpec::resume_after`] on restart. `events` may be empty (the batch decoded but
/// nothing in it applies); the sequence number still counts.
pub trait EventSink: Send + Sync + 'static {
    /// Accept one batch. Called on the listener's task: enqueue and return, do not block on I/O.
    ///
    /// `generation` is the listener's [`ListenerSpec::generation`]: a sink that restarts
    /// listeners can refuse the batches of a superseded one, whose task may still be running
    /// (an abort takes effect only at the task's next await).
    fn submit(
        &self,
        worker_id: u64,
        dp_rank: u32,
        generation: u64,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<(), SinkError>;
}

/// Why the sink did not take a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Transient: the watermark does not advance, so the batch is asked for again by a later
    /// replay, made once [`IngestConfig::sink_retry_backoff`] is over (meanwhile live batches
    /// are not submitted, and no replay is made).
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// The sink takes nothing more until the process restarts (the service's log writer
    /// stopped): the watermark does not advance, the listener makes no more replays and submits
    /// nothing more (it counts what it receives as `deferred_batches`); the restart resumes
    /// after the durable watermark.
    #[error("sink failed: {0}")]
    Failed(String),
    /// Permanent: the batch is skipped for good and the watermark advances past it.
    #[error("batch rejected by sink: {0}")]
    Rejected(String),
    /// The listener is no longer the stream's current one (stopped, paused, or superseded by a
    /// newer start of the same stream) and its task has not ended yet: the batch is not taken,
    /// the watermark does not move, and the task ends at once, submitting nothing more (the
    /// rest of a replay it was applying, its held live messages) — a resumed or re-registered
    /// listener of the stream owns the stream now, and must still fetch the batch itself.
    /// Return it only for such a listener: the task it ends is not restarted. (A paused or
    /// replaced task leaves the status shared with its successor alone whatever the sink
    /// answers: it changes the status only while [`ZmqIngest`] knows it as the current one.)
    #[error("batch refused by sink: {0}")]
    Fenced(String),
}

/// Tuning of every listener of a [`ZmqIngest`].
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Longest wait for the replay endpoint to accept a connection or to send the next frame.
    pub replay_timeout: Duration,
    /// Replay attempts per gap while the replay endpoint is healthy (≥ 1).
    pub replay_attempts: u32,
    /// Delay before the second attempt; doubles up to [`Self::replay_backoff_max`].
    pub replay_backoff: Duration,
    /// Cap of the retry delay.
    pub replay_backoff_max: Duration,
    /// Most batches accepted from one replay (vLLM buffers 10,000 by default).
    pub replay_max_batches: usize,
    /// Most payload bytes accepted from one replay (a replay past it fails like one past
    /// [`Self::replay_max_batches`]: the count alone would let 100,000 large batches through).
    pub replay_max_bytes: usize,
    /// Most live batches held while a replay runs; later ones are left to the socket (and, if the
    /// publisher drops them, to the next replay).
    pub max_held_live_batches: usize,
    /// Most bytes of live messages held while a replay runs (same treatment past it).
    pub max_held_live_bytes: usize,
    /// After the sink refused a batch as [`SinkError::Unavailable`], how long the listener
    /// waits before it asks for it again by replay (no replay meanwhile; live batches are not
    /// submitted). Doubles while the sink keeps refusing, up to
    /// [`Self::sink_retry_backoff_max`]; back to this after a batch is taken.
    pub sink_retry_backoff: Duration,
    /// Cap of [`Self::sink_retry_backoff`].
    pub sink_retry_backoff_max: Duration,
    /// Longest single SUB connect attempt before it is retried.
    pub connect_timeout: Duration,
    /// Longest delay between SUB connect attempts (they start at 100 ms and double).
    pub connect_backoff_max: Duration,
    /// Most bytes of one message from a publisher (live or replay), all its frames together,
    /// and so of any one frame: a frame that would go past it closes the connection before
    /// its body is read (`zmq::frame_guard`).
    pub max_message_bytes: u64,
    /// Most frames of one message from a publisher (live or replay); one more closes the
    /// connection the same way.
    pub max_message_frames: u32,
    /// Whether listeners start draining at once; if false they stay `pending` until
    /// [`ZmqIngest::open`] (the start-up "ready gate", SERVICE.md §1.3): they connect, and hold
    /// the live messages they receive (up to [`Self::max_held_live_batches`] /
    /// [`Self::max_held_live_bytes`]) without submitting anything or asking for a replay.
    pub start_open: bool,
}

impl IngestConfig {
    /// The limits the frame guard holds publishers to.
    fn message_limits(&self) -> MessageLimits {
        MessageLimits {
            max_bytes: self.max_message_bytes,
            max_frames: self.max_message_frames,
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            replay_timeout: Duration::from_secs(3),
            replay_attempts: 3,
            replay_backoff: Duration::from_millis(100),
            replay_backoff_max: Duration::from_secs(2),
            replay_max_batches: 100_000,
            replay_max_bytes: 1 << 30,
            max_held_live_batches: 100_000,
            max_held_live_bytes: 256 << 20,
            sink_retry_backoff: Duration::from_secs(1),
            sink_retry_backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            connect_backoff_max: Duration::from_secs(5),
            max_message_bytes: frame_guard::DEFAULT_MAX_MESSAGE_BYTES,
            max_message_frames: frame_guard::DEFAULT_MAX_MESSAGE_FRAMES,
            start_open: true,
        }
    }
}

/// One listener to start: a worker's dp rank and where its engine publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Worker (instance) id.
    pub worker_id: u64,
    /// Registered dp rank (used when a batch names none).
    pub dp_rank: u32,
    /// The engine's PUB endpoint; kvindex connects a SUB socket to it.
    pub endpoint: String,
    /// The engine's ROUTER replay endpoint, if any.
    pub replay_endpoint: Option<String>,
    /// The partition's block size (local hashes are computed with it).
    pub block_size: u32,
    /// Last sequence already durable for this stream (from the log), or `None` for a fresh
    /// stream. The listener resumes after it and asks for replay from `resume_after + 1`; a
    /// first live batch at or below it means the publisher restarted meanwhile (it is then
    /// followed from 0, see the module documentation).
    pub resume_after: Option<u64>,
    /// Which start of the stream's listener this is, as the sink numbers them (0 unless set):
    /// passed with every batch to [`EventSink::submit`].
    pub generation: u64,
}

impl ListenerSpec {
    /// A fresh listener without replay endpoint or resume point.
    pub fn new(worker_id: u64, dp_rank: u32, endpoint: impl Into<String>, block_size: u32) -> Self {
        Self {
            worker_id,
            dp_rank,
            endpoint: endpoint.into(),
            replay_endpoint: None,
            block_size,
            resume_after: None,
            generation: 0,
        }
    }

    /// Set the generation passed with every batch.
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Set the replay endpoint.
    pub fn with_replay(mut self, replay_endpoint: impl Into<String>) -> Self {
        self.replay_endpoint = Some(replay_endpoint.into());
        self
    }

    /// Resume after a durable sequence number.
    pub fn resuming_after(mut self, seq: u64) -> Self {
        self.resume_after = Some(seq);
        self
    }
}

/// Lifecycle of a listener, with Dynamo's names (SERVICE.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerState {
    /// Registered, waiting for the ready gate (connected meanwhile, holding what it receives).
    Pending,
    /// Running (connecting or connected: see [`ListenerStatus::connected`]).
    Active,
    /// Stopped by [`ZmqIngest::pause`]; the watermark is kept.
    Paused,
    /// The endpoint cannot be connected to (e.g. `tcp://*:N`, `inproc://`).
    Failed,
}

impl ListenerState {
    /// The lower-case name `/workers` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerState::Pending => "pending",
            ListenerState::Active => "active",
            ListenerState::Paused => "paused",
            ListenerState::Failed => "failed",
        }
    }
}

/// Counters of one listener since it was registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListenerCounters {
    /// Batches handed to the sink and accepted.
    pub batches_applied: u64,
    /// Events handed to the sink.
    pub events_submitted: u64,
    /// Events rejected by the decoder (their batches were kept).
    pub events_rejected: u64,
    /// Well-formed events that produced nothing (ignored, other KV group, block size, ...).
    pub events_skipped: u64,
    /// Live batches dropped as stale or duplicate.
    pub stale_dropped: u64,
    /// Messages dropped for a wrong frame count or sequence frame (live ones, and replay
    /// replies, which end the replay).
    pub malformed_messages: u64,
    /// Payloads that failed to decode as a whole.
    pub decode_failures: u64,
    /// Gaps detected.
    pub gaps: u64,
    /// Replay requests made (one per gap or start-up catch-up, retries included in one).
    pub replay_requests: u64,
    /// Replay requests that failed after all attempts (endpoint dead or silent).
    pub replay_failures: u64,
    /// Replay attempts made (each request makes one, plus one per retry).
    pub replay_attempts: u64,
    /// Batches received through replay.
    pub replayed_batches: u64,
    /// Sequence numbers the watermark jumped over (events lost for good).
    pub lost_batches: u64,
    /// Times the publisher was seen restarting its sequence.
    pub publisher_restarts: u64,
    /// Batches the sink refused.
    pub sink_errors: u64,
    /// Batches received (live, or by a replay that the sink stopped) but not submitted because
    /// the sink was unavailable or has failed: the watermark stays before them, and the replay
    /// after the sink's backoff (or the restart's) asks for them again.
    pub deferred_batches: u64,
    /// Failed attempts to connect the SUB socket (the cause is in `last_error`).
    pub connect_failures: u64,
    /// Errors receiving from the SUB socket (a dropped connection, bad ZMTP); it reconnects.
    pub receive_errors: u64,
    /// Connections to the publisher lost; each is followed by a new socket (and a catch-up
    /// replay when a replay endpoint is configured).
    pub disconnects: u64,
    /// Live messages received before the ready gate opened ([`ZmqIngest::open`]): held, and
    /// processed in order once it opened.
    pub held_before_ready: u64,
}

/// Counter: ZMQ connection errors by `stage` (`connect`, `receive`, `disconnect`).
pub const METRIC_CONNECTION_ERRORS: &str = "kvindex_zmq_connection_errors_total";

fn record_connection_error(stage: &'static str) {
    metrics::counter!(METRIC_CONNECTION_ERRORS, "stage" => stage).increment(1);
}

/// What `/workers` can show about one listener.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListenerStatus {
    /// Worker (instance) id.
    pub worker_id: u64,
    /// Registered dp rank.
    pub dp_rank: u32,
    /// The PUB endpoint.
    pub endpoint: String,
    /// The ROUTER replay endpoint, if any (Dynamo does not show it in `/workers`).
    pub replay_endpoint: Option<String>,
    /// Lifecycle state.
    pub state: ListenerState,
    /// Whether the SUB socket currently has a connection to the publisher.
    pub connected: bool,
    /// The replay endpoint failed its last request: gaps are not being filled.
    pub degraded: bool,
    /// A replay is in progress: the index lags this stream until it ends (SERVICE.md §0.8).
    pub replaying: bool,
    /// The last connect / replay problem, if any.
    pub last_error: Option<String>,
    /// Last sequence handed to the sink (`None` = unset).
    pub watermark: Option<u64>,
    /// Last sequence seen on the live socket.
    pub last_live_seq: Option<u64>,
    /// Counters.
    pub counters: ListenerCounters,
}

/// Why a registration or control call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// The PUB endpoint does not validate.
    #[error(transparent)]
    InvalidEndpoint(EndpointError),
    /// The replay endpoint does not validate.
    #[error("invalid replay endpoint `{}`: {}", .0.endpoint, .0)]
    InvalidReplayEndpoint(EndpointError),
    /// `(worker_id, dp_rank)` already has a listener.
    #[error("instance {worker_id} dp_rank {dp_rank} already registered")]
    AlreadyRegistered {
        /// Worker id.
        worker_id: u64,
        /// Dp rank.
        dp_rank: u32,
    },
    /// No listener for `(worker_id, dp_rank)`.
    #[error("instance {worker_id} dp_rank {dp_rank} not found")]
    NotFound {
        /// Worker id.
        worker_id: u64,
        /// Dp rank.
        dp_rank: u32,
    },
    /// Pause from a non-active state, or resume from a non-paused one.
    #[error("instance {worker_id} dp_rank {dp_rank} cannot be {action} from status {from}")]
    InvalidTransition {
        /// Worker id.
        worker_id: u64,
        /// Dp rank.
        dp_rank: u32,
        /// `paused` or `resumed`.
        action: &'static str,
        /// The current state's name.
        from: &'static str,
    },
}

/// An endpoint that fails validation (SERVICE.md §3.3; Display is Dynamo's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ZMQ endpoint `{endpoint}`: {problem}")]
pub struct EndpointError {
    /// The endpoint as given.
    pub endpoint: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Validate a ZMQ endpoint the way Dynamo does (SERVICE.md §3.3): scheme `tcp`, `ipc` or
/// `inproc`; for `tcp` a non-empty host (IPv6 in brackets) and a u16 port. `tcp://*:N` passes
/// (the listener then fails, as in Dynamo).
pub fn validate_endpoint(endpoint: &str) -> Result<(), EndpointError> {
    let fail = |problem: String| EndpointError {
        endpoint: endpoint.to_owned(),
        problem,
    };
    let Some((scheme, rest)) = endpoint.split_once("://") else {
        return Err(fail("missing scheme".into()));
    };
    match scheme {
        "tcp" => {
            let (host, port) = if let Some(after) = rest.strip_prefix('[') {
                let (host, tail) = after
                    .split_once(']')
                    .ok_or_else(|| fail("unterminated IPv6 host".into()))?;
                (host, tail.strip_prefix(':'))
            } else {
                match rest.rsplit_once(':') {
                    Some((h, _)) if h.contains(':') => {
                        return Err(fail("IPv6 host must be enclosed in brackets".into()))
                    }
                    Some((h, p)) => (h, Some(p)),
                    None => (rest, None),
                }
            };
            if host.is_empty() {
                return Err(fail("missing TCP host".into()));
            }
            match port {
                None | Some("") => Err(fail("missing TCP port".into())),
                Some(p) => p
                    .parse::<u16>()
                    .map(|_| ())
                    .map_err(|_| fail(format!("invalid TCP port `{p}`"))),
            }
        }
        "ipc" | "inproc" if rest.is_empty() => Err(fail(format!("missing {scheme} address"))),
        "ipc" | "inproc" => Ok(()),
        other => Err(fail(format!("unsupported scheme `{other}`"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// Counter: live batches by `outcome` (`applied`, `stale`, `sink_rejected`, `sink_unavailable`,
/// `sink_failed`, `deferred`).
pub const METRIC_BATCHES: &str = "kvindex_zmq_batches_total";
/// Counter: sequence gaps detected.
pub const METRIC_GAPS: &str = "kvindex_zmq_gaps_total";
/// Counter: replay requests by `outcome` (`complete`, `incomplete`, `failed`, `not_configured`).
pub const METRIC_REPLAYS: &str = "kvindex_zmq_replay_requests_total";
/// Counter: replay attempts (a request's first try and each retry).
pub const METRIC_REPLAY_ATTEMPTS: &str = "kvindex_zmq_replay_attempts_total";
/// Counter: batches received through replay.
pub const METRIC_REPLAYED_BATCHES: &str = "kvindex_zmq_replayed_batches_total";
/// Counter: sequence numbers skipped for good.
pub const METRIC_LOST_BATCHES: &str = "kvindex_zmq_lost_batches_total";
/// Counter: publisher sequence restarts seen.
pub const METRIC_PUBLISHER_RESTARTS: &str = "kvindex_zmq_publisher_restarts_total";

// ---------------------------------------------------------------------------------------------
// The set of listeners
// ---------------------------------------------------------------------------------------------

type StreamKey = (u64, u32);

struct Entry {
    spec: ListenerSpec,
    status: Arc<Mutex<Shared>>,
    task: Option<JoinHandle<()>>,
}

/// A listener's status, shared by the listener's entry and its tasks: a pause and a resume
/// keep the status but replace the task, and an aborted task runs on until its next await
/// (e.g. through the rest of a replay's apply loop). Only the task named `owner` may change
/// the status; the others end without touching it.
///
/// Ordering: `owner` is only read and written under this mutex, together with the status, so
/// once a pause (or a resume, unregister, shutdown) has changed it, no update of the replaced
/// task lands after that.
struct Shared {
    status: ListenerStatus,
    /// The task that owns the status ([`Listener::task_id`]); `None` while none runs (paused,
    /// stopped).
    owner: Option<u64>,
}

struct Inner {
    runtime: Handle,
    sink: Arc<dyn EventSink>,
    config: IngestConfig,
    gate: watch::Sender<bool>,
    listeners: Mutex<BTreeMap<StreamKey, Entry>>,
    /// Last listener task id handed out (unique per [`ZmqIngest`]; only uniqueness matters,
    /// so `Relaxed`).
    tasks: AtomicU64,
}

/// The ZMQ listeners of one kvindex process: register, pause, resume, unregister, inspect.
///
/// Dropping it (or [`ZmqIngest::shutdown`]) stops every listener.
pub struct ZmqIngest {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these plain-data structures half-updated in a
    // way that matters more than losing the whole status; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ZmqIngest {
    /// Listeners run on `runtime` and hand batches to `sink`.
    pub fn new(runtime: Handle, sink: Arc<dyn EventSink>, config: IngestConfig) -> Self {
        let (gate, _) = watch::channel(config.start_open);
        Self {
            inner: Arc::new(Inner {
                runtime,
                sink,
                config,
                gate,
                listeners: Mutex::new(BTreeMap::new()),
                tasks: AtomicU64::new(0),
            }),
        }
    }

    /// Open the ready gate: `pending` listeners become `active`, catch up by replay when they
    /// have a replay endpoint, then process what they held and what follows (SERVICE.md §1.3
    /// step 4).
    pub fn open(&self) {
        self.inner.gate.send_replace(true);
    }

    /// Start a listener. Validates both endpoints; `(worker_id, dp_rank)` must be new.
    pub fn register(&self, spec: ListenerSpec) -> Result<(), IngestError> {
        validate_endpoint(&spec.endpoint).map_err(IngestError::InvalidEndpoint)?;
        if let Some(replay) = &spec.replay_endpoint {
            validate_endpoint(replay).map_err(IngestError::InvalidReplayEndpoint)?;
        }
        let key = (spec.worker_id, spec.dp_rank);
        let mut listeners = lock(&self.inner.listeners);
        if listeners.contains_key(&key) {
            return Err(IngestError::AlreadyRegistered {
                worker_id: spec.worker_id,
                dp_rank: spec.dp_rank,
            });
        }
        let status = Arc::new(Mutex::new(Shared {
            status: ListenerStatus {
                worker_id: spec.worker_id,
                dp_rank: spec.dp_rank,
                endpoint: spec.endpoint.clone(),
                replay_endpoint: spec.replay_endpoint.clone(),
                state: ListenerState::Pending,
                connected: false,
                degraded: false,
                replaying: false,
                last_error: None,
                watermark: spec.resume_after,
                last_live_seq: None,
                counters: ListenerCounters::default(),
            },
            owner: None,
        }));
        let task = self.spawn(spec.clone(), status.clone());
        listeners.insert(
            key,
            Entry {
                spec,
                status,
                task: Some(task),
            },
        );
        Ok(())
    }

    /// Start a task for `spec`; it owns `status` from now on (an earlier task of the stream no
    /// longer changes it).
    fn spawn(&self, spec: ListenerSpec, status: Arc<Mutex<Shared>>) -> JoinHandle<()> {
        let task_id = self.inner.tasks.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&status).owner = Some(task_id);
        let listener = Listener {
            task_id,
            fenced: false,
            ctx: ConvertContext {
                worker_id: spec.worker_id,
                dp_rank: spec.dp_rank,
                block_size: spec.block_size,
                seq: 0,
            },
            watermark: spec.resume_after,
            last_live: None,
            spec,
            status,
            sink: self.inner.sink.clone(),
            config: self.inner.config.clone(),
            held: VecDeque::new(),
            held_bytes: 0,
            refusals: RefusalLog::default(),
            sink_delay: Duration::ZERO,
            sink_retry_at: None,
            sink_failed: None,
            deferrals: RefusalLog::default(),
        };
        let gate = self.inner.gate.subscribe();
        self.inner.runtime.spawn(listener.run(gate))
    }

    /// Stop and forget one listener; its watermark is dropped (SERVICE.md §7.5). Returns its
    /// last status.
    pub fn unregister(&self, worker_id: u64, dp_rank: u32) -> Result<ListenerStatus, IngestError> {
        let entry = lock(&self.inner.listeners)
            .remove(&(worker_id, dp_rank))
            .ok_or(IngestError::NotFound { worker_id, dp_rank })?;
        Ok(stop_entry(entry))
    }

    /// Stop and forget every listener of a worker; returns their last statuses.
    pub fn unregister_worker(&self, worker_id: u64) -> Vec<ListenerStatus> {
        let removed: Vec<Entry> = {
            let mut listeners = lock(&self.inner.listeners);
            let keys: Vec<StreamKey> = listeners
                .range((worker_id, 0)..=(worker_id, u32::MAX))
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| listeners.remove(k)).collect()
        };
        removed.into_iter().map(stop_entry).collect()
    }

    /// Stop a listener but keep its watermark: events published meanwhile are lost unless the
    /// replay on resume recovers them (SERVICE.md §3.12).
    pub fn pause(&self, worker_id: u64, dp_rank: u32) -> Result<(), IngestError> {
        let mut listeners = lock(&self.inner.listeners);
        let entry = listeners
            .get_mut(&(worker_id, dp_rank))
            .ok_or(IngestError::NotFound { worker_id, dp_rank })?;
        let mut shared = lock(&entry.status);
        if shared.status.state == ListenerState::Paused {
            return Err(IngestError::InvalidTransition {
                worker_id,
                dp_rank,
                action: "paused",
                from: shared.status.state.as_str(),
            });
        }
        if let Some(task) = entry.task.take() {
            task.abort();
        }
        // The task may run on until its next await: from now on it leaves the status alone.
        shared.owner = None;
        let status = &mut shared.status;
        status.state = ListenerState::Paused;
        status.connected = false;
        status.replaying = false;
        Ok(())
    }

    /// Restart a paused listener from its kept watermark, with the generation it had. For a
    /// sink without fencing only: the paused task may still be submitting (an abort lands at
    /// its next await), and without a new generation ([`Self::resume_with_generation`]) the
    /// sink cannot refuse those batches, which the resumed task may then submit again.
    pub fn resume(&self, worker_id: u64, dp_rank: u32) -> Result<(), IngestError> {
        self.resume_inner(worker_id, dp_rank, None)
    }

    /// [`Self::resume`] with a new [`ListenerSpec::generation`]: a sink that fences streams
    /// can then tell the resumed task's batches from those of the paused one, whose task may
    /// still be running (an abort takes effect only at the task's next await).
    pub fn resume_with_generation(
        &self,
        worker_id: u64,
        dp_rank: u32,
        generation: u64,
    ) -> Result<(), IngestError> {
        self.resume_inner(worker_id, dp_rank, Some(generation))
    }

    fn resume_inner(
        &self,
        worker_id: u64,
        dp_rank: u32,
        generation: Option<u64>,
    ) -> Result<(), IngestError> {
        let mut listeners = lock(&self.inner.listeners);
        let entry = listeners
            .get_mut(&(worker_id, dp_rank))
            .ok_or(IngestError::NotFound { worker_id, dp_rank })?;
        let watermark = {
            let mut shared = lock(&entry.status);
            let status = &mut shared.status;
            if status.state != ListenerState::Paused {
                return Err(IngestError::InvalidTransition {
                    worker_id,
                    dp_rank,
                    action: "resumed",
                    from: status.state.as_str(),
                });
            }
            status.state = ListenerState::Pending;
            status.last_live_seq = None;
            status.watermark
        };
        if let Some(generation) = generation {
            entry.spec.generation = generation;
        }
        let mut spec = entry.spec.clone();
        spec.resume_after = watermark;
        entry.task = Some(self.spawn(spec, entry.status.clone()));
        Ok(())
    }

    /// Status of one listener.
    pub fn status(&self, worker_id: u64, dp_rank: u32) -> Option<ListenerStatus> {
        lock(&self.inner.listeners)
            .get(&(worker_id, dp_rank))
            .map(|e| lock(&e.status).status.clone())
    }

    /// Status of every listener, ordered by (worker_id, dp_rank).
    pub fn statuses(&self) -> Vec<ListenerStatus> {
        lock(&self.inner.listeners)
            .values()
            .map(|e| lock(&e.status).status.clone())
            .collect()
    }

    /// Stop every listener (they stay listed as paused, watermarks kept).
    pub fn shutdown(&self) {
        for entry in lock(&self.inner.listeners).values_mut() {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            let mut shared = lock(&entry.status);
            shared.owner = None;
            let status = &mut shared.status;
            status.state = ListenerState::Paused;
            status.connected = false;
            status.replaying = false;
        }
    }
}

impl ZmqIngest {
    /// Like [`Self::shutdown`], then wait until every listener task has ended: once this
    /// returns no listener calls the sink or changes a status any more (the final counters are
    /// complete). Must run on the runtime the listeners use.
    pub async fn shutdown_and_wait(&self) {
        let tasks: Vec<JoinHandle<()>> = lock(&self.inner.listeners)
            .values_mut()
            .filter_map(|e| e.task.take())
            .collect();
        for task in tasks {
            task.abort();
            // Cancelled at its next await: the poll in progress (a sink call, counter updates)
            // completes first.
            let _ = task.await;
        }
        self.shutdown();
    }
}

impl Drop for ZmqIngest {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn stop_entry(mut entry: Entry) -> ListenerStatus {
    if let Some(task) = entry.task.take() {
        task.abort();
    }
    let mut status = {
        let mut shared = lock(&entry.status);
        shared.owner = None;
        shared.status.clone()
    };
    status.connected = false;
    status.replaying = false;
    status
}

// ---------------------------------------------------------------------------------------------
// One listener task
// ---------------------------------------------------------------------------------------------

struct Listener {
    /// This task's id: it changes the shared status only while it is the status's owner.
    task_id: u64,
    /// The sink refused a batch as [`SinkError::Fenced`]: the stream has a newer listener (or
    /// none), so this task ends without touching anything more.
    fenced: bool,
    spec: ListenerSpec,
    status: Arc<Mutex<Shared>>,
    sink: Arc<dyn EventSink>,
    config: IngestConfig,
    ctx: ConvertContext,
    /// Last sequence handed to the sink.
    watermark: Option<u64>,
    /// Last sequence seen on the live socket (restart detection).
    last_live: Option<u64>,
    /// Live messages received during a replay, processed after it.
    held: VecDeque<ZmqMessage>,
    /// Bytes of the frames in `held`.
    held_bytes: usize,
    /// Warnings about batches the sink refused, rate-limited.
    refusals: RefusalLog,
    /// The current backoff after [`SinkError::Unavailable`] (zero: the sink took the last
    /// batch).
    sink_delay: Duration,
    /// Set after [`SinkError::Unavailable`] with a replay endpoint: no replay before this, and
    /// the refused batch is asked for again then. Cleared by any replay.
    sink_retry_at: Option<tokio::time::Instant>,
    /// Why the sink failed for good ([`SinkError::Failed`]): nothing more is submitted.
    sink_failed: Option<String>,
    /// Lines about batches deferred while the sink does not take any, rate-limited.
    deferrals: RefusalLog,
}

/// The first block-size mismatch among a batch's skipped events (event's and partition's
/// sizes) and how many events it skipped.
fn block_size_mismatch(skipped: &[(usize, SkipReason)]) -> Option<(u64, u32, usize)> {
    let mut sizes = skipped.iter().filter_map(|(_, reason)| match reason {
        SkipReason::BlockSizeMismatch { event, partition } => Some((*event, *partition)),
        _ => None,
    });
    let (event, partition) = sizes.next()?;
    Some((event, partition, 1 + sizes.count()))
}

/// Rejected events of one batch logged one by one; the rest get a single line. At most
/// [`MAX_DETAILED_REJECTIONS`], which a batch keeps in detail.
const LOGGED_REJECTIONS_PER_BATCH: usize = 8;
const _: () = assert!(LOGGED_REJECTIONS_PER_BATCH <= MAX_DETAILED_REJECTIONS);

/// How a batch's `rejected` events are logged: the first ones one line each, and how many
/// more share a summary line (none when all were logged).
fn rejection_log_lines(rejected: usize) -> (usize, Option<usize>) {
    let one_by_one = rejected.min(LOGGED_REJECTIONS_PER_BATCH);
    let more = rejected - one_by_one;
    (one_by_one, (more > 0).then_some(more))
}

/// At most one warning per this long about batches the sink refused (the counters count every
/// one).
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(1);

/// Rate limit of a listener's "sink rejected batch" warnings: a stopped or superseded task
/// still inside a long replay-apply loop, or a partition that refuses every batch, must not
/// write a line per batch. The first refusal is logged, then at most one line per
/// [`REFUSAL_LOG_PERIOD`], saying how many were refused since the last line.
#[derive(Debug, Default)]
struct RefusalLog {
    /// When the last line was written.
    last: Option<Instant>,
    /// Refusals since then, not logged.
    unlogged: u64,
}

impl RefusalLog {
    /// Count one refusal at `now`: `Some(n)` when a line is due now, `n` being the refusals it
    /// reports (this one and those not logged since the last line).
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last
            .is_none_or(|last| now.saturating_duration_since(last) >= REFUSAL_LOG_PERIOD);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// How [`Listener::hold_until_ready`] ended.
enum Hold {
    /// The gate opened.
    Ready,
    /// The publisher's connection ended: reconnect, and hold on.
    ConnectionEnded,
    /// The gate's sender is gone (the ingestion was dropped): the task ends.
    GateGone,
}

/// Bytes of a message's frames.
fn message_bytes(msg: &ZmqMessage) -> usize {
    msg.iter().map(|f| f.len()).sum()
}

/// Whether a listener holding `count` live messages of `bytes` bytes during a replay may take
/// one more from its socket (else it leaves them there until the replay ends).
fn may_hold(count: usize, bytes: usize, config: &IngestConfig) -> bool {
    count < config.max_held_live_batches && bytes < config.max_held_live_bytes
}

/// The backoff after the sink refused a batch as unavailable, the previous one having been
/// `previous` (zero: the sink took the batch before).
fn next_sink_delay(previous: Duration, config: &IngestConfig) -> Duration {
    // Never zero: a sink that keeps refusing must not make the listener replay in a loop.
    let first = config.sink_retry_backoff.max(MIN_SINK_DELAY);
    if previous.is_zero() {
        first
    } else {
        (previous * 2).min(config.sink_retry_backoff_max.max(first))
    }
}

/// Shortest backoff after the sink refused a batch, whatever the configuration says.
const MIN_SINK_DELAY: Duration = Duration::from_millis(10);

/// After a publisher connection ended, how long the socket must stay quiet before the listener
/// takes it that every message sent before the end has been received.
const END_DRAIN_QUIET: Duration = Duration::from_millis(200);

/// How long to wait before reconnecting after a connection that lasted `lasted`, the previous
/// wait having been `previous`: at once after a connection that lasted, with a growing pause
/// (100 ms doubling up to `connect_backoff_max`) after connections that keep dropping at once,
/// so a publisher that accepts and hangs up does not make the listener spin.
fn reconnect_pause(previous: Duration, lasted: Duration, config: &IngestConfig) -> Duration {
    if lasted > config.connect_backoff_max {
        Duration::ZERO
    } else {
        (previous * 2)
            .max(Duration::from_millis(100))
            .min(config.connect_backoff_max)
    }
}

/// How a listener's `last_error` about a failed connect attempt starts.
const CONNECT_ERROR_PREFIX: &str = "failed to connect ZMQ SUB socket to";

/// Why a SUB endpoint can never be connected to (the listener is `failed`, SERVICE.md §2).
fn unconnectable(endpoint: &str) -> Option<String> {
    let reason = if endpoint.starts_with("inproc://") {
        "inproc transport is not available across processes"
    } else if endpoint
        .strip_prefix("tcp://")
        .is_some_and(|rest| rest.starts_with("*:"))
    {
        "Invalid argument"
    } else {
        return None;
    };
    Some(format!("{CONNECT_ERROR_PREFIX} {endpoint}: {reason}"))
}

impl Listener {
    /// Change the shared status, if this task still owns it (else `None`, nothing done): a
    /// paused or superseded task whose abort has not landed yet must not change the status of
    /// the task resumed in its place.
    fn with_status<R>(&self, f: impl FnOnce(&mut ListenerStatus) -> R) -> Option<R> {
        let mut shared = lock(&self.status);
        (shared.owner == Some(self.task_id)).then(|| f(&mut shared.status))
    }

    /// This task is no longer the stream's listener (paused, stopped, superseded, or fenced by
    /// the sink): it is to end at once.
    fn superseded(&self) -> bool {
        self.fenced || lock(&self.status).owner != Some(self.task_id)
    }

    async fn run(mut self, mut gate: watch::Receiver<bool>) {
        if let Some(error) = unconnectable(&self.spec.endpoint) {
            tracing::warn!(worker_id = self.spec.worker_id, dp_rank = self.spec.dp_rank, %error, "listener failed");
            self.with_status(|s| {
                s.state = ListenerState::Failed;
                s.last_error = Some(error);
            });
            return;
        }
        // Ready gate (SERVICE.md §1.3): until the service opens it, the listener stays
        // `pending`, connects, and holds what it receives without submitting anything
        // (`hold_until_ready`); the service loads its peer recovery meanwhile.
        let mut ready = *gate.borrow_and_update();
        if ready {
            self.with_status(|s| s.state = ListenerState::Active);
        }

        // One socket per connection: when the publisher's connection ends (its frame guard
        // sees it end), this listener drops the socket and connects a new one itself rather
        // than rely on the `zeromq` crate's reconnection. That reconnection never starts when
        // the connection drops during the handshake (the socket then stays "connected" with no
        // peer, receiving nothing, for good), and it hides why a reconnection fails (our
        // `connect` records and counts it).
        let mut pause = Duration::ZERO;
        loop {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let connected = if ready {
                Some(self.connect().await)
            } else {
                // A publisher that cannot be reached yet must not keep the listener `pending`
                // once the gate opens.
                tokio::select! {
                    connected = self.connect() => Some(connected),
                    open = gate.wait_for(|open| *open) => {
                        if open.is_err() {
                            return;
                        }
                        None
                    }
                }
            };
            let (mut sub, mut guard) = match connected {
                Some(connected) => connected,
                None => {
                    ready = true;
                    self.on_ready();
                    self.connect().await
                }
            };
            let mut ended = false;
            let connected_at = tokio::time::Instant::now();
            tracing::info!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                endpoint = %self.spec.endpoint,
                "ZMQ listener connected"
            );
            if !ready {
                match self
                    .hold_until_ready(&mut gate, &mut sub, &mut guard, &mut ended)
                    .await
                {
                    Hold::Ready => {
                        ready = true;
                        self.on_ready();
                    }
                    Hold::ConnectionEnded => {
                        self.on_disconnect(guard.take_error());
                        pause = reconnect_pause(pause, connected_at.elapsed(), &self.config);
                        continue;
                    }
                    Hold::GateGone => return,
                }
            }

            // Catch up at once (restart, resume, reconnection, or a publisher that was
            // already running) — unless the sink does not take batches now: the retry after
            // its backoff catches up then.
            if self.spec.replay_endpoint.is_some() && !self.sink_blocked() {
                let from = self.watermark.map_or(0, |w| w.saturating_add(1));
                self.replay(from, None, &mut sub).await;
            }

            loop {
                // A superseded task still working through held messages (no await between
                // them, so its abort does not land) stops here.
                if self.superseded() {
                    return;
                }
                let msg = match self.held.pop_front() {
                    Some(m) => {
                        self.held_bytes = self.held_bytes.saturating_sub(message_bytes(&m));
                        m
                    }
                    None => {
                        // The sink refused a batch: once its backoff is over, the batch is
                        // asked for again even if the engine stays idle.
                        let next = match self.sink_retry_at.filter(|_| self.sink_failed.is_none()) {
                            Some(at) => tokio::select! {
                                next = self.next_live(&mut sub, &mut guard, &mut ended) => Some(next),
                                () = tokio::time::sleep_until(at) => None,
                            },
                            None => Some(self.next_live(&mut sub, &mut guard, &mut ended).await),
                        };
                        match next {
                            Some(Some(m)) => m,
                            Some(None) => break,
                            None => {
                                self.retry_after_sink_backoff(&mut sub).await;
                                continue;
                            }
                        }
                    }
                };
                self.on_live(msg, &mut sub).await;
            }
            self.on_disconnect(guard.take_error());
            pause = reconnect_pause(pause, connected_at.elapsed(), &self.config);
        }
    }

    /// Until the ready gate opens: take the live messages from `sub` and hold them, submitting
    /// nothing (bounded as during a replay: past [`IngestConfig::max_held_live_batches`] or
    /// [`IngestConfig::max_held_live_bytes`] they wait in the socket). They are processed once
    /// it opens, after the catch-up replay, in order.
    async fn hold_until_ready(
        &mut self,
        gate: &mut watch::Receiver<bool>,
        sub: &mut SubSocket,
        guard: &mut Guard,
        ended: &mut bool,
    ) -> Hold {
        let mut full_logged = false;
        loop {
            if *gate.borrow_and_update() {
                return Hold::Ready;
            }
            let room = may_hold(self.held.len(), self.held_bytes, &self.config);
            if !room && !full_logged {
                full_logged = true;
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    held = self.held.len(),
                    "live messages held until the ready gate opens reached the hold limit; later ones wait in the socket"
                );
            }
            let received = tokio::select! {
                changed = gate.changed() => {
                    if changed.is_err() {
                        return Hold::GateGone;
                    }
                    continue;
                }
                received = self.next_live(sub, guard, ended), if room => received,
            };
            let Some(msg) = received else {
                return Hold::ConnectionEnded;
            };
            tracing::debug!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                seq = ?msg.get(1).and_then(|f| <[u8; 8]>::try_from(f.as_ref()).ok()).map(u64::from_be_bytes),
                "live batch held until the ready gate opens"
            );
            self.held_bytes += message_bytes(&msg);
            self.held.push_back(msg);
            self.with_status(|s| s.counters.held_before_ready += 1);
        }
    }

    /// The ready gate opened: the listener is `active` and processes what it held.
    fn on_ready(&self) {
        self.with_status(|s| s.state = ListenerState::Active);
        tracing::info!(
            worker_id = self.spec.worker_id,
            dp_rank = self.spec.dp_rank,
            held = self.held.len(),
            "ready gate open: the listener applies its events"
        );
    }

    /// Connect a new SUB socket, through a new frame guard (`zmq::frame_guard`), retrying with
    /// backoff until it succeeds. The guard must live as long as the socket.
    async fn connect(&self) -> (SubSocket, Guard) {
        let mut delay = Duration::from_millis(100);
        loop {
            let mut options = SocketOptions::default();
            options.connect_timeout(self.config.connect_timeout);
            let mut sub = SubSocket::with_options(options);
            let result = async {
                let guard = frame_guard::start(&self.spec.endpoint, self.config.message_limits())
                    .await
                    .map_err(|e| e.to_string())?;
                // The empty prefix: every topic is accepted (SERVICE.md §5.1). Remembered by the
                // socket and re-sent on every (re)connection.
                sub.subscribe("").await.map_err(|e| e.to_string())?;
                if let Err(e) = sub.connect(guard.endpoint()).await {
                    // Our socket saw the guard hang up; the cause is the guard's connection
                    // onward (refused, unreachable, ...), when that is what failed.
                    return Err(guard.take_error().unwrap_or_else(|| e.to_string()));
                }
                Ok(guard)
            }
            .await;
            match result {
                Ok(guard) => {
                    self.with_status(|s| {
                        s.connected = true;
                        // Only the connect problems are over: a connection cut off by the
                        // frame guard (or a failed replay) stays the last problem.
                        if s.last_error
                            .as_deref()
                            .is_some_and(|e| e.starts_with(CONNECT_ERROR_PREFIX))
                        {
                            s.last_error = None;
                        }
                    });
                    return (sub, guard);
                }
                Err(e) => {
                    let error = format!("{CONNECT_ERROR_PREFIX} {}: {e}", self.spec.endpoint);
                    tracing::debug!(worker_id = self.spec.worker_id, %error, "retrying");
                    record_connection_error("connect");
                    self.with_status(|s| {
                        s.last_error = Some(error);
                        s.counters.connect_failures += 1;
                    });
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.connect_backoff_max);
                }
            }
        }
    }

    /// A receive error on the SUB socket: the peer went away or sent bad ZMTP; the socket
    /// reconnects by itself, so it is only logged and counted.
    fn on_receive_error(&self, e: &zeromq::ZmqError) {
        tracing::debug!(worker_id = self.spec.worker_id, error = %e, "SUB receive error");
        record_connection_error("receive");
        self.with_status(|s| s.counters.receive_errors += 1);
    }

    /// The connection to the publisher was lost: the socket is about to be replaced. `cause`:
    /// why the frame guard closed it, if it did (a publisher over the message limits); it
    /// becomes the listener's `last_error`, kept until another problem replaces it.
    fn on_disconnect(&self, cause: Option<String>) {
        tracing::info!(
            worker_id = self.spec.worker_id,
            dp_rank = self.spec.dp_rank,
            endpoint = %self.spec.endpoint,
            cause = cause.as_deref().unwrap_or("closed"),
            "ZMQ publisher connection lost; reconnecting"
        );
        record_connection_error("disconnect");
        self.with_status(|s| {
            s.connected = false;
            s.counters.disconnects += 1;
            if let Some(cause) = cause {
                s.last_error = Some(format!("connection to {}: {cause}", self.spec.endpoint));
            }
        });
    }

    /// Whether the sink is not to be given batches now: it failed for good, or it refused one
    /// as unavailable and its backoff is not over (only with a replay endpoint: without one
    /// there is nothing to ask for again, and every batch is tried).
    fn sink_blocked(&self) -> bool {
        self.sink_failed.is_some()
            || self
                .sink_retry_at
                .is_some_and(|at| tokio::time::Instant::now() < at)
    }

    /// The sink's backoff is over: ask for the batch it refused, and everything after it.
    async fn retry_after_sink_backoff(&mut self, sub: &mut SubSocket) {
        let from = self.watermark.map_or(0, |w| w.saturating_add(1));
        tracing::info!(
            worker_id = self.spec.worker_id,
            dp_rank = self.spec.dp_rank,
            from,
            "the sink was unavailable: asking again for the batches it did not take"
        );
        self.replay(from, None, sub).await;
    }

    /// A batch not submitted because the sink does not take batches now: counted, and logged
    /// rate-limited. The watermark stays before it, so a later replay asks for it again.
    fn defer(&mut self, seq: u64) {
        metrics::counter!(METRIC_BATCHES, "outcome" => "deferred").increment(1);
        self.with_status(|s| s.counters.deferred_batches += 1);
        let reason = self
            .sink_failed
            .as_deref()
            .unwrap_or("unavailable")
            .to_owned();
        if let Some(deferred) = self.deferrals.note(Instant::now()) {
            tracing::warn!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                seq,
                deferred,
                watermark = self.watermark,
                sink = %reason,
                "batch not submitted: the sink does not take batches now (`deferred`: such batches since the last such line)"
            );
        }
    }

    /// The next live message, or `None` when the connection to the publisher has ended.
    /// Once the guard has reported the end (`ended`), the messages the publisher sent before
    /// it went may still be in our socket (the guard passes every byte on before it reports,
    /// but the socket sees them only once the runtime has polled its readiness): they are
    /// taken first, until the socket has been quiet for [`END_DRAIN_QUIET`], and only then
    /// `None`.
    async fn next_live(
        &self,
        sub: &mut SubSocket,
        guard: &mut Guard,
        ended: &mut bool,
    ) -> Option<ZmqMessage> {
        loop {
            if *ended {
                match tokio::time::timeout(END_DRAIN_QUIET, sub.recv()).await {
                    Ok(Ok(msg)) => return Some(msg),
                    // An error (the socket saw the end too) or quiet: all taken.
                    Ok(Err(_)) | Err(_) => return None,
                }
            }
            tokio::select! {
                // Messages before the end: a message and the end may be ready together.
                biased;
                received = sub.recv() => match received {
                    Ok(msg) => return Some(msg),
                    Err(e) => {
                        self.on_receive_error(&e);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = guard.connection_ended() => *ended = true,
            }
        }
    }

    async fn on_live(&mut self, msg: ZmqMessage, sub: &mut SubSocket) {
        let frames = msg.into_vec();
        let raw = match split_live_message(&frames) {
            Ok(raw) => raw,
            Err(e) => {
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    "{e}"
                );
                record_frame_error(&e);
                self.with_status(|s| s.counters.malformed_messages += 1);
                return;
            }
        };
        let seq = raw.seq;
        // Decode before the sequence logic: a payload that does not decode must not move
        // anything, not even restart detection (a corrupt message with a wild sequence number
        // would otherwise look like a publisher restart).
        let Some(batch) = self.decode(seq, raw.payload) else {
            return;
        };
        let restarted = match (self.last_live, self.spec.resume_after) {
            (Some(last), _) => {
                let backwards = seq <= last;
                if backwards {
                    tracing::warn!(
                        worker_id = self.spec.worker_id,
                        dp_rank = self.spec.dp_rank,
                        seq,
                        last,
                        "publisher sequence went backwards: treating it as a restarted publisher"
                    );
                }
                backwards
            }
            // This task's first live batch: a new subscriber never gets a batch published
            // before it connected, and the batch this task resumed after was published before
            // it started, so one not above it comes from an engine that restarted meanwhile
            // (while kvindex was down, or the listener paused).
            (None, Some(resumed_after)) => {
                let behind = seq <= resumed_after;
                if behind {
                    tracing::warn!(
                        worker_id = self.spec.worker_id,
                        dp_rank = self.spec.dp_rank,
                        seq,
                        resumed_after,
                        "first live sequence is not above the watermark the listener resumed after: the publisher restarted while the listener was away; treating it as a restarted publisher"
                    );
                }
                behind
            }
            (None, None) => false,
        };
        if restarted {
            metrics::counter!(METRIC_PUBLISHER_RESTARTS).increment(1);
            self.watermark = None;
            self.with_status(|s| {
                s.counters.publisher_restarts += 1;
                s.watermark = None;
            });
        }
        self.last_live = Some(seq);
        self.with_status(|s| s.last_live_seq = Some(seq));

        let expected = self.watermark.map_or(0, |w| w.saturating_add(1));
        if self.watermark.is_some_and(|w| seq <= w) {
            self.drop_stale(seq);
            return;
        }
        if self.sink_failed.is_some() {
            self.defer(seq);
            return;
        }
        if seq > expected {
            // The sink refused a batch and its backoff is not over: not another replay (nor
            // this batch, which would move the watermark past the refused one). The replay
            // once the backoff is over asks for this one too.
            if self.sink_blocked() {
                self.defer(seq);
                return;
            }
            tracing::warn!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                "Gap detected: expected seq {expected}, got {seq}"
            );
            metrics::counter!(METRIC_GAPS).increment(1);
            self.with_status(|s| s.counters.gaps += 1);
            self.replay(expected, Some(seq), sub).await;
            if self.superseded() {
                return;
            }
            // Replay normally covers the live batch too; then it is stale.
            if self.watermark.is_some_and(|w| seq <= w) {
                self.drop_stale(seq);
                return;
            }
            // The sink did not take a batch of the replay (the replay cleared the retry
            // time, the refusal set it again): this one must not move the watermark past it.
            if self.sink_retry_at.is_some() || self.sink_failed.is_some() {
                self.defer(seq);
                return;
            }
        }
        // A refusal here is dealt with by the backoff `submit` sets up.
        let _taken = self.submit(seq, batch);
    }

    fn drop_stale(&self, seq: u64) {
        tracing::debug!(worker_id = self.spec.worker_id, seq, "stale batch dropped");
        metrics::counter!(METRIC_BATCHES, "outcome" => "stale").increment(1);
        self.with_status(|s| s.counters.stale_dropped += 1);
    }

    /// Decode batch `seq` and hand it to the sink. `false` when the sink did not take it and
    /// the watermark stays before it ([`Self::submit`]); a batch that does not decode is
    /// skipped (`true`): asking for it again would bring the same bytes.
    fn apply(&mut self, seq: u64, payload: &[u8]) -> bool {
        match self.decode(seq, payload) {
            Some(batch) => self.submit(seq, batch),
            None => true,
        }
    }

    /// Decode batch `seq`; a failure is logged and counted and leaves the watermark alone.
    fn decode(&mut self, seq: u64, payload: &[u8]) -> Option<ConvertedBatch> {
        self.ctx.seq = seq;
        match decode_payload(payload, &self.ctx) {
            Ok(batch) => Some(batch),
            Err(e) => {
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    seq,
                    error = %e,
                    "batch failed to decode"
                );
                record_batch_error(&e);
                self.with_status(|s| s.counters.decode_failures += 1);
                None
            }
        }
    }

    /// Hand a decoded batch to the sink; advances the watermark unless the sink is unavailable
    /// or failed (or fenced this task). Returns `false` when the sink did not take the batch
    /// ([`SinkError::Unavailable`], [`SinkError::Failed`]): nothing after it may be submitted
    /// before it, and the backoff (or the end of replays) is set up. `true` otherwise: taken,
    /// refused for good, or fenced (the task then ends, [`Self::superseded`]).
    fn submit(&mut self, seq: u64, batch: ConvertedBatch) -> bool {
        record_batch_metrics(&batch);
        // One line per rejected event up to a few, then one line for the rest: a batch of
        // thousands of bad events must not flood the log (the counters count every one).
        // The batch keeps the first `MAX_DETAILED_REJECTIONS` (≥ the lines logged) in detail.
        let (one_by_one, more) = rejection_log_lines(batch.rejected.total());
        for rejected in batch.rejected.detailed().iter().take(one_by_one) {
            tracing::warn!(worker_id = self.spec.worker_id, seq, index = rejected.index, error = %rejected.error, "event rejected");
        }
        if let Some(more) = more {
            tracing::warn!(
                worker_id = self.spec.worker_id,
                seq,
                more,
                "more events rejected in this batch (not logged one by one)"
            );
        }
        // A block size that differs from the partition's skips every store of this worker for
        // good (a registration mistake): one line per batch, with both sizes.
        if let Some((event, partition, count)) = block_size_mismatch(&batch.skipped) {
            tracing::warn!(
                worker_id = self.spec.worker_id,
                seq,
                count,
                event_block_size = event,
                partition_block_size = partition,
                "events skipped: their block size differs from the partition's"
            );
        }
        let rejected = batch.rejected.total() as u64;
        let skipped = batch.skipped.len() as u64;
        let submitted = batch.events.len() as u64;
        let result = self.sink.submit(
            self.spec.worker_id,
            self.spec.dp_rank,
            self.spec.generation,
            seq,
            batch.events,
        );
        let advance = match &result {
            Ok(()) => {
                metrics::counter!(METRIC_BATCHES, "outcome" => "applied").increment(1);
                true
            }
            Err(SinkError::Rejected(reason)) => {
                self.warn_refused(seq, reason);
                metrics::counter!(METRIC_BATCHES, "outcome" => "sink_rejected").increment(1);
                true
            }
            Err(SinkError::Fenced(reason)) => {
                // Not this task's stream any more: leave the watermark and the status (shared
                // with a resumed task) alone, and end the task: the rest of a replay it may
                // still be applying, and its held messages, are not submitted.
                self.fenced = true;
                // Still the stream's task (a sink fencing it before anyone replaced it): its
                // status must not say it is connected and receiving.
                self.with_status(|s| {
                    s.connected = false;
                    s.last_error = Some(format!("fenced by the sink: {reason}"));
                });
                self.warn_refused(seq, reason);
                metrics::counter!(METRIC_BATCHES, "outcome" => "sink_rejected").increment(1);
                return true;
            }
            Err(SinkError::Unavailable(reason)) => {
                metrics::counter!(METRIC_BATCHES, "outcome" => "sink_unavailable").increment(1);
                if self.spec.replay_endpoint.is_some() {
                    self.sink_delay = next_sink_delay(self.sink_delay, &self.config);
                    self.sink_retry_at = Some(tokio::time::Instant::now() + self.sink_delay);
                    tracing::warn!(
                        worker_id = self.spec.worker_id,
                        dp_rank = self.spec.dp_rank,
                        seq,
                        %reason,
                        retry_in = ?self.sink_delay,
                        "sink unavailable: the batch is asked for again by replay after a pause"
                    );
                } else {
                    tracing::warn!(
                        worker_id = self.spec.worker_id,
                        dp_rank = self.spec.dp_rank,
                        seq,
                        %reason,
                        "sink unavailable (no replay endpoint: the batch is lost once the next one is taken)"
                    );
                }
                false
            }
            Err(SinkError::Failed(reason)) => {
                tracing::error!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    seq,
                    %reason,
                    "sink failed: nothing more is submitted or replayed until kvindex restarts"
                );
                metrics::counter!(METRIC_BATCHES, "outcome" => "sink_failed").increment(1);
                self.sink_failed = Some(reason.clone());
                let error = format!("sink failed: {reason}");
                self.with_status(|s| s.last_error = Some(error));
                false
            }
        };
        if advance {
            self.sink_delay = Duration::ZERO;
        }
        let lost = if advance {
            let expected = self.watermark.map_or(0, |w| w.saturating_add(1));
            self.watermark = Some(seq);
            seq.saturating_sub(expected)
        } else {
            0
        };
        if lost > 0 {
            metrics::counter!(METRIC_LOST_BATCHES).increment(lost);
        }
        self.with_status(|s| {
            let c = &mut s.counters;
            c.events_rejected += rejected;
            c.events_skipped += skipped;
            c.lost_batches += lost;
            if result.is_ok() {
                c.batches_applied += 1;
                c.events_submitted += submitted;
            } else {
                c.sink_errors += 1;
            }
            if advance {
                s.watermark = Some(seq);
            }
        });
        advance
    }

    /// Log a batch the sink refused, rate-limited ([`RefusalLog`]).
    fn warn_refused(&mut self, seq: u64, reason: &str) {
        if let Some(refused) = self.refusals.note(Instant::now()) {
            tracing::warn!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                seq,
                refused,
                %reason,
                "sink refused batch (`refused`: batches refused since the last such line)"
            );
        }
    }

    /// Ask the replay endpoint for every batch from `from` on and apply what comes back; live
    /// messages arriving meanwhile are held. `target` is the live seq that revealed the gap.
    async fn replay(&mut self, from: u64, target: Option<u64>, sub: &mut SubSocket) {
        let Some(endpoint) = self.spec.replay_endpoint.clone() else {
            if let Some(target) = target {
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    gap_size = target - from,
                    "No replay endpoint configured; batches lost"
                );
                metrics::counter!(METRIC_REPLAYS, "outcome" => "not_configured").increment(1);
            }
            return;
        };
        // This replay is the retry a sink backoff was waiting for, if one was.
        self.sink_retry_at = None;
        let Some(degraded) = self.with_status(|s| {
            s.counters.replay_requests += 1;
            s.replaying = true;
            s.degraded
        }) else {
            return;
        };
        let attempts = if degraded {
            1
        } else {
            self.config.replay_attempts.max(1)
        };
        tracing::info!(
            worker_id = self.spec.worker_id,
            dp_rank = self.spec.dp_rank,
            from,
            ?target,
            "Requesting replay"
        );

        let config = self.config.clone();
        let fetched = {
            let fetch = fetch_replay(&endpoint, from, attempts, &config);
            tokio::pin!(fetch);
            loop {
                let room = may_hold(self.held.len(), self.held_bytes, &config);
                tokio::select! {
                    fetched = &mut fetch => break fetched,
                    received = sub.recv(), if room => {
                        match received {
                            Ok(msg) => {
                                self.held_bytes += message_bytes(&msg);
                                self.held.push_back(msg);
                            }
                            Err(e) => self.on_receive_error(&e),
                        }
                    }
                }
            }
        };

        let count = fetched.batches.len() as u64;
        if let Some(e) = fetched.malformed_end {
            tracing::warn!(
                worker_id = self.spec.worker_id,
                dp_rank = self.spec.dp_rank,
                %endpoint,
                replayed = count,
                "replay ended by a malformed reply: {e}"
            );
            metrics::counter!(METRIC_MESSAGES_DROPPED, "reason" => e.replay_label()).increment(1);
            self.with_status(|s| s.counters.malformed_messages += 1);
        }
        metrics::counter!(METRIC_REPLAY_ATTEMPTS).increment(u64::from(fetched.attempts));
        self.with_status(|s| s.counters.replay_attempts += u64::from(fetched.attempts));
        let first = fetched.batches.first().map(|b| b.0);
        let last = fetched.batches.last().map(|b| b.0);
        let contiguous = fetched
            .batches
            .windows(2)
            .all(|w| w[1].0 == w[0].0.saturating_add(1));
        for (i, (seq, payload)) in fetched.batches.iter().enumerate() {
            // No await in this loop: a task paused or superseded meanwhile stops here, not
            // at the end of the replay.
            if self.superseded() {
                return;
            }
            if self.watermark.is_some_and(|w| *seq <= w) {
                continue;
            }
            if !self.apply(*seq, payload) {
                // The sink did not take it: the batches after it would move the watermark
                // past it (counted lost, never asked for again). They are left for the
                // replay after the sink's backoff.
                let rest = (fetched.batches.len() - i - 1) as u64;
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    seq,
                    not_submitted = rest,
                    "replay stopped: the sink did not take a batch"
                );
                metrics::counter!(METRIC_BATCHES, "outcome" => "deferred").increment(rest);
                self.with_status(|s| s.counters.deferred_batches += rest);
                break;
            }
        }
        if self.superseded() {
            return;
        }
        metrics::counter!(METRIC_REPLAYED_BATCHES).increment(count);
        self.with_status(|s| {
            s.counters.replayed_batches += count;
            s.replaying = false;
        });

        match &fetched.error {
            None => {
                self.with_status(|s| {
                    s.degraded = false;
                    if s.last_error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("replay"))
                    {
                        s.last_error = None;
                    }
                });
                let reason = if count == 0 && target.is_some() {
                    Some("empty")
                } else if first.is_some_and(|f| f > from) {
                    Some("started_after_requested")
                } else if !contiguous {
                    Some("non_contiguous")
                } else if let (Some(t), Some(l)) = (target, last) {
                    (l.saturating_add(1) < t).then_some("ended_before_target")
                } else {
                    None
                };
                match reason {
                    Some(reason) => {
                        tracing::warn!(
                            worker_id = self.spec.worker_id,
                            dp_rank = self.spec.dp_rank,
                            "Replay incomplete: requested=[{from},{}), first={first:?}, last={last:?}, replayed={count}, reason={reason}",
                            target.map_or("..".to_owned(), |t| t.to_string()),
                        );
                        metrics::counter!(METRIC_REPLAYS, "outcome" => "incomplete").increment(1);
                    }
                    None => metrics::counter!(METRIC_REPLAYS, "outcome" => "complete").increment(1),
                }
            }
            Some(error) => {
                tracing::warn!(
                    worker_id = self.spec.worker_id,
                    dp_rank = self.spec.dp_rank,
                    %endpoint,
                    %error,
                    attempts,
                    replayed = count,
                    "replay failed; listener degraded"
                );
                metrics::counter!(METRIC_REPLAYS, "outcome" => "failed").increment(1);
                self.with_status(|s| {
                    s.degraded = true;
                    s.counters.replay_failures += 1;
                    s.last_error = Some(format!("replay from {endpoint} failed: {error}"));
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay client
// ---------------------------------------------------------------------------------------------

/// Why one replay attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// No connection within the timeout.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The connection attempt failed.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The request could not be sent.
    #[error("request failed: {0}")]
    Send(String),
    /// No frame within the timeout before the end-of-replay marker.
    #[error("no reply within {0:?}")]
    Idle(Duration),
    /// The socket failed while receiving.
    #[error("receive failed: {0}")]
    Receive(String),
    /// More batches than [`IngestConfig::replay_max_batches`].
    #[error("replay exceeded {0} batches")]
    TooLong(usize),
    /// More bytes than [`IngestConfig::replay_max_bytes`].
    #[error("replay exceeded {0} bytes")]
    TooLarge(usize),
    /// The frame guard closed the connection: the publisher sent a frame or a message over
    /// the limits ([`IngestConfig::max_message_bytes`], [`IngestConfig::max_message_frames`]).
    #[error("{0}")]
    Cut(String),
}

/// What a replay request brought back.
#[derive(Debug, Default)]
pub struct ReplayFetch {
    /// Replayed batches `(seq, payload)` in the order received. Each payload is a copy: as
    /// received it shares the socket's read buffer with the other frames of its message (and
    /// their neighbours), which it would keep alive.
    pub batches: Vec<(u64, Bytes)>,
    /// Bytes of the messages of those batches, every frame counted (what
    /// [`IngestConfig::replay_max_bytes`] bounds).
    pub bytes: usize,
    /// `None` when the end-of-replay marker arrived; the last attempt's error otherwise.
    pub error: Option<ReplayError>,
    /// Attempts made (1 + retries).
    pub attempts: u32,
    /// The malformed reply that ended the replay, if one did.
    pub malformed_end: Option<FrameError>,
}

/// One frame sequence received by the DEALER during a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayFrame {
    /// A buffered batch.
    Batch {
        /// Its sequence number.
        seq: u64,
        /// Its msgpack payload.
        payload: Bytes,
    },
    /// End of the replay: the terminator (an empty payload).
    End,
    /// A reply that is not a batch (fewer than 3 frames, or a sequence frame that is not 8
    /// bytes): it ends the replay too, as in Dynamo (SERVICE.md §7.2), but it is counted.
    Malformed(FrameError),
}

/// Interpret what the DEALER received: `[b"", topic, seq, payload]` (vLLM / SGLang) or
/// `[b"", seq, payload]` (older publishers); the seq frame is the one before the payload
/// (SERVICE.md §7.2).
pub fn parse_replay_frames(frames: &[Bytes]) -> ReplayFrame {
    if frames.len() < 3 {
        return ReplayFrame::Malformed(FrameError::FrameCount(frames.len()));
    }
    let payload = &frames[frames.len() - 1];
    if payload.is_empty() {
        return ReplayFrame::End;
    }
    match parse_seq(&frames[frames.len() - 2]) {
        Ok(seq) => ReplayFrame::Batch {
            seq,
            payload: payload.clone(),
        },
        Err(e) => ReplayFrame::Malformed(e),
    }
}

/// Request replay from `from` with up to `attempts` attempts and exponential backoff; each
/// retry resumes after the last batch received.
pub async fn fetch_replay(
    endpoint: &str,
    from: u64,
    attempts: u32,
    config: &IngestConfig,
) -> ReplayFetch {
    let mut fetched = ReplayFetch::default();
    let mut delay = config.replay_backoff;
    let mut next = from;
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(config.replay_backoff_max);
        }
        fetched.attempts += 1;
        match replay_once(endpoint, next, config, &mut fetched).await {
            Ok(()) => {
                fetched.error = None;
                return fetched;
            }
            Err(e @ (ReplayError::TooLong(_) | ReplayError::TooLarge(_) | ReplayError::Cut(_))) => {
                // Another attempt would only bring more (or the same message over the limits
                // again): keep what fits, give up on the rest.
                tracing::warn!(%endpoint, attempt, error = %e, "replay over its limit");
                fetched.error = Some(e);
                return fetched;
            }
            Err(e) => {
                tracing::debug!(%endpoint, attempt, error = %e, "replay attempt failed");
                fetched.error = Some(e);
                if let Some((seq, _)) = fetched.batches.last() {
                    next = seq.saturating_add(1);
                }
            }
        }
    }
    fetched
}

async fn replay_once(
    endpoint: &str,
    start: u64,
    config: &IngestConfig,
    fetched: &mut ReplayFetch,
) -> Result<(), ReplayError> {
    let timeout = config.replay_timeout;
    let mut options = SocketOptions::default();
    options.connect_timeout(timeout);
    let mut dealer = DealerSocket::with_options(options);
    // Through a frame guard, like the SUB socket; dropped with the dealer at the end.
    let mut guard = frame_guard::start(endpoint, config.message_limits())
        .await
        .map_err(|e| ReplayError::Connect(e.to_string()))?;
    match tokio::time::timeout(timeout, dealer.connect(guard.endpoint())).await {
        Err(_) | Ok(Err(zeromq::ZmqError::ConnectTimeout(_))) => {
            return Err(ReplayError::ConnectTimeout(timeout))
        }
        Ok(Err(e)) => {
            // As for the SUB socket: the guard's failure onward is the cause worth reporting.
            let cause = guard.take_error().unwrap_or_else(|| e.to_string());
            return Err(ReplayError::Connect(cause));
        }
        Ok(Ok(())) => {}
    }
    let request = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&start.to_be_bytes()),
    ])
    .map_err(|e| ReplayError::Send(e.to_string()))?;
    match tokio::time::timeout(timeout, dealer.send(request)).await {
        Err(_) => return Err(ReplayError::Send(format!("timed out after {timeout:?}"))),
        Ok(Err(e)) => return Err(ReplayError::Send(e.to_string())),
        Ok(Ok(())) => {}
    }
    // What earlier attempts of this request brought back counts too (`fetched.bytes`).
    let mut ended = false;
    // Why the frame guard cut the connection off: the messages already in the socket are
    // still taken (until it is quiet for `END_DRAIN_QUIET`), then the attempt fails.
    let mut cut: Option<String> = None;
    loop {
        let wait = if cut.is_some() {
            END_DRAIN_QUIET
        } else {
            timeout
        };
        let received = tokio::select! {
            biased;
            received = tokio::time::timeout(wait, dealer.recv()) => received,
            () = guard.connection_ended(), if !ended => {
                ended = true;
                cut = guard.take_error();
                continue;
            }
        };
        let msg = match (received, cut.take()) {
            (Err(_) | Ok(Err(_)), Some(cause)) => return Err(ReplayError::Cut(cause)),
            (Err(_), None) => return Err(ReplayError::Idle(timeout)),
            (Ok(Err(e)), None) => return Err(ReplayError::Receive(e.to_string())),
            (Ok(Ok(msg)), still) => {
                cut = still;
                msg
            }
        };
        let size = message_bytes(&msg);
        match parse_replay_frames(&msg.into_vec()) {
            ReplayFrame::End => return Ok(()),
            ReplayFrame::Malformed(e) => {
                fetched.malformed_end = Some(e);
                return Ok(());
            }
            ReplayFrame::Batch { seq, payload } => {
                if fetched.batches.len() >= config.replay_max_batches {
                    return Err(ReplayError::TooLong(config.replay_max_batches));
                }
                // Every frame counts: a payload of a few bytes can come with a topic of
                // megabytes.
                fetched.bytes = fetched.bytes.saturating_add(size);
                if fetched.bytes > config.replay_max_bytes {
                    return Err(ReplayError::TooLarge(config.replay_max_bytes));
                }
                // A copy of its own: the received frame keeps the whole read buffer it was
                // cut from alive (a 32 MiB topic frame, say), for as long as the replay is
                // held.
                fetched
                    .batches
                    .push((seq, Bytes::copy_from_slice(&payload)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds generation 1's first batch inside `submit` until released; refuses, as fenced,
    /// every generation but `current`; records `(generation, seq)` of every call.
    #[derive(Default)]
    struct HoldingSink {
        current: AtomicU64,
        calls: Mutex<Vec<(u64, u64)>>,
        held: std::sync::atomic::AtomicBool,
        reached: std::sync::atomic::AtomicBool,
        release: std::sync::atomic::AtomicBool,
    }

    impl EventSink for HoldingSink {
        fn submit(
            &self,
            _worker_id: u64,
            _dp_rank: u32,
            generation: u64,
            source_seq: u64,
            _events: Vec<RouterEvent>,
        ) -> Result<(), SinkError> {
            lock(&self.calls).push((generation, source_seq));
            if generation == 1 && !self.held.swap(true, Ordering::SeqCst) {
                self.reached.store(true, Ordering::SeqCst);
                let end = Instant::now() + Duration::from_secs(30);
                while !self.release.load(Ordering::SeqCst) {
                    assert!(Instant::now() < end, "never released");
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            if generation == self.current.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(SinkError::Fenced("superseded".into()))
            }
        }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A listener task paused while it applies a replay (held inside the sink: no await, so
    /// its abort cannot land) and resumed: once it goes on, its batch is fenced and it ends
    /// there. It neither submits the rest of its replay nor touches the status it shares with
    /// the resumed task (before, it added its replay to the counters, and could clear
    /// `replaying`, `degraded`, `last_error` or the watermark of its successor).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_task_still_applying_a_replay_leaves_the_resumed_ones_status_alone() {
        use super::super::test_publisher::{PublishBatch, PublisherConfig, VllmPublisher};
        let publisher = VllmPublisher::bind(PublisherConfig::loopback())
            .await
            .unwrap();
        // Five batches the listener fetches by replay as it starts.
        for _ in 0..5 {
            publisher.publish_unsent(&PublishBatch::new(Vec::new()));
        }
        let sink = Arc::new(HoldingSink::default());
        sink.current.store(1, Ordering::SeqCst);
        let ingest = ZmqIngest::new(Handle::current(), sink.clone(), IngestConfig::default());
        let replay = publisher.replay_endpoint().unwrap().to_owned();
        ingest
            .register(
                ListenerSpec::new(7, 0, publisher.endpoint(), 4)
                    .with_replay(replay)
                    .with_generation(1),
            )
            .unwrap();
        wait_for("the replay's first batch in the sink", || {
            sink.reached.load(Ordering::SeqCst)
        })
        .await;

        sink.current.store(2, Ordering::SeqCst);
        ingest.pause(7, 0).unwrap();
        ingest.resume_with_generation(7, 0, 2).unwrap();
        wait_for("the resumed listener's replay", || {
            ingest.status(7, 0).is_some_and(|s| {
                s.watermark == Some(4) && !s.replaying && s.counters.replayed_batches == 5
            })
        })
        .await;
        let before = ingest.status(7, 0).unwrap();

        sink.release.store(true, Ordering::SeqCst);
        // The old task has ended once only the entry and the resumed task hold the status.
        let shared = Arc::clone(&lock(&ingest.inner.listeners)[&(7, 0)].status);
        wait_for("the paused task's end", || Arc::strong_count(&shared) == 3).await;
        drop(shared);
        assert_eq!(
            ingest.status(7, 0).unwrap(),
            before,
            "the paused task changed its successor's status"
        );
        let old: Vec<u64> = lock(&sink.calls)
            .iter()
            .filter(|(g, _)| *g == 1)
            .map(|(_, seq)| *seq)
            .collect();
        assert_eq!(
            old,
            [0],
            "the paused task went on submitting after it was fenced"
        );
    }

    /// Block-size mismatches are found among a batch's skipped events, with both sizes and
    /// their count; other skips are not mistaken for one.
    #[test]
    fn reconnections_back_off_only_while_connections_keep_dropping() {
        let config = IngestConfig::default();
        let max = config.connect_backoff_max;
        let quick = Duration::from_millis(5);
        let first = reconnect_pause(Duration::ZERO, quick, &config);
        assert_eq!(first, Duration::from_millis(100));
        assert_eq!(reconnect_pause(first, quick, &config), first * 2);
        assert_eq!(reconnect_pause(max, quick, &config), max);
        assert_eq!(reconnect_pause(max, max * 2, &config), Duration::ZERO);
    }

    /// After the sink refused a batch as unavailable, the pause before the replay that asks for
    /// it again starts at the configured backoff, doubles up to its cap, and is never zero.
    #[test]
    fn the_pause_after_a_sink_refusal_doubles_up_to_its_cap() {
        let config = IngestConfig {
            sink_retry_backoff: Duration::from_millis(100),
            sink_retry_backoff_max: Duration::from_millis(350),
            ..IngestConfig::default()
        };
        let first = next_sink_delay(Duration::ZERO, &config);
        assert_eq!(first, Duration::from_millis(100));
        assert_eq!(next_sink_delay(first, &config), Duration::from_millis(200));
        assert_eq!(
            next_sink_delay(Duration::from_millis(200), &config),
            Duration::from_millis(350)
        );
        assert_eq!(
            next_sink_delay(Duration::from_millis(350), &config),
            Duration::from_millis(350)
        );
        let zero = IngestConfig {
            sink_retry_backoff: Duration::ZERO,
            sink_retry_backoff_max: Duration::ZERO,
            ..IngestConfig::default()
        };
        assert_eq!(next_sink_delay(Duration::ZERO, &zero), MIN_SINK_DELAY);
        assert_eq!(next_sink_delay(MIN_SINK_DELAY, &zero), MIN_SINK_DELAY);
    }

    #[test]
    fn block_size_mismatches_are_summarised_for_the_log() {
        let m = |event| SkipReason::BlockSizeMismatch {
            event,
            partition: 16,
        };
        assert_eq!(block_size_mismatch(&[]), None);
        assert_eq!(block_size_mismatch(&[(0, SkipReason::Ignored)]), None);
        assert_eq!(
            block_size_mismatch(&[(0, SkipReason::Ignored), (1, m(32)), (2, m(32))]),
            Some((32, 16, 2))
        );
    }

    /// Live messages held during a replay are bounded by count and by bytes.
    #[test]
    fn held_live_messages_are_bounded_by_count_and_bytes() {
        let config = IngestConfig {
            max_held_live_batches: 3,
            max_held_live_bytes: 100,
            ..IngestConfig::default()
        };
        assert!(may_hold(0, 0, &config));
        assert!(may_hold(2, 99, &config));
        assert!(!may_hold(3, 0, &config), "count");
        assert!(!may_hold(1, 100, &config), "bytes");
        let msg = ZmqMessage::try_from(vec![
            Bytes::from_static(b"topic"),
            Bytes::copy_from_slice(&7u64.to_be_bytes()),
            Bytes::from(vec![0u8; 50]),
        ])
        .expect("three frames");
        assert_eq!(message_bytes(&msg), 5 + 8 + 50);
    }

    /// A batch with a few rejected events logs each of them; one with thousands logs a few
    /// and one summary line, so that a publisher cannot flood the log.
    #[test]
    fn refused_batches_are_logged_first_then_at_most_once_per_period() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note(t0), Some(1), "the first refusal is logged at once");
        for _ in 0..999 {
            assert_eq!(log.note(t0 + Duration::from_millis(10)), None);
        }
        // The next line reports every refusal since the last one.
        assert_eq!(log.note(t0 + REFUSAL_LOG_PERIOD), Some(1000));
        assert_eq!(log.note(t0 + REFUSAL_LOG_PERIOD), None);
        assert_eq!(log.note(t0 + REFUSAL_LOG_PERIOD * 3), Some(2));
    }

    #[test]
    fn rejected_events_are_logged_one_by_one_only_up_to_a_few() {
        assert_eq!(rejection_log_lines(0), (0, None));
        assert_eq!(rejection_log_lines(3), (3, None));
        assert_eq!(
            rejection_log_lines(LOGGED_REJECTIONS_PER_BATCH),
            (LOGGED_REJECTIONS_PER_BATCH, None)
        );
        assert_eq!(
            rejection_log_lines(50_000),
            (
                LOGGED_REJECTIONS_PER_BATCH,
                Some(50_000 - LOGGED_REJECTIONS_PER_BATCH)
            )
        );
    }

    #[test]
    fn endpoint_validation_matches_dynamo_wording() {
        for ok in [
            "tcp://127.0.0.1:5557",
            "tcp://localhost:1",
            "tcp://*:5558",
            "tcp://[::1]:5557",
            "ipc:///tmp/x.sock",
            "inproc://events",
        ] {
            assert_eq!(validate_endpoint(ok), Ok(()), "{ok}");
        }
        let msg = |e: &str| validate_endpoint(e).unwrap_err().to_string();
        assert_eq!(
            msg("tcp://127.0.0.1"),
            "invalid ZMQ endpoint `tcp://127.0.0.1`: missing TCP port"
        );
        assert_eq!(
            msg("udp://127.0.0.1:5"),
            "invalid ZMQ endpoint `udp://127.0.0.1:5`: unsupported scheme `udp`"
        );
        assert_eq!(msg("nope"), "invalid ZMQ endpoint `nope`: missing scheme");
        assert!(msg("tcp://h:70000").contains("invalid TCP port"));
        assert!(msg("tcp://::1:5").contains("brackets"));
        assert!(msg("tcp://:5").contains("missing TCP host"));
        let replay = IngestError::InvalidReplayEndpoint(validate_endpoint("nope").unwrap_err());
        assert_eq!(
            replay.to_string(),
            "invalid replay endpoint `nope`: invalid ZMQ endpoint `nope`: missing scheme"
        );
    }

    #[test]
    fn replay_frames_with_and_without_topic() {
        let seq = |s: i64| Bytes::copy_from_slice(&s.to_be_bytes());
        let p = Bytes::from_static(b"\x93\x00\x90\xc0");
        assert_eq!(
            parse_replay_frames(&[Bytes::new(), Bytes::from_static(b"kv"), seq(7), p.clone()]),
            ReplayFrame::Batch {
                seq: 7,
                payload: p.clone()
            }
        );
        assert_eq!(
            parse_replay_frames(&[Bytes::new(), seq(8), p.clone()]),
            ReplayFrame::Batch { seq: 8, payload: p }
        );
        // Terminator of real engines and of older publishers.
        assert_eq!(
            parse_replay_frames(&[Bytes::new(), Bytes::new(), seq(-1), Bytes::new()]),
            ReplayFrame::End
        );
        assert_eq!(
            parse_replay_frames(&[Bytes::new(), seq(-1), Bytes::new()]),
            ReplayFrame::End
        );
        // Malformed replies end the replay too, but are told apart (to be counted).
        assert_eq!(
            parse_replay_frames(&[Bytes::new(), seq(1)]),
            ReplayFrame::Malformed(FrameError::FrameCount(2))
        );
        assert_eq!(
            parse_replay_frames(&[
                Bytes::new(),
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"x")
            ]),
            ReplayFrame::Malformed(FrameError::SeqLength(3))
        );
    }

    /// A ROUTER that answers every replay request with `replies` (the frames of each message
    /// after the requester's identity), then the end marker. Returns its endpoint.
    async fn scripted_router(replies: Vec<Vec<Bytes>>) -> String {
        use zeromq::RouterSocket;
        let mut router = RouterSocket::new();
        let endpoint = router
            .bind("tcp://127.0.0.1:0")
            .await
            .expect("bind")
            .to_string();
        tokio::spawn(async move {
            loop {
                let Ok(msg) = router.recv().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let Some(identity) = msg.into_vec().first().cloned() else {
                    continue;
                };
                for frames in &replies {
                    let mut f = vec![identity.clone()];
                    f.extend(frames.iter().cloned());
                    let m = ZmqMessage::try_from(f).expect("message");
                    if router.send(m).await.is_err() {
                        break;
                    }
                }
                let end = vec![
                    identity,
                    Bytes::new(),
                    Bytes::new(),
                    Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
                    Bytes::new(),
                ];
                let _ = router.send(ZmqMessage::try_from(end).expect("end")).await;
            }
        });
        endpoint
    }

    fn seq_frame(seq: u64) -> Bytes {
        Bytes::copy_from_slice(&seq.to_be_bytes())
    }

    /// The replay byte cap counts every frame of a reply, not only the payload: before, 40
    /// replayed batches with a 32 MiB topic each and a 1-byte payload counted 40 bytes and
    /// held 1.3 GB (each payload kept its read buffer, topic included, alive). Here replies
    /// with a 1 MiB topic stop a replay capped at 3.5 MiB after 3 batches.
    #[tokio::test]
    async fn the_replay_byte_cap_counts_every_frame_of_a_reply() {
        let topic = Bytes::from(vec![b't'; 1 << 20]);
        let replies = (0..10u64)
            .map(|seq| {
                vec![
                    Bytes::new(),
                    topic.clone(),
                    seq_frame(seq),
                    Bytes::from_static(b"\x90"),
                ]
            })
            .collect();
        let endpoint = scripted_router(replies).await;
        let config = IngestConfig {
            replay_max_bytes: (7 << 20) / 2,
            replay_timeout: Duration::from_secs(5),
            ..IngestConfig::default()
        };
        let fetched = fetch_replay(&endpoint, 0, 3, &config).await;
        assert_eq!(
            fetched.error,
            Some(ReplayError::TooLarge(config.replay_max_bytes))
        );
        assert_eq!(fetched.attempts, 1, "a replay over its cap is not retried");
        let seqs: Vec<u64> = fetched.batches.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [0, 1, 2]);
        let per_reply = (1 << 20) + 8 + 1;
        assert_eq!(
            fetched.bytes,
            4 * per_reply,
            "the crossing reply counted too"
        );
        assert!(fetched.batches.iter().all(|(_, p)| p.as_ref() == b"\x90"));
    }

    /// A replay reply of more frames than the message limit is cut off by the frame guard:
    /// the attempt fails at once with the guard's reason and is not retried (it would bring
    /// the same reply), and the batch before it is kept.
    #[tokio::test]
    async fn a_replay_reply_over_the_message_limits_ends_the_replay_with_the_reason() {
        let good = vec![
            Bytes::new(),
            Bytes::from_static(b"kv"),
            seq_frame(0),
            Bytes::from_static(b"\x90"),
        ];
        // One frame more than the limit (the ROUTER strips only the identity).
        let endless = vec![Bytes::new(); frame_guard::DEFAULT_MAX_MESSAGE_FRAMES as usize + 1];
        let endpoint = scripted_router(vec![good, endless]).await;
        let config = IngestConfig {
            // Long enough that only the guard's report can end the attempt in time.
            replay_timeout: Duration::from_secs(60),
            ..IngestConfig::default()
        };
        let fetched = tokio::time::timeout(
            Duration::from_secs(30),
            fetch_replay(&endpoint, 0, 3, &config),
        )
        .await
        .expect("the cut ends the attempt before its timeout");
        match &fetched.error {
            Some(ReplayError::Cut(e)) => {
                assert!(e.contains("multipart message of more than 8 frames"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fetched.attempts, 1);
        let seqs: Vec<u64> = fetched.batches.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, [0], "the reply before the cut is kept");
    }

    #[test]
    fn unconnectable_endpoints_fail_with_dynamo_text() {
        assert_eq!(
            unconnectable("tcp://*:5558").as_deref(),
            Some("failed to connect ZMQ SUB socket to tcp://*:5558: Invalid argument")
        );
        assert!(unconnectable("inproc://x").is_some());
        assert!(unconnectable("tcp://127.0.0.1:5").is_none());
    }
}
