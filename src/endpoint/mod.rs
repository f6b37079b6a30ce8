//! Endpoint state: what hookd remembers about each subscription's endpoint, in sled, so it
//! survives restarts (DESIGN section 5, endpoint lifecycle).
//!
//! Per subscription:
//! - the consecutive failure count, last error and last success, and the verification
//!   handshake's outcome ([`EndpointState`], tree `endpoint_state`); more than N failures in
//!   a row disables the subscription (TimelinesAI: more than 10);
//! - the activity log: the 10 latest actions ([`Activity`], tree `activity`);
//! - the request log: the 100 latest requests in full detail, secrets redacted before they
//!   are stored ([`RequestLog`], tree `requests`, see [`redact`]);
//! - failed deliveries kept for replay: the last 1000 delivery records that ran out of
//!   attempts (tree `failed`).
//!
//! Who owns it: the sender instance that owns the subscription's partition of
//! `hookd.deliveries` / `hookd.retry` (both are keyed by subscription id, so one instance
//! sends all of a subscription's requests). Sled is its local copy; the compacted changelog
//! topic `topics.endpoint_state` is the truth: the owner's changes are written to it with the
//! log flush ([`changelog`]), and an instance a partition moves to restores the partition's
//! subscriptions from it before it sends for them ([`restore`]). The subscription's enabled
//! flag and disabled reason live in `hookd.subscriptions`.
//!
//! Key layout: see [`EndpointStore`]. Every subscription id in a key is length-prefixed
//! (u32 BE length, then UTF-8), so no id's keys can be the prefix of another's (`a`, `ab`).
//! Writes are serialised by a lock shared by all clones; open the store once per database
//! and clone it.

mod buffer;
pub mod changelog;
mod logs;
pub mod redact;
pub mod restore;
mod state;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use changelog::{partition_for, Changelog};
pub use logs::{ACTIVITY_KEPT, FAILED_KEPT, REQUESTS_KEPT};
pub use redact::{redact_headers, redact_text, redact_url};
pub use restore::{OwnerHooks, RestoreError, Restored};
pub use state::{clip_to, EndpointStore, DEFAULT_BODY_CAP};

/// What hookd knows about a subscription's endpoint; the default when nothing was recorded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointState {
    /// Failed requests since the last success (or enable); above the subscription's
    /// `disable_after_failures` it is disabled.
    pub consecutive_failures: u32,
    /// The latest failure, kept after a success so the owner can still see what went wrong.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    pub last_success_at_ms: Option<i64>,
    /// Outcome of the latest verification handshake, for subscriptions that ask for one.
    pub verification: Option<Verification>,
}

/// Outcome of a verification handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verification {
    /// [`fingerprint`] of the (url, validation key) verified: when either changes, the
    /// subscription is verified again.
    pub fingerprint: String,
    pub verified: bool,
    pub at_ms: i64,
    /// Why it failed (URLs in it redacted).
    pub error: Option<String>,
}

/// One entry of the activity log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    pub at_ms: i64,
    pub action: Action,
    /// The delivery (its `webhook-id`) the action is about, if any.
    pub delivery_id: Option<String>,
    pub attempt: Option<u32>,
    /// Error or reason, URLs in it redacted.
    pub detail: Option<String>,
}

/// What happened, as shown in the activity log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Delivered,
    Failed,
    Retried,
    Disabled,
    Enabled,
    Verified,
    VerificationFailed,
    Replayed,
}

/// One request in full detail, as stored in the request log (redacted by
/// [`EndpointStore::push_request`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLog {
    pub at_ms: i64,
    pub delivery_id: String,
    pub attempt: u32,
    pub method: String,
    pub url: String,
    pub request_headers: Vec<(String, String)>,
    /// Lossy UTF-8; bodies are JSON or XML. Stored as sent: the payload is what the owner
    /// needs to debug and replay, and it is theirs.
    pub request_body: String,
    /// HTTP status, if the response headers arrived.
    pub status: Option<u16>,
    pub response_headers: Vec<(String, String)>,
    pub response_body_excerpt: String,
    pub duration_ms: u64,
    /// Transport error (timeout, connection refused, ...), URLs in it redacted.
    pub error: Option<String>,
    /// The request body or the response excerpt was longer than `delivery.log_body_max_bytes`
    /// and is cut to it (entries stored before the cap existed read as `false`).
    #[serde(default)]
    pub truncated: bool,
}

/// Short hex SHA-256 of (url, validation key): tells whether a verified endpoint changed.
/// Both parts are length-prefixed, so no two pairs share an input.
pub fn fingerprint(url: &str, validation_key: &str) -> String {
    let mut h = Sha256::new();
    h.update((url.len() as u64).to_be_bytes());
    h.update(url.as_bytes());
    h.update((validation_key.len() as u64).to_be_bytes());
    h.update(validation_key.as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// RFC 3339 UTC time of a millisecond timestamp (empty if out of range).
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)).unwrap_or_default()
}

