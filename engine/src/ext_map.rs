//! One shard of the shared `external hash -> block id` map.
//!
//! Why not hashbrown (which the tree used before): the map is probed once per stored and once
//! per evicted block, and on the reference workload it is far larger than the caches, so every
//! operation is a cache miss. hashbrown keeps control bytes and entries in separate arrays (two
//! misses per operation) and leaves tombstones that eviction churn turns into periodic
//! in-place rehashes. This table keeps a 32-bit hash tag beside the block id in one `u64`
//! entry, probes linearly (eight entries per cache line), and deletes by backward shift, so an
//! operation touches one cache line and the table never needs cleaning. Lookups by hash confirm
//! a tag match against the block's stored hash (`eq`); deletions match the whole entry.

/// Open-addressing table of `(tag, block id)` entries; `0` is empty (block id 0 is reserved).
#[derive(Default)]
pub(crate) struct ExtTable {
    slots: Vec<u64>,
    len: usize,
}

/// The tag of a mixed hash: its high half. The home slot is the tag's low bits.
#[inline]
fn tag_of(h: u64) -> u32 {
    (h >> 32) as u32
}

#[inline]
fn entry(tag: u32, id: u32) -> u64 {
    (tag as u64) << 32 | id as u64
}

impl ExtTable {
    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    /// Hint the CPU to fetch the home slot of `h` (batches issue these ahead of their probes).
    #[inline]
    pub(crate) fn prefetch(&self, h: u64) {
        if self.slots.is_empty() {
            return;
        }
        let i = tag_of(h) as usize & self.mask();
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        // SAFETY: `i` is in bounds (masked by len - 1 of a non-empty power-of-two table); a
        // prefetch has no architectural effect.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch(self.slots.as_ptr().add(i) as *const i8, _MM_HINT_T0);
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        let _ = i;
    }

    /// The id stored under mixed hash `h` for which `eq(id)` holds.
    #[inline]
    pub(crate) fn find(&self, h: u64, eq: impl Fn(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let tag = tag_of(h);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        loop {
            let e = self.slots[i];
            if e == 0 {
                return None;
            }
            if (e >> 32) as u32 == tag && eq(e as u32) {
                return Some(e as u32);
            }
            i = (i + 1) & mask;
        }
    }

    /// Store `id` under `h` unless an id for which `eq` holds is there already (then false).
    pub(crate) fn claim(&mut self, h: u64, id: u32, eq: impl Fn(u32) -> bool) -> bool {
        debug_assert_ne!(id, 0, "block id 0 marks an empty slot");
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.grow();
        }
        let tag = tag_of(h);
        let mask = self.mask();
        let mut i = tag as usize & mask;
        loop {
            let e = self.slots[i];
            if e == 0 {
                self.slots[i] = entry(tag, id);
                self.len += 1;
                return true;
            }
            if (e >> 32) as u32 == tag && eq(e as u32) {
                return false;
            }
            i = (i + 1) & mask;
        }
    }

    /// Remove the entry `(h, id)`. False if it is not there.
    pub(crate) fn remove(&mut self, h: u64, id: u32) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let want = entry(tag_of(h), id);
        let mask = self.mask();
        let mut i = tag_of(h) as usize & mask;
        loop {
            let e = self.slots[i];
            if e == 0 {
                return false;
            }
            if e == want {
                break;
            }
            i = (i + 1) & mask;
        }
        // Backward shift: pull later entries of the probe run into the hole when their home is
        // not between the hole and themselves, so every entry stays reachable from its home.
        let mut hole = i;
        let mut k = i;
        loop {
            k = (k + 1) & mask;
            let e = self.slots[k];
            if e == 0 {
                break;
            }
            let home = (e >> 32) as usize & mask;
            if (k.wrapping_sub(home) & mask) >= (k.wrapping_sub(hole) & mask) {
                self.slots[hole] = e;
                hole = k;
            }
        }
        self.slots[hole] = 0;
        self.len -= 1;
        true
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![0; cap]);
        let mask = cap - 1;
        for e in old.into_iter().filter(|&e| e != 0) {
            let mut i = (e >> 32) as usize & mask;
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = e;
        }
    }

    /// Heap bytes of the slot array.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.capacity() * 8
    }

    /// Entries stored.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn mix(x: u64) -> u64 {
        let x = (x ^ (x >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^ (x >> 29)
    }

    /// Random claims and removals, with colliding tags forced, against a HashMap.
    #[test]
    fn claims_finds_and_removals_agree_with_a_hash_map() {
        let mut t = ExtTable::default();
        let mut model: HashMap<u64, u32> = HashMap::new();
        let mut ext_of: HashMap<u32, u64> = HashMap::new();
        let mut x = 12345u64;
        let mut next_id = 1u32;
        for step in 0..200_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Few distinct keys, and every 3rd key shares its tag with another one.
            let key = (x >> 40) % 5000;
            let h = if key % 3 == 0 {
                mix(key) & 0xFFFF_FFFF_0000_0000 | 7
            } else {
                mix(key)
            };
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
                    let h = if k % 3 == 0 {
                        mix(k) & 0xFFFF_FFFF_0000_0000 | 7
                    } else {
                        mix(k)
                    };
                    assert_eq!(t.find(h, |m| ext_of.get(&m) == Some(&k)), Some(id));
                }
            }
        }
    }
}
