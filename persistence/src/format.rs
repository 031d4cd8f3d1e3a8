//! Byte-level framing of segments (docs/log-format.md §2): headers, record frames, and the
//! validation of one frame. Pure functions over byte slices, so the same code serves the memory
//! mapped reader, recovery, `inspect` and the fuzz target.

use rkyv::rancor;

use crate::entry::Lsn;
use crate::error::Damage;
use crate::record::ArchivedLogBatch;

/// Magic of a segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"KVIDXLOG";
/// Magic of a snapshot file.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"KVIDXSNP";
/// Newest version of the segment (log) format: 2 added `OpRecord::DropNamespace`
/// (docs/log-format.md §2.1). The writer gives a segment version 2 only when it holds (or is
/// about to hold) such an entry; every other segment stays at [`BASE_FORMAT_VERSION`], so a
/// build reading only version 1 still reads every log without drops, and meets a segment with
/// a drop as one it cannot read (docs/operations.md, "Going back to an older build").
pub const FORMAT_VERSION: u16 = 2;
/// Oldest segment format version this build reads, and the one it writes by default.
pub const BASE_FORMAT_VERSION: u16 = 1;
/// Version of the snapshot format: 2 added the lower storage tiers (`NamespaceImage::lower`),
/// 3 the durable tagged source sequences after the image (header bytes 48..56: the image's
/// length), written only when there are tagged sequences (version 2 otherwise, so that builds
/// reading only version 2 can go on). Version-2 snapshots are read (without tagged sequences); version-1 ones are
/// refused with a clear error, and recovery then falls back to an older snapshot or to the log
/// (docs/log-format.md §3).
pub const SNAPSHOT_FORMAT_VERSION: u16 = 3;
/// Oldest snapshot format version this build reads.
pub const MIN_SNAPSHOT_FORMAT_VERSION: u16 = 2;
/// Bytes before the first record of a segment.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Bytes of a record frame before its payload (length, CRC).
pub const FRAME_HEADER_LEN: usize = 8;
/// Alignment of every frame (and so every payload) inside a segment.
pub const FRAME_ALIGN: usize = 8;
/// Largest payload a record may have.
pub const MAX_RECORD_LEN: u32 = 64 << 20;

/// Zero bytes after a payload of `len` bytes, up to the next frame.
pub fn padding(len: usize) -> usize {
    (FRAME_ALIGN - len % FRAME_ALIGN) % FRAME_ALIGN
}

/// Bytes a frame with a payload of `len` bytes occupies.
pub fn frame_len(len: usize) -> usize {
    FRAME_HEADER_LEN + len + padding(len)
}

/// The (version 1) segment header for a segment starting at `first_lsn`.
pub fn encode_segment_header(first_lsn: Lsn) -> [u8; SEGMENT_HEADER_LEN] {
    encode_segment_header_version(first_lsn, BASE_FORMAT_VERSION)
}

/// The segment header of format `version` for a segment starting at `first_lsn`.
pub fn encode_segment_header_version(first_lsn: Lsn, version: u16) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[10..12].copy_from_slice(&(SEGMENT_HEADER_LEN as u16).to_le_bytes());
    // 12..16 flags = 0
    h[16..24].copy_from_slice(&first_lsn.to_le_bytes());
    // 24..28 reserved = 0
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Validate a segment header and return its `first_lsn`.
pub fn decode_segment_header(bytes: &[u8]) -> Result<Lsn, Damage> {
    decode_segment_header_version(bytes).map(|(lsn, _)| lsn)
}

