//! A real Apache Kafka broker (KRaft, one combined broker+controller node on 127.0.0.1) for
//! the end-to-end tests, started through `scripts/kafka` (the jars come from Maven Central
//! through `tests/kafka/pom.xml`, cached in `~/.cache/hookd/kafka-<version>/libs`).
//!
//! ```ignore
//! let kafka = Kafka::shared();          // one broker per test binary
//! let topics = Topics::unique("kill");  // this test's own topic names and group id
//! topics.create(&kafka.bootstrap, 3);
//! // ... point the daemon at kafka.bootstrap with topics.toml() in its config ...
//! ```
//!
//! `Kafka::start()` gives a test a broker of its own that it may kill and restart
//! (`restart`: SIGKILL, start again on the same port with the same data).
//!
//! Brokers are killed when their test process ends, even the shared one that is never
//! dropped: each broker is spawned by one long-lived thread with `PR_SET_PDEATHSIG`, which
//! `exec` keeps (`scripts/kafka run` execs the JVM).
//!
//! All calls block (they are meant for test set-up); they are safe to call from inside a
//! `#[tokio::test]`.

#![allow(dead_code)] // each test binary uses a different part of the helper

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::types::RDKafkaErrorCode;

/// How long a start waits for the broker (the JVM starts in a few seconds).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// A running Apache Kafka broker, killed when dropped (and when the test process ends).
pub struct Kafka {
    /// `127.0.0.1:PORT`, for `bootstrap.servers`; the same across restarts.
    pub bootstrap: String,
    child: Mutex<Option<Child>>,
    /// Its `scripts/kafka` directory: config, KRaft log, broker.log; removed on drop.
    dir: tempfile::TempDir,
}

impl Kafka {
    /// The broker of this test binary, started on first use. Tests share it, each with
    /// its own topics and group ids ([`Topics::unique`]).
    pub fn shared() -> &'static Kafka {
        static SHARED: OnceLock<Kafka> = OnceLock::new();
        extern "C" fn at_exit() {
            // A static is never dropped: stop the broker and remove its directory here
            // (the test harness leaves through `exit`, which runs these handlers).
            if let Some(kafka) = SHARED.get() {
                kafka.stop();
                let _ = std::fs::remove_dir_all(kafka.dir.path());
            }
        }
        SHARED.get_or_init(|| {
            let kafka = Kafka::start();
            // SAFETY: registers a plain function; it only touches the static above.
            unsafe { libc::atexit(at_exit) };
            kafka
        })
    }

    /// A broker of the caller's own on a free port; waits until it answers.
    pub fn start() -> Kafka {
        ensure_fetched();
        let dir = tempfile::Builder::new().prefix("hookd-kafka-").tempdir().expect("a temporary directory for the broker");
        let started = Instant::now();
        let port = run_script(&["prepare"], dir.path());
        let kafka = Kafka { bootstrap: format!("127.0.0.1:{port}"), child: Mutex::new(None), dir };
        kafka.launch();
        eprintln!("Apache Kafka on {} started in {:?} (log {})", kafka.bootstrap, started.elapsed(), kafka.log_path().display());
        kafka
    }

    /// SIGKILL (a crash), then start again on the same port with the same data.
    pub fn restart(&self) {
        self.stop();
        self.resume();
    }

    /// SIGKILL and leave it down (clients see connection refused) until `resume`.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after `stop`, on the same port and data; waits until it answers.
    pub fn resume(&self) {
        assert!(self.child.lock().unwrap().is_none(), "the broker is already running");
        self.launch();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("broker.log")
    }

    fn launch(&self) {
        let before = started_lines(&self.log_path());
        let child = spawn_with_parent_death_signal(self.dir.path());
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.lock().unwrap().as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the Kafka broker exited with {status} before it was ready:\n{}", self.log_tail());
            }
            if started_lines(&self.log_path()) > before && metadata_answered(&self.bootstrap) {
                return;
            }
            assert!(Instant::now() < deadline, "the Kafka broker was not ready within {READY_TIMEOUT:?}:\n{}", self.log_tail());
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    fn log_tail(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let text = format!("{}\n{}", read("stdout.log"), read("broker.log"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("a temporary directory")).keep();
            eprintln!("broker directory kept at {}", kept.display());
        }
    }
}

/// One test's own topic names (hookd's seven, prefixed) and consumer group, so tests can
/// share a broker.
#[derive(Clone, Debug)]
pub struct Topics {
    pub prefix: String,
    pub group_id: String,
}

impl Topics {
    /// Names unique in this process: `<name>-<n>.crm.events`, group `hookd-<name>-<n>`.
    pub fn unique(name: &str) -> Topics {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Topics { prefix: format!("{name}-{n}."), group_id: format!("hookd-{name}-{n}") }
    }

    /// The full name of one of hookd's topics, e.g. `name("crm.events")`.
    pub fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    /// All seven, in the order of `common::TOPICS`.
    pub fn all(&self) -> Vec<String> {
        super::TOPICS.iter().map(|t| self.name(t)).collect()
    }

    /// The `[topics]` table for a hookd config.
    pub fn toml(&self) -> String {
        let keys = ["crm_events", "chat_messages", "subscriptions", "deliveries", "retry", "dlq", "notifications"];
        let mut out = String::from("[topics]\n");
        for (key, topic) in keys.iter().zip(super::TOPICS) {
            out.push_str(&format!("{key} = \"{}\"\n", self.name(topic)));
        }
        out.push_str(&format!("endpoint_state = \"{}\"\n", self.name(super::CHANGELOG)));
        out
    }

