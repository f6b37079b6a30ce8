//! Several `hookd` processes in one consumer group on an Apache Kafka broker (issue 12 item 4):
//! one is SIGKILLed under load and nothing is lost (duplicates keep their `webhook-id`); one
//! joins while chat bundles are open and every message ends up in exactly its bundle, with
//! only the moved partitions read again (`hookd_records_replayed_total` per instance).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::kafka::{Kafka, Topics};
use common::process::Hookd;
use common::receiver::Receiver;
use common::*;
use serde_json::{json, Value};

const PARTITIONS: i32 = 6;

/// One instance: its directory (config, state, log) and admin port.
struct Instance {
    dir: PathBuf,
    cfg: PathBuf,
    admin: u16,
}

impl Instance {
    fn new(root: &Path, name: &str, brokers: &str, topics: &Topics, extra: &str) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let admin = free_port();
        let cfg = write_e2e_config(&dir, brokers, topics, admin, "per_subscription_concurrency = 4", extra);
        Self { dir, cfg, admin }
    }

    fn spawn(&self) -> Hookd {
        spawn_hookd(&self.cfg, &self.dir.join("hookd.log"))
    }

    /// The value of one series of its `/metrics` (`name{labels}`, labels as printed), if up.
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.admin)).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    async fn ingest(&self, family: &str) -> u64 {
        self.metric(&format!("hookd_{family}_total{{stage=\"ingest\"}}")).await.unwrap_or(0.0) as u64
    }
}

/// Waits until the instances together own every ingest partition (crm.events and
/// chat.messages) with none of them still being moved.
async fn until_balanced(instances: &[&Instance], what: &str) {
    wait_until(Duration::from_secs(60), what, || async move {
        let mut owned = 0;
        for i in instances {
            let (assigned, revoked) = (i.ingest("partitions_assigned").await, i.ingest("partitions_revoked").await);
            if assigned == revoked {
                return false; // not (yet) up, or owns nothing
            }
            owned += assigned - revoked;
        }
        owned == 2 * PARTITIONS as u64
    })
    .await;
}

/// Event number → webhook-ids it was delivered with.
fn crm_deliveries(rx: &Receiver) -> HashMap<u64, HashSet<String>> {
    let mut by_event: HashMap<u64, HashSet<String>> = HashMap::new();
    for r in rx.requests() {
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        by_event.entry(body["data"]["n"].as_u64().expect("event number")).or_default().insert(r.headers["webhook-id"].clone());
    }
    by_event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_one_of_three_under_load_loses_nothing_and_keeps_ids() {
    const N: u64 = 3_000;
    let broker = Kafka::shared();
    let topics = Topics::unique("scale-kill");
    topics.create(&broker.bootstrap, PARTITIONS);
    let rx = Receiver::start().await;
    let root = tempfile::tempdir().unwrap();
    let sub = format!("[[subscription]]\nid = \"e2e\"\ntenant = \"t\"\nurl = \"{}\"\ndialect = \"standard\"\n", rx.url("/e2e"));
    let instances: Vec<Instance> =
        ["a", "b", "c"].iter().map(|n| Instance::new(root.path(), n, &broker.bootstrap, &topics, &sub)).collect();
    let mut procs: Vec<Hookd> = instances.iter().map(Instance::spawn).collect();
    until_balanced(&instances.iter().collect::<Vec<_>>(), "three instances sharing the partitions").await;

    let p = producer(&broker.bootstrap);
    let topic = topics.name("crm.events");
    let publish = async {
        for chunk in (0..N).collect::<Vec<_>>().chunks(100) {
            let sends = chunk.iter().map(|i| {
                let v = crm_event(&format!("evt-{i}"), "t", "contact.created", json!({"n": i}));
                let (p, topic) = (p.clone(), topic.clone());
                async move { produce(&p, &topic, &format!("k{i}"), Some(&v)).await }
            });
            futures::future::join_all(sends).await;
            tokio::time::sleep(Duration::from_millis(20)).await; // a steady load, not one burst
        }
    };
    let kill = async {
        wait_until(Duration::from_secs(60), "a first share of the deliveries", || {
            let got = rx.requests().len();
            async move { got >= N as usize / 5 }
        })
        .await;
        procs[1].kill();
    };
    tokio::join!(publish, kill);
    let at_kill = rx.requests().len();
    wait_until(Duration::from_secs(90), &format!("all {N} events delivered after the kill"), || {
        let n = crm_deliveries(&rx).len();
        async move { n == N as usize }
    })
    .await;
    let by_event = crm_deliveries(&rx);
    let changed: Vec<_> = by_event.iter().filter(|(_, ids)| ids.len() != 1).map(|(n, _)| *n).take(10).collect();
    assert!(changed.is_empty(), "a duplicate delivered with another webhook-id: events {changed:?}");
    let total = rx.requests().len();
    println!("scale kill test: {N} events, {at_kill} requests at the kill, {total} in all, {} duplicates", total - N as usize);
    assert!(at_kill < N as usize, "the kill landed under load, with deliveries outstanding");
    for (i, proc) in procs.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
        assert!(proc.terminate().success(), "instance {i} stops cleanly");
    }
}

