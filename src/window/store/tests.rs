//! Tests of the window store on real sled files.

use super::*;
use crate::window::clock::{Clock, ManualClock};
use std::time::Duration;

const MIN: i64 = 60_000;
const H: i64 = 60 * MIN;
const HEADER: &[u8] = br#"{"chat":"c"}"#;

fn open() -> (tempfile::TempDir, WindowStore) {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
    (dir, WindowStore::open(&db).unwrap())
}

/// A message for a 1h window with a one-minute grace.
fn msg<'a>(sub: &'a str, chat: &'a str, partition: i32, offset: i64, ts_ms: i64, message: &'a [u8]) -> Incoming<'a> {
    Incoming { sub_id: sub, chat_id: chat, partition, offset, ts_ms, windows: Windows::utc(H), grace_ms: MIN, message, header: HEADER }
}

fn key(sub: &str, chat: &str, start_ms: i64) -> BundleKey {
    BundleKey { sub_id: sub.into(), chat_id: chat.into(), start_ms }
}

fn texts(b: &Bundle) -> Vec<&str> {
    b.messages.iter().map(|m| std::str::from_utf8(m).unwrap()).collect()
}

#[test]
fn placing_against_the_late_marker() {
    let hour = Windows::utc(H);
    assert_eq!(place(H + 5, hour, None), (H, false));
    assert_eq!(place(H + 5, hour, Some(H)), (H, false), "the emitted window ended where this one starts");
    assert_eq!(place(H + 5, hour, Some(2 * H)), (2 * H, true), "own window emitted: next bundle, late");
    assert_eq!(place(5, hour, Some(3 * H)), (3 * H, true), "several windows back: still the marker");
}

#[test]
fn batch_with_many_chats_and_subs() {
    let (_dir, s) = open();
    let subs = ["sub_a", "sub_b", "sub_c"];
    let chats: Vec<String> = (0..40).map(|c| format!("chat_{c}")).collect();
    let bodies: Vec<String> = (0..5).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
    let mut offsets = [0i64; 4];
    let mut batch = Vec::new();
    for (c, chat) in chats.iter().enumerate() {
        let p = (c % 4) as i32;
        for (i, body) in bodies.iter().enumerate() {
            for sub in subs {
                batch.push(msg(sub, chat, p, offsets[p as usize], 10 * H + i as i64 * MIN, body.as_bytes()));
            }
            offsets[p as usize] += 1;
        }
    }
    let placed = s.apply(&batch).unwrap();
    assert_eq!(placed.len(), 600);
    assert!(placed.iter().all(|(k, late)| k.start_ms == 10 * H && !late));
    assert_eq!((placed[0].0.sub_id.as_str(), placed[0].0.chat_id.as_str()), ("sub_a", "chat_0"));
    assert_eq!((placed[599].0.sub_id.as_str(), placed[599].0.chat_id.as_str()), ("sub_c", "chat_39"));
    assert_eq!(s.open_bundles(), 120);
    for p in 0..4 {
        assert_eq!(s.checkpoint(p).unwrap(), Some(offsets[p as usize] - 1));
    }
    assert_eq!(s.due(11 * H + MIN, 7).unwrap().len(), 7, "limit");
    assert_eq!(s.due(11 * H + MIN, 1000).unwrap().len(), 120);
    let b = s.begin_emit(&key("sub_b", "chat_7", 10 * H)).unwrap().unwrap();
    assert_eq!(texts(&b), [r#"{"i":0}"#, r#"{"i":1}"#, r#"{"i":2}"#, r#"{"i":3}"#, r#"{"i":4}"#]);
    assert_eq!((b.header.as_slice(), b.end_ms, b.first_ts_ms, b.last_ts_ms), (HEADER, 11 * H, 10 * H, 10 * H + 4 * MIN));
    assert_eq!((b.partition, b.first_offset, b.late), (3, 5, false), "chat_7 is the 2nd chat of partition 3");
    assert_eq!(s.begin_emit(&key("sub_b", "chat_7", 9 * H)).unwrap(), None);
}

#[test]
fn due_returns_only_closed_windows_earliest_first() {
    let (_dir, s) = open();
    let clock = ManualClock::new(0);
    let mut ten_s = msg("b", "c", 0, 2, 1_000, b"{}");
    (ten_s.windows, ten_s.grace_ms) = (Windows::utc(10_000), 0);
    let mut six_h = msg("c", "c", 0, 3, 2_000, b"{}");
    six_h.windows = Windows::utc(6 * H);
    s.apply(&[msg("a", "c", 0, 1, 0, b"{}"), ten_s, six_h, msg("a", "d", 0, 4, H, b"{}")]).unwrap();
    assert!(s.due(clock.now_ms(), 10).unwrap().is_empty());
    clock.advance(Duration::from_millis(9_999));
    assert!(s.due(clock.now_ms(), 10).unwrap().is_empty());
    clock.advance(Duration::from_millis(1));
    assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("b", "c", 0)]);
    clock.set(H + MIN - 1);
    assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("b", "c", 0)], "the 1h window waits for its grace");
    clock.set(24 * H);
    let all = [key("b", "c", 0), key("a", "c", 0), key("a", "d", H), key("c", "c", 0)];
    assert_eq!(s.due(clock.now_ms(), 10).unwrap(), all);
    assert_eq!(s.due(clock.now_ms(), 2).unwrap(), all[..2]);
    assert_eq!(s.due(i64::MAX, 10).unwrap(), all);
    s.begin_emit(&all[1]).unwrap().unwrap();
    assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [all[0].clone(), all[2].clone(), all[3].clone()], "emitting: not due again");
}

