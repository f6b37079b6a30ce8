//! The consumer-stage loop that ingest and the sender both run (getsentry/arroyo's shape).
//!
//! A stage is a [`Step`]: records are submitted to it ([`Step::submit`]), it starts their work
//! as tasks on its [`Io`], and each task reports back through the done channel with the
//! record's offset ([`Step::join`]); only then may the stage store a position, and the commit
//! (background, then a final synchronous one) is last. The loop owns what every stage needs
//! and used to write itself:
//! - rebalances ([`super::rebalance`]): a revoked partition's in-flight work is joined first
//!   (at most `shutdown.grace_ms`, then abandoned and counted in
//!   `hookd_revoke_abandoned_total{stage}`), then [`Step::revoke`] stores its final position
//!   and drops its state, and only then is the partition given up
//!   ([`super::rebalance::complete_revoke`]); assigned ones go to [`Step::assign`]; both are
//!   counted (`hookd_partitions_{assigned,revoked}_total{stage}`), records read again below
//!   a partition's previous read head in `hookd_records_replayed_total{stage}`, and
//!   partitions assigned past their committed offset ([`super::Resume`]) in
//!   `hookd_resume_skipped_records_total{source}`;
//! - back-pressure: no read while [`Step::can_read`] says the stage is full;
//! - consumer errors: logged and counted in `hookd_kafka_errors_total{stage}`, never fatal;
//! - the periodic [`Step::tick`];
//! - shutdown: stop reading, [`Step::stop_reading`], let in-flight tasks finish within
//!   `shutdown.grace_ms` while still joining their results, then cancel the rest
//!   ([`Io::hard_stop`]) and wait a bounded time ([`crate::shutdown`]), join what arrived,
//!   [`Step::finish`] (flush, settled positions, stored offsets), and the final commit and
//!   close ([`super::commit_and_close`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::offsets::Tp;
use super::rebalance::{self, Replays};
use super::{PartitionHooks, RebalanceLog, Resume, TrackedConsumer, TrackingContext};
use crate::{Error, Shared};

/// What a stage's tasks need to report back: where to spawn, where to send their results, and
/// the token that cancels them once the shutdown grace is over.
pub struct Io<D> {
    pub tasks: TaskTracker,
    pub done: mpsc::UnboundedSender<D>,
    pub hard_stop: CancellationToken,
}

impl<D> Clone for Io<D> {
    fn clone(&self) -> Self {
        Self { tasks: self.tasks.clone(), done: self.done.clone(), hard_stop: self.hard_stop.clone() }
    }
}

/// The loop's end of a stage's [`Io`].
pub struct Joins<D> {
    io: Io<D>,
    rx: mpsc::UnboundedReceiver<D>,
}

/// A fresh [`Io`] for a stage and the [`Joins`] for [`run`].
pub fn io<D>() -> (Io<D>, Joins<D>) {
    let (done, rx) = mpsc::unbounded_channel();
    let io = Io { tasks: TaskTracker::new(), done, hard_stop: CancellationToken::new() };
    (io.clone(), Joins { io, rx })
}

/// One consumer stage's steps.
pub trait Step {
    /// What a finished task reports.
    type Done: Send + 'static;
    /// `stage` label of the stage's errors, and its log name.
    const NAME: &'static str;
    /// `source` label of `hookd_resume_skipped_records_total` for partitions it resumes.
    const RESUMED: &'static str;

