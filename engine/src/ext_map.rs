//! One shard of the shared `external hash -> block id` map.
//!
//! Why not hashbrown (which the tree used before): the map is probed once per stored and once
//! per evicted block, and on the reference workload it is far larger than the caches, so every
//! operation is a cache miss. hashbrown keeps control bytes and entries in separate arrays (two
//! misses per operation) and leaves tombstones that eviction churn turns into periodic
//! in-place rehashes; plain linear probing at a memory-friendly load walks long clusters on
//! insert and delete. This table is an array of cache-line buckets: seven `(32-bit tag, block
//! id)` entries and an overflow count (how many entries whose home is this bucket or earlier
//! live past it). An operation reads its home bucket (which a batch prefetches), and moves on
//! only while the overflow count says an entry may be further on. Deletes just clear a slot and
//! decrement the counts on the way, so the table never needs cleaning. Lookups by hash confirm
//! a tag match against the block's stored hash (`eq`); deletions match the whole entry.

const WAYS: usize = 7;

/// One cache line: seven entries (`0` = empty; block id 0 is reserved) and an overflow count.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    e: [u64; WAYS],
    overflow: u64,
}

/// Bucketed open-addressing table of `(tag, block id)` entries.
#[derive(Default)]
pub(crate) struct ExtTable {
    buckets: Vec<Bucket>,
    len: usize,
}

/// The tag of a mixed hash: its high half. The home bucket is the tag scaled to the capacity.
#[inline]
fn tag_of(h: u64) -> u32 {
    (h >> 32) as u32
}

#[inline]
fn entry(tag: u32, id: u32) -> u64 {
    (tag as u64) << 32 | id as u64
}

impl ExtTable {
    /// Buckets that hold `entries` below the growth threshold of `claim` (80 % of the slots).
    fn buckets_for(entries: usize) -> usize {
        entries.saturating_mul(10).div_ceil(WAYS * 8)
    }

    /// Bytes of a table made by `with_capacity(entries)`.
    pub(crate) fn bytes_for(entries: usize) -> usize {
        Self::buckets_for(entries) * std::mem::size_of::<Bucket>()
    }

    /// A table that holds `entries` without growing (none: empty, no allocation).
    pub(crate) fn with_capacity(entries: usize) -> ExtTable {
        ExtTable {
            buckets: vec![Bucket::default(); Self::buckets_for(entries)],
            len: 0,
        }
    }

    /// The home bucket of `tag` among `n` buckets: the tag scaled to `n` (any `n`, so the table
    /// can grow by half instead of doubling).
    #[inline]
    fn home(tag: u32, n: usize) -> usize {
        ((tag as u64 * n as u64) >> 32) as usize
    }

    #[inline]
    fn next(i: usize, n: usize) -> usize {
        if i + 1 == n {
            0
        } else {
            i + 1
        }
    }

    /// Where the buckets are now, for [`prefetch`]: `(address, bucket count)`.
    pub(crate) fn location(&self) -> (usize, usize) {
        (self.buckets.as_ptr() as usize, self.buckets.len())
    }

    /// The id stored under mixed hash `h` for which `eq(id)` holds.
    #[inline]
    pub(crate) fn find(&self, h: u64, eq: impl Fn(u32) -> bool) -> Option<u32> {
        let n = self.buckets.len();
        if n == 0 {
            return None;
        }
        let tag = tag_of(h);
        let mut i = Self::home(tag, n);
        for _ in 0..n {
            let b = &self.buckets[i];
            for &e in &b.e {
                if e != 0 && (e >> 32) as u32 == tag && eq(e as u32) {
                    return Some(e as u32);
                }
            }
            if b.overflow == 0 {
                return None;
            }
            i = Self::next(i, n);
        }
        None
    }