#[test]
fn message_after_emission_goes_to_next_bundle_flagged_late() {
    let (_dir, s) = open();
    let clock = ManualClock::new(10 * MIN);
    s.apply(&[msg("s", "c", 0, 1, clock.now_ms(), b"m1")]).unwrap();
    clock.set(H + MIN);
    let first = s.due(clock.now_ms(), 10).unwrap();
    assert_eq!(first, [key("s", "c", 0)]);
    let b = s.begin_emit(&first[0]).unwrap().unwrap();
    assert_eq!((texts(&b), b.late), (vec!["m1"], false));
    let placed = s
        .apply(&[msg("s", "c", 0, 2, 20 * MIN, b"m2"), msg("s", "other", 0, 3, 20 * MIN, b"o"), msg("s", "c", 0, 4, H + 5 * MIN, b"m3")])
        .unwrap();
    assert_eq!(placed, [(key("s", "c", H), true), (key("s", "other", 0), false), (key("s", "c", H), false)]);
    assert_eq!(s.begin_emit(&first[0]).unwrap().unwrap(), b, "the emitted bundle did not change");
    s.remove(&first[0]).unwrap();
    assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("s", "other", 0)], "next bundle still open");
    clock.set(2 * H + MIN);
    let next = s.begin_emit(&key("s", "c", H)).unwrap().unwrap();
    assert_eq!((texts(&next), next.late, next.first_ts_ms), (vec!["m2", "m3"], true, 20 * MIN));
    let placed = s.apply(&[msg("s", "c", 0, 5, 30 * MIN, b"m4")]).unwrap();
    assert_eq!(placed, [(key("s", "c", 2 * H), true)], "the marker moved on");
}

#[test]
fn resized_window_never_joins_a_bundle_being_emitted() {
    let (_dir, s) = open();
    s.apply(&[msg("s", "c", 0, 1, 10 * MIN, b"1h")]).unwrap();
    s.begin_emit(&key("s", "c", 0)).unwrap().unwrap();
    let mut day = msg("s", "c", 0, 2, 30 * MIN, b"24h");
    day.windows = Windows::utc(24 * H);
    assert_eq!(s.apply(&[day]).unwrap(), [(key("s", "c", H), true)], "its 24h window starts where the emitted 1h one did");
    assert_eq!(texts(&s.begin_emit(&key("s", "c", 0)).unwrap().unwrap()), ["1h"]);
    s.remove(&key("s", "c", 0)).unwrap();
    let next = s.begin_emit(&key("s", "c", H)).unwrap().unwrap();
    assert_eq!((texts(&next), next.late, next.end_ms), (vec!["24h"], true, 24 * H), "it ends where its day does");
}

