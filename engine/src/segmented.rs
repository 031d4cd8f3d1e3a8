//! An append-only vector whose elements never move: element `i` lives in chunk `k` of size
//! `BASE << k`, so growing never relocates anything a lock-free reader may be looking at.
//!
//! Used for tree nodes (indexed by `u32`, which halves pointer size) and for worker slots.
//! Elements are never dropped individually: callers recycle indices through their own free
//! lists, after an epoch grace period (see `tree.rs`).

use crate::sync::{AtomicPtr, AtomicU32, AtomicU64, Mutex, Ordering};

#[cfg(not(loom))]
const BASE_BITS: u32 = 10;
/// loom models hold a handful of nodes: tiny chunks keep every model's state small.
#[cfg(loom)]
const BASE_BITS: u32 = 1;
const BASE: u32 = 1 << BASE_BITS;
/// `BASE * (2^MAX_CHUNKS - 1)` elements in all: about 4.3 billion with 22 chunks.
#[cfg(not(loom))]
const MAX_CHUNKS: usize = 22;
#[cfg(loom)]
const MAX_CHUNKS: usize = 6;

/// Fixed-address, grow-only storage for zero-initialisable elements addressed by `u32`.
pub(crate) struct SegmentedVec<T> {
    chunks: [AtomicPtr<T>; MAX_CHUNKS],
    /// Number of chunks allocated (for Drop; guarded by `grow`).
    grow: Mutex<usize>,
    /// High-water mark of handed-out indices.
    len: AtomicU32,
}

#[inline]
fn locate(index: u32) -> (usize, usize) {
    let j = index as u64 + BASE as u64;
    let k = (63 - j.leading_zeros()) - BASE_BITS;
    let offset = j - ((BASE as u64) << k);
    (k as usize, offset as usize)
}

#[inline]
fn chunk_len(k: usize) -> usize {
    (BASE as usize) << k
}

/// Marker for element types whose all-zero bit pattern is their valid default (atomics and
/// structs of atomics), so chunks can come straight from `alloc_zeroed`: pages the index never
/// touches are never faulted in.
///
/// # Safety
/// Implement only for types for which all-zero bytes are a valid, initialised value.
#[cfg(not(loom))]
pub(crate) unsafe trait Zeroable {}
/// Under loom, atomics are handles into the model's state, not plain integers, so chunks are
/// built element by element from `Default` instead of zeroed memory.
///
/// # Safety
/// As above (the same impls serve both builds).
#[cfg(loom)]
pub(crate) unsafe trait Zeroable: Default {}

impl<T: Zeroable> SegmentedVec<T> {
    pub(crate) fn new() -> Self {
        Self {
            chunks: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            grow: Mutex::new(0),
            len: AtomicU32::new(0),
        }
    }

    /// Hand out a never-used index, allocating its chunk if needed. `None` when exhausted.
    pub(crate) fn push_index(&self) -> Option<u32> {
        self.push_indices(1)
    }

    /// Make sure `index` is addressable (for arrays kept parallel to another one, which hands
    /// out the indices).
    pub(crate) fn ensure(&self, index: u32) {
        let (k, _) = locate(index);
        if k < MAX_CHUNKS && self.allocate_through(k) {
            self.len.fetch_max(index + 1, Ordering::Relaxed);
        }
    }

    /// Allocate chunks up to and including `k`. False when memory ran out.
    fn allocate_through(&self, k: usize) -> bool {
        // Acquire: pairs with the Release below, so the chunk's initialised elements are visible.
        if !self.chunks[k].load(Ordering::Acquire).is_null() {
            return true;
        }
        let mut allocated = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        while *allocated <= k {
            let ptr = Self::alloc_chunk(chunk_len(*allocated));
            if ptr.is_null() {
                return false;
            }
            // Release: publishes the initialised chunk to every later Acquire load.
            self.chunks[*allocated].store(ptr, Ordering::Release);
            *allocated += 1;
        }
        true
    }

