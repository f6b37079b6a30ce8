//! The customer portal on the mock cluster with a real receiver: signed links that expire,
//! tenants kept apart, forged posts refused, everything escaped, and enable, disable, replay
//! and the request log doing what the admin API does.

mod common;

use std::time::Duration;

use base64::Engine;
use common::portal::{Page, Portal, SECRET, SECTION};
use common::receiver::{Mode, Receiver};
use common::*;
use hookd::portal::link;
use serde_json::json;

/// Two subscriptions of tenant `acme`, one of `other`.
fn subs(rx: &Receiver) -> String {
    format!(
        "[[subscription]]\nid = \"a1\"\ntenant = \"acme\"\nurl = \"{}\"\nevents = [\"contact.*\"]\nretry = {{ max_attempts = 1 }}\n\
         [[subscription]]\nid = \"a2\"\ntenant = \"acme\"\nurl = \"{}\"\n\
         [[subscription]]\nid = \"b1\"\ntenant = \"other\"\nurl = \"{}\"\n{SECTION}",
        rx.url("/acme-one"),
        rx.url("/acme-two"),
        rx.url("/other-secret-path"),
    )
}

async fn daemon(rx: &Receiver, brokers: &str, state: &std::path::Path) -> (hookd::Running, tokio_util::sync::CancellationToken) {
    let mut cfg = config(brokers, state, &subs(rx));
    cfg.admin.produce_timeout_ms = 2000;
    start_daemon(cfg).await
}

