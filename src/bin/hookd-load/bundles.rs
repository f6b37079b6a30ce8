//! `memory` and `recovery`: hookd as a child process (this binary's `serve`, the daemon as
//! `hookd run` runs it) holding 1,000,000 open bundles of 3 messages each.
//!
//! - `memory`: 3,000,000 chat messages (one per chat and round, 1,000,000 chats, one 1 h
//!   subscription) wait on the broker; each run starts a child with an empty
//!   state directory in a new consumer group and waits until every bundle is open (the
//!   per-partition sentinels are in the window store). Timestamps lie in tomorrow's window, so
//!   the wall clock closes nothing. Figures: the child's peak resident memory (`VmHWM` of
//!   /proc/<pid>/status), then, after a graceful stop, the size of its sled directory.
//! - `recovery`: restarts a child on the last `memory` run's state directory and group. A
//!   new message (a new chat) is produced before each start. Figures: seconds from spawn until
//!   that new message is in the window store, i.e. hookd consumes new traffic again (it
//!   replays from the committed offset, which open bundles hold at the oldest one's first
//!   offset, skipping what sled already holds), and until `/readyz` answers 200 and a record
//!   was read.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hookd::window::clock::{Clock, SystemClock};

use crate::broker::{self, free_port, Kafka, LoadProducer, Rec};
use crate::daemon::{self, ChildDaemon};
use crate::report::{Row, Target};
use crate::workload::{self, ChatLoad, HOUR_MS};
use crate::Opts;

/// What `memory` leaves for `recovery`: the broker with the records, the last run's state.
pub struct Held {
    opts: Opts,
    dir: tempfile::TempDir,
    kafka: Kafka,
    topic: String,
    subs: String,
    base_ms: i64,
    /// The last run's state directory and consumer group.
    state: PathBuf,
    group: String,
    /// Bundles that state holds.
    bundles: i64,
}

impl Held {
    /// Starts a child on `state` in `group`, logging to `<dir>/<name>/hookd.log`.
    fn spawn(&self, name: &str) -> anyhow::Result<ChildDaemon> {
        let work = self.dir.path().join(name);
        std::fs::create_dir_all(&work)?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let text = daemon::config_text(self.opts, &self.kafka.bootstrap, &self.group, &self.state, &admin.to_string(), &self.subs)?;
        ChildDaemon::spawn(&work, &text, admin)
    }
}

const CONSUMED: &str = "hookd_events_consumed_total{source=\"chat\"}";
const OPEN: &str = "hookd_open_bundles";

