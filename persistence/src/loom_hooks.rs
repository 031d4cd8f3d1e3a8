//! Entry points for the loom models in `loom-tests/`, compiled only under `--cfg loom`: the
//! production tail publication of the log writer (`Shared`'s progress under its mutex and
//! condvar) and `AppendTicket::wait`, on a model's state.

use std::sync::Arc;

use crate::config::FsyncPolicy;
use crate::entry::Lsn;
use crate::writer::{AppendTicket, Shared};

/// The writer's published progress, as callers and the writer thread share it.
pub struct Tail {
    shared: Arc<Shared>,
}

impl Tail {
    /// A log whose next LSN is `next_lsn`, nothing pending.
    pub fn new(next_lsn: Lsn, policy: FsyncPolicy) -> Self {
        Tail {
            shared: Shared::for_loom(next_lsn, policy),
        }
    }

    /// The writer thread, after its write of everything below `end` returned: publish it.
    pub fn publish(&self, end: Lsn, synced: bool) {
        self.shared.loom_publish(end, synced);
    }

    /// The writer thread stops for good.
    pub fn fail(&self, cause: &str) {
        self.shared.loom_fail(cause);
    }

    /// The ticket `append` hands out for a batch with LSNs `first..end`.
    pub fn ticket(&self, first: Lsn, end: Lsn) -> AppendTicket {
        AppendTicket::for_loom(&self.shared, first, end)
    }
}
