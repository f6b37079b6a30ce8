//! The window store: open bundles of chat messages, kept in sled until emitted and acknowledged.
//!
//! Log-structured: an `apply` (one poll batch) writes one segment per partition it holds
//! messages of, whatever the number of messages and bundles, and an in-memory index of the
//! open bundles (`index.rs`: where each message and header is, the due order, each
//! partition's low-watermark) is rebuilt from the segments' small index values when the store
//! is opened (`replay.rs`). Key layout, one sled tree `windows` (so a batch's segments and the
//! partitions' checkpoints are one atomic `sled::Batch`); every number big-endian, i64 in keys
//! with the sign bit flipped so they sort as numbers:
//! - `s` partition seq → a segment's index, `v` partition seq chunk → its bodies in chunks
//!   of ~6 KiB (`segment.rs`);
//!   a segment is deleted when no stored bundle has a record in it any more, and all of a
//!   partition's segments when it is revoked;
//! - `e` sub chat (each u32 length + UTF-8) → the pair's late marker (end of the last window
//!   emitted for it) followed by the (start, end) of each stored bundle of the pair that ends
//!   at or before the marker (being emitted, not yet removed). A segment's record of a bundle
//!   ending at or before the marker and not in that list belongs to a removed bundle: replay
//!   skips it, so `remove` costs one write whatever the bundle holds. Markers outlive their
//!   bundles (one small entry per pair); a message whose window ends at or before it goes to
//!   the window starting at it, flagged late;
//! - `c` partition and `f` partition: the checkpoint and the settled position of
//!   [`crate::state::Partitions`] (settled: every offset below it is finished, its
//!   pass-through deliveries acknowledged, its bundle part applied here).
//!
//! Stores written by earlier versions (one sled entry per message under `b h m d x w n`) are
//! converted when opened. All operations take one lock shared by all clones, so `apply` can
//! never add a message to a bundle that `begin_emit` is emitting or `remove` is deleting; a
//! failed sled write makes the next call rebuild the index from disk. Open the store once per
//! database and clone it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::{Batch, IVec, Tree};

use super::calendar::Windows;
use crate::state::{Partitions, StateDb};
use index::{Index, Loc};
use segment::Writer;

/// Identifies a bundle: one chat, one subscription, one window.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BundleKey {
    pub sub_id: String,
    pub chat_id: String,
    /// Window start; for a late bundle, the end of the window emitted before it.
    pub start_ms: i64,
}

/// One chat message routed to one aggregating subscription.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub sub_id: &'a str,
    pub chat_id: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// The message's own timestamp: it picks the window.
    pub ts_ms: i64,
    /// The subscription's aggregation windows: length and time zone.
    pub windows: Windows,
    /// How long after the window's end the bundle waits for stragglers.
    pub grace_ms: i64,
    /// Message JSON, stored as is.
    pub message: &'a [u8],
    /// Bundle header JSON, stored when the bundle is created (later ones are ignored).
    pub header: &'a [u8],
}

/// A bundle loaded for emission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub key: BundleKey,
    pub end_ms: i64,
    pub header: Vec<u8>,
    /// Ordered by (ts, partition, offset).
    pub messages: Vec<Vec<u8>>,
    /// (partition, offset) of each of `messages`, in the same order: where a dead letter of
    /// one message points.
    pub origins: Vec<(i32, i64)>,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    /// Holds at least one message that arrived after its own window was emitted.
    pub late: bool,
    /// Partition of the bundle's first message.
    pub partition: i32,
    /// Smallest offset of `partition` in the bundle.
    pub first_offset: i64,
}

/// Where a message goes, given the end of the last window emitted for its (sub, chat):
/// its own window ([`Windows::start`]), or, if that one was emitted, the window starting at
/// the marker (late).
pub fn place(ts_ms: i64, windows: Windows, emitted_end_ms: Option<i64>) -> (i64, bool) {
    let start = windows.start(ts_ms);
    match emitted_end_ms {
        Some(marker) if windows.end(start) <= marker => (marker, true),
        _ => (start, false),
    }
}

