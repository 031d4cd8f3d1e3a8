//! The one place that names the synchronisation primitives, so that `--cfg loom` can swap in
//! loom's model-checked versions and the production code itself is what loom runs (the models
//! are in `loom-tests/`; `docs/architecture.md` lists them).
//!
//! The loom build is `RUSTFLAGS="--cfg loom --cfg crossbeam_loom"`: the second flag makes
//! crossbeam-epoch run on loom's atomics too, so pinning, deferral and reclamation are part of
//! every model.

#[cfg(all(loom, not(crossbeam_loom)))]
compile_error!("build the loom models with RUSTFLAGS=\"--cfg loom --cfg crossbeam_loom\"");

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(loom)]
pub(crate) use loom::thread;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::thread;

/// Bounded MPMC channels (the event-thread queues, and the log's writer queue, which reaches
/// this module through `loom_hooks::channel` under loom): crossbeam's, or under loom a small
/// mutex + condvar queue with the same API subset (loom has no bounded channel, and
/// crossbeam-channel does not build with `--cfg crossbeam_loom`).
#[cfg(not(loom))]
pub(crate) mod channel {
    pub(crate) use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
}
#[cfg(loom)]
pub mod channel {
    use loom::sync::{Arc, Condvar, Mutex};
    use std::collections::VecDeque;
    pub use std::sync::mpsc::{RecvError, RecvTimeoutError, SendError, TryRecvError, TrySendError};

    struct State<T> {
        queue: VecDeque<T>,
        senders: usize,
        receivers: usize,
    }

    struct Chan<T> {
        state: Mutex<State<T>>,
        changed: Condvar,
        cap: usize,
    }

    /// The sending half.
    pub struct Sender<T>(Arc<Chan<T>>);
    /// The receiving half.
    pub struct Receiver<T>(Arc<Chan<T>>);

    /// A channel holding at most `cap` messages (at least one).
    pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
        let chan = Arc::new(Chan {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                senders: 1,
                receivers: 1,
            }),
            changed: Condvar::new(),
            cap: cap.max(1),
        });
        (Sender(Arc::clone(&chan)), Receiver(chan))
    }

    impl<T> Sender<T> {
        /// Block while the queue is full; fail once the receiver is gone.
        pub fn send(&self, msg: T) -> Result<(), SendError<T>> {
            let mut s = self.0.state.lock().unwrap();
            loop {
                if s.receivers == 0 {
                    return Err(SendError(msg));
                }
                if s.queue.len() < self.0.cap {
                    s.queue.push_back(msg);
                    self.0.changed.notify_all();
                    return Ok(());
                }
                s = self.0.changed.wait(s).unwrap();
            }
        }

        /// Send without blocking.
        pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
            let mut s = self.0.state.lock().unwrap();
            if s.receivers == 0 {
                Err(TrySendError::Disconnected(msg))
            } else if s.queue.len() >= self.0.cap {
                Err(TrySendError::Full(msg))
            } else {
                s.queue.push_back(msg);
                self.0.changed.notify_all();
                Ok(())
            }
        }

        /// Messages queued.
        pub fn len(&self) -> usize {
            self.0.state.lock().unwrap().queue.len()
        }

        /// Whether nothing is queued.
        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }
    }

    impl<T> Clone for Sender<T> {
        fn clone(&self) -> Self {
            self.0.state.lock().unwrap().senders += 1;
            Sender(Arc::clone(&self.0))
        }
    }

    impl<T> Drop for Sender<T> {
        fn drop(&mut self) {
            self.0.state.lock().unwrap().senders -= 1;
            self.0.changed.notify_all();
        }
    }

    impl<T> Receiver<T> {
        /// Block until a message arrives; fail once it is empty and every sender is gone.
        pub fn recv(&self) -> Result<T, RecvError> {
            let mut s = self.0.state.lock().unwrap();
            loop {
                if let Some(m) = s.queue.pop_front() {
                    self.0.changed.notify_all();
                    return Ok(m);
                }
                if s.senders == 0 {
                    return Err(RecvError);
                }
                s = self.0.changed.wait(s).unwrap();
            }
        }

        /// loom has no clock: the timeout never fires (a model that would need it deadlocks,
        /// which loom reports).
        pub fn recv_timeout(&self, _: std::time::Duration) -> Result<T, RecvTimeoutError> {
            self.recv().map_err(|_| RecvTimeoutError::Disconnected)
        }

        /// As [`Receiver::recv_timeout`]: the deadline never passes.
        pub fn recv_deadline(&self, _: std::time::Instant) -> Result<T, RecvTimeoutError> {
            self.recv().map_err(|_| RecvTimeoutError::Disconnected)
        }

        /// Receive without blocking.
        pub fn try_recv(&self) -> Result<T, TryRecvError> {
            let mut s = self.0.state.lock().unwrap();
            match s.queue.pop_front() {
                Some(m) => {
                    self.0.changed.notify_all();
                    Ok(m)
                }
                None if s.senders == 0 => Err(TryRecvError::Disconnected),
                None => Err(TryRecvError::Empty),
            }
        }
    }

    impl<T> Drop for Receiver<T> {
        fn drop(&mut self) {
            self.0.state.lock().unwrap().receivers -= 1;
            self.0.changed.notify_all();
        }
    }
}

