//! `GET /dump` (SERVICE.md §3.8): every partition as `"<model>:<group>": {"block_size", "events"}`
//! in Dynamo's RouterEvent shape, plus explicit `model_name` / `routing_group` fields so names
//! containing `:` survive a peer recovery (Dynamo's parser ignores them).
//!
//! A dump is streamed one partition at a time (`super::dump_stream`): it holds about one
//! partition's events at once, not the whole dump. Still, a dump costs a build per partition and
//! a connection for as long as its client takes, so at most `--http-max-dumps` are built or sent
//! at once. A slot is taken before the first build and held until the response has been sent
//! or dropped (client gone), and, when a build is running on a blocking thread by then, until
//! that build has ended. A request beyond the limit waits for a slot, up to
//! `--http-dump-wait-ms` ([`DEFAULT_DUMP_WAIT`], below the 10 s a recovering peer gives a peer),
//! and is answered `503` (`Retry-After: 1`) and counted if none frees up: a recovering Dynamo
//! peer then moves on to its next peer, a kvindex peer retries. A client that stops reading its
//! dump is cut off by the write deadline (`super::connections`); one that reads, but too slowly
//! to finish within `--http-dump-timeout-s` ([`DEFAULT_DUMP_TIMEOUT`]), by the dump's own
//! deadline (`super::response_deadline`), counted in [`DUMP_TIMEOUTS_TOTAL`]. Either frees the
//! slot.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kvindex_engine::RouterEvent;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::dump_stream::{BuildPartition, DumpBody};
use super::response_deadline::ResponseDeadline;
use super::SharedState;
use crate::partitions::Partition;

/// Default `--http-max-dumps`.
pub const DEFAULT_MAX_DUMPS: usize = 2;
/// Gauge: `/dump` responses being built or sent.
pub const DUMPS_IN_PROGRESS: &str = "kvindex_http_dumps_in_progress";
/// Counter: `/dump` requests refused (503) because `--http-max-dumps` were in progress.
pub const DUMPS_REFUSED_TOTAL: &str = "kvindex_http_dumps_refused_total";
/// Gauge: `/dump` requests waiting for a slot.
pub const DUMPS_WAITING: &str = "kvindex_http_dumps_waiting";
/// Counter: `/dump` responses cut off because they were not sent within `--http-dump-timeout-s`.
pub const DUMP_TIMEOUTS_TOTAL: &str = "kvindex_http_dump_timeouts_total";
/// Default `--http-dump-wait-ms`: how long a `/dump` beyond `--http-max-dumps` waits for a slot
/// before it is answered 503. Half the 10 s a recovering peer (Dynamo's or ours) gives one
/// peer, so that replicas starting together get their dumps one after the other instead of
/// recovering nothing.
pub const DEFAULT_DUMP_WAIT: Duration = Duration::from_secs(5);
/// Default `--http-dump-timeout-s`: how long one `/dump` response may take, from its slot to
/// its last byte. Generous (a dump of a large index is hundreds of MiB), but a bound: a client
/// reading slowly, never slowly enough for the write deadline, cannot keep a slot forever.
pub const DEFAULT_DUMP_TIMEOUT: Duration = Duration::from_secs(300);

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_gauge!(
        DUMPS_IN_PROGRESS,
        "GET /dump responses being built or sent (at most --http-max-dumps)"
    );
    metrics::describe_counter!(
        DUMPS_REFUSED_TOTAL,
        "GET /dump requests answered 503 because --http-max-dumps dumps were being built or sent for --http-dump-wait-ms"
    );
    metrics::describe_gauge!(
        DUMPS_WAITING,
        "GET /dump requests waiting (at most --http-dump-wait-ms) for one of --http-max-dumps slots"
    );
    metrics::describe_counter!(
        DUMP_TIMEOUTS_TOTAL,
        "GET /dump responses cut off (connection closed, slot freed) because they were not sent within --http-dump-timeout-s"
    );
}

/// How many dumps may be built or sent at once, how long a request waits for a slot, and how
/// long a dump may take.
#[derive(Debug, Clone)]
pub struct DumpLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a request waits for a slot.
    wait: Duration,
    /// How long a response may take, from its slot to its last byte.
    timeout: Duration,
    hold: Arc<BuildHold>,
}

