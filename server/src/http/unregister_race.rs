//! `/unregister` racing `POST /events` / NATS events, interleaved deterministically with the
//! intake gate's test hooks: an event is held between its registry check and its log append
//! while the real `/unregister` handler runs (partitions/gate.rs).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderName, StatusCode};
use axum::Json;
use kvindex_engine::hashing::HashOptions;
use kvindex_engine::{Engine, EngineConfig, NamespaceKey, RouterEvent, WorkerWithDpRank};
use kvindex_persistence::{DurableConfig, DurableIndex};

use super::body_budget::BodyBudget;
use super::events::{submit_events, EventsAck, EventsTarget, SourceSeq};
use super::handlers;
use super::{AppState, SharedState};
use crate::ingest::Ingest;
use crate::listeners::{ListenerSupervisor, NoListeners};
use crate::partitions::{Partitions, Registration};

use crate::test_support::{Latch, TOKENS};

/// The service's state over `dir`, as `kvindex serve` builds it (without listeners). Also used
/// by the NATS intake's tests.
pub(crate) fn open(dir: &Path) -> SharedState {
    open_configured(dir, DurableConfig::default(), Arc::new(NoListeners))
}

/// [`open`] with the listener supervisor `supervisor`.
pub(crate) fn open_with(dir: &Path, supervisor: Arc<dyn ListenerSupervisor>) -> SharedState {
    open_configured(dir, DurableConfig::default(), supervisor)
}

/// [`open`] with the log configured by `config` (fault injection, an fsync policy) and
/// `supervisor`.
pub(crate) fn open_configured(
    dir: &Path,
    config: DurableConfig,
    supervisor: Arc<dyn ListenerSupervisor>,
) -> SharedState {
    let engine = Engine::new(EngineConfig {
        event_threads: 1,
        queue_capacity: 64,
        ..EngineConfig::default()
    });
    let (durable, _) = DurableIndex::open(dir, config, engine.clone()).unwrap();
    let durable = Arc::new(durable);
    let partitions = Arc::new(Partitions::new(engine, Some(dir), supervisor));
    partitions.set_drop_log(crate::partitions::durable_drop_log(&durable));
    partitions.load().unwrap();
    let ingest = Arc::new(Ingest::new(Arc::clone(&durable), Arc::clone(&partitions)));
    Arc::new(AppState {
        partitions,
        ingest,
        durable,
        metrics: None,
        access_log: None,
        trace_header: HeaderName::from_static("x-request-id"),
        test_endpoints: false,
        events_budget: BodyBudget::new(1 << 20, crate::http::body_budget::EVENTS_METRICS),
        query_budget: BodyBudget::new(1 << 20, crate::http::body_budget::QUERY_METRICS),
        dumps: crate::http::dump::DumpLimit::new(1),
        max_event_partitions: crate::http::DEFAULT_MAX_EVENT_PARTITIONS,
    })
}

/// Stop the service (log synced and closed) and start it again over the same directory.
fn restart(state: SharedState, dir: &Path) -> SharedState {
    stop(state).unwrap();
    open(dir)
}

/// Stop the service: the log is synced and closed (the error of a log that failed).
fn stop(state: SharedState) -> Result<(), kvindex_persistence::PersistError> {
    let AppState {
        partitions,
        ingest,
        durable,
        ..
    } = Arc::into_inner(state).expect("no other holder of the state");
    drop(ingest);
    drop(partitions);
    Arc::into_inner(durable)
        .expect("no other holder of the log")
        .close()
}

fn register(state: &AppState, instance_id: u64) {
    state
        .partitions
        .register(Registration {
            instance_id,
            model_name: "m".into(),
            routing_group: "default".into(),
            block_size: 4,
            dp_rank: 0,
            endpoint: "tcp://127.0.0.1:1".into(),
            replay_endpoint: None,
        })
        .unwrap();
}

/// `POST /unregister` of every rank of `instance_id` in `m/default`, through the real handler.
fn unregister(state: &SharedState, instance_id: u64) -> StatusCode {
    let req = serde_json::from_value(serde_json::json!({
        "instance_id": instance_id, "model_name": "m", "routing_group": "default"
    }))
    .unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(handlers::unregister(State(Arc::clone(state)), Json(req)))
        .status()
}

/// A store of the block of [`TOKENS`] by `worker_id`.
fn store(worker_id: u64, event_id: u64) -> RouterEvent {
    crate::test_support::one_block_store(worker_id, event_id, 100 + worker_id)
}

