//! Results of a service load run and their summary over runs: medians with min–max, and
//! kvindex/Dynamo ratios of the medians.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::agreement::AgreementResult;
use super::ingest::IngestResult;
use super::load::LoadResult;

/// Everything one target measured in one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRun {
    /// `kvindex fsync=<policy>` or `dynamo`.
    pub label: String,
    pub ingest: IngestResult,
    /// Target RSS after ingest (bytes), when readable.
    pub rss_after_ingest_bytes: Option<u64>,
    pub agreement: AgreementResult,
    /// Query load levels (empty for targets measured for ingest only).
    pub loads: Vec<LoadResult>,
}

/// One run: every target, in the order measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: usize,
    pub targets: Vec<TargetRun>,
}

/// Median and range of one figure over runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub values: Vec<f64>,
}

impl Stat {
    /// Median (mean of the middle two for an even count), min and max of `values`.
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
            values: values.to_vec(),
        }
    }
}

/// Summary of one load level of one target over runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadSummary {
    pub path: String,
    pub concurrency: usize,
    pub requests_per_s: Stat,
    pub p50_us: Stat,
    pub p99_us: Stat,
    pub p999_us: Stat,
    /// Server CPU microseconds per request.
    pub server_cpu_us_per_request: Stat,
    /// Errors over all runs (must be 0).
    pub errors: u64,
}

/// Summary of one target over runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TargetSummary {
    pub label: String,
    pub runs: usize,
    pub ingest_events_per_s: Stat,
    pub ingest_blocks_per_s: Stat,
    pub ingest_e2e_s: Stat,
    pub ingest_publish_s: Stat,
    /// Server CPU seconds from the first publish until every event was applied.
    pub ingest_server_cpu_s: Stat,
    pub rss_after_ingest_mib: Stat,
    /// Agreement over all runs: queries checked, mismatches (summed).
    pub agreement_queries: u64,
    pub agreement_mismatches: u64,
    pub agreement_below_exact: u64,
    pub agreement_above_exact: u64,
    pub first_mismatch: Option<String>,
    pub loads: Vec<LoadSummary>,
}

/// kvindex / Dynamo ratios of medians for one figure.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratio {
    /// What is compared, e.g. `/query c=16 requests/s`.
    pub what: String,
    pub kvindex_label: String,
    pub kvindex: f64,
    pub dynamo: f64,
    /// `kvindex / dynamo` for throughputs, `dynamo / kvindex` for latencies: > 1 = kvindex better.
    pub advantage: f64,
}

/// Summarise `runs` per target label (in the order of the first run).
pub fn summarize(runs: &[RunRecord]) -> Vec<TargetSummary> {
    let mut order: Vec<String> = Vec::new();
    let mut by_label: BTreeMap<String, Vec<&TargetRun>> = BTreeMap::new();
    for r in runs {
        for t in &r.targets {
            if !by_label.contains_key(&t.label) {
                order.push(t.label.clone());
            }
            by_label.entry(t.label.clone()).or_default().push(t);
        }
    }
    order
        .into_iter()
        .map(|label| {
            let ts = &by_label[&label];
            let f = |g: &dyn Fn(&TargetRun) -> f64| {
                Stat::of(&ts.iter().map(|t| g(t)).collect::<Vec<_>>())
            };
            let mut levels: Vec<(String, usize)> = Vec::new();
            for t in ts {
                for l in &t.loads {
                    let key = (l.path.clone(), l.concurrency);
                    if !levels.contains(&key) {
                        levels.push(key);
                    }
                }
            }
            let loads = levels
                .into_iter()
                .map(|(path, c)| {
                    let ls: Vec<&LoadResult> = ts
                        .iter()
                        .flat_map(|t| t.loads.iter())
                        .filter(|l| l.path == path && l.concurrency == c)
                        .collect();
                    let g = |h: &dyn Fn(&LoadResult) -> f64| {
                        Stat::of(&ls.iter().map(|l| h(l)).collect::<Vec<_>>())
                    };
                    LoadSummary {
                        requests_per_s: g(&|l| l.requests_per_s),
                        p50_us: g(&|l| l.p50_us),
                        p99_us: g(&|l| l.p99_us),
                        p999_us: g(&|l| l.p999_us),
                        server_cpu_us_per_request: Stat::of(
                            &ls.iter()
                                .filter_map(|l| l.server_cpu_us_per_request)
                                .collect::<Vec<_>>(),
                        ),
                        errors: ls.iter().map(|l| l.errors).sum(),
                        path,
                        concurrency: c,
                    }
                })
                .collect();
            let rss: Vec<f64> = ts
                .iter()
                .filter_map(|t| t.rss_after_ingest_bytes)
                .map(|b| b as f64 / (1024.0 * 1024.0))
                .collect();
            TargetSummary {
                runs: ts.len(),
                ingest_events_per_s: f(&|t| t.ingest.events_per_s),
                ingest_blocks_per_s: f(&|t| t.ingest.blocks_per_s),
                ingest_e2e_s: f(&|t| t.ingest.e2e_s),
                ingest_publish_s: f(&|t| t.ingest.publish_s),
                ingest_server_cpu_s: Stat::of(
                    &ts.iter()
                        .filter_map(|t| t.ingest.server_cpu_s)
                        .collect::<Vec<_>>(),
                ),
                rss_after_ingest_mib: Stat::of(&rss),
                agreement_queries: ts.iter().map(|t| t.agreement.queries).sum(),
                agreement_mismatches: ts.iter().map(|t| t.agreement.mismatches).sum(),
                agreement_below_exact: ts.iter().map(|t| t.agreement.below_exact).sum(),
                agreement_above_exact: ts.iter().map(|t| t.agreement.above_exact).sum(),
                first_mismatch: ts.iter().find_map(|t| t.agreement.first_mismatch.clone()),
                loads,
                label,
            }
        })
        .collect()
}

