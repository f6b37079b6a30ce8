//! Ingest: consume `crm.events` and `chat.messages` (one consumer group), validate, route,
//! render, produce delivery records; chat messages for aggregating subscriptions go to the
//! window store instead ([`crate::window`]).
//!
//! Offsets: `enable.auto.offset.store=false`; a record's offset is stored (and later
//! committed in the background) only once every delivery record it produced, or its dead
//! letter, has been acknowledged by the broker, its bundle part (if any) is in the window
//! store, and every earlier record of the partition is finished too
//! ([`offsets::OffsetTracker`]). For chat partitions the position is further held at the
//! oldest open bundle's first offset. A crash therefore replays at most the unfinished tail,
//! and replayed deliveries carry the same `webhook-id`. With the window store intact, a chat
//! partition is assigned at its settled position instead of the committed offset
//! ([`crate::kafka::TrackingContext`]), so the records of open bundles are not read again.
//!
//! Bad input never stops the stage: it becomes a dead letter with the reason. A render error
//! for one subscription dead-letters that (event, subscription) pair only, and so does a
//! delivery record Kafka refuses for good (too large, ...: stage `produce`, the source
//! record as the value), so no single record can stop a partition.

pub mod bundles;
pub mod chat;
mod emission;
pub mod event;
pub mod json;
mod parts;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Message};
use tokio_util::sync::CancellationToken;

use crate::deliver::record::{webhook_id, DeliveryRecord};
use crate::kafka::offsets::{OffsetTracker, Tp};
use crate::kafka::stage::{self, Io, Step};
use crate::kafka::{dead_letter, produce_until_acked, store_position, DeadLetter, ProduceError, SourceRef, TrackedConsumer};
use crate::route::subscription::Source;
use crate::telemetry::{StateError, StateOp, Store};
use crate::window::store::{BundleKey, WindowStore};
use crate::{Error, Shared};
use bundles::{ChatStage, Emission};
use event::CrmEvent;

/// What one input record turned into; settled by a task, then its offset is finished.
pub struct Work {
    pub tp: Tp,
    pub offset: i64,
    /// (subscription id, encoded delivery record).
    pub deliveries: Vec<(String, Vec<u8>)>,
    /// (reason, subscription id if the failure was one subscription's).
    letters: Vec<(String, Option<String>)>,
    /// The input record's bytes: the value of its dead letters, including one for a delivery
    /// record that Kafka refuses when it is produced.
    original: Vec<u8>,
    key: Option<Vec<u8>>,
}

impl Work {
    pub fn new(msg: &BorrowedMessage<'_>) -> Self {
        Self {
            tp: (msg.topic().to_string(), msg.partition()),
            offset: msg.offset(),
            deliveries: Vec::new(),
            letters: Vec::new(),
            original: msg.payload().unwrap_or_default().to_vec(),
            key: msg.key().map(<[u8]>::to_vec),
        }
    }

    pub fn source(&self) -> SourceRef {
        SourceRef { topic: self.tp.0.clone(), partition: self.tp.1, offset: self.offset }
    }

    /// Records a dead letter for this input (all of it, or one subscription's part).
    pub fn dead_letter(&mut self, reason: String, subscription: Option<String>, original: &[u8]) {
        if self.original.is_empty() {
            self.original = original.to_vec();
        }
        self.letters.push((reason, subscription));
    }
}