/// Chat messages over `chats` chats, `per_chat` each, all timestamped `ts_ms`.
async fn publish_chat(brokers: &str, topics: &Topics, chats: usize, per_chat: usize, ts_ms: i64) {
    let topic = topics.name("chat.messages");
    let p = producer(brokers);
    let sends = (0..chats * per_chat).map(|i| {
        let chat = format!("chat-{}", i % chats);
        let v = json!({"id": format!("m{i}"), "tenant": "ws", "direction": "received", "timestamp": ts_ms,
            "account": {"full_name": "A", "email": "a@example.com", "phone": "+1"},
            "chat": {"id": chat, "full_name": "C", "url": format!("https://app.example.com/chat/{chat}/")},
            "sender": {"full_name": "S", "phone": "+2"}, "recipient": {"full_name": "R", "phone": "+3"},
            "text": format!("text {i}")})
        .to_string();
        let (p, topic) = (p.clone(), topic.clone());
        async move { produce(&p, &topic, &chat, Some(&v)).await }
    });
    futures::future::join_all(sends).await;
}

/// Chat id → (webhook-ids of its bundles, message ids over all of them, with repeats).
fn chat_bundles(rx: &Receiver) -> HashMap<String, (BTreeSet<String>, Vec<String>)> {
    let mut out: HashMap<String, (BTreeSet<String>, Vec<String>)> = HashMap::new();
    for r in rx.requests() {
        let b: Value = serde_json::from_slice(&r.body).unwrap();
        let entry = out.entry(b["chat"]["chat_id"].as_str().expect("a bundle's chat id").to_string()).or_default();
        entry.0.insert(r.headers["webhook-id"].clone());
        entry.1.extend(b["messages"].as_array().expect("a bundle").iter().map(|m| m["message_id"].as_str().unwrap().to_string()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_instance_joining_with_open_bundles_replays_only_moved_partitions() {
    const CHATS: usize = 60;
    const PER_CHAT: usize = 5;
    let broker = Kafka::shared();
    let topics = Topics::unique("scale-join");
    topics.create(&broker.bootstrap, PARTITIONS);
    let rx = Receiver::start().await;
    let root = tempfile::tempdir().unwrap();
    let extra = format!(
        "[chat]\ngrace_ms = 500\n[[subscription]]\nid = \"bundles\"\ntenant = \"ws\"\nsource = \"chat\"\naggregation = \"20s\"\nurl = \"{}\"\n",
        rx.url("/bundles")
    );
    let [a, b, c] = ["a", "b", "c"].map(|n| Instance::new(root.path(), n, &broker.bootstrap, &topics, &extra));
    let (mut pa, mut pb) = (a.spawn(), b.spawn());
    until_balanced(&[&a, &b], "two instances sharing the partitions").await;
    let assigned_before = (a.ingest("partitions_assigned").await, b.ingest("partitions_assigned").await);

    // One window 40-60 s ahead: the bundles stay open while the third instance joins.
    let ts = chrono::Utc::now().timestamp_millis() + 40_000;
    publish_chat(&broker.bootstrap, &topics, CHATS, PER_CHAT, ts).await;
    wait_until(Duration::from_secs(30), "every chat's bundle open on the two instances", || async {
        let (oa, ob) = (a.metric("hookd_open_bundles").await, b.metric("hookd_open_bundles").await);
        oa.zip(ob).is_some_and(|(x, y)| x + y == CHATS as f64)
    })
    .await;
    assert_eq!(rx.requests().len(), 0, "no bundle closed before the join");

    let revoked_before = a.ingest("partitions_revoked").await + b.ingest("partitions_revoked").await;
    let mut pc = c.spawn();
    until_balanced(&[&a, &b, &c], "three instances sharing the partitions").await;
    let window_end = ts - ts.rem_euclid(20_000) + 20_000;
    assert!(chrono::Utc::now().timestamp_millis() < window_end, "the join completed while the bundles were open");
    let moved = c.ingest("partitions_assigned").await;
    let revoked = a.ingest("partitions_revoked").await + b.ingest("partitions_revoked").await - revoked_before;
    assert!(moved > 0 && moved < 2 * PARTITIONS as u64, "some partitions moved to the third ({moved})");
    assert_eq!(revoked, moved, "what the two gave up, the third took");
    let assigned_after = (a.ingest("partitions_assigned").await, b.ingest("partitions_assigned").await);
    assert_eq!(assigned_after, assigned_before, "the two were assigned nothing again (an eager rebalance would reassign)");

    wait_until(Duration::from_secs(90), "every chat's bundle delivered", || {
        let n = chat_bundles(&rx).len();
        async move { n == CHATS }
    })
    .await;
    for (chat, (ids, messages)) in chat_bundles(&rx) {
        assert_eq!(ids.len(), 1, "{chat}: one bundle, delivered under one id ({ids:?})");
        let distinct: BTreeSet<&String> = messages.iter().collect();
        assert_eq!(distinct.len(), PER_CHAT, "{chat}: every message of the chat in its bundle ({messages:?})");
        assert!(messages.len() % PER_CHAT == 0, "{chat}: a repeat delivers the whole bundle again, never part of it");
    }
    let (ra, rb, rc) = (a.ingest("records_replayed").await, b.ingest("records_replayed").await, c.ingest("records_replayed").await);
    let read_by_c = c.metric("hookd_events_consumed_total{source=\"chat\"}").await.unwrap_or(0.0) as u64;
    println!("scale join test: {moved} partitions moved; replayed a={ra} b={rb} c={rc}; c read {read_by_c} chat records");
    assert_eq!((ra, rb), (0, 0), "partitions that stayed were not read again");
    assert_eq!(rc, read_by_c, "the third read again exactly the moved chat partitions' records");
    for proc in [&mut pa, &mut pb, &mut pc] {
        assert!(proc.terminate().success(), "a clean stop");
    }
}

/// Static membership: an instance with `kafka.instance_id` that restarts within the session
/// timeout gets its partitions back without a rebalance (the other instance gives up and takes
/// nothing), and with its sled kept reads nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_restarting_within_the_session_timeout_moves_nothing() {
    let broker = Kafka::shared();
    let topics = Topics::unique("scale-static");
    topics.create(&broker.bootstrap, PARTITIONS);
    let rx = Receiver::start().await;
    let root = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[subscription]]\nid = \"bundles\"\ntenant = \"ws\"\nsource = \"chat\"\naggregation = \"24h\"\nurl = \"{}\"\n",
        rx.url("/bundles")
    );
    let [a, b] = ["a", "b"].map(|n| {
        let i = Instance::new(root.path(), n, &broker.bootstrap, &topics, &extra);
        let text = std::fs::read_to_string(&i.cfg).unwrap().replacen("[kafka]\n", &format!("[kafka]\ninstance_id = \"scale-{n}\"\n"), 1);
        std::fs::write(&i.cfg, text).unwrap();
        i
    });
    let (mut pa, mut pb) = (a.spawn(), b.spawn());
    until_balanced(&[&a, &b], "two static members sharing the partitions").await;
    publish_chat(&broker.bootstrap, &topics, 30, 2, chrono::Utc::now().timestamp_millis()).await;
    wait_until(Duration::from_secs(30), "every chat's bundle open", || async {
        let (oa, ob) = (a.metric("hookd_open_bundles").await, b.metric("hookd_open_bundles").await);
        oa.zip(ob).is_some_and(|(x, y)| x + y == 30.0)
    })
    .await;
    let before = (b.ingest("partitions_assigned").await, b.ingest("partitions_revoked").await);
    let owned_by_a = a.ingest("partitions_assigned").await - a.ingest("partitions_revoked").await;

    assert!(pa.terminate().success(), "a clean stop");
    let mut pa = a.spawn();
    wait_until(Duration::from_secs(30), "the restarted member owning its partitions again", || async {
        a.ingest("partitions_assigned").await == owned_by_a
    })
    .await;
    assert_eq!((b.ingest("partitions_assigned").await, b.ingest("partitions_revoked").await), before, "the other member saw no rebalance");
    assert_eq!(a.ingest("partitions_revoked").await, 0, "nothing was taken from the restarted member");
    assert_eq!(a.ingest("records_replayed").await, 0, "the restarted member read nothing again (sled kept, settled positions)");
    assert!(pa.terminate().success() && pb.terminate().success(), "clean stops");
}
