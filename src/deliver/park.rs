//! The retry store: deliveries read from `hookd.retry`, parked in sled until their time.
//!
//! Key layout (one sled tree, so a park and its checkpoint are one atomic batch):
//! - `p` due_ms(u64 BE) partition(u32 BE) offset(u64 BE) → delivery record: ordered by due
//!   time, so finding due work is a range scan from the start, never a full scan;
//! - `s` partition offset → due_ms: the source index, for the low-watermark;
//! - `c` partition and `f` partition: the checkpoint and the settled position of
//!   [`crate::state::Partitions`] (settled: every record below it is parked here, or was
//!   removed after its send, or, if unreadable, dead-lettered).
//!
//! Offsets of `hookd.retry` obey DESIGN section 2: the position committed for a partition is
//! the smallest source offset still parked (its work is unfinished), or one past the
//! checkpoint when nothing is parked. After a restart with this store intact, the consumer
//! is assigned the partition at the settled position (nothing below it is read again);
//! records at or below the checkpoint are still skipped should they be read. With the store
//! lost, the consumer replays from the committed position and parks them again.
//!
//! Writes come from one task at a time (the sender loop, or a blocking task it awaits), so
//! the count of parked deliveries is kept exactly beside the tree instead of being counted
//! by a scan: it is counted once at open and moved by every park, remove and drop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sled::{Batch, Tree};

use super::record::DeliveryRecord;
use crate::state::{Partitions, StateDb};

/// One parked delivery.
#[derive(Debug, Clone)]
pub struct Parked {
    pub partition: i32,
    pub offset: i64,
    pub due_ms: i64,
    pub record: DeliveryRecord,
}

#[derive(Clone)]
pub struct ParkStore {
    db: StateDb,
    tree: Tree,
    partitions: Partitions,
    /// Parked deliveries (`s` keys): counted at open, then kept by the writers, so the
    /// `hookd_retry_queue_depth` gauge never needs a scan of the tree.
    parked: Arc<AtomicUsize>,
}

fn due_key(due_ms: i64, partition: i32, offset: i64) -> [u8; 21] {
    let mut k = [0u8; 21];
    k[0] = b'p';
    k[1..9].copy_from_slice(&(due_ms.max(0) as u64).to_be_bytes());
    k[9..13].copy_from_slice(&(partition as u32).to_be_bytes());
    k[13..21].copy_from_slice(&(offset as u64).to_be_bytes());
    k
}

fn src_key(partition: i32, offset: i64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = b's';
    k[1..5].copy_from_slice(&(partition as u32).to_be_bytes());
    k[5..13].copy_from_slice(&(offset as u64).to_be_bytes());
    k
}

/// Parked deliveries counted by a scan of the `s` keys (once, at open).
fn count_parked(tree: &Tree) -> usize {
    tree.scan_prefix([b's']).count()
}

fn be_i64(v: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[..8]);
    u64::from_be_bytes(b) as i64
}

impl ParkStore {
    /// Opens the `retry` tree and counts the parked deliveries (a scan: off the runtime).
    pub fn open(db: &StateDb) -> Result<Self, sled::Error> {
        let tree = db.tree("retry")?;
        let parked = Arc::new(AtomicUsize::new(count_parked(&tree)));
        Ok(Self { db: db.clone(), partitions: Partitions::new(tree.clone()), tree, parked })
    }