    /// Store `id` under `h` unless an id for which `eq` holds is there already (then false).
    pub(crate) fn claim(&mut self, h: u64, id: u32, eq: impl Fn(u32) -> bool) -> bool {
        debug_assert_ne!(id, 0, "block id 0 marks an empty slot");
        if self.find(h, &eq).is_some() {
            return false;
        }
        // At most 80% full: an overflow is then rare, and most operations read one line.
        if (self.len + 1) * 10 > self.buckets.len() * WAYS * 8 {
            self.grow();
        }
        Self::place(&mut self.buckets, entry(tag_of(h), id));
        self.len += 1;
        true
    }

    /// Put `e` in the first free slot from its home bucket on, counting the overflow in every
    /// full bucket it passes.
    fn place(buckets: &mut [Bucket], e: u64) {
        let n = buckets.len();
        let home = Self::home((e >> 32) as u32, n);
        let mut i = home;
        loop {
            if let Some(slot) = buckets[i].e.iter_mut().find(|x| **x == 0) {
                *slot = e;
                break;
            }
            i = Self::next(i, n);
        }
        let mut j = home;
        while j != i {
            buckets[j].overflow += 1;
            j = Self::next(j, n);
        }
    }

    /// Remove the entry `(h, id)`. False if it is not there.
    pub(crate) fn remove(&mut self, h: u64, id: u32) -> bool {
        let n = self.buckets.len();
        if n == 0 {
            return false;
        }
        let want = entry(tag_of(h), id);
        let home = Self::home(tag_of(h), n);
        let mut i = home;
        for _ in 0..n {
            let b = &mut self.buckets[i];
            if let Some(slot) = b.e.iter_mut().find(|x| **x == want) {
                *slot = 0;
                let mut j = home;
                while j != i {
                    self.buckets[j].overflow -= 1;
                    j = Self::next(j, n);
                }
                self.len -= 1;
                return true;
            }
            if b.overflow == 0 {
                return false;
            }
            i = Self::next(i, n);
        }
        false
    }

    /// Grow by half (not by doubling: the map is a large share of the index's memory).
    fn grow(&mut self) {
        self.rebuild((self.buckets.len() + self.buckets.len() / 2).max(2));
    }

    /// Make the table hold `entries` without growing, as `with_capacity(entries)` does: every
    /// entry is re-placed into a larger table. A table that large already is left as it is
    /// (never shrunk).
    pub(crate) fn reserve(&mut self, entries: usize) {
        let n = Self::buckets_for(entries);
        if n > self.buckets.len() {
            self.rebuild(n);
        }
    }

    /// Move every entry into a new table of `n` buckets (at least as many as now).
    fn rebuild(&mut self, n: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![Bucket::default(); n]);
        for b in old {
            for e in b.e.into_iter().filter(|&e| e != 0) {
                Self::place(&mut self.buckets, e);
            }
        }
    }

    /// Heap bytes of the bucket array.
    pub(crate) fn bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<Bucket>()
    }

    /// Entries stored.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Buckets allocated.
    #[cfg(test)]
    pub(crate) fn bucket_count(&self) -> usize {
        self.buckets.len()
    }
}

