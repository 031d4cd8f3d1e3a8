//! Wire codec tests (INDEXER.md §1.2): round trips in JSON and named-field msgpack, Dynamo's
//! dump format byte for byte, one test per measured tolerance rule, residency-domain
//! classification, and hostile input (must return `Err`, never panic).

use kvindex_engine::codec::{
    decode_kv_cache_event_json, decode_kv_cache_event_msgpack, decode_router_event_json,
    decode_router_event_msgpack, decode_router_events_json, decode_router_events_msgpack,
    encode_kv_cache_event_json, encode_kv_cache_event_msgpack, encode_router_event_json,
    encode_router_event_msgpack, encode_router_events_json, encode_router_events_msgpack,
};
use kvindex_engine::protocol::check_device_worker_domain;
use kvindex_engine::{
    BlockExtraInfo, BlockMmObjectInfo, DecodeError, ExternalSequenceBlockHash, KvCacheEvent,
    KvCacheEventData, KvCacheEventError, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, LocalBlockHash, ResidencyDomain, RouterEvent, StorageTier,
};
use proptest::prelude::*;

/// The dump example of INDEXER.md §1.2, verbatim.
const DUMP_EXAMPLE: &str = r#"{"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":0,"data":{"stored":{"parent_hash":null,"start_position":null,"blocks":[{"block_hash":1,"tokens_hash":100,"mm_extra_info":null},{"block_hash":2,"tokens_hash":200,"mm_extra_info":null}]}},"dp_rank":0}}"#;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn block(ext: u64, local: u64) -> KvCacheStoredBlockData {
    KvCacheStoredBlockData {
        block_hash: ExternalSequenceBlockHash(ext),
        tokens_hash: LocalBlockHash(local),
        mm_extra_info: None,
    }
}

fn stored(parent: Option<u64>, blocks: Vec<KvCacheStoredBlockData>) -> KvCacheEventData {
    KvCacheEventData::Stored(KvCacheStoreData {
        parent_hash: parent.map(ExternalSequenceBlockHash),
        start_position: None,
        blocks,
    })
}

fn ev(event_id: u64, data: KvCacheEventData, dp_rank: u32) -> KvCacheEvent {
    KvCacheEvent {
        event_id,
        data,
        dp_rank,
    }
}

fn router(worker_id: u64, event: KvCacheEvent) -> RouterEvent {
    RouterEvent::new(worker_id, event)
}

/// One example of every event shape the wire carries.
fn all_variants() -> Vec<RouterEvent> {
    let mm = BlockExtraInfo {
        mm_objects: vec![
            BlockMmObjectInfo {
                mm_hash: 42,
                offsets: vec![(0, 16), (20, 31)],
            },
            BlockMmObjectInfo {
                mm_hash: u64::MAX,
                offsets: vec![],
            },
        ],
    };
    let mut with_mm = block(11, 111);
    with_mm.mm_extra_info = Some(mm);
    let with_start = KvCacheEventData::Stored(KvCacheStoreData {
        parent_hash: Some(ExternalSequenceBlockHash(5)),
        start_position: Some(64),
        blocks: vec![block(6, 66)],
    });
    let mut out = vec![
        router(1, ev(0, stored(None, vec![block(1, 10), block(2, 20)]), 0)),
        router(2, ev(1, stored(Some(1), vec![with_mm]), 3)),
        router(3, ev(2, with_start, 0)),
        router(
            4,
            ev(
                u64::MAX,
                KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: vec![
                        ExternalSequenceBlockHash(1),
                        ExternalSequenceBlockHash(u64::MAX),
                    ],
                }),
                u32::MAX,
            ),
        ),
        router(u64::MAX, ev(4, KvCacheEventData::Cleared, 1)),
        router(
            6,
            ev(
                5,
                KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: vec![],
                }),
                0,
            ),
        ),
        router(7, ev(6, stored(None, vec![]), 0)),
    ];
    let domains = [
        Some(ResidencyDomain::Worker),
        Some(ResidencyDomain::CacheOwner),
        Some(ResidencyDomain::Unknown("gpu-pool".to_owned())),
        Some(ResidencyDomain::Invalid),
    ];
    for (i, d) in domains.into_iter().enumerate() {
        let mut e = router(100 + i as u64, ev(7, stored(None, vec![block(9, 90)]), 0));
        e.residency_domain = d;
        out.push(e);
    }
    for tier in [
        StorageTier::HostPinned,
        StorageTier::Disk,
        StorageTier::External,
    ] {
        let mut e = router(200, ev(8, KvCacheEventData::Cleared, 0));
        e.storage_tier = tier;
        out.push(e);
    }
    out
}

fn kv_json(s: &str) -> Result<KvCacheEvent, DecodeError> {
    decode_kv_cache_event_json(s.as_bytes())
}

fn router_json(s: &str) -> Result<RouterEvent, DecodeError> {
    decode_router_event_json(s.as_bytes())
}

