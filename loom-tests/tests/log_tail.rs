//! Protocol: **the log writer publishing its tail while readers map the segment.**
//!
//! The writer thread appends a group of frames with one `write` (docs/log-format.md §2.2: length,
//! CRC32C over length + payload + padding, rkyv payload), and only after the write returned does
//! it publish its progress (`Shared::set_progress` under the progress mutex, then `notify_all`):
//! that is what `AppendTicket::wait` returns on. Readers map the segment file; a `kvindex
//! replay` reader maps it at any moment, without waiting for anything.
//!
//! The file is modelled as the kernel's page cache during a write: the frame lands in pieces
//! (frame header, first half of the payload, the rest), each visible to a concurrent mapper in
//! any order, and the file size grows with them (all Relaxed: a concurrent mapper gets no
//! ordering from an in-flight `write`). Everything else is production code: the frame encoding,
//! the progress publication and `AppendTicket::wait`, and the segment parser
//! (`SegmentRecords`, which checks length, CRC and the archive).
//!
//! Invariants:
//! * **A reader never sees a partial record:** whatever a mapper sees, the records it gets are a
//!   prefix of the records written, byte for byte, with their LSNs; the one in flight is either
//!   complete or reported as a damaged tail, never returned.
//! * **An acknowledged record is readable:** once `AppendTicket::wait` returned for a batch, a
//!   reader that maps the file finds it complete.
#![cfg(loom)]

use kvindex_engine::{KvCacheEvent, KvCacheEventData, RouterEvent};
use kvindex_loom_tests::invariant;
use kvindex_loom_tests::support::model;
use kvindex_persistence::format::{append_frame, encode_segment_header, SEGMENT_HEADER_LEN};
use kvindex_persistence::loom_hooks::Tail;
use kvindex_persistence::record::LogBatch;
use kvindex_persistence::{FsyncPolicy, LogEntry, NamespaceSpec, SegmentRecords};
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;
use rkyv::util::AlignedVec;
use std::sync::Arc;

/// The bytes of one record (frame) holding a one-entry batch with LSN `lsn`.
fn frame(lsn: u64) -> Vec<u8> {
    let spec = Arc::new(NamespaceSpec::new("m", "g", 4));
    let event = RouterEvent::new(
        lsn,
        KvCacheEvent {
            event_id: lsn,
            data: KvCacheEventData::Cleared,
            dp_rank: 0,
        },
    );
    let batch = LogBatch::from_entries(lsn, &[LogEntry::event(spec, lsn, event)]);
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&batch).unwrap();
    let mut out = Vec::new();
    append_frame(&mut out, &payload);
    out
}

/// A segment file whose header and first record (LSN 1) are on disk, with the second record
/// (LSN 2) being written in `PIECES` pieces.
struct File {
    /// Header + record 1, then record 2: the full contents once the write is done.
    full: Vec<u8>,
    /// Where record 2 starts.
    second_at: usize,
    /// The pieces of record 2: `[start, end)` offsets in `full`.
    pieces: Vec<(usize, usize)>,
    /// Piece `i` has reached the page cache.
    landed: Vec<AtomicBool>,
    /// The file size a new mapping gets.
    size: AtomicUsize,
}

impl File {
    fn new() -> File {
        let mut full = encode_segment_header(1).to_vec();
        full.extend_from_slice(&frame(1));
        let second_at = full.len();
        let second = frame(2);
        full.extend_from_slice(&second);
        // Frame header, first half of the payload (8-byte aligned), the rest.
        let half = second_at + 8 + ((second.len() - 8) / 2) / 8 * 8;
        let pieces = vec![
            (second_at, second_at + 8),
            (second_at + 8, half),
            (half, full.len()),
        ];
        File {
            landed: pieces.iter().map(|_| AtomicBool::new(false)).collect(),
            size: AtomicUsize::new(second_at),
            full,
            second_at,
            pieces,
        }
    }

