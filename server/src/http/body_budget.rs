//! Memory budgets for request bodies being read and decoded at once: one for `POST /events`
//! (`--http-events-inflight-mib`), one for `POST /query` and `POST /query_by_hash`
//! (`--http-query-inflight-mib`).
//!
//! Why: a body may be 8 MiB, a msgpack `/events` body of positional arrays decodes to about 16
//! times its size in events, and with up to `--http-max-connections` (4096) requests at once
//! nothing else bounded that memory.
//!
//! **Bytes are claimed as they arrive.** A request's body is wrapped ([`BodyBudget::wrap`]) so
//! that each chunk is claimed once it has been received, before it is handed to the extractor;
//! the request keeps its claim until it is done with the bytes (for `/events`, until its events
//! are handed to the index and the log) and gives it back at once then. A request whose head
//! declares 8 MiB but that sends no body holds nothing, so connections that send only heads
//! cannot starve the others (they did when a request claimed its whole `Content-Length` before
//! the first byte arrived). A chunk that does not fit waits, and while it waits the request
//! reads nothing more from its socket; the wait counts against the request's body deadline
//! (`--http-read-timeout-ms`). A request whose deadline passes while it waits for the budget
//! is not slow, the server is busy: it is answered `503` with `Retry-After` (not the `400` of a
//! slow body) and counted in `kvindex_http_read_timeouts_total{stage="budget"}`.
//!
//! **No deadlock between partly read bodies.** Each request's *need* is known up front: its
//! `Content-Length`, or the body limit when it declares none (never more than the whole budget;
//! a body larger than the budget claims the whole budget and reads the rest unclaimed, alone).
//! Partly read requests could otherwise each hold part of the budget and all wait for more,
//! until their deadlines. So a chunk is granted only if, afterwards, the requests holding budget
//! can still all finish in some order, each with what is free plus what the ones before it give
//! back (the banker's algorithm, for one resource): some request can always finish.
//!
//! **The bound.** Claimed bytes never exceed the budget. Beyond it, each waiting request holds
//! the one chunk it received and waits to claim (at most hyper's read buffer, about 400 KiB),
//! and a body larger than the whole budget holds its unclaimed rest.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::Notify;

use super::connections::{BodyDeadline, READ_TIMEOUTS_TOTAL};

/// Gauge: bytes of `POST /events` bodies claimed (read, being decoded or submitted).
pub const BODY_BYTES_IN_FLIGHT: &str = "kvindex_http_events_body_bytes_in_flight";
/// Counter: `POST /events` requests that had to wait for the budget.
pub const BODY_BUDGET_WAITS_TOTAL: &str = "kvindex_http_events_body_budget_waits_total";
/// Gauge: bytes of `POST /query` and `POST /query_by_hash` bodies claimed.
pub const QUERY_BODY_BYTES_IN_FLIGHT: &str = "kvindex_http_query_body_bytes_in_flight";
/// Counter: `POST /query` and `POST /query_by_hash` requests that had to wait for the budget.
pub const QUERY_BODY_BUDGET_WAITS_TOTAL: &str = "kvindex_http_query_body_budget_waits_total";

/// Default `/events` budget: 32 MiB of bodies (a few hundred typical event batches at once,
/// four bodies of the maximum size).
pub const DEFAULT_EVENTS_BODY_BUDGET: usize = 32 << 20;
/// Default `/query` + `/query_by_hash` budget: 32 MiB of bodies.
pub const DEFAULT_QUERY_BODY_BUDGET: usize = 32 << 20;

/// The metrics of one budget, and the flag that sets it (named in its `503`).
#[derive(Debug, Clone, Copy)]
pub struct BudgetMetrics {
    /// Gauge of the bytes claimed.
    pub in_flight: &'static str,
    /// Counter of the requests that waited.
    pub waits: &'static str,
    /// The command-line flag of the budget.
    pub flag: &'static str,
}

