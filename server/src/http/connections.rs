//! Accepting and serving HTTP connections with bounds a hostile client cannot stretch
//! (issue #4: slowloris connections get an error and a counter, never unbounded resources).
//!
//! `axum::serve` sets no timer, so hyper's header-read timeout is off and a client that sends a
//! request head one byte at a time (or nothing at all), or a body slower than it announced, holds
//! its connection, its buffers and — at shutdown — the process forever. This accept loop serves
//! the same router with:
//!
//! * **a read deadline** (`--http-read-timeout-ms`): the request head must arrive within it
//!   (hyper closes the connection otherwise; an idle keep-alive connection is closed the same
//!   way), and the body within it too, counted from when the head arrived (the request then
//!   fails with axum's `400 Failed to buffer the request body: ...`, or with a `503` when the
//!   deadline passed while the body waited for its budget, `super::body_budget`);
//! * **a write deadline** (`--http-write-timeout-ms`): a response write that makes no progress
//!   for that long (a client that stops reading) closes the connection, and so frees the
//!   response;
//! * **a response deadline** when a handler arms one (`super::response_deadline`; `/dump`:
//!   `--http-dump-timeout-s`): the connection is closed when it passes, also for a client that
//!   keeps reading, slowly;
//! * **a connection cap** (`--http-max-connections`): a connection beyond it is closed at once;
//! * **a bounded drain** at shutdown: open connections get a graceful close and at most one read
//!   deadline to finish (less when less is left of the shutdown budget, `--shutdown-timeout-s`),
//!   then they are dropped, so SIGTERM / SIGINT always ends the process.
//!
//! Each bound is counted in `kvindex_http_read_timeouts_total{stage}`,
//! `kvindex_http_write_timeouts_total` or `kvindex_http_connections_refused_total`; a request
//! head that is not HTTP at all gets hyper's `400` and is counted in
//! `kvindex_http_malformed_requests_total`. Any other error that ends a connection (the client
//! closing or resetting it in the middle of a request, an I/O error while writing the response)
//! is logged with the client's address and counted in `kvindex_http_connection_errors_total{reason}`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::map_request_with_state;
use axum::Router;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::response_deadline::ResponseDeadline;

/// Counter: connections or requests ended by the read deadline (label `stage`: `headers`,
/// `body`, or `budget` for a body whose deadline passed while it waited for a body budget).
pub const READ_TIMEOUTS_TOTAL: &str = "kvindex_http_read_timeouts_total";
/// Counter: connections closed because a response write made no progress within
/// `--http-write-timeout-ms`.
pub const WRITE_TIMEOUTS_TOTAL: &str = "kvindex_http_write_timeouts_total";
/// Counter: connections closed at accept because `--http-max-connections` were open.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "kvindex_http_connections_refused_total";
/// Counter: connections closed because the request head was not HTTP/1.1 (hyper answers 400,
/// or 431 for an oversized head).
pub const MALFORMED_REQUESTS_TOTAL: &str = "kvindex_http_malformed_requests_total";
/// Counter: connections ended by an error other than a read timeout or a malformed head
/// (label `reason`, see [`ConnectionError`]).
pub const CONNECTION_ERRORS_TOTAL: &str = "kvindex_http_connection_errors_total";
/// Gauge: open HTTP connections.
pub const CONNECTIONS_OPEN: &str = "kvindex_http_connections_open";

/// Default read deadline (hyper's own default header timeout).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default write deadline.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connection cap.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// How long a client may take, how many may be connected at once, how much of their bodies is
/// read at once, and how many `/dump`s are built and sent at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Deadline for a request head, and (from then on) for its body.
    pub read_timeout: Duration,
    /// Longest time a response write may make no progress.
    pub write_timeout: Duration,
    /// Open connections at most; more are closed at accept.
    pub max_connections: usize,
    /// Bytes of `POST /events` bodies read and decoded at once (`super::body_budget`).
    pub events_body_budget: usize,
    /// Bytes of `POST /query` and `POST /query_by_hash` bodies read and decoded at once.
    pub query_body_budget: usize,
    /// `GET /dump` responses built or being sent at once (`super::dump`).
    pub max_dumps: usize,
    /// How long a `GET /dump` beyond `max_dumps` waits for a slot.
    pub dump_wait: Duration,
    /// How long one `GET /dump` response may take to send.
    pub dump_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            read_timeout: DEFAULT_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            events_body_budget: super::body_budget::DEFAULT_EVENTS_BODY_BUDGET,
            query_body_budget: super::body_budget::DEFAULT_QUERY_BODY_BUDGET,
            max_dumps: super::dump::DEFAULT_MAX_DUMPS,
            dump_wait: super::dump::DEFAULT_DUMP_WAIT,
            dump_timeout: super::dump::DEFAULT_DUMP_TIMEOUT,
        }
    }
}

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_counter!(
        READ_TIMEOUTS_TOTAL,
        "HTTP connections (stage=headers, idle keep-alive included) or requests (stage=body: answered 400; stage=budget: waiting for a body budget, answered 503) cut off by --http-read-timeout-ms"
    );
    metrics::describe_counter!(
        WRITE_TIMEOUTS_TOTAL,
        "HTTP connections closed because a response write made no progress within --http-write-timeout-ms"
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        "HTTP connections closed at accept because --http-max-connections were open"
    );
    metrics::describe_counter!(
        MALFORMED_REQUESTS_TOTAL,
        "HTTP connections whose request head was not valid HTTP/1.1 (answered 400 or 431)"
    );
    metrics::describe_counter!(
        CONNECTION_ERRORS_TOTAL,
        "HTTP connections ended by an error other than a read timeout or a malformed head, by reason (incomplete_request, io, response_aborted, other)"
    );
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Open HTTP connections");
}

