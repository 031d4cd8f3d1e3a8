//! Library side of the `kvindex` service: components the binary wires together.
//!
//! * [`zmq`]: ZMQ ingestion from vLLM / SGLang publishers (decode, per-stream sequencing and
//!   replay, a test publisher speaking vLLM's wire protocol).

pub mod zmq;
