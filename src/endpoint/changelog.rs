//! The endpoint state's changelog (Kafka Streams' changelog-backed state store): sled is the
//! local copy, the compacted topic `topics.endpoint_state` is the truth that follows a
//! subscription to the instance its partition moves to (docs/DESIGN-NOTES.md, "Endpoint
//! state follows its subscription").
//!
//! - One record key per subscription and slot: `<sub>/state`, `<sub>/activity/<seq % 10>`,
//!   `<sub>/requests/<seq % 100>`, `<sub>/failed/<delivery id>`; compaction keeps the latest
//!   value of each, i.e. exactly the state, the 10 latest actions, the 100 latest requests and
//!   the kept failed deliveries. A tombstone removes a failed delivery (replayed, or dropped
//!   beyond the bound) and everything of a forgotten subscription.
//! - The value is self-describing ([`Entry`]): the subscription id and what the slot holds, so
//!   a restore never parses keys.
//! - Partition: the one librdkafka's default partitioner gives the subscription id in
//!   `hookd.deliveries` ([`partition_for`]), so the changelog partition of a subscription is
//!   the number of the deliveries partition that owns it.
//! - Only the owner writes: changes are kept for the changelog only for subscriptions whose
//!   deliveries partition this instance holds ([`Changelog::owns`]); a non-owner's local writes
//!   (an admin call that reached it) stay local.
//! - Writes go to sled at once and are queued here, last value per key, and produced by
//!   [`Changelog::flush`] with the endpoint logs' flush (`delivery.log_flush_interval_ms`), so
//!   the delivery path never waits for Kafka. A failed produce is logged, counted and queued
//!   again unless a newer value is waiting; one Kafka refuses for good is dropped.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};

use super::state::sub_key;
use crate::kafka::PermanentReason;
use crate::telemetry::Metrics;

/// Wire version of [`Entry`] values.
const VERSION: u8 = 1;

/// What one changelog slot holds, with the bytes the local store keeps for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// [`super::EndpointState`] JSON.
    State(Vec<u8>),
    /// Sequence number and [`super::Activity`] JSON.
    Activity(u64, Vec<u8>),
    /// Sequence number and [`super::RequestLog`] JSON.
    Request(u64, Vec<u8>),
    /// A failed delivery kept for replay: when it was kept, its id, the delivery record.
    Failed { at_ms: i64, id: String, record: Vec<u8> },
}

impl Entry {
    /// The record key of this entry of `sub` (see the module).
    pub fn key(&self, sub: &str) -> String {
        match self {
            Entry::State(_) => state_key(sub),
            Entry::Activity(seq, _) => slot_key(sub, "activity", seq % super::ACTIVITY_KEPT as u64),
            Entry::Request(seq, _) => slot_key(sub, "requests", seq % super::REQUESTS_KEPT as u64),
            Entry::Failed { id, .. } => failed_key(sub, id),
        }
    }

    /// `version, tag, S (u32 BE length + id), n (u64 BE), [u32 BE length + delivery id], bytes`.
    pub fn encode(&self, sub: &str) -> Vec<u8> {
        let (tag, n, id, bytes): (u8, u64, Option<&str>, &[u8]) = match self {
            Entry::State(b) => (b's', 0, None, b),
            Entry::Activity(seq, b) => (b'a', *seq, None, b),
            Entry::Request(seq, b) => (b'r', *seq, None, b),
            Entry::Failed { at_ms, id, record } => (b'f', *at_ms as u64, Some(id), record),
        };
        let mut v = Vec::with_capacity(2 + 4 + sub.len() + 8 + id.map_or(0, |i| 4 + i.len()) + bytes.len());
        v.extend_from_slice(&[VERSION, tag]);
        v.extend_from_slice(&sub_key(sub));
        v.extend_from_slice(&n.to_be_bytes());
        if let Some(id) = id {
            v.extend_from_slice(&sub_key(id));
        }
        v.extend_from_slice(bytes);
        v
    }

