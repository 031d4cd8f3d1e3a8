//! `GET /dump` (SERVICE.md §3.8): every partition as `"<model>:<group>": {"block_size", "events"}`
//! in Dynamo's RouterEvent shape, plus explicit `model_name` / `routing_group` fields so names
//! containing `:` survive a peer recovery (Dynamo's parser ignores them).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use kvindex_engine::RouterEvent;
use serde::Serialize;
use serde_json::{json, Value};

use super::errors::ApiError;
use super::SharedState;

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
    let view = state.partitions.view();
    let mut parts: Vec<_> = view.partitions.values().cloned().collect();
    parts.sort_by(|a, b| a.spec.key.cmp(&b.spec.key));
    // Written by hand so that each entry keeps its field order (a `serde_json::Value` would
    // sort the keys of every object, RouterEvents included).
    let result = tokio::task::spawn_blocking(move || {
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
        out
    })
    .await;
    match result {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}
