//! ZMQ ingestion end to end on loopback: a Rust publisher speaking vLLM's wire protocol
//! (`kvindex_server::zmq::test_publisher`) → `ZmqIngest` listeners → a collecting sink.
//!
//! No timing assertions: every wait is bounded polling for a condition, with a generous
//! deadline that only matters when something is broken.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};
use kvindex_engine::{KvCacheEventData, RouterEvent};
use kvindex_server::zmq::test_publisher::{
    EventEncoding, PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
};
use kvindex_server::zmq::{
    EventSink, IngestConfig, ListenerSpec, ListenerState, ListenerStatus, SinkError, ZmqIngest,
};

const BS: u32 = 4;
const DEADLINE: Duration = Duration::from_secs(30);

/// One `submit` call as the sink saw it.
#[derive(Debug, Clone)]
struct Submitted {
    worker_id: u64,
    dp_rank: u32,
    seq: u64,
    events: Vec<RouterEvent>,
}

#[derive(Default)]
struct CollectingSink {
    batches: Mutex<Vec<Submitted>>,
}

impl EventSink for CollectingSink {
    fn submit(
        &self,
        worker_id: u64,
        dp_rank: u32,
        _generation: u64,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<(), SinkError> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Submitted {
                worker_id,
                dp_rank,
                seq: source_seq,
                events,
            });
        Ok(())
    }
}

