//! JetStream ingestion against a real `nats-server -js` (see tests/nats_support): events are
//! acknowledged only once durable, a bad message is terminated (not redelivered) and counted,
//! and a kvindex killed between delivery and the log append, or between the append and the ack,
//! loses nothing and does not apply the redelivery twice.

mod common;
mod nats_support;

use common::*;
use nats_support::*;
use serde_json::json;

const STREAM: &str = "KVEVENTS";
const CONSUMER: &str = "kvindex-a";

fn start_js(nats: &NatsServer, dir: &std::path::Path, env: &[(&str, &str)]) -> Server {
    start_js_with(nats, dir, "2", &[], env)
}

/// [`start_js`] with the consumer's ack wait (seconds; it is set when the consumer is created)
/// and more flags.
fn start_js_with(
    nats: &NatsServer,
    dir: &std::path::Path,
    ack_wait_secs: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Server {
    let mut flags = vec![
        "--nats-url",
        &nats.url,
        "--nats-jetstream-stream",
        STREAM,
        "--nats-jetstream-consumer",
        CONSUMER,
        "--nats-jetstream-ack-wait-secs",
        ack_wait_secs,
    ];
    flags.extend_from_slice(extra);
    let s = start(dir, &flags, env);
    wait_subscribed(&s, "jetstream");
    s
}

fn scores(s: &Server, n: u32) -> serde_json::Value {
    s.post_json(
        "/query",
        &json!({"token_ids": tokens(n), "model_name": "m"}),
    )
    .json()["scores"]
        .clone()
}

fn event(worker: u64, blocks: usize, base: u64) -> Vec<u8> {
    let h = local_hashes(&tokens(16), 4);
    stored(worker, 0, 1, None, &chain(&h, blocks, base))
        .to_string()
        .into_bytes()
}

fn bs4() -> Option<async_nats::HeaderMap> {
    Some(headers(&[("Kvindex-Block-Size", "4")]))
}

fn wait_all_acked(c: &Client) {
    wait_until("every JetStream message acknowledged", || {
        let (ack_pending, _, pending) = c.consumer_state(STREAM, CONSUMER);
        ack_pending == 0 && pending == 0
    });
}

/// Start kvindex with its JetStream consumer set to stop at `hold` (`before_log` or
/// `before_ack`), publish worker 1's 4-block store, and wait until the consumer holds it.
fn publish_and_hold(nats: &NatsServer, dir: &std::path::Path, c: &Client, hold: &str) -> Server {
    let s = start_js(nats, dir, &[("KVINDEX_TEST_NATS_HOLD", hold)]);
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    wait_until(&format!("the consumer holding the message {hold}"), || {
        s.stderr().contains(&format!("test hold {hold}"))
    });
    s
}

#[test]
fn jetstream_events_are_acked_once_durable_and_bad_ones_are_terminated() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_js(&nats, dir.path(), &[]);
    let c = Client::connect(&nats.url);
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    c.js_publish("kvindex.events.m.default", None, b"{broken".to_vec());
    c.js_publish("kvindex.events.nope.default", None, event(1, 1, 100));
    c.js_publish(
        "kvindex.events.m.default",
        None,
        rmp_serde::to_vec_named(&json!([serde_json::from_slice::<serde_json::Value>(
            &event(2, 2, 200)
        )
        .unwrap()]))
        .unwrap(),
    );
    wait_until("both workers indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}, "2": {"0": 8}})
    });
    wait_all_acked(&c);
    // Counted just after each ack is sent.
    wait_until("two acks and two terms counted", || {
        let m = metrics(&s);
        let acks = |kind| metric_sum(&m, "kvindex_nats_jetstream_acks_total", &[("kind", kind)]);
        acks("ack") == 2.0 && acks("term") == 2.0
    });
    let m = metrics(&s);
    let acks = |kind| metric_sum(&m, "kvindex_nats_jetstream_acks_total", &[("kind", kind)]);
    assert_eq!(acks("duplicate"), 0.0);
    assert_eq!(acks("nak"), 0.0);
    let rejected = |reason| {
        metric_sum(
            &m,
            "kvindex_nats_messages_rejected_total",
            &[("source", "jetstream"), ("reason", reason)],
        )
    };
    assert_eq!(rejected("decode"), 1.0);
    assert_eq!(rejected("unknown_partition"), 1.0);
    // Terminated messages are never redelivered.
    let (_, redelivered, _) = c.consumer_state(STREAM, CONSUMER);
    assert_eq!(redelivered, 0);
    // With JetStream configured, the core subscription is off: the stream's messages are
    // ingested once.
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_events_accepted_total",
            &[("source", "core")]
        ),
        0.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_events_accepted_total",
            &[("source", "jetstream")]
        ),
        2.0
    );
}

