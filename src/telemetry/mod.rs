//! Metrics and the events that move them.
//!
//! One [`Metrics`] value owns a Prometheus registry and is handed to every stage (no global
//! statics, so tests can run several daemons in one process). Names follow DESIGN section 7:
//! `hookd_` prefix, `_total` counters, `_seconds` histograms, small fixed label sets (never a
//! tenant, subscription or URL as a label).
//!
//! Every labelled family starts with a series at 0 for each of its known label values
//! ([`Metrics::new`]), and the process collector adds `process_*` (memory, CPU, file
//! descriptors), so a first scrape shows every family README.md lists and `rate()` or an
//! alert on a counter sees it before its first increment.

pub mod events;

pub use events::{Event, StateError, StateOp, Store};

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Every metric hookd exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Input records read, by `source` (crm, chat).
    pub events_consumed: IntCounterVec,
    /// Delivery records produced to `hookd.deliveries`, by `source`.
    pub deliveries_produced: IntCounterVec,
    /// Input records that matched no subscription, by `source`.
    pub events_unmatched: IntCounterVec,
    /// Finished deliveries by `outcome`: success, retry (failed, will be sent again),
    /// exhausted (failed, no attempts left, sent to the DLQ), dropped (subscription gone),
    /// refused (its retry or deferral record refused by Kafka for good, sent to the DLQ).
    pub deliveries: IntCounterVec,
    /// Failed requests by error `kind` (status, timeout, connect, dns, blocked, ...).
    pub request_errors: IntCounterVec,
    /// HTTP request duration by `outcome` (success, failure).
    pub request_duration: HistogramVec,
    /// From the delivery's first attempt to its successful send, by `attempts` bucket (1, 2+).
    pub delivery_latency: HistogramVec,
    /// Deliveries waiting in the retry store (sled) for their time.
    pub retry_queue_depth: IntGauge,
    /// Deliveries deferred (parked) by `reason`: busy (subscription queue full), disabled,
    /// unverified. Parked deliveries are kept, not lost, and sent once the reason is gone.
    pub deliveries_deferred: IntCounterVec,
    /// Records written to `hookd.dlq`, by `stage` (ingest, render, produce, deliver, subscriptions).
    pub dlq_records: IntCounterVec,
    /// Dead letters too large for `hookd.dlq`, written truncated (`hookd-dlq-truncated`).
    pub dlq_truncated: IntCounter,
    /// Failed produce attempts by `reason`: transient (retried), or why Kafka refused the
    /// record for good (too_large, invalid_record, unknown_topic, unauthorized).
    pub produce_errors: IntCounterVec,
    /// Topics hookd writes whose `max.message.bytes` is below what it may produce (start-up check).
    pub topics_below_limit: IntGauge,
    /// Requests in flight now.
    pub requests_in_flight: IntGauge,
    /// Subscriptions known (config and topic).
    pub subscriptions: IntGauge,
    /// Times the state store was wiped because it could not be opened.
    pub state_wipes: IntCounter,
    /// Records not read again after an assignment, by `source` (chat, retry): sled already
    /// held them, so the partition resumed past its committed offset.
    pub resume_skipped: IntCounterVec,
    /// Partitions a rebalance assigned to this instance, by `stage` (ingest, sender). With
    /// the cooperative protocol only partitions that move count.
    pub partitions_assigned: IntCounterVec,
    /// Partitions a rebalance took from this instance, by `stage`.
    pub partitions_revoked: IntCounterVec,
    /// Records read again after an assignment, by `stage`: a newly assigned partition's
    /// records below the read head its previous owner committed ([`crate::kafka::rebalance`]).
    pub records_replayed: IntCounterVec,
    /// Records of revoked partitions still unfinished when the revocation's grace
    /// (`shutdown.grace_ms`) ran out, by `stage`: given up, their new owner does them again.
    pub revoke_abandoned: IntCounterVec,
    /// Chat messages not delivered because they carry attachments.
    pub chat_skipped: IntCounterVec,
    /// Chat messages that arrived after their window was emitted (put in the next bundle).
    pub chat_late: IntCounter,
    /// Chat messages written to a bundle in the window store (one per aggregating
    /// subscription the message matched).
    pub chat_bundled: IntCounter,
    /// Bundles open in the window store.
    pub open_bundles: IntGauge,
    /// Bundles emitted as delivery records.
    pub bundles_emitted: IntCounter,
    /// Bundles delivered in more than one part (over `chat.max_bundle_bytes` or
    /// `chat.max_bundle_messages`).
    pub bundles_split: IntCounter,
    /// Verification handshakes by `result` (verified, failed).
    pub verifications: IntCounterVec,
    /// Subscriptions disabled, by `cause`: failures (more than `disable_after_failures` in a
    /// row), gone (the endpoint answered 410 Gone), operator (the admin API).
    pub endpoint_disables: IntCounterVec,
    /// Notices (`endpoint.disabled`) for `hookd.notifications`, by `outcome` (sent, failed).
    pub notifications: IntCounterVec,
    /// Owner e-mails of `endpoint.disabled` notices (`[notify.smtp]`), by `outcome`: sent,
    /// failed (the relay refused, timed out or was unreachable; a bad address), dropped (the
    /// queue was full or hookd stopped first), no_address (the subscription has no `owner_email`).
    pub owner_emails: IntCounterVec,
    /// Lifecycle and admin records (subscription changes, notices, replays) Kafka did not
    /// take, by `via`: sender (hookd stopping, or refused), admin (not acknowledged in time).
    pub publish_failures: IntCounterVec,
    /// Admin API requests by `outcome` (ok, unauthorized, bad_request, not_found,
    /// unavailable: Kafka did not acknowledge in time, error).
    pub admin_requests: IntCounterVec,
    /// Customer portal requests by `outcome` (ok, unauthorized: expired or tampered link,
    /// forbidden: CSRF or origin check failed, not_found, bad_request, unavailable, error).
    pub portal_requests: IntCounterVec,
    /// Kafka client errors a stage logged and rode out, by `stage` (ingest, sender,
    /// subscriptions; `close`: a consumer close that failed or did not finish within
    /// 10 s at shutdown); each is also a log line.
    pub kafka_errors: IntCounterVec,
    /// Steps of a graceful stop that did not finish in their bound and were left behind, by
    /// `step` ([`crate::shutdown`]).
    pub shutdown_overruns: IntCounterVec,
    /// Failed sled operations of the state layer, by `store` (windows, retry, endpoints) and
    /// `op` ([`events::StateError`]); each is also an error log line.
    pub state_errors: IntCounterVec,
    /// Endpoint state changes for the changelog topic, by `outcome`: written (acknowledged),
    /// failed (not written; queued again unless Kafka refused it for good; also a log line).
    pub endpoint_changelog: IntCounterVec,
    /// Restores of endpoint state from the changelog on assignment, by `outcome` (ok, failed).
    pub endpoint_restores: IntCounterVec,
    /// Changelog records read by restores.
    pub endpoint_restored_records: IntCounter,
    /// How long a restore took (histogram).
    pub endpoint_restore_duration: Histogram,
    /// Deliveries partitions whose endpoint state this instance owns (writes to the changelog).
    pub endpoint_partitions: IntGauge,
    /// Request log entries whose body was cut to `delivery.log_body_max_bytes`.
    pub request_log_truncated: IntCounter,
}

