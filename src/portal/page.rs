//! The portal's pages: minijinja templates (`templates/`, compiled into the binary) with HTML
//! auto-escaping for every value, and the models they show. Nothing here is trusted markup:
//! subscription ids, URLs, events, reasons, log entries and bodies are all escaped.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use crate::admin::api::SubscriptionView;
use crate::endpoint::{clip_to, Activity, RequestLog};
use crate::route::subscription::Aggregation;

/// Request bodies longer than this are cut on the request log page (the JSON download has them whole).
pub const BODY_SHOWN_BYTES: usize = 4096;

const TEMPLATES: [(&str, &str); 4] = [
    ("base.html", include_str!("templates/base.html")),
    ("page.html", include_str!("templates/page.html")),
    ("requests.html", include_str!("templates/requests.html")),
    ("refused.html", include_str!("templates/refused.html")),
];

/// The portal's style sheet, served at `/portal/assets/portal.css`.
pub const CSS: &str = include_str!("templates/portal.css");

/// The templates, every one HTML-escaped whatever its name; an undefined value is an error.
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    for (name, source) in TEMPLATES {
        env.add_template(name, source).unwrap_or_else(|e| panic!("portal template {name}: {e:#}"));
    }
    env
}

/// What every page shows around its content.
#[derive(Debug, Clone, Serialize)]
pub struct Frame {
    pub tenant: String,
    /// When the link stops working, readable.
    pub expires_at: String,
    /// The path of the tenant's main page (`…/portal/<token>`).
    pub home: String,
    pub css: String,
    pub csrf: String,
}

/// Where a subscription's buttons and links go.
#[derive(Debug, Clone, Serialize)]
pub struct Links {
    pub enable: String,
    pub disable: String,
    pub replay: String,
    pub requests: String,
    pub download: String,
}

/// One subscription's card on the main page.
#[derive(Debug, Serialize)]
pub struct Card {
    #[serde(flatten)]
    pub view: SubscriptionView,
    /// Why it is disabled or unverified.
    pub reason: Option<String>,
    pub activity: Vec<ActivityRow>,
    pub links: Links,
}

#[derive(Debug, Serialize)]
pub struct ActivityRow {
    pub at: String,
    pub action: String,
    pub delivery_id: Option<String>,
    pub attempt: Option<u32>,
    pub detail: Option<String>,
}

impl From<&Activity> for ActivityRow {
    fn from(a: &Activity) -> Self {
        let action = serde_json::to_value(a.action).ok().and_then(|v| v.as_str().map(|s| s.replace('_', " "))).unwrap_or_default();
        Self { at: when(a.at_ms), action, delivery_id: a.delivery_id.clone(), attempt: a.attempt, detail: a.detail.clone() }
    }
}

/// One request of the request log page; the body cut to [`BODY_SHOWN_BYTES`].
#[derive(Debug, Serialize)]
pub struct RequestRow {
    pub at: String,
    #[serde(flatten)]
    pub log: RequestLog,
    pub body_clipped: bool,
}

impl From<RequestLog> for RequestRow {
    fn from(mut log: RequestLog) -> Self {
        let body_clipped = log.request_body.len() > BODY_SHOWN_BYTES;
        log.request_body = clip_to(&log.request_body, BODY_SHOWN_BYTES);
        Self { at: when(log.at_ms), log, body_clipped }
    }
}

/// Why a card's subscription is not active, from its view.
pub fn reason(view: &SubscriptionView) -> Option<String> {
    match view.state.as_str() {
        "disabled" => Some(view.disabled_reason.clone().unwrap_or_else(|| "disabled".into())),
        "unverified" => {
            let error = view.verification.as_ref().and_then(|v| v["error"].as_str().map(String::from));
            Some(format!("waiting for the verification handshake: {}", error.unwrap_or_else(|| "not answered yet".into())))
        }
        _ => None,
    }
}

/// A subscription's aggregation as the customer chose it: `none`, `24h`, `30min`, `10s`.
pub fn aggregation(a: Aggregation) -> String {
    match a {
        Aggregation::None => "none (each event at once)".into(),
        Aggregation::Every(d) => {
            let s = d.as_secs();
            let every = if s % 3600 == 0 {
                format!("{}h", s / 3600)
            } else if s % 60 == 0 {
                format!("{}min", s / 60)
            } else {
                format!("{s}s")
            };
            format!("one bundle per chat every {every}")
        }
    }
}

/// A millisecond timestamp as `2026-12-01 10:00:00 UTC`.
pub fn when(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()
}

/// An RFC 3339 time (as the admin view has them) as `2026-12-01 10:00:00 UTC`.
pub fn when_rfc3339(at: &Option<String>) -> Option<String> {
    at.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| when(t.timestamp_millis()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Frame {
        Frame {
            tenant: "<b>t</b>".into(),
            expires_at: "soon".into(),
            home: "/portal/x".into(),
            css: "/portal/assets/portal.css".into(),
            csrf: "\"><script>alert(1)</script>".into(),
        }
    }

    #[test]
    fn every_template_renders_and_escapes() {
        let env = environment();
        let html = env
            .get_template("refused.html")
            .unwrap()
            .render(minijinja::context! { title => "No", message => "<img src=x onerror=alert(1)>", home => "", ..minijinja::Value::from_serialize(frame()) })
            .unwrap();
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;") && !html.contains("<img"), "{html}");
        assert!(html.contains("&lt;b&gt;t&lt;&#x2f;b&gt;") && html.contains(r#"<meta name="viewport""#), "{html}");
        let none: Vec<Card> = Vec::new();
        let page = env
            .get_template("page.html")
            .unwrap()
            .render(minijinja::context! { subscriptions => none, notice => "", since_default => "", ..minijinja::Value::from_serialize(frame()) })
            .unwrap();
        assert!(page.contains("No webhooks are set up"), "{page}");
        let rows: Vec<RequestRow> = Vec::new();
        let ctx = minijinja::context! { sub => "s", requests => rows, download => "d", body_limit => BODY_SHOWN_BYTES, ..minijinja::Value::from_serialize(frame()) };
        assert!(env.get_template("requests.html").unwrap().render(ctx).unwrap().contains("No requests yet."));
    }

    #[test]
    fn long_bodies_are_cut_for_the_page() {
        let log = RequestLog {
            at_ms: 0,
            delivery_id: "d".into(),
            attempt: 1,
            method: "POST".into(),
            url: "u".into(),
            request_headers: vec![],
            request_body: "é".repeat(BODY_SHOWN_BYTES),
            status: None,
            response_headers: vec![],
            response_body_excerpt: String::new(),
            truncated: false,
            duration_ms: 1,
            error: None,
        };
        let row = RequestRow::from(log);
        assert!(row.body_clipped && row.log.request_body.len() <= BODY_SHOWN_BYTES + 3);
        assert_eq!(row.at, "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn aggregation_reads_as_chosen() {
        let every = |s| aggregation(Aggregation::Every(std::time::Duration::from_secs(s)));
        assert_eq!(
            (every(86_400), every(1800), every(10)),
            ("one bundle per chat every 24h".into(), "one bundle per chat every 30min".into(), "one bundle per chat every 10s".into())
        );
        assert!(aggregation(Aggregation::None).starts_with("none"));
    }
}
