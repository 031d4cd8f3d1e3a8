//! A total deadline for one response, enforced by the connection that sends it.
//!
//! A response body is asked for more only when hyper has room to write it: a client that reads
//! a few bytes now and then keeps hyper's write buffer full, so a deadline checked inside the
//! body would not be looked at, and the write deadline (`super::connections`) sees progress.
//! A handler whose response must be sent within a bound (`GET /dump`, `super::dump`) arms its
//! connection's [`ResponseDeadline`] (a request extension) instead; when the deadline passes,
//! the connection is closed, which drops the response and whatever it holds, wherever hyper
//! keeps it.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

/// The deadline of the response a connection is sending, if one is armed. Each connection has
/// one, shared with the requests it serves (HTTP/1.1 sends one response at a time).
#[derive(Clone, Debug, Default)]
pub struct ResponseDeadline {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    at: Mutex<Option<Instant>>,
    changed: Notify,
}

impl ResponseDeadline {
    /// Close the connection at `at`, unless the returned guard is dropped first (the response
    /// was sent, or dropped).
    pub fn arm(&self, at: Instant) -> ArmedDeadline {
        self.set(Some(at));
        ArmedDeadline {
            deadline: self.clone(),
        }
    }

    fn set(&self, at: Option<Instant>) {
        *self.inner.at.lock().unwrap_or_else(|e| e.into_inner()) = at;
        self.inner.changed.notify_waiters();
    }

    fn at(&self) -> Option<Instant> {
        *self.inner.at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once an armed deadline has passed; pending while none is armed.
    pub async fn passed(&self) {
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            // Registered before the deadline is read: a change made after the read wakes us.
            changed.as_mut().enable();
            match self.at() {
                None => changed.await,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {
                            // Still armed (not disarmed just as it passed)?
                            if self.at().is_some_and(|at| at <= Instant::now()) {
                                return;
                            }
                        }
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

/// An armed [`ResponseDeadline`]; dropping it disarms the deadline.
#[derive(Debug)]
pub struct ArmedDeadline {
    deadline: ResponseDeadline,
}

impl Drop for ArmedDeadline {
    fn drop(&mut self) {
        self.deadline.set(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn an_armed_deadline_passes_and_a_disarmed_one_never_does() {
        let d = ResponseDeadline::default();
        let idle = tokio::time::timeout(Duration::from_secs(3600), d.passed()).await;
        assert!(idle.is_err(), "passed with nothing armed");
        let armed = d.arm(Instant::now() + Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(6), d.passed())
            .await
            .expect("the armed deadline passed");
        drop(armed);
        let after = tokio::time::timeout(Duration::from_secs(3600), d.passed()).await;
        assert!(after.is_err(), "passed once disarmed");
    }

    #[tokio::test(start_paused = true)]
    async fn arming_while_waiting_is_seen() {
        let d = ResponseDeadline::default();
        let waiting = tokio::spawn({
            let d = d.clone();
            async move { d.passed().await }
        });
        tokio::task::yield_now().await;
        let _armed = d.arm(Instant::now() + Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("the waiter saw the deadline armed after it started")
            .unwrap();
    }
}
