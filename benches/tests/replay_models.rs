//! Correctness of the §3 replay comparison on a slice of the real trace: the batch stream's
//! counts, and that every approach that claims to recover a gap rebuilds exactly the state of
//! the workload's simulated caches (the vLLM model must also *say* when it cannot). No timing.

use kvindex_benches::replay_models::consumer::Consumer;
use kvindex_benches::replay_models::dynamo_local::{DynamoLocalIndexer, DynamoReply};
use kvindex_benches::replay_models::kvindex_log;
use kvindex_benches::replay_models::stream::{expected_digest, first_event_ids, EventStream};
use kvindex_benches::replay_models::vllm_buffer::{decode_payload, VllmReplayBuffer};
use kvindex_benches::workload::{self, Workload, WorkloadConfig};

fn slice_workload() -> Workload {
    let path = workload::default_trace_path();
    let trace = workload::load_trace(&path).unwrap_or_else(|e| {
        panic!(
            "the trace is needed for this test ({}): {e}",
            path.display()
        )
    });
    // Two workers, small caches: long per-worker streams with many evictions.
    let cfg = WorkloadConfig {
        length_factor: 4,
        duplication: 2,
        workers: 2,
        capacity: 300,
        limit_requests: Some(150),
        seed: 42,
    };
    workload::generate(&trace, &cfg).expect("workload generation")
}

const VLLM_CAP: usize = 40;
const DYNAMO_CAP: usize = 30;

struct Publishers {
    vllm: Vec<VllmReplayBuffer>,
    dynamo: Vec<DynamoLocalIndexer>,
}

fn publish(stream: &EventStream, vllm_cap: usize) -> Publishers {
    let n = stream.per_worker.len();
    let mut vllm: Vec<_> = (0..n)
        .map(|_| VllmReplayBuffer::new(vllm_cap).expect("buffer"))
        .collect();
    let mut dynamo: Vec<_> = (0..n)
        .map(|_| DynamoLocalIndexer::new(DYNAMO_CAP).expect("local indexer"))
        .collect();
    for (i, b) in stream.batches.iter().enumerate() {
        let w = b.worker_id as usize;
        assert_eq!(
            vllm[w].publish(i as f64, &b.events).expect("publish"),
            b.seq
        );
        for e in &b.events {
            dynamo[w].apply(e).expect("Dynamo tree accepts the stream");
        }
    }
    Publishers { vllm, dynamo }
}

/// A consumer that has every batch except `worker`'s from `seq` on.
fn consumer_missing(stream: &EventStream, worker: u64, seq: u64) -> Consumer {
    let c = Consumer::new(1).expect("consumer");
    for b in &stream.batches {
        if b.worker_id == worker && b.seq >= seq {
            continue;
        }
        for e in &b.events {
            c.apply(e.clone()).expect("apply");
        }
    }
    c
}

#[test]
fn batches_cover_the_event_stream() {
    let wl = slice_workload();
    let stream = EventStream::from_workload(&wl).expect("stream");
    assert_eq!(stream.event_count(), wl.counts.events);
    assert_eq!(
        stream.per_worker.iter().sum::<u64>(),
        stream.batches.len() as u64
    );
    // At most one stored and one removed event per request, all of one worker, seqs dense.
    let mut next = vec![0u64; stream.per_worker.len()];
    for b in &stream.batches {
        assert!((1..=2).contains(&b.events.len()));
        assert!(b.events.iter().all(|e| e.worker_id == b.worker_id));
        assert_eq!(b.seq, next[b.worker_id as usize]);
        next[b.worker_id as usize] += 1;
    }
    assert!(stream.batches.len() as u64 <= wl.counts.requests);
    // Each worker's stream is longer than the vLLM buffer (in batches; Dynamo's, in events, is
    // smaller still), so both regimes are exercised below.
    for &n in &stream.per_worker {
        assert!(n as usize > VLLM_CAP, "{n} batches");
    }
}

#[test]
fn vllm_payloads_round_trip_and_buffer_is_bounded() {
    let wl = slice_workload();
    let stream = EventStream::from_workload(&wl).expect("stream");
    let p = publish(&stream, VLLM_CAP);
    for (w, buf) in p.vllm.iter().enumerate() {
        let total = stream.per_worker[w];
        assert_eq!(buf.next_seq(), total);
        assert_eq!(buf.oldest_seq(), Some(total - VLLM_CAP as u64));
        let all = buf.replay_since(0);
        assert!(!all.complete, "the oldest batches must be reported lost");
        assert_eq!(all.batches.len(), VLLM_CAP);
        let originals: Vec<_> = stream.worker_batches(w as u64).collect();
        for (seq, payload) in &all.batches {
            let decoded = decode_payload(payload).expect("decode");
            assert_eq!(&decoded.events, &originals[*seq as usize].events);
        }
        assert!(buf.replay_since(total - 5).complete);
        assert_eq!(buf.replay_since(total - 5).batches.len(), 5);
    }
}

