//! The sections of the config file other than subscriptions and dialects: one struct each,
//! with its defaults (mirrored in `config/hookd.toml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Consumer group of the ingest stage; the sender uses `<group_id>.sender`.
    pub group_id: String,
    /// `client.id` sent to the broker, shown in its logs.
    pub client_id: String,
    /// Create missing topics at start-up.
    pub create_topics: bool,
    /// Partitions of topics hookd creates; partitions are the unit of scale-out.
    pub partitions: i32,
    /// Replication factor of topics hookd creates.
    pub replication_factor: i32,
    /// Consumer session timeout: how long a dead instance keeps its partitions.
    pub session_timeout_ms: u64,
    /// `max.poll.interval.ms`, which librdkafka also sends as the rebalance timeout: how long
    /// a rebalance may wait for members that do not rejoin. hookd polls continuously, so a
    /// short value costs nothing and lets a restarted instance take over its partitions
    /// quickly even on brokers that wait for the full rebalance timeout after a crash.
    pub max_poll_interval_ms: u64,
    /// How often stored offsets are committed.
    pub commit_interval_ms: u64,
    /// Producer batching delay (`linger.ms`): a little latency for larger batches. Under load
    /// librdkafka batches anyway while earlier requests are in flight, so 1 ms keeps the
    /// throughput and costs each of the two produce hops of a delivery at most 1 ms.
    pub linger_ms: u64,
    /// Consumer `fetch.wait.max.ms`: how long the broker may hold a fetch when there is no
    /// new data. Apache Kafka answers a waiting fetch as soon as data arrives, so this mostly
    /// paces idle fetches; measured at 1,000 events/s (docs/PERFORMANCE.md), 100 gave the
    /// lowest tail (10 was no better, librdkafka's 500 put up to a second on the broker's p99),
    /// so 100 is the default.
    pub fetch_wait_max_ms: u64,
    /// Producer compression (`none`, `lz4`, `zstd`, `snappy`, `gzip`).
    pub compression: String,
    /// The largest record hookd produces (the producer's `message.max.bytes`); hookd creates
    /// its topics with `max.message.bytes` just above it and warns at start-up about existing
    /// ones below. 2 MiB holds the delivery record of a body of `ingest.max_record_bytes`
    /// (1 MiB: 4/3 of it in base64, plus the envelope), checked by [`Config::validate`]
    /// ([`crate::kafka::limits`]). A larger record is dead-lettered as `too_large`.
    pub max_message_bytes: usize,
    /// Extra librdkafka properties for every client (TLS, SASL, ...), passed as given.
    pub librdkafka: BTreeMap<String, String>,
    /// Static group membership (`group.instance.id` of the ingest and sender consumers): an
    /// instance that restarts within `session_timeout_ms` gets its partitions back without a
    /// rebalance. Unique per instance of one group, stable across its restarts (a pod name of
    /// a StatefulSet); unset, every start is a new member.
    pub instance_id: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "hookd".into(),
            client_id: "hookd".into(),
            create_topics: true,
            partitions: 6,
            replication_factor: 1,
            session_timeout_ms: 10_000,
            max_poll_interval_ms: 30_000,
            commit_interval_ms: 1_000,
            linger_ms: 1,
            fetch_wait_max_ms: 100,
            compression: "lz4".into(),
            max_message_bytes: 2 << 20,
            librdkafka: BTreeMap::new(),
            instance_id: None,
        }
    }
}

