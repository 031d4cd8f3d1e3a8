//! ZMQ ingestion of KV-cache events from vLLM / SGLang publishers (SERVICE.md §5, §7).
//!
//! ```text
//! engine PUB ──[topic, seq_be64, msgpack KVEventBatch]──▶ SUB (one per (worker, dp_rank))
//!                                                           │ listener: frames → seq check
//!                                                           │   in order  → decode → EventSink
//!                                                           │   stale     → drop, count
//!                                                           │   gap       → DEALER ──▶ engine ROUTER
//!                                                           │               replay [w+1, s), timeout,
//!                                                           │               bounded retries, backoff
//!                                                           ▼
//!                                                 EventSink::submit(worker, dp, seq, events)
//! ```
//!
//! * [`decode`]: frames and msgpack payloads → typed engine events → kvindex
//!   [`RouterEvent`](kvindex_engine::RouterEvent)s (local hashes recomputed from token ids).
//! * [`listener`]: [`ZmqIngest`], the set of listeners: registration, per-stream sequencing,
//!   replay, pause / resume, status for `/workers`, the [`EventSink`] the service implements.
//! * [`test_publisher`]: a publisher speaking vLLM's wire protocol (PUB + ROUTER replay ring),
//!   with knobs for gaps, a dead replay endpoint and garbage; used by tests and
//!   `examples/vllm_publisher.rs`.
//!
//! # Why the pure-Rust `zeromq` crate
//!
//! kvindex must build on a fresh Debian machine with only the Rust toolchain. The `zmq` crate
//! binds libzmq: it needs the system library (`libzmq3-dev`) or, with its `vendored` feature, a
//! C++ toolchain to compile libzmq from source. `zeromq` (zmq.rs, 0.7) is a native
//! implementation of ZMTP 3.x on tokio: no system library, no build script, and it interoperates
//! on the wire with libzmq peers such as pyzmq inside vLLM and SGLang. It has every socket type
//! this protocol uses — SUB (with automatic reconnection and subscription resync), PUB, DEALER,
//! ROUTER — over tcp and ipc. What it lacks, and how this module copes:
//!
//! * no `inproc` transport (meaningless across processes anyway): such endpoints validate, as in
//!   Dynamo, but the listener reports `failed`;
//! * `connect` waits for the peer instead of returning at once like libzmq: the listener connects
//!   in its own task and reports `connected` separately from its state;
//! * no per-socket receive timeout or heartbeat options: every wait is wrapped in a tokio timeout;
//! * a DEALER does not reconnect by itself: each replay request uses a fresh DEALER (connect
//!   timeout, request, stream, drop), which is indistinguishable on the wire for the publisher's
//!   ROUTER and cannot get stuck on a dead connection;
//! * no maximum message size: its decoder reserves whatever length a frame header announces
//!   (a failed allocation aborts the process), and appends frames to one message for as long
//!   as they carry the MORE flag. Every SUB and DEALER connection therefore goes through
//!   [`frame_guard`], a loopback relay that reads the publisher's frame headers and cuts off a
//!   connection whose message would go past `IngestConfig::max_message_bytes` (64 MiB, all its
//!   frames together) or `IngestConfig::max_message_frames` (8 frames).
//!
//! It requires Rust ≥ 1.89 (the toolchain here is newer).

#![warn(missing_docs)]

pub mod decode;
pub mod frame_guard;
pub mod listener;
mod msgpack;
pub mod test_publisher;

pub use decode::{BatchError, ConvertContext, EventError, FrameError, Rejections, SkipReason};
pub use listener::{
    validate_endpoint, EndpointError, EventSink, IngestConfig, IngestError, ListenerSpec,
    ListenerState, ListenerStatus, SinkError, ZmqIngest,
};
pub use msgpack::MsgpackError;

/// Register the descriptions of the `kvindex_zmq_*` metrics of this module (`# HELP` on
/// `/metrics`); called by the service with the other families at recorder install.
pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(
        listener::METRIC_BATCHES,
        "Live ZMQ batches, by outcome (applied, stale, sink_rejected, sink_unavailable, sink_failed, deferred)"
    );
    describe_counter!(listener::METRIC_GAPS, "ZMQ sequence gaps detected");
    describe_counter!(
        listener::METRIC_REPLAYS,
        "ZMQ replay requests, by outcome (complete, incomplete, failed, not_configured)"
    );
    describe_counter!(
        listener::METRIC_REPLAY_ATTEMPTS,
        "ZMQ replay attempts: each replay request's first try and every retry"
    );
    describe_counter!(
        listener::METRIC_REPLAYED_BATCHES,
        "ZMQ batches received through replay"
    );
    describe_counter!(
        listener::METRIC_LOST_BATCHES,
        "ZMQ sequence numbers skipped for good (not recovered by replay)"
    );
    describe_counter!(
        listener::METRIC_PUBLISHER_RESTARTS,
        "ZMQ publisher sequence restarts seen"
    );
    describe_counter!(
        listener::METRIC_CONNECTION_ERRORS,
        "ZMQ connection errors, by stage (connect, receive, disconnect)"
    );
    describe_counter!(
        frame_guard::METRIC_OVERSIZED_FRAMES,
        "ZMQ publisher connections closed for a frame or multipart message over the limits, by reason (frame, message_bytes, message_frames)"
    );
    describe_counter!(
        decode::METRIC_MESSAGES_DROPPED,
        "ZMQ messages dropped before decoding, by reason (frame_count, seq_length, decode_failed, reserved_seq, and replay_* for replay replies)"
    );
    describe_counter!(
        decode::METRIC_EVENTS_REJECTED,
        "Events refused inside otherwise good ZMQ batches, by reason"
    );
    describe_counter!(
        decode::METRIC_EVENTS_SKIPPED,
        "Well-formed ZMQ events that produce nothing (as in Dynamo), by reason"
    );
    describe_counter!(
        decode::METRIC_EVENTS_DECODED,
        "Events decoded from ZMQ, by event_type (stored, removed, cleared)"
    );
    describe_counter!(
        decode::METRIC_TRUNCATED_STORES,
        "ZMQ stores cut to their last complete block (too few token ids)"
    );
}
