//! Kafka plumbing shared by the stages: client settings, topic creation, and producing
//! records that must not be lost (dead letters, deliveries) with a retry until the broker
//! acknowledges them.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

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

/// An idempotent producer: a broker retry cannot duplicate or reorder a record.
pub fn producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    let mut c = client_config(config);
    c.set("enable.idempotence", "true")
        .set("linger.ms", config.kafka.linger_ms.to_string())
        .set("compression.type", &config.kafka.compression)
        .set("message.timeout.ms", "30000");
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c.create()
}

/// A consumer config with explicit offset storing: offsets are stored only once a record's
/// work is finished (DESIGN section 2), then committed in the background.
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
        .set("partition.assignment.strategy", "range,roundrobin")
        // Prefetched records held by librdkafka (its default is 64 MiB): 16 MiB is a good
        // half second of input at full speed, and the rest of the memory goes to open bundles.
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c
}

/// Creates hookd's topics when missing. Existing topics are left as they are.
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
    let plain = [&t.crm_events, &t.chat_messages, &t.deliveries, &t.retry, &t.dlq, &t.notifications];
    let mut topics: Vec<NewTopic> = plain.iter().map(|name| NewTopic::new(name, parts, TopicReplication::Fixed(rf))).collect();
    topics.push(NewTopic::new(&t.subscriptions, parts, TopicReplication::Fixed(rf)).set("cleanup.policy", "compact"));
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

/// A record for `hookd.dlq`: the original bytes as the value (so it can be re-produced as it
/// is) and why, where and when in headers.
pub struct DeadLetter<'a> {
    pub original: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub reason: String,
    pub stage: &'static str,
    pub source: SourceRef,
    pub subscription_id: Option<&'a str>,
}

