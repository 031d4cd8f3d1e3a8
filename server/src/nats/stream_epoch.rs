//! Which JetStream stream the logged stream sequences belong to. A stream deleted and created
//! again restarts its sequences at 1, so a sequence alone does not name a message. Each stream
//! identity (name and creation time) gets an epoch, written into every logged sequence
//! (`TAG | epoch << 47 | stream_sequence`, docs/log-format.md §6); this module keeps the current
//! identity and its epoch in `<data-dir>/jetstream-stream.json`, written atomically before
//! anything is logged under a new epoch, with the epoch's *handled floor*: every stream
//! sequence at or below it was handled (logged, or refused for good) and acknowledged. The set
//! of logged sequences forgets what is at or below the floor, so the floor is what still
//! recognises those messages when a consumer created again delivers them (with a delivery
//! count of 1); it is stored before the set is pruned to it.

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
    /// The highest epoch ever allocated here (files written before it existed: `epoch`).
    /// Epochs are never allocated at or below it again.
    #[serde(default)]
    high_water: u16,
    #[serde(flatten)]
    identity: StreamIdentity,
    /// The handled floor of `epoch` (files written before it existed: 0).
    #[serde(default)]
    floor: u64,
}

impl Stored {
    fn high_water(&self) -> u16 {
        self.high_water.max(self.epoch)
    }
}

#[derive(Debug, Error)]
pub enum EpochError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the handled floor of epoch {epoch} not stored: {path} no longer holds that epoch \
         of stream {stream}"
    )]
    FloorOfAnotherEpoch {
        path: PathBuf,
        epoch: u16,
        stream: String,
    },
    #[error(
        "every JetStream epoch is used (the highest, {}, was allocated): the logged \
         sequences of 65535 stream identities cannot be told apart any more",
        u16::MAX
    )]
    Exhausted,
}

/// What the log knows of the epochs it used: a new epoch is allocated above all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoggedEpochs {
    /// The groups of the durable tagged set now (pruned).
    pub in_use: Vec<u16>,
    /// The highest group recovery found (snapshot plus log), before any pruning.
    pub recovered_max: Option<u16>,
}

impl LoggedEpochs {
    fn max(&self) -> Option<u16> {
        self.in_use.iter().copied().max().max(self.recovered_max)
    }
}

/// The stored identity file: `Ok(None)` when missing, `Err(())` when unreadable or damaged
/// (logged and counted; a new epoch is then allocated above what the log holds).
fn read(path: &Path) -> Result<Option<Stored>, ()> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            count_unreadable();
            tracing::warn!(path = %path.display(), error = %e, "cannot read the JetStream stream identity; a new epoch is used");
            return Err(());
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(s) => Ok(Some(s)),
        Err(e) => {
            count_unreadable();
            tracing::warn!(path = %path.display(), error = %e, "damaged JetStream stream identity; a new epoch is used");
            Err(())
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

/// An epoch and its handled floor (0 for a new epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Epoch {
    pub epoch: u16,
    /// Every stream sequence of the epoch at or below it was handled and acknowledged.
    pub floor: u64,
}

/// The epoch of `identity`: the stored one (with its floor) when the identity is the stored
/// one; otherwise a new one ([`new_epoch`]).
pub fn epoch_for(
    dir: &Path,
    identity: &StreamIdentity,
    logged: &LoggedEpochs,
) -> Result<Epoch, EpochError> {
    let path = dir.join(FILE_NAME);
    let stored = read(&path);
    if let Ok(Some(s)) = &stored {
        if s.identity == *identity {
            return Ok(Epoch {
                epoch: s.epoch,
                floor: s.floor,
            });
        }
    }
    allocate(
        &path,
        stored,
        identity,
        logged,
        "new JetStream stream identity",
    )
}

/// A new epoch for `identity`, even if it is the stored one (its sequences were reused: a
/// stream restored from a backup keeps its creation time but not its last sequences).
pub fn new_epoch(
    dir: &Path,
    identity: &StreamIdentity,
    logged: &LoggedEpochs,
    why: &'static str,
) -> Result<Epoch, EpochError> {
    let path = dir.join(FILE_NAME);
    let stored = read(&path);
    allocate(&path, stored, identity, logged, why)
}

