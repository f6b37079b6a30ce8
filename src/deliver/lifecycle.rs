//! Endpoint lifecycle: whether a subscription may be sent to now, what each request leaves
//! in its logs, auto-disable, and the DooPage verification handshake.
//!
//! Enabling and disabling go through `hookd.subscriptions` (the subscription is re-published
//! with `enabled` and `disabled_reason`), so every instance and every restart sees the same
//! answer; the change is also applied locally at once. Failure counts, the activity log and
//! the request log live in the sender's sled ([`crate::endpoint`]), owned by the instance that
//! owns the subscription's partition.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::distributions::{Alphanumeric, DistString};
use tokio_util::sync::CancellationToken;

use super::http::{Attempt, HttpSender};
use super::record::DeliveryRecord;
use crate::endpoint::{fingerprint, Action, Activity, RequestLog, Verification};
use crate::kafka::produce_until_acked;
use crate::route::subscription::Subscription;
use crate::route::Change;
use crate::Shared;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Why a subscription can't be sent to now, if it can't.
pub fn gate(shared: &Shared, sub: &Subscription) -> Option<&'static str> {
    if !sub.enabled {
        return Some("disabled");
    }
    let v = sub.verification.as_ref()?;
    let fp = fingerprint(&sub.url, &v.validation_key);
    let Ok(state) = shared.endpoints.state(&sub.id) else { return Some("unverified") };
    match state.verification {
        Some(ok) if ok.verified && ok.fingerprint == fp => None,
        _ => Some("unverified"),
    }
}

fn activity(shared: &Shared, sub: &str, action: Action, record: Option<&DeliveryRecord>, detail: Option<String>) {
    let a = Activity { at_ms: now_ms(), action, delivery_id: record.map(|r| r.id.clone()), attempt: record.map(|r| r.attempt), detail };
    if let Err(error) = shared.endpoints.push_activity(sub, a) {
        tracing::error!(%error, subscription = sub, "Activity log write failed.");
    }
}

/// Logs one request in the subscription's request log (redacted by the store).
pub fn log_request(shared: &Shared, sub: &Subscription, record: &DeliveryRecord, headers: &[(String, String)], attempt: &Attempt) {
    let entry = RequestLog {
        at_ms: now_ms(),
        delivery_id: record.id.clone(),
        attempt: record.attempt,
        method: "POST".into(),
        url: sub.url.clone(),
        request_headers: headers.to_vec(),
        request_body: String::from_utf8_lossy(&record.body).into_owned(),
        status: attempt.status,
        response_headers: attempt.response_headers.clone(),
        response_body_excerpt: attempt.body_excerpt.clone(),
        duration_ms: attempt.duration.as_millis() as u64,
        error: attempt.error.as_ref().map(|e| e.to_string()),
    };
    if let Err(error) = shared.endpoints.push_request(&sub.id, entry) {
        tracing::error!(%error, subscription = %sub.id, "Request log write failed.");
    }
}

/// A request succeeded: reset the failure count, log it.
pub fn on_success(shared: &Shared, sub: &Subscription, record: &DeliveryRecord) {
    if let Err(error) = shared.endpoints.record_success(&sub.id) {
        tracing::error!(%error, "Endpoint state write failed.");
    }
    activity(shared, &sub.id, Action::Delivered, Some(record), None);
}

/// A request failed: count it, log it, and disable the subscription after more than
/// `disable_after_failures` failures in a row.
pub async fn on_failure(
    shared: &Shared,
    sub: &Subscription,
    record: &DeliveryRecord,
    error: &str,
    will_retry: bool,
    stop: &CancellationToken,
) {
    let action = if will_retry { Action::Retried } else { Action::Failed };
    activity(shared, &sub.id, action, Some(record), Some(error.to_string()));
    let count = match shared.endpoints.record_failure(&sub.id, error, now_ms()) {
        Ok(n) => n,
        Err(e) => return tracing::error!(error = %e, "Endpoint state write failed."),
    };
    if count > sub.disable_after_failures && sub.enabled {
        let reason = format!("{count} consecutive failed requests; last: {error}");
        disable(shared, sub, &reason, stop).await;
    }
}

/// Re-publishes a subscription with changed fields and applies it locally.
async fn publish(shared: &Shared, sub: Subscription, stop: &CancellationToken) -> Result<(), String> {
    let value = serde_json::to_vec(&sub).map_err(|e| e.to_string())?;
    shared.registry.apply([Change::Upsert(sub.clone())]);
    produce_until_acked(&shared.producer, &shared.metrics, &shared.config.topics.subscriptions, Some(sub.id.as_bytes()), &value, None, stop)
        .await
        .map_err(|e| format!("publishing subscription `{}`: {e}", sub.id))
}

/// Disables a subscription, tells the owner through `hookd.notifications`.
pub async fn disable(shared: &Shared, sub: &Subscription, reason: &str, stop: &CancellationToken) {
    let mut off = sub.clone();
    off.enabled = false;
    off.disabled_reason = Some(reason.to_string());
    if let Err(error) = publish(shared, off, stop).await {
        tracing::error!(%error, "Disabling failed.");
        return;
    }
    shared.metrics.endpoint_disables.inc();
    activity(shared, &sub.id, Action::Disabled, None, Some(reason.to_string()));
    tracing::warn!(subscription = %sub.id, tenant = %sub.tenant, reason, "Endpoint disabled.");
    let state = shared.endpoints.state(&sub.id).unwrap_or_default();
    notify(shared, sub, "endpoint.disabled", state.last_error.as_deref().unwrap_or(reason), stop).await;
}

