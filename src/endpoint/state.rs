//! The store and its per-subscription state: failure count, last error and success,
//! verification. The logs are in `logs.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::{Batch, Tree};

use super::buffer::LogBuffer;
use super::changelog::{state_key, Entry, SharedChangelog};
use super::logs::{ACTIVITY_KEPT, REQUESTS_KEPT};
use super::redact::redact_text;
use super::{Activity, EndpointState, RequestLog, Verification};

/// Longest error text kept in the state, in bytes (a receiver's error page can be large).
const MAX_ERROR_BYTES: usize = 2048;

/// `delivery.log_body_max_bytes`' default: the longest body kept in a request log entry.
pub const DEFAULT_BODY_CAP: usize = 16 * 1024;

/// Per-subscription endpoint state, activity log, request log and failed deliveries.
///
/// Key layout, `S` being the subscription id as u32 BE length then UTF-8 bytes:
/// - tree `endpoint_state`: `S` → [`EndpointState`] JSON;
/// - trees `activity` and `requests`: `S` seq(u64 BE) → [`super::Activity`] /
///   [`super::RequestLog`] JSON. Entries are buffered in memory and written by
///   [`Self::flush_logs`] (see `buffer.rs`); the sequence continues from the sub's last key;
/// - tree `failed`: `f` `S` time(i64 BE, sign flipped) delivery id → delivery record bytes,
///   ordered by time; `i` `S` delivery id → time, to take one by id; `n` `S` → how many
///   (u64 BE), for the bound.
///
/// Cheap to clone; all clones share the trees and the write lock.
#[derive(Clone)]
pub struct EndpointStore {
    pub(super) state: Tree,
    pub(super) activity_log: Arc<LogBuffer<Activity>>,
    pub(super) request_log: Arc<LogBuffer<RequestLog>>,
    pub(super) failed: Tree,
    /// Serialises read-modify-write (failure counts, bounds) and holds the success times not
    /// yet written.
    write: Arc<Mutex<Behind>>,
    /// Where the changes of the subscriptions this instance owns also go (`changelog.rs`).
    pub(super) changelog: Option<SharedChangelog>,
    /// `delivery.log_body_max_bytes`.
    pub(super) body_cap: usize,
}

/// What a success changes when the stored failure count is 0 already: only the time of the
/// last success, which is observability. It is kept in memory and written by
/// [`EndpointStore::flush_logs`] (or with the next state write), so a delivery costs no sled
/// write for it. Anything that changes the failure count is written at once.
#[derive(Default)]
pub(super) struct Behind {
    /// Latest success time per subscription, not yet in sled.
    success_at: HashMap<String, i64>,
    /// Subscriptions whose stored failure count is known to be 0.
    zero: HashSet<String>,
}