#[test]
fn remove_moves_the_low_watermark() {
    let (_dir, s) = open();
    s.apply(&[msg("s", "a", 0, 10, 0, b"a1"), msg("s", "b", 0, 11, 1, b"b1"), msg("s", "a", 0, 12, 2, b"a2")]).unwrap();
    s.apply(&[msg("s", "b", 0, 13, 3, b"b2"), msg("s", "c", 0, 14, H, b"c1")]).unwrap();
    assert_eq!((s.position(0).unwrap(), s.checkpoint(0).unwrap()), (Some(10), Some(14)));
    let a = key("s", "a", 0);
    assert_eq!(s.begin_emit(&a).unwrap().unwrap().first_offset, 10);
    assert_eq!((s.position(0).unwrap(), s.low_watermark(0).unwrap()), (Some(10), Some(10)), "emitted but not acknowledged: still held");
    s.remove(&a).unwrap();
    assert_eq!(s.position(0).unwrap(), Some(11));
    s.remove(&key("s", "b", 0)).unwrap();
    assert_eq!(s.position(0).unwrap(), Some(14));
    s.remove(&key("s", "c", H)).unwrap();
    assert_eq!(s.position(0).unwrap(), Some(15), "nothing open: one past the checkpoint");
    assert_eq!(s.low_watermark(0).unwrap(), None, "no bundle of the partition left");
    s.remove(&key("s", "c", H)).unwrap();
    assert_eq!((s.open_bundles(), s.position(9).unwrap()), (0, None));
    assert!(s.due(i64::MAX, 10).unwrap().is_empty());
    assert_eq!(s.tree.scan_prefix([b's']).count() + s.tree.scan_prefix([b'v']).count(), 0, "no segment left");
}

#[test]
fn drop_partition_forgets_only_that_partition() {
    let (_dir, s) = open();
    s.apply(&[msg("s", "a", 0, 5, 0, b"a"), msg("s", "b", 1, 7, 1, b"b"), msg("s", "a", 0, 6, H, b"a2")]).unwrap();
    // A repartitioned topic: chat `x` now on partition 1 while its bundle holds partition 0 too.
    s.apply(&[msg("s", "x", 0, 8, 2, b"x0"), msg("s", "x", 1, 9, 3, b"x1")]).unwrap();
    assert_eq!((s.position(0).unwrap(), s.position(1).unwrap(), s.open_bundles()), (Some(5), Some(7), 4));
    assert_eq!(s.drop_partition(0).unwrap(), 2);
    assert_eq!((s.position(0).unwrap(), s.checkpoint(0).unwrap()), (None, None));
    assert_eq!((s.position(1).unwrap(), s.checkpoint(1).unwrap(), s.open_bundles()), (Some(7), Some(9), 2));
    assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "b", 0), key("s", "x", 0)]);
    let x = s.begin_emit(&key("s", "x", 0)).unwrap().unwrap();
    assert_eq!((texts(&x), x.partition, x.first_offset, x.first_ts_ms), (vec!["x1"], 1, 9, 3));
    assert_eq!(s.drop_partition(1).unwrap(), 2);
    assert_eq!((s.open_bundles(), s.tree.len()), (0, 1), "only the late marker of `x` is left");
}

