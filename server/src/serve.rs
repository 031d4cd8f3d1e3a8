//! `kvindex serve`: the start-up sequence of SERVICE.md §1.3 with recovery in front of it, and
//! the graceful shutdown.
//!
//! 1. settings (exit 1 on invalid ones); the SIGINT / SIGTERM handlers ([`crate::shutdown`]);
//!    metrics recorder;
//! 2. recovery: `DurableIndex::open` (snapshot + log) and `registry.json` (partitions,
//!    registrations, peers);
//! 3. `--workers` registrations; the ZMQ listeners connect behind the ready gate, holding what
//!    they receive; `--peers` recovery (after 1 s); the ready gate opens (live events are
//!    applied on top of the dump); the `DYN_ROUTER_MIN_INITIAL_WORKERS` wait;
//! 4. bind HTTP, start the NATS transport (with `--nats-url`; connects in the background) and
//!    serve until SIGINT / SIGTERM; then stop HTTP and drain the NATS subscriptions (at the
//!    same time), stop the listeners, sync and close the log, exit 0 — all within the
//!    shutdown budget (`--shutdown-timeout-s`), past which what is left is cut off (logged)
//!    and the log synced.
//!
//! A signal during start-up stops it at the next step boundary (recovery itself is not
//! interrupted: it finishes first); the log is then synced and closed and the process exits 0
//! without serving. A second signal at any time exits 130 / 143 at once ([`crate::shutdown`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvindex_engine::{Engine, EngineConfig};
use kvindex_persistence::{DurableIndex, RecoveryReport};

use crate::access_log::AccessLog;
use crate::cli::ServeArgs;
use crate::config::{ServeConfig, TEST_ENDPOINTS_ENV};
use crate::http::body_budget::{self, BodyBudget};
use crate::http::{connections, routes, AppState};
use crate::ingest::Ingest;
use crate::listeners::{ListenerSupervisor, NoListeners};
use crate::nats::NatsTransport;
use crate::partitions::{PartitionLimits, Partitions, Registration};
use crate::shutdown::Shutdown;
use crate::zmq_source::ZmqSupervisor;
use kvindex_server::zmq::IngestConfig;

/// The event-source hook: the ZMQ listeners (one per registration), feeding `ingest`, behind
/// a closed ready gate ([`ZmqSupervisor::ready`] opens it once peer recovery is loaded).
fn listener_supervisor(
    partitions: &Arc<Partitions>,
    ingest: &Arc<Ingest>,
    runtime: tokio::runtime::Handle,
    config: IngestConfig,
) -> Arc<ZmqSupervisor> {
    let config = IngestConfig {
        start_open: false,
        ..config
    };
    ZmqSupervisor::new(runtime, partitions, ingest, config)
}

fn log_recovery(report: &RecoveryReport) {
    tracing::info!(
        snapshot = report
            .snapshot
            .as_ref()
            .map(|s| s.path.display().to_string())
            .unwrap_or_else(|| "none".into()),
        entries_replayed = report.entries_replayed,
        next_lsn = report.next_lsn,
        ms = report.elapsed.as_millis() as u64,
        clean = report.is_clean(),
        "recovered the index from the data directory"
    );
    metrics::gauge!("kvindex_recovery_seconds").set(report.elapsed.as_secs_f64());
    metrics::gauge!("kvindex_recovery_entries").set(report.entries_replayed as f64);
}

/// Whether a shutdown signal stops start-up here (`after`: the step just done).
fn stop_start_up(shutdown: &Shutdown, after: &str) -> bool {
    if shutdown.requested() {
        tracing::info!(
            after,
            "shutdown requested during start-up: stopping before serving"
        );
        return true;
    }
    false
}

