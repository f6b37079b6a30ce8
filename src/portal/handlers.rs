//! The portal's routes: the tenant's page, a subscription's request log (page and JSON
//! file), and the enable, disable and replay forms. Every route checks the link first (401),
//! a form's origin and CSRF token next (403), then that the subscription is the link's
//! tenant's (404); the work itself is the admin API's ([`crate::admin::api`]).

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::error::PortalError;
use super::guard::{self, Form};
use super::link::{self, Claims};
use super::page::{self, ActivityRow, Card, Frame, Links, RequestRow};
use super::Portal;
use crate::admin::api::{self as admin, view};
use crate::admin::replay::{replay_subscription, ReplayRequest};
use crate::route::subscription::Subscription;

type Answer = Result<Response, PortalError>;

/// What the page says after a change (`?done=..&sub=..&n=..`, set by the redirect).
#[derive(Debug, Default, Deserialize)]
pub(super) struct NoticeQuery {
    done: Option<String>,
    sub: Option<String>,
    n: Option<String>,
}

impl Portal {
    fn claims(&self, token: &str) -> Result<Claims, PortalError> {
        Ok(link::verify(&self.secret, token, chrono::Utc::now().timestamp())?)
    }

    fn frame(&self, token: &str, claims: &Claims) -> Frame {
        Frame {
            tenant: claims.tenant.clone(),
            expires_at: link::rfc3339(claims.expires_at).replace('T', " ").replace('Z', " UTC"),
            home: format!("{}/portal/{token}", self.prefix),
            css: format!("{}/portal/assets/portal.css", self.prefix),
            csrf: link::csrf_token(&self.secret, token),
        }
    }

    /// The subscription `id` if it is `tenant`'s; another tenant's is "not found" too.
    fn owned(&self, tenant: &str, id: &str) -> Result<Arc<Subscription>, PortalError> {
        let index = self.shared.registry.index();
        index.get(id).filter(|s| s.tenant == tenant).cloned().ok_or_else(|| PortalError::NotFound(id.to_string()))
    }

    fn render(&self, name: &str, ctx: minijinja::Value) -> Answer {
        Ok(Html(self.env.get_template(name)?.render(ctx)?).into_response())
    }

    /// The error page (with a way back when the link itself was good); logged here.
    fn refuse(&self, error: PortalError, frame: Option<&Frame>) -> Response {
        let status = error.status();
        if status.is_server_error() {
            tracing::error!(%error, status = status.as_u16(), "Portal request failed.");
        } else {
            tracing::warn!(%error, status = status.as_u16(), "Portal request refused.");
        }
        let frame = frame.cloned().unwrap_or_else(|| Frame {
            tenant: String::new(),
            expires_at: String::new(),
            home: String::new(),
            css: format!("{}/portal/assets/portal.css", self.prefix),
            csrf: String::new(),
        });
        let ctx = minijinja::context! { title => error.title(), message => error.message(), ..minijinja::Value::from_serialize(&frame) };
        match self.render("refused.html", ctx) {
            Ok(page) => (status, page).into_response(),
            Err(e) => {
                (status, format!("{}: {}\n(and the error page did not render: {e})\n", error.title(), error.message())).into_response()
            }
        }
    }

    fn links(&self, frame: &Frame, id: &str) -> Links {
        let base = format!("{}/subscriptions/{}", frame.home, segment(id));
        Links {
            enable: format!("{base}/enable"),
            disable: format!("{base}/disable"),
            replay: format!("{base}/replay"),
            requests: format!("{base}/requests"),
            download: format!("{base}/requests.json"),
        }
    }

    /// A form post: its origin and CSRF token checked.
    fn form(&self, token: &str, headers: &HeaderMap, body: &[u8]) -> Result<Form, PortalError> {
        let form = Form::parse(body);
        guard::check(&self.secret, token, self.origin.as_deref(), headers, &form)?;
        Ok(form)
    }