    /// Parks records of one partition and moves its checkpoint, atomically. A record parked
    /// already (same partition and offset) is replaced, not counted twice.
    pub fn park(&self, partition: i32, items: &[(i64, DeliveryRecord)]) -> Result<(), sled::Error> {
        let Some(max) = items.iter().map(|(o, _)| *o).max() else { return Ok(()) };
        let mut b = Batch::default();
        let mut fresh = std::collections::HashSet::new();
        for (offset, record) in items {
            match self.parked_due(partition, *offset)? {
                Some(old) => b.remove(&due_key(old, partition, *offset)),
                None => {
                    fresh.insert(*offset);
                }
            }
            b.insert(&due_key(record.not_before_ms, partition, *offset), record.encode());
            b.insert(&src_key(partition, *offset), &(record.not_before_ms.max(0) as u64).to_be_bytes());
        }
        let moves = self.partitions.advance(&mut b, [(partition, max)])?;
        self.tree.apply_batch(b)?;
        self.partitions.applied(moves);
        self.parked.fetch_add(fresh.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Highest offset of `partition` already applied to this store.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.checkpoint(partition)
    }

    /// Records that every record of `partition` below `position` is parked or finished; never
    /// moves backwards. Returns whether it moved (then a flush is due).
    pub fn set_settled(&self, partition: i32, position: i64) -> Result<bool, sled::Error> {
        self.partitions.set_settled(partition, position)
    }

    /// Where a consumer of `partition` may resume with this store intact (see `f` above).
    pub fn settled(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.settled(partition)
    }

    /// Up to `limit` parked deliveries due at `now_ms`, earliest first, passing over those
    /// for which `skip(partition, offset)` holds (in flight, or of a partition not assigned):
    /// they are not decoded and do not count toward `limit`, so rows that cannot be started
    /// never hide the ones behind them.
    pub fn due(&self, now_ms: i64, limit: usize, mut skip: impl FnMut(i32, i64) -> bool) -> Result<Vec<Parked>, sled::Error> {
        let end = due_key(now_ms, i32::MAX, i64::MAX);
        let mut out = Vec::new();
        for kv in self.tree.range(&[b'p'][..]..=&end[..]) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let (partition, offset) = (u32::from_be_bytes([k[9], k[10], k[11], k[12]]) as i32, be_i64(&k[13..]));
            if skip(partition, offset) {
                continue;
            }
            match DeliveryRecord::decode(&v) {
                Ok(record) => out.push(Parked { partition, offset, due_ms: be_i64(&k[1..]), record }),
                Err(error) => {
                    tracing::error!(%error, partition, offset, "Unreadable parked delivery removed.");
                    self.tree.remove(k)?;
                }
            }
        }
        Ok(out)
    }

    /// Due time of the earliest parked delivery.
    pub fn next_due_ms(&self) -> Result<Option<i64>, sled::Error> {
        let first = self.tree.range(&[b'p'][..]..&[b'q'][..]).next().transpose()?;
        Ok(first.map(|(k, _)| be_i64(&k[1..])))
    }

    /// Removes a finished delivery. Returns false when it was not parked (any more): its
    /// partition was dropped meanwhile.
    pub fn remove(&self, p: &Parked) -> Result<bool, sled::Error> {
        let Some(due) = self.parked_due(p.partition, p.offset)? else { return Ok(false) };
        let mut b = Batch::default();
        b.remove(&due_key(due, p.partition, p.offset));
        b.remove(&src_key(p.partition, p.offset));
        self.tree.apply_batch(b)?;
        self.parked.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Moves a parked delivery to a later time (subscription disabled or busy). Returns false,
    /// and parks nothing, when it is not parked any more (its partition was dropped meanwhile):
    /// a put-off delivery never brings back a row its partition's new owner is responsible for.
    pub fn reschedule(&self, p: &Parked, due_ms: i64) -> Result<bool, sled::Error> {
        let Some(old) = self.parked_due(p.partition, p.offset)? else { return Ok(false) };
        let mut b = Batch::default();
        b.remove(&due_key(old, p.partition, p.offset));
        b.insert(&due_key(due_ms, p.partition, p.offset), p.record.encode());
        b.insert(&src_key(p.partition, p.offset), &(due_ms.max(0) as u64).to_be_bytes());
        self.tree.apply_batch(b)?;
        Ok(true)
    }

    /// The due time a parked delivery is stored under (its `s` entry), if it is parked.
    fn parked_due(&self, partition: i32, offset: i64) -> Result<Option<i64>, sled::Error> {
        Ok(self.tree.get(src_key(partition, offset))?.map(|v| be_i64(&v)))
    }

    /// The offset of `partition` that may be committed: the smallest parked source offset,
    /// else one past the checkpoint.
    pub fn position(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.position(partition, || {
            let (lo, hi) = (src_key(partition, 0), src_key(partition, i64::MAX));
            Ok(self.tree.range(&lo[..]..=&hi[..]).next().transpose()?.map(|(k, _)| be_i64(&k[5..])))
        })
    }

    /// Forgets a partition given to another instance (it replays from the committed position).
    /// A scan of the partition's rows: run it off the async runtime (`spawn_blocking`).
    pub fn drop_partition(&self, partition: i32) -> Result<usize, sled::Error> {
        let mut prefix = vec![b's'];
        prefix.extend_from_slice(&(partition as u32).to_be_bytes());
        let mut b = Batch::default();
        let mut n = 0;
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            b.remove(&due_key(be_i64(&v), partition, be_i64(&k[5..])));
            b.remove(k);
            n += 1;
        }
        let moves = self.partitions.forget(&mut b, partition);
        self.tree.apply_batch(b)?;
        self.partitions.applied(moves);
        self.parked.fetch_sub(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Parked deliveries: the maintained count, no scan.
    pub fn len(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush().await
    }
}

#[cfg(test)]
mod tests;
