//! Rebalances of a stage's consumer (`partition.assignment.strategy=cooperative-sticky`): only
//! partitions that move are revoked and assigned, and a revocation waits for the stage.
//!
//! librdkafka calls the rebalance callback ([`TrackingContext`]) during the poll that the
//! stage's loop makes. For an assignment the callback sets each partition's start offset
//! ([`Resume`]) and notes how far the partition's previous owner had read (commit metadata,
//! [`READ_HEAD`]), so the loop can count records read again ([`Replays`]). For a revocation it
//! only records the partitions and wakes the loop: the partitions stay assigned until the loop
//! has finished (or, past `shutdown.grace_ms`, abandoned) their in-flight work, stored their
//! positions and dropped their state, and then calls [`complete_revoke`], which gives them up
//! (`incremental_unassign`); librdkafka commits their stored positions on the way out. The
//! group's rebalance waits for that call, so the new owner starts at the final position.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::offsets::Tp;
use super::TrackedConsumer;

/// Prefix of the commit metadata hookd writes with a position: `hookd:read=<offset>`, the
/// next offset after the last record the committing instance had read from the partition.
pub const READ_HEAD: &str = "hookd:read=";

/// Partitions revoked and assigned by a rebalance, handed from the consumer's callback (which
/// runs on the polling thread) to the stage's loop.
#[derive(Default)]
pub struct RebalanceLog {
    /// Revoked partitions whose revocation the loop has not completed yet.
    pub revoked: Mutex<Vec<Tp>>,
    pub assigned: Mutex<Vec<Tp>>,
    /// Partitions assigned at a position past their committed offset ([`Resume`]).
    pub resumed: Mutex<Vec<Resumed>>,
    /// Newly assigned partitions with the read head their previous owner committed.
    pub replays: Mutex<Vec<(Tp, i64)>>,
    /// Wakes the loop when the callback recorded something.
    pub changed: tokio::sync::Notify,
    /// Set once the loop handles no more revocations (it stopped): the callback gives
    /// revoked partitions up at once, as librdkafka's close needs.
    closing: AtomicBool,
    /// Per partition: the read head (one past the last record the loop read) and the last
    /// position stored ([`super::store_position`]), so that every stored position carries the
    /// read head as commit metadata ([`READ_HEAD`]).
    progress: Mutex<HashMap<String, HashMap<i32, Progress>>>,
}

impl RebalanceLog {
    /// From now on revocations are applied by the callback itself.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// The loop read the record at `offset`.
    pub fn read(&self, topic: &str, partition: i32, offset: i64) {
        let mut progress = self.progress.lock().expect("rebalance log poisoned");
        let p = match progress.get_mut(topic) {
            Some(parts) => parts.entry(partition).or_default(),
            None => progress.entry(topic.to_string()).or_default().entry(partition).or_default(),
        };
        p.head = p.head.max(offset + 1);
    }

    /// Records `position` as stored and returns the metadata to store with it.
    pub(super) fn stored(&self, topic: &str, partition: i32, position: i64) -> String {
        let mut progress = self.progress.lock().expect("rebalance log poisoned");
        let p = match progress.get_mut(topic) {
            Some(parts) => parts.entry(partition).or_default(),
            None => progress.entry(topic.to_string()).or_default().entry(partition).or_default(),
        };
        p.stored = Some(position);
        format!("{READ_HEAD}{}", p.head.max(position))
    }

    /// The last stored position and read head of a partition; forgotten when `forget`.
    fn progress_of(&self, tp: &Tp, forget: bool) -> Option<Progress> {
        let mut progress = self.progress.lock().expect("rebalance log poisoned");
        let parts = progress.get_mut(&tp.0)?;
        if forget {
            parts.remove(&tp.1)
        } else {
            parts.get(&tp.1).copied()
        }
    }

