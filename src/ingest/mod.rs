//! Ingest: consume `crm.events`, validate, route, render, produce delivery records.
//!
//! Offsets: `enable.auto.offset.store=false`; a record's offset is stored (and later
//! committed in the background) only once every delivery record it produced, or its dead
//! letter, has been acknowledged by the broker, and only when every earlier record of the
//! partition is finished too ([`offsets::OffsetTracker`]). A crash therefore replays at most
//! the unfinished tail, and the replayed deliveries carry the same `webhook-id`.
//!
//! Bad input never stops the stage: it becomes a dead letter with the reason. A render error
//! for one subscription dead-letters that (event, subscription) pair only.

pub mod chat;
pub mod event;
pub mod offsets;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::deliver::record::{webhook_id, DeliveryRecord};
use crate::kafka::{dead_letter, produce_until_acked, store_position, DeadLetter, SourceRef, TrackedConsumer};
use crate::route::subscription::Source;
use crate::{Error, Shared};
use event::CrmEvent;
use offsets::{OffsetTracker, Tp};

/// What one input record turned into; produced by a task, then its offset is finished.
struct Work {
    tp: Tp,
    offset: i64,
    deliveries: Vec<(String, Vec<u8>)>,
    letters: Vec<(String, Option<String>)>,
    original: Vec<u8>,
    key: Option<Vec<u8>>,
}

/// Decodes, routes and renders one record. Pure apart from the metrics.
fn process(shared: &Shared, msg: &BorrowedMessage<'_>) -> Work {
    let tp: Tp = (msg.topic().to_string(), msg.partition());
    let source = SourceRef { topic: tp.0.clone(), partition: tp.1, offset: msg.offset() };
    let original = msg.payload().unwrap_or_default();
    let mut work = Work { tp, offset: msg.offset(), deliveries: Vec::new(), letters: Vec::new(), original: Vec::new(), key: msg.key().map(<[u8]>::to_vec) };
    let event = match CrmEvent::decode(original, shared.config.ingest.max_record_bytes) {
        Ok(e) => e,
        Err(e) => {
            work.letters.push((e.to_string(), None));
            work.original = original.to_vec();
            return work;
        }
    };
    let index = shared.registry.index();
    let now = chrono::Utc::now().timestamp_millis();
    for sub in index.matching(&event.tenant, Source::Crm, &event.event_type) {
        match shared.dialects.render_crm(&sub.dialect, sub.format, &event) {
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
            Err(e) => work.letters.push((format!("render failed for subscription `{}`: {e}", sub.id), Some(sub.id.clone()))),
        }
    }
    if !work.letters.is_empty() {
        work.original = original.to_vec();
    }
    if work.deliveries.is_empty() && work.letters.is_empty() {
        shared.metrics.events_unmatched.with_label_values(&["crm"]).inc();
    }
    work
}

/// Produces a record's deliveries and dead letters; true when all are acknowledged.
async fn settle(shared: &Shared, work: &Work, stop: &CancellationToken) -> bool {
    let topic = &shared.config.topics.deliveries;
    let sends = work.deliveries.iter().map(|(sub, bytes)| produce_until_acked(&shared.producer, topic, Some(sub.as_bytes()), bytes, None, stop));
    let results = futures::future::join_all(sends).await;
    if results.iter().any(Result::is_err) {
        return false;
    }
    shared.metrics.deliveries_produced.with_label_values(&["crm"]).inc_by(work.deliveries.len() as u64);
    for (reason, sub) in &work.letters {
        let stage = if sub.is_some() { "render" } else { "ingest" };
        let letter = DeadLetter {
            original: &work.original,
            key: work.key.as_deref(),
            reason: reason.clone(),
            stage,
            source: SourceRef { topic: work.tp.0.clone(), partition: work.tp.1, offset: work.offset },
            subscription_id: sub.as_deref(),
        };
        if dead_letter(&shared.producer, &shared.config, &shared.metrics, letter, stop).await.is_err() {
            return false;
        }
    }
    true
}

fn store(consumer: &TrackedConsumer, tp: &Tp, position: i64) {
    store_position(consumer, &tp.0, tp.1, position);
}

/// Runs the CRM ingest until `shutdown`; then lets in-flight records settle within the grace
/// and commits what is finished.
pub async fn run_crm(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<(), Error> {
    let config = &shared.config;
    let log = Arc::new(crate::kafka::RebalanceLog::default());
    let consumer: TrackedConsumer = crate::kafka::consumer_config(config, &config.kafka.group_id)
        .create_with_context(crate::kafka::TrackingContext(log.clone()))?;
    consumer.subscribe(&[&config.topics.crm_events])?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Tp, i64)>();
    let hard_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut tracker = OffsetTracker::default();
    shared.ready.ingest.store(true, Ordering::Relaxed);
    loop {
        for tp in log.revoked.lock().expect("rebalance log poisoned").drain(..) {
            tracker.revoke(&tp);
        }
        let can_read = tracker.pending() < config.ingest.max_in_flight;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some((tp, offset)) = done_rx.recv() => {
                if let Some(pos) = tracker.finish(&tp, offset) {
                    store(&consumer, &tp, pos);
                }
            }
            m = consumer.recv(), if can_read => match m {
                Ok(msg) => {
                    shared.metrics.events_consumed.with_label_values(&["crm"]).inc();
                    let work = process(&shared, &msg);
                    tracker.begin(&work.tp, work.offset);
                    let (shared, done, stop) = (shared.clone(), done_tx.clone(), hard_stop.clone());
                    tasks.spawn(async move {
                        if settle(&shared, &work, &stop).await {
                            let _ = done.send((work.tp, work.offset));
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "Ingest consumer error."),
            },
        }
    }
    tasks.close();
    let grace = tokio::time::sleep(config.shutdown.grace());
    tokio::pin!(grace);
    loop {
        tokio::select! {
            Some((tp, offset)) = done_rx.recv() => {
                if let Some(pos) = tracker.finish(&tp, offset) { store(&consumer, &tp, pos); }
            }
            _ = tasks.wait() => break,
            _ = &mut grace => { hard_stop.cancel(); tasks.wait().await; break; }
        }
    }
    while let Ok((tp, offset)) = done_rx.try_recv() {
        if let Some(pos) = tracker.finish(&tp, offset) {
            store(&consumer, &tp, pos);
        }
    }
    crate::kafka::final_commit(&consumer, "ingest");
    Ok(())
}
