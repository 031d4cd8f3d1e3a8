//! The intake gate: keeps `/unregister` and the events racing it apart.
//!
//! Every event submission through the registry (`POST /events`, NATS, peer recovery) holds the
//! shared side from the moment it reads the registry — which partition, which worker — until
//! its record is appended to the log ([`Admission`]). `/unregister` holds the exclusive side
//! from just before it logs the removal until the registry without the worker (and without a
//! dropped partition) is published in memory ([`Fenced`]; `registry.json` is written after).
//! So an event is either logged before the removal, and removed by it, or it reads the
//! registry after the unregister and is handled like any event of an unregistered worker:
//! refused when routed by registration or when its partition is gone — but accepted when it
//! names a partition that still has workers (no tombstones; see `docs/api.md`). No event read
//! before the unregister can be logged after its removal, which would bring the worker's
//! blocks back (also after a restart, since the log says so) or re-create a dropped partition
//! implicitly.
//!
//! The ZMQ sink does not enter the gate: it runs on the async workers, and the exclusive side
//! is held across a log fsync. Its listeners are ordered by their own fence
//! (`zmq_source.rs`), which `/unregister` closes for the removed streams before the gate.
//!
//! Lock order: registry write mutex → ZMQ listener fence → this gate. A submitter never takes
//! the registry write mutex while it holds an [`Admission`] (`ensure_partition` runs before
//! admission, or after letting it go), and `/unregister` stops its listeners before it closes
//! the gate.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::RegistryView;

/// The gate itself; one per registry.
#[derive(Default)]
pub struct IntakeGate {
    lock: RwLock<()>,
    #[cfg(test)]
    pub(crate) hooks: hooks::Hooks,
}

/// The shared side, with the registry as it was once the gate was entered: unregistrations
/// cannot change it while this is held (registrations may add to a newer view).
pub struct Admission<'a> {
    _shared: RwLockReadGuard<'a, ()>,
    view: Arc<RegistryView>,
    #[cfg(test)]
    gate: &'a IntakeGate,
}

/// The exclusive side: no event is between its registry check and its log append.
pub struct Fenced<'a> {
    _exclusive: RwLockWriteGuard<'a, ()>,
}

impl IntakeGate {
    /// Enter the shared side, then read the registry with `view`.
    ///
    /// Not re-entrant: a thread holding an [`Admission`] must not ask for another one (a
    /// waiting [`Self::fence`] would block the second one for good).
    pub fn admit(&self, view: impl FnOnce() -> Arc<RegistryView>) -> Admission<'_> {
        #[cfg(test)]
        self.hooks.run(&self.hooks.before_admit);
        // A poisoned lock protects no data (`()`): keep serving.
        let shared = self.lock.read().unwrap_or_else(|e| e.into_inner());
        // Read after entering: an unregister publishes its view while it holds the exclusive
        // side, so this view is either before it entirely or after it entirely.
        let view = view();
        Admission {
            _shared: shared,
            view,
            #[cfg(test)]
            gate: self,
        }
    }

    /// Wait until no event is between its registry check and its log append, and keep new ones
    /// out until the returned guard is dropped.
    pub fn fence(&self) -> Fenced<'_> {
        #[cfg(test)]
        self.hooks.run(&self.hooks.before_fence);
        Fenced {
            _exclusive: self.lock.write().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl Admission<'_> {
    /// The registry as of admission.
    pub fn view(&self) -> &RegistryView {
        &self.view
    }

    /// Test hook: called between the registry check and the log append.
    pub fn before_log(&self) {
        #[cfg(test)]
        self.gate.hooks.run(&self.gate.hooks.before_log);
    }
}

#[cfg(test)]
pub(crate) mod hooks {
    use std::sync::{Arc, Mutex};

    /// A test callback.
    pub type Hook = Arc<dyn Fn() + Send + Sync>;

    /// Callbacks that let a test hold an event or an unregister at a chosen point, or act there.
    #[derive(Default)]
    pub struct Hooks {
        /// In an event submission, before it enters the gate.
        pub before_admit: Mutex<Option<Hook>>,
        /// In an event submission, between its registry check and its log append.
        pub before_log: Mutex<Option<Hook>>,
        /// In `/unregister`, just before it waits for the exclusive side.
        pub before_fence: Mutex<Option<Hook>>,
        /// When `Partitions::unregister` returns (the registry's write lock released).
        pub after_unregister: Mutex<Option<Hook>>,
    }

    impl Hooks {
        pub(in crate::partitions) fn run(&self, slot: &Mutex<Option<Hook>>) {
            let hook = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}
