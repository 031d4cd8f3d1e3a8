//! The engine's own, exact image of a namespace: every live node (including orphans, which a
//! Dynamo dump cannot express) with its holders, and every lower-tier block. Persistence
//! archives it; restoring it into an empty namespace gives back exactly the same index.

use crate::protocol::{ExternalSequenceBlockHash, LocalBlockHash, StorageTier, WorkerWithDpRank};

/// An exact image of one namespace's index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexSnapshot {
    /// Every known stream, including those holding nothing (they stay listed after restore).
    pub streams: Vec<WorkerWithDpRank>,
    /// Every live node, parents before children.
    pub nodes: Vec<SnapshotNode>,
    /// Every block of the lower tiers (host_pinned, disk, external).
    pub lower: Vec<SnapshotLowerBlock>,
}

/// One block a stream holds on a lower tier, with the parent its store named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLowerBlock {
    /// Index into `IndexSnapshot::streams`.
    pub stream: u32,
    /// Never `Device`.
    pub tier: StorageTier,
    pub ext: ExternalSequenceBlockHash,
    pub local: LocalBlockHash,
    pub parent: Option<ExternalSequenceBlockHash>,
}

/// One block of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotNode {
    /// Index of the parent in `IndexSnapshot::nodes`; `None` for a first block.
    pub parent: Option<u32>,
    pub local: LocalBlockHash,
    /// The node's shared external hash (its first writer's).
    pub ext: ExternalSequenceBlockHash,
    /// Streams holding this block.
    pub holders: Vec<SnapshotHolder>,
}

/// A stream holding a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHolder {
    /// Index into `IndexSnapshot::streams`.
    pub stream: u32,
    /// The stream's own external hash when it differs from the node's shared one.
    pub private_ext: Option<ExternalSequenceBlockHash>,
}

impl IndexSnapshot {
    /// The lower-tier blocks in an order-independent form: `(stream, tier, ext, local, parent)`.
    pub fn lower_canonical(
        &self,
    ) -> std::collections::BTreeSet<(WorkerWithDpRank, u8, u64, u64, Option<u64>)> {
        self.lower
            .iter()
            .filter_map(|b| {
                let stream = *self.streams.get(b.stream as usize)?;
                let tier = match b.tier {
                    StorageTier::Device => 0,
                    StorageTier::HostPinned => 1,
                    StorageTier::Disk => 2,
                    StorageTier::External => 3,
                };
                Some((stream, tier, b.ext.0, b.local.0, b.parent.map(|p| p.0)))
            })
            .collect()
    }

    /// Number of device (block, stream) pairs.
    pub fn pairs(&self) -> usize {
        self.nodes.iter().map(|n| n.holders.len()).sum()
    }

    /// A canonical, order-independent form for comparisons in tests and tools:
    /// `(stream, path of locals from the root, the stream's external hash)` per held block.
    pub fn canonical(&self) -> std::collections::BTreeSet<(WorkerWithDpRank, Vec<u64>, u64)> {
        let mut paths: Vec<Vec<u64>> = Vec::with_capacity(self.nodes.len());
        let mut out = std::collections::BTreeSet::new();
        for n in &self.nodes {
            let mut path = n
                .parent
                .and_then(|p| paths.get(p as usize).cloned())
                .unwrap_or_default();
            path.push(n.local.0);
            for h in &n.holders {
                if let Some(stream) = self.streams.get(h.stream as usize) {
                    let ext = h.private_ext.unwrap_or(n.ext).0;
                    out.insert((*stream, path.clone(), ext));
                }
            }
            paths.push(path);
        }
        out
    }
}
