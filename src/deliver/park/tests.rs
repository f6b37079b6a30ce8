//! Tests of the retry store on real sled files.

use super::*;

/// The retry store in `dir`, opened as the daemon does; and whether the directory was wiped.
fn open_in(dir: &std::path::Path) -> (ParkStore, bool) {
    let (db, wiped) = StateDb::open_default(dir).unwrap();
    (ParkStore::open(&db).unwrap(), wiped)
}

fn rec(due: i64) -> DeliveryRecord {
    DeliveryRecord::sample("s", due)
}

#[test]
fn due_order_position_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (s, wiped) = open_in(dir.path());
    assert!(!wiped);
    s.park(0, &[(5, rec(300)), (6, rec(100)), (7, rec(200))]).unwrap();
    s.park(1, &[(2, rec(50))]).unwrap();
    assert_eq!(s.checkpoint(0).unwrap(), Some(7));
    assert_eq!(s.next_due_ms().unwrap(), Some(50));
    let due: Vec<(i32, i64)> = s.due(200, 10, |_, _| false).unwrap().iter().map(|p| (p.partition, p.offset)).collect();
    assert_eq!(due, vec![(1, 2), (0, 6), (0, 7)]);
    assert_eq!(s.position(0).unwrap(), Some(5));
    let first = s.due(1000, 10, |_, _| false).unwrap().into_iter().find(|p| p.offset == 5).unwrap();
    s.remove(&first).unwrap();
    assert_eq!(s.position(0).unwrap(), Some(6));
    for p in s.due(1000, 10, |_, _| false).unwrap().into_iter().filter(|p| p.partition == 0) {
        s.remove(&p).unwrap();
    }
    assert_eq!(s.position(0).unwrap(), Some(8), "nothing parked: one past the checkpoint");
    assert_eq!(s.len(), 1);
}

#[test]
fn reschedule_and_drop_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open_in(dir.path());
    s.park(3, &[(1, rec(10)), (2, rec(20))]).unwrap();
    let p = s.due(10, 1, |_, _| false).unwrap().remove(0);
    s.reschedule(&p, 500).unwrap();
    assert_eq!(s.next_due_ms().unwrap(), Some(20));
    assert_eq!(s.position(3).unwrap(), Some(1));
    assert_eq!(s.drop_partition(3).unwrap(), 2);
    assert!(s.is_empty());
    assert_eq!(s.next_due_ms().unwrap(), None);
    assert_eq!(s.checkpoint(3).unwrap(), None);
}

#[test]
fn due_passes_over_skipped_rows_inside_the_scan_and_counts_only_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (s, _) = open_in(dir.path());
    // 2,000 rows waiting for a stalled endpoint (in flight), due before everything else.
    let stalled: Vec<(i64, DeliveryRecord)> = (0..2_000).map(|o| (o, rec(10 + o))).collect();
    s.park(0, &stalled).unwrap();
    s.park(1, &[(7, rec(5_000)), (8, rec(5_001))]).unwrap();
    s.park(2, &[(3, rec(4_000))]).unwrap();
    let in_flight = |p: i32, o: i64| p == 0 && o < 1_990;
    let not_ours = |p: i32| p == 2;
    let got: Vec<(i32, i64)> =
        s.due(10_000, 5, |p, o| in_flight(p, o) || not_ours(p)).unwrap().iter().map(|p| (p.partition, p.offset)).collect();
    let mut want: Vec<(i32, i64)> = (1_990..1_995).map(|o| (0, o)).collect();
    assert_eq!(got, want, "the limit counts only rows that can be started");
    let got: Vec<(i32, i64)> =
        s.due(10_000, 1_024, |p, o| in_flight(p, o) || not_ours(p)).unwrap().iter().map(|p| (p.partition, p.offset)).collect();
    want.extend((1_995..2_000).map(|o| (0, o)));
    want.extend([(1, 7), (1, 8)]);
    assert_eq!(got, want, "the other subscription's rows behind 1,990 in-flight ones still come out, earliest first");
    assert!(s.due(10_000, 1_024, |p, _| p != 2).unwrap().iter().all(|p| p.partition == 2));
    assert!(s.due(4_999, 1_024, |p, _| p == 0).unwrap().iter().all(|p| p.partition == 2), "not yet due: not returned");
    assert_eq!(s.len(), 2_003, "nothing removed by looking");
}

