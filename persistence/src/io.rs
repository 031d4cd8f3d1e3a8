//! The two ways the writer puts bytes on disk: io_uring (a write linked to an `fdatasync` in one
//! submission) and a portable `pwrite` + `fdatasync` path. Which one runs is decided once at
//! start-up ([`IoBackendChoice`]) and logged. [`IoFaults`] lets tests make either fail like a
//! full disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Which write path to use; `Auto` tries io_uring and falls back to the portable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoBackendChoice {
    #[default]
    Auto,
    /// io_uring or fail to open (Linux only).
    IoUring,
    /// `pwrite` + `fdatasync` through `std::fs`.
    Portable,
}

/// Which write path is running (reported by `EventLog::io_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackendKind {
    IoUring,
    Portable,
}

impl std::fmt::Display for IoBackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoBackendKind::IoUring => "io_uring",
            IoBackendKind::Portable => "portable",
        })
    }
}

/// Whether io_uring can be used here (`Err` says why not): sandboxes often forbid it.
pub fn io_uring_available() -> Result<(), String> {
    SegmentIo::new(IoBackendChoice::IoUring, IoFaults::default()).map(|_| ())
}

/// Simulated device failures for tests (both backends honour them the same way).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoFaults {
    /// After this many bytes written by the writer (headers included), the write that crosses
    /// the limit writes only up to it and then fails with `ENOSPC`, as a full disk does.
    pub fail_writes_after_bytes: Option<u64>,
    /// Every `fdatasync` fails with `EIO`.
    pub fail_sync: bool,
    /// The `fdatasync` of the recovered tail segment when a writer starts fails with `EIO`.
    pub fail_reopen_sync: bool,
    /// Every snapshot write of a [`crate::DurableIndex`] fails at this step (the log itself is
    /// not affected).
    pub snapshot: Option<SnapshotFault>,
    /// Every `fsync` of the data directory by the writer (after creating a segment, or in a
    /// sync that follows one) fails with `EIO`.
    pub fail_dir_sync: bool,
}

/// Where a simulated snapshot write fails (tests only; [`IoFaults::snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFault {
    /// The temporary file gets this many bytes, then the write fails with `ENOSPC` (a full
    /// disk).
    WriteAfterBytes(u64),
    /// The temporary file is written, its `fsync` fails with `EIO`.
    Sync,
    /// The temporary file is written and synced, its rename fails with `EIO`.
    Rename,
}

/// The chosen backend plus fault injection.
pub(crate) struct SegmentIo {
    backend: Backend,
    faults: IoFaults,
    written: u64,
}

enum Backend {
    Portable,
    #[cfg(target_os = "linux")]
    Uring(Box<uring::UringIo>),
}

impl SegmentIo {
    /// Set up the backend `choice` asks for.
    pub(crate) fn new(choice: IoBackendChoice, faults: IoFaults) -> Result<Self, String> {
        let backend = match choice {
            IoBackendChoice::Portable => Backend::Portable,
            IoBackendChoice::IoUring => Self::uring()?,
            IoBackendChoice::Auto => match Self::uring() {
                Ok(b) => b,
                Err(e) => {
                    tracing::info!(reason = %e, "io_uring unavailable; using the portable writer");
                    Backend::Portable
                }
            },
        };
        Ok(Self {
            backend,
            faults,
            written: 0,
        })
    }

    #[cfg(target_os = "linux")]
    fn uring() -> Result<Backend, String> {
        uring::UringIo::new().map(|u| Backend::Uring(Box::new(u)))
    }

    #[cfg(not(target_os = "linux"))]
    fn uring() -> Result<Backend, String> {
        Err("io_uring exists only on Linux".into())
    }

    pub(crate) fn kind(&self) -> IoBackendKind {
        match self.backend {
            Backend::Portable => IoBackendKind::Portable,
            #[cfg(target_os = "linux")]
            Backend::Uring(_) => IoBackendKind::IoUring,
        }
    }

