//! The hook between registrations and event sources. The registry ([`crate::partitions`]) asks a
//! [`ListenerSupervisor`] to start, stop, pause and resume one listener per (instance, dp_rank);
//! the ZMQ ingestion (written separately, in `src/zmq/`) implements it, reports status changes
//! with [`crate::partitions::Partitions::set_listener_status`] and hands decoded events to
//! [`crate::ingest::IngestSink`]. Until it is wired in, [`NoListeners`] keeps every listener
//! `pending` and says so in `last_error`.

use serde::Serialize;

/// A listener's state, as `/workers` shows it (SERVICE.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerStatus {
    Pending,
    Active,
    Paused,
    Failed,
}

impl ListenerStatus {
    /// Every status, in `/metrics` order.
    pub const ALL: [ListenerStatus; 4] = [
        ListenerStatus::Pending,
        ListenerStatus::Active,
        ListenerStatus::Paused,
        ListenerStatus::Failed,
    ];

    /// Lowercase name (JSON and metric label).
    pub fn as_str(&self) -> &'static str {
        match self {
            ListenerStatus::Pending => "pending",
            ListenerStatus::Active => "active",
            ListenerStatus::Paused => "paused",
            ListenerStatus::Failed => "failed",
        }
    }

    /// Aggregation priority of a worker's status: failed > pending > active > paused.
    pub fn priority(&self) -> u8 {
        match self {
            ListenerStatus::Failed => 3,
            ListenerStatus::Pending => 2,
            ListenerStatus::Active => 1,
            ListenerStatus::Paused => 0,
        }
    }
}

/// What a supervisor reports for a listener: its status and, if any, the last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerState {
    pub status: ListenerStatus,
    pub last_error: Option<String>,
}

/// Live details of a running listener, shown in `/workers` next to Dynamo's fields (our
/// extras: a client that ignores unknown keys sees Dynamo's shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerDetails {
    /// The replay endpoint failed its last request: gaps are not being filled.
    pub degraded: bool,
    /// A replay is in progress.
    pub replaying: bool,
    /// Whether the SUB socket currently has a connection to the publisher.
    pub connected: bool,
    /// Last sequence number handed to the index (`null` = unset).
    pub watermark: Option<u64>,
    /// Sequence gaps detected.
    pub gaps: u64,
    /// Replay requests made.
    pub replays: u64,
    /// Batches received through replay.
    pub replayed_batches: u64,
    /// Sequence numbers skipped for good (events lost).
    pub lost_batches: u64,
}

/// Everything a listener needs to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
    pub instance_id: u64,
    pub dp_rank: u32,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    /// The log's next LSN when this registration was made: every batch of this registration is
    /// logged at or after it, so a durable watermark below it belongs to an earlier
    /// registration of the same stream (unregistered since) and must not be resumed from.
    pub registered_at_lsn: u64,
}

/// Starts and stops the per-(instance, dp_rank) event listeners. Implemented by the ZMQ
/// ingestion; calls come from the registry while it holds its write lock, so they must not
/// block for long (start the socket work on another thread and report back with
/// `Partitions::set_listener_status`).
pub trait ListenerSupervisor: Send + Sync {
    /// A registration was accepted (or restored at start-up): start listening.
    fn start(&self, spec: &ListenerSpec) -> ListenerState;
    /// The registration is gone: stop and forget the listener (and its watermark).
    fn stop(&self, instance_id: u64, dp_rank: u32);
    /// [`Self::stop`], returning the listener's watermark at that moment (the last sequence it
    /// handed to the index; `None`: unset, or not tracked), for [`Self::restart`] should the
    /// removal that stopped it fail.
    fn stop_with_watermark(&self, instance_id: u64, dp_rank: u32) -> Option<u64> {
        self.stop(instance_id, dp_rank);
        None
    }
    /// Start again a listener that [`Self::stop_with_watermark`] stopped for a removal that then
    /// failed: after `resume_after`, the watermark it had, so that it goes on where it stopped
    /// (a fresh start would replay the publisher's buffer from 0 over the live index).
    fn restart(&self, spec: &ListenerSpec, resume_after: Option<u64>) -> ListenerState {
        let _ = resume_after;
        self.start(spec)
    }
    /// Test route: stop receiving, keep the watermark.
    fn pause(&self, instance_id: u64, dp_rank: u32) -> ListenerState;
    /// Test route: receive again.
    fn resume(&self, spec: &ListenerSpec) -> ListenerState;
    /// Stop everything at shutdown.
    fn shutdown(&self) {}
    /// The listener's live state and details, when the supervisor tracks it (`None`: the
    /// registry's stored state is authoritative).
    fn live(&self, _instance_id: u64, _dp_rank: u32) -> Option<(ListenerState, ListenerDetails)> {
        None
    }
}

/// The supervisor used until ZMQ ingestion is wired in: registrations are stored and shown,
/// nothing is received (events arrive through `POST /events`).
pub struct NoListeners;

/// `last_error` shown by [`NoListeners`].
pub const NO_ZMQ_NOTE: &str =
    "ZMQ ingestion is not wired into this build yet; send events with POST /events";

impl ListenerSupervisor for NoListeners {
    fn start(&self, _spec: &ListenerSpec) -> ListenerState {
        ListenerState {
            status: ListenerStatus::Pending,
            last_error: Some(NO_ZMQ_NOTE.into()),
        }
    }
    fn stop(&self, _instance_id: u64, _dp_rank: u32) {}
    fn pause(&self, _instance_id: u64, _dp_rank: u32) -> ListenerState {
        ListenerState {
            status: ListenerStatus::Paused,
            last_error: None,
        }
    }
    fn resume(&self, spec: &ListenerSpec) -> ListenerState {
        self.start(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_status_priority_is_failed_pending_active_paused() {
        use ListenerStatus::*;
        let worst = |states: &[ListenerStatus]| states.iter().copied().max_by_key(|s| s.priority());
        assert_eq!(worst(&[Paused, Active, Pending, Failed]), Some(Failed));
        assert_eq!(worst(&[Paused, Active, Pending]), Some(Pending));
        assert_eq!(worst(&[Paused, Active]), Some(Active));
        assert_eq!(worst(&[Paused]), Some(Paused));
    }
}
