//! Retries behind a stalled endpoint on the mock cluster with a real receiver: 2,000 parked
//! deliveries waiting for a stalled endpoint's permits do not hold back another
//! subscription's due retries (the sender's tick passes over rows in flight inside the scan).

mod common;

use std::time::Duration;

use common::receiver::{Mode, Receiver};
use common::*;
use hookd::deliver::record::DeliveryRecord;
use hookd::kafka::SourceRef;
use rdkafka::producer::FutureRecord;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Produces `n` retry records of `sub` to `hookd.retry`, due at `not_before_ms`.
async fn produce_retries(p: &rdkafka::producer::FutureProducer, sub: &str, n: usize, not_before_ms: i64) {
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        let record = DeliveryRecord {
            id: format!("msg_{sub}_{i}"),
            subscription_id: sub.into(),
            tenant: "t".into(),
            event_name: "contact.created".into(),
            attempt: 2,
            not_before_ms,
            created_ms: not_before_ms,
            content_type: "application/json".into(),
            body: format!("{{\"n\":{i}}}").into_bytes(),
            headers: vec![],
            last_error: Some("HTTP status 503".into()),
            source: SourceRef { topic: "crm.events".into(), partition: 0, offset: i as i64 },
        };
        let value = record.encode();
        let r: FutureRecord<'_, str, [u8]> = FutureRecord::to("hookd.retry").key(sub).payload(&value);
        acks.push(p.send_result(r).map_err(|(e, _)| e).expect("enqueued"));
    }
    for ack in acks {
        ack.await.expect("not cancelled").map_err(|(e, _)| e).expect("acknowledged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_behind_a_stalled_endpoint_do_not_starve_another_subscriptions_due_retries() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/stalled", Mode::Stall);
    let state = tempfile::tempdir().unwrap();
    let subs = format!(
        "[[subscription]]\nid = \"stalled\"\ntenant = \"t\"\nurl = \"{}\"\n[[subscription]]\nid = \"other\"\ntenant = \"t\"\nurl = \"{}\"\n",
        rx.url("/stalled"),
        rx.url("/other")
    );
    let mut cfg = config(&brokers, state.path(), &subs);
    // Every stalled delivery waits in its subscription's queue for a permit (none is put off),
    // and the stalled requests hold their permits for the whole test.
    cfg.delivery.per_subscription_queue = 4_096;
    cfg.delivery.request_timeout_ms = 600_000;
    let concurrency = cfg.delivery.per_subscription_concurrency;
    let (daemon, stop) = start_daemon(cfg).await;
    let p = producer(&brokers);
    produce_retries(&p, "stalled", 2_000, now_ms() - 60_000).await;
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(60), "2,000 retries parked and the stalled endpoint's permits taken", || {
        let parked = shared.metrics.retry_queue_depth.get();
        let stalled = rx.requests().iter().filter(|r| r.path == "/stalled").count();
        async move { parked >= 2_000 && stalled >= concurrency }
    })
    .await;
    // Due now, so behind all 2,000 stalled ones in the retry store's due order.
    produce_retries(&p, "other", 5, now_ms()).await;
    wait_until(Duration::from_secs(30), "the other subscription's 5 due retries delivered", || {
        let n = rx.requests().iter().filter(|r| r.path == "/other").count();
        async move { n >= 5 }
    })
    .await;
    let stalled = rx.requests().iter().filter(|r| r.path == "/stalled").count();
    assert_eq!(stalled, concurrency, "the stalled endpoint holds exactly its permits; the rest wait in its queue");
    stop.cancel();
    daemon.wait().await.unwrap();
}