/// Ratios of every kvindex target against the `dynamo` target (empty without Dynamo).
pub fn ratios(summaries: &[TargetSummary]) -> Vec<Ratio> {
    let Some(dynamo) = summaries.iter().find(|s| s.label == "dynamo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    for k in summaries.iter().filter(|s| s.label != "dynamo") {
        out.push(Ratio {
            what: "ingest events/s".into(),
            kvindex_label: k.label.clone(),
            kvindex: k.ingest_events_per_s.median,
            dynamo: dynamo.ingest_events_per_s.median,
            advantage: ratio(
                k.ingest_events_per_s.median,
                dynamo.ingest_events_per_s.median,
            ),
        });
        out.push(Ratio {
            what: "ingest server CPU s".into(),
            kvindex_label: k.label.clone(),
            kvindex: k.ingest_server_cpu_s.median,
            dynamo: dynamo.ingest_server_cpu_s.median,
            advantage: ratio(
                dynamo.ingest_server_cpu_s.median,
                k.ingest_server_cpu_s.median,
            ),
        });
        for l in &k.loads {
            let Some(d) = dynamo
                .loads
                .iter()
                .find(|d| d.path == l.path && d.concurrency == l.concurrency)
            else {
                continue;
            };
            let what = format!("{} c={}", l.path, l.concurrency);
            out.push(Ratio {
                what: format!("{what} requests/s"),
                kvindex_label: k.label.clone(),
                kvindex: l.requests_per_s.median,
                dynamo: d.requests_per_s.median,
                advantage: ratio(l.requests_per_s.median, d.requests_per_s.median),
            });
            out.push(Ratio {
                what: format!("{what} p99"),
                kvindex_label: k.label.clone(),
                kvindex: l.p99_us.median,
                dynamo: d.p99_us.median,
                advantage: ratio(d.p99_us.median, l.p99_us.median),
            });
            out.push(Ratio {
                what: format!("{what} server CPU us/request"),
                kvindex_label: k.label.clone(),
                kvindex: l.server_cpu_us_per_request.median,
                dynamo: d.server_cpu_us_per_request.median,
                advantage: ratio(
                    d.server_cpu_us_per_request.median,
                    l.server_cpu_us_per_request.median,
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert_eq!(Stat::of(&[]).median, 0.0);
    }

    fn target(label: &str, eps: f64, rps: f64, p99: f64) -> TargetRun {
        TargetRun {
            label: label.into(),
            ingest: IngestResult {
                events_per_s: eps,
                ..Default::default()
            },
            rss_after_ingest_bytes: None,
            agreement: AgreementResult::default(),
            loads: vec![LoadResult {
                path: "/query".into(),
                concurrency: 4,
                requests_per_s: rps,
                p99_us: p99,
                ..Default::default()
            }],
        }
    }

    #[test]
    fn summaries_and_ratios_use_medians() {
        let runs: Vec<RunRecord> = [(10.0, 100.0), (30.0, 300.0), (20.0, 200.0)]
            .iter()
            .enumerate()
            .map(|(i, &(e, r))| RunRecord {
                run: i + 1,
                targets: vec![
                    target("kvindex fsync=always", e * 2.0, r * 3.0, 50.0),
                    target("dynamo", e, r, 100.0),
                ],
            })
            .collect();
        let s = summarize(&runs);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].label, "kvindex fsync=always");
        assert_eq!(s[0].ingest_events_per_s.median, 40.0);
        assert_eq!(s[0].loads[0].requests_per_s.median, 600.0);
        assert_eq!(s[0].loads[0].requests_per_s.min, 300.0);
        let r = ratios(&s);
        let get = |what: &str| r.iter().find(|x| x.what == what).map(|x| x.advantage);
        assert_eq!(get("ingest events/s"), Some(2.0));
        assert_eq!(get("/query c=4 requests/s"), Some(3.0));
        assert_eq!(get("/query c=4 p99"), Some(2.0));
    }
}
