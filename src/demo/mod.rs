//! `hookd demo`: the whole job in one command, nothing to install.
//!
//! Starts librdkafka's mock cluster in this process as the broker (it keeps nothing: every
//! record is gone when the demo stops), a local webhook receiver that prints what each
//! endpoint receives, and the daemon with subscriptions in several dialects (one of them
//! published to the `hookd.subscriptions` topic, the way a product adds them at run time).
//! Then it publishes sample CRM events taken from the seed documents, and a malformed one
//! that lands in the dead-letter topic. Runs until ctrl-c.

mod receiver;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

const EVENTS: &str = include_str!("events.jsonl");

/// The demo's configuration: a complete example of static subscriptions and a custom dialect.
fn demo_config(brokers: &str, receiver: SocketAddr, listen: SocketAddr, state: &std::path::Path) -> String {
    let r = format!("http://{receiver}");
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "hookd-demo"
partitions = 3
linger_ms = 1
[state]
path = "{state}"
[admin]
listen = "{listen}"
token = "demo-token"
[delivery]
allow_private_targets = ["127.0.0.0/8"]
[shutdown]
grace_ms = 2000
[chat]
grace_ms = 2000

[dialect.acme]
body = '{{"kind": {{{{ event_name | tojson }}}}, "account": {{{{ event.tenant | tojson }}}}, "at": {{{{ event.occurred_at_ms }}}}, "payload": {{{{ event.data | tojson }}}}}}'
[dialect.acme.events]
"contact.created" = "acme.person.new"
"ticket.created" = "acme.case.opened"

[[subscription]]
id = "antcrm-1260"
tenant = "1260"
url = "{r}/antcrm"
dialect = "antcrm"
events = ["contact.*", "deal.*", "ticket.*"]
secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[[subscription]]
id = "teamcrop-1260-xml"
tenant = "1260"
url = "{r}/teamcrop"
dialect = "teamcrop"
format = "xml"
events = ["order.*"]
headers = {{ "X-Api-Key" = "demo-key" }}

[[subscription]]
id = "doopage-1"
tenant = "1"
url = "{r}/doopage"
dialect = "doopage"

[[subscription]]
id = "whatsapp-bundles"
tenant = "ws-10010"
source = "chat"
aggregation = "10s"
url = "{r}/chat-bundles"

[[subscription]]
id = "whatsapp-each"
tenant = "ws-10010"
source = "chat"
url = "{r}/chat-each"

[[subscription]]
id = "acme-1260"
tenant = "1260"
url = "{r}/acme"
dialect = "acme"
events = ["contact.created", "ticket.created"]
"#,
        state = state.display()
    )
}

/// Chat messages shaped like the TimelinesAI sample, timed now, in two chats; one carries an
/// attachment and is skipped.
fn chat_messages() -> Vec<(String, String)> {
    let now = chrono::Utc::now();
    let lines = [
        ("10010001", "John Doe", "Jane Smith", "sent", "Hi! How are you?", false),
        ("10010001", "Jane Smith", "John Doe", "received", "I am fine, how are you? 😊", false),
        ("10010002", "Trần Thuận", "Amnon", "received", "Cho tôi báo giá <b>gói Pro</b> & phí vận chuyển", false),
        ("10010001", "John Doe", "Jane Smith", "sent", "photo.jpg", true),
    ];
    lines
        .iter()
        .enumerate()
        .map(|(i, (chat, from, to, direction, text, attachment))| {
            let ts = (now + chrono::Duration::seconds(i as i64)).format("%Y-%m-%dT%H:%M:%S%z").to_string();
            let attachments = if *attachment { serde_json::json!([{"type": "image", "url": "https://app.example.com/f/1.jpg"}]) } else { serde_json::json!([]) };
            let value = serde_json::json!({
                "id": format!("demo-msg-{i}"), "tenant": "ws-10010", "direction": direction, "timestamp": ts,
                "account": {"full_name": "Amnon Haha", "email": "amnon@example.com", "phone": "+972500000000"},
                "chat": {"id": chat, "full_name": from, "responsible_name": "Amnon", "responsible_email": "amnon@example.com",
                         "url": format!("https://app.example.com/chat/{chat}/messages/"), "is_new_chat": i == 0, "is_group": false, "phone": "+97254000000"},
                "sender": {"full_name": from, "phone": "+972540000000"},
                "recipient": {"full_name": to, "phone": "+972550000000"},
                "text": text, "attachments": attachments,
                "permalink": format!("https://app.example.com/permalink/{chat}-{i}")
            });
            (chat.to_string(), value.to_string())
        })
        .collect()
}

async fn produce(producer: &FutureProducer, topic: &str, key: &str, value: &str) -> anyhow::Result<()> {
    producer
        .send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(5))
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("producing to {topic}"))?;
    Ok(())
}

async fn wait_ready(listen: SocketAddr, shutdown: &CancellationToken) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if shutdown.is_cancelled() {
            anyhow::bail!("stopped before the daemon was ready");
        }
        if let Ok(r) = client.get(format!("http://{listen}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("daemon not ready after 30 s")
}

/// Runs the demo until `shutdown`.
pub async fn run(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).context("starting the embedded broker")?;
    let brokers = mock.bootstrap_servers();
    let receiver = receiver::start().await?;
    let state = tempfile::tempdir().context("creating a state directory")?;
    let text = demo_config(&brokers, receiver, listen, state.path());
    let config = Config::parse(&text)?;
    for t in [
        &config.topics.crm_events,
        &config.topics.chat_messages,
        &config.topics.subscriptions,
        &config.topics.deliveries,
        &config.topics.retry,
        &config.topics.dlq,
        &config.topics.notifications,
        &config.topics.endpoint_state,
    ] {
        mock.create_topic(t, 3, 1).with_context(|| format!("creating topic {t}"))?;
    }
    println!("hookd demo: embedded Kafka-protocol broker (librdkafka mock cluster, in memory, keeps nothing) at {brokers}");
    println!("hookd demo: webhook receiver at http://{receiver}; state in {}", state.path().display());
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
    // A subscription added at run time through the compacted topic, in the standard dialect.
    let standard = format!(
        r#"{{"id":"standard-1260","tenant":"1260","url":"http://{receiver}/standard","dialect":"standard","events":["*"],"secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}}"#
    );
    produce(&producer, &config.topics.subscriptions, "standard-1260", &standard).await?;

    let daemon_stop = shutdown.child_token();
    let daemon = tokio::spawn(crate::run(config.clone(), daemon_stop.clone()));
    wait_ready(listen, &shutdown).await?;
    println!("hookd demo: daemon ready; metrics at http://{listen}/metrics, health at /healthz and /readyz");
    for (i, line) in EVENTS.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        produce(&producer, &config.topics.crm_events, &format!("demo-{i}"), line).await?;
    }
    println!("hookd demo: published {} sample CRM events (the last one is malformed and goes to hookd.dlq)", EVENTS.lines().count());
    let chat = chat_messages();
    for (key, m) in &chat {
        produce(&producer, &config.topics.chat_messages, key, m).await?;
    }
    println!(
        "hookd demo: published {} WhatsApp messages: /chat-each gets each at once, /chat-bundles one bundle per chat when its 10 s window closes (+2 s grace); press ctrl-c to stop",
        chat.len()
    );
    shutdown.cancelled().await;
    let result = daemon.await.context("daemon task")?;
    drop(producer);
    tokio::time::sleep(Duration::from_millis(200)).await; // let the daemon's clients close first
    drop(mock);
    result.map_err(Into::into)
}
