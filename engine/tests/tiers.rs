//! Lower storage tiers (host_pinned, disk, external): the continuation walk of SERVICE.md §6.4
//! checked against Dynamo 1.6.1's own answers and dumps (`fixtures/tier_vectors.json`, produced
//! by `fixtures/tier_oracle.py`), and the engine's tier-specific behaviour: per-tier removes,
//! clears and worker removal across tiers, dp ranks, private external hashes, dumps, snapshots
//! and the reference model.

mod common;

use std::collections::BTreeMap;

use common::*;
use kvindex_engine::hashing::{compute_block_hash_for_seq, HashOptions};
use kvindex_engine::reference::{dump_canonical, dump_lower_canonical, ReferenceIndex};
use kvindex_engine::{
    KvCacheEventData, KvCacheEventError, LocalBlockHash, Namespace, ResidencyDomain, RouterEvent,
    StorageTier, TierDepths, WorkerWithDpRank,
};
use serde_json::{json, Value};

const FIXTURE: &str = include_str!("fixtures/tier_vectors.json");

fn tier_of(medium: &Value) -> StorageTier {
    match medium.as_str() {
        None | Some("GPU") => StorageTier::Device,
        Some("CPU") => StorageTier::HostPinned,
        Some("DISK") => StorageTier::Disk,
        Some("EXTERNAL") => StorageTier::External,
        Some(other) => panic!("fixture medium {other} not mapped"),
    }
}

fn on_tier(mut ev: RouterEvent, tier: StorageTier) -> RouterEvent {
    ev.storage_tier = tier;
    ev
}

/// Local hash of the fixture's block `b`: the tokens `[b; block_size]`.
fn block_local(b: u64, block_size: u32) -> u64 {
    let tokens = vec![b as u32; block_size as usize];
    compute_block_hash_for_seq(&tokens, block_size, &HashOptions::default())[0].0
}

/// The `/query` body kvindex's server builds from a tiered result (tokens, string keys).
fn response_of(ns: &Namespace, blocks: &[u64], block_size: u32) -> (Value, Value) {
    let tokens: Vec<u32> = blocks
        .iter()
        .flat_map(|&b| std::iter::repeat_n(b as u32, block_size as usize))
        .collect();
    let t = ns.find_matches_tiered_for_tokens(&tokens, &HashOptions::default());
    let bs = u64::from(block_size);
    let mut scores: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (w, d) in &t.device.scores {
        scores
            .entry(w.worker_id.to_string())
            .or_default()
            .insert(w.dp_rank.to_string(), u64::from(*d) * bs);
    }
    let mut instances = serde_json::Map::new();
    for (id, i) in t.by_instance() {
        let dp: BTreeMap<String, u64> =
            i.dp.iter()
                .map(|(r, d)| (r.to_string(), u64::from(*d) * bs))
                .collect();
        instances.insert(
            id.to_string(),
            json!({"cpu": u64::from(i.cpu) * bs, "disk": u64::from(i.disk) * bs, "dp": dp,
                   "gpu": u64::from(i.gpu) * bs, "longest_matched": u64::from(i.disk) * bs}),
        );
    }
    (json!(scores), Value::Object(instances))
}

