//! A closed bundle's emission: its parts' delivery records produced in order, each
//! acknowledged before the next, and dead letters for what cannot be rendered or what Kafka
//! refuses for good, so that nothing holds a chat partition's offsets forever.

use tokio_util::sync::CancellationToken;

use crate::deliver::record::DeliveryRecord;
use crate::kafka::{dead_letter, produce_until_acked, DeadLetter, ProduceError, SourceRef};
use crate::window::emit::EmitError;
use crate::window::store::BundleKey;
use crate::Shared;

/// A closed bundle: the delivery records of its parts, in order, and dead letters for what
/// cannot be rendered, so that nothing holds the partition's offsets forever.
pub struct Emission {
    pub key: BundleKey,
    /// Partition of the bundle's first message, whose position the bundle holds.
    pub partition: i32,
    pub sub_id: String,
    /// What to produce, in time order; the bundle is emitted when all are acknowledged.
    pub outputs: Vec<Output>,
}

/// One record of an emission.
pub enum Output {
    /// An encoded delivery record for `hookd.deliveries`.
    Record(Vec<u8>),
    /// For `hookd.dlq`: the whole bundle (its messages as a JSON array) when it cannot be
    /// rendered, or one message that does not fit in a part of its own.
    Letter { reason: EmitError, original: Vec<u8>, source: SourceRef },
}

impl Emission {
    /// Produces the outputs one after the other, each acknowledged before the next, so the
    /// parts are on `hookd.deliveries` in order. An error (shutdown) leaves the bundle stored:
    /// it is emitted again, all parts under the same ids.
    pub async fn send(&self, shared: &Shared, stop: &CancellationToken) -> Result<(), ProduceError> {
        let key = Some(self.sub_id.as_bytes());
        for output in &self.outputs {
            match output {
                Output::Record(record) => self.send_part(shared, record, stop).await?,
                Output::Letter { reason, original, source } => {
                    let (reason, source, subscription_id) = (reason.to_string(), source.clone(), Some(self.sub_id.as_str()));
                    let letter = DeadLetter { original, key, reason, stage: "render", source, subscription_id };
                    dead_letter(&shared.producer, &shared.config, &shared.metrics, letter, stop).await?;
                }
            }
        }
        if self.outputs.iter().filter(|o| matches!(o, Output::Record(_))).count() > 1 {
            shared.metrics.bundles_split.inc();
        }
        Ok(())
    }

    /// Produces one part. A part Kafka refuses for good (too large for the topic's
    /// `max.message.bytes`, say) has its body dead-lettered (stage `produce`, the source of its
    /// first message) and the bundle goes on: nothing holds the partition's offsets forever.
    async fn send_part(&self, shared: &Shared, record: &[u8], stop: &CancellationToken) -> Result<(), ProduceError> {
        let (key, topic) = (Some(self.sub_id.as_bytes()), &shared.config.topics.deliveries);
        let refused = match produce_until_acked(&shared.producer, &shared.metrics, topic, key, record, None, stop).await {
            Ok(()) => {
                shared.metrics.deliveries_produced.with_label_values(&["chat"]).inc();
                return Ok(());
            }
            Err(ProduceError::Canceled) => return Err(ProduceError::Canceled),
            Err(refused) => refused,
        };
        let decoded = DeliveryRecord::decode(record).ok();
        let source = decoded.as_ref().map(|r| r.source.clone()).unwrap_or(SourceRef {
            topic: shared.config.topics.chat_messages.clone(),
            partition: self.partition,
            offset: -1,
        });
        let body = decoded.map(|r| r.body).unwrap_or_else(|| record.to_vec());
        let letter = DeadLetter {
            original: &body,
            key,
            reason: refused.dlq_reason("bundle delivery record", &self.sub_id, shared.config.kafka.max_message_bytes),
            stage: "produce",
            source,
            subscription_id: Some(&self.sub_id),
        };
        dead_letter(&shared.producer, &shared.config, &shared.metrics, letter, stop).await
    }
}
