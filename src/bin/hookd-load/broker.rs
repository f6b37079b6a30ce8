//! The broker side of the harness: an Apache Kafka process on 127.0.0.1 (KRaft, one
//! combined broker+controller node, started by `scripts/kafka`, the same broker the tests
//! run on), hookd's topics, a bulk producer that remembers the last offset acknowledged per
//! partition, a paced producer, and the bare consumer that gives the broker's ceiling.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// How long a start waits for the broker to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// An Apache Kafka broker process (`scripts/kafka run DIR`, which execs the JVM), killed on
/// drop; `stop` and `resume` restart it on the same port and data (the `chaos` scenario).
pub struct Kafka {
    pub bootstrap: String,
    /// The JVM (`scripts/kafka run` execs it); None between `stop` and `resume`.
    child: Option<Child>,
    dir: PathBuf,
    /// How long the start took, JVM start and KRaft format included.
    pub started_in: Duration,
}

impl Kafka {
    /// Starts a broker with its data in `dir` (formatted on first use) and waits until it
    /// answers a metadata request. The jars are resolved through Maven on first use.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir)?;
        let fetched = Command::new(script()).arg("fetch").stdin(Stdio::null()).stdout(Stdio::null()).status()?;
        anyhow::ensure!(fetched.success(), "scripts/kafka fetch failed: Java 17+ and Maven are needed (its message is above)");
        let prepared = Command::new(script()).arg("prepare").arg(dir).stdin(Stdio::null()).output()?;
        anyhow::ensure!(prepared.status.success(), "scripts/kafka prepare failed: {}", String::from_utf8_lossy(&prepared.stderr));
        let port = String::from_utf8_lossy(&prepared.stdout).trim().to_owned();
        let mut k = Kafka { bootstrap: format!("127.0.0.1:{port}"), child: None, dir: dir.to_path_buf(), started_in: Duration::ZERO };
        k.launch()?;
        k.started_in = t0.elapsed();
        eprintln!("    Apache Kafka on {} started in {:.1} s", k.bootstrap, k.started_in.as_secs_f64());
        Ok(k)
    }

    /// Stops the broker: SIGKILL (a crash) or SIGTERM (a clean shutdown), and waits.
    pub fn stop(&mut self, crash: bool) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if crash {
            child.kill()?;
        } else {
            let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            anyhow::ensure!(sent.success(), "kill -TERM {} failed", child.id());
        }
        child.wait()?;
        Ok(())
    }

    /// Starts the broker again after `stop`, on the same port with the same data.
    pub fn resume(&mut self) -> anyhow::Result<Duration> {
        anyhow::ensure!(self.child.is_none(), "the broker is running");
        let t0 = Instant::now();
        self.launch()?;
        Ok(t0.elapsed())
    }

    /// Spawns `scripts/kafka run DIR` and waits until this launch logged its start and the
    /// broker answers a metadata request.
    fn launch(&mut self) -> anyhow::Result<()> {
        let log_path = self.dir.join("broker.log");
        let starts = |p: &Path| std::fs::read_to_string(p).map_or(0, |t| t.matches("Kafka Server started").count());
        let before = starts(&log_path);
        let log = OpenOptions::new().create(true).append(true).open(self.dir.join("stdout.log"))?;
        let child = Command::new(script())
            .arg("run")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} run", script().display()))?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the Kafka broker exited with {status}; logs in {}", self.dir.display());
            }
            if starts(&log_path) > before && metadata_answered(&self.bootstrap) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the Kafka broker did not answer within {READY_TIMEOUT:?}; logs in {}", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Kafka version `scripts/kafka` runs: `$KAFKA_VERSION`, else its default.
pub fn kafka_version() -> String {
    std::env::var("KAFKA_VERSION").unwrap_or_else(|_| "4.4.0".into())
}

/// `scripts/kafka` of this source tree (`$HOOKD_KAFKA_SCRIPT` overrides it).
fn script() -> PathBuf {
    std::env::var_os("HOOKD_KAFKA_SCRIPT").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

fn metadata_answered(bootstrap: &str) -> bool {
    let c: Result<BaseConsumer, _> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("allow.auto.create.topics", "false").create();
    c.is_ok_and(|c| c.fetch_metadata(None, Duration::from_secs(2)).is_ok_and(|m| !m.brokers().is_empty()))
}

/// Delivery reports of the bulk producer: the last offset acknowledged per partition.
#[derive(Default)]
pub struct Acks {
    last: Mutex<HashMap<i32, i64>>,
    acked: AtomicU64,
    failed: AtomicU64,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(m) => {
                let mut last = self.last.lock().expect("acks poisoned");
                let e = last.entry(m.partition()).or_insert(-1);
                *e = (*e).max(m.offset());
                self.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "Load record not acknowledged.");
            }
        }
    }
}

/// A producer of input records (the "CRM" or "chat product" side), lz4 like hookd's own.
pub struct LoadProducer {
    inner: ThreadedProducer<Acks>,
}

/// One input record; `partition` None means by key (librdkafka's default partitioner).
pub struct Rec<'a> {
    pub key: &'a str,
    pub value: &'a [u8],
    pub partition: Option<i32>,
}

impl LoadProducer {
    /// `linger_ms` 0 for the latency scenario, larger for bulk loading.
    pub fn new(bootstrap: &str, linger_ms: u32) -> anyhow::Result<Self> {
        Self::with(bootstrap, linger_ms, &[])
    }

