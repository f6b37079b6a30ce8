//! Segments: what one `apply` writes for one partition, as two sled values.
//! - `s` partition seq → the index: the bundles the segment touches (a table: sub, chat,
//!   start and, where this segment is the first to hold the bundle's messages of this
//!   partition, its end, close time and where its header is), then one entry per message
//!   (table row, offset, late flag, where its record is). Replay on open reads only these.
//! - `v` partition seq chunk(u16) → the bodies, in chunks of about [`CHUNK`] bytes: headers
//!   (`len u32, bytes`) and message records (`ts i64, offset i64, len u32, bytes`), found by
//!   position (chunk << 16 | byte in chunk). Emission reads these. Chunks keep sled's values
//!   small: a sled leaf holds up to 16 values and is rewritten whole, and one over 128 KiB
//!   goes to a blob file of its own, so large values cost far more than their bytes.
//!
//! Every number is big-endian; `seq` is one counter for the whole store, so a scan of `s` is
//! in write order within each partition.

use std::collections::HashMap;

use super::codec::{corrupt, put_str, Reader};

pub(super) const VERSION: u8 = 1;

/// Bodies chunk size: a record starts a new chunk when it would not fit (one larger than
/// this is a chunk of its own).
pub(super) const CHUNK: usize = 6 * 1024;

pub(super) fn index_key(partition: i32, seq: u64) -> [u8; 13] {
    key(b's', partition, seq)
}

pub(super) fn bodies_key(partition: i32, seq: u64, chunk: u16) -> [u8; 15] {
    let mut k = [0; 15];
    k[..13].copy_from_slice(&key(b'v', partition, seq));
    k[13..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// Chunk and byte in chunk of a record position.
pub(super) fn split_at(at: u32) -> (u16, usize) {
    ((at >> 16) as u16, (at & 0xffff) as usize)
}

fn key(tag: u8, partition: i32, seq: u64) -> [u8; 13] {
    let mut k = [tag; 13];
    k[1..5].copy_from_slice(&(partition as u32).to_be_bytes());
    k[5..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Partition and seq of an `s` or `v` key.
pub(super) fn parse_key(k: &[u8]) -> Option<(i32, u64)> {
    (k.len() == 13).then(|| (u32::from_be_bytes(k[1..5].try_into().unwrap()) as i32, u64::from_be_bytes(k[5..].try_into().unwrap())))
}

/// Where a bundle is created in a segment: its end, close time and header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct OpenRec {
    pub(super) end_ms: i64,
    pub(super) close_at_ms: i64,
    pub(super) header_at: u32,
}

/// One row of a segment's bundle table.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Row<'a> {
    pub(super) sub_id: &'a str,
    pub(super) chat_id: &'a str,
    pub(super) start_ms: i64,
    pub(super) open: Option<OpenRec>,
}

/// One message of a segment's index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Entry {
    pub(super) row: u32,
    pub(super) offset: i64,
    pub(super) late: bool,
    pub(super) at: u32,
}

/// A segment being built by one `apply`, keyed by the bundle slot each row is for.
pub(super) struct Writer {
    pub(super) seg: u32,
    pub(super) seq: u64,
    pub(super) partition: i32,
    rows: Vec<u8>,
    row_count: u32,
    row_of: HashMap<u32, u32>,
    entries: Vec<u8>,
    entry_count: u32,
    chunks: Vec<Vec<u8>>,
}

impl Writer {
    pub(super) fn new(seg: u32, seq: u64, partition: i32) -> Self {
        Self {
            seg,
            seq,
            partition,
            rows: Vec::new(),
            row_count: 0,
            row_of: HashMap::new(),
            entries: Vec::new(),
            entry_count: 0,
            chunks: Vec::new(),
        }
    }

    /// Where a record of `len` bytes goes: the last chunk, or a new one when it would not fit.
    fn place(&mut self, len: usize) -> (u32, &mut Vec<u8>) {
        if self.chunks.last().is_none_or(|c| !c.is_empty() && c.len() + len > CHUNK) {
            self.chunks.push(Vec::with_capacity(len.max(CHUNK)));
        }
        let chunk = self.chunks.len() - 1;
        let last = self.chunks.last_mut().expect("pushed above");
        (((chunk as u32) << 16) | last.len() as u32, last)
    }

    /// Bodies chunks written so far.
    pub(super) fn chunk_count(&self) -> u16 {
        self.chunks.len() as u16
    }

    /// The table row of bundle `slot`, added (with `open` and its header) the first time.
    pub(super) fn row(
        &mut self,
        slot: u32,
        sub_id: &str,
        chat_id: &str,
        start_ms: i64,
        open: Option<(i64, i64, &[u8])>,
    ) -> (u32, Option<u32>) {
        if let Some(row) = self.row_of.get(&slot) {
            return (*row, None);
        }
        put_str(&mut self.rows, sub_id);
        put_str(&mut self.rows, chat_id);
        self.rows.extend_from_slice(&start_ms.to_be_bytes());
        let header_at = open.map(|(end_ms, close_at_ms, header)| {
            let (at, chunk) = self.place(4 + header.len());
            chunk.extend_from_slice(&(header.len() as u32).to_be_bytes());
            chunk.extend_from_slice(header);
            self.rows.push(1);
            self.rows.extend_from_slice(&end_ms.to_be_bytes());
            self.rows.extend_from_slice(&close_at_ms.to_be_bytes());
            self.rows.extend_from_slice(&at.to_be_bytes());
            at
        });
        if header_at.is_none() {
            self.rows.push(0);
        }
        let row = self.row_count;
        self.row_count += 1;
        self.row_of.insert(slot, row);
        (row, header_at)
    }

    /// Adds a message of table row `row`; returns where its record is.
    pub(super) fn message(&mut self, row: u32, ts_ms: i64, offset: i64, late: bool, body: &[u8]) -> u32 {
        let (at, chunk) = self.place(20 + body.len());
        chunk.extend_from_slice(&ts_ms.to_be_bytes());
        chunk.extend_from_slice(&offset.to_be_bytes());
        chunk.extend_from_slice(&(body.len() as u32).to_be_bytes());
        chunk.extend_from_slice(body);
        self.entries.extend_from_slice(&row.to_be_bytes());
        self.entries.extend_from_slice(&offset.to_be_bytes());
        self.entries.push(u8::from(late));
        self.entries.extend_from_slice(&at.to_be_bytes());
        self.entry_count += 1;
        at
    }

    /// Adds the segment's index and bodies chunks to `b`.
    pub(super) fn write(self, b: &mut sled::Batch) {
        let mut index = Vec::with_capacity(11 + self.rows.len() + self.entries.len());
        index.push(VERSION);
        index.extend_from_slice(&self.chunk_count().to_be_bytes());
        index.extend_from_slice(&self.row_count.to_be_bytes());
        index.extend_from_slice(&self.rows);
        index.extend_from_slice(&self.entry_count.to_be_bytes());
        index.extend_from_slice(&self.entries);
        b.insert(&index_key(self.partition, self.seq), index);
        for (i, chunk) in self.chunks.into_iter().enumerate() {
            b.insert(&bodies_key(self.partition, self.seq, i as u16), chunk);
        }
    }
}

/// A segment's index: its bodies chunk count, bundle table and messages.
pub(super) struct Decoded<'a> {
    pub(super) chunks: u16,
    pub(super) rows: Vec<Row<'a>>,
    pub(super) entries: Vec<Entry>,
}

