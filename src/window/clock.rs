//! Wall-clock time for closing windows, behind a trait so tests move time by hand.
//!
//! Windows are *chosen* by the message's own timestamp but *closed* by this clock
//! (`now >= end + grace`), so a chat that goes quiet still flushes (DESIGN section 2).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis()
    }
}

/// A clock that only moves when told to, for tests that would otherwise wait for hours.
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Atomic so a test can move time while a stage holding an `Arc` of it reads it.
    ms: AtomicI64,
}

impl ManualClock {
    pub fn new(ms: i64) -> Self {
        Self { ms: AtomicI64::new(ms) }
    }

    pub fn set(&self, ms: i64) {
        self.ms.store(ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let _ = self.ms.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |ms| Some(ms.saturating_add(by)));
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(10));
        assert_eq!(c.now_ms(), 11_000);
        c.set(5);
        assert_eq!(c.now_ms(), 5);
        c.advance(Duration::MAX);
        assert_eq!(c.now_ms(), i64::MAX, "saturates instead of wrapping");
    }

    #[test]
    fn system_clock_is_epoch_millis() {
        let now = SystemClock.now_ms();
        assert!(now > 1_600_000_000_000, "after 2020: {now}");
    }
}
