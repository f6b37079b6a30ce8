//! The chat half of ingest: routing `chat.messages` (pass-through deliveries and bundle
//! parts), batched window writes, the close timer and emission, and the offsets of chat
//! partitions. `window` turns bundle parts into bundles and bundles into emissions; this
//! module is where they meet Kafka.
//!
//! A chat message is finished for offset purposes when its pass-through deliveries are
//! acknowledged and its aggregated part is applied to the window store. The position stored
//! for a chat partition is the offset tracker's (pass-through in flight, bundle parts not yet
//! applied) held at the store's low-watermark (the smallest first offset of any bundle not yet
//! removed, DESIGN section 2), so the committed offset never passes a message whose bundle was
//! not yet emitted and acknowledged, and follows the tracker when no bundle is open. After a restart with the store intact, the partition resumes at the store's
//! settled position (see `ingest`); of the messages read again from there, the aggregated part
//! of those at or below the store's checkpoint is skipped (it is in the store already) and
//! pass-through is done again (duplicates carry the same `webhook-id`). With the store lost,
//! replay from the committed low-watermark rebuilds it.

use std::collections::HashMap;
use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message};

use super::chat::ChatMessage;
pub use super::emission::{Emission, Output};
pub use super::parts::{apply_parts, Parts, Pending};
use super::Work;
use crate::deliver::record::{webhook_id, DeliveryRecord};
use crate::kafka::offsets::{OffsetTracker, Tp};
use crate::kafka::SourceRef;
use crate::render::timelines::{self, Summary};
use crate::route::subscription::Source;
use crate::telemetry::{StateError, StateOp, Store};
use crate::window::calendar::Windows;
use crate::window::clock::Clock;
use crate::window::emit::{self, Limits, Piece};
use crate::window::store::{Bundle, BundleKey, WindowStore};
use crate::Shared;

/// Request header naming a bundle part and the number of parts, `2/3`: receivers that want
/// the whole window put the parts back together by it.
pub const PART_HEADER: &str = "hookd-bundle-part";

/// Routes one chat message: pass-through deliveries into the work, bundle parts returned.
pub fn process(shared: &Shared, store: &WindowStore, msg: &BorrowedMessage<'_>) -> (Work, Vec<Pending>) {
    let mut work = Work::new(msg);
    let original = msg.payload().unwrap_or_default();
    let m = match ChatMessage::decode(original, shared.config.ingest.max_record_bytes) {
        Ok(m) => m,
        Err(e) => {
            work.dead_letter(e.to_string(), None, original);
            return (work, Vec::new());
        }
    };
    if m.has_attachments() {
        shared.metrics.chat_skipped.with_label_values(&["attachments"]).inc();
        return (work, Vec::new());
    }
    let index = shared.registry.index();
    let applied = store.checkpoint(work.tp.1).ok().flatten();
    let now = shared.clock.now_ms();
    let source = work.source();
    let (mut single, mut parts) = (None, Parts::new(&m, work.tp.1, work.offset));
    for sub in index.matching(&m.tenant, Source::Chat, m.direction.event_type()) {
        match Windows::of(sub) {
            None => {
                let body = single.get_or_insert_with(|| timelines::single_payload(&m)).clone();
                let record = chat_record(&sub.id, &m.tenant, webhook_id(&sub.id, &m.id), "message", body, now, source.clone());
                work.deliveries.push((sub.id.clone(), record.encode()));
            }
            Some(windows) if applied.is_none_or(|c| work.offset > c) => parts.push(sub, windows),
            Some(_) => {} // already in the window store (offset <= its checkpoint)
        }
    }
    if work.deliveries.is_empty() && parts.parts.is_empty() {
        shared.metrics.events_unmatched.with_label_values(&["chat"]).inc();
    }
    (work, parts.parts)
}

fn chat_record(sub: &str, tenant: &str, id: String, event: &str, body: Vec<u8>, now: i64, source: SourceRef) -> DeliveryRecord {
    DeliveryRecord {
        id,
        subscription_id: sub.to_string(),
        tenant: tenant.to_string(),
        event_name: event.to_string(),
        attempt: 1,
        not_before_ms: now,
        created_ms: now,
        content_type: "application/json".into(),
        body,
        headers: Vec::new(),
        last_error: None,
        source,
    }
}

/// Closed bundles loaded and rendered per call of [`ChatStage::due`].
const DUE_BATCH: usize = 256;

/// Bundles emitted and not yet acknowledged by the broker, at most: bounds the memory of
/// a mass close (a day's windows closing at once) while keeping the producer busy.
const MAX_EMITTING: usize = 4096;

