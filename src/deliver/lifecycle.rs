//! Endpoint lifecycle: whether a subscription may be sent to now, what each request leaves
//! in its logs, auto-disable, and the DooPage verification handshake.
//!
//! Enabling and disabling go through `hookd.subscriptions` (the subscription, as the registry
//! holds it now, is re-published with `enabled` and `disabled_reason`), so every instance and
//! every restart sees the same answer; the change is also applied locally at once, as a
//! compare-and-set, so it happens once however many failures race to it. Failure counts, the
//! activity log and the request log live in the sender's sled ([`crate::endpoint`]), owned by
//! the instance that owns the subscription's partition.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::distributions::{Alphanumeric, DistString};
use tokio_util::sync::CancellationToken;

use super::http::{Attempt, HttpSender};
use super::publish::{publish, PublishError, Via};
use super::record::DeliveryRecord;
use crate::endpoint::{fingerprint, Action, Activity, RequestLog, Verification};
use crate::notify::Notice;
use crate::route::subscription::Subscription;
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
        truncated: false,
        duration_ms: attempt.duration.as_millis() as u64,
        error: attempt.error.as_ref().map(|e| e.to_string()),
    };
    match shared.endpoints.push_request(&sub.id, entry) {
        Ok(true) => shared.metrics.request_log_truncated.inc(),
        Ok(false) => {}
        Err(error) => tracing::error!(%error, subscription = %sub.id, "Request log write failed."),
    }
}

/// A request succeeded: reset the failure count, log it.
pub fn on_success(shared: &Shared, sub: &Subscription, record: &DeliveryRecord) {
    if let Err(error) = shared.endpoints.record_success(&sub.id) {
        tracing::error!(%error, "Endpoint state write failed.");
    }
    activity(shared, &sub.id, Action::Delivered, Some(record), None);
}

/// A failed request, as the lifecycle counts it.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    /// What went wrong (status or transport error), for the logs and the notice.
    pub error: &'a str,
    /// The endpoint answered `410 Gone` ([`is_gone`]): disable at once.
    pub gone: bool,
    /// The delivery will be sent again (activity `retried`, else `failed`).
    pub will_retry: bool,
}

/// `410 Gone` with no transport error: the receiver says the endpoint is gone for good, and
/// the Standard Webhooks spec asks senders to stop (disable it, do not retry).
pub fn is_gone(attempt: &Attempt) -> bool {
    attempt.error.is_none() && attempt.status == Some(410)
}

pub use crate::notify::DisableCause;

/// What [`disable`] or [`enable`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// It changed the subscription, published and applied.
    Now,
    /// Nothing to do: the subscription was in that state already (or is unknown).
    Already,
}