#[test]
fn settled_position_per_partition_forward_only_dropped_with_partition() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let s = WindowStore::open(&db).unwrap();
        s.apply(&[msg("s", "a", 0, 10, 0, b"a"), msg("s", "b", 1, 20, 0, b"b")]).unwrap();
        assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (None, None), "apply alone settles nothing");
        s.set_settled(0, 11).unwrap();
        s.set_settled(1, 7).unwrap();
        s.set_settled(1, 21).unwrap();
        s.set_settled(1, 15).unwrap();
        assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), Some(21)), "never backwards");
        assert_eq!((s.checkpoint(0).unwrap(), s.position(0).unwrap()), (Some(10), Some(10)), "checkpoint and watermark untouched");
        s.set_settled(2, 0).unwrap();
        assert_eq!(s.settled(2).unwrap(), Some(0), "offset 0 is a position like any other");
        assert_eq!(s.tree.get([b'f', 0, 0, 0, 1]).unwrap().as_deref(), Some(&ord(21)[..]), "`f` partition(u32 BE) -> ord(i64)");
        db.flush_blocking().unwrap();
    }
    let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
    let s = WindowStore::open(&db).unwrap();
    assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), Some(21)), "survives reopen");
    s.drop_partition(1).unwrap();
    assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), None), "a revoked partition replays from Kafka");
    assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0)], "no `f` entry is mistaken for a bundle");
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let s = WindowStore::open(&db).unwrap();
        s.apply(&[msg("s", "a", 2, 40, 0, b"a1"), msg("s", "b", 2, 41, H, b"b1"), msg("s", "a", 2, 42, 1, b"a2")]).unwrap();
        s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
        db.flush_blocking().unwrap();
    }
    let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
    let s = WindowStore::open(&db).unwrap();
    assert_eq!((s.open_bundles(), s.checkpoint(2).unwrap(), s.position(2).unwrap()), (2, Some(42), Some(40)));
    assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0), key("s", "b", H)], "an emission cut short is due again");
    assert_eq!(texts(&s.begin_emit(&key("s", "a", 0)).unwrap().unwrap()), ["a1", "a2"]);
    assert_eq!(s.apply(&[msg("s", "a", 2, 43, 2, b"a3")]).unwrap(), [(key("s", "a", H), true)], "the late marker survived");
}

/// An apply writes one segment (index and bodies) per partition, however many messages and
/// bundles it holds; the bundle still reports its count, first and last times and header.
#[test]
fn apply_writes_one_segment_and_bundle_reads_back_whole() {
    let (_d, s) = open();
    s.apply(&[msg("s", "a", 0, 1, 10, b"a1")]).unwrap();
    let before = s.tree.len();
    s.apply(&[msg("s", "a", 0, 2, 5, b"a0"), msg("s", "a", 0, 3, 30, b"a2"), msg("s", "b", 0, 4, 30, b"b")]).unwrap();
    assert_eq!(s.tree.len(), before + 2, "one segment: its index and its bodies");
    let b = s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
    assert_eq!((texts(&b), b.first_ts_ms, b.last_ts_ms), (vec!["a0", "a1", "a2"], 5, 30));
    assert_eq!((b.header.as_slice(), b.partition, b.first_offset, b.late), (HEADER, 0, 1, false));
}

