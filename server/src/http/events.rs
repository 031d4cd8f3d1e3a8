//! `POST /events` (kvindex's own route): one Dynamo RouterEvent or an array of them, as JSON
//! (`application/json`) or named-field msgpack (`application/msgpack`), for producers without
//! ZMQ and for tests. Each event goes to the partition of its registered `worker_id`, or to
//! `?model_name=&routing_group=` (created when `&block_size=` is given). The answer comes only
//! after the events are durable under the `--fsync` policy and applied to the index, so a query
//! sent after it sees them.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvindex_engine::codec;
use kvindex_engine::{NamespaceKey, RouterEvent};
use kvindex_persistence::{split_tagged, AppendTicket};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::errors::ApiError;
use super::handlers::with_model;
use super::{AppState, SharedState, LARGE_BODY_LIMIT};
use crate::metrics::REJECTED_TOTAL;
use crate::partitions::RegistryError;

/// The answer of `POST /events` (and of an event request over NATS).
#[derive(Serialize, Debug)]
pub struct EventsAck {
    status: &'static str,
    pub accepted: usize,
    rejected: Vec<serde_json::Value>,
    /// Last LSN of the accepted events (`null` when none).
    last_lsn: Option<u64>,
}

/// Optional explicit partition of `POST /events`.
#[derive(Deserialize, Default, Debug, Clone)]
pub struct EventsTarget {
    pub model_name: Option<String>,
    pub routing_group: Option<String>,
    pub block_size: Option<u32>,
}

/// Which source sequence the logged events carry (it moves the stream watermarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceSeq {
    /// Each event's own `event_id` (`POST /events`, core NATS). An `event_id` with bit 63 set
    /// is refused ([`ApiError::ReservedEventId`]): the log takes every such source sequence for
    /// a tagged JetStream one (docs/log-format.md §6.1).
    EventId,
    /// One value for every event of the request (a JetStream message's tagged sequence).
    Fixed(u64),
}

/// How an events payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Msgpack,
}

/// Message of the 415 of `POST /events`.
pub const EVENTS_MEDIA_TYPE: &str =
    "Expected request with `Content-Type: application/json` or `Content-Type: application/msgpack`";

fn format_of(headers: &HeaderMap) -> Option<Format> {
    format_of_media_type(headers.get(header::CONTENT_TYPE)?.to_str().ok()?)
}

/// The format named by a media type (`Content-Type` value), if it is one we decode.
pub fn format_of_media_type(ct: &str) -> Option<Format> {
    let mime = ct.split(';').next()?.trim().to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Some(Format::Json),
        m if m.starts_with("application/") && m.ends_with("+json") => Some(Format::Json),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Some(Format::Msgpack)
        }
        _ => None,
    }
}

/// Decode one RouterEvent or an array of them.
pub fn decode(format: Format, body: &[u8]) -> Result<Vec<RouterEvent>, String> {
    match format {
        Format::Json => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'[') {
                codec::decode_router_events_json(body)
            } else {
                codec::decode_router_event_json(body).map(|e| vec![e])
            }
        }
        Format::Msgpack => {
            // fixarray, array16, array32 markers: a batch; anything else: one event.
            if matches!(body.first(), Some(0x90..=0x9f | 0xdc | 0xdd)) {
                codec::decode_router_events_msgpack(body)
            } else {
                codec::decode_router_event_msgpack(body).map(|e| vec![e])
            }
        }
    }
    .map_err(|e| e.to_string())
}

fn reject(reason: &'static str) {
    count_reject(Some("/events"), reason);
}

fn count_reject(endpoint: Option<&'static str>, reason: &'static str) {
    if let Some(endpoint) = endpoint {
        metrics::counter!(REJECTED_TOTAL, "endpoint" => endpoint, "reason" => reason).increment(1);
    }
}

