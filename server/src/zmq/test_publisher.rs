//! A KV-event publisher that speaks vLLM's ZMQ wire protocol, for tests and the
//! `vllm_publisher` example (SERVICE.md §5.1, §5.2, §5.3, §7.2).
//!
//! * A **PUB** socket (bound) sends `[topic, seq_be64, msgpack KVEventBatch]`, `seq` starting at 0
//!   and incremented per batch.
//! * A **ROUTER** replay socket (bound) keeps the last [`PublisherConfig::buffer_steps`] batches
//!   in a ring, like vLLM's `buffer_steps`. A request `[identity, b"", start_be64]` is answered
//!   with `[identity, b"", topic, seq, payload]` for every buffered seq ≥ start (or
//!   `[identity, b"", seq, payload]` with [`PublisherConfig::replay_with_topic`] off, the older
//!   form), then the terminator `[identity, b"", b"", (-1)_be64, b""]`.
//!
//! Knobs for failure tests: [`VllmPublisher::publish_unsent`] (buffered for replay but not sent
//! live: a gap that replay can fill), [`VllmPublisher::skip_seqs`] (sequence numbers consumed with
//! nothing buffered: lost for good), [`VllmPublisher::kill_replay`] (the replay endpoint goes
//! away), [`VllmPublisher::send_raw`] (arbitrary frames).
//!
//! Written from the public description of the protocol, not from vLLM's code.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Why the publisher failed.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// A socket operation failed.
    #[error("zmq: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    /// A message could not be built (e.g. no frames).
    #[error("bad message: {0}")]
    Message(String),
}

/// How events are encoded inside the batch (SERVICE.md §5.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventEncoding {
    /// Tagged positional arrays (vLLM ≤ 0.23, older SGLang).
    #[default]
    Positional,
    /// Maps with `"type"` (current vLLM and SGLang).
    Map,
}

/// How block hashes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HashEncoding {
    /// msgpack unsigned ints.
    #[default]
    Unsigned,
    /// msgpack signed ints (the same 64 bits as i64), like a Python engine with negative hashes.
    Signed,
    /// 32-byte msgpack `bin` whose last 8 bytes are the hash, big-endian (vLLM with integer
    /// hashes off).
    Bin,
}

/// One entry of a block's `extra_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtraKeyValue {
    /// A bare string (LoRA name, cache salt, old-style MM hash).
    Str(String),
    /// An `[identifier, offset]` multimodal pair.
    MmPair(String, u64),
    /// An int (old LoRA ids).
    Int(i64),
}

/// One event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishEvent {
    /// `BlockStored`.
    Stored {
        /// Engine hashes, one per block.
        block_hashes: Vec<u64>,
        /// Engine hash of the parent block (`None` = root).
        parent_block_hash: Option<u64>,
        /// Token ids of all blocks, concatenated.
        token_ids: Vec<u32>,
        /// Tokens per block.
        block_size: u32,
        /// Tier name (`GPU`, `CPU`, ...), nil when `None`.
        medium: Option<String>,
        /// LoRA adapter name, nil when `None`.
        lora_name: Option<String>,
        /// One entry per block; `None` = the field is omitted.
        extra_keys: Option<Vec<Option<Vec<ExtraKeyValue>>>>,
    },
    /// `BlockRemoved`.
    Removed {
        /// Engine hashes of the removed blocks.
        block_hashes: Vec<u64>,
        /// Tier name, nil when `None`.
        medium: Option<String>,
    },
    /// `AllBlocksCleared`.
    Cleared,
}

impl PublishEvent {
    /// A device store of `token_ids` in blocks of `block_size`, with the given engine hashes.
    pub fn stored(
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
    ) -> Self {
        PublishEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium: Some("GPU".into()),
            lora_name: None,
            extra_keys: None,
        }
    }

    /// A device removal.
    pub fn removed(block_hashes: Vec<u64>) -> Self {
        PublishEvent::Removed {
            block_hashes,
            medium: Some("GPU".into()),
        }
    }
}

/// One batch to publish.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PublishBatch {
    /// Timestamp (seconds).
    pub ts: f64,
    /// Events, in order.
    pub events: Vec<PublishEvent>,
    /// `data_parallel_rank` (nil when `None`).
    pub dp_rank: Option<u32>,
    /// Event encoding.
    pub encoding: EventEncoding,
    /// Hash encoding.
    pub hashes: HashEncoding,
}

impl PublishBatch {
    /// A positional-encoded batch of `events` with no dp rank.
    pub fn new(events: Vec<PublishEvent>) -> Self {
        Self {
            ts: 0.0,
            events,
            ..Self::default()
        }
    }