/// A store of the per-message layout (version-2 and version-1 metas, one being emitted) is
/// converted on open: its bundles stay, due again, with their messages, headers and late
/// marker, and the old keys are gone.
#[test]
fn converts_a_store_of_the_per_message_layout() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let tree = db.tree("windows").unwrap();
        let (a, b) = (key("s", "a", 0).encode(), key("s", "b", H).encode());
        let meta = codec::Meta {
            end_ms: H,
            grace_ms: MIN,
            close_at_ms: H + MIN,
            late: false,
            emitting: true,
            parts: vec![codec::Part { partition: 0, first_offset: 7 }],
            header: None,
        };
        tree.insert(tagged(b'b', &[&a]), meta.encode()).unwrap();
        tree.insert(tagged(b'h', &[&a]), HEADER).unwrap();
        tree.insert(tagged(b'x', &[&a]), &[]).unwrap();
        tree.insert(tagged(b'e', &[&a[..a.len() - 8]]), &ord(H)).unwrap();
        let mut v1 = vec![1, 1];
        for n in [2 * H, MIN, 2 * H + MIN, H + 1, H + 2, 2] {
            v1.extend_from_slice(&n.to_be_bytes());
        }
        v1.extend_from_slice(&1u16.to_be_bytes());
        v1.extend_from_slice(&1i32.to_be_bytes());
        v1.extend_from_slice(&9i64.to_be_bytes());
        v1.extend_from_slice(br#"{"old":"header"}"#);
        tree.insert(tagged(b'b', &[&b]), v1).unwrap();
        tree.insert(tagged(b'd', &[&ord(2 * H + MIN), &b]), &[]).unwrap();
        for (id, ts, p, o, body) in [(&a, 10, 0, 8, &b"a2"[..]), (&a, 5, 0, 7, b"a1"), (&b, H + 1, 1, 9, b"b1"), (&b, H + 2, 1, 10, b"b2")]
        {
            tree.insert(codec::msg_key(id, ts, p, o), body).unwrap();
        }
        tree.insert([b'n'], &ord(2)).unwrap();
        db.flush_blocking().unwrap();
    }
    let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
    let s = WindowStore::open(&db).unwrap();
    assert_eq!(s.open_bundles(), 2);
    assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0), key("s", "b", H)], "the one being emitted is due again");
    let a = s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
    assert_eq!((texts(&a), a.header.as_slice(), a.first_offset, a.end_ms), (vec!["a1", "a2"], HEADER, 7, H));
    let b = s.begin_emit(&key("s", "b", H)).unwrap().unwrap();
    assert_eq!((texts(&b), b.header.as_slice(), b.partition, b.late), (vec!["b1", "b2"], &br#"{"old":"header"}"#[..], 1, true));
    assert_eq!((s.low_watermark(0).unwrap(), s.low_watermark(1).unwrap()), (Some(7), Some(9)));
    assert_eq!(s.apply(&[msg("s", "a", 0, 11, 20, b"a3")]).unwrap(), [(key("s", "a", H), true)], "the marker is kept");
    for tag in [b'b', b'h', b'm', b'd', b'x', b'w', b'n'] {
        assert_eq!(s.tree.scan_prefix([tag]).count(), 0, "no `{}` key left", tag as char);
    }
}

/// What replay must tell apart: removed bundles (their records stay in segments shared with
/// stored ones) from bundles emitted and not yet removed, and two bundles of one key when a
/// window was resized after the first was removed.
#[test]
fn reopen_keeps_exactly_the_bundles_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let s = WindowStore::open(&db).unwrap();
        s.apply(&[msg("s", "a", 0, 1, 0, b"a0"), msg("s", "b", 0, 2, 0, b"b0"), msg("s", "a", 0, 3, H, b"a1")]).unwrap();
        assert_eq!(s.begin_emit(&key("s", "a", 0)).unwrap().unwrap().messages.len(), 1);
        s.remove(&key("s", "a", 0)).unwrap();
        s.begin_emit(&key("s", "a", H)).unwrap().unwrap();
        // (s, c): its 1 h bundle at 0 removed, then a day-long window at 0 emitted, not removed.
        s.apply(&[msg("s", "c", 0, 4, 5, b"c-hour")]).unwrap();
        s.begin_emit(&key("s", "c", 0)).unwrap();
        s.remove(&key("s", "c", 0)).unwrap();
        let mut day = msg("s", "c", 0, 5, 2 * H, b"c-day");
        day.windows = Windows::utc(24 * H);
        assert_eq!(s.apply(&[day]).unwrap(), [(key("s", "c", 0), false)], "a longer window ends after the marker");
        s.begin_emit(&key("s", "c", 0)).unwrap();
        db.flush_blocking().unwrap();
    }
    let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
    let s = WindowStore::open(&db).unwrap();
    assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "b", 0), key("s", "a", H), key("s", "c", 0)]);
    assert_eq!(texts(&s.begin_emit(&key("s", "c", 0)).unwrap().unwrap()), ["c-day"], "not the removed hour's message");
    assert_eq!(s.low_watermark(0).unwrap(), Some(2));
    for k in [key("s", "b", 0), key("s", "a", H), key("s", "c", 0)] {
        s.begin_emit(&k).unwrap();
        s.remove(&k).unwrap();
    }
    assert_eq!((s.open_bundles(), s.tree.scan_prefix([b's']).count()), (0, 0), "every segment deleted with its last bundle");
    drop(s);
    let s = WindowStore::open(&db).unwrap();
    assert_eq!((s.open_bundles(), s.position(0).unwrap()), (0, Some(6)));
}