    /// Hand out `n` consecutive never-used indices (the first is returned), allocating chunks as
    /// needed. `None` when exhausted.
    pub(crate) fn push_indices(&self, n: u32) -> Option<u32> {
        let first = self.len.fetch_add(n, Ordering::Relaxed);
        let index = first.checked_add(n - 1)?;
        let (k, _) = locate(index);
        if k >= MAX_CHUNKS {
            return None;
        }
        if !self.allocate_through(k) {
            return None;
        }
        Some(first)
    }

    #[cfg(loom)]
    fn alloc_chunk(len: usize) -> *mut T {
        let chunk: Box<[T]> = (0..len).map(|_| T::default()).collect();
        Box::into_raw(chunk) as *mut T
    }

    #[cfg(not(loom))]
    fn alloc_chunk(len: usize) -> *mut T {
        let Ok(layout) = std::alloc::Layout::array::<T>(len) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `layout` has non-zero size (len >= BASE, T is not zero-sized in our uses), and
        // `T: Zeroable` makes the zeroed memory a valid `[T; len]`.
        unsafe { std::alloc::alloc_zeroed(layout) as *mut T }
    }

    /// Number of indices handed out so far (some may be free in a caller's free list).
    pub(crate) fn high_water(&self) -> u32 {
        self.len.load(Ordering::Acquire).min(self.capacity_limit())
    }

    fn capacity_limit(&self) -> u32 {
        let allocated = self.grow.lock().map(|g| *g).unwrap_or(0);
        let mut total: u64 = 0;
        for k in 0..allocated {
            total += chunk_len(k) as u64;
        }
        total.min(u32::MAX as u64) as u32
    }

    /// The element at `index`. The index must have come from `push_index` (directly or via a
    /// published link); anything else is a caller bug and panics rather than reading wild memory.
    #[inline]
    pub(crate) fn get(&self, index: u32) -> &T {
        let (k, offset) = locate(index);
        // Acquire: pairs with the Release store that published the chunk.
        let ptr = self.chunks[k].load(Ordering::Acquire);
        assert!(
            !ptr.is_null(),
            "segmented index {index} was never allocated"
        );
        // SAFETY: chunk `k` was allocated with `chunk_len(k)` initialised elements, `offset` is
        // below that length by construction of `locate`, and chunks are freed only in Drop,
        // which needs `&mut self`, so no shared reference can outlive it.
        unsafe { &*ptr.add(offset) }
    }

    /// The elements `start..start + len` as contiguous slices (one per chunk they span), in
    /// order, until `f` returns false. Every index must have been handed out.
    #[inline]
    pub(crate) fn for_each_slice(&self, start: u32, len: u32, mut f: impl FnMut(&[T]) -> bool) {
        let mut at = start;
        let end = start as u64 + len as u64;
        while (at as u64) < end {
            let (k, offset) = locate(at);
            let ptr = self.chunks[k].load(Ordering::Acquire);
            assert!(!ptr.is_null(), "segmented index {at} was never allocated");
            let n = (chunk_len(k) - offset).min((end - at as u64) as usize);
            // SAFETY: chunk `k` holds `chunk_len(k)` initialised elements and
            // `offset + n <= chunk_len(k)`; chunks are freed only in Drop (`&mut self`).
            let slice = unsafe { std::slice::from_raw_parts(ptr.add(offset), n) };
            if !f(slice) {
                return;
            }
            at += n as u32;
        }
    }

    /// Hint the CPU to fetch the cache lines holding elements `start..start + len`, at most
    /// `max_lines` of them and only within `start`'s chunk, so that a scan of a run overlaps its
    /// misses instead of taking them one after another. A hint only: an index that was never
    /// allocated, or a length past the chunk, is cut short, never read.
    #[inline]
    pub(crate) fn prefetch_range(&self, start: u32, len: u32, max_lines: usize) {
        if len == 0 {
            return;
        }
        let (k, offset) = locate(start);
        let Some(chunk) = self.chunks.get(k) else {
            return;
        };
        // Acquire, as in `get`; a null chunk (never allocated) means nothing to fetch.
        let ptr = chunk.load(Ordering::Acquire);
        if ptr.is_null() {
            return;
        }
        let n = (chunk_len(k) - offset).min(len as usize);
        // An address only, never dereferenced (and within the chunk).
        let first = ptr.wrapping_add(offset) as usize;
        crate::sync::prefetch_span(first, n * std::mem::size_of::<T>(), max_lines);
    }

