//! The window store: open bundles of chat messages, kept in sled until emitted and acknowledged.
//!
//! Key layout (one sled tree `windows`, so a poll batch, its bundles' indexes and the
//! partition checkpoint are one atomic `sled::Batch`). `K` is a bundle key: sub id and chat
//! id, each as u32 BE length then UTF-8 bytes (so no id can be the prefix of another), then
//! `start_ms`. Every i64 in a key is big-endian with the sign bit flipped, so keys sort as
//! the numbers do; partitions are u32 BE.
//! - `b` K → meta: end, grace, close_at, late and emitting flags, and (partition, first
//!   offset) of every partition the bundle holds messages of. It changes only when a bundle
//!   is created, gets its first late message or a new partition, or begins emission, so a
//!   message joining an open bundle costs one write (its `m` entry); count and first/last
//!   times are read off the `m` keys when the bundle is loaded;
//! - `h` K → the bundle header JSON, written once when the bundle is created (version-1
//!   metas, which carried it inline, are still read);
//! - `m` K ts partition offset → message bytes: a bundle's messages in (ts, partition,
//!   offset) order, read by one prefix scan;
//! - `d` close_at K → (): the due index, ordered by close time, so closed windows are a
//!   range scan from its start, never a scan of all bundles;
//! - `x` K → (): bundles whose emission has begun (moved out of `d` by `begin_emit`); put
//!   back into `d` when the store is opened again, so a crash before `remove` re-emits;
//! - `w` partition first_offset K → (): the low-watermark index, one entry per partition a
//!   bundle holds messages of (one, unless the topic was repartitioned);
//! - `c` partition and `f` partition: the checkpoint and the settled position of
//!   [`crate::state::Partitions`] (settled: every offset below it is finished, its
//!   pass-through deliveries acknowledged, its bundle part applied here);
//! - `e` sub chat → end of the last window emitted for the pair: the late marker. A message
//!   whose window ends at or before it goes to the window starting at it, flagged late.
//!   Markers are kept after `remove` and `drop_partition` (one small entry per pair);
//! - `n` → number of bundles stored, for the gauge.
//!
//! Writes are serialised by a lock shared by all clones, so `apply` can never add a message
//! to a bundle that `begin_emit` is emitting or `remove` is deleting. Open the store once per
//! database and clone it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sled::{Batch, Tree};

use super::calendar::Windows;
use crate::state::{Partitions, StateDb};

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

/// The store; cheap to clone, all clones share the tree and the write lock.
#[derive(Clone)]
pub struct WindowStore {
    tree: Tree,
    /// Serialises read-modify-write of metas, markers and the bundle counter.
    write: Arc<Mutex<()>>,
    /// Checkpoints and settled positions, in the same tree.
    partitions: Partitions,
}

impl WindowStore {
    /// Opens the `windows` tree and puts bundles whose emission had begun back in the due
    /// index (the process that began them is gone; emitting again is a duplicate, not a loss).
    pub fn open(db: &StateDb) -> Result<Self, sled::Error> {
        let tree = db.tree("windows")?;
        let store = Self { partitions: Partitions::new(tree.clone()), tree, write: Arc::new(Mutex::new(())) };
        let mut b = Batch::default();
        for kv in store.tree.scan_prefix([b'x']) {
            let (k, _) = kv?;
            let id = &k[1..];
            if let Some(mut meta) = store.meta(id)? {
                meta.emitting = false;
                b.insert(tagged(b'd', &[&ord(meta.close_at_ms), id]), &[]);
                put_meta(&mut b, id, &meta);
            }
            b.remove(k);
        }
        store.tree.apply_batch(b)?;
        Ok(store)
    }

