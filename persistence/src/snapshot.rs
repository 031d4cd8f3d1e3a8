//! Snapshots (docs/log-format.md §3): an rkyv image of every namespace's index plus the stream
//! watermarks, as of a log position. Written atomically, loaded zero-copy from a map with
//! checked access, retained N at a time.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use kvindex_engine::{
    Engine, ExternalSequenceBlockHash, IndexSnapshot, LocalBlockHash, NamespaceKey, SnapshotHolder,
    SnapshotLowerBlock, SnapshotNode, WorkerWithDpRank,
};
use rkyv::{rancor, Archive, Deserialize, Serialize};

use crate::entry::{Lsn, NamespaceSpec, StreamKey, StreamWatermark};
use crate::error::{PersistError, Result};
use crate::format::{
    le_u32, le_u64, MIN_SNAPSHOT_FORMAT_VERSION, SNAPSHOT_FORMAT_VERSION, SNAPSHOT_MAGIC,
};
use crate::io::SnapshotFault;
use crate::record::TierRecord;
use crate::segment::{list_dir, snapshot_file_name, MappedFile};
use crate::seq_set::TaggedSeqs;

/// Bytes before a snapshot's payload.
pub const SNAPSHOT_HEADER_LEN: usize = 64;

/// The archived content of a snapshot file.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct SnapshotImage {
    /// First LSN not covered.
    pub next_lsn: u64,
    pub namespaces: Vec<NamespaceImage>,
    pub watermarks: Vec<WatermarkRecord>,
}

/// The durable tagged source sequences (docs/log-format.md §6), stored after the image in a
/// format-3 snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct TaggedSeqsImage {
    pub groups: Vec<TaggedGroupRecord>,
}

/// One group's sequences, as ascending disjoint inclusive ranges.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct TaggedGroupRecord {
    pub group: u16,
    pub ranges: Vec<SeqRangeRecord>,
}

/// `first..=last`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct SeqRangeRecord {
    pub first: u64,
    pub last: u64,
}

impl TaggedSeqsImage {
    /// The image of a set.
    pub fn of(seqs: &TaggedSeqs) -> Self {
        TaggedSeqsImage {
            groups: seqs
                .groups()
                .into_iter()
                .map(|(group, set)| TaggedGroupRecord {
                    group,
                    ranges: set
                        .ranges()
                        .map(|(first, last)| SeqRangeRecord { first, last })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl ArchivedTaggedSeqsImage {
    /// The set stored.
    pub fn to_set(&self) -> TaggedSeqs {
        let mut t = TaggedSeqs::default();
        for g in self.groups.iter() {
            for r in g.ranges.iter() {
                t.insert_range(g.group.to_native(), r.first.to_native(), r.last.to_native());
            }
        }
        t
    }
}

/// One namespace's exact index (the engine's `IndexSnapshot`) and block size.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct NamespaceImage {
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
    pub streams: Vec<StreamRecord>,
    pub nodes: Vec<NodeRecord>,
    /// Lower-tier blocks (host_pinned, disk, external); added in snapshot format 2.
    pub lower: Vec<LowerBlockRecord>,
}

/// One block a stream holds on a lower tier.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct LowerBlockRecord {
    /// Index into `NamespaceImage::streams`.
    pub stream: u32,
    pub tier: TierRecord,
    pub ext: u64,
    pub local: u64,
    pub parent: Option<u64>,
}

/// A `(worker_id, dp_rank)` stream.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct StreamRecord {
    pub worker_id: u64,
    pub dp_rank: u32,
}

/// Sentinel `NodeRecord::parent` of a first block.
pub const NO_PARENT: u32 = u32::MAX;

/// One block of the tree.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct NodeRecord {
    /// Index of the parent node ([`NO_PARENT`] for a first block); always below the node's own.
    pub parent: u32,
    pub local: u64,
    pub ext: u64,
    pub holders: Vec<HolderRecord>,
}

/// A stream holding a node.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct HolderRecord {
    /// Index into `NamespaceImage::streams`.
    pub stream: u32,
    pub private_ext: Option<u64>,
}

