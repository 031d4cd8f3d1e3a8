//! Offered-load sweep (issue #5): the mixed op stream of WORKLOAD.md replayed *paced*, at a
//! chosen offered rate, to find where a backend stops keeping up (the knee).
//!
//! One point, in the current process (`mooncake-replay --sweep` runs each in a fresh child):
//! 1. **warm-up**: the events of the first `warm_fraction` of the op stream are applied
//!    unpaced and flushed, so the measured part runs on a filled index (its queries are
//!    skipped);
//! 2. **slice**: the next `M = min(remaining ops, rate × point_secs)` ops;
//! 3. **pacing**: the slice's trace timestamps (each op carries its request's timestamp) are
//!    compressed linearly into a window of `M / rate` seconds, as Dynamo's own kv-router
//!    benchmark rescales a trace into a benchmark duration. The trace's burstiness is kept;
//!    only its time scale changes;
//! 4. one thread submits each event at its scheduled time, one thread issues each query at its
//!    scheduled time but never before the events preceding it were submitted (the WORKLOAD.md
//!    mixed rule); then a flush.
//!
//! Reported: offered and achieved ops/s (achieved = M / time until the last query returned
//! and the final flush completed), when every event was applied relative to the window, how
//! late submissions and queries started against their schedule, and query service latency.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::replay::{latency_summary, LatencyUs};
use crate::workload::{Op, TraceRequest, Workload};

/// Settings of one sweep point.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPointConfig {
    /// Offered rate, ops (events + queries) per second.
    pub offered_ops_per_sec: f64,
    /// Longest window a point may take (seconds); lower rates replay fewer ops.
    pub point_secs: f64,
    /// Fraction of the op stream applied (events only, unpaced) before the measured slice.
    pub warm_fraction: f64,
}

/// What one sweep point measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPointResult {
    pub backend: String,
    pub event_threads: usize,
    pub offered_ops_per_sec: f64,
    /// Ops replayed in the measured slice (events + queries).
    pub ops: u64,
    pub events: u64,
    pub queries: u64,
    /// Warm-up events applied before the slice.
    pub warm_events: u64,
    /// The window the slice's timestamps were compressed into.
    pub window_secs: f64,
    /// Start → last query returned and final flush done.
    pub elapsed_secs: f64,
    pub achieved_ops_per_sec: f64,
    /// Whether every event was applied within the window (+1 ms).
    pub applied_within_window: bool,
    /// How late event submissions started against their schedule.
    pub submit_lag_us: LatencyUs,
    /// How late queries started against their schedule (includes waiting for the events
    /// before them).
    pub query_lag_us: LatencyUs,
    /// Query service time (the `find_matches` call).
    pub query_latency_us: LatencyUs,
}

/// Per op of the stream, the timestamp (ms) of the request it belongs to: query `q` comes from
/// trace request `q / duplication`, and events carry the timestamp of the query before them.
pub fn op_timestamps(workload: &Workload, trace: &[TraceRequest]) -> anyhow::Result<Vec<f64>> {
    let d = usize::try_from(workload.config.duplication)?;
    anyhow::ensure!(d > 0, "duplication must be >= 1");
    let mut out = Vec::with_capacity(workload.ops.len());
    let mut q = 0usize;
    let mut current = trace.first().map_or(0.0, |r| r.timestamp);
    for op in &workload.ops {
        if let Op::Query { .. } = op {
            current = trace
                .get(q / d)
                .ok_or_else(|| anyhow::anyhow!("query {q} has no trace request"))?
                .timestamp;
            q += 1;
        }
        out.push(current);
    }
    Ok(out)
}

/// Linear compression of `ts` (ms, non-decreasing) into `[0, window]`: schedule offsets.
pub fn compress(ts: &[f64], window: Duration) -> Vec<Duration> {
    let (Some(&first), Some(&last)) = (ts.first(), ts.last()) else {
        return Vec::new();
    };
    let span = last - first;
    let w = window.as_secs_f64();
    ts.iter()
        .map(|&t| {
            let frac = if span > 0.0 {
                ((t - first) / span).clamp(0.0, 1.0)
            } else {
                0.0
            };
            Duration::from_secs_f64(frac * w)
        })
        .collect()
}

/// Wait until `deadline`: sleep while more than 200 µs away, then yield.
fn wait_until(deadline: Instant) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > Duration::from_micros(200) {
            std::thread::sleep(left - Duration::from_micros(100));
        } else {
            std::thread::yield_now();
        }
    }
}

