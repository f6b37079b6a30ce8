//! TimelinesAI payloads (seed 004): one chat message as it happens, or a bundle of one chat's
//! messages of a window with an HTML summary in `aggregation`.
//!
//! - [`single_payload`]: `{whatsapp_account, chat, message}`, for aggregation `none`.
//! - [`bundle_payload`]: `{whatsapp_account, chat, messages, first_message_timestamp,
//!   last_message_timestamp, aggregation}`. The window store keeps a [`BundleHeader`] (account,
//!   chat, permalink of the bundle's first message) and the [`message_object`]s, in time order.
//! - [`Summary`]: the `aggregation` text, a minijinja template (built-in or configured).
//!
//! Key order is the samples' (serde_json `preserve_order`); the body's timestamps are UTC in
//! the samples' `2021-02-24T16:25:29+0000` form, the summary's are on the subscription's clock
//! (its `timezone`, UTC by default). Absent account and chat keys are `null`, so receivers
//! always see the shape TimelinesAI documents.
//!
//! **Escaping.** The summary lands in CRM notes, so every value printed by the template
//! (texts, names, the URL) is HTML-escaped: the environment auto-escapes HTML, through a
//! formatter that uses minijinja's escaper but leaves `/` alone. minijinja also turns `/`
//! into `&#x2f;`, which is harmless but not needed in text or in a quoted attribute, and
//! would make a plain link `https:&#x2f;&#x2f;app...` unlike the sample's. `& < > " '` are
//! escaped (`'` matters: the link sits in a single-quoted `href`). The explicit `|e` filter
//! keeps minijinja's own rules. `|safe` opts out. The link is only a web URL: `link` is the
//! permalink, else the chat URL, whichever is first to be `http`/`https` (a `javascript:`
//! URL stays out of the `href`); with neither, the built-in template leaves the line out.

//!
//! One set of serde views ([`AccountView`], [`ChatView`], [`MessageView`], [`HeaderView`])
//! borrows from a decoded message and is the only definition of each shape: the bytes the
//! window store keeps ([`message_bytes`], [`header_bytes`]) and the JSON values the payloads
//! are built from ([`message_object`], [`account_object`], [`chat_object`]) come from it.

mod summary;
#[cfg(test)]
mod tests;

pub use summary::{Summary, DEFAULT_SUMMARY_TEMPLATE};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ingest::chat::ChatMessage;
use crate::ingest::json::{Json, Object, NULL};

/// Wire form of timestamps: `2021-02-24T16:25:29+0000`, always UTC.
pub const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%z";

/// `whatsapp_account`: `{full_name, email, phone}` of the account the message went through.
#[derive(Serialize)]
pub struct AccountView<'a> {
    full_name: &'a Json<'a>,
    email: &'a Json<'a>,
    phone: &'a Json<'a>,
}

/// `chat`: the sample's eight keys in its order; `chat_url` comes from `chat.url` (or
/// `chat.chat_url`), `chat_id` is the validated id as a string.
#[derive(Serialize)]
pub struct ChatView<'a> {
    full_name: &'a Json<'a>,
    responsible_name: &'a Json<'a>,
    responsible_email: &'a Json<'a>,
    chat_url: &'a Json<'a>,
    chat_id: &'a str,
    is_new_chat: &'a Json<'a>,
    is_group: &'a Json<'a>,
    phone: &'a Json<'a>,
}

/// One entry of `messages` (or the `message` of a single payload), in the sample's order.
#[derive(Serialize)]
pub struct MessageView<'a> {
    direction: &'static str,
    timestamp: WireTime,
    message_id: &'a str,
    sender: &'a Object<'a>,
    recipient: &'a Object<'a>,
    text: &'a str,
}

/// What the window store keeps per bundle: the [`BundleHeader`] as JSON.
#[derive(Serialize)]
pub struct HeaderView<'a> {
    account: AccountView<'a>,
    chat: ChatView<'a>,
    permalink: Option<&'a str>,
}

/// The single payload: `{whatsapp_account, chat, message}`.
#[derive(Serialize)]
struct SingleView<'a> {
    whatsapp_account: AccountView<'a>,
    chat: ChatView<'a>,
    message: MessageView<'a>,
}

impl<'a> AccountView<'a> {
    pub fn of(m: &'a ChatMessage<'_>) -> Self {
        let a = |key| m.account.get(key).unwrap_or(NULL);
        Self { full_name: a("full_name"), email: a("email"), phone: a("phone") }
    }
}

impl<'a> ChatView<'a> {
    pub fn of(m: &'a ChatMessage<'_>) -> Self {
        let c = |key| m.chat.get(key).unwrap_or(NULL);
        Self {
            full_name: c("full_name"),
            responsible_name: c("responsible_name"),
            responsible_email: c("responsible_email"),
            chat_url: if m.chat.contains_key("url") { c("url") } else { c("chat_url") },
            chat_id: &m.chat_id[..],
            is_new_chat: c("is_new_chat"),
            is_group: c("is_group"),
            phone: c("phone"),
        }
    }
}

impl<'a> MessageView<'a> {
    pub fn of(m: &'a ChatMessage<'_>) -> Self {
        Self {
            direction: m.direction.as_str(),
            timestamp: WireTime(m.timestamp),
            message_id: &m.id[..],
            sender: &m.sender,
            recipient: &m.recipient,
            text: &m.text[..],
        }
    }
}

impl<'a> HeaderView<'a> {
    pub fn of(m: &'a ChatMessage<'_>) -> Self {
        Self { account: AccountView::of(m), chat: ChatView::of(m), permalink: m.permalink.as_deref() }
    }
}