/// Store `floor` as the handled floor of `epoch` (the stored epoch, of `identity`) when it is
/// above the stored one; `Ok(false)` when it is not (nothing written). The file must still hold
/// that epoch: otherwise (lost, damaged, or another epoch) nothing is written and the caller
/// must not prune below the floor it had.
pub fn raise_floor(
    dir: &Path,
    identity: &StreamIdentity,
    epoch: u16,
    floor: u64,
) -> Result<bool, EpochError> {
    let path = dir.join(FILE_NAME);
    let stored = match read(&path) {
        Ok(Some(s)) if s.epoch == epoch && s.identity == *identity => s,
        _ => {
            return Err(EpochError::FloorOfAnotherEpoch {
                path,
                epoch,
                stream: identity.stream.clone(),
            })
        }
    };
    if floor <= stored.floor {
        return Ok(false);
    }
    write(&path, &Stored { floor, ..stored })?;
    Ok(true)
}

/// Allocate the epoch above every one used before — the stored high-water mark, the groups in
/// the log now and at recovery — (never 0, the layout of logs written before epochs; never
/// going back, even when the file is lost), and store it durably before returning it.
fn allocate(
    path: &Path,
    stored: Result<Option<Stored>, ()>,
    identity: &StreamIdentity,
    logged: &LoggedEpochs,
    why: &'static str,
) -> Result<Epoch, EpochError> {
    if matches!(stored, Ok(None)) && logged.max().is_some() {
        // The log holds JetStream sequences, so this file was written once: lost (a restore
        // without it, a deletion). Allocation goes on above the log's epochs.
        count_unreadable();
        tracing::warn!(path = %path.display(), highest_logged_epoch = ?logged.max(), "JetStream stream identity file missing although the log holds JetStream sequences; a new epoch above them is used");
    }
    // Unreadable: counted by `read`; the log's epochs still bound the allocation.
    let stored = stored.unwrap_or(None);
    let floor = stored
        .as_ref()
        .map(Stored::high_water)
        .max(logged.max())
        .unwrap_or(0);
    let epoch = floor.checked_add(1).ok_or(EpochError::Exhausted)?;
    write(
        path,
        &Stored {
            epoch,
            high_water: epoch,
            identity: identity.clone(),
            floor: 0,
        },
    )?;
    tracing::info!(
        stream = %identity.stream,
        created_ns = %identity.created_ns,
        epoch,
        previous = ?stored.map(|s| s.epoch),
        "{why}: sequences of the previous epoch no longer deduplicate"
    );
    Ok(Epoch { epoch, floor: 0 })
}