/// Metrics of the `POST /events` budget.
pub const EVENTS_METRICS: BudgetMetrics = BudgetMetrics {
    in_flight: BODY_BYTES_IN_FLIGHT,
    waits: BODY_BUDGET_WAITS_TOTAL,
    flag: "--http-events-inflight-mib",
};
/// Metrics of the query budget.
pub const QUERY_METRICS: BudgetMetrics = BudgetMetrics {
    in_flight: QUERY_BODY_BYTES_IN_FLIGHT,
    waits: QUERY_BODY_BUDGET_WAITS_TOTAL,
    flag: "--http-query-inflight-mib",
};

/// Why a request body stopped: its deadline passed while it waited for the budget (the server
/// was busy reading other bodies). Answered `503` by the routes, not as a slow body.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "request body not read within {timeout_ms} ms: the server is busy reading other request \
     bodies ({flag} in flight); retry later"
)]
pub struct BudgetTimeout {
    pub timeout_ms: u128,
    pub flag: &'static str,
}

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_gauge!(
        BODY_BYTES_IN_FLIGHT,
        "Bytes of POST /events bodies received and not yet submitted (bounded by --http-events-inflight-mib)"
    );
    metrics::describe_counter!(
        BODY_BUDGET_WAITS_TOTAL,
        "POST /events requests that waited because --http-events-inflight-mib of bodies were in flight"
    );
    metrics::describe_gauge!(
        QUERY_BODY_BYTES_IN_FLIGHT,
        "Bytes of POST /query and /query_by_hash bodies received and not yet answered (bounded by --http-query-inflight-mib)"
    );
    metrics::describe_counter!(
        QUERY_BODY_BUDGET_WAITS_TOTAL,
        "POST /query and /query_by_hash requests that waited because --http-query-inflight-mib of bodies were in flight"
    );
}

/// A budget shared by the requests of some routes.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    total: usize,
    metrics: BudgetMetrics,
    ledger: Mutex<Ledger>,
    /// Woken whenever claimed bytes are given back or a request's need shrinks.
    released: Notify,
    next_id: AtomicU64,
}

/// Who holds what.
#[derive(Debug, Default)]
struct Ledger {
    available: usize,
    /// Requests holding bytes (those holding none cannot keep anyone waiting).
    holders: HashMap<u64, Holding>,
    /// Sum of `need` over `holders`.
    needs: usize,
}

#[derive(Debug, Clone, Copy)]
struct Holding {
    held: usize,
    /// What it may still claim before its body is complete.
    need: usize,
}

impl Ledger {
    /// Grant `bytes` more to request `id` (whose need, before it held anything, was `cap`), if
    /// they are free and the ledger stays safe. Bytes beyond its need are not claimed.
    fn try_grant(&mut self, id: u64, cap: usize, bytes: usize) -> Option<usize> {
        let before = self.holders.get(&id).copied();
        let h = before.unwrap_or(Holding { held: 0, need: cap });
        let n = bytes.min(h.need);
        if n == 0 {
            return Some(0);
        }
        if n > self.available {
            return None;
        }
        let after = Holding {
            held: h.held + n,
            need: h.need - n,
        };
        let available = self.available - n;
        let needs = self.needs - before.map_or(0, |b| b.need) + after.need;
        if !self.safe_with(id, after, available, needs) {
            return None;
        }
        self.holders.insert(id, after);
        self.available = available;
        self.needs = needs;
        Some(n)
    }

    /// Whether the holders, with `id` holding `with`, can all finish in some order: sorted by
    /// need, each must fit in what is free plus what the ones before it gave back.
    fn safe_with(&self, id: u64, with: Holding, available: usize, needs: usize) -> bool {
        if needs <= available {
            return true;
        }
        let mut order: Vec<(usize, usize)> = self
            .holders
            .iter()
            .filter(|(k, _)| **k != id)
            .map(|(_, h)| (h.need, h.held))
            .chain(std::iter::once((with.need, with.held)))
            .collect();
        order.sort_unstable();
        let mut free = available;
        for (need, held) in order {
            if need > free {
                return false;
            }
            free += held;
        }
        true
    }

    /// Request `id`'s body is complete: it needs nothing more.
    fn complete(&mut self, id: u64) {
        if let Some(h) = self.holders.get_mut(&id) {
            self.needs -= h.need;
            h.need = 0;
        }
    }

