//! The customer portal: each tenant's own page of its webhooks, served by hookd on
//! `admin.listen` under `/portal/`, server-rendered (minijinja), no scripts.
//!
//! An operator asks for a link with `POST /api/tenants/{tenant}/portal-link` (admin token;
//! [`issue`]) and hands it to the customer. The page shows that tenant's subscriptions (URL,
//! events, aggregation, state and why, failures in a row, activity log, request log to view
//! and download as JSON) with buttons to enable, disable and replay failed deliveries since a
//! time. The work behind the buttons is the admin API's, not a second copy of it.
//!
//! What it guarantees:
//! - A link is an HMAC-SHA256 signature with `portal.secret` over the tenant and an expiry
//!   (`portal.link_expiry_secs`, default 1 h) ([`link`]). An expired link, one changed in any
//!   character, or one signed with another secret gets 401 and shows nothing.
//! - A link shows and changes only its tenant's subscriptions: every route looks the
//!   subscription up by id and answers 404 when it is another tenant's (as for none at all).
//! - State changes are POSTs that must carry the page's CSRF token (derived from the link)
//!   and come from the portal's own origin ([`guard`]); otherwise 403 and nothing changes.
//!   GETs change nothing.
//! - Everything shown is HTML-escaped (auto-escaping of every template, [`page`]), and the
//!   pages forbid scripts and framing (Content-Security-Policy) and send no referrer (which
//!   holds the link) to any other origin (`Referrer-Policy: same-origin`; `no-referrer` would
//!   make browsers send `Origin: null` with the forms, which the origin check refuses).
//!
//! Served only when `portal.secret` is set. Requests are counted in
//! `hookd_portal_requests_total{outcome}`; refusals and failures are logged.

mod config;
mod error;
pub mod guard;
mod handlers;
pub mod issue;
pub mod link;
mod page;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use minijinja::Environment;

pub use config::PortalConfig;
pub use error::PortalError;

use crate::Shared;

/// What the portal's routes share.
pub struct Portal {
    shared: Arc<Shared>,
    /// The compiled templates.
    env: Environment<'static>,
    /// `portal.secret`: the key of links and CSRF tokens.
    secret: Vec<u8>,
    /// The path of `portal.public_url` (`""` or e.g. `/hooks`), before every link of a page.
    prefix: String,
    /// `portal.public_url`'s origin, the one a form post must come from; None: the `Host`'s.
    origin: Option<String>,
}

/// The path part of a public URL, without the trailing slash.
fn prefix(public_url: &str) -> String {
    url::Url::parse(public_url).map(|u| u.path().trim_end_matches('/').to_string()).unwrap_or_default()
}

/// The portal's routes (none when `portal.secret` is empty), to merge into the admin router.
pub fn routes<S: Clone + Send + Sync + 'static>(shared: Arc<Shared>) -> Router<S> {
    let config = &shared.config.portal;
    if !config.enabled() {
        return Router::new();
    }
    let portal = Arc::new(Portal {
        env: page::environment(),
        secret: config.secret.as_bytes().to_vec(),
        prefix: prefix(&config.public_url),
        origin: config.public_origin(),
        shared: shared.clone(),
    });
    Router::new()
        .route("/portal/assets/portal.css", get(handlers::css))
        .route("/portal/{token}", get(handlers::home))
        .route("/portal/{token}/subscriptions/{id}/requests", get(handlers::requests))
        .route("/portal/{token}/subscriptions/{id}/requests.json", get(handlers::download))
        .route("/portal/{token}/subscriptions/{id}/enable", post(handlers::enable))
        .route("/portal/{token}/subscriptions/{id}/disable", post(handlers::disable))
        .route("/portal/{token}/subscriptions/{id}/replay", post(handlers::replay))
        .layer(middleware::from_fn_with_state(portal.clone(), harden))
        .with_state(portal)
}

/// Sets the portal's security headers on every answer and counts it by outcome.
async fn harden(State(p): State<Arc<Portal>>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let csp = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    let outcome = match resp.status().as_u16() {
        200..=399 => "ok",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        503 => "unavailable",
        _ => "error",
    };
    p.shared.metrics.portal_requests.with_label_values(&[outcome]).inc();
    resp
}
