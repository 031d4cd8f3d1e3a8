//! Prometheus metrics: Dynamo's `dynamo_kvindexer_*` families with Dynamo's names, labels and
//! buckets (SERVICE.md §11), the engine's `dynamo_kvrouter_*` counters, and kvindex's own
//! (`kvindex_*`: log, snapshots, recovery, queues). Everything goes through the `metrics` crate;
//! the exporter renders on each scrape, after the gauges are refreshed.

use std::collections::BTreeSet;
use std::sync::Mutex;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use kvindex_engine::StorageTier;

use crate::listeners::ListenerStatus;
use crate::partitions::RegistryView;

/// Request latency histogram (label `endpoint`).
pub const REQUEST_DURATION: &str = "dynamo_kvindexer_request_duration_seconds";
/// Request counter (labels `endpoint`, `method`).
pub const REQUESTS_TOTAL: &str = "dynamo_kvindexer_requests_total";
/// Error response counter (labels `endpoint`, `status_class`).
pub const ERRORS_TOTAL: &str = "dynamo_kvindexer_errors_total";
/// Partitions gauge.
pub const MODELS: &str = "dynamo_kvindexer_models";
/// Registered instances gauge.
pub const WORKERS: &str = "dynamo_kvindexer_workers";
/// Listeners per status gauge.
pub const LISTENERS: &str = "dynamo_kvindexer_listeners";
/// Requests rejected before reaching the index, by reason (ours).
pub const REJECTED_TOTAL: &str = "kvindex_http_rejected_total";
/// Gauge, per partition (`model_name`, `routing_group`): bytes of its index's external-hash
/// map, so that what `--expected-blocks` allocates (and for which partitions) can be seen.
pub const MAP_BYTES: &str = "kvindex_index_map_bytes";

/// `tier` label values of `kvindex_index_lower_tier_blocks`.
const LOWER_TIERS: [&str; 3] = ["host_pinned", "disk", "external"];

/// Partitions (`model_name`, `routing_group`) whose per-partition gauges the last refresh set.
static PARTITION_LABELS: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());

/// Dynamo's request-duration buckets: 0.0001 × 2^k seconds, k = 0..19.
pub fn request_buckets() -> Vec<f64> {
    (0..20).map(|k| 0.0001 * f64::from(1u32 << k)).collect()
}

/// Install the global recorder (before the log is opened, so recovery metrics are kept).
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &request_buckets())?
        .set_buckets(&[
            0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0,
        ])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "HTTP request latency");
    describe_counter!(REQUESTS_TOTAL, "Total HTTP requests");
    describe_counter!(ERRORS_TOTAL, "HTTP error responses (4xx/5xx)");
    describe_gauge!(MODELS, "Number of active model+routing-group indexers");
    describe_gauge!(WORKERS, "Number of registered worker instances");
    describe_gauge!(LISTENERS, "Number of ZMQ listeners by status");
    describe_counter!(
        kvindex_engine::EVENTS_APPLIED,
        "KV cache events applied to the index, by event type and outcome"
    );
    describe_counter!(
        kvindex_engine::EVENT_WARNINGS,
        "Suspicious KV cache events (e.g. duplicate stores)"
    );
    describe_counter!(
        REJECTED_TOTAL,
        "Requests refused before reaching the index (bad body, unknown worker, ...), by reason"
    );
    describe_counter!(
        "kvindex_events_logged_total",
        "Events appended to the event log"
    );
    describe_gauge!("kvindex_log_next_lsn", "LSN the next appended entry gets");
    describe_gauge!(
        "kvindex_log_synced_lsn",
        "Entries below this LSN are known to be on disk"
    );
    describe_gauge!(
        "kvindex_log_segment_bytes",
        Unit::Bytes,
        "Bytes in the log's segment files"
    );
    describe_gauge!(
        "kvindex_engine_queued_tasks",
        "Events and operations waiting in the index's event-thread queues"
    );
    describe_gauge!(
        "kvindex_recovery_seconds",
        Unit::Seconds,
        "Duration of the start-up recovery (snapshot load and log replay)"
    );
    describe_gauge!(
        "kvindex_recovery_entries",
        "Log entries replayed by the start-up recovery"
    );
    describe_gauge!(
        "kvindex_index_blocks",
        "(block, worker) pairs held in the device tier, per partition"
    );
    describe_gauge!(
        "kvindex_index_lower_tier_blocks",
        "(block, worker) pairs held in a lower tier (host_pinned, disk, external), per partition"
    );
    describe_gauge!(
        MAP_BYTES,
        "Bytes of the external-hash map of a partition's index, per partition (sized up front by --expected-blocks for partitions with a registered worker)"
    );
    describe_gauge!(
        crate::partitions::DROPS_PENDING,
        "Dropped partitions whose drop could not be logged yet (a partition of that key is created again only once it is)"
    );
    describe_counter!(
        crate::partitions::CREATIONS_REFUSED,
        "Partition creations refused, by reason: max_partitions (--max-partitions reached), max_event_partitions (--max-event-partitions reached by events), drop_not_logged (the drop of the key's previous partition still cannot be logged)"
    );
    kvindex_persistence::describe_metrics();
    kvindex_server::zmq::describe();
    crate::zmq_source::describe();
    crate::nats::metrics::describe();
    crate::http::connections::describe();
    crate::http::body_budget::describe();
    crate::http::dump::describe();
    crate::peers::describe();
}

