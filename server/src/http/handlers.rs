//! Registration, worker listing, peers, logs, health, metrics and the test-only listener routes
//! (SERVICE.md §3.2–§3.5, §3.9–§3.12).

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use kvindex_engine::NamespaceKey;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::errors::ApiError;
use super::{ModelLabel, SharedState};
use crate::endpoint::validate_endpoint;
use crate::listeners::{ListenerDetails, ListenerState, ListenerStatus};
use crate::partitions::{Registration, Removal, RemovalLog};

/// `{"status":"ok"}` with `status`.
pub fn ok(status: StatusCode) -> Response {
    (status, Json(json!({"status": "ok"}))).into_response()
}

/// Tag a response with the model it concerned (access log).
pub fn with_model(model: &str, r: impl IntoResponse) -> Response {
    (Extension(ModelLabel(model.to_owned())), r).into_response()
}

fn default_group(g: Option<String>) -> String {
    g.unwrap_or_else(|| crate::config::DEFAULT_GROUP.to_owned())
}

/// `GET|HEAD /health`: 200, empty body, no content type.
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Body of `POST /register` (unknown fields such as `tenant_id`, `lora_name`, `type` ignored).
#[derive(Deserialize)]
pub struct RegisterRequest {
    instance_id: u64,
    endpoint: String,
    model_name: String,
    block_size: u32,
    routing_group: Option<String>,
    dp_rank: Option<u32>,
    replay_endpoint: Option<String>,
    /// Mooncake RFC field: accepted, not mixed into hashes (as in Dynamo).
    #[serde(alias = "additionalsalt")]
    #[allow(dead_code)]
    additional_salt: Option<String>,
}

/// `POST /register` → 201.
pub async fn register(
    State(state): State<SharedState>,
    Json(req): Json<RegisterRequest>,
) -> Response {
    let model = req.model_name.clone();
    let result = async {
        validate_endpoint(&req.endpoint).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let Some(r) = &req.replay_endpoint {
            validate_endpoint(r).map_err(|e| {
                ApiError::BadRequest(format!("invalid replay endpoint `{r}`: {e}"))
            })?;
        }
        let reg = Registration {
            instance_id: req.instance_id,
            model_name: req.model_name,
            routing_group: default_group(req.routing_group),
            block_size: req.block_size,
            dp_rank: req.dp_rank.unwrap_or(0),
            endpoint: req.endpoint,
            replay_endpoint: req.replay_endpoint,
        };
        tracing::info!(instance_id = reg.instance_id, dp_rank = reg.dp_rank, model = %reg.model_name, routing_group = %reg.routing_group, endpoint = %reg.endpoint, "Registering worker");
        let partitions = state.partitions.clone();
        tokio::task::spawn_blocking(move || partitions.register(reg))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
        Ok::<_, ApiError>(())
    }
    .await;
    match result {
        Ok(()) => with_model(&model, ok(StatusCode::CREATED)),
        Err(e) => with_model(&model, e),
    }
}

/// Body of `POST /unregister`.
#[derive(Deserialize)]
pub struct UnregisterRequest {
    instance_id: u64,
    model_name: String,
    routing_group: Option<String>,
    dp_rank: Option<u32>,
}

/// `POST /unregister` → 200; removes the worker's blocks (logged) before answering.
pub async fn unregister(
    State(state): State<SharedState>,
    Json(req): Json<UnregisterRequest>,
) -> Response {
    let model = req.model_name.clone();
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let durable = &st.durable;
        let drop_blocks = |r: &Removal| -> Result<(), String> {
            let ticket = match r.dp_rank {
                None => durable.remove_worker(&r.spec, r.worker_id),
                Some(dp) => durable.remove_worker_dp_rank(&r.spec, r.worker_id, dp),
            }
            .map_err(|e| e.to_string())?;
            ticket.wait().map_err(|e| e.to_string())?;
            Ok(())
        };
        // Logged (DropNamespace) and dropped from the engine under the registry's write lock,
        // so recovery drops it too even without the snapshot below, and a partition created
        // again meanwhile cannot get the old index. A drop that cannot be logged stays pending
        // in the registry: the key is created again only once it is logged.
        let drop_partition = |key: &NamespaceKey| -> Result<(), String> {
            crate::partitions::log_drop(durable, key)
        };
        let outcome = st.partitions.unregister(
            req.instance_id,
            &req.model_name,
            req.routing_group.as_deref(),
            req.dp_rank,
            &RemovalLog {
                drop_blocks: &drop_blocks,
                drop_partition: &drop_partition,
            },
        )?;
        if !outcome.dropped.is_empty() {
            // The snapshot spares the next recovery the dropped partitions' entries. The
            // unregister is done without it: the removal and the drops are logged and synced,
            // and `registry.json` no longer lists the partitions; an error here would make a
            // retry answer 404. A failure is counted (`kvindex_snapshot_failures_total`) and
            // the periodic snapshot tries again after a backoff.
            if let Err(e) = st.durable.snapshot_now() {
                let dropped: Vec<String> = outcome.dropped.iter().map(|k| k.to_string()).collect();
                tracing::warn!(error = %e, partitions = ?dropped, "snapshot after a partition drop failed; the drop is logged, a later periodic snapshot takes its place");
            }
        }
        Ok::<_, ApiError>(())
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))
    .and_then(|r| r);
    match result {
        Ok(()) => with_model(&model, ok(StatusCode::OK)),
        Err(e) => with_model(&model, e),
    }
}

