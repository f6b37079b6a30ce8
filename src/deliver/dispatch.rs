//! Dispatch: one delivery from its record to its outcome. Admission (the subscription's
//! gate, its queue and overflow, concurrency and rate limits; deferral to `hookd.retry` when
//! it cannot take the delivery now), the signed request, and the outcome's policy (success,
//! retry through the retry topic, give up to the dead-letter topic), each reported back to
//! the sender loop with the record's [`Origin`] so its offset can be finished.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::RetryAfterBounds;
use super::http::{HttpSender, OutboundRequest};
use super::park::{ParkStore, Parked};
use super::record::DeliveryRecord;
use super::signature;
use crate::kafka::offsets::Tp;
use crate::kafka::{dead_letter, produce_until_acked, DeadLetter, ProduceError, SourceRef};
use crate::route::subscription::Subscription;
use crate::Shared;

/// Where a dispatched record came from, so its finish stores the right offset.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    /// A record of `hookd.deliveries` (or an unreadable one of `hookd.retry`).
    Live(Tp, i64),
    /// A parked delivery of the retry store, finished: remove it.
    Parked(Parked),
    /// A parked delivery put off to `due_ms` (`busy`: its subscription is full): the loop
    /// moves it in the store and releases its in-flight mark. Only the loop writes the store.
    PutOff { parked: Parked, due_ms: i64, busy: bool },
}

/// Per-subscription limits: one slow or busy customer server cannot take every connection.
pub(super) struct SubState {
    /// Requests in flight to this endpoint.
    pub(super) concurrency: Semaphore,
    /// Requests per second to this endpoint.
    pub(super) limiter: governor::DefaultDirectRateLimiter,
    /// Deliveries dispatched and not finished; beyond `per_subscription_queue` new ones wait
    /// a bounded time, beyond `per_subscription_overflow` more they are deferred.
    pub(super) queued: AtomicUsize,
    /// (concurrency, rate) this state was built with; rebuilt when the subscription changes them.
    pub(super) limits: (u32, u32),
}

pub(super) struct Ctx {
    pub(super) shared: Arc<Shared>,
    pub(super) http: Arc<HttpSender>,
    pub(super) park: ParkStore,
    pub(super) global: Semaphore,
    pub(super) subs: Mutex<HashMap<String, Arc<SubState>>>,
    pub(super) done: mpsc::UnboundedSender<Origin>,
    pub(super) hard_stop: CancellationToken,
}