/// A graceful stop with a message received but not yet logged gives it back at once (a nak),
/// so after the restart it comes before a newer message of the same worker. Left to the ack
/// wait, the newer message was logged first, moved the worker's watermark past it, and its
/// redelivery was acknowledged as a duplicate and never applied.
#[test]
fn stopped_with_a_message_not_yet_logged_gives_it_back_first() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let s = publish_and_hold(&nats, dir.path(), &c, "before_log");
    let (status, log) = s.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));

    let s = start_js(&nats, dir.path(), &[]);
    // A newer event of the same worker, published at once.
    c.js_publish("kvindex.events.m.default", None, event(1, 1, 900));
    wait_all_acked(&c);
    wait_until("both events indexed", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 2.0
    });
    // Each logged once. (A slow stop can make the server deliver the given-back message twice:
    // the second copy is then a duplicate, see
    // `a_message_given_back_after_its_ack_wait_is_applied_once`.)
    assert_eq!(metric(&s, "kvindex_events_logged_total", &[]), 2.0);
    let s = s.restart(&[]);
    let held = scores(&s, 16);
    assert_eq!(
        held,
        json!({"1": {"0": 16}}),
        "the held 4-block store is indexed"
    );
}

/// A message given back after its ack wait ran out (held past it: a slow stop) may be queued
/// for redelivery twice (the nak and the expired ack wait; nats-server 2.9 does): the restarted
/// consumer then receives it twice, often in one batch. However many copies arrive, and in
/// however many batches, it is logged and applied once; every further copy is acknowledged as
/// a duplicate. Whether the server delivers two copies, and in one batch, is up to it, so this
/// test cannot force the same-batch path: `nats::intake::tests::
/// a_message_delivered_twice_in_one_batch_is_logged_once` covers that one deterministically.
#[test]
fn a_message_given_back_after_its_ack_wait_is_applied_once() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let s = publish_and_hold(&nats, dir.path(), &c, "before_log");
    // Past the ack wait (2 s) before the stop gives the message back.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (status, log) = s.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
    // And past it again before a consumer pulls.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let s = start_js(&nats, dir.path(), &[]);
    wait_all_acked(&c);
    wait_until("the message acknowledged", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) >= 1.0
    });
    let received = metric(
        &s,
        "kvindex_nats_messages_received_total",
        &[("source", "jetstream")],
    );
    wait_until("every copy acknowledged", || {
        let m = metrics(&s);
        let acks = |kind| metric_sum(&m, "kvindex_nats_jetstream_acks_total", &[("kind", kind)]);
        acks("ack") + acks("duplicate") == received
    });
    assert!(received >= 1.0);
    assert_eq!(
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]),
        1.0,
        "applied once ({received} copies received)"
    );
    assert_eq!(
        metric(
            &s,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")]
        ),
        received - 1.0,
        "every further copy acknowledged as a duplicate"
    );
    assert_eq!(metric(&s, "kvindex_events_logged_total", &[]), 1.0);
    assert_eq!(scores(&s, 16), json!({"1": {"0": 16}}));
}

#[test]
fn killed_between_delivery_and_the_log_append_loses_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    // First run: partition created, then the consumer stops right after delivery.
    let s = publish_and_hold(&nats, dir.path(), &c, "before_log");
    let (ack_pending, _, _) = c.consumer_state(STREAM, CONSUMER);
    assert_eq!(ack_pending, 1);
    assert_eq!(metric(&s, "kvindex_events_logged_total", &[]), 0.0);
    let (status, _) = s.signal(libc::SIGKILL);
    assert_eq!(status.code(), None, "killed by a signal");

    // Restart: JetStream redelivers the unacknowledged message, which is applied now.
    let s = start_js(&nats, dir.path(), &[]);
    wait_until("the redelivered event is indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}})
    });
    wait_all_acked(&c);
    wait_until("the ack is counted", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 1.0
    });
    // And it is durable: a restart without NATS still has it.
    let s = s.restart(&[]);
    assert_eq!(scores(&s, 16), json!({"1": {"0": 16}}));
}

