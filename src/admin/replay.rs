//! Replay: resend one delivery by `webhook-id`, or every failed delivery since a time.
//!
//! What it guarantees: a failed delivery kept for replay (`EndpointStore::push_failed`) stays
//! kept until the broker has acknowledged its replay record on `hookd.deliveries`, and is then
//! removed only if it is still the copy that was replayed (a delivery that failed again
//! meanwhile keeps its newer copy). The records are produced and the copies removed in a task of
//! the admin API's own ([`super::api::detached`]), so a client that goes away mid-request cuts
//! nothing short. When Kafka does not acknowledge within `admin.produce_timeout_ms` the answer
//! is 503 and every copy not acknowledged is still kept, to replay again later.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::api::{detached, find, internal, not_written, parse, view, ApiError, Done, Failure};
use crate::deliver::publish::{publish, Via};
use crate::deliver::record::DeliveryRecord;
use crate::endpoint::{Action, Activity};
use crate::route::subscription::Subscription;
use crate::Shared;

/// Body of replay: exactly one of `delivery_id` and `since`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Resend this delivery (its `webhook-id`), from the failed deliveries or the request log.
    pub delivery_id: Option<String>,
    /// Resend every failed delivery of the subscription since this RFC 3339 time.
    pub since: Option<String>,
}

/// One delivery to resend, and the kept copy it came from (time kept, bytes), if any.
struct Item {
    record: DeliveryRecord,
    kept: Option<(i64, Vec<u8>)>,
}

/// Resend one delivery, or every failed delivery since a time. Sends start at attempt 1.
#[utoipa::path(post, path = "/api/subscriptions/{id}/replay", params(("id" = String, Path)), request_body = ReplayRequest, responses((status = 200, body = Done), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 503, description = "Kafka did not acknowledge within `admin.produce_timeout_ms`; the failed deliveries not acknowledged are still kept", body = ApiError)), security(("bearer" = [])))]
pub async fn replay(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<Done>, Failure> {
    find(&s, &id)?;
    let req: ReplayRequest = parse(&body)?;
    replay_subscription(&s, &id, req).await.map(Json)
}

/// Replays what `req` names for `id`. Shared by the admin API and the customer portal.
pub(crate) async fn replay_subscription(s: &Arc<Shared>, id: &str, req: ReplayRequest) -> Result<Done, Failure> {
    let sub = find(s, id)?;
    let items = match (req.delivery_id, req.since) {
        (Some(d), None) => vec![one(s, &sub, &d)?],
        (None, Some(since)) => {
            let t = chrono::DateTime::parse_from_rfc3339(&since)
                .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("`since` is not an RFC 3339 time: {e}")))?;
            let failed = s.endpoints.failed_since(id, t.timestamp_millis()).map_err(internal)?;
            failed.into_iter().map(|(_, at, bytes)| kept(at, bytes)).collect::<Result<_, _>>()?
        }
        _ => return Err(Failure(StatusCode::BAD_REQUEST, "give exactly one of `delivery_id` and `since`".into())),
    };
    let (shared, target) = (s.clone(), sub.clone());
    let replayed = detached(s, "replay", async move { resend(&shared, &target, items).await }).await?;
    Ok(Done { subscription: id.to_string(), state: view(s, &sub).state, replayed: Some(replayed) })
}

fn kept(at_ms: i64, bytes: Vec<u8>) -> Result<Item, Failure> {
    let record = DeliveryRecord::decode(&bytes).map_err(internal)?;
    Ok(Item { record, kept: Some((at_ms, bytes)) })
}

/// Produces every item's replay record at once, then, for each one acknowledged, removes its
/// kept copy and logs the replay. Any not acknowledged: 503 (or 500), those copies kept.
async fn resend(s: &Shared, sub: &Subscription, items: Vec<Item>) -> Result<usize, Failure> {
    let now = chrono::Utc::now().timestamp_millis();
    let encoded: Vec<Vec<u8>> = items
        .iter()
        .map(|item| DeliveryRecord { attempt: 1, not_before_ms: now, last_error: None, ..item.record.clone() }.encode())
        .collect();
    let topic = &s.config.topics.deliveries;
    let results = futures::future::join_all(encoded.iter().map(|v| publish(s, Via::Admin, topic, &sub.id, v))).await;
    let (mut done, mut first_error) = (0, None);
    for (item, result) in items.iter().zip(results) {
        if let Err(error) = result {
            first_error.get_or_insert(error);
            continue;
        }
        done += 1;
        if let Some((at_ms, bytes)) = &item.kept {
            if let Err(error) = s.endpoints.remove_failed(&sub.id, &item.record.id, *at_ms, bytes) {
                // Kept: a later replay sends it again, with the same webhook-id.
                tracing::error!(%error, subscription = %sub.id, webhook_id = %item.record.id, "Removing a replayed failed delivery failed.");
            }
        }
        let a = Activity { at_ms: now, action: Action::Replayed, delivery_id: Some(item.record.id.clone()), attempt: None, detail: None };
        if let Err(error) = s.endpoints.push_activity(&sub.id, a) {
            tracing::error!(%error, subscription = %sub.id, "Activity log write failed.");
        }
    }
    match first_error {
        None => Ok(done),
        Some(error) => {
            let what = format!("replay ({done} of {} acknowledged and removed, the rest kept)", items.len());
            Err(not_written(&what, &sub.id, error.into()))
        }
    }
}

/// A delivery to resend: a kept failed copy, else rebuilt from the request log.
fn one(s: &Shared, sub: &Subscription, delivery_id: &str) -> Result<Item, Failure> {
    if let Some((at_ms, bytes)) = s.endpoints.failed_one(&sub.id, delivery_id).map_err(internal)? {
        return kept(at_ms, bytes);
    }
    let Some(log) = s.endpoints.find_request_body(&sub.id, delivery_id).map_err(internal)? else {
        return Err(Failure(StatusCode::NOT_FOUND, format!("no delivery `{delivery_id}` in the failed deliveries or the request log")));
    };
    let fixed = ["content-type", "content-length", "host", "user-agent", "webhook-id", "webhook-timestamp", "webhook-signature"];
    let header = |n: &str| log.request_headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
    let headers = log
        .request_headers
        .iter()
        .filter(|(k, v)| {
            !fixed.contains(&k.to_ascii_lowercase().as_str()) && !sub.headers.keys().any(|h| h.eq_ignore_ascii_case(k)) && v != "[redacted]"
        })
        .cloned()
        .collect();
    let record = DeliveryRecord {
        id: delivery_id.to_string(),
        subscription_id: sub.id.clone(),
        tenant: sub.tenant.clone(),
        event_name: "replay".into(),
        attempt: 1,
        not_before_ms: 0,
        created_ms: chrono::Utc::now().timestamp_millis(),
        content_type: header("content-type").unwrap_or_else(|| "application/json".into()),
        body: log.request_body.into_bytes(),
        headers,
        last_error: None,
        source: crate::kafka::SourceRef { topic: "replay".into(), partition: -1, offset: -1 },
    };
    Ok(Item { record, kept: None })
}