    /// The writer's `write` of record 2: pieces land in order, the size grows with them.
    fn write_second(&self) {
        for (i, &(_, end)) in self.pieces.iter().enumerate() {
            self.landed[i].store(true, Ordering::Relaxed);
            self.size.fetch_max(end, Ordering::Relaxed);
        }
    }

    /// What a new mapping of the file shows.
    fn map(&self) -> AlignedVec<16> {
        let size = self.size.load(Ordering::Relaxed);
        let mut bytes = self.full[..self.second_at].to_vec();
        bytes.resize(size, 0);
        for (i, &(start, end)) in self.pieces.iter().enumerate() {
            if self.landed[i].load(Ordering::Relaxed) && start < size {
                let end = end.min(size);
                bytes[start..end].copy_from_slice(&self.full[start..end]);
            }
        }
        let mut out = AlignedVec::<16>::new();
        out.extend_from_slice(&bytes);
        out
    }

    /// Parse a mapping with the production reader; check that it got a prefix of the written
    /// records, byte for byte. Returns how many records it got.
    fn check_mapping(&self, bytes: &[u8]) -> Result<usize, String> {
        let ends = [self.second_at, self.full.len()];
        let mut got = 0;
        let mut at = SEGMENT_HEADER_LEN;
        for r in SegmentRecords::over(bytes) {
            match r {
                Ok(rec) => {
                    invariant!(got < 2, "a third record appeared");
                    let lsn = rec.batch.first_lsn.to_native();
                    invariant!(
                        rec.offset == at && rec.end == ends[got] && lsn == got as u64 + 1,
                        "record {got} at {}..{} with LSN {lsn}: not the one written",
                        rec.offset,
                        rec.end
                    );
                    invariant!(
                        bytes[rec.offset..rec.end] == self.full[rec.offset..rec.end],
                        "record with LSN {lsn} differs from what was written"
                    );
                    at = rec.end;
                    got += 1;
                }
                Err((offset, damage)) => {
                    invariant!(
                        offset == self.second_at,
                        "damage at {offset} ({damage}), before the record in flight"
                    );
                }
            }
        }
        invariant!(
            got >= 1,
            "the record written before the model started is missing"
        );
        Ok(got)
    }
}

fn tail_model(publish_first: bool) {
    model(move || {
        let file = Arc::new(File::new());
        // LSN 1 is written and published; LSN 2 is the batch in flight.
        let tail = Arc::new(Tail::new(2, FsyncPolicy::Always));
        let ticket = tail.ticket(2, 3);

        let writer = {
            let (file, tail) = (Arc::clone(&file), Arc::clone(&tail));
            thread::spawn(move || {
                if publish_first {
                    // The planted bug: acknowledge before the write.
                    tail.publish(3, true);
                    file.write_second();
                } else {
                    file.write_second();
                    tail.publish(3, true);
                }
            })
        };
        let waiter = {
            let file = Arc::clone(&file);
            thread::spawn(move || -> Result<(), String> {
                let lsn = ticket.wait().map_err(|e| e.to_string())?;
                invariant!(lsn == 2, "ticket acknowledged LSN {lsn}");
                let got = file.check_mapping(&file.map())?;
                invariant!(
                    got == 2,
                    "acknowledged record 2 not readable: {got} record(s)"
                );
                Ok(())
            })
        };
        // A replay reader maps the file whenever it likes.
        let replay = file.check_mapping(&file.map());

        writer.join().unwrap();
        let waited = waiter.join().unwrap();
        replay?;
        waited?;
        let done = file.check_mapping(&file.map())?;
        invariant!(done == 2, "after the write, {done} record(s)");
        Ok(())
    });
}

#[test]
fn a_reader_never_sees_a_partial_record_and_acknowledged_records_are_readable() {
    tail_model(false);
}

/// A second planted bug, in the protocol rather than an ordering: publishing the progress
/// before the write lets a ticket holder map the file and miss its own record.
#[test]
#[should_panic(expected = "not readable")]
fn planted_bug_publishing_before_the_write_is_caught() {
    tail_model(true);
}