/// Hint the CPU to fetch the home bucket of mixed hash `h` in a table last seen at `location`,
/// and the bucket after it: a claim (an absent hash) reads on past the home bucket whenever its
/// overflow count is non-zero, about a third of the time at the loads the table runs at, and
/// that second line was a full miss (prefetching it: ingest +3–11 % in three 5-pair A/Bs,
/// docs/benchmarks.md). The location is read without the shard's lock, so possibly stale: a
/// prefetch of a stale address (or one past the table's end) is harmless, it never faults and
/// has no architectural effect.
#[inline]
pub(crate) fn prefetch(location: (usize, usize), h: u64) {
    let (addr, n) = location;
    if addr == 0 || n == 0 {
        return;
    }
    let p = addr.wrapping_add(ExtTable::home(tag_of(h), n) * std::mem::size_of::<Bucket>());
    crate::sync::prefetch_line(p);
    crate::sync::prefetch_line(p.wrapping_add(64));
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mix(x: u64) -> u64 {
        let x = (x ^ (x >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    /// Every 3rd key shares its tag with another one; every 5th lands in one crowded home
    /// bucket (so overflow chains form and are unwound by removals).
    fn hash(key: u64) -> u64 {
        if key.is_multiple_of(5) {
            (key % 64) << 32 | 1
        } else if key.is_multiple_of(3) {
            mix(key) & 0xFFFF_FFFF_0000_0000 | 7
        } else {
            mix(key)
        }
    }

    /// A table sized for `n` entries takes `n` claims without moving, and grows past them.
    #[test]
    fn a_presized_table_holds_its_capacity_without_growing() {
        let n = 10_000;
        let mut t = ExtTable::with_capacity(n);
        let (at, buckets) = t.location();
        assert!(buckets * WAYS >= n);
        for key in 1..=n as u64 {
            assert!(t.claim(mix(key), key as u32, |_| false));
        }
        assert_eq!(
            t.location(),
            (at, buckets),
            "the table moved before its capacity"
        );
        assert_eq!(t.len(), n);
        for key in n as u64 + 1..=n as u64 + 2 * WAYS as u64 {
            assert!(t.claim(mix(key), key as u32, |_| false));
        }
        assert!(
            t.bucket_count() > buckets,
            "the table must grow past its capacity"
        );
        for key in 1..=n as u64 + 2 * WAYS as u64 {
            assert_eq!(t.find(mix(key), |id| id as u64 == key), Some(key as u32));
        }
        assert_eq!(ExtTable::with_capacity(0).bucket_count(), 0);
        assert_eq!(ExtTable::bytes_for(n), buckets * 64);
    }

    /// `reserve` on a table holding entries keeps them all and then holds the reserved count
    /// without growing; it never shrinks a table.
    #[test]
    fn reserve_keeps_the_entries_and_presizes_the_table() {
        let mut t = ExtTable::default();
        for key in 1..=1000u64 {
            assert!(t.claim(hash(key), key as u32, |_| false));
        }
        let n = 20_000;
        t.reserve(n);
        let (at, buckets) = t.location();
        assert_eq!(buckets, ExtTable::with_capacity(n).bucket_count());
        for key in 1..=1000u64 {
            assert_eq!(t.find(hash(key), |id| id as u64 == key), Some(key as u32));
        }
        for key in 1001..=n as u64 {
            assert!(t.claim(mix(key), key as u32, |_| false));
        }
        assert_eq!(
            t.location(),
            (at, buckets),
            "the table grew before its reserve"
        );
        t.reserve(10);
        assert_eq!(t.location(), (at, buckets), "reserve shrank the table");
        assert_eq!(t.len(), n);
    }

    /// Random claims and removals against a HashMap.
    #[test]
    fn claims_finds_and_removals_agree_with_a_hash_map() {
        let mut t = ExtTable::default();
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut ext_of: HashMap<u32, u64> = HashMap::new();
        let mut x = 12345u64;
        let mut next_id = 1u32;
        for step in 0..200_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let key = (x >> 40) % 5000;
            let h = hash(key);
            if step % 3 == 2 {
                if let Some(id) = model.remove(&key) {
                    assert!(t.remove(h, id), "entry for {key} missing");
                    ext_of.remove(&id);
                } else {
                    assert!(!t.remove(h, next_id + 1_000_000));
                }
            } else {
                let id = next_id;
                next_id += 1;
                ext_of.insert(id, key);
                let claimed = t.claim(h, id, |m| ext_of.get(&m) == Some(&key));
                assert_eq!(claimed, !model.contains_key(&key));
                if claimed {
                    model.insert(key, id);
                } else {
                    ext_of.remove(&id);
                }
            }
            if step % 997 == 0 {
                assert_eq!(t.len(), model.len());
                for (&k, &id) in &model {
                    let h = hash(k);
                    assert_eq!(t.find(h, |m| ext_of.get(&m) == Some(&k)), Some(id));
                }
            }
        }
    }
}