/// One pretty JSON document for download: the subscription's state, activity and requests,
/// each `*_ms` time with an RFC 3339 twin next to it (`at_ms` → `at`, `last_error_at_ms` →
/// `last_error_at`). Headers and URLs are redacted again (a no-op for stored entries), and
/// the verification fingerprint is left out (a short hash of the validation key).
pub fn export_json(sub: &str, state: &EndpointState, activity: &[Activity], requests: &[RequestLog]) -> Vec<u8> {
    let mut state = with_times(to_value(state));
    if let Some(v) = state.get_mut("verification").and_then(Value::as_object_mut) {
        v.remove("fingerprint");
    }
    let requests: Vec<RequestLog> = requests.iter().cloned().map(redact::redact_request).collect();
    let mut doc = Map::new();
    doc.insert("subscription".into(), sub.into());
    doc.insert("exported_at".into(), rfc3339(chrono::Utc::now().timestamp_millis()).into());
    doc.insert("state".into(), state);
    doc.insert("activity".into(), activity.iter().map(|a| with_times(to_value(a))).collect());
    doc.insert("requests".into(), requests.iter().map(|r| with_times(to_value(r))).collect());
    serde_json::to_vec_pretty(&Value::Object(doc)).unwrap_or_default()
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or_default()
}

/// Puts `name` (RFC 3339) before every `name_ms` field of an object, recursively.
fn with_times(v: Value) -> Value {
    match v {
        Value::Object(fields) => {
            let mut out = Map::with_capacity(fields.len() + 2);
            for (k, v) in fields {
                if let Some(base) = k.strip_suffix("_ms").filter(|b| b.ends_with("at")) {
                    out.insert(base.to_string(), v.as_i64().map(|ms| rfc3339(ms).into()).unwrap_or(Value::Null));
                }
                out.insert(k, with_times(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => items.into_iter().map(with_times).collect(),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_short_stable_and_changes_with_either_part() {
        let a = fingerprint("https://x.example/hook", "k1");
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, fingerprint("https://x.example/hook", "k1"));
        assert_ne!(a, fingerprint("https://x.example/hook", "k2"));
        assert_ne!(a, fingerprint("https://x.example/hook2", "k1"));
        assert_ne!(fingerprint("ab", "c"), fingerprint("a", "bc"), "length-prefixed parts");
    }

    #[test]
    fn export_json_shape() {
        let state = EndpointState {
            consecutive_failures: 2,
            last_error: Some("HTTP 500".into()),
            last_error_at_ms: Some(1_614_183_929_000),
            last_success_at_ms: None,
            verification: Some(Verification { fingerprint: "abcd".into(), verified: true, at_ms: 0, error: None }),
        };
        let activity =
            [Activity { at_ms: 1_614_183_929_000, action: Action::VerificationFailed, delivery_id: None, attempt: None, detail: None }];
        let request = RequestLog {
            at_ms: 1_614_183_929_123,
            delivery_id: "msg_1".into(),
            attempt: 3,
            method: "POST".into(),
            url: "https://u:p@x.example/hook?token=t".into(),
            request_headers: vec![("Authorization".into(), "Bearer zzz".into())],
            request_body: r#"{"text":"Xin chào"}"#.into(),
            status: Some(500),
            response_headers: vec![],
            response_body_excerpt: "oops".into(),
            truncated: false,
            duration_ms: 12,
            error: None,
        };
        let bytes = export_json("sub_1", &state, &activity, &[request]);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains("\n  \"subscription\""), "pretty: {text}");
        assert!(!text.contains("zzz") && !text.contains("u:p@") && !text.contains("abcd"), "{text}");
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["subscription", "exported_at", "state", "activity", "requests"]);
        assert_eq!(v["subscription"], "sub_1");
        assert!(chrono::DateTime::parse_from_rfc3339(v["exported_at"].as_str().unwrap()).is_ok());
        assert_eq!(v["state"]["consecutive_failures"], 2);
        assert_eq!(v["state"]["last_error_at"], "2021-02-24T16:25:29.000Z");
        assert_eq!(v["state"]["last_error_at_ms"], 1_614_183_929_000i64);
        assert_eq!(v["state"]["verification"]["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["activity"][0]["action"], "verification_failed");
        assert_eq!(v["activity"][0]["at"], "2021-02-24T16:25:29.000Z");
        let r = &v["requests"][0];
        let keys: Vec<&str> = r.as_object().unwrap().keys().take(2).map(String::as_str).collect();
        assert_eq!(keys, ["at", "at_ms"], "the readable time first");
        assert_eq!((r["at"].as_str(), r["status"].as_u64(), r["attempt"].as_u64()), (Some("2021-02-24T16:25:29.123Z"), Some(500), Some(3)));
        assert_eq!(r["request_body"], r#"{"text":"Xin chào"}"#);
        assert_eq!(r["url"], "https://x.example/hook?token=[redacted]");
        let empty: Value = serde_json::from_slice(&export_json("s", &EndpointState::default(), &[], &[])).unwrap();
        assert_eq!((empty["activity"].as_array().unwrap().len(), empty["state"]["last_success_at_ms"].is_null()), (0, true));
        assert!(empty["state"]["last_success_at"].is_null() && empty["state"].get("last_success_at").is_some());
    }
}
