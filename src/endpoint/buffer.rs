//! The write-behind buffer of the bounded endpoint logs (activity, requests).
//!
//! Logging every request straight into sled cost three sled writes per delivery (a scan for
//! the sequence, the insert, a scan to trim) and, at thousands of requests per second, most
//! of the process's CPU in sled's I/O threads (docs/PERFORMANCE.md). Instead, entries are
//! appended to memory, and [`LogBuffer::flush`] writes what accumulated as one sled batch per
//! log: only the newest `bound` entries of each subscription, plus the removal of what falls
//! beyond the bound. Readers see memory and sled merged, so the admin API shows an entry as
//! soon as it is pushed.
//!
//! What a crash costs: entries pushed since the last flush (`delivery.log_flush_interval_ms`)
//! are lost on `kill -9`; a graceful stop flushes them. The logs are an observability aid,
//! not a source of truth: failure counts (auto-disable) and parked retries are never
//! buffered here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::{Batch, IVec, Tree};

use super::state::{decode, encode, sub_key};

/// One bounded log of every subscription: the entries not yet in sled and each
/// subscription's next sequence number.
pub(super) struct LogBuffer<T> {
    tree: Tree,
    /// Entries kept per subscription.
    bound: usize,
    /// What the log is, for error messages.
    what: &'static str,
    subs: Mutex<HashMap<String, SubLog<T>>>,
    /// Held for a whole flush (and by [`Self::forget`]), so a flush never writes back the
    /// entries of a subscription forgotten meanwhile and two flushes never overlap.
    flushing: Mutex<()>,
}

struct SubLog<T> {
    /// Sequence number of the next entry; continues from sled's last key after a restart.
    next: u64,
    /// Entries not yet written to sled (or being written now), oldest first, at most `bound`.
    entries: VecDeque<(u64, Arc<T>)>,
}

impl<T: Serialize + DeserializeOwned + Clone> LogBuffer<T> {
    pub(super) fn new(tree: Tree, bound: usize, what: &'static str) -> Self {
        Self { tree, bound, what, subs: Mutex::new(HashMap::new()), flushing: Mutex::new(()) }
    }

    pub(super) fn tree(&self) -> &Tree {
        &self.tree
    }

    fn subs(&self) -> MutexGuard<'_, HashMap<String, SubLog<T>>> {
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an entry; the oldest unflushed one is dropped beyond the bound.
    pub(super) fn push(&self, sub: &str, value: T) -> Result<(), sled::Error> {
        let mut subs = self.subs();
        if !subs.contains_key(sub) {
            let next = match self.tree.scan_prefix(sub_key(sub)).keys().next_back() {
                Some(k) => seq_of(&k?) + 1,
                None => 0,
            };
            subs.insert(sub.to_owned(), SubLog { next, entries: VecDeque::new() });
        }
        let log = subs.get_mut(sub).expect("inserted above");
        log.entries.push_back((log.next, Arc::new(value)));
        log.next += 1;
        if log.entries.len() > self.bound {
            log.entries.pop_front();
        }
        Ok(())
    }

    /// The newest `n` entries (at most the bound), newest first: memory, then sled.
    pub(super) fn newest(&self, sub: &str, n: usize) -> Result<Vec<T>, sled::Error> {
        let n = n.min(self.bound);
        let (mut out, below): (Vec<T>, Option<u64>) = match self.subs().get(sub) {
            Some(log) => (
                log.entries.iter().rev().take(n).map(|(_, v)| (**v).clone()).collect(),
                Some(log.entries.front().map_or(log.next, |(seq, _)| *seq)),
            ),
            None => (Vec::new(), None),
        };
        if out.len() >= n {
            return Ok(out);
        }
        let prefix = sub_key(sub);
        let values = match below {
            // Entries being flushed are in memory and possibly in sled already: read sled
            // only below the oldest one in memory.
            Some(seq) => self.tree.range(prefix.clone()..seq_key(&prefix, seq)).values().rev().collect::<Vec<_>>(),
            None => self.tree.scan_prefix(&prefix).values().rev().collect(),
        };
        for v in values.into_iter().take(n - out.len()) {
            out.extend(decode(&v?, self.what));
        }
        Ok(out)
    }