    /// Every partition with a stored position.
    pub fn stored_partitions(&self) -> Vec<Tp> {
        let progress = self.progress.lock().expect("rebalance log poisoned");
        let stored = progress.iter().flat_map(|(t, parts)| parts.iter().filter(|(_, p)| p.stored.is_some()).map(|(p, _)| (t.clone(), *p)));
        stored.collect()
    }

    fn take(&self, list: &Mutex<Vec<Tp>>) -> Vec<Tp> {
        list.lock().expect("rebalance log poisoned").drain(..).collect()
    }

    pub fn take_revoked(&self) -> Vec<Tp> {
        self.take(&self.revoked)
    }

    pub fn take_assigned(&self) -> Vec<Tp> {
        self.take(&self.assigned)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    head: i64,
    stored: Option<i64>,
}

/// Asks a stage where a newly assigned partition may resume with its local state intact: a
/// position below which every record is finished and kept in sled (DESIGN section 2: "seek past
/// what sled already applied"), or None to resume from the committed offset.
pub type Resume = Box<dyn Fn(&str, i32) -> Option<i64> + Send + Sync>;

/// A partition assigned past its committed offset: records `committed..settled` are not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumed {
    pub topic: String,
    pub partition: i32,
    pub committed: i64,
    pub settled: i64,
}

/// Work a stage does in a rebalance, before librdkafka applies the change: nothing is fetched
/// from an assigned partition before [`Self::assigning`] returns, and a revoked partition is
/// given up only after [`Self::revoking`] (the sender restores and hands over endpoint state,
/// `endpoint::restore`); a deferred revocation runs it in [`complete_revoke`], once the
/// partitions' work is done. Both block the consumer's poll: keep them bounded well under
/// `kafka.max_poll_interval_ms`.
pub trait PartitionHooks: Send + Sync {
    fn assigning(&self, partitions: &[(String, i32)]);
    fn revoking(&self, partitions: &[(String, i32)]);
}

/// Consumer context that records rebalances in a [`RebalanceLog`], assigns partitions at the
/// stage's settled position when it is past the committed offset ([`Resume`]) and leaves
/// revocations to the loop ([`complete_revoke`]).
pub struct TrackingContext {
    log: Arc<RebalanceLog>,
    resume: Option<Resume>,
    /// Revocations wait for [`complete_revoke`] (a stage loop runs it); else applied at once.
    defer: bool,
    hooks: Option<Arc<dyn PartitionHooks>>,
}

impl TrackingContext {
    pub fn new(log: Arc<RebalanceLog>) -> Self {
        Self { log, resume: None, defer: false, hooks: None }
    }

    /// Runs `hooks` in every rebalance, before the change is applied.
    pub fn hooked(self, hooks: Option<Arc<dyn PartitionHooks>>) -> Self {
        Self { hooks, ..self }
    }

    fn run_hooks(&self, assigning: bool, tpl: &TopicPartitionList) {
        let Some(hooks) = &self.hooks else { return };
        let tps: Vec<Tp> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        match assigning {
            true => outside_worker(|| hooks.assigning(&tps)),
            false => outside_worker(|| hooks.revoking(&tps)),
        }
    }

    /// Leaves revocations to the consumer's loop, which must call [`complete_revoke`] (and
    /// [`RebalanceLog::close`] before the consumer is closed).
    pub fn deferring_revocations(self) -> Self {
        Self { defer: true, ..self }
    }

    /// Resumes assigned partitions where `resume` says, when that is past the committed offset.
    pub fn resuming(self, resume: Resume) -> Self {
        Self { resume: Some(resume), ..self }
    }

    pub fn log(&self) -> &Arc<RebalanceLog> {
        &self.log
    }

