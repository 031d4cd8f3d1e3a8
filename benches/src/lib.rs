//! Benchmark harness: the `mooncake-replay v1` workload (`shared/bench/WORKLOAD.md`), the
//! backends it drives (our engine and NVIDIA Dynamo 1.6.1's indexers) and its measurements.

pub mod backend;
pub mod backend_kvindex;
pub mod machine;
pub mod replay;
pub mod replay_models;
pub mod service;
pub mod sweep;
pub mod workload;
