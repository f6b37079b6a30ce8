//! Blocking Kafka calls do not hold a tokio worker: on a runtime with one worker, another
//! task keeps running while the rebalance callback waits for the committed offsets and while
//! start-up waits for the cluster's metadata. The mock cluster answers every request after
//! 1.5 s, so each of those calls takes that long.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hookd::kafka::{RebalanceLog, TrackedConsumer, TrackingContext};
use rdkafka::consumer::Consumer;
use rdkafka::ClientConfig;

const RTT: Duration = Duration::from_millis(1_500);

/// Spawns a task (on the worker) that sets the returned flag once it runs while `busy` holds.
fn watch(busy: impl Fn() -> bool + Send + 'static) -> Arc<AtomicBool> {
    let overlapped = Arc::new(AtomicBool::new(false));
    let seen = overlapped.clone();
    tokio::spawn(async move {
        while !seen.load(Ordering::SeqCst) {
            if busy() {
                seen.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    overlapped
}

async fn wait_overlap(overlapped: &Arc<AtomicBool>, what: &str) {
    wait_until(Duration::from_secs(45), what, || {
        let o = overlapped.load(Ordering::SeqCst);
        async move { o }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_rebalance_callback_reads_committed_offsets_without_holding_the_worker() {
    let (mock, brokers) = mock_broker();
    mock.broker_round_trip_time(1, RTT).unwrap();
    let log = Arc::new(RebalanceLog::default());
    let asked = Arc::new(AtomicBool::new(false));
    let flag = asked.clone();
    // A settled position for every partition, so the callback asks for the committed offsets.
    let context = TrackingContext::new(log.clone()).resuming(Box::new(move |_, _| {
        flag.store(true, Ordering::SeqCst);
        Some(1)
    }));
    let consumer: TrackedConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "no-blocking")
        .set("session.timeout.ms", "6000")
        .create_with_context(context)
        .unwrap();
    consumer.subscribe(&["hookd.retry"]).unwrap();
    let assigned = log.clone();
    // Asked for a resume position and not yet assigned: the callback is waiting for the offsets.
    let overlapped = watch(move || asked.load(Ordering::SeqCst) && assigned.assigned.lock().unwrap().is_empty());
    let poller = tokio::spawn(async move {
        loop {
            let _ = consumer.recv().await;
        }
    });
    wait_overlap(&overlapped, "a task running while the rebalance callback waits for committed offsets").await;
    wait_until(Duration::from_secs(30), "the assignment applied", || {
        let n = log.assigned.lock().unwrap().len();
        async move { n == 3 }
    })
    .await;
    poller.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn topic_creation_reads_metadata_without_holding_the_worker() {
    // Every topic exists, so the metadata request is all `ensure_topics` waits for.
    let (mock, brokers) = mock_broker();
    mock.broker_round_trip_time(1, RTT).unwrap();
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&brokers, state.path(), "");
    let (started, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (s, d) = (started.clone(), done.clone());
    let overlapped = watch(move || s.load(Ordering::SeqCst) && !d.load(Ordering::SeqCst));
    let (s, d) = (started.clone(), done.clone());
    let task = tokio::spawn(async move {
        s.store(true, Ordering::SeqCst);
        let result = hookd::kafka::ensure_topics(&cfg).await;
        d.store(true, Ordering::SeqCst);
        result
    });
    wait_overlap(&overlapped, "a task running while start-up waits for metadata").await;
    task.await.unwrap().expect("topics checked");
}
