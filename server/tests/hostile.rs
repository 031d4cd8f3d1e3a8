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

// --- slow and garbage connections (issue #4: slowloris gets an error and a counter) ---------

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A raw connection to `s` with a generous read bound (a safety net, not an assertion).
fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(&s.addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Read until the server closes the connection; what it sent.
fn read_until_closed(c: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("the server never closed the connection: {e}"),
        }
    }
}

/// Poll (bounded) until `series` reaches `min`: a connection's counter is recorded by the
/// server after the close the client already saw.
fn metric_reaches(s: &Server, series: &str, min: f64) -> bool {
    for _ in 0..600 {
        if s.metric(series) >= min {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn short_deadline_server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-read-timeout-ms", "300"],
        &[],
    );
    register(&s, 1, "m", 4);
    (dir, s)
}

#[test]
fn a_request_head_dribbled_byte_by_byte_is_cut_off_and_counted() {
    let (_d, s) = short_deadline_server();
    let mut c = connect(&s);
    let head = b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Pad: ";
    c.write_all(head).unwrap();
    // One byte at a time, never finishing the head: the deadline is for the whole head, so
    // the server closes the connection although bytes keep arriving.
    let mut closed = false;
    for _ in 0..600 {
        if c.write_all(b"a").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let r = c.read(&mut buf);
        c.set_nonblocking(false).unwrap();
        if matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a slowloris head kept its connection");
    // A connection that sends nothing at all is closed too.
    let mut idle = connect(&s);
    assert!(read_until_closed(&mut idle).is_empty());
    assert!(
        metric_reaches(
            &s,
            "kvindex_http_read_timeouts_total{stage=\"headers\"}",
            2.0
        ),
        "{}",
        s.get("/metrics").text()
    );
    alive(&s);
}

#[test]
fn a_body_slower_than_announced_gets_an_error_and_is_counted() {
    let (_d, s) = short_deadline_server();
    for path in ["/query", "/register", "/events"] {
        let mut c = connect(&s);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{{\"model_name\""
        );
        c.write_all(head.as_bytes()).unwrap();
        let reply = String::from_utf8_lossy(&read_until_closed(&mut c)).into_owned();
        assert!(reply.starts_with("HTTP/1.1 400"), "{path}: {reply}");
        assert!(
            reply.contains("request body not received within 300 ms"),
            "{path}: {reply}"
        );
    }
    assert!(s.metric("kvindex_http_read_timeouts_total{stage=\"body\"}") >= 3.0);
    assert!(
        s.metric("dynamo_kvindexer_errors_total{endpoint=\"/query\",status_class=\"4xx\"}") >= 1.0
    );
    alive(&s);
}

#[test]
fn garbage_instead_of_http_gets_400_and_is_counted() {
    let (_d, s) = server();
    for garbage in [
        &b"\x00\x01\x02\x03 garbage \xff\xfe\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"POST /query HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    ] {
        let mut c = connect(&s);
        c.write_all(garbage).unwrap();
        let reply = String::from_utf8_lossy(&read_until_closed(&mut c)).into_owned();
        assert!(
            reply.starts_with("HTTP/1.1 400"),
            "{:?}: {reply}",
            String::from_utf8_lossy(garbage)
        );
    }
    // A head larger than hyper's buffer: refused, not buffered without bound.
    let mut c = connect(&s);
    let _ = c.write_all(b"GET /health HTTP/1.1\r\nX-Big: ");
    let _ = c.write_all(&vec![b'a'; 1 << 20]);
    let reply = String::from_utf8_lossy(&read_until_closed(&mut c)).into_owned();
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    assert!(
        metric_reaches(&s, "kvindex_http_malformed_requests_total", 4.0),
        "{}",
        s.get("/metrics").text()
    );
    alive(&s);
}

#[test]
fn connections_beyond_the_cap_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-max-connections", "2"],
        &[],
    );
    // Two idle connections take both slots (accepted in order, before the third).
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&s)).collect();
    let mut third = connect(&s);
    let _ = third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        read_until_closed(&mut third).is_empty(),
        "the connection over the cap was served"
    );
    drop(held);
    // The slots come back once the server sees the idle connections go.
    let mut refused = 0.0;
    for _ in 0..600 {
        if let Ok(mut c) = TcpStream::connect(&s.addr) {
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let req = "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
            if c.write_all(req.as_bytes()).is_ok() {
                let text = String::from_utf8_lossy(&read_until_closed(&mut c)).into_owned();
                if let Some(v) = text.lines().find_map(|l| {
                    l.strip_prefix("kvindex_http_connections_refused_total ")
                        .and_then(|v| v.trim().parse::<f64>().ok())
                }) {
                    refused = v;
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(refused >= 1.0, "refused connections not counted");
    alive(&s);
}

#[test]
fn sigterm_with_a_half_sent_request_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-read-timeout-ms", "2000"],
        &[],
    );
    let mut c = connect(&s);
    c.write_all(b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    let mut half_head = connect(&s);
    half_head.write_all(b"GET /health HTTP/1.1\r\nHo").unwrap();
    let (status, log) = s.terminate();
    assert_eq!(status.code(), Some(0), "{}", log.join("\n"));
}

#[test]
fn bad_http_limits_exit_1_with_a_message() {
    for (flag, value) in [
        ("--http-read-timeout-ms", "0"),
        ("--http-max-connections", "0"),
        ("--http-dump-timeout-s", "0"),
    ] {
        let (code, _, err) = run(&["serve", flag, value], &[]);
        assert_eq!(code, 1, "{flag} {value}");
        assert!(err.contains(flag), "{err}");
    }
}

/// Close `c` with a TCP reset (SO_LINGER 0) instead of an orderly FIN.
fn reset(c: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt SO_LINGER");
    drop(c);
}

/// Open connections on `s`, not counting the scrape that asks.
fn open_connections(s: &Server) -> f64 {
    s.metric("kvindex_http_connections_open") - 1.0
}

/// Poll (bounded) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

/// A connection `s` serves, with `sent` written: returned once the server has it open.
fn served_connection(s: &Server, sent: &[u8]) -> TcpStream {
    wait_for("no other connection open", || open_connections(s) == 0.0);
    let mut c = connect(s);
    c.write_all(sent).unwrap();
    wait_for("the connection served", || open_connections(s) >= 1.0);
    c
}

#[test]
fn connections_the_client_breaks_mid_request_are_logged_and_counted() {
    let (_d, s) = server();
    // Half a request head, then an orderly close.
    let c = served_connection(&s, b"POST /query HTTP/1.1\r\nHost: x\r\nContent-");
    drop(c);
    wait_for("the incomplete request counted", || {
        s.metric("kvindex_http_connection_errors_total{reason=\"incomplete_request\"}") == 1.0
    });
    // A head and half the announced body, then a reset.
    let c = served_connection(
        &s,
        b"POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model",
    );
    reset(c);
    wait_for("the reset counted", || {
        s.metric("kvindex_http_connection_errors_total{reason=\"io\"}") == 1.0
    });
    let log = s.stderr();
    assert!(log.contains("HTTP connection ended with an error"), "{log}");
    assert!(log.contains("reason=\"incomplete_request\""), "{log}");
    assert!(log.contains("peer=127.0.0.1:"), "{log}");
    alive(&s);
}

/// Connections that send a request head declaring an 8 MiB `/events` body and then (almost)
/// nothing used to claim that much of the events body budget before any byte arrived: four of
/// them (32 MiB) made every other `POST /events` wait for the read deadline, and fail. Bytes
/// are claimed as they arrive now, so they hold only what they sent (one byte each here). The
/// server's read deadline is ten minutes here, far beyond the client's 60 s: the old behaviour
/// makes the request fail.
#[test]
fn heads_declaring_large_bodies_without_sending_them_do_not_starve_post_events() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-read-timeout-ms", "600000"],
        &[],
    );
    register(&s, 1, "m", 4);
    // Each head followed by one byte of its body: once the four bytes are claimed, the four
    // requests are in their handlers (a build claiming declared lengths up front would hold
    // the whole budget by then).
    let heads: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect(&s);
            c.write_all(
                b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8388608\r\n\r\n[",
            )
            .unwrap();
            c
        })
        .collect();
    wait_for("one byte of each body claimed", || {
        s.metric("kvindex_http_events_body_bytes_in_flight") == 4.0
    });
    let r = s.post_raw_json(
        "/events",
        br#"[{"worker_id":1,"event":{"event_id":1,"data":"cleared"}}]"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["accepted"], 1);
    // The small request gave its bytes back; the four heads still hold one byte each.
    assert_eq!(s.metric("kvindex_http_events_body_bytes_in_flight"), 4.0);
    drop(heads);
    alive(&s);
}

