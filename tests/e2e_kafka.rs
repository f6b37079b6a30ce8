//! End-to-end: the `hookd` binary against an Apache Kafka broker process (KRaft, one per test
//! binary, each test with its own topics and group) and a real HTTP receiver.
//!
//! The kill test is DESIGN section 2's promise: SIGKILL in the middle of a run, restart, and
//! every event is delivered at least once, every duplicate with the same `webhook-id`. It runs
//! on a real broker, not the mock cluster, because the mock deletes records past 5 MiB per
//! partition and cannot prove "nothing lost"; the mechanism is at-least-once with explicitly
//! stored offsets.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::kafka::{Kafka, Topics};
use common::receiver::Receiver;
use common::*;
use serde_json::json;

fn write_config(dir: &Path, brokers: &str, topics: &Topics, url: &str) -> std::path::PathBuf {
    let admin = free_port();
    std::fs::write(dir.join("admin-port"), admin.to_string()).unwrap();
    let sub = format!("[[subscription]]\nid = \"e2e\"\ntenant = \"t\"\nurl = \"{url}\"\ndialect = \"standard\"\n");
    write_e2e_config(dir, brokers, topics, admin, "per_subscription_concurrency = 4", &sub)
}

/// Event number → set of webhook-ids seen for it, and the total number of requests.
fn deliveries(rx: &Receiver) -> (HashMap<u64, HashSet<String>>, usize) {
    let reqs = rx.requests();
    let mut by_event: HashMap<u64, HashSet<String>> = HashMap::new();
    for r in &reqs {
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let n = body["data"]["n"].as_u64().expect("event number in body");
        by_event.entry(n).or_default().insert(r.headers["webhook-id"].clone());
    }
    (by_event, reqs.len())
}