/// A stream watermark as stored in a snapshot.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct WatermarkRecord {
    /// Index into `SnapshotImage::namespaces`.
    pub namespace: u32,
    pub worker_id: u64,
    pub dp_rank: u32,
    pub source_seq: u64,
    pub lsn: u64,
}

impl NamespaceImage {
    /// The image of one engine namespace.
    pub fn from_index(spec: &NamespaceSpec, snap: &IndexSnapshot) -> Self {
        NamespaceImage {
            model_name: spec.key.model_name.clone(),
            routing_group: spec.key.routing_group.clone(),
            block_size: spec.block_size,
            streams: snap
                .streams
                .iter()
                .map(|s| StreamRecord {
                    worker_id: s.worker_id,
                    dp_rank: s.dp_rank,
                })
                .collect(),
            nodes: snap
                .nodes
                .iter()
                .map(|n| NodeRecord {
                    parent: n.parent.unwrap_or(NO_PARENT),
                    local: n.local.0,
                    ext: n.ext.0,
                    holders: n
                        .holders
                        .iter()
                        .map(|h| HolderRecord {
                            stream: h.stream,
                            private_ext: h.private_ext.map(|e| e.0),
                        })
                        .collect(),
                })
                .collect(),
            lower: snap
                .lower
                .iter()
                .map(|b| LowerBlockRecord {
                    stream: b.stream,
                    tier: b.tier.into(),
                    ext: b.ext.0,
                    local: b.local.0,
                    parent: b.parent.map(|p| p.0),
                })
                .collect(),
        }
    }
}

impl SnapshotImage {
    /// Capture every namespace of `engine` (each a barrier). The caller must have stopped intake
    /// so that the image matches `next_lsn` exactly.
    pub fn capture(engine: &Engine, next_lsn: Lsn, watermarks: &[StreamWatermark]) -> Result<Self> {
        let mut namespaces = Vec::new();
        let mut index_of: HashMap<NamespaceKey, u32> = HashMap::new();
        for key in engine.namespaces() {
            let Some(ns) = engine.namespace(&key) else {
                continue;
            };
            let snap = ns.snapshot()?;
            let spec = NamespaceSpec {
                key: key.clone(),
                block_size: ns.block_size(),
            };
            index_of.insert(key, namespaces.len() as u32);
            namespaces.push(NamespaceImage::from_index(&spec, &snap));
        }
        let mut wms = Vec::with_capacity(watermarks.len());
        for w in watermarks {
            // A watermark of a namespace that no longer exists is kept under a stub entry so the
            // producer's position is not forgotten.
            let idx = match index_of.get(&w.stream.namespace) {
                Some(i) => *i,
                None => {
                    let i = namespaces.len() as u32;
                    namespaces.push(NamespaceImage {
                        model_name: w.stream.namespace.model_name.clone(),
                        routing_group: w.stream.namespace.routing_group.clone(),
                        block_size: 0,
                        streams: Vec::new(),
                        nodes: Vec::new(),
                        lower: Vec::new(),
                    });
                    index_of.insert(w.stream.namespace.clone(), i);
                    i
                }
            };
            wms.push(WatermarkRecord {
                namespace: idx,
                worker_id: w.stream.worker_id,
                dp_rank: w.stream.dp_rank,
                source_seq: w.source_seq,
                lsn: w.lsn,
            });
        }
        Ok(SnapshotImage {
            next_lsn,
            namespaces,
            watermarks: wms,
        })
    }
}

impl ArchivedNamespaceImage {
    /// The namespace this image restores (block size 0 = a watermark-only stub, not restored).
    pub fn spec(&self) -> NamespaceSpec {
        NamespaceSpec::new(
            self.model_name.as_str(),
            self.routing_group.as_str(),
            self.block_size.to_native(),
        )
    }