    /// The subscription and entry of a value; None when it is not one [`Self::encode`] wrote.
    pub fn decode(v: &[u8]) -> Option<(String, Entry)> {
        let (&version, &tag, rest) = (v.first()?, v.get(1)?, &v[2..]);
        if version != VERSION {
            return None;
        }
        let (sub, rest) = take_str(rest)?;
        let n = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
        let rest = &rest[8..];
        let entry = match tag {
            b's' => Entry::State(rest.to_vec()),
            b'a' => Entry::Activity(n, rest.to_vec()),
            b'r' => Entry::Request(n, rest.to_vec()),
            b'f' => {
                let (id, record) = take_str(rest)?;
                Entry::Failed { at_ms: n as i64, id, record: record.to_vec() }
            }
            _ => return None,
        };
        Some((sub, entry))
    }
}

fn take_str(b: &[u8]) -> Option<(String, &[u8])> {
    let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let s = std::str::from_utf8(b.get(4..4 + len)?).ok()?.to_string();
    Some((s, &b[4 + len..]))
}

pub fn state_key(sub: &str) -> String {
    format!("{sub}/state")
}

pub fn slot_key(sub: &str, log: &str, slot: u64) -> String {
    format!("{sub}/{log}/{slot}")
}

pub fn failed_key(sub: &str, delivery_id: &str) -> String {
    format!("{sub}/failed/{delivery_id}")
}

/// The partition librdkafka's default partitioner (`consistent_random`: CRC-32 of the key
/// modulo the partition count) gives a record keyed by `sub` in a topic of `partitions`.
pub fn partition_for(sub: &str, partitions: i32) -> i32 {
    (crc32fast::hash(sub.as_bytes()) % partitions.max(1) as u32) as i32
}

/// A value waiting for the changelog: its partition, the value (None: tombstone) and its
/// generation (newer changes of the same key have higher ones).
struct Queued {
    partition: i32,
    value: Option<Vec<u8>>,
    generation: u64,
}

#[derive(Default)]
struct Queue {
    by_key: HashMap<String, Queued>,
    next_generation: u64,
}

/// The changelog's writer side and the partitions this instance owns; restores are in
/// `restore.rs`. Shared by every clone of the store.
pub struct Changelog {
    pub(super) topic: String,
    /// Partitions of the changelog, equal to those of `hookd.deliveries`.
    pub(super) partitions: i32,
    producer: FutureProducer,
    pub(super) metrics: Metrics,
    /// Client settings for the restore consumer.
    pub(super) client: rdkafka::ClientConfig,
    /// Deliveries partitions held by this instance's sender: their subscriptions' changes are
    /// written to the changelog.
    owned: Mutex<HashSet<i32>>,
    queue: Mutex<Queue>,
    /// One flush at a time: a value and the one queued after it reach a partition in order.
    flushing: tokio::sync::Mutex<()>,
    /// Per partition, the changelog's end offset as far as this instance knows it (after its
    /// own acknowledged writes or a restore); kept in sled by `restore.rs`.
    pub(super) known_end: Mutex<HashMap<i32, i64>>,
    /// Tree `endpoint_changelog`: partition (i32 BE) → known end offset (i64 BE).
    meta: sled::Tree,
}