/// The error text of a decode that must fail.
fn err_text<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> String {
    match r {
        Ok(v) => panic!("expected a decode error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

/// Transcode a JSON document to named-field msgpack (maps with string keys, compact ints).
fn json_to_msgpack(s: &str) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_str(s).expect("test JSON is valid");
    rmp_serde::to_vec_named(&v).expect("serde_json::Value encodes")
}

/// A minimal hand-written msgpack writer, to produce exact markers (int widths, nil, bad UTF-8)
/// that no serializer would choose.
#[derive(Default)]
struct Mp(Vec<u8>);

impl Mp {
    fn map(mut self, n: u8) -> Self {
        assert!(n < 16);
        self.0.push(0x80 | n);
        self
    }
    fn arr(mut self, n: u8) -> Self {
        assert!(n < 16);
        self.0.push(0x90 | n);
        self
    }
    fn s(mut self, v: &str) -> Self {
        assert!(v.len() < 32);
        self.0.push(0xa0 | v.len() as u8);
        self.0.extend_from_slice(v.as_bytes());
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn nil(self) -> Self {
        self.raw(&[0xc0])
    }
    fn fix(self, v: u8) -> Self {
        assert!(v < 128);
        self.raw(&[v])
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Named-field msgpack of a `KvCacheEvent` `{"event_id":1,"data":{"removed":{"block_hashes":[<hash>]}}}`
/// whose single hash is written with the raw marker bytes given.
fn mp_removed_with_hash(hash_marker: &[u8]) -> Vec<u8> {
    Mp::default()
        .map(2)
        .s("event_id")
        .fix(1)
        .s("data")
        .map(1)
        .s("removed")
        .map(1)
        .s("block_hashes")
        .arr(1)
        .raw(hash_marker)
        .done()
}

fn removed_hashes(e: &KvCacheEvent) -> Vec<u64> {
    match &e.data {
        KvCacheEventData::Removed(r) => r.block_hashes.iter().map(|h| h.0).collect(),
        other => panic!("expected removed, got {other:?}"),
    }
}

fn stored_data(e: &KvCacheEvent) -> &KvCacheStoreData {
    match &e.data {
        KvCacheEventData::Stored(s) => s,
        other => panic!("expected stored, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn roundtrip_json_every_variant() {
    for e in all_variants() {
        let s = encode_router_event_json(&e).expect("encode");
        let back = decode_router_event_json(s.as_bytes()).expect(&s);
        assert_eq!(back, e, "json: {s}");
        // Encoding is deterministic: re-encoding the decoded value gives the same text.
        assert_eq!(encode_router_event_json(&back).expect("encode"), s);
    }
}

#[test]
fn roundtrip_msgpack_every_variant() {
    for e in all_variants() {
        let b = encode_router_event_msgpack(&e).expect("encode");
        let back = decode_router_event_msgpack(&b).expect("decode");
        assert_eq!(back, e);
        // Named fields: the field names are on the wire.
        assert!(b.windows(9).any(|w| w == b"worker_id"));
    }
}

#[test]
fn roundtrip_kv_cache_event_json_and_msgpack() {
    for e in all_variants() {
        let inner = e.event;
        let s = encode_kv_cache_event_json(&inner).expect("encode");
        assert_eq!(kv_json(&s).expect(&s), inner);
        let b = encode_kv_cache_event_msgpack(&inner).expect("encode");
        assert_eq!(decode_kv_cache_event_msgpack(&b).expect("decode"), inner);
    }
}

#[test]
fn roundtrip_batches_json_and_msgpack() {
    let events = all_variants();
    let s = encode_router_events_json(&events).expect("encode");
    assert!(s.starts_with('['));
    assert_eq!(
        decode_router_events_json(s.as_bytes()).expect("decode"),
        events
    );
    let b = encode_router_events_msgpack(&events).expect("encode");
    assert_eq!(decode_router_events_msgpack(&b).expect("decode"), events);
    // Empty batches.
    assert_eq!(decode_router_events_json(b"[]").expect("decode"), vec![]);
    let empty = encode_router_events_msgpack(&[]).expect("encode");
    assert_eq!(empty, vec![0x90]);
    assert_eq!(
        decode_router_events_msgpack(&empty).expect("decode"),
        vec![]
    );
}

#[test]
fn roundtrip_mm_extra_info_and_start_position() {
    let s = r#"{"event_id":3,"data":{"stored":{"parent_hash":9,"start_position":128,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":{"mm_objects":[{"mm_hash":42,"offsets":[[0,5],[7,9]]}]}}]}}}"#;
    let e = kv_json(s).expect("decode");
    let st = stored_data(&e);
    assert_eq!(st.parent_hash, Some(ExternalSequenceBlockHash(9)));
    assert_eq!(st.start_position, Some(128));
    let mm = st.blocks[0].mm_extra_info.as_ref().expect("mm info");
    assert_eq!(mm.mm_objects[0].mm_hash, 42);
    assert_eq!(mm.mm_objects[0].offsets, vec![(0, 5), (7, 9)]);
    let b = encode_kv_cache_event_msgpack(&e).expect("encode");
    assert_eq!(decode_kv_cache_event_msgpack(&b).expect("decode"), e);
    let back = encode_kv_cache_event_json(&e).expect("encode");
    assert_eq!(kv_json(&back).expect("decode"), e);
}

#[test]
fn dp_rank_defaults_to_zero_json_and_msgpack() {
    let s = r#"{"worker_id":1,"event":{"event_id":1,"data":"cleared"}}"#;
    let e = router_json(s).expect("decode");
    assert_eq!(e.event.dp_rank, 0);
    assert_eq!(e.storage_tier, StorageTier::Device);
    assert_eq!(e.residency_domain, None);
    let m = decode_router_event_msgpack(&json_to_msgpack(s)).expect("decode");
    assert_eq!(m, e);
    // An explicit dp_rank is kept.
    let e = kv_json(r#"{"event_id":1,"data":"cleared","dp_rank":5}"#).expect("decode");
    assert_eq!(e.dp_rank, 5);
}

#[test]
fn dump_example_parses_and_reencodes_identically() {
    let e = router_json(DUMP_EXAMPLE).expect("dump example decodes");
    assert_eq!(e.worker_id, 7);
    assert_eq!(e.storage_tier, StorageTier::Device);
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Worker));
    assert_eq!(e.event.event_id, 0);
    assert_eq!(e.event.dp_rank, 0);
    assert_eq!(
        e.event.data,
        stored(None, vec![block(1, 100), block(2, 200)])
    );
    assert_eq!(e.classify(), Ok(()));
    assert_eq!(encode_router_event_json(&e).expect("encode"), DUMP_EXAMPLE);
    // The same event built in code encodes to the same string.
    let mut built = router(
        7,
        ev(0, stored(None, vec![block(1, 100), block(2, 200)]), 0),
    );
    built.residency_domain = Some(ResidencyDomain::Worker);
    assert_eq!(
        encode_router_event_json(&built).expect("encode"),
        DUMP_EXAMPLE
    );
    // And a batch of dump strings.
    let batch = format!("[{DUMP_EXAMPLE},{DUMP_EXAMPLE}]");
    let events = decode_router_events_json(batch.as_bytes()).expect("batch");
    assert_eq!(encode_router_events_json(&events).expect("encode"), batch);
}

#[test]
fn absent_residency_domain_is_omitted_when_encoding() {
    let e = router(1, ev(0, KvCacheEventData::Cleared, 0));
    let s = encode_router_event_json(&e).expect("encode");
    assert_eq!(
        s,
        r#"{"worker_id":1,"storage_tier":"device","event":{"event_id":0,"data":"cleared","dp_rank":0}}"#
    );
}

// ---------------------------------------------------------------------------------------------
// Cleared: unit form and map-with-null form
// ---------------------------------------------------------------------------------------------

#[test]
fn cleared_unit_string_parses() {
    let e = kv_json(r#"{"event_id":1,"data":"cleared"}"#).expect("decode");
    assert_eq!(e.data, KvCacheEventData::Cleared);
}

#[test]
fn cleared_map_with_null_parses() {
    let e = kv_json(r#"{"event_id":1,"data":{"cleared":null}}"#).expect("decode");
    assert_eq!(e.data, KvCacheEventData::Cleared);
}

#[test]
fn cleared_both_forms_parse_in_msgpack() {
    for s in [
        r#"{"event_id":1,"data":"cleared"}"#,
        r#"{"event_id":1,"data":{"cleared":null}}"#,
    ] {
        let e = decode_kv_cache_event_msgpack(&json_to_msgpack(s)).expect(s);
        assert_eq!(e.data, KvCacheEventData::Cleared, "{s}");
    }
}

#[test]
fn cleared_encodes_as_plain_string() {
    let s = encode_kv_cache_event_json(&ev(1, KvCacheEventData::Cleared, 0)).expect("encode");
    assert_eq!(s, r#"{"event_id":1,"data":"cleared","dp_rank":0}"#);
}

// ---------------------------------------------------------------------------------------------
// Tolerance rules of §1.2, one test per measured bullet (JSON)
// ---------------------------------------------------------------------------------------------

#[test]
fn tolerance_negative_hash_rejected_with_serde_message() {
    let msg = err_text(kv_json(
        r#"{"event_id":1,"data":{"removed":{"block_hashes":[-5]}}}"#,
    ));
    assert!(
        msg.contains("invalid value: integer `-5`, expected u64"),
        "{msg}"
    );
    assert!(
        msg.starts_with("Failed to deserialize KvCacheEvent: "),
        "{msg}"
    );
    // Every hash position is unsigned-only.
    for s in [
        r#"{"event_id":1,"data":{"stored":{"parent_hash":-1,"blocks":[]}}}"#,
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":-1,"tokens_hash":1}]}}}"#,
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1,"tokens_hash":-1}]}}}"#,
        r#"{"event_id":-1,"data":"cleared"}"#,
    ] {
        let msg = err_text(kv_json(s));
        assert!(msg.contains("expected u64"), "{s}: {msg}");
    }
}

#[test]
fn tolerance_string_hash_rejected() {
    let msg = err_text(kv_json(
        r#"{"event_id":1,"data":{"removed":{"block_hashes":["11"]}}}"#,
    ));
    assert!(msg.contains("invalid type: string \"11\""), "{msg}");
}

#[test]
fn tolerance_float_hash_rejected() {
    let msg = err_text(kv_json(
        r#"{"event_id":1,"data":{"removed":{"block_hashes":[11.0]}}}"#,
    ));
    assert!(msg.contains("invalid type: floating point"), "{msg}");
    // A float tokens_hash too.
    assert!(kv_json(
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1,"tokens_hash":1e3}]}}}"#
    )
    .is_err());
}

