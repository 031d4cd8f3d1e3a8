//! Every route, status code, body and error text of SERVICE.md §3, against the real binary.

mod common;

use common::*;
use serde_json::json;

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &[], &[]);
    (dir, s)
}

const T8: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// Store tokens 1..=8 (two blocks of 4) for `worker` on dp `dp`.
fn store_two_blocks(s: &Server, worker: u64, dp: u32) {
    let h = local_hashes(&T8, 4);
    let r = s.post_json(
        "/events",
        &stored(worker, dp, 1, None, &[(101, h[0]), (102, h[1])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn query(s: &Server, body: serde_json::Value) -> common::Resp {
    s.post_json("/query", &body)
}

#[test]
fn local_hash_helper_matches_the_golden_value() {
    assert_eq!(local_hashes(&[1, 2, 3, 4], 4)[0], 14643705804678351452);
}

#[test]
fn health_answers_get_and_head_with_empty_200_and_405_otherwise() {
    let (_d, s) = server();
    let r = s.get("/health");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(r.header("content-type").is_none());
    assert_eq!(s.raw("HEAD", "/health", &[], b"").status, 200);
    let r = s.raw("POST", "/health", &[], b"");
    assert_eq!(r.status, 405);
    assert!(r.body.is_empty());
}

#[test]
fn unknown_path_is_an_empty_404_and_wrong_method_an_empty_405() {
    let (_d, s) = server();
    let r = s.get("/nope");
    assert_eq!((r.status, r.body.len()), (404, 0));
    for (m, p) in [
        ("GET", "/register"),
        ("GET", "/query"),
        ("POST", "/workers"),
        ("POST", "/dump"),
        ("GET", "/unregister"),
        ("POST", "/peers"),
        ("GET", "/reopen_logs"),
        ("GET", "/events"),
    ] {
        let r = s.raw(m, p, &[], b"");
        assert_eq!((r.status, r.body.len()), (405, 0), "{m} {p}");
    }
}

#[test]
fn register_returns_201_and_conflicts_use_dynamos_wording() {
    let (_d, s) = server();
    let reg = |body: serde_json::Value| s.post_json("/register", &body);
    let r = reg(
        json!({"instance_id": 10, "endpoint": "tcp://127.0.0.1:18101", "model_name": "m", "block_size": 4}),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json(), json!({"status": "ok"}));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = reg(
        json!({"instance_id": 10, "endpoint": "tcp://127.0.0.1:18101", "model_name": "m", "block_size": 4}),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "instance 10 dp_rank 0 already registered"})
        )
    );
    let r = reg(
        json!({"instance_id": 10, "endpoint": "tcp://127.0.0.1:18101", "model_name": "m2", "block_size": 4}),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "instance 10 is already registered for model=m routing_group=default"})
        )
    );
    let r = reg(
        json!({"instance_id": 11, "endpoint": "tcp://127.0.0.1:18101", "model_name": "m", "block_size": 8}),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "block_size mismatch for model=m routing_group=default: existing=4, requested=8"})
        )
    );
    // Second rank of the same instance, full u64 range, block size 0, tenant_id ignored.
    assert_eq!(reg(json!({"instance_id": 10, "dp_rank": 1, "endpoint": "tcp://127.0.0.1:18102", "model_name": "m", "block_size": 4})).status, 201);
    assert_eq!(reg(json!({"instance_id": 18446744073709551615u64, "endpoint": "ipc:///tmp/x", "model_name": "big", "block_size": 4})).status, 201);
    assert_eq!(reg(json!({"instance_id": 12, "endpoint": "inproc://x", "model_name": "zero", "block_size": 0})).status, 201);
    assert_eq!(reg(json!({"instance_id": 13, "endpoint": "tcp://h:1", "model_name": "t", "block_size": 4, "tenant_id": "acme", "lora_name": "x", "type": "vllm", "additionalsalt": "s"})).status, 201);
    let w = s.get("/workers?model_name=t").json();
    assert_eq!(w[0]["routing_group"], "default");
    let r = reg(
        json!({"instance_id": -1, "endpoint": "tcp://h:1", "model_name": "m", "block_size": 4}),
    );
    assert_eq!(r.status, 422);
    assert!(
        r.text()
            .contains("instance_id: invalid value: integer `-1`, expected u64"),
        "{}",
        r.text()
    );
}

#[test]
fn register_rejects_bad_endpoints_with_400() {
    let (_d, s) = server();
    let reg = |ep: &str, replay: Option<&str>| {
        let mut b = json!({"instance_id": 1, "endpoint": ep, "model_name": "m", "block_size": 4});
        if let Some(r) = replay {
            b["replay_endpoint"] = json!(r);
        }
        s.post_json("/register", &b)
    };
    for (ep, msg) in [
        (
            "tcp://127.0.0.1",
            "invalid ZMQ endpoint `tcp://127.0.0.1`: missing TCP port",
        ),
        (
            "udp://127.0.0.1:5",
            "invalid ZMQ endpoint `udp://127.0.0.1:5`: unsupported scheme `udp`",
        ),
        ("nope", "invalid ZMQ endpoint `nope`: missing scheme"),
    ] {
        let r = reg(ep, None);
        assert_eq!((r.status, r.json()), (400, json!({"error": msg})));
    }
    let r = reg("tcp://127.0.0.1:5", Some("nope"));
    assert_eq!(
        (r.status, r.json()),
        (
            400,
            json!({"error": "invalid replay endpoint `nope`: invalid ZMQ endpoint `nope`: missing scheme"})
        )
    );
    // `tcp://*:N` passes validation (the listener fails later in Dynamo).
    assert_eq!(reg("tcp://*:5558", None).status, 201);
}

