//! Integration tests of the deliver HTTP client against a real local receiver.

mod common;

use std::time::Duration;

use common::receiver::{Mode, Receiver};
use hookd::deliver::http::{Attempt, DeliverError, HttpConfig, HttpSender, OutboundRequest};
use hookd::deliver::signature::sign;
use hookd::deliver::ssrf::TargetPolicy;

const WAIT: Duration = Duration::from_secs(5);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn sender_with(cfg: HttpConfig, allow: &[&str]) -> HttpSender {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    HttpSender::new(cfg, TargetPolicy::new(&allow).unwrap()).unwrap()
}

fn local_sender() -> HttpSender {
    sender_with(HttpConfig::default(), &["127.0.0.0/8"])
}

fn req<'a>(url: &'a str, headers: &'a [(String, String)], body: &'a [u8]) -> OutboundRequest<'a> {
    OutboundRequest { url, headers, body }
}

fn signed_headers(id: &str, body: &[u8], secrets: &str) -> Vec<(String, String)> {
    let ts = chrono::Utc::now().timestamp();
    vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("webhook-id".to_owned(), id.to_owned()),
        ("webhook-timestamp".to_owned(), ts.to_string()),
        ("webhook-signature".to_owned(), sign(Some(secrets), id, ts, body)),
        ("x-api-key".to_owned(), "k".to_owned()),
    ]
}