#[test]
fn tolerance_u64_max_hash_accepted() {
    let e = kv_json(
        r#"{"event_id":18446744073709551615,"data":{"stored":{"parent_hash":18446744073709551615,"blocks":[{"block_hash":18446744073709551615,"tokens_hash":18446744073709551615}]}}}"#,
    )
    .expect("2^64-1 is a valid hash");
    assert_eq!(e.event_id, u64::MAX);
    let st = stored_data(&e);
    assert_eq!(st.parent_hash, Some(ExternalSequenceBlockHash(u64::MAX)));
    assert_eq!(st.blocks[0].block_hash.0, u64::MAX);
    assert_eq!(st.blocks[0].tokens_hash.0, u64::MAX);
}

#[test]
fn tolerance_hash_above_u64_max_rejected() {
    for big in [
        "18446744073709551616",
        "99999999999999999999999999",
        "1e400",
    ] {
        let s = format!(r#"{{"event_id":1,"data":{{"removed":{{"block_hashes":[{big}]}}}}}}"#);
        assert!(kv_json(&s).is_err(), "{big}");
    }
}

#[test]
fn tolerance_variant_names_case_sensitive() {
    let msg = err_text(kv_json(r#"{"event_id":1,"data":{"Stored":{"blocks":[]}}}"#));
    assert!(
        msg.contains("unknown variant `Stored`, expected one of `stored`, `removed`, `cleared`"),
        "{msg}"
    );
    for s in [
        r#"{"event_id":1,"data":"Cleared"}"#,
        r#"{"event_id":1,"data":"CLEARED"}"#,
        r#"{"event_id":1,"data":{"Removed":{"block_hashes":[]}}}"#,
    ] {
        assert!(
            err_text(kv_json(s)).contains("unknown variant"),
            "{s} must be rejected"
        );
    }
    // storage_tier is snake_case and case-sensitive too.
    assert!(router_json(
        r#"{"worker_id":1,"storage_tier":"Device","event":{"event_id":1,"data":"cleared"}}"#
    )
    .is_err());
}

#[test]
fn tolerance_event_id_required() {
    let msg = err_text(kv_json(r#"{"data":"cleared","dp_rank":0}"#));
    assert!(msg.contains("missing field `event_id`"), "{msg}");
}

#[test]
fn tolerance_tokens_hash_required() {
    let msg = err_text(kv_json(
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1}]}}}"#,
    ));
    assert!(msg.contains("missing field `tokens_hash`"), "{msg}");
}

