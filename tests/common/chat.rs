//! Chat test helpers: messages in the `chat.messages` shape, chat subscriptions, a daemon on a
//! manual clock, and the bundles a receiver got.

use std::sync::Arc;
use std::time::Duration;

use hookd::window::clock::ManualClock;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::receiver::{Receiver, Recorded};
use super::wait_until;

/// 2021-02-24T16:25:29Z, the seed's first message.
pub const T0: i64 = 1_614_183_929_000;

/// The tenant of [`message`].
pub const TENANT: &str = "ws-10010";

/// A `chat.messages` record of tenant [`TENANT`].
pub fn message(id: &str, chat: &str, ts_ms: i64, sender: &str, text: &str) -> String {
    message_of(TENANT, id, chat, ts_ms, sender, text)
}

/// A `chat.messages` record of `tenant`, in the shape of DESIGN section 3.
pub fn message_of(tenant: &str, id: &str, chat: &str, ts_ms: i64, sender: &str, text: &str) -> String {
    let ts = chrono::DateTime::from_timestamp_millis(ts_ms).unwrap().format("%Y-%m-%dT%H:%M:%S%z").to_string();
    json!({"id": id, "tenant": tenant, "direction": "sent", "timestamp": ts,
        "account": {"full_name": "Amnon Haha", "email": "amnon@example.com", "phone": "+972500000000"},
        "chat": {"id": chat, "full_name": "John Doe", "responsible_name": "Amnon", "responsible_email": "amnon@example.com",
                 "url": format!("https://app.example.com/chat/{chat}/messages/"), "is_new_chat": true, "is_group": false, "phone": "+97254000000"},
        "sender": {"full_name": sender, "phone": "+972540000000"},
        "recipient": {"full_name": "Jane Smith", "phone": "+972550000000"},
        "text": text, "attachments": [], "permalink": format!("https://app.example.com/permalink/{chat}")})
    .to_string()
}

/// A `[[subscription]]` table for chat messages of `tenant`; `aggregation` "none" or a window.
pub fn chat_subscription(id: &str, tenant: &str, aggregation: &str, url: &str) -> String {
    format!(
        "[[subscription]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nsource = \"chat\"\ndialect = \"timelines\"\n\
         aggregation = \"{aggregation}\"\nurl = \"{url}\"\n"
    )
}

/// Starts the daemon in process on `clock` and waits until it is ready.
pub async fn start_on_clock(cfg: hookd::config::Config, clock: Arc<ManualClock>) -> (hookd::Running, CancellationToken) {
    let stop = CancellationToken::new();
    let running = hookd::start_with_clock(cfg, stop.clone(), clock).await.expect("daemon starts");
    let shared = running.shared.clone();
    wait_until(Duration::from_secs(30), "ready", || {
        let ok = shared.ready.all();
        async move { ok }
    })
    .await;
    (running, stop)
}

/// The requests to `path`, in arrival order.
pub fn requests_to(rx: &Receiver, path: &str) -> Vec<Recorded> {
    rx.requests().into_iter().filter(|r| r.path == path).collect()
}

/// The bodies of the requests to `/bundles`, parsed.
pub fn bundles(rx: &Receiver) -> Vec<Value> {
    requests_to(rx, "/bundles").iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

/// The `message_id`s of a bundle body, in its order.
pub fn message_ids(bundle: &Value) -> Vec<String> {
    bundle["messages"].as_array().expect("a bundle").iter().map(|m| m["message_id"].as_str().unwrap().to_string()).collect()
}

/// Waits until the `hookd_open_bundles` gauge reads `n`.
pub async fn wait_open_bundles(shared: &hookd::Shared, n: i64, secs: u64, what: &str) {
    wait_until(Duration::from_secs(secs), what, || {
        let open = shared.metrics.open_bundles.get();
        async move { open == n }
    })
    .await;
}

/// Waits until `hookd_chat_messages_bundled_total` reads `n`: that many messages are in
/// bundles in the window store (so none of them can miss its window when the clock moves).
pub async fn wait_bundled(shared: &hookd::Shared, n: u64, secs: u64) {
    wait_until(Duration::from_secs(secs), &format!("{n} messages in bundles"), || {
        let bundled = shared.metrics.chat_bundled.get();
        async move { bundled == n }
    })
    .await;
}

/// Waits until `hookd_bundles_emitted_total` reads `n`: the bundles' delivery records are
/// acknowledged (which can land after the receiver already got them).
pub async fn wait_emitted(shared: &hookd::Shared, n: u64, secs: u64) {
    wait_until(Duration::from_secs(secs), &format!("{n} bundles emitted"), || {
        let emitted = shared.metrics.bundles_emitted.get();
        async move { emitted == n }
    })
    .await;
}