    /// Set the batch's dp rank.
    pub fn with_dp_rank(mut self, dp_rank: u32) -> Self {
        self.dp_rank = Some(dp_rank);
        self
    }

    /// Set the event encoding.
    pub fn with_encoding(mut self, encoding: EventEncoding) -> Self {
        self.encoding = encoding;
        self
    }
}

// Writing into a Vec<u8> cannot fail; rmp's io errors are impossible here.
fn w<T, E: std::fmt::Debug>(r: Result<T, E>) {
    debug_assert!(r.is_ok(), "{r:?}", r = r.as_ref().err());
}

fn write_hash(buf: &mut Vec<u8>, h: u64, enc: HashEncoding) {
    match enc {
        HashEncoding::Unsigned => w(rmp::encode::write_uint(buf, h)),
        HashEncoding::Signed => w(rmp::encode::write_sint(buf, h as i64)),
        HashEncoding::Bin => {
            let mut bytes = [0xabu8; 32];
            bytes[24..].copy_from_slice(&h.to_be_bytes());
            w(rmp::encode::write_bin(buf, &bytes));
        }
    }
}

fn write_opt_str(buf: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => w(rmp::encode::write_str(buf, s)),
        None => w(rmp::encode::write_nil(buf)),
    }
}

fn write_extra_keys(buf: &mut Vec<u8>, keys: &[Option<Vec<ExtraKeyValue>>]) {
    w(rmp::encode::write_array_len(buf, keys.len() as u32));
    for block in keys {
        match block {
            None => w(rmp::encode::write_nil(buf)),
            Some(entries) => {
                w(rmp::encode::write_array_len(buf, entries.len() as u32));
                for e in entries {
                    match e {
                        ExtraKeyValue::Str(s) => w(rmp::encode::write_str(buf, s)),
                        ExtraKeyValue::MmPair(id, off) => {
                            w(rmp::encode::write_array_len(buf, 2));
                            w(rmp::encode::write_str(buf, id));
                            w(rmp::encode::write_uint(buf, *off));
                        }
                        ExtraKeyValue::Int(i) => w(rmp::encode::write_sint(buf, *i)),
                    }
                }
            }
        }
    }
}

fn write_event(buf: &mut Vec<u8>, ev: &PublishEvent, enc: EventEncoding, hashes: HashEncoding) {
    let write_hashes = |buf: &mut Vec<u8>, hs: &[u64]| {
        w(rmp::encode::write_array_len(buf, hs.len() as u32));
        for &h in hs {
            write_hash(buf, h, hashes);
        }
    };
    match (ev, enc) {
        (
            PublishEvent::Stored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                medium,
                lora_name,
                extra_keys,
            },
            _,
        ) => {
            let fields = if extra_keys.is_some() { 9 } else { 8 };
            match enc {
                EventEncoding::Positional => w(rmp::encode::write_array_len(buf, fields)),
                EventEncoding::Map => w(rmp::encode::write_map_len(buf, fields)),
            }
            let key = |buf: &mut Vec<u8>, k: &str| {
                if enc == EventEncoding::Map {
                    w(rmp::encode::write_str(buf, k));
                }
            };
            key(buf, "type");
            w(rmp::encode::write_str(buf, "BlockStored"));
            key(buf, "block_hashes");
            write_hashes(buf, block_hashes);
            key(buf, "parent_block_hash");
            match parent_block_hash {
                Some(p) => write_hash(buf, *p, hashes),
                None => w(rmp::encode::write_nil(buf)),
            }
            key(buf, "token_ids");
            w(rmp::encode::write_array_len(buf, token_ids.len() as u32));
            for &t in token_ids {
                w(rmp::encode::write_uint(buf, u64::from(t)));
            }
            key(buf, "block_size");
            w(rmp::encode::write_uint(buf, u64::from(*block_size)));
            key(buf, "lora_id");
            w(rmp::encode::write_nil(buf));
            key(buf, "medium");
            write_opt_str(buf, medium.as_deref());
            key(buf, "lora_name");
            write_opt_str(buf, lora_name.as_deref());
            if let Some(keys) = extra_keys {
                key(buf, "extra_keys");
                write_extra_keys(buf, keys);
            }
        }
        (
            PublishEvent::Removed {
                block_hashes,
                medium,
            },
            EventEncoding::Positional,
        ) => {
            w(rmp::encode::write_array_len(buf, 3));
            w(rmp::encode::write_str(buf, "BlockRemoved"));
            write_hashes(buf, block_hashes);
            write_opt_str(buf, medium.as_deref());
        }
        (
            PublishEvent::Removed {
                block_hashes,
                medium,
            },
            EventEncoding::Map,
        ) => {
            w(rmp::encode::write_map_len(buf, 3));
            w(rmp::encode::write_str(buf, "medium"));
            write_opt_str(buf, medium.as_deref());
            w(rmp::encode::write_str(buf, "type"));
            w(rmp::encode::write_str(buf, "BlockRemoved"));
            w(rmp::encode::write_str(buf, "block_hashes"));
            write_hashes(buf, block_hashes);
        }
        (PublishEvent::Cleared, EventEncoding::Positional) => {
            w(rmp::encode::write_array_len(buf, 1));
            w(rmp::encode::write_str(buf, "AllBlocksCleared"));
        }
        (PublishEvent::Cleared, EventEncoding::Map) => {
            w(rmp::encode::write_map_len(buf, 1));
            w(rmp::encode::write_str(buf, "type"));
            w(rmp::encode::write_str(buf, "AllBlocksCleared"));
        }
    }
}

