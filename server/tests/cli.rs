//! `kvindex serve` flags and environment (SERVICE.md §1, checklist §15.1–2).

mod common;

use common::*;
use serde_json::json;

#[test]
fn workers_without_block_size_exits_1_with_dynamos_message() {
    let (code, _, err) = run(&["serve", "--workers", "1=tcp://127.0.0.1:5557"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Exception: --block-size is required when --workers is specified"),
        "{err}"
    );
}

#[test]
fn unknown_flag_exits_2() {
    let (code, _, err) = run(&["serve", "--dynamo-runtime"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unexpected argument '--dynamo-runtime' found"),
        "{err}"
    );
}

#[test]
fn bad_workers_entries_exit_1_with_dynamos_messages() {
    for (spec, msg) in [
        (
            "1",
            "invalid worker entry `1`; expected worker_id[:dp_rank]=endpoint",
        ),
        (
            "x=tcp://127.0.0.1:1",
            "invalid worker id in `x=tcp://127.0.0.1:1`: invalid digit found in string",
        ),
        (
            "1:y=tcp://127.0.0.1:1",
            "invalid dp_rank in `1:y=tcp://127.0.0.1:1`",
        ),
        (
            "1=udp://127.0.0.1:1",
            "invalid ZMQ endpoint `udp://127.0.0.1:1`: unsupported scheme `udp`",
        ),
        (
            "1=tcp://127.0.0.1",
            "invalid ZMQ endpoint `tcp://127.0.0.1`: missing TCP port",
        ),
    ] {
        let (code, _, err) = run(&["serve", "--workers", spec, "--block-size", "4"], &[]);
        assert_eq!(code, 1, "{spec}");
        assert!(err.contains(&format!("Exception: {msg}")), "{spec}: {err}");
    }
}

/// Values clap parses are refused by clap: exit 2 with its error, not `Exception:`.
#[test]
fn unparsable_flag_values_exit_2_with_claps_error() {
    for args in [
        ["serve", "--port", "70000"],
        ["serve", "--port", "abc"],
        ["serve", "--nats-events", "maybe"],
    ] {
        let (code, _, err) = run(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("error: invalid value"), "{args:?}: {err}");
        assert!(!err.contains("Exception:"), "{args:?}: {err}");
    }
}

/// An invalid `--trace-id-header` is a settings error: exit 1 before the data directory is
/// created or its log opened.
#[test]
fn invalid_trace_id_header_exits_1_before_the_data_directory_is_opened() {
    let (_d, data) = data_dir();
    let dir = data.to_str().unwrap();
    let (code, _, err) = run(
        &["serve", "--data-dir", dir, "--trace-id-header", "x trace"],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Exception: invalid --trace-id-header \"x trace\""),
        "{err}"
    );
    assert!(!data.exists(), "the data directory was created");
}

/// An access log that cannot be opened ends the start-up before recovery: no log segment.
#[test]
fn unopenable_access_log_exits_1_before_the_log_is_opened() {
    let (d, data) = data_dir();
    let dir = data.to_str().unwrap();
    let bad = d.path().join("no-such-dir").join("access.log");
    let (code, _, err) = run(
        &[
            "serve",
            "--data-dir",
            dir,
            "--access-log",
            bad.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Exception: cannot open the access log"),
        "{err}"
    );
    let entries: Vec<String> = std::fs::read_dir(&data)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        entries
            .iter()
            .all(|n| !n.ends_with(".kvlog") && n != "LOCK"),
        "{entries:?}"
    );
}

#[test]
fn invalid_min_initial_workers_exits_1() {
    let (code, _, err) = run(&["serve"], &[("DYN_ROUTER_MIN_INITIAL_WORKERS", "abc")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("DYN_ROUTER_MIN_INITIAL_WORKERS must be a non-negative integer, got \"abc\""),
        "{err}"
    );
}

#[test]
fn invalid_fsync_policy_exits_1() {
    let (code, _, err) = run(&["serve", "--fsync", "sometimes"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--fsync"), "{err}");
}

#[test]
fn initial_workers_are_registered_before_http_and_meet_the_min_workers_gate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = [
        "--workers",
        "10=tcp://127.0.0.1:18101,10:1=tcp://127.0.0.1:18102,11=tcp://127.0.0.1:18103",
        "--block-size",
        "16",
        "--model-name",
        "llama",
        "--routing-group",
        "g",
        "--tenant-id",
        "acme",
        "--threads",
        "0",
    ];
    let s = start(&data, &flags, &[("DYN_ROUTER_MIN_INITIAL_WORKERS", "2")]);
    let mut w: Vec<serde_json::Value> = serde_json::from_value(s.get("/workers").json()).unwrap();
    w.sort_by_key(|v| v["instance_id"].as_u64());
    assert_eq!(w.len(), 2);
    assert_eq!(w[0]["model_name"], "llama");
    assert_eq!(w[0]["routing_group"], "g");
    assert_eq!(w[0]["block_size"], 16);
    assert_eq!(
        w[0]["endpoints"],
        json!({"0": "tcp://127.0.0.1:18101", "1": "tcp://127.0.0.1:18102"})
    );
    assert!(s.stderr().contains("Registering initial worker"));
    let (status, _) = s.terminate();
    assert_eq!(status.code(), Some(0));
    // Restarting with the same flags is fine (the registrations were restored).
    let s = start(&data, &flags, &[]);
    assert_eq!(s.get("/workers").json().as_array().unwrap().len(), 2);
}

#[test]
fn config_file_supplies_settings_and_flags_win() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("kvindex.toml");
    let log = dir.path().join("access.log");
    std::fs::write(
        &cfg,
        format!(
            "access_log = {:?}\nfsync = \"interval:20\"\nworkers = \"5=tcp://127.0.0.1:1\"\nblock_size = 4\nmodel_name = \"fromfile\"\n",
            log.to_str().unwrap()
        ),
    )
    .unwrap();
    let s = start(
        &dir.path().join("data"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--model-name",
            "fromflag",
        ],
        &[],
    );
    assert_eq!(s.get("/workers").json()[0]["model_name"], "fromflag");
    assert!(log.exists());
}

#[test]
fn bad_config_file_exits_1_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "no_such_key = 1\n").unwrap();
    let (code, _, err) = run(&["serve", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn min_initial_workers_without_workers_never_binds_and_sigterm_still_exits_0() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .env("DYN_ROUTER_MIN_INITIAL_WORKERS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let waiting = line.contains("waiting for registered workers");
        seen.push(line);
        if waiting {
            break;
        }
        assert!(seen.len() < 200, "{seen:?}");
    }
    assert!(
        !seen.iter().any(|l| l.contains("HTTP server listening")),
        "{seen:?}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(
        !rest.iter().any(|l| l.contains("HTTP server listening")),
        "{rest:?}"
    );
}

/// Checklist 1: `--threads` accepts 1 and N as well as 0; the index works with each.
#[test]
fn threads_accepts_one_and_many() {
    for threads in ["1", "8"] {
        let dir = tempfile::tempdir().unwrap();
        let s = start(&dir.path().join("data"), &["--threads", threads], &[]);
        register(&s, 1, "m", 4);
        let h = local_hashes(&[1, 2, 3, 4], 4);
        let r = s.post_json("/events", &stored(1, 0, 1, None, &[(7, h[0])]));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = s
            .post_json(
                "/query",
                &json!({"token_ids": [1, 2, 3, 4], "model_name": "m"}),
            )
            .json();
        assert_eq!(v["scores"], json!({"1": {"0": 4}}), "--threads {threads}");
    }
}

/// `--expected-blocks` sizes the map at start (logged with its size) and the index works; a
/// count beyond the 32-bit block id space is refused.
#[test]
fn expected_blocks_sizes_the_map_at_start_and_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &["--expected-blocks", "200000"],
        &[],
    );
    register(&s, 1, "m", 4);
    let h = local_hashes(&[1, 2, 3, 4, 5, 6, 7, 8], 4);
    let r = s.post_json("/events", &stored(1, 0, 1, None, &[(7, h[0]), (8, h[1])]));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = s
        .post_json(
            "/query",
            &json!({"token_ids": [1, 2, 3, 4, 5, 6, 7, 8], "model_name": "m"}),
        )
        .json();
    // Scores are in tokens: two 4-token blocks.
    assert_eq!(v["scores"], json!({"1": {"0": 8}}));
    let (status, log) = s.terminate();
    assert_eq!(status.code(), Some(0));
    assert!(
        log.iter()
            .any(|l| l.contains("sized up front") && l.contains("expected_blocks=200000")),
        "{log:?}"
    );

    let (code, _, err) = run(&["serve", "--expected-blocks", "4294967296"], &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--expected-blocks must be at most 4294967295"),
        "{err}"
    );
}

/// Checklist 2: `RUST_LOG` is the log filter (`info` by default in the harness).
#[test]
fn rust_log_filters_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("a"), &[], &[("RUST_LOG", "debug")]);
    s.get("/health");
    let (_, log) = s.terminate();
    assert!(log.iter().any(|l| l.contains("DEBUG")), "{log:?}");
    let s = start(&dir.path().join("b"), &[], &[]);
    s.get("/health");
    let (_, log) = s.terminate();
    assert!(!log.iter().any(|l| l.contains("DEBUG")), "{log:?}");
}
