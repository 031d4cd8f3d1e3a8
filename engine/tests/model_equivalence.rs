//! Model-based property test: random event streams applied to the engine and to the reference
//! model must leave both with the same observable state: the same scores for every query, the
//! same dump (compared canonically), the same workers, sizes and per-stream block counts.
//!
//! The generated streams cover 3–4 workers × 2 dp ranks in 2 namespaces with different block
//! sizes, over a small alphabet of local hashes so that prefixes are shared. Stores mostly chain
//! under blocks the stream holds (sometimes under another stream's block or an unknown hash),
//! mostly with canonical rolling hashes (sometimes arbitrary engine hashes, rarely a
//! self-reference); removes hit held blocks (mid-chain included), other streams' blocks and
//! unknown hashes; clears, `remove_worker` and `remove_worker_dp_rank` are mixed in. About one
//! store or remove in three targets a lower tier (host_pinned, disk, external), usually under a
//! block the stream holds on the device or a lower tier, so the tier-aware walk, its dump and its
//! snapshot are compared too.
//!
//! Choices that depend on the current state ("a block this stream holds") are drawn as selectors
//! and resolved against the reference model when the op runs, so every case is deterministic and
//! shrinks well.

mod common;

use std::collections::BTreeSet;

use common::*;
use kvindex_engine::reference::{dump_canonical, dump_lower_canonical, ReferenceIndex};
use kvindex_engine::{
    Engine, ExternalSequenceBlockHash, LocalBlockHash, Namespace, NamespaceKey, RouterEvent,
    StorageTier, WorkerWithDpRank,
};
use proptest::prelude::*;

/// Two namespaces with different block sizes (block size does not change event semantics, but
/// each namespace must be an independent index).
const NAMESPACES: [(&str, u32); 2] = [("ns-a", 16), ("ns-b", 32)];
const DP_RANKS: u32 = 2;
/// Local hashes are drawn from 1..=ALPHABET.
const ALPHABET: u64 = 4;

#[derive(Debug, Clone)]
enum ParentChoice {
    Root,
    /// One of the stream's own blocks (orphans included), by selector.
    Held(usize),
    /// A block held by another stream of the namespace (may or may not be this stream's too).
    OtherStream(usize),
    /// A hash nobody holds.
    Unknown(u32),
}

#[derive(Debug, Clone)]
enum HashChoice {
    /// The canonical rolling hash of each block's path.
    Canonical,
    /// Engine-specific hashes derived from a seed.
    Arbitrary(u64),
    /// The first block reuses the parent's hash (rejected as an invalid sequence).
    SelfReference,
}

#[derive(Debug, Clone)]
enum RemoveTarget {
    Held(usize),
    OtherStream(usize),
    Unknown(u32),
}

#[derive(Debug, Clone)]
enum Op {
    Store {
        ns: usize,
        worker: u64,
        rank: u32,
        parent: ParentChoice,
        locals: Vec<u64>,
        hashes: HashChoice,
        tier: StorageTier,
    },
    Remove {
        ns: usize,
        worker: u64,
        rank: u32,
        targets: Vec<RemoveTarget>,
        tier: StorageTier,
    },
    Clear {
        ns: usize,
        worker: u64,
        rank: u32,
    },
    RemoveWorker {
        ns: usize,
        worker: u64,
    },
    RemoveWorkerDpRank {
        ns: usize,
        worker: u64,
        rank: u32,
    },
    /// Flush and compare the whole state mid-stream.
    Checkpoint,
}

fn parent_choice() -> impl Strategy<Value = ParentChoice> {
    prop_oneof![
        3 => Just(ParentChoice::Root),
        7 => any::<usize>().prop_map(ParentChoice::Held),
        1 => any::<usize>().prop_map(ParentChoice::OtherStream),
        1 => any::<u32>().prop_map(ParentChoice::Unknown),
    ]
}

fn hash_choice() -> impl Strategy<Value = HashChoice> {
    prop_oneof![
        16 => Just(HashChoice::Canonical),
        4 => any::<u64>().prop_map(HashChoice::Arbitrary),
        1 => Just(HashChoice::SelfReference),
    ]
}

fn tier() -> impl Strategy<Value = StorageTier> {
    prop_oneof![
        8 => Just(StorageTier::Device),
        2 => Just(StorageTier::HostPinned),
        1 => Just(StorageTier::Disk),
        1 => Just(StorageTier::External),
    ]
}