#[test]
fn framework_errors_are_axums_plain_text() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    let r = s.raw(
        "POST",
        "/query",
        &[],
        br#"{"token_ids":[1],"model_name":"m"}"#,
    );
    assert_eq!(r.status, 415);
    assert_eq!(
        r.text(),
        "Expected request with `Content-Type: application/json`"
    );
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let r = s.raw(
        "POST",
        "/register",
        &[("Content-Type", "text/plain")],
        b"{}",
    );
    assert_eq!(r.status, 415);
    let r = s.post_raw_json("/register", b"{x");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.text(),
        "Failed to parse the request body as JSON: key must be a string at line 1 column 2"
    );
    let r = s.post_raw_json("/register", b"{\"instance_id\":1}");
    assert_eq!(r.status, 422);
    assert!(
        r.text().starts_with(
            "Failed to deserialize the JSON body into the target type: missing field `"
        ),
        "{}",
        r.text()
    );
    let r = s.post_raw_json("/query", br#"{"token_ids":[-1],"model_name":"m"}"#);
    assert_eq!(r.status, 422);
    assert!(
        r.text()
            .contains("token_ids[0]: invalid value: integer `-1`, expected u32"),
        "{}",
        r.text()
    );
    let r = s.post_raw_json(
        "/query_by_hash",
        br#"{"block_hashes":[9223372036854775808],"model_name":"m"}"#,
    );
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains(
            "block_hashes[0]: invalid value: integer `9223372036854775808`, expected i64"
        ),
        "{}",
        r.text()
    );
    // Mooncake's `model` is not an alias.
    let r = s.post_raw_json("/query", br#"{"token_ids":[1],"model":"m"}"#);
    assert_eq!(r.status, 422);
    assert!(
        r.text().contains("missing field `model_name`"),
        "{}",
        r.text()
    );
}

#[test]
fn body_limits_are_8_mib_for_queries_and_2_mib_elsewhere() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    let tokens = |n: usize| {
        let mut b = String::from("{\"model_name\":\"m\",\"token_ids\":[");
        for i in 0..n {
            if i > 0 {
                b.push(',');
            }
            b.push_str("1000000");
        }
        b.push_str("]}");
        b.into_bytes()
    };
    let body = tokens(275_000); // ~2.2 MB
    assert!(body.len() > 2_100_000);
    let r = s.post_raw_json("/query", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post_raw_json("/register", &body);
    assert_eq!(r.status, 413);
    assert_eq!(
        r.text(),
        "Failed to buffer the request body: length limit exceeded"
    );
    let big = tokens(1_080_000); // ~8.6 MB
    assert!(big.len() > 8_600_000);
    assert_eq!(s.post_raw_json("/query", &big).status, 413);
    assert_eq!(s.post_raw_json("/query_by_hash", &big).status, 413);
}

/// `POST /events` bodies in flight are bounded by `--http-events-inflight-mib`: a request
/// arriving while a body of the whole budget is being read waits, is counted, and is served
/// once that body is done.
/// Poll (bounded) until `series` equals `want`.
fn poll_metric(s: &Server, series: &str, want: f64) {
    for _ in 0..600 {
        if s.metric(series) == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{series} never reached {want}: {}", s.metric(series));
}

/// A raw request head announcing `len` bytes of JSON, on a fresh connection.
fn post_head(s: &Server, path: &str, len: usize) -> std::net::TcpStream {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    c.write_all(head.as_bytes()).unwrap();
    c
}

/// Bodies are claimed from the budget as they arrive: a body that cannot be claimed without
/// leaving the partly read ones unable to finish waits (counted) until they are done, and
/// the claimed bytes never exceed the budget.
fn bodies_in_flight_are_bounded_by_the_budget(
    path: &str,
    flag: &str,
    body: &dyn Fn(u64) -> String,
    in_flight: &str,
    waits: &str,
) {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &[flag, "1"], &[]);
    register(&s, 1, "m", 4);
    let padded = |id: u64| {
        let mut b = body(id).into_bytes();
        b.resize(1 << 20, b' ');
        b
    };
    // A body of exactly the budget, sent in two halves: half of it is claimed.
    let big = padded(1);
    let mut a = post_head(&s, path, big.len());
    a.write_all(&big[..1 << 19]).unwrap();
    poll_metric(&s, in_flight, (1u64 << 19) as f64);
    // A second body of the budget's size: claiming any of it would leave neither able to
    // finish, so it waits for the first, however much of it arrives.
    let second = padded(2);
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let mut b = post_head(&s, path, second.len());
            b.write_all(&second).unwrap();
            let mut answer = String::new();
            b.read_to_string(&mut answer).unwrap();
            answer
        });
        poll_metric(&s, waits, 1.0);
        assert_eq!(s.metric(in_flight), (1u64 << 19) as f64);
        a.write_all(&big[1 << 19..]).unwrap();
        let mut answer = String::new();
        a.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let answer = waiting.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    });
    poll_metric(&s, in_flight, 0.0);
}

