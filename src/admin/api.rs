//! The admin API: what a customer sees of their webhook, for the operator's own UI.
//!
//! JSON over HTTP on `admin.listen`, every route behind `Authorization: Bearer <admin.token>`
//! (401 without it). Subscriptions with their state (active, unverified, disabled and why,
//! consecutive failures), the activity log (10 latest actions), the request log (100 latest
//! requests, downloadable as one JSON file, secrets redacted), enable, disable, and replay.
//! Described by the OpenAPI document at `/openapi.json`, generated from these handlers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

use super::replay::{self, ReplayRequest};
use crate::deliver::lifecycle::{self, ChangeError, DisableCause};
use crate::deliver::publish::Via;
use crate::route::subscription::Subscription;
use crate::Shared;

/// An error answer: `{"error": "..."}` with a 4xx/5xx status.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    pub error: String,
}

#[derive(Debug)]
pub struct Failure(pub(super) StatusCode, pub(super) String);

impl Failure {
    pub(crate) fn new(status: StatusCode, message: String) -> Self {
        Self(status, message)
    }

    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        self.0
    }

    /// What went wrong, as the answer says it.
    pub fn message(&self) -> &str {
        &self.1
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn not_found(id: &str) -> Failure {
    Failure(StatusCode::NOT_FOUND, format!("no subscription `{id}`"))
}

pub(super) fn internal(e: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// A change that did not reach Kafka: 503 when trying again later may work (Kafka did not
/// acknowledge in time, or hookd is stopping), else 500. Logged here; counted by [`auth`].
pub(super) fn not_written(what: &str, id: &str, error: ChangeError) -> Failure {
    let unavailable = matches!(&error, ChangeError::Publish(e) if e.is_unavailable());
    tracing::warn!(%error, subscription = id, what, "Admin call not done: Kafka did not take its record.");
    let status = if unavailable { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::INTERNAL_SERVER_ERROR };
    Failure(status, format!("{what} `{id}` not done: {error}"))
}

/// Runs admin work that writes to Kafka as a task of its own (tracked, waited for at shutdown).
/// axum drops a handler's future when the client goes away; the task is not dropped with it,
/// so the work finishes or fails as a whole, never half-way. Each write inside is bounded by
/// `admin.produce_timeout_ms`; the answer waits for at most two of them plus a margin.
pub(super) async fn detached<T: Send + 'static>(
    s: &Shared,
    what: &str,
    work: impl Future<Output = Result<T, Failure>> + Send + 'static,
) -> Result<T, Failure> {
    let task = s.admin_tasks.spawn(work);
    let bound = Duration::from_millis(s.config.admin.produce_timeout_ms) * 2 + Duration::from_secs(5);
    match tokio::time::timeout(bound, task).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => Err(internal(format!("{what} failed: {error}"))),
        Err(_) => {
            tracing::warn!(what, "Admin call still waiting for Kafka; answering 503, the work goes on.");
            let m = format!("{what} still waiting for Kafka after {} ms; its outcome will show in the activity log", bound.as_millis());
            Err(Failure(StatusCode::SERVICE_UNAVAILABLE, m))
        }
    }
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
    /// `none`, or the window of a chat bundle (`1h`, `24h`, ...).
    pub aggregation: String,
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

pub(crate) fn view(shared: &Shared, s: &Subscription) -> SubscriptionView {
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
        aggregation: serde_json::to_value(s.aggregation).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
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

pub(super) fn find(shared: &Shared, id: &str) -> Result<Arc<Subscription>, Failure> {
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
#[utoipa::path(get, path = "/api/subscriptions/{id}/requests", params(("id" = String, Path)), responses((status = 200, description = "JSON file: state, activity and requests; a request whose body or response excerpt was cut to `delivery.log_body_max_bytes` says `\"truncated\": true`", body = Object), (status = 404, body = ApiError)), security(("bearer" = [])))]
async fn requests(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Response, Failure> {
    let (disposition, body) = requests_file(&s, &id)?;
    Ok(([(header::CONTENT_TYPE, "application/json".to_string()), (header::CONTENT_DISPOSITION, disposition)], body).into_response())
}

/// The request log download of `id`: its `Content-Disposition` and the JSON document (state,
/// activity and requests; [`crate::endpoint::export_json`]). Shared with the customer portal.
pub(crate) fn requests_file(s: &Shared, id: &str) -> Result<(String, Vec<u8>), Failure> {
    find(s, id)?;
    let state = s.endpoints.state(id).map_err(internal)?;
    let activity = s.endpoints.activity(id).map_err(internal)?;
    let requests = s.endpoints.requests(id).map_err(internal)?;
    let body = crate::endpoint::export_json(id, &state, &activity, &requests);
    let disposition = format!(
        "attachment; filename=\"hookd-{}-requests.json\"",
        id.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_")
    );
    Ok((disposition, body))
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

/// Enable a subscription (resets its failure count); parked deliveries resume. Enabling an
/// enabled subscription only resets the count.
#[utoipa::path(post, path = "/api/subscriptions/{id}/enable", params(("id" = String, Path)), responses((status = 200, body = Done), (status = 404, body = ApiError), (status = 503, description = "Kafka did not acknowledge within `admin.produce_timeout_ms`; nothing changed", body = ApiError)), security(("bearer" = [])))]
async fn enable(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Done>, Failure> {
    enable_subscription(&s, &id).await.map(Json)
}

/// Enables `id` through Kafka ([`lifecycle::enable`], in a task of its own). Shared by the
/// admin API and the customer portal.
pub(crate) async fn enable_subscription(s: &Arc<Shared>, id: &str) -> Result<Done, Failure> {
    find(s, id)?;
    let (shared, sub) = (s.clone(), id.to_string());
    detached(s, "enable", async move { lifecycle::enable(&shared, &sub, Via::Admin).await.map_err(|e| not_written("enable", &sub, e)) })
        .await?;
    let now = find(s, id)?;
    Ok(Done { subscription: id.to_string(), state: view(s, &now).state, replayed: None })
}

/// Body of disable.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableRequest {
    /// Shown as `disabled_reason`; default "disabled by an operator".
    pub reason: Option<String>,
}

/// Disable a subscription: it receives nothing; its pending retries are parked, not lost.
/// Disabling a disabled subscription changes nothing and sends no second notice.
#[utoipa::path(post, path = "/api/subscriptions/{id}/disable", params(("id" = String, Path)), request_body(content = DisableRequest, description = "optional"), responses((status = 200, body = Done), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 503, description = "Kafka did not acknowledge within `admin.produce_timeout_ms`; nothing changed", body = ApiError)), security(("bearer" = [])))]
async fn disable(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<Done>, Failure> {
    find(&s, &id)?;
    let req: DisableRequest = if body.is_empty() { DisableRequest::default() } else { parse(&body)? };
    let reason = req.reason.unwrap_or_else(|| "disabled by an operator".into());
    disable_subscription(&s, &id, reason).await.map(Json)
}

/// Disables `id` through Kafka with `reason` ([`lifecycle::disable`], cause `operator`, in a
/// task of its own). Shared by the admin API and the customer portal.
pub(crate) async fn disable_subscription(s: &Arc<Shared>, id: &str, reason: String) -> Result<Done, Failure> {
    find(s, id)?;
    let (shared, sub) = (s.clone(), id.to_string());
    detached(s, "disable", async move {
        lifecycle::disable(&shared, &sub, &reason, DisableCause::Operator, Via::Admin).await.map_err(|e| not_written("disable", &sub, e))
    })
    .await?;
    let now = find(s, id)?;
    Ok(Done { subscription: id.to_string(), state: view(s, &now).state, replayed: None })
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(body).map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hookd admin API", description = "Subscriptions, their state and logs, enable, disable, replay; links to the customer portal."),
    paths(list, get_one, activity, requests, enable, disable, replay::replay, crate::portal::issue::portal_link),
    components(schemas(SubscriptionView, ApiError, Done, DisableRequest, ReplayRequest, crate::portal::issue::PortalLink)),
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
        503 => "unavailable",
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
        .route("/api/subscriptions/{id}/replay", post(replay::replay))
        .route("/api/tenants/{tenant}/portal-link", post(crate::portal::issue::portal_link))
        .route_layer(middleware::from_fn_with_state(shared, auth));
    api.route("/openapi.json", get(openapi))
}
