//! The service load tool against a spawned `kvindex serve` on a small trace slice: trace bodies
//! hash to the workload's blocks, a ZMQ flood is applied in full and answers exactly, the load
//! generator counts every request and every non-200 answer. No timing assertions.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kvindex_benches::service::http::HttpConn;
use kvindex_benches::service::load::{self, LoadSpec};
use kvindex_benches::service::target::{TargetKind, TargetProcess};
use kvindex_benches::service::trace_bodies::{self, ServiceWorkload, SERVICE_BLOCK_SIZE};
use kvindex_benches::service::{agreement, ingest};
use kvindex_benches::workload::{self, hash_tokens, Op, WorkloadConfig};

fn small_config() -> WorkloadConfig {
    WorkloadConfig {
        length_factor: 2,
        duplication: 2,
        workers: 4,
        capacity: 120,
        limit_requests: Some(40),
        seed: 42,
    }
}

fn small_service() -> (workload::Workload, ServiceWorkload) {
    let path = workload::default_trace_path();
    let trace = workload::load_trace(&path).unwrap_or_else(|e| {
        panic!(
            "the trace is needed for this test ({}): {e}",
            path.display()
        )
    });
    let w = workload::generate(&trace, &small_config()).expect("workload");
    let s = trace_bodies::build(&trace, &w, "m").expect("service workload");
    (w, s)
}

/// Newest modification time of the files `kvindex` is built from (server, engine, persistence
/// sources, manifests and the lock file).
fn newest_source_mtime(repo: &Path) -> SystemTime {
    fn walk(dir: &Path, newest: &mut SystemTime) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                *newest = (*newest).max(m);
            }
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for dir in ["server/src", "engine/src", "persistence/src"] {
        walk(&repo.join(dir), &mut newest);
    }
    for file in [
        "Cargo.lock",
        "Cargo.toml",
        "server/Cargo.toml",
        "engine/Cargo.toml",
        "persistence/Cargo.toml",
    ] {
        if let Ok(m) = std::fs::metadata(repo.join(file)).and_then(|m| m.modified()) {
            newest = newest.max(m);
        }
    }
    newest
}

/// The `kvindex` binary of this build profile (target/<profile>/kvindex, beside the test's
/// deps/ directory). `cargo test --workspace` has just built it (kvindex-server's tests need
/// it); when it is missing or older than its sources (e.g. `cargo test -p kvindex-benches`
/// alone), it is built here.
fn kvindex_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    let bin = profile_dir.join("kvindex");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fresh = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .is_ok_and(|built| built >= newest_source_mtime(&repo));
    if !fresh {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&repo).args([
            "build",
            "--locked",
            "-p",
            "kvindex-server",
            "--bin",
            "kvindex",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build of kvindex failed");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

#[test]
fn bodies_carry_the_workload_blocks() {
    let (w, s) = small_service();
    let queries = w.queries();
    assert_eq!(s.token_bodies.len(), queries.len());
    assert_eq!(s.hash_bodies.len(), queries.len());
    assert_eq!(s.events, w.counts.events);
    assert_eq!(s.stored_blocks, w.counts.stored_blocks);
    assert_eq!(
        s.batches.iter().map(|b| b.events).sum::<u64>(),
        w.counts.events
    );
    for (i, q) in queries.iter().enumerate() {
        let body: serde_json::Value = serde_json::from_slice(&s.token_bodies[i]).unwrap();
        let tokens: Vec<u32> = body["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let locals: Vec<u64> = tokens
            .chunks(SERVICE_BLOCK_SIZE as usize)
            .map(hash_tokens)
            .collect();
        let expected: Vec<u64> = q.iter().map(|h| h.0).collect();
        assert_eq!(
            locals, expected,
            "query {i}: token ids hash to other blocks"
        );
        let body: serde_json::Value = serde_json::from_slice(&s.hash_bodies[i]).unwrap();
        let hashes: Vec<u64> = body["block_hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_i64().unwrap() as u64)
            .collect();
        assert_eq!(hashes, expected, "query {i}: block_hashes");
        assert_eq!(body["model_name"], "m");
    }
    // Batches follow the op stream: each worker's events in order.
    let stream_workers: Vec<u64> = w
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Event(e) => Some(e.worker_id),
            Op::Query { .. } => None,
        })
        .collect();
    let batch_workers: Vec<u64> = s
        .batches
        .iter()
        .flat_map(|b| std::iter::repeat_n(b.worker, b.events as usize))
        .collect();
    assert_eq!(batch_workers, stream_workers);
}

#[test]
fn flood_load_and_agreement_against_kvindex() {
    let (_, service) = small_service();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let kind = TargetKind::Kvindex {
            bin: kvindex_bin(),
            fsync: "never".into(),
        };
        let mut server = TargetProcess::start(kind, 2).await.expect("start kvindex");
        let mut conn = HttpConn::connect(server.addr).await.unwrap();
        let pubs = ingest::bind_publishers(service.workers, 1000)
            .await
            .unwrap();
        ingest::register_workers(&mut conn, &pubs, "m")
            .await
            .unwrap();
        ingest::wait_subscribed(
            &mut conn,
            service.workers,
            Duration::from_millis(200),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let r = ingest::flood(
            &service,
            &pubs,
            &mut conn,
            Duration::from_millis(5),
            Duration::from_secs(120),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log_tail(30)));
        assert_eq!(r.events, service.events);
        assert_eq!(r.applied.values().sum::<u64>(), service.events);
        assert_eq!(r.listener_totals.get("lost_batches"), Some(&0));

        // Every query on both routes agrees with exact scoring of the final caches.
        let a = agreement::check(&mut conn, &service, 1).await.unwrap();
        assert_eq!(a.queries, service.query_locals.len() as u64);
        assert_eq!(a.mismatches, 0, "{:?}", a.first_mismatch);

        // Exact request counts, all answered 200.
        for (path, bodies) in [
            ("/query", &service.token_bodies),
            ("/query_by_hash", &service.hash_bodies),
        ] {
            let spec = LoadSpec {
                path: path.into(),
                concurrency: 3,
                warmup: Duration::ZERO,
                duration: Duration::from_secs(600),
                requests_per_client: Some(10),
            };
            let res = load::run(server.addr, &spec, Arc::new(bodies.clone()))
                .await
                .unwrap();
            assert_eq!(
                (res.ok, res.errors),
                (30, 0),
                "{path}: {:?}",
                res.first_error
            );
            assert!(res.p50_us <= res.p99_us && res.p99_us <= res.max_us);
        }

        // Non-200 answers are counted as errors, with the first one kept.
        let unknown_model = Bytes::from(r#"{"block_hashes":[1,2],"model_name":"nope"}"#);
        let spec = LoadSpec {
            path: "/query_by_hash".into(),
            concurrency: 2,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(600),
            requests_per_client: Some(5),
        };
        let res = load::run(server.addr, &spec, Arc::new(vec![unknown_model]))
            .await
            .unwrap();
        assert_eq!((res.ok, res.errors), (0, 10));
        let first = res.first_error.expect("first error kept");
        assert!(first.starts_with("status 404"), "{first}");
        assert!(first.contains("no indexer for model=nope"), "{first}");
        server.check_alive().unwrap();
    });
}
