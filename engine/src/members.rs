//! Which worker slots hold a node: one `u64` word, published atomically.
//!
//! Encoding (the word is only ever replaced whole, by the node's writer under its lock):
//! * `0` — nobody;
//! * bit 63 clear — inline: bits 0..32 hold `slot + 1` (0 = empty), bits 32..63 hold `slot + 1`;
//!   most blocks of a real trace are held by one or two workers, so this is the common case and
//!   costs no allocation;
//! * bit 63 set — the low 63 bits point to a heap bitset `[n_words, count, bits...]` that is
//!   immutable once published; a change builds a new one and retires the old one through the
//!   epoch collector, so a pinned reader always sees one complete state.

use crossbeam_epoch::Guard;

const HEAP_TAG: u64 = 1 << 63;
/// Largest slot representable inline (31 bits for the high half, minus the +1 bias).
pub(crate) const MAX_SLOT: u32 = (1 << 31) - 2;

/// A read-only view of one published membership word.
#[derive(Clone, Copy)]
pub(crate) enum Members<'g> {
    Inline(u64),
    Bits(&'g [u64]),
}

#[inline]
fn inline_slots(word: u64) -> [Option<u32>; 2] {
    let lo = (word & 0xFFFF_FFFF) as u32;
    let hi = ((word >> 32) & 0x7FFF_FFFF) as u32;
    [lo.checked_sub(1), hi.checked_sub(1)]
}

#[inline]
fn heap_words<'g>(word: u64) -> &'g [u64] {
    let ptr = (word & !HEAP_TAG) as *const u64;
    crate::sync::heap_read(ptr as usize);
    // SAFETY: a tagged word is only ever built by `encode_heap` from a leaked `Box<[u64]>` whose
    // first element is the number of bitset words `n` (so the allocation has `n + 2` words). It
    // is freed only through `retire`, which defers the free until every guard pinned before the
    // unlink is dropped; callers hold such a guard for `'g`.
    unsafe {
        let n = *ptr as usize;
        std::slice::from_raw_parts(ptr.add(2), n)
    }
}

/// Hint the CPU to fetch the heap set a membership word points to (nothing for inline words).
#[inline]
pub(crate) fn prefetch(word: u64) {
    if word & HEAP_TAG != 0 {
        crate::sync::prefetch_line((word & !HEAP_TAG) as usize);
    }
}

impl<'g> Members<'g> {
    /// Interpret a word loaded (Acquire) from a node, valid while `_guard` is pinned.
    #[inline]
    pub(crate) fn from_word(word: u64, _guard: &'g Guard) -> Members<'g> {
        if word & HEAP_TAG != 0 {
            Members::Bits(heap_words(word))
        } else {
            Members::Inline(word)
        }
    }

    #[inline]
    pub(crate) fn contains(&self, slot: u32) -> bool {
        match *self {
            Members::Inline(w) => inline_slots(w).contains(&Some(slot)),
            Members::Bits(bits) => bits
                .get((slot / 64) as usize)
                .is_some_and(|b| b & (1u64 << (slot % 64)) != 0),
        }
    }

    /// Every slot, ascending for heap sets.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32)) {
        match *self {
            Members::Inline(w) => {
                for s in inline_slots(w).into_iter().flatten() {
                    f(s)
                }
            }
            Members::Bits(bits) => {
                for (i, &b) in bits.iter().enumerate() {
                    let mut b = b;
                    while b != 0 {
                        let t = b.trailing_zeros();
                        f(i as u32 * 64 + t);
                        b &= b - 1;
                    }
                }
            }
        }
    }

    pub(crate) fn to_vec(self) -> Vec<u32> {
        let mut v = Vec::new();
        self.for_each(|s| v.push(s));
        v
    }
}

/// Build the word for a set of slots (sorted or not, without duplicates).
pub(crate) fn encode(slots: &[u32]) -> u64 {
    match slots {
        [] => 0,
        [a] => (*a as u64) + 1,
        [a, b] => ((*a as u64) + 1) | (((*b as u64) + 1) << 32),
        _ => encode_heap(slots),
    }
}

fn encode_heap(slots: &[u32]) -> u64 {
    let max = slots.iter().copied().max().unwrap_or(0);
    let n = (max / 64 + 1) as usize;
    let mut words = vec![0u64; n + 2].into_boxed_slice();
    words[0] = n as u64;
    words[1] = slots.len() as u64;
    for &s in slots {
        words[2 + (s / 64) as usize] |= 1u64 << (s % 64);
    }
    let ptr = Box::into_raw(words) as *mut u64 as u64;
    debug_assert_eq!(ptr & HEAP_TAG, 0);
    crate::sync::heap_allocated(ptr as usize);
    ptr | HEAP_TAG
}

