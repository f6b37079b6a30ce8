//! Dead letters: what hookd cannot process, or what Kafka would not take, written to
//! `hookd.dlq` with the original bytes as the value (so it can be produced again as it is)
//! and why, where and when in headers.
//!
//! A dead letter is never dropped and never blocks its partition: one too large for the
//! dead-letter topic is written truncated, its first bytes only, marked
//! `hookd-dlq-truncated: <original length>` (and counted in `hookd_dlq_truncated_total`).
//! Other refusals of the dead-letter topic itself (unknown, not writable) leave nowhere else
//! to put the record: they are logged and retried until the topic is fixed or shutdown, so
//! the source offset stays unfinished and nothing is lost.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use super::limits::DLQ_HEADERS_BYTES;
use super::produce::{produce_until_acked, PermanentReason, ProduceError};
use super::SourceRef;
use crate::config::Config;
use crate::telemetry::Metrics;

/// The `hookd-dlq-reason` header is cut to this many bytes, so the headers have a bound.
pub const MAX_REASON_BYTES: usize = 2048;

/// A record for `hookd.dlq`: the original bytes as the value (so it can be re-produced as it
/// is) and why, where and when in headers.
pub struct DeadLetter<'a> {
    pub original: &'a [u8],
    pub key: Option<&'a [u8]>,
    pub reason: String,
    pub stage: &'static str,
    pub source: SourceRef,
    pub subscription_id: Option<&'a str>,
}

impl DeadLetter<'_> {
    pub fn headers(&self) -> OwnedHeaders {
        self.headers_marked(None)
    }

    /// The headers; `truncated_from` marks a copy cut short from that many bytes.
    fn headers_marked(&self, truncated_from: Option<usize>) -> OwnedHeaders {
        let partition = self.source.partition.to_string();
        let offset = self.source.offset.to_string();
        let at = chrono::Utc::now().to_rfc3339();
        let mut h = OwnedHeaders::new()
            .insert(Header { key: "hookd-dlq-reason", value: Some(prefix(&self.reason, MAX_REASON_BYTES)) })
            .insert(Header { key: "hookd-dlq-stage", value: Some(self.stage) })
            .insert(Header { key: "hookd-dlq-topic", value: Some(self.source.topic.as_str()) })
            .insert(Header { key: "hookd-dlq-partition", value: Some(partition.as_str()) })
            .insert(Header { key: "hookd-dlq-offset", value: Some(offset.as_str()) })
            .insert(Header { key: "hookd-dlq-at", value: Some(at.as_str()) });
        if let Some(sub) = self.subscription_id {
            h = h.insert(Header { key: "hookd-dlq-subscription", value: Some(sub) });
        }
        if let Some(n) = truncated_from {
            h = h.insert(Header { key: "hookd-dlq-truncated", value: Some(n.to_string().as_str()) });
        }
        h
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn prefix(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Writes one dead letter, acknowledged, and counts it; truncated when the dead-letter topic
/// refuses it as too large. Fails only with [`ProduceError::Canceled`].
pub async fn dead_letter(
    producer: &FutureProducer,
    config: &Config,
    metrics: &Metrics,
    letter: DeadLetter<'_>,
    shutdown: &CancellationToken,
) -> Result<(), ProduceError> {
    tracing::warn!(
        reason = %letter.reason, stage = letter.stage, topic = %letter.source.topic,
        partition = letter.source.partition, offset = letter.source.offset, "Record sent to the dead-letter topic."
    );
    let kept = write(producer, config, metrics, &letter, shutdown).await?;
    if kept < letter.original.len() {
        metrics.dlq_truncated.inc();
        tracing::warn!(
            original_bytes = letter.original.len(), kept_bytes = kept, stage = letter.stage, topic = %letter.source.topic,
            partition = letter.source.partition, offset = letter.source.offset,
            "Dead letter too large for the dead-letter topic; wrote its first bytes, marked hookd-dlq-truncated."
        );
    }
    metrics.dlq_records.with_label_values(&[letter.stage]).inc();
    Ok(())
}

/// Produces the letter, shorter each time the topic refuses it as too large; returns how
/// many bytes of the original went out.
async fn write(
    producer: &FutureProducer,
    config: &Config,
    metrics: &Metrics,
    letter: &DeadLetter<'_>,
    shutdown: &CancellationToken,
) -> Result<usize, ProduceError> {
    let topic = &config.topics.dlq;
    let whole = letter.original.len();
    let mut keep = whole;
    let mut backoff = Duration::from_secs(1);
    loop {
        let headers = letter.headers_marked((keep < whole).then_some(whole));
        match produce_until_acked(producer, metrics, topic, letter.key, &letter.original[..keep], Some(headers), shutdown).await {
            Ok(()) => return Ok(keep),
            Err(ProduceError::Permanent { reason: PermanentReason::TooLarge, .. }) if keep > 0 => keep = shorter(config, keep),
            Err(ProduceError::Canceled) => return Err(ProduceError::Canceled),
            Err(error) => {
                tracing::error!(%error, topic, "The dead-letter topic refuses the record; retrying until the topic is fixed.");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return Err(ProduceError::Canceled),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The next length to try after `keep` bytes were refused as too large: first what fits
/// `kafka.max_message_bytes` beside the headers, then half of it each time (a topic whose
/// `max.message.bytes` is smaller than the producer's limit), down to none at all.
fn shorter(config: &Config, keep: usize) -> usize {
    let fits = config.kafka.max_message_bytes.saturating_sub(DLQ_HEADERS_BYTES);
    if fits < keep {
        fits
    } else {
        keep / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn letter(reason: String) -> DeadLetter<'static> {
        DeadLetter {
            original: b"x",
            key: None,
            reason,
            stage: "ingest",
            source: SourceRef { topic: "crm.events".into(), partition: 1, offset: 7 },
            subscription_id: Some("s"),
        }
    }

    #[test]
    fn headers_are_bounded_and_a_truncated_copy_says_so() {
        let long = "é".repeat(MAX_REASON_BYTES); // two bytes each: the cut lands inside one
        let h = letter(long).headers_marked(Some(123));
        let get = |name: &str| h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| std::str::from_utf8(v).unwrap().to_owned());
        let reason = get("hookd-dlq-reason").unwrap();
        assert!(reason.len() <= MAX_REASON_BYTES && reason.len() >= MAX_REASON_BYTES - 1);
        assert_eq!(get("hookd-dlq-truncated").as_deref(), Some("123"));
        assert_eq!(get("hookd-dlq-subscription").as_deref(), Some("s"));
        let total: usize = h.iter().map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len) + 10).sum();
        assert!(total <= DLQ_HEADERS_BYTES, "{total}");
        assert!(letter("short".into()).headers().iter().all(|x| x.key != "hookd-dlq-truncated"));
    }

    #[test]
    fn truncation_first_fits_the_producer_limit_then_halves_to_nothing() {
        let mut c = Config::default();
        c.kafka.max_message_bytes = 100_000;
        let mut keep = shorter(&c, 5_000_000);
        assert_eq!(keep, 100_000 - DLQ_HEADERS_BYTES);
        let mut steps = 0;
        while keep > 0 {
            let next = shorter(&c, keep);
            assert!(next < keep);
            keep = next;
            steps += 1;
        }
        assert!(steps < 20, "{steps}");
    }
}
