//! The sparse per-segment LSN index (docs/log-format.md §2.4): a side file `seg-<lsn>.kvidx`
//! holding `(first LSN, byte offset)` of one record every `stride` bytes of its segment, so
//! "every entry since LSN X" starts reading near X instead of at the segment's start.
//!
//! The index is a hint, never trusted blindly: a reader checks that the record it points to is
//! there (frame, CRC, archive) and starts at the LSN the index says; anything else falls back to
//! scanning the segment from its start, and the fallback is counted
//! (`kvindex_lsn_index_fallbacks_total{reason}`). The writer keeps the planner in memory while
//! it writes a segment and appends marks after the records they name reach the file; recovery
//! recomputes the marks of every segment it scans and rewrites a side file that disagrees.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::entry::Lsn;
use crate::format::{self, FRAME_ALIGN, SEGMENT_HEADER_LEN};
use crate::segment::SegmentReader;

/// Magic of an index file.
pub const INDEX_MAGIC: [u8; 8] = *b"KVLSNIDX";
/// Version of the index file format (independent of the segment format, which it only points
/// into).
pub const INDEX_FORMAT_VERSION: u16 = 1;
/// Bytes of the index file header.
pub const INDEX_HEADER_LEN: usize = 32;
/// Bytes of one index entry.
pub const INDEX_ENTRY_LEN: usize = 24;
/// Default distance in bytes between two indexed records (see [`crate::LogConfig`]).
pub const DEFAULT_INDEX_STRIDE: u32 = 64 << 10;

const INDEX_SUFFIX: &str = ".kvidx";

/// One index entry: the record at `offset` of the segment starts with entry `lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexMark {
    pub lsn: Lsn,
    pub offset: u64,
}

/// Why an index file could not be used (the reader then scans from the segment's start).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IndexFault {
    /// No index file (a log written before indexes existed, or indexing disabled).
    #[error("no index file")]
    Missing,
    #[error("index file unreadable: {0}")]
    Unreadable(String),
    #[error("index header invalid: {0}")]
    BadHeader(String),
    /// The header names another segment.
    #[error("index is for the segment starting at LSN {found}, not {expected}")]
    WrongSegment { expected: Lsn, found: Lsn },
    #[error("index entry {index} fails its CRC32C")]
    BadEntry { index: usize },
    #[error("index entry {index} is out of order or off the record grid")]
    OutOfOrder { index: usize },
    /// The entry passed its own checks but the segment does not hold that record there (the
    /// segment was cut or rewritten after the index was written).
    #[error("index says LSN {lsn} starts at byte {offset}, the segment disagrees: {why}")]
    Stale { lsn: Lsn, offset: u64, why: String },
}

impl IndexFault {
    /// Short stable label (the `reason` of the fallback counter).
    pub fn label(&self) -> &'static str {
        match self {
            IndexFault::Missing => "missing",
            IndexFault::Unreadable(_) => "unreadable",
            IndexFault::BadHeader(_) => "bad_header",
            IndexFault::WrongSegment { .. } => "wrong_segment",
            IndexFault::BadEntry { .. } => "bad_entry",
            IndexFault::OutOfOrder { .. } => "out_of_order",
            IndexFault::Stale { .. } => "stale",
        }
    }
}

/// The index file of a segment file (`seg-X.kvlog` → `seg-X.kvidx`).
pub fn index_path(segment_path: &Path) -> PathBuf {
    segment_path.with_extension(&INDEX_SUFFIX[1..])
}

/// Decides which records get an index entry: the first record at or past `stride` bytes after
/// the previous mark (or after the header). Deterministic in the record offsets, so the writer
/// and recovery compute the same marks for the same segment.
#[derive(Debug, Clone)]
pub struct MarkPlanner {
    stride: u64,
    next_mark: u64,
}

impl MarkPlanner {
    /// A planner for an empty segment; `stride == 0` disables indexing.
    pub fn new(stride: u32) -> Self {
        Self {
            stride: u64::from(stride),
            next_mark: SEGMENT_HEADER_LEN as u64 + u64::from(stride),
        }
    }