#[test]
fn killed_between_the_log_append_and_the_ack_does_not_apply_the_redelivery_again() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let s = publish_and_hold(&nats, dir.path(), &c, "before_ack");
    // Durable and applied, not acknowledged.
    assert_eq!(scores(&s, 16), json!({"1": {"0": 16}}));
    let (ack_pending, _, _) = c.consumer_state(STREAM, CONSUMER);
    assert_eq!(ack_pending, 1);
    let (status, _) = s.signal(libc::SIGKILL);
    assert_eq!(status.code(), None);

    let s = start_js(&nats, dir.path(), &[]);
    wait_all_acked(&c);
    // The redelivery was recognised as already durable: acknowledged, not logged again.
    wait_until("the duplicate ack is counted", || {
        metric(
            &s,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")],
        ) == 1.0
    });
    let m = metrics(&s);
    assert_eq!(metric_sum(&m, "kvindex_events_logged_total", &[]), 0.0);
    assert_eq!(
        metric_sum(&m, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]),
        0.0
    );
    assert_eq!(scores(&s, 16), json!({"1": {"0": 16}}));
    // A later message of the same worker is a first delivery: applied normally.
    c.js_publish("kvindex.events.m.default", None, event(1, 1, 100));
    c.js_publish(
        "kvindex.events.m.default",
        None,
        removed(1, 0, 2, &[103]).to_string().into_bytes(),
    );
    wait_until("the removal is applied", || {
        scores(&s, 16) == json!({"1": {"0": 12}})
    });
    wait_all_acked(&c);
    wait_until("both acks counted", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 2.0
    });
    assert_eq!(metric(&s, "kvindex_events_logged_total", &[]), 2.0);
}

/// Killed (no chance to give the message back) between delivery and the log append, then a newer
/// message of the same worker is logged before the old one comes back after the ack wait. The
/// old one must still be applied: deduplication looks at the exact set of logged sequences,
/// not at a watermark the newer message moved past it (which acknowledged it as a duplicate
/// and lost it).
#[test]
fn killed_before_the_log_append_and_overtaken_by_a_newer_message_is_still_applied() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    // The ack wait is long enough for the restart and the newer message to come first.
    let s = start_js_with(
        &nats,
        dir.path(),
        "4",
        &[],
        &[("KVINDEX_TEST_NATS_HOLD", "before_log")],
    );
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    wait_until("the consumer holding the message", || {
        s.stderr().contains("test hold before_log")
    });
    let (status, _) = s.signal(libc::SIGKILL);
    assert_eq!(status.code(), None, "killed by a signal");

    let s = start_js_with(&nats, dir.path(), "4", &[], &[]);
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 1, 900));
    wait_until("the newer message acknowledged", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) >= 1.0
    });
    // The old message comes back after the ack wait and is applied (late).
    wait_until("the overtaken 4-block store is indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}})
    });
    wait_all_acked(&c);
    wait_until("both acks counted", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 2.0
    });
    assert_eq!(
        metric(
            &s,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")]
        ),
        0.0
    );
}

/// The set of logged sequences survives a snapshot that compacts the log past the message:
/// logged, snapshotted, killed before the ack, the redelivery after the restart (recovered from
/// the snapshot, not from the message's log record) is still recognised as logged.
#[test]
fn a_redelivery_is_recognised_after_recovery_from_a_snapshot_taken_after_it_was_logged() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let snapshots = ["--snapshot-every-entries", "1", "--snapshot-keep", "1"];
    let s = start_js_with(
        &nats,
        dir.path(),
        "2",
        &snapshots,
        &[("KVINDEX_TEST_NATS_HOLD", "before_ack")],
    );
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    wait_until("the consumer holding the logged message", || {
        s.stderr().contains("test hold before_ack")
    });
    wait_until("a snapshot covering the message", || {
        metric(&s, "kvindex_snapshots_written_total", &[]) >= 1.0
    });
    let (status, _) = s.signal(libc::SIGKILL);
    assert_eq!(status.code(), None);

    let s = start_js_with(&nats, dir.path(), "2", &snapshots, &[]);
    wait_all_acked(&c);
    wait_until("the duplicate ack is counted", || {
        metric(
            &s,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")],
        ) == 1.0
    });
    assert_eq!(metric(&s, "kvindex_events_logged_total", &[]), 0.0);
    assert_eq!(scores(&s, 16), json!({"1": {"0": 16}}));
}