    /// `fdatasync` a recovered segment before the writer counts its records as synced.
    pub(crate) fn sync_recovered(&self, file: &File) -> io::Result<()> {
        if self.faults.fail_reopen_sync {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.sync_data()
    }

    /// `fsync` the data directory `dir`, so that the segments created in it are durable.
    pub(crate) fn sync_dir(&self, dir: &std::path::Path) -> io::Result<()> {
        if self.faults.fail_dir_sync {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        File::open(dir)?.sync_all()
    }

    /// Write all of `buf` at `offset`, then `fdatasync` when `sync`.
    pub(crate) fn write_at(
        &mut self,
        file: &File,
        offset: u64,
        buf: &[u8],
        sync: bool,
    ) -> io::Result<()> {
        let mut buf = buf;
        let mut fault = None;
        if let Some(limit) = self.faults.fail_writes_after_bytes {
            let room = limit.saturating_sub(self.written);
            if (buf.len() as u64) > room {
                buf = &buf[..room as usize];
                fault = Some(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        let sync = sync && fault.is_none();
        if sync && self.faults.fail_sync {
            self.raw_write(file, offset, buf, false)?;
            self.written += buf.len() as u64;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.raw_write(file, offset, buf, sync)?;
        self.written += buf.len() as u64;
        match fault {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn raw_write(&mut self, file: &File, offset: u64, buf: &[u8], sync: bool) -> io::Result<()> {
        match &mut self.backend {
            Backend::Portable => {
                if !buf.is_empty() {
                    file.write_all_at(buf, offset)?;
                }
                if sync {
                    file.sync_data()?;
                }
                Ok(())
            }
            #[cfg(target_os = "linux")]
            Backend::Uring(u) => u.write_at(file, offset, buf, sync),
        }
    }
}

#[cfg(target_os = "linux")]
mod uring {
    use std::fs::File;
    use std::io;
    use std::os::unix::io::AsRawFd;

    use io_uring::{opcode, squeue, types, IoUring};

    const WRITE: u64 = 1;
    const SYNC: u64 = 2;

    /// Largest single write submitted (a write's length is a `u32` in the submission entry).
    const MAX_WRITE_CHUNK: usize = 1 << 30;

    /// A completed operation, in completion order (unit tests read it).
    #[cfg(test)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Op {
        Write { offset: u64, result: i32 },
        Sync { result: i32 },
    }

    /// A small ring used synchronously by the writer thread: at most two operations (a write and
    /// the `fdatasync` linked to it) are in flight, and every call waits for all of them.
    pub(super) struct UringIo {
        ring: IoUring,
        /// Set when the ring is in an unknown state (a submission failed in a way that may have
        /// left operations in flight); every later call fails instead of touching it again.
        poisoned: bool,
        /// Every completed operation (unit tests only).
        #[cfg(test)]
        trace: Vec<Op>,
    }

    impl UringIo {
        pub(super) fn new() -> Result<Self, String> {
            let ring = IoUring::new(8).map_err(|e| e.to_string())?;
            let mut me = Self {
                ring,
                poisoned: false,
                #[cfg(test)]
                trace: Vec::new(),
            };
            // Some sandboxes allow the setup but not the submissions: probe with a no-op.
            let nop = opcode::Nop::new().build().user_data(0);
            // SAFETY: a no-op references no memory.
            unsafe { me.ring.submission().push(&nop) }.map_err(|e| e.to_string())?;
            me.wait_for(1).map_err(|e| e.to_string())?;
            for cqe in me.ring.completion() {
                if cqe.result() < 0 {
                    return Err(io::Error::from_raw_os_error(-cqe.result()).to_string());
                }
            }
            Ok(me)
        }

        /// Write all of `buf` at `offset`; with `sync`, `fdatasync` once every byte is written.
        pub(super) fn write_at(
            &mut self,
            file: &File,
            offset: u64,
            buf: &[u8],
            sync: bool,
        ) -> io::Result<()> {
            self.write_chunked(file, offset, buf, sync, MAX_WRITE_CHUNK)
        }

        /// [`Self::write_at`] in writes of at most `max_chunk` bytes. The `fdatasync` is linked
        /// to the write of the *last* chunk only, so it runs after every byte of `buf` was
        /// written: linked to an earlier chunk it would leave the later ones unsynced.
        pub(super) fn write_chunked(
            &mut self,
            file: &File,
            mut offset: u64,
            mut buf: &[u8],
            sync: bool,
            max_chunk: usize,
        ) -> io::Result<()> {
            if self.poisoned {
                return Err(io::Error::other(
                    "io_uring ring poisoned by an earlier failure",
                ));
            }
            let fd = types::Fd(file.as_raw_fd());
            let max_chunk = max_chunk.max(1);
            let mut need_sync = sync;
            while !buf.is_empty() || need_sync {
                let mut expected = 0usize;
                let chunk = buf.len().min(max_chunk);
                // Sync only with the write that reaches the end of `buf` (or alone, when
                // nothing is left to write).
                let sync_now = need_sync && chunk == buf.len();
                // SAFETY (both pushes): the entries are valid opcodes on an open fd; the write
                // reads `buf[..chunk]`, which stays borrowed and unmoved until this iteration has
                // reaped both completions below. If waiting fails (`wait_for` poisons the ring),
                // the kernel may still be *reading* `buf` after we return: a write never stores
                // into our memory, so this cannot corrupt the process; at worst stale bytes reach
                // the file past the last acknowledged record, where recovery sees a damaged tail.
                unsafe {
                    let mut sq = self.ring.submission();
                    if chunk > 0 {
                        let mut w = opcode::Write::new(fd, buf.as_ptr(), chunk as u32)
                            .offset(offset)
                            .build()
                            .user_data(WRITE);
                        if sync_now {
                            // The fsync runs only if the write completes in full.
                            w = w.flags(squeue::Flags::IO_LINK);
                        }
                        sq.push(&w)
                            .map_err(|_| io::Error::other("io_uring queue full"))?;
                        expected += 1;
                    }
                    if sync_now {
                        let s = opcode::Fsync::new(fd)
                            .flags(types::FsyncFlags::DATASYNC)
                            .build()
                            .user_data(SYNC);
                        sq.push(&s)
                            .map_err(|_| io::Error::other("io_uring queue full"))?;
                        expected += 1;
                    }
                }
                self.wait_for(expected)?;
                let mut write_res: Option<i32> = None;
                let mut sync_res: Option<i32> = None;
                for cqe in self.ring.completion() {
                    match cqe.user_data() {
                        WRITE => write_res = Some(cqe.result()),
                        SYNC => sync_res = Some(cqe.result()),
                        _ => {}
                    }
                }
                #[cfg(test)]
                {
                    if let Some(r) = write_res {
                        self.trace.push(Op::Write { offset, result: r });
                    }
                    if let Some(r) = sync_res {
                        self.trace.push(Op::Sync { result: r });
                    }
                }
                if let Some(r) = write_res {
                    if r < 0 {
                        return Err(io::Error::from_raw_os_error(-r));
                    }
                    if r == 0 {
                        return Err(io::Error::from(io::ErrorKind::WriteZero));
                    }
                    let n = r as usize;
                    buf = &buf[n..];
                    offset += n as u64;
                }
                match sync_res {
                    Some(0) => need_sync = false,
                    // Cancelled because the linked write was short: retried with the rest.
                    Some(r) if r == -libc::ECANCELED => {}
                    Some(r) if r < 0 => return Err(io::Error::from_raw_os_error(-r)),
                    _ => {}
                }
            }
            Ok(())
        }

        /// Every operation completed so far, in completion order.
        #[cfg(test)]
        pub(super) fn trace(&self) -> &[Op] {
            &self.trace
        }

        /// Submit what is queued and wait until `n` completions are ready.
        fn wait_for(&mut self, n: usize) -> io::Result<()> {
            loop {
                match self.ring.submit_and_wait(n) {
                    Ok(_) if self.ring.completion().len() >= n => return Ok(()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Operations may still be in flight, reading a buffer the caller will
                        // free: never use the ring again, and let the writer fail.
                        self.poisoned = true;
                        return Err(e);
                    }
                }
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::uring::{Op, UringIo};

    /// A write larger than one submission is split into chunks; with `sync`, the `fdatasync`
    /// must complete after the last chunk's write, so that `sync = true` covers every byte (it
    /// once ran after the first chunk only, leaving the rest unsynced). The chunk size is
    /// lowered so the test writes kilobytes, not gigabytes.
    #[test]
    fn io_uring_syncs_after_the_last_chunk_of_a_split_write() {
        let mut ring = match UringIo::new() {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).expect("create");
        let buf: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let chunk = 4096;
        ring.write_chunked(&file, 8, &buf, true, chunk)
            .expect("write + fdatasync");
        let trace = ring.trace().to_vec();

        let writes: Vec<(u64, i32)> = trace
            .iter()
            .filter_map(|op| match *op {
                Op::Write { offset, result } => Some((offset, result)),
                Op::Sync { .. } => None,
            })
            .collect();
        assert_eq!(
            writes,
            vec![(8, 4096), (8 + 4096, 4096), (8 + 8192, 10_000 - 8192)],
            "{trace:?}"
        );
        assert_eq!(
            trace.last(),
            Some(&Op::Sync { result: 0 }),
            "the fdatasync must come after the last chunk: {trace:?}"
        );
        assert_eq!(
            trace
                .iter()
                .filter(|op| matches!(op, Op::Sync { .. }))
                .count(),
            1,
            "one fdatasync for the whole write: {trace:?}"
        );
        let on_disk = std::fs::read(&path).expect("read back");
        assert_eq!(&on_disk[8..], &buf[..]);
    }
}