impl CollectingSink {
    fn of(&self, worker_id: u64, dp_rank: u32) -> Vec<Submitted> {
        self.batches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|b| b.worker_id == worker_id && b.dp_rank == dp_rank)
            .cloned()
            .collect()
    }

    fn seqs(&self, worker_id: u64, dp_rank: u32) -> Vec<u64> {
        self.of(worker_id, dp_rank).iter().map(|b| b.seq).collect()
    }

    fn has_seq(&self, worker_id: u64, dp_rank: u32, seq: u64) -> bool {
        self.seqs(worker_id, dp_rank).contains(&seq)
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fast_config() -> IngestConfig {
    IngestConfig {
        replay_timeout: Duration::from_millis(500),
        replay_attempts: 2,
        replay_backoff: Duration::from_millis(50),
        replay_backoff_max: Duration::from_millis(200),
        ..IngestConfig::default()
    }
}

fn ingest(sink: &Arc<CollectingSink>, config: IngestConfig) -> ZmqIngest {
    ZmqIngest::new(tokio::runtime::Handle::current(), sink.clone(), config)
}

fn status(ingest: &ZmqIngest, worker_id: u64, dp_rank: u32) -> ListenerStatus {
    ingest
        .status(worker_id, dp_rank)
        .expect("listener is registered")
}

fn spec_for(publisher: &VllmPublisher, worker_id: u64, dp_rank: u32) -> ListenerSpec {
    let spec = ListenerSpec::new(worker_id, dp_rank, publisher.endpoint(), BS);
    match publisher.replay_endpoint() {
        Some(replay) => spec.with_replay(replay),
        None => spec,
    }
}

/// Whether the listener is done with batch `seq`: the sink has it *and* the listener's status
/// accounts for it. The listener updates its status (watermark, `lost_batches`, ...) only once
/// the sink has returned, so a batch seen in the sink is not yet in the status counters: a
/// test reads the status only after the status watermark has reached the batch.
fn settled(ingest: &ZmqIngest, sink: &CollectingSink, worker_id: u64, dp: u32, seq: u64) -> bool {
    sink.has_seq(worker_id, dp, seq)
        && ingest
            .status(worker_id, dp)
            .is_some_and(|s| s.watermark >= Some(seq))
}

/// Publish empty batches until one reaches the listener *live* (not through replay): from
/// then on the SUB socket is subscribed and live batches flow (ZMQ's slow-joiner window is
/// over). Returns the last seq, once the listener is done with it ([`settled`]: its status
/// counters, `lost_batches` included, are final up to it).
async fn sync_live(
    publisher: &VllmPublisher,
    ingest: &ZmqIngest,
    sink: &CollectingSink,
    worker_id: u64,
    dp: u32,
) -> u64 {
    let start = Instant::now();
    loop {
        let seq = publisher
            .publish(&PublishBatch::new(Vec::new()))
            .await
            .expect("publish");
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            let live = ingest
                .status(worker_id, dp)
                .and_then(|s| s.last_live_seq)
                .is_some_and(|l| l >= seq);
            if live && settled(ingest, sink, worker_id, dp, seq) {
                return seq;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "listener never received a live batch: {:?}",
            ingest.status(worker_id, dp)
        );
    }
}

fn tokens(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

fn local_hashes(tokens: &[u32]) -> Vec<u64> {
    compute_block_hash_for_seq(tokens, BS, &HashOptions::default())
        .into_iter()
        .map(|h| h.0)
        .collect()
}

fn kinds(events: &[RouterEvent]) -> Vec<&'static str> {
    events.iter().map(|e| e.event.data.kind_label()).collect()
}

fn stored(ev: &RouterEvent) -> Vec<(u64, u64)> {
    match &ev.event.data {
        KvCacheEventData::Stored(s) => s
            .blocks
            .iter()
            .map(|b| (b.block_hash.0, b.tokens_hash.0))
            .collect(),
        other => panic!("not a store: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_listener_delivers_stores_removes_and_clears_in_order() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 1, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 1, 0).await;

    let t = tokens(1..13);
    let batches = [
        PublishBatch::new(vec![PublishEvent::stored(
            vec![101, 102],
            None,
            t[..8].to_vec(),
            BS,
        )]),
        PublishBatch::new(vec![PublishEvent::stored(
            vec![103],
            Some(102),
            t[8..].to_vec(),
            BS,
        )])
        .with_encoding(EventEncoding::Map),
        PublishBatch::new(vec![PublishEvent::removed(vec![103])]),
        PublishBatch::new(vec![PublishEvent::Cleared]).with_encoding(EventEncoding::Map),
    ];
    for b in &batches {
        publisher.publish(b).await.unwrap();
    }
    let last = warm + batches.len() as u64;
    wait_until("all four batches", || settled(&ingest, &sink, 1, 0, last)).await;

    let got: Vec<Submitted> = sink.of(1, 0).into_iter().filter(|b| b.seq > warm).collect();
    assert_eq!(
        got.iter().map(|b| b.seq).collect::<Vec<_>>(),
        (warm + 1..=last).collect::<Vec<_>>(),
        "in order, each once"
    );
    let all: Vec<RouterEvent> = got.iter().flat_map(|b| b.events.clone()).collect();
    assert_eq!(kinds(&all), ["stored", "stored", "removed", "cleared"]);
    let want = local_hashes(&t);
    assert_eq!(stored(&all[0]), vec![(101, want[0]), (102, want[1])]);
    assert_eq!(stored(&all[1]), vec![(103, want[2])]);
    assert!(all.iter().all(|e| e.worker_id == 1 && e.event.dp_rank == 0));

    let st = status(&ingest, 1, 0);
    assert_eq!(st.state, ListenerState::Active);
    assert_eq!(st.watermark, Some(last));
    assert!(!st.degraded);
    assert_eq!(st.counters.lost_batches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_ranks_get_their_own_listeners_and_batch_ranks_override() {
    let rank0 = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let rank1 = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&rank0, 5, 0)).unwrap();
    ingest.register(spec_for(&rank1, 5, 1)).unwrap();
    let w0 = sync_live(&rank0, &ingest, &sink, 5, 0).await;
    let w1 = sync_live(&rank1, &ingest, &sink, 5, 1).await;

    let store = |h: u64| PublishEvent::stored(vec![h], None, tokens(1..5), BS);
    // vLLM fills data_parallel_rank; a nil rank falls back to the registered one; a foreign
    // rank on the dp0 stream is honoured for the events (SERVICE.md §5.2).
    rank0
        .publish(&PublishBatch::new(vec![store(10)]))
        .await
        .unwrap();
    rank1
        .publish(&PublishBatch::new(vec![store(11)]).with_dp_rank(1))
        .await
        .unwrap();
    rank0
        .publish(&PublishBatch::new(vec![store(12)]).with_dp_rank(3))
        .await
        .unwrap();
    wait_until("dp0 batches", || sink.has_seq(5, 0, w0 + 2)).await;
    wait_until("dp1 batch", || sink.has_seq(5, 1, w1 + 1)).await;

    let dp0: Vec<RouterEvent> = sink
        .of(5, 0)
        .into_iter()
        .filter(|b| b.seq > w0)
        .flat_map(|b| b.events)
        .collect();
    let dp1: Vec<RouterEvent> = sink
        .of(5, 1)
        .into_iter()
        .filter(|b| b.seq > w1)
        .flat_map(|b| b.events)
        .collect();
    let ranks = |evs: &[RouterEvent]| evs.iter().map(|e| e.event.dp_rank).collect::<Vec<_>>();
    assert_eq!(ranks(&dp0), [0, 3]);
    assert_eq!(ranks(&dp1), [1]);
    assert_eq!(ingest.statuses().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_is_filled_by_replay_with_exactly_the_missing_batches() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 2, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 2, 0).await;

    // Three batches the subscriber never sees live, then a live one: a gap of three.
    let mut missing = Vec::new();
    for h in [21u64, 22, 23] {
        missing.push(
            publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::removed(vec![h])])),
        );
    }
    let live = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![24])]))
        .await
        .unwrap();
    wait_until("the live batch", || settled(&ingest, &sink, 2, 0, live)).await;

    let after: Vec<Submitted> = sink.of(2, 0).into_iter().filter(|b| b.seq > warm).collect();
    assert_eq!(
        after.iter().map(|b| b.seq).collect::<Vec<_>>(),
        vec![missing[0], missing[1], missing[2], live],
        "exactly the missing batches, once each, then the live one"
    );
    let removed: Vec<u64> = after
        .iter()
        .flat_map(|b| b.events.iter())
        .map(|e| match &e.event.data {
            KvCacheEventData::Removed(r) => r.block_hashes[0].0,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(removed, [21, 22, 23, 24]);
    assert!(publisher.replay_requests().contains(&missing[0]));

    let st = status(&ingest, 2, 0);
    assert!(st.counters.gaps >= 1);
    assert_eq!(st.counters.lost_batches, 0);
    assert!(!st.degraded);
    assert!(!st.replaying);
    assert_eq!(st.watermark, Some(live));
}

/// A malformed replay reply (here a 3-byte sequence frame) ends the replay, as in Dynamo, but
/// is counted: the batches before it are applied, the rest of the gap is lost, the live batch
/// follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_replay_reply_ends_the_replay_and_is_counted() {
    let publisher = VllmPublisher::bind(PublisherConfig {
        malformed_replay_seq: Some(1_001),
        ..PublisherConfig::loopback()
    })
    .await
    .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 12, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 12, 0).await;
    assert!(warm < 999, "sync_live took {warm} batches");
    // A gap of batches held for replay: up to 1,000 they replay, 1,001 is answered malformed.
    for _ in warm + 1..1_000 {
        publisher.publish_unsent(&PublishBatch::new(Vec::new()));
    }
    let replayed = publisher.publish_unsent(&PublishBatch::new(Vec::new()));
    let malformed = publisher.publish_unsent(&PublishBatch::new(Vec::new()));
    let lost = publisher.publish_unsent(&PublishBatch::new(Vec::new()));
    assert_eq!((replayed, malformed, lost), (1_000, 1_001, 1_002));
    let live = publisher
        .publish(&PublishBatch::new(Vec::new()))
        .await
        .unwrap();
    wait_until("the live batch", || settled(&ingest, &sink, 12, 0, live)).await;
    assert!(sink.has_seq(12, 0, replayed));
    assert!(!sink.has_seq(12, 0, malformed));
    assert!(!sink.has_seq(12, 0, lost));
    let st = status(&ingest, 12, 0);
    assert_eq!(st.counters.malformed_messages, 1, "{st:?}");
    assert_eq!(st.counters.lost_batches, 2, "{st:?}");
    assert!(!st.degraded, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replay_endpoint_degrades_the_listener_without_stalling_it() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 3, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 3, 0).await;

    publisher.kill_replay();
    publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::Cleared]));
    publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::Cleared]));
    let live = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![31])]))
        .await
        .unwrap();
    wait_until("the live batch after the failed replay", || {
        settled(&ingest, &sink, 3, 0, live)
    })
    .await;
    let st = status(&ingest, 3, 0);
    assert!(st.degraded, "{st:?}");
    assert_eq!(st.state, ListenerState::Active);
    assert_eq!(st.counters.lost_batches, 2);
    assert!(st.counters.replay_failures >= 1);
    assert!(st.last_error.as_deref().unwrap_or("").contains("replay"));

    // Later events keep flowing, in order; a second gap while degraded also passes.
    let next = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![32])]))
        .await
        .unwrap();
    publisher.skip_seqs(1);
    let after_gap = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![33])]))
        .await
        .unwrap();
    wait_until("batches after the degraded gap", || {
        settled(&ingest, &sink, 3, 0, after_gap)
    })
    .await;
    let seqs: Vec<u64> = sink.seqs(3, 0).into_iter().filter(|&s| s > warm).collect();
    assert_eq!(seqs, vec![live, next, after_gap]);
    let st = status(&ingest, 3, 0);
    assert!(st.degraded);
    assert_eq!(st.counters.lost_batches, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_counted_and_never_crash_the_listener() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 4, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 4, 0).await;

    let next = publisher.next_seq().to_be_bytes().to_vec();
    let garbage: Vec<Vec<Vec<u8>>> = vec![
        vec![b"topic".to_vec()],                                        // 1 frame
        vec![b"".to_vec(), next.clone()],                               // 2 frames
        vec![b"".to_vec(), vec![0, 0, 0, 1], b"x".to_vec()],            // 4-byte seq
        vec![b"".to_vec(), next.clone(), b"x".to_vec(), b"y".to_vec()], // 4 frames
        vec![b"".to_vec(), next.clone(), vec![0xc1, 0xff, 0x00]],       // not msgpack
        vec![
            b"".to_vec(),
            u64::MAX.to_be_bytes().to_vec(),
            vec![0x92, 0x01],
        ], // a sequence >= 2^63 (reserved for JetStream, docs/api.md): dropped unread
    ];
    for frames in garbage {
        publisher.send_raw(frames).await.unwrap();
    }
    // A good batch with one bad event in it: the good events survive.
    publisher
        .send_raw(vec![b"kv".to_vec(), next.clone(), {
            let mut b = Vec::new();
            rmp::encode::write_array_len(&mut b, 3).unwrap();
            rmp::encode::write_f64(&mut b, 0.0).unwrap();
            rmp::encode::write_array_len(&mut b, 3).unwrap();
            rmp::encode::write_array_len(&mut b, 2).unwrap();
            rmp::encode::write_str(&mut b, "BlockRemoved").unwrap();
            rmp::encode::write_array_len(&mut b, 1).unwrap();
            rmp::encode::write_uint(&mut b, 41).unwrap();
            rmp::encode::write_array_len(&mut b, 2).unwrap();
            rmp::encode::write_str(&mut b, "Bogus").unwrap();
            rmp::encode::write_uint(&mut b, 1).unwrap();
            rmp::encode::write_array_len(&mut b, 1).unwrap();
            rmp::encode::write_str(&mut b, "AllBlocksCleared").unwrap();
            rmp::encode::write_nil(&mut b).unwrap();
            b
        }])
        .await
        .unwrap();
    let good_seq = u64::from_be_bytes(next.as_slice().try_into().unwrap());
    wait_until("the mixed batch", || {
        settled(&ingest, &sink, 4, 0, good_seq)
    })
    .await;

    let st = status(&ingest, 4, 0);
    // Four malformed frame sets and the reserved sequence; the batch that is not msgpack is
    // the one decode failure (the mixed batch's bad event is a rejected event).
    assert_eq!(st.counters.malformed_messages, 5, "{st:?}");
    assert_eq!(st.counters.decode_failures, 1);
    assert_eq!(st.counters.events_rejected, 1);
    assert_eq!(
        st.counters.publisher_restarts, 0,
        "a corrupt seq is not a restart"
    );
    assert_eq!(st.counters.lost_batches, 0);
    assert_eq!(st.state, ListenerState::Active);
    let batch = sink
        .of(4, 0)
        .into_iter()
        .find(|b| b.seq == good_seq)
        .unwrap();
    assert_eq!(kinds(&batch.events), ["removed", "cleared"]);
    assert!(good_seq > warm);

    // The injected batch used the publisher's next seq; consume it, then traffic flows on.
    publisher.skip_seqs(1);
    let after = publisher
        .publish(&PublishBatch::new(Vec::new()))
        .await
        .unwrap();
    wait_until("a batch after the garbage", || {
        settled(&ingest, &sink, 4, 0, after)
    })
    .await;
    let st = status(&ingest, 4, 0);
    assert_eq!(st.counters.publisher_restarts, 0);
    assert_eq!(st.counters.lost_batches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_from_a_durable_watermark_replays_from_the_next_sequence() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    // Ten batches published while kvindex was down: buffered in the replay ring only.
    for h in 0..10u64 {
        publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::removed(vec![h])]));
    }
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest
        .register(spec_for(&publisher, 6, 0).resuming_after(4))
        .unwrap();
    wait_until("batches 5..=9", || sink.has_seq(6, 0, 9)).await;
    assert_eq!(sink.seqs(6, 0)[..5], [5, 6, 7, 8, 9]);
    assert_eq!(publisher.replay_requests().first(), Some(&5));

    let live = sync_live(&publisher, &ingest, &sink, 6, 0).await;
    let seqs = sink.seqs(6, 0);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(status(&ingest, 6, 0).watermark, Some(live));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_publishers_storing_the_same_prefix_at_once_all_reach_the_sink() {
    const WORKERS: u64 = 6;
    const BLOCKS: u64 = 25;
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    let mut publishers = Vec::new();
    for w in 0..WORKERS {
        let p = Arc::new(
            VllmPublisher::bind(PublisherConfig::loopback())
                .await
                .unwrap(),
        );
        ingest.register(spec_for(&p, 100 + w, 0)).unwrap();
        publishers.push(p);
    }
    let mut warm = Vec::new();
    for (w, p) in publishers.iter().enumerate() {
        warm.push(sync_live(p, &ingest, &sink, 100 + w as u64, 0).await);
    }

    // Every worker stores the same chain, one block per batch, all at the same time.
    let all_tokens = tokens(1..(BLOCKS as u32 * BS + 1));
    let mut tasks = Vec::new();
    for p in &publishers {
        let p = p.clone();
        let all_tokens = all_tokens.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..BLOCKS {
                let start = (b * u64::from(BS)) as usize;
                let block = all_tokens[start..start + BS as usize].to_vec();
                let parent = b.checked_sub(1).map(|x| 1000 + x);
                p.publish(&PublishBatch::new(vec![PublishEvent::stored(
                    vec![1000 + b],
                    parent,
                    block,
                    BS,
                )]))
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let want = local_hashes(&all_tokens);
    for w in 0..WORKERS {
        let last = warm[w as usize] + BLOCKS;
        wait_until("every worker's last store", || {
            sink.has_seq(100 + w, 0, last)
        })
        .await;
        let blocks: Vec<(u64, u64)> = sink
            .of(100 + w, 0)
            .into_iter()
            .filter(|b| b.seq > warm[w as usize])
            .flat_map(|b| b.events)
            .flat_map(|e| stored(&e))
            .collect();
        let expected: Vec<(u64, u64)> = (0..BLOCKS).map(|b| (1000 + b, want[b as usize])).collect();
        assert_eq!(blocks, expected, "worker {w}: every store, in order, once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_keeps_the_watermark_and_resume_catches_up_by_replay() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 7, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 7, 0).await;

    ingest.pause(7, 0).unwrap();
    assert_eq!(status(&ingest, 7, 0).state, ListenerState::Paused);
    assert!(ingest.pause(7, 0).is_err());
    let during = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::Cleared]))
        .await
        .unwrap();
    ingest.resume(7, 0).unwrap();
    assert!(ingest.resume(7, 0).is_err());
    wait_until("the batch published while paused", || {
        settled(&ingest, &sink, 7, 0, during)
    })
    .await;
    assert_eq!(
        sink.seqs(7, 0)
            .into_iter()
            .filter(|&s| s > warm)
            .collect::<Vec<_>>(),
        vec![during]
    );
    assert!(publisher.replay_requests().contains(&(warm + 1)));

    let last = ingest.unregister(7, 0).unwrap();
    assert_eq!(last.watermark, Some(during));
    assert!(ingest.status(7, 0).is_none());
    assert!(ingest.unregister(7, 0).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_validates_endpoints_and_unusable_ones_fail() {
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    let err = ingest
        .register(ListenerSpec::new(1, 0, "tcp://127.0.0.1", BS))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid ZMQ endpoint `tcp://127.0.0.1`: missing TCP port"
    );
    let err = ingest
        .register(ListenerSpec::new(1, 0, "tcp://127.0.0.1:5", BS).with_replay("nope"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid replay endpoint `nope`: invalid ZMQ endpoint `nope`: missing scheme"
    );
    ingest
        .register(ListenerSpec::new(1, 0, "tcp://*:5558", BS))
        .unwrap();
    assert!(ingest
        .register(ListenerSpec::new(1, 0, "tcp://*:5558", BS))
        .is_err());
    wait_until("failed status", || {
        status(&ingest, 1, 0).state == ListenerState::Failed
    })
    .await;
    assert_eq!(
        status(&ingest, 1, 0).last_error.as_deref(),
        Some("failed to connect ZMQ SUB socket to tcp://*:5558: Invalid argument")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_stay_pending_until_the_gate_opens() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::Cleared]));
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(
        &sink,
        IngestConfig {
            start_open: false,
            ..fast_config()
        },
    );
    ingest.register(spec_for(&publisher, 8, 0)).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&ingest, 8, 0).state, ListenerState::Pending);
    assert!(sink.seqs(8, 0).is_empty());
    ingest.open();
    wait_until("the buffered batch after the gate opens", || {
        sink.has_seq(8, 0, 0)
    })
    .await;
    assert_eq!(status(&ingest, 8, 0).state, ListenerState::Active);
}

