//! Golden tests against seed 004's two samples, copied into `testdata/` as the seed prints
//! them except that the seed's no-break-space indentation (U+00A0, not JSON whitespace) is
//! plain spaces. The bundle sample's `aggregation` does not describe its own messages (it
//! quotes other texts and senders), so it is checked in a test of its own.

use super::*;
use crate::render::RenderError;
use chrono_tz::Tz;
use serde_json::json;

const BUNDLE: &str = include_str!("../testdata/timelines_bundle.json");
const SINGLE: &str = include_str!("../testdata/timelines_single.json");
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

fn decode(record: Value) -> ChatMessage<'static> {
    ChatMessage::decode(&serde_json::to_vec(&record).unwrap(), 1 << 20).unwrap().into_owned()
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
    assert_eq!(lines("Europe/Berlin", &autumn), ["2024-10-27 02:30", "2024-10-27 02:30", "2024-10-27 03:30"], "the hour that comes twice");
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

/// What the window store keeps is what the `Value` tree gave before the borrowing decoder:
/// a record as a producer may write it (spaces, escapes, repeated keys, floats, big
/// numbers) against message and header objects built from `serde_json::Value`.
#[test]
fn stored_bytes_are_those_of_the_value_tree() {
    let raw = r#"{ "id" : "m\u0031", "tenant": "ws", "direction": "sent", "timestamp": "2021-02-24T16:25:29.5+07:00",
        "account": {"full_name": "A\/B", "email": 1.50, "email": 2e3, "phone": 18446744073709551616},
        "chat": {"id": 7, "url": null, "chat_url": "https://x/", "is_group": [true, {"a": -0}], "full_name": "\u00e9\ud83d\udc4b"},
        "sender": {"full_name": "S", "phone": "1", "full_name": "S2", "n": {"x": [1.0, -9223372036854775809]}},
        "recipient": {}, "text": "line\nbreak \"q\" \u2028 tab\t", "unknown": {"deep": [1e300]}, "permalink": ""}"#;
    let v: Value = serde_json::from_str(raw).unwrap();
    let m = ChatMessage::decode(raw.as_bytes(), 1 << 20).unwrap();
    let message = json!({"direction": v["direction"], "timestamp": "2021-02-24T09:25:29+0000", "message_id": v["id"],
        "sender": v["sender"], "recipient": v["recipient"], "text": v["text"]});
    assert_eq!(message_bytes(&m), serde_json::to_vec(&message).unwrap());
    let (a, c) = (&v["account"], &v["chat"]);
    let header = json!({
        "account": {"full_name": a["full_name"], "email": a["email"], "phone": a["phone"]},
        "chat": {"full_name": c["full_name"], "responsible_name": null, "responsible_email": null, "chat_url": c["url"],
                 "chat_id": "7", "is_new_chat": null, "is_group": c["is_group"], "phone": null},
        "permalink": null,
    });
    assert_eq!(header_bytes(&m), serde_json::to_vec(&header).unwrap());
    let mut both = Vec::new();
    let at = write_stored(&m, &mut both);
    assert_eq!((&both[..at], &both[at..]), (&message_bytes(&m)[..], &header_bytes(&m)[..]));
}