    /// A planner continuing after `marks` (the existing marks of a segment being appended to).
    pub fn resume(stride: u32, marks: &[IndexMark]) -> Self {
        let mut p = Self::new(stride);
        if let Some(last) = marks.last() {
            p.next_mark = last.offset.saturating_add(p.stride);
        }
        p
    }

    /// Whether indexing is on.
    pub fn enabled(&self) -> bool {
        self.stride > 0
    }

    /// A record starting with entry `lsn` was placed at `offset`: the mark to record, if any.
    pub fn observe(&mut self, offset: u64, lsn: Lsn) -> Option<IndexMark> {
        if !self.enabled() || offset < self.next_mark {
            return None;
        }
        self.next_mark = offset.saturating_add(self.stride);
        Some(IndexMark { lsn, offset })
    }
}

/// The header of the index of the segment starting at `first_lsn`.
pub fn encode_header(first_lsn: Lsn, stride: u32) -> [u8; INDEX_HEADER_LEN] {
    let mut h = [0u8; INDEX_HEADER_LEN];
    h[0..8].copy_from_slice(&INDEX_MAGIC);
    h[8..10].copy_from_slice(&INDEX_FORMAT_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(INDEX_HEADER_LEN as u16).to_le_bytes());
    // 12..16 flags = 0
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    h[24..28].copy_from_slice(&stride.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// One encoded index entry.
pub fn encode_entry(m: IndexMark) -> [u8; INDEX_ENTRY_LEN] {
    let mut e = [0u8; INDEX_ENTRY_LEN];
    e[0..8].copy_from_slice(&m.lsn.to_le_bytes());
    e[8..16].copy_from_slice(&m.offset.to_le_bytes());
    let crc = crc32c::crc32c(&e[0..16]);
    e[16..20].copy_from_slice(&crc.to_le_bytes());
    // 20..24 reserved = 0
    e
}

/// The whole file for `marks`.
pub fn encode_file(first_lsn: Lsn, stride: u32, marks: &[IndexMark]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + marks.len() * INDEX_ENTRY_LEN);
    out.extend_from_slice(&encode_header(first_lsn, stride));
    for m in marks {
        out.extend_from_slice(&encode_entry(*m));
    }
    out
}

/// A decoded index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedIndex {
    pub stride: u32,
    /// Strictly increasing in both LSN and offset.
    pub marks: Vec<IndexMark>,
}

