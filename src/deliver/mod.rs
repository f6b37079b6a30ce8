//! Deliver: consume delivery records, send them, record the outcome.
//!
//! The sender reads `hookd.deliveries` (due now) and `hookd.retry` (due later) in the
//! consumer group `<group_id>.sender`. Both are keyed by subscription id, so one instance at
//! a time owns a subscription's sending state. Each record ends in exactly one of: a
//! successful request; a failed request with attempts left, re-produced to `hookd.retry`
//! with its next `not_before`; a failed request with none left, produced to `hookd.dlq`.
//! Its source offset is stored only after that outcome is acknowledged by the broker
//! (records of `hookd.retry` are parked in sled first, see [`park`]).
//!
//! No head-of-line blocking: every request runs in its own task, limited per subscription
//! (`per_subscription_concurrency`) and overall (`max_in_flight`); a subscription whose
//! queue is full has further records deferred to the retry store instead of waiting.

pub mod backoff;
mod dispatch;
pub mod http;
pub mod lifecycle;
pub mod park;
pub mod publish;
pub mod record;
mod schedule;
mod sender;
pub mod signature;
pub mod ssrf;

pub use sender::run;
