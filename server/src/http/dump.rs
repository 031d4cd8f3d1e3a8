//! `GET /dump` (SERVICE.md §3.8): every partition as `"<model>:<group>": {"block_size", "events"}`
//! in Dynamo's RouterEvent shape, plus explicit `model_name` / `routing_group` fields so names
//! containing `:` survive a peer recovery (Dynamo's parser ignores them).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::SharedState;

/// `GET /dump`.
pub async fn dump(State(state): State<SharedState>) -> Response {
    let view = state.partitions.view();
    let mut parts: Vec<_> = view.partitions.values().cloned().collect();
    parts.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
    let result = tokio::task::spawn_blocking(move || {
        let mut out = serde_json::Map::new();
        for p in parts {
            let key = &p.spec.key;
            let entry = match &p.namespace {
                None => Ok(Vec::new()),
                Some(ns) => ns.dump().map_err(|e| e.to_string()),
            }
            .and_then(|events| {
                events
                    .iter()
                    .map(serde_json::to_value)
                    .collect::<Result<Vec<Value>, _>>()
                    .map_err(|e| e.to_string())
            });
            let value = match entry {
                Ok(events) => json!({
                    "block_size": p.spec.block_size,
                    "events": events,
                    "model_name": key.model_name,
                    "routing_group": key.routing_group,
                }),
                Err(e) => json!({"error": e}),
            };
            out.insert(key.to_string(), value);
        }
        Value::Object(out)
    })
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}