    /// Reads the committed offsets of the assigned partitions, sets the offset of each one
    /// with a settled position past its committed offset, so the assignment starts there, and
    /// records the previous owner's read head of each. The committed offset itself is left as
    /// it is (it stays at the low-watermark, for a replay with state lost). A partition whose
    /// revocation the stage has not processed yet is not resumed. Any doubt (committed offsets
    /// unreadable) means no seek, i.e. a replay.
    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        let mut wanted = TopicPartitionList::new();
        let mut settled = HashMap::new();
        {
            let revoked = self.log.revoked.lock().expect("rebalance log poisoned");
            for e in tpl.elements() {
                let tp = (e.topic().to_string(), e.partition());
                wanted.add_partition(&tp.0, tp.1);
                if revoked.contains(&tp) {
                    continue;
                }
                if let Some(pos) = self.resume.as_ref().and_then(|resume| resume(&tp.0, tp.1)) {
                    settled.insert(tp, pos);
                }
            }
        }
        let committed = match outside_worker(|| consumer.committed_offsets(wanted, Duration::from_secs(10))) {
            Ok(c) => c,
            Err(error) => return tracing::warn!(%error, "Committed offsets unreadable; resuming from them (replay)."),
        };
        let (mut resumed, mut replays) =
            (self.log.resumed.lock().expect("rebalance log poisoned"), self.log.replays.lock().expect("rebalance log poisoned"));
        for e in committed.elements() {
            let tp = (e.topic().to_string(), e.partition());
            if let Some(head) = read_head(&e) {
                replays.push((tp.clone(), head));
            }
            let (Some(&pos), Offset::Offset(committed)) = (settled.get(&tp), e.offset()) else { continue };
            if pos > committed && tpl.set_partition_offset(&tp.0, tp.1, Offset::Offset(pos)).is_ok() {
                tracing::info!(topic = %tp.0, partition = tp.1, committed, settled = pos, "Resuming past the committed offset; local state holds the rest.");
                resumed.push(Resumed { topic: tp.0, partition: tp.1, committed, settled: pos });
            }
        }
    }
}

/// The read head in a committed offset's metadata, if hookd wrote it.
fn read_head(e: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>) -> Option<i64> {
    // rdkafka panics on metadata that is not UTF-8 (another client may have written any).
    let metadata = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_string())).ok()?;
    metadata.strip_prefix(READ_HEAD)?.parse().ok()
}

/// Runs `f`, which blocks, from a consumer callback. librdkafka invokes the rebalance callback
/// synchronously inside the poll that `StreamConsumer::recv` makes, i.e. on a tokio worker;
/// on the multi-thread runtime `block_in_place` first hands that worker's other tasks to
/// another thread, so only the task polling this consumer waits (it cannot go on before the
/// assignment anyway). Without a runtime, or on a current-thread one (where `block_in_place`
/// would panic and there is no other thread to move to), `f` just runs.
fn outside_worker<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl rdkafka::ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    /// An assignment: offsets set by [`TrackingContext::on_assign`], then `incremental_assign`
    /// (`assign` under the eager protocol). A revocation: recorded for the loop, which gives
    /// the partitions up with [`complete_revoke`] once their work is done; applied at once
    /// when the loop has stopped (the consumer's close).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: rdkafka::types::RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        use rdkafka::types::RDKafkaRespErr::{
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS as ASSIGN, RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS as REVOKE,
        };
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            ASSIGN => {
                self.run_hooks(true, tpl);
                self.on_assign(consumer, tpl);
                let result = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
                result
            }
            // Nothing to wait for when nothing is revoked (an eager rejoin before any assignment).
            REVOKE if self.defer && tpl.count() > 0 && !self.log.closing.load(Ordering::SeqCst) => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                self.log.changed.notify_one();
                Ok(())
            }
            REVOKE => {
                self.run_hooks(false, tpl);
                unassign(consumer, tpl)
            }
            other => {
                tracing::error!(error = ?other, "Rebalance error.");
                unassign(consumer, tpl)
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "Applying a rebalance failed.");
        }
    }

    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut r = self.log.revoked.lock().expect("rebalance log poisoned");
            r.extend(tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())));
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut a = self.log.assigned.lock().expect("rebalance log poisoned");
            a.extend(tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())));
            self.log.changed.notify_one();
        }
    }
}