/// Why a connection ended with an error, past the read deadline and malformed heads (the
/// `reason` label of [`CONNECTION_ERRORS_TOTAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionError {
    /// The client closed the connection in the middle of a request (head or body).
    IncompleteRequest,
    /// An I/O error on the socket: reset by the client, broken pipe while writing, ...
    Io,
    /// A response body failed while it was being written.
    ResponseAborted,
    /// Anything else hyper reports.
    Other,
}

impl ConnectionError {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionError::IncompleteRequest => "incomplete_request",
            ConnectionError::Io => "io",
            ConnectionError::ResponseAborted => "response_aborted",
            ConnectionError::Other => "other",
        }
    }

    /// Classify an error of hyper's connection future that is neither a timeout nor a parse
    /// error.
    fn of(e: &hyper::Error) -> Self {
        if e.is_incomplete_message() {
            ConnectionError::IncompleteRequest
        } else if e.is_body_write_aborted() {
            ConnectionError::ResponseAborted
        } else if has_io_source(e) {
            ConnectionError::Io
        } else {
            ConnectionError::Other
        }
    }
}

/// Whether an `std::io::Error` is among `e`'s sources.
fn has_io_source(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// How the drain at shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Connections still open at the drain deadline, dropped.
    pub cut: usize,
    /// The deadline was the shutdown budget's (`--shutdown-timeout-s`), not the read deadline.
    pub by_budget: bool,
}

