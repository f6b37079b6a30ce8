//! A real Kafka broker for end-to-end tests: a `tansu` process on 127.0.0.1.
//!
//! `rdkafka::mocking::MockCluster` covers most integration tests; this helper is
//! for the ones that need a separate broker process: a broker that can be killed
//! and restarted under a running daemon, volumes above MockCluster's per-partition
//! cap, and persistence (`Storage::Sqlite`) across broker restarts.
//!
//! ```ignore
//! let mut broker = Tansu::start(Storage::Sqlite("tansu.db".into()));
//! create_topics(&broker.bootstrap, &[("crm.events", 4)]);
//! // ... point the daemon at broker.bootstrap ...
//! broker.restart(); // SIGKILL, start again on the same port: data and offsets kept
//! ```
//!
//! The binary is `$TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on
//! `PATH`; `.ci/run` installs it with
//! `cargo install tansu --version 0.6.0 --locked --features libsql,dynostore`.
//!
//! Facts this helper relies on (tansu 0.6, checked by hand):
//! - tansu opens its storage, binds its listener, then prints `ready in Nms`
//!   (tens of milliseconds). Readiness here is: that line from this process
//!   (not from another broker that took the port), a TCP connection accepted,
//!   and a metadata request answered.
//! - `sqlite://NAME` is resolved against the broker's working directory (even
//!   `sqlite:///abs/path` is made relative to it), so the broker runs in the
//!   database file's directory and is given only the file name.
//! - If its port is taken, tansu logs AddrInUse and exits with status 0.
//! - tansu reads a `.env` file from its working directory or a parent; the flags
//!   given here take precedence over anything set that way.
//! - The memory engine mishandles offsets inside a batch: see `Storage::Memory`.
//!
//! All calls block (they are meant for test set-up); they are safe to call from
//! inside a `#[tokio::test]`, whose runtime has nothing else to do meanwhile.
//! Self-contained on purpose: it uses no module of the crate under test.

#![allow(dead_code)] // each test binary uses a different part of the helper

use std::{
    fs::{File, OpenOptions},
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    config::ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
    types::RDKafkaErrorCode,
};

/// How long `start`/`restart` wait for the broker to answer before giving up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of one metadata request while waiting for readiness.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How to get the binary, for error messages (the version .ci/run installs).
const INSTALL: &str = "`cargo install tansu --version 0.6.0 --locked --features libsql,dynostore`";
/// Attempts at finding a free port when another process takes the one picked.
const PORT_ATTEMPTS: usize = 5;

/// Where the broker keeps its data.
#[derive(Clone, Debug)]
pub enum Storage {
    /// `memory://tansu/`: fastest; everything is lost when the process stops.
    ///
    /// Beware (tansu 0.6): this engine stores whole producer batches and serves a
    /// fetch only from batches that *start* at or after the fetch offset, so a
    /// consumer resuming from an offset inside a multi-record batch (a commit
    /// made mid-batch, then a restart or rebalance) never sees the rest of that
    /// batch (librdkafka may instead deliver the next batch's first record
    /// several times). ListOffsets(latest) is wrong too (the last batch's base
    /// offset + 1), and with it `auto.offset.reset=latest` and lag figures.
    /// Use it only where nothing resumes mid-batch; use `Sqlite` for
    /// at-least-once and restart tests.
    Memory,
    /// `sqlite://FILE`: correct offsets, survives `restart` (also after SIGKILL).
    /// A relative path is put in the broker's own temporary directory (removed
    /// on drop); an absolute path is used as is: its directory must exist and
    /// the file is created if missing.
    Sqlite(PathBuf),
}

