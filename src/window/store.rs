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

impl BundleKey {
    /// `sub chat start`, the bundle's part of every key that names it.
    fn encode(&self) -> Vec<u8> {
        let mut id = Vec::with_capacity(16 + self.sub_id.len() + self.chat_id.len());
        put_str(&mut id, &self.sub_id);
        put_str(&mut id, &self.chat_id);
        id.extend_from_slice(&ord(self.start_ms));
        id
    }

    fn decode(id: &[u8]) -> Option<Self> {
        let mut r = Reader(id);
        let sub_id = r.string()?;
        let chat_id = r.string()?;
        Some(Self { sub_id, chat_id, start_ms: unord(r.take(8)?) })
    }
}

/// A bundle touched by one `apply`: its metadata before and after the batch.
struct Slot<'a> {
    /// The meta as stored; `None` for a bundle this batch creates.
    before: Option<Meta>,
    meta: Meta,
    /// Header of the first message added in this batch; `None` if none was added (a slot
    /// may be loaded only to find it is being emitted).
    header: Option<&'a [u8]>,
}

/// Adds the metas, due and watermark entries of one `apply` to its batch; returns how many
/// bundles it creates.
fn write_slots(b: &mut Batch, slots: &HashMap<Vec<u8>, Slot<'_>>) -> i64 {
    let mut created = 0;
    for (id, slot) in slots.iter() {
        let (meta, Some(header)) = (&slot.meta, slot.header) else { continue };
        let before: &[Part] = match &slot.before {
            Some(before) if before == meta => continue, // joined: its `m` entry is all
            Some(before) => &before.parts,
            None => {
                created += 1;
                b.insert(tagged(b'd', &[&ord(meta.close_at_ms), id]), &[]);
                b.insert(tagged(b'h', &[id]), header);
                &[]
            }
        };
        for p in before.iter().filter(|p| !meta.parts.contains(p)) {
            b.remove(wm_key(p.partition, p.first_offset, id));
        }
        for p in meta.parts.iter().filter(|p| !before.contains(p)) {
            b.insert(wm_key(p.partition, p.first_offset, id), &[]);
        }
        put_meta(b, id, meta);
    }
    created
}

/// Writes a meta; one read from a version-1 entry also gets its inline header moved to `h`.
fn put_meta(b: &mut Batch, id: &[u8], meta: &Meta) {
    if let Some(header) = &meta.header {
        b.insert(tagged(b'h', &[id]), &header[..]);
    }
    b.insert(tagged(b'b', &[id]), meta.encode());
}

/// What the store keeps about a bundle besides its messages.
#[derive(Debug, Clone, PartialEq)]
struct Meta {
    end_ms: i64,
    grace_ms: i64,
    /// `end + grace`, fixed at creation: it names the bundle's due entry.
    close_at_ms: i64,
    late: bool,
    /// Emission has begun: the bundle is in `x`, not in `d`.
    emitting: bool,
    /// Each partition the bundle holds messages of, with its smallest offset; first is the
    /// partition of the first message.
    parts: Vec<Part>,
    /// The header of a version-1 entry, which carried it inline; `None` from version 2 on
    /// (it is under `h`).
    header: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Part {
    partition: i32,
    first_offset: i64,
}

const META_VERSION: u8 = 2;

impl Meta {
    /// A bundle starting at `start_ms` ends at the next boundary of its windows: `size`
    /// later in UTC, at the next local midnight for a day in a zone (23 h or 25 h on the days
    /// the clocks change), at the next boundary too for a late bundle starting off the grid.
    fn new(start_ms: i64, m: &Incoming<'_>) -> Self {
        let end_ms = m.windows.end(start_ms);
        let grace_ms = m.grace_ms.max(0);
        Self {
            end_ms,
            grace_ms,
            close_at_ms: end_ms.saturating_add(grace_ms),
            late: false,
            emitting: false,
            parts: Vec::new(),
            header: None,
        }
    }

