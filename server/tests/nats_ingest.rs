//! NATS transport against a real `nats-server` (see tests/nats_support): core event ingestion
//! (JSON, msgpack, batches, request-style durable replies), malformed and misaddressed messages
//! counted and refused, queries over request/reply answering exactly what HTTP answers, a
//! server that is down at start-up, and graceful shutdown.

mod common;
mod nats_support;

use common::*;
use nats_support::*;
use serde_json::json;

fn start_kvindex(nats: &NatsServer, dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec!["--nats-url", nats.url.as_str()];
    args.extend_from_slice(extra);
    start(dir, &args, &[])
}

/// Request-style store, on `subject` (block size 4 in the header), of `worker`'s chain of the
/// first `blocks` blocks of `tokens(4 * blocks)`, engine hashes from `base`; the reply.
fn request_store(
    c: &Client,
    subject: &str,
    worker: u64,
    blocks: usize,
    base: u64,
) -> serde_json::Value {
    let h = local_hashes(&tokens(4 * blocks as u32), 4);
    c.request(
        subject,
        Some(headers(&[("Kvindex-Block-Size", "4")])),
        stored(worker, 0, 1, None, &chain(&h, blocks, base))
            .to_string()
            .into_bytes(),
    )
    .json()
}

fn scores_of(v: &serde_json::Value) -> serde_json::Value {
    v["scores"].clone()
}

