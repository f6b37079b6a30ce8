//! The per-partition protocol, in the tree of the store that uses it:
//! - `c` partition(u32 BE) → the checkpoint: the highest offset applied to the store. Moved
//!   forward only, in the same sled batch as the data it covers (see [`Partitions::advance`]);
//!   a record read again at or below it is skipped.
//! - `f` partition → the settled position: every offset below it is finished. The consumer
//!   takes it before a flush and writes it after, so it never reaches disk ahead of what it
//!   vouches for; on assignment the consumer starts there instead of at the committed offset.
//!
//! Values are offsets, never negative, stored big-endian with the sign bit flipped (the order
//! encoding the window store uses for every number in its keys). The retry store wrote them as
//! plain big-endian before; such a value has the top bit clear and is still read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::{Batch, Tree};

const CHECKPOINT: u8 = b'c';
const SETTLED: u8 = b'f';

fn key(tag: u8, partition: i32) -> [u8; 5] {
    let mut k = [tag; 5];
    k[1..5].copy_from_slice(&(partition as u32).to_be_bytes());
    k
}

fn encode(offset: i64) -> [u8; 8] {
    ((offset.max(0) as u64) ^ (1 << 63)).to_be_bytes()
}

fn decode(v: &[u8]) -> Option<i64> {
    let raw = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    Some(if raw & (1 << 63) != 0 { (raw ^ (1 << 63)) as i64 } else { raw as i64 })
}

fn read(tree: &Tree, k: [u8; 5]) -> Result<Option<i64>, sled::Error> {
    match tree.get(k)? {
        None => Ok(None),
        Some(v) => decode(&v).map(Some).ok_or_else(|| corrupt("partition position")),
    }
}

fn corrupt(what: &str) -> sled::Error {
    sled::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("state store: unreadable {what}")))
}

/// Checkpoint moves staged in a batch, for [`Partitions::applied`] once it is applied.
#[must_use = "pass to Partitions::applied once the batch is applied"]
#[derive(Debug, Default)]
pub struct Moves(Vec<(i32, Option<i64>)>);

/// The partition bookkeeping of one store's tree. Cheap to clone; clones share the cache of
/// checkpoints (read once per partition: the consumer asks for one per record).
#[derive(Clone)]
pub struct Partitions {
    tree: Tree,
    checkpoints: Arc<Mutex<HashMap<i32, Option<i64>>>>,
}

