//! The bounded logs of [`EndpointStore`]: activity, requests, failed deliveries kept for
//! replay. Activity and requests go through the write-behind buffer (`buffer.rs`) and reach
//! sled in one batch per flush; a failed delivery (kept for replay) is written at once, its
//! insert and the removal of what falls beyond the bound in one batch. Trimming reads only
//! the first keys of the subscription's prefix, never the whole log.

use sled::Batch;

use super::changelog::Entry;
use super::redact::{redact_request, redact_text};
use super::state::{clip, clip_to, tagged};
use super::{Activity, EndpointStore, RequestLog};

/// Actions kept per subscription (TimelinesAI shows the 10 latest).
pub const ACTIVITY_KEPT: usize = 10;
/// Requests kept per subscription (TimelinesAI's downloadable log holds the 100 latest).
pub const REQUESTS_KEPT: usize = 100;
/// Failed deliveries kept for replay per subscription; the oldest are dropped.
pub const FAILED_KEPT: usize = 1000;

impl EndpointStore {
    /// Adds an action to the activity log (detail's URLs redacted), keeping the 10 latest.
    /// Buffered: written to sled by [`Self::flush_logs`].
    pub fn push_activity(&self, sub: &str, mut a: Activity) -> Result<(), sled::Error> {
        a.detail = a.detail.map(|d| clip(&redact_text(&d)));
        self.activity_log.push(sub, a)
    }

    /// The activity log, newest first, at most 10.
    pub fn activity(&self, sub: &str) -> Result<Vec<Activity>, sled::Error> {
        self.activity_log.newest(sub, ACTIVITY_KEPT)
    }

    /// Adds a request to the request log, redacted (headers both ways, URL, error), its
    /// request body and response excerpt cut to `delivery.log_body_max_bytes` (then marked
    /// `truncated`), keeping the 100 latest. Buffered: written to sled by [`Self::flush_logs`].
    /// Returns whether a body was cut.
    pub fn push_request(&self, sub: &str, mut r: RequestLog) -> Result<bool, sled::Error> {
        let cut = r.request_body.len() > self.body_cap || r.response_body_excerpt.len() > self.body_cap;
        if cut {
            r.request_body = clip_to(&r.request_body, self.body_cap);
            r.response_body_excerpt = clip_to(&r.response_body_excerpt, self.body_cap);
            r.truncated = true;
        }
        self.request_log.push(sub, redact_request(r))?;
        Ok(cut)
    }

    /// The request log, newest first, at most 100.
    pub fn requests(&self, sub: &str) -> Result<Vec<RequestLog>, sled::Error> {
        self.request_log.newest(sub, REQUESTS_KEPT)
    }

    /// The latest logged request of a delivery (any attempt), to replay it when its record
    /// is no longer among the failed deliveries.
    pub fn find_request_body(&self, sub: &str, delivery_id: &str) -> Result<Option<RequestLog>, sled::Error> {
        self.request_log.find(sub, |r| (r.delivery_id == delivery_id).then(|| r.clone()))
    }

    /// Writes the buffered activity and request log entries and success times to sled, one
    /// batch per tree, and queues them for the changelog (owned subscriptions). Returns the
    /// number of log entries written.
    pub fn flush_logs(&self) -> Result<usize, sled::Error> {
        let requests = self.request_log.flush(&mut |sub, seq, bytes| self.log_change(sub, || Entry::Request(seq, bytes.to_vec())))?;
        let activity = self.activity_log.flush(&mut |sub, seq, bytes| self.log_change(sub, || Entry::Activity(seq, bytes.to_vec())))?;
        let n = requests + activity;
        self.flush_successes()?;
        Ok(n)
    }

    /// Keeps the record of a delivery that failed for good, for replay. A delivery id kept
    /// already is replaced (one entry per id); beyond 1000 the oldest entries are dropped.
    pub fn push_failed(&self, sub: &str, delivery_id: &str, at_ms: i64, record: &[u8]) -> Result<(), sled::Error> {
        let _w = self.lock();
        let mut count = self.failed_count(sub)?;
        let mut b = Batch::default();
        let replaced = self.failed.get(index_key(sub, delivery_id.as_bytes()))?.map(|t| failed_key(sub, unord(&t), delivery_id.as_bytes()));
        match &replaced {
            Some(old) => b.remove(old.clone()),
            None => count += 1,
        }
        b.insert(failed_key(sub, at_ms, delivery_id.as_bytes()), record);
        b.insert(index_key(sub, delivery_id.as_bytes()), &ord(at_ms));
        let prefix = tagged(b'f', sub);
        let mut dropped = Vec::new();
        if count > FAILED_KEPT as u64 {
            for k in self.failed.scan_prefix(&prefix).keys() {
                let k = k?;
                if Some(&k[..]) == replaced.as_deref() {
                    continue;
                }
                b.remove(index_key(sub, &k[prefix.len() + 8..]));
                dropped.push(String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned());
                b.remove(k);
                count -= 1;
                if count <= FAILED_KEPT as u64 {
                    break;
                }
            }
        }
        b.insert(tagged(b'n', sub), &count.to_be_bytes());
        self.failed.apply_batch(b)?;
        self.log_change(sub, || Entry::Failed { at_ms, id: delivery_id.to_string(), record: record.to_vec() });
        for id in dropped {
            self.log_removal(sub, || super::changelog::failed_key(sub, &id));
        }
        Ok(())
    }

