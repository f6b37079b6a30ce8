//! The admin API: what a customer sees of their webhook, for the operator's own UI.
//!
//! JSON over HTTP on `admin.listen`, every route behind `Authorization: Bearer <admin.token>`
//! (401 without it). Subscriptions with their state (active, unverified, disabled and why,
//! consecutive failures), the activity log (10 latest actions), the request log (100 latest
//! requests, downloadable as one JSON file, secrets redacted), enable, disable, and replay.
//! Described by the OpenAPI document at `/openapi.json`, generated from these handlers.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{OpenApi, ToSchema};

use crate::deliver::lifecycle;
use crate::deliver::record::DeliveryRecord;
use crate::endpoint::{Action, Activity};
use crate::route::subscription::Subscription;
use crate::Shared;

/// An error answer: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
}

pub struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn not_found(id: &str) -> Failure {
    Failure(StatusCode::NOT_FOUND, format!("no subscription `{id}`"))
}

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A subscription as the API shows it: its settings (secrets left out) and its state.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    pub id: String,
    pub tenant: String,
    /// Target URL, credentials and secret-looking query values redacted.
    pub url: String,
    /// `crm` or `chat`.
    pub source: String,
    pub dialect: String,
    pub events: Vec<String>,
    /// `active`, `unverified` (verification handshake pending or failed) or `disabled`.
    pub state: String,
    pub enabled: bool,
    /// Why it is disabled, when hookd or an operator disabled it.
    pub disabled_reason: Option<String>,
    pub consecutive_failures: u32,
    pub disable_after_failures: u32,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub last_success_at: Option<String>,
    /// Verification: `{verified, at, error}` of the last handshake, when the subscription asks for one.
    #[schema(value_type = Option<Object>)]
    pub verification: Option<serde_json::Value>,
    pub owner_email: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_default()
}

fn view(shared: &Shared, s: &Subscription) -> SubscriptionView {
    let st = shared.endpoints.state(&s.id).unwrap_or_default();
    let state = match lifecycle::gate(shared, s) {
        None => "active",
        Some("unverified") => "unverified",
        Some(_) => "disabled",
    };
    SubscriptionView {
        id: s.id.clone(),
        tenant: s.tenant.clone(),
        url: crate::endpoint::redact_url(&s.url),
        source: format!("{:?}", s.source).to_lowercase(),
        dialect: s.dialect.clone(),
        events: s.events.clone(),
        state: state.into(),
        enabled: s.enabled,
        disabled_reason: s.disabled_reason.clone(),
        consecutive_failures: st.consecutive_failures,
        disable_after_failures: s.disable_after_failures,
        last_error: st.last_error.clone(),
        last_error_at: st.last_error_at_ms.map(rfc3339),
        last_success_at: st.last_success_at_ms.map(rfc3339),
        verification: s.verification.as_ref().map(|_| match &st.verification {
            Some(v) => serde_json::json!({"verified": v.verified, "at": rfc3339(v.at_ms), "error": v.error}),
            None => serde_json::json!({"verified": false, "at": null, "error": "not attempted yet"}),
        }),
        owner_email: s.owner_email.clone(),
    }
}

fn find(shared: &Shared, id: &str) -> Result<Arc<Subscription>, Failure> {
    shared.registry.index().get(id).cloned().ok_or_else(|| not_found(id))
}

/// List subscriptions with their state.
#[utoipa::path(get, path = "/api/subscriptions", responses((status = 200, body = [SubscriptionView]), (status = 401, body = ApiError)), security(("bearer" = [])))]
async fn list(State(s): State<Arc<Shared>>) -> Json<Vec<SubscriptionView>> {
    let index = s.registry.index();
    let mut out: Vec<SubscriptionView> = index.all().map(|sub| view(&s, sub)).collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Json(out)
}

