//! Closed-loop request load: `concurrency` tasks, each on its own keep-alive connection, each
//! sending the next body as soon as the previous answer is read. Task `i` walks the bodies from
//! index `i` in steps of `concurrency` (wrapping), so the tasks together cycle through the trace's
//! queries in order. Requests started during the warm-up are not recorded; every recorded
//! latency goes into a vector, sorted once at the end (nearest-rank percentiles). Any answer other
//! than 200 is counted as an error and the first one is kept for the report.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::http::HttpConn;
use super::ServiceError;

/// One load level to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Route, e.g. `/query`.
    pub path: String,
    /// Parallel closed-loop clients.
    pub concurrency: usize,
    /// Not recorded.
    pub warmup: Duration,
    /// Recorded.
    pub duration: Duration,
    /// Stop each client after this many recorded requests (tests use it to know the exact
    /// count); `None` = run for `duration`.
    pub requests_per_client: Option<u64>,
}

/// What one load level measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub path: String,
    pub concurrency: usize,
    /// Recorded requests answered 200.
    pub ok: u64,
    /// Recorded requests answered otherwise (or failed on the wire).
    pub errors: u64,
    /// Every request sent, warm-up included.
    #[serde(default)]
    pub sent_incl_warmup: u64,
    /// First error seen (status and body, or the transport error).
    pub first_error: Option<String>,
    /// Measured wall time (recording start → last recorded answer).
    pub seconds: f64,
    /// `ok / seconds`.
    pub requests_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// CPU time the target used during the level (warm-up included) per request answered,
    /// in microseconds (filled in by the caller, which knows the process).
    #[serde(default)]
    pub server_cpu_us_per_request: Option<f64>,
}

/// Nearest-rank percentile `q` (0..=1) of sorted `ns`, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1000.0
}

struct TaskOutcome {
    sent: u64,
    latencies_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

/// What every client task of one load level shares.
struct ClientPlan {
    addr: SocketAddr,
    path: String,
    bodies: Arc<Vec<Bytes>>,
    step: usize,
    record_from: Instant,
    end: Instant,
    max_recorded: Option<u64>,
}

async fn client_task(plan: Arc<ClientPlan>, first: usize) -> Result<TaskOutcome, ServiceError> {
    let ClientPlan {
        addr,
        ref path,
        ref bodies,
        step,
        record_from,
        end,
        max_recorded,
    } = *plan;
    let mut conn = HttpConn::connect(addr).await?;
    let mut out = TaskOutcome {
        sent: 0,
        latencies_ns: Vec::new(),
        errors: 0,
        first_error: None,
        last_done: None,
    };
    let mut i = first % bodies.len();
    loop {
        let sent = Instant::now();
        let recorded = out.latencies_ns.len() as u64 + out.errors;
        if sent >= end || max_recorded.is_some_and(|m| recorded >= m) {
            break;
        }
        let answer = conn.post(path, bodies[i].clone()).await;
        out.sent += 1;
        let done = Instant::now();
        i = (i + step) % bodies.len();
        if sent < record_from {
            if let Ok(a) = &answer {
                if a.status == 200 {
                    continue;
                }
            }
        }
        out.last_done = Some(done);
        match answer {
            Ok(a) if a.status == 200 => {
                out.latencies_ns.push((done - sent).as_nanos() as u64);
            }
            Ok(a) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("status {}: {}", a.status, a.text()));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                // The connection may be unusable now: open a new one.
                conn = HttpConn::connect(addr).await?;
            }
        }
    }
    Ok(out)
}

/// Run one load level against `addr` with `bodies` (must not be empty).
pub async fn run(
    addr: SocketAddr,
    spec: &LoadSpec,
    bodies: Arc<Vec<Bytes>>,
) -> Result<LoadResult, ServiceError> {
    if bodies.is_empty() || spec.concurrency == 0 {
        return Err(ServiceError::Workload(
            "load needs at least one body and one client".into(),
        ));
    }
    let start = Instant::now();
    let record_from = start + spec.warmup;
    let end = record_from + spec.duration;
    let plan = Arc::new(ClientPlan {
        addr,
        path: spec.path.clone(),
        bodies,
        step: spec.concurrency,
        record_from,
        end,
        max_recorded: spec.requests_per_client,
    });
    let mut tasks = Vec::new();
    for c in 0..spec.concurrency {
        tasks.push(tokio::spawn(client_task(plan.clone(), c)));
    }
    let mut latencies = Vec::new();
    let mut sent = 0;
    let mut errors = 0;
    let mut first_error = None;
    let mut last_done = record_from;
    for t in tasks {
        let outcome = t.await.map_err(|e| ServiceError::Answer {
            context: "load task".into(),
            detail: e.to_string(),
        })??;
        latencies.extend(outcome.latencies_ns);
        sent += outcome.sent;
        errors += outcome.errors;
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
        if let Some(d) = outcome.last_done {
            last_done = last_done.max(d);
        }
    }
    latencies.sort_unstable();
    let seconds = (last_done - record_from).as_secs_f64();
    let ok = latencies.len() as u64;
    Ok(LoadResult {
        path: spec.path.clone(),
        concurrency: spec.concurrency,
        ok,
        errors,
        sent_incl_warmup: sent,
        first_error,
        seconds,
        requests_per_s: if seconds > 0.0 {
            ok as f64 / seconds
        } else {
            0.0
        },
        p50_us: percentile_us(&latencies, 0.50),
        p99_us: percentile_us(&latencies, 0.99),
        p999_us: percentile_us(&latencies, 0.999),
        max_us: latencies.last().map_or(0.0, |&n| n as f64 / 1000.0),
        server_cpu_us_per_request: None,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile_us;

    #[test]
    fn nearest_rank_percentiles() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile_us(&ns, 0.50), 50.0);
        assert_eq!(percentile_us(&ns, 0.99), 99.0);
        assert_eq!(percentile_us(&ns, 0.999), 100.0);
        assert_eq!(percentile_us(&[], 0.5), 0.0);
        assert_eq!(percentile_us(&[7000], 0.01), 7.0);
    }
}
