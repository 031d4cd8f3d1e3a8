//! The indexers the replay drives, behind one [`Backend`] trait:
//!
//! * [`DynamoBackend`]: NVIDIA Dynamo 1.6.1's `ThreadPoolIndexer` (crate `dynamo-kv-router`) around
//!   `ConcurrentRadixTreeCompressed` (its default) or `PositionalIndexer`;
//! * [`crate::backend_kvindex::KvindexBackend`]: our engine;
//! * [`NullBackend`]: indexes nothing; calibrates the harness (dispatch cost, and the RSS that
//!   freed event buffers leave behind in the memory measurement).
//!
//! Converting our protocol types to a backend's own (or cloning them) is not part of what is
//! measured: the harness calls [`Backend::prepare`] / [`Backend::prepare_query`] before the timed
//! region and hands the prepared values to [`Backend::apply_prepared`] /
//! [`Backend::find_prepared`] inside it. [`Backend::apply`] and [`Backend::find_matches`] are the
//! convenient by-reference forms.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use dynamo_kv_router::indexer::SyncIndexer;
use dynamo_kv_router::nested_map::SearchMode;
use dynamo_kv_router::protocols as dy;
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, PositionalIndexer, ThreadPoolIndexer};
use kvindex_engine::protocol::{
    KvCacheEventData, LocalBlockHash, ResidencyDomain, RouterEvent, StorageTier,
};

/// One score: `(worker_id, dp_rank, score)`.
pub type Score = (u64, u32, u32);

/// An indexer under test.
pub trait Backend: Send + Sync {
    /// An event in the backend's own representation, ready to be applied.
    type Event: Send;
    /// A query in the backend's own representation.
    type Query: Send + Sync;

    /// Short name used on the command line and in reports.
    fn name(&self) -> &'static str;

    /// Convert (or clone) an event; not timed.
    fn prepare(&self, event: &RouterEvent) -> anyhow::Result<Self::Event>;
    /// Submit a prepared event. May return before the event is applied (see [`Backend::flush`]).
    fn apply_prepared(&self, event: Self::Event) -> anyhow::Result<()>;
    /// Barrier: returns once every event submitted before the call is applied.
    fn flush(&self) -> anyhow::Result<()>;

    /// Convert (or copy) a query; not timed.
    fn prepare_query(&self, query: &[LocalBlockHash]) -> Self::Query;
    /// Overlap scores of a prepared query (`early_exit = false`), in any order.
    fn find_prepared(&self, query: &Self::Query) -> Vec<Score>;

    /// Submit one event given in our protocol types.
    /// The index's own account of its memory, printed after ingest (kvindex only).
    fn memory_breakdown(&self) -> Option<String> {
        None
    }

    fn apply(&self, event: &RouterEvent) -> anyhow::Result<()> {
        self.apply_prepared(self.prepare(event)?)
    }

    /// Overlap scores of a query given in our protocol types, in any order.
    fn find_matches(&self, query: &[LocalBlockHash]) -> Vec<Score> {
        self.find_prepared(&self.prepare_query(query))
    }
}

/// Which backend to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Kvindex,
    DynamoCrtc,
    DynamoPositional,
    /// Calibration only: not part of `ALL`, ignored by the agreement check and the ratios.
    Null,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [
        BackendKind::Kvindex,
        BackendKind::DynamoCrtc,
        BackendKind::DynamoPositional,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Kvindex => "kvindex",
            BackendKind::DynamoCrtc => "dynamo-crtc",
            BackendKind::DynamoPositional => "dynamo-positional",
            BackendKind::Null => "null",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([BackendKind::Null])
            .find(|k| k.name() == s)
    }
}

/// Tokens per engine block: 512-token trace blocks split by the default length factor 16. Only
/// used where a backend wants a block size (Dynamo hashes token requests with it; nothing here
/// sends tokens).
pub const BENCH_BLOCK_SIZE: u32 = 32;

/// Jump size of Dynamo's positional indexer (the value its own tests and benchmarks use).
pub const POSITIONAL_JUMP_SIZE: usize = 32;

/// Dynamo's `ThreadPoolIndexer<T>`: `T` event threads (sticky lanes per worker), queries inline on
/// the caller's thread.
pub struct DynamoBackend<T: SyncIndexer> {
    indexer: ThreadPoolIndexer<T>,
    name: &'static str,
}

impl<T: SyncIndexer> DynamoBackend<T> {
    /// The wrapped `ThreadPoolIndexer` (micro-benchmarks call its own API directly).
    pub fn indexer(&self) -> &ThreadPoolIndexer<T> {
        &self.indexer
    }
}

impl DynamoBackend<ConcurrentRadixTreeCompressed> {
    /// `ThreadPoolIndexer<ConcurrentRadixTreeCompressed>` (Dynamo's default).
    pub fn crtc(event_threads: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(event_threads > 0, "event threads must be >= 1");
        Ok(Self {
            indexer: ThreadPoolIndexer::new(
                ConcurrentRadixTreeCompressed::new(),
                event_threads,
                BENCH_BLOCK_SIZE,
            ),
            name: BackendKind::DynamoCrtc.name(),
        })
    }
}

impl DynamoBackend<PositionalIndexer> {
    /// `ThreadPoolIndexer<PositionalIndexer>`, jump size 32, strided search (Dynamo's default
    /// mode, pinned so that `DYN_ROUTER_POSITIONAL_SEARCH_MODE` cannot change it silently).
    pub fn positional(event_threads: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(event_threads > 0, "event threads must be >= 1");
        Ok(Self {
            indexer: ThreadPoolIndexer::new(
                PositionalIndexer::new_with_mode(POSITIONAL_JUMP_SIZE, SearchMode::Strided),
                event_threads,
                BENCH_BLOCK_SIZE,
            ),
            name: BackendKind::DynamoPositional.name(),
        })
    }
}