/// Store about 180,000 blocks (a `/dump` of about 15 MiB, more than the socket buffers of a
/// connection on loopback hold) for worker 1 of partition `m`.
fn fill_for_a_large_dump(s: &Server) {
    register(s, 1, "m", 4);
    let mut id = 0u64;
    for _ in 0..2 {
        let events: Vec<serde_json::Value> = (0..90)
            .map(|_| {
                let blocks: Vec<(u64, u64)> = (0..1000)
                    .map(|_| {
                        id += 1;
                        (
                            1_000_000_000_000_000_000 + id,
                            12_000_000_000_000_000_000 + id,
                        )
                    })
                    .collect();
                stored(1, 0, id, None, &blocks)
            })
            .collect();
        let r = s.post_json("/events", &json!(events));
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// A `GET /dump` sent on a fresh connection whose response is never read.
fn unread_dump(s: &Server) -> TcpStream {
    let mut c = connect(s);
    c.write_all(b"GET /dump HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c
}

/// A dump used to be built whole and held until the client had read it: 40 clients asking for
/// one and never reading held about 1.1 GB. At most `--http-max-dumps` are built or sent at
/// once; beyond that `/dump` waits up to 5 s for a slot, then answers 503 (a recovering Dynamo
/// peer moves on to its next peer), counted; a slot is free again once its dump is gone.
#[test]
fn dumps_beyond_the_limit_are_refused_while_clients_hold_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-max-dumps", "1", "--fsync", "never"],
        &[],
    );
    fill_for_a_large_dump(&s);
    let held = unread_dump(&s);
    wait_for("the unread dump in progress", || {
        s.metric("kvindex_http_dumps_in_progress") == 1.0
    });
    let r = s.get("/dump");
    assert_eq!(r.status, 503, "{}", &r.text()[..r.text().len().min(200)]);
    assert_eq!(r.header("retry-after"), Some("1"));
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("--http-max-dumps"), "{error}");
    assert_eq!(s.metric("kvindex_http_dumps_refused_total"), 1.0);
    // The client goes away: its connection fails, its dump is dropped, the slot is free.
    reset(held);
    wait_for("the slot given back", || {
        s.metric("kvindex_http_dumps_in_progress") == 0.0
    });
    let r = s.get("/dump");
    assert_eq!(r.status, 200);
    let events = r.json()["m:default"]["events"].as_array().map(Vec::len);
    assert_eq!(events, Some(180));
    alive(&s);
}