    /// Failed deliveries at or after `since_ms`, oldest first: (delivery id, time, record).
    pub fn failed_since(&self, sub: &str, since_ms: i64) -> Result<Vec<(String, i64, Vec<u8>)>, sled::Error> {
        let prefix = tagged(b'f', sub);
        let mut start = prefix.clone();
        start.extend_from_slice(&ord(since_ms));
        let mut out = Vec::new();
        for kv in self.failed.range(start..) {
            let (k, v) = kv?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = String::from_utf8_lossy(&k[prefix.len() + 8..]).into_owned();
            out.push((id, unord(&k[prefix.len()..]), v.to_vec()));
        }
        Ok(out)
    }

    /// One failed delivery by id: (time kept, record). It stays kept until
    /// [`Self::remove_failed`]: a replay removes it only once the broker has its replay record.
    pub fn failed_one(&self, sub: &str, delivery_id: &str) -> Result<Option<(i64, Vec<u8>)>, sled::Error> {
        let Some(t) = self.failed.get(index_key(sub, delivery_id.as_bytes()))? else { return Ok(None) };
        let at = unord(&t);
        Ok(self.failed.get(failed_key(sub, at, delivery_id.as_bytes()))?.map(|r| (at, r.to_vec())))
    }

    /// Removes a failed delivery whose replay was acknowledged, if it is still the copy that
    /// was replayed (kept at `at_ms`, with these bytes): a delivery that failed again meanwhile
    /// replaced it with a newer copy, which stays. Returns whether it was removed.
    pub fn remove_failed(&self, sub: &str, delivery_id: &str, at_ms: i64, record: &[u8]) -> Result<bool, sled::Error> {
        let _w = self.lock();
        let index = index_key(sub, delivery_id.as_bytes());
        let key = failed_key(sub, at_ms, delivery_id.as_bytes());
        let same = self.failed.get(&index)?.is_some_and(|t| unord(&t) == at_ms) && self.failed.get(&key)?.is_some_and(|r| *r == *record);
        if !same {
            return Ok(false);
        }
        let count = self.failed_count(sub)?.saturating_sub(1);
        let mut b = Batch::default();
        b.remove(index);
        b.remove(key);
        match count {
            0 => b.remove(tagged(b'n', sub)),
            n => b.insert(tagged(b'n', sub), &n.to_be_bytes()),
        }
        self.failed.apply_batch(b)?;
        self.log_removal(sub, || super::changelog::failed_key(sub, delivery_id));
        Ok(true)
    }

    fn failed_count(&self, sub: &str) -> Result<u64, sled::Error> {
        Ok(self.failed.get(tagged(b'n', sub))?.map_or(0, |v| be_u64(&v)))
    }
}

pub(super) fn failed_key(sub: &str, at_ms: i64, delivery_id: &[u8]) -> Vec<u8> {
    let mut k = tagged(b'f', sub);
    k.extend_from_slice(&ord(at_ms));
    k.extend_from_slice(delivery_id);
    k
}