fn remove_target() -> impl Strategy<Value = RemoveTarget> {
    prop_oneof![
        6 => any::<usize>().prop_map(RemoveTarget::Held),
        1 => any::<usize>().prop_map(RemoveTarget::OtherStream),
        1 => any::<u32>().prop_map(RemoveTarget::Unknown),
    ]
}

fn op(workers: u64) -> impl Strategy<Value = Op> {
    let ns = 0..NAMESPACES.len();
    let worker = 1..=workers;
    let rank = 0..DP_RANKS;
    prop_oneof![
        12 => (
            ns.clone(),
            worker.clone(),
            rank.clone(),
            parent_choice(),
            prop::collection::vec(1..=ALPHABET, 0..5),
            hash_choice(),
            tier()
        )
            .prop_map(|(ns, worker, rank, parent, locals, hashes, tier)| Op::Store {
                ns,
                worker,
                rank,
                parent,
                locals,
                hashes,
                tier
            }),
        4 => (
            ns.clone(),
            worker.clone(),
            rank.clone(),
            prop::collection::vec(remove_target(), 0..4),
            tier()
        )
            .prop_map(|(ns, worker, rank, targets, tier)| Op::Remove {
                ns,
                worker,
                rank,
                targets,
                tier
            }),
        1 => (ns.clone(), worker.clone(), rank.clone())
            .prop_map(|(ns, worker, rank)| Op::Clear { ns, worker, rank }),
        1 => (ns.clone(), worker.clone()).prop_map(|(ns, worker)| Op::RemoveWorker { ns, worker }),
        1 => (ns, worker, rank)
            .prop_map(|(ns, worker, rank)| Op::RemoveWorkerDpRank { ns, worker, rank }),
        1 => Just(Op::Checkpoint),
    ]
}

/// (number of workers, ops, query seed)
fn scenario(max_ops: usize) -> impl Strategy<Value = (u64, Vec<Op>, u64)> {
    (3u64..=4).prop_flat_map(move |workers| {
        (
            Just(workers),
            prop::collection::vec(op(workers), 1..max_ops),
            any::<u64>(),
        )
    })
}

/// How each event reaches the engine.
#[derive(Clone, Copy, PartialEq)]
enum Delivery {
    /// `apply` (fire and forget); outcomes are compared through state only.
    Enqueue,
    /// `apply_and_wait`; each event's outcome must equal the model's.
    AndWait,
}

/// The reference models of every namespace, and the resolution of ops into events against them.
struct Resolver {
    models: Vec<ReferenceIndex>,
}

impl Resolver {
    fn new() -> Self {
        Self {
            models: vec![ReferenceIndex::new(); NAMESPACES.len()],
        }
    }

    /// Blocks held by streams of namespace `ns` other than `stream`, as (hash, path).
    fn other_blocks(
        &self,
        ns: usize,
        stream: WorkerWithDpRank,
    ) -> Vec<(ExternalSequenceBlockHash, Vec<LocalBlockHash>)> {
        let model = &self.models[ns];
        model
            .streams()
            .into_iter()
            .filter(|s| *s != stream)
            .flat_map(|s| model.blocks(s))
            .collect()
    }

