//! Configuration: the TOML file of `hookd run --config FILE`.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key instead of a
//! silently ignored setting. Every field has a default (documented here and mirrored in
//! `config/hookd.toml`), so a file holding only the keys of DESIGN section 3 runs.
//! [`Config::validate`] does the cross-field checks serde cannot.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::render::{DialectConfig, Dialects};
use crate::route::subscription::Subscription;

/// A config file that could not be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub state: StateConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub delivery: DeliveryConfig,
    pub shutdown: ShutdownConfig,
    pub chat: ChatConfig,
    /// The customer portal, `[portal]` ([`crate::portal`]).
    pub portal: crate::portal::PortalConfig,
    /// Custom dialects, `[dialect.<name>]`, defined without a rebuild.
    pub dialect: BTreeMap<String, DialectConfig>,
    /// Static subscriptions, `[[subscription]]`; the subscriptions topic adds to them.
    pub subscription: Vec<Subscription>,
}

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

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_owned(), message },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks; returns the dialects it compiled on the way.
    pub fn validate(&self) -> Result<Dialects, ConfigError> {
        let invalid = |m: String| ConfigError::Invalid(m);
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers must not be empty".into()));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id must not be empty".into()));
        }
        if self.kafka.max_poll_interval_ms < self.kafka.session_timeout_ms {
            return Err(invalid("kafka.max_poll_interval_ms must be at least kafka.session_timeout_ms".into()));
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return Err(invalid("kafka.partitions and kafka.replication_factor must be at least 1".into()));
        }
        if !["none", "lz4", "zstd", "snappy", "gzip"].contains(&self.kafka.compression.as_str()) {
            return Err(invalid(format!("kafka.compression `{}` is not one of none, lz4, zstd, snappy, gzip", self.kafka.compression)));
        }
        if self.admin.token.is_empty() {
            return Err(invalid("admin.token must not be empty".into()));
        }
        if self.admin.produce_timeout_ms == 0 || self.admin.produce_timeout_ms > i32::MAX as u64 {
            // 0 would be librdkafka's "no timeout": the admin API would hang again.
            return Err(invalid("admin.produce_timeout_ms must be between 1 and 2147483647".into()));
        }
        crate::deliver::ssrf::TargetPolicy::new(&self.delivery.allow_private_targets)
            .map_err(|e| invalid(format!("delivery.allow_private_targets: {e}")))?;
        let d = &self.delivery;
        if d.max_in_flight == 0
            || d.per_subscription_concurrency == 0
            || d.per_subscription_queue == 0
            || d.per_subscription_rate_per_sec == 0
        {
            return Err(invalid(
                "delivery.max_in_flight, per_subscription_concurrency, per_subscription_queue and per_subscription_rate_per_sec must be at least 1".into(),
            ));
        }
        if self.ingest.max_in_flight == 0 || self.ingest.max_record_bytes == 0 {
            return Err(invalid("ingest.max_in_flight and ingest.max_record_bytes must be at least 1".into()));
        }
        if self.shutdown.deadline_ms < self.shutdown.grace_ms.saturating_add(15_000) {
            return Err(invalid(
                "shutdown.deadline_ms must be at least shutdown.grace_ms + 15000 (time for the final commits and closes)".into(),
            ));
        }
        crate::kafka::limits::validate(self).map_err(invalid)?;
        self.portal.validate().map_err(invalid)?;
        let dialects = Dialects::new(&self.dialect).map_err(|e| invalid(format!("dialect: {e}")))?;
        if self.chat.max_batch == 0 || self.chat.close_interval_ms == 0 || self.chat.batch_interval_ms == 0 {
            return Err(invalid("chat.max_batch, close_interval_ms and batch_interval_ms must be at least 1".into()));
        }
        if self.chat.max_bundle_bytes < MIN_BUNDLE_BYTES {
            return Err(invalid(format!(
                "chat.max_bundle_bytes must be at least {MIN_BUNDLE_BYTES} (a bundle's account, chat and link take about 1 KiB)"
            )));
        }
        let template = (!self.chat.summary_template.is_empty()).then_some(self.chat.summary_template.as_str());
        crate::render::timelines::Summary::new(template).map_err(|e| invalid(format!("chat.summary_template: {e}")))?;
        let mut seen = HashSet::new();
        for s in &self.subscription {
            s.validate().map_err(invalid)?;
            dialects.check(&s.dialect, s.format).map_err(|e| invalid(format!("subscription `{}`: {e}", s.id)))?;
            if !seen.insert(s.id.as_str()) {
                return Err(invalid(format!("subscription id `{}` appears twice", s.id)));
            }
        }
        Ok(dialects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"      # bootstrap servers
group_id = "hookd"
[state]
path = "data/hookd"             # sled directory
[admin]
listen = "127.0.0.1:9464"
token = "change-me"
[delivery]
allow_private_targets = []
"#;

    #[test]
    fn design_minimal_file_runs_with_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.kafka.partitions, 6);
        assert_eq!(c.topics.dlq, "hookd.dlq");
        assert_eq!(c.delivery.request_timeout_ms, 10_000);
        assert_eq!(c.admin.produce_timeout_ms, 10_000);
        assert!(c.subscription.is_empty());
        assert_eq!((c.chat.max_bundle_bytes, c.chat.max_bundle_messages), (524_288, 0));
        assert_eq!(c.chat.max_bundle_record_body_bytes(), 699_052, "base64 of 512 KiB, under 1,000,000 with room for the record");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[kafka]\nbrokerz = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("brokerz"), "{err}");
        let err = Config::parse("[nonsense]\n").unwrap_err().to_string();
        assert!(err.contains("nonsense"), "{err}");
    }

    #[test]
    fn cross_field_errors_are_clear() {
        let err = Config::parse("[delivery]\nallow_private_targets = [\"10.0.0.0/99\"]\n").unwrap_err().to_string();
        assert!(err.contains("allow_private_targets"), "{err}");
        let dup =
            "[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://x/\"\n[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://y/\"\n";
        assert!(Config::parse(dup).unwrap_err().to_string().contains("twice"));
        let no_timeout = Config::parse("[admin]\nproduce_timeout_ms = 0\n").unwrap_err().to_string();
        assert!(no_timeout.contains("admin.produce_timeout_ms"), "{no_timeout}");
        let small = Config::parse("[chat]\nmax_bundle_bytes = 1000\n").unwrap_err().to_string();
        assert!(small.contains("chat.max_bundle_bytes must be at least 4096"), "{small}");
        let bad_dialect = "[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://x/\"\ndialect=\"nope\"\n";
        assert!(Config::parse(bad_dialect).unwrap_err().to_string().contains("nope"));
    }

    #[test]
    fn every_shipped_config_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1, "no config files found in {}", dir.display());
    }
}
