//! `/dump` and `--peers` recovery against the real Dynamo 1.6.1 standalone indexer
//! (`python -m dynamo.indexer`, SERVICE.md §3.8, §9, §15.19–20), in both directions.
//!
//! * `a_recorded_dynamo_dump_loads_with_dynamos_answers` always runs: it serves the `/dump`
//!   recorded from a real Dynamo (`tests/fixtures/dynamo_dump_zmq.json`, see the README there)
//!   from an in-test HTTP server, starts kvindex with `--peers` pointing at it, and checks
//!   every recorded Dynamo `/query` answer.
//! * The `live_*` tests run only when `KVINDEX_DYNAMO_PYTHON` names a python with
//!   `ai-dynamo-runtime==1.6.1` installed; otherwise they print that they are skipped.
//!   `live_dynamo_state_recovers_into_kvindex` feeds Dynamo over ZMQ with our vLLM-protocol
//!   publisher, then starts kvindex `--peers` Dynamo; `live_kvindex_state_recovers_into_dynamo`
//!   does the reverse. With `KVINDEX_DYNAMO_FIXTURE_OUT=PATH` the first one also (re)writes the
//!   fixture.
//!
//! Dynamo runs with `--threads 1`. With its default thread pool (`--threads 4`), Dynamo 1.6.1
//! loads the same dump differently from run to run when two workers hold the same prefix under
//! different external block hashes: in 3 of 6 runs a worker lost every block below the shared
//! prefix (its children name a parent hash the shared node no longer carries). With one thread,
//! or with equal external hashes, 6 of 6 (8 of 8) runs were right. See docs/operations.md.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{local_hashes, runtime, start, stored, Server};
use kvindex_server::zmq::test_publisher::{
    PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
};
use serde_json::{json, Value};

const DYNAMO_PYTHON_ENV: &str = "KVINDEX_DYNAMO_PYTHON";
/// Dynamo's indexer threads in the live tests (see the module docs).
const DYNAMO_THREADS: &str = "1";
const FIXTURE_OUT_ENV: &str = "KVINDEX_DYNAMO_FIXTURE_OUT";
const DEADLINE: Duration = Duration::from_secs(60);

// --- the scenario: partitions, token chains, queries ------------------------------------------

/// Partition `m:default`, 4-token blocks.
const BS: u32 = 4;
/// Partition `m2:g1`, 8-token blocks.
const BS2: u32 = 8;

fn seq(from: u32, n: u32) -> Vec<u32> {
    (from..from + n).collect()
}

fn chain_a() -> Vec<u32> {
    seq(1, 12)
}
fn branch_a() -> Vec<u32> {
    [seq(1, 8), seq(91, 8)].concat()
}
fn chain_b() -> Vec<u32> {
    seq(201, 8)
}
fn chain_c() -> Vec<u32> {
    seq(301, 4)
}
fn chain_d() -> Vec<u32> {
    seq(401, 4)
}
fn chain_e() -> Vec<u32> {
    seq(501, 16)
}
fn branch_e() -> Vec<u32> {
    [seq(501, 8), seq(601, 8)].concat()
}

/// `/query` bodies whose answers are compared.
fn queries() -> Vec<Value> {
    let m = |t: Vec<u32>| json!({"token_ids": t, "model_name": "m"});
    let m2 = |t: Vec<u32>| json!({"token_ids": t, "model_name": "m2", "routing_group": "g1"});
    vec![
        m(chain_a()),
        m(chain_a()[..8].to_vec()),
        m(branch_a()),
        m(chain_b()),
        m(chain_b()[..4].to_vec()),
        m(chain_c()),
        m(chain_d()),
        m(vec![1, 2, 3, 4]),
        m([chain_a(), seq(13, 4)].concat()),
        m(vec![9, 9, 9, 9]),
        m2(chain_e()),
        m2(branch_e()),
        m2(chain_e()[..8].to_vec()),
        m2(vec![9; 8]),
    ]
}

