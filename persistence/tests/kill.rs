//! Kill tests: a child process appends batches with `--fsync always`, printing each batch before
//! appending it (`SEND`) and once it is acknowledged (`ACK`); the parent SIGKILLs it at a random
//! moment, recovers, and checks that every acknowledged batch is in the log with its LSNs, that
//! an unacknowledged batch is either wholly present or wholly absent, that nothing else is, and
//! that the recovered index equals the reference model fed the same batches.
//!
//! The child is this test binary itself, re-run with `kill_test_child` and an environment
//! variable naming the data directory.

mod common;

use std::collections::HashMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvindex_engine::codec::{decode_router_event_json, encode_router_event_json};
use kvindex_engine::WorkerWithDpRank;
use kvindex_persistence::*;

const DIR_ENV: &str = "KVINDEX_KILL_TEST_DIR";
const IO_ENV: &str = "KVINDEX_KILL_TEST_IO";
const ROUND_ENV: &str = "KVINDEX_KILL_TEST_ROUND";
const ROUNDS: u64 = 20;
const THREADS: u64 = 2;

fn spec_of_thread(t: u64) -> Arc<NamespaceSpec> {
    if t == 0 {
        ns()
    } else {
        ns_b()
    }
}

/// The child: appends until killed (or a bound is reached).
#[test]
#[ignore = "child process of the kill tests; run by them"]
fn kill_test_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let io = match std::env::var(IO_ENV).as_deref() {
        Ok("io_uring") => IoBackendChoice::IoUring,
        _ => IoBackendChoice::Portable,
    };
    let round: u64 = std::env::var(ROUND_ENV)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let (log, _) =
        EventLog::open(&dir, cfg(io, FsyncPolicy::Always), &mut NullSink).expect("child: open log");
    let log = Arc::new(log);
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let spec = spec_of_thread(t);
                let streams = vec![
                    WorkerWithDpRank::new(10 + t, 0),
                    WorkerWithDpRank::new(10 + t, 1),
                ];
                let mut gen = EventGen::new(round * THREADS + t + 1, streams);
                let mut rng = Rng::new(round * 1000 + t);
                let started = Instant::now();
                for i in 0..5_000u64 {
                    if started.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let n = 1 + rng.below(4);
                    let batch: Vec<LogEntry> = (0..n)
                        .map(|k| {
                            LogEntry::event(
                                spec.clone(),
                                round << 32 | i << 4 | k,
                                gen.next_event(),
                            )
                        })
                        .collect();
                    let mut line = format!("SEND\t{t}");
                    for e in &batch {
                        let LogOp::Event(ev) = &e.op else {
                            unreachable!()
                        };
                        line.push_str(&format!(
                            "\t{}\t{}",
                            e.source_seq,
                            encode_router_event_json(ev).expect("encode")
                        ));
                    }
                    println!("{line}");
                    let ticket = log.append(&batch).expect("child: append");
                    ticket.wait().expect("child: wait");
                    println!("ACK\t{t}\t{}", ticket.first_lsn());
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// One batch as the parent saw it.
#[derive(Debug, Clone)]
struct SeenBatch {
    entries: Vec<LogEntry>,
    acked_at: Option<Lsn>,
}

fn parse_send(fields: &[&str]) -> Vec<LogEntry> {
    let t: u64 = fields[1].parse().unwrap();
    fields[2..]
        .chunks(2)
        .map(|c| {
            let seq: u64 = c[0].parse().unwrap();
            let ev = decode_router_event_json(c[1].as_bytes()).unwrap();
            LogEntry::event(spec_of_thread(t), seq, ev)
        })
        .collect()
}

/// Run one child until a random moment, kill it, and return what it said per thread.
fn run_child(
    dir: &std::path::Path,
    io: IoBackendChoice,
    round: u64,
    rng: &mut Rng,
) -> Vec<SeenBatch> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill_test_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DIR_ENV, dir)
        .env(
            IO_ENV,
            if io == IoBackendChoice::IoUring {
                "io_uring"
            } else {
                "portable"
            },
        )
        .env(ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    // A line cut by the kill has no newline: it was never fully said.
                    if line.ends_with('\n') {
                        line.pop();
                        let _ = tx.send(line);
                    }
                }
            }
        }
    });
    // Kill after a random number of acknowledgements (0 = possibly during start-up/recovery),
    // plus a random extra delay.
    let want_acks = rng.below(40);
    let mut lines = Vec::new();
    let mut acks = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while acks < want_acks && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(l) => {
                if l.contains("ACK\t") {
                    acks += 1;
                }
                lines.push(l);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_micros(rng.below(3000)));
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
    reader.join().unwrap();
    lines.extend(rx.try_iter());

    let mut pending: HashMap<u64, SeenBatch> = HashMap::new();
    let mut out = Vec::new();
    for l in lines {
        // libtest prints "test kill_test_child ... " without a newline before the child's
        // first line: start at the marker.
        let start = ["SEND\t", "ACK\t"].iter().filter_map(|m| l.find(m)).min();
        let Some(start) = start else { continue };
        let fields: Vec<&str> = l[start..].split('\t').collect();
        match fields[0] {
            "SEND" => {
                let t: u64 = fields[1].parse().unwrap();
                assert!(
                    !pending.contains_key(&t),
                    "a thread sent twice without an ack"
                );
                pending.insert(
                    t,
                    SeenBatch {
                        entries: parse_send(&fields),
                        acked_at: None,
                    },
                );
            }
            "ACK" => {
                let t: u64 = fields[1].parse().unwrap();
                let mut b = pending.remove(&t).expect("ACK without SEND");
                b.acked_at = Some(fields[2].parse().unwrap());
                out.push(b);
            }
            _ => {}
        }
    }
    out.extend(pending.into_values());
    out
}

