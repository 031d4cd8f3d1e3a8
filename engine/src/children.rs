//! A node's children: one `u64` word, read lock-free, written by the node's writer under its lock.
//!
//! Encoding:
//! * `0` — no children;
//! * bit 63 clear — exactly one child, the word is `child_index + 1` (chains are the common
//!   shape: most nodes have one child, and this costs no allocation);
//! * bit 63 set — the low 63 bits point to an open-addressing table of `AtomicU32` entries
//!   (`0` empty, `TOMBSTONE` deleted, else `child_index + 1`). The key (the child's local hash)
//!   lives in the child node itself, so an entry is 4 bytes. Inserts and deletes write one entry
//!   in place (Release); growth builds a new table, publishes it and retires the old one through
//!   the epoch collector.

use crate::sync::{AtomicU32, Ordering};
use crossbeam_epoch::Guard;

const TABLE_TAG: u64 = 1 << 63;
const TOMBSTONE: u32 = u32::MAX;

/// Heap table header plus entries. `live`/`used` are writer-only bookkeeping.
pub(crate) struct ChildTable {
    mask: usize,
    live: AtomicU32,
    used: AtomicU32,
    entries: Box<[AtomicU32]>,
}

#[inline]
fn bucket(local: u64) -> usize {
    // Local hashes are xxh3 outputs: fold the halves; no further mixing needed.
    (local ^ (local >> 29)) as usize
}

