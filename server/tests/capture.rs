//! `kvindex capture` end to end: a vLLM-protocol publisher ([`VllmPublisher`]) on loopback, the
//! real binary capturing it into a directory, then `kvindex replay` and `kvindex serve` reading
//! that directory back. Every wait is a bounded poll on an observable condition.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, data_dir, dead_endpoint, run, runtime, start};
use kvindex_server::zmq::test_publisher::{
    PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
};
use serde_json::{json, Value};

const BS: u32 = 4;
const A: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const B: [u32; 8] = [11, 12, 13, 14, 15, 16, 17, 18];
const C: [u32; 4] = [21, 22, 23, 24];
const D: [u32; 4] = [31, 32, 33, 34];
const DEADLINE: Duration = Duration::from_secs(60);

fn publisher(rt: &tokio::runtime::Runtime, replay: bool) -> VllmPublisher {
    let cfg = if replay {
        PublisherConfig::loopback()
    } else {
        PublisherConfig::loopback_without_replay()
    };
    rt.block_on(VllmPublisher::bind(cfg)).expect("bind")
}

/// A store of `tokens` with engine hashes `base+1, base+2, ...`.
fn store(base: u64, tokens: &[u32]) -> PublishBatch {
    let n = tokens.len() as u64 / BS as u64;
    PublishBatch::new(vec![PublishEvent::stored(
        (1..=n).map(|i| base + i).collect(),
        None,
        tokens.to_vec(),
        BS,
    )])
}