/// Validate a segment header and return its `first_lsn` and format version.
pub fn decode_segment_header_version(bytes: &[u8]) -> Result<(Lsn, u16), Damage> {
    if bytes.len() < SEGMENT_HEADER_LEN {
        return Err(Damage::BadHeader(format!(
            "file is {} bytes, shorter than the {SEGMENT_HEADER_LEN}-byte header",
            bytes.len()
        )));
    }
    let h = &bytes[..SEGMENT_HEADER_LEN];
    if h[0..8] != SEGMENT_MAGIC {
        return Err(Damage::BadHeader(
            "wrong magic (not a kvindex segment)".into(),
        ));
    }
    let stored = le_u32(h, 28);
    let computed = crc32c::crc32c(&h[0..28]);
    if stored != computed {
        return Err(Damage::BadHeader(format!(
            "header CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let version = le_u16(h, 8);
    if !(BASE_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(Damage::BadHeader(format!(
            "format version {version}, this build reads {BASE_FORMAT_VERSION} to {FORMAT_VERSION}"
        )));
    }
    if le_u16(h, 10) as usize != SEGMENT_HEADER_LEN || le_u32(h, 12) != 0 || le_u32(h, 24) != 0 {
        return Err(Damage::BadHeader(
            "unknown header length, flags or reserved bits".into(),
        ));
    }
    Ok((le_u64(h, 16), version))
}

/// CRC32C of a frame: its 4 length bytes, then payload and padding.
pub fn frame_crc(len_bytes: [u8; 4], payload_and_padding: &[u8]) -> u32 {
    #[cfg(test)]
    CRC_BYTES.with(|c| c.set(c.get() + payload_and_padding.len()));
    crc32c::crc32c_append(crc32c::crc32c(&len_bytes), payload_and_padding)
}

#[cfg(test)]
thread_local! {
    /// Bytes checksummed by frame CRCs on this thread (tests bound the work of a scan with it).
    pub(crate) static CRC_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Append one frame holding `payload` to `buf` (which must end on a frame boundary).
pub fn append_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = payload.len() as u32;
    let pad = padding(payload.len());
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + pad, 0);
    let crc = frame_crc(len.to_le_bytes(), &buf[start + FRAME_HEADER_LEN..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// A frame whose length and CRC are valid.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// Offset of the frame in the segment.
    pub offset: usize,
    /// The payload (without padding).
    pub payload: &'a [u8],
    /// Offset just past the frame (its padding included): where the next frame starts.
    pub end: usize,
}

/// Read and check the frame at `offset` of a whole segment's bytes. `Ok(None)` means the file
/// ends exactly at `offset`.
pub fn read_frame(bytes: &[u8], offset: usize) -> Result<Option<Frame<'_>>, Damage> {
    let available = bytes.len().saturating_sub(offset);
    if available == 0 {
        return Ok(None);
    }
    if available < FRAME_HEADER_LEN {
        if bytes[offset..].iter().all(|&b| b == 0) {
            return Err(Damage::ZeroFilledTail);
        }
        return Err(Damage::IncompleteFrame {
            needed: FRAME_HEADER_LEN as u64,
            available: available as u64,
        });
    }
    let len = le_u32(bytes, offset);
    if len == 0 {
        if bytes[offset..].iter().all(|&b| b == 0) {
            return Err(Damage::ZeroFilledTail);
        }
        return Err(Damage::BadLength { len });
    }
    if len > MAX_RECORD_LEN {
        return Err(Damage::BadLength { len });
    }
    let total = frame_len(len as usize);
    if available < total {
        if let Some(actual) = flipped_length(bytes, offset, len) {
            return Err(Damage::LengthBitFlip {
                stored: len,
                actual,
            });
        }
        return Err(Damage::IncompleteFrame {
            needed: total as u64,
            available: available as u64,
        });
    }
    let stored = le_u32(bytes, offset + 4);
    let body = &bytes[offset + FRAME_HEADER_LEN..offset + total];
    let computed = frame_crc(len.to_le_bytes(), body);
    if stored != computed {
        return Err(Damage::ChecksumMismatch { stored, computed });
    }
    Ok(Some(Frame {
        offset,
        payload: &body[..len as usize],
        end: offset + total,
    }))
}

/// The frame at `offset` claims length `len`, which runs past the end of `bytes`. A crash
/// during the write leaves exactly that (a correct length, then a prefix of the frame); so does
/// a flipped bit in the length of a record that was written whole, though, and only the CRC
/// tells them apart, since it covers the length: try each of the 32 single-bit flips of `len`
/// that fits in the file and return the one whose frame is a valid batch with a matching CRC.
/// At most 32 candidates (in practice those clearing one of the few set bits of `len`), each
/// checked for rkyv's structure before its CRC is computed; this runs only where a frame
/// overruns the file, i.e. at most once at the end of a segment.
fn flipped_length(bytes: &[u8], offset: usize, len: u32) -> Option<u32> {
    let available = bytes.len().saturating_sub(offset);
    let stored = le_u32(bytes, offset + 4);
    (0..32).map(|bit| len ^ (1 << bit)).find(|&candidate| {
        if candidate == 0 || candidate > MAX_RECORD_LEN {
            return false;
        }
        let total = frame_len(candidate as usize);
        if total > available {
            return false;
        }
        let body = &bytes[offset + FRAME_HEADER_LEN..offset + total];
        access_batch(&body[..candidate as usize]).is_ok()
            && frame_crc(candidate.to_le_bytes(), body) == stored
    })
}

/// rkyv's checked access to a payload, plus the invariants rkyv cannot know (non-empty batch,
/// namespace indices in range). The payload must be 8-byte aligned (it is inside a mapped
/// segment); a misaligned one is reported as invalid, never read.
pub fn access_batch(payload: &[u8]) -> Result<&ArchivedLogBatch, Damage> {
    let batch = rkyv::access::<ArchivedLogBatch, rancor::Error>(payload)
        .map_err(|e| Damage::InvalidArchive(e.to_string()))?;
    if batch.entries.is_empty() {
        return Err(Damage::EmptyBatch);
    }
    let n = batch.namespaces.len() as u32;
    for e in batch.entries.iter() {
        let idx = e.namespace.to_native();
        if idx >= n {
            return Err(Damage::BadNamespaceIndex {
                index: idx,
                namespaces: n,
            });
        }
    }
    Ok(batch)
}

/// A frame whose payload is a valid batch.
#[derive(Debug, Clone, Copy)]
pub struct ValidRecord<'a> {
    pub offset: usize,
    pub end: usize,
    pub batch: &'a ArchivedLogBatch,
}

/// Read the frame at `offset` and validate its payload.
pub fn read_record(bytes: &[u8], offset: usize) -> Result<Option<ValidRecord<'_>>, Damage> {
    let Some(frame) = read_frame(bytes, offset)? else {
        return Ok(None);
    };
    let batch = access_batch(frame.payload)?;
    Ok(Some(ValidRecord {
        offset: frame.offset,
        end: frame.end,
        batch,
    }))
}

/// The next offset after `from` (exclusive), on the frame grid, where a valid record starts;
/// `None` when there is none. Used to tell tail damage from damage inside the log, and by
/// `skip-corrupt` to resume after damage.
pub fn find_next_record(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from + FRAME_ALIGN;
    while at + FRAME_HEADER_LEN <= bytes.len() {
        let len = le_u32(bytes, at);
        // Cheap filters before the CRC: a plausible length that fits in the file, then the
        // payload's structure. A CRC reads the whole candidate (up to 64 MiB), and damaged
        // bytes offer a plausible length at many offsets (random bytes at one in 64; a run of
        // one repeated small word at every one), so checksumming each would make a damaged
        // segment take hours to scan. rkyv's validation rejects such bytes after a few reads
        // (the root's pointers leave the payload), so only candidates that look like a batch
        // are checksummed.
        if len != 0 && len <= MAX_RECORD_LEN && at + frame_len(len as usize) <= bytes.len() {
            let payload = &bytes[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + len as usize];
            if access_batch(payload).is_ok() {
                if let Ok(Some(_)) = read_record(bytes, at) {
                    return Some(at);
                }
            }
        }
        at += FRAME_ALIGN;
    }
    None
}

/// Number of entries in a batch, as u64.
pub fn batch_len(batch: &ArchivedLogBatch) -> u64 {
    batch.entries.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_the_castagnoli_checksum() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn segment_header_round_trips_and_rejects_every_single_bit_flip() {
        let h = encode_segment_header(0x0102_0304_0506_0708);
        assert_eq!(&h[0..8], b"KVIDXLOG");
        assert_eq!(decode_segment_header(&h), Ok(0x0102_0304_0506_0708));
        for i in 0..SEGMENT_HEADER_LEN * 8 {
            let mut b = h;
            b[i / 8] ^= 1 << (i % 8);
            assert!(decode_segment_header(&b).is_err(), "bit {i}");
        }
        assert!(decode_segment_header(&h[..31]).is_err());
    }

    #[test]
    fn both_segment_versions_are_read_and_others_refused() {
        for v in [BASE_FORMAT_VERSION, FORMAT_VERSION] {
            let h = encode_segment_header_version(7, v);
            assert_eq!(decode_segment_header_version(&h), Ok((7, v)));
        }
        let h = encode_segment_header_version(7, FORMAT_VERSION + 1);
        assert!(matches!(
            decode_segment_header(&h),
            Err(Damage::BadHeader(why)) if why.contains("format version 3")
        ));
    }

    #[test]
    fn frames_are_8_byte_aligned_and_padding_is_covered_by_the_crc() {
        for len in 1..20usize {
            let mut buf = vec![0u8; SEGMENT_HEADER_LEN];
            append_frame(&mut buf, &vec![0xAB; len]);
            assert_eq!(buf.len() % FRAME_ALIGN, 0);
            assert_eq!(buf.len() - SEGMENT_HEADER_LEN, frame_len(len));
            let f = read_frame(&buf, SEGMENT_HEADER_LEN).unwrap().unwrap();
            assert_eq!(f.payload.len(), len);
            assert_eq!(f.end, buf.len());
            if padding(len) > 0 {
                let last = buf.len() - 1;
                buf[last] = 1;
                assert!(matches!(
                    read_frame(&buf, SEGMENT_HEADER_LEN),
                    Err(Damage::ChecksumMismatch { .. })
                ));
            }
        }
    }

    #[test]
    fn a_frame_that_passes_the_crc_but_is_not_a_batch_is_invalid_archive() {
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.extend_from_slice(&[0u8; SEGMENT_HEADER_LEN]);
        let mut v = buf.to_vec();
        append_frame(&mut v, &[7u8; 24]);
        let mut aligned = rkyv::util::AlignedVec::<16>::new();
        aligned.extend_from_slice(&v);
        assert!(matches!(
            read_record(&aligned, SEGMENT_HEADER_LEN),
            Err(Damage::InvalidArchive(_))
                | Err(Damage::EmptyBatch)
                | Err(Damage::BadNamespaceIndex { .. })
        ));
    }
}