impl Ctx {
    pub(super) fn sub_state(&self, sub: &Subscription) -> Arc<SubState> {
        let d = &self.shared.config.delivery;
        let limits = (
            sub.max_concurrency.unwrap_or(d.per_subscription_concurrency as u32).max(1),
            sub.rate_limit_per_sec.unwrap_or(d.per_subscription_rate_per_sec).max(1),
        );
        let mut m = self.subs.lock().expect("sub state poisoned");
        if let Some(s) = m.get(&sub.id).filter(|s| s.limits == limits) {
            return s.clone();
        }
        let rate = std::num::NonZeroU32::new(limits.1).expect("at least 1");
        let state = Arc::new(SubState {
            concurrency: Semaphore::new(limits.0 as usize),
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            queued: AtomicUsize::new(0),
            limits,
        });
        m.insert(sub.id.clone(), state.clone());
        state
    }
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn spawn_dead_letter(
    ctx: &Arc<Ctx>,
    tasks: &TaskTracker,
    original: Vec<u8>,
    reason: String,
    source: SourceRef,
    sub: Option<String>,
    origin: Origin,
) {
    let ctx = ctx.clone();
    tasks.spawn(async move {
        let letter = DeadLetter { original: &original, key: None, reason, stage: "deliver", source, subscription_id: sub.as_deref() };
        let s = &ctx.shared;
        if dead_letter(&s.producer, &s.config, &s.metrics, letter, &ctx.hard_stop).await.is_ok() {
            let _ = ctx.done.send(origin);
        }
    });
}

/// Starts the request for one record, or defers it when its subscription can't take it now.
pub(super) fn dispatch(ctx: &Arc<Ctx>, tasks: &TaskTracker, record: DeliveryRecord, origin: Origin) {
    let index = ctx.shared.registry.index();
    let Some(sub) = index.get(&record.subscription_id).cloned() else {
        ctx.shared.metrics.deliveries.with_label_values(&["dropped"]).inc();
        let reason = format!("subscription `{}` no longer exists", record.subscription_id);
        let source = match &origin {
            Origin::Live(tp, o) => SourceRef { topic: tp.0.clone(), partition: tp.1, offset: *o },
            Origin::Parked(p) | Origin::PutOff { parked: p, .. } => {
                SourceRef { topic: ctx.shared.config.topics.retry.clone(), partition: p.partition, offset: p.offset }
            }
        };
        return spawn_dead_letter(ctx, tasks, record.encode(), reason, source, Some(record.subscription_id), origin);
    };
    if let Some(reason) = super::lifecycle::gate(&ctx.shared, &sub) {
        return defer(ctx, tasks, record, origin, reason);
    }
    let state = ctx.sub_state(&sub);
    let d = &ctx.shared.config.delivery;
    let queued = state.queued.load(Ordering::Relaxed);
    if queued >= d.per_subscription_queue + d.per_subscription_overflow {
        return defer(ctx, tasks, record, origin, "busy");
    }
    // Beyond the queue, a delivery waits for its turn only a bounded time: a fast endpoint
    // takes a burst, a slow one has the excess deferred instead of holding the read-ahead.
    let wait = (queued >= d.per_subscription_queue).then(|| Duration::from_millis(d.per_subscription_overflow_wait_ms));
    state.queued.fetch_add(1, Ordering::Relaxed);
    let (ctx, tasks) = (ctx.clone(), tasks.clone());
    tasks.clone().spawn(async move {
        let turn = tokio::select! {
            t = take_turn(&state, wait) => t,
            _ = ctx.hard_stop.cancelled() => Turn::Stopped,
        };
        let outcome = match turn {
            Turn::Stopped => false,
            Turn::TimedOut => {
                state.queued.fetch_sub(1, Ordering::Relaxed);
                return defer(&ctx, &tasks, record, origin, "busy");
            }
            Turn::Go(_permit) => tokio::select! {
                r = send_and_settle(&ctx, &sub, &state, record) => r,
                _ = ctx.hard_stop.cancelled() => false,
            },
        };
        state.queued.fetch_sub(1, Ordering::Relaxed);
        if outcome {
            let _ = ctx.done.send(origin);
        }
    });
}

pub(super) enum Turn<'a> {
    Go(tokio::sync::SemaphorePermit<'a>),
    TimedOut,
    Stopped,
}

/// Waits for one of the subscription's concurrency permits, at most `wait` if given.
pub(super) async fn take_turn(state: &SubState, wait: Option<Duration>) -> Turn<'_> {
    let acquired = match wait {
        None => state.concurrency.acquire().await,
        Some(w) => match tokio::time::timeout(w, state.concurrency.acquire()).await {
            Ok(p) => p,
            Err(_) => return Turn::TimedOut,
        },
    };
    acquired.map_or(Turn::Stopped, Turn::Go)
}

