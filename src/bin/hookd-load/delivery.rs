//! Delivery scenarios, each run on a fresh broker (every reader starts at the beginning in a
//! new group) with hookd in this process and the harness's receiver:
//! - `passthrough`: 200,000 CRM events, one subscription each out of 100 (five dialects,
//!   signed), all waiting on the broker before hookd starts; distinct deliveries received
//!   per second, first receipt to last.
//! - `latency`: after a warm-up, 1,000 events/s for 60 s from a paced producer (linger 0)
//!   to the same 100 subscriptions; produce-to-receipt p50/p99/max.
//! - `flush`: 100,000 bundles of 3 messages (100 subscriptions x 1,000 chats) stored with
//!   a manual clock before their window's end; then the clock jumps past end + grace; bundles
//!   received per second from the jump to the last receipt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookd::window::clock::{Clock, ManualClock, SystemClock};

use crate::broker::{self, Kafka, LoadProducer, Rec};
use crate::daemon::{self, until, InProcess};
use crate::ingest::BASE_MS;
use crate::receiver::{now_us, Receiver};
use crate::report::{Row, Target};
use crate::workload::{self, ChatLoad, HOUR_MS};
use crate::Opts;

pub const SUBSCRIPTIONS: usize = 100;
/// `linger.ms` of the paced "CRM product" producer: the Kafka Java client's default since
/// 4.0 (and librdkafka's), 5 ms.
const PACED_LINGER_MS: u32 = 5;

/// A fresh broker with hookd's topics, in a temporary directory.
pub async fn fresh_broker(opts: Opts, dir: &std::path::Path) -> anyhow::Result<(Kafka, hookd::config::Config)> {
    let kafka = Kafka::start(&dir.join("broker"))?;
    let setup = daemon::config(opts, &kafka.bootstrap, "setup", &dir.join("setup"), "")?;
    hookd::kafka::ensure_topics(&setup).await?;
    Ok((kafka, setup))
}

/// Produces CRM events `from..to` (tenant `i % SUBSCRIPTIONS`), all at once.
pub fn produce_events(bootstrap: &str, topic: &str, from: usize, to: usize) -> anyhow::Result<()> {
    let p = LoadProducer::new(bootstrap, 20)?;
    for i in from..to {
        let tenant = i % SUBSCRIPTIONS;
        p.send(topic, Rec { key: &format!("t{tenant}"), value: &workload::crm_event(i, tenant, 0), partition: None })?;
    }
    p.finish()?;
    Ok(())
}

/// Progress notes from hookd's own metrics: deferrals and dead letters explain slow runs.
pub fn notes(d: &InProcess) -> String {
    let m = &d.shared.metrics;
    let deferred: u64 = ["busy", "disabled", "unverified"].iter().map(|r| m.deliveries_deferred.with_label_values(&[r]).get()).sum();
    let retried = m.deliveries.with_label_values(&["retry"]).get();
    let dlq: u64 = ["ingest", "render", "deliver"].iter().map(|s| m.dlq_records.with_label_values(&[s]).get()).sum();
    format!("deferred {deferred}, retried {retried}, dead letters {dlq}")
}

pub async fn passthrough(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let n = opts.scaled(200_000, 100);
    let (receiver, addr) = Receiver::start()?;
    let mut row = Row::new("passthrough", "deliveries received", "deliveries/s", Some(Target::AtLeast(10_000.0)));
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-pass-").tempdir()?;
        let (kafka, setup) = fresh_broker(opts, dir.path()).await?;
        let (b, t) = (kafka.bootstrap.clone(), setup.topics.crm_events.clone());
        tokio::task::spawn_blocking(move || produce_events(&b, &t, 0, n)).await??;
        receiver.reset();
        let config = daemon::config(
            opts,
            &kafka.bootstrap,
            "hookd-pass",
            &dir.path().join("state"),
            &workload::crm_subscriptions(SUBSCRIPTIONS, addr),
        )?;
        let d = InProcess::start(config, Arc::new(SystemClock)).await?;
        let timeout = Duration::from_secs(120) + Duration::from_secs_f64(n as f64 / 1_000.0);
        let got = receiver.wait_distinct(n as u64, timeout, Duration::from_secs(30)).await;
        let note = notes(&d);
        let closed = d.stop().await?;
        drop(kafka);
        daemon::remove_dir(dir, closed);
        let s = got?;
        let rate = n as f64 / (s.last.zip(s.first).map(|(l, f)| l - f).unwrap_or_default()).as_secs_f64().max(1e-9);
        eprintln!("    run {run}: {rate:.0} deliveries/s ({} requests for {} deliveries; {note})", s.requests, s.distinct);
        row.values.push(rate);
    }
    Ok(vec![row])
}