/// A client that stops reading its response is disconnected once a write has made no
/// progress for `--http-write-timeout-ms`, and counted: its response (here a dump of about
/// 15 MiB, streamed) is not held beyond that.
#[test]
fn a_client_that_does_not_read_its_response_is_cut_off_at_the_write_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-write-timeout-ms", "500", "--fsync", "never"],
        &[],
    );
    fill_for_a_large_dump(&s);
    let mut c = unread_dump(&s);
    wait_for("the write timeout counted", || {
        s.metric("kvindex_http_write_timeouts_total") == 1.0
    });
    wait_for("the dump dropped", || {
        s.metric("kvindex_http_dumps_in_progress") == 0.0
    });
    // What the client reads now is what the socket buffers held: a cut response.
    assert_cut_dump(&read_until_closed(&mut c));
    assert!(s
        .stderr()
        .contains("the client did not read the response in time"));
    alive(&s);
}

/// `got` is a streamed response that was cut: a `200` with a chunked body that never got its
/// last chunk.
fn assert_cut_response(got: &[u8]) {
    let text = String::from_utf8_lossy(got);
    let head = &text[..text.len().min(300)];
    assert!(text.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        text.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(!got.ends_with(b"\r\n0\r\n\r\n"), "the whole body was sent");
}

/// `got` is the start of a `/dump` of [`fill_for_a_large_dump`] that was cut.
fn assert_cut_dump(got: &[u8]) {
    assert_cut_response(got);
    let text = String::from_utf8_lossy(got);
    assert!(
        text.contains("{\"m:default\":{\"block_size\":4,\"events\":["),
        "{}",
        &text[..text.len().min(300)]
    );
}

/// Read from `c` until `n` bytes arrived, or (with `n` 0) until a response head has.
fn read_at_least(c: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < n || (n == 0 && !out.windows(4).any(|w| w == b"\r\n\r\n")) {
        match c.read(&mut buf) {
            Ok(0) => panic!("closed after {} bytes", out.len()),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) => panic!("after {} bytes: {e}", out.len()),
        }
    }
    out
}

