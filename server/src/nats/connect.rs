//! The NATS connection: never blocks start-up. The client connects (and reconnects) in the
//! background with the client's exponential backoff; every state change is logged and shown in
//! `kvindex_nats_connected` / `kvindex_nats_connection_events_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectError, ConnectOptions, Event};

use super::metrics::{CONNECTED, CONNECTION_EVENTS};
use crate::config::NatsConfig;

fn event_label(e: &Event) -> &'static str {
    match e {
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck",
        Event::Draining => "draining",
        Event::Closed => "closed",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
    }
}

/// A client for `cfg.urls`. Returns at once: the connection is made in the background (an
/// unreachable server is retried forever with backoff, and logged).
pub async fn connect(cfg: &NatsConfig) -> Result<Client, ConnectError> {
    metrics::gauge!(CONNECTED).set(0.0);
    let urls = cfg.urls.join(",");
    let shown = urls.clone();
    let addrs: Vec<async_nats::ServerAddr> =
        cfg.urls.iter().filter_map(|u| u.parse().ok()).collect();
    tracing::info!(urls = %urls, "connecting to NATS (in the background)");
    // Consecutive connection failures since the last success (logged at 1, 2, 4, 8, ...).
    let failures = Arc::new(AtomicU64::new(0));
    ConnectOptions::new()
        .name("kvindex")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let shown = shown.clone();
            let failures = Arc::clone(&failures);
            async move {
                metrics::counter!(CONNECTION_EVENTS, "event" => event_label(&event)).increment(1);
                match &event {
                    Event::Connected => {
                        failures.store(0, Ordering::Relaxed);
                        metrics::gauge!(CONNECTED).set(1.0);
                        tracing::info!(urls = %shown, "NATS connected");
                    }
                    Event::Disconnected => {
                        metrics::gauge!(CONNECTED).set(0.0);
                        tracing::warn!(urls = %shown, "NATS disconnected; reconnecting with backoff");
                    }
                    Event::Closed => {
                        metrics::gauge!(CONNECTED).set(0.0);
                        tracing::info!("NATS connection closed");
                    }
                    Event::ClientError(e) => {
                        let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(urls = %shown, attempts = n, error = %e, "NATS server unreachable; retrying with backoff");
                        } else {
                            tracing::debug!(urls = %shown, attempts = n, error = %e, "NATS server unreachable");
                        }
                    }
                    other => tracing::warn!(event = %other, "NATS connection event"),
                }
            }
        })
        .connect(addrs)
        .await
}
