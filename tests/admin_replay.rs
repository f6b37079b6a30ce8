//! Replay and the admin calls that write to Kafka, with the broker down or slow (librdkafka's
//! mock cluster) and a real receiver: they answer 503 instead of hanging, a failed delivery
//! kept for replay is removed only once its replay record is acknowledged, and a client that
//! goes away mid-request loses nothing.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::api::{Api, TOKEN};
use common::receiver::{Mode, Receiver};
use common::*;
use serde_json::json;

const SUBS: &str = "[[subscription]]\nid = \"r\"\ntenant = \"t\"\nurl = \"URL\"\nretry = { max_attempts = 1 }\n";

/// A daemon whose subscription `r` has failed `n` deliveries for good (kept for replay).
async fn with_failed(
    brokers: &str,
    state: &std::path::Path,
    rx: &Receiver,
    n: usize,
) -> (hookd::Running, tokio_util::sync::CancellationToken) {
    rx.set_mode(Mode::Status(500));
    let mut cfg = config(brokers, state, &SUBS.replace("URL", &rx.url("/r")));
    cfg.admin.produce_timeout_ms = 1000;
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(brokers);
    for i in 0..n {
        let e = crm_event(&format!("e{i}"), "t", "contact.created", json!({"customer": {"id": i}}));
        produce(&p, "crm.events", "t", Some(&e)).await;
    }
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the failed deliveries kept", || {
        let kept = shared.endpoints.failed_since("r", i64::MIN).unwrap().len();
        async move { kept == n }
    })
    .await;
    (daemon, stop)
}

fn kept_ids(daemon: &hookd::Running) -> BTreeSet<String> {
    daemon.shared.endpoints.failed_since("r", i64::MIN).unwrap().into_iter().map(|(id, _, _)| id).collect()
}

/// webhook-ids the receiver answered 200 to (it answers 500 until switched).
fn delivered(rx: &Receiver, after: usize) -> BTreeSet<String> {
    rx.requests()[after..].iter().map(|r| r.headers["webhook-id"].clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_down_replay_and_disable_answer_503_and_keep_everything() {
    let (mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let (daemon, stop) = with_failed(&brokers, state.path(), &rx, 2).await;
    let api = Api::new(&daemon);
    let ids = kept_ids(&daemon);
    mock.broker_down(-1).unwrap();
    let (status, body, _) =
        api.call("POST", "/api/subscriptions/r/replay", Some(json!({"since": "2020-01-01T00:00:00Z"})), Some(TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("did not acknowledge"), "{body}");
    assert_eq!(kept_ids(&daemon), ids, "nothing removed without an acknowledgement");
    let (status, body, _) = api.call("POST", "/api/subscriptions/r/disable", None, Some(TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(api.get("/api/subscriptions/r").await["state"], "active", "a disable Kafka did not take changed nothing");
    mock.broker_up(-1).unwrap();
    rx.set_mode(Mode::Status(200));
    let before = rx.requests().len();
    // librdkafka reconnects with a backoff: calls in between may still answer 503.
    wait_until(Duration::from_secs(60), "a replay Kafka acknowledges", || {
        let api = &api;
        async move {
            api.call("POST", "/api/subscriptions/r/replay", Some(json!({"since": "2020-01-01T00:00:00Z"})), Some(TOKEN)).await.0 == 200
        }
    })
    .await;
    assert!(kept_ids(&daemon).is_empty(), "removed once acknowledged");
    wait_until(Duration::from_secs(30), "both replays delivered", || {
        let got = delivered(&rx, before);
        let want = ids.clone();
        async move { got == want }
    })
    .await;
    let m = daemon.shared.metrics.render();
    assert!(daemon.shared.metrics.admin_requests.with_label_values(&["unavailable"]).get() >= 1, "{m}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_replay_loses_nothing() {
    let (mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let (daemon, stop) = with_failed(&brokers, state.path(), &rx, 3).await;
    let ids = kept_ids(&daemon);
    rx.set_mode(Mode::Status(200));
    let before = rx.requests().len();
    // Every answer of the broker takes 300 ms: the client gives up long before the replay is acknowledged.
    mock.broker_round_trip_time(-1, Duration::from_millis(300)).unwrap();
    let gone = reqwest::Client::builder().timeout(Duration::from_millis(100)).build().unwrap();
    let sent = gone
        .post(format!("http://{}/api/subscriptions/r/replay", daemon.admin))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"since": "2020-01-01T00:00:00Z"}).to_string())
        .send()
        .await;
    assert!(sent.is_err_and(|e| e.is_timeout()), "the client went away before the answer");
    wait_until(Duration::from_secs(30), "every replay delivered", || {
        let got = delivered(&rx, before);
        let want = ids.clone();
        async move { got == want }
    })
    .await;
    mock.broker_round_trip_time(-1, Duration::ZERO).unwrap();
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the kept copies removed", || {
        let left = shared.endpoints.failed_since("r", i64::MIN).unwrap().len();
        async move { left == 0 }
    })
    .await;
    drop(shared);
    stop.cancel();
    daemon.wait().await.unwrap();
}
