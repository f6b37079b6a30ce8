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

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use minijinja::{context, AutoEscape, Environment, ErrorKind, HtmlEscape, Output, State, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::{json_bytes, RenderError};
use crate::ingest::chat::ChatMessage;

/// Wire form of timestamps: `2021-02-24T16:25:29+0000`, always UTC.
pub const TIMESTAMP_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%z";

/// The summary's per-message time, `2021-02-24 16:25` on the subscription's clock, given to
/// templates as `time`.
const SUMMARY_TIME_FORMAT: &str = "%Y-%m-%d %H:%M";

/// The built-in summary: `from <name> on <time>: <text>` per message, joined by `<br/>`, then
/// the link. The seed's sample closes the link with `</h>`, a typo: this emits `</a>`.
pub const DEFAULT_SUMMARY_TEMPLATE: &str = concat!(
    "{% for m in messages %}{% if not loop.first %}<br/>{% endif %}",
    "from {{ m.sender_name }} on {{ m.time }}: {{ m.text }}{% endfor %}",
    "{% if link %}<br/>Click <a href='{{ link }}'>here</a> to open the conversation in TimelinesAI{% endif %}",
);

/// Name of the summary template in its environment (appears in error messages).
const TEMPLATE: &str = "summary";

/// `whatsapp_account`: `{full_name, email, phone}` of the account the message went through.
pub fn account_object(m: &ChatMessage) -> Value {
    let f = |key| field(&m.account, key);
    json!({"full_name": f("full_name"), "email": f("email"), "phone": f("phone")})
}

/// `chat`: the sample's eight keys in its order; `chat_url` comes from `chat.url`
/// (or `chat.chat_url`), `chat_id` is the validated id as a string.
pub fn chat_object(m: &ChatMessage) -> Value {
    let f = |key| field(&m.chat, key);
    let url = if m.chat.contains_key("url") { f("url") } else { f("chat_url") };
    json!({
        "full_name": f("full_name"),
        "responsible_name": f("responsible_name"),
        "responsible_email": f("responsible_email"),
        "chat_url": url,
        "chat_id": m.chat_id,
        "is_new_chat": f("is_new_chat"),
        "is_group": f("is_group"),
        "phone": f("phone"),
    })
}

/// [`message_object`] as compact JSON, written straight from the message (no `Value` tree):
/// what the window store keeps per message, on the ingest hot path. Same bytes as
/// `serde_json::to_vec(&message_object(m))`.
pub fn message_bytes(m: &ChatMessage) -> Vec<u8> {
    #[derive(Serialize)]
    struct Message<'a> {
        direction: &'a str,
        timestamp: &'a str,
        message_id: &'a str,
        sender: &'a Value,
        recipient: &'a Value,
        text: &'a str,
    }
    let timestamp = wire_timestamp(&m.timestamp);
    let message = Message {
        direction: &m.direction,
        timestamp: &timestamp,
        message_id: &m.id,
        sender: &m.sender,
        recipient: &m.recipient,
        text: &m.text,
    };
    let mut out = Vec::with_capacity(128 + m.text.len());
    serde_json::to_writer(&mut out, &message).expect("strings and JSON values always serialize");
    out
}

/// [`BundleHeader::from_message`] as compact JSON, without the `Value` tree: what the window
/// store keeps per bundle. Same bytes as `serde_json::to_vec(&BundleHeader::from_message(m))`.
pub fn header_bytes(m: &ChatMessage) -> Vec<u8> {
    #[derive(Serialize)]
    struct Account<'a> {
        full_name: &'a Value,
        email: &'a Value,
        phone: &'a Value,
    }
    #[derive(Serialize)]
    struct Chat<'a> {
        full_name: &'a Value,
        responsible_name: &'a Value,
        responsible_email: &'a Value,
        chat_url: &'a Value,
        chat_id: &'a str,
        is_new_chat: &'a Value,
        is_group: &'a Value,
        phone: &'a Value,
    }
    #[derive(Serialize)]
    struct Header<'a> {
        account: Account<'a>,
        chat: Chat<'a>,
        permalink: Option<&'a str>,
    }
    let a = |key| m.account.get(key).unwrap_or(&Value::Null);
    let c = |key| m.chat.get(key).unwrap_or(&Value::Null);
    let header = Header {
        account: Account { full_name: a("full_name"), email: a("email"), phone: a("phone") },
        chat: Chat {
            full_name: c("full_name"),
            responsible_name: c("responsible_name"),
            responsible_email: c("responsible_email"),
            chat_url: if m.chat.contains_key("url") { c("url") } else { c("chat_url") },
            chat_id: &m.chat_id,
            is_new_chat: c("is_new_chat"),
            is_group: c("is_group"),
            phone: c("phone"),
        },
        permalink: m.permalink.as_deref(),
    };
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, &header).expect("strings and JSON values always serialize");
    out
}

