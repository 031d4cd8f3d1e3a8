//! Token hashing compatible with Dynamo 1.6.1's KV router (INDEXER.md §2).
//!
//! The router must compute, for a request's tokens, exactly the same per-block "local" hashes that
//! the worker-side publisher put into `tokens_hash`; otherwise nothing matches. This module is
//! therefore bit-exact with Dynamo (checked against the golden vectors of §2.5):
//!
//! * local hash of a block = `xxh3_64_with_seed(token bytes ‖ sorted mm hashes, seed)`, where the
//!   seed is [`XXH3_SEED`] mixed with the LoRA name and cache namespace ([`compute_salt_seed`]);
//! * sequence (rolling) hash = `seq[0] = local[0]`,
//!   `seq[i] = xxh3_64_with_seed(le(seq[i-1]) ‖ le(local[i]), 1337)` ([`next_sequence_hash`]).

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::protocol::{BlockExtraInfo, LocalBlockHash};

/// Base seed of every XXH3 hash the router computes (Dynamo's `XXH3_SEED`). Both the block seed
/// (before LoRA/namespace mixing) and the rolling chain use it, so it is part of the wire contract.
pub const XXH3_SEED: u64 = 1337;

/// Inner seed used to hash a LoRA name before it is added to the block seed.
const LORA_INNER_SEED: u64 = 0;
/// Inner seed used to hash a cache namespace; differs from LoRA's so `lora="x"` and
/// `namespace="x"` give different block hashes.
const NAMESPACE_INNER_SEED: u64 = 1;

/// Derive the XXH3 seed for local block hashes from the request-wide identities.
///
/// Exists because Dynamo folds the LoRA adapter and the cache namespace into the *seed* (not the
/// hashed bytes): `1337 + xxh3(lora, 0) + xxh3(namespace, 1)` with wrapping addition. `None` and
/// empty strings are equivalent (no mixing), so `lora_name = ""` gives base-model hashes.
pub fn compute_salt_seed(lora_name: Option<&str>, cache_namespace: Option<&str>) -> u64 {
    let mut seed = XXH3_SEED;
    if let Some(lora) = lora_name.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(lora.as_bytes(), LORA_INNER_SEED));
    }
    if let Some(ns) = cache_namespace.filter(|s| !s.is_empty()) {
        seed = seed.wrapping_add(xxh3_64_with_seed(ns.as_bytes(), NAMESPACE_INNER_SEED));
    }
    seed
}

/// Everything besides tokens and block size that changes a block's local hash.
///
/// Exists so that callers (router queries, publishers, tests) pass the same identity the
/// publisher used in one value; `HashOptions::default()` is the plain base-model case.
#[derive(Debug, Clone, Copy, Default)]
pub struct HashOptions<'a> {
    /// LoRA adapter name; `None` or `""` means the base model.
    pub lora_name: Option<&'a str>,
    /// Cache namespace (tenant isolation); `None` or `""` means no namespace.
    pub cache_namespace: Option<&'a str>,
    /// Per-block multimodal info, indexed by block number. Missing trailing entries (a shorter
    /// slice) and `None` entries mean "no multimodal objects in that block".
    pub block_mm_infos: Option<&'a [Option<BlockExtraInfo>]>,
    /// Eagle speculative decoding: windows of `block_size + 1` tokens with stride `block_size`.
    pub is_eagle: bool,
}

/// Number of complete blocks `compute_block_hash_for_seq` produces for `len` tokens.
fn block_count(len: usize, block_size: usize, is_eagle: bool) -> usize {
    if block_size == 0 {
        0
    } else if is_eagle {
        len.saturating_sub(1) / block_size
    } else {
        len / block_size
    }
}

