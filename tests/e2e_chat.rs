//! Chat bundles end to end: the `hookd` binary on an Apache Kafka broker process, killed, stopped,
//! and restarted with and without its sled directory (DESIGN section 2, issue 3 point 6).
//! The windows are short (4 s) real-time windows; the assertion is that every message ends
//! up in a delivered bundle, never how fast.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use common::kafka::{Kafka, Topics};
use common::receiver::Receiver;
use common::*;
use serde_json::{json, Value};

const CHATS: usize = 200;
const MESSAGES: usize = 1200;

fn write_config(dir: &Path, brokers: &str, topics: &Topics, url: &str, admin_port: u16) -> std::path::PathBuf {
    let extra = format!(
        "[chat]\ngrace_ms = 500\n[[subscription]]\nid = \"bundles\"\ntenant = \"ws\"\nsource = \"chat\"\naggregation = \"4s\"\nurl = \"{url}\"\n"
    );
    write_e2e_config(dir, brokers, topics, admin_port, "", &extra)
}

async fn publish(brokers: &str, topics: &Topics) {
    let topic = topics.name("chat.messages");
    let p = producer(brokers);
    let now = chrono::Utc::now().timestamp_millis();
    let sends = (0..MESSAGES).map(|i| {
        let chat = format!("chat-{}", i % CHATS);
        let v = json!({"id": format!("m{i}"), "tenant": "ws", "direction": "received", "timestamp": now,
            "account": {"full_name": "A", "email": "a@example.com", "phone": "+1"},
            "chat": {"id": chat, "full_name": "C", "url": format!("https://app.example.com/chat/{chat}/")},
            "sender": {"full_name": "S", "phone": "+2"}, "recipient": {"full_name": "R", "phone": "+3"},
            "text": format!("text {i} ✓")})
        .to_string();
        let (p, topic) = (p.clone(), topic.clone());
        async move { produce(&p, &topic, &chat, Some(&v)).await }
    });
    futures::future::join_all(sends).await;
}

/// Message id → how many delivered bundles (distinct webhook-ids) hold it.
fn delivered(rx: &Receiver) -> HashMap<String, HashSet<String>> {
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in rx.requests() {
        let b: Value = serde_json::from_slice(&r.body).unwrap();
        for m in b["messages"].as_array().expect("a bundle") {
            out.entry(m["message_id"].as_str().unwrap().to_string()).or_default().insert(r.headers["webhook-id"].clone());
        }
    }
    out
}

async fn open_bundles(admin_port: u16) -> Option<i64> {
    let text = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("hookd_open_bundles ")).and_then(|v| v.trim().parse().ok())
}

async fn until_bundles_open(admin_port: u16) {
    wait_until(Duration::from_secs(300), "open bundles in the running daemon", || async move {
        open_bundles(admin_port).await.is_some_and(|n| n >= (CHATS / 2) as i64)
    })
    .await;
}

async fn until_all_delivered(rx: &Receiver) {
    wait_until(Duration::from_secs(300), "every message in a delivered bundle", || {
        let n = delivered(rx).len();
        async move { n == MESSAGES }
    })
    .await;
}

struct Setup {
    rx: Receiver,
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    admin: u16,
}

async fn setup() -> Setup {
    let broker = Kafka::shared();
    let topics = Topics::unique("chat");
    topics.create(&broker.bootstrap, 3);
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = write_config(dir.path(), &broker.bootstrap, &topics, &rx.url("/bundles"), admin);
    publish(&broker.bootstrap, &topics).await;
    Setup { rx, dir, cfg, admin }
}

/// SIGKILL with open bundles, optionally delete the state directory, restart, and wait
/// until every message is in a delivered bundle.
async fn kill_and_restart(delete_state: bool) -> Setup {
    let s = setup().await;
    let mut first = spawn_hookd(&s.cfg, &s.dir.path().join("run1.log"));
    until_bundles_open(s.admin).await;
    first.kill();
    if delete_state {
        std::fs::remove_dir_all(s.dir.path().join("state")).expect("state directory existed");
    }
    let mut second = spawn_hookd(&s.cfg, &s.dir.path().join("run2.log"));
    until_all_delivered(&s.rx).await;
    second.kill();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_open_bundles_then_restart_delivers_every_message() {
    let s = kill_and_restart(false).await;
    println!("chat kill test: {} bundle requests for {MESSAGES} messages over {CHATS} chats", s.rx.requests().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_state_is_rebuilt_by_replay() {
    let s = kill_and_restart(true).await;
    println!("chat replay test: {} bundle requests for {MESSAGES} messages after the state was deleted", s.rx.requests().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_open_bundles_then_restart_continues_them() {
    let s = setup().await;
    let mut first = spawn_hookd(&s.cfg, &s.dir.path().join("run1.log"));
    until_bundles_open(s.admin).await;
    assert!(first.terminate().success(), "SIGTERM exits 0");
    let before = s.rx.requests().len();
    let mut second = spawn_hookd(&s.cfg, &s.dir.path().join("run2.log"));
    until_all_delivered(&s.rx).await;
    let dup: usize = delivered(&s.rx).values().filter(|ids| ids.len() > 1).count();
    assert_eq!(dup, 0, "after a graceful stop no message is bundled twice");
    let log = std::fs::read_to_string(s.dir.path().join("run2.log")).unwrap();
    assert!(!log.contains("wiping"), "the state store was reused:\n{log}");
    println!("chat sigterm test: {before} bundles before stop, {} in all", s.rx.requests().len());
    assert!(second.terminate().success());
}
