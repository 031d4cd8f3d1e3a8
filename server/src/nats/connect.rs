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

/// Messages one subscription (core events, each query kind, the JetStream pull inbox) buffers
/// in the client before the client drops what arrives next (a `slow_consumer` connection
/// event, logged and counted) — instead of async-nats' default of 65,536. Each message is at
/// most the server's `max_payload` (1 MiB by default), so a subscription holds at most
/// 1,024 × `max_payload` (1 GiB by default) rather than 64 GiB.
///
/// Large enough for what reads them: the event subscription takes up to 256 messages per log
/// group commit ([`super::core_events`]), the query subscriptions run up to 256 requests at
/// once ([`super::queries`]), and the JetStream consumer has at most 1.5 pull batches of
/// [`super::jetstream::PULL_BATCH`] messages in flight (it asks for the next batch once half of
/// one is delivered). A dropped JetStream message is redelivered after the ack wait; a dropped
/// core event or query is lost, as any core NATS message to a consumer that falls behind.
pub(super) const SUBSCRIPTION_CAPACITY: usize = 1024;

const _: () = {
    assert!(SUBSCRIPTION_CAPACITY >= 2 * super::core_events::BATCH);
    assert!(SUBSCRIPTION_CAPACITY >= 2 * super::queries::MAX_INFLIGHT_QUERIES);
    assert!(SUBSCRIPTION_CAPACITY >= 3 * super::jetstream::PULL_BATCH);
};

/// A client for `cfg.urls`. Returns at once: the connection is made in the background (an
/// unreachable server is retried forever with backoff, and logged).
pub async fn connect(cfg: &NatsConfig) -> Result<Client, ConnectError> {
    metrics::gauge!(CONNECTED).set(0.0);
    let urls = cfg.urls.join(",");
    let addrs: Vec<async_nats::ServerAddr> =
        cfg.urls.iter().filter_map(|u| u.parse().ok()).collect();
    tracing::info!(urls = %urls, "connecting to NATS (in the background)");
    options(urls).connect(addrs).await
}

/// The client's options; `shown` names the servers in the connection's log lines.
fn options(shown: String) -> ConnectOptions {
    // Consecutive connection failures since the last success (logged at 1, 2, 4, 8, ...).
    let failures = Arc::new(AtomicU64::new(0));
    ConnectOptions::new()
        .name("kvindex")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
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
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};

    use futures::FutureExt;
    use futures::StreamExt;

    use super::*;

    /// `nats-server`: `$NATS_SERVER_BIN`, then `$PATH`, then the Debian locations (as the
    /// NATS integration tests look for it).
    fn nats_server_bin() -> Option<PathBuf> {
        if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
            return Some(PathBuf::from(p)).filter(|p| p.is_file());
        }
        let path = std::env::var("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    }

    /// A `nats-server` child, killed on drop.
    struct NatsServer(Child);

    impl Drop for NatsServer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A subscription of a client with [`options`] buffers at most [`SUBSCRIPTION_CAPACITY`]
    /// messages: of more published to it while nothing reads it, the rest is dropped.
    #[tokio::test]
    async fn a_subscription_buffers_at_most_subscription_capacity_messages() {
        let bin = nats_server_bin().expect(
            "nats-server not found: install it (Debian package `nats-server`, as \
             scripts/test.sh does) or set NATS_SERVER_BIN",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let _server = NatsServer(
            Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server"),
        );
        let client = options("test".into())
            .connect(format!("nats://127.0.0.1:{port}"))
            .await
            .expect("client");
        // The client connects in the background (retry_on_initial_connect): wait, bounded.
        for _ in 0..600 {
            if client.connection_state() == async_nats::connection::State::Connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            client.connection_state(),
            async_nats::connection::State::Connected
        );
        let mut sub = client.subscribe("capacity.test").await.expect("subscribe");
        let mut done = client.subscribe("capacity.done").await.expect("subscribe");
        let sent = SUBSCRIPTION_CAPACITY + 100;
        for i in 0..sent {
            client
                .publish("capacity.test", i.to_string().into())
                .await
                .expect("publish");
        }
        client
            .publish("capacity.done", "".into())
            .await
            .expect("publish");
        // The server sends the messages back in order on the one connection, and the client
        // hands them to the subscriptions in order: once the marker is in, every message
        // before it has been offered to `sub`.
        tokio::time::timeout(Duration::from_secs(60), done.next())
            .await
            .expect("the marker came back")
            .expect("the marker subscription is open");
        // Count what is ready without waiting (outside tokio's cooperative budget, which
        // would make a ready channel look empty after 128 receives).
        let buffered = tokio::task::unconstrained(async {
            let mut n = 0;
            while let Some(Some(_)) = sub.next().now_or_never() {
                n += 1;
            }
            n
        })
        .await;
        assert_eq!(buffered, SUBSCRIPTION_CAPACITY, "of {sent} sent");
    }
}