// --- processes --------------------------------------------------------------------------------

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A running `python -m dynamo.indexer`.
struct Dynamo {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Dynamo {
    fn start(python: &str, extra: &[&str]) -> Dynamo {
        let port = free_port();
        let mut child = Command::new(python)
            .args(["-m", "dynamo.indexer", "--port", &port.to_string()])
            .args(["--threads", DYNAMO_THREADS])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python} -m dynamo.indexer: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let d = Dynamo {
            child,
            base: format!("127.0.0.1:{port}"),
            log,
        };
        let start = Instant::now();
        while !d
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("HTTP server listening"))
        {
            assert!(
                start.elapsed() < DEADLINE,
                "dynamo did not start:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// An HTTP client to this Dynamo.
    fn http(&self) -> HttpPeer {
        HttpPeer {
            addr: self.base.clone(),
        }
    }
}

impl Drop for Dynamo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP client to a peer that is not a kvindex [`Server`].
struct HttpPeer {
    addr: String,
}

impl HttpPeer {
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut s = std::net::TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn query(&self, q: &Value) -> Value {
        let (status, v) = self.request("POST", "/query", Some(q));
        assert_eq!(status, 200, "{q} -> {v}");
        v
    }
}

fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = raw.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        raw = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// kvindex's `/query` answer without its own `log_lsn` field (Dynamo has none).
fn kvindex_query(s: &Server, q: &Value) -> Value {
    let r = s.post_json("/query", q);
    assert_eq!(r.status, 200, "{q} -> {}", r.text());
    let mut v = r.json();
    if let Some(o) = v.as_object_mut() {
        o.remove("log_lsn");
    }
    v
}

/// Serve `body` as `GET /dump` on a loopback port until the test ends; returns the base URL.
fn serve_dump(body: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            // Drain the headers.
            let mut h = String::new();
            while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
                h.clear();
            }
            let (status, payload) = if line.starts_with("GET /dump ") {
                ("200 OK", body.as_str())
            } else {
                ("404 Not Found", "{}")
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                payload.len()
            );
        }
    });
    url
}

fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dynamo_dump_zmq.json")
}

// --- the always-running test ------------------------------------------------------------------

#[test]
fn a_recorded_dynamo_dump_loads_with_dynamos_answers() {
    let text = std::fs::read_to_string(fixture_path()).expect("fixture");
    let fixture: Value = serde_json::from_str(&text).expect("fixture JSON");
    let dump = fixture["dump"].clone();
    assert!(
        dump.as_object().is_some_and(|o| o.len() == 2),
        "two partitions in the fixture: {dump}"
    );
    let peer = serve_dump(dump.to_string());
    let tmp = tempfile::tempdir().unwrap();
    let s = start(&tmp.path().join("d"), &["--peers", &peer], &[]);
    assert!(s.stderr().contains("recovered from peer"), "{}", s.stderr());
    let cases = fixture["queries"].as_array().expect("queries");
    assert!(cases.len() >= 10);
    let mut non_empty = 0;
    for case in cases {
        let expected = &case["dynamo_response"];
        if expected["scores"]
            .as_object()
            .is_some_and(|o| !o.is_empty())
        {
            non_empty += 1;
        }
        assert_eq!(
            &kvindex_query(&s, &case["request"]),
            expected,
            "query {}",
            case["request"]
        );
    }
    assert!(non_empty >= 8, "the fixture must exercise real matches");
    // And kvindex's own dump of what it loaded is loadable again (round trip, same answers).
    let again = serve_dump(s.get("/dump").text());
    let tmp2 = tempfile::tempdir().unwrap();
    let s2 = start(&tmp2.path().join("d"), &["--peers", &again], &[]);
    for case in cases {
        assert_eq!(
            &kvindex_query(&s2, &case["request"]),
            &case["dynamo_response"]
        );
    }
}

// --- live tests against a real Dynamo ----------------------------------------------------------