    /// Applies one poll batch atomically (one sled batch for the whole slice) and moves each
    /// partition's checkpoint to the highest offset applied. Returns where each message went
    /// (its bundle, and whether late), in the same order. Offsets at or below a partition's
    /// checkpoint are already here: the consumer skips their bundle part.
    pub fn apply(&self, batch: &[Incoming<'_>]) -> Result<Vec<(BundleKey, bool)>, sled::Error> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let _write = self.lock();
        let mut markers: HashMap<Vec<u8>, Option<i64>> = HashMap::new();
        let mut slots: HashMap<Vec<u8>, Slot<'_>> = HashMap::new();
        let mut b = Batch::default();
        let mut out = Vec::with_capacity(batch.len());
        for m in batch {
            let mut pair = Vec::with_capacity(16 + m.sub_id.len() + m.chat_id.len());
            put_str(&mut pair, m.sub_id);
            put_str(&mut pair, m.chat_id);
            let marker = match markers.get(&pair) {
                Some(marker) => *marker,
                None => {
                    let marker = self.tree.get(tagged(b'e', &[&pair]))?.map(|v| unord(&v));
                    markers.insert(pair.clone(), marker);
                    marker
                }
            };
            let (mut start_ms, mut late) = place(m.ts_ms, m.windows, marker);
            let mut id = [&pair[..], &ord(start_ms)].concat();
            let slot = self.slot(&mut slots, &id, start_ms, m)?;
            if slot.meta.emitting {
                // The window size changed since that bundle was emitted: still late, never into it.
                (start_ms, late) = (slot.meta.end_ms.max(marker.unwrap_or(i64::MIN)), true);
                id = [&pair[..], &ord(start_ms)].concat();
            }
            let slot = self.slot(&mut slots, &id, start_ms, m)?;
            slot.meta.add(m, late);
            slot.header.get_or_insert(m.header);
            b.insert(msg_key(&id, m.ts_ms, m.partition, m.offset), m.message);
            out.push((BundleKey { sub_id: m.sub_id.to_owned(), chat_id: m.chat_id.to_owned(), start_ms }, late));
        }
        let created = write_slots(&mut b, &slots);
        let moves = self.partitions.advance(&mut b, batch.iter().map(|m| (m.partition, m.offset)))?;
        self.count_bundles(&mut b, created)?;
        self.tree.apply_batch(b)?;
        self.partitions.applied(moves);
        Ok(out)
    }

    /// Highest offset of `partition` applied to this store.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.checkpoint(partition)
    }

    /// Records that every offset of `partition` below `position` is finished; never moves
    /// backwards. `position` must have been taken before a flush that completed, so the
    /// bundle parts of those offsets are on disk before this entry can be.
    pub fn set_settled(&self, partition: i32, position: i64) -> Result<(), sled::Error> {
        let _write = self.lock();
        self.partitions.set_settled(partition, position).map(|_| ())
    }

    /// Where a consumer of `partition` may resume with this store intact: every offset below
    /// it is finished. None when the store holds nothing of the partition (new, wiped, dropped).
    pub fn settled(&self, partition: i32) -> Result<Option<i64>, sled::Error> {
        self.partitions.settled(partition)
    }

    /// Keys of bundles not yet being emitted whose close time (end + grace) is at or before
    /// `now_ms`, earliest close first, at most `limit`: a range scan of the due index.
    pub fn due(&self, now_ms: i64, limit: usize) -> Result<Vec<BundleKey>, sled::Error> {
        let hi = match now_ms.checked_add(1) {
            Some(after) => tagged(b'd', &[&ord(after)]),
            None => vec![b'e'],
        };
        let mut out = Vec::new();
        for kv in self.tree.range(&[b'd'][..]..&hi[..]).take(limit) {
            let (k, _) = kv?;
            out.push(BundleKey::decode(&k[9..]).ok_or_else(|| corrupt("due entry"))?);
        }
        Ok(out)
    }