/// Behind the ready gate a listener connects and holds the live batches it receives, submitting
/// nothing; once the gate opens it submits them in order, then what follows. (`kvindex serve`
/// opens the gate after its peer recovery, so they land on top of the dump.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_gate_live_batches_are_held_then_applied_in_order() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback_without_replay())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(
        &sink,
        IngestConfig {
            start_open: false,
            ..fast_config()
        },
    );
    ingest.register(spec_for(&publisher, 8, 0)).unwrap();
    let held = || status(&ingest, 8, 0).counters.held_before_ready;
    // ZMQ's slow joiner: publish until a batch is held.
    let start = Instant::now();
    while held() == 0 {
        publisher
            .publish(&PublishBatch::new(Vec::new()))
            .await
            .unwrap();
        assert!(start.elapsed() < DEADLINE, "no live batch held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = status(&ingest, 8, 0);
    assert_eq!(s.state, ListenerState::Pending);
    assert!(s.connected, "{s:?}");
    assert!(sink.seqs(8, 0).is_empty(), "submitted behind the gate");
    let store = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::stored(
            vec![1],
            None,
            tokens(1..5),
            BS,
        )]))
        .await
        .unwrap();
    let removal = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![1])]))
        .await
        .unwrap();
    ingest.open();
    wait_until("the held batches and the next ones", || {
        sink.has_seq(8, 0, removal)
    })
    .await;
    let seqs = sink.seqs(8, 0);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] < store && seqs.contains(&store), "{seqs:?}");
    assert_eq!(status(&ingest, 8, 0).state, ListenerState::Active);
}

