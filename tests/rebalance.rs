//! Incremental rebalancing (issue 12 item 1) on the mock cluster: two daemons in one group
//! and process. When the second joins, only the partitions that move are revoked from the
//! first; the partitions it keeps keep their open bundles and are not read again, and the
//! moved ones are replayed by their new owner, who counts what it read again.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::chat::*;
use common::receiver::Receiver;
use common::*;
use hookd::window::clock::ManualClock;

/// Chat partitions of the mock cluster: more than the other topics' 3, so that the joining
/// instance takes some chat partitions and the first keeps others.
const CHAT_PARTITIONS: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_instance_takes_only_the_partitions_that_move() {
    let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    for t in TOPICS {
        mock.create_topic(t, if t == "chat.messages" { CHAT_PARTITIONS } else { 3 }, 1).expect("create topic");
    }
    let brokers = mock.bootstrap_servers();
    let rx = Receiver::start().await;
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let subs = chat_subscription("day", TENANT, "24h", &rx.url("/bundles"));
    let (a, stop_a) = start_on_clock(config(&brokers, state_a.path(), &subs), clock.clone()).await;
    let p = producer(&brokers);
    // Two messages of one open bundle on each chat partition.
    for partition in 0..CHAT_PARTITIONS {
        for i in 0..2 {
            let id = format!("m{partition}-{i}");
            produce_to(
                &p,
                "chat.messages",
                partition,
                &format!("chat{partition}"),
                &message(&id, &format!("chat{partition}"), T0, "Jo", "hi"),
            )
            .await;
        }
    }
    let bundles = CHAT_PARTITIONS as i64;
    wait_open_bundles(&a.shared, bundles, 30, "an open bundle per chat partition on the first instance").await;
    wait_bundled(&a.shared, 2 * bundles as u64, 30).await;
    let m = &a.shared.metrics;
    let assigned_alone = m.partitions_assigned.with_label_values(&["ingest"]).get();
    assert_eq!(assigned_alone, 3 + CHAT_PARTITIONS as u64, "every partition of crm.events and chat.messages");

    let (b, stop_b) = start_on_clock(config(&brokers, state_b.path(), &subs), clock.clone()).await;
    wait_until(Duration::from_secs(45), "the second instance assigned ingest partitions", || {
        let n = b.shared.metrics.partitions_assigned.with_label_values(&["ingest"]).get();
        async move { n > 0 }
    })
    .await;
    let (ma, mb) = (&a.shared.metrics, &b.shared.metrics);
    let moved = ma.partitions_revoked.with_label_values(&["ingest"]).get();
    assert_eq!(moved, mb.partitions_assigned.with_label_values(&["ingest"]).get(), "what the first gave up, the second took");
    assert!(moved < assigned_alone, "only some partitions move (eager would revoke all {assigned_alone}), moved {moved}");
    assert_eq!(ma.partitions_assigned.with_label_values(&["ingest"]).get(), assigned_alone, "nothing was assigned to the first again");
    // Bundles of moved chat partitions are rebuilt by the second; the rest stayed with the first.
    wait_until(Duration::from_secs(30), "every bundle open on exactly one instance", || {
        let (oa, ob) = (ma.open_bundles.get(), mb.open_bundles.get());
        async move { oa + ob == bundles && mb.chat_bundled.get() == 2 * ob as u64 }
    })
    .await;
    let rebuilt = mb.open_bundles.get() as u64;
    println!("moved {moved} partitions; the second rebuilt {rebuilt} bundles");
    assert_eq!(ma.records_replayed.with_label_values(&["ingest"]).get(), 0, "the first read nothing again");
    assert_eq!(mb.records_replayed.with_label_values(&["ingest"]).get(), 2 * rebuilt, "the second read the moved bundles' messages again");
    assert!(rebuilt > 0 && ma.open_bundles.get() > 0, "chat partitions both moved and stayed");
    assert_eq!(ma.chat_bundled.get(), 2 * bundles as u64, "kept partitions were not replayed into the first's store");
    assert_eq!(ma.revoke_abandoned.with_label_values(&["ingest"]).get(), 0);

    stop_b.cancel();
    b.wait().await.unwrap();
    stop_a.cancel();
    a.wait().await.unwrap();
}