#[test]
fn events_bodies_in_flight_are_bounded_by_the_budget() {
    bodies_in_flight_are_bounded_by_the_budget(
        "/events",
        "--http-events-inflight-mib",
        &|id| format!(r#"[{{"worker_id":1,"event":{{"event_id":{id},"data":"cleared"}}}}]"#),
        "kvindex_http_events_body_bytes_in_flight",
        "kvindex_http_events_body_budget_waits_total",
    );
}

/// `/query` and `/query_by_hash` bodies (8 MiB each) have a budget of their own.
#[test]
fn query_bodies_in_flight_are_bounded_by_the_budget() {
    bodies_in_flight_are_bounded_by_the_budget(
        "/query",
        "--http-query-inflight-mib",
        &|_| r#"{"token_ids":[1,2,3,4],"model_name":"m"}"#.to_owned(),
        "kvindex_http_query_body_bytes_in_flight",
        "kvindex_http_query_body_budget_waits_total",
    );
}

#[test]
fn query_counts_tokens_of_full_blocks_with_dynamos_shape() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    let r = query(
        &s,
        json!({"token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9], "model_name": "m"}),
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["scores"], json!({"1": {"0": 8}}));
    assert_eq!(v["frequencies"], json!([]));
    assert_eq!(
        v["instances"],
        json!({"1": {"longest_matched": 8, "gpu": 8, "dp": {"0": 8}, "cpu": 8, "disk": 8}})
    );
    assert!(v["log_lsn"].as_u64().unwrap() >= 1);
    assert!(v.get("tree_sizes").is_none());
    let text = r.text();
    let order: Vec<&str> = text
        .split('"')
        .filter(|k| ["scores", "frequencies", "instances"].contains(k))
        .collect();
    assert_eq!(order, ["scores", "frequencies", "instances"]);
    // Fewer tokens than a block: empty, not an error. Extra fields ignored.
    let v = query(&s, json!({"token_ids": [1, 2], "model_name": "m", "medium": "GPU", "instance_id": 5, "tenant_id": "x"})).json();
    assert_eq!(v["scores"], json!({}));
    // LoRA and cache salt change the hashes.
    assert_eq!(
        query(
            &s,
            json!({"token_ids": T8, "model_name": "m", "lora_name": "a"})
        )
        .json()["scores"],
        json!({})
    );
    assert_eq!(
        query(
            &s,
            json!({"token_ids": T8, "model_name": "m", "cache_salt": "a"})
        )
        .json()["scores"],
        json!({})
    );
    assert_eq!(
        query(
            &s,
            json!({"token_ids": T8, "model_name": "m", "lora_name": ""})
        )
        .json()["scores"],
        json!({"1": {"0": 8}})
    );
    let r = query(
        &s,
        json!({"token_ids": T8, "model_name": "m", "routing_group": "g"}),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "no indexer for model=m routing_group=g"})
        )
    );
    let r = query(&s, json!({"token_ids": T8, "model_name": "x"}));
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "no indexer for model=x routing_group=default"})
        )
    );
}

#[test]
fn query_by_hash_takes_local_hashes_as_i64_and_refuses_a_cache_salt() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    let h = local_hashes(&T8, 4);
    let signed: Vec<i64> = h.iter().map(|&v| v as i64).collect();
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": signed, "model_name": "m"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["scores"], json!({"1": {"0": 8}}));
    // Mid-sequence start matches nothing; engine hashes match nothing.
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": [signed[1]], "model_name": "m"}),
    );
    assert_eq!(r.json()["scores"], json!({}));
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": [101, 102], "model_name": "m"}),
    );
    assert_eq!(r.json()["scores"], json!({}));
    let salt_msg = json!({"error": "cache_salt is not accepted by /query_by_hash; block_hashes must already include the intended cache salt"});
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": [1], "model_name": "nope", "cache_salt": "x"}),
    );
    assert_eq!((r.status, r.json()), (400, salt_msg));
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": [1], "model_name": "m", "cache_salt": null}),
    );
    assert_eq!(r.status, 200);
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": [1], "model_name": "nope"}),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "no indexer for model=nope routing_group=default"})
        )
    );
}

#[test]
fn scores_are_per_dp_rank_and_gpu_is_the_best_rank() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    let h = local_hashes(&T8, 4);
    assert_eq!(
        s.post_json("/events", &stored(1, 1, 1, None, &[(101, h[0])]))
            .status,
        200
    );
    let v = query(&s, json!({"token_ids": T8, "model_name": "m"})).json();
    assert_eq!(v["scores"], json!({"1": {"0": 8, "1": 4}}));
    assert_eq!(v["instances"]["1"]["gpu"], 8);
    assert_eq!(v["instances"]["1"]["dp"], json!({"0": 8, "1": 4}));
}

#[test]
fn unregister_with_group_removes_the_instance_and_its_blocks() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    register(&s, 2, "m", 4);
    store_two_blocks(&s, 1, 0);
    store_two_blocks(&s, 2, 0);
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 1, "model_name": "m", "routing_group": "default", "tenant_id": "x"}),
    );
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let v = query(&s, json!({"token_ids": T8, "model_name": "m"})).json();
    assert_eq!(v["scores"], json!({"2": {"0": 8}}));
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 2, "model_name": "m", "routing_group": "default"}),
    );
    assert_eq!(r.status, 200);
    // Last worker gone: the partition is dropped.
    let r = query(&s, json!({"token_ids": T8, "model_name": "m"}));
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "no indexer for model=m routing_group=default"})
        )
    );
    // And can come back with another block size.
    register(&s, 3, "m", 8);
}

#[test]
fn unregister_one_dp_rank_keeps_the_others() {
    let (_d, s) = server();
    register(&s, 10, "m", 4);
    let r = s.post_json("/register", &json!({"instance_id": 10, "dp_rank": 1, "endpoint": "tcp://h:2", "model_name": "m", "block_size": 4}));
    assert_eq!(r.status, 201);
    store_two_blocks(&s, 10, 0);
    store_two_blocks(&s, 10, 1);
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 10, "model_name": "m", "routing_group": "default", "dp_rank": 1}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        query(&s, json!({"token_ids": T8, "model_name": "m"})).json()["scores"],
        json!({"10": {"0": 8}})
    );
    let w = s.get("/workers").json();
    assert_eq!(w[0]["endpoints"], json!({"0": "tcp://127.0.0.1:18101"}));
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 10, "model_name": "m", "routing_group": "default", "dp_rank": 7}),
    );
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "instance 10 dp_rank 7 not found"}))
    );
}

#[test]
fn unregister_without_group_ignores_dp_rank() {
    let (_d, s) = server();
    register(&s, 10, "m", 4);
    assert_eq!(s.post_json("/register", &json!({"instance_id": 10, "dp_rank": 1, "endpoint": "tcp://h:2", "model_name": "m", "block_size": 4})).status, 201);
    register(&s, 11, "m", 4);
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 10, "model_name": "m", "dp_rank": 1}),
    );
    assert_eq!(r.status, 200);
    let w = s.get("/workers").json();
    assert_eq!(w.as_array().unwrap().len(), 1);
    assert_eq!(w[0]["instance_id"], 11);
}

