//! The body of a `GET /dump` response (`super::dump`), streamed one partition at a time.
//!
//! A partition's events are built on a blocking thread (`Namespace::dump`), then written as
//! JSON in pieces of about [`CHUNK_BYTES`] as the client takes them, and only then is the next
//! partition built. A dump in progress so holds one partition's events and one piece of JSON
//! (plus what hyper and the socket buffer), not the whole dump: hundreds of MiB for a large
//! index otherwise. The bytes are those the whole dump serialized at once would have: entries
//! in the given order, each with Dynamo's fields first (`block_size`, `events`, then
//! `model_name`, `routing_group`), and `{"error": "..."}` for a partition whose build failed.
//!
//! The body owns what its builder holds (the dump's slot, `super::dump`), and so does a build
//! running on a blocking thread: a client that goes away mid-build drops the body, not the
//! build, which keeps the slot until it ends. When the dump's deadline passes
//! (`--http-dump-timeout-s`) the body ends with an error, and the connection is cut
//! (`super::response_deadline` does it even when hyper is not asking the body for more), counted
//! in [`DUMP_TIMEOUTS_TOTAL`] and logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use futures::stream::BoxStream;
use hyper::body::{Body as HttpBody, Frame};
use kvindex_engine::RouterEvent;
use kvindex_persistence::NamespaceSpec;
use tokio::time::{Instant, Sleep};

use super::dump::DUMP_TIMEOUTS_TOTAL;
use super::response_deadline::ArmedDeadline;
use crate::partitions::Partition;

/// Bytes of JSON after which a body chunk is sent (checked between events, so one long chain
/// can make a chunk larger). Small enough for hyper to queue several and ask for the next
/// early; small enough too that writing one on the runtime's thread takes well under a
/// millisecond, so the pieces are not sent to the blocking pool.
pub(super) const CHUNK_BYTES: usize = 64 << 10;

/// Builds one partition's events for the dump. Shared with the blocking thread that runs a
/// build, so that whatever the builder holds (the dump's slot) lasts as long as any build runs,
/// also after the body is gone.
pub(super) trait BuildPartition: Send + Sync + 'static {
    /// The partition's events; `Err` is written as the partition's `{"error": ...}` entry.
    fn build(&self, partition: &Partition) -> Result<Vec<RouterEvent>, String>;
}

/// Why a dump's body ended before its last byte (the connection is then cut).
#[derive(Debug, thiserror::Error)]
pub(super) enum DumpStreamError {
    /// `--http-dump-timeout-s` passed.
    #[error("dump not sent within {0} s (--http-dump-timeout-s)")]
    Timeout(u64),
    /// An event did not serialize (it cannot: kept so that no failure goes unreported). Part of
    /// its entry may already be sent, so it cannot become an `{"error": ...}` entry any more.
    #[error("cannot write partition {partition} as JSON: {error}")]
    Serialize { partition: String, error: String },
}

/// What is left to write of one partition's entry.
struct EntryWriter {
    key: String,
    events: std::vec::IntoIter<RouterEvent>,
    /// Whether an event was written already (the next one needs a comma).
    any: bool,
    /// `],"model_name":...,"routing_group":...}`.
    tail: Vec<u8>,
}

impl EntryWriter {
    /// Write the head of `spec`'s entry (`{"block_size":N,"events":[`) into `out`; the writer
    /// of the rest.
    fn start(
        out: &mut Vec<u8>,
        spec: &NamespaceSpec,
        events: Vec<RouterEvent>,
    ) -> Result<Self, serde_json::Error> {
        out.extend_from_slice(b"{\"block_size\":");
        out.extend_from_slice(spec.block_size.to_string().as_bytes());
        out.extend_from_slice(b",\"events\":[");
        let mut tail = b"],\"model_name\":".to_vec();
        serde_json::to_writer(&mut tail, &spec.key.model_name)?;
        tail.extend_from_slice(b",\"routing_group\":");
        serde_json::to_writer(&mut tail, &spec.key.routing_group)?;
        tail.push(b'}');
        Ok(EntryWriter {
            key: spec.key.to_string(),
            events: events.into_iter(),
            any: false,
            tail,
        })
    }