/// Refused with `status`, showing no subscription (the error page names only what was asked for).
fn is_denied(page: &Page, status: u16) -> bool {
    page.status == status && !page.body.contains("data-sub") && !page.body.contains("acme-one") && !page.body.contains("<form")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_shows_only_its_tenant_and_expired_or_tampered_links_get_401() {
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let (daemon, stop) = daemon(&rx, &brokers, state.path()).await;
    let portal = Portal::new(&daemon);
    let api = common::api::Api::new(&daemon);
    let (status, _, _) = api.call("POST", "/api/tenants/acme/portal-link", None, None).await;
    assert_eq!(status, 401, "a link needs the operator's token");
    let v = api.post("/api/tenants/acme/portal-link", None).await;
    let expires = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap().timestamp();
    let in_secs = expires - chrono::Utc::now().timestamp();
    assert!((3590..=3600).contains(&in_secs), "default expiry 1 h: {v}");
    assert_eq!((v["tenant"].as_str(), v["subscriptions"].as_u64()), (Some("acme"), Some(2)), "{v}");

    let link = portal.link("acme").await;
    let page = portal.get(&link).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("data-sub=\"a1\"") && page.body.contains("data-sub=\"a2\"") && page.body.contains("acme-one"));
    // `data-sub="b1"`, not "b1": the page's link carries a random signature that may hold "b1".
    assert!(!page.body.contains("data-sub=\"b1\"") && !page.body.contains("other-secret-path"), "another tenant's subscription shown");
    assert!(page.body.contains(r#"<meta name="viewport" content="width=device-width, initial-scale=1">"#));
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'") && !csp.contains("script-src"), "{csp}");
    assert_eq!(page.headers["referrer-policy"], "same-origin");

    let token = link.strip_prefix("/portal/").unwrap();
    let now = chrono::Utc::now().timestamp();
    let expired = link::sign(SECRET.as_bytes(), "acme", now - 1);
    let other_key = link::sign(b"another secret of the same length.....", "acme", now + 3600);
    let b64 = |t: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t);
    let retargeted = token.replace(&b64("acme"), &b64("other"));
    let (head, mac) = token.rsplit_once('.').unwrap();
    let (signed, _) = head.rsplit_once('.').unwrap();
    let prolonged = format!("{signed}.{}.{mac}", now + 86_400 * 365);
    for bad in [expired, other_key, retargeted, prolonged, format!("{token}x"), "v1.garbage".into()] {
        let page = portal.get(&format!("/portal/{bad}")).await;
        assert!(is_denied(&page, 401), "{bad}: {} {}", page.status, page.body);
        let page = portal.get(&format!("/portal/{bad}/subscriptions/a1/requests.json")).await;
        assert!(is_denied(&page, 401), "{bad}: {}", page.status);
    }
    assert!(portal.get(&format!("/portal/{}", link::sign(SECRET.as_bytes(), "acme", now - 1))).await.body.contains("expired"));
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_portal_requests_total{outcome=\"unauthorized\"} 13"), "{m}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_never_shows_or_changes_another_tenants_subscription() {
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let (daemon, stop) = daemon(&rx, &brokers, state.path()).await;
    let portal = Portal::new(&daemon);
    let other = portal.link("other").await;
    let csrf = portal.get(&other).await.csrf();
    for path in ["requests", "requests.json"] {
        let page = portal.get(&format!("{other}/subscriptions/a1/{path}")).await;
        assert!(is_denied(&page, 404), "{path}: {} {}", page.status, page.body);
    }
    for action in ["disable", "enable", "replay"] {
        let form = [("csrf", csrf.as_str()), ("since", "2020-01-01T00:00")];
        let page = portal.post(&format!("{other}/subscriptions/a1/{action}"), &form).await;
        assert!(is_denied(&page, 404), "{action}: {} {}", page.status, page.body);
    }
    assert_eq!(portal.api_state("a1").await.0, "active", "another tenant's link changed nothing");
    // Its own subscription, with the same token and CSRF: done.
    let page = portal.post(&format!("{other}/subscriptions/b1/disable"), &[("csrf", &csrf)]).await;
    assert_eq!((page.status, page.location.as_deref()), (303, Some(&*format!("{other}?done=disabled&sub=b1"))), "{}", page.body);
    assert_eq!(portal.api_state("b1").await.0, "disabled");
    assert_eq!(portal.api_state("a1").await.0, "active");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_posts_are_refused_and_change_nothing() {
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let (daemon, stop) = daemon(&rx, &brokers, state.path()).await;
    let portal = Portal::new(&daemon);
    let link = portal.link("acme").await;
    let csrf = portal.get(&link).await.csrf();
    let other_csrf = portal.get(&portal.link("other").await).await.csrf();
    let disable = format!("{link}/subscriptions/a1/disable");
    let browser = [("origin", portal.base.as_str()), ("sec-fetch-site", "same-origin")];
    let refused: Vec<(&str, Vec<(&str, &str)>, Vec<(&str, &str)>)> = vec![
        ("no token", vec![], browser.to_vec()),
        ("empty token", vec![("csrf", "")], browser.to_vec()),
        ("wrong token", vec![("csrf", "bm90IHRoZSB0b2tlbg")], browser.to_vec()),
        ("another link's token", vec![("csrf", &other_csrf)], browser.to_vec()),
        ("another origin", vec![("csrf", &csrf)], vec![("origin", "http://evil.example")]),
        ("another site", vec![("csrf", &csrf)], vec![("sec-fetch-site", "cross-site")]),
        ("an opaque origin", vec![("csrf", &csrf)], vec![("origin", "null")]),
    ];
    for (what, form, headers) in &refused {
        let page = portal.post_with(&disable, form, headers).await;
        assert_eq!(page.status, 403, "{what}: {}", page.body);
        assert!(page.body.contains("refused"), "{what}: {}", page.body);
    }
    assert_eq!(portal.get(&disable).await.status, 405, "a GET changes nothing");
    assert_eq!(portal.api_state("a1").await.0, "active", "no refused request disabled it");

    let page = portal.post(&disable, &[("csrf", &csrf)]).await;
    assert_eq!(page.status, 303, "{}", page.body);
    let (state, v) = portal.api_state("a1").await;
    assert_eq!((state.as_str(), v["disabled_reason"].as_str()), ("disabled", Some("disabled by the customer in the portal")));
    let shown = portal.get(page.location.as_deref().unwrap()).await;
    assert!(shown.body.contains("a1 is disabled") && shown.body.contains("data-state=\"disabled\""), "{}", shown.body);
    let page = portal.post(&format!("{link}/subscriptions/a1/enable"), &[("csrf", &csrf)]).await;
    assert_eq!(page.status, 303, "{}", page.body);
    assert_eq!(portal.api_state("a1").await.0, "active");
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_portal_requests_total{outcome=\"forbidden\"} 7"), "{m}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_shown_is_escaped() {
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    rx.set_mode(Mode::Body(500, b"<script>alert('response')</script>".to_vec()));
    let subs = format!(
        "[[subscription]]\nid = \"x<i>&\\\"1\"\ntenant = \"<b>acme</b>\"\nurl = \"{}\"\nevents = [\"<script>alert('e')</script>\"]\n\
         retry = {{ max_attempts = 1 }}\n{SECTION}",
        rx.url("/esc")
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let api = common::api::Api::new(&daemon);
    let p = producer(&brokers);
    let event = crm_event("e1", "<b>acme</b>", "<script>alert('e')</script>", json!({"contact": {"name": "<img src=x onerror=alert(1)>"}}));
    produce(&p, "crm.events", "t", Some(&event)).await;
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the failed request logged", || {
        let _ = shared.endpoints.flush_logs();
        let n = shared.endpoints.requests("x<i>&\"1").unwrap().len();
        async move { n == 1 }
    })
    .await;
    api.post("/api/subscriptions/x%3Ci%3E%26%221/disable", Some(json!({"reason": "<img src=x onerror=alert('reason')>"}))).await;

    let portal = Portal::new(&daemon);
    let link = portal.link("%3Cb%3Eacme%3C%2Fb%3E").await;
    let page = portal.get(&link).await;
    let requests = portal.get(&format!("{link}/subscriptions/x%3Ci%3E%26%221/requests")).await;
    assert_eq!((page.status, requests.status), (200, 200), "{}\n{}", page.body, requests.body);
    for (name, html) in [("page", &page.body), ("request log", &requests.body)] {
        for raw in ["<script", "<img", "<b>", "<i>"] {
            assert!(!html.contains(raw), "{name} has raw `{raw}`:\n{html}");
        }
        assert!(html.contains("&lt;b&gt;acme&lt;&#x2f;b&gt;"), "{name}: the tenant escaped:\n{html}");
        assert!(html.contains("x&lt;i&gt;&amp;&quot;1"), "{name}: the id escaped:\n{html}");
    }
    assert!(page.body.contains("&lt;script&gt;alert(&#x27;e&#x27;)&lt;&#x2f;script&gt;"), "events escaped:\n{}", page.body);
    assert!(page.body.contains("&lt;img src=x onerror=alert(&#x27;reason&#x27;)&gt;"), "reason escaped:\n{}", page.body);
    assert!(requests.body.contains("&lt;script&gt;alert(&#x27;response&#x27;)"), "response escaped:\n{}", requests.body);
    assert!(requests.body.contains("&lt;img src=x onerror=alert(1)&gt;"), "request body escaped:\n{}", requests.body);
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_the_request_log_work_from_the_portal() {
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    rx.set_mode(Mode::Status(500));
    let (daemon, stop) = daemon(&rx, &brokers, state.path()).await;
    let p = producer(&brokers);
    for i in 0..2 {
        produce(&p, "crm.events", "acme", Some(&crm_event(&format!("e{i}"), "acme", "contact.created", json!({"contact": {"i": i}}))))
            .await;
    }
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "two failed deliveries kept", || {
        let n = shared.endpoints.failed_since("a1", i64::MIN).unwrap().len();
        async move { n == 2 }
    })
    .await;
    let portal = Portal::new(&daemon);
    let link = portal.link("acme").await;
    let page = portal.get(&link).await;
    let csrf = page.csrf();
    assert!(page.body.contains("name=\"since\""), "{}", page.body);
    let download = portal.get(&format!("{link}/subscriptions/a1/requests.json")).await;
    assert_eq!(download.status, 200, "{}", download.body);
    assert_eq!(download.headers["content-disposition"], "attachment; filename=\"hookd-a1-requests.json\"");
    let doc: serde_json::Value = serde_json::from_str(&download.body).unwrap();
    assert_eq!((doc["subscription"].as_str(), doc["state"]["consecutive_failures"].as_u64()), (Some("a1"), Some(2)), "{doc}");
    let log = portal.get(&format!("{link}/subscriptions/a1/requests")).await;
    assert_eq!(log.status, 200);
    assert_eq!(log.body.matches("<details class=\"request\">").count(), 2, "{}", log.body);
    assert!(log.body.contains("HTTP 500") && log.body.contains("requests.json"), "{}", log.body);

    let bad = portal.post(&format!("{link}/subscriptions/a1/replay"), &[("csrf", &csrf), ("since", "yesterday")]).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    rx.set_mode(Mode::Status(200));
    let before = rx.requests().len();
    let done = portal.post(&format!("{link}/subscriptions/a1/replay"), &[("csrf", &csrf), ("since", "2020-01-01T00:00")]).await;
    assert_eq!((done.status, done.location.as_deref()), (303, Some(&*format!("{link}?done=replayed&sub=a1&n=2"))), "{}", done.body);
    wait_until(Duration::from_secs(30), "both replays delivered", || {
        let n = rx.requests()[before..].iter().filter(|r| r.path == "/acme-one").count();
        async move { n == 2 }
    })
    .await;
    let shown = portal.get(done.location.as_deref().unwrap()).await;
    assert!(shown.body.contains("2 failed deliveries of a1 queued again."), "{}", shown.body);
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_the_portal_is_off() {
    let (_mock, brokers) = mock_broker();
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), "")).await;
    let api = common::api::Api::new(&daemon);
    let (status, v, _) = api.call("POST", "/api/tenants/acme/portal-link", None, Some(common::api::TOKEN)).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"].as_str().unwrap().contains("portal.secret"), "{v}");
    let token = link::sign(SECRET.as_bytes(), "acme", chrono::Utc::now().timestamp() + 60);
    let page = Portal::new(&daemon).get(&format!("/portal/{token}")).await;
    assert_eq!(page.status, 404);
    stop.cancel();
    daemon.wait().await.unwrap();
}