/// Decodes, routes and renders one CRM record.
fn process_crm(shared: &Shared, msg: &BorrowedMessage<'_>) -> Work {
    let mut work = Work::new(msg);
    let original = msg.payload().unwrap_or_default();
    let event = match CrmEvent::decode(original, shared.config.ingest.max_record_bytes) {
        Ok(e) => e,
        Err(e) => {
            work.dead_letter(e.to_string(), None, original);
            return work;
        }
    };
    let index = shared.registry.index();
    let now = shared.clock.now_ms();
    let source = work.source();
    for sub in index.matching(&event.tenant, Source::Crm, &event.event_type) {
        match shared.dialects.render_for(sub, &event) {
            Ok(r) => {
                let record = DeliveryRecord {
                    id: webhook_id(&sub.id, &event.id),
                    subscription_id: sub.id.clone(),
                    tenant: event.tenant.clone(),
                    event_name: r.event_name,
                    attempt: 1,
                    not_before_ms: now,
                    created_ms: now,
                    content_type: r.content_type,
                    body: r.body,
                    headers: r.headers,
                    last_error: None,
                    source: source.clone(),
                };
                work.deliveries.push((sub.id.clone(), record.encode()));
            }
            Err(e) => work.dead_letter(format!("render failed for subscription `{}`: {e}", sub.id), Some(sub.id.clone()), original),
        }
    }
    if work.deliveries.is_empty() && work.letters.is_empty() {
        shared.metrics.events_unmatched.with_label_values(&["crm"]).inc();
    }
    work
}

fn source_label(shared: &Shared, topic: &str) -> &'static str {
    if topic == shared.config.topics.chat_messages {
        "chat"
    } else {
        "crm"
    }
}

