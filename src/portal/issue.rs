//! `POST /api/tenants/{tenant}/portal-link`: the admin API call that signs a portal link.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::link;
use crate::admin::api::Failure;
use crate::Shared;

/// A signed link to one tenant's portal page.
#[derive(Debug, Serialize, ToSchema)]
pub struct PortalLink {
    pub tenant: String,
    /// The page; hand it to the customer. Anyone holding it sees and changes the tenant's
    /// webhooks until it expires.
    pub url: String,
    /// When the link stops working (RFC 3339), `portal.link_expiry_secs` from now.
    pub expires_at: String,
    /// How many subscriptions the tenant has now (0 for a tenant hookd does not know yet).
    pub subscriptions: usize,
}

/// Sign a link to a tenant's customer portal page, valid for `portal.link_expiry_secs`.
#[utoipa::path(post, path = "/api/tenants/{tenant}/portal-link", params(("tenant" = String, Path)), responses((status = 200, body = PortalLink), (status = 401, body = crate::admin::api::ApiError), (status = 404, description = "the portal is off: `portal.secret` is not set", body = crate::admin::api::ApiError)), security(("bearer" = [])))]
pub async fn portal_link(
    State(s): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    headers: HeaderMap,
) -> Result<Json<PortalLink>, Failure> {
    let config = &s.config.portal;
    if !config.enabled() {
        tracing::warn!(tenant, "Portal link asked for while the portal is off.");
        return Err(Failure::new(StatusCode::NOT_FOUND, "the customer portal is off: set portal.secret".into()));
    }
    let expires_at = chrono::Utc::now().timestamp().saturating_add(config.link_expiry_secs as i64);
    let token = link::sign(config.secret.as_bytes(), &tenant, expires_at);
    let base = match config.public_url.trim_end_matches('/') {
        "" => format!("http://{}", host(&headers).unwrap_or_else(|| s.config.admin.listen.to_string())),
        public => public.to_string(),
    };
    let subscriptions = s.registry.index().all().filter(|sub| sub.tenant == tenant).count();
    tracing::info!(tenant, subscriptions, "Portal link signed.");
    Ok(Json(PortalLink { url: format!("{base}/portal/{token}"), expires_at: link::rfc3339(expires_at), tenant, subscriptions }))
}

/// The request's `Host`, if it is a plain host[:port].
fn host(headers: &HeaderMap) -> Option<String> {
    let h = headers.get(header::HOST)?.to_str().ok()?;
    let plain = !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c));
    plain.then(|| h.to_string())
}
