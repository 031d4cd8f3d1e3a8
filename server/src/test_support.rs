//! Shared pieces of the binary's unit tests: "a store of one block", and the one-shot signal
//! and deadline the step-by-step race tests use.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};
use kvindex_engine::{
    ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
    KvCacheStoredBlockData, RouterEvent,
};

/// The tokens of the one block [`one_block_store`] stores (block size 4).
pub const TOKENS: [u32; 4] = [1, 2, 3, 4];

/// `worker_id` stores the block of [`TOKENS`] (block size 4) at the root under external hash
/// `ext`, as event `event_id` of dp_rank 0.
pub fn one_block_store(worker_id: u64, event_id: u64, ext: u64) -> RouterEvent {
    let local = compute_block_hash_for_seq(&TOKENS, 4, &HashOptions::default())[0];
    RouterEvent::new(
        worker_id,
        KvCacheEvent {
            event_id,
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: None,
                start_position: None,
                blocks: vec![KvCacheStoredBlockData {
                    block_hash: ExternalSequenceBlockHash(ext),
                    tokens_hash: local,
                    mm_extra_info: None,
                }],
            }),
            dp_rank: 0,
        },
    )
}

/// How long a race test waits for a step before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A one-shot signal between the threads of a race test.
#[derive(Default)]
pub struct Latch {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    pub fn set(&self) {
        *self.set.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        *self.set.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until set; fails the test after [`DEADLINE`].
    pub fn wait(&self, what: &str) {
        let end = Instant::now() + DEADLINE;
        let mut set = self.set.lock().unwrap_or_else(|e| e.into_inner());
        while !*set {
            let left = end.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}");
            set = self.cv.wait_timeout(set, left).unwrap().0;
        }
    }
}