#[test]
fn dynamo_1_6_1_tier_vectors() {
    let fixture: Value = serde_json::from_str(FIXTURE).expect("fixture JSON");
    let bs = fixture["block_size"].as_u64().expect("block_size") as u32;
    let scenarios = fixture["scenarios"].as_object().expect("scenarios");
    assert!(
        scenarios.len() >= 15,
        "fixture has {} scenarios",
        scenarios.len()
    );
    let (mut checked, mut dumps_loaded) = (0, 0);
    for (name, sc) in scenarios {
        let engine = new_engine();
        let ns = create_namespace(&engine, ns_key(), bs);
        let mut reference = ReferenceIndex::new();
        let mut answers = sc["answers"].as_array().expect("answers").iter();
        for step in sc["steps"].as_array().expect("steps") {
            let s = step.as_array().expect("step");
            let w = |i: usize| s[i].as_u64().expect("int");
            let ev = match s[0].as_str().expect("kind") {
                "store" => {
                    let blocks: Vec<(u64, u64)> = s[4]
                        .as_array()
                        .expect("blocks")
                        .iter()
                        .map(|b| {
                            (
                                b[0].as_u64().unwrap(),
                                block_local(b[1].as_u64().unwrap(), bs),
                            )
                        })
                        .collect();
                    Some(on_tier(
                        store(w(1), w(2) as u32, s[5].as_u64(), &blocks),
                        tier_of(&s[3]),
                    ))
                }
                "remove" => {
                    let hashes: Vec<u64> = s[4]
                        .as_array()
                        .expect("hashes")
                        .iter()
                        .map(|h| h.as_u64().unwrap())
                        .collect();
                    Some(on_tier(remove(w(1), w(2) as u32, &hashes), tier_of(&s[3])))
                }
                "clear" => Some(cleared(w(1), w(2) as u32)),
                "unregister" => {
                    ns.remove_worker(w(1)).expect("remove_worker");
                    reference.remove_worker(w(1));
                    None
                }
                "query" => {
                    let blocks: Vec<u64> = s[1]
                        .as_array()
                        .expect("query")
                        .iter()
                        .map(|b| b.as_u64().unwrap())
                        .collect();
                    ns.flush().expect("flush");
                    let answer = answers.next().expect("an answer per query");
                    let (scores, instances) = response_of(&ns, &blocks, bs);
                    assert_eq!(
                        scores, answer["response"]["scores"],
                        "{name}: scores for {blocks:?}"
                    );
                    assert_eq!(
                        instances, answer["response"]["instances"],
                        "{name}: instances for {blocks:?}"
                    );
                    let locals: Vec<LocalBlockHash> = blocks
                        .iter()
                        .map(|&b| LocalBlockHash(block_local(b, bs)))
                        .collect();
                    assert_eq!(
                        ns.find_matches_tiered(&locals).tiers,
                        reference.find_matches_tiered(&locals).into_iter().collect(),
                        "{name}: reference model for {blocks:?}"
                    );
                    checked += 1;
                    None
                }
                other => panic!("unknown step {other}"),
            };
            if let Some(ev) = ev {
                let _ = reference.apply(&ev);
                ns.apply(ev).expect("apply");
            }
        }
        // Dynamo's /dump after the last step: same blocks as ours on every tier ...
        let theirs: Vec<RouterEvent> = serde_json::from_value(sc["dump"].clone()).expect("dump");
        let ours = ns.dump().expect("dump");
        assert_eq!(
            dump_lower_canonical(&ours),
            dump_lower_canonical(&theirs),
            "{name}: lower tiers of the dump"
        );
        assert_eq!(
            dump_canonical(&ours),
            dump_canonical(&theirs),
            "{name}: device tier of the dump"
        );
        // ... and loading Dynamo's dump (peer recovery) answers the last query as Dynamo did.
        let last = sc["steps"]
            .as_array()
            .and_then(|s| s.last())
            .expect("steps");
        if last[0] == "query" {
            let copy = create_namespace(&engine, ns_key_named(&format!("copy-{name}")), bs);
            for e in theirs {
                copy.apply(e).expect("apply");
            }
            copy.flush().expect("flush");
            let blocks: Vec<u64> = serde_json::from_value(last[1].clone()).expect("query");
            let answer = sc["answers"]
                .as_array()
                .and_then(|a| a.last())
                .expect("answer");
            let (scores, instances) = response_of(&copy, &blocks, bs);
            assert_eq!(scores, answer["response"]["scores"], "{name}: from dump");
            assert_eq!(
                instances, answer["response"]["instances"],
                "{name}: from dump"
            );
            dumps_loaded += 1;
        }
    }
    assert!(checked >= 30, "only {checked} answers checked");
    assert!(dumps_loaded >= 12, "only {dumps_loaded} dumps loaded");
}

fn ns_key_named(group: &str) -> kvindex_engine::NamespaceKey {
    kvindex_engine::NamespaceKey::new("m", group)
}

fn depths(ns: &Namespace, q: &[u64]) -> Vec<(WorkerWithDpRank, (u32, u32, u32))> {
    ns.flush().expect("flush");
    ns.find_matches_tiered(&lh(q))
        .sorted()
        .into_iter()
        .map(|(w, d)| (w, (d.device, d.host, d.disk)))
        .collect()
}

fn at(tier: StorageTier, ev: RouterEvent) -> RouterEvent {
    on_tier(ev, tier)
}

const CPU: StorageTier = StorageTier::HostPinned;
const DISK: StorageTier = StorageTier::Disk;
const EXT: StorageTier = StorageTier::External;

