//! SIGINT / SIGTERM handling of `kvindex serve` (docs/operations.md, "Shutdown").
//!
//! The handlers are installed first thing (before recovery), on a thread of their own with its
//! own small runtime, so they keep working while the service's runtime starts, stalls or is
//! shut down:
//!
//! * the **first** signal asks for a graceful shutdown ([`Shutdown::requested`] turns `true`)
//!   and starts the shutdown budget (`--shutdown-timeout-s`, [`Shutdown::remaining`]);
//! * a **second** one (either kind) ends the process at once: a WARN, a best-effort sync of the
//!   event log when it is open (waited for at most [`FORCED_SYNC_WAIT`], so a stuck writer
//!   cannot hold the exit), then exit 130 (SIGINT) or 143 (SIGTERM), the shell's codes for
//!   death by those signals.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use kvindex_persistence::DurableIndex;
use thiserror::Error;
use tokio::sync::watch;

/// Default `--shutdown-timeout-s`: below Kubernetes' default 30 s grace period.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a forced exit (second signal) waits for its best-effort log sync.
pub const FORCED_SYNC_WAIT: Duration = Duration::from_secs(2);

/// Why the signal handlers could not be installed.
#[derive(Debug, Error)]
pub enum SignalError {
    #[error("cannot start the signal thread: {0}")]
    Thread(std::io::Error),
    #[error("installing the {signal} handler: {source}")]
    Install {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("the signal thread ended before installing the handlers")]
    Vanished,
}

/// A shutdown signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sig {
    Int,
    Term,
}

impl Sig {
    fn name(self) -> &'static str {
        match self {
            Sig::Int => "SIGINT",
            Sig::Term => "SIGTERM",
        }
    }

    /// 128 + the signal number, as a shell reports a process killed by it.
    fn exit_code(self) -> i32 {
        match self {
            Sig::Int => 130,
            Sig::Term => 143,
        }
    }
}

struct Shared {
    /// When the first signal arrived.
    requested_at: OnceLock<Instant>,
    budget: Duration,
    /// The index, once open: what a forced exit syncs.
    durable: Mutex<Option<Weak<DurableIndex>>>,
}

/// The shutdown state shared by start-up, the HTTP server, the NATS transport and the signal
/// thread.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    shared: Arc<Shared>,
}

impl Shutdown {
    /// Install the SIGINT / SIGTERM handlers on their own thread; `budget` is the time the
    /// graceful shutdown may take from the first signal on.
    pub fn install(budget: Duration) -> Result<Self, SignalError> {
        let (tx, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            requested_at: OnceLock::new(),
            budget,
            durable: Mutex::new(None),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let bg = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("kvindex-signals".into())
            .spawn(move || watch_signals(bg, tx, ready_tx))
            .map_err(SignalError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {
                tracing::debug!("SIGINT / SIGTERM handlers installed");
                Ok(Self { rx, shared })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SignalError::Vanished),
        }
    }

    /// Let a forced exit (second signal) sync `durable`'s log.
    pub fn set_durable(&self, durable: &Arc<DurableIndex>) {
        *self
            .shared
            .durable
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(durable));
    }

    /// Whether a shutdown signal has arrived.
    pub fn requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once a shutdown signal has arrived.
    pub async fn wait(&self) {
        let mut rx = self.rx.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// A receiver that turns `true` at the first signal.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.rx.clone()
    }

    /// What is left of the shutdown budget (all of it before the first signal).
    pub fn remaining(&self) -> Duration {
        match self.shared.requested_at.get() {
            Some(at) => self.shared.budget.saturating_sub(at.elapsed()),
            None => self.shared.budget,
        }
    }
}

/// The signal thread: a current-thread runtime waiting for the signals until the process ends.
fn watch_signals(
    shared: Arc<Shared>,
    tx: watch::Sender<bool>,
    ready: std::sync::mpsc::Sender<Result<(), SignalError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(SignalError::Thread(e)));
            return;
        }
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| SignalError::Install {
                signal: name,
                source,
            })
        };
        let (mut term, mut int) = match (
            install(SignalKind::terminate(), "SIGTERM"),
            install(SignalKind::interrupt(), "SIGINT"),
        ) {
            (Ok(term), Ok(int)) => (term, int),
            (Err(e), _) | (_, Err(e)) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let first = next_signal(&mut int, &mut term).await;
        tracing::info!("{} received, shutting down", first.name());
        let _ = shared.requested_at.set(Instant::now());
        let _ = tx.send(true);
        let second = next_signal(&mut int, &mut term).await;
        tracing::warn!(
            exit_code = second.exit_code(),
            "{} received during the shutdown: exiting now without finishing it",
            second.name()
        );
        forced_sync(&shared);
        std::process::exit(second.exit_code());
    });
}

async fn next_signal(
    int: &mut tokio::signal::unix::Signal,
    term: &mut tokio::signal::unix::Signal,
) -> Sig {
    tokio::select! {
        _ = int.recv() => Sig::Int,
        _ = term.recv() => Sig::Term,
    }
}

/// Sync the event log when it is open, on a thread of its own, waiting at most
/// [`FORCED_SYNC_WAIT`]: the stuck path may be the log itself.
fn forced_sync(shared: &Shared) {
    let durable = shared
        .durable
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(Weak::upgrade);
    let Some(durable) = durable else {
        tracing::warn!("the event log is not open (or already closed): nothing to sync");
        return;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("kvindex-forced-sync".into())
        .spawn(move || {
            let _ = tx.send(durable.log().sync());
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the forced sync of the event log");
        return;
    }
    match rx.recv_timeout(FORCED_SYNC_WAIT) {
        Ok(Ok(lsn)) => tracing::info!(last_lsn = lsn, "event log synced before the forced exit"),
        Ok(Err(e)) => tracing::warn!(error = %e, "syncing the event log before the forced exit"),
        Err(_) => tracing::warn!(
            wait_ms = FORCED_SYNC_WAIT.as_millis() as u64,
            "the event log did not sync in time; exiting without it"
        ),
    }
}
