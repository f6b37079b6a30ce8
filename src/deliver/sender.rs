//! The sender loop: reading, dispatching, outcome handling, offset storing.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backoff::RetryAfterBounds;
use super::http::{HttpConfig, HttpSender, OutboundRequest};
use super::park::{ParkStore, Parked};
use super::record::DeliveryRecord;
use super::schedule::Schedule;
use super::signature;
use crate::kafka::offsets::{OffsetTracker, Tp};
use crate::kafka::stage::{self, Step};
use crate::kafka::{dead_letter, produce_until_acked, store_position, DeadLetter, ProduceError, SourceRef, TrackedConsumer};
use crate::route::subscription::Subscription;
use crate::{Error, Shared};

/// Where a dispatched record came from, so its finish stores the right offset.
#[derive(Debug, Clone)]
enum Origin {
    /// A record of `hookd.deliveries` (or an unreadable one of `hookd.retry`).
    Live(Tp, i64),
    /// A parked delivery of the retry store, finished: remove it.
    Parked(Parked),
    /// A parked delivery put off to `due_ms` (`busy`: its subscription is full): the loop
    /// moves it in the store and releases its in-flight mark. Only the loop writes the store.
    PutOff { parked: Parked, due_ms: i64, busy: bool },
}

/// Per-subscription limits: one slow or busy customer server cannot take every connection.
struct SubState {
    /// Requests in flight to this endpoint.
    concurrency: Semaphore,
    /// Requests per second to this endpoint.
    limiter: governor::DefaultDirectRateLimiter,
    /// Deliveries dispatched and not finished; beyond `per_subscription_queue` new ones wait
    /// a bounded time, beyond `per_subscription_overflow` more they are deferred.
    queued: AtomicUsize,
    /// (concurrency, rate) this state was built with; rebuilt when the subscription changes them.
    limits: (u32, u32),
}

struct Ctx {
    shared: Arc<Shared>,
    http: Arc<HttpSender>,
    park: ParkStore,
    global: Semaphore,
    subs: Mutex<HashMap<String, Arc<SubState>>>,
    done: mpsc::UnboundedSender<Origin>,
    hard_stop: CancellationToken,
}

