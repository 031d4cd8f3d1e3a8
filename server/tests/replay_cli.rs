//! `kvindex replay inspect|export|import|state|diff` on a data directory written by the real
//! server, with the documented exit codes.

mod common;

use common::*;
use serde_json::json;

/// A data directory with two workers' events (LSNs: 1 store w1, 2 store w2, 3 remove w1).
fn populated() -> (tempfile::TempDir, std::path::PathBuf, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = start(&data, &[], &[]);
    register(&s, 1, "m", 4);
    register(&s, 2, "m", 4);
    let t: Vec<u32> = (1..=12).collect();
    let h = local_hashes(&t, 4);
    let chain: Vec<(u64, u64)> = h
        .iter()
        .enumerate()
        .map(|(i, &l)| (100 + i as u64, l))
        .collect();
    assert_eq!(
        s.post_json("/events", &stored(1, 0, 7, None, &chain))
            .status,
        200
    );
    assert_eq!(
        s.post_json("/events", &stored(2, 0, 8, None, &chain[..1]))
            .status,
        200
    );
    assert_eq!(
        s.post_json("/events", &removed(1, 0, 9, &[102])).status,
        200
    );
    let (status, _) = s.terminate();
    assert_eq!(status.code(), Some(0));
    (dir, data, h)
}

fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn inspect_reports_a_clean_log_with_exit_0() {
    let (_d, data, _) = populated();
    let (code, out, err) = run(&["replay", "inspect", p(&data)], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no damage found"), "{out}");
    assert!(out.contains("log: LSN 1..=3"), "{out}");
}

#[test]
fn inspect_finds_damage_with_exit_3_and_rejects_a_non_directory_with_exit_1() {
    let (_d, data, _) = populated();
    let seg = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "kvlog"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let (code, out, _) = run(&["replay", "inspect", p(&data)], &[]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains(seg.file_name().unwrap().to_str().unwrap()),
        "{out}"
    );
    let (code, _, err) = run(&["replay", "inspect", p(&seg)], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a directory"), "{err}");
    let (code, _, err) = run(&["replay", "export", p(&data)], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("byte"), "{err}");
}

#[test]
fn export_writes_router_event_json_lines_with_filters() {
    let (_d, data, _) = populated();
    let (code, out, _) = run(&["replay", "export", p(&data)], &[]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["worker_id"], 1);
    assert_eq!(lines[0]["event"]["event_id"], 7);
    let (_, out, _) = run(&["replay", "export", p(&data), "--worker", "2"], &[]);
    assert_eq!(out.lines().count(), 1);
    let (_, out, _) = run(
        &["replay", "export", p(&data), "--from", "2", "--to", "2"],
        &[],
    );
    assert_eq!(out.lines().count(), 1);
    assert!(out.contains("\"worker_id\":2"));
}

/// A segment deleted from the middle of the log: `export` exits 3 naming the missing LSNs (as
/// `state` and `inspect` do), instead of exiting 0 with those events silently left out.
#[test]
fn export_over_a_missing_segment_exits_3() {
    use kvindex_persistence::{EventLog, LogConfig, LogEntry, NamespaceSpec, NullSink};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = LogConfig {
        segment_bytes: 1024,
        ..LogConfig::default()
    };
    let (log, _) = EventLog::open(&data, config, &mut NullSink).unwrap();
    let spec = std::sync::Arc::new(NamespaceSpec::new("m", "default", 4));
    for i in 1..=60u64 {
        let ev = stored(1, 0, i, None, &[(1000 + i, 2000 + i)]);
        let ev =
            kvindex_engine::codec::decode_router_event_json(ev.to_string().as_bytes()).unwrap();
        log.append(&[LogEntry::event(std::sync::Arc::clone(&spec), i, ev)])
            .unwrap()
            .wait()
            .unwrap();
    }
    log.close().unwrap();
    let mut segs: Vec<_> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "kvlog"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 3, "{segs:?}");
    std::fs::remove_file(&segs[1]).unwrap();
    let (code, out, err) = run(&["replay", "export", p(&data)], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("missing LSNs"), "{err}");
    assert!(!err.contains("exported"), "{err}");
    // The events before the gap were written before the error was found.
    assert!(out.lines().count() > 0);
    let (code, _, err) = run(&["replay", "state", p(&data)], &[]);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn import_then_state_answers_queries_like_the_server() {
    let (d, data, h) = populated();
    let (_, exported, _) = run(&["replay", "export", p(&data)], &[]);
    let jsonl = d.path().join("events.jsonl");
    std::fs::write(&jsonl, exported).unwrap();
    let target = d.path().join("imported");
    let (code, out, err) = run(
        &[
            "replay",
            "import",
            p(&jsonl),
            "--to",
            p(&target),
            "--model",
            "m",
            "--routing-group",
            "default",
            "--block-size",
            "4",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 3 events"), "{out}");
    let queries = d.path().join("q.jsonl");
    let t: Vec<u32> = (1..=12).collect();
    std::fs::write(
        &queries,
        format!(
            "{}\n{}\n\n{}\n",
            json!({"block_hashes": h}),
            json!({"token_ids": t, "block_size": 4}),
            json!({"token_ids": t, "block_size": 4, "lora_name": "x"})
        ),
    )
    .unwrap();
    for dir in [&data, &target] {
        let (code, out, err) = run(&["replay", "state", p(dir), "--queries", p(&queries)], &[]);
        assert_eq!(code, 0, "{err}");
        let answers: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected = json!({"matches": [{"worker_id": 1, "dp_rank": 0, "blocks": 2}, {"worker_id": 2, "dp_rank": 0, "blocks": 1}]});
        assert_eq!(
            answers,
            vec![expected.clone(), expected, json!({"matches": []})]
        );
    }
    // The server itself serves an imported directory (the partition is adopted from the log).
    let s = start(&target, &[], &[]);
    let v = s
        .post_json("/query", &json!({"token_ids": t, "model_name": "m"}))
        .json();
    assert_eq!(v["scores"], json!({"1": {"0": 8}, "2": {"0": 4}}));
}

#[test]
fn state_at_a_position_dump_and_stats() {
    let (_d, data, _) = populated();
    let (code, out, _) = run(&["replay", "state", p(&data), "--at", "1", "--dump"], &[]);
    assert_eq!(code, 0);
    let dump: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let events = dump["m:default"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0]["event"]["data"]["stored"]["blocks"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let (code, out, _) = run(&["replay", "state", p(&data), "--stats"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("position 3"), "{out}");
    assert!(out.contains("m:default block_size 4"), "{out}");
}

#[test]
fn diff_lists_gained_and_lost_blocks_per_stream() {
    let (_d, data, _) = populated();
    let (code, out, err) = run(
        &["replay", "diff", p(&data), "--from", "1", "--to", "3"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let w1 = lines.iter().find(|l| l["worker_id"] == 1).unwrap();
    assert_eq!(w1["lost"].as_array().unwrap().len(), 1);
    assert_eq!(w1["lost"][0]["ext"], 102);
    let w2 = lines.iter().find(|l| l["worker_id"] == 2).unwrap();
    assert_eq!(w2["gained"].as_array().unwrap().len(), 1);
}

#[test]
fn usage_errors_exit_2_and_bad_inputs_exit_1() {
    let (code, _, _) = run(&["replay", "diff", "x"], &[]);
    assert_eq!(code, 2);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"nope\":1}\n").unwrap();
    let (code, _, err) = run(
        &[
            "replay",
            "import",
            p(&bad),
            "--to",
            p(&dir.path().join("t")),
            "--block-size",
            "4",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("bad.jsonl line 1"), "{err}");
}

/// Names and sizes of the files in `dir`.
fn listing(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `import` is all or nothing with respect to its input: a refused line (here line 601, past
/// two full batches of 256 events) exits 1 naming the line, and the target is left as it was:
/// a new one is not created, an existing one lists the same files and inspects the same.
#[test]
fn import_of_a_file_with_a_refused_line_leaves_the_target_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let good = |n: u64| -> String {
        (1..=n)
            .map(|i| format!("{}\n", stored(1, 0, i, None, &[(i, 1000 + i)])))
            .collect()
    };
    let import = |file: &std::path::Path, target: &std::path::Path| {
        run(
            &[
                "replay",
                "import",
                p(file),
                "--to",
                p(target),
                "--block-size",
                "4",
            ],
            &[],
        )
    };
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, good(3)).unwrap();
    let existing = dir.path().join("existing");
    let (code, out, err) = import(&first, &existing);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 3 events"), "{out}");
    let files = listing(&existing);
    let (code, inspected, err) = run(&["replay", "inspect", p(&existing)], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(inspected.contains("log: LSN 1..=3"), "{inspected}");

    let reserved = stored(1, 0, 1 << 63, None, &[(7, 7)]).to_string();
    for (i, (bad, why)) in [
        ("{\"nope\":1}", "RouterEvent"),
        (reserved.as_str(), "is reserved"),
    ]
    .into_iter()
    .enumerate()
    {
        let jsonl = dir.path().join(format!("bad-{i}.jsonl"));
        std::fs::write(&jsonl, format!("{}{bad}\n{}", good(600), good(1))).unwrap();
        let fresh = dir.path().join(format!("fresh-{i}"));
        for target in [&fresh, &existing] {
            let (code, _, err) = import(&jsonl, target);
            assert_eq!(code, 1, "{err}");
            assert!(
                err.contains(&format!("bad-{i}.jsonl line 601")) && err.contains(why),
                "{err}"
            );
        }
        assert!(!fresh.exists(), "the new target was created");
        assert_eq!(listing(&existing), files);
        let (code, out, err) = run(&["replay", "inspect", p(&existing)], &[]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(out, inspected);
    }
}

/// `kvindex replay import` appends to the data directory of a stopped server: the partition it
/// imports, which `registry.json` does not list, is served after the restart (adopted, not
/// dropped) and after the next one too, next to the registered one.
#[test]
fn events_imported_into_a_servers_directory_survive_its_restarts() {
    let (d, data, _) = populated();
    let (_, exported, _) = run(&["replay", "export", p(&data)], &[]);
    let jsonl = d.path().join("events.jsonl");
    std::fs::write(&jsonl, exported).unwrap();
    let (code, out, err) = run(
        &[
            "replay",
            "import",
            p(&jsonl),
            "--to",
            p(&data),
            "--model",
            "imported",
            "--routing-group",
            "default",
            "--block-size",
            "4",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("imported 3 events"), "{out}");
    let t: Vec<u32> = (1..=12).collect();
    for restart in 0..2 {
        let s = start(&data, &[], &[]);
        for model in ["imported", "m"] {
            let v = s
                .post_json("/query", &json!({"token_ids": t, "model_name": model}))
                .json();
            assert_eq!(
                v["scores"],
                json!({"1": {"0": 8}, "2": {"0": 4}}),
                "model {model} after restart {restart}: {v}"
            );
        }
        let (status, _) = s.terminate();
        assert_eq!(status.code(), Some(0));
        let registry: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("registry.json")).unwrap()).unwrap();
        let models: Vec<&str> = registry["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["model_name"].as_str().unwrap())
            .collect();
        assert_eq!(models, vec!["imported", "m"], "{registry}");
    }
}
