//! `registry.json`: the registry's on-disk form (partitions, registrations, peers, and the keys
//! of partitions being dropped), written atomically so a crash leaves the old or the new file,
//! never a torn one.
//!
//! Unknown fields are ignored when reading (no `deny_unknown_fields`, in this build and the
//! builds before it): a file with `dropping` loads in a build that does not know it, which then
//! ignores it, and a file without it (written before it existed) loads here with none.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::drops::PendingDrops;
use super::{RegistryError, RegistryView};

#[derive(Serialize, Deserialize)]
pub(super) struct FileListener {
    pub dp_rank: u32,
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_endpoint: Option<String>,
    /// The log's next LSN when the registration was made (0 in files written before it was
    /// recorded: every watermark of the stream is then trusted, as before).
    #[serde(default)]
    pub registered_at_lsn: u64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct FileInstance {
    pub instance_id: u64,
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
    pub listeners: Vec<FileListener>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct FilePartition {
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
}

/// A partition being dropped: its last worker left, and its `DropNamespace` may not be in the
/// log yet (see `drops.rs`).
#[derive(Serialize, Deserialize)]
pub(super) struct FileDropping {
    pub model_name: String,
    pub routing_group: String,
    /// The log's next LSN when the drop was decided: event entries of the partition at or
    /// after it mean the drop was withdrawn (absent: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped_at_lsn: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct RegistryFile {
    pub version: u32,
    pub partitions: Vec<FilePartition>,
    pub instances: Vec<FileInstance>,
    pub peers: Vec<String>,
    /// Partitions being dropped (absent in files written before it existed, and left out when
    /// empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropping: Vec<FileDropping>,
}

impl RegistryFile {
    pub(super) fn from_view(v: &RegistryView, dropping: &PendingDrops) -> Self {
        let mut partitions: Vec<_> = v
            .partitions
            .values()
            .map(|p| FilePartition {
                model_name: p.spec.key.model_name.clone(),
                routing_group: p.spec.key.routing_group.clone(),
                block_size: p.spec.block_size,
            })
            .collect();
        partitions.sort_by(|a, b| {
            (&a.model_name, &a.routing_group).cmp(&(&b.model_name, &b.routing_group))
        });
        let mut instances: Vec<_> = v
            .instances
            .values()
            .map(|i| FileInstance {
                instance_id: i.instance_id,
                model_name: i.key.model_name.clone(),
                routing_group: i.key.routing_group.clone(),
                block_size: i.block_size,
                listeners: i
                    .listeners
                    .iter()
                    .map(|(dp, l)| FileListener {
                        dp_rank: *dp,
                        endpoint: l.endpoint.clone(),
                        replay_endpoint: l.replay_endpoint.clone(),
                        registered_at_lsn: l.registered_at_lsn,
                    })
                    .collect(),
            })
            .collect();
        instances.sort_by_key(|i| i.instance_id);
        Self {
            version: 1,
            partitions,
            instances,
            peers: v.peers.clone(),
            dropping: dropping
                .iter()
                .map(|(k, lsn)| FileDropping {
                    model_name: k.model_name.clone(),
                    routing_group: k.routing_group.clone(),
                    dropped_at_lsn: lsn,
                })
                .collect(),
        }
    }
}

pub(super) fn file_error(path: &Path, reason: impl std::fmt::Display) -> RegistryError {
    RegistryError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A simulated failure of [`write_atomically`] (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WriteFault {
    /// The temp file cannot be written: the file is unchanged.
    BeforeRename,
    /// The directory's fsync fails, after the rename.
    AfterRename,
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory. An error
/// does not mean the file is unchanged: the rename may have happened (a failed directory
/// fsync), and the new file may or may not survive a power loss. `fault` (tests) fails on
/// purpose.
pub(super) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    fault: Option<WriteFault>,
) -> Result<(), RegistryError> {
    let tmp = path.with_extension("json.tmp");
    if fault == Some(WriteFault::BeforeRename) {
        return Err(file_error(&tmp, "simulated failure to write the temp file"));
    }
    let mut f = std::fs::File::create(&tmp).map_err(|e| file_error(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_error(&tmp, e))?;
    f.sync_all().map_err(|e| file_error(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))?;
    // The rename is durable only once the directory is: a failure here is the caller's too.
    if fault == Some(WriteFault::AfterRename) {
        return Err(file_error(path, "simulated failure of the directory fsync"));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| file_error(dir, e))?;
    }
    Ok(())
}