#[test]
fn unregister_errors_are_404s_with_dynamos_wording() {
    let (_d, s) = server();
    register(&s, 10, "m", 4);
    for (body, msg) in [
        (
            json!({"instance_id": 5, "model_name": "m"}),
            "instance 5 not found",
        ),
        (
            json!({"instance_id": 10, "model_name": "x"}),
            "instance 10 is registered for model=m routing_group=default",
        ),
        (
            json!({"instance_id": 10, "model_name": "m", "routing_group": "g"}),
            "instance 10 is registered for model=m routing_group=default",
        ),
    ] {
        let r = s.post_json("/unregister", &body);
        assert_eq!((r.status, r.json()), (404, json!({"error": msg})));
    }
}

#[test]
fn workers_lists_dynamos_shape_with_exact_match_filters() {
    let (_d, s) = server();
    register(&s, 10, "m", 4);
    assert_eq!(s.post_json("/register", &json!({"instance_id": 10, "dp_rank": 1, "endpoint": "tcp://127.0.0.1:18102", "model_name": "m", "block_size": 4})).status, 201);
    assert_eq!(s.post_json("/register", &json!({"instance_id": 20, "endpoint": "tcp://h:3", "model_name": "m2", "routing_group": "g", "block_size": 8})).status, 201);
    let all = s.get("/workers").json();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let w = s.get("/workers?model_name=m").json();
    let w0 = &w[0];
    assert_eq!(w0["instance_id"], 10);
    assert_eq!(w0["source"], "zmq");
    assert_eq!(w0["model_name"], "m");
    assert_eq!(w0["routing_group"], "default");
    assert_eq!(w0["block_size"], 4);
    assert_eq!(
        w0["endpoints"],
        json!({"0": "tcp://127.0.0.1:18101", "1": "tcp://127.0.0.1:18102"})
    );
    assert_eq!(w0["listeners"]["1"]["endpoint"], "tcp://127.0.0.1:18102");
    let status = w0["status"].as_str().unwrap();
    assert!(["pending", "active", "paused", "failed"].contains(&status));
    assert_eq!(w0["listeners"]["0"]["status"], status);
    assert!(w0.get("tenant_id").is_none());
    assert_eq!(
        s.get("/workers?routing_group=g").json()[0]["instance_id"],
        20
    );
    assert_eq!(
        s.get("/workers?model_name=m&routing_group=g").json(),
        json!([])
    );
    assert_eq!(s.get("/workers?model_name=none").json(), json!([]));
    assert_eq!(
        s.get("/workers?tenant_id=zzz")
            .json()
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn dump_is_dynamo_compatible_with_explicit_partition_names() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    assert_eq!(s.post_json("/register", &json!({"instance_id": 2, "endpoint": "tcp://h:3", "model_name": "org/llama:v1", "routing_group": "g:x", "block_size": 8})).status, 201);
    store_two_blocks(&s, 1, 0);
    let r = s.get("/dump");
    assert_eq!(r.status, 200);
    let v = r.json();
    let m = &v["m:default"];
    assert_eq!(m["block_size"], 4);
    assert_eq!(m["model_name"], "m");
    assert_eq!(m["routing_group"], "default");
    let ev = &m["events"][0];
    assert_eq!(ev["worker_id"], 1);
    assert_eq!(ev["storage_tier"], "device");
    assert_eq!(ev["residency_domain"], "worker");
    assert_eq!(ev["event"]["event_id"], 0);
    assert_eq!(ev["event"]["dp_rank"], 0);
    let st = &ev["event"]["data"]["stored"];
    assert_eq!(st["parent_hash"], json!(null));
    assert_eq!(st["start_position"], json!(null));
    let h = local_hashes(&T8, 4);
    assert_eq!(
        st["blocks"],
        json!([
            {"block_hash": 101, "tokens_hash": h[0], "mm_extra_info": null},
            {"block_hash": 102, "tokens_hash": h[1], "mm_extra_info": null}
        ])
    );
    let other = &v["org/llama:v1:g:x"];
    assert_eq!(other["events"], json!([]));
    assert_eq!(other["model_name"], "org/llama:v1");
    assert_eq!(other["routing_group"], "g:x");
    // Byte for byte what the dump was when it was built whole (recorded from that build): the
    // streamed dump keeps Dynamo's field order, the partitions' order and the compact form.
    let expected = concat!(
        r#"{"m:default":{"block_size":4,"events":[{"worker_id":1,"storage_tier":"device","#,
        r#""residency_domain":"worker","event":{"event_id":0,"data":{"stored":{"parent_hash":null,"#,
        r#""start_position":null,"blocks":[{"block_hash":101,"tokens_hash":T0,"mm_extra_info":null},"#,
        r#"{"block_hash":102,"tokens_hash":T1,"mm_extra_info":null}]}},"dp_rank":0}}],"#,
        r#""model_name":"m","routing_group":"default"},"org/llama:v1:g:x":{"block_size":8,"#,
        r#""events":[],"model_name":"org/llama:v1","routing_group":"g:x"}}"#
    )
    .replace("T0", &h[0].to_string())
    .replace("T1", &h[1].to_string());
    assert_eq!(r.text(), expected);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[test]
fn peer_list_routes() {
    let (_d, s) = server();
    assert_eq!(s.get("/peers").json(), json!([]));
    let r = s.post_json("/register_peer", &json!({"url": "not a url"}));
    assert_eq!((r.status, r.json()), (201, json!({"status": "ok"})));
    assert_eq!(
        s.post_json("/register_peer", &json!({"url": "not a url"}))
            .status,
        201
    );
    assert_eq!(
        s.post_json("/register_peer", &json!({"url": "http://h:8090"}))
            .status,
        201
    );
    let mut peers: Vec<String> = serde_json::from_value(s.get("/peers").json()).unwrap();
    peers.sort();
    assert_eq!(peers, ["http://h:8090", "not a url"]);
    let r = s.post_json("/deregister_peer", &json!({"url": "not a url"}));
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
    let r = s.post_json("/deregister_peer", &json!({"url": "not a url"}));
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "peer not found"}))
    );
}

#[test]
fn reopen_logs_without_access_log_is_ok() {
    let (_d, s) = server();
    let r = s.raw("POST", "/reopen_logs", &[], b"");
    assert_eq!((r.status, r.json()), (200, json!({"status": "ok"})));
}