#[test]
fn service_6_4_examples() {
    let (_e, ns) = engine_and_namespace();
    // A CPU continuation whose parent is a GPU block works.
    ns.apply(store(1, 0, None, &[(21, 1)])).unwrap();
    ns.apply(at(CPU, store(1, 0, Some(21), &[(22, 2)])))
        .unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 0), (1, 2, 2))]);
    // GPU block 1 (external 21) and a DISK chain whose block 2 has parent 11: disk = 1 block.
    ns.apply(store(2, 0, None, &[(21, 1)])).unwrap();
    ns.apply(at(
        DISK,
        store(2, 0, Some(11), &[(12, 2), (13, 3), (14, 4)]),
    ))
    .unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3, 4])[1], (wr(2, 0), (1, 1, 1)));
    // The device match alone leaves cpu = disk = gpu; the device scores are unchanged.
    assert_eq!(
        ns.find_matches_tiered(&lh(&[1, 2, 3, 4])).device,
        ns.find_matches(&lh(&[1, 2, 3, 4]), false)
    );
}

#[test]
fn tiers_continue_in_order_and_counts_are_cumulative() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(1, 0, None, &[(11, 1)])).unwrap();
    ns.apply(at(CPU, store(1, 0, Some(11), &[(12, 2)])))
        .unwrap();
    ns.apply(at(DISK, store(1, 0, Some(12), &[(13, 3)])))
        .unwrap();
    ns.apply(at(EXT, store(1, 0, Some(13), &[(14, 4)])))
        .unwrap();
    // A CPU block after the disk one is not reached: host_pinned is walked before disk.
    ns.apply(at(CPU, store(1, 0, Some(14), &[(15, 5)])))
        .unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3, 4, 5]), vec![(wr(1, 0), (1, 2, 4))]);
    // Lower tiers alone, from the root.
    ns.apply(at(EXT, store(2, 0, None, &[(11, 1), (12, 2)])))
        .unwrap();
    assert_eq!(depths(&ns, &[1, 2])[1], (wr(2, 0), (0, 0, 2)));
    // Not from the middle of a query.
    assert_eq!(depths(&ns, &[2]), vec![]);
}

#[test]
fn removes_are_per_tier_and_do_not_cascade() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
    ns.apply(at(CPU, store(1, 0, None, &[(11, 1), (12, 2), (13, 3)])))
        .unwrap();
    // A device remove leaves the CPU copy: the walk continues on CPU from block 1.
    ns.apply(remove(1, 0, &[12])).unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 0), (1, 3, 3))]);
    // A disk remove of a CPU hash is a miss and changes nothing.
    assert_eq!(
        event_outcome(ns.apply_and_wait(at(DISK, remove(1, 0, &[12])))),
        Err(KvCacheEventError::BlockNotFound)
    );
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 0), (1, 3, 3))]);
    // A CPU remove of the middle block cuts the walk; re-storing it revives block 3.
    ns.apply(at(CPU, remove(1, 0, &[12]))).unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 0), (1, 1, 1))]);
    ns.apply(at(CPU, store(1, 0, Some(11), &[(12, 2)])))
        .unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 0), (1, 3, 3))]);
    assert_eq!(ns.current_size(), 1);
    assert_eq!(ns.lower_tier_size(), 3);
    assert_eq!(ns.lower_tier_block_counts(), vec![(wr(1, 0), CPU, 3)]);
}

#[test]
fn clear_covers_every_tier_of_its_rank_only() {
    let (_e, ns) = engine_and_namespace();
    for dp in [0, 1] {
        ns.apply(store(1, dp, None, &[(11, 1)])).unwrap();
        ns.apply(at(CPU, store(1, dp, None, &[(11, 1), (12, 2)])))
            .unwrap();
        ns.apply(at(DISK, store(1, dp, Some(12), &[(13, 3)])))
            .unwrap();
    }
    // Whatever tier the clear event names, it clears them all (SERVICE.md §5.3).
    ns.apply(at(DISK, cleared(1, 0))).unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![(wr(1, 1), (1, 2, 3))]);
    assert_eq!(ns.lower_tier_size(), 3);
    ns.clear_all_blocks(1).unwrap();
    assert_eq!(depths(&ns, &[1, 2, 3]), vec![]);
    assert_eq!(ns.lower_tier_size(), 0);
    assert_eq!(ns.get_workers(), vec![1]);
}