/// Encode a batch as vLLM does: `[ts, events, data_parallel_rank]` (SERVICE.md §5.2).
pub fn encode_batch(batch: &PublishBatch) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + batch.events.len() * 64);
    w(rmp::encode::write_array_len(&mut buf, 3));
    w(rmp::encode::write_f64(&mut buf, batch.ts));
    w(rmp::encode::write_array_len(
        &mut buf,
        batch.events.len() as u32,
    ));
    for ev in &batch.events {
        write_event(&mut buf, ev, batch.encoding, batch.hashes);
    }
    match batch.dp_rank {
        Some(dp) => w(rmp::encode::write_uint(&mut buf, u64::from(dp))),
        None => w(rmp::encode::write_nil(&mut buf)),
    }
    buf
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// PUB endpoint to bind, e.g. `tcp://127.0.0.1:0` (port 0 = pick a free one).
    pub endpoint: String,
    /// ROUTER replay endpoint to bind, if any.
    pub replay_endpoint: Option<String>,
    /// Topic frame (vLLM's default is empty).
    pub topic: Vec<u8>,
    /// Replay ring size (vLLM's `buffer_steps`, default 10,000).
    pub buffer_steps: usize,
    /// Answer replays with the topic frame (real engines) or without (older publishers).
    pub replay_with_topic: bool,
    /// Replay this batch with a 3-byte sequence frame (a malformed reply, for tests).
    pub malformed_replay_seq: Option<u64>,
}

impl PublisherConfig {
    /// Loopback PUB and ROUTER on free ports.
    pub fn loopback() -> Self {
        Self {
            endpoint: "tcp://127.0.0.1:0".into(),
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            topic: Vec::new(),
            buffer_steps: 10_000,
            replay_with_topic: true,
            malformed_replay_seq: None,
        }
    }

    /// Loopback PUB only, no replay endpoint.
    pub fn loopback_without_replay() -> Self {
        Self {
            replay_endpoint: None,
            ..Self::loopback()
        }
    }
}

#[derive(Default)]
struct Ring {
    next_seq: u64,
    buffer: VecDeque<(u64, Bytes)>,
    replay_requests: Vec<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A publisher speaking vLLM's wire protocol (PUB + ROUTER replay ring).
pub struct VllmPublisher {
    pub_socket: tokio::sync::Mutex<PubSocket>,
    endpoint: String,
    replay_endpoint: Option<String>,
    replay_task: Mutex<Option<JoinHandle<()>>>,
    ring: Arc<Mutex<Ring>>,
    topic: Bytes,
    buffer_steps: usize,
}

impl VllmPublisher {
    /// Bind the PUB (and replay ROUTER) sockets. Must run inside a tokio runtime.
    pub async fn bind(config: PublisherConfig) -> Result<Self, PublisherError> {
        let mut pub_socket = PubSocket::new();
        let endpoint = pub_socket.bind(&config.endpoint).await?.to_string();
        let ring = Arc::new(Mutex::new(Ring::default()));
        let topic = Bytes::from(config.topic);
        let (replay_endpoint, replay_task) = match &config.replay_endpoint {
            Some(ep) => {
                let mut router = RouterSocket::new();
                let bound = router.bind(ep).await?.to_string();
                let task = tokio::spawn(serve_replay(
                    router,
                    ring.clone(),
                    topic.clone(),
                    config.replay_with_topic,
                    config.malformed_replay_seq,
                ));
                (Some(bound), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            pub_socket: tokio::sync::Mutex::new(pub_socket),
            endpoint,
            replay_endpoint,
            replay_task: Mutex::new(replay_task),
            ring,
            topic,
            buffer_steps: config.buffer_steps.max(1),
        })
    }

    /// The bound PUB endpoint (with the real port).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound replay endpoint (with the real port), if any.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        lock(&self.ring).next_seq
    }