/// Hash a token sequence into one [`LocalBlockHash`] per complete block (INDEXER.md §2.1).
///
/// Exists because this is the router's navigation key: the tree is walked with these values, and
/// they must equal the publisher's `tokens_hash` bit for bit. Rules: tokens are hashed as u32
/// little-endian; a partial tail block is dropped; `kv_block_size == 0` yields an empty vector;
/// a block's multimodal `mm_hash` values are appended sorted ascending as u64 little-endian;
/// in Eagle mode windows are `kv_block_size + 1` tokens long with stride `kv_block_size`.
///
/// One byte buffer is reused across blocks, so the only allocation is the result vector
/// (plus one scratch vector when multimodal info is present).
pub fn compute_block_hash_for_seq(
    tokens: &[u32],
    kv_block_size: u32,
    opts: &HashOptions,
) -> Vec<LocalBlockHash> {
    let stride = kv_block_size as usize;
    let count = block_count(tokens.len(), stride, opts.is_eagle);
    if count == 0 {
        return Vec::new();
    }
    let window = if opts.is_eagle { stride + 1 } else { stride };
    let seed = compute_salt_seed(opts.lora_name, opts.cache_namespace);
    let mm_infos = opts.block_mm_infos.unwrap_or(&[]);

    let mut out = Vec::with_capacity(count);
    let token_bytes = window * std::mem::size_of::<u32>();
    let mut buf: Vec<u8> = vec![0; token_bytes];
    let mut mm_scratch: Vec<u64> = Vec::new();

    for block in 0..count {
        let start = block * stride;
        let chunk = &tokens[start..start + window];

        let has_mm = matches!(mm_infos.get(block), Some(Some(_)));
        #[cfg(target_endian = "little")]
        if !has_mm {
            // The common case: hash the tokens in place (they already are u32 little-endian),
            // no copy.
            out.push(LocalBlockHash(xxh3_64_with_seed(le_bytes(chunk), seed)));
            continue;
        }

        // Token bytes always occupy buf[..token_bytes]; multimodal bytes (if any) follow.
        buf.truncate(token_bytes);
        for (dst, tok) in buf.chunks_exact_mut(4).zip(chunk) {
            dst.copy_from_slice(&tok.to_le_bytes());
        }

        if let Some(Some(info)) = mm_infos.get(block) {
            mm_scratch.clear();
            mm_scratch.extend(info.mm_objects.iter().map(|o| o.mm_hash));
            mm_scratch.sort_unstable();
            for h in &mm_scratch {
                buf.extend_from_slice(&h.to_le_bytes());
            }
        }

        out.push(LocalBlockHash(xxh3_64_with_seed(&buf, seed)));
    }
    out
}

/// The bytes of `tokens` as stored: on a little-endian machine exactly the u32-LE encoding the
/// hash is defined over.
#[cfg(target_endian = "little")]
#[inline]
fn le_bytes(tokens: &[u32]) -> &[u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u8; the length in bytes is
    // exactly 4 × len, alignment of u8 is 1, and the lifetime is tied to `tokens`.
    unsafe {
        std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), std::mem::size_of_val(tokens))
    }
}

/// One step of the rolling sequence hash: `xxh3_64_with_seed(le(parent) ‖ le(local), 1337)`.
///
/// Exists for callers that extend a chain incrementally (approximate mode inserting one block,
/// positional lookups recomputing lazily) without building a whole vector.
#[inline]
pub fn next_sequence_hash(parent: u64, local: LocalBlockHash) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&parent.to_le_bytes());
    bytes[8..].copy_from_slice(&local.0.to_le_bytes());
    xxh3_64_with_seed(&bytes, XXH3_SEED)
}

/// Rolling sequence hashes of a chain of local hashes (INDEXER.md §2.2).
///
/// Exists because approximate/TTL mode uses these as the `block_hash` of blocks the router
/// inserts itself, and active-sequence tracking keys on them. `seq[0] = local[0]` (not hashed);
/// every later element chains on its parent with [`next_sequence_hash`]. The chain seed is always
/// 1337: LoRA and namespace only enter through the local hashes.
pub fn compute_seq_hash_for_block(locals: &[LocalBlockHash]) -> Vec<u64> {
    let mut out = Vec::with_capacity(locals.len());
    let mut iter = locals.iter();
    if let Some(first) = iter.next() {
        let mut prev = first.0;
        out.push(prev);
        for local in iter {
            prev = next_sequence_hash(prev, *local);
            out.push(prev);
        }
    }
    out
}