fn explicit() -> EventsTarget {
    EventsTarget {
        model_name: Some("m".into()),
        routing_group: Some("default".into()),
        block_size: None,
    }
}

fn post(
    state: &AppState,
    target: &EventsTarget,
    ev: RouterEvent,
) -> Result<EventsAck, super::errors::ApiError> {
    submit_events(state, target, vec![ev], SourceSeq::EventId, Some("/events"))
        .and_then(|s| s.finish(state))
}

/// Workers holding the block of [`TOKENS`] in `m/default`, as the engine has it (the registry
/// may have dropped the partition; the engine is what recovery rebuilt and queries read).
fn holders(state: &AppState) -> Vec<u64> {
    let key = NamespaceKey::new("m", "default");
    let Some(ns) = state.durable.engine().namespace(&key) else {
        return Vec::new();
    };
    ns.flush().unwrap();
    ns.find_matches_for_tokens(&TOKENS, &HashOptions::default())
        .sorted()
        .into_iter()
        .map(|(w, _): (WorkerWithDpRank, _)| w.worker_id)
        .collect()
}

/// Submit `ev` on another thread, hold it between its registry check and its log append, run
/// the `/unregister` handler for worker 1 meanwhile, and let the event go on once the
/// unregister waits for the intake gate (or, without a gate, once it has answered).
fn race(state: &SharedState, target: EventsTarget, ev: RouterEvent) -> Result<EventsAck, String> {
    let reached = Arc::new(Latch::default());
    let release = Arc::new(Latch::default());
    let hooks = state.partitions.gate_hooks();
    let held = AtomicBool::new(false);
    let (r, g) = (Arc::clone(&reached), Arc::clone(&release));
    *hooks.before_log.lock().unwrap() = Some(Arc::new(move || {
        if !held.swap(true, Ordering::SeqCst) {
            r.set();
            g.wait("the unregister to start");
        }
    }));
    let g = Arc::clone(&release);
    *hooks.before_fence.lock().unwrap() = Some(Arc::new(move || g.set()));
    let event = {
        let st = Arc::clone(state);
        std::thread::spawn(move || post(&st, &target, ev).map_err(|e| e.to_string()))
    };
    reached.wait("the event to pass its registry check");
    let unregister = {
        let st = Arc::clone(state);
        let release = Arc::clone(&release);
        std::thread::spawn(move || {
            let req = serde_json::from_value(serde_json::json!({
                "instance_id": 1, "model_name": "m", "routing_group": "default"
            }))
            .unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let status = rt
                .block_on(handlers::unregister(State(st), Json(req)))
                .status();
            release.set();
            status
        })
    };
    let answer = event.join().unwrap();
    assert_eq!(unregister.join().unwrap(), StatusCode::OK);
    *hooks.before_log.lock().unwrap() = None;
    *hooks.before_fence.lock().unwrap() = None;
    answer
}

#[test]
fn an_event_racing_the_unregister_of_the_last_worker_neither_returns_nor_recreates_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let state = open(dir.path());
    register(&state, 1);
    let key = NamespaceKey::new("m", "default");

    // Routed by the worker's registration, as `POST /events` without a partition does.
    let answer = race(&state, EventsTarget::default(), store(1, 1));
    // Logged before the removal (which removed it): accepted.
    assert_eq!(answer.map(|a| a.accepted), Ok(1));
    assert!(!state.partitions.view().partitions.contains_key(&key));
    assert!(
        state.durable.engine().namespace(&key).is_none(),
        "the dropped partition's index came back"
    );
    assert_eq!(holders(&state), Vec::<u64>::new());

    // Later events are refused: the worker and the partition are gone.
    let e = post(&state, &EventsTarget::default(), store(1, 2)).unwrap_err();
    assert_eq!(e.to_string(), "instance 1 not found");
    let e = post(&state, &explicit(), store(1, 3)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no indexer for model=m routing_group=default"
    );
    assert!(state.durable.engine().namespace(&key).is_none());

    let state = restart(state, dir.path());
    assert!(
        !state.partitions.view().partitions.contains_key(&key),
        "recovery brought the dropped partition back"
    );
    assert_eq!(holders(&state), Vec::<u64>::new());
}

#[test]
fn an_event_racing_the_unregister_of_its_worker_does_not_bring_its_blocks_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = open(dir.path());
    register(&state, 1);
    register(&state, 2);
    post(&state, &EventsTarget::default(), store(2, 1)).unwrap();
    assert_eq!(holders(&state), vec![2]);

    // Partition named explicitly, as NATS (the subject) and `?model_name=` do.
    let answer = race(&state, explicit(), store(1, 1));
    assert_eq!(answer.map(|a| a.accepted), Ok(1));
    assert_eq!(holders(&state), vec![2], "worker 1's block came back");

    let state = restart(state, dir.path());
    assert_eq!(
        holders(&state),
        vec![2],
        "worker 1's block came back after recovery"
    );
}