    /// Every block `stream` holds on any tier, as (hash, path): device blocks with their paths,
    /// lower-tier blocks with the path their parent chain spells (those whose chain does not
    /// reach the root or a device block are left out).
    fn own_blocks(
        &self,
        ns: usize,
        stream: WorkerWithDpRank,
    ) -> Vec<(ExternalSequenceBlockHash, Vec<LocalBlockHash>)> {
        let model = &self.models[ns];
        let mut out = model.blocks(stream);
        let mut path_of: std::collections::HashMap<u64, Vec<LocalBlockHash>> =
            out.iter().map(|(h, p)| (h.0, p.clone())).collect();
        let lower: Vec<_> = model
            .lower_blocks()
            .into_iter()
            .filter(|b| b.0 == stream)
            .collect();
        loop {
            let mut grew = false;
            for &(_, _, ext, local, parent) in &lower {
                if path_of.contains_key(&ext) {
                    continue;
                }
                let base = match parent {
                    None => Some(Vec::new()),
                    Some(p) => path_of.get(&p).cloned(),
                };
                if let Some(mut path) = base {
                    path.push(LocalBlockHash(local));
                    path_of.insert(ext, path.clone());
                    out.push((ExternalSequenceBlockHash(ext), path));
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        out
    }

    fn pick<T: Clone>(items: &[T], selector: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[selector % items.len()].clone())
    }

    /// Resolve an op's state-dependent choices into an event.
    fn store_event(
        &self,
        ns: usize,
        stream: WorkerWithDpRank,
        parent: &ParentChoice,
        locals: &[u64],
        hashes: &HashChoice,
        tier: StorageTier,
    ) -> RouterEvent {
        let own = match tier {
            StorageTier::Device => self.models[ns].blocks(stream),
            _ => self.own_blocks(ns, stream),
        };
        let resolved = match parent {
            ParentChoice::Root => None,
            ParentChoice::Held(sel) => Self::pick(&own, *sel),
            ParentChoice::OtherStream(sel) => Self::pick(&self.other_blocks(ns, stream), *sel),
            ParentChoice::Unknown(x) => Some((
                ExternalSequenceBlockHash(0xDEAD_0000_0000_0000 | u64::from(*x)),
                vec![LocalBlockHash(ALPHABET + 1)],
            )),
        };
        let (parent_hash, parent_path) = match resolved {
            Some((hash, path)) => (Some(hash.0), raw(&path)),
            None => (None, Vec::new()),
        };
        let full: Vec<u64> = parent_path.iter().chain(locals).copied().collect();
        let canonical = canonical_hashes(&full);
        let mut block_hashes: Vec<u64> = match hashes {
            HashChoice::Canonical | HashChoice::SelfReference => {
                canonical[parent_path.len()..].to_vec()
            }
            HashChoice::Arbitrary(seed) => {
                let mut rng = SplitMix64::new(*seed);
                locals.iter().map(|_| rng.next_u64()).collect()
            }
        };
        if let (HashChoice::SelfReference, Some(parent), Some(first)) =
            (hashes, parent_hash, block_hashes.first_mut())
        {
            *first = parent;
        }
        let blocks: Vec<(u64, u64)> = block_hashes
            .into_iter()
            .zip(locals.iter().copied())
            .collect();
        let mut ev = store(stream.worker_id, stream.dp_rank, parent_hash, &blocks);
        ev.storage_tier = tier;
        ev
    }

    fn remove_event(
        &self,
        ns: usize,
        stream: WorkerWithDpRank,
        targets: &[RemoveTarget],
        tier: StorageTier,
    ) -> RouterEvent {
        let own = self.own_blocks(ns, stream);
        let others = self.other_blocks(ns, stream);
        let hashes: Vec<u64> = targets
            .iter()
            .filter_map(|target| match target {
                RemoveTarget::Held(sel) => Self::pick(&own, *sel).map(|(h, _)| h.0),
                RemoveTarget::OtherStream(sel) => Self::pick(&others, *sel).map(|(h, _)| h.0),
                RemoveTarget::Unknown(x) => Some(0xBEEF_0000_0000_0000 | u64::from(*x)),
            })
            .collect();
        let mut ev = remove(stream.worker_id, stream.dp_rank, &hashes);
        ev.storage_tier = tier;
        ev
    }

    /// The event an op sends to namespace `ns`, if it is an event at all.
    fn event_of(&self, op: &Op) -> Option<(usize, RouterEvent)> {
        match op {
            Op::Store {
                ns,
                worker,
                rank,
                parent,
                locals,
                hashes,
                tier,
            } => Some((
                *ns,
                self.store_event(*ns, wr(*worker, *rank), parent, locals, hashes, *tier),
            )),
            Op::Remove {
                ns,
                worker,
                rank,
                targets,
                tier,
            } => Some((
                *ns,
                self.remove_event(*ns, wr(*worker, *rank), targets, *tier),
            )),
            Op::Clear { ns, worker, rank } => Some((*ns, cleared(*worker, *rank))),
            Op::RemoveWorker { .. } | Op::RemoveWorkerDpRank { .. } | Op::Checkpoint => None,
        }
    }
}

struct Case {
    engine: Engine,
    namespaces: Vec<Namespace>,
    resolver: Resolver,
    delivery: Delivery,
    rng: SplitMix64,
}

impl Case {
    fn new(delivery: Delivery, query_seed: u64) -> Self {
        let engine = new_engine();
        let namespaces = NAMESPACES
            .iter()
            .map(|(group, block_size)| {
                create_namespace(&engine, NamespaceKey::new("m", *group), *block_size)
            })
            .collect();
        Self {
            engine,
            namespaces,
            resolver: Resolver::new(),
            delivery,
            rng: SplitMix64::new(query_seed),
        }
    }

    fn send(&mut self, ns: usize, ev: RouterEvent) {
        let model = self.resolver.models[ns].apply(&ev);
        match self.delivery {
            Delivery::Enqueue => self.namespaces[ns].apply(ev).expect("apply"),
            Delivery::AndWait => {
                let engine = event_outcome(self.namespaces[ns].apply_and_wait(ev.clone()));
                assert_eq!(
                    engine, model,
                    "outcome of {ev:?}: engine (left), reference (right)"
                );
            }
        }
    }

    fn run(&mut self, op: &Op) {
        if let Some((ns, ev)) = self.resolver.event_of(op) {
            self.send(ns, ev);
            return;
        }
        match op {
            Op::RemoveWorker { ns, worker } => {
                self.namespaces[*ns]
                    .remove_worker(*worker)
                    .expect("remove_worker");
                self.resolver.models[*ns].remove_worker(*worker);
            }
            Op::RemoveWorkerDpRank { ns, worker, rank } => {
                self.namespaces[*ns]
                    .remove_worker_dp_rank(*worker, *rank)
                    .expect("remove_worker_dp_rank");
                self.resolver.models[*ns].remove_worker_dp_rank(*worker, *rank);
            }
            Op::Checkpoint => self.compare(),
            Op::Store { .. } | Op::Remove { .. } | Op::Clear { .. } => {
                unreachable!("events are sent above")
            }
        }
    }

    /// Queries worth asking: every held path (orphans' paths too: they must score up to the
    /// gap), each with a random extension, and a few random sequences.
    fn queries(&mut self, ns: usize) -> BTreeSet<Vec<u64>> {
        let resolver = &self.resolver;
        let paths: Vec<Vec<u64>> = resolver.models[ns]
            .streams()
            .into_iter()
            .flat_map(|s| resolver.own_blocks(ns, s))
            .map(|(_, path)| raw(&path))
            .collect();
        let mut queries = BTreeSet::new();
        queries.insert(Vec::new());
        for path in paths {
            let mut extended = path.clone();
            for _ in 0..=self.rng.below(3) {
                extended.push(1 + self.rng.below(ALPHABET + 1));
            }
            queries.insert(path);
            queries.insert(extended);
        }
        for _ in 0..16 {
            let len = 1 + self.rng.below(6);
            queries.insert((0..len).map(|_| 1 + self.rng.below(ALPHABET)).collect());
        }
        queries
    }

    /// Flush, then every read API must agree with the model in every namespace.
    fn compare(&mut self) {
        for (ns, (name, _)) in NAMESPACES.iter().enumerate() {
            self.namespaces[ns].flush().expect("flush");
            let queries = self.queries(ns);
            let (engine, model) = (&self.namespaces[ns], &self.resolver.models[ns]);
            for query in &queries {
                assert_eq!(
                    engine.find_matches(&lh(query), false).sorted(),
                    model.find_matches(&lh(query), false).sorted(),
                    "{name}: scores of {query:?}: engine (left), reference (right)"
                );
                assert_eq!(
                    engine.find_matches_tiered(&lh(query)).sorted(),
                    model
                        .find_matches_tiered(&lh(query))
                        .into_iter()
                        .collect::<Vec<_>>(),
                    "{name}: tiered depths of {query:?}: engine (left), reference (right)"
                );
            }
            let dump = engine.dump().expect("dump");
            assert_eq!(
                assert_dump_well_formed(&dump),
                model.canonical(),
                "{name}: dump: engine (left), reference (right)"
            );
            assert_eq!(dump_canonical(&model.dump()), model.canonical());
            assert_eq!(
                dump_lower_canonical(&dump),
                model.lower_blocks(),
                "{name}: lower tiers of the dump: engine (left), reference (right)"
            );
            let lower_exact: BTreeSet<_> = model
                .lower_blocks()
                .into_iter()
                .map(|(s, t, e, l, p)| (s, t as u8, e, l, p))
                .collect();
            assert_eq!(
                engine.snapshot().expect("snapshot").lower_canonical(),
                lower_exact,
                "{name}: lower tiers of the snapshot: engine (left), reference (right)"
            );
            assert_eq!(
                engine.lower_tier_block_counts(),
                model.lower_tier_block_counts(),
                "{name}: lower_tier_block_counts"
            );
            let exact: std::collections::BTreeSet<_> = model
                .held_blocks()
                .into_iter()
                .map(|(s, path, ext)| (s, path.iter().map(|l| l.0).collect::<Vec<_>>(), ext.0))
                .collect();
            assert_eq!(
                engine.snapshot().expect("snapshot").canonical(),
                exact,
                "{name}: exact snapshot (orphans included): engine (left), reference (right)"
            );
            assert_eq!(
                engine.get_workers(),
                model.get_workers(),
                "{name}: get_workers"
            );
            assert_eq!(
                engine.current_size(),
                model.current_size(),
                "{name}: current_size"
            );
            assert_eq!(
                engine.worker_block_counts(),
                model.worker_block_counts(),
                "{name}: worker_block_counts"
            );
        }
    }
}

fn check(delivery: Delivery, ops: &[Op], query_seed: u64) {
    let mut case = Case::new(delivery, query_seed);
    for op in ops {
        case.run(op);
    }
    case.compare();
    case.engine.shutdown();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn engine_state_equals_the_reference_model_after_random_event_streams(
        (_workers, ops, query_seed) in scenario(120)
    ) {
        check(Delivery::Enqueue, &ops, query_seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn every_event_outcome_equals_the_reference_model(
        (_workers, ops, query_seed) in scenario(80)
    ) {
        check(Delivery::AndWait, &ops, query_seed);
    }
}

/// The generator must produce the situations the property is about; this guards against a
/// strategy change that silently stops exercising them (checked on the model alone, so it passes
/// before the engine exists).
#[test]
fn generated_streams_exercise_failures_orphans_and_duplicates() {
    use kvindex_engine::KvCacheEventError as E;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let (mut parent_misses, mut block_misses, mut invalid) = (0, 0, 0);
    let (mut orphans, mut duplicates, mut shared_prefixes) = (0, 0, 0);
    let (mut host_continuations, mut disk_continuations) = (0, 0);
    for _ in 0..64 {
        let (_, ops, _) = scenario(120)
            .new_tree(&mut runner)
            .expect("strategy")
            .current();
        let mut resolver = Resolver::new();
        for op in &ops {
            match resolver.event_of(op) {
                Some((ns, ev)) => match resolver.models[ns].apply(&ev) {
                    Err(E::ParentBlockNotFound) => parent_misses += 1,
                    Err(E::BlockNotFound) => block_misses += 1,
                    Err(E::InvalidBlockSequence) => invalid += 1,
                    _ => {}
                },
                None => match op {
                    Op::RemoveWorker { ns, worker } => resolver.models[*ns].remove_worker(*worker),
                    Op::RemoveWorkerDpRank { ns, worker, rank } => {
                        resolver.models[*ns].remove_worker_dp_rank(*worker, *rank)
                    }
                    _ => {}
                },
            }
            for model in &resolver.models {
                orphans += usize::from(model.current_size() > model.canonical().len());
                let first_blocks: Vec<_> = model
                    .canonical()
                    .into_iter()
                    .filter(|(_, path, _)| path.len() == 1)
                    .map(|(_, path, _)| path)
                    .collect();
                let distinct: BTreeSet<_> = first_blocks.iter().collect();
                shared_prefixes += usize::from(distinct.len() < first_blocks.len());
            }
        }
        duplicates += resolver
            .models
            .iter()
            .map(|m| m.duplicate_store_warnings())
            .sum::<u64>();
        for (ns, model) in resolver.models.iter().enumerate() {
            for s in model.streams() {
                for (_, path) in resolver.own_blocks(ns, s) {
                    for d in model.find_matches_tiered(&path).values() {
                        host_continuations += usize::from(d.host > d.device && d.device > 0);
                        disk_continuations += usize::from(d.disk > d.host);
                    }
                }
            }
        }
    }
    assert!(parent_misses > 0, "no ParentBlockNotFound generated");
    assert!(block_misses > 0, "no BlockNotFound generated");
    assert!(invalid > 0, "no InvalidBlockSequence generated");
    assert!(orphans > 0, "no orphaned block generated");
    assert!(duplicates > 0, "no duplicate store generated");
    assert!(shared_prefixes > 0, "no prefix shared between streams");
    assert!(
        host_continuations > 0,
        "no host_pinned continuation of a device match"
    );
    assert!(disk_continuations > 0, "no disk/external continuation");
}