/// Serve `router` on `listener` until `shutdown` turns `true`, then drain: at most one read
/// deadline, and at most `drain_budget()` (asked when the drain starts: what is left of the
/// shutdown budget).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    drain_budget: impl FnOnce() -> Duration,
) -> Drained {
    let app = router.layer(map_request_with_state(limits.read_timeout, body_deadline));
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
            // Reap finished connection tasks so the set stays as small as the open connections.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED_TOTAL).increment(1);
            tracing::warn!(
                max = limits.max_connections,
                "HTTP connection refused: too many open connections"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = WithResponseDeadline {
            inner: TowerToHyperService::new(app.clone()),
            deadline: ResponseDeadline::default(),
        };
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
            serve_connection(stream, peer, service, limits, stop).await;
            metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
        });
    }
    drop(listener);
    // Graceful close has been signalled to every connection (they watch `shutdown`); give
    // them one read deadline (or what is left of the shutdown budget, when less) to finish
    // their requests, then drop whatever is left.
    let budget = drain_budget();
    let by_budget = budget < limits.read_timeout;
    let drained = tokio::time::timeout(limits.read_timeout.min(budget), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_ok() {
        return Drained::default();
    }
    let cut = connections.len();
    if by_budget {
        tracing::warn!(
            connections = cut,
            "shutdown budget (--shutdown-timeout-s) spent: open HTTP connections cut off (their requests are dropped)"
        );
    } else {
        tracing::warn!(
            open = cut,
            "HTTP connections still open after the drain deadline; closing them"
        );
    }
    connections.shutdown().await;
    Drained { cut, by_budget }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    service: WithResponseDeadline,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let deadline = service.deadline.clone();
    let deadline_passed = deadline.passed();
    tokio::pin!(deadline_passed);
    let io = WriteDeadline::new(stream, limits.write_timeout);
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut ended = tokio::select! {
        result = conn.as_mut() => Ended::Served(result),
        _ = shutdown.wait_for(|stop| *stop) => Ended::ShuttingDown,
        _ = deadline_passed.as_mut() => Ended::ResponseDeadline,
    };
    if let Ended::ShuttingDown = ended {
        conn.as_mut().graceful_shutdown();
        ended = tokio::select! {
            result = conn.as_mut() => Ended::Served(result),
            _ = deadline_passed.as_mut() => Ended::ResponseDeadline,
        };
    }
    let Ended::Served(result) = ended else {
        // Dropping the connection drops the response (its owner counts and logs the cut).
        tracing::debug!(%peer, "HTTP connection closed: its response's deadline passed");
        return;
    };
    if let Err(e) = result {
        if is_write_timeout(&e) {
            metrics::counter!(WRITE_TIMEOUTS_TOTAL).increment(1);
            tracing::info!(%peer, "HTTP connection closed: the client did not read the response in time");
        } else if e.is_timeout() {
            metrics::counter!(READ_TIMEOUTS_TOTAL, "stage" => "headers").increment(1);
            tracing::debug!("HTTP connection closed: request head not received in time");
        } else if e.is_parse() || e.is_parse_too_large() {
            // hyper has answered 400 / 431 already.
            metrics::counter!(MALFORMED_REQUESTS_TOTAL).increment(1);
            tracing::debug!(error = %e, "HTTP connection closed: malformed request head");
        } else {
            let reason = ConnectionError::of(&e);
            metrics::counter!(CONNECTION_ERRORS_TOTAL, "reason" => reason.as_str()).increment(1);
            tracing::info!(%peer, reason = reason.as_str(), error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Why [`serve_connection`] stopped waiting for its connection.
enum Ended {
    /// hyper finished with the connection.
    Served(Result<(), hyper::Error>),
    /// The server is shutting down (the connection then gets a graceful close).
    ShuttingDown,
    /// The deadline of the response being sent passed.
    ResponseDeadline,
}

/// The router as a hyper service, giving each request its connection's [`ResponseDeadline`]
/// (an extension) so that a handler can bound how long its response may take to send.
struct WithResponseDeadline {
    inner: TowerToHyperService<Router>,
    deadline: ResponseDeadline,
}

impl<B> hyper::service::Service<Request<B>> for WithResponseDeadline
where
    TowerToHyperService<Router>: hyper::service::Service<Request<B>>,
{
    type Response = <TowerToHyperService<Router> as hyper::service::Service<Request<B>>>::Response;
    type Error = <TowerToHyperService<Router> as hyper::service::Service<Request<B>>>::Error;
    type Future = <TowerToHyperService<Router> as hyper::service::Service<Request<B>>>::Future;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.deadline.clone());
        self.inner.call(req)
    }
}

/// Request extension: when the request's body must have arrived (a wait for a body budget,
/// `super::body_budget`, ends there too).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub at: tokio::time::Instant,
    pub timeout: Duration,
}

/// Middleware: give the request body the read deadline.
async fn body_deadline(State(timeout): State<Duration>, mut req: Request) -> Request {
    if req.body().is_end_stream() {
        return req;
    }
    req.extensions_mut().insert(BodyDeadline {
        at: tokio::time::Instant::now() + timeout,
        timeout,
    });
    req.map(|body| Body::new(DeadlineBody::new(body, timeout)))
}

/// Why a request body stopped: it did not arrive within the read deadline.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within {0} ms")]
pub struct BodyTimeout(u128);

/// A request body that fails once its deadline passes (counted as a `body` read timeout).
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    expired: bool,
}

impl DeadlineBody {
    fn new(inner: Body, timeout: Duration) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            expired: false,
        }
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.expired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired = true;
            metrics::counter!(READ_TIMEOUTS_TOTAL, "stage" => "body").increment(1);
            return Poll::Ready(Some(Err(Box::new(BodyTimeout(self.timeout.as_millis())))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why a connection was closed: a response write made no progress within the write deadline.
#[derive(Debug, thiserror::Error)]
#[error("response write made no progress within {0} ms")]
pub struct WriteTimeout(u128);

/// Whether `e` (a connection's error) comes from [`WriteDeadline`].
fn is_write_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.get_ref().is_some_and(|inner| inner.is::<WriteTimeout>()) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// A connection's socket whose writes fail once one has made no progress for `timeout`: a
/// client that stops reading its response cannot keep the connection, and the response it
/// holds, forever.
struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    /// Armed when a write could not proceed; disarmed by any progress.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Pass on a write's outcome, failing it once the socket has been stuck for the deadline.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                WriteTimeout(timeout.as_millis()),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_at_the_deadline() {
        let (near, _far) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(near, Duration::from_millis(50));
        let err = io.write_all(&[0u8; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(is_write_timeout(&err), "{err}");
    }

    #[tokio::test]
    async fn a_body_that_never_finishes_fails_at_the_deadline() {
        let first = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))]);
        let never = futures::stream::pending();
        let body = Body::from_stream(futures::StreamExt::chain(first, never));
        let body = DeadlineBody::new(body, Duration::from_millis(50));
        let err = body.collect().await.unwrap_err();
        assert!(
            err.to_string().contains("not received within 50 ms"),
            "{err}"
        );
    }
}