/// A listener behind the gate whose publisher cannot be reached is `active` as soon as the gate
/// opens, as an ungated one is from the start (Dynamo's: connecting is no condition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_listener_behind_the_gate_becomes_active_when_it_opens() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("tcp://{}", l.local_addr().unwrap())
    };
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(
        &sink,
        IngestConfig {
            start_open: false,
            ..fast_config()
        },
    );
    ingest.register(ListenerSpec::new(8, 0, dead, BS)).unwrap();
    wait_until("a failed connect attempt", || {
        status(&ingest, 8, 0).counters.connect_failures > 0
    })
    .await;
    assert_eq!(status(&ingest, 8, 0).state, ListenerState::Pending);
    ingest.open();
    wait_until("active", || {
        status(&ingest, 8, 0).state == ListenerState::Active
    })
    .await;
    assert!(!status(&ingest, 8, 0).connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_is_followed_from_its_new_sequence() {
    let first = VllmPublisher::bind(PublisherConfig::loopback_without_replay())
        .await
        .unwrap();
    let endpoint = first.endpoint().to_owned();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest
        .register(ListenerSpec::new(9, 0, endpoint.clone(), BS))
        .unwrap();
    sync_live(&first, &ingest, &sink, 9, 0).await;
    for _ in 0..100 {
        first.publish(&PublishBatch::new(Vec::new())).await.unwrap();
    }
    let old = first.next_seq() - 1;
    wait_until("the first publisher's last batch", || {
        sink.has_seq(9, 0, old)
    })
    .await;
    drop(first);
    wait_until("the listener to notice the disconnect", || {
        !status(&ingest, 9, 0).connected
    })
    .await;
    // While the publisher is away, the listener's own reconnection attempts fail visibly.
    wait_until("a failed reconnection in the status", || {
        status(&ingest, 9, 0).counters.connect_failures >= 1
    })
    .await;
    let st = status(&ingest, 9, 0);
    let error = st.last_error.clone().unwrap_or_default();
    assert!(error.to_lowercase().contains("refused"), "{st:?}");
    assert_eq!(st.counters.disconnects, 1, "{st:?}");

    // The engine restarts on the same port and counts from 0 again.
    let second = VllmPublisher::bind(PublisherConfig {
        endpoint: endpoint.clone(),
        ..PublisherConfig::loopback_without_replay()
    })
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        second
            .publish(&PublishBatch::new(vec![PublishEvent::Cleared]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let st = status(&ingest, 9, 0);
        if st.counters.publisher_restarts >= 1 && st.watermark < Some(old) {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "restart never detected: {st:?}");
    }
    let st = status(&ingest, 9, 0);
    assert!(st.connected, "reconnected by itself: {st:?}");
    assert_eq!(st.state, ListenerState::Active);
    assert_eq!(st.last_error, None, "{st:?}");
}

/// Batches a publisher sent just before its connection closed reach the sink: the listener
/// takes what is already in its socket before it replaces the socket (there is no replay
/// endpoint to fill a loss). A relay in front of the publisher closes the connection right
/// after passing on the last byte of the last batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_sent_just_before_the_connection_closes_are_not_lost() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BATCHES: usize = 50;
    for round in 0..5u64 {
        let publisher = VllmPublisher::bind(PublisherConfig::loopback_without_replay())
            .await
            .unwrap();
        let real = publisher
            .endpoint()
            .strip_prefix("tcp://")
            .unwrap()
            .to_string();
        let front = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let endpoint = format!("tcp://{}", front.local_addr().unwrap());
        // Armed: count the bytes passed downstream, and close once `close_at` have passed.
        // A piece is counted (and `armed` read) *before* it is written on: the listener may
        // have the batch, and the test read the count, before this task runs again after the
        // write (a count after the write measured a batch as 0 bytes, or counted the last
        // batch of `sync_live` into it).
        let armed = Arc::new(AtomicBool::new(false));
        let passed = Arc::new(AtomicUsize::new(0));
        let close_at = Arc::new(AtomicUsize::new(usize::MAX));
        let (a, p, c) = (
            Arc::clone(&armed),
            Arc::clone(&passed),
            Arc::clone(&close_at),
        );
        tokio::spawn(async move {
            while let Ok((conn, _)) = front.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(real.as_str()).await else {
                    continue;
                };
                let (a, p, c) = (Arc::clone(&a), Arc::clone(&p), Arc::clone(&c));
                tokio::spawn(async move {
                    let (mut conn_r, mut conn_w) = conn.into_split();
                    let (mut up_r, mut up_w) = up.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut conn_r, &mut up_w).await;
                    });
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = up_r.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let counted = a
                            .load(Ordering::SeqCst)
                            .then(|| p.fetch_add(n, Ordering::SeqCst) + n);
                        if conn_w.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if counted.is_some_and(|total| total >= c.load(Ordering::SeqCst)) {
                            // Once: later connections are relayed as usual.
                            a.store(false, Ordering::SeqCst);
                            break;
                        }
                    }
                    // Dropping both halves closes the connection.
                });
            }
        });
        let sink = Arc::new(CollectingSink::default());
        let ingest = ingest(&sink, fast_config());
        ingest
            .register(ListenerSpec::new(13, 0, endpoint.as_str(), BS))
            .unwrap();
        sync_live(&publisher, &ingest, &sink, 13, 0).await;
        // (Batches published before the subscription took hold count as lost.)
        let lost_before = status(&ingest, 13, 0).counters.lost_batches;
        // The bytes of one batch on the wire: count one through.
        armed.store(true, Ordering::SeqCst);
        let one = publisher
            .publish(&PublishBatch::new(Vec::new()))
            .await
            .unwrap();
        wait_until("one counted batch", || sink.has_seq(13, 0, one)).await;
        let per_message = passed.swap(0, Ordering::SeqCst);
        close_at.store(BATCHES * per_message, Ordering::SeqCst);
        let mut last = 0;
        for _ in 0..BATCHES {
            last = publisher
                .publish(&PublishBatch::new(Vec::new()))
                .await
                .unwrap();
        }
        wait_until("the connection to close", || {
            status(&ingest, 13, 0).counters.disconnects >= 1
        })
        .await;
        wait_until("the last batch", || settled(&ingest, &sink, 13, 0, last)).await;
        let st = status(&ingest, 13, 0);
        assert_eq!(
            st.counters.lost_batches, lost_before,
            "round {round}: {st:?}"
        );
        assert_eq!(st.watermark, Some(last), "round {round}: {st:?}");
        assert!(passed.load(Ordering::SeqCst) >= BATCHES * per_message);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_replies_without_topic_frame_are_accepted_too() {
    // Older / hand-written publishers answer `[b"", seq, payload]` (SERVICE.md §7.2).
    let publisher = VllmPublisher::bind(PublisherConfig {
        replay_with_topic: false,
        topic: b"kv-events".to_vec(),
        ..PublisherConfig::loopback()
    })
    .await
    .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 10, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 10, 0).await;
    let missing = publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::Cleared]));
    let live = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::Cleared]))
        .await
        .unwrap();
    wait_until("the live batch", || settled(&ingest, &sink, 10, 0, live)).await;
    assert_eq!(
        sink.seqs(10, 0)
            .into_iter()
            .filter(|&s| s > warm)
            .collect::<Vec<_>>(),
        vec![missing, live]
    );
    assert_eq!(status(&ingest, 10, 0).counters.lost_batches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_endpoint_that_never_existed_degrades_but_live_batches_flow() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback_without_replay())
        .await
        .unwrap();
    // A port nothing listens on: bind one, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_endpoint = format!("tcp://{}", dead.local_addr().unwrap());
    drop(dead);
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest
        .register(ListenerSpec::new(11, 0, publisher.endpoint(), BS).with_replay(dead_endpoint))
        .unwrap();
    wait_until("degraded after the start-up catch-up fails", || {
        status(&ingest, 11, 0).degraded
    })
    .await;
    let warm = sync_live(&publisher, &ingest, &sink, 11, 0).await;
    publisher.skip_seqs(2);
    let live = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::Cleared]))
        .await
        .unwrap();
    wait_until("a live batch after a gap", || {
        settled(&ingest, &sink, 11, 0, live)
    })
    .await;
    let st = status(&ingest, 11, 0);
    assert!(st.degraded);
    assert!(st.counters.lost_batches >= 2);
    assert!(sink.seqs(11, 0).iter().all(|&s| s <= warm || s == live));
}