/// `POST /events?block_size=` creates the partition again as soon as the unregister that
/// dropped it lets go of the registry: the new partition gets a new, empty index, and its
/// events stay (the drop of the old one does not take them along, live or at recovery).
#[test]
fn a_partition_created_again_right_after_its_drop_keeps_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let state = open(dir.path());
    register(&state, 1);
    post(&state, &EventsTarget::default(), store(1, 1)).unwrap();
    assert_eq!(holders(&state), vec![1]);

    let created = Arc::new(Mutex::new(None));
    let hooks = state.partitions.gate_hooks();
    {
        let (st, created) = (Arc::clone(&state), Arc::clone(&created));
        let recreate = EventsTarget {
            block_size: Some(4),
            ..explicit()
        };
        // Cleared below: the hook holds the state.
        *hooks.after_unregister.lock().unwrap() = Some(Arc::new(move || {
            let answer = post(&st, &recreate, store(2, 1)).map(|a| a.accepted);
            *created.lock().unwrap() = Some(answer.map_err(|e| e.to_string()));
        }));
    }
    let req = serde_json::from_value(serde_json::json!({
        "instance_id": 1, "model_name": "m", "routing_group": "default"
    }))
    .unwrap();
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(handlers::unregister(State(Arc::clone(&state)), Json(req)))
        .status();
    *hooks.after_unregister.lock().unwrap() = None;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(created.lock().unwrap().take(), Some(Ok(1)));
    assert!(state
        .partitions
        .view()
        .partitions
        .contains_key(&NamespaceKey::new("m", "default")));
    assert_eq!(holders(&state), vec![2], "the new partition lost its event");

    let state = restart(state, dir.path());
    assert_eq!(
        holders(&state),
        vec![2],
        "recovery lost the new partition's event"
    );
}

/// `POST /events?block_size=` whose partition is dropped between `ensure_partition` (which
/// found it) and the intake gate: the partition is created again rather than answered 404.
#[test]
fn a_block_size_event_racing_the_drop_of_its_partition_creates_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = open(dir.path());
    register(&state, 1);
    post(&state, &EventsTarget::default(), store(1, 1)).unwrap();
    assert_eq!(holders(&state), vec![1]);

    let hooks = state.partitions.gate_hooks();
    {
        let st = Arc::clone(&state);
        let once = AtomicBool::new(false);
        // Cleared below: the hook holds the state.
        *hooks.before_admit.lock().unwrap() = Some(Arc::new(move || {
            if once.swap(true, Ordering::SeqCst) {
                return;
            }
            let req = serde_json::from_value(serde_json::json!({
                "instance_id": 1, "model_name": "m", "routing_group": "default"
            }))
            .unwrap();
            let status = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(handlers::unregister(State(Arc::clone(&st)), Json(req)))
                .status();
            assert_eq!(status, StatusCode::OK);
        }));
    }
    let recreate = EventsTarget {
        block_size: Some(4),
        ..explicit()
    };
    let answer = post(&state, &recreate, store(2, 1)).map(|a| a.accepted);
    *hooks.before_admit.lock().unwrap() = None;
    assert_eq!(answer.map_err(|e| e.to_string()), Ok(1));
    assert!(state
        .partitions
        .view()
        .partitions
        .contains_key(&NamespaceKey::new("m", "default")));
    assert_eq!(holders(&state), vec![2]);
}