/// Topic names; defaults are the wire contracts of DESIGN section 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    pub crm_events: String,
    pub chat_messages: String,
    pub subscriptions: String,
    pub deliveries: String,
    pub retry: String,
    pub dlq: String,
    pub notifications: String,
    /// Changelog of the endpoint state (compacted, as many partitions as `deliveries`): what
    /// the instance that takes over a subscription's partition restores (`src/endpoint/changelog.rs`).
    pub endpoint_state: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            crm_events: "crm.events".into(),
            chat_messages: "chat.messages".into(),
            subscriptions: "hookd.subscriptions".into(),
            deliveries: "hookd.deliveries".into(),
            retry: "hookd.retry".into(),
            dlq: "hookd.dlq".into(),
            notifications: "hookd.notifications".into(),
            endpoint_state: "hookd.endpoint-state".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// sled directory: a checkpoint, rebuilt from Kafka when lost or corrupt.
    pub path: PathBuf,
    /// sled's page cache in MiB (sled's own default is 1024): the bulk of hookd's memory
    /// with many open bundles; smaller means more disk reads when bundles are written and
    /// emitted.
    pub cache_mb: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self { path: "data/hookd".into(), cache_mb: 64 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/healthz`, `/readyz` and the admin API.
    pub listen: SocketAddr,
    /// Bearer token of the admin API (metrics and health are open).
    pub token: String,
    /// How long an admin call that writes to Kafka (enable, disable, replay) waits for the
    /// broker's acknowledgement before it answers 503. It is the admin producer's
    /// `message.timeout.ms`, so a record not acknowledged in time is dropped by librdkafka,
    /// not written later behind the caller's back.
    pub produce_timeout_ms: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9464".parse().expect("literal address"), token: "change-me".into(), produce_timeout_ms: 10_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Larger input records go to the dead-letter topic. Must leave room for the delivery
    /// record within `kafka.max_message_bytes` ([`crate::kafka::limits`]).
    pub max_record_bytes: usize,
    /// Records read but not yet finished; reading pauses above it (backpressure).
    pub max_in_flight: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self { max_record_bytes: 1 << 20, max_in_flight: 10_000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// CIDRs exempt from the SSRF guard, e.g. `["127.0.0.0/8"]`.
    pub allow_private_targets: Vec<String>,
    /// Whole-request timeout; a timeout is a failed, retried request.
    pub request_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Response body bytes kept for logs; the rest is not read.
    pub max_response_bytes: usize,
    /// Requests in flight across all subscriptions.
    pub max_in_flight: usize,
    /// Requests in flight to one subscription, so one slow endpoint can't take them all.
    pub per_subscription_concurrency: usize,
    /// Deliveries queued for one subscription, waiting as long as it takes for their turn.
    pub per_subscription_queue: usize,
    /// Further deliveries for one subscription that may queue beyond `per_subscription_queue`,
    /// each waiting at most `per_subscription_overflow_wait_ms` for its turn; beyond both, or
    /// after that wait, a delivery is deferred to the retry topic. Lets a fast endpoint absorb
    /// a burst without deferrals while a slow one still holds only its queue for long.
    pub per_subscription_overflow: usize,
    pub per_subscription_overflow_wait_ms: u64,
    /// Requests per second to one subscription (a subscription's `rate_limit_per_sec` wins).
    pub per_subscription_rate_per_sec: u32,
    /// How often a failed verification handshake is tried again.
    pub verification_retry_secs: u64,
    /// Upper bound on a `Retry-After` wait honoured from a response.
    pub retry_after_max_secs: u64,
    /// `User-Agent` of every request.
    pub user_agent: String,
    /// How often the activity and request logs (and success times) buffered in memory are
    /// written to sled in one batch. A graceful stop writes them too; `kill -9` loses at
    /// most this much of the logs (never failure counts or parked retries).
    pub log_flush_interval_ms: u64,
    /// Longest request body and response excerpt kept in a request log entry, in bytes; a
    /// longer one is cut (at a character boundary, `…` appended) and the entry says
    /// `truncated: true`. Bounds the request log (100 entries per subscription) in sled and
    /// in the changelog.
    pub log_body_max_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            allow_private_targets: Vec::new(),
            request_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            max_response_bytes: 4096,
            max_in_flight: 512,
            per_subscription_concurrency: 8,
            per_subscription_queue: 64,
            per_subscription_overflow: 1024,
            per_subscription_overflow_wait_ms: 1000,
            per_subscription_rate_per_sec: 100,
            verification_retry_secs: 300,
            retry_after_max_secs: 3600,
            user_agent: concat!("hookd/", env!("CARGO_PKG_VERSION")).into(),
            log_flush_interval_ms: 1000,
            log_body_max_bytes: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long in-flight requests may finish after SIGTERM before they are abandoned
    /// (abandoned ones are not committed and are sent again after restart).
    pub grace_ms: u64,
    /// The longest a stop may take from the first SIGTERM or ctrl-c: past it the process
    /// exits with status 1 whatever is still running (a consumer close stuck in librdkafka),
    /// like `kill -9`, which loses nothing. At least `grace_ms` + 15 s (the final commits,
    /// consumer closes and producer flush).
    pub deadline_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { grace_ms: 10_000, deadline_ms: 30_000 }
    }
}

/// Chat message bundling (subscriptions with `source = "chat"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatConfig {
    /// A window closes this long after its end, for messages still on their way.
    pub grace_ms: u64,
    /// How often closed windows are looked for.
    pub close_interval_ms: u64,
    /// Messages for bundles are written to sled in one batch per this many messages, or
    /// per `batch_interval_ms`, whichever comes first.
    pub max_batch: usize,
    pub batch_interval_ms: u64,
    /// minijinja template of the HTML `aggregation` summary; empty: the TimelinesAI one.
    /// Context: `messages` (each with `sender`, `text`, `timestamp`, `time`), `chat`,
    /// `account`, `permalink`, `link`. Auto-escaped as HTML.
    pub summary_template: String,
    /// Largest body of one bundle delivery, in bytes. A bundle that renders larger is
    /// delivered as consecutive parts, each a whole TimelinesAI bundle of its own messages
    /// with its own summary. In the delivery record the body is base64
    /// ([`ChatConfig::max_bundle_record_body_bytes`]), so the default keeps a part under the
    /// producer's 1,000,000-byte `message.max.bytes`.
    pub max_bundle_bytes: usize,
    /// At most this many messages per part as well; 0: no limit but the bytes.
    pub max_bundle_messages: usize,
}

/// The smallest `chat.max_bundle_bytes` accepted: a bundle's account, chat, link and JSON
/// keys alone take about 1 KiB, so a smaller cap would leave room for hardly any message.
pub const MIN_BUNDLE_BYTES: usize = 4_096;

impl Default for ChatConfig {
    fn default() -> Self {
        Self {
            grace_ms: 5_000,
            close_interval_ms: 250,
            max_batch: 500,
            batch_interval_ms: 20,
            summary_template: String::new(),
            max_bundle_bytes: 512 * 1024,
            max_bundle_messages: 0,
        }
    }
}

impl ChatConfig {
    /// What the body of the largest bundle part takes in its delivery record (base64, 4 bytes
    /// per 3): the record's other fields come on top, and the sum must fit the producer's and
    /// the topic's largest message.
    pub fn max_bundle_record_body_bytes(&self) -> usize {
        self.max_bundle_bytes.div_ceil(3) * 4
    }
}

impl ShutdownConfig {
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}