    /// Write events into `out` until it holds `limit` bytes or the entry is complete; whether
    /// it is. Written events are dropped as they go.
    fn write_some(&mut self, out: &mut Vec<u8>, limit: usize) -> Result<bool, serde_json::Error> {
        while out.len() < limit {
            let Some(event) = self.events.next() else {
                out.extend_from_slice(&self.tail);
                return Ok(true);
            };
            if self.any {
                out.push(b',');
            }
            self.any = true;
            serde_json::to_writer(&mut *out, &event)?;
        }
        Ok(false)
    }
}

/// The JSON of a dump, chunk by chunk, building each partition when its turn comes.
struct DumpChunks {
    parts: std::vec::IntoIter<Partition>,
    builder: Arc<dyn BuildPartition>,
    chunk_bytes: usize,
    /// Entries started so far.
    entries: usize,
    current: Option<EntryWriter>,
    done: bool,
}

impl DumpChunks {
    /// The next chunk; `None` once the closing `}` was sent (or after an error).
    async fn next_chunk(&mut self) -> Option<Result<Bytes, DumpStreamError>> {
        if self.done {
            return None;
        }
        let mut out = Vec::new();
        loop {
            if let Some(entry) = self.current.as_mut() {
                match entry.write_some(&mut out, self.chunk_bytes) {
                    Ok(true) => self.current = None,
                    Ok(false) => return Some(Ok(out.into())),
                    Err(e) => {
                        self.done = true;
                        return Some(Err(DumpStreamError::Serialize {
                            partition: entry.key.clone(),
                            error: e.to_string(),
                        }));
                    }
                }
            }
            if self.parts.len() == 0 {
                if self.entries == 0 {
                    out.push(b'{');
                }
                out.push(b'}');
                self.done = true;
                return Some(Ok(out.into()));
            }
            // What is written goes out before the next build, however long that takes.
            if !out.is_empty() {
                return Some(Ok(out.into()));
            }
            let partition = self.parts.next()?;
            let spec = Arc::clone(&partition.spec);
            let builder = Arc::clone(&self.builder);
            // A build that panicked is that partition's failure, like an engine error.
            let built = tokio::task::spawn_blocking(move || builder.build(&partition))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            out.push(if self.entries == 0 { b'{' } else { b',' });
            self.entries += 1;
            if let Err(e) = self.write_entry(&mut out, &spec, built) {
                self.done = true;
                return Some(Err(DumpStreamError::Serialize {
                    partition: spec.key.to_string(),
                    error: e.to_string(),
                }));
            }
        }
    }

    /// Write `"<model>:<group>":` and the entry's head, or the whole `{"error": ...}` entry.
    fn write_entry(
        &mut self,
        out: &mut Vec<u8>,
        spec: &NamespaceSpec,
        built: Result<Vec<RouterEvent>, String>,
    ) -> Result<(), serde_json::Error> {
        serde_json::to_writer(&mut *out, &spec.key.to_string())?;
        out.push(b':');
        match built {
            Ok(events) => self.current = Some(EntryWriter::start(out, spec, events)?),
            Err(error) => serde_json::to_writer(&mut *out, &serde_json::json!({ "error": error }))?,
        }
        Ok(())
    }

    fn into_stream(self) -> BoxStream<'static, Result<Bytes, DumpStreamError>> {
        Box::pin(futures::stream::unfold(self, |mut chunks| async move {
            let chunk = chunks.next_chunk().await?;
            Some((chunk, chunks))
        }))
    }
}

/// Where a [`DumpBody`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    Sending,
    Ended,
    Failed,
    TimedOut,
}

/// A `GET /dump` response body: the dump's JSON, one partition at a time, within its deadline.
pub(super) struct DumpBody {
    chunks: BoxStream<'static, Result<Bytes, DumpStreamError>>,
    deadline: Pin<Box<Sleep>>,
    at: Instant,
    timeout: Duration,
    /// The connection's deadline, armed until the body ends or is dropped.
    armed: Option<ArmedDeadline>,
    state: BodyState,
    sent: u64,
}

