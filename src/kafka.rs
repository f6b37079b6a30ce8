//! Kafka plumbing shared by the stages: the consumer-stage loop ingest and the sender run
//! ([`stage`]), which offset may be committed per partition ([`offsets`]), client settings,
//! topic creation, size limits ([`limits`]), producing records that must not be lost with a
//! retry until the broker acknowledges them or refuses them for good ([`produce`]), and dead
//! letters ([`dlq`]).

pub mod dlq;
pub mod limits;
pub mod offsets;
pub mod produce;
pub mod rebalance;
pub mod stage;

pub use dlq::{dead_letter, DeadLetter};
pub use produce::{produce_until_acked, PermanentReason, ProduceError};
pub use rebalance::{PartitionHooks, RebalanceLog, Resume, Resumed, TrackingContext};

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

use crate::config::Config;

/// Settings every client shares: brokers, client id and the operator's extra properties.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers).set("client.id", &config.kafka.client_id);
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c
}

/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_BYTES: usize = 1_000_000;

/// An idempotent producer: a broker retry cannot duplicate or reorder a record. Records over
/// `kafka.max_message_bytes` are refused locally ([`limits`]). `smallest_topic_limit` is the
/// smallest `max.message.bytes` of a topic hookd writes that is below what it needs
/// ([`limits::check_topics`]): batches are kept under it, so the broker refuses only a record
/// that is too large by itself, never a batch of small ones.
pub fn producer(config: &Config, smallest_topic_limit: Option<usize>) -> Result<FutureProducer, KafkaError> {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("linger.ms", config.kafka.linger_ms.to_string())
        .set("compression.type", &config.kafka.compression)
        .set("message.timeout.ms", "30000")
        .set("message.max.bytes", config.kafka.max_message_bytes.to_string());
    if let Some(limit) = smallest_topic_limit {
        c.set("batch.size", limit.clamp(1, DEFAULT_BATCH_BYTES).to_string());
    }
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c.create()
}

/// A consumer config with explicit offset storing: offsets are stored only once a record's
/// work is finished (DESIGN section 2), then committed in the background. Rebalances are
/// incremental (`cooperative-sticky`: only partitions that move are revoked, [`rebalance`]);
/// with `kafka.instance_id` the member is static (`group.instance.id`), so a restart within
/// `kafka.session_timeout_ms` moves nothing.
pub fn consumer_config(config: &Config, group_id: &str) -> ClientConfig {
    let mut c = client_config(config);
    c.set("group.id", group_id)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", config.kafka.commit_interval_ms.to_string())
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", config.kafka.session_timeout_ms.to_string())
        .set("max.poll.interval.ms", config.kafka.max_poll_interval_ms.to_string())
        .set("fetch.wait.max.ms", config.kafka.fetch_wait_max_ms.to_string())
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Prefetched records held by librdkafka (its default is 64 MiB): 16 MiB is a good
        // half second of input at full speed, and the rest of the memory goes to open bundles.
        .set("queued.max.messages.kbytes", "16384");
    if let Some(id) = config.kafka.instance_id.as_deref().filter(|id| !id.is_empty()) {
        c.set("group.instance.id", id);
    }
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c
}

/// Creates hookd's topics when missing, with `max.message.bytes` large enough for every
/// record the producer takes ([`limits::topic_limit_needed`]). Existing topics are left as
/// they are ([`limits::check_topics`] looks at their limit).
pub async fn ensure_topics(config: &Config) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = client_config(config).create()?;
    // A metadata request blocks its thread (up to 10 s): on a blocking thread, not a worker.
    let (admin, existing) = tokio::task::spawn_blocking(move || {
        let existing = existing_topics(admin.inner());
        (admin, existing)
    })
    .await
    .map_err(|_| KafkaError::Canceled)?;
    let existing = existing?;
    let t = &config.topics;
    let (parts, rf) = (config.kafka.partitions, config.kafka.replication_factor);
    let limit = limits::topic_limit_needed(config.kafka.max_message_bytes).to_string();
    let plain = [&t.crm_events, &t.chat_messages, &t.deliveries, &t.retry, &t.dlq, &t.notifications];
    let mut topics: Vec<NewTopic> = plain.iter().map(|name| NewTopic::new(name, parts, TopicReplication::Fixed(rf))).collect();
    for compacted in [&t.subscriptions, &t.endpoint_state] {
        topics.push(NewTopic::new(compacted, parts, TopicReplication::Fixed(rf)).set("cleanup.policy", "compact"));
    }
    let mut topics: Vec<NewTopic> = topics.into_iter().map(|nt| nt.set("max.message.bytes", &limit)).collect();
    topics.retain(|nt| !existing.contains(nt.name));
    if topics.is_empty() {
        return Ok(());
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))).request_timeout(Some(Duration::from_secs(15)));
    for result in admin.create_topics(&topics, &opts).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, partitions = parts, "Topic created."),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                tracing::error!(topic = %name, error = %code, "Topic creation failed.");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