    /// Allocated chunk footprint in bytes (for memory reports).
    pub(crate) fn allocated_bytes(&self) -> usize {
        let allocated = self.grow.lock().map(|g| *g).unwrap_or(0);
        (0..allocated).map(chunk_len).sum::<usize>() * std::mem::size_of::<T>()
    }
}

impl<T> Drop for SegmentedVec<T> {
    fn drop(&mut self) {
        let allocated = *self.grow.get_mut().unwrap_or_else(|e| e.into_inner());
        for k in 0..allocated {
            let ptr = self.chunks[k].load(Ordering::Relaxed);
            #[cfg(loom)]
            // SAFETY: built by the loom `alloc_chunk` as a `Box<[T]>` of exactly this length.
            drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, chunk_len(k))) });
            #[cfg(not(loom))]
            if let (false, Ok(layout)) =
                (ptr.is_null(), std::alloc::Layout::array::<T>(chunk_len(k)))
            {
                // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout, our element
                // types own no heap memory (they are atomics), and `&mut self` guarantees no
                // reader holds a reference into the chunk.
                unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
            }
        }
    }
}

// SAFETY: an all-zero AtomicU32 is the valid value 0.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: an all-zero AtomicU64 is the valid value 0.
unsafe impl Zeroable for AtomicU64 {}

// SAFETY: the chunks are owned heap allocations of `T`; sharing them is sound when `T` is.
unsafe impl<T: Send + Sync> Send for SegmentedVec<T> {}
// SAFETY: as above; all mutation of the chunk table goes through atomics or the mutex.
unsafe impl<T: Send + Sync> Sync for SegmentedVec<T> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_maps_indices_to_chunks_without_gaps() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(BASE - 1), (0, BASE as usize - 1));
        assert_eq!(locate(BASE), (1, 0));
        assert_eq!(locate(3 * BASE - 1), (1, 2 * BASE as usize - 1));
        assert_eq!(locate(3 * BASE), (2, 0));
    }

    #[test]
    fn elements_keep_their_address_across_growth() {
        let v: SegmentedVec<AtomicU32> = SegmentedVec::new();
        // (AtomicU32 is Zeroable: see below.)
        let first = v.push_index().unwrap();
        v.get(first).store(7, Ordering::Relaxed);
        let addr = v.get(first) as *const _;
        for _ in 0..5000 {
            v.push_index().unwrap();
        }
        assert_eq!(v.get(first) as *const _, addr);
        assert_eq!(v.get(first).load(Ordering::Relaxed), 7);
        assert_eq!(v.high_water(), 5001);
    }

    #[test]
    fn slices_cover_a_range_across_chunk_boundaries_in_order() {
        let v: SegmentedVec<AtomicU32> = SegmentedVec::new();
        let n = 8 * BASE;
        let first = v.push_indices(n).unwrap();
        for i in 0..n {
            v.get(first + i).store(i, Ordering::Relaxed);
        }
        let (start, len) = (BASE - 3, 3 * BASE + 7);
        let mut seen = Vec::new();
        let mut pieces = 0;
        v.for_each_slice(start, len, |s| {
            pieces += 1;
            seen.extend(s.iter().map(|x| x.load(Ordering::Relaxed)));
            true
        });
        assert_eq!(seen, (start..start + len).collect::<Vec<_>>());
        assert!(pieces >= 2, "the range spans a chunk boundary");
    }

    #[test]
    fn prefetching_any_range_is_harmless() {
        let v: SegmentedVec<AtomicU32> = SegmentedVec::new();
        let first = v.push_indices(2 * BASE).unwrap();
        // Within a chunk, across a chunk's end, empty, never allocated, past the last chunk.
        v.prefetch_range(first, 10, 8);
        v.prefetch_range(BASE - 2, 100, 8);
        v.prefetch_range(first, 0, 8);
        v.prefetch_range(100 * BASE, 10, 8);
        v.prefetch_range(u32::MAX, u32::MAX, 8);
        // Nothing was written or allocated by a hint.
        assert_eq!(v.high_water(), 2 * BASE);
        assert_eq!(v.get(first).load(Ordering::Relaxed), 0);
    }
}