impl EndpointStore {
    /// Opens (creating if needed) the four trees in `db`. Open once per database and clone.
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Self::open_with(db, DEFAULT_BODY_CAP, None)
    }

    /// [`Self::open`] with request log bodies cut to `body_cap` bytes and, when given, the
    /// changelog the owned subscriptions' changes are written to.
    pub fn open_with(db: &sled::Db, body_cap: usize, changelog: Option<SharedChangelog>) -> Result<Self, sled::Error> {
        Ok(Self {
            changelog,
            body_cap: body_cap.max(1),
            state: db.open_tree("endpoint_state")?,
            activity_log: Arc::new(LogBuffer::new(db.open_tree("activity")?, ACTIVITY_KEPT, "activity")),
            request_log: Arc::new(LogBuffer::new(db.open_tree("requests")?, REQUESTS_KEPT, "request log")),
            failed: db.open_tree("failed")?,
            write: Arc::new(Mutex::new(Behind::default())),
        })
    }

    /// The changelog, when the store has one.
    pub fn changelog(&self) -> Option<&SharedChangelog> {
        self.changelog.as_ref()
    }

    /// Queues an entry of `sub` for the changelog when this instance owns `sub` (`entry` is
    /// only built then).
    pub(super) fn log_change(&self, sub: &str, entry: impl FnOnce() -> Entry) {
        if let Some(c) = self.changelog.as_ref().filter(|c| c.owns(sub)) {
            let e = entry();
            c.queue(sub, e.key(sub), Some(e.encode(sub)));
        }
    }

    /// Queues a tombstone for `key` of `sub` when this instance owns `sub`.
    pub(super) fn log_removal(&self, sub: &str, key: impl FnOnce() -> String) {
        if let Some(c) = self.changelog.as_ref().filter(|c| c.owns(sub)) {
            c.queue(sub, key(), None);
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Behind> {
        self.write.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The endpoint's state; the default when nothing was recorded (or it is unreadable).
    pub fn state(&self, sub: &str) -> Result<EndpointState, sled::Error> {
        let mut st = self.stored(sub)?;
        if let Some(&at) = self.lock().success_at.get(sub) {
            st.last_success_at_ms = st.last_success_at_ms.max(Some(at));
        }
        Ok(st)
    }

    pub(super) fn stored(&self, sub: &str) -> Result<EndpointState, sled::Error> {
        Ok(self.state.get(sub_key(sub))?.and_then(|v| decode(&v, "endpoint state")).unwrap_or_default())
    }

    fn update<R>(&self, sub: &str, f: impl FnOnce(&mut EndpointState) -> R) -> Result<R, sled::Error> {
        let mut w = self.lock();
        let mut st = self.stored(sub)?;
        if let Some(at) = w.success_at.remove(sub) {
            st.last_success_at_ms = st.last_success_at_ms.max(Some(at));
        }
        let r = f(&mut st);
        let bytes = encode(&st)?;
        self.state.insert(sub_key(sub), bytes.clone())?;
        self.log_change(sub, || Entry::State(bytes));
        if st.consecutive_failures == 0 {
            w.zero.insert(sub.to_owned());
        } else {
            w.zero.remove(sub);
        }
        Ok(r)
    }

    /// Writes the success times kept in memory, one batch.
    pub(super) fn flush_successes(&self) -> Result<(), sled::Error> {
        let mut w = self.lock();
        if w.success_at.is_empty() {
            return Ok(());
        }
        let mut b = Batch::default();
        let mut changed = Vec::new();
        for (sub, at) in w.success_at.drain() {
            let mut st = self.stored(&sub)?;
            st.last_success_at_ms = st.last_success_at_ms.max(Some(at));
            let bytes = encode(&st)?;
            b.insert(sub_key(&sub), bytes.clone());
            changed.push((sub, bytes));
        }
        self.state.apply_batch(b)?;
        for (sub, bytes) in changed {
            self.log_change(&sub, || Entry::State(bytes));
        }
        Ok(())
    }

    /// A request succeeded now: the failure count goes back to 0.
    pub fn record_success(&self, sub: &str) -> Result<(), sled::Error> {
        self.record_success_at(sub, chrono::Utc::now().timestamp_millis())
    }

    /// [`Self::record_success`] at a given time. The last error is kept for the owner to see.
    /// When the stored failure count is 0 already, only the time changes: it is kept in
    /// memory until [`Self::flush_logs`].
    pub fn record_success_at(&self, sub: &str, at_ms: i64) -> Result<(), sled::Error> {
        {
            let mut w = self.lock();
            if w.zero.contains(sub) {
                match w.success_at.get_mut(sub) {
                    Some(t) => *t = (*t).max(at_ms),
                    None => {
                        w.success_at.insert(sub.to_owned(), at_ms);
                    }
                }
                return Ok(());
            }
        }
        self.update(sub, |st| {
            st.consecutive_failures = 0;
            st.last_success_at_ms = Some(at_ms);
        })
    }

    /// Sets the failure count to 0 without recording a success (an operator enabled the
    /// subscription again).
    pub fn reset_failures(&self, sub: &str) -> Result<(), sled::Error> {
        self.update(sub, |st| st.consecutive_failures = 0)
    }

    /// A request failed: counts it, keeps the error (URLs redacted, at most 2 KiB) and its
    /// time. Returns the new number of failures in a row.
    pub fn record_failure(&self, sub: &str, error: &str, at_ms: i64) -> Result<u32, sled::Error> {
        self.update(sub, |st| {
            st.consecutive_failures = st.consecutive_failures.saturating_add(1);
            st.last_error = Some(clip(&redact_text(error)));
            st.last_error_at_ms = Some(at_ms);
            st.consecutive_failures
        })
    }

    /// Records a verification handshake's outcome (its error's URLs redacted).
    pub fn set_verification(&self, sub: &str, mut v: Verification) -> Result<(), sled::Error> {
        v.error = v.error.map(|e| clip(&redact_text(&e)));
        self.update(sub, |st| st.verification = Some(v))
    }

    /// The subscription was deleted: drops its state, logs and failed deliveries, here and in
    /// the changelog (tombstones for every slot).
    pub fn forget(&self, sub: &str) -> Result<(), sled::Error> {
        if self.changelog.as_ref().is_some_and(|c| c.owns(sub)) {
            for (id, _, _) in self.failed_since(sub, i64::MIN)? {
                self.log_removal(sub, || super::changelog::failed_key(sub, &id));
            }
            self.log_removal(sub, || state_key(sub));
            for seq in 0..ACTIVITY_KEPT.max(REQUESTS_KEPT) as u64 {
                if seq < ACTIVITY_KEPT as u64 {
                    self.log_removal(sub, || Entry::Activity(seq, Vec::new()).key(sub));
                }
                self.log_removal(sub, || Entry::Request(seq, Vec::new()).key(sub));
            }
        }
        self.forget_local(sub)
    }

    /// [`Self::forget`] in the local store only (a restore replaces what it held).
    pub(super) fn forget_local(&self, sub: &str) -> Result<(), sled::Error> {
        let mut w = self.lock();
        w.success_at.remove(sub);
        w.zero.remove(sub);
        self.state.remove(sub_key(sub))?;
        self.activity_log.forget(sub, || remove_prefix(self.activity_log.tree(), &sub_key(sub)))?;
        self.request_log.forget(sub, || remove_prefix(self.request_log.tree(), &sub_key(sub)))?;
        for tag in [b'f', b'i', b'n'] {
            remove_prefix(&self.failed, &tagged(tag, sub))?;
        }
        Ok(())
    }
}

fn remove_prefix(tree: &Tree, prefix: &[u8]) -> Result<(), sled::Error> {
    let mut b = Batch::default();
    for k in tree.scan_prefix(prefix).keys() {
        b.remove(k?);
    }
    tree.apply_batch(b)
}

/// `S`: the id as u32 BE length, then its bytes; no id's key is a prefix of another's.
pub(super) fn sub_key(sub: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + sub.len() + 8);
    k.extend_from_slice(&(sub.len() as u32).to_be_bytes());
    k.extend_from_slice(sub.as_bytes());
    k
}

/// A one-byte tag, then `S`.
pub(super) fn tagged(tag: u8, sub: &str) -> Vec<u8> {
    let mut k = vec![tag];
    k.extend_from_slice(&sub_key(sub));
    k
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, sled::Error> {
    serde_json::to_vec(v).map_err(|e| sled::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Decodes a stored value; an unreadable one is logged and treated as absent.
pub(super) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Option<T> {
    serde_json::from_slice(bytes).map_err(|error| tracing::error!(%error, what, "Unreadable endpoint store entry ignored.")).ok()
}

pub(super) fn clip(s: &str) -> String {
    clip_to(s, MAX_ERROR_BYTES)
}

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
pub fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::super::{Action, Activity};
    use super::*;

    fn open() -> (tempfile::TempDir, EndpointStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, EndpointStore::open(&db).unwrap())
    }

    #[test]
    fn failure_count_increments_and_resets_on_success() {
        let (_dir, s) = open();
        assert_eq!(s.state("a").unwrap(), EndpointState::default());
        for n in 1..=11 {
            assert_eq!(s.record_failure("a", &format!("HTTP 500 #{n}"), 1000 + n as i64).unwrap(), n);
        }
        let st = s.state("a").unwrap();
        assert_eq!((st.consecutive_failures, st.last_error.as_deref(), st.last_error_at_ms), (11, Some("HTTP 500 #11"), Some(1011)));
        assert_eq!(s.state("ab").unwrap().consecutive_failures, 0, "ids that are prefixes stay apart");
        s.record_success_at("a", 2000).unwrap();
        let st = s.state("a").unwrap();
        assert_eq!((st.consecutive_failures, st.last_success_at_ms), (0, Some(2000)));
        assert_eq!(st.last_error.as_deref(), Some("HTTP 500 #11"), "the last error stays visible");
        assert_eq!(s.record_failure("a", "timeout", 3000).unwrap(), 1);
        s.reset_failures("a").unwrap();
        assert_eq!((s.state("a").unwrap().consecutive_failures, s.state("a").unwrap().last_success_at_ms), (0, Some(2000)));
    }

    #[test]
    fn errors_are_redacted_and_clipped() {
        let (_dir, s) = open();
        s.record_failure("a", "error sending request for url (https://u:p@h.example/?token=t)", 1).unwrap();
        assert_eq!(
            s.state("a").unwrap().last_error.as_deref(),
            Some("error sending request for url (https://h.example/?token=[redacted])")
        );
        s.record_failure("a", &"é".repeat(5000), 2).unwrap();
        assert!(s.state("a").unwrap().last_error.unwrap().len() <= MAX_ERROR_BYTES + 3);
        let v = Verification {
            fingerprint: "f".into(),
            verified: false,
            at_ms: 5,
            error: Some("GET https://h.example/?validation_key=k failed".into()),
        };
        s.set_verification("a", v).unwrap();
        let st = s.state("a").unwrap();
        assert_eq!(st.verification.unwrap().error.as_deref(), Some("GET https://h.example/?validation_key=[redacted] failed"));
        assert_eq!(st.consecutive_failures, 2, "verification leaves the count alone");
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let v = Verification { fingerprint: super::super::fingerprint("u", "k"), verified: true, at_ms: 7, error: None };
        {
            let db = sled::open(dir.path()).unwrap();
            let s = EndpointStore::open(&db).unwrap();
            s.record_failure("a", "boom", 1).unwrap();
            s.set_verification("a", v.clone()).unwrap();
            s.push_activity("a", Activity { at_ms: 1, action: Action::Failed, delivery_id: None, attempt: Some(1), detail: None }).unwrap();
            s.push_failed("a", "d1", 1, b"{}").unwrap();
            s.flush_logs().unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let s = EndpointStore::open(&db).unwrap();
        let st = s.state("a").unwrap();
        assert_eq!((st.consecutive_failures, st.verification), (1, Some(v)));
        assert_eq!(s.activity("a").unwrap().len(), 1);
        assert_eq!(s.failed_since("a", 0).unwrap().len(), 1);
        s.push_activity("a", Activity { at_ms: 2, action: Action::Delivered, delivery_id: None, attempt: None, detail: None }).unwrap();
        assert_eq!(s.activity("a").unwrap().iter().map(|a| a.at_ms).collect::<Vec<_>>(), [2, 1], "the sequence continues");
    }

    #[test]
    fn unreadable_state_is_default() {
        let (_dir, s) = open();
        s.state.insert(sub_key("a"), &b"not json"[..]).unwrap();
        assert_eq!(s.state("a").unwrap(), EndpointState::default());
        assert_eq!(s.record_failure("a", "x", 1).unwrap(), 1);
    }

    #[test]
    fn forget_drops_only_that_subscription() {
        let (_dir, s) = open();
        for sub in ["a", "ab"] {
            s.record_failure(sub, "e", 1).unwrap();
            s.push_activity(sub, Activity { at_ms: 1, action: Action::Retried, delivery_id: None, attempt: None, detail: None }).unwrap();
            s.push_request(sub, super::super::logs::tests::request(sub, 1)).unwrap();
            s.push_failed(sub, "d", 1, b"r").unwrap();
        }
        s.forget("a").unwrap();
        assert_eq!(s.state("a").unwrap(), EndpointState::default());
        assert!(
            s.activity("a").unwrap().is_empty() && s.requests("a").unwrap().is_empty() && s.failed_since("a", i64::MIN).unwrap().is_empty()
        );
        assert_eq!(s.failed_one("a", "d").unwrap(), None);
        assert_eq!(s.state("ab").unwrap().consecutive_failures, 1);
        assert_eq!((s.activity("ab").unwrap().len(), s.requests("ab").unwrap().len()), (1, 1));
        assert_eq!(s.failed_since("ab", i64::MIN).unwrap(), [("d".to_string(), 1, b"r".to_vec())]);
        s.push_failed("a", "d2", 2, b"again").unwrap();
        assert_eq!(s.failed_since("a", 0).unwrap().len(), 1, "the count restarted too");
    }
}
