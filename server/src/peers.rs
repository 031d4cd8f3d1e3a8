//! Start-up recovery from peer indexers (SERVICE.md §9): `GET {peer}/dump` for each `--peers`
//! URL in order, 10 s timeout each; the first success wins; its partitions are created when
//! missing and its events go through the normal intake (so they are logged too, with source
//! sequence 0). Start-up never fails because of recovery.
//!
//! Every recovery is counted in `kvindex_peer_recovery_total{outcome}` (`recovered`, `partial`
//! when part of the dump could not be used, `failed` when no peer's dump could be loaded), and
//! every error on the way is logged with the peer and counted in
//! `kvindex_peer_errors_total{stage}`: `fetch` (a peer's dump not fetched: bad URL, refused,
//! timed out, non-2xx, not a dump), `entry` (a dump entry skipped), `load` (a partition or its
//! events not loaded), `register` (a `--peers` URL not recorded for `GET /peers`).

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

/// Counter: start-up recoveries from `--peers`, by `outcome` (see [`Outcome`]).
pub const RECOVERY_TOTAL: &str = "kvindex_peer_recovery_total";
/// Counter: peer recovery errors, by `stage` (see [`Stage`]).
pub const ERRORS_TOTAL: &str = "kvindex_peer_errors_total";

/// Describe this module's metrics (help text on `/metrics`).
pub fn describe() {
    metrics::describe_counter!(
        RECOVERY_TOTAL,
        "Start-up recoveries from --peers, by outcome (recovered, partial, failed)"
    );
    metrics::describe_counter!(
        ERRORS_TOTAL,
        "Peer recovery errors (logged), by stage (fetch, entry, load, register)"
    );
}

/// Where a peer recovery error happened (the `stage` label of [`ERRORS_TOTAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A peer's dump could not be fetched or parsed.
    Fetch,
    /// An entry of a dump was skipped.
    Entry,
    /// A partition of a dump, or some of its events, could not be loaded.
    Load,
    /// A `--peers` URL could not be recorded in the registry.
    Register,
}

impl Stage {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Entry => "entry",
            Stage::Load => "load",
            Stage::Register => "register",
        }
    }
}

fn count_error(stage: Stage) {
    metrics::counter!(ERRORS_TOTAL, "stage" => stage.as_str()).increment(1);
}

/// How a start-up recovery ended (the `outcome` label of [`RECOVERY_TOTAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A peer's dump was loaded in full.
    Recovered,
    /// A peer's dump was loaded, but some entries, partitions or events were not.
    Partial,
    /// No peer's dump could be fetched, or loading it failed.
    Failed,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Recovered => "recovered",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        }
    }
}

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
    #[error("dump larger than {0} bytes")]
    TooLarge(usize),
}

/// Largest `/dump` body read from a peer (a dump of the reference workload's index is a few
/// hundred MB of JSON). A peer sending more is refused rather than allowed to exhaust memory.
pub const MAX_DUMP_BYTES: usize = 4 << 30;

/// Collect a response body of at most `max` bytes.
async fn collect_limited<B>(body: B, max: usize) -> Result<Bytes, PeerError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match http_body_util::Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(PeerError::TooLarge(max)),
        Err(e) => Err(PeerError::Request(e.to_string())),
    }
}

/// One partition of a dump. `model_name` / `routing_group` are kvindex's explicit fields.
#[derive(Deserialize)]
struct DumpEntry {
    block_size: u32,
    events: Vec<RouterEvent>,
    model_name: Option<String>,
    routing_group: Option<String>,
}

/// A dump's partitions: partition → (block size, events).
pub type DumpPartitions = BTreeMap<NamespaceKey, (u32, Vec<RouterEvent>)>;

/// A parsed dump.
#[derive(Debug, Default)]
pub struct Dump {
    /// The usable entries.
    pub partitions: DumpPartitions,
    /// Entries skipped (they carried an error or did not parse).
    pub skipped: usize,
}

