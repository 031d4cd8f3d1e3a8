//! Entry points shared by the fuzz targets (`persistence/fuzz`) and the seed-corpus test, so
//! that the code fuzzed is exactly the code tested. Each takes arbitrary bytes and must never
//! panic; it returns a summary so tests can also check what a valid input yields.

use rkyv::util::AlignedVec;

use crate::format;
use crate::recovery::EntryView;
use crate::scan::{ScanStep, SegmentScan};
use crate::snapshot::validate_snapshot_parts;

/// What reading a segment's bytes found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub header_ok: bool,
    pub records: u64,
    pub entries: u64,
    pub damaged_regions: u64,
}

/// Read `data` as a whole segment file, the way recovery and `inspect` do: header, every
/// record (checked access, conversion to owned entries), resuming after damage.
pub fn read_segment_bytes(data: &[u8]) -> SegmentSummary {
    // Copy into an aligned buffer, as a memory map would be.
    let mut buf: AlignedVec = AlignedVec::with_capacity(data.len());
    buf.extend_from_slice(data);
    let bytes: &[u8] = &buf;
    let mut out = SegmentSummary::default();
    let header_damage = format::decode_segment_header(bytes).err();
    out.header_ok = header_damage.is_none();
    let mut scan = SegmentScan::new(bytes, header_damage);
    while let Some(step) = scan.next_step() {
        match step {
            ScanStep::Damaged { .. } => out.damaged_regions += 1,
            ScanStep::Record(rec) => {
                out.records += 1;
                for e in rec.batch.entries.iter() {
                    if let Some(ns) = rec.batch.namespaces.get(e.namespace.to_native() as usize) {
                        let _ = EntryView {
                            namespace: ns,
                            record: e,
                        }
                        .to_entry();
                        out.entries += 1;
                    }
                }
            }
        }
    }
    out
}

/// What reading a snapshot's bytes found: `Ok((namespaces, (block, stream) pairs))`.
pub fn read_snapshot_bytes(data: &[u8]) -> Result<(usize, usize), String> {
    let mut buf: AlignedVec = AlignedVec::with_capacity(data.len());
    buf.extend_from_slice(data);
    let (_, image, tagged) =
        validate_snapshot_parts(&buf).map_err(|(o, r)| format!("byte {o}: {r}"))?;
    let _ = tagged.map(|t| t.to_set());
    let mut pairs = 0;
    for ns in image.namespaces.iter() {
        pairs += ns.to_index_snapshot().pairs();
        let _ = ns.spec();
    }
    let _ = image.watermarks();
    Ok((image.namespaces.len(), pairs))
}
