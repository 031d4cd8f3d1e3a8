//! Descriptions (`# HELP` on a Prometheus `/metrics`) of the metrics this crate emits: the
//! `kvindex_log_*` writer counters, `kvindex_lsn_index_*`, `kvindex_recovery_*` and
//! `kvindex_snapshot*` (log-format.md §5). The service calls [`describe_metrics`] when it
//! installs its recorder.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Register the descriptions of every metric of this crate with the installed recorder.
pub fn describe_metrics() {
    describe_counter!(
        "kvindex_log_bytes_written_total",
        Unit::Bytes,
        "Bytes written to the event log's segments"
    );
    describe_counter!(
        "kvindex_log_group_commits_total",
        "Group commits of the log writer (one write of buffered entries)"
    );
    describe_counter!(
        "kvindex_log_fsyncs_total",
        "fdatasync calls of the log writer"
    );
    describe_histogram!(
        "kvindex_log_sync_seconds",
        Unit::Seconds,
        "Duration of each log write followed by fdatasync"
    );
    describe_counter!(
        "kvindex_log_writer_failures_total",
        "Log writer stops after an I/O error (the log takes no more entries)"
    );
    describe_counter!("kvindex_log_segments_created_total", "Log segments created");
    describe_counter!(
        "kvindex_log_segments_deleted_total",
        "Log segments deleted by compaction"
    );
    describe_counter!(
        "kvindex_lsn_index_fallbacks_total",
        "Segment LSN indexes not usable by a reader (the segment is scanned instead), by reason"
    );
    describe_counter!(
        "kvindex_lsn_index_rebuilt_total",
        "Segment LSN indexes rewritten by recovery"
    );
    describe_counter!(
        "kvindex_lsn_index_write_failures_total",
        "Segment LSN indexes that could not be written (readers scan the segment)"
    );
    describe_counter!(
        "kvindex_recovery_truncated_bytes_total",
        Unit::Bytes,
        "Bytes cut off damaged log tails by recovery"
    );
    describe_counter!(
        "kvindex_recovery_skipped_bytes_total",
        Unit::Bytes,
        "Bytes skipped inside the log by recovery (skip-corrupt)"
    );
    describe_counter!(
        "kvindex_recovery_skipped_regions_total",
        "Damaged log regions skipped or cut by recovery, by reason"
    );
    describe_counter!(
        "kvindex_recovery_lost_lsns_total",
        "LSNs known lost by recovery (gaps in the LSN sequence)"
    );
    describe_counter!(
        "kvindex_recovery_replayed_entries_total",
        "Log entries replayed by recovery"
    );
    describe_gauge!(
        "kvindex_recovery_progress_ratio",
        "Bytes of the log scanned / bytes to scan, during recovery"
    );
    describe_counter!("kvindex_snapshots_written_total", "Snapshots written");
    describe_counter!(
        "kvindex_snapshot_failures_total",
        "Snapshot attempts that failed (one per attempt; retries back off)"
    );
    describe_counter!(
        "kvindex_snapshot_load_failures_total",
        "Snapshots that failed validation at load (an older one, or the log, is used)"
    );
    describe_gauge!(
        "kvindex_snapshot_bytes",
        Unit::Bytes,
        "Size of the last snapshot written"
    );
    describe_histogram!(
        "kvindex_snapshot_seconds",
        Unit::Seconds,
        "Duration of each snapshot write"
    );
}
