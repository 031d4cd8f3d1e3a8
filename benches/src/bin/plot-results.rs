//! `plot-results`: SVG plots of the recorded benchmark JSON, for docs/img/.
//!
//! Reads a `mooncake-replay --compare` summary, a `mooncake-replay --sweep` summary and a
//! `replay-compare` report, and writes:
//!
//! * `sweep-throughput.svg`: achieved vs offered ops/s per backend (log–log, y = x dashed);
//! * `sweep-query-p99.svg`: query p99 (service time) vs offered ops/s per backend;
//! * `sweep-query-lag-p99.svg`: how late queries started against their schedule (p99);
//! * `query-latency.svg`: query p50 / p99 / p99.9 per backend (query phase);
//! * `memory-per-pair.svg`: bytes per live (block, worker) pair per backend;
//! * `replay-since.svg`: time to serve "events since X" vs the age of X, per approach (open
//!   markers: the answer is not the full history).
//!
//! Plotters' SVG backend writes text as SVG `<text>` elements, so no font files or system
//! libraries are needed (the crate's `ttf` feature is off). Every point is a median; the
//! min–max is in the JSON and the tables of docs/benchmarks*.md.
//!
//! ```text
//! cargo run --release -p kvindex-benches --bin plot-results -- \
//!     --compare benches/results/compare-X.json --sweep benches/results/sweep-X.json \
//!     --replay benches/results/replay-compare-X.json --out docs/img
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(about = "Plot benchmark result JSON into SVG files")]
struct Cli {
    /// `mooncake-replay --compare` summary (default: newest benches/results/compare-*.json).
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Another compare summary for the latency plot only (e.g. a run on a quieter machine;
    /// memory per pair does not depend on load). Default: --compare.
    #[arg(long)]
    compare_latency: Option<PathBuf>,
    /// `mooncake-replay --sweep` summary (default: newest benches/results/sweep-*.json).
    #[arg(long)]
    sweep: Option<PathBuf>,
    /// `replay-compare` report (default: newest benches/results/replay-compare-*.json).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Directory of the default inputs.
    #[arg(long, default_value = "benches/results")]
    results: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "docs/img")]
    out: PathBuf,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// The newest file in `dir` named `<prefix>*.json`.
fn newest(dir: &Path, prefix: &str) -> anyhow::Result<Option<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in rd {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with(prefix) && name.ends_with(".json")) {
            continue;
        }
        let t = entry.metadata()?.modified()?;
        if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

fn load(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// A named series of (x, y) points.
type Series = (String, Vec<(f64, f64)>);

fn bounds(series: &[Series]) -> Option<((f64, f64), (f64, f64))> {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let mut xb = (f64::INFINITY, f64::NEG_INFINITY);
    let mut yb = (f64::INFINITY, f64::NEG_INFINITY);
    let mut any = false;
    for &(x, y) in pts {
        if x > 0.0 && y > 0.0 && x.is_finite() && y.is_finite() {
            xb = (xb.0.min(x), xb.1.max(x));
            yb = (yb.0.min(y), yb.1.max(y));
            any = true;
        }
    }
    any.then_some((xb, yb))
}

/// A log–log line chart with one line per series (and `y = x` dashed when `diagonal`). Points
/// flagged in `hollow` (same shape as `series`) are drawn as open circles.
fn loglog(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    diagonal: bool,
    hollow: Option<&[Vec<bool>]>,
) -> anyhow::Result<()> {
    let Some(((x0, x1), (y0, y1))) = bounds(series) else {
        anyhow::bail!("{title}: no positive data to plot");
    };
    let (mut y0, mut y1) = (y0, y1);
    if diagonal {
        y0 = y0.min(x0);
        y1 = y1.max(x1);
    }
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x0 / 1.3..x1 * 1.3).log_scale(),
            (y0 / 1.5..y1 * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .draw()?;
    if diagonal {
        let line = [(x0, x0), (x1, x1)];
        chart
            .draw_series(DashedLineSeries::new(line, 6, 4, BLACK.mix(0.4).into()))?
            .label("offered = achieved")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let flags = hollow.and_then(|h| h.get(i));
        let pts: Vec<((f64, f64), bool)> = pts
            .iter()
            .enumerate()
            .filter(|(_, (x, y))| *x > 0.0 && *y > 0.0)
            .map(|(k, &p)| (p, flags.and_then(|f| f.get(k)).copied().unwrap_or(false)))
            .collect();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(p, _)| *p),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&(p, open)| {
            if open {
                Circle::new(p, 5, color.stroke_width(2))
            } else {
                Circle::new(p, 3, color.filled())
            }
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Grouped bars: one group per category, one bar per series value (log y axis when `log_y`).
fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    log_y: bool,
) -> anyhow::Result<()> {
    let positive = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0);
    let (min, max) = positive.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    anyhow::ensure!(max > 0.0, "{title}: nothing to plot");
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let x = 0f64..groups.len() as f64;
    if log_y {
        let mut chart = builder.build_cartesian_2d(x, (min / 2.0..max * 3.0).log_scale())?;
        draw_bars(&mut chart, y_desc, groups, series, min / 2.0, |v| v * 1.15)
    } else {
        let mut chart = builder.build_cartesian_2d(x, 0f64..max * 1.15)?;
        draw_bars(&mut chart, y_desc, groups, series, 0.0, |v| v + max * 0.02)
    }?;
    root.present()?;
    Ok(())
}

fn draw_bars<'a, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    y_desc: &str,
    groups: &[String],
    series: &[(String, Vec<f64>)],
    base: f64,
    label_at: impl Fn(f64) -> f64,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let n_groups = groups.len();
    let n_series = series.len().max(1);
    let labels = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_groups * 2 + 1)
        .x_label_formatter(&move |v| {
            let i = v.floor() as usize;
            if (v - i as f64 - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .y_label_formatter(&|v| short(*v))
        .draw()?;
    let width = 0.8 / n_series as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, &v)| {
                let x0 = g as f64 + 0.1 + s as f64 * width;
                Rectangle::new(
                    [(x0, base), (x0 + width * 0.9, v.max(base))],
                    color.filled(),
                )
            }))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(values.iter().enumerate().map(|(g, &v)| {
            let x = g as f64 + 0.1 + s as f64 * width;
            Text::new(short(v), (x, label_at(v.max(base))), ("sans-serif", 12))
        }))?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    Ok(())
}