/// Bytes of log segments in `dir`.
fn segment_bytes(state: &AppState) -> u64 {
    state
        .durable
        .log()
        .segments()
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// Copy the data directory `from` (files and subdirectories) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The bytes the log writes when the service over `dir` is opened and worker 1's removal from
/// `m/default` is logged, measured on a copy: the room a full disk leaves for the removal but
/// not for the partition's drop after it.
fn removal_bytes(dir: &Path) -> u64 {
    let scratch = tempfile::tempdir().unwrap();
    copy_dir(dir, scratch.path());
    let before: u64 = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().extension().is_some_and(|x| x == "kvlog"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let state = open(scratch.path());
    assert_eq!(
        segment_bytes(&state),
        before,
        "segments are not *.kvlog files, or opening wrote to them"
    );
    let spec = Arc::clone(
        &state
            .partitions
            .view()
            .partition("m", "default")
            .unwrap()
            .spec,
    );
    state
        .durable
        .remove_worker(&spec, 1)
        .unwrap()
        .wait()
        .unwrap();
    let after = segment_bytes(&state);
    stop(state).unwrap();
    after - before
}

/// The real log fails (a full disk, `IoFaults`) right after logging the removal of a
/// partition's last worker, at the partition's drop. The log then holds the partition's
/// entries without a drop, among them a block of worker 9, which was never registered (its
/// events named the partition), so the worker's removal did not remove it. Creating the
/// partition again is refused while the drop cannot be logged; after a restart (the disk has
/// room again) the partition does not come back, and once created again it holds only its own
/// blocks, also after the next restart.
#[test]
fn a_partition_whose_drop_was_not_logged_does_not_lend_its_blocks_to_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let key = NamespaceKey::new("m", "default");
    let state = open(dir.path());
    register(&state, 1);
    post(&state, &explicit(), store(9, 1)).unwrap();
    post(&state, &EventsTarget::default(), store(1, 1)).unwrap();
    assert_eq!(holders(&state), vec![1, 9]);
    stop(state).unwrap();

    let room = removal_bytes(dir.path());
    let mut config = DurableConfig::default();
    config.log.faults = kvindex_persistence::IoFaults {
        fail_writes_after_bytes: Some(room),
        ..kvindex_persistence::IoFaults::default()
    };
    let state = open_configured(dir.path(), config, Arc::new(NoListeners));
    assert_eq!(unregister(&state, 1), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        state.durable.log().writer_failure().is_some(),
        "the simulated disk did not fill at the drop"
    );
    assert!(!state.partitions.view().partitions.contains_key(&key));

    // `POST /events?block_size=` creating the partition again: refused, nothing created.
    let recreate = EventsTarget {
        block_size: Some(4),
        ..explicit()
    };
    let e = post(&state, &recreate, store(2, 1)).unwrap_err();
    assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        e.to_string()
            .contains("the drop of its previous partition is not logged yet"),
        "{e}"
    );
    assert!(
        !state.partitions.view().partitions.contains_key(&key),
        "the partition was created again without its old entries' drop in the log"
    );
    stop(state).unwrap_err();

    let state = open(dir.path());
    assert!(
        !state.partitions.view().partitions.contains_key(&key),
        "recovery brought the dropped partition back"
    );
    assert_eq!(holders(&state), Vec::<u64>::new());
    assert_eq!(
        post(&state, &recreate, store(2, 1))
            .map(|a| a.accepted)
            .ok(),
        Some(1)
    );
    assert_eq!(holders(&state), vec![2]);
    let state = restart(state, dir.path());
    assert_eq!(
        holders(&state),
        vec![2],
        "the dropped partition's block landed in the new one"
    );
}

/// The snapshot `/unregister` takes after dropping a partition fails (here its write: a full
/// disk). The unregister is done all the same — its removal and the drop are logged and synced,
/// `registry.json` no longer lists the partition — so it answers 200 (a 500 would make a retry
/// answer 404), and the failure is counted. A restart does not bring the partition back.
#[test]
fn a_failed_snapshot_after_a_partition_drop_still_answers_200() {
    let dir = tempfile::tempdir().unwrap();
    let key = NamespaceKey::new("m", "default");
    let mut config = DurableConfig::default();
    config.log.faults = kvindex_persistence::IoFaults {
        snapshot: Some(kvindex_persistence::SnapshotFault::WriteAfterBytes(0)),
        ..kvindex_persistence::IoFaults::default()
    };
    let state = open_configured(dir.path(), config, Arc::new(NoListeners));
    register(&state, 1);
    post(&state, &EventsTarget::default(), store(1, 1)).unwrap();
    assert_eq!(holders(&state), vec![1]);
    assert_eq!(unregister(&state, 1), StatusCode::OK);
    assert_eq!(state.durable.snapshot_failures(), 1);
    assert!(!state.partitions.view().partitions.contains_key(&key));
    assert_eq!(holders(&state), Vec::<u64>::new());
    let registry = std::fs::read_to_string(dir.path().join("registry.json")).unwrap();
    assert!(!registry.contains("\"m\""), "{registry}");
    stop(state).unwrap();

    let state = open(dir.path());
    assert!(
        !state.partitions.view().partitions.contains_key(&key),
        "recovery brought the dropped partition back"
    );
    assert_eq!(holders(&state), Vec::<u64>::new());
}