    /// A revocation begins: make the partitions' buffered work in-flight work (so that it is
    /// finished before they are given up).
    fn revoking(&mut self, _revoked: &[Tp]) {}
    /// Work of `revoked` begun and not yet joined; the loop joins results until it is 0.
    fn unfinished(&self, _revoked: &[Tp]) -> usize {
        0
    }
    /// Stores the final positions of revoked partitions and forgets them; awaited before the
    /// loop reads or joins anything else, and before the partitions are given up.
    fn revoke(&mut self, consumer: &TrackedConsumer, revoked: Vec<Tp>) -> impl std::future::Future<Output = ()>;
    /// Takes note of newly assigned partitions (after any revocation of the same rebalance).
    fn assign(&mut self, _assigned: Vec<Tp>) {}
    /// Whether the stage takes another record now.
    fn can_read(&self) -> bool;
    fn submit(&mut self, msg: &BorrowedMessage<'_>);
    fn join(&mut self, consumer: &TrackedConsumer, done: Self::Done);
    /// Periodic work; `true` asks for the next tick at once (more is due).
    fn tick(&mut self, consumer: &TrackedConsumer) -> impl std::future::Future<Output = bool>;
    /// Called once the loop stopped reading, before in-flight work is waited for.
    fn stop_reading(&mut self) {}
    /// Makes what is finished durable and stores its positions; last before the commit.
    fn finish(&mut self, consumer: &TrackedConsumer) -> impl std::future::Future<Output = ()>;
}

/// A consumer of `group` subscribed to `topics` whose rebalances go to the returned log and
/// whose assigned partitions resume where `resume` says.
pub fn subscribe(shared: &Shared, group: &str, topics: &[&str], resume: Resume) -> Result<(TrackedConsumer, Arc<RebalanceLog>), Error> {
    subscribe_hooked(shared, group, topics, resume, None)
}

/// [`subscribe`] with [`PartitionHooks`] run in each rebalance.
pub fn subscribe_hooked(
    shared: &Shared,
    group: &str,
    topics: &[&str],
    resume: Resume,
    hooks: Option<Arc<dyn PartitionHooks>>,
) -> Result<(TrackedConsumer, Arc<RebalanceLog>), Error> {
    let log = Arc::new(RebalanceLog::default());
    let context = TrackingContext::new(log.clone()).resuming(resume).hooked(hooks).deferring_revocations();
    let consumer: StreamConsumer<TrackingContext> = super::consumer_config(&shared.config, group).create_with_context(context)?;
    consumer.subscribe(topics)?;
    Ok((consumer, log))
}

/// Runs `step` on `consumer` until `shutdown`, then stops it as the module says.
pub async fn run<S: Step>(
    shared: &Shared,
    mut step: S,
    consumer: TrackedConsumer,
    log: Arc<RebalanceLog>,
    mut joins: Joins<S::Done>,
    tick_every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut replays = Replays::default();
    loop {
        rebalanced(shared, &mut step, &consumer, &log, &mut joins, &mut replays).await;
        let can_read = step.can_read();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = log.changed.notified() => {}
            Some(done) = joins.rx.recv() => step.join(&consumer, done),
            m = consumer.recv(), if can_read => match m {
                Ok(msg) => {
                    log.read(msg.topic(), msg.partition(), msg.offset());
                    if replays.read(msg.topic(), msg.partition(), msg.offset()) {
                        shared.metrics.records_replayed.with_label_values(&[S::NAME]).inc();
                    }
                    step.submit(&msg)
                }
                Err(error) => {
                    shared.metrics.kafka_errors.with_label_values(&[S::NAME]).inc();
                    tracing::warn!(%error, stage = S::NAME, "Consumer error.");
                }
            },
            _ = tick.tick() => {
                if step.tick(&consumer).await {
                    tick.reset_immediately();
                }
            }
        }
    }
    // A revocation recorded by the last poll is completed; later ones (the close) apply at once.
    rebalanced(shared, &mut step, &consumer, &log, &mut joins, &mut replays).await;
    log.close();
    step.stop_reading();
    drain(shared, &mut step, &consumer, &mut joins).await;
    step.finish(&consumer).await;
    super::commit_and_close(consumer, S::NAME, &shared.metrics).await;
}