/// Run one sweep point on a fresh backend built by `make`.
pub fn run_point<B: Backend>(
    make: &dyn Fn() -> anyhow::Result<B>,
    workload: &Workload,
    timestamps: &[f64],
    event_threads: usize,
    cfg: &SweepPointConfig,
) -> anyhow::Result<SweepPointResult> {
    anyhow::ensure!(
        cfg.offered_ops_per_sec > 0.0 && cfg.offered_ops_per_sec.is_finite(),
        "offered rate must be > 0"
    );
    anyhow::ensure!(cfg.point_secs > 0.0, "point seconds must be > 0");
    anyhow::ensure!(
        (0.0..1.0).contains(&cfg.warm_fraction),
        "warm fraction must be in [0, 1)"
    );
    anyhow::ensure!(
        timestamps.len() == workload.ops.len(),
        "one timestamp per op"
    );
    let backend = make()?;
    let n = workload.ops.len();
    let warm_end = (n as f64 * cfg.warm_fraction) as usize;
    let max_ops = (cfg.offered_ops_per_sec * cfg.point_secs).max(1.0) as usize;
    let slice_end = (warm_end + max_ops).min(n);
    anyhow::ensure!(slice_end > warm_end, "nothing left to replay after warm-up");

    // Warm-up (events only, unpaced).
    let mut warm_events = 0u64;
    for op in &workload.ops[..warm_end] {
        if let Op::Event(e) = op {
            backend.apply_prepared(backend.prepare(e)?)?;
            warm_events += 1;
        }
    }
    backend.flush()?;

    // The slice, prepared (not timed) and scheduled.
    let ops = &workload.ops[warm_end..slice_end];
    let window = Duration::from_secs_f64(ops.len() as f64 / cfg.offered_ops_per_sec);
    let schedule = compress(&timestamps[warm_end..slice_end], window);
    let mut events = Vec::new();
    let mut event_at = Vec::new();
    let mut queries = Vec::new();
    let mut query_at = Vec::new();
    let mut events_before = Vec::new();
    for (op, at) in ops.iter().zip(&schedule) {
        match op {
            Op::Event(e) => {
                events.push(backend.prepare(e)?);
                event_at.push(*at);
            }
            Op::Query { local_hashes } => {
                queries.push(backend.prepare_query(local_hashes));
                query_at.push(*at);
                events_before.push(events.len());
            }
        }
    }
    let (n_events, n_queries) = (events.len() as u64, queries.len() as u64);
    eprintln!(
        "[{}] sweep point {:.0} ops/s: {} warm events, slice {} events + {} queries in {:.2}s",
        backend.name(),
        cfg.offered_ops_per_sec,
        warm_events,
        n_events,
        n_queries,
        window.as_secs_f64()
    );

    let submitted = AtomicUsize::new(0);
    let start = Instant::now();
    let (submit_result, submit_lag, (query_lag, query_lat)) = std::thread::scope(|scope| {
        let (b, sub) = (&backend, &submitted);
        let submitter = scope.spawn(move || {
            let mut lag = Vec::with_capacity(event_at.len());
            for (k, (ev, at)) in events.into_iter().zip(event_at).enumerate() {
                let due = start + at;
                wait_until(due);
                lag.push(Instant::now().saturating_duration_since(due).as_nanos() as u64);
                if let Err(e) = b.apply_prepared(ev) {
                    sub.store(usize::MAX, Ordering::Release);
                    return (Err(e), lag);
                }
                sub.store(k + 1, Ordering::Release);
            }
            (Ok(()), lag)
        });
        let (qs, qat, before) = (&queries, &query_at, &events_before);
        let querier = scope.spawn(move || {
            let mut lag = Vec::with_capacity(qs.len());
            let mut lat = Vec::with_capacity(qs.len());
            for ((q, at), &need) in qs.iter().zip(qat).zip(before) {
                let due = start + *at;
                wait_until(due);
                let mut spins = 0u32;
                while sub.load(Ordering::Acquire) < need {
                    if spins < 64 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                    spins = spins.saturating_add(1);
                }
                let t0 = Instant::now();
                lag.push(t0.saturating_duration_since(due).as_nanos() as u64);
                black_box(b.find_prepared(q));
                lat.push(t0.elapsed().as_nanos() as u64);
            }
            (lag, lat)
        });
        let (res, slag) = match submitter.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        let q = match querier.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        (res, slag, q)
    });
    submit_result?;
    backend.flush()?;
    let elapsed = start.elapsed().as_secs_f64();
    let total = n_events + n_queries;
    Ok(SweepPointResult {
        backend: backend.name().to_string(),
        event_threads,
        offered_ops_per_sec: cfg.offered_ops_per_sec,
        ops: total,
        events: n_events,
        queries: n_queries,
        warm_events,
        window_secs: window.as_secs_f64(),
        elapsed_secs: elapsed,
        achieved_ops_per_sec: total as f64 / elapsed,
        applied_within_window: elapsed <= window.as_secs_f64() + 1e-3,
        submit_lag_us: latency_summary(submit_lag),
        query_lag_us: latency_summary(query_lag),
        query_latency_us: latency_summary(query_lat),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{generate, parse_trace, WorkloadConfig};

    #[test]
    fn every_op_carries_its_requests_timestamp() {
        let trace = parse_trace(
            "{\"timestamp\": 7, \"hash_ids\": [2]}\n{\"timestamp\": 3, \"hash_ids\": [1]}\n",
        )
        .expect("trace");
        let cfg = WorkloadConfig {
            length_factor: 1,
            duplication: 2,
            workers: 1,
            capacity: 1,
            limit_requests: None,
            seed: 42,
        };
        let w = generate(&trace, &cfg).expect("workload");
        let ts = op_timestamps(&w, &trace).expect("timestamps");
        assert_eq!(ts.len(), w.ops.len());
        // Sorted trace: request at 3 ms (two copies), then 7 ms (two copies); each copy's
        // query and the events after it share the request's timestamp.
        let mut expect = Vec::new();
        let mut q = 0usize;
        for op in &w.ops {
            if let Op::Query { .. } = op {
                q += 1;
            }
            expect.push(if q <= 2 { 3.0 } else { 7.0 });
        }
        assert_eq!(ts, expect);
        assert!(w.ops.iter().any(|o| matches!(o, Op::Event(_))));
    }

    #[test]
    fn compress_maps_span_onto_window() {
        let s = compress(&[10.0, 10.0, 15.0, 20.0], Duration::from_secs(2));
        assert_eq!(s[0], Duration::ZERO);
        assert_eq!(s[1], Duration::ZERO);
        assert_eq!(s[2], Duration::from_secs(1));
        assert_eq!(s[3], Duration::from_secs(2));
        assert!(compress(&[], Duration::from_secs(1)).is_empty());
        // A zero-length span schedules everything at the start.
        assert_eq!(
            compress(&[3.0, 3.0], Duration::from_secs(1)),
            vec![Duration::ZERO; 2]
        );
    }
}
