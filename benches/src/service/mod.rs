//! Service load tests (issue #5 §4): the `mooncake-replay v1` trace (`shared/bench/WORKLOAD.md`)
//! driven through the network against a running `kvindex serve` and, when installed, Dynamo
//! 1.6.1's standalone indexer (`python -m dynamo.indexer`), on loopback, in the same run.
//!
//! ```text
//! trace ──▶ ServiceWorkload ──▶ vLLM batches ──▶ VllmPublisher (PUB + ROUTER) per worker ──▶ SUB ─┐
//!                │                                                                               ▼
//!                └──▶ /query, /query_by_hash bodies ──▶ closed-loop HTTP load ──▶  target process
//! ```
//!
//! * [`trace_bodies`]: the workload as service traffic: per-worker vLLM batches (token ids
//!   recovered from the trace's block ids) and JSON query bodies.
//! * [`http`]: a keep-alive HTTP/1.1 connection (hyper) for the load and the control requests.
//! * [`target`]: spawn `kvindex serve` or `python -m dynamo.indexer` on a free loopback port.
//! * [`ingest`]: publishers, `/register`, flooding, "applied and queryable" detection.
//! * [`load`]: closed-loop request load at one concurrency, latency percentiles.
//! * [`agreement`]: answers of a target against exact scoring of the simulated worker caches.
//! * [`summary`]: medians with min–max over runs.
//! * [`plot`]: SVG plots of a summary (plotters).

pub mod agreement;
pub mod http;
pub mod ingest;
pub mod load;
pub mod plot;
pub mod summary;
pub mod target;
pub mod trace_bodies;

/// Why a service load step failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A socket, file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed (connection reset, malformed response, ...).
    #[error("HTTP {context}: {source}")]
    Http {
        context: String,
        #[source]
        source: hyper::Error,
    },
    /// A request could not be built.
    #[error("bad request for {0}")]
    BadRequest(String),
    /// The target answered with an unexpected status.
    #[error("{context}: status {status}: {body}")]
    Status {
        context: String,
        status: u16,
        body: String,
    },
    /// An answer was not the JSON expected.
    #[error("{context}: unexpected answer: {detail}")]
    Answer { context: String, detail: String },
    /// The ZMQ publisher failed.
    #[error("publisher: {0}")]
    Publisher(#[from] kvindex_server::zmq::test_publisher::PublisherError),
    /// Something did not happen in time.
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
    /// A target process exited early.
    #[error("{name} exited early ({status}); last log lines:\n{log}")]
    Exited {
        name: String,
        status: String,
        log: String,
    },
    /// The workload cannot be turned into service traffic.
    #[error("workload: {0}")]
    Workload(String),
    /// A plot could not be drawn.
    #[error("plot {path}: {detail}")]
    Plot { path: String, detail: String },
}

impl ServiceError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| ServiceError::Io { context, source }
    }
}