/// Whether the stream's sequences were reused under its identity: the log holds a sequence of
/// the current epoch above the stream's last one, or the epoch's handled floor is above it (a
/// stream restored from a backup keeps its name and creation time, and numbers new messages
/// again from its backup's last sequence). The floor matters once the set was pruned: new
/// messages at or below it would be taken for handled ones.
pub fn sequences_reused(last_logged: Option<u64>, floor: u64, stream_last_sequence: u64) -> bool {
    last_logged.unwrap_or(0).max(floor) > stream_last_sequence
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

    fn logged(in_use: &[u16], recovered_max: Option<u16>) -> LoggedEpochs {
        LoggedEpochs {
            in_use: in_use.to_vec(),
            recovered_max,
        }
    }

    fn none() -> LoggedEpochs {
        LoggedEpochs::default()
    }

    #[test]
    fn the_same_stream_keeps_its_epoch_and_a_recreated_one_gets_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let a = id("S", "100");
        let e1 = epoch_for(dir.path(), &a, &none()).unwrap().epoch;
        assert_eq!(e1, 1);
        assert_eq!(
            epoch_for(dir.path(), &a, &logged(&[1], Some(1)))
                .unwrap()
                .epoch,
            e1
        );
        let recreated = id("S", "200");
        let e2 = epoch_for(dir.path(), &recreated, &logged(&[1, 2], None))
            .unwrap()
            .epoch;
        assert_eq!(e2, 3, "above the epochs still in the log");
        assert_eq!(
            epoch_for(dir.path(), &recreated, &none()).unwrap().epoch,
            e2
        );
        assert_eq!(
            epoch_for(dir.path(), &a, &none()).unwrap().epoch,
            4,
            "the first identity again is a new one"
        );
    }

    /// Allocation never goes back: not below the stored high-water mark (the pruned set forgot
    /// the older epochs), nor, when the file is lost or damaged, below the highest epoch
    /// recovery saw in the log.
    #[test]
    fn epochs_are_never_allocated_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(
            epoch_for(dir.path(), &id("S", "1"), &none()).unwrap().epoch,
            1
        );
        assert_eq!(
            epoch_for(dir.path(), &id("S", "2"), &none()).unwrap().epoch,
            2
        );
        // The set was pruned to the current epoch only: 1 is not in use, yet not reused.
        assert_eq!(
            epoch_for(dir.path(), &id("S", "3"), &logged(&[2], None))
                .unwrap()
                .epoch,
            3
        );
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(
            (stored["epoch"].as_u64(), stored["high_water"].as_u64()),
            (Some(3), Some(3))
        );
        // A file of the first format (no high-water mark): its epoch is the mark.
        std::fs::write(&path, br#"{"epoch":7,"stream":"S","created_ns":"4"}"#).unwrap();
        assert_eq!(
            epoch_for(dir.path(), &id("S", "5"), &none()).unwrap().epoch,
            8
        );
        // Lost: above the highest group recovery saw, not 1 again.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            epoch_for(dir.path(), &id("S", "6"), &logged(&[], Some(8)))
                .unwrap()
                .epoch,
            9
        );
        // Damaged: the same.
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(
            epoch_for(dir.path(), &id("S", "7"), &logged(&[9], Some(9)))
                .unwrap()
                .epoch,
            10
        );
    }

    #[test]
    fn a_new_epoch_is_allocated_for_the_same_identity_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let a = id("S", "100");
        assert_eq!(epoch_for(dir.path(), &a, &none()).unwrap().epoch, 1);
        assert_eq!(
            new_epoch(dir.path(), &a, &logged(&[1], None), "reused")
                .unwrap()
                .epoch,
            2
        );
        assert_eq!(epoch_for(dir.path(), &a, &none()).unwrap().epoch, 2, "kept");
    }

    /// A stream restored from a backup keeps its identity; the log holding a sequence of the
    /// current epoch above the stream's last one means its sequences are being reused.
    #[test]
    fn sequences_above_the_streams_last_one_mean_reuse() {
        assert!(!sequences_reused(None, 0, 0));
        assert!(!sequences_reused(None, 0, 10));
        assert!(!sequences_reused(Some(10), 0, 10));
        assert!(!sequences_reused(Some(3), 0, 10));
        assert!(sequences_reused(Some(11), 0, 10));
        assert!(sequences_reused(Some(1), 0, 0), "restored empty");
        // The set pruned: the handled floor still tells.
        assert!(!sequences_reused(None, 10, 10));
        assert!(!sequences_reused(Some(12), 10, 12));
        assert!(sequences_reused(None, 11, 10));
        assert!(sequences_reused(Some(5), 11, 10));
    }

    /// The handled floor is kept with its epoch: it only rises, a new epoch starts at 0, a file
    /// written before floors existed reads as 0, and a file no longer holding the epoch is not
    /// written (the caller must not prune below its old floor).
    #[test]
    fn the_handled_floor_belongs_to_its_epoch_and_only_rises() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let a = id("S", "100");
        let first = epoch_for(dir.path(), &a, &none()).unwrap();
        assert_eq!(first, Epoch { epoch: 1, floor: 0 });
        assert!(raise_floor(dir.path(), &a, 1, 40).unwrap());
        assert!(!raise_floor(dir.path(), &a, 1, 40).unwrap(), "not above");
        assert!(!raise_floor(dir.path(), &a, 1, 7).unwrap(), "never lowered");
        assert_eq!(
            epoch_for(dir.path(), &a, &none()).unwrap(),
            Epoch {
                epoch: 1,
                floor: 40
            }
        );
        // Not the stored epoch (or identity): refused, nothing written.
        assert!(matches!(
            raise_floor(dir.path(), &a, 2, 50),
            Err(EpochError::FloorOfAnotherEpoch { epoch: 2, .. })
        ));
        assert!(matches!(
            raise_floor(dir.path(), &id("S", "200"), 1, 50),
            Err(EpochError::FloorOfAnotherEpoch { .. })
        ));
        assert_eq!(epoch_for(dir.path(), &a, &none()).unwrap().floor, 40);
        // A new epoch (the stream's sequences reused) starts from nothing handled.
        assert_eq!(
            new_epoch(dir.path(), &a, &none(), "reused").unwrap(),
            Epoch { epoch: 2, floor: 0 }
        );
        // Written before floors existed.
        std::fs::write(
            &path,
            br#"{"epoch":3,"high_water":3,"stream":"S","created_ns":"100"}"#,
        )
        .unwrap();
        assert_eq!(
            epoch_for(dir.path(), &a, &none()).unwrap(),
            Epoch { epoch: 3, floor: 0 }
        );
        // Lost: refused.
        std::fs::remove_file(&path).unwrap();
        assert!(raise_floor(dir.path(), &a, 3, 9).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn past_the_last_epoch_allocation_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        assert_eq!(
            epoch_for(dir.path(), &id("S", "1"), &logged(&[1, 2], None))
                .unwrap()
                .epoch,
            3
        );
        assert!(matches!(
            epoch_for(dir.path(), &id("S", "2"), &logged(&[u16::MAX], None)),
            Err(EpochError::Exhausted)
        ));
    }
}