fn metric(m: &std::collections::HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

pub async fn memory(opts: Opts) -> anyhow::Result<(Vec<Row>, Held)> {
    let chats = opts.scaled(1_000_000, 100);
    let base_ms = (SystemClock.now_ms() / HOUR_MS + 24) * HOUR_MS;
    let load = ChatLoad { tenants: 1, chats_per_tenant: chats, per_chat: 3, base_ms, span_ms: HOUR_MS / 2 };
    let dir = tempfile::Builder::new().prefix("hookd-load-mem-").tempdir()?;
    let kafka = Kafka::start(&dir.path().join("broker"))?;
    let setup = daemon::config(opts, &kafka.bootstrap, "setup", &dir.path().join("setup"), "")?;
    hookd::kafka::ensure_topics(&setup).await?;
    let partitions = setup.kafka.partitions;
    let topic = setup.topics.chat_messages.clone();
    let (b, t, l) = (kafka.bootstrap.clone(), topic.clone(), load.clone());
    let (_, total) = tokio::task::spawn_blocking(move || broker::load_chat(&b, &t, &l, partitions, base_ms)).await??;
    let bundles = (load.bundles(HOUR_MS) + partitions as usize) as i64;
    eprintln!("    {total} messages, {bundles} bundles to hold");
    let subs = workload::chat_subscriptions(1, "1h", "127.0.0.1:9".parse()?);
    let mut held = Held { opts, dir, kafka, topic, subs, base_ms, state: PathBuf::new(), group: String::new(), bundles };
    let mut hwm = Row::new("memory", "peak RSS (VmHWM) holding the bundles", "MiB", Some(Target::Below(256.0)));
    let mut rss = Row::new("memory", "RSS once all are stored", "MiB", None);
    let mut disk = Row::new("memory", "sled directory after graceful stop", "MiB", None);
    let mut rate = Row::new("memory", "load rate (consumed to window store)", "msg/s", None);
    for run in 0..opts.runs {
        if run > 0 {
            std::fs::remove_dir_all(&held.state)?; // gigabytes at full scale; `recovery` needs the last only
        }
        held.state = held.dir.path().join(format!("state-{run}"));
        held.group = format!("hookd-mem-{run}");
        let mut child = held.spawn(&format!("memory-{run}"))?;
        let timeout = Duration::from_secs(300) + Duration::from_secs_f64(total as f64 / 2_000.0);
        let started = Instant::now();
        let mut first = None;
        loop {
            child.check_alive()?;
            let m = child.metrics().await;
            if first.is_none() && metric(&m, CONSUMED) > 0.0 {
                first = Some(Instant::now());
            }
            if metric(&m, OPEN) >= bundles as f64 {
                break;
            }
            anyhow::ensure!(started.elapsed() < timeout, "memory: {} of {bundles} bundles open after {timeout:?}", metric(&m, OPEN));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = first.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await; // a close tick or more: sled flushed
        let (peak, now) = (child.vm_mib("VmHWM")?, child.vm_mib("VmRSS")?);
        child.terminate(Duration::from_secs(120))?;
        let mib = daemon::dir_bytes(&held.state) as f64 / 1024.0 / 1024.0;
        eprintln!("    run {run}: peak RSS {peak:.0} MiB, RSS {now:.0} MiB, sled {mib:.0} MiB, {:.0} msg/s", total as f64 / secs);
        hwm.values.push(peak);
        rss.values.push(now);
        disk.values.push(mib);
        rate.values.push(total as f64 / secs);
    }
    Ok((vec![hwm, rss, disk, rate], held))
}

pub async fn recovery(opts: Opts, held: Option<Held>) -> anyhow::Result<Vec<Row>> {
    let mut held = match held {
        Some(h) => h,
        None => {
            eprintln!("    building the state first (one `memory` run)");
            memory(Opts { runs: 1, ..opts }).await?.1
        }
    };
    let mut caught_row = Row::new("recovery", "restart to consuming new messages again", "s", Some(Target::Below(5.0)));
    let mut ready_row = Row::new("recovery", "restart to /readyz 200 and a record read", "s", None);
    let mut readyz_row = Row::new("recovery", "  of which until /readyz is 200", "s", None);
    let mut replay_row = Row::new("recovery", "records read again before the new one", "records", None);
    for run in 0..opts.runs {
        // One new chat, produced before the start: stored once hookd has caught up.
        let (b, t) = (held.kafka.bootstrap.clone(), held.topic.clone());
        let (chat, base_ms) = (format!("probe-{run}"), held.base_ms);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let p = LoadProducer::new(&b, 0)?;
            let v = workload::chat_message(&chat, &ChatLoad::tenant(0), &chat, base_ms, 0, "probe");
            p.send(&t, Rec { key: &chat, value: &v, partition: None })?;
            p.finish().map(drop)
        })
        .await??;
        held.bundles += 1;
        let started = Instant::now();
        let mut child = held.spawn(&format!("recovery-{run}"))?;
        let (mut ready, mut consuming, mut caught) = (None, None, None);
        while caught.is_none() || ready.is_none() || consuming.is_none() {
            child.check_alive()?;
            anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "recovery: not caught up after 900 s");
            if ready.is_none() && child.ready().await {
                ready = Some(started.elapsed());
            }
            let m = child.metrics().await;
            if consuming.is_none() && metric(&m, CONSUMED) > 0.0 {
                consuming = Some(started.elapsed());
            }
            if caught.is_none() && metric(&m, OPEN) >= held.bundles as f64 {
                caught = Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let replayed = metric(&child.metrics().await, CONSUMED);
        child.terminate(Duration::from_secs(120))?;
        let (ready, consuming, caught) = (ready.unwrap_or_default(), consuming.unwrap_or_default(), caught.unwrap_or_default());
        eprintln!(
            "    run {run}: ready {:.2} s, consuming {:.2} s, new message stored {:.2} s ({replayed} records read again)",
            ready.as_secs_f64(),
            consuming.as_secs_f64(),
            caught.as_secs_f64()
        );
        caught_row.values.push(caught.as_secs_f64());
        ready_row.values.push(ready.max(consuming).as_secs_f64());
        readyz_row.values.push(ready.as_secs_f64());
        replay_row.values.push(replayed - 1.0);
    }
    let mut rows = vec![caught_row, ready_row, readyz_row, replay_row];
    rows.extend(rebuild(&mut held).await?);
    Ok(rows)
}

/// The state directory deleted: hookd rebuilds every bundle by replaying the topic from the
/// committed offsets (DESIGN section 2); reports the time and the replay rate.
async fn rebuild(held: &mut Held) -> anyhow::Result<Vec<Row>> {
    std::fs::remove_dir_all(&held.state)?;
    let mut time_row = Row::new("recovery", "state deleted: restart to every bundle rebuilt", "s", None);
    let mut rate_row = Row::new("recovery", "state deleted: replay rate", "msg/s", None);
    let started = Instant::now();
    let mut child = held.spawn("rebuild")?;
    loop {
        child.check_alive()?;
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "recovery: state not rebuilt after 1800 s");
        if metric(&child.metrics().await, OPEN) >= held.bundles as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let replayed = metric(&child.metrics().await, CONSUMED);
    child.terminate(Duration::from_secs(120))?;
    eprintln!("    state deleted: {} bundles rebuilt in {secs:.2} s ({replayed} records, {:.0} msg/s)", held.bundles, replayed / secs);
    time_row.values.push(secs);
    rate_row.values.push(replayed / secs);
    Ok(vec![time_row, rate_row])
}
