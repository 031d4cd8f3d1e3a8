//! A memory budget for the bodies of `POST /events` being read and decoded at once.
//!
//! Why: a body may be 8 MiB, and a msgpack body of positional arrays decodes to about 16 times
//! its size in events; with up to `--http-max-connections` (4096) requests at once, nothing else
//! bounded that memory. Each request now claims its body's length (its `Content-Length`, or the
//! whole body limit when it has none) before the body is read, and gives it back once its events
//! are handed to the index and the log. A request that does not fit waits (its body deadline,
//! `--http-read-timeout-ms`, keeps running), so the bodies in flight never exceed
//! `--http-events-inflight-mib`, and their decoded events about 17 times that.

use axum::http::{header, HeaderMap};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Gauge: bytes of `POST /events` bodies claimed (being read, decoded or submitted).
pub const BODY_BYTES_IN_FLIGHT: &str = "kvindex_http_events_body_bytes_in_flight";
/// Counter: `POST /events` requests that had to wait for the budget.
pub const BODY_BUDGET_WAITS_TOTAL: &str = "kvindex_http_events_body_budget_waits_total";

/// Default budget: 32 MiB of bodies (a few hundred typical event batches at once, four bodies
/// of the maximum size).
pub const DEFAULT_EVENTS_BODY_BUDGET: usize = 32 << 20;

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_gauge!(
        BODY_BYTES_IN_FLIGHT,
        "Bytes of POST /events bodies being read, decoded or submitted (bounded by --http-events-inflight-mib)"
    );
    metrics::describe_counter!(
        BODY_BUDGET_WAITS_TOTAL,
        "POST /events requests that waited because --http-events-inflight-mib of bodies were in flight"
    );
}

/// The budget shared by every `POST /events` request of the process.
#[derive(Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// Bytes claimed by one request; given back when dropped.
#[derive(Debug)]
pub struct Claim {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Drop for Claim {
    fn drop(&mut self) {
        metrics::gauge!(BODY_BYTES_IN_FLIGHT).decrement(self.bytes as f64);
    }
}

impl BodyBudget {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// How many bytes a request with these headers claims: its declared length, or `limit`
    /// when it declares none. A declared length over `limit` claims nothing: the body limit
    /// refuses it (413) before any of it is read. A claim never exceeds the whole budget, so
    /// the largest body still gets through, alone.
    pub fn claim_size(&self, headers: &HeaderMap, limit: usize) -> usize {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = match declared {
            Some(n) if n > limit as u64 => 0,
            Some(n) => n as usize,
            None => limit,
        };
        bytes.min(self.total)
    }

    /// Claim `bytes`, waiting while the budget is used up.
    pub async fn claim(&self, bytes: usize) -> Claim {
        let permit = if bytes == 0 {
            None
        } else {
            // `bytes` is at most the body limit (8 MiB), far below u32::MAX.
            let n = u32::try_from(bytes).unwrap_or(u32::MAX);
            let permit = match Arc::clone(&self.permits).try_acquire_many_owned(n) {
                Ok(p) => p,
                Err(_) => {
                    metrics::counter!(BODY_BUDGET_WAITS_TOTAL).increment(1);
                    match Arc::clone(&self.permits).acquire_many_owned(n).await {
                        Ok(p) => p,
                        // The semaphore is never closed; without a permit the request
                        // proceeds unaccounted rather than fail.
                        Err(_) => {
                            return Claim {
                                _permit: None,
                                bytes: 0,
                            }
                        }
                    }
                }
            };
            Some(permit)
        };
        metrics::gauge!(BODY_BYTES_IN_FLIGHT).increment(bytes as f64);
        Claim {
            _permit: permit,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_length(n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_str(n).unwrap());
        h
    }

    #[test]
    fn a_request_claims_its_declared_length_or_the_limit() {
        let b = BodyBudget::new(1000);
        assert_eq!(b.claim_size(&with_length("300"), 500), 300);
        assert_eq!(b.claim_size(&HeaderMap::new(), 500), 500);
        // Over the body limit: refused before reading, so nothing to claim.
        assert_eq!(b.claim_size(&with_length("501"), 500), 0);
        assert_eq!(b.claim_size(&with_length("junk"), 500), 500);
        // Never more than the whole budget.
        assert_eq!(
            BodyBudget::new(100).claim_size(&with_length("300"), 500),
            100
        );
    }

    #[tokio::test]
    async fn claims_beyond_the_budget_wait_for_earlier_ones() {
        let b = BodyBudget::new(1000);
        let first = b.claim(700).await;
        let mut second = Box::pin(b.claim(400));
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "1,100 bytes claimed of 1,000"
        );
        drop(first);
        let _second = second.await;
        assert!(futures::poll!(Box::pin(b.claim(700))).is_pending());
        assert!(futures::poll!(Box::pin(b.claim(600))).is_ready());
    }
}
