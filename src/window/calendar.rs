//! Window arithmetic on a subscription's own clock: which window holds an instant, and where
//! it ends, for windows of a fixed length aligned to local midnight in an IANA time zone.
//!
//! A window boundary is an instant at which the zone's wall clock shows a multiple of the
//! window length counted from local 1970-01-01 00:00 (for the product's 1 h, 6 h, 12 h and
//! 24 h, and any length that divides a day: local midnight and every length after it), plus
//! the instant of a clock change that jumps over such a wall-clock time. Windows run from one
//! boundary to the next. So:
//!
//! - in UTC (the default) a window starts at `floor(ts / size) * size` and lasts `size`, as
//!   DESIGN section 2 has it;
//! - a 24 h window is a local day: 23 h on the day the clocks go forward, 25 h on the day
//!   they go back (`Europe/Berlin`: last Sunday of March and of October);
//! - a 1 h window is a local hour, also with a 45-minute offset (`Asia/Kathmandu`, +05:45:
//!   windows start at hh:15 UTC). The hour skipped in spring has no window; the hour repeated
//!   in autumn has two, one per offset, each a real hour, with the same local start time;
//! - a clock change that skips a boundary (a zone whose midnight does not exist on the day
//!   of its change, `America/Santiago`) starts the window at the change.
//!
//! Everything is derived from the instant, the length and the zone (its rules as compiled
//! into this binary, chrono-tz's copy of the IANA database), so replaying the same messages
//! rebuilds the same windows. Offsets are looked up per instant; the one assumption is that
//! the offset changes at most once within one window (true of every zone's rules for windows
//! of up to a day). Results saturate at the ends of `i64`.

use chrono::{DateTime, Offset, TimeZone};
use chrono_tz::Tz;

use crate::route::subscription::{Aggregation, Subscription};

/// How a subscription's messages are cut into windows: a length, aligned in a time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Window length in milliseconds; below 1 ms is taken as 1 ms.
    pub size_ms: i64,
    /// Whose wall clock the windows follow.
    pub zone: Tz,
}

/// At most this many clock changes are stepped over while looking for a boundary: a window
/// holding more than this is not one any zone's rules produce.
const MAX_CHANGES: usize = 4;

impl Windows {
    /// The windows of an aggregating subscription (its `aggregation` in its `timezone`);
    /// None for `aggregation = "none"`.
    pub fn of(sub: &Subscription) -> Option<Self> {
        match sub.aggregation {
            Aggregation::None => None,
            Aggregation::Every(size) => Some(Self { size_ms: i64::try_from(size.as_millis()).unwrap_or(i64::MAX), zone: sub.zone() }),
        }
    }

    /// Windows of `size_ms` in UTC.
    pub fn utc(size_ms: i64) -> Self {
        Self { size_ms, zone: Tz::UTC }
    }

    fn size(&self) -> i64 {
        self.size_ms.max(1)
    }

    /// Start of the window holding `ts_ms`: the last boundary at or before it.
    pub fn start(&self, ts_ms: i64) -> i64 {
        let mut t = ts_ms;
        for _ in 0..MAX_CHANGES {
            let off = self.offset(t);
            let grid = floor(t.saturating_add(off), self.size()).saturating_sub(off);
            if self.offset(grid) == off {
                return grid; // the same offset from the grid point to `t`: a boundary
            }
            // The offset changed between the grid point and `t`, at `change`.
            let change = self.change_after(grid, t);
            if self.skips_boundary(change) {
                return change;
            }
            t = change - 1; // the last boundary lies before the change
        }
        let off = self.offset(ts_ms);
        floor(ts_ms.saturating_add(off), self.size()).saturating_sub(off)
    }