    /// After a change: back to the page, which says what was done (Post/Redirect/Get).
    fn back(&self, frame: &Frame, done: &str, id: &str, n: Option<usize>) -> Response {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("done", done).append_pair("sub", id);
        if let Some(n) = n {
            q.append_pair("n", &n.to_string());
        }
        Redirect::to(&format!("{}?{}", frame.home, q.finish())).into_response()
    }
}

/// `s` as one percent-encoded path segment.
fn segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

/// Checks the link, then runs `work` with its frame; any error becomes the error page.
async fn with_link<F, Fut>(p: Arc<Portal>, token: String, work: F) -> Response
where
    F: FnOnce(Arc<Portal>, Frame, Claims) -> Fut,
    Fut: Future<Output = Answer>,
{
    let claims = match p.claims(&token) {
        Ok(c) => c,
        Err(e) => return p.refuse(e, None),
    };
    let frame = p.frame(&token, &claims);
    match work(p.clone(), frame.clone(), claims).await {
        Ok(r) => r,
        Err(e) => p.refuse(e, Some(&frame)),
    }
}

pub(super) async fn home(State(p): State<Arc<Portal>>, Path(token): Path<String>, Query(q): Query<NoticeQuery>) -> Response {
    with_link(p, token, |p, frame, claims| async move { main_page(&p, &frame, &claims.tenant, &q) }).await
}

fn main_page(p: &Portal, frame: &Frame, tenant: &str, q: &NoticeQuery) -> Answer {
    let index = p.shared.registry.index();
    let mut subs: Vec<&Arc<Subscription>> = index.all().filter(|s| s.tenant == tenant).collect();
    subs.sort_by(|a, b| a.id.cmp(&b.id));
    let cards = subs.iter().map(|s| card(p, frame, s)).collect::<Result<Vec<Card>, _>>()?;
    let notice = q.sub.as_deref().filter(|id| subs.iter().any(|s| s.id == *id)).and_then(|id| notice(q, id));
    let since_default = (chrono::Utc::now() - chrono::Duration::hours(24)).format("%Y-%m-%dT%H:%M").to_string();
    let ctx = minijinja::context! { subscriptions => cards, notice, since_default, ..minijinja::Value::from_serialize(frame) };
    p.render("page.html", ctx)
}

fn card(p: &Portal, frame: &Frame, s: &Subscription) -> Result<Card, PortalError> {
    let mut view = view(&p.shared, s);
    view.last_error_at = page::when_rfc3339(&view.last_error_at);
    view.last_success_at = page::when_rfc3339(&view.last_success_at);
    view.aggregation = page::aggregation(s.aggregation);
    let activity = p.shared.endpoints.activity(&s.id)?.iter().map(ActivityRow::from).collect();
    Ok(Card { reason: page::reason(&view), view, activity, links: p.links(frame, &s.id) })
}

fn notice(q: &NoticeQuery, id: &str) -> Option<String> {
    Some(match q.done.as_deref()? {
        "enabled" => format!("{id} is enabled: deliveries go out again, parked ones within seconds."),
        "disabled" => format!("{id} is disabled: it receives nothing, and what comes meanwhile waits until it is enabled."),
        "replayed" => {
            let n: usize = q.n.as_deref()?.parse().ok()?;
            format!("{n} failed deliveries of {id} queued again.")
        }
        _ => return None,
    })
}

pub(super) async fn requests(State(p): State<Arc<Portal>>, Path((token, id)): Path<(String, String)>) -> Response {
    with_link(p, token, |p, frame, claims| async move {
        p.owned(&claims.tenant, &id)?;
        let rows: Vec<RequestRow> = p.shared.endpoints.requests(&id)?.into_iter().map(RequestRow::from).collect();
        let links = p.links(&frame, &id);
        let ctx = minijinja::context! {
            sub => id, requests => rows, download => links.download, body_limit => page::BODY_SHOWN_BYTES,
            ..minijinja::Value::from_serialize(&frame)
        };
        p.render("requests.html", ctx)
    })
    .await
}