/// Chat state owned by the ingest loop.
pub struct ChatStage {
    pub store: WindowStore,
    summary: Summary,
    /// Size limits of one bundle part (`chat.max_bundle_bytes`, `max_bundle_messages`).
    limits: Limits,
    clock: Arc<dyn Clock>,
    pending: Vec<Pending>,
    /// Works whose aggregated part is in `pending`; settled after the batch is applied.
    waiting: Vec<Work>,
    /// Bundles being delivered now, with their partition.
    emitting: HashMap<BundleKey, i32>,
    /// Last position stored per chat partition.
    stored: HashMap<i32, i64>,
    topic: String,
    metrics: crate::telemetry::Metrics,
}

impl ChatStage {
    pub fn new(shared: &Shared, store: WindowStore) -> Result<Self, crate::render::RenderError> {
        let t = &shared.config.chat.summary_template;
        Ok(Self {
            store,
            summary: Summary::new((!t.is_empty()).then_some(t.as_str()))?,
            limits: Limits::new(&shared.config.chat),
            clock: shared.clock.clone(),
            pending: Vec::new(),
            waiting: Vec::new(),
            emitting: HashMap::new(),
            stored: HashMap::new(),
            topic: shared.config.topics.chat_messages.clone(),
            metrics: shared.metrics.clone(),
        })
    }

    pub fn buffer(&mut self, work: Work, parts: Vec<Pending>) {
        self.pending.extend(parts);
        self.waiting.push(work);
    }

    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Applies the buffered messages as one store batch; returns the works now free to settle.
    pub fn apply_batch(&mut self, shared: &Shared) -> Vec<Work> {
        if self.pending.is_empty() {
            return std::mem::take(&mut self.waiting);
        }
        match apply_parts(&self.store, &self.pending, shared.config.chat.grace_ms as i64) {
            Ok(placed) => {
                let late = placed.iter().filter(|(_, late)| *late).count();
                if late > 0 {
                    shared.metrics.chat_late.inc_by(late as u64);
                }
                shared.metrics.chat_bundled.inc_by(placed.len() as u64);
                shared.metrics.open_bundles.set(self.store.open_bundles() as i64);
                self.pending.clear();
                std::mem::take(&mut self.waiting)
            }
            Err(error) => {
                self.metrics.emit(StateError {
                    store: Store::Windows,
                    op: StateOp::Write,
                    error: &error,
                    partition: None,
                    then: "Window store write failed; retrying with the next batch.",
                });
                Vec::new()
            }
        }
    }

    /// Drops everything of a revoked partition; its next owner rebuilds it by replay.
    pub fn revoke(&mut self, partition: i32) {
        self.pending.retain(|p| p.partition != partition);
        self.waiting.retain(|w| w.tp.1 != partition);
        self.stored.remove(&partition);
        match self.store.drop_partition(partition) {
            Ok(n) => {
                self.metrics.open_bundles.set(self.store.open_bundles() as i64);
                tracing::info!(partition, bundles = n, "Chat partition revoked; its open bundles are left to the new owner.")
            }
            Err(error) => self.metrics.emit(StateError {
                store: Store::Windows,
                op: StateOp::Drop,
                error: &error,
                partition: Some(partition),
                then: "Dropping a revoked chat partition failed.",
            }),
        }
    }

    /// Bundles whose window closed, rendered, marked as being emitted: at most
    /// [`DUE_BATCH`], and none while [`MAX_EMITTING`] are on their way. The flag says whether
    /// more may be due now (the caller comes back at once instead of at its next tick).
    pub fn due(&mut self, shared: &Shared) -> (Vec<Emission>, bool) {
        if self.emitting.len() >= MAX_EMITTING {
            return (Vec::new(), false); // their acknowledgements make room
        }
        let now = self.clock.now_ms();
        let keys = match self.store.due(now, DUE_BATCH) {
            Ok(k) => k,
            Err(error) => {
                self.metrics.emit(StateError {
                    store: Store::Windows,
                    op: StateOp::Read,
                    error: &error,
                    partition: None,
                    then: "Reading due windows failed.",
                });
                return (Vec::new(), false);
            }
        };
        let more = keys.len() == DUE_BATCH;
        let mut out = Vec::new();
        for key in keys {
            if self.emitting.contains_key(&key) {
                continue;
            }
            match self.store.begin_emit(&key) {
                Ok(Some(bundle)) => {
                    let outputs = self.outputs(shared, &bundle);
                    self.emitting.insert(key.clone(), bundle.partition);
                    out.push(Emission { partition: bundle.partition, sub_id: key.sub_id.clone(), key, outputs });
                }
                Ok(None) => {}
                Err(error) => self.metrics.emit(StateError {
                    store: Store::Windows,
                    op: StateOp::Read,
                    error: &error,
                    partition: None,
                    then: "Loading a due bundle failed.",
                }),
            }
        }
        (out, more)
    }