/// Filters of `GET /workers` (`tenant_id` accepted and ignored).
#[derive(Deserialize)]
pub struct WorkersFilter {
    model_name: Option<String>,
    routing_group: Option<String>,
}

/// One listener in `/workers`: Dynamo's fields, then ours (live ZMQ details).
#[derive(Serialize)]
struct ListenerInfo<'a> {
    endpoint: &'a str,
    status: ListenerStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    details: Option<ListenerDetails>,
}

/// One item of `/workers` (Dynamo's WorkerInfo, field order kept).
#[derive(Serialize)]
struct WorkerInfo<'a> {
    instance_id: u64,
    source: &'static str,
    status: ListenerStatus,
    model_name: &'a str,
    routing_group: &'a str,
    block_size: u32,
    endpoints: BTreeMap<String, &'a str>,
    listeners: BTreeMap<String, ListenerInfo<'a>>,
}

/// `GET /workers` → the registered instances (SERVICE.md §3.5).
pub async fn workers(
    State(state): State<SharedState>,
    Query(filter): Query<WorkersFilter>,
) -> Response {
    let view = state.partitions.view();
    let mut insts: Vec<_> = view
        .instances
        .values()
        .filter(|i| {
            filter
                .model_name
                .as_ref()
                .is_none_or(|m| *m == i.key.model_name)
        })
        .filter(|i| {
            filter
                .routing_group
                .as_ref()
                .is_none_or(|g| *g == i.key.routing_group)
        })
        .collect();
    insts.sort_by_key(|i| i.instance_id);
    let body: Vec<WorkerInfo<'_>> = insts
        .iter()
        .map(|i| {
            // Live states where the supervisor tracks them; the stored ones otherwise.
            let live: BTreeMap<u32, (ListenerState, Option<ListenerDetails>)> = i
                .listeners
                .iter()
                .map(|(dp, l)| {
                    let (state, details) = match state.partitions.live_listener(i.instance_id, *dp)
                    {
                        Some((st, d)) => (st, Some(d)),
                        None => (l.state.clone(), None),
                    };
                    (*dp, (state, details))
                })
                .collect();
            // failed > pending > active > paused (SERVICE.md §3.5).
            let status = live
                .values()
                .map(|(st, _)| st.status)
                .max_by_key(|s| s.priority())
                .unwrap_or(ListenerStatus::Pending);
            (i, live, status)
        })
        .map(|(i, mut live, status)| WorkerInfo {
            instance_id: i.instance_id,
            source: "zmq",
            status,
            model_name: &i.key.model_name,
            routing_group: &i.key.routing_group,
            block_size: i.block_size,
            endpoints: i
                .listeners
                .iter()
                .map(|(dp, l)| (dp.to_string(), l.endpoint.as_str()))
                .collect(),
            listeners: i
                .listeners
                .iter()
                .map(|(dp, l)| {
                    let (st, details) = live.remove(dp).unwrap_or((l.state.clone(), None));
                    (
                        dp.to_string(),
                        ListenerInfo {
                            endpoint: &l.endpoint,
                            status: st.status,
                            last_error: st.last_error,
                            details,
                        },
                    )
                })
                .collect(),
        })
        .collect();
    let model = filter.model_name.as_deref().unwrap_or("-").to_owned();
    with_model(&model, Json(body))
}

/// Body of the peer routes.
#[derive(Deserialize)]
pub struct PeerRequest {
    url: String,
}

