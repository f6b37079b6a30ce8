//! The retry store: deliveries read from `hookd.retry`, parked in sled until their time.
//!
//! Key layout (one sled tree, so a park and its checkpoint are one atomic batch):
//! - `p` due_ms(u64 BE) partition(u32 BE) offset(u64 BE) → delivery record: ordered by due
//!   time, so finding due work is a range scan from the start, never a full scan;
//! - `s` partition offset → due_ms: the source index, for the low-watermark;
//! - `c` partition → highest offset applied: the checkpoint;
//! - `f` partition → the settled position: every record below it is parked here (or was
//!   removed after its send) or, if unreadable, dead-lettered. Taken before a flush and
//!   written after it, so it never reaches disk ahead of the parks it covers.
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

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sled::{Batch, Tree};

use super::record::DeliveryRecord;

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
    db: sled::Db,
    tree: Tree,
    /// Parked deliveries (`s` keys): counted at open, then kept by the writers, so the
    /// `hookd_retry_queue_depth` gauge never needs a scan of the tree.
    parked: Arc<AtomicUsize>,
}

fn open_db(dir: &Path, cache_bytes: u64) -> Result<(sled::Db, bool), sled::Error> {
    use std::io::ErrorKind;
    let config = || sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput);
    for _ in 0..50 {
        match config().open() {
            Ok(db) => return Ok((db, false)),
            // sled reports a held lock as `Other` with this text (sled 0.34 `config.rs`).
            Err(sled::Error::Io(e)) if e.kind() == ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock") => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            Err(sled::Error::Io(e))
                if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem | ErrorKind::StorageFull) =>
            {
                return Err(sled::Error::Io(e));
            }
            Err(error) => {
                tracing::warn!(%error, path = %dir.display(), "State store unreadable; wiping it and replaying from Kafka.");
                let _ = std::fs::remove_dir_all(dir);
                return Ok((config().open()?, true));
            }
        }
    }
    let msg = format!("state directory {} is locked by another process (is another hookd using the same state.path?)", dir.display());
    Err(sled::Error::Io(std::io::Error::new(ErrorKind::WouldBlock, msg)))
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

/// A per-partition key: `tag` then the partition (u32 BE). Both state trees use it for their
/// checkpoint (`c`) and settled position (`f`).
pub(crate) fn partition_key(tag: u8, partition: i32) -> [u8; 5] {
    let mut k = [tag; 5];
    k[1..5].copy_from_slice(&(partition as u32).to_be_bytes());
    k
}

fn ckpt_key(partition: i32) -> [u8; 5] {
    partition_key(b'c', partition)
}

fn settled_key(partition: i32) -> [u8; 5] {
    partition_key(b'f', partition)
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
    /// Opens the store in `dir`; an unreadable (corrupt) store is wiped, since Kafka replays
    /// it. A directory locked by another process is never wiped: opening waits up to 5 s for
    /// the lock (an instance in this process may still be closing), then fails.
    /// Returns whether the store was wiped.
    pub fn open(dir: &Path) -> Result<(Self, bool), sled::Error> {
        Self::open_with_cache(dir, crate::config::StateConfig::default().cache_mb << 20)
    }

    /// [`Self::open`] with sled's page cache limited to `cache_bytes` (`state.cache_mb`).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<(Self, bool), sled::Error> {
        let (db, wiped) = open_db(dir, cache_bytes)?;
        let tree = db.open_tree("retry")?;
        let parked = Arc::new(AtomicUsize::new(count_parked(&tree)));
        Ok((Self { db, tree, parked }, wiped))
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
        if self.checkpoint(partition)?.is_none_or(|c| c < max) {
            b.insert(&ckpt_key(partition), &(max as u64).to_be_bytes());
        }
        self.tree.apply_batch(b)?;
        self.parked.fetch_add(fresh.len(), Ordering::Relaxed);
        Ok(())
    }

    /// Highest offset of `partition` already applied to this store.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        Ok(self.tree.get(ckpt_key(partition))?.map(|v| be_i64(&v)))
    }

    /// Records that every record of `partition` below `position` is parked or finished; never
    /// moves backwards. Returns whether it moved (then a flush is due).
    pub fn set_settled(&self, partition: i32, position: i64) -> Result<bool, sled::Error> {
        if self.settled(partition)?.is_some_and(|s| s >= position) {
            return Ok(false);
        }
        self.tree.insert(settled_key(partition), &(position.max(0) as u64).to_be_bytes())?;
        Ok(true)
    }

    /// Where a consumer of `partition` may resume with this store intact (see `f` above).
    pub fn settled(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        Ok(self.tree.get(settled_key(partition))?.map(|v| be_i64(&v)))
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
        let lo = src_key(partition, 0);
        let hi = src_key(partition, i64::MAX);
        if let Some((k, _)) = self.tree.range(&lo[..]..=&hi[..]).next().transpose()? {
            return Ok(Some(be_i64(&k[5..])));
        }
        Ok(self.checkpoint(partition)?.map(|c| c + 1))
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
        b.remove(&ckpt_key(partition));
        b.remove(&settled_key(partition));
        self.tree.apply_batch(b)?;
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
        self.db.flush_async().await.map(|_| ())
    }

    /// The sled database, for other stages' trees.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}

#[cfg(test)]
mod tests;
