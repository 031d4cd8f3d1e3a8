//! The registry: partitions `(model_name, routing_group)` with their block size, the registered
//! instances and their per-dp_rank listeners, and the peer list — with Dynamo's rules and error
//! wording (SERVICE.md §2, §3.3–§3.5, §3.9, §3.12, §8).
//!
//! Readers (`/query`, `/workers`, ingestion) load an immutable [`RegistryView`] without locking;
//! writers serialise on one mutex, build the next view, write `registry.json` in the data
//! directory (so partitions and registrations survive a restart) and publish it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kvindex_engine::{Engine, Namespace, NamespaceKey, WorkerId};
use kvindex_persistence::NamespaceSpec;
use thiserror::Error;

use crate::listeners::{ListenerSpec, ListenerState, ListenerStatus, ListenerSupervisor};

mod drops;
mod file;
mod gate;
mod limits;
mod unregister;

use drops::PendingDrops;
pub use drops::{durable_drop_log, log_drop, DropLog, DropLogger, DROPS_PENDING};
#[cfg(test)]
use file::WriteFault;
use file::{file_error, write_atomically, RegistryFile};
pub use gate::Admission;
use gate::IntakeGate;
pub use limits::{Creator, PartitionLimits, CREATIONS_REFUSED, DEFAULT_MAX_PARTITIONS};

/// File name of the registrations in the data directory.
pub const REGISTRY_FILE: &str = "registry.json";

/// Registry failures. Display strings are Dynamo's where Dynamo has the case.
#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("instance {instance_id} dp_rank {dp_rank} already registered")]
    AlreadyRegistered { instance_id: u64, dp_rank: u32 },
    #[error(
        "instance {instance_id} is already registered for model={model} routing_group={group}"
    )]
    RegisteredForOther {
        instance_id: u64,
        model: String,
        group: String,
    },
    #[error("block_size mismatch for model={model} routing_group={group}: existing={existing}, requested={requested}")]
    BlockSizeMismatch {
        model: String,
        group: String,
        existing: u32,
        requested: u32,
    },
    #[error("instance {0} not found")]
    InstanceNotFound(u64),
    #[error("instance {instance_id} is registered for model={model} routing_group={group}")]
    WrongPartition {
        instance_id: u64,
        model: String,
        group: String,
    },
    #[error("instance {instance_id} dp_rank {dp_rank} not found")]
    DpRankNotFound { instance_id: u64, dp_rank: u32 },
    #[error("no indexer for model={model} routing_group={group}")]
    NoIndexer { model: String, group: String },
    #[error("peer not found")]
    PeerNotFound,
    #[error("instance {instance_id} dp_rank {dp_rank} cannot be paused from status {status}")]
    CannotPause {
        instance_id: u64,
        dp_rank: u32,
        status: &'static str,
    },
    #[error("instance {instance_id} dp_rank {dp_rank} cannot be resumed from status {status}")]
    CannotResume {
        instance_id: u64,
        dp_rank: u32,
        status: &'static str,
    },
    /// `registry.json` could not be written or read.
    #[error("registry file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The event log or the engine refused a removal.
    #[error("{0}")]
    Index(String),
    /// The partition is not created (again): the drop of the previous partition of its key
    /// could not be logged before, and still cannot be (see [`drops`]).
    #[error("partition model={model} routing_group={group} cannot be created: the drop of its previous partition is not logged yet and logging it failed: {reason}")]
    DropNotLogged {
        model: String,
        group: String,
        reason: String,
    },
    /// Events asked for a new partition while `limit` partitions without a registered worker
    /// exist (`--max-event-partitions`; see [`limits`]).
    #[error("partition model={model} routing_group={group} not created: {limit} partitions without a registered worker exist, the most events may create (--max-event-partitions); register a worker to create it")]
    PartitionLimit {
        model: String,
        group: String,
        limit: usize,
    },
    /// A registration or events asked for a new partition while `limit` partitions exist
    /// (`--max-partitions`; see [`limits`]).
    #[error("partition model={model} routing_group={group} not created: {limit} partitions exist, the most this service holds (--max-partitions)")]
    TooManyPartitions {
        model: String,
        group: String,
        limit: usize,
    },
}

/// One listener of an instance.
#[derive(Debug, Clone)]
pub struct Listener {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub state: ListenerState,
    /// The log's next LSN when the registration was made (see
    /// [`ListenerSpec::registered_at_lsn`]).
    pub registered_at_lsn: u64,
}

/// A registered instance: one partition, one listener per dp_rank.
#[derive(Debug, Clone)]
pub struct Instance {
    pub instance_id: u64,
    pub key: NamespaceKey,
    pub block_size: u32,
    pub listeners: BTreeMap<u32, Listener>,
}

impl Instance {
    pub(crate) fn listener_spec(&self, dp_rank: u32, l: &Listener) -> ListenerSpec {
        ListenerSpec {
            model_name: self.key.model_name.clone(),
            routing_group: self.key.routing_group.clone(),
            block_size: self.block_size,
            instance_id: self.instance_id,
            dp_rank,
            endpoint: l.endpoint.clone(),
            replay_endpoint: l.replay_endpoint.clone(),
            registered_at_lsn: l.registered_at_lsn,
        }
    }
}

/// A partition: its log namespace and, for a block size > 0, its engine index.
#[derive(Clone)]
pub struct Partition {
    pub spec: Arc<NamespaceSpec>,
    /// `None` for block size 0, which Dynamo accepts but which can index nothing.
    pub namespace: Option<Namespace>,
}

/// An immutable picture of the registry.
#[derive(Clone, Default)]
pub struct RegistryView {
    pub partitions: HashMap<NamespaceKey, Partition>,
    pub instances: HashMap<u64, Instance>,
    pub peers: Vec<String>,
}

impl RegistryView {
    /// The partition of `(model, group)`, or Dynamo's 404 error.
    pub fn partition(&self, model: &str, group: &str) -> Result<&Partition, RegistryError> {
        self.partitions
            .get(&NamespaceKey::new(model, group))
            .ok_or_else(|| RegistryError::NoIndexer {
                model: model.to_owned(),
                group: group.to_owned(),
            })
    }

    /// Partitions no registered instance belongs to: those created by events or by a peer
    /// recovery (a partition goes with its last worker otherwise).
    pub fn partitions_without_workers(&self) -> usize {
        let owned: std::collections::HashSet<&NamespaceKey> =
            self.instances.values().map(|i| &i.key).collect();
        self.partitions
            .keys()
            .filter(|k| !owned.contains(k))
            .count()
    }

    /// Listeners per status, in [`ListenerStatus::ALL`] order; a listener's status comes from
    /// `live` when it knows it (the supervisor's current state; the view's copy is mirrored
    /// periodically).
    pub fn listener_counts_with(
        &self,
        live: impl Fn(u64, u32) -> Option<ListenerStatus>,
    ) -> [usize; 4] {
        let mut counts = [0; 4];
        for i in self.instances.values() {
            for (dp, l) in &i.listeners {
                let status = live(i.instance_id, *dp).unwrap_or(l.state.status);
                let idx = ListenerStatus::ALL
                    .iter()
                    .position(|s| *s == status)
                    .unwrap_or(0);
                counts[idx] += 1;
            }
        }
        counts
    }
}

/// A registration request (already validated endpoints).
#[derive(Debug, Clone)]
pub struct Registration {
    pub instance_id: u64,
    pub model_name: String,
    pub routing_group: String,
    pub block_size: u32,
    pub dp_rank: u32,
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
}

/// Blocks to drop because of an unregistration: every rank of the worker, or one rank.
#[derive(Debug, Clone)]
pub struct Removal {
    pub spec: Arc<NamespaceSpec>,
    pub worker_id: WorkerId,
    pub dp_rank: Option<u32>,
}

/// Where `/unregister` logs what it removes (the event log, in the service).
pub struct RemovalLog<'a> {
    /// Log the worker's (or one rank's) block removal and wait until it is durable.
    pub drop_blocks: &'a dyn Fn(&Removal) -> Result<(), String>,
    /// Log the drop of a partition whose last worker left, and wait until it is durable.
    pub drop_partition: &'a dyn Fn(&NamespaceKey) -> Result<(), String>,
}

/// What an unregistration did.
#[derive(Debug, Clone, Default)]
pub struct UnregisterOutcome {
    /// Partitions dropped because their last worker left.
    pub dropped: Vec<NamespaceKey>,
}

// --- the registry ------------------------------------------------------------------------------

/// The registry: lock-free reads, serialised writes, persisted to `registry.json`.
pub struct Partitions {
    view: ArcSwap<RegistryView>,
    /// Serialises the writers; holds what only they touch.
    write: Mutex<Locked>,
    engine: Engine,
    file: Option<PathBuf>,
    supervisor: std::sync::RwLock<Arc<dyn ListenerSupervisor>>,
    lsn_clock: std::sync::RwLock<Option<LsnClock>>,
    /// Where a pending partition drop is logged before its key is created again.
    drop_log: std::sync::RwLock<Option<DropLog>>,
    /// Orders event submissions against unregistrations (see [`gate`]).
    gate: IntakeGate,
    /// How many partitions may be created, and which get a pre-sized map (see [`limits`]).
    limits: PartitionLimits,
    /// Tests: how the next writes of `registry.json` fail (`None`: they do not), in order.
    #[cfg(test)]
    write_faults: Mutex<std::collections::VecDeque<Option<WriteFault>>>,
}