pub async fn latency(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let secs = (60.0 * opts.scale).max(1.0);
    let per_sec = 1_000usize;
    let n = (secs * per_sec as f64) as usize;
    let (receiver, addr) = Receiver::start()?;
    let mut p50 = Row::new("latency", "p50 produce to receipt", "ms", None);
    let mut p99 = Row::new("latency", "p99 produce to receipt", "ms", Some(Target::Below(25.0)));
    let mut max = Row::new("latency", "max produce to receipt", "ms", None);
    let mut bare50 = Row::new("latency", "bare consumer, one broker hop: p50", "ms", None);
    let mut bare99 = Row::new("latency", "bare consumer, one broker hop: p99", "ms", None);
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-lat-").tempdir()?;
        let (kafka, setup) = fresh_broker(opts, dir.path()).await?;
        receiver.reset();
        let config = daemon::config(
            opts,
            &kafka.bootstrap,
            "hookd-lat",
            &dir.path().join("state"),
            &workload::crm_subscriptions(SUBSCRIPTIONS, addr),
        )?;
        let d = InProcess::start(config, Arc::new(SystemClock)).await?;
        // The broker's own latency, one hop (hookd's path has two: input, then deliveries).
        let joined = Arc::new(AtomicBool::new(false));
        let (c, t, j) = (setup.clone(), setup.topics.crm_events.clone(), joined.clone());
        let deadline = Instant::now() + Duration::from_secs_f64(secs + 120.0 + WARM_UP_SECS);
        let bare = tokio::task::spawn_blocking(move || broker::bare_latency(&c, &format!("bare-lat-{run}"), &t, n, &j, deadline));
        // Warm-up: group joined, partitions assigned, connections to the receiver open.
        let warm = 2 * SUBSCRIPTIONS;
        let (b, t) = (kafka.bootstrap.clone(), setup.topics.crm_events.clone());
        tokio::task::spawn_blocking(move || produce_events(&b, &t, 10_000_000, 10_000_000 + warm)).await??;
        receiver.wait_distinct(warm as u64, Duration::from_secs(60), Duration::from_secs(30)).await?;
        until(Duration::from_secs(60), "the bare consumer's partitions", || joined.load(Ordering::Relaxed)).await?;
        // A fresh JVM broker serves its first seconds of 1,000 small produce requests/s slowly
        // (interpreted code until the JIT compiles the request path): a backlog builds and
        // every later record waits behind it (docs/PERFORMANCE.md). Warm the broker up at the
        // measured rate first, unstamped, as a broker in service would be.
        receiver.reset();
        let warm_paced = (WARM_UP_SECS * per_sec as f64) as usize;
        let (b, t) = (kafka.bootstrap.clone(), setup.topics.crm_events.clone());
        tokio::task::spawn_blocking(move || paced(&b, &t, 20_000_000, warm_paced, per_sec, false)).await??;
        receiver.wait_distinct(warm_paced as u64, Duration::from_secs(120), Duration::from_secs(30)).await?;
        receiver.reset();
        let (b, t) = (kafka.bootstrap.clone(), setup.topics.crm_events.clone());
        let paced = tokio::task::spawn_blocking(move || paced(&b, &t, 0, n, per_sec, true));
        let got = receiver.wait_distinct(n as u64, Duration::from_secs_f64(secs + 60.0), Duration::from_secs(30)).await;
        paced.await??;
        let note = notes(&d);
        let closed = d.stop().await?;
        drop(kafka);
        daemon::remove_dir(dir, closed);
        got?;
        let l = receiver.latencies_us();
        let b = bare.await??;
        let (q, bq) = (|p| quantile_ms(&l, p), |p| quantile_ms(&b, p));
        eprintln!(
            "    run {run}: {} events, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; bare one hop p50 {:.2} ms, p99 {:.2} ms ({note})",
            l.len(),
            q(0.5),
            q(0.99),
            q(1.0),
            bq(0.5),
            bq(0.99)
        );
        p50.values.push(q(0.5));
        p99.values.push(q(0.99));
        max.values.push(q(1.0));
        bare50.values.push(bq(0.5));
        bare99.values.push(bq(0.99));
    }
    Ok(vec![p50, p99, max, bare50, bare99])
}