    /// A bundle's parts as delivery records (with [`PART_HEADER`]), in order, and dead
    /// letters for a message too large alone or for a bundle that cannot be rendered.
    fn outputs(&self, shared: &Shared, b: &Bundle) -> Vec<Output> {
        let source = |(partition, offset): (i32, i64)| SourceRef { topic: self.topic.clone(), partition, offset };
        let origin = |message: usize| b.origins.get(message).copied().unwrap_or((b.partition, b.first_offset));
        let sub = shared.registry.index().get(&b.key.sub_id).cloned();
        let zone = sub.as_ref().map_or(chrono_tz::Tz::UTC, |s| s.zone());
        let pieces = match emit::render(&self.summary, b, zone, self.limits) {
            Ok(pieces) => pieces,
            Err(reason) => {
                tracing::error!(%reason, sub = %b.key.sub_id, chat = %b.key.chat_id, "Bundle could not be rendered; sending it to the dead-letter topic.");
                let original = [b"[".to_vec(), b.messages.join(&b','), b"]".to_vec()].concat();
                return vec![Output::Letter { reason, original, source: source((b.partition, b.first_offset)) }];
            }
        };
        let parts = pieces.iter().filter(|p| matches!(p, Piece::Part { .. })).count();
        let tenant = sub.map(|s| s.tenant.clone()).unwrap_or_default();
        let now = self.clock.now_ms();
        let into_output = |piece: Piece| match piece {
            Piece::Part { number, id, body, messages } => {
                let mut record = chat_record(&b.key.sub_id, &tenant, id, "bundle", body, now, source(origin(messages.start)));
                record.headers.push((PART_HEADER.to_string(), format!("{number}/{parts}")));
                Output::Record(record.encode())
            }
            Piece::Oversized { index, error } => {
                tracing::warn!(%error, sub = %b.key.sub_id, chat = %b.key.chat_id, "A chat message does not fit in a bundle part; sending it to the dead-letter topic.");
                Output::Letter { reason: error, original: b.messages[index].clone(), source: source(origin(index)) }
            }
        };
        pieces.into_iter().map(into_output).collect()
    }

    /// Bundles of `partition` being emitted now.
    pub fn emitting_in(&self, partition: i32) -> usize {
        self.emitting.values().filter(|p| **p == partition).count()
    }

    /// Every delivery record (or dead letter) of a bundle was acknowledged: forget the bundle.
    pub fn emitted(&mut self, shared: &Shared, key: &BundleKey) {
        self.emitting.remove(key);
        if let Err(error) = self.store.remove(key) {
            self.metrics.emit(StateError {
                store: Store::Windows,
                op: StateOp::Remove,
                error: &error,
                partition: None,
                then: "Removing an emitted bundle failed; it will be sent again.",
            });
        }
        shared.metrics.bundles_emitted.inc();
        shared.metrics.open_bundles.set(self.store.open_bundles() as i64);
    }

    /// The position to store for a chat partition now, if it moved forward: the offset
    /// tracker's (every record read below it finished), held at the first offset of the
    /// oldest bundle of the partition not yet removed. With no bundle open it is the
    /// tracker's, so pass-through and unmatched traffic is committed as it finishes. Before
    /// anything was read since the assignment, the settled position stands in for the
    /// tracker (every record below it finished when it was recorded); without one, nothing
    /// is stored.
    pub fn position(&mut self, tracker: &OffsetTracker, partition: i32) -> Option<i64> {
        let tp: Tp = (self.topic.clone(), partition);
        let read = match tracker.position(&tp) {
            Some(read) => read,
            None => self.store.settled(partition).ok().flatten()?,
        };
        let pos = match self.store.low_watermark(partition) {
            Ok(open) => open.map_or(read, |open| open.min(read)),
            Err(error) => {
                self.metrics.emit(StateError {
                    store: Store::Windows,
                    op: StateOp::Read,
                    error: &error,
                    partition: Some(partition),
                    then: "Reading the low-watermark failed; position not stored.",
                });
                return None;
            }
        };
        if self.stored.get(&partition).is_some_and(|s| *s >= pos) {
            return None;
        }
        self.stored.insert(partition, pos);
        Some(pos)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }
}
