//! Typed errors of the persistence layer. Every message about a file names the file, the byte
//! offset and what to do next, because the reader is an operator looking at a server that will
//! not start.

use std::path::PathBuf;

use kvindex_engine::EngineError;
use thiserror::Error;

use crate::entry::Lsn;

/// What is wrong with a piece of a segment or snapshot. Used in errors, in the recovery report,
/// in `inspect` findings and as the `reason` metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Damage {
    /// The file ends inside a frame: what a crash during a write leaves behind.
    IncompleteFrame { needed: u64, available: u64 },
    /// The rest of the file is zero bytes (a file system that extended the file before the data
    /// reached the disk).
    ZeroFilledTail,
    /// A frame length of 0 followed by non-zero bytes, or above the record limit.
    BadLength { len: u32 },
    /// The frame's length points past the end of the file, but the record is all there: with
    /// one bit of the length flipped (`actual`) the frame fits in the file and its CRC32C
    /// matches. Bit rot in a written record, not a torn write (docs/log-format.md §5).
    LengthBitFlip { stored: u32, actual: u32 },
    /// The frame's CRC32C does not match its bytes.
    ChecksumMismatch { stored: u32, computed: u32 },
    /// The CRC matched but rkyv's checked access rejected the payload.
    InvalidArchive(String),
    /// An entry names a namespace index outside the batch's table.
    BadNamespaceIndex { index: u32, namespaces: u32 },
    /// A batch with no entries (never written by kvindex).
    EmptyBatch,
    /// A record's first LSN is not the one expected after the previous record.
    LsnMismatch { expected: Lsn, found: Lsn },
    /// A segment header that is too short, has the wrong magic, version or CRC, or disagrees
    /// with the file name.
    BadHeader(String),
}

impl Damage {
    /// Short stable label (metrics, JSON reports).
    pub fn label(&self) -> &'static str {
        match self {
            Damage::IncompleteFrame { .. } => "incomplete_frame",
            Damage::ZeroFilledTail => "zero_filled_tail",
            Damage::BadLength { .. } => "bad_length",
            Damage::LengthBitFlip { .. } => "length_bit_flip",
            Damage::ChecksumMismatch { .. } => "checksum_mismatch",
            Damage::InvalidArchive(_) => "invalid_archive",
            Damage::BadNamespaceIndex { .. } => "bad_namespace_index",
            Damage::EmptyBatch => "empty_batch",
            Damage::LsnMismatch { .. } => "lsn_mismatch",
            Damage::BadHeader(_) => "bad_header",
        }
    }

    /// Whether this is what an interrupted write looks like (tolerated by every policy when at
    /// the tail), as opposed to bytes that changed after they were written.
    pub fn is_torn_write(&self) -> bool {
        matches!(
            self,
            Damage::IncompleteFrame { .. } | Damage::ZeroFilledTail
        )
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::IncompleteFrame { needed, available } => write!(
                f,
                "incomplete record (needs {needed} bytes, {available} left in the file)"
            ),
            Damage::ZeroFilledTail => write!(f, "zero-filled tail"),
            Damage::BadLength { len } => write!(f, "invalid record length {len}"),
            Damage::LengthBitFlip { stored, actual } => write!(
                f,
                "record length {stored} has a flipped bit: the record is complete and its CRC32C \
                 matches length {actual} (damage to a written record, not a torn write)"
            ),
            Damage::ChecksumMismatch { stored, computed } => write!(
                f,
                "CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Damage::InvalidArchive(e) => write!(f, "payload fails validation: {e}"),
            Damage::BadNamespaceIndex { index, namespaces } => write!(
                f,
                "entry names namespace #{index} but the batch has {namespaces}"
            ),
            Damage::EmptyBatch => write!(f, "batch with no entries"),
            Damage::LsnMismatch { expected, found } => {
                write!(f, "record starts at LSN {found}, expected {expected}")
            }
            Damage::BadHeader(why) => write!(f, "bad segment header: {why}"),
        }
    }
}

/// Advice printed with every refusal to start.
pub(crate) const CORRUPT_ADVICE: &str = "Inspect it with `kvindex replay inspect <data-dir>`; \
restore the file from a backup, or restart with `--recovery skip-corrupt` to skip the damage \
and accept losing those events (producers can replay them from the per-stream watermarks)";