/// Run the service until a shutdown signal.
pub fn run(args: &ServeArgs) -> Result<()> {
    let cfg = ServeConfig::resolve(args)?;
    // Before anything slow (recovery): a signal during start-up stops it cleanly.
    let shutdown = Shutdown::install(cfg.shutdown_timeout)?;
    let prometheus = match crate::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed; /metrics is disabled");
            None
        }
    };
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            cfg.data_dir.display()
        )
    })?;
    if cfg.expected_blocks > 0 {
        tracing::info!(
            expected_blocks = cfg.expected_blocks,
            map_mib = kvindex_engine::expected_blocks_map_bytes(cfg.expected_blocks) >> 20,
            "the hash map of each partition with a registered worker is sized up front (--expected-blocks); partitions created by events or peer recovery grow as needed"
        );
    }
    // `expected_blocks` 0: what the engine creates on its own (recovery, the log) grows as
    // needed; the registry sizes the partitions of registered workers (`PartitionLimits`).
    let engine = Engine::new(EngineConfig {
        event_threads: cfg.event_threads,
        expected_blocks: 0,
        ..EngineConfig::default()
    });
    // Before recovery, so that an access log that cannot be opened ends the start-up before the
    // event log is touched.
    let access_log = match &cfg.access_log {
        Some(p) => Some(Arc::new(
            AccessLog::open(p, cfg.access_log_local_time)
                .with_context(|| format!("cannot open the access log {}", p.display()))?,
        )),
        None => None,
    };
    if stop_start_up(&shutdown, "access log") {
        return Ok(());
    }
    let opened = Instant::now();
    let (durable, report) = DurableIndex::open(&cfg.data_dir, cfg.durable.clone(), engine.clone())
        .with_context(|| format!("cannot open the data directory {}", cfg.data_dir.display()))?;
    log_recovery(&report);
    tracing::debug!(total_ms = opened.elapsed().as_millis() as u64, "index open");
    let durable = Arc::new(durable);
    shutdown.set_durable(&durable);
    if stop_start_up(&shutdown, "recovery") {
        return close_log(durable, &shutdown);
    }
    let partitions = Arc::new(
        Partitions::new(engine.clone(), Some(&cfg.data_dir), Arc::new(NoListeners)).with_limits(
            PartitionLimits {
                max_partitions: cfg.max_partitions,
                expected_blocks: cfg.expected_blocks,
            },
        ),
    );
    let ingest = Arc::new(Ingest::new(Arc::clone(&durable), Arc::clone(&partitions)));
    {
        let durable = Arc::downgrade(&durable);
        partitions.set_lsn_clock(Arc::new(move || {
            durable.upgrade().map_or(0, |d| d.log().next_lsn())
        }));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kvindex-http")
        .build()
        .context("cannot start the async runtime")?;
    let supervisor = listener_supervisor(
        &partitions,
        &ingest,
        runtime.handle().clone(),
        cfg.replay.ingest_config(),
    );
    partitions.set_supervisor(Arc::clone(&supervisor) as Arc<dyn ListenerSupervisor>);
    // Before `load`, which logs the drops of the partitions `registry.json` lists as dropping
    // (and asks the log whether one was withdrawn).
    partitions.set_drop_log(crate::partitions::durable_drop_log(&durable));
    let served = 'serve: {
        partitions.load()?;
        if stop_start_up(&shutdown, "registry") {
            break 'serve Ok(());
        }
        for w in &cfg.workers {
            tracing::info!(instance_id = w.instance_id, dp_rank = w.dp_rank, endpoint = %w.endpoint, "Registering initial worker");
            partitions.register_initial(Registration {
                instance_id: w.instance_id,
                model_name: cfg.model_name.clone(),
                routing_group: cfg.routing_group.clone(),
                block_size: cfg.block_size.unwrap_or(0),
                dp_rank: w.dp_rank,
                endpoint: w.endpoint.clone(),
                replay_endpoint: None,
            })?;
        }
        if stop_start_up(&shutdown, "workers") {
            break 'serve Ok(());
        }
        // Restored and `--workers` listeners start now, after their durable watermarks: they
        // connect, and hold what they receive until the ready gate opens after peer recovery.
        supervisor.open(&partitions, &ingest, runtime.handle());
        if cfg.test_endpoints {
            tracing::warn!("{TEST_ENDPOINTS_ENV} is set: /test/pause_listener, /test/resume_listener, /test/hold_dumps and /test/release_dumps are mounted");
        }
        let state = Arc::new(AppState {
            partitions: Arc::clone(&partitions),
            ingest: Arc::clone(&ingest),
            durable: Arc::clone(&durable),
            metrics: prometheus,
            access_log,
            trace_header: cfg.trace_id_header.clone(),
            test_endpoints: cfg.test_endpoints,
            events_budget: BodyBudget::new(
                cfg.http.events_body_budget,
                body_budget::EVENTS_METRICS,
            ),
            query_budget: BodyBudget::new(cfg.http.query_body_budget, body_budget::QUERY_METRICS),
            dumps: crate::http::dump::DumpLimit::new(cfg.http.max_dumps)
                .with_wait(cfg.http.dump_wait)
                .with_timeout(cfg.http.dump_timeout),
            max_event_partitions: cfg.max_event_partitions,
        });
        runtime.block_on(serve_http(
            &cfg,
            state,
            &partitions,
            &ingest,
            &supervisor,
            &shutdown,
        ))
    };
    partitions.shutdown_listeners();
    // Tasks still running (blocking ones included) get what is left of the budget, 5 s at most.
    let limit = RUNTIME_SHUTDOWN.min(shutdown.remaining());
    let stopping = Instant::now();
    runtime.shutdown_timeout(limit);
    if !limit.is_zero() && limit < RUNTIME_SHUTDOWN && stopping.elapsed() >= limit {
        tracing::warn!(
            "shutdown budget (--shutdown-timeout-s) spent: tasks still running were abandoned"
        );
    }
    served?;

    drop(supervisor);
    drop(ingest);
    drop(partitions);
    close_log(durable, &shutdown)
}