#[test]
fn tolerance_block_hash_required() {
    let msg = err_text(kv_json(
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"tokens_hash":1}]}}}"#,
    ));
    assert!(msg.contains("missing field `block_hash`"), "{msg}");
}

#[test]
fn tolerance_optional_fields_default() {
    // dp_rank, parent_hash, start_position and mm_extra_info may all be missing.
    let e = kv_json(
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1,"tokens_hash":2}]}}}"#,
    )
    .expect("optional fields missing");
    assert_eq!(e.dp_rank, 0);
    let st = stored_data(&e);
    assert_eq!(st.parent_hash, None);
    assert_eq!(st.start_position, None);
    assert_eq!(st.blocks[0].mm_extra_info, None);
    // And explicit nulls mean the same.
    let e2 = kv_json(r#"{"event_id":1,"data":{"stored":{"parent_hash":null,"start_position":null,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":null}]}}}"#)
        .expect("explicit nulls");
    assert_eq!(e, e2);
}

#[test]
fn tolerance_unknown_fields_ignored_at_every_level() {
    let s = r#"{"worker_id":3,"zz":[1,{"a":null}],"storage_tier":"device","state_source":{"kind":"live"},
        "event":{"x":1,"event_id":4,"data":{"stored":{"y":"z","parent_hash":null,"blocks":[
            {"block_hash":1,"tokens_hash":2,"extra":true,
             "mm_extra_info":{"q":1,"mm_objects":[{"mm_hash":5,"offsets":[],"w":-1}]}}]}},"dp_rank":1,"extra":1.5}}"#;
    let e = router_json(s).expect("unknown fields ignored");
    assert_eq!(e.worker_id, 3);
    assert_eq!(e.event.event_id, 4);
    assert_eq!(e.event.dp_rank, 1);
    let st = stored_data(&e.event);
    assert_eq!(
        st.blocks[0]
            .mm_extra_info
            .as_ref()
            .map(|m| m.mm_objects[0].mm_hash),
        Some(5)
    );
    // In the removed payload and at the top of a KvCacheEvent too.
    let e = kv_json(
        r#"{"event_id":1,"unknown":{},"data":{"removed":{"block_hashes":[7],"why":"lru"}}}"#,
    )
    .expect("unknown fields ignored");
    assert_eq!(removed_hashes(&e), vec![7]);
    // And in msgpack.
    let m = decode_router_event_msgpack(&json_to_msgpack(s)).expect("msgpack unknown fields");
    assert_eq!(m, router_json(s).expect("json"));
}

#[test]
fn tolerance_router_event_into_kv_cache_event_decoder_fails() {
    let msg = err_text(kv_json(DUMP_EXAMPLE));
    assert!(msg.contains("missing field `event_id`"), "{msg}");
}