/// What the registry's write mutex guards besides the order of the writers.
#[derive(Default)]
struct Locked {
    /// Keys of dropped partitions whose drop is not logged yet (see [`drops`]); written to
    /// `registry.json` as `dropping`.
    pending_drops: PendingDrops,
}

/// Reads the event log's next LSN (registrations record it; see
/// [`ListenerSpec::registered_at_lsn`]).
pub type LsnClock = Arc<dyn Fn() -> u64 + Send + Sync>;

impl Partitions {
    /// An empty registry over `engine`, persisted in `data_dir` (None: not persisted).
    pub fn new(
        engine: Engine,
        data_dir: Option<&Path>,
        supervisor: Arc<dyn ListenerSupervisor>,
    ) -> Self {
        Self {
            view: ArcSwap::from_pointee(RegistryView::default()),
            write: Mutex::new(Locked::default()),
            engine,
            file: data_dir.map(|d| d.join(REGISTRY_FILE)),
            supervisor: std::sync::RwLock::new(supervisor),
            lsn_clock: std::sync::RwLock::new(None),
            drop_log: std::sync::RwLock::new(None),
            gate: IntakeGate::default(),
            limits: PartitionLimits::default(),
            #[cfg(test)]
            write_faults: Mutex::default(),
        }
    }

    /// The registry with `limits` (the default ones otherwise: [`DEFAULT_MAX_PARTITIONS`],
    /// no pre-sized maps).
    pub fn with_limits(mut self, limits: PartitionLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Enter the intake gate: hold the returned admission from reading the registry (which
    /// partition, which worker) until the events are appended to the log, so that no
    /// `/unregister` logs its removal in between. Not re-entrant.
    pub fn admit(&self) -> Admission<'_> {
        self.gate.admit(|| self.view())
    }

    /// Test hooks of the intake gate.
    #[cfg(test)]
    pub(crate) fn gate_hooks(&self) -> &gate::hooks::Hooks {
        &self.gate.hooks
    }

    /// Hold the intake gate exclusively, as `/unregister` does around its removal (tests).
    #[cfg(test)]
    pub(crate) fn hold_gate(&self) -> gate::Fenced<'_> {
        self.gate.fence()
    }

    /// Where registrations read the log's next LSN (without one they record 0: every durable
    /// watermark of their stream is trusted).
    pub fn set_lsn_clock(&self, clock: LsnClock) {
        *self.lsn_clock.write().unwrap_or_else(|e| e.into_inner()) = Some(clock);
    }