    fn add(&mut self, m: &Incoming<'_>, late: bool) {
        self.late |= late;
        match self.parts.iter_mut().find(|p| p.partition == m.partition) {
            Some(p) => p.first_offset = p.first_offset.min(m.offset),
            None => self.parts.push(Part { partition: m.partition, first_offset: m.offset }),
        }
    }

    /// Version 2: version, flags, three i64 (end, grace, close_at), part count (u16), parts.
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(28 + 12 * self.parts.len());
        v.push(META_VERSION);
        v.push(u8::from(self.late) | (u8::from(self.emitting) << 1));
        for n in [self.end_ms, self.grace_ms, self.close_at_ms] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        v.extend_from_slice(&(self.parts.len() as u16).to_be_bytes());
        for p in &self.parts {
            v.extend_from_slice(&p.partition.to_be_bytes());
            v.extend_from_slice(&p.first_offset.to_be_bytes());
        }
        v
    }

    /// Version 2, or version 1: three more i64 (first and last ts, count, now read off the
    /// `m` keys) after close_at, and the header after the parts.
    fn decode(v: &[u8]) -> Option<Self> {
        let mut r = Reader(v);
        let version = r.take(1)?[0];
        if !(1..=META_VERSION).contains(&version) {
            return None;
        }
        let flags = r.take(1)?[0];
        let mut n = [0i64; 3];
        for x in &mut n {
            *x = r.i64()?;
        }
        if version == 1 {
            r.take(24)?;
        }
        let parts_len = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
        let mut parts = Vec::with_capacity(parts_len as usize);
        for _ in 0..parts_len {
            let partition = i32::from_be_bytes(r.take(4)?.try_into().ok()?);
            parts.push(Part { partition, first_offset: r.i64()? });
        }
        let [end_ms, grace_ms, close_at_ms] = n;
        let header = (version == 1).then(|| r.0.to_vec());
        Some(Self { end_ms, grace_ms, close_at_ms, late: flags & 1 != 0, emitting: flags & 2 != 0, parts, header })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// Order-preserving encoding of an i64: big-endian with the sign bit flipped.
fn ord(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unord(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

fn put_str(k: &mut Vec<u8>, s: &str) {
    k.extend_from_slice(&(s.len() as u32).to_be_bytes());
    k.extend_from_slice(s.as_bytes());
}

fn tagged(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn msg_key(id: &[u8], ts_ms: i64, partition: i32, offset: i64) -> Vec<u8> {
    tagged(b'm', &[id, &ord(ts_ms), &(partition as u32).to_be_bytes(), &ord(offset)])
}

fn wm_key(partition: i32, first_offset: i64, id: &[u8]) -> Vec<u8> {
    tagged(b'w', &[&(partition as u32).to_be_bytes(), &ord(first_offset), id])
}

fn corrupt(what: &str) -> sled::Error {
    sled::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("window store: unreadable {what}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::clock::{Clock, ManualClock};
    use std::time::Duration;

    const MIN: i64 = 60_000;
    const H: i64 = 60 * MIN;
    const HEADER: &[u8] = br#"{"chat":"c"}"#;

    fn open() -> (tempfile::TempDir, WindowStore) {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        (dir, WindowStore::open(&db).unwrap())
    }

    /// A message for a 1h window with a one-minute grace.
    fn msg<'a>(sub: &'a str, chat: &'a str, partition: i32, offset: i64, ts_ms: i64, message: &'a [u8]) -> Incoming<'a> {
        Incoming { sub_id: sub, chat_id: chat, partition, offset, ts_ms, windows: Windows::utc(H), grace_ms: MIN, message, header: HEADER }
    }

    fn key(sub: &str, chat: &str, start_ms: i64) -> BundleKey {
        BundleKey { sub_id: sub.into(), chat_id: chat.into(), start_ms }
    }

    fn texts(b: &Bundle) -> Vec<&str> {
        b.messages.iter().map(|m| std::str::from_utf8(m).unwrap()).collect()
    }

    #[test]
    fn placing_against_the_late_marker() {
        let hour = Windows::utc(H);
        assert_eq!(place(H + 5, hour, None), (H, false));
        assert_eq!(place(H + 5, hour, Some(H)), (H, false), "the emitted window ended where this one starts");
        assert_eq!(place(H + 5, hour, Some(2 * H)), (2 * H, true), "own window emitted: next bundle, late");
        assert_eq!(place(5, hour, Some(3 * H)), (3 * H, true), "several windows back: still the marker");
    }

    #[test]
    fn batch_with_many_chats_and_subs() {
        let (_dir, s) = open();
        let subs = ["sub_a", "sub_b", "sub_c"];
        let chats: Vec<String> = (0..40).map(|c| format!("chat_{c}")).collect();
        let bodies: Vec<String> = (0..5).map(|i| format!(r#"{{"i":{i}}}"#)).collect();
        let mut offsets = [0i64; 4];
        let mut batch = Vec::new();
        for (c, chat) in chats.iter().enumerate() {
            let p = (c % 4) as i32;
            for (i, body) in bodies.iter().enumerate() {
                for sub in subs {
                    batch.push(msg(sub, chat, p, offsets[p as usize], 10 * H + i as i64 * MIN, body.as_bytes()));
                }
                offsets[p as usize] += 1;
            }
        }
        let placed = s.apply(&batch).unwrap();
        assert_eq!(placed.len(), 600);
        assert!(placed.iter().all(|(k, late)| k.start_ms == 10 * H && !late));
        assert_eq!((placed[0].0.sub_id.as_str(), placed[0].0.chat_id.as_str()), ("sub_a", "chat_0"));
        assert_eq!((placed[599].0.sub_id.as_str(), placed[599].0.chat_id.as_str()), ("sub_c", "chat_39"));
        assert_eq!(s.open_bundles(), 120);
        for p in 0..4 {
            assert_eq!(s.checkpoint(p).unwrap(), Some(offsets[p as usize] - 1));
        }
        assert_eq!(s.due(11 * H + MIN, 7).unwrap().len(), 7, "limit");
        assert_eq!(s.due(11 * H + MIN, 1000).unwrap().len(), 120);
        let b = s.begin_emit(&key("sub_b", "chat_7", 10 * H)).unwrap().unwrap();
        assert_eq!(texts(&b), [r#"{"i":0}"#, r#"{"i":1}"#, r#"{"i":2}"#, r#"{"i":3}"#, r#"{"i":4}"#]);
        assert_eq!((b.header.as_slice(), b.end_ms, b.first_ts_ms, b.last_ts_ms), (HEADER, 11 * H, 10 * H, 10 * H + 4 * MIN));
        assert_eq!((b.partition, b.first_offset, b.late), (3, 5, false), "chat_7 is the 2nd chat of partition 3");
        assert_eq!(s.begin_emit(&key("sub_b", "chat_7", 9 * H)).unwrap(), None);
    }

    #[test]
    fn due_returns_only_closed_windows_earliest_first() {
        let (_dir, s) = open();
        let clock = ManualClock::new(0);
        let mut ten_s = msg("b", "c", 0, 2, 1_000, b"{}");
        (ten_s.windows, ten_s.grace_ms) = (Windows::utc(10_000), 0);
        let mut six_h = msg("c", "c", 0, 3, 2_000, b"{}");
        six_h.windows = Windows::utc(6 * H);
        s.apply(&[msg("a", "c", 0, 1, 0, b"{}"), ten_s, six_h, msg("a", "d", 0, 4, H, b"{}")]).unwrap();
        assert!(s.due(clock.now_ms(), 10).unwrap().is_empty());
        clock.advance(Duration::from_millis(9_999));
        assert!(s.due(clock.now_ms(), 10).unwrap().is_empty());
        clock.advance(Duration::from_millis(1));
        assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("b", "c", 0)]);
        clock.set(H + MIN - 1);
        assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("b", "c", 0)], "the 1h window waits for its grace");
        clock.set(24 * H);
        let all = [key("b", "c", 0), key("a", "c", 0), key("a", "d", H), key("c", "c", 0)];
        assert_eq!(s.due(clock.now_ms(), 10).unwrap(), all);
        assert_eq!(s.due(clock.now_ms(), 2).unwrap(), all[..2]);
        assert_eq!(s.due(i64::MAX, 10).unwrap(), all);
        s.begin_emit(&all[1]).unwrap().unwrap();
        assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [all[0].clone(), all[2].clone(), all[3].clone()], "emitting: not due again");
    }

    #[test]
    fn message_after_emission_goes_to_next_bundle_flagged_late() {
        let (_dir, s) = open();
        let clock = ManualClock::new(10 * MIN);
        s.apply(&[msg("s", "c", 0, 1, clock.now_ms(), b"m1")]).unwrap();
        clock.set(H + MIN);
        let first = s.due(clock.now_ms(), 10).unwrap();
        assert_eq!(first, [key("s", "c", 0)]);
        let b = s.begin_emit(&first[0]).unwrap().unwrap();
        assert_eq!((texts(&b), b.late), (vec!["m1"], false));
        let placed = s
            .apply(&[
                msg("s", "c", 0, 2, 20 * MIN, b"m2"),
                msg("s", "other", 0, 3, 20 * MIN, b"o"),
                msg("s", "c", 0, 4, H + 5 * MIN, b"m3"),
            ])
            .unwrap();
        assert_eq!(placed, [(key("s", "c", H), true), (key("s", "other", 0), false), (key("s", "c", H), false)]);
        assert_eq!(s.begin_emit(&first[0]).unwrap().unwrap(), b, "the emitted bundle did not change");
        s.remove(&first[0]).unwrap();
        assert_eq!(s.due(clock.now_ms(), 10).unwrap(), [key("s", "other", 0)], "next bundle still open");
        clock.set(2 * H + MIN);
        let next = s.begin_emit(&key("s", "c", H)).unwrap().unwrap();
        assert_eq!((texts(&next), next.late, next.first_ts_ms), (vec!["m2", "m3"], true, 20 * MIN));
        let placed = s.apply(&[msg("s", "c", 0, 5, 30 * MIN, b"m4")]).unwrap();
        assert_eq!(placed, [(key("s", "c", 2 * H), true)], "the marker moved on");
    }

    #[test]
    fn resized_window_never_joins_a_bundle_being_emitted() {
        let (_dir, s) = open();
        s.apply(&[msg("s", "c", 0, 1, 10 * MIN, b"1h")]).unwrap();
        s.begin_emit(&key("s", "c", 0)).unwrap().unwrap();
        let mut day = msg("s", "c", 0, 2, 30 * MIN, b"24h");
        day.windows = Windows::utc(24 * H);
        assert_eq!(s.apply(&[day]).unwrap(), [(key("s", "c", H), true)], "its 24h window starts where the emitted 1h one did");
        assert_eq!(texts(&s.begin_emit(&key("s", "c", 0)).unwrap().unwrap()), ["1h"]);
        s.remove(&key("s", "c", 0)).unwrap();
        let next = s.begin_emit(&key("s", "c", H)).unwrap().unwrap();
        assert_eq!((texts(&next), next.late, next.end_ms), (vec!["24h"], true, 24 * H), "it ends where its day does");
    }

    #[test]
    fn remove_moves_the_low_watermark() {
        let (_dir, s) = open();
        s.apply(&[msg("s", "a", 0, 10, 0, b"a1"), msg("s", "b", 0, 11, 1, b"b1"), msg("s", "a", 0, 12, 2, b"a2")]).unwrap();
        s.apply(&[msg("s", "b", 0, 13, 3, b"b2"), msg("s", "c", 0, 14, H, b"c1")]).unwrap();
        assert_eq!((s.position(0).unwrap(), s.checkpoint(0).unwrap()), (Some(10), Some(14)));
        let a = key("s", "a", 0);
        assert_eq!(s.begin_emit(&a).unwrap().unwrap().first_offset, 10);
        assert_eq!((s.position(0).unwrap(), s.low_watermark(0).unwrap()), (Some(10), Some(10)), "emitted but not acknowledged: still held");
        s.remove(&a).unwrap();
        assert_eq!(s.position(0).unwrap(), Some(11));
        s.remove(&key("s", "b", 0)).unwrap();
        assert_eq!(s.position(0).unwrap(), Some(14));
        s.remove(&key("s", "c", H)).unwrap();
        assert_eq!(s.position(0).unwrap(), Some(15), "nothing open: one past the checkpoint");
        assert_eq!(s.low_watermark(0).unwrap(), None, "no bundle of the partition left");
        s.remove(&key("s", "c", H)).unwrap();
        assert_eq!((s.open_bundles(), s.position(9).unwrap()), (0, None));
        assert!(s.due(i64::MAX, 10).unwrap().is_empty());
        assert_eq!(s.tree.scan_prefix([b'm']).count() + s.tree.scan_prefix([b'w']).count(), 0);
    }

    #[test]
    fn drop_partition_forgets_only_that_partition() {
        let (_dir, s) = open();
        s.apply(&[msg("s", "a", 0, 5, 0, b"a"), msg("s", "b", 1, 7, 1, b"b"), msg("s", "a", 0, 6, H, b"a2")]).unwrap();
        // A repartitioned topic: chat `x` now on partition 1 while its bundle holds partition 0 too.
        s.apply(&[msg("s", "x", 0, 8, 2, b"x0"), msg("s", "x", 1, 9, 3, b"x1")]).unwrap();
        assert_eq!((s.position(0).unwrap(), s.position(1).unwrap(), s.open_bundles()), (Some(5), Some(7), 4));
        assert_eq!(s.drop_partition(0).unwrap(), 2);
        assert_eq!((s.position(0).unwrap(), s.checkpoint(0).unwrap()), (None, None));
        assert_eq!((s.position(1).unwrap(), s.checkpoint(1).unwrap(), s.open_bundles()), (Some(7), Some(9), 2));
        assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "b", 0), key("s", "x", 0)]);
        let x = s.begin_emit(&key("s", "x", 0)).unwrap().unwrap();
        assert_eq!((texts(&x), x.partition, x.first_offset, x.first_ts_ms), (vec!["x1"], 1, 9, 3));
        assert_eq!(s.drop_partition(1).unwrap(), 2);
        assert_eq!((s.open_bundles(), s.tree.len()), (0, 2), "only the late marker of `x` and the counter are left");
    }