/// Enables a subscription and resets its failure count.
pub async fn enable(shared: &Shared, sub: &Subscription, stop: &CancellationToken) -> Result<(), String> {
    let mut on = sub.clone();
    on.enabled = true;
    on.disabled_reason = None;
    publish(shared, on, stop).await?;
    shared.endpoints.reset_failures(&sub.id).map_err(|e| e.to_string())?;
    activity(shared, &sub.id, Action::Enabled, None, None);
    Ok(())
}

/// A notice for the operator's product (so it can email the owner).
async fn notify(shared: &Shared, sub: &Subscription, kind: &str, last_error: &str, stop: &CancellationToken) {
    let value = serde_json::json!({
        "type": kind,
        "tenant": sub.tenant,
        "subscription": sub.id,
        "url": crate::endpoint::redact_url(&sub.url),
        "owner_email": sub.owner_email,
        "last_error": last_error,
        "at": chrono::Utc::now().to_rfc3339(),
    });
    let bytes = value.to_string();
    let topic = &shared.config.topics.notifications;
    if let Err(error) =
        produce_until_acked(&shared.producer, &shared.metrics, topic, Some(sub.id.as_bytes()), bytes.as_bytes(), None, stop).await
    {
        tracing::error!(%error, "Notification not produced.");
    }
}

/// Writes the buffered endpoint logs to sled every `delivery.log_flush_interval_ms` (off the
/// async threads: one flush is a batch of up to 100 entries per busy subscription), and once
/// more when `stop` fires, after the sender's requests have finished.
pub async fn flush_logs_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(shared.config.delivery.log_flush_interval_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let endpoints = shared.endpoints.clone();
        match tokio::task::spawn_blocking(move || endpoints.flush_logs()).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::error!(%error, "Writing the endpoint logs failed; kept in memory for the next flush."),
            Err(error) => tracing::error!(%error, "Endpoint log flush panicked."),
        }
    }
}

/// Performs one verification handshake: GET `url?validation_key=..&challenge_key=..`; the
/// endpoint must answer 2xx with exactly the challenge.
pub async fn handshake(http: &HttpSender, url: &str, key: &str) -> Result<(), String> {
    let challenge = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
    let mut u = url::Url::parse(url).map_err(|e| format!("invalid url: {e}"))?;
    u.query_pairs_mut().append_pair("validation_key", key).append_pair("challenge_key", &challenge);
    match http.get_text(u.as_str()).await {
        Ok((status, body)) if (200..300).contains(&status) && body.trim() == challenge => Ok(()),
        Ok((status, _)) if !(200..300).contains(&status) => Err(format!("verification answered HTTP {status}")),
        Ok(_) => Err("verification answer is not the challenge".to_string()),
        Err(e) => Err(format!("verification request failed: {e}")),
    }
}

/// Verifies subscriptions that ask for it: new ones, changed URL or key, and failed ones
/// again every `verification_retry_secs`. Runs until `stop`.
pub async fn verify_loop(shared: Arc<Shared>, http: Arc<HttpSender>, stop: CancellationToken) {
    let busy = Arc::new(Mutex::new(HashSet::<String>::new()));
    let retry_ms = shared.config.delivery.verification_retry_secs as i64 * 1000;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                tasks.close();
                tasks.wait().await;
                return;
            }
            _ = tick.tick() => {}
        }
        for sub in shared.registry.index().all() {
            let Some(v) = &sub.verification else { continue };
            let fp = fingerprint(&sub.url, &v.validation_key);
            let due = match shared.endpoints.state(&sub.id).ok().and_then(|s| s.verification) {
                None => true,
                Some(s) if s.fingerprint != fp => true,
                Some(s) => !s.verified && now_ms() - s.at_ms >= retry_ms,
            };
            if !due || !busy.lock().expect("poisoned").insert(sub.id.clone()) {
                continue;
            }
            let (shared, http, busy, sub, key) = (shared.clone(), http.clone(), busy.clone(), sub.clone(), v.validation_key.clone());
            tasks.spawn(async move {
                let result = handshake(&http, &sub.url, &key).await;
                let ok = result.is_ok();
                let v = Verification { fingerprint: fp, verified: ok, at_ms: now_ms(), error: result.as_ref().err().cloned() };
                if let Err(error) = shared.endpoints.set_verification(&sub.id, v) {
                    tracing::error!(%error, "Verification state write failed.");
                }
                shared.metrics.verifications.with_label_values(&[if ok { "verified" } else { "failed" }]).inc();
                let action = if ok { Action::Verified } else { Action::VerificationFailed };
                activity(&shared, &sub.id, action, None, result.as_ref().err().cloned());
                match result {
                    Ok(()) => tracing::info!(subscription = %sub.id, "Endpoint verified."),
                    Err(e) => {
                        tracing::warn!(subscription = %sub.id, error = %e, "Endpoint verification failed; the subscription stays inactive.")
                    }
                }
                busy.lock().expect("poisoned").remove(&sub.id);
            });
        }
    }
}