    fn lsn_clock(&self) -> u64 {
        self.lsn_clock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |c| c())
    }

    /// Where the drop of a partition that could not be logged when it was dropped is logged
    /// before a partition of its key is created again, or by [`Self::load`] for a key in
    /// `registry.json`'s `dropping` (set it before [`Self::load`]; without one, such a creation
    /// is refused). Its [`DropLogger::next_lsn`] is recorded with every drop's intent, and
    /// [`Self::load`] asks its [`DropLogger::last_event_lsn`] whether a drop was withdrawn.
    pub fn set_drop_log(&self, log: DropLog) {
        *self.drop_log.write().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    fn drop_log(&self) -> Option<DropLog> {
        self.drop_log
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The log's next LSN, as the drop log knows it (`None`: no drop log, or it does not know).
    fn drop_log_next_lsn(&self) -> Option<u64> {
        self.drop_log().and_then(|l| l.next_lsn())
    }

    /// Create the partition `key` (not in the registry): first log the drop of an earlier
    /// partition of that key if it is pending (`locked` proves the write mutex is held). The
    /// caller's write of `registry.json` then lists the key as a partition, no longer as
    /// dropping.
    fn create_partition(
        &self,
        locked: &mut Locked,
        key: &NamespaceKey,
        block_size: u32,
        creator: Creator,
    ) -> Result<Partition, RegistryError> {
        // Ordering: the drop is logged (and durable) before the new index exists. Logging it
        // removes the key's namespace from the engine (an unknown one: nothing), so it must not
        // follow the creation, and recovery then replays the old entries, the drop, and only
        // then the new partition's entries.
        locked
            .pending_drops
            .settle(key, self.drop_log().as_deref())?;
        self.make_partition(key, block_size, self.limits.expected_blocks_for(creator))
    }

    /// Replace the listener supervisor (before [`Self::load`]; the ZMQ supervisor needs the
    /// registry and the intake, so it is built after them).
    pub fn set_supervisor(&self, supervisor: Arc<dyn ListenerSupervisor>) {
        *self.supervisor.write().unwrap_or_else(|e| e.into_inner()) = supervisor;
    }

    fn supervisor(&self) -> Arc<dyn ListenerSupervisor> {
        Arc::clone(&self.supervisor.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Load `registry.json` (if any), reconcile it with what recovery rebuilt in the engine,
    /// and start a listener for every restored registration.
    ///
    /// The file's `dropping` lists the partitions whose drop may not be in the log (see
    /// [`drops`]). A key there that is also a listed partition was created again after its drop
    /// was logged: it is only cleared. Any other key's drop is logged now (with the
    /// [`Self::set_drop_log`] log; again, when it is in the log already, which changes
    /// nothing), so its entries never reach a partition created again under the same key; when
    /// that fails the key stays pending and such a creation is refused until it can be logged.
    /// Unless the drop was withdrawn: recovery found event entries of the key logged at or after
    /// the drop was decided (its `/unregister` failed after writing the file, and the worker
    /// went on), and the key is then handled as an unlisted one.
    ///
    /// Other recovered namespaces that the file does not list (imported with `kvindex replay
    /// import`, or left out of a hand-edited file; or every one without `registry.json`) are
    /// adopted as partitions when they hold blocks (WARN when the file exists), and dropped
    /// (logged, as above) when they hold none.
    ///
    /// Every partition is kept, also past `--max-partitions` (a WARN; see [`limits`]). The maps
    /// of the partitions with a registered worker are sized for `--expected-blocks` (recovery
    /// rebuilt them growing as needed); the others keep growing as needed.
    pub fn load(&self) -> Result<(), RegistryError> {
        let mut w = self.lock_write();
        let mut next = RegistryView::default();
        let mut dropping = Vec::new();
        let listed = self.file.as_deref().is_some_and(|p| p.exists());
        if let Some(path) = self.file.as_deref().filter(|p| p.exists()) {
            let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
            let file: RegistryFile = serde_json::from_slice(&bytes).map_err(|e| {
                file_error(
                    path,
                    format!(
                        "{e}; fix or delete the file (a deleted file loses the registrations, \
                         the peers and the partitions being dropped; a partition in the log \
                         that the file neither lists nor has in `dropping` is kept if it holds \
                         blocks)"
                    ),
                )
            })?;
            let registered: HashSet<NamespaceKey> = file
                .instances
                .iter()
                .map(|i| NamespaceKey::new(&i.model_name, &i.routing_group))
                .collect();
            let expected = |key: &NamespaceKey| {
                if registered.contains(key) {
                    self.limits.expected_blocks_for(Creator::Registration)
                } else {
                    0
                }
            };
            for p in file.partitions {
                let key = NamespaceKey::new(p.model_name, p.routing_group);
                let part = self.make_partition(&key, p.block_size, expected(&key))?;
                next.partitions.insert(key, part);
            }
            for fi in file.instances {
                let key = NamespaceKey::new(fi.model_name, fi.routing_group);
                if !next.partitions.contains_key(&key) {
                    let part = self.make_partition(&key, fi.block_size, expected(&key))?;
                    next.partitions.insert(key.clone(), part);
                }
                let mut inst = Instance {
                    instance_id: fi.instance_id,
                    key,
                    block_size: fi.block_size,
                    listeners: BTreeMap::new(),
                };
                for l in fi.listeners {
                    let mut listener = Listener {
                        endpoint: l.endpoint,
                        replay_endpoint: l.replay_endpoint,
                        registered_at_lsn: l.registered_at_lsn,
                        state: ListenerState {
                            status: ListenerStatus::Pending,
                            last_error: None,
                        },
                    };
                    listener.state = self
                        .supervisor()
                        .start(&inst.listener_spec(l.dp_rank, &listener));
                    inst.listeners.insert(l.dp_rank, listener);
                }
                next.instances.insert(fi.instance_id, inst);
            }
            next.peers = file.peers;
            dropping = file.dropping;
        }
        // The partitions being dropped.
        let mut dropped = HashSet::new();
        for d in dropping {
            let key = NamespaceKey::new(d.model_name, d.routing_group);
            if next.partitions.contains_key(&key) {
                tracing::info!(partition = %key, "registry.json lists the partition as dropping and as a partition: it was created again after its drop was logged; no longer dropping");
                continue;
            }
            let last_event = self.drop_log().and_then(|l| l.last_event_lsn(&key));
            if let (Some(at), Some(last)) = (d.dropped_at_lsn, last_event) {
                if last >= at {
                    tracing::warn!(partition = %key, dropped_at_lsn = at, last_event_lsn = last, "registry.json lists the partition as dropping, but the log holds events of it logged after the drop was decided: the drop was withdrawn (its unregister failed), the partition is not dropped");
                    continue;
                }
            }
            tracing::info!(partition = %key, "registry.json lists the partition as dropping: logging its drop");
            self.drop_unlisted(&mut w, key.clone(), d.dropped_at_lsn);
            dropped.insert(key);
        }
        for key in self.engine.namespaces() {
            if next.partitions.contains_key(&key) || dropped.contains(&key) {
                continue;
            }
            let Some(ns) = self.engine.namespace(&key) else {
                continue;
            };
            if ns.current_size() > 0 || ns.lower_tier_size() > 0 {
                if listed {
                    tracing::warn!(partition = %key, block_size = ns.block_size(), "a partition found in the log is not in registry.json: adopting it (events imported with `kvindex replay import`, or a partition left out of an edited registry.json); it has no registrations");
                } else {
                    tracing::info!(partition = %key, block_size = ns.block_size(), "adopting a partition found in the log without registrations");
                }
                let spec = Arc::new(NamespaceSpec {
                    key: key.clone(),
                    block_size: ns.block_size(),
                });
                next.partitions.insert(
                    key,
                    Partition {
                        spec,
                        namespace: Some(ns),
                    },
                );
            } else {
                // Holds nothing: dropped, its drop logged, so that its entries do not precede a
                // partition created again under its key.
                drop(ns);
                let at = self.drop_log_next_lsn();
                self.drop_unlisted(&mut w, key, at);
            }
        }
        self.limits.check_restored(next.partitions.len());
        self.persist(&next, &w.pending_drops)?;
        self.view.store(Arc::new(next));
        Ok(())
    }

    /// `load`: drop the recovered namespace `key`, which is no partition, logging the drop; if
    /// that fails, remove it all the same and remember the drop as pending (decided at `at`).
    fn drop_unlisted(&self, locked: &mut Locked, key: NamespaceKey, at: Option<u64>) {
        let logged = match self.drop_log() {
            Some(log) => log.log_drop(&key),
            None => Err("no event log to record it in".to_owned()),
        };
        if let Err(e) = logged {
            tracing::warn!(partition = %key, error = %e, "partition drop incomplete: a partition of this key is created again only once its drop is logged");
            locked.pending_drops.insert(key.clone(), at);
        }
        // Logging the drop removed it already (the durable log applies it to the engine).
        if let Err(e) = self.engine.remove_namespace(&key) {
            tracing::warn!(partition = %key, error = %e, "dropped partition's index not removed");
        }
    }

    /// The current view (lock-free).
    pub fn view(&self) -> Arc<RegistryView> {
        self.view.load_full()
    }

    fn lock_write(&self) -> std::sync::MutexGuard<'_, Locked> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write `registry.json`: the view's partitions, registrations and peers, and the
    /// partitions being dropped. An error may leave the new file in place (see
    /// [`file::write_atomically`]).
    fn persist(&self, v: &RegistryView, dropping: &PendingDrops) -> Result<(), RegistryError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&RegistryFile::from_view(v, dropping))
            .map_err(|e| file_error(path, e))?;
        #[cfg(test)]
        let fault = self
            .write_faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .flatten();
        #[cfg(not(test))]
        let fault = None;
        write_atomically(path, &bytes, fault)
    }

    /// The partition `key`: its engine namespace (the existing one, e.g. rebuilt by recovery,
    /// when it has `block_size`), its map sized for `expected_blocks` (0: as it is).
    fn make_partition(
        &self,
        key: &NamespaceKey,
        block_size: u32,
        expected_blocks: usize,
    ) -> Result<Partition, RegistryError> {
        let namespace = if block_size == 0 {
            None
        } else {
            Some(
                self.engine
                    .create_namespace(key.clone(), block_size)
                    .map_err(|e| match e {
                        kvindex_engine::EngineError::BlockSizeMismatch {
                            existing,
                            requested,
                            ..
                        } => RegistryError::BlockSizeMismatch {
                            model: key.model_name.clone(),
                            group: key.routing_group.clone(),
                            existing,
                            requested,
                        },
                        other => RegistryError::Index(other.to_string()),
                    })?,
            )
        };
        if let Some(ns) = namespace.as_ref().filter(|_| expected_blocks > 0) {
            ns.presize_map(expected_blocks);
        }
        Ok(Partition {
            spec: Arc::new(NamespaceSpec {
                key: key.clone(),
                block_size,
            }),
            namespace,
        })
    }

    /// Run `f` on a copy of the view under the write lock; on success persist and publish it.
    fn mutate<R>(
        &self,
        persist: bool,
        f: impl FnOnce(&mut RegistryView) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        let mut w = self.lock_write();
        self.mutate_held(&mut w, persist, |v, _| f(v))
    }

    /// [`Self::mutate`] with the write lock already held by the caller (`locked`, handed to
    /// `f` too).
    fn mutate_held<R>(
        &self,
        locked: &mut Locked,
        persist: bool,
        f: impl FnOnce(&mut RegistryView, &mut Locked) -> Result<R, RegistryError>,
    ) -> Result<R, RegistryError> {
        let mut next = (**self.view.load()).clone();
        let r = f(&mut next, locked)?;
        if persist {
            self.persist(&next, &locked.pending_drops)?;
        }
        self.view.store(Arc::new(next));
        Ok(r)
    }

    /// `POST /register`: add a listener, creating the partition on first use (while fewer than
    /// `--max-partitions` exist: [`RegistryError::TooManyPartitions`]; its map sized for
    /// `--expected-blocks`).
    pub fn register(&self, reg: Registration) -> Result<(), RegistryError> {
        self.register_as(reg, Creator::Registration)
    }

    /// [`Self::register`] by `creator` ([`Creator::Registration`] or [`Creator::Configured`]).
    fn register_as(&self, reg: Registration, creator: Creator) -> Result<(), RegistryError> {
        let key = NamespaceKey::new(&reg.model_name, &reg.routing_group);
        let mut w = self.lock_write();
        let spec = self.mutate_held(&mut w, true, |v, w| {
            if let Some(p) = v.partitions.get(&key) {
                if p.spec.block_size != reg.block_size {
                    return Err(RegistryError::BlockSizeMismatch {
                        model: reg.model_name.clone(),
                        group: reg.routing_group.clone(),
                        existing: p.spec.block_size,
                        requested: reg.block_size,
                    });
                }
            }
            if let Some(inst) = v.instances.get(&reg.instance_id) {
                if inst.key != key {
                    return Err(RegistryError::RegisteredForOther {
                        instance_id: reg.instance_id,
                        model: inst.key.model_name.clone(),
                        group: inst.key.routing_group.clone(),
                    });
                }
                if inst.listeners.contains_key(&reg.dp_rank) {
                    return Err(RegistryError::AlreadyRegistered {
                        instance_id: reg.instance_id,
                        dp_rank: reg.dp_rank,
                    });
                }
            }
            if !v.partitions.contains_key(&key) {
                self.limits.admit(v, &key, creator)?;
                tracing::info!(partition = %key, block_size = reg.block_size, "Creating new indexer");
                let part = self.create_partition(w, &key, reg.block_size, creator)?;
                v.partitions.insert(key.clone(), part);
            }
            let inst = v.instances.entry(reg.instance_id).or_insert_with(|| Instance {
                instance_id: reg.instance_id,
                key: key.clone(),
                block_size: reg.block_size,
                listeners: BTreeMap::new(),
            });
            let listener = Listener {
                endpoint: reg.endpoint.clone(),
                replay_endpoint: reg.replay_endpoint.clone(),
                // Read before the listener starts: all of its batches get later LSNs.
                registered_at_lsn: self.lsn_clock(),
                state: ListenerState {
                    status: ListenerStatus::Pending,
                    last_error: None,
                },
            };
            let spec = inst.listener_spec(reg.dp_rank, &listener);
            inst.listeners.insert(reg.dp_rank, listener);
            Ok(spec)
        })?;
        // Start the listener only once the registration is visible (and persisted): its first
        // batches — the start-up replay of what the publisher buffered — are submitted against
        // the view, and were refused ("instance is not registered") when it started earlier.
        // The write lock is still held, so no unregister can slip in between.
        let state = self.supervisor().start(&spec);
        self.mutate_held(&mut w, false, |v, _| {
            if let Some(l) = v
                .instances
                .get_mut(&reg.instance_id)
                .and_then(|i| i.listeners.get_mut(&reg.dp_rank))
            {
                l.state = state;
            }
            Ok(())
        })
    }

    /// Start-up registration from `--workers`: like [`Self::register`], but an identical
    /// registration restored from `registry.json` is accepted (a restart with the same flags),
    /// and its partition is created also past `--max-partitions` (a WARN: it is configured).
    pub fn register_initial(&self, reg: Registration) -> Result<(), RegistryError> {
        let view = self.view();
        if let Some(inst) = view.instances.get(&reg.instance_id) {
            let same_partition = inst.key == NamespaceKey::new(&reg.model_name, &reg.routing_group);
            if same_partition
                && inst.block_size == reg.block_size
                && inst
                    .listeners
                    .get(&reg.dp_rank)
                    .is_some_and(|l| l.endpoint == reg.endpoint)
            {
                return Ok(());
            }
        }
        self.register_as(reg, Creator::Configured)
    }

    /// `POST /unregister` (SERVICE.md §3.4). Each removal is handed to `log.drop_blocks` (which
    /// logs it and waits) before the registry changes; a failure leaves the registry as it was
    /// (its listeners started again, each after the watermark it was stopped at). Then
    /// `registry.json` is written without the worker, and with a partition left without workers
    /// moved from `partitions` to `dropping` (the intent, see [`drops`]). A failure to write it
    /// leaves the registry as it was too: the worker stays registered, its listeners start
    /// again after the watermarks they were stopped at, the file is written back as it was (the
    /// failed write may have replaced it), and its logged removal stands: the worker's blocks
    /// are gone, live and in the log, and only its events after those watermarks come in
    /// (as a restart of kvindex would resume them). A partition left without workers is then handed to
    /// `log.drop_partition` (which logs the drop and waits until it is on disk) and its index
    /// removed from the engine (also when logging the drop failed: the drop then stays pending,
    /// see [`drops`]); before the registry's write lock is released. Every unregister that gets
    /// this far also tries again the drops pending from before, with `log.drop_partition`; the
    /// drops logged leave `dropping` with one more write of the file (a failure of that write
    /// is only logged).
    ///
    /// Fencing: the listeners of the removed ranks are stopped first (none of their batches
    /// reaches the log afterwards: ZMQ needs no more), then the intake gate is closed around
    /// the removal and the publication of the registry without the worker: an HTTP / NATS
    /// event that read the registry before is logged before the removal (and removed by it),
    /// one that reads it after is refused (`instance N not found`, `no indexer for ...`) —
    /// unless it names a partition that still exists, see `docs/api.md`.
    pub fn unregister(
        &self,
        instance_id: u64,
        model_name: &str,
        routing_group: Option<&str>,
        dp_rank: Option<u32>,
        log: &RemovalLog<'_>,
    ) -> Result<UnregisterOutcome, RegistryError> {
        let outcome = {
            let mut w = self.lock_write();
            self.unregister_held(&mut w, instance_id, model_name, routing_group, dp_rank, log)
        };
        #[cfg(test)]
        self.gate.hooks.run(&self.gate.hooks.after_unregister);
        outcome
    }

    /// [`Self::unregister`] with the registry's write lock held.
    fn unregister_held(
        &self,
        locked: &mut Locked,
        instance_id: u64,
        model_name: &str,
        routing_group: Option<&str>,
        dp_rank: Option<u32>,
        log: &RemovalLog<'_>,
    ) -> Result<UnregisterOutcome, RegistryError> {
        // The view every step below starts from: the registry's write lock keeps it current.
        let before = self.view();
        let plan = unregister::plan(&before, instance_id, model_name, routing_group, dp_rank)?;
        // Stop the listeners first: nothing of theirs reaches the index after the removal.
        // Before the gate: stopping waits for their in-flight batches, which may be waiting
        // for the gate. Their watermarks are kept for a restart, should the removal fail.
        let stopped: Vec<(u32, Option<u64>)> = plan
            .ranks
            .iter()
            .map(|dp| (*dp, self.supervisor().stop_with_watermark(instance_id, *dp)))
            .collect();
        let fenced = self.gate.fence();
        if plan.removal.spec.block_size > 0 {
            if let Err(e) = (log.drop_blocks)(&plan.removal) {
                drop(fenced);
                self.restart_listeners(locked, instance_id, &stopped);
                return Err(RegistryError::Index(e));
            }
        }
        // Published while the gate is closed: events admitted after it see the worker gone.
        let mut next = (*before).clone();
        let outcome = unregister::apply(&mut next, &plan);
        let next = Arc::new(next);
        self.view.store(Arc::clone(&next));
        // The gate opens before `registry.json` is written (two fsyncs): events read the
        // published view, never the file, and the registry's write lock, still held, keeps
        // every other change of the registry out until the file is written. A crash before
        // then leaves the file with the worker and the log with its removal, as a crash
        // between the two did before.
        drop(fenced);
        // The intent to drop, written with the registry: a restart logs the drop of a key in
        // `dropping` (unless events of it were logged after this LSN: see `load`). Read once
        // the gate has drained and the view without the partitions is published: no entry of
        // theirs is logged from here on, until a creation logs their drop first.
        let decided_at = self.drop_log_next_lsn();
        for key in &outcome.dropped {
            locked.pending_drops.insert(key.clone(), decided_at);
        }
        if let Err(e) = self.persist(&next, &locked.pending_drops) {
            // The file and the error answered still have the worker: so must the registry,
            // with its listeners running (its removal is logged: it starts without blocks).
            // Events refused meanwhile were refused as those of an unknown worker.
            for key in &outcome.dropped {
                locked.pending_drops.remove(key);
            }
            self.view.store(Arc::clone(&before));
            // The failed write may have replaced the file all the same (the directory's fsync
            // failed after the rename): write the registry as it was again, so that a restart
            // does not read this drop as decided nor miss the worker.
            if let Err(undo) = self.persist(&before, &locked.pending_drops) {
                tracing::warn!(error = %undo, "registry.json not written back after a failed unregister: until the next write of it, it may lack the worker, and list its partition as dropping (a restart keeps such a partition when events of it were logged since)");
            }
            self.restart_listeners(locked, instance_id, &stopped);
            return Err(e);
        }
        // Still under the registry's write lock: a registration or `?block_size=` creating the
        // partition again waits for the old index to be gone, and gets a new, empty one (it
        // reused the old one, which this drop then removed with the new partition's events).
        let mut failed = None;
        let mut logged_any = false;
        for key in &outcome.dropped {
            tracing::info!(partition = %key, "last worker left; partition dropped");
            let logged = (log.drop_partition)(key).map_err(RegistryError::Index);
            if logged.is_ok() {
                // On disk: no longer pending.
                logged_any |= locked.pending_drops.remove(key);
            }
            // Otherwise it stays pending (and in `dropping`): a partition of this key is
            // created again only once the drop is logged (`create_partition`), as recovery
            // would replay the old entries into it. Removed even when the drop could not be
            // logged: the registry no longer has the partition, and one created again must not
            // get this index.
            let removed = self
                .engine
                .remove_namespace(key)
                .map_err(|e| RegistryError::Index(e.to_string()));
            if let Err(e) = logged.and(removed) {
                tracing::warn!(partition = %key, error = %e, "partition drop incomplete");
                failed.get_or_insert(e);
            }
        }
        // Drops that failed before: one more try, now that the log works again perhaps.
        logged_any |= locked
            .pending_drops
            .retry(log.drop_partition, &outcome.dropped);
        if logged_any {
            // Take the logged drops out of `dropping`. Should this fail, they stay listed: a
            // restart logs them again, which changes nothing (and a key created again by then
            // is listed as a partition, which `load` only clears from `dropping`).
            if let Err(e) = self.persist(&self.view(), &locked.pending_drops) {
                tracing::warn!(error = %e, "registry.json still lists logged partition drops as dropping; a restart logs them again");
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// The removal was refused: the registration stays, so its stopped listeners start again,
    /// each after the watermark it had when it was stopped (`stopped`: `(dp_rank, watermark)`).
    /// Not from scratch: that would replay the publisher's buffer from 0 over the live index
    /// (re-applying blocks the logged removal took away, when it was logged), while a restart
    /// of kvindex resumes after the logged watermark — the live index and the log would differ.
    fn restart_listeners(
        &self,
        locked: &mut Locked,
        instance_id: u64,
        stopped: &[(u32, Option<u64>)],
    ) {
        let _ = self.mutate_held(locked, false, |v, _| {
            if let Some(inst) = v.instances.get_mut(&instance_id) {
                let spec_of = inst.clone();
                for (dp, watermark) in stopped {
                    if let Some(l) = inst.listeners.get_mut(dp) {
                        tracing::info!(instance_id, dp_rank = dp, resume_after = ?watermark, "the removal failed: restarting the listener where it stopped");
                        l.state = self
                            .supervisor()
                            .restart(&spec_of.listener_spec(*dp, l), *watermark);
                    }
                }
            }
            Ok(())
        });
    }

    /// Create a partition if it does not exist, for peer recovery: never refused (see
    /// [`Creator::PeerRecovery`]); its map grows as needed.
    pub fn ensure_partition(
        &self,
        model: &str,
        group: &str,
        block_size: u32,
    ) -> Result<Partition, RegistryError> {
        self.ensure_partition_as(model, group, block_size, Creator::PeerRecovery)
    }

    /// [`Self::ensure_partition`] for events (`POST /events?block_size=`, the NATS
    /// `Kvindex-Block-Size` header): a missing partition is created only while fewer than
    /// `limit` partitions have no registered worker ([`RegistryError::PartitionLimit`]) and
    /// fewer than `--max-partitions` exist ([`RegistryError::TooManyPartitions`]); its map
    /// grows as needed.
    pub fn ensure_partition_for_events(
        &self,
        model: &str,
        group: &str,
        block_size: u32,
        limit: usize,
    ) -> Result<Partition, RegistryError> {
        let creator = Creator::Events {
            max_event_partitions: limit,
        };
        self.ensure_partition_as(model, group, block_size, creator)
    }

    fn ensure_partition_as(
        &self,
        model: &str,
        group: &str,
        block_size: u32,
        creator: Creator,
    ) -> Result<Partition, RegistryError> {
        let key = NamespaceKey::new(model, group);
        if let Some(p) = self.view().partitions.get(&key) {
            if p.spec.block_size == block_size {
                return Ok(p.clone());
            }
        }
        let mut w = self.lock_write();
        self.mutate_held(&mut w, true, |v, w| {
            if let Some(p) = v.partitions.get(&key) {
                if p.spec.block_size != block_size {
                    return Err(RegistryError::BlockSizeMismatch {
                        model: model.to_owned(),
                        group: group.to_owned(),
                        existing: p.spec.block_size,
                        requested: block_size,
                    });
                }
                return Ok(p.clone());
            }
            self.limits.admit(v, &key, creator)?;
            tracing::info!(partition = %key, block_size, "Creating new indexer");
            let p = self.create_partition(w, &key, block_size, creator)?;
            v.partitions.insert(key.clone(), p.clone());
            Ok(p)
        })
    }

    /// Record a listener's new state (called by the ZMQ listeners). Unknown listeners are
    /// ignored (the registration may have just gone).
    pub fn set_listener_status(&self, instance_id: u64, dp_rank: u32, state: ListenerState) {
        let _ = self.mutate(false, |v| {
            if let Some(l) = v
                .instances
                .get_mut(&instance_id)
                .and_then(|i| i.listeners.get_mut(&dp_rank))
            {
                l.state = state;
            }
            Ok(())
        });
    }

    fn listener_op(
        &self,
        instance_id: u64,
        dp_rank: u32,
        pause: bool,
    ) -> Result<(), RegistryError> {
        self.mutate(false, |v| {
            let inst = v
                .instances
                .get_mut(&instance_id)
                .ok_or(RegistryError::InstanceNotFound(instance_id))?;
            let spec_of = inst.clone();
            let l = inst
                .listeners
                .get_mut(&dp_rank)
                .ok_or(RegistryError::DpRankNotFound {
                    instance_id,
                    dp_rank,
                })?;
            // The supervisor's live state when it tracks one (the stored one may lag).
            if let Some((live, _)) = self.supervisor().live(instance_id, dp_rank) {
                l.state = live;
            }
            let status = l.state.status.as_str();
            if pause {
                if l.state.status != ListenerStatus::Active {
                    return Err(RegistryError::CannotPause {
                        instance_id,
                        dp_rank,
                        status,
                    });
                }
                l.state = self.supervisor().pause(instance_id, dp_rank);
            } else {
                if l.state.status != ListenerStatus::Paused {
                    return Err(RegistryError::CannotResume {
                        instance_id,
                        dp_rank,
                        status,
                    });
                }
                l.state = self.supervisor().resume(&spec_of.listener_spec(dp_rank, l));
            }
            Ok(())
        })
    }

    /// `POST /test/pause_listener`.
    pub fn pause_listener(&self, instance_id: u64, dp_rank: u32) -> Result<(), RegistryError> {
        self.listener_op(instance_id, dp_rank, true)
    }

    /// `POST /test/resume_listener`.
    pub fn resume_listener(&self, instance_id: u64, dp_rank: u32) -> Result<(), RegistryError> {
        self.listener_op(instance_id, dp_rank, false)
    }

    /// `POST /register_peer` (idempotent, not validated).
    pub fn add_peer(&self, url: &str) -> Result<(), RegistryError> {
        if self.view().peers.iter().any(|p| p == url) {
            return Ok(());
        }
        self.mutate(true, |v| {
            if !v.peers.iter().any(|p| p == url) {
                v.peers.push(url.to_owned());
            }
            Ok(())
        })
    }

    /// `POST /deregister_peer`.
    pub fn remove_peer(&self, url: &str) -> Result<(), RegistryError> {
        self.mutate(true, |v| {
            let before = v.peers.len();
            v.peers.retain(|p| p != url);
            if v.peers.len() == before {
                Err(RegistryError::PeerNotFound)
            } else {
                Ok(())
            }
        })
    }

    /// A listener's live state and details from the supervisor, if it tracks them.
    pub fn live_listener(
        &self,
        instance_id: u64,
        dp_rank: u32,
    ) -> Option<(ListenerState, crate::listeners::ListenerDetails)> {
        self.supervisor().live(instance_id, dp_rank)
    }

    /// Stop every listener (shutdown).
    pub fn shutdown_listeners(&self) {
        self.supervisor().shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners::NoListeners;

    /// An engine with one event thread and short queues, as the registry tests use it.
    fn small_engine() -> Engine {
        Engine::new(kvindex_engine::EngineConfig {
            event_threads: 1,
            queue_capacity: 64,
            ..kvindex_engine::EngineConfig::default()
        })
    }

    fn reg(id: u64, model: &str, group: &str, bs: u32, dp: u32) -> Registration {
        Registration {
            instance_id: id,
            model_name: model.into(),
            routing_group: group.into(),
            block_size: bs,
            dp_rank: dp,
            endpoint: "tcp://127.0.0.1:5557".into(),
            replay_endpoint: None,
        }
    }

    fn registry() -> Partitions {
        let engine = small_engine();
        Partitions::new(engine, None, Arc::new(NoListeners))
    }

    #[test]
    fn conflicts_use_dynamos_wording() {
        let p = registry();
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        assert_eq!(
            p.register(reg(10, "m", "default", 4, 0))
                .unwrap_err()
                .to_string(),
            "instance 10 dp_rank 0 already registered"
        );
        assert_eq!(
            p.register(reg(10, "m2", "default", 4, 0))
                .unwrap_err()
                .to_string(),
            "instance 10 is already registered for model=m routing_group=default"
        );
        assert_eq!(
            p.register(reg(11, "m", "default", 8, 0))
                .unwrap_err()
                .to_string(),
            "block_size mismatch for model=m routing_group=default: existing=4, requested=8"
        );
    }

    #[test]
    fn unregister_without_group_ignores_dp_rank_and_drops_the_partition() {
        let p = registry();
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        p.register(reg(10, "m", "default", 4, 1)).unwrap();
        let calls = Mutex::new(Vec::new());
        let out = p
            .unregister(
                10,
                "m",
                None,
                Some(1),
                &RemovalLog {
                    drop_blocks: &|r| {
                        calls.lock().unwrap().push(r.dp_rank);
                        Ok(())
                    },
                    drop_partition: &|_| Ok(()),
                },
            )
            .unwrap();
        assert_eq!(calls.into_inner().unwrap(), vec![None]);
        assert_eq!(out.dropped.len(), 1);
        assert!(p.view().instances.is_empty());
        assert!(p.view().partition("m", "default").is_err());
    }

    /// Records the listener starts, stops and restarts; every listener is stopped at
    /// [`STOPPED_AT`], and `.1` has the `resume_after` of every restart.
    #[derive(Default)]
    struct Recording(
        Mutex<Vec<(&'static str, u64, u32)>>,
        Mutex<Vec<Option<u64>>>,
    );

    /// The watermark [`Recording`] stops every listener at.
    const STOPPED_AT: Option<u64> = Some(41);

    impl ListenerSupervisor for Recording {
        fn stop_with_watermark(&self, instance_id: u64, dp_rank: u32) -> Option<u64> {
            self.stop(instance_id, dp_rank);
            STOPPED_AT
        }
        fn restart(&self, spec: &ListenerSpec, resume_after: Option<u64>) -> ListenerState {
            self.0
                .lock()
                .unwrap()
                .push(("restart", spec.instance_id, spec.dp_rank));
            self.1.lock().unwrap().push(resume_after);
            ListenerState {
                status: ListenerStatus::Active,
                last_error: None,
            }
        }
        fn start(&self, spec: &ListenerSpec) -> ListenerState {
            self.0
                .lock()
                .unwrap()
                .push(("start", spec.instance_id, spec.dp_rank));
            ListenerState {
                status: ListenerStatus::Active,
                last_error: None,
            }
        }
        fn stop(&self, instance_id: u64, dp_rank: u32) {
            self.0.lock().unwrap().push(("stop", instance_id, dp_rank));
        }
        fn pause(&self, _instance_id: u64, _dp_rank: u32) -> ListenerState {
            unreachable!()
        }
        fn resume(&self, _spec: &ListenerSpec) -> ListenerState {
            unreachable!()
        }
    }

    const LOGGED: RemovalLog<'static> = RemovalLog {
        drop_blocks: &|_| Ok(()),
        drop_partition: &|_| Ok(()),
    };

    /// `registry.json` cannot be written after the removal was logged: the error is answered,
    /// and the registry keeps the worker, with its listener running again (the file has it).
    #[test]
    fn an_unwritable_registry_file_keeps_the_worker_and_restarts_its_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let supervisor = Arc::new(Recording::default());
        let engine = small_engine();
        let p = Partitions::new(engine, Some(&data), supervisor.clone());
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        std::fs::remove_dir_all(&data).unwrap();
        let e = p
            .unregister(10, "m", Some("default"), None, &LOGGED)
            .unwrap_err();
        assert!(matches!(e, RegistryError::File { .. }), "{e}");
        let view = p.view();
        assert!(view.instances.contains_key(&10));
        assert!(view.partition("m", "default").is_ok());
        assert_eq!(
            view.instances[&10].listeners[&0].state.status,
            ListenerStatus::Active
        );
        assert_restarted_where_it_stopped(&supervisor);
        assert!(p
            .engine
            .namespace(&NamespaceKey::new("m", "default"))
            .is_some());
    }

    /// The listener of instance 10 rank 0 was started, stopped by the unregister, and started
    /// again after the watermark it was stopped at: not from scratch, which would replay the
    /// publisher's buffer from 0 over the live index while a restart of kvindex resumes after
    /// the logged watermark.
    fn assert_restarted_where_it_stopped(supervisor: &Recording) {
        assert_eq!(
            *supervisor.0.lock().unwrap(),
            vec![("start", 10, 0), ("stop", 10, 0), ("restart", 10, 0)],
            "the listener was not started again, or not as a restart"
        );
        assert_eq!(
            *supervisor.1.lock().unwrap(),
            vec![STOPPED_AT],
            "the listener was not restarted after the watermark it was stopped at"
        );
    }

    /// Logging the removal fails: the worker stays, and its listener goes on after the
    /// watermark it was stopped at.
    #[test]
    fn a_removal_that_cannot_be_logged_restarts_the_listeners_where_they_stopped() {
        let supervisor = Arc::new(Recording::default());
        let p = Partitions::new(small_engine(), None, supervisor.clone());
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        let e = p
            .unregister(
                10,
                "m",
                Some("default"),
                None,
                &RemovalLog {
                    drop_blocks: &|_| Err("disk full".into()),
                    drop_partition: &|_| Ok(()),
                },
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        let view = p.view();
        assert_eq!(
            view.instances[&10].listeners[&0].state.status,
            ListenerStatus::Active
        );
        assert_restarted_where_it_stopped(&supervisor);
    }

    /// Logging a partition's drop fails: the partition is gone from the registry all the same,
    /// and so is its index, so a registration creating it again (once the drop is logged) gets
    /// a new one (here with another block size, which the old index would refuse).
    #[test]
    fn an_unlogged_partition_drop_still_removes_its_index() {
        let p = registry();
        FakeDropLog::new(&p, false).install(&p);
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        let e = p
            .unregister(
                10,
                "m",
                Some("default"),
                None,
                &RemovalLog {
                    drop_blocks: &|_| Ok(()),
                    drop_partition: &|_| Err("disk full".into()),
                },
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert!(p.view().partition("m", "default").is_err());
        assert!(
            p.engine
                .namespace(&NamespaceKey::new("m", "default"))
                .is_none(),
            "the dropped partition's index stayed"
        );
        p.register(reg(11, "m", "default", 8, 0)).unwrap();
        let view = p.view();
        let ns = view.partition("m", "default").unwrap().namespace.as_ref();
        assert_eq!(ns.map(|n| n.block_size()), Some(8));
    }

    /// A fake event log for partition drops: records the keys it is asked to log, and fails
    /// while `failing` is set. Also records whether the key's index existed at that moment.
    #[derive(Clone)]
    struct FakeDropLog {
        engine: Engine,
        failing: Arc<std::sync::atomic::AtomicBool>,
        calls: Arc<Mutex<Vec<(NamespaceKey, bool)>>>,
    }

    impl FakeDropLog {
        fn new(p: &Partitions, failing: bool) -> Self {
            Self {
                engine: p.engine.clone(),
                failing: Arc::new(std::sync::atomic::AtomicBool::new(failing)),
                calls: Arc::default(),
            }
        }

        fn fail(&self, failing: bool) {
            self.failing
                .store(failing, std::sync::atomic::Ordering::SeqCst);
        }

        fn log(&self, key: &NamespaceKey) -> Result<(), String> {
            let index_exists = self.engine.namespace(key).is_some();
            self.calls.lock().unwrap().push((key.clone(), index_exists));
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                Err("disk full".into())
            } else {
                Ok(())
            }
        }

        fn install(&self, p: &Partitions) {
            p.set_drop_log(Arc::new(self.clone()));
        }

        fn take_calls(&self) -> Vec<(NamespaceKey, bool)> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl DropLogger for FakeDropLog {
        fn log_drop(&self, key: &NamespaceKey) -> Result<(), String> {
            self.log(key)
        }
    }

    fn pending(p: &Partitions, key: &NamespaceKey) -> bool {
        p.lock_write().pending_drops.contains(key)
    }

    const UNLOGGED_DROP: RemovalLog<'static> = RemovalLog {
        drop_blocks: &|_| Ok(()),
        drop_partition: &|_| Err("disk full".into()),
    };

    /// A registry with a failing drop log (`FakeDropLog`, failing) whose partition `m.default`
    /// lost its last worker, so that its drop is pending.
    fn registry_with_a_pending_drop() -> (Partitions, FakeDropLog, NamespaceKey) {
        let p = registry();
        let log = FakeDropLog::new(&p, true);
        log.install(&p);
        let key = NamespaceKey::new("m", "default");
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        p.unregister(10, "m", Some("default"), None, &UNLOGGED_DROP)
            .unwrap_err();
        (p, log, key)
    }

    /// The drop of a partition could not be logged: a registration creating a partition of
    /// the same key (and block size, whose index would get the old entries at the next
    /// recovery) first logs the drop, before the new index exists; while that fails, it is
    /// refused (503) and creates nothing.
    #[test]
    fn a_partition_whose_drop_is_not_logged_is_created_again_only_once_it_is() {
        let (p, log, key) = registry_with_a_pending_drop();
        assert!(pending(&p, &key));

        let e = p.register(reg(11, "m", "default", 4, 0)).unwrap_err();
        assert!(matches!(e, RegistryError::DropNotLogged { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "partition model=m routing_group=default cannot be created: the drop of its previous \
             partition is not logged yet and logging it failed: disk full"
        );
        assert_eq!(
            crate::http::errors::ApiError::from(e).status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(log.take_calls(), vec![(key.clone(), false)]);
        let view = p.view();
        assert!(view.partition("m", "default").is_err());
        assert!(!view.instances.contains_key(&11));
        assert!(p.engine.namespace(&key).is_none(), "an index was created");
        assert!(pending(&p, &key));

        // The log works again: the drop is logged first, with no index of the key yet.
        log.fail(false);
        p.register(reg(11, "m", "default", 4, 0)).unwrap();
        assert_eq!(log.take_calls(), vec![(key.clone(), false)]);
        assert!(!pending(&p, &key));
        assert!(p.view().partition("m", "default").is_ok());
        assert!(p.engine.namespace(&key).is_some());
        // Logged once: the next creation of the key has nothing to log.
        p.unregister(11, "m", Some("default"), None, &LOGGED)
            .unwrap();
        p.register(reg(12, "m", "default", 4, 0)).unwrap();
        assert_eq!(log.take_calls(), vec![]);
    }

    /// The same through `ensure_partition` (`POST /events?block_size=`, the NATS
    /// `Kvindex-Block-Size` header, peer recovery).
    #[test]
    fn ensure_partition_logs_a_pending_drop_before_creating_the_partition() {
        let (p, log, key) = registry_with_a_pending_drop();

        let e = p.ensure_partition("m", "default", 4).err().unwrap();
        assert!(matches!(e, RegistryError::DropNotLogged { .. }), "{e}");
        assert!(p.view().partition("m", "default").is_err());
        assert!(p.engine.namespace(&key).is_none());

        log.fail(false);
        let part = p.ensure_partition("m", "default", 4).unwrap();
        assert_eq!(part.spec.block_size, 4);
        assert_eq!(
            log.take_calls(),
            vec![(key.clone(), false), (key.clone(), false)]
        );
        assert!(!pending(&p, &key));
    }

    /// Without a drop log (none set), a pending drop cannot be logged: the creation is refused.
    #[test]
    fn a_pending_drop_without_a_drop_log_refuses_the_creation() {
        let p = registry();
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        p.unregister(10, "m", Some("default"), None, &UNLOGGED_DROP)
            .unwrap_err();
        let e = p.register(reg(10, "m", "default", 8, 0)).unwrap_err();
        assert!(matches!(e, RegistryError::DropNotLogged { .. }), "{e}");
    }

    /// A later unregister that drops a partition tries the pending drops again with its log.
    #[test]
    fn a_later_partition_drop_logs_the_pending_ones_too() {
        let p = registry();
        let log = FakeDropLog::new(&p, true);
        log.install(&p);
        let (a, b) = (
            NamespaceKey::new("a", "default"),
            NamespaceKey::new("b", "default"),
        );
        p.register(reg(10, "a", "default", 4, 0)).unwrap();
        p.register(reg(20, "b", "default", 4, 0)).unwrap();
        p.unregister(10, "a", Some("default"), None, &UNLOGGED_DROP)
            .unwrap_err();
        assert!(pending(&p, &a));

        let logged = Mutex::new(Vec::new());
        p.unregister(
            20,
            "b",
            Some("default"),
            None,
            &RemovalLog {
                drop_blocks: &|_| Ok(()),
                drop_partition: &|k| {
                    logged.lock().unwrap().push(k.clone());
                    Ok(())
                },
            },
        )
        .unwrap();
        assert_eq!(logged.into_inner().unwrap(), vec![b, a.clone()]);
        assert!(!pending(&p, &a));
        // Nothing left to log before `a` is created again (the registry's log still fails).
        p.register(reg(11, "a", "default", 4, 0)).unwrap();
        assert_eq!(log.take_calls(), vec![]);
    }

    /// `load` with a `registry.json`: a namespace recovery rebuilt that the file does not list,
    /// and that is not in its `dropping`, is no dropped partition (events appended by `kvindex
    /// replay import`, or a partition left out of a hand-edited file): kept when it holds
    /// blocks, no drop logged; an empty one is dropped, its drop logged (and pending, listed in
    /// `dropping`, when that fails).
    #[test]
    fn load_adopts_unlisted_namespaces_that_hold_blocks_and_drops_empty_ones() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine();
        let listed = NamespaceKey::new("kept", "default");
        {
            // Writes `registry.json` with the one partition.
            let p = Partitions::new(engine.clone(), Some(dir.path()), Arc::new(NoListeners));
            p.load().unwrap();
            p.ensure_partition("kept", "default", 4).unwrap();
        }
        // What recovery rebuilt: the listed partition, an imported one holding a block, and an
        // empty one.
        let (full, empty) = (
            NamespaceKey::new("m", "default"),
            NamespaceKey::new("e", "default"),
        );
        let ns = engine.create_namespace(full.clone(), 4).unwrap();
        ns.apply(crate::test_support::one_block_store(9, 1, 109))
            .unwrap();
        ns.flush().unwrap();
        assert!(ns.current_size() > 0);
        engine.create_namespace(empty.clone(), 4).unwrap();

        let p = Partitions::new(engine.clone(), Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, false);
        log.install(&p);
        p.load().unwrap();
        assert_eq!(log.take_calls(), vec![(empty.clone(), true)]);
        let view = p.view();
        let mut keys: Vec<_> = view.partitions.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, vec![listed.clone(), full.clone()]);
        assert!(
            engine.namespace(&full).is_some(),
            "the imported blocks are gone"
        );
        assert!(engine.namespace(&empty).is_none());
        assert!(!pending(&p, &empty));
        // From now on `registry.json` lists it.
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![listed, full.clone()]);
        assert!(file_keys(&file, "dropping").is_empty());

        // The same with a log that fails: the empty one is removed all the same, and pending,
        // in `dropping` on disk; the one holding blocks is kept.
        engine.create_namespace(empty.clone(), 4).unwrap();
        let p = Partitions::new(engine.clone(), Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, true);
        log.install(&p);
        p.load().unwrap();
        assert_eq!(log.take_calls(), vec![(empty.clone(), true)]);
        assert!(p.view().partition("m", "default").is_ok());
        assert!(p.view().partition("e", "default").is_err());
        assert!(engine.namespace(&empty).is_none());
        assert!(pending(&p, &empty));
        assert_eq!(
            file_keys(&read_file(dir.path()), "dropping"),
            vec![empty.clone()]
        );
        let e = p.ensure_partition("e", "default", 4).err().unwrap();
        assert!(matches!(e, RegistryError::DropNotLogged { .. }), "{e}");
    }

    fn read_file(dir: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join(REGISTRY_FILE)).unwrap()).unwrap()
    }

    /// The keys of `registry.json`'s `partitions` or `dropping`, in file order (none when the
    /// list is absent).
    fn file_keys(file: &serde_json::Value, list: &str) -> Vec<NamespaceKey> {
        file.get(list)
            .and_then(|l| l.as_array())
            .map(|l| {
                l.iter()
                    .map(|p| {
                        NamespaceKey::new(
                            p["model_name"].as_str().unwrap(),
                            p["routing_group"].as_str().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A registry over a real event log in `dir`, wired as `kvindex serve` wires it (drop log,
    /// LSN clock), loaded.
    fn open_durable(
        dir: &Path,
        fsync: kvindex_persistence::FsyncPolicy,
    ) -> (Arc<kvindex_persistence::DurableIndex>, Partitions) {
        let engine = small_engine();
        let mut config = kvindex_persistence::DurableConfig::default();
        config.log.fsync = fsync;
        let (durable, _) =
            kvindex_persistence::DurableIndex::open(dir, config, engine.clone()).unwrap();
        let durable = Arc::new(durable);
        let p = Partitions::new(engine, Some(dir), Arc::new(NoListeners));
        p.set_drop_log(durable_drop_log(&durable));
        p.load().unwrap();
        (durable, p)
    }

    /// Stop: the registry goes, the log is synced and closed.
    fn close_durable(durable: Arc<kvindex_persistence::DurableIndex>, p: Partitions) {
        drop(p);
        Arc::into_inner(durable).unwrap().close().unwrap();
    }

    /// Log and apply `worker`'s store of the block of `TOKENS` in `m/default`.
    fn store_block(durable: &kvindex_persistence::DurableIndex, p: &Partitions, worker: u64) {
        let spec = Arc::clone(&p.view().partition("m", "default").unwrap().spec);
        durable
            .submit(
                &spec,
                worker,
                crate::test_support::one_block_store(worker, worker, 100 + worker),
            )
            .unwrap()
            .wait()
            .unwrap();
    }

    /// Workers holding the block of `TOKENS` in `m/default`, as the engine has it.
    fn holders(durable: &kvindex_persistence::DurableIndex) -> Vec<u64> {
        let Some(ns) = durable
            .engine()
            .namespace(&NamespaceKey::new("m", "default"))
        else {
            return Vec::new();
        };
        ns.flush().unwrap();
        let mut w: Vec<u64> = ns
            .find_matches_for_tokens(
                &crate::test_support::TOKENS,
                &kvindex_engine::hashing::HashOptions::default(),
            )
            .sorted()
            .into_iter()
            .map(|(w, _): (kvindex_engine::WorkerWithDpRank, _)| w.worker_id)
            .collect();
        w.sort();
        w
    }

    /// `/unregister` of `instance_id` in `m/default` with the real log: the removal logged, the
    /// drop logged (`log_drop`) or, when `drop_fails`, not.
    fn unregister_real(
        durable: &kvindex_persistence::DurableIndex,
        p: &Partitions,
        instance_id: u64,
        drop_fails: bool,
    ) -> Result<UnregisterOutcome, RegistryError> {
        p.unregister(
            instance_id,
            "m",
            Some("default"),
            None,
            &RemovalLog {
                drop_blocks: &|r| {
                    durable
                        .remove_worker(&r.spec, r.worker_id)
                        .and_then(|t| t.wait())
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                },
                drop_partition: &|k| {
                    if drop_fails {
                        Err("disk full".into())
                    } else {
                        log_drop(durable, k)
                    }
                },
            },
        )
    }

    /// A partition whose last worker left is in `registry.json`'s `dropping` until its drop is
    /// logged; when that never happened (the log failed, then the process stopped), the next
    /// start-up logs the drop: the old partition does not come back, and its block (here one
    /// of a worker never registered, which no removal covers) does not land in a partition
    /// created again under the key, also after one more restart.
    #[test]
    fn a_dropping_key_whose_drop_was_never_logged_is_dropped_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let key = NamespaceKey::new("m", "default");
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        p.register(reg(1, "m", "default", 4, 0)).unwrap();
        store_block(&durable, &p, 9);
        store_block(&durable, &p, 1);
        assert_eq!(holders(&durable), vec![1, 9]);
        let e = unregister_real(&durable, &p, 1, true).unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert!(pending(&p, &key));
        let file = read_file(dir.path());
        assert!(file_keys(&file, "partitions").is_empty());
        assert_eq!(file_keys(&file, "dropping"), vec![key.clone()]);
        assert!(file["dropping"][0]["dropped_at_lsn"].as_u64().is_some());
        close_durable(durable, p);

        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert!(
            p.view().partition("m", "default").is_err(),
            "the dropped partition came back"
        );
        assert_eq!(holders(&durable), Vec::<u64>::new());
        assert!(!pending(&p, &key));
        assert!(file_keys(&read_file(dir.path()), "dropping").is_empty());
        p.register(reg(2, "m", "default", 4, 0)).unwrap();
        store_block(&durable, &p, 2);
        assert_eq!(holders(&durable), vec![2]);
        close_durable(durable, p);

        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert!(p.view().instances.contains_key(&2));
        assert_eq!(
            holders(&durable),
            vec![2],
            "the dropped partition's block landed in the new one"
        );
        close_durable(durable, p);
    }

    /// A key listed both in `partitions` and in `dropping` was created again after its drop
    /// was logged (a creation logs a pending drop first; a failed write took it out of
    /// `dropping` late): `load` keeps the partition, logs no drop, and clears `dropping`.
    #[test]
    fn a_key_in_dropping_and_in_partitions_is_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine();
        let key = NamespaceKey::new("m", "default");
        std::fs::write(
            dir.path().join(REGISTRY_FILE),
            serde_json::to_vec(&serde_json::json!({
                "version": 1,
                "partitions": [{"model_name": "m", "routing_group": "default", "block_size": 4}],
                "instances": [],
                "peers": [],
                "dropping": [{"model_name": "m", "routing_group": "default", "dropped_at_lsn": 1}],
            }))
            .unwrap(),
        )
        .unwrap();
        let ns = engine.create_namespace(key.clone(), 4).unwrap();
        ns.apply(crate::test_support::one_block_store(9, 1, 109))
            .unwrap();
        ns.flush().unwrap();
        let p = Partitions::new(engine.clone(), Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, false);
        log.install(&p);
        p.load().unwrap();
        assert_eq!(log.take_calls(), vec![]);
        assert!(p.view().partition("m", "default").is_ok());
        assert!(engine.namespace(&key).is_some_and(|n| n.current_size() > 0));
        assert!(!pending(&p, &key));
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![key]);
        assert!(file.get("dropping").is_none(), "{file}");
    }

    /// `registry.json` written before `dropping` existed loads (none), and unknown fields are
    /// ignored, as the loaders before this one ignore `dropping`.
    #[test]
    fn registry_json_without_dropping_loads_and_unknown_fields_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(REGISTRY_FILE),
            serde_json::to_vec(&serde_json::json!({
                "version": 1,
                "partitions": [{"model_name": "m", "routing_group": "default", "block_size": 4}],
                "instances": [{"instance_id": 1, "model_name": "m", "routing_group": "default",
                    "block_size": 4, "listeners": [{"dp_rank": 0, "endpoint": "tcp://127.0.0.1:5557"}]}],
                "peers": ["http://peer:8090"],
                "from_a_later_build": {"x": 1},
            }))
            .unwrap(),
        )
        .unwrap();
        let engine = small_engine();
        let p = Partitions::new(engine, Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, false);
        log.install(&p);
        p.load().unwrap();
        assert_eq!(log.take_calls(), vec![]);
        let view = p.view();
        assert!(view.partition("m", "default").is_ok());
        assert!(view.instances.contains_key(&1));
        assert_eq!(view.peers, vec!["http://peer:8090".to_owned()]);
    }

    /// `registry.json`'s write fails after its rename (the directory's fsync): the unregister
    /// answers the error and keeps the worker, and writes the file back as it was, so that it
    /// does not list the partition as dropping.
    #[test]
    fn a_failed_unregister_writes_registry_json_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = NamespaceKey::new("m", "default");
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        p.register(reg(1, "m", "default", 4, 0)).unwrap();
        p.write_faults
            .lock()
            .unwrap()
            .push_back(Some(WriteFault::AfterRename));
        let e = unregister_real(&durable, &p, 1, false).unwrap_err();
        assert!(matches!(e, RegistryError::File { .. }), "{e}");
        assert!(p.view().instances.contains_key(&1));
        assert!(!pending(&p, &key));
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![key]);
        assert!(file.get("dropping").is_none(), "{file}");
        assert_eq!(file["instances"][0]["instance_id"], 1);
        close_durable(durable, p);
    }

    /// The same when writing the file back fails too: the file lists the partition as dropping
    /// while the service keeps it, with the worker, whose events go on. A restart then finds
    /// events of the partition logged after its drop was decided: the drop was withdrawn, and
    /// the partition is kept with its blocks (adopted: the registration is lost with the file).
    #[test]
    fn a_withdrawn_drop_is_not_logged_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let key = NamespaceKey::new("m", "default");
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        p.register(reg(1, "m", "default", 4, 0)).unwrap();
        p.write_faults.lock().unwrap().extend([
            Some(WriteFault::AfterRename),
            Some(WriteFault::BeforeRename),
        ]);
        let e = unregister_real(&durable, &p, 1, false).unwrap_err();
        assert!(matches!(e, RegistryError::File { .. }), "{e}");
        assert!(p.view().instances.contains_key(&1));
        assert!(!pending(&p, &key));
        // The file the failed writes left: the partition being dropped.
        let file = read_file(dir.path());
        assert!(file_keys(&file, "partitions").is_empty(), "{file}");
        assert_eq!(file_keys(&file, "dropping"), vec![key.clone()]);
        // The worker goes on.
        store_block(&durable, &p, 1);
        assert_eq!(holders(&durable), vec![1]);
        close_durable(durable, p);

        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert!(
            p.view().partition("m", "default").is_ok(),
            "the partition was dropped"
        );
        assert_eq!(holders(&durable), vec![1], "its events were dropped");
        assert!(!pending(&p, &key));
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![key]);
        assert!(file.get("dropping").is_none(), "{file}");
        close_durable(durable, p);
    }

    /// `registry.json`'s `dropping` follows the pending drops: a drop that cannot be logged is
    /// listed (and stays so while a creation of the key is refused), a creation that logs it
    /// lists the key as a partition instead, and a drop logged at once leaves no trace.
    #[test]
    fn registry_json_lists_the_pending_drops_as_dropping() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine();
        let p = Partitions::new(engine, Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, true);
        log.install(&p);
        p.load().unwrap();
        let key = NamespaceKey::new("m", "default");
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        p.unregister(10, "m", Some("default"), None, &UNLOGGED_DROP)
            .unwrap_err();
        let file = read_file(dir.path());
        assert!(file_keys(&file, "partitions").is_empty());
        assert_eq!(file_keys(&file, "dropping"), vec![key.clone()]);

        p.register(reg(11, "m", "default", 4, 0)).unwrap_err();
        assert_eq!(
            file_keys(&read_file(dir.path()), "dropping"),
            vec![key.clone()]
        );

        log.fail(false);
        p.register(reg(11, "m", "default", 4, 0)).unwrap();
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![key.clone()]);
        assert!(file.get("dropping").is_none(), "{file}");

        p.unregister(11, "m", Some("default"), None, &LOGGED)
            .unwrap();
        let file = read_file(dir.path());
        assert!(file_keys(&file, "partitions").is_empty());
        assert!(file.get("dropping").is_none(), "{file}");
    }

    /// The drop is logged, but the write taking it out of `dropping` fails: the unregister
    /// succeeds all the same, the key stays listed, and a restart logs the drop again, which
    /// changes nothing; a partition created again under the key meanwhile is listed as a
    /// partition and no longer as dropping.
    #[test]
    fn a_logged_drop_left_in_dropping_is_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let key = NamespaceKey::new("m", "default");
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        p.register(reg(1, "m", "default", 4, 0)).unwrap();
        store_block(&durable, &p, 1);
        p.write_faults
            .lock()
            .unwrap()
            .extend([None, Some(WriteFault::BeforeRename)]);
        let out = unregister_real(&durable, &p, 1, false).unwrap();
        assert_eq!(out.dropped, vec![key.clone()]);
        assert!(!pending(&p, &key));
        assert_eq!(
            file_keys(&read_file(dir.path()), "dropping"),
            vec![key.clone()]
        );
        close_durable(durable, p);

        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert!(p.view().partition("m", "default").is_err());
        assert_eq!(holders(&durable), Vec::<u64>::new());
        assert!(file_keys(&read_file(dir.path()), "dropping").is_empty());
        p.register(reg(2, "m", "default", 4, 0)).unwrap();
        store_block(&durable, &p, 2);
        close_durable(durable, p);

        // Left in `dropping` again (the clearing write fails), then created again: the
        // creation's write lists it as a partition only.
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert_eq!(holders(&durable), vec![2]);
        p.write_faults
            .lock()
            .unwrap()
            .extend([None, Some(WriteFault::BeforeRename)]);
        unregister_real(&durable, &p, 2, false).unwrap();
        assert_eq!(
            file_keys(&read_file(dir.path()), "dropping"),
            vec![key.clone()]
        );
        p.register(reg(3, "m", "default", 4, 0)).unwrap();
        store_block(&durable, &p, 3);
        let file = read_file(dir.path());
        assert_eq!(file_keys(&file, "partitions"), vec![key]);
        assert!(file.get("dropping").is_none(), "{file}");
        close_durable(durable, p);
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Always);
        assert_eq!(holders(&durable), vec![3]);
        close_durable(durable, p);
    }

    /// A drop logged by `log_drop` is on disk when it returns, also under `--fsync never`
    /// (whose append tickets return once the entry is written, not synced).
    #[test]
    fn log_drop_waits_until_the_drop_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let (durable, p) = open_durable(dir.path(), kvindex_persistence::FsyncPolicy::Never);
        p.ensure_partition("m", "default", 4).unwrap();
        store_block(&durable, &p, 1);
        let log = durable.log();
        let drop_lsn = log.next_lsn();
        log_drop(&durable, &NamespaceKey::new("m", "default")).unwrap();
        assert_eq!(log.next_lsn(), drop_lsn + 1);
        assert!(
            log.synced_lsn() > drop_lsn,
            "the drop (LSN {drop_lsn}) is not synced: synced below {}",
            log.synced_lsn()
        );
        close_durable(durable, p);
    }

    /// Without `registry.json` (a directory written by `kvindex replay import`), a recovered
    /// namespace holding blocks is adopted; an empty one is dropped, its drop logged.
    #[test]
    fn load_without_registry_json_adopts_namespaces_that_hold_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine();
        let (full, empty) = (
            NamespaceKey::new("m", "default"),
            NamespaceKey::new("e", "default"),
        );
        let ns = engine.create_namespace(full.clone(), 4).unwrap();
        ns.apply(crate::test_support::one_block_store(9, 1, 109))
            .unwrap();
        ns.flush().unwrap();
        engine.create_namespace(empty.clone(), 4).unwrap();
        let p = Partitions::new(engine.clone(), Some(dir.path()), Arc::new(NoListeners));
        let log = FakeDropLog::new(&p, false);
        log.install(&p);
        p.load().unwrap();
        assert_eq!(log.take_calls(), vec![(empty.clone(), true)]);
        assert!(p.view().partition("m", "default").is_ok());
        assert!(engine.namespace(&full).is_some());
        assert!(engine.namespace(&empty).is_none());
    }

    #[test]
    fn unregister_errors() {
        let p = registry();
        p.register(reg(10, "m", "default", 4, 0)).unwrap();
        let ok = RemovalLog {
            drop_blocks: &|_| Ok(()),
            drop_partition: &|_| Ok(()),
        };
        assert_eq!(
            p.unregister(5, "m", None, None, &ok)
                .unwrap_err()
                .to_string(),
            "instance 5 not found"
        );
        assert_eq!(
            p.unregister(10, "x", None, None, &ok)
                .unwrap_err()
                .to_string(),
            "instance 10 is registered for model=m routing_group=default"
        );
        assert_eq!(
            p.unregister(10, "m", Some("default"), Some(7), &ok)
                .unwrap_err()
                .to_string(),
            "instance 10 dp_rank 7 not found"
        );
    }
}
