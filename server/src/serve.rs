//! `kvindex serve`: the start-up sequence of SERVICE.md §1.3 with recovery in front of it, and
//! the graceful shutdown.
//!
//! 1. settings (exit 1 on invalid ones); metrics recorder;
//! 2. recovery: `DurableIndex::open` (snapshot + log) and `registry.json` (partitions,
//!    registrations, peers);
//! 3. `--workers` registrations; the ZMQ listeners connect behind the ready gate, holding what
//!    they receive; `--peers` recovery (after 1 s); the ready gate opens (live events are
//!    applied on top of the dump); the `DYN_ROUTER_MIN_INITIAL_WORKERS` wait;
//! 4. bind HTTP, start the NATS transport (with `--nats-url`; connects in the background) and
//!    serve until SIGINT / SIGTERM; then stop HTTP, drain the NATS subscriptions, stop the
//!    listeners, sync and close the log, exit 0.

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

/// Install the SIGINT / SIGTERM handlers now (so a signal during start-up is not fatal) and
/// return a receiver that turns `true` when one arrives.
fn shutdown_watch() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn shutdown_requested(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Run the service until a shutdown signal.
pub fn run(args: &ServeArgs) -> Result<()> {
    let cfg = ServeConfig::resolve(args)?;
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
    let opened = Instant::now();
    let (durable, report) = DurableIndex::open(&cfg.data_dir, cfg.durable.clone(), engine.clone())
        .with_context(|| format!("cannot open the data directory {}", cfg.data_dir.display()))?;
    log_recovery(&report);
    tracing::debug!(total_ms = opened.elapsed().as_millis() as u64, "index open");
    let durable = Arc::new(durable);
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
    partitions.load()?;
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
        events_budget: BodyBudget::new(cfg.http.events_body_budget, body_budget::EVENTS_METRICS),
        query_budget: BodyBudget::new(cfg.http.query_body_budget, body_budget::QUERY_METRICS),
        dumps: crate::http::dump::DumpLimit::new(cfg.http.max_dumps)
            .with_wait(cfg.http.dump_wait)
            .with_timeout(cfg.http.dump_timeout),
        max_event_partitions: cfg.max_event_partitions,
    });

    let served = runtime.block_on(serve_http(&cfg, state, &partitions, &ingest, &supervisor));
    partitions.shutdown_listeners();
    runtime.shutdown_timeout(Duration::from_secs(5));
    served?;

    drop(supervisor);
    drop(ingest);
    match Arc::try_unwrap(durable) {
        Ok(d) => {
            let lsn = d.log().next_lsn().saturating_sub(1);
            d.close().context("closing the event log")?;
            tracing::info!(last_lsn = lsn, "event log synced and closed");
        }
        Err(d) => {
            let lsn = d.log().sync().context("syncing the event log")?;
            tracing::info!(last_lsn = lsn, "event log synced");
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
) -> Result<()> {
    let shutdown = shutdown_watch()?;
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
        _ = shutdown_requested(shutdown.clone()) => return Ok(()),
    }
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .with_context(|| format!("cannot bind {}:{}", cfg.host, cfg.port))?;
    let addr = listener.local_addr()?;
    // The NATS transport opens with HTTP; its connection is made in the background.
    let nats = match &cfg.nats {
        Some(n) => Some(
            NatsTransport::start(n, Arc::clone(&state), shutdown.clone())
                .await
                .context("NATS")?,
        ),
        None => None,
    };
    tracing::info!("HTTP server listening on {addr}");
    connections::serve(listener, routes::router(state), cfg.http, shutdown).await;
    tracing::info!("HTTP server stopped");
    if let Some(n) = nats {
        n.stop().await;
    }
    Ok(())
}