impl DeadLetter<'_> {
    pub fn headers(&self) -> OwnedHeaders {
        let partition = self.source.partition.to_string();
        let offset = self.source.offset.to_string();
        let at = chrono::Utc::now().to_rfc3339();
        let mut h = OwnedHeaders::new()
            .insert(Header { key: "hookd-dlq-reason", value: Some(self.reason.as_str()) })
            .insert(Header { key: "hookd-dlq-stage", value: Some(self.stage) })
            .insert(Header { key: "hookd-dlq-topic", value: Some(self.source.topic.as_str()) })
            .insert(Header { key: "hookd-dlq-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "hookd-dlq-offset", value: Some(offset.as_str()) })
            .insert(Header { key: "hookd-dlq-at", value: Some(at.as_str()) });
        if let Some(sub) = self.subscription_id {
            h = h.insert(Header { key: "hookd-dlq-subscription", value: Some(sub) });
        }
        h
    }
}

/// Produces until the broker acknowledges, backing off between failures; gives up only when
/// `shutdown` fires (the caller then leaves the source offset unstored, so the work is redone
/// after restart).
pub async fn produce_until_acked(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers.clone() {
            record = record.headers(h);
        }
        let error = tokio::select! {
            r = producer.send(record, Duration::from_secs(5)) => match r {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            },
            _ = shutdown.cancelled() => return Err(KafkaError::Canceled),
        };
        tracing::warn!(%error, topic, "Produce failed; retrying.");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Err(KafkaError::Canceled),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Writes one dead letter, acknowledged, and counts it.
pub async fn dead_letter(
    producer: &FutureProducer,
    config: &Config,
    metrics: &crate::telemetry::Metrics,
    letter: DeadLetter<'_>,
    shutdown: &CancellationToken,
) -> Result<(), KafkaError> {
    tracing::warn!(
        reason = %letter.reason, stage = letter.stage, topic = %letter.source.topic,
        partition = letter.source.partition, offset = letter.source.offset, "Record sent to the dead-letter topic."
    );
    produce_until_acked(producer, &config.topics.dlq, letter.key, letter.original, Some(letter.headers()), shutdown).await?;
    metrics.dlq_records.with_label_values(&[letter.stage]).inc();
    Ok(())
}

/// Partitions revoked and assigned by a rebalance, handed from the consumer's callback (which
/// runs on the polling thread) to the stage's loop, which forgets revoked partitions' state.
#[derive(Default)]
pub struct RebalanceLog {
    pub revoked: std::sync::Mutex<Vec<(String, i32)>>,
    pub assigned: std::sync::Mutex<Vec<(String, i32)>>,
    /// Partitions assigned at a position past their committed offset ([`Resume`]).
    pub resumed: std::sync::Mutex<Vec<Resumed>>,
}

/// Asks a stage where a newly assigned partition may resume with its local state intact: a
/// position below which every record is finished and kept in sled (DESIGN section 2: "seek past
/// what sled already applied"), or None to resume from the committed offset.
pub type Resume = Box<dyn Fn(&str, i32) -> Option<i64> + Send + Sync>;

/// A partition assigned past its committed offset: records `committed..settled` are not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    pub topic: String,
    pub partition: i32,
    pub committed: i64,
    pub settled: i64,
}

/// Consumer context that records rebalances in a [`RebalanceLog`] and, with a [`Resume`],
/// assigns partitions at the stage's settled position when it is past the committed offset.
pub struct TrackingContext {
    log: std::sync::Arc<RebalanceLog>,
    resume: Option<Resume>,
}

impl TrackingContext {
    pub fn new(log: std::sync::Arc<RebalanceLog>) -> Self {
        Self { log, resume: None }
    }

    /// Resumes assigned partitions where `resume` says, when that is past the committed offset.
    pub fn resuming(self, resume: Resume) -> Self {
        Self { resume: Some(resume), ..self }
    }

    /// Sets the offset of each assigned partition that has a settled position past its
    /// committed offset, so the assignment starts there. The committed offset itself is left
    /// as it is (it stays at the low-watermark, for a replay with state lost). A partition
    /// whose revocation the stage has not processed yet is left alone: its state is about to
    /// be dropped. Any doubt (committed offsets unreadable) means no seek, i.e. a replay.
    fn seek_past_settled(&self, consumer: &rdkafka::consumer::BaseConsumer<Self>, tpl: &mut rdkafka::TopicPartitionList) {
        use rdkafka::consumer::Consumer;
        let Some(resume) = &self.resume else { return };
        let mut wanted = rdkafka::TopicPartitionList::new();
        let mut settled = std::collections::HashMap::new();
        {
            let revoked = self.log.revoked.lock().expect("rebalance log poisoned");
            for e in tpl.elements() {
                let tp = (e.topic().to_string(), e.partition());
                if revoked.contains(&tp) {
                    continue;
                }
                if let Some(pos) = resume(&tp.0, tp.1) {
                    wanted.add_partition(&tp.0, tp.1);
                    settled.insert(tp, pos);
                }
            }
        }
        if settled.is_empty() {
            return;
        }
        let committed = match outside_worker(|| consumer.committed_offsets(wanted, Duration::from_secs(10))) {
            Ok(c) => c,
            Err(error) => return tracing::warn!(%error, "Committed offsets unreadable; resuming from them (replay)."),
        };
        let mut resumed = self.log.resumed.lock().expect("rebalance log poisoned");
        for e in committed.elements() {
            let tp = (e.topic().to_string(), e.partition());
            let (Some(&pos), rdkafka::Offset::Offset(committed)) = (settled.get(&tp), e.offset()) else { continue };
            if pos > committed && tpl.set_partition_offset(&tp.0, tp.1, rdkafka::Offset::Offset(pos)).is_ok() {
                tracing::info!(topic = %tp.0, partition = tp.1, committed, settled = pos, "Resuming past the committed offset; local state holds the rest.");
                resumed.push(Resumed { topic: tp.0, partition: tp.1, committed, settled: pos });
            }
        }
    }
}

/// Runs `f`, which blocks, from a consumer callback. librdkafka invokes the rebalance callback
/// synchronously inside the poll that `StreamConsumer::recv` makes, i.e. on a tokio worker;
/// on the multi-thread runtime `block_in_place` first hands that worker's other tasks to
/// another thread, so only the task polling this consumer waits (it cannot go on before the
/// assignment anyway). Without a runtime, or on a current-thread one (where `block_in_place`
/// would panic and there is no other thread to move to), `f` just runs.
fn outside_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl rdkafka::ClientContext for TrackingContext {}

impl rdkafka::consumer::ConsumerContext for TrackingContext {
    /// rdkafka's default rebalance (pre-rebalance, assign or unassign, post-rebalance), with
    /// the assignment's offsets set by [`TrackingContext::seek_past_settled`] first: assigning
    /// at an explicit offset is librdkafka's way to start a partition elsewhere than at its
    /// committed offset without a seek racing the first fetch.
    fn rebalance(
        &self,
        consumer: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut rdkafka::TopicPartitionList,
    ) {
        use rdkafka::consumer::{Consumer, Rebalance, RebalanceProtocol};
        use rdkafka::types::RDKafkaRespErr::{
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS as ASSIGN, RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS as REVOKE,
        };
        if err == ASSIGN {
            self.seek_past_settled(consumer, tpl);
        }
        let rebalance = match err {
            ASSIGN => Rebalance::Assign(tpl),
            REVOKE => Rebalance::Revoke(tpl),
            other => Rebalance::Error(KafkaError::Rebalance(other.into())),
        };
        self.pre_rebalance(consumer, &rebalance);
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match (err == ASSIGN, cooperative) {
            (true, true) => consumer.incremental_assign(tpl),
            (true, false) => consumer.assign(tpl),
            (false, true) => consumer.incremental_unassign(tpl),
            (false, false) => consumer.unassign(),
        };
        if let Err(error) = result {
            tracing::error!(%error, "Applying a rebalance failed.");
        }
        self.post_rebalance(consumer, &rebalance);
    }

    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let rdkafka::consumer::Rebalance::Revoke(tpl) = rebalance {
            let mut r = self.log.revoked.lock().expect("rebalance log poisoned");
            r.extend(tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())));
        }
    }

    fn post_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, rebalance: &rdkafka::consumer::Rebalance<'_>) {
        if let rdkafka::consumer::Rebalance::Assign(tpl) = rebalance {
            let mut a = self.log.assigned.lock().expect("rebalance log poisoned");
            a.extend(tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())));
        }
    }
}

