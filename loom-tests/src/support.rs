//! Shared helpers of the models: events in the engine's wire types, and running a model.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kvindex_engine::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, RouterEvent,
};

/// The external (engine) hash the models give the block with local hash `local`.
pub fn ext(local: u64) -> u64 {
    local + 1000
}

/// `worker` stores the blocks `locals` (each with external hash `ext(local)`) after the block
/// `parent` (a local hash), or at the root.
pub fn stored(worker: u64, parent: Option<u64>, locals: &[u64]) -> RouterEvent {
    let blocks: Vec<(u64, u64)> = locals.iter().map(|&l| (l, ext(l))).collect();
    stored_as(worker, parent.map(ext), &blocks)
}

/// `worker` stores the blocks `(local, external hash)` after the block with external hash
/// `parent_ext`, or at the root: for models whose engines name blocks their own way.
pub fn stored_as(worker: u64, parent_ext: Option<u64>, blocks: &[(u64, u64)]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent_ext.map(ExternalSequenceBlockHash),
                start_position: None,
                blocks: blocks
                    .iter()
                    .map(|&(local, ext)| KvCacheStoredBlockData {
                        block_hash: ExternalSequenceBlockHash(ext),
                        tokens_hash: LocalBlockHash(local),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
            dp_rank: 0,
        },
    )
}

/// `worker` removes the blocks with local hashes `locals` (named by their external hashes).
pub fn removed(worker: u64, locals: &[u64]) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            data: KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: locals
                    .iter()
                    .map(|&l| ExternalSequenceBlockHash(ext(l)))
                    .collect(),
            }),
            dp_rank: 0,
        },
    )
}

/// `worker` clears every block it holds (a `cleared` event).
pub fn cleared(worker: u64) -> RouterEvent {
    RouterEvent::new(
        worker,
        KvCacheEvent {
            event_id: 0,
            data: KvCacheEventData::Cleared,
            dp_rank: 0,
        },
    )
}

/// Run the model `f` under loom with the bounds from the environment (`LOOM_MAX_PREEMPTIONS`,
/// set by `scripts/test.sh`; 2 when unset, so that a bare `cargo test` stays bounded too).
///
/// `f` returns the violated invariant instead of panicking: loom cannot unwind a model cleanly
/// (crossbeam-epoch's thread-local participant would be torn down outside the model and abort
/// the process), so a violation is recorded, the exploration finishes, and this function then
/// panics with the first violation found, outside the model.
pub fn model<F>(f: F)
where
    F: Fn() -> Result<(), String> + Sync + Send + 'static,
{
    let first = Arc::new(Mutex::new(None::<String>));
    let executions = Arc::new(AtomicUsize::new(0));
    let mut b = loom::model::Builder::new();
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        b.preemption_bound = Some(2);
    }
    // A clear scans every node of the arena (twice: until a pass finds nothing), which takes
    // more than loom's default 1,000 branches in one execution.
    b.max_branches = 20_000;
    {
        let first = Arc::clone(&first);
        let executions = Arc::clone(&executions);
        b.check(move || {
            executions.fetch_add(1, Ordering::Relaxed);
            let outcome = f().and_then(|()| match kvindex_engine::loom_hooks::take_violation() {
                Some(v) => Err(v),
                None => Ok(()),
            });
            if let Err(e) = outcome {
                first.lock().unwrap().get_or_insert(e);
            }
        });
    }
    let n = executions.load(Ordering::Relaxed);
    if let Some(e) = first.lock().unwrap().take() {
        panic!("invariant violated (in at least one of {n} executions): {e}");
    }
    eprintln!("model passed: {n} executions explored");
}

/// Check an invariant inside a model: on failure, return the message from the model closure
/// (see [`model`]). Use it only once every spawned thread has been joined.
#[macro_export]
macro_rules! invariant {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
