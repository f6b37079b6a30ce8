//! The in-memory index of open bundles: which bundles exist, where their messages and header
//! are (segment and byte position), the due order and each partition's low-watermark. It is
//! rebuilt from the segments when the store is opened (`replay.rs`) and changed only under
//! the store's lock, after the sled write it mirrors has been staged.
//!
//! Sized for millions of bundles: a bundle is ~100 bytes plus its (sub, chat) pair's ~60,
//! shared by the pair's bundles; ids are interned and the tables hold u32 slots.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;

use hashbrown::HashTable;
use smallvec::SmallVec;

/// Where a record is: segment slot and byte position in its bodies value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub(super) seg: u32,
    pub(super) at: u32,
}

/// The messages of one partition in a bundle: the smallest offset and the header written
/// with them (each partition's first segment of the bundle carries one).
#[derive(Debug, Clone, Copy)]
pub(super) struct Part {
    pub(super) partition: i32,
    pub(super) first_offset: i64,
    pub(super) header: Loc,
}

#[derive(Debug)]
pub(super) struct Open {
    pub(super) pair: u32,
    pub(super) start_ms: i64,
    pub(super) end_ms: i64,
    pub(super) close_at_ms: i64,
    pub(super) late: bool,
    pub(super) emitting: bool,
    /// Position in `due[close_at_ms]` (see [`Queue`]), when not emitting.
    due_pos: u32,
    pub(super) parts: SmallVec<[Part; 1]>,
    pub(super) msgs: SmallVec<[Loc; 3]>,
}

/// A (sub, chat) pair with at least one bundle stored.
#[derive(Debug)]
pub(super) struct Pair {
    pub(super) sub: u32,
    pub(super) chat: Box<str>,
    /// End of the last window emitted for the pair (the late marker), as stored under `e`.
    pub(super) marker: Option<i64>,
    pub(super) bundles: SmallVec<[u32; 1]>,
}

#[derive(Debug)]
pub(super) struct Seg {
    pub(super) partition: i32,
    pub(super) seq: u64,
    /// Records of stored bundles in it (messages and headers); at 0 it is deleted.
    pub(super) live: u32,
    /// Its bodies chunks.
    pub(super) chunks: u16,
}

/// The bundles due at one close time, in the order they were created; a bundle leaving it
/// leaves a hole ([`GONE`]) until the holes before it are gone too.
#[derive(Default)]
struct Queue {
    items: std::collections::VecDeque<u32>,
    /// Position (in `Open::due_pos` terms) of `items[0]`.
    base: u32,
    live: u32,
}

const GONE: u32 = u32::MAX;

#[derive(Default)]
pub(super) struct Index {
    subs: Vec<Box<str>>,
    sub_ids: HashMap<Box<str>, u32>,
    pairs: Vec<Option<Pair>>,
    free_pairs: Vec<u32>,
    pair_table: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    pub(super) bundles: Vec<Option<Open>>,
    free_bundles: Vec<u32>,
    pub(super) open: usize,
    due: BTreeMap<i64, Queue>,
    watermarks: HashMap<i32, BTreeMap<i64, u32>>,
    pub(super) segs: Vec<Option<Seg>>,
    free_segs: Vec<u32>,
    pub(super) segs_of: HashMap<i32, HashSet<u32>>,
    pub(super) next_seq: u64,
}

impl Index {
    fn hash(&self, sub: &str, chat: &str) -> u64 {
        self.hasher.hash_one((sub, chat))
    }

    pub(super) fn sub_name(&self, sub: u32) -> &str {
        &self.subs[sub as usize]
    }

    pub(super) fn find_pair(&self, sub_id: &str, chat_id: &str) -> Option<u32> {
        let h = self.hash(sub_id, chat_id);
        self.pair_table
            .find(h, |&p| self.pairs[p as usize].as_ref().is_some_and(|x| &*x.chat == chat_id && self.sub_name(x.sub) == sub_id))
            .copied()
    }

    /// Adds a pair that is not in the index (check with [`Self::find_pair`]).
    pub(super) fn add_pair(&mut self, sub_id: &str, chat_id: &str, marker: Option<i64>) -> u32 {
        let sub = match self.sub_ids.get(sub_id) {
            Some(s) => *s,
            None => {
                self.subs.push(sub_id.into());
                self.sub_ids.insert(sub_id.into(), self.subs.len() as u32 - 1);
                self.subs.len() as u32 - 1
            }
        };
        let pair = Pair { sub, chat: chat_id.into(), marker, bundles: SmallVec::new() };
        let slot = alloc(&mut self.pairs, &mut self.free_pairs, pair);
        let h = self.hash(sub_id, chat_id);
        let (pairs, subs, hasher) = (&self.pairs, &self.subs, &self.hasher);
        self.pair_table.insert_unique(h, slot, |&p| {
            let x = pairs[p as usize].as_ref().expect("pairs in the table are stored");
            hasher.hash_one((&*subs[x.sub as usize], &*x.chat))
        });
        slot
    }