    /// The engine's snapshot type, ready for `Namespace::restore`.
    pub fn to_index_snapshot(&self) -> IndexSnapshot {
        IndexSnapshot {
            streams: self
                .streams
                .iter()
                .map(|s| WorkerWithDpRank::new(s.worker_id.to_native(), s.dp_rank.to_native()))
                .collect(),
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    let p = n.parent.to_native();
                    SnapshotNode {
                        parent: (p != NO_PARENT).then_some(p),
                        local: LocalBlockHash(n.local.to_native()),
                        ext: ExternalSequenceBlockHash(n.ext.to_native()),
                        holders: n
                            .holders
                            .iter()
                            .map(|h| SnapshotHolder {
                                stream: h.stream.to_native(),
                                private_ext: h
                                    .private_ext
                                    .as_ref()
                                    .map(|e| ExternalSequenceBlockHash(e.to_native())),
                            })
                            .collect(),
                    }
                })
                .collect(),
            lower: self
                .lower
                .iter()
                .map(|b| SnapshotLowerBlock {
                    stream: b.stream.to_native(),
                    tier: b.tier.to_tier(),
                    ext: ExternalSequenceBlockHash(b.ext.to_native()),
                    local: LocalBlockHash(b.local.to_native()),
                    parent: b
                        .parent
                        .as_ref()
                        .map(|p| ExternalSequenceBlockHash(p.to_native())),
                })
                .collect(),
        }
    }
}

impl ArchivedSnapshotImage {
    /// The watermarks stored in this image.
    pub fn watermarks(&self) -> Vec<StreamWatermark> {
        self.watermarks
            .iter()
            .filter_map(|w| {
                let ns = self.namespaces.get(w.namespace.to_native() as usize)?;
                Some(StreamWatermark {
                    stream: StreamKey {
                        namespace: NamespaceKey::new(
                            ns.model_name.as_str(),
                            ns.routing_group.as_str(),
                        ),
                        worker_id: w.worker_id.to_native(),
                        dp_rank: w.dp_rank.to_native(),
                    },
                    source_seq: w.source_seq.to_native(),
                    lsn: w.lsn.to_native(),
                })
            })
            .collect()
    }

    /// Restore every namespace into `engine` (which must not hold them yet, or hold them empty).
    pub fn restore_into(&self, engine: &Engine) -> Result<()> {
        for ns in self.namespaces.iter() {
            let spec = ns.spec();
            if spec.block_size == 0 {
                continue;
            }
            let handle = engine.create_namespace(spec.key, spec.block_size)?;
            handle.restore(&ns.to_index_snapshot())?;
        }
        Ok(())
    }
}