fn short(v: f64) -> String {
    // A number with `decimals`, trailing zeros (and a trailing point) dropped, then `suffix`.
    let trimmed = |x: f64, decimals: usize, suffix: &str| {
        let s = format!("{x:.decimals$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.')
        } else {
            s.as_str()
        };
        format!("{s}{suffix}")
    };
    let a = v.abs();
    if a >= 1e6 {
        trimmed(v / 1e6, 3, "M")
    } else if a >= 1e3 {
        trimmed(v / 1e3, 2, "k")
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

/// Median of a `(median, min, max)` triple serialized as a JSON array.
fn med(v: &Value) -> Option<f64> {
    v.as_array().and_then(|a| a.first()).and_then(num)
}

fn plot_sweep(sweep: &Value, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let stats = sweep["stats"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("sweep JSON has no stats"))?;
    let mut backends: Vec<String> = Vec::new();
    for s in stats {
        if let Some(b) = s["backend"].as_str() {
            if !backends.iter().any(|x| x == b) {
                backends.push(b.to_string());
            }
        }
    }
    let series_of = |field: &str| -> Vec<Series> {
        backends
            .iter()
            .map(|b| {
                let mut pts: Vec<(f64, f64)> = stats
                    .iter()
                    .filter(|s| s["backend"].as_str() == Some(b))
                    .filter_map(|s| Some((num(&s["offered_ops_per_sec"])?, med(&s[field])?)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (b.clone(), pts)
            })
            .collect()
    };
    let t = out.join("sweep-throughput.svg");
    loglog(
        &t,
        "Offered-load sweep: achieved vs offered (mixed op stream, paced)",
        "offered ops/s (events + queries)",
        "achieved ops/s",
        &series_of("achieved_ops_per_sec"),
        true,
        None,
    )?;
    let p = out.join("sweep-query-p99.svg");
    loglog(
        &p,
        "Offered-load sweep: query p99 (service time) vs offered load",
        "offered ops/s (events + queries)",
        "query p99 (µs)",
        &series_of("query_p99_us"),
        false,
        None,
    )?;
    let l = out.join("sweep-query-lag-p99.svg");
    loglog(
        &l,
        "Offered-load sweep: query start lag p99 (queueing) vs offered load",
        "offered ops/s (events + queries)",
        "lag behind schedule p99 (µs)",
        &series_of("query_lag_p99_us"),
        false,
        None,
    )?;
    Ok(vec![t, p, l])
}

/// `stats[metric == name].median` of one backend of a compare summary.
fn compare_metric(backend: &Value, name: &str) -> Option<f64> {
    backend["stats"]
        .as_array()?
        .iter()
        .find(|s| s["metric"].as_str() == Some(name))
        .and_then(|s| num(&s["median"]))
}

fn compare_backends(compare: &Value) -> anyhow::Result<(&Vec<Value>, Vec<String>)> {
    let backends = compare["backends"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("compare JSON has no backends"))?;
    let names = backends
        .iter()
        .filter_map(|b| b["backend"].as_str().map(str::to_string))
        .collect();
    Ok((backends, names))
}

fn plot_compare(compare: &Value, latency: &Value, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let (backends, names) = compare_backends(latency)?;
    let pcts = ["query p50", "query p99", "query p99.9"];
    let lat: Vec<(String, Vec<f64>)> = backends
        .iter()
        .zip(&names)
        .map(|(b, n)| {
            (
                n.clone(),
                pcts.iter()
                    .map(|m| compare_metric(b, m).unwrap_or(0.0))
                    .collect(),
            )
        })
        .collect();
    let l = out.join("query-latency.svg");
    bars(
        &l,
        "Query latency after full ingest (µs, log scale, median of runs)",
        "µs",
        &["p50".to_string(), "p99".to_string(), "p99.9".to_string()],
        &lat,
        true,
    )?;
    written.push(l);
    let (backends, names) = compare_backends(compare)?;
    let mem: Vec<f64> = backends
        .iter()
        .map(|b| compare_metric(b, "memory bytes/live pair").unwrap_or(0.0))
        .collect();
    let m = out.join("memory-per-pair.svg");
    bars(
        &m,
        "Memory per live (block, worker) pair (RSS delta / pairs)",
        "bytes",
        &names,
        &[("bytes per pair".to_string(), mem)],
        false,
    )?;
    written.push(m);
    Ok(written)
}

fn plot_replay(replay: &Value, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let rows = replay["since"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("replay JSON has no `since` rows"))?;
    let mut approaches: Vec<String> = Vec::new();
    for r in rows {
        if let Some(a) = r["approach"].as_str() {
            if !approaches.iter().any(|x| x == a) {
                approaches.push(a.to_string());
            }
        }
    }
    let mut series: Vec<Series> = Vec::new();
    let mut hollow: Vec<Vec<bool>> = Vec::new();
    for a in &approaches {
        let mut pts = Vec::new();
        let mut flags = Vec::new();
        for r in rows.iter().filter(|r| r["approach"].as_str() == Some(a)) {
            if let (Some(x), Some(y)) = (num(&r["age_batches"]), num(&r["secs"]["median"])) {
                pts.push((x, y * 1e6));
                // Open marker: the answer is not the full history (batches lost, or a dump).
                flags.push(r["outcome"].as_str() != Some("events"));
            }
        }
        series.push((a.clone(), pts));
        hollow.push(flags);
    }
    let p = out.join("replay-since.svg");
    loglog(
        &p,
        "\"Every event since X\" for one worker (open marker: not the full history)",
        "age of X (batches behind the newest)",
        "time to serve (µs)",
        &series,
        false,
        Some(&hollow),
    )?;
    Ok(vec![p])
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let pick = |given: &Option<PathBuf>, prefix: &str| -> anyhow::Result<Option<PathBuf>> {
        match given {
            Some(p) => Ok(Some(p.clone())),
            None => newest(&cli.results, prefix),
        }
    };
    let mut written = Vec::new();
    let mut missing = Vec::new();
    match pick(&cli.compare, "compare-")? {
        Some(p) => {
            let compare = load(&p)?;
            let latency = match &cli.compare_latency {
                Some(l) => load(l)?,
                None => compare.clone(),
            };
            written.extend(plot_compare(&compare, &latency, &cli.out)?)
        }
        None => missing.push("compare"),
    }
    match pick(&cli.sweep, "sweep-")? {
        Some(p) => written.extend(plot_sweep(&load(&p)?, &cli.out)?),
        None => missing.push("sweep"),
    }
    match pick(&cli.replay, "replay-compare-")? {
        Some(p) => written.extend(plot_replay(&load(&p)?, &cli.out)?),
        None => missing.push("replay-compare"),
    }
    for w in &written {
        println!("wrote {}", w.display());
    }
    anyhow::ensure!(
        missing.is_empty(),
        "no input for: {} (give the file or record it first)",
        missing.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_labels() {
        assert_eq!(short(320_000.0), "320k");
        assert_eq!(short(1_500_000.0), "1.5M");
        assert_eq!(short(42.0), "42");
        assert_eq!(short(4.35), "4.35");
    }

    #[test]
    fn sweep_and_replay_plots_are_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sweep = serde_json::json!({"stats": [
            {"backend": "kvindex", "offered_ops_per_sec": 1000.0, "achieved_ops_per_sec": [990.0, 980.0, 1000.0],
             "query_p99_us": [50.0, 40.0, 60.0], "query_lag_p99_us": [10.0, 5.0, 20.0]},
            {"backend": "kvindex", "offered_ops_per_sec": 4000.0, "achieved_ops_per_sec": [2000.0, 1900.0, 2100.0],
             "query_p99_us": [55.0, 40.0, 60.0], "query_lag_p99_us": [900.0, 5.0, 2000.0]}
        ]});
        let files = plot_sweep(&sweep, dir.path()).expect("sweep plots");
        assert_eq!(files.len(), 3);
        let svg = std::fs::read_to_string(&files[0]).expect("svg");
        assert!(svg.starts_with("<svg") && svg.contains("kvindex"));
        let replay = serde_json::json!({"since": [
            {"approach": "vllm-buffer", "age_batches": 1, "outcome": "events", "secs": {"median": 1e-5}},
            {"approach": "vllm-buffer", "age_batches": 100, "outcome": "partial", "secs": {"median": 1e-3}}
        ]});
        let files = plot_replay(&replay, dir.path()).expect("replay plot");
        let svg = std::fs::read_to_string(&files[0]).expect("svg");
        assert!(svg.contains("vllm-buffer"));
        // Nothing plottable is an error, not an empty picture.
        assert!(plot_sweep(&serde_json::json!({"stats": []}), dir.path()).is_err());
    }
}
