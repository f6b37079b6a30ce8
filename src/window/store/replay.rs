//! Opening a window store: the index rebuilt from the segments' index values (bodies are not
//! read), and stores of the earlier per-message layout converted first.
//!
//! A segment row that creates a bundle (it carries the bundle's end) is a removed bundle's
//! when the pair's marker is at or past that end and the `e` entry does not list the bundle
//! as still stored; its messages, and rows of later segments naming it without creating it,
//! are skipped. Segments left without a stored record are deleted.

use std::collections::HashMap;

use sled::{Batch, Tree};

use super::codec::{corrupt, decode_marker, encode_marker, pair_id, tagged, unord, Meta};
use super::index::{Index, Loc};
use super::segment::{self, Writer};
use super::BundleKey;

/// Rebuilds the index of the store in `tree`.
pub(super) fn load(tree: &Tree) -> Result<Index, sled::Error> {
    let started = std::time::Instant::now();
    let with_marker = marked_pairs(tree)?;
    let mut ix = Index::default();
    let mut covered: HashMap<u32, Vec<(i64, i64)>> = HashMap::new();
    let mut next_seq = 0;
    for kv in tree.scan_prefix([b's']) {
        let (k, v) = kv?;
        let (partition, seq) = segment::parse_key(&k).ok_or_else(|| corrupt("segment key"))?;
        next_seq = next_seq.max(seq + 1);
        let segment::Decoded { chunks, rows, entries } = segment::decode_index(&v)?;
        let seg = ix.add_seg_at(partition, seq);
        ix.set_chunks(seg, chunks);
        let mut first = vec![i64::MAX; rows.len()];
        for e in &entries {
            first[e.row as usize] = first[e.row as usize].min(e.offset);
        }
        let mut bundle_of = Vec::with_capacity(rows.len());
        for (row, first) in rows.iter().zip(first) {
            let pair = match ix.find_pair(row.sub_id, row.chat_id) {
                Some(pair) => pair,
                None => {
                    let id = pair_id(row.sub_id, row.chat_id);
                    let (marker, cover) = if with_marker.contains(&hash(&id)) { read_marker(tree, &id)? } else { (None, Vec::new()) };
                    let pair = ix.add_pair(row.sub_id, row.chat_id, marker);
                    covered.insert(pair, cover);
                    pair
                }
            };
            let b = match (row.open, ix.find_bundle(pair, row.start_ms)) {
                (Some(open), Some(b)) => {
                    if !ix.has_part(b, partition) {
                        ix.add_part(b, partition, first, Loc { seg, at: open.header_at });
                    }
                    Some(b)
                }
                (Some(open), None) => {
                    let removed = ix.pair(pair).marker.is_some_and(|m| open.end_ms <= m)
                        && !covered.get(&pair).is_some_and(|c| c.contains(&(row.start_ms, open.end_ms)));
                    (!removed).then(|| {
                        let b = ix.add_bundle(pair, row.start_ms, open.end_ms, open.close_at_ms);
                        ix.add_part(b, partition, first, Loc { seg, at: open.header_at });
                        b
                    })
                }
                (None, found) => found.filter(|&b| ix.has_part(b, partition)),
            };
            bundle_of.push(b);
        }
        for e in entries {
            if let Some(b) = bundle_of[e.row as usize] {
                ix.add_message(b, Loc { seg, at: e.at }, partition, e.offset, e.late);
            }
        }
    }
    ix.next_seq = next_seq;
    let mut b = Batch::default();
    for seg in ix.empty_segs() {
        if let Some(s) = ix.free_seg(seg) {
            segment::delete(&mut b, &s);
        }
    }
    tree.apply_batch(b)?;
    ix.release_empty_pairs();
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(bundles = ix.open, segments = ix.segment_count(), ms, "Window store index rebuilt from its segments.");
    Ok(ix)
}

/// Hashes of the pairs that have an `e` entry, from one scan of `e` (keys only): most pairs of
/// open bundles have none, and a scan is far cheaper than a lookup per pair.
fn marked_pairs(tree: &Tree) -> Result<std::collections::HashSet<u64>, sled::Error> {
    let mut set = std::collections::HashSet::new();
    for k in tree.scan_prefix([b'e']).keys() {
        set.insert(hash(&k?[1..]));
    }
    Ok(set)
}