/// A dump is streamed: the client gets its first partition's bytes while the rest is still
/// to be sent, and the dump keeps its slot until it has been sent or its client has gone. A
/// client leaving mid-stream frees the slot; beyond the limit `/dump` is refused at once with
/// `--http-dump-wait-ms 0`.
#[test]
fn a_streamed_dump_keeps_its_slot_until_its_client_leaves_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &[
            "--http-max-dumps",
            "1",
            "--http-dump-wait-ms",
            "0",
            "--fsync",
            "never",
        ],
        &[],
    );
    fill_for_a_large_dump(&s);
    let mut c = unread_dump(&s);
    let got = read_at_least(&mut c, 256 << 10);
    assert_cut_dump(&got);
    assert_eq!(s.metric("kvindex_http_dumps_in_progress"), 1.0);
    let r = s.get("/dump");
    assert_eq!(r.status, 503, "{}", &r.text()[..r.text().len().min(200)]);
    assert_eq!(s.metric("kvindex_http_dumps_refused_total"), 1.0);
    reset(c);
    wait_for("the slot given back", || {
        s.metric("kvindex_http_dumps_in_progress") == 0.0
    });
    let r = s.get("/dump");
    assert_eq!(r.status, 200);
    let events = r.json()["m:default"]["events"].as_array().map(Vec::len);
    assert_eq!(events, Some(180));
    assert_eq!(s.metric("kvindex_http_dump_timeouts_total"), 0.0);
    alive(&s);
}

/// A client that keeps reading its dump, too slowly to finish it, never trips the write
/// deadline (it makes progress) and used to keep a dump slot as long as it liked. The dump's
/// own deadline (`--http-dump-timeout-s`, 1 s here) cuts it off: the connection is closed, the
/// slot freed, the cut counted and logged. (The write deadline here is ten minutes: only the
/// dump's deadline can end it.)
#[test]
fn a_dump_not_sent_within_its_deadline_is_cut_off_and_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &[
            "--http-max-dumps",
            "1",
            "--http-dump-timeout-s",
            "1",
            "--http-write-timeout-ms",
            "600000",
            "--fsync",
            "never",
        ],
        &[],
    );
    fill_for_a_large_dump(&s);
    let mut c = unread_dump(&s);
    // The client reads the head of its dump (sent before any partition is built), then (from
    // the server's side) is slow.
    let mut got = read_at_least(&mut c, 0);
    wait_for("the dump cut off", || {
        s.metric("kvindex_http_dump_timeouts_total") == 1.0
    });
    wait_for("the slot given back", || {
        s.metric("kvindex_http_dumps_in_progress") == 0.0
    });
    got.extend(read_until_closed(&mut c));
    assert_cut_response(&got);
    assert_eq!(s.metric("kvindex_http_write_timeouts_total"), 0.0);
    assert!(s
        .stderr()
        .contains("GET /dump cut off: not sent within --http-dump-timeout-s"));
    alive(&s);
}

/// A server whose dump builds tests can hold (`/test/hold_dumps`), with `--http-max-dumps 1`.
fn held_dumps_server() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--http-max-dumps", "1"],
        &[("DYN_KV_INDEXER_TEST_ENDPOINTS", "1")],
    );
    register(&s, 1, "m", 4);
    (dir, s)
}

fn hold_dumps(s: &Server, hold: bool) {
    let route = if hold {
        "/test/hold_dumps"
    } else {
        "/test/release_dumps"
    };
    assert_eq!(s.post_raw_json(route, b"").status, 200);
}