    /// End of the window that starts at `start_ms` (any instant, e.g. the end of a window
    /// emitted before a resize): the first boundary after it.
    pub fn end(&self, start_ms: i64) -> i64 {
        let mut t = start_ms.saturating_add(1);
        for _ in 0..MAX_CHANGES {
            let off = self.offset(t);
            let grid = ceil(t.saturating_add(off), self.size()).saturating_sub(off);
            if self.offset(grid) == off {
                return grid;
            }
            let change = self.change_after(t, grid);
            if self.skips_boundary(change) {
                return change;
            }
            t = change; // the first boundary is at or after the change
        }
        start_ms.saturating_add(self.size())
    }

    /// The zone's offset from UTC at `ts_ms`, in milliseconds (0 outside chrono's range).
    /// UTC, the default, needs no lookup: its windows cost what they did before zones.
    fn offset(&self, ts_ms: i64) -> i64 {
        if self.zone == Tz::UTC {
            return 0;
        }
        DateTime::from_timestamp_millis(ts_ms)
            .map_or(0, |t| i64::from(self.zone.offset_from_utc_datetime(&t.naive_utc()).fix().local_minus_utc()) * 1000)
    }

    /// The first instant in `(lo, hi]` whose offset differs from `lo`'s, given that `hi`'s does.
    fn change_after(&self, mut lo: i64, mut hi: i64) -> i64 {
        let at_lo = self.offset(lo);
        while hi.abs_diff(lo) > 1 {
            let mid = (lo as i128 + (hi as i128 - lo as i128) / 2) as i64;
            if self.offset(mid) == at_lo {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// Whether the clock change at `change` jumps forward over a boundary's wall-clock time:
    /// the local times `[change + before, change + after)` are never shown.
    fn skips_boundary(&self, change: i64) -> bool {
        let (before, after) = (self.offset(change - 1), self.offset(change));
        after > before && ceil(change.saturating_add(before), self.size()) < change.saturating_add(after)
    }
}

fn floor(v: i64, size: i64) -> i64 {
    v.saturating_sub(v.rem_euclid(size))
}

fn ceil(v: i64, size: i64) -> i64 {
    match v.rem_euclid(size) {
        0 => v,
        r => v.saturating_add(size - r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;
    const DAY: i64 = 24 * H;

    fn zone(name: &str) -> Tz {
        name.parse().unwrap()
    }

    /// Epoch ms of a UTC date and time.
    fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d).unwrap().and_hms_opt(h, min, 0).unwrap().and_utc().timestamp_millis()
    }

    /// `ts` as the zone's wall clock, `2024-03-31 00:00 +0100`.
    fn local(tz: Tz, ts: i64) -> String {
        DateTime::from_timestamp_millis(ts).unwrap().with_timezone(&tz).format("%Y-%m-%d %H:%M %z").to_string()
    }

    /// The window of `ts` as local start and end, and its length in hours.
    fn window(w: Windows, ts: i64) -> (String, String, f64) {
        let (start, end) = (w.start(ts), w.end(w.start(ts)));
        (local(w.zone, start), local(w.zone, end), (end - start) as f64 / H as f64)
    }

    #[test]
    fn utc_is_floor_of_the_timestamp() {
        let hour = Windows::utc(H);
        for (ts, start) in [(0, 0), (H - 1, 0), (H, H), (3 * H + 5, 3 * H), (-1, -H)] {
            assert_eq!((hour.start(ts), hour.end(hour.start(ts))), (start, start + H), "{ts}");
        }
        assert_eq!(Windows::utc(10_000).start(25_000), 20_000);
        assert_eq!(Windows::utc(DAY).start(1_614_183_929_000), 1_614_124_800_000, "2021-02-24T16:25:29Z is in 2021-02-24");
        assert_eq!(Windows::utc(0).start(7), 7, "a zero size is taken as 1 ms");
        assert_eq!((Windows::utc(3).start(i64::MIN), Windows::utc(3).end(i64::MAX - 1)), (i64::MIN, i64::MAX), "saturates");
        assert_eq!(hour.end(H + 30 * MIN), 2 * H, "from an instant off the grid: the next boundary");
    }

    #[test]
    fn days_are_local_days() {
        let day = Windows { size_ms: DAY, zone: zone("Asia/Ho_Chi_Minh") };
        let ts = utc(2021, 2, 24, 16, 25); // 23:25 in Ho Chi Minh City
        assert_eq!(window(day, ts), ("2021-02-24 00:00 +0700".into(), "2021-02-25 00:00 +0700".into(), 24.0));
        assert_eq!(day.start(ts), utc(2021, 2, 23, 17, 0));
        assert_eq!(window(day, utc(2021, 2, 24, 17, 0)).0, "2021-02-25 00:00 +0700", "local midnight is the boundary");
        let six = Windows { size_ms: 6 * H, zone: day.zone };
        assert_eq!(window(six, ts), ("2021-02-24 18:00 +0700".into(), "2021-02-25 00:00 +0700".into(), 6.0));
        let twelve = Windows { size_ms: 12 * H, zone: day.zone };
        assert_eq!(window(twelve, utc(2021, 2, 24, 4, 59)).0, "2021-02-24 00:00 +0700");
        assert_eq!(window(twelve, utc(2021, 2, 24, 5, 0)).0, "2021-02-24 12:00 +0700");
    }

    #[test]
    fn berlin_has_a_23_hour_day_in_march_and_a_25_hour_day_in_october() {
        let berlin = zone("Europe/Berlin");
        let day = Windows { size_ms: DAY, zone: berlin };
        let march = ("2024-03-31 00:00 +0100".to_string(), "2024-04-01 00:00 +0200".to_string(), 23.0);
        for ts in [utc(2024, 3, 30, 23, 0), utc(2024, 3, 31, 0, 59), utc(2024, 3, 31, 1, 0), utc(2024, 3, 31, 21, 59)] {
            assert_eq!(window(day, ts), march, "{}", local(berlin, ts));
        }
        assert_eq!(window(day, utc(2024, 3, 30, 22, 59)).1, march.0, "the day before ends at local midnight");
        assert_eq!(window(day, utc(2024, 3, 31, 22, 0)).0, march.1);
        let october = ("2024-10-27 00:00 +0200".to_string(), "2024-10-28 00:00 +0100".to_string(), 25.0);
        for ts in [utc(2024, 10, 26, 22, 0), utc(2024, 10, 27, 0, 30), utc(2024, 10, 27, 1, 30), utc(2024, 10, 27, 22, 59)] {
            assert_eq!(window(day, ts), october, "{}", local(berlin, ts));
        }
        let six = Windows { size_ms: 6 * H, zone: berlin };
        assert_eq!(window(six, utc(2024, 3, 31, 0, 30)), ("2024-03-31 00:00 +0100".into(), "2024-03-31 06:00 +0200".into(), 5.0));
        assert_eq!(window(six, utc(2024, 10, 27, 0, 30)), ("2024-10-27 00:00 +0200".into(), "2024-10-27 06:00 +0100".into(), 7.0));
        let twelve = Windows { size_ms: 12 * H, zone: berlin };
        assert_eq!(window(twelve, utc(2024, 10, 27, 10, 0)).2, 13.0, "11:00 +0100 is in the 13-hour half");
    }

    #[test]
    fn berlin_hours_around_the_changes() {
        let hour = Windows { size_ms: H, zone: zone("Europe/Berlin") };
        // March: 01:00 +0100 is followed by 03:00 +0200; there is no 02:00 window.
        assert_eq!(window(hour, utc(2024, 3, 31, 0, 30)), ("2024-03-31 01:00 +0100".into(), "2024-03-31 03:00 +0200".into(), 1.0));
        assert_eq!(window(hour, utc(2024, 3, 31, 1, 30)), ("2024-03-31 03:00 +0200".into(), "2024-03-31 04:00 +0200".into(), 1.0));
        // October: 02:00-03:00 comes twice, once at +0200 and once at +0100: two windows.
        assert_eq!(window(hour, utc(2024, 10, 27, 0, 30)), ("2024-10-27 02:00 +0200".into(), "2024-10-27 02:00 +0100".into(), 1.0));
        assert_eq!(window(hour, utc(2024, 10, 27, 1, 30)), ("2024-10-27 02:00 +0100".into(), "2024-10-27 03:00 +0100".into(), 1.0));
    }

    #[test]
    fn kathmandu_hours_start_at_a_quarter_past_utc() {
        let kathmandu = zone("Asia/Kathmandu");
        let hour = Windows { size_ms: H, zone: kathmandu };
        let ts = utc(2024, 5, 1, 10, 10); // 15:55 +0545
        assert_eq!(window(hour, ts), ("2024-05-01 15:00 +0545".into(), "2024-05-01 16:00 +0545".into(), 1.0));
        assert_eq!(hour.start(ts), utc(2024, 5, 1, 9, 15));
        assert_eq!(hour.start(utc(2024, 5, 1, 10, 15)), utc(2024, 5, 1, 10, 15), "16:00 local starts the next");
        let day = Windows { size_ms: DAY, zone: kathmandu };
        assert_eq!(day.start(ts), utc(2024, 4, 30, 18, 15), "local midnight is 18:15 UTC");
        // Kathmandu moved from +0530 to +0545 at 1986-01-01 00:00, skipping that midnight: the
        // day starts at the change (00:15 +0545) and is 15 minutes short.
        assert_eq!(window(day, utc(1986, 1, 1, 6, 0)), ("1986-01-01 00:15 +0545".into(), "1986-01-02 00:00 +0545".into(), 23.75));
    }

    /// A zone whose clocks jump over midnight: the day starts at the change.
    #[test]
    fn a_skipped_midnight_starts_the_day_at_the_change() {
        let santiago = zone("America/Santiago"); // 2023-09-03 00:00 -04 became 01:00 -03
        let day = Windows { size_ms: DAY, zone: santiago };
        assert_eq!(window(day, utc(2023, 9, 3, 12, 0)), ("2023-09-03 01:00 -0300".into(), "2023-09-04 00:00 -0300".into(), 23.0));
        assert_eq!(window(day, utc(2023, 9, 3, 3, 59)).1, "2023-09-03 01:00 -0300", "the day before ends at the change");
    }

    /// Windows tile time around every change of some unusual zones: each instant's window
    /// holds it, its end is the next one's start, and every window start is a local grid time
    /// or a clock change.
    #[test]
    fn windows_tile_time_around_clock_changes() {
        let zones = ["Europe/Berlin", "Asia/Kathmandu", "Australia/Lord_Howe", "America/Santiago", "Pacific/Chatham", "Pacific/Apia"];
        let sizes = [15 * MIN, H, 6 * H, 12 * H, DAY];
        let days = [(2011, 12, 29), (2024, 3, 30), (2024, 4, 6), (2024, 9, 7), (2024, 9, 28), (2024, 10, 5), (2024, 10, 26)]
            .map(|(y, m, d)| utc(y, m, d, 0, 0));
        for name in zones {
            for size_ms in sizes {
                let w = Windows { size_ms, zone: zone(name) };
                for from in days {
                    let mut ts = from;
                    while ts < from + 3 * DAY {
                        let (start, end) = (w.start(ts), w.end(w.start(ts)));
                        assert!(
                            start <= ts && ts < end,
                            "{name} {size_ms}: {} in [{}, {})",
                            local(w.zone, ts),
                            local(w.zone, start),
                            local(w.zone, end)
                        );
                        assert_eq!((w.start(end - 1), w.start(end)), (start, end), "{name} {size_ms}: {}", local(w.zone, ts));
                        assert!(end - start <= size_ms + 2 * H && end - start >= size_ms.min(H) / 4, "{name} {size_ms}: {}", end - start);
                        ts += 7 * MIN + 13_000;
                    }
                }
            }
        }
    }
}