/// Free a word that has been unpublished: its heap set (if any) is dropped after the grace
/// period. Inline words own nothing.
pub(crate) fn retire(word: u64, guard: &Guard) {
    if word & HEAP_TAG == 0 {
        return;
    }
    let addr = (word & !HEAP_TAG) as usize;
    // SAFETY: `addr` points to a leaked boxed slice built by `encode_heap`; the word has been
    // replaced in its node, so only readers pinned before the replacement can still see it, and
    // `defer_unchecked` runs the closure only after all of them are unpinned.
    unsafe {
        guard.defer_unchecked(move || crate::sync::heap_free(addr, || free_heap(addr)));
    }
}

/// Free a word immediately (the node is being torn down with no possible reader: Drop).
pub(crate) fn free_now(word: u64) {
    if word & HEAP_TAG == 0 {
        return;
    }
    let addr = (word & !HEAP_TAG) as usize;
    // SAFETY: as in `retire`, but the caller guarantees exclusive access (no reader exists).
    crate::sync::heap_free(addr, || unsafe { free_heap(addr) });
}

/// Drop the heap set at `addr`.
///
/// # Safety
/// `addr` must come from `encode_heap`, be unreachable by any reader, and be freed only once.
unsafe fn free_heap(addr: usize) {
    let ptr = addr as *mut u64;
    let n = *ptr as usize;
    drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
        ptr,
        n + 2,
    )));
}

/// The word after adding `slot` to `word`'s set (`None` if already present).
pub(crate) fn with_added(word: u64, slot: u32, guard: &Guard) -> Option<u64> {
    let m = Members::from_word(word, guard);
    if m.contains(slot) {
        return None;
    }
    if let Members::Inline(w) = m {
        let [lo, hi] = inline_slots(w);
        match (lo, hi) {
            (None, None) => return Some(slot as u64 + 1),
            (Some(a), None) => return Some(encode(&[a, slot])),
            (None, Some(b)) => return Some(encode(&[slot, b])),
            _ => {}
        }
    }
    let mut v = m.to_vec();
    v.push(slot);
    Some(encode(&v))
}

/// The word after removing `slot` (`None` if absent). Sets shrink back to inline at 2 members.
pub(crate) fn with_removed(word: u64, slot: u32, guard: &Guard) -> Option<u64> {
    let m = Members::from_word(word, guard);
    if !m.contains(slot) {
        return None;
    }
    if let Members::Inline(w) = m {
        // No allocation on the common path: keep the other inline slot, if any.
        let other = inline_slots(w).into_iter().flatten().find(|&s| s != slot);
        return Some(other.map_or(0, |s| s as u64 + 1));
    }
    let mut v = m.to_vec();
    v.retain(|&s| s != slot);
    Some(encode(&v))
}

/// Number of members in a word.
pub(crate) fn count(word: u64, guard: &Guard) -> usize {
    match Members::from_word(word, guard) {
        Members::Inline(w) => inline_slots(w).iter().flatten().count(),
        Members::Bits(_) => {
            let ptr = (word & !HEAP_TAG) as *const u64;
            // SAFETY: see `heap_words`: word 1 of a published heap set is its member count.
            unsafe { *ptr.add(1) as usize }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_heap_sets_round_trip() {
        let guard = crossbeam_epoch::pin();
        let mut w = 0u64;
        for s in [5u32, 0, 200, 77, 1000] {
            let next = with_added(w, s, &guard).unwrap();
            retire(w, &guard);
            w = next;
        }
        assert_eq!(count(w, &guard), 5);
        let m = Members::from_word(w, &guard);
        assert_eq!(m.to_vec(), vec![0, 5, 77, 200, 1000]);
        assert!(with_added(w, 77, &guard).is_none());
        for s in [200u32, 0, 1000] {
            let next = with_removed(w, s, &guard).unwrap();
            retire(w, &guard);
            w = next;
        }
        let m = Members::from_word(w, &guard);
        assert!(matches!(m, Members::Inline(_)));
        let mut got = m.to_vec();
        got.sort();
        assert_eq!(got, vec![5, 77]);
        assert!(with_removed(w, 9, &guard).is_none());
        let w = with_removed(with_removed(w, 5, &guard).unwrap(), 77, &guard).unwrap();
        assert_eq!(w, 0);
        assert_eq!(count(w, &guard), 0);
    }

    #[test]
    fn largest_inline_slot_survives_encoding() {
        let guard = crossbeam_epoch::pin();
        let w = encode(&[MAX_SLOT, 3]);
        let mut got = Members::from_word(w, &guard).to_vec();
        got.sort();
        assert_eq!(got, vec![3, MAX_SLOT]);
    }
}
