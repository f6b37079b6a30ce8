//! Materialises the compacted `hookd.subscriptions` topic into the [`Registry`].
//!
//! Every instance reads all partitions from the beginning (no consumer group, nothing
//! committed): the topic is small and last-value-wins, so reading it whole is both the
//! start-up load and the compaction. Start-up waits until each partition's high watermark
//! has been reached, so no event is routed against a half-loaded set. An invalid value goes
//! to the dead-letter topic and leaves the previous version in place.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::subscription::Subscription;
use super::Change;
use crate::kafka::{dead_letter, DeadLetter, SourceRef};
use crate::render::Dialects;
use crate::Shared;

/// Decodes one record of the subscriptions topic. `Ok(None)` means: nothing to apply.
pub fn decode(key: Option<&[u8]>, value: Option<&[u8]>, dialects: &Dialects) -> Result<Change, String> {
    let Some(value) = value else {
        let key = key.ok_or("tombstone without a key")?;
        let id = std::str::from_utf8(key).map_err(|_| "key is not UTF-8")?;
        return Ok(Change::Delete(id.to_string()));
    };
    let sub: Subscription = serde_json::from_slice(value).map_err(|e| format!("invalid subscription: {e}"))?;
    sub.validate()?;
    dialects.check(&sub.dialect, sub.format).map_err(|e| format!("subscription `{}`: {e}", sub.id))?;
    if let Some(k) = key {
        if k != sub.id.as_bytes() {
            return Err(format!("record key `{}` differs from subscription id `{}`", String::from_utf8_lossy(k), sub.id));
        }
    }
    Ok(Change::Upsert(sub))
}

/// Assigns every partition of the topic from the beginning; returns each partition's end.
/// The metadata and watermark requests block their thread (up to 10 s each), so this runs on
/// a blocking thread, not a runtime worker.
async fn assign_all(consumer: &Arc<StreamConsumer>, topic: &str) -> Result<Vec<(i32, i64)>, rdkafka::error::KafkaError> {
    let (consumer, topic) = (consumer.clone(), topic.to_string());
    tokio::task::spawn_blocking(move || assign_all_blocking(&consumer, &topic)).await.map_err(|_| rdkafka::error::KafkaError::Canceled)?
}

fn assign_all_blocking(consumer: &StreamConsumer, topic: &str) -> Result<Vec<(i32, i64)>, rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    if let Some(code) = md.topics().iter().find_map(|t| t.error()).filter(|_| partitions.is_empty()) {
        // Not (yet) in the broker's metadata: just created, or not created at all.
        return Err(rdkafka::error::KafkaError::MetadataFetch(code.into()));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = Vec::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            ends.push((p, high));
        }
    }
    consumer.assign(&tpl)?;
    Ok(ends)
}

/// [`assign_all`] until it succeeds or `shutdown`: right after the topic was created its
/// partitions may have no leader yet (`NotLeaderForPartition`, `LeaderNotAvailable`), and a
/// broker may be restarting. Each failure is logged and counted; None means shutdown.
async fn assign_with_retry(
    shared: &Shared,
    consumer: &Arc<StreamConsumer>,
    topic: &str,
    shutdown: &CancellationToken,
) -> Option<Vec<(i32, i64)>> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match assign_all(consumer, topic).await {
            Ok(ends) => return Some(ends),
            Err(error) => {
                shared.metrics.kafka_errors.with_label_values(&["subscriptions"]).inc();
                tracing::warn!(%error, topic, retry_in_ms = backoff.as_millis() as u64, "Subscriptions topic not readable yet; retrying.");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Reads the topic until `shutdown`; fires `loaded` once the start-up read is complete.
pub async fn run(shared: Arc<Shared>, loaded: tokio::sync::oneshot::Sender<()>, shutdown: CancellationToken) -> Result<(), crate::Error> {
    let config = &shared.config;
    let mut cc = crate::kafka::client_config(config);
    cc.set("group.id", format!("{}.subscriptions", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: Arc<StreamConsumer> = Arc::new(cc.create()?);
    read(&shared, &consumer, loaded, &shutdown).await;
    crate::kafka::close_detached("subscriptions", &shared.metrics, move || drop(consumer)).await;
    Ok(())
}

async fn read(shared: &Shared, consumer: &Arc<StreamConsumer>, loaded: tokio::sync::oneshot::Sender<()>, shutdown: &CancellationToken) {
    let config = &shared.config;
    let topic = config.topics.subscriptions.clone();
    let Some(mut remaining) = assign_with_retry(shared, consumer, &topic, shutdown).await else { return };
    let mut loaded = Some(loaded);
    let mut batch = Vec::new();
    loop {
        if remaining.is_empty() {
            if let Some(tx) = loaded.take() {
                let n = shared.registry.apply(batch.drain(..));
                shared.metrics.subscriptions.set(n as i64);
                tracing::info!(subscriptions = n, "Subscriptions loaded.");
                let _ = tx.send(());
            }
        }
        let msg = tokio::select! {
            m = consumer.recv() => m,
            _ = shutdown.cancelled() => return,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(error) => {
                shared.metrics.kafka_errors.with_label_values(&["subscriptions"]).inc();
                tracing::warn!(%error, topic, "Subscriptions read failed.");
                continue;
            }
        };
        let (partition, offset) = (msg.partition(), msg.offset());
        remaining.retain(|(p, end)| !(*p == partition && offset + 1 >= *end));
        match decode(msg.key(), msg.payload(), &shared.dialects) {
            Ok(change) => batch.push(change),
            Err(reason) => {
                let letter = DeadLetter {
                    original: msg.payload().unwrap_or_default(),
                    key: msg.key(),
                    reason,
                    stage: "subscriptions",
                    source: SourceRef { topic: topic.clone(), partition, offset },
                    subscription_id: None,
                };
                let _ = dead_letter(&shared.producer, config, &shared.metrics, letter, shutdown).await;
            }
        }
        if loaded.is_none() && !batch.is_empty() {
            let n = shared.registry.apply(batch.drain(..));
            shared.metrics.subscriptions.set(n as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_upserts_tombstones_and_refuses_bad_values() {
        let d = Dialects::new(&Default::default()).unwrap();
        let ok = br#"{"id":"s1","tenant":"t","url":"https://h.example/x","dialect":"antcrm"}"#;
        assert!(matches!(decode(Some(b"s1"), Some(ok), &d), Ok(Change::Upsert(s)) if s.id == "s1"));
        assert!(matches!(decode(Some(b"s1"), None, &d), Ok(Change::Delete(id)) if id == "s1"));
        assert!(decode(None, None, &d).unwrap_err().contains("tombstone"));
        assert!(decode(Some(b"other"), Some(ok), &d).unwrap_err().contains("differs"));
        let bad_dialect = br#"{"id":"s1","tenant":"t","url":"https://h.example/x","dialect":"nope"}"#;
        assert!(decode(Some(b"s1"), Some(bad_dialect), &d).unwrap_err().contains("nope"));
        assert!(decode(Some(b"s1"), Some(b"{"), &d).unwrap_err().contains("invalid subscription"));
        let bad_zone =
            br#"{"id":"s1","tenant":"t","url":"https://h.example/x","source":"chat","aggregation":"24h","timezone":"Asia/Saigon City"}"#;
        let reason = decode(Some(b"s1"), Some(bad_zone), &d).unwrap_err();
        assert!(reason.starts_with("invalid subscription: unknown time zone `Asia/Saigon City`"), "{reason}");
    }
}
