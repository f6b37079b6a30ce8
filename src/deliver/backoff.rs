//! Retry delay arithmetic: jitter around the subscription's schedule, and `Retry-After`.
//!
//! What it does: given the schedule's delay for the next send (the caller picks it from the
//! subscription's `retry.delays_secs`), a uniform random number from the caller's rng, the
//! subscription's jitter spread (`retry.jitter_percent`) and the endpoint's `Retry-After`
//! answer, returns how long to wait before the next send.
//!
//! Guarantees: pure (no clock, no rng inside, so tests are exact) and total (no input makes
//! it panic or overflow: results saturate at `Duration::MAX`).
//!
//! The formula, with `j` the caller's jitter in `[0, 1)` and `s` the spread (0.2 by default):
//!
//! ```text
//! jittered = base * (1 - s + 2 * s * j)             // uniform in [(1 - s) * base, (1 + s) * base)
//! honoured = min(retry_after, bounds.max)           // when the endpoint sent Retry-After
//! delay    = max(jittered, honoured, bounds.min)
//! ```
//!
//! `s = 0` is the schedule exactly (`jittered = base`, no floating point involved); `j = 0.5`
//! gives the factor 1.0 too. A `j` outside `[0, 1)` or NaN is clamped into range (NaN counts
//! as 0.5), an `s` outside `[0, 1]` likewise (NaN counts as 0). `bounds.max` caps only what the endpoint asked for, never the
//! operator's own schedule, so a long configured delay stays long; `bounds.min` applies to
//! the result so that a zero delay in the schedule cannot make a hot retry loop.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

/// Default maximum relative deviation of the jittered delay from the schedule (20 %).
pub const JITTER_SPREAD: f64 = 0.2;

/// Limits on how far a `Retry-After` answer (and the result) may move the next send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfterBounds {
    /// Floor of every computed delay, so a `0` in the schedule still waits a little.
    /// Default 1 s.
    pub min: Duration,
    /// Ceiling on an honoured `Retry-After`, so an endpoint cannot park its deliveries for
    /// days with one header. Default 1 h. Does not cap the configured schedule.
    pub max: Duration,
}

impl Default for RetryAfterBounds {
    fn default() -> Self {
        Self { min: Duration::from_secs(1), max: Duration::from_secs(3600) }
    }
}