/// A running tansu broker, killed when dropped.
pub struct Tansu {
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub bootstrap: String,
    /// The broker process; `None` between `stop` and `resume`.
    child: Option<Child>,
    /// Kept across restarts: with `Sqlite`, the data survives them.
    storage: Storage,
    /// The binary found at start, reused by restarts.
    bin: PathBuf,
    /// Holds the log file (and the working directory for `Memory`); removed on drop.
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts a broker on a free 127.0.0.1 port and waits until it answers a
    /// metadata request. Panics, with the broker's log, if it does not.
    pub fn start(storage: Storage) -> Tansu {
        let bin = find_binary();
        let dir = tempfile::Builder::new().prefix("tansu-").tempdir().expect("create a temporary directory for tansu");
        let storage = match storage {
            Storage::Sqlite(path) if path.is_relative() => Storage::Sqlite(dir.path().join(path)),
            other => other,
        };
        let mut last_error = String::new();
        let mut dir = dir;
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut tansu = Tansu {
                // Kept across restarts so clients' `bootstrap.servers` stays valid.
                bootstrap: format!("127.0.0.1:{port}"),
                child: None,
                storage: storage.clone(),
                bin: bin.clone(),
                dir,
            };
            match tansu.launch() {
                Ok(()) => return tansu,
                // Most likely the port was taken between picking and binding it
                // (tansu then exits): try another.
                Err(Launch::Exited(error)) => {
                    last_error = error;
                    dir = tansu.take_dir();
                }
                Err(Launch::NotReady(error)) => {
                    tansu.kill();
                    panic!("{error}");
                }
            }
        }
        let _ = dir.keep(); // the log the message points at
        panic!("tansu did not start after {PORT_ATTEMPTS} attempts: {last_error}");
    }

    /// Kills the broker (SIGKILL, like a crash) and starts it again on the same
    /// port with the same storage, then waits until it answers. With
    /// `Storage::Memory` every topic and offset is gone afterwards.
    pub fn restart(&mut self) {
        self.stop();
        self.resume();
    }

    /// Kills the broker and leaves it down (clients see connection refused)
    /// until `resume`. Does nothing if it is already down.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts the broker again after `stop`, on the same port and storage, and
    /// waits until it answers. Panics if it cannot (e.g. the port was taken).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "tansu is already running");
        if let Err(Launch::Exited(error) | Launch::NotReady(error)) = self.launch() {
            self.kill();
            panic!("tansu did not restart on {}: {error}", self.bootstrap);
        }
    }

    /// The broker's stdout and stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// The broker's whole log so far.
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }

    /// The end of the broker's log, for panic messages.
    fn log_tail(&self) -> String {
        let text = self.log();
        let skip = text.len().saturating_sub(8_000);
        let start = (skip..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
        text[start..].to_owned()
    }

    /// Creates topics on this broker; see [`create_topics`].
    pub fn create_topics(&self, topics: &[(&str, i32)]) {
        create_topics(&self.bootstrap, topics);
    }

    /// Spawns the process and waits for readiness; on failure the process may
    /// still be running and the error carries the log.
    fn launch(&mut self) -> Result<(), Launch> {
        let log_path = self.log_path();
        let log =
            OpenOptions::new().create(true).append(true).open(&log_path).unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let stderr = log.try_clone().expect("clone the log file handle");
        let (workdir, url) = match &self.storage {
            Storage::Memory => (self.dir.path().to_path_buf(), "memory://tansu/".to_owned()),
            Storage::Sqlite(path) => {
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_else(|| panic!("sqlite path {} has no UTF-8 file name", path.display()));
                let parent = path.parent().expect("an absolute path has a parent");
                (parent.to_path_buf(), format!("sqlite://{name}"))
            }
        };
        let listener = format!("tcp://{}", self.bootstrap);
        let ready_before = ready_lines(&self.log());
        let child = Command::new(&self.bin)
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", &url])
            .args(["--cluster-id", "hookd-test"])
            .current_dir(&workdir)
            // Its own log level; `TANSU_LOG=debug` to see every request.
            .env("RUST_LOG", std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".into()))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        self.wait_ready(ready_before)
    }

    /// Polls until this process has bound its port (it prints `ready in Nms`
    /// then; checking it guards against another broker that took the port), the
    /// port accepts a connection and a metadata request is answered. Fails early
    /// if the process exits.
    fn wait_ready(&mut self, ready_before: usize) -> Result<(), Launch> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr: SocketAddr = self.bootstrap.parse().expect("bootstrap is an address");
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(Launch::Exited(format!(
                    "tansu exited with {status} before it was ready; log {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            if ready_lines(&self.log()) > ready_before
                && TcpStream::connect_timeout(&addr, METADATA_TIMEOUT).is_ok()
                && metadata_answered(&self.bootstrap)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Launch::NotReady(format!(
                    "tansu did not answer a metadata request on {} within {READY_TIMEOUT:?}; log {}:\n{}",
                    self.bootstrap,
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Moves the temporary directory out of a failed attempt so the next one reuses it.
    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        let placeholder = tempfile::tempdir().expect("create a temporary directory");
        std::mem::replace(&mut self.dir, placeholder)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Keep the log of a failed test for a post-mortem.
            let kept = self.dir.path().to_path_buf();
            let placeholder = tempfile::tempdir();
            if let Ok(placeholder) = placeholder {
                let dir = std::mem::replace(&mut self.dir, placeholder);
                let _ = dir.keep();
                eprintln!("tansu log kept at {}", kept.join("tansu.log").display());
            }
        }
    }
}

/// Why a launch failed; the message carries the log.
enum Launch {
    /// The process exited before it was ready (e.g. its port was taken).
    Exited(String),
    /// It kept running but did not answer within `READY_TIMEOUT`.
    NotReady(String),
}

/// Creates topics with replication factor 1 and waits until the broker's
/// metadata lists each with its partitions. A topic that already exists is
/// accepted as is (its partition count is not changed). Panics on any other
/// error.
pub fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) {
    let specs: Vec<TopicSpec<'_>> = topics.iter().map(|&(name, partitions)| (name, partitions, &[][..])).collect();
    create_topics_with_config(bootstrap, &specs);
}

/// A topic to create: name, partitions and topic configs, e.g.
/// `("hookd.subscriptions", 4, &[("cleanup.policy", "compact")])`.
pub type TopicSpec<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);

/// Like [`create_topics`], with per-topic configs.
pub fn create_topics_with_config(bootstrap: &str, topics: &[TopicSpec<'_>]) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("create a Kafka admin client");
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|&(name, partitions, config)| {
            config.iter().fold(NewTopic::new(name, partitions, TopicReplication::Fixed(1)), |topic, &(key, value)| topic.set(key, value))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    // The admin futures are completed by librdkafka's own thread, so any executor
    // will do; a private one on a scoped thread works inside and outside tokio.
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
    wait_for_topics(bootstrap, topics.iter().map(|&(name, partitions, _)| (name, partitions)));
}

/// Waits until metadata lists every topic with at least the given partitions.
fn wait_for_topics<'a>(bootstrap: &str, topics: impl Iterator<Item = (&'a str, i32)>) {
    let consumer = metadata_client(bootstrap);
    let deadline = Instant::now() + READY_TIMEOUT;
    for (name, partitions) in topics {
        loop {
            let seen = consumer
                .fetch_metadata(Some(name), METADATA_TIMEOUT)
                .ok()
                .and_then(|m| m.topics().iter().find(|t| t.name() == name && t.error().is_none()).map(|t| t.partitions().len()));
            if seen.is_some_and(|n| n >= partitions as usize) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "topic {name} not in {bootstrap}'s metadata with {partitions} partitions after {READY_TIMEOUT:?} (saw {seen:?})"
            );
            std::thread::sleep(PROBE_INTERVAL);
        }
    }
}

fn metadata_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // No topic is named, so metadata requests must not create any.
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("create a Kafka client for metadata requests")
}

/// One metadata request, answered with this broker in it.
fn metadata_answered(bootstrap: &str) -> bool {
    metadata_client(bootstrap).fetch_metadata(None, METADATA_TIMEOUT).is_ok_and(|m| !m.brokers().is_empty())
}

/// `$TANSU_BIN`, else `~/.cargo/bin/tansu`, else `tansu` on `PATH`.
fn find_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "TANSU_BIN={} is not a file; unset it, or install tansu with {INSTALL}", bin.display());
        return bin;
    }
    let home = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/tansu"));
    let on_path =
        std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|dir| dir.join("tansu"));
    home.into_iter().chain(on_path).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "the tansu broker binary was not found (looked at $TANSU_BIN, ~/.cargo/bin/tansu, PATH). \
             Install it with {INSTALL} (10 to 25 minutes on 2 cores; .ci/run does this), \
             or set TANSU_BIN to its path."
        )
    })
}

/// A port that was free a moment ago (the OS picks it; tansu binds it next).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).and_then(|l| l.local_addr()).expect("bind 127.0.0.1:0").port()
}

/// How many times the log says the broker bound its listener.
fn ready_lines(log: &str) -> usize {
    log.lines().filter(|line| line.starts_with("ready in ")).count()
}

fn read_log(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
