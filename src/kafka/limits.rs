//! Size limits, and how they fit together (README "Limits", docs/DESIGN-NOTES.md):
//!
//! ```text
//! input record           ≤ ingest.max_record_bytes                      (larger: hookd.dlq)
//! its delivery record    ≤ delivery_record_bound(ingest.max_record_bytes)
//!                          = base64 of the body (4/3) + DELIVERY_ENVELOPE_BYTES
//!                        ≤ kafka.max_message_bytes   (the producer's message.max.bytes)
//! every record batch     ≤ kafka.max_message_bytes + RECORD_BATCH_HEADER_BYTES
//!                        ≤ max.message.bytes of the topics hookd writes
//! ```
//!
//! [`validate`] checks the first chain for `hookd check-config` and start-up. hookd creates
//! its topics with `max.message.bytes` = [`topic_limit_needed`]; for topics that exist,
//! [`check_topics`] reads their `max.message.bytes` at start-up and warns about each that is
//! smaller. What slips through anyway (a custom template that renders a body larger than its
//! input, a topic limit lowered later) is refused by Kafka as `too_large` and dead-lettered
//! ([`super::ProduceError`]), never retried forever.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;

use crate::config::Config;
use crate::telemetry::Metrics;

/// Room in a delivery record for everything but the base64 body: the JSON keys and numbers
/// (about 250 bytes), the `webhook-id` (36), the source topic (at most 249, Kafka's limit),
/// `last_error` (capped at [`crate::deliver::record::MAX_LAST_ERROR_BYTES`]), and the
/// subscription id (also the record key), tenant, event name, content type and dialect
/// headers, which are short in practice: together they have more than 14 KiB. librdkafka's
/// framing of one record ([`RECORD_OVERHEAD_BYTES`]) is included.
pub const DELIVERY_ENVELOPE_BYTES: usize = 16 * 1024;

/// librdkafka's upper bound on the framing of one record (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`:
/// length, attributes, timestamp and offset deltas, key and value lengths, header count),
/// which its local `message.max.bytes` check adds to key, value and headers.
pub const RECORD_OVERHEAD_BYTES: usize = 36;

/// The header of a v2 record batch, which the broker counts against `max.message.bytes`.
pub const RECORD_BATCH_HEADER_BYTES: usize = 61;

/// Room for a dead letter's headers (`hookd-dlq-reason`, capped at
/// [`super::dlq::MAX_REASON_BYTES`], stage, source topic, partition, offset, time,
/// subscription, truncated length) and its key.
pub const DLQ_HEADERS_BYTES: usize = 4 * 1024;

// A dead letter of an accepted input record (the record plus headers) then always fits
// where its delivery record does.
const _: () = assert!(DLQ_HEADERS_BYTES <= DELIVERY_ENVELOPE_BYTES);

/// librdkafka's range for `message.max.bytes`.
pub const MESSAGE_MAX_BYTES_RANGE: std::ops::RangeInclusive<usize> = 1000..=1_000_000_000;

/// Length of `n` bytes in padded base64.
pub const fn base64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// Upper bound of the delivery record of a rendered body of `body_bytes`, as librdkafka
/// measures it against `message.max.bytes`.
pub const fn delivery_record_bound(body_bytes: usize) -> usize {
    base64_len(body_bytes) + DELIVERY_ENVELOPE_BYTES
}

/// The largest body whose delivery record fits `max_message_bytes`.
pub const fn largest_body(max_message_bytes: usize) -> usize {
    max_message_bytes.saturating_sub(DELIVERY_ENVELOPE_BYTES) / 4 * 3
}

/// The `max.message.bytes` a topic needs so that the broker takes every record the producer
/// takes: set on the topics hookd creates, checked on the others.
pub const fn topic_limit_needed(max_message_bytes: usize) -> usize {
    max_message_bytes + RECORD_BATCH_HEADER_BYTES
}

