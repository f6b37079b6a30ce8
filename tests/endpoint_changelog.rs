//! The endpoint state changelog on librdkafka's mock cluster: a restore into a fresh sled
//! directory gives the state the owner had; only the owner writes; the changelog partition of
//! a subscription is the one its deliveries go to.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hookd::endpoint::{partition_for, Action, Activity, Changelog, EndpointStore, OwnerHooks, RequestLog, Verification};
use hookd::kafka::PartitionHooks;
use hookd::telemetry::Metrics;

const DELIVERIES: &str = "hookd.deliveries";

struct Instance {
    _dir: tempfile::TempDir,
    store: EndpointStore,
    changelog: Arc<Changelog>,
    hooks: Arc<OwnerHooks>,
    metrics: Metrics,
}

/// An instance's endpoint store on a fresh sled directory with the changelog of `brokers`.
fn instance(brokers: &str) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    let config = config(brokers, dir.path(), "");
    let metrics = Metrics::new();
    let mut client = hookd::kafka::client_config(&config);
    client.set("group.id", "restore-test").set("enable.auto.commit", "false");
    let producer = hookd::kafka::producer(&config, None).unwrap();
    let changelog = Arc::new(Changelog::new(CHANGELOG.into(), 3, producer, metrics.clone(), client, &db).unwrap());
    let store = EndpointStore::open_with(&db, 64, Some(changelog.clone())).unwrap();
    let hooks = Arc::new(OwnerHooks {
        store: store.clone(),
        changelog: changelog.clone(),
        deliveries: DELIVERIES.into(),
        restore_timeout: Duration::from_secs(20),
    });
    Instance { _dir: dir, store, changelog, hooks, metrics }
}

fn all_partitions() -> Vec<(String, i32)> {
    (0..3).map(|p| (DELIVERIES.to_string(), p)).collect()
}

/// Runs a rebalance hook off the runtime's workers, as the consumer's callback does.
async fn hook(i: &Instance, assigning: bool) {
    let hooks = i.hooks.clone();
    tokio::task::spawn_blocking(move || match assigning {
        true => hooks.assigning(&all_partitions()),
        false => hooks.revoking(&all_partitions()),
    })
    .await
    .unwrap();
}

fn request(sub: &str, n: i64) -> RequestLog {
    RequestLog {
        at_ms: n,
        delivery_id: format!("msg_{n}"),
        attempt: 1,
        method: "POST".into(),
        url: format!("http://127.0.0.1/{sub}"),
        request_headers: vec![("content-type".into(), "application/json".into())],
        request_body: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat((n % 3 * 40) as usize)),
        status: Some(500),
        response_headers: vec![],
        response_body_excerpt: "oops".into(),
        duration_ms: 3,
        error: None,
        truncated: false,
    }
}

/// Everything the store shows of `sub`, as the admin API reads it.
fn snapshot(s: &EndpointStore, sub: &str) -> String {
    format!(
        "{:?}\n{:?}\n{:?}\n{:?}",
        s.state(sub).unwrap(),
        s.activity(sub).unwrap(),
        s.requests(sub).unwrap(),
        s.failed_since(sub, i64::MIN).unwrap()
    )
}