    /// Request `id` is done: what it held is free again. Returns the bytes given back.
    fn release(&mut self, id: u64) -> usize {
        match self.holders.remove(&id) {
            Some(h) => {
                self.needs -= h.need;
                self.available += h.held;
                h.held
            }
            None => 0,
        }
    }
}

/// Bytes claimed by one request; given back when the last handle (the request's [`Claim`] and
/// its wrapped body) is dropped.
#[derive(Debug)]
struct ClaimInner {
    shared: Arc<Shared>,
    id: u64,
    /// What the request may claim in all.
    cap: usize,
    waited: AtomicBool,
    /// Set when the body's deadline passed while it waited for the budget.
    timed_out: Mutex<Option<BudgetTimeout>>,
}

/// A request's claim on a budget: keep it while the request still holds its body's bytes (or
/// what they decoded to).
#[derive(Debug)]
pub struct Claim(Arc<ClaimInner>);

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClaimInner {
    fn try_grant(&self, bytes: usize) -> bool {
        let granted = self.shared.ledger().try_grant(self.id, self.cap, bytes);
        match granted {
            Some(n) => {
                if n > 0 {
                    metrics::gauge!(self.shared.metrics.in_flight).increment(n as f64);
                }
                true
            }
            None => false,
        }
    }

    /// Claim `bytes`, waiting until they are granted.
    async fn grant(self: Arc<Self>, bytes: usize) {
        loop {
            let released = self.shared.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is not missed.
            released.as_mut().enable();
            if self.try_grant(bytes) {
                return;
            }
            if !self.waited.swap(true, Ordering::Relaxed) {
                metrics::counter!(self.shared.metrics.waits).increment(1);
            }
            released.await;
        }
    }

    fn complete(&self) {
        self.shared.ledger().complete(self.id);
        self.shared.released.notify_waiters();
    }

    /// The body's deadline (of `timeout`) passed while it waited for the budget.
    fn time_out(&self, timeout: std::time::Duration) -> BudgetTimeout {
        let e = BudgetTimeout {
            timeout_ms: timeout.as_millis(),
            flag: self.shared.metrics.flag,
        };
        *self.timed_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
        e
    }
}

impl Drop for ClaimInner {
    fn drop(&mut self) {
        let released = self.shared.ledger().release(self.id);
        if released > 0 {
            metrics::gauge!(self.shared.metrics.in_flight).decrement(released as f64);
            self.shared.released.notify_waiters();
        }
    }
}