impl ChildTable {
    fn with_capacity(cap: usize) -> Box<ChildTable> {
        let cap = cap.next_power_of_two().max(4);
        Box::new(ChildTable {
            mask: cap - 1,
            live: AtomicU32::new(0),
            used: AtomicU32::new(0),
            entries: (0..cap).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    /// Lock-free lookup; `local_of` reads a candidate child's local hash.
    #[inline]
    fn find(&self, local: u64, local_of: &impl Fn(u32) -> u64) -> Option<u32> {
        let mut i = bucket(local) & self.mask;
        for _ in 0..=self.mask {
            // Acquire: pairs with the Release store of the entry, which happens after the child
            // node was fully initialised.
            let e = self.entries[i].load(Ordering::Acquire);
            if e == 0 {
                return None;
            }
            if e != TOMBSTONE && local_of(e - 1) == local {
                return Some(e - 1);
            }
            i = (i + 1) & self.mask;
        }
        None
    }

    /// Writer-only: place `child` (absent) in the first free or deleted entry.
    fn insert(&self, local: u64, child: u32) {
        let mut i = bucket(local) & self.mask;
        loop {
            let e = self.entries[i].load(Ordering::Relaxed);
            if e == 0 || e == TOMBSTONE {
                if e == 0 {
                    self.used.fetch_add(1, Ordering::Relaxed);
                }
                self.live.fetch_add(1, Ordering::Relaxed);
                // Release: the child node's initialisation happens-before any reader that
                // observes this entry.
                self.entries[i].store(child + 1, crate::sync::publish_link());
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Writer-only: tombstone `child`'s entry. Returns whether it was found.
    fn remove(&self, local: u64, child: u32) -> bool {
        let mut i = bucket(local) & self.mask;
        for _ in 0..=self.mask {
            let e = self.entries[i].load(Ordering::Relaxed);
            if e == 0 {
                return false;
            }
            if e == child + 1 {
                // Release is not needed for correctness of readers (they re-check the key),
                // but keeps the publication order uniform.
                self.entries[i].store(TOMBSTONE, Ordering::Release);
                self.live.fetch_sub(1, Ordering::Relaxed);
                return true;
            }
            i = (i + 1) & self.mask;
        }
        false
    }

    fn live_children(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().filter_map(|e| {
            let e = e.load(Ordering::Acquire);
            (e != 0 && e != TOMBSTONE).then(|| e - 1)
        })
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<ChildTable>() + self.entries.len() * 4
    }
}

/// Whether a (nonzero) children word points to a table rather than naming its only child.
#[inline]
pub(crate) fn is_table(word: u64) -> bool {
    word & TABLE_TAG != 0
}

#[inline]
fn table(word: u64, _guard: &Guard) -> &ChildTable {
    crate::sync::heap_read((word & !TABLE_TAG) as usize);
    // SAFETY: a tagged word is only built by `publish_table` from `Box::into_raw`, and a table is
    // freed only by `retire_table`, deferred past every guard pinned while it was published.
    unsafe { &*((word & !TABLE_TAG) as *const ChildTable) }
}

/// Lock-free: the child of a node with children word `word` whose local hash is `local`.
#[inline]
pub(crate) fn find_child(
    word: u64,
    local: u64,
    local_of: &impl Fn(u32) -> u64,
    guard: &Guard,
) -> Option<u32> {
    if word == 0 {
        None
    } else if word & TABLE_TAG == 0 {
        let c = (word - 1) as u32;
        (local_of(c) == local).then_some(c)
    } else {
        table(word, guard).find(local, local_of)
    }
}

/// Every child index of a children word.
pub(crate) fn for_each_child(word: u64, guard: &Guard, mut f: impl FnMut(u32)) {
    if word == 0 {
    } else if word & TABLE_TAG == 0 {
        f((word - 1) as u32)
    } else {
        for c in table(word, guard).live_children() {
            f(c)
        }
    }
}

/// Heap bytes owned by a children word (for memory reports).
pub(crate) fn heap_bytes(word: u64, guard: &Guard) -> usize {
    if word & TABLE_TAG != 0 {
        table(word, guard).bytes()
    } else {
        0
    }
}

fn publish_table(t: Box<ChildTable>) -> u64 {
    let p = Box::into_raw(t) as u64;
    debug_assert_eq!(p & TABLE_TAG, 0);
    crate::sync::heap_allocated(p as usize);
    p | TABLE_TAG
}

fn retire_table(word: u64, guard: &Guard) {
    if word & TABLE_TAG == 0 {
        return;
    }
    let addr = (word & !TABLE_TAG) as usize;
    // SAFETY: the table was unpublished by the caller (its node's word now points elsewhere),
    // so only readers pinned before that can reach it; the free is deferred past them.
    unsafe {
        guard.defer_unchecked(move || {
            crate::sync::heap_free(addr, || drop(Box::from_raw(addr as *mut ChildTable)))
        });
    }
}

/// Free a children word's table immediately (exclusive access: teardown).
pub(crate) fn free_now(word: u64) {
    if word & TABLE_TAG != 0 {
        let addr = (word & !TABLE_TAG) as usize;
        // SAFETY: exclusive access guaranteed by the caller; the pointer came from Box::into_raw.
        crate::sync::heap_free(addr, || {
            drop(unsafe { Box::from_raw(addr as *mut ChildTable) })
        });
    }
}

/// Writer-only (node lock held): add `child` (with local hash `local`, not yet a child).
/// Returns the new word to publish if it changed (the caller stores it with Release).
pub(crate) fn insert_child(
    word: u64,
    local: u64,
    child: u32,
    local_of: &impl Fn(u32) -> u64,
    guard: &Guard,
) -> Option<u64> {
    if word == 0 {
        return Some(child as u64 + 1);
    }
    if word & TABLE_TAG == 0 {
        let only = (word - 1) as u32;
        let t = ChildTable::with_capacity(4);
        t.insert(local_of(only), only);
        t.insert(local, child);
        return Some(publish_table(t));
    }
    let t = table(word, guard);
    let used = t.used.load(Ordering::Relaxed) as usize;
    if (used + 1) * 2 > t.mask + 1 {
        // Rebuild: drops tombstones and doubles when mostly live.
        let live = t.live.load(Ordering::Relaxed) as usize;
        let fresh = ChildTable::with_capacity((live + 1) * 4);
        for c in t.live_children() {
            fresh.insert(local_of(c), c);
        }
        fresh.insert(local, child);
        retire_table(word, guard);
        return Some(publish_table(fresh));
    }
    t.insert(local, child);
    None
}

/// Writer-only (node lock held): remove `child`. Returns the new word if it changed.
pub(crate) fn remove_child(word: u64, local: u64, child: u32, guard: &Guard) -> Option<u64> {
    if word == 0 {
        return None;
    }
    if word & TABLE_TAG == 0 {
        return ((word - 1) as u32 == child).then_some(0);
    }
    let t = table(word, guard);
    if !t.remove(local, child) {
        return None;
    }
    let live = t.live.load(Ordering::Relaxed);
    if live <= 1 {
        let rest = t.live_children().next();
        retire_table(word, guard);
        return Some(rest.map_or(0, |c| c as u64 + 1));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_table_and_back() {
        let guard = crossbeam_epoch::pin();
        let locals = |c: u32| (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut w = 0u64;
        for c in 0..100u32 {
            if let Some(n) = insert_child(w, locals(c), c, &locals, &guard) {
                w = n;
            }
        }
        for c in 0..100u32 {
            assert_eq!(find_child(w, locals(c), &locals, &guard), Some(c));
        }
        assert_eq!(find_child(w, 12345, &locals, &guard), None);
        for c in 0..99u32 {
            if let Some(n) = remove_child(w, locals(c), c, &guard) {
                w = n;
            }
            assert_eq!(find_child(w, locals(c), &locals, &guard), None);
        }
        assert_eq!(w, 100, "one child left collapses to the inline form");
        assert_eq!(remove_child(w, locals(99), 99, &guard), Some(0));
    }
}
