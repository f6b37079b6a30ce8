//! The sender stage ([`crate::kafka::stage`]): reads `hookd.deliveries` and `hookd.retry`,
//! parks retries in the retry store, starts due ones, hands each delivery to [`super::dispatch`]
//! and stores the positions of what finished.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::http::{HttpConfig, HttpSender};
use super::park::{ParkStore, Parked};
use super::record::DeliveryRecord;
use super::schedule::Schedule;
use crate::kafka::offsets::{OffsetTracker, Tp};
use crate::kafka::stage::{self, Step};
use crate::kafka::{store_position, SourceRef, TrackedConsumer};
use crate::telemetry::{StateError, StateOp, Store};
use crate::{Error, Shared};

use super::dispatch::{dispatch, now_ms, spawn_dead_letter, Ctx, Origin};

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
    let hooks = shared.endpoints.changelog().map(|changelog| {
        let hooks = crate::endpoint::OwnerHooks {
            store: shared.endpoints.clone(),
            changelog: changelog.clone(),
            deliveries: config.topics.deliveries.clone(),
            restore_timeout: Duration::from_millis(config.kafka.max_poll_interval_ms / 2),
        };
        Arc::new(hooks) as Arc<dyn crate::kafka::PartitionHooks>
    });
    let topics = [config.topics.deliveries.as_str(), config.topics.retry.as_str()];
    let (consumer, log) = stage::subscribe_hooked(&shared, &group, &topics, resume, hooks)?;
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

    /// Live deliveries of the revoked partitions not yet finished, and parked ones in flight.
    fn unfinished(&self, revoked: &[Tp]) -> usize {
        let retry = &self.ctx.shared.config.topics.retry;
        let parked = revoked.iter().filter(|tp| &tp.0 == retry).map(|tp| self.state.schedule.in_flight_in(tp.1));
        revoked.iter().map(|tp| self.state.tracker.pending_in(tp)).sum::<usize>() + parked.sum::<usize>()
    }

    /// Stores the retry partitions' final positions, then drops the partitions' state.
    async fn revoke(&mut self, consumer: &TrackedConsumer, revoked: Vec<Tp>) {
        let retry = &self.ctx.shared.config.topics.retry;
        self.state.retry_dirty.extend(revoked.iter().filter(|tp| &tp.0 == retry).map(|tp| tp.1));
        self.state.store_parked_positions(&self.ctx, consumer);
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
        // The endpoint logs and state reach the changelog before the consumer leaves the group
        // (its partitions' next owner restores from it).
        let endpoints = ctx.shared.endpoints.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || endpoints.flush_logs()).await {
            tracing::error!(%error, "Writing the endpoint logs at shutdown failed.");
        }
        super::lifecycle::flush_changelog(&ctx.shared).await;
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
                        Err(error) => ctx.shared.metrics.emit(StateError {
                            store: Store::Retry,
                            op: StateOp::Drop,
                            error: &error,
                            partition: Some(partition),
                            then: "Dropping a revoked partition from the retry store failed.",
                        }),
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
                    ctx.shared.metrics.emit(StateError {
                        store: Store::Retry,
                        op: StateOp::Write,
                        error: &error,
                        partition: None,
                        then: "Parking a retry failed; it will be read again after restart.",
                    });
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
                    ctx.shared.metrics.emit(StateError {
                        store: Store::Retry,
                        op: StateOp::Remove,
                        error: &error,
                        partition: None,
                        then: "Removing a finished delivery from the retry store failed.",
                    });
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
            ctx.shared.metrics.emit(StateError {
                store: Store::Retry,
                op: StateOp::Reschedule,
                error: &error,
                partition: None,
                then: "Rescheduling a parked delivery failed.",
            });
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
                Err(error) => ctx.shared.metrics.emit(StateError {
                    store: Store::Retry,
                    op: StateOp::Settle,
                    error: &error,
                    partition: Some(partition),
                    then: "Recording the settled position failed.",
                }),
            }
        }
    }

    /// Flushes sled, stores retry positions, and starts due parked deliveries.
    async fn on_tick(&mut self, ctx: &Arc<Ctx>, tasks: &TaskTracker, consumer: &TrackedConsumer) {
        let settled = self.settled(ctx);
        if self.unflushed {
            if let Err(error) = ctx.park.flush().await {
                ctx.shared.metrics.emit(StateError {
                    store: Store::Retry,
                    op: StateOp::Flush,
                    error: &error,
                    partition: None,
                    then: "Retry store flush failed.",
                });
                return;
            }
            self.unflushed = false;
        }
        self.record_settled(ctx, settled);
        self.store_parked_positions(ctx, consumer);
        let due = match self.schedule.take_due(&ctx.park, now_ms()) {
            Ok(d) => d,
            Err(error) => {
                return ctx.shared.metrics.emit(StateError {
                    store: Store::Retry,
                    op: StateOp::Read,
                    error: &error,
                    partition: None,
                    then: "Reading the retry store failed.",
                })
            }
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
