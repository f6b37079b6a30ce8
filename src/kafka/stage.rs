//! The consumer-stage loop that ingest and the sender both run (getsentry/arroyo's shape).
//!
//! A stage is a [`Step`]: records are submitted to it ([`Step::submit`]), it starts their work
//! as tasks on its [`Io`], and each task reports back through the done channel with the
//! record's offset ([`Step::join`]); only then may the stage store a position, and the commit
//! (background, then a final synchronous one) is last. The loop owns what every stage needs
//! and used to write itself:
//! - rebalances: revoked partitions are handed to [`Step::revoke`] before anything else, then
//!   assigned ones to [`Step::assign`], and
//!   partitions assigned past their committed offset ([`super::Resume`]) are counted in
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
use rdkafka::message::BorrowedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::offsets::Tp;
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

    /// Forgets revoked partitions; awaited before the loop reads or joins anything else.
    fn revoke(&mut self, revoked: Vec<Tp>) -> impl std::future::Future<Output = ()>;
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
    let context = TrackingContext::new(log.clone()).resuming(resume).hooked(hooks);
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
    loop {
        rebalanced(shared, &mut step, &log).await;
        let can_read = step.can_read();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = joins.rx.recv() => step.join(&consumer, done),
            m = consumer.recv(), if can_read => match m {
                Ok(msg) => step.submit(&msg),
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
    step.stop_reading();
    drain(shared, &mut step, &consumer, &mut joins).await;
    step.finish(&consumer).await;
    super::commit_and_close(consumer, S::NAME, &shared.metrics).await;
}

/// Hands revocations, then assignments, to the step and counts resumed partitions' skipped
/// records.
async fn rebalanced<S: Step>(shared: &Shared, step: &mut S, log: &RebalanceLog) {
    let revoked: Vec<Tp> = log.revoked.lock().expect("rebalance log poisoned").drain(..).collect();
    if !revoked.is_empty() {
        step.revoke(revoked).await;
    }
    let assigned: Vec<Tp> = log.assigned.lock().expect("rebalance log poisoned").drain(..).collect();
    if !assigned.is_empty() {
        step.assign(assigned);
    }
    for r in log.resumed.lock().expect("rebalance log poisoned").drain(..) {
        shared.metrics.resume_skipped.with_label_values(&[S::RESUMED]).inc_by((r.settled - r.committed) as u64);
    }
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
