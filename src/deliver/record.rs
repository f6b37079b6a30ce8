//! The delivery record carried by `hookd.deliveries` and `hookd.retry` (DESIGN section 3).
//!
//! Self-contained: the body is rendered once, when the event is routed, and every retry
//! sends the same bytes (only the signature, which covers the send time, is recomputed).
//! The id is derived from the subscription and the source event, so an event processed
//! twice after a crash yields the same `webhook-id` and receivers can drop the duplicate.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kafka::SourceRef;

/// `last_error` is cut to this many bytes, so a delivery record's envelope has a bound
/// (`kafka::limits::DELIVERY_ENVELOPE_BYTES`).
pub const MAX_LAST_ERROR_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRecord {
    /// `webhook-id`: stable across replays and retries of the same event and subscription.
    pub id: String,
    pub subscription_id: String,
    pub tenant: String,
    /// Wire event name (dialect's), for logs and headers.
    pub event_name: String,
    /// Number of the send this record asks for, 1 for the first.
    pub attempt: u32,
    /// Not to be sent before this time (epoch ms).
    pub not_before_ms: i64,
    /// When the delivery was created (epoch ms); latency is measured from it.
    pub created_ms: i64,
    pub content_type: String,
    /// The rendered body, base64 in the JSON encoding.
    #[serde(with = "b64")]
    pub body: Vec<u8>,
    /// Dialect headers fixed at render time (e.g. `Tc-Webhook-Event`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Error of the previous attempt, for the dead-letter reason and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The input record this delivery came from.
    pub source: SourceRef,
}

/// The stable `webhook-id` of (subscription, source item).
pub fn webhook_id(subscription_id: &str, item_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(subscription_id.as_bytes());
    h.update([0]);
    h.update(item_id.as_bytes());
    format!("msg_{}", &hex::encode(h.finalize())[..32])
}

impl DeliveryRecord {
    /// A small record for tests: subscription `sub`, due at `due`, id `msg_<due>`.
    #[cfg(test)]
    pub(crate) fn sample(sub: &str, due: i64) -> Self {
        Self {
            id: format!("msg_{due}"),
            subscription_id: sub.into(),
            tenant: "t".into(),
            event_name: "e".into(),
            attempt: 2,
            not_before_ms: due,
            created_ms: 0,
            content_type: "application/json".into(),
            body: b"{}".to_vec(),
            headers: vec![],
            last_error: None,
            source: crate::kafka::SourceRef { topic: "crm.events".into(), partition: 0, offset: 0 },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("delivery record serialises")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("invalid delivery record: {e}"))
    }

    /// The record for the next send after a failure.
    pub fn next_attempt(&self, not_before_ms: i64, error: String) -> Self {
        Self { attempt: self.attempt + 1, not_before_ms, ..self.with_error(error) }
    }

    /// This record with `error` (cut to [`MAX_LAST_ERROR_BYTES`]) as its `last_error`.
    pub fn with_error(&self, mut error: String) -> Self {
        error.truncate(crate::kafka::dlq::prefix(&error, MAX_LAST_ERROR_BYTES).len());
        Self { last_error: Some(error), ..self.clone() }
    }
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(webhook_id("sub_1", "evt_1"), webhook_id("sub_1", "evt_1"));
        assert_ne!(webhook_id("sub_1", "evt_1"), webhook_id("sub_2", "evt_1"));
        assert_ne!(webhook_id("sub_1", "evt_1"), webhook_id("sub_1e", "vt_1"));
        assert!(webhook_id("a", "b").starts_with("msg_"));
    }

    #[test]
    fn round_trips_bytes_exactly() {
        let r = DeliveryRecord {
            id: "msg_x".into(),
            subscription_id: "s".into(),
            tenant: "t".into(),
            event_name: "order.add".into(),
            attempt: 1,
            not_before_ms: 0,
            created_ms: 5,
            content_type: "application/xml".into(),
            body: vec![0, 159, 146, 150, b'<'],
            headers: vec![("Tc-Webhook-Event".into(), "order.add".into())],
            last_error: None,
            source: SourceRef { topic: "crm.events".into(), partition: 2, offset: 9 },
        };
        assert_eq!(DeliveryRecord::decode(&r.encode()).unwrap(), r);
        let next = r.next_attempt(99, "status 500".into());
        assert_eq!((next.attempt, next.not_before_ms, next.id.as_str()), (2, 99, "msg_x"));
        let long = r.next_attempt(1, "ü".repeat(MAX_LAST_ERROR_BYTES)).last_error.unwrap();
        assert_eq!(long.len(), MAX_LAST_ERROR_BYTES, "cut on a character boundary, bounded");
        assert!(DeliveryRecord::decode(b"{}").unwrap_err().contains("invalid delivery record"));
    }
}