/// Longest wait for the runtime's tasks at shutdown (less when less is left of the budget).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// Sync and close the event log: the last step of every shutdown. A snapshot being written
/// gets what is left of the shutdown budget; past it, it is abandoned and the log synced. When
/// a task that outlived the runtime shutdown still holds the index, the log is only synced.
fn close_log(durable: Arc<DurableIndex>, shutdown: &Shutdown) -> Result<()> {
    match Arc::try_unwrap(durable) {
        Ok(d) => {
            let closed = d
                .close_within(shutdown.remaining())
                .context("closing the event log")?;
            if closed.snapshot_abandoned {
                tracing::warn!("shutdown budget (--shutdown-timeout-s) spent: the snapshot being written was abandoned (its temporary file is removed at the next start)");
            }
            tracing::info!(
                last_lsn = closed.synced_lsn.saturating_sub(1),
                "event log synced and closed"
            );
        }
        Err(d) => {
            tracing::warn!("a task still holds the index after the runtime shutdown: the event log is synced, not closed");
            let lsn = d.log().sync().context("syncing the event log")?;
            tracing::info!(last_lsn = lsn.saturating_sub(1), "event log synced");
        }
    }
    Ok(())
}

async fn serve_http(
    cfg: &ServeConfig,
    state: Arc<AppState>,
    partitions: &Arc<Partitions>,
    ingest: &Arc<Ingest>,
    supervisor: &ZmqSupervisor,
    shutdown: &Shutdown,
) -> Result<()> {
    let start_up = async {
        if !cfg.peers.is_empty() {
            // ZMQ slow-joiner window, as in Dynamo: the listeners are connected (holding what
            // they receive), so what the engines publish from about now on is not missed.
            tokio::time::sleep(Duration::from_secs(1)).await;
            crate::peers::recover_from_peers(
                &cfg.peers,
                Arc::clone(partitions),
                Arc::clone(ingest),
            )
            .await;
            crate::peers::record_peers(&cfg.peers, partitions).await;
        }
        // The ready gate (SERVICE.md §1.3, §9): the live events the listeners held during the
        // recovery are applied now, on top of the dump; applied under it, a block the engine
        // removed after the peer's dump was taken would come back for good. HTTP (`POST
        // /events`, `/register`) and NATS start after this, so nothing else ran before it.
        supervisor.ready();
        tracing::info!("ready gate open: the ZMQ listeners apply their events");
        if cfg.min_initial_workers > 0 {
            tracing::info!(
                min = cfg.min_initial_workers,
                "waiting for registered workers before serving"
            );
            while partitions.view().instances.len() < cfg.min_initial_workers {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    tokio::select! {
        _ = start_up => {}
        _ = shutdown.wait() => {
            tracing::info!("shutdown requested during start-up: stopping before serving");
            return Ok(());
        }
    }
    if stop_start_up(shutdown, "start-up") {
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("cannot bind {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    // The NATS transport opens with HTTP; its connection is made in the background.
    let nats = match &cfg.nats {
        Some(n) => Some(
            NatsTransport::start(n, Arc::clone(&state), shutdown.receiver())
                .await
                .context("NATS")?,
        ),
        None => None,
    };
    tracing::info!("HTTP server listening on {addr}");
    // At the signal, the HTTP drain and the NATS drain run at the same time, each within what
    // is left of the shutdown budget.
    let http = async {
        let budget = shutdown.clone();
        connections::serve(
            listener,
            routes::router(state),
            cfg.http,
            shutdown.receiver(),
            move || budget.remaining(),
        )
        .await;
        tracing::info!("HTTP server stopped");
    };
    let nats = async {
        if let Some(n) = nats {
            shutdown.wait().await;
            n.stop(|| shutdown.remaining()).await;
        }
    };
    tokio::join!(http, nats);
    Ok(())
}