pub(super) async fn download(State(p): State<Arc<Portal>>, Path((token, id)): Path<(String, String)>) -> Response {
    with_link(p, token, |p, _, claims| async move {
        p.owned(&claims.tenant, &id)?;
        let (disposition, body) = admin::requests_file(&p.shared, &id)?;
        Ok(([(header::CONTENT_TYPE, "application/json".to_string()), (header::CONTENT_DISPOSITION, disposition)], body).into_response())
    })
    .await
}

/// Which form was posted.
#[derive(Debug, Clone, Copy)]
enum Change {
    Enable,
    Disable,
    Replay,
}

async fn change(p: Arc<Portal>, token: String, id: String, headers: HeaderMap, body: Bytes, what: Change) -> Response {
    with_link(p, token.clone(), move |p, frame, claims| async move {
        let form = p.form(&token, &headers, &body)?;
        p.owned(&claims.tenant, &id)?;
        match what {
            Change::Enable => admin::enable_subscription(&p.shared, &id).await.map(|_| p.back(&frame, "enabled", &id, None)),
            Change::Disable => {
                let reason = "disabled by the customer in the portal".to_string();
                admin::disable_subscription(&p.shared, &id, reason).await.map(|_| p.back(&frame, "disabled", &id, None))
            }
            Change::Replay => {
                let since = parse_since(form.since.as_deref().unwrap_or(""))?;
                let done = replay_subscription(&p.shared, &id, ReplayRequest { delivery_id: None, since: Some(since) }).await?;
                Ok(p.back(&frame, "replayed", &id, Some(done.replayed.unwrap_or(0))))
            }
        }
        .map_err(PortalError::from)
    })
    .await
}

/// The replay form's time: RFC 3339, or a browser's `datetime-local` value read as UTC.
fn parse_since(text: &str) -> Result<String, PortalError> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.to_rfc3339());
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.and_utc().to_rfc3339())
        .ok_or_else(|| PortalError::BadRequest(format!("`{text}` is not a time; give one as 2026-12-01T09:30 (UTC)")))
}

pub(super) async fn enable(State(p): State<Arc<Portal>>, Path((t, id)): Path<(String, String)>, h: HeaderMap, b: Bytes) -> Response {
    change(p, t, id, h, b, Change::Enable).await
}

pub(super) async fn disable(State(p): State<Arc<Portal>>, Path((t, id)): Path<(String, String)>, h: HeaderMap, b: Bytes) -> Response {
    change(p, t, id, h, b, Change::Disable).await
}

pub(super) async fn replay(State(p): State<Arc<Portal>>, Path((t, id)): Path<(String, String)>, h: HeaderMap, b: Bytes) -> Response {
    change(p, t, id, h, b, Change::Replay).await
}

pub(super) async fn css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], page::CSS).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_rfc3339_and_the_browsers_local_value_as_utc() {
        assert_eq!(parse_since("2026-12-01T09:30").unwrap(), "2026-12-01T09:30:00+00:00");
        assert_eq!(parse_since("2026-12-01T09:30:15").unwrap(), "2026-12-01T09:30:15+00:00");
        assert_eq!(parse_since("2026-12-01T09:30:00+07:00").unwrap(), "2026-12-01T09:30:00+07:00");
        assert!(matches!(parse_since("yesterday"), Err(PortalError::BadRequest(_))));
        assert!(matches!(parse_since(""), Err(PortalError::BadRequest(_))));
    }

    #[test]
    fn ids_become_one_path_segment() {
        assert_eq!(segment("sub_1"), "sub_1");
        assert_eq!(segment("a/b c?d#e"), "a%2Fb%20c%3Fd%23e");
    }

    #[test]
    fn notices_are_fixed_texts() {
        let q = |done: &str, n: Option<&str>| NoticeQuery { done: Some(done.into()), sub: Some("s".into()), n: n.map(String::from) };
        assert!(notice(&q("enabled", None), "s").unwrap().starts_with("s is enabled"));
        assert_eq!(notice(&q("replayed", Some("3")), "s").unwrap(), "3 failed deliveries of s queued again.");
        assert_eq!(notice(&q("replayed", Some("<b>")), "s"), None);
        assert_eq!(notice(&q("<script>", None), "s"), None);
    }
}
