//! Handler errors and their HTTP mapping, in one place: every typed error of the registry and the
//! intake becomes a status code and Dynamo's `{"error": "<message>"}` body (SERVICE.md §3.1).
//! Framework (extractor) errors never come here: axum answers them in plain text itself.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvindex_persistence::PersistError;
use thiserror::Error;

use crate::ingest::IngestError;
use crate::partitions::RegistryError;

/// Everything a handler can fail with.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A request that is well-formed JSON but unusable (400).
    #[error("{0}")]
    BadRequest(String),
    /// An event whose `event_id` is at or above 2^63: kvindex reserves those source sequences
    /// for JetStream (docs/api.md, "Reserved event ids"); Dynamo accepts any u64 (400).
    #[error(
        "event {index}: event_id {event_id} is reserved (kvindex accepts event ids below 2^63 = \
         9223372036854775808; larger ones tag JetStream stream sequences in its log)"
    )]
    ReservedEventId { index: usize, event_id: u64 },
    /// `POST /events?block_size=0` or a NATS `Kvindex-Block-Size: 0` (400): a partition of
    /// block size 0 cannot index events, and would keep later registrations of its model out
    /// (409). Dynamo's `/register` accepts 0, and so does kvindex's.
    #[error(
        "block_size must be at least 1 (got 0): a partition of block size 0 cannot index events"
    )]
    ZeroBlockSize,
    /// A request body whose read deadline passed while it waited for a body budget: the
    /// server is busy, not the client slow (503, `Retry-After: 1`).
    #[error(transparent)]
    BudgetTimeout(#[from] crate::http::body_budget::BudgetTimeout),
    /// Something on our side failed (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Registry(e) => match e {
                RegistryError::AlreadyRegistered { .. }
                | RegistryError::RegisteredForOther { .. }
                | RegistryError::BlockSizeMismatch { .. }
                | RegistryError::CannotPause { .. }
                | RegistryError::CannotResume { .. }
                | RegistryError::PartitionLimit { .. }
                | RegistryError::TooManyPartitions { .. } => StatusCode::CONFLICT,
                RegistryError::InstanceNotFound(_)
                | RegistryError::WrongPartition { .. }
                | RegistryError::DpRankNotFound { .. }
                | RegistryError::NoIndexer { .. }
                | RegistryError::PeerNotFound => StatusCode::NOT_FOUND,
                RegistryError::File { .. } | RegistryError::Index(_) => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                // The log refused the drop it needs first: as a log that refuses events.
                RegistryError::DropNotLogged { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            ApiError::Ingest(e) => match e {
                IngestError::NoIndexer { .. } => StatusCode::NOT_FOUND,
                IngestError::ZeroBlockSize { .. } => StatusCode::CONFLICT,
                IngestError::Log(PersistError::WriterFailed { .. }) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                IngestError::Log(PersistError::RecordTooLarge { .. }) => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                IngestError::Log(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            ApiError::BadRequest(_)
            | ApiError::ReservedEventId { .. }
            | ApiError::ZeroBlockSize => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::BudgetTimeout(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        if let ApiError::BudgetTimeout(_) = self {
            // Overload, counted in kvindex_http_read_timeouts_total{stage="budget"}.
            tracing::warn!(error = %self, "request refused");
            return (status, [(header::RETRY_AFTER, "1")], body).into_response();
        }
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        (status, body).into_response()
    }
}