/// Every way a persistence call can fail.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PersistError {
    /// An operating-system call failed.
    #[error("{op} {path}{}: {source}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Io {
        op: &'static str,
        path: PathBuf,
        offset: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    /// Recovery found damage its policy does not allow (nothing on disk was changed).
    #[error("corrupt log segment {path} at byte {offset}: {damage} (recovery policy {policy}). {advice}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        damage: Damage,
        policy: &'static str,
        advice: &'static str,
    },
    /// LSNs are missing from the log (a segment was deleted or cut), and the policy refuses it.
    #[error("the log is missing LSNs {first}..={last} (before {next_file}; recovery policy {policy}). {advice}")]
    MissingRecords {
        first: Lsn,
        last: Lsn,
        next_file: String,
        policy: &'static str,
        advice: &'static str,
    },
    /// The newest snapshot has a format version this build cannot read (version 1, from before
    /// lower-tier indexing), and the log recovery would fall back to was compacted past the
    /// position replay must begin at: nothing on disk rebuilds the index. Not damage; refused by
    /// every policy but `skip-corrupt`, which starts from the log's oldest LSN (the rest lost).
    #[error(
        "snapshot {snapshot} has format version {version}, which this build cannot read (it \
             predates lower-tier indexing), and the log was compacted past it: replay would \
             have to begin at LSN {replay_from} but the log starts at LSN {log_starts_at}. Run \
             the kvindex build that wrote it on this data directory, or move the directory \
             aside and start empty (producers send their state again), or restart with \
             `--recovery skip-corrupt` to start from LSN {log_starts_at} and lose every \
             entry before it"
    )]
    SnapshotFormatTooOld {
        snapshot: PathBuf,
        version: u16,
        replay_from: Lsn,
        log_starts_at: Lsn,
    },
    /// A snapshot file failed validation.
    #[error(
        "corrupt snapshot {path} at byte {offset}: {reason}. Delete it (an older snapshot \
             and the log are used instead) or inspect it with `kvindex replay inspect`"
    )]
    CorruptSnapshot {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// Another process holds the data directory.
    #[error(
        "data directory {dir} is locked by another process (flock on LOCK); stop that \
             process or use another data directory"
    )]
    Locked { dir: PathBuf },
    /// The writer stopped after an I/O error; appends fail until the process restarts.
    #[error(
        "the log writer stopped after an I/O error ({cause}); nothing more is appended. \
             Free disk space / fix the device, then restart: recovery truncates the torn tail"
    )]
    WriterFailed { cause: String },
    /// A batch too large for one record.
    #[error("a batch of {bytes} bytes exceeds the record limit of {max} bytes; split it")]
    RecordTooLarge { bytes: u64, max: u64 },
    /// An empty batch was appended.
    #[error("cannot append an empty batch")]
    EmptyBatch,
    /// rkyv could not encode a value.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// The engine refused a call during replay or intake.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// `IoBackendChoice::IoUring` was forced but io_uring cannot be set up here.
    #[error("io_uring was requested but is unavailable ({0}); use the portable writer")]
    IoUringUnavailable(String),
    /// A line of an input file could not be used.
    #[error("{path} line {line}: {reason}")]
    BadInput {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    /// An input that must be read twice is not a regular file: `tool::import` checks every
    /// line before it writes any, then reads the file again to write it, so a pipe, FIFO,
    /// terminal or directory cannot be imported.
    #[error(
        "{path} is not a regular file: `import` reads its input twice (every line is checked \
             before anything is written), so it cannot import a pipe, FIFO or device; write \
             the events to a file first"
    )]
    NotAFile { path: PathBuf },
    /// A file listed in the data directory was deleted before it could be read: a live server
    /// compacted it away (segments) or pruned it (snapshots). Read-only tools only.
    #[error(
        "{path} was deleted while being read (compacted away by the server writing this data \
             directory); run the command again, or from a later position"
    )]
    CompactedAway { path: PathBuf },
    /// A segment file larger than any segment kvindex writes: the read-only tools, which read a
    /// segment whole, refuse it rather than try to allocate its size.
    #[error(
        "{path} is {len} bytes, larger than any log segment kvindex writes (at most {max} bytes \
         here); it is not a segment of this log, or it is damaged"
    )]
    SegmentTooLarge { path: PathBuf, len: u64, max: u64 },
    /// The writer was handed a segment to resume at an offset where appending would destroy
    /// data: inside the segment header, or not at the end of the file. Nothing was written.
    #[error(
        "refusing to resume log segment {path} at byte {offset}: the file is {file_len} bytes, \
             and appends must start after the {header_len}-byte header, exactly at the end of \
             the file. Nothing was written; inspect the directory with `kvindex replay inspect` \
             and report this"
    )]
    UnsafeTail {
        path: PathBuf,
        offset: u64,
        file_len: u64,
        header_len: u64,
    },
    /// The state asked for cannot be rebuilt from what is on disk.
    #[error("{0}")]
    Unavailable(String),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A snapshot could not be opened, stat'ed or mapped (EACCES, EMFILE, ENOMEM, EIO...): an
    /// error of the system, not of the file's content, which was not checked. Recovery stops
    /// rather than take it for damage (and set a valid snapshot aside).
    #[error(
        "snapshot {path} could not be read ({op}: {source}); this says nothing about its              content, which was left as it is. Fix the cause (permissions, open-file limit,              memory, the device) and start again"
    )]
    SnapshotUnreadable {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl PersistError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        offset: Option<u64>,
        source: std::io::Error,
    ) -> Self {
        PersistError::Io {
            op,
            path: path.into(),
            offset,
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = PersistError> = std::result::Result<T, E>;