impl DumpLimit {
    /// At most `max` (at least 1) dumps at once, with the default wait and timeout.
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        DumpLimit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            wait: DEFAULT_DUMP_WAIT,
            timeout: DEFAULT_DUMP_TIMEOUT,
            hold: Arc::default(),
        }
    }

    /// A request waits at most `wait` for a slot (`--http-dump-wait-ms`; zero: refused at once).
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// A response is cut off once it has taken `timeout` (`--http-dump-timeout-s`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A slot, waiting for one up to `--http-dump-wait-ms` when all are taken; `None` if none
    /// freed up in time.
    async fn slot(&self) -> Option<Slot> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(Slot::new(permit));
        }
        let _waiting = WaitingGauge::new();
        // The semaphore is fair: waiting requests get slots in their order of arrival.
        let acquired = tokio::time::timeout(self.wait, Arc::clone(&self.slots).acquire_owned());
        match acquired.await {
            Ok(Ok(permit)) => Some(Slot::new(permit)),
            // Timed out (or the semaphore closed, which it never is).
            _ => None,
        }
    }

    /// Test route `POST /test/hold_dumps`: partition builds started from now on (of dumps in
    /// progress too) wait, before they read the index, until [`Self::release_builds`] (tests
    /// make a build last as long as they need, without timing).
    pub fn hold_builds(&self) {
        self.hold.set(true);
    }

    /// Test route `POST /test/release_dumps`: held dump builds go on.
    pub fn release_builds(&self) {
        self.hold.set(false);
    }
}

/// Whether dump builds are held (test routes only; never set otherwise).
#[derive(Debug, Default)]
struct BuildHold {
    held: Mutex<bool>,
    released: Condvar,
}

impl BuildHold {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.released.notify_all();
    }

    /// Block (a blocking-pool thread) while builds are held.
    fn wait(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A request waiting for a slot, counted in [`DUMPS_WAITING`] while it waits.
struct WaitingGauge;

impl WaitingGauge {
    fn new() -> Self {
        metrics::gauge!(DUMPS_WAITING).increment(1.0);
        WaitingGauge
    }
}

impl Drop for WaitingGauge {
    fn drop(&mut self) {
        metrics::gauge!(DUMPS_WAITING).decrement(1.0);
    }
}

/// A slot of the [`DumpLimit`], counted in the gauge while held.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!(DUMPS_IN_PROGRESS).increment(1.0);
        Slot { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(DUMPS_IN_PROGRESS).decrement(1.0);
    }
}

/// Builds a dump's partitions, holding the dump's slot: shared by the response body and by a
/// build running on a blocking thread, the slot is free again once both are gone (the response
/// sent or dropped with its connection, the build ended).
struct PartitionBuilder {
    _slot: Slot,
    hold: Arc<BuildHold>,
}

impl BuildPartition for PartitionBuilder {
    fn build(&self, partition: &Partition) -> Result<Vec<RouterEvent>, String> {
        self.hold.wait();
        match &partition.namespace {
            None => Ok(Vec::new()),
            Some(ns) => ns.dump().map_err(|e| e.to_string()),
        }
    }
}

/// `GET /dump`.
pub async fn dump(
    State(state): State<SharedState>,
    deadline: Option<Extension<ResponseDeadline>>,
) -> Response {
    let limit = &state.dumps;
    let Some(slot) = limit.slot().await else {
        metrics::counter!(DUMPS_REFUSED_TOTAL).increment(1);
        tracing::warn!(
            max = limit.max,
            waited_ms = limit.wait.as_millis(),
            "GET /dump refused: --http-max-dumps dumps in progress"
        );
        let body = json!({
            "error": format!(
                "too many dumps in progress (at most {} at once, --http-max-dumps); retry later",
                limit.max
            )
        });
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            axum::Json(body),
        )
            .into_response();
    };
    let at = tokio::time::Instant::now() + limit.timeout;
    // Outside a served connection (handler tests) there is none: the body's own deadline then
    // acts whenever the body is asked for more.
    let armed = deadline.map(|Extension(d)| d.arm(at));
    let view = state.partitions.view();
    let mut parts: Vec<Partition> = view.partitions.values().cloned().collect();
    parts.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
    let builder = Arc::new(PartitionBuilder {
        _slot: slot,
        hold: Arc::clone(&limit.hold),
    });
    let body = DumpBody::new(parts, builder, at, limit.timeout, armed);
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::new(body),
    )
        .into_response()
}

/// `POST /test/hold_dumps` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`): partition builds of
/// dumps wait until `POST /test/release_dumps`.
pub async fn hold_dumps(State(state): State<SharedState>) -> Response {
    state.dumps.hold_builds();
    axum::Json(json!({"status": "ok"})).into_response()
}

/// `POST /test/release_dumps` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`).
pub async fn release_dumps(State(state): State<SharedState>) -> Response {
    state.dumps.release_builds();
    axum::Json(json!({"status": "ok"})).into_response()
}