    #[test]
    fn settled_position_per_partition_forward_only_dropped_with_partition() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
            let s = WindowStore::open(&db).unwrap();
            s.apply(&[msg("s", "a", 0, 10, 0, b"a"), msg("s", "b", 1, 20, 0, b"b")]).unwrap();
            assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (None, None), "apply alone settles nothing");
            s.set_settled(0, 11).unwrap();
            s.set_settled(1, 7).unwrap();
            s.set_settled(1, 21).unwrap();
            s.set_settled(1, 15).unwrap();
            assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), Some(21)), "never backwards");
            assert_eq!((s.checkpoint(0).unwrap(), s.position(0).unwrap()), (Some(10), Some(10)), "checkpoint and watermark untouched");
            s.set_settled(2, 0).unwrap();
            assert_eq!(s.settled(2).unwrap(), Some(0), "offset 0 is a position like any other");
            assert_eq!(s.tree.get([b'f', 0, 0, 0, 1]).unwrap().as_deref(), Some(&ord(21)[..]), "`f` partition(u32 BE) -> ord(i64)");
            db.flush_blocking().unwrap();
        }
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let s = WindowStore::open(&db).unwrap();
        assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), Some(21)), "survives reopen");
        s.drop_partition(1).unwrap();
        assert_eq!((s.settled(0).unwrap(), s.settled(1).unwrap()), (Some(11), None), "a revoked partition replays from Kafka");
        assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0)], "no `f` entry is mistaken for a bundle");
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
            let s = WindowStore::open(&db).unwrap();
            s.apply(&[msg("s", "a", 2, 40, 0, b"a1"), msg("s", "b", 2, 41, H, b"b1"), msg("s", "a", 2, 42, 1, b"a2")]).unwrap();
            s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
            db.flush_blocking().unwrap();
        }
        let (db, _) = crate::state::StateDb::open_default(dir.path()).unwrap();
        let s = WindowStore::open(&db).unwrap();
        assert_eq!((s.open_bundles(), s.checkpoint(2).unwrap(), s.position(2).unwrap()), (2, Some(42), Some(40)));
        assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0), key("s", "b", H)], "an emission cut short is due again");
        assert_eq!(texts(&s.begin_emit(&key("s", "a", 0)).unwrap().unwrap()), ["a1", "a2"]);
        assert_eq!(s.apply(&[msg("s", "a", 2, 43, 2, b"a3")]).unwrap(), [(key("s", "a", H), true)], "the late marker survived");
    }

    /// A join writes only its message; the bundle still reports its count, first and last
    /// times and header when loaded.
    #[test]
    fn join_writes_one_entry_and_bundle_reads_back_whole() {
        let (_d, s) = open();
        s.apply(&[msg("s", "a", 0, 1, 10, b"a1")]).unwrap();
        let before = s.tree.len();
        s.apply(&[msg("s", "a", 0, 2, 5, b"a0"), msg("s", "a", 0, 3, 30, b"a2")]).unwrap();
        assert_eq!(s.tree.len(), before + 2, "two `m` entries, no meta or index change");
        let b = s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
        assert_eq!((texts(&b), b.first_ts_ms, b.last_ts_ms), (vec!["a0", "a1", "a2"], 5, 30));
        assert_eq!((b.header.as_slice(), b.partition, b.first_offset, b.late), (HEADER, 0, 1, false));
    }

    /// A store written by a version with the header inside the meta (version 1) is read, and
    /// its header moves out when the meta is next written.
    #[test]
    fn reads_version_1_metas() {
        let (_d, s) = open();
        s.apply(&[msg("s", "a", 0, 7, 10, b"a1")]).unwrap();
        let id = key("s", "a", 0).encode();
        let mut v1 = vec![1, 0];
        for n in [H, MIN, H + MIN, 10, 10, 1] {
            v1.extend_from_slice(&n.to_be_bytes());
        }
        v1.extend_from_slice(&1u16.to_be_bytes());
        v1.extend_from_slice(&0i32.to_be_bytes());
        v1.extend_from_slice(&7i64.to_be_bytes());
        v1.extend_from_slice(br#"{"old":"header"}"#);
        s.tree.insert(tagged(b'b', &[&id]), v1).unwrap();
        s.tree.remove(tagged(b'h', &[&id])).unwrap();
        assert_eq!(s.apply(&[msg("s", "a", 0, 8, 20, b"a2")]).unwrap(), [(key("s", "a", 0), false)]);
        assert_eq!(s.due(i64::MAX, 10).unwrap(), [key("s", "a", 0)]);
        let b = s.begin_emit(&key("s", "a", 0)).unwrap().unwrap();
        assert_eq!((texts(&b), b.header.as_slice(), b.first_offset), (vec!["a1", "a2"], &br#"{"old":"header"}"#[..], 7));
        assert_eq!(s.tree.get(tagged(b'h', &[&id])).unwrap().as_deref(), Some(&br#"{"old":"header"}"#[..]), "moved out");
        assert_eq!(s.begin_emit(&key("s", "a", 0)).unwrap().unwrap().header, br#"{"old":"header"}"#);
        s.remove(&key("s", "a", 0)).unwrap();
        assert_eq!(s.tree.scan_prefix(tagged(b'h', &[])).count(), 0);
    }

    #[test]
    fn messages_ordered_by_timestamp_whatever_the_arrival_order() {
        let (_dir, s) = open();
        let mut batch = vec![msg("s", "c", 0, 1, 50, b"t50"), msg("s", "c", 0, 2, 10, b"t10"), msg("s", "c", 1, 1, 30, b"t30p1")];
        batch.push(msg("s", "c", 0, 3, 30, b"t30p0"));
        s.apply(&batch).unwrap();
        s.apply(&[msg("s", "c", 0, 4, 20, b"t20"), msg("s", "c", 0, 5, 0, b"t0")]).unwrap();
        let b = s.begin_emit(&key("s", "c", 0)).unwrap().unwrap();
        assert_eq!(texts(&b), ["t0", "t10", "t20", "t30p0", "t30p1", "t50"]);
        assert_eq!(b.origins, [(0, 5), (0, 2), (0, 4), (0, 3), (1, 1), (0, 1)], "(partition, offset) of each message");
        assert_eq!((b.first_ts_ms, b.last_ts_ms, b.partition, b.first_offset), (0, 50, 0, 1));
        s.apply(&[msg("s", "neg", 0, 6, -3, b"-3"), msg("s", "neg", 0, 7, -H, b"-H"), msg("s", "neg", 0, 8, -1, b"-1")]).unwrap();
        let b = s.begin_emit(&key("s", "neg", -H)).unwrap().unwrap();
        assert_eq!(texts(&b), ["-H", "-3", "-1"], "before 1970 too");
    }

    #[test]
    fn unicode_bytes_and_ids_intact() {
        let (_dir, s) = open();
        let body = r#"{"text":"Xin chào 👋 שלום <b>&amp;</b>","sender":{"full_name":"Trần Lê"}}"#;
        let header = r#"{"chat":{"full_name":"Jöhn Dœ 🙂"}}"#;
        let mut m = msg("sub_ü", "chat_✓", 0, 1, 5, body.as_bytes());
        m.header = header.as_bytes();
        let placed = s.apply(&[m]).unwrap();
        assert_eq!(placed[0].0, key("sub_ü", "chat_✓", 0));
        assert_eq!(s.due(i64::MAX, 1).unwrap(), [key("sub_ü", "chat_✓", 0)]);
        let b = s.begin_emit(&placed[0].0).unwrap().unwrap();
        assert_eq!((b.messages, b.header), (vec![body.as_bytes().to_vec()], header.as_bytes().to_vec()));
    }

    #[test]
    fn ids_that_concatenate_alike_stay_apart() {
        let (_dir, s) = open();
        s.apply(&[msg("ab", "c", 0, 1, 0, b"1"), msg("a", "bc", 0, 2, 0, b"2"), msg("a", "b", 0, 3, 0, b"3")]).unwrap();
        assert_eq!(s.open_bundles(), 3);
        assert_eq!(texts(&s.begin_emit(&key("a", "b", 0)).unwrap().unwrap()), ["3"]);
        assert_eq!(s.apply(&[msg("a", "bc", 0, 4, 1, b"4")]).unwrap(), [(key("a", "bc", 0), false)], "marker of (a, b) only");
    }

    #[test]
    fn concurrent_apply_and_emit_lose_nothing() {
        let (_dir, s) = open();
        let writer = s.clone();
        let applying = std::thread::spawn(move || {
            for i in 0..200i64 {
                let bodies: Vec<String> = (0..5).map(|j| (i * 5 + j).to_string()).collect();
                let batch: Vec<_> =
                    bodies.iter().enumerate().map(|(j, b)| msg("s", "c", 0, i * 5 + j as i64, j as i64, b.as_bytes())).collect();
                writer.apply(&batch).unwrap();
            }
        });
        let mut seen = Vec::new();
        loop {
            let done = applying.is_finished();
            for k in s.due(i64::MAX, 100).unwrap() {
                let b = s.begin_emit(&k).unwrap().unwrap();
                seen.extend(b.messages.iter().map(|m| std::str::from_utf8(m).unwrap().parse::<i64>().unwrap()));
                s.remove(&k).unwrap();
            }
            if done && s.open_bundles() == 0 {
                break;
            }
            std::thread::yield_now();
        }
        applying.join().unwrap();
        seen.sort_unstable();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
        assert_eq!(s.position(0).unwrap(), Some(1000));
    }
}