/// Refresh the gauges that are computed on scrape.
/// `listeners` counts listeners per status, in [`ListenerStatus::ALL`] order.
pub fn refresh(
    view: &RegistryView,
    listeners: [usize; 4],
    log: &kvindex_persistence::EventLog,
    engine_queued: usize,
) {
    metrics::gauge!(MODELS).set(view.partitions.len() as f64);
    metrics::gauge!(WORKERS).set(view.instances.len() as f64);
    let counts = listeners;
    for (status, n) in ListenerStatus::ALL.iter().zip(counts) {
        metrics::gauge!(LISTENERS, "status" => status.as_str()).set(n as f64);
    }
    metrics::gauge!("kvindex_log_next_lsn").set(log.next_lsn() as f64);
    metrics::gauge!("kvindex_log_synced_lsn").set(log.synced_lsn() as f64);
    let bytes: u64 = log
        .segments()
        .iter()
        .filter_map(|(_, p)| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    metrics::gauge!("kvindex_log_segment_bytes").set(bytes as f64);
    metrics::gauge!("kvindex_engine_queued_tasks").set(engine_queued as f64);
    // The exporter has no way to remove one label set, so a partition that was dropped since the
    // previous refresh has its gauges set to 0 (once; later refreshes leave it alone).
    let mut previous = PARTITION_LABELS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let current: BTreeSet<(String, String)> = view
        .partitions
        .values()
        .map(|p| {
            (
                p.spec.key.model_name.clone(),
                p.spec.key.routing_group.clone(),
            )
        })
        .collect();
    for (model, group) in previous.difference(&current) {
        metrics::gauge!(
            "kvindex_index_blocks",
            "model_name" => model.clone(),
            "routing_group" => group.clone()
        )
        .set(0.0);
        metrics::gauge!(
            MAP_BYTES,
            "model_name" => model.clone(),
            "routing_group" => group.clone()
        )
        .set(0.0);
        for tier in LOWER_TIERS {
            metrics::gauge!(
                "kvindex_index_lower_tier_blocks",
                "model_name" => model.clone(),
                "routing_group" => group.clone(),
                "tier" => tier
            )
            .set(0.0);
        }
    }
    *previous = current;
    // `previous` stays locked to the end, so concurrent scrapes do not interleave their updates.
    for p in view.partitions.values() {
        let blocks = p.namespace.as_ref().map_or(0, |ns| ns.current_size());
        metrics::gauge!(
            "kvindex_index_blocks",
            "model_name" => p.spec.key.model_name.clone(),
            "routing_group" => p.spec.key.routing_group.clone()
        )
        .set(blocks as f64);
        let map_bytes = p.namespace.as_ref().map_or(0, |ns| ns.map_bytes());
        metrics::gauge!(
            MAP_BYTES,
            "model_name" => p.spec.key.model_name.clone(),
            "routing_group" => p.spec.key.routing_group.clone()
        )
        .set(map_bytes as f64);
        let mut per_tier = [0usize; 3];
        if let Some(ns) = &p.namespace {
            for (_, tier, n) in ns.lower_tier_block_counts() {
                let i = match tier {
                    StorageTier::HostPinned => 0,
                    StorageTier::Disk => 1,
                    _ => 2,
                };
                per_tier[i] += n;
            }
        }
        for (name, n) in LOWER_TIERS.into_iter().zip(per_tier) {
            metrics::gauge!(
                "kvindex_index_lower_tier_blocks",
                "model_name" => p.spec.key.model_name.clone(),
                "routing_group" => p.spec.key.routing_group.clone(),
                "tier" => name
            )
            .set(n as f64);
        }
    }
}

/// `4xx` / `5xx` for an error status, `None` otherwise.
pub fn status_class(status: u16) -> Option<&'static str> {
    match status {
        400..=499 => Some("4xx"),
        500..=599 => Some("5xx"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_dynamos() {
        let b = request_buckets();
        assert_eq!(b.len(), 20);
        assert!((b[0] - 0.0001).abs() < 1e-12);
        assert!((b[19] - 52.4288).abs() < 1e-9);
    }
}
