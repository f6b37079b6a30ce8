//! Which offset may be committed, per input partition.
//!
//! Records of a partition are read in order but finish out of order (one waits for three
//! delivery acks, the next matched nothing). The committed offset must never pass a record
//! whose work is unfinished (DESIGN section 2), so the position to store is the smallest
//! unfinished offset, or one past the highest finished offset when nothing is pending.
//! Pure bookkeeping; the caller stores the returned positions in Kafka.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
pub type Tp = (String, i32);

#[derive(Debug, Default)]
struct Partition {
    /// Offsets begun and not finished.
    pending: BTreeSet<i64>,
    /// Highest offset begun; the position is one past it when nothing is pending.
    highest: Option<i64>,
    /// Last position handed out, so each is returned once.
    stored: Option<i64>,
}

impl Partition {
    fn position(&self) -> Option<i64> {
        match self.pending.first() {
            Some(first) => Some(*first),
            None => self.highest.map(|h| h + 1),
        }
    }
}

/// Pending offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<Tp, Partition>,
    pending: usize,
}

impl OffsetTracker {
    /// Records that work on `offset` started.
    pub fn begin(&mut self, tp: &Tp, offset: i64) {
        let p = self.parts.entry(tp.clone()).or_default();
        // The first offset read is where the committed position already is.
        p.stored.get_or_insert(offset);
        if p.pending.insert(offset) {
            self.pending += 1;
        }
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// Records that work on `offset` finished. Returns the new position to store (the next
    /// offset to read after a restart) when it moved forward.
    pub fn finish(&mut self, tp: &Tp, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp)?;
        if !p.pending.remove(&offset) {
            return None; // revoked meanwhile, or finished twice
        }
        self.pending -= 1;
        let pos = p.position()?;
        if p.stored.is_some_and(|s| s >= pos) {
            return None;
        }
        p.stored = Some(pos);
        Some(pos)
    }

    /// Forgets a partition taken away by a rebalance; its next owner replays from the
    /// committed offset, and late finishes for it are ignored.
    pub fn revoke(&mut self, tp: &Tp) {
        if let Some(p) = self.parts.remove(tp) {
            self.pending -= p.pending.len();
        }
    }

    /// The current position of one partition, if anything was read from it.
    pub fn position(&self, tp: &Tp) -> Option<i64> {
        self.parts.get(tp).and_then(Partition::position)
    }

    /// Records of one partition begun and not finished.
    pub fn pending_in(&self, tp: &Tp) -> usize {
        self.parts.get(tp).map_or(0, |p| p.pending.len())
    }

    /// Records begun and not finished, over all partitions (backpressure measure).
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The position of each partition right now (for the final commit at shutdown).
    pub fn positions(&self) -> Vec<(Tp, i64)> {
        self.parts.iter().filter_map(|(tp, p)| p.position().map(|pos| (tp.clone(), pos))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        ("crm.events".into(), 0)
    }

    #[test]
    fn position_waits_for_the_oldest_unfinished_record() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.begin(&tp(), o);
        }
        assert_eq!(t.finish(&tp(), 12), None, "10 still pending");
        assert_eq!(t.finish(&tp(), 11), None);
        assert_eq!(t.finish(&tp(), 10), Some(13), "10..12 done, 13 pending");
        assert_eq!(t.finish(&tp(), 14), None);
        assert_eq!(t.finish(&tp(), 13), Some(15));
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn revoke_forgets_and_ignores_late_finishes() {
        let mut t = OffsetTracker::default();
        t.begin(&tp(), 1);
        t.begin(&tp(), 2);
        t.revoke(&tp());
        assert_eq!(t.pending(), 0);
        assert_eq!(t.finish(&tp(), 1), None);
        t.begin(&tp(), 5);
        assert_eq!(t.finish(&tp(), 5), Some(6));
        assert_eq!(t.finish(&tp(), 5), None, "finishing twice is harmless");
    }

    #[test]
    fn positions_report_every_partition() {
        let mut t = OffsetTracker::default();
        let other: Tp = ("crm.events".into(), 1);
        t.begin(&tp(), 7);
        t.begin(&other, 3);
        t.finish(&other, 3);
        let mut pos = t.positions();
        pos.sort();
        assert_eq!(pos, vec![(tp(), 7), (other, 4)]);
    }
}
