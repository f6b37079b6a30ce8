//! Producing records that must not be lost, and telling a refusal for good from a hiccup.
//!
//! [`produce_until_acked`] retries transient failures (a broker down or restarting, timeouts,
//! leader changes, a full local queue) until the broker acknowledges the record or shutdown.
//! A permanent refusal (the record is too large, invalid, its topic unknown or not writable)
//! returns [`ProduceError::Permanent`] at once: sending the same bytes again can never
//! succeed, so the caller dead-letters the source and finishes its offset instead of stopping
//! the partition for good.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;

/// Why Kafka refused a record for good. [`PermanentReason::as_str`] is stable: it starts the
/// dead-letter reason (`too_large: ...`) and labels `hookd_produce_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermanentReason {
    /// Over the producer's `message.max.bytes` (`kafka.max_message_bytes`, checked locally by
    /// librdkafka) or the topic's `max.message.bytes` (checked by the broker).
    TooLarge,
    /// The broker's record validation refused it (e.g. a record without a key for a compacted
    /// topic).
    InvalidRecord,
    /// The topic or partition does not exist, after librdkafka waited for it to appear
    /// (`topic.metadata.propagation.max.ms`).
    UnknownTopic,
    /// The credentials may not write the topic (ACLs).
    Unauthorized,
}

impl PermanentReason {
    pub const ALL: [PermanentReason; 4] = [Self::TooLarge, Self::InvalidRecord, Self::UnknownTopic, Self::Unauthorized];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::InvalidRecord => "invalid_record",
            Self::UnknownTopic => "unknown_topic",
            Self::Unauthorized => "unauthorized",
        }
    }

    /// The permanent reason behind a produce error, or None when trying again may succeed.
    ///
    /// Not permanent, though the names suggest it: `InvalidMessage` (a CRC mismatch on the
    /// way; librdkafka retries it itself), `InvalidDifferentRecord` (another record of the
    /// same batch was invalid; this one alone is fine), `InvalidTimestamp` (the clock of this
    /// host against the topic's window: every record would fail alike until it is fixed), and
    /// `MessageTimedOut` (no broker answered in `message.timeout.ms`).
    pub fn of(error: &KafkaError) -> Option<Self> {
        use RDKafkaErrorCode as C;
        let KafkaError::MessageProduction(code) = error else { return None };
        match code {
            C::MessageSizeTooLarge | C::MessageBatchTooLarge => Some(Self::TooLarge),
            C::InvalidRecord => Some(Self::InvalidRecord),
            C::UnknownTopic | C::UnknownPartition | C::UnknownTopicOrPartition => Some(Self::UnknownTopic),
            C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed => Some(Self::Unauthorized),
            _ => None,
        }
    }
}

impl std::fmt::Display for PermanentReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why [`produce_until_acked`] returned without an acknowledgement.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Kafka will never take this record: dead-letter its source and move on.
    #[error("{reason}: topic `{topic}` refused a record of {bytes} bytes: {error}")]
    Permanent { reason: PermanentReason, topic: String, bytes: usize, error: KafkaError },
    /// Shutdown came first; the caller leaves the source offset unstored, so the work is
    /// redone after restart.
    #[error("produce canceled by shutdown before the broker acknowledged")]
    Canceled,
}

impl ProduceError {
    /// Whether the work is to be done again (after restart) rather than dead-lettered.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Self::Canceled)
    }

    /// The dead-letter reason for `what` (e.g. "delivery record") of `subscription` that
    /// Kafka refused, starting with the stable reason: `too_large: delivery record of N bytes
    /// for subscription `s` exceeds ...`.
    pub fn dlq_reason(&self, what: &str, subscription: &str, max_message_bytes: usize) -> String {
        let Self::Permanent { reason, topic, bytes, error } = self else { return self.to_string() };
        let whose = format!("{what} of {bytes} bytes for subscription `{subscription}`");
        match reason {
            PermanentReason::TooLarge => format!(
                "too_large: {whose} exceeds the limit of topic `{topic}` (kafka.max_message_bytes = {max_message_bytes}, \
                 or the topic's max.message.bytes when smaller): {error}"
            ),
            other => format!("{other}: {whose} refused by topic `{topic}`: {error}"),
        }
    }
}