fn to_value(view: impl Serialize) -> Value {
    serde_json::to_value(view).expect("strings and JSON values always serialize")
}

fn to_bytes(view: impl Serialize, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    serde_json::to_writer(&mut out, &view).expect("strings and JSON values always serialize");
    out
}

/// [`AccountView`] as a JSON value.
pub fn account_object(m: &ChatMessage<'_>) -> Value {
    to_value(AccountView::of(m))
}

/// [`ChatView`] as a JSON value.
pub fn chat_object(m: &ChatMessage<'_>) -> Value {
    to_value(ChatView::of(m))
}

/// [`MessageView`] as a JSON value.
pub fn message_object(m: &ChatMessage<'_>) -> Value {
    to_value(MessageView::of(m))
}

/// [`MessageView`] as compact JSON, straight from the message (no `Value` tree): what the
/// window store keeps per message, on the ingest hot path.
pub fn message_bytes(m: &ChatMessage<'_>) -> Vec<u8> {
    to_bytes(MessageView::of(m), 128 + m.text.len())
}

/// [`HeaderView`] as compact JSON: what the window store keeps per bundle, read back as a
/// [`BundleHeader`].
pub fn header_bytes(m: &ChatMessage<'_>) -> Vec<u8> {
    to_bytes(HeaderView::of(m), 512)
}

/// Appends [`message_bytes`] and then [`header_bytes`] to `out`; returns where the header
/// starts. The hot path writes both into one buffer.
pub fn write_stored(m: &ChatMessage<'_>, out: &mut Vec<u8>) -> usize {
    serde_json::to_writer(&mut *out, &MessageView::of(m)).expect("strings and JSON values always serialize");
    let header = out.len();
    serde_json::to_writer(&mut *out, &HeaderView::of(m)).expect("strings and JSON values always serialize");
    header
}

/// A timestamp written in [`TIMESTAMP_FORMAT`] without a `String` of its own.
struct WireTime(DateTime<Utc>);

impl Serialize for WireTime {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match wire_digits(&self.0) {
            Some(b) => serializer.serialize_str(std::str::from_utf8(&b).expect("ASCII")),
            None => serializer.serialize_str(&self.0.format(TIMESTAMP_FORMAT).to_string()),
        }
    }
}

/// `t` in [`TIMESTAMP_FORMAT`], without parsing the format string each time (years outside
/// 0..=9999 take chrono's formatter, which gives them a sign).
pub fn wire_timestamp(t: &DateTime<Utc>) -> String {
    match wire_digits(t) {
        Some(b) => String::from_utf8(b.to_vec()).expect("ASCII"),
        None => t.format(TIMESTAMP_FORMAT).to_string(),
    }
}

/// The digits of [`wire_timestamp`], None for the years and leap seconds chrono writes.
fn wire_digits(t: &DateTime<Utc>) -> Option<[u8; 24]> {
    use chrono::{Datelike, Timelike};
    if !(0..=9999).contains(&t.year()) || t.nanosecond() >= 1_000_000_000 {
        return None; // signed years, leap seconds
    }
    let mut b = *b"0000-00-00T00:00:00+0000";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for d in b[at..at + width].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, t.year() as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    Some(b)
}

/// The body for aggregation `none`: `{whatsapp_account, chat, message}`, compact JSON.
pub fn single_payload(m: &ChatMessage<'_>) -> Vec<u8> {
    let view = SingleView { whatsapp_account: AccountView::of(m), chat: ChatView::of(m), message: MessageView::of(m) };
    to_bytes(view, 768 + m.text.len())
}

/// What a bundle says about its chat besides the messages; taken from the bundle's first
/// message and stored with the open bundle (as JSON, in sled) by the window store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// `whatsapp_account` of the body ([`account_object`]).
    pub account: Value,
    /// `chat` of the body ([`chat_object`]).
    pub chat: Value,
    /// Permalink of the first message: TimelinesAI's summary links to the first message.
    pub permalink: Option<String>,
}

impl BundleHeader {
    pub fn from_message(m: &ChatMessage<'_>) -> Self {
        Self { account: account_object(m), chat: chat_object(m), permalink: m.permalink.as_deref().map(str::to_string) }
    }

    /// Where the summary links to: the permalink, else the chat's URL, whichever is first to
    /// be an `http`/`https` URL; none when neither is.
    pub fn link(&self) -> Option<&str> {
        let chat_url = self.chat.get("chat_url").and_then(Value::as_str);
        [self.permalink.as_deref(), chat_url].into_iter().flatten().find(|u| is_web_url(u))
    }
}

/// The bundle body, compact JSON. `first_message_timestamp` and `last_message_timestamp` are
/// the `timestamp`s of the first and last of `messages` (in time order), `null` when empty.
pub fn bundle_payload(header: &BundleHeader, messages: &[Value], summary: &str) -> Vec<u8> {
    /// Field order is the wire order; borrowing avoids copying the messages.
    #[derive(Serialize)]
    struct Bundle<'a> {
        whatsapp_account: &'a Value,
        chat: &'a Value,
        messages: &'a [Value],
        first_message_timestamp: Option<&'a Value>,
        last_message_timestamp: Option<&'a Value>,
        aggregation: &'a str,
    }
    let bundle = Bundle {
        whatsapp_account: &header.account,
        chat: &header.chat,
        messages,
        first_message_timestamp: messages.first().and_then(|m| m.get("timestamp")),
        last_message_timestamp: messages.last().and_then(|m| m.get("timestamp")),
        aggregation: summary,
    };
    serde_json::to_vec(&bundle).expect("JSON values and strings always serialize")
}

fn is_web_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}
