//! The core NATS event subscription (`<prefix>.events.>`, no queue group: every kvindex process
//! indexes every event). Fire-and-forget publishes are logged and applied in arrival order; a
//! message sent as a request (with a reply subject) is answered once its events are durable,
//! with the `POST /events` answer or `{"error": ...}`. On shutdown the subscription is drained:
//! messages already received are still logged.

use std::sync::Arc;

use async_nats::{Client, Subscriber};
use futures::StreamExt;
use tokio::sync::watch;

use super::intake::{self, Incoming, Source};
use super::metrics::SUBSCRIPTION_UP;
use super::{backoff, connected, stopped};
use crate::http::SharedState;
use kvindex_server::nats_subjects::Subjects;

/// Messages handled per log group commit, at most.
pub(super) const BATCH: usize = 256;

async fn subscribe(
    client: &Client,
    subjects: &Subjects,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Subscriber> {
    let mut attempt = 0u32;
    loop {
        match client.subscribe(subjects.events_wildcard()).await {
            Ok(s) => return Some(s),
            Err(e) => {
                attempt += 1;
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "NATS event subscription failed");
                tokio::select! {
                    _ = stopped(shutdown) => return None,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// Ingest until shutdown, then drain.
pub async fn run(
    client: Client,
    subjects: Arc<Subjects>,
    state: SharedState,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(sub) = subscribe(&client, &subjects, &mut shutdown).await else {
        return;
    };
    // Once the server has answered a ping, it has the subscription.
    tokio::select! {
        _ = stopped(&mut shutdown) => {}
        _ = tokio::time::timeout(std::time::Duration::from_secs(5), client.flush()) => {}
    }
    tracing::info!(subject = %subjects.events_wildcard(), "NATS event subscription started");
    metrics::gauge!(SUBSCRIPTION_UP, "subscription" => "events").set(1.0);
    let mut chunks = sub.ready_chunks(BATCH);
    let mut draining = false;
    loop {
        let chunk = if draining {
            chunks.next().await
        } else {
            let next = tokio::select! {
                _ = stopped(&mut shutdown) => None,
                c = chunks.next() => Some(c),
            };
            match next {
                Some(c) => c,
                None => {
                    if !connected(&client) {
                        // Nothing can arrive, and a drain would wait for the server.
                        break;
                    }
                    draining = true;
                    if let Err(e) = chunks.get_mut().drain().await {
                        tracing::warn!(error = %e, "draining the NATS event subscription");
                        break;
                    }
                    continue;
                }
            }
        };
        let Some(messages) = chunk else { break };
        let batch: Vec<Incoming> = messages
            .iter()
            .map(|m| Incoming::from_message(m, None))
            .collect();
        let (st, subj) = (Arc::clone(&state), Arc::clone(&subjects));
        let outcomes = match tokio::task::spawn_blocking(move || {
            intake::process(&st, &subj, Source::Core, &batch, None)
        })
        .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "NATS event batch processing failed");
                continue;
            }
        };
        for (m, o) in messages.iter().zip(&outcomes) {
            if let Some(reply) = &m.reply {
                if let Err(e) = client.publish(reply.clone(), o.reply_body().into()).await {
                    tracing::warn!(error = %e, "NATS event reply not sent");
                }
            }
        }
    }
    metrics::gauge!(SUBSCRIPTION_UP, "subscription" => "events").set(0.0);
    tracing::info!("NATS event subscription stopped");
}