/// One subscription with its state.
#[utoipa::path(get, path = "/api/subscriptions/{id}", params(("id" = String, Path)), responses((status = 200, body = SubscriptionView), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn get_one(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<SubscriptionView>, Failure> {
    let sub = find(&s, &id)?;
    Ok(Json(view(&s, &sub)))
}

/// The 10 latest actions (delivered, failed, retried, disabled, enabled, verified, ...), newest first.
#[utoipa::path(get, path = "/api/subscriptions/{id}/activity", params(("id" = String, Path)), responses((status = 200, body = [Object]), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn activity(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Vec<serde_json::Value>>, Failure> {
    find(&s, &id)?;
    let items = s.endpoints.activity(&id).map_err(internal)?;
    Ok(Json(items.iter().map(|a| with_time(a, a.at_ms)).collect()))
}

fn with_time<T: Serialize>(item: &T, at_ms: i64) -> serde_json::Value {
    let mut v = serde_json::to_value(item).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("at".into(), rfc3339(at_ms).into());
    }
    v
}

/// The 100 latest requests with request and response details, as one downloadable JSON file.
#[utoipa::path(get, path = "/api/subscriptions/{id}/requests", params(("id" = String, Path)), responses((status = 200, description = "JSON file: state, activity and requests", body = Object), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn requests(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, Failure> {
    find(&s, &id)?;
    let state = s.endpoints.state(&id).map_err(internal)?;
    let activity = s.endpoints.activity(&id).map_err(internal)?;
    let requests = s.endpoints.requests(&id).map_err(internal)?;
    let body = crate::endpoint::export_json(&id, &state, &activity, &requests);
    let disposition = format!(
        "attachment; filename=\"hookd-{}-requests.json\"",
        id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_")
    );
    Ok(([(header::CONTENT_TYPE, "application/json".to_string()), (header::CONTENT_DISPOSITION, disposition)], body).into_response())
}

/// Answer of enable, disable and replay.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    pub subscription: String,
    pub state: String,
    /// Deliveries queued again (replay only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed: Option<usize>,
}

/// Enable a subscription (resets its failure count); parked deliveries resume.
#[utoipa::path(post, path = "/api/subscriptions/{id}/enable", params(("id" = String, Path)), responses((status = 200, body = Done), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn enable(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Done>, Failure> {
    let sub = find(&s, &id)?;
    lifecycle::enable(&s, &sub, &CancellationToken::new()).await.map_err(internal)?;
    let now = find(&s, &id)?;
    Ok(Json(Done { subscription: id.clone(), state: view(&s, &now).state, replayed: None }))
}

/// Body of disable.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableRequest {
    /// Shown as `disabled_reason`; default "disabled by an operator".
    pub reason: Option<String>,
}

/// Disable a subscription: it receives nothing; its pending retries are parked, not lost.
#[utoipa::path(post, path = "/api/subscriptions/{id}/disable", params(("id" = String, Path)), request_body(content = DisableRequest, description = "optional"), responses((status = 200, body = Done), (status = 400, body = ApiError), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn disable(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<Done>, Failure> {
    let sub = find(&s, &id)?;
    let req: DisableRequest = if body.is_empty() { DisableRequest::default() } else { parse(&body)? };
    let reason = req.reason.unwrap_or_else(|| "disabled by an operator".into());
    lifecycle::disable(&s, &sub, &reason, &CancellationToken::new()).await;
    let now = find(&s, &id)?;
    Ok(Json(Done { subscription: id.clone(), state: view(&s, &now).state, replayed: None }))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

/// Body of replay: exactly one of `delivery_id` and `since`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Resend this delivery (its `webhook-id`), from the failed deliveries or the request log.
    pub delivery_id: Option<String>,
    /// Resend every failed delivery of the subscription since this RFC 3339 time.
    pub since: Option<String>,
}

