//! Metric names of the NATS transport (all `kvindex_nats_*`) and their descriptions.

use metrics::{describe_counter, describe_gauge};

/// Event messages received, by `source` (`core` / `jetstream`).
pub const RECEIVED: &str = "kvindex_nats_messages_received_total";
/// Event messages refused, by `source` and `reason` (`subject`, `decode`, `unknown_partition`,
/// `block_size`, `too_large`, `log`, `invalid`).
pub const REJECTED: &str = "kvindex_nats_messages_rejected_total";
/// Events (not messages) logged and applied, by `source`.
pub const EVENTS_ACCEPTED: &str = "kvindex_nats_events_accepted_total";
/// JetStream acknowledgements sent, by `kind`: `ack` (durable now), `duplicate` (a
/// redelivery already durable, or a second copy in one batch), `term` (bad message), `nak` (log
/// failure, retried later), `returned` (received but not handled at shutdown or at a consumer
/// re-setup: given back with an immediate nak).
pub const JS_ACKS: &str = "kvindex_nats_jetstream_acks_total";
/// JetStream errors, by `stage`: `setup` (stream / consumer not ready), `pull` (the pull
/// stream reported an error), `info` (a message without usable delivery info), `ack` (an
/// acknowledgement not sent), `floor` (the consumer's ack floor not read), `identity` (the
/// stored stream identity unreadable or damaged).
pub const JS_ERRORS: &str = "kvindex_nats_jetstream_errors_total";
/// Ranges in the set of logged JetStream sequences (after its last pruning).
pub const JS_DEDUP_RANGES: &str = "kvindex_nats_jetstream_dedup_ranges";
/// Query requests answered, by `kind` (`query` / `query_by_hash`) and `outcome`
/// (`ok` / `error`).
pub const QUERIES: &str = "kvindex_nats_query_requests_total";
/// 1 while the client is connected to a NATS server, 0 otherwise.
pub const CONNECTED: &str = "kvindex_nats_connected";
/// Connection events (`connected`, `disconnected`, `error`, ...), by `event`.
pub const CONNECTION_EVENTS: &str = "kvindex_nats_connection_events_total";
/// 1 while a subscription / the durable consumer is set up, by `subscription`.
pub const SUBSCRIPTION_UP: &str = "kvindex_nats_subscription_up";

/// Register the descriptions (called with the other families at recorder install).
pub fn describe() {
    describe_counter!(
        RECEIVED,
        "NATS event messages received, by source (core, jetstream)"
    );
    describe_counter!(
        REJECTED,
        "NATS event messages refused (counted, logged, never applied), by source and reason"
    );
    describe_counter!(
        EVENTS_ACCEPTED,
        "Events from NATS logged durably and applied, by source"
    );
    describe_counter!(
        JS_ACKS,
        "JetStream acknowledgements sent, by kind (ack, duplicate, term, nak, returned)"
    );
    describe_counter!(
        JS_ERRORS,
        "JetStream consumer errors (logged), by stage (setup, pull, info, ack, floor, identity)"
    );
    describe_gauge!(
        JS_DEDUP_RANGES,
        "Ranges in the set of logged JetStream stream sequences, after its last pruning"
    );
    describe_counter!(
        QUERIES,
        "Query requests answered over NATS request/reply, by kind and outcome"
    );
    describe_gauge!(CONNECTED, "1 while connected to a NATS server");
    describe_counter!(CONNECTION_EVENTS, "NATS client connection events, by event");
    describe_gauge!(
        SUBSCRIPTION_UP,
        "1 while a NATS subscription or the JetStream consumer is set up, by subscription"
    );
}