#[test]
fn access_log_lines_and_reopen_after_rename() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let log_s = log.to_str().unwrap().to_owned();
    let s = start(
        &dir.path().join("data"),
        &["--access-log", &log_s, "--trace-id-header", "x-req"],
        &[],
    );
    register(&s, 1, "m", 4);
    s.raw("GET", "/health", &[("x-req", "trace-abc")], b"");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let reg = lines.iter().find(|l| l["path"] == "/register").unwrap();
    assert_eq!(reg["model"], "m");
    assert_eq!(reg["trace_id"], "-");
    assert_eq!(reg["status"], 201);
    assert_eq!(reg["method"], "POST");
    assert!(reg["duration_ms"].as_f64().is_some());
    let ts = reg["ts"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    let health = lines.iter().find(|l| l["path"] == "/health").unwrap();
    assert_eq!(health["trace_id"], "trace-abc");
    assert_eq!(health["model"], "-");
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    assert_eq!(s.raw("POST", "/reopen_logs", &[], b"").status, 200);
    s.get("/health");
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert!(fresh.contains("\"path\":\"/health\""), "{fresh}");
}

#[test]
fn metrics_follow_dynamos_names_labels_and_counting_rules() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    s.get("/health");
    s.raw("POST", "/health", &[], b"");
    s.get("/nope");
    s.get("/metrics");
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4"));
    let t = r.text();
    for family in [
        "# TYPE dynamo_kvindexer_request_duration_seconds histogram",
        "# TYPE dynamo_kvindexer_requests_total counter",
        "# TYPE dynamo_kvindexer_errors_total counter",
        "# TYPE dynamo_kvindexer_models gauge",
        "# TYPE dynamo_kvindexer_workers gauge",
        "# TYPE dynamo_kvindexer_listeners gauge",
        "# TYPE dynamo_kvrouter_kv_cache_events_applied counter",
    ] {
        assert!(t.contains(family), "missing {family}");
    }
    // Dynamo 1.6.1's help strings, as its /metrics prints them.
    for help in [
        "# HELP dynamo_kvindexer_errors_total HTTP error responses (4xx/5xx)",
        "# HELP dynamo_kvindexer_listeners Number of ZMQ listeners by status",
        "# HELP dynamo_kvindexer_models Number of active model+routing-group indexers",
        "# HELP dynamo_kvindexer_request_duration_seconds HTTP request latency",
        "# HELP dynamo_kvindexer_requests_total Total HTTP requests",
        "# HELP dynamo_kvindexer_workers Number of registered worker instances",
    ] {
        assert!(t.lines().any(|l| l == help), "missing {help:?}");
    }
    assert!(t.contains("dynamo_kvindexer_requests_total{endpoint=\"/health\",method=\"GET\"} 1"));
    assert!(t.contains("dynamo_kvindexer_requests_total{endpoint=\"/health\",method=\"POST\"} 1"));
    assert!(
        t.contains("dynamo_kvindexer_errors_total{endpoint=\"/health\",status_class=\"4xx\"} 1")
    );
    assert!(!t.contains("endpoint=\"/nope\""));
    assert!(!t.contains("endpoint=\"/metrics\""));
    assert!(t.contains(
        "dynamo_kvindexer_request_duration_seconds_bucket{endpoint=\"/register\",le=\"0.0001\"}"
    ));
    assert!(t.contains("le=\"52.4288\""));
    assert!(t.contains("dynamo_kvindexer_models 1"));
    assert!(t.contains("dynamo_kvindexer_workers 1"));
    for st in ["pending", "active", "paused", "failed"] {
        assert!(
            t.contains(&format!("dynamo_kvindexer_listeners{{status=\"{st}\"}}")),
            "{st}"
        );
    }
    assert!(t.contains(
        "dynamo_kvrouter_kv_cache_events_applied{event_type=\"stored\",status=\"ok\"} 1"
    ));
    assert!(t.contains("kvindex_log_next_lsn"));
    assert!(t.contains("kvindex_recovery_seconds"));
    assert!(t.contains("kvindex_log_segment_bytes"));
    // Every family on the page has a description (the log writer's, the recovery's, ...).
    assert!(t.contains("# TYPE kvindex_log_group_commits_total counter"));
    for l in t.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            let help = format!("# HELP {name} ");
            assert!(
                t.lines().any(|h| h.starts_with(&help)),
                "no HELP for {name}"
            );
        }
    }
}

/// A dropped partition's per-partition gauges read 0 on /metrics, not their last values.
#[test]
fn a_dropped_partitions_gauges_read_zero() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    let t = s.get("/metrics").text();
    assert!(
        t.lines()
            .any(|l| l == "kvindex_index_blocks{model_name=\"m\",routing_group=\"default\"} 2"),
        "{t}"
    );
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 1, "model_name": "m", "routing_group": "default"}),
    );
    assert_eq!(r.status, 200);
    let t = s.get("/metrics").text();
    assert!(t.contains("dynamo_kvindexer_models 0"), "{t}");
    let series: Vec<&str> = t
        .lines()
        .filter(|l| l.contains("model_name=\"m\"") && !l.starts_with('#'))
        .filter(|l| l.starts_with("kvindex_index_"))
        .collect();
    assert_eq!(series.len(), 5, "{t}");
    for l in series {
        assert!(l.ends_with(" 0"), "{l}");
    }
}

#[test]
fn test_routes_are_absent_without_the_env_var() {
    let (_d, s) = server();
    assert_eq!(
        s.post_json("/test/pause_listener", &json!({"instance_id": 1}))
            .status,
        404
    );
    assert_eq!(
        s.post_json("/test/resume_listener", &json!({"instance_id": 1}))
            .status,
        404
    );
}