/// The `q` quantile (nearest rank) of microsecond samples, in milliseconds.
fn quantile_ms(samples: &[u64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_unstable();
    s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1] as f64 / 1000.0
}

/// Seconds of paced load that warm a fresh broker up before the latency is measured.
const WARM_UP_SECS: f64 = 20.0;

/// Sends events `first..first + n` at `per_sec`, each stamped with [`now_us`] just before it
/// is queued when `stamped` (else 0: not timed by the receiver or the bare consumer).
fn paced(bootstrap: &str, topic: &str, first: usize, n: usize, per_sec: usize, stamped: bool) -> anyhow::Result<()> {
    let p = LoadProducer::new(bootstrap, PACED_LINGER_MS)?;
    p.warm(topic)?;
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / per_sec as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let tenant = i % SUBSCRIPTIONS;
        let stamp = if stamped { now_us() } else { 0 };
        p.send(topic, Rec { key: &format!("t{tenant}"), value: &workload::crm_event(first + i, tenant, stamp), partition: None })?;
    }
    p.finish()?;
    Ok(())
}

pub async fn flush(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let bundles = opts.scaled(100_000, SUBSCRIPTIONS);
    let load =
        ChatLoad { tenants: SUBSCRIPTIONS, chats_per_tenant: bundles / SUBSCRIPTIONS, per_chat: 3, base_ms: BASE_MS, span_ms: HOUR_MS / 2 };
    let bundles = load.bundles(HOUR_MS);
    let (receiver, addr) = Receiver::start()?;
    let mut row = Row::new("flush", "bundles delivered", "bundles/s", Some(Target::AtLeast(30_000.0)));
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-flush-").tempdir()?;
        let (kafka, setup) = fresh_broker(opts, dir.path()).await?;
        let partitions = setup.kafka.partitions;
        let (b, t, l) = (kafka.bootstrap.clone(), setup.topics.chat_messages.clone(), load.clone());
        // Sentinels 5 h later: their windows stay open when the clock jumps.
        tokio::task::spawn_blocking(move || broker::load_chat(&b, &t, &l, partitions, BASE_MS + 5 * HOUR_MS)).await??;
        receiver.reset();
        let clock = Arc::new(ManualClock::new(BASE_MS));
        let subs = workload::chat_subscriptions(SUBSCRIPTIONS, "1h", addr);
        let config = daemon::config(opts, &kafka.bootstrap, "hookd-flush", &dir.path().join("state"), &subs)?;
        let grace_ms = config.chat.grace_ms as i64;
        let d = InProcess::start(config, clock.clone() as Arc<dyn Clock>).await?;
        let expected = (bundles + partitions as usize) as i64;
        let timeout = Duration::from_secs(120) + Duration::from_secs_f64(load.total() as f64 / 2_000.0);
        until(timeout, "every bundle stored", || d.open_bundles() >= expected).await?;
        tokio::time::sleep(Duration::from_millis(500)).await; // a close tick: sled flushed
        let jump = Instant::now();
        clock.set(BASE_MS + HOUR_MS + grace_ms + 1);
        let got = receiver
            .wait_distinct(
                bundles as u64,
                Duration::from_secs(120) + Duration::from_secs_f64(bundles as f64 / 200.0),
                Duration::from_secs(30),
            )
            .await;
        let note = notes(&d);
        let emitted = d.shared.metrics.bundles_emitted.get();
        let closed = d.stop().await?;
        drop(kafka);
        daemon::remove_dir(dir, closed);
        let s = got?;
        let rate = bundles as f64 / (s.last.map_or(0.0, |l| (l - jump).as_secs_f64())).max(1e-9);
        eprintln!("    run {run}: {rate:.0} bundles/s ({} requests, {} distinct, {emitted} emitted; {note})", s.requests, s.distinct);
        row.values.push(rate);
    }
    Ok(vec![row])
}