/// Our event → Dynamo's event, field by field.
pub fn to_dynamo_event(event: &RouterEvent) -> anyhow::Result<dy::RouterEvent> {
    let data = match &event.event.data {
        KvCacheEventData::Stored(s) => dy::KvCacheEventData::Stored(dy::KvCacheStoreData {
            parent_hash: s.parent_hash.map(|h| dy::ExternalSequenceBlockHash(h.0)),
            start_position: s.start_position,
            blocks: s
                .blocks
                .iter()
                .map(|b| {
                    anyhow::ensure!(
                        b.mm_extra_info.is_none(),
                        "multimodal extra info is not converted by the replay harness"
                    );
                    Ok(dy::KvCacheStoredBlockData {
                        block_hash: dy::ExternalSequenceBlockHash(b.block_hash.0),
                        tokens_hash: dy::LocalBlockHash(b.tokens_hash.0),
                        mm_extra_info: None,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        }),
        KvCacheEventData::Removed(r) => dy::KvCacheEventData::Removed(dy::KvCacheRemoveData {
            block_hashes: r
                .block_hashes
                .iter()
                .map(|h| dy::ExternalSequenceBlockHash(h.0))
                .collect(),
        }),
        KvCacheEventData::Cleared => dy::KvCacheEventData::Cleared,
    };
    anyhow::ensure!(
        event.storage_tier == StorageTier::Device,
        "only device-tier events are replayed"
    );
    anyhow::ensure!(
        matches!(event.residency_domain, None | Some(ResidencyDomain::Worker)),
        "only worker-domain events are replayed"
    );
    Ok(dy::RouterEvent::new(
        event.worker_id,
        dy::KvCacheEvent {
            event_id: event.event.event_id,
            data,
            dp_rank: event.event.dp_rank,
        },
    ))
}

impl<T: SyncIndexer> Backend for DynamoBackend<T> {
    type Event = dy::RouterEvent;
    type Query = Vec<dy::LocalBlockHash>;

    fn name(&self) -> &'static str {
        self.name
    }

    fn prepare(&self, event: &RouterEvent) -> anyhow::Result<Self::Event> {
        to_dynamo_event(event)
    }

    fn apply_prepared(&self, event: Self::Event) -> anyhow::Result<()> {
        self.indexer
            .enqueue_event(event)
            .map_err(|e| anyhow::anyhow!("dynamo enqueue_event: {e}"))
    }

    fn flush(&self) -> anyhow::Result<()> {
        block_on(self.indexer.flush_and_wait()).map_err(|e| anyhow::anyhow!("dynamo flush: {e}"))
    }

    fn prepare_query(&self, query: &[LocalBlockHash]) -> Self::Query {
        query.iter().map(|h| dy::LocalBlockHash(h.0)).collect()
    }

    fn find_prepared(&self, query: &Self::Query) -> Vec<Score> {
        // Exactly what `ThreadPoolIndexer::find_matches` runs inline on the caller's thread,
        // without its async wrapper and the by-value `Vec` argument.
        self.indexer
            .backend()
            .find_matches(query, false)
            .scores
            .iter()
            .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
            .collect()
    }
}

enum NullTask {
    Event(RouterEvent),
    Flush(std::sync::mpsc::Sender<()>),
}

/// Indexes nothing: events go through a channel to one thread that drops them (as an indexer's
/// event thread would free them), queries return no scores.
pub struct NullBackend {
    tx: std::sync::mpsc::Sender<NullTask>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NullBackend {
    pub fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<NullTask>();
        let handle = std::thread::spawn(move || {
            for task in rx {
                match task {
                    NullTask::Event(e) => drop(e),
                    NullTask::Flush(ack) => {
                        let _ = ack.send(());
                    }
                }
            }
        });
        Self {
            tx,
            handle: Some(handle),
        }
    }
}

impl Default for NullBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NullBackend {
    fn drop(&mut self) {
        // Closing the channel ends the thread.
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Backend for NullBackend {
    type Event = RouterEvent;
    type Query = Vec<LocalBlockHash>;

    fn name(&self) -> &'static str {
        BackendKind::Null.name()
    }

    fn prepare(&self, event: &RouterEvent) -> anyhow::Result<RouterEvent> {
        Ok(event.clone())
    }

    fn apply_prepared(&self, event: RouterEvent) -> anyhow::Result<()> {
        self.tx
            .send(NullTask::Event(event))
            .map_err(|_| anyhow::anyhow!("null backend thread is gone"))
    }

    fn flush(&self) -> anyhow::Result<()> {
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        self.tx
            .send(NullTask::Flush(ack_tx))
            .map_err(|_| anyhow::anyhow!("null backend thread is gone"))?;
        ack_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("null backend thread is gone"))
    }

    fn prepare_query(&self, query: &[LocalBlockHash]) -> Vec<LocalBlockHash> {
        query.to_vec()
    }

    fn find_prepared(&self, _query: &Vec<LocalBlockHash>) -> Vec<Score> {
        Vec::new()
    }
}

struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Run a future to completion on the current thread (parking between polls). Enough for
/// Dynamo's barrier futures, which wait on oneshot channels filled by its event threads.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}