    pub(super) fn pair(&self, pair: u32) -> &Pair {
        self.pairs[pair as usize].as_ref().expect("a stored pair")
    }

    pub(super) fn pair_mut(&mut self, pair: u32) -> &mut Pair {
        self.pairs[pair as usize].as_mut().expect("a stored pair")
    }

    /// Drops a pair left without bundles (its marker stays in sled).
    pub(super) fn release_pair(&mut self, pair: u32) {
        if !self.pair(pair).bundles.is_empty() {
            return;
        }
        let p = self.pairs[pair as usize].take().expect("a stored pair");
        let h = self.hash(self.sub_name(p.sub), &p.chat);
        if let Ok(entry) = self.pair_table.find_entry(h, |&x| x == pair) {
            entry.remove();
        }
        self.free_pairs.push(pair);
    }

    /// The bundle of `pair` starting at `start_ms`.
    pub(super) fn find_bundle(&self, pair: u32, start_ms: i64) -> Option<u32> {
        self.pair(pair).bundles.iter().copied().find(|&b| self.bundle(b).start_ms == start_ms)
    }

    pub(super) fn bundle(&self, b: u32) -> &Open {
        self.bundles[b as usize].as_ref().expect("a stored bundle")
    }

    pub(super) fn bundle_mut(&mut self, b: u32) -> &mut Open {
        self.bundles[b as usize].as_mut().expect("a stored bundle")
    }

    /// Adds a bundle (not emitting, due at `close_at_ms`) with no messages yet.
    pub(super) fn add_bundle(&mut self, pair: u32, start_ms: i64, end_ms: i64, close_at_ms: i64) -> u32 {
        let open = Open {
            pair,
            start_ms,
            end_ms,
            close_at_ms,
            late: false,
            emitting: false,
            due_pos: 0,
            parts: SmallVec::new(),
            msgs: SmallVec::new(),
        };
        let b = alloc(&mut self.bundles, &mut self.free_bundles, open);
        self.pair_mut(pair).bundles.push(b);
        self.open += 1;
        self.enqueue(b);
        b
    }

    /// Records a message of `partition` at `offset` in bundle `b`.
    pub(super) fn add_message(&mut self, b: u32, loc: Loc, partition: i32, offset: i64, late: bool) {
        let open = self.bundle_mut(b);
        open.msgs.push(loc);
        open.late |= late;
        let part = open.parts.iter_mut().find(|p| p.partition == partition).expect("a part is added before its messages");
        let before = part.first_offset;
        part.first_offset = before.min(offset);
        if offset < before {
            self.unmark(partition, before);
            self.mark(partition, offset);
        }
        self.segs[loc.seg as usize].as_mut().expect("a stored segment").live += 1;
    }

    /// Adds the part of `partition` to bundle `b`, its header at `header`.
    pub(super) fn add_part(&mut self, b: u32, partition: i32, first_offset: i64, header: Loc) {
        self.bundle_mut(b).parts.push(Part { partition, first_offset, header });
        self.mark(partition, first_offset);
        self.segs[header.seg as usize].as_mut().expect("a stored segment").live += 1;
    }

    pub(super) fn has_part(&self, b: u32, partition: i32) -> bool {
        self.bundle(b).parts.iter().any(|p| p.partition == partition)
    }

    fn mark(&mut self, partition: i32, offset: i64) {
        *self.watermarks.entry(partition).or_default().entry(offset).or_default() += 1;
    }

