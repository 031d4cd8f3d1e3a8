//! Start-up recovery from peer indexers (SERVICE.md §9): `GET {peer}/dump` for each `--peers`
//! URL in order, 10 s timeout each; the first success wins; its partitions are created when
//! missing and its events go through the normal intake (so they are logged too, with source
//! sequence 0). Start-up never fails because of recovery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kvindex_engine::{NamespaceKey, RouterEvent};
use serde::Deserialize;
use thiserror::Error;

use crate::ingest::Ingest;
use crate::partitions::Partitions;

/// Per-peer timeout of the dump request (Dynamo's).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Events per logged record while loading a dump.
const CHUNK: usize = 1024;

/// Why one peer could not be used.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("invalid peer URL {0:?}: {1}")]
    Url(String, String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("status {0}")]
    Status(u16),
    #[error("cannot parse the dump: {0}")]
    Parse(String),
}

/// One partition of a dump. `model_name` / `routing_group` are kvindex's explicit fields.
#[derive(Deserialize)]
struct DumpEntry {
    block_size: u32,
    events: Vec<RouterEvent>,
    model_name: Option<String>,
    routing_group: Option<String>,
}

/// A parsed dump: partition → (block size, events).
pub type Dump = BTreeMap<NamespaceKey, (u32, Vec<RouterEvent>)>;

/// Parse a `/dump` body. Entries that carry an error (or do not parse) are skipped with a
/// warning; keys without explicit names are split at the first `:` like Dynamo.
pub fn parse_dump(body: &[u8]) -> Result<Dump, PeerError> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| PeerError::Parse(e.to_string()))?;
    let mut out = Dump::new();
    for (key, value) in raw {
        let entry: DumpEntry = match serde_json::from_value(value) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(partition = %key, error = %e, "skipping an unusable dump entry");
                continue;
            }
        };
        let (model, group) = match (entry.model_name, entry.routing_group) {
            (Some(m), Some(g)) => (m, g),
            _ => match key.split_once(':') {
                Some((m, g)) => (m.to_owned(), g.to_owned()),
                None => (key.clone(), crate::config::DEFAULT_GROUP.to_owned()),
            },
        };
        out.insert(
            NamespaceKey::new(model, group),
            (entry.block_size, entry.events),
        );
    }
    Ok(out)
}

async fn fetch_dump(peer: &str) -> Result<Dump, PeerError> {
    let url = format!("{}/dump", peer.trim_end_matches('/'));
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| PeerError::Url(peer.into(), e.to_string()))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let fetch = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(PeerError::Status(resp.status().as_u16()));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| PeerError::Request(e.to_string()))?
            .to_bytes();
        parse_dump(&body)
    };
    tokio::time::timeout(PEER_TIMEOUT, fetch)
        .await
        .map_err(|_| PeerError::Timeout(PEER_TIMEOUT))?
}

/// Load `dump` into the index through the intake; returns the number of events applied.
pub fn load_dump(partitions: &Partitions, ingest: &Ingest, dump: Dump) -> usize {
    let mut applied = 0;
    for (key, (block_size, events)) in dump {
        if let Err(e) = partitions.ensure_partition(&key.model_name, &key.routing_group, block_size)
        {
            tracing::warn!(partition = %key, error = %e, "cannot recover this partition");
            continue;
        }
        tracing::info!(partition = %key, block_size, events = events.len(), "Creating indexer from recovery dump");
        let mut last = None;
        let mut events = events.into_iter().peekable();
        while events.peek().is_some() {
            let chunk: Vec<_> = events
                .by_ref()
                .take(CHUNK)
                // Source sequence 0, not the dump's `event_id` (renumbered from 0 per tier, it
                // has nothing to do with the engine's batch sequence): a restart whose last
                // logged entry of a stream is a recovered one then resumes after 0, re-applying
                // what the engine still buffers, instead of skipping batches up to an arbitrary
                // number as stale.
                .map(|e| (0, e))
                .collect();
            let n = chunk.len();
            match ingest.submit_mixed(&key, chunk) {
                Ok(t) => {
                    last = t.or(last);
                    applied += n;
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "recovery events refused");
                    break;
                }
            }
        }
        if let Some(t) = last {
            if let Err(e) = t.wait() {
                tracing::warn!(partition = %key, error = %e, "recovery events not durable");
            }
        }
        let _ = ingest.flush(&key);
    }
    applied
}

/// Try each peer in order; the first that answers wins. Never fails.
pub async fn recover_from_peers(
    peers: &[String],
    partitions: Arc<Partitions>,
    ingest: Arc<Ingest>,
) {
    for peer in peers {
        match fetch_dump(peer).await {
            Ok(dump) => {
                let n = tokio::task::spawn_blocking(move || load_dump(&partitions, &ingest, dump))
                    .await
                    .unwrap_or(0);
                tracing::info!(peer = %peer, events = n, "recovered from peer");
                return;
            }
            Err(e) => {
                tracing::warn!(peer = %peer, error = %e, "recovery from peer failed, trying next")
            }
        }
    }
    tracing::warn!("no reachable peers, starting with empty state");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_keys_use_explicit_names_or_split_at_the_first_colon() {
        let body = br#"{
            "org/llama:v1:g:x": {"block_size": 4, "events": [], "model_name": "org/llama:v1", "routing_group": "g:x"},
            "m:a:b": {"block_size": 8, "events": []},
            "bad": {"error": "boom"}
        }"#;
        let d = parse_dump(body).unwrap();
        assert!(d.contains_key(&NamespaceKey::new("org/llama:v1", "g:x")));
        assert_eq!(d[&NamespaceKey::new("m", "a:b")].0, 8);
        assert_eq!(d.len(), 2);
    }
}
