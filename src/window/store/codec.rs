//! What the window store keeps and how: bundle and pair ids, the `e` entry (late marker and
//! the bundles it still covers), and the per-message layout of earlier versions (bundle metas,
//! version 2 and version 1), read once to convert such a store. Every i64 in a key is big-endian with the sign bit flipped ([`ord`]), so
//! keys sort as the numbers do.

use super::BundleKey;

impl BundleKey {
    /// `sub chat start`, the bundle's part of every key of the per-message layout.
    #[cfg(test)]
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut id = Vec::with_capacity(16 + self.sub_id.len() + self.chat_id.len());
        put_str(&mut id, &self.sub_id);
        put_str(&mut id, &self.chat_id);
        id.extend_from_slice(&ord(self.start_ms));
        id
    }

    pub(super) fn decode(id: &[u8]) -> Option<Self> {
        let mut r = Reader(id);
        let sub_id = r.string()?;
        let chat_id = r.string()?;
        Some(Self { sub_id, chat_id, start_ms: unord(r.take(8)?) })
    }
}

/// What the store keeps about a bundle besides its messages.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Meta {
    pub(super) end_ms: i64,
    pub(super) grace_ms: i64,
    /// `end + grace`, fixed at creation: it names the bundle's due entry.
    pub(super) close_at_ms: i64,
    pub(super) late: bool,
    /// Emission has begun: the bundle is in `x`, not in `d`.
    pub(super) emitting: bool,
    /// Each partition the bundle holds messages of, with its smallest offset; first is the
    /// partition of the first message.
    pub(super) parts: Vec<Part>,
    /// The header of a version-1 entry, which carried it inline; `None` from version 2 on
    /// (it is under `h`).
    pub(super) header: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Part {
    pub(super) partition: i32,
    pub(super) first_offset: i64,
}

pub(super) const META_VERSION: u8 = 2;

impl Meta {
    /// Version 2: version, flags, three i64 (end, grace, close_at), part count (u16), parts.
    #[cfg(test)]
    pub(super) fn encode(&self) -> Vec<u8> {
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
    pub(super) fn decode(v: &[u8]) -> Option<Self> {
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

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    pub(super) fn i64(&mut self) -> Option<i64> {
        Some(i64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    pub(super) fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    pub(super) fn str(&mut self) -> Option<&'a str> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// Order-preserving encoding of an i64: big-endian with the sign bit flipped.
pub(super) fn ord(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

pub(super) fn unord(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(a) ^ (1 << 63)) as i64
}

pub(super) fn put_str(k: &mut Vec<u8>, s: &str) {
    k.extend_from_slice(&(s.len() as u32).to_be_bytes());
    k.extend_from_slice(s.as_bytes());
}

pub(super) fn tagged(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

#[cfg(test)]
pub(super) fn msg_key(id: &[u8], ts_ms: i64, partition: i32, offset: i64) -> Vec<u8> {
    tagged(b'm', &[id, &ord(ts_ms), &(partition as u32).to_be_bytes(), &ord(offset)])
}

pub(super) fn corrupt(what: &str) -> sled::Error {
    sled::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("window store: unreadable {what}")))
}

/// `sub chat`, the pair's part of its `e` key.
pub(super) fn pair_id(sub_id: &str, chat_id: &str) -> Vec<u8> {
    let mut id = Vec::with_capacity(8 + sub_id.len() + chat_id.len());
    put_str(&mut id, sub_id);
    put_str(&mut id, chat_id);
    id
}

/// An `e` value: the marker, then (start, end) of each stored bundle it covers. A value of
/// an earlier version is the marker alone.
pub(super) fn encode_marker(marker: i64, covered: &[(i64, i64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 16 * covered.len());
    v.extend_from_slice(&ord(marker));
    for (start, end) in covered {
        v.extend_from_slice(&ord(*start));
        v.extend_from_slice(&ord(*end));
    }
    v
}

pub(super) fn decode_marker(v: &[u8]) -> Option<(i64, Vec<(i64, i64)>)> {
    if v.len() < 8 || (v.len() - 8) % 16 != 0 {
        return None;
    }
    let covered = v[8..].chunks_exact(16).map(|c| (unord(&c[..8]), unord(&c[8..]))).collect();
    Some((unord(v), covered))
}
