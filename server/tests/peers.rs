//! Start-up recovery from peers (SERVICE.md §9): the first peer that answers wins, a dead one is
//! skipped, recovered partitions serve queries without workers, and `--peers` are listed.

mod common;

use common::*;
use serde_json::json;

#[test]
fn a_new_replica_recovers_from_the_first_live_peer() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &[], &[]);
    register(&a, 1, "org/llama:v1", 4);
    let r = a.post_json("/register", &json!({"instance_id": 2, "endpoint": "tcp://h:1", "model_name": "m", "routing_group": "g:x", "block_size": 4}));
    assert_eq!(r.status, 201);
    let t: Vec<u32> = (1..=8).collect();
    let h = local_hashes(&t, 4);
    assert_eq!(
        a.post_json("/events", &stored(1, 0, 1, None, &[(11, h[0]), (12, h[1])]))
            .status,
        200
    );
    assert_eq!(
        a.post_json("/events", &stored(2, 3, 1, None, &[(11, h[0])]))
            .status,
        200
    );
    let q1 = json!({"token_ids": t, "model_name": "org/llama:v1"});
    let q2 = json!({"token_ids": t, "model_name": "m", "routing_group": "g:x"});
    let strip = |mut v: serde_json::Value| {
        v.as_object_mut().unwrap().remove("log_lsn");
        v
    };
    let expected = (
        strip(a.post_json("/query", &q1).json()),
        strip(a.post_json("/query", &q2).json()),
    );

    // A dead peer (nothing listens on port 1) is skipped.
    let peers = format!("http://127.0.0.1:1,http://{}", a.addr);
    let b = start(&dir.path().join("b"), &["--peers", &peers], &[]);
    assert_eq!(strip(b.post_json("/query", &q1).json()), expected.0);
    assert_eq!(strip(b.post_json("/query", &q2).json()), expected.1);
    assert_eq!(b.get("/workers").json(), json!([]));
    let mut listed: Vec<String> = serde_json::from_value(b.get("/peers").json()).unwrap();
    listed.sort();
    let mut want = vec![
        "http://127.0.0.1:1".to_string(),
        format!("http://{}", a.addr),
    ];
    want.sort();
    assert_eq!(listed, want);
    // Peers do not learn about each other.
    assert_eq!(a.get("/peers").json(), json!([]));
    assert!(b
        .stderr()
        .contains("recovery from peer failed, trying next"));
    assert_eq!(
        b.metric("kvindex_peer_recovery_total{outcome=\"recovered\"}"),
        1.0
    );
    assert_eq!(b.metric("kvindex_peer_errors_total{stage=\"fetch\"}"), 1.0);
}

#[test]
fn no_reachable_peer_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("d"),
        &["--peers", "http://127.0.0.1:1"],
        &[],
    );
    assert_eq!(s.get("/health").status, 200);
    assert!(s
        .stderr()
        .contains("no reachable peers, starting with empty state"));
    assert_eq!(
        s.metric("kvindex_peer_recovery_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(s.metric("kvindex_peer_errors_total{stage=\"fetch\"}"), 1.0);
}

/// Recovered events are logged with source sequence 0: a restored ZMQ listener of the same
/// stream resumes after 0, not after the dump's renumbered `event_id` (which would call the
/// engine's batches up to that number stale).
#[test]
fn recovered_events_do_not_move_a_listeners_resume_point_past_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &[], &[]);
    register(&a, 1, "m", 4);
    for i in 0..30u32 {
        let t = [1000 + 4 * i, 1001 + 4 * i, 1002 + 4 * i, 1003 + 4 * i];
        let h = local_hashes(&t, 4);
        let r = a.post_json(
            "/events",
            &stored(
                1,
                0,
                7_000 + u64::from(i),
                None,
                &[(u64::from(i) + 1, h[0])],
            ),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let dump = a.get("/dump").json();
    let ids: Vec<u64> = dump["m:default"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["event_id"].as_u64().unwrap())
        .collect();
    assert!(ids.iter().max().is_some_and(|m| *m >= 29), "{ids:?}");
    // B: the same worker over ZMQ (its engine is not up), and A's state.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("1=tcp://{}", l.local_addr().unwrap())
    };
    let flags = ["--workers", &dead, "--block-size", "4", "--model-name", "m"];
    let peers = format!("http://{}", a.addr);
    let mut with_peers = flags.to_vec();
    with_peers.extend(["--peers", &peers]);
    let bdir = dir.path().join("b");
    let b = start(&bdir, &with_peers, &[]);
    assert!(b.stderr().contains("recovered from peer"), "{}", b.stderr());
    let (status, _) = b.terminate();
    assert!(status.success());
    let b = start(&bdir, &flags, &[]);
    let workers = b.get("/workers").json();
    assert_eq!(
        workers[0]["listeners"]["0"]["watermark"],
        json!(0),
        "{workers}"
    );
    let t = [1000, 1001, 1002, 1003];
    let r = b.post_json("/query", &json!({"token_ids": t, "model_name": "m"}));
    assert_eq!(r.json()["scores"], json!({"1": {"0": 4}}));
}

