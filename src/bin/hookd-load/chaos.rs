//! `chaos`: faults and bad input under a mixed load, hookd as a child process (`serve`).
//!
//! For the whole run a producer thread sends CRM events (5 tenants, one subscription each, the
//! five built-in dialects in turn) and chat messages (one tenant, 50 chats, 5 s windows, so
//! bundles open and close all the time), each carrying a marker (`chaosevt<N>x`,
//! `chaosmsg<N>x`) that the receiver finds in every body, JSON or XML. One record in 20 is
//! malformed (invalid UTF-8, deep nesting, wrong types, empty values, an empty record, a huge
//! string over `ingest.max_record_bytes`), and a flood of them comes half-way through.
//! Meanwhile hookd is SIGKILLed at random moments (10 times at full scale) and restarted at
//! once, and the broker is restarted under the running daemon (SIGKILL once, SIGTERM once).
//!
//! At the end it waits for the stream to drain and reports records in, deliveries expected and
//! received, lost, duplicates, DLQ records against malformed records sent, panics in hookd's
//! log, and the time to recover after each kill. It fails when anything was lost, a CRM event
//! came under two `webhook-id`s, the DLQ does not hold every malformed record, or hookd
//! panicked: at-least-once means duplicates are allowed, losses are not.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::broker::{free_port, Kafka, LoadProducer, Rec};
use crate::daemon::{self, ChildDaemon};
use crate::receiver::Receiver;
use crate::report::{Row, Target};
use crate::workload;
use crate::Opts;

const CRM_TENANTS: usize = 5;
const CHATS: usize = 50;
/// Records per 10 ms tick of the producer: 300 CRM events/s and 100 chat messages/s.
const CRM_PER_TICK: usize = 3;
const CHAT_PER_TICK: usize = 1;
/// One record in this many is malformed.
const MALFORMED_EVERY: u64 = 20;
/// Below the broker's 1 MiB record limit, so the huge-string records reach hookd and are
/// refused by its own check.
const MAX_RECORD_BYTES: usize = 256 * 1024;

/// What came out of the pipeline: marker → the `webhook-id`s of the bodies that held it.
#[derive(Default)]
struct Seen {
    crm: HashMap<u64, HashSet<String>>,
    chat: HashMap<u64, HashSet<String>>,
}

/// Every number that follows `tag` and ends in `x` in `body`.
fn markers(body: &[u8], tag: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = body[at..].windows(tag.len()).position(|w| w == tag) {
        let start = at + i + tag.len();
        let end = body[start..].iter().position(|b| !b.is_ascii_digit()).map_or(body.len(), |e| start + e);
        if end > start && body.get(end) == Some(&b'x') {
            if let Some(n) = std::str::from_utf8(&body[start..end]).ok().and_then(|s| s.parse().ok()) {
                out.push(n);
            }
        }
        at = end.max(start);
    }
    out
}

fn inspector(seen: Arc<Mutex<Seen>>) -> crate::receiver::Inspector {
    Arc::new(move |id: &str, body: &[u8]| {
        let mut s = seen.lock().expect("seen poisoned");
        for n in markers(body, b"chaosevt") {
            s.crm.entry(n).or_default().insert(id.to_string());
        }
        for n in markers(body, b"chaosmsg") {
            s.chat.entry(n).or_default().insert(id.to_string());
        }
    })
}

fn crm_event(n: u64) -> (String, Vec<u8>) {
    let tenant = n as usize % CRM_TENANTS;
    let value = format!(
        r#"{{"id":"chaosevt{n}x","tenant":"t{tenant}","type":"contact.created","occurred_at":1618118040123,"data":{{"contact":{{"name":"chaosevt{n}x","contactId":"chaosevt{n}x","email":"c{n}@example.com"}}}}}}"#
    );
    (format!("t{tenant}"), value.into_bytes())
}

fn chat_message(n: u64) -> (String, Vec<u8>) {
    let chat = format!("{}", 20_000_000 + n as usize % CHATS);
    let now = chrono::Utc::now().timestamp_millis();
    let value = workload::chat_message(&format!("chaosmsg{n}x"), &workload::ChatLoad::tenant(0), &chat, now, n as usize, "chaos");
    (chat, value)
}