    /// Writes every unflushed entry and trims each touched subscription to the bound, in one
    /// sled batch, then hands each entry written to `written` (subscription, sequence, bytes).
    /// Returns the number of entries written.
    pub(super) fn flush(&self, written: &mut dyn FnMut(&str, u64, &[u8])) -> Result<usize, sled::Error> {
        let _f = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let taken: Vec<(String, u64, Vec<(u64, Arc<T>)>)> = self
            .subs()
            .iter()
            .filter(|(_, log)| !log.entries.is_empty())
            .map(|(sub, log)| (sub.clone(), log.next, log.entries.iter().cloned().collect()))
            .collect();
        if taken.is_empty() {
            return Ok(0);
        }
        let mut b = Batch::default();
        let mut stored = Vec::new();
        for (sub, next, entries) in &taken {
            let prefix = sub_key(sub);
            if let Some(cutoff) = next.checked_sub(self.bound as u64) {
                for k in self.tree.range(prefix.clone()..seq_key(&prefix, cutoff)).keys() {
                    b.remove(k?);
                }
            }
            for (seq, value) in entries {
                match encode(&**value) {
                    Ok(bytes) => {
                        b.insert(seq_key(&prefix, *seq), bytes.clone());
                        stored.push((sub.as_str(), *seq, bytes));
                    }
                    Err(error) => tracing::error!(%error, what = self.what, "Endpoint log entry not stored."),
                }
            }
        }
        self.tree.apply_batch(b)?;
        for (sub, seq, bytes) in &stored {
            written(sub, *seq, bytes);
        }
        let count = stored.len();
        drop(stored);
        let mut subs = self.subs();
        for (sub, _, entries) in taken {
            let Some(log) = subs.get_mut(&sub) else { continue };
            let last = entries.last().map_or(0, |(seq, _)| *seq);
            while log.entries.front().is_some_and(|(seq, _)| *seq <= last) {
                log.entries.pop_front();
            }
        }
        Ok(count)
    }

    /// Drops a subscription's unflushed entries and its sequence (its sled keys are removed
    /// by the caller while this runs).
    pub(super) fn forget<R>(&self, sub: &str, remove_stored: impl FnOnce() -> R) -> R {
        let _f = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        self.subs().remove(sub);
        remove_stored()
    }