/// The 64-byte ZMTP 3.0 greeting of a NULL-mechanism peer, and its READY command as a PUB.
fn zmtp_pub_handshake() -> Vec<u8> {
    let mut out = vec![0u8; 64];
    out[0] = 0xff;
    out[9] = 0x7f;
    out[10] = 3; // version 3.0
    out[12..16].copy_from_slice(b"NULL");
    let mut ready = vec![5u8];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&3u32.to_be_bytes());
    ready.extend_from_slice(b"PUB");
    out.push(0b100); // command, short
    out.push(ready.len() as u8);
    out.extend(ready);
    out
}

/// A publisher that announces a frame of 2^62 bytes (the `zeromq` crate would reserve that much
/// and abort the process) gets its connection closed by the frame guard before the frame's
/// body; the process survives (this test aborts without the guard), the listener is not
/// failed, another listener delivers batches afterwards, and the cut listener reconnects and
/// delivers too. (The cut can come while the `zeromq` crate is still setting the connection
/// up; its own reconnection then never started, and 4 runs in 20 stayed "connected" without
/// receiving anything before the listener replaced the socket itself.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_announcing_a_huge_frame_is_cut_off_and_the_process_survives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let real = publisher
        .endpoint()
        .strip_prefix("tcp://")
        .expect("tcp endpoint")
        .to_string();
    // The endpoint the listener is given: the first connection gets the huge frame, every
    // later one is relayed to the real publisher.
    let front = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let endpoint = format!("tcp://{}", front.local_addr().unwrap());
    let hostile_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&hostile_done);
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut conn, _)) = front.accept().await {
            if first {
                first = false;
                tokio::spawn({
                    let done = Arc::clone(&done);
                    async move {
                        let _ = conn.write_all(&zmtp_pub_handshake()).await;
                        // Read the subscriber's greeting, READY and subscription meanwhile.
                        let mut sink = [0u8; 4096];
                        let _ =
                            tokio::time::timeout(Duration::from_millis(300), conn.read(&mut sink))
                                .await;
                        let mut huge = vec![0b010u8];
                        huge.extend_from_slice(&(1u64 << 62).to_be_bytes());
                        let _ = conn.write_all(&huge).await;
                        // The guard closes the connection rather than read the body.
                        let mut rest = Vec::new();
                        let _ = conn.read_to_end(&mut rest).await;
                        done.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                });
                continue;
            }
            let real = real.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(real).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest
        .register(ListenerSpec::new(5, 0, endpoint.as_str(), BS))
        .unwrap();
    wait_until("the hostile connection was cut off", || {
        hostile_done.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    // Still here (not aborted); the cut listener is not failed, and a listener of the real
    // publisher delivers.
    assert_ne!(status(&ingest, 5, 0).state, ListenerState::Failed);
    ingest.register(spec_for(&publisher, 6, 0)).unwrap();
    let seq = sync_live(&publisher, &ingest, &sink, 6, 0).await;
    assert!(sink.has_seq(6, 0, seq));
    let seq = sync_live(&publisher, &ingest, &sink, 5, 0).await;
    assert!(sink.has_seq(5, 0, seq));
    // Cut during the handshake (a failed connect) or after it (a lost connection).
    let st = status(&ingest, 5, 0);
    assert!(
        st.counters.disconnects + st.counters.connect_failures >= 1,
        "{st:?}"
    );
}

/// A publisher whose frames are each within the message limit but, with MORE flags, add up
/// to one message over it (the review's 128 frames of 16 MiB grew the process by 2 GiB with
/// every counter at 0), or to more frames than the limit, is cut off at the frame that crosses
/// it: the listener says why in `last_error` (kept after it reconnects), counts the
/// disconnect, reconnects and delivers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_message_over_the_limits_cuts_the_connection_and_says_why() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback_without_replay())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(
        &sink,
        IngestConfig {
            max_message_bytes: 1 << 20,
            ..fast_config()
        },
    );
    ingest.register(spec_for(&publisher, 12, 0)).unwrap();
    sync_live(&publisher, &ingest, &sink, 12, 0).await;

    let cases: [(Vec<Vec<u8>>, &str); 2] = [
        // Five frames of 300 KiB: each under 1 MiB, 1.5 MiB together.
        (
            vec![vec![0u8; 300 << 10]; 5],
            "multipart message of at least 1228800 bytes, over the limit of 1048576 bytes",
        ),
        // Twelve empty frames.
        (
            vec![Vec::new(); 12],
            "multipart message of more than 8 frames",
        ),
    ];
    for (round, (frames, reason)) in cases.into_iter().enumerate() {
        let before = status(&ingest, 12, 0).counters.disconnects;
        publisher.send_raw(frames).await.unwrap();
        wait_until("the cut-off in the status", || {
            let st = status(&ingest, 12, 0);
            st.counters.disconnects > before
                && st.last_error.as_deref().is_some_and(|e| e.contains(reason))
        })
        .await;
        // It reconnects and delivers again; the cause stays the last problem.
        let seq = sync_live(&publisher, &ingest, &sink, 12, 0).await;
        assert!(sink.has_seq(12, 0, seq));
        let st = status(&ingest, 12, 0);
        assert_eq!(st.state, ListenerState::Active, "round {round}: {st:?}");
        let error = st.last_error.clone().unwrap_or_default();
        assert!(
            error.contains("connection closed by the frame guard") && error.contains(reason),
            "round {round}: {error}"
        );
        assert_eq!(
            st.counters.malformed_messages, 0,
            "never handed over: {st:?}"
        );
    }
}

/// A replay that would bring back more payload bytes than `replay_max_bytes` stops at the
/// batch that crosses it: the batches before it are applied, the rest are counted lost, and
/// live batches keep flowing.
#[tokio::test]
async fn a_replay_over_its_byte_limit_keeps_what_fits_and_loses_the_rest() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(CollectingSink::default());
    let big = |h: u64| {
        PublishBatch::new(vec![PublishEvent::stored(
            (0..100).map(|k| h * 1000 + k).collect(),
            None,
            tokens(1..401),
            BS,
        )])
    };
    // Every `big` batch encodes to the same size (same shape, same-width numbers).
    let payload = kvindex_server::zmq::test_publisher::encode_batch(&big(2)).len();
    assert_eq!(
        payload,
        kvindex_server::zmq::test_publisher::encode_batch(&big(4)).len()
    );
    let ingest = ingest(
        &sink,
        IngestConfig {
            // Room for one of these batches and a half.
            replay_max_bytes: payload + payload / 2,
            ..fast_config()
        },
    );
    ingest.register(spec_for(&publisher, 9, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink, 9, 0).await;

    let missing: Vec<u64> = (2..5).map(|h| publisher.publish_unsent(&big(h))).collect();
    let live = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![7])]))
        .await
        .unwrap();
    wait_until("the live batch", || settled(&ingest, &sink, 9, 0, live)).await;

    let after: Vec<u64> = sink.seqs(9, 0).into_iter().filter(|&s| s > warm).collect();
    assert_eq!(
        after,
        vec![missing[0], live],
        "the first missing batch fits, then the live one"
    );
    let st = status(&ingest, 9, 0);
    assert_eq!(st.counters.lost_batches, 2, "{st:?}");
    assert_eq!(st.state, ListenerState::Active);
}