    /// Creates the seven topics and the endpoint state changelog with `partitions` each
    /// (subscriptions and the changelog compacted), with the `max.message.bytes` hookd gives
    /// the topics it creates (`kafka.max_message_bytes` + 61).
    pub fn create(&self, bootstrap: &str, partitions: i32) {
        const LIMIT: (&str, &str) = ("max.message.bytes", "2097213");
        let mut names = self.all();
        names.push(self.name(super::CHANGELOG));
        let specs: Vec<TopicSpec<'_>> = names
            .iter()
            .map(|n| {
                let config: &[(&str, &str)] = if n.ends_with("hookd.subscriptions") || n.ends_with(super::CHANGELOG) {
                    &[("cleanup.policy", "compact"), LIMIT]
                } else {
                    &[LIMIT]
                };
                (n.as_str(), partitions, config)
            })
            .collect();
        create_topics_with_config(bootstrap, &specs);
    }
}

/// A topic to create: name, partitions and topic configs.
pub type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Creates topics with replication factor 1 and waits until metadata lists each with its
/// partitions. A topic that exists already is accepted as is. Panics on any other error.
pub fn create_topics_with_config(bootstrap: &str, topics: &[TopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("create a Kafka admin client");
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|&(name, partitions, config)| {
            config.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |topic, &(key, value)| topic.set(key, value))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    // librdkafka's own thread completes the admin futures, so any executor will do; a
    // private one on a scoped thread works inside and outside tokio.
    let results = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("build a runtime")
                    .block_on(admin.create_topics(&new_topics, &options))
            })
            .join()
            .expect("create_topics thread panicked")
    })
    .unwrap_or_else(|e| panic!("CreateTopics on {bootstrap} failed: {e}"));
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => panic!("creating topic {topic} on {bootstrap} failed: {code}"),
        }
    }
    let consumer = metadata_client(bootstrap);
    let deadline = Instant::now() + READY_TIMEOUT;
    for &(name, partitions, _) in topics {
        loop {
            let seen = consumer.fetch_metadata(Some(name), METADATA_TIMEOUT).ok().and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map(|t| t.partitions().iter().filter(|p| p.leader() >= 0).count())
            });
            if seen.is_some_and(|n| n >= partitions as usize) {
                break;
            }
            assert!(Instant::now() < deadline, "topic {name} has no {partitions} led partitions after {READY_TIMEOUT:?} (saw {seen:?})");
            std::thread::sleep(PROBE_INTERVAL);
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka")
}

/// Runs `scripts/kafka ARGS DIR` to completion and returns its stdout, trimmed.
fn run_script(args: &[&str], dir: &Path) -> String {
    let out = Command::new(script())
        .args(args)
        .arg(dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {} (bash): {e}", script().display()));
    assert!(out.status.success(), "scripts/kafka {args:?} failed ({}); its message is above", out.status);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Resolves the broker's jars once per process (Maven, when they are not cached yet).
fn ensure_fetched() {
    static FETCHED: OnceLock<()> = OnceLock::new();
    FETCHED.get_or_init(|| {
        let out = Command::new(script())
            .arg("fetch")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {} (bash): {e}", script().display()));
        assert!(
            out.status.success(),
            "scripts/kafka fetch failed: the end-to-end tests need Java 17+ and Maven to fetch Apache Kafka \
             from Maven Central (its message is above)"
        );
    });
}

/// `scripts/kafka run DIR` (format once, then exec the JVM), spawned by a thread that lives
/// as long as the process, with SIGKILL as its parent-death signal: the broker dies with the
/// test binary even when the `Kafka` is a static that is never dropped.
fn spawn_with_parent_death_signal(dir: &Path) -> Child {
    type Request = (PathBuf, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kafka-spawner".into())
            .spawn(move || {
                for (dir, reply) in rx {
                    let mut cmd = Command::new(script());
                    cmd.arg("run").arg(&dir).stdin(Stdio::null());
                    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stdout.log"));
                    let log = match log {
                        Ok(log) => log,
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    };
                    cmd.stderr(log.try_clone().expect("clone a file handle")).stdout(log);
                    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                    unsafe {
                        use std::os::unix::process::CommandExt as _;
                        cmd.pre_exec(|| {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // The channel is never closed (the sender lives in a static): this thread,
                // the broker processes' parent, lives until the process exits.
            })
            .expect("spawn the kafka-spawner thread");
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    spawner.lock().unwrap().send((dir.to_path_buf(), tx)).expect("the kafka-spawner thread is alive");
    rx.recv().expect("the kafka-spawner thread answers").unwrap_or_else(|e| panic!("spawn {} run: {e}", script().display()))
}

fn metadata_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create a Kafka client for metadata requests")
}

fn metadata_answered(bootstrap: &str) -> bool {
    metadata_client(bootstrap).fetch_metadata(None, METADATA_TIMEOUT).is_ok_and(|m| !m.brokers().is_empty())
}

/// How many times the broker log says the server started (readiness of this launch).
fn started_lines(log: &Path) -> usize {
    std::fs::read_to_string(log).map(|t| t.matches("Kafka Server started").count()).unwrap_or(0)
}