/// Defers a record: parked ones are moved later in the store by the loop (`Origin::PutOff`),
/// live ones go to the retry topic with the same attempt number.
pub(super) fn defer(ctx: &Arc<Ctx>, tasks: &TaskTracker, mut record: DeliveryRecord, origin: Origin, reason: &'static str) {
    let busy = reason == "busy";
    let wait_ms = if busy { 1_000 } else { 15_000 };
    let due_ms = now_ms() + wait_ms;
    ctx.shared.metrics.emit(crate::telemetry::events::Deferred { subscription: &record.subscription_id, reason, due_ms });
    match origin {
        Origin::Parked(parked) => {
            let _ = ctx.done.send(Origin::PutOff { parked, due_ms, busy });
        }
        Origin::PutOff { .. } => {}
        Origin::Live(..) => {
            record.not_before_ms = due_ms;
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let s = &ctx.shared;
                let key = record.subscription_id.as_bytes();
                let sent = match produce_until_acked(
                    &s.producer,
                    &s.metrics,
                    &s.config.topics.retry,
                    Some(key),
                    &record.encode(),
                    None,
                    &ctx.hard_stop,
                )
                .await
                {
                    Ok(()) => true,
                    Err(ProduceError::Canceled) => false,
                    Err(refused) => {
                        let reason =
                            refused.dlq_reason("deferred delivery record", &record.subscription_id, s.config.kafka.max_message_bytes);
                        give_up(&ctx, &record, reason, "produce", "refused").await
                    }
                };
                if sent {
                    let _ = ctx.done.send(origin);
                }
            });
        }
    }
}

/// Sends one record (the caller holds one of the subscription's concurrency permits) and
/// settles its outcome durably. Returns whether it is settled.
pub(super) async fn send_and_settle(ctx: &Ctx, sub: &Subscription, state: &SubState, record: DeliveryRecord) -> bool {
    let s = &ctx.shared;
    state.limiter.until_ready().await;
    let Ok(_permit) = ctx.global.acquire().await else { return false };
    let headers = request_headers(sub, &record);
    s.metrics.requests_in_flight.inc();
    let attempt = ctx.http.post(OutboundRequest { url: &sub.url, headers: &headers, body: &record.body }).await;
    s.metrics.requests_in_flight.dec();
    super::lifecycle::log_request(s, sub, &record, &headers, &attempt);
    let rule = s.dialects.success_rule_of(sub);
    let ok = attempt.error.is_none() && attempt.status.is_some_and(|st| rule.is_success(st));
    let secs = attempt.duration.as_secs_f64();
    s.metrics.request_duration.with_label_values(&[if ok { "success" } else { "failure" }]).observe(secs);
    if ok {
        s.metrics.deliveries.with_label_values(&["success"]).inc();
        let bucket = if record.attempt == 1 { "1" } else { "2+" };
        let latency = (now_ms() - record.created_ms).max(0) as f64 / 1000.0;
        s.metrics.delivery_latency.with_label_values(&[bucket]).observe(latency);
        tracing::debug!(subscription = %sub.id, webhook_id = %record.id, attempt = record.attempt, "Delivered.");
        super::lifecycle::on_success(s, sub, &record);
        return true;
    }
    let error = match (&attempt.error, attempt.status) {
        (Some(e), _) => e.to_string(),
        (None, Some(st)) if sub.success.is_some() => format!("HTTP status {st} is not a success for this subscription (success = {rule})"),
        (None, Some(st)) => format!("HTTP status {st} is not a success for dialect `{}`", sub.dialect),
        (None, None) => "no response".to_string(),
    };
    let kind = attempt.error.as_ref().map_or("status", |e| e.kind());
    s.metrics.request_errors.with_label_values(&[kind]).inc();
    let gone = super::lifecycle::is_gone(&attempt);
    let retriable = !gone && attempt.error.as_ref().is_none_or(|e| e.is_retriable());
    let will_retry = retriable && record.attempt < sub.retry.max_attempts;
    let failed = super::lifecycle::Failed { error: &error, gone, will_retry };
    super::lifecycle::on_failure(s, sub, &record, failed, &ctx.hard_stop).await;
    if will_retry {
        let bounds = RetryAfterBounds { min: Duration::from_secs(1), max: Duration::from_secs(s.config.delivery.retry_after_max_secs) };
        let delay = sub.retry.delay(record.attempt + 1, attempt.retry_after, rand::random::<f64>(), bounds);
        let next = record.next_attempt(now_ms() + delay.as_millis() as i64, error.clone());
        tracing::info!(subscription = %sub.id, webhook_id = %record.id, attempt = record.attempt, %error, retry_in_secs = delay.as_secs(), "Delivery failed; will retry.");
        let retry = &s.config.topics.retry;
        return match produce_until_acked(&s.producer, &s.metrics, retry, Some(sub.id.as_bytes()), &next.encode(), None, &ctx.hard_stop)
            .await
        {
            Ok(()) => {
                s.metrics.deliveries.with_label_values(&["retry"]).inc();
                true
            }
            Err(ProduceError::Canceled) => false,
            Err(refused) => {
                let reason = refused.dlq_reason("retry record", &sub.id, s.config.kafka.max_message_bytes);
                give_up(ctx, &record.with_error(error), reason, "produce", "refused").await
            }
        };
    }
    let reason = format!("gave up after {} attempt(s): {error}", record.attempt);
    give_up(ctx, &record.with_error(error), reason, "deliver", "exhausted").await
}

