//! Bundles at their limits, on the mock cluster with a manual clock: a window too large for
//! one record is delivered in parts (issue 10 item 2), bundle ids follow what a bundle holds
//! (item 3), and chat partitions without open bundles are committed as they are read (item 8).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::chat::*;
use common::receiver::Receiver;
use common::*;
use hookd::deliver::record::DeliveryRecord;
use hookd::window::clock::ManualClock;
use serde_json::Value;

/// 17:00:06 on the seed's day: the 16:00-17:00 window of [`T0`] is closed (grace 5 s).
const AFTER_FIRST_WINDOW: i64 = T0 + (34 * 60 + 31) * 1000 + 6_000;

/// A part's body: the TimelinesAI bundle shape, timestamps and summary of its own messages.
fn assert_whole_bundle(part: &Value, sender: &str) {
    let keys: Vec<&str> = part.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["whatsapp_account", "chat", "messages", "first_message_timestamp", "last_message_timestamp", "aggregation"]);
    let messages = part["messages"].as_array().unwrap();
    assert_eq!(part["first_message_timestamp"], messages[0]["timestamp"]);
    assert_eq!(part["last_message_timestamp"], messages[messages.len() - 1]["timestamp"]);
    let summary = part["aggregation"].as_str().unwrap();
    assert_eq!(summary.matches(&format!("from {sender} on ")).count(), messages.len(), "one summary line per message of the part");
    let first_text = messages[0]["text"].as_str().unwrap().replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    assert!(summary.starts_with(&format!("from {sender} on 2021-02-24 ")) && summary.contains(&first_text), "{summary:.300}");
    assert!(summary.ends_with("to open the conversation in TimelinesAI"), "the link closes every part's summary");
}

/// A busy group chat: 1,500 messages of about 700 B of text in one 1 h window render to about
/// 2.5 MB, which no Kafka record holds. The bundle goes out as consecutive parts under
/// `chat.max_bundle_bytes` (default 512 KiB), each a whole TimelinesAI bundle, in order, with
/// its own summary and id; every message is in exactly one part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_over_the_cap_is_delivered_as_consecutive_whole_bundles_none_dropped() {
    const N: usize = 1_500;
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let cfg = config(&brokers, state.path(), &chat_subscription("bundles", TENANT, "1h", &rx.url("/bundles")));
    let cap = cfg.chat.max_bundle_bytes;
    let (daemon, stop) = start_on_clock(cfg, clock.clone()).await;
    let p = producer(&brokers);
    let sends = (0..N).map(|i| {
        let text = format!("{i:04} <p>&</p> {}", "lorem ipsum dolor sit amet ".repeat(26));
        let v = message(&format!("g{i:04}"), "group", T0 + i as i64 * 1000, "Trần Lê", &text);
        let p = p.clone();
        async move { produce(&p, "chat.messages", "group", Some(&v)).await }
    });
    futures::future::join_all(sends).await;
    let shared = daemon.shared.clone();
    wait_bundled(&shared, N as u64, 60).await;
    wait_open_bundles(&shared, 1, 30, "one bundle for the window").await;
    clock.set(AFTER_FIRST_WINDOW);
    wait_emitted(&shared, 1, 60).await;
    wait_until(Duration::from_secs(60), "every message delivered", || {
        let n: usize = bundles(&rx).iter().map(|b| message_ids(b).len()).sum();
        async move { n >= N }
    })
    .await;

    let mut parts: BTreeMap<usize, (String, Value, usize)> = BTreeMap::new();
    let mut total = None;
    for r in requests_to(&rx, "/bundles") {
        let (k, n) = r.header("hookd-bundle-part").expect("part header").split_once('/').unwrap();
        let (k, n): (usize, usize) = (k.parse().unwrap(), n.parse().unwrap());
        assert_eq!(*total.get_or_insert(n), n, "every part names the same count");
        let id = r.headers["webhook-id"].clone();
        let body = serde_json::from_slice(&r.body).unwrap();
        let old = parts.insert(k, (id.clone(), body, r.body.len()));
        assert!(old.is_none_or(|(old_id, ..)| old_id == id), "a part sent twice keeps its id");
    }
    let total = total.unwrap();
    assert!(total >= 5, "about 2.5 MB in parts of 512 KiB: {total}");
    assert_eq!(parts.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "parts 1..={total}, none missing");
    let mut delivered = Vec::new();
    for (k, (_, body, size)) in &parts {
        assert!(*size <= cap, "part {k}: {size} bytes over the cap of {cap}");
        assert_whole_bundle(body, "Trần Lê");
        delivered.extend(message_ids(body));
    }
    let want: Vec<String> = (0..N).map(|i| format!("g{i:04}")).collect();
    assert_eq!(delivered, want, "parts in order, messages in time order, each exactly once");
    let ids: HashSet<&String> = parts.values().map(|(id, ..)| id).collect();
    assert_eq!(ids.len(), total, "every part has an id of its own");
    assert_eq!(daemon.shared.metrics.bundles_split.get(), 1);
    let dlq = &daemon.shared.metrics.dlq_records;
    let letters: u64 = ["ingest", "render", "produce", "deliver", "subscriptions"].iter().map(|s| dlq.with_label_values(&[s]).get()).sum();
    assert_eq!(letters, 0, "nothing dead-lettered");
    stop.cancel();
    daemon.wait().await.unwrap();
}

