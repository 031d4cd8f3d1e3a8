//! Queries over NATS request/reply: `<prefix>.query.<model>.<group>` (a `POST /query` body) and
//! `<prefix>.query_by_hash.<model>.<group>` (a `POST /query_by_hash` body), subscribed in a
//! queue group so that the processes of one group share the requests. The subject names the
//! partition; `model_name` / `routing_group` in the body are optional and, when present, must
//! match it. The reply is the JSON body the HTTP route answers (the same `ScoreResponse`, or
//! `{"error": ...}` with the same text), with a `Kvindex-Status` header holding the HTTP status
//! the route would have used. Requests are answered concurrently. The answers come from the HTTP handlers' own core
//! ([`answer_tokens`], [`answer_hashes`]).

use std::sync::Arc;

use async_nats::{Client, HeaderMap, Subscriber};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::metrics::{QUERIES, SUBSCRIPTION_UP};
use super::{backoff, connected, stopped};
use crate::http::errors::ApiError;
use crate::http::query::{answer_hashes, answer_tokens, CACHE_SALT_REFUSED};
use crate::http::{AppState, SharedState};
use kvindex_engine::NamespaceKey;
use kvindex_server::nats_subjects::{QueryKind, Subjects};

/// Query requests of one subscription answered at once; more wait in the subscription.
pub(super) const MAX_INFLIGHT_QUERIES: usize = 256;

/// Reap the finished tasks of `inflight`, then wait until fewer than `limit` are running.
async fn admit(inflight: &mut tokio::task::JoinSet<()>, limit: usize) {
    while inflight.try_join_next().is_some() {}
    while inflight.len() >= limit.max(1) {
        if inflight.join_next().await.is_none() {
            break;
        }
    }
}

/// Reply header carrying the HTTP status the route would have answered with.
pub const STATUS_HEADER: &str = "Kvindex-Status";

/// A `POST /query` body whose partition comes from the subject.
#[derive(Deserialize)]
struct TokenRequest {
    token_ids: Vec<u32>,
    model_name: Option<String>,
    routing_group: Option<String>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
}

/// A `POST /query_by_hash` body whose partition comes from the subject.
#[derive(Deserialize)]
struct HashRequest {
    block_hashes: Vec<i64>,
    model_name: Option<String>,
    routing_group: Option<String>,
    cache_salt: Option<Value>,
}

/// A request that could not be answered: HTTP-equivalent status and message.
struct Refusal {
    status: u16,
    message: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status().as_u16(),
            message: e.to_string(),
        }
    }
}

/// Decode like axum's `Json` extractor, with its messages (400 syntax, 422 data).
fn parse_body<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        if e.inner().classify() == serde_json::error::Category::Data {
            Refusal {
                status: 422,
                message: format!("Failed to deserialize the JSON body into the target type: {e}"),
            }
        } else {
            Refusal {
                status: 400,
                message: format!("Failed to parse the request body as JSON: {e}"),
            }
        }
    })?;
    de.end().map_err(|e| Refusal {
        status: 400,
        message: format!("Failed to parse the request body as JSON: {e}"),
    })?;
    Ok(value)
}

fn check_partition(
    key: &NamespaceKey,
    model: Option<&str>,
    group: Option<&str>,
) -> Result<(), Refusal> {
    let mismatch = |field: &str, body: &str, subject: &str| Refusal {
        status: 400,
        message: format!("{field} `{body}` does not match the subject's `{subject}`"),
    };
    if let Some(m) = model.filter(|m| *m != key.model_name) {
        return Err(mismatch("model_name", m, &key.model_name));
    }
    if let Some(g) = group.filter(|g| *g != key.routing_group) {
        return Err(mismatch("routing_group", g, &key.routing_group));
    }
    Ok(())
}

fn answer(
    state: &AppState,
    subjects: &Subjects,
    kind: QueryKind,
    subject: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Refusal> {
    let key = subjects.parse_query(kind, subject).map_err(|e| Refusal {
        status: 400,
        message: e.to_string(),
    })?;
    let (m, g) = (key.model_name.as_str(), key.routing_group.as_str());
    let body = match kind {
        QueryKind::Tokens => {
            let req: TokenRequest = parse_body(payload)?;
            check_partition(
                &key,
                req.model_name.as_deref(),
                req.routing_group.as_deref(),
            )?;
            answer_tokens(
                state,
                m,
                g,
                &req.token_ids,
                req.lora_name.as_deref(),
                req.cache_salt.as_deref(),
            )?
        }
        QueryKind::Hashes => {
            let req: HashRequest = parse_body(payload)?;
            if req.cache_salt.as_ref().is_some_and(|v| !v.is_null()) {
                // Dynamo refuses a salt before looking at the partition.
                return Err(ApiError::BadRequest(CACHE_SALT_REFUSED.into()).into());
            }
            check_partition(
                &key,
                req.model_name.as_deref(),
                req.routing_group.as_deref(),
            )?;
            answer_hashes(state, m, g, &req.block_hashes, req.cache_salt.as_ref())?
        }
    };
    serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()).into())
}