/// A running `kvindex capture` with its stdout and stderr collected.
struct Capture {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn start(args: &[&str]) -> Capture {
        let mut child = Command::new(bin())
            .arg("capture")
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvindex capture");
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stdout);
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(out).read_to_string(&mut s);
            sink.lock().unwrap().push_str(&s);
        });
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Capture {
            child,
            stdout,
            stderr,
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Wait (bounded) for the exit; (exit code, the summary JSON).
    /// Wait for a clean exit (code 0) stopped by `stopped_by`; the summary.
    fn finish_cleanly(self, stopped_by: &str) -> Value {
        let (code, summary) = self.finish();
        assert_eq!(code, 0, "{summary}");
        assert_eq!(summary["stopped_by"], stopped_by, "{summary}");
        summary
    }

    fn finish(mut self) -> (i32, Value) {
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            if start.elapsed() > DEADLINE {
                let _ = self.child.kill();
                panic!("capture did not exit; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the reader threads drain.
        for _ in 0..100 {
            if !self.stdout.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = self.stdout.lock().unwrap().clone();
        let summary = serde_json::from_str(out.trim()).unwrap_or_else(|e| {
            panic!(
                "no summary on stdout ({e}): {out:?}; stderr:\n{}",
                self.stderr()
            )
        });
        (status.code().unwrap_or(-1), summary)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `kvindex replay state DIR --queries` for each token list; one `matches` array per query.
fn state_matches(dir: &Path, queries: &[&[u32]]) -> Vec<Value> {
    let qfile = dir.with_extension("queries.jsonl");
    let text: String = queries
        .iter()
        .map(|t| format!("{}\n", json!({"token_ids": t, "block_size": BS})))
        .collect();
    std::fs::write(&qfile, text).unwrap();
    let (code, out, err) = run(&["replay", "state", p(dir), "--queries", p(&qfile)], &[]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["matches"].clone())
        .collect()
}

/// Lines of `kvindex replay export DIR` (empty while nothing is logged yet).
fn exported(dir: &Path) -> Vec<Value> {
    let (code, out, _) = run(&["replay", "export", p(dir)], &[]);
    if code != 0 {
        return Vec::new();
    }
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn exported_block(dir: &Path, hash: u64) -> bool {
    exported(dir).iter().any(|e| {
        e["event"]["data"]["stored"]["blocks"]
            .as_array()
            .is_some_and(|bs| bs.iter().any(|b| b["block_hash"] == json!(hash)))
    })
}

/// Poll `cond` (bounded); every `nudge_every` without success, run `nudge`.
fn wait_for(
    what: &str,
    cap: &mut Capture,
    mut nudge: impl FnMut(),
    mut cond: impl FnMut() -> bool,
) {
    let start = Instant::now();
    let mut last = Instant::now();
    while start.elapsed() < DEADLINE {
        if cond() {
            return;
        }
        assert!(cap.running(), "capture exited early:\n{}", cap.stderr());
        if last.elapsed() > Duration::from_millis(300) {
            nudge();
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}; stderr:\n{}", cap.stderr());
}

fn one(worker: u64, blocks: u64) -> Value {
    json!([{"worker_id": worker, "dp_rank": 0, "blocks": blocks}])
}

#[test]
fn a_captured_stream_reads_back_with_replay_state_export_and_serve() {
    let rt = runtime();
    let publ = publisher(&rt, true);
    // Published before the capture starts: it catches up through the replay endpoint.
    rt.block_on(publ.publish(&store(100, &A))).unwrap();
    rt.block_on(publ.publish(&store(200, &B))).unwrap();
    rt.block_on(publ.publish(&PublishBatch::new(vec![PublishEvent::removed(vec![202])])))
        .unwrap();
    rt.block_on(publ.publish(&PublishBatch::new(Vec::new())))
        .unwrap();
    let (_tmp, dir) = data_dir();
    let cap = Capture::start(&[
        "--zmq",
        publ.endpoint(),
        "--replay-endpoint",
        publ.replay_endpoint().unwrap(),
        "--to",
        p(&dir),
        "--worker-id",
        "7",
        "--block-size",
        "4",
        "--model-name",
        "m",
        "--max-events",
        "3",
    ]);
    let summary = cap.finish_cleanly("max_events");
    assert_eq!(summary["events"], 3, "{summary}");
    assert_eq!(summary["records"], 3, "{summary}");
    assert_eq!(summary["listener"]["lost_batches"], 0, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["first_seq"], 0, "{summary}");
    assert_eq!(summary["last_lsn"], 3, "{summary}");

    // The log holds the three events of worker 7, in order.
    let events = exported(&dir);
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events.iter().all(|e| e["worker_id"] == 7));
    assert!(
        events[2]["event"]["data"]["removed"].is_object(),
        "{:?}",
        events[2]
    );
    // B lost its second block to the removal.
    assert_eq!(
        state_matches(&dir, &[&A, &B, &C]),
        vec![one(7, 2), one(7, 1), json!([])]
    );
    // `kvindex serve` adopts the captured partition and answers the same.
    let s = start(&dir, &[], &[]);
    let r = s.post_json("/query", &json!({"token_ids": A, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scores"], json!({"7": {"0": 8}}));
    let r = s.post_json("/query", &json!({"token_ids": B, "model_name": "m"}));
    assert_eq!(r.json()["scores"], json!({"7": {"0": 4}}));
}

#[test]
fn a_gap_is_filled_from_the_replay_endpoint() {
    let rt = runtime();
    let publ = publisher(&rt, true);
    rt.block_on(publ.publish(&store(100, &A))).unwrap();
    let (_tmp, dir) = data_dir();
    let mut cap = Capture::start(&[
        "--zmq",
        publ.endpoint(),
        "--replay-endpoint",
        publ.replay_endpoint().unwrap(),
        "--to",
        p(&dir),
        "--block-size",
        "4",
        "--max-events",
        "3",
    ]);
    // The start-up catch-up request: the SUB socket is connected by then.
    wait_for(
        "the catch-up replay request",
        &mut cap,
        || {},
        || !publ.replay_requests().is_empty(),
    );
    // C is only in the replay ring: the next live batch reveals the gap.
    publ.publish_unsent(&store(300, &C));
    let start = Instant::now();
    while cap.running() && start.elapsed() < DEADLINE {
        rt.block_on(publ.publish(&store(400, &D))).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    let summary = cap.finish_cleanly("max_events");
    assert_eq!(summary["events"], 3, "{summary}");
    let l = &summary["listener"];
    assert!(l["gaps"].as_u64().unwrap() >= 1, "{summary}");
    assert!(l["replayed_batches"].as_u64().unwrap() >= 2, "{summary}");
    assert_eq!(l["lost_batches"], 0, "{summary}");
    assert_eq!(summary["degraded"], false, "{summary}");
    assert_eq!(
        state_matches(&dir, &[&A, &C, &D]),
        vec![one(0, 2), one(0, 1), one(0, 1)]
    );
}

#[test]
fn without_replay_gaps_and_garbage_are_counted_and_sigint_ends_cleanly() {
    let rt = runtime();
    let publ = publisher(&rt, false);
    let (_tmp, dir) = data_dir();
    let mut cap = Capture::start(&[
        "--zmq",
        publ.endpoint(),
        "--to",
        p(&dir),
        "--block-size",
        "4",
        "--fsync",
        "always",
    ]);
    let log_block = |cap: &mut Capture, what: &str, batch: &PublishBatch, block: u64| {
        wait_for(
            what,
            cap,
            || {
                rt.block_on(publ.publish(batch)).unwrap();
            },
            || exported_block(&dir, block),
        );
    };
    log_block(&mut cap, "A in the log", &store(100, &A), 101);
    // Garbage: a one-frame message and a payload that is not msgpack.
    rt.block_on(publ.send_raw(vec![b"junk".to_vec()])).unwrap();
    rt.block_on(publ.send_raw(vec![
        Vec::new(),
        9_999u64.to_be_bytes().to_vec(),
        b"\xc1\xc1".to_vec(),
    ]))
    .unwrap();
    // Five batches nobody will ever see.
    publ.skip_seqs(5);
    log_block(&mut cap, "B in the log", &store(200, &B), 201);
    cap.signal(libc::SIGINT);
    let stderr_log = Arc::clone(&cap.stderr);
    let summary = cap.finish_cleanly("signal");
    let l = &summary["listener"];
    assert!(l["gaps"].as_u64().unwrap() >= 1, "{summary}");
    assert!(l["lost_batches"].as_u64().unwrap() >= 5, "{summary}");
    assert!(l["malformed_messages"].as_u64().unwrap() >= 1, "{summary}");
    assert!(l["decode_failures"].as_u64().unwrap() >= 1, "{summary}");
    assert!(summary["errors"].as_u64().unwrap() >= 2, "{summary}");
    let stderr = stderr_log.lock().unwrap().join("\n");
    assert!(stderr.contains("No replay endpoint configured"), "{stderr}");
    assert!(stderr.contains("capture: "), "{stderr}");
    // The log is readable: clean inspect, and the index has both chains.
    let (code, _, err) = run(&["replay", "inspect", p(&dir)], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(state_matches(&dir, &[&A, &B]), vec![one(0, 2), one(0, 2)]);
}

#[test]
fn replay_flags_bound_the_attempts_against_a_dead_replay_endpoint() {
    let rt = runtime();
    let publ = publisher(&rt, false);
    let dead = dead_endpoint();
    let (_tmp, dir) = data_dir();
    let cap = Capture::start(&[
        "--zmq",
        publ.endpoint(),
        "--replay-endpoint",
        &dead,
        "--to",
        p(&dir),
        "--replay-attempts",
        "2",
        "--replay-timeout-ms",
        "300",
        "--replay-backoff-ms",
        "10",
        "--duration",
        "3s",
    ]);
    let summary = cap.finish_cleanly("duration");
    let l = &summary["listener"];
    // The start-up catch-up: one request, two attempts, failed.
    assert_eq!(l["replay_requests"], 1, "{summary}");
    assert_eq!(l["replay_attempts"], 2, "{summary}");
    assert_eq!(l["replay_failures"], 1, "{summary}");
    assert_eq!(summary["degraded"], true, "{summary}");
}

#[test]
fn bad_values_and_a_non_empty_target_exit_1_with_a_message() {
    let (tmp, dir) = data_dir();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--zmq", "tcp://127.0.0.1", "--to", p(&dir)],
            "missing TCP port",
        ),
        (
            &[
                "--zmq",
                "tcp://127.0.0.1:1",
                "--to",
                p(&dir),
                "--replay-attempts",
                "0",
            ],
            "--replay-attempts must be between 1 and 100, got 0",
        ),
        (
            &[
                "--zmq",
                "tcp://127.0.0.1:1",
                "--to",
                p(&dir),
                "--block-size",
                "0",
            ],
            "--block-size must be at least 1",
        ),
        (
            &[
                "--zmq",
                "tcp://127.0.0.1:1",
                "--to",
                p(&dir),
                "--fsync",
                "sometimes",
            ],
            "--fsync",
        ),
        (
            &["--zmq", "tcp://127.0.0.1:1", "--to", p(tmp.path())],
            "is not empty",
        ),
    ];
    std::fs::write(tmp.path().join("occupied"), b"x").unwrap();
    for (args, msg) in cases {
        let mut full = vec!["capture"];
        full.extend_from_slice(args);
        let (code, out, err) = run(&full, &[]);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(out.is_empty(), "{out}");
    }
    let (code, _, err) = run(
        &[
            "capture",
            "--zmq",
            "tcp://127.0.0.1:1",
            "--to",
            p(&dir),
            "--duration",
            "5x",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run(&["capture", "--to", p(&dir)], &[]);
    assert_eq!(code, 2);
}

#[test]
fn an_inproc_endpoint_fails_the_capture() {
    let (_tmp, dir) = data_dir();
    let cap = Capture::start(&["--zmq", "inproc://events", "--to", p(&dir)]);
    let (code, summary) = cap.finish();
    assert_eq!(code, 1, "{summary}");
    assert_eq!(summary["stopped_by"], "listener_failed");
}
