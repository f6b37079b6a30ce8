//! The `chat.messages` record: decoding and validation (DESIGN section 3).
//!
//! One WhatsApp message sent or received in a chat, as the chat product publishes it. A record
//! is accepted only with `id`, `tenant`, `direction` (`sent` or `received`), `timestamp`,
//! `account` and `chat` objects (the chat with a non-empty `id`), `sender` and `recipient`
//! objects, and a `text` string (possibly empty: a message may be only an attachment).
//! `attachments` (an array, default empty) and `permalink` are optional; other keys are
//! ignored. Errors reuse [`InputError`] and name the field (`chat.id` for the nested one).
//!
//! The decoded message borrows from the record's bytes ([`Json`]): every message of the
//! chat hot path is parsed once, without a map or a `String` per field, and written to the
//! window store from there.
//!
//! Messages with attachments decode fine: skipping them for delivery, as TimelinesAI does,
//! is the router's decision, not a decoding error ([`ChatMessage::has_attachments`]).

use std::borrow::Cow;

use chrono::{DateTime, Utc};

use super::event::{check_size, id_of, string_of, time_of, InputError};
use super::json::{Json, Object};

/// `sent` or `received`, validated, because TimelinesAI receivers switch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Sent,
    Received,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Sent => "sent",
            Direction::Received => "received",
        }
    }

    /// The event type subscriptions filter chat messages by: `message.sent`, `message.received`.
    pub fn event_type(self) -> &'static str {
        match self {
            Direction::Sent => "message.sent",
            Direction::Received => "message.received",
        }
    }
}

/// One chat message, as published on `chat.messages` (key: chat id), borrowing from the
/// record's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage<'a> {
    /// Producer's message id; `message_id` on the wire, and with the subscription id the
    /// stable `webhook-id` of a pass-through delivery.
    pub id: Cow<'a, str>,
    /// Workspace the message belongs to; subscriptions match on it.
    pub tenant: Cow<'a, str>,
    pub direction: Direction,
    /// When the message was sent; picks the aggregation window (DESIGN section 2).
    pub timestamp: DateTime<Utc>,
    /// The WhatsApp account (and teammate) it went through: `full_name`, `email`, `phone`.
    /// Kept as sent so that the body builder, not the decoder, decides the wire shape.
    pub account: Object<'a>,
    /// The chat: `id`, `full_name`, `responsible_name`, `responsible_email`, `url`,
    /// `is_new_chat`, `is_group`, `phone`. Always holds a non-empty `id`.
    pub chat: Object<'a>,
    /// `chat.id` as a string (numbers are accepted and converted): bundles are per chat.
    pub chat_id: Cow<'a, str>,
    /// Who sent it (`full_name`, `phone`).
    pub sender: Object<'a>,
    /// Who received it (`full_name`, `phone`).
    pub recipient: Object<'a>,
    /// Plain text of the message, any Unicode; empty for attachment-only messages.
    pub text: Cow<'a, str>,
    /// Attachments as sent; a message with any is skipped for delivery.
    pub attachments: Vec<Json<'a>>,
    /// Link to the message in the chat product; the bundle summary links to its first one.
    pub permalink: Option<Cow<'a, str>>,
}

/// The top-level keys the decoder reads; a repeated key counts with its last value.
#[derive(Default)]
struct Fields<'a> {
    id: Option<Json<'a>>,
    tenant: Option<Json<'a>>,
    direction: Option<Json<'a>>,
    timestamp: Option<Json<'a>>,
    account: Option<Json<'a>>,
    chat: Option<Json<'a>>,
    sender: Option<Json<'a>>,
    recipient: Option<Json<'a>>,
    text: Option<Json<'a>>,
    attachments: Option<Json<'a>>,
    permalink: Option<Json<'a>>,
}

impl<'a> Fields<'a> {
    fn of(top: Object<'a>) -> Self {
        let mut f = Fields::default();
        for (key, value) in top.into_entries() {
            let slot = match key.as_ref() {
                "id" => &mut f.id,
                "tenant" => &mut f.tenant,
                "direction" => &mut f.direction,
                "timestamp" => &mut f.timestamp,
                "account" => &mut f.account,
                "chat" => &mut f.chat,
                "sender" => &mut f.sender,
                "recipient" => &mut f.recipient,
                "text" => &mut f.text,
                "attachments" => &mut f.attachments,
                "permalink" => &mut f.permalink,
                _ => continue,
            };
            *slot = Some(value);
        }
        f
    }
}

impl<'a> ChatMessage<'a> {
    /// Decodes and validates one record value of at most `max_bytes`.
    pub fn decode(bytes: &'a [u8], max_bytes: usize) -> Result<Self, InputError> {
        check_size(bytes, max_bytes)?;
        match Json::parse(bytes) {
            Ok(Json::Object(top)) => Self::from_fields(Fields::of(top)),
            Ok(_) => Err(InputError::NotAnObject),
            Err(e) => Err(InputError::Malformed(e.to_string())),
        }
    }

