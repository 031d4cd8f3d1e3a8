//! Durable event log for kvindex: every accepted event is appended to a segmented, checksummed,
//! append-only log; periodic snapshots bound recovery time; after a crash the index is rebuilt
//! exactly from the newest valid snapshot plus the log tail.
//!
//! The on-disk format, the durability guarantees of each `--fsync` policy and what each kind of
//! damage yields under each `--recovery` policy are specified in `docs/log-format.md`.
//!
//! Follow an event down the files:
//! * [`entry`]: what is appended ([`LogEntry`]) and what it gets ([`Lsn`]);
//! * [`record`]: the rkyv payload types; [`format`]: framing (length + CRC32C + payload);
//! * [`writer`]: LSN assignment, the bounded queue and the group-commit writer thread, through
//!   [`io`] (io_uring or portable);
//! * [`segment`]: reading (into memory; mapped only by the lock holder); `scan`: one walk over a segment's records that
//!   resumes after damage; [`lsn_index`]: where in a segment an LSN starts;
//!   [`recovery`]: snapshot + replay + damage policy;
//! * [`log`]: [`EventLog`], which ties them together for one data directory;
//! * [`snapshot`]: [`SnapshotStore`]; [`durable`]: [`DurableIndex`], an engine kept durable by
//!   a log and snapshots;
//! * [`tool`]: the logic of `kvindex replay` (inspect, export, import, state, diff).

pub mod config;
pub mod durable;
pub mod entry;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod io;
pub mod log;
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_hooks;
pub mod lsn_index;
pub mod record;
pub mod recovery;
mod scan;
pub mod segment;
pub mod seq_set;
pub mod snapshot;
mod sync;
pub mod telemetry;
pub mod tool;
pub mod writer;

pub use config::{
    FsyncPolicy, LogConfig, ProgressFn, RecoveryPolicy, RecoveryProgress, DEFAULT_DATA_DIR,
};
pub use durable::{
    CloseOutcome, DurableConfig, DurableIndex, EngineSink, SnapshotPolicy, SnapshotRetry,
};
pub use entry::{
    LogEntry, LogOp, LoggedEntry, Lsn, NamespaceSpec, StreamKey, StreamWatermark, FIRST_LSN,
};
pub use error::{Damage, PersistError, Result};
pub use io::{io_uring_available, IoBackendChoice, IoBackendKind, IoFaults, SnapshotFault};
pub use log::{read_log, EventLog};
pub use recovery::{
    CollectingSink, EntryView, NullSink, RecoveryReport, ReplaySink, SkippedRegion, TailCut,
};
pub use segment::{SegmentReader, SegmentRecords};
pub use seq_set::{
    split_tagged, tagged_source_seq, SeqSet, TaggedSeqs, MAX_TAGGED_SEQ, SOURCE_SEQ_TAG,
};
pub use snapshot::{LoadedSnapshot, SnapshotImage, SnapshotMeta, SnapshotStore};
pub use telemetry::describe_metrics;
pub use writer::{AppendTicket, LogWriter};