/// Count a refused partition lookup or creation in `kvindex_http_rejected_total` (the reasons
/// of the NATS intake: `unknown_partition`, `block_size`, `partition_limit`); failures on our
/// side (registry file, log) are not the request's fault and are not counted here.
fn count_partition_reject(endpoint: Option<&'static str>, e: &RegistryError) {
    let reason = match e {
        RegistryError::NoIndexer { .. } => "unknown_partition",
        RegistryError::BlockSizeMismatch { .. } => "block_size",
        RegistryError::PartitionLimit { .. } | RegistryError::TooManyPartitions { .. } => {
            "partition_limit"
        }
        _ => return,
    };
    count_reject(endpoint, reason);
}

/// `POST /events`. The body's bytes are claimed from the body budget as they arrive
/// (`super::body_budget`); the request keeps its claim until its events are submitted.
pub async fn post_events(
    State(state): State<SharedState>,
    Query(target): Query<EventsTarget>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let model_label = target.model_name.clone().unwrap_or_else(|| "-".into());
    let Some(format) = format_of(&headers) else {
        reject("media_type");
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, EVENTS_MEDIA_TYPE).into_response();
    };
    let (request, claim) = state.events_budget.wrap(request, LARGE_BODY_LIMIT);
    // The body extractor itself, so that its errors (413 over the limit, 400 past the read
    // deadline) keep axum's wording; but a deadline that passed while the request waited for
    // the budget is the server's overload, a 503.
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => {
            return match claim.budget_timeout() {
                Some(e) => with_model(&model_label, ApiError::from(e)),
                None => rejection.into_response(),
            }
        }
    };
    let events = match decode(format, &body) {
        Ok(evs) => evs,
        Err(e) => {
            reject("decode");
            return with_model(&model_label, ApiError::BadRequest(e));
        }
    };
    drop(body);
    let st = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let submitted = submit_events(&st, &target, events, SourceSeq::EventId, Some("/events"));
        // The events are in the log's and the index's queues now: the budget is free again.
        drop(claim);
        submitted.and_then(|s| s.finish(&st))
    })
    .await;
    match result {
        Ok(Ok(body)) => with_model(&model_label, Json(body)),
        Ok(Err(e)) => with_model(&model_label, e),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// Events submitted to the log, not yet known durable: [`Submitted::finish`] waits.
pub struct Submitted {
    groups: Vec<(NamespaceKey, usize, Option<AppendTicket>)>,
    /// (index in the body, or None when a whole partition's events failed; the error)
    rejected: Vec<(Option<usize>, ApiError)>,
}

/// Resolve the events' partitions (the explicit `target`, or each event's registered worker),
/// and submit each partition's events to the log as one record, in order. Returns without
/// waiting for durability. An error here means nothing was submitted. Per-event rejections are
/// counted in `kvindex_http_rejected_total{endpoint}` when `endpoint` is given (HTTP).
pub fn submit_events(
    state: &AppState,
    target: &EventsTarget,
    events: Vec<RouterEvent>,
    seq: SourceSeq,
    endpoint: Option<&'static str>,
) -> Result<Submitted, ApiError> {
    if target.block_size == Some(0) {
        count_reject(endpoint, "block_size");
        return Err(ApiError::ZeroBlockSize);
    }
    if seq == SourceSeq::EventId {
        check_event_ids(&events).inspect_err(|_| count_reject(endpoint, "reserved_event_id"))?;
    }
    if events.is_empty() {
        // Nothing to index: no partition is created, looked up or logged to.
        return Ok(Submitted {
            groups: Vec::new(),
            rejected: Vec::new(),
        });
    }
    let ensure = |model: &str, group: &str, bs: u32| {
        state
            .partitions
            .ensure_partition_for_events(model, group, bs, state.max_event_partitions)
            .inspect_err(|e| count_partition_reject(endpoint, e))
    };
    let explicit = match &target.model_name {
        Some(model) => {
            let group = target
                .routing_group
                .clone()
                .unwrap_or_else(|| crate::config::DEFAULT_GROUP.to_owned());
            if let Some(bs) = target.block_size {
                ensure(model, &group, bs)?;
            }
            Some(NamespaceKey::new(model.clone(), group))
        }
        None => None,
    };
    // Held from reading the registry to the log append: no `/unregister` logs its removal in
    // between (partitions/gate.rs). Entered after `ensure_partition`, which takes the
    // registry's write lock.
    let mut admission = state.ingest.admit();
    if let (Some(k), Some(bs)) = (&explicit, target.block_size) {
        if admission
            .view()
            .partition(&k.model_name, &k.routing_group)
            .is_err()
        {
            // `ensure_partition` found the partition, and an `/unregister` dropped it before
            // the admission: the caller asked for it to exist, so create it again, once (a
            // second drop in between is answered 404, as any request racing two would be).
            // The admission is let go first: `ensure_partition` takes the registry's write
            // lock, which an unregister holds while it waits for the gate.
            drop(admission);
            ensure(&k.model_name, &k.routing_group, bs)?;
            admission = state.ingest.admit();
        }
    }
    let view = admission.view();
    if let Some(k) = &explicit {
        view.partition(&k.model_name, &k.routing_group)
            .inspect_err(|e| count_partition_reject(endpoint, e))?;
    }
    let mut groups: BTreeMap<NamespaceKey, Vec<(u64, RouterEvent)>> = BTreeMap::new();
    let mut rejected: Vec<(Option<usize>, ApiError)> = Vec::new();
    for (i, ev) in events.into_iter().enumerate() {
        let key = match &explicit {
            Some(k) => k.clone(),
            None => match view.instances.get(&ev.worker_id) {
                Some(inst) => inst.key.clone(),
                None => {
                    count_reject(endpoint, "unknown_worker");
                    rejected.push((
                        Some(i),
                        RegistryError::InstanceNotFound(ev.worker_id).into(),
                    ));
                    continue;
                }
            },
        };
        let source_seq = match seq {
            SourceSeq::EventId => ev.event.event_id,
            SourceSeq::Fixed(s) => s,
        };
        groups.entry(key).or_default().push((source_seq, ev));
    }
    let mut submitted = Vec::with_capacity(groups.len());
    for (key, evs) in groups {
        let n = evs.len();
        match state.ingest.submit_admitted(&admission, &key, evs) {
            Ok(t) => submitted.push((key, n, t)),
            Err(e) => {
                count_reject(endpoint, "partition");
                rejected.push((None, e.into()));
            }
        }
    }
    Ok(Submitted {
        groups: submitted,
        rejected,
    })
}

/// Refuse the request when an `event_id` is at or above 2^63 (a tagged source sequence, kept
/// for JetStream): logged as one, it would enter the set of logged JetStream sequences.
fn check_event_ids(events: &[RouterEvent]) -> Result<(), ApiError> {
    match events
        .iter()
        .position(|ev| split_tagged(ev.event.event_id).is_some())
    {
        Some(index) => Err(ApiError::ReservedEventId {
            index,
            event_id: events[index].event.event_id,
        }),
        None => Ok(()),
    }
}

impl Submitted {
    /// Wait until every submitted event is durable under the `--fsync` policy and applied to
    /// its partition's index; the answer of `POST /events`.
    pub fn finish(self, state: &AppState) -> Result<EventsAck, ApiError> {
        let Submitted {
            groups,
            mut rejected,
        } = self;
        let mut accepted = 0usize;
        let mut last_lsn = None;
        for (key, n, ticket) in groups {
            if let Some(t) = ticket {
                let lsn = t
                    .wait()
                    .map_err(|e| ApiError::Ingest(crate::ingest::IngestError::Log(e)))?;
                last_lsn = Some(last_lsn.map_or(lsn, |l: u64| l.max(lsn)));
            }
            state.ingest.flush(&key)?;
            accepted += n;
        }
        if accepted == 0 && !rejected.is_empty() {
            return Err(rejected.swap_remove(0).1);
        }
        let rejected_json: Vec<_> = rejected
            .iter()
            .map(|(i, e)| match i {
                Some(i) => json!({"index": i, "error": e.to_string()}),
                None => json!({"error": e.to_string()}),
            })
            .collect();
        Ok(EventsAck {
            status: "ok",
            accepted,
            rejected: rejected_json,
            last_lsn,
        })
    }
}
