//! Which queries are slow, and why: per query, matched depth, workers scored, the first
//! (cold-ish) timing and the best of five (warm) timings, after ingesting the whole WORKLOAD.md
//! op stream. A design aid, single-threaded; the numbers that count come from `mooncake-replay`.
//! `cargo run --release -p kvindex-benches --example query_profile`
use kvindex_benches::workload::{default_trace_path, generate, load_trace, WorkloadConfig};
use kvindex_engine::*;
use std::time::Instant;

/// One query's shape and its best warm time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Row {
    best_ns: u128,
    len: usize,
    depth: u32,
    scored: usize,
}

fn mean(rows: &[Row], f: impl Fn(&Row) -> f64) -> f64 {
    rows.iter().map(f).sum::<f64>() / rows.len().max(1) as f64
}

fn summary(label: &str, rows: &[Row]) {
    println!(
        "{label}: mean {:.0} ns, len {:.0}, depth {:.0}, workers scored {:.1}",
        mean(rows, |r| r.best_ns as f64),
        mean(rows, |r| r.len as f64),
        mean(rows, |r| r.depth as f64),
        mean(rows, |r| r.scored as f64)
    );
}

fn main() -> anyhow::Result<()> {
    let trace = load_trace(&default_trace_path())?;
    let w = generate(&trace, &WorkloadConfig::default())?;
    let engine = Engine::new(EngineConfig {
        event_threads: 2,
        queue_capacity: 1024,
        ..EngineConfig::default()
    });
    let ns = engine.create_namespace(NamespaceKey::new("m", "g"), 16)?;
    for e in w.events() {
        ns.apply(e.clone())?;
    }
    ns.flush()?;
    let queries = w.queries();
    let mut rows = Vec::with_capacity(queries.len());
    let mut firsts = Vec::with_capacity(queries.len());
    for q in &queries {
        let t = Instant::now();
        let s = ns.find_matches(q, false);
        firsts.push(t.elapsed().as_nanos());
        let mut best_ns = u128::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            std::hint::black_box(ns.find_matches(q, false));
            best_ns = best_ns.min(t.elapsed().as_nanos());
        }
        rows.push(Row {
            best_ns,
            len: q.len(),
            depth: s.scores.values().copied().max().unwrap_or(0),
            scored: s.scores.len(),
        });
    }
    if rows.is_empty() {
        anyhow::bail!("the workload has no queries");
    }
    rows.sort_unstable();
    firsts.sort_unstable();
    let at = |n: usize, p: f64| ((n as f64 * p) as usize).min(n - 1);
    for p in [0.5, 0.9, 0.99, 0.999] {
        let r = rows[at(rows.len(), p)];
        let f = firsts[at(firsts.len(), p)];
        println!(
            "p{p}: first {:.2} us, best-of-5 {:.2} us (len {}, depth {}, scored {})",
            f as f64 / 1e3,
            r.best_ns as f64 / 1e3,
            r.len,
            r.depth,
            r.scored
        );
    }
    summary("slowest 1%", &rows[rows.len() - rows.len() / 100..]);
    summary("all", &rows);
    Ok(())
}