fn hash(pair_id: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(pair_id)
}

/// The `e` entry of a pair: its marker and the (start, end) of the stored bundles ending at
/// or before it.
pub(super) fn read_marker(tree: &Tree, pair_id: &[u8]) -> Result<(Option<i64>, Vec<(i64, i64)>), sled::Error> {
    match tree.get(tagged(b'e', &[pair_id]))? {
        None => Ok((None, Vec::new())),
        Some(v) => decode_marker(&v).map(|(m, c)| (Some(m), c)).ok_or_else(|| corrupt("late marker")),
    }
}

/// Tags of the per-message layout (before segments): bundle meta, header, message, due,
/// emitting, watermark; and the bundle counter `n`.
const LEGACY: [u8; 6] = [b'b', b'h', b'm', b'd', b'x', b'w'];

/// Converts a store of the per-message layout: each bundle becomes one segment per
/// partition it holds messages of; bundles whose emission had begun are listed in their
/// pair's `e` entry (so they stay stored and are due again), and the old keys are deleted,
/// all in one batch.
pub(super) fn convert_legacy(tree: &Tree) -> Result<(), sled::Error> {
    if tree.scan_prefix([b'b']).next().is_none() && !tree.contains_key([b'n'])? {
        return Ok(());
    }
    let mut b = Batch::default();
    let mut seq = tree.scan_prefix([b's']).keys().next_back().transpose()?.and_then(|k| segment::parse_key(&k)).map_or(0, |(_, s)| s + 1);
    let mut covered: HashMap<Vec<u8>, (i64, Vec<(i64, i64)>)> = HashMap::new();
    let mut bundles = 0usize;
    for kv in tree.scan_prefix([b'b']) {
        let (k, v) = kv?;
        let id = &k[1..];
        let key = BundleKey::decode(id).ok_or_else(|| corrupt("bundle key"))?;
        let meta = Meta::decode(&v).ok_or_else(|| corrupt("bundle meta"))?;
        let header = match &meta.header {
            Some(inline) => inline.clone(),
            None => tree.get(tagged(b'h', &[id]))?.ok_or_else(|| corrupt("bundle header"))?.to_vec(),
        };
        let mut by_partition: Vec<(i32, Writer, u32)> = Vec::new();
        for kv in tree.scan_prefix(tagged(b'm', &[id])) {
            let (k, body) = kv?;
            let n = k.len();
            let (ts, offset) = (unord(&k[n - 20..n - 12]), unord(&k[n - 8..]));
            let partition = u32::from_be_bytes(k[n - 12..n - 8].try_into().expect("4 bytes")) as i32;
            let w = match by_partition.iter().position(|(p, _, _)| *p == partition) {
                Some(w) => w,
                None => {
                    let mut w = Writer::new(0, seq, partition);
                    seq += 1;
                    let (row, _) = w.row(0, &key.sub_id, &key.chat_id, key.start_ms, Some((meta.end_ms, meta.close_at_ms, &header)));
                    by_partition.push((partition, w, row));
                    by_partition.len() - 1
                }
            };
            let (_, w, row) = &mut by_partition[w];
            w.message(*row, ts, offset, meta.late, &body);
        }
        by_partition.into_iter().for_each(|(_, w, _)| w.write(&mut b));
        let pair = pair_id(&key.sub_id, &key.chat_id);
        if let (Some(marker), _) = read_marker(tree, &pair)? {
            if meta.end_ms <= marker {
                covered.entry(pair).or_insert((marker, Vec::new())).1.push((key.start_ms, meta.end_ms));
            }
        }
        bundles += 1;
    }
    for (pair, (marker, cover)) in covered {
        b.insert(tagged(b'e', &[&pair]), encode_marker(marker, &cover));
    }
    for tag in LEGACY {
        for k in tree.scan_prefix([tag]).keys() {
            b.remove(k?);
        }
    }
    b.remove(&[b'n']);
    tree.apply_batch(b)?;
    tracing::info!(bundles, "Window store converted to the segment layout.");
    Ok(())
}