/// The `webhook-id`s of bundle delivery records on `hookd.deliveries` created at `created_ms`.
fn bundle_ids_created_at(brokers: &str, n: usize, created_ms: i64) -> HashSet<String> {
    let records = read_topic(brokers, "hookd.deliveries", n, Duration::from_secs(20));
    let records = records.iter().map(|m| DeliveryRecord::decode(rdkafka::Message::payload(m).unwrap()).unwrap());
    records.filter(|r| r.event_name == "bundle" && r.created_ms == created_ms).map(|r| r.id).collect()
}

/// Bundle ids come from what the bundle holds. The same bundle read again with the state lost
/// (another group, empty state) keeps its id; a message arriving after its window was
/// delivered, rebuilt into that window by an instance without the window's state (after a
/// rebalance or wiped state), makes a bundle with other content and gets another id, so a
/// receiver that drops duplicates by id does not drop it. Each run starts before the window's
/// end and closes it once every message it read is in the bundle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_bundle_keeps_its_id_and_a_late_rebuilt_one_gets_a_new_one() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let subs = chat_subscription("bundles", TENANT, "1h", &rx.url("/bundles"));
    let states: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (brokers, rx, states, subs) = (&brokers, &rx, &states, &subs);
    // Runs `group` on empty state: the window's bundle of the `read` messages is emitted at
    // `AFTER_FIRST_WINDOW + n` seconds (its records' `created_ms`), the ids of what it emitted
    // are read off `hookd.deliveries` (holding n + 1 bundle records by then) and seen at the
    // receiver.
    let run = |group: &'static str, n: usize, read: u64| {
        let mut cfg = config(brokers, states[n].path(), subs);
        cfg.kafka.group_id = group.into();
        let clock = clock.clone();
        async move {
            clock.set(T0 + 60_000);
            let (daemon, stop) = start_on_clock(cfg, clock.clone()).await;
            wait_bundled(&daemon.shared, read, 30).await;
            clock.set(AFTER_FIRST_WINDOW + n as i64 * 1000);
            wait_emitted(&daemon.shared, 1, 30).await;
            assert_eq!(daemon.shared.metrics.events_consumed.with_label_values(&["chat"]).get(), read, "{group}: records read");
            let ids = bundle_ids_created_at(brokers, n + 1, AFTER_FIRST_WINDOW + n as i64 * 1000);
            wait_until(Duration::from_secs(30), "the bundle at the receiver", || {
                let got = rx.requests().iter().any(|r| ids.contains(&r.headers["webhook-id"]));
                async move { got }
            })
            .await;
            stop.cancel();
            daemon.wait().await.unwrap();
            ids
        }
    };
    let received = |id: &String| -> Vec<String> {
        let r = requests_to(rx, "/bundles").into_iter().find(|r| &r.headers["webhook-id"] == id).expect("received");
        message_ids(&serde_json::from_slice(&r.body).unwrap())
    };
    let p = producer(brokers);
    for i in 0..5 {
        produce(&p, "chat.messages", "c", Some(&message(&format!("m{i}"), "c", T0 + i * 60_000, "John Doe", &format!("text {i}")))).await;
    }
    let delivered = run("first", 0, 5).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(received(delivered.iter().next().unwrap()), ["m0", "m1", "m2", "m3", "m4"]);

    // The same records, read again by an instance without state: the same bundle, the same id.
    assert_eq!(run("replay", 1, 5).await, delivered, "a replay keeps the id");

    // A late message for the delivered window, read by an instance without the window's state
    // (the first group's committed offset is past the window's messages): other content.
    produce(&p, "chat.messages", "c", Some(&message("late", "c", T0 + 10 * 60_000, "John Doe", "late one"))).await;
    let late = run("first", 2, 1).await;
    assert_eq!(late.len(), 1, "one bundle of the late message");
    assert!(late.is_disjoint(&delivered), "the rebuilt window has other content and another id");
    assert_eq!(received(late.iter().next().unwrap()), ["late"]);
}

