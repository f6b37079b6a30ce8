//! `passthrough --instances N`: the passthrough load (CRM events to 100 subscriptions) through
//! N hookd instances in one consumer group on one broker, in this process, each with its own
//! state directory and metrics. Reports the rate, each instance's share of the work, and what
//! one rebalance costs: once half the deliveries arrived, an (N+1)-th instance joins, and the
//! harness counts the partitions that moved, the records read again
//! (`hookd_records_replayed_total`) and the time until every partition is owned again.
//!
//! The events are produced once all N instances own partitions (not before they start, as in
//! the one-instance scenario), so no instance gets a head start. Shares are taken at the join,
//! when all N had the same time: an instance's share of the events read (ingest) and of the
//! deliveries sent (sender), against 1/N (target: within 20 %). With 100 subscription keys
//! over `kafka.partitions` partitions the partitions hold unequal work, so the spread is
//! partly the keys' (`--set kafka.partitions=12` spreads finer), and partly the assignor's:
//! `cooperative-sticky` balances each member's partition count over both topics of a group,
//! not per topic, so one instance may hold mostly `hookd.retry` partitions and send little
//! (seen in a debug smoke run at `--scale 0.01`: deliveries sent 57 / 0 / 43 %).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookd::window::clock::SystemClock;

use crate::daemon::{self, until, InProcess};
use crate::delivery::{fresh_broker, notes, produce_events, SUBSCRIPTIONS};
use crate::receiver::Receiver;
use crate::report::{Row, Target};
use crate::{workload, Opts};

const STAGES: [&str; 2] = ["ingest", "sender"];

/// Partitions an instance owns now in `stage`'s group: assigned minus revoked.
fn owned(d: &InProcess, stage: &str) -> u64 {
    let m = &d.shared.metrics;
    m.partitions_assigned.with_label_values(&[stage]).get().saturating_sub(m.partitions_revoked.with_label_values(&[stage]).get())
}

/// Every instance owns partitions of both groups and together they own all of them.
fn balanced(ds: &[InProcess], partitions: u64) -> bool {
    STAGES.iter().all(|s| ds.iter().all(|d| owned(d, s) > 0) && ds.iter().map(|d| owned(d, s)).sum::<u64>() == 2 * partitions)
}

/// Per instance: events read (ingest) and deliveries sent (sender).
fn work(ds: &[InProcess]) -> (Vec<u64>, Vec<u64>) {
    let read = ds.iter().map(|d| d.consumed("crm")).collect();
    let sent = ds.iter().map(|d| d.shared.metrics.deliveries.with_label_values(&["success"]).get()).collect();
    (read, sent)
}

/// Each value's share of the total in %, and the largest deviation from an even share in %
/// of that share.
fn shares(values: &[u64]) -> (Vec<f64>, f64) {
    let total = values.iter().sum::<u64>().max(1) as f64;
    let even = 100.0 / values.len() as f64;
    let pct: Vec<f64> = values.iter().map(|v| *v as f64 * 100.0 / total).collect();
    let worst = pct.iter().map(|p| (p - even).abs() * 100.0 / even).fold(0.0, f64::max);
    (pct, worst)
}

fn replayed(ds: &[InProcess]) -> u64 {
    ds.iter().flat_map(|d| STAGES.map(|s| d.shared.metrics.records_replayed.with_label_values(&[s]).get())).sum()
}

fn moved(ds: &[InProcess]) -> u64 {
    ds.iter().flat_map(|d| STAGES.map(|s| d.shared.metrics.partitions_revoked.with_label_values(&[s]).get())).sum()
}

pub async fn passthrough(opts: Opts) -> anyhow::Result<Vec<Row>> {
    let (n, instances) = (opts.scaled(200_000, 100), opts.instances);
    let (receiver, addr) = Receiver::start()?;
    let mut rate = Row::new("passthrough", "deliveries received, N instances", "deliveries/s", None);
    let mut ingest_spread = Row::new("passthrough", "largest share deviation, events read", "%", Some(Target::Below(20.0)));
    let mut sender_spread = Row::new("passthrough", "largest share deviation, deliveries sent", "%", Some(Target::Below(20.0)));
    let mut replay = Row::new("passthrough", "one join: records read again", "records", None);
    let mut moves = Row::new("passthrough", "one join: partitions moved", "partitions", None);
    let mut settle = Row::new("passthrough", "one join: until every partition owned", "s", None);
    for run in 0..opts.runs {
        let dir = tempfile::Builder::new().prefix("hookd-load-inst-").tempdir()?;
        let (kafka, setup) = fresh_broker(opts, dir.path()).await?;
        let partitions = setup.kafka.partitions as u64;
        let subs = workload::crm_subscriptions(SUBSCRIPTIONS, addr);
        let start = |i: usize| {
            let config = daemon::config(opts, &kafka.bootstrap, "hookd-inst", &dir.path().join(format!("state-{i}")), &subs);
            async move { InProcess::start(config?, Arc::new(SystemClock)).await }
        };
        let mut ds = Vec::new();
        for i in 0..instances {
            ds.push(start(i).await?);
        }
        until(Duration::from_secs(120), "every instance owning partitions", || balanced(&ds, partitions)).await?;
        receiver.reset();
        let (b, t) = (kafka.bootstrap.clone(), setup.topics.crm_events.clone());
        let produced = tokio::task::spawn_blocking(move || produce_events(&b, &t, 0, n));
        let timeout = Duration::from_secs(120) + Duration::from_secs_f64(n as f64 / 1_000.0);
        receiver.wait_distinct(n as u64 / 2, timeout, Duration::from_secs(30)).await?;
        let (read, sent) = work(&ds);
        let (replayed_before, moved_before) = (replayed(&ds), moved(&ds));
        let join = Instant::now();
        ds.push(start(instances).await?);
        until(Duration::from_secs(120), "every partition owned again after the join", || balanced(&ds, partitions)).await?;
        let settled = join.elapsed().as_secs_f64();
        produced.await??;
        let got = receiver.wait_distinct(n as u64, timeout, Duration::from_secs(30)).await;
        let (cost, moved_now, note) = (replayed(&ds) - replayed_before, moved(&ds) - moved_before, notes(&ds[0]));
        let mut closed = true;
        for d in ds {
            closed &= d.stop().await?;
        }
        drop(kafka);
        daemon::remove_dir(dir, closed);
        let s = got?;
        let r = n as f64 / (s.last.zip(s.first).map(|(l, f)| l - f).unwrap_or_default()).as_secs_f64().max(1e-9);
        let ((read_pct, read_worst), (sent_pct, sent_worst)) = (shares(&read), shares(&sent));
        eprintln!(
            "    run {run}: {r:.0} deliveries/s over {instances} instances ({} requests for {} deliveries; {note})\n      \
             shares at the join, events read: {read_pct:.1?} %, deliveries sent: {sent_pct:.1?} %\n      \
             one join: {moved_now} partitions moved, {cost} records read again, every partition owned after {settled:.1} s",
            s.requests, s.distinct
        );
        rate.values.push(r);
        ingest_spread.values.push(read_worst);
        sender_spread.values.push(sent_worst);
        replay.values.push(cost as f64);
        moves.values.push(moved_now as f64);
        settle.values.push(settled);
    }
    Ok(vec![rate, ingest_spread, sender_spread, replay, moves, settle])
}
