//! The `chat.messages` record: decoding and validation (DESIGN section 3).
//!
//! One WhatsApp message sent or received in a chat, as the chat product publishes it. A record
//! is accepted only with `id`, `tenant`, `direction` (`sent` or `received`), `timestamp`,
//! `account` and `chat` objects (the chat with a non-empty `id`), `sender` and `recipient`
//! objects, and a `text` string (possibly empty: a message may be only an attachment).
//! `attachments` (an array, default empty) and `permalink` are optional; other keys are
//! ignored. Errors reuse [`InputError`] and name the field (`chat.id` for the nested one).
//!
//! Messages with attachments decode fine: skipping them for delivery, as TimelinesAI does,
//! is the router's decision, not a decoding error ([`ChatMessage::has_attachments`]).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::event::{decode_object, parse_time, take_id, take_string, InputError};

/// One chat message, as published on `chat.messages` (key: chat id).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// Producer's message id; `message_id` on the wire, and with the subscription id the
    /// stable `webhook-id` of a pass-through delivery.
    pub id: String,
    /// Workspace the message belongs to; subscriptions match on it.
    pub tenant: String,
    /// `"sent"` or `"received"`, validated, because TimelinesAI receivers switch on it.
    pub direction: String,
    /// When the message was sent; picks the aggregation window (DESIGN section 2).
    pub timestamp: DateTime<Utc>,
    /// The WhatsApp account (and teammate) it went through: `full_name`, `email`, `phone`.
    /// Kept as sent so that the body builder, not the decoder, decides the wire shape.
    pub account: Map<String, Value>,
    /// The chat: `id`, `full_name`, `responsible_name`, `responsible_email`, `url`,
    /// `is_new_chat`, `is_group`, `phone`. Always holds a non-empty `id`.
    pub chat: Map<String, Value>,
    /// `chat.id` as a string (numbers are accepted and converted): bundles are per chat.
    pub chat_id: String,
    /// Who sent it (`full_name`, `phone`); a JSON object.
    pub sender: Value,
    /// Who received it (`full_name`, `phone`); a JSON object.
    pub recipient: Value,
    /// Plain text of the message, any Unicode; empty for attachment-only messages.
    pub text: String,
    /// Attachments as sent; a message with any is skipped for delivery.
    pub attachments: Vec<Value>,
    /// Link to the message in the chat product; the bundle summary links to its first one.
    pub permalink: Option<String>,
}

impl ChatMessage {
    /// Decodes and validates one record value of at most `max_bytes`.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, InputError> {
        Self::from_value(decode_object(bytes, max_bytes)?)
    }

    /// Validates an already parsed JSON object.
    pub fn from_value(value: Map<String, Value>) -> Result<Self, InputError> {
        let mut v = value;
        let id = take_id(&mut v, "id")?;
        let tenant = take_id(&mut v, "tenant")?;
        let direction = take_direction(&mut v)?;
        let timestamp = parse_time(v.get("timestamp"), "timestamp")?;
        let account = take_object(&mut v, "account")?;
        let chat = take_object(&mut v, "chat")?;
        Ok(Self {
            id,
            tenant,
            direction,
            timestamp,
            account,
            chat_id: chat_id(&chat)?,
            chat,
            sender: Value::Object(take_object(&mut v, "sender")?),
            recipient: Value::Object(take_object(&mut v, "recipient")?),
            text: match v.remove("text") {
                Some(Value::String(s)) => s,
                Some(Value::Null) | None => return Err(InputError::Missing("text")),
                Some(_) => return Err(InputError::WrongType { field: "text", expected: "a string" }),
            },
            attachments: match v.remove("attachments") {
                Some(Value::Array(a)) => a,
                Some(Value::Null) | None => Vec::new(),
                Some(_) => return Err(InputError::WrongType { field: "attachments", expected: "an array" }),
            },
            permalink: match v.remove("permalink") {
                Some(Value::String(s)) if !s.is_empty() => Some(s),
                Some(Value::String(_) | Value::Null) | None => None,
                Some(_) => return Err(InputError::WrongType { field: "permalink", expected: "a string" }),
            },
        })
    }

    /// Whether the message carries attachments (TimelinesAI skips those).
    pub fn has_attachments(&self) -> bool {
        !self.attachments.is_empty()
    }

    /// The message time in epoch milliseconds, for window arithmetic.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp.timestamp_millis()
    }
}