impl Claim {
    /// Why the request's body failed if its deadline passed while it waited for the budget
    /// (the route answers `503` then, instead of the body extractor's `400`).
    pub fn budget_timeout(&self) -> Option<BudgetTimeout> {
        *self.0.timed_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `bytes` more, waiting while they do not fit (tests drive the ledger with it).
    #[cfg(test)]
    pub(crate) async fn claim(&self, bytes: usize) {
        Arc::clone(&self.0).grant(bytes).await
    }
}

impl BodyBudget {
    /// A budget of `total` bytes (at least 1), reporting to `metrics`.
    pub fn new(total: usize, metrics: BudgetMetrics) -> Self {
        let total = total.max(1);
        BodyBudget {
            shared: Arc::new(Shared {
                total,
                metrics,
                ledger: Mutex::new(Ledger {
                    available: total,
                    ..Ledger::default()
                }),
                released: Notify::new(),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// How much a request with these headers may claim in all: its declared length, or `limit`
    /// when it declares none (or more than `limit`: the body limit refuses it with 413 once
    /// `limit` bytes are read), and never more than the whole budget, so that the largest body
    /// still gets through, alone.
    pub fn claim_size(&self, headers: &HeaderMap, limit: usize) -> usize {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let bytes = match declared {
            Some(n) if n <= limit as u64 => n as usize,
            _ => limit,
        };
        bytes.min(self.shared.total)
    }

    /// A claim that may grow to `cap` bytes; it holds nothing yet.
    pub fn claimant(&self, cap: usize) -> Claim {
        Claim(Arc::new(ClaimInner {
            shared: Arc::clone(&self.shared),
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            cap: cap.min(self.shared.total),
            waited: AtomicBool::new(false),
            timed_out: Mutex::new(None),
        }))
    }

    /// Wrap `req`'s body (of at most `limit` bytes) so that its bytes are claimed as they
    /// arrive. The claim lasts until both the returned [`Claim`] and the body are dropped.
    pub fn wrap(&self, req: Request, limit: usize) -> (Request, Claim) {
        let claim = self.claimant(self.claim_size(req.headers(), limit));
        let deadline = req.extensions().get::<BodyDeadline>().copied();
        let inner = Arc::clone(&claim.0);
        let req = req.map(|body| Body::new(ClaimedBody::new(body, inner, deadline)));
        (req, claim)
    }
}

/// A chunk received and waiting for its claim.
struct Waiting {
    frame: Frame<Bytes>,
    grant: Pin<Box<dyn Future<Output = ()> + Send>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A request body whose chunks are handed on only once claimed.
struct ClaimedBody {
    inner: Body,
    claim: Arc<ClaimInner>,
    deadline: Option<BodyDeadline>,
    waiting: Option<Waiting>,
    failed: bool,
}

impl ClaimedBody {
    fn new(inner: Body, claim: Arc<ClaimInner>, deadline: Option<BodyDeadline>) -> Self {
        ClaimedBody {
            inner,
            claim,
            deadline,
            waiting: None,
            failed: false,
        }
    }
}

impl HttpBody for ClaimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let mut waiting = match self.waiting.take() {
            Some(w) => w,
            None => {
                let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(None) => {
                        self.claim.complete();
                        return Poll::Ready(None);
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                    Poll::Ready(Some(Ok(frame))) => frame,
                };
                let bytes = frame.data_ref().map_or(0, Bytes::len);
                if self.claim.try_grant(bytes) {
                    return Poll::Ready(Some(Ok(frame)));
                }
                Waiting {
                    frame,
                    grant: Box::pin(Arc::clone(&self.claim).grant(bytes)),
                    deadline: self
                        .deadline
                        .map(|d| Box::pin(tokio::time::sleep_until(d.at))),
                }
            }
        };
        // The deadline first: a grant that comes once the deadline has passed (the request
        // that held the budget timed out in the same timer tick) is too late.
        let now = tokio::time::Instant::now();
        let expired = waiting.deadline.as_mut().is_some_and(|d| {
            let fired = d.as_mut().poll(cx).is_ready();
            fired || d.deadline() <= now
        });
        if !expired && waiting.grant.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Ok(waiting.frame)));
        }
        if expired {
            // Not a slow client: the server is busy (the route answers 503).
            self.failed = true;
            metrics::counter!(READ_TIMEOUTS_TOTAL, "stage" => "budget").increment(1);
            let timeout = self.deadline.map(|d| d.timeout).unwrap_or_default();
            return Poll::Ready(Some(Err(Box::new(self.claim.time_out(timeout)))));
        }
        self.waiting = Some(waiting);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.waiting.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use http_body_util::BodyExt;

    fn with_length(n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_str(n).unwrap());
        h
    }

    fn budget(total: usize) -> BodyBudget {
        BodyBudget::new(total, EVENTS_METRICS)
    }

    /// Whether a new request that may claim `cap` gets its first `bytes` at once (its claim is
    /// given back before this returns).
    async fn fits(b: &BodyBudget, cap: usize, bytes: usize) -> bool {
        let c = b.claimant(cap);
        let granted = futures::poll!(Box::pin(c.claim(bytes))).is_ready();
        granted
    }

    #[test]
    fn a_request_may_claim_its_declared_length_or_the_limit() {
        let b = budget(1000);
        assert_eq!(b.claim_size(&with_length("300"), 500), 300);
        assert_eq!(b.claim_size(&HeaderMap::new(), 500), 500);
        // Over the body limit: it is refused once the limit is read.
        assert_eq!(b.claim_size(&with_length("501"), 500), 500);
        assert_eq!(b.claim_size(&with_length("junk"), 500), 500);
        // Never more than the whole budget.
        assert_eq!(budget(100).claim_size(&with_length("300"), 500), 100);
    }