#[test]
fn core_events_are_indexed_and_queries_over_nats_answer_like_http() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_kvindex(&nats, dir.path(), &[]);
    wait_subscribed(&s, "events");
    wait_subscribed(&s, "query");
    wait_subscribed(&s, "query_by_hash");
    let c = Client::connect(&nats.url);
    let t = tokens(16);
    let h = local_hashes(&t, 4);

    // Request-style event: the reply comes once it is durable and applied; the header creates
    // the partition, as `POST /events?block_size=` does.
    let ack = request_store(&c, "kvindex.events.m.default", 1, 4, 100);
    assert_eq!(ack["status"], "ok", "{ack}");
    assert_eq!(ack["accepted"], 1);
    let r = s.post_json("/query", &json!({"token_ids": t, "model_name": "m"}));
    assert_eq!(scores_of(&r.json()), json!({"1": {"0": 16}}));

    // Fire-and-forget, named-field msgpack, an array batch of two events for worker 2.
    let batch = json!([
        stored(2, 0, 1, None, &chain(&h, 1, 200)),
        stored(2, 0, 2, Some(200), &chain(&h[1..], 1, 201)),
    ]);
    c.publish(
        "kvindex.events.m.default",
        rmp_serde::to_vec_named(&batch).unwrap(),
    );
    wait_until("worker 2's two blocks indexed from msgpack", || {
        s.post_json("/query", &json!({"token_ids": t, "model_name": "m"}))
            .json()["scores"]["2"]["0"]
            == 8
    });
    let http = s
        .post_json("/query", &json!({"token_ids": t, "model_name": "m"}))
        .json();
    assert_eq!(scores_of(&http), json!({"1": {"0": 16}, "2": {"0": 8}}));

    // Queries over NATS: the same body the HTTP route answers, log_lsn included.
    let q = c.request(
        "kvindex.query.m.default",
        None,
        json!({"token_ids": t}).to_string().into_bytes(),
    );
    assert_eq!(q.header("Kvindex-Status").as_deref(), Some("200"));
    assert_eq!(q.json(), http);
    let hashes: Vec<i64> = h.iter().map(|&x| x as i64).collect();
    let http_h = s
        .post_json(
            "/query_by_hash",
            &json!({"block_hashes": hashes, "model_name": "m"}),
        )
        .json();
    let q = c.request(
        "kvindex.query_by_hash.m.default",
        None,
        json!({"block_hashes": hashes, "model_name": "m", "routing_group": "default"})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(q.json(), http_h);
    assert_eq!(scores_of(&http_h), json!({"1": {"0": 16}, "2": {"0": 8}}));

    // Errors: same text as HTTP, HTTP's status in the header.
    let q = c.request(
        "kvindex.query.nope.default",
        None,
        json!({"token_ids": t}).to_string().into_bytes(),
    );
    assert_eq!(q.header("Kvindex-Status").as_deref(), Some("404"));
    let http_err = s.post_json("/query", &json!({"token_ids": t, "model_name": "nope"}));
    assert_eq!(http_err.status, 404);
    assert_eq!(q.json(), http_err.json());
    assert_eq!(
        q.json(),
        json!({"error": "no indexer for model=nope routing_group=default"})
    );
    let bad = br#"{"token_ids": [-1], "model_name": "m"}"#;
    let q = c.request("kvindex.query.m.default", None, bad.to_vec());
    let http_bad = s.post_raw_json("/query", bad);
    assert_eq!(http_bad.status, 422);
    assert_eq!(q.header("Kvindex-Status").as_deref(), Some("422"));
    assert_eq!(q.json(), json!({"error": http_bad.text()}));
    let q = c.request("kvindex.query.m.default", None, b"{nope".to_vec());
    assert_eq!(q.header("Kvindex-Status").as_deref(), Some("400"));
    assert_eq!(
        q.json(),
        json!({"error": s.post_raw_json("/query", b"{nope").text()})
    );
    let q = c.request(
        "kvindex.query.m.default",
        None,
        json!({"token_ids": t, "model_name": "other"})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(
        q.json(),
        json!({"error": "model_name `other` does not match the subject's `m`"})
    );
    let q = c.request(
        "kvindex.query_by_hash.m.default",
        None,
        json!({"block_hashes": [1], "cache_salt": "s"})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(q.header("Kvindex-Status").as_deref(), Some("400"));
    assert_eq!(
        q.json(),
        s.post_json(
            "/query_by_hash",
            &json!({"block_hashes": [1], "model_name": "m", "cache_salt": "s"})
        )
        .json()
    );

    let m = metrics(&s);
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_query_requests_total",
            &[("kind", "query"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_query_requests_total",
            &[("kind", "query"), ("outcome", "error")]
        ),
        4.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_events_accepted_total",
            &[("source", "core")]
        ),
        3.0
    );
    assert_eq!(
        metric_sum(
            &m,
            "kvindex_nats_messages_received_total",
            &[("source", "core")]
        ),
        2.0
    );
    assert_eq!(metric_sum(&m, "kvindex_nats_connected", &[]), 1.0);
}

#[test]
fn malformed_and_misaddressed_event_messages_are_counted_and_refused() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_kvindex(&nats, dir.path(), &[]);
    register(&s, 1, "m", 4);
    wait_subscribed(&s, "events");
    let c = Client::connect(&nats.url);
    let h = local_hashes(&tokens(8), 4);
    let good = || {
        stored(1, 0, 1, None, &chain(&h, 2, 10))
            .to_string()
            .into_bytes()
    };
    let error_of = |subject: &str, hdrs: Option<async_nats::HeaderMap>, payload: Vec<u8>| {
        let v = c.request(subject, hdrs, payload).json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("expected an error, got {v}"))
            .to_owned()
    };
    let cases: Vec<(&str, Option<async_nats::HeaderMap>, Vec<u8>, &str)> = vec![
        (
            "kvindex.events.m.default",
            None,
            b"{nope".to_vec(),
            "decode",
        ),
        ("kvindex.events.m.default", None, vec![0xc1, 0x00], "decode"),
        (
            "kvindex.events.m.default",
            Some(headers(&[("Content-Type", "text/plain")])),
            good(),
            "decode",
        ),
        ("kvindex.events.m%zz.default", None, good(), "subject"),
        ("kvindex.events.m", None, good(), "subject"),
        (
            "kvindex.events.nope.default",
            None,
            good(),
            "unknown_partition",
        ),
        (
            "kvindex.events.m.default",
            Some(headers(&[("Kvindex-Block-Size", "8")])),
            good(),
            "block_size",
        ),
        (
            "kvindex.events.m.default",
            Some(headers(&[("Kvindex-Block-Size", "four")])),
            good(),
            "block_size",
        ),
        // An event_id at or above 2^63 would pass for a JetStream stream sequence in the log.
        (
            "kvindex.events.m.default",
            None,
            stored(1, 0, 1 << 63, None, &chain(&h, 2, 10))
                .to_string()
                .into_bytes(),
            "reserved_event_id",
        ),
    ];
    for (subject, hdrs, payload, _) in &cases {
        let e = error_of(subject, hdrs.clone(), payload.clone());
        assert!(!e.is_empty(), "{subject}");
    }
    assert_eq!(
        error_of("kvindex.events.nope.default", None, good()),
        "no indexer for model=nope routing_group=default"
    );
    assert!(
        error_of(cases[8].0, None, cases[8].2.clone())
            .contains("event_id 9223372036854775808 is reserved"),
        "the reason is said"
    );
    let m = metrics(&s);
    for reason in [
        "decode",
        "subject",
        "unknown_partition",
        "block_size",
        "reserved_event_id",
    ] {
        let expected = cases.iter().filter(|c| c.3 == reason).count() as f64
            + f64::from(u8::from(
                reason == "unknown_partition" || reason == "reserved_event_id",
            ));
        assert_eq!(
            metric_sum(
                &m,
                "kvindex_nats_messages_rejected_total",
                &[("source", "core"), ("reason", reason)]
            ),
            expected,
            "{reason}"
        );
    }
    // Nothing was applied; the service still works.
    let t = tokens(8);
    let q = s.post_json("/query", &json!({"token_ids": t, "model_name": "m"}));
    assert_eq!(scores_of(&q.json()), json!({}));
    let ack = c.request("kvindex.events.m.default", None, good()).json();
    assert_eq!(ack["accepted"], 1, "{ack}");
    let q = s.post_json("/query", &json!({"token_ids": t, "model_name": "m"}));
    assert_eq!(scores_of(&q.json()), json!({"1": {"0": 8}}));
}

