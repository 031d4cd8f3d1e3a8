//! Library side of the `kvindex` service: components the binary wires together.
//!
//! * [`nats_subjects`]: the NATS subject layout and name escaping (for the service and for
//!   producers / clients written in Rust).
//! * [`zmq`]: ZMQ ingestion from vLLM / SGLang publishers (decode, per-stream sequencing and
//!   replay, a test publisher speaking vLLM's wire protocol).

pub mod nats_subjects;
pub mod zmq;