/// A stream deleted and created again restarts its sequences: a redelivery of the new stream's
/// sequence 1 is not a duplicate of the old stream's sequence 1 (the logged sequences carry
/// the stream's epoch).
#[test]
fn a_redelivery_of_a_recreated_stream_is_not_taken_for_the_old_streams_message() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    // The old stream's sequence 1: worker 1's first block, logged and acknowledged.
    let s = start_js(&nats, dir.path(), &[]);
    assert_eq!(
        c.js_publish("kvindex.events.m.default", bs4(), event(1, 1, 100)),
        1
    );
    wait_all_acked(&c);
    wait_until("the first block indexed", || {
        scores(&s, 16) == json!({"1": {"0": 4}})
    });
    let (status, _) = s.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(0));
    c.delete_stream(STREAM);

    // The new stream's sequence 1 is received, then kvindex is killed before logging it.
    let s = start_js(
        &nats,
        dir.path(),
        &[("KVINDEX_TEST_NATS_HOLD", "before_log")],
    );
    assert_eq!(
        c.js_publish("kvindex.events.m.default", None, event(1, 4, 100)),
        1
    );
    wait_until("the consumer holding the message", || {
        s.stderr().contains("test hold before_log")
    });
    let (status, _) = s.signal(libc::SIGKILL);
    assert_eq!(status.code(), None);

    // Its redelivery is applied.
    let s = start_js(&nats, dir.path(), &[]);
    wait_until("the new stream's 4-block store is indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}})
    });
    wait_all_acked(&c);
    assert_eq!(
        metric(
            &s,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")]
        ),
        0.0
    );
}

/// Worker `worker`'s "all blocks cleared" event.
fn cleared(worker: u64, id: u64) -> Vec<u8> {
    json!({"worker_id": worker, "event": {"event_id": id, "dp_rank": 0, "data": "cleared"}})
        .to_string()
        .into_bytes()
}

/// The positions (`next_lsn`) of the snapshot files in `dir`.
fn snapshot_lsns(dir: &std::path::Path) -> impl Iterator<Item = u64> {
    std::fs::read_dir(dir)
        .expect("data directory")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("snap-")?
                .strip_suffix(".kvsnap")?
                .parse()
                .ok()
        })
}

/// After kvindex (`s`) was started with a consumer that (re)delivers `old` messages of the
/// stream first: publish `marker` (a new message), wait until it is acknowledged, and check
/// that every old message was acknowledged as a duplicate (none delivered when `old` is 0)
/// and that only the marker's event was logged.
fn only_the_marker_is_logged(s: &Server, c: &Client, old: f64, marker: Vec<u8>) {
    c.js_publish("kvindex.events.m.default", None, marker);
    wait_until("the marker acknowledged", || {
        metric(s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) >= 1.0
    });
    wait_all_acked(c);
    let m = metrics(s);
    assert_eq!(
        metric_sum(&m, "kvindex_events_logged_total", &[]),
        1.0,
        "only the marker's event is logged again"
    );
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_jetstream_acks_total",
            &[("kind", "duplicate")]
        ),
        old
    );
    assert_eq!(
        metric_sum(&m, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]),
        1.0
    );
}