/// A listener whose publisher is not there reports why in its status: the refused
/// connection, not the handshake failure its socket sees on the frame guard's loopback side.
#[tokio::test]
async fn a_refused_connection_is_reported_as_such() {
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        l.local_addr().unwrap().port()
    };
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    let endpoint = format!("tcp://127.0.0.1:{port}");
    ingest
        .register(ListenerSpec::new(11, 0, endpoint.as_str(), BS))
        .unwrap();
    wait_until("a connection error in the status", || {
        status(&ingest, 11, 0).last_error.is_some()
    })
    .await;
    let st = status(&ingest, 11, 0);
    let error = st.last_error.clone().unwrap_or_default();
    assert!(error.contains(&endpoint), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert!(!st.connected);
    assert!(st.counters.connect_failures >= 1, "{st:?}");
}

/// Refuses, as fenced, the batches of every listener generation but the current one, and
/// records `(generation, seq)` of every call.
#[derive(Default)]
struct FencingSink {
    current: std::sync::atomic::AtomicU64,
    calls: Mutex<Vec<(u64, u64)>>,
}

impl EventSink for FencingSink {
    fn submit(
        &self,
        _worker_id: u64,
        _dp_rank: u32,
        generation: u64,
        source_seq: u64,
        _events: Vec<RouterEvent>,
    ) -> Result<(), SinkError> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((generation, source_seq));
        if generation == self.current.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(SinkError::Fenced("superseded".into()))
        }
    }
}