/// Checks that the configured limits fit together; the message names both keys and the
/// value each would need.
///
/// The bound assumes a rendered body no larger than its input record, which holds for the
/// JSON dialects (they re-serialise parts of the input); XML escaping and custom templates
/// can exceed it, and such records are refused at run time as `too_large` instead.
pub fn validate(config: &Config) -> Result<(), String> {
    let max = config.kafka.max_message_bytes;
    if !MESSAGE_MAX_BYTES_RANGE.contains(&max) {
        return Err(format!(
            "kafka.max_message_bytes = {max} is outside librdkafka's range for message.max.bytes ({} to {})",
            MESSAGE_MAX_BYTES_RANGE.start(),
            MESSAGE_MAX_BYTES_RANGE.end()
        ));
    }
    if config.kafka.librdkafka.contains_key("message.max.bytes") {
        return Err("kafka.librdkafka sets `message.max.bytes`: set kafka.max_message_bytes instead \
                    (hookd sizes its records and the topics it creates from it)"
            .into());
    }
    let input = config.ingest.max_record_bytes;
    let needed = delivery_record_bound(input);
    if needed > max {
        return Err(format!(
            "ingest.max_record_bytes = {input} allows delivery records of up to {needed} bytes (the body in base64, 4/3 of it, \
             plus {DELIVERY_ENVELOPE_BYTES} bytes of envelope), more than kafka.max_message_bytes = {max}: raise \
             kafka.max_message_bytes to at least {needed} or lower ingest.max_record_bytes to at most {}",
            largest_body(max)
        ));
    }
    let part = config.chat.max_bundle_bytes;
    let needed = delivery_record_bound(part);
    if needed > max {
        return Err(format!(
            "chat.max_bundle_bytes = {part} allows bundle delivery records of up to {needed} bytes, more than \
             kafka.max_message_bytes = {max}: raise kafka.max_message_bytes to at least {needed} or lower \
             chat.max_bundle_bytes to at most {}",
            largest_body(max)
        ));
    }
    Ok(())
}

/// One line for `hookd check-config`: the chain of limits as configured.
pub fn summary(config: &Config) -> String {
    let max = config.kafka.max_message_bytes;
    format!(
        "limits: input records up to {} bytes (ingest.max_record_bytes), delivery records up to {} bytes, \
         producer limit {max} (kafka.max_message_bytes); topics hookd writes need max.message.bytes >= {}",
        config.ingest.max_record_bytes,
        delivery_record_bound(config.ingest.max_record_bytes),
        topic_limit_needed(max)
    )
}

/// Reads `max.message.bytes` of the topics hookd writes and warns about each one below
/// [`topic_limit_needed`]: records between the two are refused by the broker and
/// dead-lettered as `too_large`. Sets `hookd_topics_below_limit`. Returns the smallest such
/// limit, for the producer's `batch.size`, so that a batch of small records never exceeds
/// it and only a record that is itself too large is refused. Uses the asynchronous admin
/// API (librdkafka's thread answers); a broker that cannot describe configs is not checked.
pub async fn check_topics(config: &Config, metrics: &Metrics) -> Option<usize> {
    let limits = match topic_limits(config).await {
        Ok(l) => l,
        Err(error) => {
            tracing::warn!(%error, "Could not read the topics' max.message.bytes; topic limits not checked.");
            return None;
        }
    };
    let needed = topic_limit_needed(config.kafka.max_message_bytes);
    let short: Vec<(String, usize)> = limits.into_iter().filter(|(_, limit)| *limit < needed).collect();
    for (topic, limit) in &short {
        tracing::warn!(
            topic,
            max_message_bytes = limit,
            needed,
            kafka_max_message_bytes = config.kafka.max_message_bytes,
            "The topic's max.message.bytes is below what hookd may write: larger records will be dead-lettered as too_large. \
             Raise the topic's max.message.bytes or lower kafka.max_message_bytes (and ingest.max_record_bytes)."
        );
    }
    metrics.topics_below_limit.set(short.len() as i64);
    short.iter().map(|(_, limit)| *limit).min()
}