#[tokio::test]
async fn post_delivers_signed_request_that_standardwebhooks_verifies() {
    let rx = Receiver::start().await;
    let url = rx.url("/hooks/crm?tenant=1260");
    let body = br#"{"type":"contact.created","data":{"name":"Tran"}}"#;
    let headers = signed_headers("msg_1", body, SECRET);

    let attempt = local_sender().post(req(&url, &headers, body)).await;
    assert_eq!(attempt.error, None);
    assert_eq!(attempt.status, Some(200));
    assert_eq!(attempt.body_excerpt, "ok");
    assert!(!attempt.body_truncated);
    assert!(attempt.duration > Duration::ZERO);

    let got = rx.wait_for(1, WAIT).await;
    let r = &got[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/crm"));
    assert_eq!(r.query.as_deref(), Some("tenant=1260"));
    assert_eq!(r.body, body);
    assert_eq!(r.header("x-api-key"), Some("k"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.header("user-agent").unwrap().starts_with("hookd/"));
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    wh.verify(&r.body, &r.header_map()).expect("standardwebhooks verifies our signature");
    let other = standardwebhooks::Webhook::new("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    assert!(other.verify(&r.body, &r.header_map()).is_err(), "a wrong secret must not verify");
}

#[tokio::test]
async fn rotated_secrets_each_verify() {
    let rx = Receiver::start().await;
    let old = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    let body = b"{}";
    let headers = signed_headers("msg_rot", body, &format!("{SECRET} {old}"));
    let url = rx.url("/");
    assert_eq!(local_sender().post(req(&url, &headers, body)).await.status, Some(200));
    let r = &rx.wait_for(1, WAIT).await[0];
    for secret in [SECRET, old] {
        let wh = standardwebhooks::Webhook::new(secret).unwrap();
        wh.verify(&r.body, &r.header_map()).unwrap_or_else(|e| panic!("{secret}: {e}"));
    }
}

#[tokio::test]
async fn private_targets_are_blocked_without_allowlist() {
    let rx = Receiver::start().await;
    let guarded = sender_with(HttpConfig::default(), &[]);

    let literal = guarded.post(req(&rx.url("/x"), &[], b"{}")).await;
    let err = literal.error.expect("literal 127.0.0.1 must be refused");
    assert_eq!(err.kind(), "blocked", "{err}");
    assert!(err.to_string().contains("loopback"), "{err}");
    assert!(!err.is_retriable());

    let named = format!("http://localhost:{}/x", rx.addr.port());
    let err = guarded.post(req(&named, &[], b"{}")).await.error.expect("localhost must be refused");
    assert_eq!(err.kind(), "blocked", "{err}");
    assert!(err.to_string().contains("resolves only to non-public addresses"), "{err}");
    assert!(err.to_string().contains("delivery.allow_private_targets"), "{err}");

    let err = guarded.get_text(&rx.url("/verify")).await.unwrap_err();
    assert_eq!(err.kind(), "blocked");
    assert!(rx.requests().is_empty(), "nothing may reach the receiver");

    let named_ok = local_sender().post(req(&named, &[], b"{}")).await;
    assert_eq!(named_ok.status, Some(200), "{:?}", named_ok.error);
}

#[tokio::test]
async fn stalled_endpoint_times_out() {
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Stall);
    let cfg = HttpConfig { request_timeout: Duration::from_millis(300), ..HttpConfig::default() };
    let attempt = sender_with(cfg, &["127.0.0.0/8"]).post(req(&rx.url("/slow"), &[], b"{}")).await;
    assert_eq!(attempt.error, Some(DeliverError::Timeout));
    assert_eq!(attempt.status, None);
    assert!(attempt.duration >= Duration::from_millis(300), "{:?}", attempt.duration);
    assert!(attempt.duration < Duration::from_secs(5), "{:?}", attempt.duration);
    assert_eq!(rx.wait_for(1, WAIT).await[0].path, "/slow", "the request did arrive");
}

#[tokio::test]
async fn endless_body_is_read_only_up_to_the_limit() {
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Endless);
    let cfg = HttpConfig { max_response_bytes: 1000, request_timeout: Duration::from_secs(10), ..HttpConfig::default() };
    let attempt = sender_with(cfg, &["127.0.0.0/8"]).post(req(&rx.url("/"), &[], b"{}")).await;
    assert_eq!(attempt.error, None);
    assert_eq!(attempt.status, Some(200));
    assert_eq!(attempt.body_excerpt, "x".repeat(1000));
    assert!(attempt.body_truncated);
    assert!(attempt.duration < Duration::from_secs(5), "stopped reading early: {:?}", attempt.duration);
}

#[tokio::test]
async fn body_excerpt_limit_is_exact() {
    let rx = Receiver::start().await;
    let cfg = HttpConfig { max_response_bytes: 10, ..HttpConfig::default() };
    let sender = sender_with(cfg, &["127.0.0.0/8"]);
    rx.set_path_mode("/big", Mode::Body(500, b"0123456789abcdef".to_vec()));
    rx.set_path_mode("/fits", Mode::Body(200, b"0123456789".to_vec()));

    let big = sender.post(req(&rx.url("/big"), &[], b"")).await;
    assert_eq!((big.status, big.body_excerpt.as_str(), big.body_truncated), (Some(500), "0123456789", true));
    let fits = sender.post(req(&rx.url("/fits"), &[], b"")).await;
    assert_eq!((fits.status, fits.body_excerpt.as_str(), fits.body_truncated), (Some(200), "0123456789", false));
    let default = sender.post(req(&rx.url("/other"), &[], b"")).await;
    assert_eq!((default.status, default.body_excerpt.as_str()), (Some(200), "ok"));
}

#[tokio::test]
async fn retry_after_is_parsed_in_both_forms() {
    let rx = Receiver::start().await;
    rx.set_path_mode("/secs", Mode::RetryAfter(429, "120".to_owned()));
    let at = (chrono::Utc::now() + chrono::Duration::seconds(600)).to_rfc2822().replace("+0000", "GMT");
    rx.set_path_mode("/date", Mode::RetryAfter(503, at));
    let sender = local_sender();

    let secs = sender.post(req(&rx.url("/secs"), &[], b"{}")).await;
    assert_eq!(secs.status, Some(429));
    assert_eq!(secs.retry_after, Some(Duration::from_secs(120)));
    assert!(secs.response_headers.iter().any(|(k, v)| k == "retry-after" && v == "120"));
    assert_eq!(secs.failure(|s| (200..300).contains(&s)), Some(DeliverError::Status(429)));

    let date = sender.post(req(&rx.url("/date"), &[], b"{}")).await;
    assert_eq!(date.status, Some(503));
    let wait = date.retry_after.expect("HTTP-date parsed");
    assert!(wait > Duration::from_secs(590) && wait <= Duration::from_secs(600), "{wait:?}");

    let none = sender.post(req(&rx.url("/plain"), &[], b"{}")).await;
    assert_eq!(none.retry_after, None);
}

#[tokio::test]
async fn redirects_are_reported_not_followed() {
    let rx = Receiver::start().await;
    rx.set_path_mode("/old", Mode::Redirect(307, rx.url("/new")));
    let attempt = local_sender().post(req(&rx.url("/old"), &[], b"{}")).await;
    assert_eq!(attempt.status, Some(307));
    assert_eq!(attempt.error, None);
    assert!(attempt.response_headers.iter().any(|(k, v)| k == "location" && v.ends_with("/new")));
    let paths: Vec<String> = rx.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, vec!["/old"], "the redirect must not be followed");
}