#[test]
fn test_routes_with_the_env_var_use_dynamos_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &[],
        &[("DYN_KV_INDEXER_TEST_ENDPOINTS", "1")],
    );
    assert!(s.stderr().contains("DYN_KV_INDEXER_TEST_ENDPOINTS"));
    register(&s, 3, "m", 4);
    let r = s.post_json("/test/pause_listener", &json!({"instance_id": 99}));
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "instance 99 not found"}))
    );
    let r = s.post_json(
        "/test/pause_listener",
        &json!({"instance_id": 3, "dp_rank": 5}),
    );
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "instance 3 dp_rank 5 not found"}))
    );
    let status = s.get("/workers").json()[0]["listeners"]["0"]["status"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.post_json("/test/resume_listener", &json!({"instance_id": 3}));
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": format!("instance 3 dp_rank 0 cannot be resumed from status {status}")})
        )
    );
    let r = s.post_raw_json("/test/pause_listener", b"{");
    assert_eq!(r.status, 400);
}

#[test]
fn post_events_accepts_json_arrays_and_msgpack() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    register(&s, 2, "m", 4);
    let h = local_hashes(&T8, 4);
    let batch = json!([
        stored(1, 0, 1, None, &[(101, h[0])]),
        stored(1, 0, 2, Some(101), &[(102, h[1])])
    ]);
    let r = s.post_json("/events", &batch);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], 2);
    let ev: kvindex_engine::RouterEvent =
        serde_json::from_value(stored(2, 0, 1, None, &[(101, h[0])])).unwrap();
    let bytes = rmp_serde::to_vec_named(&vec![ev]).unwrap();
    let r = s.raw(
        "POST",
        "/events",
        &[("Content-Type", "application/msgpack")],
        &bytes,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = query(&s, json!({"token_ids": T8, "model_name": "m"})).json();
    assert_eq!(v["scores"], json!({"1": {"0": 8}, "2": {"0": 4}}));
    // Removal.
    assert_eq!(
        s.post_json("/events", &removed(1, 0, 3, &[102])).status,
        200
    );
    let v = query(&s, json!({"token_ids": T8, "model_name": "m"})).json();
    assert_eq!(v["scores"]["1"], json!({"0": 4}));
}

#[test]
fn post_events_errors() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    let h = local_hashes(&T8, 4);
    let r = s.post_json("/events", &stored(9, 0, 1, None, &[(1, h[0])]));
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "instance 9 not found"}))
    );
    let r = s.raw("POST", "/events", &[("Content-Type", "text/plain")], b"{}");
    assert_eq!(r.status, 415);
    assert_eq!(
        r.text(),
        "Expected request with `Content-Type: application/json` or `Content-Type: application/msgpack`"
    );
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    // `application/*+json` is JSON.
    let body = serde_json::to_vec(&stored(1, 0, 1, None, &[(1, h[0])])).unwrap();
    let r = s.raw(
        "POST",
        "/events",
        &[("Content-Type", "application/vnd.kv+json; charset=utf-8")],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // One unknown worker beside a good event: the good one is kept.
    let r = s.post_json(
        "/events",
        &json!([
            stored(9, 0, 1, None, &[(1, h[0])]),
            stored(1, 0, 1, None, &[(101, h[0])])
        ]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], 1);
    assert_eq!(r.json()["rejected"][0]["index"], 0);
    // Explicit partition, created on the fly with block_size.
    let r = s.post_json(
        "/events?model_name=x&routing_group=g&block_size=4",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = query(
        &s,
        json!({"token_ids": T8, "model_name": "x", "routing_group": "g"}),
    )
    .json();
    assert_eq!(v["scores"], json!({"77": {"0": 4}}));
    let r = s.post_json(
        "/events?model_name=nope",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            404,
            json!({"error": "no indexer for model=nope routing_group=default"})
        )
    );
    let r = s.post_json(
        "/events?model_name=x&routing_group=g&block_size=8",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(r.status, 409);
}

/// Refusals of `?model_name=` / `&block_size=` are counted like the other refused events,
/// with the reasons of the NATS intake.
#[test]
fn post_events_partition_refusals_are_counted() {
    let (_d, s) = server();
    let h = local_hashes(&T8, 4);
    let r = s.post_json(
        "/events?model_name=nope",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="unknown_partition"}"#),
        1.0
    );
    register(&s, 1, "m", 4);
    let r = s.post_json(
        "/events?model_name=m&block_size=8",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "block_size mismatch for model=m routing_group=default: existing=4, requested=8"})
        )
    );
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="block_size"}"#),
        1.0
    );
}

/// `?block_size=0` would create a partition that indexes nothing and keeps every later
/// registration of its model out (409, persisted): refused with a 400, counted, nothing
/// created. A request without events creates no partition either.
#[test]
fn post_events_refuses_block_size_0_and_creates_no_partition_without_events() {
    let (_d, s) = server();
    for body in [json!([]), stored(77, 0, 1, None, &[(5, 6)])] {
        let r = s.post_json("/events?model_name=llama&block_size=0", &body);
        assert_eq!(r.status, 400, "{}", r.text());
        let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("block_size must be at least 1"), "{error}");
    }
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="block_size"}"#),
        2.0
    );
    // An empty list: nothing to do, nothing created.
    let r = s.post_json("/events?model_name=other&block_size=16", &json!([]));
    assert_eq!(
        (r.status, r.json()),
        (
            200,
            json!({"status": "ok", "accepted": 0, "rejected": [], "last_lsn": null})
        )
    );
    assert_eq!(s.metric("dynamo_kvindexer_models"), 0.0);
    let r = query(&s, json!({"token_ids": T8, "model_name": "other"}));
    assert_eq!(r.status, 404, "{}", r.text());
    // The model can still be registered with its real block size, also after a restart.
    register(&s, 1, "llama", 16);
    // `?block_size=0` without `model_name` (events of a registered worker) is refused too.
    let r = s.post_json("/events?block_size=0", &stored(1, 0, 1, None, &[(5, 6)]));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("block_size must be at least 1"),
        "{}",
        r.text()
    );
    let s = s.restart(&[]);
    let r = s.post_json(
        "/register",
        &json!({"instance_id": 2, "endpoint": "tcp://127.0.0.1:18101", "model_name": "llama", "block_size": 16}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Events create partitions only while fewer than `--max-event-partitions` partitions have
/// no registered worker; registrations are not held to that limit (only to `--max-partitions`).
#[test]
fn events_create_partitions_only_up_to_max_event_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--max-event-partitions", "2"],
        &[],
    );
    let h = local_hashes(&T8, 4);
    let post = |model: &str| {
        s.post_json(
            &format!("/events?model_name={model}&block_size=4"),
            &stored(77, 0, 1, None, &[(5, h[0])]),
        )
    };
    assert_eq!(post("a").status, 200);
    assert_eq!(post("b").status, 200);
    let r = post("c");
    assert_eq!(r.status, 409, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("--max-event-partitions"), "{error}");
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="partition_limit"}"#),
        1.0
    );
    // Existing partitions still take events; a registration creates a partition anyway, and
    // one that takes a worker no longer counts.
    assert_eq!(post("a").status, 200);
    register(&s, 1, "c", 4);
    register(&s, 2, "a", 4);
    assert_eq!(post("d").status, 200);
    assert_eq!(s.metric("dynamo_kvindexer_models"), 4.0);
}