/// A consumer whose revocations are logged.
pub type TrackedConsumer = rdkafka::consumer::StreamConsumer<TrackingContext>;

/// Stores `position` (the next offset to read) for commit. Storing for a partition no longer
/// assigned fails harmlessly.
pub fn store_position(consumer: &TrackedConsumer, topic: &str, partition: i32, position: i64) {
    use rdkafka::consumer::Consumer;
    let mut tpl = rdkafka::TopicPartitionList::new();
    if tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(position)).is_ok() {
        if let Err(error) = consumer.store_offsets(&tpl) {
            tracing::debug!(%error, topic, partition, "Offset not stored (partition no longer assigned).");
        }
    }
}

/// The final commit and the consumer's close (it leaves the group), off the runtime: both
/// block, the commit up to librdkafka's timeout.
pub async fn commit_and_close(consumer: TrackedConsumer, stage: &'static str) {
    let closed = tokio::task::spawn_blocking(move || {
        final_commit(&consumer, stage);
        drop(consumer);
    });
    if let Err(error) = closed.await {
        tracing::error!(%error, stage, "Closing the consumer failed.");
    }
}

/// Commits stored offsets synchronously at shutdown; "nothing stored since the last commit"
/// is the normal case, not an error.
pub fn final_commit(consumer: &TrackedConsumer, stage: &'static str) {
    use rdkafka::consumer::Consumer;
    match consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {
            tracing::info!(stage, "Finished offsets committed.");
        }
        Err(error) => tracing::warn!(%error, stage, "Final commit failed; the unfinished tail will be replayed."),
    }
}
