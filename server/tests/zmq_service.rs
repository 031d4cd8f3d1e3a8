//! ZMQ ingestion end to end: the real `kvindex` binary, and vLLM-protocol publishers
//! ([`VllmPublisher`]) on loopback. Every wait is a bounded poll on an observable condition; a
//! wait that may have lost a live batch to ZMQ's slow-joiner window re-publishes an idempotent
//! batch (a "nudge"), which either is applied itself or reveals a gap that replay fills.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{data_dir, dead_endpoint, local_hashes, runtime, start, Server};
use kvindex_server::zmq::test_publisher::{
    PublishBatch, PublishEvent, PublisherConfig, VllmPublisher,
};
use serde_json::{json, Value};

const BS: u32 = 4;
const TOKENS: [u32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
const DEADLINE: Duration = Duration::from_secs(60);

/// A publisher with its runtime handle, so tests can stay synchronous.
struct Pub {
    rt: tokio::runtime::Handle,
    p: VllmPublisher,
}

impl Pub {
    fn bind(rt: &tokio::runtime::Runtime, replay: bool) -> Pub {
        let cfg = if replay {
            PublisherConfig::loopback()
        } else {
            PublisherConfig::loopback_without_replay()
        };
        let p = rt
            .block_on(VllmPublisher::bind(cfg))
            .expect("bind publisher");
        Pub {
            rt: rt.handle().clone(),
            p,
        }
    }

    fn publish(&self, batch: &PublishBatch) -> u64 {
        self.rt.block_on(self.p.publish(batch)).expect("publish")
    }

    fn endpoint(&self) -> String {
        self.p.endpoint().to_owned()
    }

    fn replay_endpoint(&self) -> Option<String> {
        self.p.replay_endpoint().map(str::to_owned)
    }
}

/// A store of `tokens` (block size [`BS`]) with engine hashes `base+1, base+2, ...`.
fn store(base: u64, tokens: &[u32]) -> PublishEvent {
    let n = tokens.len() as u64 / BS as u64;
    PublishEvent::stored(
        (1..=n).map(|i| base + i).collect(),
        None,
        tokens.to_vec(),
        BS,
    )
}

fn batch(events: Vec<PublishEvent>) -> PublishBatch {
    PublishBatch::new(events)
}

fn register(s: &Server, instance: u64, dp: u32, p: &Pub) {
    let mut body = json!({"instance_id": instance, "dp_rank": dp, "endpoint": p.endpoint(),
        "model_name": "m", "block_size": BS});
    if let Some(r) = p.replay_endpoint() {
        body["replay_endpoint"] = json!(r);
    }
    let r = s.post_json("/register", &body);
    assert_eq!(r.status, 201, "{}", r.text());
}

/// `/query`'s answer without `log_lsn` (which moves with every logged entry).
fn query(s: &Server, tokens: &[u32]) -> Value {
    let r = s.post_json("/query", &json!({"token_ids": tokens, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let mut v = r.json();
    if let Some(o) = v.as_object_mut() {
        o.remove("log_lsn");
    }
    v
}

fn scores(s: &Server, tokens: &[u32]) -> Value {
    query(s, tokens)["scores"].clone()
}

fn listener(s: &Server, instance: u64, dp: u32) -> Value {
    let workers = s.get("/workers").json();
    workers
        .as_array()
        .and_then(|a| a.iter().find(|w| w["instance_id"] == json!(instance)))
        .map(|w| w["listeners"][dp.to_string()].clone())
        .unwrap_or(Value::Null)
}

/// Poll `cond` until it holds (bounded); every second without success, run `nudge`.
fn wait_for(what: &str, s: &Server, mut nudge: impl FnMut(), mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut last_nudge = Instant::now();
    while start.elapsed() < DEADLINE {
        if cond() {
            return;
        }
        if last_nudge.elapsed() > Duration::from_secs(1) {
            nudge();
            last_nudge = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out waiting for {what}; /workers: {}\nstderr:\n{}",
        s.get("/workers").text(),
        s.stderr()
    );
}

/// Wait until the listener has connected and finished its start-up catch-up.
fn wait_ready(s: &Server, instance: u64, dp: u32) {
    wait_for(
        "listener ready",
        s,
        || {},
        || {
            let l = listener(s, instance, dp);
            l["status"] == "active" && l["connected"] == true && l["replaying"] == false
        },
    );
}

/// `kvindex serve` on `dir` with `flags` and `env`, instance 1 (dp 0) registered on `p` and its
/// listener caught up.
fn serve_with_worker_1(dir: &Path, p: &Pub, flags: &[&str], env: &[(&str, &str)]) -> Server {
    let s = start(dir, flags, env);
    register(&s, 1, 0, p);
    wait_ready(&s, 1, 0);
    s
}

/// Publish `b`, then wait for `cond`, publishing `b` again whenever the wait stalls (`b` is
/// idempotent: a repeat is applied again or reveals a gap that replay fills).
fn publish_until(what: &str, s: &Server, p: &Pub, b: &PublishBatch, cond: impl FnMut() -> bool) {
    p.publish(b);
    wait_for(
        what,
        s,
        || {
            p.publish(b);
        },
        cond,
    );
}

#[test]
fn registered_worker_stores_are_queryable_and_workers_shows_live_status() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let b = batch(vec![store(100, &TOKENS)]);
    publish_until("stored blocks", &s, &p, &b, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    let l = listener(&s, 1, 0);
    assert_eq!(l["endpoint"], json!(p.endpoint()));
    assert_eq!(l["status"], "active");
    assert_eq!(l["degraded"], false);
    assert!(l["watermark"].as_u64().is_some(), "{l}");
    assert!(l["gaps"].is_u64() && l["replays"].is_u64(), "{l}");
    let w = &s.get("/workers").json()[0];
    assert_eq!(w["status"], "active");
    assert_eq!(w["source"], "zmq");
    assert_eq!(w["endpoints"]["0"], json!(p.endpoint()));
}

#[test]
fn removes_and_clears_reach_the_index() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    p.publish(&batch(vec![store(100, &TOKENS)]));
    let nudge = || {
        p.publish(&batch(Vec::new()));
    };
    wait_for("store", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    // Remove the second block: one block left.
    p.publish(&batch(vec![PublishEvent::removed(vec![102])]));
    wait_for("remove", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 4}})
    });
    // Store another chain, then clear everything.
    let other = [9, 10, 11, 12];
    p.publish(&batch(vec![store(200, &other)]));
    wait_for("second store", &s, nudge, || {
        scores(&s, &other) == json!({"1": {"0": 4}})
    });
    p.publish(&batch(vec![PublishEvent::Cleared]));
    wait_for("clear", &s, nudge, || {
        scores(&s, &TOKENS) == json!({}) && scores(&s, &other) == json!({})
    });
}

#[test]
fn dp_ranks_are_separate_streams_and_batch_rank_overrides() {
    let rt = runtime();
    let p0 = Pub::bind(&rt, true);
    let p1 = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = start(&dir, &[], &[]);
    register(&s, 5, 0, &p0);
    register(&s, 5, 1, &p1);
    wait_ready(&s, 5, 0);
    wait_ready(&s, 5, 1);
    p0.publish(&batch(vec![store(100, &TOKENS)]).with_dp_rank(0));
    p1.publish(&batch(vec![store(100, &TOKENS[..4])]).with_dp_rank(1));
    let nudge = || {
        p0.publish(&batch(Vec::new()).with_dp_rank(0));
        p1.publish(&batch(Vec::new()).with_dp_rank(1));
    };
    wait_for("both ranks", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"5": {"0": 8, "1": 4}})
    });
    // A batch naming dp 3 on the dp0 listener is indexed under dp 3 (SERVICE.md §5.2).
    let other = [21, 22, 23, 24];
    p0.publish(&batch(vec![store(300, &other)]).with_dp_rank(3));
    wait_for("override", &s, nudge, || {
        scores(&s, &other) == json!({"5": {"3": 4}})
    });
    let w = &s.get("/workers").json()[0];
    assert_eq!(w["listeners"]["1"]["endpoint"], json!(p1.endpoint()));
    // Unregister dp 1 only: its blocks go, dp 0 stays.
    let r = s.post_json(
        "/unregister",
        &json!({"instance_id": 5, "model_name": "m", "routing_group": "default", "dp_rank": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(scores(&s, &TOKENS), json!({"5": {"0": 8}}));
    assert!(listener(&s, 5, 1).is_null());
}

#[test]
fn unregister_stops_the_listener_and_removes_its_blocks() {
    let rt = runtime();
    let p1 = Pub::bind(&rt, true);
    let p2 = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = start(&dir, &[], &[]);
    register(&s, 1, 0, &p1);
    register(&s, 2, 0, &p2);
    wait_ready(&s, 1, 0);
    wait_ready(&s, 2, 0);
    p1.publish(&batch(vec![store(100, &TOKENS)]));
    p2.publish(&batch(vec![store(100, &TOKENS)]));
    let nudge = || {
        p1.publish(&batch(Vec::new()));
        p2.publish(&batch(Vec::new()));
    };
    wait_for("both workers", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}, "2": {"0": 8}})
    });
    let r = s.post_json("/unregister", &json!({"instance_id": 1, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(scores(&s, &TOKENS), json!({"2": {"0": 8}}));
    // Worker 1 keeps publishing; worker 2's later store is the marker that time has passed.
    let other = [31, 32, 33, 34];
    p1.publish(&batch(vec![store(400, &other)]));
    p2.publish(&batch(vec![store(400, &other)]));
    wait_for(
        "worker 2's marker",
        &s,
        || {
            p2.publish(&batch(Vec::new()));
        },
        || scores(&s, &other) == json!({"2": {"0": 4}}),
    );
    assert_eq!(scores(&s, &TOKENS), json!({"2": {"0": 8}}));
    assert_eq!(s.get("/workers").json().as_array().map(Vec::len), Some(1));
}

#[test]
fn a_gap_is_filled_by_replay() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    p.publish(&batch(vec![store(100, &TOKENS[..4])]));
    // The continuation is only in the replay buffer: the next live batch reveals the gap.
    p.p.publish_unsent(&batch(vec![PublishEvent::stored(
        vec![102],
        Some(101),
        TOKENS[4..].to_vec(),
        BS,
    )]));
    let other = [41, 42, 43, 44];
    p.publish(&batch(vec![store(500, &other)]));
    wait_for(
        "gap filled",
        &s,
        || {
            p.publish(&batch(Vec::new()));
        },
        || {
            scores(&s, &TOKENS) == json!({"1": {"0": 8}})
                && scores(&s, &other) == json!({"1": {"0": 4}})
        },
    );
    let l = listener(&s, 1, 0);
    assert!(l["gaps"].as_u64().unwrap_or(0) >= 1, "{l}");
    assert!(l["replays"].as_u64().unwrap_or(0) >= 1, "{l}");
    assert_eq!(l["degraded"], false);
}

#[test]
fn a_dead_replay_endpoint_degrades_but_live_events_are_still_indexed() {
    let rt = runtime();
    let p = Pub::bind(&rt, false);
    // A replay endpoint that never answers: a port held for the whole test (a freed port can be
    // taken by another test's socket while the suite runs in parallel, and then the replay may
    // reach a live peer), accepting TCP connections but never speaking ZMTP.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("tcp://{}", silent.local_addr().expect("addr"));
    let (_d, dir) = data_dir();
    let s = start(&dir, &[], &[]);
    let r = s.post_json(
        "/register",
        &json!({"instance_id": 1, "endpoint": p.endpoint(), "replay_endpoint": dead,
            "model_name": "m", "block_size": BS}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The start-up catch-up fails: degraded.
    wait_for(
        "degraded",
        &s,
        || {},
        || listener(&s, 1, 0)["degraded"] == true,
    );
    // A gap cannot be filled; later events are indexed anyway (no stall, SERVICE.md §7.6).
    p.p.skip_seqs(3);
    let b = batch(vec![store(100, &TOKENS)]);
    publish_until(
        "live store despite the dead replay endpoint",
        &s,
        &p,
        &b,
        || scores(&s, &TOKENS) == json!({"1": {"0": 8}}),
    );
    let w = &s.get("/workers").json()[0];
    assert_eq!(w["listeners"]["0"]["status"], "active");
    assert_eq!(w["listeners"]["0"]["degraded"], true);
    assert!(w["listeners"]["0"]["last_error"].is_string(), "{w}");
}

#[test]
fn pause_and_resume_routes_drive_the_listener() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[("DYN_KV_INDEXER_TEST_ENDPOINTS", "1")]);
    let r = s.post_json("/test/pause_listener", &json!({"instance_id": 1}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(listener(&s, 1, 0)["status"], "paused");
    let r = s.post_json("/test/pause_listener", &json!({"instance_id": 1}));
    assert_eq!(
        (r.status, r.json()),
        (
            409,
            json!({"error": "instance 1 dp_rank 0 cannot be paused from status paused"})
        )
    );
    // Published while paused: lost live, but in the replay buffer.
    p.publish(&batch(vec![store(100, &TOKENS)]));
    let r = s.post_json("/test/resume_listener", &json!({"instance_id": 1}));
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for(
        "replayed after resume",
        &s,
        || {
            p.publish(&batch(Vec::new()));
        },
        || scores(&s, &TOKENS) == json!({"1": {"0": 8}}),
    );
    assert_eq!(listener(&s, 1, 0)["status"], "active");
}

#[test]
fn workers_flag_starts_listeners_at_start_up() {
    let rt = runtime();
    let p = Pub::bind(&rt, false);
    let (_d, dir) = data_dir();
    let workers = format!("7={}", p.endpoint());
    let s = start(
        &dir,
        &[
            "--workers",
            &workers,
            "--block-size",
            "4",
            "--model-name",
            "m",
        ],
        &[],
    );
    let b = batch(vec![store(100, &TOKENS)]);
    wait_for(
        "store from a --workers listener",
        &s,
        || {
            p.publish(&b);
        },
        || {
            let r = s.post_json("/query", &json!({"token_ids": TOKENS, "model_name": "m"}));
            r.status == 200 && r.json()["scores"] == json!({"7": {"0": 8}})
        },
    );
}

/// Restart: events published while the server is down are replayed from the publisher's
/// buffer, after the durable watermark.
fn restart_replays_what_the_log_is_missing(sig: i32) {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    // The only non-empty batch: the durable watermark is its sequence number.
    let stored_seq = p.publish(&batch(vec![store(100, &TOKENS)]));
    let nudge = || {
        p.publish(&batch(Vec::new()));
    };
    wait_for("first store", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    let before = query(&s, &TOKENS);
    let (_status, _log) = s.signal(sig);

    // While the server is down.
    let missed = [51, 52, 53, 54, 55, 56, 57, 58];
    p.publish(&batch(vec![store(600, &missed)]));
    p.publish(&batch(vec![PublishEvent::removed(vec![602])]));
    let requests_before = p.p.replay_requests().len();

    let s = start(&dir, &[], &[]);
    wait_for(
        "missed events replayed",
        &s,
        || {},
        || scores(&s, &missed) == json!({"1": {"0": 4}}),
    );
    assert_eq!(query(&s, &TOKENS), before);
    let asked: Vec<u64> = p.p.replay_requests()[requests_before..].to_vec();
    let first = *asked.first().expect("a replay request after restart");
    // Resumed after the durable watermark (SIGKILL may lose an unsynced tail, never more).
    if sig == libc::SIGTERM {
        assert_eq!(first, stored_seq + 1, "{asked:?}");
    } else {
        assert!(first <= stored_seq + 1, "{asked:?}");
    }
    let l = listener(&s, 1, 0);
    assert_eq!(l["status"], "active");
    assert_eq!(l["watermark"], json!(p.p.next_seq() - 1), "{l}");
}

#[test]
fn restart_after_sigkill_replays_missed_events() {
    restart_replays_what_the_log_is_missing(libc::SIGKILL);
}

#[test]
fn restart_after_sigterm_replays_missed_events() {
    restart_replays_what_the_log_is_missing(libc::SIGTERM);
}

/// The engine restarts while kvindex is down: kvindex resumes after the old incarnation's
/// durable watermark, the catch-up replay after it finds nothing, and the first live batch is
/// below it — a PUB socket only sends such a batch if its engine restarted. The listener takes
/// it as a publisher restart and replays the new incarnation from 0. Before, every batch of the
/// new engine was dropped as stale until its sequence passed the old watermark.
#[test]
fn an_engine_restarted_while_kvindex_was_down_is_indexed_after_the_restart() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    // The old incarnation: 30 stores before the registration (fetched by its start-up replay).
    for _ in 0..30 {
        p.p.publish_unsent(&batch(vec![store(100, &TOKENS)]));
    }
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    wait_for(
        "the old incarnation's stores",
        &s,
        || {},
        || listener(&s, 1, 0)["watermark"] == json!(29),
    );
    let (_status, _log) = s.signal(libc::SIGTERM);

    // While kvindex is down the engine restarts and publishes its first batches.
    p.p.restart_sequence();
    let b = [41, 42, 43, 44, 45, 46, 47, 48];
    let c = [61, 62, 63, 64];
    p.p.publish_unsent(&batch(vec![store(500, &b)]));
    p.p.publish_unsent(&batch(vec![store(700, &c)]));
    let requests_before = p.p.replay_requests().len();

    let s = start(&dir, &[], &[]);
    wait_for(
        "the new engine's batches",
        &s,
        // The engine goes on publishing (the restart shows with its first live batch).
        || {
            p.publish(&batch(Vec::new()));
        },
        || scores(&s, &b) == json!({"1": {"0": 8}}) && scores(&s, &c) == json!({"1": {"0": 4}}),
    );
    let asked: Vec<u64> = p.p.replay_requests()[requests_before..].to_vec();
    assert_eq!(asked[..2], [30, 0], "{asked:?}");
    let d = [81, 82, 83, 84];
    publish_until(
        "a live store of the new engine",
        &s,
        &p,
        &batch(vec![store(900, &d)]),
        || scores(&s, &d) == json!({"1": {"0": 4}}),
    );
}

/// Unregister, re-register the same `(instance, dp_rank)` with a restarted engine (its sequence
/// starts at 0 again), then restart kvindex before the new registration logged anything: the
/// listener must start from scratch (replay from 0), not after the old registration's
/// watermark — which would skip, then call stale, every batch of the new engine up to it.
/// `flags` go to every start (e.g. snapshots after each entry: watermarks then come back from
/// a snapshot, with their LSNs).
fn reregister_then_restart_resumes_from_scratch(sig: i32, flags: &[&str]) {
    let rt = runtime();
    let old = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &old, flags, &[]);
    // Several stores: the old registration's durable watermark ends well above 0.
    for _ in 0..6 {
        old.publish(&batch(vec![store(100, &TOKENS)]));
    }
    wait_for(
        "the old registration's watermark",
        &s,
        || {
            old.publish(&batch(vec![store(100, &TOKENS)]));
        },
        || {
            listener(&s, 1, 0)["watermark"]
                .as_u64()
                .is_some_and(|w| w >= 5)
        },
    );
    let r = s.post_json("/unregister", &json!({"instance_id": 1, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    // The engine restarted: a new publisher counting from 0.
    let new = Pub::bind(&rt, true);
    register(&s, 1, 0, &new);
    wait_ready(&s, 1, 0);
    let (_status, _log) = s.signal(sig);

    // While kvindex is down the new engine publishes its first batches.
    let b = [41, 42, 43, 44, 45, 46, 47, 48];
    let c = [61, 62, 63, 64];
    new.publish(&batch(vec![store(500, &b)]));
    new.publish(&batch(vec![store(700, &c)]));
    let requests_before = new.p.replay_requests().len();

    let s = start(&dir, flags, &[]);
    wait_for(
        "the new engine's batches",
        &s,
        || {},
        || scores(&s, &b) == json!({"1": {"0": 8}}) && scores(&s, &c) == json!({"1": {"0": 4}}),
    );
    let asked: Vec<u64> = new.p.replay_requests()[requests_before..].to_vec();
    assert_eq!(asked.first(), Some(&0), "{asked:?}");
    assert_eq!(listener(&s, 1, 0)["watermark"], json!(1));
    // The old registration's blocks stayed removed.
    assert_eq!(scores(&s, &TOKENS), json!({}));
    if !flags.is_empty() {
        wait_for(
            "a snapshot",
            &s,
            || {},
            || {
                std::fs::read_dir(&dir).is_ok_and(|mut d| {
                    d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("snap-")))
                })
            },
        );
    }
    // A second restart resumes after the new registration's own watermark.
    let (_status, _log) = s.signal(libc::SIGTERM);
    let d = [81, 82, 83, 84];
    new.publish(&batch(vec![store(900, &d)]));
    let requests_before = new.p.replay_requests().len();
    let s = start(&dir, flags, &[]);
    wait_for(
        "the batch published during the second restart",
        &s,
        || {},
        || scores(&s, &d) == json!({"1": {"0": 4}}),
    );
    assert_eq!(new.p.replay_requests().get(requests_before), Some(&2));
}

#[test]
fn reregister_then_sigkill_restart_resumes_the_new_registration_from_scratch() {
    reregister_then_restart_resumes_from_scratch(libc::SIGKILL, &[]);
}

#[test]
fn reregister_then_sigterm_restart_resumes_the_new_registration_from_scratch() {
    reregister_then_restart_resumes_from_scratch(libc::SIGTERM, &["--snapshot-every-entries", "1"]);
}

#[test]
fn many_publishers_storing_the_same_prefix_are_all_indexed() {
    const N: u64 = 8;
    let rt = runtime();
    let pubs: Vec<Pub> = (0..N).map(|_| Pub::bind(&rt, true)).collect();
    let (_d, dir) = data_dir();
    let s = start(&dir, &[], &[]);
    for (i, p) in pubs.iter().enumerate() {
        register(&s, i as u64 + 1, 0, p);
    }
    for i in 0..N {
        wait_ready(&s, i + 1, 0);
    }
    let tokens: Vec<u32> = (1..=32).collect();
    // All at once, from one task per publisher.
    rt.block_on(async {
        let sends = pubs.iter().map(|p| {
            let b = batch(vec![store(1000, &tokens)]);
            async move { p.p.publish(&b).await.expect("publish") }
        });
        futures::future::join_all(sends).await;
    });
    let expected: serde_json::Map<String, Value> =
        (1..=N).map(|i| (i.to_string(), json!({"0": 32}))).collect();
    wait_for(
        "every publisher's blocks",
        &s,
        || {
            for p in &pubs {
                p.publish(&batch(Vec::new()));
            }
        },
        || scores(&s, &tokens) == Value::Object(expected.clone()),
    );
    // `/query_by_hash` takes i64 JSON values (the same 64 bits).
    let hashes: Vec<i64> = local_hashes(&tokens, BS as usize)
        .into_iter()
        .map(|h| h as i64)
        .collect();
    let r = s.post_json(
        "/query_by_hash",
        &json!({"block_hashes": hashes, "model_name": "m"}),
    );
    assert_eq!(r.json()["scores"], Value::Object(expected));
}

// --- compatibility checklist gaps (docs/compat-checklist.md) --------------------------------

use kvindex_server::zmq::test_publisher::ExtraKeyValue;

fn worker(s: &Server, instance: u64) -> Value {
    s.get("/workers")
        .json()
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|w| w["instance_id"] == json!(instance))
                .cloned()
        })
        .unwrap_or(Value::Null)
}

