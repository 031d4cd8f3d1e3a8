//! `POST /query` and `POST /query_by_hash` (SERVICE.md §3.6, §3.7): tokens (or local hashes) →
//! a lock-free walk of the partition's device tree, continued through the lower tiers
//! (host_pinned, disk, external; §6.4) → Dynamo's `{scores, frequencies, instances}`, in tokens,
//! plus `log_lsn` (ours, ignored by Dynamo clients).

use std::collections::BTreeMap;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvindex_engine::hashing::HashOptions;
use kvindex_engine::{LocalBlockHash, Namespace, TieredScores};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::errors::ApiError;
use super::handlers::with_model;
use super::{AppState, SharedState, LARGE_BODY_LIMIT};

/// Body of `POST /query` (`tenant_id`, `medium`, `instance_id`, ... ignored).
#[derive(Deserialize)]
pub struct QueryRequest {
    token_ids: Vec<u32>,
    model_name: String,
    routing_group: Option<String>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
}

/// Body of `POST /query_by_hash`.
#[derive(Deserialize)]
pub struct QueryByHashRequest {
    block_hashes: Vec<i64>,
    model_name: String,
    routing_group: Option<String>,
    cache_salt: Option<Value>,
}

/// Message of the 400 for a `cache_salt` on `/query_by_hash` (Dynamo's wording).
pub const CACHE_SALT_REFUSED: &str = "cache_salt is not accepted by /query_by_hash; block_hashes must already include the intended cache salt";

/// One instance of `instances` (Mooncake RFC shape, lowercase as in Dynamo).
#[derive(Serialize)]
struct InstanceScore {
    longest_matched: u64,
    gpu: u64,
    dp: BTreeMap<String, u64>,
    cpu: u64,
    disk: u64,
}

/// Dynamo's `ScoreResponse`, field order kept, plus kvindex's `log_lsn`.
#[derive(Serialize)]
pub struct ScoreResponse {
    scores: BTreeMap<String, BTreeMap<String, u64>>,
    frequencies: [u64; 0],
    instances: BTreeMap<String, InstanceScore>,
    /// The last LSN appended when the query started: every event acknowledged by `POST /events`
    /// before the query has an LSN at or below it and is reflected in the answer.
    log_lsn: u64,
}

/// Dynamo's response body for a tiered match on a partition of `block_size` (SERVICE.md §3.6):
/// `scores` is device-only; `instances[id]` has `dp` (device tokens per rank, 0 for a rank matched
/// only on lower tiers), `gpu`, and the cumulative `cpu` (device + host_pinned) and `disk`
/// (+ disk + external), with `longest_matched = disk`.
pub fn score_body(scores: &TieredScores, block_size: u32, log_lsn: u64) -> ScoreResponse {
    let bs = u64::from(block_size);
    let tokens = |blocks: u32| u64::from(blocks) * bs;
    let mut score_map: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (w, blocks) in &scores.device.scores {
        score_map
            .entry(w.worker_id.to_string())
            .or_default()
            .insert(w.dp_rank.to_string(), tokens(*blocks));
    }
    let instances = scores
        .by_instance()
        .into_iter()
        .map(|(id, i)| {
            (
                id.to_string(),
                InstanceScore {
                    longest_matched: tokens(i.disk),
                    gpu: tokens(i.gpu),
                    dp: i
                        .dp
                        .iter()
                        .map(|(r, d)| (r.to_string(), tokens(*d)))
                        .collect(),
                    cpu: tokens(i.cpu),
                    disk: tokens(i.disk),
                },
            )
        })
        .collect();
    ScoreResponse {
        scores: score_map,
        frequencies: [],
        instances,
        log_lsn,
    }
}

fn last_lsn(state: &AppState) -> u64 {
    state.durable.log().next_lsn().saturating_sub(1)
}

/// The answer to a token query on partition `(model, group)`: the core of `POST /query`,
/// shared with the NATS request/reply transport.
pub fn answer_tokens(
    state: &AppState,
    model: &str,
    group: &str,
    token_ids: &[u32],
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> Result<ScoreResponse, ApiError> {
    answer_on(state, model, group, |ns| {
        ns.find_matches_tiered_for_tokens(
            token_ids,
            &HashOptions {
                lora_name,
                cache_namespace: cache_salt,
                ..HashOptions::default()
            },
        )
    })
}

/// The answer to a local-hash query on partition `(model, group)`: the core of
/// `POST /query_by_hash`, shared with the NATS transport. A non-null `cache_salt` is refused
/// before the partition lookup, as in Dynamo.
pub fn answer_hashes(
    state: &AppState,
    model: &str,
    group: &str,
    block_hashes: &[i64],
    cache_salt: Option<&Value>,
) -> Result<ScoreResponse, ApiError> {
    if cache_salt.is_some_and(|v| !v.is_null()) {
        return Err(ApiError::BadRequest(CACHE_SALT_REFUSED.into()));
    }
    answer_on(state, model, group, |ns| {
        let locals: Vec<LocalBlockHash> = block_hashes
            .iter()
            .map(|&h| LocalBlockHash(h as u64))
            .collect();
        ns.find_matches_tiered(&locals)
    })
}

/// Score partition `(model, group)` with `find` on its namespace (a partition with no
/// namespace yet scores nothing), stamped with the last LSN read before the lookup.
fn answer_on(
    state: &AppState,
    model: &str,
    group: &str,
    find: impl FnOnce(&Namespace) -> TieredScores,
) -> Result<ScoreResponse, ApiError> {
    let lsn = last_lsn(state);
    let view = state.partitions.view();
    let part = view.partition(model, group)?;
    let scores = part.namespace.as_ref().map(find).unwrap_or_default();
    Ok(score_body(&scores, part.spec.block_size, lsn))
}

/// The request's routing group, or the default one when it names none.
fn group_or_default(group: Option<&str>) -> &str {
    group.unwrap_or(crate::config::DEFAULT_GROUP)
}

fn respond(model: &str, answer: Result<ScoreResponse, ApiError>) -> Response {
    match answer {
        Ok(body) => with_model(model, Json(body)),
        Err(e) => with_model(model, e),
    }
}

/// Middleware of `POST /query` and `POST /query_by_hash`: the body's bytes are claimed from the
/// query body budget as they arrive (`super::body_budget`), and given back once answered. A
/// request whose body deadline passed while it waited for the budget is answered `503` (the
/// JSON extractor's `400` replaced).
pub async fn budgeted(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let (req, claim) = state.query_budget.wrap(req, LARGE_BODY_LIMIT);
    let response = next.run(req).await;
    let busy = claim.budget_timeout();
    drop(claim);
    match busy {
        Some(e) => ApiError::from(e).into_response(),
        None => response,
    }
}

/// `POST /query`.
pub async fn query(State(state): State<SharedState>, Json(req): Json<QueryRequest>) -> Response {
    let answer = answer_tokens(
        &state,
        &req.model_name,
        group_or_default(req.routing_group.as_deref()),
        &req.token_ids,
        req.lora_name.as_deref(),
        req.cache_salt.as_deref(),
    );
    respond(&req.model_name, answer)
}

/// `POST /query_by_hash`: the values are Dynamo local block hashes as i64, walked from the root.
pub async fn query_by_hash(
    State(state): State<SharedState>,
    Json(req): Json<QueryByHashRequest>,
) -> Response {
    let answer = answer_hashes(
        &state,
        &req.model_name,
        group_or_default(req.routing_group.as_deref()),
        &req.block_hashes,
        req.cache_salt.as_ref(),
    );
    respond(&req.model_name, answer)
}
