//! `registry.json`: the registry's on-disk form (partitions, registrations, peers), written
//! atomically so a crash leaves the old or the new file, never a torn one.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

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

#[derive(Serialize, Deserialize)]
pub(super) struct RegistryFile {
    pub version: u32,
    pub partitions: Vec<FilePartition>,
    pub instances: Vec<FileInstance>,
    pub peers: Vec<String>,
}

impl RegistryFile {
    pub(super) fn from_view(v: &RegistryView) -> Self {
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
        }
    }
}

pub(super) fn file_error(path: &Path, reason: impl std::fmt::Display) -> RegistryError {
    RegistryError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| file_error(&tmp, e))?;
    f.write_all(bytes).map_err(|e| file_error(&tmp, e))?;
    f.sync_all().map_err(|e| file_error(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))?;
    // The rename is durable only once the directory is: a failure here is the caller's too.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| file_error(dir, e))?;
    }
    Ok(())
}