/// Locks a mutex whose holder may have panicked (the data stays usable).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Changelog {
    /// The changelog `topic` of `partitions` partitions, written with `producer`, read for
    /// restores with `client` (brokers and security set); the known end offsets are kept in
    /// `db`.
    pub fn new(
        topic: String,
        partitions: i32,
        producer: FutureProducer,
        metrics: Metrics,
        client: rdkafka::ClientConfig,
        db: &sled::Db,
    ) -> Result<Self, sled::Error> {
        let meta = db.open_tree("endpoint_changelog")?;
        let mut known = HashMap::new();
        for kv in meta.iter() {
            let (k, v) = kv?;
            if let (Ok(p), Ok(end)) = (<[u8; 4]>::try_from(&k[..]), <[u8; 8]>::try_from(&v[..])) {
                known.insert(i32::from_be_bytes(p), i64::from_be_bytes(end));
            }
        }
        Ok(Self {
            topic,
            partitions,
            producer,
            metrics,
            client,
            owned: Mutex::default(),
            queue: Mutex::default(),
            flushing: tokio::sync::Mutex::new(()),
            known_end: Mutex::new(known),
            meta,
        })
    }

    /// Records the changelog's end offset of `partition` as this instance knows it (in memory
    /// and sled; a failed write only costs a full restore later).
    pub(super) fn set_known_end(&self, partition: i32, end: i64) {
        lock(&self.known_end).insert(partition, end);
        if let Err(error) = self.meta.insert(partition.to_be_bytes(), &end.to_be_bytes()) {
            tracing::warn!(%error, partition, "Changelog end offset not kept; the partition is restored in full next time.");
        }
    }

    /// Moves the known end of `partition` over this instance's own records at `offsets`, as
    /// long as they follow it without a gap: a gap is another writer's record (an old owner's
    /// late handover), which a restore must read.
    fn advance_known_end(&self, partition: i32, mut offsets: Vec<i64>) {
        let Some(mut end) = lock(&self.known_end).get(&partition).copied() else { return };
        offsets.sort_unstable();
        for o in offsets {
            if o != end {
                return;
            }
            end += 1;
        }
        self.set_known_end(partition, end);
    }

    /// Deliveries partitions this instance owns the endpoint state of.
    pub fn owned_count(&self) -> usize {
        lock(&self.owned).len()
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether this instance owns `sub`'s partition, i.e. writes its changes to the changelog.
    pub fn owns(&self, sub: &str) -> bool {
        lock(&self.owned).contains(&partition_for(sub, self.partitions))
    }

    pub(super) fn take_ownership(&self, partitions: &[i32]) {
        lock(&self.owned).extend(partitions);
    }

    pub(super) fn give_up(&self, partitions: &[i32]) {
        let mut owned = lock(&self.owned);
        for p in partitions {
            owned.remove(p);
        }
    }

    /// Queues a value (or a tombstone, `None`) of `sub` for the next flush, when this instance
    /// owns it; a queued older value of the key is replaced.
    pub(super) fn queue(&self, sub: &str, key: String, value: Option<Vec<u8>>) {
        let partition = partition_for(sub, self.partitions);
        if !lock(&self.owned).contains(&partition) {
            return;
        }
        let mut q = lock(&self.queue);
        q.next_generation += 1;
        let generation = q.next_generation;
        q.by_key.insert(key, Queued { partition, value, generation });
    }

    /// Values waiting for the next flush.
    pub fn queued(&self) -> usize {
        lock(&self.queue).by_key.len()
    }

    /// Produces every queued value and waits for the acknowledgements until `deadline`
    /// resolves; what failed for a transient reason or was not acknowledged by then is queued
    /// again (unless a newer value of its key is waiting). Returns the records written.
    pub async fn flush(&self, deadline: impl Future<Output = ()>) -> usize {
        tokio::pin!(deadline);
        let _one = tokio::select! {
            biased;
            one = self.flushing.lock() => one,
            _ = &mut deadline => return 0,
        };
        let taken: Vec<(String, Queued)> = lock(&self.queue).by_key.drain().collect();
        if taken.is_empty() {
            return 0;
        }
        let mut sent = Vec::with_capacity(taken.len());
        let mut failed = Vec::new();
        for (key, q) in taken {
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic).key(key.as_str()).partition(q.partition);
            if let Some(v) = &q.value {
                record = record.payload(v.as_slice());
            }
            let result = self.producer.send_result(record).map_err(|(error, _)| error);
            match result {
                Ok(delivery) => sent.push((key, q, delivery)),
                Err(error) => failed.push((key, q, Some(error))),
            }
        }
        let acks = futures::future::join_all(sent.iter_mut().map(|(_, _, d)| d));
        let settled = tokio::select! {
            biased;
            acks = acks => Some(acks),
            _ = &mut deadline => None,
        };
        let (mut written, mut ends) = (0, HashMap::new());
        match settled {
            Some(acks) => {
                for ((key, q, _), ack) in sent.into_iter().zip(acks) {
                    match ack {
                        Ok(Ok(delivery)) => {
                            written += 1;
                            ends.entry(delivery.partition).or_insert_with(Vec::new).push(delivery.offset);
                        }
                        Ok(Err((error, _))) => failed.push((key, q, Some(error))),
                        Err(_) => failed.push((key, q, None)),
                    }
                }
            }
            None => failed.extend(sent.into_iter().map(|(key, q, _)| (key, q, None))),
        }
        for (p, offsets) in ends {
            self.advance_known_end(p, offsets);
        }
        self.settle_failures(failed);
        self.metrics.endpoint_changelog.with_label_values(&["written"]).inc_by(written as u64);
        written
    }

    /// Counts, logs and queues again what a flush could not write.
    fn settle_failures(&self, failed: Vec<(String, Queued, Option<rdkafka::error::KafkaError>)>) {
        if failed.is_empty() {
            return;
        }
        self.metrics.endpoint_changelog.with_label_values(&["failed"]).inc_by(failed.len() as u64);
        let first =
            failed.iter().find_map(|(_, _, e)| e.as_ref().map(|e| e.to_string())).unwrap_or_else(|| "not acknowledged in time".into());
        let mut dropped = 0;
        let mut q = lock(&self.queue);
        for (key, queued, error) in failed {
            if let Some(reason) = error.as_ref().and_then(PermanentReason::of) {
                dropped += 1;
                tracing::error!(key, %reason, topic = %self.topic, "Endpoint state change refused by Kafka for good; not in the changelog.");
                continue;
            }
            match q.by_key.get(&key) {
                Some(newer) if newer.generation > queued.generation => {}
                _ => drop(q.by_key.insert(key, queued)),
            }
        }
        tracing::warn!(error = %first, dropped, queued_again = q.by_key.len(), topic = %self.topic, "Endpoint state changelog writes failed; queued for the next flush.");
    }
}