/// Waits until every event 0..n was delivered; on timeout says which are missing and shows
/// the end of the daemon's log.
async fn all_delivered(rx: &Receiver, n: u64, log: &Path) {
    let start = std::time::Instant::now();
    loop {
        let (by_event, total) = deliveries(rx);
        if by_event.len() as u64 == n {
            return;
        }
        if start.elapsed() > Duration::from_secs(300) {
            let missing: Vec<u64> = (0..n).filter(|i| !by_event.contains_key(i)).take(20).collect();
            let port = std::fs::read_to_string(log.parent().unwrap().join("admin-port")).unwrap_or_default();
            let metrics = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => format!("metrics unavailable: {e}"),
            };
            let metrics: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#') && !l.contains("_bucket")).collect();
            std::fs::copy(log, "/tmp/hookd-e2e-failed.log").ok();

            println!("daemon metrics:\n{}", metrics.join("\n"));
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            panic!(
                "{} of {n} events delivered ({total} requests); missing e.g. {missing:?}\nlog tail (newest first):\n{}",
                by_event.len(),
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn publish(brokers: &str, topics: &Topics, n: u64) {
    let topic = topics.name("crm.events");
    let p = producer(brokers);
    let sends = (0..n).map(|i| {
        let v = crm_event(&format!("evt-{i}"), "t", "contact.created", json!({"n": i}));
        let (p, topic) = (p.clone(), topic.clone());
        async move { produce(&p, &topic, &format!("k{}", i % 17), Some(&v)).await }
    });
    futures::future::join_all(sends).await;
}

/// A first `hookd` process working through `n` events of its own topics.
struct Run {
    rx: Receiver,
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    first: common::process::Hookd,
}

/// Publishes `n` events on fresh topics, starts `hookd` and waits until `delivered` requests
/// arrived.
async fn start_run(name: &str, n: u64, delivered: usize) -> Run {
    let broker = Kafka::shared();
    let topics = Topics::unique(name);
    topics.create(&broker.bootstrap, 3);
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &broker.bootstrap, &topics, &rx.url("/e2e"));
    publish(&broker.bootstrap, &topics, n).await;
    let first = spawn_hookd(&cfg, &dir.path().join("run1.log"));
    wait_until(Duration::from_secs(300), "a first share of deliveries", || {
        let got = rx.requests().len();
        async move { got >= delivered }
    })
    .await;
    Run { rx, dir, cfg, first }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_delivers_every_event_with_stable_ids() {
    const N: u64 = 3000;
    let Run { rx, dir, cfg, mut first } = start_run("kill", N, 300).await;
    first.kill();
    let at_kill = rx.requests().len();
    assert!(at_kill < N as usize, "the kill must land mid-run (got {at_kill} of {N} already)");

    let mut second = spawn_hookd(&cfg, &dir.path().join("run2.log"));
    all_delivered(&rx, N, &dir.path().join("run2.log")).await;
    let (by_event, total) = deliveries(&rx);
    for (n, ids) in &by_event {
        assert_eq!(ids.len(), 1, "event {n} was delivered under several webhook-ids: {ids:?}");
    }
    println!("kill test: {N} events, {at_kill} requests before SIGKILL, {total} requests in all, {} duplicates", total - N as usize);

    let status = second.terminate();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    let log = std::fs::read_to_string(dir.path().join("run2.log")).unwrap();
    assert!(log.contains("committed") || log.contains("hookd stopped"), "shutdown logged:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_and_restart_continues() {
    const N: u64 = 1000;
    let Run { rx, dir, cfg, mut first } = start_run("term", N, 100).await;
    let status = first.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    let after_stop = rx.requests().len();
    let mut second = spawn_hookd(&cfg, &dir.path().join("run2.log"));
    all_delivered(&rx, N, &dir.path().join("run2.log")).await;
    let (_, total) = deliveries(&rx);
    println!("sigterm test: {after_stop} delivered before stop, {total} requests in all");
    second.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_are_created_at_start_up() {
    let broker = Kafka::shared();
    let topics = Topics::unique("create");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &broker.bootstrap, &topics, "http://127.0.0.1:9/unused");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("create_topics = false", "create_topics = true\npartitions = 5");
    std::fs::write(&cfg, text).unwrap();
    let mut hookd = spawn_hookd(&cfg, &dir.path().join("run.log"));
    let brokers = broker.bootstrap.clone();
    wait_until(Duration::from_secs(300), "all seven topics with five partitions", || {
        let (brokers, topics) = (brokers.clone(), topics.clone());
        async move {
            use rdkafka::consumer::{BaseConsumer, Consumer};
            let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
            let Ok(md) = c.fetch_metadata(None, Duration::from_secs(5)) else { return false };
            topics.all().iter().all(|t| md.topics().iter().any(|m| m.name() == t && m.partitions().len() == 5))
        }
    })
    .await;
    // With room for every record the producer takes: kafka.max_message_bytes (2 MiB) + 61.
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    let names = topics.all();
    let specs: Vec<ResourceSpecifier<'_>> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    for resource in admin.describe_configs(&specs, &AdminOptions::new()).await.unwrap() {
        let resource = resource.unwrap();
        let limit = resource.get("max.message.bytes").and_then(|e| e.value.clone());
        assert_eq!(limit.as_deref(), Some("2097213"), "{:?}", resource.specifier);
    }
    assert!(hookd.terminate().success());
}

/// The broker's own size check, which the mock cluster does not have: a delivery topic
/// created with a small `max.message.bytes` refuses a record the producer takes. hookd says
/// so at start-up, dead-letters that record as `too_large`, keeps its batches under the
/// topic's limit so the small records around it are not refused with it, and moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_topics_max_message_bytes_is_dead_lettered_and_the_partition_moves_on() {
    let broker = Kafka::shared();
    let topics = Topics::unique("limits");
    let names = topics.all();
    let specs: Vec<common::kafka::TopicSpec<'_>> = names
        .iter()
        .map(|n| {
            let config: &[(&str, &str)] = if n.ends_with("hookd.deliveries") {
                &[("max.message.bytes", "200000")]
            } else if n.ends_with("hookd.subscriptions") {
                &[("cleanup.policy", "compact")]
            } else {
                &[]
            };
            (n.as_str(), 3, config)
        })
        .collect();
    common::kafka::create_topics_with_config(&broker.bootstrap, &specs);
    // The subscriptions reader gives up on "not leader" for its start-up watermarks, which a
    // partition this new may still answer for a moment: wait until each one answers.
    let (b, subs) = (broker.bootstrap.clone(), topics.name("hookd.subscriptions"));
    wait_until(Duration::from_secs(30), "the subscriptions topic answering watermark requests", || {
        let (b, subs) = (b.clone(), subs.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                use rdkafka::consumer::{BaseConsumer, Consumer};
                let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
                (0..3).all(|p| c.fetch_watermarks(&subs, p, Duration::from_secs(2)).is_ok())
            })
            .await
            .unwrap()
        }
    })
    .await;
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let extra =
        format!("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"{}\"\ndialect = \"standard\"\n{}", rx.url("/s"), topics.toml());
    let mut cfg = config(&broker.bootstrap, state.path(), &extra);
    cfg.kafka.group_id = topics.group_id.clone();
    let (daemon, stop) = start_daemon(cfg).await;
    // Every topic hookd writes is below 2 MiB + 61: the delivery topic at 200000, the others
    // at the broker's default of 1048588.
    assert_eq!(daemon.shared.metrics.topics_below_limit.get(), 5);

    let crm = topics.name("crm.events");
    let p = producer(&broker.bootstrap);
    // Incompressible: the broker checks the batch as compressed (lz4).
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let noise: String = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[(x % 62) as usize])
        })
        .collect();
    let large = crm_event("large", "t", "contact.created", json!({ "blob": noise }));
    let (partition, first) = produce_at(&p, &crm, "k", large.as_bytes()).await;
    let mut last = first;
    for i in 0..20 {
        last = produce_at(&p, &crm, "k", crm_event(&format!("small-{i}"), "t", "contact.created", json!({"n": i})).as_bytes()).await.1;
    }
    rx.wait_for(20, Duration::from_secs(60)).await;
    let letters = read_topic(&broker.bootstrap, &topics.name("hookd.dlq"), 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1, "only the large record is refused, none of the small ones batched with it");
    let l = &letters[0];
    assert_eq!(rdkafka::Message::payload(l), Some(large.as_bytes()));
    let reason = header(l, "hookd-dlq-reason").unwrap();
    assert!(reason.starts_with("too_large: delivery record of ") && reason.contains("hookd.deliveries"), "{reason}");
    assert_eq!(header(l, "hookd-dlq-offset"), Some(first.to_string()));
    wait_committed_past(&broker.bootstrap, &topics.group_id, &crm, partition, last).await;
    assert_eq!(rx.requests().len(), 20);
    stop.cancel();
    daemon.wait().await.unwrap();
}
