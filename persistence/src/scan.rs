//! [`SegmentScan`]: one walk over a segment's records that resumes after damage, shared by
//! recovery, `kvindex replay inspect` and the fuzz entry point so they read segments alike.

use crate::error::Damage;
use crate::format::{self, ValidRecord, SEGMENT_HEADER_LEN};

/// What [`SegmentScan::next_step`] found next.
pub(crate) enum ScanStep<'a> {
    /// A record that passed framing, checksum and archive checks.
    Record(ValidRecord<'a>),
    /// Damage at byte `at`; the scan continues at `resume`, or ends when it is `None`.
    Damaged {
        at: usize,
        damage: Damage,
        resume: Option<usize>,
    },
}

/// Walks a segment's bytes record by record and, after damage, on from where valid data
/// resumes, so that every reader of the log finds the same records and the same damage.
pub(crate) struct SegmentScan<'a> {
    bytes: &'a [u8],
    pos: usize,
    pending: Option<(usize, Damage)>,
    done: bool,
}

impl<'a> SegmentScan<'a> {
    /// Scan `bytes` (a whole segment, header included) from the first record on;
    /// `header_damage`, when the header is bad, is reported first at offset 0.
    pub(crate) fn new(bytes: &'a [u8], header_damage: Option<Damage>) -> Self {
        Self {
            bytes,
            pos: SEGMENT_HEADER_LEN,
            pending: header_damage.map(|d| (0, d)),
            done: false,
        }
    }

    /// Treat the record just yielded, which starts at `at`, as damaged by `damage` (it is valid
    /// on its own but does not fit its place): it is reported as the next step.
    pub(crate) fn reject(&mut self, at: usize, damage: Damage) {
        self.pending = Some((at, damage));
    }

    /// The next record or damaged region; `None` at the end of the data.
    pub(crate) fn next_step(&mut self) -> Option<ScanStep<'a>> {
        if self.done {
            return None;
        }
        let (at, damage) = match self.pending.take() {
            Some(p) => p,
            None => match format::read_record(self.bytes, self.pos) {
                Ok(Some(r)) => {
                    self.pos = r.end;
                    return Some(ScanStep::Record(r));
                }
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(d) => (self.pos, d),
            },
        };
        // Resuming always moves forward; the filter only guards the loop's termination.
        let resume = resume_after(self.bytes, at, &damage).filter(|&o| o > at);
        match resume {
            Some(o) => self.pos = o,
            None => self.done = true,
        }
        Some(ScanStep::Damaged { at, damage, resume })
    }
}

/// The offset where valid data resumes after damage at `at`: first where the damaged frame's
/// own length points (a bit flip inside a payload leaves the length intact), then a scan.
pub(crate) fn resume_after(bytes: &[u8], at: usize, damage: &Damage) -> Option<usize> {
    if at < SEGMENT_HEADER_LEN {
        // Header damage: records may still follow it.
        return if matches!(format::read_record(bytes, SEGMENT_HEADER_LEN), Ok(Some(_))) {
            Some(SEGMENT_HEADER_LEN)
        } else {
            format::find_next_record(bytes, SEGMENT_HEADER_LEN)
        };
    }
    if let Damage::LengthBitFlip { actual, .. } = damage {
        // The record is whole (its CRC matches the length with the bit put back): what follows
        // it starts where the true length says.
        let next = at.saturating_add(format::frame_len(*actual as usize));
        if next <= bytes.len() && matches!(format::read_record(bytes, next), Ok(Some(_))) {
            return Some(next);
        }
    }
    if let Damage::ChecksumMismatch { .. }
    | Damage::InvalidArchive(_)
    | Damage::EmptyBatch
    | Damage::BadNamespaceIndex { .. }
    | Damage::LsnMismatch { .. } = damage
    {
        if at + 4 <= bytes.len() {
            let len = format::le_u32(bytes, at) as usize;
            let next = at + format::frame_len(len);
            if next <= bytes.len() && matches!(format::read_record(bytes, next), Ok(Some(_))) {
                return Some(next);
            }
        }
    }
    format::find_next_record(bytes, at)
}

/// The granularity at which a write can tear: 4096 bytes, the smallest page (and the largest
/// common sector) size at which a Linux file system persists a file's data. A write interrupted
/// by a crash leaves whole pages unwritten, each at least this large and aligned to this
/// size in the file, so a real torn write's hole holds at least one such page.
pub(crate) const TORN_PAGE_BYTES: usize = 4096;

/// Whether `bytes[from..to]` contains a whole zero-filled page: [`TORN_PAGE_BYTES`] bytes,
/// aligned to [`TORN_PAGE_BYTES`] in the file, all zero.
pub(crate) fn holds_zero_page(bytes: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(bytes.len());
    let mut page = from.next_multiple_of(TORN_PAGE_BYTES);
    while page.saturating_add(TORN_PAGE_BYTES) <= to {
        if bytes[page..page + TORN_PAGE_BYTES].iter().all(|&b| b == 0) {
            return true;
        }
        page += TORN_PAGE_BYTES;
    }
    false
}