/// Produces until the broker acknowledges, backing off between transient failures (each
/// logged and counted as `hookd_produce_errors_total{reason="transient"}`). Returns
/// [`ProduceError::Permanent`] at the first refusal for good (counted under its reason), and
/// [`ProduceError::Canceled`] when `shutdown` fires first.
pub async fn produce_until_acked(
    producer: &FutureProducer,
    metrics: &Metrics,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    headers: Option<OwnedHeaders>,
    shutdown: &CancellationToken,
) -> Result<(), ProduceError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(h) = headers.clone() {
            record = record.headers(h);
        }
        let error = tokio::select! {
            r = producer.send(record, Duration::from_secs(5)) => match r {
                Ok(_) => return Ok(()),
                Err((e, _)) => e,
            },
            _ = shutdown.cancelled() => return Err(ProduceError::Canceled),
        };
        let permanent = PermanentReason::of(&error);
        metrics.emit(crate::telemetry::events::ProduceFailed { topic, bytes: payload.len(), error: &error, permanent });
        if let Some(reason) = permanent {
            return Err(ProduceError::Permanent { reason, topic: topic.to_string(), bytes: payload.len(), error });
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return Err(ProduceError::Canceled),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn refusals_for_good_are_told_from_transient_failures() {
        use RDKafkaErrorCode as C;
        let permanent = [
            (C::MessageSizeTooLarge, PermanentReason::TooLarge), // local check and broker alike
            (C::MessageBatchTooLarge, PermanentReason::TooLarge),
            (C::InvalidRecord, PermanentReason::InvalidRecord),
            (C::UnknownTopic, PermanentReason::UnknownTopic),
            (C::UnknownPartition, PermanentReason::UnknownTopic),
            (C::UnknownTopicOrPartition, PermanentReason::UnknownTopic),
            (C::TopicAuthorizationFailed, PermanentReason::Unauthorized),
            (C::ClusterAuthorizationFailed, PermanentReason::Unauthorized),
        ];
        for (code, want) in permanent {
            assert_eq!(PermanentReason::of(&production(code)), Some(want), "{code:?}");
        }
        let transient = [
            C::MessageTimedOut,
            C::QueueFull,
            C::BrokerTransportFailure,
            C::AllBrokersDown,
            C::RequestTimedOut,
            C::NotLeaderForPartition,
            C::LeaderNotAvailable,
            C::NotEnoughReplicas,
            C::InvalidMessage,
            C::InvalidDifferentRecord,
            C::InvalidTimestamp,
        ];
        for code in transient {
            assert_eq!(PermanentReason::of(&production(code)), None, "{code:?} is worth another try");
        }
        assert_eq!(PermanentReason::of(&KafkaError::Canceled), None);
        assert_eq!(PermanentReason::of(&KafkaError::MetadataFetch(C::MessageSizeTooLarge)), None, "not a produce error");
    }

    #[test]
    fn reasons_have_stable_names_that_start_the_dead_letter_reason() {
        let names: Vec<&str> = PermanentReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["too_large", "invalid_record", "unknown_topic", "unauthorized"]);
        let e = ProduceError::Permanent {
            reason: PermanentReason::TooLarge,
            topic: "hookd.deliveries".into(),
            bytes: 1_200_000,
            error: production(RDKafkaErrorCode::MessageSizeTooLarge),
        };
        let reason = e.dlq_reason("delivery record", "s1", 1_000_000);
        assert!(reason.starts_with("too_large: delivery record of 1200000 bytes for subscription `s1` exceeds"), "{reason}");
        assert!(reason.contains("kafka.max_message_bytes = 1000000") && reason.contains("hookd.deliveries"), "{reason}");
        assert!(!e.is_retriable() && ProduceError::Canceled.is_retriable());
        let e = ProduceError::Permanent {
            reason: PermanentReason::Unauthorized,
            topic: "hookd.retry".into(),
            bytes: 10,
            error: production(RDKafkaErrorCode::TopicAuthorizationFailed),
        };
        assert!(e.dlq_reason("retry record", "s2", 1).starts_with("unauthorized: retry record of 10 bytes for subscription `s2`"));
    }
}