/// `--max-partitions` bounds the partitions registrations and events create (409, counted),
/// never a registration joining an existing partition; a restart with more partitions than the
/// limit keeps them all (WARN), and creations stay refused until fewer exist.
#[test]
fn max_partitions_bounds_registrations_and_events_and_a_restart_keeps_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &["--max-partitions", "2"], &[]);
    let h = local_hashes(&T8, 4);
    let post = |s: &Server, model: &str| {
        s.post_json(
            &format!("/events?model_name={model}&block_size=4"),
            &stored(77, 0, 1, None, &[(5, h[0])]),
        )
    };
    let register_c = |s: &Server| {
        s.post_json(
            "/register",
            &json!({"instance_id": 3, "endpoint": "tcp://127.0.0.1:18101", "model_name": "c", "block_size": 4}),
        )
    };
    register(&s, 1, "a", 4);
    assert_eq!(post(&s, "b").status, 200);
    let r = register_c(&s);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        r.json()["error"],
        "partition model=c routing_group=default not created: 2 partitions exist, the most \
         this service holds (--max-partitions)"
    );
    let r = post(&s, "c");
    assert_eq!(r.status, 409, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("--max-partitions"), "{error}");
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="partition_limit"}"#),
        1.0
    );
    assert_eq!(
        s.metric(r#"kvindex_partition_creations_refused_total{reason="max_partitions"}"#),
        2.0
    );
    // Existing partitions take registrations and events.
    register(&s, 2, "a", 4);
    register(&s, 4, "b", 4);
    assert_eq!(post(&s, "b").status, 200);
    assert_eq!(s.metric("dynamo_kvindexer_models"), 2.0);

    let s = s.restart(&["--max-partitions", "1"]);
    assert_eq!(
        s.metric("dynamo_kvindexer_models"),
        2.0,
        "a partition was lost"
    );
    let r = query(&s, json!({"token_ids": T8, "model_name": "b"}));
    assert_eq!(r.json()["scores"], json!({"77": {"0": 4}}), "{}", r.text());
    let r = register_c(&s);
    assert_eq!(r.status, 409, "{}", r.text());
    register(&s, 5, "a", 4);
    let (status, log) = s.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(
        log.iter()
            .any(|l| l.contains("WARN")
                && l.contains("more partitions restored than --max-partitions")),
        "{log:?}"
    );
}

