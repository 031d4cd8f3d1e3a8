//! Lower storage tiers through the service: `/query` and `/query_by_hash` report cumulative
//! `cpu` / `disk` (SERVICE.md §3.6, §6.4), `/dump` writes the lower tiers one block per event
//! with per-tier event ids (§3.8), a restart (log replay or snapshot) keeps them, and a replica
//! recovering from a peer's dump applies each event in its tier (§9).

mod common;

use common::*;
use serde_json::{json, Value};

const BS: u32 = 4;

fn tokens() -> Vec<u32> {
    (1..=16).collect()
}

fn on(tier: &str, mut ev: Value) -> Value {
    ev["storage_tier"] = json!(tier);
    ev
}

/// Worker 1: device block 0, host_pinned block 1, disk block 2, external block 3 (each under the
/// previous one). Worker 2 (dp 1): disk blocks 0..2 from the root. Worker 3: a disk chain under a
/// parent it never stored on the device (SERVICE.md §6.4: counts nothing).
fn populate(s: &Server) {
    register(s, 1, "m", BS);
    register(s, 2, "m", BS);
    register(s, 3, "m", BS);
    let h = local_hashes(&tokens(), BS as usize);
    let events = [
        stored(1, 0, 1, None, &[(101, h[0])]),
        on("host_pinned", stored(1, 0, 2, Some(101), &[(102, h[1])])),
        on("disk", stored(1, 0, 3, Some(102), &[(103, h[2])])),
        on("external", stored(1, 0, 4, Some(103), &[(104, h[3])])),
        on("disk", stored(2, 1, 1, None, &[(201, h[0]), (202, h[1])])),
        stored(3, 0, 1, None, &[(301, h[0])]),
        on(
            "disk",
            stored(3, 0, 2, Some(999), &[(302, h[1]), (303, h[2])]),
        ),
    ];
    for ev in events {
        let r = s.post_json("/events", &ev);
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

fn query(s: &Server) -> Value {
    let mut v = s
        .post_json("/query", &json!({"token_ids": tokens(), "model_name": "m"}))
        .json();
    v.as_object_mut().unwrap().remove("log_lsn");
    v
}

fn expected() -> Value {
    json!({
        "scores": {"1": {"0": 4}, "3": {"0": 4}},
        "frequencies": [],
        "instances": {
            "1": {"longest_matched": 16, "gpu": 4, "dp": {"0": 4}, "cpu": 8, "disk": 16},
            "2": {"longest_matched": 8, "gpu": 0, "dp": {"1": 0}, "cpu": 0, "disk": 8},
            "3": {"longest_matched": 4, "gpu": 4, "dp": {"0": 4}, "cpu": 4, "disk": 4}
        }
    })
}

#[test]
fn query_and_query_by_hash_report_cumulative_lower_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &[], &[]);
    populate(&s);
    assert_eq!(query(&s), expected());
    let h = local_hashes(&tokens(), BS as usize);
    let mut by_hash = s
        .post_json(
            "/query_by_hash",
            &json!({"block_hashes": h.iter().map(|&x| x as i64).collect::<Vec<_>>(), "model_name": "m"}),
        )
        .json();
    by_hash.as_object_mut().unwrap().remove("log_lsn");
    assert_eq!(by_hash, expected());
    // A host_pinned remove touches only that tier: worker 1 keeps its device block and its
    // disk/external blocks, which no longer continue (their parent chain is cut).
    let r = s.post_json("/events", &on("host_pinned", removed(1, 0, 5, &[102])));
    assert_eq!(r.status, 200);
    let v = query(&s);
    assert_eq!(
        v["instances"]["1"],
        json!({"longest_matched": 4, "gpu": 4, "dp": {"0": 4}, "cpu": 4, "disk": 4})
    );
    assert!(s.metric("kvindex_index_lower_tier_blocks{model_name=\"m\",routing_group=\"default\",tier=\"disk\"}") >= 4.0);
    // Unregister removes every tier of the instance.
    let r = s.post_json("/unregister", &json!({"instance_id": 2, "model_name": "m"}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(query(&s)["instances"].get("2").is_none());
}

#[test]
fn dump_writes_lower_tiers_one_block_per_event_with_per_tier_ids() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &[], &[]);
    populate(&s);
    let dump = s.get("/dump").json();
    let events = dump["m:default"]["events"].as_array().unwrap();
    let lower: Vec<&Value> = events
        .iter()
        .filter(|e| e["storage_tier"] != "device")
        .collect();
    let tiers: Vec<(String, u64)> = lower
        .iter()
        .map(|e| {
            (
                e["storage_tier"].as_str().unwrap().to_owned(),
                e["event"]["event_id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tiers,
        vec![
            ("host_pinned".to_owned(), 0),
            ("disk".to_owned(), 0),
            ("disk".to_owned(), 1),
            ("disk".to_owned(), 2),
            ("disk".to_owned(), 3),
            ("disk".to_owned(), 4),
            ("external".to_owned(), 0),
        ]
    );
    let stored = |e: &Value| e["event"]["data"]["stored"].clone();
    for e in &lower {
        assert_eq!(stored(e)["blocks"].as_array().unwrap().len(), 1, "{e}");
    }
    // Parent hashes are written where known: worker 3's first disk block keeps its parent 999.
    let w3: Vec<&&Value> = lower.iter().filter(|e| e["worker_id"] == 3).collect();
    assert_eq!(stored(w3[0])["parent_hash"], 999);
    assert_eq!(stored(w3[1])["parent_hash"], 302);
    let w2 = lower.iter().find(|e| e["worker_id"] == 2).unwrap();
    assert_eq!(w2["event"]["dp_rank"], 1);
}

#[test]
fn lower_tiers_survive_a_restart_from_the_log_and_from_a_snapshot() {
    for flags in [
        &[][..],
        &["--snapshot-every-entries", "2", "--snapshot-keep", "1"][..],
    ] {
        let (_dir, data) = data_dir();
        let s = start(&data, flags, &[]);
        populate(&s);
        assert_eq!(query(&s), expected());
        let dump_before = s.get("/dump").json();
        if !flags.is_empty() {
            wait_for_snapshot(&data);
        }
        let s = s.restart(flags);
        assert_eq!(query(&s), expected(), "flags {flags:?}");
        assert_eq!(s.get("/dump").json(), dump_before, "flags {flags:?}");
    }
}

#[test]
fn a_replica_recovering_from_a_peer_applies_each_event_in_its_tier() {
    let dir = tempfile::tempdir().unwrap();
    let a = start(&dir.path().join("a"), &[], &[]);
    populate(&a);
    let peer = format!("http://{}", a.addr);
    let b = start(&dir.path().join("b"), &["--peers", &peer], &[]);
    // Worker 3's disk chain names a parent it never stored: it is kept (lower-tier stores need
    // no parent) and still counts nothing, exactly as on the peer.
    assert_eq!(query(&b), expected());
}
