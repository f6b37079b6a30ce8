//! Rendering a closed TimelinesAI bundle of 100 messages: the HTML summary
//! (`Summary::render`, built-in template) plus the bundle body (`bundle_payload`), as the
//! window store does when a window closes. The message objects are built beforehand, as
//! the store keeps them.
//!
//! `cargo bench --bench render_bundle`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use hookd::ingest::chat::ChatMessage;
use hookd::render::timelines::{bundle_payload, message_object, BundleHeader, Summary};
use serde_json::json;

fn message(i: i64) -> ChatMessage<'static> {
    let record = json!({
        "id": format!("msg-{i}"), "tenant": "ws-10010", "direction": if i % 2 == 0 { "sent" } else { "received" },
        "timestamp": 1_614_183_929_000_i64 + i * 30_000,
        "account": {"full_name": "Amnon Haha", "email": "amnon@example.com", "phone": "+972500000000"},
        "chat": {"id": "10010001", "full_name": "John Doe", "responsible_name": "Amnon",
                 "responsible_email": "amnon@example.com", "url": "https://app.example.com/chat/10010001/messages/",
                 "is_new_chat": false, "is_group": false, "phone": "+97254000000"},
        "sender": {"full_name": "John Doe", "phone": "+972540000000"},
        "recipient": {"full_name": "Jane Smith", "phone": "+972550000000"},
        "text": format!("Message {i}: chào bạn, how are you? <b>fine</b> & \"well\" 👋"),
        "permalink": "https://app.example.com/permalink/77a28d55",
    });
    ChatMessage::decode(&serde_json::to_vec(&record).unwrap(), 1 << 20).unwrap().into_owned()
}

fn render_bundle(c: &mut Criterion) {
    let messages: Vec<ChatMessage> = (0..100).map(message).collect();
    let header = BundleHeader::from_message(&messages[0]);
    let objects: Vec<_> = messages.iter().map(message_object).collect();
    let summary = Summary::new(None).unwrap();
    c.bench_function("timelines_bundle_100_messages", |b| {
        b.iter(|| {
            let text = summary.render(black_box(&objects), &header, chrono_tz::Tz::UTC).unwrap();
            bundle_payload(&header, &objects, &text)
        })
    });
}

criterion_group!(benches, render_bundle);
criterion_main!(benches);
