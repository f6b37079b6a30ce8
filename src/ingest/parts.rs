//! Bundle parts: what one chat message adds to the window store for each aggregating
//! subscription, and the store batch they are applied in. The stored message object and
//! bundle header are written once per message, into one buffer its parts share.

use std::sync::Arc;

use super::chat::ChatMessage;
use crate::render::timelines;
use crate::route::subscription::Subscription;
use crate::window::calendar::Windows;
use crate::window::store::{BundleKey, Incoming, WindowStore};

/// A message's aggregated part, waiting for the next store batch.
pub struct Pending {
    sub: Arc<Subscription>,
    pub(super) partition: i32,
    offset: i64,
    ts_ms: i64,
    windows: Windows,
    stored: Arc<Stored>,
}

/// What the window store keeps of one message, written once and shared by its parts: the
/// message object, then the bundle header, then the chat id, in one buffer.
struct Stored {
    bytes: Vec<u8>,
    header: usize,
    chat_id: usize,
}

impl Stored {
    fn of(m: &ChatMessage<'_>) -> Self {
        let mut bytes = Vec::with_capacity(640 + m.text.len() + m.chat_id.len());
        let header = timelines::write_stored(m, &mut bytes);
        let chat_id = bytes.len();
        bytes.extend_from_slice(m.chat_id.as_bytes());
        Self { bytes, header, chat_id }
    }

    fn message(&self) -> &[u8] {
        &self.bytes[..self.header]
    }

    fn header(&self) -> &[u8] {
        &self.bytes[self.header..self.chat_id]
    }

    fn chat_id(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.chat_id..]).expect("copied from a str")
    }
}

/// Builds the bundle parts of one decoded message: the stored message and bundle header
/// are serialised once, on the first aggregating subscription, and shared by the others.
pub struct Parts<'m, 'a> {
    m: &'m ChatMessage<'a>,
    partition: i32,
    offset: i64,
    stored: Option<Arc<Stored>>,
    pub parts: Vec<Pending>,
}

impl<'m, 'a> Parts<'m, 'a> {
    pub fn new(m: &'m ChatMessage<'a>, partition: i32, offset: i64) -> Self {
        Self { m, partition, offset, stored: None, parts: Vec::new() }
    }

    /// Adds the message's part for aggregating subscription `sub` with its `windows`.
    pub fn push(&mut self, sub: &Arc<Subscription>, windows: Windows) {
        let m = self.m;
        let stored = self.stored.get_or_insert_with(|| Arc::new(Stored::of(m))).clone();
        self.parts.push(Pending {
            sub: sub.clone(),
            partition: self.partition,
            offset: self.offset,
            ts_ms: m.timestamp_ms(),
            windows,
            stored,
        });
    }
}

/// Applies bundle parts to the store as one batch; returns where each went (bundle, late).
pub fn apply_parts(store: &WindowStore, parts: &[Pending], grace_ms: i64) -> Result<Vec<(BundleKey, bool)>, sled::Error> {
    let batch: Vec<Incoming<'_>> = parts
        .iter()
        .map(|p| Incoming {
            sub_id: &p.sub.id,
            chat_id: p.stored.chat_id(),
            partition: p.partition,
            offset: p.offset,
            ts_ms: p.ts_ms,
            windows: p.windows,
            grace_ms,
            message: p.stored.message(),
            header: p.stored.header(),
        })
        .collect();
    store.apply(&batch)
}