/// `--expected-blocks` sizes up front the map of the partitions created for a registered
/// worker only: a partition created by events starts empty and grows (it used to take the
/// whole map too, up to `--max-event-partitions` of them); the same after a restart.
#[test]
fn expected_blocks_presizes_the_partitions_of_registered_workers_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--expected-blocks", "100000"],
        &[],
    );
    let presized = kvindex_engine::expected_blocks_map_bytes(100_000) as f64;
    let map_bytes = |s: &Server, model: &str| {
        s.metric(&format!(
            r#"kvindex_index_map_bytes{{model_name="{model}",routing_group="default"}}"#
        ))
    };
    register(&s, 1, "registered", 4);
    let h = local_hashes(&T8, 4);
    let r = s.post_json(
        "/events?model_name=events&block_size=4",
        &stored(77, 0, 1, None, &[(5, h[0])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let check = |s: &Server| {
        assert_eq!(map_bytes(s, "registered"), presized);
        let events = map_bytes(s, "events");
        assert!(events > 0.0 && events < presized / 100.0, "{events}");
    };
    check(&s);
    check(&s.restart(&["--expected-blocks", "100000"]));
}

/// kvindex reserves event ids >= 2^63 (they tag JetStream stream sequences in its log): such
/// a request is refused whole with a 400 naming the event, nothing is logged, and it is counted.
#[test]
fn post_events_refuses_event_ids_at_or_above_2_pow_63() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    let h = local_hashes(&T8, 4);
    let reserved = 1u64 << 63 | 3;
    let r = s.post_json(
        "/events",
        &json!([
            stored(1, 0, 1, None, &[(101, h[0])]),
            stored(1, 0, reserved, Some(101), &[(102, h[1])])
        ]),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("event 1") && error.contains(&format!("event_id {reserved} is reserved")),
        "{error}"
    );
    assert_eq!(
        s.metric(r#"kvindex_http_rejected_total{endpoint="/events",reason="reserved_event_id"}"#),
        1.0
    );
    // Nothing of the request was applied.
    let v = query(&s, json!({"token_ids": T8, "model_name": "m"})).json();
    assert_eq!(v["scores"], json!({}));
    // The largest id below 2^63 is fine.
    let r = s.post_json(
        "/events",
        &stored(1, 0, (1u64 << 63) - 1, None, &[(101, h[0])]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn concurrent_workers_storing_the_same_prefix_are_all_indexed() {
    let (_d, s) = server();
    let workers: Vec<u64> = (1..=6).collect();
    for w in &workers {
        register(&s, *w, "m", 4);
    }
    let tokens: Vec<u32> = (1..=64).collect();
    let h = local_hashes(&tokens, 4);
    let s = std::sync::Arc::new(s);
    for round in 0..5u64 {
        let threads: Vec<_> = workers
            .iter()
            .map(|&w| {
                let s = std::sync::Arc::clone(&s);
                let blocks: Vec<(u64, u64)> = h
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| (1000 + i as u64, l))
                    .collect();
                std::thread::spawn(move || {
                    let r = s.post_json("/events", &stored(w, 0, round, None, &blocks));
                    assert_eq!(r.status, 200);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let v = s
            .post_json("/query", &json!({"token_ids": tokens, "model_name": "m"}))
            .json();
        for w in &workers {
            assert_eq!(
                v["scores"][w.to_string()]["0"],
                64,
                "round {round} worker {w}: {v}"
            );
        }
        for &w in &workers {
            let hashes: Vec<u64> = (0..16).map(|i| 1000 + i).collect();
            assert_eq!(
                s.post_json("/events", &removed(w, 0, 100 + round, &hashes))
                    .status,
                200
            );
        }
    }
}

/// Checklist 1, 23: `--access-log-local-time` writes local timestamps with a numeric offset
/// (`+hh:mm`) instead of UTC `Z`; the trace-id header defaults to `x-trace-id`.
#[test]
fn access_log_local_time_writes_an_offset_instead_of_z() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let s = start(
        &dir.path().join("data"),
        &[
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-local-time",
        ],
        &[],
    );
    // No --trace-id-header: Dynamo's default header `x-trace-id` is logged.
    s.raw("GET", "/health", &[("x-trace-id", "t-1")], b"");
    let text = std::fs::read_to_string(&log).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["trace_id"], "t-1");
    let ts = line["ts"].as_str().unwrap();
    assert!(!ts.ends_with('Z'), "{ts}");
    let (_, offset) = ts.split_at(23);
    assert!(
        offset.len() == 6 && (offset.starts_with('+') || offset.starts_with('-')),
        "{ts}"
    );
}

/// Checklist 3, 4: `/metrics` is GET only; a field of the wrong type is axum's 422; unknown
/// fields are ignored on every JSON route.
#[test]
fn wrong_types_are_422_and_unknown_fields_are_ignored_everywhere() {
    let (_d, s) = server();
    let r = s.raw("POST", "/metrics", &[], b"");
    assert_eq!((r.status, r.body.len()), (405, 0));
    let r = s.post_raw_json(
        "/register",
        br#"{"instance_id":"ten","endpoint":"tcp://h:1","model_name":"m","block_size":4}"#,
    );
    assert_eq!(r.status, 422);
    assert!(
        r.text()
            .starts_with("Failed to deserialize the JSON body into the target type: instance_id: invalid type: string \"ten\", expected u64"),
        "{}",
        r.text()
    );
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let r = s.post_raw_json(
        "/query",
        br#"{"token_ids":[1,2,3],"model_name":"m","block_size":"x"}"#,
    );
    // `block_size` is not a /query field: ignored even with a wrong type. No partition yet.
    assert_eq!(r.status, 404, "{}", r.text());
    let extra = json!({"zzz": [1, {"a": null}]});
    let with = |mut v: serde_json::Value| {
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let r = s.post_json(
        "/register",
        &with(
            json!({"instance_id": 1, "endpoint": "tcp://h:1", "model_name": "m", "block_size": 4}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = s.post_json(
        "/query_by_hash",
        &with(json!({"block_hashes": [1], "model_name": "m"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post_json("/register_peer", &with(json!({"url": "http://p:1"})));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = s.post_json("/deregister_peer", &with(json!({"url": "http://p:1"})));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post_json(
        "/unregister",
        &with(json!({"instance_id": 1, "model_name": "m"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Checklist 15 / SERVICE.md §6.2: no reference counting — a block stored twice is gone after
/// one removal; removing an unknown hash is a no-op counted as `ok`.
#[test]
fn a_block_stored_twice_is_gone_after_one_removal() {
    let (_d, s) = server();
    register(&s, 1, "m", 4);
    store_two_blocks(&s, 1, 0);
    store_two_blocks(&s, 1, 0);
    let q = json!({"token_ids": T8, "model_name": "m"});
    assert_eq!(
        query(&s, q.clone()).json()["scores"],
        json!({"1": {"0": 8}})
    );
    assert_eq!(
        s.post_json("/events", &removed(1, 0, 2, &[102])).status,
        200
    );
    assert_eq!(
        query(&s, q.clone()).json()["scores"],
        json!({"1": {"0": 4}})
    );
    assert_eq!(
        s.post_json("/events", &removed(1, 0, 3, &[999])).status,
        200
    );
    assert_eq!(query(&s, q).json()["scores"], json!({"1": {"0": 4}}));
}

/// SERVICE.md §3.11: a reopen that fails (the log's directory is gone) answers 500
/// `{"error": ...}`, keeps logging to the old file, and a later reopen can succeed again.
#[test]
fn reopen_logs_failure_is_a_500_with_an_error_body() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("access.log");
    let s = start(
        &dir.path().join("data"),
        &["--access-log", log.to_str().unwrap()],
        &[],
    );
    s.get("/health");
    let moved = dir.path().join("moved.log");
    std::fs::rename(&log, &moved).unwrap();
    std::fs::remove_dir(&logs).unwrap();
    let r = s.raw("POST", "/reopen_logs", &[], b"");
    assert_eq!(r.status, 500);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let msg = r.json()["error"].as_str().unwrap().to_owned();
    assert!(msg.contains("failed to reopen access log"), "{msg}");
    // Still logging into the file it had open.
    s.get("/health");
    assert!(std::fs::read_to_string(&moved)
        .unwrap()
        .contains("\"path\":\"/reopen_logs\""));
    std::fs::create_dir(&logs).unwrap();
    assert_eq!(s.raw("POST", "/reopen_logs", &[], b"").status, 200);
    assert!(
        s.metric("dynamo_kvindexer_errors_total{endpoint=\"/reopen_logs\",status_class=\"5xx\"}")
            >= 1.0
    );
}