async fn reply(
    client: &Client,
    state: &AppState,
    subjects: &Subjects,
    kind: QueryKind,
    m: async_nats::Message,
) {
    let Some(to) = m.reply.clone() else {
        metrics::counter!(QUERIES, "kind" => kind.as_str(), "outcome" => "no_reply").increment(1);
        tracing::warn!(subject = %m.subject, "NATS query without a reply subject ignored");
        return;
    };
    let (status, body, outcome) = match answer(state, subjects, kind, &m.subject, &m.payload) {
        Ok(body) => (200u16, body, "ok"),
        Err(r) => (
            r.status,
            serde_json::json!({ "error": r.message })
                .to_string()
                .into_bytes(),
            "error",
        ),
    };
    metrics::counter!(QUERIES, "kind" => kind.as_str(), "outcome" => outcome).increment(1);
    let mut headers = HeaderMap::new();
    headers.insert(STATUS_HEADER, status.to_string().as_str());
    if let Err(e) = client.publish_with_headers(to, headers, body.into()).await {
        tracing::warn!(error = %e, "NATS query reply not sent");
    }
}

async fn subscribe(
    client: &Client,
    subject: &str,
    group: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Subscriber> {
    let mut attempt = 0u32;
    loop {
        match client
            .queue_subscribe(subject.to_owned(), group.to_owned())
            .await
        {
            Ok(s) => return Some(s),
            Err(e) => {
                attempt += 1;
                let wait = backoff(attempt);
                tracing::warn!(error = %e, %subject, retry_in_ms = wait.as_millis() as u64, "NATS query subscription failed");
                tokio::select! {
                    _ = stopped(shutdown) => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Answer `kind` requests until shutdown; then drain (requests already received are answered).
pub async fn run(
    client: Client,
    kind: QueryKind,
    group: String,
    subjects: Arc<Subjects>,
    state: SharedState,
    mut shutdown: watch::Receiver<bool>,
) {
    let subject = subjects.query_wildcard(kind);
    let Some(mut sub) = subscribe(&client, &subject, &group, &mut shutdown).await else {
        return;
    };
    // Once the server has answered a ping, it has the subscription.
    tokio::select! {
        _ = stopped(&mut shutdown) => {}
        _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()) => {}
    }
    tracing::info!(%subject, queue_group = %group, "NATS query subscription started");
    metrics::gauge!(SUBSCRIPTION_UP, "subscription" => kind.as_str()).set(1.0);
    let mut draining = false;
    let mut inflight = tokio::task::JoinSet::new();
    loop {
        let next = if draining {
            sub.next().await
        } else {
            let next = tokio::select! {
                _ = stopped(&mut shutdown) => None,
                m = sub.next() => Some(m),
            };
            match next {
                Some(m) => m,
                None => {
                    if !connected(&client) {
                        // Nothing can arrive, and a drain would wait for the server.
                        break;
                    }
                    draining = true;
                    if let Err(e) = sub.drain().await {
                        tracing::warn!(error = %e, "draining the NATS query subscription");
                        break;
                    }
                    continue;
                }
            }
        };
        let Some(m) = next else { break };
        // Requests are answered concurrently (each walk is lock-free), at most
        // MAX_INFLIGHT_QUERIES at once: past that, this loop waits for one to finish, and the
        // backlog stays in the subscription's bounded channel (NATS then reports this consumer
        // as slow) instead of growing a task set without bound.
        admit(&mut inflight, MAX_INFLIGHT_QUERIES).await;
        let (client, state, subjects) = (client.clone(), Arc::clone(&state), Arc::clone(&subjects));
        inflight.spawn(async move { reply(&client, &state, &subjects, kind, m).await });
    }
    while inflight.join_next().await.is_some() {}
    metrics::gauge!(SUBSCRIPTION_UP, "subscription" => kind.as_str()).set(0.0);
    tracing::info!(%subject, "NATS query subscription stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `admit` returns at once below the limit, waits at it, and returns once a running
    /// request finishes.
    #[tokio::test]
    async fn admit_waits_while_the_limit_is_reached() {
        let mut inflight = tokio::task::JoinSet::new();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (_hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        inflight.spawn(async move {
            let _ = release_rx.await;
        });
        inflight.spawn(async move {
            let _ = hold_rx.await;
        });
        // Below the limit: no wait.
        admit(&mut inflight, 3).await;
        assert_eq!(inflight.len(), 2);
        // At the limit, with both requests still running: pending.
        let waited = tokio::select! {
            biased;
            _ = admit(&mut inflight, 2) => false,
            _ = std::future::ready(()) => true,
        };
        assert!(waited, "admit must wait while the limit is reached");
        // One finishes: admitted, and the finished task is reaped.
        release_tx.send(()).expect("the task is waiting");
        tokio::time::timeout(std::time::Duration::from_secs(60), admit(&mut inflight, 2))
            .await
            .expect("admit returns once a request finished");
        assert_eq!(inflight.len(), 1);
    }
}
