//! Middleware around every mounted route except `/metrics`: Dynamo's request metrics (matched
//! route template as `endpoint`; unknown paths are not counted) and the access log.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::{ModelLabel, SharedState};
use crate::access_log::AccessRecord;
use crate::metrics::{status_class, ERRORS_TOTAL, REQUESTS_TOTAL, REQUEST_DURATION};

/// Count, time and log one request.
pub async fn observe(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let Some(endpoint) = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
    else {
        return next.run(req).await;
    };
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let trace_id = req
        .headers()
        .get(&state.trace_header)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    metrics::histogram!(REQUEST_DURATION, "endpoint" => endpoint.clone())
        .record(elapsed.as_secs_f64());
    metrics::counter!(REQUESTS_TOTAL, "endpoint" => endpoint.clone(), "method" => method.clone())
        .increment(1);
    if let Some(class) = status_class(status) {
        metrics::counter!(ERRORS_TOTAL, "endpoint" => endpoint, "status_class" => class)
            .increment(1);
    }
    if let Some(log) = &state.access_log {
        let model = response
            .extensions()
            .get::<ModelLabel>()
            .map_or("-", |m| m.0.as_str());
        log.write(&AccessRecord {
            ts: log.timestamp(),
            trace_id: trace_id.as_deref().unwrap_or("-"),
            method: &method,
            path: &path,
            model,
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
        });
    }
    response
}