/// A deadline for [`Changelog::flush`] that needs no runtime's timer: the rebalance callback
/// flushes on the consumer's thread with `futures::executor::block_on`.
pub fn thread_deadline(after: Duration) -> impl Future<Output = ()> {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new().name("changelog-deadline".into()).spawn(move || {
        std::thread::sleep(after);
        let _ = tx.send(());
    });
    let failed = spawned.is_err();
    async move {
        if !failed {
            let _ = rx.await;
        }
    }
}

/// Shared handle of the changelog, as the store and the sender's rebalance hooks hold it.
pub type SharedChangelog = Arc<Changelog>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_keys_name_their_slot() {
        let entries = [
            Entry::State(b"{}".to_vec()),
            Entry::Activity(13, b"{\"a\":1}".to_vec()),
            Entry::Request(117, b"r".to_vec()),
            Entry::Failed { at_ms: -5, id: "msg_1/x".into(), record: b"rec".to_vec() },
        ];
        let keys: Vec<String> = entries.iter().map(|e| e.key("s/1")).collect();
        assert_eq!(keys, ["s/1/state", "s/1/activity/3", "s/1/requests/17", "s/1/failed/msg_1/x"]);
        for e in entries {
            assert_eq!(Entry::decode(&e.encode("s/1")), Some(("s/1".to_string(), e)));
        }
        assert_eq!(Entry::decode(b""), None);
        assert_eq!(Entry::decode(&[9, b's', 0, 0, 0, 0]), None, "another version");
        assert_eq!(Entry::decode(&[VERSION, b's', 0, 0, 0, 9, b'x']), None, "cut short");
    }

    #[test]
    fn partition_is_crc32_of_the_id() {
        // CRC-32 (ISO-HDLC) of "123456789" is 0xCBF43926, the check value librdkafka's rd_crc32 shares.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(partition_for("123456789", 7), (0xCBF4_3926u32 % 7) as i32);
        assert!((0..100).all(|i| (0..6).contains(&partition_for(&format!("sub_{i}"), 6))));
    }
}
