//! The tiered query's fast path against the full walk: `Namespace::find_matches_tiered` (which
//! skips the tier walk when the namespace holds no lower-tier block and keeps only the streams
//! whose lower tiers extend their device match) must read, through `depth`, `sorted` and
//! `by_instance`, exactly what `find_matches_tiered_exhaustive` (every device score copied, every
//! known stream walked on every tier) and the reference model say, on random namespaces:
//!
//! * without any lower-tier event;
//! * with lower-tier blocks (continuations of device blocks, chains from the root, removes);
//! * whose lower-tier blocks were all removed again (streams still registered, counters at 0).

mod common;

use std::collections::{BTreeMap, HashMap};

use common::*;
use kvindex_engine::reference::ReferenceIndex;
use kvindex_engine::{
    InstanceTiers, LocalBlockHash, Namespace, RouterEvent, StorageTier, TierDepths, TierExtensions,
    WorkerId, WorkerWithDpRank,
};

const TIERS: [StorageTier; 3] = [
    StorageTier::HostPinned,
    StorageTier::Disk,
    StorageTier::External,
];
/// Local hashes are drawn from 1..=ALPHABET, so prefixes are shared.
const ALPHABET: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    DeviceOnly,
    WithLowerTiers,
    LowerTiersEmptiedAgain,
}

fn path(rng: &mut SplitMix64, max_len: u64) -> Vec<u64> {
    (0..1 + rng.below(max_len))
        .map(|_| 1 + rng.below(ALPHABET))
        .collect()
}

fn on_tier(mut ev: RouterEvent, tier: StorageTier) -> RouterEvent {
    ev.storage_tier = tier;
    ev
}

/// Expected `by_instance`, computed directly from a full depth map.
fn instances_of(full: &HashMap<WorkerWithDpRank, TierDepths>) -> BTreeMap<WorkerId, InstanceTiers> {
    let mut out: BTreeMap<WorkerId, InstanceTiers> = BTreeMap::new();
    for (s, d) in full {
        let i = out.entry(s.worker_id).or_default();
        i.dp.insert(s.dp_rank, d.device);
        i.gpu = i.gpu.max(d.device);
        i.cpu = i.cpu.max(d.host);
        i.disk = i.disk.max(d.disk);
    }
    out
}

/// Build one random namespace of `kind`; returns the reference model and the stored paths.
fn populate(ns: &Namespace, rng: &mut SplitMix64, kind: Kind) -> (ReferenceIndex, Vec<Vec<u64>>) {
    let mut reference = ReferenceIndex::new();
    let mut apply = |ev: RouterEvent| {
        let _ = reference.apply(&ev);
        ns.apply(ev).expect("apply");
    };
    let workers = 1 + rng.below(8);
    let mut paths = Vec::new();
    let mut lower = Vec::new();
    for w in 0..workers {
        for dp in 0..1 + rng.below(2) as u32 {
            let device = path(rng, 6);
            apply(store_chain(w, dp, &device));
            paths.push(device.clone());
            if kind == Kind::DeviceOnly {
                continue;
            }
            for _ in 0..1 + rng.below(3) {
                let tier = TIERS[rng.below(3) as usize];
                // A continuation of a device prefix (or a chain from the root), with the
                // canonical hashes of the extended path.
                let keep = rng.below(device.len() as u64 + 1) as usize;
                let prefix = device[..keep].to_vec();
                let more = path(rng, 4);
                lower.push((w, dp, tier, prefix.clone(), more.clone()));
                apply(on_tier(store_chain_after(w, dp, &prefix, &more), tier));
                paths.push(prefix.into_iter().chain(more).collect());
            }
            if rng.chance(30) {
                let (w, dp, tier, prefix, more) =
                    lower[rng.below(lower.len() as u64) as usize].clone();
                let full: Vec<u64> = prefix.iter().chain(&more).copied().collect();
                let at = prefix.len() + rng.below(more.len() as u64) as usize;
                apply(on_tier(remove_chain(w, dp, &full, at..at + 1), tier));
            }
        }
    }
    if kind == Kind::LowerTiersEmptiedAgain {
        for (w, dp, tier, prefix, more) in lower {
            let full: Vec<u64> = prefix.iter().chain(&more).copied().collect();
            // Unknown hashes (already removed, or shared with an earlier chain) are skipped.
            apply(on_tier(
                remove_chain(w, dp, &full, prefix.len()..full.len()),
                tier,
            ));
        }
    }
    ns.flush().expect("flush");
    (reference, paths)
}

