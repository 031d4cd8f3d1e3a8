//! The HTTP API (SERVICE.md §3): Dynamo's routes, status codes, bodies and limits, plus kvindex's
//! `POST /events`. `routes.rs` assembles the router; one file per group of handlers.

use std::sync::Arc;

use axum::http::HeaderName;
use kvindex_persistence::DurableIndex;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::access_log::AccessLog;
use crate::ingest::Ingest;
use crate::partitions::Partitions;

pub mod body_budget;
pub mod connections;
pub mod dump;
mod dump_stream;
pub mod errors;
pub mod events;
mod handlers;
mod observe;
pub mod query;
pub mod response_deadline;
pub mod routes;
#[cfg(test)]
pub(crate) mod unregister_race;

/// Body limit of `/query`, `/query_by_hash` and `/events` (about a million tokens as JSON).
pub const LARGE_BODY_LIMIT: usize = 8 << 20;
/// Body limit of every other route (axum's default).
pub const DEFAULT_BODY_LIMIT: usize = 2 << 20;

/// What every handler can reach.
pub struct AppState {
    pub partitions: Arc<Partitions>,
    pub ingest: Arc<Ingest>,
    pub durable: Arc<DurableIndex>,
    pub metrics: Option<PrometheusHandle>,
    pub access_log: Option<Arc<AccessLog>>,
    pub trace_header: HeaderName,
    pub test_endpoints: bool,
    /// Bounds the `POST /events` bodies read and decoded at once.
    pub events_budget: body_budget::BodyBudget,
    /// Bounds the `POST /query` and `POST /query_by_hash` bodies read and decoded at once.
    pub query_budget: body_budget::BodyBudget,
    /// Bounds the `GET /dump` responses built or sent at once.
    pub dumps: dump::DumpLimit,
    /// Events (`?block_size=`, `Kvindex-Block-Size`) create a partition only while fewer
    /// partitions than this have no registered worker (`--max-event-partitions`).
    pub max_event_partitions: usize,
}

/// Default `--max-event-partitions`.
pub const DEFAULT_MAX_EVENT_PARTITIONS: usize = 256;

/// Shared state handle.
pub type SharedState = Arc<AppState>;

/// Response extension naming the model a request concerned (for the access log).
#[derive(Clone, Debug)]
pub struct ModelLabel(pub String);