/// The durable consumer deleted while the data directory is kept, then created again: every
/// message the stream retains comes back as a first delivery (delivery count 1). None of them
/// may be applied again — old `cleared` events would wipe the worker's current blocks and old
/// stores come back until the replay caught up. Three ways: (1) the messages are still in the
/// set of logged sequences: checked whatever the delivery count (it was skipped for first
/// deliveries); (2) the set was pruned below the ack floor and a snapshot made that stick:
/// kvindex creates the consumer after the stored floor (`jetstream-stream.json`), so nothing
/// old is delivered; (3) the consumer was created again by someone else, delivering all:
/// messages at or below the stored floor are acknowledged as duplicates.
#[test]
fn a_consumer_created_again_over_a_kept_data_directory_applies_nothing_twice() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let snapshots = ["--snapshot-every-entries", "1", "--snapshot-keep", "1"];
    let start = || start_js_with(&nats, dir.path(), "2", &snapshots, &[]);
    let s = start();
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    c.js_publish("kvindex.events.m.default", None, cleared(1, 2));
    c.js_publish("kvindex.events.m.default", None, event(1, 1, 900));
    wait_all_acked(&c);
    wait_until("worker 1's last block indexed", || {
        scores(&s, 16) == json!({"1": {"0": 4}})
    });
    let stop = |s: Server| {
        let (status, _) = s.signal(libc::SIGTERM);
        assert_eq!(status.code(), Some(0));
    };
    stop(s);

    // (1) Deleted and created again by kvindex; the set still holds sequences 1..=3.
    c.delete_consumer(STREAM, CONSUMER);
    let s = start();
    only_the_marker_is_logged(&s, &c, 3.0, event(2, 2, 200));
    assert_eq!(scores(&s, 16), json!({"1": {"0": 4}, "2": {"0": 8}}));
    stop(s);

    // (2) Set up on the existing consumer: its ack floor (4) is stored, then the set pruned
    // below it; a snapshot taken after a newer message keeps only that one (5).
    let s = start();
    c.js_publish("kvindex.events.m.default", None, event(3, 1, 300));
    wait_all_acked(&c);
    wait_until("the newer message acknowledged", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 1.0
    });
    let next_lsn = metric(&s, "kvindex_log_next_lsn", &[]) as u64;
    wait_until(
        "a snapshot covering the whole log (taken after the pruning)",
        || snapshot_lsns(dir.path()).any(|l| l >= next_lsn),
    );
    stop(s);
    c.delete_consumer(STREAM, CONSUMER);
    let s = start();
    // Created from sequence 5 on: only 5 comes back (in the set: a duplicate).
    only_the_marker_is_logged(&s, &c, 1.0, event(4, 1, 400));
    stop(s);

    // (3) Created again by an operator, delivering all: 1..=4 are at or below the stored
    // floor, 5 and 6 in the set.
    c.delete_consumer(STREAM, CONSUMER);
    c.create_consumer_delivering_all(STREAM, CONSUMER, "kvindex.events.>");
    let s = start();
    only_the_marker_is_logged(&s, &c, 6.0, event(5, 1, 500));
    assert_eq!(
        scores(&s, 16),
        json!({"1": {"0": 4}, "2": {"0": 8}, "3": {"0": 4}, "4": {"0": 4}, "5": {"0": 4}})
    );
}

/// A NATS server and a kvindex consuming from it, which has indexed worker 1's first event.
fn consuming_one_event() -> (NatsServer, tempfile::TempDir, Server) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_js(&nats, dir.path(), &[]);
    let c = Client::connect(&nats.url);
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 1, 100));
    wait_until("first event indexed", || {
        scores(&s, 16) == json!({"1": {"0": 4}})
    });
    (nats, dir, s)
}

/// Publish worker 2's event (after [`consuming_one_event`]) and wait until it is indexed and
/// acknowledged.
fn a_second_event_is_indexed(s: &Server, c: &Client) {
    c.js_publish("kvindex.events.m.default", None, event(2, 2, 200));
    wait_until("event after the restart indexed", || {
        scores(s, 16) == json!({"1": {"0": 4}, "2": {"0": 8}})
    });
    wait_all_acked(c);
}

#[test]
fn the_consumer_comes_back_after_the_nats_server_restarts() {
    let (nats, _dir, s) = consuming_one_event();
    let nats = nats.restart();
    wait_until("reconnected", || {
        metric(
            &s,
            "kvindex_nats_connection_events_total",
            &[("event", "disconnected")],
        ) >= 1.0
            && metric(&s, "kvindex_nats_connected", &[]) == 1.0
    });
    let c = Client::connect(&nats.url);
    // The stream survived (same store); a message published now reaches the index.
    a_second_event_is_indexed(&s, &c);
}