/// Failures, a verification, 12 actions (10 kept), 105 requests (100 kept, some cut to the
/// cap), three failed deliveries of which one is replayed (removed).
fn make_history(s: &EndpointStore, sub: &str) {
    for n in 1..=3 {
        s.record_failure(sub, &format!("HTTP 500 #{n}"), 1_000 + n).unwrap();
    }
    let v = Verification { fingerprint: hookd::endpoint::fingerprint("u", "k"), verified: true, at_ms: 7, error: None };
    s.set_verification(sub, v).unwrap();
    for n in 0..12 {
        let a = Activity { at_ms: n, action: Action::Failed, delivery_id: Some(format!("msg_{n}")), attempt: Some(1), detail: None };
        s.push_activity(sub, a).unwrap();
    }
    for n in 0..105 {
        s.push_request(sub, request(sub, n)).unwrap();
        if n == 50 {
            s.flush_logs().unwrap(); // two flushes: slots written twice
        }
    }
    for n in 0..3 {
        s.push_failed(sub, &format!("msg_{n}"), 2_000 + n, format!("record {n}").as_bytes()).unwrap();
    }
    assert!(s.remove_failed(sub, "msg_1", 2_001, b"record 1").unwrap());
    s.flush_logs().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_a_fresh_store_gives_the_owners_state() {
    let (_mock, brokers) = mock_broker();
    let a = instance(&brokers);
    hook(&a, true).await;
    assert_eq!(a.metrics.endpoint_restores.with_label_values(&["ok"]).get(), 1, "an empty changelog restores at once");
    let subs = ["sub_a", "sub/b", "sub_c"];
    for sub in subs {
        make_history(&a.store, sub);
    }
    a.store.record_success_at("sub_c", 5_000).unwrap();
    a.store.record_success_at("sub_c", 6_000).unwrap(); // kept in memory until the next flush
    a.store.flush_logs().unwrap();
    let written = a.changelog.flush(tokio::time::sleep(Duration::from_secs(20))).await;
    assert!(written > 0 && a.changelog.queued() == 0, "written {written}, left {}", a.changelog.queued());
    assert_eq!(a.metrics.endpoint_changelog.with_label_values(&["failed"]).get(), 0);

    let b = instance(&brokers);
    hook(&b, true).await;
    assert_eq!(b.metrics.endpoint_restores.with_label_values(&["ok"]).get(), 1);
    assert!(b.metrics.endpoint_restored_records.get() >= written as u64, "every record written was read");
    for sub in subs {
        assert_eq!(snapshot(&b.store, sub), snapshot(&a.store, sub), "{sub}: restored state differs");
    }
    let requests = b.store.requests("sub_a").unwrap();
    assert_eq!((requests.len(), requests[0].delivery_id.as_str()), (100, "msg_104"));
    assert!(requests.iter().any(|r| r.truncated) && requests.iter().any(|r| !r.truncated), "the 64-byte cap cut the long bodies only");
    assert_eq!(b.store.state("sub_c").unwrap().last_success_at_ms, Some(6_000));
    assert_eq!(b.store.failed_one("sub/b", "msg_2").unwrap(), Some((2_002, b"record 2".to_vec())));

    // The new owner's writes continue the logs where the old owner left them.
    b.store
        .push_activity("sub_a", Activity { at_ms: 99, action: Action::Enabled, delivery_id: None, attempt: None, detail: None })
        .unwrap();
    let activity = b.store.activity("sub_a").unwrap();
    assert_eq!((activity.len(), activity[0].at_ms, activity[1].at_ms), (10, 99, 11));

    // Handed over and back: a restore reads only what it does not hold yet.
    hook(&a, false).await;
    let before = a.metrics.endpoint_restored_records.get();
    hook(&a, true).await;
    assert_eq!(a.metrics.endpoint_restored_records.get(), before, "nobody else wrote: the partitions are current, nothing read");
    assert_eq!(a.metrics.endpoint_restores.with_label_values(&["ok"]).get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_writes_and_a_forgotten_subscription_is_not_restored() {
    let (_mock, brokers) = mock_broker();
    let a = instance(&brokers);
    a.store.record_failure("sub_a", "boom", 1).unwrap();
    assert_eq!(a.changelog.queued(), 0, "not the owner (no partition assigned): local only");
    hook(&a, true).await;
    make_history(&a.store, "sub_a");
    make_history(&a.store, "sub_gone");
    a.store.flush_logs().unwrap();
    a.store.forget("sub_gone").unwrap();
    a.changelog.flush(tokio::time::sleep(Duration::from_secs(20))).await;
    let b = instance(&brokers);
    hook(&b, true).await;
    assert_eq!(b.store.state("sub_a").unwrap().consecutive_failures, 4, "the local failure before ownership, then three");
    assert_eq!(b.store.state("sub_gone").unwrap(), hookd::endpoint::EndpointState::default(), "tombstones for the forgotten subscription");
    assert!(b.store.activity("sub_gone").unwrap().is_empty() && b.store.requests("sub_gone").unwrap().is_empty());
    assert!(b.store.failed_since("sub_gone", i64::MIN).unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changelog_partition_is_the_deliveries_partition_of_the_subscription() {
    let (_mock, brokers) = mock_broker();
    let producer = producer(&brokers);
    for n in 0..40 {
        let sub = format!("sub_{n}");
        let (partition, _) = produce_at(&producer, DELIVERIES, &sub, b"{}").await;
        assert_eq!(partition, partition_for(&sub, 3), "{sub}");
    }
}