/// Encode the 64-byte snapshot header.
/// `version` 2: the payload is the image alone (`image_len` 0); 3: the image (`image_len`
/// bytes), then the tagged sequences.
fn encode_header(
    version: u16,
    next_lsn: Lsn,
    payload: &[u8],
    image_len: u64,
    created_ms: u64,
) -> [u8; SNAPSHOT_HEADER_LEN] {
    let mut h = [0u8; SNAPSHOT_HEADER_LEN];
    h[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    h[10..12].copy_from_slice(&(SNAPSHOT_HEADER_LEN as u16).to_le_bytes());
    h[16..24].copy_from_slice(&next_lsn.to_le_bytes());
    h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[32..36].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    h[40..48].copy_from_slice(&created_ms.to_le_bytes());
    h[48..56].copy_from_slice(&image_len.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What is wrong with snapshot bytes: `(offset, reason)`.
type SnapDamage = (u64, String);

/// Where the tagged-sequence section starts in a format-3 payload whose image is `image_len`
/// bytes: the next multiple of 16.
fn tagged_section_at(image_len: usize) -> usize {
    image_len.div_ceil(16) * 16
}

/// Validate a whole snapshot file's bytes (must be 16-byte aligned, e.g. a map) and return the
/// header's `next_lsn` and the archived image.
pub fn validate_snapshot_bytes(
    bytes: &[u8],
) -> std::result::Result<(Lsn, &ArchivedSnapshotImage), SnapDamage> {
    validate_snapshot_parts(bytes).map(|(lsn, image, _)| (lsn, image))
}

/// [`validate_snapshot_bytes`], plus the tagged source sequences (`None` in a format-2 file,
/// which predates them).
pub fn validate_snapshot_parts(
    bytes: &[u8],
) -> std::result::Result<
    (
        Lsn,
        &ArchivedSnapshotImage,
        Option<&ArchivedTaggedSeqsImage>,
    ),
    SnapDamage,
> {
    if bytes.len() < SNAPSHOT_HEADER_LEN {
        return Err((
            0,
            format!("file is {} bytes, shorter than the header", bytes.len()),
        ));
    }
    let h = &bytes[..SNAPSHOT_HEADER_LEN];
    if h[0..8] != SNAPSHOT_MAGIC {
        return Err((0, "wrong magic (not a kvindex snapshot)".into()));
    }
    let stored = le_u32(h, 60);
    let computed = crc32c::crc32c(&h[0..60]);
    if stored != computed {
        return Err((
            60,
            format!("header CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version == 1 {
        return Err((
            8,
            format!(
                "snapshot format version 1 predates lower-tier indexing; this build reads \
                 {MIN_SNAPSHOT_FORMAT_VERSION} and {SNAPSHOT_FORMAT_VERSION} (an older snapshot \
                 or the log is used instead)"
            ),
        ));
    }
    if !(MIN_SNAPSHOT_FORMAT_VERSION..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        return Err((
            8,
            format!(
                "format version {version}, this build reads {MIN_SNAPSHOT_FORMAT_VERSION} and \
                 {SNAPSHOT_FORMAT_VERSION}"
            ),
        ));
    }
    if u16::from_le_bytes([h[10], h[11]]) as usize != SNAPSHOT_HEADER_LEN || le_u32(h, 12) != 0 {
        return Err((10, "unknown header length or flags".into()));
    }
    let next_lsn = le_u64(h, 16);
    let len = le_u64(h, 24);
    let expected = SNAPSHOT_HEADER_LEN as u64 + len;
    if bytes.len() as u64 != expected {
        return Err((
            24,
            format!("file is {} bytes, header says {expected}", bytes.len()),
        ));
    }
    let payload = &bytes[SNAPSHOT_HEADER_LEN..];
    let stored = le_u32(h, 32);
    let computed = crc32c::crc32c(payload);
    if stored != computed {
        return Err((
            SNAPSHOT_HEADER_LEN as u64,
            format!("payload CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    // Format 2: the payload is the image. Format 3: the image (`image_len` bytes), zeros up to
    // a multiple of 16, then the tagged sequences.
    let (image_bytes, tagged_bytes) = if version == 2 {
        (payload, None)
    } else {
        let image_len = le_u64(h, 48);
        let at = usize::try_from(image_len)
            .ok()
            .filter(|&l| l <= payload.len() && tagged_section_at(l) <= payload.len())
            .ok_or_else(|| {
                (
                    48,
                    format!(
                        "image length {image_len} past the payload's {} bytes",
                        payload.len()
                    ),
                )
            })?;
        (&payload[..at], Some(&payload[tagged_section_at(at)..]))
    };
    let image = rkyv::access::<ArchivedSnapshotImage, rancor::Error>(image_bytes).map_err(|e| {
        (
            SNAPSHOT_HEADER_LEN as u64,
            format!("payload fails validation: {e}"),
        )
    })?;
    let tagged = match tagged_bytes {
        None => None,
        Some(b) => {
            let t = rkyv::access::<ArchivedTaggedSeqsImage, rancor::Error>(b).map_err(|e| {
                (
                    SNAPSHOT_HEADER_LEN as u64,
                    format!("tagged source sequences fail validation: {e}"),
                )
            })?;
            for g in t.groups.iter() {
                if let Some(r) = g.ranges.iter().find(|r| r.first > r.last) {
                    return Err((
                        SNAPSHOT_HEADER_LEN as u64,
                        format!(
                            "tagged group {} has the empty range {}..={}",
                            g.group, r.first, r.last
                        ),
                    ));
                }
            }
            Some(t)
        }
    };
    if image.next_lsn.to_native() != next_lsn {
        return Err((16, "header and payload disagree on next_lsn".into()));
    }
    check_image(image).map_err(|e| (SNAPSHOT_HEADER_LEN as u64, e))?;
    Ok((next_lsn, image, tagged))
}

/// Index invariants rkyv cannot check: parents before children, indices in range.
fn check_image(image: &ArchivedSnapshotImage) -> std::result::Result<(), String> {
    let nss = image.namespaces.len() as u32;
    for (i, ns) in image.namespaces.iter().enumerate() {
        let streams = ns.streams.len() as u32;
        for (j, n) in ns.nodes.iter().enumerate() {
            let p = n.parent.to_native();
            if p != NO_PARENT && p as usize >= j {
                return Err(format!(
                    "namespace #{i} node #{j} has parent #{p} (not before it)"
                ));
            }
            for h in n.holders.iter() {
                if h.stream.to_native() >= streams {
                    return Err(format!(
                        "namespace #{i} node #{j} names stream #{} of {streams}",
                        h.stream.to_native()
                    ));
                }
            }
        }
        for (j, b) in ns.lower.iter().enumerate() {
            if b.stream.to_native() >= streams {
                return Err(format!(
                    "namespace #{i} lower-tier block #{j} names stream #{} of {streams}",
                    b.stream.to_native()
                ));
            }
            if matches!(b.tier, crate::record::ArchivedTierRecord::Device) {
                return Err(format!(
                    "namespace #{i} lower-tier block #{j} is on the device tier"
                ));
            }
        }
    }
    for w in image.watermarks.iter() {
        if w.namespace.to_native() >= nss {
            return Err(format!(
                "watermark names namespace #{}",
                w.namespace.to_native()
            ));
        }
    }
    Ok(())
}

/// A validated snapshot file, mapped. The archive is read in place from the map.
pub struct LoadedSnapshot {
    path: PathBuf,
    next_lsn: Lsn,
    file: MappedFile,
    /// The tagged source sequences, decoded at load (empty for a format-2 file).
    tagged: TaggedSeqs,
}

impl LoadedSnapshot {
    /// Map and fully validate `path`; the tagged source sequences are decoded once, here.
    pub fn load(path: &Path) -> Result<Self> {
        if let Some((op, errno)) = test_hooks::load_fault() {
            return Err(PersistError::io(
                op,
                path,
                None,
                std::io::Error::from_raw_os_error(errno),
            ));
        }
        let file = MappedFile::open(path)?;
        let (next_lsn, _, tagged) =
            validate_snapshot_parts(file.bytes()).map_err(|(offset, reason)| {
                PersistError::CorruptSnapshot {
                    path: path.to_path_buf(),
                    offset,
                    reason,
                }
            })?;
        let tagged = tagged
            .map(ArchivedTaggedSeqsImage::to_set)
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            next_lsn,
            file,
            tagged,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// First LSN the snapshot does not cover.
    pub fn next_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.file.bytes().len() as u64
    }

    /// The archived image, read in place. (Validated at load; checked again here, which costs
    /// one linear pass and keeps this free of `unsafe`.)
    pub fn image(&self) -> Result<&ArchivedSnapshotImage> {
        validate_snapshot_bytes(self.file.bytes())
            .map(|(_, img)| img)
            .map_err(|(offset, reason)| PersistError::CorruptSnapshot {
                path: self.path.clone(),
                offset,
                reason,
            })
    }
}

impl LoadedSnapshot {
    /// The durable tagged source sequences the snapshot carries (empty for a format-2 file),
    /// as decoded at load: no validation again.
    pub fn tagged_seqs(&self) -> &TaggedSeqs {
        &self.tagged
    }
}

/// A snapshot file as listed (not yet validated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub path: PathBuf,
    pub next_lsn: Lsn,
}

/// A snapshot that failed to load during recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFailure {
    pub path: PathBuf,
    pub error: String,
}

/// The snapshots of a data directory: write (atomically), list, load, prune.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
    /// Simulated write failure (tests only).
    fault: Option<SnapshotFault>,
}

impl SnapshotStore {
    /// The store of data directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            fault: None,
        }
    }

    /// The same store, its writes failing as `fault` says (tests only).
    #[doc(hidden)]
    pub fn with_fault(mut self, fault: Option<SnapshotFault>) -> Self {
        self.fault = fault;
        self
    }

    /// Snapshots on disk, oldest first.
    pub fn list(&self) -> Result<Vec<SnapshotMeta>> {
        Ok(list_dir(&self.dir)?
            .snapshots
            .into_iter()
            .map(|(next_lsn, path)| SnapshotMeta { path, next_lsn })
            .collect())
    }

    /// Write `image` atomically, with no tagged source sequences.
    pub fn write(&self, image: &SnapshotImage) -> Result<SnapshotMeta> {
        self.write_with(image, &TaggedSeqs::default())
    }

    /// Write `image` and the durable tagged source sequences atomically: temp file, fsync,
    /// rename, fsync the directory. Format version 3 when there are tagged sequences; version 2
    /// (the image alone) when there are none, so a data directory that never saw JetStream stays
    /// readable by builds that read only version 2 (docs/operations.md, "Going back to an older
    /// build").
    pub fn write_with(&self, image: &SnapshotImage, tagged: &TaggedSeqs) -> Result<SnapshotMeta> {
        // The image, then (format 3) the tagged sequences appended in place: the image (the
        // bulk of a snapshot) is never copied.
        let mut payload = rkyv::to_bytes::<rancor::Error>(image)
            .map_err(|e| PersistError::Encode(e.to_string()))?;
        let (version, image_len) = if tagged.is_empty() {
            (MIN_SNAPSHOT_FORMAT_VERSION, 0)
        } else {
            let seqs = rkyv::to_bytes::<rancor::Error>(&TaggedSeqsImage::of(tagged))
                .map_err(|e| PersistError::Encode(e.to_string()))?;
            let image_len = payload.len();
            payload.resize(tagged_section_at(image_len), 0);
            payload.extend_from_slice(&seqs);
            (SNAPSHOT_FORMAT_VERSION, image_len)
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let header = encode_header(version, image.next_lsn, &payload, image_len as u64, created);
        let name = snapshot_file_name(image.next_lsn);
        let path = self.dir.join(&name);
        // A name of its own per write: two writes of the same position at once (a snapshot
        // request racing the periodic one) must not rename each other's half-written file.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{name}.{}-{n}.tmp", std::process::id()));
        // A failed write must not leave its (partial) temporary file: every attempt has a name
        // of its own, so on a nearly full disk they would pile up until the log itself has no
        // room left.
        if let Err(e) = self.write_and_rename(&tmp, &path, &header, &payload) {
            discard_temp(&tmp, &e);
            return Err(e);
        }
        metrics::counter!("kvindex_snapshots_written_total").increment(1);
        metrics::gauge!("kvindex_snapshot_bytes").set((SNAPSHOT_HEADER_LEN + payload.len()) as f64);
        Ok(SnapshotMeta {
            path,
            next_lsn: image.next_lsn,
        })
    }

    /// Write `header` and `payload` to `tmp`, fsync it, rename it to `path`, fsync the
    /// directory. The caller deletes `tmp` when this fails.
    fn write_and_rename(
        &self,
        tmp: &Path,
        path: &Path,
        header: &[u8],
        payload: &[u8],
    ) -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| PersistError::io("create", tmp, None, e))?;
        write_parts(&mut f, &[header, payload], self.fault)
            .map_err(|e| PersistError::io("write", tmp, None, e))?;
        match self.fault {
            Some(SnapshotFault::Sync) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => f.sync_all(),
        }
        .map_err(|e| PersistError::io("fsync", tmp, None, e))?;
        drop(f);
        match self.fault {
            Some(SnapshotFault::Rename) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
            _ => std::fs::rename(tmp, path),
        }
        .map_err(|e| PersistError::io("rename", tmp, None, e))?;
        sync_dir(&self.dir)
    }

    /// Load and validate one snapshot.
    pub fn load(&self, path: &Path) -> Result<LoadedSnapshot> {
        LoadedSnapshot::load(path)
    }

    /// The newest snapshot that validates and whose `next_lsn <= max_next_lsn`, plus every newer
    /// one that failed (each logged and counted).
    pub fn load_newest_valid(
        &self,
        max_next_lsn: Option<Lsn>,
    ) -> Result<(Option<LoadedSnapshot>, Vec<SnapshotFailure>)> {
        let mut failures = Vec::new();
        for meta in self.list()?.into_iter().rev() {
            if max_next_lsn.is_some_and(|m| meta.next_lsn > m) {
                continue;
            }
            match LoadedSnapshot::load(&meta.path) {
                Ok(s) => return Ok((Some(s), failures)),
                // Deleted since the listing: pruned by the server writing this directory (a
                // read-only tool's race; the process holding the directory's lock is the only
                // one that prunes). Not damage: the caller lists again.
                Err(PersistError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Err(PersistError::CompactedAway { path: meta.path });
                }
                // Not the file's content but the system refused to open, stat or map it (EACCES,
                // EMFILE, ENOMEM, EIO...): the file was not checked, so it is not taken for
                // damaged (which would set a valid snapshot aside for good): stop here.
                Err(PersistError::Io {
                    op, path, source, ..
                }) => {
                    tracing::error!(path = %path.display(), op, error = %source, "snapshot could not be read (an I/O error, not damage)");
                    return Err(PersistError::SnapshotUnreadable { path, op, source });
                }
                Err(e @ PersistError::CorruptSnapshot { .. }) => {
                    tracing::warn!(path = %meta.path.display(), error = %e, "snapshot rejected; trying an older one");
                    metrics::counter!("kvindex_snapshot_load_failures_total").increment(1);
                    failures.push(SnapshotFailure {
                        path: meta.path,
                        error: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok((None, failures))
    }

    /// Set a snapshot aside (renamed with [`REJECTED_SUFFIX`], which listing ignores), so it
    /// no longer counts as one of the snapshots kept; returns its new path.
    pub fn quarantine(&self, path: &Path) -> Result<PathBuf> {
        let mut to = path.as_os_str().to_owned();
        to.push(REJECTED_SUFFIX);
        let to = PathBuf::from(to);
        std::fs::rename(path, &to).map_err(|e| PersistError::io("rename", path, None, e))?;
        sync_dir(&self.dir)?;
        Ok(to)
    }

    /// Delete all but the newest `keep` snapshots; returns the deleted paths.
    pub fn prune(&self, keep: usize) -> Result<Vec<PathBuf>> {
        let list = self.list()?;
        let n = list.len().saturating_sub(keep);
        let mut deleted = Vec::new();
        for meta in list.into_iter().take(n) {
            if remove_pruned(&meta.path)? {
                deleted.push(meta.path);
            }
        }
        if !deleted.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }
}

/// Suffix of a snapshot set aside after recovery rejected it.
pub const REJECTED_SUFFIX: &str = ".rejected";

/// Delete one pruned snapshot; `false` when it is already gone (a snapshot taken at the same
/// moment pruned it: not an error, or the second snapshot would fail after being written).
fn remove_pruned(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(PersistError::io("delete", path, None, e)),
    }
}

/// Write `parts` one after the other; with [`SnapshotFault::WriteAfterBytes`], as a full disk
/// does: the bytes up to the limit, then `ENOSPC`.
fn write_parts(f: &mut File, parts: &[&[u8]], fault: Option<SnapshotFault>) -> std::io::Result<()> {
    let mut room = match fault {
        Some(SnapshotFault::WriteAfterBytes(n)) => n,
        _ => u64::MAX,
    };
    for part in parts {
        let n = (part.len() as u64).min(room) as usize;
        f.write_all(&part[..n])?;
        room -= n as u64;
        if n < part.len() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
    }
    Ok(())
}

/// Delete the temporary file of a snapshot write that failed with `cause` (best effort: a file
/// left behind is deleted at the next start-up, docs/log-format.md §5).
fn discard_temp(tmp: &Path, cause: &PersistError) {
    match std::fs::remove_file(tmp) {
        Ok(()) => {
            tracing::warn!(path = %tmp.display(), error = %cause, "snapshot write failed; its temporary file was deleted")
        }
        // Never created, or already renamed into place (the directory's fsync failed after).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %tmp.display(), error = %e, cause = %cause, "snapshot write failed and its temporary file could not be deleted; the next start-up deletes it")
        }
    }
}

/// fsync a directory so that creations, renames and deletions in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| PersistError::io("fsync directory", dir, None, e))
}

/// Hooks for tests of snapshot loads failing for reasons other than the file's content.
#[doc(hidden)]
pub mod test_hooks {
    use std::cell::Cell;

    thread_local! {
        static LOAD_FAULT: Cell<Option<(&'static str, i32)>> = const { Cell::new(None) };
    }

    /// Make every snapshot load on this thread fail at step `op` with OS error `errno` (for
    /// instance `("open", libc::EMFILE)`), until cleared with `None`.
    pub fn fail_loads(fault: Option<(&'static str, i32)>) {
        LOAD_FAULT.with(|f| f.set(fault));
    }

    pub(crate) fn load_fault() -> Option<(&'static str, i32)> {
        LOAD_FAULT.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(next_lsn: Lsn) -> SnapshotImage {
        SnapshotImage {
            next_lsn,
            ..SnapshotImage::default()
        }
    }

    /// A whole file's bytes, 16-byte aligned as a map is.
    fn aligned(header: &[u8], payload: &[u8]) -> rkyv::util::AlignedVec<16> {
        let mut v = rkyv::util::AlignedVec::<16>::new();
        v.extend_from_slice(header);
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn a_format_2_snapshot_is_read_without_tagged_sequences() {
        let payload = rkyv::to_bytes::<rancor::Error>(&image(7)).expect("encode");
        let h = encode_header(2, 7, &payload, 0, 0);
        let bytes = aligned(&h, &payload);
        let (lsn, img, tagged) = validate_snapshot_parts(&bytes).expect("format 2 accepted");
        assert_eq!(lsn, 7);
        assert_eq!(img.next_lsn.to_native(), 7);
        assert!(tagged.is_none());
    }

    #[test]
    fn a_format_3_snapshot_carries_its_tagged_sequences() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = TaggedSeqs::default();
        t.insert_range(3, 1, 10);
        t.insert_range(3, 12, 12);
        t.insert_range(4, 1, 1);
        let meta = SnapshotStore::new(dir.path())
            .write_with(&image(9), &t)
            .expect("write");
        let loaded = LoadedSnapshot::load(&meta.path).expect("load");
        assert_eq!(loaded.tagged_seqs(), &t);
        assert_eq!(loaded.image().expect("image").next_lsn.to_native(), 9);
    }

    #[test]
    fn an_image_length_past_the_payload_is_refused() {
        let payload = rkyv::to_bytes::<rancor::Error>(&image(7)).expect("encode");
        let h = encode_header(3, 7, &payload, payload.len() as u64 + 1, 0);
        let bytes = aligned(&h, &payload);
        let (offset, reason) = validate_snapshot_parts(&bytes).expect_err("refused");
        assert_eq!(offset, 48);
        assert!(reason.contains("image length"), "{reason}");
    }

    #[test]
    fn pruning_a_snapshot_already_gone_is_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("snapshot-1");
        std::fs::write(&path, b"x").expect("write");
        assert!(remove_pruned(&path).expect("first removal"));
        assert!(!remove_pruned(&path).expect("second removal: already gone"));
        // Other failures are still errors: a directory is not removed as a file.
        std::fs::create_dir(&path).expect("mkdir");
        assert!(remove_pruned(&path).is_err());
    }
}
