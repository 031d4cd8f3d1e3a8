//! The consuming side of a replay: a fresh kvindex engine that events, dumps or snapshots are
//! applied to, so that every approach's result is checked the same way (a [`StateDigest`]).

use kvindex_engine::protocol::RouterEvent;
use kvindex_engine::{Engine, EngineConfig, Namespace};

use super::kvindex_log::namespace_spec;
use super::stream::{namespace_digest, StateDigest, StreamError};

/// A consumer's index: an engine with the comparison's one namespace.
pub struct Consumer {
    engine: Engine,
    ns: Namespace,
}

impl Consumer {
    /// An empty index with `event_threads` event threads.
    pub fn new(event_threads: usize) -> Result<Self, StreamError> {
        let engine = Engine::new(EngineConfig {
            event_threads: event_threads.max(1),
            ..EngineConfig::default()
        });
        let spec = namespace_spec();
        let ns = engine.create_namespace(spec.key.clone(), spec.block_size)?;
        Ok(Self { engine, ns })
    }

    /// Apply one event (queued; see [`Consumer::digest`] for the barrier).
    pub fn apply(&self, event: RouterEvent) -> Result<(), StreamError> {
        Ok(self.ns.apply(event)?)
    }

    /// Drop everything `worker_id` holds (before applying a tree dump of it).
    pub fn reset_worker(&self, worker_id: u64) -> Result<(), StreamError> {
        Ok(self.ns.remove_worker(worker_id)?)
    }

    /// Wait until everything applied so far is in the index.
    pub fn flush(&self) -> Result<(), StreamError> {
        Ok(self.ns.flush()?)
    }

    /// The state reached (a barrier first).
    pub fn digest(&self) -> Result<StateDigest, StreamError> {
        namespace_digest(&self.ns)
    }

    /// The namespace (for queries).
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.engine.shutdown();
        }
    }
}