/// Produces a record's deliveries and dead letters; true when all are acknowledged. A
/// delivery record Kafka refuses for good is replaced by a dead letter of the input record
/// for that subscription (stage `produce`, reason `too_large: ...` and the like).
async fn settle(shared: &Shared, work: &Work, stop: &CancellationToken) -> bool {
    let (topic, m) = (&shared.config.topics.deliveries, &shared.metrics);
    let sends =
        work.deliveries.iter().map(|(sub, bytes)| produce_until_acked(&shared.producer, m, topic, Some(sub.as_bytes()), bytes, None, stop));
    let results = futures::future::join_all(sends).await;
    let mut letters: Vec<(String, Option<&str>, &'static str)> = work
        .letters
        .iter()
        .map(|(reason, sub)| (reason.clone(), sub.as_deref(), if sub.is_some() { "render" } else { "ingest" }))
        .collect();
    let mut produced = 0;
    for ((sub, _), result) in work.deliveries.iter().zip(results) {
        match result {
            Ok(()) => produced += 1,
            Err(ProduceError::Canceled) => return false,
            Err(refused) => {
                let reason = refused.dlq_reason("delivery record", sub, shared.config.kafka.max_message_bytes);
                letters.push((reason, Some(sub.as_str()), "produce"));
            }
        }
    }
    let label = source_label(shared, &work.tp.0);
    shared.metrics.deliveries_produced.with_label_values(&[label]).inc_by(produced);
    for (reason, sub, stage) in letters {
        let letter =
            DeadLetter { original: &work.original, key: work.key.as_deref(), reason, stage, source: work.source(), subscription_id: sub };
        if dead_letter(&shared.producer, &shared.config, &shared.metrics, letter, stop).await.is_err() {
            return false;
        }
    }
    true
}

/// What a settling task reports back to the loop.
enum Done {
    Record(Tp, i64),
    Emitted(BundleKey, i32),
}

/// The ingest stage's state.
struct Ingest {
    shared: Arc<Shared>,
    tracker: OffsetTracker,
    chat: ChatStage,
    io: Io<Done>,
    /// The sled database of the window store, flushed on the close tick.
    db: crate::state::StateDb,
    /// Chat partitions whose position may have moved; stored after the next sled flush.
    chat_dirty: std::collections::HashSet<i32>,
    /// When closed windows were last looked for, and whether more are due at once.
    last_close: std::time::Instant,
    close_again: bool,
}

impl Ingest {
    fn spawn_settle(&self, work: Work) {
        let (shared, done, stop) = (self.shared.clone(), self.io.done.clone(), self.io.hard_stop.clone());
        self.io.tasks.spawn(async move {
            if settle(&shared, &work, &stop).await {
                let _ = done.send(Done::Record(work.tp, work.offset));
            }
        });
    }

    /// Produces a closed bundle's parts (or dead letters); the bundle is removed from the
    /// store once all are acknowledged.
    fn spawn_emission(&self, e: Emission) {
        let (shared, done, stop) = (self.shared.clone(), self.io.done.clone(), self.io.hard_stop.clone());
        self.io.tasks.spawn(async move {
            if e.send(&shared, &stop).await.is_ok() {
                let _ = done.send(Done::Emitted(e.key, e.partition));
            }
        });
    }

    fn on_message(&mut self, msg: &BorrowedMessage<'_>) {
        let label = source_label(&self.shared, msg.topic());
        self.shared.metrics.events_consumed.with_label_values(&[label]).inc();
        self.tracker.begin(&(msg.topic().to_string(), msg.partition()), msg.offset());
        if label == "crm" {
            let work = process_crm(&self.shared, msg);
            return self.spawn_settle(work);
        }
        let (work, parts) = bundles::process(&self.shared, &self.chat.store, msg);
        if parts.is_empty() {
            return self.spawn_settle(work);
        }
        self.chat.buffer(work, parts);
        if self.chat.buffered() >= self.shared.config.chat.max_batch {
            self.apply_batch();
        }
    }

    fn apply_batch(&mut self) {
        for work in self.chat.apply_batch(&self.shared) {
            self.spawn_settle(work);
        }
    }

    fn on_done(&mut self, consumer: &TrackedConsumer, done: Done) {
        match done {
            Done::Record(tp, offset) => {
                let pos = self.tracker.finish(&tp, offset);
                if tp.0 == self.chat.topic() {
                    self.chat_dirty.insert(tp.1);
                } else if let Some(pos) = pos {
                    store_position(consumer, &tp.0, tp.1, pos);
                }
            }
            Done::Emitted(key, partition) => {
                self.chat.emitted(&self.shared, &key);
                self.chat_dirty.insert(partition);
            }
        }
    }

    /// Flushes the window store, then stores the positions of chat partitions that moved: the
    /// committed offset never relies on a window write that is not on disk. The settled
    /// positions (everything below finished) are taken before the flush and written after it,
    /// so a settled position can only reach disk after every bundle part it covers.
    async fn flush_and_store(&mut self, consumer: &TrackedConsumer) {
        let settled: Vec<(i32, i64)> =
            self.tracker.positions().into_iter().filter(|((t, _), _)| t == self.chat.topic()).map(|((_, p), pos)| (p, pos)).collect();
        if let Err(error) = self.db.flush().await {
            return self.shared.metrics.emit(StateError {
                store: Store::Windows,
                op: StateOp::Flush,
                error: &error,
                partition: None,
                then: "Window store flush failed; positions not stored.",
            });
        }
        for (partition, pos) in settled {
            if let Err(error) = self.chat.store.set_settled(partition, pos) {
                self.shared.metrics.emit(StateError {
                    store: Store::Windows,
                    op: StateOp::Settle,
                    error: &error,
                    partition: Some(partition),
                    then: "Recording the settled position failed.",
                });
            }
        }
        let topic = self.chat.topic().to_string();
        for partition in std::mem::take(&mut self.chat_dirty) {
            if let Some(pos) = self.chat.position(&self.tracker, partition) {
                store_position(consumer, &topic, partition, pos);
            }
        }
    }

    /// Emits closed bundles; true when more may be due right away.
    fn on_close_tick(&mut self) -> bool {
        let (due, more) = self.chat.due(&self.shared);
        for e in due {
            self.spawn_emission(e);
        }
        more
    }

    fn revoke_one(&mut self, tp: &Tp) {
        self.tracker.revoke(tp);
        if tp.0 == self.chat.topic() {
            self.chat.revoke(tp.1);
        }
    }
}

impl Step for Ingest {
    type Done = Done;
    const NAME: &'static str = "ingest";
    const RESUMED: &'static str = "chat";

    /// Buffered chat messages of revoked partitions are applied, so they finish with the rest.
    fn revoking(&mut self, _revoked: &[Tp]) {
        self.apply_batch();
    }

    /// Records read and not finished, and bundles being emitted, of the revoked partitions.
    fn unfinished(&self, revoked: &[Tp]) -> usize {
        let chat = revoked.iter().filter(|tp| tp.0 == self.chat.topic()).map(|tp| self.chat.emitting_in(tp.1));
        revoked.iter().map(|tp| self.tracker.pending_in(tp)).sum::<usize>() + chat.sum::<usize>()
    }

    /// Stores the final positions (after a flush), then drops the partitions' state.
    async fn revoke(&mut self, consumer: &TrackedConsumer, revoked: Vec<Tp>) {
        self.chat_dirty.extend(revoked.iter().filter(|tp| tp.0 == self.chat.topic()).map(|tp| tp.1));
        self.flush_and_store(consumer).await;
        for tp in &revoked {
            self.revoke_one(tp);
        }
    }

    fn can_read(&self) -> bool {
        self.tracker.pending() < self.shared.config.ingest.max_in_flight
    }

    fn submit(&mut self, msg: &BorrowedMessage<'_>) {
        self.on_message(msg)
    }

    fn join(&mut self, consumer: &TrackedConsumer, done: Done) {
        self.on_done(consumer, done)
    }

    /// Every `chat.batch_interval_ms`: applies buffered chat messages. Every
    /// `chat.close_interval_ms` (at once again after a mass close): emits closed bundles,
    /// flushes and stores chat positions.
    async fn tick(&mut self, consumer: &TrackedConsumer) -> bool {
        self.apply_batch();
        let every = Duration::from_millis(self.shared.config.chat.close_interval_ms);
        if !self.close_again && self.last_close.elapsed() < every {
            return false;
        }
        self.last_close = std::time::Instant::now();
        self.close_again = self.on_close_tick();
        self.flush_and_store(consumer).await;
        self.close_again
    }

    fn stop_reading(&mut self) {
        self.apply_batch();
    }

    /// Stores what finished; open bundles stay in the window store for the next start.
    async fn finish(&mut self, consumer: &TrackedConsumer) {
        self.flush_and_store(consumer).await;
        if let Err(error) = self.db.flush().await {
            let then = "Settled positions not flushed; the next start replays from the committed offset.";
            self.shared.metrics.emit(StateError { store: Store::Windows, op: StateOp::Flush, error: &error, partition: None, then });
        }
    }
}

/// Where a newly assigned chat partition may resume: its settled position in the window
/// store (every record below it finished: pass-through acknowledged, bundle part stored).
/// The committed offset stays at the low-watermark, so with the store lost the partition
/// replays from there and rebuilds its open bundles.
fn chat_resume(chat_topic: &str, windows: WindowStore) -> crate::kafka::Resume {
    let chat_topic = chat_topic.to_string();
    Box::new(move |topic, partition| if topic == chat_topic { windows.settled(partition).ok().flatten() } else { None })
}

/// Runs ingest until `shutdown`; then lets in-flight records settle within the grace and
/// commits what is finished ([`crate::kafka::stage`]). Open bundles stay in the window store
/// for the next start.
pub async fn run(shared: Arc<Shared>, windows: WindowStore, db: crate::state::StateDb, shutdown: CancellationToken) -> Result<(), Error> {
    let config = &shared.config;
    let resume = chat_resume(&config.topics.chat_messages, windows.clone());
    let topics = [config.topics.crm_events.as_str(), config.topics.chat_messages.as_str()];
    let (consumer, log) = stage::subscribe(&shared, &config.kafka.group_id, &topics, resume)?;
    let (io, joins) = stage::io();
    let chat = ChatStage::new(&shared, windows).map_err(|e| Error::Http(e.to_string()))?;
    shared.metrics.open_bundles.set(chat.store.open_bundles() as i64);
    let ingest = Ingest {
        shared: shared.clone(),
        tracker: OffsetTracker::default(),
        chat,
        io,
        db,
        chat_dirty: Default::default(),
        last_close: std::time::Instant::now(),
        close_again: false,
    };
    shared.ready.ingest.store(true, Ordering::Relaxed);
    let tick = Duration::from_millis(config.chat.batch_interval_ms.min(config.chat.close_interval_ms).max(1));
    stage::run(&shared, ingest, consumer, log, joins, tick, shutdown).await;
    Ok(())
}
