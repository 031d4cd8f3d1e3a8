//! Segment files on disk: their names, the directory listing, and [`SegmentReader`], which maps a
//! segment read-only and yields its validated records in place.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

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
    Ok(out)
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
        // file not changing underneath it: a data directory belongs to one kvindex process
        // (LOCK), whose writer only appends past the end of any existing map and truncates only
        // during recovery, before maps are made, or after a write error, past the last
        // acknowledged byte. Readers in another process (`kvindex replay`) map only what existed
        // when they opened the file.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| PersistError::io("mmap", path, None, e))?;
        Ok(Self { map: Some(map) })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A memory-mapped segment: validates the header once, then reads records in place.
pub struct SegmentReader {
    path: PathBuf,
    file: MappedFile,
    /// `Err` when the header is damaged (records can still be searched for by `inspect`).
    first_lsn: Result<Lsn, Damage>,
}

impl SegmentReader {
    /// Map `path` and check its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = MappedFile::open(path)?;
        let first_lsn = format::decode_segment_header(file.bytes());
        Ok(Self {
            path: path.to_path_buf(),
            file,
            first_lsn,
        })
    }

    /// The file this reader maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header's first LSN, or what is wrong with the header.
    pub fn first_lsn(&self) -> Result<Lsn, Damage> {
        self.first_lsn.clone()
    }

    /// All bytes of the file (header included).
    pub fn bytes(&self) -> &[u8] {
        self.file.bytes()
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
