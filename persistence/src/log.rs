//! [`EventLog`]: the durable, segmented event log of one data directory. Opening it recovers
//! (snapshot + replay into a sink) and starts the writer; compaction deletes covered segments.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::config::{LogConfig, RecoveryPolicy};
use crate::entry::{LogEntry, Lsn, StreamWatermark};
use crate::error::{PersistError, Result};
use crate::format::SEGMENT_HEADER_LEN;
use crate::io::IoBackendKind;
use crate::recovery::{self, Mode, RecoveryReport, ReplaySink};
use crate::seq_set::TaggedSeqs;
use crate::snapshot::sync_dir;
use crate::writer::{AppendTicket, LogWriter};

/// Exclusive ownership of a data directory (`flock` on `LOCK`), released on drop or process
/// death.
struct DirLock {
    _file: File,
}

impl DirLock {
    fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| PersistError::io("open", &path, None, e))?;
        // SAFETY: flock on a valid, owned descriptor; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PersistError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            return Err(PersistError::io("flock", &path, None, err));
        }
        Ok(Self { _file: file })
    }
}

/// The durable event log of one data directory.
pub struct EventLog {
    dir: PathBuf,
    writer: LogWriter,
    /// The largest group of the tagged set as recovered (before any pruning).
    recovered_max_group: Option<u16>,
    _lock: DirLock,
}

impl EventLog {
    /// Open (creating if needed) the log in `dir`: lock it, recover into `sink` under
    /// `config.recovery`, cut a torn tail, and start the writer.
    pub fn open(
        dir: impl AsRef<Path>,
        config: LogConfig,
        sink: &mut dyn ReplaySink,
    ) -> Result<(Self, RecoveryReport)> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|e| PersistError::io("create directory", &dir, None, e))?;
        let lock = DirLock::acquire(&dir)?;
        let rec = recovery::recover(&dir, &config, Mode::ReadWrite, None, sink)?;
        let mut start = rec.start;
        if rec.report.skipped_anything() {
            // Never append after damage: the next recovery would see it again. A tail that is
            // only a segment header (the empty segment a previous skip-corrupt open created for
            // the next LSN, with no byte after it) holds no damage: the writer resumes it, as it
            // would create it anew, and must, since its name is taken.
            if let Some((first, path, end)) = start.tail.take() {
                let header_only = end <= SEGMENT_HEADER_LEN as u64
                    && std::fs::metadata(&path).is_ok_and(|m| m.len() <= SEGMENT_HEADER_LEN as u64);
                if header_only {
                    start.tail = Some((first, path, end));
                } else {
                    start.older_segments.push((first, path));
                }
            }
            start.tail_marks.clear();
        }
        let recovered_max_group = start.watermarks.tagged().group_ids().last().copied();
        let writer = LogWriter::start(start, &config)?;
        Ok((
            Self {
                dir,
                writer,
                recovered_max_group,
                _lock: lock,
            },
            rec.report,
        ))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append one batch (one record); see [`LogWriter::append`].
    pub fn append(&self, entries: &[LogEntry]) -> Result<AppendTicket> {
        self.writer.append(entries)
    }

    /// Force everything appended so far to disk; returns the LSN below which all is durable.
    pub fn sync(&self) -> Result<Lsn> {
        self.writer.sync()
    }

    /// The LSN the next entry gets.
    pub fn next_lsn(&self) -> Lsn {
        self.writer.next_lsn()
    }

    /// Every LSN below this is on disk.
    pub fn synced_lsn(&self) -> Lsn {
        self.writer.synced_lsn()
    }

    /// Per-stream watermarks of what is on disk.
    pub fn durable_watermarks(&self) -> Vec<StreamWatermark> {
        self.writer.durable_watermarks()
    }

    /// Whether the tagged `source_seq` is durable (docs/log-format.md §6).
    pub fn tagged_seq_durable(&self, source_seq: u64) -> bool {
        self.writer.tagged_seq_durable(source_seq)
    }

    /// The durable tagged source sequences.
    pub fn durable_tagged_seqs(&self) -> TaggedSeqs {
        self.writer.durable_tagged_seqs()
    }

    /// The groups of the durable tagged set.
    pub fn durable_tagged_groups(&self) -> Vec<u16> {
        self.writer.durable_tagged_groups()
    }

    /// The largest durable tagged sequence of `group`.
    pub fn durable_tagged_last(&self, group: u16) -> Option<u64> {
        self.writer.durable_tagged_last(group)
    }

    /// The largest group of the tagged set recovery found (snapshot plus log, before any
    /// pruning by this process).
    pub fn recovered_max_tagged_group(&self) -> Option<u16> {
        self.recovered_max_group
    }

    /// Keep only the durable tagged sequences of `group` above `floor`; the ranges left.
    pub fn prune_tagged_seqs(&self, group: u16, floor: u64) -> usize {
        self.writer.prune_tagged_seqs(group, floor)
    }

    /// Which write path runs (io_uring or portable).
    pub fn io_backend(&self) -> IoBackendKind {
        self.writer.io_backend()
    }

    /// Why the writer stopped, if it has (the log is then read-only until restart).
    pub fn writer_failure(&self) -> Option<String> {
        self.writer.failure()
    }

    /// The segments, oldest first: `(first_lsn, path)`.
    pub fn segments(&self) -> Vec<(Lsn, PathBuf)> {
        self.writer.segments()
    }

    /// Delete every segment whose records all have LSN `< below` (never the one being written).
    /// Returns the deleted files.
    pub fn compact(&self, below: Lsn) -> Result<Vec<PathBuf>> {
        let mut deleted = Vec::new();
        {
            let mut segs = self
                .writer
                .shared()
                .segments
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Segment i holds LSNs [first_i, first_{i+1}).
            while segs.len() >= 2 && segs[1].0 <= below {
                let (_, path) = segs.remove(0);
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        recovery::remove_index(&path);
                        deleted.push(path);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(PersistError::io("delete", &path, None, e)),
                }
            }
        }
        if !deleted.is_empty() {
            sync_dir(&self.dir)?;
            metrics::counter!("kvindex_log_segments_deleted_total").increment(deleted.len() as u64);
        }
        Ok(deleted)
    }

    /// Drain, sync (unless `never`) and stop the writer.
    pub fn close(self) -> Result<()> {
        self.writer.close()
    }
}

/// Read the log of `dir` without changing anything (no lock, no truncation): the snapshot
/// (newest valid one covering at most `upto`) and every entry up to `upto` go to `sink`.
/// Used by the `kvindex replay` tools; safe on a directory a live server is writing (segments
/// are read into memory, never mapped; one compacted away since the listing is
/// [`PersistError::CompactedAway`](crate::PersistError::CompactedAway)).
pub fn read_log(
    dir: impl AsRef<Path>,
    policy: RecoveryPolicy,
    upto: Option<Lsn>,
    sink: &mut dyn ReplaySink,
) -> Result<RecoveryReport> {
    let cfg = LogConfig {
        recovery: policy,
        ..LogConfig::default()
    };
    Ok(recovery::recover(dir.as_ref(), &cfg, Mode::ReadOnly, upto, sink)?.report)
}