    /// Start sequence of every replay request served so far.
    pub fn replay_requests(&self) -> Vec<u64> {
        lock(&self.ring).replay_requests.clone()
    }

    /// Give `batch` the next sequence number and keep it in the replay ring.
    fn assign(&self, batch: &PublishBatch) -> (u64, Bytes) {
        let payload = Bytes::from(encode_batch(batch));
        let mut ring = lock(&self.ring);
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.buffer.push_back((seq, payload.clone()));
        while ring.buffer.len() > self.buffer_steps {
            ring.buffer.pop_front();
        }
        (seq, payload)
    }

    /// Publish one batch live; returns its sequence number.
    pub async fn publish(&self, batch: &PublishBatch) -> Result<u64, PublisherError> {
        let (seq, payload) = self.assign(batch);
        let frames = vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ];
        self.send_frames(frames).await?;
        Ok(seq)
    }

    /// Buffer a batch for replay without sending it live: subscribers see a gap that replay
    /// fills. Returns its sequence number.
    pub fn publish_unsent(&self, batch: &PublishBatch) -> u64 {
        self.assign(batch).0
    }

    /// Consume `n` sequence numbers without buffering anything: a gap replay cannot fill.
    pub fn skip_seqs(&self, n: u64) {
        lock(&self.ring).next_seq += n;
    }

    /// Behave like an engine restarted on the same endpoints: count from 0 again, with an empty
    /// replay buffer. (Connected subscribers stay connected; a restarted engine would drop
    /// them, which matters only to a listener connected across the restart.)
    pub fn restart_sequence(&self) {
        let mut ring = lock(&self.ring);
        ring.next_seq = 0;
        ring.buffer.clear();
    }

    /// Send arbitrary frames on the PUB socket (garbage tests). An empty list sends nothing.
    pub async fn send_raw(&self, frames: Vec<Vec<u8>>) -> Result<(), PublisherError> {
        if frames.is_empty() {
            return Ok(());
        }
        self.send_frames(frames.into_iter().map(Bytes::from).collect())
            .await
    }

    async fn send_frames(&self, frames: Vec<Bytes>) -> Result<(), PublisherError> {
        let msg =
            ZmqMessage::try_from(frames).map_err(|e| PublisherError::Message(e.to_string()))?;
        self.pub_socket.lock().await.send(msg).await?;
        Ok(())
    }

    /// Stop serving replays and close the replay port: later requests find nothing there.
    pub fn kill_replay(&self) {
        if let Some(task) = lock(&self.replay_task).take() {
            task.abort();
        }
    }
}

impl Drop for VllmPublisher {
    fn drop(&mut self) {
        self.kill_replay();
    }
}

async fn serve_replay(
    mut router: RouterSocket,
    ring: Arc<Mutex<Ring>>,
    topic: Bytes,
    with_topic: bool,
    malformed_seq: Option<u64>,
) {
    loop {
        let Ok(msg) = router.recv().await else {
            // No peer yet, or one went away: avoid spinning.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let frames = msg.into_vec();
        // [identity, b"", start_be64]
        let (Some(identity), Some(start)) = (frames.first(), frames.get(2)) else {
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()).map(u64::from_be_bytes) else {
            continue;
        };
        let batches: Vec<(u64, Bytes)> = {
            let mut ring = lock(&ring);
            ring.replay_requests.push(start);
            ring.buffer
                .iter()
                .filter(|(seq, _)| *seq >= start)
                .cloned()
                .collect()
        };
        let reply = |seq: Bytes, payload: Bytes| {
            let mut f = vec![identity.clone(), Bytes::new()];
            if with_topic {
                f.push(topic.clone());
            }
            f.push(seq);
            f.push(payload);
            ZmqMessage::try_from(f)
        };
        for (seq, payload) in batches {
            let seq_frame = if malformed_seq == Some(seq) {
                Bytes::copy_from_slice(&seq.to_be_bytes()[5..])
            } else {
                Bytes::copy_from_slice(&seq.to_be_bytes())
            };
            if let Ok(m) = reply(seq_frame, payload) {
                if router.send(m).await.is_err() {
                    break;
                }
            }
        }
        let end_topic = if with_topic { Some(Bytes::new()) } else { None };
        let mut end = vec![identity.clone(), Bytes::new()];
        end.extend(end_topic);
        end.push(Bytes::copy_from_slice(&(-1i64).to_be_bytes()));
        end.push(Bytes::new());
        if let Ok(m) = ZmqMessage::try_from(end) {
            let _ = router.send(m).await;
        }
    }
}