pub(super) fn index_key(sub: &str, delivery_id: &[u8]) -> Vec<u8> {
    let mut k = tagged(b'i', sub);
    k.extend_from_slice(delivery_id);
    k
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Big-endian with the sign bit flipped: keys sort as the numbers do.
pub(super) fn ord(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unord(b: &[u8]) -> i64 {
    (be_u64(b) ^ (1 << 63)) as i64
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::state::sub_key;
    use super::super::Action;
    use super::*;

    fn open() -> (tempfile::TempDir, EndpointStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, EndpointStore::open(&db).unwrap())
    }

    fn act(at_ms: i64) -> Activity {
        Activity { at_ms, action: Action::Delivered, delivery_id: Some(format!("msg_{at_ms}")), attempt: Some(1), detail: None }
    }

    pub(in crate::endpoint) fn request(delivery_id: &str, at_ms: i64) -> RequestLog {
        RequestLog {
            at_ms,
            delivery_id: delivery_id.into(),
            attempt: 1,
            method: "POST".into(),
            url: "https://u:p@h.example/hook?token=t&x=1".into(),
            request_headers: [("Authorization", "Bearer z"), ("X-Api-Key", "sekrit"), ("webhook-signature", "v1,sig")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .to_vec(),
            request_body: format!(r#"{{"n":{at_ms}}}"#),
            status: Some(500),
            response_headers: vec![("set-cookie".into(), "sid=1".into())],
            response_body_excerpt: "err".into(),
            truncated: false,
            duration_ms: 5,
            error: None,
        }
    }

    #[test]
    fn activity_keeps_the_ten_latest_newest_first() {
        let (_dir, s) = open();
        for t in 1..=10 {
            s.push_activity("a", act(t)).unwrap();
        }
        assert_eq!(s.activity("a").unwrap().iter().map(|a| a.at_ms).collect::<Vec<_>>(), (1..=10).rev().collect::<Vec<_>>());
        s.push_activity("a", act(11)).unwrap();
        let times: Vec<i64> = s.activity("a").unwrap().iter().map(|a| a.at_ms).collect();
        assert_eq!(times, (2..=11).rev().collect::<Vec<_>>(), "the 11th drops the oldest");
        s.flush_logs().unwrap();
        assert_eq!(s.activity_log.tree().scan_prefix(sub_key("a")).count(), 10, "trimmed in the store, not just on read");
        s.push_activity("a", Activity { detail: Some("GET https://h.example/?token=t".into()), ..act(12) }).unwrap();
        assert_eq!(s.activity("a").unwrap()[0].detail.as_deref(), Some("GET https://h.example/?token=[redacted]"));
    }

    #[test]
    fn requests_keep_the_hundred_latest_redacted() {
        let (_dir, s) = open();
        for t in 0..101 {
            s.push_request("a", request(&format!("msg_{t}"), t)).unwrap();
        }
        let all = s.requests("a").unwrap();
        assert_eq!(all.len(), 100);
        assert_eq!((all[0].at_ms, all[99].at_ms), (100, 1), "newest first; the 101st dropped the oldest");
        s.flush_logs().unwrap();
        assert_eq!(s.request_log.tree().scan_prefix(sub_key("a")).count(), 100);
        assert_eq!(s.requests("a").unwrap(), all, "the same read from sled");
        let r = &all[0];
        assert_eq!(r.url, "https://h.example/hook?token=[redacted]&x=1");
        let values: Vec<&str> = r.request_headers.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(values, ["[redacted]", "[redacted]", "v1,sig"]);
        assert_eq!(r.response_headers[0].1, "[redacted]");
        assert_eq!(r.request_body, r#"{"n":100}"#, "bodies kept as sent");
    }

    #[test]
    fn bodies_over_the_cap_are_cut_and_marked_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let s = EndpointStore::open_with(&db, 8, None).unwrap();
        assert!(!s.push_request("a", RequestLog { request_body: "12345678".into(), ..request("short", 1) }).unwrap(), "at the cap: kept");
        let long = RequestLog { request_body: "ééééé-and-more".into(), response_body_excerpt: "x".repeat(9), ..request("long", 2) };
        assert!(s.push_request("a", long).unwrap());
        s.flush_logs().unwrap();
        let logged = s.requests("a").unwrap();
        assert_eq!((logged[0].request_body.as_str(), logged[0].response_body_excerpt.as_str()), ("éééé…", "xxxxxxxx…"));
        assert!(logged[0].truncated && !logged[1].truncated);
        assert_eq!(logged[1].request_body, "12345678");
        let json = serde_json::to_value(&logged[0]).unwrap();
        assert_eq!(json["truncated"], true, "shown in the admin API's JSON");
        let old: RequestLog = serde_json::from_value(serde_json::json!({"at_ms": 1, "delivery_id": "d", "attempt": 1, "method": "POST",
            "url": "u", "request_headers": [], "request_body": "", "status": null, "response_headers": [],
            "response_body_excerpt": "", "duration_ms": 0, "error": null}))
        .unwrap();
        assert!(!old.truncated, "entries stored before the cap read as not truncated");
    }

    #[test]
    fn find_request_body_returns_the_latest_attempt() {
        let (_dir, s) = open();
        s.push_request("a", request("d1", 1)).unwrap();
        s.push_request("a", RequestLog { attempt: 2, ..request("d1", 2) }).unwrap();
        s.push_request("a", request("d2", 3)).unwrap();
        s.push_request("ab", RequestLog { attempt: 9, ..request("d1", 4) }).unwrap();
        assert_eq!(s.find_request_body("a", "d1").unwrap().map(|r| (r.attempt, r.at_ms)), Some((2, 2)));
        assert_eq!(s.find_request_body("a", "nope").unwrap(), None);
        assert_eq!(s.find_request_body("abc", "d1").unwrap(), None);
    }

    #[test]
    fn prefix_ids_do_not_see_each_other() {
        let (_dir, s) = open();
        s.push_activity("a", act(1)).unwrap();
        for t in 0..12 {
            s.push_activity("ab", act(100 + t)).unwrap();
        }
        s.push_activity("a", act(2)).unwrap();
        s.push_request("ab", request("x", 1)).unwrap();
        s.push_failed("ab", "x", 1, b"ab").unwrap();
        assert_eq!(s.activity("a").unwrap().iter().map(|a| a.at_ms).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(s.activity("ab").unwrap().len(), 10);
        assert!(s.requests("a").unwrap().is_empty() && s.failed_since("a", i64::MIN).unwrap().is_empty());
        assert!(s.activity("").unwrap().is_empty() && s.activity("b").unwrap().is_empty());
        assert_eq!(s.failed_one("a", "x").unwrap(), None);
        assert_eq!(s.failed_one("ab", "x").unwrap(), Some((1, b"ab".to_vec())));
    }

    #[test]
    fn failed_bound_since_and_remove() {
        let (_dir, s) = open();
        for t in 0..1003i64 {
            s.push_failed("a", &format!("d{t}"), 1_000 + t, t.to_string().as_bytes()).unwrap();
        }
        let all = s.failed_since("a", i64::MIN).unwrap();
        assert_eq!(all.len(), 1000);
        assert_eq!((all[0].0.as_str(), all[0].1, all[0].2.as_slice()), ("d3", 1_003, &b"3"[..]), "the three oldest dropped");
        assert_eq!(s.failed_one("a", "d0").unwrap(), None, "dropped from the index too");
        let since: Vec<String> = s.failed_since("a", 1_000 + 1000).unwrap().into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(since, ["d1000", "d1001", "d1002"], "at or after, oldest first");
        assert_eq!(s.failed_one("a", "d1001").unwrap(), Some((2_001, b"1001".to_vec())), "looked at, still kept");
        assert_eq!(s.failed_since("a", 2_000).unwrap().len(), 3);
        assert!(s.remove_failed("a", "d1001", 2_001, b"1001").unwrap());
        assert!(!s.remove_failed("a", "d1001", 2_001, b"1001").unwrap(), "removed once");
        assert_eq!(s.failed_since("a", 2_000).unwrap().len(), 2);
        s.push_failed("a", "late", 5, b"old time").unwrap();
        assert_eq!(s.failed_since("a", i64::MIN).unwrap().len(), 1000, "999 after the removal, one more, no drop");
        s.push_failed("a", "again", 3_000, b"x").unwrap();
        let all = s.failed_since("a", i64::MIN).unwrap();
        assert_eq!((all.len(), all[0].0.as_str(), all[1].0.as_str()), (1000, "d3", "d4"), "the oldest by time dropped: `late`");
    }

    #[test]
    fn failed_same_delivery_is_replaced() {
        let (_dir, s) = open();
        s.push_failed("a", "d", 10, b"first").unwrap();
        s.push_failed("a", "e", 15, b"other").unwrap();
        s.push_failed("a", "d", 20, b"second").unwrap();
        let all = s.failed_since("a", 0).unwrap();
        assert_eq!(all, [("e".to_string(), 15, b"other".to_vec()), ("d".to_string(), 20, b"second".to_vec())]);
        s.push_failed("a", "d", 20, b"third").unwrap();
        assert_eq!(s.failed_since("a", 20).unwrap(), [("d".to_string(), 20, b"third".to_vec())]);
        assert!(!s.remove_failed("a", "d", 20, b"second").unwrap(), "replaced since: the newer copy stays");
        assert!(!s.remove_failed("a", "d", 10, b"first").unwrap());
        assert_eq!(s.failed_one("a", "d").unwrap(), Some((20, b"third".to_vec())));
        assert!(s.remove_failed("a", "d", 20, b"third").unwrap());
        assert!(s.remove_failed("a", "e", 15, b"other").unwrap());
        assert_eq!(s.failed.len(), 0, "index and count gone with the last entry");
    }
}