impl FencingSink {
    fn saw(&self, generation: u64, seq: u64) -> bool {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(generation, seq))
    }
}

/// A fenced batch does not move the listener's watermark (its status is shared with the
/// listener resumed in its place): the resumed listener, with a new generation, fetches the
/// refused batches again by replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_batches_leave_the_watermark_for_the_resumed_listener() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(FencingSink::default());
    sink.current.store(1, std::sync::atomic::Ordering::SeqCst);
    let ingest = ZmqIngest::new(
        tokio::runtime::Handle::current(),
        sink.clone(),
        fast_config(),
    );
    // Generation 0: its first batch is refused as fenced, and its task ends there.
    ingest.register(spec_for(&publisher, 7, 0)).unwrap();
    let start = Instant::now();
    let refused = loop {
        let seq = publisher
            .publish(&PublishBatch::new(vec![PublishEvent::Cleared]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if (0..=seq).any(|s| sink.saw(0, s)) {
            break seq;
        }
        assert!(start.elapsed() < DEADLINE, "no batch reached the sink");
    };
    let calls = sink.calls.lock().unwrap_or_else(|e| e.into_inner()).len();
    assert_eq!(calls, 1, "the fenced task went on submitting");
    let st = status(&ingest, 7, 0);
    assert_eq!(st.watermark, None, "a fenced batch moved the watermark");
    assert_eq!(st.counters.lost_batches, 0);
    // The fenced task ended: its status does not claim a live connection.
    wait_until("the fenced task's status", || {
        let st = status(&ingest, 7, 0);
        !st.connected && st.last_error.is_some_and(|e| e.contains("fenced"))
    })
    .await;

    ingest.pause(7, 0).unwrap();
    ingest.resume_with_generation(7, 0, 1).unwrap();
    // The status watermark moves only once the sink has returned: both are waited for.
    wait_until(
        "the refused batches, replayed to the resumed listener and in its watermark",
        || {
            (0..=refused).all(|seq| sink.saw(1, seq))
                && status(&ingest, 7, 0).watermark >= Some(refused)
        },
    )
    .await;
}

/// Publish empty batches until the listener has seen one live (ZMQ's slow joiner), whatever
/// it did with it; returns the last one published.
async fn until_seen_live(publisher: &VllmPublisher, ingest: &ZmqIngest, worker_id: u64) -> u64 {
    let start = Instant::now();
    loop {
        let seq = publisher
            .publish(&PublishBatch::new(Vec::new()))
            .await
            .expect("publish");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if status(ingest, worker_id, 0).last_live_seq.is_some() {
            return seq;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no live batch: {:?}",
            status(ingest, worker_id, 0)
        );
    }
}

/// The engine restarted while kvindex was down (it counts from 0 again): kvindex resumes after
/// the old incarnation's durable watermark (1000), the catch-up replay from 1001 finds nothing,
/// and the first live batch is at or below 1000 — which a PUB socket only sends if its engine
/// restarted. It is taken as a publisher restart: the new incarnation's batches are replayed
/// from 0 and indexed. Before, every one of them was dropped as stale until the engine's
/// sequence passed 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restarted_while_the_listener_was_down_is_followed_from_0() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    // The new incarnation's first batches, published while kvindex was down.
    for h in 0..3u64 {
        publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::removed(vec![h])]));
    }
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest
        .register(spec_for(&publisher, 6, 0).resuming_after(1000))
        .unwrap();
    until_seen_live(&publisher, &ingest, 6).await;
    let marker = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![99])]))
        .await
        .unwrap();
    wait_until("the new incarnation's batches in the sink", || {
        settled(&ingest, &sink, 6, 0, marker)
    })
    .await;
    assert_eq!(
        sink.seqs(6, 0),
        (0..=marker).collect::<Vec<_>>(),
        "every batch of the new incarnation, once, in order"
    );
    let st = status(&ingest, 6, 0);
    assert_eq!(st.counters.publisher_restarts, 1, "{st:?}");
    assert_eq!(st.counters.lost_batches, 0, "{st:?}");
    assert_eq!(
        publisher.replay_requests()[..2],
        [1001, 0],
        "the catch-up after the old watermark, then the new incarnation from 0"
    );
}

/// The same after a pause: the engine restarts while the listener is paused; the resumed
/// listener's first live batch is below the kept watermark, and the new incarnation is
/// followed from 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_restarted_while_the_listener_was_paused_is_followed_from_0() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    // The old incarnation is well ahead of where the new one gets during the test.
    for _ in 0..1000 {
        publisher.publish_unsent(&PublishBatch::new(Vec::new()));
    }
    let sink = Arc::new(CollectingSink::default());
    let ingest = ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 7, 0)).unwrap();
    let old = sync_live(&publisher, &ingest, &sink, 7, 0).await;
    assert!(old >= 1000);
    ingest.pause(7, 0).unwrap();
    let before = sink.seqs(7, 0).len();

    publisher.restart_sequence();
    for h in 0..3u64 {
        publisher.publish_unsent(&PublishBatch::new(vec![PublishEvent::removed(vec![h])]));
    }
    ingest.resume(7, 0).unwrap();
    until_seen_live(&publisher, &ingest, 7).await;
    let marker = publisher
        .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![99])]))
        .await
        .unwrap();
    assert!(marker < old);
    wait_until("the new incarnation's batches in the sink", || {
        sink.has_seq(7, 0, marker)
            && status(&ingest, 7, 0).watermark == Some(marker)
            && sink.seqs(7, 0).len() > before
    })
    .await;
    assert_eq!(
        sink.seqs(7, 0)[before..],
        (0..=marker).collect::<Vec<_>>(),
        "every batch of the new incarnation, once, in order"
    );
    let st = status(&ingest, 7, 0);
    assert_eq!(st.counters.publisher_restarts, 1, "{st:?}");
    assert_eq!(st.counters.lost_batches, 0, "{st:?}");
}

/// A sink that refuses one batch once (`once`), and every batch from a sequence on (`from`);
/// collects what it takes.
#[derive(Default)]
struct RefusingSink {
    taken: CollectingSink,
    once: Mutex<Option<(u64, SinkError)>>,
    from: Mutex<Option<(u64, SinkError)>>,
    refused: Mutex<Vec<u64>>,
}

