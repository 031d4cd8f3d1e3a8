//! Which JetStream stream the logged stream sequences belong to. A stream deleted and created
//! again restarts its sequences at 1, so a sequence alone does not name a message. Each stream
//! identity (name and creation time) gets an epoch, written into every logged sequence
//! (`TAG | epoch << 47 | stream_sequence`, docs/log-format.md §6); this module keeps the current
//! identity and its epoch in `<data-dir>/jetstream-stream.json`, written atomically before
//! anything is logged under a new epoch.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::metrics::JS_ERRORS;

/// File name in the data directory.
pub const FILE_NAME: &str = "jetstream-stream.json";

/// A stream as JetStream identifies it: its name and its creation time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIdentity {
    pub stream: String,
    /// Creation time, nanoseconds since the Unix epoch (as a string: it may exceed `i64`
    /// in JSON readers).
    pub created_ns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    epoch: u16,
    #[serde(flatten)]
    identity: StreamIdentity,
}

#[derive(Debug, Error)]
pub enum EpochError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("every JetStream epoch is in use in the log")]
    Exhausted,
}

/// Read the stored identity; `None` when missing or unreadable (an unreadable file is logged
/// and counted: its epoch is then allocated afresh, which only costs deduplication of messages
/// logged before).
fn read(path: &Path) -> Option<Stored> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            count_unreadable();
            tracing::warn!(path = %path.display(), error = %e, "cannot read the JetStream stream identity; a new epoch is used");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            count_unreadable();
            tracing::warn!(path = %path.display(), error = %e, "damaged JetStream stream identity; a new epoch is used");
            None
        }
    }
}

fn count_unreadable() {
    metrics::counter!(JS_ERRORS, "stage" => "identity").increment(1);
}

fn write(path: &Path, stored: &Stored) -> Result<(), EpochError> {
    let err = |source| EpochError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(stored).map_err(|e| err(e.into()))?;
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).and_then(|_| f.sync_all()).map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

/// The epoch of `identity`: the stored one when the identity is the stored one; otherwise a
/// new epoch (never 0, which is the layout of logs written before epochs; never one of
/// `in_use`, the groups still in the durable set), stored durably before it is returned.
pub fn epoch_for(dir: &Path, identity: &StreamIdentity, in_use: &[u16]) -> Result<u16, EpochError> {
    let path = dir.join(FILE_NAME);
    let stored = read(&path);
    if let Some(s) = &stored {
        if s.identity == *identity {
            return Ok(s.epoch);
        }
    }
    let start = stored.as_ref().map_or(0, |s| s.epoch);
    let epoch = (1..=u16::MAX)
        .map(|i| ((u32::from(start) + u32::from(i)) % (u32::from(u16::MAX) + 1)) as u16)
        .find(|e| *e != 0 && !in_use.contains(e))
        .ok_or(EpochError::Exhausted)?;
    write(
        &path,
        &Stored {
            epoch,
            identity: identity.clone(),
        },
    )?;
    tracing::info!(
        stream = %identity.stream,
        created_ns = %identity.created_ns,
        epoch,
        previous = ?stored.map(|s| s.epoch),
        "new JetStream stream identity: sequences of the previous one no longer deduplicate"
    );
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(stream: &str, created: &str) -> StreamIdentity {
        StreamIdentity {
            stream: stream.into(),
            created_ns: created.into(),
        }
    }

    #[test]
    fn the_same_stream_keeps_its_epoch_and_a_recreated_one_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = id("S", "100");
        let e1 = epoch_for(dir.path(), &a, &[]).unwrap();
        assert_eq!(e1, 1);
        assert_eq!(epoch_for(dir.path(), &a, &[1]).unwrap(), e1);
        let recreated = id("S", "200");
        let e2 = epoch_for(dir.path(), &recreated, &[1, 2]).unwrap();
        assert_eq!(e2, 3, "skips the epochs still in the log");
        assert_eq!(epoch_for(dir.path(), &recreated, &[]).unwrap(), e2);
        assert_ne!(epoch_for(dir.path(), &a, &[]).unwrap(), e1);
    }

    #[test]
    fn a_damaged_file_gives_a_fresh_epoch_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert_eq!(epoch_for(dir.path(), &id("S", "1"), &[1, 2]).unwrap(), 3);
        let all: Vec<u16> = (1..=u16::MAX).collect();
        assert!(matches!(
            epoch_for(dir.path(), &id("S", "2"), &all),
            Err(EpochError::Exhausted)
        ));
    }
}
