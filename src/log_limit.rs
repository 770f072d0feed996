//! Rate limits for the log lines a stranger can cause (one per refused or
//! failed connection), so that nobody outside sets the log's volume. Per
//! reason, at most `burst` lines per `window`; the first line after a window
//! with suppressed lines carries how many were suppressed. The metrics
//! count every event; only the lines are limited.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines per reason per window.
const BURST: u32 = 10;
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    window: Duration,
    reasons: Mutex<HashMap<&'static str, Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    started: Instant,
    emitted: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(BURST, WINDOW)
    }
}

impl LogLimit {
    pub fn new(burst: u32, window: Duration) -> LogLimit {
        LogLimit {
            burst,
            window,
            reasons: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line for `reason` may be logged now: `Some(n)` with the
    /// number of lines for this reason suppressed since the last one
    /// logged, `None` when this one is suppressed.
    pub fn admit(&self, reason: &'static str) -> Option<u64> {
        self.admit_at(reason, Instant::now())
    }

    fn admit_at(&self, reason: &'static str, now: Instant) -> Option<u64> {
        let mut reasons = self.reasons.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = reasons.entry(reason).or_insert(Bucket {
            started: now,
            emitted: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(bucket.started) >= self.window {
            bucket.started = now;
            bucket.emitted = 0;
        }
        if bucket.emitted < self.burst {
            bucket.emitted += 1;
            Some(std::mem::take(&mut bucket.suppressed))
        } else {
            bucket.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_suppressed_count() {
        let limit = LogLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for i in 0..3 {
            assert_eq!(limit.admit_at("tls", at(i)), Some(0), "line {i}");
        }
        for i in 3..103 {
            assert_eq!(limit.admit_at("tls", at(i)), None, "line {i}");
        }
        // Another reason has its own budget.
        assert_eq!(limit.admit_at("timeout", at(200)), Some(0));
        // The next window: the first line says how many were suppressed.
        assert_eq!(limit.admit_at("tls", at(10_000)), Some(100));
        assert_eq!(limit.admit_at("tls", at(10_001)), Some(0));
        assert_eq!(limit.admit_at("tls", at(10_002)), Some(0));
        assert_eq!(limit.admit_at("tls", at(10_003)), None);
        assert_eq!(limit.admit_at("tls", at(25_000)), Some(1));
    }
}