    fn unmark(&mut self, partition: i32, offset: i64) {
        if let Some(w) = self.watermarks.get_mut(&partition) {
            if let std::collections::btree_map::Entry::Occupied(mut e) = w.entry(offset) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    pub(super) fn low_watermark(&self, partition: i32) -> Option<i64> {
        self.watermarks.get(&partition).and_then(|w| w.keys().next().copied())
    }

    fn enqueue(&mut self, b: u32) {
        let close = self.bundle(b).close_at_ms;
        let q = self.due.entry(close).or_default();
        let pos = q.base + q.items.len() as u32;
        q.items.push_back(b);
        q.live += 1;
        self.bundle_mut(b).due_pos = pos;
    }

    fn dequeue(&mut self, b: u32) {
        let (close, pos) = (self.bundle(b).close_at_ms, self.bundle(b).due_pos);
        let Some(q) = self.due.get_mut(&close) else { return };
        let Some(item) = q.items.get_mut(pos.wrapping_sub(q.base) as usize) else { return };
        *item = GONE;
        q.live -= 1;
        while q.items.front() == Some(&GONE) {
            q.items.pop_front();
            q.base = q.base.wrapping_add(1);
        }
        if q.live == 0 {
            self.due.remove(&close);
        }
    }

    /// Marks `b` as being emitted: out of the due order.
    pub(super) fn begin_emit(&mut self, b: u32) {
        if !self.bundle(b).emitting {
            self.dequeue(b);
            self.bundle_mut(b).emitting = true;
        }
    }

    /// Bundles not being emitted closing at or before `now_ms`, earliest first.
    pub(super) fn due(&self, now_ms: i64, limit: usize) -> impl Iterator<Item = u32> + '_ {
        self.due.range(..=now_ms).flat_map(|(_, q)| q.items.iter().copied().filter(|&b| b != GONE)).take(limit)
    }

    /// The (start, end) of each stored bundle of `pair` that ends at or before its marker
    /// (emitted, not yet removed): the list of the pair's `e` entry that keeps them alive.
    pub(super) fn pending(&self, pair: u32) -> Vec<(i64, i64)> {
        let p = self.pair(pair);
        let Some(marker) = p.marker else { return Vec::new() };
        p.bundles.iter().map(|&b| self.bundle(b)).filter(|o| o.end_ms <= marker).map(|o| (o.start_ms, o.end_ms)).collect()
    }

    /// Removes bundle `b`; returns the segments left without a stored record.
    pub(super) fn remove_bundle(&mut self, b: u32) -> Vec<u32> {
        if !self.bundle(b).emitting {
            self.dequeue(b);
        }
        let open = self.bundles[b as usize].take().expect("a stored bundle");
        self.free_bundles.push(b);
        self.open -= 1;
        for p in &open.parts {
            self.unmark(p.partition, p.first_offset);
        }
        self.pair_mut(open.pair).bundles.retain(|x| *x != b);
        let mut emptied = Vec::new();
        for loc in open.msgs.iter().chain(open.parts.iter().map(|p| &p.header)) {
            if let Some(seg) = self.segs[loc.seg as usize].as_mut() {
                seg.live -= 1;
                if seg.live == 0 {
                    emptied.push(loc.seg);
                }
            }
        }
        emptied
    }

    /// Takes `partition`'s messages and part out of bundle `b`, which keeps others.
    pub(super) fn drop_part(&mut self, b: u32, partition: i32) {
        let open = self.bundle(b);
        let first = open.parts.iter().find(|p| p.partition == partition).map(|p| p.first_offset);
        let segs = &self.segs;
        let of_partition = |l: &Loc| segs[l.seg as usize].as_ref().is_some_and(|s| s.partition == partition);
        let keep: SmallVec<[Loc; 3]> = open.msgs.iter().copied().filter(|l| !of_partition(l)).collect();
        let open = self.bundle_mut(b);
        open.msgs = keep;
        open.parts.retain(|p| p.partition != partition);
        if let Some(first) = first {
            self.unmark(partition, first);
        }
    }

    pub(super) fn add_seg(&mut self, partition: i32) -> (u32, u64) {
        let seq = self.next_seq;
        self.next_seq += 1;
        (self.add_seg_at(partition, seq), seq)
    }

    pub(super) fn set_chunks(&mut self, seg: u32, chunks: u16) {
        if let Some(s) = self.segs[seg as usize].as_mut() {
            s.chunks = chunks;
        }
    }

    pub(super) fn seg(&self, seg: u32) -> &Seg {
        self.segs[seg as usize].as_ref().expect("a stored segment")
    }

    pub(super) fn free_seg(&mut self, seg: u32) -> Option<Seg> {
        let s = self.segs[seg as usize].take()?;
        if let Some(set) = self.segs_of.get_mut(&s.partition) {
            set.remove(&seg);
        }
        self.free_segs.push(seg);
        Some(s)
    }
}

fn alloc<T>(slab: &mut Vec<Option<T>>, free: &mut Vec<u32>, value: T) -> u32 {
    match free.pop() {
        Some(slot) => {
            slab[slot as usize] = Some(value);
            slot
        }
        None => {
            slab.push(Some(value));
            slab.len() as u32 - 1
        }
    }
}

impl Index {
    /// A segment read back on open, with its own seq.
    pub(super) fn add_seg_at(&mut self, partition: i32, seq: u64) -> u32 {
        let seg = alloc(&mut self.segs, &mut self.free_segs, Seg { partition, seq, live: 0, chunks: 0 });
        self.segs_of.entry(partition).or_default().insert(seg);
        seg
    }

    pub(super) fn segment_count(&self) -> usize {
        self.segs.len() - self.free_segs.len()
    }

    /// Segments without a stored record.
    pub(super) fn empty_segs(&self) -> Vec<u32> {
        self.segs.iter().enumerate().filter(|(_, s)| s.as_ref().is_some_and(|s| s.live == 0)).map(|(i, _)| i as u32).collect()
    }

    /// Drops every pair without bundles (read on open only to decide what was removed).
    pub(super) fn release_empty_pairs(&mut self) {
        let empty: Vec<u32> = self
            .pairs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.as_ref().is_some_and(|p| p.bundles.is_empty()))
            .map(|(i, _)| i as u32)
            .collect();
        for pair in empty {
            self.release_pair(pair);
        }
    }
}