/// Names of the topics the cluster has (with partitions). Blocks: call it off the runtime.
fn existing_topics<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Result<std::collections::HashSet<String>, KafkaError> {
    let md = client.fetch_metadata(None, Duration::from_secs(10))?;
    Ok(md.topics().iter().filter(|t| t.error().is_none() && !t.partitions().is_empty()).map(|t| t.name().to_string()).collect())
}

/// Where a record came from, for dead letters and logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A consumer whose revocations are logged.
pub type TrackedConsumer = rdkafka::consumer::StreamConsumer<TrackingContext>;

/// Stores `position` (the next offset to read) for commit, with the partition's read head as
/// metadata ([`rebalance::READ_HEAD`]). Storing for a partition no longer assigned fails
/// harmlessly.
pub fn store_position(consumer: &TrackedConsumer, topic: &str, partition: i32, position: i64) {
    use rdkafka::consumer::Consumer;
    let mut tpl = rdkafka::TopicPartitionList::new();
    if tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(position)).is_ok() {
        if let Some(mut e) = tpl.find_partition(topic, partition) {
            e.set_metadata(consumer.context().log().stored(topic, partition, position));
        }
        if let Err(error) = consumer.store_offsets(&tpl) {
            tracing::debug!(%error, topic, partition, "Offset not stored (partition no longer assigned).");
        }
    }
}

/// How long the final commit and the consumer's close may take together. librdkafka's close
/// waits for the group to be left and can wait for ever when a rebalance is stuck (rust-rdkafka
/// #509); past this bound hookd goes on stopping and leaves the close to the process's exit.
/// Nothing is lost: what was not committed is replayed after restart.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The final commit and the consumer's close (it leaves the group): [`close_detached`].
pub async fn commit_and_close(consumer: TrackedConsumer, stage: &'static str, metrics: &crate::telemetry::Metrics) {
    close_detached(stage, metrics, move || {
        final_commit(&consumer, stage);
        drop(consumer);
    })
    .await
}

/// Runs `close` (a consumer's final commit and drop, which block) on a thread of its own and
/// waits for it at most [`CLOSE_TIMEOUT`]. Not a `spawn_blocking` task: a runtime waits for
/// those when it is dropped, so a stuck close would hold the process (or a test) for ever; a
/// detached thread ends with the process. A failure or timeout is logged and counted.
pub async fn close_detached(stage: &'static str, metrics: &crate::telemetry::Metrics, close: impl FnOnce() + Send + 'static) {
    let (done, closed) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name(format!("{stage}-close")).spawn(move || {
        close();
        let _ = done.send(());
    });
    let failure = match spawned {
        Err(error) => Some(format!("thread not started: {error}")),
        Ok(_) => match tokio::time::timeout(CLOSE_TIMEOUT, closed).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some("the closing thread panicked".to_string()),
            Err(_) => Some(format!("not closed within {CLOSE_TIMEOUT:?}; stopping without waiting for it")),
        },
    };
    if let Some(error) = failure {
        metrics.kafka_errors.with_label_values(&["close"]).inc();
        tracing::error!(%error, stage, "Closing the consumer failed; uncommitted work is replayed after restart.");
    }
}

/// Commits stored offsets synchronously at shutdown; "nothing stored since the last commit"
/// is the normal case, not an error.
pub fn final_commit(consumer: &TrackedConsumer, stage: &'static str) {
    use rdkafka::consumer::Consumer;
    rebalance::store_read_heads(consumer, &consumer.context().log().stored_partitions(), false);
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::info!(stage, "Finished offsets committed.");
        }
        Err(error) => tracing::warn!(%error, stage, "Final commit failed; the unfinished tail will be replayed."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A close that never returns (librdkafka stuck in a rebalance) holds the stop for
    /// [`CLOSE_TIMEOUT`], not for ever, and is counted.
    #[tokio::test(start_paused = true)]
    async fn a_stuck_close_is_abandoned_after_the_timeout_and_counted() {
        let metrics = crate::telemetry::Metrics::new();
        let (_never, stuck) = std::sync::mpsc::channel::<()>();
        close_detached("ingest", &metrics, move || {
            let _ = stuck.recv_timeout(Duration::from_secs(3600));
        })
        .await;
        assert_eq!(metrics.kafka_errors.with_label_values(&["close"]).get(), 1);
    }

    #[tokio::test]
    async fn a_close_that_finishes_is_waited_for_and_not_an_error() {
        let metrics = crate::telemetry::Metrics::new();
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let c = closed.clone();
        close_detached("ingest", &metrics, move || {
            std::thread::sleep(Duration::from_millis(50));
            c.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .await;
        assert!(closed.load(std::sync::atomic::Ordering::SeqCst), "returned before the close finished");
        assert_eq!(metrics.kafka_errors.with_label_values(&["close"]).get(), 0);
    }
}