/// Why an enable or disable did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("endpoint state: {0}")]
    State(#[from] sled::Error),
    #[error("encoding the subscription: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A request failed: count it, log it, and disable the subscription after more than
/// `disable_after_failures` failures in a row, or at once on `410 Gone`. The threshold and
/// the subscription published are the registry's now, not `sub` (the version dispatched).
pub async fn on_failure(shared: &Shared, sub: &Subscription, record: &DeliveryRecord, failed: Failed<'_>, stop: &CancellationToken) {
    let action = if failed.will_retry { Action::Retried } else { Action::Failed };
    activity(shared, &sub.id, action, Some(record), Some(failed.error.to_string()));
    let count = match shared.endpoints.record_failure(&sub.id, failed.error, now_ms()) {
        Ok(n) => n,
        Err(e) => return tracing::error!(error = %e, "Endpoint state write failed."),
    };
    let Some(threshold) = shared.registry.index().get(&sub.id).map(|s| s.disable_after_failures) else { return };
    let error = crate::endpoint::redact_text(failed.error);
    let (cause, reason) = if failed.gone {
        (DisableCause::Gone, format!("the endpoint answered 410 Gone, which asks senders to stop (Standard Webhooks); last: {error}"))
    } else if count > threshold {
        (DisableCause::Failures, format!("{count} consecutive failed requests; last: {error}"))
    } else {
        return;
    };
    if let Err(error) = disable(shared, &sub.id, &reason, cause, Via::UntilAcked(stop)).await {
        tracing::error!(%error, subscription = %sub.id, "Disabling failed; the next failure tries again.");
    }
}

/// Publishes a subscription changed locally by [`crate::route::Registry::change_local`]; takes
/// the change back when it did not reach the topic.
async fn publish_change(shared: &Shared, changed: &Arc<Subscription>, via: Via<'_>) -> Result<(), ChangeError> {
    let result = match serde_json::to_vec(&**changed) {
        Ok(value) => publish(shared, via, &shared.config.topics.subscriptions, &changed.id, &value).await.map_err(ChangeError::from),
        Err(e) => Err(e.into()),
    };
    if result.is_err() {
        shared.registry.withdraw_local(changed);
    }
    result
}

/// Disables a subscription as the registry holds it now (so a URL or secret fixed since a
/// request was dispatched stays fixed) and tells the owner through `hookd.notifications`.
/// The change from enabled to disabled is a compare-and-set in the registry: of concurrent
/// callers one publishes and notifies, the others (and a disable of a disabled subscription)
/// get [`Changed::Already`] and send nothing.
pub async fn disable(shared: &Shared, id: &str, reason: &str, cause: DisableCause, via: Via<'_>) -> Result<Changed, ChangeError> {
    let off = |s: &Subscription| s.enabled.then(|| Subscription { enabled: false, disabled_reason: Some(reason.to_string()), ..s.clone() });
    let Some((_, now)) = shared.registry.change_local(id, off) else { return Ok(Changed::Already) };
    publish_change(shared, &now, via).await?;
    shared.metrics.endpoint_disables.with_label_values(&[cause.label()]).inc();
    activity(shared, id, Action::Disabled, None, Some(reason.to_string()));
    tracing::warn!(subscription = id, tenant = %now.tenant, cause = cause.label(), reason, "Endpoint disabled.");
    notify(shared, &now, cause, reason, via).await;
    Ok(Changed::Now)
}

/// Enables a subscription and resets its failure count (also when it is enabled already).
pub async fn enable(shared: &Shared, id: &str, via: Via<'_>) -> Result<Changed, ChangeError> {
    shared.endpoints.reset_failures(id)?;
    let on = |s: &Subscription| (!s.enabled).then(|| Subscription { enabled: true, disabled_reason: None, ..s.clone() });
    let Some((_, now)) = shared.registry.change_local(id, on) else { return Ok(Changed::Already) };
    publish_change(shared, &now, via).await?;
    activity(shared, id, Action::Enabled, None, None);
    tracing::info!(subscription = id, tenant = %now.tenant, "Endpoint enabled.");
    Ok(Changed::Now)
}

/// The `endpoint.disabled` notice for the operator's product (so it can email the owner),
/// about `sub` as published; also mailed to the owner when `[notify.smtp]` is set (queued, so
/// this never waits for mail).
async fn notify(shared: &Shared, sub: &Subscription, cause: DisableCause, reason: &str, via: Via<'_>) {
    let state = shared.endpoints.state(&sub.id).unwrap_or_default();
    let notice = Notice {
        kind: "endpoint.disabled",
        tenant: sub.tenant.clone(),
        subscription: sub.id.clone(),
        url: crate::endpoint::redact_url(&sub.url),
        owner_email: sub.owner_email.clone(),
        last_error: state.last_error.unwrap_or_else(|| reason.to_string()),
        cause,
        reason: reason.to_string(),
        at: chrono::Utc::now().to_rfc3339(),
    };
    let topic = &shared.config.topics.notifications;
    let value = serde_json::to_vec(&notice).expect("a notice serialises");
    match publish(shared, via, topic, &sub.id, &value).await {
        Ok(()) => shared.metrics.notifications.with_label_values(&["sent"]).inc(),
        Err(error) => {
            shared.metrics.notifications.with_label_values(&["failed"]).inc();
            tracing::error!(%error, subscription = %sub.id, "Notice not produced.");
        }
    }
    if let Some(mailer) = &shared.mailer {
        mailer.offer(&notice);
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
        flush_changelog(&shared).await;
    }
}

/// How long a flush of the endpoint state changelog waits for Kafka's acknowledgements.
const CHANGELOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Produces the endpoint state changes queued for the changelog (`endpoint::changelog`).
pub async fn flush_changelog(shared: &Shared) {
    if let Some(changelog) = shared.endpoints.changelog() {
        changelog.flush(tokio::time::sleep(CHANGELOG_FLUSH_TIMEOUT)).await;
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
