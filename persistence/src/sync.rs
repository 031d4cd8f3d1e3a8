//! The log's synchronisation primitives in one place, so that `--cfg loom` (with
//! `--cfg crossbeam_loom`, see `loom-tests/`) hands loom's model-checked versions to the
//! production code: the writer's progress publication and `AppendTicket::wait` then run under
//! loom unchanged.

#[cfg(not(loom))]
pub(crate) use crossbeam_channel as channel;
#[cfg(loom)]
pub(crate) use kvindex_engine::loom_hooks::channel;
#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