/// A NATS server that comes back without the stream and the consumer (memory storage, a
/// replaced volume): the message stream of the old consumer only yields errors ("stream not
/// found", then missed heartbeats; it never ends), and kvindex sets the stream and the
/// consumer up again at the first. (Without that it stayed stuck: this test timed out.)
#[test]
fn the_consumer_is_set_up_again_when_the_server_lost_it() {
    let (nats, _dir, s) = consuming_one_event();
    let nats = nats.restart_empty();
    let c = Client::connect(&nats.url);
    wait_until("the stream set up again by kvindex", || {
        c.stream_exists(STREAM)
    });
    a_second_event_is_indexed(&s, &c);
}

/// `kvindex_nats_jetstream_errors_total{stage}` on `s`.
fn js_errors(s: &Server, stage: &str) -> f64 {
    metric(
        s,
        "kvindex_nats_jetstream_errors_total",
        &[("stage", stage)],
    )
}

/// The pull stream reporting an error (`pull`), a message without a `$JS.ACK` reply subject
/// (`info`) and the acknowledgement it cannot get (`ack`) are each logged and counted; the
/// consumer keeps delivering. Both are forged on the
/// consumer's pull inbox, read from its pull request (`$JS.API.CONSUMER.MSG.NEXT...`, which
/// every subscriber of that subject sees).
#[test]
fn pull_info_and_ack_errors_are_logged_and_counted() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    let mut pulls = c.subscribe(&format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}"));
    let s = start_js(&nats, dir.path(), &[]);
    let inbox = c
        .next_message(&mut pulls)
        .reply
        .expect("a pull request names its inbox")
        .to_string();
    c.js_publish("kvindex.events.m.default", bs4(), event(1, 4, 100));
    wait_until("the first event indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}})
    });

    // A status the client does not expect: an error item in the pull stream.
    publish_status(&nats, &inbox, 500, "Forged Failure");
    wait_until("the pull error counted", || js_errors(&s, "pull") >= 1.0);
    wait_logged(&s, "JetStream pull failed");

    // A pull error makes kvindex set the consumer up again, with a new pull inbox.
    let inbox = loop {
        let next = c
            .next_message(&mut pulls)
            .reply
            .expect("a pull request names its inbox")
            .to_string();
        if next != inbox {
            break next;
        }
    };
    assert_eq!(js_errors(&s, "setup"), 0.0);

    // A message on the inbox without a reply subject: no delivery info, no way to ack. (Its
    // subject is the inbox, so it is also refused; a genuine stream message without delivery
    // info would be logged and applied like a core NATS message.)
    c.publish(&inbox, event(2, 2, 200));
    wait_until("its info and ack errors counted", || {
        js_errors(&s, "info") == 1.0 && js_errors(&s, "ack") == 1.0
    });
    wait_logged(&s, "JetStream message without delivery info");
    wait_logged(&s, "JetStream acknowledgement not sent");
    assert_eq!(
        metric(
            &s,
            "kvindex_nats_messages_rejected_total",
            &[("source", "jetstream"), ("reason", "subject")]
        ),
        1.0
    );

    // The consumer still works.
    c.js_publish("kvindex.events.m.default", None, event(3, 1, 300));
    wait_until("a later event indexed", || {
        scores(&s, 16) == json!({"1": {"0": 16}, "3": {"0": 4}})
    });
    wait_all_acked(&c);
    wait_until("both real messages acked", || {
        metric(&s, "kvindex_nats_jetstream_acks_total", &[("kind", "ack")]) == 2.0
    });
    assert_eq!(js_errors(&s, "setup"), 0.0);
}

/// A stream of the configured name that does not capture the events subjects: the consumer
/// cannot be created, which is retried, logged and counted (`setup`); HTTP serves meanwhile.
#[test]
fn a_consumer_that_cannot_be_set_up_is_logged_and_counted() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let c = Client::connect(&nats.url);
    c.create_stream(STREAM, &["elsewhere.>"]);
    let s = start(
        dir.path(),
        &[
            "--nats-url",
            &nats.url,
            "--nats-jetstream-stream",
            STREAM,
            "--nats-jetstream-consumer",
            CONSUMER,
        ],
        &[],
    );
    wait_until("the setup error counted", || js_errors(&s, "setup") >= 1.0);
    wait_logged(&s, "JetStream consumer not ready");
    assert_eq!(
        metric(
            &s,
            "kvindex_nats_subscription_up",
            &[("subscription", "jetstream")]
        ),
        0.0
    );
    assert_eq!(s.get("/health").status, 200);
}