#[test]
fn messages_ordered_by_timestamp_whatever_the_arrival_order() {
    let (_dir, s) = open();
    let mut batch = vec![msg("s", "c", 0, 1, 50, b"t50"), msg("s", "c", 0, 2, 10, b"t10"), msg("s", "c", 1, 1, 30, b"t30p1")];
    batch.push(msg("s", "c", 0, 3, 30, b"t30p0"));
    s.apply(&batch).unwrap();
    s.apply(&[msg("s", "c", 0, 4, 20, b"t20"), msg("s", "c", 0, 5, 0, b"t0")]).unwrap();
    let b = s.begin_emit(&key("s", "c", 0)).unwrap().unwrap();
    assert_eq!(texts(&b), ["t0", "t10", "t20", "t30p0", "t30p1", "t50"]);
    assert_eq!(b.origins, [(0, 5), (0, 2), (0, 4), (0, 3), (1, 1), (0, 1)], "(partition, offset) of each message");
    assert_eq!((b.first_ts_ms, b.last_ts_ms, b.partition, b.first_offset), (0, 50, 0, 1));
    s.apply(&[msg("s", "neg", 0, 6, -3, b"-3"), msg("s", "neg", 0, 7, -H, b"-H"), msg("s", "neg", 0, 8, -1, b"-1")]).unwrap();
    let b = s.begin_emit(&key("s", "neg", -H)).unwrap().unwrap();
    assert_eq!(texts(&b), ["-H", "-3", "-1"], "before 1970 too");
}

#[test]
fn unicode_bytes_and_ids_intact() {
    let (_dir, s) = open();
    let body = r#"{"text":"Xin chào 👋 שלום <b>&amp;</b>","sender":{"full_name":"Trần Lê"}}"#;
    let header = r#"{"chat":{"full_name":"Jöhn Dœ 🙂"}}"#;
    let mut m = msg("sub_ü", "chat_✓", 0, 1, 5, body.as_bytes());
    m.header = header.as_bytes();
    let placed = s.apply(&[m]).unwrap();
    assert_eq!(placed[0].0, key("sub_ü", "chat_✓", 0));
    assert_eq!(s.due(i64::MAX, 1).unwrap(), [key("sub_ü", "chat_✓", 0)]);
    let b = s.begin_emit(&placed[0].0).unwrap().unwrap();
    assert_eq!((b.messages, b.header), (vec![body.as_bytes().to_vec()], header.as_bytes().to_vec()));
}

#[test]
fn ids_that_concatenate_alike_stay_apart() {
    let (_dir, s) = open();
    s.apply(&[msg("ab", "c", 0, 1, 0, b"1"), msg("a", "bc", 0, 2, 0, b"2"), msg("a", "b", 0, 3, 0, b"3")]).unwrap();
    assert_eq!(s.open_bundles(), 3);
    assert_eq!(texts(&s.begin_emit(&key("a", "b", 0)).unwrap().unwrap()), ["3"]);
    assert_eq!(s.apply(&[msg("a", "bc", 0, 4, 1, b"4")]).unwrap(), [(key("a", "bc", 0), false)], "marker of (a, b) only");
}

#[test]
fn concurrent_apply_and_emit_lose_nothing() {
    let (_dir, s) = open();
    let writer = s.clone();
    let applying = std::thread::spawn(move || {
        for i in 0..200i64 {
            let bodies: Vec<String> = (0..5).map(|j| (i * 5 + j).to_string()).collect();
            let batch: Vec<_> =
                bodies.iter().enumerate().map(|(j, b)| msg("s", "c", 0, i * 5 + j as i64, j as i64, b.as_bytes())).collect();
            writer.apply(&batch).unwrap();
        }
    });
    let mut seen = Vec::new();
    loop {
        let done = applying.is_finished();
        for k in s.due(i64::MAX, 100).unwrap() {
            let b = s.begin_emit(&k).unwrap().unwrap();
            seen.extend(b.messages.iter().map(|m| std::str::from_utf8(m).unwrap().parse::<i64>().unwrap()));
            s.remove(&k).unwrap();
        }
        if done && s.open_bundles() == 0 {
            break;
        }
        std::thread::yield_now();
    }
    applying.join().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    assert_eq!(s.position(0).unwrap(), Some(1000));
}