    #[tokio::test]
    async fn requests_that_declared_a_length_but_sent_nothing_hold_nothing() {
        let b = budget(1000);
        let idle: Vec<Claim> = (0..4).map(|_| b.claimant(1000)).collect();
        assert!(fits(&b, 1000, 1000).await);
        drop(idle);
    }

    #[tokio::test]
    async fn claims_beyond_the_budget_wait_for_earlier_ones() {
        let b = budget(1000);
        let first = b.claimant(700);
        first.claim(700).await;
        let second = b.claimant(400);
        let mut waiting = Box::pin(second.claim(400));
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "1,100 bytes claimed of 1,000"
        );
        drop(first);
        waiting.await;
        assert!(!fits(&b, 700, 700).await);
        assert!(fits(&b, 600, 600).await);
    }

    #[tokio::test]
    async fn partly_read_bodies_never_all_wait_for_each_other() {
        let b = budget(1000);
        let a = b.claimant(800);
        a.claim(500).await;
        let c = b.claimant(800);
        // 400 more would leave 100 free while `a` needs 300 more and `c` 400: neither could
        // ever finish. So `c` waits, holding nothing, ...
        let mut waiting = Box::pin(c.claim(400));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // ... and `a` can still finish.
        assert!(futures::poll!(Box::pin(a.claim(300))).is_ready());
        drop(a);
        waiting.await;
        // `c` holds 400 and needs 400 more. A whole small body fits in what is free, since it
        // gives it back once done ...
        assert!(fits(&b, 600, 600).await);
        // ... and a partial claim fits only while `c` can still finish.
        assert!(fits(&b, 700, 200).await);
        assert!(!fits(&b, 700, 201).await);
    }

    #[tokio::test]
    async fn bytes_beyond_the_budget_are_not_claimed() {
        let b = budget(100);
        let big = b.claimant(1000);
        big.claim(100).await;
        // Its need was the whole budget, which it holds: the rest of its body reads unclaimed.
        assert!(futures::poll!(Box::pin(big.claim(900))).is_ready());
        assert!(!fits(&b, 1, 1).await);
        drop(big);
        assert!(fits(&b, 100, 100).await);
    }

    #[tokio::test]
    async fn a_wrapped_body_is_claimed_as_it_arrives_and_given_back_with_the_claim() {
        let b = budget(10);
        let chunks =
            ["abcd", "efgh"].map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c.as_bytes())));
        let req = Request::builder()
            .header(header::CONTENT_LENGTH, "8")
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
        let (req, claim) = b.wrap(req, 100);
        let body = req.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"abcdefgh");
        // The 8 bytes are held until the claim goes.
        assert!(!fits(&b, 3, 3).await);
        assert!(fits(&b, 2, 2).await);
        drop(claim);
        assert!(fits(&b, 10, 10).await);
    }

    /// A chunk still waiting for the budget when the body's deadline passes fails the body with
    /// [`BudgetTimeout`], recorded on the claim (the routes answer 503 with it).
    #[tokio::test(start_paused = true)]
    async fn a_deadline_passing_while_waiting_for_the_budget_is_a_budget_timeout() {
        let b = BodyBudget::new(10, QUERY_METRICS);
        let holder = b.claimant(10);
        holder.claim(10).await;
        let timeout = std::time::Duration::from_millis(50);
        let chunks = [Ok::<_, std::io::Error>(Bytes::from_static(b"abcd"))];
        let mut req = Request::builder()
            .header(header::CONTENT_LENGTH, "4")
            .body(Body::from_stream(futures::stream::iter(chunks)))
            .unwrap();
        req.extensions_mut().insert(BodyDeadline {
            at: tokio::time::Instant::now() + timeout,
            timeout,
        });
        let (req, claim) = b.wrap(req, 100);
        assert!(claim.budget_timeout().is_none());
        let err = req.into_body().collect().await.unwrap_err();
        assert!(
            err.to_string().contains("--http-query-inflight-mib"),
            "{err}"
        );
        let e = claim.budget_timeout().expect("a budget timeout");
        assert_eq!((e.timeout_ms, e.flag), (50, "--http-query-inflight-mib"));
        drop(holder);
    }
}