/// A client that asks for a dump and resets its connection while the dump is being built
/// used to give its slot back at once, while the build went on: a loop of "GET /dump, close"
/// started builds without bound. The slot now lasts as long as the build (and then as long as
/// the dump is sent): the limit holds until the build ends.
#[test]
fn a_dump_whose_client_left_during_the_build_keeps_its_slot_until_the_build_ends() {
    let (_d, s) = held_dumps_server();
    hold_dumps(&s, true);
    let c = served_connection(&s, b"GET /dump HTTP/1.1\r\nHost: x\r\n\r\n");
    wait_for("the dump in progress", || {
        s.metric("kvindex_http_dumps_in_progress") == 1.0
    });
    reset(c);
    // The connection is gone, and hyper has dropped its handler with it.
    wait_for("the connection closed", || open_connections(&s) == 0.0);
    assert_eq!(s.metric("kvindex_http_dumps_in_progress"), 1.0);
    let r = s.get("/dump");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(s.metric("kvindex_http_dumps_in_progress"), 1.0);
    hold_dumps(&s, false);
    wait_for("the build ended", || {
        s.metric("kvindex_http_dumps_in_progress") == 0.0
    });
    let r = s.get("/dump");
    assert_eq!(r.status, 200, "{}", r.text());
    alive(&s);
}

/// A `/dump` beyond `--http-max-dumps` waits for a slot (a few seconds, below a recovering
/// peer's 10 s) instead of being refused at once: replicas that start together and ask the same
/// peer all get a dump. Here the second request is waiting when the first build is let go.
#[test]
fn a_dump_beyond_the_limit_waits_for_a_slot_freed_in_time() {
    let (_d, s) = held_dumps_server();
    hold_dumps(&s, true);
    let request = b"GET /dump HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut first = connect(&s);
    first.write_all(request).unwrap();
    wait_for("the first dump in progress", || {
        s.metric("kvindex_http_dumps_in_progress") == 1.0
    });
    let mut second = connect(&s);
    second.write_all(request).unwrap();
    wait_for("the second dump waiting for a slot", || {
        s.metric("kvindex_http_dumps_waiting") == 1.0
    });
    hold_dumps(&s, false);
    for (which, c) in [("first", &mut first), ("second", &mut second)] {
        let reply = String::from_utf8_lossy(&read_until_closed(c)).into_owned();
        assert!(reply.starts_with("HTTP/1.1 200"), "{which}: {reply}");
        assert!(reply.contains("\"m:default\""), "{which}: {reply}");
    }
    assert_eq!(s.metric("kvindex_http_dumps_refused_total"), 0.0);
    assert_eq!(s.metric("kvindex_http_dumps_waiting"), 0.0);
    alive(&s);
}

/// A request whose body deadline passes while it waits for the body budget (the server busy
/// reading other bodies) used to get axum's `400 Failed to buffer the request body`, counted as
/// a client read timeout: overload looked like a client error, which routers do not retry on
/// `/query`. It is a `503` with `Retry-After` now, counted under `stage="budget"`.
#[test]
fn a_body_deadline_passing_while_waiting_for_the_budget_is_a_503() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &[
            "--http-read-timeout-ms",
            "3000",
            "--http-query-inflight-mib",
            "1",
        ],
        &[],
    );
    register(&s, 1, "m", 4);
    let head = |length: usize| {
        format!(
            "POST /query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    };
    // The waiting request: its first 1,000 bytes claimed, so its body deadline runs from
    // before the holder's head arrives (the holder times out after it).
    let mut waiting = served_connection(&s, head(MIB).as_bytes());
    waiting.write_all(&[b' '; 1000]).unwrap();
    wait_for("the waiting request's first bytes claimed", || {
        s.metric("kvindex_http_query_body_bytes_in_flight") == 1000.0
    });
    // The holder: all but one byte of its body, claimed (the budget is full but one byte, and
    // both requests can still finish, the holder first), and then nothing more.
    let length = MIB - 1000;
    let mut holder = connect(&s);
    holder.write_all(head(length).as_bytes()).unwrap();
    holder.write_all(&vec![b' '; length - 1]).unwrap();
    wait_for("the holder's bytes claimed", || {
        s.metric("kvindex_http_query_body_bytes_in_flight") == (MIB - 1) as f64
    });
    // The waiting request's next bytes do not fit: it waits, until its deadline.
    waiting.write_all(&[b' '; 1000]).unwrap();
    let reply = String::from_utf8_lossy(&read_until_closed(&mut waiting)).into_owned();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("retry-after: 1"),
        "{reply}"
    );
    assert!(reply.contains("--http-query-inflight-mib"), "{reply}");
    assert!(metric_reaches(
        &s,
        "kvindex_http_read_timeouts_total{stage=\"budget\"}",
        1.0
    ));
    assert_eq!(s.metric("kvindex_http_query_body_budget_waits_total"), 1.0);
    drop(holder);
    alive(&s);
}