fn kill_rounds(io: IoBackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(0xC0FFEE);
    // What the log held after the previous round.
    let mut durable: Vec<LoggedEntry> = Vec::new();
    let mut total_acked = 0usize;
    let mut unacked_present = 0usize;
    let mut tails_cut = 0usize;
    let mut index_pairs = 0usize;
    for round in 0..ROUNDS {
        let seen = run_child(dir.path(), io, round, &mut rng);

        // Read the log as it is on disk (nothing modified), then recover it for real.
        let mut sink = CollectingSink::default();
        let report = read_log(dir.path(), RecoveryPolicy::TolerateTail, None, &mut sink)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            report.skipped.is_empty() && report.lost_lsns.is_empty(),
            "round {round}: {report:?}"
        );
        for c in &report.truncated {
            assert!(c.damage.is_torn_write(), "round {round}: {c:?}");
        }
        tails_cut += report.truncated.len();
        let recovered = sink.entries;
        let lsns: Vec<Lsn> = recovered.iter().map(|e| e.lsn).collect();
        assert_eq!(
            lsns,
            (1..=recovered.len() as u64).collect::<Vec<_>>(),
            "dense LSNs"
        );
        assert_eq!(
            &recovered[..durable.len()],
            &durable[..],
            "round {round}: earlier entries changed"
        );

        // Every acknowledged batch is there, at its LSN, whole.
        let mut claimed = vec![false; recovered.len()];
        for b in seen.iter().filter(|b| b.acked_at.is_some()) {
            let first = b.acked_at.unwrap() as usize;
            let got = recovered
                .get(first - 1..first - 1 + b.entries.len())
                .unwrap_or_else(|| panic!("round {round}: acknowledged batch at {first} lost"));
            assert_eq!(
                entries_of(got),
                b.entries,
                "round {round}: batch at {first}"
            );
            for c in &mut claimed[first - 1..first - 1 + b.entries.len()] {
                *c = true;
            }
            total_acked += 1;
        }
        for c in &mut claimed[..durable.len()] {
            *c = true;
        }
        // Whatever else is new must be an unacknowledged batch, wholly present.
        let mut i = 0;
        while i < recovered.len() {
            if claimed[i] {
                i += 1;
                continue;
            }
            let b = seen
                .iter()
                .filter(|b| b.acked_at.is_none())
                .find(|b| {
                    recovered
                        .get(i..i + b.entries.len())
                        .is_some_and(|got| entries_of(got) == b.entries)
                })
                .unwrap_or_else(|| {
                    panic!(
                        "round {round}: entry at LSN {} belongs to no batch sent",
                        i + 1
                    )
                });
            i += b.entries.len();
            unacked_present += 1;
        }

        // The recovered index equals the reference model fed the same batches.
        let engine = small_engine();
        let config = DurableConfig {
            log: cfg(io, FsyncPolicy::Always),
            snapshots: manual_snapshots(2),
        };
        let (idx, rep) = DurableIndex::open(dir.path(), config, engine.clone())
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(rep.entries_replayed, recovered.len() as u64);
        for spec in [ns(), ns_b()] {
            let model = model_of(
                recovered
                    .iter()
                    .map(|e| &e.entry)
                    .filter(|e| e.namespace.key == spec.key),
            );
            let got = engine_canonical(&engine, &spec.key);
            index_pairs += got.len();
            assert_eq!(
                got,
                model.canonical(),
                "round {round}: index differs from the model for {}",
                spec.key
            );
        }
        idx.close().unwrap();
        durable = recovered;
    }
    assert!(total_acked > 0, "the child never acknowledged anything");
    assert!(index_pairs > 0, "the index stayed empty");
    eprintln!(
        "{io:?}: {ROUNDS} kill rounds, {total_acked} acknowledged batches, {} entries, \
         {unacked_present} unacknowledged batches found durable, {tails_cut} torn tails cut",
        durable.len()
    );
}

#[test]
fn sigkill_during_appends_never_loses_an_acknowledged_batch_portable_writer() {
    kill_rounds(IoBackendChoice::Portable);
}

#[test]
fn sigkill_during_appends_never_loses_an_acknowledged_batch_io_uring_writer() {
    if let Err(e) = io_uring_available() {
        eprintln!("skipped: io_uring unavailable here ({e})");
        return;
    }
    kill_rounds(IoBackendChoice::IoUring);
}