#[test]
fn worker_removal_covers_every_tier() {
    let (_e, ns) = engine_and_namespace();
    for (w, dp) in [(1, 0), (1, 1), (2, 0)] {
        ns.apply(at(CPU, store(w, dp, None, &[(11, 1)]))).unwrap();
        ns.apply(at(EXT, store(w, dp, Some(11), &[(12, 2)])))
            .unwrap();
    }
    ns.remove_worker_dp_rank(1, 1).unwrap();
    assert_eq!(
        depths(&ns, &[1, 2]),
        vec![(wr(1, 0), (0, 1, 2)), (wr(2, 0), (0, 1, 2))]
    );
    ns.remove_worker(1).unwrap();
    assert_eq!(depths(&ns, &[1, 2]), vec![(wr(2, 0), (0, 1, 2))]);
    assert_eq!(ns.get_workers(), vec![2]);
    // A removed worker that comes back starts empty on every tier.
    ns.apply(store(1, 0, None, &[(11, 1)])).unwrap();
    assert_eq!(depths(&ns, &[1, 2])[0], (wr(1, 0), (1, 1, 1)));
}

#[test]
fn dp_ranks_continue_independently() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(5, 0, None, &[(51, 1), (52, 2)])).unwrap();
    ns.apply(at(CPU, store(5, 1, Some(52), &[(53, 3)])))
        .unwrap();
    ns.apply(store(5, 1, None, &[(51, 1)])).unwrap();
    ns.apply(at(CPU, store(5, 1, Some(51), &[(52, 2)])))
        .unwrap();
    let d = depths(&ns, &[1, 2, 3]);
    // dp1: device 1, CPU 52 under 51, then 53 under 52 (its own CPU block) → 3.
    assert_eq!(d, vec![(wr(5, 0), (2, 2, 2)), (wr(5, 1), (1, 3, 3))]);
    let by = ns.find_matches_tiered(&lh(&[1, 2, 3])).by_instance();
    let i = &by[&5];
    assert_eq!((i.gpu, i.cpu, i.disk), (2, 3, 3));
    assert_eq!(i.dp, BTreeMap::from([(0, 2), (1, 1)]));
}

#[test]
fn continuation_uses_the_streams_own_external_hash() {
    let (_e, ns) = engine_and_namespace();
    // Worker 2 holds the same device block as worker 1 under a different (private) hash.
    ns.apply(store(1, 0, None, &[(11, 1)])).unwrap();
    ns.apply(store(2, 0, None, &[(99, 1)])).unwrap();
    ns.apply(at(CPU, store(2, 0, Some(99), &[(100, 2)])))
        .unwrap();
    ns.apply(at(CPU, store(1, 0, Some(99), &[(100, 2)])))
        .unwrap();
    assert_eq!(
        depths(&ns, &[1, 2]),
        vec![(wr(1, 0), (1, 1, 1)), (wr(2, 0), (1, 2, 2))]
    );
}

#[test]
fn lower_tier_events_are_validated_and_counted() {
    let (_e, ns) = engine_and_namespace();
    assert_eq!(
        event_outcome(ns.apply_and_wait(at(CPU, store(1, 0, Some(5), &[(5, 1)])))),
        Err(KvCacheEventError::InvalidBlockSequence)
    );
    let mut owner = at(CPU, store(1, 0, None, &[(5, 1)]));
    owner.residency_domain = Some(ResidencyDomain::CacheOwner);
    assert_eq!(
        event_outcome(ns.apply_and_wait(owner)),
        Err(KvCacheEventError::UnsupportedResidencyDomain)
    );
    ns.apply_and_wait(at(DISK, store(1, 0, None, &[(5, 1)])))
        .unwrap();
    ns.apply_and_wait(at(DISK, store(1, 0, None, &[(5, 1)])))
        .unwrap();
    let c = ns.event_counters();
    assert_eq!(c.duplicate_store, 1, "{c:?}");
    assert_eq!(ns.lower_tier_size(), 1);
    assert_eq!(ns.get_workers(), vec![1]);
}