#[test]
fn every_recovering_approach_reaches_the_final_state() {
    let wl = slice_workload();
    let stream = EventStream::from_workload(&wl).expect("stream");
    let expected = expected_digest(&wl);
    assert!(expected.pairs > 0);
    let p = publish(&stream, VLLM_CAP);
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot_after = stream.batches.len() - 20;
    let log = kvindex_log::write(&dir.path().join("data"), &stream, Some(snapshot_after), 1)
        .expect("write the log");
    assert_eq!(log.written_digest, expected);
    assert_eq!(log.end_lsn - 1, stream.event_count());
    let ids = first_event_ids(&stream);

    let worker = 0u64;
    let total = stream.per_worker[worker as usize];
    let mut dynamo_kinds = Vec::new();
    for age in [1u64, 10, 25, 35, 60, total] {
        let start = total - age;
        // kvindex: the log always has the history.
        let c = consumer_missing(&stream, worker, start);
        let events = log.events_since(worker, start).expect("read the log");
        let in_stream: usize = stream
            .worker_batches(worker)
            .skip(start as usize)
            .map(|b| b.events.len())
            .sum();
        assert_eq!(events.len(), in_stream, "age {age}");
        for e in events {
            c.apply(e).expect("apply");
        }
        assert_eq!(c.digest().expect("digest"), expected, "kvindex, age {age}");

        // vLLM: complete inside the buffer, and then exact; reported lost beyond it.
        let reply = p.vllm[worker as usize].replay_since(start);
        assert_eq!(reply.complete, age as usize <= VLLM_CAP, "age {age}");
        let c = consumer_missing(&stream, worker, start);
        for (_, payload) in &reply.batches {
            for e in decode_payload(payload).expect("decode").events {
                c.apply(e).expect("apply");
            }
        }
        let got = c.digest().expect("digest");
        if reply.complete {
            assert_eq!(got, expected, "vLLM, age {age}");
        } else if age == 60 {
            // Batches 76..96 of worker 0 are lost and matter: the consumer keeps blocks their
            // removals would have dropped. (A gap can also be harmless — when the buffered
            // batches alone rebuild the worker's whole cache, as for age = total here — but
            // the consumer cannot tell which case it is in.)
            assert_ne!(got, expected, "vLLM beyond its buffer, age {age}");
        }

        // Dynamo: buffered events, or a tree dump that replaces the worker's state.
        let start_id = ids[&worker][start as usize];
        let reply = p.dynamo[worker as usize].events_since(Some(start_id));
        let c = consumer_missing(&stream, worker, start);
        dynamo_kinds.push(reply.kind());
        match &reply {
            DynamoReply::Events { events, .. } => {
                assert!(
                    start_id
                        >= p.dynamo[worker as usize]
                            .oldest_event_id()
                            .expect("buffered")
                );
                for e in events {
                    c.apply(e.clone()).expect("apply");
                }
            }
            DynamoReply::TreeDump { events, .. } => {
                assert!(
                    start_id
                        < p.dynamo[worker as usize]
                            .oldest_event_id()
                            .expect("buffered")
                );
                c.reset_worker(worker).expect("reset");
                for e in events {
                    c.apply(e.clone()).expect("apply");
                }
            }
            DynamoReply::TooNew { .. } => panic!("age {age}: too new"),
        }
        assert_eq!(c.digest().expect("digest"), expected, "Dynamo, age {age}");
    }

    assert!(dynamo_kinds.contains(&"events") && dynamo_kinds.contains(&"tree-dump"));

    // Cold consumers.
    let (engine, replayed) = log.cold_start(1).expect("snapshot + tail");
    assert_eq!(log.engine_digest(&engine).expect("digest"), expected);
    let tail: u64 = stream.batches[snapshot_after..]
        .iter()
        .map(|b| b.events.len() as u64)
        .sum();
    assert_eq!(replayed, tail);
    engine.shutdown();
    let (engine, replayed) = log.cold_start_full_log(1).expect("whole log");
    assert_eq!(log.engine_digest(&engine).expect("digest"), expected);
    assert_eq!(replayed, stream.event_count());
    engine.shutdown();
    assert!(log.snapshot_path.as_ref().expect("snapshot").exists());

    let c = Consumer::new(1).expect("consumer");
    for local in &p.dynamo {
        let reply = local.events_since(None);
        assert_eq!(reply.kind(), "tree-dump");
        for e in reply.events() {
            c.apply(e.clone()).expect("apply");
        }
    }
    assert_eq!(c.digest().expect("digest"), expected, "Dynamo dumps");

    // vLLM with a buffer as long as the stream can cold-start; the bounded one cannot.
    let big = publish(&stream, stream.batches.len());
    let c = Consumer::new(1).expect("consumer");
    for buf in &big.vllm {
        assert!(buf.can_replay_from(0));
        for (_, payload) in buf.replay_since(0).batches {
            for e in decode_payload(&payload).expect("decode").events {
                c.apply(e).expect("apply");
            }
        }
    }
    assert_eq!(c.digest().expect("digest"), expected, "vLLM full buffer");
    assert!(p.vllm.iter().all(|b| !b.can_replay_from(0)));
}
