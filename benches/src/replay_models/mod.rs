//! §3 event replay (issue #5): how a consumer that missed events catches up, on the same event
//! stream, under three designs.
//!
//! * [`vllm_buffer`]: a model of vLLM's bounded replay buffer (last 10,000 batches, linear
//!   scan, nothing older);
//! * [`dynamo_local`]: a model of Dynamo's worker-side local indexer (last 1,024 events, tree
//!   dump when the request is older), around Dynamo's own `RadixTree`;
//! * [`kvindex_log`]: kvindex's real persistence crate (log on disk, snapshot + log tail);
//! * [`stream`]: the batches and the state digest every result is checked against;
//! * [`consumer`]: the fresh index a replay is applied to.
//!
//! The `replay-compare` binary measures them; `docs/benchmarks-replay.md` has the method and
//! the results.

pub mod consumer;
pub mod dynamo_local;
pub mod kvindex_log;
pub mod stream;
pub mod vllm_buffer;