/// `POST /register_peer` → 201 (idempotent, not validated).
pub async fn register_peer(
    State(state): State<SharedState>,
    Json(req): Json<PeerRequest>,
) -> Response {
    let p = state.partitions.clone();
    match tokio::task::spawn_blocking(move || p.add_peer(&req.url)).await {
        Ok(Ok(())) => ok(StatusCode::CREATED),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// `POST /deregister_peer` → 200 or 404 `peer not found`.
pub async fn deregister_peer(
    State(state): State<SharedState>,
    Json(req): Json<PeerRequest>,
) -> Response {
    let p = state.partitions.clone();
    match tokio::task::spawn_blocking(move || p.remove_peer(&req.url)).await {
        Ok(Ok(())) => ok(StatusCode::OK),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// `GET /peers` → array of URLs.
pub async fn peers(State(state): State<SharedState>) -> Response {
    Json(state.partitions.view().peers.clone()).into_response()
}

/// `POST /reopen_logs` → 200 (also without `--access-log`), 500 if the reopen fails.
pub async fn reopen_logs(State(state): State<SharedState>) -> Response {
    match &state.access_log {
        None => ok(StatusCode::OK),
        Some(log) => match log.reopen() {
            Ok(()) => ok(StatusCode::OK),
            Err(e) => {
                ApiError::Internal(format!("failed to reopen access log: {e}")).into_response()
            }
        },
    }
}

/// Body of the test-only listener routes.
#[derive(Deserialize)]
pub struct ListenerRequest {
    instance_id: u64,
    dp_rank: Option<u32>,
}

/// `POST /test/pause_listener` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`).
pub async fn pause_listener(
    State(state): State<SharedState>,
    Json(req): Json<ListenerRequest>,
) -> Response {
    let dp_rank = req.dp_rank.unwrap_or(0);
    listener_op(move || state.partitions.pause_listener(req.instance_id, dp_rank)).await
}

/// `POST /test/resume_listener` (only with `DYN_KV_INDEXER_TEST_ENDPOINTS`).
pub async fn resume_listener(
    State(state): State<SharedState>,
    Json(req): Json<ListenerRequest>,
) -> Response {
    let dp_rank = req.dp_rank.unwrap_or(0);
    listener_op(move || state.partitions.resume_listener(req.instance_id, dp_rank)).await
}

/// Run a test-route listener operation on the blocking pool, as `/register` and `/unregister`
/// do: it takes the registry's write lock, and pausing a ZMQ listener waits until every batch
/// of every stream already past the fence is logged (`zmq_source::Fence::stop`: one lock all
/// streams share), which must not hold up a tokio worker. The answer still waits for the operation to finish, so the fencing is
/// the same: once the route answers, no batch of the paused listener reaches the log.
async fn listener_op(
    op: impl FnOnce() -> Result<(), crate::partitions::RegistryError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(op).await {
        Ok(Ok(())) => ok(StatusCode::OK),
        Ok(Err(e)) => ApiError::from(e).into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// `GET /metrics`: Prometheus text, gauges refreshed first.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let Some(handle) = &state.metrics else {
        return StatusCode::NOT_FOUND.into_response();
    };
    // Listener states as `/workers` shows them (live), not the periodically mirrored copy.
    let view = state.partitions.view();
    let listeners = view.listener_counts_with(|id, dp| {
        state
            .partitions
            .live_listener(id, dp)
            .map(|(st, _)| st.status)
    });
    crate::metrics::refresh(
        &view,
        listeners,
        state.durable.log(),
        state.durable.engine().queued_tasks(),
    );
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::thread::ThreadId;

    use super::*;
    use crate::listeners::{ListenerSpec, ListenerSupervisor};
    use crate::partitions::Registration;

    /// Records the thread each pause and resume runs on.
    #[derive(Default)]
    struct ThreadRecorder(Mutex<Vec<(&'static str, ThreadId)>>);

    impl ThreadRecorder {
        fn record(&self, op: &'static str) {
            self.0
                .lock()
                .unwrap()
                .push((op, std::thread::current().id()));
        }
    }

    impl ListenerSupervisor for ThreadRecorder {
        fn start(&self, _spec: &ListenerSpec) -> ListenerState {
            ListenerState {
                status: ListenerStatus::Active,
                last_error: None,
            }
        }
        fn stop(&self, _instance_id: u64, _dp_rank: u32) {}
        fn pause(&self, _instance_id: u64, _dp_rank: u32) -> ListenerState {
            self.record("pause");
            ListenerState {
                status: ListenerStatus::Paused,
                last_error: None,
            }
        }
        fn resume(&self, spec: &ListenerSpec) -> ListenerState {
            self.record("resume");
            self.start(spec)
        }
    }

    /// The test routes pause and resume a listener off the runtime's thread (the supervisor
    /// may block: a ZMQ pause waits on a lock every stream shares), and answer once it is done.
    /// On a current-thread runtime the only worker is the thread running `block_on`.
    #[test]
    fn pause_and_resume_routes_run_the_supervisor_off_the_tokio_worker() {
        let dir = tempfile::tempdir().unwrap();
        let supervisor = Arc::new(ThreadRecorder::default());
        let state = super::super::unregister_race::open_with(dir.path(), supervisor.clone());
        state
            .partitions
            .register(Registration {
                instance_id: 1,
                model_name: "m".into(),
                routing_group: "default".into(),
                block_size: 4,
                dp_rank: 0,
                endpoint: "tcp://127.0.0.1:1".into(),
                replay_endpoint: None,
            })
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let request = || {
            Json(ListenerRequest {
                instance_id: 1,
                dp_rank: None,
            })
        };
        let paused = rt.block_on(pause_listener(State(Arc::clone(&state)), request()));
        assert_eq!(paused.status(), StatusCode::OK);
        assert_eq!(
            state.partitions.view().instances[&1].listeners[&0]
                .state
                .status,
            ListenerStatus::Paused
        );
        let resumed = rt.block_on(resume_listener(State(Arc::clone(&state)), request()));
        assert_eq!(resumed.status(), StatusCode::OK);
        let worker = std::thread::current().id();
        let calls = supervisor.0.lock().unwrap().clone();
        assert_eq!(
            calls.iter().map(|(op, _)| *op).collect::<Vec<_>>(),
            ["pause", "resume"]
        );
        assert!(
            calls.iter().all(|(_, thread)| *thread != worker),
            "a listener operation ran on the tokio worker"
        );
    }
}
