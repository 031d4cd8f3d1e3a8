//! End-to-end ingest: one vLLM-wire publisher (PUB + ROUTER replay ring) per worker, every worker
//! registered on the target over HTTP, the workload's batches published as fast as one task can
//! send them, and the time until the target has applied every event.
//!
//! "Applied" is read from the `dynamo_kvrouter_kv_cache_events_applied` counters on `/metrics`
//! (every status summed: both servers count an event once it went through their index, whatever
//! the outcome); both kvindex and Dynamo export them. A PUB socket drops nothing here (its queue
//! holds 100,000 messages) and the replay rings hold every batch, so a late subscription or a gap
//! is filled by replay inside the measured time instead of losing events.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvindex_server::zmq::test_publisher::{PublisherConfig, VllmPublisher};
use serde::{Deserialize, Serialize};

use super::http::HttpConn;
use super::trace_bodies::{ServiceWorkload, SERVICE_BLOCK_SIZE};
use super::ServiceError;

/// Name of the applied-events counter family on `/metrics`.
pub const APPLIED_COUNTER: &str = "dynamo_kvrouter_kv_cache_events_applied";

/// What one end-to-end ingest measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IngestResult {
    /// Batches published.
    pub batches: u64,
    /// Events in them.
    pub events: u64,
    /// Blocks stored by them.
    pub stored_blocks: u64,
    /// First publish → last publish returned.
    pub publish_s: f64,
    /// First publish → every event applied.
    pub e2e_s: f64,
    /// `events / e2e_s`.
    pub events_per_s: f64,
    /// `stored_blocks / e2e_s`.
    pub blocks_per_s: f64,
    /// Applied-event counters after ingest, `event_type/status` → count.
    pub applied: BTreeMap<String, u64>,
    /// kvindex only: sums of the listeners' `gaps`, `replays`, `lost_batches` in `/workers`.
    pub listener_totals: BTreeMap<String, u64>,
    /// CPU seconds the target process used from the first publish until every event was
    /// applied (filled in by the caller, which knows the process).
    #[serde(default)]
    pub server_cpu_s: Option<f64>,
}

/// Bind one loopback publisher (PUB + replay ROUTER, a ring of `buffer_steps`) per worker.
pub async fn bind_publishers(
    workers: u64,
    buffer_steps: usize,
) -> Result<Vec<VllmPublisher>, ServiceError> {
    let mut pubs = Vec::new();
    for _ in 0..workers {
        pubs.push(
            VllmPublisher::bind(PublisherConfig {
                buffer_steps,
                ..PublisherConfig::loopback()
            })
            .await?,
        );
    }
    Ok(pubs)
}

/// `POST /register` worker `i` with publisher `pubs[i]`'s endpoints (201 expected).
pub async fn register_workers(
    conn: &mut HttpConn,
    pubs: &[VllmPublisher],
    model: &str,
) -> Result<(), ServiceError> {
    for (i, p) in pubs.iter().enumerate() {
        let body = serde_json::json!({
            "instance_id": i,
            "endpoint": p.endpoint(),
            "replay_endpoint": p.replay_endpoint(),
            "model_name": model,
            "block_size": SERVICE_BLOCK_SIZE,
        });
        conn.post("/register", Bytes::from(body.to_string()))
            .await?
            .expect(201, &format!("register worker {i}"))?;
    }
    Ok(())
}

/// Wait (bounded) until every listener of `workers` workers is subscribed: kvindex reports
/// `connected` per listener; for a target without that field (Dynamo) wait until every listener
/// is `active`, then `settle` more (a late subscription is repaired by replay anyway).
pub async fn wait_subscribed(
    conn: &mut HttpConn,
    workers: u64,
    settle: Duration,
    limit: Duration,
) -> Result<(), ServiceError> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let list = conn.get("/workers").await?.expect(200, "GET /workers")?;
        let list = list.json("GET /workers")?;
        let listeners: Vec<&serde_json::Value> = list
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .filter_map(|w| w.get("listeners").and_then(|l| l.as_object()))
            .flat_map(|l| l.values())
            .collect();
        if listeners.len() as u64 >= workers {
            let has_connected = listeners.iter().all(|l| l.get("connected").is_some());
            if has_connected {
                if listeners.iter().all(|l| l["connected"] == true) {
                    return Ok(());
                }
            } else if listeners.iter().all(|l| l["status"] == "active") {
                tokio::time::sleep(settle).await;
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(ServiceError::Timeout {
        what: format!("{workers} listeners to subscribe"),
        seconds: limit.as_secs_f64(),
    })
}

/// Parse the applied-event counters of a Prometheus text page: `event_type/status` → count
/// (non-zero entries only).
pub fn parse_applied(metrics: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(APPLIED_COUNTER) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        if value <= 0.0 {
            // Dynamo exports every (type, status) pair, zeros included.
            continue;
        }
        let label = |name: &str| {
            labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                .unwrap_or_default()
        };
        let key = format!("{}/{}", label("event_type"), label("status"));
        *out.entry(key).or_insert(0) += value as u64;
    }
    out
}

