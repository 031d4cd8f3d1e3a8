//! A test-and-test-and-set lock for the shared map's shards.
//!
//! Why not `std::sync::Mutex`: its unlock is an atomic swap (to learn whether a waiter must be
//! woken), a second locked instruction per critical section; the map takes one of these locks
//! per shard per event on every event thread, so both show up on the ingest profile. Here unlock
//! is a plain Release store. Waiters spin, then yield (`sync::spin_wait`); critical sections are
//! a few dozen table operations, never a blocking call, except a table's growth. `try_lock` lets
//! a batch skip a held shard and come back to it. Under loom this is loom's mutex.

#[cfg(not(loom))]
mod imp {
    use crate::sync::{spin_wait, AtomicBool, Ordering};
    use std::cell::UnsafeCell;
    use std::ops::{Deref, DerefMut};

    /// A spin lock around `T`.
    #[derive(Default)]
    pub(crate) struct SpinLock<T> {
        locked: AtomicBool,
        value: UnsafeCell<T>,
    }

    // SAFETY: the lock hands out `&mut T` to one holder at a time (Acquire on lock, Release on
    // unlock order the holders' accesses), so sharing the lock shares `T` between threads one
    // at a time, which needs only `T: Send`.
    unsafe impl<T: Send> Sync for SpinLock<T> {}

    /// Exclusive access to the value until dropped.
    pub(crate) struct SpinGuard<'a, T> {
        lock: &'a SpinLock<T>,
    }

    impl<T> SpinLock<T> {
        pub(crate) fn new(value: T) -> Self {
            SpinLock {
                locked: AtomicBool::new(false),
                value: UnsafeCell::new(value),
            }
        }

        /// The lock if it is free now, else `None` (no waiting).
        pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
            // Acquire: as in `lock`.
            (!self.locked.load(Ordering::Relaxed)
                && self
                    .locked
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok())
            .then(|| SpinGuard { lock: self })
        }

        pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
            let mut spins = 0;
            loop {
                // Acquire: the previous holder's writes (Released by its unlock) are visible.
                if !self.locked.load(Ordering::Relaxed)
                    && self
                        .locked
                        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                {
                    return SpinGuard { lock: self };
                }
                spin_wait(&mut spins);
            }
        }
    }

    impl<T> Deref for SpinGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // SAFETY: this guard holds the lock, so no other reference to the value exists.
            unsafe { &*self.lock.value.get() }
        }
    }

    impl<T> DerefMut for SpinGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            // SAFETY: as above; `&mut self` makes this the guard's only live borrow.
            unsafe { &mut *self.lock.value.get() }
        }
    }

    impl<T> Drop for SpinGuard<'_, T> {
        fn drop(&mut self) {
            // Release: publishes this holder's writes to the next holder.
            self.lock.locked.store(false, Ordering::Release);
        }
    }
}

#[cfg(loom)]
mod imp {
    use crate::sync::{Mutex, MutexGuard};

    /// Under loom: loom's mutex, so the models see every acquisition.
    #[derive(Default)]
    pub(crate) struct SpinLock<T>(Mutex<T>);

    pub(crate) type SpinGuard<'a, T> = MutexGuard<'a, T>;

    impl<T> SpinLock<T> {
        pub(crate) fn new(value: T) -> Self {
            SpinLock(Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> SpinGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }

        pub(crate) fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
            match self.0.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
    }
}

pub(crate) use imp::{SpinGuard, SpinLock};

#[cfg(all(test, not(loom)))]
mod tests {
    use super::SpinLock;
    use std::sync::Arc;

    #[test]
    fn increments_from_several_threads_are_not_lost() {
        let lock = Arc::new(SpinLock::<u64>::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        *lock.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 80_000);
    }

    #[test]
    fn try_lock_fails_while_held_and_leaves_the_holder_holding() {
        let lock = SpinLock::<u64>::default();
        let mut held = lock.try_lock().expect("a free lock is taken");
        *held += 1;
        assert!(lock.try_lock().is_none());
        // A failed attempt must not have released the holder's lock.
        assert!(lock.try_lock().is_none());
        drop(held);
        let again = lock
            .try_lock()
            .expect("free again after the guard is dropped");
        assert_eq!(*again, 1);
    }

    #[test]
    fn try_lock_excludes_a_concurrent_holder() {
        let lock = Arc::new(SpinLock::<u64>::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    let mut done = 0;
                    while done < 20_000 {
                        if let Some(mut v) = lock.try_lock() {
                            // A read-modify-write in two steps: a second holder would lose
                            // increments.
                            let x = *v;
                            std::hint::spin_loop();
                            *v = x + 1;
                            done += 1;
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*lock.lock(), 80_000);
    }
}