    /// Runs `f` on every entry of `sub`, newest first (memory, then sled), until it returns
    /// `Some`.
    pub(super) fn find<R>(&self, sub: &str, mut f: impl FnMut(&T) -> Option<R>) -> Result<Option<R>, sled::Error> {
        let below = match self.subs().get(sub) {
            Some(log) => {
                if let Some(r) = log.entries.iter().rev().find_map(|(_, v)| f(v)) {
                    return Ok(Some(r));
                }
                Some(log.entries.front().map_or(log.next, |(seq, _)| *seq))
            }
            None => None,
        };
        let prefix = sub_key(sub);
        let iter = match below {
            Some(seq) => self.tree.range(prefix.clone()..seq_key(&prefix, seq)),
            None => self.tree.scan_prefix(&prefix),
        };
        for v in iter.values().rev() {
            if let Some(r) = decode::<T>(&v?, self.what).as_ref().and_then(&mut f) {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

pub(super) fn seq_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &IVec) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&key[key.len() - 8..]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::super::{Action, Activity, EndpointStore, RequestLog};

    fn act(at_ms: i64) -> Activity {
        Activity { at_ms, action: Action::Delivered, delivery_id: Some(format!("msg_{at_ms}")), attempt: Some(1), detail: None }
    }

    fn request(at_ms: i64) -> RequestLog {
        RequestLog {
            at_ms,
            delivery_id: format!("d{at_ms}"),
            attempt: 1,
            method: "POST".into(),
            url: "https://h.example/hook".into(),
            request_headers: vec![],
            request_body: "{}".into(),
            status: Some(200),
            response_headers: vec![],
            response_body_excerpt: String::new(),
            truncated: false,
            duration_ms: 1,
            error: None,
        }
    }

    fn times<T>(v: &[T], at: impl Fn(&T) -> i64) -> Vec<i64> {
        v.iter().map(at).collect()
    }

    #[test]
    fn entries_are_readable_before_and_after_a_flush_and_survive_a_graceful_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let s = EndpointStore::open(&db).unwrap();
            for t in 0..7 {
                s.push_activity("a", act(t)).unwrap();
            }
            assert_eq!(s.activity_log.tree().len(), 0, "buffered, not written yet");
            assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), [6, 5, 4, 3, 2, 1, 0], "read from memory");
            assert_eq!(s.flush_logs().unwrap(), 7);
            assert_eq!(s.activity_log.tree().len(), 7);
            for t in 7..12 {
                s.push_activity("a", act(t)).unwrap();
            }
            assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), (2..12).rev().collect::<Vec<_>>(), "memory then sled, bounded");
            for t in 0..150 {
                s.push_request("r", request(t)).unwrap();
            }
            assert_eq!(s.find_request_body("r", "d149").unwrap().map(|r| r.at_ms), Some(149));
            assert_eq!(s.find_request_body("r", "d49").unwrap(), None, "beyond the bound before any flush");
            // A graceful stop: the last flush, then sled's.
            assert_eq!(s.flush_logs().unwrap(), 5 + 100);
            assert_eq!(s.flush_logs().unwrap(), 0, "nothing left");
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let s = EndpointStore::open(&db).unwrap();
        assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), (2..12).rev().collect::<Vec<_>>());
        assert_eq!(s.activity_log.tree().len(), 10, "trimmed in sled");
        let r = s.requests("r").unwrap();
        assert_eq!((r.len(), r[0].at_ms, r[99].at_ms), (100, 149, 50));
        assert_eq!(s.find_request_body("r", "d50").unwrap().map(|r| r.at_ms), Some(50), "found in sled");
        s.push_activity("a", act(12)).unwrap();
        s.flush_logs().unwrap();
        assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), (3..13).rev().collect::<Vec<_>>(), "the sequence continues");
        assert_eq!(s.activity_log.tree().len(), 10);
    }

    #[test]
    fn unflushed_entries_are_lost_without_a_flush_but_the_rest_stays() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let s = EndpointStore::open(&db).unwrap();
            s.push_activity("a", act(1)).unwrap();
            s.flush_logs().unwrap();
            s.push_activity("a", act(2)).unwrap();
            db.flush().unwrap(); // as if killed now: the buffer is gone
        }
        // sled gives its file lock up on a background thread: wait for it, as StateDb::open does.
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let db = db.db().clone();
        let s = EndpointStore::open(&db).unwrap();
        assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), [1]);
        s.push_activity("a", act(3)).unwrap();
        assert_eq!(times(&s.activity("a").unwrap(), |a| a.at_ms), [3, 1]);
    }

    #[test]
    fn forget_drops_buffered_entries_too() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = EndpointStore::open(&db).unwrap();
        s.push_request("a", request(1)).unwrap();
        s.flush_logs().unwrap();
        s.push_request("a", request(2)).unwrap();
        s.push_request("ab", request(3)).unwrap();
        s.forget("a").unwrap();
        assert!(s.requests("a").unwrap().is_empty());
        s.flush_logs().unwrap();
        assert!(s.requests("a").unwrap().is_empty(), "not written back by the flush");
        assert_eq!(times(&s.requests("ab").unwrap(), |r| r.at_ms), [3]);
    }

    #[test]
    fn success_times_are_buffered_but_failure_counts_are_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let s = EndpointStore::open(&db).unwrap();
            assert_eq!(s.record_failure("a", "boom", 1).unwrap(), 1);
            s.record_success_at("a", 2).unwrap(); // resets the count: written at once
            s.record_success_at("a", 3).unwrap(); // only the time changes: buffered
            assert_eq!(s.state("a").unwrap().last_success_at_ms, Some(3), "visible at once");
            assert_eq!(s.stored("a").unwrap().last_success_at_ms, Some(2));
            assert_eq!(s.record_failure("a", "again", 4).unwrap(), 1);
            assert_eq!(s.stored("a").unwrap().last_success_at_ms, Some(3), "written with the failure");
            s.record_success_at("a", 5).unwrap();
            s.record_success_at("a", 6).unwrap();
            db.flush().unwrap(); // killed before a log flush
        }
        let db = sled::open(dir.path()).unwrap();
        let s = EndpointStore::open(&db).unwrap();
        let st = s.state("a").unwrap();
        assert_eq!((st.consecutive_failures, st.last_success_at_ms), (0, Some(5)), "the reset was written; the last time was not");
        s.record_success_at("a", 7).unwrap();
        s.record_success_at("a", 8).unwrap();
        s.flush_logs().unwrap();
        assert_eq!(s.stored("a").unwrap().last_success_at_ms, Some(8));
    }
}