/// (topic, max.message.bytes) of each topic hookd writes that the broker described.
///
/// Asked of one broker by id rather than of the controller (librdkafka's default target):
/// any broker answers for topic configs, and one that cannot describe configs at all (the
/// mock cluster, which names no controller either) says so at once instead of letting the
/// request wait for a controller until it times out.
async fn topic_limits(config: &Config) -> Result<Vec<(String, usize)>, KafkaError> {
    let admin: std::sync::Arc<AdminClient<DefaultClientContext>> = std::sync::Arc::new(super::client_config(config).create()?);
    let t = &config.topics;
    let (a, probe) = (admin.clone(), t.deliveries.clone());
    let broker = tokio::task::spawn_blocking(move || a.inner().fetch_metadata(Some(&probe), Duration::from_secs(10)))
        .await
        .map_err(|_| KafkaError::Canceled)??
        .brokers()
        .first()
        .map(|b| b.id());
    let specs: Vec<ResourceSpecifier<'_>> =
        [&t.deliveries, &t.retry, &t.dlq, &t.notifications, &t.subscriptions].iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10))).broker_id(broker);
    let mut out = Vec::new();
    for result in admin.describe_configs(&specs, &opts).await? {
        match result {
            Ok(resource) => {
                let limit = resource.get("max.message.bytes").and_then(|e| e.value.as_deref()).and_then(|v| v.parse().ok());
                let OwnedResourceSpecifier::Topic(topic) = resource.specifier else { continue };
                match limit {
                    Some(limit) => out.push((topic, limit)),
                    None => tracing::warn!(topic, "The topic's max.message.bytes is not readable; not checked."),
                }
            }
            Err(code) => tracing::warn!(error = %code, "A topic's configuration is not readable; its max.message.bytes is not checked."),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_covers_base64_and_its_inverse_fits() {
        assert_eq!(base64_len(0), 0);
        assert_eq!(base64_len(1), 4);
        assert_eq!(base64_len(3), 4);
        assert_eq!(base64_len(1 << 20), 1_398_104);
        for max in [20_000, 100_000, 1_000_000, 2 << 20, 1_000_000_000] {
            let body = largest_body(max);
            assert!(delivery_record_bound(body) <= max, "{max}");
            assert!(delivery_record_bound(body + 3) > max, "{max}: largest_body is the largest");
        }
        // A real delivery record stays under the bound (JSON envelope and all).
        let record = crate::deliver::record::DeliveryRecord {
            id: crate::deliver::record::webhook_id("sub", "evt"),
            subscription_id: "sub".into(),
            tenant: "tenant".into(),
            event_name: "contact.created".into(),
            attempt: 12,
            not_before_ms: i64::MAX,
            created_ms: i64::MAX,
            content_type: "application/json".into(),
            body: vec![b'x'; 100_000],
            headers: vec![("Tc-Webhook-Event".into(), "order.add".into())],
            last_error: Some("e".repeat(crate::deliver::record::MAX_LAST_ERROR_BYTES)),
            source: crate::kafka::SourceRef { topic: "t".repeat(249), partition: i32::MAX, offset: i64::MAX },
        };
        let wire = record.encode().len() + "sub".len() + RECORD_OVERHEAD_BYTES;
        assert!(wire <= delivery_record_bound(100_000), "{wire}");
    }

    #[test]
    fn defaults_fit_together() {
        let c = Config::default();
        validate(&c).unwrap();
        assert!(delivery_record_bound(c.ingest.max_record_bytes) <= c.kafka.max_message_bytes);
        // Apache Kafka's broker default (1048588) is too small for the default producer limit:
        // hookd sets max.message.bytes on the topics it creates.
        assert!(topic_limit_needed(c.kafka.max_message_bytes) > 1_048_588);
        assert!(summary(&c).contains("2097213"), "{}", summary(&c));
    }

    #[test]
    fn incoherent_limits_name_both_keys_and_the_way_out() {
        let mut c = Config::default();
        c.ingest.max_record_bytes = 2 << 20;
        let err = validate(&c).unwrap_err();
        assert!(err.contains("ingest.max_record_bytes = 2097152") && err.contains("kafka.max_message_bytes = 2097152"), "{err}");
        assert!(err.contains(&format!("at least {}", delivery_record_bound(2 << 20))), "{err}");
        assert!(err.contains(&format!("at most {}", largest_body(2 << 20))), "{err}");
        c.ingest.max_record_bytes = largest_body(c.kafka.max_message_bytes);
        validate(&c).unwrap();

        let mut c = Config::default();
        c.kafka.max_message_bytes = 999;
        assert!(validate(&c).unwrap_err().contains("kafka.max_message_bytes = 999"));
        let mut c = Config::default();
        c.kafka.librdkafka.insert("message.max.bytes".into(), "5000000".into());
        assert!(validate(&c).unwrap_err().contains("kafka.max_message_bytes instead"));
    }
}
