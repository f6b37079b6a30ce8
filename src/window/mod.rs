//! Window: bundles a chat's messages per subscription and emits each bundle when its window closes.
//!
//! Chat messages routed to a subscription whose `aggregation` is a duration (`1h`, `6h`, `12h`,
//! `24h`, or any such as `10s`) are not delivered one by one: all messages of one chat for one
//! subscription within one window become one bundle, delivered as one webhook.
//!
//! - **Which window**: the message's own timestamp picks it ([`calendar::Windows`]: in UTC
//!   `start = floor(ts / size) * size`, `end = start + size`; with a subscription `timezone`,
//!   aligned to local midnight, so a day is 23 h or 25 h when the clocks change), so
//!   replaying the same input rebuilds the same bundles.
//! - **When it closes**: the wall clock ([`clock::Clock`]) closes it at `end + grace`, so a
//!   chat that goes quiet still flushes. A close timer asks [`store::WindowStore::due`],
//!   loads each bundle with [`store::WindowStore::begin_emit`], renders it ([`emit`]: in
//!   parts when it outgrows `chat.max_bundle_bytes`), produces the parts' delivery records
//!   in order and, once the broker has acknowledged all of them, calls
//!   [`store::WindowStore::remove`].
//! - **Late messages**: a message whose window was already emitted goes into the chat's next
//!   bundle, flagged late; it is never dropped.
//!
//! Offsets (DESIGN section 2). The consumer of `chat.messages` owns its offsets; this stage
//! tells it which one it may commit. Each poll batch is applied to sled in one atomic batch (one
//! segment per partition) together with the partitions' checkpoints (highest offset applied).
//! [`store::WindowStore::position`] is the low-watermark: the smallest first offset of any
//! bundle not yet removed, else one past the checkpoint. The consumer must flush sled before
//! it commits a position, or a crash could leave Kafka ahead of what sled kept. Before each
//! flush it also records the partition's settled position ([`store::WindowStore::set_settled`]:
//! every offset below it finished, pass-through acknowledged and bundle part applied). On
//! assignment it starts at that position when sled holds one and it is past the committed
//! offset (not at checkpoint + 1: pass-through of messages below the checkpoint may be
//! unacknowledged), else it replays from the committed offset; on revocation it calls
//! [`store::WindowStore::drop_partition`] and the new owner rebuilds those bundles by replay. A bundle whose emission had begun when
//! the process stopped is due again after a restart: a duplicate, never a loss.
//!
//! - [`calendar`]: window boundaries on a subscription's clock (length and time zone).
//! - [`clock`]: the wall clock, and a manual one for tests.
//! - [`emit`]: a closed bundle rendered as its parts, with content-derived `webhook-id`s.
//! - The Kafka side (routing chat messages, batched writes, emission, positions) is ingest's:
//!   [`crate::ingest::bundles`].
//! - [`store`]: the window store: segments in sled, an in-memory index of open bundles.

pub mod calendar;
pub mod clock;
pub mod emit;
pub mod store;