#[test]
fn parked_count_equals_a_full_count_after_park_remove_drop_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let counts = |s: &ParkStore| (s.len(), count_parked(&s.tree));
    {
        let (s, _) = open_in(dir.path());
        s.park(0, &[(1, rec(10)), (2, rec(20)), (3, rec(30))]).unwrap();
        s.park(1, &[(1, rec(10)), (2, rec(40))]).unwrap();
        assert_eq!(counts(&s), (5, 5));
        s.park(0, &[(2, rec(25))]).unwrap();
        assert_eq!(counts(&s), (5, 5), "parked again: replaced, not counted twice");
        let due = s.due(i64::MAX, 10, |_, _| false).unwrap();
        assert_eq!(due.len(), 5, "a re-parked row leaves no second due entry behind");
        let first = due.iter().find(|p| (p.partition, p.offset) == (0, 1)).unwrap();
        assert!(s.remove(first).unwrap());
        assert!(!s.remove(first).unwrap(), "removing twice is a no-op");
        assert_eq!(counts(&s), (4, 4));
        let gone = due.iter().find(|p| p.partition == 1).unwrap();
        assert_eq!(s.drop_partition(1).unwrap(), 2);
        assert_eq!(counts(&s), (2, 2));
        assert!(!s.reschedule(gone, 99).unwrap(), "a row of a dropped partition is not brought back");
        assert!(!s.remove(gone).unwrap());
        let moved = due.iter().find(|p| (p.partition, p.offset) == (0, 3)).unwrap();
        assert!(s.reschedule(moved, 99).unwrap());
        assert_eq!(counts(&s), (2, 2));
        assert_eq!(s.due(i64::MAX, 10, |_, _| false).unwrap().len(), 2, "a rescheduled row is due once");
        s.db.flush_blocking().unwrap();
    }
    let (s, _) = open_in(dir.path());
    assert_eq!(counts(&s), (2, 2), "counted again at open");
    let clone = s.clone();
    clone.park(5, &[(1, rec(1))]).unwrap();
    assert_eq!(counts(&s), (3, 3), "clones share the count");
}

#[test]
fn settled_position_forward_only_survives_reopen_dropped_with_partition() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open_in(dir.path());
        s.park(0, &[(4, rec(10))]).unwrap();
        s.park(1, &[(9, rec(10))]).unwrap();
        assert_eq!(s.settled(0).unwrap(), None, "parking alone settles nothing");
        assert!(s.set_settled(0, 5).unwrap());
        assert!(!s.set_settled(0, 3).unwrap(), "never backwards");
        assert!(s.set_settled(1, 10).unwrap());
        assert!(
            s.tree.get([b'f', 0, 0, 0, 0]).unwrap().is_some(),
            "`f` partition(u32 BE), in the retry tree (the encoding: state::Partitions)"
        );
        assert_eq!((s.len(), s.position(0).unwrap()), (2, Some(4)), "not a parked delivery, not the watermark");
        s.db.flush_blocking().unwrap();
    }
    let (s, _) = open_in(dir.path());
    assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(5), Some(10)));
    s.drop_partition(1).unwrap();
    assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(5), None));
    assert_eq!(s.due(i64::MAX, 10, |_, _| false).unwrap().len(), 1);
}

#[test]
fn survives_reopen_with_its_checkpoint_and_count() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (s, _) = open_in(dir.path());
        s.park(0, &[(9, rec(1)), (10, rec(2))]).unwrap();
        s.db.flush_blocking().unwrap();
    }
    let (s, wiped) = open_in(dir.path());
    assert!(!wiped);
    assert_eq!((s.checkpoint(0).unwrap(), s.len()), (Some(10), 2));
    assert_eq!(s.position(0).unwrap(), Some(9));
}

/// A store written before the state layer (plain big-endian checkpoint and settled position)
/// is read as it was.
#[test]
fn reads_positions_written_in_the_old_encoding() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = StateDb::open_default(dir.path()).unwrap();
        let tree = db.tree("retry").unwrap();
        tree.insert(*b"c\0\0\0\x01", &41u64.to_be_bytes()).unwrap();
        tree.insert(*b"f\0\0\0\x01", &42u64.to_be_bytes()).unwrap();
        db.flush_blocking().unwrap();
    }
    let (s, _) = open_in(dir.path());
    assert_eq!((s.checkpoint(1).unwrap(), s.settled(1).unwrap(), s.position(1).unwrap()), (Some(41), Some(42), Some(42)));
}
