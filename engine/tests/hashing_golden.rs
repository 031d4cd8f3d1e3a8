//! Golden vectors measured on Dynamo 1.6.1 (`shared/spec/golden/hash_vectors.json`, INDEXER.md §2.5):
//! every case's local and sequence hashes must be reproduced bit for bit.
//!
//! The vector file lives in `shared/`, beside the repository root (`<repo>/../shared`).
//! `KVINDEX_SHARED_DIR` overrides that location.

use std::path::PathBuf;

use kvindex_engine::hashing::{
    compute_block_hash_for_seq, compute_seq_hash_for_block, next_sequence_hash, HashOptions,
};
use kvindex_engine::{BlockExtraInfo, LocalBlockHash};
use serde::Deserialize;

/// One golden case. `deny_unknown_fields`: a key added to the file later must be handled here,
/// not silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    tokens: Vec<u32>,
    block_size: u32,
    #[serde(default)]
    lora_name: Option<String>,
    #[serde(default)]
    cache_namespace: Option<String>,
    #[serde(default)]
    block_mm_infos: Option<Vec<Option<BlockExtraInfo>>>,
    #[serde(default)]
    is_eagle: bool,
    local_hashes: Vec<u64>,
    sequence_hashes: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    #[allow(dead_code)]
    source: String,
    cases: Vec<Case>,
}

fn golden_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("KVINDEX_SHARED_DIR") {
        return PathBuf::from(dir).join("spec/golden/hash_vectors.json");
    }
    // CARGO_MANIFEST_DIR = <repo>/engine, shared/ sits beside <repo>.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/spec/golden/hash_vectors.json")
}

fn load() -> Golden {
    let path = golden_path();
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("cannot read golden vectors at {}: {e}", path.display()));
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("cannot parse golden vectors at {}: {e}", path.display()))
}

#[test]
fn golden_vectors_all_cases() {
    let golden = load();
    assert!(
        golden.cases.len() >= 21,
        "expected at least 21 golden cases, found {}",
        golden.cases.len()
    );
    let mut failures = Vec::new();
    for case in &golden.cases {
        let opts = HashOptions {
            lora_name: case.lora_name.as_deref(),
            cache_namespace: case.cache_namespace.as_deref(),
            block_mm_infos: case.block_mm_infos.as_deref(),
            is_eagle: case.is_eagle,
        };
        let locals = compute_block_hash_for_seq(&case.tokens, case.block_size, &opts);
        let got_locals: Vec<u64> = locals.iter().map(|h| h.0).collect();
        if got_locals != case.local_hashes {
            failures.push(format!(
                "case {:?}: local hashes differ\n  expected {:?}\n  got      {:?}",
                case.name, case.local_hashes, got_locals
            ));
        }
        // The chain is checked from the *expected* locals too, so a local-hash bug does not mask
        // (or cause) a chain failure.
        let expected_locals: Vec<LocalBlockHash> = case
            .local_hashes
            .iter()
            .copied()
            .map(LocalBlockHash)
            .collect();
        let seq = compute_seq_hash_for_block(&expected_locals);
        if seq != case.sequence_hashes {
            failures.push(format!(
                "case {:?}: sequence hashes differ\n  expected {:?}\n  got      {:?}",
                case.name, case.sequence_hashes, seq
            ));
        }
        // Incremental chaining agrees with the batch function.
        let mut prev: Option<u64> = None;
        for (i, local) in expected_locals.iter().enumerate() {
            let s = match prev {
                None => local.0,
                Some(p) => next_sequence_hash(p, *local),
            };
            if case.sequence_hashes.get(i) != Some(&s) {
                failures.push(format!(
                    "case {:?}: next_sequence_hash differs at block {i}",
                    case.name
                ));
                break;
            }
            prev = Some(s);
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every option the file exercises really is exercised (guards against a file that silently lost
/// its LoRA / namespace / multimodal / eagle cases).
#[test]
fn golden_vectors_cover_every_option() {
    let golden = load();
    let c = &golden.cases;
    assert!(c
        .iter()
        .any(|x| x.lora_name.as_deref().is_some_and(|s| !s.is_empty())));
    assert!(c.iter().any(|x| x.lora_name.as_deref() == Some("")));
    assert!(c.iter().any(|x| x.cache_namespace.is_some()));
    assert!(c
        .iter()
        .any(|x| x.cache_namespace.is_some() && x.lora_name.is_some()));
    assert!(c.iter().any(|x| x.block_mm_infos.is_some()));
    assert!(c.iter().any(|x| x.is_eagle));
    assert!(c.iter().any(|x| x.local_hashes.is_empty()));
}

/// §2.5 end-to-end confirmation (approximate-mode dump, block size 4).
#[test]
fn approximate_mode_dump_chains() {
    // (tokens, lora_name, expected local hashes, expected sequence hashes)
    type DumpCase = (Vec<u32>, Option<&'static str>, Vec<u64>, Vec<u64>);
    let cases: [DumpCase; 3] = [
        (
            (1..=12).collect(),
            None,
            vec![
                14643705804678351452,
                16777012769546811212,
                483935686894639516,
            ],
            vec![
                14643705804678351452,
                4945711292740353085,
                12583592247330656132,
            ],
        ),
        (
            (0..16).collect(),
            None,
            vec![
                9143094415614847814,
                12124091508212882195,
                1088361764653601668,
                16024980976528976948,
            ],
            vec![
                9143094415614847814,
                9510318385840434533,
                16998148715716822651,
                16790386768269814709,
            ],
        ),
        (
            (0..8).collect(),
            Some("my-lora"),
            vec![11367233877683710475, 10806867458282884383],
            vec![11367233877683710475, 1095962599146825718],
        ),
    ];
    for (tokens, lora, want_local, want_seq) in cases {
        let opts = HashOptions {
            lora_name: lora,
            ..HashOptions::default()
        };
        let locals = compute_block_hash_for_seq(&tokens, 4, &opts);
        let got: Vec<u64> = locals.iter().map(|h| h.0).collect();
        assert_eq!(got, want_local, "tokens {tokens:?} lora {lora:?}");
        assert_eq!(
            compute_seq_hash_for_block(&locals),
            want_seq,
            "tokens {tokens:?}"
        );
    }
    // A seed-0 chain would differ (documented counter-example).
    let locals =
        compute_block_hash_for_seq(&(1..=12).collect::<Vec<u32>>(), 4, &HashOptions::default());
    assert_ne!(compute_seq_hash_for_block(&locals)[1], 13257339816715102022);
}
