//! End-to-end on Apache Kafka: endpoint state follows its subscription's partition. Instance A
//! alone makes a subscription fail until it is disabled (failure count, disabled reason,
//! activity, request log, failed deliveries kept for replay); B joins the group with a state
//! directory of its own, A stops gracefully, and B's admin API shows what A's showed, and B
//! replays the failed deliveries A kept.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::{Kafka, Topics};
use common::receiver::{Mode, Receiver};
use common::*;
use serde_json::{json, Value};

const SUB: &str = "moving";

/// One instance's directory, admin port and config.
struct Node {
    dir: tempfile::TempDir,
    port: u16,
    cfg: PathBuf,
}

fn node(brokers: &str, topics: &Topics, url: &str) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sub = format!(
        "[[subscription]]\nid = \"{SUB}\"\ntenant = \"t\"\nurl = \"{url}\"\ndialect = \"standard\"\ndisable_after_failures = 2\nretry = {{ max_attempts = 1 }}\n"
    );
    let cfg = write_e2e_config(dir.path(), brokers, topics, port, "log_body_max_bytes = 64", &sub);
    Node { dir, port, cfg }
}

async fn api(port: u16, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new().request(method, format!("http://127.0.0.1:{port}{path}")).bearer_auth("t");
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path} on {port}: {e}"));
    assert!(resp.status().is_success(), "{path} on {port}: {}", resp.status());
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

async fn get(port: u16, path: &str) -> Value {
    api(port, reqwest::Method::GET, path, None).await
}

/// The value of an unlabelled or fully labelled sample on `/metrics`, if the daemon answers.
async fn metric(port: u16, sample: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn wait_metric(port: u16, sample: &str, what: &str, ok: impl Fn(f64) -> bool + Copy) {
    wait_until(Duration::from_secs(120), what, || async move { metric(port, sample).await.is_some_and(ok) }).await;
}

/// What the admin API shows of the subscription: its view, activity, and the request log's
/// state and requests (not the download's own time).
async fn shown(port: u16) -> (Value, Value, Value) {
    let view = get(port, &format!("/api/subscriptions/{SUB}")).await;
    let activity = get(port, &format!("/api/subscriptions/{SUB}/activity")).await;
    let log = get(port, &format!("/api/subscriptions/{SUB}/requests")).await;
    (view, activity, json!({"state": log["state"], "requests": log["requests"]}))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_state_survives_its_partition_moving_to_another_instance() {
    let broker = Kafka::shared();
    let topics = Topics::unique("state");
    topics.create(&broker.bootstrap, 3); // with the changelog, compacted
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(500));
    let url = rx.url(&format!("/{SUB}"));
    let (a, b) = (node(&broker.bootstrap, &topics, &url), node(&broker.bootstrap, &topics, &url));

    let mut first = spawn_hookd(&a.cfg, &a.dir.path().join("a.log"));
    wait_metric(a.port, "hookd_endpoint_state_partitions", "A owns the three partitions", |v| v == 3.0).await;
    let p = producer(&broker.bootstrap);
    for n in 0..3 {
        let event = crm_event(&format!("evt-{n}"), "t", "contact.created", json!({"n": n, "note": "a body longer than the 64-byte cap"}));
        produce(&p, &topics.name("crm.events"), "k", Some(&event)).await;
    }
    wait_metric(a.port, "hookd_deliveries_total{outcome=\"exhausted\"}", "three deliveries given up on A", |v| v == 3.0).await;
    wait_until(Duration::from_secs(60), "A disabled the subscription and logged it", || async {
        let (view, activity, _) = shown(a.port).await;
        view["enabled"] == false && activity.as_array().unwrap().iter().any(|x| x["action"] == "disabled")
    })
    .await;
    let before = shown(a.port).await;
    assert_eq!(before.0["consecutive_failures"], 3, "{}", before.0);
    assert!(before.0["disabled_reason"].is_string(), "{}", before.0);
    assert_eq!(before.2["requests"].as_array().unwrap().len(), 3);
    assert!(before.2["requests"].as_array().unwrap().iter().all(|r| r["truncated"] == true), "bodies over 64 bytes are cut");

    let mut second = spawn_hookd(&b.cfg, &b.dir.path().join("b.log"));
    wait_metric(b.port, "hookd_endpoint_state_partitions", "B joined the group and owns a partition", |v| v >= 1.0).await;
    assert!(first.terminate().success(), "A stops gracefully:\n{}", log_tail(&a.dir.path().join("a.log")));
    wait_metric(b.port, "hookd_endpoint_state_partitions", "B owns the three partitions", |v| v == 3.0).await;
    assert!(metric(b.port, "hookd_endpoint_restored_records_total").await.unwrap_or(0.0) > 0.0, "B restored from the changelog");

    let after = shown(b.port).await;
    let b_log = b.dir.path().join("b.log");
    assert_eq!(after.0, before.0, "state and disabled reason on B\n{}", log_tail(&b_log));
    assert_eq!(after.1, before.1, "activity on B");
    assert_eq!(after.2, before.2, "request log on B");
    let replay = json!({"since": "1970-01-01T00:00:00Z"});
    let done = api(b.port, reqwest::Method::POST, &format!("/api/subscriptions/{SUB}/replay"), Some(replay)).await;
    assert_eq!(done["replayed"], 3, "B has the failed deliveries A kept for replay: {done}");
    assert!(second.terminate().success());
}