#[test]
fn dump_writes_lower_tiers_per_block_with_parents_and_per_tier_ids() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
    ns.apply(at(CPU, store(1, 0, Some(12), &[(13, 3), (14, 4)])))
        .unwrap();
    ns.apply(at(DISK, store(2, 1, None, &[(11, 1)]))).unwrap();
    ns.apply(at(EXT, store(2, 1, Some(77), &[(15, 5)])))
        .unwrap();
    let dump = ns.dump().expect("dump");
    let lower: Vec<_> = dump
        .iter()
        .filter(|e| e.storage_tier != StorageTier::Device)
        .collect();
    assert_eq!(lower.len(), 4);
    let ids: Vec<(StorageTier, u64)> = lower
        .iter()
        .map(|e| (e.storage_tier, e.event.event_id))
        .collect();
    assert_eq!(ids, vec![(CPU, 0), (CPU, 1), (DISK, 0), (EXT, 0)]);
    for e in &lower {
        let KvCacheEventData::Stored(s) = &e.event.data else {
            panic!("not a store: {e:?}")
        };
        assert_eq!(s.blocks.len(), 1);
        assert_eq!(e.residency_domain, Some(ResidencyDomain::Worker));
    }
    // Replaying the dump into a fresh namespace rebuilds the same state on every tier.
    let (_e2, copy) = engine_and_namespace();
    for e in dump.clone() {
        copy.apply(e).unwrap();
    }
    copy.flush().unwrap();
    assert_eq!(
        dump_lower_canonical(&copy.dump().unwrap()),
        dump_lower_canonical(&dump)
    );
    for q in [&[1, 2, 3, 4][..], &[1, 5]] {
        assert_eq!(depths(&copy, q), depths(&ns, q));
    }
}

#[test]
fn snapshot_round_trip_is_exact_on_every_tier() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
    ns.apply(at(CPU, store(1, 0, Some(12), &[(13, 3)])))
        .unwrap();
    // Two blocks on one (parent, local) link: the walk follows the first; a restore keeps that.
    ns.apply(at(DISK, store(3, 0, None, &[(31, 1)]))).unwrap();
    ns.apply(at(DISK, store(3, 0, None, &[(41, 1)]))).unwrap();
    ns.apply(at(DISK, store(3, 0, Some(41), &[(42, 2)])))
        .unwrap();
    ns.apply(at(EXT, store(4, 2, Some(999), &[(5, 5)])))
        .unwrap();
    let snap = ns.snapshot().expect("snapshot");
    assert_eq!(snap.lower.len(), 5);
    let (_e2, copy) = engine_and_namespace();
    copy.restore(&snap).expect("restore");
    let again = copy.snapshot().expect("snapshot");
    assert_eq!(again.canonical(), snap.canonical());
    assert_eq!(again.lower_canonical(), snap.lower_canonical());
    assert_eq!(again.lower, snap.lower);
    for q in [&[1, 2, 3][..], &[1, 2], &[5]] {
        assert_eq!(depths(&copy, q), depths(&ns, q));
    }
    assert_eq!(depths(&copy, &[1, 2])[1], (wr(3, 0), (0, 0, 1)));
    assert_eq!(copy.get_workers(), vec![1, 3, 4]);
    // Restored streams keep being applied to (the event threads adopt their tiers).
    copy.apply(at(DISK, remove(3, 0, &[31]))).unwrap();
    assert_eq!(depths(&copy, &[1, 2])[1], (wr(3, 0), (0, 0, 2)));
    // A namespace with lower-tier blocks is not empty.
    assert!(copy.restore(&snap).is_err());
    // An image whose lower tiers name a missing stream restores nothing.
    let mut bad = snap.clone();
    bad.lower[0].stream = 99;
    let (_e3, empty) = engine_and_namespace();
    assert!(empty.restore(&bad).is_err());
    assert_eq!(
        empty.snapshot().unwrap(),
        kvindex_engine::IndexSnapshot::default()
    );
}

#[test]
fn tiered_depths_equal_device_scores_without_lower_tiers() {
    let (_e, ns) = engine_and_namespace();
    ns.apply(store(1, 0, None, &[(11, 1), (12, 2)])).unwrap();
    ns.apply(store(2, 3, None, &[(11, 1)])).unwrap();
    ns.flush().unwrap();
    let t = ns.find_matches_tiered(&lh(&[1, 2]));
    assert_eq!(
        t.sorted(),
        vec![
            (
                wr(1, 0),
                TierDepths {
                    device: 2,
                    host: 2,
                    disk: 2
                }
            ),
            (
                wr(2, 3),
                TierDepths {
                    device: 1,
                    host: 1,
                    disk: 1
                }
            ),
        ]
    );
}