#[test]
fn tolerance_kv_cache_event_into_router_event_decoder_fails() {
    let msg = err_text(router_json(r#"{"event_id":1,"data":"cleared"}"#));
    assert!(msg.contains("missing field `worker_id`"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Residency domain and storage tier classification
// ---------------------------------------------------------------------------------------------

fn router_with_domain(domain_json: Option<&str>) -> RouterEvent {
    let dom = domain_json
        .map(|d| format!(r#""residency_domain":{d},"#))
        .unwrap_or_default();
    let s = format!(r#"{{"worker_id":1,{dom}"event":{{"event_id":1,"data":"cleared"}}}}"#);
    let e = router_json(&s).expect(&s);
    let m = decode_router_event_msgpack(&json_to_msgpack(&s)).expect(&s);
    assert_eq!(e, m, "json and msgpack agree for {s}");
    e
}

#[test]
fn residency_missing_is_none_and_accepted() {
    let e = router_with_domain(None);
    assert_eq!(e.residency_domain, None);
    assert_eq!(e.classify(), Ok(()));
    assert_eq!(check_device_worker_domain(&e), Ok(()));
}

#[test]
fn residency_worker_accepted() {
    let e = router_with_domain(Some(r#""worker""#));
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Worker));
    assert_eq!(e.classify(), Ok(()));
}

#[test]
fn residency_cache_owner_rejected_on_device() {
    let e = router_with_domain(Some(r#""cache_owner""#));
    assert_eq!(e.residency_domain, Some(ResidencyDomain::CacheOwner));
    assert_eq!(
        e.classify(),
        Err(KvCacheEventError::UnsupportedResidencyDomain)
    );
}

#[test]
fn residency_unknown_string_is_unknown_and_rejected() {
    for (raw, name) in [
        (r#""Worker""#, "Worker"),
        (r#""gpu""#, "gpu"),
        (r#""""#, ""),
    ] {
        let e = router_with_domain(Some(raw));
        assert_eq!(
            e.residency_domain,
            Some(ResidencyDomain::Unknown(name.to_owned()))
        );
        assert_eq!(
            check_device_worker_domain(&e),
            Err(KvCacheEventError::UnsupportedResidencyDomain)
        );
    }
}

#[test]
fn residency_explicit_null_is_invalid_not_absent() {
    let e = router_with_domain(Some("null"));
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Invalid));
    assert_eq!(
        e.classify(),
        Err(KvCacheEventError::UnsupportedResidencyDomain)
    );
    // Re-encoding keeps the explicit null (it is not dropped as "absent").
    let s = encode_router_event_json(&e).expect("encode");
    assert!(s.contains(r#""residency_domain":null"#), "{s}");
    assert_eq!(router_json(&s).expect("decode"), e);
}

#[test]
fn residency_non_string_values_are_invalid() {
    for raw in [
        "1",
        "-1",
        "1.5",
        "true",
        "false",
        "[]",
        r#"["worker"]"#,
        "{}",
        r#"{"worker":1}"#,
    ] {
        let e = router_with_domain(Some(raw));
        assert_eq!(e.residency_domain, Some(ResidencyDomain::Invalid), "{raw}");
        assert_eq!(
            e.classify(),
            Err(KvCacheEventError::UnsupportedResidencyDomain),
            "{raw}"
        );
    }
}

#[test]
fn residency_msgpack_nil_is_invalid() {
    let b = Mp::default()
        .map(3)
        .s("worker_id")
        .fix(1)
        .s("residency_domain")
        .nil()
        .s("event")
        .map(2)
        .s("event_id")
        .fix(1)
        .s("data")
        .s("cleared")
        .done();
    let e = decode_router_event_msgpack(&b).expect("decode");
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Invalid));
    assert_eq!(
        e.classify(),
        Err(KvCacheEventError::UnsupportedResidencyDomain)
    );
}

#[test]
fn non_device_storage_tier_rejected() {
    for tier in ["host_pinned", "disk", "external"] {
        for dom in ["", r#""residency_domain":"worker","#] {
            let s = format!(
                r#"{{"worker_id":1,"storage_tier":"{tier}",{dom}"event":{{"event_id":1,"data":"cleared"}}}}"#
            );
            let e = router_json(&s).expect(&s);
            assert_ne!(e.storage_tier, StorageTier::Device);
            assert_eq!(
                e.classify(),
                Err(KvCacheEventError::UnsupportedResidencyDomain),
                "{s}"
            );
        }
    }
    let s = r#"{"worker_id":1,"storage_tier":"device","event":{"event_id":1,"data":"cleared"}}"#;
    assert_eq!(router_json(s).expect("decode").classify(), Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Msgpack-specific tolerance
// ---------------------------------------------------------------------------------------------

#[test]
fn msgpack_hash_accepts_every_unsigned_width() {
    let cases: [(&[u8], u64); 9] = [
        (&[0x05], 5),                              // positive fixint
        (&[0xcc, 0xff], 255),                      // uint8
        (&[0xcd, 0x01, 0x00], 256),                // uint16
        (&[0xce, 0x00, 0x01, 0x00, 0x00], 65_536), // uint32
        (&[0xcf, 0, 0, 0, 0, 0, 0, 0, 0x07], 7),   // uint64 holding a small value
        (
            &[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            u64::MAX,
        ), // uint64 max
        (&[0xd0, 0x05], 5),                        // int8, non-negative
        (&[0xd2, 0x00, 0x00, 0x01, 0x00], 256),    // int32, non-negative
        (
            &[0xd3, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            i64::MAX as u64,
        ), // int64
    ];
    for (marker, want) in cases {
        let e = decode_kv_cache_event_msgpack(&mp_removed_with_hash(marker))
            .unwrap_or_else(|err| panic!("marker {marker:02x?}: {err}"));
        assert_eq!(removed_hashes(&e), vec![want], "marker {marker:02x?}");
    }
}

#[test]
fn msgpack_negative_hash_rejected() {
    for marker in [
        &[0xfb][..],                                             // negative fixint -5
        &[0xd0, 0xfb],                                           // int8 -5
        &[0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfb], // int64 -5
    ] {
        let msg = err_text(decode_kv_cache_event_msgpack(&mp_removed_with_hash(marker)));
        assert!(
            msg.contains("invalid value: integer `-5`, expected u64"),
            "{marker:02x?}: {msg}"
        );
    }
}

#[test]
fn msgpack_float_string_bool_nil_hash_rejected() {
    for marker in [
        &[0xcb, 0x40, 0x26, 0, 0, 0, 0, 0, 0][..], // float64 11.0
        &[0xca, 0x41, 0x30, 0, 0],                 // float32 11.0
        &[0xa2, b'1', b'1'],                       // "11"
        &[0xc3],                                   // true
        &[0xc0],                                   // nil
        &[0xc4, 0x01, 0x05],                       // bin8
    ] {
        assert!(
            decode_kv_cache_event_msgpack(&mp_removed_with_hash(marker)).is_err(),
            "{marker:02x?} must be rejected"
        );
    }
}

#[test]
fn msgpack_variant_names_case_sensitive() {
    let b = json_to_msgpack(r#"{"event_id":1,"data":{"Stored":{"blocks":[]}}}"#);
    let msg = err_text(decode_kv_cache_event_msgpack(&b));
    assert!(msg.contains("unknown variant `Stored`"), "{msg}");
}

#[test]
fn msgpack_missing_required_fields_rejected() {
    let msg = err_text(decode_kv_cache_event_msgpack(&json_to_msgpack(
        r#"{"data":"cleared"}"#,
    )));
    assert!(msg.contains("missing field `event_id`"), "{msg}");
    let msg = err_text(decode_kv_cache_event_msgpack(&json_to_msgpack(
        r#"{"event_id":1,"data":{"stored":{"blocks":[{"block_hash":1}]}}}"#,
    )));
    assert!(msg.contains("missing field `tokens_hash`"), "{msg}");
}

#[test]
fn msgpack_batch_is_array_of_router_events() {
    let events = all_variants();
    let b = encode_router_events_msgpack(&events).expect("encode");
    // Array header, then each element is exactly the single-event encoding.
    let mut concatenated = Vec::new();
    for e in &events {
        concatenated.extend(encode_router_event_msgpack(e).expect("encode"));
    }
    let header = if events.len() < 16 { 1 } else { 3 };
    assert_eq!(&b[header..], &concatenated[..]);
    assert_eq!(b.len(), header + concatenated.len());
    // A single event is not a batch, and a batch is not a single event.
    assert!(
        decode_router_events_msgpack(&encode_router_event_msgpack(&events[0]).expect("e")).is_err()
    );
    assert!(decode_router_event_msgpack(&b).is_err());
}

#[test]
fn msgpack_trailing_bytes_ignored_like_dynamo() {
    // rmp_serde::from_slice (Dynamo's decoder) stops after the first value.
    let mut b = encode_router_event_msgpack(&all_variants()[0]).expect("encode");
    b.extend_from_slice(&[0xc1, 0xff, 0x00]);
    assert_eq!(
        decode_router_event_msgpack(&b).expect("decode"),
        all_variants()[0]
    );
}

#[test]
fn json_trailing_garbage_rejected() {
    let s = format!("{DUMP_EXAMPLE} x");
    assert!(decode_router_event_json(s.as_bytes()).is_err());
    let s = format!("{DUMP_EXAMPLE}{DUMP_EXAMPLE}");
    assert!(decode_router_event_json(s.as_bytes()).is_err());
}

// ---------------------------------------------------------------------------------------------
// Hostile input: Err, never panic
// ---------------------------------------------------------------------------------------------

type Decoder = fn(&[u8]) -> Result<(), DecodeError>;

fn decoders() -> [(&'static str, Decoder); 6] {
    [
        ("kv_json", |b| decode_kv_cache_event_json(b).map(drop)),
        ("router_json", |b| decode_router_event_json(b).map(drop)),
        ("router_batch_json", |b| {
            decode_router_events_json(b).map(drop)
        }),
        ("kv_msgpack", |b| decode_kv_cache_event_msgpack(b).map(drop)),
        ("router_msgpack", |b| {
            decode_router_event_msgpack(b).map(drop)
        }),
        ("router_batch_msgpack", |b| {
            decode_router_events_msgpack(b).map(drop)
        }),
    ]
}

fn all_fail(input: &[u8], what: &str) {
    for (name, dec) in decoders() {
        assert!(dec(input).is_err(), "{name} accepted {what}");
    }
}

#[test]
fn bad_empty_input() {
    all_fail(b"", "empty input");
}

#[test]
fn bad_truncated_json() {
    let full = DUMP_EXAMPLE.as_bytes();
    for cut in 0..full.len() {
        let r = decode_router_event_json(&full[..cut]);
        assert!(r.is_err(), "prefix of length {cut} accepted");
    }
    let batch = format!("[{DUMP_EXAMPLE}]");
    for cut in 0..batch.len() {
        assert!(decode_router_events_json(&batch.as_bytes()[..cut]).is_err());
    }
}

#[test]
fn bad_truncated_msgpack() {
    for e in all_variants() {
        let full = encode_router_event_msgpack(&e).expect("encode");
        for cut in 0..full.len() {
            assert!(
                decode_router_event_msgpack(&full[..cut]).is_err(),
                "prefix {cut}/{} of {e:?} accepted",
                full.len()
            );
        }
    }
    let batch = encode_router_events_msgpack(&all_variants()).expect("encode");
    for cut in 0..batch.len() {
        assert!(decode_router_events_msgpack(&batch[..cut]).is_err());
    }
}

#[test]
fn bad_garbage_bytes() {
    for g in [
        &b"\x00\x01\x02\x03"[..],
        b"hello world",
        b"\xff\xfe\xfd",
        b"{{{{",
        b"]]]]",
        b"null",
        b"true",
        b"42",
        b"\"cleared\"",
        b"{}",
        b"[{}]",
        b"\xc1",                 // msgpack "never used" marker
        b"\xdd\xff\xff\xff\xff", // array32 claiming 4G elements, no data
        b"\xdf\xff\xff\xff\xff", // map32 claiming 4G entries, no data
        b"\xdb\xff\xff\xff\xff", // str32 claiming 4 GiB, no data
        b"\xc6\xff\xff\xff\xff", // bin32 claiming 4 GiB, no data
    ] {
        all_fail(g, &format!("{g:02x?}"));
    }
}

#[test]
fn bad_deep_nesting_json() {
    let deep = "[".repeat(10_000);
    all_fail(deep.as_bytes(), "10k '['");
    let deep_obj = r#"{"a":"#.repeat(10_000);
    all_fail(deep_obj.as_bytes(), "10k nested objects");
    // Deep nesting hidden inside fields that are otherwise tolerated: serde_json skips ignored
    // values without recursing, so these decode (no stack risk); the domain is merely Invalid.
    let closed = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let s =
        format!(r#"{{"worker_id":1,"junk":{closed},"event":{{"event_id":1,"data":"cleared"}}}}"#);
    assert_eq!(router_json(&s).expect("deep junk").residency_domain, None);
    let s = format!(
        r#"{{"worker_id":1,"residency_domain":{closed},"event":{{"event_id":1,"data":"cleared"}}}}"#
    );
    let e = router_json(&s).expect("deep residency_domain");
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Invalid));
    assert!(e.classify().is_err());
    // Unterminated, the same inputs fail.
    let open = "[".repeat(10_000);
    for field in ["junk", "residency_domain"] {
        let s = format!(r#"{{"worker_id":1,"{field}":{open}"#);
        assert!(router_json(&s).is_err(), "unterminated deep {field}");
    }
}

#[test]
fn bad_deep_nesting_msgpack() {
    let deep = vec![0x91u8; 10_000]; // fixarray(1) × 10k, never terminated
    all_fail(&deep, "10k nested msgpack arrays");
    let mut closed = vec![0x91u8; 10_000];
    closed.push(0xc0); // properly terminated by a nil
    all_fail(&closed, "10k nested msgpack arrays ending in nil");
    let deep_map: Vec<u8> = [0x81u8, 0xa1, b'a'].repeat(10_000);
    all_fail(&deep_map, "10k nested msgpack maps");
    // Deep value inside an unknown field and inside residency_domain.
    for field in ["junk", "residency_domain"] {
        let b = Mp::default()
            .map(3)
            .s("worker_id")
            .fix(1)
            .s(field)
            .raw(&closed)
            .s("event")
            .map(2)
            .s("event_id")
            .fix(1)
            .s("data")
            .s("cleared")
            .done();
        assert!(decode_router_event_msgpack(&b).is_err(), "deep {field}");
    }
    // Moderate nesting in an unknown field is fine.
    let mut ok = Mp::default().map(3).s("worker_id").fix(1).s("junk").done();
    ok.extend(vec![0x91u8; 50]);
    ok.push(0xc0);
    ok.extend(
        Mp::default()
            .s("event")
            .map(2)
            .s("event_id")
            .fix(1)
            .s("data")
            .s("cleared")
            .done(),
    );
    assert!(decode_router_event_msgpack(&ok).is_ok());
}

#[test]
fn bad_huge_numbers() {
    for s in [
        r#"{"event_id":18446744073709551616,"data":"cleared"}"#,
        r#"{"event_id":1e400,"data":"cleared"}"#,
        r#"{"event_id":123456789012345678901234567890,"data":"cleared"}"#,
        r#"{"event_id":1,"data":"cleared","dp_rank":4294967296}"#,
        r#"{"event_id":1,"data":{"stored":{"start_position":4294967296,"blocks":[]}}}"#,
    ] {
        assert!(kv_json(s).is_err(), "{s}");
    }
    // A huge number in an ignored field is still a valid number.
    assert!(kv_json(r#"{"event_id":1,"data":"cleared","junk":1e300}"#).is_ok());
    // msgpack: dp_rank above u32.
    let b = Mp::default()
        .map(3)
        .s("event_id")
        .fix(1)
        .s("data")
        .s("cleared")
        .s("dp_rank")
        .raw(&[0xcf, 0, 0, 0, 1, 0, 0, 0, 0])
        .done();
    assert!(decode_kv_cache_event_msgpack(&b).is_err());
}

#[test]
fn bad_invalid_utf8() {
    // Invalid UTF-8 inside a JSON string (an unknown field) and as a bare byte.
    let mut s = br#"{"event_id":1,"data":"cleared","junk":""#.to_vec();
    s.extend_from_slice(&[0xff, 0xfe]);
    s.extend_from_slice(br#""}"#);
    all_fail(&s, "invalid UTF-8 in JSON string");
    let mut s = br#"{"event_id":1,"data":"clea"#.to_vec();
    s.extend_from_slice(&[0xc3, 0x28]);
    s.extend_from_slice(br#"red"}"#);
    assert!(decode_kv_cache_event_json(&s).is_err());
    // msgpack: a variant name with invalid UTF-8.
    let b = Mp::default()
        .map(2)
        .s("event_id")
        .fix(1)
        .s("data")
        .raw(&[0xa2, 0xff, 0xfe])
        .done();
    assert!(decode_kv_cache_event_msgpack(&b).is_err());
    // msgpack: residency_domain with invalid UTF-8. rmp_serde hands such a string over as
    // bytes, which is not a string domain: the event decodes and is classified Invalid (skipped).
    let b = Mp::default()
        .map(3)
        .s("worker_id")
        .fix(1)
        .s("residency_domain")
        .raw(&[0xa2, 0xff, 0xfe])
        .s("event")
        .map(2)
        .s("event_id")
        .fix(1)
        .s("data")
        .s("cleared")
        .done();
    let e = decode_router_event_msgpack(&b).expect("decodes");
    assert_eq!(e.residency_domain, Some(ResidencyDomain::Invalid));
    assert!(e.classify().is_err());
}

#[test]
fn decode_error_variants_match_format() {
    assert!(matches!(
        decode_router_event_json(b"{"),
        Err(DecodeError::Json(_))
    ));
    assert!(matches!(
        decode_router_event_msgpack(b"\x81"),
        Err(DecodeError::Msgpack(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

fn arb_hash() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..300, any::<u64>(), Just(u64::MAX)]
}

fn arb_block() -> impl Strategy<Value = KvCacheStoredBlockData> {
    let mm = prop::option::of(
        prop::collection::vec(
            (
                arb_hash(),
                prop::collection::vec((0usize..1 << 20, any::<usize>()), 0..3),
            ),
            0..3,
        )
        .prop_map(|objs| BlockExtraInfo {
            mm_objects: objs
                .into_iter()
                .map(|(mm_hash, offsets)| BlockMmObjectInfo { mm_hash, offsets })
                .collect(),
        }),
    );
    (arb_hash(), arb_hash(), mm).prop_map(|(b, t, mm)| KvCacheStoredBlockData {
        block_hash: ExternalSequenceBlockHash(b),
        tokens_hash: LocalBlockHash(t),
        mm_extra_info: mm,
    })
}

fn arb_data() -> impl Strategy<Value = KvCacheEventData> {
    prop_oneof![
        (
            prop::option::of(arb_hash()),
            prop::option::of(any::<u32>()),
            prop::collection::vec(arb_block(), 0..4)
        )
            .prop_map(
                |(p, sp, blocks)| KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: p.map(ExternalSequenceBlockHash),
                    start_position: sp,
                    blocks,
                })
            ),
        prop::collection::vec(arb_hash(), 0..4).prop_map(|h| KvCacheEventData::Removed(
            KvCacheRemoveData {
                block_hashes: h.into_iter().map(ExternalSequenceBlockHash).collect(),
            }
        )),
        Just(KvCacheEventData::Cleared),
    ]
}

fn arb_domain() -> impl Strategy<Value = Option<ResidencyDomain>> {
    prop_oneof![
        Just(None),
        Just(Some(ResidencyDomain::Worker)),
        Just(Some(ResidencyDomain::CacheOwner)),
        Just(Some(ResidencyDomain::Invalid)),
        "[a-z_]{0,12}"
            .prop_filter("not a known domain", |s| s != "worker"
                && s != "cache_owner")
            .prop_map(|s| Some(ResidencyDomain::Unknown(s))),
    ]
}

fn arb_router_event() -> impl Strategy<Value = RouterEvent> {
    let tier = prop_oneof![
        Just(StorageTier::Device),
        Just(StorageTier::HostPinned),
        Just(StorageTier::Disk),
        Just(StorageTier::External),
    ];
    (
        any::<u64>(),
        tier,
        arb_domain(),
        any::<u64>(),
        arb_data(),
        any::<u32>(),
    )
        .prop_map(
            |(worker_id, storage_tier, residency_domain, event_id, data, dp_rank)| RouterEvent {
                worker_id,
                storage_tier,
                residency_domain,
                event: KvCacheEvent {
                    event_id,
                    data,
                    dp_rank,
                },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes into every decoder: an `Ok` or an `Err`, never a panic.
    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for (_, dec) in decoders() {
            let _ = dec(&bytes);
        }
    }

    /// JSON-looking noise (brackets, quotes, digits, keywords) into every decoder.
    #[test]
    fn prop_json_like_noise_never_panics(s in r#"[\[\]{}":,0-9a-z_ .-]{0,200}"#) {
        for (_, dec) in decoders() {
            let _ = dec(s.as_bytes());
        }
    }

    /// Every event survives JSON and msgpack round trips unchanged.
    #[test]
    fn prop_roundtrip(e in arb_router_event()) {
        let s = encode_router_event_json(&e).expect("encode json");
        prop_assert_eq!(&decode_router_event_json(s.as_bytes()).expect("decode json"), &e);
        let b = encode_router_event_msgpack(&e).expect("encode msgpack");
        prop_assert_eq!(&decode_router_event_msgpack(&b).expect("decode msgpack"), &e);
        let k = encode_kv_cache_event_msgpack(&e.event).expect("encode msgpack");
        prop_assert_eq!(&decode_kv_cache_event_msgpack(&k).expect("decode msgpack"), &e.event);
    }

    /// Corrupting one byte of a valid encoding (or truncating it) never panics a decoder.
    #[test]
    fn prop_mutated_encodings_never_panic(
        e in arb_router_event(),
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut j = encode_router_event_json(&e).expect("encode").into_bytes();
        let mut m = encode_router_event_msgpack(&e).expect("encode");
        for buf in [&mut j, &mut m] {
            let i = pos.index(buf.len());
            buf[i] = byte;
            for (_, dec) in decoders() {
                let _ = dec(buf);
                let c = cut.index(buf.len());
                let _ = dec(&buf[..c]);
            }
        }
    }
}
