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
}