fn int_counter(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("metric registered once");
    c
}

const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    reg.register(Box::new(c.clone())).expect("metric registered once");
    c
}

fn histogram(reg: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("valid metric");
    reg.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn plain_histogram(reg: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    reg.register(Box::new(h.clone())).expect("metric registered once");
    h
}

fn gauge(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    reg.register(Box::new(g.clone())).expect("metric registered once");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let m = Self {
            state_wipes: int_counter(&r, "hookd_state_wipes_total", "State store wiped and rebuilt from Kafka"),
            chat_late: int_counter(&r, "hookd_chat_messages_late_total", "Chat messages that missed their window"),
            open_bundles: gauge(&r, "hookd_open_bundles", "Bundles open in the window store"),
            chat_bundled: int_counter(&r, "hookd_chat_messages_bundled_total", "Chat messages written to a bundle"),
            bundles_emitted: int_counter(&r, "hookd_bundles_emitted_total", "Bundles emitted as delivery records"),
            bundles_split: int_counter(&r, "hookd_bundles_split_total", "Bundles delivered in more than one part"),
            verifications: counter(&r, "hookd_verifications_total", "Endpoint verification handshakes", &["result"]),
            endpoint_disables: counter(&r, "hookd_endpoint_disables_total", "Subscriptions disabled, by cause", &["cause"]),
            notifications: counter(&r, "hookd_notifications_total", "Notices for hookd.notifications, by outcome", &["outcome"]),
            owner_emails: counter(&r, "hookd_owner_emails_total", "Owner e-mails of endpoint.disabled notices, by outcome", &["outcome"]),
            publish_failures: counter(&r, "hookd_publish_failures_total", "Lifecycle and admin records Kafka did not take", &["via"]),
            admin_requests: counter(&r, "hookd_admin_requests_total", "Admin API requests", &["outcome"]),
            portal_requests: counter(&r, "hookd_portal_requests_total", "Customer portal requests", &["outcome"]),
            events_consumed: counter(&r, "hookd_events_consumed_total", "Input records read", &["source"]),
            deliveries_produced: counter(&r, "hookd_deliveries_produced_total", "Delivery records produced", &["source"]),
            events_unmatched: counter(&r, "hookd_events_unmatched_total", "Input records matching no subscription", &["source"]),
            deliveries: counter(&r, "hookd_deliveries_total", "Delivery attempts finished, by outcome", &["outcome"]),
            request_errors: counter(&r, "hookd_request_errors_total", "Failed webhook requests, by error kind", &["kind"]),
            request_duration: histogram(
                &r,
                "hookd_request_duration_seconds",
                "Webhook HTTP request duration",
                &["outcome"],
                LATENCY_BUCKETS.to_vec(),
            ),
            delivery_latency: histogram(
                &r,
                "hookd_delivery_latency_seconds",
                "Time from a delivery's creation to its successful send",
                &["attempts"],
                vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0],
            ),
            retry_queue_depth: gauge(&r, "hookd_retry_queue_depth", "Deliveries parked in the retry store"),
            deliveries_deferred: counter(&r, "hookd_deliveries_deferred_total", "Deliveries deferred to the retry topic", &["reason"]),
            dlq_records: counter(&r, "hookd_dlq_records_total", "Records written to the dead-letter topic", &["stage"]),
            dlq_truncated: int_counter(&r, "hookd_dlq_truncated_total", "Dead letters written truncated (too large for the topic)"),
            produce_errors: counter(&r, "hookd_produce_errors_total", "Failed produce attempts, by reason", &["reason"]),
            topics_below_limit: gauge(&r, "hookd_topics_below_limit", "Topics whose max.message.bytes is below kafka.max_message_bytes"),
            requests_in_flight: gauge(&r, "hookd_requests_in_flight", "Webhook requests in flight"),
            subscriptions: gauge(&r, "hookd_subscriptions", "Subscriptions known"),
            resume_skipped: counter(
                &r,
                "hookd_resume_skipped_records_total",
                "Records not read again on assignment (sled held them)",
                &["source"],
            ),
            partitions_assigned: counter(&r, "hookd_partitions_assigned_total", "Partitions assigned by rebalances, by stage", &["stage"]),
            partitions_revoked: counter(&r, "hookd_partitions_revoked_total", "Partitions revoked by rebalances, by stage", &["stage"]),
            records_replayed: counter(&r, "hookd_records_replayed_total", "Records read again after an assignment, by stage", &["stage"]),
            revoke_abandoned: counter(
                &r,
                "hookd_revoke_abandoned_total",
                "Records of revoked partitions unfinished after the grace, by stage",
                &["stage"],
            ),
            chat_skipped: counter(&r, "hookd_chat_messages_skipped_total", "Chat messages not delivered", &["reason"]),
            kafka_errors: counter(&r, "hookd_kafka_errors_total", "Kafka client errors ridden out (logged), by stage", &["stage"]),
            shutdown_overruns: counter(&r, "hookd_shutdown_overruns_total", "Stop steps left unfinished after their bound", &["step"]),
            state_errors: counter(&r, "hookd_state_errors_total", "Failed state store operations, by store and op", &["store", "op"]),
            endpoint_changelog: counter(
                &r,
                "hookd_endpoint_changelog_records_total",
                "Endpoint state changes for the changelog topic",
                &["outcome"],
            ),
            endpoint_restores: counter(&r, "hookd_endpoint_restores_total", "Endpoint state restores from the changelog", &["outcome"]),
            endpoint_restored_records: int_counter(
                &r,
                "hookd_endpoint_restored_records_total",
                "Changelog records read by endpoint state restores",
            ),
            endpoint_restore_duration: plain_histogram(
                &r,
                "hookd_endpoint_restore_seconds",
                "Duration of an endpoint state restore",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            ),
            endpoint_partitions: gauge(
                &r,
                "hookd_endpoint_state_partitions",
                "Deliveries partitions whose endpoint state this instance owns",
            ),
            request_log_truncated: int_counter(&r, "hookd_request_log_truncated_total", "Request log entries with a body cut to the cap"),
            registry: r,
        };
        m.init_series();
        m.register_process_collector();
        m
    }

    /// A series at 0 for every known label value (README's metrics table lists the same).
    fn init_series(&self) {
        use crate::deliver::http::DeliverError;
        use crate::kafka::PermanentReason;
        use crate::notify::DisableCause;
        let sources = ["crm", "chat"];
        let touch = |vec: &IntCounterVec, values: &[&str]| values.iter().for_each(|v| drop(vec.with_label_values(&[v])));
        touch(&self.events_consumed, &sources);
        touch(&self.deliveries_produced, &sources);
        touch(&self.events_unmatched, &sources);
        touch(&self.deliveries, &["success", "retry", "exhausted", "dropped", "refused"]);
        touch(&self.request_errors, &DeliverError::KINDS);
        touch(&self.deliveries_deferred, &["busy", "disabled", "unverified"]);
        touch(&self.dlq_records, &["ingest", "render", "produce", "deliver", "subscriptions"]);
        touch(&self.produce_errors, &["transient"]);
        touch(&self.produce_errors, &PermanentReason::ALL.map(PermanentReason::as_str));
        touch(&self.resume_skipped, &["chat", "retry"]);
        for vec in [&self.partitions_assigned, &self.partitions_revoked, &self.records_replayed, &self.revoke_abandoned] {
            touch(vec, &["ingest", "sender"]);
        }
        touch(&self.chat_skipped, &["attachments"]);
        touch(&self.verifications, &["verified", "failed"]);
        touch(&self.endpoint_disables, &DisableCause::ALL.map(DisableCause::label));
        touch(&self.notifications, &["sent", "failed"]);
        touch(&self.owner_emails, &["sent", "failed", "dropped", "no_address"]);
        touch(&self.publish_failures, &["sender", "admin"]);
        touch(&self.admin_requests, &["ok", "unauthorized", "bad_request", "not_found", "unavailable", "error"]);
        touch(&self.portal_requests, &["ok", "unauthorized", "forbidden", "not_found", "bad_request", "unavailable", "error"]);
        touch(&self.kafka_errors, &["ingest", "sender", "subscriptions", "close"]);
        touch(&self.endpoint_changelog, &["written", "failed"]);
        touch(&self.endpoint_restores, &["ok", "failed"]);
        touch(&self.shutdown_overruns, &["ingest", "sender", "sender_helpers", "admin_server", "owner_emails"]);
        for store in Store::ALL {
            for op in StateOp::ALL {
                drop(self.state_errors.with_label_values(&[store.label(), op.label()]));
            }
        }
        for outcome in ["success", "failure"] {
            drop(self.request_duration.with_label_values(&[outcome]));
        }
        for attempts in ["1", "2+"] {
            drop(self.delivery_latency.with_label_values(&[attempts]));
        }
    }

    /// `process_*`: resident and virtual memory, CPU seconds, open and maximum file
    /// descriptors, threads, start time (read from /proc at each scrape; Linux only).
    fn register_process_collector(&self) {
        #[cfg(target_os = "linux")]
        if let Err(error) = self.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())) {
            tracing::warn!(%error, "Process metrics not registered.");
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(error) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(%error, "Metrics encoding failed.");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
