//! Hostile input never crashes the service: each bad request gets an error status and is
//! counted, and the server keeps answering.

mod common;

use common::*;
use serde_json::json;

fn alive(s: &Server) {
    assert_eq!(s.get("/health").status, 200, "{}", s.stderr());
}

fn server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &[], &[]);
    register(&s, 1, "m", 4);
    (dir, s)
}

#[test]
fn huge_bodies_get_413_on_every_route() {
    let (_d, s) = server();
    let big = vec![b' '; 9 << 20];
    for path in [
        "/register",
        "/unregister",
        "/query",
        "/query_by_hash",
        "/events",
        "/register_peer",
    ] {
        let r = s.post_raw_json(path, &big);
        assert_eq!(r.status, 413, "{path}");
        assert_eq!(
            r.text(),
            "Failed to buffer the request body: length limit exceeded"
        );
    }
    assert!(
        s.metric("dynamo_kvindexer_errors_total{endpoint=\"/query\",status_class=\"4xx\"}") >= 1.0
    );
    alive(&s);
}

#[test]
fn deeply_nested_json_is_refused() {
    let (_d, s) = server();
    let mut deep = String::from("{\"model_name\":\"m\",\"token_ids\":");
    deep.push_str(&"[".repeat(100_000));
    deep.push_str(&"]".repeat(100_000));
    deep.push('}');
    for path in ["/query", "/register", "/events"] {
        let r = s.post_raw_json(path, deep.as_bytes());
        assert!(
            matches!(r.status, 400 | 422),
            "{path}: {} {}",
            r.status,
            r.text()
        );
    }
    let deep_array = "[".repeat(200_000);
    assert_eq!(
        s.post_raw_json("/events", deep_array.as_bytes()).status,
        400
    );
    alive(&s);
}

#[test]
fn invalid_utf8_is_refused() {
    let (_d, s) = server();
    let body = b"{\"model_name\":\"m\xff\xfe\",\"token_ids\":[1]}";
    assert_eq!(s.post_raw_json("/query", body).status, 400);
    let ev = b"{\"worker_id\":1,\"event\":{\"event_id\":1,\"data\":\"cleared\"},\"x\":\"\xff\"}";
    let r = s.post_raw_json("/events", ev);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("UTF-8"));
    assert!(s.metric("kvindex_http_rejected_total{endpoint=\"/events\",reason=\"decode\"}") >= 1.0);
    alive(&s);
}

#[test]
fn garbage_msgpack_and_truncated_json_are_refused_and_counted() {
    let (_d, s) = server();
    let garbage: Vec<&[u8]> = vec![
        b"\xc1\xc1\xc1",
        b"\xdd\xff\xff\xff\xff",
        b"\x91\xde\xff\xff",
        b"\xdc\x00\x05\x01",
        b"",
        &[0x9f; 4096],
    ];
    for g in &garbage {
        let r = s.raw(
            "POST",
            "/events",
            &[("Content-Type", "application/msgpack")],
            g,
        );
        assert_eq!(r.status, 400, "{g:?}: {}", r.text());
    }
    for g in [&b"{\"worker_id\":1,"[..], b"[{}]", b"null", b"42", b"\"x\""] {
        assert_eq!(
            s.post_raw_json("/events", g).status,
            400,
            "{:?}",
            String::from_utf8_lossy(g)
        );
    }
    let n = s.metric("kvindex_http_rejected_total{endpoint=\"/events\",reason=\"decode\"}");
    assert!(n >= (garbage.len() + 5) as f64, "{n}");
    assert!(
        s.metric("dynamo_kvindexer_errors_total{endpoint=\"/events\",status_class=\"4xx\"}")
            >= 11.0
    );
    alive(&s);
}

#[test]
fn bad_values_inside_valid_events_do_not_break_the_index() {
    let (_d, s) = server();
    // Unknown parent, a lower tier, negative hash, unknown variant: refused, counted or indexed
    // apart (the disk store shows in `instances`, never in the device `scores`), never fatal.
    let h = local_hashes(&[1, 2, 3, 4], 4);
    assert_eq!(
        s.post_json("/events", &stored(1, 0, 1, Some(999), &[(1, h[0])]))
            .status,
        200
    );
    let mut tiered = stored(1, 0, 2, None, &[(1, h[0])]);
    tiered["storage_tier"] = json!("disk");
    assert_eq!(s.post_json("/events", &tiered).status, 200);
    let r = s.post_raw_json("/events", br#"{"worker_id":1,"event":{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":-5,"tokens_hash":1}]}}}}"#);
    assert_eq!(r.status, 400);
    let r = s.post_raw_json(
        "/events",
        br#"{"worker_id":1,"event":{"event_id":1,"data":"Stored"}}"#,
    );
    assert_eq!(r.status, 400);
    let v = s
        .post_json(
            "/query",
            &json!({"token_ids": [1, 2, 3, 4], "model_name": "m"}),
        )
        .json();
    assert_eq!(v["scores"], json!({}));
    assert_eq!(v["instances"]["1"]["disk"], 4);
    assert!(s.metric("dynamo_kvrouter_kv_cache_events_applied{event_type=\"stored\",status=\"parent_block_not_found\"}") >= 1.0);
    alive(&s);
}