/// Hint the CPU to fetch the cache line holding `addr` into all cache levels. A hint only: it
/// does not dereference `addr` in the language's sense and cannot fault, whatever the address
/// (stale, freed or past an allocation), so callers may pass a guess. No effect under loom or
/// on other targets.
#[inline]
pub(crate) fn prefetch_line(addr: usize) {
    #[cfg(all(target_arch = "x86_64", not(loom)))]
    // SAFETY: `_mm_prefetch` has no architectural effect and never faults (see above).
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch(addr as *const i8, _MM_HINT_T0);
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom))))]
    let _ = addr;
}

/// Cache line size of the targets we tune for (x86-64, and most arm64 cores).
pub(crate) const CACHE_LINE: usize = 64;

/// Hint the CPU to fetch every cache line that the `bytes` bytes from `addr` touch, at most
/// `max_lines` of them (from the first). A hint only, like `prefetch_line`: nothing is read.
#[inline]
pub(crate) fn prefetch_span(addr: usize, bytes: usize, max_lines: usize) {
    for line in lines_of(addr, bytes, max_lines) {
        prefetch_line(line);
    }
}

/// The start addresses of the cache lines that `bytes` bytes from `addr` touch, at most
/// `max_lines` of them. (A 48-byte node straddles two lines half the time.)
#[inline]
fn lines_of(addr: usize, bytes: usize, max_lines: usize) -> impl Iterator<Item = usize> {
    let first = addr & !(CACHE_LINE - 1);
    let count = if bytes == 0 {
        0
    } else {
        let last = addr.saturating_add(bytes - 1) & !(CACHE_LINE - 1);
        (last - first) / CACHE_LINE + 1
    };
    (0..count.min(max_lines)).map(move |k| first + k * CACHE_LINE)
}

#[cfg(all(test, not(loom)))]
mod prefetch_tests {
    use super::lines_of;

    fn lines(addr: usize, bytes: usize, max: usize) -> Vec<usize> {
        lines_of(addr, bytes, max).collect()
    }

    #[test]
    fn a_span_covers_exactly_the_lines_it_touches() {
        // 48-byte nodes packed from a line boundary: node 0 fits one line, nodes 1 and 2
        // straddle two, node 3 fits one.
        assert_eq!(lines(0, 48, 2), vec![0]);
        assert_eq!(lines(48, 48, 2), vec![0, 64]);
        assert_eq!(lines(96, 48, 2), vec![64, 128]);
        assert_eq!(lines(144, 48, 2), vec![128]);
        // A run of 20 hashes (160 bytes) from offset 8: lines 0, 64 and 128.
        assert_eq!(lines(8, 160, 8), vec![0, 64, 128]);
    }

    #[test]
    fn a_span_is_capped_and_never_overflows() {
        assert_eq!(lines(0, 64 * 100, 8).len(), 8);
        assert!(lines(4096, 0, 8).is_empty());
        let top = usize::MAX - 10;
        assert_eq!(lines(top, 1000, 8), vec![top & !63]);
    }
}