#[tokio::test]
async fn connections_are_reused_when_pooled() {
    let rx = Receiver::start().await;
    let pooled = local_sender();
    for _ in 0..3 {
        assert_eq!(pooled.post(req(&rx.url("/p"), &[], b"{}")).await.status, Some(200));
    }
    let ports: Vec<u16> = rx.wait_for(3, WAIT).await.iter().map(|r| r.peer.port()).collect();
    assert!(ports.windows(2).all(|w| w[0] == w[1]), "one keep-alive connection: {ports:?}");

    let rx = Receiver::start().await;
    let unpooled = sender_with(HttpConfig { pool_max_idle_per_host: 0, ..HttpConfig::default() }, &["127.0.0.0/8"]);
    for _ in 0..2 {
        assert_eq!(unpooled.post(req(&rx.url("/u"), &[], b"{}")).await.status, Some(200));
    }
    let ports: Vec<u16> = rx.wait_for(2, WAIT).await.iter().map(|r| r.peer.port()).collect();
    assert_ne!(ports[0], ports[1], "without a pool each request connects anew");
}

#[tokio::test]
async fn get_text_answers_a_challenge() {
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Echo("challenge_key".to_owned()));
    let url = rx.url("/verify?validation_key=my-key&challenge_key=c%20123");
    let (status, text) = local_sender().get_text(&url).await.unwrap();
    assert_eq!((status, text.as_str()), (200, "c 123"));
    let r = &rx.wait_for(1, WAIT).await[0];
    assert_eq!(r.method, "GET");
    assert!(r.body.is_empty());
    let (status, text) = local_sender().get_text(&rx.url("/verify")).await.unwrap();
    assert_eq!((status, text.as_str()), (200, "ok"), "no challenge asked: the receiver answers like a plain endpoint");
}

#[tokio::test]
async fn transport_failures_are_classified() {
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let sender = local_sender();
    let refused = sender.post(req(&format!("http://{closed}/"), &[], b"{}")).await;
    let err = refused.error.expect("nothing listens there");
    assert_eq!(err.kind(), "connect", "{err}");
    assert!(err.is_retriable());

    let dns = sender.post(req("http://does-not-exist.invalid/", &[], b"{}")).await;
    assert_eq!(dns.error.as_ref().map(DeliverError::kind), Some("dns"), "{:?}", dns.error);

    let bad = sender.post(req("ftp://example.com/", &[], b"{}")).await;
    assert_eq!(bad.error.as_ref().map(DeliverError::kind), Some("invalid_url"));
    assert!(!bad.error.unwrap().is_retriable());
}

#[tokio::test]
async fn receiver_modes_switch_per_prefix_and_mid_test() {
    let rx = Receiver::start().await;
    let sender = local_sender();
    rx.set_path_mode("/a", Mode::Status(500));
    rx.set_path_mode("/a/ok", Mode::Status(204));
    assert_eq!(sender.post(req(&rx.url("/a/x"), &[], b"")).await.status, Some(500));
    assert_eq!(sender.post(req(&rx.url("/a/ok/1"), &[], b"")).await.status, Some(204));
    assert_eq!(sender.post(req(&rx.url("/b"), &[], b"")).await.status, Some(200));
    rx.set_mode(Mode::Status(410));
    assert_eq!(sender.post(req(&rx.url("/b"), &[], b"")).await.status, Some(410));
    assert_eq!(rx.wait_for(4, WAIT).await.len(), 4);
}

#[tokio::test]
#[should_panic(expected = "expected at least 1 requests")]
async fn wait_for_panics_clearly_at_timeout() {
    let rx = Receiver::start().await;
    rx.wait_for(1, Duration::from_millis(50)).await;
}