impl DumpBody {
    /// The dump of `parts`, in this order, each built by `builder`; it must be sent by `at`
    /// (`timeout` after it started), and `armed` cuts the connection then.
    pub(super) fn new(
        parts: Vec<Partition>,
        builder: Arc<dyn BuildPartition>,
        at: Instant,
        timeout: Duration,
        armed: Option<ArmedDeadline>,
    ) -> Self {
        Self::with_chunk_bytes(parts, builder, at, timeout, armed, CHUNK_BYTES)
    }

    fn with_chunk_bytes(
        parts: Vec<Partition>,
        builder: Arc<dyn BuildPartition>,
        at: Instant,
        timeout: Duration,
        armed: Option<ArmedDeadline>,
        chunk_bytes: usize,
    ) -> Self {
        let chunks = DumpChunks {
            parts: parts.into_iter(),
            builder,
            chunk_bytes: chunk_bytes.max(1),
            entries: 0,
            current: None,
            done: false,
        };
        DumpBody {
            chunks: chunks.into_stream(),
            deadline: Box::pin(tokio::time::sleep_until(at)),
            at,
            timeout,
            armed,
            state: BodyState::Sending,
            sent: 0,
        }
    }

    /// Stop: drop what is left of the dump (its partition's events, its share of the slot).
    fn finish(&mut self, state: BodyState) {
        self.state = state;
        self.chunks = Box::pin(futures::stream::empty());
        self.armed = None;
        if state == BodyState::TimedOut {
            metrics::counter!(DUMP_TIMEOUTS_TOTAL).increment(1);
            tracing::warn!(
                timeout_s = self.timeout.as_secs(),
                sent_bytes = self.sent,
                "GET /dump cut off: not sent within --http-dump-timeout-s"
            );
        }
    }
}

impl HttpBody for DumpBody {
    type Data = Bytes;
    type Error = DumpStreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.state != BodyState::Sending {
            return Poll::Ready(None);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.finish(BodyState::TimedOut);
            return Poll::Ready(Some(Err(DumpStreamError::Timeout(self.timeout.as_secs()))));
        }
        match self.chunks.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                self.sent += chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, sent_bytes = self.sent, "GET /dump cut off");
                self.finish(BodyState::Failed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                self.finish(BodyState::Ended);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state != BodyState::Sending
    }
}

