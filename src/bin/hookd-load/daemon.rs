//! hookd under load: its config, started in this process (most scenarios: direct access to
//! its metrics, a manual clock for window closing) or as a child process (`memory` and
//! `recovery`: a clean resident-memory figure and a real restart), plus the measurements
//! taken of it: metrics, resident memory, the size of its sled directory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hookd::config::Config;
use hookd::window::clock::Clock;
use tokio_util::sync::CancellationToken;

use crate::Opts;

/// Settings the harness changes from the documented defaults (`config/hookd.toml`), and why:
/// loopback targets must pass the SSRF guard, the per-subscription rate limit (100/s by
/// default) would cap 100 subscriptions at exactly 10,000/s and measure the policy instead
/// of the daemon, and a short shutdown grace keeps runs short.
const OVERRIDES: &str = r#"
[delivery]
allow_private_targets = ["127.0.0.0/8"]
per_subscription_rate_per_sec = 1000000
[shutdown]
grace_ms = 5000
"#;

/// A config for one run: its own consumer group and state directory, the `--rdkafka`
/// properties under `[kafka.librdkafka]`; `extra` adds subscriptions (and any other table not
/// in [`OVERRIDES`]); then the `--set` settings over all of it.
pub fn config_text(opts: Opts, brokers: &str, group: &str, state: &Path, admin: &str, extra: &str) -> anyhow::Result<String> {
    let text = format!(
        "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\n[kafka.librdkafka]\n{}[state]\npath = \"{}\"\n[admin]\nlisten = \"{admin}\"\ntoken = \"load\"\n{OVERRIDES}{extra}",
        opts.rdkafka,
        state.display()
    );
    if opts.settings.is_empty() {
        return Ok(text);
    }
    let mut table: toml::Table = text.parse()?;
    for line in opts.settings.lines() {
        let (key, value) = line.split_once('=').with_context(|| format!("--set {line}: expected KEY=VALUE"))?;
        let value: toml::Value = format!("v = {}", value.trim())
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.trim().into()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().context("--set: empty key")?;
        let mut at = &mut table;
        for p in parts {
            at = at
                .entry(p)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .with_context(|| format!("--set {key}: `{p}` is not a table"))?;
        }
        at.insert(last.to_string(), value);
    }
    Ok(toml::to_string(&table)?)
}

pub fn config(opts: Opts, brokers: &str, group: &str, state: &Path, extra: &str) -> anyhow::Result<Config> {
    let text = config_text(opts, brokers, group, state, "127.0.0.1:0", extra)?;
    Config::parse(&text).with_context(|| format!("harness config:\n{text}"))
}

/// Polls `cond` every millisecond until it holds; fails naming `what` after `timeout`.
pub async fn until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// hookd started in this process with `hookd::start_with_clock`.
pub struct InProcess {
    pub shared: Arc<hookd::Shared>,
    running: hookd::Running,
    stop: CancellationToken,
}

impl InProcess {
    /// Starts the daemon and waits until `/readyz` would say ready.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let running = hookd::start_with_clock(config, stop.clone(), clock).await?;
        let shared = running.shared.clone();
        until(Duration::from_secs(60), "hookd ready", || shared.ready.all()).await?;
        Ok(Self { shared, running, stop })
    }

    /// Input records read, by source (`crm`, `chat`).
    pub fn consumed(&self, source: &str) -> u64 {
        self.shared.metrics.events_consumed.with_label_values(&[source]).get()
    }

    pub fn open_bundles(&self) -> i64 {
        self.shared.metrics.open_bundles.get()
    }

    /// Stops gracefully (as on SIGTERM), waits until it has, then until nothing holds its
    /// shared state (and with it the sled database) any more. Returns false when something
    /// still does after 10 s: the caller must then keep the state directory, because sled
    /// writing into a deleted directory hangs every sled database of the process.
    pub async fn stop(self) -> anyhow::Result<bool> {
        let shared = Arc::downgrade(&self.shared);
        drop(self.shared);
        self.stop.cancel();
        self.running.wait().await?;
        let stopped = Instant::now();
        let closed = until(Duration::from_secs(10), "hookd's state released", || shared.strong_count() == 0).await.is_ok();
        if closed && stopped.elapsed() > Duration::from_millis(100) {
            eprintln!("    note: hookd's shared state (and sled) was released {:?} after `Running::wait` returned", stopped.elapsed());
        }
        if !closed {
            eprintln!(
                "    note: {} references to hookd's shared state (and its sled database) remain 10 s after it stopped",
                shared.strong_count()
            );
        }
        Ok(closed)
    }
}

/// Removes a run's directory (state, broker log) if every hookd using it let go of its sled
/// database (`closed`), else leaves it on disk and says where.
pub fn remove_dir(dir: tempfile::TempDir, closed: bool) {
    if !closed {
        eprintln!("    note: leaving {} on disk", dir.keep().display());
    }
}

/// hookd as a child process: this binary's hidden `serve` command.
pub struct ChildDaemon {
    child: Child,
    pub admin: SocketAddr,
    http: reqwest::Client,
}

impl ChildDaemon {
    /// Writes `config` to `dir/hookd.toml` and starts `hookd-load serve` on it, logging to
    /// `dir/hookd.log`.
    pub fn spawn(dir: &Path, config_text: &str, admin: SocketAddr) -> anyhow::Result<Self> {
        let path = dir.join("hookd.toml");
        std::fs::write(&path, config_text)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("hookd.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["serve", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Self { child, admin, http: reqwest::Client::new() })
    }

    /// `/readyz` answered 200.
    pub async fn ready(&self) -> bool {
        let url = format!("http://{}/readyz", self.admin);
        self.http.get(url).timeout(Duration::from_secs(2)).send().await.is_ok_and(|r| r.status().is_success())
    }

    /// `/metrics` as `name{labels}` → value; empty while the admin server is not up.
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let url = format!("http://{}/metrics", self.admin);
        let Ok(r) = self.http.get(url).timeout(Duration::from_secs(5)).send().await else { return HashMap::new() };
        let text = r.text().await.unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
            .collect()
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("hookd child exited with {status}; see its hookd.log");
        }
        Ok(())
    }

    /// A `Vm*` field of /proc/<pid>/status in MiB (`VmHWM`: peak resident; `VmRSS`: now).
    pub fn vm_mib(&self, field: &str) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("{field} not in /proc status"))?;
        let kib: f64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kib / 1024.0)
    }

    /// SIGKILL (a crash: nothing is flushed or committed) and wait.
    pub fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM (graceful: in-flight work finished, sled flushed, offsets committed) and wait.
    pub fn terminate(mut self, timeout: Duration) -> anyhow::Result<()> {
        let sent = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {} failed", self.child.id());
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                anyhow::bail!("hookd child did not stop within {timeout:?} of SIGTERM; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes of every file under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `hookd-load serve --config FILE`: the daemon as `hookd run` runs it (SIGTERM or ctrl-c:
/// graceful stop), for the child-process scenarios.
pub async fn serve(config: &PathBuf) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::load(config)?;
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s.cancel();
    });
    hookd::run(config, stop).await?;
    Ok(())
}