/// SERVICE.md §3.5 / checklist 8: a worker's status is its listeners' worst, in the order
/// failed > pending > active > paused; a listener is `active` even with nobody behind its
/// endpoint; `last_error` is omitted when there is none; the listener gauges follow.
#[test]
fn worker_status_aggregates_failed_over_active_over_paused() {
    let rt = runtime();
    let p1 = Pub::bind(&rt, true);
    let p2 = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p1, &[], &[("DYN_KV_INDEXER_TEST_ENDPOINTS", "1")]);
    let l = listener(&s, 1, 0);
    assert!(l.get("last_error").is_none(), "{l}");
    assert_eq!(worker(&s, 1)["status"], "active");

    // A second rank that can never connect: failed, and the worker with it.
    let r = s.post_json(
        "/register",
        &json!({"instance_id": 1, "dp_rank": 1, "endpoint": "tcp://*:5558", "model_name": "m", "block_size": BS}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    wait_for(
        "failed listener",
        &s,
        || {},
        || listener(&s, 1, 1)["status"] == "failed",
    );
    assert_eq!(
        listener(&s, 1, 1)["last_error"],
        "failed to connect ZMQ SUB socket to tcp://*:5558: Invalid argument"
    );
    assert_eq!(worker(&s, 1)["status"], "failed");

    // Nobody behind the endpoint: still active (ZMQ connects asynchronously).
    let r = s.post_json(
        "/register",
        &json!({"instance_id": 2, "endpoint": dead_endpoint(), "model_name": "m", "block_size": BS}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    wait_for(
        "active without a peer",
        &s,
        || {},
        || listener(&s, 2, 0)["status"] == "active",
    );
    let r = s.post_json("/test/pause_listener", &json!({"instance_id": 2}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(worker(&s, 2)["status"], "paused");
    // active > paused.
    register(&s, 2, 1, &p2);
    wait_ready(&s, 2, 1);
    assert_eq!(worker(&s, 2)["status"], "active");

    let gauge = |st: &str| s.metric(&format!("dynamo_kvindexer_listeners{{status=\"{st}\"}}"));
    assert_eq!(
        (
            gauge("active"),
            gauge("paused"),
            gauge("failed"),
            gauge("pending")
        ),
        (2.0, 1.0, 1.0, 0.0)
    );
    assert_eq!(s.metric("dynamo_kvindexer_workers"), 2.0);
    // Gauges are refreshed on every scrape.
    let r = s.post_json("/unregister", &json!({"instance_id": 1, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s.metric("dynamo_kvindexer_workers"), 1.0);
    assert_eq!(gauge("failed"), 0.0);
    assert_eq!(s.metric("dynamo_kvindexer_models"), 1.0);
}

/// SERVICE.md §0.6, §4 / checklist 9, 14: vLLM-shaped stores with a LoRA name and a cache salt
/// (bare string in the first block's `extra_keys`, or Dynamo's `dynamo-cache-salt:` tag) are
/// hashed like a `/query` with the same `lora_name` / `cache_salt`, and only such a query matches.
#[test]
fn vllm_lora_and_cache_salt_are_honoured_end_to_end() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let salted =
        |hashes: Vec<u64>, tokens: &[u32], lora: Option<&str>, first: Vec<ExtraKeyValue>| {
            let n = hashes.len();
            let mut keys = vec![None; n];
            keys[0] = Some(first);
            PublishEvent::Stored {
                block_hashes: hashes,
                parent_block_hash: None,
                token_ids: tokens.to_vec(),
                block_size: BS,
                medium: Some("GPU".into()),
                lora_name: lora.map(str::to_owned),
                extra_keys: Some(keys),
            }
        };
    let other = [11, 12, 13, 14];
    let b = batch(vec![
        salted(
            vec![101, 102],
            &TOKENS,
            Some("my-lora"),
            vec![
                ExtraKeyValue::Str("my-lora".into()),
                ExtraKeyValue::Str("tenant-a".into()),
            ],
        ),
        salted(
            vec![201],
            &other,
            None,
            vec![ExtraKeyValue::Str("dynamo-cache-salt:ns-1".into())],
        ),
    ]);
    p.publish(&b);
    let q = |tokens: &[u32], extra: Value| {
        let mut body = json!({"token_ids": tokens, "model_name": "m"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = s.post_json("/query", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["scores"].clone()
    };
    wait_for(
        "the salted stores",
        &s,
        || {
            p.publish(&b);
        },
        || {
            q(
                &TOKENS,
                json!({"lora_name": "my-lora", "cache_salt": "tenant-a"}),
            ) == json!({"1": {"0": 8}})
        },
    );
    assert_eq!(q(&TOKENS, json!({"lora_name": "my-lora"})), json!({}));
    assert_eq!(q(&TOKENS, json!({"cache_salt": "tenant-a"})), json!({}));
    assert_eq!(q(&TOKENS, json!({})), json!({}));
    assert_eq!(
        q(&other, json!({"cache_salt": "ns-1"})),
        json!({"1": {"0": 4}})
    );
    assert_eq!(q(&other, json!({})), json!({}));
}

/// SERVICE.md §7.3 / checklist 18: without a replay endpoint a gap is logged and counted as
/// lost, and the live batch is applied.
#[test]
fn without_a_replay_endpoint_a_gap_is_logged_and_the_live_batch_applied() {
    let rt = runtime();
    let p = Pub::bind(&rt, false);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let a = batch(vec![store(100, &TOKENS)]);
    publish_until("the first store", &s, &p, &a, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    let lost_before = listener(&s, 1, 0)["lost_batches"].as_u64().unwrap_or(0);
    p.p.skip_seqs(3);
    let other = [21, 22, 23, 24];
    let b = batch(vec![store(300, &other)]);
    publish_until("the live batch after the gap", &s, &p, &b, || {
        scores(&s, &other) == json!({"1": {"0": 4}})
    });
    let l = listener(&s, 1, 0);
    assert!(
        l["lost_batches"].as_u64().unwrap_or(0) >= lost_before + 3,
        "{l}"
    );
    assert_eq!(l["status"], "active");
    assert!(
        s.stderr()
            .contains("No replay endpoint configured; batches lost"),
        "{}",
        s.stderr()
    );
    assert!(s.metric("kvindex_zmq_replay_requests_total{outcome=\"not_configured\"}") >= 1.0);
}

/// SERVICE.md §7.2 / checklist 18: a replay that cannot cover the gap (the publisher's ring
/// already dropped part of it) is logged as incomplete with its reason; what it did return is
/// applied, the rest counted as lost, and ingestion goes on.
#[test]
fn an_incomplete_replay_is_logged_and_ingestion_continues() {
    let rt = runtime();
    let p = Pub {
        rt: rt.handle().clone(),
        p: rt
            .block_on(VllmPublisher::bind(PublisherConfig {
                buffer_steps: 2,
                ..PublisherConfig::loopback()
            }))
            .expect("bind publisher"),
    };
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let a = batch(vec![store(100, &TOKENS)]);
    publish_until("the first store", &s, &p, &a, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    // Four batches only in the ring (which keeps two), then a live one.
    let lost = [31, 32, 33, 34];
    let kept = [41, 42, 43, 44];
    let first = p.p.publish_unsent(&batch(vec![store(400, &lost)]));
    p.p.publish_unsent(&batch(Vec::new()));
    p.p.publish_unsent(&batch(Vec::new()));
    p.p.publish_unsent(&batch(vec![store(500, &kept)]));
    let live = [51, 52, 53, 54];
    let target = p.publish(&batch(vec![store(600, &live)]));
    wait_for(
        "the live batch after the incomplete replay",
        &s,
        || {},
        || scores(&s, &live) == json!({"1": {"0": 4}}),
    );
    assert_eq!(scores(&s, &kept), json!({"1": {"0": 4}}));
    assert_eq!(scores(&s, &lost), json!({}));
    let log = s.stderr();
    assert!(
        log.contains(&format!("Replay incomplete: requested=[{first},{target})"))
            && log.contains("reason=started_after_requested"),
        "{log}"
    );
    let l = listener(&s, 1, 0);
    assert!(l["lost_batches"].as_u64().unwrap_or(0) >= 2, "{l}");
    assert_eq!(l["degraded"], false);
    assert!(s.metric("kvindex_zmq_replay_requests_total{outcome=\"incomplete\"}") >= 1.0);
    // And later batches flow.
    let after = [61, 62, 63, 64];
    let c = batch(vec![store(700, &after)]);
    publish_until("a later batch", &s, &p, &c, || {
        scores(&s, &after) == json!({"1": {"0": 4}})
    });
}

/// SERVICE.md §7.5 / checklist 7, 17: unregister deletes the watermark, so registering the same
/// (instance, dp) again starts from sequence 0 — the replay brings back what the publisher still
/// buffers.
#[test]
fn reregistering_after_unregister_starts_again_from_sequence_0() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let a = batch(vec![store(100, &TOKENS)]);
    publish_until("the store", &s, &p, &a, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    assert!(listener(&s, 1, 0)["watermark"].as_u64().is_some());
    let r = s.post_json("/unregister", &json!({"instance_id": 1, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.post_json("/query", &json!({"token_ids": TOKENS, "model_name": "m"}));
    assert_eq!(r.status, 404, "the partition went with its last worker");
    let asked_before = p.p.replay_requests().len();
    register(&s, 1, 0, &p);
    wait_for(
        "the replay from 0",
        &s,
        || {},
        || p.p.replay_requests()[asked_before..].contains(&0),
    );
    wait_for(
        "the replayed store",
        &s,
        || {},
        || scores(&s, &TOKENS) == json!({"1": {"0": 8}}),
    );
}

/// Issue #4 / checklist 25: many workers storing the same chain block by block (each block a
/// batch naming its parent), all at once, round after round: every block is indexed for every
/// worker (Dynamo 1.6.1 lost blocks here with `--threads > 1`).
#[test]
fn many_publishers_storing_the_same_chain_block_by_block_every_round_are_all_indexed() {
    const N: u64 = 6;
    const BLOCKS: u32 = 8;
    let rt = runtime();
    let pubs: Vec<Pub> = (0..N).map(|_| Pub::bind(&rt, true)).collect();
    let (_d, dir) = data_dir();
    let s = start(&dir, &["--threads", "4"], &[]);
    for (i, p) in pubs.iter().enumerate() {
        register(&s, i as u64 + 1, 0, p);
    }
    for i in 0..N {
        wait_ready(&s, i + 1, 0);
    }
    for round in 0..3u32 {
        let tokens: Vec<u32> = (0..BLOCKS * BS).map(|t| 10_000 * (round + 1) + t).collect();
        let base = 1_000 * u64::from(round + 1);
        rt.block_on(async {
            let sends = pubs.iter().map(|p| {
                let tokens = tokens.clone();
                async move {
                    for b in 0..u64::from(BLOCKS) {
                        let start = (b * u64::from(BS)) as usize;
                        let event = PublishEvent::stored(
                            vec![base + b],
                            b.checked_sub(1).map(|x| base + x),
                            tokens[start..start + BS as usize].to_vec(),
                            BS,
                        );
                        p.p.publish(&batch(vec![event])).await.expect("publish");
                    }
                }
            });
            futures::future::join_all(sends).await;
        });
        let expected: serde_json::Map<String, Value> = (1..=N)
            .map(|i| (i.to_string(), json!({"0": BLOCKS * BS})))
            .collect();
        wait_for(
            "every worker's whole chain",
            &s,
            || {
                for p in &pubs {
                    p.publish(&batch(Vec::new()));
                }
            },
            || scores(&s, &tokens) == Value::Object(expected.clone()),
        );
    }
    assert_eq!(
        s.metric("dynamo_kvrouter_kv_cache_events_applied{event_type=\"stored\",status=\"parent_block_not_found\"}"),
        0.0
    );
}

/// Checklist 13, 15 / SERVICE.md §5.2, §6.3: a batch's `data_parallel_rank` is the effective
/// rank of its events, `AllBlocksCleared` included: a clear naming dp 3 on the dp 0 stream clears
/// dp 3 only.
#[test]
fn a_clear_applies_to_the_batch_rank_only() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let nudge = || {
        p.publish(&batch(Vec::new()).with_dp_rank(0));
    };
    p.publish(&batch(vec![store(100, &TOKENS)]).with_dp_rank(0));
    p.publish(&batch(vec![store(100, &TOKENS[..4])]).with_dp_rank(3));
    wait_for("both ranks", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8, "3": 4}})
    });
    p.publish(&batch(vec![PublishEvent::Cleared]).with_dp_rank(3));
    wait_for("dp 3 cleared", &s, nudge, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
}

/// Issue #4 / checklist 12: garbage on the ZMQ socket of the real service — wrong frame counts,
/// a short sequence frame, a payload that is not msgpack, an unknown event beside a good one —
/// is dropped and counted on `/metrics`, never crashes anything, and good batches go on.
#[test]
fn garbage_frames_reach_the_metrics_and_the_service_keeps_indexing() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let a = batch(vec![store(100, &TOKENS)]);
    publish_until("the first store", &s, &p, &a, || {
        scores(&s, &TOKENS) == json!({"1": {"0": 8}})
    });
    let next = p.p.next_seq().to_be_bytes().to_vec();
    rt.block_on(async {
        for frames in [
            vec![b"topic".to_vec()],
            vec![b"".to_vec(), next.clone()],
            vec![b"".to_vec(), vec![0, 0, 0, 1], b"x".to_vec()],
            vec![b"".to_vec(), next.clone(), vec![0xc1, 0xff, 0x00]],
        ] {
            p.p.send_raw(frames).await.expect("send");
        }
    });
    // A batch whose first event has an unknown tag: only that event is rejected.
    let mut payload = Vec::new();
    rmp::encode::write_array_len(&mut payload, 3).unwrap();
    rmp::encode::write_f64(&mut payload, 0.0).unwrap();
    rmp::encode::write_array_len(&mut payload, 2).unwrap();
    rmp::encode::write_array_len(&mut payload, 2).unwrap();
    rmp::encode::write_str(&mut payload, "Bogus").unwrap();
    rmp::encode::write_uint(&mut payload, 1).unwrap();
    rmp::encode::write_array_len(&mut payload, 2).unwrap();
    rmp::encode::write_str(&mut payload, "BlockRemoved").unwrap();
    rmp::encode::write_array_len(&mut payload, 1).unwrap();
    rmp::encode::write_uint(&mut payload, 102).unwrap();
    rmp::encode::write_nil(&mut payload).unwrap();
    rt.block_on(p.p.send_raw(vec![b"".to_vec(), next.clone(), payload]))
        .expect("send");
    p.p.skip_seqs(1);
    wait_for(
        "the good event beside the bad one",
        &s,
        || {},
        || scores(&s, &TOKENS) == json!({"1": {"0": 4}}),
    );
    let dropped = |reason: &str| {
        s.metric(&format!(
            "kvindex_zmq_messages_dropped_total{{reason=\"{reason}\"}}"
        ))
    };
    assert!(
        dropped("frame_count") >= 2.0,
        "{}",
        s.get("/metrics").text()
    );
    assert!(dropped("seq_length") >= 1.0);
    assert!(dropped("decode_failed") >= 1.0);
    assert!(s.metric("kvindex_zmq_events_rejected_total{reason=\"unknown_tag\"}") >= 1.0);
    // Traffic goes on.
    let other = [71, 72, 73, 74];
    let b = batch(vec![store(800, &other)]);
    publish_until("a batch after the garbage", &s, &p, &b, || {
        scores(&s, &other) == json!({"1": {"0": 4}})
    });
    assert_eq!(listener(&s, 1, 0)["status"], "active");
}

/// A store on a given `medium` (SERVICE.md §5.3 table) under `parent`.
fn store_on(medium: &str, hashes: Vec<u64>, parent: Option<u64>, tokens: &[u32]) -> PublishEvent {
    match PublishEvent::stored(hashes, parent, tokens.to_vec(), BS) {
        PublishEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_name,
            extra_keys,
            ..
        } => PublishEvent::Stored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium: Some(medium.to_owned()),
            lora_name,
            extra_keys,
        },
        other => other,
    }
}

#[test]
fn cpu_and_disk_mediums_are_indexed_as_lower_tiers() {
    let rt = runtime();
    let p = Pub::bind(&rt, true);
    let (_d, dir) = data_dir();
    let s = serve_with_worker_1(&dir, &p, &[], &[]);
    let tokens: Vec<u32> = (1..=12).collect();
    // GPU block 1, CPU block 2 under it, DISK block 3 under that (SERVICE.md §6.4).
    let b = batch(vec![
        store(100, &tokens[..4]),
        store_on("CPU", vec![102], Some(101), &tokens[4..8]),
        store_on("DISK", vec![103], Some(102), &tokens[8..]),
    ]);
    p.publish(&b);
    let nudge = || {
        p.publish(&batch(Vec::new()));
    };
    wait_for("tiered stores", &s, nudge, || {
        query(&s, &tokens)["instances"]["1"]
            == json!({"longest_matched": 12, "gpu": 4, "dp": {"0": 4}, "cpu": 8, "disk": 12})
    });
    assert_eq!(scores(&s, &tokens), json!({"1": {"0": 4}}));
    // A CPU-medium remove affects only the host tier.
    let mut rm = PublishEvent::removed(vec![101, 102]);
    if let PublishEvent::Removed { medium, .. } = &mut rm {
        *medium = Some("CPU".to_owned());
    }
    p.publish(&batch(vec![rm]));
    wait_for("cpu remove", &s, nudge, || {
        query(&s, &tokens)["instances"]["1"]
            == json!({"longest_matched": 4, "gpu": 4, "dp": {"0": 4}, "cpu": 4, "disk": 4})
    });
    // AllBlocksCleared covers every tier of the worker.
    p.publish(&batch(vec![
        store_on("CPU", vec![102], Some(101), &tokens[4..8]),
        PublishEvent::Cleared,
    ]));
    wait_for("clear", &s, nudge, || {
        query(&s, &tokens)["instances"] == json!({})
    });
    let dump = s.get("/dump").json();
    assert_eq!(dump["m:default"]["events"], json!([]));
}
