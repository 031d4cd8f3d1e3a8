//! Start-up recovery from peer indexers (SERVICE.md §9): `GET {peer}/dump` for each `--peers`
//! URL in order, 10 s timeout each; a peer answering `503` (a kvindex peer busy with
//! `--http-max-dumps` dumps) is asked again after its `Retry-After`, up to [`BUSY_RETRIES`] times
//! within those 10 s (Dynamo never retries); the first success wins; its partitions are created when
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

use crate::ingest::{Ingest, IngestError};
use crate::partitions::Partitions;
use kvindex_persistence::{AppendTicket, PersistError};

/// Per-peer timeout of the dump request (Dynamo's).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Events per logged record while loading a dump, at most. A record is also bounded by the
/// log's record limit (`LogConfig::max_record_bytes`, by default
/// `kvindex_persistence::format::MAX_RECORD_LEN`, 64 MiB), which 1,024 long chains exceed: a
/// batch the log refuses as too large is split in halves (see [`load_events`]).
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

/// How many times a peer answering `503` (busy: a kvindex peer with `--http-max-dumps` dumps in
/// progress) is asked again, within [`PEER_TIMEOUT`].
pub const BUSY_RETRIES: usize = 3;
/// Wait before asking a busy peer again when its `Retry-After` is missing or not a number of
/// seconds.
const BUSY_RETRY_DEFAULT: Duration = Duration::from_secs(1);

/// A `Retry-After` given in seconds (an HTTP date is not used: `None`).
fn retry_after(headers: &hyper::HeaderMap) -> Option<Duration> {
    let v = headers.get(hyper::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

async fn fetch_dump(peer: &str) -> Result<Dump, PeerError> {
    let url = format!("{}/dump", peer.trim_end_matches('/'));
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| PeerError::Url(peer.into(), e.to_string()))?;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let deadline = tokio::time::Instant::now() + PEER_TIMEOUT;
    let fetch = async {
        let mut retries = 0;
        let resp = loop {
            let resp = client
                .get(uri.clone())
                .await
                .map_err(|e| PeerError::Request(e.to_string()))?;
            let status = resp.status();
            if status != hyper::StatusCode::SERVICE_UNAVAILABLE || retries == BUSY_RETRIES {
                break resp;
            }
            // Busy: ask again after its Retry-After, if that is still within the deadline.
            let wait = retry_after(resp.headers()).unwrap_or(BUSY_RETRY_DEFAULT);
            if tokio::time::Instant::now() + wait >= deadline {
                break resp;
            }
            drop(resp);
            retries += 1;
            tracing::info!(peer = %peer, retries, wait_ms = wait.as_millis(), "peer busy (503), asking again");
            tokio::time::sleep(wait).await;
        };
        if !resp.status().is_success() {
            return Err(PeerError::Status(resp.status().as_u16()));
        }
        let body = collect_limited(resp.into_body(), MAX_DUMP_BYTES).await?;
        parse_dump(&body)
    };
    tokio::time::timeout_at(deadline, fetch)
        .await
        .map_err(|_| PeerError::Timeout(PEER_TIMEOUT))?
}

/// What [`load_dump`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Events applied.
    pub events: usize,
    /// Events of the dump not applied: refused by the log (one too large for a record on its
    /// own, or every event of its partition from a refusal on, which stops that partition), or
    /// of a partition not created.
    pub skipped_events: usize,
    /// Failures (each logged and counted): a partition not created, events refused or not
    /// durable, an event too large for a log record, a partition not flushed.
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
    let (mut applied, mut skipped) = (0, 0);
    for (key, (block_size, events)) in dump {
        if let Err(e) = partitions.ensure_partition(&key.model_name, &key.routing_group, block_size)
        {
            skipped += events.len();
            failed(&key, &e, "cannot recover this partition");
            continue;
        }
        tracing::info!(partition = %key, block_size, events = events.len(), "Creating indexer from recovery dump");
        let out = load_events(ingest, &key, events, &mut failed);
        applied += out.applied;
        skipped += out.skipped;
        if let Some(t) = out.last {
            if let Err(e) = t.wait() {
                failed(&key, &e, "recovery events not durable");
            }
        }
        if let Err(e) = ingest.flush(&key) {
            failed(&key, &e, "recovered events not flushed into the index");
        }
    }
    loaded.events = applied;
    loaded.skipped_events = skipped;
    loaded
}

/// What [`load_events`] did with one partition's events.
struct PartitionLoad {
    applied: usize,
    skipped: usize,
    /// The ticket of the last record logged.
    last: Option<AppendTicket>,
}