impl Drop for DumpBody {
    fn drop(&mut self) {
        // Dropped unfinished at its deadline: the connection was cut by the response deadline
        // (hyper was not asking for more). Dropped earlier: the client went away.
        if self.state == BodyState::Sending && Instant::now() >= self.at {
            self.finish(BodyState::TimedOut);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use serde::Serialize;

    use super::*;
    use crate::test_support::{one_block_store, Latch};

    fn part(model: &str, group: &str, block_size: u32) -> Partition {
        Partition {
            spec: Arc::new(NamespaceSpec::new(model, group, block_size)),
            namespace: None,
        }
    }

    /// Each partition's events (or error) by key, and the order the builds ran in.
    #[derive(Default)]
    struct Fixed {
        events: HashMap<String, Result<Vec<RouterEvent>, String>>,
        built: Mutex<Vec<String>>,
    }

    impl BuildPartition for Fixed {
        fn build(&self, p: &Partition) -> Result<Vec<RouterEvent>, String> {
            let key = p.spec.key.to_string();
            self.built.lock().unwrap().push(key.clone());
            self.events.get(&key).cloned().unwrap_or(Ok(Vec::new()))
        }
    }

    /// A build that waits for `release`, holding `token` (a stand-in for the slot).
    struct Gated {
        started: Latch,
        release: Latch,
        _token: Arc<()>,
    }

    impl BuildPartition for Gated {
        fn build(&self, _: &Partition) -> Result<Vec<RouterEvent>, String> {
            self.started.set();
            self.release.wait("the gated build released");
            Ok(Vec::new())
        }
    }

    /// Partitions with names to escape, several events, a failed build and an empty one.
    fn sample() -> (Vec<Partition>, Fixed) {
        let parts = vec![
            part("a", "default", 4),
            part("org/llama:v1", "g:x", 8),
            part("q\"uote\\d", "é", 16),
            part("z", "broken", 4),
        ];
        let events = |worker: u64, n: u64| -> Vec<RouterEvent> {
            (0..n)
                .map(|i| one_block_store(worker, i, 1000 * worker + i))
                .collect()
        };
        let builder = Fixed {
            events: HashMap::from([
                ("a:default".to_owned(), Ok(events(1, 40))),
                ("q\"uote\\d:é".to_owned(), Ok(events(3, 7))),
                ("z:broken".to_owned(), Err("engine \"gone\"".to_owned())),
            ]),
            built: Mutex::default(),
        };
        (parts, builder)
    }

    /// The dump as it was built before it was streamed: whole, in memory.
    fn whole_dump(parts: &[Partition], builder: &dyn BuildPartition) -> String {
        #[derive(Serialize)]
        struct DumpEntry<'a> {
            block_size: u32,
            events: Vec<RouterEvent>,
            model_name: &'a str,
            routing_group: &'a str,
        }
        let mut out = String::from("{");
        for (i, p) in parts.iter().enumerate() {
            let key = &p.spec.key;
            let value = builder
                .build(p)
                .and_then(|events| {
                    serde_json::to_string(&DumpEntry {
                        block_size: p.spec.block_size,
                        events,
                        model_name: &key.model_name,
                        routing_group: &key.routing_group,
                    })
                    .map_err(|e| e.to_string())
                })
                .unwrap_or_else(|e| serde_json::json!({ "error": e }).to_string());
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::Value::String(key.to_string()).to_string());
            out.push(':');
            out.push_str(&value);
        }
        out.push('}');
        out
    }

    fn body(
        parts: Vec<Partition>,
        builder: Arc<dyn BuildPartition>,
        chunk_bytes: usize,
    ) -> DumpBody {
        let timeout = Duration::from_secs(3600);
        let at = Instant::now() + timeout;
        DumpBody::with_chunk_bytes(parts, builder, at, timeout, None, chunk_bytes)
    }

