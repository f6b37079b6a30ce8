//! Internal events (vector's shape): each failing or notable path of the daemon is one type
//! here whose [`Event::emit`] writes its log line and moves its counter together, so no path
//! logs without counting or counts without logging. Callers build the event where it happens
//! and hand it to [`Metrics::emit`].

use super::Metrics;

/// Something that happened, logged and counted in one step.
pub trait Event {
    fn emit(self, metrics: &Metrics);
}

impl Metrics {
    /// Logs and counts `event`.
    pub fn emit(&self, event: impl Event) {
        event.emit(self)
    }
}

/// A store of the state layer ([`crate::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Open bundles (`window::store`).
    Windows,
    /// Parked retries (`deliver::park`).
    Retry,
    /// Endpoint state and logs (`endpoint`).
    Endpoints,
}

impl Store {
    pub const ALL: [Store; 3] = [Store::Windows, Store::Retry, Store::Endpoints];

    pub fn label(self) -> &'static str {
        match self {
            Store::Windows => "windows",
            Store::Retry => "retry",
            Store::Endpoints => "endpoints",
        }
    }
}

/// What a failed state operation was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateOp {
    /// Writing a batch of records' data (bundle parts, parked retries).
    Write,
    /// Reading (due windows or retries, a bundle, a low-watermark).
    Read,
    /// Writing to disk before a position is stored.
    Flush,
    /// Recording a settled position.
    Settle,
    /// Removing finished work (an emitted bundle, a sent retry, a replayed delivery).
    Remove,
    /// Moving parked work to a later time.
    Reschedule,
    /// Forgetting a revoked partition.
    Drop,
}

impl StateOp {
    pub const ALL: [StateOp; 7] =
        [StateOp::Write, StateOp::Read, StateOp::Flush, StateOp::Settle, StateOp::Remove, StateOp::Reschedule, StateOp::Drop];

    pub fn label(self) -> &'static str {
        match self {
            StateOp::Write => "write",
            StateOp::Read => "read",
            StateOp::Flush => "flush",
            StateOp::Settle => "settle",
            StateOp::Remove => "remove",
            StateOp::Reschedule => "reschedule",
            StateOp::Drop => "drop",
        }
    }
}

/// A sled operation failed. The stage carries on; `then` says what becomes of the work it
/// guarded (nothing is lost: what was not recorded is read or done again). Counted in
/// `hookd_state_errors_total{store, op}`, logged at error level.
pub struct StateError<'a> {
    pub store: Store,
    pub op: StateOp,
    pub error: &'a sled::Error,
    pub partition: Option<i32>,
    /// The log line: what failed and what happens next.
    pub then: &'static str,
}

impl Event for StateError<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.state_errors.with_label_values(&[self.store.label(), self.op.label()]).inc();
        let (store, op, error) = (self.store.label(), self.op.label(), self.error);
        match self.partition {
            Some(partition) => tracing::error!(store, op, partition, %error, "{}", self.then),
            None => tracing::error!(store, op, %error, "{}", self.then),
        }
    }
}

/// A produce attempt failed: for good (`reason` names why) or transiently (retried).
pub struct ProduceFailed<'a> {
    pub topic: &'a str,
    pub bytes: usize,
    pub error: &'a rdkafka::error::KafkaError,
    /// `None`: transient, retried after a backoff.
    pub permanent: Option<crate::kafka::PermanentReason>,
}

impl Event for ProduceFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        let (topic, bytes, error) = (self.topic, self.bytes, self.error);
        match self.permanent {
            Some(reason) => {
                metrics.produce_errors.with_label_values(&[reason.as_str()]).inc();
                tracing::warn!(%error, topic, bytes, reason = reason.as_str(), "Kafka refused the record for good.");
            }
            None => {
                metrics.produce_errors.with_label_values(&["transient"]).inc();
                tracing::warn!(%error, topic, bytes, "Produce failed; retrying.");
            }
        }
    }
}

/// A delivery went to `hookd.retry` instead of being sent now (`reason`: its subscription is
/// disabled, unverified or busy). Frequent under load, so logged at debug level.
pub struct Deferred<'a> {
    pub subscription: &'a str,
    pub reason: &'static str,
    pub due_ms: i64,
}

impl Event for Deferred<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.deliveries_deferred.with_label_values(&[self.reason]).inc();
        tracing::debug!(
            subscription = self.subscription,
            reason = self.reason,
            due_ms = self.due_ms,
            "Delivery deferred to the retry topic."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_error_is_counted_by_store_and_op() {
        let m = Metrics::new();
        let error = sled::Error::Unsupported("test".into());
        m.emit(StateError { store: Store::Windows, op: StateOp::Flush, error: &error, partition: None, then: "positions not stored" });
        m.emit(StateError { store: Store::Windows, op: StateOp::Flush, error: &error, partition: Some(2), then: "positions not stored" });
        assert_eq!(m.state_errors.with_label_values(&["windows", "flush"]).get(), 2);
        assert_eq!(m.state_errors.with_label_values(&["retry", "flush"]).get(), 0);
        assert!(m.render().contains(r#"hookd_state_errors_total{op="flush",store="windows"} 2"#));
    }

    #[test]
    fn produce_failures_are_counted_by_reason() {
        let m = Metrics::new();
        let error = rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge);
        m.emit(ProduceFailed { topic: "t", bytes: 9, error: &error, permanent: None });
        m.emit(ProduceFailed { topic: "t", bytes: 9, error: &error, permanent: crate::kafka::PermanentReason::of(&error) });
        assert_eq!(m.produce_errors.with_label_values(&["transient"]).get(), 1);
        assert_eq!(m.produce_errors.with_label_values(&["too_large"]).get(), 1);
    }
}
