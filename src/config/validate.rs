//! [`Config::validate`]: the cross-field checks serde cannot do, run when a file is loaded or
//! parsed (and by `start`, which needs the compiled dialects); each error names the key.

use std::collections::HashSet;

use super::{Config, ConfigError, MIN_BUNDLE_BYTES};
use crate::render::Dialects;

impl Config {
    /// Cross-field checks; returns the dialects it compiled on the way.
    pub fn validate(&self) -> Result<Dialects, ConfigError> {
        self.check_clients().map_err(ConfigError::Invalid)?;
        self.check_delivery().map_err(ConfigError::Invalid)?;
        let dialects = Dialects::new(&self.dialect).map_err(|e| ConfigError::Invalid(format!("dialect: {e}")))?;
        self.check_chat().map_err(ConfigError::Invalid)?;
        self.check_subscriptions(&dialects).map_err(ConfigError::Invalid)?;
        Ok(dialects)
    }

    /// Kafka, admin, size limits, the portal and the SMTP relay.
    fn check_clients(&self) -> Result<(), String> {
        if self.kafka.brokers.trim().is_empty() {
            return Err("kafka.brokers must not be empty".into());
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err("kafka.group_id must not be empty".into());
        }
        if self.kafka.max_poll_interval_ms < self.kafka.session_timeout_ms {
            return Err("kafka.max_poll_interval_ms must be at least kafka.session_timeout_ms".into());
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return Err("kafka.partitions and kafka.replication_factor must be at least 1".into());
        }
        if !["none", "lz4", "zstd", "snappy", "gzip"].contains(&self.kafka.compression.as_str()) {
            return Err(format!("kafka.compression `{}` is not one of none, lz4, zstd, snappy, gzip", self.kafka.compression));
        }
        self.check_instance_id()?;
        if self.admin.token.is_empty() {
            return Err("admin.token must not be empty".into());
        }
        if self.admin.produce_timeout_ms == 0 || self.admin.produce_timeout_ms > i32::MAX as u64 {
            // 0 would be librdkafka's "no timeout": the admin API would hang again.
            return Err("admin.produce_timeout_ms must be between 1 and 2147483647".into());
        }
        crate::kafka::limits::validate(self)?;
        self.portal.validate()?;
        if let Some(smtp) = &self.notify.smtp {
            smtp.validate()?;
        }
        Ok(())
    }

    /// `kafka.instance_id` is a legal `group.instance.id` (Kafka's rule: at most 249 of
    /// `[A-Za-z0-9._-]`) and not also set as a librdkafka property.
    fn check_instance_id(&self) -> Result<(), String> {
        let Some(id) = &self.kafka.instance_id else { return Ok(()) };
        if id.is_empty() || id.len() > 249 || !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(format!("kafka.instance_id `{id}` must be 1 to 249 characters of A-Z, a-z, 0-9, `.`, `_` and `-`"));
        }
        if self.kafka.librdkafka.contains_key("group.instance.id") {
            return Err("kafka.instance_id and kafka.librdkafka.\"group.instance.id\" are both set; keep kafka.instance_id".into());
        }
        Ok(())
    }

    /// Delivery targets and bounds, ingest bounds, the shutdown deadline.
    fn check_delivery(&self) -> Result<(), String> {
        crate::deliver::ssrf::TargetPolicy::new(&self.delivery.allow_private_targets)
            .map_err(|e| format!("delivery.allow_private_targets: {e}"))?;
        let d = &self.delivery;
        if d.max_in_flight == 0
            || d.per_subscription_concurrency == 0
            || d.per_subscription_queue == 0
            || d.per_subscription_rate_per_sec == 0
        {
            return Err(
                "delivery.max_in_flight, per_subscription_concurrency, per_subscription_queue and per_subscription_rate_per_sec must be at least 1".into());
        }
        if d.log_body_max_bytes == 0 {
            return Err("delivery.log_body_max_bytes must be at least 1".into());
        }
        if self.ingest.max_in_flight == 0 || self.ingest.max_record_bytes == 0 {
            return Err("ingest.max_in_flight and ingest.max_record_bytes must be at least 1".into());
        }
        if self.shutdown.deadline_ms < self.shutdown.grace_ms.saturating_add(15_000) {
            return Err("shutdown.deadline_ms must be at least shutdown.grace_ms + 15000 (time for the final commits and closes)".into());
        }
        Ok(())
    }

    fn check_chat(&self) -> Result<(), String> {
        if self.chat.max_batch == 0 || self.chat.close_interval_ms == 0 || self.chat.batch_interval_ms == 0 {
            return Err("chat.max_batch, close_interval_ms and batch_interval_ms must be at least 1".into());
        }
        if self.chat.max_bundle_bytes < MIN_BUNDLE_BYTES {
            return Err(format!(
                "chat.max_bundle_bytes must be at least {MIN_BUNDLE_BYTES} (a bundle's account, chat and link take about 1 KiB)"
            ));
        }
        let template = (!self.chat.summary_template.is_empty()).then_some(self.chat.summary_template.as_str());
        crate::render::timelines::Summary::new(template).map_err(|e| format!("chat.summary_template: {e}"))?;
        Ok(())
    }

    fn check_subscriptions(&self, dialects: &Dialects) -> Result<(), String> {
        let mut seen = HashSet::new();
        for s in &self.subscription {
            s.validate()?;
            dialects.check(&s.dialect, s.format).map_err(|e| format!("subscription `{}`: {e}", s.id))?;
            if !seen.insert(s.id.as_str()) {
                return Err(format!("subscription id `{}` appears twice", s.id));
            }
        }
        Ok(())
    }
}