/// The store; cheap to clone, all clones share the tree, the index and the lock.
#[derive(Clone)]
pub struct WindowStore {
    tree: Tree,
    inner: Arc<Mutex<Inner>>,
    /// Checkpoints and settled positions, in the same tree.
    partitions: Partitions,
}

struct Inner {
    index: Index,
    /// Bodies chunks read last, by (seq, chunk): emission reads bundles in close order, whose
    /// messages were mostly written together.
    bodies: Vec<((u64, u16), IVec)>,
    /// A sled write failed after the index had changed: rebuild it before the next call.
    stale: bool,
}

const BODIES_CACHED: usize = 32;

impl WindowStore {
    /// Opens the `windows` tree (converting a store of an earlier layout) and rebuilds the
    /// index from its segments. Bundles whose emission had begun are due again (the process
    /// that began them is gone; emitting again is a duplicate, not a loss).
    pub fn open(db: &StateDb) -> Result<Self, sled::Error> {
        let tree = db.tree("windows")?;
        replay::convert_legacy(&tree)?;
        let index = replay::load(&tree)?;
        let inner = Inner { index, bodies: Vec::new(), stale: false };
        Ok(Self { partitions: Partitions::new(tree.clone()), tree, inner: Arc::new(Mutex::new(inner)) })
    }

    /// Applies one poll batch atomically (one segment per partition and the partitions'
    /// checkpoints in one sled batch) and moves each partition's checkpoint to the highest
    /// offset applied. Returns where each message went (its bundle, and whether late), in the
    /// same order. Offsets at or below a partition's checkpoint are already here: the consumer
    /// skips their bundle part.
    pub fn apply(&self, batch: &[Incoming<'_>]) -> Result<Vec<(BundleKey, bool)>, sled::Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock()?;
        let mut writers: Vec<Writer> = Vec::new();
        let mut out = Vec::with_capacity(batch.len());
        let placed = batch.iter().try_for_each(|m| {
            out.push(self.place_one(&mut inner.index, &mut writers, m)?);
            Ok::<_, sled::Error>(())
        });
        let written = placed.and_then(|()| {
            let mut b = Batch::default();
            for w in writers {
                inner.index.set_chunks(w.seg, w.chunk_count());
                w.write(&mut b);
            }
            let moves = self.partitions.advance(&mut b, batch.iter().map(|m| (m.partition, m.offset)))?;
            self.tree.apply_batch(b)?;
            self.partitions.applied(moves);
            Ok(())
        });
        inner.stale |= written.is_err();
        written.map(|()| out)
    }

    /// Puts one message in its bundle (in the index and in its partition's segment).
    fn place_one(&self, ix: &mut Index, writers: &mut Vec<Writer>, m: &Incoming<'_>) -> Result<(BundleKey, bool), sled::Error> {
        let pair = match ix.find_pair(m.sub_id, m.chat_id) {
            Some(pair) => pair,
            None => {
                let (marker, _) = replay::read_marker(&self.tree, &pair_id(m.sub_id, m.chat_id))?;
                ix.add_pair(m.sub_id, m.chat_id, marker)
            }
        };
        let marker = ix.pair(pair).marker;
        let (mut start_ms, mut late) = place(m.ts_ms, m.windows, marker);
        let mut found = ix.find_bundle(pair, start_ms);
        if let Some(b) = found.filter(|&b| ix.bundle(b).emitting) {
            // The window size changed since that bundle was emitted: still late, never into it.
            (start_ms, late) = (ix.bundle(b).end_ms.max(marker.unwrap_or(i64::MIN)), true);
            found = ix.find_bundle(pair, start_ms);
        }
        let b = found.unwrap_or_else(|| {
            let end_ms = m.windows.end(start_ms);
            ix.add_bundle(pair, start_ms, end_ms, end_ms.saturating_add(m.grace_ms.max(0)))
        });
        let w = match writers.iter().position(|w| w.partition == m.partition) {
            Some(w) => w,
            None => {
                let (seg, seq) = ix.add_seg(m.partition);
                writers.push(Writer::new(seg, seq, m.partition));
                writers.len() - 1
            }
        };
        let writer = &mut writers[w];
        let open = ix.bundle(b);
        let opens = (!ix.has_part(b, m.partition)).then_some((open.end_ms, open.close_at_ms, m.header));
        let (row, header_at) = writer.row(b, m.sub_id, m.chat_id, start_ms, opens);
        if let Some(at) = header_at {
            ix.add_part(b, m.partition, m.offset, Loc { seg: writer.seg, at });
        }
        let at = writer.message(row, m.ts_ms, m.offset, late, m.message);
        ix.add_message(b, Loc { seg: writer.seg, at }, m.partition, m.offset, late);
        Ok((BundleKey { sub_id: m.sub_id.to_owned(), chat_id: m.chat_id.to_owned(), start_ms }, late))
    }

    /// Highest offset of `partition` applied to this store.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.checkpoint(partition)
    }