/// A required JSON object.
fn take_object(v: &mut Map<String, Value>, field: &'static str) -> Result<Map<String, Value>, InputError> {
    match v.remove(field) {
        Some(Value::Object(m)) => Ok(m),
        Some(Value::Null) | None => Err(InputError::Missing(field)),
        Some(_) => Err(InputError::WrongType { field, expected: "an object" }),
    }
}

fn take_direction(v: &mut Map<String, Value>) -> Result<String, InputError> {
    let direction = take_string(v, "direction")?;
    match direction.as_str() {
        "sent" | "received" => Ok(direction),
        _ => Err(InputError::WrongType { field: "direction", expected: r#""sent" or "received""# }),
    }
}

/// `chat.id` with the rules of [`take_id`], its errors naming `chat.id`; the chat keeps its id.
fn chat_id(chat: &Map<String, Value>) -> Result<String, InputError> {
    let mut only_id: Map<String, Value> = chat.get("id").map(|id| ("id".to_string(), id.clone())).into_iter().collect();
    take_id(&mut only_id, "id").map_err(|e| match e {
        InputError::Missing(_) => InputError::Missing("chat.id"),
        InputError::WrongType { expected, .. } => InputError::WrongType { field: "chat.id", expected },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The `chat.messages` sample of DESIGN section 3.
    const SAMPLE: &str = r#"{"id": "ddfskhsd76dsfs6dsd5skjsdhf", "tenant": "ws-10010", "direction": "sent",
 "timestamp": "2021-02-24T16:25:29+0000",
 "account": {"full_name": "Amnon Haha", "email": "amnon@example.com", "phone": "+972500000000"},
 "chat": {"id": "10010001", "full_name": "John Doe", "responsible_name": "Amnon",
          "responsible_email": "amnon@example.com", "url": "https://app.example.com/chat/10010001/messages/",
          "is_new_chat": true, "is_group": false, "phone": "+97254000000"},
 "sender": {"full_name": "John Doe", "phone": "+972540000000"},
 "recipient": {"full_name": "Jane Smith", "phone": "+972550000000"},
 "text": "lorem ipsum", "attachments": [], "permalink": "https://app.example.com/permalink/77a28d55"}"#;

    fn sample() -> Map<String, Value> {
        serde_json::from_str(SAMPLE).unwrap()
    }

    /// The sample with `edit` applied, decoded.
    fn decode_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ChatMessage, InputError> {
        let mut v = sample();
        edit(&mut v);
        ChatMessage::decode(&serde_json::to_vec(&v).unwrap(), 1 << 20)
    }

    #[test]
    fn decodes_design_sample() {
        let m = ChatMessage::decode(SAMPLE.as_bytes(), 1 << 20).unwrap();
        assert_eq!((m.id.as_str(), m.tenant.as_str()), ("ddfskhsd76dsfs6dsd5skjsdhf", "ws-10010"));
        assert_eq!(m.direction, "sent");
        assert_eq!(m.timestamp.to_rfc3339(), "2021-02-24T16:25:29+00:00", "the +0000 form parses");
        assert_eq!(m.timestamp_ms(), 1_614_183_929_000);
        assert_eq!(m.account["email"], "amnon@example.com");
        assert_eq!((m.chat_id.as_str(), &m.chat["id"]), ("10010001", &json!("10010001")), "chat keeps its id");
        assert_eq!(m.chat["url"], "https://app.example.com/chat/10010001/messages/");
        assert_eq!(m.sender, json!({"full_name": "John Doe", "phone": "+972540000000"}));
        assert_eq!(m.recipient["full_name"], "Jane Smith");
        assert_eq!(m.text, "lorem ipsum");
        assert!(!m.has_attachments());
        assert_eq!(m.permalink.as_deref(), Some("https://app.example.com/permalink/77a28d55"));
    }

    #[test]
    fn optional_fields_default_and_numbers_become_ids() {
        let m = decode_with(|v| {
            for k in ["attachments", "permalink"] {
                v.remove(k);
            }
            v["chat"]["id"] = json!(10010001);
            v["tenant"] = json!(10010);
            v["timestamp"] = json!(1_614_183_929_123_i64);
            v["direction"] = json!("received");
            v["text"] = json!("");
        })
        .unwrap();
        assert!(m.attachments.is_empty() && m.permalink.is_none());
        assert_eq!((m.chat_id.as_str(), m.tenant.as_str()), ("10010001", "10010"));
        assert_eq!(m.timestamp_ms(), 1_614_183_929_123);
        assert_eq!((m.direction.as_str(), m.text.as_str()), ("received", ""), "empty text is allowed");
        let m = decode_with(|v| v["attachments"] = json!([{"type": "image", "url": "https://x/y.png"}])).unwrap();
        assert!(m.has_attachments());
    }

    #[test]
    fn unicode_text_survives() {
        let text = "Chào bạn! Bạn có khỏe không? 👋🏽 שלום — 你好 \u{200d}👩‍👩‍👧 \"quoted\" <b>";
        let m = decode_with(|v| {
            v["text"] = json!(text);
            v["sender"]["full_name"] = json!("Trần Thị Ánh 🌸");
        })
        .unwrap();
        assert_eq!(m.text, text);
        assert_eq!(m.sender["full_name"], "Trần Thị Ánh 🌸");
    }

    #[test]
    fn refuses_bad_input_with_named_field() {
        let wrong = |field, expected| InputError::WrongType { field, expected };
        type Edit = fn(&mut Map<String, Value>);
        let cases: Vec<(Edit, InputError)> = vec![
            (|v| drop(v.remove("id")), InputError::Missing("id")),
            (|v| drop(v.remove("tenant")), InputError::Missing("tenant")),
            (|v| drop(v.remove("direction")), InputError::Missing("direction")),
            (|v| v["direction"] = json!("forwarded"), wrong("direction", r#""sent" or "received""#)),
            (|v| drop(v.remove("timestamp")), InputError::Missing("timestamp")),
            (|v| v["timestamp"] = json!("24/02/2021"), wrong("timestamp", "epoch milliseconds or an RFC 3339 time")),
            (|v| drop(v.remove("account")), InputError::Missing("account")),
            (|v| v["account"] = json!("Amnon"), wrong("account", "an object")),
            (|v| drop(v.remove("chat")), InputError::Missing("chat")),
            (|v| v["chat"] = json!([]), wrong("chat", "an object")),
            (|v| drop(v["chat"].as_object_mut().unwrap().remove("id")), InputError::Missing("chat.id")),
            (|v| v["chat"]["id"] = json!(""), wrong("chat.id", "a non-empty string")),
            (|v| v["chat"]["id"] = json!(true), wrong("chat.id", "a string")),
            (|v| drop(v.remove("sender")), InputError::Missing("sender")),
            (|v| v["recipient"] = json!("Jane"), wrong("recipient", "an object")),
            (|v| drop(v.remove("text")), InputError::Missing("text")),
            (|v| v["text"] = json!(42), wrong("text", "a string")),
            (|v| v["attachments"] = json!({}), wrong("attachments", "an array")),
            (|v| v["permalink"] = json!(1), wrong("permalink", "a string")),
        ];
        for (i, (edit, want)) in cases.into_iter().enumerate() {
            assert_eq!(decode_with(edit).unwrap_err(), want, "case {i}");
        }
        assert_eq!(ChatMessage::decode(b"[]", 10).unwrap_err(), InputError::NotAnObject);
        assert_eq!(ChatMessage::decode(b"", 10).unwrap_err(), InputError::Empty);
        assert!(matches!(ChatMessage::decode(b"{", 10), Err(InputError::Malformed(_))));
        assert_eq!(ChatMessage::decode(SAMPLE.as_bytes(), 100).unwrap_err(), InputError::TooLarge { size: SAMPLE.len(), limit: 100 });
        assert_eq!(wrong("text", "a string").to_string(), "field `text` must be a string");
    }
}