    /// Every data frame until the body ends.
    async fn frames(mut body: DumpBody) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("a frame").into_data() {
                out.push(data);
            }
        }
        out
    }

    #[tokio::test]
    async fn the_streamed_dump_is_byte_for_byte_the_whole_dump() {
        let (parts, builder) = sample();
        let expected = whole_dump(&parts, &builder);
        let largest_event = serde_json::to_vec(&one_block_store(3, 6, 3006))
            .unwrap()
            .len();
        let builder: Arc<dyn BuildPartition> = Arc::new(builder);
        for chunk_bytes in [1, 300, 4096, CHUNK_BYTES] {
            let got = frames(body(parts.clone(), Arc::clone(&builder), chunk_bytes)).await;
            assert_eq!(
                String::from_utf8(got.concat()).unwrap(),
                expected,
                "chunks of {chunk_bytes} bytes"
            );
            // A chunk is cut at about its size: at most one event (and an entry's head or
            // tail) beyond it.
            for chunk in &got {
                assert!(
                    chunk.len() <= chunk_bytes + largest_event + 200,
                    "{chunk_bytes}"
                );
            }
            if chunk_bytes < expected.len() / 4 {
                assert!(got.len() > 4, "{chunk_bytes}: {} chunks", got.len());
            }
        }
        // Nothing to dump: `{}`, as before.
        let got = frames(body(Vec::new(), builder, CHUNK_BYTES)).await;
        assert_eq!(got.concat(), b"{}".to_vec());
    }

    #[tokio::test]
    async fn each_partition_is_sent_before_the_next_is_built() {
        let (parts, builder) = sample();
        let builder = Arc::new(builder);
        let mut body = body(parts, builder.clone(), CHUNK_BYTES);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let first = String::from_utf8(first.to_vec()).unwrap();
        assert!(
            first.starts_with("{\"a:default\":{\"block_size\":4,"),
            "{first}"
        );
        assert!(
            first.ends_with(",\"model_name\":\"a\",\"routing_group\":\"default\"}"),
            "{first}"
        );
        assert_eq!(*builder.built.lock().unwrap(), ["a:default"]);
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(second.starts_with(b",\"org/llama:v1:g:x\":"));
        assert_eq!(builder.built.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_build_running_when_the_body_is_dropped_keeps_what_its_builder_holds() {
        let token = Arc::new(());
        let builder = Arc::new(Gated {
            started: Latch::default(),
            release: Latch::default(),
            _token: Arc::clone(&token),
        });
        let mut body = body(vec![part("a", "default", 4)], builder.clone(), CHUNK_BYTES);
        let waiting = tokio::spawn(async move {
            let _ = body.frame().await;
        });
        let started = builder.clone();
        tokio::task::spawn_blocking(move || started.started.wait("the build started"))
            .await
            .unwrap();
        // The client goes away: the body is dropped, the build goes on.
        waiting.abort();
        assert!(waiting.await.unwrap_err().is_cancelled());
        let builder_of_the_build = Arc::downgrade(&builder);
        drop(builder);
        assert!(
            builder_of_the_build.upgrade().is_some(),
            "the running build keeps its builder (and the slot it holds)"
        );
        assert_eq!(Arc::strong_count(&token), 2);
        builder_of_the_build.upgrade().unwrap().release.set();
        for _ in 0..3000 {
            if Arc::strong_count(&token) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the builder outlived its build");
    }

    fn timeouts(snapshotter: &Snapshotter) -> u64 {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == DUMP_TIMEOUTS_TOTAL)
            .map(|(.., v)| match v {
                DebugValue::Counter(c) => c,
                _ => 0,
            })
            .sum()
    }

    /// Run `test` on this thread (where the local recorder is) with its counter snapshotter.
    fn with_metrics(test: impl FnOnce(&Snapshotter)) {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || test(&snapshotter));
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// A gated build past a deadline of 50 ms (released when the test ends).
    fn late_body() -> (DumpBody, Arc<Gated>) {
        let builder = Arc::new(Gated {
            started: Latch::default(),
            release: Latch::default(),
            _token: Arc::default(),
        });
        let timeout = Duration::from_millis(50);
        let body = DumpBody::new(
            vec![part("a", "default", 4)],
            builder.clone(),
            Instant::now() + timeout,
            timeout,
            None,
        );
        (body, builder)
    }

    #[test]
    fn a_dump_not_sent_by_its_deadline_ends_with_an_error_and_is_counted_once() {
        with_metrics(|snapshotter| {
            let rt = runtime();
            let _in_rt = rt.enter();
            let (mut body, builder) = late_body();
            let frame = rt.block_on(body.frame());
            builder.release.set();
            match frame {
                Some(Err(DumpStreamError::Timeout(_))) => {}
                other => panic!("not a timeout: {other:?}"),
            }
            assert!(body.is_end_stream());
            assert_eq!(timeouts(snapshotter), 1);
            drop(body);
            assert_eq!(timeouts(snapshotter), 1);
        });
    }

    #[test]
    fn a_dump_dropped_at_its_deadline_is_counted_and_one_dropped_before_is_not() {
        with_metrics(|snapshotter| {
            let rt = runtime();
            let _in_rt = rt.enter();
            let (mut early, builder) = late_body();
            let polled = rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(1), early.frame()).await
            });
            assert!(polled.is_err(), "the gated build answered");
            drop(early);
            builder.release.set();
            assert_eq!(timeouts(snapshotter), 0);
            // The connection cut at the deadline drops a body hyper was not polling.
            let (late, builder) = late_body();
            rt.block_on(tokio::time::sleep(Duration::from_millis(60)));
            drop(late);
            builder.release.set();
            assert_eq!(timeouts(snapshotter), 1);
        });
    }
}