/// Returns the delay before the next send (see the module docs for the exact formula).
///
/// `base` is the schedule's delay, `retry_after` the endpoint's parsed `Retry-After` if it
/// sent one, `jitter` a uniform sample in `[0, 1)` from the caller's rng, `spread` the
/// largest relative deviation ([`JITTER_SPREAD`] by default, 0 for none).
pub fn retry_delay(base: Duration, retry_after: Option<Duration>, jitter: f64, spread: f64, bounds: RetryAfterBounds) -> Duration {
    let jitter = if jitter.is_nan() { 0.5 } else { jitter.clamp(0.0, 1.0) };
    let spread = if spread.is_nan() { 0.0 } else { spread.clamp(0.0, 1.0) };
    let jittered = if spread == 0.0 {
        base
    } else {
        let factor = (1.0 - spread) + 2.0 * spread * jitter;
        Duration::try_from_secs_f64(base.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    };
    let honoured = retry_after.map_or(Duration::ZERO, |ra| ra.min(bounds.max));
    jittered.max(honoured).max(bounds.min)
}

/// Parses a `Retry-After` header value into a wait measured from `now`.
///
/// Accepts both forms of RFC 9110 §10.2.3:
/// - `delay-seconds`: ASCII digits only (`120`). A value too large for `u64` saturates to
///   `Duration::MAX` (the caller's bounds then cap it).
/// - `HTTP-date`: the preferred IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) through
///   chrono's RFC 2822 parser, plus the two obsolete forms recipients must accept, RFC 850
///   (`Sunday, 06-Nov-94 08:49:37 GMT`, two-digit years read by chrono's `%y`: 69-99 →
///   19xx, 00-68 → 20xx) and asctime (`Sun Nov  6 08:49:37 1994`). No `httpdate` crate.
///
/// A date in the past yields `Duration::ZERO` ("retry now"). Anything else (negative or
/// fractional numbers, unknown date formats, empty) yields `None`: ignore the header.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(value.parse::<u64>().map_or(Duration::MAX, Duration::from_secs));
    }
    let at = parse_http_date(value)?;
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Parses the three HTTP-date forms into UTC.
fn parse_http_date(value: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc2822(value) {
        return Some(at.with_timezone(&Utc));
    }
    const OBSOLETE: [&str; 2] = ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"];
    OBSOLETE.iter().find_map(|fmt| NaiveDateTime::parse_from_str(value, fmt).ok()).map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: RetryAfterBounds = RetryAfterBounds { min: Duration::from_secs(1), max: Duration::from_secs(3600) };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn default_bounds() {
        assert_eq!(RetryAfterBounds::default(), B);
    }

    #[test]
    fn jitter_spans_plus_minus_twenty_percent() {
        assert_eq!(retry_delay(secs(100), None, 0.0, JITTER_SPREAD, B), secs(80));
        assert_eq!(retry_delay(secs(100), None, 0.5, JITTER_SPREAD, B), secs(100));
        assert_eq!(retry_delay(secs(100), None, 0.75, JITTER_SPREAD, B), secs(110));
        let top = retry_delay(secs(100), None, 0.999_999, JITTER_SPREAD, B);
        assert!(top < secs(120) && top > Duration::from_secs_f64(119.99), "{top:?}");
    }

    #[test]
    fn jitter_is_monotonic_and_clamped() {
        let mut last = Duration::ZERO;
        for i in 0..100 {
            let d = retry_delay(secs(60), None, f64::from(i) / 100.0, JITTER_SPREAD, B);
            assert!(d >= last, "not monotonic at {i}");
            last = d;
        }
        assert_eq!(retry_delay(secs(100), None, -3.0, JITTER_SPREAD, B), secs(80));
        assert_eq!(retry_delay(secs(100), None, 7.0, JITTER_SPREAD, B), secs(120));
        assert_eq!(retry_delay(secs(100), None, f64::NAN, JITTER_SPREAD, B), secs(100));
    }

    #[test]
    fn retry_after_honoured_only_when_longer() {
        assert_eq!(retry_delay(secs(60), Some(secs(300)), 0.5, JITTER_SPREAD, B), secs(300));
        assert_eq!(retry_delay(secs(60), Some(secs(10)), 0.5, JITTER_SPREAD, B), secs(60));
        // Longer than the base but shorter than the jittered base: jitter wins.
        assert_eq!(retry_delay(secs(100), Some(secs(105)), 0.75, JITTER_SPREAD, B), secs(110));
    }

    #[test]
    fn retry_after_capped_at_max_but_schedule_is_not() {
        assert_eq!(retry_delay(secs(60), Some(secs(86_400)), 0.5, JITTER_SPREAD, B), secs(3600));
        assert_eq!(retry_delay(secs(60), Some(Duration::MAX), 0.5, JITTER_SPREAD, B), secs(3600));
        assert_eq!(retry_delay(secs(7200), Some(secs(86_400)), 0.5, JITTER_SPREAD, B), secs(7200));
        assert_eq!(retry_delay(secs(7200), None, 0.5, JITTER_SPREAD, B), secs(7200));
    }

    #[test]
    fn never_below_min() {
        assert_eq!(retry_delay(Duration::ZERO, None, 0.0, JITTER_SPREAD, B), secs(1));
        assert_eq!(retry_delay(Duration::ZERO, Some(Duration::ZERO), 0.9, JITTER_SPREAD, B), secs(1));
        let b = RetryAfterBounds { min: secs(5), max: secs(10) };
        assert_eq!(retry_delay(secs(2), Some(secs(3)), 0.5, JITTER_SPREAD, b), secs(5));
    }

    #[test]
    fn zero_spread_is_the_schedule_exactly() {
        for j in [0.0, 0.3, 0.999, f64::NAN] {
            assert_eq!(retry_delay(secs(60), None, j, 0.0, B), secs(60));
            assert_eq!(retry_delay(Duration::from_millis(61_440_123), None, j, 0.0, B), Duration::from_millis(61_440_123));
        }
        assert_eq!(retry_delay(secs(60), None, 0.0, f64::NAN, B), secs(60), "NaN spread: none");
        assert_eq!(retry_delay(secs(60), None, 0.0, 5.0, B), secs(1), "spread clamped to 1: down to the floor");
        assert_eq!(retry_delay(secs(100), None, 0.0, 0.5, B), secs(50));
    }

    #[test]
    fn huge_base_saturates_instead_of_panicking() {
        assert_eq!(retry_delay(Duration::MAX, None, 0.99, JITTER_SPREAD, B), Duration::MAX);
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("1994-11-06T08:49:00Z").unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_delay_seconds() {
        assert_eq!(parse_retry_after("120", now()), Some(secs(120)));
        assert_eq!(parse_retry_after(" 0 ", now()), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("99999999999999999999999", now()), Some(Duration::MAX));
    }

    #[test]
    fn parses_all_three_http_date_forms() {
        for v in ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"] {
            assert_eq!(parse_retry_after(v, now()), Some(secs(37)), "{v}");
        }
    }

    #[test]
    fn past_date_means_now() {
        assert_eq!(parse_retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now()), Some(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        for v in ["", "  ", "-5", "1.5", "soon", "+30", "Sun, 06 Nov 1994", "12 h"] {
            assert_eq!(parse_retry_after(v, now()), None, "{v:?}");
        }
    }
}
