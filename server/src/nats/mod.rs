//! The NATS transport of `kvindex serve` (docs/api.md, "NATS"): events on
//! `<prefix>.events.<model>.<group>` through a core subscription ([`core_events`]) and/or a
//! durable JetStream pull consumer ([`jetstream`]), both through the `POST /events` intake
//! ([`intake`]); queries as request/reply in a queue group ([`queries`]). Off unless
//! `--nats-url` is given. The connection never holds start-up ([`connect`]); shutdown drains
//! the subscriptions and flushes the client before the log is closed.

mod connect;
mod core_events;
pub mod intake;
mod jetstream;
pub mod metrics;
mod queries;
mod stream_epoch;

use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::NatsConfig;
use crate::http::SharedState;
use kvindex_server::nats_subjects::{QueryKind, Subjects};

/// How long shutdown waits for the subscriptions to drain and the consumer to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the client to flush, after that.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Environment variable of the test-only JetStream hold (`before_log` or `before_ack`).
pub const TEST_HOLD_ENV: &str = "KVINDEX_TEST_NATS_HOLD";

/// Test-only hook: where the JetStream consumer stops (until shutdown) so that a test can kill
/// the process between delivery and the log append, or between the append and the ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestHold {
    Off,
    BeforeLog,
    BeforeAck,
}

impl TestHold {
    fn from_env() -> Self {
        match std::env::var(TEST_HOLD_ENV).ok().as_deref() {
            None | Some("") => TestHold::Off,
            Some("before_log") => TestHold::BeforeLog,
            Some("before_ack") => TestHold::BeforeAck,
            Some(other) => {
                tracing::warn!(
                    value = other,
                    "{TEST_HOLD_ENV}: unknown value ignored (before_log, before_ack)"
                );
                TestHold::Off
            }
        }
    }
}

/// Exponential backoff for re-subscribing: 250 ms doubling up to 10 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1u64 << attempt.min(6).saturating_sub(1)))
        .min(Duration::from_secs(10))
}

fn stopping(rx: &watch::Receiver<bool>) -> bool {
    *rx.borrow()
}

fn connected(client: &Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Resolves once shutdown is requested (holds no borrow of the channel across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// The running NATS transport: its client and tasks.
pub struct NatsTransport {
    client: Client,
    tasks: Vec<JoinHandle<()>>,
}

impl NatsTransport {
    /// Connect (in the background) and start the configured subscriptions. Fails only on
    /// unusable settings, never because the server is unreachable.
    pub async fn start(
        cfg: &NatsConfig,
        state: SharedState,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, async_nats::ConnectError> {
        let client = connect::connect(cfg).await?;
        let subjects = Arc::new(Subjects::new(&cfg.subject_prefix));
        let mut tasks = Vec::new();
        if cfg.core_events {
            if cfg.jetstream.is_some() {
                // Not idempotent: the two copies of the events are applied independently and
                // interleave, so the index is only eventually consistent — a block removed by
                // one path comes back when the slower path applies its older store, until that
                // path applies the removal too.
                tracing::warn!("core NATS events and the JetStream consumer are both on: messages the stream captures are ingested twice, and the two copies interleave (only eventually consistent: a removed block can reappear until the slower path catches up; also wasteful)");
            }
            tasks.push(tokio::spawn(core_events::run(
                client.clone(),
                Arc::clone(&subjects),
                Arc::clone(&state),
                shutdown.clone(),
            )));
        }
        if let Some(js) = &cfg.jetstream {
            let hold = TestHold::from_env();
            if hold != TestHold::Off {
                tracing::warn!(
                    ?hold,
                    "{TEST_HOLD_ENV} is set: the JetStream consumer will stop (test only)"
                );
            }
            tasks.push(tokio::spawn(jetstream::run(
                client.clone(),
                js.clone(),
                Arc::clone(&subjects),
                Arc::clone(&state),
                hold,
                shutdown.clone(),
            )));
        }
        if let Some(group) = &cfg.query_group {
            for kind in [QueryKind::Tokens, QueryKind::Hashes] {
                tasks.push(tokio::spawn(queries::run(
                    client.clone(),
                    kind,
                    group.clone(),
                    Arc::clone(&subjects),
                    Arc::clone(&state),
                    shutdown.clone(),
                )));
            }
        }
        Ok(Self { client, tasks })
    }

    /// After the shutdown signal: wait (at most 5 s) for the subscriptions to drain and the
    /// consumer to finish its batch, then flush what is still buffered to the server (at most
    /// 2 s). While disconnected there is nothing to drain: the tasks end at once. `budget`
    /// tells what is left of the shutdown budget (`--shutdown-timeout-s`); neither wait
    /// outlasts it, and what it cuts off is logged.
    pub async fn stop(self, budget: impl Fn() -> Duration) {
        let left = budget();
        let by_budget = left < STOP_TIMEOUT;
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT.min(left);
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                if by_budget {
                    tracing::warn!("shutdown budget (--shutdown-timeout-s) spent: a NATS task that had not stopped was aborted");
                } else {
                    tracing::warn!("a NATS task did not stop in time; aborted");
                }
                t.abort();
            }
        }
        if !connected(&self.client) {
            tracing::warn!("NATS is not connected at shutdown; nothing to flush");
            return;
        }
        let left = budget();
        if left.is_zero() {
            tracing::warn!(
                "shutdown budget (--shutdown-timeout-s) spent: the NATS client was not flushed"
            );
            return;
        }
        match tokio::time::timeout(FLUSH_TIMEOUT.min(left), self.client.flush()).await {
            Ok(Ok(())) => tracing::info!("NATS subscriptions drained and flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "NATS flush at shutdown"),
            Err(_) if left < FLUSH_TIMEOUT => tracing::warn!(
                "shutdown budget (--shutdown-timeout-s) spent: the NATS flush was cut off"
            ),
            Err(_) => tracing::warn!("NATS flush at shutdown timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert!(backoff(3) > backoff(2));
        assert_eq!(backoff(100), Duration::from_secs(8));
        assert!(backoff(100) <= Duration::from_secs(10));
    }
}