/// Ends a delivery that is not sent again: keeps it for replay (the admin API) and writes it
/// to the dead-letter topic, counted under `outcome`: exhausted (no attempts left) or refused
/// (Kafka refused its retry or deferral record for good). True once the letter is acknowledged.
pub(super) async fn give_up(ctx: &Ctx, record: &DeliveryRecord, reason: String, stage: &'static str, outcome: &'static str) -> bool {
    let s = &ctx.shared;
    let sub = record.subscription_id.as_str();
    tracing::warn!(subscription = %sub, webhook_id = %record.id, %reason, outcome, "Delivery given up.");
    let encoded = record.encode();
    if let Err(e) = s.endpoints.push_failed(sub, &record.id, now_ms(), &encoded) {
        tracing::error!(error = %e, "Keeping the failed delivery for replay failed.");
    }
    let letter = DeadLetter {
        original: &encoded,
        key: Some(sub.as_bytes()),
        reason,
        stage,
        source: record.source.clone(),
        subscription_id: Some(sub),
    };
    let sent = dead_letter(&s.producer, &s.config, &s.metrics, letter, &ctx.hard_stop).await.is_ok();
    if sent {
        s.metrics.deliveries.with_label_values(&[outcome]).inc();
    }
    sent
}

/// Content type, Standard Webhooks headers, dialect headers, then the subscription's own.
pub(super) fn request_headers(sub: &Subscription, record: &DeliveryRecord) -> Vec<(String, String)> {
    let ts = chrono::Utc::now().timestamp();
    let mut h = Vec::with_capacity(5 + record.headers.len() + sub.headers.len());
    h.push(("content-type".to_string(), record.content_type.clone()));
    h.push(("webhook-id".to_string(), record.id.clone()));
    h.push(("webhook-timestamp".to_string(), ts.to_string()));
    h.push(("webhook-signature".to_string(), signature::sign(sub.secret.as_deref(), &record.id, ts, &record.body)));
    h.extend(record.headers.iter().cloned());
    h.extend(sub.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(concurrency: usize) -> SubState {
        let rate = std::num::NonZeroU32::new(100).unwrap();
        SubState {
            concurrency: Semaphore::new(concurrency),
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            queued: AtomicUsize::new(0),
            limits: (concurrency as u32, 100),
        }
    }

    // Outcomes here do not depend on speed: the permit is held until dropped.
    #[tokio::test]
    async fn overflow_waits_a_bounded_time_and_the_queue_does_not() {
        let s = state(1);
        let Turn::Go(first) = take_turn(&s, None).await else { panic!("a free permit") };
        let wait = Some(Duration::from_millis(20));
        assert!(matches!(take_turn(&s, wait).await, Turn::TimedOut), "busy endpoint: the overflow gives up");
        let queued = take_turn(&s, None);
        tokio::pin!(queued);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut queued).await.is_err(), "the queue waits as long as it takes");
        drop(first);
        assert!(matches!(queued.await, Turn::Go(_)));
        assert!(matches!(take_turn(&s, wait).await, Turn::Go(_)), "a free permit at once");
    }
}