impl EventSink for RefusingSink {
    fn submit(
        &self,
        worker_id: u64,
        dp_rank: u32,
        generation: u64,
        source_seq: u64,
        events: Vec<RouterEvent>,
    ) -> Result<(), SinkError> {
        let lock = |m: &Mutex<Option<(u64, SinkError)>>| {
            m.lock().unwrap_or_else(|e| e.into_inner()).clone()
        };
        let once = {
            let mut once = self.once.lock().unwrap_or_else(|e| e.into_inner());
            match once.take() {
                Some((seq, e)) if seq == source_seq => Some(e),
                other => {
                    *once = other;
                    None
                }
            }
        };
        let refusal =
            once.or_else(|| lock(&self.from).and_then(|(s, e)| (source_seq >= s).then_some(e)));
        if let Some(e) = refusal {
            self.refused
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(source_seq);
            return Err(e);
        }
        self.taken
            .submit(worker_id, dp_rank, generation, source_seq, events)
    }
}

impl RefusingSink {
    fn refused(&self) -> Vec<u64> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn refusing_ingest(sink: &Arc<RefusingSink>, config: IngestConfig) -> ZmqIngest {
    ZmqIngest::new(tokio::runtime::Handle::current(), sink.clone(), config)
}

/// A transient `SinkError::Unavailable` on one batch in the middle of a replay: the replay
/// stops there (the watermark stays before it), and once the sink's backoff is over — the
/// engine idle meanwhile — the refused batch and those after it are asked for again. Before,
/// the replay went on with the next batch, the watermark jumped over the refused one, which
/// was counted lost and never asked for again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_sink_refuses_for_now_inside_a_replay_is_asked_for_again() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(RefusingSink::default());
    let config = IngestConfig {
        sink_retry_backoff: Duration::from_millis(50),
        ..fast_config()
    };
    let ingest = refusing_ingest(&sink, config);
    ingest.register(spec_for(&publisher, 6, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink.taken, 6, 0).await;

    let removed = |h| PublishBatch::new(vec![PublishEvent::removed(vec![h])]);
    let a = publisher.publish_unsent(&removed(201));
    let b = publisher.publish_unsent(&removed(202));
    let c = publisher.publish_unsent(&removed(203));
    *sink.once.lock().unwrap() = Some((b, SinkError::Unavailable("transient".into())));
    // Its gap asks for a, b, c; the sink refuses b.
    let live = publisher.publish(&removed(204)).await.unwrap();
    wait_until("the live batch, after the refused one", || {
        settled(&ingest, &sink.taken, 6, 0, live)
    })
    .await;
    let next = publisher.publish(&removed(205)).await.unwrap();
    wait_until("the next live batch", || {
        settled(&ingest, &sink.taken, 6, 0, next)
    })
    .await;

    assert_eq!(sink.refused(), [b]);
    let after: Vec<u64> = sink
        .taken
        .seqs(6, 0)
        .into_iter()
        .filter(|&s| s > warm)
        .collect();
    assert_eq!(after, [a, b, c, live, next], "each once, in order");
    assert!(
        publisher.replay_requests().contains(&b),
        "{:?}",
        publisher.replay_requests()
    );
    let st = status(&ingest, 6, 0);
    assert_eq!(st.counters.lost_batches, 0, "{st:?}");
    assert_eq!(st.counters.sink_errors, 1, "{st:?}");
}

/// While the sink refuses batches as unavailable, live batches do not each start a replay of
/// the engine's whole buffer: until the backoff is over (here an hour: never during the test)
/// they are counted as deferred and the engine is asked for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_unavailable_for_a_while_gets_no_replay_per_live_batch() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(RefusingSink::default());
    let config = IngestConfig {
        sink_retry_backoff: Duration::from_secs(3600),
        sink_retry_backoff_max: Duration::from_secs(3600),
        ..fast_config()
    };
    let ingest = refusing_ingest(&sink, config);
    ingest.register(spec_for(&publisher, 6, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink.taken, 6, 0).await;
    let replays = publisher.replay_requests().len();

    *sink.from.lock().unwrap() = Some((warm + 1, SinkError::Unavailable("log busy".into())));
    let mut last = 0;
    for h in 0..21u64 {
        last = publisher
            .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![h])]))
            .await
            .unwrap();
    }
    wait_until("every live batch seen", || {
        status(&ingest, 6, 0).last_live_seq == Some(last)
    })
    .await;
    // A replay per batch would have run before the last one was even read.
    assert_eq!(
        publisher.replay_requests().len(),
        replays,
        "{:?}",
        publisher.replay_requests()
    );
    wait_until("the last batch deferred", || {
        status(&ingest, 6, 0).counters.deferred_batches == 20
    })
    .await;
    let st = status(&ingest, 6, 0);
    assert_eq!(sink.refused(), [warm + 1]);
    assert_eq!(st.counters.sink_errors, 1, "{st:?}");
    assert_eq!(st.watermark, Some(warm), "{st:?}");
    assert_eq!(st.counters.lost_batches, 0, "{st:?}");
    assert_eq!(publisher.replay_requests().len(), replays);
}

/// A sink failed for good (the log writer stopped): the listener submits nothing more and
/// makes no more replays; what it receives is counted as deferred, and the failure is its
/// `last_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sink_gets_no_more_batches_or_replays() {
    let publisher = VllmPublisher::bind(PublisherConfig::loopback())
        .await
        .unwrap();
    let sink = Arc::new(RefusingSink::default());
    let ingest = refusing_ingest(&sink, fast_config());
    ingest.register(spec_for(&publisher, 6, 0)).unwrap();
    let warm = sync_live(&publisher, &ingest, &sink.taken, 6, 0).await;
    let replays = publisher.replay_requests().len();

    *sink.from.lock().unwrap() = Some((warm + 1, SinkError::Failed("writer stopped".into())));
    let mut last = 0;
    for h in 0..21u64 {
        last = publisher
            .publish(&PublishBatch::new(vec![PublishEvent::removed(vec![h])]))
            .await
            .unwrap();
    }
    wait_until("the last batch deferred", || {
        let st = status(&ingest, 6, 0);
        st.last_live_seq == Some(last) && st.counters.deferred_batches == 20
    })
    .await;
    let st = status(&ingest, 6, 0);
    assert_eq!(sink.refused(), [warm + 1], "submitted after the failure");
    assert_eq!(publisher.replay_requests().len(), replays);
    assert_eq!(st.watermark, Some(warm), "{st:?}");
    assert_eq!(
        st.last_error.as_deref(),
        Some("sink failed: writer stopped"),
        "{st:?}"
    );
}