/// Parse a `/dump` body. Entries that carry an error (or do not parse) are skipped with a
/// warning and counted; keys without explicit names are split at the first `:` like Dynamo.
pub fn parse_dump(body: &[u8]) -> Result<Dump, PeerError> {
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(body).map_err(|e| PeerError::Parse(e.to_string()))?;
    let mut out = Dump::default();
    for (key, value) in raw {
        let entry: DumpEntry = match serde_json::from_value(value) {
            Ok(e) => e,
            Err(e) => {
                count_error(Stage::Entry);
                out.skipped += 1;
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
        out.partitions.insert(
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
        let body = collect_limited(resp.into_body(), MAX_DUMP_BYTES).await?;
        parse_dump(&body)
    };
    tokio::time::timeout(PEER_TIMEOUT, fetch)
        .await
        .map_err(|_| PeerError::Timeout(PEER_TIMEOUT))?
}

/// What [`load_dump`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Events applied.
    pub events: usize,
    /// Failures (each logged and counted): a partition not created, events refused or not
    /// durable, a partition not flushed.
    pub failures: usize,
}

/// Load `dump` into the index through the intake.
pub fn load_dump(partitions: &Partitions, ingest: &Ingest, dump: DumpPartitions) -> Loaded {
    let mut loaded = Loaded::default();
    let mut failed = |partition: &NamespaceKey, error: &dyn std::fmt::Display, what: &str| {
        count_error(Stage::Load);
        loaded.failures += 1;
        tracing::warn!(%partition, %error, "recovery from peer: {what}");
    };
    let mut applied = 0;
    for (key, (block_size, events)) in dump {
        if let Err(e) = partitions.ensure_partition(&key.model_name, &key.routing_group, block_size)
        {
            failed(&key, &e, "cannot recover this partition");
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
                    failed(&key, &e, "recovery events refused");
                    break;
                }
            }
        }
        if let Some(t) = last {
            if let Err(e) = t.wait() {
                failed(&key, &e, "recovery events not durable");
            }
        }
        if let Err(e) = ingest.flush(&key) {
            failed(&key, &e, "recovered events not flushed into the index");
        }
    }
    loaded.events = applied;
    loaded
}

/// Try each peer in order; the first that answers wins. Never fails; the outcome is logged
/// and counted.
pub async fn recover_from_peers(
    peers: &[String],
    partitions: Arc<Partitions>,
    ingest: Arc<Ingest>,
) -> Outcome {
    let outcome = recover(peers, partitions, ingest).await;
    metrics::counter!(RECOVERY_TOTAL, "outcome" => outcome.as_str()).increment(1);
    outcome
}

async fn recover(peers: &[String], partitions: Arc<Partitions>, ingest: Arc<Ingest>) -> Outcome {
    for peer in peers {
        let dump = match fetch_dump(peer).await {
            Ok(dump) => dump,
            Err(e) => {
                count_error(Stage::Fetch);
                tracing::warn!(peer = %peer, error = %e, "recovery from peer failed, trying next");
                continue;
            }
        };
        let skipped = dump.skipped;
        let loaded =
            tokio::task::spawn_blocking(move || load_dump(&partitions, &ingest, dump.partitions))
                .await;
        return match loaded {
            Ok(l) if l.failures == 0 && skipped == 0 => {
                tracing::info!(peer = %peer, events = l.events, "recovered from peer");
                Outcome::Recovered
            }
            Ok(l) => {
                tracing::warn!(
                    peer = %peer,
                    events = l.events,
                    failures = l.failures,
                    skipped_entries = skipped,
                    "recovered from peer in part (see the warnings above)"
                );
                Outcome::Partial
            }
            Err(e) => {
                // The index may hold part of the dump: no other peer's is loaded on top.
                count_error(Stage::Load);
                tracing::error!(peer = %peer, error = %e, "loading the dump from peer failed");
                Outcome::Failed
            }
        };
    }
    tracing::warn!("no reachable peers, starting with empty state");
    Outcome::Failed
}

/// Record each `--peers` URL in the registry (`GET /peers`). A failure is logged with the peer
/// and counted, never fatal.
pub async fn record_peers(peers: &[String], partitions: &Arc<Partitions>) {
    for peer in peers {
        let (parts, url) = (Arc::clone(partitions), peer.clone());
        let error = match tokio::task::spawn_blocking(move || parts.add_peer(&url)).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        count_error(Stage::Register);
        tracing::warn!(peer = %peer, %error, "cannot record the peer (GET /peers will not list it)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dump_body_over_the_limit_is_refused() {
        let body = || http_body_util::Full::new(Bytes::from(vec![b' '; 100]));
        assert_eq!(collect_limited(body(), 100).await.expect("fits").len(), 100);
        assert!(matches!(
            collect_limited(body(), 99).await,
            Err(PeerError::TooLarge(99))
        ));
    }

    #[test]
    fn dump_keys_use_explicit_names_or_split_at_the_first_colon() {
        let body = br#"{
            "org/llama:v1:g:x": {"block_size": 4, "events": [], "model_name": "org/llama:v1", "routing_group": "g:x"},
            "m:a:b": {"block_size": 8, "events": []},
            "bad": {"error": "boom"}
        }"#;
        let d = parse_dump(body).unwrap();
        assert_eq!(d.skipped, 1);
        let d = d.partitions;
        assert!(d.contains_key(&NamespaceKey::new("org/llama:v1", "g:x")));
        assert_eq!(d[&NamespaceKey::new("m", "a:b")].0, 8);
        assert_eq!(d.len(), 2);
    }
}
