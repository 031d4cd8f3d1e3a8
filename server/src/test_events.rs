//! Events for the binary's unit tests: one shared shape instead of the same literal in every
//! module that needs "a store of one block".

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
