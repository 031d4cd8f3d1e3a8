//! `kvindex serve --replay-timeout-ms / --replay-attempts / --replay-backoff-ms`: a non-default
//! value reaches the listeners (attempt counts in `/metrics` against a dead replay endpoint), a
//! config-file value works too, and invalid values exit 1 like every other start-up error.

mod common;

use std::time::{Duration, Instant};

use common::{run, start, Server};
use kvindex_server::zmq::test_publisher::{PublisherConfig, VllmPublisher};
use serde_json::json;

const ATTEMPTS: &str = "kvindex_zmq_replay_attempts_total ";
const FAILED: &str = "kvindex_zmq_replay_requests_total{outcome=\"failed\"} ";

/// A loopback port nobody listens on.
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("tcp://{}", l.local_addr().expect("addr"))
}

/// Register a worker whose replay endpoint is dead; wait (bounded) until its start-up catch-up
/// has failed; return the attempts counted.
fn attempts_against_a_dead_endpoint(s: &Server) -> f64 {
    // A live PUB socket (the catch-up replay runs once the SUB socket is connected).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let publ = rt
        .block_on(VllmPublisher::bind(
            PublisherConfig::loopback_without_replay(),
        ))
        .expect("bind");
    let r = s.post_json(
        "/register",
        &json!({"instance_id": 1, "endpoint": publ.endpoint(), "replay_endpoint": dead_endpoint(),
            "model_name": "m", "block_size": 4}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let start = Instant::now();
    while s.metric(FAILED) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no failed replay; /workers: {}\n{}",
            s.get("/workers").text(),
            s.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.metric(ATTEMPTS)
}

#[test]
fn replay_attempts_flag_sets_the_attempts_per_request() {
    let tmp = tempfile::tempdir().unwrap();
    let s = start(
        &tmp.path().join("d"),
        &[
            "--replay-attempts",
            "5",
            "--replay-timeout-ms",
            "200",
            "--replay-backoff-ms",
            "5",
            "--replay-backoff-max-ms",
            "20",
        ],
        &[],
    );
    assert_eq!(attempts_against_a_dead_endpoint(&s), 5.0);
}

#[test]
fn replay_settings_come_from_the_config_file_too() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("k.toml");
    std::fs::write(
        &cfg,
        "replay_attempts = 2\nreplay_timeout_ms = 200\nreplay_backoff_ms = 5\n",
    )
    .unwrap();
    let s = start(
        &tmp.path().join("d"),
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(attempts_against_a_dead_endpoint(&s), 2.0);
}

#[test]
fn invalid_replay_settings_exit_1_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let d = dir.to_str().unwrap();
    for (flags, msg) in [
        (
            vec!["--replay-attempts", "0"],
            "Exception: --replay-attempts must be between 1 and 100, got 0",
        ),
        (
            vec!["--replay-timeout-ms", "0"],
            "Exception: --replay-timeout-ms must be between 1 and 3600000 ms, got 0",
        ),
        (
            vec![
                "--replay-backoff-ms",
                "300",
                "--replay-backoff-max-ms",
                "200",
            ],
            "Exception: --replay-backoff-max-ms (200) must not be below --replay-backoff-ms (300)",
        ),
    ] {
        let mut args = vec!["serve", "--port", "0", "--data-dir", d];
        args.extend(flags.iter().copied());
        let (code, _, err) = run(&args, &[]);
        assert_eq!(code, 1, "{flags:?}: {err}");
        assert!(err.contains(msg), "{flags:?}: {err}");
    }
    let (code, _, _) = run(&["serve", "--replay-attempts", "x"], &[]);
    assert_eq!(code, 2);
}
