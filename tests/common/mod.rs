//! Helpers shared by the integration tests: a real broker (librdkafka's mock cluster in
//! process, or an Apache Kafka process: [`kafka`]), a real HTTP receiver, a daemon started in process, and
//! polling waits instead of fixed sleeps.
#![allow(dead_code)]

pub mod api;
pub mod chat;
pub mod kafka;
pub mod metrics;
pub mod portal;
pub mod process;
pub mod receiver;
pub mod smtp;

use std::future::Future;
use std::time::{Duration, Instant};

use hookd::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

pub const TOPICS: [&str; 7] =
    ["crm.events", "chat.messages", "hookd.subscriptions", "hookd.deliveries", "hookd.retry", "hookd.dlq", "hookd.notifications"];

/// The endpoint state changelog (not in [`TOPICS`]: a topic hookd reads only on assignment).
pub const CHANGELOG: &str = "hookd.endpoint-state";

/// An in-process broker with hookd's topics and the endpoint state changelog (3 partitions each).
pub fn mock_broker() -> (MockCluster<'static, DefaultProducerContext>, String) {
    let mock = MockCluster::new(1).expect("mock cluster");
    for t in TOPICS.into_iter().chain([CHANGELOG]) {
        mock.create_topic(t, 3, 1).expect("create topic");
    }
    let brokers = mock.bootstrap_servers();
    (mock, brokers)
}

/// A config for tests: loopback allowed, admin on an ephemeral port, short grace, fast
/// commits; `extra` is appended (subscriptions, dialects).
pub fn config(brokers: &str, state: &std::path::Path, extra: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "hookd-test"
partitions = 3
commit_interval_ms = 200
linger_ms = 1
session_timeout_ms = 6000
[state]
path = "{}"
[admin]
listen = "127.0.0.1:0"
token = "t"
[delivery]
allow_private_targets = ["127.0.0.0/8"]
request_timeout_ms = 2000
[shutdown]
grace_ms = 3000
{extra}
"#,
        state.display()
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// Starts the daemon in process and waits until it is ready.
pub async fn start_daemon(config: Config) -> (hookd::Running, CancellationToken) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let stop = CancellationToken::new();
    let running = hookd::start(config, stop.clone()).await.expect("daemon starts");
    let shared = running.shared.clone();
    wait_until(Duration::from_secs(30), "daemon ready", || {
        let s = shared.clone();
        async move { s.ready.all() }
    })
    .await;
    (running, stop)
}

/// Polls `cond` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new().set("bootstrap.servers", brokers).set("linger.ms", "1").create().expect("producer")
}

pub async fn produce(p: &FutureProducer, topic: &str, key: &str, value: Option<&str>) {
    let mut r: FutureRecord<'_, str, str> = FutureRecord::to(topic).key(key);
    if let Some(v) = value {
        r = r.payload(v);
    }
    p.send(r, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
}

/// [`produce`] to one given partition.
pub async fn produce_to(p: &FutureProducer, topic: &str, partition: i32, key: &str, value: &str) {
    let r: FutureRecord<'_, str, str> = FutureRecord::to(topic).partition(partition).key(key).payload(value);
    p.send(r, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
}

/// Reads a consumer group's committed offsets, as an operator's tool would (the reader does
/// not join the group).
pub struct GroupOffsets(BaseConsumer);

impl GroupOffsets {
    pub fn new(brokers: &str, group: &str) -> Self {
        let c = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        Self(c)
    }

    /// The committed offset of each of `partitions` of `topic`; None where nothing is committed.
    pub fn committed(&self, topic: &str, partitions: &[i32]) -> Vec<Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(topic, *p);
        }
        let got = self.0.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        let offset = |p: i32| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        partitions.iter().map(|p| offset(*p)).collect()
    }
}

/// Produces one record and returns where it landed: (partition, offset).
pub async fn produce_at(p: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> (i32, i64) {
    let r: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key).payload(value);
    let d = p.send(r, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
    (d.partition, d.offset)
}

/// The offset `group` has committed for one partition, if any (read off the async threads).
pub async fn committed_offset(brokers: &str, group: &str, topic: &str, partition: i32) -> Option<i64> {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || GroupOffsets::new(&brokers, &group).committed(&topic, &[partition])[0])
        .await
        .expect("committed offsets read")
}

/// Waits until `group` has committed past `offset` of the partition: every record up to it
/// is finished.
pub async fn wait_committed_past(brokers: &str, group: &str, topic: &str, partition: i32, offset: i64) {
    wait_until(Duration::from_secs(30), &format!("{group} committed past {topic}/{partition}@{offset}"), || async move {
        committed_offset(brokers, group, topic, partition).await.is_some_and(|c| c > offset)
    })
    .await;
}

/// A CRM event in the wire shape of DESIGN section 3.
pub fn crm_event(id: &str, tenant: &str, event_type: &str, data: serde_json::Value) -> String {
    serde_json::json!({"id": id, "tenant": tenant, "type": event_type, "occurred_at": 1618118040123i64, "data": data}).to_string()
}

/// Reads every record of `topic` from the beginning until at least `n` arrived or `timeout`.
pub fn read_topic(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
    }
    c.assign(&tpl).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && start.elapsed() < timeout {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// A header of a consumed record as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Writes `dir/hookd.toml` for the `hookd` binary on a real broker: `topics`' names and group
/// (topics created by the test), state in `dir/state`, admin on `admin_port`, loopback targets
/// allowed, fast commits, a 6 s session and a 5 s grace. `delivery` adds lines to `[delivery]`;
/// `extra` adds tables (subscriptions, `[chat]`).
pub fn write_e2e_config(
    dir: &std::path::Path,
    brokers: &str,
    topics: &kafka::Topics,
    admin_port: u16,
    delivery: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("hookd.toml");
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
create_topics = false
commit_interval_ms = 200
session_timeout_ms = 6000
[state]
path = "{state}"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "t"
[delivery]
allow_private_targets = ["127.0.0.0/8"]
{delivery}
[shutdown]
grace_ms = 5000
{extra}
{topics_toml}"#,
        group = topics.group_id,
        state = dir.join("state").display(),
        topics_toml = topics.toml(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts the `hookd` binary with `run --config <config>`, its log in `log`
/// (`HOOKD_E2E_LOG` sets `RUST_LOG`, default `info`).
pub fn spawn_hookd(config: &std::path::Path, log: &std::path::Path) -> process::Hookd {
    process::Hookd::spawn(config, log)
}