/// Reads a segment's index.
pub(super) fn decode_index(v: &[u8]) -> Result<Decoded<'_>, sled::Error> {
    decode(v).ok_or_else(|| corrupt("segment index"))
}

fn decode(v: &[u8]) -> Option<Decoded<'_>> {
    let mut r = Reader(v);
    if r.take(1)?[0] != VERSION {
        return None;
    }
    let chunks = u16::from_be_bytes(r.take(2)?.try_into().ok()?);
    let rows_len = r.u32()?;
    let mut rows = Vec::with_capacity(rows_len.min(1 << 16) as usize);
    for _ in 0..rows_len {
        let (sub_id, chat_id, start_ms) = (r.str()?, r.str()?, r.i64()?);
        let open = match r.take(1)?[0] {
            0 => None,
            _ => Some(OpenRec { end_ms: r.i64()?, close_at_ms: r.i64()?, header_at: r.u32()? }),
        };
        rows.push(Row { sub_id, chat_id, start_ms, open });
    }
    let entries_len = r.u32()?;
    let mut entries = Vec::with_capacity(entries_len.min(1 << 16) as usize);
    for _ in 0..entries_len {
        let row = r.u32()?;
        if row >= rows_len {
            return None;
        }
        entries.push(Entry { row, offset: r.i64()?, late: r.take(1)?[0] != 0, at: r.u32()? });
    }
    Some(Decoded { chunks, rows, entries })
}

/// The header stored at byte `at` of a bodies chunk.
pub(super) fn header_at(chunk: &[u8], at: usize) -> Result<&[u8], sled::Error> {
    let mut r = Reader(chunk.get(at..).ok_or_else(|| corrupt("segment header"))?);
    r.u32().and_then(|len| r.take(len as usize)).ok_or_else(|| corrupt("segment header"))
}

/// The message record at byte `at` of a bodies chunk: (ts, offset, body).
pub(super) fn message_at(chunk: &[u8], at: usize) -> Result<(i64, i64, &[u8]), sled::Error> {
    let read = || {
        let mut r = Reader(chunk.get(at..)?);
        let (ts, offset, len) = (r.i64()?, r.i64()?, r.u32()?);
        Some((ts, offset, r.take(len as usize)?))
    };
    read().ok_or_else(|| corrupt("segment message"))
}

/// Adds the deletion of a segment (index and every bodies chunk) to `b`.
pub(super) fn delete(b: &mut sled::Batch, seg: &super::index::Seg) {
    b.remove(&index_key(seg.partition, seg.seq));
    for chunk in 0..seg.chunks {
        b.remove(&bodies_key(seg.partition, seg.seq, chunk));
    }
}
