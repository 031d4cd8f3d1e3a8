//! Entry points for the loom models in `loom-tests/`, compiled only under `--cfg loom`.
//!
//! Every call here is a thin wrapper that runs the production code of the engine (event-thread
//! `apply`, the tree's store / remove / unlink, lock-free `find_matches`, epoch reclamation) on
//! a model's tiny state; nothing is re-implemented. The only model-specific pieces are the
//! reader probes (`Tree::loom_*`), which perform the production reader's loads but report what
//! they saw, so that a model can assert on it.

use crate::counters::EventCounters;
use crate::error::KvCacheEventError;
use crate::lanes::{LoomLane, NsShared};
use crate::protocol::RouterEvent;
use crate::tree::Tree;
use crossbeam_epoch::{self as epoch, Guard};
use std::sync::Arc;

/// The channel the engine's event threads use under loom, for the log writer's queue.
pub use crate::sync::channel;

/// One namespace's shared state, as the event threads and the query path see it.
pub struct Index {
    ns: Arc<NsShared>,
}

/// A node as a lock-free reader saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenNode {
    /// The node's arena index.
    pub index: u32,
    /// Its local hash (the key a reader matches).
    pub local: u64,
    /// Worker ids of its holders, as the reader maps slots to streams.
    pub holders: Vec<u64>,
}

impl Index {
    /// An empty namespace index.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Index {
            ns: Arc::new(NsShared {
                lower: Default::default(),
                id: 1,
                tree: Tree::with_expected_blocks(0),
                counters: EventCounters::default(),
            }),
        }
    }

    /// The production query: `(worker_id, score)` for every worker holding a prefix of
    /// `locals`, sorted by worker id.
    pub fn find_matches(&self, locals: &[u64]) -> Vec<(u64, u32)> {
        let seq: Vec<_> = locals
            .iter()
            .map(|&h| crate::protocol::LocalBlockHash(h))
            .collect();
        let mut v: Vec<(u64, u32)> = self
            .ns
            .tree
            .find_matches(&seq)
            .scores
            .into_iter()
            .map(|(w, s)| (w.worker_id, s))
            .collect();
        v.sort_unstable();
        v
    }

    /// Pin an epoch, as a reader does for the length of a query.
    pub fn pin(&self) -> Pinned<'_> {
        Pinned {
            tree: &self.ns.tree,
            guard: epoch::pin(),
        }
    }
}

/// A pinned reader: everything it reaches stays valid (not freed, not recycled) until it drops.
pub struct Pinned<'a> {
    tree: &'a Arc<Tree>,
    guard: Guard,
}

impl Pinned<'_> {
    /// The node reached from the root by following local hashes `path`, if the walk gets there.
    pub fn walk(&self, path: &[u64]) -> Option<u32> {
        self.tree.loom_walk(path, &self.guard)
    }

    /// The children of node `index`, as this reader sees them (whatever their keys).
    pub fn children(&self, index: u32) -> Vec<SeenNode> {
        self.tree
            .loom_children(index, &self.guard)
            .into_iter()
            .map(|c| self.read(c))
            .collect()
    }

    /// The arena index of the node (run) that holds block `block` now.
    pub fn run_of(&self, block: u32) -> u32 {
        self.tree.loom_owner(block)
    }

    /// Node `index` as this reader sees it.
    pub fn read(&self, index: u32) -> SeenNode {
        let (local, slots) = self.tree.loom_read(index, &self.guard);
        SeenNode {
            index,
            local,
            holders: slots
                .into_iter()
                .map(|s| self.tree.slots.stream_of(s).worker_id)
                .collect(),
        }
    }
}

/// One event thread's private state (its streams), applying events with the production code.
pub struct Lane(LoomLane);

impl Lane {
    /// A lane owning no stream yet.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Lane(LoomLane::new())
    }

    /// Apply one event exactly as the event thread does (pin, apply, defer reclamation).
    pub fn apply(&mut self, index: &Index, event: &RouterEvent) -> Result<(), KvCacheEventError> {
        self.0.apply(&index.ns, event)
    }
}

/// Pin and unpin once on this thread. A thread's first pin also tries to advance the epoch,
/// which runs a SeqCst fence; an event thread of a running engine pins thousands of times and
/// collects only every 128th, so a model thread calls this first to get the common path (a
/// pin with no fence), where only the protocol's own orderings publish its writes.
pub fn warm_up() {
    drop(epoch::pin());
}

/// Let the epoch advance far enough for garbage deferred before this call to be collected, if
/// no reader pinned earlier is still pinned (as later events on an event thread would).
pub fn advance_epoch() {
    for _ in 0..3 {
        epoch::pin().flush();
    }
}

/// Plant a bug on this test thread: child links are published with `Relaxed` instead of
/// `Release` (see `sync::publish_link`).
pub fn plant_weak_publication(on: bool) {
    crate::sync::loom_support::plant_weak_publication(on);
}

/// Plant a bug on this test thread: unlinked nodes are recycled without waiting for the epoch
/// grace period (see `Tree::release_unlinked`).
pub fn plant_eager_reclamation(on: bool) {
    crate::sync::loom_support::plant_eager_reclamation(on);
}

/// Plant a bug on this test thread: readers skip the depth check that detects a torn view of a
/// split run (see `Tree::child_at`).
pub fn plant_no_depth_check(on: bool) {
    crate::sync::loom_support::plant_no_depth_check(on);
}

/// Plant a bug on this test thread: a store that grew fresh runs reads their blocks from the
/// nodes' extents after unlocking them, not from the ranges it grew (see `Tree::store`).
pub fn plant_late_fresh_extents(on: bool) {
    crate::sync::loom_support::plant_late_fresh_extents(on);
}

/// The first memory-safety violation the loom heap tracker recorded on this test thread since
/// the last call: a reader dereferencing a freed member set or child table, or a double free.
pub fn take_violation() -> Option<String> {
    crate::sync::loom_support::take_violation()
}