/// Compare the fast path with the exhaustive walk and the reference on one query; returns the
/// number of streams whose lower tiers extended their device match.
fn check_query(ns: &Namespace, reference: &ReferenceIndex, query: &[LocalBlockHash]) -> usize {
    let fast = ns.find_matches_tiered(query);
    let (device, full) = ns.find_matches_tiered_exhaustive(query);
    let what = format!("query {:?}", raw(query));
    assert_eq!(fast.device, device, "{what}: device scores");
    assert_eq!(
        fast.device,
        ns.find_matches(query, false),
        "{what}: find_matches"
    );

    let mut expected: Vec<(WorkerWithDpRank, TierDepths)> =
        full.iter().map(|(s, d)| (*s, *d)).collect();
    expected.sort_unstable_by_key(|(s, _)| *s);
    assert_eq!(
        fast.sorted(),
        expected,
        "{what}: depths vs the exhaustive walk"
    );
    let modelled: Vec<_> = reference.find_matches_tiered(query).into_iter().collect();
    assert_eq!(
        fast.sorted(),
        modelled,
        "{what}: depths vs the reference model"
    );
    assert_eq!(
        fast.by_instance(),
        instances_of(&full),
        "{what}: by_instance"
    );
    for (s, d) in &full {
        assert_eq!(fast.depth(s), Some(*d), "{what}: depth of {s:?}");
    }
    assert_eq!(fast.depth(&wr(u64::MAX, 0)), None, "{what}: unknown stream");

    let extended: TierExtensions = full.clone().into_iter().collect();
    assert_eq!(
        fast.tiers, extended,
        "{what}: the extensions are exactly the deeper streams"
    );
    assert!(fast.tiers.iter().all(|(_, d)| d.disk > d.device));
    fast.tiers.len()
}

#[test]
fn fast_path_reads_as_the_exhaustive_walk_on_random_namespaces() {
    let mut extended_total = 0;
    let mut device_only_streams = 0;
    for seed in 0..60u64 {
        let kind = match seed % 3 {
            0 => Kind::DeviceOnly,
            1 => Kind::WithLowerTiers,
            _ => Kind::LowerTiersEmptiedAgain,
        };
        let mut rng = SplitMix64::new(seed);
        let (_engine, ns) = engine_and_namespace();
        let (reference, paths) = populate(&ns, &mut rng, kind);
        if kind != Kind::WithLowerTiers {
            assert_eq!(ns.lower_tier_size(), 0, "seed {seed}: {kind:?}");
        }
        let mut queries: Vec<Vec<u64>> = paths;
        queries.extend((0..20).map(|_| path(&mut rng, 8)));
        queries.push(Vec::new());
        for q in &queries {
            let query = lh(q);
            let extended = check_query(&ns, &reference, &query);
            if kind == Kind::WithLowerTiers {
                extended_total += extended;
            } else {
                assert_eq!(extended, 0, "seed {seed}: {kind:?} query {q:?}");
                device_only_streams += ns.find_matches(&query, false).scores.len();
            }
        }
    }
    // The comparison covered real continuations and answers with device matches.
    assert!(
        extended_total > 100,
        "only {extended_total} extended streams seen"
    );
    assert!(
        device_only_streams > 100,
        "only {device_only_streams} device matches seen"
    );
}

#[test]
fn extensions_keep_only_depths_beyond_the_device() {
    let depths = |device, host, disk| TierDepths { device, host, disk };
    let ext: TierExtensions = [
        (wr(1, 0), depths(2, 2, 2)),
        (wr(2, 0), depths(1, 2, 2)),
        (wr(3, 0), depths(1, 1, 3)),
        (wr(4, 0), depths(0, 0, 1)),
        (wr(5, 0), TierDepths::device_only(4)),
    ]
    .into_iter()
    .collect();
    assert_eq!(ext.len(), 3);
    assert_eq!(ext.get(&wr(1, 0)), None);
    assert_eq!(ext.get(&wr(5, 0)), None);
    assert_eq!(ext.get(&wr(3, 0)), Some(&depths(1, 1, 3)));
    assert_eq!(ext.get(&wr(4, 0)), Some(&depths(0, 0, 1)));
}
