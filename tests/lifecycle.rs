//! Endpoint lifecycle and the admin API on the mock cluster with a real receiver:
//! verification handshake, auto-disable with a notification (once, with the subscription as it
//! is now; at once on 410 Gone), parking while disabled, logs that survive a restart, replay,
//! the token, and per-endpoint limits.

mod common;

use std::time::Duration;

use common::api::{Api, TOKEN};
use common::receiver::{Mode, Receiver};
use common::*;
use serde_json::{json, Value};

fn event(i: usize, tenant: &str) -> String {
    crm_event(&format!("e{i}"), tenant, "contact.created", json!({"customer": {"id": i}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_handshake_gates_delivery_until_the_endpoint_answers_the_challenge() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/doo", Mode::Status(200)); // answers "ok", not the challenge
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"doo\"\ntenant = \"1\"\nurl = \"{}\"\ndialect = \"doopage\"\nverification = {{ validation_key = \"my-key\" }}\n", rx.url("/doo"));
    let mut cfg = config(&brokers, state.path(), &subs);
    cfg.delivery.verification_retry_secs = 1;
    let (daemon, stop) = start_daemon(cfg).await;
    let api = Api::new(&daemon);
    wait_until(Duration::from_secs(20), "a failed handshake", || {
        let n = rx.requests().iter().filter(|r| r.method == "GET").count();
        async move { n >= 1 }
    })
    .await;
    let get = rx.requests().into_iter().find(|r| r.method == "GET").unwrap();
    let q = get.query.clone().unwrap_or_default();
    assert!(q.contains("validation_key=my-key") && q.contains("challenge_key="), "{q}");
    produce(&producer(&brokers), "crm.events", "1", Some(&event(1, "1"))).await;
    wait_until(Duration::from_secs(10), "the API shows it unverified", || {
        let api = &api;
        async move {
            let v = api.get("/api/subscriptions/doo").await;
            v["state"] == "unverified" && v["verification"]["error"].as_str().is_some_and(|e| e.contains("not the challenge"))
        }
    })
    .await;
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the delivery parked as unverified", || {
        let n = shared.metrics.deliveries_deferred.with_label_values(&["unverified"]).get();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(rx.requests().iter().filter(|r| r.method == "POST").count(), 0, "nothing delivered before verification");
    rx.set_path_mode("/doo", Mode::Echo("challenge_key".into()));
    wait_until(Duration::from_secs(30), "delivery after verification", || {
        let n = rx.requests().iter().filter(|r| r.method == "POST").count();
        async move { n >= 1 }
    })
    .await;
    let v = api.get("/api/subscriptions/doo").await;
    assert_eq!(v["state"], "active");
    assert_eq!(v["verification"]["verified"], true);
    let m = daemon.shared.metrics.render();
    assert!(
        daemon.shared.metrics.verifications.with_label_values(&["failed"]).get() >= 1
            && m.contains("hookd_verifications_total{result=\"verified\"} 1"),
        "{m}"
    );
    let actions: Vec<String> = api
        .get("/api/subscriptions/doo/activity")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_string())
        .collect();
    assert!(actions.contains(&"verified".to_string()) && actions.contains(&"verification_failed".to_string()), "{actions:?}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_disable_the_endpoint_notify_the_owner_and_park_until_enabled() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(500));
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        "[[subscription]]\nid = \"shaky\"\ntenant = \"t\"\nurl = \"{}\"\nowner_email = \"owner@example.com\"\ndisable_after_failures = 3\nretry = {{ delays_secs = [1], max_attempts = 20 }}\nheaders = {{ \"X-Api-Key\" = \"sekrit\" }}\n",
        rx.url("/shaky")
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let api = Api::new(&daemon);
    let p = producer(&brokers);
    produce(&p, "crm.events", "t", Some(&event(1, "t"))).await;
    let notes = read_topic(&brokers, "hookd.notifications", 1, Duration::from_secs(60));
    assert_eq!(notes.len(), 1, "one endpoint.disabled notice");
    let note: Value = serde_json::from_slice(rdkafka::Message::payload(&notes[0]).unwrap()).unwrap();
    assert_eq!(note["type"], "endpoint.disabled");
    assert_eq!(note["tenant"], "t");
    assert_eq!(note["subscription"], "shaky");
    assert_eq!(note["owner_email"], "owner@example.com");
    assert!(note["last_error"].as_str().unwrap().contains("500"), "{note}");
    assert!(note["at"].is_string());
    assert_eq!(rx.requests().len(), 4, "disabled after more than 3 failures in a row");
    let v = api.get("/api/subscriptions/shaky").await;
    assert_eq!(v["state"], "disabled");
    assert_eq!(v["consecutive_failures"], 4);
    assert!(v["disabled_reason"].as_str().unwrap().contains("4 consecutive failed requests"), "{v}");
    // The pending retry is parked, not lost, and new events are not routed while disabled.
    produce(&p, "crm.events", "t", Some(&event(2, "t"))).await;
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the due retry parked as disabled", || {
        let n = shared.metrics.deliveries_deferred.with_label_values(&["disabled"]).get();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(rx.requests().len(), 4, "nothing sent while disabled");
    rx.set_mode(Mode::Status(200));
    let done = api.post("/api/subscriptions/shaky/enable", None).await;
    assert_eq!(done["state"], "active");
    wait_until(Duration::from_secs(40), "the parked retry resumes after enable", || {
        let n = rx.requests().len();
        async move { n >= 5 }
    })
    .await;
    let resumed = &rx.requests()[4];
    assert_eq!(resumed.headers["webhook-id"], rx.requests()[0].headers["webhook-id"], "the same delivery, resumed");
    let v = api.get("/api/subscriptions/shaky").await;
    assert_eq!(v["consecutive_failures"], 0, "a success resets the count");
    // The request log: full detail, the API key redacted, downloadable as one file.
    let (status, file, headers) = api.call("GET", "/api/subscriptions/shaky/requests", None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(headers[reqwest::header::CONTENT_DISPOSITION].to_str().unwrap().starts_with("attachment"));
    let reqs = file["requests"].as_array().unwrap();
    assert!(reqs.len() >= 5, "{file}");
    let first = &reqs[reqs.len() - 1];
    assert_eq!(first["status"], 500);
    assert!(first["request_body"].as_str().unwrap().contains("customer"));
    let hdrs = first["request_headers"].to_string();
    assert!(!hdrs.contains("sekrit") && hdrs.contains("[redacted]") && hdrs.contains("webhook-signature"), "{hdrs}");
    let activity = api.get("/api/subscriptions/shaky/activity").await;
    assert!(activity.as_array().unwrap().len() <= 10);
    let actions: Vec<&str> = activity.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions[0], "delivered", "newest first: {actions:?}");
    assert!(actions.contains(&"enabled") && actions.contains(&"disabled"), "{actions:?}");
    assert!(daemon.shared.metrics.render().contains("hookd_endpoint_disables_total{cause=\"failures\"} 1"));

    // Logs survive a restart.
    drop(shared);
    stop.cancel();
    daemon.wait().await.unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let api = Api::new(&daemon);
    let again = api.get("/api/subscriptions/shaky/activity").await;
    assert_eq!(again.as_array().unwrap()[0]["action"], "delivered");
    stop.cancel();
    daemon.wait().await.unwrap();
}

/// The record of `topic` with this key, as JSON, in the order read (one partition per key).
fn values_of(brokers: &str, topic: &str, key: &str, n: usize) -> Vec<(i32, Value)> {
    read_topic(brokers, topic, n, Duration::from_secs(30))
        .iter()
        .filter(|m| rdkafka::Message::key(*m) == Some(key.as_bytes()))
        .map(|m| (rdkafka::Message::partition(m), serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_failures_disable_once_and_publish_the_subscription_as_it_is_now() {
    let (_mock, brokers) = mock_broker();
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    old.set_mode(Mode::Stall);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&brokers, state.path(), "");
    cfg.delivery.request_timeout_ms = 60_000;
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(&brokers);
    let sub = |url: String| {
        let retry = json!({"delays_secs": [3600], "max_attempts": 5});
        json!({"id": "racy", "tenant": "t", "url": url, "disable_after_failures": 1, "max_concurrency": 4, "retry": retry}).to_string()
    };
    produce(&p, "hookd.subscriptions", "racy", Some(&sub(old.url("/old")))).await;
    let shared = daemon.shared.clone();
    let url_is = |url: String| {
        let shared = shared.clone();
        move || {
            let now = shared.registry.index().get("racy").map(|s| s.url.clone());
            let want = url.clone();
            async move { now == Some(want) }
        }
    };
    wait_until(Duration::from_secs(20), "the subscription loaded", url_is(old.url("/old"))).await;
    for i in 0..4 {
        produce(&p, "crm.events", "t", Some(&event(i, "t"))).await;
    }
    old.wait_for(4, Duration::from_secs(30)).await;
    // The owner fixes the URL while four requests to the old one are in flight.
    produce(&p, "hookd.subscriptions", "racy", Some(&sub(new.url("/new")))).await;
    wait_until(Duration::from_secs(20), "the new URL applied", url_is(new.url("/new"))).await;
    old.stop().await; // the four fail together: counts 2, 3 and 4 are each past the threshold
    let notes = values_of(&brokers, "hookd.notifications", "racy", 1);
    assert_eq!((notes.len(), notes[0].1["type"].as_str(), notes[0].1["cause"].as_str()), (1, Some("endpoint.disabled"), Some("failures")));
    wait_until(Duration::from_secs(30), "all four failures settled (their retries produced)", || {
        let m = shared.metrics.render();
        async move { m.contains("hookd_deliveries_total{outcome=\"retry\"} 4") }
    })
    .await;
    // A marker behind any notice those failures produced: the records before it are all of them.
    let marker: rdkafka::producer::FutureRecord<'_, str, str> =
        rdkafka::producer::FutureRecord::to("hookd.notifications").key("racy").partition(notes[0].0).payload(r#"{"type": "test.marker"}"#);
    p.send(marker, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let types: Vec<String> = values_of(&brokers, "hookd.notifications", "racy", 2).iter().map(|(_, v)| v["type"].to_string()).collect();
    assert_eq!(types, [r#""endpoint.disabled""#, r#""test.marker""#], "exactly one notice for one disable");
    let published = values_of(&brokers, "hookd.subscriptions", "racy", 3);
    let last = &published.last().unwrap().1;
    assert_eq!((last["enabled"].as_bool(), last["url"].as_str()), (Some(false), Some(new.url("/new").as_str())), "{published:?}");
    let v = Api::new(&daemon).get("/api/subscriptions/racy").await;
    assert_eq!((v["state"].as_str(), v["url"].as_str()), (Some("disabled"), Some(new.url("/new").as_str())));
    assert!(shared.metrics.render().contains("hookd_endpoint_disables_total{cause=\"failures\"} 1"));
    drop(shared);
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_disables_the_endpoint_after_one_request_and_is_not_retried() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(410));
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"gone\"\ntenant = \"t\"\nurl = \"{}\"\nretry = {{ delays_secs = [1] }}\n", rx.url("/gone"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    produce(&producer(&brokers), "crm.events", "t", Some(&event(1, "t"))).await;
    let notes = values_of(&brokers, "hookd.notifications", "gone", 1);
    assert_eq!(notes.len(), 1, "disabled at the first 410, not after disable_after_failures (10)");
    assert_eq!(notes[0].1["cause"], "gone");
    let dlq = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    let reason = header(&dlq[0], "hookd-dlq-reason").unwrap();
    assert!(reason.starts_with("gave up after 1 attempt(s)"), "not retried: {reason}");
    assert_eq!(rx.requests().len(), 1);
    let v = Api::new(&daemon).get("/api/subscriptions/gone").await;
    assert_eq!((v["state"].as_str(), v["consecutive_failures"].as_u64()), (Some("disabled"), Some(1)));
    assert!(v["disabled_reason"].as_str().unwrap().contains("410 Gone"), "{v}");
    let m = daemon.shared.metrics.render();
    assert!(
        m.contains("hookd_endpoint_disables_total{cause=\"gone\"} 1") && m.contains("hookd_deliveries_total{outcome=\"retry\"} 0"),
        "{m}"
    );
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_resends_failed_deliveries_and_the_api_checks_token_and_input() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(503));
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"r\"\ntenant = \"t\"\nurl = \"{}\"\nretry = {{ max_attempts = 1 }}\n", rx.url("/r"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let api = Api::new(&daemon);
    let p = producer(&brokers);
    let since = chrono::Utc::now().to_rfc3339();
    for i in 0..3 {
        produce(&p, "crm.events", "t", Some(&event(i, "t"))).await;
    }
    assert_eq!(read_topic(&brokers, "hookd.dlq", 3, Duration::from_secs(30)).len(), 3);
    let first_ids: std::collections::BTreeSet<String> = rx.requests().iter().map(|r| r.headers["webhook-id"].clone()).collect();
    rx.set_mode(Mode::Status(200));
    let done = api.post("/api/subscriptions/r/replay", Some(json!({"since": since}))).await;
    assert_eq!(done["replayed"], 3);
    let got = rx.wait_for(6, Duration::from_secs(30)).await;
    let replay_ids: std::collections::BTreeSet<String> = got[3..].iter().map(|r| r.headers["webhook-id"].clone()).collect();
    assert_eq!(first_ids, replay_ids, "replays keep their webhook-id");
    let one = first_ids.iter().next().unwrap().clone();
    assert_eq!(api.post("/api/subscriptions/r/replay", Some(json!({"delivery_id": one}))).await["replayed"], 1);
    rx.wait_for(7, Duration::from_secs(30)).await;

    let (s, body, _) = api.call("GET", "/api/subscriptions", None, None).await;
    assert_eq!((s, body["error"].is_string()), (401, true));
    assert_eq!(api.call("GET", "/api/subscriptions", None, Some("wrong")).await.0, 401);
    assert_eq!(api.call("GET", "/api/subscriptions/nope", None, Some(TOKEN)).await.0, 404);
    let (s, body, _) = api.call("POST", "/api/subscriptions/r/replay", Some(json!({"since": "yesterday"})), Some(TOKEN)).await;
    assert_eq!(s, 400);
    assert!(body["error"].as_str().unwrap().contains("RFC 3339"), "{body}");
    assert_eq!(api.call("POST", "/api/subscriptions/r/replay", Some(json!({"colour": 1})), Some(TOKEN)).await.0, 400);
    assert_eq!(api.call("POST", "/api/subscriptions/r/replay", Some(json!({})), Some(TOKEN)).await.0, 400);
    let list = api.get("/api/subscriptions").await;
    assert_eq!(list[0]["id"], "r");
    let (s, doc, _) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(s, 200);
    for path in
        ["/api/subscriptions", "/api/subscriptions/{id}/replay", "/api/subscriptions/{id}/requests", "/api/tenants/{tenant}/portal-link"]
    {
        assert!(doc["paths"][path].is_object(), "openapi lacks {path}");
    }
    for action in ["enable", "disable", "replay"] {
        let answers = &doc["paths"][format!("/api/subscriptions/{{id}}/{action}")]["post"]["responses"];
        assert!(answers["503"].is_object(), "openapi lacks the 503 of {action}: {answers}");
    }
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_endpoint_concurrency_and_rate_limits_hold() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/stall", Mode::Stall);
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        "[[subscription]]\nid = \"stall\"\ntenant = \"t\"\nurl = \"{}\"\nmax_concurrency = 2\n\
         [[subscription]]\nid = \"rated\"\ntenant = \"t\"\nurl = \"{}\"\nrate_limit_per_sec = 5\n",
        rx.url("/stall"),
        rx.url("/rated")
    );
    let mut cfg = config(&brokers, state.path(), &subs);
    cfg.delivery.request_timeout_ms = 60_000;
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(&brokers);
    for i in 0..20 {
        produce(&p, "crm.events", "t", Some(&event(i, "t"))).await;
    }
    wait_until(Duration::from_secs(30), "all 20 at the rate-limited endpoint", || {
        let n = rx.requests().iter().filter(|r| r.path == "/rated").count();
        async move { n >= 20 }
    })
    .await;
    let stalled = rx.requests().iter().filter(|r| r.path == "/stall").count();
    assert_eq!(stalled, 2, "at most max_concurrency requests in flight to a stalled endpoint");
    // 5/s with a burst of 5: 20 requests need at least 15 refills of 200 ms.
    let times: Vec<std::time::Instant> = rx.requests().iter().filter(|r| r.path == "/rated").map(|r| r.received_at).collect();
    let span = times[times.len() - 1].duration_since(times[0]);
    assert!(span >= Duration::from_millis(2800), "20 requests at 5/s spread over {span:?}");
    stop.cancel();
    daemon.wait().await.unwrap();
}
