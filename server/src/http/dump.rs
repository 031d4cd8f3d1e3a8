//! `GET /dump` (SERVICE.md §3.8): every partition as `"<model>:<group>": {"block_size", "events"}`
//! in Dynamo's RouterEvent shape, plus explicit `model_name` / `routing_group` fields so names
//! containing `:` survive a peer recovery (Dynamo's parser ignores them).
//!
//! A dump is built whole in memory (many MiB for a large index) and held until the client has
//! read it, so at most `--http-max-dumps` are built or sent at once. A slot is taken before the
//! build and held until the build has ended (even when the client went away meanwhile) and then
//! until the dump is sent. A request beyond the limit waits for a slot, up to
//! [`DUMP_SLOT_WAIT`] (below the 10 s a recovering peer gives a peer), and is answered `503`
//! (`Retry-After: 1`) and counted if none frees up: a recovering Dynamo peer then moves on to
//! its next peer, a kvindex peer retries. A client that stops reading its dump is cut off by
//! the write deadline (`super::connections`), which frees the dump and its slot.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kvindex_engine::RouterEvent;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::errors::ApiError;
use super::SharedState;

/// Default `--http-max-dumps`.
pub const DEFAULT_MAX_DUMPS: usize = 2;
/// Gauge: `/dump` responses being built or sent.
pub const DUMPS_IN_PROGRESS: &str = "kvindex_http_dumps_in_progress";
/// Counter: `/dump` requests refused (503) because `--http-max-dumps` were in progress.
pub const DUMPS_REFUSED_TOTAL: &str = "kvindex_http_dumps_refused_total";
/// Gauge: `/dump` requests waiting for a slot.
pub const DUMPS_WAITING: &str = "kvindex_http_dumps_waiting";
/// How long a `/dump` beyond `--http-max-dumps` waits for a slot before it is answered 503:
/// half the 10 s a recovering peer (Dynamo's or ours) gives one peer, so that replicas
/// starting together get their dumps one after the other instead of recovering nothing.
pub const DUMP_SLOT_WAIT: Duration = Duration::from_secs(5);

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_gauge!(
        DUMPS_IN_PROGRESS,
        "GET /dump responses being built or sent (at most --http-max-dumps)"
    );
    metrics::describe_counter!(
        DUMPS_REFUSED_TOTAL,
        "GET /dump requests answered 503 because --http-max-dumps dumps were being built or sent for 5 s"
    );
    metrics::describe_gauge!(
        DUMPS_WAITING,
        "GET /dump requests waiting (at most 5 s) for one of --http-max-dumps slots"
    );
}

/// How many dumps may be built or sent at once.
#[derive(Debug, Clone)]
pub struct DumpLimit {
    slots: Arc<Semaphore>,
    max: usize,
    /// How long a request waits for a slot.
    wait: Duration,
    hold: Arc<BuildHold>,
}

impl DumpLimit {
    /// At most `max` (at least 1) dumps at once.
    pub fn new(max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        DumpLimit {
            slots: Arc::new(Semaphore::new(max)),
            max,
            wait: DUMP_SLOT_WAIT,
            hold: Arc::default(),
        }
    }

    /// A slot, waiting for one up to [`DUMP_SLOT_WAIT`] when all are taken; `None` if none
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

    /// Test route `POST /test/hold_dumps`: dump builds started from now on wait, before they
    /// read the index, until [`Self::release_builds`] (tests make a build last as long as they
    /// need, without timing).
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

/// A dump's bytes, owning their slot: the slot is free again only once the bytes are gone
/// (written, or dropped with the connection), wherever hyper keeps them meanwhile.
struct DumpBytes {
    json: String,
    _slot: Slot,
}

impl AsRef<[u8]> for DumpBytes {
    fn as_ref(&self) -> &[u8] {
        self.json.as_bytes()
    }
}

/// One partition of the dump (Dynamo's fields first).
#[derive(Serialize)]
struct DumpEntry<'a> {
    block_size: u32,
    events: Vec<RouterEvent>,
    model_name: &'a str,
    routing_group: &'a str,
}

/// `GET /dump`.
pub async fn dump(State(state): State<SharedState>) -> Response {
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
    let view = state.partitions.view();
    let mut parts: Vec<_> = view.partitions.values().cloned().collect();
    parts.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
    // Written by hand so that each entry keeps its field order (a `serde_json::Value` would
    // sort the keys of every object, RouterEvents included). The slot goes into the build and
    // comes back with its result: a client that goes away during the build drops this handler,
    // not the build (a blocking task runs to its end), so the slot must last as long as the
    // build does.
    let hold = Arc::clone(&limit.hold);
    let result = tokio::task::spawn_blocking(move || {
        hold.wait();
        let mut out = String::from("{");
        for (i, p) in parts.iter().enumerate() {
            let key = &p.spec.key;
            let entry = match &p.namespace {
                None => Ok(Vec::new()),
                Some(ns) => ns.dump().map_err(|e| e.to_string()),
            }
            .and_then(|events| {
                serde_json::to_string(&DumpEntry {
                    block_size: p.spec.block_size,
                    events,
                    model_name: &key.model_name,
                    routing_group: &key.routing_group,
                })
                .map_err(|e| e.to_string())
            });
            let value = entry.unwrap_or_else(|e| json!({ "error": e }).to_string());
            if i > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(key.to_string()).to_string());
            out.push(':');
            out.push_str(&value);
        }
        out.push('}');
        (out, slot)
    })
    .await;
    match result {
        Ok((json, slot)) => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(Bytes::from_owner(DumpBytes { json, _slot: slot })),
        )
            .into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// `POST /test/hold_dumps` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`): dump builds wait until
/// `POST /test/release_dumps`.
pub async fn hold_dumps(State(state): State<SharedState>) -> Response {
    state.dumps.hold_builds();
    axum::Json(json!({"status": "ok"})).into_response()
}

/// `POST /test/release_dumps` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`).
pub async fn release_dumps(State(state): State<SharedState>) -> Response {
    state.dumps.release_builds();
    axum::Json(json!({"status": "ok"})).into_response()
}