    /// Loads a bundle for emission and, atomically, takes it out of the due index and marks
    /// its window emitted for (sub, chat), so any message for that window applied afterwards
    /// goes to the chat's next bundle, flagged late. The bundle stays stored (and keeps
    /// holding its partition's low-watermark) until [`Self::remove`]. Calling it again before
    /// `remove` returns the same bundle.
    pub fn begin_emit(&self, key: &BundleKey) -> Result<Option<Bundle>, sled::Error> {
        let _write = self.lock();
        let id = key.encode();
        let Some(mut meta) = self.meta(&id)? else { return Ok(None) };
        let inline = meta.header.take();
        let header = match &inline {
            Some(inline) => inline.clone(),
            None => self.tree.get(tagged(b'h', &[&id]))?.ok_or_else(|| corrupt("bundle header"))?.to_vec(),
        };
        let (mut messages, mut origins, mut first_ts_ms, mut last_ts_ms) = (Vec::new(), Vec::new(), i64::MAX, i64::MIN);
        for kv in self.tree.scan_prefix(tagged(b'm', &[&id])) {
            let (k, v) = kv?;
            let n = k.len();
            let ts = unord(&k[n - 20..n - 12]);
            (first_ts_ms, last_ts_ms) = (first_ts_ms.min(ts), last_ts_ms.max(ts));
            origins.push((u32::from_be_bytes([k[n - 12], k[n - 11], k[n - 10], k[n - 9]]) as i32, unord(&k[n - 8..])));
            messages.push(v.to_vec());
        }
        if !meta.emitting {
            meta.emitting = true;
            let marker_key = tagged(b'e', &[&id[..id.len() - 8]]);
            let marker = self.tree.get(&marker_key)?.map(|v| unord(&v));
            let mut b = Batch::default();
            b.remove(tagged(b'd', &[&ord(meta.close_at_ms), &id]));
            b.insert(tagged(b'x', &[&id]), &[]);
            if inline.is_some() {
                b.insert(tagged(b'h', &[&id]), &header[..]); // a version-1 meta: move it out
            }
            put_meta(&mut b, &id, &meta);
            if marker.is_none_or(|m| m < meta.end_ms) {
                b.insert(marker_key, &ord(meta.end_ms));
            }
            self.tree.apply_batch(b)?;
        }
        let first = meta.parts.first().copied().unwrap_or(Part { partition: -1, first_offset: -1 });
        Ok(Some(Bundle {
            key: key.clone(),
            end_ms: meta.end_ms,
            header,
            messages,
            origins,
            first_ts_ms,
            last_ts_ms,
            late: meta.late,
            partition: first.partition,
            first_offset: first.first_offset,
        }))
    }

    /// Deletes a bundle (meta, messages, due and watermark entries), after its delivery
    /// record was acknowledged. Removing a bundle that is not stored does nothing.
    pub fn remove(&self, key: &BundleKey) -> Result<(), sled::Error> {
        let _write = self.lock();
        let id = key.encode();
        let Some(meta) = self.meta(&id)? else { return Ok(()) };
        let mut b = Batch::default();
        self.delete_bundle(&mut b, &id, &meta)?;
        self.count_bundles(&mut b, -1)?;
        self.tree.apply_batch(b)
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
        let prefix = [&[b'w'][..], &(partition as u32).to_be_bytes()].concat();
        Ok(self.tree.scan_prefix(prefix).next().transpose()?.map(|(k, _)| unord(&k[5..13])))
    }