    /// Records that every offset of `partition` below `position` is finished; never moves
    /// backwards. `position` must have been taken before a flush that completed, so the
    /// bundle parts of those offsets are on disk before this entry can be.
    pub fn set_settled(&self, partition: i32, position: i64) -> Result<(), sled::Error> {
        let _inner = self.lock()?;
        self.partitions.set_settled(partition, position).map(|_| ())
    }

    /// Where a consumer of `partition` may resume with this store intact: every offset below
    /// it is finished. None when the store holds nothing of the partition (new, wiped, dropped).
    pub fn settled(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.settled(partition)
    }

    /// Keys of bundles not yet being emitted whose close time (end + grace) is at or before
    /// `now_ms`, earliest close first, at most `limit`.
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<BundleKey>, sled::Error> {
        let inner = self.lock()?;
        let ix = &inner.index;
        Ok(ix.due(now_ms, limit).map(|b| key_of(ix, b)).collect())
    }

    /// Loads a bundle for emission and marks its window emitted for (sub, chat), so any
    /// message for that window applied afterwards goes to the chat's next bundle, flagged
    /// late; the bundle leaves the due order. It stays stored (and keeps holding its
    /// partition's low-watermark) until [`Self::remove`]. Calling it again before `remove`
    /// returns the same bundle.
    pub fn begin_emit(&self, key: &BundleKey) -> Result<Option<Bundle>, sled::Error> {
        let mut inner = self.lock()?;
        let Some((pair, b)) = find(&inner.index, key) else { return Ok(None) };
        let bundle = self.load(&mut inner, b, key)?;
        if !inner.index.bundle(b).emitting {
            inner.index.begin_emit(b);
            let written = self.write_marker(&mut inner.index, pair, bundle.end_ms, &mut Batch::default());
            inner.stale |= written.is_err();
            written?;
        }
        Ok(Some(bundle))
    }

    /// Deletes a bundle after its delivery record was acknowledged (one write: the pair's
    /// `e` entry, plus the deletion of segments it leaves empty). Removing a bundle that is not
    /// stored does nothing; removing one never begun counts as emitting it.
    pub fn remove(&self, key: &BundleKey) -> Result<(), sled::Error> {
        let mut inner = self.lock()?;
        let Some((pair, b)) = find(&inner.index, key) else { return Ok(()) };
        let end_ms = inner.index.bundle(b).end_ms;
        let mut batch = Batch::default();
        for seg in inner.index.remove_bundle(b) {
            self.delete_segment(&mut inner, seg, &mut batch);
        }
        let written = self.write_marker(&mut inner.index, pair, end_ms, &mut batch);
        inner.index.release_pair(pair);
        inner.stale |= written.is_err();
        written
    }

    /// Writes the pair's `e` entry with `batch`: the marker moved to at least `end_ms`, and
    /// the pair's stored bundles ending at or before it.
    fn write_marker(&self, ix: &mut Index, pair: u32, end_ms: i64, batch: &mut Batch) -> Result<(), sled::Error> {
        let p = ix.pair_mut(pair);
        let marker = p.marker.map_or(end_ms, |m| m.max(end_ms));
        p.marker = Some(marker);
        let id = pair_id(ix.sub_name(ix.pair(pair).sub), &ix.pair(pair).chat);
        batch.insert(tagged(b'e', &[&id]), encode_marker(marker, &ix.pending(pair)));
        self.tree.apply_batch(std::mem::take(batch))
    }

