//! Do a target's answers agree with exact scoring? After a full ingest every query of the trace
//! (or every `stride`-th) is sent to `/query_by_hash` and `/query`, and its `scores` are compared
//! with exact scoring of the simulated worker caches' final state (`workload::exact_scores`,
//! blocks × block size). A mismatch is counted per (query, route) and classified: an answer below
//! the exact one means lost blocks (Dynamo's `--threads > 1` race, SERVICE.md §13.1).

use kvindex_engine::protocol::LocalBlockHash;
use serde::{Deserialize, Serialize};

use super::http::HttpConn;
use super::trace_bodies::{ServiceWorkload, SERVICE_BLOCK_SIZE};
use super::ServiceError;
use crate::workload::exact_scores;

/// Agreement of one target with exact scoring.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgreementResult {
    /// Queries checked (each on both routes).
    pub queries: u64,
    /// (query, route) pairs whose scores differ from exact scoring.
    pub mismatches: u64,
    /// Of those, pairs where some worker scored below the exact value (lost blocks).
    pub below_exact: u64,
    /// Of those, pairs where some worker scored above the exact value or was unexpected.
    pub above_exact: u64,
    /// The first mismatch, described.
    pub first_mismatch: Option<String>,
}

/// `scores` of a ScoreResponse as sorted `(instance, dp_rank, tokens)`.
pub fn parse_scores(answer: &serde_json::Value) -> Result<Vec<(u64, u32, u64)>, String> {
    let scores = answer
        .get("scores")
        .and_then(|s| s.as_object())
        .ok_or("no `scores` object")?;
    let mut out = Vec::new();
    for (instance, ranks) in scores {
        let instance: u64 = instance
            .parse()
            .map_err(|_| format!("instance {instance}"))?;
        let ranks = ranks.as_object().ok_or("scores entry is not an object")?;
        for (dp, tokens) in ranks {
            let dp: u32 = dp.parse().map_err(|_| format!("dp_rank {dp}"))?;
            let tokens = tokens.as_u64().ok_or("score is not a u64")?;
            out.push((instance, dp, tokens));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Check every `stride`-th query of `workload` (at least 1) against the target behind `conn`.
pub async fn check(
    conn: &mut HttpConn,
    workload: &ServiceWorkload,
    stride: usize,
) -> Result<AgreementResult, ServiceError> {
    let mut result = AgreementResult::default();
    for i in (0..workload.query_locals.len()).step_by(stride.max(1)) {
        let locals: Vec<LocalBlockHash> = workload.query_locals[i]
            .iter()
            .map(|&h| LocalBlockHash(h))
            .collect();
        let mut exact: Vec<(u64, u32, u64)> = exact_scores(&workload.final_caches, &locals)
            .into_iter()
            .map(|(w, dp, blocks)| (w, dp, u64::from(blocks) * u64::from(SERVICE_BLOCK_SIZE)))
            .collect();
        exact.sort_unstable();
        result.queries += 1;
        for (path, body) in [
            ("/query_by_hash", &workload.hash_bodies[i]),
            ("/query", &workload.token_bodies[i]),
        ] {
            let context = format!("{path} query {i}");
            let answer = conn.post(path, body.clone()).await?.expect(200, &context)?;
            let got =
                parse_scores(&answer.json(&context)?).map_err(|detail| ServiceError::Answer {
                    context: context.clone(),
                    detail,
                })?;
            if got == exact {
                continue;
            }
            result.mismatches += 1;
            let score_of = |list: &[(u64, u32, u64)], w: u64, dp: u32| {
                list.iter()
                    .find(|(x, d, _)| *x == w && *d == dp)
                    .map_or(0, |e| e.2)
            };
            if exact.iter().any(|&(w, dp, s)| score_of(&got, w, dp) < s) {
                result.below_exact += 1;
            }
            if got.iter().any(|&(w, dp, s)| score_of(&exact, w, dp) < s) {
                result.above_exact += 1;
            }
            result.first_mismatch.get_or_insert_with(|| {
                let text = format!("{context}: got {got:?}, exact {exact:?}");
                text.chars().take(600).collect()
            });
        }
    }
    Ok(result)
}