fn dynamo_python() -> Option<String> {
    match std::env::var(DYNAMO_PYTHON_ENV) {
        Ok(p) if !p.trim().is_empty() => Some(p),
        _ => {
            eprintln!(
                "SKIPPED: live Dynamo interop test: set {DYNAMO_PYTHON_ENV} to a python with \
                 ai-dynamo-runtime==1.6.1 (python3 -m venv /tmp/dynvenv && \
                 /tmp/dynvenv/bin/pip install ai-dynamo-runtime==1.6.1) to run it"
            );
            None
        }
    }
}

/// One engine stream: a publisher registered in Dynamo as `(instance, dp_rank)`.
struct Stream {
    p: VllmPublisher,
    instance: u64,
    dp: u32,
    model: &'static str,
    group: &'static str,
    bs: u32,
}

fn store(hashes: &[u64], parent: Option<u64>, tokens: &[u32], bs: u32) -> PublishBatch {
    PublishBatch::new(vec![PublishEvent::stored(
        hashes.to_vec(),
        parent,
        tokens.to_vec(),
        bs,
    )])
}

/// Publish `batch` to `s` until `visible` holds in Dynamo (the first batches may fall into
/// ZMQ's slow-joiner window; a store is idempotent).
fn publish_until(
    rt: &tokio::runtime::Runtime,
    s: &Stream,
    batch: &PublishBatch,
    mut visible: impl FnMut() -> bool,
    dynamo: &Dynamo,
) {
    let start = Instant::now();
    loop {
        rt.block_on(s.p.publish(batch)).expect("publish");
        for _ in 0..10 {
            if visible() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            start.elapsed() < DEADLINE,
            "dynamo never showed the batch:\n{}",
            dynamo.log()
        );
    }
}