/// Whether damage at `at` in the *last* segment, after which valid records resume at `resume`,
/// is a torn group commit (docs/log-format.md §5, "Tail"): a crash during the segment's last
/// write can persist its pages out of order, leaving a hole with valid records after it up to
/// the end of the data. Two conditions, both required:
///
/// * the damaged region `at..resume` holds a whole zero-filled page ([`holds_zero_page`]). The
///   writer only extends segments (`pwrite` past the end, no preallocation, no writable map),
///   so a page of the write that never reached the disk reads back as zeros. A bit flip in
///   records that were already written (and possibly acknowledged) leaves non-zero bytes and no
///   zero page, so it is never taken for a torn write: "never lose data";
/// * that write was one group commit of at most `group_bytes`, so every valid record after the
///   damage ends within `group_bytes` of the damage's start.
///
/// Damage in the segment header never is (the header is written before any group).
pub(crate) fn torn_group_tail(bytes: &[u8], at: usize, resume: usize, group_bytes: usize) -> bool {
    if at < SEGMENT_HEADER_LEN || resume <= at || !holds_zero_page(bytes, at, resume) {
        return false;
    }
    let limit = at.saturating_add(group_bytes);
    let mut pos = resume;
    loop {
        match format::read_record(bytes, pos) {
            Ok(Some(r)) if r.end > limit => return false,
            Ok(Some(r)) => pos = r.end,
            Ok(None) => return true,
            Err(d) => match resume_after(bytes, pos, &d).filter(|&o| o > pos) {
                // A valid record starting at or past the limit ends beyond it.
                Some(o) if o >= limit => return false,
                Some(o) => pos = o,
                None => return true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvindex_engine::{KvCacheEvent, KvCacheEventData, RouterEvent};
    use rkyv::rancor;
    use rkyv::util::AlignedVec;

    use super::*;
    use crate::entry::{LogEntry, NamespaceSpec};
    use crate::record::LogBatch;

    /// A segment starting at LSN 1 with one single-entry record per LSN in `lsns`, and the
    /// offset of each record.
    fn segment(lsns: &[u64]) -> (Vec<u8>, Vec<usize>) {
        let spec = Arc::new(NamespaceSpec::new("m", "g", 16));
        let mut buf = format::encode_segment_header(1).to_vec();
        let mut offsets = Vec::new();
        for &lsn in lsns {
            let entry = LogEntry::event(
                spec.clone(),
                lsn,
                RouterEvent::new(
                    1,
                    KvCacheEvent {
                        event_id: lsn,
                        data: KvCacheEventData::Cleared,
                        dp_rank: 0,
                    },
                ),
            );
            let payload = rkyv::to_bytes::<rancor::Error>(&LogBatch::from_entries(lsn, &[entry]))
                .expect("encode a batch");
            offsets.push(buf.len());
            format::append_frame(&mut buf, &payload);
        }
        (buf, offsets)
    }

    /// Damage made of one small word repeated (a plausible record length at every offset)
    /// is skipped without checksumming a candidate at each offset: the next record is found,
    /// and the CRC work stays at a few candidates (a candidate whose payload ends with the good
    /// record looks like a batch, so one or two are checksummed) instead of one per offset
    /// (~512 MiB here).
    #[test]
    fn damage_offering_a_plausible_length_everywhere_is_scanned_without_checksumming_it() {
        let (good, offsets) = segment(&[1, 2]);
        let first_end = offsets[1];
        let mut bytes = good[..first_end].to_vec();
        let damage_at = bytes.len();
        for _ in 0..(1 << 20) / 8 {
            bytes.extend_from_slice(&4096u32.to_le_bytes());
            bytes.extend_from_slice(&0x0101_0101u32.to_le_bytes());
        }
        let resume = bytes.len();
        bytes.extend_from_slice(&good[offsets[1]..]);
        let bytes = aligned(&bytes);
        format::CRC_BYTES.with(|c| c.set(0));
        assert_eq!(format::find_next_record(&bytes, damage_at), Some(resume));
        let checksummed = format::CRC_BYTES.with(|c| c.get());
        assert!(
            checksummed < 64 << 10,
            "checksummed {checksummed} bytes to skip 1 MiB of damage"
        );
    }

    fn aligned(bytes: &[u8]) -> AlignedVec {
        let mut a = AlignedVec::with_capacity(bytes.len());
        a.extend_from_slice(bytes);
        a
    }

    /// `(offset, "record" | "damage", resume)` of every step.
    fn steps(scan: &mut SegmentScan<'_>) -> Vec<(usize, &'static str, Option<usize>)> {
        let mut out = Vec::new();
        while let Some(step) = scan.next_step() {
            out.push(match step {
                ScanStep::Record(r) => (r.offset, "record", None),
                ScanStep::Damaged { at, resume, .. } => (at, "damage", resume),
            });
        }
        out
    }

    /// Whether the first damage in `bytes` (valid records after it) is a torn group commit.
    fn first_damage_is_torn(bytes: &[u8]) -> bool {
        let bytes = aligned(bytes);
        let mut scan = SegmentScan::new(&bytes, None);
        while let Some(step) = scan.next_step() {
            if let ScanStep::Damaged { at, resume, .. } = step {
                let resume = resume.expect("valid records follow the damage");
                return torn_group_tail(&bytes, at, resume, 4 << 20);
            }
        }
        panic!("no damage");
    }

    /// A torn write leaves whole, aligned, zero-filled pages; damage without one (a bit flip,
    /// non-zero garbage, zeros shorter than a page or not aligned to one) is not a torn write.
    #[test]
    fn only_damage_holding_an_aligned_zero_page_is_a_torn_group_commit() {
        let lsns: Vec<u64> = (1..=400).collect();
        let (good, offs) = segment(&lsns);
        assert!(good.len() > 4 * TORN_PAGE_BYTES);
        // `from..to` filled with `fill`, the bytes just outside it made non-zero so that the
        // hole is exactly `from..to` (these records hold short runs of zeros of their own).
        let with = |from: usize, to: usize, fill: u8| {
            let mut b = good.clone();
            b[from..to].fill(fill);
            b[from - 1] = 0x5A;
            b[to] = 0x5A;
            b
        };
        let p = TORN_PAGE_BYTES;
        assert!(first_damage_is_torn(&with(p, 2 * p, 0)));
        assert!(first_damage_is_torn(&with(p - 100, 3 * p + 100, 0)));
        assert!(!first_damage_is_torn(&with(p, 2 * p, 0xA5)));
        assert!(!first_damage_is_torn(&with(p, 2 * p - 1, 0)));
        assert!(!first_damage_is_torn(&with(p + 1, 2 * p + 1, 0)));
        let mut flipped = good.clone();
        let r = offs.iter().position(|&o| o > p).unwrap();
        for b in &mut flipped[offs[r] + 8..offs[r + 1]] {
            *b ^= 0x10;
        }
        assert!(!first_damage_is_torn(&flipped));
        assert!(holds_zero_page(&with(p, 2 * p, 0), p, 2 * p));
        assert!(!holds_zero_page(&with(p, 2 * p, 0), p + 1, 2 * p));
        assert!(!holds_zero_page(&with(p, 2 * p, 0), p, 2 * p - 1));
    }

    #[test]
    fn yields_every_record_then_ends() {
        let (bytes, offs) = segment(&[1, 2, 3]);
        let bytes = aligned(&bytes);
        let got = steps(&mut SegmentScan::new(&bytes, None));
        let want: Vec<_> = offs.iter().map(|&o| (o, "record", None)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn reports_damage_in_the_middle_and_resumes_at_the_next_record() {
        let (mut bytes, offs) = segment(&[1, 2, 3]);
        bytes[offs[1] + 12] ^= 0xFF; // inside the second record's payload
        let bytes = aligned(&bytes);
        let got = steps(&mut SegmentScan::new(&bytes, None));
        assert_eq!(
            got,
            vec![
                (offs[0], "record", None),
                (offs[1], "damage", Some(offs[2])),
                (offs[2], "record", None),
            ]
        );
    }

    #[test]
    fn damage_at_the_tail_has_nowhere_to_resume() {
        let (bytes, offs) = segment(&[1, 2]);
        let bytes = aligned(&bytes[..bytes.len() - 3]);
        let got = steps(&mut SegmentScan::new(&bytes, None));
        assert_eq!(
            got,
            vec![(offs[0], "record", None), (offs[1], "damage", None)]
        );
    }

    #[test]
    fn header_damage_comes_first_and_records_after_it_are_still_read() {
        let (bytes, offs) = segment(&[1, 2]);
        let bytes = aligned(&bytes);
        let mut scan = SegmentScan::new(&bytes, Some(Damage::ZeroFilledTail));
        assert_eq!(
            steps(&mut scan),
            vec![
                (0, "damage", Some(offs[0])),
                (offs[0], "record", None),
                (offs[1], "record", None),
            ]
        );
    }

    #[test]
    fn a_rejected_record_is_reported_as_damage_and_the_scan_goes_on() {
        let (bytes, offs) = segment(&[1, 2, 3]);
        let bytes = aligned(&bytes);
        let mut scan = SegmentScan::new(&bytes, None);
        let mut got = Vec::new();
        while let Some(step) = scan.next_step() {
            match step {
                ScanStep::Record(r) => {
                    got.push((r.offset, "record", None));
                    if r.offset == offs[1] {
                        scan.reject(
                            r.offset,
                            Damage::LsnMismatch {
                                expected: 9,
                                found: 2,
                            },
                        );
                    }
                }
                ScanStep::Damaged { at, damage, resume } => {
                    assert!(matches!(damage, Damage::LsnMismatch { .. }));
                    got.push((at, "damage", resume));
                }
            }
        }
        assert_eq!(
            got,
            vec![
                (offs[0], "record", None),
                (offs[1], "record", None),
                (offs[1], "damage", Some(offs[2])),
                (offs[2], "record", None),
            ]
        );
    }
}