impl Ctx {
    fn sub_state(&self, sub: &Subscription) -> Arc<SubState> {
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

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Runs the sender until `shutdown`, then lets in-flight requests finish within the grace.
pub async fn run(shared: Arc<Shared>, park: ParkStore, shutdown: CancellationToken) -> Result<(), Error> {
    let config = &shared.config;
    let d = &config.delivery;
    let http = HttpSender::new(
        HttpConfig {
            request_timeout: Duration::from_millis(d.request_timeout_ms),
            connect_timeout: Duration::from_millis(d.connect_timeout_ms),
            max_response_bytes: d.max_response_bytes,
            user_agent: d.user_agent.clone(),
            // Many subscriptions may share one host (a receiver service, an iPaaS): keep as
            // many idle connections as requests may be in flight, or connections churn.
            pool_max_idle_per_host: d.max_in_flight,
        },
        super::ssrf::TargetPolicy::new(&d.allow_private_targets).map_err(Error::Http)?,
    )
    .map_err(|e| Error::Http(e.to_string()))?;
    let group = format!("{}.sender", config.kafka.group_id);
    let resume = retry_resume(&config.topics.retry, park.clone());
    let (consumer, log) = stage::subscribe(&shared, &group, &[&config.topics.deliveries, &config.topics.retry], resume)?;
    let (io, joins) = stage::io();
    let http = Arc::new(http);
    let helpers = vec![
        tokio::spawn(super::lifecycle::verify_loop(shared.clone(), http.clone(), shutdown.clone())),
        tokio::spawn(super::lifecycle::flush_logs_loop(shared.clone(), shutdown.clone())),
    ];
    let ctx = Arc::new(Ctx {
        shared: shared.clone(),
        http,
        park,
        global: Semaphore::new(d.max_in_flight),
        subs: Mutex::new(HashMap::new()),
        done: io.done.clone(),
        hard_stop: io.hard_stop.clone(),
    });
    shared.metrics.retry_queue_depth.set(ctx.park.len() as i64);
    let sender = Sender { ctx, tasks: io.tasks.clone(), state: LoopState::default(), helpers };
    shared.ready.sender.store(true, Ordering::Relaxed);
    stage::run(&shared, sender, consumer, log, joins, Duration::from_millis(100), shutdown).await;
    Ok(())
}

/// The sender stage: the loop's state and what its tasks share.
struct Sender {
    ctx: Arc<Ctx>,
    tasks: TaskTracker,
    state: LoopState,
    /// The verification and log-flush loops, stopped by the same shutdown.
    helpers: Vec<tokio::task::JoinHandle<()>>,
}

impl Step for Sender {
    type Done = Origin;
    const NAME: &'static str = "sender";
    const RESUMED: &'static str = "retry";

    async fn revoke(&mut self, revoked: Vec<Tp>) {
        self.state.revoke(&self.ctx, revoked).await
    }

    /// Due parked deliveries are started only for assigned retry partitions.
    fn assign(&mut self, assigned: Vec<Tp>) {
        for tp in assigned.into_iter().filter(|tp| tp.0 == self.ctx.shared.config.topics.retry) {
            self.state.schedule.assign(tp.1);
        }
    }

    fn can_read(&self) -> bool {
        self.state.tracker.pending() + self.state.schedule.in_flight() < self.ctx.shared.config.delivery.max_in_flight * 4
    }

    fn submit(&mut self, msg: &BorrowedMessage<'_>) {
        self.state.on_message(&self.ctx, &self.tasks, msg)
    }

    fn join(&mut self, consumer: &TrackedConsumer, origin: Origin) {
        self.state.finished(&self.ctx, consumer, origin)
    }

    async fn tick(&mut self, consumer: &TrackedConsumer) -> bool {
        self.state.on_tick(&self.ctx, &self.tasks, consumer).await;
        false
    }

    /// Stores the retry partitions' positions: settled positions taken before a flush and
    /// written after it, then flushed too.
    async fn finish(&mut self, consumer: &TrackedConsumer) {
        let ctx = &self.ctx;
        let helpers = futures::future::join_all(std::mem::take(&mut self.helpers));
        let _ = crate::shutdown::bounded(&ctx.shared.metrics, "sender_helpers", crate::shutdown::STEP_TIMEOUT, helpers).await;
        let settled = self.state.settled(ctx);
        let _ = ctx.park.flush().await;
        self.state.record_settled(ctx, settled);
        let _ = ctx.park.flush().await;
        self.state.store_parked_positions(ctx, consumer);
    }
}

#[derive(Default)]
struct LoopState {
    tracker: OffsetTracker,
    /// Parked deliveries in flight and retry partitions assigned: which due ones a tick starts.
    schedule: Schedule,
    /// Retry partitions whose position may have moved since the last store.
    retry_dirty: HashSet<i32>,
    /// Parks written since the last sled flush.
    unflushed: bool,
}

impl LoopState {
    /// Forgets revoked partitions. A retry partition's parked rows are dropped by a scan, on
    /// a blocking thread; the loop waits for it, so nothing else writes the store meanwhile
    /// and a partition assigned again is read only once its old rows are gone.
    async fn revoke(&mut self, ctx: &Ctx, revoked: Vec<Tp>) {
        let mut dropped = Vec::new();
        for tp in revoked {
            self.tracker.revoke(&tp);
            if tp.0 == ctx.shared.config.topics.retry {
                self.schedule.revoke(tp.1);
                self.retry_dirty.remove(&tp.1);
                dropped.push(tp.1);
            }
        }
        if dropped.is_empty() {
            return;
        }
        let park = ctx.park.clone();
        let results = tokio::task::spawn_blocking(move || dropped.into_iter().map(|p| (p, park.drop_partition(p))).collect::<Vec<_>>());
        match results.await {
            Ok(results) => {
                for (partition, result) in results {
                    match result {
                        Ok(n) => tracing::info!(
                            partition,
                            parked = n,
                            "Retry partition revoked; its parked deliveries are left to the new owner."
                        ),
                        Err(error) => tracing::error!(%error, partition, "Dropping a revoked partition from the retry store failed."),
                    }
                }
            }
            Err(error) => tracing::error!(%error, "Dropping revoked partitions from the retry store failed."),
        }
        ctx.shared.metrics.retry_queue_depth.set(ctx.park.len() as i64);
    }

    fn on_message(&mut self, ctx: &Arc<Ctx>, tasks: &TaskTracker, msg: &BorrowedMessage<'_>) {
        let topics = &ctx.shared.config.topics;
        let tp: Tp = (msg.topic().to_string(), msg.partition());
        let source = SourceRef { topic: tp.0.clone(), partition: tp.1, offset: msg.offset() };
        let payload = msg.payload().unwrap_or_default();
        if tp.0 == topics.retry {
            self.park_one(ctx, tasks, source, payload);
            return;
        }
        self.tracker.begin(&tp, msg.offset());
        let origin = Origin::Live(tp, msg.offset());
        match DeliveryRecord::decode(payload) {
            Ok(record) => dispatch(ctx, tasks, record, origin),
            Err(reason) => spawn_dead_letter(ctx, tasks, payload.to_vec(), reason, source, None, origin),
        }
    }

    /// Parks a retry record in sled (unless the checkpoint shows it is there already). Every
    /// retry record goes through the tracker, finished once parked (or dead-lettered), so the
    /// tracker's position is the partition's settled position.
    fn park_one(&mut self, ctx: &Arc<Ctx>, tasks: &TaskTracker, source: SourceRef, payload: &[u8]) {
        let tp: Tp = (source.topic.clone(), source.partition);
        self.tracker.begin(&tp, source.offset);
        let applied = ctx.park.checkpoint(source.partition).ok().flatten();
        if applied.is_some_and(|c| source.offset <= c) {
            self.tracker.finish(&tp, source.offset);
            return;
        }
        match DeliveryRecord::decode(payload) {
            Ok(record) => {
                if let Err(error) = ctx.park.park(source.partition, &[(source.offset, record)]) {
                    // Left pending: holds the settled and committed positions below it.
                    tracing::error!(%error, "Parking a retry failed; it will be read again after restart.");
                    return;
                }
                self.tracker.finish(&tp, source.offset);
                self.unflushed = true;
                self.retry_dirty.insert(source.partition);
                ctx.shared.metrics.retry_queue_depth.set(ctx.park.len() as i64);
            }
            Err(reason) => {
                let origin = Origin::Live(tp, source.offset);
                spawn_dead_letter(ctx, tasks, payload.to_vec(), reason, source, None, origin);
            }
        }
    }

    fn finished(&mut self, ctx: &Ctx, consumer: &TrackedConsumer, origin: Origin) {
        match origin {
            Origin::Live(tp, offset) if tp.0 == ctx.shared.config.topics.retry => {
                // An unreadable retry record, dead-lettered: its position also waits for parks.
                self.tracker.finish(&tp, offset);
                self.retry_dirty.insert(tp.1);
            }
            Origin::Live(tp, offset) => {
                if let Some(pos) = self.tracker.finish(&tp, offset) {
                    store(consumer, &tp, pos);
                }
            }
            Origin::PutOff { parked, due_ms, busy } => self.put_off(ctx, parked, due_ms, busy),
            Origin::Parked(p) => {
                self.schedule.release(&p);
                if let Err(error) = ctx.park.remove(&p) {
                    tracing::error!(%error, "Removing a finished delivery from the retry store failed.");
                }
                ctx.shared.metrics.retry_queue_depth.set(ctx.park.len() as i64);
                self.retry_dirty.insert(p.partition);
            }
        }
    }

    /// Moves a put-off parked delivery to its new time (a busy one spread, see `schedule`),
    /// unless its partition was dropped meanwhile, and lets a later tick start it again.
    fn put_off(&mut self, ctx: &Ctx, parked: Parked, due_ms: i64, busy: bool) {
        self.schedule.release(&parked);
        let d = &ctx.shared.config.delivery;
        let due_ms = if busy {
            self.schedule.busy_due(&parked.record.subscription_id, due_ms, d.per_subscription_queue + d.per_subscription_overflow)
        } else {
            due_ms
        };
        if let Err(error) = ctx.park.reschedule(&parked, due_ms) {
            tracing::error!(%error, "Rescheduling a parked delivery failed.");
        }
    }

    /// Each retry partition's settled position: the tracker's (every record below it parked,
    /// skipped as parked already, or dead-lettered). Taken before a flush of the parks it covers.
    fn settled(&self, ctx: &Ctx) -> Vec<(i32, i64)> {
        let topic = &ctx.shared.config.topics.retry;
        self.tracker.positions().into_iter().filter(|((t, _), _)| t == topic).map(|((_, p), pos)| (p, pos)).collect()
    }

    /// Writes settled positions taken before the last successful flush; they reach disk with
    /// the next one, never before the parks they cover.
    fn record_settled(&mut self, ctx: &Ctx, settled: Vec<(i32, i64)>) {
        for (partition, pos) in settled {
            match ctx.park.set_settled(partition, pos) {
                Ok(moved) => self.unflushed |= moved,
                Err(error) => tracing::error!(%error, partition, "Recording the settled position failed."),
            }
        }
    }

    /// Flushes sled, stores retry positions, and starts due parked deliveries.
    async fn on_tick(&mut self, ctx: &Arc<Ctx>, tasks: &TaskTracker, consumer: &TrackedConsumer) {
        let settled = self.settled(ctx);
        if self.unflushed {
            if let Err(error) = ctx.park.flush().await {
                tracing::error!(%error, "Retry store flush failed.");
                return;
            }
            self.unflushed = false;
        }
        self.record_settled(ctx, settled);
        self.store_parked_positions(ctx, consumer);
        let due = match self.schedule.take_due(&ctx.park, now_ms()) {
            Ok(d) => d,
            Err(error) => return tracing::error!(%error, "Reading the retry store failed."),
        };
        for p in due {
            dispatch(ctx, tasks, p.record.clone(), Origin::Parked(p));
        }
    }

    fn store_parked_positions(&mut self, ctx: &Ctx, consumer: &TrackedConsumer) {
        let topic = ctx.shared.config.topics.retry.clone();
        for partition in self.retry_dirty.drain() {
            let tp = (topic.clone(), partition);
            let parked = ctx.park.position(partition).ok().flatten();
            let pos = match (parked, self.tracker.position(&tp)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(pos) = pos {
                store(consumer, &tp, pos);
            }
        }
    }
}

/// Where a newly assigned retry partition may resume: its settled position in the retry
/// store. The committed offset stays at the oldest parked record, for a replay with sled lost.
fn retry_resume(retry_topic: &str, park: ParkStore) -> crate::kafka::Resume {
    let retry_topic = retry_topic.to_string();
    Box::new(move |topic, partition| if topic == retry_topic { park.settled(partition).ok().flatten() } else { None })
}

fn store(consumer: &TrackedConsumer, tp: &Tp, position: i64) {
    store_position(consumer, &tp.0, tp.1, position);
}

fn spawn_dead_letter(
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
fn dispatch(ctx: &Arc<Ctx>, tasks: &TaskTracker, record: DeliveryRecord, origin: Origin) {
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

enum Turn<'a> {
    Go(tokio::sync::SemaphorePermit<'a>),
    TimedOut,
    Stopped,
}

/// Waits for one of the subscription's concurrency permits, at most `wait` if given.
async fn take_turn(state: &SubState, wait: Option<Duration>) -> Turn<'_> {
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
fn defer(ctx: &Arc<Ctx>, tasks: &TaskTracker, mut record: DeliveryRecord, origin: Origin, reason: &'static str) {
    let busy = reason == "busy";
    let wait_ms = if busy { 1_000 } else { 15_000 };
    ctx.shared.metrics.deliveries_deferred.with_label_values(&[reason]).inc();
    match origin {
        Origin::Parked(parked) => {
            let _ = ctx.done.send(Origin::PutOff { parked, due_ms: now_ms() + wait_ms, busy });
        }
        Origin::PutOff { .. } => {}
        Origin::Live(..) => {
            record.not_before_ms = now_ms() + wait_ms;
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
async fn send_and_settle(ctx: &Ctx, sub: &Subscription, state: &SubState, record: DeliveryRecord) -> bool {
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
async fn give_up(ctx: &Ctx, record: &DeliveryRecord, reason: String, stage: &'static str, outcome: &'static str) -> bool {
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
fn request_headers(sub: &Subscription, record: &DeliveryRecord) -> Vec<(String, String)> {
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