/// Resend one delivery, or every failed delivery since a time. Sends start at attempt 1.
#[utoipa::path(post, path = "/api/subscriptions/{id}/replay", params(("id" = String, Path)), request_body = ReplayRequest, responses((status = 200, body = Done), (status = 400, body = ApiError), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn replay(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<Done>, Failure> {
    let sub = find(&s, &id)?;
    let req: ReplayRequest = parse(&body)?;
    let records = match (req.delivery_id, req.since) {
        (Some(d), None) => vec![one_for_replay(&s, &sub, &d)?],
        (None, Some(since)) => {
            let t = chrono::DateTime::parse_from_rfc3339(&since)
                .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("`since` is not an RFC 3339 time: {e}")))?;
            let failed = s.endpoints.failed_since(&id, t.timestamp_millis()).map_err(internal)?;
            let mut out = Vec::new();
            for (delivery_id, _, bytes) in failed {
                s.endpoints.take_failed(&id, &delivery_id).map_err(internal)?;
                out.push(DeliveryRecord::decode(&bytes).map_err(internal)?);
            }
            out
        }
        _ => return Err(Failure(StatusCode::BAD_REQUEST, "give exactly one of `delivery_id` and `since`".into())),
    };
    let n = records.len();
    let stop = CancellationToken::new();
    for mut r in records {
        r.attempt = 1;
        r.not_before_ms = chrono::Utc::now().timestamp_millis();
        r.last_error = None;
        let topic = &s.config.topics.deliveries;
        crate::kafka::produce_until_acked(&s.producer, &s.metrics, topic, Some(id.as_bytes()), &r.encode(), None, &stop)
            .await
            .map_err(internal)?;
        let a = Activity { at_ms: r.not_before_ms, action: Action::Replayed, delivery_id: Some(r.id.clone()), attempt: None, detail: None };
        s.endpoints.push_activity(&id, a).map_err(internal)?;
    }
    Ok(Json(Done { subscription: id.clone(), state: view(&s, &sub).state, replayed: Some(n) }))
}

/// A delivery to resend: from the failed deliveries, else rebuilt from the request log.
fn one_for_replay(s: &Shared, sub: &Subscription, delivery_id: &str) -> Result<DeliveryRecord, Failure> {
    if let Some(bytes) = s.endpoints.take_failed(&sub.id, delivery_id).map_err(internal)? {
        return DeliveryRecord::decode(&bytes).map_err(internal);
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
    Ok(DeliveryRecord {
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
    })
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hookd admin API", description = "Subscriptions, their state and logs, enable, disable, replay."),
    paths(list, get_one, activity, requests, enable, disable, replay),
    components(schemas(SubscriptionView, ApiError, Done, DisableRequest, ReplayRequest)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    }
}

/// Refuses requests without `Authorization: Bearer <admin.token>`.
async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let presented = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let expected = s.config.admin.token.as_bytes();
    let ok = presented.is_some_and(|p| p.len() == expected.len() && p.bytes().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0);
    if !ok {
        s.metrics.admin_requests.with_label_values(&["unauthorized"]).inc();
        return Failure(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".into()).into_response();
    }
    let resp = next.run(req).await;
    let outcome = match resp.status().as_u16() {
        200..=299 => "ok",
        400 => "bad_request",
        404 => "not_found",
        _ => "error",
    };
    s.metrics.admin_requests.with_label_values(&[outcome]).inc();
    resp
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The API routes (behind the token) and `/openapi.json` (open).
pub fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let api = Router::new()
        .route("/api/subscriptions", get(list))
        .route("/api/subscriptions/{id}", get(get_one))
        .route("/api/subscriptions/{id}/activity", get(activity))
        .route("/api/subscriptions/{id}/requests", get(requests))
        .route("/api/subscriptions/{id}/enable", post(enable))
        .route("/api/subscriptions/{id}/disable", post(disable))
        .route("/api/subscriptions/{id}/replay", post(replay))
        .route_layer(middleware::from_fn_with_state(shared, auth));
    api.route("/openapi.json", get(openapi))
}