/// Offset added to a masked `mm_hash` to form an sglang pad value.
const MM_PAD_SHIFT: u64 = 1_000_000;
/// sglang keeps only the low 30 bits of a multimodal hash in its pad value.
const MM_PAD_MASK: u64 = (1 << 30) - 1;

/// The sglang pad-value convention for a multimodal hash: `1_000_000 + (h & (2^30 - 1))`.
///
/// Exists so that publishers and the router derive the same placeholder token for an image,
/// which keeps request-side and event-side hashes in agreement. The result always fits in a u32.
pub fn pad_value_for_mm_hash(h: u64) -> u64 {
    MM_PAD_SHIFT + (h & MM_PAD_MASK)
}

/// Map a multimodal object identifier (e.g. vLLM's `mm_hash` string) to the u64 used in hashing.
///
/// Exists because engines report multimodal identity as strings: a 64-character hex digest
/// (vLLM's canonical form) maps to the u64 of its first 16 hex characters; any other non-empty
/// string maps to `xxh3_64(s)` (seed 0); an empty string has no identity and gives `None`.
pub fn hash_mm_identifier(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        // All 64 bytes are ASCII hex, so the 16-byte prefix is a valid char boundary and parses.
        return u64::from_str_radix(&s[..16], 16).ok();
    }
    Some(xxh3_64(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::BlockMmObjectInfo;

    #[test]
    fn test_constant_matches_spec() {
        assert_eq!(
            xxh3_64_with_seed(b"test data", XXH3_SEED),
            13_226_331_709_069_118_873
        );
    }

    #[test]
    fn seed_intermediate_values() {
        assert_eq!(xxh3_64_with_seed(b"my-lora", 0), 12_827_409_268_353_071_524);
        assert_eq!(
            compute_salt_seed(Some("my-lora"), None),
            12_827_409_268_353_072_861
        );
        assert_eq!(
            xxh3_64_with_seed(b"adapter-a", 0),
            8_842_669_519_798_866_845
        );
        assert_eq!(
            compute_salt_seed(Some("adapter-a"), None),
            8_842_669_519_798_868_182
        );
        assert_eq!(
            xxh3_64_with_seed(b"adapter-b", 0),
            6_456_551_074_960_802_941
        );
        assert_eq!(xxh3_64_with_seed(b"tenant-a", 1), 1_948_188_790_972_762_749);
        assert_eq!(
            compute_salt_seed(None, Some("tenant-a")),
            1_948_188_790_972_764_086
        );
        assert_eq!(
            compute_salt_seed(Some("adapter-a"), Some("tenant-a")),
            10_790_858_310_771_630_931
        );
    }

    #[test]
    fn empty_identities_are_absent() {
        assert_eq!(compute_salt_seed(None, None), XXH3_SEED);
        assert_eq!(compute_salt_seed(Some(""), Some("")), XXH3_SEED);
        assert_ne!(
            compute_salt_seed(Some("x"), None),
            compute_salt_seed(None, Some("x"))
        );
    }

    #[test]
    fn block_size_zero_and_short_inputs() {
        let o = HashOptions::default();
        assert!(compute_block_hash_for_seq(&[1, 2, 3], 0, &o).is_empty());
        assert!(compute_block_hash_for_seq(&[], 4, &o).is_empty());
        let eagle = HashOptions {
            is_eagle: true,
            ..HashOptions::default()
        };
        assert!(compute_block_hash_for_seq(&[], 2, &eagle).is_empty());
        assert!(compute_block_hash_for_seq(&[1, 2], 2, &eagle).is_empty());
        assert_eq!(compute_block_hash_for_seq(&[1, 2, 3], 2, &eagle).len(), 1);
        assert!(compute_block_hash_for_seq(&[1, 2, 3], 0, &eagle).is_empty());
    }

    #[test]
    fn seq_chain_basics() {
        assert!(compute_seq_hash_for_block(&[]).is_empty());
        let locals = [LocalBlockHash(5), LocalBlockHash(6), LocalBlockHash(7)];
        let seq = compute_seq_hash_for_block(&locals);
        assert_eq!(seq[0], 5);
        assert_eq!(seq[1], next_sequence_hash(5, LocalBlockHash(6)));
        assert_eq!(seq[2], next_sequence_hash(seq[1], LocalBlockHash(7)));
    }

    #[test]
    fn seq_chain_end_to_end_vector() {
        // §2.5 end-to-end confirmation, tokens 1..=12 with block size 4.
        let tokens: Vec<u32> = (1..=12).collect();
        let locals = compute_block_hash_for_seq(&tokens, 4, &HashOptions::default());
        assert_eq!(
            locals,
            vec![
                LocalBlockHash(14_643_705_804_678_351_452),
                LocalBlockHash(16_777_012_769_546_811_212),
                LocalBlockHash(483_935_686_894_639_516),
            ]
        );
        assert_eq!(
            compute_seq_hash_for_block(&locals),
            vec![
                14_643_705_804_678_351_452,
                4_945_711_292_740_353_085,
                12_583_592_247_330_656_132
            ]
        );
    }

    #[test]
    fn mm_shorter_list_and_empty_objects_mean_no_mm() {
        let tokens = [0u32, 1, 2, 3];
        let base = compute_block_hash_for_seq(&tokens, 2, &HashOptions::default());
        let empty_info = [Some(BlockExtraInfo::default())];
        let with = compute_block_hash_for_seq(
            &tokens,
            2,
            &HashOptions {
                block_mm_infos: Some(&empty_info),
                ..HashOptions::default()
            },
        );
        assert_eq!(base, with);
        let info = [Some(BlockExtraInfo {
            mm_objects: vec![BlockMmObjectInfo {
                mm_hash: 42,
                offsets: vec![(0, 9)],
            }],
        })];
        let with = compute_block_hash_for_seq(
            &tokens,
            2,
            &HashOptions {
                block_mm_infos: Some(&info),
                ..HashOptions::default()
            },
        );
        assert_eq!(with[0], LocalBlockHash(6_100_948_656_312_251_355));
        assert_eq!(with[1], base[1]);
    }

    #[test]
    fn pad_value() {
        assert_eq!(pad_value_for_mm_hash(0), 1_000_000);
        assert_eq!(pad_value_for_mm_hash(u64::MAX), 1_000_000 + (1 << 30) - 1);
        assert_eq!(pad_value_for_mm_hash((1 << 30) + 5), 1_000_005);
        assert!(pad_value_for_mm_hash(u64::MAX) <= u64::from(u32::MAX));
    }

    #[test]
    fn mm_identifier() {
        assert_eq!(hash_mm_identifier(""), None);
        let digest = "00000000000000ffabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdef";
        assert_eq!(digest.len(), 64);
        assert_eq!(hash_mm_identifier(digest), Some(0xff));
        let upper = "ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789";
        assert_eq!(hash_mm_identifier(upper), Some(0xABCD_EF01_2345_6789));
        assert_eq!(hash_mm_identifier("img-1"), Some(xxh3_64(b"img-1")));
        // 64 chars but not all hex: falls back to xxh3.
        let not_hex = "g".repeat(64);
        assert_eq!(
            hash_mm_identifier(&not_hex),
            Some(xxh3_64(not_hex.as_bytes()))
        );
        // 63 hex chars: not a digest.
        let short = "a".repeat(63);
        assert_eq!(hash_mm_identifier(&short), Some(xxh3_64(short.as_bytes())));
        // Multi-byte UTF-8 of byte length 64 must not panic.
        let multi = "é".repeat(32);
        assert_eq!(multi.len(), 64);
        assert_eq!(hash_mm_identifier(&multi), Some(xxh3_64(multi.as_bytes())));
    }
}