    /// Forgets a partition revoked by a rebalance (the new owner rebuilds its bundles by
    /// replay): its bundles, its messages in bundles shared with other partitions, its
    /// checkpoint and its settled position. Returns the number of bundles deleted.
    pub fn drop_partition(&self, partition: i32) -> Result<usize, sled::Error> {
        let _write = self.lock();
        let prefix = [&[b'w'][..], &(partition as u32).to_be_bytes()].concat();
        let mut b = Batch::default();
        let mut deleted: i64 = 0;
        for kv in self.tree.scan_prefix(prefix) {
            let (k, _) = kv?;
            let id = &k[13..];
            match self.meta(id)? {
                None => b.remove(k),
                Some(meta) if meta.parts.iter().all(|p| p.partition == partition) => {
                    self.delete_bundle(&mut b, id, &meta)?;
                    deleted += 1;
                }
                Some(meta) => self.drop_shared(&mut b, id, meta, partition)?,
            }
        }
        let moves = self.partitions.forget(&mut b, partition);
        self.count_bundles(&mut b, -deleted)?;
        self.tree.apply_batch(b)?;
        self.partitions.applied(moves);
        Ok(deleted as usize)
    }

    /// Bundles stored (open, or emitted and not yet removed): one read, fine for a gauge.
    pub fn open_bundles(&self) -> usize {
        self.tree.get([b'n']).ok().flatten().map_or(0, |v| unord(&v).max(0) as usize)
    }

    /// Writes everything to disk; the consumer calls it before committing a position.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.tree.flush_async().await.map(|_| ())
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn meta(&self, id: &[u8]) -> Result<Option<Meta>, sled::Error> {
        match self.tree.get(tagged(b'b', &[id]))? {
            None => Ok(None),
            Some(v) => Meta::decode(&v).map(Some).ok_or_else(|| corrupt("bundle meta")),
        }
    }

    /// The bundle `id` as this batch sees it: loaded once, then changed in memory.
    fn slot<'s, 'a>(
        &self,
        slots: &'s mut HashMap<Vec<u8>, Slot<'a>>,
        id: &[u8],
        start_ms: i64,
        m: &Incoming<'a>,
    ) -> Result<&'s mut Slot<'a>, sled::Error> {
        if !slots.contains_key(id) {
            let slot = match self.meta(id)? {
                Some(meta) => Slot { before: Some(meta.clone()), meta, header: None },
                None => Slot { before: None, meta: Meta::new(start_ms, m), header: None },
            };
            slots.insert(id.to_vec(), slot);
        }
        Ok(slots.get_mut(id).expect("inserted above"))
    }

    fn delete_bundle(&self, b: &mut Batch, id: &[u8], meta: &Meta) -> Result<(), sled::Error> {
        for kv in self.tree.scan_prefix(tagged(b'm', &[id])) {
            b.remove(kv?.0);
        }
        for p in &meta.parts {
            b.remove(wm_key(p.partition, p.first_offset, id));
        }
        b.remove(tagged(b'd', &[&ord(meta.close_at_ms), id]));
        b.remove(tagged(b'x', &[id]));
        b.remove(tagged(b'b', &[id]));
        b.remove(tagged(b'h', &[id]));
        Ok(())
    }

    /// Drops one partition's messages from a bundle that also holds another partition's.
    fn drop_shared(&self, b: &mut Batch, id: &[u8], mut meta: Meta, partition: i32) -> Result<(), sled::Error> {
        for kv in self.tree.scan_prefix(tagged(b'm', &[id])) {
            let (k, _) = kv?;
            let n = k.len();
            if u32::from_be_bytes([k[n - 12], k[n - 11], k[n - 10], k[n - 9]]) as i32 == partition {
                b.remove(k);
            }
        }
        for p in meta.parts.iter().filter(|p| p.partition == partition) {
            b.remove(wm_key(p.partition, p.first_offset, id));
        }
        meta.parts.retain(|p| p.partition != partition);
        put_meta(b, id, &meta);
        Ok(())
    }

    fn count_bundles(&self, b: &mut Batch, delta: i64) -> Result<(), sled::Error> {
        if delta != 0 {
            let n = self.tree.get([b'n'])?.map_or(0, |v| unord(&v));
            b.insert(b"n", &ord(n.saturating_add(delta).max(0)));
        }
        Ok(())
    }
}

mod codec;
#[cfg(test)]
mod tests;

use codec::*;