/// Malformed record `n`: each kind in turn.
fn malformed(n: u64) -> Vec<u8> {
    match n % 6 {
        0 => b"{\"id\":\"\xff\xfe\",\"tenant\":\"t0\"}".to_vec(),
        1 => "[".repeat(5_000).into_bytes(),
        2 => br#"{"id":"x","tenant":["t0"],"type":5,"occurred_at":"yesterday","data":1}"#.to_vec(),
        3 => br#"{"id":"","tenant":"","type":"","occurred_at":0,"data":{}}"#.to_vec(),
        4 => Vec::new(),
        _ => {
            format!(r#"{{"id":"big{n}","tenant":"t0","type":"contact.created","occurred_at":1,"data":{{"s":"{}"}}}}"#, "a".repeat(300_000))
                .into_bytes()
        }
    }
}

/// Counts of records the broker acknowledged (every send is acknowledged or the run fails).
#[derive(Default)]
struct Sent {
    crm: AtomicU64,
    chat: AtomicU64,
    malformed: AtomicU64,
}

/// The producer thread: steady mixed load until `stop`, a flood of malformed records when
/// `flood` is set. Its records ride out broker restarts (a 5-minute message timeout).
fn produce(bootstrap: &str, topics: (String, String), sent: &Sent, stop: &AtomicBool, flood: &AtomicU64) -> anyhow::Result<()> {
    let p = LoadProducer::with(bootstrap, 5, &[("message.timeout.ms", "300000"), ("message.max.bytes", "2000000")])?;
    let (crm_topic, chat_topic) = topics;
    let mut next = 0u64;
    let bad = |p: &LoadProducer| -> anyhow::Result<()> {
        let n = sent.malformed.fetch_add(1, Ordering::Relaxed);
        let topic = if n % 2 == 0 { &crm_topic } else { &chat_topic };
        p.send(topic, Rec { key: &format!("bad-{n}"), value: &malformed(n), partition: None })
    };
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..flood.swap(0, Ordering::Relaxed) {
            bad(&p)?;
        }
        for _ in 0..CRM_PER_TICK {
            next += 1;
            if next % MALFORMED_EVERY == 0 {
                bad(&p)?;
            }
            let (key, value) = crm_event(sent.crm.fetch_add(1, Ordering::Relaxed));
            p.send(&crm_topic, Rec { key: &key, value: &value, partition: None })?;
        }
        for _ in 0..CHAT_PER_TICK {
            let (key, value) = chat_message(sent.chat.fetch_add(1, Ordering::Relaxed));
            p.send(&chat_topic, Rec { key: &key, value: &value, partition: None })?;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    p.finish().map(drop)
}

/// Distinct source coordinates of the dead letters of stage `ingest`, and other dead letters.
fn read_dlq(bootstrap: &str, topic: &str) -> anyhow::Result<(HashSet<(String, i32, i64)>, u64)> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", "chaos-dlq-reader").create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in md.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        let (_, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        ends.insert(p.id(), high);
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let (mut distinct, mut other) = (HashSet::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut at: HashMap<i32, i64> = HashMap::new();
    while ends.iter().any(|(p, high)| at.get(p).copied().unwrap_or(0) < *high) && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else { continue };
        at.insert(m.partition(), m.offset() + 1);
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        if header("hookd-dlq-stage").as_deref() != Some("ingest") {
            other += 1;
            continue;
        }
        let source = (header("hookd-dlq-topic"), header("hookd-dlq-partition"), header("hookd-dlq-offset"));
        if let (Some(t), Some(p), Some(o)) = source {
            distinct.insert((t, p.parse().unwrap_or(-1), o.parse().unwrap_or(-1)));
        }
    }
    Ok((distinct, other))
}

/// The run's fixed parts: broker, receiver, hookd's config and directory.
struct Rig {
    dir: tempfile::TempDir,
    kafka: Kafka,
    config: String,
    admin: SocketAddr,
    rx: Receiver,
    seen: Arc<Mutex<Seen>>,
    /// hookd's topics (the defaults of `config/hookd.toml`).
    topics: hookd::config::TopicsConfig,
}

impl Rig {
    async fn new(opts: Opts) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("hookd-load-chaos-").tempdir()?;
        let kafka = Kafka::start(&dir.path().join("broker"))?;
        let setup = daemon::config(opts, &kafka.bootstrap, "setup", &dir.path().join("setup"), "")?;
        hookd::kafka::ensure_topics(&setup).await?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (rx, addr) = Receiver::start_inspecting(Some(inspector(seen.clone())))?;
        let subs = format!(
            "{}{}\n[chat]\ngrace_ms = 500\n[ingest]\nmax_record_bytes = {MAX_RECORD_BYTES}\n",
            workload::crm_subscriptions(CRM_TENANTS, addr),
            workload::chat_subscriptions(1, "5s", addr)
        );
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut config = daemon::config_text(opts, &kafka.bootstrap, "hookd-chaos", &dir.path().join("state"), &admin.to_string(), &subs)?;
        config = config.replacen("[kafka]\n", "[kafka]\nsession_timeout_ms = 6000\ncommit_interval_ms = 200\n", 1);
        hookd::config::Config::parse(&config)?;
        Ok(Self { dir, kafka, config, admin, rx, seen, topics: setup.topics })
    }

    fn spawn(&self) -> anyhow::Result<ChildDaemon> {
        ChildDaemon::spawn(self.dir.path(), &self.config, self.admin)
    }

    /// Seconds until the receiver gets a request it had not got before `since`.
    async fn until_delivering(&self, since: u64, what: &str) -> anyhow::Result<f64> {
        let t = Instant::now();
        daemon::until(Duration::from_secs(180), what, || self.rx.snapshot().requests > since).await?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn lost(&self, sent: &Sent) -> (u64, u64) {
        let s = self.seen.lock().expect("seen poisoned");
        let crm = (0..sent.crm.load(Ordering::Relaxed)).filter(|n| !s.crm.contains_key(n)).count() as u64;
        let chat = (0..sent.chat.load(Ordering::Relaxed)).filter(|n| !s.chat.contains_key(n)).count() as u64;
        (crm, chat)
    }
}

/// The faults: `kills` SIGKILLs of hookd at random moments, the broker restarted after a third
/// and two thirds of them, a flood of malformed records half-way. Returns the recovery times
/// after each kill and each broker restart, and the last running daemon.
async fn faults(rig: &mut Rig, opts: Opts, flood: &AtomicU64) -> anyhow::Result<(Vec<f64>, Vec<f64>, ChildDaemon)> {
    let kills = opts.scaled(10, 2);
    let restarts_at: Vec<usize> = if opts.scale >= 0.5 { vec![kills / 3, 2 * kills / 3] } else { vec![kills / 2] };
    let (mut after_kill, mut after_broker) = (Vec::new(), Vec::new());
    let mut child = rig.spawn()?;
    rig.until_delivering(0, "first deliveries").await?;
    for k in 0..kills {
        let wait = rand::thread_rng().gen_range(1_500..4_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        child.check_alive()?;
        child.kill()?;
        let since = rig.rx.snapshot().requests;
        child = rig.spawn()?;
        let secs = rig.until_delivering(since, "deliveries after a SIGKILL and restart").await?;
        eprintln!("    kill {}: delivering again {secs:.1} s after the restart", k + 1);
        after_kill.push(secs);
        if k == kills / 2 {
            flood.store(opts.scaled(2_000, 100) as u64, Ordering::Relaxed);
        }
        if restarts_at.contains(&k) {
            let crash = after_broker.is_empty();
            tokio::task::block_in_place(|| rig.kafka.stop(crash))?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let since = rig.rx.snapshot().requests;
            let up = tokio::task::block_in_place(|| rig.kafka.resume())?;
            let secs = rig.until_delivering(since, "deliveries after a broker restart").await?;
            let how = if crash { "SIGKILL" } else { "SIGTERM" };
            eprintln!("    broker {how}ed and restarted ({:.1} s to start): hookd delivering again after {secs:.1} s", up.as_secs_f64());
            after_broker.push(secs);
        }
    }
    Ok((after_kill, after_broker, child))
}

/// Waits until nothing is missing, or nothing new arrived for two minutes.
async fn drain(rig: &Rig, sent: &Sent) -> (u64, u64) {
    let (mut last, mut moved) = (rig.rx.snapshot().requests, Instant::now());
    loop {
        let (crm, chat) = rig.lost(sent);
        if crm + chat == 0 || moved.elapsed() > Duration::from_secs(120) {
            return (crm, chat);
        }
        let now = rig.rx.snapshot().requests;
        if now > last {
            (last, moved) = (now, Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn panics(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.matches("panicked at").count())
}

pub async fn run(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let mut rig = Rig::new(opts).await?;
    let sent = Arc::new(Sent::default());
    let (stop, flood) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let topics = (rig.topics.crm_events.clone(), rig.topics.chat_messages.clone());
    let (b, s, st, fl) = (rig.kafka.bootstrap.clone(), sent.clone(), stop.clone(), flood.clone());
    let producer = tokio::task::spawn_blocking(move || produce(&b, topics, &s, &st, &fl));
    let faulted = faults(&mut rig, opts, &flood).await;
    stop.store(true, Ordering::Relaxed);
    producer.await??;
    let (after_kill, after_broker, mut child) = faulted?;
    let (lost_crm, lost_chat) = drain(&rig, &sent).await;
    let malformed = sent.malformed.load(Ordering::Relaxed);
    let (b, dlq_topic) = (rig.kafka.bootstrap.clone(), rig.topics.dlq.clone());
    let mut dlq = (HashSet::new(), 0);
    let started = Instant::now();
    while (dlq.0.len() as u64) < malformed && started.elapsed() < Duration::from_secs(120) {
        let (b, t) = (b.clone(), dlq_topic.clone());
        dlq = tokio::task::spawn_blocking(move || read_dlq(&b, &t)).await??;
    }
    child.check_alive()?;
    child.terminate(Duration::from_secs(60))?;
    let panicked = panics(&rig.dir.path().join("hookd.log"));
    let seen = rig.seen.lock().expect("seen poisoned");
    let crm_multi = seen.crm.values().filter(|ids| ids.len() > 1).count();
    let chat_multi = seen.chat.values().filter(|ids| ids.len() > 1).count();
    let snap = rig.rx.snapshot();
    let (crm, chat) = (sent.crm.load(Ordering::Relaxed), sent.chat.load(Ordering::Relaxed));
    let one = |figure, unit, v: f64, target| {
        let mut r = Row::new("chaos", figure, unit, target);
        r.values.push(v);
        r
    };
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let rows = vec![
        one("records in: CRM events", "records", crm as f64, None),
        one("records in: chat messages", "records", chat as f64, None),
        one("records in: malformed", "records", malformed as f64, None),
        one("deliveries expected (events + bundled messages)", "items", (crm + chat) as f64, None),
        one("deliveries received (distinct items)", "items", (crm + chat - lost_crm - lost_chat) as f64, None),
        one("lost", "items", (lost_crm + lost_chat) as f64, Some(Target::Below(1.0))),
        one("duplicate requests (same webhook-id again)", "requests", (snap.requests - snap.distinct) as f64, None),
        one("CRM events under more than one webhook-id", "events", crm_multi as f64, Some(Target::Below(1.0))),
        one("chat messages in bundles of different ids", "messages", chat_multi as f64, None),
        one("DLQ records, distinct sources (= malformed)", "records", dlq.0.len() as f64, None),
        one("DLQ records of other stages", "records", dlq.1 as f64, None),
        one("panics in hookd's log", "panics", panicked as f64, Some(Target::Below(1.0))),
        one("SIGKILLs of hookd", "kills", after_kill.len() as f64, None),
        one("broker restarts", "restarts", after_broker.len() as f64, None),
        one("recovery after a kill: median", "s", crate::report::median(&after_kill), None),
        one("recovery after a kill: max", "s", max(&after_kill), None),
        one("recovery after a broker restart: max", "s", max(&after_broker), None),
    ];
    let failed = lost_crm + lost_chat > 0 || crm_multi > 0 || dlq.0.len() as u64 != malformed || panicked > 0;
    if failed {
        for r in &rows {
            eprintln!("    {}", r.summary());
        }
        anyhow::bail!(
            "chaos: {lost_crm} CRM events and {lost_chat} chat messages lost, {crm_multi} CRM events under several ids, \
             {} of {malformed} malformed records in the DLQ, {panicked} panics (hookd's log: {})",
            dlq.0.len(),
            rig.dir.keep().join("hookd.log").display()
        );
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_markers_in_json_and_xml() {
        assert_eq!(markers(br#"{"a":"chaosevt12x","b":"chaosevt7x chaosevt9"}"#, b"chaosevt"), vec![12, 7]);
        assert_eq!(markers(b"<name>chaosmsg3x</name>", b"chaosmsg"), vec![3]);
    }

    #[test]
    fn generated_records_decode_and_malformed_ones_do_not() {
        let (_, v) = crm_event(4);
        hookd::ingest::event::CrmEvent::decode(&v, MAX_RECORD_BYTES).unwrap();
        let (_, v) = chat_message(4);
        hookd::ingest::chat::ChatMessage::decode(&v, MAX_RECORD_BYTES).unwrap();
        for n in 0..12 {
            let bad = malformed(n);
            assert!(hookd::ingest::event::CrmEvent::decode(&bad, MAX_RECORD_BYTES).is_err(), "kind {} is refused as CRM", n % 6);
            assert!(hookd::ingest::chat::ChatMessage::decode(&bad, MAX_RECORD_BYTES).is_err(), "kind {} is refused as chat", n % 6);
        }
    }
}