    /// The checks in the order of the module's list, so one record always gets one reason.
    fn from_fields(f: Fields<'a>) -> Result<Self, InputError> {
        let id = id_of(f.id.into(), "id")?;
        let tenant = id_of(f.tenant.into(), "tenant")?;
        let direction = direction(f.direction)?;
        let timestamp = time_of(&f.timestamp.into(), "timestamp")?;
        let account = object(f.account, "account")?;
        let chat = object(f.chat, "chat")?;
        Ok(Self {
            id,
            tenant,
            direction,
            timestamp,
            account,
            chat_id: chat_id(&chat)?,
            chat,
            sender: object(f.sender, "sender")?,
            recipient: object(f.recipient, "recipient")?,
            text: match f.text {
                Some(Json::String(s)) => s,
                Some(Json::Null) | None => return Err(InputError::Missing("text")),
                Some(_) => return Err(InputError::WrongType { field: "text", expected: "a string" }),
            },
            attachments: match f.attachments {
                Some(Json::Array(a)) => a,
                Some(Json::Null) | None => Vec::new(),
                Some(_) => return Err(InputError::WrongType { field: "attachments", expected: "an array" }),
            },
            permalink: match f.permalink {
                Some(Json::String(s)) if !s.is_empty() => Some(s),
                Some(Json::String(_) | Json::Null) | None => None,
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

    /// The same message, owning its strings (to keep it beyond the record's bytes).
    pub fn into_owned(self) -> ChatMessage<'static> {
        let owned = |s: Cow<'a, str>| Cow::Owned(s.into_owned());
        ChatMessage {
            id: owned(self.id),
            tenant: owned(self.tenant),
            direction: self.direction,
            timestamp: self.timestamp,
            account: self.account.into_owned(),
            chat: self.chat.into_owned(),
            chat_id: owned(self.chat_id),
            sender: self.sender.into_owned(),
            recipient: self.recipient.into_owned(),
            text: owned(self.text),
            attachments: self.attachments.into_iter().map(Json::into_owned).collect(),
            permalink: self.permalink.map(owned),
        }
    }
}

/// A required JSON object.
fn object<'a>(v: Option<Json<'a>>, field: &'static str) -> Result<Object<'a>, InputError> {
    match v {
        Some(Json::Object(m)) => Ok(m),
        Some(Json::Null) | None => Err(InputError::Missing(field)),
        Some(_) => Err(InputError::WrongType { field, expected: "an object" }),
    }
}

fn direction(v: Option<Json<'_>>) -> Result<Direction, InputError> {
    match string_of(v.into(), "direction")?.as_ref() {
        "sent" => Ok(Direction::Sent),
        "received" => Ok(Direction::Received),
        _ => Err(InputError::WrongType { field: "direction", expected: r#""sent" or "received""# }),
    }
}

/// `chat.id` with the rules of [`id_of`], its errors naming `chat.id`; the chat keeps its id.
fn chat_id<'a>(chat: &Object<'a>) -> Result<Cow<'a, str>, InputError> {
    id_of(chat.get("id").cloned().into(), "id").map_err(|e| match e {
        InputError::Missing(_) => InputError::Missing("chat.id"),
        InputError::WrongType { expected, .. } => InputError::WrongType { field: "chat.id", expected },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

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
    fn decode_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ChatMessage<'static>, InputError> {
        let mut v = sample();
        edit(&mut v);
        ChatMessage::decode(&serde_json::to_vec(&v).unwrap(), 1 << 20).map(ChatMessage::into_owned)
    }

    #[test]
    fn decodes_design_sample() {
        let m = ChatMessage::decode(SAMPLE.as_bytes(), 1 << 20).unwrap();
        assert_eq!((m.id.as_ref(), m.tenant.as_ref()), ("ddfskhsd76dsfs6dsd5skjsdhf", "ws-10010"));
        assert!(matches!((&m.id, &m.text), (Cow::Borrowed(_), Cow::Borrowed(_))), "borrowed from the record");
        assert_eq!((m.direction, m.direction.event_type()), (Direction::Sent, "message.sent"));
        assert_eq!(m.timestamp.to_rfc3339(), "2021-02-24T16:25:29+00:00", "the +0000 form parses");
        assert_eq!(m.timestamp_ms(), 1_614_183_929_000);
        assert_eq!(m.account.to_value()["email"], "amnon@example.com");
        assert_eq!((m.chat_id.as_ref(), &m.chat.to_value()["id"]), ("10010001", &json!("10010001")), "chat keeps its id");
        assert_eq!(m.chat.to_value()["url"], "https://app.example.com/chat/10010001/messages/");
        assert_eq!(m.sender.to_value(), json!({"full_name": "John Doe", "phone": "+972540000000"}));
        assert_eq!(m.recipient.to_value()["full_name"], "Jane Smith");
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
        assert_eq!((m.chat_id.as_ref(), m.tenant.as_ref()), ("10010001", "10010"));
        assert_eq!(m.timestamp_ms(), 1_614_183_929_123);
        assert_eq!((m.direction.as_str(), m.text.as_ref()), ("received", ""), "empty text is allowed");
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
        assert_eq!(m.sender.to_value()["full_name"], "Trần Thị Ánh 🌸");
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