#[test]
fn error_kinds_and_retriability() {
    let table = [
        (DeliverError::InvalidUrl(String::new()), false, "invalid_url"),
        (DeliverError::InvalidRequest(String::new()), false, "invalid_request"),
        (DeliverError::Blocked(String::new()), false, "blocked"),
        (DeliverError::Client(String::new()), false, "client"),
        (DeliverError::Dns(String::new()), true, "dns"),
        (DeliverError::Connect(String::new()), true, "connect"),
        (DeliverError::Timeout, true, "timeout"),
        (DeliverError::Status(404), true, "status"),
        (DeliverError::Io(String::new()), true, "io"),
    ];
    for (err, retriable, kind) in table {
        assert_eq!(err.is_retriable(), retriable, "{err:?}");
        assert_eq!(err.kind(), kind);
    }
}

#[test]
fn failure_applies_the_dialect_rule() {
    let ok = Attempt { status: Some(204), ..Attempt::default() };
    assert_eq!(ok.failure(|s| (200..300).contains(&s)), None);
    assert_eq!(ok.failure(|s| s == 200), Some(DeliverError::Status(204)));
    let timed_out = Attempt { error: Some(DeliverError::Timeout), ..Attempt::default() };
    assert_eq!(timed_out.failure(|_| true), Some(DeliverError::Timeout));
}

#[tokio::test]
async fn literal_ip_urls_are_checked_in_every_spelling() {
    let guarded = sender_with(HttpConfig::default(), &[]);
    for url in [
        "http://127.0.0.1:9/hook",
        "http://2130706433:9/",
        "http://0x7f.1:9/",
        "http://[::1]:9/",
        "http://[::ffff:169.254.169.254]/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
    ] {
        let err = guarded.post(req(url, &[], b"{}")).await.error;
        assert_eq!(err.as_ref().map(DeliverError::kind), Some("blocked"), "{url}: {err:?}");
        assert!(err.unwrap().to_string().contains("delivery.allow_private_targets"));
    }
    let err = guarded.post(req("http://169.254.169.254/", &[], b"")).await.error.unwrap();
    assert!(err.to_string().contains("cloud metadata"), "{err}");
    for url in ["not a url", "ftp://example.com/x", "file:///etc/passwd", "http://"] {
        let err = guarded.post(req(url, &[], b"{}")).await.error;
        assert_eq!(err.as_ref().map(DeliverError::kind), Some("invalid_url"), "{url}: {err:?}");
    }
}

#[tokio::test]
async fn invalid_headers_are_refused_without_echoing_values() {
    let rx = Receiver::start().await;
    let bad_value = [("x-api-key".to_owned(), "secret\nvalue".to_owned())];
    let err = local_sender().post(req(&rx.url("/"), &bad_value, b"{}")).await.error.unwrap();
    assert_eq!(err.kind(), "invalid_request");
    assert!(!err.is_retriable());
    assert!(!err.to_string().contains("secret"), "{err}");
    let bad_name = [("bad name".to_owned(), "v".to_owned())];
    let err = local_sender().post(req(&rx.url("/"), &bad_name, b"{}")).await.error.unwrap();
    assert_eq!(err.kind(), "invalid_request");
    assert!(rx.requests().is_empty());

    let repeated = [("x-tag".to_owned(), "a".to_owned()), ("x-tag".to_owned(), "b".to_owned())];
    assert_eq!(local_sender().post(req(&rx.url("/"), &repeated, b"{}")).await.status, Some(200));
    assert_eq!(rx.wait_for(1, WAIT).await[0].header("x-tag"), Some("a, b"));
}

#[tokio::test]
async fn stopped_receiver_refuses_even_pooled_connections() {
    let rx = Receiver::start().await;
    let url = rx.url("/p");
    let sender = local_sender();
    assert_eq!(sender.post(req(&url, &[], b"{}")).await.status, Some(200));
    rx.stop().await;
    let after = sender.post(req(&url, &[], b"{}")).await;
    assert_eq!(after.status, None, "a pooled connection must not outlive the receiver");
    assert!(after.error.is_some());
}