#[test]
fn names_with_dots_are_escaped_in_subjects() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_kvindex(&nats, dir.path(), &[]);
    wait_subscribed(&s, "events");
    wait_subscribed(&s, "query");
    let c = Client::connect(&nats.url);
    let subjects = kvindex_server::nats_subjects::Subjects::new("kvindex");
    let model = "Qwen/Qwen3-0.6B";
    let group = "team a";
    let subject = subjects.events(model, group);
    assert_eq!(subject, "kvindex.events.Qwen/Qwen3-0%2E6B.team%20a");
    let ack = request_store(&c, &subject, 5, 2, 1);
    assert_eq!(ack["accepted"], 1, "{ack}");
    let http = s
        .post_json(
            "/query",
            &json!({"token_ids": tokens(8), "model_name": model, "routing_group": group}),
        )
        .json();
    assert_eq!(scores_of(&http), json!({"5": {"0": 8}}));
    let q = c.request(
        &subjects.query(
            kvindex_server::nats_subjects::QueryKind::Tokens,
            model,
            group,
        ),
        None,
        json!({"token_ids": tokens(8)}).to_string().into_bytes(),
    );
    assert_eq!(q.json(), http);
}

#[test]
fn an_unreachable_server_does_not_hold_start_up_and_is_joined_later() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    // Nothing listens on the port: the HTTP service comes up anyway.
    let s = start(dir.path(), &["--nats-url", &url], &[]);
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(metric_sum(&metrics(&s), "kvindex_nats_connected", &[]), 0.0);
    let nats = NatsServer::start_on(port);
    wait_until("kvindex connected to NATS", || {
        metric_sum(&metrics(&s), "kvindex_nats_connected", &[]) == 1.0
    });
    wait_subscribed(&s, "events");
    let c = Client::connect(&nats.url);
    let ack = request_store(&c, "kvindex.events.m.default", 1, 1, 1);
    assert_eq!(ack["accepted"], 1, "{ack}");
}

#[test]
fn sigterm_while_nats_is_unreachable_still_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", free_port());
    let s = start(
        dir.path(),
        &["--nats-url", &url, "--nats-jetstream-stream", "S"],
        &[],
    );
    let (status, log) = s.terminate();
    let log = log.join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("NATS is not connected at shutdown"), "{log}");
    assert!(log.contains("event log synced and closed"), "{log}");
}

#[test]
fn sigterm_drains_the_nats_subscriptions_and_exits_zero() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let s = start_kvindex(&nats, dir.path(), &[]);
    wait_subscribed(&s, "events");
    let c = Client::connect(&nats.url);
    let ack = request_store(&c, "kvindex.events.m.default", 1, 1, 1);
    assert_eq!(ack["accepted"], 1);
    let (status, log) = s.terminate();
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
    let log = log.join("\n");
    assert!(log.contains("NATS event subscription stopped"), "{log}");
    assert!(
        log.contains("NATS subscriptions drained and flushed"),
        "{log}"
    );
    // The event survives the restart (it was durable before the reply).
    let s = start(dir.path(), &[], &[]);
    let q = s.post_json(
        "/query",
        &json!({"token_ids": tokens(4), "model_name": "m"}),
    );
    assert_eq!(scores_of(&q.json()), json!({"1": {"0": 4}}));
}

#[test]
fn bad_nats_settings_exit_1_before_anything_opens() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = run(
        &["serve", "--data-dir", d, "--nats-url", "nats://h:notaport"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("invalid --nats-url `nats://h:notaport`"),
        "{err}"
    );
    let (code, _, err) = run(
        &["serve", "--data-dir", d, "--nats-jetstream-stream", "S"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--nats-jetstream-stream needs --nats-url"),
        "{err}"
    );
}