/// Gives partitions up: `incremental_unassign`, or `unassign` (all) under the eager protocol.
fn unassign(consumer: &impl Consumer<TrackingContext>, tpl: &TopicPartitionList) -> Result<(), KafkaError> {
    match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(tpl),
        _ => consumer.unassign(),
    }
}

/// Stores the last position of each of `partitions` again, with the partition's read head as
/// commit metadata ([`READ_HEAD`]), and forgets them when `forget`. librdkafka commits a stored
/// position only when it moved, but always when it gives the partition up, so this is what
/// the partition's next owner finds.
pub fn store_read_heads(consumer: &TrackedConsumer, partitions: &[Tp], forget: bool) {
    let log = consumer.context().log();
    let mut tpl = TopicPartitionList::new();
    for tp in partitions {
        let Some(Progress { head, stored: Some(pos) }) = log.progress_of(tp, forget) else { continue };
        if tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(pos)).is_ok() {
            if let Some(mut e) = tpl.find_partition(&tp.0, tp.1) {
                e.set_metadata(format!("{READ_HEAD}{}", head.max(pos)));
            }
        }
    }
    if tpl.count() > 0 {
        if let Err(error) = consumer.store_offsets(&tpl) {
            tracing::debug!(%error, "Read heads not stored (partitions no longer assigned).");
        }
    }
}

/// Ends a revocation the loop has processed: stores the partitions' positions with their read
/// heads, then gives them up; librdkafka commits the stored positions as it does so.
pub fn complete_revoke(consumer: &TrackedConsumer, revoked: &[Tp]) {
    store_read_heads(consumer, revoked, true);
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in revoked {
        tpl.add_partition(topic, *partition);
    }
    consumer.context().run_hooks(false, &tpl);
    if let Err(error) = unassign(consumer, &tpl) {
        tracing::error!(%error, "Giving up revoked partitions failed.");
    }
}

/// Counts records read again after an assignment: a newly assigned partition's records below
/// the read head its previous owner committed ([`READ_HEAD`]) were read before, by that owner
/// or by this instance before a restart.
#[derive(Default)]
pub struct Replays {
    until: HashMap<String, HashMap<i32, i64>>,
}

impl Replays {
    /// The partition was assigned; its previous owner had read up to `head` (exclusive).
    pub fn assigned(&mut self, tp: Tp, head: i64) {
        self.until.entry(tp.0).or_default().insert(tp.1, head);
    }

    pub fn revoked(&mut self, tp: &Tp) {
        if let Some(p) = self.until.get_mut(&tp.0) {
            p.remove(&tp.1);
        }
    }

    /// Whether the record at `offset` is read again; a partition past its head is forgotten.
    pub fn read(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        if self.until.is_empty() {
            return false;
        }
        let Some(parts) = self.until.get_mut(topic) else { return false };
        let Some(&head) = parts.get(&partition) else { return false };
        if offset + 1 >= head {
            parts.remove(&partition);
            if parts.is_empty() {
                self.until.remove(topic);
            }
        }
        offset < head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_count_records_below_the_previous_read_head_only() {
        let mut r = Replays::default();
        let tp: Tp = ("chat.messages".into(), 1);
        r.assigned(tp.clone(), 10);
        assert!(!r.read("chat.messages", 0, 3), "another partition");
        assert!(r.read("chat.messages", 1, 7));
        assert!(r.read("chat.messages", 1, 9), "the last record read before");
        assert!(!r.read("chat.messages", 1, 10), "new from here on");
        assert!(!r.read("chat.messages", 1, 4), "forgotten once past the head");
        r.assigned(tp.clone(), 20);
        r.revoked(&tp);
        assert!(!r.read("chat.messages", 1, 15), "revoked: nothing counted");
    }
}
