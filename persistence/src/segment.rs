//! Segment files on disk: their names, the directory listing, and [`SegmentReader`], which holds
//! a segment's bytes (read into memory, or mapped by the process that owns the directory) and
//! yields its validated records in place.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rkyv::util::AlignedVec;

use crate::entry::Lsn;
use crate::error::{Damage, PersistError, Result};
use crate::format::{self, ValidRecord, SEGMENT_HEADER_LEN};

const SEG_PREFIX: &str = "seg-";
const SEG_SUFFIX: &str = ".kvlog";
const INDEX_SUFFIX: &str = ".kvidx";
const SNAP_PREFIX: &str = "snap-";
const SNAP_SUFFIX: &str = ".kvsnap";
const TMP_SUFFIX: &str = ".tmp";

/// File name of the segment starting at `first_lsn`.
pub fn segment_file_name(first_lsn: Lsn) -> String {
    format!("{SEG_PREFIX}{first_lsn:020}{SEG_SUFFIX}")
}

/// File name of the snapshot covering LSNs below `next_lsn`.
pub fn snapshot_file_name(next_lsn: Lsn) -> String {
    format!("{SNAP_PREFIX}{next_lsn:020}{SNAP_SUFFIX}")
}

fn parse_number(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What a data directory holds, sorted by LSN.
#[derive(Debug, Default, Clone)]
pub struct DirListing {
    /// `(first_lsn from the name, path)`.
    pub segments: Vec<(Lsn, PathBuf)>,
    /// `(next_lsn from the name, path)`.
    pub snapshots: Vec<(Lsn, PathBuf)>,
    /// Leftover temporary files.
    pub temps: Vec<PathBuf>,
    /// LSN index files (`seg-<first_lsn>.kvidx`): `(first_lsn from the name, path)`.
    pub indexes: Vec<(Lsn, PathBuf)>,
}

/// List the data directory (which must exist).
pub fn list_dir(dir: &Path) -> Result<DirListing> {
    let mut out = DirListing::default();
    let rd =
        std::fs::read_dir(dir).map_err(|e| PersistError::io("read directory", dir, None, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| PersistError::io("read directory", dir, None, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(lsn) = parse_number(name, SEG_PREFIX, SEG_SUFFIX) {
            out.segments.push((lsn, ent.path()));
        } else if let Some(lsn) = parse_number(name, SEG_PREFIX, INDEX_SUFFIX) {
            out.indexes.push((lsn, ent.path()));
        } else if let Some(lsn) = parse_number(name, SNAP_PREFIX, SNAP_SUFFIX) {
            out.snapshots.push((lsn, ent.path()));
        } else if name.starts_with(SNAP_PREFIX) && name.ends_with(TMP_SUFFIX) {
            out.temps.push(ent.path());
        }
    }
    out.segments.sort();
    out.snapshots.sort();
    test_hooks::after_listing(dir);
    Ok(out)
}

/// Hooks for tests of readers racing a live writer (compaction between a listing and the read).
#[doc(hidden)]
pub mod test_hooks {
    use std::cell::RefCell;
    use std::path::Path;

    type Hook = Box<dyn FnMut(&Path)>;

    thread_local! {
        static AFTER_LISTING: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Run `hook` (on this thread only) after every directory listing, until cleared with
    /// `None`.
    pub fn set_after_listing(hook: Option<Hook>) {
        AFTER_LISTING.with(|h| *h.borrow_mut() = hook);
    }

    pub(crate) fn after_listing(dir: &Path) {
        AFTER_LISTING.with(|h| {
            if let Ok(mut h) = h.try_borrow_mut() {
                if let Some(f) = h.as_mut() {
                    f(dir);
                }
            }
        });
    }
}

/// A read-only memory map of a whole file (empty files are not mapped).
pub(crate) struct MappedFile {
    map: Option<Mmap>,
}

impl MappedFile {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| PersistError::io("open", path, None, e))?;
        let len = file
            .metadata()
            .map_err(|e| PersistError::io("stat", path, None, e))?
            .len();
        if len == 0 {
            return Ok(Self { map: None });
        }
        // SAFETY: the map is read-only and private to this handle. Its soundness rests on the
        // file not shrinking underneath it (a truncated mapped page raises SIGBUS on access).
        // Only two kinds of file are mapped: snapshots, which are never modified once renamed
        // into place (deleting one leaves the map valid), and segments read by the process
        // holding the directory's LOCK (recovery in `EventLog::open`), whose own writer starts
        // only after recovery and only appends past the end of the map. Readers that take no
        // lock (`kvindex replay`, `read_log`) never map segments: they read them into memory
        // ([`SegmentReader::open`]), since a live server may cut a segment's tail at any time.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| PersistError::io("mmap", path, None, e))?;
        Ok(Self { map: Some(map) })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A segment's bytes: read into memory, or mapped.
enum SegmentBytes {
    Owned(AlignedVec<16>),
    Mapped(MappedFile),
}

/// The largest file the tools read whole into memory. kvindex writes segments of at most
/// `segment_bytes` plus one record (64 MiB + 64 MiB with the defaults), so anything near this
/// is a foreign or damaged file, which must give an error rather than an allocation of its size.
pub(crate) const MAX_READ_SEGMENT_BYTES: u64 = 4 << 30;

/// Read the whole of `file` into 16-byte aligned memory with positioned reads. A file cut while
/// it is read gives a shorter buffer (as if the cut happened first), never a fault; bytes
/// appended after the `stat` are not read.
fn read_whole(file: &File, path: &Path) -> Result<AlignedVec<16>> {
    let len = file
        .metadata()
        .map_err(|e| PersistError::io("stat", path, None, e))?
        .len();
    if len > MAX_READ_SEGMENT_BYTES {
        return Err(PersistError::SegmentTooLarge {
            path: path.to_path_buf(),
            len,
            max: MAX_READ_SEGMENT_BYTES,
        });
    }
    let len = len as usize;
    let mut buf = AlignedVec::<16>::with_capacity(len);
    buf.resize(len, 0);
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(PersistError::io("read", path, Some(got as u64), e)),
        }
    }
    buf.resize(got, 0);
    Ok(buf)
}

/// Open a listed file; one deleted since the listing is [`PersistError::CompactedAway`].
pub(crate) fn open_listed(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| {
        if e.kind() == ErrorKind::NotFound {
            PersistError::CompactedAway {
                path: path.to_path_buf(),
            }
        } else {
            PersistError::io("open", path, None, e)
        }
    })
}

/// A segment: validates the header once, then reads records in place.
pub struct SegmentReader {
    path: PathBuf,
    file: SegmentBytes,
    /// `Err` when the header is damaged (records can still be searched for by `inspect`).
    first_lsn: Result<Lsn, Damage>,
}

impl SegmentReader {
    /// Read `path` into memory and check its header. Safe while a live server writes, cuts or
    /// deletes the file; a file deleted since it was listed is [`PersistError::CompactedAway`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::read_from(&open_listed(path)?, path)
    }

    /// Read the already opened segment `file` (of `path`) into memory and check its header. An
    /// open file survives its deletion, so a reader holding one is not hurt by compaction.
    pub fn read_from(file: &File, path: &Path) -> Result<Self> {
        Ok(Self::new(
            path,
            SegmentBytes::Owned(read_whole(file, path)?),
        ))
    }

    /// Map `path` and check its header. Only for the process holding the directory's LOCK,
    /// before its writer starts (see the SAFETY note of the map).
    pub(crate) fn map(path: &Path) -> Result<Self> {
        Ok(Self::new(
            path,
            SegmentBytes::Mapped(MappedFile::open(path)?),
        ))
    }

    fn new(path: &Path, file: SegmentBytes) -> Self {
        let mut reader = Self {
            path: path.to_path_buf(),
            file,
            first_lsn: Err(Damage::EmptyBatch),
        };
        reader.first_lsn = format::decode_segment_header(reader.bytes());
        reader
    }

    /// The file this reader holds.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's first LSN, or what is wrong with the header.
    pub fn first_lsn(&self) -> Result<Lsn, Damage> {
        self.first_lsn.clone()
    }

    /// All bytes of the file (header included).
    pub fn bytes(&self) -> &[u8] {
        match &self.file {
            SegmentBytes::Owned(v) => v.as_slice(),
            SegmentBytes::Mapped(m) => m.bytes(),
        }
    }

    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// Records from the first one on; stops after the first damage (yielded as `Err`).
    pub fn records(&self) -> SegmentRecords<'_> {
        SegmentRecords {
            bytes: self.bytes(),
            offset: SEGMENT_HEADER_LEN,
            done: self.first_lsn.is_err(),
        }
    }
}

/// Iterator over a segment's valid records (see [`SegmentReader::records`]).
pub struct SegmentRecords<'a> {
    bytes: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> SegmentRecords<'a> {
    /// Iterate the records of a segment held in `bytes` (header included; must be 8-byte
    /// aligned for payloads to be readable in place, e.g. a map or an `AlignedVec`).
    pub fn over(bytes: &'a [u8]) -> Self {
        let done = format::decode_segment_header(bytes).is_err();
        Self {
            bytes,
            offset: SEGMENT_HEADER_LEN,
            done,
        }
    }

    /// Offset of the next frame to read.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl<'a> Iterator for SegmentRecords<'a> {
    type Item = std::result::Result<ValidRecord<'a>, (usize, Damage)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match format::read_record(self.bytes, self.offset) {
            Ok(Some(r)) => {
                self.offset = r.end;
                Some(Ok(r))
            }
            Ok(None) => {
                self.done = true;
                None
            }
            Err(d) => {
                self.done = true;
                Some(Err((self.offset, d)))
            }
        }
    }
}