/// Log and apply `events` of partition `key` in order, in records of at most [`CHUNK`] events.
/// A batch the log refuses as larger than its record limit is split in halves, recursively,
/// and both halves are submitted in order (the partition's later batches are made no larger
/// than the half); a single event too large for a record is skipped as its own failure and the
/// rest goes on. Any other refusal (the log failed or closed) stops the partition: what is left
/// of it is skipped, as one failure.
fn load_events(
    ingest: &Ingest,
    key: &NamespaceKey,
    events: Vec<RouterEvent>,
    failed: &mut impl FnMut(&NamespaceKey, &dyn std::fmt::Display, &str),
) -> PartitionLoad {
    let mut out = PartitionLoad {
        applied: 0,
        skipped: 0,
        last: None,
    };
    let mut chunk = CHUNK;
    let mut rest = events.into_iter();
    // Halves of refused batches still to submit, the next one last (at most log2(CHUNK) + 1,
    // all from one batch).
    let mut halves: Vec<Vec<RouterEvent>> = Vec::new();
    loop {
        let batch = match halves.pop() {
            Some(b) => b,
            None => {
                let b: Vec<RouterEvent> = rest.by_ref().take(chunk).collect();
                if b.is_empty() {
                    break;
                }
                b
            }
        };
        let n = batch.len();
        // Submitted as a copy, so that a batch refused as too large can be split. Source
        // sequence 0, not the dump's `event_id` (renumbered from 0 per tier, it has nothing to
        // do with the engine's batch sequence): a restart whose last logged entry of a stream
        // is a recovered one then resumes after 0, re-applying what the engine still buffers,
        // instead of skipping batches up to an arbitrary number as stale.
        let items = batch.iter().map(|e| (0, e.clone())).collect();
        match ingest.submit_mixed(key, items) {
            Ok(t) => {
                out.last = t.or(out.last);
                out.applied += n;
            }
            Err(IngestError::Log(PersistError::RecordTooLarge { .. })) if n > 1 => {
                let mut first = batch;
                let second = first.split_off(n / 2);
                chunk = chunk.min(first.len());
                halves.push(second);
                halves.push(first);
            }
            Err(e @ IngestError::Log(PersistError::RecordTooLarge { .. })) => {
                out.skipped += 1;
                failed(key, &e, "an event too large for a log record skipped");
            }
            Err(e) => {
                let left = n + halves.iter().map(Vec::len).sum::<usize>() + rest.len();
                out.skipped += left;
                failed(
                    key,
                    &e,
                    &format!("recovery events refused; the partition's last {left} events skipped"),
                );
                break;
            }
        }
    }
    out
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
                    skipped_events = l.skipped_events,
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
    use crate::listeners::NoListeners;
    use kvindex_engine::{
        Engine, EngineConfig, ExternalSequenceBlockHash, KvCacheEvent, KvCacheEventData,
        KvCacheStoreData, KvCacheStoredBlockData, LocalBlockHash, WorkerWithDpRank,
    };
    use kvindex_persistence::{DurableConfig, DurableIndex, LogConfig};

    /// The log's record limit in these tests: far below the real 64 MiB, so that a dump
    /// whose 1,024-event records would not fit is small to build.
    const RECORD_LIMIT: u32 = 64 << 10;

    /// An index whose log refuses records over `max_record_bytes`, and its intake.
    struct Fixture {
        _dir: tempfile::TempDir,
        partitions: Arc<Partitions>,
        ingest: Arc<Ingest>,
    }

    fn fixture(max_record_bytes: u32) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(EngineConfig {
            event_threads: 1,
            queue_capacity: 64,
            ..EngineConfig::default()
        });
        let config = DurableConfig {
            log: LogConfig {
                max_record_bytes,
                ..LogConfig::default()
            },
            ..DurableConfig::default()
        };
        let (durable, _) = DurableIndex::open(dir.path(), config, engine.clone()).unwrap();
        let partitions = Arc::new(Partitions::new(engine, None, Arc::new(NoListeners)));
        let ingest = Arc::new(Ingest::new(Arc::new(durable), Arc::clone(&partitions)));
        Fixture {
            _dir: dir,
            partitions,
            ingest,
        }
    }

    /// `worker` stores a chain of `blocks` blocks at the root, hashes counting up from `first`.
    fn chain(worker: u64, first: u64, blocks: u64) -> RouterEvent {
        RouterEvent::new(
            worker,
            KvCacheEvent {
                event_id: 0,
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: None,
                    start_position: None,
                    blocks: (first..first + blocks)
                        .map(|h| KvCacheStoredBlockData {
                            block_hash: ExternalSequenceBlockHash(h),
                            tokens_hash: LocalBlockHash(h),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
                dp_rank: 0,
            },
        )
    }

    /// Blocks per worker (dp_rank 0) in `key`'s index, sorted by worker.
    fn block_counts(f: &Fixture, key: &NamespaceKey) -> Vec<(WorkerWithDpRank, usize)> {
        let view = f.partitions.view();
        let ns = view.partitions[key].namespace.clone().expect("an index");
        let mut counts = ns.worker_block_counts();
        counts.sort();
        counts
    }

    /// A fake peer on a free port answering every `GET /dump` with `body`. Returns its URL.
    fn serve_dump(body: String) -> String {
        serve_dump_after_busy(body, 0)
    }

    /// [`serve_dump`], answering the first `busy` requests `503` with `Retry-After: 0`.
    fn serve_dump_after_busy(body: String, busy: usize) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for (i, stream) in l.incoming().enumerate() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                if i < busy {
                    let _ = s.write_all(
                        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    continue;
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(body.as_bytes());
            }
        });
        url
    }

    /// A peer's dump whose 1,024-event records exceed the log's record limit (here lowered to
    /// 64 KiB; in production 1,024 chains of a 32k-token context at block size 16 make a
    /// 67 MB record, over 64 MiB) is recovered in full: refused batches are split in halves
    /// until they fit, and every block of every chain is in the index.
    #[tokio::test]
    async fn a_dump_over_the_record_limit_per_1024_events_is_recovered_in_full() {
        let f = fixture(RECORD_LIMIT);
        let (chains, blocks) = (1_500u64, 64u64);
        let events: Vec<RouterEvent> = (0..chains)
            .map(|c| chain(1 + c % 3, 1 + c * blocks, blocks))
            .collect();
        let body = serde_json::json!({"m:default": {"block_size": 4, "events": events}});
        let peer = serve_dump(body.to_string());
        let outcome = recover_from_peers(
            std::slice::from_ref(&peer),
            Arc::clone(&f.partitions),
            Arc::clone(&f.ingest),
        )
        .await;
        assert_eq!(outcome, Outcome::Recovered);
        let key = NamespaceKey::new("m", "default");
        let per_worker = |w: u64| (chains / 3 + u64::from(w <= chains % 3)) * blocks;
        assert_eq!(
            block_counts(&f, &key),
            (1..=3)
                .map(|w| (WorkerWithDpRank::new(w, 0), per_worker(w) as usize))
                .collect::<Vec<_>>()
        );
    }

    /// A peer busy with its dump limit (503, `Retry-After`) is asked again, within the peer
    /// timeout, instead of being given up at once.
    #[tokio::test]
    async fn a_busy_peer_is_asked_again_after_its_retry_after() {
        let f = fixture(RECORD_LIMIT);
        let body = serde_json::json!({"m:default": {"block_size": 4, "events": [chain(1, 1, 2)]}});
        let peer = serve_dump_after_busy(body.to_string(), BUSY_RETRIES);
        let outcome = recover_from_peers(
            std::slice::from_ref(&peer),
            Arc::clone(&f.partitions),
            Arc::clone(&f.ingest),
        )
        .await;
        assert_eq!(outcome, Outcome::Recovered);
        assert_eq!(
            block_counts(&f, &NamespaceKey::new("m", "default")),
            vec![(WorkerWithDpRank::new(1, 0), 2)]
        );
        // One more 503 than it retries: given up, with the status.
        let peer = serve_dump_after_busy(body.to_string(), BUSY_RETRIES + 1);
        assert!(matches!(
            fetch_dump(&peer).await,
            Err(PeerError::Status(503))
        ));
    }

    /// An event too large for a record on its own is one counted failure (`partial`); the
    /// events before and after it, in the same 1,024-event batch, are all loaded.
    #[test]
    fn an_event_too_large_for_a_record_is_skipped_and_the_rest_loads() {
        let f = fixture(RECORD_LIMIT);
        let key = NamespaceKey::new("m", "default");
        let mut events: Vec<RouterEvent> = (0..40u64).map(|c| chain(1, 1 + c * 8, 8)).collect();
        // Worker 2's one chain, far over 64 KiB by itself.
        events.insert(20, chain(2, 1_000_000, 8_192));
        let dump = DumpPartitions::from([(key.clone(), (4, events))]);
        let loaded = load_dump(&f.partitions, &f.ingest, dump);
        assert_eq!(
            loaded,
            Loaded {
                events: 40,
                skipped_events: 1,
                failures: 1,
            }
        );
        assert_eq!(
            block_counts(&f, &key),
            vec![(WorkerWithDpRank::new(1, 0), 320)]
        );
    }

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
