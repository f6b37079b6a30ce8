//! Records the endpoint lifecycle and the admin API write to Kafka: changed subscriptions on
//! `hookd.subscriptions`, notices on `hookd.notifications`, replayed deliveries on
//! `hookd.deliveries`.
//!
//! Two ways, by who waits ([`Via`]). The sender retries until the broker acknowledges, as for
//! every record its offsets wait for (DESIGN section 2). An admin call makes one bounded attempt
//! on the admin producer, whose `message.timeout.ms` is `admin.produce_timeout_ms`: when Kafka
//! does not acknowledge in time the call answers 503 instead of hanging, and librdkafka gives
//! the record up instead of writing it later, after the caller was told it failed (only a
//! record already sent to a broker that answers too late may still be written).

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::kafka::ProduceError;
use crate::Shared;

/// librdkafka looks for timed-out messages about once a second; the bounded attempt waits
/// this much longer than the timeout before it stops waiting for librdkafka's own answer.
const SCAN_MARGIN: Duration = Duration::from_secs(2);

/// How a record is written, by who waits for it.
#[derive(Debug, Clone, Copy)]
pub enum Via<'a> {
    /// The sender: retried on the main producer until acknowledged, or until `stop` fires.
    UntilAcked(&'a CancellationToken),
    /// The admin API: one attempt on the admin producer, bounded by `admin.produce_timeout_ms`.
    Admin,
}

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker did not acknowledge in time (down, unreachable, leaderless): try again later.
    #[error("Kafka did not acknowledge the record for `{topic}` within {timeout_ms} ms ({detail})")]
    Unavailable { topic: String, timeout_ms: u64, detail: String },
    /// The broker or librdkafka refused the record; trying again will not help.
    #[error("Kafka refused the record for `{topic}`: {source}")]
    Refused { topic: String, source: KafkaError },
    /// hookd is stopping; the sender redoes the work after restart.
    #[error("stopping before the record for `{topic}` was acknowledged")]
    Stopped { topic: String },
}

impl PublishError {
    /// Whether trying again later may succeed (the admin API answers 503 for these).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Stopped { .. })
    }
}

/// The admin API's producer: idempotent, no batching delay, and `message.timeout.ms` =
/// `admin.produce_timeout_ms` (set after the operator's `kafka.librdkafka` properties, which
/// otherwise win as for every client).
pub fn admin_producer(config: &Config) -> Result<FutureProducer, KafkaError> {
    let mut c = crate::kafka::client_config(config);
    c.set("enable.idempotence", "true").set("linger.ms", "0");
    for (k, v) in &config.kafka.librdkafka {
        c.set(k, v);
    }
    c.set("message.timeout.ms", config.admin.produce_timeout_ms.to_string());
    c.create()
}

/// Writes one record keyed by `key`, the way `via` says. A failure is counted here
/// (`hookd_publish_failures_total{via}`) and logged by the caller, who knows what it was for.
pub async fn publish(shared: &Shared, via: Via<'_>, topic: &str, key: &str, value: &[u8]) -> Result<(), PublishError> {
    let result = write(shared, via, topic, key, value).await;
    if result.is_err() {
        let label = if matches!(via, Via::Admin) { "admin" } else { "sender" };
        shared.metrics.publish_failures.with_label_values(&[label]).inc();
    }
    result
}

async fn write(shared: &Shared, via: Via<'_>, topic: &str, key: &str, value: &[u8]) -> Result<(), PublishError> {
    match via {
        Via::UntilAcked(stop) => {
            match crate::kafka::produce_until_acked(&shared.producer, &shared.metrics, topic, Some(key.as_bytes()), value, None, stop).await
            {
                Ok(()) => Ok(()),
                Err(ProduceError::Canceled) => Err(PublishError::Stopped { topic: topic.to_string() }),
                Err(ProduceError::Permanent { error, .. }) => Err(PublishError::Refused { topic: topic.to_string(), source: error }),
            }
        }
        Via::Admin => bounded(&shared.admin_producer, shared.config.admin.produce_timeout_ms, topic, key, value).await,
    }
}

/// One attempt, acknowledged within `timeout_ms` or given up.
async fn bounded(producer: &FutureProducer, timeout_ms: u64, topic: &str, key: &str, value: &[u8]) -> Result<(), PublishError> {
    let timeout = Duration::from_millis(timeout_ms);
    let unavailable = |detail: String| PublishError::Unavailable { topic: topic.to_string(), timeout_ms, detail };
    let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key).payload(value);
    match tokio::time::timeout(timeout + SCAN_MARGIN, producer.send(record, timeout)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) if transient(&error) => Err(unavailable(error.to_string())),
        Ok(Err((source, _))) => Err(PublishError::Refused { topic: topic.to_string(), source }),
        Err(_) => Err(unavailable("no answer from librdkafka".into())),
    }
}

/// Errors that mean "not now": librdkafka retries the others' transient causes itself until
/// the message times out, so what comes back is a timeout, a full queue or no broker.
fn transient(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(MessageTimedOut | QueueFull | OperationTimedOut | RequestTimedOut | AllBrokersDown | BrokerTransportFailure)
    )
}
