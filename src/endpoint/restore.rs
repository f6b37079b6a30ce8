//! Restoring endpoint state from the changelog when this instance takes over deliveries
//! partitions, and handing it over when it gives them up: the sender's rebalance hooks
//! ([`OwnerHooks`]), run inside the consumer's rebalance callback, so a partition is fetched
//! from only once its subscriptions' state is restored, and given up only once what this
//! instance wrote is in the changelog.
//!
//! A restore reads the changelog partition from its start to the end offset it had when the
//! restore began, keeps the last value of each key and replaces, per subscription found, what
//! the local store holds by it. A partition whose end offset is the one this instance last
//! wrote or restored (kept in sled tree `endpoint_changelog`) is not read: nobody else wrote
//! it since, and the local store is at least as new (a restart, or an eager rebalance that gave
//! the partition straight back).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sled::Batch;

use super::buffer::seq_key;
use super::changelog::{lock, thread_deadline, Changelog, Entry, SharedChangelog};
use super::logs::{failed_key, index_key, ord};
use super::state::{sub_key, tagged};
use super::EndpointStore;
use crate::kafka::offsets::Tp;

/// Why a restore did not finish.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("changelog not readable: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("changelog partitions {0:?} not read to their end within {1:?}")]
    Timeout(Vec<i32>, Duration),
    #[error("local store write failed: {0}")]
    Store(#[from] sled::Error),
}

/// What a restore did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Partitions read (the others were current).
    pub read: Vec<i32>,
    /// Changelog records read.
    pub records: u64,
    /// Subscriptions whose state was replaced.
    pub subscriptions: usize,
}