/// Decode an index file's bytes for the segment starting at `segment_first_lsn`. A partial
/// entry at the end (an append cut by a crash) is ignored; any other defect rejects the file.
pub fn decode(bytes: &[u8], segment_first_lsn: Lsn) -> Result<LoadedIndex, IndexFault> {
    if bytes.len() < INDEX_HEADER_LEN {
        return Err(IndexFault::BadHeader(format!(
            "file is {} bytes, shorter than the {INDEX_HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let h = &bytes[..INDEX_HEADER_LEN];
    if h[0..8] != INDEX_MAGIC {
        return Err(IndexFault::BadHeader("wrong magic".into()));
    }
    if format::le_u32(h, 28) != crc32c::crc32c(&h[0..28]) {
        return Err(IndexFault::BadHeader("header CRC32C mismatch".into()));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != INDEX_FORMAT_VERSION {
        return Err(IndexFault::BadHeader(format!(
            "index version {version}, this build reads {INDEX_FORMAT_VERSION}"
        )));
    }
    if u16::from_le_bytes([h[10], h[11]]) as usize != INDEX_HEADER_LEN || format::le_u32(h, 12) != 0
    {
        return Err(IndexFault::BadHeader(
            "unknown header length or flags".into(),
        ));
    }
    let found = format::le_u64(h, 16);
    if found != segment_first_lsn {
        return Err(IndexFault::WrongSegment {
            expected: segment_first_lsn,
            found,
        });
    }
    let stride = format::le_u32(h, 24);
    let body = &bytes[INDEX_HEADER_LEN..];
    let mut marks: Vec<IndexMark> = Vec::with_capacity(body.len() / INDEX_ENTRY_LEN);
    for (index, e) in body.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
        if format::le_u32(e, 16) != crc32c::crc32c(&e[0..16]) || format::le_u32(e, 20) != 0 {
            return Err(IndexFault::BadEntry { index });
        }
        let m = IndexMark {
            lsn: format::le_u64(e, 0),
            offset: format::le_u64(e, 8),
        };
        let on_grid =
            m.offset >= SEGMENT_HEADER_LEN as u64 && m.offset.is_multiple_of(FRAME_ALIGN as u64);
        let increasing = marks
            .last()
            .is_none_or(|p| m.lsn > p.lsn && m.offset > p.offset);
        if !on_grid || !increasing || m.lsn < segment_first_lsn {
            return Err(IndexFault::OutOfOrder { index });
        }
        marks.push(m);
    }
    Ok(LoadedIndex { stride, marks })
}

/// Read and decode the index file of the segment at `segment_path`.
pub fn load(segment_path: &Path, segment_first_lsn: Lsn) -> Result<LoadedIndex, IndexFault> {
    let path = index_path(segment_path);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(IndexFault::Missing),
        Err(e) => return Err(IndexFault::Unreadable(e.to_string())),
    };
    decode(&bytes, segment_first_lsn)
}

/// Make the index file of `segment_path` hold exactly `marks` (rewriting it if it holds
/// anything else) and return it opened for appending, with whether it had to be rewritten.
/// Not synced: a lost or torn index only costs a scan.
pub fn ensure(
    segment_path: &Path,
    first_lsn: Lsn,
    stride: u32,
    marks: &[IndexMark],
) -> std::io::Result<(IndexAppender, bool)> {
    let path = index_path(segment_path);
    let want = encode_file(first_lsn, stride, marks);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let mut have = Vec::new();
    file.read_to_end(&mut have)?;
    let rewritten = have != want;
    if rewritten {
        file.set_len(0)?;
        file.write_all_at(&want, 0)?;
    }
    Ok((
        IndexAppender {
            file,
            path,
            len: want.len() as u64,
        },
        rewritten,
    ))
}

/// The index file of the segment being written, open for appending marks.
pub struct IndexAppender {
    file: File,
    path: PathBuf,
    len: u64,
}

impl IndexAppender {
    /// A fresh index (header only) for a new segment.
    pub fn create(segment_path: &Path, first_lsn: Lsn, stride: u32) -> std::io::Result<Self> {
        Ok(ensure(segment_path, first_lsn, stride, &[])?.0)
    }

    /// Append `marks` (whose records are already written to the segment).
    pub fn append(&mut self, marks: &[IndexMark]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(marks.len() * INDEX_ENTRY_LEN);
        for m in marks {
            buf.extend_from_slice(&encode_entry(*m));
        }
        self.file.write_all_at(&buf, self.len)?;
        self.len += buf.len() as u64;
        Ok(())
    }

    /// The index file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where a read of "entries since `from`" starts in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekStart {
    /// Byte offset of the first record to read.
    pub offset: usize,
    pub via: SeekVia,
}

/// How [`seek`] chose its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeekVia {
    /// A verified index entry: the record at the offset starts with entry `lsn <= from`.
    Index { lsn: Lsn },
    /// The segment's first record: `from` lies before the first indexed record, or the index
    /// has no entries.
    SegmentStart,
    /// The index could not be used; the segment is scanned from its start (counted).
    Fallback(IndexFault),
}

/// Where to start reading `reader`'s segment for entries with LSN `>= from`. Never worse than
/// the segment's start; an unusable index is counted in
/// `kvindex_lsn_index_fallbacks_total{reason}` and logged at debug level.
pub fn seek(reader: &SegmentReader, from: Lsn) -> SeekStart {
    let start = |via| SeekStart {
        offset: SEGMENT_HEADER_LEN,
        via,
    };
    let Ok(first_lsn) = reader.first_lsn() else {
        // The read reports the damaged header itself.
        return start(SeekVia::SegmentStart);
    };
    if from <= first_lsn {
        return start(SeekVia::SegmentStart);
    }
    let fallback = |fault: IndexFault| {
        tracing::debug!(segment = %reader.path().display(), %fault, "LSN index not used; scanning the segment");
        metrics::counter!("kvindex_lsn_index_fallbacks_total", "reason" => fault.label())
            .increment(1);
        start(SeekVia::Fallback(fault))
    };
    let index = match load(reader.path(), first_lsn) {
        Ok(i) => i,
        Err(f) => return fallback(f),
    };
    // Marks past the end of this map name records appended after it was made (a live writer):
    // not visible here, not a fault.
    let visible = &index.marks[..index.marks.partition_point(|m| m.offset < reader.len())];
    let at = visible.partition_point(|m| m.lsn <= from);
    let Some(m) = at.checked_sub(1).map(|i| visible[i]) else {
        return start(SeekVia::SegmentStart);
    };
    let stale = |why: String| IndexFault::Stale {
        lsn: m.lsn,
        offset: m.offset,
        why,
    };
    let Ok(offset) = usize::try_from(m.offset) else {
        return fallback(stale("offset beyond the address space".into()));
    };
    match format::read_record(reader.bytes(), offset) {
        Ok(Some(rec)) if rec.batch.first_lsn.to_native() == m.lsn => SeekStart {
            offset,
            via: SeekVia::Index { lsn: m.lsn },
        },
        Ok(Some(rec)) => fallback(stale(format!(
            "the record there starts at LSN {}",
            rec.batch.first_lsn.to_native()
        ))),
        Ok(None) => fallback(stale("the segment ends before it".into())),
        Err(d) => fallback(stale(d.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planner_marks_the_first_record_past_each_stride() {
        let mut p = MarkPlanner::new(100);
        assert_eq!(p.observe(32, 1), None);
        assert_eq!(p.observe(120, 2), None);
        assert_eq!(
            p.observe(136, 3),
            Some(IndexMark {
                lsn: 3,
                offset: 136
            })
        );
        assert_eq!(p.observe(200, 4), None);
        assert_eq!(
            p.observe(240, 9),
            Some(IndexMark {
                lsn: 9,
                offset: 240
            })
        );
        let mut r = MarkPlanner::resume(
            100,
            &[IndexMark {
                lsn: 9,
                offset: 240,
            }],
        );
        assert_eq!(r.observe(336, 10), None);
        assert!(r.observe(340, 11).is_some());
        let mut off = MarkPlanner::new(0);
        assert_eq!(off.observe(1 << 30, 5), None);
    }

    #[test]
    fn an_index_file_round_trips_and_rejects_each_defect() {
        let marks = [
            IndexMark {
                lsn: 10,
                offset: 64,
            },
            IndexMark {
                lsn: 20,
                offset: 128,
            },
        ];
        let bytes = encode_file(5, 64, &marks);
        let back = decode(&bytes, 5).expect("valid");
        assert_eq!(back.marks, marks);
        assert_eq!(back.stride, 64);
        // A partial trailing entry is an interrupted append: ignored.
        let mut torn = bytes.clone();
        torn.extend_from_slice(&[1, 2, 3]);
        assert_eq!(decode(&torn, 5).expect("torn tail").marks, marks);
        assert_eq!(
            decode(&bytes, 6),
            Err(IndexFault::WrongSegment {
                expected: 6,
                found: 5
            })
        );
        let mut flipped = bytes.clone();
        flipped[INDEX_HEADER_LEN + INDEX_ENTRY_LEN + 3] ^= 1;
        assert_eq!(decode(&flipped, 5), Err(IndexFault::BadEntry { index: 1 }));
        let mut header = bytes.clone();
        header[17] ^= 1;
        assert!(matches!(decode(&header, 5), Err(IndexFault::BadHeader(_))));
        let backwards = encode_file(5, 64, &[marks[1], marks[0]]);
        assert_eq!(
            decode(&backwards, 5),
            Err(IndexFault::OutOfOrder { index: 1 })
        );
        let off_grid = encode_file(
            5,
            64,
            &[IndexMark {
                lsn: 10,
                offset: 65,
            }],
        );
        assert_eq!(
            decode(&off_grid, 5),
            Err(IndexFault::OutOfOrder { index: 0 })
        );
        assert!(matches!(
            decode(&bytes[..10], 5),
            Err(IndexFault::BadHeader(_))
        ));
    }
}
