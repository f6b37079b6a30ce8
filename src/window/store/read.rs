//! Reading a bundle for emission: its header and message records from the segments' bodies
//! chunks, through a small cache (bundles closing together were mostly written together).

use sled::IVec;

use super::codec::corrupt;
use super::index::Loc;
use super::{segment, Bundle, BundleKey, Inner, WindowStore, BODIES_CACHED};

impl WindowStore {
    /// Reads bundle `b`'s header and messages from its segments.
    pub(super) fn load(&self, inner: &mut Inner, b: u32, key: &BundleKey) -> Result<Bundle, sled::Error> {
        let ix = &inner.index;
        let open = ix.bundle(b);
        let first = open.parts[0];
        let locs: Vec<(Loc, i32, u64)> = open.msgs.iter().map(|l| (*l, ix.seg(l.seg).partition, ix.seg(l.seg).seq)).collect();
        let (end_ms, late) = (open.end_ms, open.late);
        let header_seg = (ix.seg(first.header.seg).partition, ix.seg(first.header.seg).seq);
        let (chunk, at) = segment::split_at(first.header.at);
        let header = segment::header_at(&self.bodies(inner, header_seg.0, header_seg.1, chunk)?, at)?.to_vec();
        let mut messages: Vec<(i64, i32, i64, Vec<u8>)> = Vec::with_capacity(locs.len());
        for (loc, partition, seq) in locs {
            let (chunk, at) = segment::split_at(loc.at);
            let bodies = self.bodies(inner, partition, seq, chunk)?;
            let (ts, offset, body) = segment::message_at(&bodies, at)?;
            messages.push((ts, partition, offset, body.to_vec()));
        }
        messages.sort_unstable_by_key(|(ts, partition, offset, _)| (*ts, *partition, *offset));
        let first_ts_ms = messages.first().map_or(i64::MAX, |m| m.0);
        let last_ts_ms = messages.last().map_or(i64::MIN, |m| m.0);
        let origins = messages.iter().map(|(_, p, o, _)| (*p, *o)).collect();
        Ok(Bundle {
            key: key.clone(),
            end_ms,
            header,
            messages: messages.into_iter().map(|m| m.3).collect(),
            origins,
            first_ts_ms,
            last_ts_ms,
            late,
            partition: first.partition,
            first_offset: first.first_offset,
        })
    }

    /// A segment's bodies chunk, from the small cache or sled.
    fn bodies(&self, inner: &mut Inner, partition: i32, seq: u64, chunk: u16) -> Result<IVec, sled::Error> {
        if let Some((_, v)) = inner.bodies.iter().find(|(s, _)| *s == (seq, chunk)) {
            return Ok(v.clone());
        }
        let v = self.tree.get(segment::bodies_key(partition, seq, chunk))?.ok_or_else(|| corrupt("segment bodies"))?;
        if inner.bodies.len() >= BODIES_CACHED {
            inner.bodies.remove(0);
        }
        inner.bodies.push(((seq, chunk), v.clone()));
        Ok(v)
    }
}
