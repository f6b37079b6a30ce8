//! Which parked retries a sender tick starts, and when one put off because its subscription
//! is full comes due again.
//!
//! A tick starts up to [`PER_TICK`] due deliveries of the retry store, earliest first. Rows
//! already in flight (sending, or waiting for one of a slow endpoint's permits) and rows of
//! retry partitions not assigned to this instance are passed over inside the store's scan
//! and take none of the tick's places. (They used to be returned and then skipped, so 1,024
//! rows waiting for one slow endpoint took every place and starved every other
//! subscription's retries.)
//!
//! Fairness between subscriptions: one holds at most its queue and overflow
//! (`delivery.per_subscription_queue` + `per_subscription_overflow`) in flight, and its
//! further due rows are put off at once as busy. A busy row comes due again a second later,
//! but no more of one subscription's busy rows come due in any second than it can hold in
//! flight: a stalled subscription's backlog is spread over the following seconds instead of
//! all coming due again every second and filling every tick.

use std::collections::{HashMap, HashSet};

use super::park::{ParkStore, Parked};

/// Parked deliveries one tick may start.
pub(super) const PER_TICK: usize = 1024;

#[derive(Default)]
pub(super) struct Schedule {
    /// Parked deliveries being sent (or put off) now, so a tick does not start them twice.
    in_flight: HashSet<(i32, i64)>,
    /// Retry partitions assigned to us; only their parked deliveries are started.
    partitions: HashSet<i32>,
    /// Per subscription, the earliest time (epoch ms, fractional) its next busy row may come
    /// due; entries in the past are dropped on each tick.
    busy_next: HashMap<String, f64>,
}

impl Schedule {
    pub(super) fn assign(&mut self, partition: i32) {
        self.partitions.insert(partition);
    }

    pub(super) fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Parked deliveries started and not yet finished or put off.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Parked deliveries of one retry partition started and not yet finished or put off.
    pub(super) fn in_flight_in(&self, partition: i32) -> usize {
        self.in_flight.iter().filter(|(p, _)| *p == partition).count()
    }

    /// The due deliveries to start now (at most [`PER_TICK`]), marked in flight.
    pub(super) fn take_due(&mut self, park: &ParkStore, now_ms: i64) -> Result<Vec<Parked>, sled::Error> {
        let (in_flight, ours) = (&self.in_flight, &self.partitions);
        let due = park.due(now_ms, PER_TICK, |p, o| !ours.contains(&p) || in_flight.contains(&(p, o)))?;
        self.in_flight.extend(due.iter().map(|p| (p.partition, p.offset)));
        self.busy_next.retain(|_, next| *next > now_ms as f64);
        Ok(due)
    }

    /// A started delivery is finished or put off: a later tick may start it again.
    pub(super) fn release(&mut self, p: &Parked) {
        self.in_flight.remove(&(p.partition, p.offset));
    }

    /// When a delivery of `subscription` put off as busy, wanted again at `wanted_ms`, comes
    /// due: at `wanted_ms`, or later, so that at most `per_sec` of the subscription's busy
    /// rows come due in any second.
    pub(super) fn busy_due(&mut self, subscription: &str, wanted_ms: i64, per_sec: usize) -> i64 {
        let next = self.busy_next.entry(subscription.to_string()).or_insert(f64::MIN);
        let due = next.max(wanted_ms as f64);
        *next = due + 1000.0 / per_sec.max(1) as f64;
        due.ceil() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::record::DeliveryRecord;

    fn rec(sub: &str, due: i64) -> DeliveryRecord {
        DeliveryRecord::sample(sub, due)
    }

    #[test]
    fn rows_in_flight_or_not_ours_take_no_place_in_a_tick() {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let park = ParkStore::open(&db).unwrap();
        let stalled: Vec<(i64, DeliveryRecord)> = (0..2_000).map(|o| (o, rec("stalled", 10 + o))).collect();
        park.park(0, &stalled).unwrap();
        park.park(1, &[(1, rec("other", 3_000)), (2, rec("other", 3_001))]).unwrap();
        park.park(2, &[(1, rec("elsewhere", 5))]).unwrap();
        let mut s = Schedule::default();
        s.assign(0);
        s.assign(1);
        let first = s.take_due(&park, 10_000).unwrap();
        assert_eq!(first.len(), PER_TICK);
        assert!(first.iter().all(|p| p.record.subscription_id == "stalled"));
        let second = s.take_due(&park, 10_000).unwrap();
        let subs: Vec<&str> = second.iter().map(|p| p.record.subscription_id.as_str()).collect();
        assert_eq!(subs.len(), 2_000 - PER_TICK + 2, "the rest of the stalled rows and the other subscription's");
        assert_eq!(&subs[subs.len() - 2..], ["other", "other"]);
        assert!(s.take_due(&park, 10_000).unwrap().is_empty(), "everything due is in flight; partition 2 is not ours");
        assert_eq!(s.in_flight(), 2_002);
        s.release(&second[second.len() - 1]);
        let again = s.take_due(&park, 10_000).unwrap();
        assert_eq!(again.iter().map(|p| (p.partition, p.offset)).collect::<Vec<_>>(), [(1, 2)], "released: started again");
        s.revoke(1);
        s.release(&again[0]);
        assert!(s.take_due(&park, 10_000).unwrap().is_empty(), "revoked partition: not ours any more");
    }

    #[test]
    fn a_full_subscriptions_busy_rows_come_due_at_most_its_capacity_a_second() {
        let mut s = Schedule::default();
        let dues: Vec<i64> = (0..3_000).map(|_| s.busy_due("stalled", 1_000, 1_088)).collect();
        assert_eq!(dues[0], 1_000, "the first ones a second later, as asked");
        for w in dues.windows(2) {
            assert!(w[1] >= w[0]);
        }
        for start in (1_000..4_000).step_by(250) {
            let in_window = dues.iter().filter(|d| (start..start + 1_000).contains(*d)).count();
            assert!(in_window <= 1_089, "{in_window} come due in the second from {start}");
        }
        assert!(*dues.last().unwrap() >= 3_700, "spread over the following seconds");
        assert_eq!(s.busy_due("other", 1_000, 1_088), 1_000, "another subscription is not held back");
        assert_eq!(s.busy_due("stalled", 10_000, 1_088), 10_000, "once its spread has passed, as asked again");
    }
}