/// A fake peer on a free port: answers every connection with `reply` (or, when `None`, reads
/// the request and never answers). Returns its base URL.
fn fake_peer(reply: Option<&str>) -> String {
    use std::io::{Read, Write};
    let reply = reply.map(str::to_owned);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in l.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            match &reply {
                Some(r) => {
                    let _ = s.write_all(r.as_bytes());
                }
                None => held.push(s),
            }
        }
    });
    url
}

/// SERVICE.md §9 / checklist 20: a peer answering non-2xx, one answering something that is not
/// a dump, one that never answers (10 s timeout) and a malformed URL are each skipped with
/// "recovery from peer failed, trying next"; the first usable peer after them wins.
#[test]
fn failing_peers_are_skipped_in_order_until_one_answers() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &[], &[]);
    register(&a, 1, "m", 4);
    let t: Vec<u32> = (1..=8).collect();
    let h = local_hashes(&t, 4);
    let r = a.post_json("/events", &stored(1, 0, 1, None, &[(11, h[0]), (12, h[1])]));
    assert_eq!(r.status, 200, "{}", r.text());
    let status_500 = fake_peer(Some(
        "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ));
    let garbage = fake_peer(Some(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\nConnection: close\r\n\r\nnot json",
    ));
    let silent = fake_peer(None);
    let peers = format!(
        "{status_500},{garbage},not a url,{silent},http://{}",
        a.addr
    );
    let b = start(&dir.path().join("b"), &["--peers", &peers], &[]);
    let v = b
        .post_json("/query", &json!({"token_ids": t, "model_name": "m"}))
        .json();
    assert_eq!(v["scores"], json!({"1": {"0": 8}}));
    let log = b.stderr();
    assert_eq!(
        log.matches("recovery from peer failed, trying next")
            .count(),
        4,
        "{log}"
    );
    for why in [
        "status 500",
        "cannot parse the dump",
        "timed out after 10s",
        "invalid peer URL",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }
    assert_eq!(
        serde_json::from_value::<Vec<String>>(b.get("/peers").json())
            .unwrap()
            .len(),
        5
    );
}

/// A fake peer on a free port that answers its first request with `reply`, but only once the
/// test sends on the returned sender; the receiver tells when the request has arrived.
fn gated_peer(
    reply: String,
) -> (
    String,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = l.accept() else { return };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let _ = arrived_tx.send(());
        if release_rx.recv().is_ok() {
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (url, arrived, release)
}

/// A dump entry that carries an error is skipped; and with a registry that cannot be written
/// any more (`registry.json.tmp` made a directory while the peer's dump is on its way) the
/// dump's partition cannot be created and the peer cannot be recorded. Each is logged with the
/// peer and counted, the recovery is `partial`, and the service still starts.
#[test]
fn peer_recovery_errors_are_logged_and_counted_and_the_service_still_starts() {
    let dir = tempfile::tempdir().unwrap();
    let body =
        r#"{"bad:default": {"error": "boom"}, "m:default": {"block_size": 4, "events": []}}"#;
    let (peer, arrived, release) = gated_peer(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let data = dir.path().join("d");
    let starting = {
        let (data, peer) = (data.clone(), peer.clone());
        std::thread::spawn(move || start(&data, &["--peers", &peer], &[]))
    };
    // The registry was written at start-up, before recovery asked the peer.
    arrived
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the peer was asked for its dump");
    std::fs::create_dir_all(data.join("registry.json.tmp")).unwrap();
    release.send(()).unwrap();
    let s = starting.join().expect("the service started");
    assert_eq!(s.get("/health").status, 200);
    let errors = |stage: &str| s.metric(&format!("kvindex_peer_errors_total{{stage=\"{stage}\"}}"));
    assert_eq!(errors("fetch"), 0.0);
    assert_eq!(errors("entry"), 1.0);
    assert_eq!(errors("load"), 1.0);
    assert_eq!(errors("register"), 1.0);
    assert_eq!(
        s.metric("kvindex_peer_recovery_total{outcome=\"partial\"}"),
        1.0
    );
    let log = s.stderr();
    for line in [
        "skipping an unusable dump entry",
        "recovery from peer: cannot recover this partition",
        "recovered from peer in part",
        "cannot record the peer",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
    assert!(log.contains(&format!("peer={peer}")), "{log}");
    assert_eq!(s.get("/peers").json(), json!([]));
}

/// Poll `cond` (bounded) until it holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// SERVICE.md §9: live events are applied on top of the peer's dump, never under it. The dump
/// says worker 1 holds block 501; while it is on its way, the engine stores the block and then
/// evicts it. The listener holds both batches until the dump is loaded, then applies them: the
/// block stays gone (applied before the dump, the dump's store brought it back for good — the
/// engine never sends its removal again), also after a restart, which replays the log in the
/// same order.
#[test]
fn live_events_received_during_peer_recovery_are_applied_on_top_of_the_dump() {
    use kvindex_server::zmq::test_publisher::{
        PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
    };
    let rt = runtime();
    let engine = rt
        .block_on(VllmPublisher::bind(
            PublisherConfig::loopback_without_replay(),
        ))
        .unwrap();
    let tokens = [1u32, 2, 3, 4];
    let h = local_hashes(&tokens, 4)[0];
    let body =
        json!({"m:default": {"block_size": 4, "events": [stored(1, 0, 0, None, &[(501, h)])]}})
            .to_string();
    let (peer, arrived, release) = gated_peer(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("b");
    let workers = format!("1={}", engine.endpoint());
    let flags = [
        "--workers",
        &workers,
        "--block-size",
        "4",
        "--model-name",
        "m",
    ];
    let mut with_peers = flags.to_vec();
    with_peers.extend(["--peers", &peer]);
    let starting = spawn(
        &data,
        &with_peers,
        &[("RUST_LOG", "info,kvindex_server::zmq::listener=debug")],
    );
    arrived
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the peer was asked for its dump");
    // The listener has batch `seq`: held behind the ready gate, or (as before the gate) logged
    // and applied already, its event (`needle`) in the log.
    let received = |seq: u64, needle: &str| {
        starting.logged(&[
            "live batch held until the ready gate opens",
            &format!("seq=Some({seq})"),
        ]) || run(&["replay", "export", data.to_str().unwrap()], &[])
            .1
            .contains(needle)
    };
    // ZMQ's slow joiner: publish until a batch is received; every later one is received too.
    // (Another block, of other tokens.)
    let other = PublishBatch::new(vec![PublishEvent::stored(
        vec![900],
        None,
        vec![9, 10, 11, 12],
        4,
    )]);
    wait_until("a live batch received", || {
        let seq = rt.block_on(engine.publish(&other)).unwrap();
        received(seq, "\"block_hash\":900")
    });
    rt.block_on(engine.publish(&PublishBatch::new(vec![PublishEvent::stored(
        vec![501],
        None,
        tokens.to_vec(),
        4,
    )])))
    .unwrap();
    let removal = rt
        .block_on(engine.publish(&PublishBatch::new(vec![PublishEvent::removed(vec![501])])))
        .unwrap();
    wait_until("the removal received", || {
        received(removal, "\"block_hashes\":[501]")
    });
    release.send(()).unwrap();
    let b = starting.listening().expect("the service started");
    let watermark = |s: &Server| s.get("/workers").json()[0]["listeners"]["0"]["watermark"].clone();
    wait_until("the held batches applied", || {
        watermark(&b) == json!(removal)
    });
    let query = json!({"token_ids": tokens, "model_name": "m"});
    assert_eq!(
        b.post_json("/query", &query).json()["scores"],
        json!({}),
        "the dump's block, removed by the engine since, came back"
    );
    let b = b.restart(&flags);
    assert_eq!(b.post_json("/query", &query).json()["scores"], json!({}));
    assert_eq!(watermark(&b), json!(removal));
}