/// `t` in [`TIMESTAMP_FORMAT`], without parsing the format string each time (years outside
/// 0..=9999 take chrono's formatter, which gives them a sign).
pub fn wire_timestamp(t: &DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    if !(0..=9999).contains(&t.year()) || t.nanosecond() >= 1_000_000_000 {
        return t.format(TIMESTAMP_FORMAT).to_string(); // signed years, leap seconds
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
    String::from_utf8(b.to_vec()).expect("ASCII")
}

/// One entry of `messages` (or the `message` of a single payload), in the sample's order.
pub fn message_object(m: &ChatMessage) -> Value {
    json!({
        "direction": m.direction,
        "timestamp": wire_timestamp(&m.timestamp),
        "message_id": m.id,
        "sender": m.sender,
        "recipient": m.recipient,
        "text": m.text,
    })
}

/// The body for aggregation `none`: `{whatsapp_account, chat, message}`, compact JSON.
pub fn single_payload(m: &ChatMessage) -> Vec<u8> {
    json_bytes(&json!({
        "whatsapp_account": account_object(m),
        "chat": chat_object(m),
        "message": message_object(m),
    }))
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
    pub fn from_message(m: &ChatMessage) -> Self {
        Self { account: account_object(m), chat: chat_object(m), permalink: m.permalink.clone() }
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

/// The compiled summary template; built once, shared between threads.
///
/// Context: `messages` (the message objects, each with `time` = `YYYY-MM-DD HH:MM` on the
/// subscription's clock and `sender_name` = `sender.full_name`, else `sender.phone`, else
/// empty, added), `chat`, `account`, `permalink` (none if absent), `link` (see
/// [`BundleHeader::link`]) and `timezone` (the IANA name of that clock, `UTC` by default).
/// Undefined names are errors (`is defined` tests for optional keys), as in custom dialects.
#[derive(Debug)]
pub struct Summary {
    /// Holds the one template [`TEMPLATE`], with HTML auto-escaping and [`html_formatter`].
    env: Environment<'static>,
}

impl Summary {
    /// Compiles `template`, or the built-in one for `None`. Syntax errors and unknown
    /// filters, tests or functions are reported here, not at the first bundle.
    pub fn new(template: Option<&str>) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_formatter(html_formatter);
        let source = template.unwrap_or(DEFAULT_SUMMARY_TEMPLATE).to_string();
        env.add_template_owned(TEMPLATE, source).map_err(|e| template_error(&e))?;
        let summary = Self { env };
        summary.probe()?;
        Ok(summary)
    }

    /// The `aggregation` text of `messages` (message objects, in time order), with times on
    /// the wall clock of `zone`.
    pub fn render(&self, messages: &[Value], header: &BundleHeader, zone: Tz) -> Result<String, RenderError> {
        let ctx = template_context(messages, header, zone)?;
        self.env.get_template(TEMPLATE).and_then(|t| t.render(ctx)).map_err(|e| template_error(&e))
    }

    /// Renders a sample bundle so that a name no data can fix (unknown filter, test or
    /// function) fails at start-up; errors that depend on the data wait for real bundles.
    fn probe(&self) -> Result<(), RenderError> {
        let sample = ChatMessage {
            id: "sample".into(),
            tenant: "sample".into(),
            direction: "sent".into(),
            timestamp: DateTime::UNIX_EPOCH,
            account: Map::new(),
            chat: Map::new(),
            chat_id: "sample".into(),
            sender: json!({"full_name": "Sample", "phone": ""}),
            recipient: json!({"full_name": "Sample", "phone": ""}),
            text: "sample".into(),
            attachments: Vec::new(),
            permalink: Some("https://example.com/".into()),
        };
        let ctx = template_context(&[message_object(&sample)], &BundleHeader::from_message(&sample), Tz::UTC)?;
        match self.env.get_template(TEMPLATE).and_then(|t| t.render(ctx)) {
            Err(e) if matches!(e.kind(), ErrorKind::UnknownFilter | ErrorKind::UnknownTest | ErrorKind::UnknownFunction) => {
                Err(template_error(&e))
            }
            _ => Ok(()),
        }
    }
}

/// One line with minijinja's message and its causes.
fn template_error(e: &minijinja::Error) -> RenderError {
    let mut msg = format!("timelines summary template: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    RenderError::Template(msg)
}

/// The template context of a bundle (see [`Summary`]).
fn template_context(messages: &[Value], header: &BundleHeader, zone: Tz) -> Result<minijinja::Value, RenderError> {
    let messages = messages.iter().enumerate().map(|m| message_context(m, zone)).collect::<Result<Vec<_>, _>>()?;
    Ok(context! {
        messages => messages,
        chat => minijinja::Value::from_serialize(&header.chat),
        account => minijinja::Value::from_serialize(&header.account),
        permalink => header.permalink,
        link => header.link(),
        timezone => zone.name(),
    })
}

/// A message object with `time` (on the clock of `zone`) and `sender_name` added, as the
/// template sees it.
fn message_context((index, message): (usize, &Value), zone: Tz) -> Result<minijinja::Value, RenderError> {
    let bad = || RenderError::Template(format!("timelines summary: message {index} is not a message object"));
    let mut m = message.as_object().cloned().ok_or_else(bad)?;
    let time =
        m.get("timestamp").and_then(Value::as_str).and_then(|t| DateTime::parse_from_str(t, TIMESTAMP_FORMAT).ok()).ok_or_else(bad)?;
    let sender = m.get("sender");
    let name =
        ["full_name", "phone"].into_iter().find_map(|k| sender.and_then(|s| s.get(k)).and_then(Value::as_str).filter(|s| !s.is_empty()));
    let name = name.unwrap_or_default().to_string();
    m.insert("time".into(), Value::String(time.with_timezone(&zone).format(SUMMARY_TIME_FORMAT).to_string()));
    m.insert("sender_name".into(), Value::String(name));
    Ok(minijinja::Value::from_serialize(&m))
}

/// minijinja's formatter, except that HTML-escaped strings keep their `/` (see the module
/// docs): every `&` of the input becomes `&amp;`, so `&#x2f;` in the escaper's output can
/// only stand for a `/`. Safe strings, non-strings and other modes go to the default.
fn html_formatter(out: &mut Output, state: &State, value: &minijinja::Value) -> Result<(), minijinja::Error> {
    match value.as_str() {
        Some(s) if state.auto_escape() == AutoEscape::Html && !value.is_safe() => {
            let escaped = HtmlEscape(s).to_string();
            out.write_str(&escaped.replace("&#x2f;", "/")).map_err(minijinja::Error::from)
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// `from[key]`, `null` when absent.
fn field(from: &Map<String, Value>, key: &str) -> Value {
    from.get(key).cloned().unwrap_or(Value::Null)
}

fn is_web_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
}

/// Golden tests against seed 004's two samples, copied into `testdata/` as the seed prints
/// them except that the seed's no-break-space indentation (U+00A0, not JSON whitespace) is
/// plain spaces. The bundle sample's `aggregation` does not describe its own messages (it
/// quotes other texts and senders), so it is checked in a test of its own.
#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: &str = include_str!("testdata/timelines_bundle.json");
    const SINGLE: &str = include_str!("testdata/timelines_single.json");
    const PERMALINK: &str = "https://app.timelines.ai/permalink/77a28d55-5345-5435-8c72-3a7bcad8ded9/";

    /// A `chat.messages` record with the samples' account, chat and people.
    fn record(direction: &str, timestamp: &str, text: &str) -> Value {
        json!({
            "id": "ddfskhsd76dsfs6dsd5skjsdhf", "tenant": "ws-10010", "direction": direction, "timestamp": timestamp,
            "account": {"full_name": "Amnon Haha", "email": "Amnon@acme.com", "phone": "+972500000000"},
            "chat": {"id": "10010001", "full_name": "John Doe>", "responsible_name": "Amnon",
                     "responsible_email": "Amnon@acme.com", "url": "https://app.timelines.ai/chat/10010001/messages/",
                     "is_new_chat": true, "is_group": false, "phone": "+97254000000"},
            "sender": {"full_name": "John Doe", "phone": "+972540000000"},
            "recipient": {"full_name": "Jane Smith", "phone": "+972550000000"},
            "text": text, "attachments": [], "permalink": PERMALINK,
        })
    }

    fn decode(record: Value) -> ChatMessage {
        ChatMessage::decode(&serde_json::to_vec(&record).unwrap(), 1 << 20).unwrap()
    }

    /// Same value and same key order at every level.
    fn assert_same_json(body: &[u8], want: &Value) {
        assert_eq!(&serde_json::from_slice::<Value>(body).unwrap(), want);
        assert_eq!(std::str::from_utf8(body).unwrap(), serde_json::to_string(want).unwrap());
    }

    /// The exchange the bundle sample's `aggregation` describes: John asks, Jane answers.
    fn conversation() -> (BundleHeader, Vec<Value>) {
        let hi = decode(record("sent", "2021-02-24T16:25:29+0000", "Hi! How are you?"));
        let mut answer = record("received", "2021-02-24T16:30:29+0000", "I am fine, how are you?");
        answer["sender"] = json!({"full_name": "Jane Smith", "phone": "+972550000000"});
        let answer = decode(answer);
        (BundleHeader::from_message(&hi), vec![message_object(&hi), message_object(&answer)])
    }

    fn render(template: Option<&str>, header: &BundleHeader, messages: &[Value]) -> String {
        Summary::new(template).unwrap().render(messages, header, Tz::UTC).unwrap()
    }

    /// The hot-path writers give the bytes of the `Value` builders, absent keys and odd
    /// timestamps included.
    #[test]
    fn direct_writers_match_value_builders() {
        let mut sparse = record("received", "1969-12-31T23:59:59.5+0000", "<b>\"hi\"</b> 👋🏽");
        for k in ["email", "phone"] {
            sparse["account"].as_object_mut().unwrap().remove(k);
        }
        let chat = sparse["chat"].as_object_mut().unwrap();
        chat.remove("url");
        chat.insert("chat_url".into(), json!("https://x/"));
        chat.insert("extra".into(), json!({"nested": [1, 2]}));
        sparse.as_object_mut().unwrap().remove("permalink");
        let mut numeric = record("sent", "2021-02-24T16:25:29+0000", "");
        numeric["timestamp"] = json!(253_402_300_800_000_i64); // year 10000: chrono's signed form
        numeric["chat"]["id"] = json!(42);
        for r in [record("sent", "2021-02-24T16:25:29+0000", "lorem"), sparse, numeric] {
            let m = decode(r);
            assert_eq!(message_bytes(&m), serde_json::to_vec(&message_object(&m)).unwrap());
            assert_eq!(header_bytes(&m), serde_json::to_vec(&BundleHeader::from_message(&m)).unwrap());
            assert_eq!(wire_timestamp(&m.timestamp), m.timestamp.format(TIMESTAMP_FORMAT).to_string());
        }
        for ms in [0, -1, 1_614_183_929_000, 253_402_300_799_999, -62_167_219_200_000] {
            let t = DateTime::from_timestamp_millis(ms).unwrap();
            assert_eq!(wire_timestamp(&t), t.format(TIMESTAMP_FORMAT).to_string(), "{ms}");
        }
    }

    #[test]
    fn bundle_matches_sample() {
        let first = decode(record("sent", "2021-02-24T16:25:29+0000", "lorem ipsum"));
        let second = decode(record("received", "2021-02-24T16:30:29+0000", "lorem ipsum"));
        let header = BundleHeader::from_message(&first);
        let messages = [message_object(&first), message_object(&second)];
        let summary = render(None, &header, &messages);
        let mut want: Value = serde_json::from_str(BUNDLE).unwrap();
        want["aggregation"] = json!(summary);
        assert_same_json(&bundle_payload(&header, &messages, &summary), &want);
    }

    #[test]
    fn summary_matches_sample_aggregation_with_the_link_closed() {
        let sample: Value = serde_json::from_str(BUNDLE).unwrap();
        let want = sample["aggregation"].as_str().unwrap().replace("</h>", "</a>");
        let (header, messages) = conversation();
        assert_eq!(render(None, &header, &messages), want);
    }

    #[test]
    fn single_matches_sample() {
        let mut r = record("sent", "2021-02-24T06:25:29+0000", "lorem ipsum");
        r["chat"]["phone"] = json!("+97251111111");
        assert_same_json(&single_payload(&decode(r)), &serde_json::from_str(SINGLE).unwrap());
    }

    #[test]
    fn header_survives_its_json_round_trip() {
        let (header, messages) = conversation();
        let stored = serde_json::to_vec(&header).unwrap();
        let back: BundleHeader = serde_json::from_slice(&stored).unwrap();
        assert_eq!(back, header);
        assert_eq!(bundle_payload(&back, &messages, "s"), bundle_payload(&header, &messages, "s"), "key order too");
        let empty = bundle_payload(&header, &[], "");
        let v: Value = serde_json::from_slice(&empty).unwrap();
        assert!(v["first_message_timestamp"].is_null() && v["messages"] == json!([]));
    }

    #[test]
    fn absent_account_and_chat_keys_are_null_and_timestamps_utc() {
        let mut r = record("sent", "2021-02-24T18:25:29.750+02:00", "x");
        r["account"] = json!({"phone": "+1"});
        r["chat"] = json!({"id": 42, "chat_url": "https://a.example/c/42"});
        let m = decode(r);
        assert_eq!(account_object(&m).to_string(), r#"{"full_name":null,"email":null,"phone":"+1"}"#);
        let chat = chat_object(&m);
        assert_eq!(chat["chat_url"], "https://a.example/c/42");
        assert_eq!(chat["chat_id"], "42");
        assert!(chat["is_group"].is_null() && chat["full_name"].is_null());
        assert_eq!(message_object(&m)["timestamp"], "2021-02-24T16:25:29+0000");
    }

    #[test]
    fn markup_and_quotes_are_escaped() {
        let mut r = record("sent", "2021-02-24T16:25:29+0000", r#"<script>alert("x")</script> & 'so'"#);
        r["sender"]["full_name"] = json!(r#"O'Brien & "Sons" <b>"#);
        r["permalink"] = json!("https://app.timelines.ai/p/a'b?x=1&y=<2>");
        let m = decode(r);
        let summary = render(None, &BundleHeader::from_message(&m), &[message_object(&m)]);
        assert_eq!(
            summary,
            "from O&#x27;Brien &amp; &quot;Sons&quot; &lt;b&gt; on 2021-02-24 16:25: \
             &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#x27;so&#x27;<br/>Click \
             <a href='https://app.timelines.ai/p/a&#x27;b?x=1&amp;y=&lt;2&gt;'>here</a> \
             to open the conversation in TimelinesAI"
        );
        assert!(!summary.contains("<script") && !summary.contains("&#x2f;"));
    }

    #[test]
    fn only_web_urls_are_linked() {
        let mut r = record("sent", "2021-02-24T16:25:29+0000", "x");
        r["permalink"] = json!("javascript:alert(1)");
        let m = decode(r.clone());
        let summary = render(None, &BundleHeader::from_message(&m), &[message_object(&m)]);
        let to_chat = "<a href='https://app.timelines.ai/chat/10010001/messages/'>here</a>";
        assert!(summary.ends_with(&format!("{to_chat} to open the conversation in TimelinesAI")), "{summary}");
        r["chat"]["url"] = json!("data:text/html,x");
        r.as_object_mut().unwrap().remove("permalink");
        let m = decode(r);
        assert_eq!(render(None, &BundleHeader::from_message(&m), &[message_object(&m)]), "from John Doe on 2021-02-24 16:25: x");
    }

    #[test]
    fn unicode_is_intact() {
        let text = "Chào bạn! Bạn có khỏe không? 👋🏽 Tôi ổn 😀";
        let mut r = record("sent", "2021-02-24T16:25:29+0000", text);
        r["sender"]["full_name"] = json!("Nguyễn Văn Đức");
        let m = decode(r);
        let header = BundleHeader::from_message(&m);
        let messages = [message_object(&m)];
        let summary = render(None, &header, &messages);
        let line = format!("from Nguyễn Văn Đức on 2021-02-24 16:25: {text}<br/>");
        assert!(summary.starts_with(&line), "{summary}");
        let body = String::from_utf8(bundle_payload(&header, &messages, &summary)).unwrap();
        assert!(body.contains(&format!(r#""text":"{text}""#)), "raw UTF-8, no \\u escapes: {body}");
        assert!(String::from_utf8(single_payload(&m)).unwrap().contains(text));
    }

    #[test]
    fn custom_template_gets_the_documented_context() {
        let (header, messages) = conversation();
        let template = "{{ messages | length }} in {{ chat.full_name }} for {{ account.email }}:\
            {% for m in messages %} [{{ m.time }}|{{ m.timestamp }}] \
            {{ m.sender.full_name }}/{{ m.direction }}: {{ m.text }};{% endfor %}\
            {% if permalink is none %}-{% endif %} {{ link }} {{ '<i>' | safe }}";
        assert_eq!(
            render(Some(template), &header, &messages),
            "2 in John Doe&gt; for Amnon@acme.com: \
             [2021-02-24 16:25|2021-02-24T16:25:29+0000] John Doe/sent: Hi! How are you?; \
             [2021-02-24 16:30|2021-02-24T16:30:29+0000] Jane Smith/received: I am fine, how are you?; \
             https://app.timelines.ai/permalink/77a28d55-5345-5435-8c72-3a7bcad8ded9/ <i>"
        );
    }

    #[test]
    fn template_mistakes_are_clear_errors() {
        let err = |t: &str| Summary::new(Some(t)).unwrap_err().to_string();
        let syntax = err("{% for m in messages %}{{ m.text }}");
        assert!(syntax.starts_with("template error: timelines summary template: syntax error"), "{syntax}");
        assert!(err("{{ messages | shout }}").contains("unknown filter"));
        let typo = Summary::new(Some("{% for m in messages %}{{ m.txet }}{% endfor %}")).expect("data errors wait for data");
        let (header, messages) = conversation();
        let e = typo.render(&messages, &header, Tz::UTC).unwrap_err();
        assert!(matches!(e, RenderError::Template(_)) && e.to_string().contains("undefined value"), "{e}");
        let bad = Summary::new(None).unwrap().render(&[json!({"text": "no time"})], &header, Tz::UTC).unwrap_err();
        assert_eq!(bad.to_string(), "template error: timelines summary: message 0 is not a message object");
    }

    /// The summary shows each message on the subscription's clock, whatever the offset the
    /// producer wrote; the body's own timestamps stay UTC.
    #[test]
    fn summary_times_are_on_the_subscription_clock() {
        let at = |ts: &str| message_object(&decode(record("sent", ts, "x")));
        let summary = Summary::new(None).unwrap();
        let header = BundleHeader::from_message(&decode(record("sent", "2021-02-24T16:25:29+0000", "x")));
        let lines = |zone: &str, messages: &[Value]| -> Vec<String> {
            let text = summary.render(messages, &header, zone.parse().unwrap()).unwrap();
            text.split("<br/>").filter_map(|l| l.strip_prefix("from John Doe on ")).map(|l| l[..16].to_string()).collect()
        };
        let evening = [at("2021-02-24T16:25:29+0000"), at("2021-02-24T18:25:29.750+02:00")];
        assert_eq!(lines("UTC", &evening), ["2021-02-24 16:25", "2021-02-24 16:25"]);
        assert_eq!(lines("Asia/Ho_Chi_Minh", &evening), ["2021-02-24 23:25", "2021-02-24 23:25"]);
        assert_eq!(lines("Asia/Kathmandu", &[at("2024-05-01T10:10:00Z")]), ["2024-05-01 15:55"]);
        let autumn = [at("2024-10-27T00:30:00Z"), at("2024-10-27T01:30:00Z"), at("2024-10-27T02:30:00Z")];
        assert_eq!(
            lines("Europe/Berlin", &autumn),
            ["2024-10-27 02:30", "2024-10-27 02:30", "2024-10-27 03:30"],
            "the hour that comes twice"
        );
        assert_eq!(evening[1]["timestamp"], "2021-02-24T16:25:29+0000", "the body stays UTC");
        let named = Summary::new(Some("{{ timezone }}: {{ messages[0].time }}")).unwrap();
        assert_eq!(named.render(&evening, &header, "Asia/Ho_Chi_Minh".parse().unwrap()).unwrap(), "Asia/Ho_Chi_Minh: 2021-02-24 23:25");
        assert_eq!(named.render(&evening, &header, Tz::UTC).unwrap(), "UTC: 2021-02-24 16:25");
    }

    #[test]
    fn summary_is_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Summary>();
        let summary = std::sync::Arc::new(Summary::new(None).unwrap());
        let (header, messages) = conversation();
        let s = summary.clone();
        let other = std::thread::spawn(move || s.render(&messages, &header, Tz::UTC).unwrap()).join().unwrap();
        let (header, messages) = conversation();
        assert_eq!(other, summary.render(&messages, &header, Tz::UTC).unwrap());
    }
}