impl Changelog {
    /// Brings the local store up to the changelog for `partitions` (see the module), within
    /// `timeout`. Blocks: call it off the runtime's workers.
    pub fn restore(&self, store: &EndpointStore, partitions: &[i32], timeout: Duration) -> Result<Restored, RestoreError> {
        let consumer: BaseConsumer = self.client.create()?;
        let mut ends = HashMap::new();
        for &p in partitions {
            let (_, high) = consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(10))?;
            if lock(&self.known_end).get(&p) != Some(&high) {
                ends.insert(p, high);
            }
        }
        let mut read: Vec<i32> = ends.keys().copied().collect();
        read.sort_unstable();
        let (latest, records) = self.read_to_end(&consumer, &ends, timeout)?;
        let mut by_sub: HashMap<String, Vec<Entry>> = HashMap::new();
        for value in latest.into_values().flatten() {
            match Entry::decode(&value) {
                Some((sub, entry)) => by_sub.entry(sub).or_default().push(entry),
                None => tracing::warn!(topic = %self.topic, "Unreadable endpoint changelog record skipped."),
            }
        }
        let subscriptions = by_sub.len();
        for (sub, entries) in by_sub {
            store.replace(&sub, entries)?;
        }
        for (p, high) in ends {
            self.set_known_end(p, high);
        }
        Ok(Restored { read, records, subscriptions })
    }

    /// The last value of every key of `ends`' partitions, read up to each end offset.
    #[allow(clippy::type_complexity)]
    fn read_to_end(
        &self,
        consumer: &BaseConsumer,
        ends: &HashMap<i32, i64>,
        timeout: Duration,
    ) -> Result<(HashMap<Vec<u8>, Option<Vec<u8>>>, u64), RestoreError> {
        let mut left: Vec<i32> = ends.iter().filter(|e| *e.1 > 0).map(|e| *e.0).collect();
        let mut latest = HashMap::new();
        if left.is_empty() {
            return Ok((latest, 0));
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &left {
            tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut records = 0;
        while !left.is_empty() {
            if Instant::now() >= deadline {
                return Err(RestoreError::Timeout(left, timeout));
            }
            let Some(msg) = consumer.poll(Duration::from_millis(100)) else { continue };
            let msg = msg?;
            records += 1;
            latest.insert(msg.key().unwrap_or_default().to_vec(), msg.payload().map(<[u8]>::to_vec));
            if msg.offset() + 1 >= ends[&msg.partition()] {
                left.retain(|&p| p != msg.partition());
            }
        }
        Ok((latest, records))
    }
}

impl EndpointStore {
    /// Replaces everything the store holds about `sub` by `entries` (restored from the
    /// changelog; nothing of it is queued for the changelog again).
    pub(super) fn replace(&self, sub: &str, entries: Vec<Entry>) -> Result<(), sled::Error> {
        self.forget_local(sub)?;
        let _w = self.lock();
        let prefix = sub_key(sub);
        let (mut activity, mut requests, mut failed) = (Batch::default(), Batch::default(), Batch::default());
        let mut kept = 0u64;
        for entry in entries {
            match entry {
                Entry::State(bytes) => drop(self.state.insert(&prefix, bytes)?),
                Entry::Activity(seq, bytes) => activity.insert(seq_key(&prefix, seq), bytes),
                Entry::Request(seq, bytes) => requests.insert(seq_key(&prefix, seq), bytes),
                Entry::Failed { at_ms, id, record } => {
                    failed.insert(failed_key(sub, at_ms, id.as_bytes()), record);
                    failed.insert(index_key(sub, id.as_bytes()), &ord(at_ms));
                    kept += 1;
                }
            }
        }
        if kept > 0 {
            failed.insert(tagged(b'n', sub), &kept.to_be_bytes());
        }
        self.activity_log.tree().apply_batch(activity)?;
        self.request_log.tree().apply_batch(requests)?;
        self.failed.apply_batch(failed)
    }
}

/// The changelog of `config.topics.endpoint_state`, or None (endpoint state stays local, as
/// logged) when the topic is missing or its partitions are not those of `hookd.deliveries`:
/// the changelog partition of a subscription must be the number of its deliveries partition.
pub async fn open_changelog(
    config: &crate::config::Config,
    producer: rdkafka::producer::FutureProducer,
    metrics: crate::telemetry::Metrics,
    db: &sled::Db,
) -> Result<Option<SharedChangelog>, sled::Error> {
    let t = &config.topics;
    let client = crate::kafka::client_config(config);
    let (names, probe) = ([t.deliveries.clone(), t.endpoint_state.clone()], client.clone());
    // A metadata request blocks its thread (up to 10 s): on a blocking thread, not a worker.
    let counts = tokio::task::spawn_blocking(move || -> Result<Vec<Option<usize>>, rdkafka::error::KafkaError> {
        let c: BaseConsumer = probe.create()?;
        let md = c.fetch_metadata(None, Duration::from_secs(10))?;
        Ok(names
            .iter()
            .map(|n| md.topics().iter().find(|m| m.name() == n.as_str() && m.error().is_none()).map(|m| m.partitions().len()))
            .collect())
    })
    .await;
    let (deliveries, changelog) = match counts {
        Ok(Ok(c)) => (c[0], c[1]),
        Ok(Err(error)) => {
            tracing::error!(%error, topic = %t.endpoint_state, "Topic metadata unreadable; endpoint state stays local (not restored when a partition moves).");
            return Ok(None);
        }
        Err(_) => return Ok(None),
    };
    match (deliveries, changelog) {
        (Some(d), Some(c)) if d == c && d > 0 => {
            let mut restore = client;
            restore
                .set("group.id", format!("{}.endpoint-restore", config.kafka.group_id))
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest");
            let changelog = Changelog::new(t.endpoint_state.clone(), c as i32, producer, metrics, restore, db)?;
            tracing::info!(topic = %t.endpoint_state, partitions = c, "Endpoint state changelog in use.");
            Ok(Some(std::sync::Arc::new(changelog)))
        }
        (_, None) => {
            tracing::warn!(topic = %t.endpoint_state, "No endpoint state changelog topic; endpoint state stays local (not restored when a partition moves).");
            Ok(None)
        }
        (d, c) => {
            tracing::error!(
                topic = %t.endpoint_state, partitions = ?c, deliveries = %t.deliveries, deliveries_partitions = ?d,
                "The endpoint state changelog has not as many partitions as the deliveries topic; \
                 endpoint state stays local (not restored when a partition moves). Create it compacted with the deliveries' partition count."
            );
            Ok(None)
        }
    }
}

/// The sender's rebalance hooks: restore on assignment, hand over on revocation, for the
/// partitions of `hookd.deliveries`.
pub struct OwnerHooks {
    pub store: EndpointStore,
    pub changelog: SharedChangelog,
    pub deliveries: String,
    /// Bound of one restore (`kafka.max_poll_interval_ms` bounds the callback as a whole).
    pub restore_timeout: Duration,
}

/// How long a revocation waits for the changelog's acknowledgements.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

impl OwnerHooks {
    fn deliveries_partitions(&self, tps: &[Tp]) -> Vec<i32> {
        tps.iter().filter(|(t, _)| *t == self.deliveries).map(|(_, p)| *p).collect()
    }
}

impl crate::kafka::PartitionHooks for OwnerHooks {
    fn assigning(&self, tps: &[Tp]) {
        let partitions = self.deliveries_partitions(tps);
        if partitions.is_empty() {
            return;
        }
        let metrics = &self.changelog.metrics;
        let started = Instant::now();
        match self.changelog.restore(&self.store, &partitions, self.restore_timeout) {
            Ok(r) => {
                let seconds = started.elapsed().as_secs_f64();
                metrics.endpoint_restores.with_label_values(&["ok"]).inc();
                metrics.endpoint_restored_records.inc_by(r.records);
                metrics.endpoint_restore_duration.observe(seconds);
                tracing::info!(assigned = ?partitions, read = ?r.read, records = r.records, subscriptions = r.subscriptions, seconds, "Endpoint state restored from the changelog.");
            }
            Err(error) => {
                metrics.endpoint_restores.with_label_values(&["failed"]).inc();
                tracing::error!(%error, partitions = ?partitions, "Endpoint state not restored; the local state of these subscriptions is used.");
            }
        }
        self.changelog.take_ownership(&partitions);
        metrics.endpoint_partitions.set(self.changelog.owned_count() as i64);
    }

    fn revoking(&self, tps: &[Tp]) {
        let partitions = self.deliveries_partitions(tps);
        if partitions.is_empty() {
            return;
        }
        if let Err(error) = self.store.flush_logs() {
            tracing::error!(%error, "Writing the endpoint logs before a revocation failed.");
        }
        self.changelog.give_up(&partitions);
        self.changelog.metrics.endpoint_partitions.set(self.changelog.owned_count() as i64);
        let written = futures::executor::block_on(self.changelog.flush(thread_deadline(HANDOVER_TIMEOUT)));
        tracing::info!(revoked = ?partitions, written, left = self.changelog.queued(), "Endpoint state handed over to the changelog.");
    }
}