/// Completes revocations ([`revoke`]), then hands assignments to the step; counts both,
/// notes where assigned partitions' previous owners had read to, and counts resumed
/// partitions' skipped records.
async fn rebalanced<S: Step>(
    shared: &Shared,
    step: &mut S,
    consumer: &TrackedConsumer,
    log: &RebalanceLog,
    joins: &mut Joins<S::Done>,
    replays: &mut Replays,
) {
    let revoked = log.take_revoked();
    if !revoked.is_empty() {
        shared.metrics.partitions_revoked.with_label_values(&[S::NAME]).inc_by(revoked.len() as u64);
        revoked.iter().for_each(|tp| replays.revoked(tp));
        revoke(shared, step, consumer, joins, revoked).await;
    }
    let assigned = log.take_assigned();
    if !assigned.is_empty() {
        shared.metrics.partitions_assigned.with_label_values(&[S::NAME]).inc_by(assigned.len() as u64);
        tracing::info!(stage = S::NAME, partitions = ?assigned, "Partitions assigned.");
        step.assign(assigned);
    }
    for (tp, head) in log.replays.lock().expect("rebalance log poisoned").drain(..) {
        replays.assigned(tp, head);
    }
    for r in log.resumed.lock().expect("rebalance log poisoned").drain(..) {
        shared.metrics.resume_skipped.with_label_values(&[S::RESUMED]).inc_by((r.settled - r.committed) as u64);
    }
}

/// A revocation: the step makes buffered work in-flight work ([`Step::revoking`]), the
/// loop joins results until none of the revoked partitions' work is unfinished or
/// `shutdown.grace_ms` passed (the rest is abandoned: not stored, done again by the new
/// owner), the step stores final positions and drops the partitions' state, and then they
/// are given up, so their stored positions are committed for the new owner.
async fn revoke<S: Step>(shared: &Shared, step: &mut S, consumer: &TrackedConsumer, joins: &mut Joins<S::Done>, revoked: Vec<Tp>) {
    step.revoking(&revoked);
    let grace = tokio::time::sleep(shared.config.shutdown.grace());
    tokio::pin!(grace);
    while step.unfinished(&revoked) > 0 {
        tokio::select! {
            Some(done) = joins.rx.recv() => step.join(consumer, done),
            _ = &mut grace => break,
        }
    }
    let abandoned = step.unfinished(&revoked);
    if abandoned > 0 {
        shared.metrics.revoke_abandoned.with_label_values(&[S::NAME]).inc_by(abandoned as u64);
        tracing::warn!(stage = S::NAME, abandoned, partitions = ?revoked, "Revoked partitions' work unfinished after the grace; their new owner does it again.");
    }
    step.revoke(consumer, revoked.clone()).await;
    rebalance::complete_revoke(consumer, &revoked);
    tracing::info!(stage = S::NAME, partitions = ?revoked, abandoned, "Partitions revoked and given up.");
}

/// Lets in-flight tasks finish within the grace, joining their results; then cancels the rest
/// and waits for them a bounded time; then joins whatever arrived.
async fn drain<S: Step>(shared: &Shared, step: &mut S, consumer: &TrackedConsumer, joins: &mut Joins<S::Done>) {
    let io = &joins.io;
    tracing::info!(stage = S::NAME, in_flight = io.tasks.len(), "Stopping; letting in-flight work finish.");
    io.tasks.close();
    let grace = tokio::time::sleep(shared.config.shutdown.grace());
    tokio::pin!(grace);
    loop {
        tokio::select! {
            Some(done) = joins.rx.recv() => step.join(consumer, done),
            _ = io.tasks.wait() => break,
            _ = &mut grace => {
                io.hard_stop.cancel();
                let _ = crate::shutdown::bounded(&shared.metrics, S::NAME, crate::shutdown::STEP_TIMEOUT, io.tasks.wait()).await;
                break;
            }
        }
    }
    while let Ok(done) = joins.rx.try_recv() {
        step.join(consumer, done);
    }
}
