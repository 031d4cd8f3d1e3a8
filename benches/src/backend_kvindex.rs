//! ======================================================================================
//! kvindex backend: the replay's adapter around our own engine (`kvindex_engine::Engine`).
//!
//! Written against the API of `engine/src/engine.rs`; while that file still has `todo!()`
//! stubs, building this backend panics at run time (the replay reports the child process as
//! failed). Nothing else in the harness needs to change when the engine lands.
//! ======================================================================================

use kvindex_engine::protocol::{LocalBlockHash, RouterEvent};
use kvindex_engine::{Engine, EngineConfig, Namespace, NamespaceKey};

use crate::backend::{Backend, Score, BENCH_BLOCK_SIZE};

/// `Engine` with `event_threads` event threads and one namespace; queries run on the caller's
/// thread (`Namespace::find_matches`, lock-free).
pub struct KvindexBackend {
    engine: Engine,
    namespace: Namespace,
}

impl KvindexBackend {
    pub fn new(event_threads: usize) -> anyhow::Result<Self> {
        Self::with_expected_blocks(event_threads, 0)
    }

    /// As `new`, with `EngineConfig::expected_blocks` set (0: grow as needed).
    pub fn with_expected_blocks(
        event_threads: usize,
        expected_blocks: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(event_threads > 0, "event threads must be >= 1");
        let engine = Engine::new(EngineConfig {
            event_threads,
            expected_blocks,
            ..EngineConfig::default()
        });
        let namespace = engine
            .create_namespace(
                NamespaceKey::new("mooncake-replay", "default"),
                BENCH_BLOCK_SIZE,
            )
            .map_err(|e| anyhow::anyhow!("kvindex create_namespace: {e}"))?;
        Ok(Self { engine, namespace })
    }

    /// The namespace every event and query goes to (micro-benchmarks call its own API directly).
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }
}

impl Drop for KvindexBackend {
    fn drop(&mut self) {
        // Do not turn a panic already unwinding (e.g. from a stub) into an abort.
        if !std::thread::panicking() {
            self.engine.shutdown();
        }
    }
}

impl Backend for KvindexBackend {
    type Event = RouterEvent;
    type Query = Vec<LocalBlockHash>;

    fn name(&self) -> &'static str {
        "kvindex"
    }

    fn prepare(&self, event: &RouterEvent) -> anyhow::Result<RouterEvent> {
        Ok(event.clone())
    }

    fn apply_prepared(&self, event: RouterEvent) -> anyhow::Result<()> {
        self.namespace
            .apply(event)
            .map_err(|e| anyhow::anyhow!("kvindex apply: {e}"))
    }

    fn flush(&self) -> anyhow::Result<()> {
        self.namespace
            .flush()
            .map_err(|e| anyhow::anyhow!("kvindex flush: {e}"))
    }

    fn memory_breakdown(&self) -> Option<String> {
        let m = self.namespace.memory();
        let mb = |b: usize| b as f64 / 1e6;
        Some(format!(
            "{} live blocks in {} runs, {} block ids in use; arenas {:.1} MB, ext map {:.1} MB, \
             member sets {:.1} MB, child tables {:.1} MB",
            m.live_nodes,
            m.live_runs,
            m.block_ids,
            mb(m.node_bytes),
            mb(m.map_bytes),
            mb(m.member_bytes),
            mb(m.child_bytes)
        ))
    }

    fn prepare_query(&self, query: &[LocalBlockHash]) -> Vec<LocalBlockHash> {
        query.to_vec()
    }

    fn find_prepared(&self, query: &Vec<LocalBlockHash>) -> Vec<Score> {
        self.namespace
            .find_matches(query, false)
            .scores
            .iter()
            .map(|(w, s)| (w.worker_id, w.dp_rank, *s))
            .collect()
    }
}