impl Partitions {
    pub fn new(tree: Tree) -> Self {
        Self { tree, checkpoints: Arc::default() }
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<i32, Option<i64>>> {
        self.checkpoints.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Highest offset of `partition` applied to the store. The cache is filled under its lock,
    /// and [`Self::applied`] updates it under the same lock after the batch is on the tree, so
    /// a fill racing a write can never leave the cache behind the tree.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        let mut cache = self.cache();
        if let Some(c) = cache.get(&partition) {
            return Ok(*c);
        }
        let c = read(&self.tree, key(CHECKPOINT, partition))?;
        cache.insert(partition, c);
        Ok(c)
    }

    /// Adds to `b` the move of each partition's checkpoint to the highest offset given for it,
    /// where that is ahead of the current one.
    pub fn advance(&self, b: &mut Batch, highest: impl IntoIterator<Item = (i32, i64)>) -> Result<Moves, sled::Error> {
        let mut per_partition: HashMap<i32, i64> = HashMap::new();
        for (p, o) in highest {
            let e = per_partition.entry(p).or_insert(o);
            *e = (*e).max(o);
        }
        let mut moves = Moves::default();
        for (partition, offset) in per_partition {
            if self.checkpoint(partition)?.is_none_or(|c| c < offset) {
                b.insert(&key(CHECKPOINT, partition), &encode(offset));
                moves.0.push((partition, Some(offset)));
            }
        }
        Ok(moves)
    }

    /// Adds to `b` the removal of everything kept about `partition` (revoked: its new owner
    /// replays from the committed offset).
    pub fn forget(&self, b: &mut Batch, partition: i32) -> Moves {
        b.remove(&key(CHECKPOINT, partition));
        b.remove(&key(SETTLED, partition));
        Moves(vec![(partition, None)])
    }

    /// Makes the cache follow a batch of [`Self::advance`] or [`Self::forget`] moves that was
    /// applied to the tree.
    pub fn applied(&self, moves: Moves) {
        self.cache().extend(moves.0);
    }

    /// Records that every offset of `partition` below `position` is finished; never moves
    /// backwards. Returns whether it moved (then a flush is due). `position` must have been
    /// taken before a flush that completed.
    pub fn set_settled(&self, partition: i32, position: i64) -> Result<bool, sled::Error> {
        if self.settled(partition)?.is_some_and(|s| s >= position) {
            return Ok(false);
        }
        self.tree.insert(key(SETTLED, partition), &encode(position))?;
        Ok(true)
    }

    /// Where a consumer of `partition` may resume with the store intact; None when the store
    /// holds nothing of the partition (new, wiped, revoked).
    pub fn settled(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        read(&self.tree, key(SETTLED, partition))
    }

    /// The offset of `partition` that may be committed: the store's low-watermark (smallest
    /// offset whose work is unfinished) or else one past the checkpoint. The checkpoint is
    /// read first, so a write landing between the two reads only makes the answer smaller
    /// than it could be, never larger.
    pub fn position(
        &self,
        partition: i32,
        low_watermark: impl FnOnce() -> Result<Option<i64>, sled::Error>,
    ) -> Result<Option<i64>, sled::Error> {
        let ckpt = self.checkpoint(partition)?;
        Ok(low_watermark()?.or(ckpt.map(|c| c.saturating_add(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, db.open_tree("t").unwrap())
    }

    fn advance(p: &Partitions, tree: &Tree, highest: &[(i32, i64)]) {
        let mut b = Batch::default();
        let moves = p.advance(&mut b, highest.iter().copied()).unwrap();
        tree.apply_batch(b).unwrap();
        p.applied(moves);
    }

    #[test]
    fn checkpoint_moves_forward_only_per_partition_and_survives_reopen() {
        let (_dir, tree) = tree();
        let p = Partitions::new(tree.clone());
        assert_eq!(p.checkpoint(0).unwrap(), None);
        advance(&p, &tree, &[(0, 5), (0, 9), (1, 2)]);
        advance(&p, &tree, &[(0, 7)]);
        assert_eq!((p.checkpoint(0).unwrap(), p.checkpoint(1).unwrap()), (Some(9), Some(2)));
        let fresh = Partitions::new(tree);
        assert_eq!(fresh.checkpoint(0).unwrap(), Some(9), "read back from the tree, not the cache");
    }

    #[test]
    fn a_staged_move_is_not_seen_before_its_batch_is_applied() {
        let (_dir, tree) = tree();
        let p = Partitions::new(tree.clone());
        let mut b = Batch::default();
        let moves = p.advance(&mut b, [(3, 40)]).unwrap();
        assert_eq!(p.checkpoint(3).unwrap(), None);
        tree.apply_batch(b).unwrap();
        p.applied(moves);
        assert_eq!(p.checkpoint(3).unwrap(), Some(40));
    }

    #[test]
    fn settled_forward_only_and_forgotten_with_the_checkpoint() {
        let (_dir, tree) = tree();
        let p = Partitions::new(tree.clone());
        advance(&p, &tree, &[(0, 10), (1, 10)]);
        assert!(p.set_settled(0, 8).unwrap());
        assert!(!p.set_settled(0, 6).unwrap(), "never backwards");
        assert!(!p.set_settled(0, 8).unwrap(), "not moved: no flush due");
        assert_eq!(p.settled(0).unwrap(), Some(8));
        let mut b = Batch::default();
        let moves = p.forget(&mut b, 0);
        tree.apply_batch(b).unwrap();
        p.applied(moves);
        assert_eq!((p.checkpoint(0).unwrap(), p.settled(0).unwrap()), (None, None));
        assert_eq!(p.checkpoint(1).unwrap(), Some(10), "other partitions keep theirs");
    }

    #[test]
    fn position_is_the_low_watermark_else_one_past_the_checkpoint() {
        let (_dir, tree) = tree();
        let p = Partitions::new(tree.clone());
        assert_eq!(p.position(0, || Ok(None)).unwrap(), None);
        advance(&p, &tree, &[(0, 10)]);
        assert_eq!(p.position(0, || Ok(None)).unwrap(), Some(11));
        assert_eq!(p.position(0, || Ok(Some(4))).unwrap(), Some(4));
    }

    #[test]
    fn values_in_the_old_plain_big_endian_encoding_are_read() {
        let (_dir, tree) = tree();
        tree.insert(key(CHECKPOINT, 2), &9u64.to_be_bytes()).unwrap();
        tree.insert(key(SETTLED, 2), &7u64.to_be_bytes()).unwrap();
        let p = Partitions::new(tree.clone());
        assert_eq!((p.checkpoint(2).unwrap(), p.settled(2).unwrap()), (Some(9), Some(7)));
        assert!(p.set_settled(2, 8).unwrap());
        assert_eq!(p.settled(2).unwrap(), Some(8), "rewritten in the order encoding");
        assert_eq!(tree.get(key(SETTLED, 2)).unwrap().unwrap()[0] & 0x80, 0x80);
        tree.insert(key(SETTLED, 3), &[1u8, 2]).unwrap();
        assert!(p.settled(3).is_err(), "a short value is an error, not a panic");
    }
}