/// Sum of the applied-event counters of the target.
pub async fn applied_events(conn: &mut HttpConn) -> Result<BTreeMap<String, u64>, ServiceError> {
    let page = conn.get("/metrics").await?.expect(200, "GET /metrics")?;
    Ok(parse_applied(&page.text()))
}

/// kvindex's per-listener replay statistics summed over `/workers` (empty for Dynamo).
pub async fn listener_totals(conn: &mut HttpConn) -> Result<BTreeMap<String, u64>, ServiceError> {
    let list = conn.get("/workers").await?.expect(200, "GET /workers")?;
    let list = list.json("GET /workers")?;
    let mut out = BTreeMap::new();
    for w in list.as_array().map(|a| a.as_slice()).unwrap_or_default() {
        let Some(ls) = w.get("listeners").and_then(|l| l.as_object()) else {
            continue;
        };
        for l in ls.values() {
            for key in ["gaps", "replays", "lost_batches"] {
                if let Some(v) = l.get(key).and_then(|v| v.as_u64()) {
                    *out.entry(key.to_owned()).or_insert(0) += v;
                }
            }
        }
    }
    Ok(out)
}

/// Publish every batch of `workload` (in op-stream order) on its worker's publisher, as fast as
/// possible, then poll `/metrics` every `poll` until the applied counters grew by the number of
/// events (at most `limit`).
pub async fn flood(
    workload: &ServiceWorkload,
    pubs: &[VllmPublisher],
    conn: &mut HttpConn,
    poll: Duration,
    limit: Duration,
) -> Result<IngestResult, ServiceError> {
    let before: u64 = applied_events(conn).await?.values().sum();
    let target = before + workload.events;
    let start = Instant::now();
    for b in &workload.batches {
        let publisher = usize::try_from(b.worker)
            .ok()
            .and_then(|w| pubs.get(w))
            .ok_or_else(|| {
                ServiceError::Workload(format!("no publisher for worker {}", b.worker))
            })?;
        publisher.publish(&b.batch).await?;
    }
    let publish_s = start.elapsed().as_secs_f64();
    let mut applied;
    loop {
        applied = applied_events(conn).await?;
        let total: u64 = applied.values().sum();
        if total >= target {
            break;
        }
        if start.elapsed() > limit {
            return Err(ServiceError::Timeout {
                what: format!(
                    "{} events to be applied ({} of them were)",
                    workload.events,
                    total.saturating_sub(before)
                ),
                seconds: limit.as_secs_f64(),
            });
        }
        tokio::time::sleep(poll).await;
    }
    let e2e_s = start.elapsed().as_secs_f64();
    Ok(IngestResult {
        batches: workload.batches.len() as u64,
        events: workload.events,
        stored_blocks: workload.stored_blocks,
        publish_s,
        e2e_s,
        events_per_s: workload.events as f64 / e2e_s,
        blocks_per_s: workload.stored_blocks as f64 / e2e_s,
        applied,
        listener_totals: listener_totals(conn).await?,
        server_cpu_s: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_counters_are_summed_by_type_and_status() {
        let page = "# TYPE dynamo_kvrouter_kv_cache_events_applied counter\n\
            dynamo_kvrouter_kv_cache_events_applied{event_type=\"stored\",status=\"ok\"} 10\n\
            dynamo_kvrouter_kv_cache_events_applied{status=\"parent_block_not_found\",event_type=\"stored\"} 2\n\
            dynamo_kvrouter_kv_cache_events_applied{event_type=\"removed\",status=\"ok\"} 7\n\
            dynamo_kvrouter_kv_cache_events_applied{event_type=\"cleared\",status=\"ok\"} 0\n\
            dynamo_kvrouter_kv_cache_events_applied_other 99\n\
            dynamo_kvindexer_models 1\n";
        let got = parse_applied(page);
        assert_eq!(got.get("stored/ok"), Some(&10));
        assert_eq!(got.get("stored/parent_block_not_found"), Some(&2));
        assert_eq!(got.get("removed/ok"), Some(&7));
        assert_eq!(got.values().sum::<u64>(), 19);
        assert_eq!(got.len(), 3, "zero counters are left out: {got:?}");
    }
}