/// The committed offset of a chat partition follows what is read and finished when no bundle
/// of the partition is open: traffic that matches no aggregating subscription (unmatched, or
/// pass-through only) is not read again after a rebalance or lost state. Partition 0 had a
/// bundle, emitted before that traffic; partition 1 holds an open bundle meanwhile (and is
/// held at it until it is emitted); partition 2 never had one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_partitions_without_open_bundles_are_committed_to_the_end() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let subs =
        chat_subscription("bundles", TENANT, "1h", &rx.url("/bundles")) + &chat_subscription("pass", "ws-pass", "none", &rx.url("/pass"));
    let (daemon, stop) = start_on_clock(config(&brokers, state.path(), &subs), clock.clone()).await;
    let shared = daemon.shared.clone();
    let p = producer(&brokers);
    let send = |partition: i32, tenant: &'static str, id: String, ts_ms: i64| {
        let p = p.clone();
        async move { produce_to(&p, "chat.messages", partition, &id, &message_of(tenant, &id, &id, ts_ms, "John Doe", "hi")).await }
    };
    send(0, TENANT, "a1".into(), T0).await; // 16:00-17:00
    send(1, TENANT, "b1".into(), T0 + 2 * 3_600_000).await; // 18:00-19:00
    wait_open_bundles(&shared, 2, 30, "a bundle on partitions 0 and 1").await;
    clock.set(AFTER_FIRST_WINDOW);
    wait_emitted(&shared, 1, 30).await;
    wait_open_bundles(&shared, 1, 30, "partition 1's bundle still open").await;

    for i in 0..2 {
        send(1, "ws-pass", format!("p1-{i}"), T0).await;
    }
    rx.wait_for(3, Duration::from_secs(30)).await; // the bundle and both pass-through messages
    for i in 0..3 {
        send(0, "nobody", format!("u0-{i}"), T0).await;
        send(0, "ws-pass", format!("p0-{i}"), T0).await;
        send(2, "nobody", format!("u2-{i}"), T0).await;
        send(2, "ws-pass", format!("p2-{i}"), T0).await;
    }
    let offsets = GroupOffsets::new(&brokers, "hookd-test");
    let committed = || offsets.committed("chat.messages", &[0, 1, 2]);
    wait_until(Duration::from_secs(30), "partitions 0 and 2 committed to their end", || {
        let c = committed();
        async move { c[0] == Some(7) && c[2] == Some(6) }
    })
    .await;
    assert_eq!(committed()[1], Some(0), "partition 1 is held at its open bundle");
    assert_eq!(shared.metrics.events_unmatched.with_label_values(&["chat"]).get(), 6);

    clock.set(T0 + 3 * 3_600_000); // 19:25: partition 1's bundle closes
    wait_emitted(&shared, 2, 30).await;
    wait_until(Duration::from_secs(30), "partition 1 committed to its end once its bundle is emitted", || {
        let c = committed();
        async move { c[1] == Some(3) }
    })
    .await;
    stop.cancel();
    daemon.wait().await.unwrap();
}