    fn delete_segment(&self, inner: &mut Inner, seg: u32, batch: &mut Batch) {
        if let Some(s) = inner.index.free_seg(seg) {
            segment::delete(batch, &s);
            inner.bodies.retain(|((seq, _), _)| *seq != s.seq);
        }
    }

    /// The offset of `partition` that may be committed as far as this store knows: the
    /// smallest first offset of any bundle of that partition not yet removed, else
    /// checkpoint + 1, else None.
    pub fn position(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.position(partition, || self.low_watermark(partition))
    }

    /// The smallest first offset of any bundle of `partition` not yet removed (open, or
    /// emitted and not acknowledged); None when the partition holds no bundle.
    pub fn low_watermark(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        Ok(self.lock()?.index.low_watermark(partition))
    }

    /// Forgets a partition revoked by a rebalance (the new owner rebuilds its bundles by
    /// replay): its segments, its bundles, its messages in bundles shared with other
    /// partitions, its checkpoint and its settled position. Returns the number of bundles
    /// deleted.
    pub fn drop_partition(&self, partition: i32) -> Result<usize, sled::Error> {
        let mut inner = self.lock()?;
        let ix = &mut inner.index;
        let mut batch = Batch::default();
        let (mut deleted, mut pairs) = (0, HashSet::new());
        for b in 0..ix.bundles.len() as u32 {
            let Some(open) = ix.bundles[b as usize].as_ref() else { continue };
            if !open.parts.iter().any(|p| p.partition == partition) {
                continue;
            }
            if open.parts.iter().all(|p| p.partition == partition) {
                pairs.insert(open.pair);
                ix.remove_bundle(b);
                deleted += 1;
            } else {
                ix.drop_part(b, partition);
            }
        }
        let segs: Vec<u32> = ix.segs_of.get(&partition).map(|s| s.iter().copied().collect()).unwrap_or_default();
        for seg in segs {
            self.delete_segment(&mut inner, seg, &mut batch);
        }
        let ix = &mut inner.index;
        for &pair in &pairs {
            if let Some(marker) = ix.pair(pair).marker {
                let id = pair_id(ix.sub_name(ix.pair(pair).sub), &ix.pair(pair).chat);
                batch.insert(tagged(b'e', &[&id]), encode_marker(marker, &ix.pending(pair)));
            }
            ix.release_pair(pair);
        }
        let moves = self.partitions.forget(&mut batch, partition);
        let written = self.tree.apply_batch(batch);
        inner.stale |= written.is_err();
        written?;
        self.partitions.applied(moves);
        Ok(deleted)
    }

    /// Bundles stored (open, or emitted and not yet removed).
    pub fn open_bundles(&self) -> usize {
        self.lock().map_or(0, |inner| inner.index.open)
    }

    /// Writes everything to disk; the consumer calls it before committing a position.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.tree.flush_async().await.map(|_| ())
    }

    /// The lock; the index is rebuilt first if a failed write left it ahead of the tree.
    fn lock(&self) -> Result<MutexGuard<'_, Inner>, sled::Error> {
        let mut inner = self.inner.lock().unwrap_or_else(|poisoned| {
            let mut inner = poisoned.into_inner();
            inner.stale = true;
            inner
        });
        if inner.stale {
            inner.index = replay::load(&self.tree)?;
            inner.bodies.clear();
            inner.stale = false;
        }
        Ok(inner)
    }
}

fn find(ix: &Index, key: &BundleKey) -> Option<(u32, u32)> {
    let pair = ix.find_pair(&key.sub_id, &key.chat_id)?;
    Some((pair, ix.find_bundle(pair, key.start_ms)?))
}

fn key_of(ix: &Index, b: u32) -> BundleKey {
    let open = ix.bundle(b);
    let pair = ix.pair(open.pair);
    BundleKey { sub_id: ix.sub_name(pair.sub).to_owned(), chat_id: pair.chat.to_string(), start_ms: open.start_ms }
}

mod codec;
mod index;
mod read;
mod replay;
mod segment;
#[cfg(test)]
mod tests;

use codec::*;
