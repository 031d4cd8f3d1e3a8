//! Token hashing: kvindex's `compute_block_hash_for_seq` beside Dynamo 1.6.1's
//! (`dynamo_kv_router::compute_block_hash_for_seq`), base model (no LoRA, namespace, multimodal
//! or Eagle), 8192 tokens per call, block sizes 16, 64, 256 and 512. Throughput is reported in
//! tokens (criterion "elements").
//!
//! Run: `cargo bench -p kvindex-benches --bench hashing`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dynamo_kv_router::protocols::BlockHashOptions;
use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};

const TOKENS: usize = 8192;
const BLOCK_SIZES: [u32; 4] = [16, 64, 256, 512];

/// Deterministic token ids in a vocabulary-sized range (splitmix-style mixing of the index).
fn tokens() -> Vec<u32> {
    (0..TOKENS as u64)
        .map(|i| {
            let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) % 152_064) as u32
        })
        .collect()
}

fn hashing(c: &mut Criterion) {
    let tokens = tokens();
    let mut group = c.benchmark_group("hashing");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(TOKENS as u64));

    for bs in BLOCK_SIZES {
        // Both must produce the same hashes, or the comparison is meaningless.
        let ours = compute_block_hash_for_seq(&tokens, bs, &HashOptions::default());
        let theirs =
            dynamo_kv_router::compute_block_hash_for_seq(&tokens, bs, BlockHashOptions::default());
        assert_eq!(ours.len(), TOKENS / bs as usize);
        assert!(
            ours.iter().zip(&theirs).all(|(a, b)| a.0 == b.0) && ours.len() == theirs.len(),
            "kvindex and Dynamo disagree at block size {bs}"
        );

        group.bench_with_input(BenchmarkId::new("kvindex", bs), &bs, |b, &bs| {
            b.iter(|| compute_block_hash_for_seq(black_box(&tokens), bs, &HashOptions::default()))
        });
        group.bench_with_input(BenchmarkId::new("dynamo", bs), &bs, |b, &bs| {
            b.iter(|| {
                dynamo_kv_router::compute_block_hash_for_seq(
                    black_box(&tokens),
                    bs,
                    BlockHashOptions::default(),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);