/// Back off inside a writer-side spin loop (readers never spin).
#[inline]
pub(crate) fn spin_wait(spins: &mut u32) {
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    {
        *spins += 1;
        if *spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The ordering of a store that publishes a new child link (a node's `children` word, or one
/// entry of its child table): `Release`. Under loom a model can plant a bug by weakening it to
/// `Relaxed` for the current test thread (see [`loom_support::plant_weak_publication`]), to show
/// that the model catches it.
#[inline(always)]
pub(crate) fn publish_link() -> Ordering {
    #[cfg(loom)]
    if loom_support::weak_publication() {
        return Ordering::Relaxed;
    }
    Ordering::Release
}

/// A heap member set or child table was built at `addr` (loom: track it as live).
#[inline(always)]
pub(crate) fn heap_allocated(addr: usize) {
    #[cfg(loom)]
    loom_support::heap_allocated(addr);
    let _ = addr;
}

/// A reader is about to dereference the heap object at `addr` (loom: it must still be live).
#[inline(always)]
pub(crate) fn heap_read(addr: usize) {
    #[cfg(loom)]
    loom_support::heap_read(addr);
    let _ = addr;
}

/// Free the heap object at `addr` with `free`. Under loom the memory is quarantined instead (never
/// freed, so its address is never reused within a model) and marked dead, so that a later
/// [`heap_read`] of it fails the model: a use-after-free becomes an assertion, not silent UB.
#[inline(always)]
pub(crate) fn heap_free(addr: usize, free: impl FnOnce()) {
    #[cfg(loom)]
    {
        loom_support::heap_freed(addr);
        let _ = free;
    }
    #[cfg(not(loom))]
    {
        let _ = addr;
        free();
    }
}

/// Model-checking support that production code reaches only under `cfg(loom)`.
#[cfg(loom)]
pub(crate) mod loom_support {
    use std::cell::{Cell, RefCell};
    use std::collections::HashSet;

    // loom runs every thread of a model on the OS thread of the test that called
    // `loom::model`, so std thread-locals are per test and shared by the model's threads.
    std::thread_local! {
        static WEAK_PUBLICATION: Cell<bool> = const { Cell::new(false) };
        static EAGER_RECLAMATION: Cell<bool> = const { Cell::new(false) };
        static NO_DEPTH_CHECK: Cell<bool> = const { Cell::new(false) };
        static LATE_FRESH_EXTENTS: Cell<bool> = const { Cell::new(false) };
        static LIVE_HEAP: RefCell<HashSet<usize>> = RefCell::new(HashSet::new());
        static VIOLATION: RefCell<Option<String>> = const { RefCell::new(None) };
    }

    /// Plant a bug: link publication uses `Relaxed` instead of `Release` (this test thread).
    pub(crate) fn plant_weak_publication(on: bool) {
        WEAK_PUBLICATION.with(|w| w.set(on));
    }

    pub(crate) fn weak_publication() -> bool {
        WEAK_PUBLICATION.with(|w| w.get())
    }

    /// Plant a bug: unlinked nodes go back to the free list at once, not after the grace period.
    pub(crate) fn plant_eager_reclamation(on: bool) {
        EAGER_RECLAMATION.with(|w| w.set(on));
    }

    pub(crate) fn eager_reclamation() -> bool {
        EAGER_RECLAMATION.with(|w| w.get())
    }

    /// Plant a bug: readers follow a child link without checking the child's depth, so a torn
    /// view of a split (old extent, new children) is not detected.
    pub(crate) fn plant_no_depth_check(on: bool) {
        NO_DEPTH_CHECK.with(|w| w.set(on));
    }

    pub(crate) fn no_depth_check() -> bool {
        NO_DEPTH_CHECK.with(|w| w.get())
    }

    /// Plant a bug: after growing fresh runs, a store reads their blocks from the nodes'
    /// extents after unlocking them (which another stream's split may have shortened) instead
    /// of the ranges it grew.
    pub(crate) fn plant_late_fresh_extents(on: bool) {
        LATE_FRESH_EXTENTS.with(|w| w.set(on));
    }

    pub(crate) fn late_fresh_extents() -> bool {
        LATE_FRESH_EXTENTS.with(|w| w.get())
    }

    /// The first memory-safety violation seen by the heap tracker since the last call.
    /// (Recorded, not panicked: loom cannot unwind a model cleanly.)
    pub(crate) fn take_violation() -> Option<String> {
        VIOLATION.with(|v| v.borrow_mut().take())
    }

    fn violation(msg: String) {
        VIOLATION.with(|v| {
            v.borrow_mut().get_or_insert(msg);
        });
    }

    pub(crate) fn heap_allocated(addr: usize) {
        LIVE_HEAP.with(|l| l.borrow_mut().insert(addr));
    }

    pub(crate) fn heap_freed(addr: usize) {
        if !LIVE_HEAP.with(|l| l.borrow_mut().remove(&addr)) {
            violation(format!("heap object at {addr:#x} freed twice"));
        }
    }

    pub(crate) fn heap_read(addr: usize) {
        // The memory is quarantined, so reading it stays memory-safe; the model fails.
        if !LIVE_HEAP.with(|l| l.borrow().contains(&addr)) {
            violation(format!(
                "a reader dereferenced a freed heap object at {addr:#x}"
            ));
        }
    }
}
