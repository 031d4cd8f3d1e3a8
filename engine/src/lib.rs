//! kvindex engine: a concurrent radix index of KV cache blocks held by inference workers.
//!
//! * [`protocol`]: Dynamo-compatible event and score types.
//! * [`hashing`]: tokens → local block hashes and rolling sequence hashes (Dynamo-compatible).
//! * [`codec`]: JSON / msgpack decoding with Dynamo's tolerance rules.
//! * [`Engine`] / [`Namespace`]: the index itself: per-core event threads own the writes,
//!   `find_matches` runs lock-free on the caller's thread.
//! * [`reference`]: a small, obviously-correct single-threaded model used by tests and tools.

mod children;
pub mod codec;
mod counters;
pub mod engine;
pub mod error;
mod ext_map;
pub mod hashing;
mod lanes;
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_hooks;
pub mod lower_tiers;
mod members;
pub mod protocol;
mod ranges;
pub mod reference;
pub mod scores;
mod segmented;
mod slots;
pub mod snapshot;
mod spin;
mod sync;
mod tree;

pub use counters::{EventCountsSnapshot, EVENTS_APPLIED, EVENT_WARNINGS};
pub use engine::{
    expected_blocks_map_bytes, Engine, EngineConfig, Namespace, NamespaceKey, MAX_EXPECTED_BLOCKS,
};
pub use error::{DecodeError, EngineError, KvCacheEventError};
pub use lower_tiers::{InstanceTiers, TierDepths, TierExtensions, TieredScores};
pub use protocol::*;
pub use snapshot::{IndexSnapshot, SnapshotHolder, SnapshotLowerBlock, SnapshotNode};
pub use tree::MemoryReport;
