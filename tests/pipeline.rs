//! Integration tests of the whole pipeline on librdkafka's mock cluster (a real Kafka
//! protocol broker in process) with a real HTTP receiver: routing, dialects on the wire,
//! signatures checked by an independent Standard Webhooks implementation, dead letters,
//! retries, exhaustion, head-of-line isolation, run-time subscriptions and the SSRF guard.

mod common;

use std::time::Duration;

use common::receiver::{Mode, Receiver};
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn body_json(r: &common::receiver::Recorded) -> Value {
    serde_json::from_slice(&r.body).expect("JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_matching_subscriptions_in_their_dialects_signed() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        r#"
[[subscription]]
id = "ant"
tenant = "1260"
url = "{ant}"
dialect = "antcrm"
events = ["contact.*"]
secret = "{SECRET}"
headers = {{ "X-Api-Key" = "k1" }}
[[subscription]]
id = "tc"
tenant = "1260"
url = "{tc}"
dialect = "teamcrop"
events = ["order.created"]
[[subscription]]
id = "other-tenant"
tenant = "999"
url = "{other}"
"#,
        ant = rx.url("/ant"),
        tc = rx.url("/tc"),
        other = rx.url("/other")
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    let contact = json!({"contact": {"name": "Tran", "lastname": "Thuan", "contactId": "PID-66"}});
    produce(&p, "crm.events", "1260", Some(&crm_event("e1", "1260", "contact.created", contact))).await;
    produce(
        &p,
        "crm.events",
        "1260",
        Some(&crm_event("e2", "1260", "order.created", json!({"order": {"id": 2729898, "invoice_id": "SPIRAL"}}))),
    )
    .await;
    produce(&p, "crm.events", "1260", Some(&crm_event("e3", "1260", "task.created", json!({"task": {"taskId": 1}})))).await;

    let got = rx.wait_for(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // let any wrong extra delivery show up
    let all = rx.requests();
    assert_eq!(
        all.len(),
        2,
        "task.created matches nothing, tenant 999 gets nothing: {:?}",
        all.iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let ant = got.iter().find(|r| r.path == "/ant").expect("antcrm delivery");
    let b = body_json(ant);
    assert_eq!(b["eventCode"], "CONTACT_CREATE");
    assert_eq!(b["contact"]["contactId"], "PID-66");
    assert_eq!(ant.headers["x-api-key"], "k1");
    let wh = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut hm = reqwest::header::HeaderMap::new();
    for n in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        hm.insert(n, ant.headers[n].parse().unwrap());
    }
    wh.verify(&ant.body, &hm).expect("signature verifies with an independent implementation");
    let tc = got.iter().find(|r| r.path == "/tc").expect("teamcrop delivery");
    assert_eq!(tc.headers["tc-webhook-event"], "order.add");
    assert_eq!(body_json(tc), json!({"id": 2729898, "invoice_id": "SPIRAL"}));
    let admin = format!("http://{}", daemon.admin);
    let get = |path: &'static str| {
        let url = format!("{admin}{path}");
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "hookd_events_consumed_total{source=\"crm\"} 3",
        "hookd_deliveries_produced_total{source=\"crm\"} 2",
        "hookd_events_unmatched_total{source=\"crm\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    wait_until(Duration::from_secs(5), "success counted", || {
        let m = daemon.shared.metrics.render();
        async move { m.contains("hookd_deliveries_total{outcome=\"success\"} 2") }
    })
    .await;
    assert_eq!(daemon.shared.metrics.request_duration.with_label_values(&["success"]).get_sample_count(), 2, "both requests timed");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_goes_to_the_dead_letter_topic_with_reason_and_source() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"{}\"\n[ingest]\nmax_record_bytes = 2000\n", rx.url("/s"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    let big = crm_event("big", "t", "a.b", json!({"blob": "x".repeat(3000)}));
    let bad: Vec<(&str, String)> = vec![
        ("malformed JSON", "{not json".to_string()),
        ("missing required field `tenant`", r#"{"id":"x","type":"a","occurred_at":1,"data":{}}"#.to_string()),
        ("field `data` must be an object", r#"{"id":"x","tenant":"t","type":"a","occurred_at":1,"data":7}"#.to_string()),
        ("over the limit of 2000", big),
    ];
    for (_, v) in &bad {
        produce(&p, "crm.events", "k", Some(v)).await;
    }
    produce(&p, "crm.events", "k", Some(&crm_event("good", "t", "a.b", json!({})))).await;
    rx.wait_for(1, Duration::from_secs(30)).await;
    let letters = read_topic(&brokers, "hookd.dlq", bad.len(), Duration::from_secs(20));
    assert_eq!(letters.len(), bad.len());
    for (want, original) in &bad {
        let l = letters
            .iter()
            .find(|m| rdkafka::Message::payload(*m) == Some(original.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {want}"));
        let reason = header(l, "hookd-dlq-reason").unwrap();
        assert!(reason.contains(want), "reason `{reason}` should contain `{want}`");
        assert_eq!(header(l, "hookd-dlq-stage").as_deref(), Some("ingest"));
        assert_eq!(header(l, "hookd-dlq-topic").as_deref(), Some("crm.events"));
        assert!(header(l, "hookd-dlq-offset").unwrap().parse::<i64>().is_ok());
        assert!(header(l, "hookd-dlq-partition").unwrap().parse::<i32>().is_ok());
    }
    let metrics = daemon.shared.metrics.render();
    assert!(metrics.contains("hookd_dlq_records_total{stage=\"ingest\"} 4"), "{metrics}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_requests_are_retried_with_the_same_webhook_id_then_exhausted_to_dlq() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(500));
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        "[[subscription]]\nid = \"flaky\"\ntenant = \"t\"\nurl = \"{}\"\nretry = {{ delays_secs = [1], max_attempts = 3 }}\n\
         [[subscription]]\nid = \"dead\"\ntenant = \"u\"\nurl = \"{}\"\nretry = {{ delays_secs = [1], max_attempts = 2 }}\n",
        rx.url("/flaky"),
        rx.url("/dead")
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    produce(&p, "crm.events", "t", Some(&crm_event("e1", "t", "a.b", json!({"n": 1})))).await;
    produce(&p, "crm.events", "u", Some(&crm_event("e2", "u", "a.b", json!({"n": 2})))).await;
    // flaky: 500, 500, then 200 on the third send.
    wait_until(Duration::from_secs(30), "two failed sends to flaky", || {
        let n = rx.requests().iter().filter(|r| r.path == "/flaky").count();
        async move { n >= 2 }
    })
    .await;
    rx.set_path_mode("/flaky", Mode::Status(200));
    wait_until(Duration::from_secs(30), "third send to flaky", || {
        let n = rx.requests().iter().filter(|r| r.path == "/flaky").count();
        async move { n >= 3 }
    })
    .await;
    let flaky: Vec<_> = rx.requests().into_iter().filter(|r| r.path == "/flaky").collect();
    let ids: std::collections::HashSet<_> = flaky.iter().map(|r| r.headers["webhook-id"].clone()).collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same webhook-id");
    assert!(flaky.windows(2).all(|w| w[0].body == w[1].body), "retries send the same bytes");
    // dead: two sends, then a dead letter with the delivery record and the last error.
    let letters = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(header(l, "hookd-dlq-stage").as_deref(), Some("deliver"));
    assert_eq!(header(l, "hookd-dlq-subscription").as_deref(), Some("dead"));
    let reason = header(l, "hookd-dlq-reason").unwrap();
    assert!(reason.contains("gave up after 2 attempt") && reason.contains("500"), "{reason}");
    assert_eq!(rx.requests().iter().filter(|r| r.path == "/dead").count(), 2);
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_deliveries_total{outcome=\"exhausted\"} 1"), "{m}");
    assert!(m.contains("hookd_deliveries_total{outcome=\"success\"} 1"), "{m}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_endpoint_does_not_delay_the_others() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/stall", Mode::Stall);
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        "[[subscription]]\nid = \"stall\"\ntenant = \"t\"\nurl = \"{}\"\n[[subscription]]\nid = \"fast\"\ntenant = \"t\"\nurl = \"{}\"\n",
        rx.url("/stall"),
        rx.url("/fast")
    );
    let mut cfg = config(&brokers, state.path(), &subs);
    cfg.delivery.request_timeout_ms = 30_000;
    cfg.delivery.per_subscription_concurrency = 2;
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(&brokers);
    for i in 0..40 {
        produce(&p, "crm.events", "t", Some(&crm_event(&format!("e{i}"), "t", "a.b", json!({"i": i})))).await;
    }
    wait_until(Duration::from_secs(20), "all 40 events at the fast endpoint while the other stalls", || {
        let n = rx.requests().iter().filter(|r| r.path == "/fast").count();
        async move { n >= 40 }
    })
    .await;
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_topic_adds_changes_and_deletes_at_run_time() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let p = producer(&brokers);
    let sub = |events: &str| format!(r#"{{"id":"dyn","tenant":"t","url":"{}","events":{events},"dialect":"doopage"}}"#, rx.url("/dyn"));
    produce(&p, "hookd.subscriptions", "dyn", Some(&sub(r#"["contact.created"]"#))).await;
    produce(&p, "hookd.subscriptions", "broken", Some(r#"{"id":"broken","tenant":"t"}"#)).await;
    let bad_zone =
        r#"{"id":"zoned","tenant":"t","url":"https://h.example/","source":"chat","aggregation":"24h","timezone":"Mars/Olympus"}"#;
    produce(&p, "hookd.subscriptions", "zoned", Some(bad_zone)).await;
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), "")).await;
    assert!(daemon.shared.registry.index().get("dyn").is_some(), "materialised at start-up");
    produce(
        &p,
        "crm.events",
        "t",
        Some(&crm_event("e1", "7", "contact.created", json!({"customer": {"id": 1}})).replace("\"7\"", "\"t\"")),
    )
    .await;
    let got = rx.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(body_json(&got[0])["event_type"], "customer_created");
    // Change the filter while running, then delete.
    produce(&p, "hookd.subscriptions", "dyn", Some(&sub(r#"["order.*"]"#))).await;
    let reg = daemon.shared.clone();
    wait_until(Duration::from_secs(10), "filter change applied", || {
        let ok = reg.registry.index().get("dyn").is_some_and(|s| s.events == vec!["order.*"]);
        async move { ok }
    })
    .await;
    produce(&p, "crm.events", "t", Some(&crm_event("e2", "t", "order.updated", json!({"order_id": 1})))).await;
    let got = rx.wait_for(2, Duration::from_secs(30)).await;
    assert_eq!(body_json(&got[1])["event_type"], "order_updated");
    produce(&p, "hookd.subscriptions", "dyn", None).await;
    wait_until(Duration::from_secs(10), "tombstone applied", || {
        let gone = reg.registry.index().get("dyn").is_none();
        async move { gone }
    })
    .await;
    let letters = read_topic(&brokers, "hookd.dlq", 2, Duration::from_secs(10));
    assert!(letters.iter().all(|l| header(l, "hookd-dlq-stage").as_deref() == Some("subscriptions")));
    let reasons: Vec<String> = letters.iter().filter_map(|l| header(l, "hookd-dlq-reason")).collect();
    assert!(reasons.iter().any(|r| r.contains("unknown time zone `Mars/Olympus`")), "{reasons:?}");
    assert!(reg.registry.index().get("zoned").is_none(), "an invalid subscription is not applied");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_targets_are_refused_without_the_allowlist() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = config(&brokers, state.path(), &format!("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"{}\"\n", rx.url("/s")));
    cfg.delivery.allow_private_targets.clear();
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(&brokers);
    produce(&p, "crm.events", "t", Some(&crm_event("e1", "t", "a.b", json!({})))).await;
    let letters = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "blocked target is not retried: straight to the DLQ");
    let reason = header(&letters[0], "hookd-dlq-reason").unwrap();
    assert!(reason.contains("gave up after 1 attempt"), "{reason}");
    assert!(rx.requests().is_empty(), "nothing reached the loopback receiver");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_retries_do_not_block_due_ones_and_teamcrop_wants_exactly_200() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(201));
    let state = tempfile::tempdir().unwrap();
    // `slow` waits an hour before its retry; `quick` (teamcrop: 201 is a failure) retries after 1 s.
    let subs = format!(
        "[[subscription]]\nid = \"slow\"\ntenant = \"t\"\nurl = \"{}\"\nretry = {{ delays_secs = [3600] }}\n\
         [[subscription]]\nid = \"quick\"\ntenant = \"t\"\nurl = \"{}\"\ndialect = \"teamcrop\"\nretry = {{ delays_secs = [1] }}\n",
        rx.url("/slow"),
        rx.url("/quick")
    );
    rx.set_path_mode("/slow", Mode::Status(503));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    produce(&p, "crm.events", "t", Some(&crm_event("e1", "t", "order.created", json!({"order": {"id": 1}})))).await;
    wait_until(Duration::from_secs(30), "both first attempts", || {
        let n = rx.requests().len();
        async move { n >= 2 }
    })
    .await;
    rx.set_path_mode("/quick", Mode::Status(200));
    wait_until(Duration::from_secs(30), "quick's retry while slow's waits in the retry store", || {
        let n = rx.requests().iter().filter(|r| r.path == "/quick").count();
        async move { n >= 2 }
    })
    .await;
    assert_eq!(rx.requests().iter().filter(|r| r.path == "/slow").count(), 1, "slow's retry is an hour away");
    let depth = daemon.shared.metrics.retry_queue_depth.get();
    assert_eq!(depth, 1, "slow's retry is parked");
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_request_errors_total{kind=\"status\"} 2"), "{m}");
    stop.cancel();
    daemon.wait().await.unwrap();

    // Restarted with the retry store intact: the parked retry is kept, and the retry partition
    // resumes past its committed offset (held at the parked record) instead of re-reading it.
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(30), "the retry partitions resumed past the parked record", || {
        let n = shared.metrics.resume_skipped.with_label_values(&["retry"]).get();
        async move { n >= 1 }
    })
    .await;
    assert_eq!(daemon.shared.metrics.retry_queue_depth.get(), 1, "slow's retry still parked");
    stop.cancel();
    daemon.wait().await.unwrap();
}