#[test]
fn live_dynamo_state_recovers_into_kvindex() {
    let Some(python) = dynamo_python() else {
        return;
    };
    let rt = runtime();
    let dynamo = Dynamo::start(&python, &[]);
    let api = dynamo.http();
    let bind = || {
        rt.block_on(VllmPublisher::bind(PublisherConfig::loopback()))
            .expect("bind")
    };
    let streams = [
        (1, 0, "m", "default", BS),
        (2, 0, "m", "default", BS),
        (2, 1, "m", "default", BS),
        (3, 0, "m2", "g1", BS2),
    ]
    .map(|(instance, dp, model, group, bs)| Stream {
        p: bind(),
        instance,
        dp,
        model,
        group,
        bs,
    });
    for s in &streams {
        let (status, body) = api.request(
            "POST",
            "/register",
            Some(&json!({"instance_id": s.instance, "dp_rank": s.dp,
                "endpoint": s.p.endpoint(), "replay_endpoint": s.p.replay_endpoint(),
                "model_name": s.model, "routing_group": s.group, "block_size": s.bs})),
        );
        assert_eq!(status, 201, "{body}");
    }
    // A marker per stream, published until Dynamo shows it: the SUB socket is connected.
    let marker = |i: u32| seq(9000 + 100 * i, 8);
    let shows = |s: &Stream, tokens: &[u32]| {
        let q = json!({"token_ids": tokens, "model_name": s.model, "routing_group": s.group});
        api.query(&q)["scores"][s.instance.to_string()][s.dp.to_string()] == json!(tokens.len())
    };
    // Stream `i` gets marker `first_marker + i`, its engine hashes from `hash_base + 100 * i`.
    let mark_every_stream = |first_marker: u32, hash_base: u64| {
        for (i, s) in streams.iter().enumerate() {
            let m = marker(first_marker + i as u32);
            let hashes: Vec<u64> = (0..8 / s.bs as u64)
                .map(|k| hash_base + 100 * i as u64 + k)
                .collect();
            publish_until(
                &rt,
                s,
                &store(&hashes, None, &m, s.bs),
                || shows(s, &m),
                &dynamo,
            );
        }
    };
    mark_every_stream(0, 90_000);
    // The scenario.
    let publish = |s: &Stream, b: PublishBatch| {
        rt.block_on(s.p.publish(&b)).expect("publish");
    };
    let [s1, s2, s3, s4] = &streams;
    publish(s1, store(&[1001, 1002, 1003], None, &chain_a(), BS));
    publish(s1, store(&[1101, 1102], Some(1002), &branch_a()[8..], BS));
    publish(s1, store(&[1301], None, &chain_d(), BS));
    publish(
        s1,
        PublishBatch::new(vec![PublishEvent::removed(vec![1301])]),
    );
    publish(s2, store(&[2001, 2002], None, &chain_a()[..8], BS));
    publish(s2, store(&[2101, 2102], None, &chain_b(), BS));
    publish(
        s2,
        PublishBatch::new(vec![PublishEvent::removed(vec![2102])]),
    );
    publish(s3, store(&[3101, 3102], None, &chain_b(), BS));
    publish(s3, PublishBatch::new(vec![PublishEvent::Cleared]));
    publish(s3, store(&[3201], None, &chain_c(), BS));
    publish(s4, store(&[4001, 4002], None, &chain_e(), BS2));
    publish(s4, store(&[4101], Some(4001), &branch_e()[8..], BS2));
    // A final marker per stream: everything before it on the same socket has been applied.
    mark_every_stream(10, 95_000);
    let (status, dump) = api.request("GET", "/dump", None);
    assert_eq!(status, 200);
    let answers: Vec<(Value, Value)> = queries()
        .into_iter()
        .map(|q| (q.clone(), api.query(&q)))
        .collect();

    // kvindex recovers from the live Dynamo.
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://{}", dynamo.base);
    let s = start(&tmp.path().join("d"), &["--peers", &url], &[]);
    assert!(s.stderr().contains("recovered from peer"), "{}", s.stderr());
    for (q, expected) in &answers {
        assert_eq!(&kvindex_query(&s, q), expected, "query {q}");
    }
    // The scenario is not trivial: Dynamo's answers include partial and multi-worker matches.
    // (Checked as properties, not as one exact answer: on a loaded machine Dynamo 1.6.1 was
    // once seen without the branch off block 1002, answering 8 instead of 16 for worker 1 on
    // `branch_a`; kvindex still matched whatever Dynamo answered, which is what this test is for.)
    let scored = |a: &Value| -> Vec<u64> {
        a["scores"]
            .as_object()
            .map(|w| {
                w.values()
                    .flat_map(|d| d.as_object().into_iter().flat_map(|m| m.values()))
                    .filter_map(Value::as_u64)
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(
        answers.iter().any(|(_, a)| scored(a).len() >= 2),
        "no multi-worker answer: {answers:?}"
    );
    assert!(
        answers.iter().any(|(q, a)| {
            let len = q["token_ids"].as_array().map_or(0, |t| t.len() as u64);
            scored(a).iter().any(|&s| s > 0 && s < len)
        }),
        "no partial answer: {answers:?}"
    );
    if answers[2].1["scores"] != json!({"1": {"0": 16}, "2": {"0": 8}}) {
        eprintln!(
            "note: Dynamo answered {} for branch_a (expected worker 1 at 16)",
            answers[2].1["scores"]
        );
    }

    if let Ok(out) = std::env::var(FIXTURE_OUT_ENV) {
        let fixture = json!({
            "generated_by": "server/tests/dynamo_interop.rs live_dynamo_state_recovers_into_kvindex",
            "dynamo": "ai-dynamo-runtime 1.6.1, python -m dynamo.indexer",
            "dump": dump,
            "queries": answers.iter().map(|(q, a)| json!({"request": q, "dynamo_response": a})).collect::<Vec<_>>(),
        });
        std::fs::write(&out, serde_json::to_string_pretty(&fixture).unwrap() + "\n")
            .expect("write the fixture");
        eprintln!("wrote {out}");
    }
}

#[test]
fn live_kvindex_state_recovers_into_dynamo() {
    let Some(python) = dynamo_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let s = start(&tmp.path().join("d"), &[], &[]);
    let reg = |instance: u64, dp: u32, model: &str, group: &str, bs: u32| {
        let r = s.post_json(
            "/register",
            &json!({"instance_id": instance, "dp_rank": dp, "endpoint": "tcp://127.0.0.1:1",
                "model_name": model, "routing_group": group, "block_size": bs}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
    };
    reg(1, 0, "m", "default", BS);
    reg(2, 0, "m", "default", BS);
    reg(2, 1, "m", "default", BS);
    reg(3, 0, "m2", "g1", BS2);
    let h = |t: &[u32], bs: u32| local_hashes(t, bs as usize);
    let pairs = |hashes: &[u64], t: &[u32], bs: u32| -> Vec<(u64, u64)> {
        hashes.iter().copied().zip(h(t, bs)).collect()
    };
    let post = |model: &str, group: &str, ev: Value| {
        let path = format!("/events?model_name={model}&routing_group={group}");
        let r = s.post_json(&path, &ev);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["accepted"], 1, "{}", r.text());
    };
    let removed = |w: u64, dp: u32, id: u64, hs: &[u64]| common::removed(w, dp, id, hs);
    post(
        "m",
        "default",
        stored(1, 0, 1, None, &pairs(&[1001, 1002, 1003], &chain_a(), BS)),
    );
    post(
        "m",
        "default",
        stored(
            1,
            0,
            2,
            Some(1002),
            &pairs(&[1101, 1102], &branch_a()[8..], BS),
        ),
    );
    post(
        "m",
        "default",
        stored(1, 0, 3, None, &pairs(&[1301], &chain_d(), BS)),
    );
    post("m", "default", removed(1, 0, 4, &[1301]));
    post(
        "m",
        "default",
        stored(2, 0, 1, None, &pairs(&[2001, 2002], &chain_a()[..8], BS)),
    );
    post(
        "m",
        "default",
        stored(2, 0, 2, None, &pairs(&[2101, 2102], &chain_b(), BS)),
    );
    post("m", "default", removed(2, 0, 3, &[2102]));
    post(
        "m",
        "default",
        stored(2, 1, 1, None, &pairs(&[3201], &chain_c(), BS)),
    );
    post(
        "m2",
        "g1",
        stored(3, 0, 1, None, &pairs(&[4001, 4002], &chain_e(), BS2)),
    );
    post(
        "m2",
        "g1",
        stored(3, 0, 2, Some(4001), &pairs(&[4101], &branch_e()[8..], BS2)),
    );

    let dynamo = Dynamo::start(&python, &["--peers", &format!("http://{}", s.addr)]);
    assert!(
        dynamo.log().contains("recovery from peer succeeded"),
        "{}",
        dynamo.log()
    );
    let api = dynamo.http();
    let ours: Vec<(Value, Value)> = queries()
        .into_iter()
        .map(|q| (q.clone(), kvindex_query(&s, &q)))
        .collect();
    let non_empty = ours
        .iter()
        .filter(|(_, a)| a["scores"].as_object().is_some_and(|o| !o.is_empty()))
        .count();
    assert!(non_empty >= 8);
    // Dynamo hands the dump's events to its indexer threads and starts serving without waiting
    // for them (observed: a query right after start-up can miss the deepest blocks), so poll
    // until its answers settle.
    let start = Instant::now();
    loop {
        let mismatch = ours.iter().find_map(|(q, a)| {
            let theirs = api.query(q);
            (theirs != *a).then(|| (q.clone(), a.clone(), theirs))
        });
        match mismatch {
            None => break,
            Some((q, a, theirs)) if start.elapsed() > DEADLINE => {
                assert_eq!(
                    theirs,
                    a,
                    "query {q}\nkvindex /dump: {}\ndynamo /dump: {}\ndynamo log:\n{}",
                    s.get("/dump").text(),
                    api.request("GET", "/dump", None).1,
                    dynamo.log()
                )
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
