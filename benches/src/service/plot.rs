//! SVG plots of a service load summary (plotters, SVG backend only): requests/s and p99 against
//! concurrency (one line per target and route, min–max as a vertical bar), and end-to-end ingest
//! events/s per target.

use std::path::Path;

use plotters::prelude::*;

use super::summary::{Stat, TargetSummary};
use super::ServiceError;

/// Which load figure to plot against concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFigure {
    /// Requests per second.
    RequestsPerSecond,
    /// p99 latency in microseconds.
    P99,
}

fn plot_err(path: &Path) -> impl Fn(String) -> ServiceError + '_ {
    move |detail| ServiceError::Plot {
        path: path.display().to_string(),
        detail,
    }
}

/// One line per (target, route) of `summaries`: the figure's median against log2(concurrency).
pub fn plot_load(
    path: &Path,
    summaries: &[TargetSummary],
    figure: LoadFigure,
    caption: &str,
) -> Result<(), ServiceError> {
    let err = plot_err(path);
    let pick = |s: &super::summary::LoadSummary| -> Stat {
        match figure {
            LoadFigure::RequestsPerSecond => s.requests_per_s.clone(),
            LoadFigure::P99 => s.p99_us.clone(),
        }
    };
    let mut lines: Vec<(String, Vec<(f64, Stat)>)> = Vec::new();
    for t in summaries {
        let mut paths: Vec<&str> = Vec::new();
        for l in &t.loads {
            if !paths.contains(&l.path.as_str()) {
                paths.push(&l.path);
            }
        }
        for p in paths {
            let pts: Vec<(f64, Stat)> = t
                .loads
                .iter()
                .filter(|l| l.path == p)
                .map(|l| ((l.concurrency.max(1) as f64).log2(), pick(l)))
                .collect();
            lines.push((format!("{} {}", t.label, p), pts));
        }
    }
    if lines.is_empty() {
        return Err(err("no load levels to plot".into()));
    }
    let x_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .fold(0.0f64, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, s)| s.max))
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let y_desc = match figure {
        LoadFigure::RequestsPerSecond => "requests/s (median, min-max)",
        LoadFigure::P99 => "p99 latency, us (median, min-max)",
    };
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.3f64..x_max + 0.3, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("concurrent clients (closed loop)")
        .y_desc(y_desc)
        .x_labels(((x_max as usize) + 2).min(12))
        .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(x.round())))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, (name, pts)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(x, s)| (*x, s.median)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                pts.iter()
                    .map(|(x, s)| Circle::new((*x, s.median), 3, color.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(pts.iter().map(|(x, s)| {
                PathElement::new(vec![(*x, s.min), (*x, s.max)], color.stroke_width(1))
            }))
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// One bar per target: median end-to-end ingest events/s, min–max as a vertical line.
pub fn plot_ingest(
    path: &Path,
    summaries: &[TargetSummary],
    caption: &str,
) -> Result<(), ServiceError> {
    let err = plot_err(path);
    if summaries.is_empty() {
        return Err(err("no targets to plot".into()));
    }
    let n = summaries.len();
    let y_max = summaries
        .iter()
        .map(|s| s.ingest_events_per_s.max)
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.15;
    let labels: Vec<String> = summaries.iter().map(|s| s.label.clone()).collect();
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("events/s published -> applied (median, min-max)")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in summaries.iter().enumerate() {
        let x = i as f64;
        let color = Palette99::pick(i).to_rgba();
        let stat = &s.ingest_events_per_s;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.3, 0.0), (x + 0.3, stat.median)],
                color.filled(),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, stat.min), (x, stat.max)],
                BLACK.stroke_width(2),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{:.0}", stat.median),
                (x - 0.15, stat.max + y_max * 0.03),
                ("sans-serif", 14),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