    /// [`Self::new`] with extra librdkafka properties (e.g. a longer `message.timeout.ms` to
    /// ride out broker restarts).
    pub fn with(bootstrap: &str, linger_ms: u32, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap)
            .set("linger.ms", linger_ms.to_string())
            .set("compression.type", "lz4")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "60000");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        Ok(Self { inner: c.create_with_context(Acks::default())? })
    }

    /// Connects and loads `topic`'s metadata, so the first timed record does not wait for
    /// them (a paced run stamps each record just before it is queued).
    pub fn warm(&self, topic: &str) -> anyhow::Result<()> {
        self.inner.client().fetch_metadata(Some(topic), Duration::from_secs(10))?;
        Ok(())
    }

    /// Queues one record, waiting while librdkafka's queue is full.
    pub fn send(&self, topic: &str, r: Rec<'_>) -> anyhow::Result<()> {
        let mut record = BaseRecord::to(topic).key(r.key).payload(r.value);
        if let Some(p) = r.partition {
            record = record.partition(p);
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued record is acknowledged; returns the last offset per partition.
    pub fn finish(&self) -> anyhow::Result<HashMap<i32, i64>> {
        self.inner.flush(Duration::from_secs(120))?;
        let ctx = self.inner.context();
        let failed = ctx.failed.load(Ordering::Relaxed);
        anyhow::ensure!(failed == 0, "{failed} load records were not acknowledged by the broker");
        Ok(ctx.last.lock().expect("acks poisoned").clone())
    }

    pub fn acked(&self) -> u64 {
        self.inner.context().acked.load(Ordering::Relaxed)
    }
}

/// Reads `expect` records of `topic` from the beginning in a new consumer group, with
/// hookd's own consumer settings (payloads are looked at, not parsed); returns records per second from the
/// first record to the last (the same clock hookd is measured with).
pub fn bare_consume(config: &hookd::config::Config, group: &str, topic: &str, expect: u64) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = hookd::kafka::consumer_config(config, group).create()?;
    consumer.subscribe(&[topic])?;
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_secs_f64(expect as f64 / 2_000.0);
    let (mut n, mut bytes, mut first) = (0u64, 0usize, None);
    while n < expect {
        anyhow::ensure!(Instant::now() < deadline, "bare consumer read {n} of {expect} records before its deadline");
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                bytes += m.payload().map_or(0, <[u8]>::len);
                n += 1;
            }
            Some(Err(error)) => tracing::warn!(%error, "Bare consumer error."),
            None => {}
        }
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    std::hint::black_box(bytes);
    Ok(n as f64 / secs.max(1e-9))
}

/// The offsets committed by `group` for `topic`'s partitions.
pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: &[i32]) -> anyhow::Result<HashMap<i32, Option<i64>>> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got.elements().iter().map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None })).collect())
}

/// Produces every message of `load` to `topic`, then one sentinel message per partition
/// (chat `sentinel-<p>`, time `sentinel_ms`), so that "every partition's last record is in
/// the window store" shows as `load.bundles + partitions` open bundles. Returns the last
/// offset per partition and the number of records.
pub fn load_chat(
    bootstrap: &str,
    topic: &str,
    load: &crate::workload::ChatLoad,
    partitions: i32,
    sentinel_ms: i64,
) -> anyhow::Result<(HashMap<i32, i64>, u64)> {
    let producer = LoadProducer::new(bootstrap, 20)?;
    let total = load.total() as u64;
    let started = Instant::now();
    for (i, (key, value)) in load.records().enumerate() {
        producer.send(topic, Rec { key: &key, value: &value, partition: None })?;
        if i > 0 && i % 500_000 == 0 {
            eprintln!("    produced {i} of {total} ({:.0}/s)", i as f64 / started.elapsed().as_secs_f64());
        }
    }
    producer.finish()?;
    let tenant = crate::workload::ChatLoad::tenant(0);
    for p in 0..partitions {
        let chat = format!("sentinel-{p}");
        let value = crate::workload::chat_message(&format!("s{p}"), &tenant, &chat, sentinel_ms, 0, "sentinel");
        producer.send(topic, Rec { key: &chat, value: &value, partition: Some(p) })?;
    }
    let last = producer.finish()?;
    eprintln!("    produced {} records in {:.1} s", producer.acked(), started.elapsed().as_secs_f64());
    Ok((last, total + partitions as u64))
}

/// A bare consumer of `topic` in a new group, with hookd's consumer settings: the
/// produce-to-consume latency (microseconds) of each record stamped with a non-zero
/// `load_t_us`, until `n` of them or `deadline`. `joined` turns true once it has partitions.
pub fn bare_latency(
    config: &hookd::config::Config,
    group: &str,
    topic: &str,
    n: usize,
    joined: &AtomicBool,
    deadline: Instant,
) -> anyhow::Result<Vec<u64>> {
    let consumer: BaseConsumer = hookd::kafka::consumer_config(config, group).create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::with_capacity(n);
    while out.len() < n && Instant::now() < deadline {
        if !joined.load(Ordering::Relaxed) && consumer.assignment().is_ok_and(|a| a.count() > 0) {
            joined.store(true, Ordering::Relaxed);
        }
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(20)) {
            let now = crate::receiver::now_us();
            if let Some(sent) = m.payload().and_then(crate::receiver::stamp).filter(|s| *s > 0) {
                out.push(now.saturating_sub(sent));
            }
        }
    }
    Ok(out)
}
