//! Knobs of the log: durability (`--fsync`), recovery policy (`--recovery`), I/O backend and
//! sizes. Both policies parse from and print as their command-line spelling.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::PersistError;
use crate::io::{IoBackendChoice, IoFaults};

/// When appended records are forced to disk (docs/log-format.md §4 says what each can lose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// `fdatasync` every group commit before acknowledging: nothing acknowledged is ever lost.
    #[default]
    Always,
    /// Acknowledge once written; `fdatasync` at most this long after the oldest unsynced write.
    Interval(Duration),
    /// Acknowledge once written; leave write-back to the kernel.
    Never,
}

impl FromStr for FsyncPolicy {
    type Err = PersistError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "never" => Ok(FsyncPolicy::Never),
            _ => {
                let ms = s
                    .strip_prefix("interval:")
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| {
                        PersistError::Config(format!(
                            "--fsync {s:?}: expected `always`, `interval:<ms>` (ms > 0) or `never`"
                        ))
                    })?;
                Ok(FsyncPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

/// What recovery does with damage (docs/log-format.md §5.1), after raft-engine's recovery modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryPolicy {
    /// Only a torn write with nothing valid after it is cut from the tail; any other damage (a
    /// torn group commit included) refuses to start.
    Absolute,
    /// Any damage at the tail of the last segment (a torn group commit included) is cut; damage
    /// inside the log, a bit flip in records followed by valid ones included, refuses to start.
    #[default]
    TolerateTail,
    /// Damage anywhere is skipped and counted.
    SkipCorrupt,
}

impl RecoveryPolicy {
    /// The command-line spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            RecoveryPolicy::Absolute => "absolute",
            RecoveryPolicy::TolerateTail => "tolerate-tail",
            RecoveryPolicy::SkipCorrupt => "skip-corrupt",
        }
    }
}

impl FromStr for RecoveryPolicy {
    type Err = PersistError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "absolute" => Ok(RecoveryPolicy::Absolute),
            "tolerate-tail" => Ok(RecoveryPolicy::TolerateTail),
            "skip-corrupt" => Ok(RecoveryPolicy::SkipCorrupt),
            _ => Err(PersistError::Config(format!(
                "--recovery {s:?}: expected `absolute`, `tolerate-tail` or `skip-corrupt`"
            ))),
        }
    }
}

impl fmt::Display for RecoveryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of a recovery, given to [`LogConfig::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryProgress {
    pub bytes_scanned: u64,
    pub bytes_total: u64,
    pub entries_replayed: u64,
}

/// Callback type for recovery progress.
pub type ProgressFn = Arc<dyn Fn(RecoveryProgress) + Send + Sync>;

/// Everything that configures an [`crate::EventLog`].
#[derive(Clone)]
pub struct LogConfig {
    pub fsync: FsyncPolicy,
    pub recovery: RecoveryPolicy,
    pub io: IoBackendChoice,
    /// A segment is closed once it would grow past this many bytes (at most 4 GiB - 128 MiB:
    /// the `replay` tools read a segment whole).
    pub segment_bytes: u64,
    /// Appends waiting for the writer thread before `append` blocks (backpressure).
    pub queue_capacity: usize,
    /// Most bytes the writer gathers into one write (one group commit). Recovery reads it too:
    /// damage in the last segment that holds a whole zero-filled 4 KiB page (an unwritten page
    /// of a torn write) and is followed by valid records that all end within this many bytes of
    /// it is a torn group commit, cut as a tail (docs/log-format.md §5). A bit flip (no zero
    /// page) never is.
    pub max_group_bytes: usize,
    /// Bytes of segment between two entries of its LSN index (docs/log-format.md §2.4); a read
    /// of "events since LSN X" scans at most about this much before reaching X. 0 writes no
    /// index (readers then scan each segment from its start).
    pub lsn_index_stride: u32,
    /// Largest payload of one record, in bytes: at most (and by default)
    /// [`crate::format::MAX_RECORD_LEN`] (64 MiB), at least 1. An append whose batch encodes
    /// larger fails with [`PersistError::RecordTooLarge`] (which carries this limit) and logs
    /// nothing: the caller splits the batch. Lower it only to exercise that path in tests
    /// without building 64 MiB batches; readers accept records up to `MAX_RECORD_LEN` whatever
    /// it is.
    pub max_record_bytes: u32,
    /// Called about once a second during recovery, and at its end.
    pub progress: Option<ProgressFn>,
    /// Simulated device failures (tests only).
    #[doc(hidden)]
    pub faults: IoFaults,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::default(),
            recovery: RecoveryPolicy::default(),
            io: IoBackendChoice::default(),
            segment_bytes: 64 << 20,
            queue_capacity: 1024,
            max_group_bytes: 4 << 20,
            lsn_index_stride: crate::lsn_index::DEFAULT_INDEX_STRIDE,
            max_record_bytes: crate::format::MAX_RECORD_LEN,
            progress: None,
            faults: IoFaults::default(),
        }
    }
}

impl fmt::Debug for LogConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogConfig")
            .field("fsync", &self.fsync)
            .field("recovery", &self.recovery)
            .field("io", &self.io)
            .field("segment_bytes", &self.segment_bytes)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_group_bytes", &self.max_group_bytes)
            .field("lsn_index_stride", &self.lsn_index_stride)
            .field("max_record_bytes", &self.max_record_bytes)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./kvindex-data";
